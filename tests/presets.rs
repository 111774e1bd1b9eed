//! Provider presets (SPEC §10): every preset loads and passes `check` with the user's own keys
//! (a client id and secret, or a key and files for the grants of SPEC §14); what the config sets wins over the preset; templated presets name a missing
//! parameter; `tokenproxy presets NAME` prints a config that loads; and one preset (Withings,
//! the one with the most quirks) driven end to end against a local mock through onboarding and
//! refresh.

mod support;

use std::path::Path;
use std::time::Duration;

use figment::value::Value;
use http::StatusCode;
use support::*;
use tokenproxy::config::{ClientAuth, Config, Grant};
use tokenproxy::presets::Preset;

/// A parameter value for templated presets.
fn param_value(param: &str) -> &'static str {
    match param {
        "tenant" => "contoso.onmicrosoft.com",
        "domain" => "example.okta.com",
        "region" => "eu-west-1",
        "service" => "s3",
        _ => "value",
    }
}

fn preset_params(preset: &Preset) -> String {
    let params: Vec<String> =
        preset.params().iter().map(|p| format!("{p} = \"{}\"", param_value(p))).collect();
    if params.is_empty() { String::new() } else { format!("preset_params = {{ {} }}\n", params.join(", ")) }
}

/// What a user adds to a preset: the provider's keys, and the table (`oauth`, or `sigv4` for a
/// provider that signs) with the user's own keys in it. Keys and files are made in `dir`.
fn own_keys(preset: &Preset, dir: &Path) -> (String, &'static str, String) {
    let settings = preset.raw_settings();
    if settings.find_ref("sigv4").is_some() {
        let id = dir.join(format!("{}.key-id", preset.name));
        let secret = dir.join(format!("{}.secret", preset.name));
        write_private(&id, "AKIDEXAMPLE");
        write_private(&secret, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        let keys = format!(
            "access_key_id_file = {}\nsecret_access_key_file = {}\n",
            toml_path(&id),
            toml_path(&secret)
        );
        return (String::new(), "sigv4", keys);
    }
    let (provider_keys, oauth_keys) = oauth_keys(preset, dir);
    (provider_keys, "oauth", oauth_keys)
}

/// By its grant: a client id and secret, or (SPEC §14) a key, an app id, the files a cluster
/// projects. Returns the provider's keys (the token file among them) and the `[oauth]` keys.
fn oauth_keys(preset: &Preset, dir: &Path) -> (String, String) {
    let settings = preset.raw_settings();
    let oauth = |key: &str| {
        settings.find_ref("oauth").and_then(|o| o.find_ref(key)).and_then(Value::as_str).map(str::to_string)
    };
    let name = preset.name;
    let token_file = format!("token_file = \"tokens/{name}.json\"\n");
    let rsa_key = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let path = dir.join(format!("{name}.pem"));
        write_private(&path, &key.serialize_pem());
        toml_path(&path)
    };
    let projected = || {
        let path = dir.join(format!("{name}.projected-token"));
        std::fs::write(&path, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").unwrap();
        toml_path(&path)
    };
    match (oauth("grant").as_deref(), oauth("client_auth").as_deref()) {
        (Some("jwt_bearer"), _) => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
            let account = serde_json::json!({
                "type": "service_account",
                "client_email": "sa@proj.iam.gserviceaccount.com",
                "private_key": key.serialize_pem(),
                "private_key_id": "kid-1",
                "token_uri": "https://oauth2.googleapis.com/token",
            });
            let path = dir.join(format!("{name}.json"));
            write_private(&path, &account.to_string());
            (token_file, format!("service_account_file = {}\n", toml_path(&path)))
        }
        (Some("github_app"), _) => {
            // Installation 1's token, so that `check` has an account to show.
            std::fs::create_dir_all(dir.join(format!("tokens/{name}"))).unwrap();
            std::fs::write(dir.join(format!("tokens/{name}/1.json")), token_json("at-1")).unwrap();
            (
                format!("token_file = \"tokens/{name}/{{account}}.json\"\ndefault_account = \"1\"\n"),
                format!("app_id = \"1\"\nprivate_key_file = {}\n", rsa_key()),
            )
        }
        (Some("token_exchange"), _) => (
            token_file,
            format!(
                "audience = \"//iam.googleapis.com/projects/1/x\"\nsubject_token_file = {}\n",
                projected()
            ),
        ),
        (_, Some("client_assertion_file")) => {
            (token_file, format!("client_id = \"my-client\"\nclient_assertion_file = {}\n", projected()))
        }
        _ => (token_file, "client_id = \"my-client\"\nclient_secret = \"my-secret\"\n".to_string()),
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out =
        std::process::Command::new(binary()).args(args).env_remove("TOKENPROXY_CONFIG").output().unwrap();
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn every_preset_loads_has_https_endpoints_and_hosts_and_passes_check() {
    let dir = tempdir();
    std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
    let mut config = String::from("[admin]\nlisten = \"127.0.0.1:9090\"\n");
    let mut names = Vec::new();
    for preset in Preset::all() {
        names.push(preset.name);
        std::fs::write(dir.path().join(format!("tokens/{}.json", preset.name)), token_json("at-1")).unwrap();
        let (provider_keys, table, own) = own_keys(&preset, dir.path());
        config += &format!(
            "[providers.{name}]\npreset = \"{name}\"\n{params}{provider_keys}\
             [providers.{name}.{table}]\n{own}",
            name = preset.name,
            params = preset_params(&preset),
        );
    }
    assert!(names.len() >= 25, "{names:?}");
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, &config).unwrap();
    let loaded = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    for provider in &loaded.providers {
        assert!(!provider.hosts.is_empty(), "{}: no hosts", provider.name);
        if let Some(sigv4) = &provider.sigv4 {
            assert!(!sigv4.region.contains('{') && !sigv4.service.contains('{'), "{}", provider.name);
            continue;
        }
        let oauth = provider.oauth.as_ref().unwrap();
        if matches!(oauth.grant, Grant::RefreshToken | Grant::ClientCredentials) {
            assert_eq!(oauth.client_id, "my-client", "{}: the client id is the user's", provider.name);
        }
        let mut urls: Vec<_> = oauth.token_url.iter().cloned().collect();
        urls.extend(oauth.grants.github.as_ref().map(|g| g.api_url.clone()));
        urls.extend(oauth.authorize_url.clone());
        urls.extend(oauth.device_authorization_url.clone());
        for url in urls {
            assert_eq!(url.scheme_str(), Some("https"), "{}: {url}", provider.name);
            assert!(!url.to_string().contains('{'), "{}: an unfilled parameter in {url}", provider.name);
        }
    }
    let (code, out) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    for name in names {
        let ready = |l: &str| l.contains("valid") || l.contains("SigV4");
        assert!(out.lines().any(|l| l.starts_with(name) && ready(l)), "{name} in:\n{out}");
    }
}

#[test]
fn the_configs_own_keys_win_over_the_preset() {
    let dir = tempdir();
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &path,
        r#"
[providers.music]
preset = "spotify"
hosts = ["127.0.0.1:4444"]
token_file = "music.json"
[providers.music.oauth]
client_id = "mine"
client_secret = "s"
token_url = "http://127.0.0.1:4444/token"
scope = "user-read-email"
"#,
    )
    .unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let music = &config.providers[0];
    assert_eq!(music.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(), ["127.0.0.1:4444"]);
    let oauth = music.oauth.as_ref().unwrap();
    assert_eq!(
        oauth.token_url.as_ref().unwrap().to_string(),
        "http://127.0.0.1:4444/token",
        "the config's token_url"
    );
    assert_eq!(oauth.scope, "user-read-email");
    // What the config leaves out comes from the preset.
    assert_eq!(oauth.authorize_url.as_ref().unwrap().to_string(), "https://accounts.spotify.com/authorize");
    assert_eq!(oauth.client_auth, ClientAuth::Basic);

    // A preset value the config overrides with its own.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("scope = \"user-read-email\"", "client_auth = \"post\"");
    std::fs::write(&path, text).unwrap();
    assert_eq!(
        Config::load(&path).unwrap().providers[0].oauth.as_ref().unwrap().client_auth,
        ClientAuth::Post
    );
}

#[test]
fn a_templated_preset_names_its_missing_parameter_and_uses_a_given_one() {
    let dir = tempdir();
    let path = dir.path().join("tokenproxy.toml");
    let write = |params: &str| {
        std::fs::write(
            &path,
            format!(
                "[providers.graph]\npreset = \"microsoft\"\n{params}token_file = \"graph.json\"\n\
                 [providers.graph.oauth]\nclient_id = \"app\"\nclient_secret = \"s\"\n"
            ),
        )
        .unwrap();
    };
    write("");
    let (code, out) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("providers.graph.preset_params") && out.contains("needs preset_params tenant"),
        "{out}"
    );

    write("preset_params = { tenant = \"contoso.onmicrosoft.com\" }\n");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let oauth = config.providers[0].oauth.as_ref().unwrap();
    assert_eq!(
        oauth.token_url.as_ref().unwrap().to_string(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert!(oauth.scope.contains("offline_access"));

    write("preset_params = { tenant = \"a/../b\" }\n");
    let (code, out) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("preset_params.tenant: may hold only"), "{out}");

    std::fs::write(&path, "[providers.x]\npreset = \"nope\"\ntoken_file = \"t.json\"\n").unwrap();
    let (code, out) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("providers.x.preset: no preset named \"nope\""), "{out}");
}

/// `tokenproxy presets` lists every preset with its hosts and flows; `tokenproxy presets NAME`
/// prints TOML that, with the user's own keys added, is a config that loads and means the same.
#[test]
fn the_presets_command_lists_them_and_prints_each_as_a_config_that_loads() {
    let (code, list) = run(&["presets"]);
    assert_eq!(code, Some(0));
    for preset in Preset::all() {
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(preset.name));
        let line = line.unwrap_or_else(|| panic!("{} not listed:\n{list}", preset.name));
        assert!(line.contains(&preset.hosts()[0]) && line.contains(preset.flows()[0]), "{line}");
    }
    assert!(list.lines().any(|l| l.starts_with("google ") && l.contains("browser,device")), "{list}");

    let dir = tempdir();
    for preset in Preset::all() {
        let (code, text) = run(&["presets", preset.name]);
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("# docs: https://"), "{}: {text}", preset.name);
        // The user's own keys, added where the printed comment says.
        let (provider_keys, table, oauth_keys) = own_keys(&preset, dir.path());
        let oauth_header = format!("[providers.{}.{table}]", preset.name);
        // A key the preset sets too (a default path) is changed where it stands.
        let mut text = text.clone();
        let mut added = String::new();
        for line in oauth_keys.lines() {
            let key = format!("\n{} = ", line.split(" = ").next().unwrap());
            match text.find(&key) {
                Some(at) => {
                    let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e);
                    text.replace_range(at + 1..end, line);
                }
                None => added += &format!("{line}\n"),
            }
        }
        let mine = format!("{}{provider_keys}{oauth_header}\n{added}", preset_params(&preset));
        let mut filled = text.replacen(&format!("{oauth_header}\n"), &mine, 1);
        for param in preset.params() {
            filled = filled.replace(&format!("{{{param}}}"), param_value(param));
        }
        // Written out in full, without `preset =`: the same provider as with the preset.
        let filled = filled.replace(&preset_params(&preset), "");
        let path = dir.path().join(format!("{}.toml", preset.name));
        std::fs::write(&path, &filled).unwrap();
        let written = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}\n{filled}", preset.name));
        let by_preset_text = format!(
            "[providers.{n}]\npreset = \"{n}\"\n{p}{provider_keys}[providers.{n}.{table}]\n{oauth_keys}",
            n = preset.name,
            p = preset_params(&preset)
        );
        std::fs::write(&path, by_preset_text).unwrap();
        let by_preset = Config::load(&path).unwrap();
        let (a, b) = (&written.providers[0], &by_preset.providers[0]);
        assert_eq!(format!("{:?}", a.hosts), format!("{:?}", b.hosts), "{}", preset.name);
        assert_eq!(format!("{:?}", a.oauth), format!("{:?}", b.oauth), "{}", preset.name);
        assert_eq!(format!("{:?}", a.sigv4), format!("{:?}", b.sigv4), "{}", preset.name);
    }
    let (code, out) = run(&["presets", "nope"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no preset named"), "{out}");
}

/// Withings through its preset, endpoints pointed at a local mock that insists on what the
/// preset says: client credentials as form fields, `action=requesttoken`, the token wrapped in
/// `body`. Onboarding writes the first token; a 401 makes tokenproxy refresh with the preset's
/// quirks and retry.
#[tokio::test]
async fn the_withings_preset_works_end_to_end_against_a_mock_through_onboarding_and_refresh() {
    let api = MockApi::start().await;
    let mut endpoint = MockTokenEndpoint::new(Some(&api));
    endpoint.auth = AuthStyle::Post;
    endpoint.wrap = Some("body");
    endpoint.required = vec![("action", "requesttoken")];
    let endpoint = endpoint.start().await;
    let admin_port = fixed_port();
    let dir = tempdir();
    let config = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{admin_port}"
[providers.withings]
preset = "withings"
hosts = ["{host}"]
token_file = "tokens/{{account}}.json"
allow_plaintext = true
[providers.withings.oauth]
token_url = "{token_url}"
authorize_url = "{authorize_url}"
client_id = "{client_id}"
client_secret = "{client_secret}"
"#,
        host = api.authority(),
        token_url = endpoint.url(),
        authorize_url = endpoint.authorize_url(),
        client_id = endpoint.client_id,
        client_secret = endpoint.client_secret,
    );
    let proxy = TokenProxy::start(dir.path(), &config);

    let mut browser = Browser::new();
    let callback = browser.consent(&format!("http://{}/connect/withings?account=ana", proxy.admin)).await;
    let authorize = &endpoint.authorize_requests()[0];
    assert_eq!(
        authorize["scope"], "user.info,user.metrics,user.activity",
        "the preset's comma-separated scope"
    );
    let (status, result, page) = browser.finish(&callback).await;
    assert_eq!((status, result.as_str()), (StatusCode::OK, "ok"), "{page}");
    let form = endpoint.last_form();
    assert_eq!(form["action"], "requesttoken");
    assert_eq!(form["client_secret"], endpoint.client_secret);
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokens/ana.json")).unwrap()).unwrap();
    let first_token = first["access_token"].as_str().unwrap().to_string();
    assert!(first_token.starts_with("at-"), "read through response_pointer /body: {first}");

    // The provider stops accepting the token: one refresh with the preset's quirks, one retry.
    api.accept_only(&[]);
    let response = proxy
        .client()
        .get(api.url("/measure"))
        .header("tokenproxy-account", "ana")
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let form = endpoint.last_form();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["action"], "requesttoken");
    assert_eq!(form["refresh_token"], first["refresh_token"].as_str().unwrap());
    let now = api.last().authorization().unwrap().to_string();
    assert!(now.starts_with("Bearer at-") && now != format!("Bearer {first_token}"), "{now}");
}
