//! The SQLite broker against real files in temporary directories.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use _core::broker::sqlite::{
    open, queue_counts, FanoutRow, FanoutSubscription, QueueCounts, SqliteConsumer, SqliteFanout,
    SqliteOptions, SqliteProducer, APPLICATION_ID, SCHEMA_VERSION,
};
use _core::broker::url::BrokerUrl;
use _core::broker::{Consumer, Fetched, Producer, TransportOptions};
use _core::error::Error;
use _core::protocol::message::OutgoingMessage;
use common::{message, tags, take, Taken};
use tokio::sync::mpsc;

fn url_for(path: &Path) -> BrokerUrl {
    BrokerUrl::parse(&format!("sqlite://{}", path.display())).expect("a sqlite URL")
}

fn task_ids(taken: &[Taken]) -> Vec<String> {
    taken
        .iter()
        .map(|m| {
            let m = m.as_ref().expect("a valid message");
            let headers: serde_json::Value =
                serde_json::from_str(m.headers.as_ref().expect("headers").get()).unwrap();
            headers["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn counts(path: &Path, queue: &str) -> QueueCounts {
    let conn = open(path, Duration::from_secs(5)).unwrap();
    queue_counts(&conn, queue).unwrap()
}

/// Poll (bounded) until `queue` has these counts.
async fn wait_for_counts(path: &Path, queue: &str, want: QueueCounts) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = counts(path, queue);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "counts {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish(path: &Path, messages: impl IntoIterator<Item = OutgoingMessage>) {
    let producer = SqliteProducer::connect(&url_for(path), SqliteOptions::default())
        .await
        .unwrap();
    for m in messages {
        producer.publish(m).unwrap();
    }
    producer.flush(Duration::from_secs(10)).await.unwrap();
}

async fn consumer(
    path: &Path,
    queues: &[&str],
    prefetch: usize,
    options: SqliteOptions,
) -> (SqliteConsumer, mpsc::UnboundedReceiver<Fetched>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queues: Vec<String> = queues.iter().map(|q| q.to_string()).collect();
    let consumer = SqliteConsumer::connect(&url_for(path), &queues, prefetch, options, tx)
        .await
        .unwrap();
    (consumer, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_consumes_and_acks_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    publish(&path, (0..1000).map(|n| message("q", n, None))).await;
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 1000,
            claimed: 0
        }
    );
    let (consumer, mut rx) = consumer(&path, &["q"], 0, SqliteOptions::default()).await;
    let got = take(&mut rx, 1000).await;
    assert_eq!(got.len(), 1000);
    for (n, delivery) in got.iter().enumerate() {
        let got = delivery.as_ref().expect("valid message");
        assert_eq!(got.body, message("q", n, None).body, "FIFO order");
        assert_eq!((got.queue.as_str(), got.routing_key.as_str()), ("q", "q"));
        assert!(!got.redelivered);
    }
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 0,
            claimed: 1000
        }
    );
    consumer.ack(tags(&got)).unwrap();
    wait_for_counts(&path, "q", QueueCounts::default()).await;
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_producer_and_consumer_pick_sqlite_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = url_for(&dir.path().join("generic.db"));
    let producer = Producer::connect(&url, &TransportOptions::default())
        .await
        .unwrap();
    assert!(matches!(producer, Producer::Sqlite(_)));
    producer.publish(message("q", 1, None)).unwrap();
    producer.flush(Duration::from_secs(5)).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = Consumer::connect(&url, &["q".into()], 1, &TransportOptions::default(), tx)
        .await
        .unwrap();
    let got = take(&mut rx, 1).await;
    assert_eq!(task_ids(&got), ["task-1"]);
    consumer.ack(tags(&got)).unwrap();
    assert_eq!(consumer.restore_unacked().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_is_woken_by_a_publish() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wake.db");
    // It polls every 5 s at most: only a wake-up can make it prompt.
    let slow_polling = SqliteOptions {
        polling_interval: Duration::from_secs(5),
        ..SqliteOptions::default()
    };
    let (consumer, mut rx) = consumer(&path, &["q"], 4, slow_polling).await;
    // Let the consumer reach a long pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    publish(&path, [message("q", 1, None)]).await;
    assert_eq!(take(&mut rx, 1).await.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "woken after {:?}",
        started.elapsed()
    );
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_window_bounds_unacked_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("window.db");
    publish(&path, (0..20).map(|n| message("q", n, None))).await;
    let (consumer, mut rx) = consumer(&path, &["q"], 4, SqliteOptions::default()).await;
    let first = take(&mut rx, 4).await;
    assert_eq!(first.len(), 4);
    // The window is full: nothing more arrives until we ack.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err());
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 16,
            claimed: 4
        }
    );
    // One free slot: the refill waits until half the window is free (its ack is
    // still written, within a few milliseconds).
    consumer.ack(tags(&first[..1])).unwrap();
    wait_for_counts(
        &path,
        "q",
        QueueCounts {
            ready: 16,
            claimed: 3,
        },
    )
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    consumer.ack(tags(&first[1..2])).unwrap();
    let second = take(&mut rx, 2).await;
    assert_eq!(task_ids(&second), ["task-4", "task-5"]);
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 14,
            claimed: 4
        }
    );
    consumer.ack(tags(&first[2..])).unwrap();
    assert_eq!(take(&mut rx, 2).await.len(), 2);
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priority_number_is_served_first_then_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prio.db");
    publish(
        &path,
        [
            message("q", 0, Some(9)),
            message("q", 1, Some(5)),
            message("q", 2, None),
            message("q", 3, Some(5)),
            message("q", 4, Some(0)),
            message("q", 5, Some(200)),
        ],
    )
    .await;
    let (consumer, mut rx) = consumer(&path, &["q"], 0, SqliteOptions::default()).await;
    let got = take(&mut rx, 6).await;
    assert_eq!(
        task_ids(&got),
        ["task-2", "task-4", "task-1", "task-3", "task-0", "task-5"]
    );
    let priorities: Vec<i64> = got.iter().map(|m| m.as_ref().unwrap().priority).collect();
    assert_eq!(priorities, [0, 0, 5, 5, 9, 200]);
    consumer.ack(tags(&got)).unwrap();
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumes_several_queues_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("queues.db");
    publish(
        &path,
        [
            message("a", 0, None),
            message("other", 1, None),
            message("b", 2, None),
            message("a", 3, Some(3)),
        ],
    )
    .await;
    let (consumer, mut rx) = consumer(&path, &["a", "b", "a"], 0, SqliteOptions::default()).await;
    let got = take(&mut rx, 3).await;
    assert_eq!(task_ids(&got), ["task-0", "task-2", "task-3"]);
    let queues: Vec<&str> = got
        .iter()
        .map(|m| m.as_ref().unwrap().queue.as_str())
        .collect();
    assert_eq!(queues, ["a", "b", "a"]);
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    assert_eq!(counts(&path, "other").ready, 1);
    consumer.ack(tags(&got)).unwrap();
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_unacked_puts_messages_back_marked_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restore.db");
    publish(&path, (0..3).map(|n| message("q", n, None))).await;
    let (first, mut rx) = consumer(&path, &["q"], 10, SqliteOptions::default()).await;
    let got = take(&mut rx, 3).await;
    first.ack(tags(&got[..1])).unwrap();
    assert_eq!(first.restore_unacked().await.unwrap(), 2);
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 2,
            claimed: 0
        }
    );
    // A restored consumer claims nothing more.
    assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
        .await
        .is_err());
    drop(first);
    let (second, mut rx) = consumer(&path, &["q"], 10, SqliteOptions::default()).await;
    let again = take(&mut rx, 2).await;
    assert_eq!(task_ids(&again), ["task-1", "task-2"]);
    assert!(again.iter().all(|m| m.as_ref().unwrap().redelivered));
    second.ack(tags(&again)).unwrap();
    wait_for_counts(&path, "q", QueueCounts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_puts_one_message_back_and_reject_drops_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("requeue.db");
    publish(&path, [message("q", 7, None), message("q", 8, None)]).await;
    let (consumer, mut rx) = consumer(&path, &["q"], 1, SqliteOptions::default()).await;
    let first = take(&mut rx, 1).await;
    consumer.reject(tags(&first).remove(0), true).unwrap();
    let again = take(&mut rx, 1).await;
    assert_eq!(tags(&again), tags(&first), "a requeued message comes back");
    assert!(again[0].as_ref().unwrap().redelivered);
    consumer.reject(tags(&again).remove(0), false).unwrap();
    let next = take(&mut rx, 1).await;
    assert_eq!(task_ids(&next), ["task-8"]);
    consumer.ack(tags(&next)).unwrap();
    wait_for_counts(&path, "q", QueueCounts::default()).await;
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_a_dead_consumer_come_back_after_the_visibility_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("visibility.db");
    publish(&path, (0..3).map(|n| message("q", n, None))).await;
    let short = SqliteOptions {
        visibility_timeout: Duration::from_millis(800),
        restore_interval: Duration::from_millis(100),
        ..SqliteOptions::default()
    };
    // A live consumer keeps its claims past the visibility timeout: it heartbeats.
    let (alive, mut alive_rx) = consumer(&path, &["q"], 2, short.clone()).await;
    let held = take(&mut alive_rx, 2).await;
    assert_eq!(held.len(), 2);
    // A consumer that takes the last message and "dies" (dropped: no heartbeat, no
    // restore, no ack).
    {
        let (dead, mut rx) = consumer(&path, &["q"], 5, short.clone()).await;
        assert_eq!(take(&mut rx, 1).await.len(), 1);
        drop(dead);
    }
    let (other, mut rx) = consumer(&path, &["q"], 5, short.clone()).await;
    let started = Instant::now();
    let back = take(&mut rx, 1).await;
    assert_eq!(task_ids(&back), ["task-2"]);
    assert!(back[0].as_ref().unwrap().redelivered);
    assert!(started.elapsed() < Duration::from_secs(30));
    // The live consumer's claims stay with it.
    assert!(tokio::time::timeout(Duration::from_millis(1500), rx.recv())
        .await
        .is_err());
    assert_eq!(
        counts(&path, "q"),
        QueueCounts {
            ready: 0,
            claimed: 3
        }
    );
    alive.ack(tags(&held)).unwrap();
    other.ack(tags(&back)).unwrap();
    wait_for_counts(&path, "q", QueueCounts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_on_one_file_never_get_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    const TOTAL: usize = 3000;
    let producer_path = path.clone();
    let publishing = tokio::spawn(async move {
        publish(&producer_path, (0..TOTAL).map(|n| message("q", n, None))).await;
    });
    let mut runs = Vec::new();
    for _ in 0..2 {
        let path = path.clone();
        runs.push(tokio::spawn(async move {
            let (consumer, mut rx) = consumer(&path, &["q"], 50, SqliteOptions::default()).await;
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                    Ok(Some(Fetched::Message(Ok(m)))) => {
                        consumer.ack(vec![m.delivery_tag.clone()]).unwrap();
                        seen.push(m.delivery_tag);
                    }
                    Ok(Some(other)) => panic!("unexpected {other:?}"),
                    Ok(None) | Err(_) => break,
                }
            }
            consumer.close();
            seen
        }));
    }
    publishing.await.unwrap();
    let mut all = HashSet::new();
    let mut per_consumer = Vec::new();
    for run in runs {
        let seen = run.await.unwrap();
        per_consumer.push(seen.len());
        for tag in seen {
            assert!(all.insert(tag.clone()), "{tag} delivered twice");
        }
    }
    assert_eq!(all.len(), TOTAL, "per consumer: {per_consumer:?}");
    assert!(per_consumer.iter().all(|n| *n > 0), "{per_consumer:?}");
    wait_for_counts(&path, "q", QueueCounts::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_row_is_handed_over_with_a_reason_and_acked_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.db");
    {
        let conn = open(&path, Duration::from_secs(5)).unwrap();
        conn.execute(
            "INSERT INTO messages (queue, priority, published_at, payload) VALUES ('q', 0, 0, ?1)",
            [b"not json at all".to_vec()],
        )
        .unwrap();
    }
    let (consumer, mut rx) = consumer(&path, &["q"], 1, SqliteOptions::default()).await;
    let got = take(&mut rx, 1).await;
    let bad = got[0].as_ref().expect_err("an error");
    assert!(
        bad.reason.contains("not a kombu envelope"),
        "{}",
        bad.reason
    );
    consumer.ack(vec![bad.delivery_tag.clone()]).unwrap();
    wait_for_counts(&path, "q", QueueCounts::default()).await;
    consumer.close();
}

/// Rows written by another program (the table is not STRICT, so any column can hold any
/// type): each one is handed over as a bad message with its reason and acked away, and
/// the good message behind them still arrives. None of them stops the claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_the_wrong_types_are_handed_over_as_bad_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.db");
    let good = String::from_utf8(
        _core::protocol::envelope::encode(&message("q", 1, None), "unused").unwrap(),
    )
    .unwrap();
    // (priority, redelivered, payload) as SQL literals; `?1` is the good envelope.
    let rows = [
        ("0", "0", "42"),
        ("0", "0", "x'00ff'"),
        ("0", "0", "'{\"body\": 1}'"),
        ("'high'", "0", "?1"),
        ("2.5", "0", "?1"),
        ("x'01'", "0", "?1"),
        ("0", "'yes'", "?1"),
        ("0", "x'01'", "?1"),
        ("0", "0.5", "?1"),
    ];
    {
        let conn = open(&path, Duration::from_secs(5)).unwrap();
        for (priority, redelivered, payload) in rows {
            conn.execute(
                &format!(
                    "INSERT INTO messages (queue, priority, published_at, redelivered, payload) \
                     VALUES ('q', {priority}, 0, {redelivered}, {payload})"
                ),
                rusqlite::params_from_iter((payload == "?1").then_some(&good)),
            )
            .unwrap();
        }
        // A queue name that is not text is not one we consume: it stays where it is.
        conn.execute(
            "INSERT INTO messages (queue, priority, published_at, payload) \
             VALUES (x'71', 0, 0, ?1)",
            [&good],
        )
        .unwrap();
    }
    publish(&path, [message("q", 2, None)]).await;
    let (consumer, mut rx) = consumer(&path, &["q"], 20, SqliteOptions::default()).await;
    let got = take(&mut rx, rows.len() + 1).await;
    assert_eq!(got.len(), rows.len() + 1, "{got:?}");
    let mut ids = Vec::new();
    for taken in &got {
        let tag = match taken {
            Ok(message) => {
                let headers: serde_json::Value =
                    serde_json::from_str(message.headers.as_ref().expect("headers").get()).unwrap();
                ids.push(headers["id"].as_str().unwrap().to_owned());
                message.delivery_tag.clone()
            }
            Err(bad) => {
                assert!(bad.reason.len() > 10, "{}", bad.reason);
                bad.delivery_tag.clone()
            }
        };
        consumer.ack(vec![tag]).unwrap();
    }
    // The rows whose payload is the good envelope decode; their odd priority or
    // redelivered flag does not lose them.
    assert_eq!(ids.len(), rows.len() + 1 - 3, "{got:?}");
    assert!(ids.contains(&"task-2".to_owned()), "{ids:?}");
    wait_for_counts(&path, "q", QueueCounts::default()).await;
    consumer.close();
}

// ---------------------------------------------------------------------------------
// Bad files and paths: a clear error naming the file, and the file left as it was.

async fn connect_error(path: &Path) -> String {
    match SqliteProducer::connect(&url_for(path), SqliteOptions::default()).await {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(err) => {
            assert!(matches!(err, Error::Connection(_)), "{err:?}");
            err.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("x.db");
    let err = connect_error(&path).await;
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("missing").exists());
}

/// A directory we cannot create files in (a chmod'ed one, or /sys when we are root).
fn read_only_dir(base: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = base.join("ro");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(dir.join("probe"), b"x").is_err() {
        return dir;
    }
    PathBuf::from("/sys")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = read_only_dir(dir.path()).join("x.db");
    let err = connect_error(&path).await;
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("must be writable"), "{err}");
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_sqlite_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let text = "these are my notes, not a database\n".repeat(100);
    std::fs::write(&path, &text).unwrap();
    let err = connect_error(&path).await;
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not a SQLite database"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.db");
    {
        // A database with some rows; the last connection to close folds the WAL in.
        let conn = open(&path, Duration::from_secs(5)).unwrap();
        for n in 0..50 {
            conn.execute(
                "INSERT INTO messages (queue, priority, published_at, payload) VALUES ('q', 0, 0, ?1)",
                [vec![b'x'; 500 + n]],
            )
            .unwrap();
        }
    }
    assert!(!path.with_extension("db-wal").exists());
    // Scribble over the schema page.
    let mut bytes = std::fs::read(&path).unwrap();
    for byte in bytes.iter_mut().skip(100).take(3000) {
        *byte = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = connect_error(&path).await;
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("corrupt") || err.contains("not a SQLite database"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    publish(&path, [message("q", 1, None)]).await;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = connect_error(&path).await;
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("newer celeriac"), "{err}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM messages", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the data is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = connect_error(&path).await;
    assert!(err.contains("another application (users)"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Marked with another application id: refused as well.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "application_id", 7).unwrap();
    }
    let err = connect_error(&path).await;
    assert!(err.contains("another application"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_is_marked_as_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    publish(&path, []).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let app: i64 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(
        (app, version, mode.as_str()),
        (APPLICATION_ID, SCHEMA_VERSION, "wal")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = connect_error(dir.path()).await;
    assert!(err.contains("is a directory"), "{err}");
}

// ---------------------------------------------------------------------------------
// Fanout (events, remote control)

fn row(exchange: &str, routing_key: &str, payload: &str) -> FanoutRow {
    FanoutRow {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        payload: payload.as_bytes().to_vec(),
    }
}

async fn fanout(path: &Path) -> SqliteFanout {
    SqliteFanout::connect(&url_for(path), SqliteOptions::default())
        .await
        .expect("fanout")
}

async fn next_payload(sub: &mut FanoutSubscription) -> String {
    let message = sub
        .recv(Duration::from_secs(10))
        .await
        .expect("open")
        .expect("a broadcast within 10 s");
    String::from_utf8(message.payload.expect("readable")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_sees_each_broadcast_published_after_it_subscribed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanout.db");
    let publisher = fanout(&path).await;
    publisher
        .publish(vec![row("celeryev", "worker.online", "before")])
        .await
        .unwrap();
    // Two subscribers on other connections, one filtering on a routing key.
    let (a, b) = (fanout(&path).await, fanout(&path).await);
    let mut all = a.subscribe("celeryev", None).await.unwrap();
    let mut replies = b.subscribe("celeryev", Some("oid-1")).await.unwrap();
    publisher
        .publish(vec![
            row("celeryev", "worker.heartbeat", "one"),
            row("other", "oid-1", "elsewhere"),
            row("celeryev", "oid-1", "two"),
        ])
        .await
        .unwrap();
    publisher
        .publish(vec![row("celeryev", "task.multi", "three")])
        .await
        .unwrap();
    assert_eq!(next_payload(&mut all).await, "one");
    assert_eq!(next_payload(&mut all).await, "two");
    assert_eq!(next_payload(&mut all).await, "three");
    assert_eq!(next_payload(&mut replies).await, "two");
    assert!(replies.try_recv().unwrap().is_none());
    assert!(all
        .recv(Duration::from_millis(100))
        .await
        .unwrap()
        .is_none());
    // A fanout sees its own broadcasts too.
    let mut own = publisher.subscribe("celeryev", None).await.unwrap();
    publisher
        .publish(vec![row("celeryev", "x", "mine")])
        .await
        .unwrap();
    assert_eq!(next_payload(&mut own).await, "mine");
    assert_eq!(next_payload(&mut all).await, "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_broadcast_row_does_not_stop_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanout.db");
    let subscriber = fanout(&path).await;
    let mut sub = subscriber.subscribe("celeryev", None).await.unwrap();
    {
        // Rows written by something else: a wrong type for the routing key, a
        // payload that is no envelope.
        let conn = open(&path, Duration::from_secs(5)).unwrap();
        conn.execute(
            "INSERT INTO broadcast (exchange, routing_key, created, payload) \
             VALUES ('celeryev', 42, (julianday('now') - 2440587.5) * 86400.0, 'not json {')",
            [],
        )
        .unwrap();
    }
    let publisher = fanout(&path).await;
    publisher
        .publish(vec![row("celeryev", "k", "fine")])
        .await
        .unwrap();
    assert_eq!(next_payload(&mut sub).await, "not json {");
    assert_eq!(next_payload(&mut sub).await, "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    publish(&path, (0..3).map(|n| message("q", n, None))).await;
    {
        let conn = open(&path, Duration::from_secs(5)).unwrap();
        conn.execute_batch("DROP TABLE broadcast; PRAGMA user_version = 1;")
            .unwrap();
    }
    let publisher = fanout(&path).await;
    publisher
        .publish(vec![row("celeryev", "k", "after upgrade")])
        .await
        .unwrap();
    let conn = open(&path, Duration::from_secs(5)).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM broadcast", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(counts(&path, "q").ready, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_names_with_quotes_are_consumed_and_nul_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.db");
    let odd = "it's a 'queue'; DROP TABLE messages; --";
    publish(&path, [message(odd, 0, None), message("plain", 1, None)]).await;
    let (consumer, mut rx) = consumer(&path, &[odd, "x"], 4, SqliteOptions::default()).await;
    let got = take(&mut rx, 1).await;
    assert_eq!(task_ids(&got), ["task-0"]);
    consumer.ack(tags(&got)).unwrap();
    wait_for_counts(
        &path,
        "plain",
        QueueCounts {
            ready: 1,
            claimed: 0,
        },
    )
    .await;
    consumer.close();

    let (tx, _rx) = mpsc::unbounded_channel();
    let refused = SqliteConsumer::connect(
        &url_for(&path),
        &["bad\0name".to_owned()],
        4,
        SqliteOptions::default(),
        tx,
    )
    .await;
    let err = refused.err().expect("a NUL in a queue name is refused");
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_prunes_broadcasts_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prune.db");
    let conn = open(&path, Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "INSERT INTO broadcast (exchange, routing_key, created, payload)
         VALUES ('celeryev', 'old', 0, '{}'),
                ('celeryev', 'recent', (julianday('now') - 2440587.5) * 86400.0, '{}');",
    )
    .unwrap();
    let publisher = fanout(&path).await;
    publisher
        .publish(vec![row("celeryev", "new", "{}")])
        .await
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT routing_key FROM broadcast ORDER BY id")
        .unwrap();
    let keys: Vec<String> = stmt
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(keys, ["recent", "new"]);
}
