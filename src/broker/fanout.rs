//! What every transport's broadcast side does, with one signature each: the
//! [`Fanout`] trait that Redis, AMQP and SQLite implement, and [`FanoutLink`], which
//! picks the transport from the URL. `events` and `pidbox` are written on top of it
//! and know no transport.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use super::amqp::AmqpFanout;
use super::broadcast::{Broadcast, Received};
use super::redis::RedisFanout;
use super::sqlite::SqliteMailbox;
use super::url::{BrokerUrl, Scheme};
use super::TransportOptions;
use crate::error::Result;

/// How long a lost subscription waits before it subscribes again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// How often the default [`Fanout::pop_wait`] looks again where nothing can wait for
/// a message.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

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
    /// The AMQP queue arguments (`x-expires`, `x-message-ttl`, in milliseconds).
    pub fn arguments(&self) -> Map<String, Value> {
        let mut arguments = Map::new();
        let ms = |d: Duration| Value::from(d.as_millis().min(i32::MAX as u128) as i64);
        if let Some(expires) = self.expires.filter(|d| !d.is_zero()) {
            arguments.insert("x-expires".into(), ms(expires));
        }
        if let Some(ttl) = self.message_ttl.filter(|d| !d.is_zero()) {
            arguments.insert("x-message-ttl".into(), ms(ttl));
        }
        arguments
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

/// Where a subscription sends what it receives, and what stops it.
pub struct Sink {
    pub tx: mpsc::UnboundedSender<Received>,
    pub stop: watch::Receiver<bool>,
    /// Counts the times the subscription was made again after a lost connection.
    pub resubscribed: Arc<AtomicU64>,
}

/// Why a subscription's connection stopped forwarding.
pub enum Ended {
    /// The connection was lost: subscribe again.
    Lost,
    /// Stopped, or nobody receives any more.
    Stopped,
}

/// Run a subscription until `sink` stops it: `forward` hands over what one
/// connection receives; after a lost one, wait and `open` another (counted in
/// `sink.resubscribed`). `first` is the connection opened by the caller, so that it
/// saw the first failure.
pub async fn keep_subscribed<C, O, F>(
    first: C,
    open: impl Fn() -> O,
    forward: impl Fn(C, mpsc::UnboundedSender<Received>, watch::Receiver<bool>) -> F,
    sink: Sink,
) where
    O: Future<Output = Result<C>>,
    F: Future<Output = Ended>,
{
    let Sink {
        tx,
        mut stop,
        resubscribed,
    } = sink;
    let mut current = Some(first);
    loop {
        let connection = match current.take() {
            Some(connection) => connection,
            None => match open().await {
                Ok(connection) => {
                    resubscribed.fetch_add(1, Ordering::Relaxed);
                    connection
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue,
                        _ = stop.changed() => return,
                    }
                }
            },
        };
        if let Ended::Stopped = forward(connection, tx.clone(), stop.clone()).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Broadcasts (events, remote-control requests) and the direct replies to them.
pub trait Fanout {
    /// Publish `batch`, in order. A `direct` exchange reaches the queues bound with
    /// the message's routing key (none: dropped, as kombu drops it); any other reaches
    /// every subscriber. Returns how many receivers were reached where the broker says
    /// (Redis), else the number of messages.
    fn publish(&self, batch: &[Broadcast]) -> impl Future<Output = Result<usize>> + Send;

    /// Start forwarding what `subscription` describes to `sink` until its stop
    /// changes; a lost connection is subscribed again.
    fn subscribe(
        &self,
        subscription: &Subscription<'_>,
        sink: Sink,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Bind `queue` to `exchange` under `routing_key`: what is sent there from now on
    /// is kept for [`Fanout::pop`].
    fn bind(
        &self,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Remove the binding and delete the queue.
    fn unbind(
        &self,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Take the oldest message of the bound `queue`, if any (never waits; no ack).
    fn pop(&self, queue: &str) -> impl Future<Output = Result<Option<Received>>> + Send;

    /// As [`Fanout::pop`], waiting up to `timeout`; polled unless the transport can
    /// wait.
    fn pop_wait(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Received>>> + Send
    where
        Self: Sync,
    {
        async move {
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

    /// Remove every waiting message of the task queue `queue`; how many (a queue that
    /// does not exist counts 0).
    fn purge(&self, queue: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Close the connection (subscriptions end with their stop).
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The [`Fanout`] of whichever transport the URL names.
// One per publisher or mailbox, never moved after it is built: the size difference
// is harmless.
#[allow(clippy::large_enum_variant)]
pub enum FanoutLink {
    Redis(RedisFanout),
    Amqp(AmqpFanout),
    Sqlite(SqliteMailbox),
}

impl FanoutLink {
    /// Connect now (failing fast with a clear error). `purpose` names the AMQP
    /// connection; `times` are the AMQP queue arguments of bound queues.
    pub async fn connect(
        url: &BrokerUrl,
        options: &TransportOptions,
        times: QueueTimes,
        purpose: &str,
    ) -> Result<Self> {
        Ok(match url.scheme {
            Scheme::Sqlite => Self::Sqlite(SqliteMailbox::connect(url, options).await?),
            Scheme::Amqp | Scheme::Amqps => {
                Self::Amqp(AmqpFanout::connect(url, options, times, purpose).await?)
            }
            Scheme::Redis | Scheme::Rediss | Scheme::RedisSocket | Scheme::Sentinel => {
                Self::Redis(RedisFanout::connect(url, options).await?)
            }
        })
    }
}

impl Fanout for FanoutLink {
    async fn publish(&self, batch: &[Broadcast]) -> Result<usize> {
        on_transport!(self, link => link.publish(batch).await)
    }

    async fn subscribe(&self, subscription: &Subscription<'_>, sink: Sink) -> Result<()> {
        on_transport!(self, link => link.subscribe(subscription, sink).await)
    }

    async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        on_transport!(self, link => link.bind(exchange, routing_key, queue).await)
    }

    async fn unbind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        on_transport!(self, link => link.unbind(exchange, routing_key, queue).await)
    }

    async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        on_transport!(self, link => link.pop(queue).await)
    }

    async fn pop_wait(&self, queue: &str, timeout: Duration) -> Result<Option<Received>> {
        on_transport!(self, link => link.pop_wait(queue, timeout).await)
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        on_transport!(self, link => link.purge(queue).await)
    }

    async fn close(&self) {
        on_transport!(self, link => link.close().await)
    }
}
