//! The Redis result store's writer task: `store` only queues `(key, json)`; the writer
//! takes everything pending and writes it as one pipeline, one round trip per batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::connection::needs_reconnect;
use super::connection::Shared;
use super::{ATTEMPTS_WHEN_STOPPING, FIRST_RETRY, MAX_BATCH, MAX_RETRY};

pub(super) enum WriteOp {
    Store {
        key: String,
        value: Vec<u8>,
    },
    /// Answered once everything queued before it is written; carries the error
    /// replies seen since the previous flush.
    Flush(oneshot::Sender<Result<(), String>>),
    Close,
}

pub(super) async fn write_loop(shared: Arc<Shared>, mut ops: mpsc::UnboundedReceiver<WriteOp>) {
    let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
    let mut flushes = Vec::new();
    let mut refused: Option<String> = None;
    let mut closing = false;
    while !closing {
        let Some(first) = ops.recv().await else { break };
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                WriteOp::Store { key, value } => batch.push((key, value)),
                WriteOp::Flush(done) => flushes.push(done),
                WriteOp::Close => {
                    closing = true;
                    break;
                }
            }
            if batch.len() < MAX_BATCH {
                next = ops.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            crate::trace::hop("result.writing");
            if let Err(text) = write_batch(&shared, &batch).await {
                shared.note_error(&text);
                refused = Some(text);
            }
            crate::trace::hop("result.written");
            batch.clear();
        }
        if !flushes.is_empty() {
            let outcome = refused.take().map_or(Ok(()), Err);
            for done in flushes.drain(..) {
                // The flusher may have given up waiting; nothing to tell then.
                let _ = done.send(outcome.clone());
            }
        }
    }
}

/// Write one batch in one pipeline. Retries on a broken connection (forever, unless
/// the store is stopping); an error reply from Redis is returned, not retried.
async fn write_batch(shared: &Shared, batch: &[(String, Vec<u8>)]) -> Result<(), String> {
    let mut pipe = redis::pipe();
    for (key, value) in batch {
        match shared.expires {
            Some(ttl) => pipe.cmd("SETEX").arg(key).arg(ttl).arg(value).ignore(),
            None => pipe.cmd("SET").arg(key).arg(value).ignore(),
        };
        pipe.cmd("PUBLISH").arg(key).arg(value).ignore();
    }
    let mut delay = FIRST_RETRY;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let failure = match shared.connection().await {
            Ok((generation, mut conn)) => match pipe.exec_async(&mut conn).await {
                Ok(()) => return Ok(()),
                Err(err) if needs_reconnect(&err) => {
                    shared.discard(generation).await;
                    shared.lost(&err).to_string()
                }
                Err(err) => {
                    return Err(format!(
                        "the result backend {} refused a write: {err}",
                        shared.masked
                    ))
                }
            },
            Err(err) => err.to_string(),
        };
        shared.note_error(&failure);
        if shared.stopping.load(Ordering::SeqCst) && attempts >= ATTEMPTS_WHEN_STOPPING {
            return Err(failure);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}
