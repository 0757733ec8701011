//! JSON as kombu writes it (`protocol::json`): any bytes are a value or an error; what
//! parses is written back and reads as the same value; kombu's type markers decode
//! or refuse, and one that decodes is written back as itself; the Python decoder
//! (`_core.loads`) raises only `DecodeError`.
#![no_main]

use _core::protocol::json::{self, Marker};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let _ = json::from_slice::<serde::de::IgnoredAny>(data);
    if let Ok(value) = json::from_slice::<Value>(data) {
        let text = json::to_vec(&value).expect("a parsed value is written");
        let again: Value = json::from_slice(&text).expect("what we write parses");
        assert_eq!(again, value);
        markers(&value);
    }
    let _ = _core::fuzz_hooks::loads(data);
});

fn markers(value: &Value) {
    match value {
        Value::Object(map) => {
            if let (2, Some(Value::String(kind)), Some(inner)) =
                (map.len(), map.get("__type__"), map.get("__value__"))
            {
                if let Ok(marker) = Marker::from_parts(kind, inner) {
                    let written: Value =
                        serde_json::from_slice(&json::to_vec(&marker).expect("written"))
                            .expect("parses");
                    let back = Marker::from_parts(
                        written["__type__"].as_str().expect("a type name"),
                        &written["__value__"],
                    )
                    .expect("our own marker decodes");
                    assert_eq!(back, marker);
                }
            }
            map.values().for_each(markers);
        }
        Value::Array(items) => items.iter().for_each(markers),
        _ => {}
    }
}
