//! The consumer: acks, requeues and claims in one transaction, within the prefetch window.

use super::*;

pub(super) enum Command {
    Ack(Vec<String>),
    Requeue(String),
    /// Grow (or shrink) the window by this many slots (messages held for an ETA).
    ExtendWindow(i64),
    RestoreAll(oneshot::Sender<Result<usize>>),
    /// Claim from one more queue; false: claimed from already.
    AddQueue(String, oneshot::Sender<bool>),
    /// Stop claiming from a queue; false: it was not claimed from.
    CancelQueue(String, oneshot::Sender<bool>),
    /// Closed: claim nothing more and end the fetches (acks are still written).
    Close,
}

/// Takes messages from queues within a prefetch window; acks them in batches.
pub struct SqliteConsumer {
    commands: std_mpsc::Sender<Command>,
    signal: Arc<Signal>,
    closed: Arc<AtomicBool>,
    masked: String,
    _listener: Option<WakeListener>,
    _checkpointer: Option<Arc<Checkpointer>>,
}

pub(super) const MAX_FETCH_BATCH: usize = 512;
/// Longest an ack waits to be written with the next claim.
pub(super) const ACK_DELAY: Duration = Duration::from_millis(2);

impl SqliteConsumer {
    /// Open and start claiming into `deliveries`. `prefetch_count` 0 = unbounded.
    pub async fn connect(
        url: &BrokerUrl,
        queues: &[String],
        prefetch_count: usize,
        options: SqliteOptions,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) -> Result<Self> {
        if queues.is_empty() {
            return Err(Error::Connection("no queue to consume from".into()));
        }
        if let Some(bad) = queues.iter().find(|queue| queue.contains('\0')) {
            return Err(Error::Config(format!(
                "queue name {bad:?} holds a NUL character"
            )));
        }
        let path = sqlite_path(url)?;
        let (conn, checkpointer) = open_async(path.clone(), options.busy_timeout).await?;
        let signal = Arc::new(Signal::default());
        let listener = WakeListener::start(signal.clone());
        let owner = new_peer_id(KIND_CONSUMER);
        let port = listener.as_ref().map(WakeListener::port);
        let conn = {
            let (owner, path) = (owner.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                heartbeat(&conn, &owner, KIND_CONSUMER, port)
                    .map(|()| conn)
                    .map_err(|e| db_error(&path, &e))
            })
            .await
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))??
        };
        subscribe_local(&path, Topic::Messages, &signal);
        let mut unique: Vec<String> = Vec::new();
        for queue in queues {
            if !unique.contains(queue) {
                unique.push(queue.clone());
            }
        }
        let closed = Arc::new(AtomicBool::new(false));
        let (commands, rx) = std_mpsc::channel();
        let fetcher = Fetcher {
            claim_sql: claim_sql(&unique),
            probe_sql: probe_sql(&unique),
            queues: unique,
            conn,
            path,
            owner,
            port,
            prefetch: prefetch_count,
            window_extra: 0,
            options,
            in_flight: HashSet::new(),
            pending_acks: Vec::new(),
            acks_since: None,
            pending_requeues: Vec::new(),
            deliveries: Some(deliveries),
            signal: signal.clone(),
            closed: closed.clone(),
            drained: false,
            data_version: None,
            failures: 0,
            notifier: WakeNotifier::new(KIND_CONSUMER),
            masked: url.masked().to_owned(),
        };
        std::thread::Builder::new()
            .name("celeriac-sqlite-consume".into())
            .spawn(move || fetcher.run(rx))
            .map_err(|err| Error::Connection(format!("cannot start a thread: {err}")))?;
        Ok(Self {
            commands,
            signal,
            closed,
            masked: url.masked().to_owned(),
            _listener: listener,
            _checkpointer: checkpointer,
        })
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::Closed("the consumer"))?;
        self.signal.notify();
        Ok(())
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        self.send(Command::Ack(tags))
    }

    /// Grow (`delta > 0`) or shrink the prefetch window, one slot per message the
    /// worker holds for its ETA or rate limit.
    pub fn extend_window(&self, delta: i64) -> Result<()> {
        self.send(Command::ExtendWindow(delta))
    }

    /// `requeue=false` drops the message (kombu: same as ack); `true` puts it back,
    /// marked redelivered, in its place in the queue.
    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        if requeue {
            self.send(Command::Requeue(tag))
        } else {
            self.send(Command::Ack(vec![tag]))
        }
    }

    /// Stop claiming and put every claimed, unacked message back, marked redelivered.
    pub async fn restore_unacked(&self) -> Result<usize> {
        self.closed.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        self.send(Command::RestoreAll(tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))?
    }

    /// Claim from `queue` too; false when it is claimed from already.
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        if queue.contains('\0') {
            return Err(Error::Config(format!(
                "queue name {queue:?} holds a NUL character"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.send(Command::AddQueue(queue.to_owned(), tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop claiming from `queue`; false when it was not claimed from. Messages
    /// already claimed from it are still handed over and acked.
    pub async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::CancelQueue(queue.to_owned(), tx))?;
        rx.await.map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop claiming and end the fetches (what was handed over is still read, then
    /// the channel closes); acks are still written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Fails only when the fetch thread has ended: the channel is closed already.
        let _ = self.send(Command::Close);
    }

    pub fn masked_url(&self) -> &str {
        &self.masked
    }
}

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        self.close();
    }
}

/// A queue name as an SQL string literal.
pub(super) fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `UPDATE ... RETURNING` claiming up to ?3 ready messages of `queues` for owner ?2 at
/// time ?1, lowest priority number first, then oldest.
///
/// Written so that SQLite never prepares it again (with the statement cache, a
/// re-prepare took a third of a claim): the queue names are literals (a `queue = ?`
/// parameter compared with the partial index makes every new binding expire the
/// statement), and the limit is `?3 + 0` (SQLite reads a bare `LIMIT ?` while
/// preparing and prepares again whenever its value changes).
pub(super) fn claim_sql(queues: &[String]) -> String {
    let pick = |queue: &str| {
        format!(
            "SELECT id, priority FROM messages WHERE queue = {} AND claimed_at IS NULL \
             ORDER BY priority, id LIMIT ?3 + 0",
            sql_literal(queue)
        )
    };
    let candidates = if let [queue] = queues {
        format!(
            "SELECT id FROM messages WHERE queue = {} AND claimed_at IS NULL \
             ORDER BY priority, id LIMIT ?3 + 0",
            sql_literal(queue)
        )
    } else {
        let union: Vec<String> = queues
            .iter()
            .map(|queue| format!("SELECT id, priority FROM ({})", pick(queue)))
            .collect();
        format!(
            "SELECT id FROM ({}) ORDER BY priority, id LIMIT ?3 + 0",
            union.join(" UNION ALL ")
        )
    };
    format!(
        "UPDATE messages SET claimed_at = ?1, owner = ?2 WHERE id IN ({candidates}) \
         RETURNING id, queue, priority, redelivered, payload"
    )
}

/// Whether any of `queues` has a ready message (a read, no write lock).
pub(super) fn probe_sql(queues: &[String]) -> String {
    let parts: Vec<String> = queues
        .iter()
        .map(|queue| {
            format!(
                "EXISTS (SELECT 1 FROM messages WHERE queue = {} AND claimed_at IS NULL)",
                sql_literal(queue)
            )
        })
        .collect();
    format!("SELECT {}", parts.join(" OR "))
}

pub(super) struct Claimed {
    id: i64,
    queue: String,
    priority: i64,
    redelivered: bool,
    /// The envelope's bytes, or why the column holds none.
    payload: std::result::Result<Vec<u8>, String>,
}

pub(super) struct Fetcher {
    conn: Connection,
    path: PathBuf,
    masked: String,
    claim_sql: String,
    probe_sql: String,
    /// The queues claimed from (`claim_sql` and `probe_sql` are built from them).
    queues: Vec<String>,
    owner: String,
    port: Option<u16>,
    prefetch: usize,
    /// Slots added to `prefetch` for messages the worker holds (ETA, rate limits).
    window_extra: i64,
    options: SqliteOptions,
    /// Claimed by us, not yet acked (the prefetch window).
    in_flight: HashSet<i64>,
    /// Acks and requeues not yet written (kept across a failed transaction).
    pending_acks: Vec<i64>,
    /// When the oldest unwritten ack came (acks wait for the next claim, at most
    /// [`ACK_DELAY`]).
    acks_since: Option<Instant>,
    pending_requeues: Vec<i64>,
    /// Dropped when the consumer is closed, so that a fetch then raises `Closed` (after
    /// the messages already handed over) instead of waiting.
    deliveries: Option<mpsc::UnboundedSender<Fetched>>,
    signal: Arc<Signal>,
    closed: Arc<AtomicBool>,
    /// The last claim found fewer messages than it wanted.
    drained: bool,
    /// `PRAGMA data_version` when the queues were last found drained.
    data_version: Option<i64>,
    failures: u32,
    notifier: WakeNotifier,
}

impl Fetcher {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        let mut idle = MIN_IDLE;
        let maintenance_every = self.options.restore_interval;
        let mut next_maintenance = Instant::now();
        let mut next_sweep = Instant::now();
        let mut retry_at: Option<Instant> = None;
        loop {
            let seen = self.signal.generation();
            let mut restores = Vec::new();
            let mut disconnected = false;
            loop {
                match rx.try_recv() {
                    Ok(Command::Ack(tags)) => {
                        if self.pending_acks.is_empty() {
                            self.acks_since = Some(Instant::now());
                        }
                        self.pending_acks.extend(parse_tags(&tags));
                    }
                    Ok(Command::Requeue(tag)) => self.pending_requeues.extend(parse_tags(&[tag])),
                    Ok(Command::ExtendWindow(delta)) => {
                        self.window_extra = self.window_extra.saturating_add(delta);
                    }
                    Ok(Command::RestoreAll(reply)) => restores.push(reply),
                    Ok(Command::Close) => self.deliveries = None,
                    Ok(Command::AddQueue(queue, reply)) => {
                        let added = !self.queues.contains(&queue);
                        if added {
                            self.queues.push(queue);
                            self.queues_changed();
                        }
                        let _ = reply.send(added);
                    }
                    Ok(Command::CancelQueue(queue, reply)) => {
                        let before = self.queues.len();
                        self.queues.retain(|q| *q != queue);
                        let removed = self.queues.len() != before;
                        if removed {
                            self.queues_changed();
                        }
                        let _ = reply.send(removed);
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !restores.is_empty() {
                self.closed.store(true, Ordering::Release);
            }
            let now = Instant::now();
            let may_write = retry_at.is_none_or(|at| now >= at);
            let mut worked = false;
            if may_write {
                let credits = self.credits(disconnected);
                let claim = credits > 0
                    && !self.queues.is_empty()
                    && credits >= self.refill_at()
                    && self.may_have_work();
                let stopping = disconnected || self.closed.load(Ordering::Acquire);
                let acks_due = !self.pending_acks.is_empty()
                    && (claim
                        || stopping
                        || self.acks_since.is_some_and(|at| at.elapsed() >= ACK_DELAY));
                if claim || acks_due || !self.pending_requeues.is_empty() {
                    match self.transact(if claim { credits } else { 0 }) {
                        Ok((claimed, drained_at)) => {
                            retry_at = None;
                            self.acks_since = None;
                            self.failures = 0;
                            worked = !claimed.is_empty();
                            if let Some(version) = drained_at {
                                self.drained = true;
                                self.data_version = Some(version);
                            }
                            self.deliver(claimed);
                        }
                        Err(err) => {
                            self.report(&err);
                            retry_at = Some(Instant::now() + backoff(self.failures));
                            self.failures += 1;
                        }
                    }
                }
            }
            for reply in restores {
                let _ = reply.send(self.restore_all());
            }
            if Instant::now() >= next_maintenance {
                // Errors here are retried next round; claims report lost databases.
                let _ = self.maintain();
                next_maintenance = Instant::now() + maintenance_every;
            }
            if Instant::now() >= next_sweep {
                if let Ok(restored) = restore_claims_of_dead_processes(&self.conn) {
                    if restored > 0 {
                        self.drained = false;
                        self.wake_others();
                    }
                }
                next_sweep = Instant::now() + DEAD_PROCESS_SWEEP;
            }
            if disconnected {
                self.finish();
                return;
            }
            if worked {
                idle = MIN_IDLE;
                continue;
            }
            let mut pause = idle
                .min(next_maintenance.saturating_duration_since(Instant::now()))
                .min(next_sweep.saturating_duration_since(Instant::now()));
            if let Some(since) = self.acks_since {
                pause = pause.min((since + ACK_DELAY).saturating_duration_since(Instant::now()));
            }
            if let Some(at) = retry_at {
                pause = pause.max(at.saturating_duration_since(Instant::now()));
            }
            if self.signal.wait(seen, pause) {
                idle = MIN_IDLE;
            } else {
                idle = (idle * 2).min(self.options.polling_interval);
            }
        }
    }

    /// Rebuild the statements after `queues` changed (none are built for no queue:
    /// nothing is claimed then).
    fn queues_changed(&mut self) {
        if !self.queues.is_empty() {
            self.claim_sql = claim_sql(&self.queues);
            self.probe_sql = probe_sql(&self.queues);
        }
        self.drained = false;
    }

    /// How many messages we may claim now: acked (and requeued) messages leave the
    /// window at once, even before their ack is written (it is written with the claim).
    fn credits(&self, disconnected: bool) -> usize {
        if disconnected || self.closed.load(Ordering::Acquire) {
            return 0;
        }
        if self.prefetch == 0 {
            return MAX_FETCH_BATCH;
        }
        self.window()
            .saturating_sub(self.held())
            .min(MAX_FETCH_BATCH)
    }

    fn window(&self) -> usize {
        usize::try_from((self.prefetch as i64).saturating_add(self.window_extra)).unwrap_or(0)
    }

    /// Claimed messages not yet acked or requeued by the worker.
    fn held(&self) -> usize {
        self.in_flight
            .len()
            .saturating_sub(self.pending_acks.len() + self.pending_requeues.len())
    }

    /// The fewest credits worth a claim: half the prefetch window while the worker still
    /// holds messages (a claim per two tasks rather than per task: half the transactions),
    /// one when it holds none. Half of the window as given, not as widened: each message
    /// held for its ETA widens it by the slot it takes, so half the widened window might
    /// never come free while those messages wait.
    fn refill_at(&self) -> usize {
        if self.prefetch == 0 || self.held() == 0 {
            return 1;
        }
        self.prefetch.div_ceil(2).max(1)
    }

    /// False only when the queues were drained and nothing ready appeared since.
    fn may_have_work(&mut self) -> bool {
        if !self.drained {
            return true;
        }
        let Ok(version) = self.data_version() else {
            return true;
        };
        if self.data_version == Some(version) {
            return false;
        }
        self.data_version = Some(version);
        match self.probe() {
            Ok(true) | Err(_) => {
                self.drained = false;
                true
            }
            Ok(false) => false,
        }
    }

    fn data_version(&self) -> rusqlite::Result<i64> {
        self.conn
            .pragma_query_value(None, "data_version", |row| row.get(0))
    }

    fn probe(&self) -> rusqlite::Result<bool> {
        self.conn
            .prepare_cached(&self.probe_sql)?
            .query_row([], |row| row.get(0))
    }

    /// One transaction: write pending acks and requeues, then claim `credits`. When
    /// fewer were there, also returns `PRAGMA data_version` as of the claim (read under
    /// the write lock, so any later publish changes it).
    fn transact(&mut self, credits: usize) -> rusqlite::Result<(Vec<Claimed>, Option<i64>)> {
        let now = unix_now();
        let (acks, requeues, owner) = (&self.pending_acks, &self.pending_requeues, &self.owner);
        let claim_sql = &self.claim_sql;
        let (mut claimed, drained_at) = immediate(&self.conn, |tx| {
            if !acks.is_empty() {
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id = ?1 AND owner = ?2")?;
                for id in acks {
                    delete.execute(params![id, owner])?;
                }
            }
            if !requeues.is_empty() {
                let mut requeue = tx.prepare_cached(
                    "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1 \
                     WHERE id = ?1 AND owner = ?2",
                )?;
                for id in requeues {
                    requeue.execute(params![id, owner])?;
                }
            }
            let mut claimed = Vec::new();
            if credits > 0 {
                let mut claim = tx.prepare_cached(claim_sql)?;
                let rows = claim.query_map(params![now, owner, credits as i64], |row| {
                    Ok(Claimed {
                        id: row.get(0)?,
                        queue: row.get(1)?,
                        // Another program may have written any type in any column
                        // (the table is not STRICT): such a row must not stop the claims.
                        priority: lenient_int(row, 2)?,
                        redelivered: lenient_int(row, 3)? != 0,
                        payload: column_bytes(row, 4).map_err(|err| err.to_string()),
                    })
                })?;
                for row in rows {
                    claimed.push(row?);
                }
            }
            let drained_at = if credits > 0 && claimed.len() < credits {
                Some(tx.pragma_query_value(None, "data_version", |row| row.get(0))?)
            } else {
                None
            };
            Ok((claimed, drained_at))
        })?;
        let requeued = !self.pending_requeues.is_empty();
        for id in self.pending_acks.drain(..) {
            self.in_flight.remove(&id);
        }
        for id in self.pending_requeues.drain(..) {
            self.in_flight.remove(&id);
        }
        if requeued {
            self.drained = false;
            self.wake_others();
        }
        claimed.sort_unstable_by_key(|c| (c.priority, c.id));
        Ok((claimed, drained_at))
    }

    fn deliver(&mut self, claimed: Vec<Claimed>) {
        for row in claimed {
            self.in_flight.insert(row.id);
            // The receiver goes away with the consumer; what is claimed then stays
            // claimed until restored.
            if let Some(deliveries) = &self.deliveries {
                let _ = deliveries.send(into_fetched(row));
            }
        }
    }

    fn report(&self, err: &rusqlite::Error) {
        if self.failures == 0 {
            let text = format!("{}: {}", self.masked, describe(&self.path, err));
            if let Some(deliveries) = &self.deliveries {
                let _ = deliveries.send(Fetched::Error(text));
            }
        }
    }

    fn wake_others(&mut self) {
        notify_local(&self.path, Topic::Messages);
        self.notifier.notify(&self.conn);
    }

    /// Put back every message we claimed and did not ack.
    fn restore_all(&mut self) -> Result<usize> {
        // Acked ones whose ack is not written yet are not put back.
        let ids: Vec<i64> = self
            .in_flight
            .iter()
            .copied()
            .filter(|id| !self.pending_acks.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut attempt = 0;
        let restored = loop {
            match self.put_back(&ids) {
                Ok(count) => break count,
                Err(err) if attempt < 3 => {
                    attempt += 1;
                    std::thread::sleep(backoff(attempt));
                    let _ = err;
                }
                Err(err) => return Err(db_error(&self.path, &err)),
            }
        };
        self.in_flight.clear();
        self.wake_others();
        Ok(restored)
    }

    fn put_back(&mut self, ids: &[i64]) -> rusqlite::Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut restored = 0;
        {
            let mut requeue = tx.prepare_cached(
                "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1 \
                 WHERE id = ?1 AND owner = ?2",
            )?;
            for id in ids {
                restored += requeue.execute(params![id, self.owner])?;
            }
        }
        tx.commit()?;
        Ok(restored)
    }

    /// Heartbeat, and put back the claims of consumers that stopped heartbeating.
    fn maintain(&mut self) -> rusqlite::Result<usize> {
        heartbeat(&self.conn, &self.owner, KIND_CONSUMER, self.port)?;
        let restored = restore_dead_claims(&self.conn, self.options.visibility_timeout)?;
        if restored > 0 {
            self.drained = false;
            self.wake_others();
        }
        Ok(restored)
    }

    /// The consumer was dropped: write the last acks and leave the peer list (what is
    /// still claimed comes back after the visibility timeout).
    fn finish(&mut self) {
        for attempt in 0..3 {
            if self.pending_acks.is_empty() && self.pending_requeues.is_empty() {
                break;
            }
            if self.transact(0).is_ok() {
                break;
            }
            std::thread::sleep(backoff(attempt));
        }
        let _ = self
            .conn
            .execute("DELETE FROM peers WHERE id = ?1", params![self.owner]);
    }
}

/// `BEGIN IMMEDIATE`, `body`, `COMMIT`, with cached statements (rusqlite's
/// `Transaction` parses both anew each time: a few percent of a busy consumer); rolled
/// back when anything fails.
pub(super) fn immediate<T>(
    conn: &Connection,
    body: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let outcome = body(conn).and_then(|value| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(value)
    });
    if outcome.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    outcome
}

/// Put back, marked redelivered, every message claimed more than `visibility_timeout`
/// ago by a consumer that has not heartbeated for as long. Returns how many.
pub fn restore_dead_claims(
    conn: &Connection,
    visibility_timeout: Duration,
) -> rusqlite::Result<usize> {
    let now = unix_now();
    let cutoff = now - visibility_timeout.as_secs_f64();
    let restored = conn
        .prepare_cached(
            "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1
             WHERE claimed_at IS NOT NULL AND claimed_at < ?1
               AND NOT EXISTS (SELECT 1 FROM peers WHERE peers.id = messages.owner
                                                   AND peers.heartbeat >= ?1)",
        )?
        .execute(params![cutoff])?;
    // Peers silent for long are gone for good.
    let forget = now - (2.0 * visibility_timeout.as_secs_f64()).max(3600.0);
    conn.prepare_cached("DELETE FROM peers WHERE heartbeat < ?1")?
        .execute(params![forget])?;
    Ok(restored)
}

/// How often a consumer looks for consumers whose process is gone.
pub(super) const DEAD_PROCESS_SWEEP: Duration = Duration::from_secs(2);

/// Put back, marked redelivered, the claims of consumers whose process is gone (killed
/// with SIGKILL, say), and forget those peers. The file is used on one machine, so a
/// peer's pid names a process here: its claims come back at once instead of after the
/// visibility timeout. A pid that was reused only delays this to the visibility timeout.
pub fn restore_claims_of_dead_processes(conn: &Connection) -> rusqlite::Result<usize> {
    let peers: Vec<(String, i64)> = conn
        .prepare_cached("SELECT id, pid FROM peers WHERE kind = ?1")?
        .query_map(params![KIND_CONSUMER], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut restored = 0;
    for (id, pid) in peers {
        if process_alive(pid) {
            continue;
        }
        restored += immediate(conn, |conn| {
            let count = conn
                .prepare_cached(
                    "UPDATE messages SET claimed_at = NULL, owner = NULL, redelivered = 1
                     WHERE owner = ?1",
                )?
                .execute(params![id])?;
            conn.prepare_cached("DELETE FROM peers WHERE id = ?1")?
                .execute(params![id])?;
            Ok(count)
        })?;
    }
    Ok(restored)
}

/// Whether `pid` names a live process on this machine (a pid that cannot be one is
/// taken as alive: only a certain death puts claims back early).
pub(super) fn process_alive(pid: i64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

pub(super) fn parse_tags(tags: &[String]) -> impl Iterator<Item = i64> + '_ {
    tags.iter().filter_map(|tag| tag.parse::<i64>().ok())
}

/// The transport-neutral form; the body is base64-decoded here, off the GIL.
pub(super) fn into_fetched(row: Claimed) -> Fetched {
    let tag = row.id.to_string();
    let envelope = row
        .payload
        .and_then(|payload| IncomingEnvelope::parse(&payload).map_err(|err| err.to_string()));
    Fetched::Message(match envelope {
        Ok(envelope) => {
            IncomingMessage::from_envelope(envelope, tag, row.queue, row.priority, row.redelivered)
        }
        Err(reason) => Err(BadMessage {
            delivery_tag: tag,
            queue: row.queue,
            reason,
        }),
    })
}

/// An INTEGER column that may hold another type: a float is truncated, anything else
/// is 0.
pub(super) fn lenient_int(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<i64> {
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(n) => n,
        ValueRef::Real(f) => f as i64,
        ValueRef::Null | ValueRef::Text(_) | ValueRef::Blob(_) => 0,
    })
}

impl crate::broker::traits::Consumer for SqliteConsumer {
    fn ack(&self, tags: Vec<String>) -> Result<()> {
        SqliteConsumer::ack(self, tags)
    }

    fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        SqliteConsumer::reject(self, tag, requeue)
    }

    fn extend_window(&self, delta: i64) -> Result<()> {
        SqliteConsumer::extend_window(self, delta)
    }

    async fn restore_unacked(&self) -> Result<usize> {
        SqliteConsumer::restore_unacked(self).await
    }

    async fn add_queue(&self, queue: &str) -> Result<bool> {
        SqliteConsumer::add_queue(self, queue).await
    }

    async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        SqliteConsumer::cancel_queue(self, queue).await
    }

    fn close(&self) {
        SqliteConsumer::close(self)
    }
}
