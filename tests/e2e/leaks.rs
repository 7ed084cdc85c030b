//! Leaks between instances: a plugin leaves a secret in its linear memory;
//! the next instance in the same pooling slot — of the same component, and
//! of another one — scans all of its own memory and must not find it (a
//! regression test for the pooling allocator's data-leak advisories).
//!
//! With `sandbox.max_instances: 1` the pool has two memory slots and one
//! message runs at a time. An instance of the same component always gets
//! the slot its last instance used (wasmtime's module affinity). For
//! another component, three components take turns — the writer, a filler
//! that traps, the scanner — so the scanner always gets the slot the writer
//! just left: with no slot affine to it, it takes the least recently freed.

use crate::harness::{Deployment, shared_cache};

/// A fresh secret, and its bytes XOR 0xA5 in hex (what the scanner gets).
pub fn secret() -> (String, String) {
    let secret = format!("sandpipe-secret-{}", uuid::Uuid::new_v4().simple());
    let masked = secret
        .bytes()
        .map(|b| format!("{:02x}", b ^ 0xA5))
        .collect();
    (secret, masked)
}

/// One instance slot at a time, with the default reset: the first 64 KiB
/// zeroed in place, every other page handed back to the kernel.
fn one_at_a_time(extra: &str) -> String {
    sandbox_one_at_a_time("", extra)
}

/// One instance slot at a time, keeping `resident` of each memory resident
/// (reset in place) between instances.
fn resident_one_at_a_time(resident: &str, extra: &str) -> String {
    sandbox_one_at_a_time(&format!(", keep_resident: {resident}"), extra)
}

fn sandbox_one_at_a_time(sandbox: &str, extra: &str) -> String {
    format!(
        "sandbox: {{ cache_dir: \"{}\", max_instances: 1, pooling: true{sandbox} }}\npipeline: {{ concurrency: 1 }}\nretry: {{ max_attempts: 1, backoff: {{ initial: 10ms }} }}\n{extra}",
        shared_cache().display()
    )
}

fn hostile(d: &Deployment, id: &str, fields: serde_json::Value) {
    crate::hostile::hostile(d, id, fields);
}

/// The byte count of a scan's `clean: scanned N bytes`, or a panic with
/// what it found.
fn clean(id: &str, info: &str) -> usize {
    info.strip_prefix("clean: scanned ")
        .and_then(|rest| rest.strip_suffix(" bytes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{id}: the scan saw another instance's secret: {info}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_instance_of_the_same_component_cannot_read_a_secret_left_in_memory() {
    same_component_rounds(&one_at_a_time("")).await;
}

/// The same with the opt-in `sandbox.dirty_page_reset`: on a Linux 6.7+
/// machine without swap (these machines) 1 MiB of each slot stays
/// resident and only the pages an instance dirtied are reset.
#[tokio::test(flavor = "multi_thread")]
async fn memory_reset_by_dirty_pages_is_fresh_too() {
    same_component_rounds(&sandbox_one_at_a_time(", dirty_page_reset: true", "")).await;
}

/// The same with `sandbox.keep_resident: 4MiB`: the first 4 MiB of the
/// 8 MiB the writer fills are zeroed in place rather than handed back to
/// the kernel.
#[tokio::test(flavor = "multi_thread")]
async fn memory_kept_resident_between_instances_is_wiped_too() {
    same_component_rounds(&resident_one_at_a_time("4MiB", "")).await;
}

/// Writers leave a secret in 8 MiB of memory (every other one traps after
/// writing); the scanner after each, in the same pooling slot, must not
/// find it anywhere in its own memory.
async fn same_component_rounds(config: &str) {
    let d = Deployment::new(&[("fx-hostile", "leaky")], config);
    let (secret, masked) = secret();
    // The scanner finds a secret that is there.
    hostile(
        &d,
        "r0-selftest",
        serde_json::json!({"action": "leak-selftest", "secret": secret, "masked": masked}),
    );
    const ROUNDS: usize = 4;
    for r in 1..=ROUNDS {
        // Every other writer traps after writing: a trapped instance's slot
        // is reused too.
        let write = serde_json::json!({"action": "leak-write", "secret": secret, "mib": 8, "trap": r % 2 == 0});
        hostile(&d, &format!("r{r}-a-write"), write);
        let scan = serde_json::json!({"action": "leak-scan", "masked": masked, "grow_mib": 16});
        hostile(&d, &format!("r{r}-b-scan"), scan);
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.processed, 1 + 2 * ROUNDS as u64, "{summary}");

    let selftest = d.last("r0-selftest", "leaky").await.info;
    assert!(
        selftest.starts_with("found "),
        "the scanner cannot see a secret: {selftest}"
    );
    let mut written = 0;
    for r in 1..=ROUNDS {
        let write = d.last(&format!("r{r}-a-write"), "leaky").await;
        if r % 2 == 0 {
            assert_eq!(write.status, "failed", "{write:?}");
            assert!(write.info.contains("unreachable"), "{}", write.info);
        } else {
            let memory: usize = write
                .info
                .rsplit(" in ")
                .next()
                .and_then(|m| m.strip_suffix(" bytes of memory"))
                .and_then(|m| m.parse().ok())
                .unwrap_or_else(|| panic!("{}", write.info));
            written = written.max(memory);
        }
        let id = format!("r{r}-b-scan");
        let scanned = clean(&id, &d.last(&id, "leaky").await.info);
        assert!(
            scanned > written,
            "{id} scanned {scanned} bytes, less than the writer's {written}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_of_another_component_cannot_read_a_secret_left_in_memory() {
    let d = Deployment::new(
        &[
            ("fx-probe", "reader"),
            ("fx-panic", "crasher"),
            ("fx-hostile", "scanner"),
        ],
        &one_at_a_time("plugins:\n  grants:\n    reader: { blob: true }\n"),
    );
    let (secret, masked) = secret();
    // The reader streams a data object full of the secret through its
    // memory (fx-probe's `blob` action).
    d.data(
        "secret.txt",
        secret.repeat((4 << 20) / secret.len()).as_bytes(),
    );
    hostile(
        &d,
        "r0-selftest",
        serde_json::json!({"action": "leak-selftest", "secret": secret, "masked": masked}),
    );
    const ROUNDS: usize = 4;
    for r in 1..=ROUNDS {
        d.message(
            &format!("r{r}-a-read.json"),
            &serde_json::json!({"uuid_ref": format!("r{r}-a-read"), "data_type": "test/probe", "action": "blob", "data_location": "secret.txt"}).to_string(),
        );
        d.sqapi(
            &format!("r{r}-b-crash.json"),
            &format!("r{r}-b-crash"),
            "test/panic",
            None,
        );
        let scan = serde_json::json!({"action": "leak-scan", "masked": masked, "grow_mib": 16});
        hostile(&d, &format!("r{r}-c-scan"), scan);
    }
    let summary = d.run_once().await.unwrap();
    assert_eq!(summary.processed, 1 + 3 * ROUNDS as u64, "{summary}");

    let selftest = d.last("r0-selftest", "scanner").await.info;
    assert!(
        selftest.starts_with("found "),
        "the scanner cannot see a secret: {selftest}"
    );
    for r in 1..=ROUNDS {
        let read = d.last(&format!("r{r}-a-read"), "reader").await;
        assert_eq!(read.status, "done", "{read:?}");
        let crash = d.last(&format!("r{r}-b-crash"), "crasher").await;
        assert!(crash.info.starts_with("panic"), "{}", crash.info);
        let id = format!("r{r}-c-scan");
        let scanned = clean(&id, &d.last(&id, "scanner").await.info);
        assert!(scanned > 16 << 20, "{id} scanned only {scanned} bytes");
    }
}
