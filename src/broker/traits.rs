//! What every transport does, with one signature each: the [`Producer`] and
//! [`Consumer`] traits that Redis, SQLite and AMQP implement, and that the
//! transport-picking `broker::Producer` / `broker::Consumer` delegate to.

use std::future::Future;
use std::time::Duration;

use crate::error::Result;
use crate::protocol::message::OutgoingMessage;

/// Publishes task messages; `publish` never waits (an I/O task writes in batches).
pub trait Producer {
    /// Hand a message to the I/O task; never waits.
    fn publish(&self, message: OutgoingMessage) -> Result<()>;

    /// Wait until everything published before this call is written.
    fn flush(&self, timeout: Duration) -> impl Future<Output = Result<()>>;

    fn close(&self);
}

/// Takes messages from queues into a channel of `Fetched` items, within a prefetch
/// window, and acks them in batches.
pub trait Consumer {
    fn ack(&self, tags: Vec<String>) -> Result<()>;

    fn reject(&self, tag: String, requeue: bool) -> Result<()>;

    /// Put these fetched, unacked messages back in their queue, as close to the front
    /// as the broker allows, freeing their window slots. Unless the transport can do
    /// better, each is rejected with requeue: it goes back to its place in line.
    fn give_back(&self, tags: Vec<String>) -> Result<()> {
        tags.into_iter().try_for_each(|tag| self.reject(tag, true))
    }

    /// Grow (`delta > 0`) or shrink the prefetch window, one slot per message held for
    /// its ETA or rate limit.
    fn extend_window(&self, delta: i64) -> Result<()>;

    /// Stop fetching and give back every fetched, unacked message. Returns how many.
    fn restore_unacked(&self) -> impl Future<Output = Result<usize>>;

    /// Start consuming from `queue` too; false when it is consumed already.
    fn add_queue(&self, queue: &str) -> impl Future<Output = Result<bool>>;

    /// Stop consuming from `queue`; false when it was not consumed. Messages already
    /// fetched from it are still handed over.
    fn cancel_queue(&self, queue: &str) -> impl Future<Output = Result<bool>>;

    fn close(&self);
}
