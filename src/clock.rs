//! Time source. This is the only module that reads the system clock; the engine
//! and storage take `now_ms` as an argument so tests can inject time.
//!
//! The time model: engine time is wall-clock time as read once at start, but
//! never earlier than the latest time the snapshot and the WAL recorded
//! ([`Clock::resume_from`]); from then on it advances with the monotonic
//! clock ([`SteadyClock`]). A step of the wall clock while running (NTP,
//! an operator, a VM restore) therefore changes nothing: backwards, token
//! buckets keep refilling and holds keep expiring; forwards, idempotency keys
//! are not dropped early. The next restart picks up the wall clock again,
//! unless it is behind what the log recorded. The engine itself never lets
//! time go backwards whatever a clock says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Where the daemon gets "now" from.
pub trait Clock: Send + Sync + 'static {
    /// Current time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;

    /// Recovery found state recorded up to `floor_ms`: time goes on from
    /// there if the clock is behind it. Clocks that are told the time (tests)
    /// ignore it; the engine keeps its own floor anyway.
    fn resume_from(&self, _floor_ms: Millis) {}
}

/// The two readings a [`SteadyClock`] is built from.
pub trait TimeSource: Send + Sync + 'static {
    /// Wall-clock time, ms since the Unix epoch.
    fn wall_ms(&self) -> Millis;
    /// A monotonic reading in ms: only differences mean anything.
    fn mono_ms(&self) -> Millis;
}

/// The operating system's clocks: `SystemTime` and `Instant`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsTime;

impl TimeSource for OsTime {
    fn wall_ms(&self) -> Millis {
        SystemClock.now_ms()
    }
    fn mono_ms(&self) -> Millis {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as Millis
    }
}

/// The daemon's clock: the wall clock read once, advanced by the monotonic
/// clock. See the module documentation.
#[derive(Debug)]
pub struct SteadyClock<S: TimeSource = OsTime> {
    source: S,
    /// Engine time at `base_mono`.
    base_ms: AtomicU64,
    /// The monotonic reading `base_ms` belongs to.
    base_mono: Millis,
}

impl<S: TimeSource> SteadyClock<S> {
    /// Starts at the source's wall time.
    pub fn new(source: S) -> Self {
        let base_ms = AtomicU64::new(source.wall_ms());
        let base_mono = source.mono_ms();
        SteadyClock {
            source,
            base_ms,
            base_mono,
        }
    }

    /// The underlying source (tests move it).
    pub fn source(&self) -> &S {
        &self.source
    }
}

impl SteadyClock<OsTime> {
    /// The daemon's clock on the operating system's time.
    pub fn system() -> Self {
        SteadyClock::new(OsTime)
    }
}

impl<S: TimeSource> Clock for SteadyClock<S> {
    fn now_ms(&self) -> Millis {
        let elapsed = self.source.mono_ms().saturating_sub(self.base_mono);
        self.base_ms.load(Ordering::Acquire).saturating_add(elapsed)
    }

    fn resume_from(&self, floor_ms: Millis) {
        self.base_ms.fetch_max(floor_ms, Ordering::AcqRel);
    }
}

/// A [`TimeSource`] whose wall and monotonic readings tests set apart, to
/// step the wall clock while time goes on.
#[derive(Debug, Clone, Default)]
pub struct ManualSource {
    /// Wall reading.
    pub wall: Arc<AtomicU64>,
    /// Monotonic reading.
    pub mono: Arc<AtomicU64>,
}

impl ManualSource {
    /// Both readings at `wall_ms` / 0.
    pub fn new(wall_ms: Millis) -> Self {
        ManualSource {
            wall: Arc::new(AtomicU64::new(wall_ms)),
            mono: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Time passes: both clocks move by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.mono.fetch_add(ms, Ordering::SeqCst);
    }
    /// The wall clock is stepped to `wall_ms`; the monotonic one does not move.
    pub fn step_wall(&self, wall_ms: Millis) {
        self.wall.store(wall_ms, Ordering::SeqCst);
    }
}

impl TimeSource for ManualSource {
    fn wall_ms(&self) -> Millis {
        self.wall.load(Ordering::SeqCst)
    }
    fn mono_ms(&self) -> Millis {
        self.mono.load(Ordering::SeqCst)
    }
}

/// The wall clock alone, as read now (file tools; the daemon uses [`SteadyClock`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        // A clock before 1970 is a broken host; treat it as the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to: for tests of window boundaries and expiry.
#[derive(Debug, Clone)]
pub struct ManualClock {
    /// Shared so the test and the server see the same time.
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock frozen at `now_ms`.
    pub fn new(now_ms: Millis) -> Self {
        Self {
            now_ms: Arc::new(AtomicU64::new(now_ms)),
        }
    }

    /// Sets the time (it may go backwards; the engine never does).
    pub fn set(&self, now_ms: Millis) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta_ms`.
    pub fn advance(&self, delta_ms: Millis) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_time_ignores_wall_steps_and_resumes_from_a_floor() {
        let src = ManualSource::new(1_000_000);
        let clock = SteadyClock::new(src.clone());
        src.advance(500);
        assert_eq!(clock.now_ms(), 1_000_500);
        src.step_wall(10); // back by ~1000 s
        src.advance(100);
        assert_eq!(clock.now_ms(), 1_000_600, "a step back changes nothing");
        src.step_wall(9_000_000_000); // forward
        src.advance(100);
        assert_eq!(clock.now_ms(), 1_000_700, "a step forward changes nothing");
        clock.resume_from(5_000_000);
        assert_eq!(clock.now_ms(), 5_000_700, "resumes from a later recorded time");
        clock.resume_from(1);
        assert_eq!(clock.now_ms(), 5_000_700, "never earlier");
    }
}
