//! Micro-benchmarks of the sandbox: a fresh instance and a trivial call
//! under each allocator and with fuel on and off; the cost of one host call
//! per capability; loading a component cold (compiling) and warm (from the
//! code cache). Run with `just bench`; results go in docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/support/guests.rs"]
mod guests;

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sandpipe::app::{Assembled, assemble};
use sandpipe::capability::{HostState, MessageContext};
use sandpipe::config::Config;
use sandpipe::plugins::LoadedPlugin;
use sandpipe::sandbox::bindings::Message;

/// An engine with fx-probe loaded as `probe`, with everything granted.
fn engine(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    sandbox_yaml: &str,
    fuel: &str,
) -> Assembled {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(guests::component("fx-probe"), plugins.join("probe.wasm")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/4k.bin"), vec![7u8; 4096]).unwrap();
    let yaml = format!(
        "listener: {{ type: dir, path: spool }}\ndata_store: {{ type: disk, root: data }}\n\
         sandbox: {{ cache_dir: cache{sandbox_yaml} }}\n\
         outputs: {{ out: {{ type: dir, path: out }} }}\n\
         plugins:\n  defaults: {{ timeout: 10s{fuel} }}\n  grants:\n    probe: {{ sql: true, emit: [out], blob: true, meta: true, config: {{ greeting: hi }} }}\n"
    );
    let file = dir.join("sandpipe.yaml");
    std::fs::write(&file, yaml).unwrap();
    let config = Config::load(&file).unwrap();
    let assembled = runtime.block_on(assemble(config)).unwrap();
    assert!(assembled.problems.is_empty(), "{:?}", assembled.problems);
    assembled
}

/// One invocation of `plugin` on a message asking for `action`, effects
/// discarded (as a failed invocation's would be).
async fn invoke(assembled: &Assembled, plugin: &Arc<LoadedPlugin>, action: &str) {
    let body = format!(r#"{{"uuid_ref":"b","data_type":"test/probe","action":"{action}"}}"#);
    let context = Arc::new(MessageContext {
        id: "b".into(),
        kind: "test/probe".into(),
        data_location: Some("4k.bin".into()),
        body: body.clone().into(),
        ..Default::default()
    });
    let message = Message {
        id: "b".into(),
        kind: "test/probe".into(),
        data_location: Some("4k.bin".into()),
        meta_location: None,
        headers: Vec::new(),
        body: body.into_bytes(),
        attempt: 1,
    };
    let host = HostState::new(plugin.context.clone(), Some(context));
    let (result, host, _) = assembled
        .sandbox
        .execute(&plugin.component, &plugin.context.limits, host, message)
        .await;
    assert!(matches!(result, Ok(Ok(_))), "{action}: {:?}", result.err());
    if let Some(tx) = host.effects.sql {
        tx.rollback().await;
    }
}

fn instantiate(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("instantiate_and_call");
    for (name, sandbox, fuel) in [
        // The default: 64 KiB zeroed in place, the rest back to the kernel.
        ("pooling", "", ""),
        // Every page back to the kernel.
        ("pooling_nothing_resident", ", keep_resident: 0", ""),
        // 1 MiB zeroed in place.
        ("pooling_1mib_resident", ", keep_resident: 1MiB", ""),
        // Opt-in: 1 MiB kept, dirtied pages reset (PAGEMAP_SCAN, no swap).
        ("pooling_dirty_page_reset", ", dirty_page_reset: true", ""),
        ("on_demand", ", pooling: false", ""),
        ("pooling_fuel", "", ", fuel: 1000000000"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let assembled = engine(&runtime, dir.path(), sandbox, fuel);
        let plugin = assembled.plugins[0].clone();
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(invoke(&assembled, &plugin, "done")))
        });
    }
    group.finish();
}

fn host_calls(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let assembled = engine(&runtime, dir.path(), "", "");
    let plugin = assembled.plugins[0].clone();
    let mut group = c.benchmark_group("invocation_with_host_call");
    // `done` is the baseline; each other action adds its host calls.
    for action in ["done", "log", "config", "meta", "blob", "sql", "emit"] {
        group.bench_function(action, |b| {
            b.iter(|| runtime.block_on(invoke(&assembled, &plugin, action)))
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let path = guests::component("fx-probe");
    let mut group = c.benchmark_group("component_load");
    group.sample_size(10);
    group.bench_function("cold_compile", |b| {
        b.iter(|| {
            let cache = tempfile::tempdir().unwrap();
            let config = sandpipe::config::SandboxConfig {
                cache_dir: cache.path().to_owned(),
                max_instances: 4,
                ..Default::default()
            };
            let sandbox = sandpipe::sandbox::Sandbox::new(&config, 64 << 20, false).unwrap();
            assert!(!sandbox.load(&path).unwrap().from_cache);
        })
    });
    let cache = tempfile::tempdir().unwrap();
    let config = sandpipe::config::SandboxConfig {
        cache_dir: cache.path().to_owned(),
        max_instances: 4,
        ..Default::default()
    };
    let sandbox = sandpipe::sandbox::Sandbox::new(&config, 64 << 20, false).unwrap();
    sandbox.load(&path).unwrap();
    group.bench_function("warm_from_cache", |b| {
        b.iter(|| assert!(sandbox.load(&path).unwrap().from_cache))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = instantiate, host_calls, load
}
criterion_main!(benches);
