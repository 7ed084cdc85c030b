#!/bin/sh
# Run this scenario in the real sandbox:
#   exec.sh PLUGIN.wasm [more sandpipe exec options, e.g. --json]
# $SANDPIPE names the sandpipe binary (default: sandpipe on PATH).
# Written by sandpipe_sdk::testing::Scenario::write_to.
set -eu
here=$(dirname "$0")
plugin=${1:?usage: exec.sh PLUGIN.wasm [sandpipe exec options]}
shift
# The plugin's tables, set up as the engine does at start.
if [ -f "$here/init.sql" ]; then set -- --sql-init "$here/init.sql" "$@"; fi
exec "${SANDPIPE:-sandpipe}" exec "$plugin" --message "$here/message.json" --data "$here/data" --meta-file "$here/meta.json" --config 'output=stats' "$@"
