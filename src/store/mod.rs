//! The durable store: one API of domain operations (outbox with per-user queues, user map,
//! profiles, customers, audit, token, the last reconcile's counts) over two backends chosen by `[store] backend`: sled,
//! embedded, for one node and `sandbox`; PostgreSQL for several nodes (SPEC §11). No sled type
//! and no SQL leave this module.
//!
//! The API is async because PostgreSQL answers over the network; the sled operations behind it
//! never wait, so on sled each call completes at its first poll, on the caller's thread, as before
//! (its hot path keeps its group commit on the flusher thread and its entries in memory).

mod audit;
mod cluster;
mod commit;
pub mod copy;
mod lanes;
mod outbox;
mod population;
pub mod postgres;
mod sled_backend;
mod tokens;
mod users;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use audit::{AuditEvent, AuditKey, AuditQuery, AuditRecord};
pub use cluster::{Claim, ClaimRequest, NodeStatus, SharedLimits};
pub use lanes::Lease;
pub use outbox::{Call, Entry, EntryId, EntryState, Filter, NewEntry, Origin, Progress};
pub use population::ReconcileReport;
use sled_backend::SledStore;
pub use tokens::{TokenRecord, TokenState};
pub use users::{Customer, UserMapChange, UserRecord};

use crate::config::{StoreBackend, StoreConfig};
use crate::oci::UserProfile;
pub use postgres::Observer;
use postgres::PgStore;

/// A failure of the store. The message says what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store at {path}: {reason}; check that the directory exists, is writable by the flowthrough user, and that no other flowthrough process uses it"
    )]
    Open { path: PathBuf, reason: String },
    #[error(
        "the store at {path} has schema version {found}, this flowthrough understands {expected}; run the flowthrough release that wrote it, or move the directory aside to start empty"
    )]
    SchemaMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("store I/O error: {0}; check disk space and the health of the data volume")]
    Io(String),
    #[error(
        "a record in the store is corrupt ({what}): {reason}; keep a copy of the store directory for support and restore from backup"
    )]
    Corrupt { what: &'static str, reason: String },
    #[error(
        "outbox entry {0} does not exist; `flowthrough outbox list` shows the entries there are"
    )]
    NotFound(u64),
    /// PostgreSQL refused or could not do an operation; `kind` is the metrics label.
    #[error(
        "PostgreSQL could not {what}: {reason}; nothing that failed was acknowledged — check that the database is up, reachable and writable (`flowthrough doctor`); flowthrough carries on by itself when it is back"
    )]
    Database {
        kind: &'static str,
        what: &'static str,
        reason: String,
    },
    #[error(
        "the PostgreSQL schema is at version {found}, this flowthrough knows versions up to {known}; run the flowthrough release that migrated it (or a newer one)"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error(
        "the PostgreSQL schema is at version {found} and lacks {pending}; run `flowthrough store migrate --config <file>` (or start `serve`, which migrates)"
    )]
    SchemaBehind { found: i32, pending: String },
    /// A delivery outcome written under a lease that has expired or that another node has
    /// claimed since: the write is refused, the successor's work stands.
    #[error(
        "the delivery lease on user {user_id} (fence {fence}) has expired or another node took it over; this node's late outcome is discarded and the lease holder delivers the user"
    )]
    LeaseLost { user_id: String, fence: u64 },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// The store handle; cheap to clone and shared by every task.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Sled(SledStore),
    Postgres(PgStore),
}

/// What the adapter remembers from one command (written by [`Store::accept`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remembered {
    /// The last profile seen for its user.
    pub profile: Option<UserProfile>,
    /// A user and the template it was provisioned with.
    pub template: Option<(String, String)>,
    /// A customer recorded from a group or service-provider add.
    pub customer: Option<Customer>,
    /// The command's audit record, written with the command (SPEC §11: the acknowledgement is
    /// the command's row and its audit record, committed together). For a command with an
    /// outbox entry it says `accepted`, with the entry's id filled in by the store, until
    /// [`Store::complete_audit`] replaces it with the answer.
    pub audit: Option<AuditRecord>,
}

/// What [`Store::accept`] stored: the command's outbox entry, if it has one, and where its
/// audit record is, if it came with one; and the claim of the entry's lane, if one was asked
/// for and the backend made it with the accept (PostgreSQL; a lane another node holds, or a
/// claim that failed, gives none, and delivery claims the lane itself).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub entry: Option<EntryId>,
    pub audit: Option<AuditKey>,
    pub claim: Option<Claim>,
}

/// A request's place in the store's durability: on sled, its place in the group commit; on
/// PostgreSQL nothing, since every write there has committed before it returned.
#[derive(Debug)]
pub struct FlushTicket(Option<commit::FlushTicket>);

/// The operations every backend implements with the same meaning; each becomes an async method
/// of [`Store`] that hands the call to the backend in use.
macro_rules! domain_operations {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, StoreError> {
                    match &self.backend {
                        Backend::Sled(s) => s.$name($($arg),*),
                        Backend::Postgres(p) => p.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

domain_operations! {
    /// Store new entries, pending, in the given order. Durable after [`Store::flush`] on sled,
    /// on return on PostgreSQL (committed with `synchronous_commit = on`).
    fn enqueue(&self, entries: Vec<NewEntry>, now_ms: u64) -> Vec<EntryId>;
    /// One entry by id.
    fn entry(&self, id: EntryId) -> Option<Entry>;
    /// Where an entry is in its life, without its body.
    fn progress(&self, id: EntryId) -> Option<Progress>;
    /// The head of a user's queue: its oldest pending entry, the only one that may be
    /// delivered now, or the dead entry that holds its lane. A dead entry stays at the head of
    /// its queue (SPEC §11) until the operator retries it (pending again where it stands) or
    /// drops it (the next entry goes); entries behind it wait, and other users never do.
    fn head_of(&self, user_id: &str) -> Option<Entry>;
    /// Whether a user's queue holds anything: a pending entry, or a dead one holding its lane.
    fn has_queued(&self, user_id: &str) -> bool;
    /// Users with a pending head whose lane `owner` may claim now (not leased by another node,
    /// not held by a dead entry, and on PostgreSQL not backing off), at most `limit`, each
    /// once, with the origin of its head. Used at start-up to recover, and by the poll for work other nodes accepted or left.
    fn claimable_users(&self, owner: &str, limit: usize) -> Vec<(String, Origin)>;
    /// Record an attempt about to be made, so a crash after sending is known to maybe have
    /// reached Webex.
    /// `lease`, when given, must still be held ([`StoreError::LeaseLost`] otherwise): the
    /// check and the write are one statement.
    fn record_attempt(&self, id: EntryId, tracking_id: &str, lease: Option<&Lease>) -> Entry;
    /// Note a failed attempt that will be retried (under `lease`, as for `record_attempt`).
    fn record_failure(&self, id: EntryId, error: &str, lease: Option<&Lease>) -> Entry;
    /// The final subscriber status found by the follow-up of a delivered entry.
    fn set_webex_status(&self, id: EntryId, status: &str) -> Entry;
    /// The entry reached its end: delivered, it leaves its user's queue; dead, it stays at the
    /// head and holds the lane ([`Store::head_of`]). `last_call` is the TrackingID of the call
    /// that ended it, counted as an attempt in the same write.
    /// Under `lease`, as for `record_attempt`.
    fn finish(&self, id: EntryId, state: EntryState, last_call: Option<&str>, lease: Option<&Lease>) -> Entry;
    /// The end of a delivery try, in one write where there were three: [`Store::finish`] of
    /// its entry under `lease`, the change the end makes to the user's record, and the lane
    /// handed back at once ([`Store::release_lane`]). Says whether the user has work that can
    /// be delivered now (never after a dead end, which holds the lane).
    fn finish_try(&self, id: EntryId, state: EntryState, last_call: Option<&str>, lease: &Lease, user_map: Option<UserMapChange>) -> (Entry, bool);
    /// Claim the delivery lane of a user for `lease_ms`, with a fence higher than any before;
    /// `None` while another owner's lease runs. A lane its owner claims again is renewed.
    fn claim_lane(&self, user_id: &str, owner: &str, lease_ms: u64) -> Option<Lease>;
    /// [`Store::claim_lane`], with the head of the user's queue and the shared limits read in
    /// the same round trip.
    fn claim_head(&self, user_id: &str, owner: &str, lease_ms: u64) -> Option<Claim>;
    /// Hand a lane back at once, if this lease still holds it (another node may claim it now;
    /// other nodes' polls leave it for `ready_in_ms`, a backoff); says whether the head of the
    /// user's queue is pending (not held by a dead entry).
    fn release_lane(&self, lease: &Lease, ready_in_ms: u64) -> bool;
    /// Push a lease that still holds `lease_ms` further; its new end, or `None` once it has
    /// run out or been claimed again.
    fn renew_lane(&self, lease: &Lease, lease_ms: u64) -> Option<u64>;
    /// Tell every node that Webex answered 429: all pause at least `pause_ms`; returns the
    /// limits as they are now.
    fn note_rate_limited(&self, pause_ms: u64) -> SharedLimits;
    /// The rate limit as the nodes have met it.
    fn shared_limits(&self) -> SharedLimits;
    /// Let this owner's user be the one that probes Webex while it fails, for `for_ms` (renewed
    /// by each probe); false while another node's probe runs.
    fn claim_probe(&self, owner: &str, for_ms: u64) -> bool;
    /// The probe got through (or gave up): every node's waiting users go.
    fn end_probe(&self, owner: &str) -> ();
    /// This node's share of the rate limit: the pace its own answers from Webex support
    /// (`None`: it keeps none), averaged with the other live nodes' into
    /// [`SharedLimits::share_per_s`].
    fn publish_share(&self, node_id: &str, share: Option<f64>) -> ();
    /// This node is alive (or, `stopped`, has left on SIGTERM), at the store's clock.
    fn heartbeat(&self, node_id: &str, version: &str, started_ms: u64, stopped: bool) -> ();
    /// Every node that has written a heartbeat, with the lanes it holds, by node id.
    fn nodes(&self) -> Vec<NodeStatus>;
    /// Run the chore `name` for `lease_ms` unless another owner's lease on it runs: true when
    /// this owner holds it now (claimed, or renewed).
    fn claim_chore(&self, name: &str, owner: &str, lease_ms: u64) -> bool;
    /// Put a dead entry back in its user's queue, pending, its age counted from now (the
    /// operator's retry starts a new wait under `store.max_entry_age_hours`). False if it was
    /// not dead.
    fn retry(&self, id: EntryId) -> bool;
    /// Remove an entry for good (operator's `outbox drop`).
    fn drop_entry(&self, id: EntryId) -> Option<Entry>;
    /// Entries matching `filter`, oldest first, at most `limit`.
    fn list(&self, filter: Filter, limit: usize) -> Vec<Entry>;
    /// How many entries are dead (waiting for the operator).
    fn dead_count(&self) -> usize;
    /// How many entries are pending, and the creation time of the oldest.
    fn pending_summary(&self) -> (u64, Option<u64>);
    /// Delete finished entries created before `cutoff_ms`, then the oldest delivered entries
    /// beyond `max_delivered`. Dead entries go only with age, and never one that holds its
    /// lane (its user's later commands would go without anyone having acted).
    fn prune_finished(&self, cutoff_ms: u64, max_delivered: u64) -> u64;
    fn user(&self, user_id: &str) -> Option<UserRecord>;
    /// Every user the adapter knows, in userId order (byte order, as on sled).
    fn users(&self) -> Vec<(String, UserRecord)>;
    /// Remember the subscriber id and/or template of a user; `None` keeps what is stored.
    fn map_user(&self, user_id: &str, subscriber_id: Option<&str>, template: Option<&str>) -> ();
    /// Forget the subscriber id (after a remove); template and profile stay.
    fn unmap_subscriber(&self, user_id: &str) -> ();
    fn profile(&self, user_id: &str) -> Option<UserProfile>;
    fn save_profile(&self, profile: &UserProfile) -> ();
    fn record_customer(&self, customer: &Customer) -> ();
    fn customers(&self) -> Vec<Customer>;
    fn append_audit(&self, record: &AuditRecord) -> ();
    /// Replace the audit record an accept wrote ([`Remembered::audit`]) with what became of
    /// the command. Not durable on return, as the accept's record is: a crash may leave the
    /// accepted one, and the outbox entry it names says the rest.
    fn complete_audit(&self, key: AuditKey, record: &AuditRecord) -> ();
    /// Newest records first.
    fn audit(&self, query: &AuditQuery) -> Vec<AuditRecord>;
    /// Drop records older than `cutoff_ms`, then the oldest beyond `max_records`.
    fn prune_audit(&self, cutoff_ms: u64, max_records: u64) -> u64;
    /// The stored token record, if one was ever written.
    fn token(&self) -> Option<TokenRecord>;
    /// Replace the token record, durably before returning: a rotated refresh token that is lost
    /// would lock the deployment out.
    fn put_token(&self, record: &TokenRecord) -> ();
    /// Keep the counts of a `flowthrough reconcile` run in place of the last one.
    fn put_reconcile_report(&self, report: &ReconcileReport) -> ();
    /// The counts of the last reconcile run, if one was ever kept.
    fn reconcile_report(&self) -> Option<ReconcileReport>;
}

impl Store {
    /// Open (or create) a sled store with the default cache size.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        SledStore::open(path).map(Store::from)
    }

    /// Open (or create) a sled store with `cache_mib` of page cache.
    pub fn open_with_cache(path: &Path, cache_mib: u64) -> Result<Store, StoreError> {
        SledStore::open_with_cache(path, cache_mib).map(Store::from)
    }

    /// Open the store the config names: sled at `store.path`, or PostgreSQL (connecting, and
    /// bringing its schema up to date under a lock).
    pub async fn open_configured(config: &StoreConfig) -> Result<Store, StoreError> {
        match config.backend {
            StoreBackend::Sled => Store::open_with_cache(&config.path, config.cache_mib),
            StoreBackend::Postgres => Ok(Store {
                backend: Backend::Postgres(PgStore::open(postgres_settings(config)?).await?),
            }),
        }
    }

    /// Open the store the config names for an operator's tool, changing no schema: sled as
    /// [`Store::open_configured`] does; PostgreSQL connected and its schema version checked
    /// (`flowthrough store migrate` brings it up to date).
    pub async fn connect_configured(config: &StoreConfig) -> Result<Store, StoreError> {
        match config.backend {
            StoreBackend::Sled => Store::open_with_cache(&config.path, config.cache_mib),
            StoreBackend::Postgres => {
                let store = PgStore::connect(postgres_settings(config)?)?;
                let report = store.schema().await?;
                postgres::check_schema(&report)?;
                if !report.pending.is_empty() {
                    return Err(StoreError::SchemaBehind {
                        found: report.found,
                        pending: report.pending.join(", "),
                    });
                }
                Ok(Store {
                    backend: Backend::Postgres(store),
                })
            }
        }
    }

    /// `sled` or `postgres`, for messages and metrics.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The directory of a sled store, whose volume's free space is watched; none on PostgreSQL.
    pub fn volume_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sled(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// [`Store::enqueue`], telling `announce` each entry's id: on sled before delivery can find
    /// the entry; on PostgreSQL once it has committed, before this call returns (delivery on
    /// this node learns of the user only from the caller after that).
    pub async fn enqueue_announced(
        &self,
        entries: Vec<NewEntry>,
        now_ms: u64,
        mut announce: impl FnMut(EntryId),
    ) -> Result<Vec<EntryId>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.enqueue_announced(entries, now_ms, announce),
            Backend::Postgres(p) => {
                let ids = p.enqueue(entries, now_ms).await?;
                ids.iter().copied().for_each(&mut announce);
                Ok(ids)
            }
        }
    }

    /// Write what one command leaves behind: the records it changes, its outbox entry and its
    /// audit record, the entry's id told to `announce` as [`Store::enqueue_announced`] does.
    /// On PostgreSQL one statement, committed with `synchronous_commit = on`: one round trip
    /// to the acknowledgement, which also brings the entry's lane claimed when `claim` asks
    /// for it ([`ClaimRequest`]). On sled durable after the next flush, as every write.
    pub async fn accept(
        &self,
        remembered: Remembered,
        entry: Option<NewEntry>,
        now_ms: u64,
        claim: Option<&ClaimRequest>,
        mut announce: impl FnMut(EntryId),
    ) -> Result<Accepted, StoreError> {
        match &self.backend {
            Backend::Sled(s) => {
                if let Some(profile) = &remembered.profile {
                    s.save_profile(profile)?;
                }
                if let Some((user, template)) = &remembered.template {
                    s.map_user(user, None, Some(template))?;
                }
                if let Some(customer) = &remembered.customer {
                    s.record_customer(customer)?;
                }
                let entry = match entry {
                    Some(entry) => s.enqueue_announced(vec![entry], now_ms, announce)?.pop(),
                    None => None,
                };
                let audit = match remembered.audit {
                    Some(mut record) => {
                        if let AuditEvent::Command { outbox_id, .. } = &mut record.event {
                            *outbox_id = entry.or(*outbox_id);
                        }
                        Some(s.append_audit_keyed(&record)?)
                    }
                    None => None,
                };
                // A claim here is a lookup in memory: delivery makes it when it starts.
                Ok(Accepted {
                    entry,
                    audit,
                    claim: None,
                })
            }
            Backend::Postgres(p) => {
                let accepted = p.accept(remembered, entry, now_ms, claim).await?;
                accepted.entry.into_iter().for_each(&mut announce);
                Ok(accepted)
            }
        }
    }

    /// Take the token record for a refresh: on PostgreSQL its row locked until
    /// [`Store::commit_token`], so that nodes refresh one at a time and each reads what the one
    /// before it committed (a rotated refresh token included); on sled (one node) the record
    /// as stored.
    pub async fn lock_token(&self) -> Result<TokenLock, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(TokenLock(TokenLockOf::Sled(s.token()?))),
            Backend::Postgres(p) => Ok(TokenLock(TokenLockOf::Postgres(Box::new(
                p.lock_token().await?,
            )))),
        }
    }

    /// End a [`Store::lock_token`], durably writing `record` first if there is one.
    pub async fn commit_token(
        &self,
        lock: TokenLock,
        record: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        match (&self.backend, lock.0) {
            (Backend::Postgres(p), TokenLockOf::Postgres(lock)) => {
                p.commit_token(*lock, record).await
            }
            (Backend::Sled(s), _) => record.map_or(Ok(()), |r| s.put_token(r)),
            (Backend::Postgres(_), TokenLockOf::Sled(_)) => Err(StoreError::Io(
                "a token lock taken on another store was handed to this one (a bug: report it)"
                    .to_owned(),
            )),
        }
    }

    /// Why the store cannot be written now, if it cannot: sled's sticky log-write error (for
    /// good, until a restart), or PostgreSQL down, read-only or full (until it is back).
    pub fn write_failure(&self) -> Option<String> {
        match &self.backend {
            Backend::Sled(s) => s.write_failure(),
            Backend::Postgres(p) => p.write_failure(),
        }
    }

    /// What the operator does about a [`Store::write_failure`].
    pub fn write_failure_remedy(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => {
                "free space on or repair the data volume of store.path, then restart flowthrough"
            }
            Backend::Postgres(_) => {
                "bring PostgreSQL back (reachable, writable, with free space); flowthrough resumes by itself"
            }
        }
    }

    /// Make every write made before this call durable (sled: shared flushes; PostgreSQL:
    /// nothing left to do).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flushed(self.start_flush()).await.map(drop)
    }

    /// Ask for every write made before this call to be made durable, without waiting.
    pub fn start_flush(&self) -> FlushTicket {
        match &self.backend {
            Backend::Sled(s) => FlushTicket(Some(s.start_flush())),
            Backend::Postgres(_) => FlushTicket(None),
        }
    }

    /// Wait until the writes a [`Store::start_flush`] ticket stands for are durable; returns how
    /// long the flush took from the request.
    pub async fn flushed(&self, ticket: FlushTicket) -> Result<std::time::Duration, StoreError> {
        match (&self.backend, ticket.0) {
            (Backend::Sled(s), Some(ticket)) => s.flushed(ticket).await,
            _ => Ok(std::time::Duration::ZERO),
        }
    }

    /// Who hears of PostgreSQL's commits and errors (the metrics); sled has neither to report.
    pub fn observe(&self, observer: Observer) {
        if let Backend::Postgres(p) = &self.backend {
            p.observe(observer);
        }
    }

    /// The PostgreSQL backend's own figures for the metrics, if that is the backend.
    pub fn database_stats(&self) -> Option<postgres::DatabaseStats> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Postgres(p) => Some(p.stats()),
        }
    }
}

/// The token record held for a refresh ([`Store::lock_token`]).
#[derive(Debug)]
pub struct TokenLock(TokenLockOf);

#[derive(Debug)]
enum TokenLockOf {
    Sled(Option<TokenRecord>),
    /// Boxed: a pooled connection and a record, moved about only while one refresh runs.
    Postgres(Box<postgres::TokenLock>),
}

impl TokenLock {
    /// The record as stored when the lock was taken.
    pub fn record(&self) -> Option<&TokenRecord> {
        match &self.0 {
            TokenLockOf::Sled(record) => record.as_ref(),
            TokenLockOf::Postgres(lock) => lock.record(),
        }
    }
}

/// `[store.postgres]`, which the config's validation requires with `backend = "postgres"`.
pub fn postgres_settings(
    config: &StoreConfig,
) -> Result<&crate::config::PostgresConfig, StoreError> {
    config.postgres.as_ref().ok_or_else(|| {
        StoreError::Io(
            "store.backend is \"postgres\" but there is no [store.postgres] section; add one (README, \"Running on PostgreSQL\")"
                .to_owned(),
        )
    })
}

impl From<PgStore> for Store {
    fn from(store: PgStore) -> Store {
        Store {
            backend: Backend::Postgres(store),
        }
    }
}

impl From<SledStore> for Store {
    fn from(store: SledStore) -> Store {
        Store {
            backend: Backend::Sled(store),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Io(format!("cannot encode a record: {e}")))
}

fn decode<T: DeserializeOwned>(raw: &[u8], what: &'static str) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        what,
        reason: e.to_string(),
    })
}

/// Space on the volume that holds a store, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSpace {
    /// What flowthrough (not root) can still write.
    pub available: u64,
    pub total: u64,
}

/// Space on the volume of the store at `path` (which may be open in another process). When it
/// runs out, every command is refused ([`Store::write_failure`]); this is the early warning.
pub fn volume_space(path: &Path) -> Result<VolumeSpace, StoreError> {
    let stats = fs2::statvfs(path).map_err(|e| {
        StoreError::Io(format!(
            "cannot read the free space of {}: {e}",
            path.display()
        ))
    })?;
    Ok(VolumeSpace {
        available: stats.available_space(),
        total: stats.total_space(),
    })
}

/// Milliseconds since the Unix epoch, the time unit of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_volume_space_of_a_store_is_read_and_a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let space = volume_space(dir.path()).unwrap();
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
        let missing = dir.path().join("not-there");
        let err = volume_space(&missing).unwrap_err().to_string();
        assert!(
            err.contains("not-there") && err.contains("free space"),
            "{err}"
        );
    }
}
