//! `BeatStore`: beat's shared state (`crate::backend::beat`) seen from Python. Every
//! call releases the GIL while it waits on the store.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::backend::beat::{BeatStore as AnyStore, Claim};
use crate::broker::redis::sentinel::SentinelOptions;

/// The last run of every entry of one schedule, in Redis or the SQLite file.
#[pyclass(module = "celeriac._core", name = "BeatStore", frozen)]
pub struct BeatStore {
    inner: AnyStore,
}

#[pymethods]
impl BeatStore {
    #[new]
    // Python keyword arguments, each one setting.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        url, namespace, *, global_keyprefix = None, timeout = 4.0, transport_options = None,
        ssl = None, ssl_setting = "redis_backend_use_ssl"
    ))]
    fn new(
        py: Python<'_>,
        url: &str,
        namespace: &str,
        global_keyprefix: Option<&str>,
        timeout: f64,
        transport_options: Option<&Bound<'_, PyDict>>,
        ssl: Option<&Bound<'_, PyAny>>,
        ssl_setting: &str,
    ) -> PyResult<Self> {
        // For a sentinel:// store: master_name and sentinel_kwargs.
        let sentinel = match transport_options {
            Some(given) => SentinelOptions::from_transport(
                &super::options::transport_options(Some(given), 4.0)?.extra,
            )?,
            None => SentinelOptions::default(),
        };
        let tls = super::options::redis_tls(ssl_setting, ssl)?;
        let timeout = Duration::try_from_secs_f64(timeout)
            .ok()
            .filter(|timeout| !timeout.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!("timeout must be positive, not {timeout}"))
            })?;
        if namespace.is_empty() {
            return Err(PyValueError::new_err("the schedule name must not be empty"));
        }
        let inner = py.detach(|| {
            AnyStore::connect_with_tls(
                url,
                namespace,
                global_keyprefix,
                timeout,
                sentinel,
                tls.as_ref(),
            )
        })?;
        Ok(Self { inner })
    }

    /// Store ``now`` as the last run of the entries not stored yet; return every
    /// entry's stored last run (microseconds since the epoch), in order.
    fn register(&self, py: Python<'_>, names: Vec<String>, now: i64) -> PyResult<Vec<i64>> {
        Ok(py.detach(|| self.inner.register(&names, now))?)
    }

    /// ``(True, None)`` when this beat moved ``name``'s last run from ``seen`` to
    /// ``run`` (it sends the run); else ``(False, stored)``: another beat did first.
    fn claim(
        &self,
        py: Python<'_>,
        name: &str,
        seen: i64,
        run: i64,
    ) -> PyResult<(bool, Option<i64>)> {
        Ok(match py.detach(|| self.inner.claim(name, seen, run))? {
            Claim::Won => (true, None),
            Claim::Lost(stored) => (false, stored),
        })
    }

    /// ``claim`` for ``[(name, seen, run), ...]`` at once; the answers in order.
    fn claim_many(
        &self,
        py: Python<'_>,
        claims: Vec<(String, i64, i64)>,
    ) -> PyResult<Vec<(bool, Option<i64>)>> {
        let answers = py.detach(|| self.inner.claim_many(&claims))?;
        Ok(answers
            .into_iter()
            .map(|claim| match claim {
                Claim::Won => (true, None),
                Claim::Lost(stored) => (false, stored),
            })
            .collect())
    }

    /// Every stored entry's name and last run.
    fn entries(&self, py: Python<'_>) -> PyResult<Vec<(String, i64)>> {
        Ok(py.detach(|| self.inner.entries())?)
    }

    /// Drop the stored entries not in ``keep``; return their names.
    fn prune(&self, py: Python<'_>, keep: Vec<String>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.prune(&keep))?)
    }

    fn __repr__(&self) -> String {
        format!("<BeatStore {}>", self.inner.masked_url())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BeatStore>()
}
