//! One wait for one task's ready meta, fed by the dispatcher.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::connection::Shared;
use super::dispatcher::{Command, Event, Subscribed};
use super::CLOSED;
use crate::backend::is_ready;
use crate::error::{Error, Result};
use crate::runtime;

/// One wait for one task's ready meta. See `RedisBackend::watch`.
pub struct Waiter {
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) channel: String,
    pub(super) id: u64,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    pub(super) state: WaitState,
}

pub(super) enum WaitState {
    /// Waiting for the dispatcher to confirm the SUBSCRIBE (and read the key).
    Subscribing(oneshot::Receiver<Result<Subscribed, String>>),
    /// Subscribed; the key is still to be read.
    Reading,
    /// Read; waiting for a published update.
    Listening,
}

impl Waiter {
    /// Block until a ready meta arrives (`Some`) or `until` passes (`None`). Can be
    /// called again after `None`: nothing is lost in between.
    pub fn wait_until(&mut self, until: Instant) -> Result<Option<Vec<u8>>> {
        let until = tokio::time::Instant::from_std(until);
        runtime::handle().block_on(async {
            match tokio::time::timeout_at(until, self.next_ready()).await {
                Ok(result) => result.map(Some),
                Err(_) => Ok(None),
            }
        })
    }

    /// The next ready meta. Cancel-safe: the state only moves on after a step
    /// completes, and every step can be repeated.
    pub async fn next_ready(&mut self) -> Result<Vec<u8>> {
        loop {
            match &mut self.state {
                WaitState::Subscribing(ready) => match ready.await {
                    Ok(Ok(Subscribed::Read(meta))) => {
                        self.state = WaitState::Listening;
                        if let Some(meta) = meta.filter(|meta| is_ready(meta)) {
                            return Ok(meta);
                        }
                    }
                    Ok(Ok(Subscribed::Unread)) => self.state = WaitState::Reading,
                    Ok(Err(text)) => return Err(Error::Connection(text)),
                    Err(_) => return Err(Error::Closed(CLOSED)),
                },
                WaitState::Reading => {
                    let meta = self.shared.get_key(&self.channel).await?;
                    self.state = WaitState::Listening;
                    if let Some(meta) = meta.filter(|meta| is_ready(meta)) {
                        return Ok(meta);
                    }
                }
                WaitState::Listening => match self.events.recv().await {
                    Some(Event::Meta(meta)) if is_ready(&meta) => return Ok(meta),
                    Some(Event::Meta(_)) => {}
                    Some(Event::Failed(text)) => return Err(Error::Connection(text)),
                    None => return Err(Error::Closed(CLOSED)),
                },
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // The dispatcher may be gone (store closed); then there is nothing to undo.
        let _ = self.commands.send(Command::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            id: self.id,
        });
    }
}
