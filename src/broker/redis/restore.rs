//! Putting messages back: kombu's visibility-timeout restore (under its
//! `unacked_mutex`), the heartbeat registry that finds dead consumers, and requeueing a
//! message from its `unacked` record.

use redis::aio::MultiplexedConnection;
use redis::Script;
use serde_json::value::RawValue;

use super::{priority_key, unix_now, RedisOptions};
use crate::error::Result;
use crate::protocol::envelope::IncomingEnvelope;

/// Releases the restore lock only if we still hold it.
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The registry of live consumers (a set of ids), shared by every celeriac consumer.
pub(super) const CONSUMERS_KEY: &str = "celeriac.consumers";

pub(super) fn heartbeat_key(options: &RedisOptions, id: &str) -> String {
    options.key(&format!("celeriac.heartbeat.{id}"))
}

pub(super) fn owned_key(options: &RedisOptions, id: &str) -> String {
    options.key(&format!("celeriac.owned.{id}"))
}

/// Mark a message redelivered the way kombu does on restore.
pub(super) fn mark_redelivered(raw: &[u8]) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return raw.to_vec();
    };
    if let Some(headers) = value.get_mut("headers").and_then(|h| h.as_object_mut()) {
        headers.insert("redelivered".into(), true.into());
    }
    if let Some(info) = value
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(|i| i.as_object_mut())
    {
        info.insert("redelivered".into(), true.into());
    }
    crate::protocol::json::to_vec(&value).unwrap_or_else(|_| raw.to_vec())
}

/// Restore messages whose visibility timeout has passed. Returns how many.
/// Take kombu's `unacked_mutex` (SET NX PX) so that one process restores at a time;
/// the token to release it with, or `None` when another process holds it.
pub(super) async fn lock_restore(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<Option<String>> {
    let token = uuid::Uuid::new_v4().to_string();
    let locked: Option<String> = redis::cmd("SET")
        .arg(options.key(&options.unacked_mutex_key))
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(options.unacked_mutex_expire.as_millis() as u64)
        .query_async(conn)
        .await?;
    Ok(locked.map(|_| token))
}

/// Release the mutex if we still hold it; a failure only lets it expire.
pub(super) async fn unlock_restore(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    token: &str,
) {
    let _: i64 = Script::new(UNLOCK_SCRIPT)
        .key(options.key(&options.unacked_mutex_key))
        .arg(token)
        .invoke_async(conn)
        .await
        .unwrap_or(0);
}

pub async fn restore_visible(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<usize> {
    let Some(token) = lock_restore(conn, options).await? else {
        return Ok(0);
    };
    let result = restore_expired(conn, options).await;
    unlock_restore(conn, options, &token).await;
    result
}

async fn restore_expired(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
) -> Result<usize> {
    let index_key = options.key(&options.unacked_index_key);
    let ceiling = unix_now() - options.visibility_timeout.as_secs_f64();
    let tags: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(&index_key)
        .arg("-inf")
        .arg(ceiling)
        .arg("LIMIT")
        .arg(0)
        .arg(1000)
        .query_async(conn)
        .await?;
    let mut restored = 0;
    for tag in tags {
        if requeue_recorded(conn, options, &tag, true).await? {
            restored += 1;
        }
    }
    Ok(restored)
}

/// Put the message recorded under `tag` in kombu's `unacked` hash back in its queue(s),
/// marked redelivered, and forget the record: at the front of the line (`RPUSH`, served
/// next) when `front`, else at the back (`LPUSH`, as kombu's `reject(requeue=True)`).
/// Returns whether there was a message to put back.
pub(super) async fn requeue_recorded(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    tag: &str,
    front: bool,
) -> Result<bool> {
    let index_key = options.key(&options.unacked_index_key);
    let unacked_key = options.key(&options.unacked_key);
    let record: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(&unacked_key)
        .arg(tag)
        .query_async(conn)
        .await?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    let mut found = false;
    if let Some(record) = record {
        if let Ok((raw, exchange, routing_key)) =
            serde_json::from_slice::<(Box<RawValue>, String, String)>(&record)
        {
            let raw = raw.get().as_bytes();
            let priority = IncomingEnvelope::parse(raw)
                .ok()
                .and_then(|env| env.properties.priority)
                .unwrap_or(0)
                .clamp(0, 9) as u8;
            for queue in bound_queues(conn, options, &exchange, &routing_key).await? {
                pipe.cmd(if front { "RPUSH" } else { "LPUSH" })
                    .arg(options.key(&priority_key(&queue, priority)))
                    .arg(mark_redelivered(raw))
                    .ignore();
            }
            found = true;
        }
    }
    pipe.cmd("ZREM").arg(&index_key).arg(tag).ignore();
    pipe.cmd("HDEL").arg(&unacked_key).arg(tag).ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(found)
}

/// Refresh this consumer's heartbeat key and its place in the registry.
pub(super) async fn beat(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    id: &str,
) -> Result<()> {
    let ttl = options
        .heartbeat_ttl
        .max(options.heartbeat_interval * 2)
        .as_millis() as u64;
    redis::pipe()
        .cmd("SET")
        .arg(heartbeat_key(options, id))
        .arg(unix_now())
        .arg("PX")
        .arg(ttl)
        .ignore()
        .cmd("SADD")
        .arg(options.key(CONSUMERS_KEY))
        .arg(id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Put back every message held by a registered consumer whose heartbeat has expired.
/// Runs under kombu's `unacked_mutex`, so one process restores at a time. Returns how
/// many messages went back.
pub async fn recover_dead(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    own_id: &str,
) -> Result<usize> {
    let registry = options.key(CONSUMERS_KEY);
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&registry)
        .query_async(conn)
        .await?;
    let others: Vec<&String> = ids.iter().filter(|id| id.as_str() != own_id).collect();
    if others.is_empty() {
        return Ok(0);
    }
    let mut pipe = redis::pipe();
    for id in &others {
        pipe.cmd("EXISTS").arg(heartbeat_key(options, id));
    }
    let alive: Vec<bool> = pipe.query_async(conn).await?;
    let dead: Vec<&String> = others
        .into_iter()
        .zip(alive)
        .filter_map(|(id, alive)| (!alive).then_some(id))
        .collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let Some(token) = lock_restore(conn, options).await? else {
        return Ok(0);
    };
    let mut restored = 0;
    let mut result = Ok(());
    for id in dead {
        match recover_one(conn, options, id).await {
            Ok(count) => restored += count,
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    unlock_restore(conn, options, &token).await;
    result.map(|()| restored)
}

async fn recover_one(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    id: &str,
) -> Result<usize> {
    // Checked again under the lock: a slow consumer may have come back.
    let alive: bool = redis::cmd("EXISTS")
        .arg(heartbeat_key(options, id))
        .query_async(conn)
        .await?;
    if alive {
        return Ok(0);
    }
    let owned = owned_key(options, id);
    let tags: Vec<String> = redis::cmd("SMEMBERS").arg(&owned).query_async(conn).await?;
    let mut restored = 0;
    for tag in &tags {
        if requeue_recorded(conn, options, tag, true).await? {
            restored += 1;
        }
    }
    redis::pipe()
        .cmd("DEL")
        .arg(&owned)
        .ignore()
        .cmd("SREM")
        .arg(options.key(CONSUMERS_KEY))
        .arg(id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(restored)
}

/// The queues a (direct) exchange routes `routing_key` to; `''` is the default exchange.
async fn bound_queues(
    conn: &mut MultiplexedConnection,
    options: &RedisOptions,
    exchange: &str,
    routing_key: &str,
) -> Result<Vec<String>> {
    if exchange.is_empty() {
        return Ok(vec![routing_key.to_owned()]);
    }
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(options.key(&format!("_kombu.binding.{exchange}")))
        .query_async(conn)
        .await?;
    let queues = super::bound_queues(&members, routing_key);
    Ok(if queues.is_empty() {
        vec![routing_key.to_owned()]
    } else {
        queues
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_marks_redelivered() {
        let raw = br#"{"body": "", "headers": {}, "properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}}}"#;
        let marked: serde_json::Value = serde_json::from_slice(&mark_redelivered(raw)).unwrap();
        assert_eq!(marked["headers"]["redelivered"], true);
        assert_eq!(marked["properties"]["delivery_info"]["redelivered"], true);
    }
}
