//! An image that runs. No registry is reachable here, so `docker build` cannot be tried; Debian's
//! `buildah` assembles the same image from scratch instead: the release binary (the test binary
//! when no release build exists), the libraries it links, the CA certificates and
//! `config/container.toml`, with the entrypoint, command, user, ports, volumes and environment
//! read from the Dockerfile. The test checks that the image says what the Dockerfile says, then
//! runs it (`--isolation chroot`: crun cannot use this machine's cgroups) for `tokenproxy check`
//! and a real proxied request to a mock provider on loopback.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn buildah(args: &[&str]) -> String {
    let out = Command::new("buildah").args(["--storage-driver", "vfs"]).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "buildah {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What the Dockerfile's final stage declares.
#[derive(Debug, PartialEq)]
struct Declared {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
    ports: Vec<String>,
    volumes: Vec<String>,
    env: Vec<String>,
}

fn declared_by_dockerfile() -> Declared {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let line = |keyword: &str| {
        last_stage
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{keyword} ")))
            .unwrap_or_else(|| panic!("no {keyword} in the Dockerfile's last stage"))
            .trim()
            .to_string()
    };
    let json = |keyword: &str| serde_json::from_str::<Vec<String>>(&line(keyword)).unwrap();
    let mut ports: Vec<String> = line("EXPOSE").split_whitespace().map(|p| format!("{p}/tcp")).collect();
    ports.sort();
    let mut volumes = json("VOLUME");
    volumes.sort();
    Declared {
        entrypoint: json("ENTRYPOINT"),
        cmd: json("CMD"),
        user: line("USER"),
        ports,
        volumes,
        env: vec![line("ENV")],
    }
}

fn declared_by_image(image: &str) -> Declared {
    let inspected: serde_json::Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", image])).unwrap();
    let config = &inspected["OCIv1"]["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
    };
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        keys.sort();
        keys
    };
    Declared {
        entrypoint: strings(&config["Entrypoint"]),
        cmd: strings(&config["Cmd"]),
        user: config["User"].as_str().unwrap_or_default().to_string(),
        // buildah writes "8080", Docker "8080/tcp": the same port.
        ports: keys(&config["ExposedPorts"])
            .into_iter()
            .map(|p| if p.contains('/') { p } else { format!("{p}/tcp") })
            .collect(),
        volumes: keys(&config["Volumes"]),
        env: strings(&config["Env"]).into_iter().filter(|e| e.starts_with("TOKENPROXY_")).collect(),
    }
}

/// The binary and every library `ldd` says it loads, at their own paths under `root`.
fn copy_with_libraries(binary: &Path, root: &Path) {
    let dest = root.join("usr/local/bin/tokenproxy");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(binary, &dest).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split("=>").last().unwrap().split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            let inside = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
            std::fs::copy(std::fs::canonicalize(path).unwrap(), inside).unwrap();
        }
    }
}

struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for args in self.0.iter().rev() {
            let _ = Command::new("buildah").args(["--storage-driver", "vfs"]).args(args).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_built_as_the_dockerfile_says_checks_its_config_and_proxies_a_request() {
    if !running_as_root() {
        skip("the image test needs root for buildah's vfs storage");
        if std::env::var("TOKENPROXY_REQUIRE_CLIENTS").as_deref() == Ok("1") {
            panic!("the image test needs root (TOKENPROXY_REQUIRE_CLIENTS=1)");
        }
        return;
    }
    if !client_available(
        "buildah and ldd",
        Command::new("sh").args(["-c", "command -v buildah && command -v ldd"]),
    ) {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let release = repo.join("target/release/tokenproxy");
    let binary = if release.exists() { release } else { PathBuf::from(binary()) };
    let declared = declared_by_dockerfile();
    let tag = format!("localhost/tokenproxy-test:{}", std::process::id());
    let mut cleanup = Cleanup(Vec::new());

    // The image: from scratch, as the Dockerfile's last stage lays it out.
    let build = buildah(&["from", "scratch"]);
    cleanup.0.push(vec!["rm".into(), build.clone()]);
    let root = PathBuf::from(buildah(&["mount", &build]));
    copy_with_libraries(&binary, &root);
    for dir in
        ["etc/ssl/certs", "etc/tokenproxy", "var/lib/tokenproxy/ca", "var/lib/tokenproxy/tokens", "tmp"]
    {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", root.join("etc/ssl/certs/ca-certificates.crt"))
        .unwrap();
    std::fs::copy(repo.join("config/container.toml"), root.join("etc/tokenproxy/tokenproxy.toml")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/:/nonexistent\ntokenproxy:x:10001:10001::/var/lib/tokenproxy:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\ntokenproxy:x:10001:\n").unwrap();
    std::os::unix::fs::chown(root.join("var/lib/tokenproxy/ca"), Some(10001), Some(10001)).unwrap();
    std::os::unix::fs::chown(root.join("var/lib/tokenproxy/tokens"), Some(10001), Some(10001)).unwrap();
    let mut config = vec![
        "config".to_string(),
        "--entrypoint".into(),
        serde_json::to_string(&declared.entrypoint).unwrap(),
        "--cmd".into(),
        serde_json::to_string(&declared.cmd).unwrap(),
        "--user".into(),
        declared.user.clone(),
    ];
    for port in &declared.ports {
        config.extend(["--port".into(), port.trim_end_matches("/tcp").to_string()]);
    }
    for volume in &declared.volumes {
        config.extend(["--volume".into(), volume.clone()]);
    }
    for env in &declared.env {
        config.extend(["--env".into(), env.clone()]);
    }
    config.push(build.clone());
    buildah(&config.iter().map(String::as_str).collect::<Vec<_>>());
    buildah(&["umount", &build]);
    buildah(&["commit", "--quiet", &build, &tag]);
    cleanup.0.push(vec!["rmi".into(), tag.clone()]);

    // The image says what the Dockerfile says.
    assert_eq!(declared_by_image(&tag), declared);
    assert_eq!(declared.user, "10001:10001", "a non-root user");

    // It runs: `check` on the image's own config, as its user.
    let run_ctr = buildah(&["from", &tag]);
    cleanup.0.push(vec!["rm".into(), run_ctr.clone()]);
    let user = declared.user.as_str();
    let check = buildah(&[
        "run",
        "--isolation",
        "chroot",
        "--user",
        user,
        &run_ctr,
        "--",
        &declared.entrypoint[0],
        "check",
    ]);
    assert!(check.contains("is valid"), "{check}");

    // And it proxies: a provider for a mock on loopback, given by environment variables as a
    // deployment would, and a token file on the tokens volume (mounted as `docker run -v` does).
    let api = MockApi::start().await;
    api.accept("at-in-the-image");
    let volumes = tempdir();
    let tokens = volumes.path().join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(tokens.join("api.json"), token_json("at-in-the-image")).unwrap();
    for path in [&tokens, &tokens.join("api.json")] {
        std::os::unix::fs::chown(path, Some(10001), Some(10001)).unwrap();
    }
    let tokens_volume = format!("{}:/var/lib/tokenproxy/tokens", tokens.display());
    let (proxy_port, admin_port) = (fixed_port(), fixed_port());
    let envs = [
        format!("TOKENPROXY_PROXY__LISTEN=127.0.0.1:{proxy_port}"),
        format!("TOKENPROXY_ADMIN__LISTEN=127.0.0.1:{admin_port}"),
        format!("TOKENPROXY_PROVIDERS__API__HOSTS=[\"{}\"]", api.authority()),
        "TOKENPROXY_PROVIDERS__API__TOKEN_FILE=/var/lib/tokenproxy/tokens/api.json".into(),
        "TOKENPROXY_PROVIDERS__API__ALLOW_PLAINTEXT=true".into(),
    ];
    let mut command = Command::new("buildah");
    command.args([
        "--storage-driver",
        "vfs",
        "run",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--user",
        user,
    ]);
    command.args(["--volume", &tokens_volume]);
    for env in &envs {
        command.args(["--env", env]);
    }
    let running = command
        .args([&run_ctr, "--", &declared.entrypoint[0], &declared.cmd[0]])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://127.0.0.1:{proxy_port}")).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answered = eventually(Duration::from_secs(30), "the proxy in the image to answer", || {
        let client = client.clone();
        let url = api.url("/v1/from-the-image");
        async move {
            let r = client.get(url).send().await.ok()?;
            Some((r.status(), r.text().await.unwrap_or_default()))
        }
    })
    .await;
    let _ = Command::new("kill").args(["-TERM", &running.id().to_string()]).status();
    let out = running.wait_with_output().unwrap();
    assert_eq!(answered.0, http::StatusCode::OK, "{}\n{}", answered.1, String::from_utf8_lossy(&out.stderr));
    assert_eq!(api.last().path, "/v1/from-the-image");
    assert_eq!(api.last().authorization(), Some("Bearer at-in-the-image"));
}
