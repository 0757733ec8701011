//! The chord join on the Redis result store, in Celery 5.7's keys and steps
//! (celery.backends.redis): `<prefix><group id>.j` (header results, a sorted set by
//! header index), `.t` (added parts), `.s` (header size, written by the client),
//! `.d` (parts already counted: a redelivered header task counts once) and `.c` (the
//! claim of the worker that sends the body, then `done`).
//!
//! Each header task's part is one script (EVALSHA): record, count and, when the
//! header is complete, claim the right to send the body, atomically, so exactly one
//! worker sends it. The scripts are Celery's behaviour, written here.
//!
//! A worker need not wait for that script's reply inside the task:
//! `chord_part_begin` sends it and returns a [`PendingPart`], answered later (before
//! the message is acked), so the round trip overlaps the worker's next task.

use std::sync::{Arc, LazyLock};

use redis::Script;
use tokio::sync::oneshot;

use super::{RedisBackend, CLOSED};
use crate::error::{Error, Result};
use crate::runtime;

/// Record one header result; returns `{ready count, total diff, size, claimed}`, or
/// `{-1, 0, 0, 0}` once the chord is done (a late duplicate).
const PART_RETURN: &str = r"
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, score = ARGV[1], ARGV[2], ARGV[3]
local expires, group_expires = tonumber(ARGV[4]), tonumber(ARGV[5])
local claim_expires, token = tonumber(ARGV[6]), ARGV[7]
if redis.call('GET', ckey) == 'done' then
    return {-1, 0, 0, 0}
end
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
    redis.call('ZADD', jkey, score, value)
    redis.call('SADD', dkey, member)
end
local ready = redis.call('ZCOUNT', jkey, '-inf', '+inf')
if expires > 0 then
    for _, key in ipairs({jkey, tkey, skey, dkey}) do
        redis.call('EXPIRE', key, expires)
    end
    if group_expires > 0 then
        redis.call('EXPIRE', gkey, group_expires)
    end
end
local diff = tonumber(redis.call('GET', tkey) or '0') or 0
local size = redis.call('GET', skey)
local claimed = 0
if size and ready == tonumber(size) + diff then
    if redis.call('SET', ckey, token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end
return {ready, diff, tonumber(size or '0') or 0, claimed}
";

/// Hashed once: `Script::new` computes the SHA1 that EVALSHA sends.
static PART_RETURN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PART_RETURN));

/// Keep the claim while it is ours (or take it back if it expired and the chord is
/// still there): 1, else 0.
const CLAIM_EXTEND: &str = r"
local ckey, skey, token, expires = KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2])
if redis.call('GET', ckey) == token then
    return redis.call('EXPIRE', ckey, expires)
end
if not redis.call('GET', ckey) and redis.call('EXISTS', skey) == 1 then
    return redis.call('SET', ckey, token, 'EX', expires, 'NX') and 1 or 0
end
return 0
";

/// Remove the join keys and mark the chord done, if the claim is still ours.
const CLEANUP: &str = r"
local ckey, jkey, tkey, skey, dkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local token, done_expires = ARGV[1], tonumber(ARGV[2])
if redis.call('GET', ckey) == token then
    redis.call('DEL', jkey, tkey, skey, dkey)
    if done_expires and done_expires > 0 then
        redis.call('SET', ckey, 'done', 'EX', done_expires)
    end
    return 1
end
return 0
";

/// What one header part found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChordPart {
    /// Results recorded so far; -1 when the chord was already done.
    pub ready: i64,
    /// The header's size plus the parts added later (`.s` + `.t`); 0 while unknown.
    pub total: i64,
    /// This call claimed the body: the caller must send it.
    pub claimed: bool,
}

/// A header part whose script was sent; [`PendingPart::wait`] gives its reply.
#[derive(Debug)]
pub enum PendingPart {
    /// Answered already (a store that joins in one local transaction).
    Ready(ChordPart),
    /// The script is on its way; the runtime answers here.
    Sent(oneshot::Receiver<Result<ChordPart>>),
}

impl PendingPart {
    /// Whether `wait` would return without blocking.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Ready(_) => true,
            Self::Sent(reply) => !reply.is_empty() || reply.is_terminated(),
        }
    }

    /// The script's reply; blocks until Redis answered (or the store was closed).
    pub fn wait(self) -> Result<ChordPart> {
        match self {
            Self::Ready(part) => Ok(part),
            Self::Sent(mut reply) => match reply.try_recv() {
                Ok(part) => part,
                Err(oneshot::error::TryRecvError::Closed) => Err(Error::Closed(CLOSED)),
                Err(oneshot::error::TryRecvError::Empty) => runtime::handle()
                    .block_on(reply)
                    .unwrap_or(Err(Error::Closed(CLOSED))),
            },
        }
    }
}

impl RedisBackend {
    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        self.key_for(&format!("{group_id}{suffix}"))
    }

    /// What the client does before the last header message: a new run (`DEL .c`)
    /// of `size` parts (`SET .s size EX expires`).
    pub fn chord_set_size(&self, group_id: &str, size: u64, expires: u64) -> Result<()> {
        self.check_open()?;
        let (ckey, skey) = (
            self.chord_key(group_id, ".c"),
            self.chord_key(group_id, ".s"),
        );
        runtime::handle().block_on(self.shared.run(|mut conn| {
            let (ckey, skey) = (ckey.clone(), skey.clone());
            async move {
                let mut pipe = redis::pipe();
                pipe.cmd("DEL").arg(ckey).ignore();
                if expires > 0 {
                    pipe.cmd("SET")
                        .arg(skey)
                        .arg(size)
                        .arg("EX")
                        .arg(expires)
                        .ignore();
                } else {
                    pipe.cmd("SET").arg(skey).arg(size).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
        }))
    }

    /// Record a header task's result (`member`: JSON `[1, id, state, result]`) at
    /// `index` in one script; see [`ChordPart`]. The script is sent from the runtime
    /// at once; its reply is read with [`PendingPart::wait`].
    #[allow(clippy::too_many_arguments)]
    pub fn chord_part_begin(
        &self,
        group_id: &str,
        task_id: &str,
        index: Option<i64>,
        member: &[u8],
        expires: u64,
        claim_expires: u64,
        token: &str,
    ) -> Result<PendingPart> {
        self.check_open()?;
        let keys: Vec<String> = [".j", ".t", ".s", ".d", "", ".c"]
            .iter()
            .map(|suffix| self.chord_key(group_id, suffix))
            .collect();
        let score = index.map_or_else(|| "+inf".to_owned(), |i| i.to_string());
        let mut invocation = PART_RETURN_SCRIPT.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(task_id)
            .arg(member)
            .arg(&score)
            .arg(expires)
            .arg(expires)
            .arg(claim_expires)
            .arg(token);
        let invocation = Arc::new(invocation);
        let shared = Arc::clone(&self.shared);
        let (answer, reply) = oneshot::channel();
        runtime::handle().spawn(async move {
            let outcome = shared
                .run(|mut conn| {
                    let invocation = Arc::clone(&invocation);
                    async move {
                        invocation
                            .invoke_async::<(i64, i64, i64, i64)>(&mut conn)
                            .await
                    }
                })
                .await
                .map(|(ready, diff, size, claimed)| ChordPart {
                    ready,
                    total: if size > 0 { size + diff } else { 0 },
                    claimed: claimed == 1,
                });
            // The caller may have gone (its worker stopped): nobody to tell then.
            let _ = answer.send(outcome);
        });
        Ok(PendingPart::Sent(reply))
    }

    /// The header results in header order (`ZRANGE .j 0 -1`).
    pub fn chord_results(&self, group_id: &str) -> Result<Vec<Vec<u8>>> {
        self.check_open()?;
        let jkey = self.chord_key(group_id, ".j");
        runtime::handle().block_on(self.shared.run(|mut conn| {
            let jkey = jkey.clone();
            async move {
                redis::cmd("ZRANGE")
                    .arg(jkey)
                    .arg(0)
                    .arg(-1)
                    .query_async::<Vec<Vec<u8>>>(&mut conn)
                    .await
            }
        }))
    }

    /// Extend our claim before sending the body; false when it is no longer ours.
    pub fn chord_claim_extend(&self, group_id: &str, token: &str, expires: u64) -> Result<bool> {
        self.check_open()?;
        let keys = [
            self.chord_key(group_id, ".c"),
            self.chord_key(group_id, ".s"),
        ];
        self.chord_script(
            CLAIM_EXTEND,
            &keys,
            &[token.to_owned(), expires.to_string()],
        )
    }

    /// After the body was sent: drop the join keys, mark the chord done.
    pub fn chord_cleanup(&self, group_id: &str, token: &str, done_expires: u64) -> Result<bool> {
        self.check_open()?;
        let keys: Vec<String> = [".c", ".j", ".t", ".s", ".d"]
            .iter()
            .map(|suffix| self.chord_key(group_id, suffix))
            .collect();
        self.chord_script(
            CLEANUP,
            &keys,
            &[token.to_owned(), done_expires.to_string()],
        )
    }

    /// A failed chord: drop its size, so a late copy of a header task cannot fail it
    /// again (the results are left to expire, as Celery leaves them).
    pub fn chord_drop_size(&self, group_id: &str) -> Result<()> {
        self.forget(&format!("{group_id}.s"))
    }

    fn chord_script(&self, source: &str, keys: &[String], args: &[String]) -> Result<bool> {
        let script = Script::new(source);
        let done: i64 = runtime::handle().block_on(self.shared.run(|mut conn| {
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            async move { invocation.invoke_async(&mut conn).await }
        }))?;
        Ok(done == 1)
    }
}
