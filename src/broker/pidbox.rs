//! Remote control (celery-wire §6) on Redis: the broker side of kombu's `Mailbox`.
//!
//! - Requests are broadcast on the fanout exchange `celery.pidbox`: kombu's Redis
//!   transport makes that one `PUBLISH` on `/{db}.celery.pidbox`, so a worker
//!   `PSUBSCRIBE`s that channel on a connection of its own ([`Mailbox::subscribe`]).
//! - Replies go to the direct exchange `reply.celery.pidbox`: the client binds its reply
//!   queue `<oid>.reply.celery.pidbox` under routing key `<oid>` in kombu's binding table
//!   (`_kombu.binding.reply.celery.pidbox`); a reply is an `LPUSH` of the kombu envelope
//!   to every queue bound with the reply's routing key.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Mutex};

use super::events::{redis_channel, redis_envelope, Broadcast};
use super::redis::{self as redis_transport, RedisOptions, PRIORITY_SEP};
use super::url::{BrokerUrl, Scheme};
use super::TransportOptions;
use crate::error::{Error, Result};
use crate::protocol::envelope::IncomingEnvelope;

/// How long a lost subscription waits before it connects again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// A message read from a channel or a reply queue: its headers (a JSON object) and
/// body bytes, or why it could not be read.
pub type Received = std::result::Result<(Value, Vec<u8>), String>;

pub struct Mailbox {
    url: BrokerUrl,
    options: RedisOptions,
    conn: MultiplexedConnection,
    fanout_prefix: String,
    received: Mutex<Option<mpsc::UnboundedReceiver<Received>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Mailbox {
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        if !matches!(
            url.scheme,
            Scheme::Redis | Scheme::Rediss | Scheme::RedisSocket
        ) {
            return Err(Error::Config(
                "remote control is only implemented for Redis brokers".into(),
            ));
        }
        let options = RedisOptions::from_transport(options)?;
        let conn =
            redis_transport::connect(url, options.connect_timeout, Some(Duration::from_secs(10)))
                .await?;
        let fanout_prefix = format!("{}/{}.", options.global_keyprefix, url.db);
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(Self {
            url: url.clone(),
            options,
            conn,
            fanout_prefix,
            received: Mutex::new(None),
            stop,
        })
    }

    /// Start receiving the broadcasts of `exchange` (once; later calls do nothing).
    pub async fn subscribe(&self, exchange: &str) -> Result<()> {
        let mut received = self.received.lock().await;
        if received.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let channel = redis_channel(&self.fanout_prefix, exchange, "");
        let info = self.url.to_redis_info()?;
        let client = redis::Client::open(info)
            .map_err(|err| Error::Connection(format!("{}: {err}", self.url.masked())))?;
        // Subscribe once here so that a failure is reported to the caller.
        let first = open_subscription(&client, &channel, self.options.connect_timeout).await?;
        tokio::spawn(subscription_loop(
            client,
            channel,
            self.options.connect_timeout,
            first,
            tx,
            self.stop.subscribe(),
        ));
        *received = Some(rx);
        Ok(())
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

    /// Publish `message`: a `PUBLISH` for a fanout exchange, else an `LPUSH` to every
    /// queue bound to the exchange with the message's routing key (none: dropped, as
    /// kombu drops a message no queue is bound for). The number of queues reached.
    pub async fn publish(&self, message: &Broadcast) -> Result<usize> {
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
        let queues = bound(&members, &message.routing_key);
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

    /// Bind `queue` to `exchange` under `routing_key` in kombu's binding table.
    pub async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SADD")
            .arg(self.binding_key(exchange))
            .arg(binding_member(routing_key, queue))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Remove the binding and delete the queue.
    pub async fn unbind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("SREM")
            .arg(self.binding_key(exchange))
            .arg(binding_member(routing_key, queue))
            .ignore()
            .cmd("DEL")
            .arg(self.key(queue))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Take the oldest message of `queue` (no ack: replies are fire and forget).
    pub async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("RPOP")
            .arg(self.key(queue))
            .query_async(&mut conn)
            .await?;
        Ok(raw.map(|raw| decode(&raw)))
    }

    pub fn close(&self) {
        let _ = self.stop.send(true);
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.options.global_keyprefix)
    }

    fn binding_key(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding.{exchange}"))
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.close();
    }
}

fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{PRIORITY_SEP}{PRIORITY_SEP}{queue}")
}

/// The queues of binding-table `members` whose routing key is `routing_key`.
fn bound(members: &[String], routing_key: &str) -> Vec<String> {
    members
        .iter()
        .filter_map(|member| {
            let mut parts = member.split(PRIORITY_SEP);
            let key = parts.next()?;
            let _pattern = parts.next()?;
            let queue = parts.next()?;
            (key == routing_key).then(|| queue.to_owned())
        })
        .collect()
}

/// Headers and body of a kombu envelope.
pub fn decode(raw: &[u8]) -> Received {
    let envelope = IncomingEnvelope::parse(raw).map_err(|err| err.to_string())?;
    let body = envelope.body_bytes().map_err(|err| err.to_string())?;
    let headers = match envelope.headers.as_deref() {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|err| err.to_string())?,
        None => Value::Object(Map::new()),
    };
    Ok((headers, body))
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
) {
    let mut current = Some(first);
    loop {
        let pubsub = match current.take() {
            Some(pubsub) => pubsub,
            None => match open_subscription(&client, &channel, timeout).await {
                Ok(pubsub) => pubsub,
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
        assert_eq!(bound(&members, "oid2"), vec!["oid2.reply.celery.pidbox"]);
        assert!(bound(&members, "oid3").is_empty());
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
