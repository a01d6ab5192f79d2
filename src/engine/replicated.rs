//! A cluster follower's engine: it decides nothing itself, it takes the
//! leader's records in log order ([`Engine::apply_replicated`], the live
//! counterpart of recovery's replay) and whole installed snapshots
//! ([`Engine::install_state`]).

use super::*;

/// Live access to every shard for a replicated record. A shard that already
/// holds the record (a snapshot taken while the record was applied covers it)
/// gets a scratch shard instead, as in recovery's replay.
struct Replicated<'l, 'a> {
    locked: &'l mut Locked<'a>,
    lsn: Lsn,
    scratch: Shard,
    /// The last shard asked for already held the record.
    skipped: bool,
}

impl Replicated<'_, '_> {
    fn get(&mut self, i: usize) -> &mut Shard {
        self.skipped = self.locked.shard(i).applied_lsn >= self.lsn;
        if self.skipped {
            self.scratch = Shard::default();
            return &mut self.scratch;
        }
        self.locked.shard(i)
    }
}

impl ShardAccess for Replicated<'_, '_> {
    fn subject_shard(&mut self, subject: &str) -> &mut Shard {
        let i = self.locked.engine.shard_of_subject(subject);
        self.get(i)
    }
    fn shared_shard(&mut self, key: &CounterKey) -> &mut Shard {
        let i = self.locked.engine.shard_of_counter(key);
        self.get(i)
    }
    fn reservation_shard(&mut self, id: &str) -> &mut Shard {
        let i = self.locked.engine.shard_of_reservation(id);
        self.get(i)
    }
    fn idempotency_shard(&mut self, key: &str) -> &mut Shard {
        let i = self.locked.engine.shard_of_idempotency(key);
        self.get(i)
    }
    fn each_shard(&mut self, f: &mut dyn FnMut(&mut Shard)) {
        let lsn = self.lsn;
        for g in &mut self.locked.guards {
            if g.applied_lsn < lsn {
                f(g);
            }
        }
    }
}

/// What [`Engine::install_state`] puts in place: a snapshot's contents.
#[derive(Debug, Default)]
pub struct InstalledState {
    /// The shards, one per engine shard.
    pub shards: Vec<Shard>,
    /// Engine time the snapshot was taken at.
    pub created_ms: Millis,
    /// The signals state.
    pub signals: signals::Signals,
    /// The stored policy versions.
    pub policy_log: PolicyLog,
    /// The policy in force, compiled from the current version.
    pub policy: Option<Policy>,
}

impl Engine {
    /// Applies a record the leader made at engine time `at_ms` and numbered
    /// `lsn`, while readers run. Every shard is locked (a follower only
    /// applies, so nothing contends for them), and what a shard, the signals
    /// or the policy versions already hold is skipped. `policy` is the
    /// record's new policy, compiled, when it has a `SetPolicy`.
    pub fn apply_replicated(&self, lsn: Lsn, at_ms: Millis, muts: &[Mutation], policy: Option<Policy>) {
        self.floor_ms.fetch_max(at_ms, Ordering::AcqRel);
        let mut locked = self.lock((0..self.shards.len()).collect());
        let has_events = muts
            .iter()
            .any(|m| matches!(m, Mutation::Signal(c) if matches!(**c, signals::SignalChange::Event(_))));
        if muts.iter().any(signals::Signals::touches) {
            let mut sig = self.signals();
            if lsn > sig.applied_lsn {
                for m in muts.iter().filter(|m| signals::Signals::touches(m)) {
                    sig.apply(lsn, m);
                }
            }
            self.flag_states.store(sig.flags.len(), Ordering::Relaxed);
        }
        let mut new_policy = false;
        for m in muts {
            if let Mutation::SetPolicy(change) = m {
                let mut log = self.policy_log.lock().unwrap_or_else(|e| e.into_inner());
                new_policy |= lsn > log.applied_lsn;
                log.apply(lsn, change);
            }
        }
        let hooks = self.wait_hooks.get().filter(|h| h.active());
        let mut access = Replicated {
            locked: &mut locked,
            lsn,
            scratch: Shard::default(),
            skipped: false,
        };
        for m in muts {
            if let Some(h) = hooks {
                note_freed(&**h, m);
            }
            let a = apply(&mut access, m, lsn);
            if !access.skipped {
                self.open_reservations
                    .fetch_add(a.open_reservations_delta, Ordering::Relaxed);
                self.idempotency_keys
                    .fetch_add(a.idempotency_keys_delta, Ordering::Relaxed);
            }
        }
        for g in &mut locked.guards {
            g.applied_lsn = g.applied_lsn.max(lsn);
        }
        if let Some(p) = policy.filter(|_| new_policy) {
            self.install_policy(&locked, p);
        }
        drop(locked);
        for m in muts {
            if let Mutation::PutReservation(r) = m {
                if r.status == ReservationStatus::Active {
                    self.track_expiry(r.expires_ms, r.id.clone());
                }
            }
        }
        if has_events {
            if let Some(h) = self.event_hook.get() {
                h();
            }
        }
    }

    /// Replaces the whole state with an installed snapshot's, while readers
    /// run: the shards, signals, policy versions and policy in force, and
    /// what is derived from them (the expiry index, the counts). Engine time
    /// never goes back. Refused when the snapshot has another shard count:
    /// its shards are as of different LSNs, so they cannot be re-hashed.
    pub fn install_state(&self, state: InstalledState) -> Result<(), String> {
        if state.shards.len() != self.shards.len() {
            return Err(format!(
                "the snapshot has {} shards and this node {} (engine.shards): every node of a cluster \
                 needs the same engine.shards",
                state.shards.len(),
                self.shards.len()
            ));
        }
        self.floor_ms.fetch_max(state.created_ms, Ordering::AcqRel);
        let mut expiry = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
        let mut locked = self.lock((0..self.shards.len()).collect());
        for (g, s) in locked.guards.iter_mut().zip(state.shards) {
            **g = s;
        }
        let derived = Derived::scan(locked.guards.iter_mut().map(|g| &mut **g));
        derived.index_holds(&mut locked);
        let idx = self.publish_derived(derived);
        *expiry = idx;
        {
            let mut sig = self.signals();
            self.flag_states.store(state.signals.flags.len(), Ordering::Relaxed);
            *sig = state.signals;
        }
        *self.policy_log.lock().unwrap_or_else(|e| e.into_inner()) = state.policy_log;
        if let Some(p) = state.policy {
            self.install_policy(&locked, p);
        }
        drop(locked);
        drop(expiry);
        if let Some(h) = self.wait_hooks.get().filter(|h| h.active()) {
            h.freed(waitlist::Freed::All);
        }
        Ok(())
    }

    /// How many shards the state is striped over (`engine.shards`).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The newest LSN any shard holds.
    pub fn applied_lsn(&self) -> Lsn {
        let mut max = 0;
        for s in self.shards.iter() {
            max = max.max(s.lock().unwrap_or_else(|e| e.into_inner()).applied_lsn);
        }
        max
    }
}
