# Sourced by the other scripts: make .venv on first use and keep it in step with
# pyproject.toml. Usage: source scripts/_venv.sh [extras]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WSGATE_VENV:-$ROOT/.venv}"
extras="${1:-}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "trio-wsgate needs Python 3.11 or newer ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version > /dev/null 2>&1; then
    # An earlier attempt without Debian's python3-venv left it without pip.
    echo "$VENV has no pip: making it again" >&2
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$python" -c 'import ensurepip' 2> /dev/null; then
        # Debian's python3 makes venvs with pip only with its python3-venv package.
        source "$ROOT/scripts/_apt.sh"
        apt_install python3-venv
    fi
    echo "creating the virtual environment in $VENV" >&2
    "$python" -m venv "$VENV"
fi
# One stamp per pyproject.toml version and set of extras; the bare package is there
# whenever any stamp of this version is.
version="$(sha1sum < "$ROOT/pyproject.toml" | cut -c1-12)"
stamp="$VENV/.installed-$version-${extras:-base}"
installed=no
if [ -f "$stamp" ]; then
    installed=yes
elif [ -z "$extras" ] && compgen -G "$VENV/.installed-$version-*" > /dev/null; then
    installed=yes
fi
if [ "$installed" = no ]; then
    echo "installing trio-wsgate${extras:+[$extras]} into $VENV" >&2
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}"
    find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$version-*" -delete
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
