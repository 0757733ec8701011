//! Every `redis::Client` of the Redis broker, result backend and beat store is made
//! here ([`open_client`]), so TLS (`rediss://`, `broker_use_ssl`,
//! `redis_backend_use_ssl`) and ACL users work the same everywhere.
//!
//! TLS settings come from two places, read with Celery's names:
//! - the URL's query, as Celery's Redis backend reads it:
//!   `rediss://host/0?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem`;
//! - the setting's dict (`broker_use_ssl`, `redis_backend_use_ssl`): `ssl_cert_reqs`,
//!   `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, or `True` for the defaults.
//!
//! A key in the URL wins over the same key in the dict. A dict makes a `redis://` URL
//! use TLS too (as kombu and Celery do); `ssl_*` in the query of a `redis://` URL is
//! refused (as Celery's backend does), since the URL says "no TLS".
//!
//! `ssl_cert_reqs`: `required` (the default: the server's certificate must chain to a
//! trusted CA and name the host of the URL), `optional` (the same: a TLS server always
//! sends its certificate, and Python's `CERT_OPTIONAL` then checks it as `required`
//! does), `none` (no check at all: anyone on the path can read and change the traffic).

use serde_json::Value;

use super::nodelay;
use crate::broker::url::BrokerUrl;
use crate::error::{Error, Result};

/// How the server's certificate is checked (`ssl_cert_reqs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqs {
    Required,
    Optional,
    None,
}

impl CertReqs {
    /// kombu's spellings: `CERT_REQUIRED`, `required`, ... and `ssl.CERT_*`'s values.
    fn parse(value: &Value) -> Option<Self> {
        match value {
            Value::String(text) => match text.as_str() {
                "CERT_REQUIRED" | "required" => Some(Self::Required),
                "CERT_OPTIONAL" | "optional" => Some(Self::Optional),
                "CERT_NONE" | "none" => Some(Self::None),
                _ => None,
            },
            Value::Number(number) => match number.as_u64() {
                Some(2) => Some(Self::Required),
                Some(1) => Some(Self::Optional),
                Some(0) => Some(Self::None),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The TLS settings of one Redis URL. Files are read when a client is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// `None`: not given (checked as `required`).
    pub cert_reqs: Option<CertReqs>,
    /// PEM file of the CAs to trust instead of the system's.
    pub ca_certs: Option<String>,
    /// PEM file of the client certificate (and its key when `keyfile` is not given).
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
}

const KEYS: &str = "ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile";
const CERT_REQS_VALUES: &str = "CERT_REQUIRED, CERT_OPTIONAL or CERT_NONE \
    (or required, optional, none; or ssl.CERT_*)";

impl RedisTls {
    /// From a setting (`broker_use_ssl`, `redis_backend_use_ssl`): `True`, or a dict of
    /// `ssl_*` keys; `None` for `False`/`None`/an empty dict. `Error::Config` names the
    /// setting and the key.
    pub fn from_setting(setting: &str, value: &Value) -> Result<Option<Self>> {
        let bad = |why: String| Error::Config(format!("{setting}: {why}"));
        let object = match value {
            Value::Null | Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return Ok(Some(Self::default())),
            Value::Object(object) if object.is_empty() => return Ok(None),
            Value::Object(object) => object,
            other => {
                return Err(bad(format!(
                    "must be True or a dict ({KEYS}) for Redis, not {other}"
                )))
            }
        };
        let mut tls = Self::default();
        for (key, item) in object {
            if item.is_null() {
                continue;
            }
            let path = || match item {
                Value::String(path) if !path.is_empty() => Ok(Some(path.clone())),
                other => Err(bad(format!("{key} must be a file path, not {other}"))),
            };
            match key.as_str() {
                "ssl_cert_reqs" => {
                    tls.cert_reqs = Some(CertReqs::parse(item).ok_or_else(|| {
                        bad(format!(
                            "ssl_cert_reqs must be {CERT_REQS_VALUES}, not {item}"
                        ))
                    })?);
                }
                "ssl_ca_certs" => tls.ca_certs = path()?,
                "ssl_certfile" => tls.certfile = path()?,
                "ssl_keyfile" => tls.keyfile = path()?,
                other => {
                    return Err(bad(format!(
                        "unknown key {other:?}; the Redis transport takes {KEYS}"
                    )))
                }
            }
        }
        Ok(Some(tls))
    }

    /// From the `ssl_*` pairs of a URL's query. `why` makes the error (the caller
    /// names the masked URL).
    pub fn from_query<'a>(
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
        why: impl Fn(String) -> Error,
    ) -> Result<Self> {
        let mut tls = Self::default();
        for (key, value) in pairs {
            let path = || {
                if value.is_empty() {
                    Err(why(format!("{key} is empty")))
                } else {
                    Ok(Some(value.to_owned()))
                }
            };
            match key {
                "ssl_cert_reqs" => {
                    let reqs = CertReqs::parse(&Value::String(value.to_owned()));
                    tls.cert_reqs = Some(reqs.ok_or_else(|| {
                        why(format!(
                            "ssl_cert_reqs must be {CERT_REQS_VALUES}, not {value:?}"
                        ))
                    })?);
                }
                "ssl_ca_certs" => tls.ca_certs = path()?,
                "ssl_certfile" => tls.certfile = path()?,
                "ssl_keyfile" => tls.keyfile = path()?,
                other => {
                    return Err(why(format!(
                        "unknown TLS parameter {other:?}; a rediss:// URL takes {KEYS}"
                    )))
                }
            }
        }
        Ok(tls)
    }

    /// These settings, each unset one taken from `fallback` (the URL's over the dict's).
    pub fn or(&self, fallback: &Self) -> Self {
        Self {
            cert_reqs: self.cert_reqs.or(fallback.cert_reqs),
            ca_certs: self.ca_certs.clone().or_else(|| fallback.ca_certs.clone()),
            certfile: self.certfile.clone().or_else(|| fallback.certfile.clone()),
            keyfile: self.keyfile.clone().or_else(|| fallback.keyfile.clone()),
        }
    }

    /// Whether the server's certificate is checked.
    pub fn verifies(&self) -> bool {
        self.cert_reqs != Some(CertReqs::None)
    }

    /// The files, read and checked: `Error::Config` names the key, the path and the URL.
    pub(crate) fn certificates(&self, masked: &str) -> Result<redis::TlsCertificates> {
        let bad = |why: String| Error::Config(format!("TLS for {masked}: {why}"));
        let read = |key: &str, path: &str| -> Result<Vec<u8>> {
            std::fs::read(path).map_err(|err| bad(format!("cannot read {key} {path:?}: {err}")))
        };
        let holds = |pem: &[u8], what: &str| String::from_utf8_lossy(pem).contains(what);
        let root_cert = match &self.ca_certs {
            Some(path) => {
                let pem = read("ssl_ca_certs", path)?;
                if !holds(&pem, "-----BEGIN CERTIFICATE-----") {
                    return Err(bad(format!(
                        "ssl_ca_certs {path:?} holds no PEM certificate"
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.certfile, &self.keyfile) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad("ssl_keyfile is given without ssl_certfile".into())),
            (Some(cert), key) => {
                let client_cert = read("ssl_certfile", cert)?;
                if !holds(&client_cert, "-----BEGIN CERTIFICATE-----") {
                    return Err(bad(format!(
                        "ssl_certfile {cert:?} holds no PEM certificate"
                    )));
                }
                // Python's ssl takes the key from the certificate's file when no
                // keyfile is given.
                let client_key = match key {
                    Some(key) => read("ssl_keyfile", key)?,
                    None => client_cert.clone(),
                };
                if !holds(&client_key, "PRIVATE KEY-----") {
                    return Err(bad(format!(
                        "{} holds no PEM private key",
                        key.as_deref().map_or_else(
                            || format!("ssl_certfile {cert:?}"),
                            |key| format!("ssl_keyfile {key:?}")
                        )
                    )));
                }
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// A client for `url` (its user and password, its database, TLS when the URL or a
/// setting asks for it), with `TCP_NODELAY`. Nothing is sent yet: the first
/// connection reports an unreachable server or a failed handshake.
pub fn open_client(url: &BrokerUrl) -> Result<redis::Client> {
    open_client_at(url, url.to_redis_info()?)
}

/// A client as [`open_client`] makes it, for `info`: the server a `sentinel://` list
/// names as its current master, with `url`'s TLS settings.
pub fn open_client_at(url: &BrokerUrl, info: redis::ConnectionInfo) -> Result<redis::Client> {
    let masked = url.masked();
    let info = nodelay(info);
    let client = match &url.redis_tls {
        None => redis::Client::open(info),
        Some(tls) => redis::Client::build_with_tls(info, tls.certificates(masked)?),
    };
    client.map_err(|err| Error::Config(format!("cannot use {masked}: {err}")))
}

/// A failed connection of `client` to `masked`: what the client said, and what to
/// change when it is a TLS failure.
pub fn connect_error(client: &redis::Client, masked: &str, err: &dyn std::fmt::Display) -> Error {
    let text = err.to_string();
    Error::Connection(format!(
        "cannot connect to {masked}: {text}{}",
        tls_hint(client, &text)
    ))
}

/// What to change for a TLS failure of `client` that its error `text` describes ("" for
/// other failures).
pub fn tls_hint(client: &redis::Client, text: &str) -> &'static str {
    let tls = matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    );
    if !tls {
        ""
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "; the server's certificate is not signed by a trusted CA: give its CA in \
         ssl_ca_certs"
    } else if text.contains("Expired") {
        "; the server's certificate has expired"
    } else if text.contains("NotValidForName") {
        "; the server's certificate does not name this host"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "; the server asks for a client certificate: give ssl_certfile and ssl_keyfile"
    } else if text.contains("corrupt message") || text.contains("InvalidContentType") {
        "; the server does not speak TLS on this port (use redis://, or its TLS port)"
    } else if text.contains("timed out") || text.contains("no answer") {
        "; no TLS handshake: is this the server's TLS port? (a plain Redis port does not \
         answer a TLS hello)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_reqs_takes_kombus_spellings() {
        for (given, want) in [
            (Value::from("CERT_REQUIRED"), CertReqs::Required),
            (Value::from("required"), CertReqs::Required),
            (Value::from(2), CertReqs::Required),
            (Value::from("optional"), CertReqs::Optional),
            (Value::from(1), CertReqs::Optional),
            (Value::from("CERT_NONE"), CertReqs::None),
            (Value::from(0), CertReqs::None),
        ] {
            assert_eq!(CertReqs::parse(&given), Some(want), "{given}");
        }
        for given in [Value::from("Required"), Value::from(3), Value::from(true)] {
            assert_eq!(CertReqs::parse(&given), None, "{given}");
        }
    }

    #[test]
    fn settings_are_read_by_kombus_keys() {
        let value = serde_json::json!({"ssl_cert_reqs": "none", "ssl_ca_certs": "/ca.pem"});
        let tls = RedisTls::from_setting("broker_use_ssl", &value)
            .ok()
            .flatten();
        assert_eq!(
            tls,
            Some(RedisTls {
                cert_reqs: Some(CertReqs::None),
                ca_certs: Some("/ca.pem".into()),
                ..RedisTls::default()
            })
        );
        let on = RedisTls::from_setting("x", &Value::Bool(true))
            .ok()
            .flatten();
        assert_eq!(on, Some(RedisTls::default()));
        let off = RedisTls::from_setting("x", &Value::Bool(false))
            .ok()
            .flatten();
        assert_eq!(off, None);
    }

    #[test]
    fn bad_settings_name_the_setting_and_key() {
        for (value, text) in [
            (
                serde_json::json!({"ca_certs": "/x"}),
                "unknown key \"ca_certs\"",
            ),
            (
                serde_json::json!({"ssl_cert_reqs": "maybe"}),
                "ssl_cert_reqs must be",
            ),
            (
                serde_json::json!({"ssl_ca_certs": 3}),
                "must be a file path",
            ),
            (serde_json::json!("yes"), "must be True or a dict"),
        ] {
            let err = RedisTls::from_setting("redis_backend_use_ssl", &value);
            let err = err.err().map(|err| err.to_string()).unwrap_or_default();
            assert!(
                err.contains("redis_backend_use_ssl") && err.contains(text),
                "{err}"
            );
        }
    }

    #[test]
    fn the_urls_keys_win_over_the_settings() {
        let url = RedisTls {
            cert_reqs: Some(CertReqs::Required),
            ..RedisTls::default()
        };
        let setting = RedisTls {
            cert_reqs: Some(CertReqs::None),
            ca_certs: Some("/ca.pem".into()),
            ..RedisTls::default()
        };
        let both = url.or(&setting);
        assert_eq!(both.cert_reqs, Some(CertReqs::Required));
        assert_eq!(both.ca_certs.as_deref(), Some("/ca.pem"));
    }

    #[test]
    fn missing_files_name_the_key_and_path() {
        let tls = RedisTls {
            ca_certs: Some("/no/such/ca.pem".into()),
            ..RedisTls::default()
        };
        let err = tls.certificates("rediss://:**@h/0").err();
        let err = format!("{err:?}");
        assert!(
            err.contains("ssl_ca_certs \\\"/no/such/ca.pem\\\""),
            "{err}"
        );
        assert!(err.contains("rediss://:**@h/0"), "{err}");
    }
}
