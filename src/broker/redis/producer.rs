//! The producer: `LPUSH` in kombu's layout, everything pending in one pipeline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use super::{connect, priority_key, RedisOptions, PRIORITY_SEP};
use crate::broker::outbox::Outbox;
use crate::broker::url::BrokerUrl;
use crate::error::{Error, Result};
use crate::protocol::envelope;
use crate::protocol::message::OutgoingMessage;
use crate::retry::backoff;

/// Publishes task messages; cheap to call from any thread.
pub struct RedisProducer {
    tx: mpsc::UnboundedSender<OutgoingMessage>,
    state: Arc<Outbox>,
    masked: String,
}

impl RedisProducer {
    /// Connect (failing fast with a clear error) and start the I/O task.
    pub async fn connect(url: &BrokerUrl, options: RedisOptions) -> Result<Self> {
        let conn = connect(url, options.connect_timeout, Some(Duration::from_secs(30))).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Outbox::default());
        tokio::spawn(publish_loop(conn, url.clone(), options, rx, state.clone()));
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
        })
    }

    /// Hand a message to the I/O task; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        self.state.admit()?;
        crate::trace::hop("produce.handoff");
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the producer"))
    }

    /// Wait until every message published before this call is written to Redis.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.state.flush(timeout, &self.masked, "no reply").await
    }

    pub fn close(&self) {
        self.state.close();
    }
}

async fn publish_loop(
    mut conn: MultiplexedConnection,
    url: BrokerUrl,
    options: RedisOptions,
    mut rx: mpsc::UnboundedReceiver<OutgoingMessage>,
    state: Arc<Outbox>,
) {
    const MAX_BATCH: usize = 4096;
    let mut declared: std::collections::HashSet<String> = Default::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        crate::trace::hop("produce.woken");
        let count = batch.len() as u64;
        let pipe = build_publish_pipeline(&batch, &options, &mut declared);
        batch.clear();
        let mut attempt = 0;
        loop {
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    crate::trace::hop("produce.written");
                    break;
                }
                Err(err) => {
                    state.note_error(err.to_string());
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    if let Ok(fresh) =
                        connect(&url, options.connect_timeout, Some(Duration::from_secs(30))).await
                    {
                        conn = fresh;
                    }
                }
            }
        }
        state.written(count);
    }
}

fn build_publish_pipeline(
    batch: &[OutgoingMessage],
    options: &RedisOptions,
    declared: &mut std::collections::HashSet<String>,
) -> redis::Pipeline {
    // Group by list, keeping each list's order: LPUSH k v1 v2 puts v2 at the head, and
    // consumers pop from the tail, so v1 is still served first.
    let mut lists: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut pipe = redis::pipe();
    for message in batch {
        let tag = uuid::Uuid::new_v4().to_string();
        let encoded = match envelope::encode(message, &tag) {
            Ok(bytes) => bytes,
            // Headers and body were produced by our own encoder; this cannot fail in
            // practice, and a message we cannot frame is better dropped than wedged.
            Err(_) => continue,
        };
        let queue = if message.exchange.is_empty() {
            message.routing_key.as_str()
        } else {
            // Named exchanges are resolved through kombu's binding table by the
            // consumer side of kombu; Celery itself publishes direct queues to `''`.
            message.routing_key.as_str()
        };
        if declared.insert(queue.to_owned()) {
            pipe.cmd("SADD")
                .arg(options.key(&format!("_kombu.binding.{queue}")))
                .arg(format!("{queue}{PRIORITY_SEP}{PRIORITY_SEP}{queue}"))
                .ignore();
        }
        let key = options.key(&priority_key(
            queue,
            message.properties.priority.unwrap_or(0),
        ));
        let slot = *index.entry(key.clone()).or_insert_with(|| {
            lists.push((key, Vec::new()));
            lists.len() - 1
        });
        lists[slot].1.push(encoded);
    }
    for (key, values) in lists {
        pipe.cmd("LPUSH").arg(key).arg(values).ignore();
    }
    pipe
}

impl crate::broker::traits::Producer for RedisProducer {
    fn publish(&self, message: OutgoingMessage) -> Result<()> {
        RedisProducer::publish(self, message)
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        RedisProducer::flush(self, timeout).await
    }

    fn close(&self) {
        RedisProducer::close(self)
    }
}
