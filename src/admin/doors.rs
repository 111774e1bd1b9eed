//! Who may use the admin API (SPEC §6), decided before any path is looked at.
//!
//! - The probes (`/healthz`, `/readyz`, `/metrics`) answer anyone who reaches the listener:
//!   kubelets and scrapers send the pod's address and no credentials.
//! - Everything else answers only a `Host` that is the listen address, a loopback name or address,
//!   or one of `[admin] hosts`: a page on `evil.example` whose name was re-pointed at this
//!   listener (DNS rebinding) gets `421` and learns nothing.
//! - And only a peer on a loopback address, or one that presents `[admin] token_file`'s token
//!   (`Authorization: Bearer`, or as the password of HTTP Basic, which a browser prompts for).
//!   Anyone else gets `401` and nothing is changed.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Request, Response, StatusCode, header};
use serde_json::json;

use crate::body::ProxyBody;
use crate::config::AdminAccess;

/// The paths every peer may use.
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

pub struct Doors {
    listen: SocketAddr,
    access: AdminAccess,
}

impl Doors {
    pub fn new(listen: SocketAddr, access: AdminAccess) -> Doors {
        Doors { listen, access }
    }

    /// `Ok` when `req` from `peer` may go on to its path; the refusal otherwise.
    pub fn check<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<(), Box<Response<ProxyBody>>> {
        if is_probe(req.uri().path()) {
            return Ok(());
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if !host.is_some_and(|h| self.host_allowed(h)) {
            return Err(Box::new(crate::body::json(
                StatusCode::MISDIRECTED_REQUEST,
                &json!({
                    "error": "misdirected_host",
                    "reason": "this admin API answers only its listen address, loopback names and [admin] hosts",
                    "action": "use the listen address, or add the name you use to [admin] hosts",
                }),
            )));
        }
        if peer.ip().to_canonical().is_loopback() || self.presents_token(req) {
            return Ok(());
        }
        let mut refusal = crate::body::json(
            StatusCode::UNAUTHORIZED,
            &json!({
                "error": "unauthorized",
                "reason": "only loopback peers, or requests with the [admin] token_file token, may use this path",
                "action": if self.access.token_file.is_some() {
                    "send Authorization: Bearer <admin token> (a browser: the token as the password), or use kubectl port-forward"
                } else {
                    "use it from the same host (kubectl port-forward), or set [admin] token_file"
                },
            }),
        );
        refusal.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokenproxy admin\", charset=\"UTF-8\""),
        );
        refusal
            .headers_mut()
            .append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tokenproxy admin\""));
        Err(Box::new(refusal))
    }

    /// `host[:port]` names this listener: its own address, loopback, or a configured name.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Ok((name, port)) = crate::hosts::split_host_port(host.trim()) else { return false };
        if crate::hosts::is_loopback_host(name) {
            return true;
        }
        let name = crate::hosts::normalize_host(name);
        if let Ok(ip) = name.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            let listen = self.listen.ip().to_canonical();
            // An address is not a name that can be re-pointed; this listener's own addresses are
            // the only ones a browser can reach it by.
            return ip == listen || (listen.is_unspecified() && crate::egress::is_local_address(ip));
        }
        self.access.hosts.iter().any(|(allowed, only)| *allowed == name && (only.is_none() || *only == port))
    }

    fn presents_token<B>(&self, req: &Request<B>) -> bool {
        let Some(file) = &self.access.token_file else { return false };
        let Some(presented) = presented_token(req) else { return false };
        // Read each time: a rotated token works at once, and none is kept in memory for long.
        let Ok(expected) = std::fs::read_to_string(file) else {
            tracing::warn!(path = %file.display(), "[admin] token_file cannot be read; refusing token-bearing admin requests");
            return false;
        };
        let expected = expected.trim();
        !expected.is_empty()
            && aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), presented.as_bytes())
                .is_ok()
    }
}

/// `Authorization: Bearer T`, or Basic with T as the password (any user name).
fn presented_token<B>(req: &Request<B>) -> Option<String> {
    use base64::Engine;
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, password)| password.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doors(listen: &str, hosts: &[(&str, Option<u16>)]) -> Doors {
        Doors::new(
            listen.parse().unwrap(),
            AdminAccess { token_file: None, hosts: hosts.iter().map(|(h, p)| (h.to_string(), *p)).collect() },
        )
    }

    #[test]
    fn only_the_listeners_own_names_are_answered() {
        let d = doors("127.0.0.1:9090", &[("tokenproxy.internal", None), ("admin.example", Some(8443))]);
        for ok in [
            "127.0.0.1:9090",
            "127.0.0.1",
            "localhost:9090",
            "LOCALHOST.",
            "[::1]:19090",
            "127.0.0.2:1",
            "Tokenproxy.Internal:9090",
            "admin.example:8443",
        ] {
            assert!(d.host_allowed(ok), "{ok}");
        }
        for refused in
            ["evil.example.net:19090", "admin.example:9090", "admin.example", "", "10.1.2.3:9090", "a b"]
        {
            assert!(!d.host_allowed(refused), "{refused}");
        }
        let specific = doors("192.0.2.10:9090", &[]);
        assert!(specific.host_allowed("192.0.2.10:9090"));
    }

    #[test]
    fn the_token_comes_as_bearer_or_as_a_basic_password() {
        let req = |value: &str| Request::builder().header("authorization", value).body(()).unwrap();
        assert_eq!(presented_token(&req("Bearer abc")).as_deref(), Some("abc"));
        // base64("anyone:s3cret")
        assert_eq!(presented_token(&req("Basic YW55b25lOnMzY3JldA==")).as_deref(), Some("s3cret"));
        assert_eq!(presented_token(&req("Digest x")), None);
    }
}
