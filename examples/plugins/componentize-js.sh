#!/usr/bin/env bash
# Build a JavaScript plugin into a wasm component with componentize-js,
# installing the toolchain pinned in js-validate/package-lock.json
# (@bytecodealliance/componentize-js and jco) with `npm ci` first when it is
# missing or stale.
#
#   examples/plugins/componentize-js.sh SRC.js OUT.wasm [--http]
#
# The world is `plugin` of wit/sandpipe.wit. The fetch event (an incoming
# HTTP handler) is disabled; so is WASI http, which `fetch` needs, unless
# `--http` is given: then the component imports wasi:http/outgoing-handler,
# and only a grant's `http.allow` list lets its requests out. Exit status
# 75 means the tool could not be installed.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ] || { [ $# -eq 3 ] && [ "$3" != --http ]; }; then
    echo "usage: $0 SRC.js OUT.wasm [--http]" >&2
    exit 2
fi
src=$1 out=$2
disable=(-d http -d fetch-event)
if [ "${3:-}" = --http ]; then
    disable=(-d fetch-event)
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
pkg=$root/examples/plugins/js-validate
tool=$pkg/node_modules/.bin/componentize-js

# npm ci writes node_modules/.package-lock.json; reinstall when the lock
# file is newer (the pins changed) or the tool is missing.
if [ ! -x "$tool" ] || [ "$pkg/package-lock.json" -nt "$pkg/node_modules/.package-lock.json" ]; then
    echo "installing the JavaScript toolchain (npm ci in $pkg)" >&2
    if ! command -v npm >/dev/null; then
        echo "cannot install componentize-js: no npm on PATH" >&2
        exit 75
    fi
    if ! (cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error >&2); then
        echo "cannot install componentize-js: npm ci failed in $pkg" >&2
        exit 75
    fi
fi

mkdir -p "$(dirname "$out")"
tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT
# componentize-js resolves its engine relative to itself; run it from the
# package so `npx`-style lookup is not needed.
"$tool" "$src" -w "$root/wit" -n plugin "${disable[@]}" -o "$tmp" >&2
mv "$tmp" "$out"
echo "built $out ($(wc -c <"$out") bytes)" >&2
