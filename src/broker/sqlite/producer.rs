//! The producer: its thread inserts everything pending in one transaction.

use super::*;

/// Publishes task messages; cheap to call from any thread.
pub struct SqliteProducer {
    tx: std_mpsc::Sender<OutgoingMessage>,
    state: Arc<Outbox>,
    masked: String,
    _checkpointer: Option<Arc<Checkpointer>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SqliteProducer {
    /// Ends the writer thread and waits for it: it writes what is queued and closes its
    /// connection now, not while a prefork supervisor forks (see `Checkpointer`).
    fn drop(&mut self) {
        self.tx = std_mpsc::channel().0; // the writer's `recv` fails once this is gone
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

pub(super) const MAX_PUBLISH_BATCH: usize = 4096;

impl SqliteProducer {
    /// Open (failing fast with a clear error) and start the writer thread.
    pub async fn connect(url: &BrokerUrl, options: SqliteOptions) -> Result<Self> {
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let (tx, rx) = std_mpsc::channel();
        let state = Arc::new(Outbox::default());
        let thread_state = state.clone();
        let writer = std::thread::Builder::new()
            .name("celeriac-sqlite-pub".into())
            .spawn(move || publish_loop(conn, path, rx, thread_state))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
            _checkpointer: checkpointer,
            writer: Some(writer),
        })
    }

    /// Hand a message to the writer thread; never waits.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        self.state.admit()?;
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the producer"))
    }

    /// Wait until every message published before this call is committed.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.state
            .flush(timeout, &self.masked, "still writing")
            .await
    }

    pub fn close(&self) {
        self.state.close();
    }
}

/// A message ready for its row.
pub(super) struct Row {
    queue: String,
    priority: i64,
    payload: Vec<u8>,
}

pub(super) fn publish_loop(
    mut conn: Connection,
    path: PathBuf,
    rx: std_mpsc::Receiver<OutgoingMessage>,
    state: Arc<Outbox>,
) {
    let mut notifier = WakeNotifier::new(KIND_CONSUMER);
    let mut rows = Vec::with_capacity(256);
    while let Ok(first) = rx.recv() {
        let mut count = 1u64;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            // Headers and body come from our own encoder: this cannot fail in practice,
            // and a message we cannot frame is better dropped than wedged.
            if let Ok(payload) = envelope::encode(&message, "") {
                rows.push(Row {
                    queue: message.routing_key,
                    priority: i64::from(message.properties.priority.unwrap_or(0)),
                    payload,
                });
            }
            if rows.len() < MAX_PUBLISH_BATCH {
                next = rx.try_recv().ok();
                count += u64::from(next.is_some());
            }
        }
        let mut attempt = 0;
        loop {
            match insert_rows(&mut conn, &rows) {
                Ok(()) => break,
                Err(err) => {
                    state.note_error(db_error(&path, &err).to_string());
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
            }
        }
        rows.clear();
        state.written(count);
        notify_local(&path, Topic::Messages);
        notifier.notify(&conn);
    }
}

pub(super) fn insert_rows(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (queue, priority, published_at, payload) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let now = unix_now();
        for row in rows {
            insert.execute(params![
                row.queue,
                row.priority,
                now,
                JsonBytes(&row.payload)
            ])?;
        }
    }
    tx.commit()
}

impl crate::broker::traits::Producer for SqliteProducer {
    fn publish(&self, message: OutgoingMessage) -> Result<()> {
        SqliteProducer::publish(self, message)
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        SqliteProducer::flush(self, timeout).await
    }

    fn close(&self) {
        SqliteProducer::close(self)
    }
}
