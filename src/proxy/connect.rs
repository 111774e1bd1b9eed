//! CONNECT: intercept provider hosts, tunnel everything else.
//!
//! For a host that matches a provider, tokenproxy answers the client's TLS handshake itself with
//! a leaf certificate for that host signed by its own CA, and the decrypted requests go through
//! [`Proxy::forward`] like any other: one path for injection, retries, limits and metrics. A
//! client that speaks plain HTTP inside the tunnel instead (a `ws://` client behind a proxy that
//! always sends CONNECT) is served as plain HTTP to the host, under the plaintext rules. For any
//! other host (when `[egress] allow_unmatched`) the bytes are copied both ways untouched, and the
//! client sees the upstream's own certificate.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1::pool::{Pool, Upstream};
use super::h1::{ClientIo, Listen, PlainRelay, Served};
use super::{Entry, Exchange, Proxy, Target, Verdict, dial_error};
use crate::body::{BoxError, ProxyBody};
use crate::callers::Peer;
use crate::errors::ProxyError;
use crate::relay::{self, Activity, InFlightBody, Tracked};
use crate::server::ConnectionPermit;
use crate::tokens::Provider;

impl Proxy {
    pub(super) async fn handle_connect(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<ProxyBody> {
        let mut access = self.access(&req, &peer);
        let target = match connect_target(&req) {
            Ok(target) => target,
            Err(e) => return self.finish(None, access, &Verdict::default(), Err(e)),
        };
        access.host(&target);
        let provider = self.providers.for_host(target.host(), target.port).cloned();
        // The proxy credentials hold for every request in the tunnel: each is decided with them.
        let credentials: Option<Box<[u8]>> =
            req.headers().get(http::header::PROXY_AUTHORIZATION).map(|v| v.as_bytes().into());
        let mut ex = Exchange::connect(target.clone(), provider.as_ref(), credentials.as_deref(), &peer);
        if let Err(e) = self.admit(&mut ex) {
            return self.finish(provider.as_deref(), access, &ex.verdict, Err(e));
        }
        let verdict = ex.verdict;
        match provider {
            Some(provider) => {
                let tls = match self.leaves.server_config(target.host()).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let e = ProxyError::Interception {
                            host: target.authority.to_string(),
                            reason: format!("{e:#}"),
                        };
                        return self.finish(Some(&provider), access, &verdict, Err(e));
                    }
                };
                let upgrade = hyper::upgrade::on(&mut req);
                let place = req.extensions().get::<ConnectionPermit>().cloned();
                let host = InterceptedHost { proxy: self.clone(), target, provider, credentials, peer };
                tokio::spawn(host.intercept(upgrade, tls, place));
                // Not counted as a request: the requests inside the tunnel are.
                connection_established()
            }
            None => {
                let dialled = self.egress.connect(target.host(), target.port, self.settings.upstream_timeout);
                let upstream = match dialled.await {
                    Ok(upstream) => upstream,
                    Err(e) => return self.finish(None, access, &verdict, Err(dial_error(&target, e))),
                };
                let upgrade = hyper::upgrade::on(&mut req);
                let place = req.extensions().get::<ConnectionPermit>().cloned();
                let admitted = Admitted { proxy: self.clone(), target, credentials, peer };
                tokio::spawn(admitted.tunnel(upgrade, upstream, place));
                self.finish(None, access, &verdict, Ok(connection_established()))
            }
        }
    }
}

/// What every request inside one interception shares: it goes to the CONNECT's host with its
/// provider's token, whatever its own Host header says, decided with the CONNECT's proxy
/// credentials (the caller, or the account without callers) on the client's connection.
pub(crate) struct InterceptedHost {
    proxy: Arc<Proxy>,
    target: Target,
    provider: Arc<Provider>,
    credentials: Option<Box<[u8]>>,
    peer: Arc<Peer>,
}

impl InterceptedHost {
    /// What a transparent connection (SPEC §12) is served as: the same interception as CONNECT.
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        target: Target,
        provider: Arc<Provider>,
        peer: Arc<Peer>,
    ) -> InterceptedHost {
        InterceptedHost { proxy, target, provider, credentials: None, peer }
    }

    /// Terminates the client's TLS with a leaf for the host and serves the requests inside,
    /// over HTTP/1.1 or HTTP/2 as ALPN decided.
    async fn intercept(
        self,
        upgrade: OnUpgrade,
        tls: Arc<rustls::ServerConfig>,
        _place: Option<ConnectionPermit>,
    ) {
        let Some(drain) = self.proxy.drain.watch() else { return };
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
        };
        self.serve(TokioIo::new(upgraded), tls, drain).await;
    }

    /// Serves one client connection to this host: a TLS handshake is answered with `tls` (a
    /// leaf for the host), anything else is plain HTTP to the host under the plaintext rules.
    pub(crate) async fn serve<T>(
        mut self,
        io: T,
        tls: Arc<rustls::ServerConfig>,
        drain: crate::drain::DrainWatch,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // The first byte says what the client speaks: a TLS handshake record starts with 0x16.
        // Anything else is plain HTTP inside the tunnel (a `ws://` client behind a proxy that
        // always sends CONNECT), served as plain HTTP to the host under the plaintext rules.
        let settings = &self.proxy.settings;
        let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
        let first = tokio::time::timeout_at(deadline, relay::first_byte(io)).await;
        let (byte, io) = match first {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                return tracing::debug!(error = %e, "intercepted connection failed before its first byte");
            }
            Err(_) => return tracing::debug!(host = %self.target.authority, "client sent nothing in time"),
        };
        tracing::debug!(host = %self.target.authority, first_byte = byte, "intercepted connection: first byte");
        if byte != crate::tls::HANDSHAKE_RECORD {
            match Target::new(Scheme::HTTP, &self.target.authority) {
                Ok(plain) => {
                    self.target = plain;
                    let pool = self.proxy.plain.clone();
                    self.serve_relayed(io, pool, drain).await;
                }
                Err(e) => tracing::debug!(error = %e, "cannot serve plain HTTP in this tunnel"),
            }
            return;
        }
        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(io);
        let stream = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return tracing::warn!(
                    host = %self.target.authority,
                    error = %e,
                    "TLS handshake with the client failed (does the client trust tokenproxy's ca.pem?)"
                );
            }
            Err(_) => {
                return tracing::debug!(host = %self.target.authority, "client sent no TLS handshake in time");
            }
        };
        // ALPN decided the protocol: no sniffing of a preface, which no deadline would cover.
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        tracing::debug!(host = %self.target.authority, h2, "intercepted connection: TLS established");
        if h2 {
            Arc::new(self).serve_h2(stream, drain).await;
        } else {
            let pool = self.proxy.tls_pool.clone();
            self.serve_relayed(stream, pool, drain).await;
        }
    }

    /// HTTP/1.1 inside an interception: the hand-written relay serves what it can (requests
    /// without a body, in origin form), with upstream connections from `pool`; hyper serves the
    /// rest of the connection from the first request the relay hands over.
    async fn serve_relayed<S, C>(self, stream: S, pool: Arc<Pool<C>>, mut drain: crate::drain::DrainWatch)
    where
        S: ClientIo + 'static,
        C: Upstream,
    {
        let settings = &self.proxy.settings;
        let relay = PlainRelay {
            proxy: self.proxy.clone(),
            listen: Listen::Tunnel {
                target: self.target.clone(),
                provider: self.provider.clone(),
                credentials: self.credentials.clone(),
            },
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
        };
        match relay.serve_with(stream, pool, &self.peer, &mut drain).await {
            Served::Closed => {}
            Served::HandOff { stream, read } => {
                Arc::new(self).serve_h1(relay::Rewound::new(read, stream), drain).await;
            }
        }
    }

    /// HTTP/1.1 inside an interception through hyper (over TLS, or plain), from the request the
    /// relay handed over: `header_read_timeout` bounds the wait for every request head, the first
    /// one and each one after an idle keep-alive pause.
    async fn serve_h1<S>(self: Arc<Self>, stream: S, mut drain: crate::drain::DrainWatch)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let settings = self.proxy.settings.clone();
        let host = self;
        let service = service_fn(move |req: Request<Incoming>| {
            let host = host.clone();
            async move { Ok::<_, Infallible>(host.handle(req).await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes);
        let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        crate::drain::until_drained(std::pin::pin!(conn), &mut drain).await;
    }

    /// HTTP/2 inside an interception. HTTP/2 has no request-head deadline, so the connection is
    /// closed when it has been quiet with no request in flight: for `header_read_timeout` before
    /// its first request, for `idle_timeout` after.
    async fn serve_h2<S>(self: Arc<Self>, stream: S, mut drain: crate::drain::DrainWatch)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let settings = self.proxy.settings.clone();
        let activity = Activity::new();
        let io = Tracked::new(stream, activity.clone());
        let host = self;
        let tracked = activity.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let host = host.clone();
            let in_flight = tracked.request();
            async move {
                let response = host.handle(req).await;
                Ok::<_, Infallible>(response.map(|body| InFlightBody::new(body, in_flight).boxed()))
            }
        });
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).max_header_list_size(settings.max_header_bytes as u32);
        let conn = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
        let idle = activity.idle(settings.idle_timeout, settings.header_read_timeout);
        tokio::select! {
            _ = crate::drain::until_drained(conn, &mut drain) => {}
            _ = idle => tracing::debug!("intercepted HTTP/2 connection idle; closing it"),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        tracing::debug!(method = %req.method(), path = req.uri().path(), "intercepted request");
        let mut access = self.proxy.access(&req, &self.peer);
        access.host(&self.target);
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let mut ex = Exchange {
            target: self.target.clone(),
            provider: Some(&self.provider),
            credentials: self.credentials.as_deref(),
            peer: &self.peer,
            method: method.as_str(),
            path: uri.path(),
            entry: Entry::Tunnel,
            verdict: Verdict::default(),
        };
        let result = self.proxy.forward(req, &mut ex).await;
        self.proxy.finish(Some(self.provider.as_ref()), access, &ex.verdict, result)
    }
}

/// The `host:port` of a CONNECT, which must name both (RFC 9110 §9.3.6).
fn connect_target(req: &Request<Incoming>) -> Result<Target, ProxyError> {
    let bad = || ProxyError::BadTarget("CONNECT needs host:port".into());
    let authority: &Authority = req.uri().authority().ok_or_else(bad)?;
    let target = Target::new(Scheme::HTTPS, authority)?;
    if authority.port().is_none() || req.uri().path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad());
    }
    Ok(target)
}

fn connection_established() -> Response<ProxyBody> {
    Response::new(Empty::<Bytes>::new().map_err(|e| -> BoxError { match e {} }).boxed())
}

/// A CONNECT to a host of no provider, admitted: what it was admitted with, asked again after
/// every reload of the callers.
struct Admitted {
    proxy: Arc<Proxy>,
    target: Target,
    credentials: Option<Box<[u8]>>,
    peer: Arc<Peer>,
}

impl Admitted {
    /// A blind tunnel: bytes both ways, untouched, until both sides are done, the tunnel has
    /// been idle for `idle_timeout`, shutdown (a blind tunnel has no request boundary to wait
    /// for), or its caller may no longer hold it.
    async fn tunnel(self, upgrade: OnUpgrade, upstream: TcpStream, _place: Option<ConnectionPermit>) {
        let Some(drain) = self.proxy.drain.watch() else { return };
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
        };
        let joined = relay::join(TokioIo::new(upgraded), upstream, self.proxy.settings.idle_timeout, drain);
        let revoked = self.proxy.revoked(&self.target, self.credentials.as_deref(), &self.peer);
        tokio::select! {
            end = joined => tracing::debug!(end = ?end, "tunnel closed"),
            () = revoked => {}
        }
    }
}
