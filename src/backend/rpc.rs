//! The `rpc://` result backend, as Celery's (docs/wire.md §4.5): results travel as
//! AMQP messages on the broker, not in a store.
//!
//! - Each client has one reply queue, named by its oid — the `reply_to` its producer
//!   puts on every task message. It is declared as Celery 5.7 declares it (durable,
//!   auto-delete, `x-expires` = `result_expires`) when the backend is built, so results
//!   published before anyone waits are kept in the queue.
//! - A worker publishes each state update to the default exchange `''` with routing
//!   key = the request's `reply_to` and `correlation_id` = the task id (delivery mode 1,
//!   2 with `persistent`), body = the meta JSON. Nothing is sent when `reply_to` is
//!   empty. The writes go through an [`AmqpProducer`] (confirmed, re-sent after a
//!   reconnect).
//! - The first wait (or `get`) starts the listener: a consumer on the reply queue
//!   (`no_ack`, as Celery's) that keeps the latest meta per task id and wakes the
//!   waiters. Nothing polls. A ready state is never replaced by a later non-ready one.
//!
//! The blocking methods must be called from a thread that is not a runtime thread (a
//! Python thread, a test), like the Redis store's. After `fork()` the child builds its
//! own backend; the inherited one refuses work.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{FieldTable, ShortString};
use serde::Deserialize;
use tokio::sync::{oneshot, Notify};

use crate::backend::is_ready;
use crate::broker::amqp::{self, AmqpOptions, AmqpProducer, QueueSpec, RawPublish};
use crate::broker::url::{BrokerUrl, Scheme};
use crate::error::{Error, Result};
use crate::protocol::content::Serializer;
use crate::retry::backoff;
use crate::runtime;

/// Metas kept for tasks nobody waited for yet, at most (oldest dropped first).
const MAX_KEPT: usize = 100_000;

const CLOSED: &str = "the rpc result backend";
const FORKED: &str = "an rpc result backend inherited across fork()";

#[derive(Debug, Clone)]
pub struct RpcBackendOptions {
    /// This client's reply queue (its oid); empty for a backend that only stores
    /// (a worker's), which then declares and consumes nothing.
    pub reply_to: String,
    /// `result_expires`: the reply queue's `x-expires`.
    pub expires: Option<Duration>,
    /// `result_persistent`: delivery mode 2 instead of 1.
    pub persistent: bool,
    /// The broker connection's settings.
    pub transport: AmqpOptions,
    /// `result_serializer`: the content type results are published with.
    pub serializer: Serializer,
}

impl Default for RpcBackendOptions {
    fn default() -> Self {
        Self {
            reply_to: String::new(),
            expires: Some(Duration::from_secs(86_400)),
            persistent: false,
            transport: AmqpOptions::default(),
            serializer: Serializer::Json,
        }
    }
}

#[derive(Default)]
struct Kept {
    latest: HashMap<String, Vec<u8>>,
    order: VecDeque<String>,
}

struct Results {
    kept: Mutex<Kept>,
    changed: Notify,
    /// Why the listener cannot connect (for waiters' timeouts).
    error: Mutex<Option<String>>,
    stopping: AtomicBool,
}

impl Results {
    fn keep(&self, task_id: String, meta: Vec<u8>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = kept.latest.get(&task_id) {
            if is_ready(old) && !is_ready(&meta) {
                return;
            }
        } else {
            kept.order.push_back(task_id.clone());
            while kept.order.len() > MAX_KEPT {
                if let Some(oldest) = kept.order.pop_front() {
                    kept.latest.remove(&oldest);
                }
            }
        }
        kept.latest.insert(task_id, meta);
        drop(kept);
        self.changed.notify_waiters();
    }

    fn latest(&self, task_id: &str) -> Option<Vec<u8>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.latest.get(task_id).cloned()
    }

    fn forget(&self, task_id: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.latest.remove(task_id).is_some() {
            kept.order.retain(|id| id != task_id);
        }
    }
}

/// An `rpc://` result backend. See the module documentation.
pub struct RpcBackend {
    url: BrokerUrl,
    options: RpcBackendOptions,
    producer: AmqpProducer,
    results: Arc<Results>,
    listener: Mutex<Option<oneshot::Sender<()>>>,
    closed: AtomicBool,
    pid: u32,
}

impl std::fmt::Debug for RpcBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcBackend")
            .field("broker", &self.url.masked())
            .field("reply_to", &self.options.reply_to)
            .finish_non_exhaustive()
    }
}

impl RpcBackend {
    /// Connect to the broker `broker_url` (an `amqp://` URL) and declare the reply
    /// queue. Errors name the URL with its password masked.
    pub fn connect(broker_url: &str, options: RpcBackendOptions) -> Result<Self> {
        let url = BrokerUrl::parse(broker_url)?;
        if !matches!(url.scheme, Scheme::Amqp | Scheme::Amqps) {
            return Err(Error::Config(format!(
                "the rpc:// result backend needs an AMQP broker (amqp://, pyamqp://, amqps://), \
                 not {}",
                url.masked()
            )));
        }
        let declare = if options.reply_to.is_empty() {
            Vec::new()
        } else {
            vec![QueueSpec::rpc_reply(&options.reply_to, options.expires)]
        };
        let producer = runtime::handle().block_on(AmqpProducer::connect(
            &url,
            options.transport.clone(),
            declare,
        ))?;
        Ok(Self {
            url,
            options,
            producer,
            results: Arc::new(Results {
                kept: Mutex::new(Kept::default()),
                changed: Notify::new(),
                error: Mutex::new(None),
                stopping: AtomicBool::new(false),
            }),
            listener: Mutex::new(None),
            closed: AtomicBool::new(false),
            pid: std::process::id(),
        })
    }

    pub fn masked_url(&self) -> &str {
        self.url.masked()
    }

    /// The reply queue this client reads (its oid).
    pub fn reply_to(&self) -> &str {
        &self.options.reply_to
    }

    /// Publish a meta to `reply_to` with `correlation_id` (default: the task id); returns
    /// at once. Nothing is sent when `reply_to` is empty or missing, as in Celery.
    pub fn store(
        &self,
        task_id: &str,
        meta_json: Vec<u8>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        self.check_open()?;
        crate::trace::hop("result.handoff");
        let Some(reply_to) = reply_to.filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        self.producer.publish_raw(RawPublish {
            exchange: String::new(),
            routing_key: reply_to.to_owned(),
            correlation_id: Some(correlation_id.unwrap_or(task_id).to_owned()),
            content_type: self.options.serializer.content_type().into(),
            content_encoding: self.options.serializer.content_encoding().into(),
            delivery_mode: if self.options.persistent { 2 } else { 1 },
            body: meta_json,
        })
    }

    /// Wait until every result stored before this call is confirmed by the broker.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        runtime::handle().block_on(self.producer.flush(timeout))
    }

    /// The latest meta received for the task, `None` when none came yet (PENDING).
    pub fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        self.listen()?;
        Ok(self.results.latest(task_id))
    }

    /// Forget what was received for the task (nothing is stored on the broker).
    pub fn forget(&self, task_id: &str) -> Result<()> {
        self.check_open()?;
        self.results.forget(task_id);
        Ok(())
    }

    /// Start waiting for the task's ready meta.
    pub fn watch(&self, task_id: &str) -> Result<Waiter> {
        self.check_open()?;
        self.listen()?;
        Ok(Waiter {
            results: self.results.clone(),
            task_id: task_id.to_owned(),
        })
    }

    /// Block until the task's meta has a ready state; `Error::Timeout` at `deadline`.
    pub fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>> {
        let mut waiter = self.watch(task_id)?;
        loop {
            let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if let Some(meta) = waiter.wait_until(until)? {
                return Ok(meta);
            }
            if deadline.is_some() {
                return Err(Error::Timeout("The operation timed out.".to_owned()));
            }
        }
    }

    /// Confirm what is pending (bounded by the connect timeout), stop the listener and
    /// close the connections. Later calls fail with `Error::Closed`.
    pub fn close(&self) -> Result<()> {
        if self.pid != std::process::id() || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let timeout = self.options.transport.connect_timeout;
        let flushed = runtime::handle().block_on(self.producer.flush(timeout));
        runtime::handle().block_on(self.producer.close_and_wait(timeout));
        self.stop_listener();
        flushed
    }

    fn stop_listener(&self) {
        self.results.stopping.store(true, Ordering::SeqCst);
        self.results.changed.notify_waiters();
        if let Some(stop) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = stop.send(());
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.pid != std::process::id() {
            Err(Error::Closed(FORKED))
        } else if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed(CLOSED))
        } else {
            Ok(())
        }
    }

    /// Start the listener once; waits until it consumes (or fails to connect at all).
    fn listen(&self) -> Result<()> {
        let mut listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        if listener.is_some() {
            return Ok(());
        }
        if self.options.reply_to.is_empty() {
            return Err(Error::Config(
                "this rpc:// backend has no reply queue (reply_to) to read results from".into(),
            ));
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        runtime::handle().spawn(listen_loop(
            self.url.clone(),
            self.options.clone(),
            self.results.clone(),
            stop_rx,
            ready_tx,
        ));
        let started = runtime::handle().block_on(async {
            tokio::time::timeout(
                self.options.transport.connect_timeout + Duration::from_secs(5),
                ready_rx,
            )
            .await
        });
        match started {
            Ok(Ok(Ok(()))) => {
                *listener = Some(stop_tx);
                Ok(())
            }
            Ok(Ok(Err(text))) => Err(Error::Connection(text)),
            Ok(Err(_)) | Err(_) => Err(Error::Connection(format!(
                "cannot read results from {}: no answer",
                self.url.masked()
            ))),
        }
    }
}

impl Drop for RpcBackend {
    fn drop(&mut self) {
        if self.pid == std::process::id() {
            self.producer.close();
            self.stop_listener();
        }
    }
}

/// One wait for one task's ready meta.
pub struct Waiter {
    results: Arc<Results>,
    task_id: String,
}

impl Waiter {
    /// The ready meta, or `None` when `until` passed first.
    pub fn wait_until(&mut self, until: Instant) -> Result<Option<Vec<u8>>> {
        runtime::handle().block_on(async {
            loop {
                let changed = self.results.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(meta) = self.results.latest(&self.task_id) {
                    if is_ready(&meta) {
                        return Ok(Some(meta));
                    }
                }
                if self.results.stopping.load(Ordering::SeqCst) {
                    return Err(Error::Closed(CLOSED));
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                    return Ok(None);
                }
            }
        })
    }

    /// Why results cannot be read right now, if the listener lost the broker.
    pub fn problem(&self) -> Option<String> {
        self.results
            .error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    task_id: Option<String>,
}

async fn listen_loop(
    url: BrokerUrl,
    options: RpcBackendOptions,
    results: Arc<Results>,
    mut stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<std::result::Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut attempt = 0u32;
    let spec = QueueSpec::rpc_reply(&options.reply_to, options.expires);
    loop {
        if results.stopping.load(Ordering::SeqCst) {
            return;
        }
        let consumer = async {
            let conn = amqp::connect(&url, &options.transport, "rpc results").await?;
            amqp::declare(&conn, &spec)
                .await
                .map_err(|e| Error::Connection(amqp::describe(&e, &url)))??;
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| Error::Connection(amqp::describe(&e, &url)))?;
            let queue = ShortString::try_new(spec.name.as_str())
                .map_err(|_| Error::Config("reply queue name too long".into()))?;
            let stream = channel
                .basic_consume(
                    queue,
                    ShortString::from(format!("celeriac-rpc-{}", uuid::Uuid::new_v4().simple())),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::Connection(amqp::describe(&e, &url)))?;
            Ok::<_, Error>((conn, channel, stream))
        }
        .await;
        let (conn, _channel, mut stream) = match consumer {
            Ok(parts) => parts,
            Err(err) => {
                let text = format!("cannot read results from {}: {err}", url.masked());
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(text));
                    return;
                }
                if let Ok(mut error) = results.error.lock() {
                    *error = Some(text);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = &mut stop => return,
                }
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        attempt = 0;
        if let Ok(mut error) = results.error.lock() {
            *error = None;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(delivery)) => {
                        crate::trace::hop("result.published");
                        let id = delivery
                            .properties
                            .correlation_id()
                            .as_ref()
                            .map(|id| id.as_str().to_owned())
                            .or_else(|| {
                                serde_json::from_slice::<Probe>(&delivery.data)
                                    .ok()
                                    .and_then(|probe| probe.task_id)
                            });
                        if let Some(id) = id {
                            results.keep(id, delivery.data);
                        }
                    }
                    Some(Err(err)) => {
                        if let Ok(mut error) = results.error.lock() {
                            *error = Some(format!("lost the connection to {}: {}", url.masked(), amqp::describe(&err, &url)));
                        }
                        break;
                    }
                    None => break,
                },
                _ = &mut stop => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, ShortString::from("OK")),
                    )
                    .await;
                    return;
                }
            }
        }
    }
}
