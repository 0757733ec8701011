//! Brokers: where task messages are published and consumed.
//!
//! Each transport (`redis.rs`, `sqlite.rs`, `amqp.rs`) has the same shape:
//! a producer whose `publish` never waits (an I/O task batches the writes) and a
//! consumer whose fetch task fills a channel of [`Fetched`] items within a prefetch
//! window, and which acks in batches. [`Producer`] and [`Consumer`] pick the
//! transport from the URL's scheme.

pub mod amqp;
pub mod amqp_tags;
pub mod events;
pub mod outbox;
pub mod pidbox;
pub mod redis;
pub mod sqlite;
pub mod url;

use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::protocol::envelope::IncomingEnvelope;
use crate::protocol::message::OutgoingMessage;
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
        let options = redis::RedisOptions::from_transport(options)?;
        Ok(Self::Redis(
            redis::RedisProducer::connect(url, options).await?,
        ))
    }

    /// Hand a message to the I/O task; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        match self {
            Self::Redis(producer) => producer.publish(message),
            Self::Sqlite(producer) => producer.publish(message),
            Self::Amqp(producer) => producer.publish(message),
        }
    }

    /// Wait until everything published before this call is written.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        match self {
            Self::Redis(producer) => producer.flush(timeout).await,
            Self::Sqlite(producer) => producer.flush(timeout).await,
            Self::Amqp(producer) => producer.flush(timeout).await,
        }
    }

    pub fn close(&self) {
        match self {
            Self::Redis(producer) => producer.close(),
            Self::Sqlite(producer) => producer.close(),
            Self::Amqp(producer) => producer.close(),
        }
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
        let options = redis::RedisOptions::from_transport(options)?;
        let consumer =
            redis::RedisConsumer::connect(url, queues, prefetch_count, options, deliveries).await?;
        Ok(Self::Redis(consumer))
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        match self {
            Self::Redis(consumer) => consumer.ack(tags),
            Self::Sqlite(consumer) => consumer.ack(tags),
            Self::Amqp(consumer) => consumer.ack(tags),
        }
    }

    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        match self {
            Self::Redis(consumer) => consumer.reject(tag, requeue),
            Self::Sqlite(consumer) => consumer.reject(tag, requeue),
            Self::Amqp(consumer) => consumer.reject(tag, requeue),
        }
    }

    /// Put these fetched, unacked messages back in their queue, as close to the front
    /// as the broker allows, freeing their window slots: another consumer can take
    /// them (Redis: the front of the list; RabbitMQ and SQLite: their place in line).
    pub fn give_back(&self, tags: Vec<String>) -> Result<()> {
        match self {
            Self::Redis(consumer) => consumer.give_back(tags),
            Self::Sqlite(consumer) => tags
                .into_iter()
                .try_for_each(|tag| consumer.reject(tag, true)),
            Self::Amqp(consumer) => tags
                .into_iter()
                .try_for_each(|tag| consumer.reject(tag, true)),
        }
    }

    /// Give the fetcher every window slot freed by acks and held back so far (Redis
    /// groups them); called before waiting for messages.
    pub fn release_window(&self) {
        if let Self::Redis(consumer) = self {
            consumer.release_deferred();
        }
    }

    /// Grow (`delta > 0`) or shrink the prefetch window, one slot per message held for
    /// its ETA or rate limit. Transports without a window of their own ignore it.
    pub fn extend_window(&self, delta: i64) -> Result<()> {
        match self {
            Self::Redis(consumer) => {
                consumer.extend_window(delta);
                Ok(())
            }
            Self::Amqp(consumer) => consumer.extend_window(delta),
            Self::Sqlite(consumer) => consumer.extend_window(delta),
        }
    }

    /// Stop fetching and give back every fetched, unacked message. Returns how many.
    pub async fn restore_unacked(&self) -> Result<usize> {
        match self {
            Self::Redis(consumer) => consumer.restore_unacked().await,
            Self::Sqlite(consumer) => consumer.restore_unacked().await,
            Self::Amqp(consumer) => consumer.restore_unacked().await,
        }
    }

    /// Start consuming from `queue` too (declared as the worker's queues are);
    /// false when it is consumed already (`add_consumer`).
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        match self {
            Self::Redis(consumer) => consumer.add_queue(queue).await,
            Self::Sqlite(consumer) => consumer.add_queue(queue).await,
            Self::Amqp(consumer) => consumer.add_queue(queue).await,
        }
    }

    /// Stop consuming from `queue`; false when it was not consumed
    /// (`cancel_consumer`). Messages already fetched from it are still handed over.
    pub async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        match self {
            Self::Redis(consumer) => Ok(consumer.cancel_queue(queue).await),
            Self::Sqlite(consumer) => consumer.cancel_queue(queue).await,
            Self::Amqp(consumer) => consumer.cancel_queue(queue).await,
        }
    }

    pub fn close(&self) {
        match self {
            Self::Redis(consumer) => consumer.close(),
            Self::Sqlite(consumer) => consumer.close(),
            Self::Amqp(consumer) => consumer.close(),
        }
    }
}
