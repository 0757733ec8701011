//! The Redis result store, in Celery's layout (celery-wire.md §4.4).
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
//! the inherited one refuses work (`Error::Closed`) and its drop does nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, ErrorKind, Msg, RedisError};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::backend::is_ready;

#[path = "redis_chord.rs"]
mod chord;
use crate::broker::url::BrokerUrl;
use crate::error::{Error, Result};
use crate::runtime;
pub use chord::ChordPart;

/// Celery's `task_keyprefix`.
pub const DEFAULT_KEY_PREFIX: &str = "celery-task-meta-";

/// Results written per pipeline at most (two commands each).
const MAX_BATCH: usize = 2048;
/// Subscription changes handled per round trip at most.
const MAX_COMMANDS: usize = 4096;
/// How long a reply may take on the command connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect back-off bounds.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Waiters are told the store is gone when their pub/sub connection stays down this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// A channel whose last waiter left stays subscribed this long (or until this many
/// gather), so its UNSUBSCRIBE is off the next waiter's path: a client that waits for
/// one result after another would otherwise wait for an UNSUBSCRIBE before each
/// SUBSCRIBE.
const UNSUBSCRIBE_DELAY: Duration = Duration::from_millis(20);
const UNSUBSCRIBE_BATCH: usize = 256;
/// Attempts at a pending batch once the store is closed or dropped.
const ATTEMPTS_WHEN_STOPPING: u32 = 3;

const CLOSED: &str = "the result backend";
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
}

impl Default for RedisBackendOptions {
    fn default() -> Self {
        Self {
            expires: Some(Duration::from_secs(86_400)),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            global_keyprefix: None,
            connect_timeout: Duration::from_secs(4),
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
        let parsed = BrokerUrl::parse(url)?;
        let masked = parsed.masked().to_owned();
        let client = redis::Client::open(crate::broker::redis::nodelay(parsed.to_redis_info()?))
            .map_err(|err| {
                Error::InvalidUrl(format!("invalid result backend URL {masked:?}: {err}"))
            })?;
        let expires = options
            .expires
            .filter(|ttl| !ttl.is_zero())
            // SETEX takes whole seconds; round up so that a short TTL is not "forever".
            .map(|ttl| ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
        let shared = Arc::new(Shared {
            client,
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

/// One wait for one task's ready meta. See `RedisBackend::watch`.
pub struct Waiter {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    channel: String,
    id: u64,
    events: mpsc::UnboundedReceiver<Event>,
    state: WaitState,
}

enum WaitState {
    /// Waiting for the dispatcher to confirm the SUBSCRIBE (and read the key).
    Subscribing(oneshot::Receiver<Result<Subscribed, String>>),
    /// Subscribed; the key is still to be read.
    Reading,
    /// Read; waiting for a published update.
    Listening,
}

impl Waiter {
    /// Block until a ready meta arrives (`Some`) or `until` passes (`None`). Can be
    /// called again after `None`: nothing is lost in between.
    pub fn wait_until(&mut self, until: Instant) -> Result<Option<Vec<u8>>> {
        let until = tokio::time::Instant::from_std(until);
        runtime::handle().block_on(async {
            match tokio::time::timeout_at(until, self.next_ready()).await {
                Ok(result) => result.map(Some),
                Err(_) => Ok(None),
            }
        })
    }

    /// The next ready meta. Cancel-safe: the state only moves on after a step
    /// completes, and every step can be repeated.
    pub async fn next_ready(&mut self) -> Result<Vec<u8>> {
        loop {
            match &mut self.state {
                WaitState::Subscribing(ready) => match ready.await {
                    Ok(Ok(Subscribed::Read(meta))) => {
                        self.state = WaitState::Listening;
                        if let Some(meta) = meta.filter(|meta| is_ready(meta)) {
                            return Ok(meta);
                        }
                    }
                    Ok(Ok(Subscribed::Unread)) => self.state = WaitState::Reading,
                    Ok(Err(text)) => return Err(Error::Connection(text)),
                    Err(_) => return Err(Error::Closed(CLOSED)),
                },
                WaitState::Reading => {
                    let meta = self.shared.get_key(&self.channel).await?;
                    self.state = WaitState::Listening;
                    if let Some(meta) = meta.filter(|meta| is_ready(meta)) {
                        return Ok(meta);
                    }
                }
                WaitState::Listening => match self.events.recv().await {
                    Some(Event::Meta(meta)) if is_ready(&meta) => return Ok(meta),
                    Some(Event::Meta(_)) => {}
                    Some(Event::Failed(text)) => return Err(Error::Connection(text)),
                    None => return Err(Error::Closed(CLOSED)),
                },
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // The dispatcher may be gone (store closed); then there is nothing to undo.
        let _ = self.commands.send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            id: self.id,
        });
    }
}

// ---------------------------------------------------------------------------------
// Shared state and the command connection

struct Shared {
    client: redis::Client,
    masked: String,
    prefix: String,
    /// SETEX seconds; `None`: plain SET.
    expires: Option<u64>,
    connect_timeout: Duration,
    /// The command connection and its generation (to replace only the broken one).
    conn: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// Set by `close` and drop: the writer gives up on a batch after a few attempts.
    stopping: AtomicBool,
    /// The last write failure, for flush's error text.
    last_error: StdMutex<Option<String>>,
}

impl Shared {
    fn key_for(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.prefix)
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(RESPONSE_TIMEOUT.max(self.connect_timeout)))
    }

    fn cannot_connect(&self, why: impl std::fmt::Display) -> Error {
        Error::Connection(format!(
            "cannot connect to the result backend {}: {why}",
            self.masked
        ))
    }

    fn lost(&self, err: &RedisError) -> Error {
        Error::Connection(format!(
            "lost the connection to the result backend {}: {err}",
            self.masked
        ))
    }

    /// The command connection, opened if there is none.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection)> {
        let mut guard = self.conn.lock().await;
        if let Some((generation, conn)) = guard.as_ref() {
            return Ok((*generation, conn.clone()));
        }
        let config = self.config();
        let opening = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let conn = match tokio::time::timeout(self.connect_timeout, opening).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(self.cannot_connect(err)),
            Err(_) => {
                return Err(
                    self.cannot_connect(format!("no answer within {:?}", self.connect_timeout))
                )
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *guard = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Forget the command connection if it is still the broken one.
    async fn discard(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard
            .as_ref()
            .is_some_and(|(current, _)| *current == generation)
        {
            *guard = None;
        }
    }

    /// Run one request, reconnecting and trying once more if the connection broke.
    async fn run<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, conn) = self.connection().await?;
            match request(conn).await {
                Ok(value) => return Ok(value),
                Err(err) if needs_reconnect(&err) => {
                    self.discard(generation).await;
                    if attempt >= 2 {
                        return Err(self.lost(&err));
                    }
                }
                Err(err) => return Err(Error::Redis(err)),
            }
        }
    }

    async fn get_key(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(|mut conn| async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        })
        .await
    }

    fn note_error(&self, text: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(text.to_owned());
    }
}

/// Errors after which a connection cannot be trusted (as opposed to an error reply).
fn needs_reconnect(err: &RedisError) -> bool {
    matches!(err.kind(), ErrorKind::Io | ErrorKind::Parse) || err.is_unrecoverable_error()
}

// ---------------------------------------------------------------------------------
// The writer

enum WriteOp {
    Store {
        key: String,
        value: Vec<u8>,
    },
    /// Answered once everything queued before it is written; carries the error
    /// replies seen since the previous flush.
    Flush(oneshot::Sender<Result<(), String>>),
    Close,
}

async fn write_loop(shared: Arc<Shared>, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
    let mut flushes = Vec::new();
    let mut refused: Option<String> = None;
    let mut closing = false;
    while !closing {
        let Some(first) = ops.recv().await else { break };
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                WriteOp::Store { key, value } => batch.push((key, value)),
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
        if !batch.is_empty() {
            if let Err(text) = write_batch(&shared, &batch).await {
                shared.note_error(&text);
                refused = Some(text);
            }
            batch.clear();
        }
        if !flushes.is_empty() {
            let outcome = refused.take().map_or(Ok(()), Err);
            for done in flushes.drain(..) {
                // The flusher may have given up waiting; nothing to tell then.
                let _ = done.send(outcome.clone());
            }
        }
    }
}

/// Write one batch in one pipeline. Retries on a broken connection (forever, unless
/// the store is stopping); an error reply from Redis is returned, not retried.
async fn write_batch(shared: &Shared, batch: &[(String, Vec<u8>)]) -> Result<(), String> {
    let mut pipe = redis::pipe();
    for (key, value) in batch {
        match shared.expires {
            Some(ttl) => pipe.cmd("SETEX").arg(key).arg(ttl).arg(value).ignore(),
            None => pipe.cmd("SET").arg(key).arg(value).ignore(),
        };
        pipe.cmd("PUBLISH").arg(key).arg(value).ignore();
    }
    let mut delay = FIRST_RETRY;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let failure = match shared.connection().await {
            Ok((generation, mut conn)) => match pipe.exec_async(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(err) if needs_reconnect(&err) => {
                    shared.discard(generation).await;
                    shared.lost(&err).to_string()
                }
                Err(err) => {
                    return Err(format!(
                        "the result backend {} refused a write: {err}",
                        shared.masked
                    ))
                }
            },
            Err(err) => err.to_string(),
        };
        shared.note_error(&failure);
        if shared.stopping.load(Ordering::SeqCst) && attempts >= ATTEMPTS_WHEN_STOPPING {
            return Err(failure);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

// ---------------------------------------------------------------------------------
// The dispatcher: one pub/sub connection shared by every waiter

enum Command {
    Subscribe {
        channel: String,
        id: u64,
        events: mpsc::UnboundedSender<Event>,
        ready: oneshot::Sender<Result<Subscribed, String>>,
    },
    Unsubscribe {
        channel: String,
        id: u64,
    },
    Close,
}

/// A confirmed subscription, with the key as read right after it (when the read
/// worked): the dispatcher reads the keys of a batch of new waiters in one MGET, so a
/// waiter is not woken twice (once to read, once for the reply).
enum Subscribed {
    Read(Option<Vec<u8>>),
    Unread,
}

enum Event {
    /// A meta document published (or re-read after a reconnect) for the channel.
    Meta(Vec<u8>),
    /// The pub/sub connection is gone for good.
    Failed(String),
}

type Waiters = HashMap<u64, mpsc::UnboundedSender<Event>>;

struct Dispatcher {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Invariant between batches: when connected, the subscribed channels are exactly
    /// these keys and `stale`.
    channels: HashMap<String, Waiters>,
    /// Channels without waiters, still subscribed: unsubscribed at `unsubscribe_at`
    /// (their messages are dropped meanwhile). Empty while disconnected.
    stale: HashSet<String>,
    unsubscribe_at: Option<tokio::time::Instant>,
    sink: Option<PubSubSink>,
    stream: Option<PubSubStream>,
    ever_connected: bool,
    /// While disconnected with waiters: when the connection was lost, next attempt.
    down_since: Option<Instant>,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

impl Dispatcher {
    fn new(shared: Arc<Shared>, commands: mpsc::UnboundedReceiver<Command>) -> Self {
        Self {
            shared,
            commands,
            channels: HashMap::new(),
            stale: HashSet::new(),
            unsubscribe_at: None,
            sink: None,
            stream: None,
            ever_connected: false,
            down_since: None,
            retry_at: None,
            retry_delay: FIRST_RETRY,
        }
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    let mut batch = vec![command];
                    while batch.len() < MAX_COMMANDS {
                        match self.commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    if !self.handle(batch).await {
                        break;
                    }
                }
                message = next_message(self.stream.as_mut()) => match message {
                    Some(message) => self.deliver(&message),
                    None => self.disconnected(),
                },
                () = sleep_until(self.retry_at) => self.retry().await,
                () = sleep_until(self.unsubscribe_at) => self.unsubscribe_stale().await,
            }
        }
        // Dropping the waiters' senders ends their waits with `Error::Closed`.
    }

    /// Apply a batch of commands with one SUBSCRIBE at most; channels left without
    /// waiters are unsubscribed later (`unsubscribe_stale`). Returns false on `Close`.
    async fn handle(&mut self, batch: Vec<Command>) -> bool {
        let mut subscribe: HashSet<String> = HashSet::new();
        let mut acks = Vec::new();
        let mut open = true;
        for command in batch {
            match command {
                Command::Subscribe {
                    channel,
                    id,
                    events,
                    ready,
                } => {
                    let waiters = self.channels.entry(channel.clone()).or_default();
                    if waiters.is_empty() && !self.stale.remove(&channel) {
                        subscribe.insert(channel.clone());
                    }
                    waiters.insert(id, events);
                    acks.push((channel, ready));
                }
                Command::Unsubscribe { channel, id } => {
                    let Some(waiters) = self.channels.get_mut(&channel) else {
                        continue;
                    };
                    waiters.remove(&id);
                    if waiters.is_empty() {
                        self.channels.remove(&channel);
                        if !subscribe.remove(&channel) && self.sink.is_some() {
                            self.stale.insert(channel);
                        }
                    }
                }
                Command::Close => {
                    open = false;
                    break;
                }
            }
        }
        if !open {
            return false;
        }
        let mut outcome = Ok(());
        if self.sink.is_some() {
            if let Err(text) = self.change_subscriptions(HashSet::new(), subscribe).await {
                self.disconnected();
                outcome = Err(text);
            }
        }
        if self.sink.is_none() && !acks.is_empty() {
            // A new waiter gets one immediate attempt, and an error if it fails.
            outcome = self.reconnect().await;
        }
        let mut values: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        if outcome.is_ok() && !acks.is_empty() {
            let keys: Vec<String> = acks
                .iter()
                .map(|(channel, _)| channel.clone())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let read = self.shared.run(|mut conn| {
                let keys = keys.clone();
                async move {
                    redis::cmd("MGET")
                        .arg(keys)
                        .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                        .await
                }
            });
            // On failure (or no answer) each waiter reads its key itself.
            if let Ok(Ok(read)) = tokio::time::timeout(RESPONSE_TIMEOUT, read).await {
                if read.len() == keys.len() {
                    values = keys.into_iter().zip(read).collect();
                }
            }
        }
        for (channel, ready) in acks {
            let subscribed = outcome.clone().map(|()| match values.get(&channel) {
                Some(value) => Subscribed::Read(value.clone()),
                None => Subscribed::Unread,
            });
            // The waiter may have gone away already.
            let _ = ready.send(subscribed);
        }
        if self.stale.len() >= UNSUBSCRIBE_BATCH {
            self.unsubscribe_stale().await;
        } else if !self.stale.is_empty() && self.unsubscribe_at.is_none() {
            self.unsubscribe_at = Some(tokio::time::Instant::now() + UNSUBSCRIBE_DELAY);
        }
        true
    }

    /// UNSUBSCRIBE the channels left without waiters.
    async fn unsubscribe_stale(&mut self) {
        self.unsubscribe_at = None;
        let stale = std::mem::take(&mut self.stale);
        if stale.is_empty() || self.sink.is_none() {
            return;
        }
        if self
            .change_subscriptions(stale, HashSet::new())
            .await
            .is_err()
        {
            self.disconnected();
        }
    }

    async fn change_subscriptions(
        &mut self,
        unsubscribe: HashSet<String>,
        subscribe: HashSet<String>,
    ) -> Result<(), String> {
        let Some(sink) = self.sink.as_mut() else {
            return Err("not connected".to_owned());
        };
        let limit = self.shared.connect_timeout.max(RESPONSE_TIMEOUT);
        for (channels, on) in [(unsubscribe, false), (subscribe, true)] {
            if channels.is_empty() {
                continue;
            }
            let channels: Vec<String> = channels.into_iter().collect();
            let request = async {
                if on {
                    sink.subscribe(&channels).await
                } else {
                    sink.unsubscribe(&channels).await
                }
            };
            match tokio::time::timeout(limit, request).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(self.shared.lost(&err).to_string()),
                Err(_) => {
                    return Err(format!(
                        "the result backend {} did not answer within {limit:?}",
                        self.shared.masked
                    ))
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, message: &Msg) {
        if let Some(waiters) = self.channels.get(message.get_channel_name()) {
            for events in waiters.values() {
                let _ = events.send(Event::Meta(message.get_payload_bytes().to_vec()));
            }
        }
    }

    fn disconnected(&mut self) {
        self.sink = None;
        self.stream = None;
        // A new connection starts with no subscription.
        self.stale.clear();
        self.unsubscribe_at = None;
        if !self.channels.is_empty() {
            self.down_since.get_or_insert_with(Instant::now);
            self.retry_at = Some(tokio::time::Instant::now());
        }
    }

    async fn retry(&mut self) {
        self.retry_at = None;
        if self.sink.is_some() || self.channels.is_empty() {
            self.down_since = None;
            return;
        }
        let Err(text) = self.reconnect().await else {
            return;
        };
        let down_for = self
            .down_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        if down_for >= GIVE_UP_AFTER.max(self.shared.connect_timeout) {
            for (_, waiters) in self.channels.drain() {
                for events in waiters.values() {
                    let _ = events.send(Event::Failed(text.clone()));
                }
            }
            self.down_since = None;
            self.retry_delay = FIRST_RETRY;
        } else {
            self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
        }
    }

    /// Open the pub/sub connection and subscribe every watched channel. After a lost
    /// connection, re-read the watched keys in the background.
    async fn reconnect(&mut self) -> Result<(), String> {
        let limit = self.shared.connect_timeout;
        let pubsub = match tokio::time::timeout(limit, self.shared.client.get_async_pubsub()).await
        {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => return Err(self.shared.cannot_connect(err).to_string()),
            Err(_) => {
                return Err(self
                    .shared
                    .cannot_connect(format!("no answer within {limit:?}"))
                    .to_string())
            }
        };
        let (sink, stream) = pubsub.split();
        self.stale.clear();
        self.unsubscribe_at = None;
        self.sink = Some(sink);
        self.stream = Some(stream);
        let channels: HashSet<String> = self.channels.keys().cloned().collect();
        if let Err(text) = self.change_subscriptions(HashSet::new(), channels).await {
            self.sink = None;
            self.stream = None;
            return Err(text);
        }
        self.down_since = None;
        self.retry_at = None;
        self.retry_delay = FIRST_RETRY;
        if std::mem::replace(&mut self.ever_connected, true) && !self.channels.is_empty() {
            tokio::spawn(reread(Arc::clone(&self.shared), self.channels.clone()));
        }
        Ok(())
    }
}

/// After a reconnect: hand every watched key's current value to its waiters, since
/// its PUBLISH may have been missed.
async fn reread(shared: Arc<Shared>, channels: HashMap<String, Waiters>) {
    let keys: Vec<&String> = channels.keys().collect();
    let values = shared
        .run(|mut conn| {
            let keys = keys.clone();
            async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            }
        })
        .await;
    // On failure the waiters keep waiting; the dispatcher sees the broken connection.
    let Ok(values) = values else { return };
    for (key, value) in keys.into_iter().zip(values) {
        let (Some(value), Some(waiters)) = (value, channels.get(key)) else {
            continue;
        };
        for events in waiters.values() {
            let _ = events.send(Event::Meta(value.clone()));
        }
    }
}

async fn next_message(stream: Option<&mut PubSubStream>) -> Option<Msg> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
