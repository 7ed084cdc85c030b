//! The `http` grant: where a plugin's outbound requests (`wasi:http`) may
//! go, in the form operators know from Spin's `allowed_outbound_hosts`.
//!
//! ```yaml
//! http:
//!   allow:
//!     - https://api.example.org          # that host, port 443
//!     - https://*.example.org:8443       # any subdomain, port 8443
//!     - http://127.0.0.1:8080            # a loopback address, named literally
//!     - https://10.1.0.0/16:8000..8100   # a private range, ports 8000-8099
//! ```
//!
//! An entry is `SCHEME://HOST[:PORT]`: the scheme is required (`http`,
//! `https`, or `*` for both); the host is a name, `*` (any name), `*.domain`
//! (any subdomain of `domain`, not `domain` itself), an IP address (IPv6 in
//! brackets), or an address range in CIDR form (`10.0.0.0/8`,
//! `[fd00::]/8`); the port is a number, `*`, or a range `A..B` (`B`
//! excluded, as in Spin), and defaults to the scheme's (80, 443). No path,
//! query or user info.
//!
//! Names are matched before the request; the addresses a name resolves to
//! are checked after: loopback, private, link-local, unspecified and other
//! special-purpose addresses are refused unless an entry names that
//! address or a range holding it literally (see [`is_special`]).

use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

/// The `http` grant of one plugin.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    /// Where requests may go. Empty: every request is denied (the grant
    /// then only documents that the plugin was considered).
    #[serde(default)]
    pub allow: Vec<AllowedHost>,
    /// Credentials the engine adds to requests to a destination (a key in
    /// the `allow` form), from the top-level `secrets:`; the plugin never
    /// sees them. The first matching destination, in the order written,
    /// applies; its header replaces one the plugin set.
    #[serde(default, deserialize_with = "auth_map")]
    pub auth: Vec<(AllowedHost, HttpAuth)>,
}

/// How the engine authenticates requests to one destination. Each names
/// secrets of the top-level `secrets:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "AuthSpec")]
pub enum HttpAuth {
    /// `bearer: SECRET`: `Authorization: Bearer <secret>`.
    Bearer(String),
    /// `header: { NAME: SECRET, ... }`: each header set to its secret.
    Header(std::collections::BTreeMap<String, String>),
    /// `basic: { user: NAME, password: SECRET }`: `Authorization: Basic
    /// base64(user:secret)`; the user name is written as it is.
    Basic {
        /// The user name (not a secret).
        user: String,
        /// The secret holding the password.
        password: String,
    },
    /// `oauth_user: SERVICENAME`: the OAuth access token of the user the
    /// request names (its `x-sandpipe-user` header, which the engine
    /// removes) for service SERVICENAME of the token storage
    /// (`token_storage:`), as `Authorization: Bearer <token>`; fetched,
    /// refreshed when expired and cached by the engine.
    OauthUser(String),
}

/// `HttpAuth` as written: a map with exactly one of its keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSpec {
    bearer: Option<String>,
    header: Option<std::collections::BTreeMap<String, String>>,
    basic: Option<BasicSpec>,
    oauth_user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicSpec {
    user: String,
    password: String,
}

impl TryFrom<AuthSpec> for HttpAuth {
    type Error = String;

    fn try_from(spec: AuthSpec) -> Result<Self, String> {
        match (spec.bearer, spec.header, spec.basic, spec.oauth_user) {
            (Some(secret), None, None, None) => Ok(Self::Bearer(secret)),
            (None, Some(headers), None, None) if !headers.is_empty() => Ok(Self::Header(headers)),
            (None, None, Some(BasicSpec { user, password }), None) => {
                Ok(Self::Basic { user, password })
            }
            (None, None, None, Some(service)) if !service.is_empty() => {
                Ok(Self::OauthUser(service))
            }
            _ => Err(
                "give exactly one of `bearer: SECRET`, `header: { NAME: SECRET }`, \
                      `basic: { user: NAME, password: SECRET }` and `oauth_user: SERVICENAME`"
                    .into(),
            ),
        }
    }
}

impl HttpAuth {
    /// The secrets this names.
    pub fn secrets(&self) -> Vec<&str> {
        match self {
            Self::Bearer(secret) => vec![secret.as_str()],
            Self::Header(headers) => headers.values().map(String::as_str).collect(),
            Self::Basic { password, .. } => vec![password.as_str()],
            Self::OauthUser(_) => Vec::new(),
        }
    }

    /// The header names this sets, lowercase.
    pub fn header_names(&self) -> Vec<String> {
        match self {
            Self::Bearer(_) | Self::Basic { .. } | Self::OauthUser(_) => {
                vec!["authorization".into()]
            }
            Self::Header(headers) => headers.keys().map(|k| k.to_ascii_lowercase()).collect(),
        }
    }
}

/// Headers the engine sets itself or that only hops use: never set from a
/// secret.
pub const RESERVED_HEADERS: [&str; 10] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "http2-settings",
];

fn auth_map<'de, D>(de: D) -> Result<Vec<(AllowedHost, HttpAuth)>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    // In the order written: a map that keeps it.
    struct Ordered;
    impl<'de> serde::de::Visitor<'de> for Ordered {
        type Value = Vec<(AllowedHost, HttpAuth)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of destinations (`https://host`) to `bearer`, `header` or `basic`")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                let host = AllowedHost::try_from(key).map_err(serde::de::Error::custom)?;
                let auth = map.next_value::<HttpAuth>()?;
                out.push((host, auth));
            }
            Ok(out)
        }
    }
    de.deserialize_map(Ordered)
}

impl HttpGrant {
    /// The credentials for a request to `scheme://host:port`, if any.
    pub fn auth_for(&self, scheme: &str, host: &str, port: u16) -> Option<&HttpAuth> {
        self.auth
            .iter()
            .find(|(a, _)| a.matches(scheme, host, port))
            .map(|(_, auth)| auth)
    }

    /// The first entry allowing a request to `scheme://host:port`, where
    /// `host` is the request's host as written (a name, or an IP address
    /// without brackets).
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> Option<&AllowedHost> {
        self.allow.iter().find(|a| a.matches(scheme, host, port))
    }

    /// Whether an entry that allows `scheme` and `port` names `ip` (or a
    /// range holding it) literally: then a special-purpose address may be
    /// connected to.
    pub fn names_address(&self, scheme: &str, ip: IpAddr, port: u16) -> bool {
        self.allow.iter().any(|a| {
            a.scheme.matches(scheme)
                && a.port.matches(port, scheme)
                && match &a.host {
                    HostPattern::Range(range) => range.contains(ip),
                    _ => false,
                }
        })
    }
}

/// One entry of `http.allow`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AllowedHost {
    /// The entry as written.
    pub text: String,
    scheme: SchemePattern,
    host: HostPattern,
    port: PortPattern,
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemePattern {
    Http,
    Https,
    Any,
}

impl SchemePattern {
    fn matches(self, scheme: &str) -> bool {
        match self {
            Self::Http => scheme.eq_ignore_ascii_case("http"),
            Self::Https => scheme.eq_ignore_ascii_case("https"),
            Self::Any => {
                scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`: any name (never an IP address written in the request).
    AnyName,
    /// `*.domain`: any name ending in `.domain`.
    Subdomains(String),
    /// One name, lowercase.
    Name(String),
    /// An address or an address range.
    Range(IpRange),
}

/// An address range in CIDR form (a single address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    base: IpAddr,
    prefix: u8,
}

impl IpRange {
    fn new(base: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if base.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("a prefix length of {prefix} is more than {max}"));
        }
        Ok(Self { base, prefix })
    }

    /// Whether the range is one address.
    pub fn is_single(&self) -> bool {
        self.prefix == if self.base.is_ipv4() { 32 } else { 128 }
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.base, ip) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(base) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(base) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    /// The scheme's port (80 for http, 443 for https).
    Default,
    Any,
    /// `start..end`, `end` excluded; one port is `n..n+1`.
    Range(u16, u32),
}

impl PortPattern {
    fn matches(self, port: u16, scheme: &str) -> bool {
        match self {
            Self::Default => port == default_port(scheme),
            Self::Any => true,
            Self::Range(start, end) => port >= start && u32::from(port) < end,
        }
    }
}

/// The port a URL of `scheme` has when it names none.
pub fn default_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("http") {
        80
    } else {
        443
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is an address a request must not reach unless the
/// allow-list names it: loopback, private (RFC 1918, unique local),
/// link-local (169.254.0.0/16 with the cloud metadata services, fe80::/10),
/// unspecified, shared (100.64.0.0/10), benchmarking, documentation,
/// 6to4 and Teredo (which carry IPv4 addresses),
/// multicast, broadcast and reserved addresses. IPv4-mapped IPv6
/// addresses are judged as the IPv4 address they carry.
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || first == 0x2001 && v6.segments()[1] == 0x0db8 // documentation
                || first == 0x0064 && v6.segments()[1] == 0xff9b // NAT64
                || first == 0x2002 // 6to4: carries an IPv4 address
                || first == 0x2001 && v6.segments()[1] == 0 // Teredo
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible
        }
    }
}

impl AllowedHost {
    /// How requests this entry allowed are named in the metrics: the one
    /// host or address the entry names (as the entry writes it, however
    /// the request spelt it), else the entry's pattern (`*.example.org`, `*`, `10.0.0.0/8`), so a
    /// plugin cannot make the metrics grow with names of its choosing.
    pub fn metric_host(&self) -> String {
        match &self.host {
            HostPattern::Name(name) => name.clone(),
            HostPattern::Range(r) if r.is_single() => r.base.to_string(),
            HostPattern::AnyName => "*".into(),
            HostPattern::Subdomains(domain) => format!("*{domain}"),
            HostPattern::Range(r) => format!("{}/{}", r.base, r.prefix),
        }
    }

    /// Why this entry cannot be a destination a secret is bound to
    /// (`http.auth`), if it cannot: the secret must go to hosts the
    /// operator names, over TLS — so no `*` host, no range wider than one
    /// address, no `*` scheme, and `http` only to a loopback address named
    /// literally (nothing lies between the engine and it).
    pub fn auth_problem(&self) -> Option<String> {
        match &self.host {
            HostPattern::AnyName => {
                return Some("a `*` host would send the secret wherever the plugin asks".into());
            }
            HostPattern::Range(r) if !r.is_single() => {
                return Some("an address range would send the secret to any address in it".into());
            }
            _ => {}
        }
        let loopback = matches!(&self.host, HostPattern::Range(r) if r.base.is_loopback());
        match self.scheme {
            SchemePattern::Https => None,
            SchemePattern::Http if loopback => None,
            SchemePattern::Http => Some(
                "plain `http` would send the secret in clear text (allowed only to a loopback \
                 address named literally)"
                    .into(),
            ),
            SchemePattern::Any => Some("bind the secret to `https://`, not `*://`".into()),
        }
    }

    /// Whether a request to `scheme://host:port` matches this entry.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        if !self.scheme.matches(scheme) || !self.port.matches(port, scheme) {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => matches!(&self.host, HostPattern::Range(r) if r.contains(ip)),
            Err(_) => {
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                match &self.host {
                    HostPattern::AnyName => true,
                    HostPattern::Subdomains(domain) => host
                        .strip_suffix(domain.as_str())
                        .is_some_and(|rest| !rest.is_empty()),
                    HostPattern::Name(name) => *name == host,
                    HostPattern::Range(_) => false,
                }
            }
        }
    }
}

impl TryFrom<String> for AllowedHost {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        parse(&text).map_err(|why| {
            format!(
                "`{text}` is not an allowed host ({why}); write SCHEME://HOST[:PORT], e.g. \
                 `https://api.example.org`, `https://*.example.org:8443`, `http://127.0.0.1:8080`"
            )
        })
    }
}

fn parse(text: &str) -> Result<AllowedHost, String> {
    let (scheme, rest) = text
        .split_once("://")
        .ok_or("the scheme is missing (`https://`, `http://` or `*://`)")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => SchemePattern::Http,
        "https" => SchemePattern::Https,
        "*" => SchemePattern::Any,
        other => return Err(format!("scheme `{other}` is not http, https or *")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    const ONLY: &str = "only a scheme, a host and a port: no path, query or user info";
    if rest.contains(['?', '#', '@']) {
        return Err(ONLY.into());
    }
    // A `/` belongs only to a range's prefix length (`10.0.0.0/8:80`).
    if let Some(i) = rest.find('/') {
        let digits = rest[i + 1..].split(':').next().unwrap_or_default();
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(ONLY.into());
        }
    }
    // The host, and what follows it (`:port`).
    let (host, after) = if let Some(inner) = rest.strip_prefix('[') {
        let end = inner.find(']').ok_or("`[` without `]`")?;
        let address = &inner[..end];
        let mut after = &inner[end + 1..];
        let mut prefix = None;
        if let Some(p) = after.strip_prefix('/') {
            let digits = p.find(':').map_or(p, |i| &p[..i]);
            prefix = Some(digits);
            after = &p[digits.len()..];
        }
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IPv6 address"))?;
        (range(ip, prefix)?, after)
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if host.contains(':') {
            return Err("an IPv6 address goes in brackets: `[::1]:8080`".into());
        }
        let after = port.map_or("", |_| &rest[host.len()..]);
        (host_pattern(host)?, after)
    };
    let port = match after.strip_prefix(':') {
        None if after.is_empty() => PortPattern::Default,
        None => return Err(format!("unexpected `{after}` after the host")),
        Some("*") => PortPattern::Any,
        Some(p) => match p.split_once("..") {
            Some((start, end)) => {
                let start = port_number(start)?;
                let end = u32::from(port_number(end)?);
                if end <= u32::from(start) {
                    return Err(format!(
                        "the port range `{p}` is empty (its end is excluded)"
                    ));
                }
                PortPattern::Range(start, end)
            }
            None => {
                let n = port_number(p)?;
                PortPattern::Range(n, u32::from(n) + 1)
            }
        },
    };
    Ok(AllowedHost {
        text: text.to_owned(),
        scheme,
        host,
        port,
    })
}

fn range(ip: IpAddr, prefix: Option<&str>) -> Result<HostPattern, String> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .map_err(|_| format!("`/{p}` is not a prefix length"))?,
    };
    Ok(HostPattern::Range(IpRange::new(ip, prefix)?))
}

fn host_pattern(host: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if let Some((address, prefix)) = host.split_once('/') {
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IP address (only a range has a `/`)"))?;
        return range(ip, Some(prefix));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return range(ip, None);
    }
    if host == "*" {
        return Ok(HostPattern::AnyName);
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(domain) => (true, domain),
        None => (false, host),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!(
            "`{host}` is not a host name, `*`, `*.domain`, an IP address or a range"
        ));
    }
    Ok(if wild {
        HostPattern::Subdomains(format!(".{name}"))
    } else {
        HostPattern::Name(name)
    })
}

fn port_number(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{text}` is not a port (1-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> HttpGrant {
        HttpGrant {
            allow: entries
                .iter()
                .map(|e| AllowedHost::try_from((*e).to_owned()).unwrap_or_else(|e| panic!("{e}")))
                .collect(),
            auth: Vec::new(),
        }
    }

    #[test]
    fn names_ports_and_schemes_match_as_spin_writes_them() {
        let g = allow(&[
            "https://api.example.org",
            "https://*.example.net:8443",
            "http://127.0.0.1:8080",
            "*://svc.internal:*",
            "https://range.example:8000..8002",
        ]);
        assert!(g.allows("https", "api.example.org", 443).is_some());
        assert!(g.allows("https", "API.Example.org.", 443).is_some());
        assert!(g.allows("http", "api.example.org", 443).is_none());
        assert!(g.allows("https", "api.example.org", 8443).is_none());
        assert!(g.allows("https", "evil-api.example.org", 443).is_none());
        assert!(g.allows("https", "a.b.example.net", 8443).is_some());
        assert!(g.allows("https", "example.net", 8443).is_none());
        assert!(g.allows("https", "xexample.net", 8443).is_none());
        assert!(g.allows("http", "127.0.0.1", 8080).is_some());
        assert!(g.allows("http", "127.0.0.2", 8080).is_none());
        assert!(g.allows("http", "svc.internal", 1).is_some());
        assert!(g.allows("https", "svc.internal", 65535).is_some());
        assert!(g.allows("https", "range.example", 8001).is_some());
        assert!(g.allows("https", "range.example", 8002).is_none());
    }

    #[test]
    fn metrics_name_one_host_or_the_pattern_never_a_name_the_plugin_chose() {
        let g = allow(&[
            "https://api.example.org",
            "https://*.example.net",
            "https://*:8443",
            "http://10.1.0.0/16:*",
            "http://127.0.0.1:8080",
        ]);
        let label = |scheme: &str, host: &str, port: u16| {
            g.allows(scheme, host, port).map(|a| a.metric_host())
        };
        assert_eq!(
            label("https", "API.example.org", 443).as_deref(),
            Some("api.example.org")
        );
        assert_eq!(
            label("https", "x1.example.net", 443).as_deref(),
            Some("*.example.net")
        );
        assert_eq!(
            label("https", "random-1234.org", 8443).as_deref(),
            Some("*")
        );
        assert_eq!(
            label("http", "10.1.2.3", 80).as_deref(),
            Some("10.1.0.0/16")
        );
        assert_eq!(
            label("http", "127.0.0.1", 8080).as_deref(),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn a_secret_goes_only_to_named_hosts_over_tls_or_to_loopback() {
        let problem = |e: &str| {
            AllowedHost::try_from(e.to_owned())
                .unwrap_or_else(|e| panic!("{e}"))
                .auth_problem()
        };
        for fine in [
            "https://api.example.org",
            "https://*.example.org:8443",
            "https://10.0.0.1",
            "http://127.0.0.1:8080",
            "http://[::1]:80",
        ] {
            assert_eq!(problem(fine), None, "{fine}");
        }
        for (bad, why) in [
            ("https://*:*", "`*` host"),
            ("https://10.0.0.0/8", "address range"),
            ("http://api.example.org", "clear text"),
            ("*://api.example.org", "not `*://`"),
        ] {
            assert!(problem(bad).is_some_and(|p| p.contains(why)), "{bad}");
        }
    }

    #[test]
    fn any_name_never_matches_an_address_written_in_the_request() {
        let g = allow(&["https://*:*"]);
        assert!(g.allows("https", "example.org", 443).is_some());
        assert!(g.allows("https", "169.254.169.254", 80).is_none());
        assert!(g.allows("https", "[::1]", 443).is_none());
    }

    #[test]
    fn ranges_name_their_addresses_literally() {
        let g = allow(&[
            "http://10.1.0.0/16:*",
            "https://[fd00::]/8",
            "http://[::1]:9000",
        ]);
        assert!(g.allows("http", "10.1.200.3", 5).is_some());
        assert!(g.allows("http", "10.2.0.1", 5).is_none());
        assert!(g.names_address("http", "10.1.0.9".parse().unwrap(), 80));
        assert!(!g.names_address("https", "10.1.0.9".parse().unwrap(), 80));
        assert!(g.names_address("https", "fd12::1".parse().unwrap(), 443));
        assert!(g.allows("http", "[::1]", 9000).is_some());
        assert!(g.names_address("http", "::ffff:10.1.2.3".parse().unwrap(), 1));
    }

    #[test]
    fn bad_entries_are_refused_saying_why() {
        for (entry, why) in [
            ("api.example.org", "scheme is missing"),
            ("ftp://x.org", "scheme `ftp`"),
            ("https://x.org/path", "no path"),
            ("https://user@x.org", "no path"),
            ("https://", "host is empty"),
            ("https://x.*.org", "not a host name"),
            ("https://x.org:0", "not a port"),
            ("https://x.org:70000", "not a port"),
            ("https://x.org:9..9", "empty"),
            ("https://10.0.0.0/33", "prefix length"),
            ("https://[::1", "without `]`"),
            ("https://::1", "brackets"),
        ] {
            let err = AllowedHost::try_from(entry.to_owned()).unwrap_err();
            assert!(err.contains(why), "{entry}: {err}");
            assert!(err.contains(entry), "{entry}: {err}");
        }
    }

    #[test]
    fn special_addresses_are_the_ones_a_request_must_not_reach_by_name() {
        for special in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2002:7f00:1::",
            "2001:0:4136:e378::1",
            "255.255.255.255",
        ] {
            assert!(is_special(special.parse().unwrap()), "{special}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_special(public.parse().unwrap()), "{public}");
        }
    }
}
