//! The token rules, written once: where a request may go, whose token it carries, whether it must
//! wait for one, and what happens after the upstream calls that token dead (SPEC §5, §8). The two
//! codecs, hyper's path ([`super::forward`]) and the hand-written relay ([`super::h1`]), read a
//! request, fill in an [`Exchange`], and ask here; neither knows the rules.
//!
//! A decision is one call: [`Proxy::decide`], which may wait (an account's first read, the
//! refresh of an expired token), or [`Proxy::decide_at_once`], the same rules without the waits,
//! for the relay: it reads an account itself when told to ([`AtOnce::Load`]) and hands a request
//! that must wait for a refresh to hyper's path.

use std::sync::Arc;

use http::uri::Scheme;
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Proxy, Target, headers};
use crate::accounts::BadAccount;
use crate::callers::policy::Ask;
use crate::callers::{Allowed, Caller, Peer};
use crate::config::{ClientHeader, UpstreamScheme};
use crate::errors::{AccountAsk, Forbidden, ProxyError};
use crate::metrics;
use crate::tokens::refresh::Trigger;
use crate::tokens::{AccountError, Credential, Found, Provider, Token, Unavailable};

/// One request, as the rules see it: made by a codec where the request enters, and carried
/// whole through every step, so that what the steps need to know grows here, not in every
/// signature.
pub(crate) struct Exchange<'a> {
    pub target: Target,
    pub provider: Option<&'a Arc<Provider>>,
    /// The `Proxy-Authorization` value: of this request, or of the CONNECT of its tunnel. It names
    /// the caller when callers are configured (SPEC §13), else the account (SPEC §8, second in
    /// the selection order).
    pub credentials: Option<&'a [u8]>,
    /// The client connection the request came on.
    pub peer: &'a Peer,
    pub method: &'a str,
    /// The path the upstream gets, without the query.
    pub path: &'a str,
    pub entry: Entry,
    /// What the rules decided, for the audit line: filled in as they go.
    pub verdict: Verdict,
}

impl<'a> Exchange<'a> {
    /// A CONNECT (or a redirected connection) as [`Proxy::admit`] sees it: where it goes, who
    /// sends it; its requests, if tokenproxy sees them, are exchanges of their own.
    pub(crate) fn connect(
        target: Target,
        provider: Option<&'a Arc<Provider>>,
        credentials: Option<&'a [u8]>,
        peer: &'a Peer,
    ) -> Exchange<'a> {
        Exchange {
            target,
            provider,
            credentials,
            peer,
            method: "CONNECT",
            path: "-",
            entry: Entry::Connect,
            verdict: Verdict::default(),
        }
    }
}

/// Where a request entered: on the forward port, proxy credentials can still name an account
/// (`407`); in a tunnel or on a route they cannot (`400`). A CONNECT is admitted (its caller,
/// the host) and its requests are decided one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    Forward,
    Connect,
    Tunnel,
    Route,
}

/// Who asked and what the rules made of it.
#[derive(Default)]
pub(crate) struct Verdict {
    /// The caller the request belongs to (with callers configured).
    pub caller: Option<Arc<Caller>>,
    /// Whether the rules let it use what it asked for.
    pub allowed: bool,
    /// The rule that allowed it, or why it was decided without one.
    pub rule: Option<Ruled>,
    /// The account the caller's rule chose.
    pub account: Option<Box<str>>,
    /// Callers are configured and the request belongs to none.
    pub unknown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ruled {
    /// The index of the caller's `allow` rule.
    Rule(usize),
    /// No rule was asked: `open` (no callers), `egress` (a host of no provider), or why not.
    Reason(&'static str),
}

/// What the request's own headers say to the rules.
pub(crate) struct Asked<'a> {
    /// The `Tokenproxy-Account` header's value, or why it names none (two different ones).
    pub account: Result<Option<&'a HeaderValue>, BadAccount>,
    /// Whether the request carries a header by this name (the client's own token).
    pub carries: &'a (dyn Fn(&HeaderName) -> bool + Sync),
}

/// What the request carries upstream.
pub(crate) enum Decision {
    /// Nothing of tokenproxy's: no provider, or the client's own header is kept.
    Pass,
    Inject(Injected),
    /// A signature over the request as it leaves (SPEC §14 `sigv4`): made by the codec that holds
    /// the body, hyper's.
    Sign(Signing),
}

/// The credentials a request is signed with, and whose they are.
pub(crate) struct Signing {
    pub provider: Arc<Provider>,
    pub session: Arc<crate::sigv4::Session>,
}

/// The token a request carries, and whose it is.
pub(crate) struct Injected {
    pub provider: Arc<Provider>,
    pub credential: Arc<Credential>,
    pub token: Arc<Token>,
}

/// What [`Proxy::decide_at_once`] found.
pub(crate) enum AtOnce {
    Decided(Result<Decision, ProxyError>),
    /// An account not in memory yet: read it ([`Provider::load_named`]), then ask again.
    Load(Arc<Provider>, String),
    /// A refresh to wait for, or a target that changed scheme: [`Proxy::decide`]'s to do.
    Wait,
}

/// How far the rules got without waiting.
enum Step<'a> {
    Done(Decision),
    /// The credential is known; its token may still have to be waited for.
    Credential(&'a Arc<Provider>, Arc<Credential>),
    /// An account must first be read from the store.
    Load(&'a Arc<Provider>, String),
}

impl Proxy {
    /// The decision for a request, waiting for what it must: an account's first read, or the
    /// refresh that replaces an expired token (at most `upstream_timeout`). The target may
    /// change (a provider with `upstream_scheme = "https"` moves plain HTTP to TLS). `Err`: the
    /// request is refused with that answer.
    pub(crate) async fn decide(
        &self,
        ex: &mut Exchange<'_>,
        asked: &Asked<'_>,
    ) -> Result<Decision, ProxyError> {
        let (provider, credential) = match self.step(ex, asked)? {
            Step::Done(decision) => return Ok(decision),
            Step::Credential(provider, credential) => (provider, credential),
            Step::Load(provider, name) => (provider, provider.load_named(&name).await),
        };
        let token = match self.token_at_once(provider, &credential) {
            Some(token) => token,
            None => Box::pin(self.wait_for_refresh(provider, &credential)).await?,
        };
        Ok(Decision::Inject(Injected { provider: provider.clone(), credential, token }))
    }

    /// [`Proxy::decide`] without its waits: decided, or the account to read first, or a wait
    /// (a refresh, a changed target) for `decide` to do.
    pub(crate) fn decide_at_once(&self, ex: &mut Exchange<'_>, asked: &Asked<'_>) -> AtOnce {
        let scheme = ex.target.scheme.clone();
        let step = self.step(ex, asked);
        if ex.target.scheme != scheme {
            return AtOnce::Wait;
        }
        match step {
            Ok(Step::Done(decision)) => AtOnce::Decided(Ok(decision)),
            Ok(Step::Credential(provider, credential)) => match self.token_at_once(provider, &credential) {
                Some(token) => AtOnce::Decided(Ok(Decision::Inject(Injected {
                    provider: provider.clone(),
                    credential,
                    token,
                }))),
                None => AtOnce::Wait,
            },
            Ok(Step::Load(provider, name)) => AtOnce::Load(provider.clone(), name),
            Err(e) => AtOnce::Decided(Err(e)),
        }
    }

    /// The rules up to the first wait.
    fn step<'a>(&self, ex: &mut Exchange<'a>, asked: &Asked<'_>) -> Result<Step<'a>, ProxyError> {
        self.admit(ex)?;
        let Some(provider) = ex.provider else { return Ok(Step::Done(Decision::Pass)) };
        let config = &provider.config;
        if ex.target.scheme == Scheme::HTTP && config.upstream_scheme == UpstreamScheme::Https {
            ex.target = ex.target.upgraded_to_https();
        }
        if ex.target.scheme == Scheme::HTTP && !config.allow_plaintext {
            return Err(ProxyError::PlaintextRefused { provider: provider.name().to_string() });
        }
        let bad = |reason| ProxyError::BadAccount { provider: provider.name().to_string(), reason };
        let header = match asked.account.map_err(bad)? {
            Some(value) => Some(value.to_str().map_err(|_| bad(BadAccount::Character))?),
            None => None,
        };
        let proxy_user;
        let named = match ex.verdict.caller.clone() {
            Some(caller) => {
                let allowed = self.allowed(&caller, provider, header, ex)?;
                ex.verdict.account = allowed.account;
                ex.verdict.account.as_deref()
            }
            None => {
                ex.verdict.allowed = true;
                ex.verdict.rule = Some(Ruled::Reason("open"));
                proxy_user = match (header, provider.single()) {
                    (None, None) => ex.credentials.and_then(headers::proxy_user_of),
                    _ => None,
                };
                header.or(proxy_user.as_deref())
            }
        };
        if config.client_header == ClientHeader::Keep && (asked.carries)(&config.header) {
            return Ok(Step::Done(Decision::Pass));
        }
        if let Some(signer) = &provider.signer {
            let session =
                signer.session(provider.clock.now()).map_err(|reason| ProxyError::TokenUnavailable {
                    provider: provider.name().to_string(),
                    account: None,
                    reason,
                    action: signer.action(),
                })?;
            return Ok(Step::Done(Decision::Sign(Signing { provider: provider.clone(), session })));
        }
        Ok(match self.find_credential(provider, named, ex)? {
            Found::Ready(credential) => Step::Credential(provider, credential),
            Found::ToLoad(name) => Step::Load(provider, name),
        })
    }

    /// The first of the rules, for every entry (a CONNECT too): who the request belongs to, when
    /// callers are configured (SPEC §13), and whether it may go to a host that matches no
    /// provider (`[egress]`, a caller's `egress`).
    pub(crate) fn admit(&self, ex: &mut Exchange<'_>) -> Result<(), ProxyError> {
        let table = self.callers.current();
        if !table.is_open() {
            match table.identify(ex.credentials, ex.peer) {
                Ok(caller) => ex.verdict.caller = Some(caller),
                Err(why) => {
                    ex.verdict.unknown = true;
                    ex.verdict.rule = Some(Ruled::Reason(why.code()));
                    return Err(ProxyError::CallerUnknown { why, route: ex.entry == Entry::Route });
                }
            }
        }
        if ex.provider.is_some() {
            return Ok(());
        }
        if !self.allow_unmatched {
            return Err(ProxyError::unmatched_host(ex.target.authority.to_string()));
        }
        if let Some(caller) = &ex.verdict.caller
            && !caller.egress
        {
            ex.verdict.rule = Some(Ruled::Reason("egress_forbidden"));
            return Err(ProxyError::Forbidden {
                caller: caller.name.to_string(),
                provider: None,
                account: None,
                denial: Forbidden::Egress,
            });
        }
        ex.verdict.allowed = true;
        ex.verdict.rule = Some(Ruled::Reason("egress"));
        Ok(())
    }

    /// Resolves when a tunnel to a host of no provider may no longer be held: after a reload
    /// (SPEC §13), its CONNECT is admitted again with what it was admitted with, and a refusal
    /// ends it. An opaque tunnel has no request of its own to refuse.
    pub(crate) async fn revoked(&self, target: &Target, credentials: Option<&[u8]>, peer: &Peer) {
        let mut replaced = self.callers.replaced();
        loop {
            if replaced.changed().await.is_err() {
                return std::future::pending().await;
            }
            let mut ex = Exchange::connect(target.clone(), None, credentials, peer);
            if let Err(e) = self.admit(&mut ex) {
                tracing::info!(
                    host = %target.authority,
                    caller = ex.verdict.caller.as_ref().map(|c| &*c.name),
                    code = e.code(),
                    "tunnel closed: its caller may no longer hold it"
                );
                return;
            }
        }
    }

    /// The caller's rules for a request to `provider` (SPEC §13): the rule that allows it and
    /// the account it uses, or `403`.
    fn allowed(
        &self,
        caller: &Caller,
        provider: &Provider,
        named: Option<&str>,
        ex: &mut Exchange<'_>,
    ) -> Result<Allowed, ProxyError> {
        let ask = Ask {
            provider: provider.name(),
            multi_account: provider.single().is_none(),
            provider_default: provider.config.default_account.as_deref(),
            method: ex.method,
            path: ex.path,
            named,
        };
        match caller.allow(&ask) {
            Ok(allowed) => {
                ex.verdict.allowed = true;
                ex.verdict.rule = Some(Ruled::Rule(allowed.rule));
                Ok(allowed)
            }
            Err(refusal) => {
                ex.verdict.rule = Some(Ruled::Reason(refusal.denial.code()));
                let account = refusal.account.as_deref().map(str::to_string);
                ex.verdict.account = refusal.account;
                Err(ProxyError::Forbidden {
                    caller: caller.name.to_string(),
                    provider: Some(provider.name().to_string()),
                    account,
                    denial: Forbidden::Rule(refusal.denial),
                })
            }
        }
    }

    /// Whose token the request carries (SPEC §8): a single-account provider's one credential;
    /// for a multi-account provider the account `named` (by the `Tokenproxy-Account` header, the
    /// proxy credentials' user name or a caller's rule), else the provider's `default_account`.
    fn find_credential(
        &self,
        provider: &Provider,
        named: Option<&str>,
        ex: &Exchange<'_>,
    ) -> Result<Found, ProxyError> {
        if let Some(single) = provider.single() {
            return Ok(Found::Ready(single.clone()));
        }
        let bad = |reason| ProxyError::BadAccount { provider: provider.name().to_string(), reason };
        provider.find_credential(named).map_err(|e| match e {
            AccountError::Required => ProxyError::AccountRequired {
                provider: provider.name().to_string(),
                // With callers, the proxy credentials name the caller: only the header is left.
                asked_on: if ex.entry == Entry::Forward && ex.verdict.caller.is_none() {
                    AccountAsk::ForwardPort
                } else {
                    AccountAsk::Request
                },
            },
            AccountError::Bad(reason) => bad(reason),
        })
    }

    /// The token to inject when there is one to use now. An account's requests also keep it
    /// fresh: one that finds its token due starts a background refresh. `None`: a missing or
    /// expired token, to be waited for.
    fn token_at_once(&self, provider: &Arc<Provider>, credential: &Arc<Credential>) -> Option<Arc<Token>> {
        let token = credential.current()?;
        if !provider.can_refresh() {
            return Some(token);
        }
        let now = provider.clock.now();
        if !token.is_refresh_due(now) {
            return Some(token);
        }
        if token.is_expired(now) {
            return None;
        }
        if credential.account().is_some() {
            provider.refresh_ahead(credential);
        }
        Some(token)
    }

    /// The expired (or missing) token's replacement, from the refresh in flight.
    async fn wait_for_refresh(
        &self,
        provider: &Arc<Provider>,
        cred: &Arc<Credential>,
    ) -> Result<Arc<Token>, ProxyError> {
        if !provider.can_refresh() {
            return Err(provider.unavailable(cred, Unavailable::NoToken));
        }
        let wait = self.settings.upstream_timeout;
        match tokio::time::timeout(wait, provider.refresh(cred, Trigger::Expired, None)).await {
            Ok(Ok(token)) => Ok(token),
            Ok(Err(e)) => Err(provider.unavailable(cred, Unavailable::Refresh(&e))),
            Err(_) => Err(provider.unavailable(cred, Unavailable::Timeout(wait))),
        }
    }

    /// After the upstream answered `status` to a request that carried `injected`'s token: the
    /// token for the one retry, when the status says the token is dead (`refresh_on_status`), the
    /// request can be sent again, and one refresh (shared with every request that saw the same
    /// token fail) brings a new one. `None`: the client gets this answer.
    pub(crate) async fn token_for_retry(
        &self,
        injected: &Injected,
        status: StatusCode,
        replayable: bool,
    ) -> Option<Arc<Token>> {
        let Injected { provider, credential, token: failed } = injected;
        if !provider.config.refresh_on_status.contains(&status) {
            return None;
        }
        let name = provider.name();
        metrics::upstream_unauthorized(name);
        tracing::info!(
            provider = name,
            status = status.as_u16(),
            account = credential.account_log(),
            fingerprint = %failed.fingerprint,
            "upstream rejected the token"
        );
        if !replayable {
            metrics::retry(name, "not_replayable");
            return None;
        }
        let refresh = provider.refresh(credential, Trigger::Unauthorized, Some(failed.generation));
        match tokio::time::timeout(self.settings.upstream_timeout, refresh).await {
            Ok(Ok(fresh)) => {
                credential.note_retry();
                Some(fresh)
            }
            _ => {
                metrics::retry(name, "refresh_failed");
                None
            }
        }
    }
}

impl Injected {
    /// Records how the retry after a dead token went: its answer's status, or `None` when it
    /// could not be sent.
    pub(crate) fn record_retry(&self, status: Option<StatusCode>) {
        let outcome = match status {
            None => "error",
            Some(s) if self.provider.config.refresh_on_status.contains(&s) => "unauthorized",
            Some(_) => "ok",
        };
        metrics::retry(self.provider.name(), outcome);
    }
}
