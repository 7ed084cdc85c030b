//! The compiled-code cache: native code for each component, keyed by the
//! component's sha256 and the engine's compatibility hash (wasmtime version
//! and every setting that affects code generation), so a restart never
//! recompiles and an upgrade never loads stale code.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use wasmtime::Engine;
use wasmtime::component::Component;

pub(super) struct CodeCache {
    dir: PathBuf,
    engine_key: String,
}

impl CodeCache {
    pub(super) fn new(dir: &Path, engine: &Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the code cache {}", dir.display()))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The component for `bytes` (whose hash is `sha256`), from the cache
    /// when present; the bool says whether it was.
    pub(super) fn component(
        &self,
        engine: &Engine,
        sha256: &str,
        bytes: &[u8],
    ) -> anyhow::Result<(Component, bool)> {
        let path = self.path(sha256);
        if path.exists() {
            // SAFETY: the file was written by `Engine::precompile_component`
            // below, into a cache folder that only the engine writes (see
            // docs/security.md), under a name that binds it to this
            // component's hash and this engine's configuration.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(engine, &path) };
            match loaded {
                Ok(component) => return Ok((component, true)),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "discarding unusable cached code");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let native = engine
            .precompile_component(bytes)
            .map_err(anyhow::Error::from)?;
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, &native)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write the code cache {}", path.display()))?;
        // SAFETY: as above; we just produced these bytes with this engine.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize(engine, &native) }.map_err(anyhow::Error::from)?;
        Ok((component, false))
    }
}
