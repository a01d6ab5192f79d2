//! The in-memory state held in each shard, and [`apply`], the one function that
//! changes it: live commands and replay both go through it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::clock::Millis;

use serde::{Deserialize, Serialize};

use super::counter::{apply_charge, apply_credit, Counter};
use super::types::{
    CounterKey, IdempotencyEntry, Lsn, Mutation, Override, Reservation, ReservationStatus, ScopeKey, Slot,
};

/// What is known about one subject. Most subjects have only counters, so the
/// plan, overrides and holds live in a box that exists only when one of them
/// is set: 32 bytes per hash-map slot instead of 120, for millions of subjects.
/// Serialized as the four fields it always had (format version 1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectState {
    /// Subject-scoped counters by limit name.
    pub counters: CounterMap,
    /// Plan, overrides and holds; `None` when all are empty.
    extra: Option<Box<SubjectExtra>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SubjectExtra {
    plan: Option<String>,
    overrides: BTreeMap<String, Override>,
    holds: BTreeSet<String>,
}

impl SubjectExtra {
    fn is_empty(&self) -> bool {
        self.plan.is_none() && self.overrides.is_empty() && self.holds.is_empty()
    }
}

static NO_OVERRIDES: BTreeMap<String, Override> = BTreeMap::new();
static NO_HOLDS: BTreeSet<String> = BTreeSet::new();

impl SubjectState {
    /// Nothing worth keeping: the subject can be forgotten.
    pub fn is_empty(&self) -> bool {
        self.extra.is_none() && self.counters.is_empty()
    }
    /// Assigned plan; `None` means the default plan.
    pub fn plan(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.plan.as_deref())
    }
    /// Per-limit overrides.
    pub fn overrides(&self) -> &BTreeMap<String, Override> {
        self.extra.as_ref().map_or(&NO_OVERRIDES, |e| &e.overrides)
    }
    /// Ids of its active reservations.
    pub fn holds(&self) -> &BTreeSet<String> {
        self.extra.as_ref().map_or(&NO_HOLDS, |e| &e.holds)
    }
    /// Changes plan, overrides or holds, dropping the box if all end up empty.
    fn edit_extra(&mut self, f: impl FnOnce(&mut SubjectExtra)) {
        let mut e = self.extra.take().unwrap_or_default();
        f(&mut e);
        if !e.is_empty() {
            self.extra = Some(e);
        }
    }
    /// Sets plan and overrides.
    pub fn set_plan(&mut self, plan: Option<String>, overrides: BTreeMap<String, Override>) {
        self.edit_extra(|e| {
            e.plan = plan;
            e.overrides = overrides;
        });
    }
}

/// The serialized form: the four fields in their original order.
#[derive(Serialize)]
struct SubjectStateRef<'a> {
    plan: Option<&'a str>,
    overrides: &'a BTreeMap<String, Override>,
    counters: &'a CounterMap,
    holds: &'a BTreeSet<String>,
}

#[derive(Deserialize)]
struct SubjectStateOwned {
    plan: Option<String>,
    overrides: BTreeMap<String, Override>,
    counters: CounterMap,
    holds: BTreeSet<String>,
}

impl Serialize for SubjectState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        SubjectStateRef {
            plan: self.plan(),
            overrides: self.overrides(),
            counters: &self.counters,
            holds: self.holds(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SubjectState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let o = SubjectStateOwned::deserialize(d)?;
        let extra = SubjectExtra {
            plan: o.plan,
            overrides: o.overrides,
            holds: o.holds,
        };
        Ok(SubjectState {
            counters: o.counters,
            extra: (!extra.is_empty()).then(|| Box::new(extra)),
        })
    }
}

/// The engine's hash maps: foldhash, randomly seeded per map, in place of
/// SipHash, which was the largest single cost of a decision after the
/// decision logic itself (a decision hashes its subject several times).
/// Which shard a key lives in does not depend on it (see `Engine::shard_of_*`).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A subject's counters by limit name: a vector sized to fit, searched
/// linearly. A subject has a handful of counters, so this beats a hash map in
/// both time and memory (a 3-entry `HashMap` allocates 4 buckets plus control
/// bytes and a hasher per subject). Names are interned when decoded (see
/// [`intern`]), so most comparisons are a pointer check. Serialized exactly as
/// a map, the format the snapshot codec has always written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterMap(Vec<(Arc<str>, Counter)>);

impl CounterMap {
    fn position(&self, limit: &str) -> Option<usize> {
        self.0
            .iter()
            .position(|(k, _)| std::ptr::eq(k.as_ptr(), limit.as_ptr()) && k.len() == limit.len() || **k == *limit)
    }
    /// The counter of `limit`.
    pub fn get(&self, limit: &str) -> Option<&Counter> {
        self.position(limit).map(|i| &self.0[i].1)
    }
    /// Inserts or replaces.
    pub fn insert(&mut self, limit: Arc<str>, c: Counter) {
        match self.position(&limit) {
            Some(i) => self.0[i].1 = c,
            None => {
                // Grow by one: counters are added rarely, memory is per subject.
                self.0.reserve_exact(1);
                self.0.push((limit, c));
            }
        }
    }
    /// Makes room for `extra` more counters in one allocation (still exact:
    /// memory is per subject).
    fn reserve_exact(&mut self, extra: usize) {
        self.0.reserve_exact(extra);
    }
    /// Runs `f` on the counter of `limit` (`None` if absent); a `None` left by
    /// `f` removes it.
    pub fn update(&mut self, limit: &Arc<str>, f: impl FnOnce(&mut Option<Counter>)) {
        match self.position(limit) {
            Some(i) => {
                if !update_in_place(&mut self.0[i].1, f) {
                    self.0.remove(i);
                }
            }
            None => {
                let mut c = None;
                f(&mut c);
                if let Some(c) = c {
                    self.insert(limit.clone(), c);
                }
            }
        }
    }
    /// Keeps the counters `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Arc<str>, &Counter) -> bool) {
        self.0.retain(|(k, c)| keep(k, c));
        if self.0.capacity() > self.0.len() + 4 {
            self.0.shrink_to_fit();
        }
    }
    /// (limit, counter) pairs, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Counter)> {
        self.0.iter().map(|(k, c)| (k, c))
    }
    /// Limit names.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(k, _)| k)
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for CounterMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, c)| (&**k, c)))
    }
}

impl<'de> Deserialize<'de> for CounterMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CounterMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of limit names to counters")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<CounterMap, M::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(0).min(64));
                while let Some((k, c)) = m.next_entry::<std::borrow::Cow<'de, str>, Counter>()? {
                    let k = intern(&k);
                    if v.iter().any(|(x, _): &(Arc<str>, Counter)| *x == k) {
                        return Err(serde::de::Error::custom(format!("counter {k:?} appears twice")));
                    }
                    v.push((k, c));
                }
                v.shrink_to_fit();
                Ok(CounterMap(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Interned limit names: millions of decoded counters share a few names, and
/// a separate allocation per counter was a third of a counter's memory.
/// Per thread (decoding is single-threaded per snapshot or replay); capped so
/// that arbitrary names cannot grow it without bound.
pub fn intern(name: &str) -> Arc<str> {
    use std::cell::RefCell;
    use std::collections::HashSet;
    const CAP: usize = 4096;
    thread_local! {
        static NAMES: RefCell<HashSet<Arc<str>>> = RefCell::new(HashSet::new());
    }
    NAMES.with(|n| {
        let mut n = n.borrow_mut();
        if let Some(a) = n.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        if n.len() < CAP {
            n.insert(a.clone());
        }
        a
    })
}

/// Deserializes a limit name through [`intern`].
pub fn deserialize_interned<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
    Ok(intern(&s))
}

/// A name as the key of an ordered map, ordered exactly as `str` is. Its
/// first 16 bytes, zero-padded and read big-endian, are compared first: the
/// search for a new name's place among 100k others then reads the names
/// themselves (a pointer to chase and a likely cache miss per comparison)
/// only when two share their first 16 bytes. That search ran on a decision's
/// locked path for every new subject and usage bucket.
///
/// The order equals `str`'s, so looking up by `&str` (through `Borrow`) is
/// sound: where two names first differ inside 16 bytes, their heads differ
/// the same way; a name that is a prefix of the other within 16 bytes has
/// the smaller head, or an equal one (the other goes on with zero bytes),
/// and equal heads fall back to comparing the names.
///
/// The derived order compares the fields in turn: `head`, then `name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SortKey {
    head: u128,
    name: Arc<str>,
}

impl SortKey {
    /// The key of `name`.
    pub fn new(name: Arc<str>) -> SortKey {
        let mut head = [0u8; 16];
        let n = name.len().min(16);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        SortKey {
            head: u128::from_be_bytes(head),
            name,
        }
    }
    /// The name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
}

impl From<Arc<str>> for SortKey {
    fn from(name: Arc<str>) -> SortKey {
        SortKey::new(name)
    }
}

impl std::ops::Deref for SortKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::borrow::Borrow<str> for SortKey {
    fn borrow(&self) -> &str {
        &self.name
    }
}

/// A shard's subjects: a hash map for the lookups every decision makes, and
/// an ordered index of the names, touched only when a subject appears or goes,
/// for listing in order. Serialized as the map alone; the index is rebuilt.
#[derive(Debug, Default, Clone)]
pub struct Subjects {
    map: FastMap<Arc<str>, SubjectState>,
    order: BTreeSet<SortKey>,
}

impl Subjects {
    /// The subject's state.
    pub fn get(&self, s: &str) -> Option<&SubjectState> {
        self.map.get(s)
    }
    /// The subject's state, mutable.
    pub fn get_mut(&mut self, s: &str) -> Option<&mut SubjectState> {
        self.map.get_mut(s)
    }
    /// Whether the subject is known.
    pub fn contains_key(&self, s: &str) -> bool {
        self.map.contains_key(s)
    }
    /// The subject's state, created empty if absent.
    pub fn get_or_default(&mut self, s: &Arc<str>) -> &mut SubjectState {
        match self.map.entry(s.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                self.order.insert(SortKey::new(s.clone()));
                v.insert(SubjectState::default())
            }
        }
    }
    /// Inserts or replaces a subject.
    pub fn insert(&mut self, s: Arc<str>, st: SubjectState) {
        self.order.insert(SortKey::new(s.clone()));
        self.map.insert(s, st);
    }
    /// Forgets a subject.
    pub fn remove(&mut self, s: &str) -> Option<SubjectState> {
        self.order.remove(s);
        self.map.remove(s)
    }
    /// Keeps the subjects `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Arc<str>, &mut SubjectState) -> bool) {
        let order = &mut self.order;
        self.map.retain(|k, v| {
            let kept = keep(k, v);
            if !kept {
                order.remove(&**k);
            }
            kept
        });
    }
    /// All subjects, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &SubjectState)> {
        self.map.iter()
    }
    /// All states.
    pub fn values(&self) -> impl Iterator<Item = &SubjectState> {
        self.map.values()
    }
    /// All states, mutable.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut SubjectState> {
        self.map.values_mut()
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// Subjects after `after` in byte order, with their state.
    pub fn range_after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a SubjectState)> + 'a {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.order
            .range::<str, _>((lower, Bound::Unbounded))
            .filter_map(move |k| Some((k.name(), self.map.get(&**k)?)))
    }
}

impl IntoIterator for Subjects {
    type Item = (Arc<str>, SubjectState);
    type IntoIter = std::collections::hash_map::IntoIter<Arc<str>, SubjectState>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

impl Serialize for Subjects {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Subjects {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: FastMap<Arc<str>, SubjectState> = FastMap::deserialize(d)?;
        let order = map.keys().cloned().map(SortKey::new).collect();
        Ok(Subjects { map, order })
    }
}

/// One shard of the state. Which shard an item lives in is a hash of its key
/// (see `Engine::shard_of_*`); a mutation is applied to the shard of its key.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Shard {
    /// Every record at or below this LSN that touched this shard is applied here;
    /// a snapshot of the shard is as of this LSN, and replay skips what it covers.
    pub applied_lsn: Lsn,
    /// Subjects by name, ordered for listing.
    pub subjects: Subjects,
    /// Counters of global and attribute scope.
    pub shared: FastMap<CounterKey, Counter>,
    /// Reservations by id, active and recently finished, with the LSN of the
    /// record that last changed them (a repeated answer waits for it).
    pub reservations: FastMap<String, (Reservation, Lsn)>,
    /// Idempotency entries by key, with the LSN of the record that stored them.
    pub idempotency: FastMap<String, (IdempotencyEntry, Lsn)>,
    /// Usage history not yet in the snapshot file: (subject, hour start) →
    /// metric → amount. A snapshot moves it out (with the shard, so it is as
    /// of `applied_lsn`), so it is not part of the encoded shard.
    #[serde(skip)]
    pub usage: UsageLedger,
    /// Active holds on this shard's counters, by counter, soonest expiry
    /// first: when held capacity returns if the hold is never finished.
    /// Derived from the reservations (rebuilt at recovery), not encoded.
    #[serde(skip)]
    pub hold_expiries: FastMap<CounterKey, HoldSchedule>,
}

/// One counter's active holds: (expiry, reservation id) → (slot, amount).
pub type HoldSchedule = BTreeMap<(Millis, String), (Slot, u64)>;

/// Adds (`add`) or removes a reservation's holds in the schedules of their
/// counters' shards.
pub fn index_holds<A: ShardAccess>(access: &mut A, r: &Reservation, add: bool) {
    for h in r.holds.iter().filter(|h| h.amount > 0) {
        let shard = match &h.counter.scope {
            ScopeKey::Subject(s) => access.subject_shard(s),
            _ => access.shared_shard(&h.counter),
        };
        let key = (r.expires_ms, r.id.clone());
        if add {
            shard
                .hold_expiries
                .entry(h.counter.clone())
                .or_default()
                .insert(key, (h.slot, h.amount));
        } else if let Some(m) = shard.hold_expiries.get_mut(&h.counter) {
            m.remove(&key);
            if m.is_empty() {
                shard.hold_expiries.remove(&h.counter);
            }
        }
    }
}

/// Usage added since the last snapshot: (subject, hour start) → (metric,
/// amount) pairs. A small vector, not a map: a bucket has a few metrics, and
/// a map node per bucket was most of the memory it took.
pub type UsageDeltas = BTreeMap<(SortKey, Millis), Vec<(Arc<str>, u64)>>;

/// Adds `amount` of `metric` to a bucket.
pub fn add_usage(bucket: &mut Vec<(Arc<str>, u64)>, metric: &Arc<str>, amount: u64) {
    match bucket.iter_mut().find(|(m, _)| m == metric) {
        Some((_, v)) => *v = v.saturating_add(amount).min(crate::engine::policy::MAX_SAFE_INTEGER),
        None => bucket.push((metric.clone(), amount)),
    }
}

/// One subject's usage in one hour: (hour start, (metric, amount) pairs).
pub type HourBucket = (Millis, Vec<(Arc<str>, u64)>);

/// A shard's usage not yet in the snapshot file. Every consume adds to one
/// bucket, found by hashing its subject and then among that subject's few
/// hours: an ordered map of (subject, hour) searched several nodes per
/// charge, the largest item of a decision's own code. Listing in order goes
/// through an index of the subjects that hold any, which changes only when
/// a subject gets its first bucket since the last snapshot.
#[derive(Debug, Default, Clone)]
pub struct UsageLedger {
    /// Subject → its buckets, in hour order.
    by_subject: FastMap<Arc<str>, Vec<HourBucket>>,
    /// The subjects of `by_subject`, in byte order.
    order: BTreeSet<SortKey>,
    /// (subject, hour) buckets in all.
    buckets: usize,
}

impl UsageLedger {
    /// Adds `amounts` to the subject's bucket of the hour starting at `hour`.
    pub fn add(&mut self, subject: &Arc<str>, hour: Millis, amounts: &[(Arc<str>, u64)]) {
        let hours = match self.by_subject.get_mut(&**subject) {
            Some(hours) => hours,
            None => {
                self.order.insert(SortKey::new(subject.clone()));
                self.by_subject
                    .entry(subject.clone())
                    .or_insert_with(|| Vec::with_capacity(1))
            }
        };
        // Charges come in time order: the hour is the last one, or new.
        let i = match hours.iter().rposition(|(h, _)| *h <= hour) {
            Some(i) if hours[i].0 == hour => i,
            before => {
                let at = before.map_or(0, |i| i + 1);
                hours.insert(at, (hour, Vec::new()));
                self.buckets += 1;
                at
            }
        };
        for (m, a) in amounts {
            add_usage(&mut hours[i].1, m, *a);
        }
    }

    /// (subject, hour) buckets held.
    pub fn len(&self) -> usize {
        self.buckets
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.buckets == 0
    }

    /// Every bucket, as deltas.
    pub fn into_deltas(self) -> UsageDeltas {
        let UsageLedger {
            mut by_subject, order, ..
        } = self;
        let mut sorted = Vec::with_capacity(order.len());
        for key in order {
            for (hour, amounts) in by_subject.remove(key.name()).unwrap_or_default() {
                sorted.push(((key.clone(), hour), amounts));
            }
        }
        sorted.into_iter().collect()
    }

    /// Adds `deltas` (a failed snapshot's, given back).
    pub fn merge(&mut self, deltas: UsageDeltas) {
        for ((subject, hour), amounts) in deltas {
            self.add(subject.name(), hour, &amounts);
        }
    }

    /// The subjects within `range`, in byte order, with their buckets.
    pub fn range<'a>(
        &'a self,
        range: (std::ops::Bound<&'a str>, std::ops::Bound<&'a str>),
    ) -> impl Iterator<Item = (&'a SortKey, &'a [HourBucket])> + 'a {
        self.order
            .range::<str, _>(range)
            .filter_map(|k| Some((k, self.by_subject.get(&**k)?.as_slice())))
    }

    /// Copies the buckets of the subjects within `range` into `out`.
    pub fn copy_range(&self, range: (std::ops::Bound<&str>, std::ops::Bound<&str>), out: &mut UsageDeltas) {
        for (subject, hours) in self.range(range) {
            for (hour, amounts) in hours {
                out.insert((subject.clone(), *hour), amounts.clone());
            }
        }
    }
}

/// Adds `from` into `into`.
pub fn merge_usage(into: &mut UsageDeltas, from: UsageDeltas) {
    for (k, amounts) in from {
        let e = into.entry(k).or_default();
        for (m, a) in &amounts {
            add_usage(e, m, *a);
        }
    }
}

/// Gives `apply` the shard an item lives in. Implemented by the engine's lock
/// guard (live) and by plain access during replay.
pub trait ShardAccess {
    /// The shard of a subject.
    fn subject_shard(&mut self, subject: &str) -> &mut Shard;
    /// The shard of a global or attribute counter.
    fn shared_shard(&mut self, key: &CounterKey) -> &mut Shard;
    /// The shard of a reservation.
    fn reservation_shard(&mut self, id: &str) -> &mut Shard;
    /// The shard of an idempotency key.
    fn idempotency_shard(&mut self, key: &str) -> &mut Shard;
    /// Every shard the record being applied reaches (live: all are locked;
    /// replay: those its snapshot does not already cover).
    fn each_shard(&mut self, f: &mut dyn FnMut(&mut Shard));
}

/// Effects of `apply` that live outside the shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Change in the number of active reservations.
    pub open_reservations_delta: isize,
    /// Change in the number of idempotency keys kept.
    pub idempotency_keys_delta: isize,
}

/// Runs `f` on a stored counter where it lies; false when `f` left `None`
/// (the caller removes it).
fn update_in_place(c: &mut Counter, f: impl FnOnce(&mut Option<Counter>)) -> bool {
    let mut v = Some(std::mem::replace(c, Counter::Lifetime { used: 0, credited: 0 }));
    f(&mut v);
    match v {
        Some(v) => {
            *c = v;
            true
        }
        None => false,
    }
}

/// Runs `f` on a counter (`None` if absent; a `None` left by `f` removes it),
/// and forgets a subject that is left with nothing.
fn update_counter<A: ShardAccess>(access: &mut A, key: &CounterKey, f: impl FnOnce(&mut Option<Counter>)) {
    match &key.scope {
        ScopeKey::Subject(s) => {
            let subjects = &mut access.subject_shard(s).subjects;
            let st = subjects.get_or_default(s);
            st.counters.update(&key.limit, f);
            if st.is_empty() {
                subjects.remove(s);
            }
        }
        _ => {
            let shared = &mut access.shared_shard(key).shared;
            match shared.get_mut(key) {
                // In place: every call that a global limit matches lands here.
                Some(c) => {
                    if !update_in_place(c, f) {
                        shared.remove(key);
                    }
                }
                None => {
                    let mut v = None;
                    f(&mut v);
                    if let Some(v) = v {
                        shared.insert(key.clone(), v);
                    }
                }
            }
        }
    }
}

/// The subject and limit of a charge to a subject's counter.
fn subject_charge(m: &Mutation) -> Option<(&Arc<str>, &Arc<str>)> {
    match m {
        Mutation::Charge {
            counter: CounterKey {
                limit,
                scope: ScopeKey::Subject(s),
            },
            ..
        } => Some((s, limit)),
        _ => None,
    }
}

/// How many of the leading mutations of `muts` are charges to one subject's
/// counters (0 if the first is not): a decision's charges to its subject come
/// together, and [`apply_subject_charges`] applies such a run with one lookup.
pub fn subject_charge_run(muts: &[Mutation]) -> usize {
    let Some((first, _)) = muts.first().and_then(subject_charge) else {
        return 0;
    };
    1 + muts[1..]
        .iter()
        // `==` on an `Arc<str>` compares the pointers first.
        .take_while(|m| subject_charge(m).is_some_and(|(s, _)| s == first))
        .count()
}

/// Applies a run of charges to one subject's counters (see
/// [`subject_charge_run`]): the same end state as applying each in turn, with
/// the subject looked up once and its counter list grown once.
pub fn apply_subject_charges<A: ShardAccess>(access: &mut A, run: &[Mutation]) {
    let Some((s, _)) = run.first().and_then(subject_charge) else {
        return;
    };
    let subjects = &mut access.subject_shard(s).subjects;
    let st = subjects.get_or_default(s);
    // Distinct limits the subject has no counter for (a run is a handful).
    let limit_at = |i: usize| subject_charge(&run[i]).map(|(_, l)| l);
    let new = (0..run.len())
        .filter(|&i| {
            limit_at(i).is_some_and(|l| st.counters.get(l).is_none() && !(0..i).any(|j| limit_at(j) == Some(l)))
        })
        .count();
    if new > 0 {
        st.counters.reserve_exact(new);
    }
    for m in run {
        if let Mutation::Charge {
            counter,
            slot,
            delta,
            at_ms,
        } = m
        {
            debug_assert!(matches!(&counter.scope, ScopeKey::Subject(x) if x == s));
            st.counters
                .update(&counter.limit, |c| apply_charge(c, slot, *delta, *at_ms));
        }
    }
    if st.is_empty() {
        subjects.remove(s);
    }
}

fn tidy_subject<A: ShardAccess>(access: &mut A, subject: &str) {
    let shard = access.subject_shard(subject);
    if shard.subjects.get(subject).is_some_and(SubjectState::is_empty) {
        shard.subjects.remove(subject);
    }
}

/// Applies one mutation. `lsn` is the record it belongs to.
pub fn apply<A: ShardAccess>(access: &mut A, m: &Mutation, lsn: Lsn) -> Applied {
    let mut out = Applied::default();
    match m {
        Mutation::Charge {
            counter,
            slot,
            delta,
            at_ms,
        } => {
            update_counter(access, counter, |c| apply_charge(c, slot, *delta, *at_ms));
        }
        Mutation::Credit {
            counter,
            slot,
            amount,
            at_ms,
        } => {
            update_counter(access, counter, |c| apply_credit(c, slot, *amount, *at_ms));
        }
        Mutation::ResetCounter { counter } => {
            update_counter(access, counter, |c| *c = None);
        }
        Mutation::Usage {
            subject,
            at_ms,
            amounts,
        } => {
            let hour = at_ms - at_ms % 3_600_000;
            access.subject_shard(subject).usage.add(subject, hour, amounts);
        }
        Mutation::SetSubject {
            subject,
            plan,
            overrides,
        } => {
            let st = access.subject_shard(subject).subjects.get_or_default(subject);
            st.set_plan(plan.clone(), overrides.clone());
            tidy_subject(access, subject);
        }
        Mutation::DeleteSubject { subject } => {
            access.subject_shard(subject).subjects.remove(subject);
        }
        Mutation::SetPolicy(change) if !change.dropped.is_empty() => {
            let gone = |name: &Arc<str>| change.dropped.iter().any(|d| d == name);
            access.each_shard(&mut |shard| {
                shard.shared.retain(|k, _| !gone(&k.limit));
                shard.subjects.retain(|_, st| {
                    st.counters.retain(|name, _| !gone(name));
                    !st.is_empty()
                });
            });
        }
        Mutation::SetPolicy(_) => {}
        Mutation::PutReservation(r) => {
            let old = access
                .reservation_shard(&r.id)
                .reservations
                .insert(r.id.clone(), ((**r).clone(), lsn))
                .filter(|(old, _)| old.status == ReservationStatus::Active);
            let was_active = old.is_some();
            let is_active = r.status == ReservationStatus::Active;
            if let Some((old, _)) = &old {
                index_holds(access, old, false);
            }
            if is_active {
                index_holds(access, r, true);
            }
            out.open_reservations_delta = isize::from(is_active) - isize::from(was_active);
            let st = access.subject_shard(&r.subject).subjects.get_or_default(&r.subject);
            st.edit_extra(|e| {
                if is_active {
                    e.holds.insert(r.id.clone());
                } else {
                    e.holds.remove(&r.id);
                }
            });
            tidy_subject(access, &r.subject);
        }
        Mutation::DropReservation { id, active_subject } => {
            if let Some((r, _)) = access.reservation_shard(id).reservations.remove(id) {
                if r.status == ReservationStatus::Active {
                    out.open_reservations_delta = -1;
                    index_holds(access, &r, false);
                }
            }
            // Only an active reservation is listed in its subject, so dropping a
            // finished one (garbage collection) touches the reservation's shard alone.
            if let Some(subject) = active_subject {
                if let Some(st) = access.subject_shard(subject).subjects.get_mut(subject) {
                    st.edit_extra(|e| {
                        e.holds.remove(id);
                    });
                }
                tidy_subject(access, subject);
            }
        }
        Mutation::PutIdempotency { key, entry } => {
            let old = access
                .idempotency_shard(key)
                .idempotency
                .insert(key.clone(), ((**entry).clone(), lsn));
            out.idempotency_keys_delta = isize::from(old.is_none());
        }
        Mutation::DropIdempotency { key } => {
            let old = access.idempotency_shard(key).idempotency.remove(key);
            out.idempotency_keys_delta = -isize::from(old.is_some());
        }
        // Signals live outside the shards (the engine applies them itself).
        Mutation::Signal(_) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names around the 16-byte head: shorter and longer, equal heads with
    /// different tails, zero bytes where the padding is, multi-byte letters
    /// across the boundary.
    fn names() -> Vec<String> {
        let mut out = vec![String::new()];
        let stems = ["", "a", "user:", "user:123456789ab", "user:123456789abc", "é"];
        let tails = ["", "\0", "\0a", "a", "b", "ab", "é", "\u{10FFFF}", "aaaaaaaaaaaaaaaaaa"];
        for stem in stems {
            for t1 in tails {
                for t2 in ["", "\0", "z"] {
                    out.push(format!("{stem}{t1}{t2}"));
                    out.push(format!("{stem:0<15}{t1}{t2}"));
                    out.push(format!("{stem:x<16}{t1}{t2}"));
                    out.push(format!("{stem:x<17}{t1}{t2}"));
                }
            }
        }
        out
    }

    #[test]
    fn sort_keys_order_as_names_do() {
        let names = names();
        for a in &names {
            let ka = SortKey::new(Arc::from(a.as_str()));
            for b in &names {
                let kb = SortKey::new(Arc::from(b.as_str()));
                assert_eq!(ka.cmp(&kb), a.as_str().cmp(b.as_str()), "{a:?} against {b:?}");
                assert_eq!(ka == kb, a == b, "{a:?} against {b:?}");
            }
        }
    }

    #[test]
    fn a_sort_key_set_is_found_and_ranged_by_str() {
        let names = names();
        let set: BTreeSet<SortKey> = names.iter().map(|n| SortKey::new(Arc::from(n.as_str()))).collect();
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(set.iter().map(|k| &**k).collect::<Vec<_>>(), sorted);
        for (i, n) in sorted.iter().enumerate() {
            assert!(set.contains(*n), "{n:?} is found by its name");
            let after: Vec<&str> = set
                .range::<str, _>((std::ops::Bound::Excluded(*n), std::ops::Bound::Unbounded))
                .map(|k| &**k)
                .collect();
            assert_eq!(after, sorted[i + 1..], "names after {n:?}");
        }
    }

    /// The ledger against the ordered map it replaced, over charges in and
    /// out of time order, to subjects named around the 16-byte head.
    #[test]
    fn the_usage_ledger_holds_what_an_ordered_map_of_buckets_would() {
        let names = names();
        let metrics: Vec<Arc<str>> = ["requests", "tokens", "usd_micros"].map(Arc::from).to_vec();
        let mut ledger = UsageLedger::default();
        let mut model = UsageDeltas::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for step in 0..20_000 {
            let subject: Arc<str> = Arc::from(names[next(names.len())].as_str());
            // Mostly the current hour, sometimes an earlier or a later one.
            let hour = 3_600_000 * (100 + step / 4_000 + next(3)) as u64;
            let amounts: Vec<(Arc<str>, u64)> = (0..1 + next(3))
                .map(|_| (metrics[next(3)].clone(), 1 + next(1000) as u64))
                .collect();
            ledger.add(&subject, hour, &amounts);
            let bucket = model.entry((SortKey::new(subject), hour)).or_default();
            for (m, a) in &amounts {
                add_usage(bucket, m, *a);
            }
        }
        assert_eq!(ledger.len(), model.len());
        let mut one = UsageDeltas::new();
        let user = std::ops::Bound::Included("user:");
        ledger.copy_range((user, user), &mut one);
        let expect: UsageDeltas = model
            .iter()
            .filter(|((s, _), _)| &**s == "user:")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(one, expect);
        let mut all = UsageDeltas::new();
        ledger.copy_range((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded), &mut all);
        assert_eq!(all, model);
        let (lo, hi) = ("a", "user:123456789abc");
        let ranged: Vec<(&str, Millis)> = ledger
            .range((std::ops::Bound::Excluded(lo), std::ops::Bound::Included(hi)))
            .flat_map(|(k, hours)| hours.iter().map(move |(h, _)| (&**k, *h)))
            .collect();
        let expect: Vec<(&str, Millis)> = model
            .keys()
            .filter(|(k, _)| &**k > lo && &**k <= hi)
            .map(|(k, h)| (&**k, *h))
            .collect();
        assert_eq!(ranged, expect, "in order of subject, then hour");
        // Given back after a failed snapshot, the buckets add up again.
        let mut back = UsageLedger::default();
        back.merge(model.clone());
        back.merge(model.clone());
        let doubled = back.into_deltas();
        assert_eq!(doubled.len(), model.len());
        for (k, v) in &model {
            for (m, a) in v {
                let got = doubled[k].iter().find(|(n, _)| n == m).map(|(_, a)| *a);
                assert_eq!(got, Some((2 * a).min(crate::engine::policy::MAX_SAFE_INTEGER)));
            }
        }
        assert_eq!(ledger.into_deltas(), model);
    }

    /// Every key on one shard: enough to apply mutations in a test.
    struct OneShard(Shard);

    impl ShardAccess for OneShard {
        fn subject_shard(&mut self, _: &str) -> &mut Shard {
            &mut self.0
        }
        fn shared_shard(&mut self, _: &CounterKey) -> &mut Shard {
            &mut self.0
        }
        fn reservation_shard(&mut self, _: &str) -> &mut Shard {
            &mut self.0
        }
        fn idempotency_shard(&mut self, _: &str) -> &mut Shard {
            &mut self.0
        }
        fn each_shard(&mut self, f: &mut dyn FnMut(&mut Shard)) {
            f(&mut self.0)
        }
    }

    fn charge(subject: &Arc<str>, limit: usize, delta: i64, slot: u8) -> Mutation {
        Mutation::Charge {
            counter: CounterKey {
                limit: intern(&format!("limit-{limit}")),
                scope: ScopeKey::Subject(subject.clone()),
            },
            slot: match slot {
                0 => Slot::Fixed {
                    start_ms: 0,
                    end_ms: 1000,
                },
                1 => Slot::Fixed {
                    start_ms: 1000,
                    end_ms: 2000,
                },
                _ => Slot::Lifetime,
            },
            delta,
            at_ms: 500,
        }
    }

    proptest::proptest! {
        /// A run of charges to one subject, applied with one lookup, leaves
        /// what applying them one by one leaves, on a new subject or one with
        /// counters already.
        #[test]
        fn a_run_of_charges_applies_as_the_charges_one_by_one(
            before in proptest::collection::vec((0usize..4, 0i64..5, 0u8..3), 0..4),
            run in proptest::collection::vec((0usize..5, -5i64..5, 0u8..3), 1..9),
        ) {
            let s: Arc<str> = Arc::from("subject-a");
            let before: Vec<Mutation> = before.iter().map(|&(l, d, w)| charge(&s, l, d, w)).collect();
            let run: Vec<Mutation> = run.iter().map(|&(l, d, w)| charge(&s, l, d, w)).collect();
            proptest::prop_assert_eq!(subject_charge_run(&run), run.len());
            let mut one_by_one = OneShard(Shard::default());
            let mut together = OneShard(Shard::default());
            for m in &before {
                apply(&mut one_by_one, m, 1);
                apply(&mut together, m, 1);
            }
            for m in &run {
                apply(&mut one_by_one, m, 2);
            }
            apply_subject_charges(&mut together, &run);
            proptest::prop_assert_eq!(one_by_one.0.subjects.get("subject-a"), together.0.subjects.get("subject-a"));
            proptest::prop_assert_eq!(one_by_one.0.subjects.len(), together.0.subjects.len());
            // Grown once, to fit: a limit charged twice in the run is one counter.
            let counters = &together.0.subjects.get("subject-a").expect("charged").counters.0;
            proptest::prop_assert_eq!(counters.capacity(), counters.len());
        }
    }

    #[test]
    fn a_run_ends_at_another_subject_or_another_kind_of_change() {
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let global = Mutation::Charge {
            counter: CounterKey {
                limit: intern("global-limit"),
                scope: ScopeKey::Global,
            },
            slot: Slot::Lifetime,
            delta: 1,
            at_ms: 0,
        };
        let usage = Mutation::Usage {
            subject: a.clone(),
            at_ms: 0,
            amounts: Vec::new(),
        };
        assert_eq!(subject_charge_run(&[]), 0);
        assert_eq!(subject_charge_run(std::slice::from_ref(&global)), 0);
        assert_eq!(
            subject_charge_run(&[charge(&a, 0, 1, 0), charge(&a, 1, 1, 0), charge(&b, 0, 1, 0)]),
            2
        );
        assert_eq!(
            subject_charge_run(&[charge(&a, 0, 1, 0), global, charge(&a, 1, 1, 0)]),
            1
        );
        // Equal names in different allocations are one subject.
        let a2: Arc<str> = Arc::from("a");
        assert_eq!(
            subject_charge_run(&[charge(&a, 0, 1, 0), charge(&a2, 1, 1, 0), usage]),
            2
        );
    }
}
