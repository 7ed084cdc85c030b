//! The data store: where messages' data objects live (object_store).
//!
//! Locations are relative paths. A location that is absolute, contains `..`
//! or `.` segments, empty segments, backslashes, control characters or a URL
//! scheme is refused before it reaches the store, so a plugin or a message
//! can never name an object outside the configured root.
//!
//! On a `disk` store the object's real path (every symbolic link followed)
//! must also lie inside the root: object_store's `LocalFileSystem` follows
//! links wherever they lead, so a link inside the root that points out of
//! it is refused here, before each read, existence check and write.
//!
//! sqAPI compatibility: a message's `data_location` may be an absolute path
//! when the store is `disk` and the path lies inside its root (the root as
//! configured or with its links resolved); it is turned into the
//! root-relative location ([`DataStore::message_location`]), which is what
//! plugins see.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::config::DataStoreConfig;
use crate::tls::Tls;

/// Why a data store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    /// No object at that location.
    #[error("no object at `{0}`")]
    NotFound(String),
    /// The location is malformed or escapes the root.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; retrying later may work.
    #[error("data store unavailable: {0}")]
    Unavailable(String),
}

/// An object opened for reading.
pub struct ObjectStream {
    /// Its bytes, in chunks.
    pub stream: BoxStream<'static, Result<Bytes, DataError>>,
    /// Its size, when known.
    pub size: Option<u64>,
}

/// The configured data store.
#[derive(Clone)]
pub struct DataStore {
    store: Arc<dyn ObjectStore>,
    /// A `disk` store's root.
    disk: Option<Arc<DiskRoot>>,
}

/// A `disk` store's root, in the two forms an absolute location may use.
#[derive(Debug)]
struct DiskRoot {
    /// As configured, made absolute (symbolic links not resolved); `None`
    /// when that is `canonical` or has a `..` component (no location could
    /// match it).
    written: Option<PathBuf>,
    /// With every symbolic link resolved: objects must really lie below it.
    canonical: PathBuf,
    /// The store itself, for its mapping of locations to file paths.
    files: Arc<LocalFileSystem>,
}

impl DiskRoot {
    fn new(root: &Path) -> anyhow::Result<Self> {
        let canonical = std::fs::canonicalize(root)
            .map_err(|e| anyhow::anyhow!("data_store.root {}: {e}", root.display()))?;
        let written = std::path::absolute(root)
            .ok()
            .filter(|p| !p.components().any(|c| c == Component::ParentDir))
            .filter(|p| *p != canonical);
        let files = Arc::new(LocalFileSystem::new_with_prefix(&canonical)?);
        Ok(Self {
            written,
            canonical,
            files,
        })
    }

    /// The root for messages: `/data`, or `/data` (`/mnt/disk1/data`) when
    /// the configured root goes through a symbolic link.
    fn describe(&self) -> String {
        match &self.written {
            Some(written) => format!("`{}` (`{}`)", written.display(), self.canonical.display()),
            None => format!("`{}`", self.canonical.display()),
        }
    }

    /// Refuse `path` (already checked lexically) if its real path leaves the
    /// root through a symbolic link.
    async fn confine(&self, location: &str, path: &ObjectPath) -> Result<(), DataError> {
        match escape(&self.canonical, Path::new(path.as_ref())).await {
            None => Ok(()),
            Some(how) => Err(self.outside(location, how)),
        }
    }

    fn outside(&self, location: &str, how: &str) -> DataError {
        DataError::Invalid(format!(
            "invalid location `{location}`: {how}, outside the data store's root {}",
            self.describe()
        ))
    }

    /// Confine `path` and open its file, in one blocking task (a hop to the
    /// blocking pool costs more than the check and the open together);
    /// then `then` on the open file and its size, in the same task.
    async fn with_file<T: Send + 'static>(
        self: &Arc<Self>,
        location: &str,
        path: &ObjectPath,
        then: impl FnOnce(std::fs::File, u64) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DataError> {
        let file = self
            .files
            .path_to_filesystem(path)
            .map_err(|e| store_error(location, e))?;
        let (disk, location, relative) = (
            self.clone(),
            location.to_owned(),
            PathBuf::from(path.as_ref()),
        );
        tokio::task::spawn_blocking(move || {
            let opened = match open_confined(&disk.canonical, &relative, &file) {
                Ok(f) => Ok(f),
                Err(Confined::Escape(how)) => return Err(disk.outside(&location, how)),
                Err(Confined::Io(e)) => Err(e),
            };
            let opened = opened.and_then(|f| {
                let meta = f.metadata()?;
                if meta.is_dir() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "a directory",
                    ));
                }
                then(f, meta.len())
            });
            opened.map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory => {
                    DataError::NotFound(location)
                }
                _ => DataError::Unavailable(format!("cannot read `{location}`: {e}")),
            })
        })
        .await
        .map_err(|e| DataError::Unavailable(format!("reading the data store: {e}")))?
    }
}

/// Why a disk data object was not opened.
enum Confined {
    /// Its path leaves the root (through a symbolic link).
    Escape(&'static str),
    /// The open failed (not found, permissions, ...).
    Io(std::io::Error),
}

/// Open `relative` (lexically clean) below `root` (canonical) for reading;
/// `file` is the same path joined. On Linux the kernel resolves the path
/// (`openat2` with `RESOLVE_BENEATH`): no step of the walk, a symbolic
/// link's included, may leave the root, and since there is no separate
/// check, nothing can swap a link between a check and the open. Two system
/// calls (the root, opened for each object so that a root made anew is
/// followed, then the object beneath it) where resolving the real path in
/// user space takes one or more per component. A link the kernel will not follow beneath the root (an
/// absolute one) is resolved, and its target opened beneath the root in the
/// same way if it lies there. Without `openat2` (Linux before 5.6, other
/// systems): the real path is checked, then opened.
fn open_confined(root: &Path, relative: &Path, file: &Path) -> Result<std::fs::File, Confined> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        use rustix::io::Errno;
        let beneath = |dir: &rustix::fd::OwnedFd, path: &Path| {
            rustix::fs::openat2(
                dir,
                path,
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            )
        };
        let dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Confined::Io(e.into()))?;
        // A path that does not resolve is refused as leading out when a
        // link on it does (a dangling link's target could appear anywhere),
        // else reported as the error it is.
        let explain = |e: std::io::Error| match escape_blocking(root, relative) {
            Some(how) => Confined::Escape(how),
            None => Confined::Io(e),
        };
        match beneath(&dir, relative) {
            Ok(fd) => return Ok(std::fs::File::from(fd)),
            Err(Errno::XDEV) => {
                // An absolute link, or one out of the root: where it leads.
                let real = std::fs::canonicalize(file).map_err(explain)?;
                let inside = real
                    .strip_prefix(root)
                    .map_err(|_| Confined::Escape("it leads through a symbolic link"))?;
                return match beneath(&dir, inside) {
                    Ok(fd) => Ok(std::fs::File::from(fd)),
                    // Changed between the two opens: refused.
                    Err(Errno::XDEV) => Err(Confined::Escape("it leads through a symbolic link")),
                    Err(e) => Err(Confined::Io(e.into())),
                };
            }
            Err(e @ (Errno::NOENT | Errno::NOTDIR)) => return Err(explain(e.into())),
            Err(Errno::NOSYS) => {}
            Err(e) => return Err(Confined::Io(e.into())),
        }
    }
    if let Some(how) = escape_blocking(root, relative) {
        return Err(Confined::Escape(how));
    }
    std::fs::File::open(file).map_err(Confined::Io)
}

/// An object of a `disk` store no larger than this is read whole in the
/// task that opens it; a larger one is streamed.
const READ_WHOLE: u64 = 64 * 1024;

/// The chunk a large disk object is streamed in.
const READ_CHUNK: usize = 64 * 1024;

/// How `relative` (lexically clean: normal components only) leaves `root`
/// (canonical) through a symbolic link, if it does. The longest existing
/// prefix of the path is resolved, so a write below a linked folder is
/// caught too. What cannot be resolved for another reason (permissions, a
/// loop of links) is left to the caller's own file operation to report.
///
/// The check and the caller's open are two steps: someone who can change
/// the links inside the root between them is not stopped (reads use
/// [`open_confined`], which has no such gap on Linux).
pub async fn escape(root: &Path, relative: &Path) -> Option<&'static str> {
    let (root, relative) = (root.to_owned(), relative.to_owned());
    // One blocking task for the whole walk (as object_store's own calls).
    tokio::task::spawn_blocking(move || escape_blocking(&root, &relative))
        .await
        .unwrap_or(Some("the check of its real path failed"))
}

fn escape_blocking(root: &Path, relative: &Path) -> Option<&'static str> {
    let mut candidate = root.join(relative);
    while candidate.starts_with(root) && candidate != root {
        match std::fs::canonicalize(&candidate) {
            Ok(real) if real.starts_with(root) => return None,
            Ok(_) => return Some("it leads through a symbolic link"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                // A link whose target is missing could point anywhere (and
                // the target could appear later).
                if std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Some("it leads through a symbolic link whose target does not exist");
                }
                candidate.pop();
            }
            Err(_) => return None,
        }
    }
    None
}

impl DataStore {
    /// The store described by `config` (a disk root is created if missing;
    /// an `https://` S3 endpoint trusts the platform's roots and the
    /// certificates of `tls.ca_file`).
    pub fn new(config: &DataStoreConfig, tls: &Tls) -> anyhow::Result<Self> {
        let store: Arc<dyn ObjectStore> = match config {
            DataStoreConfig::Disk { root } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| anyhow::anyhow!("data_store.root {}: {e}", root.display()))?;
                let disk = DiskRoot::new(root)?;
                return Ok(Self {
                    store: disk.files.clone(),
                    disk: Some(Arc::new(disk)),
                });
            }
            DataStoreConfig::Memory => Arc::new(InMemory::new()),
            DataStoreConfig::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
                virtual_hosted_style,
            } => {
                // The CA file's certificates, added to the platform's roots
                // (which the client keeps). Set first: the builder's
                // `with_allow_http` lives in the same client options.
                let mut options = object_store::ClientOptions::new();
                for certificate in tls.ca_certificates() {
                    options = options.with_root_certificate(
                        object_store::Certificate::from_der(certificate.as_ref())
                            .map_err(|e| anyhow::anyhow!("tls.ca_file: {e}"))?,
                    );
                }
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_client_options(options)
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key)
                    .with_allow_http(*allow_http)
                    .with_virtual_hosted_style_request(*virtual_hosted_style);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                Arc::new(
                    builder
                        .build()
                        .map_err(|e| anyhow::anyhow!("data_store (s3, bucket `{bucket}`): {e}"))?,
                )
            }
        };
        Ok(Self { store, disk: None })
    }

    /// Refuse locations that could escape the root (lexically; reading,
    /// checking and writing also refuse a symbolic link out of a disk root).
    pub fn check_location(&self, location: &str) -> Result<ObjectPath, DataError> {
        parse_location(location)
    }

    /// A message's `data_location` as the store's location, the form
    /// plugins see: a relative location as it is; an absolute one (sqAPI's
    /// form) only on a `disk` store and only inside its root — as
    /// configured or with its symbolic links resolved — made relative to
    /// it. The object's real path is checked when it is used.
    pub fn message_location(&self, location: &str) -> Result<String, DataError> {
        if !location.starts_with('/') {
            parse_location(location)?;
            return Ok(location.to_owned());
        }
        let bad = |why: String| DataError::Invalid(format!("invalid location `{location}`: {why}"));
        let Some(disk) = &self.disk else {
            return Err(bad(
                "absolute paths are not allowed (only a `disk` data store takes an absolute location, inside its root)".into(),
            ));
        };
        // Lexically clean before any comparison: a `..` could otherwise
        // climb out of a matching prefix.
        if location.len() > 1024 {
            return Err(bad("longer than 1024 bytes".into()));
        }
        for segment in location[1..].split('/') {
            match segment {
                "" => return Err(bad("empty path segments are not allowed".into())),
                "." | ".." => return Err(bad("`.` and `..` segments are not allowed".into())),
                _ => {}
            }
        }
        let path = Path::new(location);
        let rest = [Some(&disk.canonical), disk.written.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|root| path.strip_prefix(root).ok());
        let Some(rest) = rest else {
            return Err(bad(format!(
                "an absolute location must lie inside the data store's root {}",
                disk.describe()
            )));
        };
        let relative = rest
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if relative.is_empty() {
            return Err(bad(format!(
                "it names the data store's root {} itself, not an object in it",
                disk.describe()
            )));
        }
        parse_named(&relative, location)?;
        Ok(relative)
    }

    /// The object path of `location`, refused if it could escape the root.
    async fn object_path(&self, location: &str) -> Result<ObjectPath, DataError> {
        let path = parse_location(location)?;
        if let Some(disk) = &self.disk {
            disk.confine(location, &path).await?;
        }
        Ok(path)
    }

    /// Open the object at `location` for streaming.
    pub async fn open(&self, location: &str) -> Result<ObjectStream, DataError> {
        let path = parse_location(location)?;
        if let Some(disk) = &self.disk {
            // A small object whole, in the task that checks and opens it; a
            // larger one streamed from the same handle (never opened again
            // by its path, which a link could have changed since).
            let read = disk
                .with_file(location, &path, |mut file, size| {
                    if size > READ_WHOLE {
                        return Ok(Err((file, size)));
                    }
                    let mut bytes = Vec::with_capacity(size as usize);
                    std::io::Read::read_to_end(&mut file, &mut bytes)?;
                    Ok(Ok(Bytes::from(bytes)))
                })
                .await?;
            return Ok(match read {
                Ok(bytes) => ObjectStream {
                    size: Some(bytes.len() as u64),
                    stream: futures::stream::once(async { Ok(bytes) }).boxed(),
                },
                Err((file, size)) => {
                    let owned = location.to_owned();
                    let file = tokio::fs::File::from_std(file);
                    let stream = futures::stream::try_unfold(file, move |mut file| {
                        let owned = owned.clone();
                        async move {
                            let mut chunk = vec![0u8; READ_CHUNK];
                            let n = tokio::io::AsyncReadExt::read(&mut file, &mut chunk)
                                .await
                                .map_err(|e| {
                                    DataError::Unavailable(format!("cannot read `{owned}`: {e}"))
                                })?;
                            if n == 0 {
                                return Ok(None);
                            }
                            chunk.truncate(n);
                            Ok(Some((Bytes::from(chunk), file)))
                        }
                    })
                    .boxed();
                    ObjectStream {
                        size: Some(size),
                        stream,
                    }
                }
            });
        }
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| store_error(location, e))?;
        let size = Some(result.meta.size);
        let owned = location.to_owned();
        let stream = result
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| store_error(&owned, e)))
            .boxed();
        Ok(ObjectStream { stream, size })
    }

    /// Whether an object exists at `location`.
    pub async fn exists(&self, location: &str) -> Result<bool, DataError> {
        let path = parse_location(location)?;
        if let Some(disk) = &self.disk {
            return match disk.with_file(location, &path, |_, _| Ok(())).await {
                Ok(()) => Ok(true),
                Err(DataError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            };
        }
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(location, e)),
        }
    }

    /// Write `bytes` at `location`.
    pub async fn put(&self, location: &str, bytes: Bytes) -> Result<(), DataError> {
        let path = self.object_path(location).await?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| store_error(location, e))
    }
}

fn store_error(location: &str, err: object_store::Error) -> DataError {
    match err {
        object_store::Error::NotFound { .. } => DataError::NotFound(location.to_owned()),
        object_store::Error::InvalidPath { source } => {
            DataError::Invalid(format!("invalid location `{location}`: {source}"))
        }
        other => DataError::Unavailable(other.to_string()),
    }
}

/// Validate a location and turn it into an object path.
pub fn parse_location(location: &str) -> Result<ObjectPath, DataError> {
    parse_named(location, location)
}

/// [`parse_location`], naming `shown` (the location as the message gave
/// it) in a refusal.
fn parse_named(location: &str, shown: &str) -> Result<ObjectPath, DataError> {
    let bad = |why: &str| DataError::Invalid(format!("invalid location `{shown}`: {why}"));
    if location.is_empty() {
        return Err(bad("empty"));
    }
    if location.len() > 1024 {
        return Err(bad("longer than 1024 bytes"));
    }
    if location.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if location.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    if location.contains("://") || location.contains(':') {
        return Err(bad("URLs and drive letters are not allowed"));
    }
    if location.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    if location.contains('%') {
        return Err(bad("percent-encoding is not allowed"));
    }
    for segment in location.split('/') {
        match segment {
            "" => return Err(bad("empty path segments are not allowed")),
            "." | ".." => return Err(bad("`.` and `..` segments are not allowed")),
            _ => {}
        }
    }
    ObjectPath::parse(location).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_that_escape_the_root_are_refused() {
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "/etc/passwd",
            "a//b",
            "./a",
            "file:///etc/passwd",
            "s3://bucket/key",
            "a\\..\\b",
            "a/%2e%2e/b",
            "a\u{0}b",
            "",
        ] {
            assert!(parse_location(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["a", "images/cat.png", "x/y/z.txt", "dots.in.name", "a..b/c"] {
            assert!(parse_location(good).is_ok(), "{good:?} was refused");
        }
    }

    #[tokio::test]
    async fn disk_store_reads_writes_and_reports_missing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = DataStore::new(
            &DataStoreConfig::Disk {
                root: dir.path().to_owned(),
            },
            &Tls::default(),
        )?;
        store.put("a/b.txt", Bytes::from_static(b"hello")).await?;
        assert!(std::fs::read(dir.path().join("a/b.txt"))? == b"hello");
        assert!(store.exists("a/b.txt").await?);
        assert!(!store.exists("a/nope.txt").await?);
        let mut object = store.open("a/b.txt").await?;
        assert_eq!(object.size, Some(5));
        let mut all = Vec::new();
        while let Some(chunk) = object.stream.next().await {
            all.extend_from_slice(&chunk?);
        }
        assert_eq!(all, b"hello");
        assert!(matches!(
            store.open("a/nope.txt").await.err(),
            Some(DataError::NotFound(_))
        ));
        // A folder is no object; one larger than what is read whole comes
        // streamed, all of it.
        assert!(!store.exists("a").await?);
        assert!(matches!(
            store.open("a").await.err(),
            Some(DataError::NotFound(_))
        ));
        let big: Vec<u8> = (0..3 * READ_WHOLE as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        store.put("big.bin", Bytes::from(big.clone())).await?;
        let mut object = store.open("big.bin").await?;
        assert_eq!(object.size, Some(big.len() as u64));
        let (mut all, mut chunks) = (Vec::new(), 0);
        while let Some(chunk) = object.stream.next().await {
            all.extend_from_slice(&chunk?);
            chunks += 1;
        }
        assert!(
            all == big && chunks > 1,
            "{} bytes in {chunks} chunks",
            all.len()
        );
        Ok(())
    }
}

#[cfg(all(test, unix))]
mod confinement_tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn disk(root: &Path) -> anyhow::Result<DataStore> {
        DataStore::new(
            &DataStoreConfig::Disk {
                root: root.to_owned(),
            },
            &Tls::default(),
        )
    }

    fn reason(result: Result<impl Sized, DataError>) -> String {
        match result {
            Err(DataError::Invalid(m)) => m,
            Err(other) => format!("not Invalid: {other}"),
            Ok(_) => "accepted".into(),
        }
    }

    #[tokio::test]
    async fn a_symbolic_link_out_of_the_root_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("data");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&outside)?;
        std::fs::write(outside.join("secret.txt"), b"secret")?;
        std::fs::create_dir_all(root.join("in"))?;
        std::fs::write(root.join("in/ok.txt"), b"ok")?;
        symlink(outside.join("secret.txt"), root.join("file-link"))?;
        symlink(&outside, root.join("dir-link"))?;
        symlink(root.join("in"), root.join("inner-link"))?;
        symlink(dir.path().join("nowhere"), root.join("dangling"))?;
        let store = disk(&root)?;

        // Today's escape, closed: object_store follows links anywhere.
        for location in ["file-link", "dir-link/secret.txt"] {
            let why = reason(store.open(location).await);
            assert!(why.contains("symbolic link"), "{location}: {why}");
            assert!(why.contains(&format!("`{location}`")), "{why}");
            assert!(why.contains("outside the data store's root"), "{why}");
            assert!(reason(store.exists(location).await).contains("symbolic link"));
        }
        // A write below a linked folder, even to a new file or folder.
        for location in ["dir-link/new.txt", "dir-link/sub/new.txt"] {
            let why = reason(store.put(location, Bytes::from_static(b"x")).await);
            assert!(why.contains("symbolic link"), "{location}: {why}");
        }
        assert!(!outside.join("new.txt").exists() && !outside.join("sub").exists());
        // A dangling link could point anywhere.
        let why = reason(store.open("dangling").await);
        assert!(why.contains("target does not exist"), "{why}");
        let why = reason(store.put("dangling/x", Bytes::from_static(b"x")).await);
        assert!(why.contains("symbolic link"), "{why}");

        // Links that stay inside the root are fine, and so are new objects.
        assert!(store.exists("inner-link/ok.txt").await?);
        assert!(store.exists("in/ok.txt").await?);
        assert!(!store.exists("in/missing.txt").await?);
        assert!(!store.exists("new/dir/missing.txt").await?);
        store.put("new/dir/a.txt", Bytes::from_static(b"a")).await?;
        assert_eq!(std::fs::read(root.join("new/dir/a.txt"))?, b"a");
        Ok(())
    }

    /// The attack the separate check left open: a link flipped between
    /// a folder inside the root and one outside while objects are read
    /// through it. Every read either finds the inside file or is refused.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread")]
    async fn a_large_object_is_streamed_from_the_confined_handle_while_a_link_flips()
    -> anyhow::Result<()> {
        // Over READ_WHOLE: streamed. Opened by its path a second time, a
        // flipped link would give the outside file's bytes.
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?.join("data");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("in"))?;
        std::fs::create_dir_all(&outside)?;
        let size = 3 * READ_WHOLE as usize;
        std::fs::write(root.join("in/big.bin"), vec![b'i'; size])?;
        std::fs::write(outside.join("big.bin"), vec![b's'; size])?;
        symlink("in", root.join("flip"))?;
        let store = DataStore::new(
            &DataStoreConfig::Disk { root: root.clone() },
            &Tls::default(),
        )?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (root, outside, stop) = (root.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let next = root.join(format!("next-{n}"));
                    if n.is_multiple_of(2) {
                        symlink(&outside, &next)?;
                    } else {
                        symlink("in", &next)?;
                    }
                    std::fs::rename(&next, root.join("flip"))?;
                    n += 1;
                }
                Ok(())
            })
        };
        let (mut inside, mut refused) = (0, 0);
        for _ in 0..1_000 {
            match store.open("flip/big.bin").await {
                Ok(mut object) => {
                    let mut all = Vec::new();
                    while let Some(chunk) = object.stream.next().await {
                        all.extend_from_slice(&chunk?);
                    }
                    assert_eq!(all.len(), size);
                    assert!(all.iter().all(|b| *b == b'i'), "a read left the root");
                    inside += 1;
                }
                Err(DataError::Invalid(_)) => refused += 1,
                Err(e) => anyhow::bail!("{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper
            .join()
            .map_err(|_| anyhow::anyhow!("the flipper panicked"))??;
        assert!(
            inside > 0 && refused > 0,
            "inside {inside}, refused {refused}"
        );
        Ok(())
    }

    #[test]
    fn a_link_flipped_during_reads_never_yields_a_file_outside_the_root() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?.join("data");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("in"))?;
        std::fs::create_dir_all(&outside)?;
        std::fs::write(root.join("in/ok.txt"), b"inside")?;
        std::fs::write(outside.join("ok.txt"), b"secret")?;
        symlink("in", root.join("flip"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (root, outside, stop) = (root.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let next = root.join(format!("next-{n}"));
                    if n.is_multiple_of(2) {
                        symlink(&outside, &next)?;
                    } else {
                        symlink("in", &next)?;
                    }
                    std::fs::rename(&next, root.join("flip"))?;
                    n += 1;
                }
                Ok(())
            })
        };
        let relative = Path::new("flip/ok.txt");
        let (mut inside, mut refused) = (0, 0);
        for _ in 0..5_000 {
            match open_confined(&root, relative, &root.join(relative)) {
                Ok(mut file) => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut file, &mut text)?;
                    assert_eq!(text, "inside", "a read left the root");
                    inside += 1;
                }
                Err(Confined::Escape(_)) => refused += 1,
                Err(Confined::Io(e)) => anyhow::bail!("{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper
            .join()
            .map_err(|_| anyhow::anyhow!("the flipper panicked"))??;
        assert!(
            inside > 0 && refused > 0,
            "inside {inside}, refused {refused}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn absolute_locations_inside_a_disk_root_become_relative() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("data/images"))?;
        std::fs::write(real.join("data/images/a.png"), b"png")?;
        // The root as written goes through a link: both forms are accepted.
        symlink(&real, dir.path().join("mnt"))?;
        let written = std::path::absolute(dir.path().join("mnt/data"))?;
        let canonical = std::fs::canonicalize(real.join("data"))?;
        let store = disk(&written)?;
        for root in [&written, &canonical] {
            let given = format!("{}/images/a.png", root.display());
            assert_eq!(store.message_location(&given)?, "images/a.png", "{given}");
        }
        assert!(store.exists("images/a.png").await?);
        // Relative locations are kept as they are.
        assert_eq!(store.message_location("images/a.png")?, "images/a.png");

        let w = written.display();
        for (given, expected) in [
            (format!("{w}/../data/images/a.png"), "`.` and `..` segments"),
            (format!("{w}/images/../a.png"), "`.` and `..` segments"),
            (format!("{w}/./images/a.png"), "`.` and `..` segments"),
            (format!("{w}//images/a.png"), "empty path segments"),
            (format!("{w}/images/"), "empty path segments"),
            (format!("{w}"), "itself, not an object"),
            (
                format!("{w}x/a.png"),
                "must lie inside the data store's root",
            ),
            (
                "/etc/passwd".to_owned(),
                "must lie inside the data store's root",
            ),
            (format!("{w}/a%2e.png"), "percent-encoding"),
        ] {
            let why = reason(store.message_location(&given));
            assert!(why.contains(expected), "{given}: {why}");
            assert!(
                why.contains(&format!("`{given}`")),
                "names the location: {why}"
            );
        }
        // The refusal names the root, in both forms.
        let why = reason(store.message_location("/etc/passwd"));
        assert!(why.contains(&format!("`{w}`")), "{why}");
        assert!(why.contains(&format!("`{}`", canonical.display())), "{why}");

        // Only a disk store takes an absolute location.
        let memory = DataStore::new(&DataStoreConfig::Memory, &Tls::default())?;
        let why = reason(memory.message_location(&format!("{w}/images/a.png")));
        assert!(why.contains("absolute paths are not allowed"), "{why}");
        Ok(())
    }

    #[tokio::test]
    async fn an_absolute_location_through_a_link_out_of_the_root_is_refused_when_used()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("data");
        std::fs::create_dir_all(&root)?;
        std::fs::write(dir.path().join("secret.txt"), b"secret")?;
        symlink(dir.path().join("secret.txt"), root.join("escape"))?;
        let store = disk(&root)?;
        let canonical = std::fs::canonicalize(&root)?;
        let location = store.message_location(&format!("{}/escape", canonical.display()))?;
        assert_eq!(location, "escape");
        let why = reason(store.exists(&location).await);
        assert!(why.contains("symbolic link"), "{why}");
        assert!(
            why.contains(&canonical.display().to_string()),
            "names the root: {why}"
        );
        Ok(())
    }
}

#[cfg(test)]
mod properties {
    use std::path::{Component, Path};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any location that is accepted stays below the root: joined to a
        /// root it has only normal components.
        #[test]
        fn accepted_locations_never_leave_the_root(location in "[a-z./%\\\\:~ -]{0,24}") {
            if let Ok(path) = parse_location(&location) {
                let joined = Path::new("/root").join(path.as_ref());
                prop_assert!(joined.starts_with("/root"));
                prop_assert!(
                    joined.components().skip(2).all(|c| matches!(c, Component::Normal(_))),
                    "{location:?} -> {joined:?}"
                );
                prop_assert!(!location.split('/').any(|s| s == ".."));
            }
        }
    }
}
