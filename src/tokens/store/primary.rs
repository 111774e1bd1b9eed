//! Where the Redis primary is (SPEC §11): the one node `url` names, or the primary that Redis
//! Sentinel names, followed across failovers.
//!
//! With sentinels, a follower task asks them every [`CHECK_EVERY`] which node is the primary
//! (`SENTINEL get-master-addr-by-name`), and at once when a call was refused because the node it
//! reached is a replica now (`READONLY`: a stale primary that came back and was demoted). A new
//! address is checked with `ROLE` before it is used, then every call goes to it, and the change
//! feed subscribes again there (it watches [`Primary::changes`]).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio::sync::{Mutex, Notify, watch};

use super::StoreError;
use crate::config::{RedisSettings, SentinelSettings};
use crate::metrics;

/// How long one Redis call may take before the store counts as unavailable.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the sentinels are asked where the primary is: a failover is followed within this
/// (and the sentinels' own promotion time).
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// One data node: a client (for the change feed's own connection) and the shared connection.
pub(super) struct Node {
    pub client: redis::Client,
    pub connection: ConnectionManager,
    /// `host:port`, for messages.
    pub address: String,
}

pub(super) struct Primary {
    node: ArcSwapOption<Node>,
    /// Counts the primaries followed; the change feed subscribes again when it moves.
    changes: watch::Sender<u64>,
    sentinel: Option<Arc<Sentinels>>,
    recheck: Notify,
    /// What the last look at the sentinels found wrong, for `/readyz` and errors.
    problem: std::sync::Mutex<Option<String>>,
    /// One look at a time: the follower's and a caller's that found no primary yet.
    looking: Mutex<()>,
}

/// The sentinels and how to reach the nodes they name.
struct Sentinels {
    settings: SentinelSettings,
    clients: Vec<(String, redis::Client)>,
    connections: Mutex<Vec<Option<MultiplexedConnection>>>,
    /// `url` with the password: the primary's host and port replace its own.
    node_url: url::Url,
    tls_roots: Option<Vec<u8>>,
}

fn connection_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CALL_TIMEOUT))
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_number_of_retries(1)
}

fn client(url: &str, tls_roots: &Option<Vec<u8>>) -> redis::RedisResult<redis::Client> {
    match tls_roots {
        Some(roots) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates { client_tls: None, root_cert: Some(roots.clone()) },
        ),
        None => redis::Client::open(url),
    }
}

impl Node {
    fn open(url: &str, address: String, tls_roots: &Option<Vec<u8>>) -> redis::RedisResult<Node> {
        let client = client(url, tls_roots)?;
        // Lazy: a node that is down is an error of the first call, not of the start.
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), connection_config())?;
        Ok(Node { client, connection, address })
    }
}

impl Primary {
    /// The primary for these settings; with sentinels, the follower task starts (it ends when
    /// the `Primary` is dropped).
    pub fn new(settings: &RedisSettings, tls_roots: Option<Vec<u8>>) -> Result<Arc<Primary>, StoreError> {
        let bad =
            |e: redis::RedisError| StoreError::config(format!("store {}", settings.shown_url)).caused_by(e);
        let Some(sentinel) = &settings.sentinel else {
            let node =
                Node::open(settings.url.expose(), settings.shown_url.clone(), &tls_roots).map_err(bad)?;
            return Ok(Arc::new(Primary {
                node: ArcSwapOption::from_pointee(node),
                changes: watch::channel(0).0,
                sentinel: None,
                recheck: Notify::new(),
                problem: Default::default(),
                looking: Mutex::new(()),
            }));
        };
        let node_url = url::Url::parse(settings.url.expose())
            .map_err(|e| StoreError::config(format!("store {}", settings.shown_url)).caused_by(e))?;
        let mut clients = Vec::new();
        for (host, port) in &sentinel.sentinels {
            let mut url = node_url.clone();
            let _ = url.set_host(Some(host));
            let _ = url.set_port(Some(*port));
            let _ = url.set_username("");
            let _ = url.set_password(sentinel.password.as_ref().map(|p| p.expose()));
            // Sentinels have no databases.
            url.set_path("");
            clients.push((format!("{host}:{port}"), client(url.as_str(), &tls_roots).map_err(bad)?));
        }
        let sentinels = Arc::new(Sentinels {
            settings: sentinel.clone(),
            connections: Mutex::new(vec![None; clients.len()]),
            clients,
            node_url,
            tls_roots,
        });
        let primary = Arc::new(Primary {
            node: ArcSwapOption::empty(),
            changes: watch::channel(0).0,
            sentinel: Some(sentinels),
            recheck: Notify::new(),
            problem: Default::default(),
            looking: Mutex::new(()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow(Arc::downgrade(&primary)));
        }
        Ok(primary)
    }

    /// The current primary's connection; with sentinels and none known yet, they are asked now.
    pub async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        Ok(self.node().await?.connection.clone())
    }

    pub async fn node(&self) -> Result<Arc<Node>, StoreError> {
        if let Some(node) = self.node.load_full() {
            return Ok(node);
        }
        self.look().await;
        self.node.load_full().ok_or_else(|| {
            let problem =
                self.problem.lock().unwrap().clone().unwrap_or_else(|| "no primary known yet".into());
            StoreError::unavailable(problem)
        })
    }

    /// Moves whenever another primary is followed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Called with every failed call: a node that refuses writes is no longer the primary.
    pub fn saw(&self, error: &redis::RedisError) {
        let demoted = error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            // A script's write on a replica comes back as the script's error.
            || error.to_string().contains("READONLY");
        let unreachable =
            error.is_connection_dropped() || error.is_connection_refusal() || error.is_timeout();
        if self.sentinel.is_some() && (demoted || unreachable) {
            self.recheck.notify_one();
        }
    }

    /// Asks the sentinels once, and follows the primary they name if it is a new one.
    async fn look(&self) {
        let Some(sentinels) = &self.sentinel else { return };
        let _one = self.looking.lock().await;
        let found = sentinels.primary_address().await;
        let current = self.node.load();
        let address = match found {
            Ok(address) => address,
            Err(problem) => {
                *self.problem.lock().unwrap() = Some(problem);
                return;
            }
        };
        if current.as_ref().is_some_and(|node| node.address == address) {
            *self.problem.lock().unwrap() = None;
            return;
        }
        match sentinels.open_primary(&address).await {
            Ok(node) => {
                let was = current.as_ref().map(|n| n.address.clone());
                tracing::warn!(
                    primary = %address,
                    was = was.as_deref().unwrap_or("none"),
                    master_name = %sentinels.settings.master_name,
                    "following the Redis primary the sentinels name"
                );
                self.node.store(Some(Arc::new(node)));
                *self.problem.lock().unwrap() = None;
                if was.is_some() {
                    metrics::store_operation("failover", "ok");
                }
                self.changes.send_modify(|n| *n += 1);
            }
            Err(problem) => *self.problem.lock().unwrap() = Some(problem),
        }
    }
}

/// The follower: looks every [`CHECK_EVERY`], and at once when a call failed.
async fn follow(primary: std::sync::Weak<Primary>) {
    loop {
        let Some(strong) = primary.upgrade() else { return };
        strong.look().await;
        let wait = async {
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = strong.recheck.notified() => {
                    // A burst of failed calls is one look, not one each.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        wait.await;
        drop(strong);
    }
}

impl Sentinels {
    /// `host:port` of the primary the first sentinel that answers names.
    async fn primary_address(&self) -> Result<String, String> {
        let mut connections = self.connections.lock().await;
        let mut problems = Vec::new();
        for (i, (shown, client)) in self.clients.iter().enumerate() {
            if connections[i].is_none() {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT));
                match client.get_multiplexed_async_connection_with_config(&config).await {
                    Ok(connection) => connections[i] = Some(connection),
                    Err(e) => {
                        problems.push(format!("sentinel {shown}: {e}"));
                        continue;
                    }
                }
            }
            let Some(connection) = connections[i].as_mut() else { continue };
            let answer: redis::RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.settings.master_name)
                .query_async(connection)
                .await;
            match answer {
                Ok(Some((host, port))) => return Ok(format!("{host}:{port}")),
                Ok(None) => problems.push(format!(
                    "sentinel {shown} monitors no master named {:?}",
                    self.settings.master_name
                )),
                Err(e) => {
                    connections[i] = None;
                    problems.push(format!("sentinel {shown}: {e}"));
                }
            }
        }
        Err(format!("no sentinel names a primary: {}", problems.join("; ")))
    }

    /// A connection to `address`, once it says it is a primary (a sentinel's answer may run
    /// ahead of the promotion).
    async fn open_primary(&self, address: &str) -> Result<Node, String> {
        let (host, port) = address.rsplit_once(':').ok_or_else(|| format!("sentinels named {address:?}"))?;
        let mut url = self.node_url.clone();
        let _ = url.set_host(Some(host.trim_matches(['[', ']'])));
        let _ = url.set_port(port.parse().ok());
        let node = Node::open(url.as_str(), address.to_string(), &self.tls_roots)
            .map_err(|e| format!("primary {address}: {e}"))?;
        let mut connection = node.connection.clone();
        let role: redis::RedisResult<redis::Value> = redis::cmd("ROLE").query_async(&mut connection).await;
        match role {
            Ok(redis::Value::Array(parts)) if matches!(parts.first(), Some(redis::Value::BulkString(b)) if b == b"master") => {
                Ok(node)
            }
            Ok(_) => Err(format!("the sentinels name {address} as the primary, but it is not one (yet)")),
            Err(e) => Err(format!("primary {address}: {e}")),
        }
    }
}
