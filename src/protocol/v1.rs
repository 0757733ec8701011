//! Task message protocol v1 (docs/wire.md §1.6): everything in the body, a map with
//! `task`, `id`, `args`, `kwargs`, ... and no task headers. Converted here to the v2
//! parts (headers, args, kwargs, embed) the worker runs.
//!
//! The conversion works on any decoded value (`V1Value`): serde's JSON values, and the
//! Python objects a pickle/msgpack/yaml body decodes to (implemented in `src/py/`).

use serde_json::{Map, Value};

/// What the conversion needs to know of a decoded value.
pub trait V1Value: Sized {
    fn is_null(&self) -> bool;
    fn is_list(&self) -> bool;
    fn is_map(&self) -> bool;
    /// The value under `key` of a map (`None`: absent, or not a map).
    fn get(&self, key: &str) -> Option<Self>;
}

/// A v2 header's value: a constant of the conversion, or copied from the v1 body
/// (`None`: absent there, written as null).
#[derive(Debug, PartialEq)]
pub enum HeaderValue<V> {
    Text(&'static str),
    Copied(Option<V>),
}

/// The v2 parts of a v1 message, in the order the worker reads them.
#[derive(Debug)]
pub struct V2Parts<V> {
    pub headers: Vec<(&'static str, HeaderValue<V>)>,
    /// `None`: no args (an empty list).
    pub args: Option<V>,
    /// `None`: no kwargs (an empty map).
    pub kwargs: Option<V>,
    /// The embed part; `None` values are null.
    pub embed: Vec<(&'static str, Option<V>)>,
}

/// Header keys a v1 body carries under the same name in v2.
const COPIED_HEADERS: [&str; 8] = [
    "task",
    "id",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
];

/// Embed keys a v1 body carries (v1 has no `chain`: it is always null).
const COPIED_EMBED: [&str; 3] = ["callbacks", "errbacks", "chord"];

/// The v2 parts of a message without a `task` header, or why it is not a v1 message.
pub fn to_v2<V: V1Value>(body: &V) -> Result<V2Parts<V>, String> {
    if !body.is_map() {
        return Err("the message has no task headers and is not a protocol v1 body".into());
    }
    let present = |key: &str| body.get(key).filter(|value| !value.is_null());
    if present("task").is_none() || present("id").is_none() {
        return Err("the message has no task name or id in its headers".into());
    }
    let mut headers = Vec::with_capacity(COPIED_HEADERS.len() + 3);
    headers.push(("lang", HeaderValue::Text("py")));
    for key in COPIED_HEADERS {
        headers.push((key, HeaderValue::Copied(body.get(key))));
    }
    headers.push(("root_id", HeaderValue::Copied(body.get("id"))));
    headers.push(("parent_id", HeaderValue::Copied(None)));
    let args = present("args");
    if args.as_ref().is_some_and(|args| !args.is_list()) {
        return Err("the task args are not a list".into());
    }
    let kwargs = present("kwargs");
    if kwargs.as_ref().is_some_and(|kwargs| !kwargs.is_map()) {
        return Err("the task kwargs are not an object".into());
    }
    let mut embed: Vec<(&'static str, Option<V>)> = COPIED_EMBED
        .iter()
        .map(|key| (*key, body.get(key)))
        .collect();
    embed.push(("chain", None));
    Ok(V2Parts {
        headers,
        args,
        kwargs,
        embed,
    })
}

impl V1Value for Value {
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }

    fn is_list(&self) -> bool {
        self.is_array()
    }

    fn is_map(&self) -> bool {
        self.is_object()
    }

    fn get(&self, key: &str) -> Option<Self> {
        self.as_object()?.get(key).cloned()
    }
}

/// A v1 JSON body as the v2 `(headers, [args, kwargs, embed])`.
pub fn json_to_v2(body: &Value) -> Result<(Map<String, Value>, Value), String> {
    let parts = to_v2(body)?;
    let headers = parts
        .headers
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                HeaderValue::Text(text) => Value::from(text),
                HeaderValue::Copied(value) => value.unwrap_or(Value::Null),
            };
            (key.to_owned(), value)
        })
        .collect();
    let embed: Map<String, Value> = parts
        .embed
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.unwrap_or(Value::Null)))
        .collect();
    let args = parts.args.unwrap_or_else(|| Value::Array(Vec::new()));
    let kwargs = parts.kwargs.unwrap_or_else(|| Value::Object(Map::new()));
    Ok((
        headers,
        Value::Array(vec![args, kwargs, Value::Object(embed)]),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_v1_body_becomes_v2_headers_and_body() {
        let body = json!({
            "task": "tasks.add", "id": "id-1", "args": [2, 3], "kwargs": {"z": 1},
            "eta": "2030-01-01T00:00:00+00:00", "retries": 2, "timelimit": [10, null],
            "callbacks": [{"task": "cb"}], "utc": true, "taskset": "ignored",
        });
        let (headers, v2) = json_to_v2(&body).unwrap();
        assert_eq!(headers["lang"], "py");
        assert_eq!(headers["task"], "tasks.add");
        assert_eq!(headers["id"], "id-1");
        assert_eq!(headers["root_id"], "id-1");
        assert_eq!(headers["parent_id"], Value::Null);
        assert_eq!(headers["eta"], "2030-01-01T00:00:00+00:00");
        assert_eq!(headers["retries"], 2);
        assert_eq!(headers["timelimit"], json!([10, null]));
        assert_eq!(headers["expires"], Value::Null);
        assert!(!headers.contains_key("utc"));
        assert_eq!(v2[0], json!([2, 3]));
        assert_eq!(v2[1], json!({"z": 1}));
        assert_eq!(
            v2[2],
            json!({"callbacks": [{"task": "cb"}], "errbacks": null, "chord": null, "chain": null})
        );
    }

    #[test]
    fn missing_args_and_kwargs_are_empty() {
        let (_, v2) = json_to_v2(&json!({"task": "t", "id": "i", "kwargs": null})).unwrap();
        assert_eq!(v2[0], json!([]));
        assert_eq!(v2[1], json!({}));
    }

    #[test]
    fn a_body_that_is_not_v1_says_why() {
        let err = |body: Value| json_to_v2(&body).unwrap_err();
        assert!(err(json!([[1], {}, {}])).contains("not a protocol v1 body"));
        assert!(err(json!({"task": "t"})).contains("no task name or id"));
        assert!(err(json!({"id": "i", "task": null})).contains("no task name or id"));
        assert_eq!(
            err(json!({"task": "t", "id": "i", "args": {"a": 1}})),
            "the task args are not a list"
        );
        assert_eq!(
            err(json!({"task": "t", "id": "i", "kwargs": [1]})),
            "the task kwargs are not an object"
        );
    }
}
