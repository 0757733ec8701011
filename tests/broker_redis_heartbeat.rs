//! Redis consumer heartbeats and the prefetch window, against the real Redis on
//! 127.0.0.1:6379. Each test uses its own key prefix and removes its keys.

mod common;

use std::time::Duration;

use _core::broker::redis::{recover_dead, RedisOptions};
use _core::broker::Fetched;
use common::{cleanup, message, redis, redis_consumer, redis_publish};
use tokio::sync::mpsc;

fn options(prefix: &str) -> RedisOptions {
    RedisOptions {
        global_keyprefix: format!("{prefix}:"),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_ttl: Duration::from_millis(600),
        ..RedisOptions::default()
    }
}

async fn take(rx: &mut mpsc::UnboundedReceiver<Fetched>, count: usize, wait: Duration) -> usize {
    let mut got = 0;
    while got < count {
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(Fetched::Message(_))) => got += 1,
            Ok(Some(Fetched::Error(err))) => panic!("fetch error: {err}"),
            Ok(None) | Err(_) => break,
        }
    }
    got
}

async fn llen(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("LLEN").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_consumer_returns_the_messages_of_a_dead_one() {
    let prefix = format!("rs-test-heartbeat-{}", uuid::Uuid::new_v4());
    let opts = options(&prefix);
    let _producer = redis_publish(&opts, (0..3).map(|n| message("q", n, None))).await;
    {
        // Takes the messages and stops beating without acking or restoring (as if killed).
        let (dead, mut rx) = redis_consumer(&["q"], 3, &opts).await;
        assert_eq!(take(&mut rx, 3, Duration::from_secs(5)).await, 3);
        dead.close();
    }
    let mut conn = redis().await;
    assert_eq!(llen(&mut conn, &format!("{prefix}:q")).await, 0);
    // Before the heartbeat expires, nothing is taken back.
    assert_eq!(recover_dead(&mut conn, &opts, "me").await.unwrap(), 0);
    // A live consumer on another queue takes them back within a few heartbeats.
    let (live, _rx) = redis_consumer(&["other"], 1, &opts).await;
    let mut back = 0;
    for _ in 0..50 {
        back = llen(&mut conn, &format!("{prefix}:q")).await;
        if back == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back, 3);
    let unacked: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}:unacked"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(unacked, 0);
    live.restore_unacked().await.unwrap();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_of_a_live_consumer_stay_put() {
    let prefix = format!("rs-test-alive-{}", uuid::Uuid::new_v4());
    let opts = options(&prefix);
    let _producer = redis_publish(&opts, [message("q", 1, None)]).await;
    let (holder, mut rx) = redis_consumer(&["q"], 1, &opts).await;
    assert_eq!(take(&mut rx, 1, Duration::from_secs(5)).await, 1);
    let (other, _rx2) = redis_consumer(&["other"], 1, &opts).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut conn = redis().await;
    assert_eq!(llen(&mut conn, &format!("{prefix}:q")).await, 0);
    assert_eq!(holder.restore_unacked().await.unwrap(), 1);
    other.restore_unacked().await.unwrap();
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_grows_and_shrinks() {
    let prefix = format!("rs-test-window-{}", uuid::Uuid::new_v4());
    let opts = options(&prefix);
    let _producer = redis_publish(&opts, (0..6).map(|n| message("q", n, None))).await;
    let (consumer, mut rx) = redis_consumer(&["q"], 2, &opts).await;
    assert_eq!(take(&mut rx, 6, Duration::from_millis(500)).await, 2);
    consumer.extend_window(2);
    assert_eq!(take(&mut rx, 6, Duration::from_millis(500)).await, 2);
    // Shrink by 3 with nothing free: the next releases pay it back first.
    consumer.extend_window(-3);
    consumer.extend_window(1);
    assert_eq!(take(&mut rx, 6, Duration::from_millis(300)).await, 0);
    assert_eq!(consumer.restore_unacked().await.unwrap(), 4);
    cleanup(&prefix).await;
}
