//! A fleet of replicas sharing one rotating credential through Redis, simulated in one process
//! (SPEC §11, `bench/README.md`): each replica is the real token cache on its own Redis
//! connections (store, lock, change feed) with its own proactive refresher, against an
//! in-process token endpoint that issues short-lived tokens and rotates refresh tokens strictly
//! (a reused one is `invalid_grant`). It reports refreshes per token lifetime (goal: 1),
//! `invalid_grant` (goal: 0), and how long the last replica takes to adopt each new token.
//!
//!   cargo run --release --example fleet_sim -- --replicas 100 --seconds 600 --lifetime 2
//!
//! Starts its own `redis-server` on a free loopback port unless `--redis URL` is given.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokenproxy::config::Config;
use tokenproxy::oauth::OAuthClient;
use tokenproxy::tokens::{Providers, watch};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// How long to run (real seconds: the simulated token lifetimes are real too).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Each access token's lifetime, in seconds.
    #[arg(long, default_value_t = 2)]
    lifetime: u64,
    /// A Redis to use instead of starting one.
    #[arg(long)]
    redis: Option<String>,
}

#[derive(Default)]
struct Endpoint {
    valid_refresh: HashSet<String>,
    issued: u64,
    invalid_grants: u64,
    /// When each access token was issued.
    issued_at: HashMap<String, Instant>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (_redis, url) = match &args.redis {
        Some(url) => (None, url.clone()),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = std::process::Command::new("redis-server")
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(std::process::Stdio::null())
                .spawn()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            (Some(KillOnDrop(child)), format!("redis://127.0.0.1:{port}/0"))
        }
    };

    // The token endpoint.
    let endpoint = Arc::new(Mutex::new(Endpoint::default()));
    endpoint.lock().unwrap().valid_refresh.insert("rt-0".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let token_url = format!("http://{}/token", listener.local_addr()?);
    let lifetime = args.lifetime;
    {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let endpoint = endpoint.clone();
                        async move { Ok::<_, Infallible>(answer(&endpoint, req, lifetime).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    // One config for every replica; the first token is seeded from the file.
    std::fs::write(
        dir.path().join("api.json"),
        r#"{"access_token":"at-0","refresh_token":"rt-0","expires_at":"2000-01-01T00:00:00Z"}"#,
    )?;
    let config_path = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &config_path,
        format!(
            "[store]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"sim{}\"\nlock_ttl = \"10s\"\n\
             [providers.api]\nhosts = [\"api.example.com\"]\ntoken_file = \"api.json\"\n\
             [providers.api.oauth]\ntoken_url = \"{token_url}\"\nclient_id = \"sim\"\nclient_auth = \"none\"\n",
            std::process::id()
        ),
    )?;
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    tokenproxy::tls::install_crypto_provider();
    let tls = tokenproxy::tls::client_config(&[])?;
    let mut replicas = Vec::new();
    for _ in 0..args.replicas {
        let store = tokenproxy::tokens::store::for_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let oauth = OAuthClient::new(tls.clone(), Duration::from_secs(10))?;
        let providers =
            Arc::new(Providers::load(&config.providers, Some(oauth), Duration::from_secs(10), store).await);
        let provider = providers.get("api").expect("the provider").clone();
        let credential = provider.single().expect("single-account").clone();
        tokio::spawn(provider.clone().keep_fresh(credential.clone()));
        watch::spawn(providers.clone());
        replicas.push((providers, credential));
    }
    println!("{} replicas on {url}, {}s tokens, running {}s…", args.replicas, lifetime, args.seconds);

    // Sample every replica's token; a token's adoption time is when the last replica holds it
    // (or a newer one).
    let started = Instant::now();
    let mut lags: Vec<Duration> = Vec::new();
    let mut done_up_to = 0u64;
    let fingerprints: HashMap<String, u64> =
        (0..200_000u64).map(|n| (tokenproxy::secrets::fingerprint(&format!("at-{n}")), n)).collect();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let slowest = replicas
            .iter()
            .map(|(_, c)| c.current().and_then(|t| fingerprints.get(&t.fingerprint).copied()).unwrap_or(0))
            .min()
            .unwrap_or(0);
        if slowest > done_up_to {
            let now = Instant::now();
            let state = endpoint.lock().unwrap();
            for n in done_up_to + 1..=slowest {
                if let Some(at) = state.issued_at.get(&format!("at-{n}")) {
                    lags.push(now - *at);
                }
            }
            done_up_to = slowest;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let state = endpoint.lock().unwrap();
    lags.sort();
    let pct =
        |p: f64| lags.get(((lags.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default();
    let lifetimes = args.seconds as f64 / lifetime as f64;
    // A token is due for refresh when half its life is left (refresh_before is capped there), so
    // one refresh per token is two per lifetime.
    let due = args.seconds as f64 / (lifetime as f64 / 2.0);
    println!(
        "refreshes={} due_refreshes={due:.0} refreshes_per_due_refresh={:.2} token_lifetimes={lifetimes:.0} refreshes_per_lifetime={:.2} invalid_grant={} \
         adopted_by_all_p50_ms={:.1} p99_ms={:.1} max_ms={:.1} tokens_measured={}",
        state.issued,
        state.issued as f64 / due,
        state.issued as f64 / lifetimes,
        state.invalid_grants,
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        lags.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        lags.len()
    );
    Ok(())
}

async fn answer(
    endpoint: &Mutex<Endpoint>,
    req: hyper::Request<Incoming>,
    lifetime: u64,
) -> hyper::Response<Full<Bytes>> {
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let mut state = endpoint.lock().unwrap();
    let reply = |status: u16, body: String| {
        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        response
    };
    if !state.valid_refresh.remove(&presented) {
        state.invalid_grants += 1;
        return reply(400, r#"{"error":"invalid_grant"}"#.into());
    }
    state.issued += 1;
    let n = state.issued;
    state.valid_refresh.insert(format!("rt-{n}"));
    state.issued_at.insert(format!("at-{n}"), Instant::now());
    reply(200, format!(r#"{{"access_token":"at-{n}","refresh_token":"rt-{n}","expires_in":{lifetime}}}"#))
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
