//! The SQLite result store: the `results` table of the embedded database (see
//! `crate::broker::sqlite` for the file, its schema and its checks).
//!
//! One row per task: `key` (`<prefix><task id>`, `celery-task-meta-<id>` by default),
//! `meta` (the JSON meta document, opaque here), `stored_at` and `expires_at`
//! (`result_expires` after the write; NULL: kept forever). A row past its expiry is
//! never returned and is deleted by the writer once a minute.
//!
//! - `store` only queues the meta; a writer thread upserts everything pending in one
//!   transaction and then wakes the waiters (in this process directly, in others by a
//!   loopback UDP datagram to the ports of the `peers` rows of kind `waiter`).
//! - `get` and the waits read on the calling thread (a Python thread with the GIL
//!   released, or a test), never on a tokio worker.
//! - A wait reads the row, then sleeps until a wake-up or 1 ms, 2 ms, ... up to
//!   `polling_interval` (50 ms), and reads again: no busy loop, and a write by a
//!   process that does not know about us yet is still seen.
//!
//! A `SqliteBackend` belongs to the process that created it: after `fork()` the child
//! builds its own; the inherited one refuses work (`Error::Closed`) and its drop
//! leaves the inherited SQLite connection alone (closing it would drop the child's
//! POSIX locks on the file).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, TransactionBehavior};

use crate::backend::is_ready;
use crate::backend::redis::{full_key_prefix, DEFAULT_KEY_PREFIX};
use crate::broker::sqlite::{
    column_bytes, db_error, heartbeat, new_peer_id, notify_local, open, open_writer,
    subscribe_local, unix_now, Checkpointer, JsonBytes, Signal, Topic, WakeListener, WakeNotifier,
    KIND_WAITER, MIN_IDLE,
};
use crate::broker::url::{BrokerUrl, Scheme};
use crate::error::{Error, Result};

// The chord join, one transaction per step.
#[path = "sqlite_chord.rs"]
mod chord;

/// Results written per transaction at most.
const MAX_BATCH: usize = 2048;
/// How often the writer deletes expired rows.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How often a waiting process refreshes its `peers` row.
const WAITER_HEARTBEAT: Duration = Duration::from_secs(5);

const CLOSED: &str = "the result backend";
const FORKED: &str = "a result backend inherited across fork()";

/// How to name and keep results.
#[derive(Debug, Clone)]
pub struct SqliteBackendOptions {
    /// Time to live of a stored result (`result_expires`); `None` or zero: forever.
    pub expires: Option<Duration>,
    /// Prefix of a task's key (`celery-task-meta-`).
    pub key_prefix: String,
    /// Put before `key_prefix` as Celery does (see `full_key_prefix`).
    pub global_keyprefix: Option<String>,
    /// Bound on `close`'s final flush.
    pub connect_timeout: Duration,
    /// How long a write waits for another process's write lock.
    pub busy_timeout: Duration,
    /// The longest pause between two reads of a waiter.
    pub polling_interval: Duration,
}

impl Default for SqliteBackendOptions {
    fn default() -> Self {
        Self {
            expires: Some(Duration::from_secs(86_400)),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            global_keyprefix: None,
            connect_timeout: Duration::from_secs(4),
            busy_timeout: Duration::from_secs(10),
            polling_interval: Duration::from_millis(50),
        }
    }
}

/// A SQLite result store. See the module documentation.
pub struct SqliteBackend {
    shared: Arc<Shared>,
    writer: std_mpsc::Sender<WriteOp>,
    closed: AtomicBool,
    pid: u32,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("url", &self.shared.masked)
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    path: PathBuf,
    masked: String,
    prefix: String,
    expires: Option<Duration>,
    connect_timeout: Duration,
    polling_interval: Duration,
    /// The connection reads (and waiter heartbeats) use; `None` only while dropping.
    reader: Mutex<Option<Connection>>,
    /// Bumped by every write of this process and every wake-up datagram.
    signal: Arc<Signal>,
    /// Our wake-up port and when our `peers` row was last refreshed.
    waiting: Mutex<WaitRegistration>,
    peer_id: String,
    last_error: Mutex<Option<String>>,
    /// Set by `close`: waits end with `Error::Closed`.
    closed: AtomicBool,
    pid: u32,
    _checkpointer: Option<Arc<Checkpointer>>,
}

#[derive(Default)]
struct WaitRegistration {
    listener: Option<WakeListener>,
    refreshed: Option<Instant>,
}

impl Shared {
    fn key_for(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.prefix)
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let guard = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = guard.as_ref().ok_or(Error::Closed(CLOSED))?;
        f(conn).map_err(|err| db_error(&self.path, &err))
    }

    fn get_key(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.with_reader(|conn| read_meta(conn, key))
    }

    /// Listen for wake-ups and keep our `peers` row fresh while we wait.
    fn register_waiter(&self) {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if waiting
            .refreshed
            .is_some_and(|at| at.elapsed() < WAITER_HEARTBEAT)
        {
            return;
        }
        if waiting.listener.is_none() {
            waiting.listener = WakeListener::start(self.signal.clone());
        }
        let Some(port) = waiting.listener.as_ref().map(WakeListener::port) else {
            // No loopback socket: waits rely on polling alone.
            waiting.refreshed = Some(Instant::now());
            return;
        };
        // A failed heartbeat only costs latency; try again on the next wait.
        if self
            .with_reader(|conn| heartbeat(conn, &self.peer_id, KIND_WAITER, Some(port)))
            .is_ok()
        {
            waiting.refreshed = Some(Instant::now());
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Inherited across fork(): closing would release this process's locks.
            if let Ok(mut reader) = self.reader.try_lock() {
                if let Some(conn) = reader.take() {
                    std::mem::forget(conn);
                }
            }
        }
    }
}

fn read_meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    let mut stmt = conn.prepare_cached(
        "SELECT meta FROM results WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
    )?;
    let mut rows = stmt.query(params![key, unix_now()])?;
    match rows.next()? {
        Some(row) => Ok(Some(column_bytes(row, 0)?)),
        None => Ok(None),
    }
}

enum WriteOp {
    Store {
        key: String,
        value: Vec<u8>,
    },
    Forget(String, std_mpsc::Sender<Result<()>>),
    /// Answered once everything queued before it is written; carries the errors seen
    /// since the previous flush.
    Flush(std_mpsc::Sender<Result<(), String>>),
    Close,
}

impl SqliteBackend {
    /// Parse `url` and open (creating if needed) the database now. A bad URL is
    /// `Error::InvalidUrl`; a file that cannot be used `Error::Connection` naming it.
    pub fn connect(url: &str, options: SqliteBackendOptions) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?;
        Self::connect_parsed(&parsed, options)
    }

    pub fn connect_parsed(url: &BrokerUrl, options: SqliteBackendOptions) -> Result<Self> {
        let path = match (&url.scheme, &url.sqlite_path) {
            (Scheme::Sqlite, Some(path)) => path.clone(),
            _ => {
                return Err(Error::InvalidUrl(format!(
                    "invalid result backend URL {:?}: not a sqlite:// URL",
                    url.masked()
                )))
            }
        };
        let reader = open(&path, options.busy_timeout)?;
        let (writer_conn, checkpointer) = open_writer(&path, options.busy_timeout)?;
        let signal = Arc::new(Signal::default());
        subscribe_local(&path, Topic::Results, &signal);
        let shared = Arc::new(Shared {
            masked: url.masked().to_owned(),
            prefix: full_key_prefix(options.global_keyprefix.as_deref(), &options.key_prefix),
            expires: options.expires.filter(|ttl| !ttl.is_zero()),
            connect_timeout: options.connect_timeout,
            polling_interval: options
                .polling_interval
                .clamp(MIN_IDLE, Duration::from_secs(5)),
            reader: Mutex::new(Some(reader)),
            signal,
            waiting: Mutex::new(WaitRegistration::default()),
            peer_id: new_peer_id(KIND_WAITER),
            last_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            pid: std::process::id(),
            _checkpointer: checkpointer,
            path,
        });
        let (writer, ops) = std_mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("celeriac-sqlite-results".into())
            .spawn(move || write_loop(writer_conn, thread_shared, ops))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            shared,
            writer,
            closed: AtomicBool::new(false),
            pid: std::process::id(),
        })
    }

    /// The URL as given (a SQLite URL holds no password).
    pub fn masked_url(&self) -> &str {
        &self.shared.masked
    }

    /// The key of a task's row.
    pub fn key_for(&self, task_id: &str) -> String {
        self.shared.key_for(task_id)
    }

    /// Queue a meta document for writing; returns at once. `flush` waits for it.
    pub fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        self.check_open()?;
        self.writer
            .send(WriteOp::Store {
                key: self.shared.key_for(task_id),
                value: meta_json,
            })
            .map_err(|_| Error::Closed(CLOSED))
    }

    /// Wait until every result stored before this call is committed.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        self.flush_inner(timeout)
    }

    fn flush_inner(&self, timeout: Duration) -> Result<()> {
        let (done, written) = std_mpsc::channel();
        self.writer
            .send(WriteOp::Flush(done))
            .map_err(|_| Error::Closed(CLOSED))?;
        match written.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(text)) => Err(Error::Connection(text)),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(Error::Closed(CLOSED)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                let why = self
                    .shared
                    .last_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
                    .map(|text| format!(": {text}"))
                    .unwrap_or_default();
                Err(Error::Connection(format!(
                    "results not written to {} within {timeout:?}{why}",
                    self.shared.masked
                )))
            }
        }
    }

    /// The stored meta of a task, `None` when there is none (PENDING) or it expired.
    pub fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        self.shared.get_key(&self.shared.key_for(task_id))
    }

    /// Delete a task's meta (after any store of it queued before).
    pub fn forget(&self, task_id: &str) -> Result<()> {
        self.check_open()?;
        let (done, result) = std_mpsc::channel();
        self.writer
            .send(WriteOp::Forget(self.shared.key_for(task_id), done))
            .map_err(|_| Error::Closed(CLOSED))?;
        result.recv().map_err(|_| Error::Closed(CLOSED))?
    }

    /// A wait for one task's ready meta. Returns at once.
    pub fn watch(&self, task_id: &str) -> Result<Waiter> {
        self.check_open()?;
        Ok(Waiter {
            shared: Arc::clone(&self.shared),
            key: self.shared.key_for(task_id),
            idle: MIN_IDLE,
        })
    }

    /// Block until the task's meta has a ready state and return it; `Error::Timeout`
    /// at `deadline` (`None`: no limit).
    pub fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let mut waiter = self.watch(task_id)?;
        loop {
            let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if let Some(meta) = waiter.wait_until(until)? {
                return Ok(meta);
            }
            if deadline.is_some() {
                return Err(Error::Timeout("The operation timed out.".to_owned()));
            }
        }
    }

    /// Write what is pending (bounded by the connect timeout) and stop the writer.
    /// Later calls fail with `Error::Closed`; closing twice is a no-op.
    pub fn close(&self) -> Result<()> {
        if self.pid != std::process::id() || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let flushed = self.flush_inner(self.shared.connect_timeout);
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.signal.notify();
        let _ = self.writer.send(WriteOp::Close);
        flushed
    }

    fn check_open(&self) -> Result<()> {
        if self.pid != std::process::id() {
            Err(Error::Closed(FORKED))
        } else if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed(CLOSED))
        } else {
            Ok(())
        }
    }
}

impl Drop for SqliteBackend {
    fn drop(&mut self) {
        if self.pid == std::process::id() {
            // Results queued but not flushed are still written by the writer thread.
            let _ = self.writer.send(WriteOp::Close);
        }
    }
}

/// One wait for one task's ready meta. See `SqliteBackend::watch`.
pub struct Waiter {
    shared: Arc<Shared>,
    key: String,
    /// The next pause when nothing wakes us.
    idle: Duration,
}

impl Waiter {
    /// The ready meta, or `None` when `deadline` passed first.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        if self.shared.pid != std::process::id() {
            return Err(Error::Closed(FORKED));
        }
        loop {
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed(CLOSED));
            }
            // Cheap unless our `peers` row is due for a heartbeat.
            self.shared.register_waiter();
            let seen = self.shared.signal.generation();
            if let Some(meta) = self.shared.get_key(&self.key)? {
                if is_ready(&meta) {
                    return Ok(Some(meta));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if self.shared.signal.wait(seen, self.idle.min(left)) {
                self.idle = MIN_IDLE;
            } else {
                self.idle = (self.idle * 2).min(self.shared.polling_interval);
            }
        }
    }
}

fn write_loop(mut conn: Connection, shared: Arc<Shared>, ops: std_mpsc::Receiver<WriteOp>) {
    let mut notifier = WakeNotifier::new(KIND_WAITER);
    let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
    let mut flushes = Vec::new();
    let mut forgets = Vec::new();
    let mut refused: Option<String> = None;
    let mut last_purge: Option<Instant> = None;
    let mut closing = false;
    while !closing {
        let first = match ops.recv_timeout(PURGE_EVERY) {
            Ok(op) => Some(op),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut next = first;
        while let Some(op) = next.take() {
            match op {
                WriteOp::Store { key, value } => batch.push((key, value)),
                WriteOp::Forget(key, done) => {
                    // Stores queued after a forget go in the next transaction.
                    forgets.push((key, done));
                    break;
                }
                WriteOp::Flush(done) => flushes.push(done),
                WriteOp::Close => {
                    closing = true;
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = ops.try_recv().ok();
            }
        }
        if !batch.is_empty() || !forgets.is_empty() {
            let keys: Vec<String> = forgets.iter().map(|(key, _)| key.clone()).collect();
            let outcome = write_with_retry(&mut conn, &shared, &batch, &keys, closing);
            if let Err(text) = &outcome {
                refused = Some(text.clone());
            }
            for (_, done) in forgets.drain(..) {
                let _ = done.send(
                    outcome
                        .clone()
                        .map_err(|text| Error::Connection(text.clone())),
                );
            }
            if !batch.is_empty() {
                batch.clear();
                notify_local(&shared.path, Topic::Results);
                notifier.notify(&conn);
            }
        }
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            last_purge = Some(Instant::now());
            // A failed purge is retried next time; expired rows are never returned.
            let _ = conn.execute(
                "DELETE FROM results WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                params![unix_now()],
            );
        }
        for done in flushes.drain(..) {
            let _ = done.send(refused.take().map_or(Ok(()), Err));
        }
    }
    // Leave the list of waiters to wake (the row is ours whether or not we waited).
    let _ = conn.execute("DELETE FROM peers WHERE id = ?1", params![shared.peer_id]);
}

/// Write a batch, retrying a locked or failing database for a while. A batch that
/// still fails is dropped with an error for the next flush (a store never waits).
fn write_with_retry(
    conn: &mut Connection,
    shared: &Shared,
    batch: &[(String, Vec<u8>)],
    forgets: &[String],
    closing: bool,
) -> Result<(), String> {
    let attempts = if closing { 3 } else { 20 };
    let mut last = String::new();
    for attempt in 0..attempts {
        match write_batch(conn, shared, batch, forgets) {
            Ok(()) => return Ok(()),
            Err(err) => {
                last = db_error(&shared.path, &err).to_string();
                *shared
                    .last_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(last.clone());
                std::thread::sleep(Duration::from_millis((50u64 << attempt.min(5)).min(1000)));
            }
        }
    }
    Err(format!(
        "{} result(s) could not be written: {last}",
        batch.len() + forgets.len()
    ))
}

fn write_batch(
    conn: &mut Connection,
    shared: &Shared,
    batch: &[(String, Vec<u8>)],
    forgets: &[String],
) -> rusqlite::Result<()> {
    let now = unix_now();
    let expires_at = shared.expires.map(|ttl| now + ttl.as_secs_f64());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO results (key, meta, stored_at, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO UPDATE SET meta = excluded.meta,
                 stored_at = excluded.stored_at, expires_at = excluded.expires_at",
        )?;
        for (key, value) in batch {
            upsert.execute(params![key, JsonBytes(value), now, expires_at])?;
        }
        let mut delete = tx.prepare_cached("DELETE FROM results WHERE key = ?1")?;
        for key in forgets {
            delete.execute(params![key])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_celery() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/r.db", dir.path().display());
        let options = SqliteBackendOptions {
            global_keyprefix: Some("app".into()),
            ..Default::default()
        };
        let store = SqliteBackend::connect(&url, options).unwrap();
        assert_eq!(store.key_for("x"), "app_celery-task-meta-x");
        store.close().unwrap();
    }
}
