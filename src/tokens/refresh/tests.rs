//! The refresher's state machine, one transition per test, in virtual time (tokio's paused
//! clock, which the provider's wall clock follows) against a scripted token endpoint and the
//! in-memory store: nothing here waits for real time or opens a socket.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use super::Trigger;
use crate::oauth::{IssuedToken, RefreshError, RefreshErrorKind};
use crate::secrets::fingerprint;
use crate::tokens::clock::Clock;
use crate::tokens::endpoint::{Issuing, TokenEndpoint};
use crate::tokens::store::Key;
use crate::tokens::store::memory::MemoryStore;
use crate::tokens::{Credential, Provider, TokenState};

/// What the scripted endpoint answers to one token request.
enum Answer {
    /// A token valid for `lifetime`, with a rotated refresh token or none.
    Issue {
        access: &'static str,
        refresh: Option<&'static str>,
        lifetime: Duration,
    },
    Fail(RefreshErrorKind),
}

fn issue(access: &'static str, refresh: Option<&'static str>) -> Answer {
    Answer::Issue { access, refresh, lifetime: Duration::from_secs(3600) }
}

/// A token endpoint that answers from a script and records every request: when it came and
/// which refresh token it carried. A request the script has no answer for fails the test.
struct Scripted {
    clock: Clock,
    /// How long each answer takes: long enough for concurrent callers to pile up.
    latency: Duration,
    answers: Mutex<VecDeque<Answer>>,
    calls: Mutex<Vec<(Instant, Option<String>)>>,
}

impl Scripted {
    fn calls(&self) -> Vec<(Instant, Option<String>)> {
        self.calls.lock().unwrap().clone()
    }

    fn sent(&self) -> Vec<Option<String>> {
        self.calls().into_iter().map(|(_, refresh)| refresh).collect()
    }

    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.answers.lock().unwrap().extend(answers);
    }
}

impl TokenEndpoint for Scripted {
    fn issue<'a>(
        &'a self,
        _: &'a crate::config::OAuthConfig,
        _account: Option<&'a str>,
        refresh: Option<&'a str>,
    ) -> Issuing<'a> {
        Box::pin(async move {
            self.calls.lock().unwrap().push((Instant::now(), refresh.map(str::to_string)));
            tokio::time::sleep(self.latency).await;
            let answer = self.answers.lock().unwrap().pop_front();
            match answer.expect("a token request the test did not expect") {
                Answer::Issue { access, refresh, lifetime } => Ok(IssuedToken {
                    access_token: access.into(),
                    refresh_token: refresh.map(str::to_string),
                    expires_at: self.clock.now() + lifetime,
                    token_type: None,
                    scope: None,
                    fields: serde_json::Map::new(),
                }),
                Answer::Fail(kind) => Err(RefreshError::new(kind, "scripted failure")),
            }
        })
    }
}

struct Rig {
    provider: Arc<Provider>,
    cred: Arc<Credential>,
    endpoint: Arc<Scripted>,
    store: Arc<MemoryStore>,
    start: OffsetDateTime,
}

const KEY: Key<'static> = Key { provider: "api", account: None };

/// A single-account provider (`refresh_before = 5m`, requests wait at most 10 s) whose stored
/// token (refresh token `r1`) expires `expires_in` from now: negative for an expired one.
async fn rig(expires_in: time::Duration) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &toml,
        "[providers.api]\nhosts = [\"api.test\"]\ntoken_file = \"api.json\"\n\
         [providers.api.oauth]\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"c\"\nclient_auth = \"none\"\n",
    )
    .unwrap();
    let config = crate::config::Config::load(&toml).unwrap().providers.remove(0);
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let clock = Clock::following_tokio(start);
    let store = Arc::new(MemoryStore::default());
    let expires_at = (start + expires_in).format(&Rfc3339).unwrap();
    store.put(KEY, json!({"access_token": "a0", "refresh_token": "r1", "expires_at": expires_at}));
    let endpoint = Arc::new(Scripted {
        clock,
        latency: Duration::from_millis(50),
        answers: Mutex::default(),
        calls: Mutex::default(),
    });
    let mut provider = Provider::new(config, Some(endpoint.clone()), Duration::from_secs(10), store.clone());
    provider.clock = clock;
    let provider = Arc::new(provider);
    provider.load_at_start().await;
    let cred = provider.single().unwrap().clone();
    Rig { provider, cred, endpoint, store, start }
}

fn expired() -> time::Duration {
    time::Duration::seconds(-10)
}

impl Rig {
    fn stored(&self, field: &str) -> Option<String> {
        self.store.get(KEY).unwrap().get(field).and_then(|v| v.as_str()).map(str::to_string)
    }

    fn current(&self) -> String {
        self.cred.current().unwrap().fingerprint.to_string()
    }

    async fn refresh(&self, trigger: Trigger) -> Result<String, RefreshError> {
        self.provider.refresh(&self.cred, trigger, None).await.map(|t| t.fingerprint.to_string())
    }

    fn state(&self) -> TokenState {
        self.provider.state(&self.cred, self.provider.clock.now())
    }
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_costs_one_token_request_for_any_number_of_waiters() {
    let rig = Arc::new(rig(expired()).await);
    rig.endpoint.script([issue("a1", Some("r2"))]);
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let rig = rig.clone();
            tokio::spawn(async move { rig.refresh(Trigger::Expired).await })
        })
        .collect();
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), fingerprint("a1"));
    }
    assert_eq!(rig.endpoint.sent(), [Some("r1".to_string())]);
    // The waiters queue in the process, not on the store's lock (a file lock, a Redis key).
    assert_eq!(rig.store.locks.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Written before it is used, with the rotated refresh token.
    assert_eq!(
        (rig.stored("access_token"), rig.stored("refresh_token")),
        (Some("a1".into()), Some("r2".into()))
    );
    assert_eq!(rig.state(), TokenState::Valid);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_refresh_token_is_the_one_sent_next_and_an_unrotated_one_is_kept() {
    let rig = rig(expired()).await;
    rig.endpoint.script([issue("a1", Some("r2")), issue("a2", None), issue("a3", None)]);
    for _ in 0..3 {
        let seen = rig.cred.current().unwrap().generation;
        rig.provider.refresh(&rig.cred, Trigger::Manual, Some(seen)).await.unwrap();
    }
    // r1 is spent once; the endpoint that stops rotating leaves r2 the live one.
    let sent = rig.endpoint.sent();
    assert_eq!(sent, [Some("r1".into()), Some("r2".into()), Some("r2".into())]);
    assert_eq!(
        (rig.stored("access_token"), rig.stored("refresh_token")),
        (Some("a3".into()), Some("r2".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_growing_jittered_backoff() {
    let rig = rig(expired()).await;
    use RefreshErrorKind::*;
    rig.endpoint.script([Answer::Fail(ServerError), Answer::Fail(NetworkError), issue("a1", None)]);
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap(), fingerprint("a1"));
    let calls = rig.endpoint.calls();
    assert_eq!(calls.len(), 3);
    // Full jitter: the n-th wait is below 200 ms * 2^n (after the answer's 50 ms).
    for (n, pair) in calls.windows(2).enumerate() {
        let waited = pair[1].0 - pair[0].0 - Duration::from_millis(50);
        assert!(waited < Duration::from_millis(200 << n), "wait {n} was {waited:?}");
    }
    assert!(rig.cred.status().retry_not_before.is_none(), "a success ends the backoff");
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_is_waited_out_to_the_millisecond_when_nobody_waits() {
    let rig = rig(time::Duration::minutes(2)).await;
    let after = Duration::from_secs(7);
    rig.endpoint.script([
        Answer::Fail(RefreshErrorKind::RateLimited { retry_after: Some(after) }),
        issue("a1", None),
    ]);
    assert_eq!(rig.refresh(Trigger::Proactive).await.unwrap(), fingerprint("a1"));
    let calls = rig.endpoint.calls();
    let waited = calls[1].0 - calls[0].0 - Duration::from_millis(50);
    assert!(waited >= after && waited < after + Duration::from_millis(5), "waited {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_backoff_longer_than_a_waiting_request_may_wait_fails_it_now_and_spares_the_endpoint() {
    let rig = rig(expired()).await;
    let after = Duration::from_secs(60);
    rig.endpoint.script([Answer::Fail(RefreshErrorKind::RateLimited { retry_after: Some(after) })]);
    let error = rig.refresh(Trigger::Expired).await.unwrap_err();
    assert_eq!(error.kind.label(), "rate_limited");
    assert_eq!(rig.endpoint.calls().len(), 1, "a request waits at most 10 s: no second call");

    // Until the backoff is over, callers get the failure without a token request...
    tokio::time::advance(Duration::from_secs(30)).await;
    let waiting = rig.refresh(Trigger::Expired).await.unwrap_err();
    assert!(waiting.message.contains("backing off for 31s more"), "{}", waiting.message);
    assert_eq!(rig.endpoint.calls().len(), 1);
    // ...except a person who forces it...
    rig.endpoint.script((0..5).map(|_| Answer::Fail(RefreshErrorKind::ServerError)));
    let forced = rig.provider.refresh_forced(&rig.cred, None).await.map(|t| t.generation).unwrap_err();
    assert_eq!(forced.kind.label(), "server_error");
    assert_eq!(rig.endpoint.calls().len(), 6, "forced: five attempts with backoff, within 10 s");
    // ...and once it is over, the next caller asks again.
    let backoff = rig.cred.status().retry_not_before.unwrap();
    tokio::time::advance(backoff - Instant::now()).await;
    rig.endpoint.script([issue("a1", None)]);
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap(), fingerprint("a1"));
    assert_eq!(rig.state(), TokenState::Valid);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_stop_after_five_attempts_and_leave_a_backoff() {
    let rig = rig(time::Duration::minutes(2)).await;
    rig.endpoint.script((0..5).map(|_| Answer::Fail(RefreshErrorKind::ServerError)));
    let error = rig.refresh(Trigger::Proactive).await.unwrap_err();
    assert_eq!(error.kind.label(), "server_error");
    assert_eq!(rig.endpoint.calls().len(), 5);
    assert!(rig.cred.status().retry_not_before.is_some_and(|until| until > Instant::now()));
    // The current token stays in use while it is valid.
    assert_eq!(rig.current(), fingerprint("a0"));
    assert_eq!(rig.state(), TokenState::Expiring);
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_stops_automatic_refreshes_until_a_person_acts() {
    let rig = rig(expired()).await;
    rig.endpoint.script([Answer::Fail(RefreshErrorKind::InvalidGrant)]);
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap_err().kind.label(), "invalid_grant");
    assert_eq!(rig.state(), TokenState::NeedsReauth);
    for trigger in [Trigger::Expired, Trigger::Proactive, Trigger::Unauthorized, Trigger::Startup] {
        assert_eq!(rig.refresh(trigger).await.unwrap_err().kind.label(), "invalid_grant");
    }
    assert_eq!(rig.endpoint.calls().len(), 1, "no automatic attempt after invalid_grant");
    // A manual refresh is the exception; its success ends needs_reauth.
    rig.endpoint.script([issue("a1", Some("r2"))]);
    assert_eq!(rig.refresh(Trigger::Manual).await.unwrap(), fingerprint("a1"));
    assert_eq!(rig.state(), TokenState::Valid);
}

#[tokio::test(start_paused = true)]
async fn invalid_client_is_the_providers_problem_until_a_refresh_succeeds() {
    let rig = rig(expired()).await;
    rig.endpoint.script([Answer::Fail(RefreshErrorKind::InvalidClient), issue("a1", None)]);
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap_err().kind.label(), "invalid_client");
    let problem = rig.provider.provider_problem().await.expect("a provider problem");
    assert!(problem.starts_with("invalid_client"), "{problem}");
    assert_eq!(rig.state(), TokenState::Error);
    rig.refresh(Trigger::Manual).await.unwrap();
    assert_eq!(rig.provider.provider_problem().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_newer_token_another_process_stored_is_adopted_instead_of_refreshing() {
    let rig = rig(expired()).await;
    let later = (rig.start + time::Duration::hours(1)).format(&Rfc3339).unwrap();
    rig.store.put(KEY, json!({"access_token": "b1", "refresh_token": "r9", "expires_at": later}));
    // No script: a token request would fail the test.
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap(), fingerprint("b1"));
    assert!(rig.endpoint.calls().is_empty());
    // The adopted document's refresh token is the one a later refresh spends.
    rig.endpoint.script([issue("b2", None)]);
    rig.refresh(Trigger::Manual).await.unwrap();
    assert_eq!(rig.endpoint.sent(), [Some("r9".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn a_401_for_a_token_already_replaced_costs_no_token_request() {
    let rig = rig(time::Duration::hours(1)).await;
    let failed = rig.cred.current().unwrap().generation;
    rig.endpoint.script([issue("a1", None)]);
    let fresh = rig.provider.refresh(&rig.cred, Trigger::Unauthorized, Some(failed)).await.unwrap();
    // Every request that saw the same token fail gets the one new token.
    let again = rig.provider.refresh(&rig.cred, Trigger::Unauthorized, Some(failed)).await.unwrap();
    assert_eq!(
        (fresh.fingerprint.as_str(), again.generation),
        (fingerprint("a1").as_str(), fresh.generation)
    );
    assert_eq!(rig.endpoint.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_is_not_refreshed_for_a_request_that_found_it_expired_a_moment_ago() {
    let rig = rig(time::Duration::hours(1)).await;
    // Expired and Startup ask only for an expired token; Proactive only inside the margin.
    for trigger in [Trigger::Expired, Trigger::Startup, Trigger::Proactive] {
        assert_eq!(rig.refresh(trigger).await.unwrap(), fingerprint("a0"));
    }
    assert!(rig.endpoint.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_background_refresher_refreshes_in_the_first_tenth_of_the_margin() {
    let rig = rig(time::Duration::hours(1)).await;
    rig.endpoint.script([issue("a1", Some("r2"))]);
    let task = tokio::spawn(rig.provider.clone().keep_fresh(rig.cred.clone()));
    // The margin (refresh_before = 5m) begins 55 minutes in.
    tokio::time::sleep(Duration::from_secs(54 * 60)).await;
    assert!(rig.endpoint.calls().is_empty(), "refreshed before the margin");
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    let calls = rig.endpoint.calls();
    assert_eq!(calls.len(), 1);
    let at = rig.provider.clock.now() - (Instant::now() - calls[0].0);
    let into_margin = at - (rig.start + time::Duration::minutes(55));
    assert!(
        into_margin >= time::Duration::ZERO && into_margin <= time::Duration::seconds(30),
        "{into_margin}"
    );
    assert_eq!(rig.current(), fingerprint("a1"));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_failed_background_refresh_waits_its_backoff_and_then_succeeds() {
    let rig = rig(expired()).await;
    let after = Duration::from_secs(90);
    rig.endpoint.script([Answer::Fail(RefreshErrorKind::RateLimited { retry_after: Some(after) })]);
    let task = tokio::spawn(rig.provider.clone().keep_fresh(rig.cred.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.endpoint.calls().len(), 1);
    assert_eq!(rig.state(), TokenState::Expired);
    // Nothing for the Retry-After's 90 s (the startup refresh's deadline is 10 s: it gave up).
    rig.endpoint.script([issue("a1", None)]);
    tokio::time::sleep(Duration::from_secs(85)).await;
    assert_eq!(rig.endpoint.calls().len(), 1, "asked again during Retry-After");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(rig.endpoint.calls().len(), 2);
    assert_eq!(rig.current(), fingerprint("a1"));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_be_locked_spends_nothing_and_is_asked_again_after_a_second() {
    use std::sync::atomic::Ordering::Relaxed;
    let rig = rig(expired()).await;
    rig.store.failing_locks.store(true, Relaxed);
    let error = rig.refresh(Trigger::Expired).await.unwrap_err();
    assert_eq!(error.kind.label(), "store_unavailable");
    assert!(error.message.contains("cannot take the refresh lock"), "{}", error.message);
    // The store's own error is the source, with its class; a person reads both.
    let cause =
        std::error::Error::source(&error).and_then(|s| s.downcast_ref::<crate::tokens::store::StoreError>());
    assert_eq!(cause.map(|c| c.class), Some(crate::tokens::store::StoreErrorClass::Unavailable));
    assert!(error.to_string().ends_with("the memory store is down (test)"), "{error}");
    // Within the second, callers get the failure without asking the store again.
    let locks = rig.store.locks.load(Relaxed);
    assert!(rig.refresh(Trigger::Expired).await.unwrap_err().message.contains("backing off"));
    assert_eq!(rig.store.locks.load(Relaxed), locks);
    // The store is back; after the second, the refresh goes on, and r1 was never spent before.
    rig.store.failing_locks.store(false, Relaxed);
    tokio::time::advance(Duration::from_secs(1)).await;
    rig.endpoint.script([issue("a1", Some("r2"))]);
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap(), fingerprint("a1"));
    assert_eq!(rig.endpoint.sent(), [Some("r1".to_string())]);
}

#[tokio::test(start_paused = true)]
async fn a_write_that_fails_keeps_the_new_token_in_use_and_its_refresh_token_for_the_next_refresh() {
    use std::sync::atomic::Ordering::Relaxed;
    let rig = rig(expired()).await;
    rig.store.failing_writes.store(true, Relaxed);
    rig.endpoint.script([issue("a1", Some("r2")), issue("a2", Some("r3"))]);
    // The refreshed token is used though it could not be stored (FIELD-NOTES #3)...
    assert_eq!(rig.refresh(Trigger::Expired).await.unwrap(), fingerprint("a1"));
    assert_eq!(rig.stored("refresh_token").as_deref(), Some("r1"));
    assert!(rig.cred.status().write_error.as_deref().is_some_and(|e| e.contains("could not be written")));
    // ...and the next refresh spends r2, held in memory, never the spent r1 the store still has.
    rig.store.failing_writes.store(false, Relaxed);
    let seen = rig.cred.current().unwrap().generation;
    rig.provider.refresh(&rig.cred, Trigger::Manual, Some(seen)).await.unwrap();
    assert_eq!(rig.endpoint.sent(), [Some("r1".into()), Some("r2".into())]);
    assert_eq!(
        (rig.stored("access_token"), rig.stored("refresh_token")),
        (Some("a2".into()), Some("r3".into()))
    );
    assert!(rig.cred.status().write_error.is_none());
}

/// SPEC §11 `min_replicas_ack`: a refresh whose write no replica acknowledged fails with
/// `store_unavailable`, the current token keeps serving, and the new one is used once a later
/// write of it is acknowledged: without spending its refresh token again, whether the failover
/// took the write back (`taken_back`) or the primary kept it.
async fn unacknowledged_write(taken_back: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let rig = rig(time::Duration::minutes(2)).await;
    rig.store.shared.store(true, Relaxed);
    let before = rig.store.get(KEY).unwrap();
    rig.store.unacknowledged_writes.store(true, Relaxed);
    rig.endpoint.script([issue("a1", Some("r2"))]);
    let error = rig.refresh(Trigger::Proactive).await.unwrap_err();
    assert_eq!(error.kind.label(), "store_unavailable");
    assert!(error.message.contains("used once a write of it is acknowledged"), "{}", error.message);
    assert_eq!(rig.current(), fingerprint("a0"), "an unacknowledged token was used");
    if taken_back {
        rig.store.put(KEY, serde_json::Value::Object(before));
    }
    // Replicas acknowledge again: the held token is written and used; r2 is the live one.
    rig.store.unacknowledged_writes.store(false, Relaxed);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(rig.refresh(Trigger::Proactive).await.unwrap(), fingerprint("a1"));
    assert_eq!(rig.current(), fingerprint("a1"));
    assert_eq!(rig.endpoint.sent(), [Some("r1".to_string())], "a refresh token was spent twice");
    assert_eq!(
        (rig.stored("access_token"), rig.stored("refresh_token")),
        (Some("a1".into()), Some("r2".into()))
    );
    // Used only after a write of it that was acknowledged: the first write, then another.
    assert_eq!(rig.store.saves.load(Relaxed), 2);
}

/// The same held token put in use by the watcher's read of the store instead of a refresh: the
/// failure it finishes is over (it stayed on `/tokens` and `/readyz` as `store_unavailable`).
#[tokio::test(start_paused = true)]
async fn an_unacknowledged_write_written_again_by_a_reload_clears_the_failure() {
    use std::sync::atomic::Ordering::Relaxed;
    let rig = rig(time::Duration::minutes(2)).await;
    rig.store.shared.store(true, Relaxed);
    rig.store.unacknowledged_writes.store(true, Relaxed);
    rig.endpoint.script([issue("a1", Some("r2"))]);
    rig.refresh(Trigger::Proactive).await.unwrap_err();
    assert!(rig.provider.store_trouble().is_some_and(|t| t.contains("acknowledged")));
    rig.store.unacknowledged_writes.store(false, Relaxed);
    rig.provider.reload(&rig.cred).await;
    assert_eq!(rig.current(), fingerprint("a1"));
    assert_eq!(rig.provider.store_trouble(), None);
    let status = rig.cred.status();
    assert!(status.retry_not_before.is_none() && status.last_error.is_none(), "{:?}", status.last_error);
}

#[tokio::test(start_paused = true)]
async fn an_unacknowledged_write_that_a_failover_took_back_is_written_again_then_used() {
    unacknowledged_write(true).await;
}

#[tokio::test(start_paused = true)]
async fn an_unacknowledged_write_the_primary_kept_is_written_again_then_used() {
    unacknowledged_write(false).await;
}

#[tokio::test(start_paused = true)]
async fn requests_that_find_the_token_expiring_start_one_background_refresh() {
    let rig = rig(time::Duration::minutes(2)).await;
    rig.endpoint.script([issue("a1", None)]);
    for _ in 0..50 {
        rig.provider.refresh_ahead(&rig.cred);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.endpoint.calls().len(), 1);
    assert_eq!(rig.current(), fingerprint("a1"));
}
