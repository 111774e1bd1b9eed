//! The command line (SPEC §2) and the small commands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::logging::LogFormat;
use crate::tokens::{Provider, TokenState};

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
}

impl Cli {
    pub fn config_path(&self) -> PathBuf {
        self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// `tokenproxy check`: prints one line per provider, then every problem; returns whether the
/// config and all token files are usable.
pub fn check(config: &Config) -> bool {
    let mut problems = Vec::new();
    if let Err(e) = crate::tls::client_config(&config.extra_roots) {
        problems.push(format!("{e:#}"));
    }
    let now = OffsetDateTime::now_utc();
    for pc in &config.providers {
        let provider = Provider::new(pc.clone(), None, std::time::Duration::ZERO);
        provider.reload();
        let view = provider.view(now);
        let expiry = match (&view.expires_at, view.expires_in_s) {
            (Some(at), Some(secs)) => format!("expires {at} ({})", human_seconds(secs)),
            _ => "expiry unknown".to_string(),
        };
        println!(
            "{:<16} {:<12} {:<44} source={:<22} fingerprint={}",
            view.provider,
            view.state.as_str(),
            expiry,
            view.expiry_source,
            view.fingerprint.as_deref().unwrap_or("-"),
        );
        match view.state {
            // A provider with OAuth can create its token file; one without cannot.
            TokenState::Missing if pc.oauth.is_none() => problems.push(format!(
                "providers.{}: token file {} does not exist",
                pc.name,
                pc.token_file.display()
            )),
            TokenState::Error => problems.push(format!(
                "providers.{}: {}",
                pc.name,
                view.last_error.unwrap_or_else(|| "token unusable".into())
            )),
            _ => {}
        }
    }
    if config.providers.is_empty() {
        println!("no providers configured: every request is forwarded untouched");
    }
    for problem in &problems {
        println!("problem: {problem}");
    }
    if problems.is_empty() {
        println!("config {} is valid", config.source.display());
    }
    problems.is_empty()
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
