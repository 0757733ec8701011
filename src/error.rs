//! The one error type of the Rust core.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A URL that cannot be used; the text names the URL with its password masked.
    #[error("{0}")]
    InvalidUrl(String),
    /// A setting or option with a value we cannot use.
    #[error("{0}")]
    Config(String),
    /// The broker or result store cannot be reached or went away.
    #[error("{0}")]
    Connection(String),
    /// A wait ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// Bytes that are not a message we understand.
    #[error("{0}")]
    Decode(String),
    /// A value that cannot be put on the wire.
    #[error("{0}")]
    Encode(String),
    /// Something this store does not do (e.g. a chord join outside Redis).
    #[error("{0}")]
    Unsupported(String),
    /// The producer, consumer or store was closed.
    #[error("{0} is closed")]
    Closed(&'static str),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The operating system refused memory shared between a node's processes.
    #[error("shared memory: {0}")]
    SharedMemory(std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
