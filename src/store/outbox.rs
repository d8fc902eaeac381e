//! The outbox: every Webex call the AS asked for, written before Webex is called, kept in
//! per-user arrival order until it is delivered or dead.
//!
//! Layout: `outbox` maps the entry id (u64, big-endian, monotonic) to the entry; `user_queue` holds
//! one key `userId 0x00 id` per entry in its user's queue — every *pending* entry, and a dead
//! entry that holds its user's lane — so the head of a user's queue is the first key under its
//! prefix and per-user order is the key order; `dead` holds the id of every dead entry, so the
//! operator's views and the metrics never scan the delivered history.
//!
//! A dead entry stays in its queue (SPEC §11: it holds its lane until the operator acts): the
//! user's later commands wait behind it, since an update delivered after its add failed, or a
//! delete after its add was never made, would not be the user the AS meant. `outbox retry` makes
//! it pending where it stands; `outbox drop` takes it out and the next entry goes. Entries that
//! died under releases before this rule left their queues and hold nothing.
//!
//! The trees are written key by key, not in sled transactions: a multi-tree transaction seals and
//! writes sled's log buffer twice (two `pwrite`s and two `sync_file_range`s per request under
//! load, most of flowthrough's store cost). Atomicity comes from order instead. sled recovers a
//! prefix of its log, so of two writes made one after the other, the second never survives
//! without the first. Every change writes the index key that makes an entry *findable* before the
//! entry, and removes it after: a crash can leave an index key whose entry is missing or in
//! another state, never an entry its index lacks. [`reconcile_indexes`] drops those stale keys
//! when the store opens, and every reader checks the entry's state anyway.
//!
//! At run time a key whose entry is missing or not pending is usually a change still in progress,
//! not one a crash left: an enqueue or a retry between its two writes. Those two writes are made
//! under the store's `queueing` lock, and a reader removes a key only after checking the entry
//! again under it. (Schema 2 removed such keys on sight; the entry stayed pending, unqueued and
//! never delivered. The soak found it; opening a schema 2 store re-queues those entries.)

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Lease, SledStore, StoreError, decode, encode};

pub(super) const OUTBOX: &str = "outbox";
const USER_QUEUE: &str = "user_queue";
const DEAD: &str = "dead";

/// The id of an outbox entry; ids grow in arrival order.
pub type EntryId = u64;

/// What Webex is asked to do. The body is the mapped JSON, opaque to the store: kept as the
/// text it was written as, so reading an entry back does not build a JSON tree that delivery
/// would only serialize again.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Call {
    Provision { body: Box<RawValue> },
    Update { body: Box<RawValue> },
    Remove,
}

impl PartialEq for Call {
    fn eq(&self, other: &Call) -> bool {
        match (self, other) {
            (Call::Provision { body: a }, Call::Provision { body: b })
            | (Call::Update { body: a }, Call::Update { body: b }) => a.get() == b.get(),
            (Call::Remove, Call::Remove) => true,
            _ => false,
        }
    }
}

/// By hand, because serde's internally tagged enums buffer their fields first, and a raw body
/// cannot be buffered: it must come straight from the JSON text. Same format as the derive.
impl<'de> Deserialize<'de> for Call {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Kind {
            Provision,
            Update,
            Remove,
        }
        #[derive(Deserialize)]
        struct Fields {
            kind: Kind,
            body: Option<Box<RawValue>>,
        }
        let fields = Fields::deserialize(deserializer)?;
        match (fields.kind, fields.body) {
            (Kind::Provision, Some(body)) => Ok(Call::Provision { body }),
            (Kind::Update, Some(body)) => Ok(Call::Update { body }),
            (Kind::Provision | Kind::Update, None) => Err(serde::de::Error::missing_field("body")),
            (Kind::Remove, _) => Ok(Call::Remove),
        }
    }
}

impl Call {
    pub fn provision(body: &impl Serialize) -> Result<Call, StoreError> {
        Ok(Call::Provision { body: raw(body)? })
    }

    pub fn update(body: &impl Serialize) -> Result<Call, StoreError> {
        Ok(Call::Update { body: raw(body)? })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Call::Provision { .. } => "provision",
            Call::Update { .. } => "update",
            Call::Remove => "remove",
        }
    }
}

fn raw(body: &impl Serialize) -> Result<Box<RawValue>, StoreError> {
    serde_json::value::to_raw_value(body)
        .map_err(|e| StoreError::Io(format!("cannot encode a Webex request body: {e}")))
}

/// An entry to enqueue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEntry {
    pub user_id: String,
    pub template: String,
    pub command: String,
    pub call: Call,
    /// Who asked: the client certificate subject and serial, for the audit.
    pub client: String,
    /// Who the work is for: delivery takes live work before bulk work. Not written for live
    /// entries, so theirs stay byte for byte what earlier versions wrote (and read back).
    #[serde(default, skip_serializing_if = "Origin::is_live")]
    pub origin: Origin,
}

/// Where an entry comes from. Delivery prefers [`Origin::Live`] users, so a command the AS is
/// waiting for never queues behind an import or a reconcile repair. Every backend stores it with
/// the entry; entries written before it existed read as live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A command of the Application Server.
    #[default]
    Live,
    /// `flowthrough import` or `flowthrough reconcile --repair`.
    Bulk,
}

impl Origin {
    pub fn is_live(&self) -> bool {
        *self == Origin::Live
    }

    /// The name stored for it: serde's, and PostgreSQL's `outbox.origin`.
    pub(super) fn name(self) -> &'static str {
        match self {
            Origin::Live => "live",
            Origin::Bulk => "bulk",
        }
    }

    pub(super) fn from_name(name: &str) -> Result<Origin, StoreError> {
        match name {
            "live" => Ok(Origin::Live),
            "bulk" => Ok(Origin::Bulk),
            other => Err(StoreError::Corrupt {
                what: "outbox entry origin",
                reason: format!("unknown origin {other:?}"),
            }),
        }
    }
}

/// Where an entry is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum EntryState {
    Pending,
    Delivered {
        at_ms: u64,
        subscriber_id: Option<String>,
        /// The subscriber status once the follow-up settled (`provisioned`, `error`, …).
        webex_status: Option<String>,
    },
    Dead {
        at_ms: u64,
        reason: String,
    },
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredEntry")]
pub struct Entry {
    pub id: EntryId,
    pub created_ms: u64,
    #[serde(flatten)]
    pub new: NewEntry,
    pub state: EntryState,
    /// Delivery attempts so far. Non-zero means a request may have reached Webex, so a provision
    /// must look the user up before it is sent again.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// The TrackingID of the last attempt.
    pub tracking_id: Option<String>,
}

/// How an entry is read: the fields of [`Entry`] with [`NewEntry`]'s inline, as
/// `#[serde(flatten)]` writes them. Reading through `flatten` would buffer every field first
/// (the body too, which a raw value cannot be), so it is spelled out once here.
#[derive(Deserialize)]
struct StoredEntry {
    id: EntryId,
    created_ms: u64,
    user_id: String,
    template: String,
    command: String,
    call: Call,
    client: String,
    #[serde(default)]
    origin: Origin,
    state: EntryState,
    attempts: u32,
    last_error: Option<String>,
    tracking_id: Option<String>,
}

impl From<StoredEntry> for Entry {
    fn from(s: StoredEntry) -> Entry {
        Entry {
            id: s.id,
            created_ms: s.created_ms,
            new: NewEntry {
                user_id: s.user_id,
                template: s.template,
                command: s.command,
                call: s.call,
                client: s.client,
                origin: s.origin,
            },
            state: s.state,
            attempts: s.attempts,
            last_error: s.last_error,
            tracking_id: s.tracking_id,
        }
    }
}

/// The part of an entry that says how it ended ([`Store::progress`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Progress {
    pub state: EntryState,
    pub tracking_id: Option<String>,
}

impl Entry {
    pub fn is_pending(&self) -> bool {
        matches!(self.state, EntryState::Pending)
    }

    pub fn is_dead(&self) -> bool {
        matches!(self.state, EntryState::Dead { .. })
    }

    /// Pending or dead: what a queue key may stand for (a delivered entry has left its queue).
    fn may_be_queued(&self) -> bool {
        !matches!(self.state, EntryState::Delivered { .. })
    }
}

/// Which entries `list` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    /// Pending and dead: what is still on its way or waits for the operator.
    Active,
    Pending,
    Dead,
    Delivered,
}

impl Filter {
    fn matches(self, entry: &Entry) -> bool {
        match self {
            Filter::All => true,
            Filter::Active => !matches!(entry.state, EntryState::Delivered { .. }),
            Filter::Pending => entry.is_pending(),
            Filter::Dead => matches!(entry.state, EntryState::Dead { .. }),
            Filter::Delivered => matches!(entry.state, EntryState::Delivered { .. }),
        }
    }
}

fn queue_key(user_id: &str, id: EntryId) -> Vec<u8> {
    let mut key = Vec::with_capacity(user_id.len() + 9);
    key.extend_from_slice(user_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn queue_prefix(user_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(user_id.len() + 1);
    key.extend_from_slice(user_id.as_bytes());
    key.push(0);
    key
}

fn id_from(raw: &[u8]) -> Result<EntryId, StoreError> {
    <[u8; 8]>::try_from(raw)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            what: "outbox key",
            reason: format!("{} bytes instead of 8", raw.len()),
        })
}

/// Entries exactly as [`Store::enqueue`] wrote them, with their stored bytes, until anything
/// changes them. The delivery engine reads a new entry moments after the handler wrote it
/// ([`Store::head_of`]) and then rewrites it once ([`Store::finish`]); without this, each of the
/// two read the entry back from sled and decoded its JSON: a tenth of the store's CPU per request
/// in `examples/store_io` (bench/RESULTS.md, ninth sitting).
///
/// Sound because every change of an entry goes through `update_entry` or `drop_entry`, and both
/// take the entry out of here before they write; pruning removes only ended entries, which a
/// change has taken out already. So an entry found here is the stored one. The cap bounds the
/// memory while a backlog waits (an outage): entries past it are read from the store as before.
#[derive(Default)]
pub(super) struct Fresh {
    entries: std::sync::Mutex<std::collections::HashMap<EntryId, (Entry, sled::IVec)>>,
}

/// At full load a few dozen entries are between enqueue and delivery; 512 of about 2.5 KiB each
/// (the entry and its bytes) bound this at a little over 1 MiB.
const FRESH_MAX: usize = 512;

impl Fresh {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<EntryId, (Entry, sled::IVec)>> {
        // Plain data, consistent between statements: a panic elsewhere leaves nothing half done.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, entry: &Entry, raw: &sled::IVec) {
        let mut entries = self.lock();
        if entries.len() < FRESH_MAX {
            entries.insert(entry.id, (entry.clone(), raw.clone()));
        }
    }

    fn get(&self, id: EntryId) -> Option<Entry> {
        self.lock().get(&id).map(|(entry, _)| entry.clone())
    }

    fn take(&self, id: EntryId) -> Option<(Entry, sled::IVec)> {
        self.lock().remove(&id)
    }
}

impl SledStore {
    /// Store new entries, pending, in the given order. Not durable until [`Store::flush`].
    pub fn enqueue(&self, entries: Vec<NewEntry>, now_ms: u64) -> Result<Vec<EntryId>, StoreError> {
        self.enqueue_announced(entries, now_ms, |_| {})
    }

    /// [`Store::enqueue`], telling `announce` each entry's id before delivery can find the
    /// entry, so a watch set there cannot miss its end and needs no read of the store.
    pub fn enqueue_announced(
        &self,
        entries: Vec<NewEntry>,
        now_ms: u64,
        mut announce: impl FnMut(EntryId),
    ) -> Result<Vec<EntryId>, StoreError> {
        let outbox = self.tree(OUTBOX)?;
        let queue = self.tree(USER_QUEUE)?;
        let mut ids = Vec::with_capacity(entries.len());
        let _queueing = self.queueing();
        for new in entries {
            let entry = Entry {
                id: self.db.generate_id()?,
                created_ms: now_ms,
                new,
                state: EntryState::Pending,
                attempts: 0,
                last_error: None,
                tracking_id: None,
            };
            let value = sled::IVec::from(encode(&entry)?);
            announce(entry.id);
            // Index first: see the module header. A document's entries are not stored all or
            // nothing; the AS is answered after the flush, so a crash before it makes the AS
            // send the document again, and a provision sent twice is answered 409 and settled
            // by lookup, as after any crash between delivery and answer.
            queue.insert(queue_key(&entry.new.user_id, entry.id), &[])?;
            outbox.insert(entry.id.to_be_bytes(), value.clone())?;
            self.fresh.remember(&entry, &value);
            self.counts.outbox.added(1);
            ids.push(entry.id);
        }
        Ok(ids)
    }

    fn queueing(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic while holding it leaves nothing inconsistent.
        self.queueing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One entry by id.
    pub fn entry(&self, id: EntryId) -> Result<Option<Entry>, StoreError> {
        self.tree(OUTBOX)?
            .get(id.to_be_bytes())?
            .map(|raw| decode(&raw, "outbox entry"))
            .transpose()
    }

    /// Where an entry is in its life, read without its body and names: the delivery engine
    /// asks this for every request it is asked to watch.
    pub fn progress(&self, id: EntryId) -> Result<Option<Progress>, StoreError> {
        self.tree(OUTBOX)?
            .get(id.to_be_bytes())?
            .map(|raw| decode(&raw, "outbox entry"))
            .transpose()
    }

    /// The head of a user's queue: its oldest pending entry, the only one that may be delivered
    /// now, or the dead entry that holds its lane.
    pub fn head_of(&self, user_id: &str) -> Result<Option<Entry>, StoreError> {
        let queue = self.tree(USER_QUEUE)?;
        for item in queue.scan_prefix(queue_prefix(user_id)) {
            let (key, _) = item?;
            let id = id_from(&key[key.len() - 8..])?;
            if let Some(entry) = self.fresh.get(id) {
                return Ok(Some(entry));
            }
            if let Some(entry) = self.entry(id)?.filter(Entry::may_be_queued) {
                return Ok(Some(entry));
            }
            // The key looks stale, but an enqueue or a retry may be between its two writes: the
            // key written, the entry not yet (a user's next command arriving while the engine
            // reads the user's queue). Looked at again where that cannot be.
            let _queueing = self.queueing();
            match self.entry(id)? {
                Some(entry) if entry.may_be_queued() => return Ok(Some(entry)),
                // A key left by a change that ended concurrently (an operator's retry racing a
                // drop, a finish removing its own key): the entry decides, the key goes.
                _ => {
                    queue.remove(&key)?;
                }
            }
        }
        Ok(None)
    }

    /// Whether a user's queue holds anything: a pending entry, or a dead one holding its lane
    /// (without reading it).
    pub fn has_queued(&self, user_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree(USER_QUEUE)?
            .scan_prefix(queue_prefix(user_id))
            .next()
            .transpose()?
            .is_some())
    }

    /// Every user whose queue holds anything, each once, in key order.
    pub fn users_with_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut users: Vec<String> = Vec::new();
        for item in self.tree(USER_QUEUE)?.iter() {
            let (key, _) = item?;
            let user = String::from_utf8_lossy(&key[..key.len().saturating_sub(9)]).into_owned();
            if users.last() != Some(&user) {
                users.push(user);
            }
        }
        Ok(users)
    }

    /// Record an attempt that is about to be made (before the request leaves), so a crash after
    /// sending is known to have maybe reached Webex.
    pub fn record_attempt(
        &self,
        id: EntryId,
        tracking_id: &str,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.lanes.check(lease)?;
        self.update_entry(id, |entry| {
            entry.attempts += 1;
            entry.tracking_id = Some(tracking_id.to_owned());
        })
    }

    /// Note a failed attempt that will be retried.
    pub fn record_failure(
        &self,
        id: EntryId,
        error: &str,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.lanes.check(lease)?;
        self.update_entry(id, |entry| entry.last_error = Some(error.to_owned()))
    }

    /// The final subscriber status found by the follow-up of a delivered entry.
    pub fn set_webex_status(&self, id: EntryId, status: &str) -> Result<Entry, StoreError> {
        self.update_entry(id, |entry| {
            if let EntryState::Delivered { webex_status, .. } = &mut entry.state {
                *webex_status = Some(status.to_owned());
            }
        })
    }

    /// The entry reached its end: delivered, it leaves the user's queue, so the next entry of
    /// that user becomes the head; dead, it stays there and holds the lane (see the module
    /// header). `last_call` is the TrackingID of the Webex call that ended it, counted as an
    /// attempt in the same write (a successful call is recorded only here: one write of the
    /// entry instead of two).
    pub fn finish(
        &self,
        id: EntryId,
        state: EntryState,
        last_call: Option<&str>,
        lease: Option<&Lease>,
    ) -> Result<Entry, StoreError> {
        self.lanes.check(lease)?;
        let is_dead = matches!(state, EntryState::Dead { .. });
        if is_dead {
            self.tree(DEAD)?.insert(id.to_be_bytes(), &[])?;
        }
        let entry = self.update_entry(id, |entry| {
            entry.state = state.clone();
            if let Some(tracking_id) = last_call {
                entry.attempts += 1;
                entry.tracking_id = Some(tracking_id.to_owned());
            }
        });
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                // The key written above points at nothing if the entry is gone; any other
                // failure leaves the entry as it was, possibly dead already, so the key stays.
                if is_dead && matches!(error, StoreError::NotFound(_)) {
                    self.tree(DEAD)?.remove(id.to_be_bytes())?;
                }
                return Err(error);
            }
        };
        if !is_dead {
            self.tree(USER_QUEUE)?
                .remove(queue_key(&entry.new.user_id, id))?;
        }
        Ok(entry)
    }

    /// Whether a dead entry holds its user's lane (is still in its queue).
    pub(super) fn holds_lane(&self, entry: &Entry) -> Result<bool, StoreError> {
        Ok(entry.is_dead()
            && self
                .tree(USER_QUEUE)?
                .contains_key(queue_key(&entry.new.user_id, entry.id))?)
    }

    /// The dead entries that hold their users' lanes: few, and all in `dead` (whose keys a
    /// crash may leave stale, so the entries say).
    fn holding_lanes(&self) -> Result<std::collections::HashSet<EntryId>, StoreError> {
        let mut dead = Vec::new();
        self.dead_ids(&mut dead)?;
        let mut held = std::collections::HashSet::new();
        for entry in self.entries(dead)? {
            if self.holds_lane(&entry)? {
                held.insert(entry.id);
            }
        }
        Ok(held)
    }

    /// Put a dead entry back in its user's queue, pending, its age counted from now (the
    /// operator's retry starts a new wait: `store.max_entry_age_hours` would otherwise end an
    /// entry that died long ago again at once). Returns false if it was not dead.
    pub fn retry(&self, id: EntryId) -> Result<bool, StoreError> {
        let Some(entry) = self.entry(id)? else {
            return Ok(false);
        };
        if !matches!(entry.state, EntryState::Dead { .. }) {
            return Ok(false);
        }
        let queued = queue_key(&entry.new.user_id, id);
        let _queueing = self.queueing();
        self.tree(USER_QUEUE)?.insert(queued.as_slice(), &[])?;
        let mut revived = false;
        self.update_entry(id, |entry| {
            // Checked again inside the atomic update: it may have been retried meanwhile.
            revived = matches!(entry.state, EntryState::Dead { .. });
            if revived {
                entry.state = EntryState::Pending;
                entry.last_error = None;
                entry.created_ms = super::now_ms();
            }
        })?;
        self.tree(DEAD)?.remove(id.to_be_bytes())?;
        Ok(revived)
    }

    /// Remove an entry for good (operator's `outbox drop`). Returns the removed entry.
    pub fn drop_entry(&self, id: EntryId) -> Result<Option<Entry>, StoreError> {
        self.fresh.take(id);
        let removed = self.tree(OUTBOX)?.remove(id.to_be_bytes())?;
        if removed.is_some() {
            self.counts.outbox.removed(1);
        }
        let Some(raw) = removed else {
            return Ok(None);
        };
        let entry: Entry = decode(&raw, "outbox entry")?;
        self.tree(USER_QUEUE)?
            .remove(queue_key(&entry.new.user_id, id))?;
        self.tree(DEAD)?.remove(id.to_be_bytes())?;
        Ok(Some(entry))
    }

    /// Entries matching `filter`, oldest first, at most `limit`.
    pub fn list(&self, filter: Filter, limit: usize) -> Result<Vec<Entry>, StoreError> {
        // Pending and dead entries are few and indexed; only the other views walk the history.
        let mut ids = Vec::new();
        match filter {
            Filter::Dead => self.dead_ids(&mut ids)?,
            Filter::Pending => self.pending_ids(&mut ids)?,
            Filter::Active => {
                self.dead_ids(&mut ids)?;
                self.pending_ids(&mut ids)?;
            }
            Filter::All | Filter::Delivered => return self.walk_history(filter, limit),
        }
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        // An index key can briefly outlive its entry's state (written key by key, index first).
        let mut entries = self.entries(ids)?;
        entries.retain(|entry| filter.matches(entry));
        Ok(entries)
    }

    fn dead_ids(&self, ids: &mut Vec<EntryId>) -> Result<(), StoreError> {
        for item in self.tree(DEAD)?.iter() {
            ids.push(id_from(&item?.0)?);
        }
        Ok(())
    }

    fn pending_ids(&self, ids: &mut Vec<EntryId>) -> Result<(), StoreError> {
        for item in self.tree(USER_QUEUE)?.iter() {
            let (key, _) = item?;
            ids.push(id_from(&key[key.len() - 8..])?);
        }
        Ok(())
    }

    /// The first `limit` entries of the whole history that match, oldest first.
    fn walk_history(&self, filter: Filter, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(OUTBOX)?.iter() {
            if out.len() >= limit {
                break;
            }
            let (_, raw) = item?;
            let entry: Entry = decode(&raw, "outbox entry")?;
            if filter.matches(&entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// How many entries are dead (waiting for the operator).
    pub fn dead_count(&self) -> Result<usize, StoreError> {
        Ok(self.tree(DEAD)?.len())
    }

    /// The entries with these ids, in this order; an id whose entry is gone is skipped (a prune
    /// removes the entry first, then its index key).
    fn entries(&self, ids: Vec<EntryId>) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = self.entry(id)? {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// How many entries are pending, and the creation time of the oldest (for the age metric).
    pub fn pending_summary(&self) -> Result<(u64, Option<u64>), StoreError> {
        let queue = self.tree(USER_QUEUE)?;
        // The queues also hold the dead entries that hold lanes.
        let held = self.holding_lanes()?;
        let mut count = 0;
        let mut oldest: Option<EntryId> = None;
        for item in queue.iter() {
            let (key, _) = item?;
            let id = id_from(&key[key.len() - 8..])?;
            if held.contains(&id) {
                continue;
            }
            count += 1;
            oldest = Some(oldest.map_or(id, |o| o.min(id)));
        }
        let oldest_ms = match oldest {
            Some(id) => self.entry(id)?.map(|e| e.created_ms),
            None => None,
        };
        Ok((count, oldest_ms))
    }

    /// Delete finished entries created before `cutoff_ms`, then the oldest delivered entries
    /// beyond `max_delivered`. Dead entries go only with age, however many there are: each is
    /// work an operator has yet to see through (`outbox retry` or `drop`); one that holds its
    /// lane never goes with age, since its user's later commands would then be delivered
    /// without anyone having acted.
    pub fn prune_finished(&self, cutoff_ms: u64, max_delivered: u64) -> Result<u64, StoreError> {
        let outbox = self.tree(OUTBOX)?;
        let dead = self.tree(DEAD)?;
        let queue = self.tree(USER_QUEUE)?;
        // Counted from the indexes, which a crash can leave with a stale key or two: the cap is
        // approximate by that much, never more.
        // The undelivered are few (pending and dead) and walked; the whole outbox is counted.
        // A dead entry that holds its lane is in both.
        let held = self.holding_lanes()?.len();
        let undelivered = (queue.len() + dead.len()).saturating_sub(held) as u64;
        let delivered = self.counts.outbox.of(&outbox).saturating_sub(undelivered);
        let mut excess = delivered.saturating_sub(max_delivered);
        let mut removed = 0;
        for item in outbox.iter() {
            let (key, raw) = item?;
            let entry: Entry = decode(&raw, "outbox entry")?;
            let expired = entry.created_ms < cutoff_ms;
            if !expired && excess == 0 {
                break;
            }
            let is_delivered = Filter::Delivered.matches(&entry);
            let kept = entry.is_pending() || self.holds_lane(&entry)?;
            if (expired && !kept) || (is_delivered && excess > 0) {
                if outbox.remove(&key)?.is_some() {
                    self.counts.outbox.removed(1);
                }
                dead.remove(&key)?;
                removed += 1;
                if is_delivered {
                    excess = excess.saturating_sub(1);
                }
            }
        }
        Ok(removed)
    }

    fn update_entry(
        &self,
        id: EntryId,
        mut change: impl FnMut(&mut Entry),
    ) -> Result<Entry, StoreError> {
        let outbox = self.tree(OUTBOX)?;
        if let Some((mut entry, raw)) = self.fresh.take(id) {
            change(&mut entry);
            let value = encode(&entry)?;
            // Swapped only if the stored bytes are still the ones enqueue wrote; if not (which
            // the invariant of `Fresh` rules out), the read-modify-write below does it.
            if outbox
                .compare_and_swap(id.to_be_bytes(), Some(raw), Some(value))?
                .is_ok()
            {
                return Ok(entry);
            }
        }
        let mut result = None;
        outbox.fetch_and_update(id.to_be_bytes(), |old| {
            let raw = old?;
            match decode::<Entry>(raw, "outbox entry") {
                Ok(mut entry) => {
                    change(&mut entry);
                    let value = encode(&entry).ok();
                    result = Some(Ok(entry));
                    value.or_else(|| Some(raw.to_vec()))
                }
                Err(e) => {
                    result = Some(Err(e));
                    Some(raw.to_vec())
                }
            }
        })?;
        result.unwrap_or(Err(StoreError::NotFound(id)))
    }
}

/// Drop index keys a crash left behind (see the module header): a queued id whose entry is
/// missing or delivered, a dead id whose entry is missing or no longer dead. Runs when the
/// store opens, before anything reads the indexes; costs one read per pending or dead entry.
/// Returns how many keys it dropped.
pub(super) fn reconcile_indexes(db: &sled::Db) -> Result<usize, StoreError> {
    let outbox = db.open_tree(OUTBOX)?;
    let state_of = |id: EntryId| -> Result<Option<EntryState>, StoreError> {
        outbox
            .get(id.to_be_bytes())?
            .map(|raw| decode::<Entry>(&raw, "outbox entry").map(|e| e.state))
            .transpose()
    };
    let mut dropped = 0;
    let queue = db.open_tree(USER_QUEUE)?;
    for item in queue.iter() {
        let (key, _) = item?;
        let id = id_from(&key[key.len().saturating_sub(8)..])?;
        if !matches!(
            state_of(id)?,
            Some(EntryState::Pending | EntryState::Dead { .. })
        ) {
            queue.remove(&key)?;
            dropped += 1;
        }
    }
    let dead = db.open_tree(DEAD)?;
    for item in dead.iter() {
        let (key, _) = item?;
        if !matches!(state_of(id_from(&key)?)?, Some(EntryState::Dead { .. })) {
            dead.remove(&key)?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Schema 1 or 2 → 3: index every dead and pending entry from the entries themselves, once.
///
/// Schema 1 had no dead index. Schema 2 could lose a pending entry from its user's queue: the
/// engine, reading a user's queue while a request for that user was between the two writes of
/// its enqueue, took the new key for one a crash had left and removed it; the entry was then
/// never delivered, not even after a restart. Found by the soak (`bench/run.sh soak`), where a
/// user's delete arrives while its add is being delivered. Returns how many pending entries had
/// no queue key.
pub(super) fn rebuild_indexes(db: &sled::Db) -> Result<usize, StoreError> {
    let dead = db.open_tree(DEAD)?;
    let queue = db.open_tree(USER_QUEUE)?;
    let mut requeued = 0;
    for item in db.open_tree(OUTBOX)?.iter() {
        let (key, raw) = item?;
        let entry: Entry = decode(&raw, "outbox entry")?;
        match entry.state {
            EntryState::Dead { .. } => {
                dead.insert(key, &[])?;
            }
            EntryState::Pending => {
                if queue
                    .insert(queue_key(&entry.new.user_id, entry.id), &[])?
                    .is_none()
                {
                    requeued += 1;
                }
            }
            EntryState::Delivered { .. } => {}
        }
    }
    Ok(requeued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore as Store;

    fn entry(user: &str, command: &str) -> NewEntry {
        NewEntry {
            user_id: user.to_owned(),
            template: "acme".to_owned(),
            command: command.to_owned(),
            call: Call::Remove,
            client: "CN=bwcticlient.webex.com".to_owned(),
            origin: Origin::Live,
        }
    }

    #[test]
    fn entries_are_read_and_written_in_the_format_stores_already_hold() {
        // As schema 3 wrote them (a derive with `flatten` and a tagged `call`).
        let stored = [
            r#"{"id":7,"created_ms":1,"user_id":"alice","template":"acme","command":"UserAddRequest17sp4","call":{"kind":"provision","body":{"email":"a@x.example","userId":"alice"}},"client":"CN=as","state":{"state":"delivered","at_ms":2,"subscriber_id":"sub-1","webex_status":null},"attempts":1,"last_error":null,"tracking_id":"FT_1"}"#,
            r#"{"id":8,"created_ms":1,"user_id":"alice","template":"acme","command":"UserModifyRequest22","call":{"kind":"update","body":{"firstName":"Al"}},"client":"CN=as","state":{"state":"pending"},"attempts":0,"last_error":null,"tracking_id":null}"#,
            r#"{"id":9,"created_ms":1,"user_id":"alice","template":"acme","command":"UserDeleteRequest","call":{"kind":"remove"},"client":"CN=as","state":{"state":"dead","at_ms":3,"reason":"gone"},"attempts":2,"last_error":"503","tracking_id":"FT_2"}"#,
        ];
        let calls = [
            Call::provision(&serde_json::json!({"email": "a@x.example", "userId": "alice"})),
            Call::update(&serde_json::json!({"firstName": "Al"})),
            Ok(Call::Remove),
        ];
        for (raw, call) in stored.iter().zip(calls) {
            let entry: Entry = decode(raw.as_bytes(), "outbox entry").unwrap();
            assert_eq!(entry.new.call, call.unwrap());
            assert_eq!(entry.new.user_id, "alice");
            assert_eq!(String::from_utf8(encode(&entry).unwrap()).unwrap(), *raw);
        }
        let without_body =
            stored[0].replace(r#","body":{"email":"a@x.example","userId":"alice"}"#, "");
        let err = decode::<Entry>(without_body.as_bytes(), "outbox entry").unwrap_err();
        assert!(err.to_string().contains("missing field `body`"), "{err}");
        assert_ne!(
            Call::provision(&serde_json::json!({"a": 1})).unwrap(),
            Call::update(&serde_json::json!({"a": 1})).unwrap()
        );
        // A bulk entry says so; a live one is written as before.
        let mut bulk: Entry = decode(stored[1].as_bytes(), "outbox entry").unwrap();
        assert_eq!(bulk.new.origin, Origin::Live);
        bulk.new.origin = Origin::Bulk;
        let written = String::from_utf8(encode(&bulk).unwrap()).unwrap();
        assert!(written.contains(r#""origin":"bulk""#), "{written}");
        let read: Entry = decode(written.as_bytes(), "outbox entry").unwrap();
        assert_eq!(read.new.origin, Origin::Bulk);
    }

    fn dead(at_ms: u64) -> EntryState {
        EntryState::Dead {
            at_ms,
            reason: "400 bad".into(),
        }
    }

    fn ids_listed(store: &Store, filter: Filter, limit: usize) -> Vec<EntryId> {
        store
            .list(filter, limit)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect()
    }

    fn delivered(at_ms: u64) -> EntryState {
        EntryState::Delivered {
            at_ms,
            subscriber_id: None,
            webex_status: None,
        }
    }

    #[test]
    fn a_schema_1_store_gets_its_dead_entries_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let dead_id = {
            let store = Store::open(dir.path()).unwrap();
            let ids = store
                .enqueue(vec![entry("a", "1"), entry("b", "2")], 10)
                .unwrap();
            store.finish(ids[0], dead(11), None, None).unwrap();
            // What a schema 1 store looks like: no index.
            store.tree(DEAD).unwrap().clear().unwrap();
            store
                .tree(crate::store::sled_backend::META_TREE)
                .unwrap()
                .insert(crate::store::sled_backend::SCHEMA_KEY, &1u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
            assert_eq!(store.dead_count().unwrap(), 0);
            ids[0]
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.dead_count().unwrap(), 1);
        assert_eq!(store.list(Filter::Dead, 10).unwrap()[0].id, dead_id);
        drop(store);
        // Opened again: the current version now, nothing to migrate.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.dead_count().unwrap(), 1);
    }

    /// What the engine's look at a user's queue did to a schema 2 store: a pending entry without
    /// its queue key, never delivered. Opening the store puts it back.
    #[test]
    fn a_schema_2_store_gets_its_unqueued_pending_entries_queued_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let lost = {
            let store = Store::open(dir.path()).unwrap();
            let ids = store
                .enqueue(vec![entry("a", "1"), entry("a", "2"), entry("b", "3")], 10)
                .unwrap();
            store.finish(ids[2], dead(11), None, None).unwrap();
            store
                .tree(USER_QUEUE)
                .unwrap()
                .remove(queue_key("a", ids[1]))
                .unwrap();
            store
                .tree(crate::store::sled_backend::META_TREE)
                .unwrap()
                .insert(crate::store::sled_backend::SCHEMA_KEY, &2u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
            assert_eq!(ids_listed(&store, Filter::Pending, 10), vec![ids[0]]);
            ids
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(ids_listed(&store, Filter::Pending, 10), lost[..2]);
        assert_eq!(ids_listed(&store, Filter::Dead, 10), vec![lost[2]]);
        // b's dead entry holds its lane.
        assert_eq!(store.users_with_queues().unwrap(), vec!["a", "b"]);
    }

    /// The race the soak found: the engine reads a user's queue while a request for that user is
    /// between the two writes of its enqueue (the key written, the entry not yet). The key must
    /// not be taken for one a crash left. If the reader gets to the key before the entry exists,
    /// it waits for the enqueue; if it comes later, it finds the entry at once: either way the
    /// entry stays queued and is the head.
    #[test]
    fn a_key_whose_enqueue_is_in_progress_is_not_taken_for_a_stale_one() {
        let (_dir, store) = Store::temporary();
        let id: EntryId = 7_000;
        let enqueue_in_progress = store.queueing();
        store
            .tree(USER_QUEUE)
            .unwrap()
            .insert(queue_key("erin", id), &[])
            .unwrap();
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || store.head_of("erin").unwrap().map(|e| e.id))
        };
        // Room for the reader to reach the key while the entry is missing.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let pending = Entry {
            id,
            created_ms: 1,
            new: entry("erin", "add"),
            state: EntryState::Pending,
            attempts: 0,
            last_error: None,
            tracking_id: None,
        };
        store
            .tree(OUTBOX)
            .unwrap()
            .insert(id.to_be_bytes(), encode(&pending).unwrap())
            .unwrap();
        drop(enqueue_in_progress);
        assert_eq!(reader.join().unwrap(), Some(id));
        assert_eq!(ids_listed(&store, Filter::Pending, 10), vec![id]);
    }

    #[test]
    fn keys_left_by_an_interrupted_write_are_dropped_when_the_store_opens() {
        // What a crash between two writes can leave (the index is written first, removed last):
        // a queue key without its entry (crash inside enqueue), a queue key of a delivered entry
        // (crash inside finish), a dead key of an entry still pending (crash inside finish to
        // dead) and of a pending one again (crash inside retry).
        let dir = tempfile::tempdir().unwrap();
        let (delivered, dead_then_pending, kept) = {
            let store = Store::open(dir.path()).unwrap();
            let ids = store
                .enqueue(vec![entry("a", "1"), entry("b", "2"), entry("c", "3")], 10)
                .unwrap();
            store.finish(ids[0], delivered(11), None, None).unwrap();
            let queue = store.tree(USER_QUEUE).unwrap();
            queue.insert(queue_key("a", ids[0]), &[]).unwrap();
            queue.insert(queue_key("ghost", 999_999), &[]).unwrap();
            store
                .tree(DEAD)
                .unwrap()
                .insert(ids[1].to_be_bytes(), &[])
                .unwrap();
            store.finish(ids[2], dead(12), None, None).unwrap();
            store.flush_blocking().unwrap();
            assert_eq!(
                store.pending_summary().unwrap().0,
                3,
                "two stale keys beside b's"
            );
            (ids[0], ids[1], ids[2])
        };
        let store = Store::open(dir.path()).unwrap();
        assert!(store.head_of("a").unwrap().is_none());
        assert!(!store.has_queued("ghost").unwrap());
        // c's dead entry holds its lane.
        assert_eq!(store.users_with_queues().unwrap(), vec!["b", "c"]);
        assert_eq!(store.head_of("c").unwrap().unwrap().id, kept);
        assert_eq!(store.head_of("b").unwrap().unwrap().id, dead_then_pending);
        let dead_ids = ids_listed(&store, Filter::Dead, 10);
        assert_eq!(dead_ids, vec![kept]);
        assert_eq!(store.dead_count().unwrap(), 1);
        assert!(
            store.entry(delivered).unwrap().is_some(),
            "entries are never dropped"
        );
    }

    #[test]
    fn a_stale_queue_key_met_at_run_time_is_skipped_and_removed() {
        let (_dir, store) = Store::temporary();
        let ids = store
            .enqueue(vec![entry("a", "1"), entry("a", "2")], 10)
            .unwrap();
        // Removed behind the API's back, so the copy kept since enqueue goes too, as every
        // change through the API takes it.
        store
            .tree(OUTBOX)
            .unwrap()
            .remove(ids[0].to_be_bytes())
            .unwrap();
        store.fresh.take(ids[0]);
        assert_eq!(store.head_of("a").unwrap().unwrap().id, ids[1]);
        assert_eq!(store.pending_summary().unwrap().0, 1);
    }

    /// The entry [`Store::head_of`] hands out from memory is the stored one, field for field, and
    /// every change shows at once: a change that left the remembered copy behind would have
    /// delivery send an entry the store no longer holds.
    #[test]
    fn entries_remembered_after_enqueue_are_the_stored_ones_until_changed() {
        let (_dir, store) = Store::temporary();
        let ids = store
            .enqueue(vec![entry("alice", "add"), entry("bob", "add")], 1)
            .unwrap();
        let stored = |id| store.entry(id).unwrap().unwrap();
        assert_eq!(store.head_of("alice").unwrap().unwrap(), stored(ids[0]));

        store.record_attempt(ids[0], "FLOWTHROUGH_1", None).unwrap();
        let head = store.head_of("alice").unwrap().unwrap();
        assert_eq!(
            (head.attempts, head.tracking_id.as_deref()),
            (1, Some("FLOWTHROUGH_1"))
        );
        assert_eq!(head, stored(ids[0]));
        store.record_failure(ids[0], "timeout", None).unwrap();
        assert_eq!(
            store
                .head_of("alice")
                .unwrap()
                .unwrap()
                .last_error
                .as_deref(),
            Some("timeout")
        );

        let ended = store
            .finish(ids[1], delivered(2), Some("FLOWTHROUGH_2"), None)
            .unwrap();
        assert_eq!(ended, stored(ids[1]));
        assert_eq!((ended.attempts, ended.state), (1, delivered(2)));
        assert_eq!(store.head_of("bob").unwrap(), None);

        let [carol] = store.enqueue(vec![entry("carol", "add")], 3).unwrap()[..] else {
            panic!("one id per entry")
        };
        assert!(store.drop_entry(carol).unwrap().is_some());
        assert!(
            store.fresh.get(carol).is_none(),
            "a dropped entry is not kept in memory"
        );
        assert_eq!(store.head_of("carol").unwrap(), None);
        assert!(matches!(
            store.finish(carol, delivered(4), None, None),
            Err(StoreError::NotFound(_))
        ));
    }

    /// If the stored bytes ever differ from the remembered ones, a change applies to what is
    /// stored, not to the copy: the swap fails and the read-modify-write takes over.
    #[test]
    fn a_change_applies_to_the_stored_entry_when_it_differs_from_the_remembered_one() {
        let (_dir, store) = Store::temporary();
        let id = store.enqueue(vec![entry("alice", "add")], 1).unwrap()[0];
        let mut behind = store.entry(id).unwrap().unwrap();
        behind.attempts = 5;
        store
            .tree(OUTBOX)
            .unwrap()
            .insert(id.to_be_bytes(), encode(&behind).unwrap())
            .unwrap();
        let ended = store
            .finish(id, delivered(2), Some("FLOWTHROUGH_6"), None)
            .unwrap();
        assert_eq!(ended.attempts, 6);
        assert_eq!(store.entry(id).unwrap().unwrap(), ended);
    }

    /// Past the cap, entries are read from the store; nothing is lost either side of it.
    #[test]
    fn entries_past_the_memory_cap_are_read_from_the_store() {
        let (_dir, store) = Store::temporary();
        let users: Vec<String> = (0..FRESH_MAX + 20).map(|i| format!("user{i}")).collect();
        let ids = store
            .enqueue(users.iter().map(|u| entry(u, "add")).collect(), 1)
            .unwrap();
        assert_eq!(store.fresh.lock().len(), FRESH_MAX);
        for (user, id) in users.iter().zip(&ids) {
            let head = store.head_of(user).unwrap().unwrap();
            assert_eq!(head, store.entry(*id).unwrap().unwrap());
            store
                .finish(*id, delivered(2), Some("FLOWTHROUGH_1"), None)
                .unwrap();
            assert_eq!(store.entry(*id).unwrap().unwrap().state, delivered(2));
        }
        assert!(store.fresh.lock().is_empty());
        assert_eq!(store.pending_summary().unwrap().0, 0);
    }
}
