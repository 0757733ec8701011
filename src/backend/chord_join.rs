//! Which store joins a result backend's chords: Redis (`redis_chord.rs`) and SQLite
//! (`sqlite_chord.rs`) have the same entry points; `rpc://` refuses chords with
//! Celery's error.

use super::redis::ChordPart;
use super::redis::RedisBackend;
use super::sqlite::SqliteBackend;
use super::Backend;
use crate::error::{Error, Result};

/// The chord join of one result store.
#[derive(Debug, Clone, Copy)]
pub enum ChordJoin<'a> {
    Redis(&'a RedisBackend),
    Sqlite(&'a SqliteBackend),
}

impl<'a> ChordJoin<'a> {
    /// The join of `backend`; on `rpc://`, Celery's `NotImplementedError`.
    pub fn of(backend: &'a Backend) -> Result<Self> {
        match backend {
            Backend::Redis(store) => Ok(Self::Redis(store)),
            Backend::Sqlite(store) => Ok(Self::Sqlite(store)),
            Backend::Rpc(_) => Err(Error::Unsupported(
                "The \"rpc\" result backend does not support chords!".to_owned(),
            )),
        }
    }

    pub fn chord_set_size(self, group_id: &str, size: u64, expires: u64) -> Result<()> {
        match self {
            Self::Redis(store) => store.chord_set_size(group_id, size, expires),
            Self::Sqlite(store) => store.chord_set_size(group_id, size, expires),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn chord_part_return(
        self,
        group_id: &str,
        task_id: &str,
        index: Option<i64>,
        member: &[u8],
        expires: u64,
        claim_expires: u64,
        token: &str,
    ) -> Result<ChordPart> {
        match self {
            Self::Redis(store) => store.chord_part_return(
                group_id,
                task_id,
                index,
                member,
                expires,
                claim_expires,
                token,
            ),
            Self::Sqlite(store) => store.chord_part_return(
                group_id,
                task_id,
                index,
                member,
                expires,
                claim_expires,
                token,
            ),
        }
    }

    pub fn chord_results(self, group_id: &str) -> Result<Vec<Vec<u8>>> {
        match self {
            Self::Redis(store) => store.chord_results(group_id),
            Self::Sqlite(store) => store.chord_results(group_id),
        }
    }

    pub fn chord_claim_extend(self, group_id: &str, token: &str, expires: u64) -> Result<bool> {
        match self {
            Self::Redis(store) => store.chord_claim_extend(group_id, token, expires),
            Self::Sqlite(store) => store.chord_claim_extend(group_id, token, expires),
        }
    }

    pub fn chord_cleanup(self, group_id: &str, token: &str, done_expires: u64) -> Result<bool> {
        match self {
            Self::Redis(store) => store.chord_cleanup(group_id, token, done_expires),
            Self::Sqlite(store) => store.chord_cleanup(group_id, token, done_expires),
        }
    }

    pub fn chord_drop_size(self, group_id: &str) -> Result<()> {
        match self {
            Self::Redis(store) => store.chord_drop_size(group_id),
            Self::Sqlite(store) => store.chord_drop_size(group_id),
        }
    }
}
