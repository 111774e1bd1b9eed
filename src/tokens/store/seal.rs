//! Encryption at rest (SPEC §11): token documents sealed with AES-256-GCM before they are stored.
//!
//! A sealed document is a small JSON envelope that says what it is and with which key:
//! `{"tokenproxy_sealed": 1, "alg": "A256GCM", "key_id": "…", "nonce": "…", "ciphertext": "…"}`.
//! Every seal uses a fresh random 96-bit nonce, and the (provider, account) the document belongs
//! to is the associated data, so a sealed document copied to another key does not open. The key
//! id is a fingerprint of the key (never the key), so a document sealed with another key is named
//! as such instead of "corrupt".

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Fields, Key};
use crate::config::FileFormat;
use crate::tokens::file::{self as document, TokenDocument};

const ENVELOPE_VERSION: u32 = 1;
const ALGORITHM: &str = "A256GCM";

/// The key that seals and opens token documents.
pub struct Sealer {
    key: LessSafeKey,
    key_id: String,
    /// Derived from the key: what account names are fingerprinted with.
    names: hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Why a stored document could not be opened. The message names keys by id only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "is sealed (key {0}) but no encryption key is configured: set [store] encryption_key_file or encryption_key_env"
    )]
    NoKey(String),
    #[error(
        "is sealed with key {found}, but the configured key is {configured}: configure the key it was sealed with"
    )]
    WrongKey { found: String, configured: String },
    #[error(
        "is sealed with key {0} but does not open with it: it was altered, or belongs to another provider or account"
    )]
    Tampered(String),
    #[error("is a sealed envelope that cannot be read ({0})")]
    Malformed(String),
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    tokenproxy_sealed: u32,
    alg: String,
    key_id: String,
    nonce: String,
    ciphertext: String,
}

/// What stored bytes hold.
pub enum Opened {
    /// A plaintext document, as written before encryption was configured (or without it).
    Plain(Vec<u8>),
    /// A sealed document, opened.
    Sealed(Vec<u8>),
}

impl Sealer {
    /// A sealer from 32 key bytes.
    pub fn new(key: &[u8; 32]) -> Sealer {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256-GCM takes a 32-byte key");
        // A key of its own for names (not the AES key itself): one key, one purpose.
        let derived =
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), b"tokenproxy/v1 account name fingerprints");
        Sealer {
            key: LessSafeKey::new(unbound),
            key_id: hex::encode(&Sha256::digest(key)[..4]),
            names: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// The key from `[store] encryption_key_file` or `encryption_key_env`: 32 random bytes, raw
    /// or base64. The error never quotes the key.
    pub fn from_source(what: &str, bytes: &[u8]) -> Result<Sealer, String> {
        let trimmed = std::str::from_utf8(bytes).map(str::trim).ok();
        let decoded = trimmed.and_then(|text| {
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            engines.iter().find_map(|engine| <[u8; 32]>::try_from(engine.decode(text).ok()?).ok())
        });
        let key: [u8; 32] = match (decoded, <[u8; 32]>::try_from(bytes)) {
            (Some(decoded), _) => decoded,
            (None, Ok(raw)) => raw,
            (None, Err(_)) => {
                let n = bytes.len();
                return Err(format!(
                    "{what}: holds {n} bytes, not a key: expected 32 random bytes, raw or base64 \
                     (e.g. `head -c 32 /dev/urandom | base64`)"
                ));
            }
        };
        Ok(Sealer::new(&key))
    }

    /// Reads the key from where the config says it is (a file, which should be private: its
    /// mode is checked by the config's warnings; or an environment variable).
    pub fn open(source: &crate::config::SealingKey) -> Result<Sealer, String> {
        use crate::config::SealingKey;
        let what = source.to_string();
        let bytes = match source {
            SealingKey::File(path) => std::fs::read(path).map_err(|e| format!("{what}: {e}"))?,
            SealingKey::Env(var) => std::env::var(var)
                .map_err(|_| format!("{what}: the environment variable is not set"))?
                .into_bytes(),
        };
        Sealer::from_source(&what, &bytes)
    }

    /// The key's id: the first 8 hex digits of its SHA-256.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `plaintext` for `key` into an envelope.
    pub fn seal(&self, key: Key<'_>, plaintext: &[u8]) -> Vec<u8> {
        self.seal_for(associated_data(key), plaintext)
    }

    /// A keyed fingerprint of an account name (32 hex digits): what a shared store's keys and
    /// change messages carry instead of the name (SPEC §11). Keyed, so that whoever reads the
    /// store cannot test a list of likely names (e-mail addresses) against it.
    pub fn name_fingerprint(&self, provider: &str, account: &str) -> String {
        let tag = hmac::sign(&self.names, &[provider.as_bytes(), b"\0", account.as_bytes()].concat());
        hex::encode(&tag.as_ref()[..16])
    }

    /// The account name sealed, for a store whose keys carry only its fingerprint (listing the
    /// accounts needs the names back).
    pub fn seal_name(&self, provider: &str, account: &str) -> Vec<u8> {
        self.seal_for(name_associated_data(provider), account.as_bytes())
    }

    /// The name [`Sealer::seal_name`] sealed, if `bytes` are one for this provider and key.
    pub fn open_name(&self, provider: &str, bytes: &[u8]) -> Option<String> {
        let envelope = envelope_of(bytes).ok()??;
        let name = self.open_with(name_associated_data(provider), envelope).ok()?;
        String::from_utf8(name).ok()
    }

    fn seal_for(&self, associated_data: Vec<u8>, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the operating system's random source");
        let mut data = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data),
                &mut data,
            )
            .expect("AES-GCM seals any length a token document has");
        let b64 = base64::engine::general_purpose::STANDARD;
        let envelope = Envelope {
            tokenproxy_sealed: ENVELOPE_VERSION,
            alg: ALGORITHM.into(),
            key_id: self.key_id.clone(),
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(&data),
        };
        let mut bytes = serde_json::to_vec_pretty(&envelope).expect("an envelope serialises");
        bytes.push(b'\n');
        bytes
    }

    fn open_envelope(&self, key: Key<'_>, envelope: Envelope) -> Result<Vec<u8>, OpenError> {
        self.open_with(associated_data(key), envelope)
    }

    fn open_with(&self, associated_data: Vec<u8>, envelope: Envelope) -> Result<Vec<u8>, OpenError> {
        if envelope.key_id != self.key_id {
            return Err(OpenError::WrongKey { found: envelope.key_id, configured: self.key_id.clone() });
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let malformed = |what: &str| OpenError::Malformed(what.to_string());
        let nonce: [u8; NONCE_LEN] = b64
            .decode(&envelope.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| malformed("its nonce is not 12 bytes of base64"))?;
        let mut data =
            b64.decode(&envelope.ciphertext).map_err(|_| malformed("its ciphertext is not base64"))?;
        let opened = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(associated_data), &mut data)
            .map_err(|_| OpenError::Tampered(envelope.key_id.clone()))?;
        Ok(opened.to_vec())
    }
}

/// A stored document as a store reports it: parsed (or why not), whether it is sealed, and, when
/// it is sealed with a key this process does not hold, that error: such a document is never
/// written over.
pub struct Decoded {
    pub doc: Result<TokenDocument, String>,
    pub sealed: bool,
    pub foreign_key: Option<OpenError>,
}

/// Opens (when sealed) and parses a stored document, bound to its owner `key`.
pub fn decode(sealer: Option<&Sealer>, key: Key<'_>, format: FileFormat, bytes: &[u8]) -> Decoded {
    let parse = |plain: &[u8]| document::parse(format, plain).map_err(|e| format!("cannot be parsed: {e}"));
    match open(sealer, key, bytes) {
        Ok(Opened::Plain(plain)) => Decoded { doc: parse(&plain), sealed: false, foreign_key: None },
        Ok(Opened::Sealed(plain)) => Decoded { doc: parse(&plain), sealed: true, foreign_key: None },
        Err(e @ (OpenError::NoKey(_) | OpenError::WrongKey { .. })) => {
            Decoded { doc: Err(e.to_string()), sealed: true, foreign_key: Some(e) }
        }
        Err(e) => Decoded { doc: Err(e.to_string()), sealed: true, foreign_key: None },
    }
}

/// Encodes `fields` in `format`, sealed for `key` when there is a sealer.
pub fn encode(
    sealer: Option<&Sealer>,
    key: Key<'_>,
    format: FileFormat,
    fields: &Fields,
) -> std::io::Result<Vec<u8>> {
    let bytes = document::encode(format, fields)?;
    Ok(match sealer {
        Some(sealer) => sealer.seal(key, &bytes),
        None => bytes,
    })
}

/// Opens stored bytes: an envelope with `sealer`'s key, anything else as plaintext.
pub fn open(sealer: Option<&Sealer>, key: Key<'_>, bytes: &[u8]) -> Result<Opened, OpenError> {
    let Some(envelope) = envelope_of(bytes)? else { return Ok(Opened::Plain(bytes.to_vec())) };
    match sealer {
        Some(sealer) => sealer.open_envelope(key, envelope).map(Opened::Sealed),
        None => Err(OpenError::NoKey(envelope.key_id)),
    }
}

/// The envelope `bytes` hold, if they are one.
fn envelope_of(bytes: &[u8]) -> Result<Option<Envelope>, OpenError> {
    // Cheap test first: a token document that is not an envelope never names this field.
    let marker = b"\"tokenproxy_sealed\"";
    if !bytes.windows(marker.len()).any(|w| w == marker) {
        return Ok(None);
    }
    let envelope: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| OpenError::Malformed(format!("line {} column {}", e.line(), e.column())))?;
    if envelope.tokenproxy_sealed != ENVELOPE_VERSION || envelope.alg != ALGORITHM {
        return Err(OpenError::Malformed(format!(
            "version {} with {:?}; this tokenproxy reads version {ENVELOPE_VERSION} with {ALGORITHM}",
            envelope.tokenproxy_sealed, envelope.alg
        )));
    }
    Ok(Some(envelope))
}

/// The associated data: which (provider, account) a document belongs to.
fn associated_data(key: Key<'_>) -> Vec<u8> {
    let mut aad = b"tokenproxy/v1\0".to_vec();
    aad.extend_from_slice(key.provider.as_bytes());
    aad.push(0);
    if let Some(account) = key.account {
        aad.push(1);
        aad.extend_from_slice(account.as_bytes());
    }
    aad
}

/// The associated data of a sealed account name: not a document's, so neither opens as the other.
fn name_associated_data(provider: &str) -> Vec<u8> {
    let mut aad = b"tokenproxy/v1/account-name\0".to_vec();
    aad.extend_from_slice(provider.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Key<'static> = Key { provider: "p", account: Some("alice") };

    #[test]
    fn a_sealed_document_opens_only_with_its_key_and_its_owner() {
        let sealer = Sealer::new(&[7u8; 32]);
        let secret = br#"{"access_token":"very-secret-token"}"#;
        let sealed = sealer.seal(ALICE, secret);
        let text = String::from_utf8(sealed.clone()).unwrap();
        assert!(!text.contains("very-secret") && text.contains(sealer.key_id()));
        assert!(matches!(open(Some(&sealer), ALICE, &sealed), Ok(Opened::Sealed(p)) if p == secret));
        // A fresh nonce each time: sealing twice gives two different envelopes.
        assert_ne!(sealer.seal(ALICE, secret), sealed);
        // Bound to its owner: the same bytes under another account or provider do not open.
        let bob = Key { provider: "p", account: Some("bob") };
        assert_eq!(
            open(Some(&sealer), bob, &sealed).err(),
            Some(OpenError::Tampered(sealer.key_id().into()))
        );
        let single = Key { provider: "p", account: None };
        assert!(matches!(open(Some(&sealer), single, &sealed), Err(OpenError::Tampered(_))));
        // Another key is named, not reported as damage; no key at all says what to set.
        let other = Sealer::new(&[8u8; 32]);
        assert!(matches!(open(Some(&other), ALICE, &sealed), Err(OpenError::WrongKey { .. })));
        assert!(matches!(open(None, ALICE, &sealed), Err(OpenError::NoKey(_))));
        // A flipped ciphertext byte does not open.
        let mut envelope: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        let ciphertext = envelope["ciphertext"].as_str().unwrap().to_string();
        let mut raw = base64::engine::general_purpose::STANDARD.decode(ciphertext).unwrap();
        raw[0] ^= 1;
        envelope["ciphertext"] = base64::engine::general_purpose::STANDARD.encode(raw).into();
        let altered = serde_json::to_vec(&envelope).unwrap();
        assert!(matches!(open(Some(&sealer), ALICE, &altered), Err(OpenError::Tampered(_))));
        // Plaintext is read as it is.
        assert!(matches!(open(Some(&sealer), ALICE, secret), Ok(Opened::Plain(_))));
    }

    #[test]
    fn account_names_are_fingerprinted_with_the_key_and_sealed_for_their_provider() {
        let sealer = Sealer::new(&[7u8; 32]);
        let fingerprint = sealer.name_fingerprint("p", "ada@example.com");
        assert_eq!(fingerprint.len(), 32);
        assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
        // Stable for one key, different per provider, per name and per key.
        assert_eq!(sealer.name_fingerprint("p", "ada@example.com"), fingerprint);
        assert_ne!(sealer.name_fingerprint("q", "ada@example.com"), fingerprint);
        assert_ne!(sealer.name_fingerprint("p", "bob@example.com"), fingerprint);
        assert_ne!(Sealer::new(&[8u8; 32]).name_fingerprint("p", "ada@example.com"), fingerprint);
        // Not the plain hash anyone could compute from a guessed name.
        assert!(!hex::encode(Sha256::digest(b"ada@example.com")).starts_with(&fingerprint[..8]));

        let sealed = sealer.seal_name("p", "ada@example.com");
        assert!(!String::from_utf8_lossy(&sealed).contains("ada"));
        assert_eq!(sealer.open_name("p", &sealed).as_deref(), Some("ada@example.com"));
        assert_eq!(sealer.open_name("q", &sealed), None);
        assert_eq!(Sealer::new(&[8u8; 32]).open_name("p", &sealed), None);
        // A sealed name is not a document of that account, nor the other way round.
        let ada = Key { provider: "p", account: Some("ada@example.com") };
        assert!(matches!(open(Some(&sealer), ada, &sealed), Err(OpenError::Tampered(_))));
        assert_eq!(sealer.open_name("p", &sealer.seal(ada, b"ada@example.com")), None);
    }

    #[test]
    fn keys_are_32_bytes_raw_or_base64_and_errors_never_quote_them() {
        let raw = [3u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let from_raw = Sealer::from_source("k", &raw).unwrap();
        let from_b64 = Sealer::from_source("k", format!("{b64}\n").as_bytes()).unwrap();
        assert_eq!(from_raw.key_id(), from_b64.key_id());
        let err = Sealer::from_source("store.encryption_key_file /k", b"too-short-secret").unwrap_err();
        assert!(err.contains("holds 16 bytes") && !err.contains("too-short-secret"), "{err}");
    }
}
