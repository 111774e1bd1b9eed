//! Talking to token endpoints, and classifying their answers (SPEC §5).
//!
//! Nothing from a token endpoint's body reaches an error message except the OAuth `error` code and
//! a bounded `error_description`: a body can hold tokens.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::config::{ClientAuth, Grant, OAuthConfig, SecretSource};
use crate::secrets::jwt_exp;

/// How long a token is assumed to live when the endpoint says neither `expires_in` nor a JWT `exp`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// What went wrong with a refresh; the kind is also the `result` label of
/// `tokenproxy_refreshes_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshErrorKind {
    /// The refresh token was revoked or expired: a person must re-authorize.
    InvalidGrant,
    /// The client is misconfigured (id, secret, scope, grant).
    InvalidClient,
    /// The endpoint asked us to slow down, for this long if it said.
    RateLimited {
        retry_after: Option<Duration>,
    },
    ServerError,
    NetworkError,
    /// The endpoint answered something that is not a usable token.
    BadResponse,
    /// Not the endpoint: tokenproxy's own token store (the token file) could not be used, so no
    /// refresh token was spent.
    StoreUnavailable,
    /// Nothing to refresh with: an account with no token yet, or a stored document that cannot
    /// be used. Not the endpoint's answer, and never counted as a refresh.
    NoToken,
}

/// Shown as `class: message`, then the cause when there is one; the cause is also the
/// [`std::error::Error::source`], so code can act on it (a store's error and its class).
#[derive(Debug, Clone)]
pub struct RefreshError {
    pub kind: RefreshErrorKind,
    pub message: String,
    /// The OAuth `error` code the endpoint answered, when it gave one (the device flow acts on
    /// `authorization_pending`, `slow_down`, `access_denied` and `expired_token`).
    pub code: Option<String>,
    cause: Option<Arc<crate::tokens::store::StoreError>>,
}

impl std::fmt::Display for RefreshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)?;
        match &self.cause {
            Some(cause) => write!(f, ": {}", crate::errors::report(cause.as_ref())),
            None => Ok(()),
        }
    }
}

impl std::error::Error for RefreshError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

impl RefreshErrorKind {
    pub fn label(&self) -> &'static str {
        match self {
            RefreshErrorKind::InvalidGrant => "invalid_grant",
            RefreshErrorKind::InvalidClient => "invalid_client",
            RefreshErrorKind::RateLimited { .. } => "rate_limited",
            RefreshErrorKind::ServerError => "server_error",
            RefreshErrorKind::NetworkError => "network_error",
            RefreshErrorKind::BadResponse => "bad_response",
            RefreshErrorKind::StoreUnavailable => "store_unavailable",
            RefreshErrorKind::NoToken => "no_token",
        }
    }

    /// Whether trying again later can help without anybody changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RefreshErrorKind::RateLimited { .. }
                | RefreshErrorKind::ServerError
                | RefreshErrorKind::NetworkError
        )
    }
}

impl RefreshError {
    pub fn new(kind: RefreshErrorKind, message: impl Into<String>) -> RefreshError {
        RefreshError { kind, message: message.into(), code: None, cause: None }
    }

    /// The token store's failure behind this one.
    pub fn caused_by(mut self, cause: crate::tokens::store::StoreError) -> RefreshError {
        self.cause = Some(Arc::new(cause));
        self
    }

    /// What a person should do about it: the `action` of the 502 body. `location` is where the
    /// token is kept, as the store names it.
    pub fn action(&self, location: &str) -> String {
        match self.kind {
            RefreshErrorKind::InvalidGrant => format!(
                "re-authorize: put a new refresh_token (or token) into {}; tokenproxy picks it up without a restart",
                location
            ),
            RefreshErrorKind::InvalidClient => {
                "check the provider's [oauth] client_id, client secret or signing key, scope and grant in the config".into()
            }
            // Nothing was spent: what to check depends on where tokens are kept.
            RefreshErrorKind::StoreUnavailable if location.starts_with("token file") => format!(
                "check that tokenproxy can read {location} and its folder (permissions, disk); nothing was sent to the token endpoint"
            ),
            RefreshErrorKind::StoreUnavailable => format!(
                "check that the token store ({location}) is reachable and accepts tokenproxy's password; refreshes wait for it and resume by themselves, and nothing was sent to the token endpoint"
            ),
            _ => {
                "nothing: tokenproxy retries with backoff; check the token endpoint's health if this persists"
                    .into()
            }
        }
    }
}

/// A token the endpoint issued.
pub struct IssuedToken {
    pub access_token: String,
    /// A rotated refresh token, when the endpoint sent one.
    pub refresh_token: Option<String>,
    pub expires_at: OffsetDateTime,
    pub token_type: Option<String>,
    pub scope: Option<String>,
    /// Every field of the token object the endpoint answered (a first token file keeps them).
    pub fields: Map<String, Value>,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("fingerprint", &crate::secrets::fingerprint(&self.access_token))
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The HTTP client for token endpoints.
#[derive(Clone)]
pub struct OAuthClient {
    http: reqwest::Client,
}

impl OAuthClient {
    /// `tls` is the same verified configuration as for upstreams (system roots + extra_roots).
    pub fn new(tls: Arc<rustls::ClientConfig>, timeout: Duration) -> anyhow::Result<OAuthClient> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            // tokenproxy may share the application's environment: its own refreshes must not
            // go through HTTP(S)_PROXY, which may point at tokenproxy itself.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("tokenproxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OAuthClient { http })
    }

    /// The HTTP client itself, for the other services that issue credentials (STS).
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// One request for a token with the configured grant, for `account` (a multi-account
    /// provider's; a service account's `sub`, a GitHub App's installation). `refresh_token` is
    /// needed for the `refresh_token` grant.
    pub async fn request_token(
        &self,
        config: &OAuthConfig,
        account: Option<&str>,
        refresh_token: Option<&str>,
    ) -> Result<IssuedToken, RefreshError> {
        let grants = &config.grants;
        let owned;
        let grant = match config.grant {
            Grant::RefreshToken => TokenGrant::RefreshToken(refresh_token.ok_or_else(|| {
                RefreshError::new(RefreshErrorKind::InvalidGrant, "the token file holds no refresh_token")
            })?),
            Grant::ClientCredentials => TokenGrant::ClientCredentials,
            Grant::JwtBearer => {
                let assertion = grants.assertion.as_ref().ok_or_else(|| no_key("jwt_bearer"))?;
                owned = crate::grants::bearer_assertion(
                    assertion,
                    &token_url(config)?.to_string(),
                    &config.scope,
                    account,
                )?;
                TokenGrant::JwtBearer(&owned)
            }
            Grant::TokenExchange => {
                let exchange = grants.exchange.as_ref().ok_or_else(|| no_key("token_exchange"))?;
                owned = crate::grants::read_token_file(&exchange.subject_token_file, "subject_token_file")?;
                TokenGrant::TokenExchange(&owned)
            }
            Grant::GithubApp => {
                return crate::grants::github::installation_token(&self.http, config, account).await;
            }
        };
        self.token_request(config, grant).await
    }

    /// The issuer's metadata (SPEC §14 `issuer`).
    pub async fn discover(&self, issuer: &http::Uri) -> Result<crate::grants::discovery::Metadata, String> {
        crate::grants::discovery::discover(&self.http, issuer).await
    }

    /// One request to the token endpoint for `grant`, with the configured client authentication
    /// and `extra_params`.
    pub async fn token_request(
        &self,
        config: &OAuthConfig,
        grant: TokenGrant<'_>,
    ) -> Result<IssuedToken, RefreshError> {
        let mut form: Vec<(&str, String)> = Vec::new();
        match grant {
            TokenGrant::RefreshToken(refresh_token) => {
                form.push(("grant_type", "refresh_token".into()));
                form.push(("refresh_token", refresh_token.into()));
            }
            TokenGrant::ClientCredentials => form.push(("grant_type", "client_credentials".into())),
            TokenGrant::AuthorizationCode { code, redirect_uri, code_verifier } => {
                form.push(("grant_type", "authorization_code".into()));
                form.push(("code", code.into()));
                form.push(("redirect_uri", redirect_uri.into()));
                if let Some(verifier) = code_verifier {
                    form.push(("code_verifier", verifier.into()));
                }
            }
            TokenGrant::DeviceCode(device_code) => {
                form.push(("grant_type", DEVICE_CODE_GRANT.into()));
                form.push(("device_code", device_code.into()));
            }
            TokenGrant::JwtBearer(assertion) => {
                form.push(("grant_type", crate::grants::JWT_BEARER_GRANT.into()));
                form.push(("assertion", assertion.into()));
            }
            TokenGrant::TokenExchange(subject_token) => {
                form.push(("grant_type", crate::grants::TOKEN_EXCHANGE_GRANT.into()));
                form.push(("subject_token", subject_token.into()));
                if let Some(exchange) = &config.grants.exchange {
                    form.push(("subject_token_type", exchange.subject_token_type.clone()));
                    let optional = [
                        ("audience", &exchange.audience),
                        ("resource", &exchange.resource),
                        ("requested_token_type", &exchange.requested_token_type),
                    ];
                    for (name, value) in optional {
                        if let Some(value) = value {
                            form.push((name, value.clone()));
                        }
                    }
                }
            }
        }
        // A jwt_bearer assertion carries its scope inside.
        if !config.scope.is_empty()
            && matches!(
                grant,
                TokenGrant::RefreshToken(_) | TokenGrant::ClientCredentials | TokenGrant::TokenExchange(_)
            )
        {
            form.push(("scope", config.scope.clone()));
        }
        let (status, retry_after, json) = self.post_form(config, token_url(config)?, form).await?;
        classify(config, status, retry_after, json)
    }

    /// RFC 8628 §3.1: asks `device_authorization_url` for a device code and a user code.
    pub async fn device_authorization(
        &self,
        config: &OAuthConfig,
    ) -> Result<DeviceAuthorization, RefreshError> {
        let url = config.device_authorization_url.as_ref().ok_or_else(|| {
            RefreshError::new(RefreshErrorKind::InvalidClient, "no device_authorization_url is configured")
        })?;
        let mut form: Vec<(&str, String)> = Vec::new();
        if !config.scope.is_empty() {
            form.push(("scope", config.scope.clone()));
        }
        let (status, _, json) = self.post_form(config, url, form).await?;
        let json = json.unwrap_or(Value::Null);
        let text =
            |k: &str| json.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let seconds = |k: &str| json.get(k).and_then(Value::as_u64);
        // Google says `verification_url`.
        let verification_uri = text("verification_uri").or_else(|| text("verification_url"));
        match (status, text("device_code"), text("user_code"), verification_uri) {
            (200..=299, Some(device_code), Some(user_code), Some(verification_uri)) => {
                Ok(DeviceAuthorization {
                    device_code,
                    user_code,
                    verification_uri,
                    verification_uri_complete: text("verification_uri_complete"),
                    expires_in: Duration::from_secs(seconds("expires_in").unwrap_or(1800)),
                    interval: Duration::from_secs(seconds("interval").unwrap_or(5).max(1)),
                })
            }
            _ if status >= 500 => Err(RefreshError::new(
                RefreshErrorKind::ServerError,
                format!("HTTP {status} from the device authorization endpoint"),
            )),
            _ => Err(oauth_error(status, &json)),
        }
    }

    /// POSTs `form` with the configured client authentication and `extra_params`; the status,
    /// `Retry-After` and the body as JSON (`None` when it is not JSON).
    async fn post_form(
        &self,
        config: &OAuthConfig,
        url: &http::Uri,
        mut form: Vec<(&str, String)>,
    ) -> Result<(u16, Option<Duration>, Option<Value>), RefreshError> {
        for (k, v) in &config.extra_params {
            form.push((k.as_str(), v.clone()));
        }
        let secret = read_secret(&config.client_secret)?;
        let mut request = self.http.post(url.to_string()).header("accept", "application/json");
        let client_id = Some(config.client_id.clone()).filter(|id| !id.is_empty());
        match config.client_auth {
            ClientAuth::Basic => request = request.basic_auth(&config.client_id, secret.as_deref()),
            ClientAuth::Post => {
                form.push(("client_id", config.client_id.clone()));
                form.push(("client_secret", secret.unwrap_or_default()));
            }
            ClientAuth::None => form.extend(client_id.map(|id| ("client_id", id))),
            ClientAuth::PrivateKeyJwt | ClientAuth::ClientAssertionFile => {
                let assertion = match (&config.grants.assertion, &config.grants.client_assertion_file) {
                    (_, Some(file)) if config.client_auth == ClientAuth::ClientAssertionFile => {
                        crate::grants::read_token_file(file, "client_assertion_file")?
                    }
                    (Some(key), _) => {
                        crate::grants::client_assertion(key, &config.client_id, &url.to_string())?
                    }
                    _ => return Err(no_key("private_key_jwt")),
                };
                form.extend(client_id.map(|id| ("client_id", id)));
                form.push(("client_assertion_type", crate::grants::CLIENT_ASSERTION_TYPE.into()));
                form.push(("client_assertion", assertion));
            }
        }
        let response = request.form(&form).send().await.map_err(|e| {
            RefreshError::new(
                RefreshErrorKind::NetworkError,
                format!("token endpoint unreachable: {}", crate::errors::report(&e)),
            )
        })?;
        let status = response.status();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let body = response.bytes().await.map_err(|e| {
            RefreshError::new(
                RefreshErrorKind::NetworkError,
                format!("reading the token response: {}", crate::errors::report(&e)),
            )
        })?;
        Ok((status.as_u16(), retry_after, serde_json::from_slice(&body).ok()))
    }
}

/// The token URL, which discovery fills at start when only `issuer` is set.
fn token_url(config: &OAuthConfig) -> Result<&http::Uri, RefreshError> {
    config.token_url.as_ref().ok_or_else(|| {
        RefreshError::new(RefreshErrorKind::InvalidClient, "no token_url: the issuer's metadata named none")
    })
}

fn no_key(what: &str) -> RefreshError {
    RefreshError::new(
        RefreshErrorKind::InvalidClient,
        format!("{what} is configured without its key or file"),
    )
}

/// The grant of a token request.
#[derive(Clone, Copy)]
pub enum TokenGrant<'a> {
    RefreshToken(&'a str),
    ClientCredentials,
    /// RFC 6749 §4.1.3, with the PKCE verifier when the flow sent a challenge.
    AuthorizationCode {
        code: &'a str,
        redirect_uri: &'a str,
        code_verifier: Option<&'a str>,
    },
    /// RFC 8628 §3.4.
    DeviceCode(&'a str),
    /// RFC 7523 §2.1: the signed assertion.
    JwtBearer(&'a str),
    /// RFC 8693: the subject token.
    TokenExchange(&'a str),
}

/// RFC 8628's grant type.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// A device authorization (RFC 8628 §3.2).
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    pub interval: Duration,
}

/// Turns a token endpoint's answer into a token or a classified error.
fn classify(
    config: &OAuthConfig,
    status: u16,
    retry_after: Option<Duration>,
    json: Option<Value>,
) -> Result<IssuedToken, RefreshError> {
    if status == 429 {
        return Err(RefreshError::new(
            RefreshErrorKind::RateLimited { retry_after },
            "HTTP 429 from the token endpoint",
        ));
    }
    if status >= 500 {
        return Err(RefreshError::new(
            RefreshErrorKind::ServerError,
            format!("HTTP {status} from the token endpoint"),
        ));
    }
    let json = json.unwrap_or(Value::Null);
    // Some providers (Withings) answer 200 and wrap the token, or put an error beside it.
    let token_object =
        if config.response_pointer.is_empty() { Some(&json) } else { json.pointer(&config.response_pointer) };
    let access_token = token_object.and_then(|o| o.get("access_token")).and_then(Value::as_str);
    match (status, access_token) {
        (200..=299, Some(access_token)) if !access_token.trim().is_empty() => {
            Ok(issued(token_object.and_then(Value::as_object).expect("has a field"), access_token))
        }
        _ => Err(oauth_error(status, &json)),
    }
}

fn issued(object: &Map<String, Value>, access_token: &str) -> IssuedToken {
    let now = OffsetDateTime::now_utc();
    let expires_in = match object.get("expires_in") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let expires_at = match (expires_in, jwt_exp(access_token)) {
        (Some(secs), _) if secs.is_finite() && secs >= 0.0 => now + time::Duration::seconds(secs as i64),
        (_, Some(exp)) => exp,
        _ => {
            tracing::warn!(
                assumed_lifetime_s = DEFAULT_LIFETIME.as_secs(),
                "token response has neither expires_in nor a JWT exp; assuming a default lifetime"
            );
            now + DEFAULT_LIFETIME
        }
    };
    let text = |k: &str| object.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    IssuedToken {
        access_token: access_token.trim().to_string(),
        refresh_token: text("refresh_token"),
        expires_at,
        token_type: text("token_type"),
        scope: text("scope"),
        fields: object.clone(),
    }
}

/// A 4xx (or a 200 without a token): classified by the OAuth `error` code (RFC 6749 §5.2).
fn oauth_error(status: u16, json: &Value) -> RefreshError {
    let code = json.get("error").and_then(Value::as_str).unwrap_or("");
    let description: String = json
        .get("error_description")
        .and_then(Value::as_str)
        .map(|d| d.chars().take(200).collect())
        .unwrap_or_default();
    let kind = match code {
        "invalid_grant" => RefreshErrorKind::InvalidGrant,
        "invalid_client"
        | "unauthorized_client"
        | "invalid_scope"
        | "unsupported_grant_type"
        | "invalid_request" => RefreshErrorKind::InvalidClient,
        _ if status == 401 => RefreshErrorKind::InvalidClient,
        _ => RefreshErrorKind::BadResponse,
    };
    let mut message = format!("HTTP {status} from the token endpoint");
    if !code.is_empty() {
        message += &format!(", error {code:?}");
    }
    if !description.is_empty() {
        message += &format!(": {description}");
    }
    if code.is_empty() && (200..300).contains(&status) {
        message += ": no access_token in the response";
    }
    RefreshError { code: (!code.is_empty()).then(|| code.to_string()), ..RefreshError::new(kind, message) }
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate_parse(value.trim())?;
    let left = at - OffsetDateTime::now_utc();
    Some(left.try_into().unwrap_or(Duration::ZERO))
}

fn httpdate_parse(value: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, &format).ok().map(|t| t.assume_utc())
}

/// Whether the client secret can be read now, for `tokenproxy check`; the problem otherwise
/// (never the secret).
pub fn check_secret(source: &SecretSource) -> Result<(), String> {
    match read_secret(source) {
        Ok(Some(secret)) if secret.is_empty() => Err("the client secret is empty".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.message),
    }
}

/// Reads the client secret from where the config says; `None` when there is none.
fn read_secret(source: &SecretSource) -> Result<Option<String>, RefreshError> {
    let config_error = |m: String| RefreshError::new(RefreshErrorKind::InvalidClient, m);
    match source {
        SecretSource::None => Ok(None),
        SecretSource::Inline(secret) => Ok(Some(secret.expose().to_string())),
        SecretSource::Env(var) => std::env::var(var)
            .map(Some)
            .map_err(|_| config_error(format!("client_secret_env: environment variable {var} is not set"))),
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| config_error(format!("client_secret_file {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(pointer: &str) -> OAuthConfig {
        OAuthConfig {
            token_url: Some("https://auth.example.com/token".parse().unwrap()),
            grant: Grant::RefreshToken,
            client_id: "id".into(),
            client_secret: SecretSource::None,
            client_auth: ClientAuth::None,
            scope: String::new(),
            extra_params: Default::default(),
            response_pointer: pointer.into(),
            refresh_before: Duration::from_secs(300),
            authorize_url: None,
            device_authorization_url: None,
            authorize_params: Default::default(),
            pkce: true,
            redirect_uri: String::new(),
            grants: Default::default(),
        }
    }

    fn kind(status: u16, body: Value) -> RefreshErrorKind {
        classify(&config(""), status, None, Some(body)).unwrap_err().kind
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(kind(400, json!({"error": "invalid_grant"})), RefreshErrorKind::InvalidGrant);
        assert_eq!(kind(401, json!({"error": "invalid_client"})), RefreshErrorKind::InvalidClient);
        assert_eq!(kind(401, json!({})), RefreshErrorKind::InvalidClient);
        assert_eq!(kind(503, json!({})), RefreshErrorKind::ServerError);
        assert_eq!(kind(200, json!({"token": "x"})), RefreshErrorKind::BadResponse);
        assert_eq!(
            classify(&config(""), 429, Some(Duration::from_secs(7)), None).unwrap_err().kind,
            RefreshErrorKind::RateLimited { retry_after: Some(Duration::from_secs(7)) }
        );
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT").is_some());
    }

    #[test]
    fn tokens_are_read_through_the_response_pointer() {
        let body =
            json!({"status": 0, "body": {"access_token": "a", "refresh_token": "r2", "expires_in": 60}});
        let t = classify(&config("/body"), 200, None, Some(body)).unwrap();
        assert_eq!(t.access_token, "a");
        assert_eq!(t.refresh_token.as_deref(), Some("r2"));
        let left = t.expires_at - OffsetDateTime::now_utc();
        assert!(left.whole_seconds() > 50 && left.whole_seconds() <= 60);
        // A wrapped error beside the pointer's target is still classified.
        let body = json!({"status": 601, "error": "invalid_grant"});
        assert_eq!(
            classify(&config("/body"), 200, None, Some(body)).unwrap_err().kind,
            RefreshErrorKind::InvalidGrant
        );
    }

    #[test]
    fn error_messages_never_quote_the_body_beyond_the_oauth_fields() {
        let e = classify(
            &config(""),
            400,
            None,
            Some(json!({"error": "invalid_grant", "refresh_token": "leak"})),
        )
        .unwrap_err();
        assert!(!e.to_string().contains("leak"));
    }
}
