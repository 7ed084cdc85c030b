//! TLS for the engine's outbound connections — RabbitMQ (`amqps://`),
//! Redis (`rediss://`), PostgreSQL (`sslmode`) and an `https://` S3
//! endpoint — with rustls (aws-lc-rs), never OpenSSL.
//!
//! What is trusted is built here once for all of them: the platform's
//! roots (rustls-native-certs, read once per process, on the first TLS
//! connection) plus the certificates of `tls.ca_file` (read at start, so a
//! missing or empty file stops the engine naming it). Every connection
//! checks the server's certificate chain and host name, except where
//! PostgreSQL's `sslmode` asks for less (`require`, `prefer`: libpq's
//! semantics, no check; `verify-ca`: no host name), see [`postgres`].
//!
//! A connection that fails on a certificate says so ([`Tls::explain`]):
//! which backend, the URL without its password, what rustls found, and
//! what to set.

pub mod postgres;

use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::config::Config;

/// What the engine's TLS connections trust; cheap to clone.
#[derive(Clone, Default)]
pub struct Tls {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `tls.ca_file`, for messages.
    ca_file: Option<PathBuf>,
    /// Its certificates.
    ca: Vec<CertificateDer<'static>>,
    /// The roots and the verifying client configuration, made on first use.
    trust: OnceLock<Result<Trust, String>>,
}

/// Everything trusted, in the forms the clients take.
struct Trust {
    roots: Arc<RootCertStore>,
    /// Every root as PEM (the Redis client takes its roots so).
    pem: Arc<Vec<u8>>,
    /// The client configuration that checks the chain and the host name.
    verified: Arc<ClientConfig>,
}

/// The platform's roots, read once per process.
struct Platform {
    certificates: Vec<CertificateDer<'static>>,
    /// What went wrong reading the store (files that could not be read).
    errors: Vec<String>,
}

fn platform() -> &'static Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    PLATFORM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        tracing::debug!(
            roots = found.certs.len(),
            errors = errors.len(),
            "the platform's certificate store read"
        );
        Platform {
            certificates: found.certs,
            errors,
        }
    })
}

/// The one crypto provider of every TLS connection the engine makes.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            // Libraries that build their own configuration (the Redis
            // client) use the process's default: make it this one, so it
            // never depends on which rustls features some crate enabled.
            let _ = CryptoProvider::install_default(rustls::crypto::aws_lc_rs::default_provider());
            provider
        })
        .clone()
}

impl Tls {
    /// The TLS settings of `config`: reads `tls.ca_file` (an unreadable
    /// file, one without certificates, or a certificate that cannot be a
    /// trust anchor is an error naming the file).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let ca = config
            .tls
            .ca_certificates()
            .map_err(|e| anyhow::anyhow!("tls.ca_file: {e}"))?;
        let ca_file = config.tls.ca_file.clone();
        let mut check = RootCertStore::empty();
        for (index, certificate) in ca.iter().enumerate() {
            check.add(certificate.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "tls.ca_file: certificate {} of {} cannot be a trust anchor: {e}",
                    index + 1,
                    ca_file
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                )
            })?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                ca_file,
                ca,
                trust: OnceLock::new(),
            }),
        })
    }

    /// The certificates of `tls.ca_file` (empty without it).
    pub fn ca_certificates(&self) -> &[CertificateDer<'static>] {
        &self.inner.ca
    }

    fn trust(&self) -> anyhow::Result<&Trust> {
        self.inner
            .trust
            .get_or_init(|| self.build_trust())
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn build_trust(&self) -> Result<Trust, String> {
        let platform = platform();
        let mut roots = RootCertStore::empty();
        let mut pem = Vec::new();
        // A platform store may hold certificates webpki cannot use as
        // anchors; they are skipped, as every rustls client does (and left
        // out of the PEM bundle, which the Redis client would refuse whole).
        for certificate in &platform.certificates {
            if roots.add(certificate.clone()).is_ok() {
                pem_encode(certificate, &mut pem);
            }
        }
        for certificate in &self.inner.ca {
            roots
                .add(certificate.clone())
                .map_err(|e| format!("tls.ca_file: {e}"))?;
            pem_encode(certificate, &mut pem);
        }
        let roots = Arc::new(roots);
        let verified = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot configure TLS: {e}"))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        Ok(Trust {
            roots,
            pem: Arc::new(pem),
            verified: Arc::new(verified),
        })
    }

    /// A client configuration that checks the server's chain against the
    /// trusted roots and its name against the host connected to.
    pub fn verified(&self) -> anyhow::Result<Arc<ClientConfig>> {
        Ok(self.trust()?.verified.clone())
    }

    /// A client configuration for outbound HTTP (the `http` capability):
    /// the webpki roots (Mozilla's, compiled in, so the same on every
    /// machine and image) plus `tls.ca_file`'s certificates; chain and host
    /// name checked.
    pub fn web(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for certificate in &self.inner.ca {
            roots
                .add(certificate.clone())
                .map_err(|e| anyhow::anyhow!("tls.ca_file: {e}"))?;
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("cannot configure TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The trusted roots.
    pub fn roots(&self) -> anyhow::Result<Arc<RootCertStore>> {
        Ok(self.trust()?.roots.clone())
    }

    /// Every trusted root as one PEM bundle.
    pub fn roots_pem(&self) -> anyhow::Result<Arc<Vec<u8>>> {
        Ok(self.trust()?.pem.clone())
    }

    /// If `err` (or one of its causes) is a TLS failure, the message a user
    /// can act on: that it is TLS, which backend and URL (`target`, without
    /// its password), what rustls found, and what to set.
    pub fn explain(
        &self,
        backend: &str,
        target: &str,
        err: &(dyn StdError + 'static),
    ) -> Option<String> {
        let tls = rustls_error(err)?;
        let mut text = match tls {
            rustls::Error::InvalidCertificate(problem) => format!(
                "TLS certificate problem connecting to {backend} at {target}: the server's certificate was refused: {}",
                certificate_problem(problem)
            ),
            other => format!("TLS handshake with {backend} at {target} failed: {other}"),
        };
        if let rustls::Error::InvalidCertificate(problem) = tls {
            use rustls::CertificateError as C;
            match problem {
                C::UnknownIssuer | C::BadSignature | C::UnknownRevocationStatus => {
                    text.push_str(&self.trusted());
                    text.push_str(
                        "; if a private CA issued the server's certificate, set `tls.ca_file` to that CA's certificate (PEM)",
                    );
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => text.push_str(
                    "; connect with the name the certificate was issued for (for PostgreSQL, `sslmode=verify-ca` checks the chain but not the name)",
                ),
                _ => {}
            }
        } else {
            text.push_str(" (does the server speak TLS on that port?)");
        }
        Some(text)
    }

    /// What is trusted, for [`Tls::explain`].
    fn trusted(&self) -> String {
        let platform = platform();
        let mut text = if platform.certificates.is_empty() {
            let mut empty = String::from(
                ". The platform's certificate store is empty (no CA certificates found by rustls-native-certs",
            );
            if !platform.errors.is_empty() {
                empty.push_str(": ");
                empty.push_str(&platform.errors.join("; "));
            }
            empty.push(')');
            empty
        } else {
            format!(
                ". Trusted: the platform's {} root certificates",
                platform.certificates.len()
            )
        };
        match &self.inner.ca_file {
            Some(file) => text.push_str(&format!(
                " and the {} of tls.ca_file {}",
                plural(self.inner.ca.len(), "certificate"),
                file.display()
            )),
            None => text.push_str(", no tls.ca_file"),
        }
        text
    }

    /// [`Tls::explain`]'s message for `err` as an error, or `err` with
    /// `what` as context.
    pub fn error<E>(&self, backend: &str, target: &str, what: &str, err: E) -> anyhow::Error
    where
        E: StdError + Send + Sync + 'static,
    {
        match self.explain(backend, target, &err) {
            Some(text) => anyhow::anyhow!("{text}"),
            None => anyhow::Error::new(err).context(format!("{what} {backend} at {target}")),
        }
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The rustls error in `err`'s chain, looking inside I/O errors (which
/// hide their inner error from `source`).
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = rustls_error(inner)
        {
            return Some(tls);
        }
        // The Redis client keeps its causes behind an `Arc`, whose
        // `source` skips the error it holds.
        if let Some(shared) = e.downcast_ref::<Arc<dyn StdError + Send + Sync>>()
            && let Some(tls) = rustls_error(&**shared)
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// A certificate error in words.
fn certificate_problem(problem: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match problem {
        C::UnknownIssuer => "it is not issued by a CA Sandpipe trusts (unknown issuer)".into(),
        C::NotValidForName => "it is not valid for the host name connected to".into(),
        C::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "it is not valid for {}: it names {}",
            expected.to_str(),
            if presented.is_empty() {
                "nothing".to_owned()
            } else {
                presented
                    .iter()
                    .map(|name| {
                        // rustls spells a DNS name `DnsName("host")`.
                        name.strip_prefix("DnsName(\"")
                            .and_then(|n| n.strip_suffix("\")"))
                            .unwrap_or(name)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        C::Expired | C::ExpiredContext { .. } => format!("it has expired: {problem}"),
        C::NotValidYet | C::NotValidYetContext { .. } => format!("it is not valid yet: {problem}"),
        other => other.to_string(),
    }
}

/// Append `certificate` to `out` as a PEM `CERTIFICATE` section.
fn pem_encode(certificate: &CertificateDer<'_>, out: &mut Vec<u8>) {
    let text = base64::engine::general_purpose::STANDARD.encode(certificate.as_ref());
    out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;

    #[test]
    fn the_pem_bundle_reads_back_as_the_same_certificates() {
        let ders: Vec<CertificateDer<'static>> = vec![
            CertificateDer::from((0u8..=200).collect::<Vec<u8>>()),
            CertificateDer::from(vec![7u8; 3]),
        ];
        let mut pem = Vec::new();
        for d in &ders {
            pem_encode(d, &mut pem);
        }
        let back: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        assert_eq!(back, ders);
    }

    #[test]
    fn a_ca_file_whose_certificate_cannot_be_a_trust_anchor_is_refused_naming_it()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n",
        )?;
        let config = Config::parse(
            &dir.path().join("sandpipe.yaml"),
            "listener: { type: dir, path: s }\ntls: { ca_file: ca.pem }\n",
        )?;
        let err = Tls::new(&config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("tls.ca_file"), "{err}");
        assert!(err.contains("certificate 1 of"), "{err}");
        assert!(err.contains("ca.pem"), "{err}");
        Ok(())
    }

    #[test]
    fn certificate_failures_are_found_inside_io_errors_and_explained() {
        let tls = Tls::default();
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let text = tls
            .explain("RabbitMQ", "amqps://guest:***@h/%2f", &io)
            .unwrap_or_default();
        assert!(text.contains("TLS certificate problem"), "{text}");
        assert!(
            text.contains("RabbitMQ at amqps://guest:***@h/%2f"),
            "{text}"
        );
        assert!(text.contains("tls.ca_file"), "{text}");
        let wrapped = anyhow::Error::new(io).context("connecting");
        assert!(
            tls.explain("x", "y", wrapped.as_ref()).is_some(),
            "found through a context"
        );
        let shared: Arc<dyn StdError + Send + Sync> = Arc::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(
            tls.explain("Redis", "y", &shared).is_some(),
            "found behind an Arc"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(tls.explain("x", "y", &plain).is_none());
    }
}
