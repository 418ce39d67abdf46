# Sourced by _redis.sh and _browser.sh: apt_install PACKAGE... installs Debian packages
# without their recommends where this user may (root, or sudo without a password), and
# says so on stderr where it cannot; the tests that need them skip or, in CI, fail.
apt_install() {
    local apt=()
    if [ "$(id -u)" = 0 ]; then
        apt=(apt-get)
    elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then
        apt=(sudo -n apt-get)
    fi
    if [ ${#apt[@]} -eq 0 ] || ! command -v apt-get > /dev/null 2>&1; then
        echo "no $* and no way to install them" >&2
        return 0
    fi
    echo "installing $* (Debian's packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${apt[@]}" install -y -qq --no-install-recommends "$@" > /dev/null 2>&1 ||
        { "${apt[@]}" update -qq > /dev/null 2>&1 &&
          "${apt[@]}" install -y -qq --no-install-recommends "$@" > /dev/null 2>&1; } ||
        echo "could not install $*" >&2
}
