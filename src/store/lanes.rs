//! Leases on users' delivery lanes (SPEC §11): one node at a time delivers a user, holding a
//! lease whose fence number grows with every claim; a write of a delivery outcome names the
//! lease it was made under and is refused once the lease has moved on, so a node that was
//! paused or cut off past its lease cannot overwrite its successor's work.
//!
//! On PostgreSQL the lanes are rows shared by every node (`postgres::lanes`). sled serves one
//! node, so its lanes live in memory: the same rules, for the same tests, with nobody to share.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{StoreError, now_ms};

/// A node's hold on one user's lane, until `until_ms` unless claimed again before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub user_id: String,
    pub owner: String,
    /// Grows with each claim of the lane: the newest lease has the highest.
    pub fence: u64,
    pub until_ms: u64,
}

#[derive(Debug, Clone)]
struct Lane {
    owner: Option<String>,
    until_ms: u64,
    fence: u64,
}

/// sled's lanes, in memory.
#[derive(Debug, Default)]
pub(super) struct MemoryLanes {
    lanes: Mutex<HashMap<String, Lane>>,
}

impl MemoryLanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        // Plain data, consistent between statements: a panic elsewhere leaves it usable.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn claim(&self, user_id: &str, owner: &str, lease_ms: u64) -> Option<Lease> {
        let now = now_ms();
        let mut lanes = self.lock();
        let lane = lanes.entry(user_id.to_owned()).or_insert(Lane {
            owner: None,
            until_ms: 0,
            fence: 0,
        });
        let free = lane.owner.as_deref().is_none_or(|o| o == owner) || lane.until_ms <= now;
        if !free {
            return None;
        }
        lane.owner = Some(owner.to_owned());
        lane.until_ms = now + lease_ms;
        lane.fence += 1;
        Some(Lease {
            user_id: user_id.to_owned(),
            owner: owner.to_owned(),
            fence: lane.fence,
            until_ms: lane.until_ms,
        })
    }

    pub(super) fn release(&self, lease: &Lease) {
        if let Some(lane) = self.lock().get_mut(&lease.user_id)
            && lane.fence == lease.fence
        {
            lane.owner = None;
            lane.until_ms = 0;
        }
    }

    /// Refuses a write under a lease that has expired or been claimed again.
    pub(super) fn check(&self, lease: Option<&Lease>) -> Result<(), StoreError> {
        let Some(lease) = lease else {
            return Ok(());
        };
        let lanes = self.lock();
        let held = lanes.get(&lease.user_id).is_some_and(|lane| {
            lane.fence == lease.fence
                && lane.owner.as_deref() == Some(&lease.owner)
                && lane.until_ms > now_ms()
        });
        if held { Ok(()) } else { Err(lease_lost(lease)) }
    }
}

pub(super) fn lease_lost(lease: &Lease) -> StoreError {
    StoreError::LeaseLost {
        user_id: lease.user_id.clone(),
        fence: lease.fence,
    }
}
