//! Celery's message protocol v2 and kombu's framing, in plain Rust.

pub mod compression;
pub mod content;
pub mod envelope;
pub mod json;
pub mod message;
pub mod send;
#[cfg(test)]
pub(crate) mod mutate;
