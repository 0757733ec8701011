//! `Mailbox`: remote control's broadcasts and replies (Redis and AMQP; see
//! broker/pidbox.rs).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use serde_json::{Map, Value};

use super::codec::{dumps, loads};
use super::options;
use super::producer::duration;
use crate::broker::events::Broadcast;
use crate::broker::pidbox::{Mailbox as Inner, QueueTimes, Received, Subscription};
use crate::broker::url::BrokerUrl;
use crate::runtime;

#[pyclass(module = "celeriac._core", frozen)]
pub struct Mailbox {
    inner: Inner,
}

/// `(headers, body bytes)`, or `(None, reason)` for a message that cannot be read.
pub(crate) fn to_python<'py>(py: Python<'py>, message: Received) -> PyResult<Bound<'py, PyTuple>> {
    match message.and_then(|(headers, body)| Ok((headers_object(py, &headers)?, body))) {
        Ok((headers, body)) => PyTuple::new(py, [headers, PyBytes::new(py, &body).into_any()]),
        Err(reason) => PyTuple::new(
            py,
            [
                py.None().into_bound(py),
                reason.into_pyobject(py)?.into_any(),
            ],
        ),
    }
}

/// A broadcast's headers as Python objects (kombu's markers decoded), or why they
/// cannot be: a bad marker makes the message unreadable, not the receiver fail.
pub(crate) fn headers_object<'py>(
    py: Python<'py>,
    headers: &Value,
) -> Result<Bound<'py, PyAny>, String> {
    let text = serde_json::to_vec(headers).map_err(|err| err.to_string())?;
    loads(py, &text).map_err(|err| format!("unreadable headers: {err}"))
}

#[pymethods]
impl Mailbox {
    #[new]
    #[pyo3(signature = (
        url, *, transport_options = None, connect_timeout = 4.0, queue_expires = Some(10.0),
        queue_ttl = Some(300.0)
    ))]
    fn new(
        py: Python<'_>,
        url: &str,
        transport_options: Option<&Bound<'_, PyDict>>,
        connect_timeout: f64,
        queue_expires: Option<f64>,
        queue_ttl: Option<f64>,
    ) -> PyResult<Self> {
        let parsed = BrokerUrl::parse(url)?;
        let options = options::transport_options(transport_options, connect_timeout)?;
        let times = QueueTimes {
            expires: queue_expires
                .map(|s| duration("queue_expires", s))
                .transpose()?,
            message_ttl: queue_ttl.map(|s| duration("queue_ttl", s)).transpose()?,
        };
        let inner =
            py.detach(|| runtime::handle().block_on(Inner::connect(&parsed, &options, times)))?;
        Ok(Self { inner })
    }

    #[pyo3(signature = (
        exchange, queue = "", *, exchange_type = "fanout", routing_key = "", durable = false
    ))]
    fn subscribe(
        &self,
        py: Python<'_>,
        exchange: &str,
        queue: &str,
        exchange_type: &str,
        routing_key: &str,
        durable: bool,
    ) -> PyResult<()> {
        let subscription = Subscription {
            exchange,
            exchange_type,
            durable,
            queue,
            binding: routing_key,
        };
        py.detach(|| runtime::handle().block_on(self.inner.subscribe_to(&subscription)))?;
        Ok(())
    }

    #[pyo3(signature = (timeout = 1.0))]
    fn receive<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let timeout = duration("timeout", timeout)?;
        let got = py.detach(|| runtime::handle().block_on(self.inner.receive(timeout)))?;
        got.map(|message| to_python(py, message)).transpose()
    }

    #[pyo3(signature = (exchange, routing_key, body, *, headers = None, exchange_type = "direct"))]
    fn publish(
        &self,
        py: Python<'_>,
        exchange: String,
        routing_key: String,
        body: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyDict>>,
        exchange_type: &str,
    ) -> PyResult<usize> {
        let body = dumps(body)?;
        let headers: Map<String, Value> = match headers {
            Some(given) => serde_json::from_slice(&dumps(given.as_any())?)
                .map_err(|err| PyTypeError::new_err(format!("headers: {err}")))?,
            None => Map::new(),
        };
        let message = Broadcast {
            exchange,
            exchange_type: exchange_type.to_owned(),
            durable: false,
            routing_key,
            headers,
            body,
        };
        Ok(py.detach(|| runtime::handle().block_on(self.inner.publish(&message)))?)
    }

    fn bind(&self, py: Python<'_>, exchange: &str, routing_key: &str, queue: &str) -> PyResult<()> {
        py.detach(|| runtime::handle().block_on(self.inner.bind(exchange, routing_key, queue)))?;
        Ok(())
    }

    fn unbind(
        &self,
        py: Python<'_>,
        exchange: &str,
        routing_key: &str,
        queue: &str,
    ) -> PyResult<()> {
        py.detach(|| runtime::handle().block_on(self.inner.unbind(exchange, routing_key, queue)))?;
        Ok(())
    }

    #[pyo3(signature = (queue, timeout = 0.0))]
    fn pop<'py>(
        &self,
        py: Python<'py>,
        queue: &str,
        timeout: f64,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let timeout = duration("timeout", timeout)?;
        let got = py.detach(|| runtime::handle().block_on(self.inner.pop_wait(queue, timeout)))?;
        got.map(|message| to_python(py, message)).transpose()
    }

    /// Remove every waiting message of the task queue `queue`; the number removed.
    fn purge(&self, py: Python<'_>, queue: &str) -> PyResult<u64> {
        Ok(py.detach(|| runtime::handle().block_on(self.inner.purge(queue)))?)
    }

    /// Times the subscription was made again after a lost connection.
    #[getter]
    fn resubscriptions(&self) -> u64 {
        self.inner.resubscriptions()
    }

    fn close(&self, py: Python<'_>) {
        py.detach(|| runtime::handle().block_on(self.inner.close()));
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Mailbox>()?;
    Ok(())
}
