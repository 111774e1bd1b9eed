//! Where a request is going, in normal form.

use http::uri::{Authority, Scheme};

use crate::errors::ProxyError;
use crate::hosts::normalize_host;

/// Where a request is going, in normal form: made once, where the request enters, and used for
/// matching, dialling, SNI, the leaf certificate and the logs alike.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: Scheme,
    /// The port the connection goes to (the scheme's default when the authority names none).
    pub port: u16,
    /// `host[:port]` with the host in normal form, as dialled and as sent in `Host`.
    pub authority: Authority,
    /// Where the host is in `authority`, without IPv6 brackets: found once, read by every step.
    host_at: (usize, usize),
    /// The authority names its port (`port` is not just the scheme's default).
    explicit_port: bool,
}

impl Target {
    /// From an authority as a client wrote it. Userinfo is refused (RFC 9110 §4.2.4): it would
    /// otherwise hide the port from a reader that splits the string, and it is a credential that
    /// must not travel on or reach a log. The error never repeats the authority it refuses.
    pub fn new(scheme: Scheme, authority: &Authority) -> Result<Target, ProxyError> {
        let text = authority.as_str();
        if text.contains('@') {
            return Err(ProxyError::BadTarget(
                "the request target carries user credentials (user:password@host); \
                 send credentials in a header instead"
                    .into(),
            ));
        }
        let given = strip_brackets(authority.host());
        let host = normalize_host(given);
        if host.is_empty() {
            return Err(ProxyError::BadTarget("the request target has no host".into()));
        }
        // `Authority` takes any text after the colon, and reads a port that is not one as none:
        // `api.test:99999` would go to port 80. An empty port is the default (RFC 3986 §3.2.3).
        let after_host = &text[text.rfind(']').map_or(0, |bracket| bracket + 1)..];
        let explicit_port = match after_host.rsplit_once(':') {
            Some((_, "")) | None => None,
            Some((_, port)) => match port.parse::<u16>() {
                Ok(number) if number > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Some(number),
                _ => {
                    let why = "the request target's port is not a number from 1 to 65535";
                    return Err(ProxyError::BadTarget(why.into()));
                }
            },
        };
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let port = explicit_port.unwrap_or(default_port);
        if host == given {
            // Already in normal form, as almost every client sends it: no allocation.
            let start = given.as_ptr() as usize - text.as_ptr() as usize;
            let host_at = (start, start + given.len());
            return Ok(Target {
                scheme,
                port,
                authority: authority.clone(),
                host_at,
                explicit_port: explicit_port.is_some(),
            });
        }
        Target::from_parts(scheme, &host, port, explicit_port.is_some())
    }

    fn from_parts(scheme: Scheme, host: &str, port: u16, show_port: bool) -> Result<Target, ProxyError> {
        let bracketed = crate::hosts::bracketed(host);
        let start = usize::from(bracketed.len() != host.len());
        let text = if show_port { format!("{bracketed}:{port}") } else { bracketed.into_owned() };
        let authority = text
            .parse::<Authority>()
            .map_err(|_| ProxyError::BadTarget("the request target's host is not a valid name".into()))?;
        Ok(Target { scheme, port, authority, host_at: (start, start + host.len()), explicit_port: show_port })
    }

    /// The host in normal form: lower case, no trailing dot, no IPv6 brackets
    /// (`api.example.com`, `::1`).
    pub fn host(&self) -> &str {
        &self.authority.as_str()[self.host_at.0..self.host_at.1]
    }

    /// What the `Host` header says: the authority, without the port when it is the scheme's
    /// default.
    pub fn host_header(&self) -> &str {
        let default_port = if self.scheme == Scheme::HTTPS { 443 } else { 80 };
        if self.explicit_port && self.port == default_port {
            let end = self.host_at.1 + usize::from(self.authority.as_str().as_bytes()[0] == b'[');
            &self.authority.as_str()[..end]
        } else {
            self.authority.as_str()
        }
    }

    /// The same host over TLS: an explicit port 80 becomes 443, another explicit port is kept.
    pub(crate) fn upgraded_to_https(&self) -> Target {
        let (port, show) = match (self.explicit_port, self.port) {
            (false, _) | (true, 80) => (443, false),
            (true, p) => (p, true),
        };
        Target::from_parts(Scheme::HTTPS, self.host(), port, show).unwrap_or_else(|_| self.clone())
    }
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(scheme: Scheme, authority: &str) -> Target {
        Target::new(scheme, &authority.parse().unwrap()).unwrap()
    }

    #[test]
    fn a_target_knows_its_host_port_and_host_header_in_every_form() {
        // (scheme, as written, host, port, Host header, authority dialled)
        let cases = [
            (Scheme::HTTP, "api.example.com", "api.example.com", 80, "api.example.com", "api.example.com"),
            (
                Scheme::HTTP,
                "API.Example.COM.:8080",
                "api.example.com",
                8080,
                "api.example.com:8080",
                "api.example.com:8080",
            ),
            (
                Scheme::HTTP,
                "api.example.com:80",
                "api.example.com",
                80,
                "api.example.com",
                "api.example.com:80",
            ),
            (
                Scheme::HTTPS,
                "api.example.com:443",
                "api.example.com",
                443,
                "api.example.com",
                "api.example.com:443",
            ),
            (
                Scheme::HTTPS,
                "api.example.com:80",
                "api.example.com",
                80,
                "api.example.com:80",
                "api.example.com:80",
            ),
            (Scheme::HTTP, "127.0.0.1:18080", "127.0.0.1", 18080, "127.0.0.1:18080", "127.0.0.1:18080"),
            (Scheme::HTTP, "[::1]:8080", "::1", 8080, "[::1]:8080", "[::1]:8080"),
            (Scheme::HTTP, "[::1]:80", "::1", 80, "[::1]", "[::1]:80"),
            (Scheme::HTTPS, "[::1]", "::1", 443, "[::1]", "[::1]"),
            (Scheme::HTTPS, "[::FFFF:7F00:1]", "::ffff:7f00:1", 443, "[::ffff:7f00:1]", "[::ffff:7f00:1]"),
        ];
        for (scheme, written, host, port, host_header, authority) in cases {
            let t = target(scheme, written);
            assert_eq!(
                (t.host(), t.port, t.host_header(), t.authority.as_str()),
                (host, port, host_header, authority),
                "{written}"
            );
        }
        let refused = Target::new(Scheme::HTTP, &"user:pw@api.example.com".parse().unwrap()).unwrap_err();
        assert!(!refused.to_string().contains("pw"), "{refused}");
    }

    #[test]
    fn a_port_that_is_not_one_is_refused_not_read_as_the_default() {
        for bad in ["api.test:99999", "api.test:8o", "api.test:+80", "api.test:0", "[::1]:x"] {
            let authority = Authority::try_from(bad).unwrap();
            let refused = Target::new(Scheme::HTTP, &authority).unwrap_err().to_string();
            assert!(refused.contains("port is not a number"), "{bad}: {refused}");
        }
        // An empty port is the scheme's default (RFC 3986 §3.2.3); leading zeros are digits.
        assert_eq!(target(Scheme::HTTP, "api.test:").port, 80);
        assert_eq!(target(Scheme::HTTP, "[::1]:0443").port, 443);
    }

    #[test]
    fn upgraded_to_https_keeps_an_explicit_port_other_than_80() {
        let up = |a| target(Scheme::HTTP, a).upgraded_to_https();
        assert_eq!(
            (up("api.example.com").authority.as_str(), up("api.example.com").port),
            ("api.example.com", 443)
        );
        assert_eq!(up("api.example.com:80").authority.as_str(), "api.example.com");
        let kept = up("API.example.com:8443");
        assert_eq!(
            (kept.host(), kept.port, kept.authority.as_str()),
            ("api.example.com", 8443, "api.example.com:8443")
        );
    }
}
