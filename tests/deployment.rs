//! The newcomer's path: `tokenproxy status`, the shipped examples, the Kubernetes manifests, the
//! Dockerfile, and a user guide that cannot drift from the code.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    run_with_env(args, &[])
}

fn run_with_env(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String) {
    let out = Command::new(binary())
        .args(args)
        .env_remove("TOKENPROXY_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_and_exits_zero_only_when_all_are_ready() {
    let dir = tempdir();
    std::fs::write(dir.path().join("ok.json"), token_json("status-token")).unwrap();
    let config = "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                  [providers.good]\nhosts = [\"good.invalid\"]\ntoken_file = \"ok.json\"\n";
    let tp = TokenProxy::start(dir.path(), config);
    let admin = format!("http://{}", tp.admin);
    let (code, out) = tokio::task::spawn_blocking(move || run(&["status", "--admin", &admin])).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    let header = out.lines().next().unwrap();
    for column in ["PROVIDER", "STATE", "EXPIRES", "LAST REFRESH", "RESULT"] {
        assert!(header.contains(column), "{out}");
    }
    let row = out.lines().find(|l| l.starts_with("good")).expect("a row per provider");
    assert!(
        row.contains("valid") && row.contains(&tokenproxy::secrets::fingerprint("status-token")),
        "{row}"
    );
    assert!(!out.contains("status-token"));
    drop(tp);

    let dir = tempdir();
    let config =
        format!("{config}[providers.absent]\nhosts = [\"absent.invalid\"]\ntoken_file = \"absent.json\"\n");
    std::fs::write(dir.path().join("ok.json"), token_json("status-token")).unwrap();
    let tp = TokenProxy::start(dir.path(), &config);
    let admin = format!("http://{}", tp.admin);
    let (code, out) = tokio::task::spawn_blocking(move || run(&["status", "--admin", &admin])).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().any(|l| l.starts_with("absent") && l.contains("missing")), "{out}");

    let (code, out) = run(&["status", "--admin", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("is tokenproxy running"), "{out}");
}

/// Runs `check` on `config`; where it reports only missing token files of providers that need a
/// person's first token, asserts that, writes `seed` into each (the documented seed step), and
/// checks again, which must pass.
fn check_after_seeding(config: &std::path::Path, seed: &str) {
    let (code, out) = run(&["check", "--config", config.to_str().unwrap()]);
    if code == Some(0) {
        return;
    }
    let problems: Vec<&str> = out.lines().filter(|l| l.starts_with("problem:")).collect();
    assert!(!problems.is_empty(), "{}: {out}", config.display());
    // Client secrets the example says to provide in an environment variable.
    let mut env = Vec::new();
    for problem in problems {
        if let Some(rest) = problem.split("client_secret_env: environment variable ").nth(1) {
            env.push((
                rest.split(' ').next().unwrap().to_string(),
                "client-secret-of-the-example".to_string(),
            ));
            continue;
        }
        // A client secret the example says to provide (as a file beside the config).
        if let Some(rest) = problem.split("client_secret_file ").nth(1) {
            let secret = rest.split(": ").next().unwrap();
            assert!(secret.starts_with(config.parent().unwrap().to_str().unwrap()), "{problem}");
            std::fs::create_dir_all(std::path::Path::new(secret).parent().unwrap()).unwrap();
            std::fs::write(secret, "client-secret-of-the-example").unwrap();
            continue;
        }
        let missing = problem
            .split("token file ")
            .nth(1)
            .and_then(|rest| rest.split(" does not exist (").next())
            .filter(|_| {
                problem.contains("needs a first refresh token") || problem.contains("tokenproxy authorize")
            })
            .unwrap_or_else(|| panic!("{}: an unexpected problem: {problem}", config.display()));
        std::fs::create_dir_all(std::path::Path::new(missing).parent().unwrap()).unwrap();
        std::fs::write(missing, seed).unwrap();
    }
    let (code, out) = run_with_env(&["check", "--config", config.to_str().unwrap()], &env);
    assert_eq!(code, Some(0), "{} after seeding: {out}", config.display());
}

#[test]
fn every_provider_example_passes_check_once_seeded_as_it_says() {
    // A copy, so that seeding writes nothing into the repository.
    let dir = tempdir();
    let copy = dir.path().join("providers");
    std::fs::create_dir_all(copy.join("tokens")).unwrap();
    for entry in std::fs::read_dir(repo("examples/providers/tokens")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join("tokens").join(path.file_name().unwrap())).unwrap();
    }
    let seed = r#"{"access_token": "from-your-login", "refresh_token": "from-your-login"}"#;
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("examples/providers")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let config = copy.join(path.file_name().unwrap());
        // Secrets the examples mount under /run/secrets are provided beside the copy instead.
        let text = std::fs::read_to_string(&path).unwrap().replace("\"/run/secrets/", "\"secrets/");
        std::fs::write(&config, text).unwrap();
        check_after_seeding(&config, seed);
        checked += 1;
    }
    assert_eq!(checked, 6, "spotify, google, withings, github, entra, kubernetes service account");
    let (code, out) = run(&["check", "--config", repo("config/tokenproxy.toml").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["check", "--config", repo("config/container.toml").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
}

fn manifests() -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(repo("examples/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value =
                serde_norway::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(value["apiVersion"].is_string() && value["kind"].is_string(), "{}", path.display());
            docs.push(value);
        }
    }
    docs
}

#[test]
fn the_kubernetes_manifests_parse_and_wire_the_sidecar() {
    let docs = manifests();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret"]));

    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    let sidecar = containers.iter().find(|c| c["name"] == "tokenproxy").unwrap();
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    let env: BTreeMap<&str, &str> = app["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:8080");
    assert_eq!(env["HTTP_PROXY"], "http://127.0.0.1:8080");
    assert!(env.contains_key("NO_PROXY"));
    assert!(
        env["REQUESTS_CA_BUNDLE"].ends_with("bundle.pem") && env["NODE_EXTRA_CA_CERTS"].ends_with("ca.pem")
    );

    // The ConfigMap's config is one tokenproxy accepts once the init container has copied the
    // Secret's seed into the token volume (here a temporary folder stands for the volume).
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let seed = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["stringData"]["spotify.json"].is_string())
        .map(|d| d["stringData"]["spotify.json"].as_str().unwrap())
        .expect("a Secret with the seed token file");
    let dir = tempdir();
    let path = dir.path().join("tokenproxy.toml");
    let text = configmap["data"]["tokenproxy.toml"].as_str().unwrap();
    assert!(text.contains("/var/lib/tokenproxy/"), "the token volume's mount path");
    // The client secret, mounted from a Secret at /etc/tokenproxy/oauth, likewise.
    let text = text
        .replace("/var/lib/tokenproxy/", &format!("{}/", dir.path().display()))
        .replace("/etc/tokenproxy/oauth/", &format!("{}/oauth/", dir.path().display()));
    std::fs::write(&path, text).unwrap();
    check_after_seeding(&path, seed);
}

#[test]
fn the_dockerfile_builds_what_ci_builds_and_runs_unprivileged() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let ci = std::fs::read_to_string(repo(".ci/run")).unwrap();
    let build = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("RUN cargo build"))
        .map(|rest| format!("cargo build{rest}"))
        .expect("the build stage runs cargo build");
    assert!(ci.lines().any(|l| l.trim() == build), "CI runs `{build}` too");
    assert!(dockerfile.contains("USER 10001"), "a non-root user");
    // Engines without a default registry (podman) resolve only fully qualified names.
    for from in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        assert!(from.starts_with("FROM docker.io/library/"), "{from}");
    }
    // The usage comment runs as written: a config file (not a folder over /etc/tokenproxy, where
    // nothing could be created), the two writable volumes, and the proxy published on the host's
    // loopback while listening on the container's addresses.
    let usage: String =
        dockerfile.lines().filter(|l| l.starts_with("#   ") || l.starts_with("#     ")).collect();
    assert!(usage.contains(":/etc/tokenproxy/tokenproxy.toml:ro"), "{usage}");
    assert!(!usage.contains(":/etc/tokenproxy:ro"), "{usage}");
    assert!(
        usage.contains(":/var/lib/tokenproxy/ca ") && usage.contains(":/var/lib/tokenproxy/tokens "),
        "{usage}"
    );
    assert!(usage.contains("TOKENPROXY_PROXY__LISTEN=0.0.0.0:8080 -p 127.0.0.1:8080:8080"), "{usage}");
    assert!(dockerfile.contains("EXPOSE 8080 9090"));
    assert!(dockerfile.contains("VOLUME [\"/var/lib/tokenproxy/ca\", \"/var/lib/tokenproxy/tokens\"]"));
    assert!(dockerfile.contains("ENV TOKENPROXY_CONFIG="));
    assert!(repo("config/container.toml").exists(), "the file the image copies");
}

/// The keys a config section accepts, read from the error the code gives for an unknown key.
fn accepted_keys(section_toml: &str) -> BTreeSet<String> {
    let dir = tempdir();
    let path = dir.path().join("probe.toml");
    std::fs::write(&path, section_toml).unwrap();
    let (_, out) = run(&["check", "--config", path.to_str().unwrap()]);
    // The rest of that one problem's line: `check` goes on to list other problems after it.
    let expected = out.split("expected").nth(1).unwrap_or_else(|| panic!("no key list in: {out}"));
    let expected = expected.lines().next().unwrap_or_default();
    expected
        .split('`')
        .filter(|s| s.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_readme_lists_every_config_key_the_code_accepts() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let table = readme.split("## Configuration").nth(1).unwrap().split("\n## ").next().unwrap();
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cell = row.split('|').nth(1).unwrap();
        let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
        for (array, section) in [("[[routes]] ", "routes"), ("[[callers.NAME.allow]] ", "callers.NAME.allow")]
        {
            if let Some(keys) = names[0].strip_prefix(array) {
                for key in keys.split(", ") {
                    documented.entry(section.into()).or_default().insert(key.into());
                }
            }
        }
        if names[0].starts_with("[[") {
            continue;
        }
        let (section, first) = names[0].rsplit_once('.').unwrap();
        documented.entry(section.into()).or_default().insert(first.into());
        for more in &names[1..] {
            documented.entry(section.into()).or_default().insert(more.to_string());
        }
    }
    let probes = [
        ("proxy", "[proxy]\nzz_probe = 1\n"),
        ("admin", "[admin]\nzz_probe = 1\n"),
        ("tls", "[tls]\nzz_probe = 1\n"),
        ("egress", "[egress]\nzz_probe = 1\n"),
        ("providers.NAME", "[providers.x]\nzz_probe = 1\n"),
        ("providers.NAME.oauth", "[providers.x.oauth]\nzz_probe = 1\n"),
        ("providers.NAME.sigv4", "[providers.x.sigv4]\nzz_probe = 1\n"),
        ("routes", "[[routes]]\nzz_probe = 1\n"),
        ("onboarding", "[onboarding]\nzz_probe = 1\n"),
        ("store", "[store]\nzz_probe = 1\n"),
        ("transparent", "[transparent]\nzz_probe = 1\n"),
        ("callers.NAME", "[callers.x]\nzz_probe = 1\n"),
        ("callers.NAME.jwt", "[callers.x.jwt]\nzz_probe = 1\n"),
        ("callers.NAME.allow", "[[callers.x.allow]]\nzz_probe = 1\n"),
        ("audit", "[audit]\nzz_probe = 1\n"),
    ];
    for (section, probe) in probes {
        let mut accepted = accepted_keys(probe);
        // A sub-table is documented by its own rows (`providers.NAME.oauth.*`).
        accepted.retain(|key| !documented.contains_key(&format!("{section}.{key}")));
        let listed = documented.remove(section).unwrap_or_default();
        assert_eq!(listed, accepted, "README's keys for [{section}] differ from the code's");
    }
    assert!(documented.is_empty(), "README documents sections the code lacks: {documented:?}");
}

#[test]
fn the_readme_defaults_are_the_codes_defaults() {
    use tokenproxy::config::{ClientHeader, UpstreamScheme};
    let dir = tempdir();
    let path = dir.path().join("minimal.toml");
    std::fs::write(
        &path,
        "[providers.p]\nhosts = [\"a.com\"]\ntoken_file = \"t.json\"\n\
         [providers.p.oauth]\ntoken_url = \"https://auth.example.com/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
    )
    .unwrap();
    let c = tokenproxy::config::Config::load(&path).unwrap();
    let p = &c.providers[0];
    let o = p.oauth.as_ref().unwrap();
    let duration = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let actual: Vec<(&str, String)> = vec![
        ("proxy.listen", c.proxy.listen.to_string()),
        ("proxy.max_replay_body", c.proxy.max_replay_body.to_string()),
        ("proxy.upstream_timeout", duration(c.proxy.upstream_timeout)),
        ("proxy.header_read_timeout", duration(c.proxy.header_read_timeout)),
        ("proxy.shutdown_timeout", duration(c.proxy.shutdown_timeout)),
        ("proxy.max_header_bytes", c.proxy.max_header_bytes.to_string()),
        ("proxy.max_idle_per_host", c.proxy.max_idle_per_host.to_string()),
        ("proxy.idle_timeout", duration(c.proxy.idle_timeout)),
        ("proxy.max_connections", c.proxy.max_connections.to_string()),
        ("proxy.max_replay_total", c.proxy.max_replay_total.to_string()),
        ("proxy.access_log", c.proxy.access_log.to_string()),
        ("admin.listen", c.admin_listen.to_string()),
        ("tls.ca_dir", c.ca_dir.strip_prefix(dir.path()).unwrap().display().to_string()),
        ("tls.extra_roots", if c.extra_roots.is_empty() { "[]".into() } else { "?".into() }),
        ("egress.allow_unmatched", c.allow_unmatched.to_string()),
        ("egress.deny", if c.egress_deny.is_empty() { "[]".into() } else { "?".into() }),
        ("providers.NAME.header", p.header.to_string()),
        ("providers.NAME.format", format!("{}{{token}}{}", p.format_prefix, p.format_suffix)),
        (
            "providers.NAME.client_header",
            match p.client_header {
                ClientHeader::Override => "override",
                ClientHeader::Keep => "keep",
            }
            .into(),
        ),
        (
            "providers.NAME.upstream_scheme",
            match p.upstream_scheme {
                UpstreamScheme::Keep => "keep",
                UpstreamScheme::Https => "https",
            }
            .into(),
        ),
        ("providers.NAME.allow_plaintext", p.allow_plaintext.to_string()),
        (
            "providers.NAME.refresh_on_status",
            format!("{:?}", p.refresh_on_status.iter().map(|s| s.as_u16()).collect::<Vec<_>>()),
        ),
        ("providers.NAME.oauth.grant", o.grant.name().into()),
        ("providers.NAME.oauth.client_auth", o.client_auth.name().into()),
        ("providers.NAME.oauth.scope", format!("{:?}", o.scope)),
        (
            "providers.NAME.oauth.extra_params",
            if o.extra_params.is_empty() { "{}".into() } else { "?".into() },
        ),
        ("providers.NAME.oauth.response_pointer", format!("{:?}", o.response_pointer)),
        ("providers.NAME.oauth.refresh_before", duration(o.refresh_before)),
        (
            "providers.NAME.oauth.authorize_url",
            format!("{:?}", o.authorize_url.as_ref().map_or(String::new(), |u| u.to_string())),
        ),
        (
            "providers.NAME.oauth.device_authorization_url",
            format!("{:?}", o.device_authorization_url.as_ref().map_or(String::new(), |u| u.to_string())),
        ),
        (
            "providers.NAME.oauth.authorize_params",
            if o.authorize_params.is_empty() { "{}".into() } else { "?".into() },
        ),
        ("providers.NAME.oauth.pkce", o.pkce.to_string()),
        (
            "providers.NAME.oauth.redirect_uri",
            o.redirect_uri.replace(&c.admin_listen.to_string(), "<admin.listen>"),
        ),
        (
            "onboarding.state_dir",
            c.onboarding.state_dir.strip_prefix(dir.path()).unwrap().display().to_string(),
        ),
        ("onboarding.state_ttl", duration(c.onboarding.state_ttl)),
    ];
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let table = readme.split("## Configuration").nth(1).unwrap().split("\n## ").next().unwrap();
    for (key, value) in actual {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}`")))
            .unwrap_or_else(|| panic!("README has no row for {key}"));
        let default = row.split('|').nth(2).unwrap().trim().trim_matches('`');
        assert!(default.eq_ignore_ascii_case(&value), "{key}: README says {default:?}, the code {value:?}");
    }
}

#[test]
fn the_fleet_example_runs_many_replicas_on_one_redis_with_sealed_tokens() {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for file in ["redis.yaml", "tokenproxy-fleet.yaml"] {
        let text = std::fs::read_to_string(repo(&format!("examples/kubernetes/fleet/{file}"))).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            docs.push(serde_norway::Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")));
        }
    }
    let app = docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "my-app").unwrap();
    assert!(app["spec"]["replicas"].as_u64().unwrap() > 1);
    let pod = &app["spec"]["template"]["spec"];
    let sidecar =
        pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"] == "tokenproxy").unwrap();
    let password =
        sidecar["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "REDIS_PASSWORD").unwrap();
    assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], "tokens-redis");
    let key_volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "key").unwrap();
    assert_eq!(key_volume["secret"]["secretName"], "tokenproxy-fleet-key");
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(service["metadata"]["name"], "tokens-redis");
    // Redis without a single point of failure: three pods, each with a sentinel, and a restarted
    // pod joins the primary the sentinels name rather than starting as a second primary.
    let redis = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert_eq!(redis["spec"]["replicas"].as_u64(), Some(3));
    let names: Vec<&str> = redis["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["redis", "sentinel"]);
    let scripts = docs.iter().find(|d| d["metadata"]["name"] == "tokens-redis-scripts").unwrap();
    assert!(
        scripts["data"]["redis.sh"].as_str().unwrap().contains("sentinel get-master-addr-by-name tokens")
    );
    assert!(scripts["data"]["sentinel.sh"].as_str().unwrap().contains("sentinel monitor tokens "));

    // The config is one tokenproxy accepts: the Redis store through the sentinels, with its key.
    let configmap = docs.iter().find(|d| d["metadata"]["name"] == "tokenproxy-fleet-config").unwrap();
    let text = configmap["data"]["tokenproxy.toml"].as_str().unwrap();
    assert!(text.contains("kind = \"redis\"") && text.contains("master_name = \"tokens\""));
    let dir = tempdir();
    std::fs::write(dir.path().join("key"), [7u8; 32]).unwrap();
    std::fs::write(dir.path().join("password"), "p").unwrap();
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    let text = text
        .replace("/etc/tokenproxy/key/key", &dir.path().join("key").display().to_string())
        .replace("password_env = \"REDIS_PASSWORD\"", "password_file = \"password\"")
        .replace("/etc/tokenproxy/oauth/client-secret", &dir.path().join("secret").display().to_string())
        .replace("/var/lib/tokenproxy/", &format!("{}/", dir.path().display()));
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, text).unwrap();
    let config = tokenproxy::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let tokenproxy::config::StoreSettings::Redis(redis) = &config.store else { panic!("a Redis store") };
    let sentinel = redis.sentinel.as_ref().expect("the fleet finds its primary through sentinels");
    assert_eq!(sentinel.sentinels.len(), 3);
    assert_eq!(sentinel.sentinels[0], ("tokens-redis-0.tokens-redis".to_string(), 26379));
    assert_eq!(redis.min_replicas_ack, 1);
    let key = config.sealing_key.as_ref().expect("the example seals token data");
    tokenproxy::tokens::store::seal::Sealer::open(key).unwrap_or_else(|e| panic!("{e}"));
    let shown = format!("{:?}", config.store);
    assert!(!shown.contains("redis://:p@"), "the password never shows: {shown}");
}

#[test]
fn the_transparent_example_applies_the_printed_rules_and_runs_the_app_without_proxy_settings() {
    use serde::Deserialize;
    let text = std::fs::read_to_string(repo("examples/kubernetes/transparent/deployment.yaml")).unwrap();
    let docs: Vec<serde_norway::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .collect();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_sequence().unwrap();
    let redirect = init.iter().find(|c| c["name"] == "redirect").unwrap();
    assert!(redirect["args"][0].as_str().unwrap().contains("tokenproxy iptables --uid 10001"));
    assert!(
        redirect["securityContext"]["capabilities"]["add"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|c| c == "NET_ADMIN")
    );
    let containers = pod["containers"].as_sequence().unwrap();
    let sidecar = containers.iter().find(|c| c["name"] == "tokenproxy").unwrap();
    assert_eq!(sidecar["securityContext"]["runAsUser"], 10001, "the user the rules spare");
    let app = containers.iter().find(|c| c["name"] == "app").unwrap();
    assert_ne!(app["securityContext"]["runAsUser"], 10001);
    let env = app["env"].as_sequence().unwrap();
    assert!(
        env.iter().all(|e| !e["name"].as_str().unwrap().to_ascii_uppercase().contains("PROXY")),
        "no proxy settings"
    );

    // The config loads, and `tokenproxy iptables` prints rules for its transparent port.
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let dir = tempdir();
    std::fs::write(dir.path().join("secret"), "s").unwrap();
    let config = configmap["data"]["tokenproxy.toml"]
        .as_str()
        .unwrap()
        .replace("/etc/tokenproxy/oauth/client-secret", &dir.path().join("secret").display().to_string())
        .replace("/var/lib/tokenproxy/", &format!("{}/", dir.path().display()));
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, config).unwrap();
    let (code, out) = run(&["iptables", "--uid", "10001", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("REDIRECT --to-ports 15001")
            && out.contains("--uid-owner 10001")
            && out.contains("--dport 9090"),
        "{out}"
    );
}

/// `tokenproxy status` without `--admin` asks the admin listener of the config it is given
/// (`--config` before or after the subcommand), and says so when it cannot read that config
/// instead of silently asking another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_finds_the_admin_listener_in_the_config_it_is_given() {
    let dir = tempdir();
    std::fs::write(dir.path().join("ok.json"), token_json("status-token")).unwrap();
    let port = fixed_port();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\
         [providers.good]\nhosts = [\"good.invalid\"]\ntoken_file = \"ok.json\"\n"
    );
    let tp = TokenProxy::start(dir.path(), &config);
    let path = tp.config_path.display().to_string();
    for args in [vec!["status", "--config", &path], vec!["--config", &path, "status"]] {
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        let (code, out) =
            tokio::task::spawn_blocking(move || run(&args.iter().map(String::as_str).collect::<Vec<_>>()))
                .await
                .unwrap();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.lines().any(|l| l.starts_with("good") && l.contains("valid")), "{out}");
    }
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[admin]\nlisten = \"nowhere\"\n").unwrap();
    let broken = broken.display().to_string();
    let (_, out) = tokio::task::spawn_blocking(move || run(&["status", "--config", &broken])).await.unwrap();
    assert!(out.contains("could not be read from") && out.contains("--admin URL"), "{out}");
}

/// The workload-identity sidecar (SPEC §14): no Secret anywhere, the projected token for the
/// Entra audience mounted into the sidecar only, and a config that `check` passes once that
/// token is in place.
#[test]
fn the_workload_identity_example_has_no_secret_and_reads_the_projected_token() {
    use serde::Deserialize;
    let text =
        std::fs::read_to_string(repo("examples/kubernetes/workload-identity/deployment.yaml")).unwrap();
    let docs: Vec<serde_norway::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap())
        .collect();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["ConfigMap", "Deployment", "ServiceAccount"]), "no Secret");
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "my-app");
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "azure-token").unwrap();
    let projected = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"], "api://AzureADTokenExchange");
    let containers = pod["containers"].as_sequence().unwrap();
    let mounts = |name: &str| -> Vec<String> {
        let container = containers.iter().find(|c| c["name"] == name).unwrap();
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(mounts("tokenproxy").contains(&"azure-token".to_string()));
    assert!(!mounts("app").contains(&"azure-token".to_string()), "the app never sees the identity token");
    let mount_path = containers.iter().find(|c| c["name"] == "tokenproxy").unwrap()["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "azure-token")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_string();

    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let config = configmap["data"]["tokenproxy.toml"].as_str().unwrap();
    assert!(config.contains(&format!("client_assertion_file = \"{mount_path}/token\"")), "{config}");
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    std::fs::create_dir_all(dir.path().join("azure")).unwrap();
    std::fs::write(dir.path().join("azure/token"), "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").unwrap();
    let config = config
        .replace(&mount_path, &dir.path().join("azure").display().to_string())
        .replace("/var/lib/tokenproxy/", &format!("{}/", dir.path().display()))
        .replace("0.0.0.0:9090", "127.0.0.1:0");
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, config).unwrap();
    let (code, out) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("providers.graph: grant client_credentials, client assertion read from"), "{out}");
}
