//! The Redis result store's dispatcher task: one pub/sub connection shared by every
//! waiter of the store (see the documentation of `backend::redis`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::Msg;
use tokio::sync::{mpsc, oneshot};

use super::connection::Shared;
use super::{
    FIRST_RETRY, GIVE_UP_AFTER, MAX_COMMANDS, MAX_RETRY, RESPONSE_TIMEOUT, UNSUBSCRIBE_BATCH,
    UNSUBSCRIBE_DELAY,
};

pub(super) enum Command {
    Subscribe {
        channel: String,
        id: u64,
        events: mpsc::UnboundedSender<Event>,
        ready: oneshot::Sender<Result<Subscribed, String>>,
    },
    Unsubscribe {
        channel: String,
        id: u64,
    },
    Close,
}

/// A confirmed subscription, with the key as read right after it (when the read
/// worked): the dispatcher reads the keys of a batch of new waiters in one MGET, so a
/// waiter is not woken twice (once to read, once for the reply).
pub(super) enum Subscribed {
    Read(Option<Vec<u8>>),
    Unread,
}

pub(super) enum Event {
    /// A meta document published (or re-read after a reconnect) for the channel.
    Meta(Vec<u8>),
    /// The pub/sub connection is gone for good.
    Failed(String),
}

pub(super) type Waiters = HashMap<u64, mpsc::UnboundedSender<Event>>;

pub(super) struct Dispatcher {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Invariant between batches: when connected, the subscribed channels are exactly
    /// these keys and `stale`.
    channels: HashMap<String, Waiters>,
    /// Channels without waiters, still subscribed: unsubscribed at `unsubscribe_at`
    /// (their messages are dropped meanwhile). Empty while disconnected.
    stale: HashSet<String>,
    unsubscribe_at: Option<tokio::time::Instant>,
    sink: Option<PubSubSink>,
    stream: Option<PubSubStream>,
    ever_connected: bool,
    /// While disconnected with waiters: when the connection was lost, next attempt.
    down_since: Option<Instant>,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

impl Dispatcher {
    pub(super) fn new(shared: Arc<Shared>, commands: mpsc::UnboundedReceiver<Command>) -> Self {
        Self {
            shared,
            commands,
            channels: HashMap::new(),
            stale: HashSet::new(),
            unsubscribe_at: None,
            sink: None,
            stream: None,
            ever_connected: false,
            down_since: None,
            retry_at: None,
            retry_delay: FIRST_RETRY,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    let mut batch = vec![command];
                    while batch.len() < MAX_COMMANDS {
                        match self.commands.try_recv() {
                            Ok(command) => batch.push(command),
                            Err(_) => break,
                        }
                    }
                    if !self.handle(batch).await {
                        break;
                    }
                }
                message = next_message(self.stream.as_mut()) => match message {
                    Some(message) => self.deliver(&message),
                    None => self.disconnected(),
                },
                () = sleep_until(self.retry_at) => self.retry().await,
                () = sleep_until(self.unsubscribe_at) => self.unsubscribe_stale().await,
            }
        }
        // Dropping the waiters' senders ends their waits with `Error::Closed`.
    }

    /// Apply a batch of commands with one SUBSCRIBE at most; channels left without
    /// waiters are unsubscribed later (`unsubscribe_stale`). Returns false on `Close`.
    async fn handle(&mut self, batch: Vec<Command>) -> bool {
        let mut subscribe: HashSet<String> = HashSet::new();
        let mut acks = Vec::new();
        let mut open = true;
        for command in batch {
            match command {
                Command::Subscribe {
                    channel,
                    id,
                    events,
                    ready,
                } => {
                    let waiters = self.channels.entry(channel.clone()).or_default();
                    if waiters.is_empty() && !self.stale.remove(&channel) {
                        subscribe.insert(channel.clone());
                    }
                    waiters.insert(id, events);
                    acks.push((channel, ready));
                }
                Command::Unsubscribe { channel, id } => {
                    let Some(waiters) = self.channels.get_mut(&channel) else {
                        continue;
                    };
                    waiters.remove(&id);
                    if waiters.is_empty() {
                        self.channels.remove(&channel);
                        if !subscribe.remove(&channel) && self.sink.is_some() {
                            self.stale.insert(channel);
                        }
                    }
                }
                Command::Close => {
                    open = false;
                    break;
                }
            }
        }
        if !open {
            return false;
        }
        let mut outcome = Ok(());
        if self.sink.is_some() {
            if let Err(text) = self.change_subscriptions(HashSet::new(), subscribe).await {
                self.disconnected();
                outcome = Err(text);
            }
        }
        if self.sink.is_none() && !acks.is_empty() {
            // A new waiter gets one immediate attempt, and an error if it fails.
            outcome = self.reconnect().await;
        }
        let mut values: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        if outcome.is_ok() && !acks.is_empty() {
            let keys: Vec<String> = acks
                .iter()
                .map(|(channel, _)| channel.clone())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let read = self.shared.run(|mut conn| {
                let keys = keys.clone();
                async move {
                    redis::cmd("MGET")
                        .arg(keys)
                        .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                        .await
                }
            });
            // On failure (or no answer) each waiter reads its key itself.
            if let Ok(Ok(read)) = tokio::time::timeout(RESPONSE_TIMEOUT, read).await {
                if read.len() == keys.len() {
                    values = keys.into_iter().zip(read).collect();
                }
            }
        }
        crate::trace::hop("result.subscribed");
        for (channel, ready) in acks {
            let subscribed = outcome.clone().map(|()| match values.get(&channel) {
                Some(value) => Subscribed::Read(value.clone()),
                None => Subscribed::Unread,
            });
            // The waiter may have gone away already.
            let _ = ready.send(subscribed);
        }
        if self.stale.len() >= UNSUBSCRIBE_BATCH {
            self.unsubscribe_stale().await;
        } else if !self.stale.is_empty() && self.unsubscribe_at.is_none() {
            self.unsubscribe_at = Some(tokio::time::Instant::now() + UNSUBSCRIBE_DELAY);
        }
        true
    }

    /// UNSUBSCRIBE the channels left without waiters.
    async fn unsubscribe_stale(&mut self) {
        self.unsubscribe_at = None;
        let stale = std::mem::take(&mut self.stale);
        if stale.is_empty() || self.sink.is_none() {
            return;
        }
        if self
            .change_subscriptions(stale, HashSet::new())
            .await
            .is_err()
        {
            self.disconnected();
        }
    }

    async fn change_subscriptions(
        &mut self,
        unsubscribe: HashSet<String>,
        subscribe: HashSet<String>,
    ) -> Result<(), String> {
        let Some(sink) = self.sink.as_mut() else {
            return Err("not connected".to_owned());
        };
        let limit = self.shared.connect_timeout.max(RESPONSE_TIMEOUT);
        for (channels, on) in [(unsubscribe, false), (subscribe, true)] {
            if channels.is_empty() {
                continue;
            }
            let channels: Vec<String> = channels.into_iter().collect();
            let request = async {
                if on {
                    sink.subscribe(&channels).await
                } else {
                    sink.unsubscribe(&channels).await
                }
            };
            match tokio::time::timeout(limit, request).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(self.shared.lost(&err).to_string()),
                Err(_) => {
                    return Err(format!(
                        "the result backend {} did not answer within {limit:?}",
                        self.shared.masked
                    ))
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, message: &Msg) {
        crate::trace::hop("result.published");
        if let Some(waiters) = self.channels.get(message.get_channel_name()) {
            for events in waiters.values() {
                let _ = events.send(Event::Meta(message.get_payload_bytes().to_vec()));
            }
        }
    }

    fn disconnected(&mut self) {
        self.sink = None;
        self.stream = None;
        // A new connection starts with no subscription.
        self.stale.clear();
        self.unsubscribe_at = None;
        if !self.channels.is_empty() {
            self.down_since.get_or_insert_with(Instant::now);
            self.retry_at = Some(tokio::time::Instant::now());
        }
    }

    async fn retry(&mut self) {
        self.retry_at = None;
        if self.sink.is_some() || self.channels.is_empty() {
            self.down_since = None;
            return;
        }
        let Err(text) = self.reconnect().await else {
            return;
        };
        let down_for = self
            .down_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        if down_for >= GIVE_UP_AFTER.max(self.shared.connect_timeout) {
            for (_, waiters) in self.channels.drain() {
                for events in waiters.values() {
                    let _ = events.send(Event::Failed(text.clone()));
                }
            }
            self.down_since = None;
            self.retry_delay = FIRST_RETRY;
        } else {
            self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
            self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
        }
    }

    /// Open the pub/sub connection and subscribe every watched channel. After a lost
    /// connection, re-read the watched keys in the background.
    async fn reconnect(&mut self) -> Result<(), String> {
        let limit = self.shared.connect_timeout;
        let client = self.shared.client().await.map_err(|err| err.to_string())?;
        let pubsub = match tokio::time::timeout(limit, client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => return Err(self.shared.cannot_connect(&client, err).to_string()),
            Err(_) => {
                return Err(self
                    .shared
                    .cannot_connect(&client, format!("no answer within {limit:?}"))
                    .to_string())
            }
        };
        let (sink, stream) = pubsub.split();
        self.stale.clear();
        self.unsubscribe_at = None;
        self.sink = Some(sink);
        self.stream = Some(stream);
        let channels: HashSet<String> = self.channels.keys().cloned().collect();
        if let Err(text) = self.change_subscriptions(HashSet::new(), channels).await {
            self.sink = None;
            self.stream = None;
            return Err(text);
        }
        self.down_since = None;
        self.retry_at = None;
        self.retry_delay = FIRST_RETRY;
        if std::mem::replace(&mut self.ever_connected, true) && !self.channels.is_empty() {
            tokio::spawn(reread(Arc::clone(&self.shared), self.channels.clone()));
        }
        Ok(())
    }
}

/// After a reconnect: hand every watched key's current value to its waiters, since
/// its PUBLISH may have been missed.
async fn reread(shared: Arc<Shared>, channels: HashMap<String, Waiters>) {
    let keys: Vec<&String> = channels.keys().collect();
    let values = shared
        .run(|mut conn| {
            let keys = keys.clone();
            async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            }
        })
        .await;
    // On failure the waiters keep waiting; the dispatcher sees the broken connection.
    let Ok(values) = values else { return };
    for (key, value) in keys.into_iter().zip(values) {
        let (Some(value), Some(waiters)) = (value, channels.get(key)) else {
            continue;
        };
        for events in waiters.values() {
            let _ = events.send(Event::Meta(value.clone()));
        }
    }
}

async fn next_message(stream: Option<&mut PubSubStream>) -> Option<Msg> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
