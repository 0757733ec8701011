//! The Redis broker in kombu's layout (celery-wire §3), so Celery peers share queues.
//!
//! - A queue is a list; priorities live in sub-lists `<queue>\x06\x16<step>`.
//! - Publishing is `LPUSH`; the producer's I/O task pipelines everything pending
//!   (several values per `LPUSH` when they share a list) in one round trip.
//! - Consuming pops with `RPOP key count` inside a Lua script that also records each
//!   message in kombu's ack emulation (`unacked` hash + `unacked_index` zset), so a
//!   batch costs one round trip and no message is ever popped without being recorded.
//!   When every list is empty the fetcher waits for a push without taking anything
//!   (`wake`: one `BLMOVE list list LEFT LEFT` per list, which leaves the list as it
//!   was), then runs the script again: a message is always in its list or in
//!   `unacked`, never only in a reply on the wire, so a worker killed at any instant
//!   loses nothing. Acks are written at once, or batched for a moment while more
//!   messages are queued.
//! - The consumer needs Redis 6.2 or later (`RPOP key count`, `BLMOVE`); it checks the
//!   server's version when it connects.
//! - Messages whose worker died are put back after `visibility_timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

mod wake;

use self::wake::Wakers;
use super::outbox::Outbox;
use super::url::BrokerUrl;
use super::{BadMessage, Fetched, IncomingMessage, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::envelope::{self, IncomingEnvelope};
use crate::protocol::message::OutgoingMessage;

/// kombu's separator between a queue name and its priority step.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's priority steps: 0-2 → 0, 3-5 → 3, 6-8 → 6, 9 → 9 (lower is served first).
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The list that holds messages of `priority` for `queue`.
pub fn priority_key(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .rev()
        .find(|step| priority.min(9) >= **step)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{PRIORITY_SEP}{step}")
    }
}

/// Transport options we understand (`broker_transport_options`), with kombu's defaults.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub visibility_timeout: Duration,
    pub global_keyprefix: String,
    pub unacked_key: String,
    pub unacked_index_key: String,
    pub unacked_mutex_key: String,
    pub unacked_mutex_expire: Duration,
    /// How often a consumer looks for messages whose visibility timeout has passed.
    pub restore_interval: Duration,
    pub connect_timeout: Duration,
    /// How often a consumer refreshes its heartbeat key and looks for dead consumers
    /// (`celeriac_heartbeat_interval`; zero turns heartbeats off).
    pub heartbeat_interval: Duration,
    /// How long a heartbeat lives: a consumer silent this long is dead and its unacked
    /// messages go back to their queues (`celeriac_heartbeat_ttl`).
    pub heartbeat_ttl: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            global_keyprefix: String::new(),
            unacked_key: "unacked".into(),
            unacked_index_key: "unacked_index".into(),
            unacked_mutex_key: "unacked_mutex".into(),
            unacked_mutex_expire: Duration::from_secs(300),
            restore_interval: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(4),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_ttl: Duration::from_secs(5),
        }
    }
}

impl RedisOptions {
    /// Read the options this transport knows from `broker_transport_options`.
    pub fn from_transport(given: &TransportOptions) -> Result<Self> {
        let mut options = Self {
            connect_timeout: given.connect_timeout,
            ..Self::default()
        };
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
            let text = || -> Result<String> {
                value.as_str().map(str::to_owned).ok_or_else(|| {
                    Error::Config(format!(
                        "transport option {key:?} must be a string, not {value}"
                    ))
                })
            };
            match key.as_str() {
                "visibility_timeout" => options.visibility_timeout = seconds()?,
                "unacked_restore_interval" => {
                    options.restore_interval = seconds()?.max(Duration::from_millis(100));
                }
                "unacked_mutex_expire" => options.unacked_mutex_expire = seconds()?,
                "celeriac_heartbeat_interval" => options.heartbeat_interval = seconds()?,
                "celeriac_heartbeat_ttl" => {
                    options.heartbeat_ttl = seconds()?.max(Duration::from_millis(500));
                }
                "global_keyprefix" => options.global_keyprefix = text()?,
                "unacked_key" => options.unacked_key = text()?,
                "unacked_index_key" => options.unacked_index_key = text()?,
                "unacked_mutex_key" => options.unacked_mutex_key = text()?,
                // The dict is shared with kombu's other transports: ignore the rest.
                _ => {}
            }
        }
        Ok(options)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.global_keyprefix)
    }
}

pub(crate) async fn connect(
    url: &BrokerUrl,
    timeout: Duration,
    response_timeout: Option<Duration>,
) -> Result<MultiplexedConnection> {
    let masked = url.masked();
    let client = Client::open(nodelay(url.to_redis_info()?))
        .map_err(|err| Error::Connection(format!("cannot connect to {masked}: {err}")))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(response_timeout);
    let attempt = client.get_multiplexed_async_connection_with_config(&config);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(Error::Connection(format!(
            "cannot connect to {masked}: {err}"
        ))),
        Err(_) => Err(Error::Connection(format!(
            "cannot connect to {masked}: timed out after {:.1}s",
            timeout.as_secs_f64()
        ))),
    }
}

/// Small commands go out at once: without `TCP_NODELAY` a command written while the
/// previous one is unanswered (a pipelined fetch, ack or subscription) waits for its
/// reply's ACK (Nagle), a round trip on the latency path.
pub(crate) fn nodelay(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let settings = info.tcp_settings().clone().set_nodelay(true);
    info.set_tcp_settings(settings)
}

/// The oldest Redis the consumer works with: `RPOP key count` and `BLMOVE` came in 6.2.
pub const MIN_SERVER_VERSION: (u32, u32) = (6, 2);

/// `redis_version` from the text of `INFO server`, as (major, minor, patch).
pub fn server_version(info: &str) -> Option<(u32, u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(|part| part.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// Refuse a server older than [`MIN_SERVER_VERSION`], naming it and its version. A
/// server that does not tell its version (`INFO` renamed or denied) is given the
/// benefit of the doubt: a missing command then fails the first fetch, with the
/// server's own error.
pub fn check_server_version(info: &str, masked: &str) -> Result<()> {
    let Some((major, minor, patch)) = server_version(info) else {
        return Ok(());
    };
    if (major, minor) >= MIN_SERVER_VERSION {
        return Ok(());
    }
    let (need_major, need_minor) = MIN_SERVER_VERSION;
    Err(Error::Config(format!(
        "the Redis server at {masked} is version {major}.{minor}.{patch}; consuming from \
         Redis needs {need_major}.{need_minor} or later (RPOP with a count, BLMOVE)"
    )))
}

/// Ask the server its version and refuse one that is too old ([`check_server_version`]).
pub async fn ensure_server_version(conn: &mut MultiplexedConnection, masked: &str) -> Result<()> {
    let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query_async(conn).await;
    match info {
        Ok(info) => check_server_version(&info, masked),
        // Denied or renamed: see check_server_version. A lost connection shows at once
        // in the next command.
        Err(err) if err.code().is_some() => Ok(()),
        Err(err) => Err(Error::Connection(format!(
            "cannot connect to {masked}: {err}"
        ))),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Back off 0.1 s, 0.2 s, ... up to 2 s between reconnection attempts.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(5)).min(2000))
}

// ---------------------------------------------------------------------------------
// Producer

/// Publishes task messages; cheap to call from any thread.
pub struct RedisProducer {
    tx: mpsc::UnboundedSender<OutgoingMessage>,
    state: Arc<Outbox>,
    masked: String,
}

impl RedisProducer {
    /// Connect (failing fast with a clear error) and start the I/O task.
    pub async fn connect(url: &BrokerUrl, options: RedisOptions) -> Result<Self> {
        let conn = connect(url, options.connect_timeout, Some(Duration::from_secs(30))).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Outbox::default());
        tokio::spawn(publish_loop(conn, url.clone(), options, rx, state.clone()));
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
        })
    }

    /// Hand a message to the I/O task; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        self.state.admit()?;
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the producer"))
    }

    /// Wait until every message published before this call is written to Redis.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.state.flush(timeout, &self.masked, "no reply").await
    }

    pub fn close(&self) {
        self.state.close();
    }
}

async fn publish_loop(
    mut conn: MultiplexedConnection,
    url: BrokerUrl,
    options: RedisOptions,
    mut rx: mpsc::UnboundedReceiver<OutgoingMessage>,
    state: Arc<Outbox>,
) {
    const MAX_BATCH: usize = 4096;
    let mut declared: std::collections::HashSet<String> = Default::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let count = batch.len() as u64;
        let pipe = build_publish_pipeline(&batch, &options, &mut declared);
        batch.clear();
        let mut attempt = 0;
        loop {
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => break,
                Err(err) => {
                    state.note_error(err.to_string());
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    if let Ok(fresh) =
                        connect(&url, options.connect_timeout, Some(Duration::from_secs(30))).await
                    {
                        conn = fresh;
                    }
                }
            }
        }
        state.written(count);
    }
}

fn build_publish_pipeline(
    batch: &[OutgoingMessage],
    options: &RedisOptions,
    declared: &mut std::collections::HashSet<String>,
) -> redis::Pipeline {
    // Group by list, keeping each list's order: LPUSH k v1 v2 puts v2 at the head, and
    // consumers pop from the tail, so v1 is still served first.
    let mut lists: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut pipe = redis::pipe();
    for message in batch {
        let tag = uuid::Uuid::new_v4().to_string();
        let encoded = match envelope::encode(message, &tag) {
            Ok(bytes) => bytes,
            // Headers and body were produced by our own encoder; this cannot fail in
            // practice, and a message we cannot frame is better dropped than wedged.
            Err(_) => continue,
        };
        let queue = if message.exchange.is_empty() {
            message.routing_key.as_str()
        } else {
            // Named exchanges are resolved through kombu's binding table by the
            // consumer side of kombu; Celery itself publishes direct queues to `''`.
            message.routing_key.as_str()
        };
        if declared.insert(queue.to_owned()) {
            pipe.cmd("SADD")
                .arg(options.key(&format!("_kombu.binding.{queue}")))
                .arg(format!("{queue}{PRIORITY_SEP}{PRIORITY_SEP}{queue}"))
                .ignore();
        }
        let key = options.key(&priority_key(
            queue,
            message.properties.priority.unwrap_or(0),
        ));
        let slot = *index.entry(key.clone()).or_insert_with(|| {
            lists.push((key, Vec::new()));
            lists.len() - 1
        });
        lists[slot].1.push(encoded);
    }
    for (key, values) in lists {
        pipe.cmd("LPUSH").arg(key).arg(values).ignore();
    }
    pipe
}

// ---------------------------------------------------------------------------------
// Consumer

/// Pops up to ARGV[1] messages from the lists KEYS[4..] in order and records each one
/// in kombu's ack emulation (KEYS[1] = unacked hash, KEYS[2] = unacked_index zset) and
/// in this consumer's own set of tags (KEYS[3], for heartbeat recovery) in the same
/// atomic step. Returns a flat array of (list index, message) pairs.
const FETCH_SCRIPT: &str = r#"
local want = tonumber(ARGV[1])
local now = ARGV[2]
local out = {}
for i = 4, #KEYS do
  if want <= 0 then break end
  local got = redis.call('RPOP', KEYS[i], want)
  if got then
    for _, msg in ipairs(got) do
      local ok, env = pcall(cjson.decode, msg)
      if ok and type(env) == 'table' and type(env.properties) == 'table'
          and type(env.properties.delivery_tag) == 'string' then
        local info = env.properties.delivery_info
        local ex, rk = '', ''
        if type(info) == 'table' then
          if type(info.exchange) == 'string' then ex = info.exchange end
          if type(info.routing_key) == 'string' then rk = info.routing_key end
        end
        local tag = env.properties.delivery_tag
        redis.call('ZADD', KEYS[2], now, tag)
        redis.call('HSET', KEYS[1], tag,
          '[' .. msg .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
        redis.call('SADD', KEYS[3], tag)
      end
      out[#out + 1] = i - 4
      out[#out + 1] = msg
    end
    want = want - #got
  end
end
return out
"#;

/// Releases the restore lock only if we still hold it.
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A message popped from a list, with its envelope parsed (or why it could not be).
struct RawDelivery {
    raw: Arc<Vec<u8>>,
    /// The queue (not the priority sub-list) it was taken from.
    queue: String,
    delivery_tag: String,
    envelope: std::result::Result<IncomingEnvelope, String>,
}

impl RawDelivery {
    /// The transport-neutral form; the body is base64-decoded here, off the GIL.
    fn into_fetched(self) -> Fetched {
        let bad = |reason: String, tag: String, queue: String| {
            Fetched::Message(Err(BadMessage {
                delivery_tag: tag,
                queue,
                reason,
            }))
        };
        let envelope = match self.envelope {
            Ok(envelope) => envelope,
            Err(reason) => return bad(reason, self.delivery_tag, self.queue),
        };
        let body = match envelope.body_bytes() {
            Ok(body) => body,
            Err(err) => return bad(err.to_string(), self.delivery_tag, self.queue),
        };
        let redelivered = envelope.redelivered();
        let props = envelope.properties;
        let (exchange, routing_key) = match props.delivery_info {
            Some(info) => (info.exchange, info.routing_key),
            None => (String::new(), self.queue.clone()),
        };
        Fetched::Message(Ok(IncomingMessage {
            delivery_tag: self.delivery_tag,
            queue: self.queue,
            exchange,
            routing_key,
            redelivered,
            priority: props.priority.unwrap_or(0),
            reply_to: props.reply_to,
            correlation_id: props.correlation_id,
            content_type: envelope.content_type,
            content_encoding: envelope.content_encoding,
            headers: envelope.headers,
            body,
        }))
    }
}

struct InFlight {
    raw: Arc<Vec<u8>>,
    list_key: String,
}

enum AckCommand {
    Ack(Vec<String>),
    Requeue(String),
    /// Back at the front of their lists, oldest served first (`give_back`).
    GiveBack(Vec<String>),
    RestoreAll(oneshot::Sender<Result<usize>>),
}

struct ConsumerShared {
    options: RedisOptions,
    /// The queues consumed and their lists; replaced whole by `add_consumer` /
    /// `cancel_consumer`, read (an `Arc` clone) by each fetch.
    lists: RwLock<Arc<QueueLists>>,
    /// The generation of the lists the fetch in progress reads (None between
    /// fetches): `cancel_queue` waits until no fetch reads the cancelled queue.
    fetching: watch::Sender<Option<u64>>,
    /// Wakes a fetcher that waits for a message: the queues changed, or it must stop.
    queues_changed: Notify,
    window: Semaphore,
    unbounded: bool,
    in_flight: Mutex<HashMap<String, InFlight>>,
    closed: AtomicBool,
    masked: String,
    /// This consumer's name in the heartbeat registry.
    id: String,
    /// The set of delivery tags this consumer holds unacked (`celeriac.owned.<id>`).
    owned_key: String,
    /// Window slots still to take back after `extend_window` shrank it by more than
    /// was free at the time; paid from the next releases.
    debt: Mutex<usize>,
    /// Slots freed by acks and not yet given back to the fetcher: they are given back
    /// `release_batch` at a time (or all at the next `fetch`), so the fetcher is woken
    /// once per few acks and takes several messages per round trip.
    deferred: AtomicUsize,
    release_batch: usize,
    /// True when the last fetch found messages waiting (no blocking pop was needed):
    /// more work is queued, so the ack writer may linger to batch acks.
    backlog: AtomicBool,
}

/// The queues a consumer reads and their priority lists.
struct QueueLists {
    /// Bumped by each change.
    generation: u64,
    queues: Vec<String>,
    /// The priority lists of every queue, priority-major (kombu's BRPOP order).
    keys: Vec<String>,
    /// The queue each list belongs to.
    queue_of: Vec<String>,
}

impl QueueLists {
    fn new(options: &RedisOptions, queues: Vec<String>, generation: u64) -> Self {
        let mut keys = Vec::new();
        let mut queue_of = Vec::new();
        for step in PRIORITY_STEPS {
            for queue in &queues {
                keys.push(options.key(&priority_key(queue, step)));
                queue_of.push(queue.clone());
            }
        }
        Self {
            generation,
            queues,
            keys,
            queue_of,
        }
    }
}

/// kombu's binding of queue `queue` to the direct exchange of the same name.
fn binding(options: &RedisOptions, queue: &str) -> (String, String) {
    (
        options.key(&format!("_kombu.binding.{queue}")),
        format!("{queue}{PRIORITY_SEP}{PRIORITY_SEP}{queue}"),
    )
}

/// The registry of live consumers (a set of ids), shared by every celeriac consumer.
const CONSUMERS_KEY: &str = "celeriac.consumers";

fn heartbeat_key(options: &RedisOptions, id: &str) -> String {
    options.key(&format!("celeriac.heartbeat.{id}"))
}

fn owned_key(options: &RedisOptions, id: &str) -> String {
    options.key(&format!("celeriac.owned.{id}"))
}

impl ConsumerShared {
    fn release(&self, count: usize) {
        if self.unbounded || count == 0 {
            return;
        }
        let mut count = count;
        if let Ok(mut debt) = self.debt.lock() {
            let paid = (*debt).min(count);
            *debt -= paid;
            count -= paid;
        }
        if count > 0 {
            self.window.add_permits(count);
        }
    }

    /// Grow (`delta > 0`) or shrink the prefetch window; a shrink larger than the free
    /// slots is taken back from later releases.
    fn extend_window(&self, delta: i64) {
        if self.unbounded || delta == 0 {
            return;
        }
        if delta > 0 {
            let mut grow = usize::try_from(delta).unwrap_or(usize::MAX);
            if let Ok(mut debt) = self.debt.lock() {
                let paid = (*debt).min(grow);
                *debt -= paid;
                grow -= paid;
            }
            if grow > 0 {
                self.window.add_permits(grow);
            }
        } else {
            let shrink = usize::try_from(delta.unsigned_abs()).unwrap_or(usize::MAX);
            let taken = self.window.forget_permits(shrink);
            if taken < shrink {
                if let Ok(mut debt) = self.debt.lock() {
                    *debt += shrink - taken;
                }
            }
        }
    }

    fn lists(&self) -> Arc<QueueLists> {
        match self.lists.read() {
            Ok(lists) => lists.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replace the queue list with `change(current)`, if it gives one; the new
    /// generation.
    fn change_queues(&self, change: impl FnOnce(&[String]) -> Option<Vec<String>>) -> Option<u64> {
        let mut lists = match self.lists.write() {
            Ok(lists) => lists,
            Err(poisoned) => poisoned.into_inner(),
        };
        let queues = change(&lists.queues)?;
        let generation = lists.generation + 1;
        *lists = Arc::new(QueueLists::new(&self.options, queues, generation));
        self.queues_changed.notify_one();
        Some(generation)
    }

    fn forget(&self, tags: &[String]) -> usize {
        let Ok(mut map) = self.in_flight.lock() else {
            return 0;
        };
        tags.iter().filter(|tag| map.remove(*tag).is_some()).count()
    }
}

/// Takes messages from queues within a prefetch window; acks them in batches.
pub struct RedisConsumer {
    shared: Arc<ConsumerShared>,
    ack_tx: mpsc::UnboundedSender<AckCommand>,
    /// Becomes true when the fetch task has ended.
    fetcher_stopped: watch::Receiver<bool>,
    /// For `add_queue`'s binding and `CLIENT UNBLOCK` (the ack connection).
    control_conn: MultiplexedConnection,
}

/// Tells the consumer the fetch task has ended, however it ends.
struct StoppedGuard(watch::Sender<bool>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

const MAX_FETCH_BATCH: usize = 512;

/// How long the fetcher waits for a waker before it runs its script again anyway.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// How long the ack writer waits for more acks before writing a small batch.
const ACK_LINGER: Duration = Duration::from_millis(1);
/// Batches at least this big are written at once.
const ACK_BATCH_TARGET: usize = 64;

impl RedisConsumer {
    /// Connect and start fetching into `deliveries`. `prefetch_count` 0 = unbounded.
    pub async fn connect(
        url: &BrokerUrl,
        queues: &[String],
        prefetch_count: usize,
        options: RedisOptions,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) -> Result<Self> {
        if queues.is_empty() {
            return Err(Error::Connection("no queue to consume from".into()));
        }
        let mut ack_conn =
            connect(url, options.connect_timeout, Some(Duration::from_secs(30))).await?;
        ensure_server_version(&mut ack_conn, url.masked()).await?;
        let fetch_conn = connect(url, options.connect_timeout, None).await?;
        // Declare the bindings as a Celery worker does, so kombu peers see the queues.
        let mut pipe = redis::pipe();
        for queue in queues {
            let (key, member) = binding(&options, queue);
            pipe.cmd("SADD").arg(key).arg(member).ignore();
        }
        pipe.query_async::<()>(&mut ack_conn).await?;

        let lists = QueueLists::new(&options, queues.to_vec(), 0);
        let unbounded = prefetch_count == 0;
        let id = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let heartbeats = !options.heartbeat_interval.is_zero();
        if heartbeats {
            // Registered before the first fetch, so no message is held unseen.
            beat(&mut ack_conn, &options, &id).await?;
        }
        let shared = Arc::new(ConsumerShared {
            window: Semaphore::new(if unbounded { 0 } else { prefetch_count }),
            unbounded,
            lists: RwLock::new(Arc::new(lists)),
            fetching: watch::channel(None).0,
            queues_changed: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            masked: url.masked().to_owned(),
            owned_key: owned_key(&options, &id),
            id,
            debt: Mutex::new(0),
            deferred: AtomicUsize::new(0),
            release_batch: (prefetch_count / 2).max(1),
            backlog: AtomicBool::new(false),
            options,
        });
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (stopped_tx, fetcher_stopped) = watch::channel(false);
        tokio::spawn(fetch_loop(
            fetch_conn,
            url.clone(),
            shared.clone(),
            deliveries,
            StoppedGuard(stopped_tx),
        ));
        tokio::spawn(ack_loop(
            ack_conn.clone(),
            url.clone(),
            shared.clone(),
            ack_rx,
        ));
        if heartbeats {
            tokio::spawn(heartbeat_loop(
                ack_conn.clone(),
                url.clone(),
                shared.clone(),
            ));
        }
        let control_conn = ack_conn.clone();
        tokio::spawn(restore_visible_loop(ack_conn, shared.clone()));
        Ok(Self {
            shared,
            ack_tx,
            fetcher_stopped,
            control_conn,
        })
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        // An ack handed to the I/O task is as good as written (it is retried until it
        // is): free the window slots now, so the next fetch overlaps with writing the
        // ack instead of waiting a round trip for it.
        let released = self.shared.forget(&tags);
        self.defer_release(released);
        self.ack_tx
            .send(AckCommand::Ack(tags))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Give `count` window slots back, in groups of `release_batch`: waking the
    /// fetcher costs more than the ack itself, and one slot per round trip is slow.
    fn defer_release(&self, count: usize) {
        if count == 0 || self.shared.unbounded {
            return;
        }
        let pending = self.shared.deferred.fetch_add(count, Ordering::AcqRel) + count;
        if pending >= self.shared.release_batch {
            self.release_deferred();
        }
    }

    /// Give back every slot freed by acks so far (the caller is about to wait for
    /// messages, so nothing may stay held back).
    pub fn release_deferred(&self) {
        let pending = self.shared.deferred.swap(0, Ordering::AcqRel);
        self.shared.release(pending);
    }

    /// `requeue=false` drops the message (kombu: same as ack); `true` puts it back.
    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        let command = if requeue {
            AckCommand::Requeue(tag)
        } else {
            let released = self.shared.forget(std::slice::from_ref(&tag));
            self.defer_release(released);
            AckCommand::Ack(vec![tag])
        };
        self.ack_tx
            .send(command)
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Put these fetched, unacked messages back at the front of their lists, in the
    /// order they were fetched, and free their window slots, so another consumer can
    /// take them next (a prefork child about to run a long task). Unknown tags are
    /// skipped.
    pub fn give_back(&self, tags: Vec<String>) -> Result<()> {
        self.ack_tx
            .send(AckCommand::GiveBack(tags))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop fetching and put every fetched, unacked message back at the front of its
    /// list (so it is consumed next), marked redelivered.
    pub async fn restore_unacked(&self) -> Result<usize> {
        self.close();
        // A fetch in flight may still take messages; wait for the fetcher to end so
        // they are restored too.
        let mut stopped = self.fetcher_stopped.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), stopped.wait_for(|done| *done)).await;
        let (tx, rx) = oneshot::channel();
        self.ack_tx
            .send(AckCommand::RestoreAll(tx))
            .map_err(|_| Error::Closed("the consumer"))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))?
    }

    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.window.close();
        self.shared.queues_changed.notify_one();
    }

    /// Grow (`delta > 0`) or shrink the prefetch window, e.g. by one for each message
    /// held until its ETA (Celery's `qos.increment_eventually`). No effect when the
    /// window is unbounded.
    pub fn extend_window(&self, delta: i64) {
        self.shared.extend_window(delta);
    }

    /// This consumer's id in the heartbeat registry.
    /// Consume from `queue` too (its kombu binding declared first); false when it
    /// was consumed already. The fetcher reads it from its next round.
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        if self.shared.lists().queues.iter().any(|q| q == queue) {
            return Ok(false);
        }
        let mut conn = self.control_conn.clone();
        let (key, member) = binding(&self.shared.options, queue);
        redis::cmd("SADD")
            .arg(key)
            .arg(member)
            .query_async::<()>(&mut conn)
            .await?;
        let changed = self.shared.change_queues(|queues| {
            (!queues.iter().any(|q| q == queue)).then(|| {
                let mut queues = queues.to_vec();
                queues.push(queue.to_owned());
                queues
            })
        });
        if let Some(generation) = changed {
            self.wait_for_fetcher(generation).await;
        }
        Ok(changed.is_some())
    }

    /// Wait (at most 3 s) until no fetch reads lists older than `generation` (a
    /// fetcher waiting for a push reads none: `change_queues` wakes it).
    async fn wait_for_fetcher(&self, generation: u64) {
        let mut fetching = self.shared.fetching.subscribe();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !self.shared.closed.load(Ordering::Acquire) {
            if fetching
                .borrow_and_update()
                .is_none_or(|seen| seen >= generation)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), fetching.changed()).await;
        }
    }

    /// Stop fetching from `queue`; false when it was not consumed. Returns once no
    /// fetch reads it any more; messages
    /// already fetched from it are still handed over and acked as usual.
    pub async fn cancel_queue(&self, queue: &str) -> bool {
        let changed = self.shared.change_queues(|queues| {
            queues
                .iter()
                .any(|q| q == queue)
                .then(|| queues.iter().filter(|q| *q != queue).cloned().collect())
        });
        let Some(generation) = changed else {
            return false;
        };
        self.wait_for_fetcher(generation).await;
        true
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    pub fn masked_url(&self) -> &str {
        &self.shared.masked
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        self.close();
    }
}

async fn fetch_loop(
    mut conn: MultiplexedConnection,
    url: BrokerUrl,
    shared: Arc<ConsumerShared>,
    deliveries: mpsc::UnboundedSender<Fetched>,
    _stopped: StoppedGuard,
) {
    let script = Script::new(FETCH_SCRIPT);
    let mut wakers = Wakers::new(url.clone(), shared.options.connect_timeout);
    let mut failures = 0u32;
    while !shared.closed.load(Ordering::Acquire) {
        // Take as much of the prefetch window as is free (at least one slot).
        let mut credits = MAX_FETCH_BATCH;
        if !shared.unbounded {
            let Ok(first) = shared.window.acquire().await else {
                return;
            };
            first.forget();
            credits = 1;
            while credits < MAX_FETCH_BATCH {
                match shared.window.try_acquire() {
                    Ok(permit) => {
                        permit.forget();
                        credits += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        let lists = shared.lists();
        shared.fetching.send_replace(Some(lists.generation));
        let result = fetch_once(&mut conn, &script, &shared, &lists, credits).await;
        shared.fetching.send_replace(None);
        let batch = match result {
            Ok(batch) => batch,
            Err(err) => {
                shared.release(credits);
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                if failures == 0 {
                    let text = format!("lost the connection to {}: {err}", shared.masked);
                    if deliveries.send(Fetched::Error(text)).is_err() {
                        return;
                    }
                }
                tokio::time::sleep(backoff(failures)).await;
                failures += 1;
                if let Ok(fresh) = connect(&url, shared.options.connect_timeout, None).await {
                    conn = fresh;
                }
                continue;
            }
        };
        failures = 0;
        // Malformed messages are not tracked (nothing to restore), so they do not hold
        // a slot of the window.
        shared.release(credits.saturating_sub(tracked(&batch)));
        remember(&shared, &batch);
        if shared.closed.load(Ordering::Acquire) {
            // What was taken is recorded in `unacked`; restore_unacked puts it back.
            return;
        }
        if batch.is_empty() {
            // Every list was empty: wait for a push (or a change of queues, or close),
            // then look again.
            wakers.follow(&lists.keys);
            wakers.wait(IDLE_RECHECK, &shared.queues_changed).await;
            continue;
        }
        for delivery in batch {
            if deliveries.send(delivery.into_fetched()).is_err() {
                return;
            }
        }
    }
}

fn remember(shared: &ConsumerShared, batch: &[RawDelivery]) {
    if let Ok(mut map) = shared.in_flight.lock() {
        for delivery in batch.iter().filter(|d| d.envelope.is_ok()) {
            let list_key = delivery_list_key(shared, delivery);
            map.insert(
                delivery.delivery_tag.clone(),
                InFlight {
                    raw: delivery.raw.clone(),
                    list_key,
                },
            );
        }
    }
}

fn tracked(batch: &[RawDelivery]) -> usize {
    batch.iter().filter(|d| d.envelope.is_ok()).count()
}

fn delivery_list_key(shared: &ConsumerShared, delivery: &RawDelivery) -> String {
    let priority = delivery
        .envelope
        .as_ref()
        .ok()
        .and_then(|env| env.properties.priority)
        .unwrap_or(0)
        .clamp(0, 9) as u8;
    shared.options.key(&priority_key(&delivery.queue, priority))
}

/// One batch: the scripted pop, which records what it takes in `unacked` in the same
/// atomic step. Empty when every list is (or no queue is consumed).
async fn fetch_once(
    conn: &mut MultiplexedConnection,
    script: &Script,
    shared: &ConsumerShared,
    lists: &QueueLists,
    credits: usize,
) -> Result<Vec<RawDelivery>> {
    if lists.keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = script.prepare_invoke();
    invocation
        .key(shared.options.key(&shared.options.unacked_key))
        .key(shared.options.key(&shared.options.unacked_index_key))
        .key(&shared.owned_key);
    for key in &lists.keys {
        invocation.key(key);
    }
    invocation.arg(credits).arg(unix_now());
    let popped: Vec<(usize, Vec<u8>)> = invocation.invoke_async(conn).await?;
    shared.backlog.store(!popped.is_empty(), Ordering::Release);
    Ok(popped
        .into_iter()
        .map(|(index, raw)| {
            let queue = lists.queue_of.get(index).cloned().unwrap_or_default();
            parse_delivery(raw, queue)
        })
        .collect())
}

fn parse_delivery(raw: Vec<u8>, queue: String) -> RawDelivery {
    let envelope = IncomingEnvelope::parse(&raw).map_err(|err| err.to_string());
    let delivery_tag = match &envelope {
        Ok(env) => env.properties.delivery_tag.clone(),
        Err(_) => envelope::peek_delivery_tag(&raw)
            .unwrap_or_else(|| format!("invalid-{}", uuid::Uuid::new_v4())),
    };
    RawDelivery {
        raw: Arc::new(raw),
        queue,
        delivery_tag,
        envelope,
    }
}

async fn ack_loop(
    mut conn: MultiplexedConnection,
    url: BrokerUrl,
    shared: Arc<ConsumerShared>,
    mut rx: mpsc::UnboundedReceiver<AckCommand>,
) {
    let mut commands = Vec::with_capacity(256);
    while rx.recv_many(&mut commands, 1024).await > 0 {
        // When more messages are queued, linger a moment so the acks of the next tasks
        // join this write: one pipeline (and one wake-up of this task) per batch
        // instead of per task. The window slots were freed by `ack` already, so
        // fetching does not wait for this. With nothing queued, a lone ack is written
        // at once, so it does not land on the next message's path.
        if commands.len() < ACK_BATCH_TARGET
            && shared.backlog.load(Ordering::Acquire)
            && commands.iter().all(|c| matches!(c, AckCommand::Ack(_)))
        {
            tokio::time::sleep(ACK_LINGER).await;
            while commands.len() < 1024 {
                match rx.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
        }
        let mut tags: Vec<String> = Vec::new();
        for command in commands.drain(..) {
            match command {
                AckCommand::Ack(mut batch) => tags.append(&mut batch),
                AckCommand::Requeue(tag) => {
                    let entry = shared
                        .in_flight
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&tag));
                    if let Some(entry) = entry {
                        let mut pipe = redis::pipe();
                        pipe.atomic()
                            .cmd("LPUSH")
                            .arg(&entry.list_key)
                            .arg(entry.raw.as_slice())
                            .ignore();
                        unacked_removal(&mut pipe, &shared, std::slice::from_ref(&tag));
                        run_with_retry(&mut conn, &url, &shared, &pipe).await;
                        shared.release(1);
                    } else {
                        // Another consumer's message (e.g. a worker process that died
                        // running it): put it back from kombu's `unacked` record.
                        let _ = requeue_recorded(&mut conn, &shared.options, &tag, false).await;
                    }
                }
                AckCommand::GiveBack(given) => {
                    let entries: Vec<(String, InFlight)> = match shared.in_flight.lock() {
                        Ok(mut in_flight) => given
                            .into_iter()
                            .filter_map(|tag| in_flight.remove(&tag).map(|entry| (tag, entry)))
                            .collect(),
                        Err(_) => Vec::new(),
                    };
                    if !entries.is_empty() {
                        let mut pipe = redis::pipe();
                        pipe.atomic();
                        // RPUSH puts a message where BRPOP takes the next one: the
                        // newest goes first so the oldest ends up served first.
                        for (_, entry) in entries.iter().rev() {
                            pipe.cmd("RPUSH")
                                .arg(&entry.list_key)
                                .arg(entry.raw.as_slice())
                                .ignore();
                        }
                        let tags: Vec<String> = entries.into_iter().map(|(tag, _)| tag).collect();
                        unacked_removal(&mut pipe, &shared, &tags);
                        run_with_retry(&mut conn, &url, &shared, &pipe).await;
                        shared.release(tags.len());
                    }
                }
                AckCommand::RestoreAll(reply) => {
                    if !tags.is_empty() {
                        let released = shared.forget(&tags);
                        let mut pipe = redis::pipe();
                        unacked_removal(&mut pipe, &shared, &tags);
                        run_with_retry(&mut conn, &url, &shared, &pipe).await;
                        shared.release(released);
                        tags.clear();
                    }
                    let restored = restore_all(&mut conn, &shared).await;
                    if restored.is_ok() && !shared.options.heartbeat_interval.is_zero() {
                        let _ = unregister(&mut conn, &shared).await;
                    }
                    let _ = reply.send(restored);
                }
            }
        }
        if !tags.is_empty() {
            let released = shared.forget(&tags);
            let mut pipe = redis::pipe();
            unacked_removal(&mut pipe, &shared, &tags);
            run_with_retry(&mut conn, &url, &shared, &pipe).await;
            shared.release(released);
        }
    }
}

fn unacked_removal(pipe: &mut redis::Pipeline, shared: &ConsumerShared, tags: &[String]) {
    let options = &shared.options;
    pipe.cmd("SREM").arg(&shared.owned_key).arg(tags).ignore();
    pipe.cmd("ZREM")
        .arg(options.key(&options.unacked_index_key))
        .arg(tags)
        .ignore();
    pipe.cmd("HDEL")
        .arg(options.key(&options.unacked_key))
        .arg(tags)
        .ignore();
}

/// Acks must not be lost to a passing disconnect: retry until written or closed.
async fn run_with_retry(
    conn: &mut MultiplexedConnection,
    url: &BrokerUrl,
    shared: &ConsumerShared,
    pipe: &redis::Pipeline,
) {
    let mut attempt = 0;
    while pipe.query_async::<()>(conn).await.is_err() {
        if attempt > 50 {
            return; // the visibility timeout will restore these messages
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
        if let Ok(fresh) = connect(
            url,
            shared.options.connect_timeout,
            Some(Duration::from_secs(30)),
        )
        .await
        {
            *conn = fresh;
        }
    }
}

/// Mark a message redelivered the way kombu does on restore.
fn mark_redelivered(raw: &[u8]) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return raw.to_vec();
    };
    if let Some(headers) = value.get_mut("headers").and_then(|h| h.as_object_mut()) {
        headers.insert("redelivered".into(), true.into());
    }
    if let Some(info) = value
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(|i| i.as_object_mut())
    {
        info.insert("redelivered".into(), true.into());
    }
    crate::protocol::json::to_vec(&value).unwrap_or_else(|_| raw.to_vec())
}

async fn restore_all(conn: &mut MultiplexedConnection, shared: &ConsumerShared) -> Result<usize> {
    let entries: Vec<(String, InFlight)> = match shared.in_flight.lock() {
        Ok(mut map) => map.drain().collect(),
        Err(_) => return Ok(0),
    };
    if entries.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut tags = Vec::with_capacity(entries.len());
    for (tag, entry) in &entries {
        pipe.cmd("RPUSH")
            .arg(&entry.list_key)
            .arg(mark_redelivered(&entry.raw))
            .ignore();
        tags.push(tag.clone());
    }
    unacked_removal(&mut pipe, shared, &tags);
    pipe.query_async::<()>(conn).await?;
    shared.release(entries.len());
    Ok(entries.len())
}

/// Leave the heartbeat registry (the consumer stopped cleanly).
async fn unregister(conn: &mut MultiplexedConnection, shared: &ConsumerShared) -> Result<()> {
    redis::pipe()
        .cmd("DEL")
        .arg(&shared.owned_key)
        .arg(heartbeat_key(&shared.options, &shared.id))
        .ignore()
        .cmd("SREM")
        .arg(shared.options.key(CONSUMERS_KEY))
        .arg(&shared.id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Every `restore_interval`, put back messages unacked for longer than the visibility
/// timeout (their worker died), under kombu's `unacked_mutex` so that only one
/// process restores at a time.
async fn restore_visible_loop(mut conn: MultiplexedConnection, shared: Arc<ConsumerShared>) {
    loop {
        tokio::time::sleep(shared.options.restore_interval).await;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        // Errors are retried on the next round; the fetcher reports connection loss.
        let _ = restore_visible(&mut conn, &shared.options).await;
    }
}

/// Restore messages whose visibility timeout has passed. Returns how many.
/// Take kombu's `unacked_mutex` (SET NX PX) so that one process restores at a time;
/// the token to release it with, or `None` when another process holds it.
async fn lock_restore(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<Option<String>> {
    let token = uuid::Uuid::new_v4().to_string();
    let locked: Option<String> = redis::cmd("SET")
        .arg(options.key(&options.unacked_mutex_key))
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(options.unacked_mutex_expire.as_millis() as u64)
        .query_async(conn)
        .await?;
    Ok(locked.map(|_| token))
}

/// Release the mutex if we still hold it; a failure only lets it expire.
async fn unlock_restore(conn: &mut MultiplexedConnection, options: &RedisOptions, token: &str) {
    let _: i64 = Script::new(UNLOCK_SCRIPT)
        .key(options.key(&options.unacked_mutex_key))
        .arg(token)
        .invoke_async(conn)
        .await
        .unwrap_or(0);
}

pub async fn restore_visible(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<usize> {
    let Some(token) = lock_restore(conn, options).await? else {
        return Ok(0);
    };
    let result = restore_expired(conn, options).await;
    unlock_restore(conn, options, &token).await;
    result
}

async fn restore_expired(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<usize> {
    let index_key = options.key(&options.unacked_index_key);
    let ceiling = unix_now() - options.visibility_timeout.as_secs_f64();
    let tags: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&index_key)
        .arg("-inf")
        .arg(ceiling)
        .arg("LIMIT")
        .arg(0)
        .arg(1000)
        .query_async(conn)
        .await?;
    let mut restored = 0;
    for tag in tags {
        if requeue_recorded(conn, options, &tag, true).await? {
            restored += 1;
        }
    }
    Ok(restored)
}

/// Put the message recorded under `tag` in kombu's `unacked` hash back in its queue(s),
/// marked redelivered, and forget the record: at the front of the line (`RPUSH`, served
/// next) when `front`, else at the back (`LPUSH`, as kombu's `reject(requeue=True)`).
/// Returns whether there was a message to put back.
async fn requeue_recorded(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    tag: &str,
    front: bool,
) -> Result<bool> {
    let index_key = options.key(&options.unacked_index_key);
    let unacked_key = options.key(&options.unacked_key);
    let record: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&unacked_key)
        .arg(tag)
        .query_async(conn)
        .await?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut found = false;
    if let Some(record) = record {
        if let Ok((raw, exchange, routing_key)) =
            serde_json::from_slice::<(Box<RawValue>, String, String)>(&record)
        {
            let raw = raw.get().as_bytes();
            let priority = IncomingEnvelope::parse(raw)
                .ok()
                .and_then(|env| env.properties.priority)
                .unwrap_or(0)
                .clamp(0, 9) as u8;
            for queue in bound_queues(conn, options, &exchange, &routing_key).await? {
                pipe.cmd(if front { "RPUSH" } else { "LPUSH" })
                    .arg(options.key(&priority_key(&queue, priority)))
                    .arg(mark_redelivered(raw))
                    .ignore();
            }
            found = true;
        }
    }
    pipe.cmd("ZREM").arg(&index_key).arg(tag).ignore();
    pipe.cmd("HDEL").arg(&unacked_key).arg(tag).ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(found)
}

/// Refresh this consumer's heartbeat key and its place in the registry.
async fn beat(conn: &mut MultiplexedConnection, options: &RedisOptions, id: &str) -> Result<()> {
    let ttl = options
        .heartbeat_ttl
        .max(options.heartbeat_interval * 2)
        .as_millis() as u64;
    redis::pipe()
        .cmd("SET")
        .arg(heartbeat_key(options, id))
        .arg(unix_now())
        .arg("PX")
        .arg(ttl)
        .ignore()
        .cmd("SADD")
        .arg(options.key(CONSUMERS_KEY))
        .arg(id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Every `heartbeat_interval`: refresh our heartbeat, put back the unacked messages of
/// consumers whose heartbeat has expired (they died: SIGKILL, OOM, power loss), and
/// now and then move our own unacked messages' `unacked_index` score to now, so that
/// no visibility-timeout restore (ours or kombu's) takes them while we live.
async fn heartbeat_loop(
    mut conn: MultiplexedConnection,
    url: BrokerUrl,
    shared: Arc<ConsumerShared>,
) {
    let interval = shared.options.heartbeat_interval;
    // Refresh scores well within the visibility timeout (at least once a minute).
    let refresh_every = (shared.options.visibility_timeout / 4)
        .min(Duration::from_secs(60))
        .max(interval);
    let mut last_refresh = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        if beat(&mut conn, &shared.options, &shared.id).await.is_err() {
            // The fetcher reports a lost connection; try a fresh one next round.
            if let Ok(fresh) = connect(
                &url,
                shared.options.connect_timeout,
                Some(Duration::from_secs(30)),
            )
            .await
            {
                conn = fresh;
            }
            continue;
        }
        let _ = recover_dead(&mut conn, &shared.options, &shared.id).await;
        if last_refresh.elapsed() >= refresh_every {
            last_refresh = Instant::now();
            let tags: Vec<String> = shared
                .in_flight
                .lock()
                .map(|map| map.keys().cloned().collect())
                .unwrap_or_default();
            if !tags.is_empty() {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(shared.options.key(&shared.options.unacked_index_key))
                    .arg("XX");
                let now = unix_now();
                for tag in &tags {
                    cmd.arg(now).arg(tag);
                }
                let _ = cmd.query_async::<()>(&mut conn).await;
            }
        }
    }
}

/// Put back every message held by a registered consumer whose heartbeat has expired.
/// Runs under kombu's `unacked_mutex`, so one process restores at a time. Returns how
/// many messages went back.
pub async fn recover_dead(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    own_id: &str,
) -> Result<usize> {
    let registry = options.key(CONSUMERS_KEY);
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&registry)
        .query_async(conn)
        .await?;
    let others: Vec<&String> = ids.iter().filter(|id| id.as_str() != own_id).collect();
    if others.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for id in &others {
        pipe.cmd("EXISTS").arg(heartbeat_key(options, id));
    }
    let alive: Vec<bool> = pipe.query_async(conn).await?;
    let dead: Vec<&String> = others
        .into_iter()
        .zip(alive)
        .filter_map(|(id, alive)| (!alive).then_some(id))
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let Some(token) = lock_restore(conn, options).await? else {
        return Ok(0);
    };
    let mut restored = 0;
    let mut result = Ok(());
    for id in dead {
        match recover_one(conn, options, id).await {
            Ok(count) => restored += count,
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    unlock_restore(conn, options, &token).await;
    result.map(|()| restored)
}

async fn recover_one(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    id: &str,
) -> Result<usize> {
    // Checked again under the lock: a slow consumer may have come back.
    let alive: bool = redis::cmd("EXISTS")
        .arg(heartbeat_key(options, id))
        .query_async(conn)
        .await?;
    if alive {
        return Ok(0);
    }
    let owned = owned_key(options, id);
    let tags: Vec<String> = redis::cmd("SMEMBERS").arg(&owned).query_async(conn).await?;
    let mut restored = 0;
    for tag in &tags {
        if requeue_recorded(conn, options, tag, true).await? {
            restored += 1;
        }
    }
    redis::pipe()
        .cmd("DEL")
        .arg(&owned)
        .ignore()
        .cmd("SREM")
        .arg(options.key(CONSUMERS_KEY))
        .arg(id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(restored)
}

/// The queues a (direct) exchange routes `routing_key` to; `''` is the default exchange.
async fn bound_queues(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    exchange: &str,
    routing_key: &str,
) -> Result<Vec<String>> {
    if exchange.is_empty() {
        return Ok(vec![routing_key.to_owned()]);
    }
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(options.key(&format!("_kombu.binding.{exchange}")))
        .query_async(conn)
        .await?;
    let queues: Vec<String> = members
        .iter()
        .filter_map(|member| {
            let mut parts = member.split(PRIORITY_SEP);
            let key = parts.next()?;
            let _pattern = parts.next()?;
            let queue = parts.next()?;
            (key == routing_key).then(|| queue.to_owned())
        })
        .collect();
    Ok(if queues.is_empty() {
        vec![routing_key.to_owned()]
    } else {
        queues
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_round_down_to_kombu_steps() {
        assert_eq!(priority_key("celery", 0), "celery");
        assert_eq!(priority_key("celery", 2), "celery");
        assert_eq!(priority_key("celery", 3), "celery\x06\x163");
        assert_eq!(priority_key("celery", 5), "celery\x06\x163");
        assert_eq!(priority_key("celery", 8), "celery\x06\x166");
        assert_eq!(priority_key("celery", 9), "celery\x06\x169");
        assert_eq!(priority_key("celery", 200), "celery\x06\x169");
    }

    #[test]
    fn server_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 0, 15)));
        assert_eq!(server_version("redis_version:6.2\n"), Some((6, 2, 0)));
        assert_eq!(server_version("redis_version:8\n"), Some((8, 0, 0)));
        // Not told, or not a version: unknown.
        assert_eq!(server_version("# Server\r\nuptime_in_seconds:3\r\n"), None);
        assert_eq!(server_version("redis_version:\r\n"), None);
        assert_eq!(server_version("redis_version:seven\r\n"), None);
        assert_eq!(server_version("redis_version:7.x.1\r\n"), None);
        assert_eq!(server_version(""), None);
    }

    #[test]
    fn a_server_older_than_6_2_is_refused_by_url_and_version() {
        let masked = "redis://:**@10.0.0.7:6379/0";
        for old in [
            "redis_version:6.0.16",
            "redis_version:5.0.14",
            "redis_version:2.8.24",
        ] {
            let err = check_server_version(old, masked).expect_err(old);
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            let text = err.to_string();
            let found = old.trim_start_matches("redis_version:");
            assert!(text.contains(masked), "{text}");
            assert!(text.contains(&format!("version {found}")), "{text}");
            assert!(text.contains("6.2 or later"), "{text}");
        }
        for ok in [
            "redis_version:6.2.0",
            "redis_version:7.0.15",
            "redis_version:10.1.0",
        ] {
            check_server_version(ok, masked).expect(ok);
        }
        // A server that does not tell is let through (its first fetch reports a
        // missing command with the server's own error).
        check_server_version("# Server\r\n", masked).expect("unknown version");
    }

    #[test]
    fn restore_marks_redelivered() {
        let raw = br#"{"body": "", "headers": {}, "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}"#;
        let marked: serde_json::Value = serde_json::from_slice(&mark_redelivered(raw)).unwrap();
        assert_eq!(marked["headers"]["redelivered"], true);
        assert_eq!(marked["properties"]["delivery_info"]["redelivered"], true);
    }
}
