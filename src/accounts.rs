//! Account names (SPEC §8): the one check a name passes before it may pick a token file, and the
//! fingerprint that logs use instead of the name.

use crate::secrets::fingerprint;

/// The longest account name.
pub const MAX_LEN: usize = 128;

/// Why a name cannot be an account name. The message never repeats the name: it came from a
/// request and may be anything, and error messages reach logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadAccount {
    #[error("an account name cannot be empty")]
    Empty,
    #[error("an account name has at most {MAX_LEN} characters")]
    TooLong,
    #[error("an account name cannot start with '.'")]
    LeadingDot,
    #[error("an account name may hold only A-Z a-z 0-9 . _ @ + -")]
    Character,
    #[error("the request names two different accounts in Tokenproxy-Account headers")]
    Conflicting,
}

/// 1–128 characters from `A-Z a-z 0-9 . _ @ + -`, not starting with `.`: no separator, no
/// `..`, nothing a file system reads specially.
pub fn check(name: &str) -> Result<(), BadAccount> {
    if name.is_empty() {
        return Err(BadAccount::Empty);
    }
    if name.len() > MAX_LEN {
        return Err(BadAccount::TooLong);
    }
    if name.starts_with('.') {
        return Err(BadAccount::LeadingDot);
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-')) {
        return Err(BadAccount::Character);
    }
    Ok(())
}

/// How logs name an account: the first 8 hex digits of its name's SHA-256.
pub fn log_name(name: &str) -> String {
    fingerprint(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_folder_or_hide_in_it_are_refused() {
        for ok in ["alice", "a", "user@example.com", "A.b_c+d-e", "x".repeat(128).as_str(), "1234"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        assert_eq!(check(""), Err(BadAccount::Empty));
        assert_eq!(check(&"x".repeat(129)), Err(BadAccount::TooLong));
        for dot in [".", "..", ".hidden", "../etc"] {
            assert_eq!(check(dot), Err(BadAccount::LeadingDot), "{dot}");
        }
        for bad in ["a/b", "a\\b", "a b", "a\0b", "ä", "a:b", "%2e%2e", "a\nb", "{account}"] {
            assert_eq!(check(bad), Err(BadAccount::Character), "{bad:?}");
        }
    }

    #[test]
    fn the_log_name_is_a_fingerprint_not_the_name() {
        assert_eq!(log_name("alice").len(), 8);
        assert_ne!(log_name("alice"), log_name("bob"));
        assert!(!log_name("alice").contains("alice"));
    }
}
