//! `Consumer` and `Delivery`: messages fetched by the broker's I/O task, decoded into
//! Python objects in batches, one GIL crossing per batch.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use tokio::sync::mpsc;

use super::codec::loads;
use super::exceptions::OperationalError;
use super::options;
use super::producer::duration;
use super::serializers;
use crate::broker::url::BrokerUrl;
use crate::broker::{Consumer as AnyConsumer, Fetched, IncomingMessage};
use crate::error::Error;
use crate::protocol::compression::{self, Compression};
use crate::protocol::content::Serializer;
use crate::protocol::v1::{self, HeaderValue, V1Value};
use crate::runtime;

/// How long the GIL stays released before we look for Ctrl-C.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

#[pyclass(module = "celeriac._core", frozen)]
pub struct Consumer {
    inner: AnyConsumer,
    deliveries: Mutex<Inbox>,
    /// `accept_content`: a message in any other format is refused undecoded.
    accept: Accept,
}

/// What the transport handed over and `fetch` has not returned yet.
struct Inbox {
    receiver: mpsc::UnboundedReceiver<Fetched>,
    /// Received after a connection error in the same batch: the error is reported
    /// first, on its own, and these (messages of the new connection, already counted
    /// in the window and unacked) come with the next fetch; dropping them would leave
    /// them unacked and never run until the worker restarts.
    held: VecDeque<Fetched>,
}

/// The formats a consumer decodes, and how to name them in a refusal.
pub(crate) struct Accept {
    serializers: Vec<Serializer>,
    described: String,
}

impl Accept {
    pub(crate) fn new(names: Option<Vec<String>>) -> PyResult<Self> {
        let names = names.unwrap_or_else(|| vec!["json".to_owned()]);
        let mut serializers = Vec::with_capacity(names.len());
        for name in &names {
            let serializer = Serializer::from_name(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "accept_content: unknown serializer {name:?}: use json, pickle, msgpack, \
                     yaml or their content types"
                ))
            })?;
            if !serializers.contains(&serializer) {
                serializers.push(serializer);
            }
        }
        let described = serializers
            .iter()
            .map(|s| format!("{:?}", s.name()))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self {
            serializers,
            described: format!("[{described}]"),
        })
    }
}

#[pymethods]
impl Consumer {
    #[new]
    #[pyo3(signature = (url, queues, *, prefetch_count, transport_options = None, connect_timeout = 4.0, accept_content = None))]
    fn new(
        py: Python<'_>,
        url: &str,
        queues: Vec<String>,
        prefetch_count: usize,
        transport_options: Option<&Bound<'_, PyDict>>,
        connect_timeout: f64,
        accept_content: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let accept = Accept::new(accept_content)?;
        let parsed = BrokerUrl::parse(url)?;
        let options = options::transport_options(transport_options, connect_timeout)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = py.detach(|| {
            runtime::handle().block_on(AnyConsumer::connect(
                &parsed,
                &queues,
                prefetch_count,
                &options,
                tx,
            ))
        })?;
        Ok(Self {
            inner,
            deliveries: Mutex::new(Inbox {
                receiver: rx,
                held: VecDeque::new(),
            }),
            accept,
        })
    }

    fn fetch(&self, py: Python<'_>, max_count: usize, timeout: f64) -> PyResult<Vec<Delivery>> {
        crate::trace::hop("consume.fetch");
        let deadline = Instant::now() + duration("timeout", timeout)?;
        let max_count = max_count.max(1);
        self.inner.release_window();
        let mut guard = self
            .deliveries
            .lock()
            .map_err(|_| OperationalError::new_err("the consumer is broken"))?;
        let inbox: &mut Inbox = &mut guard;
        let mut batch = Vec::with_capacity(max_count.min(256));
        let held = inbox.held.len().min(max_count);
        batch.extend(inbox.held.drain(..held));
        while batch.is_empty() {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_SLICE);
            let receiver = &mut inbox.receiver;
            let received = py.detach(|| {
                runtime::handle().block_on(async {
                    match tokio::time::timeout(slice, receiver.recv_many(&mut batch, max_count))
                        .await
                    {
                        Ok(0) => Err(()),
                        Ok(_) | Err(_) => Ok(()),
                    }
                })
            });
            if received.is_err() {
                return Err(Error::Closed("the consumer").into());
            }
            if !batch.is_empty() {
                crate::trace::hop("consume.handed");
                break;
            }
            py.check_signals()?;
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut items = batch.into_iter();
        while let Some(item) = items.next() {
            match item {
                Fetched::Message(Ok(message)) => {
                    deliveries.push(Delivery::decode(py, message, &self.accept)?)
                }
                Fetched::Message(Err(bad)) => {
                    let mut delivery = Delivery::empty(py, bad.delivery_tag, bad.queue);
                    delivery.error = Some(bad.reason);
                    deliveries.push(delivery);
                }
                Fetched::Error(text) => {
                    // Whatever came after the error waits for the next fetch, in order.
                    let rest: Vec<Fetched> = items.collect();
                    for later in rest.into_iter().rev() {
                        inbox.held.push_front(later);
                    }
                    if deliveries.is_empty() {
                        return Err(OperationalError::new_err(text));
                    }
                    // Hand over what came before it; the error is reported next time.
                    inbox.held.push_front(Fetched::Error(text));
                    break;
                }
            }
        }
        Ok(deliveries)
    }

    fn ack(&self, delivery_tags: Vec<String>) -> PyResult<()> {
        if !delivery_tags.is_empty() {
            self.inner.ack(delivery_tags)?;
        }
        Ok(())
    }

    fn reject(&self, delivery_tag: String, requeue: bool) -> PyResult<()> {
        Ok(self.inner.reject(delivery_tag, requeue)?)
    }

    /// Put these fetched, unacked messages back in their queue, near the front, and
    /// free their window slots, so another worker process can take them.
    fn give_back(&self, delivery_tags: Vec<String>) -> PyResult<()> {
        Ok(self.inner.give_back(delivery_tags)?)
    }

    /// Grow (`delta > 0`) or shrink the prefetch window (one slot per message held
    /// for its ETA or its rate limit). Transports without a local window ignore it.
    fn extend_window(&self, delta: i64) -> PyResult<()> {
        Ok(self.inner.extend_window(delta)?)
    }

    /// Consume from `queue` too (`add_consumer`); False when it is consumed already.
    fn add_queue(&self, py: Python<'_>, queue: &str) -> PyResult<bool> {
        Ok(py.detach(|| runtime::handle().block_on(self.inner.add_queue(queue)))?)
    }

    /// Stop consuming from `queue` (`cancel_consumer`); False when it was not.
    fn cancel_queue(&self, py: Python<'_>, queue: &str) -> PyResult<bool> {
        Ok(py.detach(|| runtime::handle().block_on(self.inner.cancel_queue(queue)))?)
    }

    fn restore_unacked(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| runtime::handle().block_on(self.inner.restore_unacked()))?)
    }

    fn close(&self) {
        self.inner.close();
    }
}

/// One message taken from a queue, decoded.
#[pyclass(module = "celeriac._core", frozen, get_all)]
pub struct Delivery {
    delivery_tag: String,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    priority: i64,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    content_type: String,
    headers: Py<PyDict>,
    task: Option<String>,
    id: Option<String>,
    args: Py<PyList>,
    kwargs: Py<PyDict>,
    embed: Py<PyDict>,
    error: Option<String>,
}

#[pymethods]
impl Delivery {
    fn __repr__(&self) -> String {
        match &self.error {
            Some(error) => format!("<Delivery {} invalid: {error}>", self.delivery_tag),
            None => format!(
                "<Delivery {}[{}]>",
                self.task.as_deref().unwrap_or("?"),
                self.id.as_deref().unwrap_or("?")
            ),
        }
    }
}

struct Decoded<'py> {
    headers: Bound<'py, PyDict>,
    args: Bound<'py, PyList>,
    kwargs: Bound<'py, PyDict>,
    embed: Bound<'py, PyDict>,
}

impl Delivery {
    fn empty(py: Python<'_>, delivery_tag: String, queue: String) -> Self {
        Delivery {
            delivery_tag,
            exchange: String::new(),
            routing_key: queue,
            redelivered: false,
            priority: 0,
            reply_to: None,
            correlation_id: None,
            content_type: String::new(),
            headers: PyDict::new(py).unbind(),
            task: None,
            id: None,
            args: PyList::empty(py).unbind(),
            kwargs: PyDict::new(py).unbind(),
            embed: PyDict::new(py).unbind(),
            error: None,
        }
    }

    /// Why the message cannot run, if it cannot.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub(crate) fn decode(
        py: Python<'_>,
        message: IncomingMessage,
        accept: &Accept,
    ) -> PyResult<Self> {
        let decoded = decode_task(py, &message, accept);
        // Move the message's strings into the delivery (no copies, and no empty
        // containers made only to be replaced).
        let IncomingMessage {
            delivery_tag,
            queue,
            exchange,
            routing_key,
            redelivered,
            priority,
            reply_to,
            correlation_id,
            content_type,
            ..
        } = message;
        let mut delivery = match decoded {
            Ok(decoded) => {
                let task = string_item(&decoded.headers, "task")?;
                let id = string_item(&decoded.headers, "id")?;
                let error = (task.is_none() || id.is_none())
                    .then(|| "the message has no task name or id in its headers".to_owned());
                Delivery {
                    delivery_tag,
                    exchange: String::new(),
                    routing_key: String::new(),
                    redelivered: false,
                    priority: 0,
                    reply_to: None,
                    correlation_id: None,
                    content_type: String::new(),
                    headers: decoded.headers.unbind(),
                    task,
                    id,
                    args: decoded.args.unbind(),
                    kwargs: decoded.kwargs.unbind(),
                    embed: decoded.embed.unbind(),
                    error,
                }
            }
            Err(reason) => {
                let mut delivery = Delivery::empty(py, delivery_tag, queue);
                delivery.error = Some(reason);
                delivery
            }
        };
        delivery.exchange = exchange;
        delivery.routing_key = routing_key;
        delivery.redelivered = redelivered;
        delivery.priority = priority;
        delivery.reply_to = reply_to;
        delivery.correlation_id = correlation_id;
        delivery.content_type = content_type.unwrap_or_else(|| "application/json".into());
        Ok(delivery)
    }
}

fn string_item(dict: &Bound<'_, PyDict>, key: &str) -> PyResult<Option<String>> {
    Ok(match dict.get_item(key)? {
        Some(value) => value.extract::<String>().ok(),
        None => None,
    })
}

/// Decode headers and body into Python objects, or say why they cannot be.
fn decode_task<'py>(
    py: Python<'py>,
    message: &IncomingMessage,
    accept: &Accept,
) -> Result<Decoded<'py>, String> {
    let content_type = message
        .content_type
        .as_deref()
        .unwrap_or("application/json");
    let serializer = Serializer::from_content_type(content_type)
        .filter(|serializer| accept.serializers.contains(serializer))
        .ok_or_else(|| {
            format!(
                "refusing content type {content_type:?}: it is not in accept_content {}",
                accept.described
            )
        })?;
    let headers = match &message.headers {
        Some(raw) => loads(py, raw.get().as_bytes())
            .map_err(|err| format!("the headers are not valid JSON: {err}"))?
            .cast_into::<PyDict>()
            .map_err(|_| "the headers are not a JSON object".to_owned())?,
        None => PyDict::new(py),
    };
    let decompressed = decompress_body(&headers, &message.body)?;
    let body = decompressed.as_deref().unwrap_or(&message.body);
    let body = match serializer {
        Serializer::Json => {
            loads(py, body).map_err(|err| format!("the body is not valid JSON: {err}"))?
        }
        other => serializers::loads(py, other, body).map_err(|err| {
            format!(
                "the body is not valid {}: {}",
                other.name(),
                serializers::describe(py, &err)
            )
        })?,
    };
    let has_task = headers.contains("task").unwrap_or(false);
    if has_task {
        decode_v2(py, headers, &body)
    } else {
        decode_v1(py, &body)
    }
}

/// The body, decompressed when the `compression` header names a method (`None`: it
/// is not compressed).
fn decompress_body(headers: &Bound<'_, PyDict>, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let named = match headers.get_item("compression") {
        Ok(Some(value)) if !value.is_none() => value,
        _ => return Ok(None),
    };
    let name: String = named
        .extract()
        .map_err(|_| "the compression header is not a string".to_owned())?;
    let method = Compression::from_name(&name).ok_or_else(|| {
        format!(
            "unknown compression {name:?} (celeriac decompresses {})",
            compression::known_names()
        )
    })?;
    method
        .decompress(body)
        .map(Some)
        .map_err(|err| err.to_string())
}

/// Protocol v2 body: `[args, kwargs, embed]` (`embed` may be missing or `{}`).
fn decode_v2<'py>(
    py: Python<'py>,
    headers: Bound<'py, PyDict>,
    body: &Bound<'py, PyAny>,
) -> Result<Decoded<'py>, String> {
    let shape = || "the body is not [args, kwargs, embed]".to_owned();
    // pickle keeps Celery's tuples: `(args, kwargs, embed)`, `args` a tuple too.
    let parts = match body.cast::<PyTuple>() {
        Ok(tuple) => tuple.to_list(),
        Err(_) => body.cast::<PyList>().map_err(|_| shape())?.clone(),
    };
    if !(2..=3).contains(&parts.len()) {
        return Err(shape());
    }
    let args = parts.get_item(0).map_err(|_| shape())?;
    let args = match args.cast::<PyTuple>() {
        Ok(tuple) => tuple.to_list(),
        Err(_) => args
            .cast_into::<PyList>()
            .map_err(|_| "the task args are not a list".to_owned())?,
    };
    let kwargs = parts.get_item(1).map_err(|_| shape())?;
    let kwargs = kwargs
        .cast_into::<PyDict>()
        .map_err(|_| "the task kwargs are not an object".to_owned())?;
    let embed = match parts.get_item(2) {
        Ok(item) if item.is_none() => PyDict::new(py),
        Ok(item) => item
            .cast_into::<PyDict>()
            .map_err(|_| "the embed part is not an object".to_owned())?,
        Err(_) => PyDict::new(py),
    };
    Ok(Decoded {
        headers,
        args,
        kwargs,
        embed,
    })
}

/// Protocol v1: everything in the body (docs/wire.md §1.6), converted by
/// `protocol::v1` to v2 headers.
fn decode_v1<'py>(py: Python<'py>, body: &Bound<'py, PyAny>) -> Result<Decoded<'py>, String> {
    let parts = v1::to_v2(&PyValue(body.clone()))?;
    let fail = |err: PyErr| err.to_string();
    let headers = PyDict::new(py);
    for (key, value) in parts.headers {
        match value {
            HeaderValue::Text(text) => headers.set_item(key, text),
            HeaderValue::Copied(value) => headers.set_item(key, value.map(|v| v.0)),
        }
        .map_err(fail)?;
    }
    let args = match parts.args {
        Some(args) => args
            .0
            .cast_into::<PyList>()
            .map_err(|_| "the task args are not a list".to_owned())?,
        None => PyList::empty(py),
    };
    let kwargs = match parts.kwargs {
        Some(kwargs) => kwargs
            .0
            .cast_into::<PyDict>()
            .map_err(|_| "the task kwargs are not an object".to_owned())?,
        None => PyDict::new(py),
    };
    let embed = PyDict::new(py);
    for (key, value) in parts.embed {
        embed.set_item(key, value.map(|v| v.0)).map_err(fail)?;
    }
    Ok(Decoded {
        headers,
        args,
        kwargs,
        embed,
    })
}

/// A decoded Python body, as `protocol::v1` reads it.
struct PyValue<'py>(Bound<'py, PyAny>);

impl V1Value for PyValue<'_> {
    fn is_null(&self) -> bool {
        self.0.is_none()
    }

    fn is_list(&self) -> bool {
        self.0.is_instance_of::<PyList>()
    }

    fn is_map(&self) -> bool {
        self.0.is_instance_of::<PyDict>()
    }

    fn get(&self, key: &str) -> Option<Self> {
        let dict = self.0.cast::<PyDict>().ok()?;
        dict.get_item(key).ok().flatten().map(PyValue)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Consumer>()?;
    m.add_class::<Delivery>()?;
    Ok(())
}
