//! Headers: JSON <-> AMQP field tables, and messages made ready to be written.

use super::*;

/// A JSON object as an AMQP field table, the way py-amqp encodes Python values:
/// `None` → void, bool, int → signed 32-bit when it fits else signed 64-bit, float →
/// double, str → long string, list → array, dict → table.
pub fn json_to_field_table(object: &Map<String, Value>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in object {
        let name = ShortString::try_new(key.as_str()).map_err(|_| {
            Error::Encode(format!(
                "header name {:?}... is longer than AMQP's 255 bytes",
                key.chars().take(40).collect::<String>()
            ))
        })?;
        table.insert(name, json_to_amqp(value)?);
    }
    Ok(table)
}

pub(super) fn json_to_amqp(value: &Value) -> Result<AMQPValue> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => {
            if let Some(int) = number.as_i64() {
                match i32::try_from(int) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(int),
                }
            } else if let Some(float) = number.as_f64() {
                // Integers beyond i64 arrive as u64 (or f64): RabbitMQ has no unsigned
                // 64-bit type, so they travel as doubles.
                AMQPValue::Double(float)
            } else {
                return Err(Error::Encode(format!("{number} cannot be an AMQP header")));
            }
        }
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_bytes())),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(json_to_amqp(item)?);
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(object) => AMQPValue::FieldTable(json_to_field_table(object)?),
    })
}

/// An AMQP field table as JSON, the way py-amqp decodes it into Python values (long
/// strings as text, decimals and timestamps as numbers, byte arrays as text).
pub fn field_table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), amqp_to_json(value)))
        .collect()
}

pub(super) fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(flag) => Value::Bool(*flag),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(decimal) => {
            float(f64::from(decimal.value) / 10f64.powi(i32::from(decimal.scale)))
        }
        AMQPValue::ShortString(text) => Value::String(text.as_str().to_owned()),
        AMQPValue::LongString(text) => {
            Value::String(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(bytes) => {
            Value::String(String::from_utf8_lossy(bytes.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(amqp_to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(field_table_to_json(table)),
    }
}

pub(super) fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A message's AMQP routing and properties, ready to be written (built again from
/// the outbox for a re-send after a reconnect); the body stays in the [`Publish`].
pub(super) struct Prepared {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) properties: BasicProperties,
}

pub(super) fn prepare_task(message: &OutgoingMessage) -> Result<Prepared> {
    let headers = match serde_json::to_value(&message.headers)? {
        Value::Object(object) => json_to_field_table(&object)?,
        _ => return Err(Error::Encode("task headers are not an object".into())),
    };
    let props = &message.properties;
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from(props.content_type))
        .with_content_encoding(ShortString::from(props.content_encoding))
        .with_headers(headers)
        .with_delivery_mode(props.delivery_mode)
        .with_correlation_id(short("correlation_id", &props.correlation_id)?);
    if !props.reply_to.is_empty() {
        properties = properties.with_reply_to(short("reply_to", &props.reply_to)?);
    }
    if let Some(priority) = props.priority {
        properties = properties.with_priority(priority);
    }
    if let Some(expiration) = &props.expiration {
        properties = properties.with_expiration(short("expiration", expiration)?);
    }
    Ok(Prepared {
        exchange: short("exchange name", &message.exchange)?,
        routing_key: short("routing key", &message.routing_key)?,
        properties,
    })
}

/// A message that is not a task: an rpc result, for example. It is published as
/// Celery publishes results: nothing is declared for it and it is not mandatory (a
/// result for a client whose reply queue is gone is dropped by the broker).
#[derive(Debug, Clone)]
pub struct RawPublish {
    pub exchange: String,
    pub routing_key: String,
    pub correlation_id: Option<String>,
    pub content_type: String,
    pub content_encoding: String,
    pub delivery_mode: u8,
    pub body: Vec<u8>,
}

pub(super) fn prepare_raw(message: &RawPublish) -> Result<Prepared> {
    let mut properties = BasicProperties::default()
        .with_content_type(short("content_type", &message.content_type)?)
        .with_content_encoding(short("content_encoding", &message.content_encoding)?)
        .with_delivery_mode(message.delivery_mode)
        .with_headers(FieldTable::default())
        .with_priority(0);
    if let Some(id) = &message.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", id)?);
    }
    Ok(Prepared {
        exchange: short("exchange name", &message.exchange)?,
        routing_key: short("routing key", &message.routing_key)?,
        properties,
    })
}
