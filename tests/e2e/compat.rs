//! WIT versions: a component built against the previous minor version of
//! `sandpipe:connector` (fx-v01, built on `wit-history/0.1/`) keeps working
//! in an engine whose WIT grew to 0.2, through every interface; one built
//! against a version the engine does not link is refused with a message
//! naming the version it was built against and the ones the engine links.

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

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_against_0_1_runs_every_interface_in_a_0_2_engine() {
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
    let mut bytes = v01_bytes();
    let (from, to) = (b"@0.1.0", b"@0.9.0");
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if bytes[i..].starts_with(from) {
            bytes[i..i + to.len()].copy_from_slice(to);
        }
        i += 1;
    }
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
            said.contains("links sandpipe:connector 0.2.x and 0.1.x only"),
            "{said}"
        );
    }
}
