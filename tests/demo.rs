//! `tokenproxy demo` tells the whole story on loopback and exits 0 on Ctrl-C.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_shows_injection_refresh_and_retry_then_stops_cleanly_on_ctrl_c() {
    let mut child = Command::new(support::binary())
        .arg("demo")
        .env_remove("TOKENPROXY_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let mut out = Vec::new();
    while !out.iter().any(|l: &String| l.starts_with("Ctrl-C")) {
        match rx.recv_timeout(Duration::from_secs(10).saturating_sub(started.elapsed())) {
            Ok(line) => out.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not finish its story within 10 s:\n{}", out.join("\n"));
            }
        }
    }
    let text = out.join("\n");
    assert!(text.contains("answered 401") && text.contains("retried: 200"), "{text}");
    assert!(text.contains("the application saw only: 200 OK"), "{text}");
    assert!(text.contains("state valid, 2 refreshes, 1 retry,"), "{text}");
    assert!(
        text.contains("4. An HTTPS call") && text.contains("/v1/me through the proxy -> 200 OK"),
        "{text}"
    );
    assert_eq!(text.matches("-> 200 OK").count(), 3, "{text}");
    assert!(
        text.contains("5. A person connects the provider")
            && text.contains("the callback answered 200 OK (ok)"),
        "{text}"
    );
    assert!(
        !text.contains("demo-access-") && !text.contains("demo-refresh-"),
        "no token value in the output"
    );

    // The printed commands work as printed, the HTTPS one included.
    let commands: Vec<&str> =
        text.lines().map(str::trim).filter(|l| l.starts_with("curl ") && l.contains(" -x ")).collect();
    assert_eq!(commands.len(), 2, "{text}");
    if support::curl_available() {
        for command in commands {
            let args: Vec<&str> = command.split_whitespace().skip(1).collect();
            let out = Command::new("curl")
                .args(["-sS", "--fail-with-body", "--max-time", "10"])
                .args(&args)
                .output()
                .unwrap();
            let body = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{command}: {body}{}", String::from_utf8_lossy(&out.stderr));
            assert!(body.contains("from the demo provider"), "{command}: {body}");
        }
    }

    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}
