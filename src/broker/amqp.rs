//! The AMQP 0-9-1 broker (RabbitMQ) through `lapin`, in Celery's topology (celery-wire §2).
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
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
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
use super::url::{BrokerUrl, Scheme};
use super::{Fetched, IncomingMessage, TransportOptions};
use crate::error::{Error, Result};
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

// ---------------------------------------------------------------------------------
// Options and topology

/// How one queue is declared: Celery's `Queue(name, Exchange(exchange, type),
/// routing_key, durable, auto_delete, exclusive, queue_arguments)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    /// `''` means the default exchange: nothing to declare or bind.
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: Map<String, Value>,
    pub exchange_durable: bool,
    pub exchange_auto_delete: bool,
}

impl QueueSpec {
    /// The queue Celery creates for a name it does not know (and its default queue):
    /// queue, direct exchange and routing key all named `name`, durable.
    pub fn celery(name: &str, arguments: Map<String, Value>) -> Self {
        Self {
            name: name.to_owned(),
            exchange: name.to_owned(),
            exchange_type: "direct".to_owned(),
            routing_key: name.to_owned(),
            durable: true,
            auto_delete: false,
            exclusive: false,
            arguments,
            exchange_durable: true,
            exchange_auto_delete: false,
        }
    }

    /// Celery 5.7's rpc reply queue: on the default exchange, durable, auto-delete,
    /// `x-expires` = `result_expires` in milliseconds.
    pub fn rpc_reply(name: &str, expires: Option<Duration>) -> Self {
        let mut arguments = Map::new();
        if let Some(expires) = expires.filter(|e| !e.is_zero()) {
            arguments.insert(
                "x-expires".into(),
                Value::from(expires.as_millis().min(i64::MAX as u128) as i64),
            );
        }
        Self {
            name: name.to_owned(),
            exchange: String::new(),
            exchange_type: "direct".to_owned(),
            routing_key: name.to_owned(),
            durable: true,
            auto_delete: true,
            exclusive: false,
            arguments,
            exchange_durable: true,
            exchange_auto_delete: false,
        }
    }

    fn is_quorum(&self) -> bool {
        self.arguments.get("x-queue-type").and_then(Value::as_str) == Some("quorum")
    }
}

/// What this transport reads from `broker_transport_options` (plus the common
/// settings). celeriac's own keys, set by the Python side:
///
/// - `heartbeat` (seconds, `broker_heartbeat`; 0 = none; absent = the server's),
/// - `queue_arguments` (dict): arguments of every queue declared without a spec of its
///   own — `{"x-max-priority": N}` for `task_queue_max_priority`,
///   `{"x-queue-type": "quorum"}` for quorum queues,
/// - `queues` (dict name -> {`exchange`, `exchange_type`, `routing_key`, `durable`,
///   `auto_delete`, `exclusive`, `queue_arguments`}): `task_queues`,
/// - `qos_global` (bool): force `basic.qos`'s global flag,
/// - `max_message_size` (bytes),
/// - `ssl`: `broker_use_ssl` — `true` (TLS, the system's root certificates) or a
///   dict of `ca_certs`, `certfile`, `keyfile` (PEM file paths) and `cert_reqs`
///   (`"required"`, `"optional"`, `"none"`; see [`TlsSettings`]).
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub connect_timeout: Duration,
    pub heartbeat: Option<u16>,
    pub queue_arguments: Map<String, Value>,
    pub queues: HashMap<String, QueueSpec>,
    pub qos_global: Option<bool>,
    pub max_message_size: usize,
    /// Shown in RabbitMQ's connection list (default: `celeriac <role> (pid N)`).
    pub connection_name: Option<String>,
    /// TLS settings from `broker_use_ssl`; `amqps://` uses TLS without them too.
    pub tls: Option<TlsSettings>,
}

/// `broker_use_ssl`, read and checked once (the files are read when the options are,
/// so a missing file fails at start, naming the setting and the path).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSettings {
    /// Extra trusted roots (`ca_certs`) and the client certificate (`certfile` +
    /// `keyfile`), as lapin takes them. The system's roots are always trusted too.
    pub config: OwnedTLSConfig,
}

impl TlsSettings {
    /// From the `ssl` transport option: `true`, or a dict as Celery's
    /// `broker_use_ssl` (`ca_certs`, `certfile`, `keyfile`, `cert_reqs`).
    pub fn from_value(value: &Value) -> Result<Option<Self>> {
        let bad = |why: String| Error::Config(format!("broker_use_ssl: {why}"));
        let object = match value {
            Value::Null | Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return Ok(Some(Self::default())),
            Value::Object(object) => object,
            other => {
                return Err(bad(format!(
                    "must be True or a dict (ca_certs, certfile, keyfile, cert_reqs), not {other}"
                )))
            }
        };
        let path = |key: &str| -> Result<Option<String>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(path)) => Ok(Some(path.clone())),
                Some(other) => Err(bad(format!("{key} must be a file path, not {other}"))),
            }
        };
        let read = |key: &str, path: &str| -> Result<Vec<u8>> {
            std::fs::read(path).map_err(|err| bad(format!("cannot read {key} {path:?}: {err}")))
        };
        let mut settings = Self::default();
        match object.get("cert_reqs") {
            None | Some(Value::Null) => {}
            Some(Value::String(reqs)) if matches!(reqs.as_str(), "required" | "optional") => {}
            Some(Value::String(reqs)) if reqs == "none" => {
                return Err(bad(
                    "cert_reqs=CERT_NONE (no check of the server's certificate) is not \
                     supported; give the server's CA in ca_certs instead"
                        .into(),
                ))
            }
            Some(other) => {
                return Err(bad(format!(
                    "cert_reqs must be ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL or ssl.CERT_NONE, not {other}"
                )))
            }
        }
        if let Some(ca) = path("ca_certs")? {
            let pem = read("ca_certs", &ca)?;
            let text = String::from_utf8(pem)
                .ok()
                .filter(|text| text.contains("-----BEGIN CERTIFICATE-----"))
                .ok_or_else(|| bad(format!("ca_certs {ca:?} holds no PEM certificate")))?;
            settings.config.cert_chain = Some(text);
        }
        match (path("certfile")?, path("keyfile")?) {
            (None, None) => {}
            (Some(cert), key) => {
                let pem = read("certfile", &cert)?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(bad(format!("certfile {cert:?} holds no PEM certificate")));
                }
                // Python's ssl takes the key from the certificate file when no
                // keyfile is given.
                let key = match key {
                    Some(key) => read("keyfile", &key)?,
                    None => pem.clone(),
                };
                if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
                    return Err(bad("keyfile holds no PEM private key".into()));
                }
                settings.config.identity = Some(OwnedIdentity::PKCS8 { pem, key });
            }
            (None, Some(_)) => return Err(bad("keyfile is given without certfile".into())),
        }
        Ok(Some(settings))
    }
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(4),
            heartbeat: None,
            queue_arguments: Map::new(),
            queues: HashMap::new(),
            qos_global: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            connection_name: None,
            tls: None,
        }
    }
}

impl AmqpOptions {
    pub fn from_transport(given: &TransportOptions) -> Result<Self> {
        let mut options = Self {
            connect_timeout: given.connect_timeout,
            ..Self::default()
        };
        let bad = |key: &str, what: &str, value: &Value| {
            Error::Config(format!(
                "transport option {key:?} must be {what}, not {value}"
            ))
        };
        for (key, value) in &given.extra {
            match key.as_str() {
                "heartbeat" if !value.is_null() => {
                    let secs = value
                        .as_f64()
                        .filter(|s| (0.0..=65535.0).contains(s))
                        .ok_or_else(|| bad(key, "a number of seconds (0-65535)", value))?;
                    options.heartbeat = Some(secs.ceil() as u16);
                }
                "queue_arguments" if !value.is_null() => {
                    options.queue_arguments = value
                        .as_object()
                        .cloned()
                        .ok_or_else(|| bad(key, "a dict", value))?;
                }
                "queues" => {
                    let Some(queues) = value.as_object() else {
                        if value.is_null() {
                            continue;
                        }
                        return Err(bad(key, "a dict of queue name -> declaration", value));
                    };
                    for (name, spec) in queues {
                        options
                            .queues
                            .insert(name.clone(), parse_queue_spec(name, spec)?);
                    }
                }
                "qos_global" if !value.is_null() => {
                    options.qos_global =
                        Some(value.as_bool().ok_or_else(|| bad(key, "a bool", value))?);
                }
                "max_message_size" if !value.is_null() => {
                    options.max_message_size = value
                        .as_u64()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(key, "a positive number of bytes", value))?
                        as usize;
                }
                "ssl" => options.tls = TlsSettings::from_value(value)?,
                // The dict is shared with kombu's other options: ignore the rest.
                _ => {}
            }
        }
        Ok(options)
    }

    /// How `queue` is declared: its own spec, or Celery's auto-created queue.
    pub fn queue_spec(&self, queue: &str) -> QueueSpec {
        self.queues
            .get(queue)
            .cloned()
            .unwrap_or_else(|| QueueSpec::celery(queue, self.queue_arguments.clone()))
    }

    /// The queues to declare before publishing to `(exchange, routing_key)`.
    fn specs_for_target(&self, exchange: &str, routing_key: &str) -> Vec<QueueSpec> {
        if exchange.is_empty() {
            return vec![self.queue_spec(routing_key)];
        }
        let bound: Vec<QueueSpec> = self
            .queues
            .values()
            .filter(|spec| spec.exchange == exchange)
            .cloned()
            .collect();
        if !bound.is_empty() {
            bound
        } else if exchange == routing_key {
            vec![self.queue_spec(routing_key)]
        } else {
            Vec::new()
        }
    }
}

fn parse_queue_spec(name: &str, spec: &Value) -> Result<QueueSpec> {
    let bad = |what: &str| {
        Error::Config(format!(
            "transport option queues[{name:?}]: {what} (got {spec})"
        ))
    };
    let object = spec.as_object().ok_or_else(|| bad("must be a dict"))?;
    let mut out = QueueSpec::celery(name, Map::new());
    for (key, value) in object {
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("{key:?} must be a string")))
        };
        let flag = || {
            value
                .as_bool()
                .ok_or_else(|| bad(&format!("{key:?} must be a bool")))
        };
        match key.as_str() {
            "exchange" => out.exchange = text()?,
            "exchange_type" => out.exchange_type = text()?,
            "routing_key" => out.routing_key = text()?,
            "durable" => out.durable = flag()?,
            "auto_delete" => out.auto_delete = flag()?,
            "exclusive" => out.exclusive = flag()?,
            "exchange_durable" => out.exchange_durable = flag()?,
            "exchange_auto_delete" => out.exchange_auto_delete = flag()?,
            "queue_arguments" if !value.is_null() => {
                out.arguments = value
                    .as_object()
                    .cloned()
                    .ok_or_else(|| bad("\"queue_arguments\" must be a dict"))?;
            }
            _ => {}
        }
    }
    Ok(out)
}

fn short(what: &str, text: &str) -> Result<ShortString> {
    ShortString::try_new(text).map_err(|_| {
        Error::Config(format!(
            "{what} {:?}... is longer than AMQP's 255 bytes",
            text.chars().take(40).collect::<String>()
        ))
    })
}

/// An exchange type by kombu's name. kombu hands any other name to the broker as it
/// is (RabbitMQ plugins add types such as `x-delayed-message`), so it is `Custom`
/// here too; only an empty name means kombu's default, `direct`.
pub(crate) fn exchange_kind(kind: &str) -> lapin::ExchangeKind {
    match kind {
        "direct" | "" => lapin::ExchangeKind::Direct,
        "fanout" => lapin::ExchangeKind::Fanout,
        "topic" => lapin::ExchangeKind::Topic,
        "headers" => lapin::ExchangeKind::Headers,
        other => lapin::ExchangeKind::Custom(other.to_owned()),
    }
}

/// Why a declaration failed, when it was the broker refusing it (the channel is closed
/// then, the connection is fine).
fn channel_refusal(err: &lapin::Error) -> Option<AMQPSoftError> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Declare one queue, its exchange and the binding, with exactly these flags. A
/// refusal (406 PRECONDITION_FAILED: the queue exists with other flags) is returned as
/// `Ok(Err(text))`: the caller opens a new channel and checks the queue passively.
async fn declare_queue(
    channel: &Channel,
    spec: &QueueSpec,
) -> Result<std::result::Result<(), (AMQPSoftError, String)>, lapin::Error> {
    let queue_name = short("queue name", &spec.name).map_err(|e| lapin_other(&e))?;
    let arguments = json_to_field_table(&spec.arguments).map_err(|e| lapin_other(&e))?;
    let declared = channel
        .queue_declare(
            queue_name.clone(),
            QueueDeclareOptions {
                passive: false,
                durable: spec.durable,
                exclusive: spec.exclusive,
                auto_delete: spec.auto_delete,
                nowait: false,
            },
            arguments,
        )
        .await;
    if let Err(err) = declared {
        return refusal_or_error(err);
    }
    if spec.exchange.is_empty() {
        return Ok(Ok(()));
    }
    let exchange = short("exchange name", &spec.exchange).map_err(|e| lapin_other(&e))?;
    let declared = channel
        .exchange_declare(
            exchange.clone(),
            exchange_kind(&spec.exchange_type),
            ExchangeDeclareOptions {
                passive: false,
                durable: spec.exchange_durable,
                auto_delete: spec.exchange_auto_delete,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await;
    if let Err(err) = declared {
        return refusal_or_error(err);
    }
    let routing_key = short("routing key", &spec.routing_key).map_err(|e| lapin_other(&e))?;
    let bound = channel
        .queue_bind(
            queue_name,
            exchange,
            routing_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    match bound {
        Ok(()) => Ok(Ok(())),
        Err(err) => refusal_or_error(err),
    }
}

fn refusal_or_error(
    err: lapin::Error,
) -> Result<std::result::Result<(), (AMQPSoftError, String)>, lapin::Error> {
    match channel_refusal(&err) {
        Some(code) => Ok(Err((code, err.to_string()))),
        None => Err(err),
    }
}

fn lapin_other(err: &Error) -> lapin::Error {
    lapin::Error::from(std::io::Error::other(err.to_string()))
}

/// `basic.consume` of `spec`'s queue under a new consumer tag: the tag (to cancel it)
/// and its deliveries, each paired with the queue's name.
async fn consume(
    channel: &Channel,
    spec: &QueueSpec,
) -> Result<(ShortString, DeliveryStream), lapin::Error> {
    let tag = ShortString::from(format!(
        "celeriac-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let consumer = channel
        .basic_consume(
            short("queue name", &spec.name).map_err(|e| lapin_other(&e))?,
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue: Arc<str> = Arc::from(spec.name.as_str());
    let tagged: DeliveryStream = Box::pin(consumer.map(move |delivery| (queue.clone(), delivery)));
    Ok((tag, tagged))
}

async fn queue_exists(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let Ok(name) = ShortString::try_new(name) else {
        return Ok(false);
    };
    match channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(err) if channel_refusal(&err).is_some() => Ok(false),
        Err(err) => Err(err),
    }
}

async fn exchange_exists(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let Ok(name) = ShortString::try_new(name) else {
        return Ok(false);
    };
    match channel
        .exchange_declare(
            name,
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(err) if channel_refusal(&err).is_some() => Ok(false),
        Err(err) => Err(err),
    }
}

/// A declaration channel that survives the broker refusing a declaration: each
/// refusal closes the channel, so a fresh one is opened for the next step.
struct Declarer {
    channel: Option<Channel>,
}

impl Declarer {
    fn new() -> Self {
        Self { channel: None }
    }

    async fn channel(&mut self, conn: &Connection) -> Result<&Channel, lapin::Error> {
        let usable = self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !usable {
            self.channel = Some(conn.create_channel().await?);
        }
        match self.channel.as_ref() {
            Some(channel) => Ok(channel),
            None => Err(lapin_other(&Error::Closed("the declaration channel"))),
        }
    }

    /// Declare `spec`; when the broker refuses (the queue exists with other flags, as
    /// a peer declared it) fall back to using the existing queue. Returns a warning.
    async fn declare(
        &mut self,
        conn: &Connection,
        spec: &QueueSpec,
    ) -> Result<Option<String>, lapin::Error> {
        let outcome = declare_queue(self.channel(conn).await?, spec).await?;
        let Err((code, text)) = outcome else {
            return Ok(None);
        };
        let exists = queue_exists(self.channel(conn).await?, &spec.name).await?;
        Ok(Some(if exists {
            format!(
                "queue {:?} exists with other settings than ours ({code:?}: {text}); using it as it is",
                spec.name
            )
        } else {
            format!("cannot declare queue {:?}: {code:?}: {text}", spec.name)
        }))
    }

    async fn exchange_exists(
        &mut self,
        conn: &Connection,
        name: &str,
    ) -> Result<bool, lapin::Error> {
        exchange_exists(self.channel(conn).await?, name).await
    }
}

/// Declare `spec` (queue, exchange, binding) with its exact flags on a channel of its
/// own; when the broker refuses (the queue exists with other flags) the existing
/// queue is used as it is and a warning returned.
pub async fn declare(conn: &Connection, spec: &QueueSpec) -> Result<Option<String>, lapin::Error> {
    let mut declarer = Declarer::new();
    let warning = declarer.declare(conn, spec).await?;
    if let Some(channel) = declarer.channel.take() {
        let _ = channel.close(200, ShortString::from("OK")).await;
    }
    Ok(warning)
}

// ---------------------------------------------------------------------------------
// Headers: JSON <-> AMQP field tables

/// A JSON object as an AMQP field table, the way py-amqp encodes Python values:
/// `None` → void, bool, int → signed 32-bit when it fits else signed 64-bit, float →
/// double, str → long string, list → array, dict → table.
pub fn json_to_field_table(object: &Map<String, Value>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in object {
        let name = ShortString::try_new(key.as_str()).map_err(|_| {
            Error::Encode(format!(
                "header name {:?}... is longer than AMQP's 255 bytes",
                key.chars().take(40).collect::<String>()
            ))
        })?;
        table.insert(name, json_to_amqp(value)?);
    }
    Ok(table)
}

fn json_to_amqp(value: &Value) -> Result<AMQPValue> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => {
            if let Some(int) = number.as_i64() {
                match i32::try_from(int) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(int),
                }
            } else if let Some(float) = number.as_f64() {
                // Integers beyond i64 arrive as u64 (or f64): RabbitMQ has no unsigned
                // 64-bit type, so they travel as doubles.
                AMQPValue::Double(float)
            } else {
                return Err(Error::Encode(format!("{number} cannot be an AMQP header")));
            }
        }
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_bytes())),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(json_to_amqp(item)?);
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(object) => AMQPValue::FieldTable(json_to_field_table(object)?),
    })
}

/// An AMQP field table as JSON, the way py-amqp decodes it into Python values (long
/// strings as text, decimals and timestamps as numbers, byte arrays as text).
pub fn field_table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), amqp_to_json(value)))
        .collect()
}

fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(flag) => Value::Bool(*flag),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(decimal) => {
            float(f64::from(decimal.value) / 10f64.powi(i32::from(decimal.scale)))
        }
        AMQPValue::ShortString(text) => Value::String(text.as_str().to_owned()),
        AMQPValue::LongString(text) => {
            Value::String(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(bytes) => {
            Value::String(String::from_utf8_lossy(bytes.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(amqp_to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(field_table_to_json(table)),
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A message's AMQP routing and properties, ready to be written (built again from
/// the outbox for a re-send after a reconnect); the body stays in the [`Publish`].
struct Prepared {
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

fn prepare_task(message: &OutgoingMessage) -> Result<Prepared> {
    let headers = match serde_json::to_value(&message.headers)? {
        Value::Object(object) => json_to_field_table(&object)?,
        _ => return Err(Error::Encode("task headers are not an object".into())),
    };
    let props = &message.properties;
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from(props.content_type))
        .with_content_encoding(ShortString::from(props.content_encoding))
        .with_headers(headers)
        .with_delivery_mode(props.delivery_mode)
        .with_correlation_id(short("correlation_id", &props.correlation_id)?);
    if !props.reply_to.is_empty() {
        properties = properties.with_reply_to(short("reply_to", &props.reply_to)?);
    }
    if let Some(priority) = props.priority {
        properties = properties.with_priority(priority);
    }
    if let Some(expiration) = &props.expiration {
        properties = properties.with_expiration(short("expiration", expiration)?);
    }
    Ok(Prepared {
        exchange: short("exchange name", &message.exchange)?,
        routing_key: short("routing key", &message.routing_key)?,
        properties,
    })
}

/// A message that is not a task: an rpc result, for example. It is published as
/// Celery publishes results: nothing is declared for it and it is not mandatory (a
/// result for a client whose reply queue is gone is dropped by the broker).
#[derive(Debug, Clone)]
pub struct RawPublish {
    pub exchange: String,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub content_type: String,
    pub content_encoding: String,
    pub delivery_mode: u8,
    pub body: Vec<u8>,
}

fn prepare_raw(message: &RawPublish) -> Result<Prepared> {
    let mut properties = BasicProperties::default()
        .with_content_type(short("content_type", &message.content_type)?)
        .with_content_encoding(short("content_encoding", &message.content_encoding)?)
        .with_delivery_mode(message.delivery_mode)
        .with_headers(FieldTable::default())
        .with_priority(0);
    if let Some(id) = &message.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", id)?);
    }
    Ok(Prepared {
        exchange: short("exchange name", &message.exchange)?,
        routing_key: short("routing key", &message.routing_key)?,
        properties,
    })
}

// ---------------------------------------------------------------------------------
// Connecting

/// Whether the connection uses TLS: an `amqps://` URL, or `broker_use_ssl`.
pub fn uses_tls(url: &BrokerUrl, options: &AmqpOptions) -> bool {
    url.scheme == Scheme::Amqps || options.tls.is_some()
}

fn amqp_uri(url: &BrokerUrl, options: &AmqpOptions) -> AMQPUri {
    let tls = uses_tls(url, options);
    AMQPUri {
        scheme: if tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: url.username.clone().unwrap_or_else(|| "guest".into()),
                password: url.password.clone().unwrap_or_else(|| "guest".into()),
            },
            host: url.host.clone(),
            // kombu: `amqp://` with `broker_use_ssl` and no port goes to 5671.
            port: if tls && !url.port_given {
                5671
            } else {
                url.port
            },
        },
        vhost: if url.vhost.is_empty() {
            "/".to_owned()
        } else {
            url.vhost.clone()
        },
        query: AMQPQueryString {
            heartbeat: options.heartbeat,
            connection_timeout: Some(options.connect_timeout.as_millis().max(1) as u64),
            ..AMQPQueryString::default()
        },
    }
}

/// A lapin error in words a user can act on.
pub fn describe(err: &lapin::Error, url: &BrokerUrl) -> String {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return format!(
                    "the virtual host {:?} does not exist or the user may not use it ({})",
                    url.vhost,
                    amqp.get_message()
                );
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return format!(
                    "access refused: wrong user name or password, or no permission ({})",
                    amqp.get_message()
                );
            }
            _ => {}
        }
    }
    let text = err.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("ACCESS-REFUSED") {
        return format!("access refused: wrong user name or password ({text})");
    }
    tls_hint(text)
}

/// A TLS failure in words: what rustls said, and what to change.
fn tls_hint(text: String) -> String {
    let text = text
        .strip_prefix("IO error: ")
        .map_or(text.clone(), str::to_owned);
    if text.contains("invalid peer certificate") {
        format!(
            "TLS: the server's certificate is not trusted ({text}); give the CA that signed \
             it in broker_use_ssl's ca_certs"
        )
    } else if text.contains("received corrupt message") || text.contains("InvalidContentType") {
        format!("TLS: the server does not speak TLS on this port ({text})")
    } else if text.contains("peer is incompatible") || text.contains("handshake") {
        format!("TLS handshake failed ({text})")
    } else {
        text
    }
}

/// Open a connection on the current tokio runtime, bounded by the connect timeout.
pub async fn connect(url: &BrokerUrl, options: &AmqpOptions, name: &str) -> Result<Connection> {
    let masked = url.masked();
    let name = match &options.connection_name {
        Some(given) => format!("{given} {name}"),
        None => format!("celeriac {name} (pid {})", std::process::id()),
    };
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime = async_rs::Runtime::tokio_with_handle(tokio::runtime::Handle::current());
    let tls = options
        .tls
        .as_ref()
        .map(|tls| tls.config.clone())
        .unwrap_or_default();
    let attempt =
        Connection::connect_uri_with_config(amqp_uri(url, options), properties, tls, runtime);
    match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(Error::Connection(format!(
            "cannot connect to {masked}: {}",
            describe(&err, url)
        ))),
        Err(_) => Err(Error::Connection(format!(
            "cannot connect to {masked}: timed out after {:.1}s",
            options.connect_timeout.as_secs_f64()
        ))),
    }
}

/// Error text for the Python side: the worker treats "closed" as "the consumer was
/// closed on purpose", so a lost connection must not say it.
fn lost_text(masked: &str, why: &str) -> String {
    format!(
        "lost the connection to {masked}: {}; reconnecting",
        why.replace("closed", "ended").replace("Closed", "Ended")
    )
}

fn connection_alive(conn: &Connection, channel: &Channel) -> bool {
    conn.status().connected() && channel.status().connected()
}

// ---------------------------------------------------------------------------------
// Producer

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
enum ProducerCommand {
    Publish(Publish),
    /// Already written by `publish` itself (the fast path): the message, the link
    /// generation it was written on, and its confirm to wait for.
    Written(Arc<Publish>, u64, ConfirmFuture),
    Close(oneshot::Sender<()>),
}

/// What `publish` needs to write a message itself, without a hop to the I/O task,
/// when nothing else is pending: the I/O task keeps it up to date.
#[derive(Default)]
struct FastPath {
    /// The current link's generation and channel (None while down or re-sending).
    link: Option<(u64, Channel)>,
    /// Targets declared on that link (whose exchange exists).
    declared: HashSet<(String, String)>,
}

#[derive(Default)]
struct Failures {
    nacked: u64,
    returned: u64,
    unencodable: u64,
    last: Option<String>,
}

struct ProducerState {
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

type ConfirmFuture = Pin<Box<dyn Future<Output = (u64, lapin::Result<Confirmation>)> + Send>>;

struct Link {
    conn: Connection,
    channel: Channel,
    declarer: Declarer,
    /// `(exchange, routing_key)` targets declared on this connection.
    declared: HashSet<(String, String)>,
    /// Named exchanges that do not exist: publishing there would close the channel.
    missing_exchanges: HashSet<String>,
    confirms: FuturesUnordered<ConfirmFuture>,
}

/// Start writing one message: the future's first poll queues its frames and
/// registers its confirm; it ends with the broker's confirm.
fn start_publish(
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
            Ok(confirm) => (seq, confirm.await),
            Err(err) => (seq, Err(err)),
        }
    })
}

struct ProducerIo {
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
            confirms: FuturesUnordered::new(),
        };
        for spec in &self.always_declare {
            if let Some(warning) = link.declarer.declare(&link.conn, spec).await? {
                self.warn(warning);
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
            for spec in self.options.specs_for_target(&target.0, &target.1) {
                if let Some(warning) = link.declarer.declare(&link.conn, &spec).await? {
                    warnings.push(warning);
                }
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
        for ((seq, prepared), source) in heads.into_iter().zip(sources) {
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

// ---------------------------------------------------------------------------------
// Consumer

enum ConsumerCommand {
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

struct ConsumerShared {
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
fn prefetch_u16(prefetch: usize) -> u16 {
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
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(io.run(rx, deliveries));
        Ok(Self { tx, shared })
    }

    pub fn ack(&self, tags: Vec<String>) -> Result<()> {
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

type DeliveryStream = Pin<
    Box<
        dyn futures_util::Stream<Item = (Arc<str>, lapin::Result<lapin::message::Delivery>)> + Send,
    >,
>;

struct ConsumerLink {
    conn: Connection,
    channel: Channel,
    consumer_tags: Vec<ShortString>,
    stream: SelectAll<DeliveryStream>,
}

struct ConsumerIo {
    url: BrokerUrl,
    options: AmqpOptions,
    specs: Vec<QueueSpec>,
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
fn parse_tag(tag: &str) -> Option<(u64, u64)> {
    let (generation, tag) = tag.split_once('.')?;
    Some((generation.parse().ok()?, tag.parse().ok()?))
}

impl ConsumerIo {
    async fn attach(&mut self, conn: Connection) -> Result<(), lapin::Error> {
        let mut declarer = Declarer::new();
        for spec in &self.specs {
            // Refusals fall back to the existing queue; consuming tells if it is gone.
            let _ = declarer.declare(&conn, spec).await?;
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
        Ok(())
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
                    Ok(conn) => self
                        .attach(conn)
                        .await
                        .map_err(|err| describe(&err, &self.url)),
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
        let warning = declarer.declare(&link.conn, &spec).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_types_kombu_does_not_name_reach_the_broker_unchanged() {
        use lapin::ExchangeKind;
        assert_eq!(exchange_kind("topic"), ExchangeKind::Topic);
        assert_eq!(exchange_kind("fanout"), ExchangeKind::Fanout);
        assert_eq!(exchange_kind("headers"), ExchangeKind::Headers);
        assert_eq!(exchange_kind("direct"), ExchangeKind::Direct);
        assert_eq!(exchange_kind(""), ExchangeKind::Direct);
        assert_eq!(
            exchange_kind("x-delayed-message"),
            ExchangeKind::Custom("x-delayed-message".to_owned())
        );
    }

    #[test]
    fn tls_settings_are_read_from_broker_use_ssl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        assert_eq!(TlsSettings::from_value(&Value::Bool(false)).unwrap(), None);
        assert_eq!(TlsSettings::from_value(&Value::Null).unwrap(), None);
        assert_eq!(
            TlsSettings::from_value(&Value::Bool(true)).unwrap(),
            Some(TlsSettings::default())
        );
        let full = serde_json::json!({
            "ca_certs": path(&ca), "certfile": path(&ca), "keyfile": path(&key),
            "cert_reqs": "required"
        });
        let settings = TlsSettings::from_value(&full).unwrap().unwrap();
        assert!(settings
            .config
            .cert_chain
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert!(matches!(
            settings.config.identity,
            Some(OwnedIdentity::PKCS8 { .. })
        ));
        for (bad, words) in [
            (serde_json::json!("yes"), "must be True or a dict"),
            (
                serde_json::json!({"ca_certs": "/no/such.pem"}),
                "cannot read ca_certs \"/no/such.pem\"",
            ),
            (
                serde_json::json!({"ca_certs": path(&key)}),
                "holds no PEM certificate",
            ),
            (
                serde_json::json!({"certfile": path(&ca), "keyfile": path(&ca)}),
                "no PEM private key",
            ),
            (
                serde_json::json!({"keyfile": path(&key)}),
                "without certfile",
            ),
            (serde_json::json!({"cert_reqs": "none"}), "CERT_NONE"),
            (serde_json::json!({"cert_reqs": 7}), "cert_reqs must be"),
        ] {
            let err = TlsSettings::from_value(&bad).unwrap_err().to_string();
            assert!(
                err.starts_with("broker_use_ssl: ") && err.contains(words),
                "{err}"
            );
        }
        // `amqp://` with broker_use_ssl speaks TLS, on 5671 unless a port is given.
        let given = TransportOptions {
            extra: serde_json::from_value(serde_json::json!({"ssl": true})).unwrap(),
            ..TransportOptions::default()
        };
        let options = AmqpOptions::from_transport(&given).unwrap();
        let uri = amqp_uri(&BrokerUrl::parse("amqp://h//").unwrap(), &options);
        assert_eq!((uri.scheme, uri.authority.port), (AMQPScheme::AMQPS, 5671));
        let uri = amqp_uri(&BrokerUrl::parse("amqp://h:5999//").unwrap(), &options);
        assert_eq!((uri.scheme, uri.authority.port), (AMQPScheme::AMQPS, 5999));
        let plain = amqp_uri(
            &BrokerUrl::parse("amqp://h//").unwrap(),
            &AmqpOptions::default(),
        );
        assert_eq!(
            (plain.scheme, plain.authority.port),
            (AMQPScheme::AMQP, 5672)
        );
    }

    #[test]
    fn tls_failures_are_told_in_words() {
        let text = tls_hint("IO error: invalid peer certificate: UnknownIssuer".into());
        assert!(
            text.starts_with("TLS: the server's certificate is not trusted"),
            "{text}"
        );
        assert!(
            text.contains("UnknownIssuer") && text.contains("ca_certs"),
            "{text}"
        );
        assert_eq!(tls_hint("connection refused".into()), "connection refused");
    }

    #[test]
    fn tags_carry_the_connection_generation() {
        assert_eq!(parse_tag("3.17"), Some((3, 17)));
        assert_eq!(parse_tag("17"), None);
        assert_eq!(parse_tag("a.b"), None);
    }

    #[test]
    fn header_tables_round_trip() {
        let json = serde_json::json!({
            "none": null, "t": true, "f": false, "small": 7, "neg": -3,
            "big": 1_i64 << 40, "float": 1.5, "text": "héllo",
            "list": [1, "a", null, [2.5, {"k": "v"}]], "dict": {"a": {"b": [true]}},
            "timelimit": [10, null], "stamps": {}
        });
        let table = json_to_field_table(json.as_object().unwrap()).unwrap();
        assert_eq!(table.inner().get("small"), Some(&AMQPValue::LongInt(7)));
        assert_eq!(
            table.inner().get("big"),
            Some(&AMQPValue::LongLongInt(1 << 40))
        );
        assert_eq!(table.inner().get("none"), Some(&AMQPValue::Void));
        assert_eq!(Value::Object(field_table_to_json(&table)), json);
        let long = "k".repeat(300);
        let mut object = Map::new();
        object.insert(long, Value::Null);
        assert!(json_to_field_table(&object).is_err());
    }

    #[test]
    fn options_are_read_from_transport_options() {
        let mut given = TransportOptions {
            extra: serde_json::from_value(serde_json::json!({
            "heartbeat": 10,
            "queue_arguments": {"x-max-priority": 10},
            "queues": {"hi": {"exchange": "media", "exchange_type": "topic", "routing_key": "media.#"}},
            "visibility_timeout": 3600
        }))
            .unwrap(),
            ..TransportOptions::default()
        };
        let options = AmqpOptions::from_transport(&given).unwrap();
        assert_eq!(options.heartbeat, Some(10));
        let spec = options.queue_spec("other");
        assert_eq!(
            spec,
            QueueSpec::celery("other", options.queue_arguments.clone())
        );
        assert_eq!(spec.arguments["x-max-priority"], 10);
        let hi = options.queue_spec("hi");
        assert_eq!(
            (hi.exchange.as_str(), hi.exchange_type.as_str()),
            ("media", "topic")
        );
        assert_eq!(options.specs_for_target("media", "media.x"), vec![hi]);
        assert!(options.specs_for_target("nowhere", "x").is_empty());
        given.extra = serde_json::from_value(serde_json::json!({"heartbeat": "x"})).unwrap();
        assert!(AmqpOptions::from_transport(&given).is_err());
    }
}
