//! A long-lived instance: one warm instance of a component serving many
//! calls, the base of the worlds whose guests answer a stream of events or
//! queries (service, queue) or page through a sync (source).
//!
//! Each call has its own limits, armed as it starts — fuel, the deadline,
//! and a fresh [`HostState`] (so host calls, quotas and effects are per
//! call) — and a host-side timeout (`within_deadline`), since the epoch
//! deadline cannot interrupt a guest that waits in a host call. What the
//! guest keeps in its memory carries over from call to call; that is the
//! point. A trap (or the deadline) drops the instance: the next call starts
//! a new one, but not before a backoff (100 ms, doubling to 30 s; a
//! successful call resets it), so a guest that traps at once does not
//! spin. While the instance lives it holds one of `sandbox.max_instances`.
//!
//! The same code runs a plugin grant's `reuse` (`Sandbox::execute_warm`):
//! `Sandbox::warm_up` and `Sandbox::call_warm`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::component::InstancePre;

use super::{
    Code, Failure, FailureKind, GuestCall, InvocationState, LoadedComponent, Sandbox, Usage, Warm,
};
use crate::capability::{HostState, MessageContext, PluginContext};

/// The first wait before a new instance after a failure.
pub const RESTART_INITIAL: Duration = Duration::from_millis(100);
/// The longest wait.
pub const RESTART_MAX: Duration = Duration::from_secs(30);

/// The wait before a new instance after `failures` failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RESTART_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(RESTART_MAX)
}

/// A warm instance of one component serving many calls.
pub struct Session {
    sandbox: Arc<Sandbox>,
    pre: InstancePre<InvocationState>,
    plugin: Arc<PluginContext>,
    live: Option<(Warm, OwnedSemaphorePermit)>,
    failures: u32,
    retry_at: Option<Instant>,
    started: u64,
}

impl Session {
    /// A session of `component` (a component, not a native baseline) with
    /// `plugin`'s grant and limits. The instance starts with the first call.
    pub fn new(
        sandbox: Arc<Sandbox>,
        component: &LoadedComponent,
        plugin: Arc<PluginContext>,
    ) -> anyhow::Result<Self> {
        let Code::Wasm(pre) = &component.code else {
            anyhow::bail!("a session runs a component, not a native plugin");
        };
        Ok(Self {
            sandbox,
            pre: pre.clone(),
            plugin,
            live: None,
            failures: 0,
            retry_at: None,
            started: 0,
        })
    }

    /// Instances started so far (1 after the first call; one more after
    /// each restart).
    pub fn instances_started(&self) -> u64 {
        self.started
    }

    /// Whether an instance is warm now.
    pub fn is_warm(&self) -> bool {
        self.live.is_some()
    }

    /// Drop the warm instance, if any (its store may be mid-call: a call
    /// whose future was dropped); the next call starts a new one, without
    /// a backoff.
    pub fn reset(&mut self) {
        self.live = None;
    }

    /// Run `call` on the warm instance (started first if there is none),
    /// with the plugin's limits armed for this call and a fresh host state
    /// holding `message`; the call's result or failure, its host state
    /// (effects to commit or discard) and what it cost. During the backoff
    /// after a failure, the call fails at once (`restarting`) without
    /// running.
    pub async fn call<T, F>(
        &mut self,
        message: Option<Arc<MessageContext>>,
        call: F,
    ) -> (Result<T, Failure>, HostState, Usage)
    where
        T: Send,
        F: GuestCall<T>,
    {
        let host = HostState::new(self.plugin.clone(), message);
        self.call_with(host, call).await
    }

    /// When the backoff after a failure ends, if the session is in one:
    /// a call before then fails at once.
    pub fn ready_at(&self) -> Option<Instant> {
        self.retry_at
            .filter(|at| self.live.is_none() && *at > Instant::now())
    }

    /// [`Session::call`] with a host state the caller made (a service's
    /// call carries what its `notify` needs).
    pub async fn call_with<T, F>(
        &mut self,
        host: HostState,
        call: F,
    ) -> (Result<T, Failure>, HostState, Usage)
    where
        T: Send,
        F: GuestCall<T>,
    {
        let limits = self.plugin.limits.clone();
        let started = Instant::now();
        if self.live.is_none() {
            if let Some(at) = self.retry_at
                && started < at
            {
                let failure = Failure::new(
                    FailureKind::Restarting,
                    format!(
                        "the instance failed {} time(s) in a row; a new one starts in {:?}",
                        self.failures,
                        at - started
                    ),
                );
                return (Err(failure), host, Usage::default());
            }
            let Ok(permit) = self.sandbox.instances.clone().acquire_owned().await else {
                let failure = Failure::new(FailureKind::Restarting, "the sandbox is shutting down");
                return (Err(failure), host, Usage::default());
            };
            let idle = HostState::new(self.plugin.clone(), None);
            match self.sandbox.warm_up(&self.pre, &limits, idle).await {
                Ok(warm) => {
                    self.started += 1;
                    self.live = Some((warm, permit));
                }
                Err(failure) => {
                    self.failed();
                    let usage = Usage {
                        duration: started.elapsed(),
                        fuel: None,
                    };
                    return (Err(failure), host, usage);
                }
            }
        }
        let Some((warm, _)) = self.live.as_mut() else {
            return (
                Err(Failure::new(FailureKind::Trap, "no instance")),
                host,
                Usage::default(),
            );
        };
        let (result, host, usage) = self
            .sandbox
            .call_warm(warm, &limits, host, started, call)
            .await;
        if result.is_ok() {
            self.failures = 0;
            self.retry_at = None;
            if host.left_open() {
                // A reader or a response kept across calls would carry its
                // limits past them: start the next call afresh (no backoff).
                self.live = None;
            }
        } else {
            // A trap poisons the store: drop it and its slot.
            self.live = None;
            self.failed();
        }
        (result, host, usage)
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + backoff(self.failures));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_100ms_to_30s() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(1600));
        assert_eq!(
            backoff(9),
            Duration::from_secs(25) + Duration::from_millis(600)
        );
        assert_eq!(backoff(10), RESTART_MAX);
        assert_eq!(backoff(u32::MAX), RESTART_MAX);
    }
}
