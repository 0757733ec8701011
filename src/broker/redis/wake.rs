//! Waiting for a push without taking anything.
//!
//! A blocking pop (`BRPOP`) hands a message to the consumer in its reply: between the
//! moment Redis sends it and the moment the consumer's `unacked` record lands, the
//! message is nowhere in Redis, and a worker killed then loses it. Redis has no
//! blocking command that moves from several lists atomically, so the consumer does not
//! pop while it waits: one waker per list blocks in `BLMOVE list list LEFT LEFT`, which
//! takes the list's head and puts it straight back (the list is unchanged, and other
//! consumers blocked on it, kombu's included, are still served). When a waker returns,
//! the fetcher runs its script again, which pops and records in one atomic step.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::connect;
use crate::broker::url::BrokerUrl;
use crate::retry::backoff;

/// How long one `BLMOVE` of a waker blocks before it asks again.
const WAKE_BLOCK_SECS: u64 = 5;

/// One waker task (and connection) per consumed list.
pub(super) struct Wakers {
    url: BrokerUrl,
    connect_timeout: Duration,
    /// Bumped each time the fetcher found every list empty and starts to wait.
    wanted: watch::Sender<u64>,
    /// The newest `wanted` value a waker answered (a list may have a message).
    woken: watch::Sender<u64>,
    running: HashMap<String, JoinHandle<()>>,
}

impl Wakers {
    pub(super) fn new(url: BrokerUrl, connect_timeout: Duration) -> Self {
        Self {
            url,
            connect_timeout,
            wanted: watch::channel(0).0,
            woken: watch::channel(0).0,
            running: HashMap::new(),
        }
    }

    /// Run one waker for each of `keys` and none for any other list.
    pub(super) fn follow(&mut self, keys: &[String]) {
        self.running.retain(|key, task| {
            let keep = keys.contains(key);
            if !keep {
                // Its connection closes with it; a BLMOVE it left blocked took nothing.
                task.abort();
            }
            keep
        });
        for key in keys {
            if !self.running.contains_key(key) {
                let task = tokio::spawn(wake_on(
                    key.clone(),
                    self.url.clone(),
                    self.connect_timeout,
                    self.wanted.subscribe(),
                    self.woken.clone(),
                ));
                self.running.insert(key.clone(), task);
            }
        }
    }

    /// Called after the fetch script found every list empty: wait until a list may
    /// have a message, `interrupt` is notified, or `limit` passes. A push after that
    /// script always wakes it (a waker blocked since earlier sees it, any other one
    /// blocks after this call and finds the list non-empty).
    pub(super) async fn wait(&self, limit: Duration, interrupt: &Notify) {
        let mut epoch = 0;
        self.wanted.send_modify(|wanted| {
            *wanted += 1;
            epoch = *wanted;
        });
        let mut woken = self.woken.subscribe();
        tokio::select! {
            _ = woken.wait_for(|answered| *answered >= epoch) => {}
            () = interrupt.notified() => {}
            () = tokio::time::sleep(limit) => {}
        }
    }
}

impl Drop for Wakers {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// Block on `key` whenever the fetcher waits for a wait it has not answered; answer
/// when the list has a message. Errors are retried on a fresh connection (the
/// fetcher's own script reports a broker that is down).
async fn wake_on(
    key: String,
    url: BrokerUrl,
    connect_timeout: Duration,
    mut wanted: watch::Receiver<u64>,
    woken: watch::Sender<u64>,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut answered = 0u64;
    let mut failures = 0u32;
    loop {
        // Idle while the fetcher is busy: a non-empty list would answer at once, over
        // and over.
        if wanted.wait_for(|wanted| *wanted > answered).await.is_err() {
            return;
        }
        let blocked = match conn.as_mut() {
            Some(blocked) => blocked,
            None => match connect(&url, connect_timeout, None).await {
                Ok(fresh) => conn.insert(fresh),
                Err(_) => {
                    tokio::time::sleep(backoff(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            },
        };
        let moved: redis::RedisResult<Option<redis::Value>> = redis::cmd("BLMOVE")
            .arg(&key)
            .arg(&key)
            .arg("LEFT")
            .arg("LEFT")
            .arg(WAKE_BLOCK_SECS)
            .query_async(blocked)
            .await;
        match moved {
            Ok(Some(_)) => {
                crate::trace::hop("consume.woken");
                failures = 0;
                answered = *wanted.borrow_and_update();
                woken.send_modify(|newest| *newest = (*newest).max(answered));
            }
            Ok(None) => failures = 0, // timed out: block again if still wanted
            Err(_) => {
                conn = None;
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
            }
        }
    }
}
