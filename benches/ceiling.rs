//! The pure-Rust ceiling: the broker work of `bench.noop` tasks with no Python at all.
//!
//! ```text
//! cargo bench --bench ceiling -- [--url redis://127.0.0.1:6379/0] [-n 10000]
//!                                 [--prefetch 4] [--queue NAME] [--repeats 1]
//! ```
//!
//! It uses the crate's own broker modules, the ones the extension wraps:
//!
//! - enqueue: n messages built as `noop.delay()` builds them (headers, properties,
//!   `[[], {}, embed]` body) handed to the transport's producer, then a flush;
//! - drain: a consumer with the worker's prefetch window (`-c 1` x multiplier 4 = 4)
//!   takes the n messages, parses each one's headers and body as the worker's decoder
//!   does (into JSON values instead of Python objects) and acks it alone, before
//!   "running" it, as the worker acks.
//!
//! Prints one JSON object per repeat on stdout (`python -m benches` reads the last
//! line). The queue (`--queue`, then `NAME_1`, `NAME_2`... for further repeats) is
//! deleted before and after on Redis; on RabbitMQ it is left to the caller to delete.

use std::time::{Duration, Instant};

use _core::broker::url::{BrokerUrl, Scheme};
use _core::broker::{Consumer, Fetched, Producer, TransportOptions};
use _core::error::{Error, Result};
use _core::protocol::json;
use _core::protocol::message::{
    HeaderIds, OutgoingMessage, TaskHeaders, TaskProperties, EMPTY_EMBED,
};
use tokio::sync::mpsc;

struct Args {
    url: String,
    n: usize,
    prefetch: usize,
    queue: String,
    repeats: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        url: "redis://127.0.0.1:6379/0".into(),
        n: 10_000,
        prefetch: 4,
        queue: format!("bench_ceiling_{}", uuid::Uuid::new_v4().simple()),
        repeats: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value("--url")?,
            "-n" => args.n = number(&value("-n")?)?,
            "--prefetch" => args.prefetch = number(&value("--prefetch")?)?,
            "--queue" => args.queue = value("--queue")?,
            "--repeats" => args.repeats = number(&value("--repeats")?)?,
            // `cargo bench` passes --bench; a filter may follow.
            "--bench" => {}
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            _ => {}
        }
    }
    if args.n == 0 || args.repeats == 0 {
        return Err("-n and --repeats must be at least 1".into());
    }
    Ok(args)
}

fn number(text: &str) -> std::result::Result<usize, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a whole number"))
}

/// The message `noop.delay()` sends: what `Producer.send` builds from Python.
fn noop_message(queue: &str) -> OutgoingMessage {
    let id = uuid::Uuid::new_v4().to_string();
    let mut headers = TaskHeaders::new("bench.noop".into(), id.clone(), "gen0@ceiling".into());
    headers.argsrepr = "()".into();
    headers.kwargsrepr = "{}".into();
    headers.ignore_result = true;
    let mut body = Vec::with_capacity(96);
    body.extend_from_slice(b"[[], {}, ");
    body.extend_from_slice(EMPTY_EMBED.as_bytes());
    body.push(b']');
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.to_owned(),
        headers,
        properties: TaskProperties::json(id, String::new()),
        body,
    }
}

/// What the worker's decoder does with a message before Python sees it: the task's
/// name and id from the headers, every header, and the body's three parts.
fn decode(headers: Option<&str>, body: &[u8]) -> Result<()> {
    let headers = headers.ok_or_else(|| Error::Decode("a message without headers".into()))?;
    let ids: HeaderIds = serde_json::from_str(headers)?;
    let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(headers)?;
    let parts: Vec<serde_json::Value> = json::from_slice(body)?;
    if ids.task.is_none() || ids.id.is_none() || all.is_empty() || parts.len() != 3 {
        return Err(Error::Decode("not a task message".into()));
    }
    std::hint::black_box(parts);
    Ok(())
}

async fn purge(url: &BrokerUrl, queue: &str) {
    if !matches!(
        url.scheme,
        Scheme::Redis | Scheme::Rediss | Scheme::RedisSocket
    ) {
        return;
    }
    let Ok(info) = url.to_redis_info() else {
        return;
    };
    let Ok(client) = redis::Client::open(info) else {
        return;
    };
    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{queue}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: std::result::Result<(), _> =
                redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
}

async fn one_run(url: &BrokerUrl, args: &Args, queue: &str) -> Result<serde_json::Value> {
    let options = TransportOptions::default();
    let n = args.n;
    let producer = Producer::connect(url, &options).await?;
    // Warm-up: connect, declare (RabbitMQ) and write one message.
    producer.publish(noop_message(queue))?;
    producer.flush(Duration::from_secs(30)).await?;
    let t0 = Instant::now();
    for _ in 0..n {
        producer.publish(noop_message(queue))?;
    }
    let loop_seconds = t0.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(120)).await?;
    let enqueue_seconds = t0.elapsed().as_secs_f64();
    producer.close();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let t_connect = Instant::now();
    let consumer = Consumer::connect(url, &[queue.to_owned()], args.prefetch, &options, tx).await?;
    let mut batch = Vec::with_capacity(256);
    let mut done = 0usize;
    let mut first = None;
    let total = n + 1;
    while done < total {
        batch.clear();
        let got = tokio::time::timeout(Duration::from_secs(30), rx.recv_many(&mut batch, 256))
            .await
            .map_err(|_| Error::Timeout(format!("drained {done} of {total} in 30 s")))?;
        if got == 0 {
            return Err(Error::Closed("the consumer"));
        }
        for item in batch.drain(..) {
            match item {
                Fetched::Message(Ok(message)) => {
                    decode(message.headers.as_deref().map(|h| h.get()), &message.body)?;
                    consumer.ack(vec![message.delivery_tag])?;
                    done += 1;
                    if done == 1 {
                        // The warm-up message: the clock starts after it, as the
                        // Python drain's starts at its first sentinel.
                        first = Some(Instant::now());
                    }
                }
                Fetched::Message(Err(bad)) => {
                    return Err(Error::Decode(format!("bad message: {}", bad.reason)));
                }
                Fetched::Error(text) => return Err(Error::Connection(text)),
            }
        }
    }
    let drain_seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let with_startup = t_connect.elapsed().as_secs_f64();
    // Let the ack task write the last acks before the consumer goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.close();
    Ok(serde_json::json!({
        "broker": format!("{:?}", url.scheme).to_lowercase(),
        "n": n,
        "prefetch": args.prefetch,
        "enqueue_seconds": enqueue_seconds,
        "enqueue_loop_seconds": loop_seconds,
        "enqueue_rate": n as f64 / enqueue_seconds,
        "drain_seconds": drain_seconds,
        "drain_seconds_with_startup": with_startup,
        "drain_rate": n as f64 / drain_seconds.max(1e-9),
    }))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(text) => {
            eprintln!("ceiling: {text}");
            std::process::exit(2);
        }
    };
    let url = match BrokerUrl::parse(&args.url) {
        Ok(url) => url,
        Err(err) => {
            eprintln!("ceiling: {err}");
            std::process::exit(2);
        }
    };
    let runtime = _core::runtime::handle();
    for repeat in 0..args.repeats {
        let queue = match repeat {
            0 => args.queue.clone(),
            _ => format!("{}_{repeat}", args.queue),
        };
        let outcome = runtime.block_on(async {
            purge(&url, &queue).await;
            let outcome = one_run(&url, &args, &queue).await;
            purge(&url, &queue).await;
            outcome
        });
        match outcome {
            Ok(value) => println!("{value}"),
            Err(err) => {
                eprintln!("ceiling: {err}");
                std::process::exit(1);
            }
        }
    }
}
