# Sourced by scripts/test: install Debian's chromium (for the browser tests, driven
# headless by Playwright, which never downloads a browser of its own; the fonts are
# named for the screenshot test) and Node.js with npm (for the JavaScript client's unit
# tests and `npm pack`) where they are missing. Without them those tests skip, unless
# WSGATE_REQUIRE_BROWSER=1 (CI) makes them fail.
source "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
wanted=()
command -v chromium > /dev/null 2>&1 || wanted+=(chromium fonts-liberation)
command -v node > /dev/null 2>&1 || wanted+=(nodejs)
command -v npm > /dev/null 2>&1 || wanted+=(npm)
[ ${#wanted[@]} -eq 0 ] || apt_install "${wanted[@]}"
