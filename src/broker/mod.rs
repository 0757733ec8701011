//! Brokers: where task messages are published and consumed.
//!
//! Each transport (the folders `redis/`, `sqlite/`, `amqp/`) has the same shape, the
//! [`traits::Producer`] and [`traits::Consumer`] traits: a producer whose `publish`
//! never waits (an I/O task batches the writes) and a consumer whose fetch task fills
//! a channel of [`Fetched`] items within a prefetch window, and which acks in batches.
//! [`Producer`] and [`Consumer`] pick the transport from the URL's scheme and delegate
//! to it. `broadcast` is the transport-free message that `events` and `pidbox` send
//! through the [`fanout::Fanout`] trait, which [`fanout::FanoutLink`] delegates the
//! same way.

// Before the modules, so that `fanout` can use it too.
/// `$body` for whichever transport `$self` holds, bound to `$transport`.
macro_rules! on_transport {
    ($self:expr, $transport:ident => $body:expr) => {
        match $self {
            Self::Redis($transport) => $body,
            Self::Sqlite($transport) => $body,
            Self::Amqp($transport) => $body,
        }
    };
}

pub mod amqp;
pub mod amqp_tags;
pub mod broadcast;
pub mod events;
pub mod fanout;
pub mod outbox;
pub mod pidbox;
pub mod redis;
pub mod sqlite;
pub mod traits;
pub mod url;

use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::protocol::envelope::IncomingEnvelope;
use crate::protocol::message::OutgoingMessage;
use traits::{Consumer as ConsumerOps, Producer as ProducerOps};
use url::{BrokerUrl, Scheme};

/// A message taken from a queue: routing facts, properties, headers (JSON text) and
/// body bytes, the same whatever the transport.
#[derive(Debug)]
pub struct IncomingMessage {
    pub delivery_tag: String,
    /// The queue it was taken from.
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub priority: i64,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// The task headers as a JSON object, if the message has any.
    pub headers: Option<Box<RawValue>>,
    pub body: Vec<u8>,
}

impl IncomingMessage {
    /// A kombu envelope (a Redis list item, a SQLite row) as the transport-neutral
    /// message, or why it cannot be one. `priority` is used when the envelope has none;
    /// `redelivered` adds to what the envelope says.
    pub fn from_envelope(
        envelope: IncomingEnvelope,
        delivery_tag: String,
        queue: String,
        priority: i64,
        redelivered: bool,
    ) -> std::result::Result<Self, BadMessage> {
        let body = match envelope.body_bytes() {
            Ok(body) => body,
            Err(err) => {
                return Err(BadMessage {
                    delivery_tag,
                    queue,
                    reason: err.to_string(),
                })
            }
        };
        let redelivered = redelivered || envelope.redelivered();
        let props = envelope.properties;
        let (exchange, routing_key) = match props.delivery_info {
            Some(info) => (info.exchange, info.routing_key),
            None => (String::new(), queue.clone()),
        };
        Ok(IncomingMessage {
            delivery_tag,
            queue,
            exchange,
            routing_key,
            redelivered,
            priority: props.priority.unwrap_or(priority),
            reply_to: props.reply_to,
            correlation_id: props.correlation_id,
            content_type: envelope.content_type,
            content_encoding: envelope.content_encoding,
            headers: envelope.headers,
            body,
        })
    }
}

/// A message that could not even be framed; it is logged and dropped.
#[derive(Debug)]
pub struct BadMessage {
    /// The tag to ack it with (made up when the message has none).
    pub delivery_tag: String,
    pub queue: String,
    pub reason: String,
}

/// What a consumer's fetch task hands over.
// Errors are rare; boxing the message instead would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Fetched {
    Message(std::result::Result<IncomingMessage, BadMessage>),
    /// A connection problem; the fetch task keeps retrying.
    Error(String),
}

/// Settings common to every transport (`broker_connection_timeout`, ...), plus the
/// transport's own `broker_transport_options`.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    pub connect_timeout: Duration,
    /// `broker_transport_options` as given; each transport reads the names it knows.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(4),
            extra: serde_json::Map::new(),
        }
    }
}

/// Publishes task messages on whichever transport the URL names.
pub enum Producer {
    Redis(redis::RedisProducer),
    Sqlite(sqlite::SqliteProducer),
    Amqp(amqp::AmqpProducer),
}

impl Producer {
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        if url.scheme == Scheme::Sqlite {
            let options = sqlite::SqliteOptions::from_transport(options)?;
            return Ok(Self::Sqlite(
                sqlite::SqliteProducer::connect(url, options).await?,
            ));
        }
        if matches!(url.scheme, Scheme::Amqp | Scheme::Amqps) {
            let options = amqp::AmqpOptions::from_transport(options)?;
            return Ok(Self::Amqp(
                amqp::AmqpProducer::connect(url, options, Vec::new()).await?,
            ));
        }
        let url = &url.with_sentinel(&options.extra)?;
        let options = redis::RedisOptions::from_transport(options)?;
        let url = url.with_redis_tls(options.tls.as_ref());
        Ok(Self::Redis(
            redis::RedisProducer::connect(&url, options).await?,
        ))
    }

    /// Hand a message to the I/O task; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        on_transport!(self, producer => ProducerOps::publish(producer, message))
    }

    /// Wait until everything published before this call is written.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        on_transport!(self, producer => ProducerOps::flush(producer, timeout).await)
    }

    pub fn close(&self) {
        on_transport!(self, producer => ProducerOps::close(producer))
    }
}

/// Takes messages from queues on whichever transport the URL names.
pub enum Consumer {
    Redis(redis::RedisConsumer),
    Sqlite(sqlite::SqliteConsumer),
    Amqp(amqp::AmqpConsumer),
}

impl Consumer {
    /// Connect and start fetching into `deliveries`; `prefetch_count` 0 = unbounded.
    pub async fn connect(
        url: &BrokerUrl,
        queues: &[String],
        prefetch_count: usize,
        options: &TransportOptions,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) -> Result<Self> {
        if url.scheme == Scheme::Sqlite {
            let options = sqlite::SqliteOptions::from_transport(options)?;
            let consumer =
                sqlite::SqliteConsumer::connect(url, queues, prefetch_count, options, deliveries)
                    .await?;
            return Ok(Self::Sqlite(consumer));
        }
        if matches!(url.scheme, Scheme::Amqp | Scheme::Amqps) {
            let options = amqp::AmqpOptions::from_transport(options)?;
            let consumer =
                amqp::AmqpConsumer::connect(url, queues, prefetch_count, options, deliveries)
                    .await?;
            return Ok(Self::Amqp(consumer));
        }
        let url = &url.with_sentinel(&options.extra)?;
        let options = redis::RedisOptions::from_transport(options)?;
        let url = url.with_redis_tls(options.tls.as_ref());
        let consumer =
            redis::RedisConsumer::connect(&url, queues, prefetch_count, options, deliveries)
                .await?;
        Ok(Self::Redis(consumer))
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        on_transport!(self, consumer => ConsumerOps::ack(consumer, tags))
    }

    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        on_transport!(self, consumer => ConsumerOps::reject(consumer, tag, requeue))
    }

    /// See [`traits::Consumer::give_back`].
    pub fn give_back(&self, tags: Vec<String>) -> Result<()> {
        on_transport!(self, consumer => ConsumerOps::give_back(consumer, tags))
    }

    /// See [`traits::Consumer::extend_window`].
    pub fn extend_window(&self, delta: i64) -> Result<()> {
        on_transport!(self, consumer => ConsumerOps::extend_window(consumer, delta))
    }

    /// Stop fetching and give back every fetched, unacked message. Returns how many.
    pub async fn restore_unacked(&self) -> Result<usize> {
        on_transport!(self, consumer => ConsumerOps::restore_unacked(consumer).await)
    }

    /// Start consuming from `queue` too (declared as the worker's queues are);
    /// false when it is consumed already (`add_consumer`).
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        on_transport!(self, consumer => ConsumerOps::add_queue(consumer, queue).await)
    }

    /// Stop consuming from `queue`; false when it was not consumed (`cancel_consumer`).
    pub async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        on_transport!(self, consumer => ConsumerOps::cancel_queue(consumer, queue).await)
    }

    pub fn close(&self) {
        on_transport!(self, consumer => ConsumerOps::close(consumer))
    }
}
