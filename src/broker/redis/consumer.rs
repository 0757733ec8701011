//! The consumer: the prefetch window, the fetch script (pop and `unacked` record in one
//! atomic step), waiting for a push (`wake`), acks, requeues, give-backs and restoring
//! what it holds when it stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::Script;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

use super::restore::{
    beat, heartbeat_key, mark_redelivered, owned_key, recover_dead, requeue_recorded,
    restore_visible, CONSUMERS_KEY,
};
use super::wake::Wakers;
use super::{
    connect, ensure_server_version, priority_key, unix_now, RedisOptions, PRIORITY_SEP,
    PRIORITY_STEPS,
};
use crate::broker::url::BrokerUrl;
use crate::broker::{BadMessage, Fetched, IncomingMessage};
use crate::error::{Error, Result};
use crate::protocol::envelope::{self, IncomingEnvelope};
use crate::retry::backoff;

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
    /// `release_batch` at a time (or all at the next `fetch`). The batch is 1: refilling
    /// each slot as it frees starts the next fetch script a task earlier, which an A-B
    /// run measured faster than groups of `window / 2` (docs/latency.md).
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
            release_batch: 1,
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
        crate::trace::hop("ack.handoff");
        let released = self.shared.forget(&tags);
        self.defer_release(released);
        self.ack_tx
            .send(AckCommand::Ack(tags))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Give `count` window slots back, in groups of `release_batch` (see its field).
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
        crate::trace::hop("consume.fetching");
        let result = fetch_once(&mut conn, &script, &shared, &lists, credits).await;
        shared.fetching.send_replace(None);
        let batch = match result {
            Ok(batch) => {
                crate::trace::hop(if batch.is_empty() {
                    "consume.empty"
                } else {
                    "consume.fetched"
                });
                batch
            }
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
                    write_acks(&mut conn, &url, &shared, &mut tags).await;
                    let restored = restore_all(&mut conn, &shared).await;
                    if restored.is_ok() && !shared.options.heartbeat_interval.is_zero() {
                        let _ = unregister(&mut conn, &shared).await;
                    }
                    let _ = reply.send(restored);
                }
            }
        }
        write_acks(&mut conn, &url, &shared, &mut tags).await;
    }
}

/// Write the acks of `tags` and free their window slots; `tags` is left empty.
async fn write_acks(
    conn: &mut MultiplexedConnection,
    url: &BrokerUrl,
    shared: &ConsumerShared,
    tags: &mut Vec<String>,
) {
    if tags.is_empty() {
        return;
    }
    let released = shared.forget(tags);
    let mut pipe = redis::pipe();
    unacked_removal(&mut pipe, shared, tags);
    run_with_retry(conn, url, shared, &pipe).await;
    crate::trace::hop("ack.written");
    shared.release(released);
    tags.clear();
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

impl crate::broker::traits::Consumer for RedisConsumer {
    fn ack(&self, tags: Vec<String>) -> Result<()> {
        RedisConsumer::ack(self, tags)
    }

    fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        RedisConsumer::reject(self, tag, requeue)
    }

    fn give_back(&self, tags: Vec<String>) -> Result<()> {
        RedisConsumer::give_back(self, tags)
    }

    fn release_window(&self) {
        self.release_deferred()
    }

    fn extend_window(&self, delta: i64) -> Result<()> {
        RedisConsumer::extend_window(self, delta);
        Ok(())
    }

    async fn restore_unacked(&self) -> Result<usize> {
        RedisConsumer::restore_unacked(self).await
    }

    async fn add_queue(&self, queue: &str) -> Result<bool> {
        RedisConsumer::add_queue(self, queue).await
    }

    async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        Ok(RedisConsumer::cancel_queue(self, queue).await)
    }

    fn close(&self) {
        RedisConsumer::close(self)
    }
}
