//! The Redis broker against the real Redis on 127.0.0.1:6379 (kombu's layout).
//! Each test uses its own queue names and removes its keys.

mod common;

use std::time::Duration;

use _core::broker::redis::{priority_key, restore_visible, RedisOptions, RedisProducer};
use _core::broker::url::BrokerUrl;
use common::{cleanup, message, redis, redis_consumer, redis_publish, redis_url, tags, take};

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
    let _producer = redis_publish(
        &options(&prefix),
        (0..1000).map(|n| message(&queue, n, None)),
    )
    .await;

    let (consumer, mut rx) = redis_consumer(&[&queue], 0, &options(&prefix)).await;
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
    let _producer = redis_publish(&options(&prefix), (0..20).map(|n| message("q", n, None))).await;
    let (consumer, mut rx) = redis_consumer(&["q"], 4, &options(&prefix)).await;
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
    let _producer = redis_publish(
        &options(&prefix),
        [(9, Some(9)), (5, Some(5)), (0, Some(0))].map(|(n, p)| message("q", n, p)),
    )
    .await;
    let mut conn = redis().await;
    let len: usize = redis::cmd("LLEN")
        .arg(format!("{prefix}:{}", priority_key("q", 5)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1, "priority 5 goes to the 3-step list");
    let (consumer, mut rx) = redis_consumer(&["q"], 0, &options(&prefix)).await;
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
    let mut conn = redis().await;
    let _: () = redis::cmd("LPUSH")
        .arg(format!("{prefix}:q"))
        .arg("not json at all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (consumer, mut rx) = redis_consumer(&["q"], 1, &options(&prefix)).await;
    let got = take(&mut rx, 1).await;
    assert_eq!(got.len(), 1);
    let reason = got[0].as_ref().expect_err("an error").reason.clone();
    assert!(reason.contains("not a kombu envelope"), "{reason}");
    assert_eq!(hlen(&mut conn, &format!("{prefix}:unacked")).await, 0);
    // The window (1) is not held by the bad message: a good one still comes through.
    let _producer = redis_publish(&options(&prefix), [message("q", 1, None)]).await;
    assert_eq!(take(&mut rx, 1).await.len(), 1);
    consumer.close();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_unacked_puts_messages_back_marked_redelivered() {
    let prefix = unique("restore");
    let _producer = redis_publish(&options(&prefix), (0..3).map(|n| message("q", n, None))).await;
    let (consumer, mut rx) = redis_consumer(&["q"], 10, &options(&prefix)).await;
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
    let _producer = redis_publish(&options(&prefix), [message("q", 7, None)]).await;
    let (consumer, mut rx) = redis_consumer(&["q"], 1, &options(&prefix)).await;
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
    let mut opts = options(&prefix);
    opts.visibility_timeout = Duration::from_millis(300);
    let _producer = redis_publish(&opts, [message("q", 1, None)]).await;
    {
        // A consumer that takes the message and "dies" without acking.
        let (dead, mut rx) = redis_consumer(&["q"], 1, &opts).await;
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
    let producer = RedisProducer::connect(&redis_url(), options(&prefix))
        .await
        .unwrap();
    let (consumer, mut rx) = redis_consumer(&["q"], 4, &options(&prefix)).await;
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
