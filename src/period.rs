//! Periods ("15m", "1d", "1mo") and the calendar-aligned windows of fixed limits.
//!
//! Alignment rules (documented in README):
//! - periods in seconds, minutes and hours are aligned to whole multiples of the
//!   period since the Unix epoch (UTC);
//! - days start at local midnight in the limit's time zone; an `N`-day window
//!   starts on a day whose index since 1970-01-01 is a multiple of `N`;
//! - weeks start on Monday at local midnight, `N`-week windows aligned like days;
//! - months start on the 1st at local midnight; `3mo` windows are calendar
//!   quarters and `12mo` calendar years.
//!
//! Daylight-saving days are as long as the calendar says (23 or 25 hours).

use std::fmt;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use crate::clock::Millis;

/// A calendar unit of a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Milliseconds (only for durations such as TTLs, never for limits).
    Millisecond,
    /// Seconds.
    Second,
    /// Minutes.
    Minute,
    /// Hours.
    Hour,
    /// Calendar days (local midnight to midnight).
    Day,
    /// Calendar weeks, Monday to Monday.
    Week,
    /// Calendar months, the 1st to the 1st.
    Month,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Millisecond => "ms",
            Unit::Second => "s",
            Unit::Minute => "m",
            Unit::Hour => "h",
            Unit::Day => "d",
            Unit::Week => "w",
            Unit::Month => "mo",
        }
    }

    /// Length in milliseconds where it is fixed (a day is taken as 24 h).
    fn nominal_ms(self) -> Option<u64> {
        match self {
            Unit::Millisecond => Some(1),
            Unit::Second => Some(1_000),
            Unit::Minute => Some(60_000),
            Unit::Hour => Some(3_600_000),
            Unit::Day => Some(86_400_000),
            Unit::Week => Some(7 * 86_400_000),
            Unit::Month => None,
        }
    }
}

/// A count of a unit: "15m" is `Period { count: 15, unit: Minute }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    /// How many units; at least 1.
    pub count: u32,
    /// The unit.
    pub unit: Unit,
}

/// Why a period string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid period {input:?}: {reason} (expected a count and a unit: s, m, h, d, w or mo, as in \"15m\", \"1d\", \"1mo\")")]
pub struct PeriodError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Longest period accepted: 100 years keeps every computation far from overflow.
const MAX_PERIOD_MS: u64 = 100 * 366 * 86_400_000;

impl Period {
    /// Parses a limit period: `s`, `m`, `h`, `d`, `w`, `mo` with a count.
    pub fn parse(input: &str) -> Result<Period, PeriodError> {
        Self::parse_inner(input, false)
    }

    /// Parses a duration setting, which also accepts `ms`.
    pub fn parse_duration(input: &str) -> Result<Period, PeriodError> {
        Self::parse_inner(input, true)
    }

    fn parse_inner(input: &str, allow_ms: bool) -> Result<Period, PeriodError> {
        let err = |reason| PeriodError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("it does not start with a count"));
        }
        let count: u32 = s[..digits].parse().map_err(|_| err("the count is too large"))?;
        if count == 0 {
            return Err(err("the count must be at least 1"));
        }
        let unit = match &s[digits..] {
            "ms" if allow_ms => Unit::Millisecond,
            "s" => Unit::Second,
            "m" => Unit::Minute,
            "h" => Unit::Hour,
            "d" => Unit::Day,
            "w" => Unit::Week,
            "mo" => Unit::Month,
            "" => return Err(err("the unit is missing")),
            _ => return Err(err("unknown unit")),
        };
        let p = Period { count, unit };
        let too_long = match unit.nominal_ms() {
            Some(ms) => u64::from(count) * ms > MAX_PERIOD_MS,
            None => u64::from(count) > 1200,
        };
        if too_long {
            return Err(err("longer than 100 years"));
        }
        Ok(p)
    }

    /// Fixed length in milliseconds, or `None` for months (their length varies).
    pub fn fixed_ms(&self) -> Option<u64> {
        self.unit.nominal_ms().map(|ms| ms * u64::from(self.count))
    }

    /// Whether windows of this period follow the local calendar (days and longer).
    pub fn is_calendar(&self) -> bool {
        matches!(self.unit, Unit::Day | Unit::Week | Unit::Month)
    }

    /// The window `[start, end)` of a fixed limit that contains `now_ms`.
    pub fn window(&self, tz: &TimeZone, now_ms: Millis) -> (Millis, Millis) {
        let count = i64::from(self.count);
        match self.unit {
            Unit::Millisecond | Unit::Second | Unit::Minute | Unit::Hour => {
                let len = self.fixed_ms().expect("sub-day units have a fixed length");
                let start = now_ms - now_ms % len;
                (start, start + len)
            }
            Unit::Day | Unit::Week => {
                let unit_days = if self.unit == Unit::Day { 1 } else { 7 };
                let today = local_date(tz, now_ms);
                // 1970-01-01 was a Thursday; weeks count from Monday 1970-01-05.
                let origin = if self.unit == Unit::Day {
                    date(1970, 1, 1)
                } else {
                    date(1970, 1, 5)
                };
                let days = days_between(origin, today);
                let span = count * unit_days;
                let start_days = days - days.rem_euclid(span);
                let start = add_days(origin, start_days);
                let end = add_days(origin, start_days + span);
                (local_midnight(tz, start), local_midnight(tz, end))
            }
            Unit::Month => {
                let today = local_date(tz, now_ms);
                let months = (i64::from(today.year()) - 1970) * 12 + i64::from(today.month()) - 1;
                let start_months = months - months.rem_euclid(count);
                let month_date = |m: i64| date((1970 + m.div_euclid(12)) as i16, (m.rem_euclid(12) + 1) as i8, 1);
                (
                    local_midnight(tz, month_date(start_months)),
                    local_midnight(tz, month_date(start_months + count)),
                )
            }
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.count, self.unit.suffix())
    }
}

fn date(year: i16, month: i8, day: i8) -> Date {
    Date::new(year, month, day).expect("constructed dates are valid")
}

fn days_between(a: Date, b: Date) -> i64 {
    let span = a.until(b).expect("dates within jiff's range");
    // `until` between dates yields days only by default.
    i64::from(span.get_days())
}

fn add_days(d: Date, days: i64) -> Date {
    d.checked_add(days.days()).expect("window dates within jiff's range")
}

fn local_date(tz: &TimeZone, now_ms: Millis) -> Date {
    let ts = Timestamp::from_millisecond(now_ms as i64).expect("time within jiff's range");
    ts.to_zoned(tz.clone()).date()
}

/// The first instant of `d` in `tz` (after a DST gap if midnight does not exist).
fn local_midnight(tz: &TimeZone, d: Date) -> Millis {
    let z = d.to_zoned(tz.clone()).expect("midnight resolvable in jiff's range");
    let start = z.start_of_day().expect("start of day resolvable");
    start.timestamp().as_millisecond().max(0) as Millis
}

/// Formats milliseconds since the epoch as RFC 3339 in UTC, e.g. "2026-11-22T00:00:00Z".
pub fn rfc3339(ms: Millis) -> String {
    match Timestamp::from_millisecond(ms as i64) {
        Ok(ts) => ts.to_string(),
        Err(_) => "9999-12-31T23:59:59Z".to_string(),
    }
}

/// "YYYY-MM-DDTHH:MM:SS": a whole second's text without its "Z".
const SECOND_PREFIX: usize = 19;
/// Instants from here on are formatted whole: jiff refuses every
/// millisecond after 9999-12-30T22:00:00Z, its last second (the tests hold
/// this equal to jiff's).
const COMPOSED_BELOW: Millis = 253_402_207_200_000;

/// Calls `f` with [`rfc3339`]`(ms)`, formatted once per thread for the last
/// few instants asked: every answer names its windows' resets, and most of
/// them are the same few instants (the end of today, of this month), so the
/// calendar arithmetic and the string would otherwise be redone per counter.
///
/// The resets of sliding windows and token buckets move with every call, a
/// millisecond at a time: those are written from the text of their whole
/// second, kept apart, so that they neither miss each time nor push the
/// calendar instants out.
pub fn with_rfc3339<R>(ms: Millis, f: impl FnOnce(&str) -> R) -> R {
    /// Instants' texts, and whole seconds' texts without their "Z".
    type Recent = (Ring<Box<str>, 8>, Ring<[u8; SECOND_PREFIX], 4>);
    thread_local! {
        static RECENT: std::cell::RefCell<Recent> = std::cell::RefCell::new((Ring::new(), Ring::new()));
    }
    let mut f = Some(f);
    let mut call = |text: &str| f.take().expect("called once")(text);
    // Without the cache while the thread's locals are being destroyed, or
    // if `f` asks for a time itself.
    let cached = RECENT.try_with(|cell| {
        let mut r = cell.try_borrow_mut().ok()?;
        let (instants, seconds) = &mut *r;
        if let Some(text) = instants.get(ms) {
            return Some(call(text));
        }
        let fraction = ms % 1000;
        if fraction != 0 && ms < COMPOSED_BELOW {
            let second = ms - fraction;
            let prefix = match seconds.get(second) {
                Some(p) => *p,
                None => {
                    let whole = rfc3339(second);
                    if whole.len() != SECOND_PREFIX + 1 {
                        return None;
                    }
                    let p = whole.as_bytes()[..SECOND_PREFIX].try_into().expect("length checked");
                    *seconds.put(second, p)
                }
            };
            let (buf, len) = with_fraction(&prefix, fraction);
            return Some(call(
                std::str::from_utf8(&buf[..len]).expect("a second's text and digits are ASCII"),
            ));
        }
        Some(call(instants.put(ms, rfc3339(ms).into())))
    });
    match cached {
        Ok(Some(v)) => v,
        _ => call(&rfc3339(ms)),
    }
}

/// The last N (instant, value) pairs put, the oldest replaced first.
struct Ring<V, const N: usize> {
    next: usize,
    slots: [Option<(Millis, V)>; N],
}

impl<V, const N: usize> Ring<V, N> {
    fn new() -> Self {
        Ring {
            next: 0,
            slots: std::array::from_fn(|_| None),
        }
    }

    fn get(&self, at: Millis) -> Option<&V> {
        self.slots.iter().flatten().find(|(k, _)| *k == at).map(|(_, v)| v)
    }

    fn put(&mut self, at: Millis, v: V) -> &V {
        let i = self.next;
        self.next = (i + 1) % N;
        &self.slots[i].insert((at, v)).1
    }
}

/// A whole second's text with `fraction` (1..=999) milliseconds, written as
/// jiff writes them: no trailing zeros (".5Z", ".25Z", ".125Z"). Returns the
/// bytes and how many of them are the text.
fn with_fraction(prefix: &[u8; SECOND_PREFIX], fraction: Millis) -> ([u8; SECOND_PREFIX + 5], usize) {
    let digits = [
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    let kept = match fraction {
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    let mut buf = [0u8; SECOND_PREFIX + 5];
    buf[..SECOND_PREFIX].copy_from_slice(prefix);
    buf[SECOND_PREFIX] = b'.';
    buf[SECOND_PREFIX + 1..][..kept].copy_from_slice(&digits[..kept]);
    buf[SECOND_PREFIX + 1 + kept] = b'Z';
    (buf, SECOND_PREFIX + 2 + kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_rfc3339_text_is_the_formatted_text() {
        // More instants than the cache holds, asked over and over, and the edges.
        let instants: Vec<Millis> = (0..20u64)
            .map(|i| 1_796_601_600_000 + i * 86_400_000 + i % 3)
            .chain([0, 1, 999, u64::MAX, i64::MAX as u64, 253_402_300_799_999])
            .collect();
        for round in 0..3 {
            for (i, &ms) in instants.iter().enumerate() {
                let ms = if round == 1 {
                    instants[instants.len() - 1 - i]
                } else {
                    ms
                };
                assert_eq!(&*with_rfc3339(ms, str::to_string), rfc3339(ms), "{ms}");
            }
        }
    }

    #[test]
    fn moving_instants_are_written_as_jiff_writes_them() {
        // Every millisecond of a few seconds, the calendar instants asked in
        // between (as an answer asks them), and the edge of jiff's range.
        let max = Timestamp::MAX.as_millisecond() as Millis;
        let last = max - max % 1000;
        assert_eq!(COMPOSED_BELOW, Timestamp::MAX.as_second() as Millis * 1000);
        let seconds = [
            0,
            1_796_601_600_000,
            1_796_601_601_000,
            1_796_688_000_000,
            last - 1000,
            last,
        ];
        let calendar = [1_796_688_000_000, 1_798_761_600_000, 1_796_601_600_000];
        for second in seconds {
            for f in 0..1000 {
                for ms in [second + f, calendar[(f % 3) as usize]] {
                    assert_eq!(&*with_rfc3339(ms, str::to_string), rfc3339(ms), "{ms}");
                }
            }
        }
        for ms in [max, max + 1, max + 999, u64::MAX] {
            assert_eq!(&*with_rfc3339(ms, str::to_string), rfc3339(ms), "{ms}");
        }
    }

    fn ms(s: &str) -> Millis {
        s.parse::<Timestamp>().unwrap().as_millisecond() as Millis
    }

    fn win(p: &str, tz: &str, at: &str) -> (String, String) {
        let tz = TimeZone::get(tz).unwrap();
        let (a, b) = Period::parse(p).unwrap().window(&tz, ms(at));
        (rfc3339(a), rfc3339(b))
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            Period::parse("15m").unwrap(),
            Period {
                count: 15,
                unit: Unit::Minute
            }
        );
        assert_eq!(Period::parse("1mo").unwrap().to_string(), "1mo");
        for bad in [
            "",
            "1x",
            "m",
            "0d",
            "1",
            "99999999999h",
            "-1d",
            "1.5h",
            "200000d",
            "1ms",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(Period::parse_duration("250ms").unwrap().fixed_ms(), Some(250));
    }

    #[test]
    fn sub_day_windows_align_to_epoch() {
        assert_eq!(
            win("15m", "UTC", "2026-11-21T10:44:59.999Z"),
            ("2026-11-21T10:30:00Z".into(), "2026-11-21T10:45:00Z".into())
        );
        assert_eq!(
            win("15m", "UTC", "2026-11-21T10:45:00Z"),
            ("2026-11-21T10:45:00Z".into(), "2026-11-21T11:00:00Z".into())
        );
    }

    #[test]
    fn days_follow_local_midnight_and_dst() {
        // 2026-03-08 is the US spring-forward day: 23 hours long.
        let (a, b) = win("1d", "America/New_York", "2026-03-08T12:00:00Z");
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z")
        );
        // 2026-11-01 is fall-back: 25 hours long.
        let (a, b) = win("1d", "America/New_York", "2026-11-01T12:00:00Z");
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z")
        );
    }

    #[test]
    fn months_weeks_and_leap_years() {
        assert_eq!(
            win("1mo", "UTC", "2028-02-29T23:59:59Z"),
            ("2028-02-01T00:00:00Z".into(), "2028-03-01T00:00:00Z".into())
        );
        assert_eq!(
            win("1mo", "UTC", "2026-12-31T23:59:59Z"),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        assert_eq!(
            win("3mo", "UTC", "2026-11-21T00:00:00Z"),
            ("2026-10-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
        // 2026-11-21 is a Saturday; its week started Monday 2026-11-16.
        assert_eq!(
            win("1w", "UTC", "2026-11-21T12:00:00Z"),
            ("2026-11-16T00:00:00Z".into(), "2026-11-23T00:00:00Z".into())
        );
        assert_eq!(
            win("1d", "Asia/Tokyo", "2026-11-21T16:00:00Z"),
            ("2026-11-21T15:00:00Z".into(), "2026-11-22T15:00:00Z".into())
        );
    }
}
