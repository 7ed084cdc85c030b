# Sandpipe task runner. Run `just --list` to see the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# ---------------------------------------------------------------------------
# Guests: the Rust plugins (connectors) and the engine's test fixtures,
# compiled to wasm32-wasip2 components.
#
# They build into their own target directory so that they never contend for
# (or invalidate) the host build's. Override it with SANDPIPE_GUEST_TARGET_DIR,
# e.g. to keep a warm cache outside the clone.
# ---------------------------------------------------------------------------

guest_target_dir := env_var_or_default("SANDPIPE_GUEST_TARGET_DIR", justfile_directory() / "target" / "guests")
# Where the built components land (`guest` profile, see Cargo.toml).
guest_out := guest_target_dir / "wasm32-wasip2" / "guest"
# Where the connectors are copied, under their plugin names, each with its
# SQL init script (NAME.init.sql, for the grant's `sql: { init: ... }`).
plugins_dir := justfile_directory() / "target" / "plugins"

# Every guest crate: built together in one cargo invocation.
guest_connectors := "-p image-meta -p text-stats -p http-enrich -p http-source -p mysql-source -p table-service -p zenodo-port"
guest_fixtures := "-p fx-panic -p fx-loop -p fx-memory -p fx-recurse -p fx-probe -p fx-hostile -p fx-http -p fx-v01 -p fx-insert -p fx-source -p fx-service"

# The connectors are copied under their plugin names (dashes, not the crate's
# underscores); the fixtures stay in target/guests/wasm32-wasip2/guest/ as
# fx_<name>.wasm (fx_panic.wasm, fx_loop.wasm, ...).
#
# Build every guest (connectors + fixtures) in one cargo run; copy connectors to target/plugins/
guests: guest-toolchain
    CARGO_TARGET_DIR="{{guest_target_dir}}" cargo build --target wasm32-wasip2 --profile guest {{guest_connectors}} {{guest_fixtures}}
    mkdir -p "{{plugins_dir}}"
    cp "{{guest_out}}/image_meta.wasm" "{{plugins_dir}}/image-meta.wasm"
    cp "{{guest_out}}/text_stats.wasm" "{{plugins_dir}}/text-stats.wasm"
    cp connectors/image-meta/init.sql "{{plugins_dir}}/image-meta.init.sql"
    cp connectors/text-stats/init.sql "{{plugins_dir}}/text-stats.init.sql"
    @echo "components: {{guest_out}}/*.wasm; plugins: {{plugins_dir}}"

# Make sure the wasm32-wasip2 target is installed (no-op when it is).
guest-toolchain:
    rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# Unit tests of the SDK, the connectors and fx-insert, on the host (whole plugins against sandpipe_sdk::testing's fakes).
guest-test:
    CARGO_TARGET_DIR="{{guest_target_dir}}" cargo test -p sandpipe-sdk -p sandpipe-sqlite-policy {{guest_connectors}} -p fx-insert

# Format check and clippy (wasm target, warnings denied) for every guest crate.
guest-lint: guest-toolchain
    cargo fmt -p sandpipe-sdk {{guest_connectors}} {{guest_fixtures}} -- --check
    CARGO_TARGET_DIR="{{guest_target_dir}}" cargo clippy --target wasm32-wasip2 -p sandpipe-sdk {{guest_connectors}} {{guest_fixtures}} -- -D warnings

# ---------------------------------------------------------------------------
# Plugins in Python and JavaScript (examples/plugins/): each script installs
# its pinned tool when missing (componentize-py into a virtualenv under the
# guest target dir, componentize-js + jco with `npm ci` in the example).
# ---------------------------------------------------------------------------

# Build examples/plugins/python-csv with componentize-py into target/plugins/
py-plugin:
    examples/plugins/componentize-py.sh examples/plugins/python-csv app "{{plugins_dir}}/python-csv.wasm"

# Build examples/plugins/js-validate with componentize-js into target/plugins/
js-plugin:
    examples/plugins/componentize-js.sh examples/plugins/js-validate/validate.js "{{plugins_dir}}/js-validate.wasm"

# Build examples/plugins/js-enrich (fetch through the `http` grant) into target/plugins/
js-enrich:
    examples/plugins/componentize-js.sh examples/plugins/js-enrich/enrich.js "{{plugins_dir}}/js-enrich.wasm" --http

# Build examples/plugins/python-enrich (the plugin-http world) into target/plugins/
py-enrich:
    examples/plugins/componentize-py.sh examples/plugins/python-enrich app "{{plugins_dir}}/python-enrich.wasm" plugin-http

# Build examples/sources/python-mysql (a source in Python) into target/plugins/
py-source:
    examples/plugins/componentize-py.sh examples/sources/python-mysql app "{{plugins_dir}}/python-mysql.wasm" source

# Build both non-Rust example plugins
polyglot: py-plugin js-plugin

# ---------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------

quickstart_dir := justfile_directory() / "target" / "quickstart"

# Build everything, then run the quickstart (examples/quickstart, copied to
# target/quickstart so the example stays pristine) with `sandpipe run --once`.
quickstart: guests
    cargo build -p sandpipe
    rm -rf "{{quickstart_dir}}"
    mkdir -p "{{quickstart_dir}}"
    cp -r examples/quickstart/. "{{quickstart_dir}}/"
    mkdir -p "{{quickstart_dir}}/plugins"
    cp "{{plugins_dir}}/image-meta.wasm" "{{plugins_dir}}/text-stats.wasm" "{{quickstart_dir}}/plugins/"
    cp "{{plugins_dir}}/image-meta.init.sql" "{{plugins_dir}}/text-stats.init.sql" "{{quickstart_dir}}/plugins/"
    cargo run -q -p sandpipe -- run --once -c "{{quickstart_dir}}/sandpipe.yaml"

# Every test: the engine's unit and end-to-end tests (these build the guest
# components themselves, once per run), then the guests' own unit tests.
test: guest-toolchain test-deps
    cargo test
    just guest-test

# Tools the tests use besides the services: moto's S3 server (PyPI).
test-deps:
    python3 -c 'import moto.server' 2>/dev/null || python3 -m pip install --quiet 'moto[server]'



# Fuzz the parsers of untrusted input (fuzz/: the message envelope and the
# configuration loader) with cargo-fuzz, `seconds` per target. Installs
# cargo-fuzz when missing; uses the nightly toolchain when one is installed,
# else stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs unstable flags).
# The corpus grows in target/fuzz-corpus/<target>, crashes land in
# fuzz/artifacts/<target>/ and the recipe fails.
fuzz seconds="60":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    if rustup run nightly rustc --version >/dev/null 2>&1; then fuzz=(cargo +nightly fuzz); else export RUSTC_BOOTSTRAP=1; fuzz=(cargo fuzz); fi
    cd fuzz
    for target in envelope config; do
        corpus="{{justfile_directory()}}/target/fuzz-corpus/$target"
        mkdir -p "$corpus"
        dict=(); [ -f "$target.dict" ] && dict=(-dict="$target.dict")
        echo "fuzzing $target for {{seconds}} s"
        "${fuzz[@]}" run "$target" "$corpus" "seeds/$target" -- \
            -max_total_time={{seconds}} -timeout=10 -rss_limit_mb=2048 -max_len=65536 "${dict[@]}" -print_final_stats=1
    done

# Check Cargo.lock and fuzz/Cargo.lock against the RustSec advisory
# database with cargo-audit (installed when missing): a dependency with a
# published vulnerability — a wasmtime advisory above all — fails. The
# database is SANDPIPE_ADVISORY_DB (a checkout of
# github.com/rustsec/advisory-db), else what cargo audit fetches itself
# into the target directory (advisory-db-fetched; kept, so a later run
# without network uses it). A canary lock file with a vulnerable wasmtime
# must fail, proving the database loaded. With no database reachable (or
# cargo-audit not installable) the recipe says SKIPPED and succeeds,
# unless SANDPIPE_REQUIRE_AUDIT=1.
audit:
    #!/usr/bin/env bash
    set -euo pipefail
    skip() {
        echo "SKIPPED: $1"
        [ "${SANDPIPE_REQUIRE_AUDIT:-0}" = 1 ] && exit 1
        exit 0
    }
    if ! command -v cargo-audit >/dev/null; then
        cargo install cargo-audit --locked || skip "cargo-audit is not installed and could not be installed"
    fi
    db="${SANDPIPE_ADVISORY_DB:-}"
    if [ -n "$db" ]; then
        if [ ! -d "$db/crates" ]; then
            echo "SANDPIPE_ADVISORY_DB=$db is not a checkout of github.com/rustsec/advisory-db (no crates/ folder)"
            exit 1
        fi
    else
        db="${CARGO_TARGET_DIR:-{{justfile_directory()}}/target}/advisory-db-fetched"
        # Fetches (or updates) the database; the canary's own failure is expected.
        timeout 120 cargo audit --db "$db" --stale -f tests/fixtures/audit-canary/Cargo.lock >/dev/null 2>&1 || true
        [ -d "$db/crates" ] || skip "no RustSec advisory database reachable (set SANDPIPE_ADVISORY_DB to a checkout of github.com/rustsec/advisory-db)"
    fi
    audit=(cargo audit --db "$db" --no-fetch --stale)
    echo "advisory database: $db ($(git -C "$db" log -1 --format=%cs 2>/dev/null || echo 'date unknown'))"
    if "${audit[@]}" -f tests/fixtures/audit-canary/Cargo.lock >/dev/null 2>&1; then
        echo "the canary (wasmtime 41.0.0) passed the audit: the advisory database did not load"
        exit 1
    fi
    "${audit[@]}" -f Cargo.lock
    # The fuzz workspace is a development tool whose crates this machine's
    # registry index may not hold: advisories only, no yanked lookup.
    "${audit[@]}" --no-yanked -f fuzz/Cargo.lock

# Formatting and clippy, warnings denied, for the engine and the guests.
lint: guest-lint
    cargo fmt --all -- --check
    cd fuzz && cargo fmt -- --check
    cargo clippy --all-targets -- -D warnings

# Run examples/rabbitmq-redis-postgres end to end against the local
# RabbitMQ, Redis and PostgreSQL: create the database, store the metadata,
# publish the sample messages, process them, print the results.
example-services: guests
    #!/usr/bin/env bash
    set -euo pipefail
    export RABBITMQ_PASSWORD="${RABBITMQ_PASSWORD:-guest}"
    cfg=examples/rabbitmq-redis-postgres/sandpipe.yaml
    psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'sandpipe_example'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -qc 'CREATE DATABASE sandpipe_example'
    redis-cli SET sandpipe:example:meta:red-square '{"camera": "none", "source": "example"}' >/dev/null
    redis-cli HSET sandpipe:example:meta:gradient camera none source example >/dev/null
    cargo build -q -p sandpipe
    for m in examples/rabbitmq-redis-postgres/messages/*.json; do
        cargo run -q -p sandpipe -- send -c "$cfg" "$m"
    done
    cargo run -q -p sandpipe -- run --once -c "$cfg"
    psql -h 127.0.0.1 -U postgres sandpipe_example -c 'SELECT message_id, format, width, height, bytes FROM image_meta.image_meta ORDER BY message_id'
    psql -h 127.0.0.1 -U postgres sandpipe_example -c 'SELECT message_id, lines, words, bytes FROM text_stats.text_stats ORDER BY message_id'

# Run examples/sources/http-api: serve its api/books on 127.0.0.1:8765,
# sync it into the embedded SQLite sink with connectors/http-source (basic
# rules keep the books before 1980), list the sink and the job.
example-source: guests
    #!/usr/bin/env bash
    set -euo pipefail
    dir="{{justfile_directory()}}/target/example-source"
    rm -rf "$dir" && mkdir -p "$dir/plugins"
    cp -r examples/sources/http-api/. "$dir/"
    cp "{{guest_out}}/http_source.wasm" "$dir/plugins/books.wasm"
    (cd "$dir" && exec python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1) &
    server=$!
    trap 'kill $server' EXIT
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/8765) 2>/dev/null && break; sleep 0.1; done
    cargo build -q -p sandpipe
    cargo run -q -p sandpipe -- sync -c "$dir/sandpipe.yaml" books
    cargo run -q -p sandpipe -- sources -c "$dir/sandpipe.yaml"
    python3 -c 'import sqlite3, sys; [print(*r) for r in sqlite3.connect(sys.argv[1]).execute("SELECT id, json_extract(body, \"$.year\"), json_extract(body, \"$.title\") FROM books ORDER BY 2")]' "$dir/state/sources.sqlite"

# Run examples/redis-s3 end to end: a local S3 server (moto) on port 9000,
# the quickstart's objects uploaded, messages added to the Redis stream,
# processed with `sandpipe run --once`.
example-redis-s3: guests test-deps
    #!/usr/bin/env bash
    set -euo pipefail
    export S3_ENDPOINT=http://127.0.0.1:9000 S3_ACCESS_KEY_ID=testing S3_SECRET_ACCESS_KEY=testing
    cfg=examples/redis-s3/sandpipe.yaml
    python3 -m moto.server -H 127.0.0.1 -p 9000 >/dev/null 2>&1 &
    moto=$!
    trap 'kill $moto' EXIT
    for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/9000) 2>/dev/null && break; sleep 0.2; done
    python3 examples/redis-s3/upload.py "$S3_ENDPOINT"
    for name in red-square gradient checker; do
        case $name in red-square) t=image/png; f=images/red-square.png;; gradient) t=image/jpeg; f=images/gradient.jpg;; checker) t=image/gif; f=images/checker.gif;; esac
        redis-cli XADD sandpipe-example-in '*' message "{\"uuid_ref\": \"s3-$name\", \"data_type\": \"$t\", \"data_location\": \"$f\"}" >/dev/null
    done
    redis-cli XADD sandpipe-example-in '*' message '{"uuid_ref": "s3-poem", "data_type": "text/plain", "data_location": "texts/poem.txt"}' >/dev/null
    cargo build -q -p sandpipe
    cargo run -q -p sandpipe -- run --once -c "$cfg"
    redis-cli XRANGE sandpipe-example-stats - +

# Every benchmark (see docs/benchmarks.md).
bench: bench-pipeline bench-sqapi bench-sync bench-service bench-micro

# Services: an HTTP query's round trip and queries per second, sandboxed,
# compiled in and an independent axum handler side by side; a 10,000-row
# query over the Vantiq protocol (engine/benches/service.rs).
bench-service: guests
    env -u RUST_BACKTRACE cargo bench --bench service

# The end-to-end embedded path, sandboxed against native (engine/benches/pipeline.rs).
bench-pipeline: guests
    env -u RUST_BACKTRACE cargo bench --bench pipeline

# The sqAPI workload through RabbitMQ, Redis and PostgreSQL: the engine
# (fx-insert sandboxed, and compiled in) against an independent consumer
# (bench/native-consumer), side by side (engine/benches/sqapi.rs). ARGS:
# e.g. `--messages 2000 --runs 1 --prefetch 16`.
bench-sqapi *ARGS: guests
    env -u RUST_BACKTRACE cargo bench --bench sqapi -- {{ARGS}}

# Source syncs: a MariaDB table into PostgreSQL, the engine against an
# independent program (bench/native-sync), and an HTTP API source
# (engine/benches/sync.rs). ARGS: --rows N --runs R --http-items N.
bench-sync *ARGS: guests
    env -u RUST_BACKTRACE cargo bench --bench sync -- {{ARGS}}

# Criterion micro-benchmarks of the sandbox (engine/benches/sandbox.rs).
bench-micro: guests
    env -u RUST_BACKTRACE cargo bench --bench sandbox

# The orders service (examples/services/orders): table-service over a
# throw-away PostgreSQL database, three orders published and queried over
# HTTP, then everything removed.
example-service: guests
    #!/usr/bin/env bash
    set -euo pipefail
    dir="{{justfile_directory()}}/target/example-service"
    rm -rf "$dir" && mkdir -p "$dir/plugins"
    cp examples/services/orders/sandpipe.yaml "$dir/"
    cp "{{guest_out}}/table_service.wasm" "$dir/plugins/orders.wasm"
    cp connectors/table-service/init.sql "$dir/plugins/orders.init.sql"
    head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$dir/api.token"
    token=$(cat "$dir/api.token")
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS sandpipe_example_orders WITH (FORCE)" -c "CREATE DATABASE sandpipe_example_orders"
    cargo build -q -p sandpipe
    bin="$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/sandpipe"
    "$bin" services -c "$dir/sandpipe.yaml"
    (cd "$dir" && exec "$bin" run -c sandpipe.yaml) &
    engine=$!
    trap 'kill $engine 2>/dev/null; wait $engine 2>/dev/null; psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS sandpipe_example_orders WITH (FORCE)"' EXIT
    for _ in $(seq 300); do curl -sf http://127.0.0.1:9090/readyz >/dev/null && break; sleep 0.1; done
    for order in '{"id":"o-1","customer":"ada","total":12,"status":"open"}' '{"id":"o-2","customer":"bob","total":7,"status":"closed"}' '{"id":"o-3","customer":"ada","total":30,"status":"open"}'; do
        curl -sf -H "Authorization: Bearer $token" -d "$order" http://127.0.0.1:9090/v1/services/orders/publish >/dev/null
    done
    echo "open orders (NDJSON replies):"
    curl -sfN -H "Authorization: Bearer $token" -d '{"select":["id","total"],"where":{"status":"open"}}' http://127.0.0.1:9090/v1/services/orders/query
    echo "a bad query:"
    curl -sfN -H "Authorization: Bearer $token" -d '{"select":["price"]}' http://127.0.0.1:9090/v1/services/orders/query
