//! A kombu envelope as it comes from a Redis list, a SQLite row or a Redis pub/sub
//! broadcast: parsed, its body decoded, then decoded into Python objects as the worker's
//! consumer, remote control and event receivers do. Every bad input is a reason.
#![no_main]

use _core::broker::{pidbox, IncomingMessage};
use _core::fuzz_hooks;
use _core::protocol::envelope::{self, IncomingEnvelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envelope::peek_delivery_tag(data);
    let _ = _core::backend::is_ready(data);
    let _ = fuzz_hooks::broadcast(pidbox::decode(data));
    if let Ok(parsed) = IncomingEnvelope::parse(data) {
        if let Ok(message) =
            IncomingMessage::from_envelope(parsed, "1".into(), "celery".into(), 0, false)
        {
            let _ = fuzz_hooks::decode_task(message);
        }
    }
});
