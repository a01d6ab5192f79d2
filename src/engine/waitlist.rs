//! Bookkeeping of calls that wait for capacity instead of being denied: who
//! waits on which counters, in what order, and when each is next worth
//! deciding again. Pure: no I/O, no clock reads, no locks; the async driver
//! ([`crate::waiting`]) owns one behind a mutex and re-decides the calls it
//! names through the engine.
//!
//! Order: strict priority per counter (critical, high, normal, low), first
//! come first served within a priority. A pass tries waiters in that order and
//! stops, per counter, at the first waiter that still does not fit: a smaller
//! call behind it does not overtake it on that counter, so a lower priority
//! only goes when nobody above it on the same counter is waiting.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::types::CounterKey;
use crate::clock::Millis;
use crate::engine::policy::Priority;

/// What may have capacity again, reported by the engine after it applied a
/// change (a refund, reset, credit, a subject's plan or deletion, a reload).
#[derive(Debug, Clone, Copy)]
pub enum Freed<'a> {
    /// One counter.
    Counter(&'a CounterKey),
    /// Every counter of a subject (its plan or overrides changed, or it was deleted).
    Subject(&'a str),
    /// Everything (limits were reloaded).
    All,
}

/// What the engine asks of whoever keeps waiters. Implementations must be
/// cheap and must not call back into the engine: these run with shard locks held.
pub trait WaitHooks: Send + Sync {
    /// Whether any call waits: checked first, so traffic with no waiter pays
    /// one atomic load.
    fn active(&self) -> bool;
    /// When calls of `priority` or above wait on `key`: milliseconds until the
    /// first of them is next decided. A new call does not take capacity they
    /// wait for.
    fn ahead(&self, key: &CounterKey, priority: Priority, now_ms: Millis) -> Option<u64>;
    /// Capacity may have come back.
    fn freed(&self, what: Freed<'_>);
}

/// Why a call could not be parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `engine.max_waiters` or `engine.max_waiters_per_subject` calls wait.
    QueueFull(&'static str),
    /// A call with this idempotency key is already waiting.
    InProgress,
}

/// Where a waiter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Parked until capacity returns.
    Waiting,
    /// Being decided again by the driver right now.
    Deciding,
}

/// One parked call.
#[derive(Debug)]
pub struct Waiter<P> {
    /// Who goes first.
    pub priority: Priority,
    /// Its subject, for the per-subject cap and subject-wide wakes.
    pub subject: Arc<str>,
    /// The counters that denied it last.
    pub keys: Vec<CounterKey>,
    /// Its idempotency key, for `request_in_progress`.
    pub idempotency_key: Option<String>,
    /// When time alone may let it pass (refill, window end, ageing out).
    pub retry_at_ms: Millis,
    /// Waiting or being decided.
    pub stage: Stage,
    /// What the driver needs to decide it again and answer it.
    pub payload: P,
}

/// Order key: higher priority first, then arrival.
type Rank = (Reverse<Priority>, u64);

/// The waiting calls.
#[derive(Debug)]
pub struct WaitList<P> {
    /// Waiters by id (ids are arrival numbers).
    waiters: HashMap<u64, Waiter<P>>,
    /// Next id.
    next_id: u64,
    /// Per counter, its waiters in order.
    by_key: HashMap<CounterKey, BTreeSet<Rank>>,
    /// Waiters per subject.
    by_subject: HashMap<Arc<str>, usize>,
    /// Idempotency keys of waiting calls.
    idempotency: HashMap<String, u64>,
    /// (retry time, id) of every waiter.
    timers: BTreeSet<(Millis, u64)>,
    /// Counters whose capacity came back since the last pass.
    dirty: HashSet<CounterKey>,
    /// Subjects whose plan or state changed since the last pass.
    dirty_subjects: HashSet<Arc<str>>,
    /// Limits were reloaded since the last pass.
    dirty_all: bool,
    /// Waiters per priority, lowest first (for metrics).
    depth: [usize; 4],
    /// At most this many waiters.
    max: usize,
    /// At most this many per subject.
    max_per_subject: usize,
}

fn priority_index(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

impl<P> WaitList<P> {
    /// An empty list with its bounds.
    pub fn new(max: usize, max_per_subject: usize) -> Self {
        WaitList {
            waiters: HashMap::new(),
            next_id: 1,
            by_key: HashMap::new(),
            by_subject: HashMap::new(),
            idempotency: HashMap::new(),
            timers: BTreeSet::new(),
            dirty: HashSet::new(),
            dirty_subjects: HashSet::new(),
            dirty_all: false,
            depth: [0; 4],
            max,
            max_per_subject,
        }
    }

    /// Changes the bounds (reload); waiters already parked stay.
    pub fn set_bounds(&mut self, max: usize, max_per_subject: usize) {
        self.max = max;
        self.max_per_subject = max_per_subject;
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Waiters per priority: low, normal, high, critical.
    pub fn depth(&self) -> [usize; 4] {
        self.depth
    }

    /// Whether a call with this idempotency key waits.
    pub fn in_progress(&self, key: &str) -> bool {
        self.idempotency.contains_key(key)
    }

    /// Parks a call. Its counters are marked changed, so the next pass decides
    /// it again at once: capacity that came back between its denial and now
    /// is not missed.
    pub fn park(&mut self, mut w: Waiter<P>) -> Result<u64, Refusal> {
        if let Some(k) = &w.idempotency_key {
            if self.idempotency.contains_key(k) {
                return Err(Refusal::InProgress);
            }
        }
        if self.waiters.len() >= self.max {
            return Err(Refusal::QueueFull("engine.max_waiters"));
        }
        if self.by_subject.get(&w.subject).copied().unwrap_or(0) >= self.max_per_subject {
            return Err(Refusal::QueueFull("engine.max_waiters_per_subject"));
        }
        let id = self.next_id;
        self.next_id += 1;
        w.stage = Stage::Waiting;
        let rank = (Reverse(w.priority), id);
        for k in &w.keys {
            self.by_key.entry(k.clone()).or_default().insert(rank);
            self.dirty.insert(k.clone());
        }
        *self.by_subject.entry(w.subject.clone()).or_default() += 1;
        if let Some(k) = &w.idempotency_key {
            self.idempotency.insert(k.clone(), id);
        }
        self.timers.insert((w.retry_at_ms, id));
        self.depth[priority_index(w.priority)] += 1;
        self.waiters.insert(id, w);
        Ok(id)
    }

    /// The waiter, if still parked.
    pub fn get(&self, id: u64) -> Option<&Waiter<P>> {
        self.waiters.get(&id)
    }

    /// The waiter's payload and stage, to change them in place.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Waiter<P>> {
        self.waiters.get_mut(&id)
    }

    /// Marks a waiter as being decided; `None` if it is gone.
    pub fn begin_deciding(&mut self, id: u64) -> Option<&Waiter<P>> {
        let w = self.waiters.get_mut(&id)?;
        w.stage = Stage::Deciding;
        Some(w)
    }

    /// A waiter that is still denied: the counters that denied it now, and
    /// when time alone may let it pass. It keeps its place in line.
    pub fn still_waiting(&mut self, id: u64, keys: Vec<CounterKey>, retry_at_ms: Millis) {
        let Some(w) = self.waiters.get_mut(&id) else {
            return;
        };
        let rank = (Reverse(w.priority), id);
        for k in &w.keys {
            remove_rank(&mut self.by_key, k, &rank);
        }
        for k in &keys {
            self.by_key.entry(k.clone()).or_default().insert(rank);
        }
        self.timers.remove(&(w.retry_at_ms, id));
        self.timers.insert((retry_at_ms, id));
        w.keys = keys;
        w.retry_at_ms = retry_at_ms;
        w.stage = Stage::Waiting;
    }

    /// Takes a waiter out of the list (admitted, given up, or its caller left).
    pub fn remove(&mut self, id: u64) -> Option<Waiter<P>> {
        let w = self.waiters.remove(&id)?;
        let rank = (Reverse(w.priority), id);
        for k in &w.keys {
            remove_rank(&mut self.by_key, k, &rank);
        }
        if let Some(n) = self.by_subject.get_mut(&w.subject) {
            *n -= 1;
            if *n == 0 {
                self.by_subject.remove(&w.subject);
            }
        }
        if let Some(k) = &w.idempotency_key {
            self.idempotency.remove(k);
        }
        self.timers.remove(&(w.retry_at_ms, id));
        self.depth[priority_index(w.priority)] -= 1;
        Some(w)
    }

    /// Takes every waiter out (shutdown).
    pub fn drain(&mut self) -> Vec<Waiter<P>> {
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// See [`WaitHooks::ahead`].
    pub fn ahead(&self, key: &CounterKey, priority: Priority, now_ms: Millis) -> Option<u64> {
        let (Reverse(p), id) = *self.by_key.get(key)?.first()?;
        if p < priority {
            return None;
        }
        let retry = self.waiters.get(&id).map_or(now_ms, |w| w.retry_at_ms);
        Some(retry.saturating_sub(now_ms).max(1))
    }

    /// See [`WaitHooks::freed`].
    pub fn freed(&mut self, what: Freed<'_>) {
        match what {
            Freed::Counter(k) => {
                if self.by_key.contains_key(k) {
                    self.dirty.insert(k.clone());
                }
            }
            Freed::Subject(s) => {
                if self.by_subject.contains_key(s) {
                    self.dirty_subjects.insert(s.into());
                }
            }
            Freed::All => self.dirty_all = !self.waiters.is_empty(),
        }
    }

    /// Whether a pass has anything to do before the next timer.
    pub fn has_dirty(&self) -> bool {
        self.dirty_all || !self.dirty.is_empty() || !self.dirty_subjects.is_empty()
    }

    /// The earliest time a waiter is due by time alone.
    pub fn next_due(&self) -> Option<Millis> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// The waiters to decide again at `now_ms`, in the order to try them:
    /// every waiter on a counter that changed or whose waiter is due, and
    /// (so that nobody is overtaken) every waiter sharing a counter with one
    /// of those. Clears what changed.
    pub fn pass(&mut self, now_ms: Millis) -> Vec<u64> {
        let mut keys: HashSet<CounterKey> = std::mem::take(&mut self.dirty);
        let mut seeds: Vec<u64> = self
            .timers
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .map(|(_, id)| *id)
            .collect();
        if std::mem::take(&mut self.dirty_all) {
            seeds.extend(self.waiters.keys().copied());
        }
        let subjects = std::mem::take(&mut self.dirty_subjects);
        if !subjects.is_empty() {
            seeds.extend(
                self.waiters
                    .iter()
                    .filter(|(_, w)| subjects.contains(&w.subject))
                    .map(|(id, _)| *id),
            );
        }
        let mut chosen: HashSet<u64> = HashSet::new();
        let mut queue: Vec<u64> = seeds;
        for k in &keys {
            queue.extend(self.by_key.get(k).into_iter().flatten().map(|(_, id)| *id));
        }
        // Closure over shared counters: a waiter's other counters bring in
        // the waiters there, who may be ahead of it.
        while let Some(id) = queue.pop() {
            if !chosen.insert(id) {
                continue;
            }
            let Some(w) = self.waiters.get(&id) else { continue };
            for k in &w.keys {
                if keys.insert(k.clone()) {
                    queue.extend(self.by_key.get(k).into_iter().flatten().map(|(_, id)| *id));
                }
            }
        }
        let mut order: Vec<Rank> = chosen
            .into_iter()
            .filter_map(|id| self.waiters.get(&id).map(|w| (Reverse(w.priority), id)))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, id)| id).collect()
    }
}

fn remove_rank(by_key: &mut HashMap<CounterKey, BTreeSet<Rank>>, k: &CounterKey, rank: &Rank) {
    if let Some(set) = by_key.get_mut(k) {
        set.remove(rank);
        if set.is_empty() {
            by_key.remove(k);
        }
    }
}

/// Tracks, during one pass, the counters a waiter ahead is still stuck on:
/// a waiter behind it on any of them is not tried in this pass.
#[derive(Debug, Default)]
pub struct Blocked(HashSet<CounterKey>);

impl Blocked {
    /// Whether the waiter with these counters must let someone ahead go first.
    pub fn blocks(&self, keys: &[CounterKey]) -> bool {
        keys.iter().any(|k| self.0.contains(k))
    }

    /// A waiter that stays: the ones behind it on these counters wait too.
    pub fn add(&mut self, keys: &[CounterKey]) {
        self.0.extend(keys.iter().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ScopeKey;

    fn key(name: &str) -> CounterKey {
        CounterKey {
            limit: name.into(),
            scope: ScopeKey::Global,
        }
    }

    fn waiter(p: Priority, subject: &str, keys: &[&str], retry: Millis, idem: Option<&str>) -> Waiter<()> {
        Waiter {
            priority: p,
            subject: subject.into(),
            keys: keys.iter().map(|k| key(k)).collect(),
            idempotency_key: idem.map(String::from),
            retry_at_ms: retry,
            stage: Stage::Waiting,
            payload: (),
        }
    }

    #[test]
    fn a_pass_orders_by_priority_then_arrival() {
        let mut l = WaitList::new(10, 10);
        let a = l.park(waiter(Priority::Normal, "s1", &["k"], 100, None)).unwrap();
        let b = l.park(waiter(Priority::Low, "s2", &["k"], 100, None)).unwrap();
        let c = l.park(waiter(Priority::Critical, "s3", &["k"], 100, None)).unwrap();
        let d = l.park(waiter(Priority::Normal, "s4", &["k"], 100, None)).unwrap();
        assert_eq!(l.pass(0), vec![c, a, d, b]);
        assert_eq!(l.depth(), [1, 2, 0, 1]);
    }

    #[test]
    fn only_changed_or_due_counters_and_those_sharing_them_are_tried() {
        let mut l = WaitList::new(10, 10);
        let a = l.park(waiter(Priority::Normal, "s", &["x"], 500, None)).unwrap();
        let b = l.park(waiter(Priority::Normal, "s", &["y", "z"], 500, None)).unwrap();
        let c = l.park(waiter(Priority::High, "t", &["z"], 900, None)).unwrap();
        assert_eq!(l.pass(0).len(), 3, "parking marks their counters changed");
        assert!(l.pass(0).is_empty(), "nothing changed, nothing due");
        l.freed(Freed::Counter(&key("y")));
        // y brings in b; b's other counter z brings in c, who is ahead of it there.
        assert_eq!(l.pass(0), vec![c, b]);
        assert_eq!(l.pass(499), Vec::<u64>::new());
        assert_eq!(l.pass(500), vec![c, a, b], "a and b are due; c shares z with b");
        l.freed(Freed::Counter(&key("unwatched")));
        assert!(!l.has_dirty(), "a counter nobody waits on is not noted");
    }

    #[test]
    fn subject_and_reload_wakes() {
        let mut l = WaitList::new(10, 10);
        let a = l.park(waiter(Priority::Normal, "s", &["x"], 500, None)).unwrap();
        let b = l.park(waiter(Priority::Normal, "t", &["y"], 500, None)).unwrap();
        l.pass(0);
        l.freed(Freed::Subject("t"));
        assert_eq!(l.pass(0), vec![b]);
        l.freed(Freed::All);
        assert_eq!(l.pass(0), vec![a, b]);
    }

    #[test]
    fn bounds_and_duplicate_keys() {
        let mut l = WaitList::new(3, 2);
        l.park(waiter(Priority::Normal, "s", &["x"], 1, Some("k1"))).unwrap();
        assert_eq!(
            l.park(waiter(Priority::Normal, "t", &["x"], 1, Some("k1"))),
            Err(Refusal::InProgress)
        );
        l.park(waiter(Priority::Normal, "s", &["x"], 1, None)).unwrap();
        assert_eq!(
            l.park(waiter(Priority::Normal, "s", &["x"], 1, None)),
            Err(Refusal::QueueFull("engine.max_waiters_per_subject"))
        );
        let id = l.park(waiter(Priority::Normal, "t", &["x"], 1, None)).unwrap();
        assert_eq!(
            l.park(waiter(Priority::Normal, "u", &["x"], 1, None)),
            Err(Refusal::QueueFull("engine.max_waiters"))
        );
        l.remove(id).unwrap();
        assert!(l.in_progress("k1"));
        assert_eq!(l.drain().len(), 2);
        assert!(l.is_empty() && !l.in_progress("k1"));
        assert_eq!(l.depth(), [0; 4]);
        assert!(l.by_key.is_empty() && l.by_subject.is_empty() && l.timers.is_empty());
    }

    #[test]
    fn ahead_sees_only_equal_or_higher_priority() {
        let mut l = WaitList::new(10, 10);
        l.park(waiter(Priority::High, "s", &["x"], 250, None)).unwrap();
        assert_eq!(l.ahead(&key("x"), Priority::Normal, 100), Some(150));
        assert_eq!(l.ahead(&key("x"), Priority::High, 100), Some(150));
        assert_eq!(l.ahead(&key("x"), Priority::Critical, 100), None);
        assert_eq!(l.ahead(&key("y"), Priority::Low, 100), None);
        assert_eq!(l.ahead(&key("x"), Priority::Low, 300), Some(1), "never a zero wait");
    }

    #[test]
    fn a_still_denied_waiter_keeps_its_place_and_moves_counters() {
        let mut l = WaitList::new(10, 10);
        let a = l.park(waiter(Priority::Normal, "s", &["x"], 100, None)).unwrap();
        let b = l.park(waiter(Priority::Normal, "s", &["x"], 100, None)).unwrap();
        l.pass(0);
        l.begin_deciding(a);
        assert_eq!(l.get(a).unwrap().stage, Stage::Deciding);
        l.still_waiting(a, vec![key("y")], 300);
        assert_eq!(l.get(a).unwrap().stage, Stage::Waiting);
        assert_eq!(l.next_due(), Some(100));
        l.freed(Freed::Counter(&key("y")));
        assert_eq!(l.pass(0), vec![a]);
        l.freed(Freed::Counter(&key("x")));
        assert_eq!(l.pass(0), vec![b]);
        let mut blocked = Blocked::default();
        blocked.add(&[key("x")]);
        assert!(blocked.blocks(&[key("y"), key("x")]));
        assert!(!blocked.blocks(&[key("y")]));
    }
}
