//! Where tokenproxy may connect to (SPEC §5 `[egress] deny`).
//!
//! Every outbound TCP connection of the data path — the pooled upstream client, blind tunnels,
//! and later the transparent relay — is dialled by [`Egress::connect`], which resolves the name
//! itself and checks each *resolved* address: `127.1`, `2130706433`, `0x7f000001` and
//! `localhost` are all loopback once resolved, whatever they look like as strings. The check
//! happens before the address is dialled, and the address checked is the one dialled, so a name
//! that resolves differently a second time (DNS rebinding) gains nothing.
//!
//! tokenproxy's own listeners (the admin API with its refresh endpoint, the proxy port itself)
//! are never dialled, whatever the deny-list says.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::net::TcpStream;

/// Why a connection was not attempted or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{host} resolves to {addr}, {why}")]
    Denied { host: String, addr: SocketAddr, why: &'static str },
    #[error("cannot resolve {host}: {error}")]
    Resolve { host: String, error: std::io::Error },
    #[error("{error}")]
    Connect { error: std::io::Error },
    #[error("no connection within {}s", .0.as_secs())]
    Timeout(Duration),
    /// The TLS handshake with the upstream failed (its certificate, most often).
    #[error("TLS with the upstream failed: {error}")]
    Tls { error: std::io::Error },
}

/// The egress policy, shared by every dialer.
#[derive(Debug, Default)]
pub struct Egress {
    deny: Vec<IpNet>,
    /// tokenproxy's own listeners, known once they are bound.
    own: OnceLock<Vec<SocketAddr>>,
    /// With a transparent listener: the local addresses of the connections just dialled, so that
    /// one redirected back to tokenproxy is known for its own (a loop) when it arrives.
    recent_dials: Option<std::sync::Mutex<std::collections::VecDeque<(SocketAddr, std::time::Instant)>>>,
}

/// How long a dial's local address is remembered: a redirected connection arrives within
/// moments of its connect.
const RECENT_DIAL: Duration = Duration::from_secs(2);
/// The most dials remembered at once.
const RECENT_DIALS_KEPT: usize = 4096;

impl Egress {
    pub fn new(deny: Vec<IpNet>) -> Egress {
        Egress { deny, own: OnceLock::new(), recent_dials: None }
    }

    /// Remembers each dial's local address, for [`Egress::is_own_dial`] (transparent mode).
    pub fn remembering_dials(mut self) -> Egress {
        self.recent_dials = Some(std::sync::Mutex::default());
        self
    }

    /// Connects to `addr`. When dials are remembered, the socket is bound first, so that its
    /// local port is remembered before the connection exists: a redirected one can reach the
    /// transparent listener's accept, on another thread, before `connect` returns here.
    async fn dial(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        if self.recent_dials.is_none() {
            return TcpStream::connect(addr).await;
        }
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        let any = match addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        socket.bind(any)?;
        self.remember_dial(socket.local_addr()?);
        socket.connect(addr).await
    }

    fn remember_dial(&self, local: SocketAddr) {
        let Some(recent) = &self.recent_dials else { return };
        let mut recent = recent.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        while recent.front().is_some_and(|(_, at)| now.duration_since(*at) > RECENT_DIAL)
            || recent.len() >= RECENT_DIALS_KEPT
        {
            recent.pop_front();
        }
        recent.push_back((local, now));
    }

    /// Whether `peer` is the local end of a connection tokenproxy dialled moments ago.
    pub fn is_own_dial(&self, peer: SocketAddr) -> bool {
        let Some(recent) = &self.recent_dials else { return false };
        let recent = recent.lock().unwrap_or_else(|e| e.into_inner());
        // Bound before connecting, a dial's address is unspecified: its port decides.
        recent.iter().any(|(local, at)| {
            local.port() == peer.port()
                && (local.ip().is_unspecified() || local.ip().to_canonical() == peer.ip().to_canonical())
                && at.elapsed() <= RECENT_DIAL
        })
    }

    /// Records tokenproxy's own listeners, which are never dialled. Called once, after binding.
    pub fn set_own_listeners(&self, listeners: Vec<SocketAddr>) {
        let _ = self.own.set(listeners);
    }

    /// Whether `addr` may be dialled; the reason when not.
    pub fn check(&self, addr: SocketAddr) -> Result<(), &'static str> {
        // `::ffff:127.0.0.1` is 127.0.0.1.
        let ip = addr.ip().to_canonical();
        let own = self.own.get().map(Vec::as_slice).unwrap_or_default();
        let is_own = own.iter().any(|listener| {
            let bound = listener.ip().to_canonical();
            listener.port() == addr.port()
                && (bound == ip
                    || ip.is_unspecified()
                    || (bound.is_unspecified() && (ip.is_loopback() || is_local_address(ip))))
        });
        if is_own {
            return Err("one of tokenproxy's own listeners, which are never reachable through it");
        }
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return Err("which is in [egress] deny");
        }
        Ok(())
    }

    /// Resolves `host`, drops every address the policy denies, and connects to the first allowed
    /// one that answers, all within `timeout`. `host` is a name or an IP literal without
    /// brackets.
    pub async fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<TcpStream, DialError> {
        match tokio::time::timeout(timeout, self.connect_unbounded(host, port)).await {
            Ok(result) => result,
            Err(_) => Err(DialError::Timeout(timeout)),
        }
    }

    async fn connect_unbounded(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|error| DialError::Resolve { host: host.to_string(), error })?
                .collect(),
        };
        let mut denied = None;
        let mut last_error = None;
        for addr in addrs {
            if let Err(why) = self.check(addr) {
                denied.get_or_insert(DialError::Denied { host: host.to_string(), addr, why });
                continue;
            }
            match self.dial(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(error) => last_error = Some(DialError::Connect { error }),
            }
        }
        Err(last_error.or(denied).unwrap_or_else(|| DialError::Resolve {
            host: host.to_string(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        }))
    }
}

/// Whether `ip` is one of this machine's own addresses (a pod's IP, a node's other interfaces):
/// only then can a socket be bound to it. Asked of the kernel at the moment of the dial, so an
/// address that appeared after the start counts too. Only called for a port one of tokenproxy's
/// listeners on every address uses, so the data path pays nothing for it otherwise.
pub fn is_local_address(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Parses `[egress] deny` entries: CIDRs (`10.0.0.0/8`) or single addresses.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The first [`DialError`] in an error's chain of causes, if any.
pub fn find_dial_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(dial) = e.downcast_ref::<DialError>() {
            return Some(dial);
        }
        source = e.source();
    }
    None
}

/// The TCP connector under the pooled upstream client: every connection goes through
/// [`Egress::connect`]. It sits inside the TLS connector, which takes the server name from the
/// URI, so certificate checks still use the name and never the address.
#[derive(Clone)]
pub struct EgressConnector {
    pub egress: Arc<Egress>,
    pub timeout: Duration,
}

impl tower_service::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            this.egress.connect(host, port, this.timeout).await.map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_nets_and_own_listeners_are_refused() {
        let egress = Egress::new(vec![parse_net("10.0.0.0/8").unwrap(), parse_net("192.0.2.7").unwrap()]);
        egress.set_own_listeners(vec!["127.0.0.1:9090".parse().unwrap(), "0.0.0.0:8080".parse().unwrap()]);
        let check = |s: &str| egress.check(s.parse().unwrap()).is_ok();
        assert!(!check("10.1.2.3:443"));
        assert!(!check("192.0.2.7:80"));
        assert!(check("192.0.2.8:80"));
        assert!(!check("127.0.0.1:9090"), "the admin listener");
        assert!(!check("0.0.0.0:9090"), "0.0.0.0 dials the local host");
        assert!(!check("127.0.0.5:8080"), "a listener on every address is reachable on loopback");
        assert!(!check("[::ffff:127.0.0.1]:9090"), "an IPv4-mapped address is its IPv4 address");
        assert!(check("127.0.0.1:9091"));
        assert!(parse_net("not-a-net").is_none());
    }
}
