//! The engine side of signals: how a decision consults breakers and anomaly
//! rules and finds threshold crossings, the manual breaker switch, flag
//! clearing, the periodic close of breakers, and the event log's tail as the
//! feed, the snapshot and recovery see it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::counter::slot_for;
use super::policy::{Kind, Policy};
use super::signals::{
    Anomaly, Breaker, BreakerReason, Event, EventBody, Flag, FlagState, OpenState, Rates, SignalChange, Signals,
};
use super::state::SubjectState;
use super::types::{CounterKey, EngineError, Hold, Lsn, Mutation, Reason, ReasonCode, ScopeKey, Slot};
use super::{Engine, Locked, Matched};
use crate::clock::Millis;
use crate::engine::policy::{AnomalyAction, MaxValue, Priority};

/// What signals add to one decision.
#[derive(Debug, Default)]
pub(super) struct SignalWork {
    /// Changes to record with the decision.
    pub changes: Vec<SignalChange>,
    /// Events to record with it.
    pub events: Vec<EventBody>,
    /// Reasons that deny the call (`circuit_open`, `anomaly` with deny).
    pub blocked: Vec<Reason>,
    /// Reasons that degrade it (`anomaly` with degrade).
    pub degraded: Vec<Reason>,
    /// Charges of breaker and anomaly counters, made (and held) if allowed.
    pub holds: Vec<Hold>,
}

/// One breaker scope value as `GET /v1/breakers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerView {
    /// The breaker.
    pub name: Arc<str>,
    /// Its scope value.
    pub scope: Arc<str>,
    /// Open now.
    pub open: bool,
    /// Totals now.
    pub rates: Rates,
    /// When it opened, if open.
    pub opened_at_ms: Option<Millis>,
    /// Why it is open, if open.
    pub reason: Option<BreakerReason>,
    /// When a rate-opened breaker may close.
    pub closes_at_ms: Option<Millis>,
    /// Watched since.
    pub since_ms: Option<Millis>,
}

/// One raised flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagView {
    /// The subject.
    pub subject: Arc<str>,
    /// The rule.
    pub anomaly: Arc<str>,
    /// The flag.
    pub flag: Flag,
    /// The period it is for.
    pub period_end_ms: Millis,
}

/// "the <what> are: a, b", or that none is configured: for unknown-name errors.
fn names<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = names.collect();
    if list.is_empty() {
        format!("quotad.toml configures no [[{what}]]")
    } else {
        format!("the {what} configured are: {}", list.join(", "))
    }
}

impl Engine {
    pub(super) fn signals(&self) -> MutexGuard<'_, Signals> {
        self.signals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Breakers and anomaly rules for one decision (shards locked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decide_signals(
        &self,
        locked: &Locked<'_>,
        watched: &[(&Arc<Breaker>, ScopeKey)],
        policy: &Policy,
        subject: &Arc<str>,
        st: Option<&SubjectState>,
        event: Option<&str>,
        attributes: &BTreeMap<String, String>,
        priority: Priority,
        now: Millis,
        writes: bool,
        charge_of: &dyn Fn(&str) -> u64,
        out: &mut SignalWork,
    ) {
        for (b, sk) in watched {
            let (rk, lk) = b.keys(sk);
            let amount = charge_of(&b.metric);
            let (rc, lc) = (locked.counter(&rk), locked.counter(&lk));
            let scope = Breaker::scope_text(sk);
            let state = self.signals().breakers.get(&(b.name.clone(), scope.clone())).cloned();
            let passes = priority >= b.pass_priority;
            let cooldown_end = |at: Millis| at.saturating_add(b.cooldown_ms);
            let deny = |retry: Option<u64>| Reason {
                limit: Some(b.name.clone()),
                code: ReasonCode::CircuitOpen,
                retry_after_ms: retry,
            };
            match state.as_ref().and_then(|s| s.open.as_ref().map(|o| (s, o))) {
                Some((s, o)) => {
                    let base = b.rates(rc, lc, now, 0);
                    let may_close = o.reason == BreakerReason::Rate
                        && now >= cooldown_end(o.at_ms)
                        && !b.surging(base, s.since_ms, now);
                    if may_close && writes {
                        out.changes.push(SignalChange::BreakerSet {
                            breaker: b.name.clone(),
                            scope: scope.clone(),
                            open: None,
                            closed_until_ms: 0,
                        });
                        out.events.push(EventBody::BreakerClosed {
                            breaker: b.name.clone(),
                            scope: scope.clone(),
                            recent: base.recent,
                            normal: base.normal,
                            reason: BreakerReason::Rate,
                        });
                    } else if !passes && !may_close {
                        let retry =
                            (o.reason == BreakerReason::Rate).then(|| cooldown_end(o.at_ms).saturating_sub(now).max(1));
                        out.blocked.push(deny(retry));
                    }
                }
                None => {
                    let since = match &state {
                        Some(s) => s.since_ms,
                        None => {
                            // Bounded: past the cap, new scope values are not
                            // watched, nor their hidden counters charged.
                            let room =
                                self.signals().breakers.len() < b.max_scopes.saturating_mul(policy.breakers.len());
                            if !room {
                                continue;
                            }
                            if writes {
                                out.changes.push(SignalChange::BreakerWatch {
                                    breaker: b.name.clone(),
                                    scope: scope.clone(),
                                    since_ms: now,
                                });
                            }
                            now
                        }
                    };
                    let closed_until = state.as_ref().map_or(0, |s| s.closed_until_ms);
                    let rates = b.rates(rc, lc, now, amount);
                    if writes && amount > 0 && now >= closed_until && b.surging(rates, since, now) {
                        out.changes.push(SignalChange::BreakerSet {
                            breaker: b.name.clone(),
                            scope: scope.clone(),
                            open: Some(OpenState {
                                at_ms: now,
                                reason: BreakerReason::Rate,
                            }),
                            closed_until_ms: 0,
                        });
                        out.events.push(EventBody::BreakerOpened {
                            breaker: b.name.clone(),
                            scope: scope.clone(),
                            recent: rates.recent,
                            normal: rates.normal,
                            reason: BreakerReason::Rate,
                        });
                        if !passes {
                            out.blocked.push(deny(Some(b.cooldown_ms.max(1))));
                        }
                    }
                }
            }
            if amount > 0 && writes {
                for (key, kind) in [(rk, &b.recent_kind), (lk, &b.long_kind)] {
                    if key.limit == b.long_limit && b.baseline_ms.is_none() {
                        continue;
                    }
                    out.holds.push(Hold {
                        counter: key,
                        metric: b.metric.clone(),
                        slot: slot_for(kind, now),
                        amount,
                    });
                }
            }
        }

        for a in &policy.anomalies {
            if !a.matcher.matches(event, attributes) {
                continue;
            }
            let counter = st.and_then(|s| s.counters.get(&a.limit));
            let amount = charge_of(&a.metric);
            let (start, end) = a.current(now);
            let used = Anomaly::used(counter, start).saturating_add(amount);
            let state = if self.flag_states.load(Ordering::Relaxed) > 0 {
                self.signals().flag(subject, &a.name, now).cloned()
            } else {
                None
            };
            let mut act = |action: AnomalyAction| {
                let r = Reason {
                    limit: Some(a.name.clone()),
                    code: ReasonCode::Anomaly,
                    retry_after_ms: None,
                };
                match action {
                    AnomalyAction::Flag => {}
                    AnomalyAction::Degrade => out.degraded.push(r),
                    AnomalyAction::Deny => out.blocked.push(r),
                }
            };
            match state {
                Some(FlagState { flag: Some(f), .. }) => act(f.action),
                Some(FlagState { flag: None, .. }) => {}
                None if writes && amount > 0 && a.spiking(used, 0) => {
                    if let Some(baseline) = a.baseline(counter, start).filter(|&b| a.spiking(used, b)) {
                        out.changes.push(SignalChange::FlagSet {
                            subject: subject.clone(),
                            anomaly: a.name.clone(),
                            state: FlagState {
                                period_start_ms: start,
                                period_end_ms: end,
                                flag: Some(Flag {
                                    since_ms: now,
                                    used,
                                    baseline,
                                    action: a.action,
                                }),
                            },
                        });
                        out.events.push(EventBody::AnomalyDetected {
                            subject: subject.clone(),
                            anomaly: a.name.clone(),
                            metric: a.metric.clone(),
                            used,
                            baseline,
                            period_start_ms: start,
                            period_end_ms: end,
                            action: a.action,
                        });
                        act(a.action);
                    }
                }
                None => {}
            }
            if amount > 0 && writes {
                out.holds.push(Hold {
                    counter: CounterKey {
                        limit: a.limit.clone(),
                        scope: ScopeKey::Subject(subject.clone()),
                    },
                    metric: a.metric.clone(),
                    slot: Slot::Periods {
                        start_ms: start,
                        end_ms: end,
                        keep: a.baseline_periods + 1,
                    },
                    amount,
                });
            }
        }
    }

    /// Threshold crossings of one charged limit: events and marks into `out`.
    pub(super) fn crossings(
        &self,
        _locked: &Locked<'_>,
        m: &Matched,
        subject: &Arc<str>,
        now: Millis,
        out: &mut SignalWork,
    ) {
        if m.limit.alerts.is_empty() || m.amount == 0 {
            return;
        }
        // The cap in force, credits included.
        let MaxValue::Finite(max) = m.usage.max else { return };
        let before = m.usage.used;
        self.crossings_of(
            &m.limit,
            &m.key,
            max,
            before,
            before.saturating_add(m.amount),
            m.usage.resets_at,
            subject,
            now,
            out,
        );
    }

    /// Records each threshold of `limit` that usage moving from `before` to
    /// `after` crosses and that has not fired in this window.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn crossings_of(
        &self,
        limit: &super::Limit,
        key: &CounterKey,
        max: u64,
        before: u64,
        after: u64,
        resets_at: Option<Millis>,
        subject: &Arc<str>,
        now: Millis,
        out: &mut SignalWork,
    ) {
        let level = |ppm: u32| (u128::from(max) * u128::from(ppm)).div_ceil(1_000_000);
        let crossed: Vec<u32> = limit
            .alerts
            .iter()
            .copied()
            .filter(|&t| u128::from(before) < level(t) && u128::from(after) >= level(t))
            .collect();
        if crossed.is_empty() {
            return;
        }
        let sig = self.signals();
        for t in crossed {
            if !sig.armed(key, t, now) || out.changes.iter().any(|c| matches!(c, SignalChange::Mark { counter, threshold_ppm, .. } if counter == key && *threshold_ppm == t)) {
                continue;
            }
            let until_ms = match &limit.kind {
                Kind::Fixed { .. } => resets_at.unwrap_or(u64::MAX),
                Kind::Sliding { period_ms, .. } | Kind::TokenBucket { period_ms, .. } => now.saturating_add(*period_ms),
                Kind::Lifetime => u64::MAX,
            };
            out.changes.push(SignalChange::Mark {
                counter: key.clone(),
                threshold_ppm: t,
                until_ms,
            });
            out.events.push(EventBody::ThresholdCrossed {
                subject: subject.clone(),
                limit: limit.name.clone(),
                metric: limit.metric.clone(),
                scope: key.scope.display(),
                threshold_ppm: t,
                used: after,
                max,
                resets_at,
            });
        }
    }

    /// Opens (`open`) or closes a breaker by hand: the kill switch. A manual
    /// close holds it closed for one cooldown. Returns the view after.
    pub fn set_breaker(
        &self,
        name: &str,
        scope: Option<&str>,
        open: bool,
        now_ms: Millis,
    ) -> Result<(BreakerView, Option<Lsn>), EngineError> {
        let (now, policy) = self.begin(now_ms);
        let b = policy
            .breaker(name)
            .ok_or_else(|| {
                EngineError::UnknownBreaker(
                    name.to_string(),
                    names("breakers", policy.breakers.iter().map(|b| &*b.name)),
                )
            })?
            .clone();
        let sk = b.parse_scope(scope).map_err(EngineError::InvalidRequest)?;
        let (rk, lk) = b.keys(&sk);
        let mut locked = self.lock(vec![self.shard_of_counter(&rk), self.shard_of_counter(&lk)]);
        let text = Breaker::scope_text(&sk);
        let state = self
            .signals()
            .breakers
            .get(&(b.name.clone(), text.clone()))
            .cloned()
            .unwrap_or_default();
        let rates = b.rates(locked.counter(&rk), locked.counter(&lk), now, 0);
        let mut changes = Vec::new();
        let mut events = Vec::new();
        if state.since_ms == 0 && state.open.is_none() {
            changes.push(SignalChange::BreakerWatch {
                breaker: b.name.clone(),
                scope: text.clone(),
                since_ms: now,
            });
        }
        match (open, &state.open) {
            (true, Some(o)) if o.reason == BreakerReason::Manual => {}
            (false, None) => {}
            (true, _) => {
                changes.push(SignalChange::BreakerSet {
                    breaker: b.name.clone(),
                    scope: text.clone(),
                    open: Some(OpenState {
                        at_ms: now,
                        reason: BreakerReason::Manual,
                    }),
                    closed_until_ms: 0,
                });
                events.push(EventBody::BreakerOpened {
                    breaker: b.name.clone(),
                    scope: text.clone(),
                    recent: rates.recent,
                    normal: rates.normal,
                    reason: BreakerReason::Manual,
                });
            }
            (false, Some(_)) => {
                changes.push(SignalChange::BreakerSet {
                    breaker: b.name.clone(),
                    scope: text.clone(),
                    open: None,
                    closed_until_ms: now.saturating_add(b.cooldown_ms),
                });
                events.push(EventBody::BreakerClosed {
                    breaker: b.name.clone(),
                    scope: text.clone(),
                    recent: rates.recent,
                    normal: rates.normal,
                    reason: BreakerReason::Manual,
                });
            }
        }
        let muts = changes.into_iter().map(|c| Mutation::Signal(Box::new(c))).collect();
        let lsn = locked.commit_signals(muts, events, now)?;
        drop(locked);
        let view = self
            .breakers(now)
            .into_iter()
            .find(|v| v.name == b.name && v.scope == text)
            .expect("the breaker was just set");
        Ok((view, lsn))
    }

    /// Every breaker (and scope value seen) with its state and totals now.
    /// A pure read: it expires nothing (that is the maintenance task's, and
    /// in a cluster the leader's; `/metrics` calls this on every node).
    pub fn breakers(&self, now_ms: Millis) -> Vec<BreakerView> {
        let (now, policy) = (self.now(now_ms), self.policy());
        let states = self.signals().breakers.clone();
        let mut out = Vec::new();
        for b in &policy.breakers {
            let mut scopes: Vec<(ScopeKey, Option<&super::signals::BreakerState>)> = states
                .iter()
                .filter(|((n, _), _)| *n == b.name)
                .filter_map(|((_, s), st)| {
                    b.parse_scope((&**s != "global").then_some(&**s))
                        .ok()
                        .map(|k| (k, Some(st)))
                })
                .collect();
            if scopes.is_empty() && b.parse_scope(None).is_ok() {
                scopes.push((ScopeKey::Global, None));
            }
            for (sk, st) in scopes {
                let (rk, lk) = b.keys(&sk);
                let locked = self.lock(vec![self.shard_of_counter(&rk), self.shard_of_counter(&lk)]);
                let rates = b.rates(locked.counter(&rk), locked.counter(&lk), now, 0);
                drop(locked);
                let open = st.and_then(|s| s.open.clone());
                out.push(BreakerView {
                    name: b.name.clone(),
                    scope: Breaker::scope_text(&sk),
                    open: open.is_some(),
                    rates,
                    opened_at_ms: open.as_ref().map(|o| o.at_ms),
                    reason: open.as_ref().map(|o| o.reason),
                    closes_at_ms: open
                        .as_ref()
                        .filter(|o| o.reason == BreakerReason::Rate)
                        .map(|o| o.at_ms.saturating_add(b.cooldown_ms)),
                    since_ms: st.map(|s| s.since_ms),
                });
            }
        }
        out
    }

    /// Closes breakers whose cooldown passed and whose surge ended, and drops
    /// lapsed marks and flags: the maintenance task calls it every second, so
    /// a breaker closes (and says so) without traffic to notice.
    pub fn tick_signals(&self, now_ms: Millis) -> Result<(), EngineError> {
        let (now, policy) = self.begin(now_ms);
        {
            let mut sig = self.signals();
            sig.prune(now);
            self.flag_states.store(sig.flags.len(), Ordering::Relaxed);
            if policy.breakers.is_empty() && self.event_hook.get().is_none() {
                let cutoff = now.saturating_sub(policy.events_retention_ms);
                // Without a snapshot store the tail is all there is: keep it bounded.
                while sig.recent.front().is_some_and(|(_, e)| e.at_ms < cutoff) {
                    sig.recent.pop_front();
                }
            }
        }
        let open: Vec<(Arc<str>, Arc<str>)> = self
            .signals()
            .breakers
            .iter()
            .filter(|(_, s)| s.open.as_ref().is_some_and(|o| o.reason == BreakerReason::Rate))
            .map(|(k, _)| k.clone())
            .collect();
        for (name, scope) in open {
            let Some(b) = policy.breaker(&name).cloned() else {
                continue;
            };
            let Ok(sk) = b.parse_scope((&*scope != "global").then_some(&*scope)) else {
                continue;
            };
            let (rk, lk) = b.keys(&sk);
            let mut locked = self.lock(vec![self.shard_of_counter(&rk), self.shard_of_counter(&lk)]);
            let Some(st) = self.signals().breakers.get(&(name.clone(), scope.clone())).cloned() else {
                continue;
            };
            let Some(o) = st.open.as_ref().filter(|o| o.reason == BreakerReason::Rate) else {
                continue;
            };
            let rates = b.rates(locked.counter(&rk), locked.counter(&lk), now, 0);
            if now < o.at_ms.saturating_add(b.cooldown_ms) || b.surging(rates, st.since_ms, now) {
                continue;
            }
            let muts = vec![Mutation::Signal(Box::new(SignalChange::BreakerSet {
                breaker: name.clone(),
                scope: scope.clone(),
                open: None,
                closed_until_ms: 0,
            }))];
            let events = vec![EventBody::BreakerClosed {
                breaker: name,
                scope,
                recent: rates.recent,
                normal: rates.normal,
                reason: BreakerReason::Rate,
            }];
            locked.commit_signals(muts, events, now)?;
        }
        Ok(())
    }

    /// Raised flags in force, all subjects or one.
    pub fn flags(&self, subject: Option<&str>, now_ms: Millis) -> Vec<FlagView> {
        let now = self.now(now_ms);
        if self.flag_states.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        self.signals()
            .active_flags(now)
            .filter(|((s, _), _)| subject.is_none_or(|x| &**s == x))
            .map(|((s, a), f)| FlagView {
                subject: s.clone(),
                anomaly: a.clone(),
                flag: f.flag.clone().expect("active flags are raised"),
                period_end_ms: f.period_end_ms,
            })
            .collect()
    }

    /// Clears a subject's flag: not raised again this period. `Ok(None)` when
    /// no such flag is raised.
    pub fn clear_flag(&self, subject: &str, anomaly: &str, now_ms: Millis) -> Result<Option<Option<Lsn>>, EngineError> {
        let (now, policy) = self.begin(now_ms);
        if !policy.anomalies.iter().any(|a| &*a.name == anomaly) {
            return Err(EngineError::UnknownAnomaly(
                anomaly.to_string(),
                names("anomalies", policy.anomalies.iter().map(|a| &*a.name)),
            ));
        }
        let subject: Arc<str> = subject.into();
        let anomaly: Arc<str> = anomaly.into();
        let mut locked = self.lock(vec![self.shard_of_subject(&subject)]);
        let Some(state) = self
            .signals()
            .flag(&subject, &anomaly, now)
            .filter(|f| f.flag.is_some())
            .cloned()
        else {
            return Ok(None);
        };
        let muts = vec![Mutation::Signal(Box::new(SignalChange::FlagSet {
            subject,
            anomaly,
            state: FlagState { flag: None, ..state },
        }))];
        locked.commit_signals(muts, Vec::new(), now).map(Some)
    }

    /// Sets who is told when events are recorded (once).
    pub fn set_event_hook(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.event_hook.set(hook);
    }

    /// Events in memory with seq > `after` and LSN ≤ `durable`, oldest first, at most `limit`.
    pub fn recent_events(&self, after: u64, limit: usize, durable: Lsn) -> Vec<Arc<Event>> {
        let sig = self.signals();
        let start = sig.recent.partition_point(|(_, e)| e.seq <= after);
        sig.recent
            .range(start..)
            .take_while(|(lsn, _)| *lsn <= durable)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Up to `limit` durable events in memory before `before`, newest first.
    pub fn recent_events_before(&self, before: u64, limit: usize, durable: Lsn) -> Vec<Arc<Event>> {
        let sig = self.signals();
        // Durable events are a prefix of memory's (LSNs grow with seq).
        let durable_end = sig.recent.partition_point(|(lsn, _)| *lsn <= durable);
        let end = sig.recent.partition_point(|(_, e)| e.seq < before).min(durable_end);
        sig.recent
            .range(..end)
            .rev()
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The newest event's seq and LSN (0, 0 when none is in memory).
    pub fn last_event(&self) -> (u64, Lsn) {
        let sig = self.signals();
        (sig.last_seq, sig.recent.back().map_or(0, |(l, _)| *l))
    }

    /// Events in memory, waiting for a snapshot to move them to the file.
    pub fn recent_event_count(&self) -> usize {
        self.signals().recent.len()
    }

    /// The oldest seq still in memory (events before it are in the snapshot store).
    pub fn first_recent_seq(&self) -> Option<u64> {
        self.signals().recent.front().map(|(_, e)| e.seq)
    }

    /// For a snapshot: the encoded signals state, the LSN it is as of, and the
    /// events in memory (all at or below that LSN).
    pub fn signals_for_snapshot(&self) -> (Signals, Vec<Arc<Event>>) {
        let sig = self.signals();
        let events = sig.recent.iter().map(|(_, e)| e.clone()).collect();
        (sig.clone(), events)
    }

    /// The snapshot store now holds every event up to `seq`: memory lets them go.
    pub fn events_stored(&self, seq: u64) {
        let mut sig = self.signals();
        while sig.recent.front().is_some_and(|(_, e)| e.seq <= seq) {
            sig.recent.pop_front();
        }
    }

    /// Recovery: the signals state of the snapshot.
    pub fn load_signals(&mut self, s: Signals) {
        self.flag_states.store(s.flags.len(), Ordering::Relaxed);
        *self.signals.get_mut().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Recovery: the signals part of a replayed record.
    pub(super) fn replay_signals(&mut self, lsn: Lsn, muts: &[Mutation]) {
        let sig = self.signals.get_mut().unwrap_or_else(|e| e.into_inner());
        if lsn <= sig.applied_lsn {
            return;
        }
        for m in muts.iter().filter(|m| Signals::touches(m)) {
            sig.apply(lsn, m);
        }
        self.flag_states.store(sig.flags.len(), Ordering::Relaxed);
    }
}
