//! Celery's message protocol v2 and kombu's framing, in plain Rust.

pub mod compression;
pub mod content;
pub mod delayed;
pub mod envelope;
pub mod json;
pub mod message;
#[cfg(test)]
pub(crate) mod mutate;
pub mod send;
pub mod v1;
