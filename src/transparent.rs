//! Transparent interception (SPEC §12): connections that iptables redirected to
//! `[transparent] listen`, from programs that honour no proxy setting.
//!
//! The original destination comes from `SO_ORIGINAL_DST`. The first bytes are peeked, not read,
//! so that a connection tokenproxy does not intercept is relayed with every byte as the client
//! sent it:
//! - a TLS ClientHello whose SNI matches a provider is intercepted exactly as a CONNECT is (the
//!   same leaf, injection, retry, accounts and metrics), and the upstream is dialled by the SNI
//!   name with verified TLS, never at the redirected address;
//! - a plain-HTTP request whose Host matches a provider is forwarded with injection under the
//!   plaintext rules;
//! - anything else goes to its original destination untouched (or is closed when
//!   `[egress] allow_unmatched = false`).
//!
//! A connection whose original destination is one of tokenproxy's own listeners is closed: that
//! is a redirect loop, not a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use tokio::net::{TcpListener, TcpStream};

use crate::callers::Peer;
use crate::drain::DrainWatch;
use crate::proxy::access::Access;
use crate::proxy::{Exchange, InterceptedHost, Proxy, Target};
use crate::relay;
use crate::server::Acceptor;

/// The most bytes peeked to find an SNI or a Host header.
const PEEK_LIMIT: usize = 16 * 1024;

/// What the first bytes of a redirected connection say.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// A TLS ClientHello, with its server name if it sent one.
    Tls(Option<String>),
    /// A plain-HTTP request head, with its Host.
    Http(Option<String>),
    /// Neither, or not complete within the limits: relayed as it is.
    Other,
}

/// Accepts redirected connections until shutdown, under the same bounds as every listener
/// (`proxy.max_connections`, backoff and a rate-limited log line when accepting fails).
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, own: Vec<SocketAddr>, mut drain: DrainWatch) {
    // Shared by every connection, not copied for each.
    let own: Arc<[SocketAddr]> = own.into();
    let mut acceptor = Acceptor::new("transparent", listener, proxy.settings.max_connections);
    while let Some((stream, peer, place)) = acceptor.next(&mut drain).await {
        // tokenproxy's own outbound connection, redirected back to it (iptables that do not
        // spare its user): a loop, refused before it is dialled again.
        if proxy.egress.is_own_dial(peer) {
            tracing::warn!(
                peer = %peer,
                "a connection tokenproxy itself made was redirected back to it: refused (the iptables rules must spare tokenproxy's user: tokenproxy iptables --uid)"
            );
            continue;
        }
        let proxy = proxy.clone();
        let own = own.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let _place = place;
            if let Err(reason) = handle(proxy, stream, peer, &own, drain).await {
                tracing::debug!(peer = %peer, reason, "transparent connection closed");
            }
        });
    }
}

async fn handle(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    own: &[SocketAddr],
    drain: DrainWatch,
) -> Result<(), String> {
    let original = original_destination(&stream).map_err(|e| format!("no original destination: {e}"))?;
    if own.iter().any(|listener| same_endpoint(*listener, original)) {
        return Err(format!("{original} is tokenproxy's own listener: a redirect loop"));
    }
    // The client's socket is connected to where it was going: that is its remote end.
    let peer = Arc::new(Peer::new(peer, original, "transparent"));
    let deadline = tokio::time::Instant::now() + proxy.settings.header_read_timeout;
    let opening = peek_opening(&stream, deadline).await?;
    let port = original.port();
    let (scheme, name) = match &opening {
        Opening::Tls(Some(sni)) => (Scheme::HTTPS, Some(sni.clone())),
        Opening::Http(Some(host)) => {
            let name = crate::hosts::split_host_port(host).map_or(host.as_str(), |(name, _)| name);
            (Scheme::HTTP, Some(name.to_string()))
        }
        _ => (Scheme::HTTP, None),
    };
    let provider = name.as_deref().and_then(|name| proxy.providers.for_host(name, port).cloned());
    if let (Some(provider), Some(name)) = (provider, name) {
        let authority: Authority = format!("{}:{port}", crate::hosts::bracketed(&name))
            .parse()
            .map_err(|_| format!("{name:?} is not a host name"))?;
        let target = Target::new(scheme, &authority).map_err(|e| e.to_string())?;
        let tls = proxy.leaves.server_config(target.host()).await.map_err(|e| format!("{e:#}"))?;
        tracing::debug!(host = %authority, original = %original, "transparent connection: intercepted");
        InterceptedHost::new(proxy, target, provider, peer).serve(stream, tls, drain).await;
        return Ok(());
    }
    // Bytes to a host of no provider: admitted (the caller, `[egress]`) before any is relayed.
    let target =
        Target::new(Scheme::HTTPS, &Authority::try_from(original.to_string()).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let mut ex = Exchange::connect(target, None, None, &peer);
    if let Err(e) = proxy.admit(&mut ex) {
        let mut access = Access::begin(proxy.keeps_lines(), "CONNECT", || "-", peer.listener);
        access.host(&ex.target);
        let _answer = proxy.finish(None, access, &ex.verdict, Err(e));
        return Err(format!("{original}: refused"));
    }
    // Untouched, to where it was going (the deny list still applies to the address).
    let upstream = proxy
        .egress
        .connect(&original.ip().to_string(), port, proxy.settings.upstream_timeout)
        .await
        .map_err(|e| format!("relay to {original}: {e}"))?;
    tracing::debug!(original = %original, "transparent connection: relayed untouched");
    let joined = relay::join(stream, upstream, proxy.settings.idle_timeout, drain);
    tokio::select! {
        _ = joined => {}
        () = proxy.revoked(&ex.target, None, &peer) => {}
    }
    Ok(())
}

/// `SO_ORIGINAL_DST` (or its IPv6 form): where the client was going before the redirect.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let address = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    address
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the original destination is not an IP socket address"))
}

/// A listener on `0.0.0.0` is reached at any local address of its port.
fn same_endpoint(listener: SocketAddr, destination: SocketAddr) -> bool {
    listener.port() == destination.port()
        && (listener.ip() == destination.ip()
            || listener.ip().is_unspecified()
            || destination.ip().is_loopback())
}

/// Peeks until the first bytes say what they are (or the limits are reached).
async fn peek_opening(stream: &TcpStream, deadline: tokio::time::Instant) -> Result<Opening, String> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| "the client sent nothing recognisable in time".to_string())?
            .map_err(|e| e.to_string())?;
        if peeked == 0 {
            return Err("closed before sending anything".into());
        }
        if let Some(opening) = recognise(&buf[..peeked]) {
            return Ok(opening);
        }
        if peeked == buf.len() {
            return Ok(Opening::Other);
        }
        if peeked == seen {
            // Nothing new yet: wait a moment for the rest of the hello or the head.
            if tokio::time::Instant::now() >= deadline {
                return Ok(Opening::Other);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = peeked;
    }
}

/// `Some` once the bytes are enough to tell; `None` when more are needed.
fn recognise(bytes: &[u8]) -> Option<Opening> {
    if bytes.first() == Some(&crate::tls::HANDSHAKE_RECORD) {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut reader = bytes;
        if acceptor.read_tls(&mut reader).is_err() {
            return Some(Opening::Other);
        }
        return match acceptor.accept() {
            Ok(Some(accepted)) => {
                Some(Opening::Tls(accepted.client_hello().server_name().map(str::to_string)))
            }
            Ok(None) => None,
            Err(_) => Some(Opening::Other),
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|h| h.trim().to_string());
            Some(Opening::Http(host))
        }
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Opening::Other),
    }
}

/// `tokenproxy iptables`: the rules that redirect a pod's outbound TCP to the transparent
/// listener, sparing tokenproxy's own user, loopback and the admin port.
pub fn iptables_rules(transparent_port: u16, admin_port: u16, uid: u32) -> String {
    format!(
        "# Redirect this network namespace's outbound TCP to tokenproxy's [transparent] listen (port {transparent_port}).\n\
         # Run as root with NET_ADMIN (an init container). tokenproxy itself runs as uid {uid}.\n\
         iptables -t nat -N TOKENPROXY_OUTPUT\n\
         # tokenproxy's own connections (upstreams, token endpoints) go out untouched: no loop.\n\
         iptables -t nat -A TOKENPROXY_OUTPUT -m owner --uid-owner {uid} -j RETURN\n\
         # Loopback stays loopback: the proxy and admin listeners, and the pod's own services.\n\
         iptables -t nat -A TOKENPROXY_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
         # The admin port, wherever it is reached.\n\
         iptables -t nat -A TOKENPROXY_OUTPUT -p tcp --dport {admin_port} -j RETURN\n\
         # Everything else: to tokenproxy, which reads the original destination.\n\
         iptables -t nat -A TOKENPROXY_OUTPUT -p tcp -j REDIRECT --to-ports {transparent_port}\n\
         iptables -t nat -A OUTPUT -p tcp -j TOKENPROXY_OUTPUT\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_heads_are_read_for_their_host_and_partial_ones_wait() {
        assert_eq!(
            recognise(b"GET / HTTP/1.1\r\nHost: api.example.com:8080\r\n\r\n"),
            Some(Opening::Http(Some("api.example.com:8080".into())))
        );
        assert_eq!(recognise(b"GET / HTTP/1.1\r\nHo"), None);
        assert_eq!(recognise(b"\x00\x01binary"), Some(Opening::Other));
    }

    #[test]
    fn the_rules_spare_tokenproxy_loopback_and_the_admin_port() {
        let rules = iptables_rules(15001, 9090, 10001);
        assert!(rules.contains("--uid-owner 10001 -j RETURN"));
        assert!(rules.contains("-d 127.0.0.0/8 -j RETURN"));
        assert!(rules.contains("--dport 9090 -j RETURN"));
        assert!(rules.contains("REDIRECT --to-ports 15001"));
    }
}
