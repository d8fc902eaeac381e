//! `serve`: the provisioning listener(s), the admin listener, the delivery engine and the tunnel,
//! wired together; certificate reload on SIGHUP and drain on SIGTERM.
//!
//! Start-up validates everything once (config, certificates, store, credentials) and refuses to
//! start with a message that says what to fix; after that nothing is re-parsed on the hot path.

mod admin;
mod provisioning;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{App, web};
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::delivery::{Engine, Limits, webex::Deliverer};
use crate::mapping::LanguageTable;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::webex::{TokenManager, TokenState, WebexClient};

use crate::listener::{self, CurrentTls};
pub use provisioning::Settings;

/// Why `serve` could not start or stopped abnormally. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(
        "cannot listen on {addr}: {reason}; check that no other process uses the port and that flowthrough may bind it"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Webex(String),
    #[error("the server stopped with an error: {0}")]
    Runtime(String),
}

/// The Webex API endpoint as failover sees it.
#[derive(Clone)]
pub struct Upstream {
    pub transport: crate::webex::Transport,
    pub host: String,
    pub port: u16,
}

/// What every request handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub languages: LanguageTable,
    pub settings: Settings,
    pub store: Store,
    /// `None` on a tunnel-only node.
    pub engine: Option<Engine>,
    pub metrics: Arc<Metrics>,
    pub tokens: Option<TokenManager>,
    /// The Webex transport and the API's host and port, for the blocked-addresses gauge.
    pub upstream: Option<Upstream>,
    /// The Webex client, for `flowthrough reconcile` against the running node (the node holds
    /// the credentials, so the command lists Webex's subscribers through it).
    pub webex: Option<WebexClient>,
    pub shutting_down: Arc<AtomicBool>,
    /// What `/readyz` looks at besides the token.
    pub tls_loaded: Arc<AtomicBool>,
    /// The recent provisioning requests' stages, for `/debug/stages`.
    pub traces: Arc<crate::trace::Traces>,
}

impl AppState {
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// True when Webex rejected the refresh token: commands are queued and answered 7030.
    pub fn credentials_invalid(&self) -> bool {
        self.tokens
            .as_ref()
            .is_some_and(|t| matches!(t.state(), TokenState::CredentialsInvalid { .. }))
    }
}

/// The label of the client of a request, for the audit: certificate subject and serial.
pub fn client_label(req: &actix_web::HttpRequest) -> String {
    match listener::client_identity(req) {
        Some(id) => format!("{} serial={}", id.subject, id.serial),
        None => "unknown".to_owned(),
    }
}

/// The provisioning app: both routes, the body limit, the shared state.
pub fn provisioning_app(
    state: web::Data<AppState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let limit = state.settings.max_body_bytes;
    App::new()
        .app_data(state)
        .app_data(web::PayloadConfig::new(limit))
        .route(
            "/provisioning",
            web::post().to(|req, body, state| provisioning::handle(req, body, state, None)),
        )
        .route(
            "/provisioning/{template}",
            web::post()
                .to(|req, body, state, path| provisioning::handle(req, body, state, Some(path))),
        )
}

/// Handles the pieces `serve` starts, so tests and `sandbox` can run the same thing in-process.
pub struct Running {
    pub provisioning_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The tunnel's listen addresses (empty without `[tunnel]`).
    pub tunnel_addrs: Vec<SocketAddr>,
    /// `None` on a tunnel-only node (actix refuses a server without sockets).
    provisioning: Option<(
        actix_server::ServerHandle,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    admin: actix_server::ServerHandle,
    engine: Option<Engine>,
    tunnel: Option<crate::tunnel::Tunnel>,
    drain: Duration,
    store: Store,
    shutting_down: Arc<AtomicBool>,
    reload: admin::Reloader,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
    node_id: String,
    started_ms: u64,
}

/// This release, as nodes report it to each other.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Say every third of a lease that this node is alive: `cluster status` and the node-missing
/// alert call a node missing once its heartbeat is older than a lease, by when its users'
/// leases have run out too.
fn spawn_heartbeat(store: Store, node_id: String, started_ms: u64, lease: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = store.heartbeat(&node_id, VERSION, started_ms, false).await {
                tracing::debug!(error = %e, "cannot write this node's heartbeat; will try again");
            }
        }
    });
}

impl Running {
    /// Reload certificates, key, CA bundle and CRLs; the old set stays if the new one is bad.
    pub fn reload(&self) -> Result<(), String> {
        self.reload.reload()
    }

    /// Drain: stop accepting, let in-flight requests finish (their work is in the outbox either
    /// way), stop deliveries, flush the store.
    pub async fn shutdown(self, grace: Duration) -> Result<(), ServeError> {
        self.shutting_down.store(true, Ordering::SeqCst);
        let tunnel = async {
            if let Some(tunnel) = self.tunnel {
                tunnel.shutdown(self.drain).await;
            }
        };
        let provisioning = async {
            if let Some((handle, _)) = &self.provisioning {
                // Deliveries started on the request threads end before those threads do.
                if let Some(engine) = &self.engine
                    && tokio::time::timeout(grace, engine.close_here())
                        .await
                        .is_err()
                {
                    tracing::warn!(
                        "deliveries on the request threads did not end within the drain; those cut short are tried again at the next start"
                    );
                }
                handle.stop(true).await;
            }
        };
        tokio::join!(provisioning, tunnel);
        if let Some(engine) = &self.engine {
            engine.stop();
            let _ = tokio::time::timeout(grace, engine.idle()).await;
        }
        // Every try hands its lane back as it ends, so once idle this node holds none: say so,
        // so that `cluster status` and the node-missing alert tell a stop from a death.
        if let Err(e) = self
            .store
            .heartbeat(&self.node_id, VERSION, self.started_ms, true)
            .await
        {
            tracing::warn!(error = %e, "cannot record this node's stop; it shows as missing until it starts again");
        }
        self.store.flush().await?;
        self.admin.stop(true).await;
        if let Some((_, task)) = self.provisioning {
            let _ = task.await;
        }
        let _ = self.admin_task.await;
        Ok(())
    }
}

/// Start everything in the current actix/tokio runtime and return once listening.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let config = Arc::new(config);
    let server = config.server.clone().ok_or_else(|| {
        ServeError::Config(
            "the config has no [server] section; serve needs its certificate, key and client CA (see deploy/flowthrough.example.toml)".to_owned(),
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_configured(&config.store).await?;
    observe_store(&store, &metrics);

    let observer_metrics = metrics.clone();
    let observer: crate::tls::Observer = Arc::new(move |refusal: &crate::tls::Refusal| {
        tracing::warn!(
            reason = refusal.label(),
            "client certificate refused: {refusal}"
        );
        observer_metrics.count_refusal(refusal.label());
    });
    let loaded = crate::tls::server_config(&server, &config.client_policy, observer.clone())?;
    let tls: CurrentTls = Arc::new(ArcSwap::new(loaded.config.clone()));
    admin::export_tls_metrics(&metrics, &server, &loaded);

    let provisioning = !server.listen.is_empty();
    if !provisioning && config.tunnel.is_none() {
        return Err(ServeError::Config(
            "nothing to serve: [server].listen is empty and there is no [tunnel] section; list a provisioning address or add [tunnel]".to_owned(),
        ));
    }
    let delivery = if provisioning {
        Some(start_delivery(&config, &store, &metrics).await?)
    } else {
        None
    };
    let node_id = config.cluster.node_id.clone();
    let lease = Duration::from_millis(config.cluster.lease_ms);
    let started_ms = crate::store::now_ms();
    spawn_heartbeat(store.clone(), node_id.clone(), started_ms, lease);
    spawn_housekeeping(store.clone(), &config.store, node_id.clone());
    let (engine, tokens, upstream, webex) = match delivery {
        Some((engine, tokens, upstream, webex)) => {
            (Some(engine), Some(tokens), Some(upstream), Some(webex))
        }
        None => (None, None, None, None),
    };

    let shutting_down = Arc::new(AtomicBool::new(false));
    let tls_loaded = Arc::new(AtomicBool::new(true));
    let state = web::Data::new(AppState {
        languages: config.language_table(),
        settings: Settings::from_config(&server, &config.store),
        store: store.clone(),
        engine: engine.clone(),
        metrics: metrics.clone(),
        tokens,
        upstream,
        webex,
        shutting_down: shutting_down.clone(),
        tls_loaded: tls_loaded.clone(),
        traces: Arc::default(),
        config: config.clone(),
    });

    let refused_metrics = metrics.clone();
    let settings = listener::ListenerSettings {
        tls: tls.clone(),
        allowed_networks: Arc::new(server.allowed_networks.clone()),
        on_refused: Arc::new(move |addr, reason| {
            tracing::warn!(peer = %addr, reason, "connection refused before TLS");
            refused_metrics.count_refusal(reason);
        }),
    };
    let mut builder = actix_server::Server::build()
        .workers(server.workers)
        .shutdown_timeout(server.drain_seconds)
        .disable_signals();
    let mut provisioning_addrs = Vec::new();
    for addr in &server.listen {
        let std_listener = std::net::TcpListener::bind(addr).map_err(|e| ServeError::Bind {
            addr: *addr,
            reason: e.to_string(),
        })?;
        provisioning_addrs.push(std_listener.local_addr().unwrap_or(*addr));
        let state = state.clone();
        builder = listener::listen(
            builder,
            "provisioning",
            std_listener,
            settings.clone(),
            move || provisioning_app(state.clone()),
        )
        .map_err(|e| ServeError::Bind {
            addr: *addr,
            reason: e.to_string(),
        })?;
    }
    let provisioning_server = provisioning.then(|| {
        let server = builder.run();
        (server.handle(), tokio::spawn(server))
    });

    let (tunnel, tunnel_addrs) = match &config.tunnel {
        Some(tunnel_config) => {
            let listeners = crate::tunnel::bind(&tunnel_config.listen)
                .map_err(|e| ServeError::Config(e.to_string()))?;
            let settings = crate::tunnel::TunnelSettings::from_config(
                tunnel_config,
                crate::failover::Resolver::System,
            )
            .map_err(|e| ServeError::Config(e.to_string()))?;
            let shared = crate::tunnel::TunnelShared {
                tls: Some(tls.clone()),
                store: Some(store.clone()),
                metrics: metrics.clone(),
            };
            let tunnel = crate::tunnel::start(listeners, settings, shared)
                .map_err(|e| ServeError::Config(e.to_string()))?;
            let addrs = tunnel.local_addrs().to_vec();
            (Some(tunnel), addrs)
        }
        None => (None, Vec::new()),
    };

    let reload = admin::Reloader {
        server: server.clone(),
        policy: config.client_policy.clone(),
        observer,
        tls,
        metrics: metrics.clone(),
    };
    let (admin_addr, admin_handle, admin_task) =
        admin::start(config.admin.listen, state.clone(), reload.clone())?;

    Ok(Running {
        provisioning_addrs,
        admin_addr,
        tunnel_addrs,
        provisioning: provisioning_server,
        admin: admin_handle,
        engine,
        tunnel,
        drain: Duration::from_secs(server.drain_seconds),
        store,
        shutting_down,
        reload,
        admin_task,
        node_id,
        started_ms,
    })
}

/// The Webex side of the provisioning listener: transport, token manager, client and the
/// delivery engine (started, so entries left by a previous run are picked up).
async fn start_delivery(
    config: &Config,
    store: &Store,
    metrics: &Arc<Metrics>,
) -> Result<(Engine, TokenManager, Upstream, WebexClient), ServeError> {
    let webex = config.webex.as_ref().ok_or_else(|| {
        ServeError::Config(
            "the config has no [webex] section; the provisioning listener needs the Webex API and credentials (empty [server].listen for a tunnel-only node)".to_owned(),
        )
    })?;
    let webex_error = |e: &dyn std::fmt::Display| ServeError::Webex(e.to_string());
    let transport = crate::webex::Transport::new(
        crate::webex::TransportOptions::from_config(webex, crate::failover::Resolver::System)
            .map_err(|e| webex_error(&e))?,
    )
    .map_err(|e| webex_error(&e))?;
    let tokens = TokenManager::new(
        webex,
        store.clone(),
        transport.clone(),
        Some(metrics.clone()),
    )
    .await
    .map_err(|e| webex_error(&e))?;
    let api = reqwest::Url::parse(&webex.api_base)
        .map_err(|e| ServeError::Webex(format!("webex.api_base: {e}")))?;
    let upstream = Upstream {
        transport: transport.clone(),
        host: api.host_str().unwrap_or_default().to_owned(),
        port: api.port_or_known_default().unwrap_or(443),
    };
    let client = WebexClient::new(webex, transport, tokens.clone()).map_err(|e| webex_error(&e))?;
    let deliverer = Deliverer {
        client: client.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        follow_up: Duration::from_secs(webex.follow_up_s),
    };
    let engine = Engine::new(
        store.clone(),
        deliverer.attempt_fn(),
        Limits {
            max_parallel_users: webex.max_parallel_users,
            max_entry_age: Duration::from_secs(config.store.max_entry_age_hours * 3600),
            poll: (config.store.backend == crate::config::StoreBackend::Postgres)
                .then_some(Duration::from_millis(config.cluster.poll_ms)),
            node_id: config.cluster.node_id.clone(),
            lease: Duration::from_millis(config.cluster.lease_ms),
        },
    );
    engine.start().await?;
    Ok((engine, tokens, upstream, client))
}

/// The PostgreSQL backend's commits and errors in the metrics (sled reports through its flushes).
fn observe_store(store: &Store, metrics: &Arc<Metrics>) {
    let (commits, errors) = (metrics.clone(), metrics.clone());
    store.observe(crate::store::Observer {
        commit: Box::new(move |took| commits.store_commit_seconds.observe(took.as_secs_f64())),
        error: Box::new(move |kind| errors.count_store_error(kind)),
    });
}

/// How often records past the retention or the caps are deleted. Often enough that each round
/// deletes a few minutes' worth (a long round of deletes delays the flushes requests wait for),
/// and the store's size, and with it sled's memory, stays within a few minutes of the caps.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Audit retention and the pruning of finished outbox entries, every [`PRUNE_EVERY`] (and once at
/// start), on the blocking pool: the first round on sled counts the records by walking the trees
/// (about 3 s at a million each), and a round with much to remove takes as long.
fn spawn_housekeeping(store: Store, cfg: &crate::config::StoreConfig, node_id: String) {
    let retention_ms = u64::from(cfg.audit_retention_days) * 86_400_000;
    let (max_audit, max_history) = (cfg.audit_max_records, cfg.history_max_entries);
    // Held past the next round, so the node that pruned last keeps the chore while it lives;
    // another takes it over one round after it died.
    let chore_ms = u64::try_from(PRUNE_EVERY.as_millis() * 2).unwrap_or(u64::MAX);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tick.tick().await;
            match store.claim_chore("prune", &node_id, chore_ms).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot claim the pruning chore; will try at the next round");
                    continue;
                }
            }
            let store = store.clone();
            let runtime = tokio::runtime::Handle::current();
            let round = tokio::task::spawn_blocking(move || {
                let cutoff = crate::store::now_ms().saturating_sub(retention_ms);
                let pruned = runtime.block_on(async {
                    Ok::<_, crate::store::StoreError>((
                        store.prune_audit(cutoff, max_audit).await?,
                        store.prune_finished(cutoff, max_history).await?,
                    ))
                })?;
                release_freed_heap();
                Ok::<_, crate::store::StoreError>(pruned)
            })
            .await;
            match round {
                Ok(Ok((audit, outbox))) if audit + outbox > 0 => {
                    tracing::info!(
                        audit,
                        outbox,
                        "pruned records past the retention or the caps"
                    )
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "cannot prune old records; the store keeps growing until this is fixed"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "the pruning round stopped unexpectedly; it runs again at the next interval; \
                     please report this with the log"
                ),
            }
        }
    });
}

/// Hand the heap a pruning round freed back to the kernel. A round of deletes makes sled build
/// and drop many node versions at once, and glibc keeps what was freed: measured with
/// `examples/store_io` (1,000 users, history and audit capped at 30,000), RSS ended at 57.6 MiB
/// without this and 41.5 MiB with it, the store's size the same.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's own arenas to the kernel; it takes
    // no pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `flowthrough serve`: start, then reload on SIGHUP and drain on SIGTERM/SIGINT.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let grace = Duration::from_secs(config.server.as_ref().map_or(10, |s| s.drain_seconds));
    let running = start(config).await?;
    tracing::info!(
        provisioning = ?running.provisioning_addrs,
        tunnel = ?running.tunnel_addrs,
        admin = %running.admin_addr,
        "flowthrough is serving"
    );
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServeError::Runtime(e.to_string()))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| ServeError::Runtime(e.to_string()))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| ServeError::Runtime(e.to_string()))?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match running.reload() {
                    Ok(()) => tracing::info!("certificates reloaded"),
                    Err(e) => tracing::error!("reload refused, the previous certificates stay: {e}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("draining: no new connections; in-flight work finishes or stays in the outbox");
    running.shutdown(grace).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}
