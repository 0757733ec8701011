//! The only pyo3 code: converts Python objects to and from the core's types and
//! delegates. Each file registers its own classes and functions.

use pyo3::prelude::*;

pub mod backend;
pub mod beat;
pub mod codec;
pub mod consumer;
pub mod events;
pub mod exceptions;
#[cfg(any(test, fuzzing))]
pub mod fuzz_hooks;
pub mod options;
pub mod pidbox;
pub mod producer;
pub mod scheduler;
pub mod serializers;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    exceptions::register(m)?;
    codec::register(m)?;
    producer::register(m)?;
    consumer::register(m)?;
    events::register(m)?;
    pidbox::register(m)?;
    backend::register(m)?;
    beat::register(m)?;
    scheduler::register(m)?;
    serializers::register(m)?;
    Ok(())
}
