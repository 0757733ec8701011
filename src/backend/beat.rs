//! Beat's shared state: the last run of every periodic-task entry, kept in the store
//! the app already uses, so that any number of beat processes send each run once.
//!
//! One schedule (`namespace`, the `-s/--schedule` name) holds one row per entry:
//! its name and its last run (microseconds since the Unix epoch, as an integer, so
//! that two beats compare runs exactly).
//!
//! - `register` adds the entries not stored yet with the given time (a new entry's
//!   first run is one period later, as in Celery) and returns every entry's stored
//!   last run: a restarted beat, or one on another machine, continues from there.
//! - `claim` is the only way a run is sent: it moves an entry's last run from the
//!   value this beat saw to the new run's time, atomically, if nobody moved it first.
//!   Of several beats that find the same run due, exactly one wins; the others get
//!   the stored value back and compute the next run from it.
//! - `prune` drops the entries that left the schedule.
//!
//! Redis: one hash per schedule (`celeriac-beat:<namespace>`, after
//! `global_keyprefix`), the claim a Lua script (compare and set of one field).
//! SQLite: the `beat_runs` table of the embedded file, the claim one `UPDATE ...
//! WHERE last_run = ?`.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use rusqlite::{params, Connection, OptionalExtension};

use crate::broker::redis::client::connect_error;
use crate::broker::redis::sentinel::SentinelOptions;
use crate::broker::redis::{open_client_at, RedisTls};
use crate::broker::sqlite::{db_error, open};
use crate::broker::url::{BrokerUrl, Scheme};
use crate::error::{Error, Result};
use crate::runtime;

/// The outcome of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This beat sends the run; the stored last run is now the new one.
    Won,
    /// Another beat moved the last run first (to this value; `None`: the entry was
    /// dropped from the store by a beat with another schedule).
    Lost(Option<i64>),
}

/// Where one schedule's state lives.
#[derive(Debug)]
pub enum BeatStore {
    /// Boxed: a TLS-capable redis::Client makes it much larger than the other.
    Redis(Box<RedisBeatStore>),
    Sqlite(SqliteBeatStore),
}

impl BeatStore {
    /// Connect to the store `url` names (`redis://`, `rediss://`, `sentinel://` with
    /// its `sentinel` options, `sqlite://`) for the schedule `namespace`. `Error::Connection` when it cannot be reached within
    /// `timeout`; `Error::InvalidUrl` for any other scheme.
    pub fn connect(
        url: &str,
        namespace: &str,
        global_keyprefix: Option<&str>,
        timeout: Duration,
        sentinel: SentinelOptions,
    ) -> Result<Self> {
        Self::connect_with_tls(url, namespace, global_keyprefix, timeout, sentinel, None)
    }

    /// [`BeatStore::connect`] with the TLS settings of a Redis store (the setting of
    /// the URL beat uses: `redis_backend_use_ssl` or `broker_use_ssl`).
    pub fn connect_with_tls(
        url: &str,
        namespace: &str,
        global_keyprefix: Option<&str>,
        timeout: Duration,
        sentinel: SentinelOptions,
        tls: Option<&RedisTls>,
    ) -> Result<Self> {
        let parsed = BrokerUrl::parse(url)?
            .with_sentinel_options(sentinel)
            .with_redis_tls(tls);
        match parsed.scheme {
            Scheme::Sqlite => Ok(Self::Sqlite(SqliteBeatStore::connect(
                &parsed, namespace, timeout,
            )?)),
            Scheme::Redis | Scheme::Rediss | Scheme::Sentinel => Ok(Self::Redis(Box::new(
                RedisBeatStore::connect(&parsed, namespace, global_keyprefix, timeout)?,
            ))),
            _ => Err(Error::InvalidUrl(format!(
                "beat keeps its schedule in Redis or SQLite, not at {:?}",
                parsed.masked()
            ))),
        }
    }

    pub fn masked_url(&self) -> &str {
        match self {
            Self::Redis(store) => &store.masked,
            Self::Sqlite(store) => &store.masked,
        }
    }

    /// Store `now` as the last run of every entry of `names` not stored yet; return
    /// each entry's stored last run, in the order of `names`.
    pub fn register(&self, names: &[String], now: i64) -> Result<Vec<i64>> {
        match self {
            Self::Redis(store) => store.register(names, now),
            Self::Sqlite(store) => store.register(names, now),
        }
    }

    /// Move `name`'s last run from `seen` to `run` unless another beat moved it first.
    pub fn claim(&self, name: &str, seen: i64, run: i64) -> Result<Claim> {
        let mut answers = self.claim_many(&[(name.to_owned(), seen, run)])?;
        answers
            .pop()
            .ok_or_else(|| Error::Decode("beat's store answered no claim".into()))
    }

    /// `claim` for several runs at once (one round trip per few hundred), in order.
    pub fn claim_many(&self, claims: &[(String, i64, i64)]) -> Result<Vec<Claim>> {
        match self {
            Self::Redis(store) => store.claim_many(claims),
            Self::Sqlite(store) => store.claim_many(claims),
        }
    }

    /// Every stored entry and its last run.
    pub fn entries(&self) -> Result<Vec<(String, i64)>> {
        match self {
            Self::Redis(store) => store.entries(),
            Self::Sqlite(store) => store.entries(),
        }
    }

    /// Drop the stored entries not in `keep`; return their names.
    pub fn prune(&self, keep: &[String]) -> Result<Vec<String>> {
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        let gone: Vec<String> = self
            .entries()?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| !keep.contains(name.as_str()))
            .collect();
        if !gone.is_empty() {
            match self {
                Self::Redis(store) => store.remove(&gone)?,
                Self::Sqlite(store) => store.remove(&gone)?,
            }
        }
        Ok(gone)
    }
}

// ---------------------------------------------------------------------------------
// Redis

/// Compare-and-set of hash fields: KEYS[1] the hash, ARGV triples of a field, the value
/// seen and the new value. Answers one item per triple: 1 when set, else the stored
/// value (false when there is none).
const CLAIM_SCRIPT: &str = r"
local answers = {}
for i = 1, #ARGV, 3 do
    local stored = redis.call('HGET', KEYS[1], ARGV[i])
    if stored == ARGV[i + 1] then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
        answers[#answers + 1] = 1
    else
        answers[#answers + 1] = stored
    end
end
return answers
";
/// Claims per script call: Redis runs a script alone, so a long one would delay others.
const CLAIMS_PER_CALL: usize = 500;

pub struct RedisBeatStore {
    masked: String,
    key: String,
    /// A `sentinel://` URL names the master anew on every connect (boxed: it is large).
    url: Box<BrokerUrl>,
    timeout: Duration,
    /// The connection; `None` after it broke, until the next request reopens it.
    conn: Mutex<Option<MultiplexedConnection>>,
    claim: redis::Script,
}

impl std::fmt::Debug for RedisBeatStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBeatStore")
            .field("url", &self.masked)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl RedisBeatStore {
    fn connect(
        url: &BrokerUrl,
        namespace: &str,
        global_keyprefix: Option<&str>,
        timeout: Duration,
    ) -> Result<Self> {
        let masked = url.masked().to_owned();
        let store = Self {
            key: format!(
                "{}celeriac-beat:{namespace}",
                global_keyprefix.unwrap_or_default()
            ),
            masked,
            url: Box::new(url.clone()),
            timeout,
            conn: Mutex::new(None),
            claim: redis::Script::new(CLAIM_SCRIPT),
        };
        store.connection()?;
        Ok(store)
    }

    /// The open connection, or a new one. Each request waits at most `timeout`, so a
    /// beat whose store is down logs and retries instead of hanging.
    fn connection(&self) -> Result<MultiplexedConnection> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = runtime::handle().block_on(async {
            let info =
                crate::broker::redis::sentinel::connection_info(&self.url, self.timeout).await?;
            let client = open_client_at(&self.url, info)?;
            let opening = client.get_multiplexed_async_connection_with_config(&config);
            match tokio::time::timeout(self.timeout, opening).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(err)) => Err(connect_error(&client, &self.masked, &err)),
                Err(_) => Err(connect_error(
                    &client,
                    &self.masked,
                    &format!("no answer within {:?}", self.timeout),
                )),
            }
        })?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// A failed request: forget a broken connection (the next request reconnects).
    fn lost(&self, err: &redis::RedisError) -> Error {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_timeout()
            || err.is_unrecoverable_error()
        {
            *self
                .conn
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
            Error::Connection(format!("beat's store {}: {err}", self.masked))
        } else {
            Error::Redis(err.clone())
        }
    }

    fn run<T: redis::FromRedisValue>(
        &self,
        request: impl FnOnce(&mut redis::Pipeline),
    ) -> Result<T> {
        let mut pipe = redis::pipe();
        request(&mut pipe);
        let mut conn = self.connection()?;
        runtime::handle()
            .block_on(pipe.query_async::<T>(&mut conn))
            .map_err(|err| self.lost(&err))
    }

    fn register(&self, names: &[String], now: i64) -> Result<Vec<i64>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let (stored,): (Vec<Option<String>>,) = self.run(|pipe| {
            for name in names {
                pipe.cmd("HSETNX")
                    .arg(&self.key)
                    .arg(name)
                    .arg(now)
                    .ignore();
            }
            pipe.cmd("HMGET").arg(&self.key).arg(names);
        })?;
        names
            .iter()
            .zip(stored)
            .map(|(name, value)| match value {
                Some(text) => self.parse(name, &text),
                // Pruned by another beat between the two commands: start afresh.
                None => Ok(now),
            })
            .collect()
    }

    fn parse(&self, name: &str, text: &str) -> Result<i64> {
        text.parse().map_err(|_| {
            Error::Decode(format!(
                "beat's store {}: the last run of {name:?} in {} is {text:?}, not a number",
                self.masked, self.key
            ))
        })
    }

    fn claim_many(&self, claims: &[(String, i64, i64)]) -> Result<Vec<Claim>> {
        let mut answers = Vec::with_capacity(claims.len());
        for chunk in claims.chunks(CLAIMS_PER_CALL) {
            let mut conn = self.connection()?;
            let mut invocation = self.claim.key(&self.key);
            for (name, seen, run) in chunk {
                invocation.arg(name).arg(*seen).arg(*run);
            }
            let replies: Vec<redis::Value> = runtime::handle()
                .block_on(invocation.invoke_async(&mut conn))
                .map_err(|err| self.lost(&err))?;
            if replies.len() != chunk.len() {
                return Err(Error::Decode(format!(
                    "beat's store {}: {} answers to {} claims",
                    self.masked,
                    replies.len(),
                    chunk.len()
                )));
            }
            for ((name, _, _), reply) in chunk.iter().zip(replies) {
                answers.push(match reply {
                    redis::Value::Int(1) => Claim::Won,
                    redis::Value::Nil => Claim::Lost(None),
                    redis::Value::BulkString(bytes) => {
                        Claim::Lost(Some(self.parse(name, &String::from_utf8_lossy(&bytes))?))
                    }
                    other => {
                        return Err(Error::Decode(format!(
                            "beat's store {}: unexpected answer {other:?} to a claim",
                            self.masked
                        )))
                    }
                });
            }
        }
        Ok(answers)
    }

    fn entries(&self) -> Result<Vec<(String, i64)>> {
        let (all,): (Vec<(String, String)>,) = self.run(|pipe| {
            pipe.cmd("HGETALL").arg(&self.key);
        })?;
        all.into_iter()
            .map(|(name, text)| {
                let run = self.parse(&name, &text)?;
                Ok((name, run))
            })
            .collect()
    }

    fn remove(&self, names: &[String]) -> Result<()> {
        self.run::<()>(|pipe| {
            pipe.cmd("HDEL").arg(&self.key).arg(names).ignore();
        })
    }
}

// ---------------------------------------------------------------------------------
// SQLite

const BEAT_TABLE: &str = "
CREATE TABLE IF NOT EXISTS beat_runs (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    last_run INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
";

pub struct SqliteBeatStore {
    masked: String,
    path: PathBuf,
    namespace: String,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteBeatStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBeatStore")
            .field("url", &self.masked)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl SqliteBeatStore {
    fn connect(url: &BrokerUrl, namespace: &str, timeout: Duration) -> Result<Self> {
        let Some(path) = url.sqlite_path.clone() else {
            return Err(Error::InvalidUrl(format!(
                "{:?} names no file",
                url.masked()
            )));
        };
        // The same busy timeout as the broker's: a write waits for other processes.
        let conn = open(&path, timeout.max(Duration::from_secs(10)))?;
        conn.execute_batch(BEAT_TABLE)
            .map_err(|err| db_error(&path, &err))?;
        Ok(Self {
            masked: url.masked().to_owned(),
            path,
            namespace: namespace.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, work: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut conn).map_err(|err| db_error(&self.path, &err))
    }

    fn register(&self, names: &[String], now: i64) -> Result<Vec<i64>> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut runs = Vec::with_capacity(names.len());
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO beat_runs (namespace, name, last_run) VALUES (?1, ?2, ?3)",
                )?;
                let mut select = tx.prepare_cached(
                    "SELECT last_run FROM beat_runs WHERE namespace = ?1 AND name = ?2",
                )?;
                for name in names {
                    insert.execute(params![self.namespace, name, now])?;
                    runs.push(select.query_row(params![self.namespace, name], |row| row.get(0))?);
                }
            }
            tx.commit()?;
            Ok(runs)
        })
    }

    fn claim_many(&self, claims: &[(String, i64, i64)]) -> Result<Vec<Claim>> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut answers = Vec::with_capacity(claims.len());
            {
                let mut update = tx.prepare_cached(
                    "UPDATE beat_runs SET last_run = ?4 \
                     WHERE namespace = ?1 AND name = ?2 AND last_run = ?3",
                )?;
                let mut select = tx.prepare_cached(
                    "SELECT last_run FROM beat_runs WHERE namespace = ?1 AND name = ?2",
                )?;
                for (name, seen, run) in claims {
                    if update.execute(params![self.namespace, name, seen, run])? == 1 {
                        answers.push(Claim::Won);
                    } else {
                        let stored = select
                            .query_row(params![self.namespace, name], |row| row.get(0))
                            .optional()?;
                        answers.push(Claim::Lost(stored));
                    }
                }
            }
            tx.commit()?;
            Ok(answers)
        })
    }

    fn entries(&self) -> Result<Vec<(String, i64)>> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT name, last_run FROM beat_runs WHERE namespace = ?1")?;
            let rows = stmt.query_map(params![self.namespace], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
            rows.collect()
        })
    }

    fn remove(&self, names: &[String]) -> Result<()> {
        self.with(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM beat_runs WHERE namespace = ?1 AND name = ?2")?;
                for name in names {
                    delete.execute(params![self.namespace, name])?;
                }
            }
            tx.commit()
        })
    }
}
