//! What a result store does, as traits: `ResultStore` (keep and read a task's meta),
//! `ResultWaiter` (one wait for a ready meta) and `ChordStore` (the chord join).
//!
//! Each store keeps its own inherent methods (its tests and callers use them
//! directly); the impls here only forward, so `Backend` can hold any of them.

use std::time::{Duration, Instant};

use super::redis::{PendingPart, RedisBackend};
use super::{redis, rpc, sqlite};
use crate::error::Result;

/// A result store: one meta document (opaque JSON bytes) per task id.
pub trait ResultStore: std::fmt::Debug + Send + Sync {
    /// The URL with its password masked.
    fn masked_url(&self) -> &str;
    /// Keep a task's meta; may return before it is written (`flush` waits).
    fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()>;
    /// `store` for a request: rpc publishes to its `reply_to` with its `correlation_id`
    /// (default: the task id); the other stores ignore both.
    fn store_for(
        &self,
        task_id: &str,
        meta_json: Vec<u8>,
        _reply_to: Option<&str>,
        _correlation_id: Option<&str>,
    ) -> Result<()> {
        self.store(task_id, meta_json)
    }
    /// Wait until everything stored before is written, at most `timeout`.
    fn flush(&self, timeout: Duration) -> Result<()>;
    /// The stored meta, `None` when there is none (PENDING).
    fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>>;
    fn forget(&self, task_id: &str) -> Result<()>;
    /// Start waiting for a task's ready meta; returns at once.
    fn watch(&self, task_id: &str) -> Result<Box<dyn ResultWaiter>>;
    /// Block until the task's meta is ready; `Error::Timeout` at `deadline`.
    fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>>;
    /// Write what is pending and stop; later calls fail with `Error::Closed`.
    fn close(&self) -> Result<()>;
}

/// One wait for one task's ready meta.
pub trait ResultWaiter: Send {
    /// The ready meta, or `None` when `deadline` passed first; can be called again.
    fn wait_until(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>>;
}

/// The chord join: header results counted per group, the body sent once by the worker
/// that completes the header (docs/wire.md §4.4). Same signatures as the Redis store's
/// inherent methods.
pub trait ChordStore: Send + Sync {
    fn chord_set_size(&self, group_id: &str, size: u64, expires: u64) -> Result<()>;
    /// Record one header part (`member`: JSON `[1, id, state, result]`) at `index`:
    /// record, count and claim atomically. Its [`PendingPart`] is read later (the
    /// Redis script is on its way; SQLite's transaction is done).
    #[allow(clippy::too_many_arguments)]
    fn chord_part_begin(
        &self,
        group_id: &str,
        task_id: &str,
        index: Option<i64>,
        member: &[u8],
        expires: u64,
        claim_expires: u64,
        token: &str,
    ) -> Result<PendingPart>;
    fn chord_results(&self, group_id: &str) -> Result<Vec<Vec<u8>>>;
    fn chord_claim_extend(&self, group_id: &str, token: &str, expires: u64) -> Result<bool>;
    fn chord_cleanup(&self, group_id: &str, token: &str, done_expires: u64) -> Result<bool>;
    fn chord_drop_size(&self, group_id: &str) -> Result<()>;
}

/// `ResultStore` by the store's inherent methods of the same names (`store` given).
macro_rules! forward_result_store {
    ($store:ty) => {
        fn masked_url(&self) -> &str {
            <$store>::masked_url(self)
        }
        fn flush(&self, timeout: Duration) -> Result<()> {
            <$store>::flush(self, timeout)
        }
        fn get(&self, task_id: &str) -> Result<Option<Vec<u8>>> {
            <$store>::get(self, task_id)
        }
        fn forget(&self, task_id: &str) -> Result<()> {
            <$store>::forget(self, task_id)
        }
        fn watch(&self, task_id: &str) -> Result<Box<dyn ResultWaiter>> {
            Ok(Box::new(<$store>::watch(self, task_id)?))
        }
        fn wait(&self, task_id: &str, deadline: Option<Instant>) -> Result<Vec<u8>> {
            <$store>::wait(self, task_id, deadline)
        }
        fn close(&self) -> Result<()> {
            <$store>::close(self)
        }
    };
}

/// `ResultWaiter` by the waiter's inherent `wait_until`.
macro_rules! forward_waiter {
    ($($waiter:ty),*) => {$(
        impl ResultWaiter for $waiter {
            fn wait_until(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>> {
                <$waiter>::wait_until(self, deadline)
            }
        }
    )*};
}

forward_waiter!(redis::Waiter, sqlite::Waiter, rpc::Waiter);

impl ResultStore for RedisBackend {
    forward_result_store!(RedisBackend);
    fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        RedisBackend::store(self, task_id, meta_json)
    }
}

impl ResultStore for sqlite::SqliteBackend {
    forward_result_store!(sqlite::SqliteBackend);
    fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        sqlite::SqliteBackend::store(self, task_id, meta_json)
    }
}

impl ResultStore for rpc::RpcBackend {
    forward_result_store!(rpc::RpcBackend);
    fn store(&self, task_id: &str, meta_json: Vec<u8>) -> Result<()> {
        rpc::RpcBackend::store(self, task_id, meta_json, None, None)
    }
    fn store_for(
        &self,
        task_id: &str,
        meta_json: Vec<u8>,
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        rpc::RpcBackend::store(self, task_id, meta_json, reply_to, correlation_id)
    }
}

/// `ChordStore` by the store's inherent methods of the same names; `$part` records a
/// header part, its result made a `PendingPart` by `$pending`.
macro_rules! forward_chord_store {
    ($store:ty, $part:ident, $pending:expr) => {
        impl ChordStore for $store {
            fn chord_set_size(&self, group_id: &str, size: u64, expires: u64) -> Result<()> {
                <$store>::chord_set_size(self, group_id, size, expires)
            }
            fn chord_part_begin(
                &self,
                group_id: &str,
                task_id: &str,
                index: Option<i64>,
                member: &[u8],
                expires: u64,
                claim_expires: u64,
                token: &str,
            ) -> Result<PendingPart> {
                <$store>::$part(
                    self,
                    group_id,
                    task_id,
                    index,
                    member,
                    expires,
                    claim_expires,
                    token,
                )
                .map($pending)
            }
            fn chord_results(&self, group_id: &str) -> Result<Vec<Vec<u8>>> {
                <$store>::chord_results(self, group_id)
            }
            fn chord_claim_extend(
                &self,
                group_id: &str,
                token: &str,
                expires: u64,
            ) -> Result<bool> {
                <$store>::chord_claim_extend(self, group_id, token, expires)
            }
            fn chord_cleanup(
                &self,
                group_id: &str,
                token: &str,
                done_expires: u64,
            ) -> Result<bool> {
                <$store>::chord_cleanup(self, group_id, token, done_expires)
            }
            fn chord_drop_size(&self, group_id: &str) -> Result<()> {
                <$store>::chord_drop_size(self, group_id)
            }
        }
    };
}

forward_chord_store!(RedisBackend, chord_part_begin, std::convert::identity);
forward_chord_store!(sqlite::SqliteBackend, chord_part_return, PendingPart::Ready);
