//! The decoders that build Python objects, fed bytes: entry points for the fuzz
//! targets in `fuzz/` (built with `--cfg fuzzing`) and for the property tests. Each
//! returns the reason a bad input was refused; a panic or a Python exception where the
//! worker expects a reason is the bug they look for.

use pyo3::prelude::*;
use serde_json::value::RawValue;

use super::{
    codec,
    consumer::{Accept, Delivery},
    pidbox,
};
use crate::broker::pidbox::Received;
use crate::broker::IncomingMessage;

fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    Python::initialize();
    Python::attach(f)
}

/// A task message as a transport hands it over: these headers and body, JSON content.
pub fn task_message(headers: Option<Box<RawValue>>, body: Vec<u8>) -> IncomingMessage {
    IncomingMessage {
        delivery_tag: "1".into(),
        queue: "celery".into(),
        exchange: String::new(),
        routing_key: "celery".into(),
        redelivered: false,
        priority: 0,
        reply_to: None,
        correlation_id: None,
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers,
        body,
    }
}

/// A task message as the worker's consumer decodes it (headers, v1/v2 body, markers).
pub fn decode_task(message: IncomingMessage) -> Result<(), String> {
    attach(|py| {
        // An exception here would fail the consumer's whole fetch, not one message.
        // The worker's default: JSON only.
        let accept = Accept::new(None).expect("the default accept_content is valid");
        let delivery = match Delivery::decode(py, message, &accept) {
            Ok(delivery) => delivery,
            Err(err) => panic!("Delivery::decode raised instead of refusing: {err}"),
        };
        match delivery.error() {
            Some(reason) => Err(reason.to_owned()),
            None => Ok(()),
        }
    })
}

/// `kombu.utils.json.loads`: bad input raises `DecodeError`, never anything else.
pub fn loads(data: &[u8]) -> Result<(), String> {
    attach(|py| match codec::loads(py, data) {
        Ok(_) => Ok(()),
        Err(err) if err.is_instance_of::<super::exceptions::DecodeError>(py) => {
            Err(err.to_string())
        }
        Err(err) => panic!("loads raised something other than DecodeError: {err}"),
    })
}

/// A remote-control or event broadcast as `Mailbox.receive` and `EventReceiver.receive`
/// hand it to Python: `(headers, body)`, or `(None, reason)`.
pub fn broadcast(received: Received) -> Result<(), String> {
    attach(|py| {
        let tuple = match pidbox::to_python(py, received) {
            Ok(tuple) => tuple,
            Err(err) => panic!("receive would raise instead of refusing: {err}"),
        };
        match tuple.get_item(0) {
            Ok(headers) if headers.is_none() => Err(tuple
                .get_item(1)
                .map(|reason| reason.to_string())
                .unwrap_or_default()),
            Ok(_) => Ok(()),
            Err(err) => panic!("not a pair: {err}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::protocol::envelope::IncomingEnvelope;
    use crate::protocol::mutate::{
        envelope_of, mutated_bytes, mutated_json, mutated_task, task_parts, CELERY_ENVELOPES,
    };

    fn message(headers: Option<&[u8]>, body: &[u8]) -> Option<IncomingMessage> {
        // Transports hand over headers that serde_json read as one JSON value.
        let headers = match headers {
            Some(raw) => Some(RawValue::from_string(String::from_utf8(raw.to_vec()).ok()?).ok()?),
            None => None,
        };
        Some(task_message(headers, body.to_vec()))
    }

    fn broadcast_envelope() -> Value {
        json!({"method": "ping", "arguments": {}, "destination": null,
               "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"},
               "ticket": "t-1"})
    }

    #[test]
    fn the_seeds_decode_into_tasks() {
        for raw in CELERY_ENVELOPES {
            let envelope = IncomingEnvelope::parse(raw).unwrap();
            let message =
                IncomingMessage::from_envelope(envelope, "1".into(), "q".into(), 0, false).unwrap();
            assert_eq!(decode_task(message), Ok(()));
        }
        for parts in task_parts() {
            let headers = parts.headers.map(|h| serde_json::to_vec(&h).unwrap());
            let body = serde_json::to_vec(&parts.body).unwrap();
            assert_eq!(
                decode_task(message(headers.as_deref(), &body).unwrap()),
                Ok(())
            );
        }
    }

    /// Each kind of bad input the worker test feeds a live worker is refused here with
    /// the reason the worker logs.
    #[test]
    fn bad_parts_are_refused_with_a_reason() {
        let headers = br#"{"lang": "py", "task": "tasks.add", "id": "x"}"#;
        for (body, reason) in [
            (&br#"[[1, 2], {}, {}"#[..], "not valid JSON"),
            (br#"{"args": "no"}"#, "not [args, kwargs, embed]"),
            (br#"["1, 2", {}, {}]"#, "args are not a list"),
            (br#"[[], [], {}]"#, "kwargs are not an object"),
            (br#"[[], {}, 3]"#, "embed part is not an object"),
            (
                br#"[[{"__type__": "uuid", "__value__": {"hex": "zz"}}], {}, {}]"#,
                "uuid",
            ),
            (
                br#"[[{"__type__": "pickle", "__value__": "x"}], {}, {}]"#,
                "pickle",
            ),
            (
                br#"[[], {"d": {"__type__": "datetime", "__value__": "soon"}}, {}]"#,
                "datetime",
            ),
        ] {
            let got = decode_task(message(Some(headers), body).unwrap());
            assert!(got.as_ref().is_err_and(|e| e.contains(reason)), "{got:?}");
        }
        let bad_header = br#"{"task": "t", "id": {"__type__": "decimal", "__value__": "x"}}"#;
        let got = decode_task(message(Some(bad_header), b"[[], {}, {}]").unwrap());
        assert!(
            got.as_ref().is_err_and(|e| e.contains("decimal")),
            "{got:?}"
        );
    }

    /// Before: a broadcast whose headers held a bad kombu marker made `receive` raise,
    /// which ended the worker's remote-control thread.
    #[test]
    fn a_broadcast_with_a_bad_marker_in_its_headers_is_unreadable_not_an_exception() {
        let headers = json!({"clock": {"__type__": "uuid", "__value__": {"hex": "zz"}}});
        let got = broadcast(Ok((headers, b"{}".to_vec())));
        assert!(got.as_ref().is_err_and(|e| e.contains("uuid")), "{got:?}");
    }

    proptest! {
        #![proptest_config(proptest::test_runner::Config {
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        #[test]
        fn mutated_tasks_decode_or_give_a_reason((headers, body) in mutated_task()) {
            if let Some(message) = message(headers.as_deref(), &body) {
                let _ = decode_task(message);
            }
        }

        #[test]
        fn mutated_envelopes_decode_or_give_a_reason(
            raw in mutated_bytes(CELERY_ENVELOPES.iter().map(|raw| raw.to_vec()).collect())
        ) {
            if let Ok(envelope) = IncomingEnvelope::parse(&raw) {
                if let Ok(message) =
                    IncomingMessage::from_envelope(envelope, "1".into(), "q".into(), 0, false)
                {
                    let _ = decode_task(message);
                }
            }
        }

        #[test]
        fn mutated_json_loads_or_raises_decode_error((_, body) in mutated_task()) {
            let _ = loads(&body);
        }

        #[test]
        fn mutated_broadcasts_are_read_or_refused(
            headers in mutated_json(json!({"clock": 3, "expires": 1.5, "ticket": "t-1"})),
            body in mutated_json(broadcast_envelope()),
        ) {
            let raw = envelope_of(Some(&headers), &body);
            let _ = broadcast(crate::broker::pidbox::decode(&raw));
        }
    }
}
