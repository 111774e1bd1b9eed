//! The one place that turns a failure into an HTTP answer.
//!
//! Every response tokenproxy makes up itself (rather than relays from an upstream) is built here:
//! a JSON body `{"error": <code>, ...}` and an `x-tokenproxy-error: <code>` header, so that an
//! application or a person can tell tokenproxy's answers from the provider's. Bodies are built
//! from the fields below only, none of which can hold a token.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::body::ProxyBody;

pub const ERROR_HEADER: &str = "x-tokenproxy-error";

/// An error and its sources as one line for a person (`what: why: why`), each cause once (a
/// library that already quotes its source in its own message is not quoted twice).
pub fn report(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    parts.join(": ")
}

/// Where a request that named no account came in (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountAsk {
    /// The forward port: proxy credentials can still name the account (`407`).
    ForwardPort,
    /// Inside a tunnel or on a route: only the header can (`400`).
    Request,
    /// The admin API's manual refresh: the query names it (`400`).
    Admin,
}

impl AccountAsk {
    fn action(self) -> &'static str {
        match self {
            AccountAsk::ForwardPort => {
                "name the account in a Tokenproxy-Account header, or as the proxy user name \
                 with an empty password (HTTP_PROXY=http://ACCOUNT:@HOST:PORT, curl -x http://ACCOUNT:@HOST:PORT; \
                 without the colon Python requests sends no credentials at all), \
                 or set the provider's default_account"
            }
            AccountAsk::Request => {
                "name the account in a Tokenproxy-Account header (inside a tunnel, the user name of \
                 the proxy credentials on its CONNECT also does), or set the provider's default_account"
            }
            AccountAsk::Admin => "name the account: POST /tokens/{provider}/refresh?account=NAME",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A request in origin form (`GET /path`) reached the forward-proxy port.
    #[error("this is a forward proxy: send requests in absolute form")]
    NotAProxyRequest,
    /// The request's target could not be understood.
    #[error("bad request target: {0}")]
    BadTarget(String),
    /// The egress policy refuses the destination: a host that matches no provider while
    /// `[egress] allow_unmatched` is false, an address in `[egress] deny`, or one of
    /// tokenproxy's own listeners.
    #[error("{reason}")]
    EgressDenied { host: String, reason: String },
    /// A provider's token would travel over plain HTTP.
    #[error(
        "provider {provider:?} would receive its token over plain HTTP; call https:// instead, or set \
         upstream_scheme = \"https\" or allow_plaintext = true for this provider"
    )]
    PlaintextRefused { provider: String },
    /// No usable token for the provider (or the account of it).
    #[error("no usable token for provider {provider:?}: {reason}")]
    TokenUnavailable { provider: String, account: Option<String>, reason: String, action: String },
    /// A request to a multi-account provider named no account, and it has no default (SPEC §8).
    /// Where it came from decides the answer and how it can name one.
    #[error("provider {provider:?} has one token per account and the request named none")]
    AccountRequired { provider: String, asked_on: AccountAsk },
    /// The account name a request gave cannot be one (the name itself is never repeated).
    #[error("bad account name for provider {provider:?}: {reason}")]
    BadAccount { provider: String, reason: crate::accounts::BadAccount },
    #[error("cannot reach upstream {host}: {reason}")]
    UpstreamUnreachable { host: String, reason: String },
    #[error("upstream {host} sent no response headers within {seconds}s")]
    UpstreamTimeout { host: String, seconds: u64 },
    /// tokenproxy could not set up TLS for an intercepted host.
    #[error("cannot intercept {host}: {reason}")]
    Interception { host: String, reason: String },
    /// With callers configured, the request belongs to none (SPEC §13). `route`: it came in on a
    /// route listener, which answers `401` rather than a proxy's `407`.
    #[error("the request belongs to no caller: {why}")]
    CallerUnknown { why: crate::callers::Unknown, route: bool },
    /// A request to a provider that signs bodies (SPEC §14 `sigv4`) whose body is larger than
    /// `max_replay_body`, for a service that does not take `UNSIGNED-PAYLOAD` (or of no declared
    /// length).
    #[error(
        "provider {provider:?} signs request bodies (AWS SigV4) and this one is larger than [proxy] \
         max_replay_body ({limit} bytes)"
    )]
    BodyTooLarge { provider: String, limit: u64 },
    /// The memory for held request bodies is all in use: try again shortly.
    #[error("too many request bodies are held at once; try again")]
    Busy,
    /// A caller's request that no rule allows (SPEC §13).
    #[error("caller {caller:?} may not {}", forbidden_what(.provider.as_deref(), .denial))]
    Forbidden { caller: String, provider: Option<String>, account: Option<String>, denial: Forbidden },
}

/// What a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// A host that matches no provider, for a caller with `egress = false`.
    Egress,
    Rule(crate::callers::Denial),
}

fn forbidden_what(provider: Option<&str>, denial: &Forbidden) -> String {
    match (denial, provider) {
        (Forbidden::Egress, _) => "reach hosts that match no provider (egress = false)".into(),
        (Forbidden::Rule(d), Some(p)) => format!("use provider {p:?}: {}", d.describe()),
        (Forbidden::Rule(d), None) => d.describe().into(),
    }
}

impl ProxyError {
    /// A host that matches no provider while `[egress] allow_unmatched` is false.
    pub fn unmatched_host(host: String) -> ProxyError {
        let reason = format!("host {host} matches no provider and [egress] allow_unmatched is false");
        ProxyError::EgressDenied { host, reason }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NotAProxyRequest | ProxyError::BadTarget(_) | ProxyError::BadAccount { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::AccountRequired { asked_on: AccountAsk::ForwardPort, .. } => {
                StatusCode::PROXY_AUTHENTICATION_REQUIRED
            }
            ProxyError::AccountRequired { .. } => StatusCode::BAD_REQUEST,
            ProxyError::CallerUnknown { route: false, .. } => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::CallerUnknown { route: true, .. } => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::EgressDenied { .. } | ProxyError::PlaintextRefused { .. } => StatusCode::FORBIDDEN,
            ProxyError::TokenUnavailable { .. }
            | ProxyError::UpstreamUnreachable { .. }
            | ProxyError::Interception { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable code: the `error` field and the `x-tokenproxy-error` header.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NotAProxyRequest => "not_a_proxy_request",
            ProxyError::BadTarget(_) => "bad_target",
            ProxyError::EgressDenied { .. } => "egress_denied",
            ProxyError::PlaintextRefused { .. } => "plaintext_refused",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::AccountRequired { .. } => "account_required",
            ProxyError::BadAccount { .. } => "bad_account",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::Interception { .. } => "interception_failed",
            ProxyError::CallerUnknown { .. } => "caller_unknown",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::Busy => "busy",
        }
    }

    fn body(&self) -> serde_json::Value {
        match self {
            ProxyError::TokenUnavailable { provider, account, reason, action } => match account {
                None => json!({
                    "error": self.code(), "provider": provider, "reason": reason, "action": action,
                }),
                Some(account) => json!({
                    "error": self.code(), "provider": provider, "account": account, "reason": reason,
                    "action": action,
                }),
            },
            ProxyError::AccountRequired { provider, asked_on } => json!({
                "error": self.code(),
                "provider": provider,
                "reason": self.to_string(),
                "action": asked_on.action(),
            }),
            ProxyError::BadAccount { provider, reason } => json!({
                "error": self.code(),
                "provider": provider,
                "reason": reason.to_string(),
                "action": "account names are 1-128 characters from A-Z a-z 0-9 . _ @ + - and do not start with '.'",
            }),
            ProxyError::BodyTooLarge { provider, .. } => json!({
                "error": self.code(),
                "provider": provider,
                "reason": self.to_string(),
                "action": "raise [proxy] max_replay_body, or send smaller bodies (S3 takes a larger body \
                           unsigned when it declares its Content-Length)",
            }),
            ProxyError::PlaintextRefused { provider } => json!({
                "error": self.code(), "provider": provider, "reason": self.to_string(),
            }),
            ProxyError::NotAProxyRequest => json!({
                "error": self.code(),
                "reason": self.to_string(),
                "action": "point the application at this port as its HTTP proxy \
                           (curl -x http://HOST:PORT http://api.example.com/..., HTTP_PROXY=http://HOST:PORT), \
                           or give the provider a [[routes]] listener to use as a base URL",
            }),
            ProxyError::CallerUnknown { .. } => json!({
                "error": self.code(),
                "reason": self.to_string(),
                "action": "send the proxy credentials of a caller (HTTP_PROXY=http://NAME:SECRET@HOST:PORT, \
                           or a JWT as the password or as Proxy-Authorization: Bearer), or run as a uid a caller has",
            }),
            ProxyError::Forbidden { caller, provider, account, denial } => json!({
                "error": self.code(),
                "caller": caller,
                "provider": provider,
                "account": account,
                "not_allowed": match denial {
                    Forbidden::Egress => "egress",
                    Forbidden::Rule(d) => d.code(),
                },
                "reason": self.to_string(),
            }),
            _ => json!({ "error": self.code(), "reason": self.to_string() }),
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if self.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            headers
                .insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"tokenproxy\""));
        }
        response
    }
}
