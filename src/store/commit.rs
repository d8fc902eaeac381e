//! Group commit on a thread of its own: a caller takes a ticket ([`GroupCommit::request`]) after
//! its writes are in sled, one flusher thread makes the writes of every ticket taken so far durable
//! with a single sled flush, and callers waiting for a ticket it covered are woken. A flush asked
//! for runs whatever becomes of the caller: a request dropped half-way (its AS hung up) cannot
//! leave the others waiting for a flush nobody starts.
//!
//! Why a thread rather than sled's `flush_async`: that hands the flush to sled's I/O pool, whose
//! thread hands the buffer write to a second pool thread and sleeps until it is done, so each
//! answer to the AS waited for four thread wake-ups (runtime, pool, pool, runtime). Here it waits
//! for two: the flusher, which writes the buffer itself (the vendored sled's `make_stable` does
//! the write in the thread that asked for it; `vendor/README.md`), and the runtime. At 6,000
//! requests/s that was about a third of the server's context switches (bench/RESULTS.md, eighth
//! sitting).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::StoreError;

/// A caller's place in the group commit: its writes are durable once the flusher has flushed
/// every ticket up to `number`.
#[derive(Debug)]
pub struct FlushTicket {
    number: u64,
    requested: Instant,
}

/// The shared half: tickets, the flusher's wake-up, the callers' wake-up.
struct Shared {
    /// Tickets handed out: each caller of `flush` takes the next one after its writes.
    requested: AtomicU64,
    /// Every ticket up to this one is durable.
    flushed: AtomicU64,
    /// When the last successful flush ended, in nanoseconds since `epoch`.
    last_end_ns: AtomicU64,
    epoch: Instant,
    /// The last flush that failed and the tickets it covered: they are answered with its error.
    failed: Mutex<Option<Failure>>,
    wake: Mutex<FlusherState>,
    wake_up: Condvar,
    done: tokio::sync::Notify,
}

struct Failure {
    covered: u64,
    reason: String,
}

#[derive(Default)]
struct FlusherState {
    sleeping: bool,
    stop: bool,
}

/// The store's group commit. Dropping the last handle stops the flusher thread and waits for it,
/// so the thread's handle on the database is gone (and sled's file lock with it) when the last
/// store handle is.
pub(super) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing run under these locks can panic half-way through a change.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GroupCommit {
    /// Start the flusher thread for `db`.
    pub(super) fn start(db: sled::Db) -> Result<GroupCommit, StoreError> {
        let shared = Arc::new(Shared {
            requested: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            last_end_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            failed: Mutex::new(None),
            wake: Mutex::new(FlusherState::default()),
            wake_up: Condvar::new(),
            done: tokio::sync::Notify::new(),
        });
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn({
                let shared = shared.clone();
                move || run_flusher(&db, &shared)
            })
            .map_err(|e| StoreError::Io(format!("cannot start the store's flusher thread: {e}")))?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// Ask for every write made before this call to be made durable; [`GroupCommit::wait`]
    /// for the ticket returned.
    pub(super) fn request(&self) -> FlushTicket {
        let shared = &*self.shared;
        let ticket = FlushTicket {
            number: shared.requested.fetch_add(1, Ordering::SeqCst) + 1,
            requested: Instant::now(),
        };
        let mut state = lock(&shared.wake);
        if state.sleeping {
            state.sleeping = false;
            shared.wake_up.notify_one();
        }
        ticket
    }

    /// Wait until the writes a ticket stands for are durable, and say how long that took from
    /// the request: up to the end of the flush that covered it, or of a later one that ended
    /// before this call looked.
    pub(super) async fn wait(&self, ticket: FlushTicket) -> Result<Duration, StoreError> {
        let shared = &*self.shared;
        loop {
            // Created before the check, so a flush that ends between the check and the await
            // still wakes this caller.
            let notified = shared.done.notified();
            if shared.flushed.load(Ordering::SeqCst) >= ticket.number {
                let ended = Duration::from_nanos(shared.last_end_ns.load(Ordering::SeqCst));
                let requested = ticket.requested.saturating_duration_since(shared.epoch);
                return Ok(ended.saturating_sub(requested));
            }
            if let Some(failure) = lock(&shared.failed).as_ref()
                && failure.covered >= ticket.number
            {
                return Err(StoreError::Io(failure.reason.clone()));
            }
            notified.await;
        }
    }

    /// The highest ticket known durable (for tests).
    #[cfg(test)]
    pub(super) fn flushed(&self) -> u64 {
        self.shared.flushed.load(Ordering::SeqCst)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.wake);
            state.stop = true;
            self.shared.wake_up.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            // The thread only flushes and waits; a panic in sled there has already been
            // reported by the panic hook, and the store is being closed anyway.
            let _ = thread.join();
        }
    }
}

fn run_flusher(db: &sled::Db, shared: &Shared) {
    let mut attempted = 0;
    loop {
        {
            let mut state = lock(&shared.wake);
            loop {
                if state.stop {
                    return;
                }
                if shared.requested.load(Ordering::SeqCst) > attempted {
                    break;
                }
                state.sleeping = true;
                state = shared
                    .wake_up
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.sleeping = false;
        }
        // Every ticket up to `covers` was taken after its writes, hence before this flush starts.
        let covers = shared.requested.load(Ordering::SeqCst);
        attempted = covers;
        match db.flush() {
            Ok(_) => {
                let ended = shared.epoch.elapsed().as_nanos();
                shared
                    .last_end_ns
                    .store(u64::try_from(ended).unwrap_or(u64::MAX), Ordering::SeqCst);
                shared.flushed.fetch_max(covers, Ordering::SeqCst);
            }
            Err(e) => {
                *lock(&shared.failed) = Some(Failure {
                    covered: covers,
                    reason: e.to_string(),
                });
            }
        }
        shared.done.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tickets_can_be_waited_for_late_and_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let commit = GroupCommit::start(db.clone()).unwrap();
        db.insert(b"a", b"1").unwrap();
        let first = commit.request();
        db.insert(b"b", b"2").unwrap();
        let second = commit.request();
        // Both flushes may well have ended before anyone waits: nothing is left to wake.
        tokio::time::sleep(Duration::from_millis(50)).await;
        commit.wait(second).await.unwrap();
        commit.wait(first).await.unwrap();
        assert!(commit.flushed() >= 2);
        // A ticket taken after the flusher went back to sleep wakes it.
        db.insert(b"c", b"3").unwrap();
        let third = commit.request();
        commit.wait(third).await.unwrap();
        assert!(commit.flushed() >= 3);
    }

    #[test]
    fn dropping_the_commit_stops_the_flusher_and_lets_go_of_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let commit = GroupCommit::start(db.clone()).unwrap();
        drop(commit);
        drop(db);
        // sled locks its directory until the last handle is dropped: a flusher still holding
        // its clone would make this open fail.
        sled::Config::new().path(dir.path()).open().unwrap();
    }
}
