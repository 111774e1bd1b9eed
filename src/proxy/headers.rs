//! Header hygiene between the two hops.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the proxy's own
/// credentials, which must never travel further. `Connection` comes first: [`remove_hop_by_hop`]
/// reads it before removing it.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What a header name is to the proxy, found by length first: one comparison for most. Both
/// codecs sort headers by it (hyper's path in [`remove_hop_by_hop`], the relay as it reads a head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ContentLength,
    TransferEncoding,
    Upgrade,
    Expect,
    Connection,
    Host,
    Te,
    /// tokenproxy's `Tokenproxy-Account` (SPEC §8): never forwarded.
    Account,
    ProxyAuthorization,
    /// Another hop-by-hop header (RFC 9110 §7.6.1): `Keep-Alive`, `Proxy-Connection`, `Trailer`,
    /// `Proxy-Authenticate`.
    Hop,
    Other,
}

impl Kind {
    pub fn of(name: &[u8]) -> Kind {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => Kind::Te,
            4 if is(b"host") => Kind::Host,
            6 if is(b"expect") => Kind::Expect,
            7 if is(b"upgrade") => Kind::Upgrade,
            7 if is(b"trailer") => Kind::Hop,
            10 if is(b"connection") => Kind::Connection,
            10 if is(b"keep-alive") => Kind::Hop,
            14 if is(b"content-length") => Kind::ContentLength,
            16 if is(b"proxy-connection") => Kind::Hop,
            17 if is(b"transfer-encoding") => Kind::TransferEncoding,
            18 if is(b"tokenproxy-account") => Kind::Account,
            18 if is(b"proxy-authenticate") => Kind::Hop,
            19 if is(b"proxy-authorization") => Kind::ProxyAuthorization,
            _ => Kind::Other,
        }
    }

    /// Whether a header of this kind is in [`HOP_BY_HOP`]: it never travels on as it came.
    fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Kind::Connection | Kind::Hop | Kind::TransferEncoding | Kind::Upgrade | Kind::ProxyAuthorization
        )
    }
}

/// Removes hop-by-hop headers and every header the `Connection` header names. `TE: trailers` is
/// kept: it is end-to-end in practice (gRPC needs it) and the only TE value HTTP/2 allows.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One scan notes which are present: most messages carry none of these or only `Connection`
    // (every nginx answer has `Connection: keep-alive`), and each removal is a hash lookup.
    let (mut connection, mut hop, mut te) = (false, false, false);
    for name in headers.keys() {
        match Kind::of(name.as_str().as_bytes()) {
            Kind::Connection => connection = true,
            Kind::Te => te = true,
            kind => hop |= kind.is_hop_by_hop(),
        }
    }
    if connection {
        // The names `Connection` lists go too. Its values are taken out first (each is a shared
        // slice of the read buffer, not a copy) so that the map can change while they are read.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let more: Vec<http::HeaderValue> = values.cloned().collect();
        for value in first.iter().chain(&more) {
            for name in value.to_str().unwrap_or_default().split(',') {
                headers.remove(name.trim());
            }
        }
        headers.remove(header::CONNECTION);
    }
    if hop {
        for name in &HOP_BY_HOP[1..] {
            headers.remove(name);
        }
    }
    if te && !headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
        headers.remove(header::TE);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade: websocket` with `Connection:
/// upgrade`), if any. `h2c` is not offered upstream: the upstream connection decides HTTP/2.
pub fn upgrade_protocol<B>(req: &http::Request<B>) -> Option<http::HeaderValue> {
    let protocol = req.headers().get(header::UPGRADE)?;
    let asked = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let h2c = protocol.as_bytes().eq_ignore_ascii_case(b"h2c");
    (asked && !h2c && req.version() == http::Version::HTTP_11).then(|| protocol.clone())
}

/// Re-creates the two hop-by-hop headers that an upgrade needs on the next hop.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: http::HeaderValue) {
    headers.insert(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The request header that names the account of a multi-account provider (SPEC §8). It is
/// tokenproxy's own and never forwarded.
pub const ACCOUNT: HeaderName = HeaderName::from_static("tokenproxy-account");

/// Removes every `Tokenproxy-Account` header (tokenproxy's, never forwarded) and returns the
/// account they name: the same one repeated is that one, two different ones are refused.
pub fn take_account(headers: &mut HeaderMap) -> Result<Option<HeaderValue>, crate::accounts::BadAccount> {
    let mut values = match headers.entry(ACCOUNT) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1,
        http::header::Entry::Vacant(_) => return Ok(None),
    };
    let first = values.next();
    if values.any(|other| Some(&other) != first.as_ref()) {
        return Err(crate::accounts::BadAccount::Conflicting);
    }
    Ok(first)
}

/// The user name of `Proxy-Authorization: Basic base64(user:password)`, which clients send for
/// `HTTP_PROXY=http://user@host:port`: without callers it names an account (SPEC §8). Anything
/// else (another scheme, bad base64, an empty user) names none. The password is ignored and
/// never kept.
pub fn proxy_user_of(value: &[u8]) -> Option<String> {
    use base64::Engine;
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, credentials) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(credentials.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(user, _)| user);
    (!user.is_empty()).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ] {
            h.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["accept"]);

        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn the_proxy_user_is_the_basic_credentials_user_name_and_nothing_else() {
        let user = |value: &str| proxy_user_of(value.as_bytes());
        // curl -x http://alice@… sends "alice:"; Python requests the same; user:password too.
        assert_eq!(user("Basic YWxpY2U6").as_deref(), Some("alice"));
        assert_eq!(user("basic YWxpY2U6c2VjcmV0").as_deref(), Some("alice"));
        assert_eq!(user("Basic dXNlckBleGFtcGxlLmNvbTp4").as_deref(), Some("user@example.com"));
        assert_eq!(user("Basic OnBhc3N3b3Jk"), None, "an empty user name names no account");
        assert_eq!(user("Bearer YWxpY2U6"), None);
        assert_eq!(user("Basic !!!"), None);
    }
}
