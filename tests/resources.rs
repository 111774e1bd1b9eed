//! Bounded resources: memory for replay copies, connections per listener, and an accept loop
//! that stays calm when the process runs out of file descriptors.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncWriteExt;

const TOKEN: &str = "tok-res-9f8e7d6c";

/// Sends `n` concurrent 1 MiB POSTs to the mock's one-second `/slow` and returns the proxy's RSS
/// growth at its peak and once the requests are done, in MiB.
async fn rss_growth_under_uploads(tp: &TokenProxy, mock: &MockApi, n: usize) -> (f64, f64) {
    let before = tp.rss_kib();
    let body = bytes::Bytes::from(vec![b'u'; 1024 * 1024]);
    let client = tp.client();
    let uploads = (0..n).map(|_| {
        let request = client.post(mock.url("/slow")).body(body.clone());
        async move { request.send().await.map(|r| r.status().as_u16()) }
    });
    let uploads = tokio::spawn(futures_util::future::join_all(uploads));
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !uploads.is_finished() && Instant::now() < deadline {
        peak = peak.max(tp.rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let statuses = uploads.await.unwrap();
    assert!(statuses.iter().all(|s| matches!(s, Ok(200))), "every upload went through");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = tp.rss_kib();
    let mib = |kib: u64| kib.saturating_sub(before) as f64 / 1024.0;
    (mib(peak), mib(after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_budget_bounds_memory_under_many_large_uploads_to_a_slow_provider() {
    const UPLOADS: usize = 200;
    // Unbounded (the budget larger than everything at once), then bounded, in one run.
    let dir = tempdir();
    let mock = MockApi::start().await;
    let unbounded = proxy_with_token(dir.path(), &mock, TOKEN, "max_replay_total = 1073741824");
    let (unbounded_peak, unbounded_after) = rss_growth_under_uploads(&unbounded, &mock, UPLOADS).await;
    drop(unbounded);
    let dir = tempdir();
    let bounded = proxy_with_token(dir.path(), &mock, TOKEN, "max_replay_total = 16777216");
    let start_kib = bounded.rss_kib();
    let (bounded_peak, bounded_after) = rss_growth_under_uploads(&bounded, &mock, UPLOADS).await;
    // A second burst: freed memory stays with the allocator, and is reused rather than added to.
    let (second_peak, _) = rss_growth_under_uploads(&bounded, &mock, UPLOADS).await;
    let second_over_start = (bounded.rss_kib().saturating_sub(start_kib)) as f64 / 1024.0;
    eprintln!(
        "{UPLOADS} concurrent 1 MiB uploads, RSS growth: unbounded peak {unbounded_peak:.1} MiB, after {unbounded_after:.1} MiB; \
         16 MiB budget peak {bounded_peak:.1} MiB, after {bounded_after:.1} MiB; a second burst added {second_peak:.1} MiB \
         ({second_over_start:.1} MiB over the start in all)"
    );
    assert!(second_peak < 16.0, "a second burst grew RSS by {second_peak:.1} MiB: memory is not reused");
    assert!(
        unbounded_peak > 100.0,
        "the uploads did not hold their copies at once ({unbounded_peak:.1} MiB)"
    );
    assert!(
        bounded_peak < unbounded_peak / 2.0 && bounded_peak < 80.0,
        "the budget did not bound memory: {bounded_peak:.1} MiB against {unbounded_peak:.1} MiB unbounded"
    );
    assert!(bounded_after < 80.0, "{bounded_after:.1} MiB stayed resident");
}

#[tokio::test]
async fn a_request_that_finds_the_replay_budget_spent_streams_on_and_is_not_replayable() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    // The provider rejects the token; without a copy the request cannot be retried.
    mock.accept_only(&[]);
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "max_replay_total = 1000");
    let r = tp.client().post(mock.url("/upload")).body(vec![b'x'; 10_000]).send().await.unwrap();
    assert_eq!(r.status(), 401, "the original answer, not a retry");
    assert_eq!(mock.last().body.len(), 10_000, "the body streamed whole");
    let not_replayable = [("provider", "api"), ("result", "not_replayable")];
    assert_eq!(tp.metric("tokenproxy_retries_total", &not_replayable).await, 1.0);
}

#[tokio::test]
async fn at_max_connections_new_connections_wait_and_a_tunnel_keeps_its_place() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let tp = proxy_with_token(dir.path(), &mock, TOKEN, "max_connections = 2");
    // Two places taken: one idle connection, one tunnel to a host that matches no provider.
    let idle = tokio::net::TcpStream::connect(tp.proxy).await.unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut tunnel = tokio::net::TcpStream::connect(tp.proxy).await.unwrap();
    let to = silent.local_addr().unwrap();
    tunnel.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes()).await.unwrap();
    let _far_end = silent.accept().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = || {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(tp.proxy_url()).unwrap())
            .timeout(Duration::from_millis(700))
            .build()
            .unwrap()
    };
    assert!(client().get(mock.url("/third")).send().await.is_err(), "a third connection was served");
    drop(idle);
    eventually(Duration::from_secs(5), "a place to free up", || async {
        client().get(mock.url("/now")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    assert!(
        tp.logs().iter().filter(|l| l.contains("connection limit reached")).count() >= 1,
        "the limit was not logged"
    );
}

#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_logs_once_per_interval() {
    let dir = tempdir();
    let mock = MockApi::start().await;
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    let tp = TokenProxy::start_with_fd_limit(dir.path(), &mock.plain_config(&token_file, ""), 48);
    // More connections than descriptors: accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(stream) = tokio::net::TcpStream::connect(tp.proxy).await {
            held.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let complaints = tp.logs().iter().filter(|l| l.contains("accepting connections fails")).count();
    assert!(
        (1..=2).contains(&complaints),
        "{complaints} log lines about failed accepts in 2 s (one per interval expected)"
    );
    drop(held);
    eventually(Duration::from_secs(10), "the proxy to serve again", || async {
        let r = tp.client().get(mock.url("/again")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// The transparent listener accepts under the same bounds as the others (SPEC §5): out of file
/// descriptors, it backs off and says so at most once per interval, with a count (it logged
/// every 50 ms before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transparent_listener_stays_calm_out_of_file_descriptors() {
    if !client_available("prlimit", std::process::Command::new("prlimit").arg("--version")) {
        return;
    }
    let dir = tempdir();
    let mock = MockApi::start().await;
    let token_file = dir.path().join("api.json");
    std::fs::write(&token_file, token_json(TOKEN)).unwrap();
    let port = fixed_port();
    let config =
        format!("{}[transparent]\nlisten = \"127.0.0.1:{port}\"\n", mock.plain_config(&token_file, ""));
    let tp = TokenProxy::start_with_fd_limit(dir.path(), &config, 48);
    // The descriptors go to connections held on the proxy port; then the transparent listener
    // is asked to accept more.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(stream) = tokio::net::TcpStream::connect(tp.proxy).await {
            held.push(stream);
        }
    }
    for _ in 0..40 {
        if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            held.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let complaints: Vec<String> = tp
        .logs()
        .into_iter()
        .filter(|l| l.contains("accepting connections fails") && l.contains("\"transparent\""))
        .collect();
    assert!((1..=2).contains(&complaints.len()), "{} lines in 2 s: {complaints:?}", complaints.len());
    assert!(complaints[0].contains("\"failures\""), "{}", complaints[0]);
    drop(held);
    eventually(Duration::from_secs(10), "the proxy to serve again", || async {
        let r = tp.client().get(mock.url("/again")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// `[proxy] workers`: the runtime's worker threads, by default one per core the process may use
/// (its CPU affinity here), as the startup line says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_count_is_a_setting_and_follows_the_cores_the_process_may_use() {
    let mock = MockApi::start().await;
    let workers_of = |proxy: &TokenProxy| {
        let logs = proxy.logs();
        let line =
            logs.iter().find(|l| l.contains("\"listener\":\"proxy\"")).expect("the proxy's listening line");
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        line["workers"].as_u64().expect("workers on the listening line")
    };
    let config = |extra: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [providers.api]\nhosts = [\"{}\"]\ntoken_file = \"api.json\"\nallow_plaintext = true\n",
            mock.authority()
        )
    };
    let setup = || {
        let dir = tempdir();
        std::fs::write(dir.path().join("api.json"), token_json("at-1")).unwrap();
        dir
    };
    let dir = setup();
    let three = TokenProxy::start(dir.path(), &config("workers = 3"));
    assert_eq!(workers_of(&three), 3);
    // Three threads of its own serve the proxy listener (named so in /proc), and every
    // connection, whichever thread it lands on, is served.
    let threads = std::fs::read_dir(format!("/proc/{}/task", three.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("tokenproxy-work"))
        .count();
    assert_eq!(threads, 3);
    for _ in 0..12 {
        // A new connection each time: the kernel spreads them over the three sockets.
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}", three.proxy)).unwrap())
            .build()
            .unwrap();
        let r = client.get(mock.url("/v1/data")).send().await.unwrap();
        assert_eq!(r.status(), http::StatusCode::OK);
    }
    // The address is its own: another tokenproxy with workers of its own cannot share it.
    let dir_two = setup();
    let same_port = config("workers = 2")
        .replace("listen = \"127.0.0.1:0\"\nworkers", &format!("listen = \"{}\"\nworkers", three.proxy));
    assert!(same_port.contains(&three.proxy.to_string()));
    std::fs::write(dir_two.path().join("tokenproxy.toml"), &same_port).unwrap();
    let mut second = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(dir_two.path().join("tokenproxy.toml"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second tokenproxy started and serves on {}", three.proxy);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut text).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains(&format!("cannot listen on {}", three.proxy)), "{text}");

    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let dir = setup();
    let default = TokenProxy::start(dir.path(), &config(""));
    assert_eq!(workers_of(&default), cores);

    if client_available("taskset", std::process::Command::new("taskset").arg("-V")) {
        let dir = setup();
        let pinned = TokenProxy::start_on_one_cpu(dir.path(), &config(""));
        assert_eq!(workers_of(&pinned), 1, "one CPU allowed: one worker");
        let r = pinned.client().get(mock.url("/v1/data")).send().await.unwrap();
        assert_eq!(r.status(), http::StatusCode::OK);
    }

    let dir = setup();
    std::fs::write(dir.path().join("tokenproxy.toml"), config("workers = 100000")).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(dir.path().join("tokenproxy.toml"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("proxy.workers must be at most 1024"), "{text}");
}
