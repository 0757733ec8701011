//! The Redis result store's shared state and its command connection (opened by
//! `connect`, replaced when it breaks), used by the store, the writer and the waiters.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use tokio::sync::Mutex;

use super::RESPONSE_TIMEOUT;
use crate::broker::url::BrokerUrl;
use crate::error::{Error, Result};

pub(super) struct Shared {
    /// The store's URL; a `sentinel://` one names the master anew on every connect.
    pub(super) url: BrokerUrl,
    pub(super) masked: String,
    pub(super) prefix: String,
    /// SETEX seconds; `None`: plain SET.
    pub(super) expires: Option<u64>,
    pub(super) connect_timeout: Duration,
    /// The command connection and its generation (to replace only the broken one).
    pub(super) conn: Mutex<Option<(u64, MultiplexedConnection)>>,
    pub(super) generation: AtomicU64,
    /// Set by `close` and drop: the writer gives up on a batch after a few attempts.
    pub(super) stopping: AtomicBool,
    /// The last write failure, for flush's error text.
    pub(super) last_error: StdMutex<Option<String>>,
}

impl Shared {
    pub(super) fn key_for(&self, task_id: &str) -> String {
        format!("{}{task_id}", self.prefix)
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(RESPONSE_TIMEOUT.max(self.connect_timeout)))
    }

    pub(super) fn cannot_connect(
        &self,
        client: &redis::Client,
        why: impl std::fmt::Display,
    ) -> Error {
        let why = why.to_string();
        Error::Connection(format!(
            "cannot connect to the result backend {}: {why}{}",
            self.masked,
            crate::broker::redis::client::tls_hint(client, &why)
        ))
    }

    pub(super) fn lost(&self, err: &RedisError) -> Error {
        Error::Connection(format!(
            "lost the connection to the result backend {}: {err}",
            self.masked
        ))
    }

    /// A client for the store's server: for a sentinel URL, the master now.
    pub(super) async fn client(&self) -> Result<redis::Client> {
        let info = crate::broker::redis::sentinel::connection_info(&self.url, self.connect_timeout)
            .await?;
        crate::broker::redis::open_client_at(&self.url, info)
    }

    /// The command connection, opened if there is none.
    pub(super) async fn connection(&self) -> Result<(u64, MultiplexedConnection)> {
        let mut guard = self.conn.lock().await;
        if let Some((generation, conn)) = guard.as_ref() {
            return Ok((*generation, conn.clone()));
        }
        let config = self.config();
        let client = self.client().await?;
        let opening = client.get_multiplexed_async_connection_with_config(&config);
        let conn = match tokio::time::timeout(self.connect_timeout, opening).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(self.cannot_connect(&client, err)),
            Err(_) => {
                return Err(self.cannot_connect(
                    &client,
                    format!("no answer within {:?}", self.connect_timeout),
                ))
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *guard = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Forget the command connection if it is still the broken one.
    pub(super) async fn discard(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard
            .as_ref()
            .is_some_and(|(current, _)| *current == generation)
        {
            *guard = None;
        }
    }

    /// Run one request, reconnecting and trying once more if the connection broke.
    pub(super) async fn run<T, F, Fut>(&self, request: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, conn) = self.connection().await?;
            match request(conn).await {
                Ok(value) => return Ok(value),
                Err(err) if needs_reconnect(&err) => {
                    self.discard(generation).await;
                    if attempt >= 2 {
                        return Err(self.lost(&err));
                    }
                }
                Err(err) => return Err(Error::Redis(err)),
            }
        }
    }

    pub(super) async fn get_key(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(|mut conn| async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        })
        .await
    }

    pub(super) fn note_error(&self, text: &str) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(text.to_owned());
    }
}

/// Errors after which a connection cannot be trusted (as opposed to an error reply).
pub(super) fn needs_reconnect(err: &RedisError) -> bool {
    matches!(err.kind(), ErrorKind::Io | ErrorKind::Parse) || err.is_unrecoverable_error()
}
