//! `EventPublisher`: Celery events (and other broadcasts) to a named exchange.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use serde_json::{Map, Value};

use super::codec::dumps;
use super::options;
use super::pidbox::headers_object;
use super::producer::duration;
use crate::broker::events::{Broadcast, EventPublisher as Inner, EventSubscriber};
use crate::broker::url::BrokerUrl;
use crate::runtime;

#[pyclass(module = "celeriac._core", frozen)]
pub struct EventPublisher {
    inner: Inner,
}

#[pymethods]
impl EventPublisher {
    #[new]
    #[pyo3(signature = (url, *, transport_options = None, connect_timeout = 4.0))]
    fn new(
        py: Python<'_>,
        url: &str,
        transport_options: Option<&Bound<'_, PyDict>>,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let parsed = BrokerUrl::parse(url)?;
        let options = options::transport_options(transport_options, connect_timeout)?;
        let inner = py.detach(|| runtime::handle().block_on(Inner::connect(&parsed, &options)))?;
        Ok(Self { inner })
    }

    #[pyo3(signature = (exchange, routing_key, body, *, headers = None, exchange_type = "topic", durable = true))]
    fn publish(
        &self,
        exchange: String,
        routing_key: String,
        body: &Bound<'_, PyAny>,
        headers: Option<&Bound<'_, PyDict>>,
        exchange_type: &str,
        durable: bool,
    ) -> PyResult<()> {
        let body = dumps(body)?;
        let headers: Map<String, Value> = match headers {
            Some(given) => serde_json::from_slice(&dumps(given.as_any())?)
                .map_err(|err| PyTypeError::new_err(format!("headers: {err}")))?,
            None => Map::new(),
        };
        self.inner.publish(Broadcast {
            exchange,
            exchange_type: exchange_type.to_owned(),
            durable,
            routing_key,
            headers,
            body,
        })?;
        Ok(())
    }

    #[pyo3(signature = (timeout = 10.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = duration("timeout", timeout)?;
        py.detach(|| runtime::handle().block_on(self.inner.flush(timeout)))?;
        Ok(())
    }

    #[getter]
    fn dropped(&self) -> u64 {
        self.inner.dropped()
    }

    fn close(&self) {
        self.inner.close();
    }
}

/// Reads the broadcasts of one exchange (the embedded SQLite broker).
#[pyclass(module = "celeriac._core", frozen)]
pub struct EventReceiver {
    inner: EventSubscriber,
}

#[pymethods]
impl EventReceiver {
    #[new]
    #[pyo3(signature = (url, *, exchange = "celeryev", transport_options = None, connect_timeout = 4.0))]
    fn new(
        py: Python<'_>,
        url: &str,
        exchange: &str,
        transport_options: Option<&Bound<'_, PyDict>>,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let parsed = BrokerUrl::parse(url)?;
        let options = options::transport_options(transport_options, connect_timeout)?;
        let inner = py.detach(|| {
            runtime::handle().block_on(EventSubscriber::connect(&parsed, &options, exchange))
        })?;
        Ok(Self { inner })
    }

    /// `(routing_key, headers, body bytes)`, `(routing_key, None, reason)` for a
    /// message that cannot be read, or None after `timeout` seconds.
    #[pyo3(signature = (timeout = 1.0))]
    fn receive<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let timeout = duration("timeout", timeout)?;
        let Some(got) = py.detach(|| runtime::handle().block_on(self.inner.receive(timeout)))?
        else {
            return Ok(None);
        };
        let key = got.routing_key.into_pyobject(py)?.into_any();
        let message = got
            .message
            .and_then(|(headers, body)| Ok((headers_object(py, &headers)?, body)));
        let tuple = match message {
            Ok((headers, body)) => {
                PyTuple::new(py, [key, headers, PyBytes::new(py, &body).into_any()])?
            }
            Err(reason) => PyTuple::new(
                py,
                [
                    key,
                    py.None().into_bound(py),
                    reason.into_pyobject(py)?.into_any(),
                ],
            )?,
        };
        Ok(Some(tuple))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EventPublisher>()?;
    m.add_class::<EventReceiver>()?;
    Ok(())
}
