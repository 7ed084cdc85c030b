//! `database.url` read as tokio-postgres reads it, plus the two `sslmode`
//! values of libpq that tokio-postgres does not know: `verify-ca` and
//! `verify-full`. Those are taken out here and handed on as `require` (the
//! wire protocol is the same: TLS or nothing); the engine then checks the
//! server's certificate as the mode asks.

/// How a PostgreSQL connection uses TLS (`sslmode`, as libpq spells it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, else plain; no certificate check
    /// (libpq's default, and tokio-postgres's).
    Prefer,
    /// TLS or no connection; no certificate check (as libpq without a root
    /// certificate: encrypted, but not protected from an impostor).
    Require,
    /// TLS, and the server's certificate chains to a trusted CA; its host
    /// name is not checked.
    VerifyCa,
    /// TLS, the certificate chains to a trusted CA and names the host.
    VerifyFull,
}

impl PgSslMode {
    /// The name libpq gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// `url` (a `postgres://` URL or libpq's `key=value` form) as a
/// tokio-postgres configuration, and its TLS mode. `sslmode=verify-ca` and
/// `sslmode=verify-full` become `require` in the configuration; the last
/// `sslmode` wins, as in tokio-postgres.
pub fn postgres_url(url: &str) -> Result<(tokio_postgres::Config, PgSslMode), String> {
    let (rewritten, verify) = strip_verify(url);
    let config: tokio_postgres::Config = rewritten.parse().map_err(|e| format!("{e}"))?;
    let mode = match (verify, config.get_ssl_mode()) {
        (Some(mode), _) => mode,
        (None, tokio_postgres::config::SslMode::Disable) => PgSslMode::Disable,
        (None, tokio_postgres::config::SslMode::Require) => PgSslMode::Require,
        (None, _) => PgSslMode::Prefer,
    };
    Ok((config, mode))
}

/// `url` with every `sslmode=verify-ca|verify-full` replaced by
/// `sslmode=require`, and the verify mode of the last `sslmode` if it was
/// one of those.
fn strip_verify(url: &str) -> (String, Option<PgSslMode>) {
    let mut out = String::with_capacity(url.len());
    let mut last = None;
    let mut rest = 0;
    for (key, value) in parameters(url) {
        if &url[key.clone()] != "sslmode" {
            continue;
        }
        let text = &url[value.clone()];
        let verify = match text.trim_matches('\'') {
            "verify-ca" => Some(PgSslMode::VerifyCa),
            "verify-full" => Some(PgSslMode::VerifyFull),
            _ => None,
        };
        last = verify;
        if verify.is_some() {
            out.push_str(&url[rest..value.start]);
            out.push_str("require");
            rest = value.end;
        }
    }
    out.push_str(&url[rest..]);
    (out, last)
}

/// The byte ranges of each parameter's key and value: the query of a URL,
/// or the `key=value` pairs of libpq's other form (a value may be
/// single-quoted). Stops at anything it does not understand, which
/// tokio-postgres then reports.
fn parameters(url: &str) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some(query) = url.find('?') else {
            return out;
        };
        let mut start = query + 1;
        for pair in url[query + 1..].split('&') {
            if let Some(eq) = pair.find('=') {
                out.push((start..start + eq, start + eq + 1..start + pair.len()));
            }
            start += pair.len() + 1;
        }
        return out;
    }
    let bytes = url.as_bytes();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            return out;
        }
        let key_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = key_start..i;
        i = skip_space(i);
        if bytes.get(i) != Some(&b'=') {
            return out;
        }
        i = skip_space(i + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return out,
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(bytes.len());
        }
        out.push((key, value_start..i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> Result<PgSslMode, String> {
        postgres_url(url).map(|(_, m)| m)
    }

    #[test]
    fn sslmode_is_read_in_both_forms() {
        let cases = [
            ("postgres://u@h/db", PgSslMode::Prefer),
            ("postgres://u@h/db?sslmode=disable", PgSslMode::Disable),
            ("postgres://u@h/db?sslmode=prefer", PgSslMode::Prefer),
            ("postgres://u@h/db?sslmode=require", PgSslMode::Require),
            ("postgres://u@h/db?sslmode=verify-ca", PgSslMode::VerifyCa),
            (
                "postgresql://u@h/db?application_name=x&sslmode=verify-full&connect_timeout=3",
                PgSslMode::VerifyFull,
            ),
            (
                "postgres://u@h/db?sslmode=verify-full&sslmode=disable",
                PgSslMode::Disable,
            ),
            (
                "postgres://u@h/db?sslmode=disable&sslmode=verify-ca",
                PgSslMode::VerifyCa,
            ),
            ("host=h user=u sslmode=verify-full", PgSslMode::VerifyFull),
            ("host=h sslmode = 'verify-ca' user=u", PgSslMode::VerifyCa),
            ("host=h sslmode=require", PgSslMode::Require),
            ("host=h user=u", PgSslMode::Prefer),
        ];
        for (url, want) in cases {
            assert_eq!(mode(url), Ok(want), "{url}");
        }
    }

    #[test]
    fn verify_modes_reach_tokio_postgres_as_require_and_nothing_else_changes() {
        let (config, _) =
            postgres_url("postgres://u:p%40ss@h:6432/db?sslmode=verify-full&application_name=a")
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(config.get_ports(), &[6432]);
        assert_eq!(config.get_application_name(), Some("a"));
        let (config, _) = postgres_url("host=h password='a b\\' c' sslmode=verify-ca dbname=d")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.get_password(), Some(&b"a b' c"[..]));
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn unknown_modes_and_lookalikes_are_still_refused() {
        for url in [
            "postgres://u@h/db?sslmode=allow-anything",
            "postgres://u@h/db?sslmode=verify",
            "host=h sslmode=verify-fullx",
            "postgres://u@h/db?xsslmode=verify-full",
        ] {
            assert!(mode(url).is_err(), "{url}");
        }
        // A password that merely contains the text is left alone.
        let (config, m) =
            postgres_url("postgres://u:sslmode=verify-full@h/db").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m, PgSslMode::Prefer);
        assert_eq!(config.get_password(), Some(&b"sslmode=verify-full"[..]));
    }
}
