//! Time source. This is the only module that reads the system clock; the engine
//! and storage take `now_ms` as an argument so tests can inject time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Where the daemon gets "now" from.
pub trait Clock: Send + Sync + 'static {
    /// Current wall-clock time in milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The real clock.
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
