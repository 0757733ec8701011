//! Result stores: where task states and return values are kept.
//!
//! A store keeps one meta document per task (Celery's layout, see docs/wire.md §4) as
//! opaque JSON bytes: encoding and decoding belong to the caller. The only field the
//! stores read is `"status"`, to tell a ready state from a progress update.

pub mod beat;
pub mod redis;
pub mod rpc;
pub mod sqlite;
pub mod store;

use std::borrow::Cow;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::broker::url::{BrokerUrl, Scheme};
use crate::error::Result;
use crate::protocol::compression;
use crate::protocol::content::Serializer;
pub use store::{ChordStore, ResultStore, ResultWaiter};

/// Celery's `READY_STATES`: a task in one of these will not change again.
pub const READY_STATES: [&str; 3] = ["SUCCESS", "FAILURE", "REVOKED"];

/// Whether a stored meta document has a ready state.
///
/// A document that is not a JSON object with a string `"status"` counts as ready, so
/// that a waiter hands it to the decoder (which says what is wrong) instead of waiting
/// for its timeout.
pub fn is_ready(meta: &[u8]) -> bool {
    if meta.starts_with(compression::RESULT_MAGIC) {
        return match compression::decompress_result(meta) {
            Ok(plain) => is_ready(&plain),
            Err(_) => true,
        };
    }
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        status: Option<Cow<'a, str>>,
    }
    match serde_json::from_slice::<Probe<'_>>(meta) {
        Ok(probe) => probe
            .status
            .is_some_and(|status| READY_STATES.contains(&status.as_ref())),
        Err(_) => true,
    }
}

/// What every store needs to know; each reads the fields it uses.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Time to live of a stored result (`result_expires`); `None` or zero: forever.
    pub expires: Option<Duration>,
    /// Prefix of a task's key (`celery-task-meta-`).
    pub key_prefix: String,
    /// `result_backend_transport_options["global_keyprefix"]`.
    pub global_keyprefix: Option<String>,
    pub connect_timeout: Duration,
    /// SQLite: how long a write waits for another process's lock
    /// (`result_backend_transport_options["busy_timeout"]`).
    pub busy_timeout: Option<Duration>,
    /// SQLite: the longest pause between two reads of a waiter
    /// (`result_backend_transport_options["polling_interval"]`).
    pub polling_interval: Option<Duration>,
    /// rpc: the broker URL (`rpc://` results travel on the broker).
    pub broker_url: Option<String>,
    /// rpc: this client's reply queue (its oid); empty for a store-only backend.
    pub reply_to: String,
    /// rpc: `result_persistent` (delivery mode 2).
    pub persistent: bool,
    /// rpc: the broker's transport options (`broker_transport_options`, TLS, heartbeat).
    pub broker_transport: serde_json::Map<String, serde_json::Value>,
    /// rpc: `result_serializer` (the other stores keep opaque bytes).
    pub serializer: Serializer,
    /// redis: for a `sentinel://` URL, `master_name` and `sentinel_kwargs`.
    pub sentinel: crate::broker::redis::sentinel::SentinelOptions,
    /// Redis: `redis_backend_use_ssl`.
    pub redis_tls: Option<crate::broker::redis::RedisTls>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        let redis = redis::RedisBackendOptions::default();
        Self {
            expires: redis.expires,
            key_prefix: redis.key_prefix,
            global_keyprefix: None,
            connect_timeout: redis.connect_timeout,
            busy_timeout: None,
            polling_interval: None,
            broker_url: None,
            reply_to: String::new(),
            persistent: false,
            broker_transport: serde_json::Map::new(),
            serializer: Serializer::Json,
            sentinel: redis.sentinel,
            redis_tls: None,
        }
    }
}

/// A result store on whichever backend the URL names (`redis://`, `sqlite://`).
#[derive(Debug)]
pub enum Backend {
    Redis(redis::RedisBackend),
    Sqlite(sqlite::SqliteBackend),
    Rpc(Box<rpc::RpcBackend>),
}

/// One wait for one task's ready meta, on any store.
pub struct Waiter(Box<dyn ResultWaiter>);

impl Waiter {
    /// The ready meta, or `None` when `deadline` passed first.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        self.0.wait_until(deadline)
    }
}

impl Backend {
    /// Connect to the store `url` names. The blocking methods here must be called
    /// from a thread that is not a tokio runtime thread.
    pub fn connect(url: &str, options: BackendOptions) -> Result<Self> {
        if url
            .get(..6)
            .is_some_and(|head| head.eq_ignore_ascii_case("rpc://"))
        {
            let broker = options.broker_url.as_deref().ok_or_else(|| {
                crate::error::Error::Config(
                    "the rpc:// result backend needs the broker URL (broker_url)".into(),
                )
            })?;
            let options = rpc::RpcBackendOptions {
                reply_to: options.reply_to,
                expires: options.expires,
                persistent: options.persistent,
                serializer: options.serializer,
                transport: crate::broker::amqp::AmqpOptions::from_transport(
                    &crate::broker::TransportOptions {
                        connect_timeout: options.connect_timeout,
                        extra: options.broker_transport,
                    },
                )?,
            };
            return Ok(Self::Rpc(Box::new(rpc::RpcBackend::connect(
                broker, options,
            )?)));
        }
        let parsed = BrokerUrl::parse(url)?;
        if parsed.scheme == Scheme::Sqlite {
            let defaults = sqlite::SqliteBackendOptions::default();
            let options = sqlite::SqliteBackendOptions {
                expires: options.expires,
                key_prefix: options.key_prefix,
                global_keyprefix: options.global_keyprefix,
                connect_timeout: options.connect_timeout,
                busy_timeout: options.busy_timeout.unwrap_or(defaults.busy_timeout),
                polling_interval: options
                    .polling_interval
                    .unwrap_or(defaults.polling_interval),
            };
            return Ok(Self::Sqlite(sqlite::SqliteBackend::connect_parsed(
                &parsed, options,
            )?));
        }
        let options = redis::RedisBackendOptions {
            expires: options.expires,
            key_prefix: options.key_prefix,
            global_keyprefix: options.global_keyprefix,
            connect_timeout: options.connect_timeout,
            sentinel: options.sentinel,
            tls: options.redis_tls,
        };
        Ok(Self::Redis(redis::RedisBackend::connect(url, options)?))
    }

    /// The store behind this backend, whichever it is.
    pub fn as_store(&self) -> &dyn ResultStore {
        match self {
            Self::Redis(store) => store,
            Self::Sqlite(store) => store,
            Self::Rpc(store) => store.as_ref(),
        }
    }

    pub fn masked_url(&self) -> &str {
        self.as_store().masked_url()
    }

    pub fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        self.as_store().store(task_id, meta_json)
    }

    /// `store` for a request: rpc publishes to its `reply_to` with its
    /// `correlation_id` (default: the task id); the other stores ignore both.
    pub fn store_for(
        &self,
        task_id: &str,
        meta_json: Vec<u8>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        self.as_store()
            .store_for(task_id, meta_json, reply_to, correlation_id)
    }

    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.as_store().flush(timeout)
    }

    pub fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>> {
        self.as_store().get(task_id)
    }

    pub fn forget(&self, task_id: &str) -> Result<()> {
        self.as_store().forget(task_id)
    }

    /// The store's chord join (Redis, SQLite); `Unsupported` on rpc://.
    pub fn chord_store(&self) -> Result<&dyn store::ChordStore> {
        match self {
            Self::Redis(store) => Ok(store),
            Self::Sqlite(store) => Ok(store),
            Self::Rpc(_) => Err(crate::error::Error::Unsupported(
                "The \"rpc\" result backend does not support chords!".to_owned(),
            )),
        }
    }

    pub fn watch(&self, task_id: &str) -> Result<Waiter> {
        self.as_store().watch(task_id).map(Waiter)
    }

    pub fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>> {
        self.as_store().wait(task_id, deadline)
    }

    pub fn close(&self) -> Result<()> {
        self.as_store().close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_states_are_recognised() {
        assert!(is_ready(br#"{"status": "SUCCESS", "result": 1}"#));
        assert!(is_ready(br#"{"result": null, "status": "FAILURE"}"#));
        assert!(is_ready(br#"{"status": "REVOKED"}"#));
        assert!(is_ready(br#"{"status": "SUCC\u0045SS"}"#));
        for state in ["PENDING", "STARTED", "RETRY", "RECEIVED", "custom"] {
            let meta = format!(r#"{{"status": "{state}", "result": {{"status": "SUCCESS"}}}}"#);
            assert!(!is_ready(meta.as_bytes()), "{state}");
        }
        assert!(!is_ready(br#"{"result": 1}"#));
    }

    #[test]
    fn compressed_json_is_read_through() {
        let method = compression::Compression::Zlib;
        let ready = compression::compress_result(method, br#"{"status": "SUCCESS"}"#).unwrap();
        let retry = compression::compress_result(method, br#"{"status": "RETRY"}"#).unwrap();
        assert!(is_ready(&ready));
        assert!(!is_ready(&retry));
        assert!(is_ready(
            b"\x00celery-compressed\x00application/x-gzip\x00junk"
        ));
    }

    #[test]
    fn undecodable_meta_is_handed_over() {
        assert!(is_ready(b"not json"));
        assert!(is_ready(b"[1, 2]"));
        assert!(is_ready(br#"{"status": 3}"#));
    }
}
