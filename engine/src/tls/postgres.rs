//! TLS for PostgreSQL: a tokio-postgres `MakeTlsConnect` on tokio-rustls,
//! one per `sslmode`, used by every connection the engine makes to the
//! server — the admin pool, start-up connections, each plugin role's pool
//! and the cancel requests of statements past their deadline.
//!
//! What each mode checks, as libpq does:
//!
//! | `sslmode` | TLS | chain to a trusted root | host name |
//! |---|---|---|---|
//! | `disable` | no | — | — |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | no | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! `require` and `prefer` encrypt but accept any certificate (libpq's
//! meaning when no root certificate is configured): they do not protect
//! from an impostor. Use `verify-full`. Whatever the mode, the server's
//! handshake signatures are verified against the certificate it shows.
//!
//! The client offers the ALPN protocol `postgresql` (as libpq 17 does), so
//! `sslnegotiation=direct` works too. It offers no channel binding
//! (`tls-server-end-point`): SCRAM logs in without `-PLUS`, and a URL with
//! `channel_binding=require` fails.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::{Tls, provider};
use crate::config::PgSslMode;

/// The TLS connector of one PostgreSQL `sslmode`.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
    mode: PgSslMode,
    /// What is trusted, for messages.
    tls: Tls,
}

impl PgTls {
    /// If `err` is a TLS failure, what to tell the user (see
    /// [`Tls::explain`]); `target` is the server without a password.
    pub fn explain(&self, target: &str, err: &(dyn std::error::Error + 'static)) -> Option<String> {
        self.tls.explain(
            "PostgreSQL",
            &format!("{target} (sslmode={})", self.mode.name()),
            err,
        )
    }
}

impl Tls {
    /// The PostgreSQL connector for `mode` (for `disable`, one that is
    /// never asked to connect).
    pub fn postgres(&self, mode: PgSslMode) -> anyhow::Result<PgTls> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("cannot configure TLS: {e}"))?;
        let mut config = match mode {
            PgSslMode::VerifyFull => builder
                .with_root_certificates(self.roots()?)
                .with_no_client_auth(),
            PgSslMode::VerifyCa => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unnamed {
                    roots: Some(self.roots()?),
                    provider,
                }))
                .with_no_client_auth(),
            // libpq's `require` and `prefer`: encrypted, no certificate check.
            PgSslMode::Require | PgSslMode::Prefer | PgSslMode::Disable => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unnamed {
                    roots: None,
                    provider,
                }))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(PgTls {
            config: Arc::new(config),
            mode,
            tls: self.clone(),
        })
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{domain}` is not a host name TLS can check: {e}"),
            )
        })?;
        Ok(PgTlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

/// One handshake to come.
pub struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = self.connector.connect(self.name, stream).await?;
            Ok(PgTlsStream(Box::new(stream)))
        })
    }
}

/// A TLS session with the server.
pub struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> tokio_postgres::tls::TlsStream for PgTlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// The certificate check of `verify-ca` (with `roots`: the chain must lead
/// to a trusted root; the name is not looked at) and of `require` /
/// `prefer` (without: any certificate, libpq's meaning). Either way the
/// handshake's signatures are verified against the certificate.
#[derive(Debug)]
struct Unnamed {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unnamed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let certificate = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &certificate,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
