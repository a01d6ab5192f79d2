//! A decision's JSON body written straight into the answer buffer, for the
//! direct request path. It writes the bytes `serde_json::to_writer` writes for
//! [`Decision`] (the tests below hold the two equal over every field, variant
//! and awkward string), without serde's calls per key: on a plan with several
//! limits, serde_json's per-string writes were a quarter of the daemon's own
//! instructions per decision. Strings that need escaping are handed to
//! serde_json; all others are copied as they are.

use crate::engine::policy::MaxValue;
use crate::engine::{CounterView, Decision, Reason};
use crate::period::with_rfc3339;

/// Appends `d` as JSON to `out`.
pub(super) fn write_decision(d: &Decision, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"allowed\":");
    out.extend_from_slice(bool_text(d.allowed));
    out.extend_from_slice(b",\"decision\":\"");
    out.extend_from_slice(d.decision.as_str().as_bytes());
    out.extend_from_slice(b"\",\"subject\":");
    string(out, &d.subject);
    out.extend_from_slice(b",\"plan\":");
    string(out, &d.plan);
    out.extend_from_slice(b",\"counters\":[");
    for (i, c) in d.counters.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        counter(out, c);
    }
    out.extend_from_slice(b"],\"reasons\":[");
    for (i, r) in d.reasons.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        reason(out, r);
    }
    out.push(b']');
    if let Some(ms) = d.retry_after_ms {
        out.extend_from_slice(b",\"retry_after_ms\":");
        number(out, ms);
    }
    out.extend_from_slice(b",\"replayed\":");
    out.extend_from_slice(bool_text(d.replayed));
    out.extend_from_slice(b",\"reservation_id\":");
    match &d.reservation_id {
        Some(id) => string(out, id),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"expires_at\":");
    match d.expires_at {
        Some(ms) => with_rfc3339(ms, |t| string(out, t)),
        None => out.extend_from_slice(b"null"),
    }
    if let Some(c) = &d.cost {
        out.extend_from_slice(b",\"cost\":{\"amount_micros\":");
        number(out, c.amount_micros);
        out.extend_from_slice(b",\"currency\":");
        string(out, &c.currency);
        if let Some(p) = &c.price {
            out.extend_from_slice(b",\"price\":");
            string(out, p);
        }
        if c.explicit {
            out.extend_from_slice(b",\"explicit\":true");
        }
        out.push(b'}');
    }
    if let Some(ms) = d.waited_ms {
        out.extend_from_slice(b",\"waited_ms\":");
        number(out, ms);
    }
    out.push(b'}');
}

fn counter(out: &mut Vec<u8>, c: &CounterView) {
    out.extend_from_slice(b"{\"limit\":");
    string(out, &c.limit);
    out.extend_from_slice(b",\"metric\":");
    string(out, &c.metric);
    out.extend_from_slice(b",\"scope\":");
    string(out, &c.scope);
    out.extend_from_slice(b",\"max\":");
    match c.max {
        MaxValue::Finite(n) => number(out, n),
        MaxValue::Unlimited => out.extend_from_slice(b"\"unlimited\""),
    }
    out.extend_from_slice(b",\"used\":");
    number(out, c.used);
    if let Some(r) = c.remaining {
        out.extend_from_slice(b",\"remaining\":");
        number(out, r);
    }
    if let Some(ms) = c.resets_at {
        out.extend_from_slice(b",\"resets_at\":");
        with_rfc3339(ms, |t| string(out, t));
    }
    out.extend_from_slice(b",\"mode\":\"");
    out.extend_from_slice(c.mode.as_str().as_bytes());
    out.extend_from_slice(b"\"}");
}

fn reason(out: &mut Vec<u8>, r: &Reason) {
    out.push(b'{');
    if let Some(l) = &r.limit {
        out.extend_from_slice(b"\"limit\":");
        string(out, l);
        out.push(b',');
    }
    out.extend_from_slice(b"\"code\":\"");
    out.extend_from_slice(r.code.as_str().as_bytes());
    out.push(b'"');
    if let Some(ms) = r.retry_after_ms {
        out.extend_from_slice(b",\"retry_after_ms\":");
        number(out, ms);
    }
    out.push(b'}');
}

fn bool_text(b: bool) -> &'static [u8] {
    if b {
        b"true"
    } else {
        b"false"
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string. Only control characters, `"` and `\` need escaping (what
/// serde_json escapes); a string with any of them goes through serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    // No early exit: a loop without one is vectorized (the byte-at-a-time
    // loop was a third of writing an answer).
    let needs_escape = s
        .bytes()
        .fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if !needs_escape {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a string always encodes into a Vec");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::engine::policy::Mode;
    use crate::engine::{Cost, Outcome, ReasonCode};

    fn same_as_serde(d: &Decision) {
        let mut ours = Vec::new();
        write_decision(d, &mut ours);
        let theirs = serde_json::to_vec(d).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "for {d:?}"
        );
    }

    const OUTCOMES: [Outcome; 3] = [Outcome::Allow, Outcome::Deny, Outcome::Degrade];
    const MODES: [Mode; 3] = [Mode::Enforce, Mode::Monitor, Mode::Degrade];
    const CODES: [ReasonCode; 9] = [
        ReasonCode::LimitExceeded,
        ReasonCode::ExceedsCapacity,
        ReasonCode::WouldDeny,
        ReasonCode::Degraded,
        ReasonCode::Unmatched,
        ReasonCode::QueueFull,
        ReasonCode::CircuitOpen,
        ReasonCode::Anomaly,
        ReasonCode::TooManyReservations,
    ];

    /// Text with what JSON must escape, multi-byte UTF-8 and DEL among
    /// plain names.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_.:=-]{0,12}",
            prop::sample::select(vec![
                "quote\"d".to_string(),
                "back\\slash".into(),
                "tab\there".into(),
                "nl\n\r".into(),
                "\u{0}\u{1f}".into(),
                "\u{7f}del".into(),
                "ünïcødé 名前 🙂".into(),
                "\u{2028}\u{2029}".into(),
                "</script>".into(),
                String::new(),
            ]),
        ]
    }

    fn max() -> impl Strategy<Value = MaxValue> {
        prop_oneof![
            any::<u64>().prop_map(MaxValue::Finite),
            Just(MaxValue::Unlimited),
            Just(MaxValue::Finite(0)),
        ]
    }

    fn millis() -> impl Strategy<Value = u64> {
        // Up to the year 9999, what RFC 3339 writes.
        0u64..253_402_300_799_000
    }

    fn counter_view() -> impl Strategy<Value = CounterView> {
        (
            text(),
            text(),
            text(),
            max(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(millis()),
            prop::sample::select(MODES.to_vec()),
        )
            .prop_map(
                |(limit, metric, scope, max, used, remaining, resets_at, mode)| CounterView {
                    limit: limit.into(),
                    metric: metric.into(),
                    scope: scope.into(),
                    max,
                    used,
                    remaining,
                    resets_at,
                    mode,
                },
            )
    }

    fn reason_strategy() -> impl Strategy<Value = Reason> {
        (
            proptest::option::of(text()),
            prop::sample::select(CODES.to_vec()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(limit, code, retry_after_ms)| Reason {
                limit: limit.map(Into::into),
                code,
                retry_after_ms,
            })
    }

    fn cost() -> impl Strategy<Value = Cost> {
        (any::<u64>(), text(), proptest::option::of(text()), any::<bool>()).prop_map(
            |(amount_micros, currency, price, explicit)| Cost {
                amount_micros,
                currency: currency.into(),
                price: price.map(Into::into),
                explicit,
            },
        )
    }

    fn decision() -> impl Strategy<Value = Decision> {
        (
            (any::<bool>(), prop::sample::select(OUTCOMES.to_vec()), text(), text()),
            prop::collection::vec(counter_view(), 0..4),
            prop::collection::vec(reason_strategy(), 0..4),
            (
                proptest::option::of(any::<u64>()),
                any::<bool>(),
                proptest::option::of(text()),
                proptest::option::of(millis()),
                proptest::option::of(cost()),
                proptest::option::of(any::<u64>()),
            ),
        )
            .prop_map(
                |(
                    (allowed, decision, subject, plan),
                    counters,
                    reasons,
                    (retry_after_ms, replayed, reservation_id, expires_at, cost, waited_ms),
                )| Decision {
                    allowed,
                    decision,
                    subject,
                    plan: plan.into(),
                    counters,
                    reasons,
                    retry_after_ms,
                    replayed,
                    reservation_id,
                    expires_at,
                    cost,
                    waited_ms,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn writes_what_serde_json_writes(d in decision()) {
            same_as_serde(&d);
        }
    }

    /// Every variant of every enum, whatever the sampling above happened to draw.
    #[test]
    fn every_variant_is_named_as_serde_names_it() {
        for (i, code) in CODES.iter().enumerate() {
            let d = Decision {
                allowed: false,
                decision: OUTCOMES[i % 3],
                subject: "s".into(),
                plan: "p".into(),
                counters: vec![CounterView {
                    limit: "l".into(),
                    metric: "requests".into(),
                    scope: "s".into(),
                    max: MaxValue::Unlimited,
                    used: 1,
                    remaining: None,
                    resets_at: Some(1_700_000_000_123),
                    mode: MODES[i % 3],
                }],
                reasons: vec![Reason {
                    limit: None,
                    code: *code,
                    retry_after_ms: None,
                }],
                retry_after_ms: None,
                replayed: false,
                reservation_id: None,
                expires_at: None,
                cost: None,
                waited_ms: None,
            };
            same_as_serde(&d);
        }
    }
}
