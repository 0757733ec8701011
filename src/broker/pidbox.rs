//! Remote control (docs/wire.md §6): the broker side of kombu's pidbox `Mailbox`, on
//! whichever transport the URL names (see [`Fanout`] and each transport's fanout
//! module for the wire).
//!
//! - Requests are broadcast on the fanout exchange `celery.pidbox`; a worker
//!   subscribes to it ([`Mailbox::subscribe`]) through a connection of its own, made
//!   again after a lost connection.
//! - Replies go to the direct exchange `reply.celery.pidbox`: the client binds its reply
//!   queue `<oid>.reply.celery.pidbox` under routing key `<oid>` and pops replies from
//!   it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use super::broadcast::Broadcast;
pub use super::broadcast::{decode, Received};
use super::fanout::{Fanout, FanoutLink, Sink};
pub use super::fanout::{QueueTimes, Subscription};
use super::url::BrokerUrl;
use super::TransportOptions;
use crate::error::{Error, Result};

pub struct Mailbox {
    link: FanoutLink,
    received: Mutex<Option<mpsc::UnboundedReceiver<Received>>>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Times the subscription was made again after a lost connection.
    resubscribed: Arc<AtomicU64>,
}

impl Mailbox {
    pub async fn connect(
        url: &BrokerUrl,
        options: &TransportOptions,
        times: QueueTimes,
    ) -> Result<Self> {
        let link = FanoutLink::connect(url, options, times, "pidbox").await?;
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
        let mut received = self.received.lock().await;
        if received.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Sink {
            tx,
            stop: self.stop.subscribe(),
            resubscribed: Arc::clone(&self.resubscribed),
        };
        self.link.subscribe(subscription, sink).await?;
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

    /// Publish `message`: a fanout exchange reaches every subscriber, a direct one the
    /// queues bound with the message's routing key (none: dropped, as kombu drops a
    /// message no queue is bound for). Returns the receivers reached where the broker
    /// says (Redis), else 1.
    pub async fn publish(&self, message: &Broadcast) -> Result<usize> {
        self.link.publish(std::slice::from_ref(message)).await
    }

    /// Bind `queue` to `exchange` under `routing_key` (Redis: kombu's binding table;
    /// AMQP: declare the reply queue and start consuming it).
    pub async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        self.link.bind(exchange, routing_key, queue).await
    }

    /// Remove the binding and delete the queue.
    pub async fn unbind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        self.link.unbind(exchange, routing_key, queue).await
    }

    /// Take the oldest message of `queue` (no ack: replies are fire and forget).
    pub async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        self.link.pop(queue).await
    }

    /// As [`Mailbox::pop`], waiting up to `timeout` for a message (Redis: `BRPOP`;
    /// AMQP: the reply consumer; others: polled).
    pub async fn pop_wait(&self, queue: &str, timeout: Duration) -> Result<Option<Received>> {
        self.link.pop_wait(queue, timeout).await
    }

    /// Remove every waiting message of the task queue `queue` (what `celery purge`
    /// does); the number removed. A queue that does not exist counts 0.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        self.link.purge(queue).await
    }

    /// Stop the subscription and close the connection (AMQP: a `connection.close`, so
    /// that the broker drops the exclusive queues at once).
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        self.link.close().await;
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
