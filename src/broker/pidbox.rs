//! Remote control (celery-wire §6): the broker side of kombu's pidbox `Mailbox`, for
//! Redis and AMQP. One [`Mailbox`] dispatches to one [`Link`] per transport; another
//! backend is one more variant and one more arm in each method.
//!
//! Redis:
//! - Requests are broadcast on the fanout exchange `celery.pidbox`: kombu's Redis
//!   transport makes that one `PUBLISH` on `/{db}.celery.pidbox`, so a worker
//!   `PSUBSCRIBE`s that channel on a connection of its own ([`Mailbox::subscribe`]).
//! - Replies go to the direct exchange `reply.celery.pidbox`: the client binds its reply
//!   queue `<oid>.reply.celery.pidbox` under routing key `<oid>` in kombu's binding table
//!   (`_kombu.binding.reply.celery.pidbox`); a reply is an `LPUSH` of the kombu envelope
//!   to every queue bound with the reply's routing key.
//!
//! AMQP, declared with Celery 5.7's exact flags so that mixed fleets agree:
//! - exchanges `celery.pidbox` (fanout) and `reply.celery.pidbox` (direct), both
//!   non-durable, not auto-delete;
//! - a worker's queue `<node>.celery.pidbox` and a client's reply queue
//!   `<oid>.reply.celery.pidbox`: exclusive, auto-delete, non-durable, `x-expires` =
//!   `control_queue_expires` (10 s) and `x-message-ttl` = `control_queue_ttl` (300 s)
//!   in milliseconds; consumed without acks.
//! - The worker's subscription has a connection of its own and declares its queue
//!   again after a lost connection.
//!
//! SQLite: broadcasts of the embedded database's fanout log (see
//! `sqlite::SqliteMailbox`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use redis::aio::MultiplexedConnection;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Mutex};

use super::amqp::{self, AmqpOptions, QueueSpec};
pub use super::broadcast::{decode, Received};
use super::broadcast::{redis_envelope, Broadcast};
use super::events::{declare_exchange, publish_broadcast, redis_channel, short};
use super::redis::{self as redis_transport, RedisOptions, PRIORITY_SEP};
use super::sqlite::SqliteMailbox;
use super::url::{BrokerUrl, Scheme};
use super::TransportOptions;
use crate::error::{Error, Result};

/// How often [`Mailbox::pop_wait`] looks again where nothing can wait for a message.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long a lost subscription waits before it connects again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Celery's `control_queue_expires` / `control_queue_ttl` (AMQP queue arguments).
#[derive(Debug, Clone, Copy)]
pub struct QueueTimes {
    pub expires: Option<Duration>,
    pub message_ttl: Option<Duration>,
}

impl Default for QueueTimes {
    fn default() -> Self {
        Self {
            expires: Some(Duration::from_secs(10)),
            message_ttl: Some(Duration::from_secs(300)),
        }
    }
}

impl QueueTimes {
    /// A pidbox queue (node or reply) on `exchange` as kombu 5.7 declares it.
    fn spec(&self, queue: &str, exchange: &str, exchange_type: &str, key: &str) -> QueueSpec {
        let mut arguments = Map::new();
        let ms = |d: Duration| Value::from(d.as_millis().min(i32::MAX as u128) as i64);
        if let Some(expires) = self.expires.filter(|d| !d.is_zero()) {
            arguments.insert("x-expires".into(), ms(expires));
        }
        if let Some(ttl) = self.message_ttl.filter(|d| !d.is_zero()) {
            arguments.insert("x-message-ttl".into(), ms(ttl));
        }
        QueueSpec {
            name: queue.to_owned(),
            exchange: exchange.to_owned(),
            exchange_type: exchange_type.to_owned(),
            routing_key: key.to_owned(),
            durable: false,
            auto_delete: true,
            exclusive: true,
            arguments,
            exchange_durable: false,
            exchange_auto_delete: false,
        }
    }
}

/// What a subscriber receives: the broadcasts of `exchange` (declared with
/// `exchange_type` and `durable` on AMQP) through its own exclusive `queue` bound with
/// `binding`.
#[derive(Debug, Clone, Copy)]
pub struct Subscription<'a> {
    pub exchange: &'a str,
    pub exchange_type: &'a str,
    pub durable: bool,
    pub queue: &'a str,
    pub binding: &'a str,
}

pub struct Mailbox {
    link: Link,
    received: Mutex<Option<mpsc::UnboundedReceiver<Received>>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Times the subscription was made again after a lost connection.
    resubscribed: Arc<AtomicU64>,
}

// One per mailbox, never moved after it is built: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
enum Link {
    Redis(RedisLink),
    Amqp(AmqpLink),
    Sqlite(SqliteMailbox),
}

struct RedisLink {
    url: BrokerUrl,
    options: RedisOptions,
    conn: MultiplexedConnection,
    fanout_prefix: String,
}

struct AmqpLink {
    url: BrokerUrl,
    options: AmqpOptions,
    times: QueueTimes,
    conn: Connection,
    channel: Channel,
    /// Exchanges declared on `channel` so far.
    declared: Mutex<std::collections::HashSet<String>>,
    /// Reply queues consumed on `conn`, by name.
    replies: Mutex<HashMap<String, Arc<Mutex<lapin::Consumer>>>>,
}

impl Mailbox {
    pub async fn connect(
        url: &BrokerUrl,
        options: &TransportOptions,
        times: QueueTimes,
    ) -> Result<Self> {
        let link = match url.scheme {
            Scheme::Redis | Scheme::Rediss | Scheme::RedisSocket => {
                let options = RedisOptions::from_transport(options)?;
                let conn = redis_transport::connect(
                    url,
                    options.connect_timeout,
                    Some(Duration::from_secs(10)),
                )
                .await?;
                let fanout_prefix = format!("{}/{}.", options.global_keyprefix, url.db);
                Link::Redis(RedisLink {
                    url: url.clone(),
                    options,
                    conn,
                    fanout_prefix,
                })
            }
            Scheme::Amqp | Scheme::Amqps => {
                let options = AmqpOptions::from_transport(options)?;
                let conn = amqp::connect(url, &options, "pidbox").await?;
                let channel = conn.create_channel().await.map_err(|err| lost(url, &err))?;
                Link::Amqp(AmqpLink {
                    url: url.clone(),
                    options,
                    times,
                    conn,
                    channel,
                    declared: Mutex::new(std::collections::HashSet::new()),
                    replies: Mutex::new(HashMap::new()),
                })
            }
            Scheme::Sqlite => Link::Sqlite(SqliteMailbox::connect(url, options).await?),
        };
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(Self {
            link,
            received: Mutex::new(None),
            stop,
            resubscribed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Start receiving the broadcasts of `exchange` (once; later calls do nothing).
    /// On AMQP they arrive through `queue` (`<node>.celery.pidbox`), declared here.
    pub async fn subscribe(&self, exchange: &str, queue: &str) -> Result<()> {
        self.subscribe_to(&Subscription {
            exchange,
            exchange_type: "fanout",
            durable: false,
            queue,
            binding: "",
        })
        .await
    }

    /// Start receiving what `subscription` describes (once; later calls do nothing):
    /// the pidbox's fanout (see [`Mailbox::subscribe`]) or, for monitors, a topic
    /// exchange such as `celeryev` with binding `#` (Redis: `PSUBSCRIBE
    /// /{db}.celeryev/*`, kombu's `fanout_patterns`).
    pub async fn subscribe_to(&self, subscription: &Subscription<'_>) -> Result<()> {
        let Subscription {
            exchange,
            exchange_type,
            durable,
            queue,
            binding,
        } = *subscription;
        let mut received = self.received.lock().await;
        if received.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        match &self.link {
            Link::Redis(link) => {
                let pattern = binding.replace('#', "*");
                let channel = redis_channel(&link.fanout_prefix, exchange, &pattern);
                let info = link.url.to_redis_info()?;
                let client = redis::Client::open(info)
                    .map_err(|err| Error::Connection(format!("{}: {err}", link.url.masked())))?;
                // Subscribe once here so that a failure is reported to the caller.
                let first =
                    open_subscription(&client, &channel, link.options.connect_timeout).await?;
                tokio::spawn(subscription_loop(
                    client,
                    channel,
                    link.options.connect_timeout,
                    first,
                    tx,
                    self.stop.subscribe(),
                    Arc::clone(&self.resubscribed),
                ));
            }
            Link::Amqp(link) => {
                if queue.is_empty() {
                    return Err(Error::Config(
                        "subscribing on AMQP needs a queue name".into(),
                    ));
                }
                let mut spec = link.times.spec(queue, exchange, exchange_type, binding);
                spec.exchange_durable = durable;
                let first = open_amqp_subscription(&link.url, &link.options, &spec).await?;
                tokio::spawn(amqp_subscription_loop(
                    link.url.clone(),
                    link.options.clone(),
                    spec,
                    first,
                    tx,
                    self.stop.subscribe(),
                    Arc::clone(&self.resubscribed),
                ));
            }
            Link::Sqlite(link) => {
                link.subscribe(exchange, binding, tx, self.stop.subscribe())
                    .await?
            }
        }
        *received = Some(rx);
        Ok(())
    }

    /// How many times the subscription was made again after its connection was lost
    /// (Redis, AMQP): broadcasts sent in between were missed (a worker mingles again).
    pub fn resubscriptions(&self) -> u64 {
        self.resubscribed.load(Ordering::Relaxed)
    }

    /// The next broadcast, or None after `timeout`.
    pub async fn receive(&self, timeout: Duration) -> Result<Option<Received>> {
        let mut guard = self.received.lock().await;
        let Some(rx) = guard.as_mut() else {
            return Err(Error::Config("subscribe() first".into()));
        };
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(message)) => Ok(Some(message)),
            Ok(None) => Err(Error::Closed("the mailbox")),
            Err(_) => Ok(None),
        }
    }

    /// Publish `message`. Redis: a `PUBLISH` for a fanout exchange, else an `LPUSH` to
    /// every queue bound to the exchange with the message's routing key (none: dropped,
    /// as kombu drops a message no queue is bound for); returns the number of queues
    /// reached. AMQP: `basic.publish` to the exchange (declared first); returns 1.
    pub async fn publish(&self, message: &Broadcast) -> Result<usize> {
        match &self.link {
            Link::Redis(link) => link.publish(message).await,
            Link::Amqp(link) => link.publish(message).await,
            Link::Sqlite(link) => link.publish(message).await,
        }
    }

    /// Bind `queue` to `exchange` under `routing_key` (Redis: kombu's binding table;
    /// AMQP: declare the reply queue and start consuming it).
    pub async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        match &self.link {
            Link::Redis(link) => {
                let mut conn = link.conn.clone();
                redis::cmd("SADD")
                    .arg(link.binding_key(exchange))
                    .arg(binding_member(routing_key, queue))
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            }
            Link::Amqp(link) => link.bind(exchange, routing_key, queue).await,
            Link::Sqlite(link) => link.bind(exchange, routing_key, queue).await,
        }
    }

    /// Remove the binding and delete the queue.
    pub async fn unbind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        match &self.link {
            Link::Sqlite(link) => link.unbind(queue).await,
            Link::Redis(link) => {
                let mut conn = link.conn.clone();
                redis::pipe()
                    .cmd("SREM")
                    .arg(link.binding_key(exchange))
                    .arg(binding_member(routing_key, queue))
                    .ignore()
                    .cmd("DEL")
                    .arg(link.key(queue))
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            }
            Link::Amqp(link) => {
                let consumer = link.replies.lock().await.remove(queue);
                drop(consumer);
                let name = short("queue name", queue)?;
                link.channel
                    .queue_delete(name, QueueDeleteOptions::default())
                    .await
                    .map_err(|err| lost(&link.url, &err))?;
                Ok(())
            }
        }
    }

    /// Take the oldest message of `queue` (no ack: replies are fire and forget).
    pub async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        match &self.link {
            Link::Sqlite(link) => link.pop(queue).await,
            Link::Redis(link) => {
                let mut conn = link.conn.clone();
                let raw: Option<Vec<u8>> = redis::cmd("RPOP")
                    .arg(link.key(queue))
                    .query_async(&mut conn)
                    .await?;
                Ok(raw.map(|raw| decode(&raw)))
            }
            Link::Amqp(link) => {
                let consumer = link.reply_consumer(queue).await?;
                let mut consumer = consumer.lock().await;
                match consumer.next().now_or_never() {
                    None => Ok(None),
                    Some(None) => Err(Error::Closed("the reply queue")),
                    Some(Some(Ok(delivery))) => Ok(Some(from_delivery(&delivery))),
                    Some(Some(Err(err))) => Err(lost(&link.url, &err)),
                }
            }
        }
    }

    /// As [`Mailbox::pop`], waiting up to `timeout` for a message (Redis: `BRPOP`;
    /// AMQP: the reply consumer; others: polled).
    pub async fn pop_wait(&self, queue: &str, timeout: Duration) -> Result<Option<Received>> {
        if timeout.is_zero() {
            return self.pop(queue).await;
        }
        match &self.link {
            Link::Redis(link) => {
                let mut conn = link.conn.clone();
                let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
                    .arg(link.key(queue))
                    .arg(timeout.as_secs_f64())
                    .query_async(&mut conn)
                    .await?;
                Ok(popped.map(|(_, raw)| decode(&raw)))
            }
            Link::Amqp(link) => {
                let consumer = link.reply_consumer(queue).await?;
                let mut consumer = consumer.lock().await;
                match tokio::time::timeout(timeout, consumer.next()).await {
                    Err(_) => Ok(None),
                    Ok(None) => Err(Error::Closed("the reply queue")),
                    Ok(Some(Ok(delivery))) => Ok(Some(from_delivery(&delivery))),
                    Ok(Some(Err(err))) => Err(lost(&link.url, &err)),
                }
            }
            Link::Sqlite(_) => {
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    if let Some(got) = self.pop(queue).await? {
                        return Ok(Some(got));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }

    /// Remove every waiting message of the task queue `queue` (what `celery purge`
    /// does); the number removed. A queue that does not exist counts 0.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        match &self.link {
            Link::Sqlite(link) => link.purge(queue).await,
            Link::Redis(link) => {
                let keys: Vec<String> = std::iter::once(queue.to_owned())
                    .chain(
                        [3, 6, 9]
                            .iter()
                            .map(|step| format!("{queue}{PRIORITY_SEP}{step}")),
                    )
                    .map(|name| link.key(&name))
                    .collect();
                let mut pipe = redis::pipe();
                pipe.atomic();
                for key in &keys {
                    pipe.cmd("LLEN").arg(key);
                }
                for key in &keys {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                let mut conn = link.conn.clone();
                let sizes: Vec<u64> = pipe.query_async(&mut conn).await?;
                Ok(sizes.iter().sum())
            }
            Link::Amqp(link) => {
                // A channel of its own: purging a missing queue closes the channel.
                let channel = link
                    .conn
                    .create_channel()
                    .await
                    .map_err(|err| lost(&link.url, &err))?;
                let purged = channel
                    .queue_purge(short("queue name", queue)?, QueuePurgeOptions::default())
                    .await;
                let _ = channel.close(200, ShortString::from("OK")).await;
                match purged {
                    Ok(count) => Ok(u64::from(count)),
                    Err(err) if matches!(err.kind(), lapin::ErrorKind::ProtocolError(_)) => Ok(0),
                    Err(err) => Err(lost(&link.url, &err)),
                }
            }
        }
    }

    /// Stop the subscription and close the connection (AMQP: a `connection.close`, so
    /// that the broker drops the exclusive queues at once).
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        if let Link::Amqp(link) = &self.link {
            if link.conn.status().connected() {
                let closing = link.conn.close(200, ShortString::from("OK"));
                let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
            }
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl RedisLink {
    async fn publish(&self, message: &Broadcast) -> Result<usize> {
        let envelope = redis_envelope(message)?;
        let mut conn = self.conn.clone();
        if message.exchange_type == "fanout" {
            let channel =
                redis_channel(&self.fanout_prefix, &message.exchange, &message.routing_key);
            let receivers: usize = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(envelope)
                .query_async(&mut conn)
                .await?;
            return Ok(receivers);
        }
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.binding_key(&message.exchange))
            .query_async(&mut conn)
            .await?;
        let queues = redis_transport::bound_queues(&members, &message.routing_key);
        if queues.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for queue in &queues {
            pipe.cmd("LPUSH")
                .arg(self.key(queue))
                .arg(&envelope)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(queues.len())
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.options.global_keyprefix)
    }

    fn binding_key(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding.{exchange}"))
    }
}

impl AmqpLink {
    async fn publish(&self, message: &Broadcast) -> Result<usize> {
        let lost = |err: lapin::Error| lost(&self.url, &err);
        if !message.exchange.is_empty() {
            let mut declared = self.declared.lock().await;
            if !declared.contains(&message.exchange) {
                declare_exchange(&self.channel, message, lost).await?;
                declared.insert(message.exchange.clone());
            }
        }
        // Requests persistent, replies transient: what kombu sends.
        let delivery_mode = if message.exchange_type == "fanout" {
            2
        } else {
            1
        };
        publish_broadcast(&self.channel, message, delivery_mode, lost).await?;
        Ok(1)
    }

    /// The consumer of a bound reply queue (each has its own lock: several threads
    /// may wait for their replies at once).
    async fn reply_consumer(&self, queue: &str) -> Result<Arc<Mutex<lapin::Consumer>>> {
        self.replies
            .lock()
            .await
            .get(queue)
            .cloned()
            .ok_or_else(|| Error::Config(format!("queue {queue:?} is not bound")))
    }

    async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let spec = self.times.spec(queue, exchange, "direct", routing_key);
        let warning = amqp::declare(&self.conn, &spec)
            .await
            .map_err(|err| lost(&self.url, &err))?;
        if let Some(warning) = warning {
            return Err(Error::Connection(warning));
        }
        let consumer = consume(&self.channel, queue)
            .await
            .map_err(|err| lost(&self.url, &err))?;
        self.declared.lock().await.insert(exchange.to_owned());
        self.replies
            .lock()
            .await
            .insert(queue.to_owned(), Arc::new(Mutex::new(consumer)));
        Ok(())
    }
}

fn lost(url: &BrokerUrl, err: &lapin::Error) -> Error {
    Error::Connection(format!("{}: {}", url.masked(), amqp::describe(err, url)))
}

/// `basic.consume` without acks (kombu's pidbox consumers use `no_ack=True`).
async fn consume(channel: &Channel, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    let tag = ShortString::from(format!("celeriac-pidbox-{}", uuid::Uuid::new_v4().simple()));
    let name = ShortString::try_new(queue)
        .map_err(|_| lapin::Error::from(std::io::Error::other("queue name too long")))?;
    channel
        .basic_consume(
            name,
            tag,
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Headers and body of an AMQP delivery.
fn from_delivery(delivery: &lapin::message::Delivery) -> Received {
    let headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(amqp::field_table_to_json)
        .unwrap_or_default();
    Ok((Value::Object(headers), delivery.data.clone()))
}

/// A connection of its own with the node's queue declared and consumed.
async fn open_amqp_subscription(
    url: &BrokerUrl,
    options: &AmqpOptions,
    spec: &QueueSpec,
) -> Result<(Connection, lapin::Consumer)> {
    let conn = amqp::connect(url, options, "pidbox subscription").await?;
    let warning = amqp::declare(&conn, spec)
        .await
        .map_err(|err| lost(url, &err))?;
    if let Some(warning) = warning {
        let _ = conn.close(200, ShortString::from("OK")).await;
        return Err(Error::Connection(format!(
            "{warning} (is another worker with this node name running?)"
        )));
    }
    let channel = conn.create_channel().await.map_err(|err| lost(url, &err))?;
    let consumer = consume(&channel, &spec.name)
        .await
        .map_err(|err| lost(url, &err))?;
    Ok((conn, consumer))
}

async fn amqp_subscription_loop(
    url: BrokerUrl,
    options: AmqpOptions,
    spec: QueueSpec,
    first: (Connection, lapin::Consumer),
    tx: mpsc::UnboundedSender<Received>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    resubscribed: Arc<AtomicU64>,
) {
    let mut current = Some(first);
    loop {
        let (conn, mut consumer) = match current.take() {
            Some(pair) => pair,
            None => match open_amqp_subscription(&url, &options, &spec).await {
                Ok(pair) => {
                    resubscribed.fetch_add(1, Ordering::Relaxed);
                    pair
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue,
                        _ = stop.changed() => return,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        if tx.send(from_delivery(&delivery)).is_err() {
                            let _ = conn.close(200, ShortString::from("OK")).await;
                            return;
                        }
                    }
                    _ => break, // connection or channel lost: declare and consume again
                },
                _ = stop.changed() => {
                    let _ = conn.close(200, ShortString::from("OK")).await;
                    return;
                }
            }
        }
        drop(consumer);
        let _ = conn.close(200, ShortString::from("OK")).await;
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            _ = stop.changed() => return,
        }
    }
}

fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{PRIORITY_SEP}{PRIORITY_SEP}{queue}")
}

async fn open_subscription(
    client: &redis::Client,
    channel: &str,
    timeout: Duration,
) -> Result<redis::aio::PubSub> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(Error::Connection(format!(
            "cannot subscribe to {channel}: timed out after {:.1}s",
            timeout.as_secs_f64()
        ))),
    }
}

async fn subscription_loop(
    client: redis::Client,
    channel: String,
    timeout: Duration,
    first: redis::aio::PubSub,
    tx: mpsc::UnboundedSender<Received>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    resubscribed: Arc<AtomicU64>,
) {
    let mut current = Some(first);
    loop {
        let pubsub = match current.take() {
            Some(pubsub) => pubsub,
            None => match open_subscription(&client, &channel, timeout).await {
                Ok(pubsub) => {
                    resubscribed.fetch_add(1, Ordering::Relaxed);
                    pubsub
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue,
                        _ = stop.changed() => return,
                    }
                }
            },
        };
        let mut stream = pubsub.into_on_message();
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        let payload: &[u8] = message.get_payload_bytes();
                        if tx.send(decode(payload)).is_err() {
                            return;
                        }
                    }
                    None => break, // connection lost: subscribe again
                },
                _ = stop.changed() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_members_follow_kombu() {
        let members = vec![
            binding_member("oid1", "oid1.reply.celery.pidbox"),
            binding_member("oid2", "oid2.reply.celery.pidbox"),
            "garbage".to_owned(),
        ];
        assert_eq!(members[0], "oid1\x06\x16\x06\x16oid1.reply.celery.pidbox");
        assert_eq!(
            redis_transport::bound_queues(&members, "oid2"),
            vec!["oid2.reply.celery.pidbox"]
        );
        assert!(redis_transport::bound_queues(&members, "oid3").is_empty());
    }

    #[test]
    fn amqp_queues_have_celery_57_flags() {
        let node = QueueTimes::default().spec("w1@vm.celery.pidbox", "celery.pidbox", "fanout", "");
        assert!(node.exclusive && node.auto_delete && !node.durable);
        assert!(!node.exchange_durable && !node.exchange_auto_delete);
        assert_eq!(node.exchange_type, "fanout");
        assert_eq!(node.arguments["x-expires"], 10_000);
        assert_eq!(node.arguments["x-message-ttl"], 300_000);
        let none = QueueTimes {
            expires: None,
            message_ttl: Some(Duration::ZERO),
        }
        .spec(
            "oid.reply.celery.pidbox",
            "reply.celery.pidbox",
            "direct",
            "oid",
        );
        assert!(none.arguments.is_empty());
        assert_eq!(none.routing_key, "oid");
    }

    #[test]
    fn malformed_envelopes_are_reported() {
        assert!(decode(b"not json").is_err());
        assert!(decode(br#"{"body": "!!", "properties": {"body_encoding": "base64"}}"#).is_err());
        let (headers, body) =
            decode(br#"{"body": "e30=", "headers": {"clock": 1}, "properties": {"body_encoding": "base64", "delivery_tag": "t"}}"#)
                .expect("decodes");
        assert_eq!(headers["clock"], 1);
        assert_eq!(body, b"{}");
    }
}
