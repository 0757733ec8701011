//! celeriac's Rust core: Celery's wire protocol, broker I/O and result waiting.
//!
//! Everything outside `py/` is plain Rust and is tested by `cargo test` alone;
//! `py/` converts between Python objects and these types and holds no logic.

pub mod backend;
pub mod broker;
pub mod error;
pub mod protocol;
pub mod retry;
pub mod runtime;
pub mod scheduler;
pub mod trace;

mod py;

/// For the fuzz targets in fuzz/ only: the decoders that build Python objects.
#[cfg(fuzzing)]
pub use py::fuzz_hooks;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    runtime::reserve_thread_stacks();
    py::register(m)
}
