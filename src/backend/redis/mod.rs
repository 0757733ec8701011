//! The Redis result store, in Celery's layout (docs/wire.md §4.4).
//!
//! One task's meta lives at `<global prefix><key prefix><task id>`
//! (`celery-task-meta-<id>` by default) and every write is also PUBLISHed on a channel
//! named after the full key, so a waiter learns of it without polling.
//!
//! Three pieces, all on the process's tokio runtime (`crate::runtime`):
//!
//! - a command connection (`MultiplexedConnection`), opened by `connect` and replaced
//!   when it breaks, for GET/DEL and for the writer;
//! - the **writer** task: `store` only queues `(key, json)`; the writer takes everything
//!   pending and writes it as one pipeline (`SETEX key ttl json` + `PUBLISH key json` per
//!   result, plain `SET` when results do not expire), one round trip per batch. A
//!   broken connection is reopened and the batch written again;
//! - the **dispatcher** task: owns the single pub/sub connection of this store (opened
//!   on the first wait, kept afterwards), holds `channel -> waiters`, SUBSCRIBEs a
//!   channel when its first waiter comes and UNSUBSCRIBEs it a little after its last
//!   one leaves (in batches, off the next waiter's path); right after a SUBSCRIBE it
//!   reads the new waiters' keys (one MGET) and hands each waiter its value.
//!   After a lost connection it subscribes again and re-reads every watched key, since
//!   a result may have been published while it was away.
//!
//! A waiter is subscribed *before* its key is read, so a result stored in between is
//! seen either by the read or by the subscription. States that are not ready
//! (STARTED, RETRY) are skipped.
//!
//! The blocking methods (`connect`, `get`, `forget`, `flush`, `wait`, `close` and
//! `Waiter::wait_until`) must be called from a thread that is not a runtime thread
//! (a Python thread, a test); `store` and `watch` never block. A `RedisBackend`
//! belongs to the process that created it: after `fork()` the child builds its own;
//!
//! Files: `connection.rs` (the shared state and the command connection), `writer.rs`,
//! `dispatcher.rs`, `waiter.rs` and `chord.rs` (the chord join).

mod chord;
mod connection;
mod dispatcher;
mod waiter;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex};

use crate::broker::redis::sentinel::SentinelOptions;
use crate::broker::redis::RedisTls;
use crate::broker::url::BrokerUrl;
use crate::error::{Error, Result};
use crate::runtime;
pub use chord::{ChordPart, PendingPart};
use connection::Shared;
use dispatcher::{Command, Dispatcher};
use waiter::WaitState;
pub use waiter::Waiter;
use writer::{write_loop, WriteOp};

/// Celery's `task_keyprefix`.
pub const DEFAULT_KEY_PREFIX: &str = "celery-task-meta-";

/// Results written per pipeline at most (two commands each).
pub(super) const MAX_BATCH: usize = 2048;
/// Subscription changes handled per round trip at most.
pub(super) const MAX_COMMANDS: usize = 4096;
/// How long a reply may take on the command connection.
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect back-off bounds.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(50);
pub(super) const MAX_RETRY: Duration = Duration::from_secs(1);
/// Waiters are told the store is gone when their pub/sub connection stays down this long.
pub(super) const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// A channel whose last waiter left stays subscribed this long (or until this many
/// gather), so its UNSUBSCRIBE is off the next waiter's path: a client that waits for
/// one result after another would otherwise wait for an UNSUBSCRIBE before each
/// SUBSCRIBE.
pub(super) const UNSUBSCRIBE_DELAY: Duration = Duration::from_millis(20);
pub(super) const UNSUBSCRIBE_BATCH: usize = 256;
/// Attempts at a pending batch once the store is closed or dropped.
pub(super) const ATTEMPTS_WHEN_STOPPING: u32 = 3;

pub(super) const CLOSED: &str = "the result backend";
const FORKED: &str = "a result backend inherited across fork()";

/// How to reach the store and how to name and keep its keys.
#[derive(Debug, Clone)]
pub struct RedisBackendOptions {
    /// Time to live of a stored result (`result_expires`); `None` or zero: forever.
    pub expires: Option<Duration>,
    /// Prefix of a task's key and channel (`celery-task-meta-`).
    pub key_prefix: String,
    /// `result_backend_transport_options["global_keyprefix"]`, put before `key_prefix`
    /// (with a `_` added unless it ends in one of `:_-.`, as Celery does).
    pub global_keyprefix: Option<String>,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
    /// For a `sentinel://` URL: `master_name`, `sentinel_kwargs` (transport options).
    pub sentinel: SentinelOptions,
    /// `redis_backend_use_ssl`, under the `ssl_*` of the URL's query.
    pub tls: Option<RedisTls>,
}

impl Default for RedisBackendOptions {
    fn default() -> Self {
        Self {
            expires: Some(Duration::from_secs(86_400)),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            global_keyprefix: None,
            connect_timeout: Duration::from_secs(4),
            sentinel: SentinelOptions::default(),
            tls: None,
        }
    }
}

/// The full prefix of a task key: Celery's `global_keyprefix` rule, then `key_prefix`.
pub fn full_key_prefix(global_keyprefix: Option<&str>, key_prefix: &str) -> String {
    match global_keyprefix {
        Some(global) if !global.is_empty() => {
            let sep = if global.ends_with([':', '_', '-', '.']) {
                ""
            } else {
                "_"
            };
            format!("{global}{sep}{key_prefix}")
        }
        _ => key_prefix.to_owned(),
    }
}

/// A Redis result store. See the module documentation.
pub struct RedisBackend {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<WriteOp>,
    dispatcher: mpsc::UnboundedSender<Command>,
    closed: AtomicBool,
    /// The process whose runtime runs the background tasks.
    pid: u32,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.shared.masked)
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Parse `url` and open the command connection now. A bad URL is
    /// `Error::InvalidUrl`, an unreachable server `Error::Connection`; both name the URL
    /// with its password masked.
    pub fn connect(url: &str, options: RedisBackendOptions) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?
            .with_sentinel_options(options.sentinel)
            .with_redis_tls(options.tls.as_ref());
        let masked = parsed.masked().to_owned();
        let expires = options
            .expires
            .filter(|ttl| !ttl.is_zero())
            // SETEX takes whole seconds; round up so that a short TTL is not "forever".
            .map(|ttl| ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
        let shared = Arc::new(Shared {
            url: parsed,
            masked,
            prefix: full_key_prefix(options.global_keyprefix.as_deref(), &options.key_prefix),
            expires,
            connect_timeout: options.connect_timeout,
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            last_error: StdMutex::new(None),
        });
        let handle = runtime::handle();
        handle.block_on(shared.connection())?;
        let (writer, writes) = mpsc::unbounded_channel();
        handle.spawn(write_loop(Arc::clone(&shared), writes));
        let (dispatcher, commands) = mpsc::unbounded_channel();
        handle.spawn(Dispatcher::new(Arc::clone(&shared), commands).run());
        Ok(Self {
            shared,
            writer,
            dispatcher,
            closed: AtomicBool::new(false),
            pid: std::process::id(),
        })
    }

    /// The URL with its password masked.
    pub fn masked_url(&self) -> &str {
        &self.shared.masked
    }

    /// The key (and channel) of a task's meta.
    pub fn key_for(&self, task_id: &str) -> String {
        self.shared.key_for(task_id)
    }

    /// Queue a meta document for writing; returns at once. `flush` waits for it.
    pub fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        self.check_open()?;
        crate::trace::hop("result.handoff");
        self.writer
            .send(WriteOp::Store {
                key: self.shared.key_for(task_id),
                value: meta_json,
            })
            .map_err(|_| Error::Closed(CLOSED))
    }

    /// Wait until every result stored before this call is written. Fails when they
    /// could not be written within `timeout`, or when Redis refused some of the writes
    /// since the previous flush.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        self.flush_inner(timeout)
    }

    fn flush_inner(&self, timeout: Duration) -> Result<()> {
        let (done, written) = oneshot::channel();
        self.writer
            .send(WriteOp::Flush(done))
            .map_err(|_| Error::Closed(CLOSED))?;
        match runtime::handle().block_on(async { tokio::time::timeout(timeout, written).await }) {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(text))) => Err(Error::Connection(text)),
            Ok(Err(_)) => Err(Error::Closed(CLOSED)),
            Err(_) => {
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

    /// The stored meta of a task, `None` when there is none (PENDING).
    pub fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        runtime::handle().block_on(self.shared.get_key(&self.shared.key_for(task_id)))
    }

    /// Delete a task's meta.
    pub fn forget(&self, task_id: &str) -> Result<()> {
        self.check_open()?;
        let key = self.shared.key_for(task_id);
        runtime::handle().block_on(self.shared.run(|mut conn| {
            let key = key.clone();
            async move {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut conn)
                    .await
            }
        }))
    }

    /// Start watching a task: its channel is subscribed in the background and the
    /// key is read once the subscription is confirmed (by the dispatcher, or by the
    /// `Waiter` when that read failed). Returns at once. Dropping the waiter ends the watch.
    pub fn watch(&self, task_id: &str) -> Result<Waiter> {
        self.check_open()?;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let channel = self.shared.key_for(task_id);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready) = oneshot::channel();
        self.dispatcher
            .send(Command::Subscribe {
                channel: channel.clone(),
                id,
                events: events_tx,
                ready: ready_tx,
            })
            .map_err(|_| Error::Closed(CLOSED))?;
        Ok(Waiter {
            shared: Arc::clone(&self.shared),
            commands: self.dispatcher.clone(),
            channel,
            id,
            events,
            state: WaitState::Subscribing(ready),
        })
    }

    /// Block until the task's meta has a ready state and return it; `Error::Timeout`
    /// at `deadline` (`None`: no limit).
    pub fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let mut waiter = self.watch(task_id)?;
        match deadline {
            None => runtime::handle().block_on(waiter.next_ready()),
            Some(deadline) => waiter
                .wait_until(deadline)?
                .ok_or_else(|| Error::Timeout("The operation timed out.".to_owned())),
        }
    }

    /// Write what is pending (bounded by the connect timeout), stop the background
    /// tasks and end every wait. Later calls fail with `Error::Closed`. The result of
    /// the final flush is returned; closing twice is a no-op.
    pub fn close(&self) -> Result<()> {
        if self.pid != std::process::id() || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let flushed = self.flush_inner(self.shared.connect_timeout);
        self.stop();
        flushed
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Either task may be gone already; nothing to do then.
        let _ = self.writer.send(WriteOp::Close);
        let _ = self.dispatcher.send(Command::Close);
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

impl Drop for RedisBackend {
    fn drop(&mut self) {
        // In a forked child the tasks and the runtime are the parent's: leave them be.
        if self.pid == std::process::id() {
            // Results queued but not flushed are still written (a few attempts at most).
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_keyprefix_follows_celery() {
        assert_eq!(
            full_key_prefix(None, DEFAULT_KEY_PREFIX),
            "celery-task-meta-"
        );
        assert_eq!(
            full_key_prefix(Some(""), DEFAULT_KEY_PREFIX),
            "celery-task-meta-"
        );
        assert_eq!(
            full_key_prefix(Some("app"), DEFAULT_KEY_PREFIX),
            "app_celery-task-meta-"
        );
        for sep in [":", "_", "-", "."] {
            assert_eq!(
                full_key_prefix(Some(&format!("app{sep}")), "p-"),
                format!("app{sep}p-")
            );
        }
    }

    #[test]
    fn bad_urls_are_invalid_and_masked() {
        let err = RedisBackend::connect("redis://:secret@localhost:6379/x", Default::default())
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
