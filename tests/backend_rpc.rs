//! The `rpc://` result backend against the real RabbitMQ on 127.0.0.1:5672: results
//! travel on the broker to the client's reply queue. Each test uses its own reply
//! queue (a fresh oid) and deletes it.

use std::time::{Duration, Instant};

use _core::backend::rpc::{RpcBackend, RpcBackendOptions};
use _core::backend::{Backend, BackendOptions};
use _core::broker::amqp::{self, AmqpOptions};
use _core::broker::url::BrokerUrl;
use _core::runtime;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

fn oid() -> String {
    format!("rs-rpc-{}", uuid::Uuid::new_v4())
}

fn client(reply_to: &str) -> RpcBackend {
    RpcBackend::connect(
        BROKER,
        RpcBackendOptions {
            reply_to: reply_to.to_owned(),
            ..RpcBackendOptions::default()
        },
    )
    .expect("RabbitMQ must run on 127.0.0.1:5672")
}

fn worker() -> RpcBackend {
    RpcBackend::connect(BROKER, RpcBackendOptions::default()).expect("worker backend")
}

fn meta(task_id: &str, status: &str, result: i64) -> Vec<u8> {
    format!(
        r#"{{"status": "{status}", "result": {result}, "traceback": null, "children": [], "date_done": null, "task_id": "{task_id}"}}"#
    )
    .into_bytes()
}

fn delete_queue(name: &str) {
    let name = name.to_owned();
    runtime::handle().block_on(async move {
        let url = BrokerUrl::parse(BROKER).expect("url");
        if let Ok(conn) = amqp::connect(&url, &AmqpOptions::default(), "test-admin").await {
            if let Ok(channel) = conn.create_channel().await {
                let _ = channel
                    .queue_delete(name.as_str().into(), Default::default())
                    .await;
            }
        }
    });
}

#[test]
fn a_result_published_before_the_wait_is_received() {
    let reply_to = oid();
    let client = client(&reply_to);
    let worker = worker();
    // Progress first, then the ready state; the client keeps only the latest.
    worker
        .store("t1", meta("t1", "STARTED", 0), Some(&reply_to), None)
        .expect("store");
    worker
        .store("t1", meta("t1", "SUCCESS", 5), Some(&reply_to), None)
        .expect("store");
    worker.flush(Duration::from_secs(10)).expect("flush");
    let got = client
        .wait("t1", Some(Instant::now() + Duration::from_secs(10)))
        .expect("result");
    assert_eq!(got, meta("t1", "SUCCESS", 5));
    // A later non-ready update never replaces the ready one.
    worker
        .store("t1", meta("t1", "RETRY", 0), Some(&reply_to), None)
        .expect("store");
    worker.flush(Duration::from_secs(10)).expect("flush");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        client.get("t1").expect("get"),
        Some(meta("t1", "SUCCESS", 5))
    );
    client.forget("t1").expect("forget");
    assert_eq!(client.get("t1").expect("get"), None);
    // Nothing is sent without a reply_to.
    worker
        .store("t2", meta("t2", "SUCCESS", 1), None, None)
        .expect("store");
    worker
        .store("t2", meta("t2", "SUCCESS", 1), Some(""), None)
        .expect("store");
    worker.flush(Duration::from_secs(10)).expect("flush");
    client.close().expect("close");
    worker.close().expect("close");
    delete_queue(&reply_to);
}

#[test]
fn waits_without_polling_and_times_out() {
    let reply_to = oid();
    let client = client(&reply_to);
    let mut waiter = client.watch("late").expect("watch");
    let started = Instant::now();
    assert_eq!(
        waiter
            .wait_until(Instant::now() + Duration::from_millis(300))
            .expect("wait"),
        None
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let err = client
        .wait("late", Some(Instant::now() + Duration::from_millis(100)))
        .expect_err("timeout")
        .to_string();
    assert!(err.contains("timed out"), "{err}");
    let worker = worker();
    let sender = std::thread::spawn({
        let reply_to = reply_to.clone();
        move || {
            std::thread::sleep(Duration::from_millis(200));
            // The correlation id names the task even if the body does not.
            worker
                .store(
                    "other",
                    meta("late", "FAILURE", 0),
                    Some(&reply_to),
                    Some("late"),
                )
                .expect("store");
            worker.flush(Duration::from_secs(10)).expect("flush");
        }
    });
    let got = waiter
        .wait_until(Instant::now() + Duration::from_secs(10))
        .expect("wait")
        .expect("arrived");
    assert_eq!(got, meta("late", "FAILURE", 0));
    sender.join().expect("sender");
    client.close().expect("close");
    delete_queue(&reply_to);
}

#[test]
fn the_reply_queue_is_declared_as_celery_57_does() {
    let reply_to = oid();
    let _client = client(&reply_to);
    let url = BrokerUrl::parse(BROKER).expect("url");
    let name = reply_to.clone();
    runtime::handle().block_on(async move {
        let conn = amqp::connect(&url, &AmqpOptions::default(), "test-admin")
            .await
            .expect("connect");
        let channel = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(86_400_000));
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("Celery 5.7's declaration of the reply queue is compatible");
    });
    delete_queue(&reply_to);
}

#[test]
fn the_backend_enum_picks_rpc_and_needs_an_amqp_broker() {
    let reply_to = oid();
    let backend = Backend::connect(
        "rpc://",
        BackendOptions {
            broker_url: Some(BROKER.into()),
            reply_to: reply_to.clone(),
            ..BackendOptions::default()
        },
    )
    .expect("rpc backend");
    assert_eq!(backend.masked_url(), "amqp://guest:**@127.0.0.1:5672//");
    backend
        .store_for("e1", meta("e1", "SUCCESS", 2), Some(&reply_to), None)
        .expect("store");
    backend.flush(Duration::from_secs(10)).expect("flush");
    assert_eq!(
        backend
            .wait("e1", Some(Instant::now() + Duration::from_secs(10)))
            .expect("wait"),
        meta("e1", "SUCCESS", 2)
    );
    backend.close().expect("close");
    let err = Backend::connect("rpc://", BackendOptions::default())
        .expect_err("no broker")
        .to_string();
    assert!(err.contains("broker"), "{err}");
    let err = Backend::connect(
        "rpc://",
        BackendOptions {
            broker_url: Some("redis://:secret@127.0.0.1:6379/0".into()),
            ..BackendOptions::default()
        },
    )
    .expect_err("not amqp")
    .to_string();
    assert!(
        err.contains("AMQP broker") && !err.contains("secret"),
        "{err}"
    );
    let err = RpcBackend::connect(
        "amqp://guest:bad-secret@127.0.0.1:5672//",
        RpcBackendOptions::default(),
    )
    .expect_err("bad password")
    .to_string();
    assert!(
        err.contains("guest:**@") && !err.contains("bad-secret"),
        "{err}"
    );
    delete_queue(&reply_to);
}

/// celeriac's own Rust parts of an `rpc://` round trip, with no Python: the client's
/// task producer and rpc backend, a worker's consumer (prefetch 4, acking each
/// message) and rpc backend, on the real RabbitMQ. Prints p50/p90/p99 of 2,000
/// sequential round trips, to set against `broker_amqp`'s bare lapin floor and the
/// benchmark's Python figure; run with
/// `cargo test --test backend_rpc -- --ignored rust_only --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn rust_only_round_trip() {
    use _core::broker::amqp::{AmqpConsumer, AmqpProducer};
    use _core::broker::Fetched;
    use _core::protocol::message::{
        write_body, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
    };
    const CALLS: usize = 2000;
    let reply_to = oid();
    let queue = oid();
    let url = BrokerUrl::parse(BROKER).expect("url");
    let client = client(&reply_to);
    let store = worker();
    let handle = runtime::handle();
    let producer = handle
        .block_on(AmqpProducer::connect(
            &url,
            AmqpOptions::default(),
            Vec::new(),
        ))
        .expect("producer");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = handle
        .block_on(AmqpConsumer::connect(
            &url,
            std::slice::from_ref(&queue),
            4,
            AmqpOptions::default(),
            tx,
        ))
        .expect("consumer");
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Instant>();
    let serve = std::thread::spawn(move || {
        while let Some(Fetched::Message(Ok(message))) = rx.blocking_recv() {
            let _ = seen_tx.send(Instant::now());
            consumer.ack(vec![message.delivery_tag]).expect("ack");
            let id = message.correlation_id.unwrap_or_default();
            let reply = message.reply_to.unwrap_or_default();
            if id == "stop" {
                break;
            }
            store
                .store(&id, meta(&id, "SUCCESS", 1), Some(&reply), None)
                .expect("store");
        }
        consumer.close();
    });
    let send = |id: &str| {
        let mut body = Vec::new();
        write_body(&mut body, b"[1]", b"{}", EMPTY_EMBED.as_bytes());
        producer
            .publish(OutgoingMessage {
                exchange: String::new(),
                routing_key: queue.clone(),
                headers: TaskHeaders::new("tests.echo".into(), id.to_owned(), "gen0@t".into()),
                properties: TaskProperties::json(id.to_owned(), reply_to.clone()),
                body,
            })
            .expect("publish");
    };
    let mut latencies = Vec::with_capacity(CALLS);
    let mut legs = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 50 {
        let id = format!("t{i}");
        let started = Instant::now();
        send(&id);
        let got = client
            .wait(&id, Some(Instant::now() + Duration::from_secs(10)))
            .expect("result");
        let done = Instant::now();
        assert_eq!(got, meta(&id, "SUCCESS", 1));
        let seen = seen_rx.recv().expect("seen");
        if i >= 50 {
            latencies.push(done - started);
            legs.push(seen - started);
        }
    }
    legs.sort();
    eprintln!("  send -> worker has it: p50 {:?}", legs[legs.len() / 2]);
    send("stop");
    serve.join().expect("worker thread");
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "celeriac (Rust only) rpc round trip: p50 {:?} p90 {:?} p99 {:?}",
        at(0.5),
        at(0.9),
        at(0.99)
    );
    producer.close();
    delete_queue(&queue);
    delete_queue(&reply_to);
}
