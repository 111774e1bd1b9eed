//! Pending browser authorizations, on disk (SPEC §9): one 0600 file per flow in
//! `[onboarding] state_dir`, named by the SHA-256 of its state. The state itself (what the
//! provider sends back) is never stored or logged, so the folder's content cannot finish a flow.
//! A file survives restarts, is valid for `state_ttl`, is removed by the callback that uses it,
//! and is swept some time after it expires.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::fsutil::{Existing, write_atomically};

/// An expired flow's file is kept this long after its expiry, so that a late callback hears
/// "expired" rather than "unknown"; then a sweep removes it.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);

/// What a pending flow remembers between its start and its callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub provider: String,
    pub account: Option<String>,
    /// The PKCE verifier; `None` when the provider has `pkce = false`.
    pub code_verifier: Option<String>,
    pub redirect_uri: String,
    /// SHA-256 (hex) of the browser cookie that started the flow.
    pub browser: String,
    /// The id `tokenproxy authorize` put in its link, so that it hears its own flow's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Why a callback's state cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateProblem {
    /// Never issued, already used, or presented by another browser.
    Unknown(&'static str),
    /// Issued and not used, but too late; the flow it belonged to.
    Expired(Box<(String, Option<String>, Option<String>)>),
    /// The folder cannot be read or written.
    Io(String),
}

/// The folder of pending flows, with an index of them in memory (oldest first), so that a new
/// flow costs one file write however many are pending, and the cap drops the oldest.
#[derive(Debug, Clone)]
pub struct PendingFlows {
    dir: PathBuf,
    pub ttl: Duration,
    max_pending: usize,
    /// File names (`<sha256 of the state>.json`), oldest first.
    index: Arc<Mutex<VecDeque<String>>>,
}

impl PendingFlows {
    pub fn new(dir: PathBuf, ttl: Duration, max_pending: usize) -> PendingFlows {
        PendingFlows { dir, ttl, max_pending: max_pending.max(1), index: Arc::default() }
    }

    /// Reads the folder once (at start, before serving): indexes what is pending by age and
    /// drops the oldest beyond the cap.
    pub fn load(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut found: Vec<(std::time::SystemTime, String)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
                name.ends_with(".json").then_some((modified, name))
            })
            .collect();
        found.sort();
        let mut index = self.lock_index();
        *index = found.into_iter().map(|(_, name)| name).collect();
        self.trim(&mut index, self.max_pending);
        index.len()
    }

    #[cfg(test)]
    pub fn pending_count(&self) -> usize {
        self.lock_index().len()
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the oldest flows until at most `keep` are pending; how many went.
    fn trim(&self, index: &mut VecDeque<String>, keep: usize) -> usize {
        let mut dropped = 0;
        while index.len() > keep {
            let Some(oldest) = index.pop_front() else { break };
            let _ = std::fs::remove_file(self.dir.join(&oldest));
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max_pending = self.max_pending,
                "pending authorizations over [onboarding] max_pending; the oldest were dropped"
            );
        }
        dropped
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `pending` under a new random state, which it returns (for the authorization URL
    /// only).
    /// One file write, whatever the number pending; beyond `max_pending` the oldest is dropped.
    pub fn create(&self, pending: &Pending) -> std::io::Result<String> {
        create_private_dir(&self.dir)?;
        let state = crate::secrets::random_token();
        let bytes = serde_json::to_vec_pretty(pending).map_err(std::io::Error::other)?;
        let name = file_name(&state);
        write_atomically(&self.dir.join(&name), &bytes, 0o600, Existing::Keep)?;
        let mut index = self.lock_index();
        index.push_back(name);
        self.trim(&mut index, self.max_pending);
        Ok(state)
    }

    /// Uses the flow `state` names, once: checks it is known, was started by the browser whose
    /// cookie is `browser_cookie` and has not expired, then removes it. Of two callbacks with the
    /// same state, one gets the flow and the other `Unknown`.
    pub fn take(&self, state: &str, browser_cookie: Option<&str>) -> Result<Pending, StateProblem> {
        let path = self.file(state);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateProblem::Unknown(
                    "this authorization was never started here, or was already finished",
                ));
            }
            Err(e) => return Err(StateProblem::Io(format!("{}: {e}", self.dir.display()))),
        };
        let pending: Pending = serde_json::from_slice(&bytes)
            .map_err(|_| StateProblem::Unknown("the pending authorization's file is damaged"))?;
        // Expiry first: the flow's cookie expires with it, so a late callback from the right
        // browser comes without it, and must hear "expired", not "another browser".
        let expired = pending.expires_at <= OffsetDateTime::now_utc();
        // Another browser's callback does not use the flow up: the right browser may still come.
        if !expired && browser_cookie.map(sha256_hex).as_deref() != Some(pending.browser.as_str()) {
            return Err(StateProblem::Unknown("this browser did not start this authorization"));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateProblem::Unknown("this authorization was already finished"));
            }
            Err(e) => return Err(StateProblem::Io(format!("{}: {e}", self.dir.display()))),
        }
        let name = file_name(state);
        self.lock_index().retain(|n| *n != name);
        if expired {
            return Err(StateProblem::Expired(Box::new((pending.provider, pending.account, pending.flow))));
        }
        Ok(pending)
    }

    /// Removes flows that expired more than a day ago, and temporaries a crash left behind.
    pub fn sweep(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let now = OffsetDateTime::now_utc();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = if name.ends_with(".json") {
                std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
                    .is_none_or(|p| p.expires_at + KEEP_EXPIRED < now)
            } else {
                // A temporary of an interrupted write.
                name.starts_with('.')
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
            };
            if stale && std::fs::remove_file(&path).is_ok() {
                self.lock_index().retain(|n| *n != name);
                removed += 1;
            }
        }
        removed
    }

    fn file(&self, state: &str) -> PathBuf {
        self.dir.join(file_name(state))
    }
}

fn file_name(state: &str) -> String {
    format!("{}.json", sha256_hex(state))
}

/// The name of the cookie that binds the flow `state` names to its browser: one per flow, so
/// that two flows started in one browser do not replace each other's cookie.
pub fn cookie_name(state: &str) -> String {
    format!("{}_{}", super::http::FLOW_COOKIE, &sha256_hex(&format!("cookie:{state}"))[..16])
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
}

/// The S256 code challenge of `verifier` (RFC 7636 §4.2).
pub fn code_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(ttl: time::Duration, cookie: &str) -> Pending {
        let now = OffsetDateTime::now_utc();
        Pending {
            provider: "p".into(),
            account: Some("alice".into()),
            code_verifier: Some(crate::secrets::random_token()),
            redirect_uri: "http://127.0.0.1:9090/oauth/callback".into(),
            browser: sha256_hex(cookie),
            flow: None,
            created_at: now,
            expires_at: now + ttl,
        }
    }

    #[test]
    fn a_flow_is_used_once_by_its_own_browser_and_its_state_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let flows = PendingFlows::new(dir.path().join("state"), Duration::from_secs(3600), 100);
        let state = flows.create(&pending(time::Duration::hours(1), "cookie-1")).unwrap();
        let files: Vec<_> = std::fs::read_dir(flows.dir()).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().to_string_lossy().into_owned();
        assert_eq!(name, format!("{}.json", sha256_hex(&state)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(files[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!std::fs::read_to_string(files[0].path()).unwrap().contains(&state));

        assert!(matches!(flows.take(&state, None), Err(StateProblem::Unknown(_))));
        assert!(matches!(flows.take(&state, Some("cookie-2")), Err(StateProblem::Unknown(_))));
        let taken = flows.take(&state, Some("cookie-1")).unwrap();
        assert_eq!(taken.account.as_deref(), Some("alice"));
        assert!(matches!(flows.take(&state, Some("cookie-1")), Err(StateProblem::Unknown(_))));
        assert!(matches!(flows.take("never-issued", Some("cookie-1")), Err(StateProblem::Unknown(_))));
    }

    #[test]
    fn an_expired_flow_says_so_and_old_ones_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let flows = PendingFlows::new(dir.path().to_path_buf(), Duration::from_secs(1), 100);
        let state = flows.create(&pending(time::Duration::seconds(-5), "c")).unwrap();
        assert!(matches!(flows.take(&state, Some("c")), Err(StateProblem::Expired(_))));
        // The cookie expired with the flow: the late callback comes without it, and hears
        // "expired" all the same.
        let late = flows.create(&pending(time::Duration::seconds(-5), "c")).unwrap();
        assert!(matches!(flows.take(&late, None), Err(StateProblem::Expired(_))));
        let old = flows.create(&pending(time::Duration::days(-2), "c")).unwrap();
        let fresh = flows.create(&pending(time::Duration::hours(1), "c")).unwrap();
        assert_eq!(flows.sweep(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(flows.pending_count(), 1);
        assert!(matches!(flows.take(&old, Some("c")), Err(StateProblem::Unknown(_))));
        assert!(flows.take(&fresh, Some("c")).is_ok());
    }

    #[test]
    fn beyond_max_pending_the_oldest_flow_is_dropped_and_a_restart_keeps_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let flows = PendingFlows::new(dir.path().to_path_buf(), Duration::from_secs(3600), 3);
        let states: Vec<String> = (0..5)
            .map(|_| {
                // Apart by more than the file system's coarse clock, so a restart sees their order.
                std::thread::sleep(Duration::from_millis(25));
                flows.create(&pending(time::Duration::hours(1), "c")).unwrap()
            })
            .collect();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        assert!(matches!(flows.take(&states[0], Some("c")), Err(StateProblem::Unknown(_))));
        assert!(matches!(flows.take(&states[1], Some("c")), Err(StateProblem::Unknown(_))));
        assert!(flows.take(&states[2], Some("c")).is_ok());
        // A restart with a smaller cap reads the folder once and keeps the newest.
        let again = PendingFlows::new(dir.path().to_path_buf(), Duration::from_secs(3600), 1);
        assert_eq!(again.load(), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(again.take(&states[4], Some("c")).is_ok());
    }

    #[test]
    fn the_challenge_is_rfc_7636s_example() {
        // RFC 7636 Appendix B.
        assert_eq!(
            code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(crate::secrets::random_token().len(), 43);
    }
}
