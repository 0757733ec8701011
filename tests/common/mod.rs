//! Set-up shared by the broker integration tests. Each `tests/*.rs` is a crate of its
//! own that includes this module (`mod common;`) and uses only part of it, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

use std::time::Duration;

use _core::broker::redis::{RedisConsumer, RedisOptions, RedisProducer};
use _core::broker::url::BrokerUrl;
use _core::broker::{BadMessage, Fetched, IncomingMessage};
use _core::protocol::message::{
    write_body, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
};
use tokio::sync::mpsc;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// Message `n` of the no-op task `tests.noop` for `queue`: id `task-{n}`, args `[n]`.
pub fn message(queue: &str, n: usize, priority: Option<u8>) -> OutgoingMessage {
    let id = format!("task-{n}");
    let mut body = Vec::new();
    write_body(
        &mut body,
        format!("[{n}]").as_bytes(),
        b"{}",
        EMPTY_EMBED.as_bytes(),
    );
    let mut properties = TaskProperties::json(id.clone(), String::new());
    properties.priority = priority;
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        headers: TaskHeaders::new("tests.noop".into(), id, "gen0@test".into()),
        properties,
        body,
    }
}

/// What a consumer hands over: a message, or why one could not be read.
pub type Taken = Result<IncomingMessage, BadMessage>;

/// Up to `count` deliveries; stops early when none comes within 5 s.
pub async fn take(rx: &mut mpsc::UnboundedReceiver<Fetched>, count: usize) -> Vec<Taken> {
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Fetched::Message(message))) => out.push(message),
            Ok(Some(Fetched::Error(err))) => panic!("fetch error: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// The delivery tags of valid messages (panics on a bad one).
pub fn tags(taken: &[Taken]) -> Vec<String> {
    taken
        .iter()
        .map(|m| m.as_ref().expect("a valid message").delivery_tag.clone())
        .collect()
}

pub fn redis_url() -> BrokerUrl {
    BrokerUrl::parse(REDIS_URL).expect("url")
}

/// A connection to the real Redis on 127.0.0.1:6379.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379")
}

/// Delete every key under the test's `global_keyprefix` (`{prefix}:`).
pub async fn cleanup(prefix: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap_or(());
    }
}

/// A Redis producer with `options` that has sent `messages`, all written (flushed).
pub async fn redis_publish(
    options: &RedisOptions,
    messages: impl IntoIterator<Item = OutgoingMessage>,
) -> RedisProducer {
    let producer = RedisProducer::connect(&redis_url(), options.clone())
        .await
        .expect("producer");
    for message in messages {
        producer.publish(message).expect("publish");
    }
    producer
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    producer
}

/// A Redis consumer of `queues` with a prefetch window of `prefetch` (0: unbounded),
/// and the receiving end of what it hands over.
pub async fn redis_consumer(
    queues: &[&str],
    prefetch: usize,
    options: &RedisOptions,
) -> (RedisConsumer, mpsc::UnboundedReceiver<Fetched>) {
    let queues: Vec<String> = queues.iter().map(|q| (*q).to_owned()).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&redis_url(), &queues, prefetch, options.clone(), tx)
        .await
        .expect("consumer");
    (consumer, rx)
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672//";

pub fn amqp_url() -> BrokerUrl {
    BrokerUrl::parse(AMQP_URL).expect("url")
}

/// The `n` of a message made by [`message`].
pub fn body_index(message: &IncomingMessage) -> usize {
    let body: serde_json::Value = serde_json::from_slice(&message.body).expect("json body");
    body[0][0].as_u64().expect("index") as usize
}

/// A channel on the real RabbitMQ on 127.0.0.1:5672, to look at and clean up queues.
pub async fn amqp_admin() -> lapin::Channel {
    let options = _core::broker::amqp::AmqpOptions::default();
    let conn = _core::broker::amqp::connect(&amqp_url(), &options, "test-admin")
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672");
    conn.create_channel().await.expect("channel")
}

/// Delete the queues and their same-named exchanges from RabbitMQ.
pub async fn amqp_cleanup(queues: &[&str]) {
    let channel = amqp_admin().await;
    for queue in queues {
        let _ = channel
            .queue_delete((*queue).into(), Default::default())
            .await;
        let _ = channel
            .exchange_delete(
                (*queue).into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// Messages ready in a RabbitMQ queue (passive declare); `u32::MAX` when it is gone.
pub async fn amqp_depth(queue: &str) -> u32 {
    let channel = amqp_admin().await;
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(u32::MAX)
}

/// An AMQP consumer of `queues` and what it hands over.
pub async fn amqp_consumer(
    queues: &[String],
    prefetch: usize,
    options: _core::broker::amqp::AmqpOptions,
) -> (
    _core::broker::amqp::AmqpConsumer,
    mpsc::UnboundedReceiver<Fetched>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer =
        _core::broker::amqp::AmqpConsumer::connect(&amqp_url(), queues, prefetch, options, tx)
            .await
            .expect("consumer");
    (consumer, rx)
}
