//! The seam between the engine and durable storage. The engine hands every
//! applied change to a [`Journal`] while it still holds the locks of the state it
//! changed (so records touching the same state are in apply order), and the API
//! layer waits on [`DurableWatch`] before it answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::clock::Millis;
use crate::engine::{Lsn, Mutation};

/// Why the journal cannot take or confirm a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal unavailable: {0}")]
pub struct JournalError(pub String);

/// How far the journal is durable, and who waits for it. A request's wait is
/// a future that finds its LSN already durable without taking the lock, or
/// leaves its waker in a list that the writer drains once per sync, waking
/// exactly the waits the sync covers: no channel or allocation per request,
/// and no wake-up of waits a sync does not cover. Threads block on a condvar.
#[derive(Debug, Default)]
pub struct Waiters {
    /// Every LSN at or below this is durable. Written under `inner`'s lock;
    /// read without it by waits that need not register.
    durable: AtomicU64,
    /// Bumped (under the lock) by each [`Waiters::abort_waiting`]: a wait
    /// that sees it unchanged since it registered was not aborted.
    aborts: AtomicU64,
    inner: Mutex<WaitersInner>,
    /// Wakes threads in [`Waiters::wait_blocking`].
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WaitersInner {
    /// Set once the journal failed: every waiter above `durable` gets it.
    failed: Option<String>,
    /// Waits not yet covered, in no order: a sync wakes and removes those at
    /// or below the new durable LSN (a scan of the waits in flight, at most
    /// one per connection).
    waiting: Vec<Waiting>,
    /// Makes waits distinguishable.
    ticket: u64,
    /// Waits that [`Waiters::abort_waiting`] took out of `waiting`; each
    /// removes itself when it next looks.
    aborted_tickets: Vec<u64>,
    /// The last abort's message.
    aborted: String,
    /// Threads in `wait_blocking`: only then is `changed` signalled.
    blocking: usize,
}

#[derive(Debug)]
struct Waiting {
    lsn: Lsn,
    ticket: u64,
    waker: Waker,
}

impl Waiters {
    /// Waiters with everything up to `durable` already durable.
    pub fn new(durable: Lsn) -> Waiters {
        let w = Waiters::default();
        w.durable.store(durable, Ordering::Release);
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WaitersInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything up to `lsn` is durable: wakes those waiting for it.
    pub fn advance(&self, lsn: Lsn) {
        let covered: Vec<Waiting> = {
            let mut w = self.lock();
            self.durable.fetch_max(lsn, Ordering::AcqRel);
            if w.blocking > 0 {
                self.changed.notify_all();
            }
            w.waiting.extract_if(.., |x| x.lsn <= lsn).collect()
        };
        covered.into_iter().for_each(|x| x.waker.wake());
    }

    /// The journal failed: every waiter above the durable LSN gets `message`.
    pub fn fail(&self, message: &str) {
        let all = {
            let mut w = self.lock();
            w.failed = Some(message.to_string());
            self.changed.notify_all();
            std::mem::take(&mut w.waiting)
        };
        all.into_iter().for_each(|x| x.waker.wake());
    }

    /// Fails everyone waiting now with `message`, without failing the
    /// journal: a cluster node that lost leadership while records it applied
    /// were not committed (their outcome is unknown to it).
    pub fn abort_waiting(&self, message: &str) {
        let all = {
            let mut w = self.lock();
            self.aborts.fetch_add(1, Ordering::AcqRel);
            w.aborted = message.to_string();
            self.changed.notify_all();
            let all = std::mem::take(&mut w.waiting);
            w.aborted_tickets.extend(all.iter().map(|x| x.ticket));
            all
        };
        all.into_iter().for_each(|x| x.waker.wake());
    }

    /// Blocks the thread until `lsn` is durable; errors once the journal
    /// failed, or when the wait is aborted.
    pub fn wait_blocking(&self, lsn: Lsn) -> Result<(), JournalError> {
        let mut w = self.lock();
        let aborts = self.aborts.load(Ordering::Acquire);
        loop {
            if let Some(f) = &w.failed {
                return Err(JournalError(f.clone()));
            }
            if self.durable.load(Ordering::Acquire) >= lsn {
                return Ok(());
            }
            if self.aborts.load(Ordering::Acquire) != aborts {
                return Err(JournalError(w.aborted.clone()));
            }
            w.blocking += 1;
            w = self.changed.wait(w).unwrap_or_else(|e| e.into_inner());
            w.blocking -= 1;
        }
    }

    fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Resolves when the journal fails (never, if it does not).
    pub async fn failed(&self) {
        // No LSN reaches the maximum, so this wait ends only in failure.
        let _ = self.wait(Lsn::MAX).await;
        if self.failure().is_none() {
            std::future::pending::<()>().await; // the writer stopped cleanly
        }
    }

    fn wait(&self, lsn: Lsn) -> Wait<'_> {
        Wait {
            waiters: self,
            lsn,
            registered: None,
        }
    }
}

/// One wait for an LSN to become durable (see [`Waiters`]).
struct Wait<'a> {
    waiters: &'a Waiters,
    lsn: Lsn,
    /// Once in the list: its ticket and the abort count when it went in.
    /// Cleared when the wait resolves.
    registered: Option<(u64, u64)>,
}

impl Future for Wait<'_> {
    type Output = Result<(), JournalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (ws, lsn) = (self.waiters, self.lsn);
        // Durable and not aborted since the wait went in: the sync that
        // made it durable took it out of the list (under the lock that an
        // abort takes too), so nothing is left to tidy.
        let aborts_then = self.registered.map(|(_, a)| a);
        if ws.durable.load(Ordering::Acquire) >= lsn
            && aborts_then.is_none_or(|a| ws.aborts.load(Ordering::Acquire) == a)
        {
            self.registered = None;
            return Poll::Ready(Ok(()));
        }
        let mut w = ws.lock();
        // An abort that took this wait out of the list comes first: the LSN
        // may since have been reached by another leader's record.
        let aborted = self
            .registered
            .is_some_and(|(ticket, _)| take_ticket(&mut w.aborted_tickets, ticket));
        let done = if aborted {
            Some(Err(JournalError(w.aborted.clone())))
        } else if ws.durable.load(Ordering::Acquire) >= lsn {
            Some(Ok(()))
        } else {
            w.failed.clone().map(|f| Err(JournalError(f)))
        };
        if let Some(result) = done {
            self.registered = None;
            return Poll::Ready(result);
        }
        match self.registered {
            // Woken with nothing changed for it: keep the newest waker.
            Some((ticket, _)) => {
                if let Some(x) = w.waiting.iter_mut().find(|x| x.ticket == ticket) {
                    x.waker.clone_from(cx.waker());
                }
            }
            None => {
                w.ticket += 1;
                let ticket = w.ticket;
                w.waiting.push(Waiting {
                    lsn,
                    ticket,
                    waker: cx.waker().clone(),
                });
                self.registered = Some((ticket, ws.aborts.load(Ordering::Acquire)));
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // Given up before it resolved (its request was cancelled): take it
        // out of whichever list holds it.
        if let Some((ticket, _)) = self.registered {
            let mut w = self.waiters.lock();
            if let Some(i) = w.waiting.iter().position(|x| x.ticket == ticket) {
                w.waiting.swap_remove(i);
            } else {
                take_ticket(&mut w.aborted_tickets, ticket);
            }
        }
    }
}

/// Removes `ticket` from `tickets`; whether it was there.
fn take_ticket(tickets: &mut Vec<u64>, ticket: u64) -> bool {
    let found = tickets.iter().position(|t| *t == ticket);
    found.map(|i| tickets.swap_remove(i)).is_some()
}

/// Waits for records to become durable.
#[derive(Debug, Clone)]
pub enum DurableWatch {
    /// Everything is durable at once (journals that keep nothing, `batch` mode).
    Always,
    /// Woken by the journal's writer.
    Waiters(Arc<Waiters>),
}

impl DurableWatch {
    /// A watch that reports everything durable: for journals that keep nothing.
    pub fn always() -> Self {
        DurableWatch::Always
    }

    /// Every LSN at or below this is durable now.
    pub fn durable_lsn(&self) -> Lsn {
        match self {
            DurableWatch::Always => Lsn::MAX,
            DurableWatch::Waiters(w) => w.durable.load(Ordering::Acquire),
        }
    }

    /// Resolves once `lsn` is durable, or with an error if the journal failed first.
    pub async fn wait(&self, lsn: Lsn) -> Result<(), JournalError> {
        match self {
            DurableWatch::Always => Ok(()),
            DurableWatch::Waiters(w) => w.wait(lsn).await,
        }
    }
}

/// Takes records of applied mutations.
pub trait Journal: Send + Sync + 'static {
    /// Queues one record, made at engine time `at_ms`, and returns its LSN.
    /// Called with engine locks held: it must not do I/O, and must hand out
    /// LSNs in call order.
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError>;

    /// Does what `append` left for after the engine's locks: waking the
    /// writer that takes the new records. The engine calls it once it has
    /// released the locks it appended under, so that a wake-up (a system
    /// call) is not made while other calls wait for those locks.
    fn wake(&self) {}

    /// Where callers wait for durability.
    fn watch(&self) -> DurableWatch;
}

/// A journal that keeps nothing: state lives only in memory.
#[derive(Debug, Default)]
pub struct NullJournal {
    /// Last LSN handed out.
    lsn: AtomicU64,
}

impl Journal for NullJournal {
    fn append(&self, _at_ms: Millis, _mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        Ok(self.lsn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}

/// Records in LSN order, each the engine time and mutations of one operation.
type Records = Vec<(Lsn, Millis, Vec<Mutation>)>;

/// A journal that keeps every record in memory: tests replay it to check that
/// replay rebuilds the same state.
#[derive(Debug, Default, Clone)]
pub struct MemoryJournal {
    /// Records in LSN order.
    records: Arc<Mutex<Records>>,
}

impl MemoryJournal {
    /// A copy of the records so far.
    pub fn records(&self) -> Records {
        self.records.lock().expect("journal lock").clone()
    }
}

impl Journal for MemoryJournal {
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        let mut records = self.records.lock().expect("journal lock");
        let lsn = records.last().map_or(1, |(l, _, _)| l + 1);
        records.push((lsn, at_ms, mutations.to_vec()));
        Ok(lsn)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A wait polled by hand, with a waker that counts.
    struct Polled<'a> {
        wait: Pin<Box<Wait<'a>>>,
        woken: Arc<Count>,
    }

    impl<'a> Polled<'a> {
        fn new(w: &'a Waiters, lsn: Lsn) -> Self {
            Polled {
                wait: Box::pin(w.wait(lsn)),
                woken: Arc::new(Count(AtomicUsize::new(0))),
            }
        }
        fn poll(&mut self) -> Poll<Result<(), JournalError>> {
            let waker = Waker::from(self.woken.clone());
            self.wait.as_mut().poll(&mut Context::from_waker(&waker))
        }
        fn wakes(&self) -> usize {
            self.woken.0.load(Ordering::SeqCst)
        }
    }

    fn listed(w: &Waiters) -> (usize, usize) {
        let g = w.lock();
        (g.waiting.len(), g.aborted_tickets.len())
    }

    #[test]
    fn a_sync_wakes_the_waits_it_covers_and_no_others() {
        let w = Waiters::new(4);
        assert_eq!(Polled::new(&w, 4).poll(), Poll::Ready(Ok(())), "already durable");
        let (mut a, mut b, mut c) = (Polled::new(&w, 5), Polled::new(&w, 6), Polled::new(&w, 8));
        for p in [&mut a, &mut b, &mut c] {
            assert_eq!(p.poll(), Poll::Pending);
        }
        assert_eq!(listed(&w), (3, 0));
        w.advance(6);
        assert_eq!((a.wakes(), b.wakes(), c.wakes()), (1, 1, 0));
        assert_eq!(a.poll(), Poll::Ready(Ok(())));
        assert_eq!(b.poll(), Poll::Ready(Ok(())));
        assert_eq!(c.poll(), Poll::Pending, "a spurious poll keeps waiting");
        assert_eq!(listed(&w), (1, 0), "polled twice, listed once");
        w.advance(7);
        assert_eq!(c.wakes(), 0);
        w.advance(8);
        assert_eq!(c.wakes(), 1);
        assert_eq!(c.poll(), Poll::Ready(Ok(())));
        assert_eq!(listed(&w), (0, 0));
        assert_eq!(DurableWatch::Waiters(Arc::new(Waiters::new(9))).durable_lsn(), 9);
    }

    #[test]
    fn a_failure_fails_the_waits_above_the_durable_lsn() {
        let w = Waiters::new(4);
        let mut above = Polled::new(&w, 5);
        assert_eq!(above.poll(), Poll::Pending);
        w.fail("disk gone");
        assert_eq!(above.wakes(), 1);
        assert_eq!(above.poll(), Poll::Ready(Err(JournalError("disk gone".into()))));
        assert_eq!(
            Polled::new(&w, 4).poll(),
            Poll::Ready(Ok(())),
            "durable before the failure"
        );
        assert_eq!(
            Polled::new(&w, 6).poll(),
            Poll::Ready(Err(JournalError("disk gone".into())))
        );
        assert_eq!(w.wait_blocking(6), Err(JournalError("disk gone".into())));
        assert_eq!(listed(&w), (0, 0));
    }

    #[test]
    fn an_abort_fails_only_the_waits_listed_when_it_came() {
        let w = Waiters::new(4);
        let (mut covered, mut listed_then) = (Polled::new(&w, 5), Polled::new(&w, 6));
        assert_eq!(covered.poll(), Poll::Pending);
        assert_eq!(listed_then.poll(), Poll::Pending);
        w.advance(5);
        w.abort_waiting("lost leadership");
        // The log position is reached later by another leader's record: the
        // aborted wait must not take it for its own.
        w.advance(6);
        assert_eq!(covered.poll(), Poll::Ready(Ok(())), "covered before the abort");
        assert_eq!(listed_then.wakes(), 1);
        assert_eq!(
            listed_then.poll(),
            Poll::Ready(Err(JournalError("lost leadership".into())))
        );
        let mut later = Polled::new(&w, 7);
        assert_eq!(later.poll(), Poll::Pending, "a wait after the abort is not aborted");
        w.advance(7);
        assert_eq!(later.poll(), Poll::Ready(Ok(())));
        assert_eq!(listed(&w), (0, 0));
    }

    #[test]
    fn a_wait_given_up_leaves_nothing_behind() {
        let w = Waiters::new(0);
        let mut waits: Vec<Polled> = (1..=100).map(|l| Polled::new(&w, l)).collect();
        waits.iter_mut().for_each(|p| assert_eq!(p.poll(), Poll::Pending));
        waits.truncate(50);
        assert_eq!(listed(&w), (50, 0));
        w.abort_waiting("gone");
        assert_eq!(listed(&w), (0, 50));
        waits.truncate(10);
        assert_eq!(listed(&w), (0, 10));
        for p in &mut waits {
            assert_eq!(p.poll(), Poll::Ready(Err(JournalError("gone".into()))));
        }
        drop(waits);
        assert_eq!(listed(&w), (0, 0));
    }

    #[test]
    fn tasks_on_many_threads_see_every_sync() {
        let w = Arc::new(Waiters::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("runtime");
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let w = w.clone();
                rt.spawn(async move {
                    for l in (1..=400u64).filter(|l| l % 16 == t) {
                        DurableWatch::Waiters(w.clone()).wait(l).await.expect("durable");
                    }
                })
            })
            .collect();
        for l in 1..=400 {
            w.advance(l);
            if l % 50 == 0 {
                std::thread::yield_now();
            }
        }
        rt.block_on(async {
            for t in tasks {
                tokio::time::timeout(std::time::Duration::from_secs(30), t)
                    .await
                    .expect("every wait ends")
                    .expect("no panic");
            }
        });
        assert_eq!(listed(&w), (0, 0));
    }
}
