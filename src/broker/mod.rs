//! Brokers: where task messages are published and consumed.

pub mod redis;
pub mod url;
