//! The producer: publishes without waiting, in confirm mode, through an outbox.

use super::*;

/// A message handed to the producer.
#[allow(clippy::large_enum_variant)]
pub enum Publish {
    Task(OutgoingMessage),
    Raw(RawPublish),
}

impl Publish {
    fn body(&self) -> &[u8] {
        match self {
            Publish::Task(task) => &task.body,
            Publish::Raw(raw) => &raw.body,
        }
    }

    fn prepare(&self) -> Result<Prepared> {
        match self {
            Publish::Task(task) => prepare_task(task),
            Publish::Raw(raw) => prepare_raw(raw),
        }
    }
}

// A task message is much larger than a close request; boxing it would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub(super) enum ProducerCommand {
    Publish(Publish),
    /// Already written by `publish` itself (the fast path): the message, the link
    /// generation it was written on, and its confirm to wait for.
    Written(Arc<Publish>, u64, ConfirmFuture),
    Close(oneshot::Sender<()>),
}

/// What `publish` needs to write a message itself, without a hop to the I/O task,
/// when nothing else is pending: the I/O task keeps it up to date.
#[derive(Default)]
pub(super) struct FastPath {
    /// The current link's generation and channel (None while down or re-sending).
    link: Option<(u64, Channel)>,
    /// Targets declared on that link (whose exchange exists).
    declared: HashSet<(String, String)>,
}

#[derive(Default)]
pub(super) struct Failures {
    nacked: u64,
    returned: u64,
    unencodable: u64,
    last: Option<String>,
    /// A queue exists with other arguments than ours: why (RabbitMQ's words).
    conflict: Option<String>,
}

pub(super) struct ProducerState {
    /// Messages accepted by `publish`.
    queued: AtomicU64,
    /// Every message received before this index is settled (confirmed, nacked,
    /// returned or refused).
    settled: AtomicU64,
    progress: Notify,
    closed: AtomicBool,
    /// Since when the connection is down (None while it is up).
    down_since: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    /// Failures since the last `flush` (reported by it) and in total.
    failures: Mutex<Failures>,
    total_nacked: AtomicU64,
    total_returned: AtomicU64,
    reconnects: AtomicU64,
    warnings: Mutex<Vec<String>>,
    /// Also orders the publishes: a message's index is taken under this lock.
    fast: Mutex<FastPath>,
}

/// Counters of a producer's life, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    pub queued: u64,
    pub settled: u64,
    pub nacked: u64,
    pub returned: u64,
    pub reconnects: u64,
}

/// Publishes messages with publisher confirms; cheap to call from any thread.
pub struct AmqpProducer {
    tx: mpsc::UnboundedSender<ProducerCommand>,
    state: Arc<ProducerState>,
    masked: String,
    options: AmqpOptions,
}

impl AmqpProducer {
    /// Connect (failing fast with a clear error), declare `always_declare` and start the
    /// I/O task. `always_declare` is declared again after every reconnect.
    pub async fn connect(
        url: &BrokerUrl,
        options: AmqpOptions,
        always_declare: Vec<QueueSpec>,
    ) -> Result<Self> {
        let conn = connect(url, &options, "producer").await?;
        let state = Arc::new(ProducerState {
            queued: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            progress: Notify::new(),
            closed: AtomicBool::new(false),
            down_since: Mutex::new(None),
            last_error: Mutex::new(None),
            failures: Mutex::new(Failures::default()),
            total_nacked: AtomicU64::new(0),
            total_returned: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            warnings: Mutex::new(Vec::new()),
            fast: Mutex::new(FastPath::default()),
        });
        let mut io = ProducerIo {
            url: url.clone(),
            options: options.clone(),
            state: state.clone(),
            always_declare,
            outbox: BTreeMap::new(),
            received: 0,
            link: None,
            generation: 0,
        };
        io.attach(conn).await.map_err(|err| {
            Error::Connection(format!(
                "cannot set up publishing on {}: {}",
                url.masked(),
                describe(&err, url)
            ))
        })?;
        io.open_fast_path();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(io.run(rx));
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
            options,
        })
    }

    /// Hand a task message to the I/O task; never waits. Refused when the message is
    /// too large, or when the connection has been down longer than the connect timeout.
    pub fn publish(&self, message: OutgoingMessage) -> Result<()> {
        self.check(message.body.len())?;
        for (name, _) in &message.headers.extra {
            if name.len() > 255 {
                return Err(Error::Encode(format!(
                    "header name {:?}... is longer than AMQP's 255 bytes",
                    name.chars().take(40).collect::<String>()
                )));
            }
        }
        for (what, text) in [
            ("exchange name", message.exchange.as_str()),
            ("routing key", message.routing_key.as_str()),
            ("reply_to", message.properties.reply_to.as_str()),
            ("correlation_id", message.properties.correlation_id.as_str()),
        ] {
            short(what, text)?;
        }
        self.send(Publish::Task(message))
    }

    /// Hand any message to the I/O task; never waits.
    pub fn publish_raw(&self, message: RawPublish) -> Result<()> {
        self.check(message.body.len())?;
        short("exchange name", &message.exchange)?;
        short("routing key", &message.routing_key)?;
        self.send(Publish::Raw(message))
    }

    fn check(&self, size: usize) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the producer"));
        }
        if size > self.options.max_message_size {
            return Err(Error::Config(format!(
                "the message is {size} bytes, more than the broker's limit of {} bytes \
                 (broker_transport_options max_message_size)",
                self.options.max_message_size
            )));
        }
        let down_since = *self
            .state
            .down_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(since) = down_since {
            let down = since.elapsed();
            if down > self.options.connect_timeout {
                return Err(Error::Connection(format!(
                    "cannot publish to {}: the connection has been down for {:.1}s: {}",
                    self.masked,
                    down.as_secs_f64(),
                    self.last_error().unwrap_or_else(|| "no reply".into())
                )));
            }
        }
        Ok(())
    }

    /// Queue the message for the I/O task, or, when nothing is pending (every earlier
    /// message is confirmed) and its target is declared, write it here and hand the
    /// I/O task only its confirm: a single publish (a round trip's) then goes out
    /// without waking the I/O task first. Indexes are taken under the lock, so the
    /// messages keep their order on either path.
    fn send(&self, message: Publish) -> Result<()> {
        let fast = self
            .state
            .fast
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seq = self.state.queued.load(Ordering::Acquire);
        crate::trace::hop("produce.handoff");
        let command = self.write_now(&fast, seq, message);
        self.state.queued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send(command)
            .map_err(|_| Error::Closed("the producer"))
    }

    /// The fast path of `send`: `Written`, or `Publish` (for the I/O task) when it
    /// does not apply.
    fn write_now(&self, fast: &FastPath, seq: u64, message: Publish) -> ProducerCommand {
        let Some((generation, channel)) = fast.link.as_ref() else {
            return ProducerCommand::Publish(message);
        };
        if self.state.settled.load(Ordering::Acquire) != seq {
            return ProducerCommand::Publish(message);
        }
        let Ok(prepared) = message.prepare() else {
            return ProducerCommand::Publish(message);
        };
        if let Publish::Task(_) = &message {
            let target = (
                prepared.exchange.as_str().to_owned(),
                prepared.routing_key.as_str().to_owned(),
            );
            if !fast.declared.contains(&target) {
                return ProducerCommand::Publish(message);
            }
        }
        let message = Arc::new(message);
        let mut publish = start_publish(channel.clone(), seq, prepared, message.clone());
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        // The first poll queues the frames (lapin wakes its I/O thread); the I/O task
        // polls the rest with its own waker.
        if let Poll::Ready(outcome) = publish.as_mut().poll(&mut cx) {
            publish = Box::pin(std::future::ready(outcome));
        }
        ProducerCommand::Written(message, *generation, publish)
    }

    fn last_error(&self) -> Option<String> {
        self.state
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Wait until every message published before this call is confirmed by the broker.
    /// Fails naming the URL when that takes longer than `timeout`, or when the broker
    /// refused (nack) or could not route some messages since the previous flush.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let target = self.state.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.progress.notified();
            let settled = self.state.settled.load(Ordering::Acquire);
            if settled >= target {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let settled = self.state.settled.load(Ordering::Acquire);
                if settled >= target {
                    break;
                }
                return Err(Error::Connection(format!(
                    "{} message(s) not confirmed by {} after {:.1}s: {}",
                    target - settled,
                    self.masked,
                    timeout.as_secs_f64(),
                    self.last_error().unwrap_or_else(|| "no reply".into())
                )));
            }
        }
        let failures = {
            let mut failures = self
                .state
                .failures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::take(&mut *failures)
        };
        if let Some(conflict) = failures.conflict {
            return Err(Error::Config(conflict));
        }
        if failures.nacked + failures.returned + failures.unencodable > 0 {
            return Err(Error::Connection(format!(
                "{} at {}: {} refused (nack), {} unroutable (returned), {} not encodable; last: {}",
                "some messages were not delivered",
                self.masked,
                failures.nacked,
                failures.returned,
                failures.unencodable,
                failures.last.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Refuse new messages; the I/O task confirms what is pending (bounded by the
    /// connect timeout) and closes the connection.
    pub fn close(&self) {
        if !self.state.closed.swap(true, Ordering::AcqRel) {
            let (done, _) = oneshot::channel();
            let _ = self.tx.send(ProducerCommand::Close(done));
        }
    }

    /// Close and wait (bounded) until the I/O task has closed the connection.
    pub async fn close_and_wait(&self, timeout: Duration) {
        self.state.closed.store(true, Ordering::Release);
        let (done, finished) = oneshot::channel();
        if self.tx.send(ProducerCommand::Close(done)).is_ok() {
            let _ = tokio::time::timeout(timeout, finished).await;
        }
    }

    pub fn stats(&self) -> ProducerStats {
        ProducerStats {
            queued: self.state.queued.load(Ordering::Acquire),
            settled: self.state.settled.load(Ordering::Acquire),
            nacked: self.state.total_nacked.load(Ordering::Acquire),
            returned: self.state.total_returned.load(Ordering::Acquire),
            reconnects: self.state.reconnects.load(Ordering::Acquire),
        }
    }

    /// Warnings about declarations (a queue that exists with other flags), oldest
    /// first; taken, so each is returned once.
    pub fn take_warnings(&self) -> Vec<String> {
        self.state
            .warnings
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    pub fn masked_url(&self) -> &str {
        &self.masked
    }
}

impl Drop for AmqpProducer {
    fn drop(&mut self) {
        self.close();
    }
}

pub(super) type ConfirmFuture =
    Pin<Box<dyn Future<Output = (u64, lapin::Result<Confirmation>)> + Send>>;

pub(super) struct Link {
    conn: Connection,
    channel: Channel,
    declarer: Declarer,
    /// `(exchange, routing_key)` targets declared on this connection.
    declared: HashSet<(String, String)>,
    /// Named exchanges that do not exist: publishing there would close the channel.
    missing_exchanges: HashSet<String>,
    /// Targets whose queue exists with other arguments than ours, and why: their
    /// messages are not sent.
    conflicts: HashMap<(String, String), String>,
    confirms: FuturesUnordered<ConfirmFuture>,
}

/// Start writing one message: the future's first poll queues its frames and
/// registers its confirm; it ends with the broker's confirm.
pub(super) fn start_publish(
    channel: Channel,
    seq: u64,
    prepared: Prepared,
    source: Arc<Publish>,
) -> ConfirmFuture {
    let mandatory = matches!(*source, Publish::Task(_));
    Box::pin(async move {
        let written = channel
            .basic_publish(
                prepared.exchange,
                prepared.routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                source.body(),
                prepared.properties,
            )
            .await;
        match written {
            Ok(confirm) => {
                crate::trace::hop("produce.written");
                let confirmed = confirm.await;
                crate::trace::hop("produce.confirmed");
                (seq, confirmed)
            }
            Err(err) => (seq, Err(err)),
        }
    })
}

pub(super) struct ProducerIo {
    url: BrokerUrl,
    options: AmqpOptions,
    state: Arc<ProducerState>,
    always_declare: Vec<QueueSpec>,
    /// Written (or to be written) and not yet confirmed, by receive index.
    outbox: BTreeMap<u64, Arc<Publish>>,
    /// Messages received from the queue so far (the next receive index).
    received: u64,
    link: Option<Link>,
    /// Counts the links (connections) so far; messages written on an older one by
    /// the fast path are written again.
    generation: u64,
}

impl ProducerIo {
    /// Let `publish` write by itself on the current link (after everything pending
    /// was written on it).
    fn open_fast_path(&self) {
        let mut fast = self
            .state
            .fast
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // `declared` was emptied when the last link was lost, and filled since by the
        // declarations made on this one.
        fast.link = self
            .link
            .as_ref()
            .map(|link| (self.generation, link.channel.clone()));
    }

    fn close_fast_path(&self) {
        let mut fast = self
            .state
            .fast
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fast.link = None;
        fast.declared.clear();
    }

    async fn attach(&mut self, conn: Connection) -> Result<(), lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut link = Link {
            conn,
            channel,
            declarer: Declarer::new(),
            declared: HashSet::new(),
            missing_exchanges: HashSet::new(),
            conflicts: HashMap::new(),
            confirms: FuturesUnordered::new(),
        };
        for spec in &self.always_declare {
            match link.declarer.declare(&link.conn, spec).await? {
                Ok(None) => {}
                Ok(Some(warning)) => self.warn(warning),
                Err(conflict) => self.warn(conflict.to_string()),
            }
        }
        self.link = Some(link);
        self.generation += 1;
        self.set_down(None);
        Ok(())
    }

    fn warn(&self, warning: String) {
        if let Ok(mut warnings) = self.state.warnings.lock() {
            if warnings.len() < 100 {
                warnings.push(warning);
            }
        }
    }

    fn set_down(&self, error: Option<String>) {
        let mut down = self
            .state
            .down_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match error {
            None => *down = None,
            Some(text) => {
                if down.is_none() {
                    *down = Some(Instant::now());
                }
                if let Ok(mut last) = self.state.last_error.lock() {
                    *last = Some(text);
                }
            }
        }
    }

    fn settle_progress(&self) {
        let settled = self.outbox.keys().next().copied().unwrap_or(self.received);
        self.state.settled.store(settled, Ordering::Release);
        self.state.progress.notify_waiters();
    }

    fn fail(&self, kind: &str, text: String) {
        let mut failures = self
            .state
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match kind {
            "nack" => {
                failures.nacked += 1;
                self.state.total_nacked.fetch_add(1, Ordering::AcqRel);
            }
            "return" => {
                failures.returned += 1;
                self.state.total_returned.fetch_add(1, Ordering::AcqRel);
            }
            "conflict" => {
                failures.returned += 1;
                failures.conflict = Some(text.clone());
            }
            _ => failures.unencodable += 1,
        }
        failures.last = Some(text);
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ProducerCommand>) {
        let mut batch: Vec<ProducerCommand> = Vec::with_capacity(256);
        let mut closing: Option<(oneshot::Sender<()>, Instant)> = None;
        let mut attempt = 0u32;
        let mut ticker = tokio::time::interval(HEALTH_CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some((_, deadline)) = &closing {
                if self.outbox.is_empty() || Instant::now() >= *deadline {
                    break;
                }
            }
            // Reconnect when the link is gone.
            if self.link.is_none() {
                if closing.is_some() && self.outbox.is_empty() {
                    break;
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
                match connect(&self.url, &self.options, "producer").await {
                    Ok(conn) => match self.attach(conn).await {
                        Ok(()) => {
                            attempt = 0;
                            self.state.reconnects.fetch_add(1, Ordering::AcqRel);
                            let pending: Vec<(u64, Arc<Publish>)> = self
                                .outbox
                                .iter()
                                .map(|(seq, p)| (*seq, p.clone()))
                                .collect();
                            match self.write(pending).await {
                                Ok(()) => self.open_fast_path(),
                                Err(err) => self.lose(&err),
                            }
                        }
                        Err(err) => self.lose(&err),
                    },
                    Err(err) => self.set_down(Some(err.to_string())),
                }
                // While disconnected, a close request still ends the task in time (a
                // message taken meanwhile waits in the outbox, written on reconnect).
                if self.link.is_some() {
                    continue;
                }
                if let Ok(command) = rx.try_recv() {
                    match command {
                        ProducerCommand::Close(done) => {
                            let deadline = Instant::now() + self.options.connect_timeout;
                            closing = Some((done, deadline));
                        }
                        ProducerCommand::Publish(message) => {
                            self.accept(message);
                        }
                        ProducerCommand::Written(message, _, _) => {
                            // Written on a lost link: kept, written again on reconnect.
                            self.accept_shared(message);
                        }
                    }
                }
                continue;
            }
            let room = MAX_UNCONFIRMED
                .saturating_sub(self.outbox.len())
                .min(MAX_BATCH);
            let taking = closing.is_none() && room > 0;
            let Some(link) = self.link.as_mut() else {
                continue;
            };
            tokio::select! {
                received = rx.recv_many(&mut batch, room.max(1)), if taking => {
                    if received == 0 {
                        // Every handle is gone: confirm what is pending, then stop.
                        let (done, _) = oneshot::channel();
                        closing = Some((done, Instant::now() + self.options.connect_timeout));
                        continue;
                    }
                    let mut fresh = Vec::with_capacity(batch.len());
                    for command in batch.drain(..) {
                        match command {
                            ProducerCommand::Publish(message) => {
                                if let Some(entry) = self.accept(message) {
                                    fresh.push(entry);
                                }
                            }
                            ProducerCommand::Written(message, generation, confirm) => {
                                let entry = self.accept_shared(message);
                                match self.link.as_ref() {
                                    Some(link) if generation == self.generation => {
                                        link.confirms.push(confirm);
                                    }
                                    // Written on an earlier link: write it again.
                                    _ => fresh.push(entry),
                                }
                            }
                            ProducerCommand::Close(done) => {
                                closing = Some((done, Instant::now() + self.options.connect_timeout));
                            }
                        }
                    }
                    if let Err(err) = self.write(fresh).await {
                        self.lose(&err);
                    }
                    self.settle_progress();
                }
                Some((seq, confirmation)) = link.confirms.next(), if !link.confirms.is_empty() => {
                    // Take every confirm that is already there in one go.
                    let mut ready = vec![(seq, confirmation)];
                    while let Some(Some(more)) = link.confirms.next().now_or_never() {
                        ready.push(more);
                    }
                    for (seq, confirmation) in ready {
                        if !self.confirmed(seq, confirmation) {
                            break;
                        }
                    }
                    self.settle_progress();
                }
                _ = ticker.tick() => {
                    if !connection_alive(&link.conn, &link.channel) {
                        let text = "the connection or channel went away".to_owned();
                        self.set_down(Some(lost_text(self.url.masked(), &text)));
                        self.link = None;
                        self.close_fast_path();
                    }
                }
            }
        }
        self.settle_progress();
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                link.conn.close(200, ShortString::from("OK")),
            )
            .await;
        }
        if let Some((done, _)) = closing {
            let _ = done.send(());
        }
    }

    /// Settle one confirmed message; false when the confirm says the link is lost.
    fn confirmed(&mut self, seq: u64, confirmation: lapin::Result<Confirmation>) -> bool {
        match confirmation {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
            Ok(Confirmation::Ack(Some(returned))) => {
                self.fail(
                    "return",
                    format!(
                        "unroutable: {} {}",
                        returned.reply_code, returned.reply_text
                    ),
                );
            }
            Ok(Confirmation::Nack(_)) => {
                self.fail("nack", "the broker refused a message (nack)".into());
            }
            Err(err) => {
                self.lose(&err);
                return false;
            }
        }
        self.outbox.remove(&seq);
        true
    }

    /// Take a message into the outbox.
    fn accept(&mut self, message: Publish) -> Option<(u64, Arc<Publish>)> {
        Some(self.accept_shared(Arc::new(message)))
    }

    fn accept_shared(&mut self, message: Arc<Publish>) -> (u64, Arc<Publish>) {
        let seq = self.received;
        self.received += 1;
        self.outbox.insert(seq, message.clone());
        (seq, message)
    }

    fn lose(&mut self, err: &lapin::Error) {
        self.close_fast_path();
        self.set_down(Some(lost_text(
            self.url.masked(),
            &describe(err, &self.url),
        )));
        self.link = None;
    }

    /// Declare what the batch needs, then write it back to back: each publish is
    /// started (frames queued, confirm registered) in order before any is awaited.
    async fn write(&mut self, batch: Vec<(u64, Arc<Publish>)>) -> Result<(), lapin::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut heads = Vec::with_capacity(batch.len());
        let mut sources = Vec::with_capacity(batch.len());
        for (seq, message) in batch {
            match message.prepare() {
                Ok(prepared) => {
                    heads.push((seq, prepared));
                    sources.push(message);
                }
                Err(err) => {
                    // Cannot happen for messages that passed `publish`'s checks, but a
                    // message that cannot be framed is reported, never retried forever.
                    self.outbox.remove(&seq);
                    self.fail("encode", err.to_string());
                }
            }
        }
        let Some(link) = self.link.as_mut() else {
            return Err(lapin_other(&Error::Closed("the connection")));
        };
        let mut warnings = Vec::new();
        for ((_, prepared), source) in heads.iter().zip(&sources) {
            // A raw message (an rpc result) is sent as Celery sends results: nothing
            // declared (the reply queue is its reader's), not mandatory.
            if matches!(**source, Publish::Raw(_)) {
                continue;
            }
            let target = (
                prepared.exchange.as_str().to_owned(),
                prepared.routing_key.as_str().to_owned(),
            );
            if link.declared.contains(&target) {
                continue;
            }
            let mut conflict = None;
            for spec in self.options.specs_for_target(&target.0, &target.1) {
                match link.declarer.declare(&link.conn, &spec).await? {
                    Ok(None) => {}
                    Ok(Some(warning)) => warnings.push(warning),
                    Err(err) => conflict = Some(err.to_string()),
                }
            }
            if let Some(conflict) = conflict {
                // Not marked declared: every message for it comes here and fails.
                link.conflicts.insert(target, conflict);
                continue;
            }
            if !target.0.is_empty() && !link.declarer.exchange_exists(&link.conn, &target.0).await?
            {
                link.missing_exchanges.insert(target.0.clone());
            } else {
                self.state
                    .fast
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .declared
                    .insert(target.clone());
            }
            link.declared.insert(target);
        }
        let mut unroutable = Vec::new();
        let mut finished = Vec::new();
        let mut conflicts = Vec::new();
        for ((seq, prepared), source) in heads.into_iter().zip(sources) {
            let target = (
                prepared.exchange.as_str().to_owned(),
                prepared.routing_key.as_str().to_owned(),
            );
            if let Some(conflict) = link.conflicts.get(&target) {
                conflicts.push((seq, conflict.clone()));
                continue;
            }
            if link.missing_exchanges.contains(prepared.exchange.as_str()) {
                unroutable.push((seq, prepared.exchange.as_str().to_owned()));
                continue;
            }
            // Written, then confirmed: one future per message. Its first poll queues
            // the frames and registers the confirm, so polling in order here keeps
            // the messages in order; the rest runs while the next batch is prepared.
            let mut publish = start_publish(link.channel.clone(), seq, prepared, source);
            match std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await {
                Poll::Ready(outcome) => finished.push(outcome),
                Poll::Pending => link.confirms.push(publish),
            }
        }
        for warning in warnings {
            self.warn(warning);
        }
        for (seq, conflict) in conflicts {
            self.outbox.remove(&seq);
            self.fail("conflict", conflict);
        }
        for (seq, exchange) in unroutable {
            self.outbox.remove(&seq);
            self.fail("return", format!("exchange {exchange:?} does not exist"));
        }
        for (seq, outcome) in finished {
            if let Err(err) = outcome {
                return Err(err);
            }
            self.confirmed(seq, outcome);
        }
        Ok(())
    }
}

impl crate::broker::traits::Producer for AmqpProducer {
    fn publish(&self, message: OutgoingMessage) -> Result<()> {
        AmqpProducer::publish(self, message)
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        AmqpProducer::flush(self, timeout).await
    }

    fn close(&self) {
        AmqpProducer::close(self)
    }
}
