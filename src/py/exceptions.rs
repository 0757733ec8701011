//! The Python exceptions the core raises, and the mapping from `Error` to them.
//! `celeriac.exceptions` re-exports these and adds the task-level ones.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyNotImplementedError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

create_exception!(
    _core,
    CeleriacError,
    PyException,
    "Base of every error celeriac raises."
);
create_exception!(
    _core,
    OperationalError,
    CeleriacError,
    "The broker or result store cannot be reached."
);
create_exception!(
    _core,
    ClosedError,
    OperationalError,
    "The producer, consumer or result store was closed (or used after a fork); unlike a \
     lost connection, retrying cannot help."
);
create_exception!(
    _core,
    TimeoutError,
    CeleriacError,
    "A wait for a result ran out of time."
);
create_exception!(
    _core,
    DecodeError,
    CeleriacError,
    "Bytes that are not a message celeriac understands."
);

create_exception!(
    _core,
    ContentDisallowed,
    DecodeError,
    "A message or result in a format not in accept_content (kombu's ContentDisallowed)."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let text = err.to_string();
        match err {
            Error::InvalidUrl(_) | Error::Config(_) => PyValueError::new_err(text),
            Error::Connection(_) | Error::Redis(_) => OperationalError::new_err(text),
            Error::Closed(_) => ClosedError::new_err(text),
            Error::Timeout(_) => TimeoutError::new_err(text),
            Error::Decode(_) | Error::Json(_) => DecodeError::new_err(text),
            Error::Encode(_) => PyTypeError::new_err(text),
            Error::SharedMemory(_) => PyOSError::new_err(text),
            Error::Unsupported(_) => PyNotImplementedError::new_err(text),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CeleriacError", py.get_type::<CeleriacError>())?;
    m.add("OperationalError", py.get_type::<OperationalError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("TimeoutError", py.get_type::<TimeoutError>())?;
    m.add("DecodeError", py.get_type::<DecodeError>())?;
    m.add("ContentDisallowed", py.get_type::<ContentDisallowed>())?;
    m.add_function(wrap_pyfunction!(mask_url, m)?)?;
    Ok(())
}

/// The URL with its password replaced by `**`.
#[pyfunction]
fn mask_url(url: &str) -> String {
    crate::broker::url::mask(url)
}
