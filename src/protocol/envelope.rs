//! kombu's Redis envelope (docs/wire.md §3.1): one JSON object per message, the body
//! base64-encoded inside it, routing facts in `properties.delivery_info`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::message::{OutgoingMessage, TaskHeaders};
use crate::error::{Error, Result};

#[derive(Serialize)]
struct DeliveryInfoOut<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

#[derive(Serialize)]
struct PropertiesOut<'a> {
    correlation_id: &'a str,
    reply_to: &'a str,
    delivery_mode: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<&'a str>,
    delivery_info: DeliveryInfoOut<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    body: &'a str,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a TaskHeaders,
    properties: PropertiesOut<'a>,
}

/// Encode a message as the JSON text kombu LPUSHes, with the given delivery tag.
pub fn encode(message: &OutgoingMessage, delivery_tag: &str) -> Result<Vec<u8>> {
    let body = BASE64.encode(&message.body);
    let props = &message.properties;
    let envelope = EnvelopeOut {
        body: &body,
        content_encoding: props.content_encoding,
        content_type: props.content_type,
        headers: &message.headers,
        properties: PropertiesOut {
            correlation_id: &props.correlation_id,
            reply_to: &props.reply_to,
            delivery_mode: props.delivery_mode,
            expiration: props.expiration.as_deref(),
            delivery_info: DeliveryInfoOut {
                exchange: &message.exchange,
                routing_key: &message.routing_key,
            },
            priority: props.priority.unwrap_or(0),
            body_encoding: "base64",
            delivery_tag,
        },
    };
    let mut out = Vec::with_capacity(body.len() + 700);
    super::json::write(&mut out, &envelope)?;
    Ok(out)
}

#[derive(Debug, Deserialize)]
pub struct DeliveryInfo {
    #[serde(default)]
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default)]
    pub redelivered: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct Properties {
    pub delivery_tag: String,
    #[serde(default)]
    pub delivery_info: Option<DeliveryInfo>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub body_encoding: Option<String>,
}

/// A message read from a Redis list, parsed but with headers and body still JSON.
#[derive(Debug, Deserialize)]
pub struct IncomingEnvelope {
    pub body: String,
    #[serde(rename = "content-encoding", default)]
    pub content_encoding: Option<String>,
    #[serde(rename = "content-type", default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: Option<Box<RawValue>>,
    pub properties: Properties,
}

impl IncomingEnvelope {
    pub fn parse(raw: &[u8]) -> Result<Self> {
        serde_json::from_slice(raw)
            .map_err(|err| Error::Decode(format!("the message is not a kombu envelope: {err}")))
    }

    /// The body bytes, base64-decoded unless the envelope says it is plain text.
    pub fn body_bytes(&self) -> Result<Vec<u8>> {
        match self.properties.body_encoding.as_deref() {
            None | Some("utf-8") => Ok(self.body.as_bytes().to_vec()),
            Some("base64") => BASE64
                .decode(self.body.as_bytes())
                .map_err(|err| Error::Decode(format!("the body is not valid base64: {err}"))),
            Some(other) => Err(Error::Decode(format!("unknown body_encoding {other:?}"))),
        }
    }

    pub fn redelivered(&self) -> bool {
        self.properties
            .delivery_info
            .as_ref()
            .and_then(|info| info.redelivered)
            .unwrap_or(false)
    }
}

/// Find the delivery tag of a message that may be malformed, so that it can still be
/// acked (removed from `unacked`) after it is rejected.
pub fn peek_delivery_tag(raw: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Tag {
        delivery_tag: String,
    }
    #[derive(Deserialize)]
    struct Outer {
        properties: Tag,
    }
    serde_json::from_slice::<Outer>(raw)
        .ok()
        .map(|o| o.properties.delivery_tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::{write_body, TaskProperties, EMPTY_EMBED};

    fn message() -> OutgoingMessage {
        let mut body = Vec::new();
        write_body(&mut body, b"[4, 4]", b"{}", EMPTY_EMBED.as_bytes());
        OutgoingMessage {
            exchange: String::new(),
            routing_key: "celery".into(),
            headers: TaskHeaders::new("tasks.add".into(), "id-1".into(), "gen1@h".into()),
            properties: TaskProperties::json("id-1".into(), "oid".into()),
            body,
        }
    }

    #[test]
    fn encodes_the_kombu_layout() {
        let raw = encode(&message(), "tag-1").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 5);
        assert_eq!(value["content-type"], "application/json");
        assert_eq!(
            value["properties"]["delivery_info"]["routing_key"],
            "celery"
        );
        assert_eq!(value["properties"]["delivery_info"]["exchange"], "");
        assert_eq!(value["properties"]["priority"], 0);
        assert_eq!(value["properties"]["body_encoding"], "base64");
        assert!(value["properties"].get("expiration").is_none());
        assert_eq!(value["headers"]["task"], "tasks.add");
    }

    #[test]
    fn round_trips() {
        let raw = encode(&message(), "tag-1").unwrap();
        let env = IncomingEnvelope::parse(&raw).unwrap();
        assert_eq!(env.properties.delivery_tag, "tag-1");
        assert_eq!(env.body_bytes().unwrap(), message().body);
        assert!(!env.redelivered());
        assert_eq!(peek_delivery_tag(&raw).as_deref(), Some("tag-1"));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for raw in [
            &b"not json"[..],
            b"[1, 2]",
            b"{}",
            br#"{"body": "x", "properties": {}}"#,
        ] {
            let err = IncomingEnvelope::parse(raw).unwrap_err().to_string();
            assert!(err.contains("not a kombu envelope"), "{err}");
        }
        let env = IncomingEnvelope::parse(
            br#"{"body": "%%%", "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#,
        )
        .unwrap();
        assert!(env.body_bytes().unwrap_err().to_string().contains("base64"));
    }
}
