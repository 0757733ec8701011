//! Fanout: broadcasts that every subscriber sees (events, remote control).

use super::*;

/// Broadcast rows older than this are pruned: a subscriber further behind loses them
/// (events and remote control are best effort, as on Redis PUB/SUB).
pub const BROADCAST_RETENTION: Duration = Duration::from_secs(60);
/// How often a publishing fanout prunes old rows.
pub(super) const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often a subscribing fanout refreshes its `peers` row (its wake-up port).
pub(super) const SUBSCRIBER_HEARTBEAT: Duration = Duration::from_secs(10);
/// Rows read per query by a subscriber.
pub(super) const MAX_BROADCAST_READ: usize = 512;

/// One broadcast to write: the kombu envelope of the message (JSON), as on Redis.
#[derive(Debug, Clone)]
pub struct FanoutRow {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
}

/// One broadcast as read back by a subscriber.
#[derive(Debug, Clone)]
pub struct FanoutMessage {
    /// The row id: increases with every broadcast of the file.
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    /// The envelope, or why the row could not be read (a damaged row).
    pub payload: std::result::Result<Vec<u8>, String>,
}

pub(super) enum FanoutCommand {
    Publish(Vec<FanoutRow>, oneshot::Sender<Result<()>>),
    Subscribe {
        exchange: String,
        routing_key: Option<String>,
        deliveries: mpsc::UnboundedSender<FanoutMessage>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Unsubscribe(u64),
    Purge(String, oneshot::Sender<Result<u64>>),
}

/// Fanout exchanges on the embedded database: the `broadcast` table is a log that
/// publishers append to (one transaction per batch) and every subscriber reads from
/// its own cursor (the last row id it saw), so that each subscriber sees every
/// broadcast published after it subscribed. Rows are pruned after
/// [`BROADCAST_RETENTION`].
///
/// One thread per fanout owns its connection. A subscribing fanout waits as the
/// consumer does: `PRAGMA data_version` checks, 1 ms, 2 ms, ... up to
/// `polling_interval` apart, woken at once by publishers of this process and, across
/// processes, by a loopback UDP datagram (its port is in `peers`, kind `subscriber`).
///
/// For remote control: a worker subscribes to `celery.pidbox` (every routing key); a
/// client "binds its reply queue" by subscribing to `reply.celery.pidbox` with its
/// routing key, publishes the request, then takes replies from that subscription.
pub struct SqliteFanout {
    commands: std_mpsc::Sender<FanoutCommand>,
    signal: Arc<Signal>,
    masked: String,
    _checkpointer: Option<Arc<Checkpointer>>,
}

impl SqliteFanout {
    /// Open (failing fast with a clear error) and start the fanout's thread.
    pub async fn connect(url: &BrokerUrl, options: SqliteOptions) -> Result<Self> {
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let signal = Arc::new(Signal::default());
        let (commands, rx) = std_mpsc::channel();
        let worker = FanoutThread {
            conn,
            path,
            polling_interval: options.polling_interval,
            signal: signal.clone(),
            subscriptions: Vec::new(),
            next_id: 1,
            cursor: 0,
            data_version: None,
            peer_id: new_peer_id(KIND_SUBSCRIBER),
            listener: None,
            next_heartbeat: Instant::now(),
            next_prune: Instant::now(),
            notifier: WakeNotifier::new(KIND_SUBSCRIBER),
            warned: false,
            local_subscribed: false,
        };
        std::thread::Builder::new()
            .name("celeriac-sqlite-fanout".into())
            .spawn(move || worker.run(rx))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            commands,
            signal,
            masked: url.masked().to_owned(),
            _checkpointer: checkpointer,
        })
    }

    fn send(&self, command: FanoutCommand) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::Closed("the SQLite fanout"))?;
        self.signal.notify();
        Ok(())
    }

    /// Append `rows` in one transaction and wake the subscribers; returns once
    /// committed.
    pub async fn publish(&self, rows: Vec<FanoutRow>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Publish(rows, reply))?;
        done.await.map_err(|_| Error::Closed("the SQLite fanout"))?
    }

    /// Receive, from now on, every broadcast to `exchange` (only those with
    /// `routing_key` when given: the key itself, or an AMQP topic pattern when it has
    /// `*` or `#`).
    pub async fn subscribe(
        &self,
        exchange: &str,
        routing_key: Option<&str>,
    ) -> Result<FanoutSubscription> {
        let (deliveries, rx) = mpsc::unbounded_channel();
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Subscribe {
            exchange: exchange.to_owned(),
            routing_key: routing_key.map(str::to_owned),
            deliveries,
            reply,
        })?;
        let id = done
            .await
            .map_err(|_| Error::Closed("the SQLite fanout"))??;
        Ok(FanoutSubscription {
            id,
            rx,
            commands: self.commands.clone(),
            signal: self.signal.clone(),
        })
    }

    /// Delete the ready (unclaimed) messages of the task queue `queue` (what `celery
    /// purge` does); how many. Claimed ones stay with their consumer.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        let (reply, done) = oneshot::channel();
        self.send(FanoutCommand::Purge(queue.to_owned(), reply))?;
        done.await.map_err(|_| Error::Closed("the SQLite fanout"))?
    }

    pub fn masked_url(&self) -> &str {
        &self.masked
    }
}

/// What a subscriber receives; dropping it unsubscribes.
pub struct FanoutSubscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<FanoutMessage>,
    commands: std_mpsc::Sender<FanoutCommand>,
    signal: Arc<Signal>,
}

impl FanoutSubscription {
    /// The next broadcast, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<FanoutMessage>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(message)) => Ok(Some(message)),
            Ok(None) => Err(Error::Closed("the SQLite fanout")),
            Err(_) => Ok(None),
        }
    }

    /// The next broadcast already read, if any (never waits).
    pub fn try_recv(&mut self) -> Result<Option<FanoutMessage>> {
        match self.rx.try_recv() {
            Ok(message) => Ok(Some(message)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(Error::Closed("the SQLite fanout")),
        }
    }
}

impl Drop for FanoutSubscription {
    fn drop(&mut self) {
        if self
            .commands
            .send(FanoutCommand::Unsubscribe(self.id))
            .is_ok()
        {
            self.signal.notify();
        }
    }
}

pub(super) struct FanoutSub {
    id: u64,
    exchange: String,
    routing_key: Option<String>,
    /// Rows up to this id were published before the subscription.
    after: i64,
    deliveries: mpsc::UnboundedSender<FanoutMessage>,
}

impl FanoutSub {
    fn wants(&self, row: &FanoutMessage) -> bool {
        row.id > self.after
            && row.exchange == self.exchange
            && self.routing_key.as_ref().is_none_or(|key| {
                *key == row.routing_key
                    || (key.contains(['*', '#']) && topic_matches(key, &row.routing_key))
            })
    }
}

pub(super) struct FanoutThread {
    conn: Connection,
    path: PathBuf,
    polling_interval: Duration,
    signal: Arc<Signal>,
    subscriptions: Vec<FanoutSub>,
    next_id: u64,
    /// The last row read (every subscription is at or past it).
    cursor: i64,
    /// `PRAGMA data_version` when the log was last read to its end (`None`: read now).
    data_version: Option<i64>,
    peer_id: String,
    listener: Option<WakeListener>,
    next_heartbeat: Instant,
    next_prune: Instant,
    notifier: WakeNotifier,
    /// A read error was reported (once, until a read succeeds).
    warned: bool,
    /// Publishers of this process wake us.
    local_subscribed: bool,
}

impl FanoutThread {
    fn run(mut self, rx: std_mpsc::Receiver<FanoutCommand>) {
        let mut idle = MIN_IDLE;
        let mut first: Option<FanoutCommand> = None;
        loop {
            let seen = self.signal.generation();
            let mut publishes = Vec::new();
            let mut disconnected = false;
            if let Some(command) = first.take() {
                self.handle(command, &mut publishes);
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => self.handle(command, &mut publishes),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            let mut worked = false;
            if !publishes.is_empty() {
                self.publish(publishes);
                worked = true;
            }
            if !self.subscriptions.is_empty() {
                worked |= self.read();
                if Instant::now() >= self.next_heartbeat {
                    let _ = heartbeat(&self.conn, &self.peer_id, KIND_SUBSCRIBER, self.port());
                    self.next_heartbeat = Instant::now() + SUBSCRIBER_HEARTBEAT;
                }
            }
            if disconnected {
                self.leave();
                return;
            }
            if worked {
                idle = MIN_IDLE;
                continue;
            }
            if self.subscriptions.is_empty() {
                // A publisher only: sleep until the next command (or the last handle
                // going away).
                match rx.recv() {
                    Ok(command) => first = Some(command),
                    Err(_) => {
                        self.leave();
                        return;
                    }
                }
                continue;
            }
            // Nothing new: sleep until a wake-up (a publish, a command) or the next
            // check.
            if self.signal.wait(seen, idle) {
                idle = MIN_IDLE;
            } else {
                idle = (idle * 2).min(self.polling_interval);
            }
        }
    }

    fn handle(
        &mut self,
        command: FanoutCommand,
        publishes: &mut Vec<(Vec<FanoutRow>, oneshot::Sender<Result<()>>)>,
    ) {
        match command {
            FanoutCommand::Publish(rows, reply) => publishes.push((rows, reply)),
            FanoutCommand::Subscribe {
                exchange,
                routing_key,
                deliveries,
                reply,
            } => {
                let outcome = self.subscribe(exchange, routing_key, deliveries);
                let _ = reply.send(outcome);
            }
            FanoutCommand::Unsubscribe(id) => self.unsubscribe(id),
            FanoutCommand::Purge(queue, reply) => {
                let outcome = self
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE queue = ?1 AND claimed_at IS NULL")
                    .and_then(|mut delete| delete.execute(params![queue]))
                    .map(|count| count as u64)
                    .map_err(|e| db_error(&self.path, &e));
                let _ = reply.send(outcome);
            }
        }
    }

    fn port(&self) -> Option<u16> {
        self.listener.as_ref().map(WakeListener::port)
    }

    fn subscribe(
        &mut self,
        exchange: String,
        routing_key: Option<String>,
        deliveries: mpsc::UnboundedSender<FanoutMessage>,
    ) -> Result<u64> {
        let last: i64 = self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM broadcast", [], |row| {
                row.get(0)
            })
            .map_err(|e| db_error(&self.path, &e))?;
        if self.subscriptions.is_empty() {
            self.cursor = last;
            self.data_version = None;
            if self.listener.is_none() {
                self.listener = WakeListener::start(self.signal.clone());
            }
            if !self.local_subscribed {
                subscribe_local(&self.path, Topic::Broadcast, &self.signal);
                self.local_subscribed = true;
            }
            heartbeat(&self.conn, &self.peer_id, KIND_SUBSCRIBER, self.port())
                .map_err(|e| db_error(&self.path, &e))?;
            self.next_heartbeat = Instant::now() + SUBSCRIBER_HEARTBEAT;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.subscriptions.push(FanoutSub {
            id,
            exchange,
            routing_key,
            after: last,
            deliveries,
        });
        Ok(id)
    }

    fn unsubscribe(&mut self, id: u64) {
        self.subscriptions.retain(|sub| sub.id != id);
        if self.subscriptions.is_empty() {
            self.leave();
        }
    }

    /// No longer a subscriber: stop the wake-ups.
    fn leave(&mut self) {
        self.listener = None;
        let _ = self
            .conn
            .execute("DELETE FROM peers WHERE id = ?1", params![self.peer_id]);
    }

    fn publish(&mut self, publishes: Vec<(Vec<FanoutRow>, oneshot::Sender<Result<()>>)>) {
        let rows: Vec<&FanoutRow> = publishes.iter().flat_map(|(rows, _)| rows).collect();
        let mut attempt = 0;
        let outcome = loop {
            match self.insert(&rows) {
                Ok(()) => break Ok(()),
                Err(err) if attempt < 2 => {
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                    let _ = err;
                }
                Err(err) => break Err(db_error(&self.path, &err)),
            }
        };
        let ok = outcome.is_ok();
        for (_, reply) in publishes {
            let _ = reply.send(match &outcome {
                Ok(()) => Ok(()),
                Err(err) => Err(Error::Connection(err.to_string())),
            });
        }
        if ok {
            // Our own commits do not change our data_version: read them too.
            self.data_version = None;
            notify_local(&self.path, Topic::Broadcast);
            self.notifier.notify(&self.conn);
        }
    }

    fn insert(&mut self, rows: &[&FanoutRow]) -> rusqlite::Result<()> {
        let now = unix_now();
        let prune = Instant::now() >= self.next_prune;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO broadcast (exchange, routing_key, created, payload) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for row in rows {
                insert.execute(params![
                    row.exchange,
                    row.routing_key,
                    now,
                    JsonBytes(&row.payload)
                ])?;
            }
            if prune {
                tx.prepare_cached("DELETE FROM broadcast WHERE created < ?1")?
                    .execute(params![now - BROADCAST_RETENTION.as_secs_f64()])?;
            }
        }
        tx.commit()?;
        if prune {
            self.next_prune = Instant::now() + PRUNE_EVERY;
        }
        Ok(())
    }

    /// Read what was broadcast since the cursor and hand it to the subscriptions
    /// that want it. True when something was read.
    fn read(&mut self) -> bool {
        let version: Option<i64> = self
            .conn
            .pragma_query_value(None, "data_version", |row| row.get(0))
            .ok();
        if version.is_some() && version == self.data_version {
            return false;
        }
        let mut read_any = false;
        loop {
            match self.read_batch() {
                Ok(rows) => {
                    self.warned = false;
                    let full = rows.len() >= MAX_BROADCAST_READ;
                    read_any |= !rows.is_empty();
                    for row in rows {
                        self.cursor = self.cursor.max(row.id);
                        for sub in &self.subscriptions {
                            if sub.wants(&row) {
                                // A dropped receiver unsubscribes; nothing to do here.
                                let _ = sub.deliveries.send(row.clone());
                            }
                        }
                    }
                    if !full {
                        self.data_version = version;
                        return read_any;
                    }
                }
                Err(err) => {
                    if !self.warned {
                        self.warned = true;
                        let text = format!("{}", db_error(&self.path, &err));
                        for sub in &self.subscriptions {
                            let _ = sub.deliveries.send(FanoutMessage {
                                id: self.cursor,
                                exchange: sub.exchange.clone(),
                                routing_key: String::new(),
                                payload: Err(text.clone()),
                            });
                        }
                    }
                    return read_any;
                }
            }
        }
    }

    fn read_batch(&self) -> rusqlite::Result<Vec<FanoutMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, exchange, routing_key, payload FROM broadcast WHERE id > ?1 \
             ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![self.cursor, MAX_BROADCAST_READ as i64], |row| {
            let text = |index: usize| -> rusqlite::Result<String> {
                Ok(match row.get_ref(index)? {
                    ValueRef::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                })
            };
            Ok(FanoutMessage {
                id: row.get(0)?,
                exchange: text(1)?,
                routing_key: text(2)?,
                payload: column_bytes(row, 3).map_err(|err| {
                    format!("broadcast row {}: {err}", row.get::<_, i64>(0).unwrap_or(0))
                }),
            })
        })?;
        rows.collect()
    }
}
