//! An AMQP delivery's header table, as lapin parses it from the frame, turned into
//! JSON (`broker::amqp::field_table_to_json`) and then into Python objects by the task
//! consumer and by remote control; the bytes after the table are the body.
#![no_main]

use _core::broker::amqp::field_table_to_json;
use _core::fuzz_hooks;
use amq_protocol_types::parsing::parse_field_table;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok((body, table)) = parse_field_table(data) else {
        return;
    };
    let headers = Value::Object(field_table_to_json(&table));
    let _ = fuzz_hooks::broadcast(Ok((headers.clone(), body.to_vec())));
    let _ = fuzz_hooks::decode_task(fuzz_hooks::task_message(
        serde_json::value::to_raw_value(&headers).ok(),
        body.to_vec(),
    ));
});
