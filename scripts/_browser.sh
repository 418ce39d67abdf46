# Sourced by scripts/test: install Debian's chromium (for the browser tests, driven
# headless by Playwright, which never downloads a browser of its own) and Node.js with
# npm (for the JavaScript client's unit tests and `npm pack`) where they are missing and
# this user may (root, or sudo without a password). Without them those tests skip,
# unless WSGATE_REQUIRE_BROWSER=1 (CI) makes them fail.
wanted=()
command -v chromium > /dev/null 2>&1 || wanted+=(chromium fonts-liberation)
command -v node > /dev/null 2>&1 || wanted+=(nodejs)
command -v npm > /dev/null 2>&1 || wanted+=(npm)
if [ ${#wanted[@]} -gt 0 ]; then
    apt=()
    if [ "$(id -u)" = 0 ]; then
        apt=(apt-get)
    elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then
        apt=(sudo -n apt-get)
    fi
    if [ ${#apt[@]} -gt 0 ] && command -v apt-get > /dev/null 2>&1; then
        echo "installing ${wanted[*]} (Debian's packages)" >&2
        export DEBIAN_FRONTEND=noninteractive
        # Without recommends: chromium's own dependencies run it headless, and the
        # fonts are named, for the screenshot test.
        "${apt[@]}" install -y -qq --no-install-recommends "${wanted[@]}" > /dev/null 2>&1 ||
            { "${apt[@]}" update -qq > /dev/null 2>&1 &&
              "${apt[@]}" install -y -qq --no-install-recommends "${wanted[@]}" \
                  > /dev/null 2>&1; } ||
            echo "could not install ${wanted[*]}" >&2
    else
        echo "no ${wanted[*]} and no way to install them" >&2
    fi
fi
