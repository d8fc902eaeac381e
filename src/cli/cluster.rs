//! `flowthrough cluster status`: the nodes sharing a PostgreSQL store, read from the store
//! itself, so it answers whichever node is down.

use std::path::PathBuf;
use std::process::ExitCode;

use super::fail;
use crate::config::{Config, StoreBackend};
use crate::store::{NodeStatus, Store};

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Every node that shares this store: its release, its last heartbeat, the users whose
    /// delivery it holds, and leases left to run out with nobody taking them over.
    ///
    /// A node is missing when its heartbeat is older than one lease (`[cluster] lease_ms`): by
    /// then its users' leases have run out and the other nodes deliver them.
    ///
    /// Exit status: 0 every node alive (or stopped on purpose), 2 a node missing or leases
    /// overdue, 1 on config or database errors.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ClusterArgs) -> ExitCode {
    let ClusterCommand::Status { config, json } = args.command;
    let loaded = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if loaded.store.backend != StoreBackend::Postgres {
        return fail(format!(
            "{}: the store is sled, which serves one node; several nodes share a PostgreSQL store (README, \"Running two nodes\"). For this node, read /status on its admin listener",
            config.display()
        ));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    let nodes = runtime.block_on(async {
        let store = Store::connect_configured(&loaded.store).await?;
        store.nodes().await
    });
    let nodes = match nodes {
        Ok(nodes) => nodes,
        Err(e) => return fail(e),
    };
    let lease_ms = loaded.cluster.lease_ms;
    let missing = |n: &NodeStatus| !n.stopped && n.heartbeat_age_ms > lease_ms;
    let trouble = nodes.iter().any(|n| missing(n) || n.leases_overdue > 0);
    if json {
        let listed: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node_id": n.node_id,
                    "version": n.version,
                    "state": state_of(n, missing(n)),
                    "started_ms": n.started_ms,
                    "heartbeat_age_ms": n.heartbeat_age_ms,
                    "lanes_held": n.lanes_held,
                    "leases_overdue": n.leases_overdue,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "lease_ms": lease_ms, "nodes": listed })
        );
    } else {
        print!("{}", table(&nodes, &missing));
    }
    if trouble {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn state_of(node: &NodeStatus, missing: bool) -> &'static str {
    match (node.stopped, missing) {
        (true, _) => "stopped",
        (false, true) => "missing",
        (false, false) => "alive",
    }
}

/// Users listed per node in the table; the JSON lists them all.
const USERS_SHOWN: usize = 5;

fn table(nodes: &[NodeStatus], missing: &dyn Fn(&NodeStatus) -> bool) -> String {
    if nodes.is_empty() {
        return "no node has started on this store yet (each node writes a heartbeat once `serve` runs)\n".to_owned();
    }
    let mut out = format!(
        "{:<24} {:<10} {:<8} {:>10}  {}\n",
        "NODE", "VERSION", "STATE", "HEARTBEAT", "DELIVERING"
    );
    for node in nodes {
        let mut users = node
            .lanes_held
            .iter()
            .take(USERS_SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if node.lanes_held.len() > USERS_SHOWN {
            users.push_str(&format!(" (+{} more)", node.lanes_held.len() - USERS_SHOWN));
        }
        out.push_str(&format!(
            "{:<24} {:<10} {:<8} {:>9.1}s  {}\n",
            node.node_id,
            node.version,
            state_of(node, missing(node)),
            node.heartbeat_age_ms as f64 / 1000.0,
            if users.is_empty() { "-" } else { &users }
        ));
        if node.leases_overdue > 0 {
            out.push_str(&format!(
                "  ! {} of its leases ran out with work still on them and no node has taken them over: check that the other nodes are running and can reach the database\n",
                node.leases_overdue
            ));
        }
    }
    for node in nodes.iter().filter(|n| missing(n)) {
        out.push_str(&format!(
            "! {} is missing (no heartbeat for {:.0} s): if it died, the other nodes deliver its users once their leases run out; start it again, or look at its host\n",
            node.node_id,
            node.heartbeat_age_ms as f64 / 1000.0
        ));
    }
    out
}
