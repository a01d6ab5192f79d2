//! Changing the policy in force: one `SetPolicy` record (with the counters it
//! drops, its idempotency entry and its `policy.changed` event) journaled and
//! applied while every shard is locked, so each decision is made entirely
//! under one version, and the versions kept in [`PolicyLog`].

use std::collections::BTreeMap;
use std::sync::Arc;

use super::policy::{counter_changes, PolicyChange, PolicyVersion};
use super::*;

/// A change of policy asked for.
#[derive(Debug)]
pub struct PolicyRequest<'a> {
    /// The new policy as written.
    pub doc: &'a PolicyDoc,
    /// It, compiled (checked by the caller).
    pub compiled: Policy,
    /// Who asks: a token's name, or `file`.
    pub actor: &'a str,
    /// Refused unless this is the version in force (`If-Match`).
    pub if_version: Option<u64>,
    /// Idempotency key and the fingerprint of the request.
    pub idempotency: Option<(&'a str, u64)>,
    /// Refuse to remove a plan that subjects are assigned to (API writes; a
    /// file's reload lets them fall back to the default plan, as it always did).
    pub refuse_plans_in_use: bool,
    /// Write no version when the policy equals the one in force: only real
    /// changes make versions (and events).
    pub skip_if_same: bool,
}

/// What a policy change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The version in force after it.
    pub version: u64,
    /// The version before it (equal to `version` when nothing was written).
    pub previous_version: u64,
    /// A repeat of an earlier request with the same idempotency key.
    pub replayed: bool,
    /// Counters dropped, by limit name, with the reason.
    pub dropped: BTreeMap<Arc<str>, String>,
}

impl Engine {
    /// The stored versions (a copy).
    pub fn policy_log(&self) -> PolicyLog {
        self.policy_log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stored version in force, if any.
    pub fn policy_version(&self) -> Option<PolicyVersion> {
        self.policy_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current()
            .cloned()
    }

    /// Puts a loaded snapshot's versions in place (recovery, before replay).
    pub fn load_policy_log(&mut self, log: PolicyLog) {
        *self.policy_log.get_mut().unwrap_or_else(|e| e.into_inner()) = log;
    }

    /// Puts `compiled` in force as the version recovery found current,
    /// without writing anything (the record that made it is in the log).
    pub fn install_recovered(&self, compiled: Policy) {
        let locked = self.lock((0..self.shards.len()).collect());
        self.install_policy(&locked, compiled);
    }

    /// The answer of an earlier policy write with this key and request, if
    /// there was one (checked before the request is compiled: a retry needs
    /// neither the work nor the shards).
    pub fn policy_replay(
        &self,
        key: &str,
        fp: u64,
        now_ms: Millis,
    ) -> Result<Option<Applied<PolicyOutcome>>, EngineError> {
        let now = self.now(now_ms);
        let mut locked = self.lock(vec![self.shard_of_idempotency(key)]);
        Self::check_admin_idempotency(&mut locked, Some(key), fp, now)?
            .map(|found| Self::replayed(key, found))
            .transpose()
    }

    fn replayed(key: &str, (lsn, answer): (Lsn, StoredAnswer)) -> Result<Applied<PolicyOutcome>, EngineError> {
        let StoredAnswer::Policy {
            version,
            previous_version,
            dropped,
        } = answer
        else {
            return Err(EngineError::IdempotencyConflict(key.to_string()));
        };
        Ok(Applied {
            value: PolicyOutcome {
                version,
                previous_version,
                replayed: true,
                dropped: dropped.into_iter().map(|(k, v)| (Arc::from(k), v)).collect(),
            },
            lsn: Some(lsn),
        })
    }

    /// The idempotency entry of a policy write answered with `version`.
    fn policy_key(key: &str, fp: u64, outcome: &PolicyOutcome, now: Millis, policy: &Policy) -> Mutation {
        let answer = StoredAnswer::Policy {
            version: outcome.version,
            previous_version: outcome.previous_version,
            dropped: outcome
                .dropped
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        Mutation::PutIdempotency {
            key: key.to_string(),
            entry: Box::new(IdempotencyEntry {
                fingerprint: fp,
                answer: PackedAnswer::pack(&answer),
                expires_ms: now.saturating_add(policy.settings.idempotency_retention_ms),
            }),
        }
    }

    /// Journals and applies a new version of the policy. Every shard is locked
    /// from the checks to the swap, so no decision runs half under the old
    /// policy and half under the new, and the counters the change drops are
    /// gone before any decision sees the new one.
    pub fn change_policy(&self, req: PolicyRequest<'_>, now_ms: Millis) -> Result<Applied<PolicyOutcome>, EngineError> {
        let now = self.now(now_ms);
        self.expire_due(now);
        let old = self.policy();
        if req.idempotency.is_some() {
            self.make_room_for_keys(&old, now)?;
        }
        let mut locked = self.lock((0..self.shards.len()).collect());
        let old = self.policy();
        let key = req.idempotency.map(|(k, _)| k);
        let fp = req.idempotency.map_or(0, |(_, fp)| fp);
        if let Some(found) = Self::check_admin_idempotency(&mut locked, key, fp, now)? {
            return Self::replayed(key.unwrap_or_default(), found);
        }
        let mut log = self.policy_log.lock().unwrap_or_else(|e| e.into_inner());
        let current = log.current_version();
        if let Some(given) = req.if_version.filter(|&v| v != current) {
            return Err(EngineError::VersionMismatch { current, given });
        }
        let text = req.doc.to_json().to_string();
        if req.skip_if_same && log.current().is_some_and(|c| c.doc == text) {
            // Same policy: no version. The daemon settings compiled into it
            // may differ, so it is installed all the same; a key is kept, so
            // that its retry answers this even after a later change.
            drop(log);
            let value = PolicyOutcome {
                version: current,
                previous_version: current,
                ..PolicyOutcome::default()
            };
            let lsn = match key {
                Some(k) => {
                    self.check_key_room(&old)?;
                    let entry = Self::policy_key(k, fp, &value, now, &old);
                    locked.commit_signals(vec![entry], Vec::new(), now)?
                }
                None => None,
            };
            self.install_policy(&locked, req.compiled);
            return Ok(Applied { value, lsn });
        }
        if req.refuse_plans_in_use {
            for plan in old
                .plans
                .iter()
                .filter(|p| !req.compiled.plan_index.contains_key(&*p.name))
            {
                let assigned: usize = locked
                    .guards
                    .iter()
                    .map(|g| g.subjects.values().filter(|st| st.plan() == Some(&*plan.name)).count())
                    .sum();
                if assigned > 0 {
                    return Err(EngineError::PlanInUse(format!(
                        "plan {:?} has {assigned} subject{} assigned to it; assign {} another plan \
                         (PUT /v1/subjects/{{subject}}) before removing it",
                        plan.name,
                        if assigned == 1 { "" } else { "s" },
                        if assigned == 1 { "it" } else { "them" },
                    )));
                }
            }
        }
        if key.is_some() {
            self.check_key_room(&old)?;
        }
        let dropped = counter_changes(&old, &req.compiled);
        let version = current + 1;
        let change = PolicyChange {
            version: PolicyVersion {
                version,
                changed_at_ms: now,
                actor: req.actor.to_string(),
                doc: text,
            },
            dropped: dropped.keys().cloned().collect(),
        };
        let value = PolicyOutcome {
            version,
            previous_version: current,
            replayed: false,
            dropped,
        };
        let mut muts = vec![Mutation::SetPolicy(Box::new(change.clone()))];
        if let Some(k) = key {
            muts.push(Self::policy_key(k, fp, &value, now, &old));
        }
        // Version 1 is where the data directory starts, not a change: no event.
        let events = (current > 0)
            .then(|| signals::EventBody::PolicyChanged {
                version,
                previous_version: current,
                actor: req.actor.into(),
            })
            .into_iter()
            .collect();
        let lsn = locked.commit_signals(muts, events, now)?;
        log.apply(lsn.unwrap_or(0), &change);
        drop(log);
        self.install_policy(&locked, req.compiled);
        Ok(Applied { value, lsn })
    }
}
