//! Process-wide counters exported at `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::{Outcome, Stats};

const OPS: [&str; 3] = ["check", "consume", "reserve"];
const OUTCOMES: [&str; 3] = ["allow", "deny", "degrade"];

/// Counters updated by the API layer.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Decisions by [op][outcome].
    decisions: [[AtomicU64; 3]; 3],
    /// Replayed idempotent answers.
    replays: AtomicU64,
    /// Error answers by status class: 4xx, 5xx.
    errors: [AtomicU64; 2],
}

impl Metrics {
    /// Counts one decision.
    pub fn decision(&self, op: usize, outcome: Outcome, replayed: bool) {
        let o = match outcome {
            Outcome::Allow => 0,
            Outcome::Deny => 1,
            Outcome::Degrade => 2,
        };
        self.decisions[op.min(2)][o].fetch_add(1, Ordering::Relaxed);
        if replayed {
            self.replays.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one error answer.
    pub fn error(&self, status: u16) {
        let i = usize::from(status >= 500);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders everything, with the engine's gauges.
    pub fn render(&self, stats: &Stats) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str(
            "# HELP quotad_decisions_total Decisions by endpoint and outcome.\n# TYPE quotad_decisions_total counter\n",
        );
        for (i, op) in OPS.iter().enumerate() {
            for (j, outcome) in OUTCOMES.iter().enumerate() {
                let v = self.decisions[i][j].load(Ordering::Relaxed);
                let _ = writeln!(s, "quotad_decisions_total{{op=\"{op}\",outcome=\"{outcome}\"}} {v}");
            }
        }
        let _ = writeln!(
            s,
            "# HELP quotad_idempotent_replays_total Answers replayed for a repeated idempotency key.\n\
             # TYPE quotad_idempotent_replays_total counter\nquotad_idempotent_replays_total {}",
            self.replays.load(Ordering::Relaxed)
        );
        s.push_str("# HELP quotad_errors_total Error answers by status class.\n# TYPE quotad_errors_total counter\n");
        for (i, class) in ["4xx", "5xx"].iter().enumerate() {
            let _ = writeln!(
                s,
                "quotad_errors_total{{class=\"{class}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            ("quotad_subjects", "Known subjects.", stats.subjects),
            ("quotad_counters", "Live counters.", stats.counters),
            (
                "quotad_reservations_open",
                "Active reservations.",
                stats.open_reservations,
            ),
            (
                "quotad_reservations_kept",
                "Reservations kept, active or finished.",
                stats.reservations,
            ),
            (
                "quotad_idempotency_keys",
                "Idempotency keys kept.",
                stats.idempotency_keys,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}
