//! GitHub App installation tokens: the app's JWT, then
//! `POST {api_url}/app/installations/{id}/access_tokens`, whose answer is `{"token", "expires_at"}`
//! (an hour). The account is the installation id.

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::config::GithubAppConfig;
use crate::config::OAuthConfig;
use crate::oauth::{IssuedToken, RefreshError, RefreshErrorKind};

pub async fn installation_token(
    http: &reqwest::Client,
    oauth: &OAuthConfig,
    installation: Option<&str>,
) -> Result<IssuedToken, RefreshError> {
    let fail = |kind, message: String| RefreshError::new(kind, message);
    let (Some(app), Some(assertion)) = (&oauth.grants.github, &oauth.grants.assertion) else {
        return Err(fail(
            RefreshErrorKind::InvalidClient,
            "grant = \"github_app\" without app_id or key".into(),
        ));
    };
    let installation = installation
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            fail(
                RefreshErrorKind::InvalidClient,
                "a GitHub App's account is its installation id (digits); name one with the account".into(),
            )
        })?;
    let jwt = super::app_jwt(assertion, &app.app_id)?;
    let url = installation_url(app, installation);
    let response = http
        .post(url)
        .bearer_auth(jwt)
        .header("accept", "application/vnd.github+json")
        .header("x-github-api-version", "2022-11-28")
        .send()
        .await
        .map_err(|e| {
            fail(
                RefreshErrorKind::NetworkError,
                format!("GitHub API unreachable: {}", crate::errors::report(&e)),
            )
        })?;
    let status = response.status().as_u16();
    let rate_limited = status == 429
        || (status == 403 && response.headers().get("x-ratelimit-remaining").is_some_and(|v| v == "0"));
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(std::time::Duration::from_secs);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    // GitHub's `message` says what is wrong, never a token.
    let said = || {
        body.get("message")
            .and_then(Value::as_str)
            .map(|m| format!(": {}", m.chars().take(200).collect::<String>()))
    };
    match status {
        200..=299 => {
            let token = body.get("token").and_then(Value::as_str).filter(|t| !t.trim().is_empty());
            let expires_at = body
                .get("expires_at")
                .and_then(Value::as_str)
                .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok());
            match (token, expires_at) {
                (Some(token), Some(expires_at)) => Ok(IssuedToken {
                    access_token: token.trim().to_string(),
                    refresh_token: None,
                    expires_at,
                    token_type: Some("token".into()),
                    scope: None,
                    fields: Map::new(),
                }),
                _ => Err(fail(
                    RefreshErrorKind::BadResponse,
                    format!("HTTP {status} from GitHub without a token and an expires_at"),
                )),
            }
        }
        _ if rate_limited => Err(fail(
            RefreshErrorKind::RateLimited { retry_after },
            format!("HTTP {status} from GitHub: rate limited"),
        )),
        500.. => Err(fail(RefreshErrorKind::ServerError, format!("HTTP {status} from GitHub"))),
        // 404: no such installation (or it was removed): a person must act, like a revoked grant.
        404 => Err(fail(
            RefreshErrorKind::InvalidGrant,
            format!(
                "GitHub knows no installation {installation} of app {}{}",
                app.app_id,
                said().unwrap_or_default()
            ),
        )),
        _ => Err(fail(
            RefreshErrorKind::InvalidClient,
            format!("HTTP {status} from GitHub for app {}{}", app.app_id, said().unwrap_or_default()),
        )),
    }
}

fn installation_url(app: &GithubAppConfig, installation: &str) -> String {
    let base = app.api_url.to_string();
    format!("{}/app/installations/{installation}/access_tokens", base.trim_end_matches('/'))
}
