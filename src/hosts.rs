//! Host patterns: which requests belong to which provider.
//!
//! A pattern is an exact host (`api.example.com`, `127.0.0.1`, `[::1]`) or a wildcard over
//! subdomains (`*.example.net`, which matches `a.example.net` and `a.b.example.net` but not
//! `example.net` itself), optionally narrowed to one port (`api.example.com:8443`). Matching is
//! case-insensitive and ignores a trailing dot.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    kind: Kind,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Exact(String),
    /// Holds the suffix with its leading dot: `.example.net`.
    Subdomains(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostPatternError {
    #[error("empty host")]
    Empty,
    #[error("invalid port {0:?}")]
    Port(String),
    #[error("a wildcard is only allowed as a whole first label, as in \"*.example.com\"")]
    Wildcard,
    #[error("invalid character in host")]
    Character,
}

/// Lower-cases a host and drops a trailing dot and IPv6 brackets, so that the forms a client may
/// send compare equal.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.trim_end_matches('.');
    // Hosts usually arrive lower-case already: no allocation on the request path then.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// Whether a host (a name, or an address with or without brackets) is this machine's loopback:
/// `localhost` and its subdomains, `127.0.0.0/8`, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = normalize_host(host);
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `host` as it stands before a `:port` in an authority: an IPv6 address in brackets.
pub fn bracketed(host: &str) -> std::borrow::Cow<'_, str> {
    if host.contains(':') { format!("[{host}]").into() } else { host.into() }
}

/// Splits `host[:port]`, understanding `[v6]:port`.
pub fn split_host_port(s: &str) -> Result<(&str, Option<u16>), HostPatternError> {
    let parse_port = |p: &str| p.parse::<u16>().map_err(|_| HostPatternError::Port(p.to_string()));
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(HostPatternError::Character)?;
        return match after {
            "" => Ok((v6, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((v6, Some(parse_port(port)?))),
                None => Err(HostPatternError::Character),
            },
        };
    }
    match s.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((h, _)) if h.contains(':') => Ok((s, None)),
        Some((h, port)) => Ok((h, Some(parse_port(port)?))),
        None => Ok((s, None)),
    }
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = split_host_port(s.trim())?;
        let host = normalize_host(host).into_owned();
        if host.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || "-._*:".contains(c)) {
            return Err(HostPatternError::Character);
        }
        let kind = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                Kind::Subdomains(format!(".{suffix}"))
            }
            _ if host.contains('*') => return Err(HostPatternError::Wildcard),
            _ => Kind::Exact(host),
        };
        Ok(HostPattern { kind, port })
    }
}

impl HostPattern {
    /// Whether this pattern names one host rather than a family of subdomains; exact patterns
    /// are tried before wildcards, so `api.example.com` beats `*.example.com`.
    pub fn is_exact(&self) -> bool {
        matches!(self.kind, Kind::Exact(_))
    }

    /// `host` must already be normalised (see [`normalize_host`]); `port` is the effective port
    /// (the scheme's default when the request named none).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.kind {
            Kind::Exact(h) => h == host,
            Kind::Subdomains(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Exact(h) if h.contains(':') => write!(f, "[{h}]")?,
            Kind::Exact(h) => f.write_str(h)?,
            Kind::Subdomains(s) => write!(f, "*{s}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, host: &str, port: u16) -> bool {
        pattern.parse::<HostPattern>().unwrap().matches(&normalize_host(host), port)
    }

    #[test]
    fn exact_hosts_match_case_insensitively_on_any_port() {
        assert!(m("api.example.com", "API.Example.com", 443));
        assert!(m("api.example.com", "api.example.com.", 80));
        assert!(!m("api.example.com", "xapi.example.com", 443));
        assert!(!m("api.example.com", "api.example.com.evil.net", 443));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        assert!(m("*.example.net", "a.example.net", 443));
        assert!(m("*.example.net", "a.b.example.net", 443));
        assert!(!m("*.example.net", "example.net", 443));
        assert!(!m("*.example.net", "badexample.net", 443));
    }

    #[test]
    fn a_port_narrows_the_pattern() {
        assert!(m("api.example.com:8443", "api.example.com", 8443));
        assert!(!m("api.example.com:8443", "api.example.com", 443));
        assert!(m("127.0.0.1:9000", "127.0.0.1", 9000));
        assert!(m("[::1]:9000", "[::1]", 9000));
        assert!(m("::1", "[::1]", 1));
    }

    #[test]
    fn a_host_and_port_split_and_an_ipv6_host_is_bracketed_again() {
        assert_eq!(split_host_port("api.example.com:8080"), Ok(("api.example.com", Some(8080))));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1", Some(80))));
        assert_eq!(split_host_port("example.com"), Ok(("example.com", None)));
        assert_eq!(split_host_port("::1"), Ok(("::1", None)));
        assert!(split_host_port("example.com:http").is_err());
        assert_eq!((bracketed("::1"), bracketed("a.test")), ("[::1]".into(), "a.test".into()));
    }

    #[test]
    fn malformed_patterns_are_rejected_with_a_reason() {
        assert_eq!("".parse::<HostPattern>(), Err(HostPatternError::Empty));
        assert_eq!("a.*.com".parse::<HostPattern>(), Err(HostPatternError::Wildcard));
        assert_eq!("*".parse::<HostPattern>(), Err(HostPatternError::Wildcard));
        assert!(matches!("host:99999".parse::<HostPattern>(), Err(HostPatternError::Port(_))));
        assert_eq!("ho st".parse::<HostPattern>(), Err(HostPatternError::Character));
        assert_eq!("*.example.com".parse::<HostPattern>().unwrap().to_string(), "*.example.com");
    }
}
