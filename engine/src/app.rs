//! The commands: assemble an engine from a config file and run, check,
//! list, send, compile.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::capability::{Interface, Services};
use crate::config::Config;
use crate::listener;
use crate::output::Outputs;
use crate::pipeline::{Pipeline, Summary};
use crate::plugins::{self, LoadedPlugin, Problem};
use crate::sandbox::Sandbox;
use crate::status::StatusLog;
use crate::store::data::DataStore;
use crate::store::database::{Database, StateStore};
use crate::store::meta::MetaStore;
use crate::tls::Tls;

/// Everything built from a config file.
pub struct Assembled {
    /// The configuration.
    pub config: Arc<Config>,
    /// The sandbox.
    pub sandbox: Arc<Sandbox>,
    /// Plugins that loaded.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// Plugins (or grants) that did not.
    pub problems: Vec<Problem>,
    /// Shared services.
    pub services: Arc<Services>,
    /// The status log.
    pub status: StatusLog,
    /// The metadata store.
    pub meta: MetaStore,
    /// What the TLS connections trust.
    pub tls: Tls,
}

impl Assembled {
    /// Every source of the config, ready to sync, and why the others are
    /// not.
    pub fn sources(&self) -> (Vec<crate::sync::Source>, Vec<String>) {
        crate::sync::sources(&self.config, &self.plugins, &self.sandbox, &self.tls)
    }

    /// Every service of the config, ready to serve, and why the others
    /// are not.
    pub fn service_connectors(&self) -> (Vec<crate::service::Service>, Vec<String>) {
        crate::service::services(&self.config, &self.plugins, &self.sandbox)
    }

    /// A pipeline over these parts: the `plugin`-world components (a
    /// source is called by sync jobs, never routed a message).
    pub fn pipeline(&self) -> Arc<Pipeline> {
        let plugins = self
            .plugins
            .iter()
            .filter(|p| p.component.world == crate::sandbox::World::Plugin)
            .cloned()
            .collect();
        Arc::new(Pipeline::new(
            self.config.clone(),
            self.sandbox.clone(),
            plugins,
            self.status.clone(),
            self.meta.clone(),
            self.services.clone(),
        ))
    }
}

/// Build the stores, the sandbox and the plugins of `config`.
pub async fn assemble(config: Config) -> anyhow::Result<Assembled> {
    assemble_with(config, Vec::new()).await
}

/// [`assemble`], plus native baseline plugins under the given names, with
/// the grants the config gives those names (benchmarks only; see
/// [`crate::sandbox::NativePlugin`]).
pub async fn assemble_with(
    config: Config,
    natives: Vec<(String, Arc<dyn crate::sandbox::NativePlugin>)>,
) -> anyhow::Result<Assembled> {
    assemble_native(
        config,
        Natives {
            plugins: natives,
            ..Natives::default()
        },
    )
    .await
}

/// Components compiled into the engine, by name, to assemble instead of
/// `.wasm` files (benchmarks only).
#[derive(Default)]
pub struct Natives {
    /// Plugins ([`crate::sandbox::NativePlugin`]).
    pub plugins: Vec<(String, Arc<dyn crate::sandbox::NativePlugin>)>,
    /// Sources ([`crate::sandbox::NativeSource`]).
    pub sources: Vec<(String, Arc<dyn crate::sandbox::NativeSource>)>,
    /// Services ([`crate::sandbox::NativeService`]).
    pub services: Vec<(String, Arc<dyn crate::sandbox::NativeService>)>,
}

/// [`assemble`], plus native baselines under the given names, with the
/// grants the config gives those names (benchmarks only).
pub async fn assemble_native(config: Config, natives: Natives) -> anyhow::Result<Assembled> {
    let Natives {
        plugins: natives,
        sources,
        services: native_services,
    } = natives;
    let config = Arc::new(config);
    let tls = Tls::new(&config)?;
    let database = Database::open(&config, &tls).await?;
    let status = StatusLog::new(database.clone())?;
    let services = Arc::new(Services {
        data: DataStore::new(&config.data_store, &tls)?,
        state: StateStore::new(database.clone())?,
        outputs: Outputs::new(&config.outputs, &tls)?,
        http: Arc::new(crate::capability::http::HttpClient::new(&tls)),
        secrets: crate::secrets::Secrets::load(&config)?,
        tls: tls.clone(),
        tokens: config.token_storage.as_ref().map(|storage| {
            Arc::new(crate::service::token_storage::UserTokens::new(
                &storage.url,
                tls.clone(),
            ))
        }),
    });
    let (max_memory, fuel) = plugins::engine_shape(&config);
    let sandbox = Arc::new(Sandbox::new(&config.sandbox, max_memory, fuel)?);
    if config.sandbox.pooling {
        tracing::info!(memory_reset = %sandbox.memory_reset(), "sandbox ready");
    } else {
        tracing::info!("sandbox ready: instances allocated on demand (no pooling)");
    }
    let native: Vec<&str> = natives
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(sources.iter().map(|(name, _)| name.as_str()))
        .chain(native_services.iter().map(|(name, _)| name.as_str()))
        .collect();
    let (mut plugins, mut problems) =
        plugins::load_all(&config, &sandbox, &services, &database, &native).await;
    for (name, source) in sources {
        match plugins::load_native_source(&config, &sandbox, &services, &database, &name, source)
            .await
        {
            Ok(plugin) => plugins.push(Arc::new(plugin)),
            Err(message) => problems.push(plugins::Problem {
                plugin: name,
                message,
            }),
        }
    }
    for (name, service) in native_services {
        match plugins::load_native_service(&config, &sandbox, &services, &database, &name, service)
            .await
        {
            Ok(plugin) => plugins.push(Arc::new(plugin)),
            Err(message) => problems.push(plugins::Problem {
                plugin: name,
                message,
            }),
        }
    }
    for (name, native) in natives {
        match plugins::load_native(&config, &sandbox, &services, &database, &name, native).await {
            Ok(plugin) => plugins.push(Arc::new(plugin)),
            Err(message) => problems.push(plugins::Problem {
                plugin: name,
                message,
            }),
        }
    }
    Ok(Assembled {
        meta: MetaStore::new(&config.meta_store, &tls).await?,
        tls,
        config,
        sandbox,
        plugins,
        problems,
        services,
        status,
    })
}

/// A watch that turns true on SIGINT or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cannot listen for SIGTERM: {e}");
                        let _ = ctrl_c.await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: finishing messages in flight");
        let _ = tx.send(true);
    });
    rx
}

/// `sandpipe run`: process messages until a signal (or, with `once`,
/// until the listener is drained).
pub async fn run(
    config_file: &Path,
    once: bool,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Summary> {
    let config = Config::load(config_file)?;
    let assembled = assemble(config).await?;
    if !assembled.problems.is_empty() {
        let list: Vec<String> = assembled
            .problems
            .iter()
            .map(|p| format!("  - {p}"))
            .collect();
        anyhow::bail!(
            "{}: refusing to start, {} plugin problem(s):\n{}",
            config_file.display(),
            list.len(),
            list.join("\n")
        );
    }
    for p in &assembled.plugins {
        for i in &p.ungranted {
            tracing::warn!(
                plugin = %p.name,
                "imports `{}` without a grant; its calls will be answered access-denied",
                i.name()
            );
        }
        tracing::info!(
            plugin = %p.name,
            version = %p.description.version,
            mime = %p.mime.join(","),
            cached = p.component.from_cache,
            "loaded"
        );
    }
    let (sources, source_problems) = assembled.sources();
    if !source_problems.is_empty() {
        anyhow::bail!(
            "{}: refusing to start, {} source problem(s):\n  - {}",
            config_file.display(),
            source_problems.len(),
            source_problems.join("\n  - ")
        );
    }
    let sources: crate::server::Sources = Arc::new(
        sources
            .into_iter()
            .map(|s| (s.name().to_owned(), Arc::new(s)))
            .collect(),
    );
    let (services, service_problems) = assembled.service_connectors();
    if !service_problems.is_empty() {
        anyhow::bail!(
            "{}: refusing to start, {} service problem(s):\n  - {}",
            config_file.display(),
            service_problems.len(),
            service_problems.join("\n  - ")
        );
    }
    let services: crate::server::ServiceMap = Arc::new(
        services
            .into_iter()
            .map(|s| (s.name().to_owned(), Arc::new(s)))
            .collect(),
    );
    // Scheduled syncs run beside the pipeline (not with --once, which
    // drains the listener and exits).
    let mut schedules = Vec::new();
    if !once {
        for source in sources.values() {
            schedules.push(tokio::spawn(source.clone().run_schedules(shutdown.clone())));
        }
    }
    let api_jobs = crate::server::Jobs::default();
    let ready = crate::server::Readiness::default();
    ready.not_ready("listener", "starting");
    let connecting = (!services.is_empty()).then(|| {
        tokio::spawn(connect_services(
            services.clone(),
            ready.clone(),
            shutdown.clone(),
        ))
    });
    let registering = register_services(&assembled, &services, &ready, &shutdown)?;
    for service in services.values() {
        let Some(http) = service.config().http.clone() else {
            continue;
        };
        let token =
            match &http.token {
                Some(name) => Some(assembled.services.secrets.get(name).cloned().ok_or_else(
                    || {
                        anyhow::anyhow!(
                            "services.{}.http.token: secret `{name}` was not read",
                            service.name()
                        )
                    },
                )?),
                None => None,
            };
        let bound =
            crate::service::http::serve(service.clone(), http, token, shutdown.clone()).await?;
        tracing::info!(service = %service.name(), %bound, "serving the service's routes");
    }
    let mut transports = Vec::new();
    for service in services.values() {
        if let Some(health) = &service.config().health {
            transports.push(tokio::spawn(crate::service::serve_health(
                service.clone(),
                health.listen,
                shutdown.clone(),
            )));
        }
        if let Some(rabbitmq) = service.config().rabbitmq.clone() {
            transports.push(tokio::spawn(crate::service::broker::run(
                service.clone(),
                rabbitmq,
                assembled.tls.clone(),
                shutdown.clone(),
            )));
        }
        if let Some(redis) = service.config().redis.clone() {
            transports.push(tokio::spawn(crate::service::stream::run(
                service.clone(),
                redis,
                assembled.tls.clone(),
                shutdown.clone(),
            )));
        }
        let Some(vantiq) = service.config().vantiq.clone() else {
            continue;
        };
        let token = assembled
            .services
            .secrets
            .get(&vantiq.token)
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "services.{}.vantiq.token: secret `{}` was not read",
                    service.name(),
                    vantiq.token
                )
            })?;
        transports.extend(crate::service::vantiq::spawn(
            service.clone(),
            vantiq,
            token,
            &assembled.tls,
            shutdown.clone(),
        )?);
    }
    if let Some(server) = &assembled.config.server {
        let token =
            match &server.token {
                Some(name) => Some(assembled.services.secrets.get(name).cloned().ok_or_else(
                    || anyhow::anyhow!("server.token: secret `{name}` was not read"),
                )?),
                None => None,
            };
        let api = crate::server::Api {
            sources,
            services: services.clone(),
            token,
            jobs: api_jobs.clone(),
        };
        crate::server::serve(server.listen, ready.clone(), api, shutdown.clone()).await?;
    }
    let listener: Arc<dyn listener::Listener> = Arc::from(
        listener::build(
            &assembled.config.listener,
            once,
            assembled.config.pipeline.max_message_bytes.as_u64(),
            ready.clone(),
            &assembled.tls,
        )
        .await?,
    );
    // The sandbox's fatal condition stops the run at once, settling
    // nothing more (what is in flight is redelivered, as after a crash).
    let pipeline = assembled.pipeline();
    let stopping = shutdown.clone();
    let result = tokio::select! {
        result = pipeline.run(listener, shutdown) => result,
        fatal = assembled.sandbox.fatal() => Err(anyhow::Error::new(fatal)),
    };
    // A job running now (scheduled, or started over HTTP) was told to stop
    // by the same signal: it stops after the page in hand and records
    // itself canceled. Wait for that (not when the run ended otherwise).
    let started_over_http: Vec<_> = api_jobs
        .lock()
        .map(|mut jobs| jobs.drain(..).collect())
        .unwrap_or_default();
    let stopping = *stopping.borrow();
    for job in schedules {
        wait_or_abort(job, stopping).await;
    }
    for job in started_over_http {
        wait_or_abort(job, stopping).await;
    }
    if let Some(connecting) = connecting {
        connecting.abort();
    }
    if let Some(registering) = registering {
        registering.abort();
    }
    for transport in transports {
        wait_or_abort(transport, stopping).await;
    }
    for service in services.values() {
        service.close(std::time::Duration::from_secs(10)).await;
    }
    result
}

/// Register the services that say so with the token storage, retrying
/// each with a backoff; `/readyz` reports `token storage` not ready until
/// all are (`service::token_storage`). The bodies are made (secrets read,
/// icons loaded) before the task starts: a missing file stops the start.
fn register_services(
    assembled: &Assembled,
    services: &crate::server::ServiceMap,
    ready: &crate::server::Readiness,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(storage) = assembled.config.token_storage.clone() else {
        return Ok(None);
    };
    let mut bodies = Vec::new();
    for service in services.values() {
        if let Some(registration) = &service.config().register {
            let body =
                crate::service::token_storage::body(registration, &assembled.services.secrets)
                    .map_err(|e| anyhow::anyhow!("services.{}.register: {e:#}", service.name()))?;
            bodies.push((
                service.name().to_owned(),
                registration.servicename.clone(),
                body,
            ));
        }
    }
    if bodies.is_empty() {
        return Ok(None);
    }
    let (ready, mut shutdown, tls) = (ready.clone(), shutdown.clone(), assembled.tls.clone());
    ready.not_ready("token storage", "registering");
    Ok(Some(tokio::spawn(async move {
        for (service, servicename, body) in bodies {
            let mut failures = 0;
            loop {
                match crate::service::token_storage::register(&storage.url, &body, &tls).await {
                    Ok(new) => {
                        if new {
                            tracing::info!(%service, %servicename, "registered with the token storage");
                        } else {
                            tracing::warn!(%service, %servicename, "already registered with the token storage: its registration is kept as it was");
                        }
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = crate::sandbox::session::backoff(failures);
                        tracing::warn!(%service, "cannot register with the token storage: {e}; again in {wait:?}");
                        ready.not_ready(
                            "token storage",
                            format!("service `{service}` is not registered: {e}"),
                        );
                        tokio::select! {
                            _ = shutdown.wait_for(|stop| *stop) => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        ready.ready("token storage");
    })))
}

/// Connect every service (one instance each), retrying with a backoff;
/// `/readyz` reports `services` not ready until all are.
async fn connect_services(
    services: crate::server::ServiceMap,
    ready: crate::server::Readiness,
    shutdown: watch::Receiver<bool>,
) {
    ready.not_ready("services", "connecting");
    for service in services.values() {
        let mut failures = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            match service.start().await {
                Ok(()) => {
                    tracing::info!(service = %service.name(), "connected");
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let wait = crate::sandbox::session::backoff(failures);
                    tracing::warn!(service = %service.name(), "{e}; again in {wait:?}");
                    ready.not_ready("services", e);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    ready.ready("services");
}

/// Wait (up to 30 s) for a sync job told to stop by the shutdown signal
/// to record itself canceled; abort it when the run ended otherwise.
async fn wait_or_abort<T>(job: tokio::task::JoinHandle<T>, stopping: bool) {
    if !stopping {
        job.abort();
    } else if tokio::time::timeout(std::time::Duration::from_secs(30), job)
        .await
        .is_err()
    {
        tracing::warn!("a sync job did not stop within 30 s");
    }
}

/// `sandpipe check`: validate the config and every component; print a
/// report; `Ok(false)` if there are problems.
pub async fn check(config_file: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<bool> {
    let config = match Config::load(config_file) {
        Ok(c) => c,
        Err(e) => {
            writeln!(out, "error: {e}")?;
            return Ok(false);
        }
    };
    writeln!(out, "config {}: ok", config_file.display())?;
    for key in &config.env_in_grant_config {
        writeln!(
            out,
            "  warning: {key} comes from an ${{ENV}} reference: a plugin reads its `config`, so a \
             credential there is the plugin's to leak; declare it under `secrets:` and bind it \
             with `http.auth` instead"
        )?;
    }
    let assembled = assemble(config).await?;
    for p in &assembled.plugins {
        match p.component.world {
            crate::sandbox::World::Plugin => writeln!(
                out,
                "plugin `{}` {} (world {}, sha256 {}): ok, handles {}",
                p.name,
                p.description.version,
                p.component.world,
                p.component.sha256,
                p.mime.join(", ")
            )?,
            crate::sandbox::World::Source => writeln!(
                out,
                "component `{}` {} (world {}, sha256 {}): ok, synced by {}",
                p.name,
                p.description.version,
                p.component.world,
                p.component.sha256,
                match sources_of(&assembled.config, &p.name) {
                    names if names.is_empty() => "no source (add it under `sources:`)".to_owned(),
                    names => format!("sources.{}", names.join(", sources.")),
                }
            )?,
            crate::sandbox::World::Service => writeln!(
                out,
                "component `{}` {} (world {}, sha256 {}): ok, {} route(s), served by {}",
                p.name,
                p.description.version,
                p.component.world,
                p.component.sha256,
                p.service.as_ref().map_or(0, |s| s.routes.len()),
                match services_of(&assembled.config, &p.name) {
                    names if names.is_empty() => "no service (add it under `services:`)".to_owned(),
                    names => format!("services.{}", names.join(", services.")),
                }
            )?,
        }
        for i in &p.ungranted {
            writeln!(
                out,
                "  warning: plugin `{}` imports `{}` but has no `{}` grant: calls will be answered access-denied (grant it with {}, or mark the plugin `strict: true` to refuse it)",
                p.name,
                i.name(),
                i.name(),
                i.how_to_grant(&p.name)
            )?;
        }
    }
    for problem in &assembled.problems {
        writeln!(out, "error: {problem}")?;
    }
    let (sources, source_problems) = assembled.sources();
    for source in &sources {
        writeln!(
            out,
            "source `{}`: ok, into {}",
            source.name(),
            source.sink().describe()
        )?;
    }
    for problem in &source_problems {
        writeln!(out, "error: {problem}")?;
    }
    let (services, service_problems) = assembled.service_connectors();
    for service in &services {
        let listen = service
            .config()
            .http
            .as_ref()
            .map(|h| format!(", routes on {}", h.listen))
            .unwrap_or_default();
        writeln!(
            out,
            "service `{}`: ok, {} instance(s){listen}",
            service.name(),
            service.config().instances
        )?;
    }
    for problem in &service_problems {
        writeln!(out, "error: {problem}")?;
    }
    let problems = assembled.problems.len() + source_problems.len() + service_problems.len();
    writeln!(
        out,
        "{} plugin(s) ok, {} source(s) ok, {} service(s) ok, {problems} problem(s)",
        assembled.plugins.len(),
        sources.len(),
        services.len(),
    )?;
    Ok(problems == 0)
}

/// The services of `config` whose component is `component`.
fn services_of(config: &Config, component: &str) -> Vec<String> {
    config
        .services
        .iter()
        .filter(|(name, s)| s.component.as_deref().unwrap_or(name) == component)
        .map(|(name, _)| name.clone())
        .collect()
}

/// The sources of `config` whose component is `component`.
fn sources_of(config: &Config, component: &str) -> Vec<String> {
    config
        .sources
        .iter()
        .filter(|(name, s)| s.component.as_deref().unwrap_or(name) == component)
        .map(|(name, _)| name.clone())
        .collect()
}

/// `sandpipe plugins`: a table of the loaded plugins.
pub async fn plugins(config_file: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let assembled = assemble(Config::load(config_file)?).await?;
    writeln!(
        out,
        "{:<16} {:<9} {:<7} {:<28} {:<34} LIMITS",
        "NAME", "VERSION", "WORLD", "MIME", "IMPORTS (granted / DENIED)"
    )?;
    for p in &assembled.plugins {
        let imports: Vec<String> = p
            .component
            .imports
            .iter()
            .filter_map(|i| Interface::from_import(i))
            .map(|i| {
                if p.ungranted.contains(&i) {
                    i.name().to_ascii_uppercase()
                } else {
                    i.name().to_owned()
                }
            })
            .collect();
        let l = &p.context.limits;
        writeln!(
            out,
            "{:<16} {:<9} {:<7} {:<28} {:<34} memory {}, timeout {:?}, fuel {}",
            p.name,
            p.description.version,
            p.component.world.name(),
            p.mime.join(","),
            imports.join(","),
            l.memory,
            l.timeout,
            l.fuel.map_or("unmetered".into(), |f| f.to_string())
        )?;
    }
    for problem in &assembled.problems {
        writeln!(out, "error: {problem}")?;
    }
    Ok(())
}

/// The assembled parts of `config_file` and its source `name`, refusing
/// with the component's own problem when it did not load.
async fn source(config_file: &Path, name: &str) -> anyhow::Result<crate::sync::Source> {
    let assembled = assemble(Config::load(config_file)?).await?;
    let component = assembled
        .config
        .sources
        .get(name)
        .and_then(|s| s.component.clone())
        .unwrap_or_else(|| name.to_owned());
    if let Some(problem) = assembled.problems.iter().find(|p| p.plugin == component) {
        anyhow::bail!("{}: source `{name}`: {problem}", config_file.display());
    }
    crate::sync::Source::new(
        name,
        &assembled.config,
        &assembled.plugins,
        assembled.sandbox.clone(),
        &assembled.tls,
    )
}

/// `sandpipe sync`: run one job of source `name` to its end, showing its
/// progress on `progress` (a line at most every second: documents, their
/// rate, the counts); its final record.
pub async fn sync(
    config_file: &Path,
    name: &str,
    kind: crate::sync::JobKind,
    cancel: watch::Receiver<bool>,
    progress: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<crate::sync::JobRecord> {
    let source = source(config_file, name).await?;
    let _ = writeln!(
        progress,
        "{name}: {kind} sync into {}",
        source.sink().describe()
    );
    let mut last = std::time::Instant::now();
    let mut show = |job: &crate::sync::JobRecord| {
        if last.elapsed() < std::time::Duration::from_secs(1)
            || job.state != crate::sync::JobState::InProgress
        {
            return;
        }
        last = std::time::Instant::now();
        let seen = job.counts.seen();
        let rate = seen as f64 / job.duration.as_secs_f64().max(0.001);
        let _ = writeln!(
            progress,
            "{name}: {seen} documents ({rate:.0}/s): {}",
            job.counts
        );
    };
    source
        .sync(kind, crate::sync::Trigger::OnDemand, cancel, &mut show)
        .await
}

/// One line for a finished job: what `sandpipe sync` prints.
pub fn job_line(job: &crate::sync::JobRecord) -> String {
    let mut line = format!(
        "job {} of source `{}` ({}): {} in {:.1} s: {}",
        job.id,
        job.source,
        job.kind,
        job.state,
        job.duration.as_secs_f64(),
        job.counts
    );
    if let Some(error) = &job.error {
        line.push_str(&format!("; {error}"));
    }
    line
}

/// `sandpipe sources`: each source with its component, sink, documents
/// and last jobs.
pub async fn sources(config_file: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let assembled = assemble(Config::load(config_file)?).await?;
    let (sources, problems) = assembled.sources();
    for source in &sources {
        writeln!(
            out,
            "source `{}`: into {}",
            source.name(),
            source.sink().describe()
        )?;
        let Ok(sink) = source.prepared().await else {
            writeln!(out, "  (the sink cannot be reached)")?;
            continue;
        };
        writeln!(out, "  documents: {}", sink.len().await?)?;
        for (kind, schedule, at) in source.next_runs().await? {
            writeln!(
                out,
                "  next {kind} sync: {} (schedule `{schedule}`)",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )?;
        }
        match sink.rules(source.name()).await? {
            Some((state, _, Some(errors))) => writeln!(out, "  rules: {state}: {errors}")?,
            Some((state, _, None)) => writeln!(out, "  rules: {state}")?,
            None => {}
        }
        let jobs = sink.jobs(source.name(), 3).await?;
        if jobs.is_empty() {
            writeln!(out, "  no job yet")?;
        }
        for job in jobs {
            writeln!(out, "  {}", job_line(&job))?;
        }
    }
    for problem in problems {
        writeln!(out, "error: {problem}")?;
    }
    Ok(())
}

/// `sandpipe services`: each service with its component, transports,
/// routes and whether its component connects.
pub async fn services(config_file: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let assembled = assemble(Config::load(config_file)?).await?;
    let (services, problems) = assembled.service_connectors();
    for service in services.into_iter().map(Arc::new) {
        let (component, version) = service.component();
        let config = service.config();
        writeln!(
            out,
            "service `{}`: component `{component}` {version}, {} instance(s)",
            service.name(),
            config.instances
        )?;
        let listen = config
            .http
            .as_ref()
            .map(|h| format!(", routes on {}", h.listen))
            .unwrap_or_default();
        let mut more = String::new();
        if let Some(rabbitmq) = &config.rabbitmq {
            more.push_str(&format!(", RabbitMQ queue {}", rabbitmq.queue));
        }
        if let Some(redis) = &config.redis {
            more.push_str(&format!(", Redis stream {}", redis.stream));
        }
        if let Some(vantiq) = &config.vantiq {
            more.push_str(&format!(
                ", Vantiq {} (sources {})",
                vantiq.url,
                vantiq.sources.join(", ")
            ));
        }
        writeln!(
            out,
            "  transports: HTTP /v1/services/{}/query|publish|notifications{listen}{more}",
            service.name()
        )?;
        for route in &service.description().routes {
            writeln!(
                out,
                "  route {} {}  {}",
                route.method, route.path, route.summary
            )?;
        }
        match service.start().await {
            Ok(()) => writeln!(out, "  health: connects")?,
            Err(e) => writeln!(out, "  health: does not connect: {e}")?,
        }
        service.close(std::time::Duration::from_secs(10)).await;
    }
    for problem in problems {
        writeln!(out, "error: {problem}")?;
    }
    Ok(())
}

/// `sandpipe send`: put a message file into the configured listener.
pub async fn send(config_file: &Path, message: &Path) -> anyhow::Result<String> {
    let config = Config::load(config_file)?;
    let body =
        std::fs::read(message).with_context(|| format!("cannot read {}", message.display()))?;
    let name = message
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "message.json".into());
    let tls = Tls::new(&config)?;
    listener::send(&config.listener, &body, &name, &tls).await
}

/// `sandpipe compile`: fill the compiled-code cache for every plugin.
pub fn compile(config_file: &Path, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let config = Config::load(config_file)?;
    let (max_memory, fuel) = plugins::engine_shape(&config);
    let sandbox = Sandbox::new(&config.sandbox, max_memory, fuel)?;
    for (name, path) in plugins::discover(&config.plugins.dir)? {
        let (sha, cached) = sandbox.precompile(&path)?;
        writeln!(
            out,
            "{name}: {} ({sha})",
            if cached { "already cached" } else { "compiled" }
        )?;
    }
    Ok(())
}
