//! Callers (SPEC §13): who is asking, and which credential each may use.
//!
//! Without `[callers.*]` every client that reaches the proxy is trusted, as before. With at least
//! one, the decision point ([`crate::proxy::decide`]) asks [`Table::identify`] who a request
//! belongs to and [`Caller::allow`] whether one of its rules lets it use the provider's
//! credential. The table is read lock-free on every request and replaced whole when the config,
//! a secret file or a JWKS file changes ([`reload`]): a revoked caller's next request, in a tunnel
//! it already holds too, sees the new table.
//!
//! The folder: [`config`] (the TOML keys), [`identity`] (proxy credentials, JWTs), [`peer`] (the
//! owner of a client's socket), [`policy`] (the rules), [`reload`] (replacing the table).

pub mod config;
mod identity;
pub mod peer;
pub mod policy;
pub mod reload;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use self::config::CallerConfig;
pub use identity::Unknown;
pub use peer::Peer;
pub use policy::{Allowed, Denial};

/// The callers in force, replaced whole on a reload.
pub struct Callers {
    table: ArcSwap<Table>,
    /// Told of every replacement: an opaque tunnel has no request to refuse, so it asks again
    /// whether its caller may still hold it ([`Callers::replaced`]).
    replacements: tokio::sync::watch::Sender<()>,
}

impl Callers {
    pub fn new(table: Table) -> Callers {
        Callers { table: ArcSwap::from_pointee(table), replacements: tokio::sync::watch::Sender::new(()) }
    }

    /// Resolves each time the table is replaced.
    pub fn replaced(&self) -> tokio::sync::watch::Receiver<()> {
        self.replacements.subscribe()
    }

    /// The table for one decision.
    pub fn current(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    pub fn replace(&self, table: Table) {
        self.table.store(Arc::new(table));
        self.replacements.send_replace(());
    }
}

/// Every caller, with the indexes a request is matched by.
#[derive(Default)]
pub struct Table {
    by_name: HashMap<Box<str>, Arc<Caller>>,
    by_uid: HashMap<u32, Arc<Caller>>,
    /// Callers with a `jwt` identity, in name order.
    by_jwt: Vec<Arc<Caller>>,
    /// JWTs already verified against this table (a table with other keys starts empty).
    verified: identity::Verified,
    /// What the table was built from, to tell whether a reload changed anything.
    pub(crate) configs: Vec<CallerConfig>,
    /// Unique to this table: what a connection remembers of its caller holds only while the
    /// table it was found in is in force ([`Peer::remembered`]).
    generation: u64,
}

/// One caller: its identities, its rules, its decision counters.
pub struct Caller {
    pub name: Arc<str>,
    identity: identity::Identities,
    pub egress: bool,
    rules: Vec<policy::Rule>,
    decisions: [metrics::Counter; 2],
}

impl Caller {
    /// Counts one decision in `tokenproxy_decisions_total`.
    pub fn count(&self, allowed: bool) {
        self.decisions[usize::from(allowed)].increment(1);
    }
}

/// `tokenproxy_decisions_total` for requests that belong to no caller.
pub fn count_unknown() {
    metrics::counter!("tokenproxy_decisions_total", "caller" => UNKNOWN_LABEL, "decision" => "deny")
        .increment(1);
}

/// The `caller` label of a request no caller was found for (not a caller name: those cannot
/// hold parentheses).
pub const UNKNOWN_LABEL: &str = "(unknown)";

impl Table {
    /// Builds the table, reading every secret and JWKS file. A file that cannot be used is a
    /// problem each: its identity matches nothing (at start the problems stop the start; on a
    /// reload they are logged and that identity stays closed).
    pub fn build(configs: &[CallerConfig]) -> (Table, Vec<String>) {
        let mut problems = Vec::new();
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut table = Table { configs: configs.to_vec(), generation, ..Table::default() };
        for config in configs {
            let name: Arc<str> = config.name.as_str().into();
            let identity = identity::Identities::load(config, &mut problems);
            let counter = |decision: &'static str| metrics::counter!("tokenproxy_decisions_total", "caller" => name.to_string(), "decision" => decision);
            let caller = Arc::new(Caller {
                identity,
                egress: config.egress,
                rules: config.rules.iter().map(|r| policy::Rule::new(r, &config.name)).collect(),
                decisions: [counter("deny"), counter("allow")],
                name,
            });
            for uid in &config.uids {
                table.by_uid.insert(*uid, caller.clone());
            }
            if config.jwt.is_some() {
                table.by_jwt.push(caller.clone());
            }
            table.by_name.insert(config.name.as_str().into(), caller);
        }
        (table, problems)
    }

    /// Whether any caller is configured: none means every client is trusted.
    pub fn is_open(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Who a request belongs to: the caller its proxy credentials (`Proxy-Authorization`, of
    /// the request or its tunnel's CONNECT) prove, or with none, the caller owning the client's
    /// socket. Credentials that prove no caller are refused, not passed over for the uid.
    pub fn identify(&self, credentials: Option<&[u8]>, peer: &Peer) -> Result<Arc<Caller>, Unknown> {
        match credentials {
            Some(value) => {
                // A keep-alive connection sends the same credentials with every request: the
                // caller its secret proved is remembered until the table is replaced.
                if let Some(caller) = peer.remembered(self.generation, value) {
                    return Ok(caller);
                }
                let (caller, proof) = self.by_credentials(value)?;
                if proof == identity::Proof::Secret {
                    peer.remember(self.generation, value, &caller);
                }
                Ok(caller)
            }
            None if self.by_uid.is_empty() => Err(Unknown::NoIdentity),
            None => match peer.uid() {
                Some(uid) => self.by_uid.get(&uid).cloned().ok_or(Unknown::Uid),
                None => Err(Unknown::NoIdentity),
            },
        }
    }
}
