//! The data path: listener → target → provider → token → upstream → client.
//!
//! A request enters through one of two codecs: the hand-written HTTP/1.1 relay ([`h1`]) for
//! HTTP/1.1 requests without a body (plain HTTP, and HTTPS inside intercepted tunnels), or hyper
//! ([`forward`]) for everything else (bodies, upgrades, HTTP/2, routes to HTTPS upstreams,
//! refusals). Each reads the request into
//! an [`Exchange`] and asks [`decide`] what it carries: the token rules (the plaintext rule, the
//! account, inject or keep, wait for a refresh, the retry after a dead token) are written there
//! once. [`target`] is where a request goes in normal form, [`access`] its metrics and access
//! log line, [`headers`] the header rules both codecs follow.

pub mod access;
mod connect;
pub(crate) use connect::InterceptedHost;
pub(crate) mod decide;
mod forward;
pub mod h1;
mod headers;
pub mod replay;
pub mod target;
pub mod upstream;

use std::sync::Arc;

use crate::audit::Audit;
use crate::callers::Callers;
use crate::config::ProxySettings;
use crate::drain::DrainHandle;
use crate::egress::{DialError, Egress};
use crate::errors::ProxyError;
use crate::tls::leaf::LeafCache;
use crate::tokens::Providers;
pub(crate) use decide::{Entry, Exchange, Verdict};
use h1::pool::{PlainPool, TlsPool};
pub use target::Target;

/// Everything the data path needs, shared by every listener and connection.
pub struct Proxy {
    pub providers: Arc<Providers>,
    pub client: upstream::Client,
    /// HTTP/1.1 only, for `Upgrade` requests (a WebSocket cannot ride on HTTP/2 here).
    pub upgrade_client: upstream::Client,
    /// Idle plain-HTTP/1.1 upstream connections, lent to client connections
    /// ([`h1`]).
    pub plain: Arc<PlainPool>,
    /// Idle HTTPS (HTTP/1.1 over verified TLS) upstream connections, for the requests the relay
    /// serves inside intercepted tunnels.
    pub tls_pool: Arc<TlsPool>,
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
    /// Who may use which credential (SPEC §13); none configured: every client is trusted.
    pub callers: Arc<Callers>,
    /// `[audit] file`, when set.
    pub audit: Option<Audit>,
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
        DialError::Resolve { .. } | DialError::Connect { .. } | DialError::Tls { .. } => {
            ProxyError::UpstreamUnreachable { host, reason: e.to_string() }
        }
    }
}
