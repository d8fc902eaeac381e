//! What the nodes sharing a store tell each other (SPEC §11): Webex's rate limit as one of them
//! met it, who is alive, and which node runs a chore that must run once. On PostgreSQL these are
//! rows every node reads (`postgres::cluster`); sled serves one node, so here they live in
//! memory with the same rules.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Entry, Lease, now_ms};

/// Webex's rate limit as the nodes have met it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedLimits {
    /// How many 429s the nodes have reported: a node that sees it grow learns its pace anew.
    pub rate_limited: u64,
    /// How long every node still pauses after the latest of them.
    pub pause_left_ms: u64,
    /// How long ago the latest of them was noted (`None`: never).
    pub limited_ms_ago: Option<u64>,
    /// The average share of the live nodes that keep one (attempts per second each: the pace
    /// each node's own answers from Webex support): every node paces at it, so that together
    /// they keep the sum of what Webex took from each, split evenly.
    pub share_per_s: Option<f64>,
    /// The node whose user probes Webex while it fails, and for how much longer.
    pub probe_owner: Option<String>,
    pub probe_left_ms: u64,
}

/// A claimed lane, with the head of its queue and the shared limits read in the same round trip.
#[derive(Debug, Clone)]
pub struct Claim {
    pub lease: Lease,
    pub head: Option<Entry>,
    pub limits: SharedLimits,
}

/// A claim of the lane of the user whose command is being accepted, asked for with the accept
/// ([`super::Store::accept`]) by a node about to deliver it at once: on PostgreSQL the claim is
/// sent in the accept's round trip and runs right after its commit, so the delivery starts
/// without a round trip of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub owner: String,
    pub lease_ms: u64,
}

impl SharedLimits {
    fn with_pace(self, cluster: &MemoryCluster) -> SharedLimits {
        let now = now_ms();
        let probe = cluster
            .lock()
            .probe
            .clone()
            .filter(|(_, until)| *until > now);
        SharedLimits {
            share_per_s: cluster.average_share(),
            probe_left_ms: probe.as_ref().map_or(0, |(_, until)| until - now),
            probe_owner: probe.map(|(owner, _)| owner),
            ..self
        }
    }
}

/// One node as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub version: String,
    pub started_ms: u64,
    /// Since its last heartbeat, by the store's clock.
    pub heartbeat_age_ms: u64,
    /// Left on SIGTERM (its leases handed back).
    pub stopped: bool,
    /// Users whose lanes it holds now.
    pub lanes_held: Vec<String>,
    /// Lanes whose lease it held ran out with pending work still on them: nobody has taken them
    /// over yet (a dead node's users, normally for less than one poll of the others).
    pub leases_overdue: u64,
}

#[derive(Debug, Default)]
struct State {
    /// The count of 429s, the end of the pause and when the latest was noted.
    limits: (u64, u64, Option<u64>),
    /// Each node's share, by node id (on sled: this node's alone).
    shares: HashMap<String, f64>,
    /// Who probes Webex, until when.
    probe: Option<(String, u64)>,
    nodes: HashMap<String, (String, u64, u64, bool)>,
    chores: HashMap<String, (String, u64)>,
}

/// sled's shared state, in memory.
#[derive(Debug, Default)]
pub(super) struct MemoryCluster {
    state: Mutex<State>,
}

impl MemoryCluster {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data, consistent between statements.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn note_rate_limited(&self, pause_ms: u64) -> SharedLimits {
        let now = now_ms();
        {
            let state = &mut self.lock().limits;
            state.0 += 1;
            state.1 = state.1.max(now + pause_ms);
            state.2 = Some(now);
        }
        self.shared_limits()
    }

    pub(super) fn shared_limits(&self) -> SharedLimits {
        let (seq, until, noted) = self.lock().limits;
        let now = now_ms();
        SharedLimits {
            rate_limited: seq,
            pause_left_ms: until.saturating_sub(now),
            limited_ms_ago: noted.map(|at| now.saturating_sub(at)),
            ..SharedLimits::default()
        }
        .with_pace(self)
    }

    pub(super) fn claim_probe(&self, owner: &str, for_ms: u64) -> bool {
        let now = now_ms();
        let probe = &mut self.lock().probe;
        if probe
            .as_ref()
            .is_some_and(|(holder, until)| holder != owner && *until > now)
        {
            return false;
        }
        *probe = Some((owner.to_owned(), now + for_ms));
        true
    }

    pub(super) fn end_probe(&self, owner: &str) {
        let probe = &mut self.lock().probe;
        if probe.as_ref().is_some_and(|(holder, _)| holder == owner) {
            *probe = None;
        }
    }

    pub(super) fn publish_share(&self, node_id: &str, share: Option<f64>) {
        let shares = &mut self.lock().shares;
        match share {
            Some(share) => shares.insert(node_id.to_owned(), share),
            None => shares.remove(node_id),
        };
    }

    fn average_share(&self) -> Option<f64> {
        let shares = &self.lock().shares;
        (!shares.is_empty()).then(|| shares.values().sum::<f64>() / shares.len() as f64)
    }

    pub(super) fn heartbeat(&self, node_id: &str, version: &str, started_ms: u64, stopped: bool) {
        self.lock().nodes.insert(
            node_id.to_owned(),
            (version.to_owned(), started_ms, now_ms(), stopped),
        );
    }

    pub(super) fn nodes(&self, held: impl Fn(&str) -> Vec<String>) -> Vec<NodeStatus> {
        let now = now_ms();
        let mut nodes: Vec<NodeStatus> = self
            .lock()
            .nodes
            .iter()
            .map(|(id, (version, started_ms, beat, stopped))| NodeStatus {
                node_id: id.clone(),
                version: version.clone(),
                started_ms: *started_ms,
                heartbeat_age_ms: now.saturating_sub(*beat),
                stopped: *stopped,
                lanes_held: held(id),
                leases_overdue: 0,
            })
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        nodes
    }

    pub(super) fn claim_chore(&self, name: &str, owner: &str, lease_ms: u64) -> bool {
        let now = now_ms();
        let mut state = self.lock();
        let chore = state
            .chores
            .entry(name.to_owned())
            .or_insert_with(|| (owner.to_owned(), 0));
        if chore.0 != owner && chore.1 > now {
            return false;
        }
        *chore = (owner.to_owned(), now + lease_ms);
        true
    }
}
