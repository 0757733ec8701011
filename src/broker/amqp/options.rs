//! Options: the queues, exchanges and TLS settings read from the transport options.

use super::*;

/// How one queue is declared: Celery's `Queue(name, Exchange(exchange, type),
/// routing_key, durable, auto_delete, exclusive, queue_arguments)`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    /// `''` means the default exchange: nothing to declare or bind.
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub arguments: Map<String, Value>,
    pub exchange_durable: bool,
    pub exchange_auto_delete: bool,
}

impl QueueSpec {
    /// The queue Celery creates for a name it does not know (and its default queue):
    /// queue, direct exchange and routing key all named `name`, durable.
    pub fn celery(name: &str, arguments: Map<String, Value>) -> Self {
        Self {
            name: name.to_owned(),
            exchange: name.to_owned(),
            exchange_type: "direct".to_owned(),
            routing_key: name.to_owned(),
            durable: true,
            auto_delete: false,
            exclusive: false,
            arguments,
            exchange_durable: true,
            exchange_auto_delete: false,
        }
    }

    /// Celery 5.7's rpc reply queue: on the default exchange, durable, auto-delete,
    /// `x-expires` = `result_expires` in milliseconds.
    pub fn rpc_reply(name: &str, expires: Option<Duration>) -> Self {
        let mut arguments = Map::new();
        if let Some(expires) = expires.filter(|e| !e.is_zero()) {
            arguments.insert(
                "x-expires".into(),
                Value::from(expires.as_millis().min(i64::MAX as u128) as i64),
            );
        }
        Self {
            name: name.to_owned(),
            exchange: String::new(),
            exchange_type: "direct".to_owned(),
            routing_key: name.to_owned(),
            durable: true,
            auto_delete: true,
            exclusive: false,
            arguments,
            exchange_durable: true,
            exchange_auto_delete: false,
        }
    }

    pub(super) fn is_quorum(&self) -> bool {
        self.arguments.get("x-queue-type").and_then(Value::as_str) == Some("quorum")
    }
}

/// What this transport reads from `broker_transport_options` (plus the common
/// settings). celeriac's own keys, set by the Python side:
///
/// - `heartbeat` (seconds, `broker_heartbeat`; 0 = none; absent = the server's),
/// - `queue_arguments` (dict): arguments of every queue declared without a spec of its
///   own — `{"x-max-priority": N}` for `task_queue_max_priority`,
///   `{"x-queue-type": "quorum"}` for quorum queues,
/// - `queues` (dict name -> {`exchange`, `exchange_type`, `routing_key`, `durable`,
///   `auto_delete`, `exclusive`, `queue_arguments`}): `task_queues`,
/// - `qos_global` (bool): force `basic.qos`'s global flag,
/// - `max_message_size` (bytes),
/// - `ssl`: `broker_use_ssl` — `true` (TLS, the system's root certificates) or a
///   dict of `ca_certs`, `certfile`, `keyfile` (PEM file paths) and `cert_reqs`
///   (`"required"`, `"optional"`, `"none"`; see [`TlsSettings`]),
/// - `failover_strategy`: `broker_failover_strategy`, `"round-robin"` or `"shuffle"`
///   (the order in which the hosts of a `;`-separated URL list are tried),
/// - `native_delayed_delivery_queue_type`: `broker_native_delayed_delivery_queue_type`
///   (checked by a worker that declares the delayed-delivery levels, as Celery does).
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    pub connect_timeout: Duration,
    pub heartbeat: Option<u16>,
    pub queue_arguments: Map<String, Value>,
    pub queues: HashMap<String, QueueSpec>,
    pub qos_global: Option<bool>,
    pub max_message_size: usize,
    /// Shown in RabbitMQ's connection list (default: `celeriac <role> (pid N)`).
    pub connection_name: Option<String>,
    /// TLS settings from `broker_use_ssl`; `amqps://` uses TLS without them too.
    pub tls: Option<TlsSettings>,
    pub failover: FailoverStrategy,
    /// The type of the `celery_delayed_*` queues, as given (None: `quorum`).
    pub delayed_delivery_queue_type: Option<String>,
}

/// `broker_use_ssl`, read and checked once (the files are read when the options are,
/// so a missing file fails at start, naming the setting and the path).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSettings {
    /// Extra trusted roots (`ca_certs`) and the client certificate (`certfile` +
    /// `keyfile`), as lapin takes them. The system's roots are always trusted too.
    pub config: OwnedTLSConfig,
}

impl TlsSettings {
    /// From the `ssl` transport option: `true`, or a dict as Celery's
    /// `broker_use_ssl` (`ca_certs`, `certfile`, `keyfile`, `cert_reqs`).
    pub fn from_value(value: &Value) -> Result<Option<Self>> {
        let bad = |why: String| Error::Config(format!("broker_use_ssl: {why}"));
        let object = match value {
            Value::Null | Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return Ok(Some(Self::default())),
            Value::Object(object) => object,
            other => {
                return Err(bad(format!(
                    "must be True or a dict (ca_certs, certfile, keyfile, cert_reqs), not {other}"
                )))
            }
        };
        let path = |key: &str| -> Result<Option<String>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(path)) => Ok(Some(path.clone())),
                Some(other) => Err(bad(format!("{key} must be a file path, not {other}"))),
            }
        };
        let read = |key: &str, path: &str| -> Result<Vec<u8>> {
            std::fs::read(path).map_err(|err| bad(format!("cannot read {key} {path:?}: {err}")))
        };
        let mut settings = Self::default();
        match object.get("cert_reqs") {
            None | Some(Value::Null) => {}
            Some(Value::String(reqs)) if matches!(reqs.as_str(), "required" | "optional") => {}
            Some(Value::String(reqs)) if reqs == "none" => {
                return Err(bad(
                    "cert_reqs=CERT_NONE (no check of the server's certificate) is not \
                     supported; give the server's CA in ca_certs instead"
                        .into(),
                ))
            }
            Some(other) => {
                return Err(bad(format!(
                    "cert_reqs must be ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL or ssl.CERT_NONE, not {other}"
                )))
            }
        }
        if let Some(ca) = path("ca_certs")? {
            let pem = read("ca_certs", &ca)?;
            let text = String::from_utf8(pem)
                .ok()
                .filter(|text| text.contains("-----BEGIN CERTIFICATE-----"))
                .ok_or_else(|| bad(format!("ca_certs {ca:?} holds no PEM certificate")))?;
            settings.config.cert_chain = Some(text);
        }
        match (path("certfile")?, path("keyfile")?) {
            (None, None) => {}
            (Some(cert), key) => {
                let pem = read("certfile", &cert)?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(bad(format!("certfile {cert:?} holds no PEM certificate")));
                }
                // Python's ssl takes the key from the certificate file when no
                // keyfile is given.
                let key = match key {
                    Some(key) => read("keyfile", &key)?,
                    None => pem.clone(),
                };
                if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
                    return Err(bad("keyfile holds no PEM private key".into()));
                }
                settings.config.identity = Some(OwnedIdentity::PKCS8 { pem, key });
            }
            (None, Some(_)) => return Err(bad("keyfile is given without certfile".into())),
        }
        Ok(Some(settings))
    }
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(4),
            heartbeat: None,
            queue_arguments: Map::new(),
            queues: HashMap::new(),
            qos_global: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            connection_name: None,
            tls: None,
            failover: FailoverStrategy::default(),
            delayed_delivery_queue_type: None,
        }
    }
}

impl AmqpOptions {
    pub fn from_transport(given: &TransportOptions) -> Result<Self> {
        let mut options = Self {
            connect_timeout: given.connect_timeout,
            ..Self::default()
        };
        let bad = |key: &str, what: &str, value: &Value| {
            Error::Config(format!(
                "transport option {key:?} must be {what}, not {value}"
            ))
        };
        for (key, value) in &given.extra {
            match key.as_str() {
                "heartbeat" if !value.is_null() => {
                    let secs = value
                        .as_f64()
                        .filter(|s| (0.0..=65535.0).contains(s))
                        .ok_or_else(|| bad(key, "a number of seconds (0-65535)", value))?;
                    options.heartbeat = Some(secs.ceil() as u16);
                }
                "queue_arguments" if !value.is_null() => {
                    options.queue_arguments = value
                        .as_object()
                        .cloned()
                        .ok_or_else(|| bad(key, "a dict", value))?;
                }
                "queues" => {
                    let Some(queues) = value.as_object() else {
                        if value.is_null() {
                            continue;
                        }
                        return Err(bad(key, "a dict of queue name -> declaration", value));
                    };
                    for (name, spec) in queues {
                        options
                            .queues
                            .insert(name.clone(), parse_queue_spec(name, spec)?);
                    }
                }
                "qos_global" if !value.is_null() => {
                    options.qos_global =
                        Some(value.as_bool().ok_or_else(|| bad(key, "a bool", value))?);
                }
                "max_message_size" if !value.is_null() => {
                    options.max_message_size = value
                        .as_u64()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(key, "a positive number of bytes", value))?
                        as usize;
                }
                "ssl" => options.tls = TlsSettings::from_value(value)?,
                // Checked only by a worker that needs it (as Celery): kept as given.
                "native_delayed_delivery_queue_type" => {
                    options.delayed_delivery_queue_type = Some(
                        value
                            .as_str()
                            .map_or_else(|| value.to_string(), str::to_owned),
                    );
                }
                "failover_strategy" if !value.is_null() => {
                    let name = value
                        .as_str()
                        .ok_or_else(|| bad(key, "\"round-robin\" or \"shuffle\"", value))?;
                    options.failover = FailoverStrategy::parse(name)?;
                }
                // The dict is shared with kombu's other options: ignore the rest.
                _ => {}
            }
        }
        Ok(options)
    }

    /// How `queue` is declared: its own spec, or Celery's auto-created queue.
    pub fn queue_spec(&self, queue: &str) -> QueueSpec {
        self.queues
            .get(queue)
            .cloned()
            .unwrap_or_else(|| QueueSpec::celery(queue, self.queue_arguments.clone()))
    }

    /// The queues to declare before publishing to `(exchange, routing_key)`.
    pub(super) fn specs_for_target(&self, exchange: &str, routing_key: &str) -> Vec<QueueSpec> {
        if exchange.is_empty() {
            return vec![self.queue_spec(routing_key)];
        }
        let bound: Vec<QueueSpec> = self
            .queues
            .values()
            .filter(|spec| spec.exchange == exchange)
            .cloned()
            .collect();
        if !bound.is_empty() {
            bound
        } else if exchange == routing_key {
            vec![self.queue_spec(routing_key)]
        } else {
            Vec::new()
        }
    }
}

pub(super) fn parse_queue_spec(name: &str, spec: &Value) -> Result<QueueSpec> {
    let bad = |what: &str| {
        Error::Config(format!(
            "transport option queues[{name:?}]: {what} (got {spec})"
        ))
    };
    let object = spec.as_object().ok_or_else(|| bad("must be a dict"))?;
    let mut out = QueueSpec::celery(name, Map::new());
    for (key, value) in object {
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("{key:?} must be a string")))
        };
        let flag = || {
            value
                .as_bool()
                .ok_or_else(|| bad(&format!("{key:?} must be a bool")))
        };
        match key.as_str() {
            "exchange" => out.exchange = text()?,
            "exchange_type" => out.exchange_type = text()?,
            "routing_key" => out.routing_key = text()?,
            "durable" => out.durable = flag()?,
            "auto_delete" => out.auto_delete = flag()?,
            "exclusive" => out.exclusive = flag()?,
            "exchange_durable" => out.exchange_durable = flag()?,
            "exchange_auto_delete" => out.exchange_auto_delete = flag()?,
            "queue_arguments" if !value.is_null() => {
                out.arguments = value
                    .as_object()
                    .cloned()
                    .ok_or_else(|| bad("\"queue_arguments\" must be a dict"))?;
            }
            _ => {}
        }
    }
    Ok(out)
}

pub(crate) fn short(what: &str, text: &str) -> Result<ShortString> {
    ShortString::try_new(text).map_err(|_| {
        Error::Config(format!(
            "{what} {:?}... is longer than AMQP's 255 bytes",
            text.chars().take(40).collect::<String>()
        ))
    })
}

/// An exchange type by kombu's name. kombu hands any other name to the broker as it
/// is (RabbitMQ plugins add types such as `x-delayed-message`), so it is `Custom`
/// here too; only an empty name means kombu's default, `direct`.
pub(crate) fn exchange_kind(kind: &str) -> lapin::ExchangeKind {
    match kind {
        "direct" | "" => lapin::ExchangeKind::Direct,
        "fanout" => lapin::ExchangeKind::Fanout,
        "topic" => lapin::ExchangeKind::Topic,
        "headers" => lapin::ExchangeKind::Headers,
        other => lapin::ExchangeKind::Custom(other.to_owned()),
    }
}
