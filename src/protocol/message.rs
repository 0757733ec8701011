//! Celery's task message, protocol v2 (docs/wire.md §1): headers, properties, body.
//!
//! Values that come from Python (args, kwargs, extra headers) arrive here already
//! encoded as JSON text, so this module never needs to know about Python objects.

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Number;

/// The embed part of the body when a task has no callbacks, errbacks, chain or chord.
pub const EMPTY_EMBED: &str =
    r#"{"callbacks": null, "errbacks": null, "chain": null, "chord": null}"#;

/// The headers of a protocol v2 task message, written in Celery's order.
/// Every key but `compression` is always present; unused ones are `null`.
#[derive(Debug, Clone)]
pub struct TaskHeaders {
    pub task: String,
    pub id: String,
    pub shadow: Option<String>,
    pub eta: Option<String>,
    pub expires: Option<String>,
    pub group: Option<String>,
    pub group_index: Option<i64>,
    pub retries: i64,
    /// `[hard, soft]`, in that order (the protocol docs have it backwards).
    pub timelimit: [Option<Number>; 2],
    pub root_id: String,
    pub parent_id: Option<String>,
    pub argsrepr: String,
    pub kwargsrepr: String,
    pub origin: String,
    pub ignore_result: bool,
    pub replaced_task_nesting: i64,
    pub stamped_headers: Option<Box<RawValue>>,
    pub stamps: Option<Box<RawValue>>,
    /// Extra headers given by the caller (`apply_async(headers=...)`), already JSON.
    pub extra: Vec<(String, Box<RawValue>)>,
    /// kombu's `compression` header (the method's content type), written last as
    /// kombu adds it; absent when the body is not compressed.
    pub compression: Option<&'static str>,
}

impl TaskHeaders {
    /// Headers for a new task with everything optional left unset.
    pub fn new(task: String, id: String, origin: String) -> Self {
        Self {
            root_id: id.clone(),
            task,
            id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: [None, None],
            parent_id: None,
            argsrepr: String::new(),
            kwargsrepr: String::new(),
            origin,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: None,
            extra: Vec::new(),
            compression: None,
        }
    }
}

impl Serialize for TaskHeaders {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let count = 19 + self.extra.len() + usize::from(self.compression.is_some());
        let mut map = serializer.serialize_map(Some(count))?;
        map.serialize_entry("lang", "py")?;
        map.serialize_entry("task", &self.task)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("shadow", &self.shadow)?;
        map.serialize_entry("eta", &self.eta)?;
        map.serialize_entry("expires", &self.expires)?;
        map.serialize_entry("group", &self.group)?;
        map.serialize_entry("group_index", &self.group_index)?;
        map.serialize_entry("retries", &self.retries)?;
        map.serialize_entry("timelimit", &self.timelimit)?;
        map.serialize_entry("root_id", &self.root_id)?;
        map.serialize_entry("parent_id", &self.parent_id)?;
        map.serialize_entry("argsrepr", &self.argsrepr)?;
        map.serialize_entry("kwargsrepr", &self.kwargsrepr)?;
        map.serialize_entry("origin", &self.origin)?;
        map.serialize_entry("ignore_result", &self.ignore_result)?;
        map.serialize_entry("replaced_task_nesting", &self.replaced_task_nesting)?;
        map.serialize_entry("stamped_headers", &self.stamped_headers)?;
        match &self.stamps {
            Some(stamps) => map.serialize_entry("stamps", stamps)?,
            None => map.serialize_entry("stamps", &EmptyObject)?,
        }
        for (key, value) in &self.extra {
            map.serialize_entry(key, value)?;
        }
        if let Some(compression) = self.compression {
            map.serialize_entry("compression", compression)?;
        }
        map.end()
    }
}

struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_map(Some(0))?.end()
    }
}

/// Message properties (AMQP basic properties; the Redis envelope's `properties`).
#[derive(Debug, Clone)]
pub struct TaskProperties {
    pub correlation_id: String,
    pub reply_to: String,
    /// 2 = persistent (Celery's default), 1 = transient.
    pub delivery_mode: u8,
    /// Absent unless the caller chose one.
    pub priority: Option<u8>,
    /// Relative TTL in milliseconds, as text (`"60000"`).
    pub expiration: Option<String>,
    pub content_type: &'static str,
    pub content_encoding: &'static str,
}

impl TaskProperties {
    pub fn json(correlation_id: String, reply_to: String) -> Self {
        Self {
            correlation_id,
            reply_to,
            delivery_mode: 2,
            priority: None,
            expiration: None,
            content_type: "application/json",
            content_encoding: "utf-8",
        }
    }
}

/// A task message ready for a transport: where it goes and what it carries.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    pub headers: TaskHeaders,
    pub properties: TaskProperties,
    /// The serialized body: `[args, kwargs, embed]`.
    pub body: Vec<u8>,
}

/// Write the body `[args, kwargs, embed]` from its three already-encoded parts.
pub fn write_body(buf: &mut Vec<u8>, args: &[u8], kwargs: &[u8], embed: &[u8]) {
    buf.reserve(args.len() + kwargs.len() + embed.len() + 6);
    let written: Result<(), std::convert::Infallible> = write_body_with(
        buf,
        |buf| {
            buf.extend_from_slice(args);
            Ok(())
        },
        |buf| {
            buf.extend_from_slice(kwargs);
            Ok(())
        },
        embed,
    );
    let Ok(()) = written;
}

/// Write the body `[args, kwargs, embed]`, args and kwargs encoded in place by their
/// writers (no intermediate buffers), the embed already encoded.
pub fn write_body_with<E>(
    buf: &mut Vec<u8>,
    args: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    kwargs: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    embed: &[u8],
) -> Result<(), E> {
    buf.push(b'[');
    args(buf)?;
    buf.extend_from_slice(b", ");
    kwargs(buf)?;
    buf.extend_from_slice(b", ");
    buf.extend_from_slice(embed);
    buf.push(b']');
    Ok(())
}

/// The few header fields the consumer needs before handing a message to Python.
#[derive(Debug, Deserialize)]
pub struct HeaderIds {
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_every_key_in_celery_order() {
        let mut headers = TaskHeaders::new("tasks.add".into(), "id-1".into(), "gen1@h".into());
        headers.timelimit = [Some(10.into()), None];
        headers.extra.push((
            "x-custom".into(),
            RawValue::from_string("[1, 2]".into()).unwrap(),
        ));
        let text = serde_json::to_string(&headers).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"lang":"py","task":"tasks.add","id":"id-1","shadow":null,"eta":null,"#,
                r#""expires":null,"group":null,"group_index":null,"retries":0,"#,
                r#""timelimit":[10,null],"root_id":"id-1","parent_id":null,"argsrepr":"","#,
                r#""kwargsrepr":"","origin":"gen1@h","ignore_result":false,"#,
                r#""replaced_task_nesting":0,"stamped_headers":null,"stamps":{},"#,
                r#""x-custom":[1, 2]}"#
            )
        );
    }

    #[test]
    fn body_is_a_three_element_array() {
        let mut buf = Vec::new();
        write_body(&mut buf, b"[4, 4]", b"{}", EMPTY_EMBED.as_bytes());
        let value: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(value[0], serde_json::json!([4, 4]));
        assert_eq!(value[2]["chord"], serde_json::Value::Null);
    }
}
