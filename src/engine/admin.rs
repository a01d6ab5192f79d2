//! Subject administration (plan, overrides, reset, credit, delete), the
//! read-side views (subject, listing), and garbage collection.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::*;
use crate::engine::policy::MAX_SAFE_INTEGER;

/// Holds dropped per WAL record when a subject is deleted: each takes about
/// 100 bytes of the record (its refunds and its drop).
const HOLDS_PER_DELETE_RECORD: usize = 1_000;

impl Engine {
    /// The shape shared by subject writes: lock the subject's shard (and the
    /// key's), answer a repeated key, else build the mutations from the
    /// subject's current state, add the key's entry and commit. The answer is
    /// whether this was a replay.
    fn subject_write(
        &self,
        policy: &Policy,
        subject: &str,
        idem_key: Option<&str>,
        fp: u64,
        now: Millis,
        build: impl FnOnce(Option<&SubjectState>) -> Result<Vec<Mutation>, EngineError>,
    ) -> Result<Applied<bool>, EngineError> {
        if idem_key.is_some() {
            self.make_room_for_keys(policy, now)?;
        }
        let mut locked = self.lock(self.admin_shards(subject, idem_key));
        if !self.policy_current(policy) {
            // The plan named may be gone: `build` must see the policy in force.
            return Err(EngineError::Unavailable(
                "the policy changed while this write waited; retry it".into(),
            ));
        }
        if let Some((lsn, _)) = Self::check_admin_idempotency(&mut locked, idem_key, fp, now)? {
            return Ok(Applied {
                value: true,
                lsn: Some(lsn),
            });
        }
        if idem_key.is_some() {
            self.check_key_room(policy)?;
        }
        let mut muts = build(locked.subject_shard(subject).subjects.get(subject))?;
        muts.extend(Self::admin_entry(policy, idem_key, fp, subject, true, now));
        let lsn = locked.commit(&muts, now)?;
        Ok(Applied { value: false, lsn })
    }

    /// A repeated key's LSN and stored answer, or `None` for a new key.
    pub(super) fn check_admin_idempotency(
        locked: &mut Locked<'_>,
        key: Option<&str>,
        fp: u64,
        now: Millis,
    ) -> Result<Option<(Lsn, StoredAnswer)>, EngineError> {
        let Some(k) = key else { return Ok(None) };
        // An entry past its retention is as good as gone, whether or not GC ran yet.
        match locked
            .idempotency_shard(k)
            .idempotency
            .get(k)
            .filter(|(e, _)| e.expires_ms > now)
        {
            Some((e, lsn)) if e.fingerprint == fp => Ok(Some((*lsn, e.answer.unpack()))),
            Some(_) => Err(EngineError::IdempotencyConflict(k.to_string())),
            None => Ok(None),
        }
    }

    /// The entry an admin write keeps under its key; `existed` is what a
    /// DELETE answers on a retry.
    fn admin_entry(
        policy: &Policy,
        key: Option<&str>,
        fp: u64,
        subject: &str,
        existed: bool,
        now: Millis,
    ) -> Option<Mutation> {
        key.map(|k| Mutation::PutIdempotency {
            key: k.to_string(),
            entry: Box::new(IdempotencyEntry {
                fingerprint: fp,
                answer: PackedAnswer::pack(&StoredAnswer::Deleted {
                    subject: subject.to_string(),
                    existed,
                }),
                expires_ms: now.saturating_add(policy.settings.idempotency_retention_ms),
            }),
        })
    }

    fn admin_shards(&self, subject: &str, key: Option<&str>) -> Vec<usize> {
        let mut s = vec![self.shard_of_subject(subject)];
        if let Some(k) = key {
            s.push(self.shard_of_idempotency(k));
        }
        s
    }

    /// Assigns a plan and/or overrides (`None` keeps what the subject has). The
    /// answer is whether this was a replay of an earlier identical request.
    pub fn put_subject(
        &self,
        subject: &str,
        plan: Option<&str>,
        overrides: Option<&BTreeMap<String, Override>>,
        idem_key: Option<&str>,
        now_ms: Millis,
    ) -> Result<Applied<bool>, EngineError> {
        let (now, policy) = self.begin(now_ms);
        if let Some(p) = plan {
            if !policy.plan_index.contains_key(p) {
                return Err(EngineError::UnknownPlan(p.to_string()));
            }
        }
        for name in overrides.into_iter().flat_map(|o| o.keys()) {
            let shape = policy
                .shapes
                .get(name.as_str())
                .ok_or_else(|| EngineError::UnknownLimit(name.clone()))?;
            if shape.scope != Scope::Subject {
                return Err(EngineError::InvalidRequest(format!(
                    "overrides.{name}: limit {name:?} is not scoped per subject, so it cannot be overridden per subject"
                )));
            }
        }
        let fp = fingerprint("put_subject", &(subject, plan, overrides));
        self.subject_write(&policy, subject, idem_key, fp, now, |current| {
            let current = current.cloned().unwrap_or_default();
            let new_plan = plan.map(str::to_string).or(current.plan().map(str::to_string));
            if policy.plan_for(new_plan.as_deref()).is_none() {
                return Err(EngineError::UnknownSubject(subject.to_string()));
            }
            Ok(vec![Mutation::SetSubject {
                subject: subject.into(),
                plan: new_plan,
                overrides: overrides.cloned().unwrap_or_else(|| current.overrides().clone()),
            }])
        })
    }

    /// Forgets a subject: its plan, overrides, counters and active holds (holds on
    /// shared counters are refunded). The answer is (whether it was known,
    /// whether this is a replay of an earlier identical request).
    pub fn delete_subject(
        &self,
        subject: &str,
        idem_key: Option<&str>,
        now_ms: Millis,
    ) -> Result<Applied<(bool, bool)>, EngineError> {
        let (now, policy) = self.begin(now_ms);
        let fp = fingerprint("delete_subject", &subject);
        if idem_key.is_some() {
            self.make_room_for_keys(&policy, now)?;
        }
        let sshard = self.shard_of_subject(subject);
        loop {
            // Phase 1: the shards of the subject's holds.
            let holds: BTreeSet<String> = {
                let mut l = self.lock(vec![sshard]);
                l.shard(sshard)
                    .subjects
                    .get(subject)
                    .map(|s| s.holds().clone())
                    .unwrap_or_default()
            };
            let mut shards = self.admin_shards(subject, idem_key);
            for id in &holds {
                let rs = self.shard_of_reservation(id);
                shards.push(rs);
                let mut l = self.lock(vec![rs]);
                if let Some((r, _)) = l.shard(rs).reservations.get(id) {
                    shards.extend(r.holds.iter().map(|h| self.shard_of_counter(&h.counter)));
                }
            }
            let mut locked = self.lock(shards);
            let now_holds = locked
                .shard(sshard)
                .subjects
                .get(subject)
                .map(|s| s.holds().clone())
                .unwrap_or_default();
            if now_holds != holds {
                continue; // A hold came or went meanwhile: take the locks again.
            }
            if let Some((lsn, answer)) = Self::check_admin_idempotency(&mut locked, idem_key, fp, now)? {
                let existed = matches!(answer, StoredAnswer::Deleted { existed: true, .. });
                return Ok(Applied {
                    value: (existed, true),
                    lsn: Some(lsn),
                });
            }
            if idem_key.is_some() {
                self.check_key_room(&policy)?;
            }
            let existed = locked.shard(sshard).subjects.contains_key(subject);
            let subj: Arc<str> = subject.into();
            let mut muts = Vec::new();
            for (i, id) in holds.iter().enumerate() {
                if i > 0 && i % HOLDS_PER_DELETE_RECORD == 0 {
                    // A record per slice of holds keeps every record far below the
                    // WAL's size limit, whatever the count. Each slice is whole on
                    // its own (a hold dropped with its refund); a crash between
                    // them leaves the subject with fewer holds, and the retried
                    // delete finishes the job.
                    locked.commit(&std::mem::take(&mut muts), now)?;
                }
                let rs = self.shard_of_reservation(id);
                let Some((r, _)) = locked.shard(rs).reservations.get(id).cloned() else {
                    continue;
                };
                for h in r
                    .holds
                    .iter()
                    .filter(|h| h.amount > 0 && !matches!(h.counter.scope, ScopeKey::Subject(_)))
                {
                    muts.push(Mutation::Charge {
                        counter: h.counter.clone(),
                        slot: h.slot,
                        delta: -signed(h.amount),
                        at_ms: now,
                    });
                }
                muts.push(Mutation::DropReservation {
                    id: id.clone(),
                    active_subject: Some(subj.clone()),
                });
            }
            if existed {
                muts.push(Mutation::DeleteSubject {
                    subject: subject.into(),
                });
            }
            muts.extend(Self::admin_entry(&policy, idem_key, fp, subject, existed, now));
            let lsn = locked.commit(&muts, now)?;
            return Ok(Applied {
                value: (existed, false),
                lsn,
            });
        }
    }

    fn subject_limit(&self, policy: &Policy, name: &str) -> Result<Arc<Limit>, EngineError> {
        let shape = policy
            .shapes
            .get(name)
            .ok_or_else(|| EngineError::UnknownLimit(name.to_string()))?;
        if shape.scope != Scope::Subject {
            return Err(EngineError::InvalidRequest(format!(
                "limit: {name:?} is not scoped per subject; its counter is not the subject's"
            )));
        }
        let found = policy
            .plans
            .iter()
            .flat_map(|p| p.all.iter().map(|(l, _)| l))
            .chain(&policy.top_limits)
            .find(|l| &*l.name == name)
            .expect("every shape comes from a limit");
        Ok(found.clone())
    }

    /// Zeroes one or all of a subject's counters.
    pub fn reset(
        &self,
        subject: &str,
        limit: Option<&str>,
        idem_key: Option<&str>,
        now_ms: Millis,
    ) -> Result<Applied<bool>, EngineError> {
        let (now, policy) = self.begin(now_ms);
        if let Some(name) = limit {
            self.subject_limit(&policy, name)?;
        }
        let fp = fingerprint("reset", &(subject, limit));
        self.subject_write(&policy, subject, idem_key, fp, now, |st| {
            if policy.plan_for(st.and_then(|s| s.plan())).is_none() {
                return Err(EngineError::UnknownSubject(subject.to_string()));
            }
            let subj: Arc<str> = subject.into();
            let names: Vec<Arc<str>> = match limit {
                Some(n) => vec![n.into()],
                None => {
                    // Breaker and anomaly history is not the subject's quota: a reset keeps it.
                    let mut v: Vec<Arc<str>> = st
                        .iter()
                        .flat_map(|s| s.counters.keys().filter(|k| !super::signals::is_hidden(k)).cloned())
                        .collect();
                    v.sort();
                    v
                }
            };
            Ok(names
                .into_iter()
                .map(|l| Mutation::ResetCounter {
                    counter: CounterKey {
                        limit: l,
                        scope: ScopeKey::Subject(subj.clone()),
                    },
                })
                .collect())
        })
    }

    /// Gives back `amount` of a subject's limit (a top-up for lifetime limits).
    pub fn credit(
        &self,
        subject: &str,
        limit: &str,
        amount: u64,
        idem_key: Option<&str>,
        now_ms: Millis,
    ) -> Result<Applied<bool>, EngineError> {
        let (now, policy) = self.begin(now_ms);
        let l = self.subject_limit(&policy, limit)?;
        let fp = fingerprint("credit", &(subject, limit, amount));
        self.subject_write(&policy, subject, idem_key, fp, now, |st| {
            let assigned = st.and_then(|s| s.plan());
            let plan = policy
                .plan_for(assigned)
                .ok_or_else(|| EngineError::UnknownSubject(subject.to_string()))?;
            // The subject's own plan decides the slot when it has the limit.
            let kind = plan.limit(limit).map_or(&l.kind, |pl| &pl.kind);
            if let Kind::Lifetime = kind {
                // A top-up raises the cap: it must stay exactly readable by JSON clients.
                let credited = match st.and_then(|s| s.counters.get(limit)) {
                    Some(Counter::Lifetime { credited, .. }) => *credited,
                    _ => 0,
                };
                let no_overrides = BTreeMap::new();
                let overrides = st.map_or(&no_overrides, |s| s.overrides());
                let base = match effective_max(plan.limit(limit).unwrap_or(&l), overrides) {
                    MaxValue::Finite(m) => m,
                    MaxValue::Unlimited => 0,
                };
                let cap = base.saturating_add(credited).saturating_add(amount);
                if cap > MAX_SAFE_INTEGER {
                    return Err(EngineError::InvalidRequest(format!(
                        "amount: crediting {amount} would raise the cap of {limit:?} to {cap}, past \
                         {MAX_SAFE_INTEGER} (2^53-1), the largest count JSON clients read exactly"
                    )));
                }
            }
            Ok(vec![Mutation::Credit {
                counter: CounterKey {
                    limit: l.name.clone(),
                    scope: ScopeKey::Subject(subject.into()),
                },
                slot: slot_for(kind, now),
                amount,
                at_ms: now,
            }])
        })
    }

    /// The subject as `GET /v1/subjects/{s}` shows it.
    pub fn subject(&self, subject: &str, now_ms: Millis) -> Result<SubjectView, EngineError> {
        let (now, policy) = self.begin(now_ms);
        let sshard = self.shard_of_subject(subject);
        let st = self
            .lock(vec![sshard])
            .shard(sshard)
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default();
        let plan = policy
            .plan_for(st.plan())
            .ok_or_else(|| EngineError::UnknownSubject(subject.to_string()))?;
        let subj: Arc<str> = subject.into();
        let mut counters = Vec::new();
        for (limit, _) in &plan.all {
            let max = effective_max(limit, st.overrides());
            match &limit.scope {
                Scope::Subject => {
                    let key = CounterKey {
                        limit: limit.name.clone(),
                        scope: ScopeKey::Subject(subj.clone()),
                    };
                    let (u, _) = evaluate(&limit.kind, st.counters.get(&limit.name), now, 0, max);
                    counters.push(view(limit, &key, &u));
                }
                Scope::Global => {
                    let key = CounterKey {
                        limit: limit.name.clone(),
                        scope: ScopeKey::Global,
                    };
                    let i = self.shard_of_counter(&key);
                    let c = self.lock(vec![i]).shard(i).shared.get(&key).cloned();
                    let (u, _) = evaluate(&limit.kind, c.as_ref(), now, 0, max);
                    counters.push(view(limit, &key, &u));
                }
                Scope::Attribute(_) => {
                    // One counter per attribute value seen; listed in value order, at most 100.
                    let mut found: Vec<(CounterKey, Counter)> = Vec::new();
                    for i in 0..self.shards.len() {
                        let mut l = self.lock(vec![i]);
                        found.extend(
                            l.shard(i)
                                .shared
                                .iter()
                                .filter(|(k, _)| k.limit == limit.name)
                                .map(|(k, c)| (k.clone(), c.clone())),
                        );
                    }
                    found.sort_by(|a, b| a.0.cmp(&b.0));
                    for (key, c) in found.into_iter().take(100) {
                        let (u, _) = evaluate(&limit.kind, Some(&c), now, 0, max);
                        counters.push(view(limit, &key, &u));
                    }
                }
            }
        }
        Ok(SubjectView {
            subject: subject.to_string(),
            plan: plan.name.to_string(),
            assigned: assigned(&policy, &st),
            overrides: st.overrides().clone(),
            counters,
            flags: self
                .flags(Some(subject), now)
                .into_iter()
                .map(|f| SubjectFlag {
                    anomaly: f.anomaly,
                    since: crate::period::rfc3339(f.flag.since_ms),
                    used: f.flag.used,
                    baseline: f.flag.baseline,
                    action: f.flag.action,
                    until: crate::period::rfc3339(f.period_end_ms),
                })
                .collect(),
            cost_metric: policy.pricing.as_ref().map(|p| p.metric.clone()),
            currency: policy.pricing.as_ref().map(|p| p.currency.clone()),
        })
    }

    /// Counters at or above `min_fraction` of their finite, non-zero max,
    /// fullest first (then by scope and limit), at most `limit`. One pass
    /// over every counter, a shard at a time (each shard is locked only for
    /// its own part); memory holds a few times `limit` candidates at most.
    pub fn fullest_counters(&self, min_fraction: f64, limit: usize, now_ms: Millis) -> Vec<(f64, CounterView)> {
        let (now, policy) = self.begin(now_ms);
        // Global and attribute counters are named by their limit alone.
        let mut shared_limits: BTreeMap<&str, &Arc<Limit>> = BTreeMap::new();
        for plan in &policy.plans {
            for (l, _) in &plan.all {
                if !matches!(l.scope, Scope::Subject) {
                    shared_limits.entry(&*l.name).or_insert(l);
                }
            }
        }
        let order = |a: &(f64, CounterView), b: &(f64, CounterView)| {
            b.0.total_cmp(&a.0)
                .then_with(|| a.1.scope.cmp(&b.1.scope))
                .then_with(|| a.1.limit.cmp(&b.1.limit))
        };
        let mut found: Vec<(f64, CounterView)> = Vec::new();
        let offer = |found: &mut Vec<(f64, CounterView)>, l: &Limit, key: CounterKey, c: &Counter, max: MaxValue| {
            let MaxValue::Finite(m) = max else { return };
            if m == 0 {
                return;
            }
            let (u, _) = evaluate(&l.kind, Some(c), now, 0, max);
            let fraction = u.used as f64 / m as f64;
            if fraction >= min_fraction {
                found.push((fraction, view(l, &key, &u)));
                if found.len() >= limit.saturating_mul(4).max(64) {
                    found.sort_by(order);
                    found.truncate(limit);
                }
            }
        };
        for i in 0..self.shards.len() {
            let mut l = self.lock(vec![i]);
            let shard = l.shard(i);
            for (subject, st) in shard.subjects.iter() {
                if st.counters.is_empty() {
                    continue;
                }
                let Some(plan) = policy.plan_for(st.plan()) else {
                    continue;
                };
                for (limit, _) in &plan.all {
                    if !matches!(limit.scope, Scope::Subject) {
                        continue;
                    }
                    if let Some(c) = st.counters.get(&limit.name) {
                        let key = CounterKey {
                            limit: limit.name.clone(),
                            scope: ScopeKey::Subject(subject.clone()),
                        };
                        offer(&mut found, limit, key, c, effective_max(limit, st.overrides()));
                    }
                }
            }
            for (key, c) in shard.shared.iter() {
                if let Some(limit) = shared_limits.get(&*key.limit) {
                    offer(&mut found, limit, key.clone(), c, limit.max);
                }
            }
        }
        found.sort_by(order);
        found.truncate(limit);
        found
    }

    /// Known subjects after `after`, in byte order, at most `limit`, with the
    /// plan in force (as `subject` shows it) and whether it was assigned.
    pub fn list_subjects(&self, after: Option<&str>, limit: usize) -> Vec<(String, Option<String>, bool)> {
        let policy = self.policy();
        let mut out: Vec<(String, Option<String>, bool)> = Vec::new();
        for i in 0..self.shards.len() {
            let mut l = self.lock(vec![i]);
            out.extend(l.shard(i).subjects.range_after(after).take(limit).map(|(s, st)| {
                let plan = policy.plan_for(st.plan()).map(|p| p.name.to_string());
                (s.to_string(), plan, assigned(&policy, st))
            }));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        out
    }

    /// Drops what time has made useless: idle counters, expired idempotency keys and
    /// finished reservations past retention. At most `budget` items per shard per call.
    pub fn gc(&self, now_ms: Millis, budget: usize) -> Result<usize, EngineError> {
        let (now, policy) = self.begin(now_ms);
        let retention = policy.settings.idempotency_retention_ms;
        let mut dropped = 0;
        for i in 0..self.shards.len() {
            let mut l = self.lock(vec![i]);
            let shard = l.shard(i);
            // Idle counters are indistinguishable from absent ones: no record needed.
            let before = shard.shared.len();
            shard.shared.retain(|_, c| !c.is_idle(now));
            dropped += before - shard.shared.len();
            for st in shard.subjects.values_mut() {
                let before = st.counters.len();
                st.counters.retain(|_, c| !c.is_idle(now));
                dropped += before - st.counters.len();
            }
            shard.subjects.retain(|_, st| !st.is_empty());
            let mut muts: Vec<Mutation> = shard
                .idempotency
                .iter()
                .filter(|(_, (e, _))| e.expires_ms <= now)
                .take(budget)
                .map(|(k, _)| Mutation::DropIdempotency { key: k.clone() })
                .collect();
            muts.extend(
                shard
                    .reservations
                    .values()
                    .filter(|(r, _)| {
                        r.status != ReservationStatus::Active
                            && r.finished_ms
                                .unwrap_or(r.expires_ms)
                                .max(r.expires_ms)
                                .saturating_add(retention)
                                <= now
                    })
                    .take(budget)
                    .map(|(r, _)| Mutation::DropReservation {
                        id: r.id.clone(),
                        active_subject: None,
                    }),
            );
            dropped += muts.len();
            l.commit(&muts, now)?;
        }
        Ok(dropped)
    }

    /// A hash of the logical state at `now_ms`: subjects, live counters,
    /// reservations and idempotency keys. Independent of shard layout, map order
    /// and of idle counters that garbage collection may or may not have dropped,
    /// so state before a restart and after recovery hash the same.
    pub fn digest(&self, now_ms: Millis) -> StateDigest {
        fn item(parts: &[&[u8]]) -> u64 {
            let mut b = Vec::new();
            for p in parts {
                b.extend_from_slice(&(p.len() as u64).to_le_bytes());
                b.extend_from_slice(p);
            }
            // Finalize so that summing item hashes mixes well.
            let mut z = fnv1a(9, &b);
            z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            z ^ (z >> 33)
        }
        let json = |v: &dyn erased::Json| v.to_json();
        let mut d = StateDigest {
            note: DIGEST_NOTE,
            ..StateDigest::default()
        };
        let _ = self.for_each_shard(|_, shard| -> Result<(), ()> {
            for (name, st) in shard.subjects.iter() {
                if st.plan().is_some() || !st.overrides().is_empty() || !st.holds().is_empty() {
                    d.subjects += 1;
                    let holds: Vec<&String> = st.holds().iter().collect();
                    d.sum = d.sum.wrapping_add(item(&[
                        b"subject",
                        name.as_bytes(),
                        json(&st.plan()).as_bytes(),
                        json(st.overrides()).as_bytes(),
                        json(&holds).as_bytes(),
                    ]));
                }
                for (limit, c) in st.counters.iter().filter(|(_, c)| !c.is_idle(now_ms)) {
                    d.counters += 1;
                    d.sum = d.sum.wrapping_add(item(&[
                        b"counter",
                        name.as_bytes(),
                        limit.as_bytes(),
                        json(c).as_bytes(),
                    ]));
                }
            }
            for (key, c) in shard.shared.iter().filter(|(_, c)| !c.is_idle(now_ms)) {
                d.counters += 1;
                d.sum = d
                    .sum
                    .wrapping_add(item(&[b"shared", json(key).as_bytes(), json(c).as_bytes()]));
            }
            for (id, (r, _)) in &shard.reservations {
                d.reservations += 1;
                d.sum = d
                    .sum
                    .wrapping_add(item(&[b"reservation", id.as_bytes(), json(r).as_bytes()]));
            }
            for (key, (e, _)) in &shard.idempotency {
                d.idempotency_keys += 1;
                d.sum = d.sum.wrapping_add(item(&[b"key", key.as_bytes(), json(e).as_bytes()]));
            }
            Ok(())
        });
        d
    }
}

/// Whether the subject's own assigned plan is the one in force (a plan that a
/// reload removed leaves it on the default plan).
fn assigned(policy: &Policy, st: &SubjectState) -> bool {
    st.plan().is_some_and(|p| policy.plan_index.contains_key(p))
}

/// See [`Engine::digest`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StateDigest {
    /// Order-independent sum of item hashes.
    #[serde(serialize_with = "hex")]
    pub sum: u64,
    /// Subjects with a plan, overrides or holds.
    pub subjects: u64,
    /// Live counters.
    pub counters: u64,
    /// Reservations kept.
    pub reservations: u64,
    /// Idempotency keys kept.
    pub idempotency_keys: u64,
    /// What `subjects` counts, said in the answer: it differs from
    /// `quotad_subjects`, which also counts subjects known only by counters.
    pub note: &'static str,
}

/// [`StateDigest::note`].
pub const DIGEST_NOTE: &str =
    "subjects counts subjects with a plan, overrides or open holds (the state a restart must \
     keep); quotad_subjects in /metrics also counts subjects known only by their counters";

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:016x}"))
}

/// JSON text of anything serializable, through one object-safe method.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).expect("state serializes")
        }
    }
}
