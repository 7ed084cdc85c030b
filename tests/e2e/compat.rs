//! WIT versions: components built against the previous versions of
//! `sandpipe:connector` keep working in an engine whose WIT is 1.2, through
//! every interface: fx-v01, built on `wit-history/0.1/`, and fx-probe as
//! built against 0.2.0, 1.0.0 and 1.1.0; one built against a version the engine does not
//! link is refused with a message naming the version it was built against
//! and the ones the engine links.

use crate::harness::Deployment;
use crate::harness::component;

const GRANTS: &str = "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    v01:\n      blob: true\n      meta: true\n      sql: true\n      emit: [out]\n      config: { greeting: hello }\n";

/// The component's bytes, checked to be what the test claims: built
/// against 0.1.0 and nothing newer.
fn v01_bytes() -> Vec<u8> {
    let bytes = std::fs::read(component("fx-v01")).unwrap();
    let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        has("sandpipe:connector/sql@0.1.0"),
        "fx-v01 must import 0.1.0"
    );
    assert!(
        !has("sandpipe:connector/sql@0.2.0"),
        "fx-v01 must not import 0.2.0"
    );
    bytes
}

/// `bytes` with every `from` replaced by `to` (of the same length, so a
/// component stays valid: names in a component are length-prefixed).
fn renamed(mut bytes: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if bytes[i..].starts_with(from) {
            bytes[i..i + to.len()].copy_from_slice(to);
        }
        i += 1;
    }
    bytes
}

/// fx-probe as built against an older `version` (`0.2.0`, `1.0.0`,
/// `1.1.0`). None of 1.0.0, 1.1.0 and 1.2.0 changed an interface fx-probe
/// calls (1.1.0 only added the `source` world, 1.2.0 the `service`
/// world), so a component built against either is today's fx-probe with
/// every `sandpipe:connector` version replaced (which is how fx-probe was
/// built before). One import stays at 1.2.0: the SDK's bindings of every
/// world leave the type import of `service-types` (it holds the `reply`
/// resource) in every component built with it, and 0.2 has no such
/// interface; it is only a type import, which fx-probe never calls.
fn probe_as(version: &str) -> Vec<u8> {
    let bytes = std::fs::read(component("fx-probe")).unwrap();
    let has =
        |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        has(&bytes, "sandpipe:connector/sql@1.2.0"),
        "fx-probe is built against 1.2.0"
    );
    const KEPT: &str = "service-types@1.2.0";
    const HIDDEN: &str = "service-types#1#2#0";
    let old = renamed(bytes, KEPT, HIDDEN);
    let old = renamed(old, "@1.2.0", &format!("@{version}"));
    let old = renamed(old, HIDDEN, KEPT);
    assert!(has(&old, &format!("sandpipe:connector/sql@{version}")));
    assert!(!has(&old, "sql@1.2.0") && !has(&old, "log@1.2.0"));
    old
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_0_2_runs_every_interface_in_a_1_2_engine() {
    runs_every_interface("0.2.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_1_0_runs_every_interface_in_a_1_2_engine() {
    runs_every_interface("1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_1_1_runs_every_interface_in_a_1_2_engine() {
    runs_every_interface("1.1.0").await;
}

/// fx-probe as built against `version`, through log, blob, emit, sql
/// (with execute-batch), query, meta, config and state.
async fn runs_every_interface(version: &str) {
    let grants = "outputs:\n  out: { type: dir, path: out }\nplugins:\n  grants:\n    v02:\n      blob: true\n      meta: true\n      sql: true\n      emit: [out]\n      config: { greeting: hello }\n";
    let d = Deployment::new(&[], grants);
    std::fs::write(d.path("plugins/v02.wasm"), probe_as(version)).unwrap();
    d.data("docs/a.txt", b"0.2 plugins keep working");
    std::fs::create_dir_all(d.path("meta")).unwrap();
    std::fs::write(d.path("meta/a.json"), r#"{"camera": "pinhole"}"#).unwrap();
    let message = |id: &str, action: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({
            "uuid_ref": id, "data_type": "test/probe", "action": action,
            "data_location": "docs/a.txt", "meta_location": "a.json",
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        d.message(&format!("{id}.json"), &body.to_string());
    };
    message("m-log", "log", serde_json::json!({}));
    message("m-blob", "blob", serde_json::json!({}));
    message("m-emit", "emit", serde_json::json!({}));
    message("m-sql", "sql", serde_json::json!({}));
    message(
        "m-batch",
        "sql-batch",
        serde_json::json!({"rows": [["a", 1], ["b", 2]]}),
    );
    message(
        "m-query",
        "sql-query",
        serde_json::json!({"sql": "SELECT 'from-0.2' AS x"}),
    );
    message("m-meta", "echo-meta", serde_json::json!({}));
    message("m-config", "echo-config", serde_json::json!({}));
    message("m-state", "echo-state", serde_json::json!({}));

    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.failed + summary.dead, 0, "{summary}");
    for id in ["m-log", "m-blob", "m-emit", "m-sql", "m-batch"] {
        let row = d.last(id, "v02").await;
        assert_eq!(row.status, "done", "{id}: {row:?}");
    }
    let reason = |row: sandpipe::status::Row| (row.status, row.info);
    assert_eq!(
        reason(d.last("m-config", "v02").await),
        ("skipped".into(), "greeting=hello".into())
    );
    assert_eq!(
        reason(d.last("m-state", "v02").await),
        ("skipped".into(), "counter=1".into())
    );
    let meta = reason(d.last("m-meta", "v02").await);
    assert!(meta.1.contains("pinhole"), "{meta:?}");
    let query = reason(d.last("m-query", "v02").await);
    assert_eq!(query.1, r#"rows: [[Value::Text("from-0.2")]]"#, "{query:?}");
    assert!(
        d.files("out").iter().any(|f| f.starts_with("m-emit.")),
        "{:?}",
        d.files("out")
    );
    let batch: i64 = d
        .plugin_db("v02")
        .query_row("SELECT sum(n) FROM b", [], |r| r.get(0))
        .unwrap();
    assert_eq!(batch, 3, "execute-batch, new in 0.2, reached the engine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_0_1_runs_every_interface_in_a_1_2_engine() {
    let _ = v01_bytes();
    let d = Deployment::new(&[("fx-v01", "v01")], GRANTS);
    let data = b"old plugins keep working".repeat(500);
    d.data("docs/a.txt", &data);
    std::fs::create_dir_all(d.path("meta")).unwrap();
    std::fs::write(d.path("meta/a.json"), r#"{"camera": "pinhole"}"#).unwrap();
    d.message(
        "m.json",
        r#"{"uuid_ref": "m-v01", "data_type": "test/v01", "data_location": "docs/a.txt", "meta_location": "a.json"}"#,
    );

    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.done, 1, "{summary}");
    let row = d.last("m-v01", "v01").await;
    assert_eq!(row.status, "done", "{row:?}");
    assert_eq!(row.plugin_version, "0.1.0");

    let emitted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("out/m-v01.v01.0.json")).unwrap()).unwrap();
    let n = data.len();
    assert_eq!(
        emitted["payload"],
        format!(
            "greeting=hello size=Some({n}) read={n} camera=pinhole changed=1 columns=bytes,ratio,raw row=[Value::Int({n}), Value::Float(0.5), Value::Bytes([111, 108, 100, 32])]"
        )
    );
    assert_eq!(
        emitted["headers"],
        serde_json::json!([["built-against", "0.1.0"]])
    );
    let stored: i64 = d
        .plugin_db("v01")
        .query_row("SELECT bytes FROM seen WHERE id = 'm-v01'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, n as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_an_unsupported_version_is_refused_naming_it() {
    // fx-v01 with every `@0.1.0` renamed `@0.9.0` (same length, so the
    // component stays valid): a plugin built against a future 0.9.
    let bytes = renamed(v01_bytes(), "@0.1.0", "@0.9.0");
    let d = Deployment::new(&[], GRANTS);
    std::fs::write(d.path("plugins/v01.wasm"), &bytes).unwrap();

    for command in [&["check"][..], &["run", "--once"][..]] {
        let out = d.cli(command);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{command:?} accepted it: {said}");
        assert!(said.contains("plugins/v01.wasm"), "{said}");
        assert!(
            said.contains("built against sandpipe:connector@0.9.0"),
            "{said}"
        );
        assert!(
            said.contains("links sandpipe:connector 1.x, 0.2.x, 0.1.x only"),
            "{said}"
        );
    }
}
