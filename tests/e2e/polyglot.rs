//! Plugins written in Python (componentize-py) and JavaScript
//! (componentize-js) run through the engine end to end: the examples in
//! examples/plugins/ and a Python WASI probe fixture (tests/fixtures/py-wasi).
//!
//! The components are built with the same scripts the `just py-plugin` /
//! `just js-plugin` recipes run (examples/plugins/componentize-*.sh), once
//! per test process, into `<guest target>/polyglot/built/NAME-HASH.wasm`
//! where HASH covers every input (script, WIT, sources, npm lock file): a
//! warm run does not rebuild. A toolchain that cannot be installed (the
//! script exits 75) skips the test with a loud `SKIPPED` line on stderr;
//! any other build failure fails it.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::harness::{Deployment, guest_target_dir, root};

/// Exit status of the build scripts when the tool cannot be installed.
const TOOL_MISSING: i32 = 75;

/// One non-Rust component and how to build it.
struct Recipe {
    /// File name (without `.wasm`) of the plugin in a deployment.
    name: &'static str,
    /// The build script, relative to the workspace root.
    script: &'static str,
    /// The script's arguments before the output path, relative to the root.
    args: &'static [&'static str],
    /// Every file the build depends on besides the script and the WIT.
    inputs: &'static [&'static str],
    /// The script's arguments after the output path.
    flags: &'static [&'static str],
}

const PYTHON_CSV: Recipe = Recipe {
    name: "python-csv",
    script: "examples/plugins/componentize-py.sh",
    args: &["examples/plugins/python-csv", "app"],
    inputs: &["examples/plugins/python-csv/app.py"],
    flags: &[],
};

const PY_WASI: Recipe = Recipe {
    name: "py-wasi",
    script: "examples/plugins/componentize-py.sh",
    args: &["tests/fixtures/py-wasi", "app"],
    inputs: &["tests/fixtures/py-wasi/app.py"],
    flags: &[],
};

const JS_VALIDATE: Recipe = Recipe {
    name: "js-validate",
    script: "examples/plugins/componentize-js.sh",
    args: &["examples/plugins/js-validate/validate.js"],
    inputs: &[
        "examples/plugins/js-validate/validate.js",
        "examples/plugins/js-validate/package.json",
        "examples/plugins/js-validate/package-lock.json",
    ],
    flags: &[],
};

const PY_ENRICH: Recipe = Recipe {
    name: "py-enrich",
    script: "examples/plugins/componentize-py.sh",
    args: &["examples/plugins/python-enrich", "app"],
    inputs: &["examples/plugins/python-enrich/app.py"],
    flags: &["plugin-http"],
};

const PY_SOURCE: Recipe = Recipe {
    name: "python-mysql",
    script: "examples/plugins/componentize-py.sh",
    args: &["examples/sources/python-mysql", "app"],
    inputs: &["examples/sources/python-mysql/app.py"],
    flags: &["source"],
};

/// The Python source (examples/sources/python-mysql), or `None` after a
/// loud SKIPPED line when componentize-py cannot be installed.
pub(crate) fn python_source(test: &str) -> Option<PathBuf> {
    built(test, &PY_SOURCE)
}

const JS_ENRICH: Recipe = Recipe {
    name: "js-enrich",
    script: "examples/plugins/componentize-js.sh",
    args: &["examples/plugins/js-enrich/enrich.js"],
    inputs: &[
        "examples/plugins/js-enrich/enrich.js",
        "examples/plugins/js-validate/package.json",
        "examples/plugins/js-validate/package-lock.json",
    ],
    flags: &["--http"],
};

/// The built component of `recipe`, or why it could not be built because
/// its tool could not be installed (every other failure panics).
fn component(recipe: &Recipe) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Mutex<HashMap<&'static str, Result<PathBuf, String>>>> = OnceLock::new();
    // One build at a time (they are heavy), each at most once per process.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry(recipe.name)
        .or_insert_with(|| build(recipe))
        .clone()
}

fn build(recipe: &Recipe) -> Result<PathBuf, String> {
    let root = root();
    let mut hash = Sha256::new();
    for rel in [recipe.script, "wit/sandpipe.wit"]
        .iter()
        .chain(recipe.args)
        .chain(recipe.inputs)
        .chain(recipe.flags)
    {
        hash.update(rel.as_bytes());
        let path = root.join(rel);
        if path.is_file() {
            hash.update(std::fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}")));
        }
    }
    let digest = hex::encode(hash.finalize());
    let out = guest_target_dir()
        .join("polyglot")
        .join("built")
        .join(format!("{}-{}.wasm", recipe.name, &digest[..16]));
    if out.is_file() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let output = Command::new("bash")
        .current_dir(&root)
        .arg(recipe.script)
        .args(recipe.args)
        .arg(&out)
        .args(recipe.flags)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", recipe.script));
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {
            // Older builds of the same component are stale.
            if let Ok(entries) = std::fs::read_dir(out.parent().unwrap_or(&root)) {
                for entry in entries.flatten() {
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if file.starts_with(&format!("{}-", recipe.name)) && entry.path() != out {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
            loud(&format!(
                "polyglot: built {} in {:.1} s ({} bytes)",
                out.display(),
                started.elapsed().as_secs_f64(),
                std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0)
            ));
            Ok(out)
        }
        Some(TOOL_MISSING) => Err(stderr.trim().to_owned()),
        _ => panic!(
            "building {} with {} failed ({}):\n{stderr}",
            recipe.name, recipe.script, output.status
        ),
    }
}

/// Print to the real stderr, past the test harness's output capture.
fn loud(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// The component of `recipe`, or `None` after a loud SKIPPED line when its
/// tool cannot be installed.
fn built(test: &str, recipe: &Recipe) -> Option<PathBuf> {
    match component(recipe) {
        Ok(path) => Some(path),
        Err(why) => {
            loud(&format!(
                "\n*** SKIPPED {test}: the toolchain for {} cannot be installed on this machine:\n*** {}\n",
                recipe.name,
                why.replace('\n', "\n*** ")
            ));
            None
        }
    }
}

/// Whether the Python (componentize-py, in `<guest target>/polyglot/venv`)
/// or JavaScript (componentize-js, in the js-validate example's
/// node_modules) toolchain is installed, installing it by building the
/// example; `false` after a loud SKIPPED line when it cannot be.
pub(crate) fn toolchain(test: &str, python: bool) -> bool {
    built(test, if python { &PYTHON_CSV } else { &JS_VALIDATE }).is_some()
}

/// A deployment running the components of `recipes` (copied under their
/// names), or `None` after a loud SKIPPED line when a tool is missing.
fn deployment(test: &str, recipes: &[&Recipe], extra: &str) -> Option<Deployment> {
    let mut wasm = Vec::new();
    for recipe in recipes {
        wasm.push((recipe.name, built(test, recipe)?));
    }
    let d = Deployment::new(&[], extra);
    for (name, path) in wasm {
        std::fs::copy(&path, d.path("plugins").join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
    }
    Some(d)
}

/// Generous limits: an interpreter in a component needs far more memory
/// and time than a Rust guest (the first run also compiles the component).
const LIMITS: &str = "limits: { memory: 128MiB, timeout: 20s }";

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The status rows of messages `ids`, for assertion messages.
async fn statuses(d: &Deployment, ids: &[&str]) -> String {
    let mut text = String::new();
    for id in ids {
        for row in d.rows(id).await {
            text.push_str(&format!(
                "\n  {id} {} {}: {}",
                row.plugin, row.status, row.info
            ));
        }
    }
    text
}

/// The reason in a dead letter's sidecar.
fn dead_reason(d: &Deployment, file: &str) -> String {
    read_json(&d.path(&format!("spool/dead/{file}.error.json")))["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

const CSV: &str = "name,city,note\n\
    Ada,London,\"first, programmer\"\n\
    Grace,Arlington,\"said \"\"it's easier to ask forgiveness\"\"\"\n\
    \n\
    Zoë,Zürich,\"two\nlines\"\r\n\
    Linus,Helsinki,\n";

#[tokio::test(flavor = "multi_thread")]
async fn python_csv_writes_every_row_through_sql_and_dead_letters_a_malformed_file() {
    let extra = format!(
        "plugins:\n  grants:\n    python-csv:\n      blob: true\n      sql: true\n      \
         # tiny reads: lines and UTF-8 characters are split across chunks\n      \
         config: {{ chunk_bytes: 7, batch_rows: 2 }}\n      {LIMITS}\n"
    );
    let Some(d) = deployment("python_csv", &[&PYTHON_CSV], &extra) else {
        return;
    };
    d.data("csv/people.csv", CSV.as_bytes());
    d.data("csv/ragged.csv", b"a,b\n1,2\n3\n");
    d.data("csv/latin1.csv", b"a,b\n\xe9t\xe9,2\n");
    d.sqapi("1.json", "m-csv", "text/csv", Some("csv/people.csv"));
    d.sqapi("2.json", "m-ragged", "text/csv", Some("csv/ragged.csv"));
    d.sqapi("3.json", "m-latin1", "text/csv", Some("csv/latin1.csv"));
    let summary = d.run_once().await.unwrap();
    assert_eq!(
        (summary.done, summary.dead),
        (1, 2),
        "{summary}{}",
        statuses(&d, &["m-csv", "m-ragged", "m-latin1"]).await
    );

    let row = d.last("m-csv", "python-csv").await;
    assert_eq!(row.status, "done", "{row:?}");
    assert_eq!(row.plugin_version, "0.1.0");
    let db = d.plugin_db("python-csv");
    let rows: Vec<(i64, serde_json::Value)> = db
        .prepare("SELECT row_number, record FROM csv_rows WHERE message_id = 'm-csv' ORDER BY row_number")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                serde_json::from_str(&r.get::<_, String>(1)?).unwrap(),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = [
        (1, "Ada", "London", "first, programmer"),
        (
            2,
            "Grace",
            "Arlington",
            "said \"it's easier to ask forgiveness\"",
        ),
        (3, "Zoë", "Zürich", "two\nlines"),
        (4, "Linus", "Helsinki", ""),
    ];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for ((number, record), (n, name, city, note)) in rows.iter().zip(expected) {
        assert_eq!(*number, n);
        assert_eq!(
            *record,
            serde_json::json!({"name": name, "city": city, "note": note}),
            "row {n}"
        );
    }
    let (columns, count, bytes): (String, i64, i64) = db
        .query_row(
            "SELECT columns, row_count, byte_count FROM csv_files WHERE message_id = 'm-csv'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(columns, r#"["name", "city", "note"]"#);
    assert_eq!((count, bytes), (4, CSV.len() as i64));

    // Nothing of the malformed files was committed, and the reasons say why.
    let others: i64 = db
        .query_row(
            "SELECT count(*) FROM csv_rows WHERE message_id != 'm-csv'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(others, 0);
    let ragged = dead_reason(&d, "2.json");
    assert!(
        ragged.contains("malformed CSV in csv/ragged.csv: line 3: 1 fields, the header has 2"),
        "{ragged}"
    );
    let latin1 = dead_reason(&d, "3.json");
    assert!(latin1.contains("not UTF-8"), "{latin1}");

    // Redelivery is idempotent: the same rows, not twice as many.
    d.sqapi("4.json", "m-csv", "text/csv", Some("csv/people.csv"));
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let count: i64 = db
        .query_row("SELECT count(*) FROM csv_rows", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_csv_streams_a_large_file_in_bounded_chunks() {
    let extra = format!(
        "plugins:\n  grants:\n    python-csv:\n      blob: true\n      sql: true\n      {LIMITS}\n"
    );
    let Some(d) = deployment("python_csv_large", &[&PYTHON_CSV], &extra) else {
        return;
    };
    let mut csv = String::from("id,value,label\n");
    for i in 1..=20_000 {
        csv.push_str(&format!("{i},{},label number {i}\n", i * 7));
    }
    d.data("big.csv", csv.as_bytes());
    d.sqapi("1.json", "m-big", "text/csv", Some("big.csv"));
    let summary = d.run_once().await.unwrap();
    assert_eq!(
        summary.done,
        1,
        "{summary}{}",
        statuses(&d, &["m-big"]).await
    );
    let row = d.last("m-big", "python-csv").await;
    loud(&format!(
        "polyglot: python-csv, {} bytes / 20000 rows: {:?} ms",
        csv.len(),
        row.duration_ms
    ));
    let db = d.plugin_db("python-csv");
    let (count, sum): (i64, i64) = db
        .query_row(
            "SELECT count(*), sum(json_extract(record, '$.value')) FROM csv_rows",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(count, 20_000);
    assert_eq!(sum, (1..=20_000i64).map(|i| i * 7).sum::<i64>());
}

const SCHEMA: &str = r#"{"type": "object", "required": ["id", "kind", "tags"], "additionalProperties": false, "properties": {"id": {"type": "integer", "minimum": 1}, "kind": {"enum": ["order", "refund"]}, "tags": {"type": "array", "items": {"type": "string"}}, "note": {"type": ["string", "null"]}}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn js_validate_emits_valid_documents_and_dead_letters_invalid_ones_with_the_error() {
    let extra = format!(
        "outputs:\n  valid: {{ type: dir, path: out }}\nplugins:\n  grants:\n    js-validate:\n      \
         blob: true\n      emit: [valid]\n      config:\n        output: valid\n        \
         schema: {SCHEMA}\n      {LIMITS}\n"
    );
    let Some(d) = deployment("js_validate", &[&JS_VALIDATE], &extra) else {
        return;
    };
    let valid = r#"{"id": 7, "kind": "order", "tags": ["a", "b"], "note": null}"#;
    d.data("docs/valid.json", valid.as_bytes());
    d.data(
        "docs/invalid.json",
        br#"{"id": 0, "kind": "gift", "tags": ["a", 3], "extra": true}"#,
    );
    d.data("docs/missing.json", br#"{"kind": "refund"}"#);
    d.data("docs/broken.json", b"{\"id\": ");
    for (file, id, loc) in [
        ("1.json", "m-valid", "docs/valid.json"),
        ("2.json", "m-invalid", "docs/invalid.json"),
        ("3.json", "m-missing", "docs/missing.json"),
        ("4.json", "m-broken", "docs/broken.json"),
    ] {
        d.sqapi(file, id, "application/json", Some(loc));
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 3), "{summary}");

    // The valid document is emitted, byte for byte, to the configured output.
    let emitted = d.files("out");
    assert_eq!(emitted, ["m-valid.js-validate.0.json"], "{emitted:?}");
    let doc = read_json(&d.path("out/m-valid.js-validate.0.json"));
    assert_eq!(doc["output"], "valid");
    assert_eq!(doc["payload"], valid);
    assert_eq!(
        doc["headers"],
        serde_json::json!([
            ["content-type", "application/json"],
            ["sandpipe-source", "m-valid"]
        ])
    );

    // Each invalid one is dead-lettered with the validator's messages.
    let invalid = dead_reason(&d, "2.json");
    for expected in [
        "docs/invalid.json: invalid:",
        "$.id: 0 is less than 1",
        r#"$.kind: "gift" is not one of "order", "refund""#,
        "$.tags[1]: expected string, got integer",
        "$.extra: unexpected property",
    ] {
        assert!(invalid.contains(expected), "`{expected}` not in: {invalid}");
    }
    let missing = dead_reason(&d, "3.json");
    assert!(
        missing.contains(r#"$: missing required property "id""#)
            && missing.contains(r#"$: missing required property "tags""#),
        "{missing}"
    );
    let broken = dead_reason(&d, "4.json");
    assert!(
        broken.contains("docs/broken.json: not a JSON document"),
        "{broken}"
    );
    let row = d.last("m-invalid", "js-validate").await;
    assert_eq!(row.status, "dead", "{row:?}");
    assert!(row.info.contains("$.id: 0 is less than 1"), "{}", row.info);
}

#[tokio::test(flavor = "multi_thread")]
async fn js_validate_without_its_config_fails_with_an_invalid_error() {
    let extra = format!(
        "retry: {{ max_attempts: 1, backoff: {{ initial: 10ms }} }}\nplugins:\n  grants:\n    \
         js-validate:\n      blob: true\n      {LIMITS}\n"
    );
    let Some(d) = deployment("js_validate_config", &[&JS_VALIDATE], &extra) else {
        return;
    };
    d.data("doc.json", b"{}");
    d.sqapi("1.json", "m-noconf", "application/json", Some("doc.json"));
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.dead, 1, "{summary}");
    let row = d.last("m-noconf", "js-validate").await;
    assert!(
        row.info.contains("config needs `schema`") && row.info.contains("invalid"),
        "{}",
        row.info
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_guest_reaches_no_file_environment_or_socket_of_the_host() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let extra = format!(
        "plugins:\n  grants:\n    py-wasi:\n      config: {{ port: {port} }}\n      {LIMITS}\n"
    );
    let Some(d) = deployment("py_wasi", &[&PY_WASI], &extra) else {
        return;
    };
    let _ = std::fs::remove_file("/tmp/sandpipe-py-wasi-escape");
    d.sqapi("1.json", "m-wasi", "test/py-wasi", None);
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let row = d.last("m-wasi", "py-wasi").await;
    assert_eq!(row.status, "skipped", "{row:?}");
    let info = row.info;
    loud(&format!("polyglot: py-wasi attempts: {info}"));
    for expected in [
        "file=error(",
        "dir=error(",
        "write=error(",
        "env=0;",
        "args=0;",
        // socket.create_connection: the name lookup is refused.
        "tcp=error(gaierror",
        "tcp-local=error(gaierror",
        // A numeric address reaches wasi:sockets, which refuses it.
        "tcp-raw=error(PermissionError",
        "udp=error(PermissionError",
        "dns=error(gaierror",
    ] {
        assert!(info.contains(expected), "expected `{expected}` in: {info}");
    }
    assert!(!Path::new("/tmp/sandpipe-py-wasi-escape").exists());
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the guest reached a local socket"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn js_enrich_fetches_from_an_allowed_service_and_nowhere_else() {
    enriches("js_enrich", &JS_ENRICH, "js").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_enrich_calls_an_allowed_service_and_nowhere_else() {
    enriches("python_enrich", &PY_ENRICH, "py").await;
}

/// An enrich example (`recipe`) run as three plugins against the test HTTP
/// server: `P-enrich` gets the item and emits it, `P-missing` gets a 404
/// and skips, `P-outside` asks for a host outside its list and is denied.
async fn enriches(test: &str, recipe: &Recipe, p: &str) {
    let (port, hits) = crate::http::server().await;
    let grant = |name: &str, url: &str| {
        format!(
            "    {p}-{name}:\n      emit: [out]\n      http: {{ allow: [\"http://127.0.0.1:{port}\"] }}\n      \
             config: {{ url: \"{url}\", output: out }}\n      {LIMITS}\n"
        )
    };
    let extra = format!(
        "outputs:\n  out: {{ type: dir, path: out }}\nplugins:\n  grants:\n{}{}{}",
        grant("enrich", &format!("http://127.0.0.1:{port}/item?id={{id}}")),
        grant("missing", &format!("http://127.0.0.1:{port}/gone/{{id}}")),
        grant("outside", "http://example.org/items/{id}"),
    );
    let Some(d) = deployment(test, &[recipe], &extra) else {
        return;
    };
    assert_eq!(recipe.name, format!("{p}-enrich"));
    for name in ["missing", "outside"] {
        std::fs::copy(
            d.path(&format!("plugins/{}.wasm", recipe.name)),
            d.path(&format!("plugins/{p}-{name}.wasm")),
        )
        .unwrap();
    }
    d.message(
        "1.json",
        r#"{"uuid_ref": "m-1", "data_type": "application/json"}"#,
    );
    let summary = d.run_once().await.unwrap();
    let rows = statuses(&d, &["m-1"]).await;
    let enriched = d.last("m-1", &format!("{p}-enrich")).await;
    assert_eq!(enriched.status, "done", "{rows}");
    let doc = read_json(&d.path(&format!("out/m-1.{p}-enrich.0.json")));
    let payload: serde_json::Value =
        serde_json::from_str(doc["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"id": "m-1", "found": {"name": "widget", "price": 3}})
    );
    let missing = d.last("m-1", &format!("{p}-missing")).await;
    assert_eq!(missing.status, "skipped", "{rows}");
    assert!(missing.info.ends_with("/gone/m-1: not found"), "{rows}");
    // A request to a host outside the list is refused; the denial is
    // recorded.
    let outside = d.last("m-1", &format!("{p}-outside")).await;
    assert_ne!(outside.status, "done", "{rows}");
    assert!(
        outside.info.contains(&format!(
            "[denied: plugin `{p}-outside` sent a request to http://example.org:80"
        )),
        "{rows}"
    );
    assert_eq!(hits.get("/item"), 1);
    assert_eq!(summary.dead, 1, "{summary}");
}
