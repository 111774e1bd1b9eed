//! `tokenproxy run`: load everything, bind every listener, serve, drain.
//!
//! Everything that can fail at start (config, TLS roots, ports) fails before the first request is
//! accepted, with a one-line reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::Admin;
use crate::admin::doors::Doors;
use crate::audit::Audit;
use crate::callers::{Callers, Table};
use crate::config::Config;
use crate::drain::Drain;
use crate::egress::Egress;
use crate::oauth::OAuthClient;
use crate::onboarding::Onboarding;
use crate::proxy::Proxy;
use crate::proxy::h1::pool::{PlainPool, TlsPool};
use crate::proxy::h1::{Listen, PlainRelay};
use crate::proxy::replay::ReplayBudget;
use crate::proxy::upstream::{self, Protocols};
use crate::server::{self, ConnectionLimits};
use crate::tls::ca::CertificateAuthority;
use crate::tls::leaf::LeafCache;
use crate::tokens::{Providers, watch};
use crate::{metrics, tls};

/// How often the metrics exporter's upkeep runs between scrapes, and idle plain-HTTP upstream
/// connections are checked for closes and age. Until an upkeep, the exporter keeps every latency
/// sample recorded (8 bytes and more per request): at 50 000 requests a second, five seconds of
/// them were 2 MiB of peak memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);
/// How often expired pending authorizations are swept (each new flow also sweeps).
const SWEEP_PENDING_EVERY: Duration = Duration::from_secs(600);
/// How long the exit waits for the audit writer to write the lines still waiting.
const AUDIT_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// A started proxy: every listener bound and serving.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub route_addrs: Vec<SocketAddr>,
    pub providers: Arc<Providers>,
    shutdown_timeout: Duration,
    drain: Drain,
    background: Vec<tokio::task::JoinHandle<()>>,
    audit: Option<Audit>,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    start(config).await?.serve_until_signal().await
}

/// Loads, binds and starts serving; returns once every listener accepts connections.
pub async fn start(mut config: Config) -> anyhow::Result<Running> {
    let metrics_handle = metrics::install()?;
    let tls = tls::client_config(&config.extra_roots)?;
    let ca = CertificateAuthority::load_or_create(&config.ca_dir)?;
    tracing::info!(path = %ca.cert_path().display(), "CA ready; applications trust this file");
    let leaves = Arc::new(LeafCache::new(ca));

    // Bind before serving anything, so that a port in use stops the start.
    let proxy_listener = server::bind("proxy.listen", config.proxy.listen).await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_listener = server::bind("admin.listen", config.admin_listen).await?;
    let transparent_listener = match config.transparent_listen {
        Some(addr) => Some(server::bind("transparent.listen", addr).await?),
        None => None,
    };
    let mut route_listeners = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        route_listeners.push(server::bind(&format!("routes[{i}].listen"), route.listen).await?);
    }

    for warning in config.loose_permission_warnings(false) {
        tracing::warn!("{warning}");
    }
    let oauth_client = OAuthClient::new(tls.clone(), config.proxy.upstream_timeout)?;
    crate::grants::discovery::fill_endpoints(&mut config.providers, &oauth_client).await?;
    let store = crate::tokens::store::for_config(&config)?;
    let providers = Arc::new(
        Providers::load(&config.providers, Some(oauth_client.clone()), config.proxy.upstream_timeout, store)
            .await,
    );
    let onboarding = Arc::new(Onboarding::open(providers.clone(), oauth_client, &config.onboarding).await);
    // One background refresher per provider with a token endpoint.
    let mut background: Vec<_> = providers
        .iter()
        .filter(|p| p.can_refresh())
        .filter_map(|p| p.single().map(|c| tokio::spawn(p.clone().keep_fresh(c.clone()))))
        .collect();
    let drain = Drain::new();
    let egress = match config.transparent_listen {
        Some(_) => Egress::new(config.egress_deny.clone()).remembering_dials(),
        None => Egress::new(config.egress_deny.clone()),
    };
    let egress = Arc::new(egress);
    let (table, problems) = Table::build(&config.callers);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    if !table.is_open() {
        tracing::info!(
            callers = config.callers.len(),
            "callers configured: every request must belong to one"
        );
    }
    let callers = Arc::new(Callers::new(table));
    let audit = match &config.audit {
        Some(target) => Some(Audit::start(target)?),
        None => None,
    };
    let audit_at_exit = audit.clone();
    let mut own_listeners = vec![proxy_addr, admin_listener.local_addr()?];
    for listener in &route_listeners {
        own_listeners.push(listener.local_addr()?);
    }
    if let Some(listener) = &transparent_listener {
        own_listeners.push(listener.local_addr()?);
    }
    egress.set_own_listeners(own_listeners.clone());
    // One per worker thread: its upstream connections (pools, and the tasks that drive them)
    // stay on its thread. Everything else is shared.
    let replay_budget = ReplayBudget::new(config.proxy.max_replay_total);
    let new_proxy = || {
        Arc::new(Proxy {
            providers: providers.clone(),
            client: upstream::client(tls.clone(), &config.proxy, egress.clone(), Protocols::Http1AndHttp2),
            upgrade_client: upstream::client(
                tls.clone(),
                &config.proxy,
                egress.clone(),
                Protocols::Http1Only,
            ),
            plain: Arc::new(PlainPool::new(
                egress.clone(),
                config.proxy.upstream_timeout,
                config.proxy.max_idle_per_host,
            )),
            tls_pool: Arc::new(TlsPool::new_tls(
                egress.clone(),
                config.proxy.upstream_timeout,
                config.proxy.max_idle_per_host,
                &tls,
            )),
            egress: egress.clone(),
            replay_budget: replay_budget.clone(),
            settings: config.proxy.clone(),
            allow_unmatched: config.allow_unmatched,
            leaves: leaves.clone(),
            drain: drain.handle(),
            callers: callers.clone(),
            audit: audit.clone(),
        })
    };
    let proxy = new_proxy();
    // With more than one worker, the proxy listener's connections are served on worker threads
    // (`shards`), each with a proxy of its own.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let worker_proxies: Vec<Arc<Proxy>> =
        if workers > 1 { (0..workers).map(|_| new_proxy()).collect() } else { Vec::new() };
    let doors = Doors::new(admin_listener.local_addr()?, config.admin_access.clone());
    let admin = Arc::new(Admin::new(providers.clone(), metrics_handle.clone(), onboarding.clone(), doors));
    let limits = ConnectionLimits {
        header_read_timeout: config.proxy.header_read_timeout,
        max_header_bytes: config.proxy.max_header_bytes,
        max_connections: config.proxy.max_connections,
    };

    background.push(watch::spawn(providers.clone()));
    background.push(tokio::spawn(crate::callers::reload::keep_current(callers, config.source.clone())));
    background.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_PENDING_EVERY);
        loop {
            every.tick().await;
            let flows = onboarding.flows.clone();
            let _ = tokio::task::spawn_blocking(move || flows.sweep()).await;
        }
    }));
    let sweep_pools: Vec<_> = std::iter::once(&proxy).chain(&worker_proxies).cloned().collect();
    background.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            metrics_handle.run_upkeep();
            for proxy in &sweep_pools {
                proxy.plain.sweep();
                proxy.tls_pool.sweep();
            }
        }
    }));

    let admin_addr = admin_listener.local_addr()?;
    let route_addrs = route_listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
    tracing::info!(
        listener = "proxy",
        addr = %proxy_addr,
        workers,
        "listening"
    );
    let relay_for = |proxy: &Arc<Proxy>, listen| {
        Some(Arc::new(PlainRelay {
            proxy: proxy.clone(),
            listen,
            header_read_timeout: limits.header_read_timeout,
            max_header_bytes: limits.max_header_bytes,
        }))
    };
    let relay = |listen| relay_for(&proxy, listen);
    let forward = |proxy: Arc<Proxy>| {
        move |req, peer| {
            let proxy = proxy.clone();
            async move { proxy.handle_forward(req, peer).await }
        }
    };
    if worker_proxies.is_empty() {
        tokio::spawn(server::serve(
            "proxy",
            proxy_listener,
            limits.clone(),
            drain.watch(),
            relay(Listen::Forward),
            forward(proxy.clone()),
        ));
    } else {
        let threads = crate::shards::start(workers)?;
        let workers = threads
            .into_iter()
            .zip(&worker_proxies)
            .map(|(thread, proxy)| server::Worker {
                runtime: Some(thread),
                relay: relay_for(proxy, Listen::Forward),
                handler: forward(proxy.clone()),
            })
            .collect();
        tokio::spawn(server::serve_on("proxy", proxy_listener, limits.clone(), drain.watch(), workers));
    }

    for (route, listener) in config.routes.iter().zip(route_listeners) {
        tracing::info!(
            listener = "route",
            addr = %listener.local_addr()?,
            provider = %route.provider,
            upstream = %format!("{}://{}{}", route.upstream_scheme, route.upstream_authority, route.upstream_base_path),
            "listening"
        );
        let proxy = proxy.clone();
        let route = Arc::new(route.clone());
        let relay = relay(Listen::Route(route.clone()));
        let handler = move |req, peer| {
            let proxy = proxy.clone();
            let route = route.clone();
            async move { proxy.handle_route(&route, req, peer).await }
        };
        tokio::spawn(server::serve("route", listener, limits.clone(), drain.watch(), relay, handler));
    }

    if let Some(listener) = transparent_listener {
        tracing::info!(listener = "transparent", addr = %listener.local_addr()?, "listening");
        tokio::spawn(crate::transparent::serve(proxy.clone(), listener, own_listeners, drain.watch()));
    }

    tracing::info!(listener = "admin", addr = %admin_listener.local_addr()?, "listening");
    let handler = move |req, peer: Arc<crate::callers::Peer>| {
        let admin = admin.clone();
        async move { admin.handle(req, peer.addr).await }
    };
    tokio::spawn(server::serve("admin", admin_listener, limits, drain.watch(), None, handler));

    Ok(Running {
        proxy_addr,
        admin_addr,
        route_addrs,
        providers,
        shutdown_timeout: config.proxy.shutdown_timeout,
        drain,
        background,
        audit: audit_at_exit,
    })
}

impl Running {
    /// Serves until SIGTERM or SIGINT, then drains: no new connections, requests in flight
    /// finish (up to `shutdown_timeout`).
    pub async fn serve_until_signal(self) -> anyhow::Result<()> {
        shutdown_signal().await?;
        tracing::info!(
            limit_s = self.shutdown_timeout.as_secs(),
            "shutting down: no new connections, finishing requests in flight"
        );
        let drained = self.drain.wait(self.shutdown_timeout).await;
        for task in self.background {
            task.abort();
        }
        if let Some(audit) = self.audit {
            let flushed = tokio::task::spawn_blocking(move || audit.flush(AUDIT_FLUSH_LIMIT)).await;
            if !matches!(flushed, Ok(true)) {
                tracing::warn!("audit lines still waiting at exit were not all written");
            }
        }
        if drained {
            tracing::info!("all connections finished; bye");
        } else {
            tracing::warn!("shutdown limit reached with requests still in flight; closing them");
        }
        Ok(())
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    Ok(())
}
