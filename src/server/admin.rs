//! The admin listener (loopback by default, plain HTTP): metrics, health, readiness, status,
//! certificate reload, and the outbox operations of a running instance (sled admits one process
//! per store, so `flowthrough outbox` talks to a running server through here).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, ServeError};
use crate::config::{ClientPolicyConfig, ServerConfig};
use crate::listener::CurrentTls;
use crate::metrics::{
    DriftLabels, FileLabels, Metrics, NodeLabels, NodeVersionLabels, OutcomeLabels,
};
use crate::population::fetch::{ListStats, Scope, list_scope};
use crate::store::{Filter, NewEntry, Origin, ReconcileReport, now_ms};
use crate::tls::{LoadedTls, Observer};
use crate::webex::TokenState;

/// Reloads the TLS material: validates the whole new set, then swaps it in atomically.
#[derive(Clone)]
pub struct Reloader {
    pub server: ServerConfig,
    pub policy: ClientPolicyConfig,
    pub observer: Observer,
    pub tls: CurrentTls,
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    pub fn reload(&self) -> Result<(), String> {
        let outcome = |o: &str| OutcomeLabels {
            outcome: o.to_owned(),
        };
        match crate::tls::server_config(&self.server, &self.policy, self.observer.clone()) {
            Ok(loaded) => {
                self.tls.store(loaded.config.clone());
                export_tls_metrics(&self.metrics, &self.server, &loaded);
                self.metrics.reloads.get_or_create(&outcome("ok")).inc();
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .reloads
                    .get_or_create(&outcome("refused"))
                    .inc();
                Err(e.to_string())
            }
        }
    }
}

fn seconds_until(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Certificate expiry and CRL freshness, after every (re)load.
pub fn export_tls_metrics(metrics: &Metrics, server: &ServerConfig, loaded: &LoadedTls) {
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    for path in [&server.certificate, &server.client_ca] {
        if let Some(not_after) = first_not_after(path) {
            metrics
                .certificate_expiry_seconds
                .get_or_create(&FileLabels {
                    file: path.display().to_string(),
                })
                .set(seconds_until(not_after));
        }
    }
    for (path, next_update) in &loaded.crl_next_updates {
        if let Some(next) = next_update {
            metrics
                .crl_next_update_seconds
                .get_or_create(&FileLabels {
                    file: path.display().to_string(),
                })
                .set(seconds_until(*next));
        }
    }
}

/// The expiry of the first certificate of a PEM file (the leaf of a chain).
fn first_not_after(path: &std::path::Path) -> Option<SystemTime> {
    let certs = crate::tls::read_cert_file(path).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Readiness and its reasons.
fn readiness(state: &AppState) -> (bool, Vec<String>) {
    let mut reasons = Vec::new();
    if state.shutting_down() {
        reasons.push("shutting down".to_owned());
    }
    if !state.tls_loaded.load(Ordering::SeqCst) {
        reasons.push("certificates not loaded".to_owned());
    }
    if let Some(failure) = state.store.write_failure() {
        reasons.push(format!(
            "the store cannot be written ({}: {failure}); every command is refused with 503 — {}",
            state.store.backend_name(),
            state.store.write_failure_remedy()
        ));
    }
    if let Some(tokens) = &state.tokens
        && let TokenState::CredentialsInvalid { reason } = tokens.state()
    {
        reasons.push(format!(
            "Webex refresh token rejected ({reason}); install a new one with `flowthrough token set`"
        ));
    }
    (reasons.is_empty(), reasons)
}

async fn refresh_gauges(state: &AppState) {
    let m = &state.metrics;
    m.set_log_lines_dropped(crate::logging::dropped_lines());
    if let Ok((pending, oldest)) = state.store.pending_summary().await {
        m.outbox_pending.set(pending as i64);
        let age = oldest.map_or(0, |t| now_ms().saturating_sub(t)) as f64 / 1000.0;
        m.outbox_oldest_age_seconds.set(age);
    }
    if let Ok(dead) = state.store.dead_count().await {
        m.outbox_dead.set(dead as i64);
    }
    if let Ok(Some(report)) = state.store.reconcile_report().await {
        m.reconcile_last_run_seconds
            .set(i64::try_from(report.at_ms / 1000).unwrap_or(i64::MAX));
        for (kind, users) in report.counts {
            m.reconcile_drift_users
                .get_or_create(&DriftLabels { kind })
                .set(i64::try_from(users).unwrap_or(i64::MAX));
        }
    }
    if let Ok(nodes) = state.store.nodes().await {
        // Families are cleared so that a node gone from the table leaves the series too.
        m.cluster_node_heartbeat_age_seconds.clear();
        m.cluster_lanes_held.clear();
        let mut overdue = 0;
        for node in nodes.iter().filter(|n| !n.stopped) {
            m.cluster_node_heartbeat_age_seconds
                .get_or_create(&NodeVersionLabels {
                    node: node.node_id.clone(),
                    version: node.version.clone(),
                })
                .set(node.heartbeat_age_ms as f64 / 1000.0);
            m.cluster_lanes_held
                .get_or_create(&NodeLabels {
                    node: node.node_id.clone(),
                })
                .set(i64::try_from(node.lanes_held.len()).unwrap_or(i64::MAX));
        }
        for node in &nodes {
            overdue += node.leases_overdue;
        }
        m.cluster_leases_overdue
            .set(i64::try_from(overdue).unwrap_or(i64::MAX));
    }
    if let Some(db) = state.store.database_stats() {
        m.store_pool_in_use.set(db.pool_in_use as i64);
        m.store_pool_waiting.set(db.pool_waiting as i64);
        m.store_pool_size.set(db.pool_size as i64);
    }
    if let Some(path) = state.store.volume_path()
        && let Ok(space) = crate::store::volume_space(path)
    {
        m.store_volume_available_bytes
            .set(i64::try_from(space.available).unwrap_or(i64::MAX));
        m.store_volume_size_bytes
            .set(i64::try_from(space.total).unwrap_or(i64::MAX));
    }
    if let Some(up) = &state.upstream {
        m.upstream_blocked_addresses
            .set(up.transport.blocked(&up.host, up.port).len() as i64);
    }
    m.deliveries_paused.set(i64::from(
        state
            .engine
            .as_ref()
            .is_some_and(|e| e.paused_until().is_some()),
    ));
    if let Some(engine) = &state.engine {
        m.delivery_pace_per_second.set(engine.pace().unwrap_or(0.0));
        m.deliveries_waiting_for_webex
            .set(engine.waiting_for_webex() as i64);
    }
    if let Some(tokens) = &state.tokens {
        let status = tokens.status();
        let now = now_ms() / 1000;
        m.token_valid.set(i64::from(!matches!(
            status.state,
            TokenState::CredentialsInvalid { .. }
        )));
        if let Some(at) = status.access_expires_at {
            m.access_token_expiry_seconds.set(at - now as i64);
        }
        if let Some(at) = status.refresh_expires_at {
            m.refresh_token_expiry_seconds.set(at - now as i64);
        }
    }
    let (ready, _) = readiness(state);
    m.ready.set(i64::from(ready));
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    refresh_gauges(&state).await;
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render())
}

/// Where the recent provisioning requests' time went, stage by stage (`trace`), in
/// microseconds; the tail is the slowest 1 % of them.
async fn stages(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(state.traces.summary())
}

/// Forget the recorded requests, so that the next summary covers one measurement only.
async fn stages_clear(state: web::Data<AppState>) -> HttpResponse {
    state.traces.clear();
    HttpResponse::NoContent().finish()
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (ready, reasons) = readiness(&state);
    if ready {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {}\n", reasons.join("; ")))
    }
}

async fn status(state: web::Data<AppState>) -> HttpResponse {
    let (ready, reasons) = readiness(&state);
    // Counts the store cannot give are null with the reason beside them, never 0: "nothing
    // pending" while the database is down would tell the operator the opposite of the truth.
    let counts = match state.store.pending_summary().await {
        Ok(summary) => state.store.dead_count().await.map(|dead| (summary, dead)),
        Err(e) => Err(e),
    };
    let (pending, oldest, dead, unknown) = match counts {
        Ok(((pending, oldest), dead)) => (Some(pending), oldest, Some(dead), None),
        Err(e) => (None, None, None, Some(e.to_string())),
    };
    let documents = state
        .store
        .audit(&crate::store::AuditQuery {
            documents_only: true,
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    let token = state.tokens.as_ref().map(|t| t.status());
    HttpResponse::Ok().json(json!({
        "ready": ready,
        "not_ready_reasons": reasons,
        "outbox": {
            "pending": pending,
            "oldest_pending_ms": oldest,
            "dead": dead,
            "counts_unavailable": unknown,
            "paused_for_rate_limit": state.engine.as_ref().is_some_and(|e| e.paused_until().is_some()),
            "pace_per_second": state.engine.as_ref().and_then(|e| e.pace()),
            "users_waiting_for_webex": state.engine.as_ref().map_or(0, |e| e.waiting_for_webex()),
        },
        "token": token,
        "cluster": {
            "node_id": state.config.cluster.node_id,
            "nodes": state.store.nodes().await.unwrap_or_default(),
        },
        "recent_unreadable_documents": documents,
    }))
}

async fn reload(reloader: web::Data<Reloader>) -> HttpResponse {
    match reloader.reload() {
        Ok(()) => HttpResponse::Ok().json(json!({"reloaded": true})),
        Err(e) => HttpResponse::UnprocessableEntity().json(json!({
            "reloaded": false,
            "error": e,
            "note": "the previous certificates stay in use",
        })),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

fn filter_from(name: Option<&str>) -> Result<Filter, String> {
    match name.unwrap_or("active") {
        "all" => Ok(Filter::All),
        "pending" => Ok(Filter::Pending),
        "dead" => Ok(Filter::Dead),
        "delivered" => Ok(Filter::Delivered),
        "active" => Ok(Filter::Active),
        other => Err(format!(
            "unknown state {other:?}; use all, pending, dead or delivered"
        )),
    }
}

async fn outbox_list(state: web::Data<AppState>, q: web::Query<ListQuery>) -> HttpResponse {
    let filter = match filter_from(q.state.as_deref()) {
        Ok(f) => f,
        Err(e) => return HttpResponse::BadRequest().json(json!({ "error": e })),
    };
    match state.store.list(filter, q.limit.unwrap_or(100)).await {
        Ok(entries) => HttpResponse::Ok().json(entries),
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

async fn outbox_show(state: web::Data<AppState>, id: web::Path<u64>) -> HttpResponse {
    match state.store.entry(*id).await {
        Ok(Some(entry)) => HttpResponse::Ok().json(entry),
        Ok(None) => {
            HttpResponse::NotFound().json(json!({ "error": format!("no outbox entry {id}") }))
        }
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

async fn outbox_retry(state: web::Data<AppState>, id: web::Path<u64>) -> HttpResponse {
    match state.store.retry(*id).await {
        Ok(true) => {
            if let Ok(Some(entry)) = state.store.entry(*id).await {
                let _ = state.store.flush().await;
                if let Some(engine) = &state.engine {
                    engine.submit(&entry.new.user_id);
                }
            }
            HttpResponse::Ok().json(json!({ "retried": *id }))
        }
        Ok(false) => HttpResponse::Conflict().json(json!({
            "error": format!("outbox entry {id} is not dead (or does not exist); only dead entries are retried")
        })),
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

async fn outbox_drop(state: web::Data<AppState>, id: web::Path<u64>) -> HttpResponse {
    match state.store.drop_entry(*id).await {
        Ok(Some(entry)) => {
            let _ = state.store.flush().await;
            // A dead entry held its user's lane: what waited behind it goes now.
            if let Some(engine) = &state.engine {
                engine.submit(&entry.new.user_id);
            }
            HttpResponse::Ok().json(entry)
        }
        Ok(None) => {
            HttpResponse::NotFound().json(json!({ "error": format!("no outbox entry {id}") }))
        }
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

#[derive(Deserialize)]
struct ImportBody {
    entries: Vec<NewEntry>,
    /// Leave alone users the node maps or has work for (an import); false for repairs, which
    /// are about known users.
    #[serde(default = "yes")]
    skip_known: bool,
}

fn yes() -> bool {
    true
}

/// `flowthrough import` (and `reconcile --repair`) against a running node: bulk entries into
/// the outbox, behind no live command. With `skip_known`, a user the node already maps or has
/// queued work for is left alone (the import is run again safely); the answer says, per entry
/// in order, what happened.
async fn import(state: web::Data<AppState>, body: web::Json<ImportBody>) -> HttpResponse {
    let Some(engine) = &state.engine else {
        return HttpResponse::Conflict()
            .json(json!({ "error": "this node does not deliver to Webex (tunnel only)" }));
    };
    let mut answers = Vec::with_capacity(body.entries.len());
    let mut queued = Vec::new();
    for entry in &body.entries {
        let user_id = entry.user_id.clone();
        let known = state
            .store
            .user(&user_id)
            .await
            .map(|u| u.is_some_and(|u| u.subscriber_id.is_some()));
        let pending = state.store.has_queued(&user_id).await;
        let (known, pending) = if body.skip_known {
            (known, pending)
        } else {
            (Ok(false), Ok(false))
        };
        let outcome = match (known, pending) {
            (Ok(true), _) => {
                json!({"outcome": "known", "detail": "flowthrough already maps this user; `flowthrough reconcile` compares its fields"})
            }
            (_, Ok(true)) => {
                json!({"outcome": "queued_before", "detail": "work for this user is already in the outbox"})
            }
            (Err(e), _) | (_, Err(e)) => {
                return HttpResponse::InternalServerError().json(json!({ "error": e.to_string() }));
            }
            (Ok(false), Ok(false)) => {
                queued.push(NewEntry {
                    origin: Origin::Bulk,
                    ..entry.clone()
                });
                json!({"outcome": "queued", "detail": "in the outbox, delivered after live commands"})
            }
        };
        answers.push(outcome);
    }
    let users: Vec<String> = queued.iter().map(|e| e.user_id.clone()).collect();
    if let Err(e) = state.store.enqueue(queued, now_ms()).await {
        return HttpResponse::ServiceUnavailable().json(json!({ "error": e.to_string() }));
    }
    if let Err(e) = state.store.flush().await {
        return HttpResponse::ServiceUnavailable().json(json!({ "error": e.to_string() }));
    }
    for user in &users {
        engine.submit_as(user, Origin::Bulk);
    }
    HttpResponse::Ok().json(json!({ "users": answers }))
}

/// flowthrough's user map (userId → subscriber id), for `flowthrough reconcile`.
async fn users(state: web::Data<AppState>) -> HttpResponse {
    match state.store.users().await {
        Ok(users) => {
            let mapped: std::collections::BTreeMap<String, String> = users
                .into_iter()
                .filter_map(|(user, record)| record.subscriber_id.map(|id| (user, id)))
                .collect();
            HttpResponse::Ok().json(json!({ "users": mapped }))
        }
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

#[derive(Deserialize)]
struct UnmapBody {
    users: Vec<String>,
}

/// Forget the subscriber ids of these users (stale map entries found by reconcile).
async fn unmap(state: web::Data<AppState>, body: web::Json<UnmapBody>) -> HttpResponse {
    for user in &body.users {
        if let Err(e) = state.store.unmap_subscriber(user).await {
            return HttpResponse::InternalServerError().json(json!({ "error": e.to_string() }));
        }
    }
    match state.store.flush().await {
        Ok(()) => HttpResponse::Ok().json(json!({ "unmapped": body.users.len() })),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({ "error": e.to_string() })),
    }
}

#[derive(Deserialize)]
struct ScopeQuery {
    #[serde(rename = "provisioningId")]
    provisioning_id: Option<String>,
    #[serde(rename = "spEnterpriseId")]
    sp_enterprise_id: Option<String>,
    max_rate: Option<f64>,
}

/// Every Webex subscriber of a provisioning ID or spEnterpriseId, listed with this node's
/// credentials under the learned pace: `flowthrough reconcile` cannot use the credentials
/// while the node holds the store.
async fn subscribers(state: web::Data<AppState>, q: web::Query<ScopeQuery>) -> HttpResponse {
    let Some(client) = &state.webex else {
        return HttpResponse::Conflict()
            .json(json!({ "error": "this node does not talk to Webex (tunnel only)" }));
    };
    let scope = match (&q.provisioning_id, &q.sp_enterprise_id) {
        (Some(id), None) => Scope::ProvisioningId(id.clone()),
        (None, Some(id)) => Scope::SpEnterpriseId(id.clone()),
        _ => {
            return HttpResponse::BadRequest()
                .json(json!({ "error": "name exactly one of provisioningId and spEnterpriseId" }));
        }
    };
    let mut stats = ListStats::default();
    match list_scope(client, &scope, q.max_rate, &mut stats, |_| {}).await {
        Ok(listed) => HttpResponse::Ok().json(json!({
            "subscribers": listed,
            "pages": stats.pages,
            "rate_limited": stats.rate_limited,
        })),
        Err(e) => HttpResponse::BadGateway().json(json!({ "error": e.to_string() })),
    }
}

/// Keep the counts of a reconcile run for `/metrics`.
async fn reconcile_report(
    state: web::Data<AppState>,
    report: web::Json<ReconcileReport>,
) -> HttpResponse {
    if let Err(e) = state.store.put_reconcile_report(&report).await {
        return HttpResponse::InternalServerError().json(json!({ "error": e.to_string() }));
    }
    match state.store.flush().await {
        Ok(()) => HttpResponse::NoContent().finish(),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({ "error": e.to_string() })),
    }
}

#[derive(Deserialize)]
struct AuditParams {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    documents: bool,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit(state: web::Data<AppState>, q: web::Query<AuditParams>) -> HttpResponse {
    let query = crate::store::AuditQuery {
        user_id: q.user.clone(),
        documents_only: q.documents,
        limit: q.limit.unwrap_or(50),
    };
    match state.store.audit(&query).await {
        Ok(records) => HttpResponse::Ok().json(records),
        Err(e) => HttpResponse::InternalServerError().json(json!({ "error": e.to_string() })),
    }
}

type Started = (
    SocketAddr,
    actix_server::ServerHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// Start the admin listener.
pub fn start(
    addr: SocketAddr,
    state: web::Data<AppState>,
    reloader: Reloader,
) -> Result<Started, ServeError> {
    let reloader = web::Data::new(reloader);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(reloader.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/status", web::get().to(status))
            .route("/debug/stages", web::get().to(stages))
            .route("/debug/stages", web::delete().to(stages_clear))
            .route("/admin/reload", web::post().to(reload))
            .route("/admin/audit", web::get().to(audit))
            .route("/admin/outbox", web::get().to(outbox_list))
            .route("/admin/outbox/{id}", web::get().to(outbox_show))
            .route("/admin/outbox/{id}", web::delete().to(outbox_drop))
            .route("/admin/outbox/{id}/retry", web::post().to(outbox_retry))
            .app_data(web::JsonConfig::default().limit(16 << 20))
            .route("/admin/import", web::post().to(import))
            .route("/admin/users", web::get().to(users))
            .route("/admin/users/unmap", web::post().to(unmap))
            .route("/admin/webex/subscribers", web::get().to(subscribers))
            .route("/admin/reconcile", web::put().to(reconcile_report))
    })
    .workers(1)
    .disable_signals()
    .bind(addr)
    .map_err(|e| ServeError::Bind {
        addr,
        reason: e.to_string(),
    })?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let server = server.run();
    let handle = server.handle();
    Ok((bound, handle, tokio::spawn(server)))
}
