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

mod checkpoint;
mod consumer;
mod fanout;
mod mailbox;
mod open;
mod producer;
#[cfg(test)]
mod tests;
mod wake;

pub(crate) use checkpoint::*;
pub use consumer::*;
pub use fanout::*;
pub use mailbox::*;
pub use open::*;
pub use producer::*;
pub(crate) use wake::*;

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

use super::broadcast::{decode, redis_envelope, Broadcast, Received};
use super::outbox::Outbox;
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
