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
//!
//! TLS, as redis-py's `Sentinel` takes it from kombu and Celery: to the sentinels when
//! `sentinel_kwargs` has `"ssl": True` (with `ssl_cert_reqs`, `ssl_ca_certs`,
//! `ssl_certfile`, `ssl_keyfile`); to the master when `broker_use_ssl` /
//! `redis_backend_use_ssl` is given (the URL's `redis_tls`). The two are independent,
//! as in redis-py. `ssl_*` keys in `sentinel_kwargs` without `"ssl": True` are refused:
//! redis-py would ignore them and talk plain text.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use serde_json::{Map, Value};

use super::client::{tls_hint, RedisTls};
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
    /// `sentinel_kwargs["ssl"]` and its `ssl_*` keys: TLS to the sentinels.
    pub tls: Option<RedisTls>,
}

impl std::fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelOptions")
            .field("master_name", &self.master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "**"))
            .field("min_other_sentinels", &self.min_other_sentinels)
            .field("tls", &self.tls)
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
                options.tls = sentinel_tls(kwargs)?;
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

/// TLS to the sentinels from `sentinel_kwargs`: `"ssl": True` turns it on, its `ssl_*`
/// keys are those of `broker_use_ssl`. `ssl_*` keys without `"ssl": True` are an error
/// (redis-py ignores them then: plain text the user did not mean).
fn sentinel_tls(kwargs: &Map<String, Value>) -> Result<Option<RedisTls>> {
    const SETTING: &str = "transport option \"sentinel_kwargs\"";
    let on = match kwargs.get("ssl") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(on)) => *on,
        Some(other) => {
            return Err(Error::Config(format!(
                "{SETTING}: \"ssl\" must be True or False, not {}",
                kind(other)
            )))
        }
    };
    let keys: Map<String, Value> = kwargs
        .iter()
        .filter(|(key, value)| key.starts_with("ssl_") && !value.is_null())
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if !on {
        return match keys.keys().next() {
            None => Ok(None),
            Some(key) => Err(Error::Config(format!(
                "{SETTING} has {key:?} but not \"ssl\": True; redis-py would ignore it and \
                 talk plain text to the sentinels. Add \"ssl\": True for TLS to the \
                 sentinels, or remove the ssl_* keys"
            ))),
        };
    }
    Ok(Some(
        RedisTls::from_setting(SETTING, &Value::Object(keys))?.unwrap_or_default(),
    ))
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
    // Unreadable certificate files are the user's to fix: refused at once, not retried.
    let sentinel_tls = match &options.tls {
        Some(tls) => Some((tls.verifies(), tls.certificates(url.masked())?)),
        None => None,
    };
    let master_tls = match &url.redis_tls {
        Some(tls) => Some((tls.verifies(), tls.certificates(url.masked())?)),
        None => None,
    };
    let mut failures = Vec::with_capacity(url.hosts().len());
    for sentinel in url.hosts() {
        let asked = tokio::time::timeout(timeout, ask(sentinel, options, name, &sentinel_tls))
            .await
            .unwrap_or_else(|_| Err(no_answer(timeout, sentinel_tls.is_some())));
        let (host, port) = match asked {
            Ok(addr) => addr,
            Err(why) => {
                failures.push(format!("{}: {why}", sentinel.masked()));
                continue;
            }
        };
        let info = master_at(url, &host, port)?;
        let checked = tokio::time::timeout(timeout, check_role(&info, &master_tls))
            .await
            .unwrap_or_else(|_| Err(no_answer(timeout, master_tls.is_some())));
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

/// Whether the server's certificate is checked, and the certificates to present and
/// trust: TLS to a sentinel or to the master.
type Tls = Option<(bool, redis::TlsCertificates)>;

/// "no answer", and for TLS the likely reason.
fn no_answer(timeout: Duration, tls: bool) -> String {
    let hint = if tls {
        " (a plain port does not answer a TLS hello: is this the server's TLS port?)"
    } else {
        ""
    };
    format!("no answer within {:.1}s{hint}", timeout.as_secs_f64())
}

/// The address of `host:port`: over TLS when `verifies` is given (whether the server's
/// certificate is checked), else plain TCP.
fn addr(host: &str, port: u16, verifies: Option<bool>) -> ConnectionAddr {
    match verifies {
        Some(verifies) => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: !verifies,
            tls_params: None,
        },
        None => ConnectionAddr::Tcp(host.to_owned(), port),
    }
}

/// The master's connection info: the sentinel URL's credentials and database at
/// `host:port`, over TLS when `broker_use_ssl` / `redis_backend_use_ssl` asks for it.
fn master_at(url: &BrokerUrl, host: &str, port: u16) -> Result<redis::ConnectionInfo> {
    let first = &url.hosts()[0];
    let mut redis = RedisConnectionInfo::default().set_db(first.db);
    if let Some(user) = &first.username {
        redis = redis.set_username(user.clone());
    }
    if let Some(password) = &first.password {
        redis = redis.set_password(password.clone());
    }
    let verifies = url.redis_tls.as_ref().map(RedisTls::verifies);
    addr(host, port, verifies)
        .into_connection_info()
        .map(|info| info.set_redis_settings(redis))
        .map_err(Error::from)
}

/// A connection to `info`; the error says why not, with a hint for TLS failures.
async fn open(
    info: redis::ConnectionInfo,
    tls: &Tls,
) -> std::result::Result<MultiplexedConnection, String> {
    let client = match tls {
        Some((_, certificates)) => redis::Client::build_with_tls(info, certificates.clone()),
        None => redis::Client::open(info),
    }
    .map_err(|err| err.to_string())?;
    client
        .get_multiplexed_async_connection_with_config(&AsyncConnectionConfig::new())
        .await
        .map_err(|err| {
            let text = err.to_string();
            let plain_port =
                text.contains("corrupt message") || text.contains("InvalidContentType");
            let hint = if tls.is_some() && plain_port {
                "; it does not speak TLS on this port: give its TLS port, or no TLS for it \
                 (sentinel_kwargs \"ssl\" for the sentinels, broker_use_ssl / \
                 redis_backend_use_ssl for the master)"
            } else if tls.is_none()
                && (text.contains("reset by peer") || text.contains("Broken pipe"))
            {
                "; a TLS port drops plain connections: if this is one, turn TLS on for it \
                 (sentinel_kwargs \"ssl\": True for the sentinels, broker_use_ssl / \
                 redis_backend_use_ssl for the master)"
            } else {
                tls_hint(&client, &text)
            };
            format!("{text}{hint}")
        })
}

/// Ask one sentinel for the master's address; the error says why it gave none.
async fn ask(
    sentinel: &BrokerUrl,
    options: &SentinelOptions,
    name: &str,
    tls: &Tls,
) -> std::result::Result<(String, u16), String> {
    let mut redis = RedisConnectionInfo::default();
    if let Some(user) = &options.username {
        redis = redis.set_username(user.clone());
    }
    if let Some(password) = &options.password {
        redis = redis.set_password(password.clone());
    }
    let verifies = tls.as_ref().map(|(verifies, _)| *verifies);
    let info = addr(&sentinel.host, sentinel.port, verifies)
        .into_connection_info()
        .map_err(|err| err.to_string())?
        .set_redis_settings(redis);
    let mut conn = open(info, tls).await?;
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
async fn check_role(info: &redis::ConnectionInfo, tls: &Tls) -> std::result::Result<(), String> {
    let mut conn = open(info.clone(), tls)
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

    #[test]
    fn sentinel_kwargs_ssl_turns_tls_to_the_sentinels_on() {
        let read = options(json!({
            "sentinel_kwargs": {"ssl": true, "ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "none"},
        }))
        .unwrap();
        let tls = read.tls.unwrap();
        assert_eq!(tls.ca_certs.as_deref(), Some("/ca.pem"));
        assert!(!tls.verifies());
        let defaults = options(json!({"sentinel_kwargs": {"ssl": true}})).unwrap();
        assert_eq!(defaults.tls, Some(RedisTls::default()));
        let off = options(json!({"sentinel_kwargs": {"ssl": false, "password": "p"}})).unwrap();
        assert_eq!(off.tls, None);
    }

    #[test]
    fn ssl_keys_without_ssl_true_or_unknown_ones_are_config_errors() {
        for (given, named) in [
            (
                json!({"sentinel_kwargs": {"ssl_ca_certs": "/ca.pem"}}),
                "ssl_ca_certs",
            ),
            (
                json!({"sentinel_kwargs": {"ssl": false, "ssl_cert_reqs": "required"}}),
                "ssl_cert_reqs",
            ),
            (json!({"sentinel_kwargs": {"ssl": "yes"}}), "\"ssl\""),
            (
                json!({"sentinel_kwargs": {"ssl": true, "ssl_ca_path": "/etc/ssl"}}),
                "ssl_ca_path",
            ),
            (
                json!({"sentinel_kwargs": {"ssl": true, "ssl_cert_reqs": "maybe"}}),
                "ssl_cert_reqs",
            ),
        ] {
            let err = options(given).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(named), "{err}");
            assert!(err.to_string().contains("sentinel_kwargs"), "{err}");
        }
    }

    #[tokio::test]
    async fn unreadable_certificate_files_are_config_errors_before_any_sentinel_is_asked() {
        let url = BrokerUrl::parse("sentinel://:secret@127.0.0.1:1").unwrap();
        let tls = RedisTls {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..RedisTls::default()
        };
        let sentinel_side = url.with_sentinel_options(SentinelOptions {
            master_name: Some("mymaster".into()),
            tls: Some(tls.clone()),
            ..SentinelOptions::default()
        });
        let master_side = url
            .with_sentinel_options(SentinelOptions {
                master_name: Some("mymaster".into()),
                ..SentinelOptions::default()
            })
            .with_redis_tls(Some(&tls));
        for url in [sentinel_side, master_side] {
            let err = master_info(&url, Duration::from_secs(1)).await.unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            let text = err.to_string();
            assert!(text.contains("/nonexistent/ca.pem"), "{text}");
            assert!(text.contains("sentinel://:**@127.0.0.1:1"), "{text}");
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
