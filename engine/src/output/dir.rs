//! Output `dir`: one JSON file per emitted message, written atomically
//! (temporary file, fsync, rename). The name is derived from the message id,
//! the plugin and the emit's position, so a retried message replaces its own
//! files rather than adding new ones.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use tokio::io::AsyncWriteExt as _;

use super::Origin;
use crate::capability::Emit;

/// A folder output.
pub struct DirOutput {
    path: PathBuf,
}

/// A file-name-safe version of `s`.
pub fn safe_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    cleaned.trim_start_matches('.').to_owned()
}

impl DirOutput {
    /// The output folder (created, with its `.tmp/`).
    pub fn new(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path.join(".tmp"))
            .with_context(|| format!("cannot create output folder {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub(super) async fn publish(
        &self,
        origin: &Origin<'_>,
        seq: usize,
        emit: &Emit,
    ) -> anyhow::Result<()> {
        let name = format!(
            "{}.{}.{seq}.json",
            safe_name(origin.message_id),
            safe_name(origin.plugin)
        );
        let (payload, encoding) = match std::str::from_utf8(&emit.payload) {
            Ok(text) => (serde_json::Value::String(text.to_owned()), "utf-8"),
            Err(_) => (
                serde_json::Value::String(
                    base64::engine::general_purpose::STANDARD.encode(&emit.payload),
                ),
                "base64",
            ),
        };
        let document = serde_json::json!({
            "message_id": origin.message_id,
            "plugin": origin.plugin,
            "output": emit.output,
            "seq": seq,
            "headers": emit.headers,
            "encoding": encoding,
            "payload": payload,
        });
        let bytes = serde_json::to_vec_pretty(&document)?;
        let tmp = self.path.join(".tmp").join(&name);
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(&bytes).await?;
        file.sync_all().await?;
        drop(file);
        let target = self.path.join(&name);
        tokio::fs::rename(&tmp, &target)
            .await
            .with_context(|| format!("cannot publish {}", target.display()))?;
        Ok(())
    }
}
