//! `RateLimiter`: the worker's per-task token buckets (`crate::scheduler`).

use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::scheduler::RateLimits;

#[pyclass(module = "celeriac._core", frozen)]
pub struct RateLimiter {
    inner: Mutex<RateLimits>,
}

#[pymethods]
impl RateLimiter {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(RateLimits::new()),
        }
    }

    /// Limit `name` to `rate` messages per second (`0` removes the limit).
    fn set(&self, name: &str, rate: f64) -> PyResult<()> {
        if rate.is_nan() || rate < 0.0 {
            return Err(PyValueError::new_err(format!(
                "a rate limit must be a number of tasks per second >= 0, not {rate}"
            )));
        }
        self.lock()?.set(name, rate);
        Ok(())
    }

    fn is_limited(&self, name: &str) -> PyResult<bool> {
        Ok(self.lock()?.is_limited(name))
    }

    /// `0.0` when a message of `name` may start now (a token is taken), else how many
    /// seconds to wait before asking again.
    fn acquire(&self, name: &str) -> PyResult<f64> {
        Ok(self.lock()?.acquire(name))
    }
}

impl RateLimiter {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, RateLimits>> {
        self.inner
            .lock()
            .map_err(|_| PyValueError::new_err("the rate limiter is broken"))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RateLimiter>()?;
    Ok(())
}
