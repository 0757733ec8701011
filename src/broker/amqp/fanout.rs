//! Broadcasts on AMQP, declared with Celery 5.7's exact flags so that mixed fleets
//! agree (docs/wire.md §6):
//!
//! - A message is a `basic.publish` to its exchange, declared once per connection
//!   with the message's type and durability (`celeryev`: a durable topic;
//!   `celery.pidbox` and `reply.celery.pidbox`: non-durable fanout and direct, not
//!   auto-delete), without `mandatory`: nobody listening is normal. No publisher
//!   confirm; a lost connection is opened again by the next publish.
//! - A subscriber's queue (`<node>.celery.pidbox`) and a bound reply queue
//!   (`<oid>.reply.celery.pidbox`): exclusive, auto-delete, non-durable, `x-expires` =
//!   `control_queue_expires` (10 s) and `x-message-ttl` = `control_queue_ttl` (300 s)
//!   in milliseconds; consumed without acks.
//! - A subscription has a connection of its own and declares its queue again after a
//!   lost connection.

use lapin::options::{QueueDeleteOptions, QueuePurgeOptions};
use tokio::sync::Mutex as AsyncMutex;

use super::*;
use crate::broker::broadcast::{Broadcast, Received};
use crate::broker::fanout::{keep_subscribed, Ended, Fanout, QueueTimes, Sink, Subscription};

struct Link {
    conn: Connection,
    channel: Channel,
    /// Exchanges declared on `channel` so far.
    declared: HashSet<String>,
}

pub struct AmqpFanout {
    url: BrokerUrl,
    options: AmqpOptions,
    times: QueueTimes,
    purpose: String,
    /// None after a lost connection: the next call connects again.
    link: AsyncMutex<Option<Link>>,
    /// Reply queues consumed, by name (each has its own lock: several threads may
    /// wait for their replies at once).
    replies: AsyncMutex<HashMap<String, Arc<AsyncMutex<lapin::Consumer>>>>,
}

impl AmqpFanout {
    pub async fn connect(
        url: &BrokerUrl,
        options: &TransportOptions,
        times: QueueTimes,
        purpose: &str,
    ) -> Result<Self> {
        let options = AmqpOptions::from_transport(options)?;
        let link = open_link(url, &options, purpose).await?;
        Ok(Self {
            url: url.clone(),
            options,
            times,
            purpose: purpose.to_owned(),
            link: AsyncMutex::new(Some(link)),
            replies: AsyncMutex::new(HashMap::new()),
        })
    }

    fn lost(&self, err: &lapin::Error) -> Error {
        lost(&self.url, err)
    }

    /// The open link, opened again if it was lost.
    async fn link(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Link>> {
        let mut guard = self.link.lock().await;
        if guard
            .as_ref()
            .is_none_or(|link| !connection_alive(&link.conn, &link.channel))
        {
            *guard = None;
            *guard = Some(open_link(&self.url, &self.options, &self.purpose).await?);
        }
        tokio::sync::MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| Error::Closed("the connection"))
    }

    async fn reply_consumer(&self, queue: &str) -> Result<Arc<AsyncMutex<lapin::Consumer>>> {
        self.replies
            .lock()
            .await
            .get(queue)
            .cloned()
            .ok_or_else(|| Error::Config(format!("queue {queue:?} is not bound")))
    }
}

async fn open_link(url: &BrokerUrl, options: &AmqpOptions, purpose: &str) -> Result<Link> {
    let conn = connect(url, options, purpose).await?;
    let channel = conn.create_channel().await.map_err(|err| lost(url, &err))?;
    Ok(Link {
        conn,
        channel,
        declared: HashSet::new(),
    })
}

impl Fanout for AmqpFanout {
    async fn publish(&self, batch: &[Broadcast]) -> Result<usize> {
        let mut link = self.link().await?;
        let lost = |err: lapin::Error| self.lost(&err);
        let mut outcome = Ok(batch.len());
        for message in batch {
            if !message.exchange.is_empty() && !link.declared.contains(&message.exchange) {
                if let Err(err) = declare_exchange(&link.channel, message, lost).await {
                    outcome = Err(err);
                    break;
                }
                link.declared.insert(message.exchange.clone());
            }
            // Requests (fanout) persistent, the rest transient: what kombu sends.
            let delivery_mode = if message.exchange_type == "fanout" {
                2
            } else {
                1
            };
            if let Err(err) = publish_broadcast(&link.channel, message, delivery_mode, lost).await {
                outcome = Err(err);
                break;
            }
        }
        if outcome.is_err() {
            // Declared exchanges are forgotten with the channel: start afresh.
            link.declared.clear();
            drop(link);
            *self.link.lock().await = None;
        }
        outcome
    }

    async fn subscribe(&self, subscription: &Subscription<'_>, sink: Sink) -> Result<()> {
        if subscription.queue.is_empty() {
            return Err(Error::Config(
                "subscribing on AMQP needs a queue name".into(),
            ));
        }
        let mut spec = pidbox_queue(
            &self.times,
            subscription.queue,
            subscription.exchange,
            subscription.exchange_type,
            subscription.binding,
        );
        spec.exchange_durable = subscription.durable;
        let first = open_subscription(&self.url, &self.options, &spec).await?;
        let (url, options) = (self.url.clone(), self.options.clone());
        tokio::spawn(async move {
            let open = || open_subscription(&url, &options, &spec);
            keep_subscribed(first, open, forward, sink).await;
        });
        Ok(())
    }

    async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let spec = pidbox_queue(&self.times, queue, exchange, "direct", routing_key);
        let mut link = self.link().await?;
        let warning = declare(&link.conn, &spec)
            .await
            .map_err(|err| self.lost(&err))??;
        if let Some(warning) = warning {
            return Err(Error::Connection(warning));
        }
        let consumer = consume(&link.channel, queue)
            .await
            .map_err(|err| self.lost(&err))?;
        link.declared.insert(exchange.to_owned());
        drop(link);
        self.replies
            .lock()
            .await
            .insert(queue.to_owned(), Arc::new(AsyncMutex::new(consumer)));
        Ok(())
    }

    async fn unbind(&self, _exchange: &str, _routing_key: &str, queue: &str) -> Result<()> {
        let consumer = self.replies.lock().await.remove(queue);
        drop(consumer);
        let name = short("queue name", queue)?;
        let link = self.link().await?;
        link.channel
            .queue_delete(name, QueueDeleteOptions::default())
            .await
            .map_err(|err| self.lost(&err))?;
        Ok(())
    }

    async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let consumer = self.reply_consumer(queue).await?;
        let mut consumer = consumer.lock().await;
        match consumer.next().now_or_never() {
            None => Ok(None),
            Some(None) => Err(Error::Closed("the reply queue")),
            Some(Some(Ok(delivery))) => Ok(Some(from_delivery(&delivery))),
            Some(Some(Err(err))) => Err(self.lost(&err)),
        }
    }

    async fn pop_wait(&self, queue: &str, timeout: Duration) -> Result<Option<Received>> {
        if timeout.is_zero() {
            return self.pop(queue).await;
        }
        let consumer = self.reply_consumer(queue).await?;
        let mut consumer = consumer.lock().await;
        match tokio::time::timeout(timeout, consumer.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(Error::Closed("the reply queue")),
            Ok(Some(Ok(delivery))) => Ok(Some(from_delivery(&delivery))),
            Ok(Some(Err(err))) => Err(self.lost(&err)),
        }
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        // A channel of its own: purging a missing queue closes the channel.
        let channel = {
            let link = self.link().await?;
            link.conn
                .create_channel()
                .await
                .map_err(|err| self.lost(&err))?
        };
        let purged = channel
            .queue_purge(short("queue name", queue)?, QueuePurgeOptions::default())
            .await;
        let _ = channel.close(200, ShortString::from("OK")).await;
        match purged {
            Ok(count) => Ok(u64::from(count)),
            Err(err) if matches!(err.kind(), lapin::ErrorKind::ProtocolError(_)) => Ok(0),
            Err(err) => Err(self.lost(&err)),
        }
    }

    /// A `connection.close`, so that the broker drops the exclusive queues at once.
    async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            if link.conn.status().connected() {
                let closing = link.conn.close(200, ShortString::from("OK"));
                let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
            }
        }
    }
}

/// A pidbox queue (node or reply) on `exchange` as kombu 5.7 declares it.
fn pidbox_queue(
    times: &QueueTimes,
    queue: &str,
    exchange: &str,
    exchange_type: &str,
    key: &str,
) -> QueueSpec {
    QueueSpec {
        name: queue.to_owned(),
        exchange: exchange.to_owned(),
        exchange_type: exchange_type.to_owned(),
        routing_key: key.to_owned(),
        durable: false,
        auto_delete: true,
        exclusive: true,
        arguments: times.arguments(),
        exchange_durable: false,
        exchange_auto_delete: false,
    }
}

fn lost(url: &BrokerUrl, err: &lapin::Error) -> Error {
    Error::Connection(format!("{}: {}", url.masked(), describe(err, url)))
}

/// Declares the exchange a broadcast goes to, with the flags kombu gives it: durable
/// only if asked, never auto-deleted.
async fn declare_exchange(
    channel: &Channel,
    message: &Broadcast,
    lost: impl Fn(lapin::Error) -> Error,
) -> Result<()> {
    channel
        .exchange_declare(
            short("exchange name", &message.exchange)?,
            exchange_kind(&message.exchange_type),
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

/// `basic.publish` of one JSON broadcast with kombu's properties.
async fn publish_broadcast(
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
        .with_headers(json_to_field_table(&message.headers)?);
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
        .map(field_table_to_json)
        .unwrap_or_default();
    Ok((Value::Object(headers), delivery.data.clone()))
}

/// A connection of its own with the subscriber's queue declared and consumed.
async fn open_subscription(
    url: &BrokerUrl,
    options: &AmqpOptions,
    spec: &QueueSpec,
) -> Result<(Connection, lapin::Consumer)> {
    let conn = connect(url, options, "pidbox subscription").await?;
    let warning = match declare(&conn, spec).await.map_err(|err| lost(url, &err))? {
        Ok(warning) => warning,
        Err(conflict) => Some(conflict.to_string()),
    };
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

/// Forward what one subscription receives until it is lost or stopped, then close
/// its connection.
async fn forward(
    (conn, mut consumer): (Connection, lapin::Consumer),
    tx: mpsc::UnboundedSender<Received>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let ended = loop {
        tokio::select! {
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    if tx.send(from_delivery(&delivery)).is_err() {
                        break Ended::Stopped;
                    }
                }
                _ => break Ended::Lost, // connection or channel lost: declare and consume again
            },
            _ = stop.changed() => break Ended::Stopped,
        }
    };
    drop(consumer);
    let _ = conn.close(200, ShortString::from("OK")).await;
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_queues_have_celery_57_flags() {
        let times = QueueTimes::default();
        let node = pidbox_queue(&times, "w1@vm.celery.pidbox", "celery.pidbox", "fanout", "");
        assert!(node.exclusive && node.auto_delete && !node.durable);
        assert!(!node.exchange_durable && !node.exchange_auto_delete);
        assert_eq!(node.exchange_type, "fanout");
        assert_eq!(node.arguments["x-expires"], 10_000);
        assert_eq!(node.arguments["x-message-ttl"], 300_000);
        let none = QueueTimes {
            expires: None,
            message_ttl: Some(Duration::ZERO),
        };
        let reply = pidbox_queue(
            &none,
            "oid.reply.celery.pidbox",
            "reply.celery.pidbox",
            "direct",
            "oid",
        );
        assert!(reply.arguments.is_empty());
        assert_eq!(reply.routing_key, "oid");
    }
}
