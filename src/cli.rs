//! The command line (SPEC §2) and the small commands.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::logging::LogFormat;
use crate::tokens::store::TokenStore;
use crate::tokens::{Provider, TokenState, TokenView};

#[derive(Debug, Parser)]
#[command(
    name = "tokenproxy",
    version,
    about = "A sidecar proxy that adds fresh OAuth tokens to outgoing calls"
)]
pub struct Cli {
    /// Config file [default: $TOKENPROXY_CONFIG, else config/tokenproxy.toml]
    #[arg(long, global = true, env = "TOKENPROXY_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log line format; the level comes from RUST_LOG (default info)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the admin listener until SIGTERM/SIGINT (the default)
    Run,
    /// Validate the config and every token file; one line per provider
    Check,
    /// Make sure tokenproxy's CA exists and print the path of ca.pem (what applications trust)
    Ca,
    /// A self-contained walk-through on loopback: a mock provider, the proxy, and calls through it
    Demo,
    /// Get a provider's first token from a person: a browser link (authorization code with PKCE)
    /// or, with --device, a code to enter on any device (RFC 8628)
    Authorize {
        /// The provider, as named in the config
        provider: String,
        /// The account to connect (multi-account providers)
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// Use the device flow: print a code to enter on another device
        #[arg(long)]
        device: bool,
    },
    /// Look at or import a stored token (how to handle tokens once they are sealed at rest)
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// List the built-in provider presets, or print the config one stands for
    Presets {
        /// A preset's name: print the TOML it stands for
        name: Option<String>,
    },
    /// Print the iptables commands that redirect a pod's outbound TCP to [transparent] listen
    Iptables {
        /// tokenproxy's own user id, whose connections are not redirected
        #[arg(long, value_name = "UID", default_value_t = 10001)]
        uid: u32,
    },
    /// Show the running proxy's providers as a table; exit 0 only when all are ready
    Status {
        /// The admin listener [default: http:// + admin.listen from the config, else http://127.0.0.1:9090]
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Show a stored token: fingerprints, expiry, whether it is sealed; the token itself only
    /// with --reveal
    Show {
        provider: String,
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// Print the whole stored document, tokens included
        #[arg(long)]
        reveal: bool,
    },
    /// Store a JSON token document from a file or standard input (sealed when a key is configured)
    Put {
        provider: String,
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// The JSON document [default: standard input]
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

impl Cli {
    pub fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// `tokenproxy check`: prints one line per provider, then every problem; returns whether the
/// config and all token files are usable.
pub async fn check(config: &Config) -> bool {
    let mut problems = Vec::new();
    if let Err(e) = crate::tls::client_config(&config.extra_roots) {
        problems.push(format!("{e:#}"));
    }
    let now = OffsetDateTime::now_utc();
    let store: Arc<dyn TokenStore> = match crate::tokens::store::for_config(config) {
        Ok(store) => store,
        Err(e) => {
            println!("problem: {}", crate::errors::report(&e));
            return false;
        }
    };
    if let Some(key_id) = store.sealing_key_id() {
        println!("token data is sealed at rest with AES-256-GCM, key {key_id}");
    }
    for pc in &config.providers {
        if let Some(oauth) = &pc.oauth
            && let Err(e) = crate::oauth::check_secret(&oauth.client_secret)
        {
            problems.push(format!("providers.{}.oauth: {e}", pc.name));
        }
        if let Some(oauth) = &pc.oauth {
            check_grant(&pc.name, oauth, &mut problems);
        }
        if let Some(sigv4) = &pc.sigv4 {
            check_sigv4(&pc.name, sigv4, &mut problems);
            continue;
        }
        let provider = Provider::new(pc.clone(), None, std::time::Duration::ZERO, store.clone());
        if provider.is_multi_account() {
            check_accounts(&provider, now, store.seals(), &mut problems).await;
            continue;
        }
        let credential = provider.single().expect("a single-account provider");
        provider.reload(credential).await;
        let view = provider.view(credential, now);
        print_view(&view.provider, &view);
        print_sealing(&provider, &provider.key(credential), store.seals()).await;
        check_view(&provider, &view, &provider.location(credential), &mut problems);
    }
    if config.providers.is_empty() {
        println!("no providers configured: every request is forwarded untouched");
    }
    check_callers(config, &mut problems);
    for warning in config.loose_permission_warnings(true) {
        println!("warning: {warning}");
    }
    for problem in &problems {
        println!("problem: {problem}");
    }
    if problems.is_empty() {
        println!("config {} is valid", config.source.display());
    }
    problems.is_empty()
}

/// How a provider's tokens are minted (SPEC §14): the grant, the key it signs with (parsed now:
/// algorithm and key id, never the key) and endpoints left to discovery.
fn check_grant(name: &str, oauth: &crate::config::OAuthConfig, problems: &mut Vec<String>) {
    let grants = &oauth.grants;
    let plain = grants.assertion.is_none()
        && grants.client_assertion_file.is_none()
        && grants.exchange.is_none()
        && grants.github.is_none()
        && grants.issuer.is_none();
    if plain {
        return;
    }
    let mut line = format!("providers.{name}: grant {}", oauth.grant.name());
    if let Some(assertion) = &grants.assertion {
        match crate::grants::config::signing_key(assertion) {
            Ok(key) => line.push_str(&format!(
                ", signs with {} from {}",
                key.describe(),
                assertion.key.path().display()
            )),
            Err(e) => {
                problems.push(format!("providers.{name}.oauth: {}: {e}", assertion.key.path().display()))
            }
        }
    }
    if let Some(file) = &grants.client_assertion_file {
        line.push_str(&format!(", client assertion read from {} at each token request", file.display()));
        if let Err(e) = crate::grants::read_token_file(file, "client_assertion_file") {
            problems.push(format!("providers.{name}.oauth: {}", e.message));
        }
    } else if oauth.client_auth != crate::config::ClientAuth::Basic && grants.github.is_none() {
        line.push_str(&format!(", client_auth {}", oauth.client_auth.name()));
    }
    if let Some(exchange) = &grants.exchange {
        line.push_str(&format!(", subject token read from {}", exchange.subject_token_file.display()));
        if let Err(e) = crate::grants::read_token_file(&exchange.subject_token_file, "subject_token_file") {
            problems.push(format!("providers.{name}.oauth: {}", e.message));
        }
    }
    if let Some(app) = &grants.github {
        line.push_str(&format!(", app {} at {}", app.app_id, app.api_url));
    }
    if let Some(issuer) = &grants.issuer {
        line.push_str(&format!(", endpoints not set are discovered from {issuer} at start"));
    }
    println!("{line}");
}

/// A provider that signs (SPEC §14 `sigv4`): the region, service and where credentials come
/// from; each file read now (a problem when it cannot be), STS not called.
fn check_sigv4(name: &str, sigv4: &crate::sigv4::SigV4Config, problems: &mut Vec<String>) {
    use crate::sigv4::CredentialSource;
    let mut files = Vec::new();
    let source = match &sigv4.source {
        CredentialSource::Files { access_key_id, secret_access_key, session_token } => {
            files.push((access_key_id, "access_key_id_file"));
            files.push((secret_access_key, "secret_access_key_file"));
            files.extend(session_token.iter().map(|t| (t, "session_token_file")));
            format!("keys read from {} and {}", access_key_id.display(), secret_access_key.display())
        }
        CredentialSource::WebIdentity { role_arn, token_file, sts_url, .. } => {
            files.push((token_file, "web_identity_token_file"));
            format!("role {role_arn} assumed at {sts_url} with the token in {}", token_file.display())
        }
    };
    println!(
        "{name:<16} {:<12} SigV4 for {} in {}{}, {source}",
        "signs",
        sigv4.service,
        sigv4.region,
        if crate::sigv4::is_s3(&sigv4.service) { " (larger bodies UNSIGNED-PAYLOAD)" } else { "" }
    );
    for (file, what) in files {
        if let Err(e) = crate::grants::read_token_file(file, what) {
            problems.push(format!("providers.{name}.sigv4: {}", e.message));
        }
    }
}

/// The callers (SPEC §13): each with its identities and rules, and the files they are read from
/// (a problem each when one cannot be used). No secret is shown.
fn check_callers(config: &Config, problems: &mut Vec<String>) {
    if config.callers.is_empty() {
        println!("no callers configured: every client that reaches the proxy is trusted");
    }
    for caller in &config.callers {
        println!("caller {}", caller.name);
        for identity in caller.identities() {
            println!("  identity: {identity}");
        }
        for (i, rule) in caller.rules.iter().enumerate() {
            println!("  allow[{i}]: {rule}");
        }
        if caller.rules.is_empty() {
            println!("  no rules: it may use no provider's credential");
        }
        println!(
            "  hosts of no provider: {}",
            if caller.egress { "under [egress]" } else { "refused (egress = false)" }
        );
    }
    let (_, file_problems) = crate::callers::Table::build(&config.callers);
    problems.extend(file_problems);
    match &config.audit {
        Some(crate::callers::config::AuditTarget::File(path)) => {
            println!("audit lines go to {}", path.display())
        }
        Some(crate::callers::config::AuditTarget::Stdout) => println!("audit lines go to standard output"),
        None => {}
    }
}

/// At most this many accounts are listed one per line by `check`.
const CHECK_LISTS_ACCOUNTS: usize = 50;

/// A multi-account provider in `check`: a line with the number of accounts by state, then one
/// line per account (names are shown: `check` is a local command, not a log).
async fn check_accounts(provider: &Provider, now: OffsetDateTime, sealing: bool, problems: &mut Vec<String>) {
    let pc = &provider.config;
    let names = match provider.account_names_stored().await {
        Ok(names) => names,
        Err(e) => {
            println!("{:<16} {:<12} accounts cannot be listed", pc.name, "error");
            problems.push(format!("providers.{}: {}", pc.name, crate::errors::report(&e)));
            return;
        }
    };
    let mut views = Vec::new();
    for name in &names {
        let credential = provider.read_account(name).await;
        views.push((provider.view(&credential, now), provider.location(&credential)));
    }
    let mut by_state: Vec<String> = TokenState::ALL
        .iter()
        .filter_map(|state| {
            let n = views.iter().filter(|(v, _)| v.state == *state).count();
            (n > 0).then(|| format!("{n} {}", state.as_str()))
        })
        .collect();
    if by_state.is_empty() {
        by_state.push("none yet".into());
    }
    println!(
        "{:<16} {:<12} {} account{} ({}) in {}",
        pc.name,
        "accounts",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        by_state.join(", "),
        pc.token_file.display()
    );
    for (view, _) in views.iter().take(CHECK_LISTS_ACCOUNTS) {
        print_view(&format!("  {}", view.account.as_deref().unwrap_or("")), view);
        let key = crate::tokens::store::Key { provider: provider.name(), account: view.account.as_deref() };
        print_sealing(provider, &key, sealing).await;
    }
    if views.len() > CHECK_LISTS_ACCOUNTS {
        println!("  … and {} more", views.len() - CHECK_LISTS_ACCOUNTS);
    }
    for (view, file) in &views {
        check_view(provider, view, file, problems);
    }
    if let Some(default) = &pc.default_account
        && !names.contains(default)
    {
        let credential = provider.read_account(default).await;
        check_view(provider, &provider.view(&credential, now), &provider.location(&credential), problems);
    }
}

/// Whether a stored token is sealed (SPEC §11), on a line under its state.
async fn print_sealing(provider: &Provider, key: &crate::tokens::store::Key<'_>, configured: bool) {
    use crate::tokens::store::Loaded;
    match provider.store().load(*key).await {
        Ok(Loaded::Found { sealed: true, doc: Ok(_), .. }) => println!("{:<16} sealed (AES-256-GCM)", ""),
        Ok(Loaded::Found { sealed: false, doc: Ok(_), .. }) if configured => {
            println!("{:<16} plaintext: sealed on its next write", "")
        }
        _ => {}
    }
}

fn print_view(label: &str, view: &TokenView) {
    let expiry = match (&view.expires_at, view.expires_in_s) {
        (Some(at), Some(secs)) => format!("expires {at} ({})", human_seconds(secs)),
        _ => "expiry unknown".to_string(),
    };
    println!(
        "{:<16} {:<12} {:<44} source={:<22} fingerprint={}",
        label,
        view.state.as_str(),
        expiry,
        view.expiry_source,
        view.fingerprint.as_deref().unwrap_or("-"),
    );
}

/// The problems one token file has for `check`.
fn check_view(provider: &Provider, view: &TokenView, location: &str, problems: &mut Vec<String>) {
    let pc = &provider.config;
    let what = match &view.account {
        Some(account) => format!("providers.{} account {account}", pc.name),
        None => format!("providers.{}", pc.name),
    };
    // Only a grant that mints (client_credentials, jwt_bearer, …) can create its token file;
    // every other provider cannot serve a single request without one.
    let creates_its_file = pc.oauth.as_ref().is_some_and(|o| o.grant.mints());
    match view.state {
        TokenState::Missing if !creates_its_file => {
            let connect = pc
                .oauth
                .as_ref()
                .filter(|o| o.authorize_url.is_some() || o.device_authorization_url.is_some());
            let account = view.account.as_deref().map(|a| format!(" --account {a}")).unwrap_or_default();
            problems.push(format!(
                "{what}: {location} does not exist{}",
                match (connect, &pc.oauth) {
                    (Some(_), _) =>
                        format!(" (get the first token with `tokenproxy authorize {}{account}`)", pc.name),
                    (None, Some(_)) => " (a refresh_token grant needs a first refresh token in it)".into(),
                    (None, None) => String::new(),
                }
            ))
        }
        TokenState::Error => problems
            .push(format!("{what}: {}", view.last_error.clone().unwrap_or_else(|| "token unusable".into()))),
        _ => {}
    }
}

/// `3600` → "in 1h 0m", `-90` → "1m 30s ago".
pub fn human_seconds(secs: i64) -> String {
    let a = secs.unsigned_abs();
    let text = if a >= 86_400 {
        format!("{}d {}h", a / 86_400, a % 86_400 / 3600)
    } else if a >= 3600 {
        format!("{}h {}m", a / 3600, a % 3600 / 60)
    } else if a >= 60 {
        format!("{}m {}s", a / 60, a % 60)
    } else {
        format!("{a}s")
    };
    if secs >= 0 { format!("in {text}") } else { format!("{text} ago") }
}

/// `tokenproxy status`: the admin `/tokens` view as a table, one row per provider or account.
/// Returns whether the proxy is ready as `/readyz` says (the exit code).
pub async fn status(admin: &str) -> anyhow::Result<bool> {
    let url = format!("{}/tokens", admin.trim_end_matches('/'));
    let client = reqwest::Client::builder().no_proxy().timeout(std::time::Duration::from_secs(10)).build()?;
    let response =
        client.get(&url).send().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the admin API at {url}: is tokenproxy running? ({e})")
        })?;
    anyhow::ensure!(response.status().is_success(), "{url} answered {}", response.status());
    let views: Vec<serde_json::Value> = response.json().await?;
    println!(
        "{:<16} {:<24} {:<13} {:<22} {:<26} {:<16} FINGERPRINT",
        "PROVIDER", "ACCOUNT", "STATE", "EXPIRES", "LAST REFRESH", "RESULT"
    );
    for v in &views {
        let text = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let state = text("state");
        let expires = v["expires_in_s"].as_i64().map_or_else(|| "unknown".to_string(), human_seconds);
        println!(
            "{:<16} {:<24} {:<13} {:<22} {:<26} {:<16} {}",
            text("provider"),
            text("account"),
            state,
            expires,
            text("last_refresh_at"),
            text("last_refresh_result"),
            text("fingerprint")
        );
        if let Some(error) = v["last_error"].as_str() {
            println!("  last error: {error}");
        }
    }
    if views.is_empty() {
        println!(
            "no tokens loaded: no providers are configured, or only multi-account ones whose accounts \
             no request or connect has used yet (`tokenproxy check` lists stored accounts)"
        );
    }
    // Ready is what /readyz says: one account's state never counts against it (SPEC §8).
    let readyz = format!("{}/readyz", admin.trim_end_matches('/'));
    let ready =
        client.get(&readyz).send().await.map_err(|e| anyhow::anyhow!("cannot reach {readyz}: {e}"))?;
    Ok(ready.status().is_success())
}

/// `tokenproxy presets [NAME]`: the list, or one preset as the config it stands for. Returns
/// false for an unknown name.
pub fn presets(name: Option<&str>) -> bool {
    use crate::presets::Preset;
    let Some(name) = name else {
        println!("{:<24} {:<24} {:<8} {:<44} DESCRIPTION", "NAME", "FLOWS", "PARAMS", "HOSTS");
        for preset in Preset::all() {
            let params = preset.params();
            println!(
                "{:<24} {:<24} {:<8} {:<44} {}",
                preset.name,
                preset.flows().join(","),
                if params.is_empty() { "-".to_string() } else { params.join(",") },
                preset.hosts().join(", "),
                preset.description()
            );
        }
        println!(
            "\nUse one with `preset = \"NAME\"` in a [providers.X] table; `tokenproxy presets NAME` shows what it sets."
        );
        return true;
    };
    match Preset::get(name) {
        Ok(preset) => {
            print!("{}", preset.text);
            let params = preset.params();
            println!("\n# To use it, write only what is yours; every key above can be overridden:");
            println!("#   [providers.{}]", preset.name);
            println!("#   preset = \"{}\"", preset.name);
            if !params.is_empty() {
                let example: Vec<String> = params.iter().map(|p| format!("{p} = \"…\"")).collect();
                println!("#   preset_params = {{ {} }}", example.join(", "));
            }
            println!(
                "#   token_file = \"tokens/{}.json\"          # or \"tokens/{}/{{account}}.json\" for one token per user",
                preset.name, preset.name
            );
            println!("#   [providers.{}.oauth]", preset.name);
            println!("#   client_id = \"…\"");
            println!("#   client_secret_file = \"/run/secrets/{}\"", preset.name);
            true
        }
        Err(e) => {
            eprintln!("tokenproxy: {e}");
            false
        }
    }
}
