//! The ceiling of `python -m benches`: a bare client that does a worker's broker work per
//! task, with the worker's prefetch window and the same durability, and none of celeriac's
//! code (no `_core`): redis-rs or lapin directly.
//!
//! ```text
//! cargo bench --bench ceiling -- redis|amqp --url URL --queue NAME -n COUNT [--window 4]
//! ```
//!
//! The queue must already hold COUNT task messages (`python -m benches` fills it with
//! celeriac's client, as for the drain it bounds); the program consumes exactly COUNT and
//! prints one JSON object: how many, and the seconds from the first message received to
//! the last one acked.
//!
//! - `redis`: one connection, one Lua script per round trip that acks the previous batch
//!   (SREM, ZREM, HDEL of its tags) and pops up to `window` messages, recording each in
//!   kombu's ack emulation (`unacked` hash, `unacked_index` zset) and in the consumer's set
//!   of tags (SADD), as the worker's fetch does. Keys are named after the queue, so the
//!   run's clean-up deletes them. One round trip per `window` messages is the least a
//!   consumer holding at most `window` unacked messages can do.
//! - `amqp`: one channel, `basic.qos(window)`, `basic.consume` with manual acks, one
//!   `basic.ack` per message (not `multiple`), persistent messages in a durable queue.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;

/// How long the queue may stay empty before the run fails (it was filled beforehand).
const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// KEYS: unacked hash, unacked_index zset, the consumer's set of tags, the queue's list.
/// ARGV: how many to pop, the time now, then the tags to ack first.
/// Returns the popped messages.
const ACK_THEN_FETCH: &str = r#"
if #ARGV > 2 then
  local acked = {unpack(ARGV, 3)}
  redis.call('SREM', KEYS[3], unpack(acked))
  redis.call('ZREM', KEYS[2], unpack(acked))
  redis.call('HDEL', KEYS[1], unpack(acked))
end
local count = tonumber(ARGV[1])
if count == 0 then return {} end
local popped = redis.call('RPOP', KEYS[4], count)
if not popped then return {} end
for _, raw in ipairs(popped) do
  local envelope = cjson.decode(raw)
  local props = envelope.properties
  local route = props.delivery_info or {}
  redis.call('ZADD', KEYS[2], ARGV[2], props.delivery_tag)
  redis.call('SADD', KEYS[3], props.delivery_tag)
  redis.call('HSET', KEYS[1], props.delivery_tag, cjson.encode({raw,
    route.exchange or '', route.routing_key or ''}))
end
return popped
"#;

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    Redis,
    Amqp,
}

struct Args {
    broker: Broker,
    url: String,
    queue: String,
    count: usize,
    window: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut broker = None;
    let (mut url, mut queue, mut count, mut window) = (None, None, None, 4u16);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "redis" => broker = Some(Broker::Redis),
            "amqp" => broker = Some(Broker::Amqp),
            "--url" => url = Some(value("--url")?),
            "--queue" => queue = Some(value("--queue")?),
            "-n" => count = Some(number(&value("-n")?)?),
            "--window" => window = number(&value("--window")?)?,
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let args = Args {
        broker: broker.ok_or("name the broker: redis or amqp")?,
        url: url.ok_or("--url is required")?,
        queue: queue.ok_or("--queue is required")?,
        count: count.ok_or("-n is required")?,
        window,
    };
    if args.count == 0 || args.window == 0 {
        return Err("-n and --window must be at least 1".into());
    }
    Ok(args)
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a whole number in range"))
}

/// The only field of a kombu envelope the consumer needs to ack.
#[derive(Deserialize)]
struct Envelope {
    properties: EnvelopeProperties,
}

#[derive(Deserialize)]
struct EnvelopeProperties {
    delivery_tag: String,
}

/// (messages consumed, seconds from the first received to the last acked)
async fn drain_redis(args: &Args) -> Result<(usize, f64), String> {
    let client = redis::Client::open(args.url.as_str()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let script = redis::Script::new(ACK_THEN_FETCH);
    let keys = [
        format!("{}.ceiling.unacked", args.queue),
        format!("{}.ceiling.unacked_index", args.queue),
        format!("{}.ceiling.owned", args.queue),
        args.queue.clone(),
    ];
    let mut to_ack: Vec<String> = Vec::with_capacity(usize::from(args.window));
    let (mut done, mut first, mut idle_since) = (0usize, None, Instant::now());
    while done < args.count || !to_ack.is_empty() {
        let want = (args.count - done).min(usize::from(args.window));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut call = script.prepare_invoke();
        for key in &keys {
            call.key(key);
        }
        call.arg(want).arg(now).arg(&to_ack);
        let popped: Vec<Vec<u8>> = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        to_ack.clear();
        if popped.is_empty() && want > 0 {
            if idle_since.elapsed() > IDLE_LIMIT {
                return Err(format!("the queue ran dry after {done} of {}", args.count));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        idle_since = Instant::now();
        first.get_or_insert_with(Instant::now);
        for raw in popped {
            let envelope: Envelope =
                serde_json::from_slice(&raw).map_err(|e| format!("not a kombu envelope: {e}"))?;
            to_ack.push(envelope.properties.delivery_tag);
            done += 1;
        }
    }
    Ok((done, first.map_or(0.0, |t| t.elapsed().as_secs_f64())))
}

async fn drain_amqp(args: &Args) -> Result<(usize, f64), String> {
    let runtime = async_rs::Runtime::tokio_with_handle(tokio::runtime::Handle::current());
    let conn =
        Connection::connect_with_runtime(&args.url, ConnectionProperties::default(), runtime)
            .await
            .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .basic_qos(args.window, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut deliveries = channel
        .basic_consume(
            args.queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut done, mut first) = (0usize, None);
    while done < args.count {
        let next = tokio::time::timeout(IDLE_LIMIT, deliveries.next()).await;
        let delivery = match next {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(err))) => return Err(err.to_string()),
            Ok(None) => return Err("the consumer was cancelled".into()),
            Err(_) => return Err(format!("the queue ran dry after {done} of {}", args.count)),
        };
        first.get_or_insert_with(Instant::now);
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        done += 1;
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    // The channel's close-ok comes after the broker has handled every ack.
    channel
        .close(200, "OK".into())
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close(200, "OK".into()).await;
    Ok((done, seconds))
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(text) => {
            eprintln!("ceiling: {text}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("ceiling: no tokio runtime: {err}");
            std::process::exit(1);
        }
    };
    let outcome = runtime.block_on(async {
        match args.broker {
            Broker::Redis => drain_redis(&args).await,
            Broker::Amqp => drain_amqp(&args).await,
        }
    });
    match outcome {
        Ok((consumed, seconds)) => println!(
            "{}",
            serde_json::json!({
                "client": if args.broker == Broker::Redis { "redis-rs" } else { "lapin" },
                "consumed": consumed,
                "window": args.window,
                "seconds": seconds,
            })
        ),
        Err(text) => {
            eprintln!("ceiling: {text}");
            std::process::exit(1);
        }
    }
}
