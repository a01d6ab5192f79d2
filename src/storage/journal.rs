//! `WalJournal`: the engine's [`Journal`] backed by the WAL, with one
//! group-commit writer thread. Appends frame a record into a bounded in-memory
//! queue (LSNs handed out in queue order); the writer takes everything queued,
//! writes it with one write and one fdatasync, then publishes the durable LSN
//! that waiting requests watch. There is no artificial delay when idle.
//!
//! Under load the writer gathers: once a sync has covered at least
//! [`GATHER_FROM`] records, it holds the next write until as many records are
//! queued as that sync covered, or for at most as long as that sync took
//! (never more than [`GATHER_MAX`]), whichever comes first. Many requests then
//! share each `fdatasync`, whose CPU is the writer's main cost, and the
//! requests of the last batch, answered during the hold, are in time for the
//! next one. A quiet daemon's batches are small, so it never waits.
//!
//! In `batch` durability answers do not wait; the writer syncs every
//! `flush_interval_ms` instead (or as soon as a full batch is queued).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::codec;
use super::wal::{self, Wal};
use crate::clock::Millis;
use crate::config::Durability;
use crate::engine::{Lsn, Mutation};
use crate::journal::{DurableWatch, Journal, JournalError, Waiters};
use crate::metrics::StorageMetrics;

/// Exit status when a failed WAL write could not be undone (the daemon's
/// "storage failed" status).
pub const EXIT_UNRECOVERABLE: i32 = 5;

/// A sync that covered at least this many records makes the writer gather
/// the next batch: below it, requests are too few to be worth a wait.
pub const GATHER_FROM: u64 = 8;
/// The longest the writer holds a batch to gather more.
pub const GATHER_MAX: Duration = Duration::from_millis(1);

/// Queue and writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// When answers are given relative to the sync.
    pub durability: Durability,
    /// Sync interval in batch mode.
    pub flush_interval: Duration,
    /// Whether, in fsync mode under load, the writer gathers batches (see
    /// the module docs).
    pub gather: bool,
    /// The longest a gather lasts ([`GATHER_MAX`] outside tests).
    pub gather_max: Duration,
    /// Appends wait (backpressure) while this many bytes are queued.
    pub queue_bytes_max: usize,
    /// Where fsync latency and batch sizes go.
    pub metrics: Arc<StorageMetrics>,
}

struct Queue {
    /// Framed records not yet handed to the writer.
    buf: Vec<u8>,
    /// LSN of the first record in `buf`.
    first_lsn: Lsn,
    /// LSN the next append gets.
    next_lsn: Lsn,
    /// No more appends: shutting down or failed.
    closed: bool,
    /// Why the log failed, once it has.
    failed: Option<String>,
    /// Records written since the last snapshot, and their bytes.
    since_snapshot: (u64, u64),
    /// The writer sleeps on `work`: only then does an append ask for it to
    /// be signalled (a condvar signal is a futex syscall even when nobody
    /// waits), which `Journal::wake` does once the engine's locks are released.
    writer_idle: bool,
    /// Appenders waiting on `space` (queue room is freed when the writer takes
    /// a batch, before it writes).
    space_waiters: usize,
    /// While the writer gathers: the number of queued records at which the
    /// append that reaches it wakes the writer (0 when not gathering).
    gather_until: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer when records arrive or on close.
    work: Condvar,
    /// Wakes appenders waiting for queue space.
    space: Condvar,
    /// How far the log is durable; requests and threads wait on it.
    waiters: Arc<Waiters>,
    config: WriterConfig,
    /// An append found the writer to wake; [`Journal::wake`] does it.
    wake_pending: AtomicBool,
}

impl Queue {
    /// Records queued for the writer.
    fn queued(&self) -> u64 {
        self.next_lsn - self.first_lsn
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The WAL-backed journal.
pub struct WalJournal {
    shared: Arc<Shared>,
    /// The log, shared with the snapshotter (which deletes old segments).
    wal: Arc<Mutex<Wal>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl WalJournal {
    /// Starts the writer thread over an opened log.
    pub fn start(wal: Wal, config: WriterConfig) -> WalJournal {
        let next_lsn = wal.next_lsn();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                first_lsn: next_lsn,
                next_lsn,
                closed: false,
                failed: None,
                since_snapshot: (0, 0),
                writer_idle: false,
                space_waiters: 0,
                gather_until: 0,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            waiters: Arc::new(Waiters::new(next_lsn - 1)),
            config,
            wake_pending: AtomicBool::new(false),
        });
        let wal = Arc::new(Mutex::new(wal));
        let writer = {
            let (shared, wal) = (shared.clone(), wal.clone());
            std::thread::Builder::new()
                .name("quotad-wal".into())
                .spawn(move || write_loop(&shared, &wal))
                .expect("can spawn the WAL writer thread")
        };
        WalJournal {
            shared,
            wal,
            writer: Mutex::new(Some(writer)),
        }
    }

    /// The log, for the snapshotter.
    pub fn wal(&self) -> &Arc<Mutex<Wal>> {
        &self.wal
    }

    /// Highest LSN handed out so far.
    pub fn last_lsn(&self) -> Lsn {
        self.shared.lock().next_lsn - 1
    }

    /// Records and bytes written since `mark_snapshot` was last called.
    pub fn since_snapshot(&self) -> (u64, u64) {
        self.shared.lock().since_snapshot
    }

    /// Resets the since-snapshot counters.
    pub fn mark_snapshot(&self) {
        self.shared.lock().since_snapshot = (0, 0);
    }

    /// Why the log failed, if it has.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Resolves when the log fails.
    pub async fn failed(&self) {
        self.shared.waiters.failed().await
    }

    /// Blocks until `lsn` is durable; errors if the log failed first.
    pub fn wait_durable_blocking(&self, lsn: Lsn) -> Result<(), JournalError> {
        self.shared.waiters.wait_blocking(lsn)
    }

    /// Stops taking records, writes what is queued and stops the writer.
    pub fn close(&self) -> Result<(), JournalError> {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
        match self.failure() {
            Some(f) => Err(JournalError(f)),
            None => Ok(()),
        }
    }
}

impl Drop for WalJournal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Journal for WalJournal {
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        // Encoding happens on the caller's thread, so it spreads over cores.
        let mut payload = Vec::with_capacity(256);
        codec::encode_record(at_ms, mutations, &mut payload)
            .map_err(|e| JournalError(format!("cannot encode: {e}")))?;
        if payload.len() > wal::MAX_PAYLOAD_BYTES {
            return Err(JournalError(format!(
                "a record of {} bytes is over the limit",
                payload.len()
            )));
        }
        let mut q = self.shared.lock();
        loop {
            if let Some(f) = &q.failed {
                return Err(JournalError(f.clone()));
            }
            if q.closed {
                return Err(JournalError("the log is closed (shutting down)".into()));
            }
            if q.buf.len() < self.shared.config.queue_bytes_max {
                break;
            }
            q.space_waiters += 1;
            // The writer may be idle, its wake-up left to an appender that
            // has not yet released its locks: it is what makes space.
            self.shared.work.notify_one();
            q = self.shared.space.wait(q).unwrap_or_else(|e| e.into_inner());
            q.space_waiters -= 1;
        }
        let lsn = q.next_lsn;
        if q.buf.is_empty() {
            q.first_lsn = lsn;
        }
        wal::frame(lsn, &payload, &mut q.buf);
        q.next_lsn += 1;
        // Batch mode's timed wait and a gather end early once half the queue
        // is full; a gather also once it holds the records it waits for.
        let mut wake = q.writer_idle || q.buf.len() >= self.shared.config.queue_bytes_max / 2;
        if q.gather_until > 0 && q.queued() >= q.gather_until {
            q.gather_until = 0;
            wake = true;
        }
        drop(q);
        if wake {
            self.shared.wake_pending.store(true, Ordering::Release);
        }
        Ok(lsn)
    }

    fn wake(&self) {
        // Whoever clears the flag notifies, after every append that set it.
        if self.shared.wake_pending.swap(false, Ordering::AcqRel) {
            self.shared.work.notify_one();
        }
    }

    fn watch(&self) -> DurableWatch {
        match self.shared.config.durability {
            Durability::Fsync => DurableWatch::Waiters(self.shared.waiters.clone()),
            Durability::Batch => DurableWatch::always(),
        }
    }
}

fn write_loop(shared: &Shared, wal: &Mutex<Wal>) {
    let mut spare = Vec::new();
    // The previous sync: how many records it covered and how long it took.
    let mut prev = (0u64, Duration::ZERO);
    loop {
        let mut q = shared.lock();
        while q.buf.is_empty() && !q.closed {
            q.writer_idle = true;
            q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            q.writer_idle = false;
        }
        if q.buf.is_empty() && q.closed {
            return;
        }
        let half_full = shared.config.queue_bytes_max / 2;
        if shared.config.durability == Durability::Batch && !q.closed {
            // Wait out the flush interval unless the batch is already large.
            if q.buf.len() < half_full {
                // Not idle: appends need not wake it early.
                q = shared
                    .work
                    .wait_timeout(q, shared.config.flush_interval)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        } else if shared.config.gather
            && prev.0 >= GATHER_FROM
            && q.queued() < prev.0
            && q.buf.len() < half_full
            && !q.closed
        {
            q.gather_until = prev.0;
            let hold = prev.1.min(shared.config.gather_max);
            let (guard, waited) = shared.work.wait_timeout(q, hold).unwrap_or_else(|e| e.into_inner());
            q = guard;
            q.gather_until = 0;
            let m = &shared.config.metrics;
            m.wal_gathers.inc();
            if !waited.timed_out() && q.queued() >= prev.0 {
                m.wal_gathers_filled.inc();
            }
        }
        let batch = std::mem::replace(&mut q.buf, std::mem::take(&mut spare));
        let (first, last) = (q.first_lsn, q.next_lsn - 1);
        q.first_lsn = q.next_lsn;
        let space_waiters = q.space_waiters > 0;
        drop(q);
        if space_waiters {
            shared.space.notify_all();
        }

        let started = std::time::Instant::now();
        let result = wal.lock().unwrap_or_else(|e| e.into_inner()).write(&batch, first, last);
        let took = started.elapsed();
        prev = (last - first + 1, took);
        let m = &shared.config.metrics;
        m.fsync_seconds.observe(took.as_secs_f64());
        match result {
            Ok(()) => {
                m.batch_records.observe((last - first + 1) as f64);
                m.wal_records.inc_by(last - first + 1);
                m.wal_bytes.inc_by(batch.len() as u64);
                {
                    let mut q = shared.lock();
                    q.since_snapshot.0 += last - first + 1;
                    q.since_snapshot.1 += batch.len() as u64;
                }
                shared.waiters.advance(last);
            }
            Err(e @ wal::WalError::Unrecoverable { .. }) => {
                // The failed batch could not be cut off the log, so a 503 ("nothing
                // was applied") might be a lie. Exit without answering anyone: a
                // closed connection tells the clients the outcome is unknown, and
                // retrying with the same key is safe once recovery has run.
                tracing::error!(error = %e, first_lsn = first, last_lsn = last, "WAL write failed and could not be undone; exiting without answering");
                std::process::exit(EXIT_UNRECOVERABLE);
            }
            Err(e) => {
                // Never retried. The batch was cut off the log (see `Wal::write`),
                // so nothing in it or after it was applied: its requests get 503.
                // Restart replays the log.
                tracing::error!(error = %e, first_lsn = first, last_lsn = last, "WAL write failed; no further writes are taken");
                let mut q = shared.lock();
                q.failed = Some(format!("WAL write failed: {e}"));
                q.closed = true;
                drop(q);
                shared.waiters.fail(&format!("WAL write failed: {e}"));
                shared.space.notify_all();
                return;
            }
        }
        spare = batch;
        spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::{Faults, SimDir};

    /// A writer over a simulated disk whose every sync takes `sync_delay`.
    fn start(sync_delay: Duration, gather: bool) -> (SimDir, Arc<StorageMetrics>, WalJournal) {
        let dir = SimDir::new();
        dir.set_faults(Faults {
            sync_delay,
            ..Faults::default()
        });
        let (wal, _) = Wal::open(
            Arc::new(dir.clone()),
            0,
            64 << 20,
            codec::FORMAT_VERSION,
            &mut |_, _, _| Ok(()),
        )
        .expect("an empty log opens");
        let metrics = Arc::new(StorageMetrics::default());
        let j = WalJournal::start(
            wal,
            WriterConfig {
                durability: Durability::Fsync,
                flush_interval: Duration::from_millis(10),
                gather,
                // Holds end by the previous sync's length alone.
                gather_max: Duration::from_secs(600),
                queue_bytes_max: 16 << 20,
                metrics: metrics.clone(),
            },
        );
        (dir, metrics, j)
    }

    /// Appends one record as the engine does: append, then wake.
    fn append(j: &WalJournal) -> Lsn {
        let lsn = j.append(0, &[]).expect("the log takes records");
        j.wake();
        lsn
    }

    /// Makes the next sync cover `n` records: holds syncs, lets the writer
    /// take one record into a held sync, queues `n` behind it, then lets
    /// both syncs run. Returns the last LSN.
    fn sync_of(dir: &SimDir, j: &WalJournal, n: usize) -> Lsn {
        dir.hold_syncs();
        append(j);
        while !j.shared.lock().buf.is_empty() {
            std::thread::yield_now();
        }
        let last = (0..n).map(|_| append(j)).last().expect("n > 0");
        dir.release_syncs();
        j.wait_durable_blocking(last).expect("durable");
        last
    }

    fn batches(m: &StorageMetrics) -> u64 {
        let mut text = String::new();
        let mut r = prometheus_client::registry::Registry::default();
        r.register("b", "", m.batch_records.clone());
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encodes");
        let line = text.lines().find(|l| l.starts_with("b_count")).expect("a count");
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("a number")
    }

    #[test]
    fn under_load_a_sync_waits_for_as_many_records_as_the_last_one_covered() {
        // Each sync takes a second: the longest a gather may hold.
        let (dir, m, j) = start(Duration::from_secs(1), true);
        let last = sync_of(&dir, &j, 10);
        assert_eq!((batches(&m), m.wal_gathers.get()), (2, 0), "1 then 10, no gather yet");

        // Nine arrive: fewer than the ten the last sync covered, so the
        // writer holds them; the tenth ends the hold and all ten go in one sync.
        let mut lsns: Vec<Lsn> = (0..9).map(|_| append(&j)).collect();
        // The tenth only once the writer holds: sent sooner, it could find
        // all ten queued and have nothing to wait for.
        let since = std::time::Instant::now();
        while j.shared.lock().gather_until == 0 {
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "the writer never held the nine"
            );
            std::thread::yield_now();
        }
        lsns.push(append(&j));
        j.wait_durable_blocking(*lsns.last().unwrap()).expect("durable");
        assert_eq!(lsns, (last + 1..=last + 10).collect::<Vec<_>>());
        assert_eq!(batches(&m), 3, "the ten records share one sync");
        assert_eq!(m.wal_gathers.get(), 1);
        assert_eq!(m.wal_gathers_filled.get(), 1, "ended by the tenth record, not by time");
        j.close().expect("closes");
    }

    #[test]
    fn a_quiet_log_never_waits_and_a_burst_gathers_at_most_once() {
        let (dir, m, j) = start(Duration::ZERO, true);
        for _ in 0..20 {
            let lsn = append(&j);
            j.wait_durable_blocking(lsn).expect("durable");
        }
        assert_eq!(m.wal_gathers.get(), 0, "one record per sync: never held");
        sync_of(&dir, &j, 12);
        for _ in 0..20 {
            let lsn = append(&j);
            j.wait_durable_blocking(lsn).expect("durable");
        }
        assert!(
            m.wal_gathers.get() <= 1,
            "after the burst: {} holds",
            m.wal_gathers.get()
        );
        j.close().expect("closes");
    }

    #[test]
    fn with_gathering_off_nothing_is_held() {
        let (dir, m, j) = start(Duration::from_millis(200), false);
        sync_of(&dir, &j, 10);
        // Three records are synced without waiting for more.
        let lsn = (0..3).map(|_| append(&j)).last().unwrap();
        j.wait_durable_blocking(lsn).expect("durable");
        assert_eq!(m.wal_gathers.get(), 0);
        j.close().expect("closes");
    }

    #[test]
    fn closing_during_a_gather_writes_what_is_queued() {
        let (dir, m, j) = start(Duration::from_millis(500), true);
        let before = sync_of(&dir, &j, 10);
        let last = (0..4).map(|_| append(&j)).last().unwrap();
        j.close().expect("closes");
        assert_eq!(last, before + 4);
        assert_eq!(j.watch().durable_lsn(), last, "nothing queued is lost");
        assert_eq!(m.wal_gathers_filled.get(), 0, "4 of the 10 waited for came");
    }

    #[test]
    fn an_unrecoverable_write_exits_with_the_storage_status() {
        assert_eq!(super::EXIT_UNRECOVERABLE, i32::from(crate::cli::EXIT_STORAGE));
    }
}
