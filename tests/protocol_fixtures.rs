//! Messages captured from a real Celery 5.7 client on Redis (tests/fixtures/) decode
//! with our envelope and JSON code, and our own messages carry the same keys.

use std::path::Path;

use _core::protocol::envelope::{self, IncomingEnvelope};
use _core::protocol::json;
use _core::protocol::message::{
    write_body, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
};
use serde_json::Value;

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tests/fixtures")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("readable fixture"))
        })
        .collect();
    found.sort();
    assert!(found.len() >= 6, "expected the captured Celery messages");
    found
}

#[test]
fn celery_messages_decode() {
    for (name, raw) in fixtures() {
        let env = IncomingEnvelope::parse(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            env.content_type.as_deref(),
            Some("application/json"),
            "{name}"
        );
        let info = env
            .properties
            .delivery_info
            .as_ref()
            .expect("delivery_info");
        assert!(!info.routing_key.is_empty(), "{name}");
        let headers: Value = serde_json::from_str(env.headers.as_ref().expect("headers").get())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for key in [
            "lang",
            "task",
            "id",
            "root_id",
            "retries",
            "timelimit",
            "argsrepr",
            "origin",
        ] {
            assert!(headers.get(key).is_some(), "{name}: header {key} missing");
        }
        // The body is [args, kwargs, embed]; our parser (kombu's rules) accepts it, and
        // its shape is checked through serde_json (whose Value has no big integers).
        let body = env.body_bytes().unwrap_or_else(|e| panic!("{name}: {e}"));
        json::from_slice::<serde::de::IgnoredAny>(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let parsed: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let parts = parsed
            .as_array()
            .unwrap_or_else(|| panic!("{name}: body not a list"));
        assert_eq!(parts.len(), 3, "{name}");
        assert!(
            parts[0].is_array() && parts[1].is_object() && parts[2].is_object(),
            "{name}"
        );
        for key in ["callbacks", "errbacks", "chain", "chord"] {
            assert!(parts[2].get(key).is_some(), "{name}: embed {key} missing");
        }
    }
}

#[test]
fn our_messages_have_every_key_celery_sends() {
    let (_, raw) = fixtures().remove(0);
    let celery: Value = serde_json::from_slice(&raw).expect("json");
    let mut body = Vec::new();
    write_body(&mut body, b"[1, 2]", b"{}", EMPTY_EMBED.as_bytes());
    let ours = envelope::encode(
        &OutgoingMessage {
            exchange: String::new(),
            routing_key: "celery".into(),
            headers: TaskHeaders::new("tasks.add".into(), "id-1".into(), "gen1@host".into()),
            properties: TaskProperties::json("id-1".into(), "oid".into()),
            body,
        },
        "tag-1",
    )
    .expect("encode");
    let ours: Value = serde_json::from_slice(&ours).expect("json");
    for section in ["headers", "properties"] {
        let theirs = celery[section].as_object().expect("object");
        let mine = ours[section].as_object().expect("object");
        for key in theirs.keys() {
            // Celery adds `priority` to properties only when one is chosen; we always
            // write it (kombu's default 0), as kombu's virtual transport does.
            assert!(
                mine.contains_key(key),
                "{section}.{key} missing from our message"
            );
        }
    }
    let top: Vec<&String> = ours.as_object().expect("object").keys().collect();
    let theirs: Vec<&String> = celery.as_object().expect("object").keys().collect();
    assert_eq!(top, theirs, "top-level keys and their order");
}
