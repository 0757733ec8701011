//! The bookkeeping of a producer's I/O side, shared by the transports: how many
//! messages were handed over and how many are written, so that `flush` waits for
//! exactly what was published before it, and says why when it cannot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::{Error, Result};

#[derive(Default)]
pub struct Outbox {
    queued: AtomicU64,
    written: AtomicU64,
    progress: Notify,
    last_error: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl Outbox {
    /// Count one more message handed over; refused once closed.
    pub fn admit(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed("the producer"));
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The I/O side wrote `count` more messages.
    pub fn written(&self, count: u64) {
        self.written.fetch_add(count, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    /// Why the last write failed (reported by `flush` if it runs out of time).
    pub fn note_error(&self, text: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(text);
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Wait until every message admitted before this call is written; after `timeout`
    /// an error naming the `masked` URL and the last failure (or `idle_reason`).
    pub async fn flush(&self, timeout: Duration, masked: &str, idle_reason: &str) -> Result<()> {
        let target = self.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.progress.notified();
            let written = self.written.load(Ordering::Acquire);
            if written >= target {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let reason = self
                    .last_error
                    .lock()
                    .ok()
                    .and_then(|last| last.clone())
                    .unwrap_or_else(|| idle_reason.to_owned());
                return Err(Error::Connection(format!(
                    "{} message(s) not yet written to {masked} after {:.1}s: {reason}",
                    target - written,
                    timeout.as_secs_f64()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_waits_for_what_was_admitted_before_it() {
        let runtime = crate::runtime::handle();
        let outbox = Outbox::default();
        outbox.admit().unwrap();
        outbox.note_error("connection refused".into());
        let err = runtime
            .block_on(outbox.flush(Duration::from_millis(10), "redis://h/0", "no reply"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 message(s) not yet written to redis://h/0"),
            "{err}"
        );
        assert!(err.contains("connection refused"), "{err}");
        outbox.written(1);
        runtime
            .block_on(outbox.flush(Duration::from_millis(10), "redis://h/0", ""))
            .unwrap();
        outbox.close();
        assert!(outbox.admit().is_err());
    }
}
