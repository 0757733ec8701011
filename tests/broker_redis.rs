//! The Redis broker against the real Redis on 127.0.0.1:6379 (kombu's layout).
//! Each test uses its own queue names and removes its keys.

mod common;

use std::time::Duration;

use _core::broker::redis::{
    ensure_server_version, priority_key, restore_visible, server_version, RedisOptions,
    RedisProducer,
};
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

/// A TCP proxy to the real Redis that can hold back what clients send (in order),
/// and logs what passes, so a test can stop a consumer at an exact point of its
/// exchange with Redis: after Redis answered, before the consumer's next command
/// lands (the instant a `kill -9` would lose a message taken but not yet recorded).
struct HoldingProxy {
    url: BrokerUrl,
    hold: tokio::sync::watch::Sender<bool>,
    /// Hold back clients from the moment Redis sends bytes containing this.
    hold_after: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    /// The proxy's own addresses towards Redis (`addr=` in `CLIENT LIST`).
    upstream: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    log: std::sync::Arc<(std::sync::Mutex<Vec<Passed>>, tokio::sync::Notify)>,
}

#[derive(Clone)]
enum Passed {
    /// Bytes Redis sent to a client (logged before they are forwarded).
    ToClient(Vec<u8>),
    /// A client sent bytes while they were held back.
    HeldFromClient,
}

impl HoldingProxy {
    /// Listens on 127.0.0.1, on a free port of 7200-7299.
    async fn start() -> Self {
        let listener = listen_on_loopback().await;
        let port = listener.local_addr().expect("address").port();
        let (hold, _) = tokio::sync::watch::channel(false);
        let log = std::sync::Arc::new((
            std::sync::Mutex::new(Vec::new()),
            tokio::sync::Notify::new(),
        ));
        let hold_after = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (accept_hold, accept_log) = (hold.clone(), log.clone());
        let (accept_after, accept_upstream) = (hold_after.clone(), upstream.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:6379").await else {
                    continue;
                };
                if let Ok(addr) = server.local_addr() {
                    accept_upstream.lock().unwrap().push(addr.to_string());
                }
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_rd, client_wr) = client.into_split();
                let (server_rd, server_wr) = server.into_split();
                let (mut hold, log) = (accept_hold.subscribe(), accept_log.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = read_some(&client_rd, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if *hold.borrow_and_update() {
                            log.0.lock().unwrap().push(Passed::HeldFromClient);
                            log.1.notify_waiters();
                            if hold.wait_for(|held| !*held).await.is_err() {
                                break;
                            }
                        }
                        if write_all(&server_wr, &buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let (log, after, hold) = (
                    accept_log.clone(),
                    accept_after.clone(),
                    accept_hold.clone(),
                );
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = read_some(&server_rd, &mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let chunk = &buf[..n];
                        let armed = after.lock().unwrap().as_ref().is_some_and(|marker| {
                            chunk.windows(marker.len()).any(|w| w == marker.as_slice())
                        });
                        if armed {
                            hold.send_replace(true);
                        }
                        log.0.lock().unwrap().push(Passed::ToClient(chunk.to_vec()));
                        log.1.notify_waiters();
                        if write_all(&client_wr, &buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            url: BrokerUrl::parse(&format!("redis://127.0.0.1:{port}/0")).expect("url"),
            hold,
            hold_after,
            upstream,
            log,
        }
    }

    /// From the moment Redis sends a client bytes containing `marker`, hold back
    /// everything clients send (as if the process stopped right there).
    fn hold_after(&self, marker: &[u8]) {
        *self.hold_after.lock().unwrap() = Some(marker.to_vec());
    }

    /// Wait (at most 10 s) until one of the proxied clients is blocked in Redis.
    async fn wait_until_a_client_blocks(&self, conn: &mut redis::aio::MultiplexedConnection) {
        for _ in 0..1000 {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(conn)
                .await
                .unwrap();
            let ours = self.upstream.lock().unwrap().clone();
            let blocked = clients.lines().any(|line| {
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|kv| kv.strip_prefix(name))
                        .unwrap_or("")
                        .to_owned()
                };
                ours.contains(&field("addr=")) && field("flags=").contains('b')
            });
            if blocked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no consumer connection blocked within 10 s");
    }

    fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// Wait (at most 10 s) until Redis has sent a client bytes containing `marker` and
    /// that client has then sent something (held back).
    async fn wait_for_reply_then_command(&self, marker: &[u8]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.log.1.notified();
            {
                let log = self.log.0.lock().unwrap();
                let replied = log.iter().position(|passed| {
                    matches!(passed, Passed::ToClient(bytes)
                        if bytes.windows(marker.len()).any(|w| w == marker))
                });
                if let Some(at) = replied {
                    if log[at..]
                        .iter()
                        .any(|p| matches!(p, Passed::HeldFromClient))
                    {
                        return;
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let log = self.log.0.lock().unwrap();
                let seen: Vec<String> = log
                    .iter()
                    .map(|p| match p {
                        Passed::ToClient(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        Passed::HeldFromClient => "<held>".into(),
                    })
                    .collect();
                panic!("Redis never handed the message to the consumer, or it never answered: {seen:?}");
            }
        }
    }
}

/// A listener on 127.0.0.1, on a free port of 7200-7299 (this test suite's range).
async fn listen_on_loopback() -> tokio::net::TcpListener {
    for port in 7200..7300 {
        if let Ok(bound) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return bound;
        }
    }
    panic!("no free port in 7200-7299");
}

async fn read_some(
    half: &tokio::net::tcp::OwnedReadHalf,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        half.as_ref().readable().await?;
        match half.try_read(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

async fn write_all(
    half: &tokio::net::tcp::OwnedWriteHalf,
    mut bytes: &[u8],
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        half.as_ref().writable().await?;
        match half.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The blocking path (the queue was empty when the consumer asked): from the moment
/// Redis hands the consumer anything about a new message until the consumer's next
/// command lands, the message must still be in its list or in `unacked`, or a worker
/// killed in that instant loses it. The consumer's commands are held back right there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_in_its_list_or_unacked_at_every_instant_of_a_blocking_fetch() {
    let prefix = unique("blocking-window");
    let opts = RedisOptions {
        // Nothing but fetches on the consumer's connections.
        heartbeat_interval: Duration::ZERO,
        ..options(&prefix)
    };
    let proxy = HoldingProxy::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = _core::broker::redis::RedisConsumer::connect(
        &proxy.url,
        &["q".to_owned()],
        4,
        opts.clone(),
        tx,
    )
    .await
    .expect("consumer");
    // One message through first: the consumer then waits on the empty list.
    let producer = RedisProducer::connect(&redis_url(), opts.clone())
        .await
        .unwrap();
    producer.publish(message("q", 1, None)).unwrap();
    let first = take(&mut rx, 1).await;
    consumer.ack(tags(&first)).unwrap();

    let mut conn = redis().await;
    proxy.wait_until_a_client_blocks(&mut conn).await;
    proxy.hold_after(b"task-424242");
    producer.publish(message("q", 424_242, None)).unwrap();
    producer.flush(Duration::from_secs(10)).await.unwrap();
    proxy.wait_for_reply_then_command(b"task-424242").await;
    let (in_list, recorded): (Vec<String>, Vec<String>) = redis::pipe()
        .atomic()
        .cmd("LRANGE")
        .arg(format!("{prefix}:q"))
        .arg(0)
        .arg(-1)
        .cmd("HVALS")
        .arg(format!("{prefix}:unacked"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let copies = in_list
        .iter()
        .chain(&recorded)
        .filter(|raw| raw.contains("task-424242"))
        .count();
    assert_eq!(
        copies, 1,
        "the message left its list and is not in unacked: a worker killed now loses it"
    );

    proxy.hold(false);
    let second = take(&mut rx, 1).await;
    assert_eq!(second.len(), 1);
    let recorded: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:unacked"))
        .arg(&tags(&second)[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(recorded.is_some_and(|raw| raw.contains("task-424242")));
    consumer.ack(tags(&second)).unwrap();
    consumer.close();
    cleanup(&prefix).await;
}

/// The consumer needs Redis 6.2 (`RPOP key count`, `BLMOVE`); the real one passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_server_passes_the_version_check() {
    let mut conn = redis().await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    let version = server_version(&info).expect("INFO server tells redis_version");
    assert!(version >= (6, 2, 0), "the test Redis is {version:?}");
    ensure_server_version(&mut conn, "redis://127.0.0.1:6379/0")
        .await
        .expect("Redis >= 6.2 passes");
    let prefix = unique("version");
    let (consumer, _rx) = redis_consumer(&["q"], 1, &options(&prefix)).await;
    consumer.close();
    cleanup(&prefix).await;
}

/// A server that says it is Redis 6.0 (a stand-in on loopback: no old Redis here)
/// is refused when the consumer connects, with its masked URL and its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_refuses_a_redis_older_than_6_2() {
    let listener = listen_on_loopback().await;
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (reader, writer) = stream.into_split();
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = read_some(&reader, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // One reply per command (RESP arrays: `*<count>` at a line start).
                    let chunk = &buf[..n];
                    let mut replies = Vec::new();
                    for (at, _) in chunk.iter().enumerate().filter(|(_, b)| **b == b'*') {
                        if at == 0 || chunk[..at].ends_with(b"\r\n") {
                            let rest = &chunk[at..];
                            let command = rest
                                .split(|b| *b == b'*')
                                .nth(1)
                                .unwrap_or_default()
                                .to_ascii_uppercase();
                            if command.windows(4).any(|w| w == b"INFO") {
                                let info = "# Server\r\nredis_version:6.0.16\r\n";
                                replies.extend_from_slice(
                                    format!("${}\r\n{info}\r\n", info.len()).as_bytes(),
                                );
                            } else {
                                replies.extend_from_slice(b"+OK\r\n");
                            }
                        }
                    }
                    if write_all(&writer, &replies).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let url = BrokerUrl::parse(&format!("redis://:hunter2@127.0.0.1:{port}/0")).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = RedisOptions {
        heartbeat_interval: Duration::ZERO,
        ..options(&unique("old-server"))
    };
    let refused =
        _core::broker::redis::RedisConsumer::connect(&url, &["q".to_owned()], 1, opts, tx).await;
    let err = match refused {
        Ok(_) => panic!("a consumer connected to a Redis 6.0"),
        Err(err) => err,
    };
    assert!(matches!(err, _core::error::Error::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("redis://:**@127.0.0.1:{port}/0")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("version 6.0.16"), "{text}");
    assert!(text.contains("6.2 or later"), "{text}");
}
