//! The serializers other than JSON (pickle, msgpack, yaml) live in Python
//! (`celeriac.serialization`, over their packages); this is the bridge the producer,
//! consumer and result store call. Compression is Rust's (`protocol::compression`).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::protocol::compression::Compression;
use crate::protocol::content::Serializer;

struct Functions {
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
    dumps_body: Py<PyAny>,
}

static FUNCTIONS: PyOnceLock<Functions> = PyOnceLock::new();

fn functions(py: Python<'_>) -> PyResult<&'static Functions> {
    FUNCTIONS.get_or_try_init(py, || {
        let module = py.import("celeriac.serialization")?;
        Ok::<_, PyErr>(Functions {
            dumps: module.getattr("dumps")?.unbind(),
            loads: module.getattr("loads")?.unbind(),
            dumps_body: module.getattr("dumps_body")?.unbind(),
        })
    })
}

fn bytes_of(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    value
        .cast::<PyBytes>()
        .map(|bytes| bytes.as_bytes().to_vec())
        .map_err(|_| PyTypeError::new_err(format!("{what} did not return bytes")))
}

/// The `serializer` send option: a name or content type; None means JSON.
pub fn serializer_option(value: &Bound<'_, PyAny>) -> PyResult<Serializer> {
    if value.is_none() {
        return Ok(Serializer::Json);
    }
    let name = value
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err("send() option 'serializer' must be a string"))?;
    Ok(Serializer::parse(name.to_str()?)?)
}

/// The `compression` send option: a kombu name or content type; None or "" means none.
pub fn compression_option(value: &Bound<'_, PyAny>) -> PyResult<Option<Compression>> {
    if value.is_none() {
        return Ok(None);
    }
    let name = value
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err("send() option 'compression' must be a string"))?;
    let name = name.to_str()?;
    if name.is_empty() {
        return Ok(None);
    }
    Ok(Some(Compression::parse(name)?))
}

/// A task body `(args, kwargs, embed)` in a serializer other than JSON.
pub fn dumps_body(
    serializer: Serializer,
    args: &Bound<'_, PyAny>,
    kwargs: &Bound<'_, PyAny>,
    embed: &Bound<'_, PyDict>,
) -> PyResult<Vec<u8>> {
    let py = args.py();
    let encoded =
        functions(py)?
            .dumps_body
            .bind(py)
            .call1((serializer.name(), args, kwargs, embed))?;
    bytes_of(&encoded, "serialization.dumps_body")
}

/// Any value in a serializer other than JSON (a result's meta).
pub fn dumps(serializer: Serializer, value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let py = value.py();
    let encoded = functions(py)?
        .dumps
        .bind(py)
        .call1((serializer.name(), value))?;
    bytes_of(&encoded, "serialization.dumps")
}

/// A decoding error for a log line or message: `Type: text` (`Type` alone when the
/// package says nothing more, as msgpack often does).
pub fn describe(py: Python<'_>, err: &PyErr) -> String {
    let name = err
        .get_type(py)
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "Exception".to_owned());
    let text = err.value(py).to_string();
    if text.is_empty() {
        name
    } else {
        format!("{name}: {text}")
    }
}

/// Bytes in a serializer other than JSON, as Python objects.
pub fn loads<'py>(
    py: Python<'py>,
    serializer: Serializer,
    data: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    functions(py)?
        .loads
        .bind(py)
        .call1((serializer.name(), PyBytes::new(py, data)))
}

/// The `compression` header value (kombu's content type) for a method name;
/// `ValueError` for a method kombu does not have.
#[pyfunction]
fn compression_content_type(name: &str) -> PyResult<&'static str> {
    Ok(Compression::parse(name)?.content_type())
}

/// `data` compressed with `method` (a kombu name or content type), in the Rust core.
#[pyfunction]
fn compress<'py>(py: Python<'py>, data: &[u8], method: &str) -> PyResult<Bound<'py, PyBytes>> {
    let method = Compression::parse(method)?;
    let packed = py.detach(|| method.compress(data))?;
    Ok(PyBytes::new(py, &packed))
}

/// `data` decompressed (`DecodeError` when it is not what `method` makes).
#[pyfunction]
fn decompress<'py>(py: Python<'py>, data: &[u8], method: &str) -> PyResult<Bound<'py, PyBytes>> {
    let method = Compression::parse(method)?;
    let plain = py.detach(|| method.decompress(data))?;
    Ok(PyBytes::new(py, &plain))
}

/// The content type of a serializer name (or content type); `ValueError` otherwise.
#[pyfunction]
fn serializer_content_type(name: &str) -> PyResult<(&'static str, &'static str)> {
    let serializer = Serializer::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown serializer {name:?}: use one of json, pickle, msgpack, yaml"
        ))
    })?;
    Ok((serializer.content_type(), serializer.content_encoding()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compression_content_type, m)?)?;
    m.add_function(wrap_pyfunction!(compress, m)?)?;
    m.add_function(wrap_pyfunction!(decompress, m)?)?;
    m.add_function(wrap_pyfunction!(serializer_content_type, m)?)?;
    Ok(())
}
