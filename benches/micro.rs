//! Micro-benchmarks of the Rust core's hot paths (divan): `cargo bench --bench micro`
//! (or `make bench-rust`; `-- FILTER` runs the matching ones).
//!
//! - `message`: a task message's headers and body, written and read back;
//! - `envelope`: kombu's Redis envelope (encode with the body in base64, parse, decode
//!   the body) and the AMQP header table (JSON <-> field table);
//! - `scheduler`: the rate-limit token buckets (a free token, an empty bucket, a task
//!   name with no limit) and the ETA timer (10k messages pushed, popped all at once or
//!   in the worker's small steps, and one in one out with 10k held).
//!
//! The prefetch window lives in the Python worker (`python/celeriac/worker/`), so it is
//! measured by `python -m benches`, not here.

use std::time::{Duration, Instant};

use _core::broker::amqp::{field_table_to_json, json_to_field_table};
use _core::protocol::envelope::{self as kombu, IncomingEnvelope};
use _core::protocol::json;
use _core::protocol::message::{
    write_body, HeaderIds, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
};
use _core::scheduler::{EtaSchedule, RateLimits, TokenBucket};
use divan::counter::ItemsCount;
use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

const ID: &str = "d9b2f4a6-0c1e-4c55-9a0e-6f1f2b7c3d8e";

/// `add.delay(2, 2)` as the producer builds it, or with `big` a few hundred bytes of
/// arguments (a list of numbers, a nested dict, text).
fn message(big: bool) -> OutgoingMessage {
    let mut headers = TaskHeaders::new("tasks.add".into(), ID.into(), "gen4242@host".into());
    let (args, kwargs) = if big {
        (
            format!(
                "[{}, \"{}\"]",
                serde_json::to_string(&(0..64).collect::<Vec<u32>>()).unwrap_or_default(),
                "x".repeat(200)
            ),
            r#"{"user": {"id": 12345, "name": "Zoë", "tags": ["a", "b", "c"]}, "retry": true}"#
                .to_owned(),
        )
    } else {
        ("[2, 2]".to_owned(), "{}".to_owned())
    };
    headers.argsrepr = "(2, 2)".into();
    headers.kwargsrepr = "{}".into();
    let mut body = Vec::new();
    write_body(
        &mut body,
        args.as_bytes(),
        kwargs.as_bytes(),
        EMPTY_EMBED.as_bytes(),
    );
    OutgoingMessage {
        exchange: String::new(),
        routing_key: "celery".into(),
        headers,
        properties: TaskProperties::json(ID.into(), String::new()),
        body,
    }
}

mod message {
    use super::*;

    /// The headers, as the producer writes them (Python's JSON spelling).
    #[divan::bench(args = [false, true])]
    fn encode_headers(bencher: Bencher, big: bool) {
        let msg = message(big);
        bencher.bench_local(|| {
            let mut out = Vec::with_capacity(512);
            json::write(&mut out, black_box(&msg.headers)).map(|()| out)
        });
    }

    /// A new message from its parts: headers for a fresh id, the body's three parts.
    #[divan::bench]
    fn build() -> OutgoingMessage {
        let mut headers = TaskHeaders::new(
            black_box("tasks.add").into(),
            black_box(ID).into(),
            "gen4242@host".into(),
        );
        headers.argsrepr = "(2, 2)".into();
        headers.kwargsrepr = "{}".into();
        let mut body = Vec::with_capacity(96);
        write_body(&mut body, b"[2, 2]", b"{}", EMPTY_EMBED.as_bytes());
        OutgoingMessage {
            exchange: String::new(),
            routing_key: "celery".into(),
            headers,
            properties: TaskProperties::json(ID.into(), String::new()),
            body,
        }
    }

    /// The worker's first look at the headers: the task's name and id.
    #[divan::bench]
    fn decode_header_ids(bencher: Bencher) {
        let text = json::to_vec(&message(false).headers).unwrap_or_default();
        bencher.bench_local(|| serde_json::from_slice::<HeaderIds>(black_box(&text)).ok());
    }

    /// The body `[args, kwargs, embed]` parsed with Python's JSON grammar.
    #[divan::bench(args = [false, true])]
    fn decode_body(bencher: Bencher, big: bool) {
        let body = message(big).body;
        bencher.bench_local(|| json::from_slice::<serde_json::Value>(black_box(&body)).ok());
    }
}

mod envelope {
    use super::*;

    /// The JSON text the Redis producer LPUSHes (body in base64).
    #[divan::bench(args = [false, true])]
    fn encode(bencher: Bencher, big: bool) {
        let msg = message(big);
        bencher.bench_local(|| kombu::encode(black_box(&msg), black_box(ID)).ok());
    }

    /// What the Redis consumer does with it: parse the envelope, decode the body.
    #[divan::bench(args = [false, true])]
    fn decode(bencher: Bencher, big: bool) {
        let raw = kombu::encode(&message(big), ID).unwrap_or_default();
        bencher.bench_local(|| {
            let env = IncomingEnvelope::parse(black_box(&raw)).ok()?;
            env.body_bytes().ok()
        });
    }

    /// The AMQP side: the headers as an AMQP field table and back.
    #[divan::bench]
    fn amqp_headers_roundtrip(bencher: Bencher) {
        let headers: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&json::to_vec(&message(false).headers).unwrap_or_default())
                .unwrap_or_default();
        bencher.bench_local(|| {
            let table = json_to_field_table(black_box(&headers)).ok()?;
            Some(field_table_to_json(&table))
        });
    }
}

mod scheduler {
    use super::*;

    /// A bucket with a token to take (a high rate, so it refills between calls).
    #[divan::bench]
    fn token_bucket_free(bencher: Bencher) {
        let mut bucket = TokenBucket::new(1e12, 1.0);
        let mut now = Instant::now();
        bencher.bench_local(|| {
            now += Duration::from_micros(1);
            bucket.acquire_at(black_box(now))
        });
    }

    /// An empty bucket: the answer is how long to wait.
    #[divan::bench]
    fn token_bucket_empty(bencher: Bencher) {
        let mut bucket = TokenBucket::new(0.001, 1.0);
        let now = Instant::now();
        bucket.acquire_at(now);
        bencher.bench_local(|| bucket.acquire_at(black_box(now)));
    }

    /// The worker asks for every message: a limited name among 50, and an unlimited one.
    #[divan::bench(args = ["tasks.limited_25", "tasks.unlimited"])]
    fn rate_limits_lookup(bencher: Bencher, name: &str) {
        let mut limits = RateLimits::new();
        for i in 0..50 {
            limits.set(&format!("tasks.limited_{i}"), 1e12);
        }
        let mut now = Instant::now();
        bencher.bench_local(|| {
            now += Duration::from_micros(1);
            limits.acquire_at(black_box(name), now)
        });
    }

    /// ETA messages per run of the `eta_*` benches.
    const HELD: usize = 10_000;

    /// The `i`th due time: scattered over 1000 seconds (so 10 per second: ties).
    fn due(i: usize) -> f64 {
        1.7e9 + ((i * 7919) % 1000) as f64
    }

    fn held() -> EtaSchedule<usize> {
        let mut eta = EtaSchedule::new();
        for i in 0..HELD {
            let _ = eta.push(due(i), i);
        }
        eta
    }

    /// 10k messages held, in scattered order.
    #[divan::bench]
    fn eta_push_10k(bencher: Bencher) {
        bencher
            .counter(ItemsCount::new(HELD))
            .with_inputs(EtaSchedule::<usize>::new)
            .bench_local_values(|mut eta| {
                for i in 0..HELD {
                    let _ = eta.push(black_box(due(i)), i);
                }
                eta
            });
    }

    /// 10k messages all due at once (a worker coming back from a long pause).
    #[divan::bench]
    fn eta_pop_due_10k_at_once(bencher: Bencher) {
        bencher
            .counter(ItemsCount::new(HELD))
            .with_inputs(held)
            .bench_local_values(|mut eta| eta.pop_due(black_box(f64::MAX), None));
    }

    /// 10k messages taken as the worker does: a second at a time (10 due per call).
    #[divan::bench]
    fn eta_pop_due_10k_by_second(bencher: Bencher) {
        bencher
            .counter(ItemsCount::new(HELD))
            .with_inputs(held)
            .bench_local_values(|mut eta| {
                let mut taken = 0;
                for second in 0..1000 {
                    taken += eta
                        .pop_due(black_box(1.7e9 + f64::from(second)), None)
                        .len();
                }
                taken
            });
    }

    /// One message in, one due out, with 10k held.
    #[divan::bench]
    fn eta_push_pop_with_10k_held(bencher: Bencher) {
        let mut eta = held();
        let mut i = HELD;
        bencher.bench_local(|| {
            let _ = eta.push(black_box(due(i)), i);
            i += 1;
            eta.pop_due(black_box(f64::MAX), Some(1))
        });
    }
}
