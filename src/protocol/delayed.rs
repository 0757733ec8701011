//! Celery 5.5+'s native delayed delivery on RabbitMQ (kombu's
//! `transport/native_delayed_delivery.py`), as names, routing keys and arguments.
//!
//! A delayed message is published to the topic exchange `celery_delayed_27` with the
//! delay in seconds written as 28 binary digits joined by dots, then the routing key
//! of its queue (`0.0.….1.0.1.orders`). Level `L` (exchange and queue
//! `celery_delayed_L`) holds the message for `2^L` seconds when its digit is `1`
//! (the queue's TTL, then dead-lettered to level `L-1`) or passes it straight on when
//! it is `0` (an exchange-to-exchange binding). After level 0 it reaches
//! `celery_delayed_delivery`, which workers bind to their task exchanges with
//! `#.<routing key>`.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Binary digits of the delay; the highest level is `LEVELS - 1` (`celery_delayed_27`).
pub const LEVELS: u32 = 28;
/// The exchange a delayed message is published to.
pub const FIRST_EXCHANGE: &str = "celery_delayed_27";
/// The exchange the last level hands a due message to.
pub const DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// The exchange and queue of one level: `celery_delayed_<level>`.
pub fn level_name(level: u32) -> String {
    format!("celery_delayed_{level}")
}

/// `broker_native_delayed_delivery_queue_type`: the type of the level queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelQueueType {
    Classic,
    Quorum,
}

impl LevelQueueType {
    /// `"classic"` or `"quorum"`, as Celery accepts; anything else is a
    /// configuration error (a Celery worker stops on it too).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            other => Err(Error::Config(format!(
                "broker_native_delayed_delivery_queue_type must be 'classic' or 'quorum', \
                 not {other:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// The arguments of queue `celery_delayed_<level>`, as kombu declares them: the level's
/// TTL, dead-lettered to the next level down (or to `celery_delayed_delivery`), and
/// publishes refused when the queue is full rather than dropping its oldest messages.
pub fn level_queue_arguments(level: u32, queue_type: LevelQueueType) -> Map<String, Value> {
    let mut arguments = Map::new();
    arguments.insert("x-queue-type".into(), queue_type.as_str().into());
    arguments.insert("x-overflow".into(), "reject-publish".into());
    arguments.insert("x-message-ttl".into(), Value::from(1000u64 << level));
    let dead_letter = match level {
        0 => DELIVERY_EXCHANGE.to_owned(),
        _ => level_name(level - 1),
    };
    arguments.insert("x-dead-letter-exchange".into(), dead_letter.into());
    if queue_type == LevelQueueType::Quorum {
        arguments.insert("x-dead-letter-strategy".into(), "at-least-once".into());
    }
    arguments
}

/// The binding pattern of `celery_delayed_<level>`'s queue (`digit = "1"`) or of the
/// exchange of the level below (`digit = "0"`): the level's digit, after one `*` per
/// higher level.
pub fn level_pattern(level: u32, digit: char) -> String {
    let higher = (LEVELS - 1).saturating_sub(level) as usize;
    format!("{}{digit}.#", "*.".repeat(higher))
}

/// The pattern `celery_delayed_delivery` is bound to a task exchange with, so that a
/// due message reaches the queues of `routing_key` (kept as it is when it starts
/// with `#`).
pub fn delivery_pattern(routing_key: &str) -> String {
    if routing_key.starts_with('#') {
        routing_key.to_owned()
    } else {
        format!("#.{routing_key}")
    }
}

/// `routing_key` without a delay prefix an earlier delayed publish put in front of
/// it (a retried task can carry its last delivery's key).
fn without_delay_prefix(routing_key: &str) -> &str {
    let mut rest = routing_key;
    for _ in 0..LEVELS {
        let mut chars = rest.chars();
        match (chars.next(), chars.next()) {
            (Some('0' | '1'), Some('.')) => rest = &rest[2..],
            _ => return routing_key,
        }
    }
    rest
}

/// The routing key of a message delayed by `seconds` (at least 1) for `routing_key`:
/// the delay's binary digits (at least 28: a delay of 2^28 s or more gives more
/// digits, as kombu writes it) joined by dots, then the routing key.
pub fn delayed_routing_key(seconds: u64, routing_key: &str) -> Result<String> {
    if seconds == 0 {
        return Err(Error::Config(
            "a native delayed delivery needs a delay of at least 1 second".into(),
        ));
    }
    if routing_key.is_empty() {
        return Err(Error::Config(
            "a native delayed delivery needs a non-empty routing key".into(),
        ));
    }
    let digits = format!("{seconds:0width$b}", width = LEVELS as usize);
    let mut key = String::with_capacity(digits.len() * 2 + routing_key.len());
    for digit in digits.chars() {
        key.push(digit);
        key.push('.');
    }
    key.push_str(without_delay_prefix(routing_key));
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_key_is_28_binary_digits_then_the_key() {
        let key = delayed_routing_key(5, "orders").unwrap();
        assert_eq!(key, format!("{}1.0.1.orders", "0.".repeat(25)));
        let again = delayed_routing_key(2, &key).unwrap();
        assert_eq!(again, format!("{}1.0.orders", "0.".repeat(26)));
        let huge = delayed_routing_key(1 << 28, "q").unwrap();
        assert_eq!(huge, format!("1.{}q", "0.".repeat(28)));
        assert!(delayed_routing_key(0, "q").is_err());
        assert!(delayed_routing_key(1, "").is_err());
    }

    #[test]
    fn level_arguments_and_patterns_are_kombus() {
        let top = level_queue_arguments(27, LevelQueueType::Quorum);
        assert_eq!(top["x-message-ttl"], Value::from(134_217_728_000u64));
        assert_eq!(top["x-dead-letter-exchange"], "celery_delayed_26");
        assert_eq!(top["x-dead-letter-strategy"], "at-least-once");
        let bottom = level_queue_arguments(0, LevelQueueType::Classic);
        assert_eq!(bottom["x-dead-letter-exchange"], DELIVERY_EXCHANGE);
        assert!(!bottom.contains_key("x-dead-letter-strategy"));
        assert_eq!(level_pattern(27, '1'), "1.#");
        assert_eq!(level_pattern(25, '0'), "*.*.0.#");
        assert_eq!(delivery_pattern("orders"), "#.orders");
        assert_eq!(delivery_pattern("#.x"), "#.x");
        assert!(LevelQueueType::parse("stream").is_err());
    }
}
