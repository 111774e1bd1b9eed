//! What a provider's tokens look like from outside: the states and the view of the admin API
//! (SPEC §6), and the words of a `502 token_unavailable` (SPEC §5).

use super::*;

impl Provider {
    /// How many loaded accounts are in each state (the `tokenproxy_accounts` gauge).
    pub fn account_states(&self, now: OffsetDateTime) -> Vec<(TokenState, usize)> {
        let mut counts = TokenState::ALL.map(|s| (s, 0usize));
        for credential in self.credentials() {
            let state = self.state(&credential, now);
            if let Some(entry) = counts.iter_mut().find(|(s, _)| *s == state) {
                entry.1 += 1;
            }
        }
        counts.to_vec()
    }

    pub fn state(&self, cred: &Credential, now: OffsetDateTime) -> TokenState {
        if let Some(signer) = &self.signer {
            return signer.state(now);
        }
        let (file, reauth, config_error) = {
            let s = cred.status();
            (s.file.clone(), s.reauth_reason.is_some(), s.config_error.is_some())
        };
        if reauth {
            return TokenState::NeedsReauth;
        }
        if config_error {
            return TokenState::Error;
        }
        if cred.refreshing.load(Ordering::Relaxed) {
            return TokenState::Refreshing;
        }
        match cred.current() {
            None if matches!(file, FileStatus::Missing | FileStatus::NotRead) => TokenState::Missing,
            None => TokenState::Error,
            Some(t) => match self.freshness(&t, now) {
                Freshness::Expired => TokenState::Expired,
                Freshness::Expiring => TokenState::Expiring,
                Freshness::Fresh { .. } | Freshness::Unknown => TokenState::Valid,
            },
        }
    }

    /// The one `502 token_unavailable` answer, with what to do about it. Its reason never names
    /// an account in clear (it reaches logs); its action does (it is what the caller must run).
    pub fn unavailable(&self, cred: &Credential, why: Unavailable<'_>) -> ProxyError {
        let shown = self.shown_location(cred);
        let (reason, action) = match why {
            // Nothing to refresh with: said as for a credential without a token.
            Unavailable::Refresh(e) if e.kind == crate::oauth::RefreshErrorKind::NoToken => {
                return self.unavailable(cred, Unavailable::NoToken);
            }
            Unavailable::Refresh(e) => {
                let action = match e.kind {
                    crate::oauth::RefreshErrorKind::InvalidGrant => self.authorize_action(cred),
                    _ => e.action(&self.location(cred)),
                };
                (e.to_string(), action)
            }
            Unavailable::Timeout(limit) => (
                format!("no fresh token within {}s; the refresh goes on in the background", limit.as_secs()),
                "look at /tokens in a moment; if this persists, check the token endpoint's health".into(),
            ),
            Unavailable::NoToken => match (self.view(cred, self.clock.now()), cred.account()) {
                (view, Some(_)) if view.state == TokenState::Missing => {
                    (format!("the account has no token yet ({shown})"), self.authorize_action(cred))
                }
                (view, None) if view.state == TokenState::Missing => {
                    (format!("{shown} does not exist"), self.authorize_action(cred))
                }
                (view, _) => (
                    view.last_error.unwrap_or_else(|| "no token loaded".into()),
                    format!("fix {shown}; it is picked up without a restart"),
                ),
            },
        };
        ProxyError::TokenUnavailable {
            provider: self.name().to_string(),
            account: cred.account().map(str::to_string),
            reason,
            action,
        }
    }

    /// What gets a credential its first token, or a new one after revocation: the onboarding
    /// flows (SPEC §9; an account's answer always names them, SPEC §8), else writing the token by
    /// hand.
    fn authorize_action(&self, cred: &Credential) -> String {
        let location = self.location(cred);
        let oauth = self.config.oauth.as_ref();
        let browser = oauth.is_some_and(|o| o.authorize_url.is_some());
        let device = oauth.is_some_and(|o| o.device_authorization_url.is_some());
        let name = self.name();
        if let Some(grant) = oauth.map(|o| o.grant).filter(|g| g.proves_itself()) {
            // No person to ask: what the endpoint refused is the key, the assertion's subject or
            // the installation, which the provider's settings name.
            return format!(
                "the token endpoint refused the {} grant: check the key registered with the provider, \
                 the account (a delegated user, an installation id) and [providers.{name}.oauth]; \
                 then POST /tokens/{name}/refresh (no restart needed)",
                grant.name()
            );
        }
        if cred.account().is_none() && !browser && !device {
            return format!(
                "re-authorize: put a new refresh_token (or token) into {location}; tokenproxy picks it up \
                 without a restart (or set authorize_url in [providers.{name}.oauth] to connect from /connect)"
            );
        }
        let account = cred.account().map(|a| format!(" --account {a}")).unwrap_or_default();
        let device_only = device && !browser;
        let command =
            format!("tokenproxy authorize {name}{account}{}", if device_only { " --device" } else { "" });
        let page = if device_only { "" } else { ", or use Connect on the admin listener's /connect page" };
        let setup = if browser || device {
            String::new()
        } else {
            format!(" (once [providers.{name}.oauth] has an authorize_url)")
        };
        format!(
            "re-authorize: run `{command}`{page}{setup}; it writes {location}, which is picked up without a restart"
        )
    }

    /// A credential as `GET /tokens` shows it. Holds fingerprints only.
    pub fn view(&self, cred: &Credential, now: OffsetDateTime) -> TokenView {
        if let Some(signer) = &self.signer {
            return signer.view(now);
        }
        let state = self.state(cred, now);
        let token = cred.current();
        let status = cred.status();
        TokenView {
            provider: self.name().to_string(),
            account: cred.account().map(str::to_string),
            state,
            expires_at: token.as_ref().and_then(|t| fmt_time(t.expires_at)),
            expires_in_s: token.as_ref().and_then(|t| t.expires_at).map(|at| (at - now).whole_seconds()),
            expiry_source: token.as_ref().map_or("unknown", |t| t.expiry_source.as_str()),
            fingerprint: token.as_ref().map(|t| t.fingerprint.clone()),
            last_refresh_at: fmt_time(status.last_refresh_at),
            last_refresh_result: status.last_refresh_result.clone(),
            last_error: status.last_error.clone(),
            refresh_count: status.refresh_count,
            retry_count: status.retry_count,
            warning: status.unsealed.then(|| {
                format!(
                    "{} is stored in plaintext although encryption at rest is configured: it was not written by tokenproxy (planted over a sealed one?); it is sealed on its next write",
                    self.shown_location(cred)
                )
            }),
            signs: None,
        }
    }
}

/// One provider on `GET /tokens` (SPEC §6).
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    pub provider: String,
    /// The account's name; `null` for a single-account provider.
    pub account: Option<String>,
    pub state: TokenState,
    pub expires_at: Option<String>,
    pub expires_in_s: Option<i64>,
    pub expiry_source: &'static str,
    pub fingerprint: Option<String>,
    pub last_refresh_at: Option<String>,
    pub last_refresh_result: Option<String>,
    pub last_error: Option<String>,
    pub refresh_count: u64,
    pub retry_count: u64,
    /// Something to know that is not an error: a plaintext token document where encryption at
    /// rest is configured (planted over a sealed one, or not written by tokenproxy yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// How a provider that signs rather than injects a token signs (SPEC §14 `sigv4`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signs: Option<String>,
}
