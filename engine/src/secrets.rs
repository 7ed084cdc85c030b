//! Secrets: the values of the top-level `secrets:` section, read once at
//! start from environment variables or files (`config::SecretSource`).
//! Grants bind them to destinations (`http.auth`); the host applies them
//! to a request after the allow-list check (`capability::http`). No
//! secret enters a guest, and none is printed: [`Secret`]'s `Debug` and
//! `Display` show only its name, and header values made from one are
//! marked sensitive.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, bail};

use crate::config::Config;

/// The longest secret read from a file.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// One secret's value.
#[derive(Clone)]
pub struct Secret {
    name: Arc<str>,
    value: Arc<str>,
}

impl Secret {
    /// A secret the engine obtained itself (a user's OAuth token), under
    /// `name` (what messages show instead of the value).
    pub fn new(name: &str, value: &str) -> Self {
        Self {
            name: Arc::from(name),
            value: Arc::from(value),
        }
    }

    /// The value, for the one place that applies it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The secret's name in `secrets:`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}, redacted)", self.name)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret {}>", self.name)
    }
}

/// Every secret of a configuration, by name.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, Secret>,
}

impl Secrets {
    /// Read every secret of `config`. An unset variable, an unreadable,
    /// empty or oversized file is an error naming the secret and its
    /// source (never its value).
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let mut values = BTreeMap::new();
        for (name, source) in &config.secrets {
            let value = match (&source.env, &source.file) {
                (Some(variable), None) => std::env::var(variable).map_err(|_| {
                    anyhow::anyhow!(
                        "{}: secrets.{name}: environment variable `{variable}` is not set",
                        config.file.display()
                    )
                })?,
                (None, Some(file)) => read_file(file)
                    .with_context(|| format!("{}: secrets.{name}", config.file.display()))?,
                _ => bail!(
                    "{}: secrets.{name}: give exactly one of `env` and `file`",
                    config.file.display()
                ),
            };
            if value.is_empty() {
                bail!(
                    "{}: secrets.{name}: the value is empty",
                    config.file.display()
                );
            }
            values.insert(
                name.clone(),
                Secret {
                    name: Arc::from(name.as_str()),
                    value: Arc::from(value),
                },
            );
        }
        Ok(Self { values })
    }

    /// The secret named `name`.
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.values.get(name)
    }

    /// Every value, for the checks that nothing printed holds one.
    pub fn values(&self) -> impl Iterator<Item = &Secret> {
        self.values.values()
    }
}

/// A secret file's text, without one trailing newline.
fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        bail!("{} is longer than {MAX_SECRET_BYTES} bytes", path.display());
    }
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lose_one_trailing_newline_and_nothing_prints_a_value() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("token"), "s3cr3t-value\n")?;
        let config = Config::parse(
            &dir.path().join("sandpipe.yaml"),
            "listener: { type: dir, path: spool }\nsecrets:\n  token: { file: token }\n  path: { env: PATH }\n",
        )?;
        let secrets = Secrets::load(&config)?;
        let token = secrets.get("token").map(Secret::expose);
        assert_eq!(token, Some("s3cr3t-value"));
        let printed = format!(
            "{secrets:?} {}",
            secrets
                .get("token")
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("token"), "{printed}");
        Ok(())
    }

    #[test]
    fn a_missing_source_is_named_without_a_value() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config::parse(
            &dir.path().join("sandpipe.yaml"),
            "listener: { type: dir, path: spool }\nsecrets:\n  gone: { file: nowhere }\n",
        )?;
        let err = format!(
            "{:#}",
            Secrets::load(&config)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        assert!(err.contains("secrets.gone"), "{err}");
        let config = Config::parse(
            &dir.path().join("sandpipe.yaml"),
            "listener: { type: dir, path: spool }\nsecrets:\n  unset: { env: SANDPIPE_SURELY_UNSET_SECRET }\n",
        )?;
        let err = Secrets::load(&config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("SANDPIPE_SURELY_UNSET_SECRET") && err.contains("secrets.unset"),
            "{err}"
        );
        Ok(())
    }
}
