//! The relay's side of a request head: read, checked against what the relay serves, decided by
//! the token rules, and written for the upstream in one pass.

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};

use super::{Listen, MAX_HEADERS, PlainRelay};
use crate::callers::Peer;
use crate::proxy::Target;
use crate::proxy::access::Access;
use crate::proxy::decide::{Asked, AtOnce, Decision, Entry, Exchange, Injected, Verdict};
use crate::proxy::headers::Kind;
use crate::tokens::Provider;

/// A request head this module relays, read and checked; the head for the upstream is in
/// [`Exchange::out`] up to its token line.
pub(super) struct Request {
    pub(super) target: Target,
    pub(super) provider: Option<Arc<Provider>>,
    /// The token the request carries, if tokenproxy sets one.
    pub(super) injected: Option<Injected>,
    pub(super) head_method: bool,
    /// May be sent again on a new connection when a reused one turns out closed.
    pub(super) idempotent: bool,
    pub(super) client_close: bool,
    pub(super) access: Access,
    /// What the rules decided, for the audit line.
    pub(super) verdict: Verdict,
}

/// What became of a request head.
// Not boxed: a `Request` is made for every relayed request and moved once; a box would be an
// allocation each.
#[allow(clippy::large_enum_variant)]
pub(super) enum Reading {
    Request(Request),
    /// Its account must be read from the store first (once per account); then it is read again.
    LoadFirst(Arc<Provider>, String),
    /// Not one this module relays: hyper's path serves it.
    HandOff,
}

/// A target as a client wrote it, resolved: kept for the connection's next request.
pub(super) struct Resolved {
    written: Box<[u8]>,
    target: Target,
    provider: Option<Arc<Provider>>,
}

impl PlainRelay {
    /// Reads a request head and writes the upstream's into `out`, all but the token line and the
    /// blank line that ends it. `last` is the connection's last target: a client connection
    /// mostly sends to one host.
    pub(super) fn read_request(
        &self,
        head: &[u8],
        peer: &Peer,
        out: &mut Vec<u8>,
        last: &mut Option<Resolved>,
    ) -> Reading {
        match self.try_read_request(head, peer, out, last) {
            Some(read) => read,
            None => Reading::HandOff,
        }
    }

    fn try_read_request(
        &self,
        head: &[u8],
        peer: &Peer,
        out: &mut Vec<u8>,
        last: &mut Option<Resolved>,
    ) -> Option<Reading> {
        let mut storage = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let Parsed {
            method,
            written,
            authority,
            path,
            headers: parsed_headers,
            kinds: names,
            connection,
            named_account,
            credentials,
        } = parse(head, self.listen.form()?, &mut storage)?;
        // In a tunnel, the CONNECT's credentials hold for every request (a request's own
        // `Proxy-Authorization` is not forwarded either way).
        let credentials = match &self.listen {
            Listen::Tunnel { credentials, .. } => credentials.as_deref(),
            _ => credentials,
        };
        let (target, provider) = match last {
            Some(resolved) if *resolved.written == *authority.as_bytes() => {
                (resolved.target.clone(), resolved.provider.clone())
            }
            _ => {
                let resolved = self.resolve(authority)?;
                let found = (resolved.target.clone(), resolved.provider.clone());
                *last = Some(resolved);
                found
            }
        };
        // What reaches the upstream of the client's headers: end-to-end ones not named by
        // `Connection` (`TE: trailers` too: it is end-to-end in practice, and gRPC needs it).
        let forwarded = |h: &httparse::Header<'_>, kind: Kind| match kind {
            Kind::Other | Kind::ContentLength => {
                !tokens(connection).any(|t| t.eq_ignore_ascii_case(h.name.as_bytes()))
            }
            Kind::Te => h.value.trim_ascii().eq_ignore_ascii_case(b"trailers"),
            _ => false,
        };
        // The rules see the path the upstream gets (a route's base path first), without the query.
        let path_only = path_only(written, &self.listen);
        let rules_path: std::borrow::Cow<'_, str> = match &self.listen {
            Listen::Route(route) if !route.upstream_base_path.is_empty() => {
                format!("{}{path_only}", route.upstream_base_path).into()
            }
            _ => path_only.into(),
        };
        let mut ex = Exchange {
            target,
            provider: provider.as_ref(),
            credentials,
            peer,
            method,
            path: &rules_path,
            entry: match self.listen {
                Listen::Forward => Entry::Forward,
                Listen::Route(_) => Entry::Route,
                Listen::Tunnel { .. } => Entry::Tunnel,
            },
            verdict: Verdict::default(),
        };
        let carries = |name: &HeaderName| {
            let name = name.as_str().as_bytes();
            parsed_headers
                .iter()
                .zip(names)
                .any(|(h, kind)| h.name.as_bytes().eq_ignore_ascii_case(name) && forwarded(h, kind))
        };
        let asked = Asked { account: Ok(named_account.as_ref()), carries: &carries };
        // A request that must wait, or is refused, goes to hyper's path, which asks the same rules.
        let injected = match self.proxy.decide_at_once(&mut ex, &asked) {
            AtOnce::Decided(Ok(Decision::Pass)) => None,
            AtOnce::Decided(Ok(Decision::Inject(injected))) => Some(injected),
            // A signature covers the whole body, which hyper's path holds before it sends.
            AtOnce::Decided(Ok(Decision::Sign(_))) => return None,
            AtOnce::Load(provider, name) => return Some(Reading::LoadFirst(provider, name)),
            AtOnce::Decided(Err(_)) | AtOnce::Wait => return None,
        };
        let (target, verdict) = (ex.target, ex.verdict);

        // The upstream's head: origin form, `Host` from the target, the end-to-end headers.
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        path.write(out);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(target.host_header().as_bytes());
        out.extend_from_slice(b"\r\n");
        let injected_header = injected.as_ref().map(|i| i.provider.config.header.as_str().as_bytes());
        for (h, kind) in parsed_headers.iter().zip(names) {
            let replaced = injected_header.is_some_and(|n| h.name.as_bytes().eq_ignore_ascii_case(n));
            if forwarded(h, kind) && !replaced {
                push_line(out, head, h);
            }
        }

        let client_close = tokens(connection).any(|t| t.eq_ignore_ascii_case(b"close"));
        let mut access = Access::begin(self.proxy.keeps_lines(), method, || path_only, peer.listener);
        access.host(&target);
        Some(Reading::Request(Request {
            target,
            provider,
            injected,
            head_method: method == "HEAD",
            idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"),
            client_close,
            access,
            verdict,
        }))
    }

    /// The target and provider for an authority as a client wrote it (the route's, on a route).
    fn resolve(&self, written: &str) -> Option<Resolved> {
        let (target, provider) = match &self.listen {
            Listen::Forward => {
                let target = forward_target(written)?;
                let provider = self.proxy.providers.for_host(target.host(), target.port).cloned();
                (target, provider)
            }
            Listen::Route(route) => {
                let target = Target::new(Scheme::HTTP, &route.upstream_authority).ok()?;
                (target, Some(self.proxy.providers.get(&route.provider)?.clone()))
            }
            Listen::Tunnel { target, provider, .. } => (target.clone(), Some(provider.clone())),
        };
        Some(Resolved { written: written.as_bytes().into(), target, provider })
    }
}

/// A request head as the relay reads it before any rule is asked: everything that decides
/// whether the relay may take it at all. What follows (the provider, the token rules) can only
/// hand it to hyper's path.
pub(super) struct Parsed<'h> {
    pub(super) method: &'h str,
    /// The request target as written.
    pub(super) written: &'h str,
    /// The authority of an absolute-form target (empty in origin form).
    pub(super) authority: &'h str,
    pub(super) path: Path<'h>,
    pub(super) headers: &'h [httparse::Header<'h>],
    pub(super) kinds: [Kind; MAX_HEADERS],
    /// The `Connection` header's value (empty without one).
    pub(super) connection: &'h [u8],
    pub(super) named_account: Option<HeaderValue>,
    /// The `Proxy-Authorization` value.
    pub(super) credentials: Option<&'h [u8]>,
}

/// The request target a listener's relay takes.
#[derive(Clone, Copy)]
pub(super) enum Form<'a> {
    /// `http://authority/path` (the forward port).
    Absolute,
    /// `/path`, sent on below a base path (a route's, or none inside a tunnel).
    Origin { base: &'a str },
}

impl Listen {
    /// What the relay takes on this listener; `None`: nothing (a route to an HTTPS upstream).
    pub(super) fn form(&self) -> Option<Form<'_>> {
        match self {
            Listen::Forward => Some(Form::Absolute),
            Listen::Route(route) if route.upstream_scheme == Scheme::HTTP => {
                Some(Form::Origin { base: &route.upstream_base_path })
            }
            Listen::Route(_) => None,
            Listen::Tunnel { .. } => Some(Form::Origin { base: "" }),
        }
    }
}

/// Reads a request head the relay may serve: HTTP/1.1, no body, no upgrade or `Expect`, one
/// `Connection`, one `Tokenproxy-Account`, a target of the listener's `form`. `None`: hyper's
/// path serves it (and answers `400` where it must).
pub(super) fn parse<'h>(
    head: &'h [u8],
    form: Form<'h>,
    storage: &'h mut [std::mem::MaybeUninit<httparse::Header<'h>>; MAX_HEADERS],
) -> Option<Parsed<'h>> {
    let mut parsed = httparse::Request::new(&mut []);
    let httparse::Status::Complete(_) = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut parsed, head, storage)
        .ok()?
    else {
        return None;
    };
    if parsed.version != Some(1) {
        return None;
    }
    let method = parsed.method?;
    let written = parsed.path?;
    if method == "CONNECT" || !written.bytes().all(|b| TARGET_BYTES[usize::from(b)]) {
        return None;
    }
    // The message's framing and tokenproxy's own headers, in one pass.
    let mut connection: &[u8] = b"";
    let mut named_account = None;
    let mut credentials = None;
    let mut length = false;
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, kind) in parsed.headers.iter().zip(&mut kinds) {
        *kind = Kind::of(h.name.as_bytes());
        match *kind {
            // A body, or two lengths (which hyper folds into one): hyper's path.
            Kind::ContentLength if length || h.value.trim_ascii() != b"0" => return None,
            Kind::ContentLength => length = true,
            Kind::TransferEncoding | Kind::Upgrade | Kind::Expect => return None,
            Kind::Connection if !connection.is_empty() => return None, // two: hyper's to sort out
            Kind::Connection => connection = h.value,
            // Two: hyper's path answers them, so both codecs decide alike (SPEC §5).
            Kind::Account if named_account.is_some() => return None,
            Kind::Account => named_account = Some(HeaderValue::from_bytes(h.value).ok()?),
            // Two: hyper's path reads the first, as `HeaderMap::get` does.
            Kind::ProxyAuthorization if credentials.is_some() => return None,
            Kind::ProxyAuthorization => credentials = Some(h.value),
            _ => {}
        }
    }
    let (authority, path) = match form {
        Form::Absolute => {
            let rest = strip_prefix_ignore_case(written, "http://")?;
            let split = rest.bytes().position(|b| b == b'/' || b == b'?').unwrap_or(rest.len());
            (&rest[..split], Path::Absolute(&rest[split..]))
        }
        Form::Origin { base } if written.starts_with('/') => ("", Path::Routed(base, written)),
        Form::Origin { .. } => return None,
    };
    let headers: &'h [httparse::Header<'h>] = parsed.headers;
    Some(Parsed { method, written, authority, path, headers, kinds, connection, named_account, credentials })
}

/// The bytes of a request target the relay passes on as written: RFC 3986's unreserved and
/// reserved characters and `%`. Anything else (`#` and a fragment, `"<>\\^`{|}`, controls,
/// non-ASCII) goes to hyper's path, whose URI parser decides (the request-head differential
/// holds the relay to it).
const TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%[]";
    let mut i = 0;
    while i < allowed.len() {
        table[allowed[i] as usize] = true;
        i += 1;
    }
    table
};

/// The target of an absolute-form request's authority.
pub(super) fn forward_target(authority: &str) -> Option<Target> {
    Target::new(Scheme::HTTP, &Authority::try_from(authority).ok()?).ok()
}

/// The path part of an upstream request line.
pub(super) enum Path<'a> {
    /// What follows the authority of an absolute-form target (`""`, `/x`, `?q`).
    Absolute(&'a str),
    /// A route's base path and the request's origin-form target.
    Routed(&'a str, &'a str),
}

impl Path<'_> {
    pub(super) fn write(&self, out: &mut Vec<u8>) {
        match *self {
            Path::Absolute(rest) => {
                if !rest.starts_with('/') {
                    out.push(b'/');
                }
                out.extend_from_slice(rest.as_bytes());
            }
            Path::Routed(base, path) => {
                out.extend_from_slice(base.as_bytes());
                out.extend_from_slice(path.as_bytes());
            }
        }
    }
}

/// The path of a request target without its query, for the access log.
pub(super) fn path_only<'a>(written: &'a str, listen: &Listen) -> &'a str {
    let path = match listen {
        Listen::Forward => {
            let rest = strip_prefix_ignore_case(written, "http://").unwrap_or(written);
            &rest[rest.find(['/', '?']).unwrap_or(rest.len())..]
        }
        Listen::Route(_) | Listen::Tunnel { .. } => written,
    };
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    if path.is_empty() { "/" } else { path }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// The comma-separated tokens of a header value, trimmed.
pub(super) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `h`'s line as the head has it (name, colon, value), with a CRLF: one copy.
pub(super) fn push_line(out: &mut Vec<u8>, head: &[u8], h: &httparse::Header<'_>) {
    let base = head.as_ptr() as usize;
    let start = h.name.as_ptr() as usize - base;
    let end = h.value.as_ptr() as usize + h.value.len() - base;
    if h.value.is_empty() || start >= end || end > head.len() {
        push_header(out, h.name.as_bytes(), h.value);
    } else {
        out.extend_from_slice(&head[start..end]);
        out.extend_from_slice(b"\r\n");
    }
}

/// The end of a message head (after its blank line) in `bytes`, if it is all there. Bare `\n`
/// line ends count too, as httparse reads them.
pub(super) fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|at| match bytes.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if bytes.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_blank_line_with_either_line_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nrest"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn only_the_path_reaches_the_access_log() {
        let fwd = Listen::Forward;
        assert_eq!(path_only("http://h:1/a/b?secret=1", &fwd), "/a/b");
        assert_eq!(path_only("http://h:1?secret=1", &fwd), "/");
        assert_eq!(path_only("http://h", &fwd), "/");
    }
}
