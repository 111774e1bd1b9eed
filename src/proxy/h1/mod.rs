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
//! plain-HTTP target on the forward port (or any form on a route to a plain-HTTP upstream, or
//! origin form inside an intercepted tunnel, over verified TLS to the host), whose token is
//! current. Everything else — CONNECT, bodies, upgrades, routes to HTTPS upstreams, HTTP/1.0, a
//! malformed or oversized head, a token that must be waited for, a request tokenproxy refuses —
//! is handed over with the bytes read so far to hyper ([`crate::server::serve`]), which serves the
//! rest of the connection. What a request carries is asked of [`crate::proxy::decide`], as hyper's
//! path asks it; a refusal is answered by hyper's path, so every refusal is written once.
//!
//! The folder: this loop and the exchange; [`request`], the request head (read, decided,
//! rewritten); [`answer`], the answer head and where its body ends, by hyper's rules; [`pool`],
//! the idle upstream connections; `differential`, the test that holds `answer` to hyper's.
//!
//! What it owes the contract: the provider's token in the provider's header (or the client's,
//! with `client_header = "keep"`), hop-by-hop and `Connection`-named headers and tokenproxy's own
//! headers removed both ways, `Host` from the target, `upstream_timeout` for connect + response
//! head, `header_read_timeout` for every request head, one refresh and one retry after a status
//! in `refresh_on_status` (nothing to replay but the head), the request metrics and access log,
//! the upstream connection closed when the client leaves mid-answer, and pipelined requests
//! answered in order.

mod answer;
#[cfg(test)]
mod differential;
pub mod pool;
mod request;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::callers::Peer;
use crate::config::RouteConfig;
use crate::drain::DrainWatch;
use crate::errors::ProxyError;
use crate::proxy::{Proxy, Target, access, dial_error};
use answer::{Body, BrokenChunks, Head, parse_answer, whole_in};
use pool::{Held, Pool, Upstream};
use request::{Reading, Request, Resolved, head_end, push_header};

/// Header lines a request or response head may have (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;
/// The first read of a head: most heads fit, and a buffer this small is recycled by the
/// allocator's per-thread cache instead of its general bins.
const FIRST_READ: usize = 1024;
/// What each read of a body asks the socket for.
const READ_CHUNK: usize = 16 * 1024;
/// The largest response head read from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a TLS client connection's `close_notify` may take to write.
const CLOSE_NOTIFY_LIMIT: Duration = Duration::from_secs(1);

/// Which requests a listener takes: absolute-form ones (the forward port), every one to a
/// route's upstream, or origin-form ones inside an intercepted tunnel.
pub enum Listen {
    Forward,
    Route(Arc<RouteConfig>),
    /// Inside one interception: every request goes to the tunnel's host with its provider's
    /// token, decided with the CONNECT's proxy credentials (SPEC §6), whatever its own `Host`
    /// and `Proxy-Authorization` say.
    Tunnel {
        target: Target,
        provider: Arc<crate::tokens::Provider>,
        credentials: Option<Box<[u8]>>,
    },
}

/// Serves the plain-HTTP/1.1 requests of one listener's connections.
pub struct PlainRelay {
    pub proxy: Arc<Proxy>,
    pub listen: Listen,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// How a connection left the relay.
pub enum Served<S = TcpStream> {
    Closed,
    /// For hyper, from the first request this module does not relay: the socket, and the bytes
    /// read from it and not yet answered.
    HandOff {
        stream: S,
        read: Vec<u8>,
    },
}

/// A client connection the relay reads requests from: a socket, or TLS (or plain HTTP) inside
/// an intercepted tunnel.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Completes when a read may find bytes: until then, a connection waiting for its next
    /// request holds no buffer. A stream that buffers inside (TLS, bytes read ahead) is always
    /// ready: its socket's readiness does not tell.
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;

    /// Ends the connection when the relay closes it: a TLS client is owed a `close_notify`
    /// (without it, a client reading to the end sees a truncation); a socket closes when dropped.
    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::ready(())
    }
}

impl ClientIo for TcpStream {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for tokio_rustls::server::TlsStream<T> {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    async fn close(&mut self) {
        // Bounded: a client that reads nothing more must not hold the task.
        let _ = tokio::time::timeout(CLOSE_NOTIFY_LIMIT, self.shutdown()).await;
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for crate::relay::Rewound<T> {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Writes all of `bytes` and flushes them: a TLS stream may keep records back until flushed
/// (on a TCP stream the flush does nothing).
async fn send_all<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The client's side of the connection: its socket and what has been read and not yet used.
struct ClientSide<S> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
}

impl<S: ClientIo> ClientSide<S> {
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

    fn hand_off(mut self) -> Served<S> {
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

impl PlainRelay {
    /// Serves `stream` until it closes, or until a request this module does not relay.
    pub async fn serve(&self, stream: TcpStream, peer: &Peer, drain: &mut DrainWatch) -> Served {
        self.serve_with(stream, self.proxy.plain.clone(), peer, drain).await
    }

    /// Serves `stream` with upstream connections from `pool` (plain or TLS, as the relay's
    /// targets are), until it closes or a request this module does not relay.
    pub async fn serve_with<S: ClientIo, C: Upstream>(
        &self,
        stream: S,
        pool: Arc<Pool<C>>,
        peer: &Peer,
        drain: &mut DrainWatch,
    ) -> Served<S> {
        let mut client = ClientSide { stream, buf: Vec::new(), start: 0 };
        let mut upstream = Held::new(pool);
        let mut last = None;
        loop {
            let head_len = match self.read_head(&mut client, drain).await {
                HeadRead::Complete(n) => n,
                HeadRead::Closed => break,
                HeadRead::HandOff => return client.hand_off(),
            };
            match self.exchange(&mut client, peer, head_len, &mut upstream, &mut last).await {
                Next::Serve if !drain.is_signaled() => {}
                Next::Serve | Next::Close => break,
                Next::HandOff => return client.hand_off(),
            }
        }
        drop(upstream);
        client.stream.close().await;
        Served::Closed
    }

    /// Waits for a complete request head, within `header_read_timeout` from when the wait began
    /// (as hyper does: an idle keep-alive connection is closed after it too). A connection with
    /// nothing unread holds no buffer while it waits.
    async fn read_head<S: ClientIo>(&self, client: &mut ClientSide<S>, drain: &mut DrainWatch) -> HeadRead {
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
    async fn exchange<S: ClientIo, C: Upstream>(
        &self,
        client: &mut ClientSide<S>,
        peer: &Peer,
        head_len: usize,
        upstream: &mut Held<C>,
        last: &mut Option<Resolved>,
    ) -> Next {
        let mut head = Vec::with_capacity(512);
        let mut read = self.read_request(&client.unread()[..head_len], peer, &mut head, last);
        if let Reading::LoadFirst(provider, name) = read {
            // An account's first request waits for its one read from the store, here as on
            // hyper's path, and keeps the connection on the relay.
            provider.load_named(&name).await;
            head.clear();
            read = self.read_request(&client.unread()[..head_len], peer, &mut head, last);
        }
        let Reading::Request(request) = read else { return Next::HandOff };
        let mut out = Outgoing { token_line_at: head.len(), head };
        out.end_with_token(request.injected.as_ref().map(|i| (&i.provider.config.header, &*i.token)));
        client.consume(head_len);

        let outcome = self.answer(client, upstream, &request, out).await;
        let mut access = request.access;
        let (status, retried, next) = match outcome {
            Ok((status, retried, close)) => (status, retried, if close { Next::Close } else { Next::Serve }),
            Err(Failure::Refused(e)) => {
                let status = e.status();
                access::log_refusal(request.provider.as_deref(), &e);
                access.refused(&e);
                let sent = write_answer(&mut client.stream, e.into_response(), request.client_close).await;
                (status, false, if sent && !request.client_close { Next::Serve } else { Next::Close })
            }
            Err(Failure::Cut(status)) => (status, false, Next::Close),
            Err(Failure::Broken) => (StatusCode::BAD_GATEWAY, false, Next::Close),
            // Gone before its answer: nothing to count, as when hyper drops the request.
            Err(Failure::ClientGone) => return Next::Close,
        };
        let account = request.injected.as_ref().map(|i| i.credential.as_ref());
        let provider = request.provider.as_deref();
        self.proxy.record(provider, access, &request.verdict, status, account, retried);
        next
    }

    /// Sends the request and relays its answer; after a status in `refresh_on_status`, refreshes
    /// the token once and relays the retry's answer instead. Returns the status the client got,
    /// whether it came from a retry, and whether the client connection must close.
    async fn answer<S: ClientIo, C: Upstream>(
        &self,
        client: &mut ClientSide<S>,
        upstream: &mut Held<C>,
        request: &Request,
        mut out: Outgoing,
    ) -> Result<(StatusCode, bool, bool), Failure> {
        let mut bufs =
            Buffers { read: Vec::with_capacity(FIRST_READ), write: Vec::with_capacity(FIRST_READ) };
        let head = self.send(client, upstream, request, &out.head, &mut bufs).await?;

        // A dead token: the answer waits, its body unread, while one refresh is tried; if that
        // fails, the client gets this answer after all. (Nothing to replay but the head.)
        let fresh = match &request.injected {
            Some(injected) => {
                self.proxy.token_for_retry(injected, head.status, true).await.map(|t| (injected, t))
            }
            None => None,
        };
        let Some((injected, fresh)) = fresh else {
            let close =
                relay_body(client, upstream, &mut bufs, head).await.map_err(|f| f.in_body(head.status))?;
            return Ok((head.status, false, close || request.client_close));
        };
        // The dead answer is dropped: its connection is reused if the whole of it has been read
        // (as a short answer is, with its head), and closed otherwise.
        upstream.finished(!head.close && whole_in(&bufs.read, head));
        out.end_with_token(Some((&injected.provider.config.header, &fresh)));
        bufs.read.clear();
        bufs.write.clear();
        let sent = self.send(client, upstream, request, &out.head, &mut bufs).await;
        injected.record_retry(sent.as_ref().ok().map(|head| head.status));
        let head = sent?;
        let close =
            relay_body(client, upstream, &mut bufs, head).await.map_err(|f| f.in_body(head.status))?;
        Ok((head.status, true, close || request.client_close))
    }

    /// Sends the request head and reads the answer's head within `upstream_timeout`, relaying
    /// interim (1xx) answers. A reused connection that the upstream closed meanwhile is replaced
    /// once. The client-bound head is in `bufs.write`, the bytes read after it in `bufs.read`.
    async fn send<S: ClientIo, C: Upstream>(
        &self,
        client: &mut ClientSide<S>,
        upstream: &mut Held<C>,
        request: &Request,
        out: &[u8],
        bufs: &mut Buffers,
    ) -> Result<Head, Failure> {
        let timeout = self.proxy.settings.upstream_timeout;
        let target = &request.target;
        let Buffers { read: rbuf, write: wbuf } = bufs;
        let exchange = async {
            let refused = |e| Failure::Refused(dial_error(target, e));
            let (mut stream, reused) = upstream.connection(target).await.map_err(refused)?;
            // A reused connection the upstream closed just as the request went out: the request
            // goes once more on a new one, if sending it twice can do no harm.
            let mut may_resend = reused && request.idempotent;
            let mut sent = send_all(stream, out).await.is_ok();
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
                        sent = send_all(stream, out).await.is_ok();
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

/// The upstream's request head, written once; its token line comes last, so that the retry after
/// a dead token rewrites only that line.
struct Outgoing {
    head: Vec<u8>,
    /// Where the token line (or, with none, the blank line) starts.
    token_line_at: usize,
}

impl Outgoing {
    /// Ends the head with the token's line (its header and value), if any, and the blank line, in
    /// place of what ended it.
    fn end_with_token(&mut self, token: Option<(&http::HeaderName, &crate::tokens::Token)>) {
        self.head.truncate(self.token_line_at);
        if let Some((header, token)) = token {
            push_header(&mut self.head, header.as_str().as_bytes(), token.header_value().as_bytes());
        }
        self.head.extend_from_slice(b"\r\n");
    }
}

/// One exchange's buffers: bytes read from the upstream, and bytes waiting for the client.
struct Buffers {
    read: Vec<u8>,
    write: Vec<u8>,
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
async fn read_answer_head<S: ClientIo, C: Upstream>(
    stream: &mut C,
    rbuf: &mut Vec<u8>,
    client: &mut ClientSide<S>,
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
async fn read_upstream<S: ClientIo, C: Upstream>(
    stream: &mut C,
    rbuf: &mut Vec<u8>,
    client: &mut ClientSide<S>,
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

/// Relays the answer's body after its head (already in `bufs.write`), copying the framing as it
/// is. `Ok(true)`: the client connection must close (the body ran until the upstream closed).
async fn relay_body<S: ClientIo, C: Upstream>(
    client: &mut ClientSide<S>,
    upstream: &mut Held<C>,
    bufs: &mut Buffers,
    head: Head,
) -> Result<bool, Failure> {
    let Buffers { read: rbuf, write: wbuf } = bufs;
    let mut body = head.body;
    let mut at = head.len;
    loop {
        // What of the bytes read belongs to the body, and whether it ends there.
        let available = &rbuf[at..];
        let (take, done) = body.take(available).map_err(|BrokenChunks| Failure::Broken)?;
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
            send_all(&mut client.stream, part).await.map_err(|_| Failure::ClientGone)?;
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
async fn flush<S: ClientIo>(client: &mut ClientSide<S>, wbuf: &mut Vec<u8>) -> Result<(), Failure> {
    if !wbuf.is_empty() {
        send_all(&mut client.stream, wbuf).await.map_err(|_| Failure::ClientGone)?;
        wbuf.clear();
    }
    Ok(())
}

/// Writes one of tokenproxy's own answers (an error) on a client connection.
async fn write_answer<S: ClientIo>(
    stream: &mut S,
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
    send_all(stream, &out).await.is_ok()
}
