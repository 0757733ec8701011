//! Connecting: the URI, TLS and the text of connection errors.

use super::*;

/// Whether the connection uses TLS: an `amqps://` URL, or `broker_use_ssl`.
pub fn uses_tls(url: &BrokerUrl, options: &AmqpOptions) -> bool {
    url.scheme == Scheme::Amqps || options.tls.is_some()
}

pub(super) fn amqp_uri(url: &BrokerUrl, options: &AmqpOptions) -> AMQPUri {
    let tls = uses_tls(url, options);
    AMQPUri {
        scheme: if tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: url.username.clone().unwrap_or_else(|| "guest".into()),
                password: url.password.clone().unwrap_or_else(|| "guest".into()),
            },
            host: url.host.clone(),
            // kombu: `amqp://` with `broker_use_ssl` and no port goes to 5671.
            port: if tls && !url.port_given {
                5671
            } else {
                url.port
            },
        },
        vhost: if url.vhost.is_empty() {
            "/".to_owned()
        } else {
            url.vhost.clone()
        },
        query: AMQPQueryString {
            heartbeat: options.heartbeat,
            connection_timeout: Some(options.connect_timeout.as_millis().max(1) as u64),
            ..AMQPQueryString::default()
        },
    }
}

/// A lapin error in words a user can act on.
pub fn describe(err: &lapin::Error, url: &BrokerUrl) -> String {
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        match amqp.kind() {
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return format!(
                    "the virtual host {:?} does not exist or the user may not use it ({})",
                    url.vhost,
                    amqp.get_message()
                );
            }
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return format!(
                    "access refused: wrong user name or password, or no permission ({})",
                    amqp.get_message()
                );
            }
            _ => {}
        }
    }
    let text = err.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("ACCESS-REFUSED") {
        return format!("access refused: wrong user name or password ({text})");
    }
    tls_hint(text)
}

/// A TLS failure in words: what rustls said, and what to change.
pub(super) fn tls_hint(text: String) -> String {
    let text = text
        .strip_prefix("IO error: ")
        .map_or(text.clone(), str::to_owned);
    if text.contains("invalid peer certificate") {
        format!(
            "TLS: the server's certificate is not trusted ({text}); give the CA that signed \
             it in broker_use_ssl's ca_certs"
        )
    } else if text.contains("received corrupt message") || text.contains("InvalidContentType") {
        format!("TLS: the server does not speak TLS on this port ({text})")
    } else if text.contains("peer is incompatible") || text.contains("handshake") {
        format!("TLS handshake failed ({text})")
    } else {
        text
    }
}

/// Open a connection on the current tokio runtime. For a failover list, the hosts are
/// tried one after the other in the order of `options.failover` (the host that last
/// accepted a connection first), each bounded by the connect timeout; the error names
/// every host's failure.
pub async fn connect(url: &BrokerUrl, options: &AmqpOptions, name: &str) -> Result<Connection> {
    let hosts = url.hosts();
    if hosts.len() == 1 {
        return connect_one(url, options, name).await;
    }
    let mut failures = Vec::with_capacity(hosts.len());
    for index in url.connect_order(options.failover) {
        let Some(host) = hosts.get(index) else {
            continue;
        };
        match connect_one(host, options, name).await {
            Ok(conn) => {
                url.connected_to(index);
                return Ok(conn);
            }
            Err(err) => failures.push(err.to_string()),
        }
    }
    Err(Error::Connection(format!(
        "cannot connect to any of the {} brokers of {}: {}",
        hosts.len(),
        url.masked(),
        failures.join("; ")
    )))
}

/// Open a connection to one host, bounded by the connect timeout.
async fn connect_one(url: &BrokerUrl, options: &AmqpOptions, name: &str) -> Result<Connection> {
    let masked = url.masked();
    let name = match &options.connection_name {
        Some(given) => format!("{given} {name}"),
        None => format!("celeriac {name} (pid {})", std::process::id()),
    };
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime = async_rs::Runtime::tokio_with_handle(tokio::runtime::Handle::current());
    let tls = options
        .tls
        .as_ref()
        .map(|tls| tls.config.clone())
        .unwrap_or_default();
    let attempt =
        Connection::connect_uri_with_config(amqp_uri(url, options), properties, tls, runtime);
    match tokio::time::timeout(options.connect_timeout, attempt).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(Error::Connection(format!(
            "cannot connect to {masked}: {}",
            describe(&err, url)
        ))),
        Err(_) => Err(Error::Connection(format!(
            "cannot connect to {masked}: timed out after {:.1}s",
            options.connect_timeout.as_secs_f64()
        ))),
    }
}

/// Error text for a lost connection (a `Connection` error: the consumer reconnects;
/// a consumer closed on purpose raises `Closed` instead, whatever the text says).
pub(super) fn lost_text(masked: &str, why: &str) -> String {
    format!("lost the connection to {masked}: {why}; reconnecting")
}

pub(super) fn connection_alive(conn: &Connection, channel: &Channel) -> bool {
    conn.status().connected() && channel.status().connected()
}
