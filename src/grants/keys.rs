//! The private keys tokenproxy signs JWTs with (SPEC §14): RS256 and ES256 keys in PEM (PKCS#1,
//! PKCS#8, SEC1), signed by aws-lc-rs. A key is read from its file on every use, so a rotated key
//! is used from the next token request; it never shows itself (`Debug` and errors name the
//! algorithm, the key id and the file, never a byte of the key).

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa;
use aws_lc_rs::signature::{self, EcdsaKeyPair};
use base64::Engine as _;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Map, Value};

/// Why a key cannot sign. The messages never hold the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("cannot read the key file: {0}")]
    Unreadable(String),
    #[error("no PEM private key (PKCS#1 RSA, PKCS#8 or SEC1 EC) in it")]
    NotPem,
    #[error("a PKCS#1 key that is not a usable RSA key (2048 bits or more)")]
    BadRsa,
    #[error("a SEC1 key that is not a P-256 EC key (ES256)")]
    BadEc,
    #[error("a PKCS#8 key that is neither RSA (2048 bits or more) nor P-256 EC")]
    Unsupported,
    #[error("signing failed")]
    Signing,
}

/// A key that signs: RSA (RS256) or P-256 (ES256), with the key id its JWTs name.
pub struct SigningKey {
    pair: Pair,
    key_id: Option<String>,
}

enum Pair {
    Rsa(rsa::KeyPair),
    Ec(EcdsaKeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.describe())
    }
}

impl SigningKey {
    pub fn from_pem(pem: &[u8], key_id: Option<String>) -> Result<SigningKey, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPem)?;
        let pair = match &der {
            PrivateKeyDer::Pkcs1(key) => {
                Pair::Rsa(rsa::KeyPair::from_der(key.secret_pkcs1_der()).map_err(|_| KeyError::BadRsa)?)
            }
            PrivateKeyDer::Sec1(key) => Pair::Ec(
                EcdsaKeyPair::from_private_key_der(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    key.secret_sec1_der(),
                )
                .map_err(|_| KeyError::BadEc)?,
            ),
            PrivateKeyDer::Pkcs8(key) => {
                let der = key.secret_pkcs8_der();
                match rsa::KeyPair::from_pkcs8(der) {
                    Ok(pair) => Pair::Rsa(pair),
                    Err(_) => Pair::Ec(
                        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                            .map_err(|_| KeyError::Unsupported)?,
                    ),
                }
            }
            _ => return Err(KeyError::NotPem),
        };
        Ok(SigningKey { pair, key_id })
    }

    /// Reads and parses the key at `path`.
    pub fn read(path: &Path, key_id: Option<String>) -> Result<SigningKey, KeyError> {
        let pem = std::fs::read(path).map_err(|e| KeyError::Unreadable(e.kind().to_string()))?;
        SigningKey::from_pem(&pem, key_id)
    }

    /// The JWS `alg`.
    pub fn algorithm(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// `RS256 (RSA 2048 bits), kid "abc"`: what `check` says a key signs with.
    pub fn describe(&self) -> String {
        let kind = match &self.pair {
            Pair::Rsa(pair) => format!("RSA {} bits", pair.public_modulus_len() * 8),
            Pair::Ec(_) => "EC P-256".to_string(),
        };
        match &self.key_id {
            Some(kid) => format!("{} ({kind}), kid {kid:?}", self.algorithm()),
            None => format!("{} ({kind}), no kid", self.algorithm()),
        }
    }

    /// A signed JWT (JWS compact serialization) of `claims`.
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, KeyError> {
        let mut header = Map::new();
        header.insert("alg".into(), self.algorithm().into());
        header.insert("typ".into(), "JWT".into());
        if let Some(kid) = &self.key_id {
            header.insert("kid".into(), kid.as_str().into());
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let encode = |value: &Map<String, Value>| b64.encode(serde_json::to_vec(value).unwrap_or_default());
        let signing_input = format!("{}.{}", encode(&header), encode(claims));
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Rsa(pair) => {
                let mut signature = vec![0u8; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut signature)
                    .map_err(|_| KeyError::Signing)?;
                signature
            }
            Pair::Ec(pair) => {
                pair.sign(&rng, signing_input.as_bytes()).map_err(|_| KeyError::Signing)?.as_ref().to_vec()
            }
        };
        Ok(format!("{signing_input}.{}", b64.encode(signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    fn verify(jwt: &str, public: &[u8], rsa: bool) -> Map<String, Value> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (input, signature) = jwt.rsplit_once('.').unwrap();
        let signature = b64.decode(signature).unwrap();
        let result = if rsa {
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public).verify(input.as_bytes(), &signature)
        } else {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public).verify(input.as_bytes(), &signature)
        };
        assert!(result.is_ok(), "the signature does not verify");
        let claims = input.split('.').nth(1).unwrap();
        serde_json::from_slice(&b64.decode(claims).unwrap()).unwrap()
    }

    #[test]
    fn rsa_and_ec_keys_sign_jwts_their_public_keys_verify() {
        let mut claims = Map::new();
        claims.insert("iss".into(), "me".into());
        for (alg, rsa) in [(&rcgen::PKCS_RSA_SHA256, true), (&rcgen::PKCS_ECDSA_P256_SHA256, false)] {
            let pair = rcgen::KeyPair::generate_for(alg).unwrap();
            let key = SigningKey::from_pem(pair.serialize_pem().as_bytes(), Some("kid-1".into())).unwrap();
            assert_eq!(key.algorithm(), if rsa { "RS256" } else { "ES256" });
            let jwt = key.sign(&claims).unwrap();
            assert_eq!(verify(&jwt, pair.public_key_raw(), rsa), claims);
            let header = jwt.split('.').next().unwrap();
            let header: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap(),
            )
            .unwrap();
            assert_eq!(header["kid"], "kid-1");
            assert_eq!(header["alg"], key.algorithm());
            // What it says of itself holds no key material.
            let shown = format!("{key:?} {}", key.describe());
            assert!(!shown.contains(&pair.serialize_pem()[40..80]), "{shown}");
        }
    }

    #[test]
    fn what_is_not_a_usable_key_is_said_without_its_content() {
        assert_eq!(SigningKey::from_pem(b"nothing here", None).unwrap_err(), KeyError::NotPem);
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            SigningKey::from_pem(p384.serialize_pem().as_bytes(), None).unwrap_err(),
            KeyError::Unsupported,
            "only P-256 for ES256"
        );
        let missing = SigningKey::read(Path::new("/nonexistent/key.pem"), None).unwrap_err();
        assert!(matches!(missing, KeyError::Unreadable(_)), "{missing}");
    }
}
