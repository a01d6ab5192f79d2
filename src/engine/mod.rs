//! The quota engine: decides and applies usage against sharded in-memory state.
//!
//! It is pure: no I/O and no clock reads. Every
//! operation takes `now_ms`, locks the shards it needs in ascending index order
//! (so operations touching a subject and a global counter cannot deadlock),
//! decides, turns the decision into [`Mutation`]s, hands them to the journal and
//! only then applies them. A journal failure therefore leaves state untouched.

mod admin;
mod counter;
pub mod dimensions;
mod packed;
pub mod policy;
mod policy_change;
mod pricing;
mod replicated;
mod reservations;
pub mod signals;
mod state;
mod watch;

mod types;
pub mod waitlist;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use admin::StateDigest;
pub use counter::{evaluate, slot_for, Counter, Usage, Verdict};
pub use packed::PackedAnswer;
pub use policy::{
    glob_match, Kind, Limit, LimitShape, Matcher, Plan, Policy, PolicyChange, PolicyDoc, PolicyLog, PolicyVersion,
    Scope, SLIDING_BUCKETS,
};
pub use policy_change::{PolicyOutcome, PolicyRequest};
pub use pricing::{parse_price, PriceRates, PricedCall, Pricing};
pub use replicated::InstalledState;
pub use state::{
    apply, intern, merge_usage, CounterMap, FastMap, Shard, ShardAccess, SortKey, SubjectState, Subjects, UsageDeltas,
};
pub use types::*;
use watch::SignalWork;
pub use watch::{BreakerView, FlagView};

use crate::clock::Millis;
use crate::engine::policy::{MaxValue, Mode, Priority, Unmatched};
use crate::journal::{DurableWatch, Journal};

/// The fingerprint idempotency keys keep of a request other than a decision.
pub fn fingerprint_of<T: serde::Serialize>(op: &str, body: &T) -> u64 {
    fingerprint(op, body)
}

/// FNV-1a over `bytes`, with a domain tag: used to pick shards and to fingerprint
/// requests (stable across processes, unlike `DefaultHasher`).
fn fnv1a(tag: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(tag);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fingerprint of a request body for idempotency: operation tag + canonical JSON
/// (maps are ordered, defaults filled in).
fn fingerprint<T: serde::Serialize>(op: &str, body: &T) -> u64 {
    let mut bytes = op.as_bytes().to_vec();
    bytes.push(0);
    serde_json::to_writer(&mut bytes, body).expect("request types serialize");
    fnv1a(0, &bytes)
}

/// What a commit or release (or the TTL) does to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Commit with actual amounts; metrics not named keep what was held.
    Commit(BTreeMap<String, u64>),
    /// Release without charging.
    Release,
    /// The TTL passed.
    Expire,
}

/// Counts for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Known subjects.
    pub subjects: usize,
    /// Live counters (subject, global and attribute scope).
    pub counters: usize,
    /// Active reservations.
    pub open_reservations: usize,
    /// Reservations kept, active or finished.
    pub reservations: usize,
    /// Idempotency keys kept.
    pub idempotency_keys: usize,
}

/// A matched limit during a decision.
struct Matched {
    limit: Arc<Limit>,
    is_plan: bool,
    key: CounterKey,
    amount: u64,
    max: MaxValue,
    slot: Slot,
    verdict: Verdict,
    usage: Usage,
    /// The counter as looked up, kept for the after-charge view.
    current: Option<Counter>,
}

/// The quota engine.
pub struct Engine {
    /// Limits and plans in force; swapped whole on reload.
    policy: RwLock<Arc<Policy>>,
    /// The state, striped by key hash.
    shards: Box<[Mutex<Shard>]>,
    /// Highest time seen: engine time never goes backwards.
    floor_ms: AtomicU64,
    /// Active reservations by expiry. Lock order: this before any shard.
    expiry: Mutex<BTreeSet<(Millis, String)>>,
    /// Earliest expiry in `expiry` (u64::MAX if none): checked without the lock.
    next_expiry_ms: AtomicU64,
    /// Active reservations, for the `max_open_reservations` cap.
    open_reservations: AtomicIsize,
    /// Usage readers hold it shared while they read the snapshot file and
    /// memory together; a snapshot holds it exclusively while it moves
    /// buckets from memory to the file, so no reader sees a bucket twice or
    /// not at all. Lock order: this before any shard.
    usage_moving: RwLock<()>,
    /// Idempotency keys kept, for the `max_idempotency_keys` cap.
    idempotency_keys: AtomicIsize,
    /// Set while a full key store is being cleared of expired keys, so that
    /// one request does it, not every one that finds it full.
    collecting_keys: std::sync::atomic::AtomicBool,
    /// Random per process, so reservation ids differ across restarts.
    id_seed: u64,
    /// Reservation ids handed out by this process.
    id_seq: AtomicU64,
    /// Where applied mutations go.
    journal: Arc<dyn Journal>,
    /// During recovery: per shard, the LSN its snapshot is as of.
    replay_base: Vec<Lsn>,
    /// During recovery: the last LSN replayed.
    replayed_lsn: Lsn,
    /// Whoever keeps calls that wait for capacity; unset when nothing waits ever.
    wait_hooks: std::sync::OnceLock<Arc<dyn waitlist::WaitHooks>>,
    /// Events' tail, threshold marks, breakers and flags. Lock order: after
    /// the shards, before the journal; held from numbering a record's events
    /// to appending it, so `seq` follows LSN order without gaps.
    signals: Mutex<signals::Signals>,
    /// Anomaly flag states kept (raised or cleared): zero lets decisions skip the lock.
    flag_states: std::sync::atomic::AtomicUsize,
    /// Told after a record with events is applied (wakes the event feed).
    event_hook: std::sync::OnceLock<Arc<dyn Fn() + Send + Sync>>,
    /// The stored versions of the policy. Lock order: after the shards,
    /// before the signals.
    policy_log: Mutex<PolicyLog>,
    /// The generation of the policy in force ([`Policy::generation`]),
    /// changed only while every shard is locked.
    policy_generation: AtomicU64,
}

/// How a decision is asked for, beyond the request itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecideOpts {
    /// A parked call decided again by the wait driver: it already has its
    /// place in line, so the waiters' claim on capacity does not stop it.
    pub from_waitlist: bool,
}

/// What the wait driver needs to know of a decision besides its answer.
#[derive(Debug, Clone, Default)]
pub struct DecisionNotes {
    /// The priority the call was decided at (its own, or its plan's).
    pub priority: Priority,
    /// Denied only by enforced limits that time or returned capacity can
    /// cure: with `retry_after_ms` the earliest time alone would.
    pub curable: bool,
    /// The counters that denied it.
    pub denied_by: Vec<CounterKey>,
}

/// The shards an operation holds, sorted by index.
struct Locked<'a> {
    engine: &'a Engine,
    idx: Vec<usize>,
    guards: Vec<MutexGuard<'a, Shard>>,
    /// A record was journaled under these locks: the journal is woken once
    /// they are released.
    appended: bool,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.guards.clear();
        if self.appended {
            self.engine.journal.wake();
        }
    }
}

impl Locked<'_> {
    fn shard(&mut self, i: usize) -> &mut Shard {
        let pos = self
            .idx
            .binary_search(&i)
            .expect("invariant: an operation only touches shards it locked");
        &mut self.guards[pos]
    }

    fn shard_ref(&self, i: usize) -> &Shard {
        let pos = self
            .idx
            .binary_search(&i)
            .expect("invariant: an operation only touches shards it locked");
        &self.guards[pos]
    }

    fn subject(&self, subject: &str) -> Option<&SubjectState> {
        self.shard_ref(self.engine.shard_of_subject(subject))
            .subjects
            .get(subject)
    }

    fn counter(&self, key: &CounterKey) -> Option<&Counter> {
        match &key.scope {
            ScopeKey::Subject(s) => self.subject(s).and_then(|st| st.counters.get(&key.limit)),
            _ => self.shard_ref(self.engine.shard_of_counter(key)).shared.get(key),
        }
    }

    /// Journals `muts` as one record made at engine time `now`, then applies
    /// them. Nothing is applied if the journal refuses.
    fn commit(&mut self, muts: &[Mutation], now: Millis) -> Result<Option<Lsn>, EngineError> {
        if muts.is_empty() {
            return Ok(None);
        }
        if muts.iter().any(signals::Signals::touches) {
            return self.commit_signals(muts.to_vec(), Vec::new(), now);
        }
        self.appended = true;
        let lsn = self
            .engine
            .journal
            .append(now, muts)
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        self.apply_all(muts, lsn);
        Ok(Some(lsn))
    }

    /// [`Locked::commit`] for a record with signals: numbers `events` after the
    /// newest, appends them to `muts`, and journals and applies the signals
    /// part under the signals lock, so seq order is LSN order.
    fn commit_signals(
        &mut self,
        mut muts: Vec<Mutation>,
        events: Vec<signals::EventBody>,
        now: Millis,
    ) -> Result<Option<Lsn>, EngineError> {
        if muts.is_empty() && events.is_empty() {
            return Ok(None);
        }
        let has_events = !events.is_empty();
        let mut sig = self.engine.signals();
        let first = sig.last_seq + 1;
        for (i, body) in events.into_iter().enumerate() {
            muts.push(Mutation::Signal(Box::new(signals::SignalChange::Event(
                signals::Event {
                    seq: first + i as u64,
                    at_ms: now,
                    body,
                },
            ))));
        }
        self.appended = true;
        let lsn = self
            .engine
            .journal
            .append(now, &muts)
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        for m in muts.iter().filter(|m| signals::Signals::touches(m)) {
            sig.apply(lsn, m);
        }
        self.engine.flag_states.store(sig.flags.len(), Ordering::Relaxed);
        drop(sig);
        self.apply_all(&muts, lsn);
        if has_events {
            if let Some(h) = self.engine.event_hook.get() {
                h();
            }
        }
        Ok(Some(lsn))
    }

    fn apply_all(&mut self, muts: &[Mutation], lsn: Lsn) {
        let hooks = self.engine.wait_hooks.get().filter(|h| h.active());
        let mut i = 0;
        while i < muts.len() {
            // A plan's charges to the subject: one lookup, not one each.
            let run = state::subject_charge_run(&muts[i..]);
            let group = &muts[i..i + run.max(1)];
            i += group.len();
            if let Some(h) = hooks {
                group.iter().for_each(|m| note_freed(&**h, m));
            }
            if run > 1 {
                state::apply_subject_charges(self, group);
                continue;
            }
            let a = apply(self, &group[0], lsn);
            self.engine
                .open_reservations
                .fetch_add(a.open_reservations_delta, Ordering::Relaxed);
            if a.idempotency_keys_delta != 0 {
                self.engine
                    .idempotency_keys
                    .fetch_add(a.idempotency_keys_delta, Ordering::Relaxed);
            }
        }
        // Every record touching these shards up to `lsn` is now in them (a locked
        // shard the record did not touch trivially qualifies).
        for g in &mut self.guards {
            debug_assert!(g.applied_lsn < lsn, "records reach a shard in LSN order");
            g.applied_lsn = lsn;
        }
    }
}

impl ShardAccess for Locked<'_> {
    fn subject_shard(&mut self, subject: &str) -> &mut Shard {
        let i = self.engine.shard_of_subject(subject);
        self.shard(i)
    }
    fn shared_shard(&mut self, key: &CounterKey) -> &mut Shard {
        let i = self.engine.shard_of_counter(key);
        self.shard(i)
    }
    fn reservation_shard(&mut self, id: &str) -> &mut Shard {
        let i = self.engine.shard_of_reservation(id);
        self.shard(i)
    }
    fn idempotency_shard(&mut self, key: &str) -> &mut Shard {
        let i = self.engine.shard_of_idempotency(key);
        self.shard(i)
    }
    fn each_shard(&mut self, f: &mut dyn FnMut(&mut Shard)) {
        assert_eq!(
            self.guards.len(),
            self.engine.shards.len(),
            "invariant: a record that reaches every shard holds every shard"
        );
        for g in &mut self.guards {
            f(g);
        }
    }
}

/// Tells the waiters' keeper of capacity a mutation gives back.
fn note_freed(h: &dyn waitlist::WaitHooks, m: &Mutation) {
    use waitlist::Freed;
    match m {
        Mutation::Charge { counter, delta, .. } if *delta < 0 => h.freed(Freed::Counter(counter)),
        Mutation::ResetCounter { counter } | Mutation::Credit { counter, .. } => h.freed(Freed::Counter(counter)),
        Mutation::SetSubject { subject, .. } | Mutation::DeleteSubject { subject } => h.freed(Freed::Subject(subject)),
        _ => {}
    }
}

/// Unlocked access for replay at start, when nothing else runs. A shard whose
/// snapshot already covers the record being replayed gets a scratch shard
/// instead, so the record's effect on it is not applied twice.
struct Exclusive<'a> {
    engine_shards: &'a mut [Mutex<Shard>],
    /// Per shard, the LSN its snapshot is as of.
    base: &'a [Lsn],
    /// The record being replayed.
    lsn: Lsn,
    /// Takes writes meant for shards that already have them.
    scratch: Shard,
}

impl<'a> Exclusive<'a> {
    /// Access to every shard, none skipped (no snapshot base).
    fn every_shard(engine_shards: &'a mut [Mutex<Shard>]) -> Exclusive<'a> {
        Exclusive {
            engine_shards,
            base: &[],
            lsn: 0,
            scratch: Shard::default(),
        }
    }

    fn get(&mut self, h: u64) -> &mut Shard {
        let i = (h % self.engine_shards.len() as u64) as usize;
        if self.base.get(i).is_some_and(|&b| b >= self.lsn) {
            self.scratch = Shard::default();
            return &mut self.scratch;
        }
        self.engine_shards[i].get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl ShardAccess for Exclusive<'_> {
    fn subject_shard(&mut self, subject: &str) -> &mut Shard {
        self.get(hash_subject(subject))
    }
    fn shared_shard(&mut self, key: &CounterKey) -> &mut Shard {
        self.get(hash_counter(key))
    }
    fn reservation_shard(&mut self, id: &str) -> &mut Shard {
        self.get(fnv1a(4, id.as_bytes()))
    }
    fn idempotency_shard(&mut self, key: &str) -> &mut Shard {
        self.get(fnv1a(5, key.as_bytes()))
    }
    fn each_shard(&mut self, f: &mut dyn FnMut(&mut Shard)) {
        for (i, s) in self.engine_shards.iter_mut().enumerate() {
            if self.base.get(i).is_none_or(|&b| b < self.lsn) {
                f(s.get_mut().unwrap_or_else(|e| e.into_inner()));
            }
        }
    }
}

fn hash_subject(s: &str) -> u64 {
    fnv1a(1, s.as_bytes())
}

/// The part of a limit name that picks a shard: a breaker's two hidden
/// counters (`…:recent`, `…:long`) share one, so a call locks one more shard
/// for a breaker, not two.
fn shard_name(limit: &str) -> &[u8] {
    let b = limit.as_bytes();
    if b.first() == Some(&1) {
        if let Some(i) = limit.rfind(':') {
            return &b[..i];
        }
    }
    b
}

fn hash_counter(key: &CounterKey) -> u64 {
    match &key.scope {
        ScopeKey::Subject(s) => hash_subject(s),
        ScopeKey::Global => fnv1a(2, shard_name(&key.limit)),
        ScopeKey::Attribute { value, .. } => {
            let mut b = shard_name(&key.limit).to_vec();
            b.push(0);
            b.extend_from_slice(value.as_bytes());
            fnv1a(3, &b)
        }
    }
}

/// The counter a limit uses for this subject and attributes; `None` when the limit
/// is scoped by an attribute the event does not carry.
/// What a consume adds to usage history: its amounts, `requests` (1 unless
/// given) and the cost when priced; zeros left out.
fn usage_of(amounts: &BTreeMap<String, u64>, cost: Option<u64>, cost_metric: Option<&str>) -> Vec<(Arc<str>, u64)> {
    // In name order, as the amounts are: a vector, not a map, for a few names.
    let mut out: Vec<(&str, u64)> = Vec::with_capacity(amounts.len() + 2);
    out.extend(amounts.iter().map(|(m, &a)| (m.as_str(), a)));
    fn set<'a>(out: &mut Vec<(&'a str, u64)>, name: &'a str, amount: u64, replace: bool) {
        match out.binary_search_by(|(m, _)| (*m).cmp(name)) {
            Ok(i) if replace => out[i].1 = amount,
            Ok(_) => {}
            Err(i) => out.insert(i, (name, amount)),
        }
    }
    set(&mut out, "requests", 1, false);
    if let (Some(c), Some(m)) = (cost, cost_metric) {
        set(&mut out, m, c, true);
    }
    // Interned: each bucket in memory keeps these names until the next snapshot.
    out.into_iter()
        .filter(|&(_, a)| a > 0)
        .map(|(m, a)| (intern(m), a))
        .collect()
}

/// How much of `metric` a request asks for: `requests` is 1 unless given.
fn amount_of(amounts: &BTreeMap<String, u64>, metric: &str) -> u64 {
    match amounts.get(metric) {
        Some(&a) => a,
        None if metric == "requests" => 1,
        None => 0,
    }
}

fn counter_key(limit: &Limit, subject: &Arc<str>, attributes: &BTreeMap<String, String>) -> Option<CounterKey> {
    let scope = match &limit.scope {
        Scope::Subject => ScopeKey::Subject(subject.clone()),
        Scope::Global => ScopeKey::Global,
        Scope::Attribute(name) => ScopeKey::Attribute {
            name: name.clone(),
            value: attributes.get(&**name)?.as_str().into(),
        },
    };
    Some(CounterKey {
        limit: limit.name.clone(),
        scope,
    })
}

fn view(limit: &Limit, key: &CounterKey, u: &Usage) -> CounterView {
    CounterView {
        limit: limit.name.clone(),
        metric: limit.metric.clone(),
        scope: key.scope.display(),
        max: u.max,
        used: u.used,
        remaining: match u.max {
            MaxValue::Finite(m) => Some(m.saturating_sub(u.used)),
            MaxValue::Unlimited => None,
        },
        resets_at: u.resets_at,
        mode: limit.mode,
    }
}

/// The view of a counter after a charge that has not been applied yet.
fn view_after(
    limit: &Limit,
    key: &CounterKey,
    current: Option<Counter>,
    charge: Option<(&Slot, i64)>,
    max: MaxValue,
    now: Millis,
) -> CounterView {
    let mut c = current;
    if let Some((slot, delta)) = charge {
        if delta != 0 {
            counter::apply_charge(&mut c, slot, delta, now);
        }
    }
    let (usage, _) = evaluate(&limit.kind, c.as_ref(), now, 0, max);
    view(limit, key, &usage)
}

fn effective_max(limit: &Limit, overrides: &BTreeMap<String, Override>) -> MaxValue {
    match limit.scope {
        Scope::Subject => overrides.get(&*limit.name).map_or(limit.max, |o| o.max),
        _ => limit.max,
    }
}

/// How often holds past their expiry are expired (the server's sweep): the
/// latest their capacity returns after `expires_at`.
pub const EXPIRY_SWEEP_MS: u64 = 250;

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Engine {
    /// A new engine with empty state.
    pub fn new(policy: Policy, journal: Arc<dyn Journal>) -> Engine {
        let n = policy.settings.shards;
        let id_seed = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Engine {
            policy: RwLock::new(Arc::new(policy)),
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            floor_ms: AtomicU64::new(0),
            expiry: Mutex::new(BTreeSet::new()),
            next_expiry_ms: AtomicU64::new(u64::MAX),
            open_reservations: AtomicIsize::new(0),
            usage_moving: RwLock::new(()),
            idempotency_keys: AtomicIsize::new(0),
            collecting_keys: std::sync::atomic::AtomicBool::new(false),
            id_seed,
            id_seq: AtomicU64::new(0),
            journal,
            replay_base: Vec::new(),
            replayed_lsn: 0,
            wait_hooks: std::sync::OnceLock::new(),
            signals: Mutex::new(signals::Signals::default()),
            flag_states: std::sync::atomic::AtomicUsize::new(0),
            event_hook: std::sync::OnceLock::new(),
            policy_log: Mutex::new(PolicyLog::default()),
            policy_generation: AtomicU64::new(0),
        }
    }

    /// Installs the keeper of waiting calls (once; later calls are ignored).
    pub fn set_wait_hooks(&self, hooks: Arc<dyn waitlist::WaitHooks>) {
        let _ = self.wait_hooks.set(hooks);
    }

    /// Limits and plans in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `policy` in force without recording a version: for tests and
    /// embedders that keep no policy history. Counters keep their identity.
    pub fn set_policy(&self, policy: Policy) {
        let locked = self.lock((0..self.shards.len()).collect());
        self.install_policy(&locked, policy);
    }

    /// Swaps the policy in force while `locked` holds every shard, so that no
    /// decision is under way with the one it replaces.
    fn install_policy(&self, locked: &Locked<'_>, mut policy: Policy) {
        debug_assert_eq!(locked.guards.len(), self.shards.len());
        let generation = self.policy_generation.load(Ordering::Relaxed) + 1;
        policy.generation = generation;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.policy_generation.store(generation, Ordering::Release);
        if let Some(h) = self.wait_hooks.get().filter(|h| h.active()) {
            h.freed(waitlist::Freed::All);
        }
    }

    /// Whether `policy` is still the one in force: checked under shard locks,
    /// which a policy change holds all of.
    fn policy_current(&self, policy: &Policy) -> bool {
        self.policy_generation.load(Ordering::Acquire) == policy.generation
    }

    /// Replaces the journal: recovery replays into an engine before the WAL
    /// writer exists, then hands it the writer.
    pub fn set_journal(&mut self, journal: Arc<dyn Journal>) {
        self.journal = journal;
    }

    /// Where to wait for an answer's LSN to be durable.
    pub fn durable_watch(&self) -> DurableWatch {
        self.journal.watch()
    }

    /// What every operation does first: take engine time (never backwards),
    /// release holds that expired by then, and take the policy in force.
    fn begin(&self, now_ms: Millis) -> (Millis, Arc<Policy>) {
        let now = self.now(now_ms);
        self.expire_due(now);
        (now, self.policy())
    }

    /// Engine time given a clock reading: never earlier than any time the
    /// engine has seen, recovered records and snapshots included.
    pub fn time(&self, now_ms: Millis) -> Millis {
        self.now(now_ms)
    }

    fn now(&self, now_ms: Millis) -> Millis {
        self.floor_ms.fetch_max(now_ms, Ordering::AcqRel).max(now_ms)
    }

    fn shard_index(&self, h: u64) -> usize {
        (h % self.shards.len() as u64) as usize
    }
    fn shard_of_subject(&self, s: &str) -> usize {
        self.shard_index(hash_subject(s))
    }
    fn shard_of_counter(&self, key: &CounterKey) -> usize {
        self.shard_index(hash_counter(key))
    }
    fn shard_of_reservation(&self, id: &str) -> usize {
        self.shard_index(fnv1a(4, id.as_bytes()))
    }
    fn shard_of_idempotency(&self, key: &str) -> usize {
        self.shard_index(fnv1a(5, key.as_bytes()))
    }

    /// Locks shards in ascending order: the one lock order that rules out deadlock.
    fn lock(&self, mut idx: Vec<usize>) -> Locked<'_> {
        idx.sort_unstable();
        idx.dedup();
        let guards = idx
            .iter()
            .map(|&i| self.shards[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        Locked {
            engine: self,
            idx,
            guards,
            appended: false,
        }
    }

    fn next_reservation_id(&self) -> String {
        let seq = self.id_seq.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of seed+seq: unpredictable across processes, unique within one.
        let mut z = self.id_seed.wrapping_add(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        format!("rsv_{z:016x}{seq:08x}")
    }

    fn check_metrics(policy: &Policy, amounts: &BTreeMap<String, u64>) -> Result<(), EngineError> {
        match amounts.keys().find(|m| !policy.metrics.contains(*m)) {
            Some(m) => Err(EngineError::UnknownMetric(m.clone(), policy.metric_list())),
            None => Ok(()),
        }
    }

    /// The request's amounts with `requests` defaulting to 1: what reservations
    /// and idempotency fingerprints record. Decisions read [`amount_of`] instead
    /// of building this map.
    fn normalize_amounts(amounts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let mut out = amounts.clone();
        out.entry("requests".to_string()).or_insert(1);
        out
    }

    /// check, consume or reserve.
    pub fn decide(
        &self,
        op: DecideOp,
        req: &DecisionRequest,
        now_ms: Millis,
    ) -> Result<Applied<Decision>, EngineError> {
        self.decide_with(op, req, now_ms, DecideOpts::default()).map(|(a, _)| a)
    }

    /// [`Engine::decide`], with what the wait driver needs to know.
    pub fn decide_with(
        &self,
        op: DecideOp,
        req: &DecisionRequest,
        now_ms: Millis,
        opts: DecideOpts,
    ) -> Result<(Applied<Decision>, DecisionNotes), EngineError> {
        let (now, policy) = self.begin(now_ms);
        Self::check_metrics(&policy, &req.amounts)?;
        let ttl_ms = match (op, req.ttl_ms) {
            (DecideOp::Reserve, None) => Some(policy.settings.reservation_ttl_default_ms),
            (DecideOp::Reserve, Some(t)) if t == 0 || t > policy.settings.reservation_ttl_max_ms => {
                return Err(EngineError::InvalidRequest(format!(
                    "ttl_ms: {t} is out of range: must be between 1 and {} (engine.reservation_ttl_max)",
                    policy.settings.reservation_ttl_max_ms
                )))
            }
            (DecideOp::Reserve, Some(t)) => Some(t),
            (_, Some(_)) => return Err(EngineError::InvalidRequest("ttl_ms: only reserve takes a TTL".into())),
            (_, None) => None,
        };
        let idem_key = if op == DecideOp::Check {
            None
        } else {
            req.idempotency_key.as_deref()
        };
        let subject: Arc<str> = req.subject.as_str().into();
        let event = req.event.as_deref();
        // Pricing is pure arithmetic on the request: done before any lock.
        let priced = match &policy.pricing {
            Some(p) => Some(p.price_call(event, &req.attributes, &req.amounts, |m| amount_of(&req.amounts, m))?),
            None => None,
        };
        let cost_metric = policy.pricing.as_ref().map(|p| &*p.metric);
        let charge_of = |metric: &str| match &priced {
            Some(pc) if Some(metric) == cost_metric => pc.cost,
            _ => amount_of(&req.amounts, metric),
        };
        // What a consume adds to the usage history, also from the request alone.
        let mut history = (op == DecideOp::Consume && policy.history).then(|| {
            dimensions::with_values(
                usage_of(&req.amounts, priced.as_ref().map(|pc| pc.cost), cost_metric),
                &dimensions::values(&policy.history_dimensions, &req.attributes),
            )
        });

        if idem_key.is_some() {
            self.make_room_for_keys(&policy, now)?;
        }
        // Sized up front: growing it from one was a reallocation per call or two.
        let mut shards = Vec::with_capacity(3 + policy.shared_limits.len() + 2 * policy.breakers.len());
        shards.push(self.shard_of_subject(&subject));
        if let Some(k) = idem_key {
            shards.push(self.shard_of_idempotency(k));
        }
        // The id is drawn before locking because the reservation lives in its shard.
        let reservation_id = ttl_ms.map(|_| self.next_reservation_id());
        if let Some(id) = &reservation_id {
            shards.push(self.shard_of_reservation(id));
        }
        for l in &policy.shared_limits {
            if l.matcher.matches(event, &req.attributes) {
                if let Some(key) = counter_key(l, &subject, &req.attributes) {
                    shards.push(self.shard_of_counter(&key));
                }
            }
        }
        // Breakers watch counters of their own (global or per attribute value).
        let writes = op != DecideOp::Check;
        let mut watched: Vec<(&Arc<signals::Breaker>, ScopeKey)> = Vec::with_capacity(policy.breakers.len());
        for b in &policy.breakers {
            if b.matcher.matches(event, &req.attributes) {
                if let Some(sk) = b.scope_key(&req.attributes) {
                    let (r, l) = b.keys(&sk);
                    shards.push(self.shard_of_counter(&r));
                    shards.push(self.shard_of_counter(&l));
                    watched.push((b, sk));
                }
            }
        }
        let mut locked = self.lock(shards);
        if !self.policy_current(&policy) {
            // The policy changed while this call waited for its shards: decide
            // it again under the new one (changes are rare; this recurses once).
            drop(locked);
            return self.decide_with(op, req, now_ms, opts);
        }

        // What reservations and idempotency fingerprints record; decisions
        // themselves read amount_of() and need no map.
        let mut normalized = (idem_key.is_some() || ttl_ms.is_some()).then(|| Self::normalize_amounts(&req.amounts));
        let fp = idem_key.map(|_| {
            let canonical = DecisionRequest {
                amounts: normalized.clone().expect("normalized when there is a key"),
                idempotency_key: None,
                ttl_ms,
                ..req.clone()
            };
            fingerprint(if op == DecideOp::Reserve { "reserve" } else { "consume" }, &canonical)
        });
        if let (Some(k), Some(fp)) = (idem_key, fp) {
            if let Some((entry, lsn)) = locked
                .idempotency_shard(k)
                .idempotency
                .get(k)
                .filter(|(e, _)| e.expires_ms > now)
            {
                if entry.fingerprint != fp {
                    return Err(EngineError::IdempotencyConflict(k.to_string()));
                }
                return match entry.answer.unpack() {
                    StoredAnswer::Decision(d) => Ok((
                        Applied {
                            value: Decision { replayed: true, ..d },
                            lsn: Some(*lsn),
                        },
                        DecisionNotes::default(),
                    )),
                    StoredAnswer::Deleted { .. } | StoredAnswer::Policy { .. } => {
                        Err(EngineError::IdempotencyConflict(k.to_string()))
                    }
                };
            }
        }

        // The subject is looked up once for its plan, overrides and counters.
        let st = locked.subject(&subject);
        let no_overrides = BTreeMap::new();
        let overrides = st.map_or(&no_overrides, |s| s.overrides());
        let plan = policy
            .plan_for(st.and_then(|s| s.plan()))
            .ok_or_else(|| EngineError::UnknownSubject(req.subject.clone()))?;
        let priority = req.priority.unwrap_or(plan.priority);
        // Calls waiting for capacity have a claim on it: a new call of no
        // higher priority does not take what returns before they had it.
        let hooks = match op {
            DecideOp::Check => None,
            _ if opts.from_waitlist => None,
            _ => self.wait_hooks.get().filter(|h| h.active()),
        };

        let mut matched = Vec::with_capacity(plan.all.len());
        for (limit, is_plan) in &plan.all {
            if !limit.matcher.matches(event, &req.attributes) {
                continue;
            }
            let Some(key) = counter_key(limit, &subject, &req.attributes) else {
                continue;
            };
            let amount = charge_of(&limit.metric);
            let max = effective_max(limit, overrides);
            let current = match &key.scope {
                ScopeKey::Subject(_) => st.and_then(|s| s.counters.get(&key.limit)),
                _ => locked.counter(&key),
            }
            .cloned();
            let (usage, mut verdict) = evaluate(&limit.kind, current.as_ref(), now, amount, max);
            if !verdict.fits && !verdict.exceeds_capacity && limit.mode == Mode::Enforce {
                // Capacity a hold gives back when it expires returns then.
                let shard = locked.shard_ref(self.shard_of_counter(&key));
                if let Some(schedule) = shard.hold_expiries.get(&key) {
                    verdict.retry_after_ms = counter::retry_with_holds(
                        &limit.kind,
                        current.as_ref(),
                        schedule,
                        now,
                        amount,
                        max,
                        verdict.retry_after_ms,
                    );
                }
            }
            if let Some(h) = hooks {
                if verdict.fits && limit.mode == Mode::Enforce && amount > 0 {
                    if let Some(ms) = h.ahead(&key, priority, now) {
                        verdict.fits = false;
                        verdict.retry_after_ms = Some(ms);
                    }
                }
            }
            matched.push(Matched {
                limit: limit.clone(),
                is_plan: *is_plan,
                key,
                amount,
                max,
                slot: slot_for(&limit.kind, now),
                verdict,
                usage,
                current,
            });
        }

        let mut reasons = Vec::new();
        let mut denied = false;
        let mut retry: Option<u64> = Some(0);
        let mut notes = DecisionNotes {
            priority,
            curable: true,
            denied_by: Vec::new(),
        };
        // Breakers and anomaly flags: what they change, and their own charges.
        let mut sig = SignalWork::default();
        let mut flagged_degrade = false;
        if !watched.is_empty() || !policy.anomalies.is_empty() {
            self.decide_signals(
                &locked,
                &watched,
                &policy,
                &subject,
                st,
                event,
                &req.attributes,
                priority,
                now,
                writes,
                &charge_of,
                &mut sig,
            );
            if !sig.blocked.is_empty() {
                denied = true;
                // No wait cures an open breaker or a raised flag.
                notes.curable = false;
                retry = match (retry, sig.blocked.iter().map(|r| r.retry_after_ms).min().flatten()) {
                    (Some(_), Some(ms)) => Some(ms),
                    _ => None,
                };
                reasons.append(&mut sig.blocked.clone());
            }
            flagged_degrade = !sig.degraded.is_empty();
            reasons.append(&mut sig.degraded);
        }
        for m in matched.iter().filter(|m| !m.verdict.fits) {
            let code = match m.limit.mode {
                Mode::Enforce => {
                    denied = true;
                    notes.denied_by.push(m.key.clone());
                    notes.curable &= !m.verdict.exceeds_capacity && m.verdict.retry_after_ms.is_some();
                    retry = match (retry, m.verdict.retry_after_ms) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                    if m.verdict.exceeds_capacity {
                        ReasonCode::ExceedsCapacity
                    } else {
                        ReasonCode::LimitExceeded
                    }
                }
                Mode::Monitor => ReasonCode::WouldDeny,
                Mode::Degrade => ReasonCode::Degraded,
            };
            reasons.push(Reason {
                limit: Some(m.limit.name.clone()),
                code,
                retry_after_ms: m.verdict.retry_after_ms,
            });
        }
        if !denied && plan.unmatched == Unmatched::Deny && !matched.iter().any(|m| m.is_plan) {
            denied = true;
            notes.curable = false;
            retry = None;
            reasons.push(Reason {
                limit: None,
                code: ReasonCode::Unmatched,
                retry_after_ms: None,
            });
        }
        let full = || st.is_some_and(|s| s.holds().len() >= policy.settings.max_reservations_per_subject);
        if !denied && ttl_ms.is_some() && full() {
            // Each hold costs memory and a line in the subject's delete: a
            // client token must not be able to pile them up without bound.
            // A commit, release or expiry makes room, so no retry time.
            denied = true;
            notes.curable = false;
            retry = None;
            reasons.push(Reason {
                limit: None,
                code: ReasonCode::TooManyReservations,
                retry_after_ms: None,
            });
        }
        if denied {
            // Degrading is moot when the call is denied.
            reasons.retain(|r| r.code != ReasonCode::Degraded);
        }
        let outcome = if denied {
            Outcome::Deny
        } else if flagged_degrade || reasons.iter().any(|r| r.code == ReasonCode::Degraded) {
            Outcome::Degrade
        } else {
            Outcome::Allow
        };

        let mut decision = Decision {
            allowed: !denied,
            decision: outcome,
            subject: req.subject.clone(),
            plan: plan.name.clone(),
            counters: Vec::with_capacity(matched.len()),
            reasons,
            retry_after_ms: if denied { retry } else { None },
            replayed: false,
            reservation_id: None,
            expires_at: None,
            cost: priced.as_ref().map(|pc| Cost {
                amount_micros: pc.cost,
                currency: policy
                    .pricing
                    .as_ref()
                    .expect("priced calls have pricing")
                    .currency
                    .clone(),
                price: pc.price.as_ref().map(|r| r.name.clone()),
                explicit: pc.explicit,
            }),
            waited_ms: None,
        };
        notes.curable &= denied;
        if denied || op == DecideOp::Check {
            decision.counters = matched.iter().map(|m| view(&m.limit, &m.key, &m.usage)).collect();
            // A breaker that opened on this call is recorded though nothing is charged.
            let lsn = if writes && !(sig.changes.is_empty() && sig.events.is_empty()) {
                let muts = sig.changes.drain(..).map(|c| Mutation::Signal(Box::new(c))).collect();
                let events = std::mem::take(&mut sig.events);
                locked.commit_signals(muts, events, now)?
            } else {
                None
            };
            return Ok((Applied { value: decision, lsn }, notes));
        }

        // Charges, usage, a reservation or key, the signal counters' charges.
        let mut muts = Vec::with_capacity(matched.len() + 2 + sig.holds.len() + sig.changes.len());
        for m in &mut matched {
            decision.counters.push(view_after(
                &m.limit,
                &m.key,
                m.current.take(),
                Some((&m.slot, signed(m.amount))),
                m.max,
                now,
            ));
            if m.amount > 0 {
                muts.push(Mutation::Charge {
                    counter: m.key.clone(),
                    slot: m.slot,
                    delta: signed(m.amount),
                    at_ms: now,
                });
            }
        }
        if policy.has_alerts {
            for m in &matched {
                self.crossings(&locked, m, &subject, now, &mut sig);
            }
        }
        if let Some(amounts) = history.take() {
            muts.push(Mutation::Usage {
                subject: subject.clone(),
                at_ms: now,
                amounts,
            });
        }
        let mut expiry = None;
        if let Some(ttl) = ttl_ms {
            if self.open_reservations.load(Ordering::Relaxed) >= policy.settings.max_open_reservations as isize {
                return Err(EngineError::Unavailable(format!(
                    "{} reservations are open, the configured maximum (engine.max_open_reservations)",
                    policy.settings.max_open_reservations
                )));
            }
            let id = reservation_id.expect("drawn for reserve");
            let expires_ms = now.saturating_add(ttl);
            // Breaker and anomaly counters are held too, so commit trues them up.
            let holds = matched
                .iter()
                .map(|m| Hold {
                    counter: m.key.clone(),
                    metric: m.limit.metric.clone(),
                    slot: m.slot,
                    amount: m.amount,
                })
                .chain(sig.holds.iter().cloned())
                .collect();
            let mut amounts = normalized.take().expect("normalized for a reservation");
            if let (Some(pc), Some(m)) = (&priced, cost_metric) {
                // Held like any amount, so that commit trues it up.
                amounts.insert(m.to_string(), pc.cost);
            }
            if policy.history {
                // Its commit files usage under these values.
                dimensions::mark_reservation(
                    &mut amounts,
                    &dimensions::values(&policy.history_dimensions, &req.attributes),
                );
            }
            muts.push(Mutation::PutReservation(Box::new(Reservation {
                id: id.clone(),
                subject: subject.clone(),
                amounts,
                price: priced.as_ref().and_then(|pc| pc.price.clone()),
                holds,
                created_ms: now,
                expires_ms,
                status: ReservationStatus::Active,
                finished_ms: None,
                answer: None,
            })));
            decision.reservation_id = Some(id.clone());
            decision.expires_at = Some(expires_ms);
            expiry = Some((expires_ms, id));
        }
        if let (Some(k), Some(fp)) = (idem_key, fp) {
            self.check_key_room(&policy)?;
            let entry = IdempotencyEntry {
                fingerprint: fp,
                answer: PackedAnswer::decision(&decision),
                expires_ms: now.saturating_add(policy.settings.idempotency_retention_ms),
            };
            muts.push(Mutation::PutIdempotency {
                key: k.to_string(),
                entry: Box::new(entry),
            });
        }
        for h in &sig.holds {
            muts.push(Mutation::Charge {
                counter: h.counter.clone(),
                slot: h.slot,
                delta: signed(h.amount),
                at_ms: now,
            });
        }
        let lsn = if sig.changes.is_empty() && sig.events.is_empty() {
            locked.commit(&muts, now)?
        } else {
            muts.extend(sig.changes.drain(..).map(|c| Mutation::Signal(Box::new(c))));
            locked.commit_signals(muts, std::mem::take(&mut sig.events), now)?
        };
        drop(locked);
        if let Some((at, id)) = expiry {
            self.track_expiry(at, id);
        }
        Ok((Applied { value: decision, lsn }, notes))
    }

    /// Before a write with a new key: when the key store is full, drops the
    /// keys past their retention (garbage collection, done by one request at
    /// a time). Takes no lock the caller holds.
    fn make_room_for_keys(&self, policy: &Policy, now: Millis) -> Result<(), EngineError> {
        let full = self.idempotency_keys.load(Ordering::Relaxed) >= policy.settings.max_idempotency_keys as isize;
        if full && !self.collecting_keys.swap(true, Ordering::AcqRel) {
            let r = self.gc(now, usize::MAX);
            self.collecting_keys.store(false, Ordering::Release);
            r?;
        }
        Ok(())
    }

    /// Refuses to keep one more key when `engine.max_idempotency_keys` are kept.
    fn check_key_room(&self, policy: &Policy) -> Result<(), EngineError> {
        let max = policy.settings.max_idempotency_keys;
        if self.idempotency_keys.load(Ordering::Relaxed) >= max as isize {
            return Err(EngineError::Unavailable(format!(
                "{max} idempotency keys are kept, the configured maximum (engine.max_idempotency_keys), and none \
                 has passed its retention (engine.idempotency_retention); nothing was applied: retry later, \
                 send the call without a key, or raise the setting"
            )));
        }
        Ok(())
    }

    /// Counts of what the engine holds.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            open_reservations: self.open_reservations.load(Ordering::Relaxed).max(0) as usize,
            ..Stats::default()
        };
        for i in 0..self.shards.len() {
            let mut l = self.lock(vec![i]);
            let shard = l.shard(i);
            s.subjects += shard.subjects.len();
            s.counters += shard.shared.len() + shard.subjects.values().map(|st| st.counters.len()).sum::<usize>();
            s.reservations += shard.reservations.len();
            s.idempotency_keys += shard.idempotency.len();
        }
        s
    }

    /// An engine holding the shards of a snapshot. If the configured shard count
    /// differs, a snapshot whose shards are all as of one LSN (as at a graceful
    /// shutdown) is re-sharded; otherwise the snapshot's count is kept, because
    /// replay must know per shard what it already holds.
    pub fn from_snapshot(policy: Policy, journal: Arc<dyn Journal>, shards: Vec<Shard>) -> Engine {
        let mut engine = Engine::new(policy, journal);
        if shards.is_empty() {
            return engine;
        }
        let uniform = shards.iter().all(|s| s.applied_lsn == shards[0].applied_lsn);
        if shards.len() == engine.shards.len() || !uniform {
            if shards.len() != engine.shards.len() {
                tracing::warn!(
                    snapshot = shards.len(),
                    configured = engine.shards.len(),
                    "keeping the snapshot's shard count; engine.shards applies after a graceful restart"
                );
            }
            engine.replay_base = shards.iter().map(|s| s.applied_lsn).collect();
            engine.shards = shards.into_iter().map(Mutex::new).collect();
        } else {
            let lsn = shards[0].applied_lsn;
            for old in shards {
                engine.absorb(old);
            }
            for s in engine.shards.iter_mut() {
                s.get_mut().unwrap_or_else(|e| e.into_inner()).applied_lsn = lsn;
            }
            engine.replay_base = vec![lsn; engine.shards.len()];
        }
        engine
    }

    /// Moves every item of `old` into the shard it hashes to here.
    fn absorb(&mut self, old: Shard) {
        fn at(shards: &mut [Mutex<Shard>], h: u64) -> &mut Shard {
            let i = (h % shards.len() as u64) as usize;
            shards[i].get_mut().unwrap_or_else(|e| e.into_inner())
        }
        for (k, v) in old.subjects {
            at(&mut self.shards, hash_subject(&k)).subjects.insert(k, v);
        }
        for (k, v) in old.shared {
            at(&mut self.shards, hash_counter(&k)).shared.insert(k, v);
        }
        for (k, v) in old.reservations {
            at(&mut self.shards, fnv1a(4, k.as_bytes())).reservations.insert(k, v);
        }
        for (k, v) in old.idempotency {
            at(&mut self.shards, fnv1a(5, k.as_bytes())).idempotency.insert(k, v);
        }
    }

    /// The LSN every shard's state is at least as of: replay starts after it.
    pub fn replay_from(&self) -> Lsn {
        self.replay_base.iter().copied().min().unwrap_or(0)
    }

    /// Applies a journaled record made at engine time `at_ms` during recovery
    /// (nothing else may run). Shards whose snapshot already covers `lsn` are
    /// left alone. Engine time resumes no earlier than the latest record.
    pub fn replay(&mut self, lsn: Lsn, at_ms: Millis, muts: &[Mutation]) {
        self.floor_ms.fetch_max(at_ms, Ordering::AcqRel);
        if self.replay_base.len() != self.shards.len() {
            self.replay_base = vec![0; self.shards.len()];
        }
        let mut access = Exclusive {
            engine_shards: &mut self.shards,
            base: &self.replay_base,
            lsn,
            scratch: Shard::default(),
        };
        for m in muts {
            apply(&mut access, m, lsn);
            if let Mutation::SetPolicy(change) = m {
                self.policy_log
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .apply(lsn, change);
            }
        }
        if muts.iter().any(signals::Signals::touches) {
            self.replay_signals(lsn, muts);
        }
        self.replayed_lsn = self.replayed_lsn.max(lsn);
    }

    /// Ends recovery: stamps every shard with the last LSN replayed, and rebuilds
    /// the expiry index and the open-reservation count from the state.
    pub fn finish_recovery(&mut self) {
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let shard = shard.get_mut().unwrap_or_else(|e| e.into_inner());
            let base = self.replay_base.get(i).copied().unwrap_or(0);
            shard.applied_lsn = shard.applied_lsn.max(base).max(self.replayed_lsn);
        }
        let derived = Derived::scan(
            self.shards
                .iter_mut()
                .map(|s| s.get_mut().unwrap_or_else(|e| e.into_inner())),
        );
        derived.index_holds(&mut Exclusive::every_shard(&mut self.shards));
        let idx = self.publish_derived(derived);
        *self.expiry.get_mut().unwrap_or_else(|e| e.into_inner()) = idx;
        self.replay_base.clear();
    }

    /// Publishes the counts of `d` and returns the expiry index to store.
    fn publish_derived(&self, d: Derived) -> BTreeSet<(Millis, String)> {
        self.open_reservations.store(d.active.len() as isize, Ordering::Relaxed);
        self.idempotency_keys.store(d.keys, Ordering::Relaxed);
        self.next_expiry_ms
            .store(d.expiry.first().map_or(u64::MAX, |(at, _)| *at), Ordering::Release);
        d.expiry
    }

    /// Calls `f` with each shard in turn, holding only that shard's lock: for
    /// snapshots, which must not stall the other shards.
    pub fn for_each_shard<E>(&self, mut f: impl FnMut(usize, &Shard) -> Result<(), E>) -> Result<(), E> {
        for (i, s) in self.shards.iter().enumerate() {
            let guard = s.lock().unwrap_or_else(|e| e.into_inner());
            f(i, &guard)?;
        }
        Ok(())
    }

    /// As [`Engine::for_each_shard`], also moving out each shard's usage
    /// history deltas, under the same lock (so they are as of its LSN).
    pub fn for_each_shard_taking_usage<E>(
        &self,
        mut f: impl FnMut(usize, &Shard, UsageDeltas) -> Result<(), E>,
    ) -> Result<(), E> {
        for (i, s) in self.shards.iter().enumerate() {
            let mut guard = s.lock().unwrap_or_else(|e| e.into_inner());
            let usage = std::mem::take(&mut guard.usage).into_deltas();
            f(i, &guard, usage)?;
        }
        Ok(())
    }

    /// Gives back usage deltas a failed snapshot took out.
    pub fn restore_usage(&self, deltas: UsageDeltas) {
        let mut by_shard: BTreeMap<usize, UsageDeltas> = BTreeMap::new();
        for (k, v) in deltas {
            by_shard.entry(self.shard_of_subject(&k.0)).or_default().insert(k, v);
        }
        for (i, d) in by_shard {
            self.shards[i].lock().unwrap_or_else(|e| e.into_inner()).usage.merge(d);
        }
    }

    /// Held while reading usage from the snapshot file and memory together,
    /// so that a snapshot cannot move buckets between the two reads.
    pub fn usage_read(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.usage_moving.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by a snapshot from taking usage out of memory until the file
    /// holds it (or it was given back).
    pub fn usage_move(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.usage_moving.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Usage not yet in the snapshot file of the first `subjects` subjects
    /// (in byte order) after `after` that memory holds any of. Names are
    /// looked at first and only those subjects' buckets are copied, so a
    /// page costs what its subjects hold, not what every shard holds.
    pub fn usage_deltas_after(&self, after: Option<&str>, subjects: usize) -> UsageDeltas {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        // The first `subjects` names over every shard.
        let mut first: BTreeSet<SortKey> = BTreeSet::new();
        for s in self.shards.iter() {
            let g = s.lock().unwrap_or_else(|e| e.into_inner());
            for (subject, _) in g.usage.range((lower, Bound::Unbounded)).take(subjects) {
                if first.len() == subjects && first.last().is_some_and(|l| subject > l) {
                    break;
                }
                first.insert(subject.clone());
                if first.len() > subjects {
                    first.pop_last();
                }
            }
        }
        let Some(last) = first.last().cloned() else {
            return UsageDeltas::new();
        };
        let mut out = UsageDeltas::new();
        for s in self.shards.iter() {
            let g = s.lock().unwrap_or_else(|e| e.into_inner());
            g.usage.copy_range((lower, Bound::Included(last.name())), &mut out);
        }
        out
    }

    /// Usage not yet in the snapshot file: one subject's, or everybody's.
    pub fn usage_deltas(&self, subject: Option<&str>) -> UsageDeltas {
        use std::ops::Bound;
        let mut out = UsageDeltas::new();
        let (shards, range) = match subject {
            Some(s) => (vec![self.shard_of_subject(s)], (Bound::Included(s), Bound::Included(s))),
            None => ((0..self.shards.len()).collect(), (Bound::Unbounded, Bound::Unbounded)),
        };
        for i in shards {
            let g = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
            g.usage.copy_range(range, &mut out);
        }
        out
    }

    /// (subject, hour) buckets waiting for the next snapshot, over all shards.
    pub fn usage_backlog(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).usage.len())
            .sum()
    }
}

/// What recovery and a snapshot install derive from the shards rather than
/// store: the reservation expiry index, the active reservations whose holds
/// are indexed afresh, and the idempotency key count.
struct Derived {
    expiry: BTreeSet<(Millis, String)>,
    active: Vec<Reservation>,
    keys: isize,
}

impl Derived {
    /// Scans the shards (clearing their hold schedules, rebuilt from `active`).
    fn scan<'a>(shards: impl Iterator<Item = &'a mut Shard>) -> Derived {
        let mut d = Derived {
            expiry: BTreeSet::new(),
            active: Vec::new(),
            keys: 0,
        };
        for shard in shards {
            d.keys += shard.idempotency.len() as isize;
            shard.hold_expiries.clear();
            for (r, _) in shard.reservations.values() {
                if r.status == ReservationStatus::Active {
                    d.expiry.insert((r.expires_ms, r.id.clone()));
                    d.active.push(r.clone());
                }
            }
        }
        d
    }

    /// Indexes the active reservations' holds, with `access` to every shard.
    fn index_holds(&self, access: &mut impl state::ShardAccess) {
        for r in &self.active {
            state::index_holds(access, r, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `usage_of` computed when it built a map: the reference.
    fn usage_by_map(amounts: &BTreeMap<String, u64>, cost: Option<u64>, metric: Option<&str>) -> Vec<(String, u64)> {
        let mut out: BTreeMap<&str, u64> = amounts.iter().map(|(m, &a)| (m.as_str(), a)).collect();
        out.entry("requests").or_insert(1);
        if let (Some(c), Some(m)) = (cost, metric) {
            out.insert(m, c);
        }
        out.into_iter()
            .filter(|&(_, a)| a > 0)
            .map(|(m, a)| (m.to_string(), a))
            .collect()
    }

    #[test]
    fn usage_of_files_requests_amounts_and_cost_in_name_order() {
        let amounts = [
            vec![],
            vec![("tokens", 5)],
            vec![("requests", 3), ("tokens", 0)],
            vec![("a", 1), ("requests", 0), ("zz", 2)],
            vec![("images", 2), ("usd_micros", 9)],
        ];
        for a in amounts {
            let a: BTreeMap<String, u64> = a.into_iter().map(|(m, v)| (m.to_string(), v)).collect();
            for (cost, metric) in [
                (None, None),
                (Some(7), Some("usd_micros")),
                (Some(0), Some("cost")),
                (Some(4), Some("a")),
            ] {
                let got: Vec<(String, u64)> = usage_of(&a, cost, metric)
                    .into_iter()
                    .map(|(m, v)| (m.to_string(), v))
                    .collect();
                assert_eq!(got, usage_by_map(&a, cost, metric), "{a:?} {cost:?} {metric:?}");
            }
        }
    }
}
