//! `Backend`: the result store (`crate::backend`: Redis, SQLite or rpc, chosen by the
//! URL's scheme) seen from Python.
//!
//! Encoding happens here, in the calling thread (the meta is a Python mapping); the
//! bytes go to the store's writer. Every call that waits on the network releases the
//! GIL. `wait` waits in short slices and checks for signals between them, so Ctrl-C
//! raises `KeyboardInterrupt` promptly.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMapping, PyString};

use super::codec;
use super::exceptions::{ContentDisallowed, DecodeError, TimeoutError};
use super::serializers;
use crate::backend::redis::PendingPart;
use crate::backend::{Backend as AnyBackend, BackendOptions, READY_STATES};
use crate::broker::redis::sentinel::SentinelOptions;
use crate::protocol::compression::{self, Compression};
use crate::protocol::content::Serializer;

/// How long `wait` stays detached from the interpreter before checking for signals.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// The result store: `redis://` (`celery-task-meta-<id>` keys and pub/sub) or
/// `sqlite://` (a `results` table in the embedded database file) or `rpc://` (messages
/// to each client's reply queue on the AMQP broker `broker_url`).
#[pyclass(module = "celeriac._core", name = "Backend", frozen)]
pub struct Backend {
    inner: AnyBackend,
    format: ResultFormat,
}

/// How results are written and read: `result_serializer`, `result_compression`,
/// and whether `result_accept_content` lets this store decode what it reads.
struct ResultFormat {
    serializer: Serializer,
    compression: Option<Compression>,
    /// Why results cannot be decoded (the serializer is not accepted), if so.
    refused: Option<String>,
}

impl ResultFormat {
    fn encode(&self, meta: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
        let payload = match self.serializer {
            Serializer::Json => codec::dumps(meta)?,
            other => serializers::dumps(other, meta)?,
        };
        match self.compression {
            Some(method) => Ok(compression::compress_result(method, &payload)?),
            None => Ok(payload),
        }
    }

    fn decode<'py>(
        &self,
        py: Python<'py>,
        task_id: &str,
        stored: &[u8],
    ) -> PyResult<Bound<'py, PyAny>> {
        if let Some(reason) = &self.refused {
            return Err(ContentDisallowed::new_err(reason.clone()));
        }
        let payload = compression::decompress_result(stored)?;
        let meta = match self.serializer {
            Serializer::Json => codec::loads(py, &payload)?,
            other => serializers::loads(py, other, &payload).map_err(|err| {
                DecodeError::new_err(format!(
                    "the stored result of task {task_id:?} is not valid {}: {}",
                    other.name(),
                    serializers::describe(py, &err)
                ))
            })?,
        };
        if meta.cast::<PyDict>().is_err() {
            return Err(DecodeError::new_err(format!(
                "the stored result of task {task_id:?} is not a {} object",
                self.serializer.name()
            )));
        }
        Ok(meta)
    }
}

/// Whether a decoded meta has a ready state.
fn is_ready_meta(meta: &Bound<'_, PyAny>) -> bool {
    let status = meta.get_item("status").ok();
    let status = status.as_ref().and_then(|s| s.extract::<String>().ok());
    status.is_some_and(|status| READY_STATES.contains(&status.as_str()))
}

#[pymethods]
impl Backend {
    #[new]
    #[pyo3(signature = (
        url,
        *,
        expires = Some(86400.0),
        key_prefix = String::from(crate::backend::redis::DEFAULT_KEY_PREFIX),
        transport_options = None,
        connect_timeout = 4.0,
        broker_url = None,
        reply_to = String::new(),
        persistent = false,
        serializer = "json",
        compression = None,
        accept_content = None,
        ssl = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: &str,
        expires: Option<f64>,
        key_prefix: String,
        transport_options: Option<&Bound<'_, PyAny>>,
        connect_timeout: f64,
        broker_url: Option<String>,
        reply_to: String,
        persistent: bool,
        serializer: &str,
        compression: Option<&str>,
        accept_content: Option<Vec<String>>,
        ssl: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let serializer = Serializer::parse(serializer)?;
        let redis_tls = super::options::redis_tls("redis_backend_use_ssl", ssl)?;
        let is_rpc = url
            .get(..6)
            .is_some_and(|head| head.eq_ignore_ascii_case("rpc://"));
        let format = ResultFormat {
            serializer,
            // As in Celery, rpc:// results are never compressed (each is a message).
            compression: match compression.filter(|name| !name.is_empty()) {
                Some(name) if !is_rpc => Some(Compression::parse(name)?),
                _ => None,
            },
            refused: refused(serializer, accept_content)?,
        };
        let expires = match expires {
            None => None,
            Some(secs) => Some(duration("expires", secs)?),
        };
        let connect_timeout = duration("connect_timeout", connect_timeout)?;
        if connect_timeout.is_zero() {
            return Err(PyValueError::new_err("connect_timeout must be positive"));
        }
        // rpc:// results travel on the broker: its transport options (TLS, heartbeat).
        let broker_transport = match transport_options {
            Some(given) if broker_url.is_some() => {
                super::options::transport_options(Some(given.cast::<PyDict>()?), 4.0)?.extra
            }
            _ => serde_json::Map::new(),
        };
        // sentinel:// results: the sentinel options (master_name, sentinel_kwargs).
        let sentinel = match transport_options {
            Some(given) if is_sentinel(url) => SentinelOptions::from_transport(
                &super::options::transport_options(Some(given.cast::<PyDict>()?), 4.0)?.extra,
            )?,
            _ => SentinelOptions::default(),
        };
        let options = BackendOptions {
            sentinel,
            broker_transport,
            expires,
            key_prefix,
            global_keyprefix: global_keyprefix(transport_options)?,
            connect_timeout,
            busy_timeout: seconds_option(transport_options, "busy_timeout")?,
            polling_interval: seconds_option(transport_options, "polling_interval")?,
            broker_url,
            reply_to,
            persistent,
            serializer,
            redis_tls,
        };
        let inner = py.detach(|| AnyBackend::connect(url, options))?;
        Ok(Self { inner, format })
    }

    /// Write ``meta`` (encoded by ``dumps``) with SETEX + PUBLISH; asynchronous and
    /// pipelined. ``TypeError`` if meta cannot be encoded.
    /// ``rpc://``: published to ``reply_to`` (nothing is sent when it is empty or None)
    /// with ``correlation_id`` (default: the task id); the other stores ignore both.
    #[pyo3(signature = (task_id, meta, *, reply_to = None, correlation_id = None))]
    fn store(
        &self,
        task_id: &str,
        meta: &Bound<'_, PyAny>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> PyResult<()> {
        if meta.cast::<PyMapping>().is_err() {
            return Err(PyTypeError::new_err(format!(
                "meta must be a mapping, not {}",
                meta.get_type().name()?
            )));
        }
        let payload = self.format.encode(meta)?;
        Ok(self
            .inner
            .store_for(task_id, payload, reply_to, correlation_id)?)
    }

    /// The stored meta, or None when there is none (PENDING).
    fn get_meta<'py>(&self, py: Python<'py>, task_id: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        match py.detach(|| self.inner.get(task_id))? {
            Some(stored) => self.format.decode(py, task_id, &stored).map(Some),
            None => Ok(None),
        }
    }

    /// Block (GIL released, Ctrl-C honoured) until the task's meta has a ready state
    /// and return it. Raises ``TimeoutError`` after ``timeout`` seconds.
    #[pyo3(signature = (task_id, timeout))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        task_id: &str,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let deadline = match timeout {
            None => None,
            Some(secs) => Some(Instant::now() + duration("timeout", secs.max(0.0))?),
        };
        crate::trace::hop("result.wait");
        let mut waiter = py.detach(|| self.inner.watch(task_id))?;
        loop {
            let slice_end = Instant::now() + WAIT_SLICE;
            let until = deadline.map_or(slice_end, |deadline| deadline.min(slice_end));
            if let Some(stored) = py.detach(|| waiter.wait_until(until))? {
                crate::trace::hop("result.woken");
                let meta = self.format.decode(py, task_id, &stored)?;
                // The stores read the state of JSON only and hand anything else over:
                // an unready one means waiting on, after a pause (some stores would
                // hand the same one back at once).
                if self.format.serializer == Serializer::Json || is_ready_meta(&meta) {
                    return Ok(meta);
                }
                py.detach(|| std::thread::sleep(WAIT_SLICE));
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(TimeoutError::new_err("The operation timed out."));
            }
            py.check_signals()?;
        }
    }

    /// Delete the task's meta.
    /// Chord join (Redis and SQLite; ``NotImplementedError`` on rpc://): the header size,
    /// written by the client before the last header message.
    fn chord_set_size(
        &self,
        py: Python<'_>,
        group_id: &str,
        size: u64,
        expires: u64,
    ) -> PyResult<()> {
        let store = self.inner.chord_store()?;
        Ok(py.detach(|| store.chord_set_size(group_id, size, expires))?)
    }

    /// Record a header task's part (``member``: the JSON of ``[1, id, state,
    /// result]``) in one script, without waiting: the part is on its way when this
    /// returns. ``ChordJoin.wait()`` gives ``(ready, total, claimed)``: ``ready`` -1
    /// when the chord is already done; ``claimed`` True for the one caller that must
    /// send the body.
    #[pyo3(signature = (group_id, task_id, index, member, expires, claim_expires, token))]
    #[allow(clippy::too_many_arguments)]
    fn chord_part_begin(
        &self,
        group_id: &str,
        task_id: &str,
        index: Option<i64>,
        member: &Bound<'_, PyAny>,
        expires: u64,
        claim_expires: u64,
        token: &str,
    ) -> PyResult<ChordJoin> {
        let store = self.inner.chord_store()?;
        let json = codec::dumps(member)?;
        let pending = store.chord_part_begin(
            group_id,
            task_id,
            index,
            &json,
            expires,
            claim_expires,
            token,
        )?;
        Ok(ChordJoin {
            pending: Mutex::new(Some(pending)),
        })
    }

    /// The header parts, decoded, in header order.
    fn chord_results<'py>(
        &self,
        py: Python<'py>,
        group_id: &str,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let store = self.inner.chord_store()?;
        let raw = py.detach(|| store.chord_results(group_id))?;
        raw.iter().map(|json| codec::loads(py, json)).collect()
    }

    fn chord_claim_extend(
        &self,
        py: Python<'_>,
        group_id: &str,
        token: &str,
        expires: u64,
    ) -> PyResult<bool> {
        let store = self.inner.chord_store()?;
        Ok(py.detach(|| store.chord_claim_extend(group_id, token, expires))?)
    }

    fn chord_cleanup(
        &self,
        py: Python<'_>,
        group_id: &str,
        token: &str,
        done_expires: u64,
    ) -> PyResult<bool> {
        let store = self.inner.chord_store()?;
        Ok(py.detach(|| store.chord_cleanup(group_id, token, done_expires))?)
    }

    fn chord_drop_size(&self, py: Python<'_>, group_id: &str) -> PyResult<()> {
        let store = self.inner.chord_store()?;
        Ok(py.detach(|| store.chord_drop_size(group_id))?)
    }

    fn forget(&self, py: Python<'_>, task_id: &str) -> PyResult<()> {
        Ok(py.detach(|| self.inner.forget(task_id))?)
    }

    /// Wait until everything stored so far is written. ``OperationalError`` when it
    /// could not be written within ``timeout`` seconds.
    #[pyo3(signature = (timeout = 10.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = duration("timeout", timeout)?;
        Ok(py.detach(|| self.inner.flush(timeout))?)
    }

    /// Write what is pending, then release the connections. Later calls raise
    /// ``OperationalError``; closing twice does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.close())?)
    }

    fn __repr__(&self) -> String {
        format!("<Backend {}>", self.inner.masked_url())
    }
}

/// Seconds from Python as a `Duration`; negative or NaN is a `ValueError`.
fn duration(name: &str, secs: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be a non-negative number of seconds, not {secs}"
        ))
    })
}

/// `transport_options["global_keyprefix"]`, if any.
fn global_keyprefix(transport_options: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    let Some(options) = transport_options.filter(|options| !options.is_none()) else {
        return Ok(None);
    };
    let value = options.call_method1("get", ("global_keyprefix",))?;
    if value.is_none() {
        return Ok(None);
    }
    match value.cast::<PyString>() {
        Ok(text) => Ok(Some(text.to_str()?.to_owned())),
        Err(_) => Err(PyTypeError::new_err(format!(
            "transport_options['global_keyprefix'] must be a str, not {}",
            value.get_type().name()?
        ))),
    }
}

fn is_sentinel(url: &str) -> bool {
    url.get(..11)
        .is_some_and(|head| head.eq_ignore_ascii_case("sentinel://"))
}

/// `transport_options[name]` as seconds, if given.
fn seconds_option(
    transport_options: Option<&Bound<'_, PyAny>>,
    name: &str,
) -> PyResult<Option<Duration>> {
    let Some(options) = transport_options.filter(|options| !options.is_none()) else {
        return Ok(None);
    };
    let value = options.call_method1("get", (name,))?;
    if value.is_none() {
        return Ok(None);
    }
    let secs: f64 = value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "transport_options[{name:?}] must be a number of seconds"
        ))
    })?;
    duration(&format!("transport_options[{name:?}]"), secs).map(Some)
}

/// Why `serializer`'s results may not be decoded under `accept_content`
/// (`result_accept_content`, else `accept_content`), or None when they may.
fn refused(
    serializer: Serializer,
    accept_content: Option<Vec<String>>,
) -> PyResult<Option<String>> {
    let Some(accepted) = accept_content else {
        return Ok(None);
    };
    let mut names = Vec::with_capacity(accepted.len());
    for name in &accepted {
        let known = Serializer::from_name(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "result_accept_content: unknown serializer {name:?}: use json, pickle, \
                 msgpack, yaml or their content types"
            ))
        })?;
        if known == serializer {
            return Ok(None);
        }
        names.push(format!("{:?}", known.name()));
    }
    Ok(Some(format!(
        "refusing to decode results in {:?} ({}): it is not in result_accept_content [{}]",
        serializer.name(),
        serializer.content_type(),
        names.join(", ")
    )))
}

/// One chord header part sent by ``Backend.chord_part_begin``, its reply not read yet.
#[pyclass(module = "celeriac._core", name = "ChordJoin", frozen)]
pub struct ChordJoin {
    pending: Mutex<Option<PendingPart>>,
}

#[pymethods]
impl ChordJoin {
    /// Whether ``wait`` would return at once.
    fn ready(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_none_or(PendingPart::is_ready)
    }

    /// ``(ready, total, claimed)`` of the part; blocks (GIL released) until the store
    /// answered. Once only.
    fn wait(&self, py: Python<'_>) -> PyResult<(i64, i64, bool)> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .ok_or_else(|| PyValueError::new_err("this chord part was waited for already"))?;
        let part = py.detach(|| pending.wait())?;
        Ok((part.ready, part.total, part.claimed))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChordJoin>()?;
    m.add_class::<Backend>()
}
