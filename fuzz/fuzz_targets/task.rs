//! A task message's headers and body (protocol v1 and v2, kombu markers, wrong types)
//! as the worker decodes them, without the envelope around them: the input is the
//! headers' JSON, a 0xff byte (never in JSON), then the body.
#![no_main]

use _core::fuzz_hooks;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let (headers, body) = match data.iter().position(|&b| b == 0xff) {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    // Transports hand over headers that serde_json accepted as one JSON value.
    let headers = match headers.map(|raw| {
        std::str::from_utf8(raw)
            .ok()
            .and_then(|text| RawValue::from_string(text.to_owned()).ok())
    }) {
        Some(None) => return,
        Some(Some(raw)) => Some(raw),
        None => None,
    };
    let _ = fuzz_hooks::decode_task(fuzz_hooks::task_message(headers, body.to_vec()));
});
