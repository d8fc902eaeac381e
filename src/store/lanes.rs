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
    /// Empty once handed back.
    owner: String,
    until_ms: u64,
    fence: u64,
    /// Left out of [`MemoryLanes::claimable`] before this (a backoff set at the hand-back).
    ready_at_ms: u64,
}

/// sled's lanes, in memory: only leased or backing-off lanes are kept (a lane handed back
/// ready is forgotten), and the fence comes from one counter, so a lane claimed again after
/// being forgotten still gets a higher fence than any lease it ever had.
#[derive(Debug, Default)]
pub(super) struct MemoryLanes {
    lanes: Mutex<(HashMap<String, Lane>, u64)>,
}

impl MemoryLanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Lane>, u64)> {
        // Plain data, consistent between statements: a panic elsewhere leaves it usable.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn claim(&self, user_id: &str, owner: &str, lease_ms: u64) -> Option<Lease> {
        let now = now_ms();
        let mut guard = self.lock();
        let (lanes, last_fence) = &mut *guard;
        if let Some(lane) = lanes.get(user_id)
            && !lane.owner.is_empty()
            && lane.owner != owner
            && lane.until_ms > now
        {
            return None;
        }
        *last_fence += 1;
        let lane = Lane {
            owner: owner.to_owned(),
            until_ms: now + lease_ms,
            fence: *last_fence,
            ready_at_ms: 0,
        };
        let lease = Lease {
            user_id: user_id.to_owned(),
            owner: owner.to_owned(),
            fence: lane.fence,
            until_ms: lane.until_ms,
        };
        lanes.insert(user_id.to_owned(), lane);
        Some(lease)
    }

    pub(super) fn release(&self, lease: &Lease, ready_in_ms: u64) {
        let (lanes, _) = &mut *self.lock();
        let Some(lane) = lanes
            .get_mut(&lease.user_id)
            .filter(|lane| lane.fence == lease.fence)
        else {
            return;
        };
        if ready_in_ms == 0 {
            lanes.remove(&lease.user_id);
        } else {
            lane.owner.clear();
            lane.until_ms = 0;
            lane.ready_at_ms = now_ms().saturating_add(ready_in_ms);
        }
    }

    /// The new end of a lease that still holds, pushed `lease_ms` from now.
    pub(super) fn renew(&self, lease: &Lease, lease_ms: u64) -> Option<u64> {
        let now = now_ms();
        let (lanes, _) = &mut *self.lock();
        let lane = lanes
            .get_mut(&lease.user_id)
            .filter(|lane| lane.fence == lease.fence && lane.until_ms > now)?;
        lane.until_ms = now + lease_ms;
        Some(lane.until_ms)
    }

    /// Whether `owner` may claim this user's lane now and other nodes' polls would offer it:
    /// not leased by another owner, not backing off.
    pub(super) fn claimable(&self, user_id: &str, owner: &str) -> bool {
        let now = now_ms();
        let (lanes, _) = &*self.lock();
        lanes.get(user_id).is_none_or(|lane| {
            lane.ready_at_ms <= now
                && (lane.owner.is_empty() || lane.owner == owner || lane.until_ms <= now)
        })
    }

    /// The users whose lanes `owner` holds now, in order.
    pub(super) fn held_by(&self, owner: &str) -> Vec<String> {
        let now = now_ms();
        let (lanes, _) = &*self.lock();
        let mut users: Vec<String> = lanes
            .iter()
            .filter(|(_, lane)| lane.owner == owner && lane.until_ms > now)
            .map(|(user, _)| user.clone())
            .collect();
        users.sort();
        users
    }

    /// Refuses a write under a lease that has expired or been claimed again.
    pub(super) fn check(&self, lease: Option<&Lease>) -> Result<(), StoreError> {
        let Some(lease) = lease else {
            return Ok(());
        };
        let (lanes, _) = &*self.lock();
        let held = lanes.get(&lease.user_id).is_some_and(|lane| {
            lane.fence == lease.fence && lane.owner == lease.owner && lane.until_ms > now_ms()
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
