//! `sandbox::Session`, the long-lived instance the next worlds build on,
//! with a real component (fx-probe): one instance serves many calls and
//! keeps its memory; each call has its own deadline and host state; a
//! trap or a deadline drops the instance, and the next one starts only
//! after a backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sandpipe::capability::MessageContext;
use sandpipe::sandbox::bindings::{Message, Outcome};
use sandpipe::sandbox::{FailureKind, Session, bounded};

use crate::harness::Deployment;

/// One call of `execute` on `session` with an fx-probe message asking for
/// `action` (and `ms`): its outcome, or the failure's kind and text.
async fn call(
    session: &mut Session,
    action: &str,
    ms: u64,
) -> Result<String, (FailureKind, String)> {
    let body =
        serde_json::json!({"uuid_ref": "m", "data_type": "test/probe", "action": action, "ms": ms})
            .to_string();
    let context = Arc::new(MessageContext {
        id: "m".into(),
        kind: "test/probe".into(),
        body: Bytes::from(body.clone()),
        ..MessageContext::default()
    });
    let message = Message {
        id: "m".into(),
        kind: "test/probe".into(),
        data_location: None,
        meta_location: None,
        headers: Vec::new(),
        body: body.into_bytes(),
        attempt: 1,
    };
    let (result, _host, _usage) = session
        .call(Some(context), move |instance, store| {
            Box::pin(async move { bounded::execute(instance, store, &message).await })
        })
        .await;
    match result {
        Ok(Ok(Outcome::Done)) => Ok("done".into()),
        Ok(Ok(Outcome::Skip(why))) => Ok(format!("skip: {why}")),
        Ok(Ok(other)) => Ok(format!("{other:?}")),
        Ok(Err(error)) => Err((FailureKind::PluginError, format!("{error:?}"))),
        Err(failure) => Err((failure.kind, failure.message)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_instance_serves_many_calls_each_under_its_own_limits_and_restarts_after_a_backoff() {
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        "plugins:\n  grants:\n    probe: { limits: { timeout: 1s } }\n",
    );
    let config = sandpipe::config::Config::load(&d.config).unwrap();
    let assembled = sandpipe::app::assemble(config).await.unwrap();
    let plugin = &assembled.plugins[0];
    let mut session = Session::new(
        assembled.sandbox.clone(),
        &plugin.component,
        plugin.context.clone(),
    )
    .unwrap();
    assert!(!session.is_warm());

    // The instance keeps its memory from call to call.
    for n in 1..=3 {
        assert_eq!(
            call(&mut session, "count", 0).await,
            Ok(format!("skip: call {n}"))
        );
    }
    assert_eq!(session.instances_started(), 1);

    // Each call has its own deadline: three calls of 0.6 s under a 1 s
    // deadline all finish.
    for _ in 0..3 {
        assert_eq!(call(&mut session, "spin", 600).await, Ok("done".into()));
    }
    assert_eq!(
        call(&mut session, "count", 0).await,
        Ok("skip: call 4".into())
    );

    // One call past it fails, and the instance is dropped...
    let started = Instant::now();
    let (kind, _) = call(&mut session, "spin", 5000).await.unwrap_err();
    assert_eq!(kind, FailureKind::Deadline);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!session.is_warm());
    // ... the next call, at once, waits out the backoff without running ...
    let (kind, why) = call(&mut session, "count", 0).await.unwrap_err();
    assert_eq!(kind, FailureKind::Restarting, "{why}");
    // ... and after it a new instance starts from scratch.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        call(&mut session, "count", 0).await,
        Ok("skip: call 1".into())
    );
    assert_eq!(session.instances_started(), 2);

    // A panic is a trap like any other.
    let (kind, why) = call(&mut session, "panic", 0).await.unwrap_err();
    assert_eq!(kind, FailureKind::Panic, "{why}");
    assert!(why.contains("fixture panic: m"), "{why}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        call(&mut session, "count", 0).await,
        Ok("skip: call 1".into())
    );
    assert_eq!(session.instances_started(), 3);
}
