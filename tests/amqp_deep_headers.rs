//! A publisher may send AMQP headers nested as deep as a frame holds (some 25,000
//! arrays in RabbitMQ's 128 KiB). lapin parses them recursively on its I/O thread,
//! which used to overflow that thread's stack and abort the worker. Now the message is
//! a bad one (our JSON reader refuses the nesting) and the next one is consumed.
//!
//! Its own test binary without libtest's harness: Rust fixes the default thread stack
//! when the first thread starts, and libtest starts threads before any test runs. This
//! `main` starts as the extension does when Python imports it.

use std::time::Duration;

use _core::broker::amqp::{self, AmqpConsumer, AmqpOptions};
use _core::broker::url::BrokerUrl;
use _core::broker::Fetched;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use tokio::sync::mpsc;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";
const BODY: &[u8] = b"[[1], {}, {}]";

/// Headers `levels` arrays deep: as deep as a frame holds in an optimised build; in a
/// debug build (bigger stack frames) deep enough to overflow the old 2 MiB.
fn nested_header() -> FieldTable {
    let levels = if cfg!(debug_assertions) {
        3_000
    } else {
        25_000
    };
    let mut value = AMQPValue::Void;
    for _ in 0..levels {
        let mut array = FieldArray::default();
        array.push(value);
        value = AMQPValue::FieldArray(array);
    }
    let mut table = FieldTable::default();
    table.insert("deep".into(), value);
    table
}

async fn channel(url: &BrokerUrl) -> lapin::Channel {
    let conn = amqp::connect(url, &AmqpOptions::default(), "test-deep")
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672");
    conn.create_channel().await.expect("channel")
}

fn main() {
    _core::runtime::reserve_thread_stacks();
    let url = BrokerUrl::parse(URL).expect("url");
    let queue = format!("rs-amqp-deep-{}", uuid::Uuid::new_v4().simple());
    // The worker's own runtime, as the Python extension uses it.
    let got = _core::runtime::handle().block_on(async {
        // The consumer declares the queue as Celery does.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let consumer = AmqpConsumer::connect(
            &url,
            std::slice::from_ref(&queue),
            4,
            AmqpOptions::default(),
            tx,
        )
        .await
        .expect("consumer");
        let admin = channel(&url).await;
        for headers in [nested_header(), FieldTable::default()] {
            admin
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    Default::default(),
                    BODY,
                    lapin::BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_headers(headers),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(Fetched::Message(message))) => got.push(message),
                Ok(Some(Fetched::Error(_))) => {}
                other => panic!("the consumer stopped: {other:?}"),
            }
        }
        for message in &got {
            let tag = match message {
                Ok(message) => message.delivery_tag.clone(),
                Err(bad) => bad.delivery_tag.clone(),
            };
            consumer.ack(vec![tag]).expect("ack");
        }
        consumer.close();
        // The queue and its same-named exchange, declared as Celery declares them.
        let _ = admin
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        let _ = admin
            .exchange_delete(queue.as_str().into(), Default::default())
            .await;
        got
    });
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].as_ref().expect("the message after it").body, BODY);
    println!("test headers_nested_as_deep_as_a_frame_holds_do_not_crash_the_consumer ... ok");
    println!("1 passed, 0 failed");
}
