//! Broadcast publishing: Celery's events (`celeryev`) and other fire-and-forget
//! messages to a named exchange, on whichever transport the URL names (see
//! [`Fanout`] and each transport's fanout module for what a broadcast is on the wire).
//!
//! Best effort, as kombu's event dispatcher: `publish` never waits; the I/O task writes
//! batches, reconnects when the connection drops and gives a batch up after a few
//! attempts (the last error is kept for `flush` to report).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

pub use super::broadcast::Broadcast;
use super::fanout::{Fanout, FanoutLink, QueueTimes};
pub use super::sqlite::{EventSubscriber, ReceivedBroadcast};
use super::url::BrokerUrl;
use super::TransportOptions;
use crate::error::{Error, Result};

/// Attempts per batch before it is given up.
const ATTEMPTS: u32 = 3;
/// Most messages waiting for the I/O task; past it new ones are dropped (and counted).
const MAX_BACKLOG: u64 = 100_000;

struct State {
    queued: AtomicU64,
    done: AtomicU64,
    dropped: AtomicU64,
    progress: Notify,
    closed: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl State {
    fn fail(&self, why: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(why);
        }
    }
}

/// Publishes broadcasts; cheap to call from any thread.
pub struct EventPublisher {
    tx: mpsc::UnboundedSender<Broadcast>,
    state: Arc<State>,
    masked: String,
}

impl EventPublisher {
    /// Connect now (failing fast with a clear error) and start the I/O task.
    pub async fn connect(url: &BrokerUrl, options: &TransportOptions) -> Result<Self> {
        let link = FanoutLink::connect(url, options, QueueTimes::default(), "events").await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            queued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            progress: Notify::new(),
            closed: AtomicBool::new(false),
            last_error: Mutex::new(None),
        });
        tokio::spawn(io_loop(link, rx, state.clone()));
        Ok(Self {
            tx,
            state,
            masked: url.masked().to_owned(),
        })
    }

    /// Hand a message to the I/O task; never waits. Dropped (counted) when the
    /// backlog is full.
    pub fn publish(&self, message: Broadcast) -> Result<()> {
        if self.state.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the event publisher"));
        }
        let queued = self.state.queued.load(Ordering::Acquire);
        if queued.saturating_sub(self.state.done.load(Ordering::Acquire)) >= MAX_BACKLOG {
            self.state.dropped.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        self.state.queued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send(message)
            .map_err(|_| Error::Closed("the event publisher"))
    }

    /// Wait until every message handed over before this call was written or given up.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let target = self.state.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.progress.notified();
            let done = self.state.done.load(Ordering::Acquire);
            if done >= target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let reason = self
                    .state
                    .last_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default()
                    .unwrap_or_else(|| "no reply".into());
                return Err(Error::Connection(format!(
                    "{} event(s) not yet written to {} after {:.1}s: {reason}",
                    target - done,
                    self.masked,
                    timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Messages given up (connection down, backlog full) so far.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.state.closed.store(true, Ordering::Release);
    }
}

async fn io_loop(link: FanoutLink, mut rx: mpsc::UnboundedReceiver<Broadcast>, state: Arc<State>) {
    const MAX_BATCH: usize = 1024;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let count = batch.len() as u64;
        let mut attempt = 0;
        loop {
            match link.publish(&batch).await {
                Ok(_) => break,
                Err(err) => {
                    state.fail(err.to_string());
                    attempt += 1;
                    if attempt >= ATTEMPTS {
                        state.dropped.fetch_add(count, Ordering::AcqRel);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        batch.clear();
        state.done.fetch_add(count, Ordering::AcqRel);
        state.progress.notify_waiters();
    }
    link.close().await;
}
