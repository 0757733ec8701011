//! `broker_transport_options` from Python into `RedisOptions`.
//!
//! The options dict is shared with kombu's other transports, so names we do not use
//! are ignored; names we use must have the right type.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::producer::duration;
use crate::broker::redis::RedisOptions;

pub fn redis_options(
    transport_options: Option<&Bound<'_, PyDict>>,
    connect_timeout: f64,
) -> PyResult<RedisOptions> {
    let mut options = RedisOptions {
        connect_timeout: duration("connect_timeout", connect_timeout)?,
        ..RedisOptions::default()
    };
    let Some(given) = transport_options else {
        return Ok(options);
    };
    for (key, value) in given.iter() {
        let Ok(key) = key.extract::<String>() else {
            continue;
        };
        let seconds = |value: &Bound<'_, PyAny>| -> PyResult<f64> {
            let secs: f64 = value.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "transport option {key:?} must be a number of seconds"
                ))
            })?;
            if !secs.is_finite() || secs < 0.0 {
                return Err(PyValueError::new_err(format!(
                    "transport option {key:?} must be a non-negative number of seconds, not {secs}"
                )));
            }
            Ok(secs)
        };
        let text = |value: &Bound<'_, PyAny>| -> PyResult<String> {
            value.extract().map_err(|_| {
                PyTypeError::new_err(format!("transport option {key:?} must be a string"))
            })
        };
        match key.as_str() {
            "visibility_timeout" => {
                options.visibility_timeout = duration(&key, seconds(&value)?)?;
            }
            "unacked_restore_interval" => {
                options.restore_interval = duration(&key, seconds(&value)?.max(0.1))?;
            }
            "unacked_mutex_expire" => {
                options.unacked_mutex_expire = duration(&key, seconds(&value)?)?;
            }
            "global_keyprefix" => options.global_keyprefix = text(&value)?,
            "unacked_key" => options.unacked_key = text(&value)?,
            "unacked_index_key" => options.unacked_index_key = text(&value)?,
            "unacked_mutex_key" => options.unacked_mutex_key = text(&value)?,
            _ => {}
        }
    }
    Ok(options)
}
