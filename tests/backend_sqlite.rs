//! The SQLite result store against real files in temporary directories.

use std::path::Path;
use std::time::{Duration, Instant};

use _core::backend::sqlite::{SqliteBackend, SqliteBackendOptions};
use _core::backend::{Backend, BackendOptions};
use _core::error::Error;

fn url_for(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn meta(status: &str, result: i64) -> Vec<u8> {
    format!(r#"{{"status": "{status}", "result": {result}, "traceback": null, "children": []}}"#)
        .into_bytes()
}

fn store(path: &Path) -> SqliteBackend {
    SqliteBackend::connect(&url_for(path), SqliteBackendOptions::default()).unwrap()
}

#[test]
fn store_get_wait_forget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let backend = store(&path);
    assert_eq!(backend.get("t1").unwrap(), None);
    backend.store("t1", meta("SUCCESS", 8)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert_eq!(backend.get("t1").unwrap(), Some(meta("SUCCESS", 8)));
    let deadline = Some(Instant::now() + Duration::from_secs(5));
    assert_eq!(backend.wait("t1", deadline).unwrap(), meta("SUCCESS", 8));
    // A later store replaces the row.
    backend.store("t1", meta("FAILURE", 9)).unwrap();
    backend.forget("t2").unwrap();
    assert_eq!(backend.get("t1").unwrap(), Some(meta("FAILURE", 9)));
    backend.forget("t1").unwrap();
    assert_eq!(backend.get("t1").unwrap(), None);
    let mut waiter = backend.watch("t1").unwrap();
    backend.close().unwrap();
    assert!(matches!(backend.get("t1"), Err(Error::Closed(_))));
    assert!(matches!(
        waiter.wait_until(Instant::now() + Duration::from_secs(1)),
        Err(Error::Closed(_))
    ));
    backend.close().unwrap();
}

#[test]
fn wait_skips_states_that_are_not_ready_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let backend = store(&path);
    backend.store("t", meta("STARTED", 0)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    let err = backend
        .wait("t", Some(Instant::now() + Duration::from_millis(200)))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(30));
    let mut waiter = backend.watch("t").unwrap();
    assert_eq!(
        waiter
            .wait_until(Instant::now() + Duration::from_millis(50))
            .unwrap(),
        None
    );
    backend.store("t", meta("SUCCESS", 1)).unwrap();
    assert_eq!(
        waiter
            .wait_until(Instant::now() + Duration::from_secs(5))
            .unwrap(),
        Some(meta("SUCCESS", 1))
    );
}

#[test]
fn a_waiter_sees_a_result_written_by_another_store_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    // The client polls every 5 s at most: only a wake-up can make it prompt.
    let slow_polling = SqliteBackendOptions {
        polling_interval: Duration::from_secs(5),
        ..Default::default()
    };
    let client = SqliteBackend::connect(&url_for(&path), slow_polling).unwrap();
    let worker = store(&path);
    let waiting = std::thread::spawn(move || {
        client.wait("t", Some(Instant::now() + Duration::from_secs(10)))
    });
    // Long enough for the waiter to reach its longest pause. (How soon it wakes is a
    // benchmark's business, not a test's.)
    std::thread::sleep(Duration::from_millis(400));
    worker.store("t", meta("SUCCESS", 3)).unwrap();
    let got = waiting.join().unwrap();
    assert_eq!(got.unwrap(), meta("SUCCESS", 3));
}

#[test]
fn expired_results_are_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let options = SqliteBackendOptions {
        expires: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let backend = SqliteBackend::connect(&url_for(&path), options).unwrap();
    backend.store("t", meta("SUCCESS", 1)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    assert!(backend.get("t").unwrap().is_some());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(backend.get("t").unwrap(), None);
    // Results that never expire.
    let forever = SqliteBackendOptions {
        expires: None,
        ..Default::default()
    };
    let backend = SqliteBackend::connect(&url_for(&path), forever).unwrap();
    backend.store("u", meta("SUCCESS", 1)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let expires: Option<f64> = conn
        .query_row(
            "SELECT expires_at FROM results WHERE key = 'celery-task-meta-u'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(expires, None);
    // The expired row is purged by a writer (on its first batch).
    let purged: i64 = conn
        .query_row(
            "SELECT count(*) FROM results WHERE key = 'celery-task-meta-t'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(purged, 0);
}

#[test]
fn the_generic_backend_picks_sqlite_from_the_url_and_shares_the_broker_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("celeriac.sqlite3");
    let backend = Backend::connect(&url_for(&path), BackendOptions::default()).unwrap();
    assert!(matches!(backend, Backend::Sqlite(_)));
    assert_eq!(backend.masked_url(), url_for(&path));
    backend.store("t", meta("SUCCESS", 2)).unwrap();
    backend.flush(Duration::from_secs(5)).unwrap();
    let mut waiter = backend.watch("t").unwrap();
    assert!(waiter
        .wait_until(Instant::now() + Duration::from_secs(5))
        .unwrap()
        .is_some());
    // The broker opens the same file.
    let conn = _core::broker::sqlite::open(&path, Duration::from_secs(5)).unwrap();
    let messages: i64 = conn
        .query_row("SELECT count(*) FROM messages", [], |row| row.get(0))
        .unwrap();
    assert_eq!(messages, 0);
    backend.close().unwrap();
}

#[test]
fn bad_paths_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").join("r.db");
    let err = SqliteBackend::connect(&url_for(&missing), Default::default()).unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    assert!(err.to_string().contains(&missing.display().to_string()));
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let err = SqliteBackend::connect(&url_for(&junk), Default::default()).unwrap_err();
    assert!(err.to_string().contains("not a SQLite database"), "{err}");
    assert_eq!(std::fs::read(&junk).unwrap(), vec![7u8; 4096]);
    let err = SqliteBackend::connect("sqlite://", Default::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidUrl(_)), "{err:?}");
}
