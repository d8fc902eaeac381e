//! Prometheus metrics: one registry for the process, served as text by the admin listener.
//!
//! Every metric name starts with `flowthrough_`; label values are short, fixed vocabularies (a
//! command name, an outcome, a refusal reason) so cardinality stays bounded whatever the AS sends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The command name without its release suffix (bounded vocabulary).
    pub command: String,
    /// `success`, `warning_7020`, `error_7010`, …
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// provision, update, remove, get, list, token.
    pub call: String,
    /// HTTP status, or `network` / `timeout`.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    pub file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` (client → destination) or `down`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `unreachable`, `connection_lost`, `read_only`, `full`, `timeout`, `authentication`, `other`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// A node sharing the store (`[cluster] node_id`): a handful per deployment.
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeVersionLabels {
    pub node: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// A kind of drift: missing, extra, differs, error, stuck, stale_map.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub commands: Family<CommandLabels, Counter>,
    pub request_seconds: Histogram,
    pub http_responses: Family<StatusLabels, Counter>,
    pub tls_refusals: Family<ReasonLabels, Counter>,
    pub outbox_pending: Gauge,
    pub outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub outbox_dead: Gauge,
    pub reconcile_drift_users: Family<DriftLabels, Gauge>,
    pub cluster_node_heartbeat_age_seconds: Family<NodeVersionLabels, Gauge<f64, AtomicU64>>,
    pub cluster_lanes_held: Family<NodeLabels, Gauge>,
    pub cluster_leases_overdue: Gauge,
    pub reconcile_last_run_seconds: Gauge,
    pub store_volume_available_bytes: Gauge,
    pub store_volume_size_bytes: Gauge,
    pub webex_calls: Family<CallLabels, Counter>,
    pub webex_seconds: Histogram,
    pub store_flush_seconds: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_errors: Family<KindLabels, Counter>,
    pub store_pool_in_use: Gauge,
    pub store_pool_waiting: Gauge,
    pub store_pool_size: Gauge,
    pub webex_final_status: Family<StatusLabels, Counter>,
    pub upstream_blocked_addresses: Gauge,
    pub deliveries_paused: Gauge,
    pub delivery_pace_per_second: Gauge<f64, AtomicU64>,
    pub deliveries_waiting_for_webex: Gauge,
    pub token_valid: Gauge,
    pub access_token_expiry_seconds: Gauge,
    pub refresh_token_expiry_seconds: Gauge,
    pub token_refreshes: Family<OutcomeLabels, Counter>,
    pub certificate_expiry_seconds: Family<FileLabels, Gauge>,
    pub crl_next_update_seconds: Family<FileLabels, Gauge>,
    pub reloads: Family<OutcomeLabels, Counter>,
    pub tunnels_open: Gauge,
    pub tunnels: Family<OutcomeLabels, Counter>,
    pub tunnel_bytes: Family<DirectionLabels, Counter>,
    pub tunnel_connect_seconds: Histogram,
    pub ready: Gauge,
    pub log_lines_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flowthrough");
        let m = Metrics {
            commands: Family::default(),
            // 0.5 ms … ~16 s.
            request_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            http_responses: Family::default(),
            tls_refusals: Family::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_age_seconds: Gauge::default(),
            outbox_dead: Gauge::default(),
            reconcile_drift_users: Family::default(),
            cluster_node_heartbeat_age_seconds: Family::default(),
            cluster_lanes_held: Family::default(),
            cluster_leases_overdue: Gauge::default(),
            reconcile_last_run_seconds: Gauge::default(),
            store_volume_available_bytes: Gauge::default(),
            store_volume_size_bytes: Gauge::default(),
            webex_calls: Family::default(),
            webex_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            // 0.1 ms … ~0.8 s: an fsync on a healthy disk is well under a millisecond.
            store_flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            // 0.1 ms … ~1.6 s: a round trip and a commit's WAL flush (and a standby's, if any).
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            store_errors: Family::default(),
            store_pool_in_use: Gauge::default(),
            store_pool_waiting: Gauge::default(),
            store_pool_size: Gauge::default(),
            webex_final_status: Family::default(),
            upstream_blocked_addresses: Gauge::default(),
            deliveries_paused: Gauge::default(),
            delivery_pace_per_second: Gauge::default(),
            deliveries_waiting_for_webex: Gauge::default(),
            token_valid: Gauge::default(),
            access_token_expiry_seconds: Gauge::default(),
            refresh_token_expiry_seconds: Gauge::default(),
            token_refreshes: Family::default(),
            certificate_expiry_seconds: Family::default(),
            crl_next_update_seconds: Family::default(),
            reloads: Family::default(),
            tunnels_open: Gauge::default(),
            tunnels: Family::default(),
            tunnel_bytes: Family::default(),
            tunnel_connect_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ready: Gauge::default(),
            log_lines_dropped: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "commands",
            "OCI-P commands by command and outcome",
            m.commands.clone(),
        );
        r.register(
            "request_seconds",
            "Time from request received to OCI-P answer sent",
            m.request_seconds.clone(),
        );
        r.register(
            "http_responses",
            "HTTP responses of the provisioning listener by status",
            m.http_responses.clone(),
        );
        r.register(
            "tls_refusals",
            "Client certificates or connections refused, by reason",
            m.tls_refusals.clone(),
        );
        r.register(
            "outbox_pending",
            "Outbox entries not yet delivered",
            m.outbox_pending.clone(),
        );
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest undelivered outbox entry",
            m.outbox_oldest_age_seconds.clone(),
        );
        r.register(
            "outbox_dead",
            "Dead outbox entries waiting for the operator",
            m.outbox_dead.clone(),
        );
        r.register(
            "cluster_node_heartbeat_age_seconds",
            "Since each node sharing the store last wrote its heartbeat (the store's clock); a node that left on SIGTERM is not listed",
            m.cluster_node_heartbeat_age_seconds.clone(),
        );
        r.register(
            "cluster_lanes_held",
            "Users whose delivery lane each node holds a lease on now",
            m.cluster_lanes_held.clone(),
        );
        r.register(
            "cluster_leases_overdue",
            "Delivery lanes whose lease ran out with work still on them and that no node has taken over",
            m.cluster_leases_overdue.clone(),
        );
        r.register(
            "reconcile_drift_users",
            "Users found drifted by kind in the last `flowthrough reconcile` run on this store",
            m.reconcile_drift_users.clone(),
        );
        r.register(
            "reconcile_last_run_timestamp_seconds",
            "When the last `flowthrough reconcile` run on this store ended (Unix time)",
            m.reconcile_last_run_seconds.clone(),
        );
        r.register(
            "webex_calls",
            "Webex API calls by call and status",
            m.webex_calls.clone(),
        );
        r.register(
            "webex_seconds",
            "Webex API call latency",
            m.webex_seconds.clone(),
        );
        r.register(
            "store_flush_seconds",
            "Time from a request asking for its commands to be flushed to disk to the end of the flush that did it (the AS is answered only after it)",
            m.store_flush_seconds.clone(),
        );
        r.register(
            "store_commit_seconds",
            "PostgreSQL store: time of each write, its round trip and commit included (an acknowledgement waits for one)",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "store_errors",
            "PostgreSQL store: failed operations by kind (unreachable, connection_lost, read_only, full, timeout, authentication, other)",
            m.store_errors.clone(),
        );
        r.register(
            "store_pool_in_use",
            "PostgreSQL store: pooled connections in use",
            m.store_pool_in_use.clone(),
        );
        r.register(
            "store_pool_waiting",
            "PostgreSQL store: operations waiting for a pooled connection",
            m.store_pool_waiting.clone(),
        );
        r.register(
            "store_pool_size",
            "PostgreSQL store: connections the pool may open (store.postgres.pool_size)",
            m.store_pool_size.clone(),
        );
        r.register(
            "webex_final_status",
            "Final subscriber status after follow-up",
            m.webex_final_status.clone(),
        );
        r.register(
            "upstream_blocked_addresses",
            "Upstream addresses currently blocked",
            m.upstream_blocked_addresses.clone(),
        );
        r.register(
            "deliveries_paused",
            "1 while deliveries are paused by a Webex rate limit",
            m.deliveries_paused.clone(),
        );
        r.register(
            "delivery_pace_per_second",
            "Delivery attempts per second allowed since Webex answered 429 (learned from what it accepted); 0 while unpaced",
            m.delivery_pace_per_second.clone(),
        );
        r.register(
            "deliveries_waiting_for_webex",
            "Users whose deliveries wait while Webex fails (one of them probes until it answers)",
            m.deliveries_waiting_for_webex.clone(),
        );
        r.register(
            "token_valid",
            "1 when the Webex credentials are usable, 0 when the refresh token was rejected",
            m.token_valid.clone(),
        );
        r.register(
            "access_token_expiry_seconds",
            "Seconds until the access token expires",
            m.access_token_expiry_seconds.clone(),
        );
        r.register(
            "refresh_token_expiry_seconds",
            "Seconds until the refresh token expires",
            m.refresh_token_expiry_seconds.clone(),
        );
        r.register(
            "token_refreshes",
            "Token refreshes by outcome",
            m.token_refreshes.clone(),
        );
        r.register(
            "certificate_expiry_seconds",
            "Seconds until a configured certificate expires",
            m.certificate_expiry_seconds.clone(),
        );
        r.register(
            "crl_next_update_seconds",
            "Seconds until a CRL's nextUpdate (negative: expired)",
            m.crl_next_update_seconds.clone(),
        );
        r.register(
            "reloads",
            "Certificate reloads by outcome",
            m.reloads.clone(),
        );
        r.register(
            "tunnels_open",
            "Open CONNECT tunnels",
            m.tunnels_open.clone(),
        );
        r.register("tunnels", "CONNECT requests by outcome", m.tunnels.clone());
        r.register(
            "tunnel_bytes",
            "Bytes relayed through tunnels",
            m.tunnel_bytes.clone(),
        );
        r.register(
            "tunnel_connect_seconds",
            "Time to connect a tunnel to its destination",
            m.tunnel_connect_seconds.clone(),
        );
        r.register(
            "store_volume_available_bytes",
            "Bytes flowthrough can still write on the store's volume; at 0 every command is refused",
            m.store_volume_available_bytes.clone(),
        );
        r.register(
            "store_volume_size_bytes",
            "Size of the store's volume in bytes",
            m.store_volume_size_bytes.clone(),
        );
        r.register("ready", "1 when /readyz is green", m.ready.clone());
        r.register(
            "log_lines_dropped",
            "Log lines dropped because the log's reader (journald, a collector) fell behind",
            m.log_lines_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Bring the dropped-lines counter up to the log writer's own count (read at each scrape).
    pub fn set_log_lines_dropped(&self, dropped: u64) {
        // fetch_max: two scrapes at once never count the same lines twice.
        self.log_lines_dropped
            .inner()
            .fetch_max(dropped, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn count_command(&self, command: &str, outcome: &str) {
        self.commands
            .get_or_create(&CommandLabels {
                command: command.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn count_store_error(&self, kind: &str) {
        self.store_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn count_refusal(&self, reason: &str) {
        self.tls_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_includes_labelled_counters_with_the_prefix() {
        let m = Metrics::new();
        m.count_command("UserAddRequest", "success");
        m.count_refusal("missing_broadworks_oid");
        m.outbox_pending.set(3);
        let text = m.render();
        assert!(
            text.contains(
                r#"flowthrough_commands_total{command="UserAddRequest",outcome="success"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"flowthrough_tls_refusals_total{reason="missing_broadworks_oid"} 1"#)
        );
        assert!(text.contains("flowthrough_outbox_pending 3"));
        assert!(text.ends_with("# EOF\n"));
    }
}
