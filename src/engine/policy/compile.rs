//! The compiled form of a [`PolicyDoc`], and every check that rejects a
//! contradictory policy (from the file at start or reload, or from the API)
//! with the path of the offending key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use jiff::tz::TimeZone;

use super::doc::{
    Algorithm, LimitConfig, MatchConfig, MaxValue, Mode, PolicyDoc, Priority, Unmatched, MAX_SAFE_INTEGER,
};
use crate::config::{Config, ConfigError, EngineSettings};
use crate::engine::pricing::Pricing;
use crate::engine::signals::{Anomaly, Breaker, HIDDEN_PREFIX};
use crate::period::Period;

/// Sub-windows per sliding window: the guarantee's granularity is `period / 60`.
pub const SLIDING_BUCKETS: u64 = 60;

/// The counting rule of a limit, with its parameters resolved.
#[derive(Debug, Clone)]
pub enum Kind {
    /// Calendar-aligned windows.
    Fixed {
        /// Window length.
        period: Period,
        /// Zone of calendar windows.
        tz: TimeZone,
        /// The last window computed: calendar windows go through time-zone
        /// rules, and every decision needs the current one several times.
        last: Arc<WindowCache>,
    },
    /// Rolling window made of `SLIDING_BUCKETS` sub-windows.
    Sliding {
        /// Window length.
        period_ms: u64,
        /// Sub-window width: `period_ms / 60`, rounded down.
        bucket_ms: u64,
    },
    /// Continuous refill.
    TokenBucket {
        /// Refill period.
        period_ms: u64,
        /// Tokens per period.
        refill: u64,
    },
    /// Never resets.
    Lifetime,
}

/// The most recent `[start, end)` of a fixed limit. A window only changes when
/// `now` leaves it, so the cached one is exact whenever it contains `now`.
#[derive(Debug, Default)]
pub struct WindowCache {
    window: std::sync::RwLock<(u64, u64)>,
}

impl WindowCache {
    /// The window of `period` in `tz` containing `now_ms`.
    pub fn window(&self, period: &Period, tz: &TimeZone, now_ms: u64) -> (u64, u64) {
        let (start, end) = *self.window.read().unwrap_or_else(|e| e.into_inner());
        if start <= now_ms && now_ms < end {
            return (start, end);
        }
        let w = period.window(tz, now_ms);
        *self.window.write().unwrap_or_else(|e| e.into_inner()) = w;
        w
    }
}

/// What a limit's counter is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Per subject.
    Subject,
    /// One for all.
    Global,
    /// Per value of the named attribute.
    Attribute(Arc<str>),
}

impl Scope {
    fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "subject" => Ok(Scope::Subject),
            "global" => Ok(Scope::Global),
            _ => match s.strip_prefix("attribute:") {
                Some(name) if valid_name(name, 64) => Ok(Scope::Attribute(name.into())),
                _ => Err(format!(
                    "{s:?} is not a scope: use \"subject\", \"global\" or \"attribute:<name>\""
                )),
            },
        }
    }
}

/// Which events a limit applies to.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// Glob over the event; the event must be present when set.
    pub event: Option<String>,
    /// Attribute name to value glob; all must match.
    pub attributes: Vec<(String, String)>,
}

impl Matcher {
    /// Whether an event with these attributes is matched.
    pub fn matches(&self, event: Option<&str>, attributes: &std::collections::BTreeMap<String, String>) -> bool {
        if let Some(pattern) = &self.event {
            match event {
                Some(e) if glob_match(pattern, e) => {}
                _ => return false,
            }
        }
        self.attributes
            .iter()
            .all(|(k, pattern)| attributes.get(k).is_some_and(|v| glob_match(pattern, v)))
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else literally.
/// It walks both strings by byte offset, a character at a time, without
/// copying them: it runs for every limit's match on every decision.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // The shapes policies use: a name, or a prefix and `*` (`llm.*`).
    match pattern.as_bytes().iter().position(|&b| b == b'*' || b == b'?') {
        None => return pattern == text,
        Some(i) if i + 1 == pattern.len() && pattern.as_bytes()[i] == b'*' => {
            return text.starts_with(&pattern[..i]);
        }
        Some(_) => {}
    }
    let at = |s: &str, i: usize| s[i..].chars().next();
    let (mut pi, mut ti) = (0, 0);
    // Byte offsets of the last `*` and of the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while let Some(tc) = at(text, ti) {
        match at(pattern, pi) {
            Some(pc) if pc == '?' || (pc != '*' && pc == tc) => {
                pi += pc.len_utf8();
                ti += tc.len_utf8();
            }
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    let st = st + at(text, st).map_or(1, char::len_utf8);
                    pi = sp + 1;
                    ti = st;
                    star = Some((sp, st));
                }
                None => return false,
            },
        }
    }
    pattern[pi..].chars().all(|c| c == '*')
}

/// One compiled limit.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Counter identity together with the scope value.
    pub name: Arc<str>,
    /// Metric counted.
    pub metric: Arc<str>,
    /// How counters are keyed.
    pub scope: Scope,
    /// Counting rule.
    pub kind: Kind,
    /// Cap.
    pub max: MaxValue,
    /// What happens when exceeded.
    pub mode: Mode,
    /// Which events it applies to.
    pub matcher: Matcher,
    /// Alert thresholds in millionths of `max`, ascending.
    pub alerts: Vec<u32>,
    /// As written, for `GET /v1/plans`.
    pub source: LimitConfig,
}

/// One compiled plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Name (shared with every decision made under it).
    pub name: Arc<str>,
    /// Whether unassigned subjects get it.
    pub default: bool,
    /// Policy for events matching none of its own limits.
    pub unmatched: Unmatched,
    /// Priority of calls that name none.
    pub priority: Priority,
    /// Its own limits followed by the top-level limits; `is_plan` tells them apart.
    pub all: Vec<(Arc<Limit>, bool)>,
}

impl Plan {
    /// The limit of this plan (or the top level) with that name.
    pub fn limit(&self, name: &str) -> Option<&Arc<Limit>> {
        self.all.iter().map(|(l, _)| l).find(|l| &*l.name == name)
    }
}

/// Everything every limit with a given name shares.
#[derive(Debug, Clone)]
pub struct LimitShape {
    /// Metric.
    pub metric: Arc<str>,
    /// Scope.
    pub scope: Scope,
    /// Algorithm.
    pub algorithm: Algorithm,
    /// Period as written (none for lifetime limits).
    pub period: Option<String>,
    /// Time zone of calendar windows.
    pub timezone: String,
}

impl LimitShape {
    /// Why counters kept under this shape do not carry over to `new` (their
    /// usage starts again from zero), if they do not.
    pub fn resets_under(&self, new: &LimitShape) -> Option<String> {
        let change =
            |what: &str, a: &dyn std::fmt::Display, b: &dyn std::fmt::Display| Some(format!("{what} {a} -> {b}"));
        let period = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        if self.algorithm != new.algorithm {
            change("algorithm", &self.algorithm, &new.algorithm)
        } else if self.period != new.period {
            change("period", &period(&self.period), &period(&new.period))
        } else if self.timezone != new.timezone {
            change("timezone", &self.timezone, &new.timezone)
        } else if self.scope != new.scope {
            change("scope", &format!("{:?}", self.scope), &format!("{:?}", new.scope))
        } else if self.metric != new.metric {
            change("metric", &self.metric, &new.metric)
        } else {
            None
        }
    }
}

/// Limits and plans in force, plus engine settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Plans in file order.
    pub plans: Vec<Plan>,
    /// Plan name to index.
    pub plan_index: HashMap<String, usize>,
    /// Index of the default plan.
    pub default_plan: Option<usize>,
    /// Limits for every subject.
    pub top_limits: Vec<Arc<Limit>>,
    /// Every limit name in any plan or the top level.
    pub shapes: HashMap<Arc<str>, LimitShape>,
    /// Every limit with a non-subject scope, deduplicated by name and match: their
    /// counters may be touched by a decision whatever the subject's plan.
    pub shared_limits: Vec<Arc<Limit>>,
    /// Metrics requests may carry.
    pub metrics: HashSet<String>,
    /// Resolved `[engine]` settings.
    pub settings: EngineSettings,
    /// The price table, when `[pricing]` is configured.
    pub pricing: Option<Pricing>,
    /// Circuit breakers.
    pub breakers: Vec<Arc<Breaker>>,
    /// Anomaly rules.
    pub anomalies: Vec<Arc<Anomaly>>,
    /// Events are kept this long (`events.retention`).
    pub events_retention_ms: u64,
    /// Some limit has alert thresholds (else decisions skip looking for crossings).
    pub has_alerts: bool,
    /// Charges are recorded into usage history (`history.enabled`).
    pub history: bool,
    /// (hourly, daily) retention of usage history, ms.
    pub history_retention_ms: (u64, u64),
    /// Attributes usage history is also kept per (`history.dimensions`).
    pub history_dimensions: Arc<[Arc<str>]>,
    /// Which policy the engine installed this as (it counts installs):
    /// decisions check it under their shard locks, so none is decided under
    /// a policy that was replaced while it waited for them.
    pub generation: u64,
    /// The policy as written.
    pub doc: Arc<PolicyDoc>,
}

impl Policy {
    /// Whether anything decides signals: thresholds, breakers or anomaly rules.
    pub fn has_signals(&self) -> bool {
        self.has_alerts || !self.breakers.is_empty() || !self.anomalies.is_empty()
    }

    /// The breaker of that name.
    pub fn breaker(&self, name: &str) -> Option<&Arc<Breaker>> {
        self.breakers.iter().find(|b| &*b.name == name)
    }
}

fn signal_duration(key: &str, value: &str) -> Result<u64, ConfigError> {
    let p = Period::parse_duration(value).map_err(|e| ConfigError::new(key, e.to_string()))?;
    let ms = p
        .fixed_ms()
        .ok_or_else(|| ConfigError::new(key, "months have no fixed length; use days (\"30d\")"))?;
    if !(1_000..=400 * 86_400_000).contains(&ms) {
        return Err(ConfigError::new(
            key,
            format!("{value:?} is out of range: must be between 1s and 400d"),
        ));
    }
    Ok(ms)
}

fn check_ratio(key: &str, ratio: f64) -> Result<f64, ConfigError> {
    if ratio.is_finite() && (1.0..=1_000_000.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(ConfigError::new(
            key,
            format!("{ratio} is out of range: the ratio over normal must be between 1 and 1000000"),
        ))
    }
}

/// Compiled `[[breakers]]` and `[[anomalies]]`.
type SignalRules = (Vec<Arc<Breaker>>, Vec<Arc<Anomaly>>);

/// Compiles `[[breakers]]` and `[[anomalies]]`.
fn compile_signals(config: &PolicyDoc, metrics: &HashSet<String>) -> Result<SignalRules, ConfigError> {
    let cost_metric = config.pricing.as_ref().map(|p| p.metric.as_str());
    let known = |key: &str, m: &str| -> Result<Arc<str>, ConfigError> {
        if metrics.contains(m) || Some(m) == cost_metric {
            Ok(m.into())
        } else {
            let mut list: Vec<&str> = metrics.iter().map(String::as_str).chain(cost_metric).collect();
            list.sort_unstable();
            Err(ConfigError::new(
                key,
                format!(
                    "{m:?} is not a metric of any limit, price or `metrics`; the metrics are {}",
                    list.join(", ")
                ),
            ))
        }
    };
    let mut breakers: Vec<Arc<Breaker>> = Vec::new();
    for (i, b) in config.breakers.iter().enumerate() {
        let key = format!("breakers[{i}]");
        if !valid_name(&b.name, 128) {
            return Err(ConfigError::new(
                key + ".name",
                "must be 1-128 characters without spaces",
            ));
        }
        if breakers.iter().any(|x| *x.name == *b.name) {
            return Err(ConfigError::new(
                key + ".name",
                format!("breaker {:?} is defined twice", b.name),
            ));
        }
        let metric = known(&format!("{key}.metric"), &b.metric)?;
        let scope = Scope::parse(&b.scope).map_err(|m| ConfigError::new(format!("{key}.scope"), m))?;
        if scope == Scope::Subject {
            return Err(ConfigError::new(
                key + ".scope",
                "a breaker watches traffic as a whole: use \"global\" or \"attribute:<name>\" (anomaly rules watch subjects)",
            ));
        }
        let window_ms = signal_duration(&format!("{key}.window"), &b.window)?;
        let baseline_ms = match (&b.baseline, b.normal_per_hour) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    key + ".normal_per_hour",
                    "give either baseline (a learned normal rate) or normal_per_hour (a fixed one), not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    key + ".baseline",
                    "is required unless normal_per_hour gives a fixed normal rate",
                ))
            }
            (Some(s), None) => Some(signal_duration(&format!("{key}.baseline"), s)?),
            (None, Some(n)) if n == 0 || n > MAX_SAFE_INTEGER => {
                return Err(ConfigError::new(
                    key + ".normal_per_hour",
                    format!("must be between 1 and {MAX_SAFE_INTEGER}"),
                ))
            }
            (None, Some(_)) => None,
        };
        let cooldown_ms = signal_duration(&format!("{key}.cooldown"), &b.cooldown)?;
        let ratio = check_ratio(&format!("{key}.ratio"), b.ratio)?;
        let matcher = match &b.match_ {
            Some(m) => compile_matcher(&key, m)?,
            None => Matcher::default(),
        };
        let sliding = |period_ms: u64| Kind::Sliding {
            period_ms,
            bucket_ms: (period_ms / SLIDING_BUCKETS).max(1),
        };
        breakers.push(Arc::new(Breaker {
            name: b.name.as_str().into(),
            metric,
            matcher,
            scope,
            window_ms,
            baseline_ms,
            normal_per_hour: b.normal_per_hour,
            ratio,
            min_amount: b.min_amount,
            cooldown_ms,
            pass_priority: b.pass_priority,
            recent_limit: format!("{HIDDEN_PREFIX}breaker:{}:recent", b.name).into(),
            long_limit: format!("{HIDDEN_PREFIX}breaker:{}:long", b.name).into(),
            recent_kind: sliding(window_ms),
            long_kind: sliding(window_ms + baseline_ms.unwrap_or(0)),
            max_scopes: 10_000,
            source: b.clone(),
        }));
    }
    let mut anomalies: Vec<Arc<Anomaly>> = Vec::new();
    for (i, a) in config.anomalies.iter().enumerate() {
        let key = format!("anomalies[{i}]");
        if !valid_name(&a.name, 128) {
            return Err(ConfigError::new(
                key + ".name",
                "must be 1-128 characters without spaces",
            ));
        }
        if anomalies.iter().any(|x| *x.name == *a.name) {
            return Err(ConfigError::new(
                key + ".name",
                format!("anomaly rule {:?} is defined twice", a.name),
            ));
        }
        let metric = known(&format!("{key}.metric"), &a.metric)?;
        let period = Period::parse(&a.period).map_err(|e| ConfigError::new(format!("{key}.period"), e.to_string()))?;
        let tz_name = a.timezone.as_deref().unwrap_or("UTC");
        let tz = TimeZone::get(tz_name).map_err(|_| {
            ConfigError::new(
                format!("{key}.timezone"),
                format!("{tz_name:?} is not a known IANA time zone"),
            )
        })?;
        if !(1..=90).contains(&a.baseline_periods) {
            return Err(ConfigError::new(
                key + ".baseline_periods",
                format!("{} is out of range: must be between 1 and 90", a.baseline_periods),
            ));
        }
        let ratio = check_ratio(&format!("{key}.ratio"), a.ratio)?;
        let matcher = match &a.match_ {
            Some(m) => compile_matcher(&key, m)?,
            None => Matcher::default(),
        };
        anomalies.push(Arc::new(Anomaly {
            name: a.name.as_str().into(),
            metric,
            matcher,
            period,
            tz,
            window: WindowCache::default(),
            baseline_periods: a.baseline_periods,
            ratio,
            min_amount: a.min_amount,
            action: a.action,
            limit: format!("{HIDDEN_PREFIX}anomaly:{}", a.name).into(),
            source: a.clone(),
        }));
    }
    Ok((breakers, anomalies))
}

/// Compiles a `match = {…}` table of the entry at `key`.
pub(crate) fn compile_matcher(key: &str, m: &MatchConfig) -> Result<Matcher, ConfigError> {
    let mut matcher = Matcher::default();
    if let Some(e) = &m.event {
        if e.is_empty() || e.len() > 128 {
            return Err(ConfigError::new(
                format!("{key}.match.event"),
                "must be a glob of 1-128 bytes",
            ));
        }
        matcher.event = Some(e.clone());
    }
    for (k, v) in &m.attributes {
        if !valid_name(k, 64) || v.is_empty() || v.len() > 256 {
            return Err(ConfigError::new(
                format!("{key}.match.attributes.{k}"),
                "attribute names are 1-64 bytes without spaces, value globs 1-256 bytes",
            ));
        }
        matcher.attributes.push((k.clone(), v.clone()));
    }
    Ok(matcher)
}

pub(crate) fn valid_name(s: &str, max_len: usize) -> bool {
    !s.is_empty() && s.len() <= max_len && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn compile_limit(key: &str, c: &LimitConfig) -> Result<Limit, ConfigError> {
    let err = |field: &str, msg: String| ConfigError::new(format!("{key}.{field}"), msg);
    if !valid_name(&c.name, 128) {
        return Err(err(
            "name",
            "must be 1-128 characters without spaces or control characters".into(),
        ));
    }
    if !valid_name(&c.metric, 64) {
        return Err(err(
            "metric",
            "must be 1-64 characters without spaces or control characters".into(),
        ));
    }
    let scope = Scope::parse(&c.scope).map_err(|m| err("scope", m))?;
    if c.refill.is_some() && c.algorithm != Algorithm::TokenBucket {
        return Err(err(
            "refill",
            format!("only token_bucket limits refill; this one is {}", c.algorithm),
        ));
    }
    if c.timezone.is_some() && c.algorithm != Algorithm::Fixed {
        return Err(err(
            "timezone",
            format!("only fixed windows follow a time zone; this one is {}", c.algorithm),
        ));
    }
    let period = match (&c.period, c.algorithm) {
        (Some(_), Algorithm::Lifetime) => {
            return Err(err(
                "period",
                "lifetime limits never reset, so they take no period".into(),
            ))
        }
        (None, Algorithm::Lifetime) => None,
        (None, a) => return Err(err("period", format!("is required for {a} limits"))),
        (Some(p), _) => Some(Period::parse(p).map_err(|e| err("period", e.to_string()))?),
    };
    let fixed_ms = |p: Period| {
        p.fixed_ms().ok_or_else(|| {
            err(
                "period",
                format!(
                    "{} limits need a fixed length; months vary, use days (\"30d\")",
                    c.algorithm
                ),
            )
        })
    };
    let kind = match c.algorithm {
        Algorithm::Fixed => {
            let tz_name = c.timezone.as_deref().unwrap_or("UTC");
            let tz = TimeZone::get(tz_name)
                .map_err(|_| err("timezone", format!("{tz_name:?} is not a known IANA time zone")))?;
            Kind::Fixed {
                period: period.expect("checked above"),
                tz,
                last: Arc::default(),
            }
        }
        Algorithm::Sliding => {
            let period_ms = fixed_ms(period.expect("checked above"))?;
            Kind::Sliding {
                period_ms,
                bucket_ms: (period_ms / SLIDING_BUCKETS).max(1),
            }
        }
        Algorithm::TokenBucket => {
            let period_ms = fixed_ms(period.expect("checked above"))?;
            let refill = match (c.refill, c.max) {
                (Some(r), _) => r,
                (None, MaxValue::Finite(m)) => m,
                (None, MaxValue::Unlimited) => 1,
            };
            if refill == 0 || refill > MAX_SAFE_INTEGER {
                return Err(err("refill", format!("must be between 1 and {MAX_SAFE_INTEGER}")));
            }
            Kind::TokenBucket { period_ms, refill }
        }
        Algorithm::Lifetime => Kind::Lifetime,
    };
    let matcher = match &c.match_ {
        Some(m) => compile_matcher(key, m)?,
        None => Matcher::default(),
    };
    let mut alerts = Vec::with_capacity(c.alerts.len());
    for (i, &t) in c.alerts.iter().enumerate() {
        if !(t > 0.0 && t <= 10.0) {
            return Err(err(
                &format!("alerts[{i}]"),
                format!("{t} is out of range: a threshold is a fraction of max above 0 and at most 10 (0.8 is 80%)"),
            ));
        }
        let ppm = (t * 1e6).round() as u32;
        if alerts.contains(&ppm) {
            return Err(err(&format!("alerts[{i}]"), format!("{t} is listed twice")));
        }
        alerts.push(ppm);
    }
    if !alerts.is_empty() && c.max == MaxValue::Unlimited {
        return Err(err(
            "alerts",
            "an unlimited limit has no max for thresholds to be fractions of; give it a max or drop alerts".into(),
        ));
    }
    if alerts.len() > 16 {
        return Err(err("alerts", "at most 16 thresholds per limit".into()));
    }
    alerts.sort_unstable();
    Ok(Limit {
        alerts,
        name: c.name.as_str().into(),
        metric: c.metric.as_str().into(),
        scope,
        kind,
        max: c.max,
        mode: c.mode,
        matcher,
        source: c.clone(),
    })
}

impl Policy {
    /// Compiles and checks `doc` under the daemon settings of `daemon`.
    /// Errors name the key; the caller fills in the file.
    pub fn compile(doc: &PolicyDoc, daemon: &Config) -> Result<Policy, ConfigError> {
        let config = doc;
        let settings = daemon.engine.settings()?;
        let mut shapes: HashMap<Arc<str>, LimitShape> = HashMap::new();
        let mut check_shape = |key: &str, l: &Limit| -> Result<(), ConfigError> {
            let period = l.source.period.clone();
            let tz = l.source.timezone.clone().unwrap_or_else(|| "UTC".into());
            let shape = LimitShape {
                metric: l.metric.clone(),
                scope: l.scope.clone(),
                algorithm: l.source.algorithm,
                period,
                timezone: tz,
            };
            match shapes.get(&l.name) {
                None => {
                    shapes.insert(l.name.clone(), shape);
                    Ok(())
                }
                Some(s) => {
                    let what = if s.metric != shape.metric {
                        "metric"
                    } else if s.scope != shape.scope {
                        "scope"
                    } else if s.algorithm != shape.algorithm {
                        "algorithm"
                    } else if s.period != shape.period {
                        "period"
                    } else if s.timezone != shape.timezone {
                        "timezone"
                    } else {
                        return Ok(());
                    };
                    Err(ConfigError::new(
                        format!("{key}.{what}"),
                        format!(
                            "limit {:?} is defined elsewhere with another {what}; limits sharing a name share \
                             counters, so they must agree on metric, scope, algorithm, period and timezone",
                            l.name
                        ),
                    ))
                }
            }
        };

        let mut top_limits = Vec::new();
        let mut top_names = HashSet::new();
        for (i, lc) in config.limits.iter().enumerate() {
            let key = format!("limits[{i}]");
            let l = compile_limit(&key, lc)?;
            if !top_names.insert(l.name.clone()) {
                return Err(ConfigError::new(
                    key + ".name",
                    format!("{:?} is defined twice", l.name),
                ));
            }
            check_shape(&key, &l)?;
            top_limits.push(Arc::new(l));
        }

        let mut plans = Vec::new();
        let mut plan_index = HashMap::new();
        let mut default_plan: Option<usize> = None;
        for (pi, pc) in config.plans.iter().enumerate() {
            let pkey = format!("plans[{pi}]");
            if !valid_name(&pc.name, 128) {
                return Err(ConfigError::new(
                    pkey + ".name",
                    "must be 1-128 characters without spaces",
                ));
            }
            if plan_index.insert(pc.name.clone(), pi).is_some() {
                return Err(ConfigError::new(
                    pkey + ".name",
                    format!("plan {:?} is defined twice", pc.name),
                ));
            }
            if pc.default {
                if let Some(d) = default_plan {
                    return Err(ConfigError::new(
                        pkey + ".default",
                        format!(
                            "plan {:?} is already the default; only one plan can be",
                            config.plans[d].name
                        ),
                    ));
                }
                default_plan = Some(pi);
            }
            let mut all = Vec::new();
            let mut names = HashSet::new();
            for (li, lc) in pc.limits.iter().enumerate() {
                let key = format!("{pkey}.limits[{li}]");
                let l = compile_limit(&key, lc)?;
                if top_names.contains(&l.name) {
                    return Err(ConfigError::new(
                        key + ".name",
                        format!("{:?} is already a top-level limit, which applies to every plan", l.name),
                    ));
                }
                if !names.insert(l.name.clone()) {
                    return Err(ConfigError::new(
                        key + ".name",
                        format!("{:?} is defined twice in plan {:?}", l.name, pc.name),
                    ));
                }
                check_shape(&key, &l)?;
                all.push((Arc::new(l), true));
            }
            all.extend(top_limits.iter().map(|l| (l.clone(), false)));
            plans.push(Plan {
                name: pc.name.as_str().into(),
                default: pc.default,
                unmatched: pc.unmatched,
                priority: pc.priority,
                all,
            });
        }

        let mut metrics: HashSet<String> = HashSet::from(["requests".to_string()]);
        for (i, m) in config.metrics.iter().enumerate() {
            if !valid_name(m, 64) {
                return Err(ConfigError::new(
                    format!("metrics[{i}]"),
                    "must be 1-64 characters without spaces",
                ));
            }
            metrics.insert(m.clone());
        }
        let mut shared_limits: Vec<Arc<Limit>> = Vec::new();
        let mut seen_shared = HashSet::new();
        for l in top_limits
            .iter()
            .chain(plans.iter().flat_map(|p| p.all.iter().map(|(l, _)| l)))
        {
            metrics.insert(l.metric.to_string());
            let identity = (l.name.clone(), format!("{:?}", l.matcher));
            if l.scope != Scope::Subject && seen_shared.insert(identity) {
                shared_limits.push(l.clone());
            }
        }
        let pricing = match &config.pricing {
            Some(pc) => {
                let p = Pricing::compile(pc, &metrics)?;
                // Requests may carry the cost themselves (the app may know discounts).
                metrics.insert(p.metric.to_string());
                Some(p)
            }
            None => None,
        };
        let signals = compile_signals(config, &metrics)?;
        let has_alerts = plans.iter().any(|p| p.all.iter().any(|(l, _)| !l.alerts.is_empty()));
        Ok(Policy {
            breakers: signals.0,
            anomalies: signals.1,
            events_retention_ms: daemon.events.retention_ms()?,
            has_alerts,
            history: daemon.history.enabled,
            history_retention_ms: daemon.history.retention_ms()?,
            history_dimensions: daemon
                .history
                .dimensions
                .iter()
                .map(|d| Arc::from(d.as_str()))
                .collect(),
            generation: 0,
            doc: Arc::new(doc.clone()),
            pricing,
            plans,
            plan_index,
            default_plan,
            top_limits,
            shapes,
            shared_limits,
            metrics,
            settings,
        })
    }

    /// Compiles the policy sections of a configuration file under its settings.
    pub fn from_config(config: &Config) -> Result<Policy, ConfigError> {
        Self::compile(&config.policy_doc(), config)
    }

    /// The metrics calls may name, sorted, for error messages.
    pub fn metric_list(&self) -> String {
        let mut m: Vec<&str> = self.metrics.iter().map(String::as_str).collect();
        m.sort_unstable();
        m.join(", ")
    }

    /// The plan a subject assigned `assigned` is on: that plan if it still exists,
    /// else the default plan.
    pub fn plan_for(&self, assigned: Option<&str>) -> Option<&Plan> {
        assigned
            .and_then(|name| self.plan_index.get(name))
            .or(self.default_plan.as_ref())
            .map(|&i| &self.plans[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(toml_text: &str) -> Result<Policy, ConfigError> {
        let c = Config::from_toml(toml_text, "t.toml")?;
        Policy::compile(&c.policy_doc(), &c)
    }

    #[test]
    fn globs() {
        assert!(glob_match("llm.*", "llm.chat"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*.chat*", "llm.chat.stream"));
        assert!(!glob_match("llm.*", "image.render"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        // `?` is one character, not one byte; `*` backtracks over characters.
        assert!(glob_match("caf?", "café"));
        assert!(glob_match("*é*x", "aébéx"));
        assert!(!glob_match("caf?", "cafée"));
        assert!(glob_match("**a", "ba"));
        assert!(!glob_match("a*b", "acbc"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        // Against the obvious recursive definition, on every pattern and
        // text of up to 4 characters from a small alphabet with a
        // multi-byte letter.
        fn reference(p: &[char], t: &[char]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
                Some((&c, rest)) => t
                    .split_first()
                    .is_some_and(|(&d, tr)| (c == '?' || c == d) && reference(rest, tr)),
            }
        }
        let strings = |alphabet: &[char]| {
            let mut all = vec![String::new()];
            for len in 1..=4 {
                let mut idx = vec![0usize; len];
                loop {
                    all.push(idx.iter().map(|&i| alphabet[i]).collect::<String>());
                    let Some(k) = (0..len).rev().find(|&k| idx[k] + 1 < alphabet.len()) else {
                        break;
                    };
                    idx[k] += 1;
                    idx[k + 1..].iter_mut().for_each(|i| *i = 0);
                }
            }
            all
        };
        let texts = strings(&['a', 'é']);
        for p in strings(&['a', 'é', '*', '?']) {
            let pc: Vec<char> = p.chars().collect();
            for t in &texts {
                let tc: Vec<char> = t.chars().collect();
                assert_eq!(glob_match(&p, t), reference(&pc, &tc), "{p:?} on {t:?}");
            }
        }
    }

    #[test]
    fn rejects_contradictions_with_the_key() {
        let cases = [
            ("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1x\"\n", "plans[0].limits[0].period"),
            (
                "[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\ntimezone=\"Mars/Base\"\n",
                "plans[0].limits[0].timezone",
            ),
            ("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\nrefill=3\n", "plans[0].limits[0].refill"),
            (
                "[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\n\
                 [[plans]]\nname=\"b\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\nmetric=\"tokens\"\n",
                "plans[1].limits[0].metric",
            ),
            (
                "[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\n\
                 [[plans]]\nname=\"b\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\nscope=\"global\"\n",
                "plans[1].limits[0].scope",
            ),
            ("[[plans]]\nname=\"a\"\ndefault=true\n[[plans]]\nname=\"b\"\ndefault=true\n", "plans[1].default"),
            ("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nalgorithm=\"lifetime\"\nperiod=\"1d\"\n", "plans[0].limits[0].period"),
            ("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nalgorithm=\"sliding\"\nperiod=\"1mo\"\n", "plans[0].limits[0].period"),
            ("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\nscope=\"tenant\"\n", "plans[0].limits[0].scope"),
            ("[[limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\n[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\n", "plans[0].limits[0].name"),
        ];
        for (text, key) in cases {
            let e = compile(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        let e =
            compile("[[plans]]\nname=\"a\"\n[[plans.limits]]\nname=\"x\"\nmax=1\nperiod=\"1d\"\nalgorithm=\"leaky\"\n")
                .unwrap_err();
        assert!(e.message.contains("unknown variant `leaky`"), "{e}");
    }

    #[test]
    fn shared_names_and_defaults() {
        let p = compile(
            "[[plans]]\nname=\"free\"\ndefault=true\n[[plans.limits]]\nname=\"d\"\nmax=1\nperiod=\"1d\"\n\
             [[plans]]\nname=\"pro\"\n[[plans.limits]]\nname=\"d\"\nmax=10\nperiod=\"1d\"\n",
        )
        .unwrap();
        assert_eq!(p.plan_for(None).unwrap().name.as_ref(), "free");
        assert_eq!(p.plan_for(Some("pro")).unwrap().name.as_ref(), "pro");
        assert_eq!(p.plan_for(Some("gone")).unwrap().name.as_ref(), "free");
        assert!(p.metrics.contains("requests"));
    }
}
