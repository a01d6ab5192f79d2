//! The event feed: reads recorded events in `seq` order for `GET /v1/events`,
//! the SSE stream and webhook delivery, and wakes them when new ones are
//! recorded. Recent events live in the engine's memory until a snapshot
//! copies them into the snapshot file; older ones are read from there. Only
//! durable events are ever handed out: a reader never sees an event whose
//! change the log could still lose.

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::journal::DurableWatch;
use crate::storage::snapshot::SnapshotStore;

/// Events scanned at most for one filtered page, so a filter that matches
/// nothing does not walk the whole retention in one request.
const SCAN_MAX: usize = 100_000;

/// One recorded event, encoded.
#[derive(Debug, Clone)]
pub struct FeedEvent {
    /// Its number.
    pub seq: u64,
    /// Its type, e.g. `threshold.crossed`.
    pub kind: String,
    /// The event JSON.
    pub json: Arc<str>,
}

/// A page read from the feed.
#[derive(Debug, Default)]
pub struct FeedPage {
    /// Matching events, oldest first.
    pub events: Vec<FeedEvent>,
    /// The seq to read after next time: the last event returned, or the last
    /// one scanned when nothing more matched.
    pub next_after: u64,
}

/// Which event types a reader wants: `*` all, `breaker.*` a prefix, or an exact type.
pub fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// The feed. Clones share it.
#[derive(Clone)]
pub struct EventFeed {
    engine: Arc<Engine>,
    store: Option<SnapshotStore>,
    durable: DurableWatch,
    changed: watch::Sender<()>,
}

impl EventFeed {
    /// A feed over `engine`'s events, with older ones in `store`; registers
    /// itself to be woken when events are recorded.
    pub fn new(engine: Arc<Engine>, store: Option<SnapshotStore>) -> EventFeed {
        let (changed, _) = watch::channel(());
        let tx = changed.clone();
        engine.set_event_hook(Arc::new(move || tx.send_replace(())));
        let durable = engine.durable_watch();
        EventFeed {
            engine,
            store,
            durable,
            changed,
        }
    }

    /// The newest recorded event's seq (durable or not).
    pub fn last_seq(&self) -> u64 {
        self.engine.last_event().0
    }

    /// A receiver that changes whenever events are recorded.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Waits until events after `after` are durable and readable; returns at
    /// once if they already are. Errors when the journal failed.
    pub async fn wait_after(&self, after: u64, rx: &mut watch::Receiver<()>) -> Result<(), String> {
        loop {
            rx.borrow_and_update();
            let (seq, lsn) = self.engine.last_event();
            if seq > after {
                // Recorded but maybe not yet durable: wait for the log.
                return self.durable.wait(lsn).await.map_err(|e| e.to_string());
            }
            if rx.changed().await.is_err() {
                return Err("quotad is shutting down".into());
            }
        }
    }

    /// Up to `limit` durable events after `after` whose type matches `pattern`.
    pub fn page(&self, after: u64, limit: usize, pattern: &str) -> Result<FeedPage, String> {
        let mut page = FeedPage {
            events: Vec::new(),
            next_after: after,
        };
        let mut cursor = after;
        let mut scanned = 0;
        while page.events.len() < limit && scanned < SCAN_MAX {
            let chunk = self.scan(cursor, limit.max(256))?;
            let Some(last) = chunk.last() else { break };
            cursor = last.seq;
            scanned += chunk.len();
            for e in chunk {
                if page.events.len() == limit {
                    break;
                }
                page.next_after = e.seq;
                if type_matches(pattern, &e.kind) {
                    page.events.push(e);
                }
            }
        }
        if page.events.len() < limit {
            page.next_after = page.next_after.max(cursor);
        }
        Ok(page)
    }

    /// Up to `limit` durable events before `before` (the newest when `None`)
    /// whose type matches `pattern`, newest first; and the seq to page back
    /// from next (`None` once the oldest event was scanned). Scans at most
    /// `SCAN_MAX` events, like [`EventFeed::page`].
    pub fn page_before(
        &self,
        before: Option<u64>,
        limit: usize,
        pattern: &str,
    ) -> Result<(Vec<FeedEvent>, Option<u64>), String> {
        let mut events = Vec::new();
        let mut cursor = before.unwrap_or(u64::MAX);
        let mut scanned = 0;
        while events.len() < limit && scanned < SCAN_MAX {
            let chunk = self.scan_before(cursor, limit.max(256))?;
            let Some(oldest) = chunk.last().map(|e| e.seq) else {
                return Ok((events, None));
            };
            scanned += chunk.len();
            for e in chunk {
                if events.len() == limit {
                    return Ok((events, Some(cursor)));
                }
                cursor = e.seq;
                if type_matches(pattern, &e.kind) {
                    events.push(e);
                }
            }
            cursor = oldest;
        }
        Ok((events, (cursor > 1).then_some(cursor)))
    }

    /// Up to `limit` durable events before `before`, newest first: memory's,
    /// then the snapshot file's older ones.
    fn scan_before(&self, before: u64, limit: usize) -> Result<Vec<FeedEvent>, String> {
        let mem = self
            .engine
            .recent_events_before(before, limit, self.durable.durable_lsn());
        let mut out: Vec<FeedEvent> = mem
            .iter()
            .map(|e| FeedEvent {
                seq: e.seq,
                kind: e.kind().to_string(),
                json: e.to_json().to_string().into(),
            })
            .collect();
        // Memory's events run without a gap to its newest, and whatever it no
        // longer holds is in the file: continue there below the oldest read.
        let below = out.last().map_or(before, |e| e.seq);
        if out.len() < limit {
            if let Some(store) = &self.store {
                for (seq, json) in store
                    .events_before(below, limit - out.len())
                    .map_err(|e| e.to_string())?
                {
                    out.push(stored(seq, json)?);
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` durable events after `after`, whatever their type. Memory
    /// is read first: events leave it only once the snapshot file holds them,
    /// so whatever memory no longer has is in the file.
    fn scan(&self, after: u64, limit: usize) -> Result<Vec<FeedEvent>, String> {
        let mem = self.engine.recent_events(after, limit, self.durable.durable_lsn());
        let first_mem = mem.first().map(|e| e.seq);
        let mut out = Vec::new();
        if first_mem != Some(after + 1) {
            if let Some(store) = &self.store {
                let upto = first_mem.unwrap_or(u64::MAX);
                for (seq, json) in store.events_after(after, limit, &|_| true).map_err(|e| e.to_string())? {
                    if seq >= upto {
                        break;
                    }
                    out.push(stored(seq, json)?);
                }
            }
        }
        for e in mem {
            if out.len() >= limit {
                break;
            }
            out.push(FeedEvent {
                seq: e.seq,
                kind: e.kind().to_string(),
                json: e.to_json().to_string().into(),
            });
        }
        Ok(out)
    }
}

/// An event read from the snapshot file.
fn stored(seq: u64, json: Vec<u8>) -> Result<FeedEvent, String> {
    let json = String::from_utf8(json).map_err(|_| format!("event {seq} in the snapshot file is not UTF-8"))?;
    let kind = serde_json::from_str::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_default();
    Ok(FeedEvent {
        seq,
        kind,
        json: json.into(),
    })
}
