//! The wasm sandbox: one wasmtime [`Engine`] per process, components
//! compiled once (and cached on disk), linked once into an
//! [`InstancePre`](wasmtime::component::InstancePre), and a fresh [`Store`]
//! with its own fuel, memory and deadline for every invocation.
//!
//! Architecture invariant: no plugin code runs outside a `Store` built by
//! [`Sandbox::store`], which always has a memory limiter and a deadline.

pub mod bindings;
pub mod bounded;
mod cache;
pub mod compat;
pub mod session;
mod stdio;
mod trap;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::BoxFuture;
use sha2::Digest;
use tokio::sync::Semaphore;
use wasmtime::component::{HasSelf, Instance, InstancePre, Linker, ResourceTable};
use wasmtime::{
    Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::capability::HostState;
use crate::config::{Limits, SandboxConfig};
pub use bindings::{Plugin, PluginPre, Service, ServicePre, Source, SourcePre};
pub use session::Session;
pub use stdio::Capture;
pub use trap::{Failure, FailureKind};

/// How often the epoch advances. Deadlines are checked, and long-running
/// guests yield to other tasks, at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most bytes one `wasi:random` call may ask the host for.
pub const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// How long past its deadline a guest call may still be waiting (in a
/// host call, where the epoch deadline does not reach it) before the host
/// gives up on it: see [`Sandbox::invoke`].
pub const HOST_GRACE: Duration = Duration::from_millis(500);

/// The data of one invocation's [`Store`].
pub struct InvocationState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    /// Resources handed to the guest (WASI streams, blob readers).
    pub table: ResourceTable,
    limiter: MemoryLimiter,
    /// The capabilities' per-invocation state.
    pub host: HostState,
}

impl WasiView for InvocationState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// `wasi:http`: the requests go through the host state's hooks
/// (`capability::http`), which check the `http` grant.
impl WasiHttpView for InvocationState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.host,
        }
    }
}

/// Caps linear memory, and remembers that it did so, so the trap can be
/// classified as a memory-limit failure rather than a generic abort.
struct MemoryLimiter {
    limit: usize,
    hit: Option<usize>,
}

/// The error a memory grow past the limit traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (the plugin asked for {desired} bytes)")]
pub struct MemoryLimitExceeded {
    limit: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = Some(desired);
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.limit,
                desired,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// What runs a component.
pub enum Code {
    /// A component, pre-linked against every host interface, its exports
    /// checked against its [`World`]'s at load.
    Wasm(InstancePre<InvocationState>),
    /// Native Rust code, unsandboxed: see [`NativePlugin`].
    Native(Arc<dyn NativePlugin>),
    /// A source compiled into the engine, unsandboxed: see
    /// [`NativeSource`].
    NativeSource(Arc<dyn NativeSource>),
    /// A service compiled into the engine, unsandboxed: see
    /// [`NativeService`].
    NativeService(Arc<dyn NativeService>),
}

/// A plugin compiled into the engine and run without a sandbox: the native
/// baseline the benchmarks measure the sandbox against (docs/benchmarks.md).
/// It gets the same [`InvocationState`], so every capability goes through
/// the same host code as a component's imports (`capability::*`'s `Host`
/// implementations); only the wasm boundary, the instance and the limits
/// that live in it (memory, fuel) are missing. The deadline still applies.
/// Not a way to deploy plugins: only `app::assemble_with` takes them, and
/// only the benchmarks call it with any.
pub trait NativePlugin: Send + Sync {
    /// As the world's `describe`.
    fn describe(&self) -> bindings::Description;

    /// As the world's `execute`.
    fn execute<'a>(
        &'a self,
        state: &'a mut InvocationState,
        msg: bindings::Message,
    ) -> BoxFuture<'a, Result<bindings::Outcome, bindings::WitError>>;
}

/// A source compiled into the engine and run without a sandbox: the
/// baseline `engine/benches/sync.rs` measures a source component against
/// (the same host code for its `sql`, `http`, ... calls; no wasm boundary,
/// no instance). Only `app::assemble_native` takes one. Its `changed`,
/// `validate-config` and `ping` are Elastic's defaults (true, valid, up).
pub trait NativeSource: Send + Sync {
    /// As the world's `describe`.
    fn describe(&self) -> bindings::SourceDescription;

    /// As the world's `get-docs`.
    fn get_docs<'a>(
        &'a self,
        state: &'a mut InvocationState,
        request: bindings::PageRequest,
    ) -> BoxFuture<'a, Result<bindings::Page, bindings::WitError>>;
}

/// A service compiled into the engine and run without a sandbox: the
/// baseline `engine/benches/service.rs` measures a service component
/// against (the same host code for its calls — the `reply` resource, the
/// capabilities — and the same transports; no wasm boundary, no
/// instance). Only `app::assemble_native` takes one. `on-connect` and
/// `on-close` are no-ops.
pub trait NativeService: Send + Sync {
    /// As the world's `describe`.
    fn describe(&self) -> bindings::ServiceDescription;

    /// As the world's `on-query`: `reply` is in `state`'s table.
    fn on_query<'a>(
        &'a self,
        state: &'a mut InvocationState,
        query: bindings::Query,
        reply: wasmtime::component::Resource<crate::service::reply::Reply>,
    ) -> BoxFuture<'a, Result<(), bindings::WitError>>;

    /// As the world's `on-publish`.
    fn on_publish<'a>(
        &'a self,
        state: &'a mut InvocationState,
        event: bindings::Event,
    ) -> BoxFuture<'a, Result<(), bindings::WitError>>;

    /// As the world's `on-request`.
    fn on_request<'a>(
        &'a self,
        state: &'a mut InvocationState,
        request: bindings::Request,
    ) -> BoxFuture<'a, Result<bindings::Response, bindings::WitError>>;
}

/// Warm instances of one component kept between messages: the grant's
/// opt-in `reuse` (`config::Reuse`, which says what carries over).
pub struct WarmPool {
    idle: std::sync::Mutex<Vec<Warm>>,
    keep: usize,
    messages: u32,
}

/// One warm instance with its store.
struct Warm {
    store: Store<InvocationState>,
    instance: Instance,
    capture: Capture,
    served: u32,
}

impl WarmPool {
    /// A pool keeping at most `reuse.instances` idle instances, each
    /// serving at most `reuse.messages` messages.
    pub fn new(reuse: &crate::config::Reuse) -> Self {
        Self {
            idle: std::sync::Mutex::new(Vec::new()),
            keep: reuse.instances as usize,
            messages: reuse.messages.max(1),
        }
    }

    fn take(&self) -> Option<Warm> {
        self.idle.lock().ok().and_then(|mut idle| idle.pop())
    }

    fn put(&self, warm: Warm) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.keep
        {
            idle.push(warm);
        }
    }
}

/// A plugin's code, ready to run: a component compiled and linked, or a
/// native baseline.
pub struct LoadedComponent {
    /// What runs it.
    pub code: Code,
    /// Warm instances, when the plugin's grant opts into `reuse`.
    pub warm: Option<WarmPool>,
    /// sha256 of the `.wasm` file, hex.
    pub sha256: String,
    /// Every import of the component, as named in the component.
    pub imports: Vec<String>,
    /// The world it was built for, found from its exports.
    pub world: World,
    /// True when the native code came from the on-disk cache.
    pub from_cache: bool,
}

/// The worlds of the `sandpipe:connector` package a component can be
/// built for. The engine finds a component's world from what it exports;
/// nobody declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `plugin` (and `plugin-http`, the same exports): `describe`,
    /// `execute`; run once per message by the pipeline.
    Plugin,
    /// `source`: `describe`, `validate-config`, `ping`, `changed`,
    /// `get-docs`, `validate-advanced-rules`; called by sync jobs.
    Source,
    /// `service`: `describe`, `on-connect`, `on-publish`, `on-query`,
    /// `on-request`, `on-close`; called by the services' transports.
    Service,
}

impl World {
    /// Every world, with the exports that make it (the first whose exports
    /// a component has is its world).
    pub const ALL: [(World, &'static [&'static str]); 3] = [
        (
            World::Service,
            &[
                "describe",
                "on-connect",
                "on-publish",
                "on-query",
                "on-request",
                "on-close",
            ],
        ),
        (
            World::Source,
            &[
                "describe",
                "validate-config",
                "ping",
                "changed",
                "get-docs",
                "validate-advanced-rules",
            ],
        ),
        (World::Plugin, &["describe", "execute"]),
    ];

    /// The world's name in WIT.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plugin => "plugin",
            Self::Source => "source",
            Self::Service => "service",
        }
    }

    /// The world whose exports `exports` are (extra exports are allowed:
    /// a toolchain may add its own), or why there is none.
    pub fn of(exports: &[String]) -> Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(_, needed)| needed.iter().all(|n| exports.iter().any(|e| e == n)))
            .map(|(world, _)| *world)
            .ok_or_else(|| {
                let known: Vec<String> = Self::ALL
                    .iter()
                    .map(|(w, needed)| format!("{} ({})", w.name(), needed.join(", ")))
                    .collect();
                format!(
                    "it exports [{}], which is no world of sandpipe:connector: the worlds are {}",
                    exports.join(", "),
                    known.join("; ")
                )
            })
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A call on an instance in its store: what [`Sandbox::invoke`],
/// `Sandbox::call_warm` and [`Session::call`] run.
pub trait GuestCall<T>:
    for<'a> FnOnce(
        &'a Instance,
        &'a mut Store<InvocationState>,
    ) -> BoxFuture<'a, wasmtime::Result<T>>
    + Send
{
}

impl<T, F> GuestCall<T> for F where
    F: for<'a> FnOnce(
            &'a Instance,
            &'a mut Store<InvocationState>,
        ) -> BoxFuture<'a, wasmtime::Result<T>>
        + Send
{
}

/// What [`Sandbox::execute`] returns: the plugin's own result, or the
/// failure outside it; the host state with the effects to commit or
/// discard; what it cost.
pub type Executed = (
    Result<Result<bindings::Outcome, bindings::WitError>, Failure>,
    HostState,
    Usage,
);

/// What one invocation cost.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Wall-clock time from instantiation to return.
    pub duration: Duration,
    /// Fuel consumed, when fuel is metered.
    pub fuel: Option<u64>,
}

/// How much of a pooling slot's memory `sandbox.keep_resident` keeps when
/// it is left unset and the dirty-page reset is in use.
pub const DEFAULT_KEEP_RESIDENT: u64 = 1 << 20;

/// The same without the dirty-page reset: zeroing 64 KiB of memory (and of
/// the slot's tables) in place costs less than handing it back to the
/// kernel and faulting it in again (docs/benchmarks.md).
pub const DEFAULT_KEEP_RESIDENT_ZEROED: u64 = 64 << 10;

/// How often the epoch ticker looks for swap while only dirtied pages are
/// reset (see [`MemoryReset`]).
const SWAP_CHECK_TICKS: u32 = 100;

/// How a pooling slot's memory is made fresh for the next instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReset {
    /// Bytes of each slot kept resident and reset in place; the rest goes
    /// back to the kernel (`madvise`) and is faulted in again when used.
    pub keep_resident: u64,
    /// Only the pages the instance dirtied are reset (Linux `PAGEMAP_SCAN`);
    /// otherwise the first `keep_resident` bytes are zeroed blindly.
    pub dirty_pages_only: bool,
}

impl MemoryReset {
    /// The reset for `configured` (`sandbox.keep_resident`) when the
    /// operator asked for the dirty-page reset (`asked`), on a kernel that
    /// does (`pagemap`) or does not offer `PAGEMAP_SCAN`, with or without
    /// active `swap`.
    ///
    /// wasmtime 48's scan resets the dirty pages that are *present*: a
    /// dirty page that is swapped out, or being migrated by the kernel at
    /// that instant, is neither reset nor decommitted, and the next
    /// instance in the slot would read it (bytecodealliance/wasmtime#14357).
    /// So the scan is opt-in, and never used with swap active; memory kept
    /// resident otherwise is zeroed whole, which is always safe.
    pub fn plan(configured: Option<u64>, asked: bool, pagemap: bool, swap: bool) -> Self {
        let scan = asked && pagemap && !swap;
        let keep_resident = configured.unwrap_or(if scan {
            DEFAULT_KEEP_RESIDENT
        } else {
            DEFAULT_KEEP_RESIDENT_ZEROED
        });
        Self {
            keep_resident,
            dirty_pages_only: scan && keep_resident > 0,
        }
    }
}

impl std::fmt::Display for MemoryReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.keep_resident, self.dirty_pages_only) {
            (0, _) => write!(f, "slots handed back to the kernel after each instance"),
            (n, true) => write!(
                f,
                "up to {n} bytes per slot kept resident, dirtied pages reset"
            ),
            (n, false) => write!(f, "{n} bytes per slot kept resident, zeroed whole"),
        }
    }
}

/// Whether `/proc/swaps` (its text: a header, then one line per active
/// swap area) lists any swap.
pub fn swap_listed(swaps: &str) -> bool {
    swaps.lines().skip(1).any(|line| !line.trim().is_empty())
}

/// Whether this machine has swap active. Unreadable counts as yes: the
/// answer only ever turns an optimisation off.
fn swap_active() -> bool {
    std::fs::read_to_string("/proc/swaps").map_or(true, |text| swap_listed(&text))
}

/// The process-wide sandbox.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<InvocationState>,
    cache: cache::CodeCache,
    instances: Arc<Semaphore>,
    fuel: bool,
    memory_reset: MemoryReset,
    ticker_stop: Arc<AtomicBool>,
    /// Why the sandbox can no longer run plugins safely, once it cannot:
    /// the application stops (see [`Fatal`]).
    fatal: tokio::sync::watch::Receiver<Option<String>>,
}

/// The sandbox can no longer run plugins safely (swap appeared while
/// pooling slots are reset by dirty pages only). The application stops
/// without settling what is in flight, so it is redelivered to an engine
/// that starts afresh; `sandpipe run` exits with status 75 (EX_TEMPFAIL).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Sandbox {
    /// Build the engine. `max_memory` is the largest memory limit of any
    /// plugin (it sizes the pool's slots); `fuel` turns on fuel metering,
    /// which costs every plugin some speed.
    pub fn new(config: &SandboxConfig, max_memory: u64, fuel: bool) -> anyhow::Result<Self> {
        let instances = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(16))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(16))
            .total_stacks(instances)
            .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
            .table_elements(1_000_000)
            .max_core_instances_per_component(200)
            .max_memories_per_component(4)
            .max_tables_per_component(64);
        let memory_reset = MemoryReset::plan(
            config.keep_resident.map(|b| b.as_u64()),
            config.dirty_page_reset,
            config.pooling && PoolingAllocationConfig::is_pagemap_scan_available(),
            config.dirty_page_reset && swap_active(),
        );
        if config.dirty_page_reset && !memory_reset.dirty_pages_only {
            tracing::warn!(
                "sandbox.dirty_page_reset is on but cannot be used here (it needs the pooling \
                 allocator, Linux 6.7+ PAGEMAP_SCAN, no active swap and keep_resident > 0): \
                 slots are reset whole"
            );
        }
        let resident = usize::try_from(memory_reset.keep_resident).unwrap_or(usize::MAX);
        pool.linear_memory_keep_resident(resident)
            .table_keep_resident(resident.min(1 << 16))
            .async_stack_keep_resident(resident.min(1 << 16))
            .pagemap_scan(if memory_reset.dirty_pages_only {
                Enabled::Yes
            } else {
                Enabled::No
            });

        let mut wasm = wasmtime::Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(fuel)
            .memory_init_cow(true);
        if config.pooling {
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        } else {
            wasm.allocation_strategy(InstanceAllocationStrategy::OnDemand);
        }
        let engine = Engine::new(&wasm).map_err(anyhow::Error::from)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)?;
        // Every capability interface, once, for every world.
        bindings::Capabilities::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        // The `source` world's types (an interface with no functions).
        bindings::source::sandpipe::connector::source_types::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        // The `service` world's own imports: its types (the `reply`
        // resource) and `notify`.
        bindings::service::sandpipe::connector::service_types::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        bindings::service::sandpipe::connector::notify::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        // The previous versions' imports, served by the same code.
        bindings::v0_2::Plugin::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        bindings::v0_1::Plugin::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state: &mut InvocationState| state,
        )
        .map_err(anyhow::Error::from)?;
        // `log.write` and `emit.publish` again, with arguments copied out of
        // the guest only as far as the engine keeps them.
        bounded::link(&mut linker).map_err(anyhow::Error::from)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (fatal_tx, fatal) = tokio::sync::watch::channel(None);
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("sandpipe-epoch".into())
                .spawn(move || {
                    let mut ticks: u32 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                        ticks = ticks.wrapping_add(1);
                        if memory_reset.dirty_pages_only
                            && fatal_tx.borrow().is_none()
                            && ticks.is_multiple_of(SWAP_CHECK_TICKS)
                            && swap_active()
                        {
                            // The dirty-page reset is no longer sound (see
                            // `MemoryReset::plan`) and the engine cannot be
                            // reconfigured: tell the application, which
                            // stops within a second of the swap appearing.
                            // Unsettled deliveries are redelivered; the
                            // restarted engine sees the swap and resets
                            // slots whole.
                            let why = "swap was turned on while pooling slots are reset by \
                                       dirty pages only, which swap makes unsafe: stopping so \
                                       that a restart resets them whole";
                            tracing::error!("{why}");
                            let _ = fatal_tx.send(Some(why.to_owned()));
                        }
                    }
                })
                .context("cannot start the epoch ticker thread")?;
        }

        let cache = cache::CodeCache::new(&config.cache_dir, &engine)?;
        Ok(Self {
            engine,
            linker,
            cache,
            instances: Arc::new(Semaphore::new(instances as usize)),
            fuel,
            memory_reset,
            ticker_stop,
            fatal,
        })
    }

    /// Resolves when the sandbox can no longer run plugins safely, with
    /// why; never otherwise.
    pub async fn fatal(&self) -> Fatal {
        let mut fatal = self.fatal.clone();
        loop {
            if let Some(why) = fatal.borrow_and_update().clone() {
                return Fatal(why);
            }
            if fatal.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether fuel is metered.
    pub fn fuel_metered(&self) -> bool {
        self.fuel
    }

    /// How pooling slots are reset between instances.
    pub fn memory_reset(&self) -> MemoryReset {
        self.memory_reset
    }

    /// Compile (or load from the cache) and link a component file.
    pub fn load(&self, path: &Path) -> anyhow::Result<LoadedComponent> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let (component, from_cache) = self
            .cache
            .component(&self.engine, &sha256, &bytes)
            .with_context(|| format!("cannot compile {}", path.display()))?;
        let imports = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect::<Vec<_>>();
        if let Some(why) = compat::unsupported(&imports) {
            anyhow::bail!("cannot load {}: {why}", path.display());
        }
        let exports = component
            .component_type()
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect::<Vec<_>>();
        let world = World::of(&exports)
            .map_err(|why| anyhow::anyhow!("cannot load {}: {why}", path.display()))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot link {}", path.display()))?;
        // The exports' types, checked against the world's.
        let typed = match world {
            World::Plugin => PluginPre::new(pre.clone()).map(drop),
            World::Source => SourcePre::new(pre.clone()).map(drop),
            World::Service => ServicePre::new(pre.clone()).map(drop),
        };
        typed.map_err(anyhow::Error::from).with_context(|| {
            format!(
                "{} exports the functions of the `sandpipe:connector/{world}` world, with other types",
                path.display()
            )
        })?;
        Ok(LoadedComponent {
            code: Code::Wasm(pre),
            warm: None,
            sha256,
            imports,
            world,
            from_cache,
        })
    }

    /// Compile a component into the cache without linking it.
    pub fn precompile(&self, path: &Path) -> anyhow::Result<(String, bool)> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        let (_, from_cache) = self.cache.component(&self.engine, &sha256, &bytes)?;
        Ok((sha256, from_cache))
    }

    fn state(limits: &Limits, host: HostState, capture: &Capture) -> InvocationState {
        let mut wasi = WasiCtx::builder();
        // Nothing behind WASI: no preopens, no environment, no arguments,
        // no network (every address denied, no name lookup); stdout is
        // discarded and stderr captured (bounded) for panic messages.
        wasi.stderr(capture.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            // wasi:random allocates what the guest asks for on the host
            // (wasmtime's default cap is 64 MiB, past any plugin's need).
            .max_random_size(MAX_RANDOM_BYTES);
        InvocationState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: usize::try_from(limits.memory.as_u64()).unwrap_or(usize::MAX),
                hit: None,
            },
            host,
        }
    }

    fn store(&self, limits: &Limits, host: HostState, capture: &Capture) -> Store<InvocationState> {
        let mut store = Store::new(&self.engine, Self::state(limits, host, capture));
        store.limiter(|s| &mut s.limiter);
        self.arm(&mut store, limits);
        store
    }

    /// Give `store` the invocation's fuel and deadline.
    fn arm(&self, store: &mut Store<InvocationState>, limits: &Limits) {
        if self.fuel {
            // Unmetered plugins still run on a fuel-enabled engine.
            let _ = store.set_fuel(limits.fuel.unwrap_or(u64::MAX));
        }
        let deadline = Instant::now() + limits.timeout;
        store.data_mut().host.deadline = deadline;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Yield to the executor every tick: a busy guest never
                // starves other tasks (broker heartbeats included).
                Ok(UpdateDeadline::Yield(1))
            }
        });
    }

    /// Call `describe` (in a fresh instance, for a component).
    pub async fn describe(
        &self,
        component: &LoadedComponent,
        limits: &Limits,
        host: HostState,
    ) -> (Result<bindings::Description, Failure>, HostState, Usage) {
        match &component.code {
            Code::Wasm(pre) => {
                self.invoke(pre, limits, host, |instance, store| {
                    Box::pin(async move {
                        Plugin::new(&mut *store, instance)?
                            .call_describe(store)
                            .await
                    })
                })
                .await
            }
            Code::Native(native) => (Ok(native.describe()), host, Usage::default()),
            Code::NativeSource(_) | Code::NativeService(_) => (
                Err(Failure::new(
                    FailureKind::Trap,
                    "a source has no plugin `describe`",
                )),
                host,
                Usage::default(),
            ),
        }
    }

    /// Call a `source` component's `describe` in a fresh instance.
    pub async fn describe_source(
        &self,
        component: &LoadedComponent,
        limits: &Limits,
        host: HostState,
    ) -> (
        Result<bindings::SourceDescription, Failure>,
        HostState,
        Usage,
    ) {
        let pre = match &component.code {
            Code::Wasm(pre) => pre,
            Code::NativeSource(native) => return (Ok(native.describe()), host, Usage::default()),
            Code::Native(_) | Code::NativeService(_) => {
                let failure = Failure::new(FailureKind::Trap, "a native plugin is not a source");
                return (Err(failure), host, Usage::default());
            }
        };
        self.invoke(pre, limits, host, |instance, store| {
            Box::pin(async move {
                Source::new(&mut *store, instance)?
                    .call_describe(store)
                    .await
            })
        })
        .await
    }

    /// Call a `service` component's `describe` in a fresh instance.
    pub async fn describe_service(
        &self,
        component: &LoadedComponent,
        limits: &Limits,
        host: HostState,
    ) -> (
        Result<bindings::ServiceDescription, Failure>,
        HostState,
        Usage,
    ) {
        let pre = match &component.code {
            Code::Wasm(pre) => pre,
            Code::NativeService(native) => return (Ok(native.describe()), host, Usage::default()),
            Code::Native(_) | Code::NativeSource(_) => {
                let failure = Failure::new(FailureKind::Trap, "native code is not a service");
                return (Err(failure), host, Usage::default());
            }
        };
        self.invoke(pre, limits, host, |instance, store| {
            Box::pin(async move {
                Service::new(&mut *store, instance)?
                    .call_describe(store)
                    .await
            })
        })
        .await
    }

    /// Call `execute` on `message` (in a fresh instance, for a component):
    /// the plugin's result, or why it failed outside its result (a trap, a
    /// limit), with the host state holding its effects and what it cost.
    pub async fn execute(
        &self,
        component: &LoadedComponent,
        limits: &Limits,
        host: HostState,
        message: bindings::Message,
    ) -> Executed {
        match &component.code {
            Code::Wasm(pre) => match &component.warm {
                Some(pool) => self.execute_warm(pre, pool, limits, host, message).await,
                None => {
                    self.invoke(pre, limits, host, move |instance, store| {
                        Box::pin(async move { bounded::execute(instance, store, &message).await })
                    })
                    .await
                }
            },
            Code::Native(native) => {
                let native = native.clone();
                self.run_native(limits, host, move |state| {
                    Box::pin(async move { native.execute(state, message).await })
                })
                .await
            }
            Code::NativeSource(_) | Code::NativeService(_) => (
                Err(Failure::new(
                    FailureKind::Trap,
                    "a source is not a plugin: it has no `execute`",
                )),
                host,
                Usage::default(),
            ),
        }
    }

    /// Run native code `call` (a [`NativePlugin`]'s or [`NativeSource`]'s)
    /// on an [`InvocationState`] made for `limits` and `host`, within the
    /// deadline and holding an instance slot, as a component would: its
    /// result (or the deadline), the host state and what it cost.
    pub async fn run_native<'a, T, F>(
        &self,
        limits: &Limits,
        host: HostState,
        call: F,
    ) -> (Result<T, Failure>, HostState, Usage)
    where
        F: for<'s> FnOnce(&'s mut InvocationState) -> BoxFuture<'s, T> + 'a,
    {
        let capture = Capture::new(0);
        let permit = self.instances.clone().acquire_owned().await;
        let started = Instant::now();
        let mut state = Self::state(limits, host, &capture);
        state.host.deadline = started + limits.timeout;
        let result = tokio::time::timeout(limits.timeout, call(&mut state))
            .await
            .map_err(|_| {
                Failure::new(
                    FailureKind::Deadline,
                    format!("ran past its deadline ({:?})", limits.timeout),
                )
            });
        drop(permit);
        state.host.gather();
        let usage = Usage {
            duration: started.elapsed(),
            fuel: None,
        };
        (result, state.host, usage)
    }

    /// `execute` on a warm instance from `pool` (or a new one), which goes
    /// back to the pool unless it trapped, served its quota of messages or
    /// left a blob reader open.
    async fn execute_warm(
        &self,
        pre: &InstancePre<InvocationState>,
        pool: &WarmPool,
        limits: &Limits,
        host: HostState,
        message: bindings::Message,
    ) -> Executed {
        let permit = self.instances.clone().acquire_owned().await;
        let started = Instant::now();
        let mut warm = match pool.take() {
            Some(warm) => warm,
            None => match self
                .warm_up(pre, limits, HostState::new(host.plugin.clone(), None))
                .await
            {
                Ok(warm) => warm,
                Err(failure) => {
                    let usage = Usage {
                        duration: started.elapsed(),
                        fuel: None,
                    };
                    return (Err(failure), host, usage);
                }
            },
        };
        let (result, host, usage) = self
            .call_warm(&mut warm, limits, host, started, move |instance, store| {
                Box::pin(async move { bounded::execute(instance, store, &message).await })
            })
            .await;
        // A trap poisons the store: then the instance is dropped.
        if result.is_ok() {
            warm.served += 1;
            if warm.served < pool.messages && !host.left_open() {
                pool.put(warm);
            }
        }
        drop(permit);
        (result, host, usage)
    }

    /// A new instance of `pre` kept warm for calls to come, instantiated
    /// with `limits` armed and `idle` (a host state without a message) in
    /// its store; or why it could not start.
    async fn warm_up(
        &self,
        pre: &InstancePre<InvocationState>,
        limits: &Limits,
        idle: HostState,
    ) -> Result<Warm, Failure> {
        let capture = Capture::new(limits.stderr_bytes.as_u64() as usize);
        let mut store = self.store(limits, idle, &capture);
        match within_deadline(limits, pre.instantiate_async(&mut store)).await {
            Ok(instance) => Ok(Warm {
                store,
                instance,
                capture,
                served: 0,
            }),
            Err(err) => {
                let state = store.into_data();
                Err(trap::classify(
                    &err,
                    limits,
                    state.limiter.hit,
                    &state.host.denials,
                    &capture.text(),
                ))
            }
        }
    }

    /// One call on the warm instance `warm`: its limits armed for this
    /// call alone (fuel, deadline, and — with `host`, a fresh host state —
    /// host calls and quotas), `call` run within the host-side deadline,
    /// and the host state taken back. An `Err` is a trap (or the deadline):
    /// the instance must not serve again.
    async fn call_warm<T, F>(
        &self,
        warm: &mut Warm,
        limits: &Limits,
        host: HostState,
        started: Instant,
        call: F,
    ) -> (Result<T, Failure>, HostState, Usage)
    where
        T: Send,
        F: GuestCall<T>,
    {
        let plugin = host.plugin.clone();
        warm.capture.clear();
        let state = warm.store.data_mut();
        state.host = host;
        state.limiter.hit = None;
        self.arm(&mut warm.store, limits);
        let fuel_before = warm.store.get_fuel().ok();
        let result = within_deadline(limits, call(&warm.instance, &mut warm.store)).await;
        let usage = self.usage(started, fuel_before, &warm.store);
        let idle = HostState::new(plugin, None);
        let mut host = std::mem::replace(&mut warm.store.data_mut().host, idle);
        host.gather();
        let result = result.map_err(|err| {
            trap::classify(
                &err,
                limits,
                warm.store.data().limiter.hit,
                &host.denials,
                &warm.capture.text(),
            )
        });
        (result, host, usage)
    }

    /// The time since `started` and, when metered, the fuel burnt since
    /// `fuel_before`.
    fn usage(
        &self,
        started: Instant,
        fuel_before: Option<u64>,
        store: &Store<InvocationState>,
    ) -> Usage {
        let fuel = match (self.fuel, fuel_before, store.get_fuel().ok()) {
            (true, Some(before), Some(after)) => Some(before.saturating_sub(after)),
            _ => None,
        };
        Usage {
            duration: started.elapsed(),
            fuel,
        }
    }

    /// Instantiate `pre` in a fresh store with `limits` and `host`, run
    /// `call` on it, and return its result (or the classified failure), the
    /// host state (with the effects to commit or discard) and what it cost.
    /// The instance and its store are dropped before returning.
    async fn invoke<T, F>(
        &self,
        pre: &InstancePre<InvocationState>,
        limits: &Limits,
        host: HostState,
        call: F,
    ) -> (Result<T, Failure>, HostState, Usage)
    where
        T: Send,
        F: GuestCall<T>,
    {
        let capture = Capture::new(limits.stderr_bytes.as_u64() as usize);
        let permit = self.instances.clone().acquire_owned().await;
        let started = Instant::now();
        let mut store = self.store(limits, host, &capture);
        let fuel_before = store.get_fuel().ok();
        // Instantiation (a start function) and the call, both within the
        // host-side deadline.
        let result = within_deadline(limits, async {
            let instance = pre.instantiate_async(&mut store).await?;
            call(&instance, &mut store).await
        })
        .await;
        let usage = self.usage(started, fuel_before, &store);
        let mut state = store.into_data();
        state.host.gather();
        drop(permit);
        let result = result.map_err(|err| {
            trap::classify(
                &err,
                limits,
                state.limiter.hit,
                &state.host.denials,
                &capture.text(),
            )
        });
        (result, state.host, usage)
    }
}

/// `call`, given up [`HOST_GRACE`] after the invocation's deadline: the
/// epoch deadline interrupts a guest that runs, not one waiting in a host
/// call, so this bounds a call whatever it waits for. Given up, it fails
/// as a deadline (and its store, left mid-call, is dropped).
async fn within_deadline<T>(
    limits: &Limits,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    match tokio::time::timeout(limits.timeout + HOST_GRACE, call).await {
        Ok(result) => result,
        Err(_) => Err(wasmtime::Error::new(wasmtime::Trap::Interrupt)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_components_world_is_found_from_its_exports() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            World::of(&names(&["describe", "execute"])),
            Ok(World::Plugin)
        );
        assert_eq!(
            World::of(&names(&["execute", "describe", "cabi_extra"])),
            Ok(World::Plugin)
        );
        let why = World::of(&names(&["wasi:cli/run@0.2.0"])).unwrap_err();
        assert!(
            why.contains("exports [wasi:cli/run@0.2.0]")
                && why.contains("plugin (describe, execute)"),
            "{why}"
        );
    }

    #[test]
    fn dirty_page_reset_only_when_asked_and_without_swap() {
        let mib = DEFAULT_KEEP_RESIDENT;
        let plan = MemoryReset::plan;
        let whole = |keep_resident| MemoryReset {
            keep_resident,
            dirty_pages_only: false,
        };
        let zeroed = DEFAULT_KEEP_RESIDENT_ZEROED;
        // Not asked (the default): 64 KiB, or what is configured, zeroed
        // whole, whatever the kernel offers.
        for (pagemap, swap) in [(true, false), (true, true), (false, false)] {
            assert_eq!(plan(None, false, pagemap, swap), whole(zeroed));
            assert_eq!(plan(Some(0), false, pagemap, swap), whole(0));
            assert_eq!(plan(Some(4 * mib), false, pagemap, swap), whole(4 * mib));
        }
        // Asked: 1 MiB and the scan where it is available and no swap is
        // active; otherwise what is configured, zeroed whole.
        assert_eq!(
            plan(None, true, true, false),
            MemoryReset {
                keep_resident: mib,
                dirty_pages_only: true
            }
        );
        assert!(plan(Some(4 * mib), true, true, false).dirty_pages_only);
        assert_eq!(plan(None, true, true, true), whole(zeroed));
        assert_eq!(plan(None, true, false, false), whole(zeroed));
        assert_eq!(plan(Some(4 * mib), true, true, true), whole(4 * mib));
        assert_eq!(plan(Some(0), true, true, false), whole(0));
    }

    #[test]
    fn swap_is_read_from_proc_swaps() {
        let header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert!(!swap_listed(header));
        assert!(!swap_listed(""));
        assert!(swap_listed(&format!(
            "{header}/swapfile                               file\t\t1048572\t\t0\t\t-2\n"
        )));
        assert!(swap_listed(&format!(
            "{header}/dev/zram0                              partition\t4194300\t\t0\t\t100\n"
        )));
    }

    #[tokio::test]
    async fn a_call_waiting_past_its_deadline_is_given_up_as_a_deadline() {
        let limits = Limits {
            timeout: Duration::from_millis(50),
            ..Limits::default()
        };
        let started = Instant::now();
        // A call that never returns: a guest waiting in a host call that
        // never answers, which no epoch can interrupt.
        let result = within_deadline(&limits, std::future::pending::<wasmtime::Result<()>>()).await;
        let elapsed = started.elapsed();
        assert!(matches!(
            result
                .as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<wasmtime::Trap>()),
            Some(wasmtime::Trap::Interrupt)
        ));
        assert!(elapsed >= limits.timeout + HOST_GRACE, "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // A call that returns in time is its own result.
        let quick = within_deadline(&limits, async { Ok::<_, wasmtime::Error>(7) }).await;
        assert!(matches!(quick, Ok(7)));
    }

    #[test]
    fn limiter_refuses_growth_past_the_limit_and_remembers_it() {
        let mut l = MemoryLimiter {
            limit: 1 << 20,
            hit: None,
        };
        assert!(matches!(l.memory_growing(0, 1 << 19, None), Ok(true)));
        assert!(l.hit.is_none());
        assert!(l.memory_growing(1 << 19, 2 << 20, None).is_err());
        assert_eq!(l.hit, Some(2 << 20));
    }
}
