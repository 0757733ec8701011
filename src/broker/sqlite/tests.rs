use super::*;

#[test]
fn claim_sql_is_valid_for_one_and_many_queues() {
    let dir = tempfile::tempdir().unwrap();
    let conn = open(&dir.path().join("x.db"), Duration::from_secs(1)).unwrap();
    let names: Vec<String> = ["a", "it's", "c"].map(String::from).to_vec();
    for queues in 1..4 {
        conn.prepare(&claim_sql(&names[..queues])).unwrap();
        conn.prepare(&probe_sql(&names[..queues])).unwrap();
    }
}

#[test]
fn options_follow_the_visibility_timeout() {
    let mut given = TransportOptions::default();
    given
        .extra
        .insert("visibility_timeout".into(), serde_json::json!(2));
    let options = SqliteOptions::from_transport(&given).unwrap();
    assert_eq!(options.visibility_timeout, Duration::from_secs(2));
    assert_eq!(options.restore_interval, Duration::from_millis(500));
    let options = SqliteOptions::from_transport(&TransportOptions::default()).unwrap();
    assert_eq!(options.restore_interval, Duration::from_secs(10));
    given
        .extra
        .insert("polling_interval".into(), serde_json::json!("x"));
    assert!(SqliteOptions::from_transport(&given).is_err());
}

#[test]
fn topic_patterns_follow_amqp() {
    assert!(topic_matches("#", "a.b"));
    assert!(topic_matches("task.*", "task.multi"));
    assert!(!topic_matches("task.*", "task.multi.x"));
    assert!(topic_matches("task.#", "task"));
    assert!(topic_matches("*.heartbeat", "worker.heartbeat"));
    assert!(!topic_matches("worker.*", "task.multi"));
}

#[test]
fn signal_wakes_a_waiter() {
    let signal = Arc::new(Signal::default());
    let seen = signal.generation();
    assert!(!signal.wait(seen, Duration::from_millis(5)));
    let other = signal.clone();
    let thread = std::thread::spawn(move || other.notify());
    assert!(signal.wait(seen, Duration::from_secs(5)));
    thread.join().unwrap();
}

#[test]
fn wake_listener_forwards_datagrams() {
    let signal = Arc::new(Signal::default());
    let listener = WakeListener::start(signal.clone()).expect("loopback UDP");
    let seen = signal.generation();
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket
        .send_to(WAKE_MAGIC, (Ipv4Addr::LOCALHOST, listener.port()))
        .unwrap();
    assert!(signal.wait(seen, Duration::from_secs(5)));
}
