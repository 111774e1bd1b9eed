//! A fleet sharing one rotating credential through a real Redis (SPEC §11): replicas under load
//! spend each refresh token exactly once and converge on every new token; Redis going away
//! stops refreshes (no refresh token spent) while tokens keep serving, and everything recovers
//! when it returns; a lock holder killed mid-refresh is taken over after `lock_ttl`; tokens in
//! Redis are sealed.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

fn config(
    api: &MockApi,
    endpoint: &MockTokenEndpoint,
    redis: &RedisServer,
    prefix: &str,
    extra_store: &str,
) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n{extra_store}\n\
         [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{}",
        redis.url(),
        api.authority(),
        endpoint.oauth_toml("api", "refresh_token")
    )
}

/// `n` replicas on one Redis; the first has the token file that seeds the store.
fn replicas(root: &Path, n: usize, config: &str, seed: &str) -> Vec<TokenProxy> {
    (0..n)
        .map(|i| {
            let dir = root.join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            if i == 0 {
                std::fs::write(dir.join("api.json"), seed).unwrap();
            }
            TokenProxy::start(&dir, config)
        })
        .collect()
}

async fn fingerprint(proxy: &TokenProxy) -> Option<String> {
    proxy.token_view("api").await["fingerprint"].as_str().map(str::to_string)
}

/// Requests spread over the replicas for `duration`: every one must succeed. Returns how many.
async fn load(api: &MockApi, fleet: &[TokenProxy], duration: Duration) -> usize {
    let clients: Vec<reqwest::Client> = fleet.iter().map(|p| p.client()).collect();
    let started = Instant::now();
    let mut sent = 0;
    // Bounded in time and in count.
    while started.elapsed() < duration && sent < 100_000 {
        let client = &clients[sent % clients.len()];
        let response = client.get(api.url("/v1/data")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {sent} at {:?}", started.elapsed());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sent
}

/// A Redis, an API, and a token endpoint that rotates refresh tokens strictly (a spent one is
/// `invalid_grant`) and issues two-second tokens, accepting the seed's refresh token `rt-seed`;
/// `None` (the test skips) without Redis.
async fn rotating_provider() -> Option<(tempfile::TempDir, RedisServer, MockApi, MockTokenEndpoint)> {
    if !redis_available() {
        return None;
    }
    let dir = tempdir();
    let redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.rotate = Rotation::Strict;
    endpoint.expires_in = Some(2);
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-seed");
    Some((dir, redis, api, endpoint))
}

async fn a_fleet_shares_one_rotating_credential(replica_count: usize, seconds: u64) {
    let Some((dir, redis, api, endpoint)) = rotating_provider().await else { return };
    api.accept("at-seed");
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2000-01-01T00:00:00Z"}"#;
    let text = config(&api, &endpoint, &redis, "fleet", "lock_ttl = \"5s\"");
    let fleet = replicas(dir.path(), replica_count, &text, seed);

    // Meanwhile, how long each new token takes to reach every replica.
    let admins: Vec<_> = fleet.iter().map(|p| p.admin).collect();
    let lags = tokio::spawn(adoption_lags(admins, Duration::from_secs(seconds)));
    let sent = load(&api, &fleet, Duration::from_secs(seconds)).await;
    let lags = lags.await.unwrap();
    // SPEC §7: the store's operations are counted.
    for proxy in &fleet {
        assert!(
            proxy.metric("tokenproxy_store_operations_total", &[("op", "read"), ("result", "ok")]).await
                > 0.0
        );
    }
    // One write per refresh, and the seed. The fleet keeps refreshing while the metrics are
    // read, so the two counts are compared at a moment when no token call is between its answer
    // and its write (the count of calls is the same before and after the writes are read): a
    // refresh in flight then is not taken for a refresh that never wrote.
    let mut last;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let calls = endpoint.calls();
        let mut writes = 0.0;
        for proxy in &fleet {
            writes +=
                proxy.metric("tokenproxy_store_operations_total", &[("op", "write"), ("result", "ok")]).await;
        }
        let writes = writes as usize;
        assert!(writes <= endpoint.calls() + 1, "more writes ({writes}) than refreshes and the seed");
        if calls == endpoint.calls() && writes == calls + 1 {
            break;
        }
        last = (writes, calls + 1);
        assert!(Instant::now() < deadline, "one write per refresh, and the seed: {} vs {}", last.0, last.1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lags.len() as u64 >= seconds / 2, "too few refreshes observed: {lags:?}");
    let mut sorted = lags.clone();
    sorted.sort();
    let worst = sorted.last().copied().unwrap_or_default();
    eprintln!(
        "{replica_count} replicas, {seconds}s: {sent} requests, {} token endpoint calls, {} invalid_grant; \
         a new token reached every replica in {:?} (median) / {worst:?} (worst) over {} tokens",
        endpoint.calls(),
        endpoint.invalid_grants(),
        sorted[sorted.len() / 2],
        sorted.len()
    );
    assert!(worst <= Duration::from_secs(1), "a replica took {worst:?} to adopt a new token: {lags:?}");
    assert!(sent > 100, "{sent}");
    assert_eq!(endpoint.invalid_grants(), 0, "a refresh token was spent twice");
    // Two-second tokens are refreshed when half their life is left: one refresh a second for the
    // whole fleet, not one per replica (a replica whose refresh waited for the lock takes the
    // token the holder wrote); and none spent a refresh token twice (the strict rotation above
    // would have answered invalid_grant).
    let refreshes = endpoint.calls();
    assert!(
        refreshes as u64 <= seconds + 5,
        "{refreshes} token endpoint calls in {seconds}s by {replica_count} replicas: not one per token lifetime"
    );
    // Every replica is on the same token, at most a second after the last refresh.
    eventually(Duration::from_secs(1), "every replica on the newest token", || async {
        let mut prints = Vec::new();
        for proxy in &fleet {
            prints.push(fingerprint(proxy).await);
        }
        (prints.iter().all(|p| p.is_some() && *p == prints[0])).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_rotating_credential_under_load() {
    a_fleet_shares_one_rotating_credential(3, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_share_one_rotating_credential_under_load() {
    a_fleet_shares_one_rotating_credential(8, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_keeps_tokens_serving_spends_nothing_and_recovers_when_it_returns() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let mut redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.rotate = Rotation::Strict;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-seed");
    api.accept("at-seed");
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2099-01-01T00:00:00Z"}"#;
    let text = config(&api, &endpoint, &redis, "down", "");
    let fleet = replicas(dir.path(), 2, &text, seed);
    for proxy in &fleet {
        let r = proxy.client().get(api.url("/v1/data")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    redis.stop();
    // Serving goes on with the current token.
    load(&api, &fleet, Duration::from_secs(2)).await;
    // No refresh token is spent while its result could not be recorded.
    let calls = endpoint.calls();
    let forced = reqwest::Client::new()
        .post(format!("http://{}/tokens/api/refresh?force=true", fleet[0].admin))
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = forced.json().await.unwrap();
    assert!(body["reason"].as_str().unwrap().contains("unavailable"), "{body}");
    assert_eq!(endpoint.calls(), calls, "the token endpoint was called while Redis was down");
    let lock_errors =
        fleet[0].metric("tokenproxy_store_operations_total", &[("op", "lock"), ("result", "error")]).await;
    assert!(lock_errors >= 1.0, "{lock_errors}");
    let view = fleet[0].token_view("api").await;
    assert_eq!(view["last_refresh_result"], "store_unavailable", "{view}");
    let (status, ready) = fleet[1].admin_get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "tokens in hand keep the replica in service");
    assert!(ready.starts_with("ready; store_unavailable: token store"), "{ready}");
    // The class is said once, however many refreshes failed meanwhile.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let forced = reqwest::Client::new()
        .post(format!("http://{}/tokens/api/refresh?force=true", fleet[0].admin))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = forced.json().await.unwrap();
    let view = fleet[0].token_view("api").await;
    for said in [body["reason"].as_str().unwrap(), view["last_error"].as_str().unwrap()] {
        assert_eq!(said.matches("store_unavailable").count(), 1, "{said}");
    }
    // What to do is about Redis, not about folders and file permissions.
    let action = body["action"].as_str().unwrap();
    assert!(action.contains("reachable") && !action.contains("folder"), "{action}");

    redis.restart();
    // Recovery without a restart: the next forced refresh goes through and every replica adopts it.
    eventually(Duration::from_secs(15), "a refresh after Redis returns", || async {
        let r = reqwest::Client::new()
            .post(format!("http://{}/tokens/api/refresh?force=true", fleet[0].admin))
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(endpoint.invalid_grants(), 0);
    let refreshed_at = fleet[0].token_view("api").await["last_refresh_at"].as_str().unwrap().to_string();
    assert!(refreshed_at.ends_with('Z') && !refreshed_at.contains('.'), "whole seconds: {refreshed_at}");
    eventually(Duration::from_secs(5), "the other replica adopts the new token", || async {
        let (a, b) = (fingerprint(&fleet[0]).await, fingerprint(&fleet[1]).await);
        (a.is_some() && a == b && a.as_deref() != Some(fingerprint_of("at-seed").as_str())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_killed_mid_refresh_is_taken_over_after_lock_ttl() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    // A provider with a reuse interval: a refresh token whose answer was lost still works once.
    endpoint.rotate = Rotation::Grace;
    endpoint.delay = Duration::from_secs(3);
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-seed");
    api.accept("at-seed");
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2099-01-01T00:00:00Z"}"#;
    let text = config(&api, &endpoint, &redis, "kill", "lock_ttl = \"2s\"");
    let mut fleet = replicas(dir.path(), 2, &text, seed);

    // Replica 0 takes the lock and calls the slow token endpoint; it dies in the middle.
    let admin0 = fleet[0].admin;
    let holder = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(format!("http://{admin0}/tokens/api/refresh?force=true"))
            .send()
            .await;
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fleet[0].signal("KILL");
    holder.abort();
    let started = Instant::now();
    let taken_over = reqwest::Client::new()
        .post(format!("http://{}/tokens/api/refresh?force=true", fleet[1].admin))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(taken_over.status(), StatusCode::OK, "{}", taken_over.text().await.unwrap());
    assert!(started.elapsed() >= Duration::from_millis(500), "replica 1 waited for the dead holder's lock");
    assert_eq!(endpoint.invalid_grants(), 0);
    let r = fleet[1].client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let _ = fleet.remove(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_redis_are_sealed_and_a_restart_reads_them() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    endpoint.allow_refresh_token("rt-seed");
    let key = sealing_key(dir.path(), 5);
    let text = config(&api, &endpoint, &redis, "sealed", &format!("encryption_key_file = \"{key}\""));
    let seed =
        r#"{"access_token":"at-seed-secret","refresh_token":"rt-seed","expires_at":"2000-01-01T00:00:00Z"}"#;
    let mut fleet = replicas(dir.path(), 1, &text, seed);
    let r = fleet[0].client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let in_use = api.last().authorization().unwrap().trim_start_matches("Bearer ").to_string();
    let dump = redis.dump();
    assert!(dump.contains("sealed:token:api"), "{dump}");
    for secret in [in_use.as_str(), "rt-seed", "rt-1", "at-seed-secret"] {
        assert!(!dump.contains(secret), "{secret:?} in clear in Redis:\n{dump}");
    }
    // Once seeded, the store is the truth: an edit of the token file is not read (past the
    // watcher's 5 s poll).
    std::fs::write(dir.path().join("replica-0/api.json"), token_json("at-edited-file")).unwrap();
    api.accept("at-edited-file");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = fleet[0].client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(api.last().authorization(), Some(format!("Bearer {in_use}").as_str()));
    fleet[0].signal("TERM");
    assert_eq!(fleet[0].wait_exit(Duration::from_secs(10)), Some(0));
    drop(fleet);
    // A new replica (no token file of its own) reads the sealed token from Redis.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    let proxy = TokenProxy::start(&fresh, &text);
    let calls = endpoint.calls();
    let r = proxy.client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(api.last().authorization(), Some(format!("Bearer {in_use}").as_str()));
    assert_eq!(endpoint.calls(), calls);
}

/// Samples every replica's token every 50 ms for `duration`; for each token (`at-N`, by the
/// mock's numbering), the time from its first appearance on a replica until every replica holds
/// it or a newer one.
async fn adoption_lags(admins: Vec<std::net::SocketAddr>, duration: Duration) -> Vec<Duration> {
    let numbers: std::collections::HashMap<String, u64> =
        (0..10_000).map(|n| (fingerprint_of(&format!("at-{n}")), n)).collect();
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
    let started = Instant::now();
    let mut first_seen: std::collections::BTreeMap<u64, Instant> = Default::default();
    let mut lags = Vec::new();
    let mut done_up_to = 0;
    while started.elapsed() < duration {
        let mut held = Vec::new();
        for admin in &admins {
            let view: serde_json::Value = match client.get(format!("http://{admin}/tokens")).send().await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => continue,
            };
            let print = view[0]["fingerprint"].as_str().unwrap_or_default().to_string();
            held.push(numbers.get(&print).copied().unwrap_or(0));
        }
        let now = Instant::now();
        for n in &held {
            first_seen.entry(*n).or_insert(now);
        }
        let slowest = held.iter().min().copied().unwrap_or(0);
        if slowest <= done_up_to {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for (n, seen) in first_seen.range(done_up_to + 1..=slowest) {
            if *n > 0 {
                lags.push(now - *seen);
            }
        }
        done_up_to = done_up_to.max(slowest);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lags
}

/// Writes a 32-byte sealing key (every byte `byte`, base64) into `dir` and returns its path.
fn sealing_key(dir: &Path, byte: u8) -> String {
    use base64::Engine;
    let path = dir.join("key");
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap();
    path.display().to_string()
}

fn fingerprint_of(token: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(token.as_bytes())[..4])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_a_password_is_reached_with_password_file_and_refused_without() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let redis = RedisServer::start_with(dir.path(), &["--requirepass", "s3cret-redis-pw"]);
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    api.accept("at-seed");
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2099-01-01T00:00:00Z"}"#;
    std::fs::write(dir.path().join("redis-password"), "s3cret-redis-pw\n").unwrap();
    let password = dir.path().join("redis-password").display().to_string();
    let with = config(&api, &endpoint, &redis, "auth", &format!("password_file = \"{password}\""));
    let fleet = replicas(&dir.path().join("with"), 1, &with, seed);
    let r = fleet[0].client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for line in fleet[0].logs() {
        assert!(!line.contains("s3cret-redis-pw"), "{line}");
    }
    // The password file was written 0644 above: warned about, like every secret file.
    assert!(
        fleet[0]
            .logs()
            .iter()
            .any(|l| l.contains("the Redis password file") && l.contains("readable by everyone")),
        "{:?}",
        fleet[0].logs()
    );
    // Without the password: the store is unavailable, said clearly, and the password is not
    // what anyone sees either way.
    let without = config(&api, &endpoint, &redis, "auth", "");
    let lonely = replicas(&dir.path().join("without"), 1, &without, seed);
    let view = lonely[0].token_view("api").await;
    let error = view["last_error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("unavailable") && error.contains("redis://127.0.0.1"), "{view}");
}

/// `rediss://`: TLS to Redis, verified with the same roots as every other connection (the
/// system's plus `[tls] extra_roots`); without the Redis CA among them it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_is_verified_with_the_same_roots_as_everything_else() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let tls = RedisTls::generate(dir.path());
    let tls_port = fixed_port();
    let redis = RedisServer::start_with(dir.path(), &as_args(&tls.args(tls_port)));
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    api.accept("at-seed");
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2099-01-01T00:00:00Z"}"#;
    let tls_config = |roots: &str| {
        config(&api, &endpoint, &redis, "tls", "")
            .replace(&redis.url(), &format!("rediss://localhost:{tls_port}/0"))
            .replace("[store]", &format!("[tls]\nextra_roots = [{roots}]\n[store]"))
    };
    let trusted = replicas(
        &dir.path().join("trusted"),
        1,
        &tls_config(&format!("{:?}", tls.ca.display().to_string())),
        seed,
    );
    let r = trusted[0].client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(redis.dump().contains("tls:token:api"), "seeded into Redis over TLS");

    let untrusted = replicas(&dir.path().join("untrusted"), 1, &tls_config(""), seed);
    let view = untrusted[0].token_view("api").await;
    assert!(view["last_error"].as_str().unwrap_or_default().contains("unavailable"), "{view}");
}

/// Onboarding writes to the shared store: an account connected through one replica's /connect is
/// in Redis (sealed) and every replica serves it. With an encryption key the account's name is
/// in no key and no change message, only a keyed fingerprint (SPEC §11); the name is still
/// listed by `tokenproxy check`, and a refresh on one replica still reaches the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_connected_on_one_replica_is_served_by_every_replica() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    let key = sealing_key(dir.path(), 6);
    let admin_port = fixed_port();
    let text = config(&api, &endpoint, &redis, "connect", &format!("encryption_key_file = \"{key}\""))
        .replace("token_file = \"api.json\"", "token_file = \"tokens/{account}.json\"")
        + &format!("authorize_url = \"{}\"\n", endpoint.authorize_url());
    // Only the first replica's callback URL matters: the person connects there.
    for name in ["first", "second"] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
    }
    let first = TokenProxy::start(
        &dir.path().join("first"),
        &text.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\""),
        ),
    );
    let second =
        TokenProxy::start(&dir.path().join("second"), &text.replace("authorize_url", "# authorize_url"));
    // Every change message, as a subscriber of the channel sees it.
    let messages = dir.path().join("changes.txt");
    let mut subscriber = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "SUBSCRIBE", "connect:changes"])
        .stdout(std::fs::File::create(&messages).unwrap())
        .spawn()
        .unwrap();
    let mut browser = Browser::new();
    let callback = browser.consent(&format!("http://{}/connect/api?account={ADA}", first.admin)).await;
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"), "{page}");
    let dump = redis.dump();
    assert!(dump.contains("connect:token:api:#"), "a fingerprinted key: {dump}");
    assert!(!dump.contains("lovelace"), "the account's name in Redis: {dump}");
    assert!(!dump.contains("at-") && !dump.contains("rt-"), "sealed in Redis: {dump}");
    assert!(
        !dir.path().join(format!("first/tokens/{ADA}.json")).exists(),
        "written to the store, not a file"
    );
    let response =
        second.client().get(api.url("/v1/data")).header("tokenproxy-account", ADA).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(api.last().authorization().unwrap().starts_with("Bearer at-"));

    // A refresh on the first replica reaches the second through a message that names a
    // fingerprint: its /tokens shows the new token without a request or a refresh of its own.
    let account_fingerprint = |proxy: &TokenProxy| {
        let proxy_admin = proxy.admin;
        async move {
            let body = reqwest::get(format!("http://{proxy_admin}/tokens?provider=api")).await.unwrap();
            let all: Vec<serde_json::Value> = body.json().await.unwrap();
            let ada = all.into_iter().find(|v| v["account"] == ADA).expect("the account on /tokens");
            ada["fingerprint"].as_str().unwrap().to_string()
        }
    };
    // Both replicas and the test's subscriber on the feed, and the read that follows a
    // subscription done: what the second learns from now on, it learns from a message.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let subscribed = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "PUBSUB", "NUMSUB", "connect:changes"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&subscribed.stdout).lines().nth(1) == Some("3") {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas never subscribed to the change feed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = account_fingerprint(&second).await;
    let (refreshed, body) = first.admin_post(&format!("/tokens/api/refresh?account={ADA}")).await;
    assert_eq!(refreshed, StatusCode::OK, "{body}");
    let calls = endpoint.calls();
    let after = account_fingerprint(&first).await;
    assert_ne!(after, before);
    let deadline = Instant::now() + Duration::from_secs(20);
    while account_fingerprint(&second).await != after {
        assert!(Instant::now() < deadline, "the second replica never learned of the refresh");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // By the message, not by the 5 s poll that would find it too: the read that loaded the new
    // token was one the change feed started (its watcher logs where each read comes from). A
    // log, not a clock, so that a loaded machine cannot make the poll win the race.
    let logs = second.logs();
    let loaded = logs
        .iter()
        .position(|l| l.contains("token loaded from file") && l.contains(&after))
        .expect("the second replica's log of loading the refreshed token");
    let started_by = logs[..loaded].iter().rev().find(|l| l.contains("reading changed tokens"));
    assert!(
        started_by.is_some_and(|l| l.contains("\"source\":\"event\"")),
        "the second replica did not learn of the refresh by its message: {started_by:?}"
    );
    assert_eq!(endpoint.calls(), calls, "adopted, not refreshed again");
    let _ = subscriber.kill();
    let _ = subscriber.wait();
    let seen = std::fs::read_to_string(&messages).unwrap();
    assert!(seen.contains("api\n#"), "change messages name a fingerprint: {seen:?}");
    assert!(!seen.contains("lovelace"), "the account's name in a change message: {seen:?}");

    // The name is still listed, from its sealed copy in the store.
    let config_path = dir.path().join("second/tokenproxy.toml");
    let check =
        std::process::Command::new(binary()).args(["check", "--config"]).arg(&config_path).output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.lines().any(|l| l.contains(ADA) && l.contains("valid")), "{out}");
}

const ADA: &str = "ada.lovelace";

/// A fleet that configures an encryption key after its accounts were stored under their names
/// (or upgrades from a version that stored them so) keeps them: the first read moves each one to
/// its fingerprinted key, and the name leaves Redis's key space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_stored_under_their_names_move_to_fingerprints_when_a_key_is_configured() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let redis = RedisServer::start(dir.path());
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    api.accept("at-stored-by-name");
    let doc = r#"{"access_token":"at-stored-by-name","expires_at":"2099-01-01T00:00:00Z"}"#;
    let stored = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "HSET",
            &format!("moved:token:api:{ADA}"),
            "doc",
            doc,
            "version",
            "77",
        ])
        .output()
        .unwrap();
    assert!(stored.status.success());
    let key = sealing_key(dir.path(), 9);
    let text = config(&api, &endpoint, &redis, "moved", &format!("encryption_key_file = \"{key}\""))
        .replace("token_file = \"api.json\"", "token_file = \"tokens/{account}.json\"");
    let proxy = TokenProxy::start(dir.path(), &text);
    let r = proxy.client().get(api.url("/v1/data")).header("tokenproxy-account", ADA).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(api.last().authorization(), Some("Bearer at-stored-by-name"));
    assert_eq!(endpoint.calls(), 0, "the stored token was found, not replaced");
    let dump = redis.dump();
    assert!(dump.contains("moved:token:api:#"), "{dump}");
    assert!(!dump.contains("lovelace"), "the name is still in Redis: {dump}");
}

/// A Redis that lost its data (FLUSHALL, or a restart without persistence) is re-seeded from the
/// old token file by whichever replica reads first; the replicas that hold the newer token write
/// it back instead of adopting the seed, so the fleet never spends a rotated refresh token again
/// (SPEC §11). The mock provider rotates strictly: a spent refresh token is `invalid_grant`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_never_rolls_the_fleet_back_to_a_spent_refresh_token() {
    let Some((dir, redis, api, endpoint)) = rotating_provider().await else { return };
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2000-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}"#;
    let text = config(&api, &endpoint, &redis, "lost", "lock_ttl = \"5s\"");
    let fleet = replicas(dir.path(), 3, &text, seed);
    load(&api, &fleet, Duration::from_secs(3)).await;
    eventually(Duration::from_secs(10), "a few rotations", || async {
        (endpoint.calls() >= 2).then_some(())
    })
    .await;

    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&flushed.stdout).contains("OK"), "{flushed:?}");
    // The fleet goes on: every request served, refreshes continue from the newest token.
    let calls = endpoint.calls();
    load(&api, &fleet, Duration::from_secs(5)).await;
    eventually(Duration::from_secs(10), "refreshes after the loss", || async {
        (endpoint.calls() >= calls + 2).then_some(())
    })
    .await;
    if endpoint.invalid_grants() != 0 {
        for (i, proxy) in fleet.iter().enumerate() {
            for line in proxy.logs() {
                if !line.contains("\"DEBUG\"") || line.contains("refresh") || line.contains("store") {
                    eprintln!("replica {i}: {line}");
                }
            }
        }
    }
    assert_eq!(endpoint.invalid_grants(), 0, "a spent refresh token was sent again after the loss");
    for proxy in &fleet {
        let view = proxy.token_view("api").await;
        assert_ne!(view["state"], "needs_reauth", "{view}");
        assert_ne!(view["fingerprint"], fingerprint_of("at-seed"), "{view}");
    }
    let stored = redis.dump();
    assert!(!stored.contains("rt-seed"), "the stale seed is in the store: {stored}");
    assert!(fleet.iter().any(|p| p.logs().iter().any(|l| l.contains("writing this replica's back"))));
}
