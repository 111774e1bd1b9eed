//! Identifying secrets without revealing them.

use sha2::{Digest, Sha256};

/// The first 8 hex digits of the SHA-256 of `secret`: enough to tell two tokens apart in a log or
/// on `/tokens`, useless for recovering the token.
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..4])
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_is_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(super::fingerprint("abc"), "ba7816bf");
    }
}
