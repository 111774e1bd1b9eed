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
//!
//! With `--failovers N`, the store is a primary, two replicas and three sentinels (all
//! `redis-server`, on loopback), the replicas use `sentinels` and `min_replicas_ack = 1`, and N
//! times at random moments the primary is killed (SIGKILL), the sentinels promote a replica, and
//! the killed node comes back empty as a replica of the new primary. It reports, besides the
//! above, each promotion's time and how long replicas held an expired token (what a client would
//! have seen as errors).
//!
//!   cargo run --release --example fleet_sim -- --replicas 100 --seconds 600 --lifetime 2 --failovers 10

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
    /// Kill the primary this many times, at random moments (Redis Sentinel mode).
    #[arg(long, default_value_t = 0)]
    failovers: usize,
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
    let (_redis, store_toml, sentinel) = match (&args.redis, args.failovers) {
        (Some(url), _) => (None, format!("url = \"{url}\""), None),
        (None, 0) => {
            let port = free_port()?;
            let child = start_node(port, &dir.path().join("redis"), None)?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            (Some(KillOnDrop(child)), format!("url = \"redis://127.0.0.1:{port}/0\""), None)
        }
        (None, _) => {
            let setup = Sentinels::start(dir.path()).await?;
            let toml = format!(
                "sentinels = [{}]\nmaster_name = \"sim\"\nmin_replicas_ack = 1",
                setup
                    .sentinels
                    .iter()
                    .map(|(_, p)| format!("\"127.0.0.1:{p}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            (None, toml, Some(Arc::new(Mutex::new(setup))))
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
            "[store]\nkind = \"redis\"\n{store_toml}\nkey_prefix = \"sim{}\"\nlock_ttl = \"10s\"\n\
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
    println!(
        "{} replicas on {store_toml:?}, {}s tokens, running {}s…",
        args.replicas, lifetime, args.seconds
    );
    let failovers = match &sentinel {
        Some(setup) => {
            Some(tokio::spawn(fail_over(setup.clone(), args.failovers, Duration::from_secs(args.seconds))))
        }
        None => None,
    };
    let mut expired_replica_ms = 0u64;
    let mut last_sample = Instant::now();

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
        let now_utc = time::OffsetDateTime::now_utc();
        let expired =
            replicas.iter().filter(|(_, c)| c.current().is_none_or(|t| t.is_expired(now_utc))).count();
        expired_replica_ms += expired as u64 * last_sample.elapsed().as_millis() as u64;
        last_sample = Instant::now();
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
    if let Some(failovers) = failovers {
        let promotions = failovers.await??;
        let ms: Vec<String> = promotions.iter().map(|d| format!("{}", d.as_millis())).collect();
        println!(
            "failovers={} promotion_ms=[{}] expired_token_replica_seconds={:.1} (over {} replicas)",
            promotions.len(),
            ms.join(","),
            expired_replica_ms as f64 / 1000.0,
            args.replicas
        );
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

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` on `port` with its data in `dir` (made empty), a replica of `replica_of`.
fn start_node(
    port: u16,
    dir: &std::path::Path,
    replica_of: Option<u16>,
) -> std::io::Result<std::process::Child> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut command = std::process::Command::new("redis-server");
    command.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"]);
    command.arg("--dir").arg(dir);
    if let Some(primary) = replica_of {
        command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    command.stdout(std::process::Stdio::null()).spawn()
}

/// A primary, two replicas and three sentinels monitoring them as `sim`.
struct Sentinels {
    dir: std::path::PathBuf,
    nodes: Vec<(u16, KillOnDrop)>,
    sentinels: Vec<(KillOnDrop, u16)>,
}

impl Sentinels {
    async fn start(dir: &std::path::Path) -> anyhow::Result<Sentinels> {
        let primary = free_port()?;
        let mut nodes =
            vec![(primary, KillOnDrop(start_node(primary, &dir.join(format!("node-{primary}")), None)?))];
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..2 {
            let port = free_port()?;
            nodes.push((
                port,
                KillOnDrop(start_node(port, &dir.join(format!("node-{port}")), Some(primary))?),
            ));
        }
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port()?;
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor sim 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds sim 1500\nsentinel failover-timeout sim 4000\n\
                     sentinel parallel-syncs sim 2\n"
                ),
            )?;
            let child = std::process::Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(std::process::Stdio::null())
                .spawn()?;
            sentinels.push((KillOnDrop(child), port));
        }
        let setup = Sentinels { dir: dir.to_path_buf(), nodes, sentinels };
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup.primary().await != Some(primary) {
            anyhow::ensure!(Instant::now() < deadline, "the sentinels did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(setup)
    }

    async fn primary(&self) -> Option<u16> {
        primary_of(&self.sentinels.iter().map(|(_, p)| *p).collect::<Vec<_>>()).await
    }
}

/// The primary's port, as the first sentinel that answers names it.
async fn primary_of(sentinels: &[u16]) -> Option<u16> {
    {
        for port in sentinels {
            let out = tokio::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "sentinel", "get-master-addr-by-name", "sim"])
                .output()
                .await
                .ok()?;
            if let Some(port) =
                String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok())
            {
                return Some(port);
            }
        }
        None
    }
}

/// Kills the primary `count` times at random moments within `over`; returns how long each
/// promotion took.
async fn fail_over(
    setup: Arc<Mutex<Sentinels>>,
    count: usize,
    over: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let mut promotions = Vec::new();
    let began = Instant::now();
    let slot = over / (count as u32 + 1);
    for _ in 0..count {
        let mut random = [0u8; 4];
        getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("{e}"))?;
        let fraction = u32::from_le_bytes(random) as f64 / u32::MAX as f64;
        tokio::time::sleep(slot.mul_f64(0.5 + fraction)).await;
        let ports: Vec<u16> = setup.lock().unwrap().sentinels.iter().map(|(_, p)| *p).collect();
        let Some(old) = primary_of(&ports).await else { anyhow::bail!("no primary") };
        let killed = Instant::now();
        {
            let mut s = setup.lock().unwrap();
            if let Some((_, node)) = s.nodes.iter_mut().find(|(p, _)| *p == old) {
                node.kill();
            }
            drop(s);
        }
        let new = loop {
            if let Some(new) = primary_of(&ports).await.filter(|p| *p != old) {
                break new;
            }
            anyhow::ensure!(killed.elapsed() < Duration::from_secs(60), "no promotion in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        promotions.push(killed.elapsed());
        println!(
            "  failover at {:.1}s: {old} killed, {new} promoted after {:?}",
            (killed - began).as_secs_f64(),
            killed.elapsed()
        );
        // The killed node comes back empty, as a replica of the new primary.
        let mut s = setup.lock().unwrap();
        let dir = s.dir.join(format!("node-{old}"));
        if let Some((_, node)) = s.nodes.iter_mut().find(|(p, _)| *p == old) {
            *node = KillOnDrop(start_node(old, &dir, Some(new))?);
        }
    }
    Ok(promotions)
}

struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
