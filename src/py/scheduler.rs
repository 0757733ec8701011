//! `RateLimiter`: the worker's per-task token buckets; `SharedRateLimiter`: the same,
//! shared by the processes of a prefork node; `SharedCounters`: counts those processes
//! share; `EtaSchedule`: the messages held for their ETA (`crate::scheduler`).

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, TryLockError};

use pyo3::exceptions::PyValueError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::{ffi, PyTraverseError};

use crate::scheduler::{self, RateLimits, SharedRateLimits};

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
        check_rate(rate)?;
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
    fn lock(&self) -> PyResult<MutexGuard<'_, RateLimits>> {
        lock_limits(&self.inner)
    }
}

fn lock_limits(limits: &Mutex<RateLimits>) -> PyResult<MutexGuard<'_, RateLimits>> {
    limits
        .lock()
        .map_err(|_| PyValueError::new_err("the rate limiter is broken"))
}

fn check_rate(rate: f64) -> PyResult<()> {
    if rate.is_nan() || rate < 0.0 {
        return Err(PyValueError::new_err(format!(
            "a rate limit must be a number of tasks per second >= 0, not {rate}"
        )));
    }
    Ok(())
}

/// `RateLimiter`'s interface over buckets in shared memory: made before a prefork
/// supervisor forks, every child that inherits it takes tokens from the same buckets.
///
/// Sized for `names` task names (and more); should the table ever fill, the names
/// that found no room get buckets of this process's own (`overflow`), as before.
#[pyclass(module = "celeriac._core", frozen)]
pub struct SharedRateLimiter {
    shared: SharedRateLimits,
    overflow: Mutex<RateLimits>,
}

#[pymethods]
impl SharedRateLimiter {
    #[new]
    fn new(names: usize) -> PyResult<Self> {
        Ok(Self {
            shared: SharedRateLimits::new(names)?,
            overflow: Mutex::new(RateLimits::new()),
        })
    }

    /// Limit `name` to `rate` messages per second (`0` removes the limit) for every
    /// process that shares this table.
    fn set(&self, name: &str, rate: f64) -> PyResult<()> {
        check_rate(rate)?;
        // A removal reaches the overflow buckets too: the name may have one there.
        if self.shared.set(name, rate).is_err() || rate <= 0.0 {
            lock_limits(&self.overflow)?.set(name, rate);
        }
        Ok(())
    }

    fn is_limited(&self, name: &str) -> PyResult<bool> {
        Ok(self.shared.is_limited(name) || lock_limits(&self.overflow)?.is_limited(name))
    }

    /// `0.0` when a message of `name` may start now (a token is taken), else how many
    /// seconds to wait before asking again.
    fn acquire(&self, name: &str) -> PyResult<f64> {
        if self.shared.rate(name).is_some() {
            return Ok(self.shared.acquire(name));
        }
        Ok(lock_limits(&self.overflow)?.acquire(name))
    }

    /// How many task names fit in the shared table.
    #[getter]
    fn capacity(&self) -> usize {
        self.shared.capacity()
    }
}

/// `count` integers in shared memory that a prefork node's processes add to.
#[pyclass(module = "celeriac._core", frozen)]
pub struct SharedCounters {
    inner: scheduler::SharedCounters,
}

#[pymethods]
impl SharedCounters {
    #[new]
    fn new(count: usize) -> PyResult<Self> {
        Ok(Self {
            inner: scheduler::SharedCounters::new(count)?,
        })
    }

    fn __len__(&self) -> usize {
        self.inner.count()
    }

    /// Add `delta` to counter `index` (atomically); its new value.
    #[pyo3(signature = (index, delta = 1))]
    fn add(&self, index: usize, delta: i64) -> PyResult<i64> {
        self.inner
            .add(index, delta)
            .ok_or_else(|| out_of_range(index))
    }

    fn get(&self, index: usize) -> PyResult<i64> {
        self.inner.get(index).ok_or_else(|| out_of_range(index))
    }

    fn set(&self, index: usize, value: i64) -> PyResult<()> {
        self.inner
            .set(index, value)
            .ok_or_else(|| out_of_range(index))
    }
}

fn out_of_range(index: usize) -> PyErr {
    pyo3::exceptions::PyIndexError::new_err(format!("no shared counter {index}"))
}

/// Python objects keyed by a due time (UNIX seconds), handed back once due: earliest
/// first, first pushed first among equal times.
///
/// No Python code runs while the lock is held: items are moved out (or their
/// reference counts raised) under it, and converted or dropped after.
#[pyclass(module = "celeriac._core", frozen, generic)]
pub struct EtaSchedule {
    inner: Mutex<scheduler::EtaSchedule<Py<PyAny>>>,
}

#[pymethods]
impl EtaSchedule {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(scheduler::EtaSchedule::new()),
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.lock()?.len())
    }

    /// Hold `item` until `due`; `ValueError` for a NaN or infinite time.
    fn push(&self, due: f64, item: Py<PyAny>) -> PyResult<()> {
        Ok(self.lock()?.push(due, item)?)
    }

    /// The earliest due time, or `None` when empty.
    fn next_due(&self) -> PyResult<Option<f64>> {
        Ok(self.lock()?.next_due())
    }

    /// The items due at `now` or earlier, earliest first, at most `limit`.
    #[pyo3(signature = (now, limit = None))]
    fn pop_due(&self, now: f64, limit: Option<i64>) -> PyResult<Vec<Py<PyAny>>> {
        let limit = match limit {
            None => None,
            Some(n) => Some(usize::try_from(n).map_err(|_| {
                PyValueError::new_err(format!("limit must be None or >= 0, not {n}"))
            })?),
        };
        let due = self.lock()?.pop_due(now, limit);
        Ok(due)
    }

    /// Remove and return everything still held, earliest first.
    fn clear(&self) -> PyResult<Vec<Py<PyAny>>> {
        let items = self.lock()?.drain();
        Ok(items)
    }

    /// Remove and return the items `predicate` is true for, earliest first (revoke).
    ///
    /// `predicate` runs on a snapshot with the lock released (it may use this
    /// schedule); an item another thread took meanwhile (`pop_due`) is not removed.
    /// An exception from `predicate` is raised and nothing is removed.
    fn remove(&self, py: Python<'_>, predicate: &Bound<'_, PyAny>) -> PyResult<Vec<Py<PyAny>>> {
        let snapshot: Vec<Py<PyAny>> = {
            let inner = self.lock()?;
            inner.iter().map(|item| item.clone_ref(py)).collect()
        };
        let mut chosen: HashSet<*mut ffi::PyObject> = HashSet::new();
        for item in &snapshot {
            if predicate.call1((item.bind(py),))?.is_truthy()? {
                chosen.insert(item.as_ptr());
            }
        }
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        // By identity: the snapshot keeps every chosen object alive, so no address
        // can have been reused by an item pushed meanwhile.
        let removed = self
            .lock()?
            .remove_where(|item| chosen.contains(&item.as_ptr()));
        drop(snapshot); // with the lock released: a finalizer may use this schedule
        Ok(removed)
    }

    /// Everything held, earliest first (remote control's inspect).
    fn items(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        let inner = self.lock()?;
        Ok(inner
            .sorted()
            .into_iter()
            .map(|(_, item)| item.clone_ref(py))
            .collect())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Being changed right now (by code that runs no Python): nothing to visit.
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        for item in inner.iter() {
            visit.call(item)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let items = match self.inner.lock() {
            Ok(mut inner) => inner.drain(),
            Err(poisoned) => poisoned.into_inner().drain(),
        };
        // Dropped here, with the lock released: a finalizer may use this schedule.
        drop(items);
    }
}

impl EtaSchedule {
    fn lock(&self) -> PyResult<MutexGuard<'_, scheduler::EtaSchedule<Py<PyAny>>>> {
        self.inner
            .lock()
            .map_err(|_| PyValueError::new_err("the ETA schedule is broken"))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RateLimiter>()?;
    m.add_class::<SharedRateLimiter>()?;
    m.add_class::<SharedCounters>()?;
    m.add_class::<EtaSchedule>()?;
    Ok(())
}
