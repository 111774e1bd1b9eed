//! Credentials that no person consents to (SPEC §14): signed assertions (RFC 7523, as a grant
//! and as client authentication), assertions kept fresh by something else (a projected
//! service-account token), RFC 8693 token exchange, GitHub App installation tokens and issuer
//! discovery. Each is one way of asking a token endpoint behind [`crate::oauth::OAuthClient`]:
//! the refresher treats what they issue like any other token.
//!
//! The folder: [`config`] (the keys), [`keys`] (the private keys and signing), [`github`] (the
//! installation token endpoint), [`discovery`] (RFC 8414 and OpenID metadata).

pub mod config;
pub mod discovery;
pub mod github;
pub mod keys;

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use self::config::AssertionConfig;
use crate::oauth::{RefreshError, RefreshErrorKind};

/// RFC 7523 §2.1.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7523 §2.2.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 8693 §2.1.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// A client assertion proves one request: it lives at most this long.
const CLIENT_ASSERTION_TTL: Duration = Duration::from_secs(300);
/// GitHub refuses an app JWT that expires more than ten minutes ahead; `iat` is set a minute
/// back for clock drift, as GitHub advises, so the whole life is ten minutes.
const GITHUB_BACKDATE: u64 = 60;
const GITHUB_AHEAD: u64 = 540;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn config_error(message: String) -> RefreshError {
    RefreshError::new(RefreshErrorKind::InvalidClient, message)
}

/// Signs `claims` (the configured `assertion_claims` added last, so they win).
fn sign(assertion: &AssertionConfig, mut claims: Map<String, Value>) -> Result<String, RefreshError> {
    for (name, value) in &assertion.claims {
        claims.insert(name.clone(), value.clone());
    }
    let key = config::signing_key(assertion)
        .map_err(|e| config_error(format!("the signing key {}: {e}", assertion.key.path().display())))?;
    key.sign(&claims)
        .map_err(|e| config_error(format!("the signing key {}: {e}", assertion.key.path().display())))
}

/// The RFC 7523 §2.1 assertion of `grant = "jwt_bearer"`: `sub` is the account (domain-wide
/// delegation) or the issuer.
pub fn bearer_assertion(
    assertion: &AssertionConfig,
    token_url: &str,
    scope: &str,
    account: Option<&str>,
) -> Result<String, RefreshError> {
    let now = unix_now();
    let mut claims = Map::new();
    claims.insert("iss".into(), assertion.issuer.as_str().into());
    claims.insert("sub".into(), account.unwrap_or(&assertion.issuer).into());
    claims.insert("aud".into(), token_url.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + assertion.ttl.as_secs()).into());
    if !scope.is_empty() {
        claims.insert("scope".into(), scope.into());
    }
    sign(assertion, claims)
}

/// The RFC 7523 §2.2 client assertion of `client_auth = "private_key_jwt"`: short-lived, with a
/// unique `jti` (OpenID Connect Core §9).
pub fn client_assertion(
    assertion: &AssertionConfig,
    client_id: &str,
    token_url: &str,
) -> Result<String, RefreshError> {
    let now = unix_now();
    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|_| config_error("no randomness for the assertion's jti".into()))?;
    let mut claims = Map::new();
    claims.insert("iss".into(), client_id.into());
    claims.insert("sub".into(), client_id.into());
    claims.insert("aud".into(), token_url.into());
    claims.insert("jti".into(), hex::encode(jti).into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + assertion.ttl.min(CLIENT_ASSERTION_TTL).as_secs()).into());
    sign(assertion, claims)
}

/// A GitHub App's JWT: `iss` is the app id, ten minutes of life.
pub fn app_jwt(assertion: &AssertionConfig, app_id: &str) -> Result<String, RefreshError> {
    let now = unix_now();
    let mut claims = Map::new();
    claims.insert("iss".into(), app_id.into());
    claims.insert("iat".into(), now.saturating_sub(GITHUB_BACKDATE).into());
    claims.insert("exp".into(), (now + GITHUB_AHEAD).into());
    sign(assertion, claims)
}

/// A token another program keeps in a file (a projected service-account token, a subject
/// token), read at each use; `what` names the key in errors.
pub fn read_token_file(path: &Path, what: &str) -> Result<String, RefreshError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error(format!("{what} {}: cannot read it: {}", path.display(), e.kind())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(config_error(format!("{what} {} is empty", path.display())));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn assertion_claims_override_iss_sub_and_aud() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
        let mut claims = Map::new();
        claims.insert("aud".into(), "https://audience.example".into());
        claims.insert("sub".into(), "someone".into());
        let assertion = AssertionConfig {
            key: config::KeyFile::Pem(dir.path().join("k.pem")),
            key_id: None,
            ttl: Duration::from_secs(600),
            claims,
            issuer: "svc".into(),
        };
        let jwt = bearer_assertion(&assertion, "https://token.example/", "s1", Some("alice")).unwrap();
        let payload = jwt.split('.').nth(1).unwrap();
        let payload: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap(),
        )
        .unwrap();
        assert_eq!(payload["aud"], "https://audience.example");
        assert_eq!(payload["sub"], "someone");
        assert_eq!(payload["iss"], "svc");
        assert_eq!(payload["scope"], "s1");
        assert_eq!(payload["exp"].as_u64().unwrap() - payload["iat"].as_u64().unwrap(), 600);
    }
}
