//! Redis Sentinel: kombu's `sentinel://host:port;sentinel://host:port` URLs.
//!
//! The URL list names the sentinels, not the server: on every (re)connect
//! [`master_info`] asks them, in the order given, for the current master of
//! `master_name` (`SENTINEL get-master-addr-by-name`); the first that names one whose
//! `ROLE` says `master` wins. So after a failover the next reconnect of each
//! connection (consumer, producer, fanout, result store, beat) finds the new master.
//!
//! As in kombu and Celery, the URL's credentials and database (the first entry's) are
//! the master's; the sentinels' own credentials come from the transport option
//! `sentinel_kwargs` (`{"password": ..., "username": ...}`). `master_name` is
//! required; `min_other_sentinels` (kombu's, default 0) refuses a sentinel that sees
//! fewer peers.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use serde_json::{Map, Value};

use crate::broker::url::{BrokerUrl, Scheme};
use crate::error::{Error, Result};

/// The sentinel transport options of `broker_transport_options` or
/// `result_backend_transport_options`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentinelOptions {
    /// `master_name`: the name the sentinels monitor the master under.
    pub master_name: Option<String>,
    /// `sentinel_kwargs["username"]`: the sentinels' user (not the master's).
    pub username: Option<String>,
    /// `sentinel_kwargs["password"]`: the sentinels' password (not the master's).
    pub password: Option<String>,
    /// `min_other_sentinels`: a sentinel that sees fewer other sentinels is skipped.
    pub min_other_sentinels: u64,
}

impl std::fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelOptions")
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "**"))
            .field("min_other_sentinels", &self.min_other_sentinels)
            .finish()
    }
}

impl SentinelOptions {
    /// Read kombu's sentinel options from a transport-options dict (other keys are
    /// other transports' business). A value of the wrong type is `Error::Config`.
    pub fn from_transport(given: &Map<String, Value>) -> Result<Self> {
        let mut options = Self::default();
        let text = |key: &str, value: &Value| -> Result<Option<String>> {
            match value {
                Value::Null => Ok(None),
                Value::String(text) => Ok(Some(text.clone())),
                other => Err(Error::Config(format!(
                    "transport option {key:?} must be a string, not {}",
                    kind(other)
                ))),
            }
        };
        if let Some(value) = given.get("master_name") {
            options.master_name = text("master_name", value)?;
            if options.master_name.as_deref() == Some("") {
                return Err(Error::Config(
                    "transport option \"master_name\" must not be empty".into(),
                ));
            }
        }
        match given.get("sentinel_kwargs") {
            None | Some(Value::Null) => {}
            Some(Value::Object(kwargs)) => {
                if let Some(value) = kwargs.get("password") {
                    options.password = text("sentinel_kwargs[\"password\"]", value)?;
                }
                if let Some(value) = kwargs.get("username") {
                    options.username = text("sentinel_kwargs[\"username\"]", value)?;
                }
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "transport option \"sentinel_kwargs\" must be a dict, not {}",
                    kind(other)
                )))
            }
        }
        match given.get("min_other_sentinels") {
            None | Some(Value::Null) => {}
            Some(value) => {
                options.min_other_sentinels = value.as_u64().ok_or_else(|| {
                    Error::Config(format!(
                        "transport option \"min_other_sentinels\" must be a non-negative \
                         integer, not {value}"
                    ))
                })?;
            }
        }
        Ok(options)
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "None",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

/// Where a connection to `url` goes now: the URL's server, or for a `sentinel://`
/// URL (list) the current master ([`master_info`]).
pub async fn connection_info(url: &BrokerUrl, timeout: Duration) -> Result<redis::ConnectionInfo> {
    if url.scheme == Scheme::Sentinel {
        master_info(url, timeout).await
    } else {
        url.to_redis_info()
    }
}

/// The current master's connection info: the sentinels of `url` are asked in order;
/// the first that names a master that answers `ROLE` with `master` wins. Each step
/// waits at most `timeout`.
///
/// No `master_name` is `Error::Config` (nothing to retry); no sentinel naming a
/// reachable master is `Error::Connection`, naming every sentinel (masked) and why.
pub async fn master_info(url: &BrokerUrl, timeout: Duration) -> Result<redis::ConnectionInfo> {
    let options = url.sentinel();
    let Some(name) = options.master_name.as_deref() else {
        return Err(Error::Config(format!(
            "the sentinel URL {} needs the transport option \"master_name\" (the name the \
             sentinels monitor the master under), in broker_transport_options or \
             result_backend_transport_options",
            url.masked()
        )));
    };
    let mut failures = Vec::with_capacity(url.hosts().len());
    for sentinel in url.hosts() {
        let asked = tokio::time::timeout(timeout, ask(sentinel, options, name))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:.1}s", timeout.as_secs_f64())));
        let (host, port) = match asked {
            Ok(addr) => addr,
            Err(why) => {
                failures.push(format!("{}: {why}", sentinel.masked()));
                continue;
            }
        };
        let info = master_at(url, &host, port)?;
        let checked = tokio::time::timeout(timeout, check_role(&info))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:.1}s", timeout.as_secs_f64())));
        match checked {
            Ok(()) => return Ok(info),
            Err(why) => failures.push(format!(
                "{} names {host}:{port} as master of {name:?}, but {why}",
                sentinel.masked()
            )),
        }
    }
    Err(Error::Connection(format!(
        "no sentinel of {} named a reachable master for {name:?}: {}",
        url.masked(),
        failures.join("; ")
    )))
}

/// The master's connection info: the sentinel URL's credentials and database at
/// `host:port`.
fn master_at(url: &BrokerUrl, host: &str, port: u16) -> Result<redis::ConnectionInfo> {
    let first = &url.hosts()[0];
    let mut redis = RedisConnectionInfo::default().set_db(first.db);
    if let Some(user) = &first.username {
        redis = redis.set_username(user.clone());
    }
    if let Some(password) = &first.password {
        redis = redis.set_password(password.clone());
    }
    ConnectionAddr::Tcp(host.to_owned(), port)
        .into_connection_info()
        .map(|info| info.set_redis_settings(redis))
        .map_err(Error::from)
}

async fn open(info: redis::ConnectionInfo) -> std::result::Result<MultiplexedConnection, String> {
    let client = redis::Client::open(info).map_err(|err| err.to_string())?;
    client
        .get_multiplexed_async_connection_with_config(&AsyncConnectionConfig::new())
        .await
        .map_err(|err| err.to_string())
}

/// Ask one sentinel for the master's address; the error says why it gave none.
async fn ask(
    sentinel: &BrokerUrl,
    options: &SentinelOptions,
    name: &str,
) -> std::result::Result<(String, u16), String> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = &options.username {
        redis = redis.set_username(user.clone());
    }
    if let Some(password) = &options.password {
        redis = redis.set_password(password.clone());
    }
    let info = ConnectionAddr::Tcp(sentinel.host.clone(), sentinel.port)
        .into_connection_info()
        .map_err(|err| err.to_string())?
        .set_redis_settings(redis);
    let mut conn = open(info).await?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(&mut conn)
        .await
        .map_err(|err| err.to_string())?;
    let Some((host, port)) = addr else {
        return Err(format!("it monitors no master named {name:?}"));
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("it answered {port:?}, not a port"))?;
    if options.min_other_sentinels > 0 {
        let others: Vec<redis::Value> = redis::cmd("SENTINEL")
            .arg("sentinels")
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(|err| err.to_string())?;
        if (others.len() as u64) < options.min_other_sentinels {
            return Err(format!(
                "it sees {} other sentinels, fewer than min_other_sentinels ({})",
                others.len(),
                options.min_other_sentinels
            ));
        }
    }
    Ok((host, port))
}

/// `ROLE` on the named master: Ok when it says `master`.
async fn check_role(info: &redis::ConnectionInfo) -> std::result::Result<(), String> {
    let mut conn = open(info.clone())
        .await
        .map_err(|why| format!("it cannot be reached: {why}"))?;
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .map_err(|err| format!("ROLE failed: {err}"))?;
    match role.first() {
        Some(redis::Value::BulkString(word)) if word.as_slice() == b"master" => Ok(()),
        Some(redis::Value::SimpleString(word)) if word == "master" => Ok(()),
        Some(redis::Value::BulkString(word)) => {
            Err(format!("its ROLE is {:?}", String::from_utf8_lossy(word)))
        }
        other => Err(format!("its ROLE answer is {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(value: Value) -> Result<SentinelOptions> {
        match value {
            Value::Object(map) => SentinelOptions::from_transport(&map),
            _ => unreachable!("a dict"),
        }
    }

    #[test]
    fn reads_kombus_option_names() {
        let read = options(json!({
            "master_name": "mymaster",
            "sentinel_kwargs": {"password": "spw", "username": "su", "socket_timeout": 1},
            "min_other_sentinels": 2,
            "visibility_timeout": 10,
        }))
        .unwrap();
        assert_eq!(read.master_name.as_deref(), Some("mymaster"));
        assert_eq!(read.password.as_deref(), Some("spw"));
        assert_eq!(read.username.as_deref(), Some("su"));
        assert_eq!(read.min_other_sentinels, 2);
        assert!(!format!("{read:?}").contains("spw"));
        assert_eq!(options(json!({})).unwrap(), SentinelOptions::default());
    }

    #[test]
    fn wrong_types_are_config_errors_by_name() {
        for (given, named) in [
            (json!({"master_name": 3}), "master_name"),
            (json!({"master_name": ""}), "master_name"),
            (json!({"sentinel_kwargs": "pw"}), "sentinel_kwargs"),
            (json!({"sentinel_kwargs": {"password": 1}}), "password"),
            (json!({"min_other_sentinels": -1}), "min_other_sentinels"),
        ] {
            let err = options(given).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[tokio::test]
    async fn no_master_name_is_a_config_error_naming_the_masked_urls() {
        let url =
            BrokerUrl::parse("sentinel://:secret1@127.0.0.1:1;sentinel://:secret2@h:2").unwrap();
        let err = master_info(&url, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("master_name"), "{text}");
        assert!(text.contains("sentinel://:**@h:2"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}
