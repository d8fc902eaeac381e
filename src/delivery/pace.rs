//! Pacing of delivery attempts under Webex's rate limit, learned from its 429 answers.
//!
//! Honouring `Retry-After` alone turns a shared rate limit into bursts: everything queued goes out
//! at once, the limit is hit again, and every delivery stops for the whole `Retry-After`. Each
//! stop costs the rest of the limit's window. So once Webex has said 429, attempts are spaced
//! evenly at a little under the rate that was actually accepted in the second before it, and the
//! pace creeps up slowly while no 429 comes, so a raised limit is found again; after a minute
//! without one, pacing stops.
//!
//! A storm of 429s teaches a rate far below the one Webex took before it (one per second while
//! the storm lasts). Creeping up from there took until pacing stopped, with every command
//! answered 7020 meanwhile (`bench/run.sh faults` found it: 133 of 5,000 commands answered in
//! time). So the pace goes back quickly towards the rate Webex accepted in the busiest second
//! of the ten before the first 429, halving the distance every two seconds, and a raise that
//! draws a 429 becomes the new bound: a limit that really came down is found in a few halvings,
//! a storm that passed costs seconds. Only the last ten seconds count: a burst from before a
//! limit was set says nothing of it, and each raise towards it would cost a 429 and a pause
//! (`bench/run.sh` found 0.73 R delivered under a steady limit met after its flat-out run).
//!
//! A long storm that comes and goes (Webex taking one call in every other second for 20 s) also
//! meets each raise with a 429, and lowers the bound as a limit that came down would: from
//! Webex's answers the two look the same until the 429s stop. Then only the forgetting ends it,
//! so it is kept short: a minute (`bench/run.sh faults` measures the whole aftermath). Telling
//! them apart sooner means probing a bound that may be real, and every probe that finds it costs
//! a `Retry-After` pause, which Webex may set far longer than a second.
//!
//! What Webex took in the second before the first 429 counts the calls under way at it: an
//! import keeps 31 calls under way, Webex took 200 in its second, and the 30 that had not come
//! back by the 429 taught a pace of 168/s that never came back up (0.84 R, thirteenth sitting).
//! The pace is then kept evenly: a start the engine makes late after waiting for its slot (a
//! late timer, a machine that held the process up) makes up the slots it missed, and no second
//! ever carries more starts than the pace, so that the made-up slots never crowd a second past
//! the limit. Making up only 5 ms lost 5 % of the pace on a loaded machine.
//!
//! Nodes sharing Webex's limit (SPEC §11) each learn from their own answers, and at the first
//! 429 what Webex took from each is rarely an even part of the limit. Each node therefore keeps
//! apart its *share* — the pace its own answers support: learned at the first 429 from what
//! Webex took from it, measured anew at later ones at the pace it kept, raised by its own raises
//! and probes — and the pace it keeps, which it takes up from the average of the nodes' shares
//! ([`Pacer::take_up`]). The nodes then keep together the sum of what Webex took from
//! each. Averaging the paces themselves lost that sum: a node that had taken up the average
//! forgot its own measure, and the calls under way that came back later raised only one side
//! (two nodes kept 0.58–0.99 R, median 0.91 R, fourteenth sitting). Alone, a node's share is
//! its pace.
//!
//! Plain data with the clock passed in: the scheduler owns one and tests drive it directly.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How far back accepted attempts are counted when a 429 arrives: Webex's limits are per second.
const WINDOW: Duration = Duration::from_secs(1);
/// The pace is this share of the rate that was accepted, and at least one attempt per second
/// under it: a margin for the limit's window not lining up with ours, and for the catch-up
/// starts late timers allow.
const HEADROOM: f64 = 0.99;
/// How far behind its slots the pace may fall and still catch up. Timers and a busy scheduler
/// wake the engine late, often by more than one interval at hundreds of attempts per second;
/// starts lost that way are lost for good and the pace falls well below its rate. Catching up
/// on half the headroom's share of the window bunches at most that much into a burst, leaving
/// the other half for windows that do not line up with ours.
const CATCH_UP: Duration = Duration::from_millis(((1.0 - HEADROOM) * 500.0) as u64);
/// How far behind its slots the pace may fall and still catch up when work waited for each
/// slot (the engine slept for the pace and woke late). A loaded machine holds the engine up by
/// 25–60 ms at a time: at 200 attempts per second, catching up on 5 ms lost 5 % of the pace
/// (bench/population.sh, fourteenth sitting). What is made up never puts more starts than the
/// pace into any second (see [`Pacer::wait_until`]); an engine that was idle or paused is owed
/// nothing and keeps to [`CATCH_UP`].
const LATE_CATCH_UP: Duration = Duration::from_millis(100);
/// While paced without a 429 for this long, the pace goes up by [`PROBE_STEP`]. Each probe that
/// finds the limit costs a `Retry-After` pause, so probes are rare.
const PROBE_EVERY: Duration = Duration::from_secs(30);
const PROBE_STEP: f64 = 1.01;
/// No 429 for this long: the limit is gone or far away, so stop pacing (a 429 learns it again,
/// at the cost of one `Retry-After` pause). Short, because a pace taught by a long storm of 429s
/// holds everything back until then; a limit that stays is met again by the probes long before.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// While the pace is this far under the rate to return to, it is raised every
/// [`RETURN_EVERY`], by half the distance, instead of creeping.
const ROOM: f64 = 1.05;
/// How long a raise towards the rate to return to is tried before the next; a 429 within it
/// says the raise went too far.
const RETURN_EVERY: Duration = Duration::from_secs(2);
/// How long the busiest second counts as the rate Webex took "before the first 429". Returning
/// towards a rate from further back (a burst before a limit was set, or long before it was met)
/// costs a 429 and a `Retry-After` pause for every raise that finds the limit instead.
const PEAK_MEMORY: Duration = Duration::from_secs(10);
/// Never slower than this, however few attempts were accepted before a 429.
const MIN_RATE: f64 = 1.0;

#[derive(Debug)]
pub struct Pacer {
    /// Attempts per second; `None` until the first 429.
    rate: Option<f64>,
    /// The pace this node's own answers from Webex support (see the module's notes); set and
    /// dropped with `rate`, and equal to it unless [`Pacer::take_up`] moved the rate.
    share: Option<f64>,
    /// The earliest start of the next attempt.
    next_start: Option<Instant>,
    /// When the pace last changed (a 429 or a probe step).
    changed: Option<Instant>,
    /// The last 429.
    last_429: Option<Instant>,
    /// Ends of attempts Webex accepted within the last [`WINDOW`].
    accepted: VecDeque<Instant>,
    /// Starts within the last [`WINDOW`] while paced.
    starts: VecDeque<Instant>,
    /// The most attempts accepted within one window lately, and when that was last seen: a peak
    /// older than [`PEAK_MEMORY`] gives way to the current count.
    peak: usize,
    peak_seen: Option<Instant>,
    /// The rate to return to: what Webex took before the first 429, lowered by every raise
    /// that drew one.
    target: Option<f64>,
    /// When the pace was last raised towards `target`.
    raised: Option<Instant>,
    /// The 429 that started this pacing, and how many calls Webex took in the second before
    /// it, counting those under way at it that it took (see [`Pacer::accepted`]).
    first_429: Option<Instant>,
    taken: usize,
}

impl Default for Pacer {
    fn default() -> Pacer {
        Pacer::new()
    }
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer {
            rate: None,
            share: None,
            next_start: None,
            changed: None,
            last_429: None,
            accepted: VecDeque::new(),
            starts: VecDeque::new(),
            peak: 0,
            peak_seen: None,
            target: None,
            raised: None,
            first_429: None,
            taken: 0,
        }
    }

    /// Attempts per second as last set, whatever the time: what the tests follow step by step.
    /// The engine asks [`Pacer::in_force`].
    #[cfg(test)]
    fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The pace an attempt starting at `now` would keep: none once [`FORGET_AFTER`] has passed
    /// since the last 429, though the pace is only dropped when the next attempt starts (an idle
    /// engine would otherwise report a pace it no longer keeps).
    pub fn in_force(&self, now: Instant) -> Option<f64> {
        self.rate.filter(|_| !self.forgotten(now))
    }

    /// This node's share while its pace is in force: what it tells the other nodes sharing
    /// Webex's limit.
    pub fn share_in_force(&self, now: Instant) -> Option<f64> {
        self.share.filter(|_| !self.forgotten(now))
    }

    fn forgotten(&self, now: Instant) -> bool {
        self.last_429.is_some_and(|at| now - at >= FORGET_AFTER)
    }

    /// When the next attempt may start, if that is later than `now`: its slot, and never so
    /// soon that more attempts than the pace start within one second. Slots made up after a late
    /// wake-up come in a burst, and a burst on top of a full second of the pace is what a
    /// per-second limit answers 429.
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        self.due().filter(|at| *at > now)
    }

    /// The next slot, or later if the starts of the last second already fill the pace.
    fn due(&self) -> Option<Instant> {
        let per_second = self.rate.map_or(usize::MAX, |rate| (rate as usize).max(1));
        let second_full = self
            .starts
            .len()
            .checked_sub(per_second)
            .and_then(|i| self.starts.get(i))
            .map(|first| *first + WINDOW);
        self.next_start.max(second_full)
    }

    /// An attempt starts now. `waited`: work has waited for the pace without a break since the
    /// engine last slept for it, so a late start is the timer's (or the machine's) lateness, and
    /// the slots it missed are made up (up to [`LATE_CATCH_UP`]).
    pub fn started(&mut self, now: Instant, waited: bool) {
        let Some(rate) = self.rate else {
            return;
        };
        if self.forgotten(now) {
            // What Webex took lately stays: a 429 met at once, the last second paced by the
            // pace just dropped, learns from all of it. Dropped with the rest, it taught the
            // first few calls of the unpaced burst, two per second under a limit of 500.
            *self = Pacer {
                accepted: std::mem::take(&mut self.accepted),
                peak: self.peak,
                peak_seen: self.peak_seen,
                ..Pacer::new()
            };
            return;
        }
        let due = self.due();
        self.starts.push_back(now);
        while self
            .starts
            .front()
            .is_some_and(|first| now.duration_since(*first) >= WINDOW)
        {
            self.starts.pop_front();
        }
        // Only a pace that holds work back is worth probing above: one whose slots are taken as
        // they come. Timers wake the engine a little after a slot, never on it, so "as they
        // come" means within an interval or the catch-up allowance of it (an idle engine comes
        // back long after).
        let tolerance = Duration::from_secs_f64(1.0 / rate).max(CATCH_UP);
        let held_back = due.is_some_and(|at| now.saturating_duration_since(at) < tolerance);
        // Raises and probes move this node's share, and the pace by as much: the rate to
        // return to is what Webex took from this node, so it is its share that returns to it.
        let share = self.share.unwrap_or(rate);
        let target = self.target.filter(|target| *target > share * ROOM);
        let every = if target.is_some() {
            RETURN_EVERY
        } else {
            PROBE_EVERY
        };
        let rate = if held_back && self.changed.is_some_and(|c| now - c >= every) {
            self.changed = Some(now);
            let raised = match target {
                Some(target) => {
                    self.raised = Some(now);
                    (share + target) / 2.0
                }
                None => share * PROBE_STEP,
            };
            self.grow_share(raised);
            self.rate.unwrap_or(rate)
        } else {
            rate
        };
        let interval = Duration::from_secs_f64(1.0 / rate);
        // Counting from the slot rather than the wake-up keeps lateness from adding up; slots
        // missed by more than the catch-up allowance (or one interval, at slow paces) are dropped.
        let allowance = if waited { LATE_CATCH_UP } else { CATCH_UP };
        let earliest = now.checked_sub(interval.max(allowance)).unwrap_or(now);
        let from = self.next_start.map_or(now, |at| at.max(earliest));
        self.next_start = Some(from + interval);
    }

    /// Take up the average of the shares of the nodes sharing Webex's limit (see
    /// `Engine::heed`) as the pace. Only a pace in force is replaced; this node's share stays
    /// what its own answers said, and the moment of the last change is kept: the raises
    /// towards the rate Webex took before go on at their own rhythm.
    pub fn take_up(&mut self, average: f64) {
        if self.rate.is_some() {
            self.rate = Some(average.max(MIN_RATE));
        }
    }

    /// Raise this node's share to `share`, and the pace by as much: until the next look at
    /// the other nodes' shares, the pace keeps the sum the nodes learned plus this raise.
    fn grow_share(&mut self, share: f64) {
        let Some(own) = self.share else {
            return;
        };
        if share > own {
            self.share = Some(share);
            self.rate = self.rate.map(|rate| rate + (share - own));
        }
    }

    /// An attempt given a slot by [`Pacer::started`] made no call after all (its user's work
    /// was done, or held by another node): the slot goes back, so that a pace shared with work
    /// that is not there does not fall below the one learned.
    pub fn skipped(&mut self, now: Instant) {
        let Some(rate) = self.rate else {
            return;
        };
        let interval = Duration::from_secs_f64(1.0 / rate);
        if let Some(at) = self.next_start {
            self.next_start = Some(at.checked_sub(interval).unwrap_or(now).max(now));
        }
        self.starts.pop_back();
    }

    /// Webex accepted an attempt that started at `started`, answering it at `now`. Answers
    /// come to the pacer out of order (each after its own store write), and are kept in order.
    pub fn accepted(&mut self, now: Instant, started: Instant) {
        let at = self.accepted.partition_point(|t| *t <= now);
        self.accepted.insert(at, now);
        self.forget_before(now);
        let count = self.accepted.len();
        if count >= self.peak || !self.peak_is_recent(now) {
            self.peak = count;
            self.peak_seen = Some(now);
        }
        // A call under way when the first 429 came was sent within the second Webex limited,
        // and Webex took it: it counts towards what was taken then, for the pace and the rate
        // to return to alike. Counting only the calls that had come back by the 429 taught
        // 168/s under a limit of 200/s with 31 calls under way, and an import stayed at 0.84 R
        // (bench/population.sh, thirteenth sitting).
        if let Some(first) = self.first_429
            && started < first
            && now.saturating_duration_since(first) < WINDOW
        {
            self.taken += 1;
            let taken = pace_for(self.taken);
            self.grow_share(taken);
            self.target = self.target.map(|target| target.max(taken));
        }
    }

    fn peak_is_recent(&self, now: Instant) -> bool {
        self.peak_seen.is_some_and(|at| now - at <= PEAK_MEMORY)
    }

    /// Webex answered 429: pace at a little under what it accepted in the last second.
    pub fn limited(&mut self, now: Instant) {
        self.forget_before(now);
        if self.rate.is_none() {
            self.first_429 = Some(now);
            self.taken = self.accepted.len();
        }
        let learned = pace_for(self.accepted.len());
        if self.raised.take().is_some_and(|at| now - at < RETURN_EVERY)
            && let Some(share) = self.share
        {
            // The raise went too far: return no higher than this from now on.
            self.target = Some(self.target.map_or(share, |target| target.min(share)));
        }
        if self.target.is_none() {
            let recent = if self.peak_is_recent(now) {
                self.peak
            } else {
                0
            };
            self.target = Some(pace_for(recent.max(self.accepted.len())));
        }
        if let (Some(rate), Some(share)) = (self.rate, self.share) {
            // The share is measured anew below, at the pace this node kept, so the rate to
            // return to moves from this node's own part to that pace too: raising towards a
            // part of an uneven second from the even pace took the pair over the limit again
            // and again (0.79 R, fifteenth sitting). Alone, a node keeps its share: no move.
            self.target = self
                .target
                .map(|target| (target + rate - share).max(MIN_RATE));
        }
        let rate = self.rate.map_or(learned, |rate| rate.min(learned));
        self.rate = Some(rate);
        // Measured anew at the pace this node kept: a share kept from a second in which the
        // nodes took uneven parts (31/s of 98 on one node) stayed when the other node's was
        // measured anew at the even pace, and the pair kept 80/s under a limit of 100/s.
        self.share = Some(rate);
        self.changed = Some(now);
        self.last_429 = Some(now);
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(first) = self.accepted.front() {
            if now.duration_since(*first) > WINDOW {
                self.accepted.pop_front();
            } else {
                break;
            }
        }
    }
}

/// The pace for what Webex accepted within one window: a little under it, and never under one
/// attempt per second.
fn pace_for(accepted: usize) -> f64 {
    let accepted = accepted as f64;
    (accepted * HEADROOM).min(accepted - 1.0).max(MIN_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attempt that Webex answered as soon as it started (no call under way at a 429).
    fn answered_at_once(pacer: &mut Pacer, at: Instant) {
        pacer.accepted(at, at);
    }

    #[test]
    fn a_shared_pace_replaces_one_in_force_only() {
        let now = Instant::now();
        let mut pacer = Pacer::new();
        pacer.take_up(50.0);
        assert_eq!(pacer.rate(), None, "unpaced stays unpaced");
        for i in 0..10 {
            answered_at_once(&mut pacer, now + Duration::from_millis(i * 10));
        }
        pacer.limited(now + Duration::from_millis(100));
        pacer.take_up(40.0);
        assert_eq!(pacer.rate(), Some(40.0));
        pacer.take_up(0.1);
        assert_eq!(pacer.rate(), Some(MIN_RATE));
    }

    /// Two nodes under a limit of 100/s: in the second of the first 429 Webex took 40 calls
    /// from one, 10 of them still under way at the 429, and 60 from the other. Each paces at
    /// the average of the shares and keeps its own share to tell the other, so the calls that
    /// come back after the average was taken up still count: the pair keeps 98/s. Averaging
    /// the paces kept 88 (29 and 59 averaged, and the 10 calls raised 44 to no more than 39).
    #[test]
    fn a_node_keeps_its_share_apart_from_the_average_pace_it_takes_up() {
        let t0 = Instant::now();
        let at = t0 + Duration::from_millis(500);
        let (mut a, mut b) = (Pacer::new(), Pacer::new());
        for i in 0..30 {
            answered_at_once(&mut a, t0 + Duration::from_millis(i * 10));
        }
        for i in 0..60 {
            answered_at_once(&mut b, t0 + Duration::from_millis(i * 8));
        }
        a.limited(at);
        b.limited(at);
        let average = |a: &Pacer, b: &Pacer| {
            (a.share_in_force(at).unwrap() + b.share_in_force(at).unwrap()) / 2.0
        };
        let shared = average(&a, &b);
        a.take_up(shared);
        b.take_up(shared);
        assert_eq!(a.share_in_force(at), Some(pace_for(30)));
        assert_eq!(b.share_in_force(at), Some(pace_for(60)));
        for i in 0..10 {
            a.accepted(
                at + Duration::from_millis(1 + i),
                at - Duration::from_millis(5),
            );
        }
        assert_eq!(a.share_in_force(at), Some(pace_for(40)));
        let shared = average(&a, &b);
        a.take_up(shared);
        b.take_up(shared);
        let together = a.rate().unwrap() + b.rate().unwrap();
        assert_eq!(together, pace_for(40) + pace_for(60));
        // A raise moves the share, and the pace by as much.
        let (rate, share) = (a.rate().unwrap(), a.share_in_force(at).unwrap());
        a.grow_share(share + 2.0);
        assert_eq!(
            (a.rate(), a.share_in_force(at)),
            (Some(rate + 2.0), Some(share + 2.0))
        );
        // A later 429, both nodes at the even pace: each share is measured anew there, not
        // kept from the uneven second.
        let later = at + Duration::from_secs(3);
        a.take_up(49.0);
        for i in 0..50 {
            answered_at_once(&mut a, later - Duration::from_millis(990 - i * 19));
        }
        let (rate, share, target) = (a.rate().unwrap(), a.share.unwrap(), a.target.unwrap());
        a.limited(later);
        assert_eq!(a.share_in_force(later), Some(pace_for(50)));
        // And the rate to return to moves with it, from this node's part to the even pace.
        assert_eq!(a.target, Some(target + rate - share));
    }

    #[test]
    fn a_skipped_start_gives_its_slot_back_but_never_a_slot_in_the_past() {
        let now = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..10 {
            answered_at_once(&mut pacer, now + Duration::from_millis(i * 10));
        }
        pacer.limited(now + Duration::from_millis(100));
        let rate = pacer.rate().unwrap();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let t = now + Duration::from_millis(200);
        pacer.started(t, false);
        pacer.started(t, false);
        let second_slot = pacer.wait_until(t).unwrap();
        pacer.skipped(t);
        assert_eq!(pacer.wait_until(t), Some(second_slot - interval));
        pacer.skipped(t);
        pacer.skipped(t);
        assert_eq!(pacer.wait_until(t), None, "no slot before now");
        let mut unpaced = Pacer::new();
        unpaced.skipped(t);
        assert_eq!(unpaced.wait_until(t), None);
    }

    #[test]
    fn unpaced_until_the_first_429() {
        let now = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..1000 {
            pacer.started(now + Duration::from_micros(i), false);
        }
        assert_eq!(pacer.rate(), None);
        assert_eq!(pacer.wait_until(now), None);
    }

    #[test]
    fn a_429_paces_at_a_little_under_what_was_accepted_in_the_last_second() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        // 30 accepted long ago (forgotten), then 50 within the last second.
        for i in 0..30 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i));
        }
        let t1 = t0 + Duration::from_secs(5);
        for i in 0..50 {
            answered_at_once(&mut pacer, t1 + Duration::from_millis(i * 10));
        }
        let at = t1 + Duration::from_millis(600);
        pacer.limited(at);
        assert_eq!(pacer.rate(), Some(49.0));
        // Starts are spaced 1/49 s apart, from the first one on.
        pacer.started(at, false);
        let next = pacer.wait_until(at).unwrap();
        assert_eq!(next - at, Duration::from_secs_f64(1.0 / 49.0));
        pacer.started(next, true);
        assert_eq!(
            pacer.wait_until(next).unwrap() - next,
            Duration::from_secs_f64(1.0 / 49.0)
        );
    }

    #[test]
    fn late_wake_ups_do_not_slow_the_pace() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..100 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i * 9));
        }
        pacer.limited(t0 + Duration::from_millis(900));
        assert_eq!(pacer.rate(), Some(99.0));
        // Every wake-up comes 2 ms after its slot (a fifth of the interval).
        let mut now = t0 + Duration::from_secs(1);
        pacer.started(now, false);
        for _ in 0..99 {
            now = pacer.wait_until(now).unwrap() + Duration::from_millis(2);
            pacer.started(now, true);
        }
        let elapsed = now - (t0 + Duration::from_secs(1));
        assert!(elapsed < Duration::from_millis(1010), "{elapsed:?}");
        // Long idle: one start may catch up, the next waits a whole interval (at this pace an
        // interval is longer than the catch-up allowance).
        let later = now + Duration::from_secs(5);
        pacer.started(later, false);
        pacer.started(later, false);
        assert_eq!(
            pacer.wait_until(later).unwrap() - later,
            Duration::from_secs_f64(1.0 / 99.0)
        );
    }

    /// At a thousand attempts per second the interval (1 ms) is shorter than a timer's
    /// lateness. The pace must still be reached, and no second may carry more than the rate the
    /// 429 taught plus the headroom.
    #[test]
    fn wake_ups_later_than_an_interval_still_reach_the_pace_without_overshooting() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..1000 {
            answered_at_once(&mut pacer, t0 + Duration::from_micros(i * 900));
        }
        let at = t0 + Duration::from_millis(920);
        pacer.limited(at);
        let rate = pacer.rate().unwrap();
        assert_eq!(rate, 990.0);
        // The engine wakes 1–4 ms after each slot, and starts everything the pace allows then.
        let mut starts = Vec::new();
        let mut now = at;
        let end = at + Duration::from_secs(10);
        let mut late = 1;
        while now < end {
            while pacer.wait_until(now).is_none() {
                pacer.started(now, true);
                starts.push(now);
            }
            now = pacer.wait_until(now).unwrap() + Duration::from_millis(late);
            late = late % 4 + 1;
        }
        let per_second = starts.len() as f64 / 10.0;
        assert!(per_second > rate * 0.99, "{per_second} of {rate}");
        let most_in_a_second = most_within_a_second(&starts);
        // The pace plus one catch-up burst, under the 1,000 Webex accepted.
        let bound = rate * (1.0 + CATCH_UP.as_secs_f64()) + 1.0;
        assert!(
            most_in_a_second as f64 <= bound && bound < 1000.0,
            "{most_in_a_second} starts within one second at a pace of {rate}"
        );
    }

    /// The most starts that fall within any one second (Webex's limits are per second).
    fn most_within_a_second(starts: &[Instant]) -> usize {
        starts
            .iter()
            .enumerate()
            .map(|(i, from)| {
                starts[i..]
                    .iter()
                    .take_while(|t| **t - *from < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// `bench/population.sh` on a loaded machine: the engine, busy, wakes 1 ms after most slots
    /// but 40 ms after some. The slots missed while work waited are made up, and still no
    /// second carries more starts than the pace.
    #[test]
    fn slots_missed_while_work_waited_are_made_up_within_the_pace_per_second() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..200 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i * 4));
        }
        let at = t0 + Duration::from_millis(800);
        pacer.limited(at);
        let rate = pacer.rate().unwrap();
        let mut starts = Vec::new();
        let mut now = at + Duration::from_secs(1);
        let end = now + Duration::from_secs(10);
        while now < end {
            match pacer.wait_until(now) {
                Some(slot) => {
                    let stalled = starts.len() % 100 == 99;
                    now = slot + Duration::from_millis(if stalled { 40 } else { 1 });
                }
                None => {
                    pacer.started(now, true);
                    starts.push(now);
                }
            }
        }
        let per_second = starts.len() as f64 / 10.0;
        assert!(per_second >= rate * 0.99, "{per_second} of {rate}");
        let most_in_a_second = most_within_a_second(&starts);
        assert!(
            most_in_a_second as f64 <= rate,
            "{most_in_a_second} starts within one second at a pace of {rate}"
        );
    }

    /// A minute after the last 429 the pace is dropped; under a limit that stays, the unpaced
    /// burst meets it at once, and the 429 learns from the second paced just before.
    #[test]
    fn a_429_just_after_the_pace_was_dropped_learns_from_the_paced_second_before_it() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..100 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i * 9));
        }
        pacer.limited(t0 + Duration::from_millis(900));
        let rate = pacer.rate().unwrap();
        let mut now = t0 + Duration::from_millis(59_900);
        while now < t0 + Duration::from_millis(60_900) {
            answered_at_once(&mut pacer, now);
            now += Duration::from_secs_f64(1.0 / rate);
        }
        pacer.started(now, false);
        assert_eq!(pacer.rate(), None, "dropped a minute after the 429");
        answered_at_once(&mut pacer, now);
        pacer.limited(now + Duration::from_millis(1));
        let relearned = pacer.rate().unwrap();
        assert!(relearned >= rate * 0.95, "{relearned} after {rate}");
    }

    #[test]
    fn a_second_429_never_raises_the_pace_and_nothing_accepted_still_leaves_a_floor() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..20 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i));
        }
        pacer.limited(t0 + Duration::from_millis(100));
        let first = pacer.rate().unwrap();
        for i in 0..40 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(200 + i));
        }
        pacer.limited(t0 + Duration::from_millis(300));
        assert_eq!(pacer.rate(), Some(first));
        pacer.limited(t0 + Duration::from_secs(10));
        assert_eq!(pacer.rate(), Some(MIN_RATE));
    }

    /// Webex and a busy engine: attempts are offered at `demand` per second and started when
    /// the pace allows; Webex takes one when `takes(now, accepted so far)` says so, else answers
    /// 429 and everything pauses for a one-second `Retry-After`, as the engine does. Returns
    /// when each accepted attempt started, and how many 429s there were.
    fn simulate(
        pacer: &mut Pacer,
        from: Instant,
        to: Instant,
        demand: f64,
        takes: impl Fn(Instant, &[Instant]) -> bool,
    ) -> (Vec<Instant>, usize) {
        let gap = Duration::from_secs_f64(1.0 / demand);
        let (mut accepted, mut limited) = (Vec::<Instant>::new(), 0);
        let mut now = from;
        let (mut late, mut waited) = (1, false);
        while now < to {
            if let Some(at) = pacer.wait_until(now) {
                // The engine's timer wakes it 1–4 ms after the slot.
                now = at + Duration::from_millis(late);
                late = late % 4 + 1;
                waited = true;
                continue;
            }
            pacer.started(now, waited);
            if takes(now, &accepted) {
                pacer.accepted(now, now);
                accepted.push(now);
                now += gap;
            } else {
                pacer.limited(now);
                limited += 1;
                now += Duration::from_secs(1);
                waited = false;
            }
        }
        (accepted, limited)
    }

    /// A limit of `limit(now)` calls within any second.
    fn sliding(limit: impl Fn(Instant) -> usize) -> impl Fn(Instant, &[Instant]) -> bool {
        move |now, accepted| {
            let in_window = accepted
                .iter()
                .rev()
                .take_while(|t| now - **t < Duration::from_secs(1))
                .count();
            in_window < limit(now)
        }
    }

    fn between(accepted: &[Instant], from: Instant, to: Instant) -> usize {
        accepted.iter().filter(|t| **t >= from && **t < to).count()
    }

    #[test]
    fn after_a_short_storm_of_429s_the_pace_returns_to_the_rate_taken_before_it() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut pacer = Pacer::new();
        // 500/s taken for 5 s, then for 3 s one per second, then no limit again.
        let storm = sliding(|now| {
            if now >= at(5) && now < at(8) {
                1
            } else {
                usize::MAX
            }
        });
        let (accepted, _) = simulate(&mut pacer, t0, at(30), 500.0, storm);
        let rate = pacer.rate().unwrap();
        assert!(rate > 450.0 && rate <= 500.0, "paced at {rate}");
        let last_10_s = between(&accepted, at(20), at(30));
        assert!(last_10_s >= 4500, "{last_10_s} accepted in the last 10 s");
    }

    /// `bench/run.sh faults`: for 20 s Webex takes one call in every other second (counted from
    /// the start of that second, as its own window is) and anything in between. Each raise
    /// between the limited seconds draws a 429 from the next one and lowers the bound the pace
    /// returns to, as a limit that came down for good would: the pace cannot tell the two apart
    /// until the 429s stop, so it stays low until it is dropped a minute after the last one.
    #[test]
    fn after_a_long_storm_of_alternating_429s_pacing_stops_a_minute_after_the_last() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let limited_second = |now: Instant| {
            let second = (now - t0).as_secs();
            ((5..25).contains(&second) && second % 2 == 1).then(|| at(second))
        };
        let storm = |now: Instant, accepted: &[Instant]| match limited_second(now) {
            Some(since) => accepted.iter().rev().take_while(|t| **t >= since).count() < 1,
            None => true,
        };
        let mut pacer = Pacer::new();
        let (_, storm_429s) = simulate(&mut pacer, t0, at(25), 500.0, storm);
        assert!(storm_429s >= 5, "{storm_429s} 429s in the storm");
        let (accepted, after) = simulate(&mut pacer, at(25), at(100), 500.0, storm);
        assert_eq!(after, 0, "no 429 once the storm has passed");
        assert_eq!(
            pacer.rate(),
            None,
            "pacing stopped a minute after the storm"
        );
        let last_10_s = between(&accepted, at(90), at(100));
        assert!(last_10_s >= 4900, "{last_10_s} accepted in the last 10 s");
    }

    /// `bench/population.sh`: 31 calls under way when the 201st call of Webex's second is
    /// answered 429. Webex took 200 in that second, though only 170 had come back by the 429.
    #[test]
    fn calls_under_way_at_the_first_429_count_towards_the_pace() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..170 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i));
        }
        let at = t0 + Duration::from_millis(200);
        pacer.limited(at);
        assert_eq!(pacer.rate(), Some(pace_for(170)));
        for i in 0..30 {
            pacer.accepted(
                at + Duration::from_millis(1 + i),
                at - Duration::from_millis(10),
            );
        }
        assert_eq!(pacer.rate(), Some(pace_for(200)));
        assert_eq!(pacer.target, Some(pace_for(200)));
        // Calls started after the 429, and calls under way at a later one, say nothing more of
        // that second.
        pacer.accepted(
            at + Duration::from_millis(500),
            at + Duration::from_millis(400),
        );
        assert_eq!(pacer.rate(), Some(pace_for(200)));
        let later = at + Duration::from_millis(1200);
        pacer.limited(later);
        let rate = pacer.rate().unwrap();
        pacer.accepted(
            later + Duration::from_millis(5),
            later - Duration::from_millis(5),
        );
        assert_eq!(pacer.rate(), Some(rate));
    }

    #[test]
    fn a_limit_that_came_down_for_good_is_found_in_a_few_raises() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut pacer = Pacer::new();
        // 2,000/s taken for 5 s, then a limit of 500/s for two minutes.
        let limit = |now: Instant| if now < at(5) { usize::MAX } else { 500 };
        let limit = sliding(limit);
        let (_, settling) = simulate(&mut pacer, t0, at(35), 2000.0, &limit);
        assert!(settling <= 12, "{settling} 429s while the pace settled");
        let (accepted, later) = simulate(&mut pacer, at(35), at(125), 2000.0, limit);
        assert!(later <= 4, "{later} 429s in the 90 s after");
        let delivered = between(&accepted, at(35), at(125));
        assert!(
            delivered >= 90 * 450,
            "{delivered} accepted in 90 s under 500/s"
        );
    }

    /// `bench/run.sh`'s limit scenario: the same process ran flat out (and unlimited) before a
    /// limit was met. What it took then says nothing of what Webex takes now, so the pace is not
    /// raised towards it; each raise would cost a 429 and a `Retry-After` pause.
    #[test]
    fn a_limit_met_long_after_a_faster_burst_is_not_raised_towards_the_burst() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut pacer = Pacer::new();
        simulate(&mut pacer, t0, at(5), 2000.0, sliding(|_| usize::MAX));
        let limit = sliding(|_| 500);
        let (accepted, limited) = simulate(&mut pacer, at(60), at(80), 1000.0, limit);
        assert!(limited <= 2, "{limited} 429s under a steady limit");
        let delivered = between(&accepted, at(60), at(80));
        assert!(
            delivered >= 20 * 475,
            "{delivered} accepted in 20 s under 500/s"
        );
    }

    #[test]
    fn a_pace_that_holds_work_back_creeps_up_without_429s() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new();
        for i in 0..10 {
            answered_at_once(&mut pacer, t0 + Duration::from_millis(i));
        }
        pacer.limited(t0 + Duration::from_millis(10));
        let learned = pacer.rate().unwrap();
        // Always busy: each attempt starts as soon as the pace allows, for 55 s.
        let mut now = t0 + Duration::from_millis(10);
        pacer.started(now, false);
        while now < t0 + Duration::from_secs(55) {
            now = pacer.wait_until(now).unwrap();
            pacer.started(now, true);
        }
        let raised = pacer.rate().unwrap();
        assert!(
            raised > learned * 1.005 && raised < learned * 1.015,
            "{learned} -> {raised}"
        );
        // Idle for a while: no evidence, no probing.
        let idle = now + Duration::from_secs(4);
        pacer.started(idle, false);
        assert_eq!(pacer.rate(), Some(raised));
        // A minute after the last 429 the pace is no longer in force, and the next start drops it.
        assert_eq!(pacer.in_force(t0 + Duration::from_secs(59)), Some(raised));
        assert_eq!(pacer.in_force(t0 + Duration::from_secs(61)), None);
        pacer.started(t0 + Duration::from_secs(61), false);
        assert_eq!(pacer.rate(), None);
        assert_eq!(pacer.wait_until(t0 + Duration::from_secs(61)), None);
    }
}
