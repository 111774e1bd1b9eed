//! The data path: listener → target → provider → token → upstream → client.
//!
//! Every way a request can enter (an absolute-form request on the forward port, a request on a
//! `[[routes]]` listener, and later a request decrypted from an intercepted CONNECT) is turned
//! into a [`Target`] and handed to [`Proxy::forward`], so that injection, the plaintext rule,
//! header hygiene, timeouts and metrics are written once.

mod connect;
pub(crate) use connect::InterceptedHost;
#[cfg(test)]
mod framing_differential;
mod headers;
pub mod plain_pool;
pub mod plain_relay;
pub mod replay;
pub mod upstream;

use std::sync::Arc;
use std::time::Instant;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::body::{BoxError, ProxyBody};
use crate::config::{ClientHeader, ProxySettings, RouteConfig, UpstreamScheme};
use crate::drain::DrainHandle;
use crate::egress::{DialError, Egress};
use crate::errors::{AccountAsk, ProxyError};
use crate::hosts::normalize_host;
use crate::server::ConnectionPermit;
use crate::tls::leaf::LeafCache;
use crate::tokens::refresh::Trigger;
use crate::tokens::{AccountError, Credential, Provider, Providers, Token, Unavailable};
use crate::{metrics, relay};
use hyper_util::rt::TokioIo;
use plain_pool::PlainPool;

/// Where a request is going, in normal form: made once, where the request enters, and used for
/// matching, dialling, SNI, the leaf certificate and the logs alike.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: Scheme,
    /// The port the connection goes to (the scheme's default when the authority names none).
    pub port: u16,
    /// `host[:port]` with the host in normal form, as dialled and as sent in `Host`.
    pub authority: Authority,
    /// Where the host is in `authority`, without IPv6 brackets: found once, read by every step.
    host_at: (usize, usize),
    /// The authority names its port (`port` is not just the scheme's default).
    explicit_port: bool,
}

impl Target {
    /// From an authority as a client wrote it. Userinfo is refused (RFC 9110 §4.2.4): it would
    /// otherwise hide the port from a reader that splits the string, and it is a credential that
    /// must not travel on or reach a log. The error never repeats the authority it refuses.
    pub fn new(scheme: Scheme, authority: &Authority) -> Result<Target, ProxyError> {
        let text = authority.as_str();
        if text.contains('@') {
            return Err(ProxyError::BadTarget(
                "the request target carries user credentials (user:password@host); \
                 send credentials in a header instead"
                    .into(),
            ));
        }
        let given = strip_brackets(authority.host());
        let host = normalize_host(given);
        if host.is_empty() {
            return Err(ProxyError::BadTarget("the request target has no host".into()));
        }
        let explicit_port = authority.port_u16();
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let port = explicit_port.unwrap_or(default_port);
        if host == given {
            // Already in normal form, as almost every client sends it: no allocation.
            let start = given.as_ptr() as usize - text.as_ptr() as usize;
            let host_at = (start, start + given.len());
            return Ok(Target {
                scheme,
                port,
                authority: authority.clone(),
                host_at,
                explicit_port: explicit_port.is_some(),
            });
        }
        Target::from_parts(scheme, &host, port, explicit_port.is_some())
    }

    fn from_parts(scheme: Scheme, host: &str, port: u16, show_port: bool) -> Result<Target, ProxyError> {
        let bracketed = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        let start = usize::from(bracketed.len() != host.len());
        let text = if show_port { format!("{bracketed}:{port}") } else { bracketed };
        let authority = text
            .parse::<Authority>()
            .map_err(|_| ProxyError::BadTarget("the request target's host is not a valid name".into()))?;
        Ok(Target { scheme, port, authority, host_at: (start, start + host.len()), explicit_port: show_port })
    }

    /// The host in normal form: lower case, no trailing dot, no IPv6 brackets
    /// (`api.example.com`, `::1`).
    pub fn host(&self) -> &str {
        &self.authority.as_str()[self.host_at.0..self.host_at.1]
    }

    /// What the `Host` header says: the authority, without the port when it is the scheme's
    /// default.
    pub fn host_header(&self) -> &str {
        let default_port = if self.scheme == Scheme::HTTPS { 443 } else { 80 };
        if self.explicit_port && self.port == default_port {
            let end = self.host_at.1 + usize::from(self.authority.as_str().as_bytes()[0] == b'[');
            &self.authority.as_str()[..end]
        } else {
            self.authority.as_str()
        }
    }

    /// The same host over TLS: an explicit port 80 becomes 443, another explicit port is kept.
    fn upgraded_to_https(&self) -> Target {
        let (port, show) = match (self.explicit_port, self.port) {
            (false, _) | (true, 80) => (443, false),
            (true, p) => (p, true),
        };
        Target::from_parts(Scheme::HTTPS, self.host(), port, show).unwrap_or_else(|_| self.clone())
    }
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// One request's way through the data path: where it goes and whose token it may carry. Every
/// step takes it whole, so that what the steps need to know grows here, not in every signature.
pub(crate) struct Exchange<'a> {
    pub target: Target,
    pub provider: Option<&'a Arc<Provider>>,
    /// The account the connection named: the user name of the proxy credentials, on this
    /// request or on the CONNECT of its tunnel (SPEC §8, second in the selection order).
    pub proxy_user: Option<&'a str>,
    pub entry: Entry,
}

/// Where a request entered: on the forward port, proxy credentials can still name an account
/// (`407`); in a tunnel or on a route they cannot (`400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    Forward,
    Tunnel,
    Route,
}

/// The token a request carries, and whose it is.
struct Injected<'a> {
    provider: &'a Arc<Provider>,
    credential: Arc<Credential>,
    token: Arc<Token>,
}

/// Everything the data path needs, shared by every listener and connection.
pub struct Proxy {
    pub providers: Arc<Providers>,
    pub client: upstream::Client,
    /// HTTP/1.1 only, for `Upgrade` requests (a WebSocket cannot ride on HTTP/2 here).
    pub upgrade_client: upstream::Client,
    /// Idle plain-HTTP/1.1 upstream connections, lent to client connections
    /// ([`plain_relay`]).
    pub plain: Arc<PlainPool>,
    pub settings: ProxySettings,
    pub allow_unmatched: bool,
    /// Certificates for intercepted hosts.
    pub leaves: Arc<LeafCache>,
    /// Lets connections that outlive their CONNECT request take part in the shutdown drain.
    pub drain: DrainHandle,
    /// Where connections may go; every dial of the data path asks it.
    pub egress: Arc<Egress>,
    /// The bytes all replay copies may hold at once (`proxy.max_replay_total`).
    pub replay_budget: replay::ReplayBudget,
}

impl Proxy {
    /// A request on the forward-proxy port: absolute form, or CONNECT.
    pub async fn handle_forward(self: &Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        if req.method() == Method::CONNECT {
            // Boxed, like every path that is not the common one: hyper keeps room for the
            // request future in every connection, idle or not, so its size is memory per
            // connection.
            return Box::pin(self.handle_connect(req)).await;
        }
        let mut access = self.access(&req);
        let (provider, result) = match self.forward_target(&req) {
            Ok((target, provider)) => {
                access.host(&target);
                let proxy_user = headers::proxy_user(req.headers());
                let ex = Exchange {
                    target,
                    provider: provider.as_ref(),
                    proxy_user: proxy_user.as_deref(),
                    entry: Entry::Forward,
                };
                let result = self.forward(req, ex).await;
                (provider, result)
            }
            Err(e) => (None, Err(e)),
        };
        finish(provider.as_deref(), access, result)
    }

    /// The start of a request's access record; see [`Access`].
    fn access<B>(&self, req: &Request<B>) -> Access {
        Access::start(self.settings.access_log, req)
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
        if provider.is_none() && !self.allow_unmatched {
            return Err(ProxyError::unmatched_host(target.authority.to_string()));
        }
        Ok((target, provider))
    }

    /// A request on a `[[routes]]` listener: it goes to the route's upstream whatever its form.
    pub async fn handle_route(&self, route: &RouteConfig, req: Request<Incoming>) -> Response<ProxyBody> {
        let mut access = self.access(&req);
        let provider = self.providers.get(&route.provider).cloned();
        let result = match Target::new(route.upstream_scheme.clone(), &route.upstream_authority) {
            Ok(target) => {
                access.host(&target);
                let (mut parts, body) = req.into_parts();
                let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
                let joined = format!("{}{}", route.upstream_base_path, path);
                match joined.parse::<PathAndQuery>() {
                    Ok(pq) => {
                        parts.uri = Uri::from(pq);
                        let req = Request::from_parts(parts, body);
                        let ex = Exchange {
                            target,
                            provider: provider.as_ref(),
                            proxy_user: None,
                            entry: Entry::Route,
                        };
                        self.forward(req, ex).await
                    }
                    // The path is not repeated: its query may hold a secret.
                    Err(_) => Err(ProxyError::BadTarget("the request path is not valid".into())),
                }
            }
            Err(e) => Err(e),
        };
        finish(provider.as_deref(), access, result)
    }

    /// The one forwarding path: inject the provider's token if there is one, relay, and after a
    /// "token is dead" status refresh once and retry once.
    async fn forward(
        &self,
        req: Request<Incoming>,
        ex: Exchange<'_>,
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
        ex: Exchange<'_>,
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
        mut ex: Exchange<'_>,
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

        let mut injected = None;
        if let Some(provider) = ex.provider {
            let config = &provider.config;
            if ex.target.scheme == Scheme::HTTP && config.upstream_scheme == UpstreamScheme::Https {
                ex.target = ex.target.upgraded_to_https();
            }
            if ex.target.scheme == Scheme::HTTP && !config.allow_plaintext {
                return Err(ProxyError::PlaintextRefused { provider: provider.name().to_string() });
            }
            let keep =
                config.client_header == ClientHeader::Keep && parts.headers.contains_key(&config.header);
            if !keep {
                let credential = self
                    .credential_for(provider, named_account.as_ref().map(Option::as_ref).map_err(|e| *e), &ex)
                    .await?;
                let token = self.token_for(provider, &credential).await?;
                parts.headers.insert(config.header.clone(), token.header_value().clone());
                injected = Some(Injected { provider, credential, token });
            }
        }

        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(ex.target.scheme.clone())
            .authority(ex.target.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadTarget(e.to_string()))?;
        // The upstream connection decides the wire version; the client wants HTTP/1.1 here.
        parts.version = Version::HTTP_11;

        let Some(injected) = injected else {
            let request = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
            return self.send(request, &ex).await;
        };
        // What a retry needs: the head, and the body kept as it streams out (up to the limit).
        let head = clone_head(&parts);
        let (body, replay) = replay::tee(body, self.settings.max_replay_body, &self.replay_budget);
        let account = self.settings.access_log.then(|| injected.credential.clone());
        let mut response = self.send(Request::from_parts(parts, body.boxed()), &ex).await?;
        if injected.provider.config.refresh_on_status.contains(&response.status()) {
            response = Box::pin(self.retry_with_fresh_token(&ex, injected, head, replay, response)).await?;
        }
        if let Some(credential) = account {
            // For the access log line, which names the account by its fingerprint.
            response.extensions_mut().insert(AccountUsed(credential));
        }
        Ok(response)
    }

    /// Whose token the request carries (SPEC §8): a single-account provider's one credential;
    /// for a multi-account provider the account named by the `Tokenproxy-Account` header, else
    /// by the proxy credentials' user name, else the provider's `default_account`.
    async fn credential_for(
        &self,
        provider: &Arc<Provider>,
        header: Result<Option<&http::HeaderValue>, crate::accounts::BadAccount>,
        ex: &Exchange<'_>,
    ) -> Result<Arc<Credential>, ProxyError> {
        if let Some(single) = provider.single() {
            return Ok(single.clone());
        }
        let bad = |reason| ProxyError::BadAccount { provider: provider.name().to_string(), reason };
        let named = match header.map_err(bad)? {
            Some(value) => Some(value.to_str().map_err(|_| bad(crate::accounts::BadAccount::Character))?),
            None => ex.proxy_user,
        };
        provider.credential_for(named).await.map_err(|e| match e {
            AccountError::Required => ProxyError::AccountRequired {
                provider: provider.name().to_string(),
                asked_on: if ex.entry == Entry::Forward {
                    AccountAsk::ForwardPort
                } else {
                    AccountAsk::Request
                },
            },
            AccountError::Bad(reason) => bad(reason),
        })
    }

    /// The token to inject: the current one, or, when it has expired and the provider has a
    /// token endpoint, the one the refresh in flight brings (waiting at most `upstream_timeout`).
    /// An account's requests also keep it fresh: one that finds its token due starts a
    /// background refresh.
    async fn token_for(
        &self,
        provider: &Arc<Provider>,
        cred: &Arc<Credential>,
    ) -> Result<Arc<Token>, ProxyError> {
        if let Some(token) = self.token_at_once(provider, cred) {
            return Ok(token);
        }
        if !provider.can_refresh() {
            return Err(provider.unavailable(cred, Unavailable::NoToken));
        }
        Box::pin(self.wait_for_refresh(provider, cred)).await
    }

    /// The token to inject when there is one to use now: [`Proxy::token_for`] without the wait.
    fn token_at_once(&self, provider: &Arc<Provider>, cred: &Arc<Credential>) -> Option<Arc<Token>> {
        let token = cred.current()?;
        if !provider.can_refresh() {
            return Some(token);
        }
        let now = time::OffsetDateTime::now_utc();
        if !token.is_refresh_due(now) {
            return Some(token);
        }
        if token.is_expired(now) {
            return None;
        }
        if cred.account().is_some() {
            provider.refresh_ahead(cred);
        }
        Some(token)
    }

    /// The expired (or missing) token's replacement, from the refresh in flight.
    async fn wait_for_refresh(
        &self,
        provider: &Arc<Provider>,
        cred: &Arc<Credential>,
    ) -> Result<Arc<Token>, ProxyError> {
        let wait = self.settings.upstream_timeout;
        match tokio::time::timeout(wait, provider.refresh(cred, Trigger::Expired, None)).await {
            Ok(Ok(token)) => Ok(token),
            Ok(Err(e)) => Err(provider.unavailable(cred, Unavailable::Refresh(&e))),
            Err(_) => Err(provider.unavailable(cred, Unavailable::Timeout(wait))),
        }
    }

    /// After the upstream said the token is dead: one refresh (shared with every request that
    /// saw the same token fail), then one retry. The app sees the retry's answer, or the original
    /// one when no retry was possible.
    async fn retry_with_fresh_token(
        &self,
        ex: &Exchange<'_>,
        injected: Injected<'_>,
        mut head: http::request::Parts,
        replay: replay::Replay,
        response: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Injected { provider, credential, token: failed } = injected;
        let name = provider.name();
        metrics::upstream_unauthorized(name);
        tracing::info!(
            provider = name,
            status = response.status().as_u16(),
            account = credential.account_log(),
            fingerprint = %failed.fingerprint,
            "upstream rejected the token"
        );
        let Some(body) = replay.take() else {
            metrics::retry(name, "not_replayable");
            return Ok(response);
        };
        let refresh = provider.refresh(&credential, Trigger::Unauthorized, Some(failed.generation));
        let fresh = match tokio::time::timeout(self.settings.upstream_timeout, refresh).await {
            Ok(Ok(fresh)) => fresh,
            _ => {
                metrics::retry(name, "refresh_failed");
                return Ok(response);
            }
        };
        drop(response);
        credential.note_retry();
        head.headers.insert(provider.config.header.clone(), fresh.header_value().clone());
        let body = Full::new(body).map_err(|e| -> BoxError { match e {} }).boxed();
        match self.send(Request::from_parts(head, body), ex).await {
            Ok(mut response) => {
                let still_dead = provider.config.refresh_on_status.contains(&response.status());
                metrics::retry(name, if still_dead { "unauthorized" } else { "ok" });
                response.extensions_mut().insert(Retried);
                Ok(response)
            }
            Err(e) => {
                metrics::retry(name, "error");
                Err(e)
            }
        }
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

/// The answer for a connection that could not be made.
fn dial_error(target: &Target, e: DialError) -> ProxyError {
    dial_error_ref(target, &e)
}

fn dial_error_ref(target: &Target, e: &DialError) -> ProxyError {
    let host = target.authority.to_string();
    match e {
        DialError::Denied { .. } => ProxyError::EgressDenied { host, reason: e.to_string() },
        DialError::Timeout(limit) => ProxyError::UpstreamTimeout { host, seconds: limit.as_secs() },
        DialError::Resolve { .. } | DialError::Connect { .. } => {
            ProxyError::UpstreamUnreachable { host, reason: e.to_string() }
        }
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

/// A request's start and, when `proxy.access_log` is on, what its access log line will say:
/// method, host in normal form, path without its query. Never a query string, userinfo or a
/// header value. Nothing is copied when the log is off.
pub(crate) struct Access {
    started: Instant,
    line: Option<AccessLine>,
}

struct AccessLine {
    method: Method,
    host: String,
    path: String,
}

/// Marks a response that came from the retry after a refresh.
#[derive(Clone, Copy)]
struct Retried;

/// The credential whose token a response's request carried (only while the access log is on).
#[derive(Clone)]
struct AccountUsed(Arc<Credential>);

impl Access {
    pub(crate) fn start<B>(enabled: bool, req: &Request<B>) -> Access {
        let path = || if req.method() == Method::CONNECT { "-" } else { req.uri().path() };
        Access::begin(enabled, req.method().as_str(), path)
    }

    /// [`Access::start`] from a request line's method and path (without the query).
    pub(crate) fn begin<'a>(enabled: bool, method: &str, path: impl FnOnce() -> &'a str) -> Access {
        let line = enabled.then(|| AccessLine {
            method: Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET),
            host: "-".into(),
            path: path().to_string(),
        });
        Access { started: Instant::now(), line }
    }

    pub(crate) fn host(&mut self, target: &Target) {
        if let Some(line) = &mut self.line {
            line.host = target.authority.to_string();
        }
    }
}

/// Records the request's metrics (and access log line) and turns an error into its answer.
fn finish(
    provider: Option<&Provider>,
    access: Access,
    result: Result<Response<ProxyBody>, ProxyError>,
) -> Response<ProxyBody> {
    let response = result.unwrap_or_else(|e| {
        let label = provider.map_or(metrics::NO_PROVIDER, Provider::name);
        tracing::warn!(provider = label, error = %e, code = e.code(), "request refused");
        e.into_response()
    });
    let account = response.extensions().get::<AccountUsed>().map(|a| a.0.as_ref());
    let retried = response.extensions().get::<Retried>().is_some();
    record(provider, access, response.status(), account, retried);
    response
}

/// Records a request's metrics and, when the access log is on, its line.
fn record(
    provider: Option<&Provider>,
    access: Access,
    status: http::StatusCode,
    account: Option<&Credential>,
    retried: bool,
) {
    let label = provider.map_or(metrics::NO_PROVIDER, Provider::name);
    let handles = match provider {
        Some(p) => &p.request_metrics,
        None => metrics::RequestMetrics::unmatched(),
    };
    let elapsed = access.started.elapsed();
    handles.record(status, elapsed);
    if let Some(line) = access.line {
        tracing::info!(
            target: "tokenproxy::access",
            method = %line.method,
            host = %line.host,
            path = %line.path,
            status = status.as_u16(),
            provider = label,
            account = account.and_then(Credential::account_log),
            retried,
            duration_us = elapsed.as_micros() as u64,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(scheme: Scheme, authority: &str) -> Target {
        Target::new(scheme, &authority.parse().unwrap()).unwrap()
    }

    #[test]
    fn a_target_knows_its_host_port_and_host_header_in_every_form() {
        // (scheme, as written, host, port, Host header, authority dialled)
        let cases = [
            (Scheme::HTTP, "api.example.com", "api.example.com", 80, "api.example.com", "api.example.com"),
            (
                Scheme::HTTP,
                "API.Example.COM.:8080",
                "api.example.com",
                8080,
                "api.example.com:8080",
                "api.example.com:8080",
            ),
            (
                Scheme::HTTP,
                "api.example.com:80",
                "api.example.com",
                80,
                "api.example.com",
                "api.example.com:80",
            ),
            (
                Scheme::HTTPS,
                "api.example.com:443",
                "api.example.com",
                443,
                "api.example.com",
                "api.example.com:443",
            ),
            (
                Scheme::HTTPS,
                "api.example.com:80",
                "api.example.com",
                80,
                "api.example.com:80",
                "api.example.com:80",
            ),
            (Scheme::HTTP, "127.0.0.1:18080", "127.0.0.1", 18080, "127.0.0.1:18080", "127.0.0.1:18080"),
            (Scheme::HTTP, "[::1]:8080", "::1", 8080, "[::1]:8080", "[::1]:8080"),
            (Scheme::HTTP, "[::1]:80", "::1", 80, "[::1]", "[::1]:80"),
            (Scheme::HTTPS, "[::1]", "::1", 443, "[::1]", "[::1]"),
            (Scheme::HTTPS, "[::FFFF:7F00:1]", "::ffff:7f00:1", 443, "[::ffff:7f00:1]", "[::ffff:7f00:1]"),
        ];
        for (scheme, written, host, port, host_header, authority) in cases {
            let t = target(scheme, written);
            assert_eq!(
                (t.host(), t.port, t.host_header(), t.authority.as_str()),
                (host, port, host_header, authority),
                "{written}"
            );
        }
        let refused = Target::new(Scheme::HTTP, &"user:pw@api.example.com".parse().unwrap()).unwrap_err();
        assert!(!refused.to_string().contains("pw"), "{refused}");
    }

    #[test]
    fn upgraded_to_https_keeps_an_explicit_port_other_than_80() {
        let up = |a| target(Scheme::HTTP, a).upgraded_to_https();
        assert_eq!(
            (up("api.example.com").authority.as_str(), up("api.example.com").port),
            ("api.example.com", 443)
        );
        assert_eq!(up("api.example.com:80").authority.as_str(), "api.example.com");
        let kept = up("API.example.com:8443");
        assert_eq!(
            (kept.host(), kept.port, kept.authority.as_str()),
            ("api.example.com", 8443, "api.example.com:8443")
        );
    }
}
