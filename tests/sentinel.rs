//! A fleet on Redis Sentinel (SPEC §11): three tokenproxy processes share one strictly rotating
//! credential (two-second tokens; a spent refresh token is `invalid_grant`) through a primary,
//! two replicas and three real sentinels, under load, while the primary is killed, a primary
//! is frozen for longer than the sentinels wait and comes back stale, and a replica restarts
//! empty. No refresh token is spent twice, the replicas follow every promotion, and requests
//! fail only in a bounded window after each fault.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// How long the sentinels let a primary not answer before they fail it over.
const DOWN_AFTER: Duration = Duration::from_millis(1500);
/// SPEC §11: every replica follows a failover within this of the promotion.
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);

/// Requests spread over the fleet until `stop`: when each failed, after `started`.
async fn load(
    api: MockApi,
    clients: Vec<reqwest::Client>,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> (usize, Vec<(Duration, String)>) {
    let mut failures = Vec::new();
    let mut sent = 0;
    // Bounded in time and in count.
    while !stop.load(Ordering::Relaxed) && sent < 50_000 && started.elapsed() < Duration::from_secs(180) {
        let client = &clients[sent % clients.len()];
        let at = started.elapsed();
        match client.get(api.url("/v1/data")).timeout(Duration::from_secs(15)).send().await {
            Ok(response) if response.status().is_success() => {}
            Ok(response) => failures.push((at, response.status().to_string())),
            Err(e) => failures.push((at, e.to_string())),
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (sent, failures)
}

/// Waits until every replica has followed `count` failovers; returns how long that took.
async fn followed(fleet: &[TokenProxy], count: f64) -> Duration {
    let started = Instant::now();
    for proxy in fleet {
        loop {
            let seen = proxy
                .metric("tokenproxy_store_operations_total", &[("op", "failover"), ("result", "ok")])
                .await;
            if seen >= count {
                break;
            }
            assert!(
                started.elapsed() < FOLLOW_WITHIN * 2,
                "a replica has followed {seen} failovers, not {count}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_keeps_a_rotating_credential_through_sentinel_failovers() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let mut setup = SentinelSetup::start(dir.path(), 2, DOWN_AFTER);
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.rotate = Rotation::Strict;
    endpoint.expires_in = Some(2);
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-seed");
    api.accept("at-seed");
    // Passwords as in production: one for the data nodes, another for the sentinels.
    let (node_password, sentinel_password) =
        (dir.path().join("node-password"), dir.path().join("sentinel-password"));
    std::fs::write(&node_password, NODE_PASSWORD).unwrap();
    std::fs::write(&sentinel_password, SENTINEL_PASSWORD).unwrap();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\nkind = \"redis\"\nsentinels = {}\nmaster_name = \"{MASTER_NAME}\"\nmin_replicas_ack = 1\n\
         lock_ttl = \"5s\"\npassword_file = {:?}\nsentinel_password_file = {:?}\n\
         [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{}",
        setup.toml_list(),
        node_password.display().to_string(),
        sentinel_password.display().to_string(),
        api.authority(),
        endpoint.oauth_toml("api", "refresh_token")
    );
    let fleet: Vec<TokenProxy> = (0..3)
        .map(|i| {
            let folder = dir.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&folder).unwrap();
            if i == 0 {
                let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2000-01-01T00:00:00Z"}"#;
                std::fs::write(folder.join("api.json"), seed).unwrap();
            }
            TokenProxy::start(&folder, &config)
        })
        .collect();
    // The fleet on the first primary, with a refreshed token.
    eventually(Duration::from_secs(20), "the fleet serving", || async {
        for proxy in &fleet {
            let response = proxy.client().get(api.url("/v1/data")).send().await.ok()?;
            response.status().is_success().then_some(())?;
        }
        Some(())
    })
    .await;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = fleet.iter().map(TokenProxy::client).collect();
    let load = tokio::spawn(load(api.clone(), clients, started, stop.clone()));
    let mut faults = Vec::new();
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 1. The primary dies.
    let first = setup.nodes[0].port;
    faults.push(("primary killed", started.elapsed()));
    setup.node(first).stop();
    let second = setup.wait_for_failover(first, Duration::from_secs(30));
    let promoted = started.elapsed();
    let lag_1 = followed(&fleet, 1.0).await;
    eprintln!(
        "killed primary: promotion {:?} after the kill; every replica followed {lag_1:?} after it",
        promoted - faults[0].1
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    // 2. It comes back empty, as a replica of the new primary (its config rewritten by the
    //    sentinels); the next fault waits until both replicas are in sync again.
    faults.push(("old primary back empty", started.elapsed()));
    setup.node(first).stop_and_wipe();
    setup.node(first).replicate(second);
    setup.node(first).restart();
    setup.wait_replicas(second, 2, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 3. The new primary freezes for longer than the sentinels wait, and comes back stale.
    faults.push(("primary frozen", started.elapsed()));
    setup.node(second).freeze(true);
    // While the primary does not answer, /readyz says so (and stays 200: tokens in hand serve).
    eventually(Duration::from_secs(10), "/readyz naming store_unavailable", || async {
        let (status, body) = fleet[0].admin_get("/readyz").await;
        (status.is_success() && body.contains("store_unavailable")).then_some(())
    })
    .await;
    let third = setup.wait_for_failover(second, Duration::from_secs(30));
    let lag_2 = followed(&fleet, 2.0).await;
    eprintln!(
        "frozen primary: promotion of {third} {:?} after the freeze; every replica followed {lag_2:?} after it",
        started.elapsed() - faults[2].1 - lag_2
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.node(second).freeze(false);
    faults.push(("stale primary resumed", started.elapsed()));
    // The sentinels turn it into a replica of the new primary.
    setup.wait_replicas(third, 2, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 4. A replica restarts empty (and syncs again in full).
    let replica = setup.nodes.iter().map(|n| n.port).find(|p| *p != third).unwrap();
    faults.push(("replica restarted empty", started.elapsed()));
    setup.node(replica).stop_and_wipe();
    setup.node(replica).replicate(third);
    setup.node(replica).restart();
    tokio::time::sleep(Duration::from_secs(6)).await;

    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = load.await.unwrap();
    eprintln!(
        "{sent} requests, {} failed; {} token endpoint calls; faults at {faults:?}",
        failures.len(),
        endpoint.calls()
    );
    for (at, what) in &failures {
        eprintln!("  failed at {at:?}: {what}");
    }
    if std::env::var_os("SENTINEL_TEST_LOGS").is_some() {
        for (i, proxy) in fleet.iter().enumerate() {
            for line in proxy.logs() {
                eprintln!("replica-{i}: {line}");
            }
        }
    }

    // Never a refresh token spent twice, by any replica.
    assert_eq!(endpoint.invalid_grants(), 0, "a spent refresh token was sent again");
    // The fleet kept refreshing: about one refresh per token lifetime's half, not one per replica.
    let seconds = started.elapsed().as_secs() as usize;
    assert!(endpoint.calls() >= seconds / 3, "{} refreshes in {seconds}s", endpoint.calls());
    assert!(endpoint.calls() <= seconds * 2, "{} refreshes in {seconds}s", endpoint.calls());
    // Requests fail only in the window after a fault that leaves the fleet without a primary.
    let window = DOWN_AFTER + FOLLOW_WITHIN;
    for (at, what) in &failures {
        let after_fault = faults.iter().any(|(_, fault)| *at >= *fault && *at <= *fault + window);
        assert!(after_fault, "a request failed at {at:?}, outside every fault's window: {what}");
    }
    // Every replica on the newest token, on the new primary.
    eventually(Duration::from_secs(5), "every replica on the same token", || async {
        let mut prints = Vec::new();
        for proxy in &fleet {
            prints.push(proxy.token_view("api").await["fingerprint"].as_str().map(str::to_string));
        }
        prints.iter().all(|p| p.is_some() && *p == prints[0]).then_some(())
    })
    .await;
    for proxy in &fleet {
        let (status, body) = proxy.admin_get("/readyz").await;
        assert!(status.is_success() && !body.contains("store_unavailable"), "{status} {body}");
    }
}

/// `tokenproxy check` on a config: whether it passed, and what it printed.
/// SPEC §11 `min_replicas_ack`, with real Redis `WAIT`: the only replica freezes while a
/// refresh's token request is in flight (its lock was acknowledged). The rotated token's write is
/// not acknowledged, so the refresh fails with `store_unavailable` and the current token keeps
/// serving; once the replica answers again the held token is written again and used, and its
/// refresh token was spent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_replica_acknowledged_is_used_only_once_one_does_and_spends_its_refresh_token_once() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let (primary_dir, replica_dir) = (dir.path().join("primary"), dir.path().join("replica"));
    std::fs::create_dir_all(&primary_dir).unwrap();
    std::fs::create_dir_all(&replica_dir).unwrap();
    let primary = RedisServer::start(&primary_dir);
    let replica =
        RedisServer::start_with(&replica_dir, &["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    eventually(Duration::from_secs(30), "the replica in sync", || async {
        let info = std::process::Command::new("redis-cli")
            .args(["-p", &primary.port.to_string(), "info", "replication"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&info.stdout).contains("state=online").then_some(())
    })
    .await;

    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.rotate = Rotation::Strict;
    endpoint.hold = true;
    let endpoint = endpoint.start().await;
    endpoint.allow_refresh_token("rt-seed");
    api.accept("at-seed");
    // Valid for ten minutes, but inside the refresh margin: refreshed in the background at start.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::minutes(10);
    let expires = expires.format(&time::format_description::well_known::Rfc3339).unwrap();
    std::fs::write(
        dir.path().join("api.json"),
        format!(r#"{{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"{expires}"}}"#),
    )
    .unwrap();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\nmin_replicas_ack = 1\nlock_ttl = \"5s\"\n\
         [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{}\
         refresh_before = \"30m\"\n",
        primary.url(),
        api.authority(),
        endpoint.oauth_toml("api", "refresh_token")
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let bearer = || {
        let request = tp.client().get(api.url("/whoami"));
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.text().await.unwrap()
        }
    };

    // The refresh holds its lock (acknowledged by the replica) and waits for the token endpoint.
    eventually(Duration::from_secs(20), "the refresh's token request", || async {
        (endpoint.arrivals() == 1).then_some(())
    })
    .await;
    replica.freeze(true);
    endpoint.release();
    eventually(Duration::from_secs(20), "the write refused as unacknowledged", || async {
        let unacknowledged = tp
            .metric("tokenproxy_store_operations_total", &[("op", "write"), ("result", "unacknowledged")])
            .await;
        (unacknowledged >= 1.0).then_some(())
    })
    .await;
    assert_eq!(endpoint.calls(), 1);
    let view = tp.token_view("api").await;
    assert!(view.to_string().contains("store_unavailable"), "{view}");
    let (status, ready) = tp.admin_get("/readyz").await;
    assert!(
        status.is_success()
            && ready.contains("store_unavailable: api: ")
            && ready.contains("not acknowledged"),
        "{status} {ready}"
    );
    // Not acknowledged, so not used: a failover now could take the write back.
    for _ in 0..5 {
        assert_eq!(bearer().await, "Bearer at-seed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The replica answers again: the held token is written again, acknowledged, and used.
    replica.freeze(false);
    let fresh = eventually(Duration::from_secs(30), "the refreshed token in use", || async {
        let seen = bearer().await;
        (seen != "Bearer at-seed").then_some(seen)
    })
    .await;
    let fresh = fresh.strip_prefix("Bearer ").unwrap().to_string();
    assert_eq!(endpoint.calls(), 1, "the refresh token was spent once");
    assert_eq!(endpoint.invalid_grants(), 0);
    assert!(replica.dump().contains(&fresh), "the replica holds the token in use");
    let logs = tp.logs();
    assert!(logs.iter().any(|l| l.contains("its last write was not acknowledged")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("write is acknowledged now; it is in use")), "{logs:?}");
    // Healthy again: /tokens and /readyz no longer name the store.
    let view = tp.token_view("api").await;
    assert!(view["last_error"].is_null() && view["fingerprint"] != "", "{view}");
    let (status, ready) = tp.admin_get("/readyz").await;
    assert_eq!((status.as_u16(), ready.as_str()), (200, "ready\n"));
}

fn check(dir: &std::path::Path, store: &str) -> (bool, String) {
    let config = dir.join("tokenproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"redis\"\n{store}\n\
             [providers.api]\nhosts = [\"api.test\"]\ntoken_file = \"api.json\"\n"
        ),
    )
    .unwrap();
    let out =
        std::process::Command::new(binary()).arg("check").arg("--config").arg(&config).output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn sentinel_settings_that_cannot_work_are_named_and_passwords_never_shown() {
    let dir = tempdir();
    std::fs::write(dir.path().join("sentinel-password"), "s3ntinel-secret\n").unwrap();
    for (store, expected) in [
        ("sentinels = [\"127.0.0.1:26379\"]", "store.master_name: required with sentinels"),
        (
            "sentinels = [\"127.0.0.1\"]\nmaster_name = \"tp\"",
            "store.sentinels: \"127.0.0.1\" is not host:port",
        ),
        ("sentinels = [\"127.0.0.1:0\"]\nmaster_name = \"tp\"", "is not host:port"),
        ("master_name = \"tp\"\nurl = \"redis://127.0.0.1:6379/0\"", "are for sentinels = [...]"),
        (
            "sentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"tp\"\nsentinel_password_file = \"missing\"",
            "store.sentinel_password_file",
        ),
        (
            "sentinels = [\"127.0.0.1:26379\"]\nmaster_name = \"tp\"\nmin_replicas_ack = -1",
            "min_replicas_ack",
        ),
    ] {
        let (ok, text) = check(dir.path(), store);
        assert!(!ok && text.contains(expected), "{store:?}: {expected:?} missing from:\n{text}");
    }
    // A good one passes, shows the sentinels and the master name, never the password.
    let (_, text) = check(
        dir.path(),
        "sentinels = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nmaster_name = \"tp\"\n\
         sentinel_password_file = \"sentinel-password\"\nmin_replicas_ack = 1",
    );
    assert!(!text.contains("problem: store"), "{text}");
    assert!(!text.contains("s3ntinel-secret"), "the sentinel password is shown: {text}");
    // Outside kind = "redis" the keys mean nothing, and say so.
    std::fs::write(
        dir.path().join("file.toml"),
        "[store]\nmin_replicas_ack = 1\n[providers.api]\nhosts = [\"api.test\"]\ntoken_file = \"api.json\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("file.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("are for kind = \"redis\""), "{text}");
}

/// `rediss://` with sentinels (SPEC §11: TLS as without them): the sentinels and the data nodes
/// are reached over TLS, verified with the same roots as every other connection (a node is named
/// by IP address, so its certificate must name that address), and a failover is followed over
/// TLS too. Without the Redis CA among the roots, nothing is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_nodes_over_tls_are_verified_and_followed() {
    if !redis_available() {
        return;
    }
    let dir = tempdir();
    let tls = RedisTls::generate(dir.path());
    let mut setup = SentinelSetup::start_tls(dir.path(), 1, DOWN_AFTER, &tls);
    let api = MockApi::start().await;
    let endpoint = MockTokenEndpoint::new(Some(&api)).start().await;
    endpoint.allow_refresh_token("rt-seed");
    let (node_password, sentinel_password) =
        (dir.path().join("node-password"), dir.path().join("sentinel-password"));
    std::fs::write(&node_password, NODE_PASSWORD).unwrap();
    std::fs::write(&sentinel_password, SENTINEL_PASSWORD).unwrap();
    let sentinels = setup.toml_list();
    let config = |roots: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nextra_roots = [{roots}]\n\
             [store]\nkind = \"redis\"\nurl = \"rediss://127.0.0.1/0\"\nsentinels = {}\nmaster_name = \"{MASTER_NAME}\"\n\
             key_prefix = \"tls\"\npassword_file = {:?}\nsentinel_password_file = {:?}\n\
             [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n{}",
            sentinels,
            node_password.display().to_string(),
            sentinel_password.display().to_string(),
            api.authority(),
            endpoint.oauth_toml("api", "refresh_token")
        )
    };
    let seed = r#"{"access_token":"at-seed","refresh_token":"rt-seed","expires_at":"2000-01-01T00:00:00Z"}"#;
    let trusted_dir = dir.path().join("trusted");
    std::fs::create_dir_all(&trusted_dir).unwrap();
    std::fs::write(trusted_dir.join("api.json"), seed).unwrap();
    let proxy = TokenProxy::start(&trusted_dir, &config(&format!("{:?}", tls.ca.display().to_string())));
    // The expired seed is refreshed, and the refresh written to the primary, over TLS.
    let r = proxy.client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), http::StatusCode::OK);
    assert_eq!(endpoint.calls(), 1);
    assert!(setup.keys(setup.nodes[0].port).contains("tls:token:api"), "written to the first primary");

    // The primary dies; the proxy follows the promotion over TLS and writes there.
    let first = setup.nodes[0].port;
    setup.node(first).stop();
    let second = setup.wait_for_failover(first, Duration::from_secs(30));
    followed(std::slice::from_ref(&proxy), 1.0).await;
    let (refreshed, body) = proxy.admin_post("/tokens/api/refresh").await;
    assert_eq!(refreshed, http::StatusCode::OK, "{body}");
    let r = proxy.client().get(api.url("/v1/data")).send().await.unwrap();
    assert_eq!(r.status(), http::StatusCode::OK);
    let written = setup.keys(second);
    assert!(written.contains("tls:token:api"), "{written}");

    // Without the CA among the roots, neither sentinels nor nodes are trusted.
    let untrusted_dir = dir.path().join("untrusted");
    std::fs::create_dir_all(&untrusted_dir).unwrap();
    let untrusted = TokenProxy::start(&untrusted_dir, &config(""));
    let view = eventually(Duration::from_secs(20), "the untrusted store's error", || async {
        let view = untrusted.token_view("api").await;
        view["last_error"].as_str().filter(|e| !e.is_empty()).map(|_| view.clone())
    })
    .await;
    let error = view["last_error"].as_str().unwrap();
    assert!(error.contains("no sentinel names a primary") && error.contains("certificate"), "{view}");
    assert!(!error.contains(SENTINEL_PASSWORD) && !error.contains(NODE_PASSWORD), "{view}");
}
