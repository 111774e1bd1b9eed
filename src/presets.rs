//! Provider presets (SPEC §10): what a well-known provider's config is, so that a user writes
//! `preset = "spotify"`, a token file and their own client id.
//!
//! A preset is data: `presets/NAME.toml`, embedded at build time, written in the config's own
//! form (`[providers.NAME]` and `[providers.NAME.oauth]`) with a comment line per quirk, so that
//! `tokenproxy presets NAME` prints exactly what it stands for. Values may hold `{param}`
//! placeholders (a tenant, a domain) that `preset_params` fills. The config layer puts a
//! preset's keys *under* the provider's own: any key the config sets wins.

use std::collections::BTreeMap;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::Value;

include!(concat!(env!("OUT_DIR"), "/presets.rs"));

/// One built-in preset.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    /// The TOML it stands for, comments included.
    pub text: &'static str,
}

/// Why a preset cannot be applied: what the config must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    #[error("no preset named {0:?} (`tokenproxy presets` lists them)")]
    Unknown(String),
    #[error("preset {preset:?} needs preset_params {missing} (e.g. preset_params = {{ {example} }})")]
    MissingParams { preset: String, missing: String, example: String },
    #[error("preset_params.{0}: may hold only letters, digits, '.', '-' and '_'")]
    BadParam(String),
    #[error("preset_params.{param}: preset {preset:?} has no such parameter (it takes: {takes})")]
    UnknownParam { preset: String, param: String, takes: String },
}

impl Preset {
    /// Every preset, sorted by name.
    pub fn all() -> impl Iterator<Item = Preset> {
        PRESETS.iter().map(|(name, text)| Preset { name, text })
    }

    pub fn get(name: &str) -> Result<Preset, PresetError> {
        Preset::all().find(|p| p.name == name).ok_or_else(|| PresetError::Unknown(name.to_string()))
    }

    /// The first comment line: what the preset is for.
    pub fn description(&self) -> &'static str {
        self.text.lines().next().and_then(|l| l.strip_prefix('#')).map_or("", str::trim)
    }

    /// The documentation page its facts come from (`# docs: URL`).
    pub fn docs(&self) -> Option<&'static str> {
        self.text.lines().find_map(|l| l.strip_prefix("# docs:")).map(str::trim)
    }

    /// The parameters its values hold as `{name}`, sorted.
    pub fn params(&self) -> Vec<&'static str> {
        let mut params: Vec<&str> = self
            .text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split('{').skip(1))
            .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
            .filter(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .collect();
        params.sort_unstable();
        params.dedup();
        params
    }

    /// The provider settings it stands for, `{param}`s filled from `params`.
    pub fn settings(&self, params: &BTreeMap<String, String>) -> Result<Value, PresetError> {
        let takes = self.params();
        for (param, value) in params {
            if !takes.contains(&param.as_str()) {
                return Err(PresetError::UnknownParam {
                    preset: self.name.into(),
                    param: param.clone(),
                    takes: if takes.is_empty() { "none".into() } else { takes.join(", ") },
                });
            }
            if value.is_empty()
                || !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(PresetError::BadParam(param.clone()));
            }
        }
        let missing: Vec<&str> = takes.iter().copied().filter(|p| !params.contains_key(*p)).collect();
        if !missing.is_empty() {
            let example = missing.iter().map(|p| format!("{p} = \"…\"")).collect::<Vec<_>>().join(", ");
            return Err(PresetError::MissingParams {
                preset: self.name.into(),
                missing: missing.join(", "),
                example,
            });
        }
        let mut text = self.text.to_string();
        for (param, value) in params {
            text = text.replace(&format!("{{{param}}}"), value);
        }
        Ok(parse(self.name, &text))
    }

    /// Its settings as written, placeholders and all (for listing).
    pub fn raw_settings(&self) -> Value {
        parse(self.name, self.text)
    }

    /// The flows it supports: `refresh` always, `browser` with an authorization endpoint,
    /// `device` with a device endpoint; a grant that mints (SPEC §14) is named instead.
    pub fn flows(&self) -> Vec<&'static str> {
        let settings = self.raw_settings();
        if settings.find_ref("sigv4").is_some() {
            return vec!["sigv4"];
        }
        let oauth = settings.find_ref("oauth");
        let has = |key: &str| oauth.and_then(|o| o.find_ref(key)).is_some();
        let grant = oauth.and_then(|o| o.find_ref("grant")).and_then(Value::as_str);
        for minted in ["jwt_bearer", "github_app", "token_exchange", "client_credentials"] {
            if grant == Some(minted) {
                return vec![minted];
            }
        }
        let mut flows = vec!["refresh"];
        if has("authorize_url") {
            flows.push("browser");
        }
        if has("device_authorization_url") {
            flows.push("device");
        }
        flows
    }

    /// Its host patterns, as written.
    pub fn hosts(&self) -> Vec<String> {
        self.raw_settings()
            .find_ref("hosts")
            .and_then(Value::as_array)
            .map(|hosts| hosts.iter().filter_map(|h| h.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

/// A preset's `[providers.NAME]` table. Presets are checked by the tests, so a broken one is a
/// build that does not pass, never a user's problem.
fn parse(name: &str, text: &str) -> Value {
    Figment::from(Toml::string(text))
        .extract_inner::<Value>(&format!("providers.{name}"))
        .unwrap_or_else(|e| panic!("built-in preset {name} does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_named_after_its_file_and_says_where_its_facts_come_from() {
        assert!(Preset::all().count() >= 25);
        for preset in Preset::all() {
            let settings = preset.raw_settings();
            assert!(!preset.description().is_empty(), "{}: no description line", preset.name);
            assert!(
                preset.docs().is_some_and(|d| d.starts_with("https://")),
                "{}: no docs line",
                preset.name
            );
            assert!(!preset.hosts().is_empty(), "{}: no hosts", preset.name);
            assert!(
                settings.find_ref("token_file").is_none(),
                "{}: the token file is the user's",
                preset.name
            );
            if let Some(sigv4) = settings.find_ref("sigv4") {
                // A signing provider: region and service are the user's parameters, keys their own.
                assert!(settings.find_ref("oauth").is_none(), "{}: [sigv4] and [oauth]", preset.name);
                for key in ["access_key_id_file", "secret_access_key_file", "role_arn"] {
                    assert!(sigv4.find_ref(key).is_none(), "{}: {key} is always the user's own", preset.name);
                }
                continue;
            }
            let oauth = settings
                .find_ref("oauth")
                .unwrap_or_else(|| panic!("{}: no [oauth] or [sigv4]", preset.name));
            for key in ["client_id", "client_secret", "client_secret_file", "client_secret_env"] {
                assert!(oauth.find_ref(key).is_none(), "{}: {key} is always the user's own", preset.name);
            }
        }
    }

    #[test]
    fn parameters_are_found_filled_and_checked() {
        let okta = Preset::get("okta").unwrap();
        assert_eq!(okta.params(), ["domain"]);
        let missing = okta.settings(&BTreeMap::new()).unwrap_err();
        assert!(matches!(&missing, PresetError::MissingParams { missing, .. } if missing == "domain"));
        assert!(missing.to_string().contains("preset_params = { domain = \"…\" }"), "{missing}");
        let params = BTreeMap::from([("domain".to_string(), "dev-123.okta.com".to_string())]);
        let settings = okta.settings(&params).unwrap();
        let token_url = settings.find_ref("oauth.token_url").and_then(Value::as_str).unwrap().to_string();
        assert!(token_url.starts_with("https://dev-123.okta.com/"), "{token_url}");
        let bad = BTreeMap::from([("domain".to_string(), "evil.com/\"x".to_string())]);
        assert_eq!(okta.settings(&bad).unwrap_err(), PresetError::BadParam("domain".into()));
        let unknown = BTreeMap::from([("tenant".to_string(), "x".to_string())]);
        assert!(matches!(
            Preset::get("spotify").unwrap().settings(&unknown),
            Err(PresetError::UnknownParam { .. })
        ));
        assert!(matches!(Preset::get("nope"), Err(PresetError::Unknown(_))));
    }
}
