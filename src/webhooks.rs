//! Webhook delivery: one task per `[[webhooks]]` entry POSTs each event it
//! wants, in `seq` order, signed with HMAC-SHA256, retrying with exponential
//! backoff until the receiver answers 2xx. Each webhook's cursor (the last
//! seq it has dealt with) is written to `delivery.redb` in the data directory
//! after every delivery, so after a crash only the event in flight may be
//! sent again. Delivery reads the event feed and never touches the decision
//! path: a slow or dead receiver only makes its own queue longer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{watch, Semaphore};

use crate::clock::Clock;
use crate::config::{Config, ConfigError, Durability};
use crate::events::{type_matches, EventFeed, FeedEvent};
use crate::metrics::WebhookMetrics;
use crate::storage::StorageError;

/// Cursor table of `delivery.redb`: webhook name → (last seq dealt with,
/// CRC-32 of the name and that seq), so a flipped bit is a refusal to start,
/// never a silently skipped or repeated stretch of events.
const CURSORS: TableDefinition<&str, (u64, u32)> = TableDefinition::new("cursors_checked");
/// The cursor table before checksums (name → seq); moved into [`CURSORS`]
/// when the file is opened.
const CURSORS_UNCHECKED: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// The name the table has in messages.
const CURSORS_NAME: &str = "cursors_checked";
/// First retry delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Connecting must finish within this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole delivery (connect, send, answer) must finish within this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries in flight at once, over all webhooks.
const MAX_IN_FLIGHT: usize = 8;
/// Events read from the feed per page.
const PAGE: usize = 256;

type HmacSha256 = Hmac<Sha256>;

/// One configured webhook, checked.
#[derive(Clone)]
pub struct WebhookSpec {
    /// Its name.
    pub name: String,
    /// Where events are POSTed.
    pub url: reqwest::Url,
    /// The signing secret.
    secret: Vec<u8>,
    /// Type patterns it receives; empty: all.
    pub events: Vec<String>,
}

impl std::fmt::Debug for WebhookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSpec")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl WebhookSpec {
    fn wants(&self, kind: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|p| type_matches(p, kind))
    }
}

/// Checks `[[webhooks]]` and reads their secret files.
pub fn load_webhooks(config: &Config) -> Result<Vec<WebhookSpec>, ConfigError> {
    webhooks_from(config, true)
}

/// Checks `[[webhooks]]` without reading the secret files (`config check`
/// may run where the secrets are not).
pub fn check_webhooks(config: &Config) -> Result<(), ConfigError> {
    webhooks_from(config, false).map(drop)
}

fn webhooks_from(config: &Config, read_secrets: bool) -> Result<Vec<WebhookSpec>, ConfigError> {
    let mut out: Vec<WebhookSpec> = Vec::new();
    for (i, w) in config.webhooks.iter().enumerate() {
        let key = |field: &str| format!("webhooks[{i}].{field}");
        if w.name.is_empty()
            || w.name.len() > 64
            || !w.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::new(
                key("name"),
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if out.iter().any(|o| o.name == w.name) {
            return Err(ConfigError::new(
                key("name"),
                format!("{:?} is used by two webhooks", w.name),
            ));
        }
        let url = reqwest::Url::parse(&w.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(key("url"), format!("{:?} is not an http:// or https:// address", w.url))
            })?;
        let secret = if read_secrets {
            std::fs::read_to_string(&w.secret_file).map_err(|e| {
                ConfigError::new(
                    key("secret_file"),
                    format!("cannot read {}: {e}", w.secret_file.display()),
                )
            })?
        } else {
            "x".repeat(16) // stands in for the unread secret
        };
        let secret = secret.trim_end();
        if secret.len() < 16 {
            return Err(ConfigError::new(
                key("secret_file"),
                format!("{} holds a secret shorter than 16 characters", w.secret_file.display()),
            ));
        }
        let events = w.events.clone().unwrap_or_default();
        for (j, p) in events.iter().enumerate() {
            let known = crate::engine::signals::EVENT_TYPES.iter().any(|t| type_matches(p, t));
            if !known {
                return Err(ConfigError::new(
                    format!("webhooks[{i}].events[{j}]"),
                    format!(
                        "{p:?} matches no event type; the types are {}",
                        crate::engine::signals::EVENT_TYPES.join(", ")
                    ),
                ));
            }
        }
        out.push(WebhookSpec {
            name: w.name.clone(),
            url,
            secret: secret.as_bytes().to_vec(),
            events,
        });
    }
    Ok(out)
}

/// `Quotad-Signature` for `body` sent at unix second `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn cursor_crc(name: &str, seq: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(name.as_bytes());
    h.update(&seq.to_le_bytes());
    h.finalize()
}

/// Where cursors are kept: a redb file, or memory (state kept in memory only).
enum CursorStore {
    File(Database, String),
    Memory,
}

impl CursorStore {
    fn open(path: &Path) -> Result<CursorStore, StorageError> {
        let p = path.display().to_string();
        let io = |e: &dyn std::fmt::Display| StorageError::Io(format!("cannot open {p}: {e}"));
        let fresh = !path.exists();
        let db = Database::create(path).map_err(|e| io(&e))?;
        if fresh {
            crate::storage::restrict_file(path).map_err(|e| io(&e))?;
        }
        let store = CursorStore::File(db, p);
        store.upgrade()?;
        Ok(store)
    }

    /// Moves cursors written before checksums into the checked table.
    fn upgrade(&self) -> Result<(), StorageError> {
        let CursorStore::File(db, path) = self else {
            return Ok(());
        };
        let err = |e: &dyn std::fmt::Display| StorageError::Io(format!("cannot upgrade {path}: {e}"));
        let old: Vec<(String, u64)> = {
            let txn = db.begin_read().map_err(|e| err(&e))?;
            match txn.open_table(CURSORS_UNCHECKED) {
                Ok(t) => t
                    .iter()
                    .map_err(|e| err(&e))?
                    .map(|item| item.map(|(k, v)| (k.value().to_string(), v.value())))
                    .collect::<Result<_, _>>()
                    .map_err(|e| err(&e))?,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(err(&e)),
            }
        };
        let txn = db.begin_write().map_err(|e| err(&e))?;
        {
            let mut t = txn.open_table(CURSORS).map_err(|e| err(&e))?;
            for (name, seq) in &old {
                t.insert(name.as_str(), (*seq, cursor_crc(name, *seq)))
                    .map_err(|e| err(&e))?;
            }
        }
        txn.delete_table(CURSORS_UNCHECKED).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))
    }

    /// Every stored cursor, checked: (webhook name, seq).
    fn all(&self) -> Result<Vec<(String, u64)>, StorageError> {
        let CursorStore::File(db, path) = self else {
            return Ok(Vec::new());
        };
        let err = |e: &dyn std::fmt::Display| StorageError::Io(format!("cannot read {path}: {e}"));
        let txn = db.begin_read().map_err(|e| err(&e))?;
        let table = match txn.open_table(CURSORS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(&e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| err(&e))? {
            let (k, v) = item.map_err(|e| err(&e))?;
            let seq = checked_cursor(path, k.value(), v.value())?;
            out.push((k.value().to_string(), seq));
        }
        Ok(out)
    }

    fn set(&self, name: &str, seq: u64) -> Result<(), String> {
        let CursorStore::File(db, path) = self else {
            return Ok(());
        };
        let err = |e: &dyn std::fmt::Display| format!("cannot write {path}: {e}");
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(CURSORS)
            .map_err(|e| err(&e))?
            .insert(name, (seq, cursor_crc(name, seq)))
            .map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))
    }

    fn path(&self) -> &str {
        match self {
            CursorStore::File(_, p) => p,
            CursorStore::Memory => "<memory>",
        }
    }
}

/// Checks the delivery cursors of `delivery.redb` (if it exists) without
/// changing it: each must pass its checksum and be at most `newest_seq`, the
/// newest recorded event. For `quotad wal verify`.
pub fn verify_cursor_file(path: &Path, newest_seq: u64) -> Result<usize, StorageError> {
    if !path.exists() {
        return Ok(0);
    }
    let p = path.display().to_string();
    let err = |e: &dyn std::fmt::Display| StorageError::Corrupt(format!("cannot read {p}: {e}"));
    // A file left by a killed daemon needs redb's repair before it reads:
    // done on a private copy, never on the file itself.
    let (mut _read_only, mut _repaired) = (None, None);
    let txn = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => _read_only.insert(db).begin_read().map_err(|e| err(&e))?,
        Err(redb::DatabaseError::RepairAborted) => {
            let copy = crate::storage::snapshot::PrivateCopy::of(path).map_err(|e| err(&e))?;
            let db = Database::open(&copy.0).map_err(|e| err(&e))?;
            _repaired.insert((db, copy)).0.begin_read().map_err(|e| err(&e))?
        }
        Err(e) => return Err(err(&e)),
    };
    let mut count = 0;
    // An unchecked table (written before checksums) can only be range-checked.
    if let Ok(t) = txn.open_table(CURSORS_UNCHECKED) {
        for item in t.iter().map_err(|e| err(&e))? {
            let (k, v) = item.map_err(|e| err(&e))?;
            check_cursor_range(&p, "cursors", k.value(), v.value(), newest_seq)?;
            count += 1;
        }
    }
    if let Ok(t) = txn.open_table(CURSORS) {
        for item in t.iter().map_err(|e| err(&e))? {
            let (k, v) = item.map_err(|e| err(&e))?;
            let seq = checked_cursor(&p, k.value(), v.value())?;
            check_cursor_range(&p, CURSORS_NAME, k.value(), seq, newest_seq)?;
            count += 1;
        }
    }
    Ok(count)
}

/// A stored cursor's seq, if it passes its checksum.
fn checked_cursor(path: &str, name: &str, (seq, crc): (u64, u32)) -> Result<u64, StorageError> {
    if crc != cursor_crc(name, seq) {
        return Err(StorageError::Corrupt(format!(
            "{path}: table {CURSORS_NAME}, key {name:?}: the delivery cursor fails its checksum: the file is \
             damaged; move it away to deliver every retained event again (receivers dedupe on Quotad-Event-Id)"
        )));
    }
    Ok(seq)
}

fn check_cursor_range(path: &str, table: &str, name: &str, seq: u64, newest_seq: u64) -> Result<(), StorageError> {
    if seq > newest_seq {
        return Err(StorageError::Corrupt(format!(
            "{path}: table {table}, key {name:?}: the delivery cursor is at event {seq}, beyond the newest \
             recorded event {newest_seq}: the file is damaged or belongs to other data; move it away to deliver \
             every retained event again (receivers dedupe on Quotad-Event-Id). (With durability = \"batch\", \
             events delivered just before a crash can be lost in the loss window; the daemon then brings the \
             cursor back by itself.)"
        )));
    }
    Ok(())
}

/// One webhook's state, as `GET /v1/webhooks` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookView {
    /// Its name.
    pub name: String,
    /// Where it POSTs.
    pub url: String,
    /// Every event up to this seq has been delivered (or was not wanted).
    pub delivered_seq: u64,
    /// Events recorded after `delivered_seq`.
    pub pending: u64,
    /// Why the last attempt failed; null after a success.
    pub last_error: Option<String>,
    /// When the last attempt was made (RFC 3339), null before the first.
    pub last_attempt_at: Option<String>,
}

#[derive(Debug, Default)]
struct Status {
    delivered_seq: u64,
    last_error: Option<String>,
    last_attempt_ms: Option<u64>,
}

struct Hook {
    spec: WebhookSpec,
    status: Mutex<Status>,
}

/// Every configured webhook and its delivery task.
pub struct Webhooks {
    hooks: Vec<Arc<Hook>>,
    feed: EventFeed,
    /// Taken (and the file closed) when delivery stops.
    cursors: Mutex<Option<CursorStore>>,
    floor: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    metrics: Arc<WebhookMetrics>,
    /// Delivers only while this says so: on a cluster node, while it leads.
    active: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

/// How often a node that does not deliver now checks again.
const INACTIVE_RECHECK: Duration = Duration::from_millis(200);

impl Webhooks {
    /// Delivers only while `active` says so (a cluster node: while it leads,
    /// so each event is sent by one node at a time; a new leader starts from
    /// its own cursor, so receivers may see an event again after a failover).
    pub fn only_while(mut self, active: Arc<dyn Fn() -> bool + Send + Sync>) -> Webhooks {
        self.active = Some(active);
        self
    }

    /// Loads each webhook's cursor. A webhook seen for the first time starts
    /// at the oldest retained event, so nothing retained is skipped. `floor`
    /// is told the lowest cursor, so retention keeps what some webhook still
    /// has to send.
    ///
    /// A damaged cursor, or one beyond the newest recorded event, refuses
    /// start (`Corrupt`): skipping events silently is what it would cause.
    /// With `durability = "batch"` a cursor may legitimately be ahead of the
    /// log (events delivered, then lost in the loss window): then it is
    /// brought back to the newest event, with a warning.
    pub fn start(
        specs: Vec<WebhookSpec>,
        data_dir: Option<&Path>,
        feed: EventFeed,
        floor: Arc<AtomicU64>,
        clock: Arc<dyn Clock>,
        metrics: Arc<WebhookMetrics>,
        durability: Durability,
    ) -> Result<Webhooks, StorageError> {
        let cursors = match (data_dir, specs.is_empty()) {
            (Some(dir), false) => CursorStore::open(&dir.join("delivery.redb"))?,
            _ => CursorStore::Memory,
        };
        let newest = feed.last_seq();
        let mut stored = std::collections::HashMap::new();
        for (name, seq) in cursors.all()? {
            let seq = match check_cursor_range(cursors.path(), CURSORS_NAME, &name, seq, newest) {
                Ok(()) => seq,
                Err(_) if durability == Durability::Batch => {
                    tracing::warn!(webhook = %name, cursor = seq, newest, "delivery cursor ahead of the log (events lost in the batch durability window); delivering from the newest event on");
                    newest
                }
                Err(e) => return Err(e),
            };
            stored.insert(name, seq);
        }
        let mut hooks = Vec::new();
        for spec in specs {
            let delivered_seq = stored.get(&spec.name).copied().unwrap_or(0);
            hooks.push(Arc::new(Hook {
                spec,
                status: Mutex::new(Status {
                    delivered_seq,
                    ..Status::default()
                }),
            }));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("quotad/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StorageError::Io(format!("cannot build the webhook HTTP client: {e}")))?;
        let w = Webhooks {
            hooks,
            feed,
            cursors: Mutex::new(Some(cursors)),
            floor,
            clock,
            client,
            metrics,
            active: None,
        };
        w.publish_floor();
        Ok(w)
    }

    fn publish_floor(&self) {
        if self.hooks.is_empty() {
            return;
        }
        let min = self
            .hooks
            .iter()
            .map(|h| h.status.lock().unwrap_or_else(|e| e.into_inner()).delivered_seq)
            .min()
            .unwrap_or(u64::MAX);
        self.floor.store(min, Ordering::Release);
    }

    /// Each webhook's state.
    pub fn views(&self) -> Vec<WebhookView> {
        let last = self.feed.last_seq();
        self.hooks
            .iter()
            .map(|h| {
                let s = h.status.lock().unwrap_or_else(|e| e.into_inner());
                WebhookView {
                    name: h.spec.name.clone(),
                    url: h.spec.url.to_string(),
                    delivered_seq: s.delivered_seq,
                    pending: last.saturating_sub(s.delivered_seq),
                    last_error: s.last_error.clone(),
                    last_attempt_at: s.last_attempt_ms.map(crate::period::rfc3339),
                }
            })
            .collect()
    }

    /// Runs every delivery task until `stop` turns true.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let tasks: Vec<_> = (0..self.hooks.len())
            .map(|i| tokio::spawn(self.clone().deliver_all(i, permits.clone(), stop.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        // Close the cursor file now: a restart in the same process opens it again.
        self.cursors.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    async fn deliver_all(self: Arc<Self>, i: usize, permits: Arc<Semaphore>, mut stop: watch::Receiver<bool>) {
        let hook = self.hooks[i].clone();
        let name = hook.spec.name.as_str();
        let mut rx = self.feed.subscribe();
        let mut cursor = hook.status.lock().unwrap_or_else(|e| e.into_inner()).delivered_seq;
        loop {
            if self.active.as_ref().is_some_and(|a| !a()) {
                if sleep_or_stop(INACTIVE_RECHECK, &mut stop).await {
                    return;
                }
                continue;
            }
            self.metrics
                .set_pending(name, self.feed.last_seq().saturating_sub(cursor));
            let page = match self.feed.page(cursor, PAGE, "*") {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(webhook = name, error = %e, "cannot read events");
                    if sleep_or_stop(BACKOFF_MAX, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            if page.events.is_empty() {
                tokio::select! {
                    r = self.feed.wait_after(cursor, &mut rx) => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                continue;
            }
            for e in page.events {
                if hook.spec.wants(&e.kind) && !self.deliver(&hook, &e, &permits, &mut stop).await {
                    return;
                }
                cursor = e.seq;
                // Skipped events move the cursor too; written with the next
                // delivery or before waiting, which is enough to not resend.
                if hook.spec.wants(&e.kind) || e.seq == page.next_after {
                    self.advance(&hook, cursor);
                }
            }
        }
    }

    fn advance(&self, hook: &Hook, seq: u64) {
        hook.status.lock().unwrap_or_else(|e| e.into_inner()).delivered_seq = seq;
        let saved = match &*self.cursors.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(c) => c.set(&hook.spec.name, seq),
            None => Ok(()),
        };
        if let Err(e) = saved {
            tracing::error!(webhook = %hook.spec.name, error = %e, "cannot save the delivery cursor; events after it may be sent again after a restart");
        }
        self.metrics.set_delivered(&hook.spec.name, seq);
        self.publish_floor();
    }

    /// Sends `e` until a 2xx; false when told to stop first.
    async fn deliver(&self, hook: &Hook, e: &FeedEvent, permits: &Semaphore, stop: &mut watch::Receiver<bool>) -> bool {
        let name = hook.spec.name.as_str();
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = {
                let Ok(_permit) = permits.acquire().await else {
                    return false;
                };
                let now_ms = self.clock.now_ms();
                hook.status.lock().unwrap_or_else(|e| e.into_inner()).last_attempt_ms = Some(now_ms);
                let sig = signature(&hook.spec.secret, now_ms / 1000, e.json.as_bytes());
                let req = self
                    .client
                    .post(hook.spec.url.clone())
                    .header("content-type", "application/json")
                    .header("quotad-event-id", format!("evt_{}", e.seq))
                    .header("quotad-signature", sig)
                    .body(e.json.as_bytes().to_vec());
                tokio::select! {
                    r = req.send() => r,
                    _ = stop.changed() => return false,
                }
            };
            let failure = match outcome {
                Ok(resp) if resp.status().is_success() => None,
                Ok(resp) => Some(format!("the receiver answered {}", resp.status())),
                Err(err) if err.is_timeout() => Some(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
                Err(err) if err.is_connect() => Some(format!("cannot connect: {}", root_cause(&err))),
                Err(err) => Some(root_cause(&err)),
            };
            match failure {
                None => {
                    hook.status.lock().unwrap_or_else(|e| e.into_inner()).last_error = None;
                    self.metrics.attempt(name, "delivered");
                    return true;
                }
                Some(why) => {
                    tracing::warn!(webhook = name, seq = e.seq, error = %why, retry_in_s = backoff.as_secs(), "webhook delivery failed");
                    hook.status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(why);
                    self.metrics.attempt(name, "failed");
                    if sleep_or_stop(backoff, stop).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// The innermost error of a failed request, in plain words.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

/// Sleeps `d`; true when `stop` turned first.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}
