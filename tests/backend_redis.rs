//! The Redis result store against the real Redis on 127.0.0.1:6379 (database 0).
//! Every test uses its own task ids (or key prefix) and deletes its keys.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use _core::backend::redis::{PendingPart, RedisBackend, RedisBackendOptions};
use _core::error::Error;

const URL: &str = "redis://127.0.0.1:6379/0";

fn backend() -> RedisBackend {
    RedisBackend::connect(URL, RedisBackendOptions::default()).expect("Redis on 127.0.0.1:6379")
}

fn redis() -> redis::Connection {
    redis::Client::open(URL)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(4)))
        .expect("Redis on 127.0.0.1:6379")
}

fn unique(tag: &str) -> String {
    format!("celeriac-test-{tag}-{}", uuid::Uuid::new_v4())
}

fn meta(id: &str, status: &str, result: i64) -> Vec<u8> {
    format!(
        r#"{{"status": "{status}", "result": {result}, "traceback": null, "children": [], "date_done": null, "task_id": "{id}"}}"#
    )
    .into_bytes()
}

/// Deletes the keys when the test ends, whatever happens.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut conn = redis();
        for chunk in self.0.chunks(1000) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

/// `(id, subscriptions, last command)` of the clients of `kind` (`normal`, `pubsub`).
fn clients(kind: &str) -> HashSet<(String, usize, String)> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg(kind)
        .query(&mut redis())
        .expect("CLIENT LIST");
    list.lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            Some((field("id")?, field("sub")?.parse().ok()?, field("cmd")?))
        })
        .collect()
}

fn new_clients(
    kind: &str,
    before: &HashSet<(String, usize, String)>,
) -> Vec<(String, usize, String)> {
    let known: HashSet<&String> = before.iter().map(|(id, _, _)| id).collect();
    clients(kind)
        .into_iter()
        .filter(|(id, _, _)| !known.contains(id))
        .collect()
}

fn kill_client(id: &str) {
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut redis())
        .expect("CLIENT KILL");
}

#[test]
fn store_then_get() {
    let backend = backend();
    let id = unique("get");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    assert_eq!(backend.get(&id).unwrap(), None);
    backend.store(&id, meta(&id, "SUCCESS", 5)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(backend.get(&id).unwrap(), Some(meta(&id, "SUCCESS", 5)));
    let ttl: i64 = redis::cmd("TTL")
        .arg(backend.key_for(&id))
        .query(&mut redis())
        .unwrap();
    assert!((86_000..=86_400).contains(&ttl), "{ttl}");
    assert_eq!(backend.key_for(&id), format!("celery-task-meta-{id}"));
}

#[test]
fn no_expiry_means_plain_set_and_prefixes_apply() {
    let options = RedisBackendOptions {
        expires: None,
        key_prefix: "my-meta-".to_owned(),
        global_keyprefix: Some("celeriac-test".to_owned()),
        ..Default::default()
    };
    let backend = RedisBackend::connect(URL, options).unwrap();
    let id = unique("set");
    let key = format!("celeriac-test_my-meta-{id}");
    assert_eq!(backend.key_for(&id), key);
    let _cleanup = Cleanup(vec![key.clone()]);
    backend.store(&id, meta(&id, "SUCCESS", 1)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut redis()).unwrap();
    assert_eq!(ttl, -1);
    let raw: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut redis()).unwrap();
    assert_eq!(raw, Some(meta(&id, "SUCCESS", 1)));
}

#[test]
fn forget_deletes() {
    let backend = backend();
    let id = unique("forget");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    backend.store(&id, meta(&id, "SUCCESS", 1)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert!(backend.get(&id).unwrap().is_some());
    backend.forget(&id).unwrap();
    assert_eq!(backend.get(&id).unwrap(), None);
}

#[test]
fn wait_returns_a_result_stored_before() {
    let backend = backend();
    let id = unique("before");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    backend.store(&id, meta(&id, "FAILURE", 2)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(
        backend.wait(&id, Some(deadline)).unwrap(),
        meta(&id, "FAILURE", 2)
    );
}

#[test]
fn wait_returns_after_a_later_store_and_skips_unready_states() {
    let backend = Arc::new(backend());
    let id = unique("later");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    // Already stored and not ready: read, then skipped.
    backend.store(&id, meta(&id, "STARTED", 0)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let writer = {
        let (backend, id) = (Arc::clone(&backend), id.clone());
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            backend.store(&id, meta(&id, "RETRY", 1)).unwrap();
            backend.flush(Duration::from_secs(5)).unwrap();
            thread::sleep(Duration::from_millis(300));
            backend.store(&id, meta(&id, "SUCCESS", 3)).unwrap();
            backend.flush(Duration::from_secs(5)).unwrap();
        })
    };
    let started = Instant::now();
    let got = backend
        .wait(&id, Some(Instant::now() + Duration::from_secs(10)))
        .unwrap();
    assert_eq!(got, meta(&id, "SUCCESS", 3));
    assert!(started.elapsed() >= Duration::from_millis(500));
    writer.join().unwrap();
}

#[test]
fn wait_times_out() {
    let backend = backend();
    let id = unique("timeout");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    backend.store(&id, meta(&id, "STARTED", 0)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    let err = backend
        .wait(&id, Some(Instant::now() + Duration::from_millis(300)))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert_eq!(err.to_string(), "The operation timed out.");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn a_waiter_can_be_polled_in_slices() {
    let backend = backend();
    let id = unique("slices");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    let mut waiter = backend.watch(&id).unwrap();
    for _ in 0..3 {
        let slice = Instant::now() + Duration::from_millis(50);
        assert_eq!(waiter.wait_until(slice).unwrap(), None);
    }
    backend.store(&id, meta(&id, "REVOKED", 0)).unwrap();
    let mut got = None;
    for _ in 0..100 {
        got = waiter
            .wait_until(Instant::now() + Duration::from_millis(50))
            .unwrap();
        if got.is_some() {
            break;
        }
    }
    assert_eq!(got, Some(meta(&id, "REVOKED", 0)));
}

#[test]
fn many_waiters_share_one_pubsub_connection() {
    const TASKS: usize = 200;
    let before = clients("pubsub");
    let backend = Arc::new(backend());
    let ids: Vec<String> = (0..TASKS).map(|_| unique("many")).collect();
    let _cleanup = Cleanup(ids.iter().map(|id| backend.key_for(id)).collect());
    // Two waiters per task: 400 waiters, 200 channels.
    let waiters: Vec<_> = ids
        .iter()
        .chain(ids.iter())
        .map(|id| {
            let (backend, id) = (Arc::clone(&backend), id.clone());
            thread::spawn(move || {
                let got = backend.wait(&id, Some(Instant::now() + Duration::from_secs(30)));
                (id, got)
            })
        })
        .collect();
    // Every channel subscribed once, all on one new pub/sub connection.
    let channels: Vec<String> = ids.iter().map(|id| backend.key_for(id)).collect();
    let mut subscribed = false;
    for _ in 0..200 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channels)
            .query(&mut redis())
            .unwrap();
        if counts.iter().all(|(_, n)| *n == 1) {
            subscribed = true;
            break;
        }
        assert!(counts.iter().all(|(_, n)| *n <= 1), "{counts:?}");
        thread::sleep(Duration::from_millis(25));
    }
    assert!(subscribed, "not every channel got subscribed");
    let ours = new_clients("pubsub", &before);
    assert!(ours.iter().any(|(_, sub, _)| *sub == TASKS), "{ours:?}");

    for id in &ids {
        backend.store(id, meta(id, "SUCCESS", 7)).unwrap();
    }
    for waiter in waiters {
        let (id, got) = waiter.join().unwrap();
        assert_eq!(got.unwrap(), meta(&id, "SUCCESS", 7));
    }
    // The last waiter of a channel unsubscribes it.
    let mut left = usize::MAX;
    for _ in 0..200 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channels)
            .query(&mut redis())
            .unwrap();
        left = counts.iter().filter(|(_, n)| *n > 0).count();
        if left == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(left, 0, "channels still subscribed");
}

#[test]
fn ten_thousand_stores_then_flush() {
    const N: usize = 10_000;
    let backend = backend();
    let prefix = unique("batch");
    let ids: Vec<String> = (0..N).map(|i| format!("{prefix}-{i}")).collect();
    let keys: Vec<String> = ids.iter().map(|id| backend.key_for(id)).collect();
    let _cleanup = Cleanup(keys.clone());
    let started = Instant::now();
    for id in &ids {
        backend.store(id, meta(id, "SUCCESS", 1)).unwrap();
    }
    let queued = started.elapsed();
    backend.flush(Duration::from_secs(30)).unwrap();
    eprintln!(
        "{N} stores: queued in {queued:?}, written in {:?}",
        started.elapsed()
    );
    let mut conn = redis();
    let mut found = 0;
    for chunk in keys.chunks(1000) {
        let n: usize = redis::cmd("EXISTS").arg(chunk).query(&mut conn).unwrap();
        found += n;
    }
    assert_eq!(found, N);
    let last: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&keys[N - 1])
        .query(&mut conn)
        .unwrap();
    assert_eq!(last, Some(meta(&ids[N - 1], "SUCCESS", 1)));
}

#[test]
fn a_waiter_survives_a_lost_pubsub_connection() {
    let before = clients("pubsub");
    let backend = Arc::new(backend());
    // A distinctive number of channels identifies our pub/sub connection.
    const CHANNELS: usize = 17;
    let ids: Vec<String> = (0..CHANNELS).map(|_| unique("lost")).collect();
    let _cleanup = Cleanup(ids.iter().map(|id| backend.key_for(id)).collect());
    let mut waiters: Vec<_> = ids.iter().map(|id| backend.watch(id).unwrap()).collect();
    for waiter in &mut waiters {
        assert_eq!(
            waiter
                .wait_until(Instant::now() + Duration::from_millis(10))
                .unwrap(),
            None
        );
    }
    let mut ours = Vec::new();
    for _ in 0..200 {
        ours = new_clients("pubsub", &before)
            .into_iter()
            .filter(|(_, sub, _)| *sub == CHANNELS)
            .map(|(id, _, _)| id)
            .collect();
        if !ours.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(ours.len(), 1, "cannot find our pub/sub connection");
    // Written without a PUBLISH: only the re-read after the reconnect can find it.
    let _: () = redis::cmd("SET")
        .arg(backend.key_for(&ids[2]))
        .arg(meta(&ids[2], "SUCCESS", 3))
        .query(&mut redis())
        .unwrap();
    let quiet = waiters[2]
        .wait_until(Instant::now() + Duration::from_millis(100))
        .unwrap();
    assert_eq!(quiet, None);
    kill_client(&ours[0]);
    let got = waiters[2]
        .wait_until(Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(got, Some(meta(&ids[2], "SUCCESS", 3)));
    // Stored right away (possibly while reconnecting, so the PUBLISH may be missed):
    // the re-read after the reconnect finds it.
    backend.store(&ids[0], meta(&ids[0], "SUCCESS", 1)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let got = waiters[0]
        .wait_until(Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(got, Some(meta(&ids[0], "SUCCESS", 1)));
    // And the subscriptions are back: a later store is delivered too.
    thread::sleep(Duration::from_millis(200));
    backend.store(&ids[1], meta(&ids[1], "SUCCESS", 2)).unwrap();
    let got = waiters[1]
        .wait_until(Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(got, Some(meta(&ids[1], "SUCCESS", 2)));
}

#[test]
fn commands_survive_a_lost_connection() {
    let before = clients("normal");
    let backend = backend();
    let id = unique("cmdlost");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    backend.store(&id, meta(&id, "SUCCESS", 4)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert!(backend.get(&id).unwrap().is_some());
    // Ours: new since `before`, last command GET. Other tests running at the same time
    // could look the same; then nothing is killed rather than a stranger.
    let ours: Vec<String> = new_clients("normal", &before)
        .into_iter()
        .filter(|(_, _, cmd)| cmd == "get")
        .map(|(id, _, _)| id)
        .collect();
    if ours.len() == 1 {
        kill_client(&ours[0]);
    } else {
        eprintln!("cannot tell our command connection apart: {ours:?}; not killing");
    }
    assert_eq!(backend.get(&id).unwrap(), Some(meta(&id, "SUCCESS", 4)));
    backend.store(&id, meta(&id, "SUCCESS", 5)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(backend.get(&id).unwrap(), Some(meta(&id, "SUCCESS", 5)));
}

#[test]
fn unreachable_redis_fails_promptly_with_the_masked_url() {
    let started = Instant::now();
    let err = RedisBackend::connect(
        "redis://:secret@127.0.0.1:1/0",
        RedisBackendOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("redis://:**@127.0.0.1:1/0"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_closed_backend_refuses_work_and_ends_waits() {
    let backend = backend();
    let id = unique("closed");
    let _cleanup = Cleanup(vec![backend.key_for(&id)]);
    let mut waiter = backend.watch(&id).unwrap();
    assert_eq!(
        waiter
            .wait_until(Instant::now() + Duration::from_millis(50))
            .unwrap(),
        None
    );
    backend.store(&id, meta(&id, "STARTED", 0)).unwrap();
    backend.close().unwrap();
    // What was queued before close was written.
    let raw: Option<Vec<u8>> = redis::cmd("GET")
        .arg(backend.key_for(&id))
        .query(&mut redis())
        .unwrap();
    assert_eq!(raw, Some(meta(&id, "STARTED", 0)));
    let err = waiter
        .wait_until(Instant::now() + Duration::from_secs(5))
        .unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err:?}");
    assert!(matches!(
        backend.store(&id, meta(&id, "SUCCESS", 1)),
        Err(Error::Closed(_))
    ));
    assert!(matches!(backend.get(&id), Err(Error::Closed(_))));
    backend.close().unwrap();
}

/// The taskset store, a unique group id and the cleanup of its join keys.
fn chord_store(name: &str) -> (RedisBackend, String, Cleanup) {
    let store = RedisBackend::connect(
        URL,
        RedisBackendOptions {
            key_prefix: "celery-taskset-meta-".to_owned(),
            ..RedisBackendOptions::default()
        },
    )
    .expect("Redis on 127.0.0.1:6379");
    let group = unique(name);
    let cleanup = Cleanup(
        ["c", "j", "t", "s", "d"]
            .iter()
            .map(|suffix| format!("celery-taskset-meta-{group}.{suffix}"))
            .collect(),
    );
    (store, group, cleanup)
}

#[test]
fn chord_join_counts_each_part_once_and_claims_once() {
    let (store, group, _cleanup) = chord_store("chord");
    store.chord_set_size(&group, 2, 60).expect("set size");
    let part = |id: &str, index: i64, value: i64, token: &str| {
        let member = format!(r#"[1, "{id}", "SUCCESS", {value}]"#);
        store
            .chord_part_begin(&group, id, Some(index), member.as_bytes(), 60, 10, token)
            .and_then(PendingPart::wait)
            .expect("part")
    };
    // header index 1 ends first; the same part twice (a redelivery) counts once
    let first = part("b", 1, 20, "t1");
    assert_eq!((first.ready, first.total, first.claimed), (1, 2, false));
    assert_eq!(part("b", 1, 20, "t2").ready, 1);
    let last = part("a", 0, 10, "t3");
    assert_eq!((last.ready, last.total, last.claimed), (2, 2, true));
    // results in header order, not arrival order
    let results = store.chord_results(&group).expect("results");
    let texts: Vec<String> = results
        .iter()
        .map(|raw| String::from_utf8_lossy(raw).into_owned())
        .collect();
    assert_eq!(
        texts,
        [r#"[1, "a", "SUCCESS", 10]"#, r#"[1, "b", "SUCCESS", 20]"#]
    );
    assert!(!store
        .chord_claim_extend(&group, "someone-else", 20)
        .expect("extend"));
    assert!(store.chord_claim_extend(&group, "t3", 20).expect("extend"));
    assert!(store.chord_cleanup(&group, "t3", 300).expect("cleanup"));
    // a late duplicate after the body was sent changes nothing
    assert_eq!(part("a", 0, 10, "t4").ready, -1);
    let done: Option<String> = redis::cmd("GET")
        .arg(format!("celery-taskset-meta-{group}.c"))
        .query(&mut redis())
        .expect("GET");
    assert_eq!(done.as_deref(), Some("done"));
}

#[test]
fn chord_parts_begun_without_waiting_are_recorded_and_claimed_once() {
    let (store, group, _cleanup) = chord_store("chord-begin");
    store.chord_set_size(&group, 3, 60).expect("set size");
    let begin = |id: &str, index: i64, token: &str| {
        let member = format!(r#"[1, "{id}", "SUCCESS", {index}]"#);
        store
            .chord_part_begin(&group, id, Some(index), member.as_bytes(), 60, 10, token)
            .expect("begin")
    };
    // three parts in flight at once, none waited for yet
    let pending = [
        begin("a", 0, "t1"),
        begin("b", 1, "t2"),
        begin("c", 2, "t3"),
    ];
    // the scripts went out without `wait`: Redis has every part
    let jkey = format!("celery-taskset-meta-{group}.j");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recorded: i64 = redis::cmd("ZCARD")
            .arg(&jkey)
            .query(&mut redis())
            .expect("ZCARD");
        if recorded == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{recorded} of 3 parts recorded");
        std::thread::sleep(Duration::from_millis(10));
    }
    let parts: Vec<_> = pending
        .into_iter()
        .map(|part| part.wait().expect("reply"))
        .collect();
    // each part counted once, whatever order the runtime sent them in; one claims
    let mut counts: Vec<i64> = parts.iter().map(|part| part.ready).collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 2, 3]);
    let claims: Vec<_> = parts.iter().filter(|part| part.claimed).collect();
    assert_eq!(claims.len(), 1, "{parts:?}");
    assert_eq!((claims[0].ready, claims[0].total), (3, 3));
}
