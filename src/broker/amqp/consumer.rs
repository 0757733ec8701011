//! The consumer: one I/O task per consumer, prefetch window kept by the broker, batched acks.

use super::*;

pub(super) enum ConsumerCommand {
    Ack(Vec<String>),
    Reject(String, bool),
    SetPrefetch(usize),
    ExtendWindow(i64),
    Restore(oneshot::Sender<Result<usize>>),
    /// Consume from one more queue (declared first); false: consumed already.
    AddQueue(String, oneshot::Sender<Result<bool>>),
    /// Stop consuming from a queue; false: it was not consumed.
    CancelQueue(String, oneshot::Sender<Result<bool>>),
    Close,
}

pub(super) struct ConsumerShared {
    closed: AtomicBool,
    masked: String,
    reconnects: AtomicU64,
    stale_acks: AtomicU64,
}

/// Takes messages from queues within the broker-kept prefetch window; acks in batches.
pub struct AmqpConsumer {
    tx: mpsc::UnboundedSender<ConsumerCommand>,
    shared: Arc<ConsumerShared>,
}

/// Counters of a consumer's life, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    pub reconnects: u64,
    /// Acks or rejects for tags of an earlier connection (the broker had already
    /// requeued those messages).
    pub stale_acks: u64,
}

/// Celery sends prefetch counts above 65535 as 0 (unlimited).
pub(super) fn prefetch_u16(prefetch: usize) -> u16 {
    u16::try_from(prefetch).unwrap_or(0)
}

impl AmqpConsumer {
    /// Connect, declare the queues (Celery's flags), set `basic.qos` and start
    /// consuming into `deliveries`. `prefetch_count` 0 = unbounded.
    pub async fn connect(
        url: &BrokerUrl,
        queues: &[String],
        prefetch_count: usize,
        options: AmqpOptions,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) -> Result<Self> {
        if queues.is_empty() {
            return Err(Error::Connection("no queue to consume from".into()));
        }
        let specs: Vec<QueueSpec> = queues.iter().map(|q| options.queue_spec(q)).collect();
        for spec in &specs {
            short("queue name", &spec.name)?;
        }
        // As a Celery 5.5+ worker: quorum queues get native delayed delivery, and a
        // bad level queue type stops the worker before it consumes.
        let delayed_delivery = if delayed::wanted(&options, &specs) {
            Some(delayed::level_queue_type(&options)?)
        } else {
            None
        };
        let shared = Arc::new(ConsumerShared {
            closed: AtomicBool::new(false),
            masked: url.masked().to_owned(),
            reconnects: AtomicU64::new(0),
            stale_acks: AtomicU64::new(0),
        });
        let mut io = ConsumerIo {
            url: url.clone(),
            qos_global: options
                .qos_global
                .unwrap_or(!specs.iter().any(QueueSpec::is_quorum)),
            options,
            specs,
            delayed_delivery,
            window: i64::try_from(prefetch_count).unwrap_or(i64::MAX),
            prefetch: prefetch_u16(prefetch_count),
            shared: shared.clone(),
            generation: 0,
            tags: TagLedger::new(),
            link: None,
        };
        let conn = connect(url, &io.options, "consumer").await?;
        io.attach(conn).await.map_err(|err| {
            Error::Connection(format!(
                "cannot consume from {}: {}",
                url.masked(),
                describe(&err, url)
            ))
        })??;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(io.run(rx, deliveries));
        Ok(Self { tx, shared })
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
        crate::trace::hop("ack.handoff");
        self.tx
            .send(ConsumerCommand::Ack(tags))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// `requeue=false` drops (or dead-letters) the message; `true` puts it back.
    pub fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        self.tx
            .send(ConsumerCommand::Reject(tag, requeue))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Grow (`delta > 0`) or shrink the prefetch window by `delta` messages (one per
    /// ETA task held, as Celery's `qos.increment_eventually`); changes that arrive
    /// together become one `basic.qos`. An unbounded window (0) stays unbounded.
    pub fn extend_window(&self, delta: i64) -> Result<()> {
        self.tx
            .send(ConsumerCommand::ExtendWindow(delta))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Change the prefetch window (`basic.qos`), e.g. to make room for ETA tasks.
    pub fn set_prefetch_count(&self, prefetch_count: usize) -> Result<()> {
        self.tx
            .send(ConsumerCommand::SetPrefetch(prefetch_count))
            .map_err(|_| Error::Closed("the consumer"))
    }

    /// Stop consuming and hand every delivered, unacked message back to the broker
    /// (requeued, redelivered flag set); then close. Returns how many.
    pub async fn restore_unacked(&self) -> Result<usize> {
        let (reply, restored) = oneshot::channel();
        self.tx
            .send(ConsumerCommand::Restore(reply))
            .map_err(|_| Error::Closed("the consumer"))?;
        self.shared.closed.store(true, Ordering::Release);
        restored.await.map_err(|_| Error::Closed("the consumer"))?
    }

    pub fn close(&self) {
        if !self.shared.closed.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(ConsumerCommand::Close);
        }
    }

    /// Declare `queue` as the worker declares its queues and consume from it too;
    /// false when it was consumed already.
    pub async fn add_queue(&self, queue: &str) -> Result<bool> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(ConsumerCommand::AddQueue(queue.to_owned(), reply))
            .map_err(|_| Error::Closed("the consumer"))?;
        done.await.map_err(|_| Error::Closed("the consumer"))?
    }

    /// Stop consuming from `queue` (`basic.cancel`); false when it was not consumed.
    /// Messages already delivered from it are still handed over and acked.
    pub async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(ConsumerCommand::CancelQueue(queue.to_owned(), reply))
            .map_err(|_| Error::Closed("the consumer"))?;
        done.await.map_err(|_| Error::Closed("the consumer"))?
    }

    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            reconnects: self.shared.reconnects.load(Ordering::Acquire),
            stale_acks: self.shared.stale_acks.load(Ordering::Acquire),
        }
    }

    pub fn masked_url(&self) -> &str {
        &self.shared.masked
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        self.close();
    }
}

pub(super) type DeliveryStream = Pin<
    Box<
        dyn futures_util::Stream<Item = (Arc<str>, lapin::Result<lapin::message::Delivery>)> + Send,
    >,
>;

pub(super) struct ConsumerLink {
    conn: Connection,
    channel: Channel,
    consumer_tags: Vec<ShortString>,
    stream: SelectAll<DeliveryStream>,
}

pub(super) struct ConsumerIo {
    url: BrokerUrl,
    options: AmqpOptions,
    specs: Vec<QueueSpec>,
    /// Set up native delayed delivery (with this level queue type) on each connection.
    delayed_delivery: Option<LevelQueueType>,
    /// The window asked for: `prefetch_count` plus the extensions (0 = unbounded).
    window: i64,
    /// What `basic.qos` says (Celery sends more than 65535 as 0, unbounded).
    prefetch: u16,
    qos_global: bool,
    shared: Arc<ConsumerShared>,
    generation: u64,
    /// The current channel's delivery tags: which may be acked with `multiple=true`.
    tags: TagLedger,
    link: Option<ConsumerLink>,
}

/// A tag as handed out, split into (generation, AMQP delivery tag).
pub(super) fn parse_tag(tag: &str) -> Option<(u64, u64)> {
    let (generation, tag) = tag.split_once('.')?;
    Some((generation.parse().ok()?, tag.parse().ok()?))
}

impl ConsumerIo {
    /// Declare, set `basic.qos` and consume. The inner error: a queue exists with
    /// other arguments than ours (nothing is consumed then).
    async fn attach(&mut self, conn: Connection) -> Result<Result<()>, lapin::Error> {
        let mut declarer = Declarer::new();
        for spec in &self.specs {
            // Refusals of a flag fall back to the existing queue; consuming tells if
            // it is gone. Other arguments than ours are an error.
            if let Err(conflict) = declarer.declare(&conn, spec).await? {
                let _ = conn.close(200, ShortString::from("OK")).await;
                return Ok(Err(conflict));
            }
        }
        if let Some(queue_type) = self.delayed_delivery {
            if let Err(refused) = delayed::declare(&conn, &self.specs, queue_type).await? {
                let _ = conn.close(200, ShortString::from("OK")).await;
                return Ok(Err(refused));
            }
        }
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(
                self.prefetch,
                BasicQosOptions {
                    global: self.qos_global,
                },
            )
            .await?;
        self.generation += 1;
        self.tags.clear();
        let mut stream = SelectAll::new();
        let mut consumer_tags = Vec::new();
        for spec in &self.specs {
            let (tag, tagged) = consume(&channel, spec).await?;
            consumer_tags.push(tag);
            stream.push(tagged);
        }
        self.link = Some(ConsumerLink {
            conn,
            channel,
            consumer_tags,
            stream,
        });
        Ok(Ok(()))
    }

    fn incoming(&mut self, queue: &str, delivery: lapin::message::Delivery) -> IncomingMessage {
        self.tags.handed_over(delivery.delivery_tag);
        let props = &delivery.properties;
        let text = |value: &Option<ShortString>| value.as_ref().map(|s| s.as_str().to_owned());
        let headers: Option<Box<RawValue>> = props.headers().as_ref().and_then(|table| {
            let json = Value::Object(field_table_to_json(table));
            serde_json::value::to_raw_value(&json).ok()
        });
        IncomingMessage {
            delivery_tag: format!("{}.{}", self.generation, delivery.delivery_tag),
            queue: queue.to_owned(),
            exchange: delivery.exchange.as_str().to_owned(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            redelivered: delivery.redelivered,
            priority: props.priority().map_or(0, i64::from),
            reply_to: text(props.reply_to()),
            correlation_id: text(props.correlation_id()),
            content_type: text(props.content_type()),
            content_encoding: text(props.content_encoding()),
            headers,
            body: delivery.data,
        }
    }

    /// Our tags on the current connection; others are stale (already requeued).
    fn current(&self, tag: &str) -> Option<u64> {
        match parse_tag(tag) {
            Some((generation, tag)) if generation == self.generation => Some(tag),
            _ => {
                self.shared.stale_acks.fetch_add(1, Ordering::AcqRel);
                None
            }
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<ConsumerCommand>,
        deliveries: mpsc::UnboundedSender<Fetched>,
    ) {
        let mut commands = Vec::with_capacity(256);
        let mut failures = 0u32;
        let mut ticker = tokio::time::interval(HEALTH_CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.link.is_none() {
                if self.shared.closed.load(Ordering::Acquire) {
                    // Closed while disconnected: answer a pending restore and stop.
                    while let Ok(command) = rx.try_recv() {
                        if let ConsumerCommand::Restore(reply) = command {
                            let _ = reply.send(Ok(0));
                        }
                    }
                    return;
                }
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                let attached = match connect(&self.url, &self.options, "consumer").await {
                    Ok(conn) => match self.attach(conn).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(conflict)) => Err(conflict.to_string()),
                        Err(err) => Err(describe(&err, &self.url)),
                    },
                    Err(err) => Err(err.to_string()),
                };
                match attached {
                    Ok(()) => {
                        failures = 0;
                        self.shared.reconnects.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(_) => {
                        // Commands for the lost connection cannot be carried out; the
                        // broker requeued its messages. Keep draining them.
                        while let Ok(command) = rx.try_recv() {
                            match command {
                                ConsumerCommand::Restore(reply) => {
                                    self.shared.closed.store(true, Ordering::Release);
                                    let _ = reply.send(Ok(0));
                                }
                                ConsumerCommand::Close => {
                                    self.shared.closed.store(true, Ordering::Release);
                                }
                                ConsumerCommand::SetPrefetch(n) => self.set_window(Some(n), 0),
                                ConsumerCommand::ExtendWindow(delta) => {
                                    self.set_window(None, delta)
                                }
                                ConsumerCommand::Ack(tags) => {
                                    self.shared
                                        .stale_acks
                                        .fetch_add(tags.len() as u64, Ordering::AcqRel);
                                }
                                ConsumerCommand::Reject(..) => {
                                    self.shared.stale_acks.fetch_add(1, Ordering::AcqRel);
                                }
                                // Taken into account by the next connection.
                                ConsumerCommand::AddQueue(queue, reply) => {
                                    let _ = reply.send(self.add_spec(&queue).map(|s| s.is_some()));
                                }
                                ConsumerCommand::CancelQueue(queue, reply) => {
                                    let _ = reply.send(Ok(self.remove_spec(&queue).is_some()));
                                }
                            }
                        }
                    }
                }
                continue;
            }
            let Some(link) = self.link.as_mut() else {
                continue;
            };
            tokio::select! {
                biased;
                received = rx.recv_many(&mut commands, 1024) => {
                    if received == 0 {
                        self.shutdown().await;
                        return;
                    }
                    let mut stop = false;
                    let batch = std::mem::take(&mut commands);
                    if let Err(err) = self.handle(batch, &mut stop, &deliveries).await {
                        self.lose(&err, &deliveries);
                    }
                    if stop {
                        return;
                    }
                }
                item = link.stream.next(), if !link.stream.is_empty() => {
                    match item {
                        Some((queue, Ok(delivery))) => {
                            crate::trace::hop("consume.fetched");
                            let message = self.incoming(&queue, delivery);
                            if deliveries.send(Fetched::Message(Ok(message))).is_err() {
                                self.shutdown().await;
                                return;
                            }
                        }
                        Some((_, Err(err))) => self.lose(&err, &deliveries),
                        // The last queue was cancelled by `cancel_queue`.
                        None if self.specs.is_empty() => {}
                        None => {
                            // Every consumer was cancelled (a queue was deleted).
                            let err = lapin_other(&Error::Connection("the broker cancelled the consumer".into()));
                            self.lose(&err, &deliveries);
                        }
                    }
                }
                _ = ticker.tick() => {
                    if !connection_alive(&link.conn, &link.channel) {
                        let err = lapin_other(&Error::Connection("the connection went away".into()));
                        self.lose(&err, &deliveries);
                    }
                }
            }
        }
    }

    fn lose(&mut self, err: &lapin::Error, deliveries: &mpsc::UnboundedSender<Fetched>) {
        self.link = None;
        self.tags.clear();
        if self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        let text = lost_text(&self.shared.masked, &describe(err, &self.url));
        let _ = deliveries.send(Fetched::Error(text));
    }

    async fn handle(
        &mut self,
        commands: Vec<ConsumerCommand>,
        stop: &mut bool,
        deliveries: &mpsc::UnboundedSender<Fetched>,
    ) -> Result<(), lapin::Error> {
        let mut acked = BTreeSet::new();
        let before = self.prefetch;
        for command in commands {
            match command {
                ConsumerCommand::Ack(tags) => {
                    for tag in tags {
                        if let Some(tag) = self.current(&tag) {
                            acked.insert(tag);
                        }
                    }
                }
                ConsumerCommand::Reject(tag, requeue) => {
                    self.send_acks(&mut acked).await?;
                    if let Some(tag) = self.current(&tag) {
                        if self.tags.reject(tag) {
                            if let Some(link) = &self.link {
                                link.channel
                                    .basic_reject(tag, BasicRejectOptions { requeue })
                                    .await?;
                            }
                        }
                    }
                }
                ConsumerCommand::SetPrefetch(count) => self.set_window(Some(count), 0),
                ConsumerCommand::ExtendWindow(delta) => self.set_window(None, delta),
                ConsumerCommand::Restore(reply) => {
                    self.send_acks(&mut acked).await?;
                    let restored = self.restore().await;
                    let _ = reply.send(restored);
                    *stop = true;
                    return Ok(());
                }
                ConsumerCommand::AddQueue(queue, reply) => {
                    self.send_acks(&mut acked).await?;
                    match self.add_queue(&queue).await {
                        Ok(outcome) => {
                            let _ = reply.send(outcome);
                        }
                        Err(err) => {
                            let text = describe(&err, &self.url);
                            let _ = reply.send(Err(Error::Connection(format!(
                                "cannot consume from {queue:?}: {text}"
                            ))));
                            return Err(err);
                        }
                    }
                }
                ConsumerCommand::CancelQueue(queue, reply) => {
                    self.send_acks(&mut acked).await?;
                    let index = self.remove_spec(&queue);
                    if let (Some(index), Some(link)) = (index, self.link.as_mut()) {
                        if index < link.consumer_tags.len() {
                            let tag = link.consumer_tags.remove(index);
                            if let Err(err) = link
                                .channel
                                .basic_cancel(tag, BasicCancelOptions::default())
                                .await
                            {
                                let text = describe(&err, &self.url);
                                let _ = reply.send(Err(Error::Connection(text)));
                                return Err(err);
                            }
                        }
                    }
                    self.hand_over_buffered(deliveries)?;
                    let _ = reply.send(Ok(index.is_some()));
                }
                ConsumerCommand::Close => {
                    self.send_acks(&mut acked).await?;
                    self.shutdown().await;
                    *stop = true;
                    return Ok(());
                }
            }
        }
        self.send_acks(&mut acked).await?;
        if self.prefetch != before {
            if let Some(link) = &self.link {
                link.channel
                    .basic_qos(
                        self.prefetch,
                        BasicQosOptions {
                            global: self.qos_global,
                        },
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Hand over the deliveries lapin holds already. After a `basic.cancel` returns,
    /// those of the cancelled consumer (sent before its cancel-ok) are all there: the
    /// caller then sees everything the queue delivered, e.g. to give it back.
    fn hand_over_buffered(
        &mut self,
        deliveries: &mpsc::UnboundedSender<Fetched>,
    ) -> Result<(), lapin::Error> {
        loop {
            let Some(link) = self.link.as_mut() else {
                return Ok(());
            };
            match link.stream.next().now_or_never() {
                Some(Some((queue, Ok(delivery)))) => {
                    let message = self.incoming(&queue, delivery);
                    let _ = deliveries.send(Fetched::Message(Ok(message)));
                }
                Some(Some((_, Err(err)))) => return Err(err),
                Some(None) | None => return Ok(()),
            }
        }
    }

    /// Add `queue` to the queues consumed (declared and consumed from the next
    /// `attach` on); its index, or None when it is consumed already.
    fn add_spec(&mut self, queue: &str) -> Result<Option<usize>> {
        if self.specs.iter().any(|spec| spec.name == queue) {
            return Ok(None);
        }
        let spec = self.options.queue_spec(queue);
        short("queue name", &spec.name)?;
        self.specs.push(spec);
        Ok(Some(self.specs.len() - 1))
    }

    /// Drop `queue` from the queues consumed; its index, or None when not consumed.
    fn remove_spec(&mut self, queue: &str) -> Option<usize> {
        let index = self.specs.iter().position(|spec| spec.name == queue)?;
        self.specs.remove(index);
        Some(index)
    }

    /// Declare `queue` (Celery's flags) and `basic.consume` it on the current channel.
    /// The outer error is the connection's; the inner one the queue's (a bad name, a
    /// queue that cannot be declared): the consumer goes on with its other queues.
    async fn add_queue(&mut self, queue: &str) -> Result<Result<bool>, lapin::Error> {
        let index = match self.add_spec(queue) {
            Ok(Some(index)) => index,
            Ok(None) => return Ok(Ok(false)),
            Err(err) => return Ok(Err(err)),
        };
        let Some(link) = self.link.as_mut() else {
            return Ok(Ok(true));
        };
        let spec = self.specs[index].clone();
        let mut declarer = Declarer::new();
        let warning = match declarer.declare(&link.conn, &spec).await? {
            Ok(warning) => warning,
            Err(conflict) => {
                self.specs.remove(index);
                return Ok(Err(conflict));
            }
        };
        let exists = match warning {
            None => true,
            Some(_) => queue_exists(declarer.channel(&link.conn).await?, &spec.name).await?,
        };
        if let Some(channel) = declarer.channel.take() {
            let _ = channel.close(200, ShortString::from("OK")).await;
        }
        if !exists {
            self.specs.remove(index);
            return Ok(Err(Error::Connection(format!(
                "cannot declare queue {queue:?}: {}",
                warning.unwrap_or_default()
            ))));
        }
        let (tag, tagged) = consume(&link.channel, &spec).await?;
        link.consumer_tags.push(tag);
        link.stream.push(tagged);
        Ok(Ok(true))
    }

    /// A new window: `Some(count)` sets it, `None` moves it by `delta` (never below 1;
    /// an unbounded window stays unbounded). `basic.qos` is sent by the caller.
    fn set_window(&mut self, count: Option<usize>, delta: i64) {
        match count {
            Some(count) => self.window = i64::try_from(count).unwrap_or(i64::MAX),
            None if self.window == 0 => return,
            None => self.window = self.window.saturating_add(delta).max(1),
        }
        self.prefetch = prefetch_u16(usize::try_from(self.window).unwrap_or(usize::MAX));
    }

    async fn send_acks(&mut self, acked: &mut BTreeSet<u64>) -> Result<(), lapin::Error> {
        if acked.is_empty() {
            return Ok(());
        }
        let plan = self.tags.plan_acks(acked);
        acked.clear();
        let Some(link) = &self.link else {
            return Ok(());
        };
        let channel = &link.channel;
        let mut writes = Vec::with_capacity(plan.singles.len() + 1);
        if let Some(upto) = plan.multiple_up_to {
            writes.push(channel.basic_ack(upto, BasicAckOptions { multiple: true }));
        }
        for tag in plan.singles {
            writes.push(channel.basic_ack(tag, BasicAckOptions { multiple: false }));
        }
        for result in futures_util::future::join_all(writes).await {
            result?;
        }
        crate::trace::hop("ack.written");
        Ok(())
    }

    /// Cancel the consumers, nack (requeue) everything delivered and unacked on the
    /// channel, and close. The close is a round trip, so the broker has requeued the
    /// messages when this returns.
    async fn restore(&mut self) -> Result<usize> {
        self.shared.closed.store(true, Ordering::Release);
        let Some(mut link) = self.link.take() else {
            return Ok(0);
        };
        let masked = self.shared.masked.clone();
        let fail = |err: lapin::Error| {
            Error::Connection(format!(
                "cannot give unacked messages back to {masked}: {} (the broker requeues them when the connection ends)",
                describe(&err, &self.url)
            ))
        };
        for tag in &link.consumer_tags {
            link.channel
                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                .await
                .map_err(&fail)?;
        }
        // Deliveries that raced the cancel (sent before its cancel-ok, buffered by
        // lapin) are unacked too: count them; the nack below returns them as well.
        while let Some(Some((_, Ok(delivery)))) = link.stream.next().now_or_never() {
            self.tags.handed_over(delivery.delivery_tag);
        }
        let count = self.tags.outstanding();
        link.channel
            .basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .map_err(&fail)?;
        self.tags.clear();
        let _ = link.channel.close(200, ShortString::from("OK")).await;
        let _ = link.conn.close(200, ShortString::from("OK")).await;
        Ok(count)
    }

    async fn shutdown(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(link) = self.link.take() {
            // Unacked messages go back to their queues when the channel closes.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = link.channel.close(200, ShortString::from("OK")).await;
                let _ = link.conn.close(200, ShortString::from("OK")).await;
            })
            .await;
        }
    }
}

impl crate::broker::traits::Consumer for AmqpConsumer {
    fn ack(&self, tags: Vec<String>) -> Result<()> {
        AmqpConsumer::ack(self, tags)
    }

    fn reject(&self, tag: String, requeue: bool) -> Result<()> {
        AmqpConsumer::reject(self, tag, requeue)
    }

    fn extend_window(&self, delta: i64) -> Result<()> {
        AmqpConsumer::extend_window(self, delta)
    }

    async fn restore_unacked(&self) -> Result<usize> {
        AmqpConsumer::restore_unacked(self).await
    }

    async fn add_queue(&self, queue: &str) -> Result<bool> {
        AmqpConsumer::add_queue(self, queue).await
    }

    async fn cancel_queue(&self, queue: &str) -> Result<bool> {
        AmqpConsumer::cancel_queue(self, queue).await
    }

    fn close(&self) {
        AmqpConsumer::close(self)
    }
}
