#!/usr/bin/env bash
# Build a Python plugin into a wasm component with componentize-py, installing
# the pinned componentize-py into a virtualenv first when it is missing.
#
#   examples/plugins/componentize-py.sh SRC_DIR MODULE OUT.wasm [WORLD]
#
# SRC_DIR holds MODULE.py (a `class WitWorld(wit_world.WitWorld)`); the world
# is WORLD of wit/sandpipe.wit, by default `plugin` (`plugin-http` adds
# wasi:http's outgoing handler). The virtualenv lives in
# $SANDPIPE_TOOLS_DIR/venv (default: the guest target dir's polyglot/ folder,
# outside git), or with `pip install --target` in $SANDPIPE_TOOLS_DIR/site
# when no virtualenv can be made. Exit status 75 means the tool could not be
# installed.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    echo "usage: $0 SRC_DIR MODULE OUT.wasm [WORLD]" >&2
    exit 2
fi
src=$1 module=$2 out=$3 world=${4:-plugin}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
guests=${SANDPIPE_GUEST_TARGET_DIR:-$root/target/guests}
tools=${SANDPIPE_TOOLS_DIR:-$guests/polyglot}
venv=$tools/venv
# Where the fallback installs it (`pip install --target`) when this Python
# cannot make a virtualenv (Debian's python3 without python3-venv).
site=$tools/site
python=$(command -v python3 || command -v python || true)

tool() {
    if [ -x "$venv/bin/componentize-py" ]; then
        "$venv/bin/componentize-py" "$@"
    elif [ -d "$site/componentize_py" ] && [ -n "$python" ]; then
        PYTHONPATH="$site" "$python" -c \
            'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' "$@"
    else
        return 127
    fi
}

if ! tool --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY_VERSION"; then
    echo "installing componentize-py $COMPONENTIZE_PY_VERSION into $tools" >&2
    if [ -z "$python" ]; then
        echo "cannot install componentize-py: no python3 on PATH" >&2
        exit 75
    fi
    mkdir -p "$tools"
    rm -rf "$venv" "$site"
    if ! { "$python" -m venv "$venv" >&2 \
        && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "componentize-py==$COMPONENTIZE_PY_VERSION" >&2; }; then
        echo "no virtualenv with $python; trying pip install --target $site" >&2
        rm -rf "$venv"
        if ! "$python" -m pip install --quiet --disable-pip-version-check --target "$site" \
            "componentize-py==$COMPONENTIZE_PY_VERSION" >&2; then
            echo "cannot install componentize-py $COMPONENTIZE_PY_VERSION from PyPI with $python" >&2
            exit 75
        fi
    fi
fi

mkdir -p "$(dirname "$out")"
# Build next to the output and rename, so a half-written file is never used.
tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT
tool -d "$root/wit" -w "$world" componentize -p "$src" "$module" -o "$tmp" >&2
mv "$tmp" "$out"
echo "built $out ($(wc -c <"$out") bytes)" >&2
