//! The opt-in warm-instance mode (a grant's `reuse`): a fresh instance per
//! message by default; with `reuse`, an instance serves several messages
//! (its memory carries over, which fx-probe's `calls` action shows), up to
//! `messages`, and is discarded after a trap.

use crate::harness::Deployment;

const BASE: &str =
    "pipeline: { concurrency: 1, plugin_concurrency: 1 }\nretry: { max_attempts: 1 }\n";

fn calls(d: &Deployment, ids: &[&str]) {
    for id in ids {
        let action = if id.contains("panic") {
            "panic"
        } else {
            "calls"
        };
        d.message(
            &format!("{id}.json"),
            &serde_json::json!({"uuid_ref": id, "data_type": "test/probe", "action": action})
                .to_string(),
        );
    }
}

async fn infos(d: &Deployment, ids: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        out.push(d.last(id, "probe").await.info);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_message_gets_a_fresh_instance_by_default() {
    let d = Deployment::new(&[("fx-probe", "probe")], BASE);
    let ids = ["m1", "m2", "m3"];
    calls(&d, &ids);
    d.run_once().await.unwrap();
    assert_eq!(infos(&d, &ids).await, ["calls=1", "calls=1", "calls=1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_instance_serves_its_quota_of_messages_then_a_new_one_starts() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!(
            "{BASE}plugins:\n  grants:\n    probe: {{ reuse: {{ instances: 1, messages: 2 }} }}\n"
        ),
    );
    let ids = ["m1", "m2", "m3", "m4", "m5"];
    calls(&d, &ids);
    d.run_once().await.unwrap();
    assert_eq!(
        infos(&d, &ids).await,
        ["calls=1", "calls=2", "calls=1", "calls=2", "calls=1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_discards_the_reused_instance() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!("{BASE}plugins:\n  grants:\n    probe: {{ reuse: {{}} }}\n"),
    );
    let ids = ["m1", "m2", "m3-panic", "m4", "m5"];
    calls(&d, &ids);
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (4, 1), "{summary}");
    let panic = d.last("m3-panic", "probe").await;
    assert_eq!(panic.status, "failed");
    assert!(panic.info.contains("fixture panic"), "{}", panic.info);
    assert_eq!(
        infos(&d, &["m1", "m2", "m4", "m5"]).await,
        ["calls=1", "calls=2", "calls=1", "calls=2"]
    );
}
