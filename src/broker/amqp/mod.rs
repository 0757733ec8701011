//! The AMQP 0-9-1 broker (RabbitMQ) through `lapin`, in Celery's topology (docs/wire.md §2).
//!
//! - Topology: a task queue `X` is declared as Celery 5.7 declares it — queue `X`
//!   (durable, not auto-delete, not exclusive, arguments from `queue_arguments`, e.g.
//!   `x-max-priority` or `x-queue-type`), exchange `X` (direct, durable) and the binding
//!   `X -> X` with key `X`. Tasks for a direct queue are published to the default
//!   exchange `''` with routing key `X`, as Celery does. Queues configured with other
//!   exchanges come from the `queues` transport option.
//! - Publishing: `publish` never waits. One I/O task per producer writes everything
//!   pending back to back on a channel in confirm mode, keeps each message in an
//!   outbox until the broker confirms it, and re-sends the outbox after a reconnect.
//!   When nothing is pending (every earlier message confirmed) and the target is
//!   declared, `publish` queues the frames on the channel itself and hands the I/O task
//!   only the confirm to track: a lone publish (a round trip's) saves a thread hop.
//!   A nack or an unroutable (returned) message is counted and reported by the next
//!   `flush`. `flush(timeout)` waits for the confirms.
//! - Consuming: one I/O task per consumer owns the connection and the channel:
//!   `basic.qos(prefetch_count)` bounds the unacked messages (the broker keeps the
//!   window), deliveries go to the consumer's channel as [`Fetched`] items, acks are
//!   batched (`multiple=true` only over tag numbers all handed over and settled, see
//!   [`TagLedger`]). After a lost connection it reconnects with back-off and goes on;
//!   the broker has requeued whatever was unacked, so tags from the old connection are
//!   ignored.
//!
//! Delivery tags handed out are `"<connection generation>.<AMQP tag>"`.

mod connection;
mod consumer;
mod delayed;
mod fanout;
mod headers;
mod options;
mod producer;
#[cfg(test)]
mod tests;
mod topology;

pub use connection::*;
pub use consumer::*;
pub use fanout::AmqpFanout;
pub use headers::*;
pub use options::*;
pub use producer::*;
pub use topology::*;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, SelectAll};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, Notify};

use super::amqp_tags::TagLedger;
use super::url::{BrokerUrl, FailoverStrategy, Scheme};
use super::{Fetched, IncomingMessage, TransportOptions};
use crate::error::{Error, Result};
use crate::protocol::delayed::LevelQueueType;
use crate::protocol::message::OutgoingMessage;
use crate::retry::backoff;

/// RabbitMQ's default `max_message_size` (128 MiB); bigger bodies are refused here
/// rather than letting the broker close the channel.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;
/// Messages written and not yet confirmed, at most; beyond this the producer stops
/// taking new messages from its queue until confirms come back.
const MAX_UNCONFIRMED: usize = 65_536;
/// Messages taken from the producer's queue per round at most.
const MAX_BATCH: usize = 4096;
/// How often the I/O tasks look at the connection's health.
const HEALTH_CHECK: Duration = Duration::from_secs(1);
