//! How a caller proves who it is with what a request carries: proxy credentials
//! (`Proxy-Authorization: Basic base64(NAME:SECRET)`, the secret compared in constant time), or a
//! JWT (as the proxy password, or `Proxy-Authorization: Bearer`), checked against the caller's
//! JWKS, issuer, audience, subject, `exp` and `nbf`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::CallerConfig;
use super::{Caller, Table};

/// Seconds of clock difference allowed on `exp` and `nbf`.
const LEEWAY_S: u64 = 30;
/// Verified JWTs remembered per table; beyond this the memory starts again.
const MAX_VERIFIED: usize = 4096;

/// Why a request belongs to no caller. Never holds what the request sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unknown {
    #[error("the request carries no proxy credentials, and its socket's owner is no caller's")]
    NoIdentity,
    #[error("the client's socket is owned by a uid that is no caller's")]
    Uid,
    #[error("the proxy credentials name no caller")]
    UnknownName,
    #[error("the proxy credentials' secret is not the caller's")]
    WrongSecret,
    #[error("the proxy credentials are not Basic or Bearer")]
    Scheme,
    #[error("the JWT is not valid for any caller (signature, issuer, audience, subject or time)")]
    BadJwt,
    #[error("the JWT has expired")]
    ExpiredJwt,
}

impl Unknown {
    /// The reason in one word, for the audit line.
    pub fn code(self) -> &'static str {
        match self {
            Unknown::NoIdentity => "no_identity",
            Unknown::Uid => "unknown_uid",
            Unknown::UnknownName => "unknown_name",
            Unknown::WrongSecret => "wrong_secret",
            Unknown::Scheme => "bad_credentials",
            Unknown::BadJwt => "bad_jwt",
            Unknown::ExpiredJwt => "expired_jwt",
        }
    }
}

/// A caller's identities that requests carry (its uids are the table's index).
pub(super) struct Identities {
    /// SHA-256 of the secret: compared as digests, in constant time.
    secret: Option<[u8; 32]>,
    jwt: Option<JwtCheck>,
}

struct JwtCheck {
    keys: Vec<(Option<String>, DecodingKey)>,
    issuer: String,
    audience: String,
    subject: Option<String>,
}

impl Identities {
    pub(super) fn load(config: &CallerConfig, problems: &mut Vec<String>) -> Identities {
        let what = format!("callers.{}", config.name);
        let secret = config.secret_file.as_ref().and_then(|file| match std::fs::read_to_string(file) {
            Ok(text) if text.trim().len() >= 8 => Some(Sha256::digest(text.trim().as_bytes()).into()),
            Ok(_) => {
                problems.push(format!(
                    "{what}.secret_file: {} holds no secret of at least 8 characters",
                    file.display()
                ));
                None
            }
            Err(e) => {
                problems.push(format!("{what}.secret_file: {}: {e}", file.display()));
                None
            }
        });
        let jwt = config.jwt.as_ref().and_then(|jwt| {
            let file = &jwt.jwks_file;
            let set: JwkSet = match std::fs::read(file).map_err(|e| e.to_string()).and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))
            }) {
                Ok(set) => set,
                Err(e) => {
                    problems.push(format!("{what}.jwt.jwks_file: {}: {e}", file.display()));
                    return None;
                }
            };
            // Public keys only: a shared secret in a JWKS would let its every reader mint tokens.
            let keys: Vec<_> = set
                .keys
                .iter()
                .filter(|k| !matches!(k.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)))
                .filter_map(|k| Some((k.common.key_id.clone(), DecodingKey::from_jwk(k).ok()?)))
                .collect();
            if keys.is_empty() {
                problems.push(format!(
                    "{what}.jwt.jwks_file: {} holds no usable public key (RSA, EC or OKP)",
                    file.display()
                ));
                return None;
            }
            Some(JwtCheck {
                keys,
                issuer: jwt.issuer.clone(),
                audience: jwt.audience.clone(),
                subject: jwt.subject.clone(),
            })
        });
        Identities { secret, jwt }
    }
}

/// The claims a caller is chosen by, read before the signature is checked (only to choose which
/// keys check it).
#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// JWTs this table verified.
#[derive(Default)]
pub(super) struct Verified(Mutex<HashMap<Box<[u8]>, Remembered>>);

/// A verified JWT's caller and the times it holds between.
struct Remembered {
    caller: Arc<Caller>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl Table {
    /// The caller `Proxy-Authorization` names, and what proved it.
    pub(super) fn by_credentials(&self, value: &[u8]) -> Result<(Arc<Caller>, Proof), Unknown> {
        let jwt = |caller| (caller, Proof::Jwt);
        let value = std::str::from_utf8(value).map_err(|_| Unknown::Scheme)?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(Unknown::Scheme)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.by_jwt(rest.as_bytes(), None).map(jwt);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Unknown::Scheme);
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).map_err(|_| Unknown::Scheme)?;
        let (name, password) = match decoded.iter().position(|&b| b == b':') {
            Some(at) => (&decoded[..at], &decoded[at + 1..]),
            None => (&decoded[..], &b""[..]),
        };
        let caller = std::str::from_utf8(name).ok().and_then(|name| self.by_name.get(name));
        let looks_like_jwt = password.iter().filter(|&&b| b == b'.').count() == 2;
        match caller {
            Some(caller) => {
                // The digest is made whether or not the caller has a secret: no timing tells.
                let digest: [u8; 32] = Sha256::digest(password).into();
                if caller.identity.secret.is_some_and(|secret| constant_time_eq(&secret, &digest)) {
                    return Ok((caller.clone(), Proof::Secret));
                }
                if caller.identity.jwt.is_some() && looks_like_jwt {
                    return self.by_jwt(password, Some(caller)).map(jwt);
                }
                Err(Unknown::WrongSecret)
            }
            None if looks_like_jwt => self.by_jwt(password, None).map(jwt),
            None => Err(Unknown::UnknownName),
        }
    }

    /// The caller a JWT proves: the one named, or the ones whose issuer and subject it claims.
    fn by_jwt(&self, token: &[u8], named: Option<&Arc<Caller>>) -> Result<Arc<Caller>, Unknown> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(known) = self.verified.0.lock().unwrap_or_else(|e| e.into_inner()).get(token)
            && named.is_none_or(|n| Arc::ptr_eq(n, &known.caller))
        {
            return check_times(now, known.exp, known.nbf).map(|()| known.caller.clone());
        }
        let claims: Claims =
            jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| Unknown::BadJwt)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Unknown::BadJwt)?;
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(Unknown::BadJwt);
        }
        let candidates = self.by_jwt.iter().filter(|c| named.is_none_or(|n| Arc::ptr_eq(n, c))).filter(|c| {
            let Some(check) = &c.identity.jwt else { return false };
            claims.iss.as_deref() == Some(check.issuer.as_str())
                && check.subject.as_ref().is_none_or(|s| claims.sub.as_deref() == Some(s.as_str()))
        });
        let mut expired = false;
        for caller in candidates {
            let check = caller.identity.jwt.as_ref().expect("filtered on jwt");
            let mut validation = Validation::new(header.alg);
            validation.leeway = LEEWAY_S;
            validation.validate_nbf = true;
            validation.set_issuer(&[&check.issuer]);
            validation.set_audience(&[&check.audience]);
            validation.sub = check.subject.clone();
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            let keys = check.keys.iter().filter(|(kid, _)| header.kid.is_none() || *kid == header.kid);
            for (_, key) in keys {
                match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                    Ok(_) => {
                        self.remember(token, caller, claims.exp, claims.nbf);
                        return Ok(caller.clone());
                    }
                    Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        expired = true
                    }
                    Err(_) => {}
                }
            }
        }
        Err(if expired { Unknown::ExpiredJwt } else { Unknown::BadJwt })
    }

    fn remember(&self, token: &[u8], caller: &Arc<Caller>, exp: Option<u64>, nbf: Option<u64>) {
        let mut verified = self.verified.0.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(token.into(), Remembered { caller: caller.clone(), exp, nbf });
    }
}

fn check_times(now: u64, exp: Option<u64>, nbf: Option<u64>) -> Result<(), Unknown> {
    if exp.is_some_and(|exp| now > exp + LEEWAY_S) {
        return Err(Unknown::ExpiredJwt);
    }
    if nbf.is_some_and(|nbf| now + LEEWAY_S < nbf) {
        return Err(Unknown::BadJwt);
    }
    Ok(())
}

/// What proved a caller: a secret holds for as long as the table; a JWT only until it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proof {
    Secret,
    Jwt,
}

/// Equal digests, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    equal_in_constant_time(a, b)
}

/// Equal byte strings, in time that depends on their lengths only.
pub(super) fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!constant_time_eq(&a, &b));
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            .into_bytes()
    }

    #[test]
    fn proxy_credentials_prove_a_caller_only_with_its_own_secret() {
        let dir = tempfile::tempdir().unwrap();
        // A secret may look like anything, a JWT's dots included.
        std::fs::write(dir.path().join("a"), "sec.ret.with-dots\n").unwrap();
        std::fs::write(dir.path().join("b"), "another-secret-b").unwrap();
        let caller = |name: &str, file: &str| CallerConfig {
            name: name.into(),
            secret_file: Some(dir.path().join(file)),
            uids: vec![],
            jwt: None,
            egress: true,
            rules: vec![],
        };
        let (table, problems) = Table::build(&[caller("a", "a"), caller("b", "b")]);
        assert!(problems.is_empty(), "{problems:?}");
        let who = |value: &[u8]| table.by_credentials(value).map(|(c, _)| c.name.to_string());
        assert_eq!(who(&basic("a", "sec.ret.with-dots")), Ok("a".into()));
        assert_eq!(who(&basic("b", "another-secret-b")), Ok("b".into()));
        assert_eq!(who(&basic("a", "another-secret-b")), Err(Unknown::WrongSecret), "b's secret is not a's");
        assert_eq!(who(&basic("a", "")), Err(Unknown::WrongSecret));
        assert_eq!(who(&basic("c", "sec.ret.with-dots")), Err(Unknown::BadJwt), "no caller's JWT either");
        assert_eq!(who(&basic("c", "whatever")), Err(Unknown::UnknownName));
        assert_eq!(who(b"Digest abc"), Err(Unknown::Scheme));
        assert_eq!(who(b"Basic !!!"), Err(Unknown::Scheme));
        assert_eq!(who(b"Bearer a.b.c"), Err(Unknown::BadJwt));

        // A connection remembers what its secret proved, for these credentials and this table.
        let peer = super::super::Peer::new(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            "proxy",
        );
        let name =
            |table: &Table, value: &[u8]| table.identify(Some(value), &peer).map(|c| c.name.to_string());
        assert_eq!(name(&table, &basic("a", "sec.ret.with-dots")), Ok("a".into()));
        assert!(peer.remembered(table.generation, &basic("a", "sec.ret.with-dots")).is_some());
        assert!(peer.remembered(table.generation, &basic("a", "sec.ret.with-dotz")).is_none());
        assert_eq!(name(&table, &basic("a", "another-secret-b")), Err(Unknown::WrongSecret));
        // A rotated secret is a new table: the old proof no longer holds.
        std::fs::write(dir.path().join("a"), "rotated-secret-a").unwrap();
        let (rotated, _) = Table::build(&[caller("a", "a"), caller("b", "b")]);
        assert!(peer.remembered(rotated.generation, &basic("a", "sec.ret.with-dots")).is_none());
        assert_eq!(name(&rotated, &basic("a", "sec.ret.with-dots")), Err(Unknown::WrongSecret));
        assert_eq!(name(&rotated, &basic("a", "rotated-secret-a")), Ok("a".into()));
    }

    #[test]
    fn an_unusable_secret_or_jwks_file_is_a_problem_and_closes_that_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), "abc").unwrap();
        std::fs::write(dir.path().join("jwks.json"), r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#)
            .unwrap();
        let config = CallerConfig {
            name: "x".into(),
            secret_file: Some(dir.path().join("short")),
            uids: vec![],
            jwt: Some(super::super::config::JwtConfig {
                jwks_file: dir.path().join("jwks.json"),
                issuer: "i".into(),
                audience: "a".into(),
                subject: None,
            }),
            egress: true,
            rules: vec![],
        };
        let (table, problems) = Table::build(&[config]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("no secret of at least 8 characters"), "{problems:?}");
        assert!(problems[1].contains("no usable public key"), "a shared (oct) key is not used: {problems:?}");
        assert_eq!(table.by_credentials(&basic("x", "abc")).map(|_| ()), Err(Unknown::WrongSecret));
    }

    #[test]
    fn a_token_is_held_between_its_times_with_the_leeway() {
        assert_eq!(check_times(1000, Some(1000), None), Ok(()));
        assert_eq!(check_times(1000 + LEEWAY_S + 1, Some(1000), None), Err(Unknown::ExpiredJwt));
        assert_eq!(check_times(1000, None, Some(1000 + LEEWAY_S + 1)), Err(Unknown::BadJwt));
        assert_eq!(check_times(1000, None, None), Ok(()));
    }
}
