//! The plugin registry: finds every component in `plugins.dir`, holds it
//! against its grant (pin, strictness, imports), compiles and links it once,
//! and asks it to `describe` itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::capability::{HostState, Interface, PluginContext, Services};
use crate::config::{Config, Grant};
use crate::sandbox::bindings::{Capability, Description, SourceDescription};
use crate::sandbox::{Code, LoadedComponent, NativePlugin, Sandbox, WarmPool, World};
use crate::store::database::Database;

/// A plugin ready to run.
pub struct LoadedPlugin {
    /// Its name (the file stem).
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// The compiled, linked component.
    pub component: LoadedComponent,
    /// What it says about itself (for a source: its name and version, no
    /// MIME types or capabilities).
    pub description: Description,
    /// A `source` component's own description; `None` for a plugin.
    pub source: Option<SourceDescription>,
    /// A `service` component's own description (its routes); `None`
    /// otherwise.
    pub service: Option<crate::sandbox::bindings::ServiceDescription>,
    /// The MIME types routed to it (the grant's, else its own; none for a
    /// component of another world than `plugin`).
    pub mime: Vec<String>,
    /// Sandpipe interfaces it imports without a grant (calls answer `access-denied`).
    pub ungranted: Vec<Interface>,
    /// Its capabilities' context.
    pub context: Arc<PluginContext>,
}

/// Something wrong with a plugin or its grant.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The plugin (or grant) name.
    pub plugin: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin `{}`: {}", self.plugin, self.message)
    }
}

/// Every `*.wasm` file in `dir`, as (name, path), sorted by name.
pub fn discover(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot list plugins.dir {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm")
            && let Some(stem) = path.file_stem()
        {
            found.push((stem.to_string_lossy().into_owned(), path));
        }
    }
    found.sort();
    Ok(found)
}

/// The capability name of a WIT `capability`.
pub fn capability_name(c: &Capability) -> &'static str {
    match c {
        Capability::Log => "log",
        Capability::Config => "config",
        Capability::Blob => "blob",
        Capability::Meta => "meta",
        Capability::Sql => "sql",
        Capability::Emit => "emit",
    }
}

/// Largest memory limit and whether any plugin asks for fuel: these shape
/// the process-wide engine.
pub fn engine_shape(config: &Config) -> (u64, bool) {
    let mut max_memory = config.plugins.defaults.memory.as_u64();
    let mut fuel = config.plugins.defaults.fuel.is_some();
    for name in config.plugins.grants.keys() {
        let limits = config.limits_for(name);
        max_memory = max_memory.max(limits.memory.as_u64());
        fuel |= limits.fuel.is_some();
    }
    (max_memory, fuel)
}

/// Load every plugin. Problems are collected, not fatal, so `check` can
/// list them all; `run` refuses to start if there are any. A grant needs a
/// component file unless its name is in `native` (the benchmarks' native
/// baselines, loaded by [`load_native`]).
pub async fn load_all(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    native: &[&str],
) -> (Vec<Arc<LoadedPlugin>>, Vec<Problem>) {
    let mut plugins = Vec::new();
    let mut problems = Vec::new();
    let found = match discover(&config.plugins.dir) {
        Ok(found) => found,
        Err(e) => {
            problems.push(Problem {
                plugin: "*".into(),
                message: e.to_string(),
            });
            return (plugins, problems);
        }
    };
    for name in config.plugins.grants.keys() {
        if !found.iter().any(|(n, _)| n == name) && !native.contains(&name.as_str()) {
            problems.push(Problem {
                plugin: name.clone(),
                message: format!(
                    "plugins.grants.{name} names a plugin with no file {}/{name}.wasm",
                    config.plugins.dir.display()
                ),
            });
        }
    }
    for (name, path) in found {
        match load_one(config, sandbox, services, database, &name, &path).await {
            Ok(plugin) => plugins.push(Arc::new(plugin)),
            Err(message) => problems.push(Problem {
                plugin: name,
                message,
            }),
        }
    }
    (plugins, problems)
}

async fn load_one(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    name: &str,
    path: &Path,
) -> Result<LoadedPlugin, String> {
    let component = sandbox.load(path).map_err(|e| format!("{e:#}"))?;
    prepare(config, sandbox, services, database, name, path, component).await
}

/// A native baseline plugin under `name`, with the grant and limits the
/// config gives that name, ready for the pipeline like a loaded component
/// (see [`NativePlugin`]: benchmarks only).
pub async fn load_native(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    name: &str,
    plugin: Arc<dyn NativePlugin>,
) -> Result<LoadedPlugin, String> {
    let component = LoadedComponent {
        code: Code::Native(plugin),
        warm: None,
        sha256: "native".into(),
        imports: Vec::new(),
        world: crate::sandbox::World::Plugin,
        from_cache: false,
    };
    let path = Path::new("(native)");
    prepare(config, sandbox, services, database, name, path, component).await
}

/// A source compiled into the engine under `name`, with the grant and
/// limits the config gives that name (see [`crate::sandbox::NativeSource`]:
/// benchmarks only).
pub async fn load_native_source(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    name: &str,
    source: Arc<dyn crate::sandbox::NativeSource>,
) -> Result<LoadedPlugin, String> {
    let component = LoadedComponent {
        code: Code::NativeSource(source),
        warm: None,
        sha256: "native".into(),
        imports: Vec::new(),
        world: World::Source,
        from_cache: false,
    };
    let path = Path::new("(native)");
    prepare(config, sandbox, services, database, name, path, component).await
}

/// A service compiled into the engine under `name`, with the grant and
/// limits the config gives that name (see
/// [`crate::sandbox::NativeService`]: benchmarks only).
pub async fn load_native_service(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    name: &str,
    service: Arc<dyn crate::sandbox::NativeService>,
) -> Result<LoadedPlugin, String> {
    let component = LoadedComponent {
        code: Code::NativeService(service),
        warm: None,
        sha256: "native".into(),
        imports: Vec::new(),
        world: World::Service,
        from_cache: false,
    };
    let path = Path::new("(native)");
    prepare(config, sandbox, services, database, name, path, component).await
}

/// Check `component` against its grant, open what the grant gives it and
/// ask it to describe itself.
async fn prepare(
    config: &Config,
    sandbox: &Sandbox,
    services: &Arc<Services>,
    database: &Database,
    name: &str,
    path: &Path,
    mut component: LoadedComponent,
) -> Result<LoadedPlugin, String> {
    let grant: Grant = config.plugins.grants.get(name).cloned().unwrap_or_default();
    let limits = config.limits_for(name);
    if let (Some(reuse), Code::Wasm(_)) = (&grant.reuse, &component.code) {
        component.warm = Some(WarmPool::new(reuse));
    }
    if let Some(pin) = &grant.sha256
        && !pin.eq_ignore_ascii_case(&component.sha256)
    {
        return Err(format!(
            "{} has sha256 {} but plugins.grants.{name}.sha256 pins {pin}; refusing it",
            path.display(),
            component.sha256
        ));
    }
    let ungranted: Vec<Interface> = component
        .imports
        .iter()
        .filter_map(|i| Interface::from_import(i))
        .filter(|i| !i.granted(&grant))
        .collect();
    if grant.strict && !ungranted.is_empty() {
        let list: Vec<String> = ungranted
            .iter()
            .map(|i| format!("imports `{}` without a `{}` grant", i.name(), i.name()))
            .collect();
        return Err(format!(
            "is strict and {}; grant it or rebuild the plugin without the import",
            list.join(", ")
        ));
    }
    let db = match &grant.sql {
        Some(sql) if sql.database.is_some() => {
            let name = sql.database.as_deref().unwrap_or_default();
            let external = config
                .databases
                .get(name)
                .ok_or_else(|| format!("sql.database `{name}` is not under `databases`"))?;
            let password = match &external.password {
                Some(secret) => Some(
                    services
                        .secrets
                        .get(secret)
                        .ok_or_else(|| format!("secret `{secret}` was not read"))?
                        .expose()
                        .to_owned(),
                ),
                None => None,
            };
            let db = crate::store::database::external::ExternalDb::new(
                name,
                external,
                password.as_deref(),
                &services.tls,
            )
            .map_err(|e| format!("{e:#}"))?;
            Some(Arc::new(crate::store::database::PluginDb::External(
                Arc::new(db),
                limits.timeout,
            )))
        }
        Some(sql) => {
            let db = database
                .plugin_db(name, &limits)
                .map_err(|e| format!("{e:#}"))?;
            if let Some(init) = &sql.init {
                db.init(init).await.map_err(|e| format!("{e:#}"))?;
            }
            Some(Arc::new(db))
        }
        None => None,
    };
    let context = Arc::new(PluginContext::new(
        name,
        grant.clone(),
        limits.clone(),
        db,
        services.clone(),
    ));
    let host = HostState::new(context.clone(), None);
    let mut service = None;
    let (description, source, mime) = match component.world {
        World::Plugin => {
            let (result, _, _) = sandbox.describe(&component, &limits, host).await;
            let description = result.map_err(|f| format!("`describe` failed: {f}"))?;
            let mime = grant
                .mime
                .clone()
                .unwrap_or_else(|| description.mime_types.clone());
            (description, None, mime)
        }
        World::Source => {
            let (result, _, _) = sandbox.describe_source(&component, &limits, host).await;
            let source = result.map_err(|f| format!("`describe` failed: {f}"))?;
            let description = Description {
                name: source.name.clone(),
                version: source.version.clone(),
                mime_types: Vec::new(),
                capabilities: Vec::new(),
            };
            (description, Some(source), Vec::new())
        }
        World::Service => {
            let (result, _, _) = sandbox.describe_service(&component, &limits, host).await;
            let described = result.map_err(|f| format!("`describe` failed: {f}"))?;
            crate::service::routes::check(&described.routes)
                .map_err(|e| format!("`describe` declares a bad route: {e}"))?;
            let description = Description {
                name: described.name.clone(),
                version: described.version.clone(),
                mime_types: Vec::new(),
                capabilities: Vec::new(),
            };
            service = Some(described);
            (description, None, Vec::new())
        }
    };
    Ok(LoadedPlugin {
        name: name.to_owned(),
        path: path.to_owned(),
        component,
        description,
        source,
        service,
        mime,
        ungranted,
        context,
    })
}
