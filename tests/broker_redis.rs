//! The Redis broker against the real Redis on 127.0.0.1:6379 (kombu's layout).
//! Each test uses its own queue names and removes its keys.

use std::time::Duration;

use _core::broker::redis::{
    priority_key, restore_visible, RedisConsumer, RedisOptions, RedisProducer,
};
use _core::broker::url::BrokerUrl;
use _core::broker::{BadMessage, Fetched, IncomingMessage};
use _core::protocol::message::{
    write_body, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
};
use tokio::sync::mpsc;

const URL: &str = "redis://127.0.0.1:6379/0";

fn unique(name: &str) -> String {
    format!("rs-test-{name}-{}", uuid::Uuid::new_v4())
}

fn options(prefix: &str) -> RedisOptions {
    RedisOptions {
        // Keep the ack emulation of each test apart from every other test and worker.
        global_keyprefix: format!("{prefix}:"),
        ..RedisOptions::default()
    }
}

fn message(queue: &str, n: usize, priority: Option<u8>) -> OutgoingMessage {
    let id = format!("task-{n}");
    let mut body = Vec::new();
    write_body(
        &mut body,
        format!("[{n}]").as_bytes(),
        b"{}",
        EMPTY_EMBED.as_bytes(),
    );
    let mut properties = TaskProperties::json(id.clone(), String::new());
    properties.priority = priority;
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        headers: TaskHeaders::new("tests.noop".into(), id, "gen0@test".into()),
        properties,
        body,
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379")
}

async fn cleanup(prefix: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap_or(());
    }
}

type Taken = Result<IncomingMessage, BadMessage>;

async fn take(rx: &mut mpsc::UnboundedReceiver<Fetched>, count: usize) -> Vec<Taken> {
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Fetched::Message(message))) => out.push(message),
            Ok(Some(Fetched::Error(err))) => panic!("fetch error: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

fn tags(taken: &[Taken]) -> Vec<String> {
    taken
        .iter()
        .map(|m| m.as_ref().expect("a valid message").delivery_tag.clone())
        .collect()
}

async fn hlen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("HLEN")
        .arg(key)
        .query_async(conn)
        .await
        .expect("HLEN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_consumes_and_acks_in_order() {
    let prefix = unique("order");
    let queue = "q".to_owned();
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    for n in 0..1000 {
        producer.publish(message(&queue, n, None)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer =
        RedisConsumer::connect(&url, std::slice::from_ref(&queue), 0, options(&prefix), tx)
            .await
            .unwrap();
    let got = take(&mut rx, 1000).await;
    assert_eq!(got.len(), 1000);
    for (n, delivery) in got.iter().enumerate() {
        let got = delivery.as_ref().expect("valid message");
        assert_eq!(got.body, message(&queue, n, None).body, "FIFO order");
        assert_eq!(got.queue, queue);
    }
    let mut conn = redis().await;
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 1000);
    consumer.ack(tags(&got)).unwrap();
    // Acks are asynchronous; wait until the hash is empty (bounded).
    for _ in 0..50 {
        if hlen(&mut conn, &format!("{prefix}:unacked")).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 0);
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_window_bounds_unacked_messages() {
    let prefix = unique("window");
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    for n in 0..20 {
        producer.publish(message("q", n, None)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 4, options(&prefix), tx)
        .await
        .unwrap();
    let first = take(&mut rx, 4).await;
    assert_eq!(first.len(), 4);
    // The window is full: nothing more arrives until we ack.
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    consumer.ack(tags(&first)).unwrap();
    let second = take(&mut rx, 4).await;
    assert_eq!(second.len(), 4);
    consumer.ack(tags(&second)).unwrap();
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priority_number_is_served_first() {
    let prefix = unique("prio");
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    producer.publish(message("q", 9, Some(9))).unwrap();
    producer.publish(message("q", 5, Some(5))).unwrap();
    producer.publish(message("q", 0, Some(0))).unwrap();
    producer.flush(Duration::from_secs(10)).await.unwrap();
    let mut conn = redis().await;
    let len: usize = redis::cmd("LLEN")
        .arg(format!("{prefix}:{}", priority_key("q", 5)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1, "priority 5 goes to the 3-step list");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 0, options(&prefix), tx)
        .await
        .unwrap();
    let got = take(&mut rx, 3).await;
    let order: Vec<_> = got
        .iter()
        .map(|d| d.as_ref().expect("valid message").priority)
        .collect();
    assert_eq!(order, vec![0, 5, 9]);
    consumer.ack(tags(&got)).unwrap();
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_handed_over_with_a_reason_and_not_tracked() {
    let prefix = unique("garbage");
    let url = BrokerUrl::parse(URL).unwrap();
    let mut conn = redis().await;
    let _: () = redis::cmd("LPUSH")
        .arg(format!("{prefix}:q"))
        .arg("not json at all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 1, options(&prefix), tx)
        .await
        .unwrap();
    let got = take(&mut rx, 1).await;
    assert_eq!(got.len(), 1);
    let reason = got[0].as_ref().expect_err("an error").reason.clone();
    assert!(reason.contains("not a kombu envelope"), "{reason}");
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 0);
    // The window (1) is not held by the bad message: a good one still comes through.
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    producer.publish(message("q", 1, None)).unwrap();
    producer.flush(Duration::from_secs(5)).await.unwrap();
    assert_eq!(take(&mut rx, 1).await.len(), 1);
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_unacked_puts_messages_back_marked_redelivered() {
    let prefix = unique("restore");
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    for n in 0..3 {
        producer.publish(message("q", n, None)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 10, options(&prefix), tx)
        .await
        .unwrap();
    let got = take(&mut rx, 3).await;
    consumer.ack(tags(&got[..1])).unwrap();
    assert_eq!(consumer.restore_unacked().await.unwrap(), 2);
    let mut conn = redis().await;
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 0);
    let back: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{prefix}:q"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(back.len(), 2);
    for raw in back {
        let value: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(value["properties"]["delivery_info"]["redelivered"], true);
    }
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_puts_one_message_back() {
    let prefix = unique("requeue");
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    producer.publish(message("q", 7, None)).unwrap();
    producer.flush(Duration::from_secs(5)).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 1, options(&prefix), tx)
        .await
        .unwrap();
    let first = take(&mut rx, 1).await;
    consumer.reject(tags(&first).remove(0), true).unwrap();
    let again = take(&mut rx, 1).await;
    assert_eq!(again.len(), 1, "a requeued message is delivered again");
    assert_eq!(tags(&again), tags(&first));
    consumer.ack(tags(&again)).unwrap();
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_a_dead_consumer_come_back_after_the_visibility_timeout() {
    let prefix = unique("visibility");
    let url = BrokerUrl::parse(URL).unwrap();
    let mut opts = options(&prefix);
    opts.visibility_timeout = Duration::from_millis(300);
    let producer = RedisProducer::connect(&url, opts.clone()).await.unwrap();
    producer.publish(message("q", 1, None)).unwrap();
    producer.flush(Duration::from_secs(5)).await.unwrap();
    {
        // A consumer that takes the message and "dies" without acking.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dead = RedisConsumer::connect(&url, &["q".into()], 1, opts.clone(), tx)
            .await
            .unwrap();
        assert_eq!(take(&mut rx, 1).await.len(), 1);
        dead.close();
    }
    let mut conn = redis().await;
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(restore_visible(&mut conn, &opts).await.unwrap(), 1);
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 0);
    let len: usize = redis::cmd("LLEN")
        .arg(format!("{prefix}:q"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_fast_with_the_masked_url() {
    let url = BrokerUrl::parse("redis://:secret@127.0.0.1:1/0").unwrap();
    let opts = RedisOptions {
        connect_timeout: Duration::from_secs(1),
        ..RedisOptions::default()
    };
    let err = match RedisProducer::connect(&url, opts).await {
        Ok(_) => panic!("connected to port 1"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("redis://:**@127.0.0.1:1/0"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// A message taken by the blocking pop (the queue was empty) is handed over before its
/// `unacked` record is written; an ack sent at once must still remove that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_ack_of_a_blocking_pop_leaves_no_unacked_record() {
    let prefix = unique("brpop-ack");
    let url = BrokerUrl::parse(URL).unwrap();
    let producer = RedisProducer::connect(&url, options(&prefix))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = RedisConsumer::connect(&url, &["q".into()], 4, options(&prefix), tx)
        .await
        .unwrap();
    let mut conn = redis().await;
    for n in 0..20 {
        // Let the consumer reach its BRPOP on the empty list.
        tokio::time::sleep(Duration::from_millis(20)).await;
        producer.publish(message("q", n, None)).unwrap();
        let got = take(&mut rx, 1).await;
        assert_eq!(got.len(), 1, "message {n}");
        consumer.ack(tags(&got)).unwrap();
    }
    // Acks are asynchronous: wait (bounded) until the hash and its index are empty.
    let mut left = (usize::MAX, usize::MAX);
    for _ in 0..50 {
        let index: usize = redis::cmd("ZCARD")
            .arg(format!("{prefix}:unacked_index"))
            .query_async(&mut conn)
            .await
            .unwrap();
        left = (hlen(&mut conn, &format!("{prefix}:unacked")).await, index);
        if left == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, (0, 0), "unacked records left behind");
    consumer.close();
    cleanup(&prefix).await;
}
