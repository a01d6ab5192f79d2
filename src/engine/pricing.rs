//! The price table: turns a call's metered amounts into a cost in micro-units
//! of the currency, exactly. A price like `"2.50/1M"` is kept as a fraction
//! (micro-units per unit); the cost of a call is the sum over the metrics a
//! price names of amount × fraction, added up over one common denominator and
//! rounded up once per call. No floating point anywhere, so replay, reserve
//! and commit all agree to the micro-unit.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::policy::{compile_matcher, valid_name, Matcher};
use super::types::EngineError;
use crate::config::ConfigError;
use crate::engine::policy::{PricingConfig, Unpriced, MAX_SAFE_INTEGER};

/// Largest numerator or denominator a price may reduce to. Amounts are at
/// most 2^53, so a sum of 32 products stays below 2^123: no overflow in u128.
const PART_MAX: u128 = 1 << 64;
/// Digits allowed on either side of the decimal point of a price.
const DIGITS_MAX: usize = 12;

/// The rates of one price over a common denominator: what a reservation keeps
/// so that its commit is priced as it was when the hold was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceRates {
    /// The price's name, shown as `cost.price`.
    pub name: Arc<str>,
    /// The cost metric the result is counted in.
    pub metric: Arc<str>,
    /// Currency code shown with the cost.
    pub currency: Arc<str>,
    /// (metric, micro-units per unit × `den`), in the order written.
    pub rates: Vec<(Arc<str>, u128)>,
    /// Common denominator of every rate.
    pub den: u128,
}

impl PriceRates {
    /// Σ amount × rate, rounded up to a whole micro-unit. Fails only when the
    /// result is above 2^53−1, which no counter could hold exactly.
    pub fn cost(&self, amount_of: impl Fn(&str) -> u64) -> Result<u64, EngineError> {
        let mut sum: u128 = 0;
        for (metric, rate) in &self.rates {
            // Bounded by PART_MAX and the 2^53 amount cap: cannot overflow.
            sum += u128::from(amount_of(metric)) * rate;
        }
        let micros = sum.div_ceil(self.den);
        u64::try_from(micros)
            .ok()
            .filter(|&c| c <= MAX_SAFE_INTEGER)
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "amounts: the cost of this call under price {:?} is above {MAX_SAFE_INTEGER} {} (2^53-1), \
                     more than any counter holds exactly",
                    self.name, self.metric
                ))
            })
    }
}

/// One compiled `[[pricing.prices]]` entry.
#[derive(Debug, Clone)]
pub struct Price {
    /// Which calls it prices.
    pub matcher: Matcher,
    /// Its rates.
    pub rates: Arc<PriceRates>,
}

/// The compiled `[pricing]` section.
#[derive(Debug, Clone)]
pub struct Pricing {
    /// The derived metric.
    pub metric: Arc<str>,
    /// Currency code.
    pub currency: Arc<str>,
    /// What unmatched calls get.
    pub unpriced: Unpriced,
    /// In file order: the first match wins.
    pub prices: Vec<Price>,
    /// Every metric some price names: an unmatched call carrying one of these
    /// is `unpriced`.
    pub priced_metrics: Vec<Arc<str>>,
}

/// What pricing made of one call.
#[derive(Debug, Clone)]
pub struct PricedCall {
    /// The cost, in the cost metric.
    pub cost: u64,
    /// The price used; `None` when the app sent the cost or nothing matched.
    pub price: Option<Arc<PriceRates>>,
    /// The app sent the cost itself.
    pub explicit: bool,
}

/// Parses a price: a decimal amount of the currency, optionally per a count of
/// units (`"0.05"`, `"2.50/1M"`, `"0.4/1K"`, `"3/1000"`), into micro-units per
/// unit as a reduced fraction (numerator, denominator).
pub fn parse_price(text: &str) -> Result<(u128, u128), String> {
    let bad = |why: &str| {
        format!(
            "{text:?} is not a price: {why}; write a decimal amount of the currency, optionally per a count, \
             as in \"0.05\", \"2.50/1M\" or \"0.40/1K\""
        )
    };
    let (amount, per) = match text.split_once('/') {
        Some((a, p)) => (a.trim(), Some(p.trim())),
        None => (text.trim(), None),
    };
    let (int_part, frac_part) = amount.split_once('.').unwrap_or((amount, ""));
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the amount must start with a digit"));
    }
    if !frac_part.bytes().all(|b| b.is_ascii_digit()) || (amount.contains('.') && frac_part.is_empty()) {
        return Err(bad("the amount must be digits with at most one decimal point"));
    }
    if int_part.len() > DIGITS_MAX || frac_part.len() > DIGITS_MAX {
        return Err(bad(&format!("at most {DIGITS_MAX} digits on each side of the point")));
    }
    let digits: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| bad("too many digits"))?;
    let per: u128 = match per {
        None => 1,
        Some(p) => {
            let (count, unit) = match p.char_indices().last() {
                Some((i, 'K' | 'k')) => (&p[..i], 1_000),
                Some((i, 'M')) => (&p[..i], 1_000_000),
                _ => (p, 1),
            };
            let count: u128 = count
                .parse()
                .ok()
                .filter(|&c: &u128| c > 0 && count.bytes().all(|b| b.is_ascii_digit()) && c <= 1_000_000_000_000)
                .ok_or_else(|| {
                    bad("the count after '/' must be a whole number from 1 to 10^12, optionally with K or M")
                })?;
            count * unit
        }
    };
    // amount = digits / 10^frac currency units = digits × 10^6 / 10^frac micro-units.
    let scale = 10u128.pow(frac_part.len() as u32);
    let (num, den) = reduce(digits * 1_000_000, scale * per);
    if num > PART_MAX || den > PART_MAX {
        return Err(bad("it needs more precision than quotad counts exactly"));
    }
    Ok((num, den))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn reduce(num: u128, den: u128) -> (u128, u128) {
    let g = gcd(num, den).max(1);
    (num / g, den / g)
}

impl Pricing {
    /// Compiles `[pricing]`. `known_metrics` are the metrics limits count or
    /// `metrics = [...]` declares: a price must name one of them, so that a
    /// typo in the price table is caught at start, not by an unpriced call.
    pub fn compile(
        c: &PricingConfig,
        known_metrics: &std::collections::HashSet<String>,
    ) -> Result<Pricing, ConfigError> {
        if c.currency.len() != 3 || !c.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::new(
                "pricing.currency",
                format!(
                    "{:?} is not an ISO 4217 code: use three capital letters, as in \"USD\"",
                    c.currency
                ),
            ));
        }
        if !valid_name(&c.metric, 64) || c.metric == "requests" {
            return Err(ConfigError::new(
                "pricing.metric",
                "must be a metric name of 1-64 characters without spaces, other than \"requests\"",
            ));
        }
        if c.prices.is_empty() {
            return Err(ConfigError::new(
                "pricing.prices",
                "is empty: add at least one [[pricing.prices]] entry, or remove [pricing]",
            ));
        }
        let metric: Arc<str> = c.metric.as_str().into();
        let currency: Arc<str> = c.currency.as_str().into();
        let mut prices: Vec<Price> = Vec::with_capacity(c.prices.len());
        let mut priced_metrics: Vec<Arc<str>> = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (i, p) in c.prices.iter().enumerate() {
            let key = format!("pricing.prices[{i}]");
            if !valid_name(&p.name, 128) {
                return Err(ConfigError::new(
                    format!("{key}.name"),
                    "must be 1-128 characters without spaces or control characters",
                ));
            }
            if let Some(j) = c.prices[..i].iter().position(|q| q.name == p.name) {
                return Err(ConfigError::new(
                    format!("{key}.name"),
                    format!("{:?} is already the name of pricing.prices[{j}]", p.name),
                ));
            }
            if let Some(j) = catch_all {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "can never be used: pricing.prices[{j}] has no match, so it prices every call first \
                         (the first matching price wins; put the catch-all last)"
                    ),
                ));
            }
            let matcher = match &p.match_ {
                None => {
                    catch_all = Some(i);
                    Matcher::default()
                }
                Some(m) if m.event.is_none() && m.attributes.is_empty() => {
                    return Err(ConfigError::new(
                        format!("{key}.match"),
                        "is empty; name an event and/or attributes, or leave match out to price every call",
                    ))
                }
                Some(m) => compile_matcher(&key, m)?,
            };
            if p.rates.is_empty() {
                return Err(ConfigError::new(
                    key,
                    "names no metric to price; add one, as in input_tokens = \"2.50/1M\" (keys other than \
                     name and match are metrics)",
                ));
            }
            let mut parsed: Vec<(Arc<str>, u128, u128)> = Vec::with_capacity(p.rates.len());
            for (m, v) in &p.rates {
                let rkey = format!("{key}.{m}");
                if *m == c.metric {
                    return Err(ConfigError::new(
                        rkey,
                        format!("{m:?} is the cost metric prices produce (pricing.metric); it cannot have a price"),
                    ));
                }
                if !known_metrics.contains(m) {
                    return Err(ConfigError::new(
                        rkey,
                        format!(
                            "metric {m:?} is not counted by any limit nor declared in metrics = [...]; \
                             a typo here would leave calls unpriced"
                        ),
                    ));
                }
                let text =
                    match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(n) if *n >= 0 => n.to_string(),
                        toml::Value::Float(_) => return Err(ConfigError::new(
                            rkey,
                            "write the price as a string (\"0.05\", \"2.50/1M\"): a bare decimal number is not exact",
                        )),
                        other => {
                            return Err(ConfigError::new(
                                rkey,
                                format!("expected a price such as \"2.50/1M\", found {}", other.type_str()),
                            ))
                        }
                    };
                let (num, den) = parse_price(&text).map_err(|e| ConfigError::new(rkey, e))?;
                parsed.push((m.as_str().into(), num, den));
            }
            let mut den: u128 = 1;
            for (_, _, d) in &parsed {
                den = den / gcd(den, *d) * d;
                if den > PART_MAX {
                    return Err(ConfigError::new(
                        key,
                        "its prices have no common denominator small enough to count exactly; round them",
                    ));
                }
            }
            let mut rates = Vec::with_capacity(parsed.len());
            for (m, num, d) in parsed {
                let scaled = num * (den / d);
                if scaled > PART_MAX {
                    return Err(ConfigError::new(
                        format!("{key}.{m}"),
                        "is too large to count exactly together with the other prices of this entry",
                    ));
                }
                if !priced_metrics.contains(&m) {
                    priced_metrics.push(m.clone());
                }
                rates.push((m, scaled));
            }
            prices.push(Price {
                matcher,
                rates: Arc::new(PriceRates {
                    name: p.name.as_str().into(),
                    metric: metric.clone(),
                    currency: currency.clone(),
                    rates,
                    den,
                }),
            });
        }
        Ok(Pricing {
            metric,
            currency,
            unpriced: c.unpriced,
            prices,
            priced_metrics,
        })
    }

    /// Prices one call. `amount_of` reads the request's amounts (with
    /// `requests` defaulting to 1).
    pub fn price_call(
        &self,
        event: Option<&str>,
        attributes: &BTreeMap<String, String>,
        amounts: &BTreeMap<String, u64>,
        amount_of: impl Fn(&str) -> u64,
    ) -> Result<PricedCall, EngineError> {
        if let Some(&cost) = amounts.get(&*self.metric) {
            return Ok(PricedCall {
                cost,
                price: None,
                explicit: true,
            });
        }
        if let Some(p) = self.prices.iter().find(|p| p.matcher.matches(event, attributes)) {
            return Ok(PricedCall {
                cost: p.rates.cost(&amount_of)?,
                price: Some(p.rates.clone()),
                explicit: false,
            });
        }
        let carries_priced = self.priced_metrics.iter().any(|m| amount_of(m) > 0);
        if carries_priced && self.unpriced == Unpriced::Reject {
            return Err(EngineError::Unpriced(format!(
                "no price matches event {} with attributes {}; add a [[pricing.prices]] entry for it, send \
                 amounts.{} with the call, or set pricing.unpriced = \"zero\"",
                event.map_or_else(|| "(none)".to_string(), |e| format!("{e:?}")),
                serde_json::to_string(attributes).expect("strings serialize"),
                self.metric
            )));
        }
        Ok(PricedCall {
            cost: 0,
            price: None,
            explicit: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_to_exact_fractions() {
        // micro-units per unit
        assert_eq!(parse_price("0.05"), Ok((50_000, 1)));
        assert_eq!(parse_price("2.50/1M"), Ok((5, 2)));
        assert_eq!(parse_price("10.00/1M"), Ok((10, 1)));
        assert_eq!(parse_price("0.15/1M"), Ok((3, 20)));
        assert_eq!(parse_price("0.40/1K"), Ok((400, 1)));
        assert_eq!(parse_price("3/1000"), Ok((3_000, 1)));
        assert_eq!(parse_price("1/3"), Ok((1_000_000, 3)));
        assert_eq!(parse_price("0"), Ok((0, 1)));
        assert_eq!(parse_price("0.000000000001"), Ok((1, 1_000_000)));
        for bad in [
            "",
            "abc",
            "-1",
            "1.",
            ".5",
            "1.2.3",
            "1/0",
            "1/x",
            "1/1G",
            "1e3",
            "1/-5",
            "1234567890123",
        ] {
            assert!(parse_price(bad).is_err(), "{bad:?} parsed");
        }
        let e = parse_price("1/0").unwrap_err();
        assert!(e.contains("\"1/0\" is not a price"), "{e}");
    }

    fn rates(list: &[(&str, &str)]) -> PriceRates {
        let mut den = 1u128;
        let parsed: Vec<_> = list.iter().map(|(m, t)| (*m, parse_price(t).unwrap())).collect();
        for (_, (_, d)) in &parsed {
            den = den / gcd(den, *d) * d;
        }
        PriceRates {
            name: "p".into(),
            metric: "cost_micros".into(),
            currency: "USD".into(),
            rates: parsed.iter().map(|(m, (n, d))| ((*m).into(), n * (den / d))).collect(),
            den,
        }
    }

    #[test]
    fn cost_is_summed_exactly_and_rounded_up_once() {
        let gpt4o = rates(&[("input_tokens", "2.50/1M"), ("output_tokens", "10.00/1M")]);
        let amounts = |i: u64, o: u64| move |m: &str| if m == "input_tokens" { i } else { o };
        // 1000 in × 2.5 µ$ = 2500, 500 out × 10 µ$ = 5000.
        assert_eq!(gpt4o.cost(amounts(1000, 500)), Ok(7_500));
        // 1 input token is 2.5 µ$: rounds up to 3.
        assert_eq!(gpt4o.cost(amounts(1, 0)), Ok(3));
        // 1 + 1: 12.5 → 13, not 3 + 10.
        assert_eq!(gpt4o.cost(amounts(1, 1)), Ok(13));
        assert_eq!(gpt4o.cost(amounts(0, 0)), Ok(0));
        let mini = rates(&[("input_tokens", "0.15/1M"), ("output_tokens", "0.60/1M")]);
        // 7 × 0.15 + 3 × 0.6 = 1.05 + 1.8 = 2.85 → 3.
        assert_eq!(mini.cost(amounts(7, 3)), Ok(3));
        let third = rates(&[("requests", "1/3")]);
        assert_eq!(third.cost(|_| 3), Ok(1_000_000));
        assert_eq!(third.cost(|_| 1), Ok(333_334));
        let huge = rates(&[("tokens", "999999999999")]);
        assert!(huge.cost(|_| MAX_SAFE_INTEGER).is_err());
    }
}
