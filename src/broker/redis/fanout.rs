//! Broadcasts on Redis, as kombu's Redis transport emulates exchanges (docs/wire.md §3.4):
//!
//! - A fanout (or topic) exchange is PUB/SUB: a message is one `PUBLISH` of the kombu
//!   envelope on channel `/{db}.<exchange>/<routing key>` (`/{db}.<exchange>` when the
//!   routing key is empty), prefixed by `global_keyprefix`; a subscriber
//!   `PSUBSCRIBE`s on a connection of its own.
//! - A direct exchange (pidbox replies) is kombu's binding table
//!   (`_kombu.binding.<exchange>`): a message is an `LPUSH` of the envelope to every
//!   queue bound with its routing key.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch, Mutex};

use super::{bound_queues, connect, RedisOptions, PRIORITY_SEP};
use crate::broker::broadcast::{decode, redis_envelope, Broadcast, Received};
use crate::broker::fanout::{keep_subscribed, Ended, Fanout, Sink, Subscription};
use crate::broker::url::BrokerUrl;
use crate::broker::TransportOptions;
use crate::error::{Error, Result};

/// Read timeout of the publishing connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisFanout {
    url: BrokerUrl,
    options: RedisOptions,
    /// None after a failed command: the next one connects again.
    conn: Mutex<Option<MultiplexedConnection>>,
    fanout_prefix: String,
}

impl RedisFanout {
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        let url = &url.with_sentinel(&options.extra)?;
        let options = RedisOptions::from_transport(options)?;
        let url = url.with_redis_tls(options.tls.as_ref());
        let conn = connect(&url, options.connect_timeout, Some(RESPONSE_TIMEOUT)).await?;
        let fanout_prefix = format!("{}/{}.", options.global_keyprefix, url.db);
        Ok(Self {
            url,
            options,
            conn: Mutex::new(Some(conn)),
            fanout_prefix,
        })
    }

    /// The connection, made again if the last command lost it.
    async fn connection(&self) -> Result<MultiplexedConnection> {
        let mut conn = self.conn.lock().await;
        if let Some(active) = conn.as_ref() {
            return Ok(active.clone());
        }
        let fresh = connect(
            &self.url,
            self.options.connect_timeout,
            Some(RESPONSE_TIMEOUT),
        )
        .await?;
        *conn = Some(fresh.clone());
        Ok(fresh)
    }

    /// Run `pipe`; a failure drops the connection so that the next call connects again.
    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        let mut conn = self.connection().await?;
        match pipe.query_async::<T>(&mut conn).await {
            Ok(value) => Ok(value),
            Err(err) => {
                *self.conn.lock().await = None;
                Err(err.into())
            }
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.options.global_keyprefix)
    }

    fn binding_key(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding.{exchange}"))
    }
}

impl Fanout for RedisFanout {
    async fn publish(&self, batch: &[Broadcast]) -> Result<usize> {
        let mut pipe = redis::pipe();
        let (mut published, mut pushed) = (0, 0);
        for message in batch {
            let envelope = redis_envelope(message)?;
            if message.exchange_type != "direct" {
                let channel =
                    redis_channel(&self.fanout_prefix, &message.exchange, &message.routing_key);
                pipe.cmd("PUBLISH").arg(channel).arg(envelope);
                published += 1;
                continue;
            }
            let members: Vec<String> = {
                let mut conn = self.connection().await?;
                redis::cmd("SMEMBERS")
                    .arg(self.binding_key(&message.exchange))
                    .query_async(&mut conn)
                    .await?
            };
            for queue in bound_queues(&members, &message.routing_key) {
                pipe.cmd("LPUSH").arg(self.key(&queue)).arg(&envelope);
                pushed += 1;
            }
        }
        if published + pushed == 0 {
            return Ok(0);
        }
        // PUBLISH replies with its receivers, LPUSH with the list's length: count the
        // receivers of the one and the queues of the other.
        let replies: Vec<usize> = self.query(&pipe).await?;
        let receivers: usize = replies.iter().take(published).sum();
        Ok(receivers + pushed)
    }

    async fn subscribe(&self, subscription: &Subscription<'_>, sink: Sink) -> Result<()> {
        let pattern = subscription.binding.replace('#', "*");
        let channel = redis_channel(&self.fanout_prefix, subscription.exchange, &pattern);
        // Subscribe once here so that a failure is reported to the caller.
        let first = open_subscription(&self.url, &channel, self.options.connect_timeout).await?;
        let timeout = self.options.connect_timeout;
        let url = self.url.clone();
        tokio::spawn(async move {
            let open = || open_subscription(&url, &channel, timeout);
            keep_subscribed(first, open, forward, sink).await;
        });
        Ok(())
    }

    async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("SADD")
            .arg(self.binding_key(exchange))
            .arg(binding_member(routing_key, queue))
            .ignore();
        self.query::<()>(&pipe).await
    }

    async fn unbind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("SREM")
            .arg(self.binding_key(exchange))
            .arg(binding_member(routing_key, queue))
            .ignore()
            .cmd("DEL")
            .arg(self.key(queue))
            .ignore();
        self.query::<()>(&pipe).await
    }

    async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let mut pipe = redis::pipe();
        pipe.cmd("RPOP").arg(self.key(queue));
        let (raw,): (Option<Vec<u8>>,) = self.query(&pipe).await?;
        Ok(raw.map(|raw| decode(&raw)))
    }

    async fn pop_wait(&self, queue: &str, timeout: Duration) -> Result<Option<Received>> {
        if timeout.is_zero() {
            return self.pop(queue).await;
        }
        let mut conn = self.connection().await?;
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg(self.key(queue))
            .arg(timeout.as_secs_f64())
            .query_async(&mut conn)
            .await?;
        Ok(popped.map(|(_, raw)| decode(&raw)))
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let keys: Vec<String> = std::iter::once(queue.to_owned())
            .chain(
                [3, 6, 9]
                    .iter()
                    .map(|step| format!("{queue}{PRIORITY_SEP}{step}")),
            )
            .map(|name| self.key(&name))
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in &keys {
            pipe.cmd("LLEN").arg(key);
        }
        for key in &keys {
            pipe.cmd("DEL").arg(key).ignore();
        }
        let sizes: Vec<u64> = self.query(&pipe).await?;
        Ok(sizes.iter().sum())
    }
}

/// The PUB/SUB channel kombu's Redis transport uses for `(exchange, routing_key)`.
pub fn redis_channel(prefix: &str, exchange: &str, routing_key: &str) -> String {
    if routing_key.is_empty() {
        format!("{prefix}{exchange}")
    } else {
        format!("{prefix}{exchange}/{routing_key}")
    }
}

fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{PRIORITY_SEP}{PRIORITY_SEP}{queue}")
}

/// Subscribe on a connection of its own (to the current master for a sentinel URL).
async fn open_subscription(
    url: &BrokerUrl,
    channel: &str,
    timeout: Duration,
) -> Result<redis::aio::PubSub> {
    let info = super::sentinel::connection_info(url, timeout).await?;
    let client = super::open_client_at(url, info)?;
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

/// Forward what one subscription receives until it is lost or stopped.
async fn forward(
    pubsub: redis::aio::PubSub,
    tx: mpsc::UnboundedSender<Received>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let mut stream = pubsub.into_on_message();
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => {
                    let payload: &[u8] = message.get_payload_bytes();
                    if tx.send(decode(payload)).is_err() {
                        return Ended::Stopped;
                    }
                }
                None => return Ended::Lost,
            },
            _ = stop.changed() => return Ended::Stopped,
        }
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

    #[test]
    fn binding_members_follow_kombu() {
        let members = vec![
            binding_member("oid1", "oid1.reply.celery.pidbox"),
            binding_member("oid2", "oid2.reply.celery.pidbox"),
            "garbage".to_owned(),
        ];
        assert_eq!(members[0], "oid1\x06\x16\x06\x16oid1.reply.celery.pidbox");
        assert_eq!(
            bound_queues(&members, "oid2"),
            vec!["oid2.reply.celery.pidbox"]
        );
        assert!(bound_queues(&members, "oid3").is_empty());
    }
}
