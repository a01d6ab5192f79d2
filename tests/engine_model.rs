//! Property test: random command sequences run through the engine and through a
//! deliberately simple reference model (plain maps, recomputed on every read);
//! every answer and every counter must agree. The journal of each run is then
//! replayed into a fresh engine, which must show the same state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, EngineError, Finish, Outcome, Policy};
use quotad::journal::MemoryJournal;

const CONFIG: &str = r#"
[pricing]
currency = "USD"
unpriced = "reject"
  [[pricing.prices]]
  name = "llm"
  match = { event = "llm.*" }
  tokens = "2.5/1M"
  [[pricing.prices]]
  name = "img"
  match = { event = "img" }
  requests = "0.001"

[engine]
reservation_ttl_default = "30s"
reservation_ttl_max = "5m"
idempotency_retention = "1h"

[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
period = "1m"
max = 3000

[[plans]]
name = "free"
default = true
unmatched = "deny"
  [[plans.limits]]
  name = "per-min"
  match = { event = "llm.*" }
  period = "1m"
  max = 5
  [[plans.limits]]
  name = "tokens-day"
  metric = "tokens"
  match = { event = "llm.*" }
  period = "1d"
  max = 2000
  [[plans.limits]]
  name = "slide"
  match = { event = "llm.chat" }
  algorithm = "sliding"
  period = "10s"
  max = 4
  [[plans.limits]]
  name = "soft"
  match = { event = "llm.chat" }
  period = "1m"
  max = 2
  mode = "degrade"
  [[plans.limits]]
  name = "bucket"
  match = { event = "img" }
  algorithm = "token_bucket"
  max = 3
  refill = 1
  period = "2s"
  [[plans.limits]]
  name = "credits"
  match = { event = "img" }
  algorithm = "lifetime"
  max = 2
  [[plans.limits]]
  name = "watch"
  match = { event = "img" }
  algorithm = "sliding"
  period = "10s"
  max = 1
  mode = "monitor"
  [[plans.limits]]
  name = "spend"
  metric = "cost_micros"
  match = { event = "*" }
  period = "1d"
  max = 9000

[[plans]]
name = "pro"
  [[plans.limits]]
  name = "per-min"
  match = { event = "llm.*" }
  period = "1m"
  max = 8
  [[plans.limits]]
  name = "tokens-day"
  metric = "tokens"
  match = { event = "llm.*" }
  period = "1d"
  max = 5000
"#;

const EVENTS: [&str; 4] = ["llm.chat", "llm.embed", "img", "other"];
const T0: u64 = 1_795_255_200_000;

#[derive(Clone, Copy, PartialEq, Debug)]
enum K {
    Fixed(u64),
    Sliding(u64),
    Bucket { cap_period_ms: u64, refill: u64 },
    Lifetime,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum M {
    Enforce,
    Monitor,
    Degrade,
}

#[derive(Clone, Copy, Debug)]
struct L {
    name: &'static str,
    tokens: bool,
    /// Counts cost_micros (then `tokens` is false).
    cost: bool,
    global: bool,
    kind: K,
    max: u64,
    mode: M,
    events: &'static [&'static str],
    plan_limit: bool,
}

const fn l(name: &'static str, tokens: bool, kind: K, max: u64, mode: M, events: &'static [&'static str]) -> L {
    L {
        name,
        tokens,
        cost: false,
        global: false,
        kind,
        max,
        mode,
        events,
        plan_limit: true,
    }
}

const LLM: &[&str] = &["llm.chat", "llm.embed"];
const GLOBAL: L = L {
    name: "global-tokens",
    tokens: true,
    cost: false,
    global: true,
    kind: K::Fixed(60_000),
    max: 3000,
    mode: M::Enforce,
    events: &["llm.chat", "llm.embed", "img", "other"],
    plan_limit: false,
};
const SPEND: L = L {
    cost: true,
    ..l(
        "spend",
        false,
        K::Fixed(86_400_000),
        9000,
        M::Enforce,
        &["llm.chat", "llm.embed", "img"],
    )
};
const FREE: [L; 9] = [
    l("per-min", false, K::Fixed(60_000), 5, M::Enforce, LLM),
    l("tokens-day", true, K::Fixed(86_400_000), 2000, M::Enforce, LLM),
    l("slide", false, K::Sliding(10_000), 4, M::Enforce, &["llm.chat"]),
    l("soft", false, K::Fixed(60_000), 2, M::Degrade, &["llm.chat"]),
    l(
        "bucket",
        false,
        K::Bucket {
            cap_period_ms: 2_000,
            refill: 1,
        },
        3,
        M::Enforce,
        &["img"],
    ),
    l("credits", false, K::Lifetime, 2, M::Enforce, &["img"]),
    l("watch", false, K::Sliding(10_000), 1, M::Monitor, &["img"]),
    SPEND,
    GLOBAL,
];
const PRO: [L; 3] = [
    l("per-min", false, K::Fixed(60_000), 8, M::Enforce, LLM),
    l("tokens-day", true, K::Fixed(86_400_000), 5000, M::Enforce, LLM),
    GLOBAL,
];

/// Where a model charge landed.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Where {
    Window(u64),
    Sub(u64),
    Bucket,
    Life,
}

/// The reference model: counters in plain maps keyed by (limit, scope, slot).
#[derive(Default, Clone)]
struct Model {
    now: u64,
    plans: HashMap<String, bool>, // subject -> pro?
    windows: HashMap<(String, String, u64), u64>,
    subs: HashMap<(String, String), BTreeMap<u64, u64>>,
    buckets: HashMap<(String, String), (u128, u64)>,
    life: HashMap<(String, String), (u64, u64)>,
    holds: Vec<MRes>,
    keys: HashMap<String, (String, Snapshot)>,
}

#[derive(Clone, Debug)]
struct MRes {
    id: String,
    event: &'static str,
    held: Vec<(L, String, Where, u64)>,
    requested_tokens: u64,
    expires: u64,
    status: &'static str,
    committed: Option<u64>,
}

/// What is compared of a decision.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    allowed: bool,
    outcome: &'static str,
    used: Vec<(String, u64)>,
    retry_after_ms: Option<u64>,
}

/// The price table of CONFIG: 2.5 µ$ a token on llm.*, 1000 µ$ a call on img.
/// Any other event is refused as unpriced (`None`): `requests` is priced, and
/// every call carries one.
fn price(ev: &str, tokens: u64) -> Option<u64> {
    match ev {
        "llm.chat" | "llm.embed" => Some((tokens * 5).div_ceil(2)),
        "img" => Some(1000),
        _ => None,
    }
}

fn sub_ms(period: u64) -> u64 {
    (period / 60).max(1)
}

impl Model {
    fn plan(&self, s: &str) -> &'static [L] {
        if self.plans.get(s).copied().unwrap_or(false) {
            &PRO
        } else {
            &FREE
        }
    }

    fn scope(lim: &L, s: &str) -> String {
        if lim.global {
            "global".into()
        } else {
            s.into()
        }
    }

    fn slot(&self, lim: &L) -> Where {
        match lim.kind {
            K::Fixed(p) => Where::Window(self.now - self.now % p),
            K::Sliding(p) => Where::Sub(self.now / sub_ms(p)),
            K::Bucket { .. } => Where::Bucket,
            K::Lifetime => Where::Life,
        }
    }

    /// (used, effective max, retry_after when `amount` does not fit; None = never).
    fn usage(&self, lim: &L, scope: &str, amount: u64) -> (u64, u64, Option<Option<u64>>) {
        let key = (lim.name.to_string(), scope.to_string());
        let now = self.now;
        let fits = |used: u128, a: u128, max: u128| if a == 0 { used < max } else { used + a <= max };
        match lim.kind {
            K::Fixed(p) => {
                let start = now - now % p;
                let used = *self.windows.get(&(key.0, key.1, start)).unwrap_or(&0);
                let retry = if fits(used.into(), amount.into(), lim.max.into()) {
                    None
                } else if amount > lim.max || lim.max == 0 {
                    Some(None)
                } else {
                    Some(Some(start + p - now))
                };
                (used, lim.max, retry)
            }
            K::Sliding(p) => {
                let w = sub_ms(p);
                let live: Vec<(u64, u64)> = self
                    .subs
                    .get(&key)
                    .map(|m| {
                        m.iter()
                            .filter(|(b, _)| (*b + 1) * w > now.saturating_sub(p))
                            .map(|(b, c)| (*b, *c))
                            .collect()
                    })
                    .unwrap_or_default();
                let used: u64 = live.iter().map(|x| x.1).sum();
                let retry = if fits(used.into(), amount.into(), lim.max.into()) {
                    None
                } else if amount > lim.max || lim.max == 0 {
                    Some(None)
                } else {
                    let need = if amount == 0 {
                        used - lim.max + 1
                    } else {
                        used + amount - lim.max
                    };
                    let mut freed = 0;
                    let mut at = now;
                    for (b, c) in live {
                        freed += c;
                        if freed >= need {
                            at = (b + 1) * w + p;
                            break;
                        }
                    }
                    Some(Some(at - now))
                };
                (used, lim.max, retry)
            }
            K::Bucket {
                cap_period_ms: p,
                refill,
            } => {
                let (d0, at) = *self.buckets.get(&key).unwrap_or(&(0, now));
                let d = d0.saturating_sub(u128::from(now.saturating_sub(at)) * u128::from(refill));
                let used = d.div_ceil(p.into()) as u64;
                let (a, cap) = (u128::from(amount) * u128::from(p), u128::from(lim.max) * u128::from(p));
                let retry = if fits(d, a, cap) {
                    None
                } else if amount > lim.max || lim.max == 0 {
                    Some(None)
                } else {
                    let excess = if amount == 0 { d - cap + 1 } else { d + a - cap };
                    Some(Some(excess.div_ceil(refill.into()) as u64))
                };
                (used, lim.max, retry)
            }
            K::Lifetime => {
                let (used, credited) = *self.life.get(&key).unwrap_or(&(0, 0));
                let max = lim.max + credited;
                let retry = if fits(used.into(), amount.into(), max.into()) {
                    None
                } else {
                    Some(None)
                };
                (used, max, retry)
            }
        }
    }

    /// The sooner of `base` and the first time the active holds on this
    /// counter, given back as they expire (soonest first, at most 64),
    /// leave room for `amount`.
    fn retry_with_holds(&self, lim: &L, scope: &str, amount: u64, base: Option<u64>) -> Option<u64> {
        let mut holds: Vec<(u64, String, Where, u64)> = self
            .holds
            .iter()
            .filter(|h| h.status == "active")
            .flat_map(|h| {
                h.held
                    .iter()
                    .filter(|(l, sc, _, a)| l.name == lim.name && sc == scope && *a > 0)
                    .map(move |(_, _, w, a)| (h.expires, h.id.clone(), *w, *a))
            })
            .collect();
        holds.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut m = self.clone();
        for (expires, _, w, a) in holds.into_iter().take(64) {
            let at = if expires > self.now { expires } else { self.now + 250 };
            if base.is_some_and(|r| at - self.now >= r) {
                break;
            }
            m.now = at;
            m.charge(lim, scope, w, -(a as i64));
            if m.usage(lim, scope, amount).2.is_none() {
                return Some(at - self.now);
            }
        }
        base
    }

    fn charge(&mut self, lim: &L, scope: &str, at: Where, delta: i64) {
        let key = (lim.name.to_string(), scope.to_string());
        let add = |v: u64| {
            if delta >= 0 {
                v.saturating_add(delta as u64)
            } else {
                v.saturating_sub(delta.unsigned_abs())
            }
        };
        let now = self.now;
        match (lim.kind, at) {
            (K::Fixed(_), Where::Window(start)) => {
                let e = self.windows.entry((key.0, key.1, start)).or_insert(0);
                *e = add(*e);
            }
            (K::Sliding(p), Where::Sub(b)) => {
                if (b + 1) * sub_ms(p) > now.saturating_sub(p) {
                    let e = self.subs.entry(key).or_default().entry(b).or_insert(0);
                    *e = add(*e);
                }
            }
            (
                K::Bucket {
                    cap_period_ms: p,
                    refill,
                },
                Where::Bucket,
            ) => {
                let (d0, at) = *self.buckets.get(&key).unwrap_or(&(0, now));
                let (mut d, at) = if now > at {
                    (d0.saturating_sub(u128::from(now - at) * u128::from(refill)), now)
                } else {
                    (d0, at)
                };
                let units = u128::from(delta.unsigned_abs()) * u128::from(p);
                d = if delta >= 0 { d + units } else { d.saturating_sub(units) };
                self.buckets.insert(key, (d, at));
            }
            (K::Lifetime, Where::Life) => {
                let e = self.life.entry(key).or_insert((0, 0));
                e.0 = add(e.0);
            }
            other => panic!("model slot mismatch {other:?}"),
        }
    }

    fn expire(&mut self) {
        let now = self.now;
        let due: Vec<usize> = (0..self.holds.len())
            .filter(|&i| self.holds[i].status == "active" && self.holds[i].expires <= now)
            .collect();
        for i in due {
            let held = self.holds[i].held.clone();
            for (lim, scope, at, amt) in held {
                self.charge(&lim, &scope, at, -(amt as i64));
            }
            self.holds[i].status = "expired";
        }
    }

    fn decide(&mut self, op: DecideOp, s: &str, ev: &'static str, tokens: u64, ttl: u64) -> (Snapshot, Option<MRes>) {
        self.expire();
        let plan = self.plan(s);
        let matched: Vec<L> = plan.iter().filter(|l| l.events.contains(&ev)).copied().collect();
        let cost = price(ev, tokens).expect("priced");
        let amount = |lim: &L| {
            if lim.cost {
                cost
            } else if lim.tokens {
                tokens
            } else {
                1
            }
        };
        let mut denied = false;
        let mut degraded = false;
        let mut retry = Some(0u64);
        for lim in &matched {
            let scope = Self::scope(lim, s);
            let (_, _, r) = self.usage(lim, &scope, amount(lim));
            if let Some(r) = r {
                match lim.mode {
                    M::Enforce => {
                        let exceeds = !matches!(lim.kind, K::Lifetime) && (amount(lim) > lim.max || lim.max == 0);
                        let r = if exceeds {
                            r
                        } else {
                            self.retry_with_holds(lim, &scope, amount(lim), r)
                        };
                        denied = true;
                        retry = match (retry, r) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                    }
                    M::Degrade => degraded = true,
                    M::Monitor => {}
                }
            }
        }
        let free = !self.plans.get(s).copied().unwrap_or(false);
        if !denied && free && !matched.iter().any(|l| l.plan_limit) {
            denied = true;
            retry = None;
        }
        let mut res = None;
        if !denied && op != DecideOp::Check {
            let mut held = Vec::new();
            for lim in &matched {
                let scope = Self::scope(lim, s);
                let at = self.slot(lim);
                self.charge(lim, &scope, at, amount(lim) as i64);
                held.push((*lim, scope, at, amount(lim)));
            }
            if op == DecideOp::Reserve {
                res = Some(MRes {
                    id: String::new(),
                    event: ev,
                    held,
                    requested_tokens: tokens,
                    expires: self.now + ttl,
                    status: "active",
                    committed: None,
                });
            }
        }
        let used = matched
            .iter()
            .map(|lim| (lim.name.to_string(), self.usage(lim, &Self::scope(lim, s), 0).0))
            .collect();
        let outcome = if denied {
            "deny"
        } else if degraded {
            "degrade"
        } else {
            "allow"
        };
        (
            Snapshot {
                allowed: !denied,
                outcome,
                used,
                retry_after_ms: if denied { retry } else { None },
            },
            res,
        )
    }
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::Degrade => "degrade",
    }
}

#[derive(Clone, Debug)]
enum Cmd {
    Advance(u64),
    Decide {
        op: u8,
        s: u8,
        ev: u8,
        tokens: u64,
        key: Option<u8>,
        ttl: u64,
    },
    Commit {
        r: usize,
        tokens: Option<u64>,
    },
    Release {
        r: usize,
    },
    SetPlan {
        s: u8,
        pro: bool,
    },
    Credit {
        s: u8,
        lifetime: bool,
        amount: u64,
    },
    Reset {
        s: u8,
    },
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        3 => prop_oneof![0u64..300, 0u64..5_000, 50_000u64..100_000].prop_map(Cmd::Advance),
        8 => (0u8..3, 0u8..3, 0u8..4, 0u64..1200, proptest::option::of(0u8..4), 1_000u64..40_000)
            .prop_map(|(op, s, ev, tokens, key, ttl)| Cmd::Decide { op, s, ev, tokens, key, ttl }),
        2 => (0usize..8, proptest::option::of(0u64..1500)).prop_map(|(r, tokens)| Cmd::Commit { r, tokens }),
        1 => (0usize..8).prop_map(|r| Cmd::Release { r }),
        1 => (0u8..3, any::<bool>()).prop_map(|(s, pro)| Cmd::SetPlan { s, pro }),
        1 => (0u8..3, any::<bool>(), 1u64..500).prop_map(|(s, lifetime, amount)| Cmd::Credit { s, lifetime, amount }),
        1 => (0u8..3).prop_map(|s| Cmd::Reset { s }),
    ]
}

fn engine(journal: Arc<MemoryJournal>) -> Engine {
    let config = Config::from_toml(CONFIG, "model.toml").unwrap();
    Engine::new(Policy::from_config(&config).unwrap(), journal)
}

/// Per subject: plan and (limit, scope, used) of each counter.
type Views = Vec<(String, Vec<(String, String, u64)>)>;

fn views(e: &Engine, now: u64) -> Views {
    (0..3)
        .map(|i| {
            let s = format!("s{i}");
            let v = e.subject(&s, now).unwrap();
            (
                v.plan.clone(),
                v.counters
                    .iter()
                    .map(|c| (c.limit.to_string(), c.scope.to_string(), c.used))
                    .collect(),
            )
        })
        .collect()
}

fn run(cmds: &[Cmd]) -> Result<(), TestCaseError> {
    let journal = Arc::new(MemoryJournal::default());
    let e = engine(journal.clone());
    let mut m = Model {
        now: T0,
        ..Model::default()
    };
    for (step, c) in cmds.iter().enumerate() {
        match c.clone() {
            Cmd::Advance(ms) => {
                m.now += ms;
                e.gc(m.now, 1000).unwrap();
            }
            Cmd::Decide {
                op,
                s,
                ev,
                tokens,
                key,
                ttl,
            } => {
                let op = [DecideOp::Check, DecideOp::Consume, DecideOp::Reserve][op as usize];
                let subject = format!("s{s}");
                let event = EVENTS[ev as usize];
                let key = key.filter(|_| op != DecideOp::Check).map(|k| format!("key{k}"));
                let req = DecisionRequest {
                    subject: subject.clone(),
                    event: Some(event.into()),
                    attributes: BTreeMap::new(),
                    amounts: BTreeMap::from([("tokens".to_string(), tokens)]),
                    idempotency_key: key.clone(),
                    ttl_ms: (op == DecideOp::Reserve).then_some(ttl),
                    priority: None,
                };
                let got = e.decide(op, &req, m.now);
                if price(event, tokens).is_none() {
                    prop_assert!(matches!(got, Err(EngineError::Unpriced(_))), "step {}: {:?}", step, got);
                    continue;
                }
                let fingerprint = format!("{op:?}|{subject}|{event}|{tokens}|{ttl}");
                if let Some(k) = &key {
                    if let Some((fp, stored)) = m.keys.get(k).cloned() {
                        m.expire();
                        if fp != fingerprint {
                            prop_assert_eq!(got, Err(EngineError::IdempotencyConflict(k.clone())), "step {}", step);
                        } else {
                            let d = got.unwrap().value;
                            prop_assert!(d.replayed);
                            prop_assert_eq!(d.allowed, stored.allowed);
                            let used: Vec<_> = d.counters.iter().map(|c| (c.limit.to_string(), c.used)).collect();
                            prop_assert_eq!(&used, &stored.used, "step {}: replay answers the original", step);
                        }
                        continue;
                    }
                }
                let (want, res) = m.decide(op, &subject, event, tokens, ttl);
                let d = got.map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?.value;
                let have = Snapshot {
                    allowed: d.allowed,
                    outcome: outcome_str(d.decision),
                    used: d.counters.iter().map(|c| (c.limit.to_string(), c.used)).collect(),
                    retry_after_ms: d.retry_after_ms,
                };
                prop_assert_eq!(&have, &want, "step {}: {:?}", step, c);
                if let (Some(mut r), Some(id)) = (res, d.reservation_id.clone()) {
                    r.id = id;
                    m.holds.push(r);
                }
                if let (Some(k), true) = (key, want.allowed) {
                    m.keys.insert(k, (fingerprint, want));
                }
            }
            Cmd::Commit { .. } | Cmd::Release { .. } if m.holds.is_empty() => {}
            Cmd::Commit { r, tokens } => {
                m.expire();
                let i = r % m.holds.len();
                let id = m.holds[i].id.clone();
                let amounts = tokens
                    .map(|t| BTreeMap::from([("tokens".to_string(), t)]))
                    .unwrap_or_default();
                let got = e.finish(&id, Finish::Commit(amounts), m.now);
                let actual_tokens = tokens.unwrap_or(m.holds[i].requested_tokens);
                let res = m.holds[i].clone();
                match res.status {
                    "active" | "expired" => {
                        // Priced again from the actual tokens; an unpriced hold keeps its cost.
                        let actual_cost = price(res.event, actual_tokens).unwrap_or(0);
                        for (lim, scope, at, held) in &res.held {
                            let actual = if lim.cost {
                                actual_cost
                            } else if lim.tokens {
                                actual_tokens
                            } else {
                                1
                            };
                            let delta = if res.status == "active" {
                                actual as i64 - *held as i64
                            } else {
                                actual as i64
                            };
                            m.charge(lim, scope, *at, delta);
                        }
                        let a = got.map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?.value;
                        prop_assert_eq!(a.expired, res.status == "expired");
                        m.holds[i].status = "committed";
                        m.holds[i].committed = Some(actual_tokens);
                    }
                    "committed" if res.committed == Some(actual_tokens) => {
                        prop_assert!(got.is_ok())
                    }
                    _ => prop_assert!(
                        matches!(got, Err(EngineError::ReservationFinished(_))),
                        "step {}: {:?}",
                        step,
                        got
                    ),
                }
            }
            Cmd::Release { r } => {
                m.expire();
                let i = r % m.holds.len();
                let res = m.holds[i].clone();
                let got = e.finish(&res.id, Finish::Release, m.now);
                match res.status {
                    "active" => {
                        for (lim, scope, at, held) in &res.held {
                            m.charge(lim, scope, *at, -(*held as i64));
                        }
                        prop_assert!(got.is_ok());
                        m.holds[i].status = "released";
                    }
                    "expired" | "released" => {
                        prop_assert!(got.is_ok());
                        m.holds[i].status = "released";
                    }
                    _ => prop_assert!(matches!(got, Err(EngineError::ReservationFinished(_)))),
                }
            }
            Cmd::SetPlan { s, pro } => {
                m.expire();
                e.put_subject(
                    &format!("s{s}"),
                    Some(if pro { "pro" } else { "free" }),
                    None,
                    None,
                    m.now,
                )
                .unwrap();
                m.plans.insert(format!("s{s}"), pro);
            }
            Cmd::Credit { s, lifetime, amount } => {
                m.expire();
                let subject = format!("s{s}");
                let name = if lifetime { "credits" } else { "tokens-day" };
                e.credit(&subject, name, amount, None, m.now).unwrap();
                let key = (name.to_string(), subject);
                if lifetime {
                    m.life.entry(key).or_insert((0, 0)).1 += amount;
                } else {
                    let start = m.now - m.now % 86_400_000;
                    if let Some(v) = m.windows.get_mut(&(key.0, key.1, start)) {
                        *v = v.saturating_sub(amount);
                    }
                }
            }
            Cmd::Reset { s } => {
                m.expire();
                let subject = format!("s{s}");
                e.reset(&subject, None, None, m.now).unwrap();
                m.windows.retain(|k, _| k.1 != subject);
                m.subs.retain(|k, _| k.1 != subject);
                m.buckets.retain(|k, _| k.1 != subject);
                m.life.retain(|k, _| k.1 != subject);
            }
        }
        // Every subject's counters agree with the model after every step.
        m.expire();
        for i in 0..3 {
            let subject = format!("s{i}");
            let v = e.subject(&subject, m.now).unwrap();
            for c in &v.counters {
                let lim = m.plan(&subject).iter().find(|l| *l.name == *c.limit).unwrap();
                let (used, _, _) = m.usage(lim, &Model::scope(lim, &subject), 0);
                prop_assert_eq!(c.used, used, "step {}: {} of {}", step, c.limit, subject);
            }
        }
    }
    // Replaying the journal into a fresh engine rebuilds the same state.
    let mut fresh = engine(Arc::new(MemoryJournal::default()));
    for (lsn, at_ms, muts) in journal.records() {
        fresh.replay(lsn, at_ms, &muts);
    }
    fresh.finish_recovery();
    prop_assert_eq!(views(&fresh, m.now), views(&e, m.now));
    prop_assert_eq!(fresh.stats().open_reservations, e.stats().open_reservations);
    // A cluster follower fed the same records live reaches the same state; fed
    // them twice (as after a snapshot taken mid-stream), it changes nothing.
    let follower = engine(Arc::new(MemoryJournal::default()));
    for _ in 0..2 {
        for (lsn, at_ms, muts) in journal.records() {
            follower.apply_replicated(lsn, at_ms, &muts, None);
        }
        prop_assert_eq!(views(&follower, m.now), views(&e, m.now));
        prop_assert_eq!(follower.stats().open_reservations, e.stats().open_reservations);
        prop_assert_eq!(follower.digest(m.now), e.digest(m.now));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_the_reference_model(cmds in proptest::collection::vec(cmd(), 1..60)) {
        run(&cmds)?;
    }
}
