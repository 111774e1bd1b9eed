//! Secrets tokenproxy makes (random tokens), and what can be read of one without revealing or
//! trusting it: its fingerprint, and a JWT's expiry.

use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The first 8 hex digits of the SHA-256 of `secret`: enough to tell two tokens apart in a log or
/// on `/tokens`, useless for recovering the token.
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..4])
}

/// 32 random bytes, base64url: an OAuth state, a PKCE verifier (43 characters, RFC 7636 §4.1),
/// a browser cookie, a lock's owner.
pub fn random_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The `exp` claim of a JWT, read without verifying the signature: it only tells when to refresh.
pub fn jwt_exp(token: &str) -> Option<OffsetDateTime> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64().filter(|e| e.is_finite())?;
    OffsetDateTime::from_unix_timestamp(exp.trunc() as i64).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_is_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(super::fingerprint("abc"), "ba7816bf");
    }
}
