# Sourced by examples/demo.sh and .ci/run: installs what procmqtt needs on a fresh machine.
#
# - Debian packages through apt-get (with sudo when not root), only those missing. Debian puts
#   mosquitto in /usr/sbin, which is not on a normal user's PATH, so that is looked at too.
# - A virtual environment in .venv (Debian's own Python refuses `pip install` outside one: PEP 668),
#   made with the first python3 on PATH (or $PYTHON); procmqtt is installed into it in editable mode.
# After `ensure_venv EXTRA`, $VENV_PYTHON is the interpreter to run.

VENV_DIR=.venv

have_tool() {  # have_tool NAME: on PATH, or in an sbin directory a normal user's PATH lacks
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

apt_install() {  # apt_install PACKAGE...: install Debian packages, as root or through sudo
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing: $*; install them with your system's package manager (e.g. brew install mosquitto)" >&2
        exit 2
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing Debian packages: $*" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@" >&2
}

ensure_tools() {  # ensure_tools TOOL:PACKAGE...: install the packages of the tools not found
    local missing=() pair
    for pair in "$@"; do
        have_tool "${pair%%:*}" || missing+=("${pair##*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

ensure_venv() {  # ensure_venv EXTRA: .venv with procmqtt[EXTRA] installed; sets VENV_PYTHON
    local python="${PYTHON:-python3}"
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        if ! "$python" -m venv "$VENV_DIR" >/dev/null 2>&1; then
            rm -rf "$VENV_DIR"
            # Debian splits venv's pip bootstrap into python3-venv (python3.X-venv on some releases)
            local version
            version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
            apt_install python3-venv "python$version-venv"
            "$python" -m venv "$VENV_DIR"
        fi
    fi
    VENV_PYTHON="$VENV_DIR/bin/python"
    "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[$1]"
}
