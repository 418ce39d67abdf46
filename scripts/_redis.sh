# Sourced by scripts/test and scripts/bench: install Debian's redis-server where it is
# missing and this user may (root, or sudo without a password). The Redis tests and the
# herd benchmark start their own server on a free port; this only provides the binary.
source "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
command -v redis-server > /dev/null 2>&1 || apt_install redis-server
