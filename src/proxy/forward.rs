//! hyper's codec of the data path: requests on the forward port (absolute form), on `[[routes]]`
//! listeners and inside intercepted tunnels, read and written by hyper. Every token rule is asked
//! of [`super::decide`].

use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::access::{AccountUsed, Retried};
use super::decide::{Asked, Decision, Entry, Exchange, Injected, Signing, Verdict};
use super::{Proxy, Target, dial_error_ref, headers, replay, upstream};
use crate::body::{BoxError, ProxyBody};
use crate::callers::Peer;
use crate::config::RouteConfig;
use crate::errors::ProxyError;
use crate::relay;
use crate::server::ConnectionPermit;
use crate::sigv4;
use crate::tokens::Provider;

impl Proxy {
    /// A request on the forward-proxy port: absolute form, or CONNECT.
    pub async fn handle_forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            // Boxed, like every path that is not the common one: hyper keeps room for the
            // request future in every connection, idle or not, so its size is memory per
            // connection.
            return Box::pin(self.handle_connect(req, peer)).await;
        }
        let mut access = self.access(&req, &peer);
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let credentials = req.headers().get(http::header::PROXY_AUTHORIZATION).cloned();
        match self.forward_target(&req) {
            Ok((target, provider)) => {
                access.host(&target);
                let mut ex = Exchange {
                    target,
                    provider: provider.as_ref(),
                    credentials: credentials.as_ref().map(HeaderValue::as_bytes),
                    peer: &peer,
                    method: method.as_str(),
                    path: uri.path(),
                    entry: Entry::Forward,
                    verdict: Verdict::default(),
                };
                let result = self.forward(req, &mut ex).await;
                self.finish(provider.as_deref(), access, &ex.verdict, result)
            }
            Err(e) => self.finish(None, access, &Verdict::default(), Err(e)),
        }
    }

    fn forward_target(&self, req: &Request<Incoming>) -> Result<(Target, Option<Arc<Provider>>), ProxyError> {
        let uri = req.uri();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(ProxyError::NotAProxyRequest);
        };
        if scheme != &Scheme::HTTP && scheme != &Scheme::HTTPS {
            return Err(ProxyError::BadTarget(format!("unsupported scheme {scheme}")));
        }
        let target = Target::new(scheme.clone(), authority)?;
        let provider = self.providers.for_host(target.host(), target.port).cloned();
        Ok((target, provider))
    }

    /// A request on a `[[routes]]` listener: it goes to the route's upstream whatever its form.
    pub async fn handle_route(
        &self,
        route: &RouteConfig,
        req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<ProxyBody> {
        let mut access = self.access(&req, &peer);
        let provider = self.providers.get(&route.provider).cloned();
        let mut verdict = Verdict::default();
        let result = match Target::new(route.upstream_scheme.clone(), &route.upstream_authority) {
            Ok(target) => {
                access.host(&target);
                let (mut parts, body) = req.into_parts();
                let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
                let joined = format!("{}{}", route.upstream_base_path, path);
                match joined.parse::<PathAndQuery>() {
                    Ok(pq) => {
                        parts.uri = Uri::from(pq.clone());
                        let credentials = parts.headers.get(http::header::PROXY_AUTHORIZATION).cloned();
                        let method = parts.method.clone();
                        let req = Request::from_parts(parts, body);
                        let mut ex = Exchange {
                            target,
                            provider: provider.as_ref(),
                            credentials: credentials.as_ref().map(HeaderValue::as_bytes),
                            peer: &peer,
                            method: method.as_str(),
                            path: pq.path(),
                            entry: Entry::Route,
                            verdict: Verdict::default(),
                        };
                        let result = self.forward(req, &mut ex).await;
                        verdict = ex.verdict;
                        result
                    }
                    // The path is not repeated: its query may hold a secret.
                    Err(_) => Err(ProxyError::BadTarget("the request path is not valid".into())),
                }
            }
            Err(e) => Err(e),
        };
        self.finish(provider.as_deref(), access, &verdict, result)
    }

    /// The one forwarding path: inject the provider's token if there is one, relay, and after a
    /// "token is dead" status refresh once and retry once.
    pub(super) async fn forward(
        &self,
        req: Request<Incoming>,
        ex: &mut Exchange<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        match headers::upgrade_protocol(&req) {
            None => self.forward_message(req, None, ex).await,
            Some(protocol) => Box::pin(self.forward_upgrade(req, protocol, ex)).await,
        }
    }

    /// An `Upgrade` request (a WebSocket handshake): forwarded like any other, token included,
    /// with its `Upgrade` re-created upstream; once the upstream answers `101`, the client's and
    /// the upstream's connections are joined byte for byte.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: http::HeaderValue,
        ex: &mut Exchange<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let client_side = hyper::upgrade::on(&mut req);
        // The joined connection keeps the client connection's place under max_connections.
        let place = req.extensions().get::<ConnectionPermit>().cloned();
        let mut response = self.forward_message(req, Some(protocol), ex).await?;
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let upstream_side = hyper::upgrade::on(&mut response);
            let (idle_timeout, drain) = (self.settings.idle_timeout, self.drain.clone());
            tokio::spawn(async move {
                let _place = place;
                let Some(drain) = drain.watch() else { return };
                match tokio::try_join!(client_side, upstream_side) {
                    Ok((client, upstream)) => {
                        let end =
                            relay::join(TokioIo::new(client), TokioIo::new(upstream), idle_timeout, drain)
                                .await;
                        tracing::debug!(end = ?end, "upgraded connection closed");
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed after 101"),
                }
            });
        }
        Ok(response)
    }

    /// Forwards one request and its response. `upgrade` is the protocol of an `Upgrade`
    /// request, whose hop-by-hop headers are re-created for the upstream.
    async fn forward_message(
        &self,
        req: Request<Incoming>,
        upgrade: Option<http::HeaderValue>,
        ex: &mut Exchange<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // Removed whoever the request goes to: it is tokenproxy's, not the upstream's.
        let named_account = headers::take_account(&mut parts.headers);
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = upgrade {
            headers::set_upgrade(&mut parts.headers, protocol);
        }
        // The client sets Host from the upstream URI (RFC 9112 §3.2.2: a proxy replaces it).
        parts.headers.remove(http::header::HOST);

        let asked = Asked {
            account: named_account.as_ref().map(Option::as_ref).map_err(|e| *e),
            carries: &|name| parts.headers.contains_key(name),
        };
        let decision = self.decide(ex, &asked).await?;
        let (injected, signing) = match decision {
            Decision::Pass => (None, None),
            Decision::Inject(injected) => {
                let header = injected.provider.config.header.clone();
                parts.headers.insert(header, injected.token.header_value().clone());
                (Some(injected), None)
            }
            Decision::Sign(signing) => (None, Some(signing)),
        };

        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(ex.target.scheme.clone())
            .authority(ex.target.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadTarget(e.to_string()))?;
        // The upstream connection decides the wire version; the client wants HTTP/1.1 here.
        parts.version = Version::HTTP_11;

        if let Some(signing) = signing {
            return Box::pin(self.send_signed(parts, body, &signing, ex)).await;
        }
        let Some(injected) = injected else {
            let request = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
            return self.send(request, ex).await;
        };
        // What a retry needs: the head, and the body kept as it streams out (up to the limit).
        let head = clone_head(&parts);
        let (body, replay) = replay::tee(body, self.settings.max_replay_body, &self.replay_budget);
        let mut response = self.send(Request::from_parts(parts, body.boxed()), ex).await?;
        let status = response.status();
        if injected.provider.config.refresh_on_status.contains(&status) {
            response = Box::pin(self.retry_with_fresh_token(ex, &injected, head, replay, response)).await?;
        }
        if self.keeps_lines() {
            // For the access log and audit lines, which name the account by its fingerprint.
            response.extensions_mut().insert(AccountUsed(injected.credential));
        }
        Ok(response)
    }

    /// After the upstream said the token is dead: one refresh, then one retry. The app sees the
    /// retry's answer, or the original one when no retry was possible.
    async fn retry_with_fresh_token(
        &self,
        ex: &Exchange<'_>,
        injected: &Injected,
        mut head: http::request::Parts,
        replay: replay::Replay,
        response: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let body = replay.take();
        let Some(fresh) = self.token_for_retry(injected, response.status(), body.is_some()).await else {
            return Ok(response);
        };
        let Some(body) = body else { return Ok(response) };
        drop(response);
        head.headers.insert(injected.provider.config.header.clone(), fresh.header_value().clone());
        let body = Full::new(body).map_err(|e| -> BoxError { match e {} }).boxed();
        let sent = self.send(Request::from_parts(head, body), ex).await;
        injected.record_retry(sent.as_ref().ok().map(Response::status));
        let mut response = sent?;
        response.extensions_mut().insert(Retried);
        Ok(response)
    }

    /// A request to a provider that signs (SPEC §14 `sigv4`): the body is read first, within
    /// `max_replay_body`, for its SHA-256; a larger one goes unsigned where the service takes that
    /// (S3, which needs its declared length anyway), else `413`.
    async fn send_signed(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        signing: &Signing,
        ex: &Exchange<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let provider = &signing.provider;
        let Some(config) = provider.config.sigv4.as_ref() else {
            return Err(ProxyError::BadTarget("internal: a signing decision without sigv4".into()));
        };
        let limit = self.settings.max_replay_body;
        let too_large = || ProxyError::BodyTooLarge { provider: provider.name().to_string(), limit };
        let held = replay::hold(body, limit, &self.replay_budget)
            .await
            .map_err(|e| ProxyError::BadTarget(format!("reading the request body: {e}")))?;
        // The signature covers `Host`: set it as hyper will send it.
        let host = HeaderValue::try_from(ex.target.host_header())
            .map_err(|e| ProxyError::BadTarget(e.to_string()))?;
        parts.headers.insert(http::header::HOST, host);
        let mut request = Request::from_parts(parts, ());
        let (whole, body) = match held {
            replay::Hold::Whole(held) => {
                let body = Full::new(held.bytes.clone()).map_err(|e| match e {}).boxed();
                (Some(held), body)
            }
            replay::Hold::Declared(body, _) if sigv4::is_s3(&config.service) => {
                (None, body.map_err(BoxError::from).boxed())
            }
            replay::Hold::Declared(..) | replay::Hold::Overflowed => return Err(too_large()),
            replay::Hold::NoBudget => return Err(ProxyError::Busy),
        };
        let payload = match &whole {
            Some(held) => sigv4::Payload::Bytes(&held.bytes),
            None => sigv4::Payload::Unsigned,
        };
        let now = std::time::SystemTime::now();
        sigv4::sign_request(
            &mut request,
            payload,
            &signing.session.credentials,
            &config.region,
            &config.service,
            now,
        )
        .map_err(|e| ProxyError::TokenUnavailable {
            provider: provider.name().to_string(),
            account: None,
            reason: e.to_string(),
            action: "report this: the request could not be signed".into(),
        })?;
        let (parts, ()) = request.into_parts();
        self.send(Request::from_parts(parts, body), ex).await
    }

    /// Sends a request upstream within `upstream_timeout` (connect + response head).
    async fn send(
        &self,
        request: Request<ProxyBody>,
        ex: &Exchange<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let target = &ex.target;
        let timeout = self.settings.upstream_timeout;
        // An upgrade needs HTTP/1.1 all the way: its own client never negotiates HTTP/2.
        let upgrade = request.headers().contains_key(http::header::UPGRADE);
        let client = if upgrade { &self.upgrade_client } else { &self.client };
        let sent = tokio::time::timeout(timeout, client.request(request)).await.map(|r| {
            r.map_err(|e| match crate::egress::find_dial_error(&e) {
                Some(dial) => dial_error_ref(target, dial),
                None => ProxyError::UpstreamUnreachable {
                    host: target.authority.to_string(),
                    reason: upstream::describe_error(&e),
                },
            })
        });
        let response = match sent {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    host: target.authority.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            Ok(result) => result?,
        };
        let (mut parts, body) = response.into_parts();
        let switched = (parts.status == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| parts.headers.get(http::header::UPGRADE).cloned())
            .flatten();
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = switched {
            headers::set_upgrade(&mut parts.headers, protocol);
        }
        Ok(Response::from_parts(parts, body.map_err(BoxError::from).boxed()))
    }
}

/// A copy of a request head (extensions are not carried over: nothing here sets any).
fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}
