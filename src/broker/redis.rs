//! The Redis broker in kombu's layout (docs/wire.md §3), so Celery peers share queues.
//!
//! - A queue is a list; priorities live in sub-lists `<queue>\x06\x16<step>`.
//! - Publishing is `LPUSH`; the producer's I/O task pipelines everything pending
//!   (several values per `LPUSH` when they share a list) in one round trip.
//! - Consuming pops with `RPOP key count` inside a Lua script that also records each
//!   message in kombu's ack emulation (`unacked` hash + `unacked_index` zset), so a
//!   batch costs one round trip and no message is ever popped without being recorded.
//!   When every list is empty the fetcher waits for a push without taking anything
//!   (`wake`: one `BLMOVE list list LEFT LEFT` per list, which leaves the list as it
//!   was), then runs the script again: a message is always in its list or in
//!   `unacked`, never only in a reply on the wire, so a worker killed at any instant
//!   loses nothing. Acks are written at once, or batched for a moment while more
//!   messages are queued.
//! - The consumer needs Redis 6.2 or later (`RPOP key count`, `BLMOVE`); it checks the
//!   server's version when it connects.
//! - Messages whose worker died are put back after `visibility_timeout`.
//! - A `sentinel://` URL (list) is resolved to the current master on every
//!   (re)connect ([`sentinel`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

pub mod client;
mod consumer;
mod fanout;
mod producer;
mod restore;
pub mod sentinel;
mod wake;

pub use self::client::{open_client, open_client_at, CertReqs, RedisTls};
pub use self::consumer::RedisConsumer;
pub use self::fanout::RedisFanout;
pub use self::producer::RedisProducer;
pub use self::restore::{recover_dead, restore_visible};
use super::url::BrokerUrl;
use super::TransportOptions;
use crate::error::{Error, Result};

/// kombu's separator between a queue name and its priority step.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's priority steps: 0-2 → 0, 3-5 → 3, 6-8 → 6, 9 → 9 (lower is served first).
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The list that holds messages of `priority` for `queue`.
pub fn priority_key(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .rev()
        .find(|step| priority.min(9) >= **step)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_owned()
    } else {
        format!("{queue}{PRIORITY_SEP}{step}")
    }
}

/// Transport options we understand (`broker_transport_options`), with kombu's defaults.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub visibility_timeout: Duration,
    pub global_keyprefix: String,
    pub unacked_key: String,
    pub unacked_index_key: String,
    pub unacked_mutex_key: String,
    pub unacked_mutex_expire: Duration,
    /// How often a consumer looks for messages whose visibility timeout has passed.
    pub restore_interval: Duration,
    pub connect_timeout: Duration,
    /// How often a consumer refreshes its heartbeat key and looks for dead consumers
    /// (`celeriac_heartbeat_interval`; zero turns heartbeats off).
    pub heartbeat_interval: Duration,
    /// How long a heartbeat lives: a consumer silent this long is dead and its unacked
    /// messages go back to their queues (`celeriac_heartbeat_ttl`).
    pub heartbeat_ttl: Duration,
    /// `broker_use_ssl` (the `ssl` transport option set from it), applied to the URL
    /// with [`BrokerUrl::with_redis_tls`].
    pub tls: Option<RedisTls>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            global_keyprefix: String::new(),
            unacked_key: "unacked".into(),
            unacked_index_key: "unacked_index".into(),
            unacked_mutex_key: "unacked_mutex".into(),
            unacked_mutex_expire: Duration::from_secs(300),
            restore_interval: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(4),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_ttl: Duration::from_secs(5),
            tls: None,
        }
    }
}

impl RedisOptions {
    /// Read the options this transport knows from `broker_transport_options`.
    pub fn from_transport(given: &TransportOptions) -> Result<Self> {
        let mut options = Self {
            connect_timeout: given.connect_timeout,
            ..Self::default()
        };
        for (key, value) in &given.extra {
            let seconds = || -> Result<Duration> {
                value
                    .as_f64()
                    .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "transport option {key:?} must be a non-negative number of seconds, not {value}"
                        ))
                    })
            };
            let text = || -> Result<String> {
                value.as_str().map(str::to_owned).ok_or_else(|| {
                    Error::Config(format!(
                        "transport option {key:?} must be a string, not {value}"
                    ))
                })
            };
            match key.as_str() {
                "visibility_timeout" => options.visibility_timeout = seconds()?,
                "unacked_restore_interval" => {
                    options.restore_interval = seconds()?.max(Duration::from_millis(100));
                }
                "unacked_mutex_expire" => options.unacked_mutex_expire = seconds()?,
                "celeriac_heartbeat_interval" => options.heartbeat_interval = seconds()?,
                "celeriac_heartbeat_ttl" => {
                    options.heartbeat_ttl = seconds()?.max(Duration::from_millis(500));
                }
                "global_keyprefix" => options.global_keyprefix = text()?,
                "unacked_key" => options.unacked_key = text()?,
                "unacked_index_key" => options.unacked_index_key = text()?,
                "unacked_mutex_key" => options.unacked_mutex_key = text()?,
                "ssl" => options.tls = RedisTls::from_setting("broker_use_ssl", value)?,
                // The dict is shared with kombu's other transports: ignore the rest.
                _ => {}
            }
        }
        Ok(options)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.global_keyprefix)
    }
}

pub(crate) async fn connect(
    url: &BrokerUrl,
    timeout: Duration,
    response_timeout: Option<Duration>,
) -> Result<MultiplexedConnection> {
    let masked = url.masked();
    let client = open_client_at(url, sentinel::connection_info(url, timeout).await?)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(response_timeout);
    let attempt = client.get_multiplexed_async_connection_with_config(&config);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(client::connect_error(&client, masked, &err)),
        Err(_) => Err(client::connect_error(
            &client,
            masked,
            &format!("timed out after {:.1}s", timeout.as_secs_f64()),
        )),
    }
}

/// Small commands go out at once: without `TCP_NODELAY` a command written while the
/// previous one is unanswered (a pipelined fetch, ack or subscription) waits for its
/// reply's ACK (Nagle), a round trip on the latency path.
pub(crate) fn nodelay(info: redis::ConnectionInfo) -> redis::ConnectionInfo {
    let settings = info.tcp_settings().clone().set_nodelay(true);
    info.set_tcp_settings(settings)
}

/// The oldest Redis the consumer works with: `RPOP key count` and `BLMOVE` came in 6.2.
pub const MIN_SERVER_VERSION: (u32, u32) = (6, 2);

/// `redis_version` from the text of `INFO server`, as (major, minor, patch).
pub fn server_version(info: &str) -> Option<(u32, u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(|part| part.parse::<u32>());
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    Some((major, minor, patch))
}

/// Refuse a server older than [`MIN_SERVER_VERSION`], naming it and its version. A
/// server that does not tell its version (`INFO` renamed or denied) is given the
/// benefit of the doubt: a missing command then fails the first fetch, with the
/// server's own error.
pub fn check_server_version(info: &str, masked: &str) -> Result<()> {
    let Some((major, minor, patch)) = server_version(info) else {
        return Ok(());
    };
    if (major, minor) >= MIN_SERVER_VERSION {
        return Ok(());
    }
    let (need_major, need_minor) = MIN_SERVER_VERSION;
    Err(Error::Config(format!(
        "the Redis server at {masked} is version {major}.{minor}.{patch}; consuming from \
         Redis needs {need_major}.{need_minor} or later (RPOP with a count, BLMOVE)"
    )))
}

/// Ask the server its version and refuse one that is too old ([`check_server_version`]).
pub async fn ensure_server_version(conn: &mut MultiplexedConnection, masked: &str) -> Result<()> {
    let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query_async(conn).await;
    match info {
        Ok(info) => check_server_version(&info, masked),
        // Denied or renamed: see check_server_version. A lost connection shows at once
        // in the next command.
        Err(err) if err.code().is_some() => Ok(()),
        Err(err) => Err(Error::Connection(format!(
            "cannot connect to {masked}: {err}"
        ))),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The queues of binding-table `members` whose routing key is `routing_key`.
pub(crate) fn bound_queues(members: &[String], routing_key: &str) -> Vec<String> {
    members
        .iter()
        .filter_map(|member| {
            let mut parts = member.split(PRIORITY_SEP);
            let key = parts.next()?;
            let _pattern = parts.next()?;
            let queue = parts.next()?;
            (key == routing_key).then(|| queue.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_round_down_to_kombu_steps() {
        assert_eq!(priority_key("celery", 0), "celery");
        assert_eq!(priority_key("celery", 2), "celery");
        assert_eq!(priority_key("celery", 3), "celery\x06\x163");
        assert_eq!(priority_key("celery", 5), "celery\x06\x163");
        assert_eq!(priority_key("celery", 8), "celery\x06\x166");
        assert_eq!(priority_key("celery", 9), "celery\x06\x169");
        assert_eq!(priority_key("celery", 200), "celery\x06\x169");
    }

    #[test]
    fn server_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 0, 15)));
        assert_eq!(server_version("redis_version:6.2\n"), Some((6, 2, 0)));
        assert_eq!(server_version("redis_version:8\n"), Some((8, 0, 0)));
        // Not told, or not a version: unknown.
        assert_eq!(server_version("# Server\r\nuptime_in_seconds:3\r\n"), None);
        assert_eq!(server_version("redis_version:\r\n"), None);
        assert_eq!(server_version("redis_version:seven\r\n"), None);
        assert_eq!(server_version("redis_version:7.x.1\r\n"), None);
        assert_eq!(server_version(""), None);
    }

    #[test]
    fn a_server_older_than_6_2_is_refused_by_url_and_version() {
        let masked = "redis://:**@10.0.0.7:6379/0";
        for old in [
            "redis_version:6.0.16",
            "redis_version:5.0.14",
            "redis_version:2.8.24",
        ] {
            let err = check_server_version(old, masked).expect_err(old);
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            let text = err.to_string();
            let found = old.trim_start_matches("redis_version:");
            assert!(text.contains(masked), "{text}");
            assert!(text.contains(&format!("version {found}")), "{text}");
            assert!(text.contains("6.2 or later"), "{text}");
        }
        for ok in [
            "redis_version:6.2.0",
            "redis_version:7.0.15",
            "redis_version:10.1.0",
        ] {
            check_server_version(ok, masked).expect(ok);
        }
        // A server that does not tell is let through (its first fetch reports a
        // missing command with the server's own error).
        check_server_version("# Server\r\n", masked).expect("unknown version");
    }
}
