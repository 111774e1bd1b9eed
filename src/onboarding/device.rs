//! The device flow (RFC 8628), for machines where no browser can reach tokenproxy: the person
//! enters a short code on another device while tokenproxy polls the token endpoint.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Failure, Onboarding, Outcome, StartError};
use crate::oauth::{RefreshErrorKind, TokenGrant};

/// RFC 8628 §3.5: a `slow_down` answer adds five seconds to the polling interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// What the person must do, and how long they have.
pub struct DeviceCode {
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
}

/// Something the flow reports while it runs.
pub enum DeviceEvent<'a> {
    /// Show this to the person.
    Code(&'a DeviceCode),
    /// Still waiting, this long left.
    Waiting(Duration),
    /// The server asked to poll less often: the interval now.
    SlowedDown(Duration),
}

impl Onboarding {
    /// Runs the device flow for (provider, account) to its end, reporting progress to `report`.
    pub async fn device_flow(
        &self,
        provider: &str,
        account: Option<&str>,
        mut report: impl FnMut(DeviceEvent<'_>),
    ) -> Result<Arc<Outcome>, StartError> {
        let super::Connectable { provider: p, account, oauth, .. } = self.target(provider, account, false)?;
        let oauth = &oauth;
        let authorization = match self.oauth.device_authorization(oauth).await {
            Ok(authorization) => authorization,
            Err(e) => {
                return Ok(self.record(
                    Some(p.name()),
                    account.as_deref(),
                    None,
                    Err(Failure::ExchangeFailed(e)),
                ));
            }
        };
        let code = DeviceCode {
            user_code: authorization.user_code.clone(),
            verification_uri: authorization.verification_uri.clone(),
            verification_uri_complete: authorization.verification_uri_complete.clone(),
            expires_in: authorization.expires_in,
        };
        report(DeviceEvent::Code(&code));
        let deadline = Instant::now() + authorization.expires_in;
        let mut interval = authorization.interval;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Failure::StateExpired);
            }
            report(DeviceEvent::Waiting(left));
            tokio::time::sleep(interval.min(left)).await;
            match self.oauth.token_request(oauth, TokenGrant::DeviceCode(&authorization.device_code)).await {
                Ok(issued) => break self.complete(&p, account.as_deref(), &issued).await,
                Err(e) => match e.code.as_deref() {
                    Some("authorization_pending") => {}
                    Some("slow_down") => {
                        interval += SLOW_DOWN_STEP;
                        report(DeviceEvent::SlowedDown(interval));
                    }
                    Some("access_denied") => break Err(Failure::AccessDenied(None)),
                    Some("expired_token") => break Err(Failure::StateExpired),
                    // A blip on the way to the endpoint is not the person's answer.
                    _ if e.kind.is_transient() => {
                        if let RefreshErrorKind::RateLimited { retry_after: Some(after) } = e.kind {
                            interval = interval.max(after);
                        }
                    }
                    _ => break Err(Failure::ExchangeFailed(e)),
                },
            }
        };
        Ok(self.record(Some(p.name()), account.as_deref(), None, result))
    }
}
