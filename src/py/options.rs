//! Settings handed from Python to a transport.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::codec::dumps;
use super::producer::duration;
use crate::broker::TransportOptions;

/// `broker_transport_options` (any JSON-able dict) plus the connection timeout.
pub fn transport_options(
    given: Option<&Bound<'_, PyDict>>,
    connect_timeout: f64,
) -> PyResult<TransportOptions> {
    let mut options = TransportOptions {
        connect_timeout: duration("connect_timeout", connect_timeout)?,
        ..TransportOptions::default()
    };
    if let Some(given) = given {
        let json = dumps(given.as_any())?;
        options.extra = serde_json::from_slice(&json).map_err(|err| {
            PyTypeError::new_err(format!("transport options must be a JSON-able dict: {err}"))
        })?;
    }
    Ok(options)
}

/// A TLS setting for Redis (`broker_use_ssl`, `redis_backend_use_ssl`) as given from
/// Python: `None`/`False`, `True` or a dict of `ssl_*` keys.
pub fn redis_tls(
    setting: &str,
    value: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<crate::broker::redis::RedisTls>> {
    let Some(value) = value.filter(|value| !value.is_none()) else {
        return Ok(None);
    };
    let json = dumps(value)?;
    let value: serde_json::Value = serde_json::from_slice(&json)
        .map_err(|err| PyTypeError::new_err(format!("{setting} must be a dict: {err}")))?;
    Ok(crate::broker::redis::RedisTls::from_setting(
        setting, &value,
    )?)
}
