//! Calls that wait for capacity instead of being denied (`wait_ms`): parks
//! them in the engine's [`WaitList`], and runs the one task that decides them
//! again when capacity can have returned — when the engine reports a refund,
//! reset, credit, plan change or reload on a counter they wait on, or at the
//! time refill, a window's end or a sliding bucket ageing out lets the first
//! of them pass. Nothing polls: with no change and no waiter due, the task
//! sleeps.
//!
//! An admission is an ordinary decision of the engine, journaled and made
//! durable before it is answered; a waiter that gives up or whose client
//! leaves is taken out with nothing charged. Waiters live only in memory: a
//! restart answers none of them (shutdown answers them 503), and a client
//! that retries with its idempotency key gets the admitted answer replayed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::clock::{Clock, Millis};
use crate::engine::policy::Priority;
use crate::engine::waitlist::{Blocked, Freed, Refusal, Stage, WaitHooks, WaitList, Waiter};
use crate::engine::{
    Applied, CounterKey, DecideOp, DecideOpts, Decision, DecisionNotes, DecisionRequest, Engine, EngineError, Reason,
    ReasonCode,
};
use crate::metrics::WaitMetrics;

/// How a wait ended.
#[derive(Debug)]
pub enum WaitEnd {
    /// Admitted: the answer still has to be made durable.
    Admitted(Applied<Decision>),
    /// Not admitted: the last denial, with `waited_ms`.
    Denied(Decision),
}

/// The answer of a waiter that shutdown (or a dropped driver) leaves unanswered.
const SHUTTING_DOWN: &str =
    "quotad is shutting down; the call waited and nothing was charged, retry elsewhere or later";

/// What the driver hands back to a parked caller.
type Answer = Result<WaitEnd, EngineError>;

/// What a parked call carries.
#[derive(Debug)]
pub struct Parked {
    /// consume or reserve.
    op: DecideOp,
    /// The request, decided again as it was sent.
    req: DecisionRequest,
    /// The last denial: what the caller gets if the wait runs out.
    last: Decision,
    /// Where the answer goes; taken when it is sent.
    tx: Option<oneshot::Sender<Answer>>,
    /// When the caller stops waiting. Real (monotonic) time: `wait_ms` is a
    /// promise to a client, whatever engine time does.
    deadline: Instant,
    /// Set when the caller's deadline passed while it was being decided:
    /// the driver answers it instead of parking it again.
    gave_up: bool,
}

/// The waiting calls and the task that admits them.
pub struct Waiting {
    /// Decides them.
    engine: Arc<Engine>,
    /// Engine time source.
    clock: Arc<dyn Clock>,
    /// The parked calls. Lock order: shard locks before this; never call the
    /// engine while holding it (the engine's hooks take it).
    list: Mutex<WaitList<Parked>>,
    /// `list.len()`, read without the lock on every decision.
    count: AtomicUsize,
    /// Wakes the driver: capacity came back, or a call was parked.
    wake: Notify,
    /// Queue depth, wait times, outcomes.
    metrics: Arc<WaitMetrics>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("waiters", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl WaitHooks for Waiting {
    fn active(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    fn ahead(&self, key: &CounterKey, priority: Priority, now_ms: Millis) -> Option<u64> {
        self.lock().ahead(key, priority, now_ms)
    }

    fn freed(&self, what: Freed<'_>) {
        let dirty = {
            let mut l = self.lock();
            l.freed(what);
            l.has_dirty()
        };
        if dirty {
            self.wake.notify_one();
        }
    }
}

/// Takes a parked call out if its caller goes away (the connection closed,
/// or the handler was cancelled) before it was answered.
struct Leave<'a> {
    waiting: &'a Waiting,
    id: u64,
    armed: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.armed && self.waiting.take(self.id).is_some() {
            self.waiting.metrics.outcome("cancelled");
        }
    }
}

impl Waiting {
    /// The keeper of waiting calls for `engine`; installs itself as the
    /// engine's wait hooks.
    pub fn install(engine: Arc<Engine>, clock: Arc<dyn Clock>, metrics: Arc<WaitMetrics>) -> Arc<Waiting> {
        let s = engine.policy().settings;
        let w = Arc::new(Waiting {
            engine: engine.clone(),
            clock,
            list: Mutex::new(WaitList::new(s.max_waiters, s.max_waiters_per_subject)),
            count: AtomicUsize::new(0),
            wake: Notify::new(),
            metrics,
        });
        engine.set_wait_hooks(w.clone());
        w
    }

    fn lock(&self) -> MutexGuard<'_, WaitList<Parked>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call with this idempotency key is waiting.
    pub fn in_progress(&self, key: &str) -> bool {
        self.count.load(Ordering::Acquire) > 0 && self.lock().in_progress(key)
    }

    /// How many calls wait.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether no call waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, id: u64) -> Option<Waiter<Parked>> {
        let mut l = self.lock();
        self.remove_locked(&mut l, id)
    }

    /// Takes a waiter out, keeping the lock-free count and the depth gauge
    /// in step with the list.
    fn remove_locked(&self, l: &mut WaitList<Parked>, id: u64) -> Option<Waiter<Parked>> {
        let w = l.remove(id)?;
        self.counted(l);
        Some(w)
    }

    /// Publishes the list's size: `count` for [`WaitHooks::active`], and the gauge.
    fn counted(&self, l: &WaitList<Parked>) {
        self.count.store(l.len(), Ordering::Release);
        self.metrics.set_depth(l.depth());
    }

    /// Whether a denied call is worth parking for up to `wait_ms`: denied only
    /// by enforced limits that time or returned capacity can cure, and that
    /// time alone cures within the wait.
    pub fn worth_waiting(d: &Decision, notes: &DecisionNotes, wait_ms: u64) -> bool {
        !d.allowed && notes.curable && d.retry_after_ms.is_some_and(|r| r <= wait_ms)
    }

    /// Parks a denied call for at most `wait_ms` and answers it once it is
    /// admitted or the wait runs out. `first` is the denial it got.
    pub async fn wait(
        &self,
        op: DecideOp,
        req: DecisionRequest,
        first: Decision,
        notes: DecisionNotes,
        wait_ms: u64,
    ) -> Result<WaitEnd, EngineError> {
        let since = Instant::now();
        // Answered if the queue is full; the original goes with the waiter.
        let fallback = first.clone();
        let now = self.engine.time(self.clock.now_ms());
        let (tx, mut rx) = oneshot::channel();
        let waiter = Waiter {
            priority: notes.priority,
            subject: req.subject.as_str().into(),
            keys: notes.denied_by,
            idempotency_key: req.idempotency_key.clone(),
            retry_at_ms: now.saturating_add(first.retry_after_ms.unwrap_or(0)),
            stage: Stage::Waiting,
            payload: Parked {
                op,
                req,
                last: first,
                tx: Some(tx),
                deadline: since + Duration::from_millis(wait_ms),
                gave_up: false,
            },
        };
        let parked = {
            let mut l = self.lock();
            let r = l.park(waiter);
            self.counted(&l);
            r
        };
        let id = match parked {
            Ok(id) => id,
            Err(Refusal::InProgress) => {
                return Err(EngineError::RequestInProgress(
                    "a call with this idempotency key is waiting for capacity; its answer will come on that call"
                        .into(),
                ))
            }
            Err(Refusal::QueueFull(setting)) => {
                self.metrics.outcome("queue_full");
                tracing::debug!(setting, "a call could not wait: the queue is full");
                return Ok(WaitEnd::Denied(queue_full(fallback)));
            }
        };
        self.wake.notify_one();
        let mut leave = Leave {
            waiting: self,
            id,
            armed: true,
        };
        let deadline = tokio::time::sleep(Duration::from_millis(wait_ms));
        tokio::pin!(deadline);
        let answer = tokio::select! {
            a = &mut rx => a,
            _ = &mut deadline => {
                let out = {
                    let mut l = self.lock();
                    match l.get(id).map(|w| w.stage) {
                        Some(Stage::Waiting) => self.remove_locked(&mut l, id),
                        Some(Stage::Deciding) => {
                            // The driver is deciding it this instant: its
                            // answer (admitted or not) comes on the channel.
                            if let Some(w) = l.get_mut(id) {
                                w.payload.gave_up = true;
                            }
                            None
                        }
                        None => None,
                    }
                };
                match out {
                    Some(w) => {
                        self.metrics.outcome("expired");
                        Ok(Ok(WaitEnd::Denied(w.payload.last)))
                    }
                    None => rx.await,
                }
            }
        };
        leave.armed = false;
        let waited = since.elapsed();
        self.metrics.waited(waited);
        let waited_ms = Some(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
        match answer {
            Ok(Ok(WaitEnd::Admitted(mut a))) => {
                a.value.waited_ms = waited_ms;
                Ok(WaitEnd::Admitted(a))
            }
            Ok(Ok(WaitEnd::Denied(mut d))) => {
                d.waited_ms = waited_ms;
                Ok(WaitEnd::Denied(d))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EngineError::Unavailable(SHUTTING_DOWN.into())),
        }
    }

    /// Decides again, in order, the waiters that capacity may have come back
    /// for by engine time `now_ms`. The driver calls it; tests call it with
    /// an injected clock.
    pub fn pass(&self, now_ms: Millis) {
        let order = self.lock().pass(now_ms);
        let mut blocked = Blocked::default();
        for id in order {
            let (op, req) = {
                let mut l = self.lock();
                let Some(w) = l.get(id) else { continue };
                if blocked.blocks(&w.keys) {
                    // Someone ahead on one of its counters still waits.
                    let keys = w.keys.clone();
                    blocked.add(&keys);
                    continue;
                }
                let w = l.begin_deciding(id).expect("present");
                (w.payload.op, w.payload.req.clone())
            };
            let r = self
                .engine
                .decide_with(op, &req, now_ms, DecideOpts { from_waitlist: true });
            let mut l = self.lock();
            let left_ms = l.get(id).map_or(0, |w| {
                if w.payload.gave_up {
                    0
                } else {
                    w.payload.deadline.saturating_duration_since(Instant::now()).as_millis() as u64
                }
            });
            let (end, keep) = match r {
                Ok((a, _)) if a.value.allowed => (Some(Ok(WaitEnd::Admitted(a))), false),
                Ok((a, notes)) => {
                    let retry_ms = a.value.retry_after_ms.unwrap_or(0);
                    let retry_at = now_ms.saturating_add(retry_ms);
                    if notes.curable && left_ms > 0 && retry_ms <= left_ms {
                        blocked.add(&notes.denied_by);
                        l.still_waiting(id, notes.denied_by, retry_at);
                        if let Some(w) = l.get_mut(id) {
                            w.payload.last = a.value;
                        }
                        (None, true)
                    } else {
                        blocked.add(&notes.denied_by);
                        (Some(Ok(WaitEnd::Denied(a.value))), false)
                    }
                }
                Err(e) => (Some(Err(e)), false),
            };
            if keep {
                continue;
            }
            let outcome = match &end {
                Some(Ok(WaitEnd::Admitted(_))) => "admitted",
                Some(Ok(WaitEnd::Denied(_))) => "expired",
                _ => "failed",
            };
            // Gone already: its caller left while it was decided. An
            // admission stands (it is journaled); a retry under its key
            // gets it replayed.
            if let Some(mut w) = self.remove_locked(&mut l, id) {
                self.metrics.outcome(outcome);
                if let (Some(tx), Some(end)) = (w.payload.tx.take(), end) {
                    let _ = tx.send(end);
                }
            }
        }
    }

    /// Runs until `stop` says so, then answers every waiter 503.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                break;
            }
            let (due, dirty) = {
                let l = self.lock();
                (l.next_due(), l.has_dirty())
            };
            if !dirty {
                let sleep = due.map(|at| {
                    let now = self.engine.time(self.clock.now_ms());
                    Duration::from_millis(at.saturating_sub(now))
                });
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = async { tokio::time::sleep(sleep.unwrap_or(Duration::MAX)).await }, if sleep.is_some() => {}
                    _ = stop.changed() => {}
                }
            }
            if *stop.borrow() {
                break;
            }
            let now = self.engine.time(self.clock.now_ms());
            let me = self.clone();
            // Deciding may block on a full journal queue: off the async workers.
            let _ = tokio::task::spawn_blocking(move || me.pass(now)).await;
        }
        self.shutdown();
    }

    /// Answers every waiter 503: nothing of theirs was charged.
    pub fn shutdown(&self) {
        self.abort_all(SHUTTING_DOWN);
    }

    /// Answers every waiter `503` with `message` (nothing of theirs was
    /// charged): on shutdown, or on a cluster node that stopped leading,
    /// whose state may no longer be the cluster's.
    pub fn abort_all(&self, message: &str) {
        let all = {
            let mut l = self.lock();
            let all = l.drain();
            self.counted(&l);
            all
        };
        for mut w in all {
            if let Some(tx) = w.payload.tx.take() {
                let _ = tx.send(Err(EngineError::Unavailable(message.into())));
            }
        }
    }

    /// Makes the driver decide its due waiters again now: for clocks that
    /// jump (tests drive engine time by hand; the driver sleeps in real time).
    pub fn poke(&self) {
        if !self.is_empty() {
            self.lock().freed(Freed::All);
            self.wake.notify_one();
        }
    }

    /// Puts reloaded bounds in force for calls parked from now on.
    pub fn set_bounds(&self, max: usize, per_subject: usize) {
        self.lock().set_bounds(max, per_subject);
    }
}

/// The denial answered when a call may not wait because the queue is full:
/// the engine's denial plus a `queue_full` reason naming no limit.
pub fn queue_full(mut d: Decision) -> Decision {
    d.reasons.push(Reason {
        limit: None,
        code: ReasonCode::QueueFull,
        retry_after_ms: None,
    });
    d.waited_ms = Some(0);
    d
}
