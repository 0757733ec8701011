//! The AMQP broker against the real RabbitMQ on 127.0.0.1:5672 (guest/guest), in
//! Celery's topology. Each test uses its own queue names and deletes its queues and
//! exchanges. Connection loss is provoked with `rabbitmqctl close_connection` on the
//! test's own connections only, so other tests and users of the broker are not
//! disturbed; the full broker restart test is `#[ignore]`d (run it with `--ignored`).

mod common;

use common::{
    amqp_admin as admin, amqp_cleanup as cleanup, amqp_consumer as new_consumer,
    amqp_depth as depth, body_index,
};

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use _core::broker::amqp::{self, AmqpConsumer, AmqpOptions, AmqpProducer, QueueSpec, RawPublish};
use _core::broker::url::BrokerUrl;
use _core::broker::{Fetched, IncomingMessage};
use _core::protocol::message::OutgoingMessage;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use tokio::sync::mpsc;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";

fn url() -> BrokerUrl {
    BrokerUrl::parse(URL).expect("url")
}

fn unique(name: &str) -> String {
    format!("rs-amqp-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// The shared test message, with a reply queue (`reply-oid`) as an RPC client sets it.
fn message(queue: &str, n: usize, priority: Option<u8>) -> OutgoingMessage {
    let mut message = common::message(queue, n, priority);
    message.properties.reply_to = "reply-oid".into();
    message
}

async fn take(rx: &mut mpsc::UnboundedReceiver<Fetched>, count: usize) -> Vec<IncomingMessage> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Fetched::Message(Ok(message)))) => out.push(message),
            Ok(Some(Fetched::Message(Err(bad)))) => panic!("bad message: {bad:?}"),
            Ok(Some(Fetched::Error(_))) => {}
            Ok(None) => panic!("the consumer stopped"),
            Err(_) => panic!("only {} of {count} messages arrived", out.len()),
        }
    }
    out
}

/// Nothing more arrives within `wait`.
async fn quiet(rx: &mut mpsc::UnboundedReceiver<Fetched>, wait: Duration) -> usize {
    let mut extra = 0;
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Fetched::Message(_))) => extra += 1,
            Ok(Some(Fetched::Error(_))) => {}
            Ok(None) | Err(_) => return extra,
        }
    }
}

async fn new_producer(options: AmqpOptions) -> AmqpProducer {
    AmqpProducer::connect(&url(), options, Vec::new())
        .await
        .expect("producer")
}

/// A producer (default options) that has sent messages `ns` to `queue`, all confirmed.
async fn published(queue: &str, ns: std::ops::Range<usize>) -> AmqpProducer {
    let producer = new_producer(AmqpOptions::default()).await;
    for n in ns {
        producer.publish(message(queue, n, None)).expect("publish");
    }
    producer
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    producer
}

/// A consumer (default options) of `queue` alone with a prefetch window of `prefetch`.
async fn consume(queue: &str, prefetch: usize) -> (AmqpConsumer, mpsc::UnboundedReceiver<Fetched>) {
    new_consumer(&[queue.to_owned()], prefetch, AmqpOptions::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_and_consumes_ten_thousand_in_order() {
    const N: usize = 10_000;
    let queue = unique("10k");
    let producer = new_producer(AmqpOptions::default()).await;
    let started = Instant::now();
    for n in 0..N {
        producer.publish(message(&queue, n, None)).expect("publish");
    }
    let handed_over = started.elapsed();
    producer
        .flush(Duration::from_secs(60))
        .await
        .expect("all confirmed");
    let published = started.elapsed();
    eprintln!("amqp: publish() x{N} returned after {handed_over:?}");
    assert_eq!(depth(&queue).await, N as u32);

    let (consumer, mut rx) = consume(&queue, 1000).await;
    let started = Instant::now();
    let mut next = 0;
    while next < N {
        let batch = take(&mut rx, 1.min(N - next)).await;
        let mut tags = Vec::new();
        for message in batch {
            assert_eq!(body_index(&message), next, "out of order");
            assert_eq!(message.queue, queue);
            assert_eq!(message.routing_key, queue);
            assert_eq!(message.exchange, "");
            tags.push(message.delivery_tag);
            next += 1;
        }
        // More that are already there, without waiting.
        while let Ok(Fetched::Message(Ok(message))) = rx.try_recv() {
            assert_eq!(body_index(&message), next, "out of order");
            tags.push(message.delivery_tag);
            next += 1;
        }
        consumer.ack(tags).expect("ack");
    }
    let consumed = started.elapsed();
    eprintln!(
        "amqp: published+confirmed {N} in {:.3}s ({:.0}/s), consumed+acked in {:.3}s ({:.0}/s)",
        published.as_secs_f64(),
        N as f64 / published.as_secs_f64(),
        consumed.as_secs_f64(),
        N as f64 / consumed.as_secs_f64()
    );
    // The acks reach the broker: nothing is left, ready or unacked.
    let deadline = Instant::now() + Duration::from_secs(10);
    consumer.close();
    drop(consumer);
    while depth(&queue).await != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth(&queue).await, 0);
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_window_is_honoured() {
    let queue = unique("window");
    let _producer = published(&queue, 0..50).await;
    let (consumer, mut rx) = consume(&queue, 5).await;
    let first = take(&mut rx, 5).await;
    assert_eq!(quiet(&mut rx, Duration::from_millis(500)).await, 0);
    consumer
        .ack(first[..2].iter().map(|m| m.delivery_tag.clone()).collect())
        .expect("ack");
    let more = take(&mut rx, 2).await;
    assert_eq!(body_index(&more[0]), 5);
    assert_eq!(quiet(&mut rx, Duration::from_millis(500)).await, 0);
    // A wider window lets more in (what the worker does for ETA tasks).
    consumer.extend_window(3).expect("qos");
    consumer.extend_window(2).expect("qos");
    take(&mut rx, 5).await;
    assert_eq!(quiet(&mut rx, Duration::from_millis(300)).await, 0);
    consumer.close();
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_requeue_or_drop() {
    let queue = unique("reject");
    let _producer = published(&queue, 0..1).await;
    let (consumer, mut rx) = consume(&queue, 4).await;
    let first = take(&mut rx, 1).await.remove(0);
    assert!(!first.redelivered);
    consumer
        .reject(first.delivery_tag.clone(), true)
        .expect("reject");
    let again = take(&mut rx, 1).await.remove(0);
    assert!(again.redelivered);
    assert_eq!(body_index(&again), 0);
    consumer
        .reject(again.delivery_tag.clone(), false)
        .expect("reject");
    assert_eq!(quiet(&mut rx, Duration::from_millis(500)).await, 0);
    consumer.close();
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(depth(&queue).await, 0);
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_unacked_gives_everything_back() {
    let queue = unique("restore");
    let _producer = published(&queue, 0..20).await;
    let (consumer, mut rx) = consume(&queue, 10).await;
    let got = take(&mut rx, 10).await;
    consumer
        .ack(got[..3].iter().map(|m| m.delivery_tag.clone()).collect())
        .expect("ack");
    // The 3 acks make room: up to 3 more may be delivered before the restore.
    let restored = consumer.restore_unacked().await.expect("restore");
    assert!((7..=10).contains(&restored), "{restored}");
    assert_eq!(depth(&queue).await, 17);
    let (again, mut rx) = consume(&queue, 0).await;
    let all = take(&mut rx, 17).await;
    let redelivered: Vec<usize> = all
        .iter()
        .filter(|m| m.redelivered)
        .map(body_index)
        .collect();
    assert_eq!(redelivered, (3..3 + restored).collect::<Vec<_>>());
    again.close();
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_confirms_and_reports_failures() {
    let queue = unique("confirm");
    let producer = new_producer(AmqpOptions::default()).await;
    for n in 0..20_000 {
        producer.publish(message(&queue, n, None)).expect("publish");
    }
    // Far too short for 20,000 confirms: a clear error naming the masked URL.
    let err = producer
        .flush(Duration::from_micros(1))
        .await
        .expect_err("cannot be confirmed in 1 µs")
        .to_string();
    assert!(
        err.contains("not confirmed by amqp://guest:**@127.0.0.1:5672//"),
        "{err}"
    );
    producer
        .flush(Duration::from_secs(60))
        .await
        .expect("flush");
    assert_eq!(depth(&queue).await, 20_000);
    let stats = producer.stats();
    assert_eq!((stats.queued, stats.settled), (20_000, 20_000));

    // A missing exchange and an exchange without a binding: reported, never silent.
    let missing = unique("missing-exchange");
    let mut lost = message(&queue, 0, None);
    lost.exchange = missing.clone();
    lost.routing_key = "nowhere".into();
    producer.publish(lost).expect("publish");
    let err = producer
        .flush(Duration::from_secs(10))
        .await
        .expect_err("unroutable")
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let lonely = unique("lonely");
    admin()
        .await
        .exchange_declare(
            lonely.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let mut returned = message(&queue, 0, None);
    returned.exchange = lonely.clone();
    returned.routing_key = "nobody-listens".into();
    producer.publish(returned).expect("publish");
    let err = producer
        .flush(Duration::from_secs(10))
        .await
        .expect_err("returned")
        .to_string();
    assert!(err.contains("1 unroutable"), "{err}");
    assert_eq!(producer.stats().returned, 2);
    // Reported once; the producer goes on.
    producer.publish(message(&queue, 1, None)).expect("publish");
    producer
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    // Too large for the broker: refused at the call site.
    let small = producer_with(AmqpOptions {
        max_message_size: 1000,
        ..AmqpOptions::default()
    })
    .await;
    let mut big = message(&queue, 0, None);
    big.body = vec![b' '; 2000];
    let err = small.publish(big).expect_err("too large").to_string();
    assert!(err.contains("more than the broker's limit"), "{err}");
    cleanup(&[&queue, &lonely]).await;
}

async fn producer_with(options: AmqpOptions) -> AmqpProducer {
    new_producer(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_matches_celery_57() {
    let plain = unique("plain");
    let prio = unique("prio");
    let quorum = unique("quorum");
    let _producer = published(&plain, 0..1).await;
    let channel = admin().await;
    // Celery's declarations of the same names succeed (no 406): queue durable, no
    // arguments; exchange direct durable; binding queue -> exchange with key = name.
    let celery_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(plain.as_str().into(), celery_queue, FieldTable::default())
        .await
        .expect("Celery's queue declaration is compatible");
    assert_eq!(declared.message_count(), 1);
    channel
        .exchange_declare(
            plain.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("Celery's exchange declaration is compatible");
    // A transient declaration is refused: we declared it durable.
    let channel2 = admin().await;
    assert!(channel2
        .queue_declare(
            plain.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err());

    // task_queue_max_priority=10 -> x-max-priority, as py-amqp sends it.
    let mut arguments = serde_json::Map::new();
    arguments.insert("x-max-priority".into(), json!(10));
    let priority_options = AmqpOptions {
        queue_arguments: arguments,
        ..AmqpOptions::default()
    };
    let producer2 = new_producer(priority_options.clone()).await;
    for (n, priority) in [(0, 1), (1, 9), (2, 5)] {
        producer2
            .publish(message(&prio, n, Some(priority)))
            .expect("publish");
    }
    producer2
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(10));
    let channel3 = admin().await;
    channel3
        .queue_declare(prio.as_str().into(), celery_queue, args)
        .await
        .expect("Celery's priority queue declaration is compatible");
    // The consumer declares the queue as it exists (an argument-less declaration is
    // RabbitMQ's PRECONDITION_FAILED, reported as such).
    let (consumer, mut rx) = new_consumer(std::slice::from_ref(&prio), 0, priority_options).await;
    let order: Vec<usize> = take(&mut rx, 3).await.iter().map(body_index).collect();
    assert_eq!(order, vec![1, 2, 0], "higher priority first");
    assert_eq!(quiet(&mut rx, Duration::from_millis(200)).await, 0);
    consumer.close();

    // Quorum queues (task_default_queue_type / task_create_missing_queue_type).
    let mut arguments = serde_json::Map::new();
    arguments.insert("x-queue-type".into(), json!("quorum"));
    let options = AmqpOptions {
        queue_arguments: arguments,
        ..AmqpOptions::default()
    };
    let producer3 = new_producer(options.clone()).await;
    producer3
        .publish(message(&quorum, 0, None))
        .expect("publish");
    producer3
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    admin()
        .await
        .queue_declare(quorum.as_str().into(), celery_queue, args)
        .await
        .expect("Celery's quorum queue declaration is compatible");
    // A consumer of a quorum queue and a classic one (each declared as it is: the
    // quorum arguments only for the quorum queue) works: no global QoS.
    let mut quorum_only = AmqpOptions::default();
    quorum_only.queues.insert(
        quorum.clone(),
        QueueSpec::celery(&quorum, options.queue_arguments.clone()),
    );
    let (consumer, mut rx) = new_consumer(&[quorum.clone(), plain.clone()], 4, quorum_only).await;
    let got = take(&mut rx, 2).await;
    consumer
        .ack(got.iter().map(|m| m.delivery_tag.clone()).collect())
        .expect("ack");
    consumer.close();
    cleanup(&[&plain, &prio, &quorum]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_otherwise_by_a_peer_is_used_as_it_is() {
    let queue = unique("peer");
    // A peer declared it transient (as Celery <= 5.6 did for some queues).
    admin()
        .await
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let producer = published(&queue, 0..1).await;
    let warnings = producer.take_warnings();
    assert!(
        warnings.iter().any(|w| w.contains("using it as it is")),
        "{warnings:?}"
    );
    let (consumer, mut rx) = consume(&queue, 1).await;
    assert_eq!(body_index(&take(&mut rx, 1).await[0]), 0);
    consumer.close();
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_exists_with_other_arguments_is_rabbitmqs_error_not_a_hang() {
    let queue = unique("args");
    let _classic = published(&queue, 0..1).await;
    let mut arguments = serde_json::Map::new();
    arguments.insert("x-queue-type".into(), json!("quorum"));
    let options = AmqpOptions {
        queue_arguments: arguments,
        ..AmqpOptions::default()
    };
    // The client: the message is not sent, and flush says why.
    let producer = new_producer(options.clone()).await;
    producer.publish(message(&queue, 1, None)).expect("publish");
    let err = producer
        .flush(Duration::from_secs(10))
        .await
        .expect_err("a conflict");
    assert!(matches!(err, _core::error::Error::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("inequivalent arg 'x-queue-type'") && text.contains(queue.as_str()),
        "{text}"
    );
    assert_eq!(depth(&queue).await, 1);
    // The worker's consumer: refused at connect with the same words.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = AmqpConsumer::connect(&url(), std::slice::from_ref(&queue), 1, options, tx)
        .await
        .err()
        .expect("a conflict");
    assert!(
        err.to_string().contains("received the value 'quorum'"),
        "{err}"
    );
    cleanup(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_unknown_vhost_are_clear_errors() {
    let bad = BrokerUrl::parse("amqp://guest:wrong-secret@127.0.0.1:5672//").expect("url");
    let err = AmqpProducer::connect(&bad, AmqpOptions::default(), Vec::new())
        .await
        .err()
        .expect("wrong password")
        .to_string();
    assert!(err.contains("amqp://guest:**@127.0.0.1:5672//"), "{err}");
    assert!(!err.contains("wrong-secret"), "{err}");
    assert!(err.contains("access refused"), "{err}");

    let vhost = format!("nope-{}", uuid::Uuid::new_v4().simple());
    let bad = BrokerUrl::parse(&format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")).expect("url");
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = AmqpConsumer::connect(&bad, &["q".into()], 1, AmqpOptions::default(), tx)
        .await
        .err()
        .expect("unknown vhost")
        .to_string();
    assert!(err.contains(&format!("virtual host \"{vhost}\"")), "{err}");
    assert!(err.contains("guest:**@"), "{err}");

    let closed_port = BrokerUrl::parse("amqp://guest:guest@127.0.0.1:1//").expect("url");
    let err = AmqpProducer::connect(&closed_port, AmqpOptions::default(), Vec::new())
        .await
        .err()
        .expect("nothing listens")
        .to_string();
    assert!(
        err.contains("cannot connect to amqp://guest:**@127.0.0.1:1//"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_round_trip_through_the_broker() {
    let queue = unique("headers");
    let producer = new_producer(AmqpOptions::default()).await;
    let mut task = message(&queue, 0, Some(3));
    task.headers.eta = Some("2026-11-21T05:00:50.040937+00:00".into());
    task.headers.group_index = Some(4);
    task.headers.timelimit = [
        Some(10.into()),
        Some(serde_json::Number::from_f64(2.5).expect("f")),
    ];
    task.headers.retries = 1 << 40;
    task.headers.ignore_result = true;
    task.headers.extra.push((
        "x-nested".into(),
        serde_json::value::to_raw_value(&json!({
            "list": [1, "two", null, [3.5, {"deep": false}]],
            "none": null, "big": -9_000_000_000_i64, "text": "héllo ✓"
        }))
        .expect("raw"),
    ));
    task.properties.expiration = Some("60000".into());
    let expected = serde_json::to_value(&task.headers).expect("json");
    producer.publish(task).expect("publish");
    // A body that is not JSON, as a foreign client could send: handed over as is.
    producer
        .publish_raw(RawPublish {
            exchange: String::new(),
            routing_key: queue.clone(),
            correlation_id: None,
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            delivery_mode: 2,
            body: b"\xffnot json".to_vec(),
        })
        .expect("publish");
    producer
        .flush(Duration::from_secs(10))
        .await
        .expect("flush");
    let (consumer, mut rx) = consume(&queue, 2).await;
    let got = take(&mut rx, 2).await;
    let headers: serde_json::Value =
        serde_json::from_str(got[0].headers.as_ref().expect("headers").get()).expect("json");
    assert_eq!(headers, expected);
    assert_eq!(got[0].priority, 3);
    assert_eq!(got[0].correlation_id.as_deref(), Some("task-0"));
    assert_eq!(got[0].reply_to.as_deref(), Some("reply-oid"));
    assert_eq!(got[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(got[0].content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(got[1].body, b"\xffnot json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(got[1].headers.as_ref().expect("h").get())
            .expect("json"),
        json!({})
    );
    consumer
        .reject(got[1].delivery_tag.clone(), false)
        .expect("reject");
    consumer
        .ack(vec![got[0].delivery_tag.clone()])
        .expect("ack");
    consumer.close();
    cleanup(&[&queue]).await;
}

/// `rabbitmqctl close_connection` for every connection whose name contains `label`.
fn close_connections(label: &str) -> (usize, String) {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut closed = 0;
    for line in listing.lines().filter(|line| line.contains(label)) {
        let Some((pid, _)) = line.split_once('\t') else {
            continue;
        };
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "celeriac reconnect test"])
            .output()
            .expect("rabbitmqctl");
        if status.status.success() {
            closed += 1;
        }
    }
    (closed, listing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_reconnect_after_losing_their_connection() {
    let queue = unique("reconnect");
    let label = unique("conn");
    let options = AmqpOptions {
        connection_name: Some(label.clone()),
        connect_timeout: Duration::from_secs(10),
        ..AmqpOptions::default()
    };
    let producer = new_producer(options.clone()).await;
    let (consumer, mut rx) = new_consumer(std::slice::from_ref(&queue), 50, options).await;
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut acked = 0;
    const N: usize = 2000;
    for n in 0..N {
        producer.publish(message(&queue, n, None)).expect("publish");
        if n == N / 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (closed, listing) = tokio::task::spawn_blocking({
                let label = label.clone();
                move || close_connections(&label)
            })
            .await
            .expect("join");
            assert!(closed >= 2, "closed {closed} connections: {listing}");
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .await
        .expect("flush after reconnect");
    // acks_late style: ack after "running"; whatever was unacked at the loss comes again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < N && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(Fetched::Message(Ok(message)))) => {
                *seen.entry(body_index(&message)).or_default() += 1;
                consumer.ack(vec![message.delivery_tag]).expect("ack");
                acked += 1;
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("consumer stopped"),
        }
    }
    assert_eq!(seen.len(), N, "every message arrived at least once");
    assert!(producer.stats().reconnects >= 1);
    assert!(consumer.stats().reconnects >= 1);
    eprintln!(
        "reconnect: {acked} deliveries for {N} messages, producer {:?}, consumer {:?}",
        producer.stats(),
        consumer.stats()
    );
    consumer.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cleanup(&[&queue]).await;
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Stops and starts the RabbitMQ application mid-stream (disturbs every other user of
/// the broker, hence ignored by default): `cargo test --test broker_amqp -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn survives_a_broker_restart_mid_stream() {
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            // Whatever happened, leave RabbitMQ running.
            rabbitmqctl(&["start_app"]);
        }
    }
    let queue = unique("restart");
    let options = AmqpOptions {
        connect_timeout: Duration::from_secs(30),
        ..AmqpOptions::default()
    };
    let producer = new_producer(options.clone()).await;
    let (consumer, mut rx) = new_consumer(std::slice::from_ref(&queue), 20, options).await;
    const N: usize = 2000;
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let guard = Restart;
    for n in 0..N {
        producer.publish(message(&queue, n, None)).expect("publish");
        if n == N / 4 {
            producer
                .flush(Duration::from_secs(30))
                .await
                .expect("flush");
            // Take a few so some are unacked when the broker goes away.
            for _ in 0..10 {
                if let Ok(Some(Fetched::Message(Ok(m)))) =
                    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
                {
                    *seen.entry(body_index(&m)).or_default() += 1;
                }
            }
            assert!(tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
                .await
                .expect("join"));
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"]))
                .await
                .expect("join"));
        }
    }
    drop(guard);
    producer
        .flush(Duration::from_secs(60))
        .await
        .expect("flush after restart");
    let deadline = Instant::now() + Duration::from_secs(120);
    while (0..N).any(|n| !seen.contains_key(&n)) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(Fetched::Message(Ok(message)))) => {
                *seen.entry(body_index(&message)).or_default() += 1;
                consumer.ack(vec![message.delivery_tag]).expect("ack");
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("consumer stopped"),
        }
    }
    let missing: Vec<usize> = (0..N).filter(|n| !seen.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "lost {} messages: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    consumer.close();
    cleanup(&[&queue]).await;
}

#[test]
fn queue_specs_follow_celery() {
    let spec = QueueSpec::celery("celery", serde_json::Map::new());
    assert_eq!(
        (
            spec.exchange.as_str(),
            spec.exchange_type.as_str(),
            spec.routing_key.as_str()
        ),
        ("celery", "direct", "celery")
    );
    assert!(spec.durable && !spec.auto_delete && !spec.exclusive);
    let reply = QueueSpec::rpc_reply("oid", Some(Duration::from_secs(86400)));
    assert!(reply.durable && reply.auto_delete && !reply.exclusive);
    assert_eq!(reply.exchange, "");
    assert_eq!(reply.arguments["x-expires"], 86_400_000);
}

/// A bare lapin connection, with `queue` declared on it as Celery declares it.
async fn bare_connection(queue: &str) -> lapin::Connection {
    let conn = amqp::connect(&url(), &AmqpOptions::default(), "bare")
        .await
        .expect("connect");
    amqp::declare(&conn, &QueueSpec::celery(queue, Default::default()))
        .await
        .expect("declare")
        .expect("no conflict");
    conn
}

/// Until `queue` holds `count` messages (no bound: for the measurements only).
async fn wait_for_depth(queue: &str, count: u32) {
    while depth(queue).await < count {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// The broker's own bound, with no celeriac code in the way: a bare lapin loop
/// publishing n messages of a no-op task's size to a durable queue on one channel,
/// timed until the queue holds them all (what `python -m benches` enqueue measures),
/// for persistent and transient messages, with and without confirm mode. Prints the
/// rates; run with `cargo test --test broker_amqp -- --ignored bare_lapin --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn bare_lapin_publish_ceiling() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::BasicProperties;
    const N: u32 = 20_000;
    let body = vec![b'x'; 180];
    for (mode, confirm) in [(2u8, true), (2, false), (1, true), (1, false)] {
        let queue = unique("bare");
        let conn = bare_connection(&queue).await;
        let channel = conn.create_channel().await.expect("channel");
        if confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm");
        }
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(N as usize);
        for _ in 0..N {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(mode),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        let written = started.elapsed();
        wait_for_depth(&queue, N).await;
        let held = started.elapsed();
        for confirm in confirms {
            confirm.await.expect("confirmed");
        }
        let confirmed = started.elapsed();
        eprintln!(
            "bare lapin: delivery_mode {mode}, confirms {confirm}: {N} written in {:.3}s, \
             held by the queue after {:.3}s ({:.0}/s), confirmed after {:.3}s",
            written.as_secs_f64(),
            held.as_secs_f64(),
            f64::from(N) / held.as_secs_f64(),
            confirmed.as_secs_f64()
        );
        let _ = conn.close(200, "OK".into()).await;
        cleanup(&[&queue]).await;
    }
    // Task messages (Celery's headers) through celeriac's producer, and the same
    // header table through bare lapin.
    for bare in [false, true] {
        let queue = unique("bare");
        let producer = new_producer(AmqpOptions::default()).await;
        let conn = bare_connection(&queue).await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        let sample = message(&queue, 0, None);
        let headers = match serde_json::to_value(&sample.headers).expect("json") {
            serde_json::Value::Object(object) => amqp::json_to_field_table(&object).expect("t"),
            _ => unreachable!(),
        };
        let started = Instant::now();
        let mut confirms = Vec::new();
        for n in 0..N {
            if bare {
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_content_encoding("utf-8".into())
                    .with_correlation_id(format!("task-{n}").into())
                    .with_reply_to("reply-oid".into())
                    .with_headers(headers.clone());
                confirms.push(
                    channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &sample.body,
                            properties,
                        )
                        .await
                        .expect("publish"),
                );
            } else {
                producer
                    .publish(message(&queue, n as usize, None))
                    .expect("publish");
            }
        }
        wait_for_depth(&queue, N).await;
        let held = started.elapsed();
        producer
            .flush(Duration::from_secs(60))
            .await
            .expect("confirmed");
        for confirm in confirms {
            confirm.await.expect("confirmed");
        }
        let confirmed = started.elapsed();
        eprintln!(
            "{}: task messages ({} bytes of body), delivery_mode 2, confirms true: held by \
             the queue after {:.3}s ({:.0}/s), confirmed after {:.3}s",
            if bare {
                "bare lapin"
            } else {
                "celeriac producer"
            },
            sample.body.len(),
            held.as_secs_f64(),
            f64::from(N) / held.as_secs_f64(),
            confirmed.as_secs_f64()
        );
        producer.close();
        let _ = conn.close(200, "OK".into()).await;
        cleanup(&[&queue]).await;
    }
    // The same messages through celeriac's producer (raw: no task headers).
    for mode in [2u8, 1] {
        let queue = unique("bare");
        let producer = new_producer(AmqpOptions::default()).await;
        let conn = bare_connection(&queue).await;
        let started = Instant::now();
        for _ in 0..N {
            producer
                .publish_raw(RawPublish {
                    exchange: String::new(),
                    routing_key: queue.clone(),
                    correlation_id: None,
                    content_type: "application/json".into(),
                    content_encoding: "utf-8".into(),
                    delivery_mode: mode,
                    body: body.clone(),
                })
                .expect("publish");
        }
        wait_for_depth(&queue, N).await;
        let held = started.elapsed();
        producer
            .flush(Duration::from_secs(60))
            .await
            .expect("confirmed");
        let confirmed = started.elapsed();
        eprintln!(
            "celeriac producer: delivery_mode {mode}, confirms true: held by the queue after \
             {:.3}s ({:.0}/s), confirmed after {:.3}s",
            held.as_secs_f64(),
            f64::from(N) / held.as_secs_f64(),
            confirmed.as_secs_f64()
        );
        producer.close();
        let _ = conn.close(200, "OK".into()).await;
        cleanup(&[&queue]).await;
    }
}

/// The round trip's floor with no celeriac code: bare lapin, one connection as the
/// client (publishes a persistent task to queue A, waits on its reply queue B) and one
/// as the worker (consumes A with acks, publishes the result to B, transient). Prints
/// p50/p90/p99 of 2,000 sequential round trips; run with
/// `cargo test --test broker_amqp -- --ignored bare_lapin_round --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn bare_lapin_round_trip_floor() {
    for _ in 0..2 {
        round_trip_floor(false, (false, false)).await;
        round_trip_floor(true, (false, false)).await;
        round_trip_floor(false, (true, false)).await;
        round_trip_floor(false, (false, true)).await;
        round_trip_floor(false, (true, true)).await;
    }
}

/// `relay`: every publish goes through an mpsc to a task that publishes it, as
/// celeriac's producer I/O task does (one thread hop more on each side).
async fn round_trip_floor(relay: bool, confirm: (bool, bool)) {
    use futures_util::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
    use lapin::BasicProperties;
    const CALLS: usize = 2000;
    let tasks = unique("rt-tasks");
    let replies = unique("rt-replies");
    let client = amqp::connect(&url(), &AmqpOptions::default(), "rt-client")
        .await
        .expect("connect");
    let worker = amqp::connect(&url(), &AmqpOptions::default(), "rt-worker")
        .await
        .expect("connect");
    amqp::declare(&client, &QueueSpec::celery(&tasks, Default::default()))
        .await
        .expect("declare")
        .expect("no conflict");
    amqp::declare(&client, &QueueSpec::rpc_reply(&replies, None))
        .await
        .expect("declare")
        .expect("no conflict");
    let client_channel = client.create_channel().await.expect("channel");
    let worker_channel = worker.create_channel().await.expect("channel");
    for (channel, on) in [(&client_channel, confirm.0), (&worker_channel, confirm.1)] {
        if on {
            channel
                .confirm_select(lapin::options::ConfirmSelectOptions::default())
                .await
                .expect("confirm");
        }
    }
    worker_channel
        .basic_qos(4, Default::default())
        .await
        .expect("qos");
    let mut incoming = worker_channel
        .basic_consume(
            tasks.as_str().into(),
            "w".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut answers = client_channel
        .basic_consume(
            replies.as_str().into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let replies_for_worker = replies.clone();
    let (relay_tx, mut relay_rx) =
        tokio::sync::mpsc::unbounded_channel::<(lapin::Channel, String, Vec<u8>, u8)>();
    let relay_task = tokio::spawn(async move {
        while let Some((channel, queue, body, mode)) = relay_rx.recv().await {
            let _ = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(mode),
                )
                .await;
        }
    });
    let worker_relay = relay_tx.clone();
    let serve = tokio::spawn(async move {
        while let Some(Ok(delivery)) = incoming.next().await {
            let _ = worker_channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await;
            if relay {
                let _ = worker_relay.send((
                    worker_channel.clone(),
                    replies_for_worker.clone(),
                    delivery.data,
                    1,
                ));
                continue;
            }
            let _ = worker_channel
                .basic_publish(
                    "".into(),
                    replies_for_worker.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    BasicProperties::default().with_delivery_mode(1),
                )
                .await;
        }
    });
    let mut latencies = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 50 {
        let started = Instant::now();
        if relay {
            relay_tx
                .send((
                    client_channel.clone(),
                    tasks.clone(),
                    format!("{i}").into_bytes(),
                    2,
                ))
                .expect("relay");
        } else {
            client_channel
                .basic_publish(
                    "".into(),
                    tasks.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("{i}").as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
        }
        let answer = answers.next().await.expect("answer").expect("delivery");
        assert_eq!(answer.data, format!("{i}").as_bytes());
        if i >= 50 {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "bare lapin round trip{} (confirm mode: client {}, worker {}): p50 {:?} p90 {:?} p99 {:?}",
        if relay {
            " (publishes relayed by a task)"
        } else {
            ""
        },
        confirm.0,
        confirm.1,
        at(0.5),
        at(0.9),
        at(0.99)
    );
    serve.abort();
    relay_task.abort();
    let _ = client.close(200, "OK".into()).await;
    let _ = worker.close(200, "OK".into()).await;
    cleanup(&[&tasks, &replies]).await;
}
