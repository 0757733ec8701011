//! Beat's shared state on the real stores: of beats that race to claim one run,
//! exactly one wins, on Redis and on a SQLite file, in threads and in connections of
//! their own (as separate processes would be).

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use _core::backend::beat::{BeatStore, Claim};
use _core::error::Error;

const TIMEOUT: Duration = Duration::from_secs(4);

fn namespace() -> String {
    format!("beat-test-{}", uuid::Uuid::new_v4().simple())
}

fn redis_store(namespace: &str) -> BeatStore {
    BeatStore::connect(
        common::REDIS_URL,
        namespace,
        None,
        TIMEOUT,
        Default::default(),
    )
    .unwrap()
}

/// `contenders` stores on one schedule race to claim the run after `seen`.
fn race(stores: Vec<BeatStore>, seen: i64) -> Vec<(i64, Claim)> {
    let barrier = Arc::new(Barrier::new(stores.len()));
    let handles: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(index, store)| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let run = seen + 1 + index as i64;
                barrier.wait();
                (run, store.claim("entry", seen, run).unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check_one_winner(outcomes: &[(i64, Claim)]) -> i64 {
    let winners: Vec<i64> = outcomes
        .iter()
        .filter(|(_, claim)| *claim == Claim::Won)
        .map(|(run, _)| *run)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    for (_, claim) in outcomes {
        assert!(matches!(claim, Claim::Won) || *claim == Claim::Lost(Some(winners[0])));
    }
    winners[0]
}

fn lifecycle(open: impl Fn() -> BeatStore) {
    let first = open();
    let names = vec!["entry".to_owned(), "other".to_owned()];
    assert_eq!(first.register(&names, 100).unwrap(), vec![100, 100]);
    // A second beat keeps what the first stored.
    assert_eq!(open().register(&names, 200).unwrap(), vec![100, 100]);
    let winner = check_one_winner(&race((0..8).map(|_| open()).collect(), 100));
    // A claim from a stale view loses and learns the stored run.
    assert_eq!(
        first.claim("entry", 100, 999).unwrap(),
        Claim::Lost(Some(winner))
    );
    assert_eq!(first.claim("entry", winner, 1000).unwrap(), Claim::Won);
    assert_eq!(
        first.prune(&["entry".to_owned()]).unwrap(),
        vec!["other".to_owned()]
    );
    assert_eq!(first.entries().unwrap(), vec![("entry".to_owned(), 1000)]);
    assert_eq!(first.claim("other", 100, 101).unwrap(), Claim::Lost(None));
    // Several claims at once answer in order, each seeing the ones before it.
    let batch = [
        ("entry".to_owned(), 1000, 1001),
        ("entry".to_owned(), 1000, 1002),
        ("gone".to_owned(), 1, 2),
    ];
    assert_eq!(
        first.claim_many(&batch).unwrap(),
        vec![Claim::Won, Claim::Lost(Some(1001)), Claim::Lost(None)]
    );
    // More claims than one script call takes.
    let many: Vec<String> = (0..1234).map(|n| format!("many-{n}")).collect();
    first.register(&many, 7).unwrap();
    let claims: Vec<(String, i64, i64)> = many.iter().map(|name| (name.clone(), 7, 8)).collect();
    let answers = first.claim_many(&claims).unwrap();
    assert_eq!(answers.len(), 1234);
    assert!(answers.iter().all(|claim| *claim == Claim::Won));
    first.prune(&[]).unwrap();
}

#[test]
fn redis_claims_have_one_winner() {
    let namespace = namespace();
    lifecycle(|| redis_store(&namespace));
}

#[test]
fn sqlite_claims_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("beat.db").display());
    lifecycle(|| BeatStore::connect(&url, "schedule", None, TIMEOUT, Default::default()).unwrap());
}

#[test]
fn a_store_that_is_down_is_a_connection_error() {
    let err = BeatStore::connect(
        "redis://127.0.0.1:7713/0",
        "x",
        None,
        TIMEOUT,
        Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err}");
    assert!(err.to_string().contains("127.0.0.1:7713"), "{err}");
    let err = BeatStore::connect(
        "amqp://guest@127.0.0.1//",
        "x",
        None,
        TIMEOUT,
        Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl(_)), "{err}");
}
