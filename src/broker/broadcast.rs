//! What a broadcast (an event, a remote-control request or reply) is, apart from any
//! transport: the message sent, the one received, and kombu's envelope around it on
//! Redis and SQLite. `events`, `pidbox` and the SQLite fanout all build on this, so
//! none of them needs another.

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::protocol::envelope::IncomingEnvelope;

/// One message for an exchange.
#[derive(Debug, Clone)]
pub struct Broadcast {
    pub exchange: String,
    /// `topic`, `fanout` or `direct` (AMQP declaration only).
    pub exchange_type: String,
    pub durable: bool,
    pub routing_key: String,
    /// Message headers (a JSON object).
    pub headers: Map<String, Value>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// A message read from a channel or a reply queue: its headers (a JSON object) and
/// body bytes, or why it could not be read.
pub type Received = std::result::Result<(Value, Vec<u8>), String>;

/// The kombu envelope of a broadcast on Redis (docs/wire.md §3.1).
pub fn redis_envelope(message: &Broadcast) -> Result<Vec<u8>> {
    let envelope = json!({
        "body": base64::engine::general_purpose::STANDARD.encode(&message.body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": Value::Object(message.headers.clone()),
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {
                "exchange": message.exchange,
                "routing_key": message.routing_key,
            },
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    });
    Ok(serde_json::to_vec(&envelope)?)
}

/// Headers and body of a kombu envelope.
pub fn decode(raw: &[u8]) -> Received {
    let envelope = IncomingEnvelope::parse(raw).map_err(|err| err.to_string())?;
    let body = envelope.body_bytes().map_err(|err| err.to_string())?;
    let headers = match envelope.headers.as_deref() {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|err| err.to_string())?,
        None => Value::Object(Map::new()),
    };
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Broadcast {
        let mut headers = Map::new();
        headers.insert("hostname".into(), Value::from("w1@vm"));
        Broadcast {
            exchange: "celeryev".into(),
            exchange_type: "topic".into(),
            durable: true,
            routing_key: "worker.heartbeat".into(),
            headers,
            body: br#"{"type": "worker-heartbeat"}"#.to_vec(),
        }
    }

    #[test]
    fn envelope_is_kombu_shaped() {
        let raw = redis_envelope(&event()).expect("encodes");
        let value: Value = serde_json::from_slice(&raw).expect("json");
        assert_eq!(value["content-type"], "application/json");
        assert_eq!(value["headers"]["hostname"], "w1@vm");
        assert_eq!(value["properties"]["body_encoding"], "base64");
        assert_eq!(
            value["properties"]["delivery_info"]["routing_key"],
            "worker.heartbeat"
        );
        assert!(value["properties"]["delivery_tag"].is_string());
        let body = base64::engine::general_purpose::STANDARD
            .decode(value["body"].as_str().expect("str"))
            .expect("base64");
        assert_eq!(body, br#"{"type": "worker-heartbeat"}"#);
    }
}
