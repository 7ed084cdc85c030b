//! Listener `dir`: a spool folder, each `*.json` file one message.
//!
//! ```text
//! spool/                 new messages (`sandpipe send` writes here atomically)
//! spool/.work/A~NAME     claimed by rename (atomic: one claimer wins), attempt A
//! spool/.retry/T~A~NAME  waiting for a retry due at unix-ms T, as attempt A
//! spool/done/NAME        processed
//! spool/dead/NAME        dead-lettered, beside NAME.error.json (reason and statuses)
//! ```
//!
//! At start, files left in `.work/` by a process that died are put back
//! for immediate redelivery with their attempt number, so nothing is lost.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;

use super::{Acker, Delivery, Listener, Settlement};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

struct Spool {
    root: PathBuf,
    inflight: AtomicUsize,
}

impl Spool {
    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// The dir listener.
pub struct DirListener {
    spool: Arc<Spool>,
    poll: Duration,
    once: bool,
    /// Bytes read of a message file at most, plus one (so the pipeline can
    /// tell it is too large without reading it all).
    max_bytes: u64,
}

impl DirListener {
    /// Open (creating) the spool at `root`, recovering files a dead process
    /// left claimed.
    pub fn new(root: &Path, poll: Duration, once: bool) -> anyhow::Result<Self> {
        for sub in ["", ".work", ".retry", ".tmp", "done", "dead"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create spool folder {}", dir.display()))?;
        }
        let spool = Arc::new(Spool {
            root: root.to_owned(),
            inflight: AtomicUsize::new(0),
        });
        for entry in std::fs::read_dir(spool.dir(".work"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((attempt, original)) = name.split_once('~') {
                let target = spool.dir(".retry").join(format!("0~{attempt}~{original}"));
                std::fs::rename(entry.path(), &target)?;
                tracing::warn!(file = %original, "recovered a message left in progress by a previous run");
            }
        }
        Ok(Self {
            spool,
            poll,
            once,
            max_bytes: u64::MAX,
        })
    }

    /// Read no more than `max` bytes (plus one) of a message file:
    /// `pipeline.max_message_bytes`.
    pub fn with_max_message_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max;
        self
    }

    fn sorted(dir: &Path) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn claim(&self, from: PathBuf, attempt: u32, name: &str) -> anyhow::Result<Option<Delivery>> {
        let work = self.spool.dir(".work").join(format!("{attempt}~{name}"));
        match std::fs::rename(&from, &work) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot claim {}", from.display())),
        }
        let mut body = Vec::new();
        std::fs::File::open(&work)
            .and_then(|f| {
                f.take(self.max_bytes.saturating_add(1))
                    .read_to_end(&mut body)
            })
            .with_context(|| format!("cannot read {}", work.display()))?;
        self.spool.inflight.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Delivery {
            body: Bytes::from(body),
            headers: Vec::new(),
            attempt,
            // A file left behind by a crash looks like any other.
            first: false,
            name: name.to_owned(),
            acker: Box::new(DirAcker {
                spool: self.spool.clone(),
                work,
                name: name.to_owned(),
                attempt,
            }),
        }))
    }

    /// One pass: a due retry first, then the oldest new file. Also returns
    /// the earliest future retry time.
    fn try_claim(&self) -> anyhow::Result<(Option<Delivery>, Option<u64>)> {
        let now = now_ms();
        let mut next_due = None;
        for name in Self::sorted(&self.spool.dir(".retry"))? {
            let mut parts = name.splitn(3, '~');
            let (Some(due), Some(attempt), Some(original)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(due), Ok(attempt)) = (due.parse::<u64>(), attempt.parse::<u32>()) else {
                continue;
            };
            if due > now {
                next_due = Some(next_due.map_or(due, |d: u64| d.min(due)));
                continue;
            }
            if let Some(d) = self.claim(self.spool.dir(".retry").join(&name), attempt, original)? {
                return Ok((Some(d), None));
            }
        }
        for name in Self::sorted(&self.spool.root)? {
            if !name.ends_with(".json") {
                continue;
            }
            if let Some(d) = self.claim(self.spool.root.join(&name), 1, &name)? {
                return Ok((Some(d), None));
            }
        }
        Ok((None, next_due))
    }
}

#[async_trait]
impl Listener for DirListener {
    async fn recv(&self) -> anyhow::Result<Option<Delivery>> {
        loop {
            let (delivery, next_due) = self.try_claim()?;
            if delivery.is_some() {
                return Ok(delivery);
            }
            if self.once && next_due.is_none() && self.spool.inflight.load(Ordering::SeqCst) == 0 {
                return Ok(None);
            }
            let wait = match next_due {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms())).min(self.poll),
                None => self.poll,
            };
            tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
        }
    }
}

impl DirListener {
    /// Write a message into the spool at `root` atomically (through
    /// `.tmp/`), under a unique, time-ordered name.
    pub fn send_to(root: &Path, body: &[u8], name: &str) -> anyhow::Result<String> {
        let stem = crate::output::safe_name(name.trim_end_matches(".json"));
        let file = format!(
            "{}-{}-{stem}.json",
            now_ms(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let tmp_dir = root.join(".tmp");
        std::fs::create_dir_all(&tmp_dir)
            .with_context(|| format!("cannot create {}", tmp_dir.display()))?;
        let tmp = tmp_dir.join(&file);
        std::fs::write(&tmp, body).with_context(|| format!("cannot write {}", tmp.display()))?;
        let target = root.join(&file);
        std::fs::rename(&tmp, &target)?;
        Ok(target.display().to_string())
    }
}

struct DirAcker {
    spool: Arc<Spool>,
    work: PathBuf,
    name: String,
    attempt: u32,
}

#[async_trait]
impl Acker for DirAcker {
    async fn settle(self: Box<Self>, settlement: Settlement) -> anyhow::Result<()> {
        let result = (|| -> anyhow::Result<()> {
            match &settlement {
                Settlement::Ack => {
                    std::fs::rename(&self.work, self.spool.dir("done").join(&self.name))?;
                }
                Settlement::Retry { delay, .. } | Settlement::Requeue { delay, .. } => {
                    let next = match settlement {
                        Settlement::Retry { .. } => self.attempt + 1,
                        _ => self.attempt,
                    };
                    let due = now_ms() + delay.as_millis() as u64;
                    let target = self
                        .spool
                        .dir(".retry")
                        .join(format!("{due}~{next}~{}", self.name));
                    std::fs::rename(&self.work, target)?;
                }
                Settlement::DeadLetter { reason, report } => {
                    let sidecar = serde_json::json!({
                        "file": self.name,
                        "reason": reason,
                        "attempts": self.attempt,
                        "statuses": report,
                    });
                    let tmp = self
                        .spool
                        .dir(".tmp")
                        .join(format!("{}.error.json", self.name));
                    std::fs::write(&tmp, serde_json::to_vec_pretty(&sidecar)?)?;
                    std::fs::rename(
                        &tmp,
                        self.spool
                            .dir("dead")
                            .join(format!("{}.error.json", self.name)),
                    )?;
                    std::fs::rename(&self.work, self.spool.dir("dead").join(&self.name))?;
                }
            }
            Ok(())
        })();
        self.spool.inflight.fetch_sub(1, Ordering::SeqCst);
        result.with_context(|| format!("cannot settle {}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_file_is_read_no_further_than_the_limit() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let l = DirListener::new(dir.path(), Duration::from_millis(10), true)?
            .with_max_message_bytes(100);
        DirListener::send_to(dir.path(), &[b' '; 10_000], "big.json")?;
        let big = l
            .recv()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no delivery"))?;
        assert_eq!(big.body.len(), 101, "read past the limit");
        let name = big.name.clone();
        big.acker
            .settle(Settlement::DeadLetter {
                reason: "too large".into(),
                report: serde_json::Value::Null,
            })
            .await?;
        // The dead letter is the whole original file, not what was read.
        let kept = std::fs::metadata(dir.path().join("dead").join(&name))?;
        assert_eq!(kept.len(), 10_000);
        Ok(())
    }

    #[tokio::test]
    async fn claims_settles_and_drains_in_once_mode() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let l = DirListener::new(dir.path(), Duration::from_millis(10), true)?;
        DirListener::send_to(dir.path(), b"{\"a\":1}", "one.json")?;
        std::thread::sleep(Duration::from_millis(2));
        DirListener::send_to(dir.path(), b"{\"a\":2}", "two.json")?;
        let first = l
            .recv()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no delivery"))?;
        assert_eq!(first.attempt, 1);
        assert_eq!(&first.body[..], b"{\"a\":1}");
        first
            .acker
            .settle(Settlement::Retry {
                delay: Duration::from_millis(30),
                reason: "x".into(),
            })
            .await?;
        let second = l
            .recv()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no delivery"))?;
        assert_eq!(&second.body[..], b"{\"a\":2}");
        second.acker.settle(Settlement::Ack).await?;
        // The retry becomes due and comes back as attempt 2.
        let again = l.recv().await?.ok_or_else(|| anyhow::anyhow!("no retry"))?;
        assert_eq!(again.attempt, 2);
        again
            .acker
            .settle(Settlement::DeadLetter {
                reason: "bad".into(),
                report: serde_json::json!([]),
            })
            .await?;
        assert!(l.recv().await?.is_none());
        assert_eq!(DirListener::sorted(&dir.path().join("done"))?.len(), 1);
        let dead = DirListener::sorted(&dir.path().join("dead"))?;
        assert_eq!(dead.len(), 2, "{dead:?}");
        Ok(())
    }

    #[tokio::test]
    async fn files_left_in_progress_are_recovered_at_start() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let l = DirListener::new(dir.path(), Duration::from_millis(10), true)?;
            DirListener::send_to(dir.path(), b"{}", "m.json")?;
            let d = l
                .recv()
                .await?
                .ok_or_else(|| anyhow::anyhow!("no delivery"))?;
            d.acker
                .settle(Settlement::Retry {
                    delay: Duration::ZERO,
                    reason: String::new(),
                })
                .await?;
            let d = l
                .recv()
                .await?
                .ok_or_else(|| anyhow::anyhow!("no delivery"))?;
            assert_eq!(d.attempt, 2);
            std::mem::forget(d); // the process "dies" holding it
        }
        let l = DirListener::new(dir.path(), Duration::from_millis(10), true)?;
        let d = l
            .recv()
            .await?
            .ok_or_else(|| anyhow::anyhow!("lost the message"))?;
        assert_eq!(d.attempt, 2);
        d.acker.settle(Settlement::Ack).await?;
        Ok(())
    }
}
