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

/// Refuse a cache folder another user can write: it holds native code
/// that is loaded without re-verification, so whoever can write there can
/// run code in the engine. Writable by its group or by everyone, or owned
/// by another user than the engine's (root aside), it is refused.
#[cfg(unix)]
fn private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let refuse = |why: String| {
        anyhow::anyhow!(
            "sandbox.cache_dir {} {why}: the cache holds native code the engine loads without \
             re-verification, so only the engine's user may write it (chmod 700, or choose \
             another folder)",
            dir.display()
        )
    };
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read the code cache {}", dir.display()))?;
    if !meta.is_dir() {
        return Err(refuse("is not a folder".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "is writable by other users (mode {mode:03o})"
        )));
    }
    // Our own user id, without FFI: the owner of a file we make there.
    let probe = dir.join(format!(".owner-{}", uuid::Uuid::new_v4()));
    let me = std::fs::write(&probe, b"")
        .and_then(|()| std::fs::metadata(&probe))
        .map(|m| m.uid())
        .with_context(|| format!("cannot write the code cache {}", dir.display()));
    let _ = std::fs::remove_file(&probe);
    let me = me?;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(format!(
            "belongs to another user (uid {}, the engine runs as {me})",
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn private(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// Whether a cached file may be loaded: a regular file (not a symbolic
/// link), owned by the cache folder's owner, writable by nobody else. One
/// that is not is left alone and the component compiled again (the new
/// code replaces it), with a warning.
#[cfg(unix)]
fn trusted_file(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let folder = path.parent().and_then(|d| std::fs::metadata(d).ok());
    let ok = match (std::fs::symlink_metadata(path), folder) {
        (Ok(file), Some(folder)) => {
            file.file_type().is_file() && file.uid() == folder.uid() && file.mode() & 0o022 == 0
        }
        _ => false,
    };
    if !ok {
        tracing::warn!(path = %path.display(), "not loading cached code that is a link, another user's or writable by others");
    }
    ok
}

#[cfg(not(unix))]
fn trusted_file(_: &Path) -> bool {
    true
}

/// Write `bytes` to a new file `path` readable and writable by the
/// engine's user only, whatever the umask.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

impl CodeCache {
    pub(super) fn new(dir: &Path, engine: &Engine) -> anyhow::Result<Self> {
        // Private from the moment it exists, whatever the umask (folders
        // it makes above it too).
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .with_context(|| format!("cannot create the code cache {}", dir.display()))?;
        private(dir)?;
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
        if path.exists() && trusted_file(&path) {
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
        write_private(&tmp, &native)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write the code cache {}", path.display()))?;
        // SAFETY: as above; we just produced these bytes with this engine.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize(engine, &native) }.map_err(anyhow::Error::from)?;
        Ok((component, false))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_cache_folder_others_can_write_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cache = dir.path().join("code");
        std::fs::create_dir(&cache)?;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700))?;
        private(&cache)?;
        for mode in [0o777, 0o775, 0o757] {
            std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode))?;
            let err = private(&cache)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("is writable by other users") && err.contains("sandbox.cache_dir"),
                "{mode:o}: {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn cached_files_that_are_links_or_writable_by_others_are_not_loaded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("a.cwasm");
        std::fs::write(&file, b"code")?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        assert!(trusted_file(&file));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666))?;
        assert!(!trusted_file(&file));
        let link = dir.path().join("b.cwasm");
        std::os::unix::fs::symlink(&file, &link)?;
        assert!(!trusted_file(&link));
        Ok(())
    }
}
