//! Broker and result-store URLs: parsing, validation and masking.
//!
//! Celery's form is `transport://user:password@host:port/vhost`; the password never
//! reaches a log line or the banner, so every error here names the masked URL.
//!
//! A `;`-separated list (`amqp://a//;amqp://b//`, kombu's failover list) is one
//! [`BrokerUrl`] whose fields are the first entry's and whose [`BrokerUrl::hosts`] are
//! all the entries; a connection tries them in the order of the [`FailoverStrategy`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use url::Url;

use super::redis::RedisTls;
use crate::broker::redis::sentinel::SentinelOptions;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Redis,
    /// Redis over TLS.
    Rediss,
    /// Redis over a unix socket (`redis+socket:///path` or `unix:///path`).
    RedisSocket,
    /// The embedded SQLite file (`sqlite:///abs/path.db`, `sqlite://relative.db`).
    Sqlite,
    /// AMQP 0-9-1 (RabbitMQ): `amqp://` and kombu's `pyamqp://`.
    Amqp,
    /// AMQP over TLS (`amqps://`).
    Amqps,
    /// Redis Sentinel (`sentinel://`, kombu's): the URL (list) names the sentinels,
    /// which name the Redis master (see `crate::broker::redis::sentinel`).
    Sentinel,
}

#[derive(Debug, Clone)]
pub struct BrokerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Whether the URL names the port (else `port` is the scheme's default).
    pub port_given: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Redis database number.
    pub db: i64,
    /// Socket path for `RedisSocket`.
    pub socket_path: Option<String>,
    /// Database file for `Sqlite`, as written (relative paths are relative to the
    /// current directory).
    pub sqlite_path: Option<PathBuf>,
    /// AMQP virtual host (`/` by default); empty for other transports.
    pub vhost: String,
    /// Redis over TLS: set by `rediss://` (with the `ssl_*` of its query) or by a
    /// setting ([`BrokerUrl::with_redis_tls`]); `None` for plain TCP and other transports.
    pub redis_tls: Option<RedisTls>,
    masked: String,
    /// The entries of a failover list, in the order given; empty for a single URL.
    failover: Vec<BrokerUrl>,
    /// The index in [`BrokerUrl::hosts`] of the host that last accepted a connection
    /// (`usize::MAX`: none yet), shared by the clones of this URL, so that every
    /// connection of a process goes to the same node.
    last_good: Arc<AtomicUsize>,
    /// For `sentinel://`: the transport options that say which master to ask for.
    sentinel: Arc<SentinelOptions>,
}

/// `broker_failover_strategy`: the order in which the hosts of a failover list are
/// tried. kombu's two names; the host that last accepted a connection is tried first
/// by both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailoverStrategy {
    /// The hosts in the order of the list (the default).
    #[default]
    RoundRobin,
    /// The hosts in a random order (spreads the clients of one list over its hosts).
    Shuffle,
}

impl FailoverStrategy {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "round-robin" => Ok(Self::RoundRobin),
            "shuffle" => Ok(Self::Shuffle),
            other => Err(Error::Config(format!(
                "broker_failover_strategy must be \"round-robin\" or \"shuffle\", not {other:?}"
            ))),
        }
    }
}

impl BrokerUrl {
    /// One URL, or a `;`-separated failover list of URLs (see [`BrokerUrl::hosts`]).
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.contains(';') {
            return Self::parse_list(raw);
        }
        Self::parse_one(raw)
    }

    /// kombu's failover list: `;` between full URLs, each with its own credentials
    /// and vhost. Only AMQP URLs, or only `sentinel://` URLs (the sentinels to ask
    /// for the Redis master): a list that names another transport, or mixes
    /// transports, is an error rather than a list silently read as its first entry.
    pub fn parse_list(raw: &str) -> Result<Self> {
        let masked = mask(raw);
        let bad =
            |why: &str| Error::InvalidUrl(format!("invalid broker URL list {masked:?}: {why}"));
        let entries: Vec<&str> = raw.split(';').map(str::trim).collect();
        if entries.iter().any(|entry| entry.is_empty()) {
            return Err(bad(
                "an entry is empty (a `;` at an end or two in a row); separate full URLs by `;`",
            ));
        }
        let parsed = entries
            .iter()
            .map(|entry| Self::parse_one(entry))
            .collect::<Result<Vec<_>>>()?;
        let amqp = |url: &BrokerUrl| matches!(url.scheme, Scheme::Amqp | Scheme::Amqps);
        let sentinel = |url: &BrokerUrl| url.scheme == Scheme::Sentinel;
        if !parsed.iter().all(amqp) && !parsed.iter().all(sentinel) {
            let what = if parsed.iter().any(sentinel) {
                "it mixes transports; every entry must be a sentinel:// URL"
            } else if parsed.iter().any(amqp) {
                "it mixes transports; every entry must be an amqp:// or amqps:// URL"
            } else {
                "failover between several URLs is supported on RabbitMQ (amqp://, amqps://) \
                 and Redis Sentinel (sentinel://) only"
            };
            return Err(bad(what));
        }
        let mut first = parsed[0].clone();
        first.masked = masked;
        first.failover = parsed;
        Ok(first)
    }

    /// Every host to connect to, in the order given: the entries of a failover list,
    /// or this URL alone.
    pub fn hosts(&self) -> &[BrokerUrl] {
        if self.failover.is_empty() {
            std::slice::from_ref(self)
        } else {
            &self.failover
        }
    }

    /// The indexes of [`BrokerUrl::hosts`] in the order a connection tries them: the
    /// host that last accepted a connection first, then the others after it in list
    /// order (round-robin) or in a random order (shuffle; on the first connection
    /// every host is in a random order).
    pub fn connect_order(&self, strategy: FailoverStrategy) -> Vec<usize> {
        let count = self.hosts().len();
        let last = self.last_good.load(Ordering::Acquire);
        match strategy {
            FailoverStrategy::RoundRobin => {
                let start = if last < count { last } else { 0 };
                (0..count).map(|step| (start + step) % count).collect()
            }
            FailoverStrategy::Shuffle => {
                let mut others: Vec<usize> = (0..count).filter(|&i| i != last).collect();
                shuffle(&mut others);
                if last < count {
                    others.insert(0, last);
                }
                others
            }
        }
    }

    /// Note that host `index` of [`BrokerUrl::hosts`] accepted a connection.
    pub fn connected_to(&self, index: usize) {
        self.last_good.store(index, Ordering::Release);
    }

    fn parse_one(raw: &str) -> Result<Self> {
        let masked = mask(raw);
        let bad = |why: &str| Error::InvalidUrl(format!("invalid broker URL {masked:?}: {why}"));
        if let Some(rest) = strip_prefix_ignore_case(raw, "sqlite://") {
            return Self::parse_sqlite(rest, masked);
        }
        let url = Url::parse(raw).map_err(|err| bad(&err.to_string()))?;
        if let Some(scheme) = amqp_scheme(url.scheme()) {
            return Self::parse_amqp(&url, scheme, masked);
        }
        let scheme = match url.scheme() {
            "sentinel" => Scheme::Sentinel,
            "redis" => Scheme::Redis,
            "rediss" => Scheme::Rediss,
            "redis+socket" | "unix" | "socket" => Scheme::RedisSocket,
            other => return Err(bad(&format!("unsupported transport {other:?}"))),
        };
        let decode = |part: &str| {
            percent_decode(part)
                .map_err(|_| bad("user or password is not valid percent-encoded UTF-8"))
        };
        let username = match url.username() {
            "" => None,
            name => Some(decode(name)?),
        };
        let password = url.password().map(decode).transpose()?;
        let mut db = 0;
        let mut socket_path = None;
        if scheme == Scheme::RedisSocket {
            if url.path().is_empty() || url.path() == "/" {
                return Err(bad("a socket URL needs a path"));
            }
            socket_path = Some(url.path().to_owned());
            if let Some((_, value)) = url
                .query_pairs()
                .find(|(k, _)| k == "virtual_host" || k == "db")
            {
                db = value
                    .parse()
                    .map_err(|_| bad("the database must be a number"))?;
            }
        } else {
            let path = url.path().trim_matches('/');
            if !path.is_empty() {
                db = path
                    .parse()
                    .map_err(|_| bad(&format!("the database {path:?} is not a number")))?;
            }
            if db < 0 {
                return Err(bad("the database must not be negative"));
            }
        }
        let tls_pairs = url.query_pairs().filter(|(key, _)| key.starts_with("ssl_"));
        let tls_pairs: Vec<(String, String)> = tls_pairs
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        let redis_tls = match scheme {
            Scheme::Rediss => Some(RedisTls::from_query(
                tls_pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                |why| bad(&why),
            )?),
            _ if !tls_pairs.is_empty() => {
                return Err(bad(&format!(
                    "{} is a TLS parameter, but the URL is not rediss://",
                    tls_pairs[0].0
                )))
            }
            _ => None,
        };
        let host = url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_owned();
        let host = if host.is_empty() {
            "localhost".to_owned()
        } else {
            host
        };
        Ok(Self {
            scheme,
            port: url.port().unwrap_or(if scheme == Scheme::Sentinel {
                26379
            } else {
                6379
            }),
            port_given: url.port().is_some(),
            host,
            username,
            password,
            db,
            socket_path,
            sqlite_path: None,
            vhost: String::new(),
            redis_tls,
            masked,
            failover: Vec::new(),
            last_good: no_host_yet(),
            sentinel: Arc::default(),
        })
    }

    /// kombu's rules: default user and password `guest`, port 5672 (5671 with TLS);
    /// the vhost is the path without its first `/`, percent-decoded, and `/` when that
    /// leaves nothing (`amqp://h//` and `amqp://h/` are both vhost `/`).
    fn parse_amqp(url: &Url, scheme: Scheme, masked: String) -> Result<Self> {
        let bad = |why: &str| Error::InvalidUrl(format!("invalid broker URL {masked:?}: {why}"));
        let decode = |part: &str| {
            percent_decode(part)
                .map_err(|_| bad("a part of the URL is not valid percent-encoded UTF-8"))
        };
        let username = match url.username() {
            "" => "guest".to_owned(),
            name => decode(name)?,
        };
        let password = match url.password() {
            None => "guest".to_owned(),
            Some(password) => decode(password)?,
        };
        let path = url.path();
        let path = path.strip_prefix('/').unwrap_or(path);
        let vhost = match decode(path)? {
            vhost if vhost.is_empty() => "/".to_owned(),
            vhost => vhost,
        };
        let host = url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_owned();
        let host = if host.is_empty() {
            "localhost".to_owned()
        } else {
            host
        };
        let default_port = if scheme == Scheme::Amqps { 5671 } else { 5672 };
        Ok(Self {
            scheme,
            port: url.port().unwrap_or(default_port),
            port_given: url.port().is_some(),
            host,
            username: Some(username),
            password: Some(password),
            db: 0,
            socket_path: None,
            sqlite_path: None,
            vhost,
            redis_tls: None,
            masked,
            failover: Vec::new(),
            last_good: no_host_yet(),
            sentinel: Arc::default(),
        })
    }

    /// `sqlite:///abs/path.db` (absolute) or `sqlite://relative.db`: everything after
    /// `sqlite://` is the path, taken literally (no percent-decoding, no query).
    fn parse_sqlite(path: &str, masked: String) -> Result<Self> {
        let bad = |why: &str| Error::InvalidUrl(format!("invalid broker URL {masked:?}: {why}"));
        if path.is_empty() || path == "/" {
            return Err(bad(
                "a SQLite URL needs a file: sqlite:///abs/path.db or sqlite://relative.db",
            ));
        }
        if path.contains('?') || path.contains('#') {
            return Err(bad("a SQLite URL takes no query or fragment"));
        }
        if path == ":memory:" || path.starts_with("file:") || path.contains('\0') {
            return Err(bad(
                "an in-memory or URI-style database cannot be shared between processes; \
                 give a file path",
            ));
        }
        if path.ends_with('/') {
            return Err(bad("the path names a directory, not a database file"));
        }
        Ok(Self {
            scheme: Scheme::Sqlite,
            host: String::new(),
            port: 0,
            port_given: false,
            username: None,
            password: None,
            db: 0,
            socket_path: None,
            sqlite_path: Some(PathBuf::from(path)),
            vhost: String::new(),
            redis_tls: None,
            masked,
            failover: Vec::new(),
            last_good: no_host_yet(),
            sentinel: Arc::default(),
        })
    }

    /// The URL as given, password replaced by `**`.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// For a `sentinel://` URL: its sentinel transport options (the default until
    /// [`BrokerUrl::with_sentinel`] gives them).
    pub fn sentinel(&self) -> &SentinelOptions {
        &self.sentinel
    }

    /// This URL with the sentinel options read from `transport_options` (kombu's
    /// `master_name`, `sentinel_kwargs`, `min_other_sentinels`); other URLs as they are.
    pub fn with_sentinel(
        &self,
        transport_options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        if self.scheme != Scheme::Sentinel {
            return Ok(self.clone());
        }
        let options = SentinelOptions::from_transport(transport_options)?;
        Ok(self.with_sentinel_options(options))
    }

    /// This URL with `options` as its sentinel options.
    pub fn with_sentinel_options(&self, options: SentinelOptions) -> Self {
        let mut url = self.clone();
        url.sentinel = Arc::new(options);
        url
    }

    /// This URL with the TLS settings of `setting` (`broker_use_ssl`,
    /// `redis_backend_use_ssl`) under those of its query; a dict makes `redis://` use
    /// TLS too, as in kombu and Celery, and a `sentinel://` list's master (not its
    /// sentinels: those take `sentinel_kwargs`). URLs of other transports are returned as
    /// they are (AMQP reads its own TLS settings).
    pub fn with_redis_tls(&self, setting: Option<&RedisTls>) -> Self {
        let mut url = self.clone();
        if let (
            Some(setting),
            Scheme::Redis | Scheme::Rediss | Scheme::RedisSocket | Scheme::Sentinel,
        ) = (setting, self.scheme)
        {
            url.redis_tls = Some(match &self.redis_tls {
                Some(own) => own.or(setting),
                None => setting.clone(),
            });
        }
        url
    }

    pub fn to_redis_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
        let addr = match (self.scheme, &self.redis_tls) {
            (Scheme::Redis | Scheme::Rediss, Some(tls)) => ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: !tls.verifies(),
                tls_params: None,
            },
            (Scheme::Redis | Scheme::Rediss, None) => {
                ConnectionAddr::Tcp(self.host.clone(), self.port)
            }
            (Scheme::RedisSocket, Some(_)) => {
                return Err(Error::Config(format!(
                    "{:?}: TLS is for TCP connections, not a unix socket",
                    self.masked
                )))
            }
            (Scheme::RedisSocket, None) => {
                ConnectionAddr::Unix(self.socket_path.clone().unwrap_or_default().into())
            }
            (Scheme::Sqlite, _) => {
                return Err(Error::InvalidUrl(format!(
                    "{:?} is a SQLite URL, not a Redis one",
                    self.masked
                )))
            }
            (Scheme::Amqp | Scheme::Amqps, _) => {
                return Err(Error::InvalidUrl(format!(
                    "{:?} is an AMQP URL, not a Redis one",
                    self.masked
                )))
            }
            (Scheme::Sentinel, _) => {
                return Err(Error::InvalidUrl(format!(
                    "{:?} names sentinels, not a Redis server: ask them for the master \
                     (broker::redis::sentinel::connection_info)",
                    self.masked
                )))
            }
        };
        let mut redis = RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            redis = redis.set_username(user.clone());
        }
        if let Some(password) = &self.password {
            redis = redis.set_password(password.clone());
        }
        addr.into_connection_info()
            .map(|info| info.set_redis_settings(redis))
            .map_err(Error::from)
    }
}

fn no_host_yet() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(usize::MAX))
}

/// Fisher-Yates with a seed from the UUID generator's randomness (no `rand` crate).
fn shuffle(items: &mut [usize]) {
    let mut state = uuid::Uuid::new_v4().as_u128() as u64 | 1;
    for upper in (1..items.len()).rev() {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(upper, (state % (upper as u64 + 1)) as usize);
    }
}

fn amqp_scheme(scheme: &str) -> Option<Scheme> {
    match scheme {
        "amqp" | "pyamqp" => Some(Scheme::Amqp),
        "amqps" => Some(Scheme::Amqps),
        _ => None,
    }
}

fn strip_prefix_ignore_case<'a>(raw: &'a str, prefix: &str) -> Option<&'a str> {
    let head = raw.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &raw[prefix.len()..])
}

fn percent_decode(part: &str) -> std::result::Result<String, std::str::Utf8Error> {
    url::form_urlencoded::parse(format!("x={}", part.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| Ok(v.into_owned()))
        .unwrap_or_else(|| Ok(String::new()))
}

/// Replace the password of `transport://user:password@host...` with `**`, in every
/// entry of a `;`-separated failover list.
///
/// Works on text, not on a parsed URL, so that even a URL we cannot parse is masked
/// before it appears in an error message.
pub fn mask(raw: &str) -> String {
    if raw.contains(';') {
        return raw.split(';').map(mask_one).collect::<Vec<_>>().join(";");
    }
    mask_one(raw)
}

fn mask_one(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_owned();
    };
    let credentials = &authority[..at];
    let Some(colon) = credentials.find(':') else {
        return raw.to_owned();
    };
    format!(
        "{}{}:**{}",
        &raw[..scheme_end + 3],
        &credentials[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_only() {
        assert_eq!(
            mask("redis://:secret@localhost:6379/0"),
            "redis://:**@localhost:6379/0"
        );
        assert_eq!(
            mask("amqp://guest:guest@localhost:5672//"),
            "amqp://guest:**@localhost:5672//"
        );
        assert_eq!(mask("redis://localhost:6379/0"), "redis://localhost:6379/0");
        assert_eq!(mask("redis://user@host/1"), "redis://user@host/1");
        assert_eq!(mask("redis://u:p@ss@host/1"), "redis://u:**@host/1");
        assert_eq!(mask("not a url"), "not a url");
    }

    #[test]
    fn parses_redis_urls() {
        let url = BrokerUrl::parse("redis://:pw@127.0.0.1:6380/3").unwrap();
        assert_eq!(url.scheme, Scheme::Redis);
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("127.0.0.1", 6380, 3)
        );
        assert_eq!(url.password.as_deref(), Some("pw"));
        let url = BrokerUrl::parse("redis://localhost").unwrap();
        assert_eq!((url.port, url.db), (6379, 0));
        let url = BrokerUrl::parse("redis://localhost:6379//").unwrap();
        assert_eq!(url.db, 0);
        let url = BrokerUrl::parse("redis://:p%40ss@localhost/0").unwrap();
        assert_eq!(url.password.as_deref(), Some("p@ss"));
    }

    #[test]
    fn rediss_urls_carry_their_tls_query() {
        use crate::broker::redis::CertReqs;
        let url = BrokerUrl::parse("rediss://u:pw@h:6380/1?ssl_cert_reqs=CERT_NONE").unwrap();
        let tls = url.redis_tls.clone().unwrap();
        assert_eq!(tls.cert_reqs, Some(CertReqs::None));
        assert!(!tls.verifies());
        assert_eq!(url.username.as_deref(), Some("u"));
        let plain = BrokerUrl::parse("redis://h/0").unwrap();
        assert!(plain.redis_tls.is_none());
        // a setting turns TLS on for redis://; the URL's keys win over the setting's
        let setting = RedisTls {
            cert_reqs: Some(CertReqs::Required),
            ca_certs: Some("/ca.pem".into()),
            ..RedisTls::default()
        };
        let both = url.with_redis_tls(Some(&setting)).redis_tls.unwrap();
        assert_eq!(both.cert_reqs, Some(CertReqs::None));
        assert_eq!(both.ca_certs.as_deref(), Some("/ca.pem"));
        assert!(plain.with_redis_tls(Some(&setting)).redis_tls.is_some());
        // and for the master a sentinel:// list names (kombu's broker_use_ssl)
        let sentinels = BrokerUrl::parse("sentinel://h:26379;sentinel://g:26379").unwrap();
        assert!(sentinels.redis_tls.is_none());
        assert_eq!(
            sentinels.with_redis_tls(Some(&setting)).redis_tls,
            Some(setting.clone())
        );
        for raw in [
            "redis://:secret@h/0?ssl_cert_reqs=required",
            "rediss://:secret@h/0?ssl_cert_reqs=sometimes",
            "rediss://:secret@h/0?ssl_check_hostname=false",
        ] {
            let err = BrokerUrl::parse(raw).unwrap_err().to_string();
            assert!(err.contains(":**@h/0") && !err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn bad_urls_name_the_masked_url() {
        for raw in [
            "redis://:secret@localhost:6379/notadb",
            "kafka://:secret@localhost",
            "redis://:secret@localhost:99999/0",
        ] {
            let err = BrokerUrl::parse(raw).unwrap_err().to_string();
            assert!(err.contains(":**@localhost"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        assert!(BrokerUrl::parse("").is_err());
    }

    #[test]
    fn parses_sqlite_urls() {
        let url = BrokerUrl::parse("sqlite:///tmp/dir/x.db").unwrap();
        assert_eq!(url.scheme, Scheme::Sqlite);
        assert_eq!(url.sqlite_path, Some(PathBuf::from("/tmp/dir/x.db")));
        assert_eq!(url.masked(), "sqlite:///tmp/dir/x.db");
        let url = BrokerUrl::parse("sqlite://celeriac.sqlite3").unwrap();
        assert_eq!(url.sqlite_path, Some(PathBuf::from("celeriac.sqlite3")));
        let url = BrokerUrl::parse("SQLite://sub/dir/q.db").unwrap();
        assert_eq!(url.sqlite_path, Some(PathBuf::from("sub/dir/q.db")));
        // SQLAlchemy's four slashes are an absolute path too.
        let url = BrokerUrl::parse("sqlite:////var/x.db").unwrap();
        assert!(url.sqlite_path.as_ref().unwrap().is_absolute());
        assert!(url.to_redis_info().is_err());
    }

    #[test]
    fn bad_sqlite_urls_are_invalid() {
        for raw in [
            "sqlite://",
            "sqlite:///",
            "sqlite://:memory:",
            "sqlite:///tmp/x.db?mode=ro",
            "sqlite:///tmp/dir/",
            "sqlite://file:x.db",
        ] {
            let err = BrokerUrl::parse(raw).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl(_)), "{raw}: {err:?}");
            assert!(err.to_string().contains("sqlite://"), "{err}");
        }
    }

    #[test]
    fn parses_amqp_urls_with_kombus_vhost_rules() {
        let url = BrokerUrl::parse("amqp://guest:guest@localhost:5672//").unwrap();
        assert_eq!(url.scheme, Scheme::Amqp);
        assert_eq!((url.host.as_str(), url.port), ("localhost", 5672));
        assert_eq!(url.vhost, "/");
        assert_eq!(url.masked(), "amqp://guest:**@localhost:5672//");
        assert_eq!(BrokerUrl::parse("amqp://h/").unwrap().vhost, "/");
        assert_eq!(BrokerUrl::parse("amqp://h").unwrap().vhost, "/");
        assert_eq!(BrokerUrl::parse("amqp://h/foo").unwrap().vhost, "foo");
        assert_eq!(BrokerUrl::parse("amqp://h/%2F").unwrap().vhost, "/");
        assert_eq!(BrokerUrl::parse("amqp://h/a%2Fb").unwrap().vhost, "a/b");
        let url = BrokerUrl::parse("pyamqp://h").unwrap();
        assert_eq!(url.scheme, Scheme::Amqp);
        assert_eq!(url.username.as_deref(), Some("guest"));
        assert_eq!(url.password.as_deref(), Some("guest"));
        let url = BrokerUrl::parse("amqps://u:p%40ss@rabbit.example/prod").unwrap();
        assert_eq!((url.scheme, url.port), (Scheme::Amqps, 5671));
        assert!(!url.port_given);
        assert!(BrokerUrl::parse("amqp://h:5672//").unwrap().port_given);
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(url.vhost, "prod");
        assert!(url.to_redis_info().is_err());
        let err = BrokerUrl::parse("amqp://u:secret@h:99999/")
            .unwrap_err()
            .to_string();
        assert!(err.contains("u:**@h") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn masks_every_entry_of_a_list() {
        assert_eq!(
            mask("amqp://u:one@a:5672//;amqp://v:two@b:5673/x"),
            "amqp://u:**@a:5672//;amqp://v:**@b:5673/x"
        );
        assert_eq!(
            mask("amqp://a//; amqp://v:two@b//"),
            "amqp://a//; amqp://v:**@b//"
        );
    }

    #[test]
    fn parses_failover_lists_entry_by_entry() {
        let url = BrokerUrl::parse("amqp://u:one@a:5680/v1;amqps://w:two@b/v2").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("a", 5680));
        assert_eq!(url.masked(), "amqp://u:**@a:5680/v1;amqps://w:**@b/v2");
        let hosts = url.hosts();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].masked(), "amqp://u:**@a:5680/v1");
        assert_eq!(
            (hosts[1].scheme, hosts[1].host.as_str(), hosts[1].port),
            (Scheme::Amqps, "b", 5671)
        );
        assert_eq!(hosts[1].password.as_deref(), Some("two"));
        assert_eq!(hosts[1].vhost, "v2");
        let single = BrokerUrl::parse("amqp://a//").unwrap();
        assert_eq!(single.hosts().len(), 1);
        assert_eq!(single.connect_order(FailoverStrategy::Shuffle), [0]);
    }

    #[test]
    fn bad_lists_are_invalid_and_masked() {
        for (raw, why) in [
            ("amqp://u:pwaaa@a//;", "empty"),
            ("amqp://u:pwaaa@a//;;amqp://b//", "empty"),
            ("amqp://u:pwaaa@a//;redis://:pwbbb@b/0", "mixes transports"),
            ("redis://:one@a/0;redis://:pwbbb@b/0", "RabbitMQ"),
            ("amqp://u:pwaaa@a//;amqp://v:pwbbb@b:99999//", "v:**@b"),
        ] {
            let err = BrokerUrl::parse(raw).unwrap_err();
            assert!(matches!(err, Error::InvalidUrl(_)), "{raw}: {err:?}");
            let text = err.to_string();
            assert!(text.contains(why), "{raw}: {text}");
            assert!(!text.contains("pwaaa") && !text.contains("pwbbb"), "{text}");
        }
    }

    #[test]
    fn parses_sentinel_lists_with_kombus_default_port() {
        let url = BrokerUrl::parse("sentinel://:pw@10.0.0.1/2;sentinel://10.0.0.2:26380").unwrap();
        assert_eq!(url.scheme, Scheme::Sentinel);
        assert_eq!((url.port, url.db), (26379, 2));
        assert_eq!(url.password.as_deref(), Some("pw"));
        let ports: Vec<u16> = url.hosts().iter().map(|host| host.port).collect();
        assert_eq!(ports, [26379, 26380]);
        assert_eq!(
            url.masked(),
            "sentinel://:**@10.0.0.1/2;sentinel://10.0.0.2:26380"
        );
        assert!(matches!(url.to_redis_info(), Err(Error::InvalidUrl(_))));
        let err = BrokerUrl::parse("sentinel://:pwaaa@a;amqp://b//").unwrap_err();
        assert!(
            err.to_string()
                .contains("every entry must be a sentinel:// URL"),
            "{err}"
        );
        assert!(!err.to_string().contains("pwaaa"), "{err}");
    }

    #[test]
    fn round_robin_starts_at_the_host_that_last_worked() {
        let url = BrokerUrl::parse("amqp://a//;amqp://b//;amqp://c//").unwrap();
        let order = |url: &BrokerUrl| url.connect_order(FailoverStrategy::RoundRobin);
        assert_eq!(order(&url), [0, 1, 2]);
        let clone = url.clone();
        clone.connected_to(1);
        assert_eq!(order(&url), [1, 2, 0], "clones share the last good host");
        url.connected_to(2);
        assert_eq!(order(&clone), [2, 0, 1]);
    }

    #[test]
    fn shuffle_tries_every_host_once_last_good_first() {
        let url = BrokerUrl::parse("amqp://a//;amqp://b//;amqp://c//;amqp://d//").unwrap();
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut order = url.connect_order(FailoverStrategy::Shuffle);
            firsts.insert(order[0]);
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2, 3]);
        }
        assert_eq!(
            firsts.len(),
            4,
            "every host comes first sometimes: {firsts:?}"
        );
        url.connected_to(3);
        for _ in 0..20 {
            assert_eq!(url.connect_order(FailoverStrategy::Shuffle)[0], 3);
        }
    }

    #[test]
    fn failover_strategy_names_are_kombus() {
        assert_eq!(
            FailoverStrategy::parse("round-robin").unwrap(),
            FailoverStrategy::RoundRobin
        );
        assert_eq!(
            FailoverStrategy::parse("shuffle").unwrap(),
            FailoverStrategy::Shuffle
        );
        let err = FailoverStrategy::parse("random").unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("\"random\""), "{err}");
    }
}
