# Sourced by scripts/test and scripts/demo: make .venv with promptq (and its test extras)
# installed, from the repository root. Needs Python >= 3.11 ($PYTHON, default python3).
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.promptq-installed"

if [ ! -x "$VENV/bin/python" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "$0: $PYTHON not found; promptq needs Python >= 3.11" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "$0: promptq needs Python >= 3.11, but $PYTHON is" \
            "$("$PYTHON" -c 'import platform; print(platform.python_version())')" >&2
        echo "$0: set PYTHON=/path/to/python3.11 (or newer) and run again" >&2
        exit 1
    fi
    echo "==> creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "==> installing promptq with its test extras into $VENV"
    # pip byte-compiles everything it installs: keep it so. Where PYTHONDONTWRITEBYTECODE is
    # set (CI here), nothing else would, and every worker a test starts would compile
    # LiteLLM again (~5 s of CPU each).
    "$VENV/bin/pip" install -q -e ".[test]"
    touch "$STAMP"
fi
