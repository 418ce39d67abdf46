# Sourced by scripts/test and scripts/bench: install Debian's redis-server where it is
# missing and this user may (root, or sudo without a password). The Redis tests and the
# herd benchmark start their own server on a free port; this only provides the binary.
if ! command -v redis-server > /dev/null 2>&1; then
    apt=()
    if [ "$(id -u)" = 0 ]; then
        apt=(apt-get)
    elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then
        apt=(sudo -n apt-get)
    fi
    if [ ${#apt[@]} -gt 0 ] && command -v apt-get > /dev/null 2>&1; then
        echo "installing redis-server (Debian's package)" >&2
        export DEBIAN_FRONTEND=noninteractive
        "${apt[@]}" install -y -qq redis-server > /dev/null 2>&1 ||
            { "${apt[@]}" update -qq > /dev/null 2>&1 &&
              "${apt[@]}" install -y -qq redis-server > /dev/null 2>&1; } ||
            echo "could not install redis-server" >&2
    else
        echo "no redis-server and no way to install one" >&2
    fi
fi
