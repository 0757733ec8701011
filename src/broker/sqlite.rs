//! The embedded broker: one SQLite file shared by every process on one machine.
//!
//! Layout (schema version [`SCHEMA_VERSION`], kept in `PRAGMA user_version`; the file is
//! marked with `PRAGMA application_id` = [`APPLICATION_ID`]):
//!
//! - `messages`: one row per message, holding kombu's Redis envelope (the same JSON text
//!   the Redis transport writes) plus the queue, the priority and the claim
//!   (`claimed_at`, `owner`). A row with no claim is ready.
//! - `results`: the result store's rows (see `crate::backend::sqlite`).
//! - `peers`: the live consumers, result waiters and fanout subscribers (heartbeat,
//!   wake-up port).
//! - `broadcast`: the fanout log of events and remote control (see [`SqliteFanout`]).
//!
//! Concurrency: WAL journal, `synchronous=NORMAL` (a killed process loses nothing it
//! committed; a power cut may lose the last transactions), every write in a
//! `BEGIN IMMEDIATE` transaction with a busy handler that retries for `busy_timeout`.
//! Each producer and consumer owns one connection on its own thread, never on a tokio
//! worker.
//!
//! - Publishing: `publish` only queues the message; the producer's thread inserts
//!   everything pending in one transaction.
//! - Consuming: the consumer's thread acks (deletes), requeues and claims a batch
//!   (`UPDATE ... RETURNING`) in one transaction, within the prefetch window. It claims
//!   once half the window is free (or the worker holds nothing), and an ack waits for
//!   that transaction at most `ACK_DELAY` (2 ms): about one transaction per two tasks
//!   rather than two per task.
//!   Messages are served by priority, **lower number first** (as on Celery's Redis
//!   transport, but exact: no rounding to steps), then in publishing order.
//! - Waiting: an idle consumer sleeps 1 ms, 2 ms, ... up to `polling_interval` (50 ms)
//!   between cheap checks (`PRAGMA data_version`, then an index probe) and is woken at
//!   once by a publisher in the same process or, across processes, by a one-byte UDP
//!   datagram on the loopback interface (each consumer listens on a port it records in
//!   `peers`; publishers send to the ports they see there).
//! - Visibility timeout: every consumer heartbeats its `peers` row. A claimed message is
//!   put back (marked redelivered) once it was claimed more than `visibility_timeout`
//!   ago **and** its owner has not heartbeated for that long: the claims of a dead
//!   worker come back, those of a live one (a long task, a far ETA) do not.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, ToSql, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::events::{redis_envelope, Broadcast};
use super::outbox::Outbox;
use super::pidbox::{decode, Received};
use super::url::BrokerUrl;
use super::{BadMessage, Fetched, IncomingMessage, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::envelope::{self, IncomingEnvelope};
use crate::protocol::message::OutgoingMessage;
use crate::retry::backoff;

/// The schema this build writes. A file with a higher `user_version` is refused; a
/// lower one is upgraded in place (version 2 added `broadcast`).
pub const SCHEMA_VERSION: i64 = 2;
/// `PRAGMA application_id` of a celeriac database ("Celr").
pub const APPLICATION_ID: i64 = 0x4365_6c72;

const SCHEMA: &str = "
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    published_at REAL NOT NULL,
    claimed_at REAL,
    owner TEXT,
    redelivered INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
);
CREATE INDEX messages_ready ON messages (queue, priority, id) WHERE claimed_at IS NULL;
CREATE INDEX messages_claimed ON messages (claimed_at) WHERE claimed_at IS NOT NULL;
CREATE TABLE results (
    key TEXT PRIMARY KEY,
    meta TEXT NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX results_expiry ON results (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE peers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    pid INTEGER NOT NULL,
    port INTEGER,
    heartbeat REAL NOT NULL
);
";

/// What version 2 added: the fanout log (see [`SqliteFanout`]). AUTOINCREMENT, so that
/// an id is never reused once pruning emptied the table: subscribers' cursors stay
/// valid.
const SCHEMA_V2: &str = "
CREATE TABLE broadcast (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    created REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX broadcast_created ON broadcast (created);
";

/// The tables of the schema (and SQLite's own bookkeeping of AUTOINCREMENT).
const OUR_TABLES: [&str; 4] = ["messages", "results", "peers", "broadcast"];

/// `peers.kind` of a consumer.
pub(crate) const KIND_CONSUMER: &str = "consumer";
/// `peers.kind` of a process waiting for results.
pub(crate) const KIND_WAITER: &str = "waiter";
/// `peers.kind` of a fanout subscriber (events, remote control).
pub(crate) const KIND_SUBSCRIBER: &str = "subscriber";
/// A peer that has not heartbeated for this long is not sent wake-ups.
pub(crate) const WAKE_STALE: Duration = Duration::from_secs(60);
/// How long publishers trust their list of peers to wake.
const PEERS_REFRESH: Duration = Duration::from_secs(1);
/// What a wake-up datagram holds (anything else on the port is ignored).
const WAKE_MAGIC: &[u8] = b"celeriac-wake";
/// First pause of an idle poll; it doubles up to the polling interval.
pub(crate) const MIN_IDLE: Duration = Duration::from_millis(1);

/// Transport options we understand (`broker_transport_options`).
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// A claimed message whose owner stopped heartbeating is put back after this long
    /// (kombu's option name and default: one hour).
    pub visibility_timeout: Duration,
    /// How often a consumer heartbeats and looks for messages to restore
    /// (`unacked_restore_interval`; default: a quarter of the visibility timeout, at
    /// most 10 s).
    pub restore_interval: Duration,
    /// The longest pause between two checks of an idle consumer (`polling_interval`).
    pub polling_interval: Duration,
    /// How long a write waits for another process's write lock (`busy_timeout`).
    pub busy_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            restore_interval: Duration::from_secs(10),
            polling_interval: Duration::from_millis(50),
            busy_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(4),
        }
    }
}

impl SqliteOptions {
    /// Read the options this transport knows from `broker_transport_options`.
    pub fn from_transport(given: &TransportOptions) -> Result<Self> {
        let mut options = Self {
            connect_timeout: given.connect_timeout,
            ..Self::default()
        };
        let mut restore_interval = None;
        for (key, value) in &given.extra {
            let seconds = || -> Result<Duration> {
                value
                    .as_f64()
                    .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "transport option {key:?} must be a non-negative number of seconds, not {value}"
                        ))
                    })
            };
            match key.as_str() {
                "visibility_timeout" => options.visibility_timeout = seconds()?,
                "unacked_restore_interval" => restore_interval = Some(seconds()?),
                "polling_interval" => options.polling_interval = seconds()?,
                "busy_timeout" => options.busy_timeout = seconds()?,
                // The dict is shared with kombu's other transports: ignore the rest.
                _ => {}
            }
        }
        options.restore_interval = restore_interval
            .unwrap_or(options.visibility_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10));
        options.polling_interval = options
            .polling_interval
            .clamp(MIN_IDLE, Duration::from_secs(5));
        Ok(options)
    }
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Opening a database

/// The path as shown in errors: absolute, so that a relative URL is unambiguous.
pub(crate) fn shown(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// An error about the database at `path`, naming it.
pub(crate) fn db_error(path: &Path, err: &rusqlite::Error) -> Error {
    Error::Connection(format!(
        "SQLite database {}: {}",
        shown(path),
        describe(path, err)
    ))
}

fn describe(path: &Path, err: &rusqlite::Error) -> String {
    let dir_hint = || {
        let dir = parent_dir(path);
        let err = match err.sqlite_error_code() {
            Some(ErrorCode::CannotOpen) => "cannot create or open the file".to_owned(),
            _ => err.to_string(),
        };
        format!(
            "{err}; the directory {} must be writable (SQLite keeps -wal and -shm files beside the database)",
            shown(&dir)
        )
    };
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => format!("the file is not a SQLite database ({err})"),
        Some(ErrorCode::DatabaseCorrupt) => format!("the file is corrupt ({err})"),
        Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => {
            dir_hint()
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            format!("{err} (another process held the write lock longer than busy_timeout)")
        }
        _ => err.to_string(),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Retry a locked database for `timeout`, in short sleeps (SQLite's own handler
/// sleeps up to 100 ms at a time, which idles the lock under contention).
fn install_busy_handler(conn: &mut Connection, timeout: Duration) -> rusqlite::Result<()> {
    let mut started: Option<Instant> = None;
    conn.busy_handler(Some(move |attempt: i32| {
        if attempt == 0 {
            started = Some(Instant::now());
        }
        let since = started.get_or_insert_with(Instant::now);
        if since.elapsed() >= timeout {
            return false;
        }
        let pause = 20u64 << attempt.clamp(0, 6) as u32;
        std::thread::sleep(Duration::from_micros(pause.min(1000)));
        true
    }))
}

/// Open (creating if needed) the celeriac database at `path` and check it is one.
///
/// Refuses, naming the file: a missing directory, a directory, a read-only file or
/// directory, a file that is not SQLite or is corrupt, a SQLite file of another
/// application, and a schema newer than this build's. Never rewrites existing data.
pub fn open(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    // Processes that open a fresh file at the same moment race to switch it to WAL
    // and create the schema; SQLite answers some of those steps with "locked" without
    // calling the busy handler, so the whole opening is retried within busy_timeout.
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match open_once(path, busy_timeout) {
            Err(Error::Connection(text))
                if text.contains("locked") && started.elapsed() < busy_timeout =>
            {
                std::thread::sleep(Duration::from_millis((5u64 << attempt.min(5)).min(100)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn open_once(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let fail = |why: String| Error::Connection(format!("SQLite database {}: {why}", shown(path)));
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(fail(format!(
            "the directory {} does not exist",
            shown(&dir)
        )));
    }
    if path.is_dir() {
        return Err(fail("the path is a directory".into()));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, &e))?;
    if conn.is_readonly("main").unwrap_or(false) {
        return Err(fail(
            "the file is read-only; celeriac needs to write to it".into(),
        ));
    }
    install_busy_handler(&mut conn, busy_timeout).map_err(|e| db_error(path, &e))?;
    let read_header = |conn: &Connection| -> rusqlite::Result<(i64, i64)> {
        let app: i64 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        Ok((app, version))
    };
    let (app, version) = read_header(&conn).map_err(|e| db_error(path, &e))?;
    check_header(path, app, version)?;
    if version == 0 {
        check_no_foreign_tables(&conn, path)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(fail(format!(
            "cannot switch to WAL mode (SQLite answered {mode:?}); is the file on a network filesystem?"
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| db_error(path, &e))?;
    if version < SCHEMA_VERSION {
        create_schema(&mut conn, path)?;
    }
    let present: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('messages', 'results', 'peers', 'broadcast')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| db_error(path, &e))?;
    if present != OUR_TABLES.len() as i64 {
        return Err(fail(
            "it is marked as a celeriac database but its tables are missing (damaged?); \
             move it away to start afresh"
                .into(),
        ));
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn check_header(path: &Path, app: i64, version: i64) -> Result<()> {
    let fail = |why: String| Error::Connection(format!("SQLite database {}: {why}", shown(path)));
    if app != 0 && app != APPLICATION_ID {
        return Err(fail(format!(
            "it belongs to another application (application_id {app:#x}); celeriac will not write into it"
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(fail(format!(
            "it was written by a newer celeriac (schema version {version}; this one knows up to \
             {SCHEMA_VERSION}): upgrade celeriac or use another file"
        )));
    }
    if version < 0 {
        return Err(fail(format!("it has an unknown schema version {version}")));
    }
    Ok(())
}

/// A file with no celeriac schema yet must be empty: never write into someone
/// else's database.
fn check_no_foreign_tables(conn: &Connection, path: &Path) -> Result<()> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .map_err(|e| db_error(path, &e))?;
    let names: Vec<String> = stmt
        .query_map([], |row| row.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| db_error(path, &e))?;
    let foreign: Vec<&String> = names
        .iter()
        .filter(|name| !OUR_TABLES.contains(&name.as_str()))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let list: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
    Err(Error::Connection(format!(
        "SQLite database {}: it holds tables of another application ({}); celeriac will not \
         write into it",
        shown(path),
        list.join(", ")
    )))
}

fn create_schema(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_error(path, &e))?;
    // Another process may have created it since we looked.
    let app: i64 = tx
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    check_header(path, app, version)?;
    if version == 0 {
        check_no_foreign_tables(&tx, path)?;
        tx.execute_batch(SCHEMA).map_err(|e| db_error(path, &e))?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(|e| db_error(path, &e))?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_V2)
            .map_err(|e| db_error(path, &e))?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| db_error(path, &e))?;
    }
    tx.commit().map_err(|e| db_error(path, &e))
}

// ---------------------------------------------------------------------------------
// Checkpoints off the hot path

/// WAL pages after which a writer asks for a checkpoint (SQLite's own default: 1000).
const CHECKPOINT_PAGES: i32 = 2000;

/// Checkpoints the WAL of one file on its own thread, so that no writer waits for the
/// fsyncs of a checkpoint (with `synchronous=NORMAL` they are the only ones). One per
/// file per process, shared by its producers, consumers and result stores; the thread
/// ends when the last of them is dropped.
pub(crate) struct Checkpointer {
    wanted: Arc<Signal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wanted.notify();
        // Wait for the thread to close its connection: a prefork supervisor forks right
        // after its probe is dropped, and SQLite's in-process lock state copied by fork()
        // mid-checkpoint (or mid-close) would leave the children's connections locked.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Checkpointers = Vec<(u32, PathBuf, Weak<Checkpointer>)>;

/// This process's checkpointer of the file at `path`, started if needed. `None` when
/// it cannot start: writers then keep SQLite's automatic checkpoints.
pub(crate) fn checkpointer(path: &Path, busy_timeout: Duration) -> Option<Arc<Checkpointer>> {
    static ALL: OnceLock<Mutex<Checkpointers>> = OnceLock::new();
    let pid = std::process::id();
    let key = key_path(path);
    let mut all = ALL
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Entries of a parent process (after fork) have no thread here: never reuse them.
    all.retain(|(owner, _, weak)| *owner == pid && weak.strong_count() > 0);
    if let Some(found) = all
        .iter()
        .find(|(_, their, _)| *their == key)
        .and_then(|(_, _, weak)| weak.upgrade())
    {
        return Some(found);
    }
    let conn = open(path, busy_timeout).ok()?;
    let wanted = Arc::new(Signal::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_wanted, thread_stop) = (wanted.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("celeriac-sqlite-ckpt".into())
        .spawn(move || {
            let mut seen = thread_wanted.generation();
            while !thread_stop.load(Ordering::Acquire) {
                if !thread_wanted.wait(seen, Duration::from_secs(30)) {
                    continue;
                }
                seen = thread_wanted.generation();
                if thread_stop.load(Ordering::Acquire) {
                    break;
                }
                // PASSIVE copies most of the log without blocking anyone; under a
                // steady stream of commits it never catches up, so the log would grow
                // without end (every append then allocates new file blocks). RESTART
                // then holds writers back (their busy handler waits) for the last few
                // frames and one sync, so that the next commit starts the log over.
                // A failure is retried when the next commit asks again.
                use rusqlite::wal::CheckpointMode;
                let _ = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE);
                let _ = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::RESTART);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .ok()?;
    let made = Arc::new(Checkpointer {
        wanted,
        stop,
        thread: Some(thread),
    });
    all.push((pid, key, Arc::downgrade(&made)));
    Some(made)
}

/// Have `conn`'s commits ask `checkpointer` for a checkpoint instead of running one.
fn hand_checkpoints_to(conn: &mut Connection, checkpointer: &Checkpointer) -> rusqlite::Result<()> {
    let wanted = checkpointer.wanted.clone();
    // Replaces SQLite's automatic checkpoint (itself a WAL hook).
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            wanted.notify();
        }
        Ok(())
    }))
}

/// Open a connection for a busy writer: its checkpoints run on this process's
/// checkpointer thread for the file.
pub(crate) fn open_writer(
    path: &Path,
    busy_timeout: Duration,
) -> Result<(Connection, Option<Arc<Checkpointer>>)> {
    let mut conn = open(path, busy_timeout)?;
    let checkpointer = checkpointer(path, busy_timeout);
    if let Some(checkpointer) = &checkpointer {
        hand_checkpoints_to(&mut conn, checkpointer).map_err(|e| db_error(path, &e))?;
    }
    Ok((conn, checkpointer))
}

/// Open on tokio's blocking pool (never on a runtime worker).
async fn open_async(
    path: PathBuf,
    busy_timeout: Duration,
) -> Result<(Connection, Option<Arc<Checkpointer>>)> {
    let shown_path = shown(&path);
    tokio::task::spawn_blocking(move || open_writer(&path, busy_timeout))
        .await
        .map_err(|err| {
            Error::Connection(format!(
                "SQLite database {shown_path}: the opening thread failed: {err}"
            ))
        })?
}

fn sqlite_path(url: &BrokerUrl) -> Result<PathBuf> {
    url.sqlite_path
        .clone()
        .ok_or_else(|| Error::InvalidUrl(format!("{:?} is not a SQLite URL", url.masked())))
}

/// JSON bytes, stored as TEXT when they are UTF-8 (so that the `sqlite3` shell shows
/// them), as a BLOB otherwise.
pub(crate) struct JsonBytes<'a>(pub &'a [u8]);

impl ToSql for JsonBytes<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match std::str::from_utf8(self.0) {
            Ok(_) => ValueRef::Text(self.0),
            Err(_) => ValueRef::Blob(self.0),
        }))
    }
}

/// A TEXT or BLOB column's bytes.
pub(crate) fn column_bytes(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Vec<u8>> {
    match row.get_ref(index)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => Ok(bytes.to_vec()),
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            index,
            other.data_type(),
            "expected JSON text".into(),
        )),
    }
}

// ---------------------------------------------------------------------------------
// Wake-ups: in this process (a condition variable) and across processes (UDP)

/// A generation counter that waiting threads watch.
#[derive(Default)]
pub(crate) struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    pub(crate) fn generation(&self) -> u64 {
        *self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn notify(&self) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation = generation.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Wait until the generation is no longer `seen`, at most `timeout`. True when
    /// woken.
    pub(crate) fn wait(&self, seen: u64, timeout: Duration) -> bool {
        let guard = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |generation| *generation == seen)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard != seen
    }
}

/// What changed in a database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topic {
    Messages,
    Results,
    Broadcast,
}

type Subscribers = Vec<(PathBuf, Topic, Weak<Signal>)>;

fn local_subscribers() -> &'static Mutex<Subscribers> {
    static SUBSCRIBERS: OnceLock<Mutex<Subscribers>> = OnceLock::new();
    SUBSCRIBERS.get_or_init(|| Mutex::new(Vec::new()))
}

fn key_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Have `signal` notified when this process changes `topic` in the file at `path`.
pub(crate) fn subscribe_local(path: &Path, topic: Topic, signal: &Arc<Signal>) {
    let mut subscribers = local_subscribers()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    subscribers.retain(|(_, _, weak)| weak.strong_count() > 0);
    subscribers.push((key_path(path), topic, Arc::downgrade(signal)));
}

pub(crate) fn notify_local(path: &Path, topic: Topic) {
    let path = key_path(path);
    let subscribers = local_subscribers()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (their_path, their_topic, weak) in subscribers.iter() {
        if *their_topic == topic && *their_path == path {
            if let Some(signal) = weak.upgrade() {
                signal.notify();
            }
        }
    }
}

/// A loopback UDP port whose datagrams notify a [`Signal`]; its thread ends soon
/// after the listener is dropped.
pub(crate) struct WakeListener {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl WakeListener {
    /// `None` when no loopback socket can be had: waiting then relies on polling.
    pub(crate) fn start(signal: Arc<Signal>) -> Option<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let port = socket.local_addr().ok()?.port();
        socket.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("celeriac-sqlite-wake".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                while !stopped.load(Ordering::Acquire) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        if from.ip().is_loopback() && buf[..n] == *WAKE_MAGIC {
                            signal.notify();
                        }
                    }
                }
            })
            .ok()?;
        Some(Self { port, stop })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the thread so that it sees the flag now rather than within a second.
        if let Ok(socket) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) {
            let _ = socket.send_to(b"stop", (Ipv4Addr::LOCALHOST, self.port));
        }
    }
}

/// Sends wake-ups to the peers of one kind recorded in the database.
pub(crate) struct WakeNotifier {
    socket: Option<UdpSocket>,
    kind: &'static str,
    ports: Vec<u16>,
    refreshed: Option<Instant>,
}

impl WakeNotifier {
    pub(crate) fn new(kind: &'static str) -> Self {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .ok()
            .filter(|socket| socket.set_nonblocking(true).is_ok());
        Self {
            socket,
            kind,
            ports: Vec::new(),
            refreshed: None,
        }
    }

    /// Wake every live peer of our kind (best effort: they poll anyway).
    pub(crate) fn notify(&mut self, conn: &Connection) {
        let Some(socket) = &self.socket else { return };
        if self
            .refreshed
            .is_none_or(|at| at.elapsed() >= PEERS_REFRESH)
        {
            self.refreshed = Some(Instant::now());
            if let Ok(ports) = live_ports(conn, self.kind) {
                self.ports = ports;
            }
        }
        for port in &self.ports {
            let _ = socket.send_to(WAKE_MAGIC, SocketAddr::from((Ipv4Addr::LOCALHOST, *port)));
        }
    }
}

fn live_ports(conn: &Connection, kind: &str) -> rusqlite::Result<Vec<u16>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT port FROM peers WHERE kind = ?1 AND port IS NOT NULL AND heartbeat >= ?2",
    )?;
    let since = unix_now() - WAKE_STALE.as_secs_f64();
    let ports = stmt
        .query_map(params![kind, since], |row| row.get::<_, i64>(0))?
        .filter_map(|port| port.ok().and_then(|p| u16::try_from(p).ok()))
        .collect();
    Ok(ports)
}

/// Record (or refresh) a peer's heartbeat and wake-up port.
pub(crate) fn heartbeat(
    conn: &Connection,
    id: &str,
    kind: &str,
    port: Option<u16>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO peers (id, kind, pid, port, heartbeat) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, port = excluded.port",
    )?
    .execute(params![id, kind, std::process::id(), port, unix_now()])?;
    Ok(())
}

pub(crate) fn new_peer_id(kind: &str) -> String {
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

// ---------------------------------------------------------------------------------
// Producer

/// Publishes task messages; cheap to call from any thread.
pub struct SqliteProducer {
    tx: std_mpsc::Sender<OutgoingMessage>,
    state: Arc<Outbox>,
    masked: String,
    _checkpointer: Option<Arc<Checkpointer>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SqliteProducer {
    /// Ends the writer thread and waits for it: it writes what is queued and closes its
    /// connection now, not while a prefork supervisor forks (see `Checkpointer`).
    fn drop(&mut self) {
        self.tx = std_mpsc::channel().0; // the writer's `recv` fails once this is gone
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

const MAX_PUBLISH_BATCH: usize = 4096;

impl SqliteProducer {
    /// Open (failing fast with a clear error) and start the writer thread.
    pub async fn connect(url: &BrokerUrl, options: SqliteOptions) -> Result<Self> {
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let (tx, rx) = std_mpsc::channel();
        let state = Arc::new(Outbox::default());
        let thread_state = state.clone();
        let writer = std::thread::Builder::new()
            .name("celeriac-sqlite-pub".into())
            .spawn(move || publish_loop(conn, path, rx, thread_state))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
            _checkpointer: checkpointer,
            writer: Some(writer),
        })
    }

    /// Hand a message to the writer thread; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        self.state.admit()?;
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the producer"))
    }

    /// Wait until every message published before this call is committed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.state
            .flush(timeout, &self.masked, "still writing")
            .await
    }

    pub fn close(&self) {
        self.state.close();
    }
}

/// A message ready for its row.
struct Row {
    queue: String,
    priority: i64,
    payload: Vec<u8>,
}

fn publish_loop(
    mut conn: Connection,
    path: PathBuf,
    rx: std_mpsc::Receiver<OutgoingMessage>,
    state: Arc<Outbox>,
) {
    let mut notifier = WakeNotifier::new(KIND_CONSUMER);
    let mut rows = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        let mut count = 1u64;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            // Headers and body come from our own encoder: this cannot fail in practice,
            // and a message we cannot frame is better dropped than wedged.
            if let Ok(payload) = envelope::encode(&message, "") {
                rows.push(Row {
                    queue: message.routing_key,
                    priority: i64::from(message.properties.priority.unwrap_or(0)),
                    payload,
                });
            }
            if rows.len() < MAX_PUBLISH_BATCH {
                next = rx.try_recv().ok();
                count += u64::from(next.is_some());
            }
        }
        let mut attempt = 0;
        loop {
            match insert_rows(&mut conn, &rows) {
                Ok(()) => break,
                Err(err) => {
                    state.note_error(db_error(&path, &err).to_string());
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
            }
        }
        rows.clear();
        state.written(count);
        notify_local(&path, Topic::Messages);
        notifier.notify(&conn);
    }
}

fn insert_rows(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (queue, priority, published_at, payload) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let now = unix_now();
        for row in rows {
            insert.execute(params![
                row.queue,
                row.priority,
                now,
                JsonBytes(&row.payload)
            ])?;
        }
    }
    tx.commit()
}

// ---------------------------------------------------------------------------------
// Consumer

enum Command {
    Ack(Vec<String>),
    Requeue(String),
    /// Grow (or shrink) the window by this many slots (messages held for an ETA).
    ExtendWindow(i64),
    RestoreAll(oneshot::Sender<Result<usize>>),
    /// Claim from one more queue; false: claimed from already.
    AddQueue(String, oneshot::Sender<bool>),
    /// Stop claiming from a queue; false: it was not claimed from.
    CancelQueue(String, oneshot::Sender<bool>),
}

/// Takes messages from queues within a prefetch window; acks them in batches.
pub struct SqliteConsumer {
    commands: std_mpsc::Sender<Command>,
    signal: Arc<Signal>,
    closed: Arc<AtomicBool>,
    masked: String,
    _listener: Option<WakeListener>,
    _checkpointer: Option<Arc<Checkpointer>>,
}

const MAX_FETCH_BATCH: usize = 512;
/// Longest an ack waits to be written with the next claim.
const ACK_DELAY: Duration = Duration::from_millis(2);

impl SqliteConsumer {
    /// Open and start claiming into `deliveries`. `prefetch_count` 0 = unbounded.
    pub async fn connect(
        url: &BrokerUrl,
        queues: &[String],
        prefetch_count: usize,
        options: SqliteOptions,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) -> Result<Self> {
        if queues.is_empty() {
            return Err(Error::Connection("no queue to consume from".into()));
        }
        if let Some(bad) = queues.iter().find(|queue| queue.contains('\0')) {
            return Err(Error::Config(format!(
                "queue name {bad:?} holds a NUL character"
            )));
        }
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let signal = Arc::new(Signal::default());
        let listener = WakeListener::start(signal.clone());
        let owner = new_peer_id(KIND_CONSUMER);
        let port = listener.as_ref().map(WakeListener::port);
        let conn = {
            let (owner, path) = (owner.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                heartbeat(&conn, &owner, KIND_CONSUMER, port)
                    .map(|()| conn)
                    .map_err(|e| db_error(&path, &e))
            })
            .await
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))??
        };
        subscribe_local(&path, Topic::Messages, &signal);
        let mut unique: Vec<String> = Vec::new();
        for queue in queues {
            if !unique.contains(queue) {
                unique.push(queue.clone());
            }
        }
        let closed = Arc::new(AtomicBool::new(false));
        let (commands, rx) = std_mpsc::channel();
        let fetcher = Fetcher {
            claim_sql: claim_sql(&unique),
            probe_sql: probe_sql(&unique),
            queues: unique,
            conn,
            path,
            owner,
            port,
            prefetch: prefetch_count,
            window_extra: 0,
            options,
            in_flight: HashSet::new(),
            pending_acks: Vec::new(),
            acks_since: None,
            pending_requeues: Vec::new(),
            deliveries,
            signal: signal.clone(),
            closed: closed.clone(),
            drained: false,
            data_version: None,
            failures: 0,
            notifier: WakeNotifier::new(KIND_CONSUMER),
            masked: url.masked().to_owned(),
        };
        std::thread::Builder::new()
            .name("celeriac-sqlite-consume".into())
            .spawn(move || fetcher.run(rx))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            commands,
            signal,
            closed,
            masked: url.masked().to_owned(),
            _listener: listener,
            _checkpointer: checkpointer,
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::Closed("the consumer"))?;
        self.signal.notify();
        Ok(())
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        self.send(Command::Ack(tags))
    }

    /// Grow (`delta > 0`) or shrink the prefetch window, one slot per message the
    /// worker holds for its ETA or rate limit.
    pub fn extend_window(&self, delta: i64) -> Result<()> {
        self.send(Command::ExtendWindow(delta))
    }

    /// `requeue=false` drops the message (kombu: same as ack); `true` puts it back,
    /// marked redelivered, in its place in the queue.
    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        if requeue {
            self.send(Command::Requeue(tag))
        } else {
            self.send(Command::Ack(vec![tag]))
        }
    }

    /// Stop claiming and put every claimed, unacked message back, marked redelivered.
    pub async fn restore_unacked(&self) -> Result<usize> {
        self.closed.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        self.send(Command::RestoreAll(tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))?
    }

    /// Claim from `queue` too; false when it is claimed from already.
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        if queue.contains('\0') {
            return Err(Error::Config(format!(
                "queue name {queue:?} holds a NUL character"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.send(Command::AddQueue(queue.to_owned(), tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop claiming from `queue`; false when it was not claimed from. Messages
    /// already claimed from it are still handed over and acked.
    pub async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::CancelQueue(queue.to_owned(), tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop claiming; acks are still written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.signal.notify();
    }

    pub fn masked_url(&self) -> &str {
        &self.masked
    }
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        self.close();
    }
}

/// A queue name as an SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `UPDATE ... RETURNING` claiming up to ?3 ready messages of `queues` for owner ?2 at
/// time ?1, lowest priority number first, then oldest.
///
/// Written so that SQLite never prepares it again (with the statement cache, a
/// re-prepare took a third of a claim): the queue names are literals (a `queue = ?`
/// parameter compared with the partial index makes every new binding expire the
/// statement), and the limit is `?3 + 0` (SQLite reads a bare `LIMIT ?` while
/// preparing and prepares again whenever its value changes).
fn claim_sql(queues: &[String]) -> String {
    let pick = |queue: &str| {
        format!(
            "SELECT id, priority FROM messages WHERE queue = {} AND claimed_at IS NULL \
             ORDER BY priority, id LIMIT ?3 + 0",
            sql_literal(queue)
        )
    };
    let candidates = if let [queue] = queues {
        format!(
            "SELECT id FROM messages WHERE queue = {} AND claimed_at IS NULL \
             ORDER BY priority, id LIMIT ?3 + 0",
            sql_literal(queue)
        )
    } else {
        let union: Vec<String> = queues
            .iter()
            .map(|queue| format!("SELECT id, priority FROM ({})", pick(queue)))
            .collect();
        format!(
            "SELECT id FROM ({}) ORDER BY priority, id LIMIT ?3 + 0",
            union.join(" UNION ALL ")
        )
    };
    format!(
        "UPDATE messages SET claimed_at = ?1, owner = ?2 WHERE id IN ({candidates}) \
         RETURNING id, queue, priority, redelivered, payload"
    )
}

/// Whether any of `queues` has a ready message (a read, no write lock).
fn probe_sql(queues: &[String]) -> String {
    let parts: Vec<String> = queues
        .iter()
        .map(|queue| {
            format!(
                "EXISTS (SELECT 1 FROM messages WHERE queue = {} AND claimed_at IS NULL)",
                sql_literal(queue)
            )
        })
        .collect();
    format!("SELECT {}", parts.join(" OR "))
}

struct Claimed {
    id: i64,
    queue: String,
    priority: i64,
    redelivered: bool,
    /// The envelope's bytes, or why the column holds none.
    payload: std::result::Result<Vec<u8>, String>,
}

struct Fetcher {
    conn: Connection,
    path: PathBuf,
    masked: String,
    claim_sql: String,
    probe_sql: String,
    /// The queues claimed from (`claim_sql` and `probe_sql` are built from them).
    queues: Vec<String>,
    owner: String,
    port: Option<u16>,
    prefetch: usize,
    /// Slots added to `prefetch` for messages the worker holds (ETA, rate limits).
    window_extra: i64,
    options: SqliteOptions,
    /// Claimed by us, not yet acked (the prefetch window).
    in_flight: HashSet<i64>,
    /// Acks and requeues not yet written (kept across a failed transaction).
    pending_acks: Vec<i64>,
    /// When the oldest unwritten ack came (acks wait for the next claim, at most
    /// [`ACK_DELAY`]).
    acks_since: Option<Instant>,
    pending_requeues: Vec<i64>,
    deliveries: mpsc::UnboundedSender<Fetched>,
    signal: Arc<Signal>,
    closed: Arc<AtomicBool>,
    /// The last claim found fewer messages than it wanted.
    drained: bool,
    /// `PRAGMA data_version` when the queues were last found drained.
    data_version: Option<i64>,
    failures: u32,
    notifier: WakeNotifier,
}

impl Fetcher {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        let mut idle = MIN_IDLE;
        let maintenance_every = self.options.restore_interval;
        let mut next_maintenance = Instant::now();
        let mut next_sweep = Instant::now();
        let mut retry_at: Option<Instant> = None;
        loop {
            let seen = self.signal.generation();
            let mut restores = Vec::new();
            let mut disconnected = false;
            loop {
                match rx.try_recv() {
                    Ok(Command::Ack(tags)) => {
                        if self.pending_acks.is_empty() {
                            self.acks_since = Some(Instant::now());
                        }
                        self.pending_acks.extend(parse_tags(&tags));
                    }
                    Ok(Command::Requeue(tag)) => self.pending_requeues.extend(parse_tags(&[tag])),
                    Ok(Command::ExtendWindow(delta)) => {
                        self.window_extra = self.window_extra.saturating_add(delta);
                    }
                    Ok(Command::RestoreAll(reply)) => restores.push(reply),
                    Ok(Command::AddQueue(queue, reply)) => {
                        let added = !self.queues.contains(&queue);
                        if added {
                            self.queues.push(queue);
                            self.queues_changed();
                        }
                        let _ = reply.send(added);
                    }
                    Ok(Command::CancelQueue(queue, reply)) => {
                        let before = self.queues.len();
                        self.queues.retain(|q| *q != queue);
                        let removed = self.queues.len() != before;
                        if removed {
                            self.queues_changed();
                        }
                        let _ = reply.send(removed);
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !restores.is_empty() {
                self.closed.store(true, Ordering::Release);
            }
            let now = Instant::now();
            let may_write = retry_at.is_none_or(|at| now >= at);
            let mut worked = false;
            if may_write {
                let credits = self.credits(disconnected);
                let claim = credits > 0
                    && !self.queues.is_empty()
                    && credits >= self.refill_at()
                    && self.may_have_work();
                let stopping = disconnected || self.closed.load(Ordering::Acquire);
                let acks_due = !self.pending_acks.is_empty()
                    && (claim
                        || stopping
                        || self.acks_since.is_some_and(|at| at.elapsed() >= ACK_DELAY));
                if claim || acks_due || !self.pending_requeues.is_empty() {
                    match self.transact(if claim { credits } else { 0 }) {
                        Ok((claimed, drained_at)) => {
                            retry_at = None;
                            self.acks_since = None;
                            self.failures = 0;
                            worked = !claimed.is_empty();
                            if let Some(version) = drained_at {
                                self.drained = true;
                                self.data_version = Some(version);
                            }
                            self.deliver(claimed);
                        }
                        Err(err) => {
                            self.report(&err);
                            retry_at = Some(Instant::now() + backoff(self.failures));
                            self.failures += 1;
                        }
                    }
                }
            }
            for reply in restores {
                let _ = reply.send(self.restore_all());
            }
            if Instant::now() >= next_maintenance {
                // Errors here are retried next round; claims report lost databases.
                let _ = self.maintain();
                next_maintenance = Instant::now() + maintenance_every;
            }
            if Instant::now() >= next_sweep {
                if let Ok(restored) = restore_claims_of_dead_processes(&self.conn) {
                    if restored > 0 {
                        self.drained = false;
                        self.wake_others();
                    }
                }
                next_sweep = Instant::now() + DEAD_PROCESS_SWEEP;
            }
            if disconnected {
                self.finish();
                return;
            }
            if worked {
                idle = MIN_IDLE;
                continue;
            }
            let mut pause = idle
                .min(next_maintenance.saturating_duration_since(Instant::now()))
                .min(next_sweep.saturating_duration_since(Instant::now()));
            if let Some(since) = self.acks_since {
                pause = pause.min((since + ACK_DELAY).saturating_duration_since(Instant::now()));
            }
            if let Some(at) = retry_at {
                pause = pause.max(at.saturating_duration_since(Instant::now()));
            }
            if self.signal.wait(seen, pause) {
                idle = MIN_IDLE;
            } else {
                idle = (idle * 2).min(self.options.polling_interval);
            }
        }
    }

    /// Rebuild the statements after `queues` changed (none are built for no queue:
    /// nothing is claimed then).
    fn queues_changed(&mut self) {
        if !self.queues.is_empty() {
            self.claim_sql = claim_sql(&self.queues);
            self.probe_sql = probe_sql(&self.queues);
        }
        self.drained = false;
    }

    /// How many messages we may claim now: acked (and requeued) messages leave the
    /// window at once, even before their ack is written (it is written with the claim).
    fn credits(&self, disconnected: bool) -> usize {
        if disconnected || self.closed.load(Ordering::Acquire) {
            return 0;
        }
        if self.prefetch == 0 {
            return MAX_FETCH_BATCH;
        }
        self.window()
            .saturating_sub(self.held())
            .min(MAX_FETCH_BATCH)
    }

    fn window(&self) -> usize {
        usize::try_from((self.prefetch as i64).saturating_add(self.window_extra)).unwrap_or(0)
    }

    /// Claimed messages not yet acked or requeued by the worker.
    fn held(&self) -> usize {
        self.in_flight
            .len()
            .saturating_sub(self.pending_acks.len() + self.pending_requeues.len())
    }

    /// The fewest credits worth a claim: half the prefetch window while the worker still
    /// holds messages (a claim per two tasks rather than per task: half the transactions),
    /// one when it holds none. Half of the window as given, not as widened: each message
    /// held for its ETA widens it by the slot it takes, so half the widened window might
    /// never come free while those messages wait.
    fn refill_at(&self) -> usize {
        if self.prefetch == 0 || self.held() == 0 {
            return 1;
        }
        self.prefetch.div_ceil(2).max(1)
    }

    /// False only when the queues were drained and nothing ready appeared since.
    fn may_have_work(&mut self) -> bool {
        if !self.drained {
            return true;
        }
        let Ok(version) = self.data_version() else {
            return true;
        };
        if self.data_version == Some(version) {
            return false;
        }
        self.data_version = Some(version);
        match self.probe() {
            Ok(true) | Err(_) => {
                self.drained = false;
                true
            }
            Ok(false) => false,
        }
    }

    fn data_version(&self) -> rusqlite::Result<i64> {
        self.conn
            .pragma_query_value(None, "data_version", |row| row.get(0))
    }

    fn probe(&self) -> rusqlite::Result<bool> {
        self.conn
            .prepare_cached(&self.probe_sql)?
            .query_row([], |row| row.get(0))
    }

    /// One transaction: write pending acks and requeues, then claim `credits`. When
    /// fewer were there, also returns `PRAGMA data_version` as of the claim (read under
    /// the write lock, so any later publish changes it).
    fn transact(&mut self, credits: usize) -> rusqlite::Result<(Vec<Claimed>, Option<i64>)> {
        let now = unix_now();
        let (acks, requeues, owner) = (&self.pending_acks, &self.pending_requeues, &self.owner);
        let claim_sql = &self.claim_sql;
        let (mut claimed, drained_at) = immediate(&self.conn, |tx| {
            if !acks.is_empty() {
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id = ?1 AND owner = ?2")?;
                for id in acks {
                    delete.execute(params![id, owner])?;
                }
            }
            if !requeues.is_empty() {
                let mut requeue = tx.prepare_cached(
                    "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1 \
                     WHERE id = ?1 AND owner = ?2",
                )?;
                for id in requeues {
                    requeue.execute(params![id, owner])?;
                }
            }
            let mut claimed = Vec::new();
            if credits > 0 {
                let mut claim = tx.prepare_cached(claim_sql)?;
                let rows = claim.query_map(params![now, owner, credits as i64], |row| {
                    Ok(Claimed {
                        id: row.get(0)?,
                        queue: row.get(1)?,
                        // Another program may have written any type in any column
                        // (the table is not STRICT): such a row must not stop the claims.
                        priority: lenient_int(row, 2)?,
                        redelivered: lenient_int(row, 3)? != 0,
                        payload: column_bytes(row, 4).map_err(|err| err.to_string()),
                    })
                })?;
                for row in rows {
                    claimed.push(row?);
                }
            }
            let drained_at = if credits > 0 && claimed.len() < credits {
                Some(tx.pragma_query_value(None, "data_version", |row| row.get(0))?)
            } else {
                None
            };
            Ok((claimed, drained_at))
        })?;
        let requeued = !self.pending_requeues.is_empty();
        for id in self.pending_acks.drain(..) {
            self.in_flight.remove(&id);
        }
        for id in self.pending_requeues.drain(..) {
            self.in_flight.remove(&id);
        }
        if requeued {
            self.drained = false;
            self.wake_others();
        }
        claimed.sort_unstable_by_key(|c| (c.priority, c.id));
        Ok((claimed, drained_at))
    }

    fn deliver(&mut self, claimed: Vec<Claimed>) {
        for row in claimed {
            self.in_flight.insert(row.id);
            // The receiver goes away with the consumer; what is claimed then stays
            // claimed until restored.
            let _ = self.deliveries.send(into_fetched(row));
        }
    }

    fn report(&self, err: &rusqlite::Error) {
        if self.failures == 0 {
            let text = format!("{}: {}", self.masked, describe(&self.path, err));
            let _ = self.deliveries.send(Fetched::Error(text));
        }
    }

    fn wake_others(&mut self) {
        notify_local(&self.path, Topic::Messages);
        self.notifier.notify(&self.conn);
    }

    /// Put back every message we claimed and did not ack.
    fn restore_all(&mut self) -> Result<usize> {
        // Acked ones whose ack is not written yet are not put back.
        let ids: Vec<i64> = self
            .in_flight
            .iter()
            .copied()
            .filter(|id| !self.pending_acks.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut attempt = 0;
        let restored = loop {
            match self.put_back(&ids) {
                Ok(count) => break count,
                Err(err) if attempt < 3 => {
                    attempt += 1;
                    std::thread::sleep(backoff(attempt));
                    let _ = err;
                }
                Err(err) => return Err(db_error(&self.path, &err)),
            }
        };
        self.in_flight.clear();
        self.wake_others();
        Ok(restored)
    }

    fn put_back(&mut self, ids: &[i64]) -> rusqlite::Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut restored = 0;
        {
            let mut requeue = tx.prepare_cached(
                "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1 \
                 WHERE id = ?1 AND owner = ?2",
            )?;
            for id in ids {
                restored += requeue.execute(params![id, self.owner])?;
            }
        }
        tx.commit()?;
        Ok(restored)
    }

    /// Heartbeat, and put back the claims of consumers that stopped heartbeating.
    fn maintain(&mut self) -> rusqlite::Result<usize> {
        heartbeat(&self.conn, &self.owner, KIND_CONSUMER, self.port)?;
        let restored = restore_dead_claims(&self.conn, self.options.visibility_timeout)?;
        if restored > 0 {
            self.drained = false;
            self.wake_others();
        }
        Ok(restored)
    }

    /// The consumer was dropped: write the last acks and leave the peer list (what is
    /// still claimed comes back after the visibility timeout).
    fn finish(&mut self) {
        for attempt in 0..3 {
            if self.pending_acks.is_empty() && self.pending_requeues.is_empty() {
                break;
            }
            if self.transact(0).is_ok() {
                break;
            }
            std::thread::sleep(backoff(attempt));
        }
        let _ = self
            .conn
            .execute("DELETE FROM peers WHERE id = ?1", params![self.owner]);
    }
}

/// `BEGIN IMMEDIATE`, `body`, `COMMIT`, with cached statements (rusqlite's
/// `Transaction` parses both anew each time: a few percent of a busy consumer); rolled
/// back when anything fails.
fn immediate<T>(
    conn: &Connection,
    body: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let outcome = body(conn).and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if outcome.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    outcome
}

/// Put back, marked redelivered, every message claimed more than `visibility_timeout`
/// ago by a consumer that has not heartbeated for as long. Returns how many.
pub fn restore_dead_claims(
    conn: &Connection,
    visibility_timeout: Duration,
) -> rusqlite::Result<usize> {
    let now = unix_now();
    let cutoff = now - visibility_timeout.as_secs_f64();
    let restored = conn
        .prepare_cached(
            "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1
             WHERE claimed_at IS NOT NULL AND claimed_at < ?1
               AND NOT EXISTS (SELECT 1 FROM peers WHERE peers.id = messages.owner
                                                   AND peers.heartbeat >= ?1)",
        )?
        .execute(params![cutoff])?;
    // Peers silent for long are gone for good.
    let forget = now - (2.0 * visibility_timeout.as_secs_f64()).max(3600.0);
    conn.prepare_cached("DELETE FROM peers WHERE heartbeat < ?1")?
        .execute(params![forget])?;
    Ok(restored)
}

/// How often a consumer looks for consumers whose process is gone.
const DEAD_PROCESS_SWEEP: Duration = Duration::from_secs(2);

/// Put back, marked redelivered, the claims of consumers whose process is gone (killed
/// with SIGKILL, say), and forget those peers. The file is used on one machine, so a
/// peer's pid names a process here: its claims come back at once instead of after the
/// visibility timeout. A pid that was reused only delays this to the visibility timeout.
pub fn restore_claims_of_dead_processes(conn: &Connection) -> rusqlite::Result<usize> {
    let peers: Vec<(String, i64)> = conn
        .prepare_cached("SELECT id, pid FROM peers WHERE kind = ?1")?
        .query_map(params![KIND_CONSUMER], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut restored = 0;
    for (id, pid) in peers {
        if process_alive(pid) {
            continue;
        }
        restored += immediate(conn, |conn| {
            let count = conn
                .prepare_cached(
                    "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1
                     WHERE owner = ?1",
                )?
                .execute(params![id])?;
            conn.prepare_cached("DELETE FROM peers WHERE id = ?1")?
                .execute(params![id])?;
            Ok(count)
        })?;
    }
    Ok(restored)
}

/// Whether `pid` names a live process on this machine (a pid that cannot be one is
/// taken as alive: only a certain death puts claims back early).
fn process_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn parse_tags(tags: &[String]) -> impl Iterator<Item = i64> + '_ {
    tags.iter().filter_map(|tag| tag.parse::<i64>().ok())
}

/// The transport-neutral form; the body is base64-decoded here, off the GIL.
fn into_fetched(row: Claimed) -> Fetched {
    let tag = row.id.to_string();
    let envelope = row
        .payload
        .and_then(|payload| IncomingEnvelope::parse(&payload).map_err(|err| err.to_string()));
    Fetched::Message(match envelope {
        Ok(envelope) => {
            IncomingMessage::from_envelope(envelope, tag, row.queue, row.priority, row.redelivered)
        }
        Err(reason) => Err(BadMessage {
            delivery_tag: tag,
            queue: row.queue,
            reason,
        }),
    })
}

/// An INTEGER column that may hold another type: a float is truncated, anything else
/// is 0.
fn lenient_int(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<i64> {
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(n) => n,
        ValueRef::Real(f) => f as i64,
        ValueRef::Null | ValueRef::Text(_) | ValueRef::Blob(_) => 0,
    })
}

// ---------------------------------------------------------------------------------
// Fanout: broadcasts that every subscriber sees (events, remote control)

/// Broadcast rows older than this are pruned: a subscriber further behind loses them
/// (events and remote control are best effort, as on Redis PUB/SUB).
pub const BROADCAST_RETENTION: Duration = Duration::from_secs(60);
/// How often a publishing fanout prunes old rows.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often a subscribing fanout refreshes its `peers` row (its wake-up port).
const SUBSCRIBER_HEARTBEAT: Duration = Duration::from_secs(10);
/// Rows read per query by a subscriber.
const MAX_BROADCAST_READ: usize = 512;

/// One broadcast to write: the kombu envelope of the message (JSON), as on Redis.
#[derive(Debug, Clone)]
pub struct FanoutRow {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
}

/// One broadcast as read back by a subscriber.
#[derive(Debug, Clone)]
pub struct FanoutMessage {
    /// The row id: increases with every broadcast of the file.
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    /// The envelope, or why the row could not be read (a damaged row).
    pub payload: std::result::Result<Vec<u8>, String>,
}

enum FanoutCommand {
    Publish(Vec<FanoutRow>, oneshot::Sender<Result<()>>),
    Subscribe {
        exchange: String,
        routing_key: Option<String>,
        deliveries: mpsc::UnboundedSender<FanoutMessage>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Unsubscribe(u64),
    Purge(String, oneshot::Sender<Result<u64>>),
}

/// Fanout exchanges on the embedded database: the `broadcast` table is a log that
/// publishers append to (one transaction per batch) and every subscriber reads from
/// its own cursor (the last row id it saw), so that each subscriber sees every
/// broadcast published after it subscribed. Rows are pruned after
/// [`BROADCAST_RETENTION`].
///
/// One thread per fanout owns its connection. A subscribing fanout waits as the
/// consumer does: `PRAGMA data_version` checks, 1 ms, 2 ms, ... up to
/// `polling_interval` apart, woken at once by publishers of this process and, across
/// processes, by a loopback UDP datagram (its port is in `peers`, kind `subscriber`).
///
/// For remote control: a worker subscribes to `celery.pidbox` (every routing key); a
/// client "binds its reply queue" by subscribing to `reply.celery.pidbox` with its
/// routing key, publishes the request, then takes replies from that subscription.
pub struct SqliteFanout {
    commands: std_mpsc::Sender<FanoutCommand>,
    signal: Arc<Signal>,
    masked: String,
    _checkpointer: Option<Arc<Checkpointer>>,
}

impl SqliteFanout {
    /// Open (failing fast with a clear error) and start the fanout's thread.
    pub async fn connect(url: &BrokerUrl, options: SqliteOptions) -> Result<Self> {
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let signal = Arc::new(Signal::default());
        let (commands, rx) = std_mpsc::channel();
        let worker = FanoutThread {
            conn,
            path,
            polling_interval: options.polling_interval,
            signal: signal.clone(),
            subscriptions: Vec::new(),
            next_id: 1,
            cursor: 0,
            data_version: None,
            peer_id: new_peer_id(KIND_SUBSCRIBER),
            listener: None,
            next_heartbeat: Instant::now(),
            next_prune: Instant::now(),
            notifier: WakeNotifier::new(KIND_SUBSCRIBER),
            warned: false,
            local_subscribed: false,
        };
        std::thread::Builder::new()
            .name("celeriac-sqlite-fanout".into())
            .spawn(move || worker.run(rx))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            commands,
            signal,
            masked: url.masked().to_owned(),
            _checkpointer: checkpointer,
        })
    }

    fn send(&self, command: FanoutCommand) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::Closed("the SQLite fanout"))?;
        self.signal.notify();
        Ok(())
    }

    /// Append `rows` in one transaction and wake the subscribers; returns once
    /// committed.
    pub async fn publish(&self, rows: Vec<FanoutRow>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Publish(rows, reply))?;
        done.await.map_err(|_| Error::Closed("the SQLite fanout"))?
    }

    /// Receive, from now on, every broadcast to `exchange` (only those with
    /// `routing_key` when given: the key itself, or an AMQP topic pattern when it has
    /// `*` or `#`).
    pub async fn subscribe(
        &self,
        exchange: &str,
        routing_key: Option<&str>,
    ) -> Result<FanoutSubscription> {
        let (deliveries, rx) = mpsc::unbounded_channel();
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Subscribe {
            exchange: exchange.to_owned(),
            routing_key: routing_key.map(str::to_owned),
            deliveries,
            reply,
        })?;
        let id = done
            .await
            .map_err(|_| Error::Closed("the SQLite fanout"))??;
        Ok(FanoutSubscription {
            id,
            rx,
            commands: self.commands.clone(),
            signal: self.signal.clone(),
        })
    }

    /// Delete the ready (unclaimed) messages of the task queue `queue` (what `celery
    /// purge` does); how many. Claimed ones stay with their consumer.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Purge(queue.to_owned(), reply))?;
        done.await.map_err(|_| Error::Closed("the SQLite fanout"))?
    }

    pub fn masked_url(&self) -> &str {
        &self.masked
    }
}

/// What a subscriber receives; dropping it unsubscribes.
pub struct FanoutSubscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<FanoutMessage>,
    commands: std_mpsc::Sender<FanoutCommand>,
    signal: Arc<Signal>,
}

impl FanoutSubscription {
    /// The next broadcast, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<FanoutMessage>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(message)) => Ok(Some(message)),
            Ok(None) => Err(Error::Closed("the SQLite fanout")),
            Err(_) => Ok(None),
        }
    }

    /// The next broadcast already read, if any (never waits).
    pub fn try_recv(&mut self) -> Result<Option<FanoutMessage>> {
        match self.rx.try_recv() {
            Ok(message) => Ok(Some(message)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(Error::Closed("the SQLite fanout")),
        }
    }
}

impl Drop for FanoutSubscription {
    fn drop(&mut self) {
        if self
            .commands
            .send(FanoutCommand::Unsubscribe(self.id))
            .is_ok()
        {
            self.signal.notify();
        }
    }
}

struct FanoutSub {
    id: u64,
    exchange: String,
    routing_key: Option<String>,
    /// Rows up to this id were published before the subscription.
    after: i64,
    deliveries: mpsc::UnboundedSender<FanoutMessage>,
}

impl FanoutSub {
    fn wants(&self, row: &FanoutMessage) -> bool {
        row.id > self.after
            && row.exchange == self.exchange
            && self.routing_key.as_ref().is_none_or(|key| {
                *key == row.routing_key
                    || (key.contains(['*', '#']) && topic_matches(key, &row.routing_key))
            })
    }
}

struct FanoutThread {
    conn: Connection,
    path: PathBuf,
    polling_interval: Duration,
    signal: Arc<Signal>,
    subscriptions: Vec<FanoutSub>,
    next_id: u64,
    /// The last row read (every subscription is at or past it).
    cursor: i64,
    /// `PRAGMA data_version` when the log was last read to its end (`None`: read now).
    data_version: Option<i64>,
    peer_id: String,
    listener: Option<WakeListener>,
    next_heartbeat: Instant,
    next_prune: Instant,
    notifier: WakeNotifier,
    /// A read error was reported (once, until a read succeeds).
    warned: bool,
    /// Publishers of this process wake us.
    local_subscribed: bool,
}

impl FanoutThread {
    fn run(mut self, rx: std_mpsc::Receiver<FanoutCommand>) {
        let mut idle = MIN_IDLE;
        let mut first: Option<FanoutCommand> = None;
        loop {
            let seen = self.signal.generation();
            let mut publishes = Vec::new();
            let mut disconnected = false;
            if let Some(command) = first.take() {
                self.handle(command, &mut publishes);
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => self.handle(command, &mut publishes),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            let mut worked = false;
            if !publishes.is_empty() {
                self.publish(publishes);
                worked = true;
            }
            if !self.subscriptions.is_empty() {
                worked |= self.read();
                if Instant::now() >= self.next_heartbeat {
                    let _ = heartbeat(&self.conn, &self.peer_id, KIND_SUBSCRIBER, self.port());
                    self.next_heartbeat = Instant::now() + SUBSCRIBER_HEARTBEAT;
                }
            }
            if disconnected {
                self.leave();
                return;
            }
            if worked {
                idle = MIN_IDLE;
                continue;
            }
            if self.subscriptions.is_empty() {
                // A publisher only: sleep until the next command (or the last handle
                // going away).
                match rx.recv() {
                    Ok(command) => first = Some(command),
                    Err(_) => {
                        self.leave();
                        return;
                    }
                }
                continue;
            }
            // Nothing new: sleep until a wake-up (a publish, a command) or the next
            // check.
            if self.signal.wait(seen, idle) {
                idle = MIN_IDLE;
            } else {
                idle = (idle * 2).min(self.polling_interval);
            }
        }
    }

    fn handle(
        &mut self,
        command: FanoutCommand,
        publishes: &mut Vec<(Vec<FanoutRow>, oneshot::Sender<Result<()>>)>,
    ) {
        match command {
            FanoutCommand::Publish(rows, reply) => publishes.push((rows, reply)),
            FanoutCommand::Subscribe {
                exchange,
                routing_key,
                deliveries,
                reply,
            } => {
                let outcome = self.subscribe(exchange, routing_key, deliveries);
                let _ = reply.send(outcome);
            }
            FanoutCommand::Unsubscribe(id) => self.unsubscribe(id),
            FanoutCommand::Purge(queue, reply) => {
                let outcome = self
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE queue = ?1 AND claimed_at IS NULL")
                    .and_then(|mut delete| delete.execute(params![queue]))
                    .map(|count| count as u64)
                    .map_err(|e| db_error(&self.path, &e));
                let _ = reply.send(outcome);
            }
        }
    }

    fn port(&self) -> Option<u16> {
        self.listener.as_ref().map(WakeListener::port)
    }

    fn subscribe(
        &mut self,
        exchange: String,
        routing_key: Option<String>,
        deliveries: mpsc::UnboundedSender<FanoutMessage>,
    ) -> Result<u64> {
        let last: i64 = self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM broadcast", [], |row| {
                row.get(0)
            })
            .map_err(|e| db_error(&self.path, &e))?;
        if self.subscriptions.is_empty() {
            self.cursor = last;
            self.data_version = None;
            if self.listener.is_none() {
                self.listener = WakeListener::start(self.signal.clone());
            }
            if !self.local_subscribed {
                subscribe_local(&self.path, Topic::Broadcast, &self.signal);
                self.local_subscribed = true;
            }
            heartbeat(&self.conn, &self.peer_id, KIND_SUBSCRIBER, self.port())
                .map_err(|e| db_error(&self.path, &e))?;
            self.next_heartbeat = Instant::now() + SUBSCRIBER_HEARTBEAT;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.subscriptions.push(FanoutSub {
            id,
            exchange,
            routing_key,
            after: last,
            deliveries,
        });
        Ok(id)
    }

    fn unsubscribe(&mut self, id: u64) {
        self.subscriptions.retain(|sub| sub.id != id);
        if self.subscriptions.is_empty() {
            self.leave();
        }
    }

    /// No longer a subscriber: stop the wake-ups.
    fn leave(&mut self) {
        self.listener = None;
        let _ = self
            .conn
            .execute("DELETE FROM peers WHERE id = ?1", params![self.peer_id]);
    }

    fn publish(&mut self, publishes: Vec<(Vec<FanoutRow>, oneshot::Sender<Result<()>>)>) {
        let rows: Vec<&FanoutRow> = publishes.iter().flat_map(|(rows, _)| rows).collect();
        let mut attempt = 0;
        let outcome = loop {
            match self.insert(&rows) {
                Ok(()) => break Ok(()),
                Err(err) if attempt < 2 => {
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                    let _ = err;
                }
                Err(err) => break Err(db_error(&self.path, &err)),
            }
        };
        let ok = outcome.is_ok();
        for (_, reply) in publishes {
            let _ = reply.send(match &outcome {
                Ok(()) => Ok(()),
                Err(err) => Err(Error::Connection(err.to_string())),
            });
        }
        if ok {
            // Our own commits do not change our data_version: read them too.
            self.data_version = None;
            notify_local(&self.path, Topic::Broadcast);
            self.notifier.notify(&self.conn);
        }
    }

    fn insert(&mut self, rows: &[&FanoutRow]) -> rusqlite::Result<()> {
        let now = unix_now();
        let prune = Instant::now() >= self.next_prune;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO broadcast (exchange, routing_key, created, payload) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for row in rows {
                insert.execute(params![
                    row.exchange,
                    row.routing_key,
                    now,
                    JsonBytes(&row.payload)
                ])?;
            }
            if prune {
                tx.prepare_cached("DELETE FROM broadcast WHERE created < ?1")?
                    .execute(params![now - BROADCAST_RETENTION.as_secs_f64()])?;
            }
        }
        tx.commit()?;
        if prune {
            self.next_prune = Instant::now() + PRUNE_EVERY;
        }
        Ok(())
    }

    /// Read what was broadcast since the cursor and hand it to the subscriptions
    /// that want it. True when something was read.
    fn read(&mut self) -> bool {
        let version: Option<i64> = self
            .conn
            .pragma_query_value(None, "data_version", |row| row.get(0))
            .ok();
        if version.is_some() && version == self.data_version {
            return false;
        }
        let mut read_any = false;
        loop {
            match self.read_batch() {
                Ok(rows) => {
                    self.warned = false;
                    let full = rows.len() >= MAX_BROADCAST_READ;
                    read_any |= !rows.is_empty();
                    for row in rows {
                        self.cursor = self.cursor.max(row.id);
                        for sub in &self.subscriptions {
                            if sub.wants(&row) {
                                // A dropped receiver unsubscribes; nothing to do here.
                                let _ = sub.deliveries.send(row.clone());
                            }
                        }
                    }
                    if !full {
                        self.data_version = version;
                        return read_any;
                    }
                }
                Err(err) => {
                    if !self.warned {
                        self.warned = true;
                        let text = format!("{}", db_error(&self.path, &err));
                        for sub in &self.subscriptions {
                            let _ = sub.deliveries.send(FanoutMessage {
                                id: self.cursor,
                                exchange: sub.exchange.clone(),
                                routing_key: String::new(),
                                payload: Err(text.clone()),
                            });
                        }
                    }
                    return read_any;
                }
            }
        }
    }

    fn read_batch(&self) -> rusqlite::Result<Vec<FanoutMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, exchange, routing_key, payload FROM broadcast WHERE id > ?1 \
             ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![self.cursor, MAX_BROADCAST_READ as i64], |row| {
            let text = |index: usize| -> rusqlite::Result<String> {
                Ok(match row.get_ref(index)? {
                    ValueRef::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                })
            };
            Ok(FanoutMessage {
                id: row.get(0)?,
                exchange: text(1)?,
                routing_key: text(2)?,
                payload: column_bytes(row, 3).map_err(|err| {
                    format!("broadcast row {}: {err}", row.get::<_, i64>(0).unwrap_or(0))
                }),
            })
        })?;
        rows.collect()
    }
}

// ---------------------------------------------------------------------------------
// Remote control's mailbox on the fanout

/// Remote control (kombu's pidbox) on the embedded database, for
/// `pidbox::Mailbox`: requests and replies are broadcasts (see [`SqliteFanout`]).
///
/// - A worker subscribes to `celery.pidbox` ([`SqliteMailbox::subscribe`]).
/// - A client "binds its reply queue": a subscription to `reply.celery.pidbox` with
///   its routing key (the oid), read by [`SqliteMailbox::pop`]; a worker's reply is a
///   broadcast with that routing key. Only replies sent after the bind are seen, as
///   with a queue declared before the request.
pub struct SqliteMailbox {
    fanout: SqliteFanout,
    replies: tokio::sync::Mutex<HashMap<String, FanoutSubscription>>,
}

impl SqliteMailbox {
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        let options = SqliteOptions::from_transport(options)?;
        Ok(Self {
            fanout: SqliteFanout::connect(url, options).await?,
            replies: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Forward the broadcasts of `exchange` to `tx` until `stop` changes. `binding`:
    /// `""` or `"#"` for all, else an AMQP topic pattern (`*` one word, `#` any).
    pub async fn subscribe(
        &self,
        exchange: &str,
        binding: &str,
        tx: mpsc::UnboundedSender<Received>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let key = (!binding.is_empty() && binding != "#").then_some(binding);
        let mut subscription = self.fanout.subscribe(exchange, key).await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = subscription.recv(Duration::from_secs(3600)) => match got {
                        Ok(Some(message)) => {
                            let received = message.payload.and_then(|raw| decode(&raw));
                            if tx.send(received).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        });
        Ok(())
    }

    /// One broadcast of the kombu envelope (as on Redis); returns 1.
    pub async fn publish(&self, message: &Broadcast) -> Result<usize> {
        let row = FanoutRow {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            payload: redis_envelope(message)?,
        };
        self.fanout.publish(vec![row]).await?;
        Ok(1)
    }

    /// Receive what is sent to `exchange` with `routing_key` from now on, as `queue`.
    pub async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let subscription = self.fanout.subscribe(exchange, Some(routing_key)).await?;
        self.replies
            .lock()
            .await
            .insert(queue.to_owned(), subscription);
        Ok(())
    }

    pub async fn unbind(&self, queue: &str) -> Result<()> {
        self.replies.lock().await.remove(queue);
        Ok(())
    }

    /// The oldest message received as `queue`, if any (never waits).
    pub async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let mut replies = self.replies.lock().await;
        let Some(subscription) = replies.get_mut(queue) else {
            return Err(Error::Config(format!("queue {queue:?} is not bound")));
        };
        Ok(subscription
            .try_recv()?
            .map(|message| message.payload.and_then(|raw| decode(&raw))))
    }

    /// Delete the ready messages of the task queue `queue`; how many.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        self.fanout.purge(queue).await
    }
}

/// Whether `key` matches the AMQP topic `pattern` (`*`: one word, `#`: zero or more).
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| go(rest, &key[skip..])),
            Some((&word, rest)) => match key.split_first() {
                Some((first, others)) => (word == "*" || word == *first) && go(rest, others),
                None => false,
            },
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

/// Counts of a database's rows, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: usize,
    pub claimed: usize,
}

/// How many messages of `queue` are ready and how many are claimed.
pub fn queue_counts(conn: &Connection, queue: &str) -> rusqlite::Result<QueueCounts> {
    conn.query_row(
        "SELECT count(*) FILTER (WHERE claimed_at IS NULL), count(*) FILTER (WHERE claimed_at IS NOT NULL)
         FROM messages WHERE queue = ?1",
        params![queue],
        |row| {
            Ok(QueueCounts {
                ready: row.get::<_, i64>(0)? as usize,
                claimed: row.get::<_, i64>(1)? as usize,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_sql_is_valid_for_one_and_many_queues() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("x.db"), Duration::from_secs(1)).unwrap();
        let names: Vec<String> = ["a", "it's", "c"].map(String::from).to_vec();
        for queues in 1..4 {
            conn.prepare(&claim_sql(&names[..queues])).unwrap();
            conn.prepare(&probe_sql(&names[..queues])).unwrap();
        }
    }

    #[test]
    fn options_follow_the_visibility_timeout() {
        let mut given = TransportOptions::default();
        given
            .extra
            .insert("visibility_timeout".into(), serde_json::json!(2));
        let options = SqliteOptions::from_transport(&given).unwrap();
        assert_eq!(options.visibility_timeout, Duration::from_secs(2));
        assert_eq!(options.restore_interval, Duration::from_millis(500));
        let options = SqliteOptions::from_transport(&TransportOptions::default()).unwrap();
        assert_eq!(options.restore_interval, Duration::from_secs(10));
        given
            .extra
            .insert("polling_interval".into(), serde_json::json!("x"));
        assert!(SqliteOptions::from_transport(&given).is_err());
    }

    #[test]
    fn topic_patterns_follow_amqp() {
        assert!(topic_matches("#", "a.b"));
        assert!(topic_matches("task.*", "task.multi"));
        assert!(!topic_matches("task.*", "task.multi.x"));
        assert!(topic_matches("task.#", "task"));
        assert!(topic_matches("*.heartbeat", "worker.heartbeat"));
        assert!(!topic_matches("worker.*", "task.multi"));
    }

    #[test]
    fn signal_wakes_a_waiter() {
        let signal = Arc::new(Signal::default());
        let seen = signal.generation();
        assert!(!signal.wait(seen, Duration::from_millis(5)));
        let other = signal.clone();
        let thread = std::thread::spawn(move || other.notify());
        assert!(signal.wait(seen, Duration::from_secs(5)));
        thread.join().unwrap();
    }

    #[test]
    fn wake_listener_forwards_datagrams() {
        let signal = Arc::new(Signal::default());
        let listener = WakeListener::start(signal.clone()).expect("loopback UDP");
        let seen = signal.generation();
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        socket
            .send_to(WAKE_MAGIC, (Ipv4Addr::LOCALHOST, listener.port()))
            .unwrap();
        assert!(signal.wait(seen, Duration::from_secs(5)));
    }
}
