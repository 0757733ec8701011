//! Topology: declaring queues, exchanges and bindings as Celery does, and telling a refusal from a lost connection.

use super::*;

/// Why a declaration failed, when it was the broker refusing it (the channel is closed
/// then, the connection is fine).
pub(super) fn channel_refusal(err: &lapin::Error) -> Option<AMQPSoftError> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Declare one queue, its exchange and the binding, with exactly these flags. A
/// refusal (406 PRECONDITION_FAILED: the queue exists with other flags) is returned as
/// `Ok(Err(text))`: the caller opens a new channel and checks the queue passively.
pub(super) async fn declare_queue(
    channel: &Channel,
    spec: &QueueSpec,
) -> Result<std::result::Result<(), (AMQPSoftError, String)>, lapin::Error> {
    let queue_name = short("queue name", &spec.name).map_err(|e| lapin_other(&e))?;
    let arguments = json_to_field_table(&spec.arguments).map_err(|e| lapin_other(&e))?;
    let declared = channel
        .queue_declare(
            queue_name.clone(),
            QueueDeclareOptions {
                passive: false,
                durable: spec.durable,
                exclusive: spec.exclusive,
                auto_delete: spec.auto_delete,
                nowait: false,
            },
            arguments,
        )
        .await;
    if let Err(err) = declared {
        return refusal_or_error(err);
    }
    if spec.exchange.is_empty() {
        return Ok(Ok(()));
    }
    let exchange = short("exchange name", &spec.exchange).map_err(|e| lapin_other(&e))?;
    let declared = channel
        .exchange_declare(
            exchange.clone(),
            exchange_kind(&spec.exchange_type),
            ExchangeDeclareOptions {
                passive: false,
                durable: spec.exchange_durable,
                auto_delete: spec.exchange_auto_delete,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await;
    if let Err(err) = declared {
        return refusal_or_error(err);
    }
    let routing_key = short("routing key", &spec.routing_key).map_err(|e| lapin_other(&e))?;
    let bound = channel
        .queue_bind(
            queue_name,
            exchange,
            routing_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    match bound {
        Ok(()) => Ok(Ok(())),
        Err(err) => refusal_or_error(err),
    }
}

pub(super) fn refusal_or_error(
    err: lapin::Error,
) -> Result<std::result::Result<(), (AMQPSoftError, String)>, lapin::Error> {
    match channel_refusal(&err) {
        Some(code) => Ok(Err((code, err.to_string()))),
        None => Err(err),
    }
}

pub(super) fn lapin_other(err: &Error) -> lapin::Error {
    lapin::Error::from(std::io::Error::other(err.to_string()))
}

/// `basic.consume` of `spec`'s queue under a new consumer tag: the tag (to cancel it)
/// and its deliveries, each paired with the queue's name.
pub(super) async fn consume(
    channel: &Channel,
    spec: &QueueSpec,
) -> Result<(ShortString, DeliveryStream), lapin::Error> {
    let tag = ShortString::from(format!(
        "celeriac-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let consumer = channel
        .basic_consume(
            short("queue name", &spec.name).map_err(|e| lapin_other(&e))?,
            tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue: Arc<str> = Arc::from(spec.name.as_str());
    let tagged: DeliveryStream = Box::pin(consumer.map(move |delivery| (queue.clone(), delivery)));
    Ok((tag, tagged))
}

pub(super) async fn queue_exists(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let Ok(name) = ShortString::try_new(name) else {
        return Ok(false);
    };
    match channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(err) if channel_refusal(&err).is_some() => Ok(false),
        Err(err) => Err(err),
    }
}

pub(super) async fn exchange_exists(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let Ok(name) = ShortString::try_new(name) else {
        return Ok(false);
    };
    match channel
        .exchange_declare(
            name,
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Ok(true),
        Err(err) if channel_refusal(&err).is_some() => Ok(false),
        Err(err) => Err(err),
    }
}

/// The error for a declaration refused because the queue exists with other
/// arguments than `spec`'s (RabbitMQ: `PRECONDITION_FAILED - inequivalent arg
/// 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type
/// 'longstr' but current is none`). None for any other refusal (a flag such as `durable`).
pub(super) fn argument_conflict(
    spec: &QueueSpec,
    code: &AMQPSoftError,
    text: &str,
) -> Option<Error> {
    if *code != AMQPSoftError::PRECONDITIONFAILED {
        return None;
    }
    let start = text.find("inequivalent arg '")?;
    let said = &text[start..];
    let argument = said
        .trim_start_matches("inequivalent arg '")
        .split('\'')
        .next()
        .unwrap_or_default();
    if !argument.starts_with("x-") {
        return None;
    }
    Some(Error::Config(format!(
        "queue {:?} exists with another {argument} than this declaration asks for \
         (declared with arguments {}); RabbitMQ refused it: PRECONDITION_FAILED - {said}. \
         Declare the queue as it exists (task_queues / queue_arguments) or delete it first",
        spec.name,
        serde_json::Value::Object(spec.arguments.clone()),
    )))
}

/// A declaration channel that survives the broker refusing a declaration: each
/// refusal closes the channel, so a fresh one is opened for the next step.
pub(super) struct Declarer {
    pub(super) channel: Option<Channel>,
}

impl Declarer {
    pub(super) fn new() -> Self {
        Self { channel: None }
    }

    pub(super) async fn channel(&mut self, conn: &Connection) -> Result<&Channel, lapin::Error> {
        let usable = self
            .channel
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !usable {
            self.channel = Some(conn.create_channel().await?);
        }
        match self.channel.as_ref() {
            Some(channel) => Ok(channel),
            None => Err(lapin_other(&Error::Closed("the declaration channel"))),
        }
    }

    /// Declare `spec`; when the broker refuses because the queue exists with other
    /// flags (durable, auto-delete: as a peer of another Celery version declared it)
    /// fall back to using the existing queue and return a warning. When it exists
    /// with other arguments (`x-queue-type`, `x-max-priority`, ...), the inner error
    /// says so in RabbitMQ's words: a setting that is not honoured is an error.
    pub(super) async fn declare(
        &mut self,
        conn: &Connection,
        spec: &QueueSpec,
    ) -> Result<Result<Option<String>, Error>, lapin::Error> {
        let outcome = declare_queue(self.channel(conn).await?, spec).await?;
        let Err((code, text)) = outcome else {
            return Ok(Ok(None));
        };
        if let Some(conflict) = argument_conflict(spec, &code, &text) {
            return Ok(Err(conflict));
        }
        let exists = queue_exists(self.channel(conn).await?, &spec.name).await?;
        Ok(Ok(Some(if exists {
            format!(
                "queue {:?} exists with other settings than ours ({code:?}: {text}); using it as it is",
                spec.name
            )
        } else {
            format!("cannot declare queue {:?}: {code:?}: {text}", spec.name)
        })))
    }

    pub(super) async fn exchange_exists(
        &mut self,
        conn: &Connection,
        name: &str,
    ) -> Result<bool, lapin::Error> {
        exchange_exists(self.channel(conn).await?, name).await
    }
}

/// Declare `spec` (queue, exchange, binding) with its exact flags on a channel of its
/// own; when the broker refuses (the queue exists with other flags) the existing
/// queue is used as it is and a warning returned.
pub async fn declare(
    conn: &Connection,
    spec: &QueueSpec,
) -> Result<Result<Option<String>, Error>, lapin::Error> {
    let mut declarer = Declarer::new();
    let warning = declarer.declare(conn, spec).await?;
    if let Some(channel) = declarer.channel.take() {
        let _ = channel.close(200, ShortString::from("OK")).await;
    }
    Ok(warning)
}
