//! Where a provisioning request's time goes: the moment it leaves each stage, on one clock, and a
//! summary over the recent requests that says which stages make up the slowest ones.
//!
//! A p99 of the whole request says how slow the tail is, not why; p99s of the stages do not add
//! up to it either (different requests are slow in different stages). So each request's stages
//! are kept side by side, and the summary reads them twice: each stage's own distribution, and
//! the mean of each stage among the slowest 1 % of requests — the tail's recipe.
//!
//! Plain data: the handler and the delivery engine take the timestamps (`Instant`, one monotonic
//! clock for every task and thread), and the admin listener serves the summary.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The stages of a provisioning request, in the order it passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From the handler's start (the body read) to the typed document.
    Parse,
    /// Choosing templates and mapping each command, with the store reads they need.
    Map,
    /// The store's accept of the commands: on PostgreSQL the durable commit, on sled the write
    /// before its flush.
    Accept,
    /// From the accept to the delivery engine starting on the user's lane.
    Queue,
    /// Claiming the lane and reading its head entry.
    Claim,
    /// The Webex call (with a token from the cache, or its refresh).
    Webex,
    /// From Webex's answer to the waiting request being told: the end of a delivered entry is
    /// stored after that, off the answer's path.
    Notify,
    /// From the stored end to the waiting request hearing of it.
    Wake,
    /// What the flush still took after the wait: on sled it overlaps the Webex call.
    Flush,
    /// The audit records' write the answer waits for: only a command refused before the
    /// store has one (at most 250 ms); a stored command's went in with its accept.
    Audit,
    /// Writing the OCI-P answer.
    Reply,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Stage::Parse,
        Stage::Map,
        Stage::Accept,
        Stage::Queue,
        Stage::Claim,
        Stage::Webex,
        Stage::Notify,
        Stage::Wake,
        Stage::Flush,
        Stage::Audit,
        Stage::Reply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Map => "map",
            Stage::Accept => "accept",
            Stage::Queue => "queue",
            Stage::Claim => "claim",
            Stage::Webex => "webex",
            Stage::Notify => "notify",
            Stage::Wake => "wake",
            Stage::Flush => "flush",
            Stage::Audit => "audit",
            Stage::Reply => "reply",
        }
    }
}

/// When the delivery engine passed each of its stages for one entry, handed to the request
/// waiting on it with the entry's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryMarks {
    /// The engine started on the user's lane.
    pub picked: Instant,
    /// The lane was claimed and its head read; the Webex call starts.
    pub claimed: Instant,
    /// Webex answered.
    pub answered: Instant,
    /// The waiting request was told (for a delivered entry before its end is stored).
    pub notified: Instant,
}

/// One request's stages as it passes them. Stages it skips (a command answered without Webex,
/// one delivered too late to wait for, or by another node) stay unknown, and so does the time
/// they took.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    parsed: Option<Instant>,
    mapped: Option<Instant>,
    accept: Duration,
    delivery: Option<DeliveryMarks>,
    woken: Option<Instant>,
    flushed: Option<Instant>,
    audited: Option<Instant>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            parsed: None,
            mapped: None,
            accept: Duration::ZERO,
            delivery: None,
            woken: None,
            flushed: None,
            audited: None,
        }
    }

    /// When the request started: its ack deadline counts from here.
    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn parsed(&mut self, at: Instant) {
        self.parsed = Some(at);
    }

    /// One command's accept took `took`; a document's commands are mapped and accepted in turn,
    /// so their accepts add up and the rest of the time until `mapped` is mapping.
    pub fn accepted(&mut self, took: Duration) {
        self.accept += took;
    }

    /// Every command is mapped and accepted.
    pub fn mapped(&mut self, at: Instant) {
        self.mapped = Some(at);
    }

    /// A stored command's delivery, heard while the request waited (one that ends after the
    /// deadline is not); of several, the one that ended last is the one waited for.
    pub fn delivered(&mut self, marks: DeliveryMarks) {
        if self
            .delivery
            .is_none_or(|known| known.notified < marks.notified)
        {
            self.delivery = Some(marks);
        }
    }

    pub fn woken(&mut self, at: Instant) {
        self.woken = Some(at);
    }

    pub fn flushed(&mut self, at: Instant) {
        self.flushed = Some(at);
    }

    pub fn audited(&mut self, at: Instant) {
        self.audited = Some(at);
    }

    /// Each stage's time and the total, in microseconds; `None` for a stage the request skipped.
    fn stages(&self, end: Instant) -> Record {
        let since = |later: Option<Instant>, earlier: Option<Instant>| {
            Some(later?.saturating_duration_since(earlier?))
        };
        let (mapped, d) = (self.mapped, self.delivery);
        let mut stages = [None; STAGES];
        let mut set = |stage: Stage, took: Option<Duration>| {
            stages[stage as usize] = took.map(micros);
        };
        set(Stage::Parse, since(self.parsed, Some(self.start)));
        set(
            Stage::Accept,
            mapped.map(|_| self.accept).filter(|a| !a.is_zero()),
        );
        set(
            Stage::Map,
            since(mapped, self.parsed).map(|m| m.saturating_sub(self.accept)),
        );
        set(Stage::Queue, since(d.map(|d| d.picked), mapped));
        set(Stage::Claim, d.map(|d| d.claimed - d.picked));
        set(Stage::Webex, d.map(|d| d.answered - d.claimed));
        set(Stage::Notify, d.map(|d| d.notified - d.answered));
        set(Stage::Wake, since(self.woken, d.map(|d| d.notified)));
        set(Stage::Flush, since(self.flushed, self.woken));
        set(Stage::Audit, since(self.audited, self.flushed));
        set(Stage::Reply, since(Some(end), self.audited));
        Record {
            stages,
            total: micros(end - self.start),
        }
    }
}

const STAGES: usize = Stage::ALL.len();

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Copy)]
struct Record {
    stages: [Option<u32>; STAGES],
    total: u32,
}

/// The most recent requests' timelines, a bounded number of them: enough for a p99 that rests
/// on a hundred slow requests, small enough to keep always (about 1 MiB).
#[derive(Debug)]
pub struct Traces {
    recent: Mutex<VecDeque<Record>>,
}

const KEPT: usize = 10_000;

impl Default for Traces {
    fn default() -> Traces {
        Traces {
            recent: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }
}

impl Traces {
    /// The request ended at `end`.
    pub fn record(&self, timeline: &Timeline, end: Instant) {
        let record = timeline.stages(end);
        let mut recent = self.lock();
        if recent.len() == KEPT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// Forget what was recorded: a measurement starts from here.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn summary(&self) -> Summary {
        let records: Vec<Record> = self.lock().iter().copied().collect();
        Summary::of(&records)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Record>> {
        // A panic while the buffer was held leaves whole records in it.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the recent requests' stages came to, in microseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub requests: usize,
    pub total: Spread,
    /// How many requests make up the tail (the slowest 1 %).
    pub tail_requests: usize,
    pub stages: Vec<StageSummary>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageSummary {
    pub stage: &'static str,
    /// The stage's own distribution, over the requests that passed it.
    #[serde(flatten)]
    pub spread: Spread,
    /// The stage's mean among the tail requests that passed it, and how many did.
    pub tail_mean_us: Option<u64>,
    pub tail_passed: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
    pub max_us: Option<u32>,
}

impl Spread {
    fn of(mut values: Vec<u32>) -> Spread {
        values.sort_unstable();
        Spread {
            count: values.len(),
            p50_us: quantile(&values, 0.50),
            p99_us: quantile(&values, 0.99),
            max_us: values.last().copied(),
        }
    }
}

/// The nearest-rank quantile of sorted values.
fn quantile(sorted: &[u32], q: f64) -> Option<u32> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

impl Summary {
    fn of(records: &[Record]) -> Summary {
        let total = Spread::of(records.iter().map(|r| r.total).collect());
        // The slowest 1 % by rank (ties at the p99 would otherwise take in the whole body of a
        // distribution as flat as a benchmark's).
        let mut tail: Vec<&Record> = records.iter().collect();
        tail.sort_unstable_by_key(|r| std::cmp::Reverse(r.total));
        tail.truncate(records.len().div_ceil(100));
        let stages = Stage::ALL
            .iter()
            .map(|&stage| {
                let i = stage as usize;
                let in_tail: Vec<u64> = tail
                    .iter()
                    .filter_map(|r| r.stages[i])
                    .map(u64::from)
                    .collect();
                StageSummary {
                    stage: stage.name(),
                    spread: Spread::of(records.iter().filter_map(|r| r.stages[i]).collect()),
                    tail_mean_us: (!in_tail.is_empty())
                        .then(|| in_tail.iter().sum::<u64>() / in_tail.len() as u64),
                    tail_passed: in_tail.len(),
                }
            })
            .collect();
        Summary {
            requests: records.len(),
            total,
            tail_requests: tail.len(),
            stages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A request delivered while it waited: every stage known, each its own span of time.
    fn delivered_timeline(t0: Instant, webex: u64) -> (Timeline, Instant) {
        let mut t = Timeline::new(t0);
        t.parsed(t0 + ms(1));
        t.accepted(ms(2));
        t.mapped(t0 + ms(4));
        let claimed = t0 + ms(6);
        t.delivered(DeliveryMarks {
            picked: t0 + ms(5),
            claimed,
            answered: claimed + ms(webex),
            notified: claimed + ms(webex + 1),
        });
        let woken = claimed + ms(webex + 2);
        t.woken(woken);
        t.flushed(woken);
        t.audited(woken + ms(1));
        (t, woken + ms(3))
    }

    fn stage(summary: &Summary, name: &str) -> StageSummary {
        summary
            .stages
            .iter()
            .find(|s| s.stage == name)
            .cloned()
            .unwrap()
    }

    #[test]
    fn a_delivered_request_is_cut_into_stages_that_add_up_to_its_total() {
        let t0 = Instant::now();
        let (t, end) = delivered_timeline(t0, 7);
        let record = t.stages(end);
        let got: Vec<Option<u32>> = record.stages.to_vec();
        let want: Vec<Option<u32>> = [1, 1, 2, 1, 1, 7, 1, 1, 0, 1, 2]
            .into_iter()
            .map(|ms: u32| Some(ms * 1000))
            .collect();
        assert_eq!(got, want);
        let sum: u32 = record.stages.iter().flatten().sum();
        assert_eq!(sum, record.total);
    }

    #[test]
    fn a_command_answered_without_delivery_skips_the_delivery_stages() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        t.parsed(t0 + ms(1));
        t.accepted(ms(1));
        t.mapped(t0 + ms(3));
        t.woken(t0 + ms(3));
        t.flushed(t0 + ms(4));
        t.audited(t0 + ms(5));
        let record = t.stages(t0 + ms(6));
        for stage in [
            Stage::Queue,
            Stage::Claim,
            Stage::Webex,
            Stage::Notify,
            Stage::Wake,
        ] {
            assert_eq!(record.stages[stage as usize], None, "{}", stage.name());
        }
        assert_eq!(record.stages[Stage::Flush as usize], Some(1000));
        assert_eq!(record.stages[Stage::Map as usize], Some(1000));
    }

    #[test]
    fn of_several_deliveries_the_last_to_end_is_the_one_waited_for() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        let marks = |end: u64| DeliveryMarks {
            picked: t0,
            claimed: t0,
            answered: t0 + ms(end),
            notified: t0 + ms(end),
        };
        t.delivered(marks(9));
        t.delivered(marks(4));
        assert_eq!(t.delivery, Some(marks(9)));
    }

    #[test]
    fn the_tail_says_which_stage_made_the_slowest_requests_slow() {
        let t0 = Instant::now();
        let traces = Traces::default();
        // 198 requests with a 7 ms Webex call, 2 with a 300 ms one: the tail is those two.
        for i in 0..200 {
            let (t, end) = delivered_timeline(t0, if i % 100 == 0 { 300 } else { 7 });
            traces.record(&t, end);
        }
        let summary = traces.summary();
        assert_eq!(summary.requests, 200);
        assert_eq!(summary.tail_requests, 2);
        let webex = stage(&summary, "webex");
        assert_eq!(webex.tail_mean_us, Some(300_000));
        assert_eq!(webex.spread.p50_us, Some(7_000));
        assert_eq!(webex.spread.max_us, Some(300_000));
        assert_eq!(stage(&summary, "parse").tail_mean_us, Some(1_000));
        assert_eq!(summary.total.max_us, Some(311_000));
    }

    #[test]
    fn only_the_most_recent_requests_are_kept_and_clear_forgets_them() {
        let t0 = Instant::now();
        let traces = Traces::default();
        for _ in 0..KEPT + 5 {
            let (t, end) = delivered_timeline(t0, 1);
            traces.record(&t, end);
        }
        assert_eq!(traces.summary().requests, KEPT);
        traces.clear();
        let empty = traces.summary();
        assert_eq!(empty.requests, 0);
        assert_eq!(empty.total.p99_us, None);
        assert_eq!(stage(&empty, "webex").tail_mean_us, None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.99), Some(99));
        assert_eq!(quantile(&values, 0.50), Some(50));
        assert_eq!(quantile(&[5], 0.99), Some(5));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
