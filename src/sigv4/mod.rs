//! AWS Signature Version 4 providers (SPEC §14 `[providers.NAME.sigv4]`): requests are signed
//! instead of carrying a Bearer token. [`Signer`] holds the credentials the request path signs
//! with, lock-free (`ArcSwap`), and keeps them fresh in the background: a key pair in files is
//! read again when it changes; an STS session is renewed before it ends. The signature itself is
//! [`sign`]'s (the `aws-sigv4` crate), at the decision point ([`crate::proxy`]).

mod config;
mod sign;
mod sts;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use time::OffsetDateTime;

pub use config::{CredentialSource, SigV4Config};
pub(crate) use config::{RawSigV4, validate};
pub use sign::{AwsCredentials, Payload, SignError, is_s3, sign_request};

use crate::secrets::fingerprint;
use crate::tokens::{TokenState, TokenView, fmt_time};

/// Credentials as the request path signs with them.
pub struct Session {
    pub credentials: AwsCredentials,
    /// When an STS session ends; `None` for keys from files.
    pub expires_at: Option<OffsetDateTime>,
    /// Of the secret access key: what logs and `/tokens` show.
    pub fingerprint: String,
    obtained_at: OffsetDateTime,
}

impl Session {
    fn new(credentials: AwsCredentials, expires_at: Option<OffsetDateTime>) -> Session {
        let fingerprint = fingerprint(&credentials.secret_access_key);
        Session { credentials, expires_at, fingerprint, obtained_at: OffsetDateTime::now_utc() }
    }

    fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// When to ask STS again: five minutes before the end, or halfway through a shorter session.
    fn renew_in(&self, now: OffsetDateTime) -> Duration {
        let Some(end) = self.expires_at else { return FILE_RECHECK };
        let life = (end - self.obtained_at).max(time::Duration::ZERO);
        let margin: time::Duration = (life / 2i32).min(time::Duration::minutes(5));
        Duration::try_from(end - margin - now).unwrap_or_default().max(Duration::from_secs(1))
    }
}

/// How often key files are read again (a rotated secret mount is picked up within this).
const FILE_RECHECK: Duration = Duration::from_secs(1);
/// The longest wait between two attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What happened to the last attempt to obtain credentials, for `/tokens`.
#[derive(Default)]
struct Status {
    last_at: Option<OffsetDateTime>,
    last_error: Option<String>,
    renewals: u64,
}

/// One SigV4 provider's credentials.
pub struct Signer {
    pub config: SigV4Config,
    provider: String,
    session: ArcSwapOption<Session>,
    status: Mutex<Status>,
    /// STS's client (the token endpoints' one: no proxy, verified TLS); set by [`Signer::start`].
    http: OnceLock<reqwest::Client>,
    /// One renewal at a time (the background one, a manual one).
    renewing: tokio::sync::Mutex<()>,
}

impl Signer {
    pub fn new(provider: &str, config: SigV4Config) -> Signer {
        Signer {
            config,
            provider: provider.to_string(),
            session: ArcSwapOption::empty(),
            status: Mutex::default(),
            http: OnceLock::new(),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// Obtains the first credentials (a failure is kept for `/tokens` and `/readyz`, not fatal),
    /// then keeps them fresh in the background for as long as the runtime runs.
    pub async fn start(self: &Arc<Self>, http: reqwest::Client) {
        let _ = self.http.set(http);
        let mut wait = self.renew().await.unwrap_or(Duration::from_secs(1));
        let signer = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                wait = match signer.renew().await {
                    Ok(next) => {
                        backoff = Duration::from_secs(1);
                        next
                    }
                    Err(()) => {
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        backoff
                    }
                };
            }
        });
    }

    /// Reads or asks for credentials once, now; `Ok`: how long until the next time.
    pub async fn renew(&self) -> Result<Duration, ()> {
        let _one = self.renewing.lock().await;
        let obtained = match &self.config.source {
            CredentialSource::Files { access_key_id, secret_access_key, session_token } => {
                read_files(access_key_id, secret_access_key, session_token.as_deref())
            }
            CredentialSource::WebIdentity { role_arn, token_file, sts_url, session_name, duration } => {
                let Some(http) = self.http.get() else { return Err(()) };
                match crate::grants::read_token_file(token_file, "web_identity_token_file") {
                    Err(e) => Err(e.message),
                    Ok(token) => {
                        let ask = sts::AssumeRole {
                            sts_url,
                            role_arn,
                            session_name,
                            duration: *duration,
                            web_identity_token: &token,
                        };
                        sts::assume_role(http, ask).await
                    }
                }
            }
        };
        let now = OffsetDateTime::now_utc();
        let web = matches!(self.config.source, CredentialSource::WebIdentity { .. });
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match obtained {
            Ok(session) => {
                let same = self.session.load().as_ref().is_some_and(|s| {
                    s.fingerprint == session.fingerprint
                        && s.credentials.session_token == session.credentials.session_token
                        && s.expires_at == session.expires_at
                });
                let next = session.renew_in(now);
                if !same {
                    tracing::info!(
                        provider = self.provider,
                        fingerprint = %session.fingerprint,
                        expires_at = fmt_time(session.expires_at).as_deref(),
                        "AWS credentials in use"
                    );
                    if web {
                        status.renewals += 1;
                        crate::metrics::refresh(&self.provider, "scheduled", "ok", Duration::ZERO);
                    }
                    self.session.store(Some(Arc::new(session)));
                }
                if web || !same || status.last_error.is_some() {
                    status.last_at = Some(now);
                }
                status.last_error = None;
                Ok(next)
            }
            Err(e) => {
                if status.last_error.as_deref() != Some(&e) {
                    tracing::warn!(provider = self.provider, error = %e, "cannot obtain AWS credentials");
                }
                if web {
                    crate::metrics::refresh(&self.provider, "scheduled", "error", Duration::ZERO);
                }
                status.last_at = Some(now);
                status.last_error = Some(e);
                Err(())
            }
        }
    }

    /// The credentials to sign with now, or why there are none (for the error body).
    pub fn session(&self, now: OffsetDateTime) -> Result<Arc<Session>, String> {
        match self.session.load_full() {
            Some(session) if !session.is_expired(now) => Ok(session),
            held => {
                let error = self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error.clone();
                Err(match (held, error) {
                    (_, Some(error)) => error,
                    (Some(_), None) => "the STS session ended and no new one came yet".into(),
                    (None, None) => "no AWS credentials obtained yet".into(),
                })
            }
        }
    }

    /// Why the last attempt to obtain credentials failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error.clone()
    }

    pub fn state(&self, now: OffsetDateTime) -> TokenState {
        let failing = self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error.is_some();
        match self.session.load().as_ref() {
            None if failing => TokenState::Error,
            None => TokenState::Missing,
            Some(s) if s.is_expired(now) => TokenState::Expired,
            Some(s) if s.renew_in(now) <= Duration::from_secs(1) && s.expires_at.is_some() => {
                TokenState::Expiring
            }
            Some(_) => TokenState::Valid,
        }
    }

    /// What to do when signing is impossible.
    pub fn action(&self) -> String {
        match &self.config.source {
            CredentialSource::Files { access_key_id, secret_access_key, .. } => format!(
                "put the key pair into {} and {}; they are read again within a second",
                access_key_id.display(),
                secret_access_key.display()
            ),
            CredentialSource::WebIdentity { role_arn, token_file, .. } => format!(
                "check that {} holds a current web identity token and that role {role_arn} trusts its \
                 issuer; tokenproxy asks STS again on its own (or POST /tokens/{}/refresh)",
                token_file.display(),
                self.provider
            ),
        }
    }

    /// The provider as `GET /tokens` shows it: fingerprints only.
    pub fn view(&self, now: OffsetDateTime) -> TokenView {
        let session = self.session.load_full();
        let state = self.state(now);
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let source = match &self.config.source {
            CredentialSource::Files { .. } => "keys from files",
            CredentialSource::WebIdentity { .. } => "STS AssumeRoleWithWebIdentity",
        };
        TokenView {
            provider: self.provider.clone(),
            account: None,
            state,
            expires_at: session.as_ref().and_then(|s| fmt_time(s.expires_at)),
            expires_in_s: session.as_ref().and_then(|s| s.expires_at).map(|at| (at - now).whole_seconds()),
            expiry_source: if session.as_ref().is_some_and(|s| s.expires_at.is_some()) {
                "sts"
            } else {
                "unknown"
            },
            fingerprint: session.as_ref().map(|s| s.fingerprint.clone()),
            last_refresh_at: fmt_time(status.last_at),
            last_refresh_result: status
                .last_at
                .map(|_| if status.last_error.is_some() { "error" } else { "ok" }.to_string()),
            last_error: status.last_error.clone(),
            refresh_count: status.renewals,
            retry_count: 0,
            warning: None,
            signs: Some(format!("SigV4 {}/{}, {source}", self.config.region, self.config.service)),
        }
    }
}

/// A key pair (and session token) from files; surrounding whitespace is not part of a key.
fn read_files(id: &Path, secret: &Path, token: Option<&Path>) -> Result<Session, String> {
    let read = |path: &Path, what: &str| crate::grants::read_token_file(path, what).map_err(|e| e.message);
    let credentials = AwsCredentials {
        access_key_id: read(id, "access_key_id_file")?,
        secret_access_key: read(secret, "secret_access_key_file")?,
        session_token: token.map(|t| read(t, "session_token_file")).transpose()?,
    };
    Ok(Session::new(credentials, None))
}
