//! Broadcast publishing: Celery's events (`celeryev`) and other fire-and-forget
//! messages to a named exchange.
//!
//! - Redis: kombu's fanout emulation is PUB/SUB, so a message is one `PUBLISH` of the
//!   kombu envelope on channel `/{db}.<exchange>/<routing key>` (`/{db}.<exchange>`
//!   when the routing key is empty), prefixed by `global_keyprefix` (celery-wire §3.4).
//! - AMQP: `basic.publish` to the exchange, declared once per connection with the
//!   given type and durability (`celeryev` is a durable topic exchange), without
//!   `mandatory`: nobody listening is normal for events.
//! - SQLite: a row of the `broadcast` log holding the same kombu envelope as on Redis
//!   (see `sqlite::SqliteFanout`); [`EventSubscriber`] reads them back.
//!
//! Best effort, as kombu's event dispatcher: `publish` never waits; the I/O task writes
//! batches, reconnects when the connection drops and gives a batch up after a few
//! attempts (the last error is kept for `flush` to report).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, Notify};

pub use super::broadcast::Broadcast;
use super::broadcast::{decode, redis_envelope, Received};
use super::sqlite::{FanoutRow, FanoutSubscription, SqliteFanout, SqliteOptions};
use super::url::{BrokerUrl, Scheme};
use super::{amqp, redis as redis_transport, TransportOptions};
use crate::error::{Error, Result};

/// Attempts per batch before it is given up.
const ATTEMPTS: u32 = 3;
/// Most messages waiting for the I/O task; past it new ones are dropped (and counted).
const MAX_BACKLOG: u64 = 100_000;

struct State {
    queued: AtomicU64,
    done: AtomicU64,
    dropped: AtomicU64,
    progress: Notify,
    closed: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl State {
    fn fail(&self, why: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(why);
        }
    }
}

/// Publishes broadcasts; cheap to call from any thread.
pub struct EventPublisher {
    tx: mpsc::UnboundedSender<Broadcast>,
    state: Arc<State>,
    masked: String,
}

// One per publisher, never moved after it starts: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
enum Link {
    Redis {
        conn: Option<MultiplexedConnection>,
        prefix: String,
    },
    Amqp {
        conn: Option<(Connection, Channel)>,
        options: amqp::AmqpOptions,
        declared: HashSet<String>,
    },
    Sqlite(SqliteFanout),
}

impl EventPublisher {
    /// Connect now (failing fast with a clear error) and start the I/O task.
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        let link = match url.scheme {
            Scheme::Sqlite => {
                let options = SqliteOptions::from_transport(options)?;
                Link::Sqlite(SqliteFanout::connect(url, options).await?)
            }
            Scheme::Amqp | Scheme::Amqps => {
                let options = amqp::AmqpOptions::from_transport(options)?;
                let conn = open_amqp(url, &options).await?;
                Link::Amqp {
                    conn: Some(conn),
                    options,
                    declared: HashSet::new(),
                }
            }
            _ => {
                let options = redis_transport::RedisOptions::from_transport(options)?;
                let conn = redis_transport::connect(
                    url,
                    options.connect_timeout,
                    Some(Duration::from_secs(10)),
                )
                .await?;
                Link::Redis {
                    conn: Some(conn),
                    prefix: format!("{}/{}.", options.global_keyprefix, url.db),
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            queued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            progress: Notify::new(),
            closed: AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        tokio::spawn(io_loop(url.clone(), link, rx, state.clone()));
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
        })
    }

    /// Hand a message to the I/O task; never waits. Dropped (counted) when the
    /// backlog is full.
    pub fn publish(&self, message: Broadcast) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the event publisher"));
        }
        let queued = self.state.queued.load(Ordering::Acquire);
        if queued.saturating_sub(self.state.done.load(Ordering::Acquire)) >= MAX_BACKLOG {
            self.state.dropped.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        self.state.queued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the event publisher"))
    }

    /// Wait until every message handed over before this call was written or given up.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let target = self.state.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.progress.notified();
            let done = self.state.done.load(Ordering::Acquire);
            if done >= target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let reason = self
                    .state
                    .last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default()
                    .unwrap_or_else(|| "no reply".into());
                return Err(Error::Connection(format!(
                    "{} event(s) not yet written to {} after {:.1}s: {reason}",
                    target - done,
                    self.masked,
                    timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Messages given up (connection down, backlog full) so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
    }
}

async fn open_amqp(url: &BrokerUrl, options: &amqp::AmqpOptions) -> Result<(Connection, Channel)> {
    let conn = amqp::connect(url, options, "events").await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|err| Error::Connection(format!("cannot open a channel: {err}")))?;
    Ok((conn, channel))
}

/// An AMQP short string (exchange, queue, routing key), or a config error naming `what`.
pub(crate) fn short(what: &str, text: &str) -> Result<ShortString> {
    ShortString::try_new(text)
        .map_err(|_| Error::Config(format!("{what} is longer than AMQP's 255 bytes")))
}

/// Declares the exchange a broadcast (event or pidbox message) goes to, with the flags
/// kombu gives it: durable only if asked, never auto-deleted.
pub(crate) async fn declare_exchange(
    channel: &Channel,
    message: &Broadcast,
    lost: impl Fn(lapin::Error) -> Error,
) -> Result<()> {
    channel
        .exchange_declare(
            short("exchange name", &message.exchange)?,
            amqp::exchange_kind(&message.exchange_type),
            ExchangeDeclareOptions {
                passive: false,
                durable: message.durable,
                auto_delete: false,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
        .map_err(lost)
}

/// The PUB/SUB channel kombu's Redis transport uses for `(exchange, routing_key)`.
pub fn redis_channel(prefix: &str, exchange: &str, routing_key: &str) -> String {
    if routing_key.is_empty() {
        format!("{prefix}{exchange}")
    } else {
        format!("{prefix}{exchange}/{routing_key}")
    }
}

async fn io_loop(
    url: BrokerUrl,
    mut link: Link,
    mut rx: mpsc::UnboundedReceiver<Broadcast>,
    state: Arc<State>,
) {
    const MAX_BATCH: usize = 1024;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let count = batch.len() as u64;
        let mut attempt = 0;
        loop {
            match write(&url, &mut link, &batch).await {
                Ok(()) => break,
                Err(err) => {
                    state.fail(err.to_string());
                    attempt += 1;
                    if attempt >= ATTEMPTS {
                        state.dropped.fetch_add(count, Ordering::AcqRel);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        batch.clear();
        state.done.fetch_add(count, Ordering::AcqRel);
        state.progress.notify_waiters();
    }
}

async fn write(url: &BrokerUrl, link: &mut Link, batch: &[Broadcast]) -> Result<()> {
    match link {
        Link::Redis { conn, prefix } => {
            let mut pipe = redis::pipe();
            for message in batch {
                let channel = redis_channel(prefix, &message.exchange, &message.routing_key);
                pipe.cmd("PUBLISH")
                    .arg(channel)
                    .arg(redis_envelope(message)?)
                    .ignore();
            }
            if conn.is_none() {
                *conn = Some(
                    redis_transport::connect(
                        url,
                        Duration::from_secs(4),
                        Some(Duration::from_secs(10)),
                    )
                    .await?,
                );
            }
            let Some(active) = conn.as_mut() else {
                return Err(Error::Closed("the connection"));
            };
            if let Err(err) = pipe.query_async::<()>(active).await {
                *conn = None;
                return Err(err.into());
            }
            Ok(())
        }
        Link::Sqlite(fanout) => {
            let mut rows = Vec::with_capacity(batch.len());
            for message in batch {
                rows.push(FanoutRow {
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                    payload: redis_envelope(message)?,
                });
            }
            fanout.publish(rows).await
        }
        Link::Amqp {
            conn,
            options,
            declared,
        } => {
            if conn.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
                *conn = None;
                declared.clear();
                *conn = Some(open_amqp(url, options).await?);
            }
            let Some((_, channel)) = conn.as_ref() else {
                return Err(Error::Closed("the connection"));
            };
            let channel = channel.clone();
            let outcome = publish_amqp(&channel, declared, batch).await;
            if outcome.is_err() {
                *conn = None;
                declared.clear();
            }
            outcome
        }
    }
}

async fn publish_amqp(
    channel: &Channel,
    declared: &mut HashSet<String>,
    batch: &[Broadcast],
) -> Result<()> {
    let lost = |err: lapin::Error| Error::Connection(format!("event publish failed: {err}"));
    for message in batch {
        if !message.exchange.is_empty() && !declared.contains(&message.exchange) {
            declare_exchange(channel, message, lost).await?;
            declared.insert(message.exchange.clone());
        }
        publish_broadcast(channel, message, 1, lost).await?;
    }
    Ok(())
}

/// `basic.publish` of one JSON broadcast (an event, a pidbox request or reply) with
/// kombu's properties; no publisher confirm.
pub(crate) async fn publish_broadcast(
    channel: &Channel,
    message: &Broadcast,
    delivery_mode: u8,
    lost: impl Fn(lapin::Error) -> Error,
) -> Result<()> {
    let properties = BasicProperties::default()
        .with_content_type(short("content type", "application/json")?)
        .with_content_encoding(short("content encoding", "utf-8")?)
        .with_delivery_mode(delivery_mode)
        .with_priority(0)
        .with_headers(amqp::json_to_field_table(&message.headers)?);
    channel
        .basic_publish(
            short("exchange name", &message.exchange)?,
            short("routing key", &message.routing_key)?,
            BasicPublishOptions::default(),
            &message.body,
            properties,
        )
        .await
        .map_err(lost)?;
    Ok(())
}

/// One broadcast as a subscriber reads it: its routing key and its headers and body
/// (or why it could not be read).
#[derive(Debug)]
pub struct ReceivedBroadcast {
    pub routing_key: String,
    pub message: Received,
}

/// Receives the broadcasts of one exchange (Celery's events on `celeryev`), for
/// monitors and tests. The embedded SQLite broker only: on Redis and AMQP, Celery's
/// own `EventReceiver` (and Flower) read celeriac's events.
pub struct EventSubscriber {
    _fanout: SqliteFanout,
    subscription: tokio::sync::Mutex<FanoutSubscription>,
}

impl EventSubscriber {
    pub async fn connect(
        url: &BrokerUrl,
        options: &TransportOptions,
        exchange: &str,
    ) -> Result<Self> {
        if url.scheme != Scheme::Sqlite {
            return Err(Error::Config(
                "celeriac's event receiver reads the embedded SQLite broker; on Redis and \
                 AMQP use Celery's EventReceiver (celery events, Flower)"
                    .into(),
            ));
        }
        let options = SqliteOptions::from_transport(options)?;
        let fanout = SqliteFanout::connect(url, options).await?;
        let subscription = fanout.subscribe(exchange, None).await?;
        Ok(Self {
            _fanout: fanout,
            subscription: tokio::sync::Mutex::new(subscription),
        })
    }

    /// The next broadcast, or `None` after `timeout`.
    pub async fn receive(&self, timeout: Duration) -> Result<Option<ReceivedBroadcast>> {
        let mut subscription = self.subscription.lock().await;
        Ok(subscription
            .recv(timeout)
            .await?
            .map(|row| ReceivedBroadcast {
                routing_key: row.routing_key,
                message: row.payload.and_then(|payload| decode(&payload)),
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_follow_kombu_fanout_names() {
        assert_eq!(
            redis_channel("/0.", "celeryev", "task.multi"),
            "/0.celeryev/task.multi"
        );
        assert_eq!(
            redis_channel("/3.", "celery.pidbox", ""),
            "/3.celery.pidbox"
        );
        assert_eq!(
            redis_channel("pfx:/0.", "celeryev", "worker.online"),
            "pfx:/0.celeryev/worker.online"
        );
    }
}
