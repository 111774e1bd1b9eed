//! `tokenproxy token show|put PROVIDER [--account NAME]`: look at and import a stored token
//! through the token store, which is how a person handles tokens once files are sealed (SPEC §11).
//! `show` prints fingerprints, never a token, unless `--reveal`.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use time::OffsetDateTime;

use crate::cli::human_seconds;
use crate::config::Config;
use crate::secrets::fingerprint;
use crate::tokens::file::{TokenDocument, document_from_fields};
use crate::tokens::fmt_time;
use crate::tokens::store::{Key, Loaded, TokenStore};

/// The store and key a command acts on, checked: a multi-account provider needs an account.
fn target<'a>(config: &'a Config, provider: &'a str, account: Option<&'a str>) -> anyhow::Result<Key<'a>> {
    let pc =
        config.providers.iter().find(|p| p.name == provider).ok_or_else(|| {
            anyhow::anyhow!("no provider named {provider:?} in {}", config.source.display())
        })?;
    match (pc.is_multi_account(), account) {
        (true, None) => {
            anyhow::bail!("provider {provider:?} keeps one token per account: add --account NAME")
        }
        (true, Some(name)) => {
            crate::accounts::check(name).map_err(|e| anyhow::anyhow!("--account: {e}"))?;
            Ok(Key { provider, account: Some(name) })
        }
        (false, Some(_)) => anyhow::bail!("provider {provider:?} keeps one token: drop --account"),
        (false, None) => Ok(Key { provider, account: None }),
    }
}

fn store(config: &Config) -> anyhow::Result<Arc<dyn TokenStore>> {
    Ok(crate::tokens::store::for_config(config)?)
}

/// `token show`: returns whether a usable token is stored.
pub async fn show(
    config: &Config,
    provider: &str,
    account: Option<&str>,
    reveal: bool,
) -> anyhow::Result<bool> {
    let key = target(config, provider, account)?;
    let store = store(config)?;
    let location = store.location(key);
    let loaded = match store.load(key).await? {
        super::tokens::store::Loaded::Missing => store.seed(key).await?,
        loaded => loaded,
    };
    let (doc, sealed) = match loaded {
        Loaded::Missing => {
            println!("{location}: nothing stored");
            return Ok(false);
        }
        Loaded::Found { doc: Err(e), .. } => {
            println!("{location} {e}");
            return Ok(false);
        }
        Loaded::Found { doc: Ok(doc), sealed, .. } => (doc, sealed),
    };
    if reveal {
        eprintln!("tokenproxy: revealing the stored document, tokens included");
        println!("{}", serde_json::to_string_pretty(&Value::Object(doc.fields.clone()))?);
        return Ok(true);
    }
    print_summary(&doc, &location, sealed, store.sealing_key_id());
    Ok(true)
}

fn print_summary(doc: &TokenDocument, location: &str, sealed: bool, key_id: Option<&str>) {
    let now = OffsetDateTime::now_utc();
    let sealing = match (sealed, key_id) {
        (true, Some(key_id)) => format!("sealed (AES-256-GCM, key {key_id})"),
        (true, None) => "sealed".into(),
        (false, Some(_)) => "plaintext (sealed on its next write)".into(),
        (false, None) => "plaintext".into(),
    };
    println!("stored         {location}, {sealing}");
    println!("access_token   fingerprint {}", fingerprint(&doc.access_token));
    let refresh = doc.fields.get("refresh_token").and_then(Value::as_str);
    println!(
        "refresh_token  {}",
        refresh.map_or("none".to_string(), |t| format!("fingerprint {}", fingerprint(t)))
    );
    let expiry = match doc.expires_at {
        Some(at) => format!(
            "{} ({}), from {}",
            fmt_time(Some(at)).unwrap_or_default(),
            human_seconds((at - now).whole_seconds()),
            doc.expiry_source.as_str()
        ),
        None => "unknown".into(),
    };
    println!("expires_at     {expiry}");
    let others: Vec<&str> = doc
        .fields
        .keys()
        .map(String::as_str)
        .filter(|k| !matches!(*k, "access_token" | "refresh_token" | "expires_at"))
        .collect();
    if !others.is_empty() {
        println!("other fields   {}", others.join(", "));
    }
}

/// `token put`: stores the JSON token document in `file` (or standard input), sealed when a key
/// is configured, and reads it back. A running proxy picks it up as it does any change.
pub async fn put(
    config: &Config,
    provider: &str,
    account: Option<&str>,
    file: Option<&Path>,
) -> anyhow::Result<bool> {
    let key = target(config, provider, account)?;
    let mut bytes = Vec::new();
    match file {
        Some(path) => bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => {
            std::io::stdin().take(crate::tokens::store::MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        }
    }
    let source = file.map_or("standard input".to_string(), |p| p.display().to_string());
    // Errors name the position only: the input holds a token.
    let fields = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) => anyhow::bail!("{source}: expected a JSON object with an \"access_token\""),
        Err(e) => anyhow::bail!("{source}: not valid JSON (line {} column {})", e.line(), e.column()),
    };
    // Checked before anything is stored: a document without a usable token is refused.
    document_from_fields(fields.clone()).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    let store = store(config)?;
    let location = store.location(key);
    let replaced =
        crate::tokens::store::replace(store.as_ref(), key, &fields).await.map_err(|e| anyhow::anyhow!(e))?;
    println!("stored and read back: {location}");
    print_summary(&replaced.doc, &location, replaced.sealed, store.sealing_key_id());
    Ok(true)
}
