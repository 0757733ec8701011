//! The remote-control mailbox on the fanout.

use super::*;

/// Remote control (kombu's pidbox) on the embedded database, for
/// `pidbox::Mailbox`: requests and replies are broadcasts (see [`SqliteFanout`]).
///
/// - A worker subscribes to `celery.pidbox` ([`SqliteMailbox::subscribe`]).
/// - A client "binds its reply queue": a subscription to `reply.celery.pidbox` with
///   its routing key (the oid), read by [`SqliteMailbox::pop`]; a worker's reply is a
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

    /// Forward the broadcasts of `exchange` to `tx` until `stop` changes. `binding`:
    /// `""` or `"#"` for all, else an AMQP topic pattern (`*` one word, `#` any).
    pub async fn subscribe(
        &self,
        exchange: &str,
        binding: &str,
        tx: mpsc::UnboundedSender<Received>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let key = (!binding.is_empty() && binding != "#").then_some(binding);
        let mut subscription = self.fanout.subscribe(exchange, key).await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = subscription.recv(Duration::from_secs(3600)) => match got {
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

    /// One broadcast of the kombu envelope (as on Redis); returns 1.
    pub async fn publish(&self, message: &Broadcast) -> Result<usize> {
        let row = FanoutRow {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            payload: redis_envelope(message)?,
        };
        self.fanout.publish(vec![row]).await?;
        Ok(1)
    }

    /// Receive what is sent to `exchange` with `routing_key` from now on, as `queue`.
    pub async fn bind(&self, exchange: &str, routing_key: &str, queue: &str) -> Result<()> {
        let subscription = self.fanout.subscribe(exchange, Some(routing_key)).await?;
        self.replies
            .lock()
            .await
            .insert(queue.to_owned(), subscription);
        Ok(())
    }

    pub async fn unbind(&self, queue: &str) -> Result<()> {
        self.replies.lock().await.remove(queue);
        Ok(())
    }

    /// The oldest message received as `queue`, if any (never waits).
    pub async fn pop(&self, queue: &str) -> Result<Option<Received>> {
        let mut replies = self.replies.lock().await;
        let Some(subscription) = replies.get_mut(queue) else {
            return Err(Error::Config(format!("queue {queue:?} is not bound")));
        };
        Ok(subscription
            .try_recv()?
            .map(|message| message.payload.and_then(|raw| decode(&raw))))
    }

    /// Delete the ready messages of the task queue `queue`; how many.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        self.fanout.purge(queue).await
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
