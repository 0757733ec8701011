//! Events and remote control on the fanout log: [`SqliteMailbox`], the [`Fanout`] of
//! the embedded database, and [`EventSubscriber`], which reads events back.

use super::*;
use crate::broker::fanout::{Fanout, Sink, Subscription};

/// Broadcasts on the embedded database, for `events` and `pidbox`: requests, events
/// and replies are all rows of the fanout log (see [`SqliteFanout`]).
///
/// - A worker subscribes to `celery.pidbox` ([`Fanout::subscribe`]).
/// - A client "binds its reply queue": a subscription to `reply.celery.pidbox` with
///   its routing key (the oid), read by [`Fanout::pop`]; a worker's reply is a
///   broadcast with that routing key. Only replies sent after the bind are seen, as
///   with a queue declared before the request.
pub struct SqliteMailbox {
    fanout: SqliteFanout,
    replies: tokio::sync::Mutex<HashMap<String, FanoutSubscription>>,
}

impl SqliteMailbox {
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        let options = SqliteOptions::from_transport(options)?;
        Ok(Self {
            fanout: SqliteFanout::connect(url, options).await?,
            replies: tokio::sync::Mutex::new(HashMap::new()),
        })
    }
}

impl Fanout for SqliteMailbox {
    /// One row per message, holding the kombu envelope (as on Redis), in one
    /// transaction; returns the number of messages.
    async fn publish(&self, batch: &[Broadcast]) -> Result<usize> {
        let mut rows = Vec::with_capacity(batch.len());
        for message in batch {
            rows.push(FanoutRow {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                payload: redis_envelope(message)?,
            });
        }
        self.fanout.publish(rows).await?;
        Ok(batch.len())
    }

    /// `binding`: `""` or `"#"` for all, else an AMQP topic pattern (`*` one word,
    /// `#` any). A database is never lost: nothing to subscribe again.
    async fn subscribe(&self, subscription: &Subscription<'_>, sink: Sink) -> Result<()> {
        let binding = subscription.binding;
        let key = (!binding.is_empty() && binding != "#").then_some(binding);
        let mut reader = self.fanout.subscribe(subscription.exchange, key).await?;
        let Sink { tx, mut stop, .. } = sink;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = reader.recv(Duration::from_secs(3600)) => match got {
                        Ok(Some(message)) => {
                            let received = message.payload.and_then(|raw| decode(&raw));
                            if tx.send(received).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        });
        Ok(())
    }

    /// Receive what is sent to `exchange` with `routing_key` from now on, as `queue`.
    async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let subscription = self.fanout.subscribe(exchange, Some(routing_key)).await?;
        self.replies
            .lock()
            .await
            .insert(queue.to_owned(), subscription);
        Ok(())
    }

    async fn unbind(&self, _exchange: &str, _routing_key: &str, queue: &str) -> Result<()> {
        self.replies.lock().await.remove(queue);
        Ok(())
    }

    /// The oldest message received as `queue`, if any (never waits).
    async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let mut replies = self.replies.lock().await;
        let Some(subscription) = replies.get_mut(queue) else {
            return Err(Error::Config(format!("queue {queue:?} is not bound")));
        };
        Ok(subscription
            .try_recv()?
            .map(|message| message.payload.and_then(|raw| decode(&raw))))
    }

    /// Delete the ready messages of the task queue `queue`; how many.
    async fn purge(&self, queue: &str) -> Result<u64> {
        self.fanout.purge(queue).await
    }
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
        if url.scheme != crate::broker::url::Scheme::Sqlite {
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

/// Whether `key` matches the AMQP topic `pattern` (`*`: one word, `#`: zero or more).
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| go(rest, &key[skip..])),
            Some((&word, rest)) => match key.split_first() {
                Some((first, others)) => (word == "*" || word == *first) && go(rest, others),
                None => false,
            },
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

/// Counts of a database's rows, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: usize,
    pub claimed: usize,
}

/// How many messages of `queue` are ready and how many are claimed.
pub fn queue_counts(conn: &Connection, queue: &str) -> rusqlite::Result<QueueCounts> {
    conn.query_row(
        "SELECT count(*) FILTER (WHERE claimed_at IS NULL), count(*) FILTER (WHERE claimed_at IS NOT NULL)
         FROM messages WHERE queue = ?1",
        params![queue],
        |row| {
            Ok(QueueCounts {
                ready: row.get::<_, i64>(0)? as usize,
                claimed: row.get::<_, i64>(1)? as usize,
            })
        },
    )
}
