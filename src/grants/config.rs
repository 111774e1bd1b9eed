//! The `[providers.NAME.oauth]` keys of the grants that sign or exchange (SPEC §14), validated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::keys::SigningKey;
use crate::config::{ClientAuth, Grant, http_url};

/// The keys as written; moved out of `RawOAuth` (which cannot flatten them: it denies unknown keys).
#[derive(Debug, Default)]
pub struct RawGrant {
    pub private_key_file: Option<PathBuf>,
    pub key_id: Option<String>,
    pub assertion_ttl: Option<String>,
    pub assertion_claims: Map<String, Value>,
    pub service_account_file: Option<PathBuf>,
    pub app_id: Option<String>,
    pub api_url: Option<String>,
    pub client_assertion_file: Option<PathBuf>,
    pub subject_token_file: Option<PathBuf>,
    pub subject_token_type: Option<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub requested_token_type: Option<String>,
    pub issuer: Option<String>,
}

/// What a grant or a client authentication signs with.
#[derive(Debug, Clone)]
pub struct AssertionConfig {
    pub key: KeyFile,
    /// The JWS `kid` (a service account's `private_key_id` unless set).
    pub key_id: Option<String>,
    /// How long an assertion lives (`exp - iat`).
    pub ttl: Duration,
    /// Claims added to (and overriding) the ones tokenproxy sets.
    pub claims: Map<String, Value>,
    /// The assertion's default `iss` and `sub`: `client_id`, or a service account's
    /// `client_email`.
    pub issuer: String,
}

/// Where the private key is: a PEM file, or a Google service account's JSON key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFile {
    Pem(PathBuf),
    ServiceAccount(PathBuf),
}

impl KeyFile {
    pub fn path(&self) -> &Path {
        match self {
            KeyFile::Pem(path) | KeyFile::ServiceAccount(path) => path,
        }
    }
}

/// RFC 8693's request, beside the grant type.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub subject_token_file: PathBuf,
    pub subject_token_type: String,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub requested_token_type: Option<String>,
}

/// A GitHub App: its id and the API that issues installation tokens.
#[derive(Debug, Clone)]
pub struct GithubAppConfig {
    pub app_id: String,
    pub api_url: Uri,
}

/// Everything the grants of SPEC §14 add to `[oauth]`.
#[derive(Debug, Clone, Default)]
pub struct GrantConfig {
    pub assertion: Option<AssertionConfig>,
    pub client_assertion_file: Option<PathBuf>,
    pub exchange: Option<ExchangeConfig>,
    pub github: Option<GithubAppConfig>,
    /// RFC 8414 / OpenID discovery fills the endpoints that are not set.
    pub issuer: Option<Uri>,
    /// A service account's `token_uri`: the token URL when none is set.
    pub token_uri: Option<Uri>,
}

pub const DEFAULT_ASSERTION_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const DEFAULT_GITHUB_API: &str = "https://api.github.com";

/// A Google service account's JSON key: the fields tokenproxy uses.
#[derive(Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount").field("client_email", &self.client_email).finish_non_exhaustive()
    }
}

impl ServiceAccount {
    pub fn read(path: &Path) -> Result<ServiceAccount, String> {
        let text = std::fs::read(path).map_err(|e| format!("cannot read it: {}", e.kind()))?;
        // serde_json's message names a line and column, never the text.
        serde_json::from_slice(&text).map_err(|e| format!("not a service account JSON key: {e}"))
    }
}

/// Reads the signing key of `assertion` (again, on every use: keys rotate).
pub fn signing_key(assertion: &AssertionConfig) -> Result<SigningKey, String> {
    match &assertion.key {
        KeyFile::Pem(path) => SigningKey::read(path, assertion.key_id.clone()).map_err(|e| e.to_string()),
        KeyFile::ServiceAccount(path) => {
            let account = ServiceAccount::read(path)?;
            let kid = assertion.key_id.clone().or(account.private_key_id);
            SigningKey::from_pem(account.private_key.as_bytes(), kid)
                .map_err(|e| format!("its private_key: {e}"))
        }
    }
}

/// The problems of a grant's keys are pushed to `p`; `client_id` is the one configured.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    what: &str,
    raw: RawGrant,
    grant: Grant,
    client_auth: ClientAuth,
    client_id: &str,
    base: &Path,
    p: &mut Vec<String>,
) -> GrantConfig {
    let path = |f: &PathBuf| crate::config::resolve(base, f);
    let mut out = GrantConfig::default();
    let signs =
        matches!(grant, Grant::JwtBearer | Grant::GithubApp) || client_auth == ClientAuth::PrivateKeyJwt;

    let ttl = match &raw.assertion_ttl {
        None => DEFAULT_ASSERTION_TTL,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(60) => d,
            _ => {
                p.push(format!("{what}.assertion_ttl: {text:?} is not a duration of a minute or more"));
                DEFAULT_ASSERTION_TTL
            }
        },
    };
    let key = match (&raw.private_key_file, &raw.service_account_file) {
        (Some(_), Some(_)) => {
            p.push(format!("{what}: give private_key_file or service_account_file, not both"));
            None
        }
        (Some(f), None) => Some(KeyFile::Pem(path(f))),
        (None, Some(f)) => Some(KeyFile::ServiceAccount(path(f))),
        (None, None) => None,
    };
    let mut issuer = client_id.to_string();
    if let Some(KeyFile::ServiceAccount(file)) = &key {
        match ServiceAccount::read(file) {
            Ok(account) => {
                if grant != Grant::JwtBearer {
                    p.push(format!("{what}.service_account_file: only for grant = \"jwt_bearer\""));
                }
                issuer = account.client_email;
                out.token_uri = account.token_uri.as_deref().and_then(http_url);
            }
            Err(e) => p.push(format!("{what}.service_account_file {}: {e}", file.display())),
        }
    }
    match (&key, signs) {
        (Some(key), true) => {
            if issuer.is_empty() && !raw.assertion_claims.contains_key("iss") && grant != Grant::GithubApp {
                p.push(format!("{what}: the assertion needs an issuer: set client_id (or assertion_claims.iss)"));
            }
            let assertion =
                AssertionConfig { key: key.clone(), key_id: raw.key_id.clone(), ttl, claims: raw.assertion_claims.clone(), issuer };
            match signing_key(&assertion) {
                Err(e) => p.push(format!("{what}: {}: {e}", key.path().display())),
                Ok(parsed) if grant == Grant::GithubApp && parsed.algorithm() != "RS256" => p.push(format!(
                    "{what}: {}: GitHub Apps sign with RSA (RS256), and this is an {} key",
                    key.path().display(),
                    parsed.algorithm()
                )),
                Ok(_) => {}
            }
            out.assertion = Some(assertion);
        }
        (None, true) => p.push(format!(
            "{what}: {} signs with a private key: set private_key_file{}",
            match (grant, client_auth) {
                (Grant::JwtBearer, _) => "grant = \"jwt_bearer\"",
                (Grant::GithubApp, _) => "grant = \"github_app\"",
                _ => "client_auth = \"private_key_jwt\"",
            },
            if grant == Grant::JwtBearer { " or service_account_file" } else { "" }
        )),
        (Some(key), false) => p.push(format!(
            "{what}: {} is set but nothing signs with it (grant = \"jwt_bearer\" or \"github_app\", or client_auth = \"private_key_jwt\")",
            match key {
                KeyFile::Pem(_) => "private_key_file",
                KeyFile::ServiceAccount(_) => "service_account_file",
            }
        )),
        (None, false) => {}
    }
    if !signs && (raw.key_id.is_some() || raw.assertion_ttl.is_some() || !raw.assertion_claims.is_empty()) {
        p.push(format!("{what}: key_id, assertion_ttl and assertion_claims are for a signed assertion"));
    }

    match (client_auth, raw.client_assertion_file) {
        (ClientAuth::ClientAssertionFile, Some(f)) => out.client_assertion_file = Some(path(&f)),
        (ClientAuth::ClientAssertionFile, None) => {
            p.push(format!("{what}: client_auth = \"client_assertion_file\" needs client_assertion_file"))
        }
        (_, Some(_)) => {
            p.push(format!("{what}.client_assertion_file: only with client_auth = \"client_assertion_file\""))
        }
        (_, None) => {}
    }

    let exchange_keys = [&raw.subject_token_type, &raw.audience, &raw.resource, &raw.requested_token_type];
    match (grant, raw.subject_token_file) {
        (Grant::TokenExchange, Some(f)) => {
            out.exchange = Some(ExchangeConfig {
                subject_token_file: path(&f),
                subject_token_type: raw
                    .subject_token_type
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SUBJECT_TOKEN_TYPE.to_string()),
                audience: raw.audience.clone(),
                resource: raw.resource.clone(),
                requested_token_type: raw.requested_token_type.clone(),
            })
        }
        (Grant::TokenExchange, None) => {
            p.push(format!("{what}: grant = \"token_exchange\" needs subject_token_file"))
        }
        (_, file) => {
            if file.is_some() || exchange_keys.iter().any(|k| k.is_some()) {
                p.push(format!(
                    "{what}: subject_token_file, subject_token_type, audience, resource and requested_token_type are for grant = \"token_exchange\""
                ));
            }
        }
    }

    match (grant, raw.app_id) {
        (Grant::GithubApp, Some(app_id)) if !app_id.trim().is_empty() => {
            let api = raw.api_url.as_deref().unwrap_or(DEFAULT_GITHUB_API);
            match http_url(api.trim_end_matches('/')) {
                Some(api_url) => {
                    out.github = Some(GithubAppConfig { app_id: app_id.trim().to_string(), api_url })
                }
                None => p.push(format!("{what}.api_url: {api:?} is not an http(s) URL")),
            }
        }
        (Grant::GithubApp, _) => p.push(format!("{what}: grant = \"github_app\" needs app_id (as a string)")),
        (_, app_id) => {
            if app_id.is_some() || raw.api_url.is_some() {
                p.push(format!("{what}: app_id and api_url are for grant = \"github_app\""));
            }
        }
    }

    if let Some(issuer) = raw.issuer {
        match http_url(issuer.trim_end_matches('/')) {
            Some(uri) => out.issuer = Some(uri),
            None => p.push(format!("{what}.issuer: {issuer:?} is not an http(s) URL")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{ClientAuth, Config};

    /// The problems of a config whose one provider has `oauth` as its `[oauth]` table.
    fn problems(dir: &std::path::Path, oauth: &str) -> Vec<String> {
        let path = dir.join("tokenproxy.toml");
        let text = format!(
            "[providers.p]\nhosts = [\"api.example.com\"]\ntoken_file = \"p/{{account}}.json\"\n[providers.p.oauth]\n{oauth}"
        );
        std::fs::write(&path, text).unwrap();
        match Config::load(&path) {
            Ok(_) => vec![],
            Err(e) => e.problems,
        }
    }

    #[test]
    fn each_grant_names_what_it_lacks_and_what_it_does_not_use() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let ec = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("rsa.pem"), rsa.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ec.pem"), ec.serialize_pem()).unwrap();
        let has = |oauth: &str, wanted: &str| {
            let found = problems(dir.path(), oauth);
            assert!(found.iter().any(|p| p.contains(wanted)), "{wanted:?} not in {found:?}");
        };
        let ok = |oauth: &str| assert_eq!(problems(dir.path(), oauth), Vec::<String>::new(), "{oauth}");

        ok(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://t/\"\nclient_id = \"svc\"\nprivate_key_file = \"rsa.pem\"\n",
        );
        has(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://t/\"\nclient_id = \"svc\"\n",
            "set private_key_file or service_account_file",
        );
        has(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://t/\"\nprivate_key_file = \"rsa.pem\"\n",
            "needs an issuer",
        );
        has(
            "grant = \"jwt_bearer\"\nclient_id = \"svc\"\nprivate_key_file = \"rsa.pem\"\n",
            "token_url is required",
        );
        has(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://t/\"\nclient_id = \"s\"\nprivate_key_file = \"rsa.pem\"\nassertion_ttl = \"5s\"\n",
            "assertion_ttl",
        );
        has(
            "token_url = \"https://t/\"\nclient_id = \"c\"\nclient_secret = \"s\"\nprivate_key_file = \"rsa.pem\"\n",
            "nothing signs with it",
        );
        has(
            "grant = \"client_credentials\"\nclient_auth = \"private_key_jwt\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\n",
            "set private_key_file",
        );
        has(
            "grant = \"client_credentials\"\nclient_auth = \"client_assertion_file\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\n",
            "needs client_assertion_file",
        );
        has(
            "grant = \"client_credentials\"\nclient_auth = \"private_key_jwt\"\ntoken_url = \"https://t/\"\nclient_id = \"c\"\nclient_secret = \"s\"\nprivate_key_file = \"rsa.pem\"\n",
            "a client secret is set but client_auth does not send one",
        );
        ok("grant = \"github_app\"\napp_id = \"1\"\nprivate_key_file = \"rsa.pem\"\n");
        has(
            "grant = \"github_app\"\napp_id = \"1\"\nprivate_key_file = \"ec.pem\"\n",
            "GitHub Apps sign with RSA",
        );
        has("grant = \"token_exchange\"\ntoken_url = \"https://t/\"\n", "needs subject_token_file");
        has(
            "token_url = \"https://t/\"\nclient_id = \"c\"\nclient_secret = \"s\"\naudience = \"x\"\n",
            "are for grant = \"token_exchange\"",
        );
        has(
            "grant = \"client_credentials\"\nissuer = \"ftp://x\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            "issuer",
        );
        // An issuer stands in for the token URL, to be discovered at start.
        ok(
            "grant = \"client_credentials\"\nissuer = \"https://login.example.com/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
        );

        // The grants that prove themselves send no client authentication unless asked to.
        let path = dir.path().join("tokenproxy.toml");
        problems(
            dir.path(),
            "grant = \"token_exchange\"\ntoken_url = \"https://t/\"\nsubject_token_file = \"s.jwt\"\n",
        );
        let config = Config::load(&path).unwrap();
        assert_eq!(config.providers[0].oauth.as_ref().unwrap().client_auth, ClientAuth::None);
    }
}
