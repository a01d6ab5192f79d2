//! Counter state of the four algorithms: how much room a counter has at a given
//! time, when it would have room again, and how a [`Slot`] charge changes it.
//! Everything is integer arithmetic so that replay reproduces state exactly.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::policy::Kind;
use super::types::Slot;
use crate::clock::Millis;
use crate::engine::policy::{MaxValue, MAX_SAFE_INTEGER};

/// State of one counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Counter {
    /// Usage in the window `[start_ms, end_ms)`.
    Fixed {
        /// Window start.
        start_ms: Millis,
        /// Window end.
        end_ms: Millis,
        /// Usage in the window.
        used: u64,
    },
    /// Usage per sub-window, oldest first, only non-zero ones.
    Sliding {
        /// Sub-window width.
        bucket_ms: u64,
        /// Window length.
        period_ms: u64,
        /// (sub-window index, usage), ascending by index.
        buckets: VecDeque<(u64, u64)>,
    },
    /// Token bucket, kept as the deficit below full in token-milliseconds:
    /// `used = deficit / period_ms`, and it shrinks by `refill` every millisecond.
    Bucket {
        /// Refill period.
        period_ms: u64,
        /// Refill per period when last charged (used for idle detection).
        refill: u64,
        /// Deficit at `at_ms`.
        deficit: u128,
        /// Time of the deficit.
        at_ms: Millis,
    },
    /// Never resets.
    Lifetime {
        /// Total usage.
        used: u64,
        /// Top-ups, added to the cap.
        credited: u64,
    },
    /// Usage per calendar period, newest last: an anomaly rule's memory of a
    /// subject's past (not a limit; never evaluated as one).
    Periods {
        /// Start of the first period this subject was seen in: how much history it has.
        first_ms: Millis,
        /// (period start, usage), ascending by start, at most `keep` of them.
        buckets: VecDeque<(Millis, u64)>,
        /// Nothing here matters after this time (garbage collection drops it).
        idle_after_ms: Millis,
    },
}

/// A counter's standing at some time, given the limit's current parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Usage counted now (rounded up for token buckets).
    pub used: u64,
    /// The cap in force, credits included.
    pub max: MaxValue,
    /// When usage returns to zero; `None` for lifetime limits.
    pub resets_at: Option<Millis>,
}

/// Whether an amount fits, and if not, when it would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The amount fits under the cap.
    pub fits: bool,
    /// It can never fit (amount above the cap of a resetting limit).
    pub exceeds_capacity: bool,
    /// Time until it would fit, when it can.
    pub retry_after_ms: Option<u64>,
}

/// The slot a charge at `now_ms` lands in.
pub fn slot_for(kind: &Kind, now_ms: Millis) -> Slot {
    match kind {
        Kind::Fixed { period, tz, last } => {
            let (start_ms, end_ms) = last.window(period, tz, now_ms);
            Slot::Fixed { start_ms, end_ms }
        }
        Kind::Sliding { period_ms, bucket_ms } => Slot::Sliding {
            bucket: now_ms / bucket_ms,
            bucket_ms: *bucket_ms,
            period_ms: *period_ms,
        },
        Kind::TokenBucket { period_ms, refill } => Slot::Bucket {
            period_ms: *period_ms,
            refill: *refill,
        },
        Kind::Lifetime => Slot::Lifetime,
    }
}

/// Whether sliding sub-window `idx` still counts at `now_ms`: its end is inside
/// `(now - period, now]`'s reach.
fn bucket_live(idx: u64, bucket_ms: u64, period_ms: u64, now_ms: Millis) -> bool {
    (idx + 1) * bucket_ms > now_ms.saturating_sub(period_ms)
}

fn decayed(deficit: u128, at_ms: Millis, refill: u64, now_ms: Millis) -> u128 {
    let elapsed = u128::from(now_ms.saturating_sub(at_ms));
    deficit.saturating_sub(elapsed * u128::from(refill))
}

fn div_ceil(a: u128, b: u128) -> u128 {
    a.div_ceil(b)
}

/// Room check shared by all algorithms: a positive amount must fit entirely; a zero
/// amount needs the counter not to be exhausted.
fn fits(used: u128, amount: u128, max: u128) -> bool {
    if amount == 0 {
        used < max
    } else {
        used + amount <= max
    }
}

/// How a counter stands at `now_ms` and whether `amount` fits under `max`.
pub fn evaluate(
    kind: &Kind,
    counter: Option<&Counter>,
    now_ms: Millis,
    amount: u64,
    max: MaxValue,
) -> (Usage, Verdict) {
    let ok = Verdict {
        fits: true,
        exceeds_capacity: false,
        retry_after_ms: None,
    };
    let never = Verdict {
        fits: false,
        exceeds_capacity: true,
        retry_after_ms: None,
    };
    let a = u128::from(amount);
    match (kind, slot_for(kind, now_ms)) {
        (Kind::Fixed { .. }, Slot::Fixed { start_ms, end_ms }) => {
            let used = match counter {
                Some(Counter::Fixed { start_ms: s, used, .. }) if *s == start_ms => *used,
                _ => 0,
            };
            let usage = Usage {
                used,
                max,
                resets_at: Some(end_ms),
            };
            let verdict = match max {
                MaxValue::Unlimited => ok,
                MaxValue::Finite(m) if fits(u128::from(used), a, u128::from(m)) => ok,
                MaxValue::Finite(m) if amount > m || m == 0 => never,
                MaxValue::Finite(_) => Verdict {
                    fits: false,
                    exceeds_capacity: false,
                    retry_after_ms: Some(end_ms - now_ms),
                },
            };
            (usage, verdict)
        }
        (Kind::Sliding { period_ms, bucket_ms }, _) => {
            let (p, w) = (*period_ms, *bucket_ms);
            let live: Vec<(u64, u64)> = match counter {
                Some(Counter::Sliding {
                    bucket_ms,
                    period_ms,
                    buckets,
                }) if *bucket_ms == w && *period_ms == p => buckets
                    .iter()
                    .copied()
                    .filter(|&(i, _)| bucket_live(i, w, p, now_ms))
                    .collect(),
                _ => Vec::new(),
            };
            let used: u64 = live.iter().fold(0u64, |s, &(_, c)| s.saturating_add(c));
            let resets_at = live.last().map_or(now_ms, |&(i, _)| (i + 1) * w + p);
            let usage = Usage {
                used,
                max,
                resets_at: Some(resets_at),
            };
            let verdict = match max {
                MaxValue::Unlimited => ok,
                MaxValue::Finite(m) if fits(u128::from(used), a, u128::from(m)) => ok,
                MaxValue::Finite(m) if amount > m || m == 0 => never,
                MaxValue::Finite(m) => {
                    // Units that must fall out of the window before the amount fits.
                    let need = if amount == 0 { used - m + 1 } else { used + amount - m };
                    let mut freed = 0u64;
                    let mut at = now_ms;
                    for &(i, c) in &live {
                        freed = freed.saturating_add(c);
                        if freed >= need {
                            at = (i + 1) * w + p;
                            break;
                        }
                    }
                    Verdict {
                        fits: false,
                        exceeds_capacity: false,
                        retry_after_ms: Some(at.saturating_sub(now_ms)),
                    }
                }
            };
            (usage, verdict)
        }
        (Kind::TokenBucket { period_ms, refill }, _) => {
            let p = u128::from(*period_ms);
            let deficit = match counter {
                Some(Counter::Bucket {
                    period_ms: cp,
                    deficit,
                    at_ms,
                    ..
                }) if *cp == *period_ms => decayed(*deficit, *at_ms, *refill, now_ms),
                _ => 0,
            };
            let used = u64::try_from(div_ceil(deficit, p)).unwrap_or(u64::MAX);
            let full_in = u64::try_from(div_ceil(deficit, u128::from(*refill))).unwrap_or(u64::MAX);
            let usage = Usage {
                used,
                max,
                resets_at: Some(now_ms.saturating_add(full_in)),
            };
            let verdict = match max {
                MaxValue::Unlimited => ok,
                MaxValue::Finite(m) if fits(deficit, a * p, u128::from(m) * p) => ok,
                MaxValue::Finite(m) if amount > m || m == 0 => never,
                MaxValue::Finite(m) => {
                    let cap = u128::from(m) * p;
                    let excess = if amount == 0 {
                        deficit - cap + 1
                    } else {
                        deficit + a * p - cap
                    };
                    let wait = div_ceil(excess, u128::from(*refill));
                    Verdict {
                        fits: false,
                        exceeds_capacity: false,
                        retry_after_ms: Some(u64::try_from(wait).unwrap_or(u64::MAX)),
                    }
                }
            };
            (usage, verdict)
        }
        (Kind::Lifetime, _) => {
            let (used, credited) = match counter {
                Some(Counter::Lifetime { used, credited }) => (*used, *credited),
                _ => (0, 0),
            };
            let max = match max {
                MaxValue::Finite(m) => MaxValue::Finite(m.saturating_add(credited)),
                MaxValue::Unlimited => MaxValue::Unlimited,
            };
            let usage = Usage {
                used,
                max,
                resets_at: None,
            };
            let verdict = match max {
                MaxValue::Unlimited => ok,
                MaxValue::Finite(m) if fits(u128::from(used), a, u128::from(m)) => ok,
                // Only a top-up can make room: no retry time.
                MaxValue::Finite(_) => Verdict {
                    fits: false,
                    exceeds_capacity: false,
                    retry_after_ms: None,
                },
            };
            (usage, verdict)
        }
        (Kind::Fixed { .. }, _) => unreachable!("slot_for gives fixed limits a fixed slot"),
    }
}

/// `v + delta`, held within `0..=2^53-1`. Counts saturate at the largest
/// value JSON clients read exactly instead of refusing the charge: a limit
/// that cannot deny (unlimited, monitor, degrade) must never make a later
/// call fail, and replay reproduces the clamp exactly.
/// Holds looked at when a denial asks when capacity returns: the soonest
/// expiring ones, enough for any realistic wait, bounded so a counter with
/// many holds cannot make a denial slow.
const HOLDS_SCANNED_MAX: usize = 64;

/// When `amount` would fit if the holds in `schedule` ((expiry, id) →
/// (slot, amount), soonest first) were given back as they expire and nothing
/// else changed: the sooner of that and `retry_ms` (the counter's own time,
/// from refill or a window's end). A hold already past its expiry is given
/// back by the next expiry sweep, at most [`super::EXPIRY_SWEEP_MS`] from now.
pub fn retry_with_holds(
    kind: &Kind,
    counter: Option<&Counter>,
    schedule: &super::state::HoldSchedule,
    now_ms: Millis,
    amount: u64,
    max: MaxValue,
    retry_ms: Option<u64>,
) -> Option<u64> {
    let mut c = counter.cloned();
    for ((expires_ms, _), (slot, held)) in schedule.iter().take(HOLDS_SCANNED_MAX) {
        let at = if *expires_ms > now_ms {
            *expires_ms
        } else {
            now_ms + super::EXPIRY_SWEEP_MS
        };
        if retry_ms.is_some_and(|r| at - now_ms >= r) {
            break; // the counter's own return comes first
        }
        apply_charge(&mut c, slot, -(i64::try_from(*held).unwrap_or(i64::MAX)), at);
        if evaluate(kind, c.as_ref(), at, amount, max).1.fits {
            return Some(at - now_ms);
        }
    }
    retry_ms
}

fn add_signed(v: u64, delta: i64) -> u64 {
    if delta >= 0 {
        v.saturating_add(delta as u64).min(MAX_SAFE_INTEGER)
    } else {
        v.saturating_sub(delta.unsigned_abs())
    }
}

/// Applies a charge (or refund, when `delta < 0`) to a counter slot. A counter of
/// another kind or an older window is replaced; a charge to a window that has
/// already been replaced by a newer one changes nothing.
pub fn apply_charge(counter: &mut Option<Counter>, slot: &Slot, delta: i64, at_ms: Millis) {
    match *slot {
        Slot::Fixed { start_ms, end_ms } => match counter {
            Some(Counter::Fixed { start_ms: s, used, .. }) if *s == start_ms => *used = add_signed(*used, delta),
            Some(Counter::Fixed { start_ms: s, .. }) if *s > start_ms => {}
            _ => {
                *counter = Some(Counter::Fixed {
                    start_ms,
                    end_ms,
                    used: add_signed(0, delta),
                })
            }
        },
        Slot::Sliding {
            bucket,
            bucket_ms,
            period_ms,
        } => {
            if !matches!(counter, Some(Counter::Sliding { bucket_ms: w, period_ms: p, .. }) if *w == bucket_ms && *p == period_ms)
            {
                *counter = Some(Counter::Sliding {
                    bucket_ms,
                    period_ms,
                    buckets: VecDeque::new(),
                });
            }
            let Some(Counter::Sliding { buckets, .. }) = counter else {
                unreachable!("set above")
            };
            while buckets
                .front()
                .is_some_and(|&(i, _)| !bucket_live(i, bucket_ms, period_ms, at_ms))
            {
                buckets.pop_front();
            }
            if !bucket_live(bucket, bucket_ms, period_ms, at_ms) {
                return;
            }
            // The live total saturates like any count (see `add_signed`).
            let delta = if delta > 0 {
                let total = buckets.iter().fold(0u64, |s, &(_, c)| s.saturating_add(c));
                delta.min(MAX_SAFE_INTEGER.saturating_sub(total) as i64)
            } else {
                delta
            };
            if delta == 0 {
                return;
            }
            match buckets.binary_search_by_key(&bucket, |&(i, _)| i) {
                Ok(pos) => {
                    let c = add_signed(buckets[pos].1, delta);
                    if c == 0 {
                        buckets.remove(pos);
                    } else {
                        buckets[pos].1 = c;
                    }
                }
                Err(pos) if delta > 0 => buckets.insert(pos, (bucket, delta as u64)),
                Err(_) => {}
            }
        }
        Slot::Bucket { period_ms, refill } => {
            let (mut deficit, mut at) = match counter {
                Some(Counter::Bucket {
                    period_ms: p,
                    deficit,
                    at_ms: a,
                    ..
                }) if *p == period_ms => (*deficit, *a),
                _ => (0, at_ms),
            };
            if at_ms > at {
                deficit = decayed(deficit, at, refill, at_ms);
                at = at_ms;
            }
            let units = u128::from(delta.unsigned_abs()) * u128::from(period_ms);
            deficit = if delta >= 0 {
                // At most 2^53-1 tokens below full (see `add_signed`).
                deficit
                    .saturating_add(units)
                    .min(u128::from(MAX_SAFE_INTEGER) * u128::from(period_ms))
            } else {
                deficit.saturating_sub(units)
            };
            *counter = Some(Counter::Bucket {
                period_ms,
                refill,
                deficit,
                at_ms: at,
            });
        }
        Slot::Lifetime => match counter {
            Some(Counter::Lifetime { used, .. }) => *used = add_signed(*used, delta),
            _ => {
                *counter = Some(Counter::Lifetime {
                    used: add_signed(0, delta),
                    credited: 0,
                })
            }
        },
        Slot::Periods { start_ms, end_ms, keep } => {
            let idle = end_ms.saturating_add((end_ms - start_ms).saturating_mul(u64::from(keep)));
            if !matches!(counter, Some(Counter::Periods { .. })) {
                *counter = Some(Counter::Periods {
                    first_ms: start_ms,
                    buckets: VecDeque::new(),
                    idle_after_ms: idle,
                });
            }
            let Some(Counter::Periods {
                buckets, idle_after_ms, ..
            }) = counter
            else {
                unreachable!("set above")
            };
            *idle_after_ms = (*idle_after_ms).max(idle);
            match buckets.binary_search_by_key(&start_ms, |&(s, _)| s) {
                Ok(pos) => buckets[pos].1 = add_signed(buckets[pos].1, delta),
                Err(pos) => buckets.insert(pos, (start_ms, add_signed(0, delta))),
            }
            while buckets.len() > keep as usize {
                buckets.pop_front();
            }
        }
    }
}

/// Gives back `amount`: windows lose that much usage (newest first for sliding),
/// token buckets refill by it, lifetime counters raise their cap by it.
pub fn apply_credit(counter: &mut Option<Counter>, slot: &Slot, amount: u64, at_ms: Millis) {
    match (counter.as_mut(), slot) {
        (Some(Counter::Lifetime { credited, .. }), _) => *credited = credited.saturating_add(amount),
        (None, Slot::Lifetime) => {
            *counter = Some(Counter::Lifetime {
                used: 0,
                credited: amount,
            })
        }
        (Some(Counter::Sliding { buckets, .. }), Slot::Sliding { .. }) => {
            let mut left = amount;
            while left > 0 {
                let Some(last) = buckets.back_mut() else {
                    break;
                };
                let take = left.min(last.1);
                last.1 -= take;
                left -= take;
                if last.1 == 0 {
                    buckets.pop_back();
                }
            }
        }
        (Some(_), Slot::Fixed { .. } | Slot::Bucket { .. }) => {
            apply_charge(counter, slot, -(amount.min(i64::MAX as u64) as i64), at_ms)
        }
        _ => {}
    }
}

impl Counter {
    /// Whether the counter holds nothing that matters any more at `now_ms`, so
    /// garbage collection may drop it.
    pub fn is_idle(&self, now_ms: Millis) -> bool {
        match self {
            Counter::Fixed { end_ms, used, .. } => *end_ms <= now_ms || *used == 0,
            Counter::Sliding {
                bucket_ms,
                period_ms,
                buckets,
            } => buckets
                .iter()
                .all(|&(i, _)| !bucket_live(i, *bucket_ms, *period_ms, now_ms)),
            Counter::Bucket {
                refill, deficit, at_ms, ..
            } => decayed(*deficit, *at_ms, *refill, now_ms) == 0,
            Counter::Lifetime { used, credited } => *used == 0 && *credited == 0,
            Counter::Periods { idle_after_ms, .. } => *idle_after_ms <= now_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::Period;
    use jiff::tz::TimeZone;

    const MIN: u64 = 60_000;

    fn charge(kind: &Kind, c: &mut Option<Counter>, now: Millis, amount: u64) {
        apply_charge(c, &slot_for(kind, now), amount as i64, now);
    }

    #[test]
    fn fixed_window_rolls_at_the_boundary() {
        let kind = Kind::Fixed {
            period: Period::parse("1m").unwrap(),
            tz: TimeZone::UTC,
            last: Default::default(),
        };
        let mut c = None;
        charge(&kind, &mut c, 10 * MIN + 5, 3);
        let (u, v) = evaluate(&kind, c.as_ref(), 11 * MIN - 1, 1, MaxValue::Finite(3));
        assert_eq!((u.used, v.fits, v.retry_after_ms), (3, false, Some(1)));
        let (u, v) = evaluate(&kind, c.as_ref(), 11 * MIN, 3, MaxValue::Finite(3));
        assert_eq!((u.used, v.fits), (0, true));
        let (_, v) = evaluate(&kind, c.as_ref(), 11 * MIN, 4, MaxValue::Finite(3));
        assert!(v.exceeds_capacity && v.retry_after_ms.is_none());
    }

    #[test]
    fn token_bucket_refills_continuously() {
        // 20 capacity, 10 per minute: one token every 6 s.
        let kind = Kind::TokenBucket {
            period_ms: MIN,
            refill: 10,
        };
        let mut c = None;
        charge(&kind, &mut c, 0, 20);
        let (u, v) = evaluate(&kind, c.as_ref(), 0, 1, MaxValue::Finite(20));
        assert_eq!((u.used, v.fits, v.retry_after_ms), (20, false, Some(6_000)));
        let (u, v) = evaluate(&kind, c.as_ref(), 6_000, 1, MaxValue::Finite(20));
        assert_eq!((u.used, v.fits), (19, true));
        let (u, _) = evaluate(&kind, c.as_ref(), 5_999, 1, MaxValue::Finite(20));
        assert_eq!(u.used, 20, "a partly refilled token still counts as used");
        let (u, _) = evaluate(&kind, c.as_ref(), 120_000, 1, MaxValue::Finite(20));
        assert_eq!((u.used, u.resets_at), (0, Some(120_000)));
        assert!(c.as_ref().unwrap().is_idle(120_000));
        let (_, v) = evaluate(&kind, None, 0, 21, MaxValue::Finite(20));
        assert!(v.exceeds_capacity);
    }

    #[test]
    fn sliding_window_counts_each_event_for_one_period_at_least() {
        let kind = Kind::Sliding {
            period_ms: 60 * 1000,
            bucket_ms: 1000,
        };
        let mut c = None;
        charge(&kind, &mut c, 500, 2); // bucket 0: [0, 1000)
        charge(&kind, &mut c, 30_000, 1); // bucket 30
        let max = MaxValue::Finite(3);
        let (u, v) = evaluate(&kind, c.as_ref(), 60_499, 1, max);
        assert_eq!((u.used, v.fits), (3, false));
        // Bucket 0 falls out once its end (1000) is a full period old: at 61_000.
        assert_eq!(v.retry_after_ms, Some(61_000 - 60_499));
        let (u, v) = evaluate(&kind, c.as_ref(), 61_000, 2, max);
        assert_eq!((u.used, v.fits), (1, true));
        // Refunds and charges to a bucket that already fell out change nothing.
        apply_charge(
            &mut c,
            &Slot::Sliding {
                bucket: 0,
                bucket_ms: 1000,
                period_ms: 60_000,
            },
            -1,
            61_000,
        );
        let (u, _) = evaluate(&kind, c.as_ref(), 61_000, 0, max);
        assert_eq!(u.used, 1);
    }

    #[test]
    fn lifetime_credit_raises_the_cap() {
        let kind = Kind::Lifetime;
        let mut c = None;
        charge(&kind, &mut c, 0, 5);
        let (_, v) = evaluate(&kind, c.as_ref(), 0, 1, MaxValue::Finite(5));
        assert!(!v.fits && !v.exceeds_capacity && v.retry_after_ms.is_none());
        apply_credit(&mut c, &Slot::Lifetime, 10, 0);
        let (u, v) = evaluate(&kind, c.as_ref(), 0, 10, MaxValue::Finite(5));
        assert_eq!((u.used, u.max, v.fits), (5, MaxValue::Finite(15), true));
    }

    #[test]
    fn zero_amounts_need_room_left() {
        let kind = Kind::Lifetime;
        let mut c = None;
        let (_, v) = evaluate(&kind, c.as_ref(), 0, 0, MaxValue::Finite(1));
        assert!(v.fits);
        charge(&kind, &mut c, 0, 1);
        let (_, v) = evaluate(&kind, c.as_ref(), 0, 0, MaxValue::Finite(1));
        assert!(!v.fits);
    }
}
