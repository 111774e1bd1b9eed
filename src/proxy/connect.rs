//! CONNECT: intercept provider hosts, tunnel everything else.
//!
//! For a host that matches a provider, tokenproxy answers the client's TLS handshake itself with
//! a leaf certificate for that host signed by its own CA, and the decrypted requests go through
//! [`Proxy::forward`] like any other: one path for injection, retries, limits and metrics. For any
//! other host (when `[egress] allow_unmatched`) the bytes are copied both ways untouched, and the
//! client sees the upstream's own certificate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use super::{BoxError, Proxy, ProxyBody, Target, finish};
use crate::errors::ProxyError;
use crate::hosts::split_host_port;
use crate::server;
use crate::tokens::Provider;

impl Proxy {
    pub(super) async fn handle_connect(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let target = match connect_target(&req) {
            Ok(target) => target,
            Err(e) => return finish(None, started, Err(e)),
        };
        let provider = self.providers.for_host(target.host(), target.port).cloned();
        match provider {
            Some(provider) => {
                let tls = match self.leaves.server_config(target.host()).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let e = ProxyError::Interception {
                            host: target.authority.to_string(),
                            reason: format!("{e:#}"),
                        };
                        return finish(Some(&provider), started, Err(e));
                    }
                };
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(self.clone().intercept(upgrade, tls, target, provider));
                // Not counted as a request: the requests inside the tunnel are.
                connection_established()
            }
            None if !self.allow_unmatched => {
                let e = ProxyError::EgressDenied { host: target.authority.to_string() };
                finish(None, started, Err(e))
            }
            None => {
                let connect = TcpStream::connect(target.authority.as_str());
                let upstream = match tokio::time::timeout(self.settings.upstream_timeout, connect).await {
                    Ok(Ok(upstream)) => upstream,
                    Ok(Err(e)) => {
                        let e = ProxyError::UpstreamUnreachable {
                            host: target.authority.to_string(),
                            reason: e.to_string(),
                        };
                        return finish(None, started, Err(e));
                    }
                    Err(_) => {
                        let e = ProxyError::UpstreamTimeout {
                            host: target.authority.to_string(),
                            seconds: self.settings.upstream_timeout.as_secs(),
                        };
                        return finish(None, started, Err(e));
                    }
                };
                let _ = upstream.set_nodelay(true);
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(tunnel(upgrade, upstream, self.drain.clone()));
                finish(None, started, Ok(connection_established()))
            }
        }
    }

    /// Terminates the client's TLS with a leaf for the host and serves the requests inside,
    /// over HTTP/1.1 or HTTP/2 as ALPN decided.
    async fn intercept(
        self: Arc<Self>,
        upgrade: OnUpgrade,
        tls: Arc<rustls::ServerConfig>,
        target: Target,
        provider: Arc<Provider>,
    ) {
        let Some(drain) = self.drain.watch() else { return };
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
        };
        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(TokioIo::new(upgraded));
        let stream = match tokio::time::timeout(self.settings.header_read_timeout, accept).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return tracing::warn!(
                    host = %target.authority,
                    error = %e,
                    "TLS handshake with the client failed (does the client trust tokenproxy's ca.pem?)"
                );
            }
            Err(_) => {
                return tracing::debug!(host = %target.authority, "client sent no TLS handshake in time");
            }
        };
        let proxy = self.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let target = target.clone();
            let provider = provider.clone();
            async move { Ok::<_, Infallible>(proxy.handle_intercepted(req, target, &provider).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .max_buf_size(self.settings.max_header_bytes);
        builder.http2().timer(TokioTimer::new()).max_header_list_size(self.settings.max_header_bytes as u32);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        server::until_drained(conn, drain).await;
    }

    /// A request decrypted from an intercepted connection: it goes to the CONNECT's host, whatever
    /// its own Host header says.
    async fn handle_intercepted(
        &self,
        req: Request<Incoming>,
        target: Target,
        provider: &Arc<Provider>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let result = self.forward(req, target, Some(provider)).await;
        finish(Some(provider.as_ref()), started, result)
    }
}

/// The `host:port` of a CONNECT, which must name both.
fn connect_target(req: &Request<Incoming>) -> Result<Target, ProxyError> {
    let bad = || ProxyError::BadTarget(format!("CONNECT needs host:port, got {:?}", req.uri().to_string()));
    let authority: &Authority = req.uri().authority().ok_or_else(bad)?;
    let (host, port) = split_host_port(authority.as_str()).map_err(|_| bad())?;
    let port = port.ok_or_else(bad)?;
    if host.is_empty() || authority.as_str().contains('@') {
        return Err(bad());
    }
    Ok(Target { scheme: Scheme::HTTPS, authority: authority.clone(), port })
}

fn connection_established() -> Response<ProxyBody> {
    Response::new(Empty::<Bytes>::new().map_err(|e| -> BoxError { match e {} }).boxed())
}

/// Copies bytes both ways until both sides are done; a half-close on one side is passed on to
/// the other. Ends at shutdown: a blind tunnel has no request boundary to wait for.
async fn tunnel(upgrade: OnUpgrade, mut upstream: TcpStream, drain: server::DrainHandle) {
    let Some(mut drain) = drain.watch() else { return };
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
    };
    let mut client = TokioIo::new(upgraded);
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = drain.signaled() => {}
    }
}
