//! The embedded backend: sled in the store's directory, for one node and for `sandbox`. The
//! operations live beside their records (`outbox`, `users`, `audit`, `tokens`), all on this
//! handle; group commit runs on a flusher thread of its own (`commit`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::commit::FlushTicket;
use super::{StoreError, commit, outbox};

/// The on-disk layout version. Bumped whenever a tree's key or value encoding changes; a store
/// written by another version is refused at open rather than misread.
/// Version 2 added the index of dead outbox entries. Version 3 changes no encoding: opening an
/// older store rebuilds the dead and queue indexes from the entries, which indexes the dead
/// entries of a version 1 store and puts back in their queues the pending entries a version 2
/// store could lose from them (see [`outbox::rebuild_indexes`]).
pub const SCHEMA_VERSION: u32 = 3;

pub(super) const META_TREE: &str = "meta";
pub(super) const SCHEMA_KEY: &[u8] = b"schema_version";

/// The store handle; cheap to clone and shared by every task.
#[derive(Clone)]
pub struct SledStore {
    pub(super) db: sled::Db,
    /// What the database was opened with; it shares sled's record of a failed log write.
    config: sled::Config,
    path: PathBuf,
    commit: Arc<commit::GroupCommit>,
    /// Held across the two writes that make an entry pending and findable (enqueue, retry) and
    /// by the check before a queue key that looks stale is removed, so that check never catches
    /// an entry between its two writes. See the outbox module's header.
    pub(super) queueing: Arc<std::sync::Mutex<()>>,
    pub(super) counts: Arc<Counts>,
    pub(super) fresh: Arc<outbox::Fresh>,
    pub(super) lanes: Arc<super::lanes::MemoryLanes>,
    cluster: Arc<super::cluster::MemoryCluster>,
}

/// Record counts of the two trees that grow with traffic, for housekeeping's caps. sled's `len`
/// walks the whole tree: 2.8 s for a million outbox entries and a million audit records
/// (`examples/store_io`), every pruning round, and through the page cache, for a number that
/// only moves by what was written since. So a count is walked once, at the first round, and
/// kept up to date by the writes after it.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) outbox: Count,
    pub(super) audit: Count,
}

#[derive(Default)]
pub(super) struct Count {
    known: std::sync::atomic::AtomicBool,
    records: AtomicU64,
}

impl Count {
    pub(super) fn added(&self, n: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn removed(&self, n: u64) {
        let _ = self
            .records
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
    }

    /// The count, from a walk of `tree` the first time. Writes made during that walk may be
    /// counted twice or not at all: the caps it serves are approximate by that much.
    pub(super) fn of(&self, tree: &sled::Tree) -> u64 {
        if !self.known.load(Ordering::Acquire) {
            self.records.store(tree.len() as u64, Ordering::Relaxed);
            self.known.store(true, Ordering::Release);
        }
        self.records.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// How long opening waits for the store's file lock. A store closed in this process lets go of
/// the lock only when sled's I/O pool has finished the writes it had in hand, a few milliseconds
/// later, longer on a loaded machine; another process holding it is not waited for longer.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_when_unlocked(config: &sled::Config) -> sled::Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match config.open() {
            // sled reports the lock as `Other` with the OS error in the text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

impl SledStore {
    /// Open (or create) the store with the default cache size and check its schema version.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with_cache(path, crate::config::DEFAULT_CACHE_MIB)
    }

    /// Open (or create) the store with `cache_mib` of sled page cache (`store.cache_mib`).
    pub fn open_with_cache(path: &Path, cache_mib: u64) -> Result<SledStore, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_mib.saturating_mul(1024 * 1024));
        let db = open_when_unlocked(&config).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let meta = db.open_tree(META_TREE)?;
        match meta.get(SCHEMA_KEY)? {
            None => {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        what: "schema version",
                        reason: format!("{} bytes instead of 4", raw.len()),
                    })?;
                if found == 1 || found == 2 {
                    let requeued = outbox::rebuild_indexes(&db)?;
                    meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                    db.flush()?;
                    if requeued > 0 {
                        tracing::warn!(
                            requeued,
                            "pending outbox entries had lost their place in their user's queue (a \
                             defect of earlier versions) and were never delivered; they are queued \
                             again and are delivered now, or die if older than \
                             store.max_entry_age_hours (nothing to do)"
                        );
                    }
                } else if found != SCHEMA_VERSION {
                    return Err(StoreError::SchemaMismatch {
                        path: path.to_owned(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
        }
        let stale = outbox::reconcile_indexes(&db)?;
        if stale > 0 {
            tracing::warn!(
                stale,
                "the store held outbox index keys left by a write a crash interrupted; they were \
                 dropped and no entry was lost (nothing to do)"
            );
            db.flush()?;
        }
        let commit = Arc::new(commit::GroupCommit::start(db.clone())?);
        Ok(SledStore {
            db,
            config,
            path: path.to_owned(),
            commit,
            queueing: Arc::default(),
            counts: Arc::default(),
            fresh: Arc::default(),
            lanes: Arc::default(),
            cluster: Arc::default(),
        })
    }

    pub fn claim_lane(
        &self,
        user_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<Option<super::Lease>, StoreError> {
        Ok(self.lanes.claim(user_id, owner, lease_ms))
    }

    pub fn claim_head(
        &self,
        user_id: &str,
        owner: &str,
        lease_ms: u64,
    ) -> Result<Option<super::Claim>, StoreError> {
        match self.lanes.claim(user_id, owner, lease_ms) {
            Some(lease) => Ok(Some(super::Claim {
                lease,
                head: self.head_of(user_id)?,
                limits: self.cluster.shared_limits(),
            })),
            None => Ok(None),
        }
    }

    pub fn note_rate_limited(&self, pause_ms: u64) -> Result<super::SharedLimits, StoreError> {
        Ok(self.cluster.note_rate_limited(pause_ms))
    }

    pub fn shared_limits(&self) -> Result<super::SharedLimits, StoreError> {
        Ok(self.cluster.shared_limits())
    }

    pub fn claim_probe(&self, owner: &str, for_ms: u64) -> Result<bool, StoreError> {
        Ok(self.cluster.claim_probe(owner, for_ms))
    }

    pub fn end_probe(&self, owner: &str) -> Result<(), StoreError> {
        self.cluster.end_probe(owner);
        Ok(())
    }

    pub fn publish_share(&self, node_id: &str, share: Option<f64>) -> Result<(), StoreError> {
        self.cluster.publish_share(node_id, share);
        Ok(())
    }

    pub fn heartbeat(
        &self,
        node_id: &str,
        version: &str,
        started_ms: u64,
        stopped: bool,
    ) -> Result<(), StoreError> {
        self.cluster
            .heartbeat(node_id, version, started_ms, stopped);
        Ok(())
    }

    pub fn nodes(&self) -> Result<Vec<super::NodeStatus>, StoreError> {
        Ok(self.cluster.nodes(|node| self.lanes.held_by(node)))
    }

    pub fn claim_chore(&self, name: &str, owner: &str, lease_ms: u64) -> Result<bool, StoreError> {
        Ok(self.cluster.claim_chore(name, owner, lease_ms))
    }

    pub fn finish_try(
        &self,
        id: super::EntryId,
        state: super::EntryState,
        last_call: Option<&str>,
        lease: &super::Lease,
        user_map: Option<super::UserMapChange>,
    ) -> Result<(super::Entry, bool), StoreError> {
        let dead = matches!(state, super::EntryState::Dead { .. });
        let entry = self.finish(id, state, last_call, Some(lease))?;
        match user_map {
            Some(super::UserMapChange::Map {
                subscriber_id,
                template,
            }) => self.map_user(&lease.user_id, Some(&subscriber_id), Some(&template))?,
            Some(super::UserMapChange::Forget) => self.unmap_subscriber(&lease.user_id)?,
            None => {}
        }
        self.lanes.release(lease, 0);
        // A dead end holds the lane; otherwise whatever is queued next is pending (only a head
        // dies), so the key tells without a read of the entry.
        Ok((entry, !dead && self.has_queued(&lease.user_id)?))
    }

    pub fn release_lane(&self, lease: &super::Lease, ready_in_ms: u64) -> Result<bool, StoreError> {
        self.lanes.release(lease, ready_in_ms);
        Ok(self
            .head_of(&lease.user_id)?
            .is_some_and(|head| head.is_pending()))
    }

    pub fn renew_lane(
        &self,
        lease: &super::Lease,
        lease_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self.lanes.renew(lease, lease_ms))
    }

    pub fn claimable_users(
        &self,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<(String, super::Origin)>, StoreError> {
        let mut found = Vec::new();
        for user in self.users_with_queues()? {
            if found.len() >= limit {
                break;
            }
            if !self.lanes.claimable(&user, owner) {
                continue;
            }
            // A dead head holds the lane until the operator acts.
            if let Some(head) = self.head_of(&user)?.filter(super::Entry::is_pending) {
                found.push((user, head.new.origin));
            }
        }
        Ok(found)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the store can no longer be written, if it cannot. sled keeps the first error of a log
    /// write (a full disk, a file size limit, a failing volume) and refuses every later write and
    /// flush with it until the store is opened again; reads still work, so nothing else shows
    /// it. The running process does not recover: the operator frees the volume and restarts.
    pub fn write_failure(&self) -> Option<String> {
        self.config.global_error().err().map(|e| e.to_string())
    }

    /// Make every write made before this call durable. Concurrent callers share flushes (group
    /// commit, [`commit`]), so durability does not cost one fsync per caller.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commit.wait(self.commit.request()).await.map(drop)
    }

    /// Ask for every write made before this call to be made durable, without waiting: the
    /// flush runs while the caller does other work, then [`SledStore::flushed`] waits for it.
    pub fn start_flush(&self) -> FlushTicket {
        self.commit.request()
    }

    /// Wait until the writes a [`SledStore::start_flush`] ticket stands for are durable; returns how
    /// long the flush took from the request (at most: a later flush may have ended first).
    pub async fn flushed(&self, ticket: FlushTicket) -> Result<std::time::Duration, StoreError> {
        self.commit.wait(ticket).await
    }

    /// Blocking flush, for tests that shape a store on disk.
    #[cfg(test)]
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub(super) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// A new store in a temporary directory, removed when the directory is dropped.
    #[cfg(test)]
    pub(super) fn temporary() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_with_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .tree(META_TREE)
                .unwrap()
                .insert(SCHEMA_KEY, &99u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        match SledStore::open(dir.path()) {
            Err(StoreError::SchemaMismatch {
                found: 99,
                expected,
                ..
            }) => {
                assert_eq!(expected, SCHEMA_VERSION)
            }
            other => panic!("expected a schema mismatch, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_all_complete() {
        let (_dir, store) = SledStore::temporary();
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .tree("t")
                    .unwrap()
                    .insert(i.to_be_bytes(), &[])
                    .unwrap();
                store.flush().await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert!(store.commit.flushed() >= 64);
    }
}
