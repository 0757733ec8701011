//! The send options of a task message (`Producer.send`'s `options`; docs/wire.md
//! §1.1-§1.3) and the template they fill: header defaults, properties, route, embed and
//! body format.
//!
//! The option names are listed once, here (`SEND_OPTIONS`, exported to Python). The
//! embed values (callbacks, errbacks, chain, chord) stay opaque (`E`): the caller
//! encodes them with the body's serializer.

use serde_json::value::RawValue;
use serde_json::Number;

use super::compression::Compression;
use super::content::Serializer;
use super::message::{write_body_with, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED};
use crate::error::{Error, Result};

/// Celery truncates `argsrepr`/`kwargsrepr` to this many characters.
pub const REPR_MAX: usize = 1024;

/// Declares `OptionName` and `SEND_OPTIONS` from one list of `Variant = "name"`.
macro_rules! send_option_names {
    ($($variant:ident = $name:literal,)*) => {
        /// The name of one send option.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum OptionName {
            $($variant,)*
        }

        /// Every send option's name, in the order `Producer.send` documents them.
        pub const SEND_OPTIONS: &[&str] = &[$($name,)*];

        impl OptionName {
            pub const ALL: &'static [OptionName] = &[$(OptionName::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(OptionName::$variant => $name,)*
                }
            }

            /// `None` for a name that is not a send option.
            pub fn parse(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(OptionName::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

send_option_names! {
    Eta = "eta",
    Expires = "expires",
    Expiration = "expiration",
    Priority = "priority",
    Exchange = "exchange",
    RoutingKey = "routing_key",
    ReplyTo = "reply_to",
    CorrelationId = "correlation_id",
    ParentId = "parent_id",
    RootId = "root_id",
    Retries = "retries",
    Timelimit = "timelimit",
    Shadow = "shadow",
    Group = "group",
    GroupIndex = "group_index",
    IgnoreResult = "ignore_result",
    Headers = "headers",
    Callbacks = "callbacks",
    Errbacks = "errbacks",
    Chain = "chain",
    Chord = "chord",
    Argsrepr = "argsrepr",
    Kwargsrepr = "kwargsrepr",
    DeliveryMode = "delivery_mode",
    Origin = "origin",
    StampedHeaders = "stamped_headers",
    Stamps = "stamps",
    ReplacedTaskNesting = "replaced_task_nesting",
    Serializer = "serializer",
    Compression = "compression",
}

/// One send option with its value, already typed; `None` stands for Python's `None`.
/// `E` is an embed value (a signature), left for the body's serializer.
#[derive(Debug)]
pub enum SendOption<E> {
    Eta(Option<String>),
    Expires(Option<String>),
    /// Milliseconds; negative counts as 0.
    Expiration(Option<f64>),
    Priority(Option<i64>),
    Exchange(Option<String>),
    RoutingKey(Option<String>),
    ReplyTo(Option<String>),
    CorrelationId(String),
    ParentId(Option<String>),
    RootId(Option<String>),
    Retries(Option<i64>),
    /// `(hard, soft)`; `None` leaves it unset.
    Timelimit(Option<Vec<Option<Number>>>),
    Shadow(Option<String>),
    Group(Option<String>),
    GroupIndex(Option<i64>),
    IgnoreResult(bool),
    /// Extra headers, each value already JSON.
    Headers(Vec<(String, Box<RawValue>)>),
    Callbacks(Option<E>),
    Errbacks(Option<E>),
    Chain(Option<E>),
    Chord(Option<E>),
    Argsrepr(String),
    Kwargsrepr(String),
    DeliveryMode(i64),
    Origin(String),
    StampedHeaders(Option<Box<RawValue>>),
    Stamps(Option<Box<RawValue>>),
    ReplacedTaskNesting(i64),
    Serializer(Serializer),
    Compression(Option<Compression>),
}

/// The body's third element; `None` is written as `null`.
#[derive(Debug)]
pub struct Embed<E> {
    pub callbacks: Option<E>,
    pub errbacks: Option<E>,
    pub chain: Option<E>,
    pub chord: Option<E>,
}

impl<E> Default for Embed<E> {
    fn default() -> Self {
        Self {
            callbacks: None,
            errbacks: None,
            chain: None,
            chord: None,
        }
    }
}

impl<E> Embed<E> {
    /// The four parts by name, in Celery's order.
    pub fn into_parts(self) -> [(&'static str, Option<E>); 4] {
        [
            ("callbacks", self.callbacks),
            ("errbacks", self.errbacks),
            ("chain", self.chain),
            ("chord", self.chord),
        ]
    }

    /// The embed as JSON, each given value written by `encode`.
    pub fn write_json<X>(
        self,
        out: &mut Vec<u8>,
        mut encode: impl FnMut(&mut Vec<u8>, &E) -> std::result::Result<(), X>,
    ) -> std::result::Result<(), X> {
        let parts = self.into_parts();
        if parts.iter().all(|(_, value)| value.is_none()) {
            out.extend_from_slice(EMPTY_EMBED.as_bytes());
            return Ok(());
        }
        out.push(b'{');
        for (i, (name, value)) in parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\": ");
            match value {
                Some(value) => encode(out, value)?,
                None => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
        Ok(())
    }
}

/// What every message of one send call shares, filled option by option.
#[derive(Debug)]
pub struct TaskTemplate<E> {
    pub headers: TaskHeaders,
    pub properties: TaskProperties,
    pub exchange: String,
    pub routing_key: Option<String>,
    pub embed: Embed<E>,
    pub serializer: Serializer,
    pub compression: Option<Compression>,
}

impl<E> TaskTemplate<E> {
    /// Celery's defaults for task `name` sent by `origin`, replies to `reply_to`.
    pub fn new(name: String, origin: String, reply_to: String) -> Self {
        Self {
            headers: TaskHeaders::new(name, String::new(), origin),
            properties: TaskProperties::json(String::new(), reply_to),
            exchange: String::new(),
            routing_key: None,
            embed: Embed::default(),
            serializer: Serializer::Json,
            compression: None,
        }
    }

    /// Set one option; `Config` (a `ValueError` in Python) for a value out of range.
    pub fn apply(&mut self, option: SendOption<E>) -> Result<()> {
        let (headers, properties) = (&mut self.headers, &mut self.properties);
        match option {
            SendOption::Eta(eta) => headers.eta = eta,
            SendOption::Expires(expires) => headers.expires = expires,
            SendOption::Expiration(ms) => {
                properties.expiration = ms.map(|ms| format!("{}", ms.max(0.0) as u64))
            }
            SendOption::Priority(priority) => {
                properties.priority = match priority {
                    None => None,
                    Some(priority) => Some(u8::try_from(priority).map_err(|_| {
                        Error::Config(format!("priority must be 0-255, not {priority}"))
                    })?),
                }
            }
            SendOption::Exchange(exchange) => self.exchange = exchange.unwrap_or_default(),
            SendOption::RoutingKey(routing_key) => self.routing_key = routing_key,
            SendOption::ReplyTo(reply_to) => properties.reply_to = reply_to.unwrap_or_default(),
            SendOption::CorrelationId(id) => properties.correlation_id = id,
            SendOption::ParentId(parent) => headers.parent_id = parent,
            SendOption::RootId(root) => {
                if let Some(root) = root {
                    headers.root_id = root;
                }
            }
            SendOption::Retries(retries) => headers.retries = retries.unwrap_or(0),
            SendOption::Timelimit(None) => {}
            SendOption::Timelimit(Some(pair)) => {
                let [hard, soft]: [Option<Number>; 2] = pair.try_into().map_err(|_| {
                    Error::Config("timelimit must have two items: (hard, soft)".into())
                })?;
                headers.timelimit = [hard, soft];
            }
            SendOption::Shadow(shadow) => headers.shadow = shadow,
            SendOption::Group(group) => headers.group = group,
            SendOption::GroupIndex(index) => headers.group_index = index,
            SendOption::IgnoreResult(ignore) => headers.ignore_result = ignore,
            SendOption::Headers(extra) => headers.extra.extend(extra),
            SendOption::Callbacks(value) => self.embed.callbacks = value,
            SendOption::Errbacks(value) => self.embed.errbacks = value,
            SendOption::Chain(value) => self.embed.chain = value,
            SendOption::Chord(value) => self.embed.chord = value,
            SendOption::Argsrepr(text) => headers.argsrepr = text,
            SendOption::Kwargsrepr(text) => headers.kwargsrepr = text,
            SendOption::DeliveryMode(mode) => {
                properties.delivery_mode = match mode {
                    1 | 2 => mode as u8,
                    _ => {
                        return Err(Error::Config(
                            "delivery_mode must be 1 (transient) or 2 (persistent)".into(),
                        ))
                    }
                }
            }
            SendOption::Origin(origin) => headers.origin = origin,
            SendOption::StampedHeaders(value) => headers.stamped_headers = value,
            SendOption::Stamps(value) => headers.stamps = value,
            SendOption::ReplacedTaskNesting(nesting) => headers.replaced_task_nesting = nesting,
            SendOption::Serializer(serializer) => self.serializer = serializer,
            SendOption::Compression(method) => self.compression = method,
        }
        Ok(())
    }

    /// The per-message builder and the embed (for the caller to encode once).
    pub fn finish(mut self) -> (MessageBuilder, Embed<E>) {
        self.properties.content_type = self.serializer.content_type();
        self.properties.content_encoding = self.serializer.content_encoding();
        self.headers.compression = self.compression.map(Compression::content_type);
        let builder = MessageBuilder {
            root_id_given: !self.headers.root_id.is_empty(),
            correlation_id_given: !self.properties.correlation_id.is_empty(),
            headers: self.headers,
            properties: self.properties,
            exchange: self.exchange,
            routing_key: self.routing_key,
            serializer: self.serializer,
            compression: self.compression,
        };
        (builder, self.embed)
    }
}

/// Builds the messages of one template: the id-dependent fields, the reprs, the route
/// and the (compressed) body.
#[derive(Debug)]
pub struct MessageBuilder {
    headers: TaskHeaders,
    properties: TaskProperties,
    exchange: String,
    routing_key: Option<String>,
    serializer: Serializer,
    compression: Option<Compression>,
    /// Whether the caller set these, else they follow the task id.
    root_id_given: bool,
    correlation_id_given: bool,
}

/// The per-message parts of a task message.
pub struct MessageParts {
    pub task_id: String,
    /// The queue, unless a `routing_key` option was given.
    pub queue: String,
    /// The serialized body `[args, kwargs, embed]`, not yet compressed.
    pub body: Vec<u8>,
}

impl MessageBuilder {
    pub fn serializer(&self) -> Serializer {
        self.serializer
    }

    /// Whether `argsrepr`/`kwargsrepr` must be made from the arguments (not given).
    pub fn wants_reprs(&self) -> (bool, bool) {
        (
            self.headers.argsrepr.is_empty(),
            self.headers.kwargsrepr.is_empty(),
        )
    }

    /// One message; `reprs` are used where the options gave none.
    pub fn build(&self, parts: MessageParts, reprs: (String, String)) -> Result<OutgoingMessage> {
        self.assemble(self.headers.clone(), self.properties.clone(), parts, reprs)
    }

    /// `build` for the template's only message: its headers move, not copied.
    pub fn into_message(
        self,
        parts: MessageParts,
        reprs: (String, String),
    ) -> Result<OutgoingMessage> {
        let Self {
            headers,
            properties,
            exchange,
            routing_key,
            serializer,
            compression,
            root_id_given,
            correlation_id_given,
        } = self;
        let rest = Self {
            headers: TaskHeaders::new(String::new(), String::new(), String::new()),
            properties: TaskProperties::json(String::new(), String::new()),
            exchange,
            routing_key,
            serializer,
            compression,
            root_id_given,
            correlation_id_given,
        };
        rest.assemble(headers, properties, parts, reprs)
    }

    fn assemble(
        &self,
        mut headers: TaskHeaders,
        mut properties: TaskProperties,
        parts: MessageParts,
        (argsrepr, kwargsrepr): (String, String),
    ) -> Result<OutgoingMessage> {
        let MessageParts {
            task_id,
            queue,
            mut body,
        } = parts;
        if !self.root_id_given {
            headers.root_id.clone_from(&task_id);
        }
        if !self.correlation_id_given {
            properties.correlation_id.clone_from(&task_id);
        }
        headers.id = task_id;
        if headers.argsrepr.is_empty() {
            headers.argsrepr = argsrepr;
        }
        if headers.kwargsrepr.is_empty() {
            headers.kwargsrepr = kwargsrepr;
        }
        if let Some(method) = self.compression {
            body = method.compress(&body)?;
        }
        Ok(OutgoingMessage {
            routing_key: self.routing_key.clone().unwrap_or(queue),
            exchange: self.exchange.clone(),
            headers,
            properties,
            body,
        })
    }
}

/// A JSON body `[args, kwargs, embed]`: args and kwargs written by their encoders, the
/// embed already encoded (`Embed::write_json`).
pub fn json_body<X>(
    args: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), X>,
    kwargs: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), X>,
    embed: &[u8],
) -> std::result::Result<Vec<u8>, X> {
    let mut body = Vec::with_capacity(128);
    write_body_with(&mut body, args, kwargs, embed)?;
    Ok(body)
}

/// `text` cut to `REPR_MAX` characters, `...` added when it was longer.
pub fn truncate_repr(text: &str) -> String {
    match text.char_indices().nth(REPR_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Template = TaskTemplate<&'static str>;

    fn template() -> Template {
        TaskTemplate::new("tasks.add".into(), "gen1@h".into(), "reply-q".into())
    }

    fn parts(task_id: &str) -> MessageParts {
        MessageParts {
            task_id: task_id.into(),
            queue: "celery".into(),
            body: b"[[1], {}, {}]".to_vec(),
        }
    }

    fn reprs() -> (String, String) {
        ("(1,)".into(), "{}".into())
    }

    #[test]
    fn option_names_are_listed_once_and_round_trip() {
        assert_eq!(SEND_OPTIONS.len(), OptionName::ALL.len());
        for (name, option) in SEND_OPTIONS.iter().zip(OptionName::ALL) {
            assert_eq!(option.as_str(), *name);
            assert_eq!(OptionName::parse(name), Some(*option));
        }
        let mut sorted = SEND_OPTIONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), SEND_OPTIONS.len(), "a name is listed twice");
        assert_eq!(OptionName::parse("countdown"), None);
    }

    #[test]
    fn defaults_follow_the_task_id() {
        let (builder, _) = template().finish();
        let message = builder.build(parts("id-1"), reprs()).unwrap();
        assert_eq!(message.headers.id, "id-1");
        assert_eq!(message.headers.root_id, "id-1");
        assert_eq!(message.properties.correlation_id, "id-1");
        assert_eq!(message.properties.reply_to, "reply-q");
        assert_eq!(message.properties.delivery_mode, 2);
        assert_eq!(message.routing_key, "celery");
        assert_eq!(message.exchange, "");
        assert_eq!(message.headers.argsrepr, "(1,)");
        assert_eq!(message.properties.content_type, "application/json");
        assert_eq!(message.headers.compression, None);
    }

    #[test]
    fn options_given_are_kept_for_every_message() {
        let mut template = template();
        for option in [
            SendOption::RootId(Some("root".into())),
            SendOption::CorrelationId("corr".into()),
            SendOption::RoutingKey(Some("rk".into())),
            SendOption::Exchange(Some("ex".into())),
            SendOption::Argsrepr("given".into()),
            SendOption::Priority(Some(9)),
            SendOption::Expiration(Some(-5.0)),
            SendOption::Timelimit(Some(vec![Some(10.into()), None])),
            SendOption::DeliveryMode(1),
        ] {
            template.apply(option).unwrap();
        }
        let (builder, _) = template.finish();
        for id in ["a", "b"] {
            let message = builder.build(parts(id), reprs()).unwrap();
            assert_eq!(message.headers.id, id);
            assert_eq!(message.headers.root_id, "root");
            assert_eq!(message.properties.correlation_id, "corr");
            assert_eq!(
                (message.exchange.as_str(), message.routing_key.as_str()),
                ("ex", "rk")
            );
            assert_eq!(message.headers.argsrepr, "given");
            assert_eq!(message.headers.kwargsrepr, "{}");
            assert_eq!(message.properties.priority, Some(9));
            assert_eq!(message.properties.expiration.as_deref(), Some("0"));
            assert_eq!(message.headers.timelimit, [Some(10.into()), None]);
            assert_eq!(message.properties.delivery_mode, 1);
        }
    }

    #[test]
    fn values_out_of_range_are_refused() {
        let mut template = template();
        let err = template.apply(SendOption::Priority(Some(256))).unwrap_err();
        assert_eq!(err.to_string(), "priority must be 0-255, not 256");
        assert!(template.apply(SendOption::DeliveryMode(3)).is_err());
        assert!(template
            .apply(SendOption::Timelimit(Some(vec![None])))
            .is_err());
        assert!(matches!(
            template.apply(SendOption::DeliveryMode(0)),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn serializer_and_compression_set_the_content_headers() {
        let mut template = template();
        template
            .apply(SendOption::Serializer(Serializer::Pickle))
            .unwrap();
        template
            .apply(SendOption::Compression(Some(Compression::Zlib)))
            .unwrap();
        let (builder, _) = template.finish();
        assert_eq!(builder.serializer(), Serializer::Pickle);
        let message = builder.into_message(parts("x"), reprs()).unwrap();
        assert_eq!(
            message.properties.content_type,
            "application/x-python-serialize"
        );
        assert_eq!(message.headers.compression, Some("application/x-gzip"));
        assert_eq!(
            Compression::Zlib.decompress(&message.body).unwrap(),
            b"[[1], {}, {}]"
        );
    }

    #[test]
    fn embed_is_written_with_nulls_or_empty() {
        let mut out = Vec::new();
        Embed::<&str>::default()
            .write_json(&mut out, |_, _| Ok::<(), ()>(()))
            .unwrap();
        assert_eq!(out, EMPTY_EMBED.as_bytes());
        let mut template = template();
        template.apply(SendOption::Chain(Some("[1]"))).unwrap();
        let (_, embed) = template.finish();
        let mut out = Vec::new();
        embed
            .write_json(&mut out, |out, value| {
                out.extend_from_slice(value.as_bytes());
                Ok::<(), ()>(())
            })
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["chain"], serde_json::json!([1]));
        assert_eq!(value["chord"], serde_json::Value::Null);
        let body = json_body(
            |out| {
                out.extend_from_slice(b"[2]");
                Ok::<(), ()>(())
            },
            |out| {
                out.extend_from_slice(b"{}");
                Ok(())
            },
            &out,
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body[2]["chain"], serde_json::json!([1]));
    }

    #[test]
    fn reprs_are_cut_at_1024_characters() {
        assert_eq!(truncate_repr("abc"), "abc");
        let long = "é".repeat(REPR_MAX + 5);
        let cut = truncate_repr(&long);
        assert_eq!(cut.chars().count(), REPR_MAX + 3);
        assert!(cut.ends_with("..."));
    }
}
