//! The metric names of SPEC §7 and the only functions that record them.
//!
//! Labels carry provider names, status classes and result classes: never a token, never a host
//! from a request (which would let a client grow the label set without bound).

use std::time::Duration;

use http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "tokenproxy_requests_total";
pub const REQUEST_DURATION: &str = "tokenproxy_request_duration_seconds";
pub const UPSTREAM_UNAUTHORIZED_TOTAL: &str = "tokenproxy_upstream_unauthorized_total";
pub const RETRIES_TOTAL: &str = "tokenproxy_retries_total";
pub const REFRESHES_TOTAL: &str = "tokenproxy_refreshes_total";
pub const REFRESH_DURATION: &str = "tokenproxy_refresh_duration_seconds";
pub const TOKEN_EXPIRES_IN: &str = "tokenproxy_token_expires_in_seconds";
pub const TOKEN_RELOADS_TOTAL: &str = "tokenproxy_token_reloads_total";

/// The `provider` label of a request that matched no provider.
pub const NO_PROVIDER: &str = "none";

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the process-wide recorder. Without the exporter's HTTP listener its upkeep must be
/// run by the caller (the admin server does it on every scrape and on a timer).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    Ok(handle)
}

/// The per-request metrics of one provider (or of unmatched requests), registered once so that
/// the request path does no label formatting, hashing or registry lookup.
pub struct RequestMetrics {
    /// `1xx` … `5xx`.
    by_class: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl RequestMetrics {
    /// Registers the handles; the recorder must be installed first (without one they are no-ops).
    pub fn new(provider: &str) -> RequestMetrics {
        let counter = |class: &'static str| metrics::counter!(REQUESTS_TOTAL, "provider" => provider.to_string(), "status" => class);
        RequestMetrics {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(counter),
            duration: metrics::histogram!(REQUEST_DURATION, "provider" => provider.to_string()),
        }
    }

    /// The handles for requests that matched no provider.
    pub fn unmatched() -> &'static RequestMetrics {
        static UNMATCHED: std::sync::OnceLock<RequestMetrics> = std::sync::OnceLock::new();
        UNMATCHED.get_or_init(|| RequestMetrics::new(NO_PROVIDER))
    }

    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

pub fn token_reload(provider: &str, result: &'static str) {
    metrics::counter!(TOKEN_RELOADS_TOTAL, "provider" => provider.to_string(), "result" => result)
        .increment(1);
}

pub fn token_expires_in(provider: &str, seconds: f64) {
    metrics::gauge!(TOKEN_EXPIRES_IN, "provider" => provider.to_string()).set(seconds);
}

/// Leaf certificates minted for intercepted hosts (an extension of SPEC §7).
pub const LEAF_CERTIFICATES_ISSUED_TOTAL: &str = "tokenproxy_leaf_certificates_issued_total";
/// Intercepted connections served with a cached leaf certificate (an extension of SPEC §7).
pub const LEAF_CACHE_HITS_TOTAL: &str = "tokenproxy_leaf_cache_hits_total";

pub fn leaf_issued() {
    metrics::counter!(LEAF_CERTIFICATES_ISSUED_TOTAL).increment(1);
}

pub fn leaf_cache_hit() {
    metrics::counter!(LEAF_CACHE_HITS_TOTAL).increment(1);
}

pub fn refresh(provider: &str, trigger: &'static str, result: &'static str, elapsed: Duration) {
    metrics::counter!(REFRESHES_TOTAL, "provider" => provider.to_string(), "trigger" => trigger, "result" => result)
        .increment(1);
    metrics::histogram!(REFRESH_DURATION, "provider" => provider.to_string()).record(elapsed.as_secs_f64());
}

pub fn upstream_unauthorized(provider: &str) {
    metrics::counter!(UPSTREAM_UNAUTHORIZED_TOTAL, "provider" => provider.to_string()).increment(1);
}

/// `result`: `ok`, `unauthorized`, `error`, `not_replayable`, `refresh_failed`.
pub fn retry(provider: &str, result: &'static str) {
    metrics::counter!(RETRIES_TOTAL, "provider" => provider.to_string(), "result" => result).increment(1);
}

/// Token file writes after a refresh (an extension of SPEC §7): `result` is `ok` or `error`.
pub const TOKEN_WRITES_TOTAL: &str = "tokenproxy_token_writes_total";

pub fn token_write(provider: &str, result: &'static str) {
    metrics::counter!(TOKEN_WRITES_TOTAL, "provider" => provider.to_string(), "result" => result)
        .increment(1);
}

pub const ACCOUNTS: &str = "tokenproxy_accounts";

/// How many of a provider's loaded accounts are in `state` (SPEC §7): accounts are counted,
/// never a label.
pub fn accounts(provider: &str, state: &'static str, count: usize) {
    metrics::gauge!(ACCOUNTS, "provider" => provider.to_string(), "state" => state).set(count as f64);
}

pub const AUTHORIZATIONS_TOTAL: &str = "tokenproxy_authorizations_total";

/// How onboarding flows ended (SPEC §7, §9): `ok`, `access_denied`, `state_unknown`,
/// `state_expired`, `exchange_failed`, `write_failed`.
pub fn authorization(provider: &str, result: &'static str) {
    metrics::counter!(AUTHORIZATIONS_TOTAL, "provider" => provider.to_string(), "result" => result)
        .increment(1);
}

pub const STORE_OPERATIONS_TOTAL: &str = "tokenproxy_store_operations_total";

/// Operations on the shared token store (SPEC §7, §11): `op` is `read`, `write`, `lock` or
/// `failover` (a new primary followed); `result` is `ok`, `conflict`, `error` or
/// `unacknowledged` (fewer replicas than `min_replicas_ack` held it in time).
pub fn store_operation(op: &'static str, result: &'static str) {
    metrics::counter!(STORE_OPERATIONS_TOTAL, "op" => op, "result" => result).increment(1);
}
