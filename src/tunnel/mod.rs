//! Tunnel mode (SPEC §10, Cisco's Provisioning Adapter Proxy role): an allow-listed, audited HTTP
//! `CONNECT` proxy with the provisioning listener's mTLS policy, relaying bytes to the destination
//! without ever seeing the payload (the AS's TLS runs end to end through it).
//!
//! Every connection goes through the checks in a fixed order, each refusal answered with a
//! one-line reason, logged, counted and audited: client network → TLS handshake and client policy
//! → proxy credentials → method → destination allow-list → public addresses only → a free slot →
//! connect with the §4 failover → `200`, then the relay.
//!
//! The tunnel runs on its own multi-threaded tokio runtime: `serve`'s actix system is
//! single-threaded, and a byte relay should use every core without competing with it.
//!
//! Use: [`bind`] the listeners (so bind errors stop `serve` before anything runs), [`start`] with
//! [`TunnelSettings::from_config`] and the [`TunnelShared`] state, and on SIGTERM
//! [`Tunnel::shutdown`] with the drain deadline. SIGHUP needs nothing here: each handshake loads
//! the TLS config current at that moment from the shared [`CurrentTls`].

mod check;
pub mod destination;
mod relay;
mod request;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::config::TunnelConfig;
use crate::failover::{Failover, Resolver};
use crate::listener::{CurrentTls, address_allowed};
use crate::metrics::{DirectionLabels, Metrics, OutcomeLabels};
use crate::secret::{BasicCredentials, PasswordAccount};
use crate::store::{AuditEvent, AuditRecord, Store, now_ms};

pub use check::{CheckLine, Level, check};
pub use destination::{Pattern, Target};
pub use relay::End;

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain deadline, how long tunnels get to write their audit records once told to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Failover state is kept per destination; beyond this many destinations the ones without a
/// blocked address are forgotten, so wildcard destinations cannot grow the map without bound.
const MAX_FAILOVER_ENTRIES: usize = 1024;

const PROXY_AUTHENTICATE: &str = "Proxy-Authenticate: Basic realm=\"flowthrough\"";

/// Why the tunnel cannot start. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "tunnel.allowed_destinations: \"{0}\" is not host:port or *.suffix:port with a port 1-65535; fix or remove the entry"
    )]
    BadDestination(String),
    #[error(
        "tunnel.tls = true but no TLS configuration was handed to the tunnel; it needs [server] certificate, private_key and client_ca"
    )]
    MissingTls,
    #[error(
        "cannot listen on {addr} for the tunnel: {reason}; check that no other process uses the port and that flowthrough may bind it"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("cannot start the tunnel's threads: {0}; check the process limits (ulimit -u)")]
    Runtime(String),
}

/// The tunnel's settings, parsed once from `[tunnel]`.
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub tls: bool,
    /// Client networks allowed to connect; empty = any.
    pub allowed_networks: Vec<IpNet>,
    pub destinations: Vec<Pattern>,
    pub allow_private_destinations: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: tunnels may live as long as they are used.
    pub max_tunnel_duration: Option<Duration>,
    pub max_tunnels: usize,
    /// How long a destination address that failed stays out of rotation.
    pub block_for: Duration,
    pub proxy_account: Option<PasswordAccount>,
    /// How destination names become addresses (tests map names to loopback).
    pub resolver: Resolver,
    /// How long a client has to send its request head.
    pub head_timeout: Duration,
}

impl TunnelSettings {
    pub fn from_config(cfg: &TunnelConfig, resolver: Resolver) -> Result<Self, TunnelError> {
        let destinations = cfg
            .allowed_destinations
            .iter()
            .map(|d| Pattern::parse(d).ok_or_else(|| TunnelError::BadDestination(d.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TunnelSettings {
            tls: cfg.tls,
            allowed_networks: cfg.allowed_networks.clone(),
            destinations,
            allow_private_destinations: cfg.allow_private_destinations,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_s),
            max_tunnel_duration: (cfg.max_tunnel_seconds > 0)
                .then(|| Duration::from_secs(cfg.max_tunnel_seconds)),
            max_tunnels: cfg.max_tunnels,
            block_for: Duration::from_secs(cfg.block_seconds),
            proxy_account: cfg.proxy_account.clone(),
            resolver,
            head_timeout: request::HEAD_TIMEOUT,
        })
    }
}

/// What the tunnel shares with the rest of `serve`.
#[derive(Clone)]
pub struct TunnelShared {
    /// The current server TLS config (swapped on reload); required when `tls = true`.
    pub tls: Option<CurrentTls>,
    /// Where audit records go; `None` only in tests and benchmarks.
    pub store: Option<Store>,
    pub metrics: Arc<Metrics>,
}

/// Bind every listen address (before anything starts, so a taken port stops `serve` at once).
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, TunnelError> {
    addrs
        .iter()
        .map(|addr| {
            let bind_err = |e: std::io::Error| TunnelError::Bind {
                addr: *addr,
                reason: e.to_string(),
            };
            let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
            listener.set_nonblocking(true).map_err(bind_err)?;
            Ok(listener)
        })
        .collect()
}

/// A running tunnel.
pub struct Tunnel {
    addrs: Vec<SocketAddr>,
    stop_accepting: watch::Sender<bool>,
    close_tunnels: watch::Sender<bool>,
    /// Every accept loop and connection holds a sender; `recv` yields `None` once all are gone.
    alive: mpsc::Receiver<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Tunnel {
    /// The addresses actually listened on (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stop accepting, let open tunnels finish up to `drain`, then close the rest (their audit
    /// records say `shutdown`).
    pub async fn shutdown(mut self, drain: Duration) {
        let _ = self.stop_accepting.send(true);
        if tokio::time::timeout(drain, self.alive.recv())
            .await
            .is_err()
        {
            tracing::info!("tunnel drain deadline reached; closing the tunnels still open");
            let _ = self.close_tunnels.send(true);
            let _ = tokio::time::timeout(CLOSE_GRACE, self.alive.recv()).await;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code; this never blocks.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Start serving CONNECT on `listeners` (non-blocking std listeners, e.g. from [`bind`]).
pub fn start(
    listeners: Vec<std::net::TcpListener>,
    settings: TunnelSettings,
    shared: TunnelShared,
) -> Result<Tunnel, TunnelError> {
    if settings.tls && shared.tls.is_none() {
        return Err(TunnelError::MissingTls);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("flowthrough-tunnel")
        .enable_all()
        .build()
        .map_err(|e| TunnelError::Runtime(e.to_string()))?;
    let (stop_accepting, stop_rx) = watch::channel(false);
    let (close_tunnels, close_rx) = watch::channel(false);
    let (alive_tx, alive) = mpsc::channel(1);
    let ctx = Arc::new(Ctx {
        slots: Arc::new(Semaphore::new(settings.max_tunnels)),
        settings,
        shared,
        failover: Mutex::new(HashMap::new()),
        closing: close_rx,
    });
    let mut addrs = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr().map_err(|e| TunnelError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: e.to_string(),
        })?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(listener).map_err(|e| TunnelError::Bind {
                addr,
                reason: e.to_string(),
            })?
        };
        addrs.push(addr);
        runtime.spawn(accept_loop(
            listener,
            ctx.clone(),
            stop_rx.clone(),
            alive_tx.clone(),
        ));
    }
    Ok(Tunnel {
        addrs,
        stop_accepting,
        close_tunnels,
        alive,
        runtime: Some(runtime),
    })
}

/// What every connection of one tunnel listener shares.
struct Ctx {
    settings: TunnelSettings,
    shared: TunnelShared,
    slots: Arc<Semaphore>,
    /// Per destination (`host:port`), so a failed address stays blocked across tunnels.
    failover: Mutex<HashMap<String, Failover>>,
    closing: watch::Receiver<bool>,
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Also when the handle is gone without a shutdown: nobody can stop us later.
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let ctx = ctx.clone();
                let alive = alive.clone();
                tokio::spawn(async move {
                    connection(tcp, peer, &ctx).await;
                    drop(alive);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the audit record of one connection collects as it goes.
struct Record {
    started: Instant,
    peer: SocketAddr,
    /// Certificate subject and serial, or `plain`.
    client: String,
    destination: String,
    address_used: Option<SocketAddr>,
}

/// A refusal: the status, the outcome label of the metric, the one-line reason.
#[derive(Debug)]
struct Refused {
    /// 0 when nobody is left to answer (the client closed before a complete head).
    status: u16,
    outcome: &'static str,
    reason: String,
    header: Option<&'static str>,
}

impl Refused {
    fn new(status: u16, outcome: &'static str, reason: impl Into<String>) -> Refused {
        Refused {
            status,
            outcome,
            reason: reason.into(),
            header: None,
        }
    }
}

async fn connection(mut tcp: TcpStream, peer: SocketAddr, ctx: &Ctx) {
    let mut record = Record {
        started: Instant::now(),
        peer,
        client: "plain".to_owned(),
        destination: String::new(),
        address_used: None,
    };
    if !address_allowed(&ctx.settings.allowed_networks, peer) {
        let reason = "client address not in tunnel.allowed_networks";
        refused(ctx, &record, "network_not_allowed", reason).await;
        // A TLS client cannot read a plain-text answer; it just sees the connection close.
        if !ctx.settings.tls {
            request::send_refusal(&mut tcp, 403, None, reason).await;
        }
        return;
    }
    let _ = tcp.set_nodelay(true);
    let Some(tls) = ctx.shared.tls.as_ref().filter(|_| ctx.settings.tls) else {
        serve(tcp, ctx, &mut record, Ok).await;
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            if let Some(id) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(crate::tls::identity)
            {
                record.client = format!("{} serial={}", id.subject, id.serial);
            }
            serve(stream, ctx, &mut record, Err).await;
        }
        Ok(Err(e)) => {
            let refusals = crate::tls::refusals_in_io(&e);
            let reason = if refusals.is_empty() {
                format!("TLS handshake failed: {e}")
            } else {
                // The policy verifier logged and counted these already; no-certificate it cannot.
                if refusals
                    .iter()
                    .any(|r| matches!(r, crate::tls::Refusal::NoCertificate))
                {
                    ctx.shared.metrics.count_refusal("no_certificate");
                }
                let list: Vec<String> = refusals
                    .iter()
                    .map(|r| format!("{} ({r})", r.label()))
                    .collect();
                format!("client certificate refused: {}", list.join("; "))
            };
            refused(ctx, &record, "tls_refused", &reason).await;
        }
        Err(_) => {
            ctx.shared.metrics.count_refusal("handshake_timeout");
            refused(ctx, &record, "tls_refused", "TLS handshake timed out").await;
        }
    }
}

/// Everything after the transport is established: the request, the checks, the relay.
/// `plain` gives back the bare TCP socket when there is no TLS on the client leg (`Ok`), which
/// lets the relay splice instead of copying.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    ctx: &Ctx,
    record: &mut Record,
    plain: fn(S) -> Result<TcpStream, S>,
) {
    let (upstream, rest, _slot) = match negotiate(&mut io, ctx, record).await {
        Ok(ready) => ready,
        Err(r) => {
            // Recorded first: once the client has its answer, the audit and metrics show it.
            refused(ctx, record, r.outcome, &r.reason).await;
            if r.status != 0 {
                request::send_refusal(&mut io, r.status, r.header, &r.reason).await;
            }
            return;
        }
    };
    let metrics = &ctx.shared.metrics;
    count(metrics, "accepted");
    metrics.tunnels_open.inc();
    let counts = relay::Counts::default();
    let end = established(io, upstream, rest, ctx, &counts, plain).await;
    metrics.tunnels_open.dec();
    let up = counts.up.load(std::sync::atomic::Ordering::Relaxed);
    let down = counts.down.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        peer = %record.peer,
        client = %record.client,
        destination = %record.destination,
        address = ?record.address_used,
        bytes_up = up,
        bytes_down = down,
        duration_ms = record.started.elapsed().as_millis() as u64,
        end = %end.label(),
        "tunnel closed"
    );
    audit(ctx, record, up, down, end.label()).await;
}

async fn established<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    mut upstream: TcpStream,
    rest: Vec<u8>,
    ctx: &Ctx,
    counts: &relay::Counts,
    plain: fn(S) -> Result<TcpStream, S>,
) -> End {
    let metrics = &ctx.shared.metrics;
    let byte_counters = relay::ByteCounters {
        up: direction(metrics, "up"),
        down: direction(metrics, "down"),
    };
    let answer = async {
        io.write_all(request::ESTABLISHED).await?;
        io.flush().await?;
        // A client may pipeline its TLS ClientHello right behind the CONNECT head.
        if !rest.is_empty() {
            upstream.write_all(&rest).await?;
        }
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(ctx.settings.idle_timeout, answer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return End::Error(format!("sending the 200 answer: {e}")),
        Err(_) => return End::Idle,
    }
    counts
        .up
        .fetch_add(rest.len() as u64, std::sync::atomic::Ordering::Relaxed);
    byte_counters.up.inc_by(rest.len() as u64);
    let limits = relay::Limits {
        idle: ctx.settings.idle_timeout,
        max_duration: ctx.settings.max_tunnel_duration,
    };
    let closing = ctx.closing.clone();
    match plain(io) {
        Ok(tcp) => relay::relay_tcp(tcp, upstream, &limits, counts, &byte_counters, closing).await,
        Err(io) => relay::relay(io, upstream, &limits, counts, &byte_counters, closing).await,
    }
}

/// The checks after the transport, in the order of SPEC §10. `Ok`: the connected destination,
/// the bytes the client sent after its head, and the tunnel slot held for the tunnel's life.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ctx: &Ctx,
    record: &mut Record,
) -> Result<(TcpStream, Vec<u8>, OwnedSemaphorePermit), Refused> {
    let settings = &ctx.settings;
    let head = request::read_head(io, settings.head_timeout)
        .await
        .map_err(|e| match e {
            request::HeadError::TooLarge => Refused::new(431, "bad_request", e.to_string()),
            request::HeadError::Timeout => Refused::new(408, "request_timeout", e.to_string()),
            request::HeadError::Malformed(_) => Refused::new(400, "bad_request", e.to_string()),
            // Nobody left to answer.
            request::HeadError::Closed | request::HeadError::Io(_) => {
                Refused::new(0, "bad_request", e.to_string())
            }
        })?;
    record.destination = head.target.chars().take(300).collect();

    if let Some(account) = &settings.proxy_account {
        let credentials = head
            .header("proxy-authorization")
            .and_then(BasicCredentials::parse);
        let missing = credentials.is_none();
        let account = account.clone();
        // Argon2 takes tens of milliseconds of CPU: keep it off the relay threads.
        let ok = tokio::task::spawn_blocking(move || account.verify(credentials.as_ref()))
            .await
            .unwrap_or(false);
        if !ok {
            let reason = if missing {
                "proxy credentials required: send Proxy-Authorization: Basic with the proxy account"
            } else {
                "proxy credentials rejected: wrong user or password"
            };
            return Err(Refused {
                header: Some(PROXY_AUTHENTICATE),
                ..Refused::new(407, "proxy_auth", reason)
            });
        }
    }

    if head.method != "CONNECT" {
        return Err(Refused {
            header: Some("Allow: CONNECT"),
            ..Refused::new(
                405,
                "method",
                format!(
                    "method {} not allowed: this proxy only opens tunnels with CONNECT",
                    head.method
                ),
            )
        });
    }

    let target = Target::parse(&head.target).ok_or_else(|| {
        Refused::new(
            400,
            "bad_request",
            "the CONNECT target is not host:port".to_owned(),
        )
    })?;
    record.destination = target.to_string();
    if !destination::allowed(&settings.destinations, &target) {
        return Err(Refused::new(
            403,
            "destination_not_allowed",
            format!("destination {target} is not in tunnel.allowed_destinations"),
        ));
    }

    let addrs = settings
        .resolver
        .resolve(&target.host_text(), target.port)
        .await
        .map_err(|e| {
            Refused::new(
                502,
                "unresolvable",
                format!("destination {target} does not resolve: {e}"),
            )
        })?;
    if !settings.allow_private_destinations
        && let Some((addr, why)) = addrs
            .iter()
            .find_map(|a| destination::non_public(a.ip()).map(|why| (a, why)))
    {
        return Err(Refused::new(
            403,
            "private_destination",
            format!(
                "destination {target} resolves to {} ({why}), and tunnel.allow_private_destinations is false",
                addr.ip()
            ),
        ));
    }

    let slot = ctx.slots.clone().try_acquire_owned().map_err(|_| {
        Refused::new(
            503,
            "no_slot",
            format!(
                "all {} tunnel slots are in use (tunnel.max_tunnels); retry later",
                settings.max_tunnels
            ),
        )
    })?;

    let started = Instant::now();
    let (stream, addr) = connect(ctx, &target.to_string(), addrs).await?;
    ctx.shared
        .metrics
        .tunnel_connect_seconds
        .observe(started.elapsed().as_secs_f64());
    let _ = stream.set_nodelay(true);
    record.address_used = Some(addr);
    Ok((stream, head.rest, slot))
}

/// Connect with the failover algorithm of SPEC §4: the first address not blocked, a failure
/// blocks it and moves on; every resolved address gets at most one try per tunnel.
async fn connect(
    ctx: &Ctx,
    key: &str,
    addrs: Vec<SocketAddr>,
) -> Result<(TcpStream, SocketAddr), Refused> {
    let settings = &ctx.settings;
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    let mut failures = Vec::new();
    let mut timeouts = 0;
    for _ in 0..addrs.len() {
        let Some(addr) = pick(ctx, key, &addrs, &tried) else {
            break;
        };
        tried.push(addr);
        let outcome =
            tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await;
        let mut map = ctx.failover.lock().unwrap_or_else(|p| p.into_inner());
        let state = map.get_mut(key);
        match outcome {
            Ok(Ok(stream)) => {
                if let Some(f) = state {
                    f.succeeded(addr);
                }
                return Ok((stream, addr));
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => {
                timeouts += 1;
                failures.push(format!(
                    "{addr}: no answer within {} ms",
                    settings.connect_timeout.as_millis()
                ));
            }
        }
        if let Some(f) = state {
            f.block(addr, Instant::now());
        }
    }
    let reason = format!("cannot connect to {key}: {}", failures.join("; "));
    Err(if timeouts > 0 && timeouts == failures.len() {
        Refused::new(504, "connect_timeout", reason)
    } else {
        Refused::new(502, "connect_failed", reason)
    })
}

/// The next address to try: the failover's pick, or — when its random pick among all-blocked
/// addresses repeats one tried already — the first one not tried yet.
fn pick(ctx: &Ctx, key: &str, addrs: &[SocketAddr], tried: &[SocketAddr]) -> Option<SocketAddr> {
    let now = Instant::now();
    let mut map = ctx.failover.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_FAILOVER_ENTRIES && !map.contains_key(key) {
        map.retain(|_, f| !f.blocked(now).is_empty());
    }
    let state = map
        .entry(key.to_owned())
        .or_insert_with(|| Failover::new(addrs.to_vec(), ctx.settings.block_for));
    if state.addresses() != addrs {
        // The name resolves differently now: start over with the new set.
        *state = Failover::new(addrs.to_vec(), ctx.settings.block_for);
    }
    match state.pick(now) {
        Some(addr) if !tried.contains(&addr) => Some(addr),
        _ => addrs.iter().find(|a| !tried.contains(a)).copied(),
    }
}

async fn refused(ctx: &Ctx, record: &Record, outcome: &'static str, reason: &str) {
    count(&ctx.shared.metrics, outcome);
    tracing::warn!(
        peer = %record.peer,
        client = %record.client,
        destination = %record.destination,
        outcome,
        "tunnel refused: {reason}"
    );
    audit(ctx, record, 0, 0, format!("{outcome}: {reason}")).await;
}

async fn audit(ctx: &Ctx, record: &Record, bytes_up: u64, bytes_down: u64, end: String) {
    let Some(store) = &ctx.shared.store else {
        return;
    };
    let entry = AuditRecord {
        at_ms: now_ms(),
        client: record.client.clone(),
        event: AuditEvent::Tunnel {
            client_address: record.peer.to_string(),
            destination: record.destination.clone(),
            address_used: record.address_used.map(|a| a.to_string()),
            bytes_up,
            bytes_down,
            duration_ms: record.started.elapsed().as_millis() as u64,
            end,
        },
    };
    if let Err(e) = store.append_audit(&entry).await {
        tracing::error!(error = %e, "cannot write the tunnel audit record");
    }
}

fn count(metrics: &Metrics, outcome: &str) {
    metrics
        .tunnels
        .get_or_create(&OutcomeLabels {
            outcome: outcome.to_owned(),
        })
        .inc();
}

fn direction(metrics: &Metrics, direction: &str) -> prometheus_client::metrics::counter::Counter {
    metrics
        .tunnel_bytes
        .get_or_create(&DirectionLabels {
            direction: direction.to_owned(),
        })
        .clone()
}
