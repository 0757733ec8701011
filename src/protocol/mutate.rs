//! Inputs for the decoders' property tests (`cargo test`; `make fuzz` runs the
//! coverage-guided fuzzer on the same decoders): real messages captured from Celery
//! (tests/fixtures) and hand-made ones, mutated byte by byte and value by value.
//! `PROPTEST_CASES` sets how many inputs each property gets (256 by default).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

/// Task messages as a Celery 5.7 client wrote them to Redis.
pub const CELERY_ENVELOPES: [&[u8]; 6] = [
    include_bytes!("../../tests/fixtures/celery57_redis_chain.json"),
    include_bytes!("../../tests/fixtures/celery57_redis_countdown_expires.json"),
    include_bytes!("../../tests/fixtures/celery57_redis_kwargs_types.json"),
    include_bytes!("../../tests/fixtures/celery57_redis_link.json"),
    include_bytes!("../../tests/fixtures/celery57_redis_plain_args.json"),
    include_bytes!("../../tests/fixtures/celery57_redis_priority5.json"),
];

/// JSON texts put in place of a value: wrong types, bad kombu markers, and what only
/// Python's `json` reads (NaN, big integers, lone surrogates).
pub const ODD_VALUES: [&str; 30] = [
    "null",
    "true",
    "0",
    "-1",
    "1e999",
    "-0.0",
    "NaN",
    "-Infinity",
    "123456789012345678901234567890",
    "\"\"",
    "\"x\"",
    "\"\\ud800\"",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]",
    r#"{"__type__": "datetime", "__value__": "next tuesday"}"#,
    r#"{"__type__": "date", "__value__": "2024-13-45"}"#,
    r#"{"__type__": "time", "__value__": []}"#,
    r#"{"__type__": "decimal", "__value__": "one"}"#,
    r#"{"__type__": "uuid", "__value__": {"hex": "zz"}}"#,
    r#"{"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678", "x": 1}}"#,
    r#"{"__type__": "uuid", "__value__": "12345678123456781234567812345678"}"#,
    r#"{"__type__": "bytes", "__value__": 5}"#,
    r#"{"__type__": "base64", "__value__": "%%%"}"#,
    r#"{"__type__": "base64", "__value__": "QUJD\n"}"#,
    r#"{"__type__": "pickle", "__value__": "x"}"#,
    r#"{"__type__": 7, "__value__": 7}"#,
    r#"{"__type__": "datetime"}"#,
    r#"{"__type__": "datetime", "__value__": "2024-01-02T03:04:05", "x": 1}"#,
    r#"{"__type__": {"__type__": "bytes", "__value__": "x"}, "__value__": "x"}"#,
];

/// A task message as its headers and body, both JSON values.
#[derive(Clone, Debug)]
pub struct TaskParts {
    pub headers: Option<Value>,
    pub body: Value,
}

/// The captured messages as parts, plus a protocol v1 message and a v2 one whose
/// arguments are all kombu markers.
pub fn task_parts() -> Vec<TaskParts> {
    let mut parts: Vec<TaskParts> = CELERY_ENVELOPES
        .iter()
        .map(|raw| {
            let envelope: Value = serde_json::from_slice(raw).expect("a captured envelope");
            let body = BASE64
                .decode(envelope["body"].as_str().expect("a base64 body"))
                .expect("base64");
            TaskParts {
                headers: Some(envelope["headers"].clone()),
                body: serde_json::from_slice(&body).expect("a JSON body"),
            }
        })
        .collect();
    parts.push(TaskParts {
        headers: None,
        body: json!({
            "task": "tasks.add", "id": "v1-id", "args": [1, 2], "kwargs": {},
            "retries": 0, "eta": null, "expires": null, "utc": true,
            "callbacks": null, "errbacks": null, "timelimit": [null, null],
        }),
    });
    parts.push(TaskParts {
        headers: Some(json!({"lang": "py", "task": "tasks.echo", "id": "m-id"})),
        body: json!([
            [
                {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
                {"__type__": "base64", "__value__": "AP/+"},
                {"__type__": "bytes", "__value__": "abc"},
            ],
            {"when": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}},
            {"callbacks": null, "errbacks": null, "chain": null, "chord": null},
        ]),
    });
    parts
}

/// A kombu envelope around raw headers and body texts (the body base64-encoded).
pub fn envelope_of(headers: Option<&[u8]>, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        r#"{{"body": "{}", "content-encoding": "utf-8", "content-type": "application/json", "#,
        BASE64.encode(body)
    )
    .into_bytes();
    if let Some(headers) = headers {
        out.extend_from_slice(b"\"headers\": ");
        out.extend_from_slice(headers);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(
        br#""properties": {"correlation_id": "c", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "tag-1"}}"#,
    );
    out
}

/// What a byte mutation does at its place.
#[derive(Clone, Debug)]
enum ByteEdit {
    Set(u8),
    Insert(u8),
    Delete(usize),
    Repeat(usize),
    Truncate,
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        any::<u8>().prop_map(ByteEdit::Set),
        prop::sample::select(b"{}[]\":,\\0e.-nt ".to_vec()).prop_map(ByteEdit::Insert),
        any::<u8>().prop_map(ByteEdit::Insert),
        (1usize..24).prop_map(ByteEdit::Delete),
        (1usize..24).prop_map(ByteEdit::Repeat),
        Just(ByteEdit::Truncate),
    ]
}

/// One of `seeds`, with one to five byte edits.
pub fn mutated_bytes(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((any::<Index>(), byte_edit()), 1..6),
    )
        .prop_map(|(mut data, edits)| {
            for (at, edit) in edits {
                let i = at.index(data.len() + 1);
                match edit {
                    ByteEdit::Set(b) if i < data.len() => data[i] = b,
                    ByteEdit::Set(b) | ByteEdit::Insert(b) => data.insert(i, b),
                    ByteEdit::Delete(n) => {
                        data.drain(i..(i + n).min(data.len()));
                    }
                    ByteEdit::Repeat(n) => {
                        let copy = data[i..(i + n).min(data.len())].to_vec();
                        data.splice(i..i, copy);
                    }
                    ByteEdit::Truncate => data.truncate(i),
                }
            }
            data
        })
}

/// What a value mutation does to the node it picks.
#[derive(Clone, Debug)]
enum ValueEdit {
    /// Replace the node with one of [`ODD_VALUES`].
    Replace(usize),
    /// Remove it from its object or array.
    Remove,
    /// Wrap it in a list.
    Wrap,
}

/// Stands for `ODD_VALUES[i]` until the value is written (`\u0001` once in JSON).
const PLACEHOLDER: &str = "\u{1}odd-value-";

/// `value` with one to four nodes replaced, removed or wrapped, written as JSON.
pub fn mutated_json(value: Value) -> impl Strategy<Value = Vec<u8>> {
    let edit = prop_oneof![
        3 => (0..ODD_VALUES.len()).prop_map(ValueEdit::Replace),
        1 => Just(ValueEdit::Remove),
        1 => Just(ValueEdit::Wrap),
    ];
    prop::collection::vec((any::<Index>(), edit), 1..5).prop_map(move |edits| {
        let mut value = value.clone();
        for (at, edit) in edits {
            let target = at.index(count_nodes(&value));
            edit_node(&mut value, target, &edit);
        }
        let mut text = serde_json::to_string(&value).expect("a JSON value");
        for (i, odd) in ODD_VALUES.iter().enumerate() {
            text = text.replace(&format!("\"\\u0001odd-value-{i}\""), odd);
        }
        text.into_bytes()
    })
}

fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Apply `edit` to the node numbered `target` in pre-order.
fn edit_node(value: &mut Value, target: usize, edit: &ValueEdit) {
    fn walk(value: &mut Value, target: &mut usize, edit: &ValueEdit) -> bool {
        if *target == 0 {
            match edit {
                ValueEdit::Replace(i) => *value = Value::String(format!("{PLACEHOLDER}{i}")),
                ValueEdit::Wrap => *value = Value::Array(vec![value.take()]),
                ValueEdit::Remove => *value = Value::Null,
            }
            return true;
        }
        *target -= 1;
        match value {
            Value::Array(items) => {
                for i in 0..items.len() {
                    if *target == 0 && matches!(edit, ValueEdit::Remove) {
                        items.remove(i);
                        return true;
                    }
                    if walk(&mut items[i], target, edit) {
                        return true;
                    }
                }
            }
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    if *target == 0 && matches!(edit, ValueEdit::Remove) {
                        map.remove(&key);
                        return true;
                    }
                    if let Some(child) = map.get_mut(&key) {
                        if walk(child, target, edit) {
                            return true;
                        }
                    }
                }
            }
            _ => {}
        }
        false
    }
    let mut target = target;
    walk(value, &mut target, edit);
}

/// Task messages with their headers or body mutated (by value or by byte), as
/// `(headers text, body text)`.
pub fn mutated_task() -> impl Strategy<Value = (Option<Vec<u8>>, Vec<u8>)> {
    let parts = task_parts();
    let bodies: Vec<Vec<u8>> = parts
        .iter()
        .map(|p| serde_json::to_vec(&p.body).expect("JSON"))
        .collect();
    prop::sample::select(parts).prop_flat_map(move |part| {
        let headers = part
            .headers
            .as_ref()
            .map(|h| serde_json::to_vec(h).expect("JSON"));
        let body = serde_json::to_vec(&part.body).expect("JSON");
        prop_oneof![
            // the body's values
            mutated_json(part.body.clone()).prop_map({
                let headers = headers.clone();
                move |body| (headers.clone(), body)
            }),
            // the headers' values
            match part.headers.clone() {
                Some(h) => mutated_json(h).prop_map(Some).boxed(),
                None => Just(None).boxed(),
            }
            .prop_map({
                let body = body.clone();
                move |headers| (headers, body.clone())
            }),
            // the body's bytes
            mutated_bytes(bodies.clone()).prop_map(move |body| (headers.clone(), body)),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::is_ready;
    use crate::broker::amqp::{field_table_to_json, json_to_field_table};
    use crate::broker::{pidbox, IncomingMessage};
    use crate::protocol::envelope::{peek_delivery_tag, IncomingEnvelope};
    use crate::protocol::json;
    use lapin::types::generation::gen_field_table;
    use lapin::types::parsing::parse_field_table;

    fn config() -> proptest::test_runner::Config {
        proptest::test_runner::Config {
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        }
    }

    fn envelopes() -> Vec<Vec<u8>> {
        CELERY_ENVELOPES.iter().map(|raw| raw.to_vec()).collect()
    }

    /// The decoders that need no Python, on one envelope's bytes.
    fn decode_envelope(raw: &[u8]) {
        let tag = peek_delivery_tag(raw);
        let _ = is_ready(raw);
        let _ = pidbox::decode(raw);
        if let Ok(envelope) = IncomingEnvelope::parse(raw) {
            // A message we can read we can also ack by its tag.
            assert_eq!(
                tag.as_deref(),
                Some(envelope.properties.delivery_tag.as_str())
            );
            let _ = IncomingMessage::from_envelope(envelope, "t".into(), "q".into(), 0, false);
        }
    }

    fn header_table(headers: &Value) -> Vec<u8> {
        let table = json_to_field_table(headers.as_object().expect("an object")).expect("table");
        cookie_factory::gen_simple(gen_field_table(&table), Vec::new()).expect("written")
    }

    #[test]
    fn the_seeds_decode() {
        for raw in CELERY_ENVELOPES {
            let envelope = IncomingEnvelope::parse(raw).expect("a captured envelope");
            IncomingMessage::from_envelope(envelope, "t".into(), "q".into(), 0, false)
                .expect("a message");
        }
        for parts in task_parts() {
            let body = serde_json::to_vec(&parts.body).unwrap();
            json::from_slice::<Value>(&body).expect("a body");
        }
    }

    #[test]
    fn header_tables_round_trip() {
        for parts in task_parts() {
            let Some(headers) = parts.headers else {
                continue;
            };
            let written = header_table(&headers);
            let (rest, table) = parse_field_table(written.as_slice()).expect("parses");
            assert!(rest.is_empty());
            assert_eq!(Value::Object(field_table_to_json(&table)), headers);
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn mutated_envelopes_are_messages_or_reasons(raw in mutated_bytes(envelopes())) {
            decode_envelope(&raw);
        }

        #[test]
        fn envelopes_around_mutated_parts_are_messages_or_reasons(
            (headers, body) in mutated_task()
        ) {
            decode_envelope(&envelope_of(headers.as_deref(), &body));
        }

        #[test]
        fn mutated_json_reads_back_as_written((_, body) in mutated_task()) {
            if let Ok(value) = json::from_slice::<Value>(&body) {
                let text = json::to_vec(&value).expect("written");
                prop_assert_eq!(json::from_slice::<Value>(&text).expect("reads"), value);
            }
        }

        #[test]
        fn mutated_header_tables_are_tables_or_errors(
            raw in mutated_bytes(
                task_parts().iter().filter_map(|p| p.headers.as_ref()).map(header_table).collect()
            )
        ) {
            if let Ok((_, table)) = parse_field_table(raw.as_slice()) {
                let headers = Value::Object(field_table_to_json(&table));
                prop_assert!(serde_json::value::to_raw_value(&headers).is_ok());
            }
        }
    }
}
