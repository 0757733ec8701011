//! Wake-ups: in this process (a condition variable) and across processes (UDP).

use super::*;

/// A generation counter that waiting threads watch.
#[derive(Default)]
pub(crate) struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    pub(crate) fn generation(&self) -> u64 {
        *self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn notify(&self) {
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation = generation.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Wait until the generation is no longer `seen`, at most `timeout`. True when
    /// woken.
    pub(crate) fn wait(&self, seen: u64, timeout: Duration) -> bool {
        let guard = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |generation| *generation == seen)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard != seen
    }
}

/// What changed in a database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topic {
    Messages,
    Results,
    Broadcast,
}

pub(super) type Subscribers = Vec<(PathBuf, Topic, Weak<Signal>)>;

pub(super) fn local_subscribers() -> &'static Mutex<Subscribers> {
    static SUBSCRIBERS: OnceLock<Mutex<Subscribers>> = OnceLock::new();
    SUBSCRIBERS.get_or_init(|| Mutex::new(Vec::new()))
}

pub(super) fn key_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Have `signal` notified when this process changes `topic` in the file at `path`.
pub(crate) fn subscribe_local(path: &Path, topic: Topic, signal: &Arc<Signal>) {
    let mut subscribers = local_subscribers()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    subscribers.retain(|(_, _, weak)| weak.strong_count() > 0);
    subscribers.push((key_path(path), topic, Arc::downgrade(signal)));
}

pub(crate) fn notify_local(path: &Path, topic: Topic) {
    let path = key_path(path);
    let subscribers = local_subscribers()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (their_path, their_topic, weak) in subscribers.iter() {
        if *their_topic == topic && *their_path == path {
            if let Some(signal) = weak.upgrade() {
                signal.notify();
            }
        }
    }
}

/// A loopback UDP port whose datagrams notify a [`Signal`]; its thread ends soon
/// after the listener is dropped.
pub(crate) struct WakeListener {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl WakeListener {
    /// `None` when no loopback socket can be had: waiting then relies on polling.
    pub(crate) fn start(signal: Arc<Signal>) -> Option<Self> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let port = socket.local_addr().ok()?.port();
        socket.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("celeriac-sqlite-wake".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                while !stopped.load(Ordering::Acquire) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        if from.ip().is_loopback() && buf[..n] == *WAKE_MAGIC {
                            signal.notify();
                        }
                    }
                }
            })
            .ok()?;
        Some(Self { port, stop })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for WakeListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the thread so that it sees the flag now rather than within a second.
        if let Ok(socket) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) {
            let _ = socket.send_to(b"stop", (Ipv4Addr::LOCALHOST, self.port));
        }
    }
}

/// Sends wake-ups to the peers of one kind recorded in the database.
pub(crate) struct WakeNotifier {
    socket: Option<UdpSocket>,
    kind: &'static str,
    ports: Vec<u16>,
    refreshed: Option<Instant>,
}

impl WakeNotifier {
    pub(crate) fn new(kind: &'static str) -> Self {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .ok()
            .filter(|socket| socket.set_nonblocking(true).is_ok());
        Self {
            socket,
            kind,
            ports: Vec::new(),
            refreshed: None,
        }
    }

    /// Wake every live peer of our kind (best effort: they poll anyway).
    pub(crate) fn notify(&mut self, conn: &Connection) {
        let Some(socket) = &self.socket else { return };
        if self
            .refreshed
            .is_none_or(|at| at.elapsed() >= PEERS_REFRESH)
        {
            self.refreshed = Some(Instant::now());
            if let Ok(ports) = live_ports(conn, self.kind) {
                self.ports = ports;
            }
        }
        for port in &self.ports {
            let _ = socket.send_to(WAKE_MAGIC, SocketAddr::from((Ipv4Addr::LOCALHOST, *port)));
        }
    }
}

pub(super) fn live_ports(conn: &Connection, kind: &str) -> rusqlite::Result<Vec<u16>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT port FROM peers WHERE kind = ?1 AND port IS NOT NULL AND heartbeat >= ?2",
    )?;
    let since = unix_now() - WAKE_STALE.as_secs_f64();
    let ports = stmt
        .query_map(params![kind, since], |row| row.get::<_, i64>(0))?
        .filter_map(|port| port.ok().and_then(|p| u16::try_from(p).ok()))
        .collect();
    Ok(ports)
}

/// Record (or refresh) a peer's heartbeat and wake-up port.
pub(crate) fn heartbeat(
    conn: &Connection,
    id: &str,
    kind: &str,
    port: Option<u16>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO peers (id, kind, pid, port, heartbeat) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, port = excluded.port",
    )?
    .execute(params![id, kind, std::process::id(), port, unix_now()])?;
    Ok(())
}

pub(crate) fn new_peer_id(kind: &str) -> String {
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}
