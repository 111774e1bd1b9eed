//! Loading and validating the configuration (SPEC §3).
//!
//! The file is read through figment so that every key can be overridden by
//! `TOKENPROXY_<SECTION>__<KEY>`. The raw, deserialised form ([`RawConfig`]) is then checked as a
//! whole and turned into [`Config`], whose types cannot hold an invalid value: a listener is a
//! `SocketAddr`, a header name is a `HeaderName`, a host pattern is parsed. Every problem is
//! collected, so that `tokenproxy check` can list them all at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use http::HeaderName;
use http::uri::{Authority, Scheme, Uri};
use serde::Deserialize;

use crate::callers::config::{AuditTarget, CallerConfig};
use crate::hosts::HostPattern;

/// Where the config file is looked for when neither `--config` nor `TOKENPROXY_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "config/tokenproxy.toml";

/// A config that could not be loaded: every problem found, each on its own line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: impl Into<String>) -> Self {
        ConfigError { problems: vec![problem.into()] }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw form: exactly the TOML keys of SPEC §3, unknown keys rejected.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    egress: RawEgress,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    onboarding: RawOnboarding,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    transparent: RawTransparent,
    #[serde(default)]
    callers: BTreeMap<String, crate::callers::config::RawCaller>,
    #[serde(default)]
    audit: crate::callers::config::RawAudit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransparent {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    kind: String,
    url: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    key_prefix: String,
    lock_ttl: String,
    encryption_key_file: Option<PathBuf>,
    encryption_key_env: Option<String>,
    sentinels: Vec<String>,
    master_name: String,
    sentinel_password_file: Option<PathBuf>,
    min_replicas_ack: u32,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: "file".into(),
            url: String::new(),
            password_file: None,
            password_env: None,
            key_prefix: "tokenproxy".into(),
            lock_ttl: "30s".into(),
            encryption_key_file: None,
            encryption_key_env: None,
            sentinels: Vec::new(),
            master_name: String::new(),
            sentinel_password_file: None,
            min_replicas_ack: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOnboarding {
    state_dir: PathBuf,
    state_ttl: String,
    max_pending: usize,
}

impl Default for RawOnboarding {
    fn default() -> Self {
        RawOnboarding { state_dir: "data/oauth-state".into(), state_ttl: "1h".into(), max_pending: 1000 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    max_replay_body: u64,
    upstream_timeout: String,
    header_read_timeout: String,
    shutdown_timeout: String,
    max_header_bytes: usize,
    max_idle_per_host: usize,
    idle_timeout: String,
    max_connections: usize,
    max_replay_total: u64,
    access_log: bool,
    workers: usize,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            listen: "127.0.0.1:8080".into(),
            max_replay_body: 1024 * 1024,
            upstream_timeout: "30s".into(),
            header_read_timeout: "10s".into(),
            shutdown_timeout: "30s".into(),
            max_header_bytes: 64 * 1024,
            max_idle_per_host: 64,
            idle_timeout: "5m".into(),
            max_connections: 10_000,
            max_replay_total: 64 * 1024 * 1024,
            access_log: false,
            workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
    /// A file whose content (trimmed) is the bearer token for peers that are not on loopback.
    token_file: Option<PathBuf>,
    /// Host names (with or without a port) the admin API answers besides its listen address and
    /// loopback names.
    hosts: Vec<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:9090".into(), token_file: None, hosts: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    ca_dir: PathBuf,
    extra_roots: Vec<PathBuf>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls { ca_dir: "data/ca".into(), extra_roots: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEgress {
    allow_unmatched: bool,
    deny: Vec<String>,
}

impl Default for RawEgress {
    fn default() -> Self {
        RawEgress { allow_unmatched: true, deny: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    hosts: Vec<String>,
    token_file: Option<PathBuf>,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default = "default_format")]
    format: String,
    #[serde(default)]
    client_header: ClientHeader,
    #[serde(default)]
    upstream_scheme: UpstreamScheme,
    #[serde(default)]
    allow_plaintext: bool,
    #[serde(default = "default_refresh_on_status")]
    refresh_on_status: Vec<u16>,
    #[serde(default)]
    default_account: String,
    /// Applied before deserialising (see [`apply_presets`]); kept here so that they are known keys.
    #[serde(default)]
    #[allow(dead_code)]
    preset: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    preset_params: BTreeMap<String, String>,
    oauth: Option<RawOAuth>,
    sigv4: Option<crate::sigv4::RawSigV4>,
}

fn default_header() -> String {
    "Authorization".into()
}
fn default_format() -> String {
    "Bearer {token}".into()
}
fn default_refresh_on_status() -> Vec<u16> {
    vec![401]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    #[serde(default)]
    token_url: String,
    #[serde(default)]
    grant: Grant,
    #[serde(default)]
    client_id: String,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    client_secret: Option<String>,
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    #[serde(default)]
    response_pointer: String,
    #[serde(default = "default_refresh_before")]
    refresh_before: String,
    #[serde(default)]
    authorize_url: String,
    #[serde(default)]
    device_authorization_url: String,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
    #[serde(default = "default_true")]
    pkce: bool,
    #[serde(default)]
    redirect_uri: String,
    // The grants that sign or exchange (SPEC §14); see `crate::grants::config`.
    private_key_file: Option<PathBuf>,
    key_id: Option<String>,
    assertion_ttl: Option<String>,
    #[serde(default)]
    assertion_claims: serde_json::Map<String, serde_json::Value>,
    service_account_file: Option<PathBuf>,
    app_id: Option<String>,
    api_url: Option<String>,
    client_assertion_file: Option<PathBuf>,
    subject_token_file: Option<PathBuf>,
    subject_token_type: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    requested_token_type: Option<String>,
    issuer: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_refresh_before() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    listen: String,
    provider: String,
    upstream: String,
}

// ---------------------------------------------------------------------------------------------
// The validated form.
// ---------------------------------------------------------------------------------------------

/// How a token file is encoded, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Json,
    Yaml,
    /// The whole file, trimmed, is the token; such a file is only read, never written.
    Raw,
}

impl FileFormat {
    pub fn of(path: &Path) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("json") => FileFormat::Json,
            Some("yaml" | "yml") => FileFormat::Yaml,
            _ => FileFormat::Raw,
        }
    }
}

/// What to do with a header the application already set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientHeader {
    /// Replace it with tokenproxy's token (default).
    #[default]
    Override,
    /// Leave the application's own value in place.
    Keep,
}

/// Which scheme a plain-HTTP request to a provider is forwarded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamScheme {
    /// The scheme the application used (default).
    #[default]
    Keep,
    /// Always TLS, for legacy code that cannot do TLS itself.
    Https,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    #[default]
    RefreshToken,
    ClientCredentials,
    /// RFC 7523 §2.1: a JWT signed with the provider's key (service accounts).
    JwtBearer,
    /// A GitHub App's installation token, per installation (the account).
    GithubApp,
    /// RFC 8693: a subject token from a file exchanged for an access token.
    TokenExchange,
}

impl Grant {
    /// Whether a token is minted from configuration alone, with no refresh token: such a
    /// provider creates its token files itself and needs no person's consent.
    pub fn mints(self) -> bool {
        !matches!(self, Grant::RefreshToken)
    }

    /// Whether the grant proves itself with a signed or exchanged token rather than a client
    /// secret: it needs no client authentication, and its refusal is the key's or the
    /// account's, not a person's consent.
    pub fn proves_itself(self) -> bool {
        matches!(self, Grant::JwtBearer | Grant::GithubApp | Grant::TokenExchange)
    }

    /// As the config writes it.
    pub fn name(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::JwtBearer => "jwt_bearer",
            Grant::GithubApp => "github_app",
            Grant::TokenExchange => "token_exchange",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with client id and secret (default).
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form fields.
    Post,
    /// `client_id` as a form field (when set), no secret (public clients, and the grants
    /// that prove themselves with a signed or exchanged token).
    None,
    /// RFC 7523 §2.2: a client assertion signed with `private_key_file`.
    PrivateKeyJwt,
    /// A client assertion read from `client_assertion_file` on every token request (a projected
    /// service-account token for workload identity federation).
    ClientAssertionFile,
}

impl ClientAuth {
    /// As the config writes it.
    pub fn name(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
            ClientAuth::None => "none",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientAssertionFile => "client_assertion_file",
        }
    }
}

/// Where the OAuth client secret comes from. The secret itself is read when it is needed, so it
/// never sits in a structure that might be printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    /// Given inline in the config; `Debug` of the config never shows it.
    Inline(Secret),
    None,
}

/// A string that never shows itself in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// `None` only until issuer discovery fills it at start (and for `github_app`, which asks
    /// the GitHub API instead).
    pub token_url: Option<Uri>,
    pub grant: Grant,
    pub client_id: String,
    pub client_secret: SecretSource,
    pub client_auth: ClientAuth,
    pub scope: String,
    pub extra_params: BTreeMap<String, String>,
    pub response_pointer: String,
    pub refresh_before: Duration,
    /// The browser flow's authorization endpoint (SPEC §9); `None`: no browser flow.
    pub authorize_url: Option<Uri>,
    /// The device flow's endpoint (RFC 8628); `None`: no `--device`.
    pub device_authorization_url: Option<Uri>,
    /// Extra query parameters of the authorization request.
    pub authorize_params: BTreeMap<String, String>,
    /// Whether the browser flow sends an S256 code challenge.
    pub pkce: bool,
    /// Where the provider sends the person back; defaults to the admin listener's
    /// `/oauth/callback`.
    pub redirect_uri: String,
    /// Keys, assertions, exchange and discovery (SPEC §14).
    pub grants: crate::grants::config::GrantConfig,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    /// The token file; for a multi-account provider (SPEC §8) a template whose file name holds
    /// `{account}` once.
    pub token_file: PathBuf,
    /// The account of requests that name none (multi-account providers only).
    pub default_account: Option<String>,
    pub header: HeaderName,
    /// `format` split around `{token}`: the header value is `prefix + token + suffix`.
    pub format_prefix: String,
    pub format_suffix: String,
    pub client_header: ClientHeader,
    pub upstream_scheme: UpstreamScheme,
    pub allow_plaintext: bool,
    pub refresh_on_status: Vec<http::StatusCode>,
    pub oauth: Option<OAuthConfig>,
    /// Requests are signed (AWS SigV4) instead of carrying a token; such a provider has no
    /// token file (its `token_file` is empty) and no `oauth`.
    pub sigv4: Option<crate::sigv4::SigV4Config>,
}

impl ProviderConfig {
    /// Whether the provider holds one token per account (its `token_file` names `{account}`).
    pub fn is_multi_account(&self) -> bool {
        self.token_file.file_name().is_some_and(|n| n.to_string_lossy().contains(ACCOUNT_PLACEHOLDER))
    }

    /// The token file of `account`, whose name must have passed [`crate::accounts::check`]: it
    /// only fills the file name, so it cannot name a file outside the template's folder.
    pub fn account_file(&self, account: &str) -> PathBuf {
        let name = self.token_file.file_name().unwrap_or_default().to_string_lossy();
        self.token_file.with_file_name(name.replacen(ACCOUNT_PLACEHOLDER, account, 1))
    }

    /// The account a token file of this multi-account provider belongs to, if `path` is one.
    pub fn account_of_file(&self, path: &Path) -> Option<String> {
        if path.parent() != self.token_file.parent() {
            return None;
        }
        let template = self.token_file.file_name()?.to_str()?;
        let (before, after) = template.split_once(ACCOUNT_PLACEHOLDER)?;
        let name = path.file_name()?.to_str()?;
        let account = name.strip_prefix(before)?.strip_suffix(after)?;
        crate::accounts::check(account).ok().map(|()| account.to_string())
    }

    /// The margin before expiry at which a token counts as "expiring".
    pub fn refresh_before(&self) -> Duration {
        self.oauth.as_ref().map_or(Duration::from_secs(300), |o| o.refresh_before)
    }
}

/// What a multi-account provider's `token_file` holds in place of the account name.
pub const ACCOUNT_PLACEHOLDER: &str = "{account}";

/// A `[[routes]]` entry: everything arriving on `listen` goes to `upstream` with the provider's
/// token.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub listen: SocketAddr,
    pub provider: String,
    pub upstream_scheme: Scheme,
    pub upstream_authority: Authority,
    /// A path the upstream URL carried (`https://host/v1`), prefixed to every request path.
    pub upstream_base_path: String,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub max_replay_body: u64,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_timeout: Duration,
    /// The largest request head accepted; a larger one is answered `431`.
    pub max_header_bytes: usize,
    /// Idle upstream connections kept per host; beyond that a connection closes after use, so
    /// that a burst does not leave its connections (and their buffers) open for good.
    pub max_idle_per_host: usize,
    /// How long a tunnel, an upgraded connection or an HTTP/2 connection may stay quiet with no
    /// request in flight before it is closed. (HTTP/1.1 keep-alive connections are bounded by
    /// `header_read_timeout`, which also runs while they wait for their next request.)
    pub idle_timeout: Duration,
    /// Client connections served at once per listener; the accept loop waits beyond that.
    pub max_connections: usize,
    /// The bytes of request bodies kept for replay at once, across all requests. A request that
    /// finds the budget spent streams on unbuffered and is not replayable.
    pub max_replay_total: u64,
    /// One log line per request (method, host, status, provider, retry, duration).
    pub access_log: bool,
    /// The runtime's worker threads; `None`: one per core this process may use (its CPU
    /// affinity and cgroup quota), or `TOKIO_WORKER_THREADS`.
    pub workers: Option<usize>,
}

/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from; relative paths were resolved against its folder.
    pub source: PathBuf,
    pub proxy: ProxySettings,
    pub admin_listen: SocketAddr,
    /// Who may use the admin API beyond its probes (SPEC §6).
    pub admin_access: AdminAccess,
    pub ca_dir: PathBuf,
    pub extra_roots: Vec<PathBuf>,
    pub allow_unmatched: bool,
    /// Networks never dialled (forward, tunnel, transparent relay), checked on resolved addresses.
    pub egress_deny: Vec<ipnet::IpNet>,
    pub providers: Vec<ProviderConfig>,
    pub routes: Vec<RouteConfig>,
    pub onboarding: OnboardingSettings,
    /// Where tokens are kept (SPEC §11).
    pub store: StoreSettings,
    /// `[transparent] listen` (SPEC §12): where iptables-redirected connections arrive.
    pub transparent_listen: Option<SocketAddr>,
    /// Where the key that seals token data at rest comes from (SPEC §11), when one is
    /// configured. The store opens it: a config says where things are, not what is in them.
    pub sealing_key: Option<SealingKey>,
    /// `[callers.*]` (SPEC §13): none means every client that reaches the proxy is trusted.
    pub callers: Vec<CallerConfig>,
    /// `[audit] file`: one line per decision.
    pub audit: Option<AuditTarget>,
}

/// `[store] encryption_key_file` or `encryption_key_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealingKey {
    File(PathBuf),
    Env(String),
}

impl std::fmt::Display for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealingKey::File(path) => write!(f, "store.encryption_key_file {}", path.display()),
            SealingKey::Env(var) => write!(f, "store.encryption_key_env {var}"),
        }
    }
}

/// Where tokens are kept: token files, or a Redis shared by a fleet (SPEC §11).
#[derive(Debug, Clone)]
pub enum StoreSettings {
    File,
    Redis(Box<RedisSettings>),
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db`, with the password (if any) filled in; never shown.
    pub url: Secret,
    /// The URL as messages show it: no password.
    pub shown_url: String,
    pub key_prefix: String,
    /// How long a refresh lock lives without being kept alive (a holder that died releases it).
    pub lock_ttl: Duration,
    /// Where the password came from, when from a file (checked for loose permissions).
    pub password_file: Option<PathBuf>,
    /// The primary found through Redis Sentinel instead of at `url` (SPEC §11).
    pub sentinel: Option<SentinelSettings>,
    /// Replicas that must hold a write before its token is used (Redis `WAIT`).
    pub min_replicas_ack: u32,
}

/// `[store] sentinels`, `master_name` and `sentinel_password_file`. The data nodes' URL is `url`
/// with the host and port of the primary the sentinels name (its scheme, database and password
/// stay).
#[derive(Debug, Clone)]
pub struct SentinelSettings {
    pub sentinels: Vec<(String, u16)>,
    pub master_name: String,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
}

/// Where pending authorizations wait for their callback (SPEC §9).
#[derive(Debug, Clone)]
pub struct OnboardingSettings {
    pub state_dir: PathBuf,
    /// How long a person may take between starting a flow and its callback.
    pub state_ttl: Duration,
    /// Pending flows kept at once; a new one beyond this drops the oldest.
    pub max_pending: usize,
}

/// `[admin] token_file` and `hosts` (SPEC §6).
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    /// Read on every request that needs it, so a rotated token works without a restart.
    pub token_file: Option<PathBuf>,
    /// Lower-case names without a trailing dot, each with the port it is limited to, if any.
    pub hosts: Vec<(String, Option<u16>)>,
}

impl Config {
    /// Reads `path`, applies `TOKENPROXY_<SECTION>__<KEY>` overrides from the environment, and
    /// validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::one(format!(
                "config file {} not found (use --config PATH or TOKENPROXY_CONFIG)",
                path.display()
            )));
        }
        // `file_exact`: `Toml::file` would silently search parent folders for the name.
        // The filter keeps variables that name a section: TOKENPROXY_CONFIG is not a config key.
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("TOKENPROXY_").filter(|k| k.as_str().contains("__")).split("__"));
        let figment = apply_presets(figment).map_err(|problems| ConfigError { problems })?;
        let (raw, mut problems) = extract_listing_every_problem(figment, path)?;
        // Absolute from here on: a relative folder would reach the file watcher as given, and
        // its events would never match the token files (edits seen only by the slow poll).
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = match std::env::current_dir() {
            Ok(cwd) if base.is_relative() => cwd.join(base),
            _ => base,
        };
        match validate(raw, path, &base) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError { problems }),
            Err(e) => {
                problems.extend(e.problems);
                Err(ConfigError { problems })
            }
        }
    }
}

impl Config {
    /// Secret files that the group or others can read: token files, client secret files and the
    /// CA's key. A warning each (for the log and `check`), never an error: the file still works.
    /// `name_accounts`: whether an account's file may be named by its path (which holds the
    /// account's name: fine for `check`, a local command; never in a log line, SPEC §8).
    pub fn loose_permission_warnings(&self, name_accounts: bool) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        // (what, path, whether the message shows the path)
        let mut files = vec![("the CA key".to_string(), self.ca_dir.join("ca-key.pem"), true)];
        if let Some(SealingKey::File(key)) = &self.sealing_key {
            files.push(("the encryption key".to_string(), key.clone(), true));
        }
        if let StoreSettings::Redis(redis) = &self.store {
            if let Some(file) = &redis.password_file {
                files.push(("the Redis password file".to_string(), file.clone(), true));
            }
            if let Some(file) = redis.sentinel.as_ref().and_then(|s| s.password_file.as_ref()) {
                files.push(("the Redis Sentinel password file".to_string(), file.clone(), true));
            }
        }
        for p in &self.providers {
            if p.is_multi_account() {
                // Every account's file: each holds a person's refresh token.
                let folder = p.token_file.parent().map(Path::to_path_buf).unwrap_or_default();
                let mut accounts: Vec<PathBuf> = std::fs::read_dir(&folder)
                    .map(|entries| {
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|f| p.account_of_file(f).is_some())
                            .collect()
                    })
                    .unwrap_or_default();
                accounts.sort();
                for file in accounts {
                    let what = match p.account_of_file(&file) {
                        Some(name) if !name_accounts => format!(
                            "providers.{} token file of account {} (in {})",
                            p.name,
                            crate::accounts::log_name(&name),
                            folder.display()
                        ),
                        _ => format!("providers.{} account token file", p.name),
                    };
                    files.push((what, file, name_accounts));
                }
            } else if let Some(sigv4) = &p.sigv4 {
                if let crate::sigv4::CredentialSource::Files { secret_access_key, session_token, .. } =
                    &sigv4.source
                {
                    files.push((
                        format!("providers.{} secret access key file", p.name),
                        secret_access_key.clone(),
                        true,
                    ));
                    if let Some(token) = session_token {
                        files.push((format!("providers.{} session token file", p.name), token.clone(), true));
                    }
                }
            } else {
                files.push((format!("providers.{} token file", p.name), p.token_file.clone(), true));
            }
            if let Some(OAuthConfig { client_secret: SecretSource::File(f), .. }) = &p.oauth {
                files.push((format!("providers.{} client secret file", p.name), f.clone(), true));
            }
            if let Some(assertion) = p.oauth.as_ref().and_then(|o| o.grants.assertion.as_ref()) {
                files.push((
                    format!("providers.{} private key", p.name),
                    assertion.key.path().to_path_buf(),
                    true,
                ));
            }
        }
        for caller in &self.callers {
            if let Some(file) = &caller.secret_file {
                files.push((format!("callers.{} secret file", caller.name), file.clone(), true));
            }
            if let Some(jwt) = &caller.jwt {
                files.push((format!("callers.{} JWKS file", caller.name), jwt.jwks_file.clone(), true));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        files
            .into_iter()
            .filter(|(_, path, _)| seen.insert(path.clone()))
            .filter_map(|(what, path, show_path)| {
                let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
                (mode & 0o044 != 0).then(|| {
                    // An account's file in a log line is named without its path, which holds the name.
                    let shown = if show_path { format!(" {}", path.display()) } else { String::new() };
                    format!(
                        "{what}{shown} is readable by {} (mode {mode:o}); chmod 600 it",
                        if mode & 0o004 != 0 { "everyone" } else { "its group" }
                    )
                })
            })
            .collect()
    }
}

/// Puts each provider's preset (SPEC §10) under its own keys: a key the config sets wins, a key
/// it leaves out comes from the preset.
fn apply_presets(figment: Figment) -> Result<Figment, Vec<String>> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        providers: BTreeMap<String, PresetRef>,
    }
    #[derive(Deserialize)]
    struct PresetRef {
        preset: Option<String>,
        #[serde(default)]
        preset_params: BTreeMap<String, String>,
    }
    // A config this cannot read is reported by the full extraction that follows.
    let Ok(named) = figment.extract::<Named>() else { return Ok(figment) };
    let mut figment = figment;
    let mut problems = Vec::new();
    for (name, wanted) in named.providers {
        let Some(preset) = wanted.preset else {
            if !wanted.preset_params.is_empty() {
                problems.push(format!("providers.{name}.preset_params: given without a preset"));
            }
            continue;
        };
        match crate::presets::Preset::get(&preset).and_then(|p| p.settings(&wanted.preset_params)) {
            Ok(settings) => {
                figment = figment
                    .join(figment::providers::Serialized::default(&format!("providers.{name}"), settings));
            }
            Err(e @ crate::presets::PresetError::Unknown(_)) => {
                problems.push(format!("providers.{name}.preset: {e}"))
            }
            Err(e) => problems.push(format!("providers.{name}.preset_params: {e}")),
        }
    }
    if problems.is_empty() { Ok(figment) } else { Err(problems) }
}

/// "file: key proxy.bogus: unknown field …", naming where an override came from when it was
/// the environment.
/// Extracts the raw config; a key that cannot be read (unknown, or of the wrong type) is a
/// problem, and is then left out so that everything else is still read and validated: `check`
/// lists every problem at once, not the first.
fn extract_listing_every_problem(
    mut figment: Figment,
    path: &Path,
) -> Result<(RawConfig, Vec<String>), ConfigError> {
    let mut problems = Vec::new();
    // Each round removes at least one key; a config has far fewer bad keys than this.
    for _ in 0..64 {
        let errors = match figment.extract::<RawConfig>() {
            Ok(raw) => return Ok((raw, problems)),
            Err(errors) => errors,
        };
        let mut bad_keys = Vec::new();
        for e in errors {
            problems.push(describe_figment_error(path, &e));
            let mut key = e.path.clone();
            if let figment::error::Kind::UnknownField(field, _) = &e.kind
                && key.last() != Some(field)
            {
                key.push(field.clone());
            }
            bad_keys.push(key);
        }
        let Ok(mut value) = figment.extract::<figment::value::Value>() else { break };
        if !bad_keys.iter().all(|key| !key.is_empty() && remove_key(&mut value, key)) {
            break;
        }
        figment = Figment::from(figment::providers::Serialized::defaults(value));
    }
    Err(ConfigError { problems })
}

/// Removes `key` (a path of names) from a figment value; whether it was there.
fn remove_key(value: &mut figment::value::Value, key: &[String]) -> bool {
    let figment::value::Value::Dict(_, dict) = value else { return false };
    match key {
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => dict.get_mut(first).is_some_and(|inner| remove_key(inner, rest)),
        [] => false,
    }
}

fn describe_figment_error(path: &Path, e: &figment::Error) -> String {
    let source = match e.metadata.as_ref().map(|m| m.name.as_ref()) {
        Some(name) if name.contains("environment") => format!(
            "environment variable TOKENPROXY_{}",
            e.path.iter().map(|p| p.to_ascii_uppercase()).collect::<Vec<_>>().join("__")
        ),
        _ => path.display().to_string(),
    };
    if e.path.is_empty() {
        format!("{source}: {}", e.kind)
    } else {
        format!("{source}: key {}: {}", e.path.join("."), e.kind)
    }
}

/// A duration that must be positive; a problem is recorded (once) otherwise.
pub(crate) fn parse_duration(what: &str, value: &str, problems: &mut Vec<String>) -> Duration {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            problems.push(format!("{what} must be greater than zero"));
            Duration::ZERO
        }
        Err(e) => {
            problems.push(format!("{what}: {value:?} is not a duration like \"30s\" or \"5m\" ({e})"));
            Duration::ZERO
        }
    }
}

fn parse_listen(what: &str, value: &str, problems: &mut Vec<String>) -> SocketAddr {
    value.parse().unwrap_or_else(|_| {
        problems.push(format!("{what}: {value:?} is not an address like \"127.0.0.1:8080\""));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

pub(crate) fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

fn validate(raw: RawConfig, source: &Path, base: &Path) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let p = &mut problems;

    let proxy = ProxySettings {
        listen: parse_listen("proxy.listen", &raw.proxy.listen, p),
        max_replay_body: raw.proxy.max_replay_body,
        upstream_timeout: parse_duration("proxy.upstream_timeout", &raw.proxy.upstream_timeout, p),
        header_read_timeout: parse_duration("proxy.header_read_timeout", &raw.proxy.header_read_timeout, p),
        shutdown_timeout: parse_duration("proxy.shutdown_timeout", &raw.proxy.shutdown_timeout, p),
        max_header_bytes: raw.proxy.max_header_bytes,
        max_idle_per_host: raw.proxy.max_idle_per_host,
        idle_timeout: parse_duration("proxy.idle_timeout", &raw.proxy.idle_timeout, p),
        max_connections: raw.proxy.max_connections,
        max_replay_total: raw.proxy.max_replay_total,
        access_log: raw.proxy.access_log,
        workers: (raw.proxy.workers > 0).then_some(raw.proxy.workers),
    };
    if raw.proxy.workers > MAX_WORKERS {
        p.push(format!("proxy.workers must be at most {MAX_WORKERS} (0: one per core)"));
    }
    if proxy.max_connections == 0 {
        p.push("proxy.max_connections must be at least 1".into());
    }
    if proxy.max_header_bytes < 8192 {
        p.push("proxy.max_header_bytes must be at least 8192".into());
    }
    let admin_listen = parse_listen("admin.listen", &raw.admin.listen, p);
    let admin_access = validate_admin(&raw.admin, base, p);
    let egress_deny = raw
        .egress
        .deny
        .iter()
        .filter_map(|net| {
            let parsed = crate::egress::parse_net(net.trim());
            if parsed.is_none() {
                p.push(format!("egress.deny: {net:?} is not a network like \"10.0.0.0/8\" or an address"));
            }
            parsed
        })
        .collect();

    let mut providers = Vec::new();
    for (name, rp) in raw.providers {
        if let Some(mut provider) = validate_provider(&name, rp, base, p) {
            if let Some(oauth) = provider.oauth.as_mut().filter(|o| o.redirect_uri.is_empty()) {
                oauth.redirect_uri = default_redirect_uri(admin_listen);
                if oauth.authorize_url.is_some() && admin_listen.port() == 0 {
                    p.push(format!(
                        "providers.{name}.oauth.redirect_uri defaults to the admin listener's /oauth/callback, \
                         but admin.listen has no fixed port: give it one, or set redirect_uri"
                    ));
                }
            }
            providers.push(provider);
        }
    }
    let store = validate_store(&raw.store, base, p);
    let transparent_listen = (!raw.transparent.listen.is_empty())
        .then(|| parse_listen("transparent.listen", &raw.transparent.listen, p));
    let sealing_key = match (&raw.store.encryption_key_file, &raw.store.encryption_key_env) {
        (Some(_), Some(_)) => {
            p.push("store: give only one of encryption_key_file and encryption_key_env".into());
            None
        }
        (Some(file), None) => Some(SealingKey::File(resolve(base, file))),
        (None, Some(var)) => Some(SealingKey::Env(var.clone())),
        (None, None) => None,
    };
    let onboarding = OnboardingSettings {
        state_dir: resolve(base, &raw.onboarding.state_dir),
        state_ttl: parse_duration("onboarding.state_ttl", &raw.onboarding.state_ttl, p),
        max_pending: raw.onboarding.max_pending,
    };
    if onboarding.max_pending == 0 {
        p.push("onboarding.max_pending must be at least 1".into());
    }

    let mut routes = Vec::new();
    for (i, rr) in raw.routes.into_iter().enumerate() {
        let what = format!("routes[{i}]");
        let listen = parse_listen(&format!("{what}.listen"), &rr.listen, p);
        let Some(provider) = providers.iter().find(|pv| pv.name == rr.provider) else {
            p.push(format!("{what}.provider: no provider named {:?}", rr.provider));
            continue;
        };
        let upstream: Uri = match rr.upstream.parse() {
            Ok(u) => u,
            Err(_) => {
                p.push(format!("{what}.upstream: {:?} is not a URL", rr.upstream));
                continue;
            }
        };
        let (Some(scheme), Some(authority)) = (upstream.scheme(), upstream.authority()) else {
            p.push(format!(
                "{what}.upstream: {:?} needs a scheme and a host, like \"https://api.example.com\"",
                rr.upstream
            ));
            continue;
        };
        if scheme != &Scheme::HTTP && scheme != &Scheme::HTTPS {
            p.push(format!("{what}.upstream: scheme must be http or https"));
            continue;
        }
        if scheme == &Scheme::HTTP
            && provider.upstream_scheme == UpstreamScheme::Keep
            && !provider.allow_plaintext
        {
            p.push(format!(
                "{what}.upstream: {:?} is plain HTTP but provider {:?} has allow_plaintext = false; \
                 use https or set allow_plaintext = true",
                rr.upstream, provider.name
            ));
        }
        routes.push(RouteConfig {
            listen,
            provider: rr.provider,
            upstream_scheme: scheme.clone(),
            upstream_authority: authority.clone(),
            upstream_base_path: upstream.path().trim_end_matches('/').to_string(),
        });
    }

    let provider_names: Vec<&str> = providers.iter().map(|pv| pv.name.as_str()).collect();
    let callers = crate::callers::config::validate_callers(raw.callers, &provider_names, base, p);
    let audit = crate::callers::config::validate_audit(&raw.audit, base);

    if problems.is_empty() {
        Ok(Config {
            source: source.to_path_buf(),
            proxy,
            admin_listen,
            admin_access,
            ca_dir: resolve(base, &raw.tls.ca_dir),
            extra_roots: raw.tls.extra_roots.iter().map(|r| resolve(base, r)).collect(),
            allow_unmatched: raw.egress.allow_unmatched,
            egress_deny,
            providers,
            routes,
            onboarding,
            store,
            transparent_listen,
            sealing_key,
            callers,
            audit,
        })
    } else {
        Err(ConfigError { problems })
    }
}

/// `[admin] token_file` must hold a token now (an empty one would let an empty password in), and
/// `hosts` are names, each with an optional port.
fn validate_admin(raw: &RawAdmin, base: &Path, p: &mut Vec<String>) -> AdminAccess {
    let token_file = raw.token_file.as_ref().map(|f| resolve(base, f));
    if let Some(file) = &token_file {
        match std::fs::read_to_string(file) {
            Ok(text) if text.trim().len() >= 16 => {}
            Ok(_) => p.push(format!(
                "admin.token_file: {} holds no token of at least 16 characters",
                file.display()
            )),
            Err(e) => p.push(format!("admin.token_file: {}: {e}", file.display())),
        }
    }
    let mut hosts = Vec::new();
    for entry in &raw.hosts {
        match crate::hosts::split_host_port(entry.trim()) {
            Ok((name, port)) if !name.is_empty() => {
                hosts.push((crate::hosts::normalize_host(name).into_owned(), port))
            }
            _ => p.push(format!(
                "admin.hosts: {entry:?} is not a host name like \"tokenproxy.internal\" or \"name:9090\""
            )),
        }
    }
    AdminAccess { token_file, hosts }
}

/// Provider names become parts of store keys, metric labels and URL paths: SPEC §5 keeps them to
/// 1–64 of `A-Z a-z 0-9 _ -`, so that no two (provider, account) pairs can share a key.
pub fn check_provider_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "provider name {name:?}: use 1-64 characters from A-Z a-z 0-9 _ - (it is part of store keys, metric labels and admin URLs)"
        ))
    }
}

fn validate_provider(
    name: &str,
    rp: RawProvider,
    base: &Path,
    p: &mut Vec<String>,
) -> Option<ProviderConfig> {
    let what = format!("providers.{name}");
    let before = p.len();
    if let Err(e) = check_provider_name(name) {
        p.push(format!("{what}: {e}"));
    }
    if rp.hosts.is_empty() {
        p.push(format!("{what}.hosts: at least one host pattern is needed"));
    }
    let hosts: Vec<HostPattern> = rp
        .hosts
        .iter()
        .filter_map(|h| match h.parse() {
            Ok(pattern) => Some(pattern),
            Err(e) => {
                p.push(format!("{what}.hosts: {h:?}: {e}"));
                None
            }
        })
        .collect();
    let header = HeaderName::from_bytes(rp.header.as_bytes()).unwrap_or_else(|_| {
        p.push(format!("{what}.header: {:?} is not a valid header name", rp.header));
        HeaderName::from_static("authorization")
    });
    let (format_prefix, format_suffix) = match rp.format.split_once("{token}") {
        Some((pre, post)) if !post.contains("{token}") => (pre.to_string(), post.to_string()),
        _ => {
            p.push(format!("{what}.format: {:?} must contain \"{{token}}\" exactly once", rp.format));
            (String::new(), String::new())
        }
    };
    let refresh_on_status = rp
        .refresh_on_status
        .iter()
        .filter_map(|s| match http::StatusCode::from_u16(*s) {
            Ok(code) if (400..600).contains(s) => Some(code),
            _ => {
                p.push(format!("{what}.refresh_on_status: {s} is not a 4xx or 5xx status"));
                None
            }
        })
        .collect();
    let sigv4 = rp.sigv4.map(|s| crate::sigv4::validate(&what, s, base, p));
    let token_file = match (rp.token_file, &sigv4) {
        (None, None) => {
            p.push(format!(
                "{what}.token_file: needed (where the token is kept), unless the provider signs with [providers.{name}.sigv4]"
            ));
            PathBuf::new()
        }
        (Some(_), Some(_)) => {
            p.push(format!("{what}.token_file: a provider with [providers.{name}.sigv4] signs requests and keeps no token file"));
            PathBuf::new()
        }
        (Some(file), None) => file,
        (None, Some(_)) => PathBuf::new(),
    };
    if sigv4.is_some() && rp.oauth.is_some() {
        p.push(format!("{what}: a provider with [providers.{name}.sigv4] has no [oauth]: it signs requests instead of fetching tokens"));
    }
    if sigv4.is_some() && !rp.default_account.is_empty() {
        p.push(format!("{what}.default_account: a [providers.{name}.sigv4] provider has no accounts"));
    }
    let oauth = rp.oauth.map(|o| validate_oauth(&what, o, base, p));
    if oauth.is_some() && FileFormat::of(&token_file) == FileFormat::Raw {
        p.push(format!(
            "{what}.token_file: a provider with [oauth] needs a .json, .yaml or .yml token file \
             (a raw file cannot hold a refresh token or an expiry, and is never written)"
        ));
    }
    let default_account = validate_accounts(&what, &token_file, rp.default_account, p);
    let per_installation = token_file.file_name().is_some_and(|n| n.to_string_lossy().contains("{account}"));
    if oauth.as_ref().is_some_and(|o| o.as_ref().is_some_and(|o| o.grant == Grant::GithubApp))
        && !per_installation
    {
        p.push(format!(
            "{what}.token_file: a GitHub App's token is per installation: name {{account}} in the file name \
             (the installation id), and set default_account to the one installation requests use"
        ));
    }
    (p.len() == before).then(|| ProviderConfig {
        name: name.to_string(),
        hosts,
        token_file: if sigv4.is_some() { token_file } else { resolve(base, &token_file) },
        default_account,
        header,
        format_prefix,
        format_suffix,
        client_header: rp.client_header,
        upstream_scheme: rp.upstream_scheme,
        allow_plaintext: rp.allow_plaintext,
        refresh_on_status,
        oauth: oauth.flatten(),
        sigv4: sigv4.flatten(),
    })
}

/// `{account}` may stand once in the token file's name, never in a folder (so an account name
/// can only ever pick a file in one folder); `default_account` needs it and must be a valid name.
fn validate_accounts(
    what: &str,
    token_file: &Path,
    default_account: String,
    p: &mut Vec<String>,
) -> Option<String> {
    let text = token_file.to_string_lossy();
    let in_name = token_file.file_name().map(|n| n.to_string_lossy().matches(ACCOUNT_PLACEHOLDER).count());
    let total = text.matches(ACCOUNT_PLACEHOLDER).count();
    if total > 0 && (in_name != Some(1) || total != 1) {
        p.push(format!(
            "{what}.token_file: {ACCOUNT_PLACEHOLDER} may appear once, in the file name only              (e.g. \"tokens/spotify/{ACCOUNT_PLACEHOLDER}.json\")"
        ));
    }
    if default_account.is_empty() {
        return None;
    }
    if total == 0 {
        p.push(format!(
            "{what}.default_account: only a multi-account provider has accounts; put {ACCOUNT_PLACEHOLDER} \
             in its token_file"
        ));
    }
    if let Err(e) = crate::accounts::check(&default_account) {
        p.push(format!("{what}.default_account: {e}"));
    }
    Some(default_account)
}

fn validate_oauth(what: &str, o: RawOAuth, base: &Path, p: &mut Vec<String>) -> Option<OAuthConfig> {
    let what = format!("{what}.oauth");
    let sources = [o.client_secret_file.is_some(), o.client_secret_env.is_some(), o.client_secret.is_some()];
    let client_secret = match (o.client_secret_file, o.client_secret_env, o.client_secret) {
        _ if sources.iter().filter(|s| **s).count() > 1 => {
            p.push(format!("{what}: give only one of client_secret_file, client_secret_env, client_secret"));
            SecretSource::None
        }
        (Some(f), _, _) => SecretSource::File(resolve(base, &f)),
        (_, Some(e), _) => SecretSource::Env(e),
        (_, _, Some(s)) => SecretSource::Inline(Secret(s)),
        _ => SecretSource::None,
    };
    // Unset: Basic with a secret; no client authentication for the grants that prove
    // themselves otherwise (a signed or exchanged token).
    let client_auth = match o.client_auth {
        Some(auth) => auth,
        None if client_secret == SecretSource::None && o.grant.proves_itself() => ClientAuth::None,
        None => ClientAuth::Basic,
    };
    let needs_secret = matches!(client_auth, ClientAuth::Basic | ClientAuth::Post);
    if client_secret == SecretSource::None && needs_secret {
        p.push(format!(
            "{what}: client_auth = {:?} needs a client secret (client_secret_file, client_secret_env \
             or client_secret), or set client_auth = \"none\"",
            client_auth.name()
        ));
    }
    if client_secret != SecretSource::None && !needs_secret {
        p.push(format!("{what}: a client secret is set but client_auth does not send one"));
    }
    let client_id_needed = matches!(o.grant, Grant::RefreshToken | Grant::ClientCredentials)
        || matches!(client_auth, ClientAuth::PrivateKeyJwt | ClientAuth::ClientAssertionFile);
    if o.client_id.trim().is_empty() && client_id_needed {
        p.push(format!("{what}.client_id is required"));
    }
    let raw_grant = crate::grants::config::RawGrant {
        private_key_file: o.private_key_file,
        key_id: o.key_id,
        assertion_ttl: o.assertion_ttl,
        assertion_claims: o.assertion_claims,
        service_account_file: o.service_account_file,
        app_id: o.app_id,
        api_url: o.api_url,
        client_assertion_file: o.client_assertion_file,
        subject_token_file: o.subject_token_file,
        subject_token_type: o.subject_token_type,
        audience: o.audience,
        resource: o.resource,
        requested_token_type: o.requested_token_type,
        issuer: o.issuer,
    };
    let grants =
        crate::grants::config::validate(&what, raw_grant, o.grant, client_auth, &o.client_id, base, p);
    let token_url = match o.token_url.as_str() {
        "" => grants.token_uri.clone(),
        url => {
            let uri = http_url(url);
            if uri.is_none() {
                p.push(format!("{what}.token_url: {url:?} is not an http(s) URL"));
            }
            uri
        }
    };
    if token_url.is_none() && o.token_url.is_empty() && grants.issuer.is_none() && o.grant != Grant::GithubApp
    {
        p.push(format!("{what}.token_url is required (or issuer, to discover it)"));
    }
    if !o.response_pointer.is_empty() && !o.response_pointer.starts_with('/') {
        p.push(format!("{what}.response_pointer: {:?} must start with '/'", o.response_pointer));
    }
    let refresh_before = parse_duration(&format!("{what}.refresh_before"), &o.refresh_before, p);
    let mut endpoint = |key: &str, value: &str| -> Option<Uri> {
        if value.is_empty() {
            return None;
        }
        let uri = http_url(value);
        if uri.is_none() {
            p.push(format!("{what}.{key}: {value:?} is not an http(s) URL"));
        }
        uri
    };
    let authorize_url = endpoint("authorize_url", &o.authorize_url);
    let device_authorization_url = endpoint("device_authorization_url", &o.device_authorization_url);
    endpoint("redirect_uri", &o.redirect_uri);
    for reserved in AUTHORIZE_PARAMS_OWNED {
        if o.authorize_params.contains_key(reserved) {
            p.push(format!("{what}.authorize_params: {reserved:?} is set by tokenproxy itself"));
        }
    }
    Some(OAuthConfig {
        token_url,
        grant: o.grant,
        client_id: o.client_id,
        client_secret,
        client_auth,
        scope: o.scope,
        extra_params: o.extra_params,
        response_pointer: o.response_pointer,
        refresh_before,
        authorize_url,
        device_authorization_url,
        authorize_params: o.authorize_params,
        pkce: o.pkce,
        redirect_uri: o.redirect_uri,
        grants,
    })
}

/// `http://<admin.listen>/oauth/callback`; an admin listener on every interface (a pod's) is
/// reached as 127.0.0.1, which is where `kubectl port-forward` puts it on a person's machine.
fn default_redirect_uri(admin: SocketAddr) -> String {
    let ip = match admin.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    // SocketAddr's Display brackets an IPv6 address.
    format!("http://{}/oauth/callback", SocketAddr::new(ip, admin.port()))
}

fn validate_store(raw: &RawStore, base: &Path, p: &mut Vec<String>) -> StoreSettings {
    match raw.kind.as_str() {
        "file" => {
            if !raw.url.is_empty()
                || raw.password_file.is_some()
                || raw.password_env.is_some()
                || !raw.sentinels.is_empty()
                || !raw.master_name.is_empty()
                || raw.sentinel_password_file.is_some()
                || raw.min_replicas_ack != 0
            {
                p.push(
                    "store: url, password_*, sentinels, master_name, sentinel_password_file and \
                     min_replicas_ack are for kind = \"redis\""
                        .into(),
                );
            }
            StoreSettings::File
        }
        "redis" => {
            let lock_ttl = parse_duration("store.lock_ttl", &raw.lock_ttl, p);
            let sentinel = validate_sentinels(raw, base, p);
            // With sentinels, `url` only gives the data nodes' scheme, database and password.
            let url_text = match (&sentinel, raw.url.is_empty()) {
                (Some(_), true) => "redis://sentinel-primary/0",
                _ => raw.url.as_str(),
            };
            let Ok(mut url) = url::Url::parse(url_text) else {
                p.push(format!("store.url: {:?} is not a URL like \"redis://127.0.0.1:6379/0\"", raw.url));
                return StoreSettings::File;
            };
            if !matches!(url.scheme(), "redis" | "rediss") {
                p.push(format!("store.url: scheme {:?}: use redis:// or rediss:// (TLS)", url.scheme()));
            }
            let password = match (&raw.password_file, &raw.password_env) {
                (Some(_), Some(_)) => {
                    p.push("store: give only one of password_file and password_env".into());
                    None
                }
                (Some(file), None) => {
                    let file = resolve(base, file);
                    match std::fs::read_to_string(&file) {
                        Ok(text) => Some(text.trim().to_string()),
                        Err(e) => {
                            p.push(format!("store.password_file {}: {e}", file.display()));
                            None
                        }
                    }
                }
                (None, Some(var)) => match std::env::var(var) {
                    Ok(value) => Some(value),
                    Err(_) => {
                        p.push(format!("store.password_env {var}: the environment variable is not set"));
                        None
                    }
                },
                (None, None) => None,
            };
            let mut shown = url.clone();
            let _ = shown.set_password(None);
            if let Some(password) = password {
                let _ = url.set_password(Some(&password));
            }
            let shown_url = match &sentinel {
                Some(s) => format!(
                    "{}://{} (sentinel master {:?})",
                    url.scheme(),
                    s.sentinels.iter().map(|(h, port)| format!("{h}:{port}")).collect::<Vec<_>>().join(","),
                    s.master_name
                ),
                None => shown.to_string(),
            };
            StoreSettings::Redis(Box::new(RedisSettings {
                url: Secret(url.to_string()),
                shown_url,
                key_prefix: raw.key_prefix.clone(),
                lock_ttl,
                password_file: raw.password_file.as_ref().map(|f| resolve(base, f)),
                sentinel,
                min_replicas_ack: raw.min_replicas_ack,
            }))
        }
        other => {
            p.push(format!("store.kind: {other:?} is not \"file\" or \"redis\""));
            StoreSettings::File
        }
    }
}

/// `[store] sentinels`, `master_name` and `sentinel_password_file` (SPEC §11).
fn validate_sentinels(raw: &RawStore, base: &Path, p: &mut Vec<String>) -> Option<SentinelSettings> {
    if raw.sentinels.is_empty() {
        if !raw.master_name.is_empty() || raw.sentinel_password_file.is_some() {
            p.push("store: master_name and sentinel_password_file are for sentinels = [...]".into());
        }
        return None;
    }
    if raw.master_name.is_empty() {
        p.push("store.master_name: required with sentinels (the name the sentinels monitor, as in `sentinel monitor NAME …`)".into());
    }
    let mut sentinels = Vec::new();
    for entry in &raw.sentinels {
        let parsed = entry
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse::<u16>().ok()?)))
            .filter(|(host, port)| !host.is_empty() && *port != 0);
        match parsed {
            Some((host, port)) => sentinels.push((host.to_string(), port)),
            None => p.push(format!("store.sentinels: {entry:?} is not host:port (like \"10.0.0.5:26379\")")),
        }
    }
    let password_file = raw.sentinel_password_file.as_ref().map(|f| resolve(base, f));
    let password = password_file.as_ref().and_then(|file| match std::fs::read_to_string(file) {
        Ok(text) => Some(Secret(text.trim().to_string())),
        Err(e) => {
            p.push(format!("store.sentinel_password_file {}: {e}", file.display()));
            None
        }
    });
    Some(SentinelSettings { sentinels, master_name: raw.master_name.clone(), password, password_file })
}

/// The authorization request's parameters that tokenproxy sets itself (SPEC §9).
const AUTHORIZE_PARAMS_OWNED: [&str; 6] =
    ["response_type", "client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method"];

/// `value` as an absolute http(s) URL with a host.
pub(crate) fn http_url(value: &str) -> Option<Uri> {
    value
        .parse::<Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_redirect_uri_is_the_admin_listener_as_a_browser_reaches_it() {
        let uri = |listen: &str| default_redirect_uri(listen.parse().unwrap());
        assert_eq!(uri("127.0.0.1:9090"), "http://127.0.0.1:9090/oauth/callback");
        // A pod's admin listener, through kubectl port-forward.
        assert_eq!(uri("0.0.0.0:9090"), "http://127.0.0.1:9090/oauth/callback");
        assert_eq!(uri("[::]:9090"), "http://[::1]:9090/oauth/callback");
        assert_eq!(uri("[::1]:9091"), "http://[::1]:9091/oauth/callback");
    }
}
