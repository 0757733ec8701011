//! Result stores: where task states and return values are kept.
//!
//! A store keeps one meta document per task (Celery's layout, see celery-wire.md §4) as
//! opaque JSON bytes: encoding and decoding belong to the caller. The only field the
//! stores read is `"status"`, to tell a ready state from a progress update.

pub mod redis;

use std::borrow::Cow;

use serde::Deserialize;

/// Celery's `READY_STATES`: a task in one of these will not change again.
pub const READY_STATES: [&str; 3] = ["SUCCESS", "FAILURE", "REVOKED"];

/// Whether a stored meta document has a ready state.
///
/// A document that is not a JSON object with a string `"status"` counts as ready, so
/// that a waiter hands it to the decoder (which says what is wrong) instead of waiting
/// for its timeout.
pub fn is_ready(meta: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        status: Option<Cow<'a, str>>,
    }
    match serde_json::from_slice::<Probe<'_>>(meta) {
        Ok(probe) => probe
            .status
            .is_some_and(|status| READY_STATES.contains(&status.as_ref())),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_states_are_recognised() {
        assert!(is_ready(br#"{"status": "SUCCESS", "result": 1}"#));
        assert!(is_ready(br#"{"result": null, "status": "FAILURE"}"#));
        assert!(is_ready(br#"{"status": "REVOKED"}"#));
        assert!(is_ready(br#"{"status": "SUCC\u0045SS"}"#));
        for state in ["PENDING", "STARTED", "RETRY", "RECEIVED", "custom"] {
            let meta = format!(r#"{{"status": "{state}", "result": {{"status": "SUCCESS"}}}}"#);
            assert!(!is_ready(meta.as_bytes()), "{state}");
        }
        assert!(!is_ready(br#"{"result": 1}"#));
    }

    #[test]
    fn undecodable_meta_is_handed_over() {
        assert!(is_ready(b"not json"));
        assert!(is_ready(b"[1, 2]"));
        assert!(is_ready(br#"{"status": 3}"#));
    }
}
