//! `Producer`: turns `(name, args, kwargs, options)` into a protocol v2 message and
//! hands it to the broker's I/O task. Encoding happens here, in the caller's thread,
//! so an argument that cannot be encoded raises before anything is sent.

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::value::RawValue;
use serde_json::Number;

use super::codec::{dumps, dumps_into};
use super::options;
use super::serializers;
use crate::broker::url::BrokerUrl;
use crate::broker::Producer as AnyProducer;
use crate::protocol::content::Serializer;
use crate::protocol::message::OutgoingMessage;
use crate::protocol::send::{
    json_body, truncate_repr, MessageBuilder, MessageParts, OptionName, SendOption, TaskTemplate,
    SEND_OPTIONS,
};
use crate::runtime;

#[pyclass(module = "celeriac._core", frozen)]
pub struct Producer {
    inner: AnyProducer,
    origin: String,
    reply_to: String,
}

#[pymethods]
impl Producer {
    #[new]
    #[pyo3(signature = (url, *, origin, reply_to = String::new(), transport_options = None, connect_timeout = 4.0))]
    fn new(
        py: Python<'_>,
        url: &str,
        origin: String,
        reply_to: String,
        transport_options: Option<&Bound<'_, PyDict>>,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let parsed = BrokerUrl::parse(url)?;
        let options = options::transport_options(transport_options, connect_timeout)?;
        let inner =
            py.detach(|| runtime::handle().block_on(AnyProducer::connect(&parsed, &options)))?;
        Ok(Self {
            inner,
            origin,
            reply_to,
        })
    }

    #[pyo3(signature = (name, task_id, args, kwargs, queue, options = None))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        name: String,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let template = self.template(py, name, options)?;
        let message = template.into_message(task_id, args, kwargs, queue)?;
        self.inner.publish(message)?;
        Ok(())
    }

    /// Many messages of one task in one call: each item is `(task_id, args, kwargs)`
    /// (`task_id` None: a new one) or `(task_id, args, kwargs, queue, options)` (its
    /// own route and options). Every message is encoded before any is published, so a
    /// bad item raises and nothing is sent. Returns the task ids, in order.
    #[pyo3(signature = (name, items, queue, options = None))]
    fn send_many(
        &self,
        py: Python<'_>,
        name: String,
        items: &Bound<'_, PyAny>,
        queue: String,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<String>> {
        let items = items.cast::<PyList>().map_err(|_| {
            PyTypeError::new_err(format!(
                "send_many() items must be a list, not {}",
                items
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let shared = self.template(py, name.clone(), options)?;
        let mut messages = Vec::with_capacity(items.len());
        let mut ids = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let built = (|| -> PyResult<OutgoingMessage> {
                let item = item
                    .cast::<PyTuple>()
                    .map_err(|_| PyTypeError::new_err("a send_many() item must be a tuple"))?;
                let task_id = match item.len() {
                    3 | 5 => optional_string("task_id", &item.get_item(0)?)?
                        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                    n => {
                        return Err(PyTypeError::new_err(format!(
                            "a send_many() item must have 3 or 5 parts, not {n}"
                        )))
                    }
                };
                ids.push(task_id.clone());
                let (args, kwargs) = (item.get_item(1)?, item.get_item(2)?);
                if item.len() == 3 {
                    return shared.build(task_id, &args, &kwargs, queue.clone());
                }
                let own_queue: String = item.get_item(3)?.extract().map_err(|_| {
                    PyTypeError::new_err("a send_many() item's queue must be a string")
                })?;
                let own_options = item.get_item(4)?;
                let own_options = if own_options.is_none() {
                    None
                } else {
                    Some(own_options.cast_into::<PyDict>().map_err(|_| {
                        PyTypeError::new_err("a send_many() item's options must be a dict")
                    })?)
                };
                self.template(py, name.clone(), own_options.as_ref())?
                    .build(task_id, &args, &kwargs, own_queue)
            })();
            match built {
                Ok(message) => messages.push(message),
                Err(err) => {
                    let text = format!("item {index}: {}", err.value(py));
                    let again = PyErr::from_type(err.get_type(py), text);
                    again.set_cause(py, Some(err));
                    return Err(again);
                }
            }
        }
        for message in messages {
            self.inner.publish(message)?;
        }
        Ok(ids)
    }

    #[pyo3(signature = (timeout = 10.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = duration("timeout", timeout)?;
        py.detach(|| runtime::handle().block_on(self.inner.flush(timeout)))?;
        Ok(())
    }

    fn close(&self) {
        self.inner.close();
    }
}

/// How the body is written: JSON by Rust with the embed part already encoded, or
/// another serializer by its Python package with the embed part as a dict.
enum BodyFormat {
    Json(Vec<u8>),
    Foreign(Serializer, Py<PyDict>),
}

/// What every message of one `send`/`send_many` call shares (`protocol::send`), and
/// how its bodies are written.
struct Template {
    builder: MessageBuilder,
    body_format: BodyFormat,
}

impl Producer {
    fn template<'py>(
        &self,
        py: Python<'py>,
        name: String,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Template> {
        let mut template = TaskTemplate::new(name, self.origin.clone(), self.reply_to.clone());
        if let Some(options) = options {
            for (key, value) in options.iter() {
                let key = key
                    .cast_into::<PyString>()
                    .map_err(|_| PyTypeError::new_err("send() option names must be strings"))?;
                template.apply(send_option(key.to_str()?, &value)?)?;
            }
        }
        let (builder, embed) = template.finish();
        let body_format = match builder.serializer() {
            Serializer::Json => {
                let mut embedded = Vec::new();
                embed.write_json(&mut embedded, |out, value| dumps_into(out, value))?;
                BodyFormat::Json(embedded)
            }
            other => {
                let dict = PyDict::new(py);
                for (name, value) in embed.into_parts() {
                    dict.set_item(name, value)?;
                }
                BodyFormat::Foreign(other, dict.unbind())
            }
        };
        Ok(Template {
            builder,
            body_format,
        })
    }
}

impl Template {
    /// The message for one task id and its arguments (checked and encoded here).
    fn build(
        &self,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
    ) -> PyResult<OutgoingMessage> {
        let (parts, reprs) = self.parts(task_id, args, kwargs, queue)?;
        Ok(self.builder.build(parts, reprs)?)
    }

    /// `build` for the template's only message: its headers move, not copied.
    fn into_message(
        self,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
    ) -> PyResult<OutgoingMessage> {
        let (parts, reprs) = self.parts(task_id, args, kwargs, queue)?;
        Ok(self.builder.into_message(parts, reprs)?)
    }

    /// The body and the reprs the options did not give.
    fn parts(
        &self,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
    ) -> PyResult<(MessageParts, (String, String))> {
        if !(args.is_instance_of::<PyTuple>() || args.is_instance_of::<PyList>()) {
            return Err(PyTypeError::new_err(format!(
                "task args must be a list or tuple, not {}",
                args.get_type().name()?
            )));
        }
        if !kwargs.is_instance_of::<PyDict>() {
            return Err(PyTypeError::new_err(format!(
                "task kwargs must be a dict, not {}",
                kwargs.get_type().name()?
            )));
        }
        let (wants_argsrepr, wants_kwargsrepr) = self.builder.wants_reprs();
        let reprs = (
            if wants_argsrepr {
                truncated_repr(args)?
            } else {
                String::new()
            },
            if wants_kwargsrepr {
                truncated_repr(kwargs)?
            } else {
                String::new()
            },
        );
        let body = match &self.body_format {
            BodyFormat::Json(embed) => json_body(
                |out| dumps_into(out, args),
                |out| dumps_into(out, kwargs),
                embed,
            )?,
            BodyFormat::Foreign(serializer, embed) => {
                serializers::dumps_body(*serializer, args, kwargs, embed.bind(args.py()))?
            }
        };
        let parts = MessageParts {
            task_id,
            queue,
            body,
        };
        Ok((parts, reprs))
    }
}

pub(crate) fn duration(name: &str, seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        PyValueError::new_err(format!("{name} must be a non-negative number of seconds"))
    })
}

fn truncated_repr(value: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(truncate_repr(value.repr()?.to_str()?))
}

fn given<'py>(value: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    (!value.is_none()).then(|| value.clone())
}

fn raw_json(value: &Bound<'_, PyAny>) -> PyResult<Box<RawValue>> {
    let bytes = dumps(value)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| PyValueError::new_err("encoded header is not UTF-8"))?;
    RawValue::from_string(text).map_err(|err| PyValueError::new_err(err.to_string()))
}

fn optional_string(key: &str, value: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if value.is_none() {
        return Ok(None);
    }
    value.extract::<String>().map(Some).map_err(|_| {
        PyTypeError::new_err(format!("send() option {key:?} must be a string or None"))
    })
}

fn string(key: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    value
        .extract::<String>()
        .map_err(|_| PyTypeError::new_err(format!("send() option {key:?} must be a string")))
}

fn number(key: &str, value: &Bound<'_, PyAny>) -> PyResult<Option<Number>> {
    if value.is_none() {
        return Ok(None);
    }
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<pyo3::types::PyBool>() {
        return Ok(Some(Number::from(value.extract::<i64>()?)));
    }
    if value.is_instance_of::<PyFloat>() {
        let float = value.extract::<f64>()?;
        return Number::from_f64(float)
            .map(Some)
            .ok_or_else(|| PyValueError::new_err(format!("send() option {key:?} must be finite")));
    }
    Err(PyTypeError::new_err(format!(
        "send() option {key:?} must hold numbers or None"
    )))
}

/// One `send()` option from Python, typed; the values are checked by the template.
fn send_option<'py>(
    key: &str,
    value: &Bound<'py, PyAny>,
) -> PyResult<SendOption<Bound<'py, PyAny>>> {
    let Some(name) = OptionName::parse(key) else {
        return Err(PyValueError::new_err(format!(
            "unknown send() option {key:?}"
        )));
    };
    let int = |value: &Bound<'_, PyAny>| -> PyResult<i64> {
        value
            .extract::<i64>()
            .map_err(|_| PyTypeError::new_err(format!("send() option {key:?} must be an int")))
    };
    let optional_int = |value: &Bound<'_, PyAny>| -> PyResult<Option<i64>> {
        if value.is_none() {
            Ok(None)
        } else {
            int(value).map(Some)
        }
    };
    let optional_json = |value: &Bound<'_, PyAny>| -> PyResult<Option<Box<RawValue>>> {
        if value.is_none() {
            Ok(None)
        } else {
            raw_json(value).map(Some)
        }
    };
    let text = || optional_string(key, value);
    Ok(match name {
        OptionName::Eta => SendOption::Eta(text()?),
        OptionName::Expires => SendOption::Expires(text()?),
        OptionName::Expiration => SendOption::Expiration(if value.is_none() {
            None
        } else {
            Some(value.extract().map_err(|_| {
                PyTypeError::new_err("send() option 'expiration' must be milliseconds")
            })?)
        }),
        OptionName::Priority => SendOption::Priority(optional_int(value)?),
        OptionName::Exchange => SendOption::Exchange(text()?),
        OptionName::RoutingKey => SendOption::RoutingKey(text()?),
        OptionName::ReplyTo => SendOption::ReplyTo(text()?),
        OptionName::CorrelationId => SendOption::CorrelationId(string(key, value)?),
        OptionName::ParentId => SendOption::ParentId(text()?),
        OptionName::RootId => SendOption::RootId(text()?),
        OptionName::Retries => SendOption::Retries(optional_int(value)?),
        OptionName::Timelimit => SendOption::Timelimit(if value.is_none() {
            None
        } else {
            let pair: Vec<Bound<'_, PyAny>> = value.extract().map_err(|_| {
                PyTypeError::new_err("send() option 'timelimit' must be (hard, soft)")
            })?;
            Some(
                pair.iter()
                    .map(|item| number(key, item))
                    .collect::<PyResult<_>>()?,
            )
        }),
        OptionName::Shadow => SendOption::Shadow(text()?),
        OptionName::Group => SendOption::Group(text()?),
        OptionName::GroupIndex => SendOption::GroupIndex(optional_int(value)?),
        OptionName::IgnoreResult => SendOption::IgnoreResult(value.is_truthy()?),
        OptionName::Headers => SendOption::Headers(extra_headers(value)?),
        OptionName::Callbacks => SendOption::Callbacks(given(value)),
        OptionName::Errbacks => SendOption::Errbacks(given(value)),
        OptionName::Chain => SendOption::Chain(given(value)),
        OptionName::Chord => SendOption::Chord(given(value)),
        OptionName::Argsrepr => SendOption::Argsrepr(string(key, value)?),
        OptionName::Kwargsrepr => SendOption::Kwargsrepr(string(key, value)?),
        OptionName::DeliveryMode => SendOption::DeliveryMode(int(value)?),
        OptionName::Origin => SendOption::Origin(string(key, value)?),
        OptionName::StampedHeaders => SendOption::StampedHeaders(optional_json(value)?),
        OptionName::Stamps => SendOption::Stamps(optional_json(value)?),
        OptionName::ReplacedTaskNesting => SendOption::ReplacedTaskNesting(int(value)?),
        OptionName::Serializer => SendOption::Serializer(serializers::serializer_option(value)?),
        OptionName::Compression => SendOption::Compression(serializers::compression_option(value)?),
    })
}

/// The `headers` option: a dict of extra headers, each value encoded as JSON.
fn extra_headers(value: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Box<RawValue>)>> {
    if value.is_none() {
        return Ok(Vec::new());
    }
    let extra = value
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err("send() option 'headers' must be a dict"))?;
    let mut headers = Vec::with_capacity(extra.len());
    for (name, item) in extra.iter() {
        let name: String = name
            .extract()
            .map_err(|_| PyTypeError::new_err("header names must be strings"))?;
        headers.push((name, raw_json(&item)?));
    }
    Ok(headers)
}

/// The send option names (`protocol::send::SEND_OPTIONS`), for `apply_async` to check.
fn send_options(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    PyTuple::new(py, SEND_OPTIONS)
}

/// A random (version 4) UUID as text: the default task id, made for every message.
#[pyfunction]
fn uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The routing key of Celery's native delayed delivery for a delay of `seconds`
/// (at least 1) to `routing_key`: ``ValueError`` for 0 or an empty key.
#[pyfunction]
fn delayed_routing_key(seconds: u64, routing_key: &str) -> PyResult<String> {
    Ok(crate::protocol::delayed::delayed_routing_key(
        seconds,
        routing_key,
    )?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(uuid4, m)?)?;
    m.add_function(wrap_pyfunction!(delayed_routing_key, m)?)?;
    m.add(
        "DELAYED_DELIVERY_EXCHANGE",
        crate::protocol::delayed::FIRST_EXCHANGE,
    )?;
    m.add("SEND_OPTIONS", send_options(m.py())?)?;
    m.add_class::<Producer>()
}
