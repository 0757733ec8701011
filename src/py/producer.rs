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
use crate::protocol::compression::Compression;
use crate::protocol::content::Serializer;
use crate::protocol::message::{OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED};
use crate::runtime;

/// Celery truncates `argsrepr`/`kwargsrepr` to this many characters.
const REPR_MAX: usize = 1024;

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

/// What every message of one `send`/`send_many` call shares: the options applied to
/// headers and properties (the id-dependent fields are set per message by `build`).
struct Template {
    headers: TaskHeaders,
    properties: TaskProperties,
    exchange: String,
    routing_key: Option<String>,
    body_format: BodyFormat,
    compression: Option<Compression>,
    /// Whether the caller set these, else they follow the task id.
    root_id_given: bool,
    correlation_id_given: bool,
}

impl Producer {
    fn template<'py>(
        &self,
        py: Python<'py>,
        name: String,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Template> {
        let mut headers = TaskHeaders::new(name, String::new(), self.origin.clone());
        let mut properties = TaskProperties::json(String::new(), self.reply_to.clone());
        let mut exchange = String::new();
        let mut routing_key = None;
        let mut embed = Embed::default();
        let mut serializer = Serializer::Json;
        let mut compression = None;
        if let Some(options) = options {
            for (key, value) in options.iter() {
                let key = key
                    .cast_into::<PyString>()
                    .map_err(|_| PyTypeError::new_err("send() option names must be strings"))?;
                match key.to_str()? {
                    "serializer" => serializer = serializers::serializer_option(&value)?,
                    "compression" => compression = serializers::compression_option(&value)?,
                    key => apply_option(
                        key,
                        &value,
                        &mut headers,
                        &mut properties,
                        &mut exchange,
                        &mut routing_key,
                        &mut embed,
                    )?,
                }
            }
        }
        properties.content_type = serializer.content_type();
        properties.content_encoding = serializer.content_encoding();
        headers.compression = compression.map(Compression::content_type);
        let body_format = match serializer {
            Serializer::Json => {
                let mut embedded = Vec::new();
                embed.write_json(&mut embedded)?;
                BodyFormat::Json(embedded)
            }
            other => BodyFormat::Foreign(other, embed.into_dict(py)?),
        };
        Ok(Template {
            root_id_given: !headers.root_id.is_empty(),
            correlation_id_given: !properties.correlation_id.is_empty(),
            headers,
            properties,
            exchange,
            routing_key,
            body_format,
            compression,
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
        self.assemble(
            self.headers.clone(),
            self.properties.clone(),
            task_id,
            args,
            kwargs,
            queue,
        )
    }

    /// `build` for the template's only message: its headers move, not copied.
    fn into_message(
        mut self,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
    ) -> PyResult<OutgoingMessage> {
        let headers = std::mem::replace(
            &mut self.headers,
            TaskHeaders::new(String::new(), String::new(), String::new()),
        );
        let properties = std::mem::replace(
            &mut self.properties,
            TaskProperties::json(String::new(), String::new()),
        );
        self.assemble(headers, properties, task_id, args, kwargs, queue)
    }

    fn assemble(
        &self,
        mut headers: TaskHeaders,
        mut properties: TaskProperties,
        task_id: String,
        args: &Bound<'_, PyAny>,
        kwargs: &Bound<'_, PyAny>,
        queue: String,
    ) -> PyResult<OutgoingMessage> {
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
        if !self.root_id_given {
            headers.root_id.clone_from(&task_id);
        }
        if !self.correlation_id_given {
            properties.correlation_id.clone_from(&task_id);
        }
        headers.id = task_id;
        if headers.argsrepr.is_empty() {
            headers.argsrepr = truncated_repr(args)?;
        }
        if headers.kwargsrepr.is_empty() {
            headers.kwargsrepr = truncated_repr(kwargs)?;
        }
        let mut body = match &self.body_format {
            BodyFormat::Json(embed) => {
                let mut body = Vec::with_capacity(128);
                body.push(b'[');
                dumps_into(&mut body, args)?;
                body.extend_from_slice(b", ");
                dumps_into(&mut body, kwargs)?;
                body.extend_from_slice(b", ");
                body.extend_from_slice(embed);
                body.push(b']');
                body
            }
            BodyFormat::Foreign(serializer, embed) => {
                serializers::dumps_body(*serializer, args, kwargs, embed.bind(args.py()))?
            }
        };
        if let Some(method) = self.compression {
            body = method.compress(&body)?;
        }
        Ok(OutgoingMessage {
            routing_key: self.routing_key.clone().unwrap_or(queue),
            exchange: self.exchange.clone(),
            headers,
            properties,
            body,
        })
    }
}

pub(crate) fn duration(name: &str, seconds: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        PyValueError::new_err(format!("{name} must be a non-negative number of seconds"))
    })
}

fn truncated_repr(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let text = value.repr()?;
    let text = text.to_str()?;
    Ok(match text.char_indices().nth(REPR_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    })
}

/// The body's third element, as given; `None` = `null`.
#[derive(Default)]
struct Embed<'py> {
    callbacks: Option<Bound<'py, PyAny>>,
    errbacks: Option<Bound<'py, PyAny>>,
    chain: Option<Bound<'py, PyAny>>,
    chord: Option<Bound<'py, PyAny>>,
}

impl<'py> Embed<'py> {
    fn parts(&self) -> [(&'static str, &Option<Bound<'py, PyAny>>); 4] {
        [
            ("callbacks", &self.callbacks),
            ("errbacks", &self.errbacks),
            ("chain", &self.chain),
            ("chord", &self.chord),
        ]
    }

    /// For a body another serializer writes.
    fn into_dict(self, py: Python<'py>) -> PyResult<Py<PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in self.parts() {
            dict.set_item(name, value)?;
        }
        Ok(dict.unbind())
    }

    fn write_json(&self, out: &mut Vec<u8>) -> PyResult<()> {
        if self.callbacks.is_none()
            && self.errbacks.is_none()
            && self.chain.is_none()
            && self.chord.is_none()
        {
            out.extend_from_slice(EMPTY_EMBED.as_bytes());
            return Ok(());
        }
        out.push(b'{');
        for (i, (name, value)) in self.parts().iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\": ");
            match value {
                Some(value) => dumps_into(out, value)?,
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
        Ok(())
    }
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

fn apply_option<'py>(
    key: &str,
    value: &Bound<'py, PyAny>,
    headers: &mut TaskHeaders,
    properties: &mut TaskProperties,
    exchange: &mut String,
    routing_key: &mut Option<String>,
    embed: &mut Embed<'py>,
) -> PyResult<()> {
    let int = |value: &Bound<'_, PyAny>| -> PyResult<i64> {
        value
            .extract::<i64>()
            .map_err(|_| PyTypeError::new_err(format!("send() option {key:?} must be an int")))
    };
    match key {
        "eta" => headers.eta = optional_string(key, value)?,
        "expires" => headers.expires = optional_string(key, value)?,
        "expiration" => {
            properties.expiration = if value.is_none() {
                None
            } else {
                let ms: f64 = value.extract().map_err(|_| {
                    PyTypeError::new_err("send() option 'expiration' must be milliseconds")
                })?;
                Some(format!("{}", ms.max(0.0) as u64))
            }
        }
        "priority" => {
            properties.priority = if value.is_none() {
                None
            } else {
                let priority = int(value)?;
                Some(u8::try_from(priority).map_err(|_| {
                    PyValueError::new_err(format!("priority must be 0-255, not {priority}"))
                })?)
            }
        }
        "exchange" => *exchange = optional_string(key, value)?.unwrap_or_default(),
        "routing_key" => *routing_key = optional_string(key, value)?,
        "reply_to" => properties.reply_to = optional_string(key, value)?.unwrap_or_default(),
        "correlation_id" => properties.correlation_id = string(key, value)?,
        "parent_id" => headers.parent_id = optional_string(key, value)?,
        "root_id" => {
            if let Some(root) = optional_string(key, value)? {
                headers.root_id = root;
            }
        }
        "retries" => headers.retries = if value.is_none() { 0 } else { int(value)? },
        "timelimit" => {
            if !value.is_none() {
                let pair: Vec<Bound<'_, PyAny>> = value.extract().map_err(|_| {
                    PyTypeError::new_err("send() option 'timelimit' must be (hard, soft)")
                })?;
                if pair.len() != 2 {
                    return Err(PyValueError::new_err(
                        "timelimit must have two items: (hard, soft)",
                    ));
                }
                headers.timelimit = [number(key, &pair[0])?, number(key, &pair[1])?];
            }
        }
        "shadow" => headers.shadow = optional_string(key, value)?,
        "group" => headers.group = optional_string(key, value)?,
        "group_index" => {
            headers.group_index = if value.is_none() {
                None
            } else {
                Some(int(value)?)
            }
        }
        "ignore_result" => headers.ignore_result = value.is_truthy()?,
        "headers" => {
            if !value.is_none() {
                let extra = value
                    .cast::<PyDict>()
                    .map_err(|_| PyTypeError::new_err("send() option 'headers' must be a dict"))?;
                for (name, item) in extra.iter() {
                    let name: String = name
                        .extract()
                        .map_err(|_| PyTypeError::new_err("header names must be strings"))?;
                    headers.extra.push((name, raw_json(&item)?));
                }
            }
        }
        "callbacks" => embed.callbacks = given(value),
        "errbacks" => embed.errbacks = given(value),
        "chain" => embed.chain = given(value),
        "chord" => embed.chord = given(value),
        "argsrepr" => headers.argsrepr = string(key, value)?,
        "kwargsrepr" => headers.kwargsrepr = string(key, value)?,
        "delivery_mode" => {
            let mode = int(value)?;
            if !(1..=2).contains(&mode) {
                return Err(PyValueError::new_err(
                    "delivery_mode must be 1 (transient) or 2 (persistent)",
                ));
            }
            properties.delivery_mode = mode as u8;
        }
        "origin" => headers.origin = string(key, value)?,
        "stamped_headers" => {
            headers.stamped_headers = if value.is_none() {
                None
            } else {
                Some(raw_json(value)?)
            }
        }
        "stamps" => {
            headers.stamps = if value.is_none() {
                None
            } else {
                Some(raw_json(value)?)
            }
        }
        "replaced_task_nesting" => headers.replaced_task_nesting = int(value)?,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown send() option {other:?}"
            )));
        }
    }
    Ok(())
}

/// A random (version 4) UUID as text: the default task id, made for every message.
#[pyfunction]
fn uuid4() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(uuid4, m)?)?;
    m.add_class::<Producer>()
}
