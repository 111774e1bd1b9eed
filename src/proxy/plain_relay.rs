//! Plain-HTTP/1.1 requests without a body, relayed by hand: the proxy's common case, at the cost
//! of the reads and writes it takes and little more.
//!
//! Through hyper, every such request was parsed and re-encoded twice (once by the server, once by
//! the client), handed between the two through a channel, and each idle client connection kept
//! two 8 KiB buffers. Here one task reads the request head, writes it upstream with the token,
//! and copies the response back, framing and all, without decoding the body; between requests a
//! client connection holds no buffer.
//!
//! What is relayed here: a complete HTTP/1.1 request head with no body (no `Content-Length`
//! other than 0, no `Transfer-Encoding`, no `Expect`, no `Upgrade`), in absolute form for a
//! plain-HTTP target on the forward port (or any form on a route to a plain-HTTP upstream), whose
//! token is current. Everything else — CONNECT, bodies, upgrades, HTTPS upstreams, HTTP/1.0, a
//! malformed or oversized head, a token that must be waited for, a request tokenproxy refuses —
//! is handed over with the bytes read so far to hyper ([`crate::server::serve`]), which serves the
//! rest of the connection through [`super::Proxy::forward`]. So every refusal, and every rule for
//! what this module does not relay, is written once, there.
//!
//! What it owes the contract: the provider's token in the provider's header (or the client's,
//! with `client_header = "keep"`), hop-by-hop and `Connection`-named headers and tokenproxy's own
//! headers removed both ways, `Host` from the target, `upstream_timeout` for connect + response
//! head, `header_read_timeout` for every request head, one refresh and one retry after a status
//! in `refresh_on_status` (nothing to replay but the head), the request metrics and access log,
//! the upstream connection closed when the client leaves mid-answer, and pipelined requests
//! answered in order.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::plain_pool::Held;
use super::{Access, Entry, Exchange, Proxy, Target, dial_error};
use crate::config::{ClientHeader, RouteConfig, UpstreamScheme};
use crate::drain::DrainWatch;
use crate::errors::ProxyError;
use crate::metrics;
use crate::tokens::refresh::Trigger;
use crate::tokens::{Credential, Provider, Token};

/// Header lines a request or response head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// The first read of a head: most heads fit, and a buffer this small is recycled by the
/// allocator's per-thread cache instead of its general bins.
const FIRST_READ: usize = 1024;
/// What each read of a body asks the socket for.
const READ_CHUNK: usize = 16 * 1024;
/// The largest response head read from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Which requests a listener takes: absolute-form ones (the forward port), or every one to a
/// route's upstream.
pub enum Listen {
    Forward,
    Route(Arc<RouteConfig>),
}

/// Serves the plain-HTTP/1.1 requests of one listener's connections.
pub struct PlainRelay {
    pub proxy: Arc<Proxy>,
    pub listen: Listen,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// How a connection left the relay.
pub enum Served {
    Closed,
    /// For hyper, from the first request this module does not relay: the socket, and the bytes
    /// read from it and not yet answered.
    HandOff {
        stream: TcpStream,
        read: Vec<u8>,
    },
}

/// The client's side of the connection: its socket and what has been read and not yet used.
struct ClientSide {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

impl ClientSide {
    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads what the socket has; `Ok(0)` at its end.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(self.buf.len().max(FIRST_READ));
        }
        self.stream.read_buf(&mut self.buf).await
    }

    fn hand_off(mut self) -> Served {
        self.buf.drain(..self.start);
        Served::HandOff { stream: self.stream, read: self.buf }
    }
}

/// What waiting for a request head ended with.
enum HeadRead {
    /// A complete head of this many bytes is at the start of the unread bytes.
    Complete(usize),
    Closed,
    HandOff,
}

/// What to do after an exchange.
enum Next {
    Serve,
    Close,
    HandOff,
}

/// Why an exchange ended early.
enum Failure {
    /// The client closed its connection.
    ClientGone,
    /// Nothing has reached the client yet: it gets this error's answer.
    Refused(ProxyError),
    /// The answer cannot go on: only closing can tell the client.
    Broken,
    /// The answer with this status was cut off after its head (by either side).
    Cut(StatusCode),
}

impl Failure {
    /// This failure, in the body of an answer with `status`.
    fn in_body(self, status: StatusCode) -> Failure {
        match self {
            Failure::ClientGone | Failure::Broken => Failure::Cut(status),
            other => other,
        }
    }
}

/// A request head this module relays, read and checked; the head for the upstream is in
/// [`Exchange::out`] up to its token line.
struct Request {
    target: Target,
    provider: Option<Arc<Provider>>,
    /// The provider's header is to be set (not kept from the client).
    inject: bool,
    named_account: Option<HeaderValue>,
    proxy_user: Option<String>,
    head_method: bool,
    /// May be sent again on a new connection when a reused one turns out closed.
    idempotent: bool,
    client_close: bool,
    access: Access,
}

/// A target as a client wrote it, resolved: kept for the connection's next request.
struct Resolved {
    written: Box<[u8]>,
    target: Target,
    provider: Option<Arc<Provider>>,
}

/// The header names the relay treats apart, found by length first: one comparison for most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
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

impl Name {
    fn of(name: &[u8]) -> Name {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => Name::Te,
            4 if is(b"host") => Name::Host,
            6 if is(b"expect") => Name::Expect,
            7 if is(b"upgrade") => Name::Upgrade,
            7 if is(b"trailer") => Name::Hop,
            10 if is(b"connection") => Name::Connection,
            10 if is(b"keep-alive") => Name::Hop,
            14 if is(b"content-length") => Name::ContentLength,
            16 if is(b"proxy-connection") => Name::Hop,
            17 if is(b"transfer-encoding") => Name::TransferEncoding,
            18 if is(b"tokenproxy-account") => Name::Account,
            18 if is(b"proxy-authenticate") => Name::Hop,
            19 if is(b"proxy-authorization") => Name::ProxyAuthorization,
            _ => Name::Other,
        }
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy)]
enum Body {
    Empty,
    Length(u64),
    Chunked(Chunks),
    /// Until the upstream closes (no length, not chunked): the client connection closes too.
    UntilClose,
}

impl Body {
    /// How many of `bytes`, the next ones read, belong to the body, and whether it ends with
    /// them; what is left to read is kept. `Err`: the chunked framing is broken.
    fn take(&mut self, bytes: &[u8]) -> Result<(usize, bool), ()> {
        Ok(match self {
            Body::Empty => (0, true),
            Body::Length(rest) => {
                let take = (*rest).min(bytes.len() as u64) as usize;
                *rest -= take as u64;
                (take, *rest == 0)
            }
            Body::Chunked(chunks) => match chunks.scan(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            },
            Body::UntilClose => (bytes.len(), false),
        })
    }
}

impl PlainRelay {
    /// Serves `stream` until it closes, or until a request this module does not relay.
    pub async fn serve(&self, stream: TcpStream, drain: &mut DrainWatch) -> Served {
        let mut client = ClientSide { stream, buf: Vec::new(), start: 0 };
        let mut upstream = Held::new(self.proxy.plain.clone());
        let mut last = None;
        loop {
            let head_len = match self.read_head(&mut client, drain).await {
                HeadRead::Complete(n) => n,
                HeadRead::Closed => return Served::Closed,
                HeadRead::HandOff => return client.hand_off(),
            };
            match self.exchange(&mut client, head_len, &mut upstream, &mut last).await {
                Next::Serve if !drain.is_signaled() => {}
                Next::Serve | Next::Close => return Served::Closed,
                Next::HandOff => return client.hand_off(),
            }
        }
    }

    /// Waits for a complete request head, within `header_read_timeout` from when the wait began
    /// (as hyper does: an idle keep-alive connection is closed after it too). A connection with
    /// nothing unread holds no buffer while it waits.
    async fn read_head(&self, client: &mut ClientSide, drain: &mut DrainWatch) -> HeadRead {
        let deadline = Instant::now() + self.header_read_timeout;
        loop {
            let unread = client.unread();
            if let Some(end) = head_end(unread) {
                return HeadRead::Complete(end);
            }
            if unread.len() >= self.max_header_bytes {
                return HeadRead::HandOff; // hyper answers 431
            }
            let idle = unread.is_empty();
            if idle {
                client.buf = Vec::new();
                client.start = 0;
            }
            // The buffer is made when the socket has something to read.
            let next = async {
                client.stream.readable().await?;
                client.fill().await
            };
            // Idle, shutdown closes the connection now; a request head is read whole first.
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(deadline, next) => match read {
                    Ok(read) => read,
                    Err(_) => return HeadRead::Closed,
                },
                _ = drain.signaled(), if idle => return HeadRead::Closed,
            };
            match read {
                Ok(0) | Err(_) => return HeadRead::Closed,
                Ok(_) => {}
            }
        }
    }

    /// One request and its answer.
    async fn exchange(
        &self,
        client: &mut ClientSide,
        head_len: usize,
        upstream: &mut Held,
        last: &mut Option<Resolved>,
    ) -> Next {
        let mut out = Vec::with_capacity(512);
        let Some(request) = self.read_request(&client.unread()[..head_len], &mut out, last) else {
            return Next::HandOff;
        };
        let injected = match self.token(&request).await {
            Ok(injected) => injected,
            Err(()) => return Next::HandOff,
        };
        let token_line_at = out.len();
        if let Some((provider, _, token)) = &injected {
            push_header(
                &mut out,
                provider.config.header.as_str().as_bytes(),
                token.header_value().as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n");
        client.consume(head_len);

        let outcome = self.answer(client, upstream, &request, out, token_line_at, injected.as_ref()).await;
        let (status, retried, next) = match outcome {
            Ok((status, retried, close)) => (status, retried, if close { Next::Close } else { Next::Serve }),
            Err(Failure::Refused(e)) => {
                let status = e.status();
                let label = request.provider.as_deref().map_or(metrics::NO_PROVIDER, Provider::name);
                tracing::warn!(provider = label, error = %e, code = e.code(), "request refused");
                let sent = write_answer(&mut client.stream, e.into_response(), request.client_close).await;
                (status, false, if sent && !request.client_close { Next::Serve } else { Next::Close })
            }
            Err(Failure::Cut(status)) => (status, false, Next::Close),
            Err(Failure::Broken) => (StatusCode::BAD_GATEWAY, false, Next::Close),
            // Gone before its answer: nothing to count, as when hyper drops the request.
            Err(Failure::ClientGone) => return Next::Close,
        };
        let account = injected.as_ref().map(|(_, credential, _)| credential.as_ref());
        super::record(request.provider.as_deref(), request.access, status, account, retried);
        next
    }

    /// Reads a request head; `None` when it is not one this module relays. Writes the upstream's
    /// head into `out`, all but the token line and the blank line that ends it. `last` is the
    /// connection's last target: a client connection mostly sends to one host.
    fn read_request(&self, head: &[u8], out: &mut Vec<u8>, last: &mut Option<Resolved>) -> Option<Request> {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let httparse::Status::Complete(_) = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut parsed, head, &mut headers)
            .ok()?
        else {
            return None;
        };
        if parsed.version != Some(1) {
            return None;
        }
        let method = parsed.method?;
        let written = parsed.path?;
        if method == "CONNECT" {
            return None;
        }
        // The message's framing and tokenproxy's own headers, in one pass.
        let mut connection: &[u8] = b"";
        let mut named_account = None;
        let mut proxy_user = None;
        let mut names = [Name::Other; MAX_HEADERS];
        for (h, kind) in parsed.headers.iter().zip(&mut names) {
            *kind = Name::of(h.name.as_bytes());
            match *kind {
                Name::ContentLength if h.value.trim_ascii() != b"0" => return None,
                Name::TransferEncoding | Name::Upgrade | Name::Expect => return None,
                Name::Connection if !connection.is_empty() => return None, // two: hyper's to sort out
                Name::Connection => connection = h.value,
                // Two: hyper's path answers them, so both codecs decide alike (SPEC §5).
                Name::Account if named_account.is_some() => return None,
                Name::Account => named_account = Some(HeaderValue::from_bytes(h.value).ok()?),
                Name::ProxyAuthorization => proxy_user = super::headers::proxy_user_of(h.value),
                _ => {}
            }
        }

        let (authority, path) = match &self.listen {
            Listen::Forward => {
                let rest = strip_prefix_ignore_case(written, "http://")?;
                let split = rest.bytes().position(|b| b == b'/' || b == b'?').unwrap_or(rest.len());
                (&rest[..split], Path::Absolute(&rest[split..]))
            }
            Listen::Route(route) => {
                if route.upstream_scheme != Scheme::HTTP || !written.starts_with('/') {
                    return None;
                }
                ("", Path::Routed(&route.upstream_base_path, written))
            }
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
        let mut inject = false;
        if let Some(provider) = &provider {
            let config = &provider.config;
            if config.upstream_scheme == UpstreamScheme::Https || !config.allow_plaintext {
                return None; // upgraded to HTTPS, or refused: hyper's path
            }
            let has = || parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case(config.header.as_str()));
            inject = !(config.client_header == ClientHeader::Keep && has());
        }

        // The upstream's head: origin form, `Host` from the target, the end-to-end headers.
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        path.write(out);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(target.host_header().as_bytes());
        out.extend_from_slice(b"\r\n");
        let injected_header = provider.as_ref().filter(|_| inject).map(|p| p.config.header.as_str());
        for (h, kind) in parsed.headers.iter().zip(names) {
            let name = h.name.as_bytes();
            let dropped = match kind {
                Name::Other | Name::ContentLength => {
                    injected_header.is_some_and(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                        || tokens(connection).any(|t| t.eq_ignore_ascii_case(name))
                }
                // `TE: trailers` stays: it is end-to-end in practice (gRPC needs it).
                Name::Te => !h.value.trim_ascii().eq_ignore_ascii_case(b"trailers"),
                _ => true,
            };
            if !dropped {
                push_line(out, head, h);
            }
        }

        let client_close = tokens(connection).any(|t| t.eq_ignore_ascii_case(b"close"));
        let mut access =
            Access::begin(self.proxy.settings.access_log, method, || path_only(written, &self.listen));
        access.host(&target);
        Some(Request {
            target,
            provider,
            inject,
            named_account,
            proxy_user,
            head_method: method == "HEAD",
            idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"),
            client_close,
            access,
        })
    }

    /// The target and provider for an authority as a client wrote it (the route's, on a route).
    fn resolve(&self, written: &str) -> Option<Resolved> {
        let (target, provider) = match &self.listen {
            Listen::Forward => {
                let target = Target::new(Scheme::HTTP, &Authority::try_from(written).ok()?).ok()?;
                let provider = self.proxy.providers.for_host(target.host(), target.port).cloned();
                if provider.is_none() && !self.proxy.allow_unmatched {
                    return None;
                }
                (target, provider)
            }
            Listen::Route(route) => {
                let target = Target::new(Scheme::HTTP, &route.upstream_authority).ok()?;
                (target, Some(self.proxy.providers.get(&route.provider)?.clone()))
            }
        };
        Some(Resolved { written: written.as_bytes().into(), target, provider })
    }

    /// The token the request carries, if its provider's is to be set: `Err` when it cannot be
    /// had at once (an account to name, a token to wait for), which hyper's path answers.
    async fn token(
        &self,
        request: &Request,
    ) -> Result<Option<(Arc<Provider>, Arc<Credential>, Arc<Token>)>, ()> {
        let Some(provider) = request.provider.as_ref().filter(|_| request.inject) else { return Ok(None) };
        let exchange = Exchange {
            target: request.target.clone(),
            provider: Some(provider),
            proxy_user: request.proxy_user.as_deref(),
            entry: match self.listen {
                Listen::Forward => Entry::Forward,
                Listen::Route(_) => Entry::Route,
            },
        };
        let credential = self
            .proxy
            .credential_for(provider, Ok(request.named_account.as_ref()), &exchange)
            .await
            .map_err(|_| ())?;
        let token = self.proxy.token_at_once(provider, &credential).ok_or(())?;
        Ok(Some((provider.clone(), credential, token)))
    }

    /// Sends the request and relays its answer; after a status in `refresh_on_status`, refreshes
    /// the token once and relays the retry's answer instead. Returns the status the client got,
    /// whether it came from a retry, and whether the client connection must close.
    async fn answer(
        &self,
        client: &mut ClientSide,
        upstream: &mut Held,
        request: &Request,
        mut out: Vec<u8>,
        token_line_at: usize,
        injected: Option<&(Arc<Provider>, Arc<Credential>, Arc<Token>)>,
    ) -> Result<(StatusCode, bool, bool), Failure> {
        let mut rbuf = Vec::with_capacity(FIRST_READ);
        let mut wbuf = Vec::with_capacity(FIRST_READ);
        let head = self.send(client, upstream, request, &out, &mut rbuf, &mut wbuf).await?;

        let dead = injected.filter(|(p, _, _)| p.config.refresh_on_status.contains(&head.status));
        let Some((provider, credential, failed)) = dead else {
            let close = relay_body(client, upstream, &mut rbuf, head, &mut wbuf)
                .await
                .map_err(|f| f.in_body(head.status))?;
            return Ok((head.status, false, close || request.client_close));
        };

        // The token is dead. The answer waits, its body unread, while one refresh is tried: if
        // that fails, the client gets this answer after all.
        let name = provider.name();
        metrics::upstream_unauthorized(name);
        tracing::info!(
            provider = name,
            status = head.status.as_u16(),
            account = credential.account_log(),
            fingerprint = %failed.fingerprint,
            "upstream rejected the token"
        );
        let refresh = provider.refresh(credential, Trigger::Unauthorized, Some(failed.generation));
        let fresh = match tokio::time::timeout(self.proxy.settings.upstream_timeout, refresh).await {
            Ok(Ok(fresh)) => fresh,
            _ => {
                metrics::retry(name, "refresh_failed");
                let close = relay_body(client, upstream, &mut rbuf, head, &mut wbuf)
                    .await
                    .map_err(|f| f.in_body(head.status))?;
                return Ok((head.status, false, close || request.client_close));
            }
        };
        // The dead answer is dropped: its connection is reused if the whole of it has been read
        // (as a short answer is, with its head), and closed otherwise.
        upstream.finished(!head.close && whole_in(&rbuf, head));
        credential.note_retry();
        out.truncate(token_line_at);
        push_header(&mut out, provider.config.header.as_str().as_bytes(), fresh.header_value().as_bytes());
        out.extend_from_slice(b"\r\n");
        rbuf.clear();
        wbuf.clear();
        let head = match self.send(client, upstream, request, &out, &mut rbuf, &mut wbuf).await {
            Ok(head) => head,
            Err(e) => {
                metrics::retry(name, "error");
                return Err(e);
            }
        };
        let still_dead = provider.config.refresh_on_status.contains(&head.status);
        metrics::retry(name, if still_dead { "unauthorized" } else { "ok" });
        let close = relay_body(client, upstream, &mut rbuf, head, &mut wbuf)
            .await
            .map_err(|f| f.in_body(head.status))?;
        Ok((head.status, true, close || request.client_close))
    }

    /// Sends the request head and reads the answer's head within `upstream_timeout`, relaying
    /// interim (1xx) answers. A reused connection that the upstream closed meanwhile is replaced
    /// once. The client-bound head is in `wbuf`, the bytes read after it in `rbuf`.
    async fn send(
        &self,
        client: &mut ClientSide,
        upstream: &mut Held,
        request: &Request,
        out: &[u8],
        rbuf: &mut Vec<u8>,
        wbuf: &mut Vec<u8>,
    ) -> Result<Head, Failure> {
        let timeout = self.proxy.settings.upstream_timeout;
        let target = &request.target;
        let exchange = async {
            let refused = |e| Failure::Refused(dial_error(target, e));
            let (mut stream, reused) = upstream.connection(target).await.map_err(refused)?;
            // A reused connection the upstream closed just as the request went out: the request
            // goes once more on a new one, if sending it twice can do no harm.
            let mut may_resend = reused && request.idempotent;
            let mut sent = stream.write_all(out).await.is_ok();
            loop {
                let read = if sent {
                    read_answer_head(stream, rbuf, client).await
                } else {
                    Err(AnswerError::Closed)
                };
                match read {
                    Ok(()) => {}
                    Err(AnswerError::Closed) if may_resend && rbuf.is_empty() => {
                        may_resend = false;
                        stream = upstream.redial(target).await.map_err(refused)?;
                        sent = stream.write_all(out).await.is_ok();
                        continue;
                    }
                    Err(e) => return Err(e.failure(target)),
                }
                let head = parse_answer(rbuf, request.head_method, request.client_close, wbuf)
                    .map_err(|reason| unreachable(target, reason))?;
                if !head.interim {
                    return Ok(head);
                }
                // 1xx: passed on at once; the final answer follows on the same connection.
                may_resend = false;
                flush(client, wbuf).await?;
                rbuf.drain(..head.len);
                stream = upstream.connection_in_use().ok_or(Failure::Broken)?;
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(head) => head,
            Err(_) => Err(Failure::Refused(ProxyError::UpstreamTimeout {
                host: target.authority.to_string(),
                seconds: timeout.as_secs(),
            })),
        }
    }
}

/// The path part of an upstream request line.
enum Path<'a> {
    /// What follows the authority of an absolute-form target (`""`, `/x`, `?q`).
    Absolute(&'a str),
    /// A route's base path and the request's origin-form target.
    Routed(&'a str, &'a str),
}

impl Path<'_> {
    fn write(&self, out: &mut Vec<u8>) {
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
fn path_only<'a>(written: &'a str, listen: &Listen) -> &'a str {
    let path = match listen {
        Listen::Forward => {
            let rest = strip_prefix_ignore_case(written, "http://").unwrap_or(written);
            &rest[rest.find(['/', '?']).unwrap_or(rest.len())..]
        }
        Listen::Route(_) => written,
    };
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    if path.is_empty() { "/" } else { path }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `h`'s line as the head has it (name, colon, value), with a CRLF: one copy.
fn push_line(out: &mut Vec<u8>, head: &[u8], h: &httparse::Header<'_>) {
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
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|at| match bytes.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if bytes.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

/// Why no answer head was read.
enum AnswerError {
    /// The upstream closed (or reset) the connection.
    Closed,
    ClientGone,
    TooLarge,
}

impl AnswerError {
    fn failure(self, target: &Target) -> Failure {
        match self {
            AnswerError::Closed => {
                unreachable(target, "the upstream closed the connection without an answer")
            }
            AnswerError::ClientGone => Failure::ClientGone,
            AnswerError::TooLarge => unreachable(target, "the upstream's answer head is too large"),
        }
    }
}

fn unreachable(target: &Target, reason: &str) -> Failure {
    Failure::Refused(ProxyError::UpstreamUnreachable {
        host: target.authority.to_string(),
        reason: reason.into(),
    })
}

/// Reads from the upstream until `rbuf` holds a complete answer head.
async fn read_answer_head(
    stream: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    client: &mut ClientSide,
) -> Result<(), AnswerError> {
    while head_end(rbuf).is_none() {
        if rbuf.len() > MAX_RESPONSE_HEAD {
            return Err(AnswerError::TooLarge);
        }
        match read_upstream(stream, rbuf, client).await {
            Ok(0) | Err(Read::Upstream) => return Err(AnswerError::Closed),
            Ok(_) => {}
            Err(Read::ClientGone) => return Err(AnswerError::ClientGone),
        }
    }
    Ok(())
}

enum Read {
    Upstream,
    ClientGone,
}

/// Reads what the upstream has into `rbuf`, while watching the client: a client that closes
/// its connection ends the exchange (and so closes the upstream connection). Bytes the client
/// sends meanwhile (a pipelined request) are kept for later.
async fn read_upstream(
    stream: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    client: &mut ClientSide,
) -> Result<usize, Read> {
    if rbuf.len() == rbuf.capacity() {
        rbuf.reserve(rbuf.len().max(FIRST_READ));
    }
    loop {
        let watch_client = client.buf.len() < 2 * MAX_RESPONSE_HEAD;
        tokio::select! {
            biased;
            read = stream.read_buf(rbuf) => return read.map_err(|_| Read::Upstream),
            read = client.stream.read_buf(&mut client.buf), if watch_client => match read {
                Ok(0) | Err(_) => return Err(Read::ClientGone),
                Ok(_) => {}
            },
        }
    }
}

/// An answer's head, read.
#[derive(Clone, Copy)]
struct Head {
    status: StatusCode,
    /// Bytes of the head in `rbuf`.
    len: usize,
    body: Body,
    interim: bool,
    /// The upstream connection closes after this answer.
    close: bool,
}

/// Reads the answer head at the start of `rbuf` and writes the client's version of it into
/// `wbuf`: hop-by-hop headers out, `Connection: close` in when the client connection will close.
fn parse_answer(
    rbuf: &[u8],
    head_method: bool,
    client_close: bool,
    wbuf: &mut Vec<u8>,
) -> Result<Head, &'static str> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        rbuf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err("the upstream's answer is not HTTP/1.x"),
    };
    let code = parsed.code.ok_or("the upstream's answer has no status")?;
    let status = StatusCode::from_u16(code).map_err(|_| "the upstream's answer has an invalid status")?;
    let interim = status.is_informational();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the upstream switched protocols unasked");
    }
    let mut connection: &[u8] = b"";
    let mut coded = false;
    let mut names = [Name::Other; MAX_HEADERS];
    for (h, kind) in parsed.headers.iter().zip(&mut names) {
        *kind = Name::of(h.name.as_bytes());
        match *kind {
            Name::Connection => connection = h.value,
            Name::TransferEncoding => coded = true,
            _ => {}
        }
    }
    let body = answer_body(status, parsed.version, parsed.headers, &names, head_method)?;
    let keep_alive =
        parsed.version == Some(1) || tokens(connection).any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
    let close = matches!(body, Body::UntilClose)
        || !keep_alive
        || tokens(connection).any(|t| t.eq_ignore_ascii_case(b"close"));

    wbuf.extend_from_slice(b"HTTP/1.1 ");
    wbuf.extend_from_slice(status.as_str().as_bytes());
    wbuf.push(b' ');
    wbuf.extend_from_slice(parsed.reason.unwrap_or_default().as_bytes());
    wbuf.extend_from_slice(b"\r\n");
    for (h, kind) in parsed.headers.iter().zip(names) {
        let name = h.name.as_bytes();
        let dropped = match kind {
            Name::Other | Name::Host | Name::Expect => {
                tokens(connection).any(|t| t.eq_ignore_ascii_case(name))
            }
            // A length beside a transfer coding is wrong, and the coding wins (RFC 9112 §6.3).
            Name::ContentLength => coded,
            Name::TransferEncoding => false,
            Name::Te => !h.value.trim_ascii().eq_ignore_ascii_case(b"trailers"),
            _ => true,
        };
        if !dropped {
            push_line(wbuf, rbuf, h);
        }
    }
    if !interim && (client_close || matches!(body, Body::UntilClose)) {
        wbuf.extend_from_slice(b"connection: close\r\n");
    }
    wbuf.extend_from_slice(b"\r\n");
    Ok(Head { status, len, body, interim, close })
}

/// How the body of an answer ends, decided as hyper's client decides it (`proto/h1/role.rs`), so
/// that the relay and the client agree: 1xx, 204, 304 and HEAD have none; a Transfer-Encoding
/// wins over Content-Length (not even read then) and is refused on HTTP/1.0, and frames by
/// chunks only when `chunked` is the last coding of the last such header (else until close);
/// a Content-Length is digits only (no sign, no space inside), the same value however often it is
/// given or listed.
fn answer_body(
    status: StatusCode,
    version: Option<u8>,
    headers: &[httparse::Header<'_>],
    names: &[Name],
    head_method: bool,
) -> Result<Body, &'static str> {
    if status.is_informational()
        || head_method
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Body::Empty);
    }
    let mut coding = None;
    let mut has_length = false;
    for (h, name) in headers.iter().zip(names) {
        match name {
            Name::TransferEncoding => coding = Some(h.value),
            Name::ContentLength => has_length = true,
            _ => {}
        }
    }
    if let Some(last) = coding {
        if version == Some(0) {
            return Err("the upstream's HTTP/1.0 answer has a Transfer-Encoding");
        }
        let chunked = std::str::from_utf8(last).is_ok_and(|v| {
            v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
                && v.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
        });
        return Ok(if chunked { Body::Chunked(Chunks::default()) } else { Body::UntilClose });
    }
    if !has_length {
        return Ok(Body::UntilClose);
    }
    let lengths = headers.iter().zip(names).filter(|(_, n)| **n == Name::ContentLength).map(|(h, _)| h.value);
    match content_length(lengths) {
        Some(0) => Ok(Body::Empty),
        Some(n) => Ok(Body::Length(n)),
        None => Err("the upstream's answer has an invalid Content-Length"),
    }
}

/// The one length that every Content-Length value states, as hyper reads them: each value
/// visible ASCII, a comma-separated list of digits-only numbers, all equal.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let mut length = None;
    for value in values {
        if !value.iter().all(|b| *b == b'\t' || (b' '..=b'~').contains(b)) {
            return None;
        }
        for item in value.split(|b| *b == b',') {
            let digits = item.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n =
                digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        }
    }
    length
}

/// What the relay makes of an answer's bytes, for the differential test against hyper
/// (`framing_differential`): the same head and body rules the relay loop follows.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RelayVerdict {
    /// The answer ends after this many bytes; and the connection closes after it.
    Ends(usize, bool),
    Refused,
    /// Its body, from this byte, runs until the connection closes.
    UntilClose(usize),
    /// Not all there.
    Incomplete,
}

/// Whether the relay refuses `answer` for a bare LF inside a chunked body's trailer line, one of
/// the two places where it is deliberately stricter than hyper (which hands the trailers to
/// httparse, and httparse takes a bare LF for a line end, and ignores what follows an empty
/// line). Refusing there is the safe side: the client's connection is cut, never read past.
#[cfg(test)]
pub(super) fn refused_for_bare_lf_in_trailers(answer: &[u8], head_method: bool) -> bool {
    let mut at = 0;
    loop {
        let rest = &answer[at..];
        let Ok(head) = parse_answer(rest, head_method, false, &mut Vec::new()) else { return false };
        at += head.len;
        if head.interim {
            continue;
        }
        let Body::Chunked(mut chunks) = head.body else { return false };
        for &b in &answer[at..] {
            let before = chunks.state;
            if chunks.scan(&[b]).is_err() {
                return b == b'\n' && matches!(before, ChunkState::TrailerValue | ChunkState::EndCr);
            }
        }
        return false;
    }
}

#[cfg(test)]
pub(super) fn relay_verdict(answer: &[u8], head_method: bool) -> RelayVerdict {
    let mut at = 0;
    loop {
        let rest = &answer[at..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        if let Ok(httparse::Status::Partial) = httparse::Response::new(&mut headers).parse(rest) {
            return RelayVerdict::Incomplete;
        }
        let head = match parse_answer(rest, head_method, false, &mut Vec::new()) {
            Ok(head) => head,
            Err(_) => return RelayVerdict::Refused,
        };
        let start = at + head.len;
        if head.interim {
            at = start;
            continue;
        }
        let mut body = head.body;
        if let Body::UntilClose = body {
            return RelayVerdict::UntilClose(start);
        }
        return match body.take(&answer[start..]) {
            Err(()) => RelayVerdict::Refused,
            Ok((n, true)) => RelayVerdict::Ends(start + n, head.close),
            Ok((_, false)) => RelayVerdict::Incomplete,
        };
    }
}

/// Whether `rbuf` holds the whole answer whose head it starts with, and nothing after it.
fn whole_in(rbuf: &[u8], head: Head) -> bool {
    let (bytes, mut body) = (&rbuf[head.len..], head.body);
    matches!(body.take(bytes), Ok((take, true)) if take == bytes.len())
}

/// Relays the answer's body after its head (already in `wbuf`), copying the framing as it is.
/// `Ok(true)`: the client connection must close (the body ran until the upstream closed).
async fn relay_body(
    client: &mut ClientSide,
    upstream: &mut Held,
    rbuf: &mut Vec<u8>,
    head: Head,
    wbuf: &mut Vec<u8>,
) -> Result<bool, Failure> {
    let mut body = head.body;
    let mut at = head.len;
    loop {
        // What of the bytes read belongs to the body, and whether it ends there.
        let available = &rbuf[at..];
        let (take, done) = body.take(available).map_err(|()| Failure::Broken)?;
        if done {
            // Read to its end: the connection is free for the next request (of any client
            // connection) before the client has its answer. Bytes after the answer put the
            // upstream out of step, and its connection is not reused.
            upstream.finished(!head.close && available.len() == take);
        }
        let part = &available[..take];
        if !wbuf.is_empty() && wbuf.len() + part.len() <= READ_CHUNK {
            // The head and what came with it, in one write.
            wbuf.extend_from_slice(part);
            flush(client, wbuf).await?;
        } else {
            flush(client, wbuf).await?;
            client.stream.write_all(part).await.map_err(|_| Failure::ClientGone)?;
        }
        if done {
            return Ok(false);
        }
        rbuf.clear();
        rbuf.reserve(READ_CHUNK);
        at = 0;
        let stream = upstream.connection_in_use().ok_or(Failure::Broken)?;
        match read_upstream(stream, rbuf, client).await {
            Ok(0) if matches!(body, Body::UntilClose) => {
                upstream.finished(false);
                return Ok(true);
            }
            Ok(0) | Err(Read::Upstream) => return Err(Failure::Broken),
            Err(Read::ClientGone) => return Err(Failure::ClientGone),
            Ok(_) => {}
        }
    }
}

/// Writes and empties `wbuf`, if it holds anything.
async fn flush(client: &mut ClientSide, wbuf: &mut Vec<u8>) -> Result<(), Failure> {
    if !wbuf.is_empty() {
        client.stream.write_all(wbuf).await.map_err(|_| Failure::ClientGone)?;
        wbuf.clear();
    }
    Ok(())
}

/// Where a chunked body's framing is: scanned (never decoded) to find where the body ends, by
/// the rules of hyper's decoder (`proto/h1/decode.rs`), so that the relay and a client built on
/// hyper agree on every answer's end: CR LF after the size, after each chunk and after each
/// trailer line (a bare LF is refused), no digits after white space, at most 16 KiB of chunk
/// extensions per body, and trailers of at most 100 lines and 16 KiB that are header lines.
#[derive(Debug, Clone, Copy, Default)]
struct Chunks {
    state: ChunkState,
    /// Extension bytes so far, in the whole body.
    extension_bytes: u32,
    /// Trailer bytes and lines so far.
    trailer_bytes: u32,
    trailer_lines: u16,
}

/// hyper's limits on what a chunked body may carry besides data.
const MAX_EXTENSION_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_LINES: u16 = 100;

#[derive(Debug, Clone, Copy, Default)]
enum ChunkState {
    /// A chunk-size line's first hex digit.
    #[default]
    Start,
    /// More hex digits, or what may follow them.
    Size(u64),
    /// White space after the size: no more digits.
    SizeLws(u64),
    /// After `;`, up to the CR.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk, at the start of a line: CR ends the body, anything else starts a
    /// trailer line.
    EndCr,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A `tchar` (RFC 9110 §5.6.2), what a header name is made of.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Chunks {
    /// Scans `bytes`: `Some(n)` when the body ends after the first `n` of them.
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            // Trailer bytes count from a trailer line's first byte to the body's last (hyper
            // buffers them to parse the trailers).
            let in_trailers = match self.state {
                EndCr => b != b'\r' || self.trailer_bytes > 0,
                EndLf => self.trailer_bytes > 0,
                TrailerName | TrailerValue | TrailerLf => true,
                _ => false,
            };
            if in_trailers {
                self.trailer_bytes += 1;
                if self.trailer_bytes >= MAX_TRAILER_BYTES {
                    return Err(());
                }
            }
            self.state = match self.state {
                Start => Size(hex(b).ok_or(())?),
                Size(n) => match hex(b) {
                    Some(d) => Size(n.checked_mul(16).and_then(|n| n.checked_add(d)).ok_or(())?),
                    None => match b {
                        b' ' | b'\t' => SizeLws(n),
                        b';' => Extension(n),
                        b'\r' => SizeLf(n),
                        _ => return Err(()),
                    },
                },
                SizeLws(n) => match b {
                    b' ' | b'\t' => SizeLws(n),
                    b';' => Extension(n),
                    b'\r' => SizeLf(n),
                    _ => return Err(()),
                },
                Extension(n) => match b {
                    b'\r' => SizeLf(n),
                    b'\n' => return Err(()),
                    _ => {
                        self.extension_bytes += 1;
                        if self.extension_bytes >= MAX_EXTENSION_BYTES {
                            return Err(());
                        }
                        Extension(n)
                    }
                },
                SizeLf(0) if b == b'\n' => EndCr,
                SizeLf(n) if b == b'\n' => Data(n),
                SizeLf(_) => return Err(()),
                Data(rest) => {
                    let take = rest.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if rest == take { DataCr } else { Data(rest - take) };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Start,
                DataCr | DataLf => return Err(()),
                EndCr if b == b'\r' => EndLf,
                EndCr if is_token(b) => TrailerName,
                EndCr => return Err(()),
                TrailerName if is_token(b) => TrailerName,
                TrailerName if b == b':' => TrailerValue,
                TrailerName => return Err(()),
                TrailerValue => match b {
                    b'\r' => TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => TrailerValue,
                    _ => return Err(()),
                },
                TrailerLf if b == b'\n' => {
                    if self.trailer_lines >= MAX_TRAILER_LINES {
                        return Err(());
                    }
                    self.trailer_lines += 1;
                    EndCr
                }
                TrailerLf => return Err(()),
                EndLf if b == b'\n' => {
                    self.state = Done;
                    return Ok(Some(i + 1));
                }
                EndLf => return Err(()),
                Done => return Ok(Some(i)),
            };
            i += 1;
        }
        Ok(None)
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Writes one of tokenproxy's own answers (an error) on a client connection.
async fn write_answer(
    stream: &mut TcpStream,
    response: http::Response<crate::body::ProxyBody>,
    close: bool,
) -> bool {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(&mut out, b"content-length", body.len().to_string().as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    stream.write_all(&out).await.is_ok()
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
    fn chunked_framing_is_scanned_to_its_end_across_any_split() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        // Whole, and split at every byte.
        assert_eq!(Chunks::default().scan(body), Ok(Some(end)));
        for split in 0..end {
            let mut chunks = Chunks::default();
            let first = chunks.scan(&body[..split]).unwrap();
            assert_eq!(first, None, "split {split}");
            assert_eq!(chunks.scan(&body[split..]), Ok(Some(end - split)), "split {split}");
        }
        assert_eq!(Chunks::default().scan(b"0\r\n\r\n"), Ok(Some(5)));
        // As hyper's decoder: a bare LF anywhere in the framing, a digit after white space, an
        // extension over 16 KiB and a trailer that is no header line are refused.
        for broken in [
            &b"0\n\n"[..],
            b"3\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\n0\r\n\r\n",
            b"3;x\nabc\r\n0\r\n\r\n",
            b"0\r\nA: b\n\r\n",
            b"0\r\n\n",
            b"5 junk\r\n",
            b"5 5\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
        ] {
            assert_eq!(Chunks::default().scan(broken), Err(()), "{:?}", String::from_utf8_lossy(broken));
        }
        let long_extension = [&b"1;"[..], &[b'x'; 16 * 1024], b"\r\na\r\n0\r\n\r\n"].concat();
        assert_eq!(Chunks::default().scan(&long_extension), Err(()));
        let fine = b"5 \t;a=b\r\nhello\r\n0\r\nX-A: 1\r\nX-B:\r\n\r\n";
        assert_eq!(Chunks::default().scan(fine), Ok(Some(fine.len())));
        assert_eq!(Chunks::default().scan(b"zz\r\n"), Err(()));
        assert_eq!(Chunks::default().scan(b"3\r\nabcX"), Err(()));
        assert_eq!(Chunks::default().scan(b"fffffffffffffffffff\r\n"), Err(()));
    }

    #[test]
    fn only_the_path_reaches_the_access_log() {
        let fwd = Listen::Forward;
        assert_eq!(path_only("http://h:1/a/b?secret=1", &fwd), "/a/b");
        assert_eq!(path_only("http://h:1?secret=1", &fwd), "/");
        assert_eq!(path_only("http://h", &fwd), "/");
    }
}
