//! Broker and result-store URLs: parsing, validation and masking.
//!
//! Celery's form is `transport://user:password@host:port/vhost`; the password never
//! reaches a log line or the banner, so every error here names the masked URL.

use std::path::PathBuf;

use url::Url;

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
    masked: String,
}

impl BrokerUrl {
    pub fn parse(raw: &str) -> Result<Self> {
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
            port: url.port().unwrap_or(6379),
            port_given: url.port().is_some(),
            host,
            username,
            password,
            db,
            socket_path,
            sqlite_path: None,
            vhost: String::new(),
            masked,
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
            masked,
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
            masked,
        })
    }

    /// The URL as given, password replaced by `**`.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    pub fn to_redis_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
        let addr = match self.scheme {
            Scheme::Redis => ConnectionAddr::Tcp(self.host.clone(), self.port),
            Scheme::Rediss => {
                return Err(Error::InvalidUrl(format!(
                    "invalid broker URL {:?}: TLS (rediss://) is not supported yet",
                    self.masked
                )))
            }
            Scheme::RedisSocket => {
                ConnectionAddr::Unix(self.socket_path.clone().unwrap_or_default().into())
            }
            Scheme::Sqlite => {
                return Err(Error::InvalidUrl(format!(
                    "{:?} is a SQLite URL, not a Redis one",
                    self.masked
                )))
            }
            Scheme::Amqp | Scheme::Amqps => {
                return Err(Error::InvalidUrl(format!(
                    "{:?} is an AMQP URL, not a Redis one",
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

/// Replace the password of `transport://user:password@host...` with `**`.
///
/// Works on text, not on a parsed URL, so that even a URL we cannot parse is masked
/// before it appears in an error message.
pub fn mask(raw: &str) -> String {
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
}
