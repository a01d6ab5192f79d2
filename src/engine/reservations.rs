//! Reservation lifecycle: expiry of due holds and commit/release, with the
//! state machine of docs/api.md (active → committed | released | expired → …).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::*;

impl Engine {
    pub(super) fn track_expiry(&self, at: Millis, id: String) {
        let mut idx = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        idx.insert((at, id));
        self.next_expiry_ms.fetch_min(at, Ordering::AcqRel);
    }

    /// Releases every active reservation whose TTL has passed. Called before every
    /// operation, so no decision ever sees an expired hold.
    pub fn expire_due(&self, now_ms: Millis) {
        if now_ms < self.next_expiry_ms.load(Ordering::Acquire) {
            return;
        }
        // Held while expiring so a concurrent operation waits for the holds to go.
        let mut idx = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, _)) = idx.first() {
            if *at > now_ms {
                break;
            }
            let (_, id) = idx.pop_first().expect("first exists");
            if let Err(e) = self.finish_locked(&id, Finish::Expire, now_ms) {
                if !matches!(e, EngineError::UnknownReservation(_)) {
                    tracing::error!(reservation = %id, error = %e, "could not expire a reservation");
                }
            }
        }
        self.next_expiry_ms
            .store(idx.first().map_or(u64::MAX, |(at, _)| *at), Ordering::Release);
    }

    /// Commits, releases or expires a reservation.
    pub fn finish(&self, id: &str, action: Finish, now_ms: Millis) -> Result<Applied<FinishAnswer>, EngineError> {
        let now = self.now(now_ms);
        self.expire_due(now);
        if let Finish::Commit(amounts) = &action {
            let policy = self.policy();
            for metric in amounts.keys() {
                if !policy.metrics.contains(metric) {
                    return Err(EngineError::UnknownMetric(metric.clone(), policy.metric_list()));
                }
            }
        }
        self.finish_locked(id, action, now)
    }

    fn finish_locked(&self, id: &str, action: Finish, now: Millis) -> Result<Applied<FinishAnswer>, EngineError> {
        let unknown = || EngineError::UnknownReservation(id.to_string());
        let rshard = self.shard_of_reservation(id);
        // Phase 1: which shards the reservation touches (holds never change).
        let shards = {
            let mut l = self.lock(vec![rshard]);
            let (r, _) = l.shard(rshard).reservations.get(id).ok_or_else(unknown)?;
            let mut s: Vec<usize> = r.holds.iter().map(|h| self.shard_of_counter(&h.counter)).collect();
            s.push(self.shard_of_subject(&r.subject));
            s.push(rshard);
            s
        };
        let mut locked = self.lock(shards);
        let (r, lsn) = locked.shard(rshard).reservations.get(id).cloned().ok_or_else(unknown)?;
        let policy = self.policy();
        let (assigned, overrides) = match locked.subject_shard(&r.subject).subjects.get(&r.subject) {
            Some(st) => (st.plan().map(str::to_string), st.overrides().clone()),
            None => (None, BTreeMap::new()),
        };
        let plan = policy.plan_for(assigned.as_deref());
        let finished =
            |status: &str| EngineError::ReservationFinished(format!("reservation {id:?} was already {status}"));

        let (status, charged, deltas): (ReservationStatus, BTreeMap<String, u64>, Vec<i64>) = match (&action, &r.status)
        {
            (Finish::Expire, ReservationStatus::Active) => (
                ReservationStatus::Expired,
                BTreeMap::new(),
                r.holds.iter().map(|h| -signed(h.amount)).collect(),
            ),
            (Finish::Expire, _) => {
                return Ok(Applied {
                    value: r.answer.clone().unwrap_or_else(|| empty_answer(&r)),
                    lsn: None,
                })
            }
            (Finish::Commit(given), ReservationStatus::Active | ReservationStatus::Expired) => {
                let actual = actual_amounts(&r, given)?;
                let was_active = r.status == ReservationStatus::Active;
                let deltas = r
                    .holds
                    .iter()
                    .map(|h| {
                        let a = signed(actual.get(&*h.metric).copied().unwrap_or(0));
                        if was_active {
                            a - signed(h.amount)
                        } else {
                            a
                        }
                    })
                    .collect();
                (ReservationStatus::Committed, actual, deltas)
            }
            (Finish::Commit(given), ReservationStatus::Committed) => {
                let answer = r.answer.clone().expect("finished reservations keep their answer");
                return if actual_amounts(&r, given)? == answer.charged {
                    Ok(Applied {
                        value: answer,
                        lsn: Some(lsn),
                    })
                } else {
                    Err(finished("committed with other amounts"))
                };
            }
            (Finish::Commit(_), ReservationStatus::Released) => return Err(finished("released")),
            (Finish::Release, ReservationStatus::Active) => (
                ReservationStatus::Released,
                BTreeMap::new(),
                r.holds.iter().map(|h| -signed(h.amount)).collect(),
            ),
            (Finish::Release, ReservationStatus::Expired) => {
                (ReservationStatus::Released, BTreeMap::new(), vec![0; r.holds.len()])
            }
            (Finish::Release, ReservationStatus::Released) => {
                let answer = r.answer.clone().expect("finished reservations keep their answer");
                return Ok(Applied {
                    value: answer,
                    lsn: Some(lsn),
                });
            }
            (Finish::Release, ReservationStatus::Committed) => return Err(finished("committed")),
        };

        let mut muts = Vec::with_capacity(r.holds.len() + 1);
        let mut counters = Vec::new();
        // Per hold: (limit, max, usage before, window end) where thresholds apply.
        let mut counters_for_alerts = Vec::with_capacity(r.holds.len());
        for (h, &delta) in r.holds.iter().zip(&deltas) {
            let mut alert = None;
            if let Some(limit) = plan.and_then(|p| p.limit(&h.counter.limit)) {
                let max = effective_max(limit, &overrides);
                let current = locked.counter(&h.counter);
                if let (false, MaxValue::Finite(_)) = (limit.alerts.is_empty(), max) {
                    let (u, _) = super::evaluate(&limit.kind, current, now, 0, max);
                    // The cap in force, credits included.
                    if let MaxValue::Finite(m) = u.max {
                        alert = Some((limit.clone(), m, u.used, u.resets_at));
                    }
                }
                counters.push(view_after(
                    limit,
                    &h.counter,
                    current.cloned(),
                    Some((&h.slot, delta)),
                    max,
                    now,
                ));
            }
            counters_for_alerts.push(alert);
            if delta != 0 {
                muts.push(Mutation::Charge {
                    counter: h.counter.clone(),
                    slot: h.slot,
                    delta,
                    at_ms: now,
                });
            }
        }
        if policy.history && status == ReservationStatus::Committed {
            // Usage history counts the actual amounts, at the time reserved.
            muts.push(Mutation::Usage {
                subject: r.subject.clone(),
                at_ms: r.created_ms,
                amounts: super::dimensions::with_values(
                    charged
                        .iter()
                        .filter(|(_, &a)| a > 0)
                        .map(|(m, &a)| (super::intern(m), a))
                        .collect(),
                    &super::dimensions::marked(&r.amounts),
                ),
            });
        }
        let cost = cost_of(&r, policy.pricing.as_ref(), &action, &charged);
        let answer = FinishAnswer {
            reservation_id: r.id.clone(),
            subject: r.subject.to_string(),
            status: status.clone(),
            expired: r.status == ReservationStatus::Expired || status == ReservationStatus::Expired,
            held: super::dimensions::requested(&r.amounts),
            charged,
            counters,
            cost,
            first: false,
        };
        let finished_r = Reservation {
            status,
            finished_ms: Some(r.finished_ms.unwrap_or(now)),
            answer: (action != Finish::Expire).then(|| answer.clone()),
            ..r
        };
        let mut events = Vec::new();
        if action == Finish::Expire {
            events.push(super::signals::EventBody::ReservationExpired {
                subject: finished_r.subject.clone(),
                reservation_id: finished_r.id.clone(),
                held: super::dimensions::requested(&finished_r.amounts),
            });
        }
        // A true-up above what was held can cross a threshold like any charge.
        let mut work = super::SignalWork::default();
        if policy.has_alerts {
            for ((h, &delta), c) in finished_r.holds.iter().zip(&deltas).zip(&counters_for_alerts) {
                if let (Some((limit, max, before, resets_at)), true) = (c, delta > 0) {
                    self.crossings_of(
                        limit,
                        &h.counter,
                        *max,
                        *before,
                        before.saturating_add(delta as u64),
                        *resets_at,
                        &finished_r.subject,
                        now,
                        &mut work,
                    );
                }
            }
        }
        events.append(&mut work.events);
        muts.extend(work.changes.into_iter().map(|c| Mutation::Signal(Box::new(c))));
        muts.push(Mutation::PutReservation(Box::new(finished_r)));
        let lsn = if events.is_empty() {
            locked.commit(&muts, now)?
        } else {
            locked.commit_signals(muts, events, now)?
        };
        Ok(Applied {
            value: FinishAnswer { first: true, ..answer },
            lsn,
        })
    }
}

/// What a commit charges: the held amounts, replaced per metric by the given
/// ones. A priced reservation's cost is priced again from those amounts with
/// the price it was made under, unless the commit names the cost itself.
fn actual_amounts(r: &Reservation, given: &BTreeMap<String, u64>) -> Result<BTreeMap<String, u64>, EngineError> {
    let mut actual = super::dimensions::requested(&r.amounts);
    actual.extend(given.iter().map(|(k, v)| (k.clone(), *v)));
    if let Some(p) = r.price.as_deref().filter(|p| !given.contains_key(&*p.metric)) {
        let cost = p.cost(|m| actual.get(m).copied().unwrap_or(0))?;
        actual.insert(p.metric.to_string(), cost);
    }
    Ok(actual)
}

/// The money a finished reservation charged, when it was priced or holds the
/// configured cost metric.
fn cost_of(
    r: &Reservation,
    pricing: Option<&Pricing>,
    action: &Finish,
    charged: &BTreeMap<String, u64>,
) -> Option<Cost> {
    let (metric, currency) = match (&r.price, pricing) {
        (Some(p), _) => (p.metric.clone(), p.currency.clone()),
        (None, Some(p)) if r.amounts.contains_key(&*p.metric) => (p.metric.clone(), p.currency.clone()),
        _ => return None,
    };
    Some(Cost {
        amount_micros: charged.get(&*metric).copied().unwrap_or(0),
        currency,
        price: r.price.as_ref().map(|p| p.name.clone()),
        explicit: matches!(action, Finish::Commit(given) if given.contains_key(&*metric)),
    })
}

fn empty_answer(r: &Reservation) -> FinishAnswer {
    FinishAnswer {
        reservation_id: r.id.clone(),
        subject: r.subject.to_string(),
        status: r.status.clone(),
        expired: true,
        held: super::dimensions::requested(&r.amounts),
        charged: BTreeMap::new(),
        counters: Vec::new(),
        cost: None,
        first: false,
    }
}
