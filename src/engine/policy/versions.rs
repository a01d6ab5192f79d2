//! Numbered versions of the policy, and what a change does to live counters.
//!
//! A change is one `SetPolicy` record in the WAL: the new version (its number,
//! time, actor and the policy as JSON) and the names of the counters it drops.
//! The engine keeps the newest [`VERSIONS_KEPT`] versions in a [`PolicyLog`],
//! which snapshots store and replay rebuilds like any other state.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::compile::Policy;
use super::doc::PolicyDoc;
use crate::clock::Millis;
use crate::engine::types::Lsn;

/// How many versions are kept (the current one included).
pub const VERSIONS_KEPT: usize = 100;

/// One version of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// 1 for the first, one more for each change.
    pub version: u64,
    /// Engine time of the change.
    pub changed_at_ms: Millis,
    /// Who made it: a token's `name`, or `file`.
    pub actor: String,
    /// The policy, as canonical JSON text ([`PolicyDoc::to_json`]).
    pub doc: String,
}

impl PolicyVersion {
    /// The policy of this version. Stored text was written from a checked
    /// policy; text that no longer reads is reported, not trusted.
    pub fn policy_doc(&self) -> Result<PolicyDoc, String> {
        serde_json::from_str(&self.doc).map_err(|e| format!("stored policy version {}: {e}", self.version))
    }
}

/// A change of policy, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyChange {
    /// The version it creates.
    pub version: PolicyVersion,
    /// Counters under these names are dropped: their limit was removed, or
    /// its algorithm, period, time zone, metric or scope changed.
    pub dropped: Vec<Arc<str>>,
}

/// The versions the engine knows, oldest first; the last is in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLog {
    /// Every policy change at or below this LSN is here (replay skips them).
    pub applied_lsn: Lsn,
    /// At most [`VERSIONS_KEPT`], ascending.
    pub versions: VecDeque<PolicyVersion>,
}

impl PolicyLog {
    /// The version in force, if any was ever stored.
    pub fn current(&self) -> Option<&PolicyVersion> {
        self.versions.back()
    }

    /// The number of the version in force (0: none yet).
    pub fn current_version(&self) -> u64 {
        self.current().map_or(0, |v| v.version)
    }

    /// One kept version.
    pub fn get(&self, version: u64) -> Option<&PolicyVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// Records a change journaled at `lsn` (once: replay of a change the log
    /// already holds does nothing).
    pub fn apply(&mut self, lsn: Lsn, change: &PolicyChange) {
        if lsn != 0 && lsn <= self.applied_lsn {
            return;
        }
        self.applied_lsn = self.applied_lsn.max(lsn);
        self.versions.push_back(change.version.clone());
        while self.versions.len() > VERSIONS_KEPT {
            self.versions.pop_front();
        }
    }
}

/// What a change from `old` to `new` does to counters: name → why its
/// counters are dropped. A limit whose `max`, mode, match or alerts changed
/// keeps its counters; one whose algorithm, period, time zone, metric or
/// scope changed starts afresh; a removed limit's counters are dropped. The
/// hidden counters of removed breakers and anomaly rules go too.
pub fn counter_changes(old: &Policy, new: &Policy) -> BTreeMap<Arc<str>, String> {
    let mut out = BTreeMap::new();
    for (name, shape) in &old.shapes {
        match new.shapes.get(name) {
            None => {
                out.insert(name.clone(), "removed".to_string());
            }
            Some(n) => {
                if let Some(why) = shape.resets_under(n) {
                    out.insert(name.clone(), why);
                }
            }
        }
    }
    for b in &old.breakers {
        if new.breaker(&b.name).is_none() {
            out.insert(b.recent_limit.clone(), format!("breaker {} removed", b.name));
            out.insert(b.long_limit.clone(), format!("breaker {} removed", b.name));
        }
    }
    for a in &old.anomalies {
        if !new.anomalies.iter().any(|n| n.name == a.name) {
            out.insert(a.limit.clone(), format!("anomaly rule {} removed", a.name));
        }
    }
    out
}
