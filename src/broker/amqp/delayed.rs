//! Native delayed delivery's topology (Celery 5.5+, for quorum queues), declared by a
//! worker as a Celery worker's `DelayedDelivery` step declares it: the 28 levels
//! `celery_delayed_{0..27}`, the `celery_delayed_delivery` exchange, and that exchange
//! bound to the worker's task exchanges. The names and arguments are in
//! [`crate::protocol::delayed`].

use super::*;
use crate::protocol::delayed::{
    delivery_pattern, level_name, level_pattern, level_queue_arguments, DELIVERY_EXCHANGE, LEVELS,
};

/// Whether a worker consuming `consumed` sets native delayed delivery up: as Celery,
/// when one of the configured or consumed queues is a quorum queue.
pub(super) fn wanted(options: &AmqpOptions, consumed: &[QueueSpec]) -> bool {
    consumed.iter().any(QueueSpec::is_quorum) || options.queues.values().any(QueueSpec::is_quorum)
}

/// The type of the level queues (`broker_native_delayed_delivery_queue_type`,
/// `quorum` when not given); a worker that needs them stops on another value.
pub(super) fn level_queue_type(options: &AmqpOptions) -> Result<LevelQueueType> {
    LevelQueueType::parse(
        options
            .delayed_delivery_queue_type
            .as_deref()
            .unwrap_or("quorum"),
    )
}

/// A broker refusal of one step, in words; other failures are the connection's.
fn refused(what: &str, err: lapin::Error) -> std::result::Result<Error, lapin::Error> {
    match channel_refusal(&err) {
        Some(code) => Ok(Error::Config(format!(
            "native delayed delivery: RabbitMQ refused to {what} ({code:?}): {err}. \
             Delete the celery_delayed_* queues and exchanges (after draining them) or \
             set broker_native_delayed_delivery_queue_type as they were declared"
        ))),
        None => Err(err),
    }
}

fn name(text: &str) -> std::result::Result<ShortString, lapin::Error> {
    short("name", text).map_err(|e| lapin_other(&e))
}

async fn declare_topic(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    // kombu's Exchange defaults: durable, not auto-delete, not internal.
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let (exchange, topic) = (name(exchange)?, lapin::ExchangeKind::Topic);
    channel
        .exchange_declare(exchange, topic, durable, FieldTable::default())
        .await
}

async fn bind_exchange(
    channel: &Channel,
    destination: &str,
    source: &str,
    pattern: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_bind(
            name(destination)?,
            name(source)?,
            name(pattern)?,
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

async fn bind_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    pattern: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            name(queue)?,
            name(exchange)?,
            name(pattern)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declare the levels and the delivery exchange exactly as kombu's
/// `declare_native_delayed_delivery_exchanges_and_queues`, then bind
/// `celery_delayed_delivery` to the exchange of each of `specs` that is not direct
/// (Celery warns about direct exchanges and skips them: their ETA tasks stay with the
/// worker), and each queue to its exchange with the same `#.<routing key>` pattern.
/// The inner error: RabbitMQ refused a declaration (a level queue exists with other
/// arguments).
pub(super) async fn declare(
    conn: &Connection,
    specs: &[QueueSpec],
    queue_type: LevelQueueType,
) -> Result<Result<(), Error>, lapin::Error> {
    let channel = conn.create_channel().await?;
    let outcome = declare_on(&channel, specs, queue_type).await;
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("OK")).await;
    }
    outcome
}

async fn declare_on(
    channel: &Channel,
    specs: &[QueueSpec],
    queue_type: LevelQueueType,
) -> Result<Result<(), Error>, lapin::Error> {
    for level in (0..LEVELS).rev() {
        let current = level_name(level);
        if let Err(err) = declare_topic(channel, &current).await {
            return refused(&format!("declare exchange {current:?}"), err).map(Err);
        }
        let arguments = json_to_field_table(&level_queue_arguments(level, queue_type))
            .map_err(|e| lapin_other(&e))?;
        let declared = channel
            .queue_declare(
                name(&current)?,
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await;
        if let Err(err) = declared {
            return refused(&format!("declare queue {current:?}"), err).map(Err);
        }
        bind_queue(channel, &current, &current, &level_pattern(level, '1')).await?;
    }
    for level in (1..LEVELS).rev() {
        let (source, below) = (level_name(level), level_name(level - 1));
        bind_exchange(channel, &below, &source, &level_pattern(level, '0')).await?;
    }
    if let Err(err) = declare_topic(channel, DELIVERY_EXCHANGE).await {
        return refused(&format!("declare exchange {DELIVERY_EXCHANGE:?}"), err).map(Err);
    }
    bind_exchange(
        channel,
        DELIVERY_EXCHANGE,
        &level_name(0),
        &level_pattern(0, '0'),
    )
    .await?;
    for spec in specs {
        if spec.exchange.is_empty() || matches!(spec.exchange_type.as_str(), "direct" | "") {
            continue;
        }
        let pattern = delivery_pattern(&spec.routing_key);
        bind_exchange(channel, &spec.exchange, DELIVERY_EXCHANGE, &pattern).await?;
        bind_queue(channel, &spec.name, &spec.exchange, &pattern).await?;
    }
    Ok(Ok(()))
}
