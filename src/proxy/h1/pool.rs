//! HTTP/1.1 upstream connections, over TCP or verified TLS: the idle ones shared by every client
//! connection, and the one a client connection holds while it uses it ([`Held`]).
//!
//! - A client connection's first request borrows an idle connection (or dials one) and gives it
//!   back once its response has been read to the end, so that clients that open a connection per
//!   request share upstream connections.
//! - From its second request to a host on, a client connection keeps its upstream connection until
//!   either side closes: no pool round trip per request. At most `proxy.max_idle_per_host` client
//!   connections keep one per host at a time; the others go on borrowing.
//! - The pool keeps at most `proxy.max_idle_per_host` idle connections per host, each for at most
//!   90 seconds, and drops those the upstream closed.
//!
//! The connections are bare TCP streams (or TLS streams on them): the relay ([`super`]) reads
//! and writes HTTP/1.1 on them itself, so an idle one costs a socket (and its TLS state).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Target;
use crate::egress::{DialError, Egress};

/// How long an idle connection stays in the pool.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A connection the relay speaks HTTP/1.1 on: a TCP stream, or TLS on one.
pub trait Upstream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// What turns a TCP connection into one of these (nothing, or a TLS handshake).
    type Establish: Send + Sync;

    fn establish(
        with: &Self::Establish,
        tcp: TcpStream,
        target: &Target,
    ) -> impl std::future::Future<Output = Result<Self, DialError>> + Send;

    /// The TCP stream underneath.
    fn tcp(&self) -> &TcpStream;
}

impl Upstream for TcpStream {
    type Establish = ();

    async fn establish((): &(), tcp: TcpStream, _: &Target) -> Result<TcpStream, DialError> {
        Ok(tcp)
    }

    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// Verified TLS to an HTTPS upstream, offering only HTTP/1.1 (ALPN): the relay speaks nothing
/// else.
impl Upstream for TlsStream<TcpStream> {
    type Establish = tokio_rustls::TlsConnector;

    async fn establish(
        connector: &tokio_rustls::TlsConnector,
        tcp: TcpStream,
        target: &Target,
    ) -> Result<Self, DialError> {
        let host = target.host().trim_start_matches('[').trim_end_matches(']');
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| DialError::Tls {
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
        })?;
        connector.connect(name, tcp).await.map_err(|error| DialError::Tls { error })
    }

    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// The idle plain-HTTP/1.1 connections, per upstream host.
pub type PlainPool = Pool<TcpStream>;
/// The idle HTTPS (HTTP/1.1 over TLS) connections, per upstream host.
pub type TlsPool = Pool<TlsStream<TcpStream>>;

/// The idle connections of one kind, per upstream host.
pub struct Pool<C: Upstream> {
    hosts: Mutex<HashMap<Authority, Host<C>, foldhash::fast::RandomState>>,
    max_per_host: usize,
    egress: Arc<Egress>,
    connect_timeout: Duration,
    establish: C::Establish,
}

struct Host<C> {
    /// Newest last, with the time each went idle.
    idle: Vec<(C, Instant)>,
    /// Client connections that keep a connection to this host between requests.
    kept: usize,
}

impl<C> Default for Host<C> {
    fn default() -> Self {
        Host { idle: Vec::new(), kept: 0 }
    }
}

/// Whether an idle connection is still open: the upstream has neither closed it nor sent
/// anything (an idle HTTP/1.1 connection has nothing to say, and a TLS one nothing either once
/// its handshake's messages were read with the first answer). No system call unless the socket
/// has had an event since it was last read. A byte read here makes the connection useless, which
/// it already was.
fn still_open<C: Upstream>(stream: &C) -> bool {
    matches!(stream.tcp().try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl PlainPool {
    pub fn new(egress: Arc<Egress>, connect_timeout: Duration, max_per_host: usize) -> PlainPool {
        Pool::with(egress, connect_timeout, max_per_host, ())
    }
}

impl TlsPool {
    /// Connections verified with `tls` (the data path's roots), offering only HTTP/1.1.
    pub fn new_tls(
        egress: Arc<Egress>,
        connect_timeout: Duration,
        max_per_host: usize,
        tls: &rustls::ClientConfig,
    ) -> TlsPool {
        let mut config = tls.clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        Pool::with(egress, connect_timeout, max_per_host, connector)
    }
}

impl<C: Upstream> Pool<C> {
    fn with(
        egress: Arc<Egress>,
        connect_timeout: Duration,
        max_per_host: usize,
        establish: C::Establish,
    ) -> Self {
        Pool { hosts: Mutex::default(), max_per_host, egress, connect_timeout, establish }
    }

    #[allow(clippy::type_complexity)]
    fn lock(&self) -> MutexGuard<'_, HashMap<Authority, Host<C>, foldhash::fast::RandomState>> {
        // A panic elsewhere cannot leave the map half-changed: every change is one call.
        self.hosts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection to `authority` that is still open, newest first.
    fn take(&self, authority: &Authority) -> Option<C> {
        let mut hosts = self.lock();
        let host = hosts.get_mut(authority)?;
        while let Some((stream, since)) = host.idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && still_open(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Takes a connection back if there is room; otherwise it closes.
    fn put(&self, authority: &Authority, stream: C) {
        let mut hosts = self.lock();
        let host = hosts.entry(authority.clone()).or_default();
        host.idle.retain(|(_, since)| since.elapsed() < IDLE_TIMEOUT);
        if host.idle.len() < self.max_per_host {
            host.idle.push((stream, Instant::now()));
        }
    }

    /// A place for one more client connection to keep a connection to `authority`, if any is
    /// left.
    fn try_keep(&self, authority: &Authority) -> bool {
        let mut hosts = self.lock();
        let host = hosts.entry(authority.clone()).or_default();
        let room = host.kept < self.max_per_host;
        host.kept += usize::from(room);
        room
    }

    fn release_keep(&self, authority: &Authority) {
        if let Some(host) = self.lock().get_mut(authority) {
            host.kept = host.kept.saturating_sub(1);
        }
    }

    /// A new connection: dialled through the egress policy, then established (TLS), each
    /// within `connect_timeout`.
    async fn dial(&self, target: &Target) -> Result<C, DialError> {
        let stream = self.egress.connect(target.host(), target.port, self.connect_timeout).await?;
        let _ = stream.set_nodelay(true);
        let established = C::establish(&self.establish, stream, target);
        tokio::time::timeout(self.connect_timeout, established)
            .await
            .unwrap_or(Err(DialError::Timeout(self.connect_timeout)))
    }

    /// Closes connections idle too long or closed by the upstream, and forgets hosts with none
    /// left. Called periodically: an idle connection is otherwise only looked at when taken.
    pub fn sweep(&self) {
        self.lock().retain(|_, host| {
            host.idle.retain(|(stream, since)| since.elapsed() < IDLE_TIMEOUT && still_open(stream));
            !host.idle.is_empty() || host.kept > 0
        });
    }
}

/// The upstream connection a client connection uses, owned by that connection's task.
pub struct Held<C: Upstream = TcpStream> {
    pool: Arc<Pool<C>>,
    conn: Option<(Authority, C)>,
    /// `conn` holds a keeping place of its host ([`PlainPool::try_keep`]); otherwise it is
    /// borrowed, and goes back to the pool after each response.
    kept: bool,
    /// Requests this client connection has sent upstream.
    requests: u64,
    /// An exchange is under way on `conn`: if it is not finished, the connection closes.
    busy: bool,
}

impl<C: Upstream> Held<C> {
    pub fn new(pool: Arc<Pool<C>>) -> Held<C> {
        Held { pool, conn: None, kept: false, requests: 0, busy: false }
    }

    /// The connection for a request to `target`, and whether it has served a request before
    /// (and so may have been closed by the upstream meanwhile).
    pub async fn connection(&mut self, target: &Target) -> Result<(&mut C, bool), DialError> {
        self.requests += 1;
        if std::mem::take(&mut self.busy) {
            // The last exchange never finished (an error or a timeout cut it short): whatever is
            // left of it on the connection makes the connection unusable.
            if let Some((authority, _)) = self.conn.take() {
                self.forget_keep(&authority);
            }
        }
        // The one kept from the last request, unless the upstream has closed it since.
        if self
            .conn
            .as_ref()
            .is_some_and(|(authority, stream)| *authority == target.authority && still_open(stream))
        {
            self.busy = true;
            let (_, stream) = self.conn.as_mut().expect("just checked");
            return Ok((stream, true));
        }
        self.give_back(); // another host's
        self.busy = true;
        // A second request shows a keep-alive client: it keeps its connection from now on.
        self.kept = self.requests >= 2 && self.pool.try_keep(&target.authority);
        let (stream, reused) = match self.pool.take(&target.authority) {
            Some(stream) => (stream, true),
            None => match self.pool.dial(target).await {
                Ok(stream) => (stream, false),
                Err(e) => {
                    self.forget_keep(&target.authority);
                    return Err(e);
                }
            },
        };
        let (_, stream) = self.conn.insert((target.authority.clone(), stream));
        Ok((stream, reused))
    }

    /// A new connection to `target` in place of the one in use, which the upstream closed.
    pub async fn redial(&mut self, target: &Target) -> Result<&mut C, DialError> {
        self.conn = None;
        match self.pool.dial(target).await {
            Ok(stream) => Ok(&mut self.conn.insert((target.authority.clone(), stream)).1),
            Err(e) => {
                self.forget_keep(&target.authority);
                Err(e)
            }
        }
    }

    /// The connection of the exchange under way.
    pub fn connection_in_use(&mut self) -> Option<&mut C> {
        self.conn.as_mut().filter(|_| self.busy).map(|(_, stream)| stream)
    }

    /// The response has been read to its end: a reusable connection stays (kept) or goes back
    /// to the pool (borrowed); any other closes.
    pub fn finished(&mut self, reusable: bool) {
        self.busy = false;
        if !reusable {
            if let Some((authority, _)) = self.conn.take() {
                self.forget_keep(&authority);
            }
        } else if !self.kept {
            self.give_back();
        }
    }

    /// Empties the slot and frees its place. An idle connection goes back to the pool; one in the
    /// middle of an exchange (the client left, or an error ended it) closes.
    fn give_back(&mut self) {
        let busy = std::mem::take(&mut self.busy);
        if let Some((authority, stream)) = self.conn.take() {
            self.forget_keep(&authority);
            if !busy && still_open(&stream) {
                self.pool.put(&authority, stream);
            }
        }
    }

    fn forget_keep(&mut self, authority: &Authority) {
        if std::mem::take(&mut self.kept) {
            self.pool.release_keep(authority);
        }
    }
}

impl<C: Upstream> Drop for Held<C> {
    fn drop(&mut self) {
        self.give_back();
    }
}
