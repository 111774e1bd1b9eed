//! `tokenproxy authorize PROVIDER [--account NAME] [--device]` (SPEC §2, §9): gets the first
//! token from a person, with a live countdown, and says exactly which step failed.
//!
//! Browser mode uses the running proxy's flow when its admin listener answers (so the proxy
//! adopts the token at once); otherwise this command serves `/connect/…` and the callback itself
//! on the `redirect_uri` address, with the same code. Device mode needs no listener at all.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::device::DeviceEvent;
use super::{Onboarding, Outcome, encode};
use crate::config::Config;
use crate::drain::Drain;
use crate::oauth::OAuthClient;
use crate::server::{self, ConnectionLimits};
use crate::tokens::Providers;

/// How often the running proxy is asked whether the flow has finished.
const POLL_EVERY: Duration = Duration::from_secs(1);

pub async fn authorize(
    config: &Config,
    provider: &str,
    account: Option<&str>,
    device: bool,
) -> anyhow::Result<bool> {
    let tls = crate::tls::client_config(&config.extra_roots)?;
    let oauth = OAuthClient::new(tls, config.proxy.upstream_timeout)?;
    let store = crate::tokens::store::for_config(config)?;
    let providers = Arc::new(Providers::load(&config.providers, None, Duration::ZERO, store).await);
    let onboarding = Arc::new(Onboarding::open(providers.clone(), oauth, &config.onboarding).await);
    let crate::onboarding::Connectable { provider: target, account, oauth, .. } =
        onboarding.target(provider, account, !device)?;
    let account = account.as_deref();
    if let (false, Some(named)) = (target.is_multi_account(), account) {
        println!("note: provider {provider} keeps one token; --account {named} is ignored");
    }
    let who = match account {
        Some(a) => format!("{provider} (account {a})"),
        None => provider.to_string(),
    };
    let outcome = if device {
        device_mode(&onboarding, provider, account, &who).await?
    } else {
        let redirect: http::Uri = oauth.redirect_uri.parse()?;
        match running_proxy(config).await {
            Some(admin) => via_running_proxy(&admin, &redirect, provider, account, &who, config).await?,
            None => serving_the_callback(&onboarding, &redirect, provider, account, &who).await?,
        }
    };
    Ok(report(&outcome, &providers, provider, account))
}

/// The admin URL of a tokenproxy that answers on `admin.listen`, if one runs.
async fn running_proxy(config: &Config) -> Option<String> {
    let admin = format!("http://{}", config.admin_listen);
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().ok()?;
    let answer = client.get(format!("{admin}/healthz")).send().await.ok()?;
    (answer.status().is_success() && answer.text().await.ok()?.trim() == "ok").then_some(admin)
}

/// The start URL of a flow on `base` (which sets the browser's cookie, then sends it on).
/// The link carries this command's own flow id, so that it waits for its own flow's outcome and
/// not for whatever flow of the same provider and account finishes first.
fn start_url(base: &str, provider: &str, account: Option<&str>, flow: &str) -> String {
    let mut url = format!("{}/connect/{}?flow={flow}", base.trim_end_matches('/'), encode(provider));
    if let Some(account) = account {
        url += &format!("&account={}", encode(account));
    }
    url
}

/// A new flow id: 128 random bits, base64url.
fn new_flow_id() -> String {
    crate::secrets::random_token()[..22].to_string()
}

/// Where the callback's host is: the start URL must be on it for the cookie to reach the
/// callback.
fn callback_base(redirect: &http::Uri) -> Option<String> {
    Some(format!("{}://{}", redirect.scheme_str()?, redirect.authority()?))
}

async fn via_running_proxy(
    admin: &str,
    redirect: &http::Uri,
    provider: &str,
    account: Option<&str>,
    who: &str,
    config: &Config,
) -> anyhow::Result<Arc<Outcome>> {
    let base = match callback_base(redirect) {
        Some(base) if redirect.path() == "/oauth/callback" => base,
        _ => admin.to_string(),
    };
    println!("To connect {who}, open this link in a browser (tokenproxy is running and finishes the flow):");
    println!();
    let flow = new_flow_id();
    println!("  {}", start_url(&base, provider, account, &flow));
    println!();
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?;
    let url = format!("{admin}/connect/{}/outcome?flow={flow}", encode(provider));
    let mut countdown = Countdown::new(config.onboarding.state_ttl);
    loop {
        if let Ok(answer) = client.get(&url).send().await
            && answer.status().is_success()
            && let Ok(outcome) = answer.json::<OutcomeAnswer>().await
        {
            countdown.done();
            return Ok(Arc::new(outcome.into()));
        }
        if countdown.tick() {
            return Ok(expired(provider, account));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn serving_the_callback(
    onboarding: &Arc<Onboarding>,
    redirect: &http::Uri,
    provider: &str,
    account: Option<&str>,
    who: &str,
) -> anyhow::Result<Arc<Outcome>> {
    let (Some("http"), Some(authority)) = (redirect.scheme_str(), redirect.authority()) else {
        anyhow::bail!(
            "redirect_uri {redirect} is not a plain-HTTP address this command can serve; start tokenproxy (its admin listener serves /oauth/callback) and run this again"
        );
    };
    let port = authority.port_u16().unwrap_or(80);
    let addr: SocketAddr = (authority.host().trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| anyhow::anyhow!("redirect_uri {redirect}: cannot resolve {}", authority.host()))?;
    let listener = server::bind("the redirect_uri's address", addr).await.map_err(|e| {
        anyhow::anyhow!("{e}; is another program using it? tokenproxy itself was not found running there")
    })?;
    let drain = Drain::new();
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 64 * 1024,
        max_connections: 64,
    };
    let served = onboarding.clone();
    let handler = move |req: http::Request<hyper::body::Incoming>, _peer| {
        let served = served.clone();
        async move {
            if super::http::is_onboarding_path(req.uri().path()) {
                return served.handle(req).await;
            }
            let text = "this is tokenproxy authorize: only /connect and /oauth/callback are served\n";
            let mut response = http::Response::new(crate::body::full(text));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            response
        }
    };
    tokio::spawn(server::serve("authorize", listener, limits, drain.watch(), None, handler));
    println!(
        "To connect {who}, open this link in a browser (this command serves the callback until you are done):"
    );
    println!();
    let flow = new_flow_id();
    println!("  {}", start_url(&format!("http://{authority}"), provider, account, &flow));
    println!();
    let mut countdown = Countdown::new(onboarding.flows.ttl);
    loop {
        let finished = onboarding.finished.notified();
        if let Some(outcome) = onboarding.outcome_of_flow(&flow) {
            countdown.done();
            return Ok(outcome);
        }
        if countdown.tick() {
            return Ok(expired(provider, account));
        }
        let _ = tokio::time::timeout(POLL_EVERY, finished).await;
    }
}

async fn device_mode(
    onboarding: &Onboarding,
    provider: &str,
    account: Option<&str>,
    who: &str,
) -> anyhow::Result<Arc<Outcome>> {
    let mut countdown: Option<Countdown> = None;
    let outcome = onboarding
        .device_flow(provider, account, |event| match event {
            DeviceEvent::Code(code) => {
                println!(
                    "To connect {who}, open {} on any device and enter the code:",
                    code.verification_uri
                );
                println!();
                println!("  {}", code.user_code);
                println!();
                if let Some(complete) = &code.verification_uri_complete {
                    println!("(or open {complete}, which carries the code)");
                }
                countdown = Some(Countdown::new(code.expires_in));
            }
            DeviceEvent::Waiting(_) => {
                if let Some(countdown) = countdown.as_mut() {
                    countdown.tick();
                }
            }
            DeviceEvent::SlowedDown(interval) => {
                if let Some(countdown) = countdown.as_mut() {
                    countdown.note(&format!(
                        "the provider asked to slow down: asking every {}s",
                        interval.as_secs()
                    ));
                }
            }
        })
        .await?;
    if let Some(countdown) = countdown.as_mut() {
        countdown.done();
    }
    Ok(outcome)
}

/// Prints how it ended; returns whether the token is stored.
fn report(outcome: &Outcome, providers: &Providers, provider: &str, account: Option<&str>) -> bool {
    if outcome.is_ok() {
        let location = providers
            .get(provider)
            .map(|p| p.store().location(crate::tokens::store::Key { provider, account }))
            .unwrap_or_default();
        println!("connected: {}", outcome.sentence);
        println!(
            "  fingerprint {}, expires {}, written to {location} and read back",
            outcome.fingerprint.as_deref().unwrap_or("-"),
            outcome.expires_at.as_deref().unwrap_or("unknown"),
        );
        true
    } else {
        println!("failed: {}", outcome.error.as_deref().unwrap_or(outcome.result));
        println!("  {}", outcome.sentence);
        if let Some(action) = &outcome.action {
            println!("what to do: {action}");
        }
        false
    }
}

fn expired(provider: &str, account: Option<&str>) -> Arc<Outcome> {
    let failure = super::Failure::StateExpired;
    Arc::new(Outcome {
        provider: provider.to_string(),
        account: account.map(str::to_string),
        result: failure.label(),
        error: Some(format!("{}: nobody finished the authorization in time", failure.label())),
        sentence: failure.sentence(),
        flow: None,
        action: Some(failure.action()),
        fingerprint: None,
        expires_at: None,
        at: OffsetDateTime::now_utc(),
    })
}

/// An outcome as the admin API answers it.
#[derive(serde::Deserialize)]
struct OutcomeAnswer {
    provider: String,
    account: Option<String>,
    result: String,
    error: Option<String>,
    sentence: String,
    action: Option<String>,
    flow: Option<String>,
    fingerprint: Option<String>,
    expires_at: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
}

impl From<OutcomeAnswer> for Outcome {
    fn from(a: OutcomeAnswer) -> Outcome {
        const LABELS: [&str; 6] =
            ["ok", "access_denied", "state_unknown", "state_expired", "exchange_failed", "write_failed"];
        Outcome {
            provider: a.provider,
            account: a.account,
            result: LABELS.into_iter().find(|l| *l == a.result).unwrap_or("exchange_failed"),
            error: a.error,
            flow: a.flow,
            sentence: a.sentence,
            action: a.action,
            fingerprint: a.fingerprint,
            expires_at: a.expires_at,
            at: a.at,
        }
    }
}

/// The live "waiting — 59 min left" line: rewritten in place on a terminal, a line a minute
/// otherwise (logs of a pod or a CI job).
struct Countdown {
    deadline: Instant,
    terminal: bool,
    last_printed: Option<String>,
}

impl Countdown {
    fn new(limit: Duration) -> Countdown {
        let mut countdown = Countdown {
            deadline: Instant::now() + limit,
            terminal: std::io::stdout().is_terminal(),
            last_printed: None,
        };
        countdown.tick();
        countdown
    }

    /// Shows the time left; returns whether it ran out.
    fn tick(&mut self) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let text = waiting_line(left);
        if self.terminal {
            print!("\r\x1b[K{text}");
            let _ = std::io::stdout().flush();
        } else if self.last_printed.as_deref() != Some(text.as_str())
            && (left.as_secs() >= 60 || left.as_secs().is_multiple_of(10) || self.last_printed.is_none())
        {
            println!("{text}");
            self.last_printed = Some(text);
        }
        left.is_zero()
    }

    fn note(&mut self, text: &str) {
        if self.terminal {
            print!("\r\x1b[K");
        }
        println!("{text}");
    }

    fn done(&mut self) {
        if self.terminal {
            print!("\r\x1b[K");
            let _ = std::io::stdout().flush();
        }
    }
}

/// "waiting — 59 min left", "waiting — 40 s left".
fn waiting_line(left: Duration) -> String {
    let secs = left.as_secs();
    if secs >= 60 {
        format!("waiting — {} min left", secs.div_ceil(60))
    } else {
        format!("waiting — {secs} s left")
    }
}
