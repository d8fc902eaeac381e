//! The operator artefacts in `deploy/` stay true to the code: the example config loads, and every
//! metric the alert rules and the dashboard query is one flowthrough exports.

use std::collections::BTreeSet;
use std::path::Path;

use flowthrough::config::Config;
use flowthrough::metrics::Metrics;

fn exported_metric_names() -> BTreeSet<String> {
    // Labelled families only appear once they have a child: give each one.
    let m = Metrics::new();
    m.count_command("UserAddRequest", "success");
    m.count_refusal("expired");
    m.count_store_error("unreachable");
    let file = flowthrough::metrics::FileLabels { file: "x".into() };
    m.certificate_expiry_seconds.get_or_create(&file).set(1);
    m.crl_next_update_seconds.get_or_create(&file).set(1);
    let status = flowthrough::metrics::StatusLabels {
        status: "200".into(),
    };
    m.http_responses.get_or_create(&status).inc();
    m.webex_final_status.get_or_create(&status).inc();
    let call = flowthrough::metrics::CallLabels {
        call: "provision".into(),
        status: "200".into(),
    };
    m.webex_calls.get_or_create(&call).inc();
    let outcome = flowthrough::metrics::OutcomeLabels {
        outcome: "ok".into(),
    };
    m.token_refreshes.get_or_create(&outcome).inc();
    m.reloads.get_or_create(&outcome).inc();
    m.tunnels.get_or_create(&outcome).inc();
    let up = flowthrough::metrics::DirectionLabels {
        direction: "up".into(),
    };
    m.tunnel_bytes.get_or_create(&up).inc();
    let drift = flowthrough::metrics::DriftLabels {
        kind: "extra".into(),
    };
    m.reconcile_drift_users.get_or_create(&drift).set(1);
    let node = flowthrough::metrics::NodeVersionLabels {
        node: "a".into(),
        version: "1".into(),
    };
    m.cluster_node_heartbeat_age_seconds
        .get_or_create(&node)
        .set(1.0);
    let held = flowthrough::metrics::NodeLabels { node: "a".into() };
    m.cluster_lanes_held.get_or_create(&held).set(1);
    m.render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Metric names used in a text, with the suffixes Prometheus adds stripped.
fn referenced_metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("flowthrough_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_total", "_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
            }
        }
        names.insert(name.to_owned());
        rest = &tail[end..];
    }
    names
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn alert_rules_and_dashboard_only_use_exported_metrics() {
    let exported = exported_metric_names();
    assert!(
        exported.contains("flowthrough_outbox_pending"),
        "{exported:?}"
    );
    for file in [
        "deploy/prometheus-alerts.yml",
        "deploy/grafana-dashboard.json",
    ] {
        let used = referenced_metric_names(&read(file));
        assert!(used.len() >= 5, "{file} uses too few metrics: {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics flowthrough does not export: {unknown:?}"
        );
    }
}

#[test]
fn the_dashboard_is_valid_json_with_a_target_per_panel() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for panel in panels {
        assert!(!panel["targets"].as_array().unwrap().is_empty(), "{panel}");
    }
}

/// The HAProxy example passes the AS's TLS through (mutual TLS must end at flowthrough) and
/// takes a node out when its `/readyz` on the admin listener turns red.
#[test]
fn haproxy_passes_tls_through_and_checks_readiness() {
    let cfg = read("deploy/haproxy.cfg");
    let lines: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(lines.contains(&"mode tcp"), "TCP mode, not HTTP");
    for line in &lines {
        assert!(
            !line.split_whitespace().any(|w| w == "ssl" || w == "crt"),
            "HAProxy must not terminate TLS: {line}"
        );
    }
    assert!(lines.contains(&"option httpchk"));
    assert!(lines.contains(&"http-check send meth GET uri /readyz"));
    assert!(lines.contains(&"http-check expect status 200"));
    let servers: Vec<&&str> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert!(servers.len() >= 2, "two nodes: {servers:?}");
    let admin_port = flowthrough::config::AdminConfig::default().listen.port();
    for server in servers {
        assert!(
            server.ends_with(&format!("check port {admin_port}")),
            "each node is checked on its admin listener: {server}"
        );
    }
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/flowthrough.example.toml");
    let config = Config::load(&path).unwrap();
    assert!(config.templates.contains_key("acme"));
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit = read("deploy/flowthrough.service");
    for directive in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/flowthrough",
        "User=flowthrough",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(directive), "missing {directive:?}");
    }
}
