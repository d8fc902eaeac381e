//! Delivery scheduling: takes pending outbox entries to Webex in per-user arrival order, users in
//! parallel up to a bound, with backoff, a global pause and a learned pace on rate limits, one
//! probe while Webex is down, and dead letters.
//!
//! The scheduler knows nothing about Webex: it is handed an `attempt` function that tries one
//! entry once and says what happened ([`Attempt`]). That keeps the ordering and concurrency rules
//! here, testable on their own, and the Webex specifics in [`crate::delivery::webex`].

pub mod pace;
pub mod webex;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;

use crate::store::{
    AuditEvent, AuditRecord, Call, Claim, ClaimRequest, Entry, EntryId, EntryState, Lease, Origin,
    Progress, SharedLimits, Store, StoreError, UserMapChange, now_ms,
};
use crate::trace::DeliveryMarks;

/// What one try of one entry came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Webex accepted it; the entry is done.
    Delivered {
        subscriber_id: Option<String>,
        webex_status: Option<String>,
        /// The TrackingID of the call that did it, if a call did.
        tracking_id: Option<String>,
    },
    /// Webex answered, but not for this user yet (423, 409 while busy): try them again later.
    RetryUser { after: Duration, reason: String },
    /// Webex is unreachable or failing (5xx, network errors, timeouts, rejected credentials).
    /// One user probes after the delay; the others wait until an attempt gets through, so an
    /// outage is not hammered by every user and the backlog drains as soon as Webex is back.
    RetryUpstream { after: Duration, reason: String },
    /// Webex's rate limit (429): every delivery pauses, since the limit is shared.
    PauseAll { after: Duration, reason: String },
    /// A permanent failure: the entry is dead and stays for the operator.
    Dead { reason: String },
    /// The lease on the user's lane ran out before a call that changes Webex: the call is not
    /// made, nothing is written, and the node that holds the lane now does the work.
    LeaseExpired,
}

/// How an entry ended, for whoever waits on it (the AS's request, until its deadline), or why
/// it will not move without an operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    Delivered {
        subscriber_id: Option<String>,
        webex_status: Option<String>,
        tracking_id: Option<String>,
        /// When this node's engine passed each stage of the delivery; unknown when the end was
        /// read from the store.
        marks: Option<DeliveryMarks>,
    },
    Dead {
        reason: String,
    },
    /// Not ended: the entry waits behind a dead entry of its user, `behind`, which holds the
    /// user's lane (SPEC §11) until an operator retries or drops it. The waiter hears this at
    /// once rather than a silent 7020 at the deadline.
    Held {
        behind: EntryId,
        reason: String,
    },
}

impl Finished {
    /// What an operator reads about an entry held behind a dead one, and what to do.
    pub fn held_advice(behind: EntryId, reason: &str) -> String {
        format!(
            "it waits behind dead outbox entry {behind} of the same user ({reason}), which holds \
             the user's lane; fix the cause and run `flowthrough outbox retry {behind}`, or \
             `flowthrough outbox drop {behind}` to go on without it"
        )
    }

    /// How a stored entry ended; `None` while it is pending.
    pub(crate) fn of(progress: &Progress) -> Option<Finished> {
        match &progress.state {
            EntryState::Pending => None,
            EntryState::Dead { reason, .. } => Some(Finished::Dead {
                reason: reason.clone(),
            }),
            EntryState::Delivered {
                subscriber_id,
                webex_status,
                ..
            } => Some(Finished::Delivered {
                subscriber_id: subscriber_id.clone(),
                webex_status: webex_status.clone(),
                tracking_id: progress.tracking_id.clone(),
                marks: None,
            }),
        }
    }
}

/// The future an attempt function returns.
pub type AttemptFuture = Pin<Box<dyn Future<Output = Attempt> + Send>>;

/// Tries one entry once, under the lease on its user's lane (which the writes it makes carry,
/// and which it checks before each call that changes Webex). `Arc` so it can be shared by the
/// worker tasks.
pub type AttemptFn = Arc<dyn Fn(Entry, Tenure) -> AttemptFuture + Send + Sync>;

/// Share of a lease this node trusts itself to still hold, measured from before its claim or
/// renewal was sent: another node can claim the lane only once the database's clock has passed
/// the lease's end, which is later than the same span on this node's clock from an earlier
/// start. The quarter left is the margin between "held" being checked and the call leaving.
const TRUSTED_SHARE: f64 = 0.75;

/// A lease as delivery holds it: the store's lease, which fenced writes carry, and how long this
/// node may still act on it by its own clock, pushed on by each renewal. A node that was paused
/// (SIGSTOP, a VM stall) past that time finds so before its next Webex call instead of making a
/// call its successor makes too.
#[derive(Debug, Clone)]
pub struct Tenure {
    lease: Lease,
    trusted_until: Arc<Mutex<Instant>>,
    /// Set when the try's end handed the lane back with its outcome: whether the user has
    /// pending work left.
    handed_back: Arc<OnceLock<bool>>,
}

impl Tenure {
    fn new(lease: Lease, claimed_at: Instant, length: Duration) -> Tenure {
        Tenure {
            lease,
            trusted_until: Arc::new(Mutex::new(claimed_at + length.mul_f64(TRUSTED_SHARE))),
            handed_back: Arc::default(),
        }
    }

    /// A lease held for ever, for work that no other node can take (tests of the attempt).
    pub fn sole(lease: Lease) -> Tenure {
        Tenure::new(lease, Instant::now(), Duration::from_secs(86_400 * 365))
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether this node may still act for the user: false once the trusted part of the lease
    /// has passed without a renewal.
    pub fn held(&self) -> bool {
        Instant::now() < *self.trusted_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn renewed(&self, sent_at: Instant, length: Duration) {
        *self.trusted_until.lock().unwrap_or_else(|p| p.into_inner()) =
            sent_at + length.mul_f64(TRUSTED_SHARE);
    }
}

/// How long a user waits after its lane could not be claimed (the store unreachable): 3–6 s at
/// random, so that the users of a backlog, which all failed together, do not all come back at
/// the same instant when the database returns (at a fixed 5 s, 308 connection attempts met
/// PostgreSQL in one second of its recovery with 300 users waiting: bench/RESULTS.md,
/// thirteenth sitting).
fn after_claim_failure() -> Duration {
    crate::webex::backoff(0, CLAIM_RETRY, CLAIM_RETRY)
}
const CLAIM_RETRY: Duration = Duration::from_secs(6);

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Users delivered concurrently.
    pub max_parallel_users: usize,
    /// An entry older than this is dead instead of tried again.
    pub max_entry_age: Duration,
    /// How often to look in the store for users with pending work nobody submitted: on a shared
    /// store (PostgreSQL) a command can be stored without reaching this engine (its request
    /// dropped between the commit and the hand-over, an operator's retry from another host, and
    /// with several nodes another node's work). None: every command comes through `submit`.
    pub poll: Option<Duration>,
    /// This node's name on the lanes it leases (`[cluster] node_id`).
    pub node_id: String,
    /// How long a lane lease lasts: a node that stops working for longer loses its users to
    /// the others (a few times a Webex call's timeout, so a slow call keeps its lease).
    pub lease: Duration,
}

/// Paces closer than this part of one are the same pace: nodes do not trade changes of a few
/// tenths of an attempt per second.
const PACE_TOLERANCE: f64 = 0.02;

/// Whether two paces are the same within [`PACE_TOLERANCE`] of `b`.
fn same_pace(a: f64, b: f64) -> bool {
    (a - b).abs() <= b * PACE_TOLERANCE
}

/// Users taken from one look for work other nodes accepted or left: enough to fill every slot
/// many times over before the next look, few enough that a look stays one short query.
const POLL_BATCH: usize = 1000;

/// Users whose head entry may be tried now, in the order they became ready, each once.
/// Membership is a set lookup: every command submitted asks it, and after an outage the queue can
/// hold every user of a bulk provisioning run.
#[derive(Default)]
struct ReadyQueue {
    order: VecDeque<String>,
    members: HashSet<String>,
}

impl ReadyQueue {
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Queue last, unless already queued.
    fn push_back(&mut self, user: String) {
        if self.members.insert(user.clone()) {
            self.order.push_back(user);
        }
    }

    /// Queue first, unless already queued.
    fn push_front(&mut self, user: String) {
        if self.members.insert(user.clone()) {
            self.order.push_front(user);
        }
    }

    fn pop_front(&mut self) -> Option<String> {
        let user = self.order.pop_front()?;
        self.members.remove(&user);
        Some(user)
    }

    fn contains(&self, user: &str) -> bool {
        self.members.contains(user)
    }

    /// Take a user out wherever it is (a walk: only a bulk user turning live does this).
    fn remove(&mut self, user: &str) {
        if self.members.remove(user) {
            self.order.retain(|u| u != user);
        }
    }
}

#[derive(Default)]
struct Schedule {
    ready: ReadyQueue,
    /// Users with only bulk work (an import, a repair), ready: taken only when no live user is
    /// ready, and never into the last free slot, so a command the AS waits for starts at once.
    bulk_ready: ReadyQueue,
    /// Users whose work is all bulk, wherever they are in the schedule; a live submit removes a
    /// user from here for good (its live entry may sit behind bulk ones in its queue).
    bulk: HashSet<String>,
    /// Users whose head entry is being tried.
    busy: HashSet<String>,
    /// Users to try again later, by due time.
    later: BTreeMap<Instant, Vec<String>>,
    /// Users in `later`: new work for them waits for their retry time, so backoff holds.
    delayed: HashSet<String>,
    /// Users made ready while busy: looked at again when their attempt ends.
    again: HashSet<String>,
    /// The end of the latest pause for a 429: no delivery starts before it, and it is kept
    /// once passed, since a 429 from before it is one the pacer already learned from
    /// ([`Schedule::learns_from`]).
    paused_until: Option<Instant>,
    /// Spacing of attempts once Webex has answered 429.
    pacer: pace::Pacer,
    /// Work has waited for the pace without a break since the scheduler last slept for it: a
    /// start that comes late was held up, and its missed slots are owed (`Pacer::started`).
    /// A pause, an idle moment or full slots owe nothing.
    waiting_for_pace: bool,
    /// While Webex is failing: the user whose retry finds out when it is back.
    probe: Option<String>,
    /// Users waiting for the probe to get through (also in `delayed`).
    parked: Vec<String>,
    waiters: HashMap<EntryId, Watchers>,
    stopping: bool,
    /// Deliveries under way on requests' threads ([`Engine::reserve_here`]), and whether more may
    /// start there: a server that stops its request threads first waits for these (dropped with
    /// their thread, they would leave a delivered entry pending and its lane leased).
    here: usize,
    here_closed: bool,
    /// The nodes' count of 429s this node has heeded (its own included).
    rate_limits_seen: u64,
    /// The share of Webex's limit this node last told the other nodes (`Pacer::share_in_force`).
    published_share: Option<f64>,
    /// Another node's user probes Webex while it fails: this node's users wait for it (parked)
    /// as they wait for a probe of this node's.
    remote_probe: bool,
}

/// Who waits for one entry's end, and whose entry it is: a dead entry holds its user's lane, and
/// the requests waiting on the user's later entries are told so ([`Finished::Held`]).
struct Watchers {
    user: String,
    waiting: Vec<oneshot::Sender<Finished>>,
}

impl Schedule {
    fn watch(&mut self, id: EntryId, user: &str) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .entry(id)
            .or_insert_with(|| Watchers {
                user: user.to_owned(),
                waiting: Vec::new(),
            })
            .waiting
            .push(tx);
        rx
    }
}

/// How many deliveries may run on requests' threads at once ([`Engine::reserve_here`]): at the
/// rates an AS sends, a command arriving while one or two others are under way still starts
/// at once (at 100 commands/s, each under way for 3.5 ms, 4 are under way together less than
/// 0.05 % of the time); under load the engine's threads take them.
const HERE_AT_MOST: usize = 4;

/// A slot reserved for a command's delivery on its request's thread ([`Engine::reserve_here`]).
/// Dropped unstarted (the command was not stored), it gives the slot and the user back.
pub struct HereSlot {
    here: Option<Here>,
    user: String,
    reserved_at: Instant,
    claim: ClaimRequest,
}

impl HereSlot {
    /// The claim of the user's lane to ask for with the command's accept.
    pub fn claim(&self) -> &ClaimRequest {
        &self.claim
    }

    /// The delivery of the user's head entry, for the caller to run on its own thread; it holds
    /// the slot until it ends. `claimed`: the lane as the accept claimed it, if it did.
    pub fn start(mut self, claimed: Option<Claim>) -> impl Future<Output = ()> + use<> {
        let here = self.here.take();
        let user = std::mem::take(&mut self.user);
        let claimed = claimed.map(|claim| (claim, self.reserved_at));
        async move {
            if let Some(here) = here {
                here.engine.deliver_head(&user, claimed).await;
                drop(here);
            }
        }
    }
}

impl Drop for HereSlot {
    fn drop(&mut self) {
        if let Some(here) = self.here.take() {
            here.engine.give_back(&self.user);
        }
    }
}

/// A delivery under way on a request's thread: its slot, given back with its count when it
/// ends, or when it is dropped with its thread.
struct Here {
    engine: Engine,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Here {
    fn drop(&mut self) {
        // The slot first: the run loop woken below must find it free, or it sleeps again with
        // nobody left to wake it.
        drop(self.slot.take());
        self.engine.lock().here -= 1;
        self.engine.inner.here_done.notify_waiters();
        self.engine.inner.wake.notify_one();
    }
}

/// The delivery engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    attempt: AttemptFn,
    limits: Limits,
    schedule: Mutex<Schedule>,
    wake: Notify,
    /// A delivery started on a request's thread has ended.
    here_done: Notify,
    slots: Arc<Semaphore>,
}

impl Engine {
    pub fn new(store: Store, attempt: AttemptFn, limits: Limits) -> Engine {
        let slots = Arc::new(Semaphore::new(limits.max_parallel_users.max(1)));
        Engine {
            inner: Arc::new(Inner {
                store,
                attempt,
                limits,
                schedule: Mutex::new(Schedule::default()),
                wake: Notify::new(),
                here_done: Notify::new(),
                slots,
            }),
        }
    }

    /// Start the scheduler loop on the current runtime, after queueing every user that has
    /// pending entries in the store (recovery after a restart or crash).
    pub async fn start(&self) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        // 429s met before this start taught the nodes then running; only newer ones count here.
        self.lock().rate_limits_seen = self.inner.store.shared_limits().await?.rate_limited;
        let found = self
            .inner
            .store
            .claimable_users(&self.inner.limits.node_id, usize::MAX)
            .await?;
        for (user, origin) in found {
            self.submit_found(&user, origin);
        }
        if let Some(every) = self.inner.limits.poll {
            let engine = self.clone();
            tokio::spawn(async move { engine.poll(every).await });
        }
        let engine = self.clone();
        Ok(tokio::spawn(async move { engine.run().await }))
    }

    /// Submit every user with pending work, every `every`, until the engine stops. A user
    /// backing off or waiting for the probe stays where it is (`submit` leaves it). Skipped while
    /// users wait for a slot: the engine is behind anyway (a backlog after an outage can be every
    /// user), and what it was not handed is found once it has caught up.
    async fn poll(&self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            {
                let schedule = self.lock();
                if schedule.stopping {
                    return;
                }
                if !schedule.ready.is_empty() {
                    continue;
                }
            }
            match self.inner.store.shared_limits().await {
                Ok(shared) => {
                    self.heed(shared);
                    self.publish_share().await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the shared rate limit; will look again");
                }
            }
            let found = self
                .inner
                .store
                .claimable_users(&self.inner.limits.node_id, POLL_BATCH)
                .await;
            match found {
                Ok(users) => {
                    for (user, origin) in users {
                        self.submit_found(&user, origin);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look for pending work; will look again");
                }
            }
        }
    }

    /// A user found with pending work in the store, `origin` being that of the head of its
    /// queue. One the schedule knows keeps its kind (a found user never demotes a live one);
    /// recovery and the poll must not put an import's users before the AS's.
    fn submit_found(&self, user: &str, origin: Origin) {
        let known = self.lock().knows(user);
        self.submit_as(user, if known { Origin::Bulk } else { origin });
    }

    /// Heed the rate limit as the nodes share it. A 429 another node met since the last look
    /// pauses this node as long, and makes its pacer learn from what this node had Webex take
    /// in the last second (its own share of the limit, which [`Engine::publish_share`] then
    /// tells the others), unless it was met while this node was paused already
    /// ([`Schedule::learns_from`]). Otherwise, while paced, this node paces at the average of the live
    /// nodes' shares: what Webex took from each is rarely an even part of the limit (one node
    /// learned 15/s and the other 62/s under a limit of 100/s, and together they kept to
    /// 77/s), so the nodes even out at the average and keep together what Webex took from all.
    /// The shares stay each node's own measure, never the average: averaging paces already
    /// averaged lost what the calls under way at the first 429 added on one side. A share of
    /// this node's that the others have not heard of yet (a raise, a new learning) is kept as
    /// its pace until they have. While another node's user probes Webex, this node's users wait
    /// for it too, and go once the probe is over. Returns how long deliveries are paused now.
    fn heed(&self, shared: SharedLimits) -> Duration {
        let now = Instant::now();
        let mut s = self.lock();
        let new_429 = shared.rate_limited > s.rate_limits_seen;
        if new_429 {
            s.rate_limits_seen = shared.rate_limited;
            let noted = shared.limited_ms_ago.map_or(now, |ago| {
                now.checked_sub(Duration::from_millis(ago)).unwrap_or(now)
            });
            if s.learns_from(noted) {
                s.pacer.limited(now);
            }
            s.pause(now + Duration::from_millis(shared.pause_left_ms));
        }
        let probing_elsewhere = shared
            .probe_owner
            .as_deref()
            .is_some_and(|owner| owner != self.inner.limits.node_id)
            && shared.probe_left_ms > 0;
        if probing_elsewhere && s.probe.is_none() {
            s.remote_probe = true;
        } else if !probing_elsewhere && s.remote_probe {
            // The other node's probe got through (or its node died): this node's users go.
            s.release_parked("");
        }
        // Just learned from a new 429: the others hear this node's new share before it takes
        // up the average.
        if !new_429
            && let (Some(average), Some(rate)) = (shared.share_per_s, s.pacer.in_force(now))
            && let Some(share) = s.pacer.share_in_force(now)
            && s.published_share
                .is_some_and(|heard| same_pace(heard, share))
            && !same_pace(average, rate)
        {
            s.pacer.take_up(average);
        }
        s.paused_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }

    /// Tell the other nodes this node's share when it has changed (learned from a 429, raised,
    /// forgotten) since they last heard it.
    async fn publish_share(&self) {
        let share = {
            let mut s = self.lock();
            let share = s.pacer.share_in_force(Instant::now());
            let heard = match (share, s.published_share) {
                (None, None) => true,
                (Some(share), Some(published)) => same_pace(published, share),
                _ => false,
            };
            if heard {
                return;
            }
            s.published_share = share;
            share
        };
        if let Err(e) = self
            .inner
            .store
            .publish_share(&self.inner.limits.node_id, share)
            .await
        {
            tracing::debug!(error = %e, "cannot tell the other nodes this node's share of the rate limit; will try at the next change");
            self.lock().published_share = None;
        }
    }

    /// A user has new pending work from the AS.
    pub fn submit(&self, user_id: &str) {
        self.submit_as(user_id, Origin::Live);
    }

    /// A slot for a live command of `user_id`'s on the caller's thread, reserved before the
    /// command is stored, when the engine would start it at once anyway and has nothing of its
    /// own under way: no user queued or busy but those started this way (at most
    /// [`HERE_AT_MOST`]), no pause, pace or probe to wait for, the user not backing off. The
    /// user counts as busy from now on, so that nothing else on this node claims its lane
    /// before [`HereSlot::start`] does (on PostgreSQL with the accept: [`HereSlot::claim`]).
    /// `None`: hand the user over with [`Engine::submit`] once stored.
    ///
    /// Why: at the rates an AS sends, the threads of the engine and of the request are asleep,
    /// and each hand-over between them is a wake-up of another thread (0.47 and 0.33 ms of the
    /// slowest requests at 100 req/s: bench/RESULTS.md, fourteenth sitting). Run where the
    /// request runs, with that thread's own Webex connections (`webex::transport`), a command's
    /// path wakes no other thread but the store's.
    pub fn reserve_here(&self, user_id: &str) -> Option<HereSlot> {
        let mut s = self.lock();
        let now = Instant::now();
        // Only while the engine runs nothing of its own: the rates an AS sends. Under load the
        // engine's runtime spreads deliveries over every thread, where the two request threads
        // would carry them all (a version that started every free user here read less at max
        // throughput, on a machine too loaded to tell how much: bench/RESULTS.md, fifteenth
        // sitting).
        let at_once = !s.stopping
            && !s.here_closed
            && s.busy.len() == s.here
            && s.here < HERE_AT_MOST
            && !s.busy.contains(user_id)
            && s.ready.is_empty()
            && !s.bulk_ready.contains(user_id)
            && !s.delayed.contains(user_id)
            && s.paused_until.is_none_or(|until| until <= now)
            && s.probe.is_none()
            && !s.remote_probe
            && s.pacer.wait_until(now).is_none();
        let permit = at_once
            .then(|| self.inner.slots.clone().try_acquire_owned().ok())
            .flatten()?;
        s.bulk.remove(user_id);
        s.pacer.started(now, false);
        s.busy.insert(user_id.to_owned());
        s.here += 1;
        Some(HereSlot {
            here: Some(Here {
                engine: self.clone(),
                slot: Some(permit),
            }),
            user: user_id.to_owned(),
            reserved_at: now,
            claim: ClaimRequest {
                owner: self.inner.limits.node_id.clone(),
                lease_ms: u64::try_from(self.inner.limits.lease.as_millis()).unwrap_or(u64::MAX),
            },
        })
    }

    /// Start nothing more on requests' threads, and wait until what started there has ended:
    /// a server stopping its request threads calls this first, so that no delivery is dropped
    /// half done with them. Their commands go through the engine's own threads from now on.
    pub async fn close_here(&self) {
        loop {
            let done = self.inner.here_done.notified();
            {
                let mut s = self.lock();
                s.here_closed = true;
                if s.here == 0 {
                    return;
                }
            }
            done.await;
        }
    }

    /// A reserved slot left unstarted: the user is no longer busy here (work for it submitted
    /// meanwhile goes to the engine) and the pace gets its slot back.
    fn give_back(&self, user: &str) {
        let mut s = self.lock();
        s.busy.remove(user);
        s.pacer.skipped(Instant::now());
        if s.again.remove(user) {
            s.make_ready(user);
        }
    }

    /// A user has new pending work of this origin; bulk work waits while live work is ready.
    pub fn submit_as(&self, user_id: &str, origin: Origin) {
        {
            let mut s = self.lock();
            match origin {
                Origin::Live => {
                    s.bulk.remove(user_id);
                }
                Origin::Bulk if !s.knows(user_id) => {
                    s.bulk.insert(user_id.to_owned());
                }
                Origin::Bulk => {}
            }
            if s.busy.contains(user_id) {
                s.again.insert(user_id.to_owned());
            } else if !s.delayed.contains(user_id) {
                // A user promoted to live while queued as bulk moves to the live queue.
                if s.bulk_ready.contains(user_id) && !s.bulk.contains(user_id) {
                    s.bulk_ready.remove(user_id);
                }
                s.make_ready(user_id);
            }
        }
        self.inner.wake.notify_one();
    }

    /// Wait for an entry to end. The caller bounds the wait (the AS deadline).
    ///
    /// The entry may have ended already: when a user's entry ends, the engine goes on with the
    /// user's next one at once, which can be before that one's request has asked to watch it
    /// (a user's delete arriving while its add is delivered). Waiting for that end would answer
    /// 7020 at the deadline for a command Webex took in time.
    pub async fn watch(&self, id: EntryId, user: &str) -> oneshot::Receiver<Finished> {
        // The waiter is in place before the read: `finish` stores the end before it takes the
        // waiters, so either the read sees the end or the waiter gets it.
        let rx = self.lock().watch(id, user);
        // A read error leaves the wait to the deadline, as for an entry not yet ended.
        let ended = self.inner.store.progress(id).await.ok().flatten();
        let Some(finished) = ended.as_ref().and_then(Finished::of) else {
            return rx;
        };
        // Ended before the waiter was in place: answered here, and the waiter (now closed)
        // taken out so it does not wait for an end that has been.
        drop(rx);
        {
            let mut schedule = self.lock();
            if let Some(watchers) = schedule.waiters.get_mut(&id) {
                watchers.waiting.retain(|waiter| !waiter.is_closed());
                if watchers.waiting.is_empty() {
                    schedule.waiters.remove(&id);
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(finished);
        rx
    }

    /// Wait for the end of an entry that delivery cannot have found yet: one announced by
    /// [`Store::enqueue_announced`] before it was written. Nothing can have ended it, so unlike
    /// [`Engine::watch`] this reads nothing; that read, of an entry just written, cost each
    /// request a twentieth of its handler's CPU, under the lock the engine needs.
    pub fn watch_new(&self, id: EntryId, user: &str) -> oneshot::Receiver<Finished> {
        self.lock().watch(id, user)
    }

    /// Give up the watches of these entries (a request that answers without waiting, after its
    /// store failed): an entry that was never written would otherwise keep its waiter forever.
    pub fn unwatch(&self, ids: impl IntoIterator<Item = EntryId>) {
        let mut schedule = self.lock();
        for id in ids {
            schedule.waiters.remove(&id);
        }
    }

    /// Stop starting new attempts; attempts under way finish and their results are stored.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.inner.wake.notify_one();
    }

    /// When deliveries are paused for a rate limit, until when.
    pub fn paused_until(&self) -> Option<Instant> {
        self.lock().paused_until.filter(|t| *t > Instant::now())
    }

    /// Attempts per second allowed since Webex answered 429, if paced.
    pub fn pace(&self) -> Option<f64> {
        self.lock().pacer.in_force(Instant::now())
    }

    /// Users whose deliveries wait for Webex to answer again (the probing user included).
    pub fn waiting_for_webex(&self) -> usize {
        let s = self.lock();
        s.parked.len() + usize::from(s.probe.is_some())
    }

    /// Wait until no attempt is under way (used by shutdown after [`Engine::stop`]).
    pub async fn idle(&self) {
        let max = self.inner.limits.max_parallel_users.max(1) as u32;
        if let Ok(all) = self.inner.slots.acquire_many(max).await {
            drop(all);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // A poisoned lock means a panic while holding it; the schedule is plain data that stays
        // consistent between statements, so carrying on is safe.
        self.inner
            .schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn run(&self) {
        loop {
            let next = self.next_user();
            let user = match next {
                Next::Stop => return,
                Next::User(user) => user,
                Next::Sleep(until) => {
                    let wake = self.inner.wake.notified();
                    match until {
                        Some(at) => {
                            tokio::select! {
                                _ = wake => {}
                                _ = tokio::time::sleep_until(at) => {}
                            }
                        }
                        None => wake.await,
                    }
                    continue;
                }
            };
            let Ok(permit) = self.inner.slots.clone().acquire_owned().await else {
                return;
            };
            let engine = self.clone();
            tokio::spawn(async move {
                engine.deliver_head(&user, None).await;
                drop(permit);
                engine.inner.wake.notify_one();
            });
        }
    }

    /// The next user to work on, or how long to sleep.
    fn next_user(&self) -> Next {
        let mut s = self.lock();
        if s.stopping {
            return Next::Stop;
        }
        let now = Instant::now();
        // Move due retries to the ready queue.
        let due: Vec<Instant> = s.later.range(..=now).map(|(t, _)| *t).collect();
        for t in due {
            for user in s.later.remove(&t).unwrap_or_default() {
                s.delayed.remove(&user);
                if !s.busy.contains(&user) {
                    s.make_ready(&user);
                }
            }
        }
        if let Some(until) = s.paused_until.filter(|until| *until > now) {
            s.waiting_for_pace = false;
            return Next::Sleep(Some(until));
        }
        let next_due = s.later.keys().next().copied();
        let free = self.inner.slots.available_permits();
        // One slot stays for live work while bulk work runs (when there is more than one).
        let bulk_allowed = free > usize::from(self.inner.limits.max_parallel_users > 1);
        if free == 0 || (s.ready.is_empty() && (!bulk_allowed || s.bulk_ready.is_empty())) {
            s.waiting_for_pace = false;
            return Next::Sleep(next_due);
        }
        if let Some(at) = s.pacer.wait_until(now) {
            s.waiting_for_pace = true;
            return Next::Sleep(Some(next_due.map_or(at, |due| due.min(at))));
        }
        while let Some(user) = s
            .ready
            .pop_front()
            .or_else(|| bulk_allowed.then(|| s.bulk_ready.pop_front()).flatten())
        {
            // While Webex is failing, a user other than the probe waits for the probe without a
            // try of its own: an outage is not hammered by each new arrival (three transport
            // tries apiece), and all go together as soon as the probe gets through.
            if s.remote_probe || s.probe.as_deref().is_some_and(|probe| probe != user) {
                s.delayed.insert(user.clone());
                s.parked.push(user);
                continue;
            }
            let waited = s.waiting_for_pace;
            s.pacer.started(now, waited);
            s.busy.insert(user.clone());
            return Next::User(user);
        }
        Next::Sleep(next_due)
    }

    /// Try the head entry of a user once, store the result, and reschedule the user.
    ///
    /// One node at a time delivers a user: the head is read and tried under a lease on the
    /// user's lane, renewed while the try lasts and handed back when it ends (with the backoff
    /// the try asked for, which other nodes' polls respect). A lane another node holds is left
    /// to it; the poll looks again, so the user is found if that node dies.
    /// `claimed`: the lane as the command's accept claimed it, and when that claim was asked for.
    async fn deliver_head(&self, user: &str, claimed: Option<(Claim, Instant)>) {
        let store = &self.inner.store;
        let limits = &self.inner.limits;
        let lease_ms = u64::try_from(limits.lease.as_millis()).unwrap_or(u64::MAX);
        // For the trace: a claim that came with the accept took its time inside the accept.
        let started = std::time::Instant::now();
        let (claimed_at, claim) = match claimed {
            Some((claim, asked_at)) => (asked_at, Ok(Some(claim))),
            None => (
                Instant::now(),
                store.claim_head(user, &limits.node_id, lease_ms).await,
            ),
        };
        // `called`: whether the try had an entry to make a call for; a try without one gives
        // its slot of the pace back.
        let (reschedule, answered, more, called) = match claim {
            Ok(Some(claim)) => {
                let tenure = Tenure::new(claim.lease, claimed_at, limits.lease);
                let paused_for = self.heed(claim.limits);
                let probing_elsewhere = self.lock().remote_probe;
                // A dead head (the lane held for the operator) makes no call either.
                let called = claim.head.as_ref().is_some_and(Entry::is_pending)
                    && paused_for.is_zero()
                    && !probing_elsewhere;
                let (reschedule, answered) = match claim.head {
                    // A dead entry holds the lane: the user waits for the operator, and the
                    // requests waiting on its later entries hear why.
                    Some(dead) if dead.is_dead() => {
                        self.notify_held(&dead);
                        (Reschedule::Idle, None)
                    }
                    // Another node met a 429 since this user was picked: wait as it does.
                    Some(_) if !paused_for.is_zero() => (Reschedule::After(paused_for), None),
                    // Webex fails and another node's user probes it: wait for that probe.
                    Some(_) if probing_elsewhere => (Reschedule::Upstream(Duration::ZERO), None),
                    Some(entry) => {
                        let picked = (started, std::time::Instant::now());
                        self.try_under_lease(entry, &tenure, picked).await
                    }
                    None => (Reschedule::Idle, None),
                };
                // A lane the try's end handed back is back; one taken over is not ours.
                let more = if let Some(more) = tenure.handed_back.get() {
                    *more
                } else if matches!(reschedule, Reschedule::HeldElsewhere) {
                    false
                } else {
                    let ready_in =
                        u64::try_from(reschedule.delay().as_millis()).unwrap_or(u64::MAX);
                    store
                        .release_lane(tenure.lease(), ready_in)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(user_id = user, error = %e, "cannot hand back a delivery lane; other nodes can take it when its lease runs out");
                            true
                        })
                };
                (reschedule, answered, more, called)
            }
            Ok(None) => (Reschedule::HeldElsewhere, None, false, false),
            Err(e) => {
                // A store already known to fail was logged once when it failed (and `/readyz`
                // names it): a line per waiting user and retry would bury that line.
                if store.write_failure().is_some() {
                    tracing::debug!(user_id = user, error = %e, "cannot claim a delivery lane; will retry");
                } else {
                    tracing::error!(user_id = user, error = %e, "cannot claim a delivery lane; will retry");
                }
                (Reschedule::After(after_claim_failure()), None, false, false)
            }
        };
        // One user of one node probes while Webex fails: a user that would be this node's
        // probe takes the shared one first, held a lease past its next try (another node's
        // user probes if this node dies). Unless the database cannot say, then it probes alone.
        let probes_here = match reschedule {
            Reschedule::Upstream(delay)
                if self
                    .lock()
                    .probe
                    .as_deref()
                    .is_none_or(|probe| probe == user) =>
            {
                let hold_ms = u64::try_from((delay + limits.lease).as_millis()).unwrap_or(u64::MAX);
                store
                    .claim_probe(&limits.node_id, hold_ms)
                    .await
                    .unwrap_or(true)
            }
            _ => false,
        };
        // Every node pauses for a 429 any of them met, and learns its own share of the pace.
        let shared = match reschedule {
            Reschedule::PauseAll(delay) => {
                let pause_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                store.note_rate_limited(pause_ms).await.map_err(|e| {
                    tracing::warn!(error = %e, "cannot tell the other nodes of a 429 from Webex; they find it themselves");
                }).ok()
            }
            _ => None,
        };
        let mut end_shared_probe = false;
        {
            let now = Instant::now();
            let mut s = self.lock();
            if let Some(shared) = shared {
                s.rate_limits_seen = s.rate_limits_seen.max(shared.rate_limited);
            }
            if !called {
                s.pacer.skipped(now);
            }
            s.busy.remove(user);
            let again = s.again.remove(user);
            if let Some(at) = answered {
                s.pacer.accepted(at, claimed_at);
            }
            let probe_ended =
                s.probe.as_deref() == Some(user) && !matches!(reschedule, Reschedule::Upstream(_));
            if answered.is_some() || probe_ended {
                end_shared_probe |= s.probe.is_some();
                s.release_parked(user);
            }
            match reschedule {
                Reschedule::Now | Reschedule::Idle if more || again => s.make_ready(user),
                Reschedule::Now | Reschedule::Idle | Reschedule::HeldElsewhere => {
                    s.bulk.remove(user);
                }
                Reschedule::After(delay) => s.retry_later(user, now + delay),
                Reschedule::Upstream(delay) => {
                    if probes_here && s.probe.as_deref().is_none_or(|probe| probe == user) {
                        s.probe = Some(user.to_owned());
                        s.retry_later(user, now + delay);
                    } else {
                        s.remote_probe |= !probes_here && s.probe.is_none();
                        s.delayed.insert(user.to_owned());
                        s.parked.push(user.to_owned());
                    }
                }
                Reschedule::PauseAll(delay) => {
                    if s.learns_from(claimed_at) {
                        s.pacer.limited(now);
                    }
                    s.pause(now + delay);
                    if s.bulk.contains(user) {
                        s.bulk_ready.push_front(user.to_owned());
                    } else {
                        s.ready.push_front(user.to_owned());
                    }
                }
            }
        }
        if end_shared_probe && let Err(e) = store.end_probe(&limits.node_id).await {
            tracing::warn!(error = %e, "cannot tell the other nodes that Webex answers again; their users wait until this node's probe runs out");
        }
        self.publish_share().await;
    }

    /// [`Engine::try_entry`], renewing the lease every third of its length while the try lasts
    /// (a slow Webex, a long lookup and provision): a renewal that fails leaves the lease to run
    /// out, and the try finds that out before its next call.
    async fn try_under_lease(
        &self,
        entry: Entry,
        tenure: &Tenure,
        picked: (std::time::Instant, std::time::Instant),
    ) -> (Reschedule, Option<Instant>) {
        let length = self.inner.limits.lease;
        let lease_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        let attempt = self.try_entry(entry, tenure, picked);
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                tried = &mut attempt => return tried,
                _ = tokio::time::sleep(length / 3) => {
                    let sent_at = Instant::now();
                    match self.inner.store.renew_lane(tenure.lease(), lease_ms).await {
                        Ok(Some(_)) => tenure.renewed(sent_at, length),
                        Ok(None) => tracing::warn!(user_id = %tenure.lease().user_id, "the delivery lease ran out during a try; another node may take the user over"),
                        Err(e) => tracing::warn!(user_id = %tenure.lease().user_id, error = %e, "cannot renew a delivery lease; it runs out unless a later renewal gets through"),
                    }
                }
            }
        }
    }

    /// One try of an entry, and when Webex answered it if it did (not 429, not unreachable): the
    /// pace counts what Webex took by its answers, not by the end of the store write after it,
    /// which PostgreSQL under load holds up past the second that counts. `picked`: when the
    /// engine started on the lane and when its claim came back, for the trace.
    async fn try_entry(
        &self,
        entry: Entry,
        tenure: &Tenure,
        (picked, claimed): (std::time::Instant, std::time::Instant),
    ) -> (Reschedule, Option<Instant>) {
        let lease = tenure.lease();
        let age = Duration::from_millis(now_ms().saturating_sub(entry.created_ms));
        let id = entry.id;
        let too_old = age > self.inner.limits.max_entry_age;
        // What a delivery of it makes of the user's record, written with its end.
        let (removal, template) = (
            matches!(entry.new.call, Call::Remove),
            entry.new.template.clone(),
        );
        let attempt = if too_old {
            Attempt::Dead {
                reason: format!(
                    "undelivered after {} hours (store.max_entry_age_hours); last error: {}",
                    age.as_secs() / 3600,
                    entry.last_error.as_deref().unwrap_or("none")
                ),
            }
        } else {
            (self.inner.attempt)(entry, tenure.clone()).await
        };
        let answered = std::time::Instant::now();
        let answered_at = Instant::from_std(answered);
        let store = &self.inner.store;
        let mut last_call = None;
        let mut user_map = None;
        let (state, finished, reschedule) = match attempt {
            Attempt::Delivered {
                subscriber_id,
                webex_status,
                tracking_id,
            } => {
                last_call = tracking_id.clone();
                user_map = if removal {
                    Some(UserMapChange::Forget)
                } else {
                    subscriber_id
                        .clone()
                        .map(|subscriber_id| UserMapChange::Map {
                            subscriber_id,
                            template: template.clone(),
                        })
                };
                (
                    EntryState::Delivered {
                        at_ms: now_ms(),
                        subscriber_id: subscriber_id.clone(),
                        webex_status: webex_status.clone(),
                    },
                    Finished::Delivered {
                        subscriber_id,
                        webex_status,
                        tracking_id,
                        marks: None,
                    },
                    Reschedule::Now,
                )
            }
            Attempt::Dead { reason } => (
                EntryState::Dead {
                    at_ms: now_ms(),
                    reason: reason.clone(),
                },
                Finished::Dead { reason },
                Reschedule::Now,
            ),
            Attempt::RetryUser { after, reason } => {
                self.record_failure(id, &reason, lease).await;
                return (Reschedule::After(after), Some(answered_at));
            }
            Attempt::RetryUpstream { after, reason } => {
                self.record_failure(id, &reason, lease).await;
                return (Reschedule::Upstream(after), None);
            }
            Attempt::PauseAll { after, reason } => {
                self.record_failure(id, &reason, lease).await;
                return (Reschedule::PauseAll(after), None);
            }
            Attempt::LeaseExpired => {
                tracing::warn!(entry = id, user_id = %lease.user_id, "the delivery lease ran out before a Webex call; the call was not made and the node holding the user now delivers it");
                return (Reschedule::HeldElsewhere, None);
            }
        };
        // Webex took the call: the AS hears so now, and the end is stored after. Losing that
        // write (a crash, a lease taken over) means one more delivery, which a crash may always
        // cause (delivery state may lag, and a provision sent again looks the user up first);
        // Webex's answer stays true. A dead entry is told only once stored: if that write fails,
        // the entry stays pending and may yet be delivered, and the AS must not hear otherwise.
        let mut answered_in_time = false;
        let mut finished = finished;
        if let Finished::Delivered { marks, .. } = &mut finished {
            *marks = Some(DeliveryMarks {
                picked,
                claimed,
                answered,
                notified: std::time::Instant::now(),
            });
            answered_in_time = self.notify(id, &finished);
            // Started on the request's thread (`reserve_here`), the request runs only when this
            // task lets go of the thread: it answers the AS first, the end is stored after.
            tokio::task::yield_now().await;
        }
        let stored = store
            .finish_try(id, state, last_call.as_deref(), lease, user_map)
            .await;
        let ended = match stored {
            Ok((entry, more)) => {
                let _ = tenure.handed_back.set(more);
                entry
            }
            Err(e @ StoreError::LeaseLost { .. }) => {
                tracing::warn!(entry = id, error = %e, "a delivery outcome came too late");
                return (Reschedule::HeldElsewhere, None);
            }
            Err(e) => {
                tracing::error!(entry = id, error = %e, "cannot record the end of an outbox entry; it will be tried again");
                return (
                    Reschedule::After(Duration::from_secs(5)),
                    (!too_old).then_some(answered_at),
                );
            }
        };
        // No flush here: if this state is lost in a crash the entry is tried again, and a
        // provision tried again looks the user up first (Webex refuses duplicates anyway). The
        // AS's acknowledgement depends only on the enqueue, which the handler flushed.
        if matches!(finished, Finished::Dead { .. }) {
            answered_in_time = self.notify(id, &finished);
            self.notify_held(&ended);
        }
        // A request still waiting writes the command's audit record with this outcome in it;
        // past its deadline, this record says how the entry ended.
        if !answered_in_time {
            audit_end(store, &ended, &finished).await;
        }
        (reschedule, (!too_old).then_some(answered_at))
    }

    /// Tell the requests waiting on an entry how it ended; whether one still listened.
    fn notify(&self, id: EntryId, finished: &Finished) -> bool {
        let watchers = self.lock().waiters.remove(&id);
        let mut heard = false;
        for waiter in watchers.map(|w| w.waiting).unwrap_or_default() {
            heard |= waiter.send(finished.clone()).is_ok();
        }
        heard
    }

    /// Tell the requests waiting on the later entries of a dead entry's user that they wait
    /// behind it. A walk of the waiters: few at a time, and only when a lane is found held.
    fn notify_held(&self, dead: &Entry) {
        let EntryState::Dead { reason, .. } = &dead.state else {
            return;
        };
        let held = Finished::Held {
            behind: dead.id,
            reason: reason.clone(),
        };
        let behind: Vec<Watchers> = {
            let mut s = self.lock();
            let ids: Vec<EntryId> = s
                .waiters
                .iter()
                .filter(|(id, w)| **id != dead.id && w.user == dead.new.user_id)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| s.waiters.remove(id)).collect()
        };
        for waiter in behind.into_iter().flat_map(|w| w.waiting) {
            let _ = waiter.send(held.clone());
        }
    }

    async fn record_failure(&self, id: EntryId, reason: &str, lease: &Lease) {
        if let Err(e) = self
            .inner
            .store
            .record_failure(id, reason, Some(lease))
            .await
        {
            tracing::error!(entry = id, error = %e, "cannot record a failed attempt");
        }
    }
}

impl Schedule {
    /// Pause every delivery until `until` for a 429 (a later pause already set holds).
    fn pause(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Whether a 429 met at `at` (noted by another node then, or answering a call this node
    /// started then) teaches the pacer. One from before this node's latest pause ended does
    /// not: it belongs to a second the pacer already learned from (calls under way at the
    /// first 429, another node's calls answered meanwhile), and this node, paused, took
    /// nothing since. A node hears of another's 429s only at its first claim after its own
    /// pause, and learning then from a second spent paused taught a share of 1/s, which took
    /// 8 s of raises to climb back from (two nodes, fifteenth sitting).
    fn learns_from(&self, at: Instant) -> bool {
        self.paused_until.is_none_or(|end| at >= end)
    }

    /// Queue a user last in the queue of its kind of work.
    fn make_ready(&mut self, user: &str) {
        if self.bulk.contains(user) {
            self.bulk_ready.push_back(user.to_owned());
        } else {
            self.ready.push_back(user.to_owned());
        }
    }

    /// Whether the user has work the schedule knows of (so a bulk submit does not demote it).
    fn knows(&self, user: &str) -> bool {
        self.busy.contains(user)
            || self.delayed.contains(user)
            || self.ready.contains(user)
            || self.bulk_ready.contains(user)
    }

    fn retry_later(&mut self, user: &str, at: Instant) {
        self.delayed.insert(user.to_owned());
        self.later.entry(at).or_default().push(user.to_owned());
    }

    /// An attempt got an answer from Webex, or the probe has nothing left to probe with: the
    /// users waiting go now (the first to fail again becomes the next probe), the probe too.
    fn release_parked(&mut self, answered_for: &str) {
        self.remote_probe = false;
        let mut release = std::mem::take(&mut self.parked);
        if let Some(probe) = self.probe.take()
            && probe != answered_for
        {
            for users in self.later.values_mut() {
                users.retain(|u| *u != probe);
            }
            self.later.retain(|_, users| !users.is_empty());
            release.push(probe);
        }
        for user in release {
            self.delayed.remove(&user);
            if !self.busy.contains(&user) {
                self.make_ready(&user);
            }
        }
    }
}

/// One audit record when an entry ends, with the TrackingID of its last Webex call.
async fn audit_end(store: &Store, entry: &Entry, finished: &Finished) {
    let (outcome, webex_status) = match finished {
        Finished::Delivered { webex_status, .. } => ("delivered".to_owned(), webex_status.clone()),
        Finished::Dead { reason } => (format!("dead: {reason}"), None),
        Finished::Held { behind, .. } => (format!("held behind entry {behind}"), None),
    };
    let record = AuditRecord {
        at_ms: now_ms(),
        client: entry.new.client.clone(),
        event: AuditEvent::Command {
            template: Some(entry.new.template.clone()),
            command: entry.new.command.clone(),
            user_id: Some(entry.new.user_id.clone()),
            outcome,
            webex_status,
            tracking_id: entry.tracking_id.clone(),
            outbox_id: Some(entry.id),
            latency_ms: now_ms().saturating_sub(entry.created_ms),
        },
    };
    if let Err(e) = store.append_audit(&record).await {
        tracing::warn!(entry = entry.id, error = %e, "cannot write an audit record");
    }
}

enum Next {
    User(String),
    Sleep(Option<Instant>),
    Stop,
}

enum Reschedule {
    /// The entry ended: the user's next entry, if any, may go now.
    Now,
    /// Nothing pending.
    Idle,
    /// Another node holds the user's lane (or took it over during the try): its work.
    HeldElsewhere,
    /// Try this user again after the delay.
    After(Duration),
    /// Webex is failing: probe after the delay, or wait for the probe.
    Upstream(Duration),
    PauseAll(Duration),
}

impl Reschedule {
    /// How long the user waits before its next try.
    fn delay(&self) -> Duration {
        match self {
            Reschedule::After(delay)
            | Reschedule::Upstream(delay)
            | Reschedule::PauseAll(delay) => *delay,
            Reschedule::Now | Reschedule::Idle | Reschedule::HeldElsewhere => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Call, NewEntry};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn new_entry(user: &str, command: &str) -> NewEntry {
        NewEntry {
            user_id: user.into(),
            template: "acme".into(),
            command: command.into(),
            call: Call::Remove,
            client: "test".into(),
            origin: Origin::Live,
        }
    }

    fn limits(parallel: usize) -> Limits {
        Limits {
            poll: None,
            node_id: "test-node".to_owned(),
            lease: Duration::from_secs(30),
            max_parallel_users: parallel,
            max_entry_age: Duration::from_secs(3600),
        }
    }

    /// An attempt function that records the order of calls and answers from a script.
    fn scripted(
        log: Arc<Mutex<Vec<String>>>,
        answer: impl Fn(&Entry, usize) -> Attempt + Send + Sync + 'static,
    ) -> AttemptFn {
        let calls = Arc::new(AtomicUsize::new(0));
        Arc::new(move |entry: Entry, _lease: Tenure| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            log.lock()
                .unwrap()
                .push(format!("{}:{}", entry.new.user_id, entry.new.command));
            let result = answer(&entry, n);
            Box::pin(async move {
                tokio::task::yield_now().await;
                result
            })
        })
    }

    /// Answers: entries with this command die with this reason, the others are delivered.
    fn dead_for(
        command: &'static str,
        reason: &'static str,
    ) -> impl Fn(&Entry, usize) -> Attempt + Send + Sync + 'static {
        move |e, _| {
            if e.new.command == command {
                Attempt::Dead {
                    reason: reason.into(),
                }
            } else {
                delivered()
            }
        }
    }

    /// A watch of a stored entry, under its user.
    async fn watched(engine: &Engine, store: &Store, id: EntryId) -> oneshot::Receiver<Finished> {
        let entry = store.entry(id).await.unwrap().unwrap();
        engine.watch(id, &entry.new.user_id).await
    }

    /// An attempt function that answers 429 (a 1 s pause) at its eleventh call and delivers
    /// every other, counting its calls and noting when each started.
    fn limited_at_the_eleventh_call(
        calls: Arc<AtomicUsize>,
        starts: Arc<Mutex<Vec<Instant>>>,
    ) -> AttemptFn {
        Arc::new(move |_entry, _lease| {
            starts.lock().unwrap().push(Instant::now());
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 10 {
                    Attempt::PauseAll {
                        after: Duration::from_secs(1),
                        reason: "429".into(),
                    }
                } else {
                    delivered()
                }
            })
        })
    }

    /// One add for each of `users` users, stored, each watched.
    async fn users_watched(
        engine: &Engine,
        store: &Store,
        users: usize,
    ) -> Vec<oneshot::Receiver<Finished>> {
        let entries: Vec<NewEntry> = (0..users)
            .map(|i| new_entry(&format!("u{i}"), "add"))
            .collect();
        let mut waits = Vec::new();
        for id in store.enqueue(entries, now_ms()).await.unwrap() {
            waits.push(watched(engine, store, id).await);
        }
        waits
    }

    fn delivered() -> Attempt {
        Attempt::Delivered {
            subscriber_id: Some("sub".into()),
            webex_status: None,
            tracking_id: None,
        }
    }

    #[test]
    fn the_ready_queue_holds_each_user_once_in_arrival_order() {
        let mut ready = ReadyQueue::default();
        ready.push_back("a".into());
        ready.push_back("b".into());
        ready.push_back("a".into());
        ready.push_front("b".into());
        ready.push_front("c".into());
        assert_eq!(ready.pop_front().as_deref(), Some("c"));
        assert_eq!(ready.pop_front().as_deref(), Some("a"));
        // Once taken, a user may be queued again.
        ready.push_back("a".into());
        assert_eq!(ready.pop_front().as_deref(), Some("b"));
        assert_eq!(ready.pop_front().as_deref(), Some("a"));
        assert!(ready.is_empty() && ready.pop_front().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn live_work_goes_before_bulk_work_and_bulk_keeps_a_slot_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most_bulk = Arc::new(AtomicUsize::new(0));
        let attempt: AttemptFn = {
            let (log, in_flight, most_bulk) = (log.clone(), in_flight.clone(), most_bulk.clone());
            Arc::new(move |entry: Entry, _lease: Tenure| {
                let bulk = entry.new.origin == Origin::Bulk;
                log.lock().unwrap().push(entry.new.user_id.clone());
                let (in_flight, most_bulk) = (in_flight.clone(), most_bulk.clone());
                Box::pin(async move {
                    if bulk {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        most_bulk.fetch_max(now, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if bulk {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    delivered()
                })
            })
        };
        let bulk: Vec<NewEntry> = (0..20)
            .map(|i| NewEntry {
                origin: Origin::Bulk,
                ..new_entry(&format!("bulk{i:02}"), "add")
            })
            .collect();
        store.enqueue(bulk, now_ms()).await.unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(3));
        engine.start().await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
        let live = store
            .enqueue(vec![new_entry("live", "add")], now_ms())
            .await
            .unwrap();
        let done = watched(&engine, &store, live[0]).await;
        engine.submit("live");
        assert!(matches!(done.await.unwrap(), Finished::Delivered { .. }));
        let log = log.lock().unwrap().clone();
        let live_at = log.iter().position(|u| u == "live").unwrap();
        // Started in the slot kept free, not after the twenty bulk users queued before it.
        assert!(live_at <= 6, "live started as attempt {live_at}: {log:?}");
        assert_eq!(
            most_bulk.load(Ordering::SeqCst),
            2,
            "bulk must leave one of three slots"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_after_a_restart_still_puts_live_work_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), |_, _| delivered());
        let mut entries: Vec<NewEntry> = (0..5)
            .map(|i| NewEntry {
                origin: Origin::Bulk,
                ..new_entry(&format!("a-bulk{i}"), "add")
            })
            .collect();
        entries.push(new_entry("z-live", "add"));
        let ids = store.enqueue(entries, now_ms()).await.unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let last = watched(&engine, &store, ids[4]).await;
        engine.start().await.unwrap();
        assert!(matches!(last.await.unwrap(), Finished::Delivered { .. }));
        let log = log.lock().unwrap().clone();
        assert_eq!(log[0], "z-live:add", "{log:?}");
        assert_eq!(log.len(), 6, "{log:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn per_user_order_holds_across_retries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        // The first try of alice's add fails; her modify must still come after it.
        let attempt = scripted(log.clone(), |e, n| {
            if n == 0 && e.new.command == "add" {
                Attempt::RetryUser {
                    after: Duration::from_secs(2),
                    reason: "503".into(),
                }
            } else {
                delivered()
            }
        });
        let ids = store
            .enqueue(
                vec![new_entry("alice", "add"), new_entry("alice", "modify")],
                now_ms(),
            )
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(4));
        let last = watched(&engine, &store, ids[1]).await;
        engine.start().await.unwrap();
        assert!(matches!(last.await.unwrap(), Finished::Delivered { .. }));
        assert_eq!(
            *log.lock().unwrap(),
            vec!["alice:add", "alice:add", "alice:modify"]
        );
        assert_eq!(
            store
                .entry(ids[0])
                .await
                .unwrap()
                .unwrap()
                .last_error
                .as_deref(),
            Some("503")
        );
        // Told before its end is stored: stored once the engine is idle.
        engine.idle().await;
        assert!(store.head_of("alice").await.unwrap().is_none());
    }

    /// A user's next entry is delivered as soon as the one before ends, which can be before its
    /// request asks to watch it (the soak's add then delete of one user): the watch must still
    /// hear how it ended, not wait for the deadline.
    #[tokio::test(start_paused = true)]
    async fn watching_an_entry_that_has_already_ended_answers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), dead_for("delete", "404: gone"));
        let ids = store
            .enqueue(
                vec![new_entry("dave", "add"), new_entry("dave", "delete")],
                now_ms(),
            )
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(1));
        engine.start().await.unwrap();
        for _ in 0..100 {
            if !store.entry(ids[1]).await.unwrap().unwrap().is_pending() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["dave:add", "dave:delete"]);

        let late = tokio::time::timeout(
            Duration::from_secs(1),
            watched(&engine, &store, ids[0]).await,
        )
        .await;
        assert!(
            matches!(late, Ok(Ok(Finished::Delivered { .. }))),
            "{late:?}"
        );
        let late = tokio::time::timeout(
            Duration::from_secs(1),
            watched(&engine, &store, ids[1]).await,
        )
        .await;
        assert_eq!(
            late.unwrap().unwrap(),
            Finished::Dead {
                reason: "404: gone".into()
            }
        );
    }

    /// SPEC §11: a dead entry holds its user's lane until the operator acts. The user's later
    /// entries wait (their requests told why at once, not at their deadline), another user goes
    /// meanwhile, and once the operator drops the dead entry the rest follow in order.
    #[tokio::test(start_paused = true)]
    async fn a_dead_entry_holds_its_users_lane_and_never_another_users() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), dead_for("bad", "400: invalid"));
        let ids = store
            .enqueue(
                vec![
                    new_entry("bob", "bad"),
                    new_entry("bob", "good"),
                    new_entry("carol", "add"),
                ],
                now_ms(),
            )
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let first = watched(&engine, &store, ids[0]).await;
        let second = watched(&engine, &store, ids[1]).await;
        let other_user = watched(&engine, &store, ids[2]).await;
        engine.start().await.unwrap();
        let reason = "400: invalid".to_owned();
        assert_eq!(
            first.await.unwrap(),
            Finished::Dead {
                reason: reason.clone()
            }
        );
        let held = Finished::Held {
            behind: ids[0],
            reason: reason.clone(),
        };
        assert_eq!(second.await.unwrap(), held);
        assert!(matches!(
            other_user.await.unwrap(),
            Finished::Delivered { .. }
        ));
        let head = store.head_of("bob").await.unwrap().unwrap();
        assert_eq!(head.id, ids[0]);
        assert!(head.is_dead(), "{head:?}");
        assert!(store.entry(ids[1]).await.unwrap().unwrap().is_pending());

        // A command for the held user arriving now is told at once.
        let later = store
            .enqueue(vec![new_entry("bob", "later")], now_ms())
            .await
            .unwrap()[0];
        let told = engine.watch_new(later, "bob");
        engine.submit("bob");
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), told)
                .await
                .unwrap()
                .unwrap(),
            held
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec!["bob:bad", "carol:add"],
            "nothing of bob's went past the dead entry"
        );

        // The operator drops it: the rest of bob's queue goes, in order.
        store.drop_entry(ids[0]).await.unwrap().unwrap();
        let rest = [
            watched(&engine, &store, ids[1]).await,
            watched(&engine, &store, later).await,
        ];
        engine.submit("bob");
        for end in rest {
            let end = tokio::time::timeout(Duration::from_secs(5), end).await;
            assert!(matches!(end, Ok(Ok(Finished::Delivered { .. }))), "{end:?}");
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec!["bob:bad", "carol:add", "bob:good", "bob:later"]
        );
        engine.stop();
    }

    /// A live command starts on the caller's thread when the engine would start it at once,
    /// and goes through the engine otherwise (no slot free, its user busy): in order, and once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_free_users_command_starts_on_the_thread_that_accepted_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let seen = threads.clone();
        let attempt: AttemptFn = Arc::new(move |entry: Entry, _tenure: Tenure| {
            seen.lock().unwrap().push((
                format!("{}:{}", entry.new.user_id, entry.new.command),
                std::thread::current().id(),
            ));
            Box::pin(async { delivered() })
        });
        let engine = Engine::new(store.clone(), attempt, limits(1));
        engine.start().await.unwrap();
        let slot = engine.reserve_here("a").expect("a slot is free");
        assert!(
            engine.reserve_here("b").is_none(),
            "the one slot is reserved: b goes through the engine"
        );
        let ids = store
            .enqueue(vec![new_entry("a", "1"), new_entry("b", "1")], now_ms())
            .await
            .unwrap();
        let ends = [
            watched(&engine, &store, ids[0]).await,
            watched(&engine, &store, ids[1]).await,
        ];
        engine.submit("b");
        let here = slot.start(None);
        let later = store
            .enqueue(vec![new_entry("a", "2")], now_ms())
            .await
            .unwrap()[0];
        let last = watched(&engine, &store, later).await;
        assert!(engine.reserve_here("a").is_none(), "a is busy");
        engine.submit("a");
        let mut closing = Box::pin(engine.close_here());
        assert!(
            futures_util::poll!(&mut closing).is_pending(),
            "closing waits for the delivery under way here"
        );
        here.await;
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .expect("closed once it ended");
        for end in ends.into_iter().chain([last]) {
            let end = tokio::time::timeout(Duration::from_secs(5), end).await;
            assert!(matches!(end, Ok(Ok(Finished::Delivered { .. }))), "{end:?}");
        }
        let threads = threads.lock().unwrap().clone();
        let test_thread = std::thread::current().id();
        assert_eq!(threads[0], ("a:1".to_owned(), test_thread));
        let mut rest: Vec<_> = threads[1..].iter().map(|(call, _)| call.as_str()).collect();
        rest.sort();
        assert_eq!(rest, vec!["a:2", "b:1"], "each once, a's in order");
        assert!(
            threads[1..]
                .iter()
                .all(|(_, thread)| *thread != test_thread),
            "the engine's own deliveries run on its runtime's threads: {threads:?}"
        );
        engine.idle().await;
        assert!(
            engine.reserve_here("c").is_none(),
            "closed: the engine takes it"
        );
        engine.stop();
    }

    /// A slot reserved for a command that then was not stored gives back what it held: the slot
    /// (the engine delivers with it) and the user (work for it submitted meanwhile goes on).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reserved_slot_left_unstarted_gives_the_user_and_the_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let engine = Engine::new(
            store.clone(),
            scripted(log.clone(), |_, _| delivered()),
            limits(1),
        );
        engine.start().await.unwrap();
        let slot = engine.reserve_here("a").expect("a slot is free");
        assert!(engine.reserve_here("b").is_none(), "the one slot is taken");
        let id = store
            .enqueue(vec![new_entry("a", "add")], now_ms())
            .await
            .unwrap()[0];
        let end = watched(&engine, &store, id).await;
        engine.submit("a");
        drop(slot);
        let end = tokio::time::timeout(Duration::from_secs(5), end).await;
        assert!(matches!(end, Ok(Ok(Finished::Delivered { .. }))), "{end:?}");
        assert_eq!(*log.lock().unwrap(), vec!["a:add"]);
        engine.idle().await;
        let again = engine
            .reserve_here("a")
            .expect("slot and user are free again");
        drop(again);
        engine.stop();
    }

    /// Webex's acceptance reaches the waiting request before the end is stored: an end the
    /// store cannot take (here the entry was dropped while its call ran) leaves the AS with
    /// Webex's answer, not a 7020 at the deadline. A dead end is told only once stored.
    #[tokio::test]
    async fn a_delivery_is_told_before_its_end_is_stored_and_a_death_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dropping = store.clone();
        let attempt: AttemptFn = Arc::new(move |entry: Entry, _tenure: Tenure| {
            let store = dropping.clone();
            Box::pin(async move {
                store.drop_entry(entry.id).await.unwrap().unwrap();
                if entry.new.command == "add" {
                    delivered()
                } else {
                    Attempt::Dead {
                        reason: "400: invalid".into(),
                    }
                }
            })
        });
        let ids = store
            .enqueue(
                vec![new_entry("carol", "add"), new_entry("dave", "bad")],
                now_ms(),
            )
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(2));
        let added = watched(&engine, &store, ids[0]).await;
        let refused = watched(&engine, &store, ids[1]).await;
        engine.start().await.unwrap();
        let told = tokio::time::timeout(Duration::from_secs(5), added).await;
        assert!(
            matches!(told, Ok(Ok(Finished::Delivered { marks: Some(_), .. }))),
            "{told:?}"
        );
        let untold = tokio::time::timeout(Duration::from_millis(300), refused).await;
        assert!(
            untold.is_err(),
            "a death that was not stored was told: {untold:?}"
        );
        engine.stop();
    }

    /// A try that outlasts its lease keeps the lane by renewing it: the end it writes under
    /// the lease is accepted, and while it ran another node could not claim the user. (Real
    /// time: sled's lanes expire by the wall clock.)
    #[tokio::test]
    async fn a_try_longer_than_its_lease_renews_it_and_keeps_the_lane() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lease = Duration::from_millis(300);
        let (store_seen, held_elsewhere) = (store.clone(), Arc::new(Mutex::new(Vec::new())));
        let seen = held_elsewhere.clone();
        let attempt: AttemptFn = Arc::new(move |entry: Entry, tenure: Tenure| {
            let (store, seen) = (store_seen.clone(), seen.clone());
            Box::pin(async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let other = store
                        .claim_lane(&entry.new.user_id, "other-node", 60_000)
                        .await
                        .unwrap();
                    seen.lock().unwrap().push((other.is_some(), tenure.held()));
                }
                delivered()
            })
        });
        let ids = store
            .enqueue(vec![new_entry("slow", "add")], now_ms())
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, Limits { lease, ..limits(1) });
        let end = watched(&engine, &store, ids[0]).await;
        engine.start().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), end).await;
        assert!(
            matches!(ended, Ok(Ok(Finished::Delivered { .. }))),
            "{ended:?}: a lease lost mid-try leaves the end unwritten"
        );
        assert_eq!(
            *held_elsewhere.lock().unwrap(),
            vec![(false, true); 4],
            "800 ms under a 300 ms lease: renewed throughout, never claimable by another node"
        );
        engine.idle().await;
        assert!(matches!(
            store.entry(ids[0]).await.unwrap().unwrap().state,
            EntryState::Delivered { .. }
        ));
    }

    #[test]
    fn a_tenure_is_trusted_for_three_quarters_of_its_lease_from_before_the_claim() {
        let lease = Lease {
            user_id: "u".into(),
            owner: "n".into(),
            fence: 1,
            until_ms: 0,
        };
        let length = Duration::from_secs(40);
        let now = Instant::now();
        let fresh = Tenure::new(lease.clone(), now - Duration::from_secs(29), length);
        assert!(fresh.held());
        let stale = Tenure::new(lease.clone(), now - Duration::from_secs(31), length);
        assert!(!stale.held(), "past three quarters of the lease");
        stale.renewed(now, length);
        assert!(stale.held(), "a renewal pushes it on");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_watched_from_its_announcement_is_seen_to_end_however_soon() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), |_, _| delivered());
        let engine = Engine::new(store.clone(), attempt, limits(1));
        engine.start().await.unwrap();
        let first = store
            .enqueue(vec![new_entry("dave", "add")], now_ms())
            .await
            .unwrap();
        let first_done = watched(&engine, &store, first[0]).await;
        engine.submit("dave");
        // Stored while the add is under way and never submitted: the engine takes it up the
        // moment the add ends, with nobody to read its end after the fact.
        let mut watches = Vec::new();
        store
            .enqueue_announced(vec![new_entry("dave", "modify")], now_ms(), |id| {
                watches.push(engine.watch_new(id, "dave"))
            })
            .await
            .unwrap();
        assert!(matches!(
            first_done.await.unwrap(),
            Finished::Delivered { .. }
        ));
        let second_done = watches.pop().unwrap();
        assert!(matches!(
            second_done.await.unwrap(),
            Finished::Delivered { .. }
        ));
        assert_eq!(*log.lock().unwrap(), vec!["dave:add", "dave:modify"]);
    }

    #[tokio::test]
    async fn an_unwatched_entry_keeps_no_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let attempt = scripted(Arc::default(), |_, _| delivered());
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let watched = engine.watch_new(42, "nobody");
        engine.unwatch([42]);
        assert!(engine.lock().waiters.is_empty());
        assert!(watched.await.is_err(), "the waiter should be gone");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_past_the_maximum_age_die_without_a_try() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), |_, _| delivered());
        let ids = store
            .enqueue(vec![new_entry("carol", "add")], 1)
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let done = watched(&engine, &store, ids[0]).await;
        engine.start().await.unwrap();
        match done.await.unwrap() {
            Finished::Dead { reason } => {
                assert!(reason.contains("max_entry_age_hours"), "{reason}")
            }
            other => panic!("expected dead, got {other:?}"),
        }
        assert!(log.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_pauses_every_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = scripted(log.clone(), |_, n| {
            if n == 0 {
                Attempt::PauseAll {
                    after: Duration::from_secs(30),
                    reason: "429".into(),
                }
            } else {
                delivered()
            }
        });
        let ids = store
            .enqueue(
                vec![new_entry("u1", "add"), new_entry("u2", "add")],
                now_ms(),
            )
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let second = watched(&engine, &store, ids[1]).await;
        let started = Instant::now();
        engine.start().await.unwrap();
        second.await.unwrap();
        // With the clock paused, time only moves when every task sleeps: u2 cannot have been
        // tried before the pause ended.
        assert!(Instant::now() - started >= Duration::from_secs(30));
        assert_eq!(
            log.lock().unwrap()[..2],
            ["u1:add".to_string(), "u1:add".to_string()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn users_run_in_parallel_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let attempt: AttemptFn = Arc::new(move |_entry, _lease| {
            let (r, p) = (r.clone(), p.clone());
            Box::pin(async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                delivered()
            })
        });
        let entries: Vec<NewEntry> = (0..20)
            .map(|i| new_entry(&format!("user{i}"), "add"))
            .collect();
        let ids = store.enqueue(entries, now_ms()).await.unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(4));
        let mut waits = Vec::new();
        for id in &ids {
            waits.push(watched(&engine, &store, *id).await);
        }
        engine.start().await.unwrap();
        for w in waits {
            w.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        engine.idle().await;
        assert_eq!(store.pending_summary().await.unwrap().0, 0);
    }

    /// Webex failing (503, try again in 10 s) for `down` from now, then accepting; the users tried
    /// are logged in order.
    fn down_for(down: Duration, log: Arc<Mutex<Vec<String>>>) -> AttemptFn {
        let down_until = Instant::now() + down;
        Arc::new(move |entry: Entry, _lease: Tenure| {
            log.lock().unwrap().push(entry.new.user_id.clone());
            Box::pin(async move {
                if Instant::now() < down_until {
                    Attempt::RetryUpstream {
                        after: Duration::from_secs(10),
                        reason: "503".into(),
                    }
                } else {
                    delivered()
                }
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn while_webex_fails_one_user_probes_and_the_rest_go_when_it_gets_through() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = down_for(Duration::from_secs(25), log.clone());
        let entries: Vec<NewEntry> = (0..5).map(|i| new_entry(&format!("u{i}"), "add")).collect();
        let ids = store.enqueue(entries, now_ms()).await.unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(4));
        let mut waits = Vec::new();
        for id in &ids {
            waits.push(watched(&engine, &store, *id).await);
        }
        let started = Instant::now();
        engine.start().await.unwrap();
        for w in waits {
            assert!(matches!(w.await.unwrap(), Finished::Delivered { .. }));
        }
        // The four the slots allow once; u4, whose turn comes after the first failure, waits for
        // the probe without a try. The probe at 10 s and 20 s (still down) and 30 s (back); then
        // the four others at once, not each on its own backoff.
        let log = log.lock().unwrap().clone();
        assert_eq!(log.len(), 4 + 3 + 4, "{log:?}");
        let probe = &log[4];
        assert!(log[4..7].iter().all(|u| u == probe), "{log:?}");
        for i in 0..5 {
            let user = format!("u{i}");
            let tries = log.iter().filter(|u| **u == user).count();
            let expected = match user.as_str() {
                _ if user == *probe => 4,
                "u4" => 1,
                _ => 2,
            };
            assert_eq!(tries, expected, "{log:?}");
        }
        assert_eq!(Instant::now() - started, Duration::from_secs(30));
        assert_eq!(engine.waiting_for_webex(), 0);
        engine.idle().await;
        assert_eq!(store.pending_summary().await.unwrap().0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn users_arriving_while_webex_fails_wait_for_the_probe_without_a_try() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let attempt = down_for(Duration::from_secs(25), log.clone());
        let first = store
            .enqueue(vec![new_entry("u0", "add")], now_ms())
            .await
            .unwrap();
        let engine = Engine::new(store.clone(), attempt, limits(4));
        let mut waits = vec![watched(&engine, &store, first[0]).await];
        engine.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        // u0 failed and probes; three more users arrive during the outage.
        let later: Vec<NewEntry> = (1..4).map(|i| new_entry(&format!("u{i}"), "add")).collect();
        for id in store.enqueue(later, now_ms()).await.unwrap() {
            waits.push(watched(&engine, &store, id).await);
        }
        for i in 1..4 {
            engine.submit(&format!("u{i}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(engine.waiting_for_webex(), 4);
        assert_eq!(*log.lock().unwrap(), vec!["u0"]);
        for w in waits {
            assert!(matches!(w.await.unwrap(), Finished::Delivered { .. }));
        }
        // The probe at 0, 10, 20 (down) and 30 s (back), then each newcomer once.
        let log = log.lock().unwrap().clone();
        assert_eq!(log[..4], ["u0", "u0", "u0", "u0"], "{log:?}");
        let mut rest = log[4..].to_vec();
        rest.sort();
        assert_eq!(rest, ["u1", "u2", "u3"], "{log:?}");
        assert_eq!(engine.waiting_for_webex(), 0);
    }

    #[test]
    fn users_whose_claim_failed_come_back_spread_over_three_seconds() {
        let waits: Vec<Duration> = (0..300).map(|_| after_claim_failure()).collect();
        let (shortest, longest) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*shortest >= CLAIM_RETRY / 2, "{shortest:?}");
        assert!(*longest <= CLAIM_RETRY, "{longest:?}");
        // 300 users over 3 s: in no 100 ms do more than a few dozen come back.
        let mut per_slot = [0usize; 31];
        for wait in &waits {
            per_slot[((*wait - CLAIM_RETRY / 2).as_millis() / 100) as usize] += 1;
        }
        let busiest = per_slot.iter().max().unwrap();
        assert!(*busiest < 40, "{busiest} of 300 in one 100 ms slot");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_429_attempts_are_spaced_at_the_pace_webex_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let attempt = limited_at_the_eleventh_call(Arc::default(), starts.clone());
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let waits = users_watched(&engine, &store, 30).await;
        engine.start().await.unwrap();
        for w in waits {
            w.await.unwrap();
        }
        // Ten accepted within the second before the 429: paced at 9 per second from then on.
        assert_eq!(engine.pace(), Some(9.0));
        let starts = starts.lock().unwrap().clone();
        assert_eq!(starts.len(), 31);
        assert!(starts[10] - starts[0] < Duration::from_millis(10));
        assert!(starts[11] - starts[10] >= Duration::from_secs(1));
        for pair in starts[11..].windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(100),
                "{:?}",
                pair[1] - pair[0]
            );
        }
        // And at that pace, not slower: a user with nothing left takes no turn (virtual time).
        assert!(
            starts[30] - starts[11] < Duration::from_millis(2200),
            "{:?}",
            starts[30] - starts[11]
        );
    }

    /// Another node's 429 that this node hears of only at its first claim after its own pause
    /// (it claims nothing while paused) is of the second this node already learned from: its
    /// pace stays what it learned then, not what it had Webex take in a second spent paused.
    #[tokio::test]
    async fn a_429_another_node_met_during_this_nodes_pause_teaches_its_pacer_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let attempt = limited_at_the_eleventh_call(calls.clone(), Arc::default());
        let engine = Engine::new(store.clone(), attempt, limits(1));
        let waits = users_watched(&engine, &store, 20).await;
        engine.start().await.unwrap();
        while calls.load(Ordering::SeqCst) <= 10 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Another node's call under way at the first 429, answered 429 meanwhile.
        store.note_rate_limited(1).await.unwrap();
        for w in waits {
            w.await.unwrap();
        }
        assert_eq!(engine.pace(), Some(9.0));
    }
}
