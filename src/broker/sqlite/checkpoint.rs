//! Checkpoints off the hot path: WAL checkpoints on a thread of their own.

use super::*;

/// WAL pages after which a writer asks for a checkpoint (SQLite's own default: 1000).
pub(super) const CHECKPOINT_PAGES: i32 = 2000;

/// Checkpoints the WAL of one file on its own thread, so that no writer waits for the
/// fsyncs of a checkpoint (with `synchronous=NORMAL` they are the only ones). One per
/// file per process, shared by its producers, consumers and result stores; the thread
/// ends when the last of them is dropped.
pub(crate) struct Checkpointer {
    wanted: Arc<Signal>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wanted.notify();
        // Wait for the thread to close its connection: a prefork supervisor forks right
        // after its probe is dropped, and SQLite's in-process lock state copied by fork()
        // mid-checkpoint (or mid-close) would leave the children's connections locked.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(super) type Checkpointers = Vec<(u32, PathBuf, Weak<Checkpointer>)>;

/// This process's checkpointer of the file at `path`, started if needed. `None` when
/// it cannot start: writers then keep SQLite's automatic checkpoints.
pub(crate) fn checkpointer(path: &Path, busy_timeout: Duration) -> Option<Arc<Checkpointer>> {
    static ALL: OnceLock<Mutex<Checkpointers>> = OnceLock::new();
    let pid = std::process::id();
    let key = key_path(path);
    let mut all = ALL
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Entries of a parent process (after fork) have no thread here: never reuse them.
    all.retain(|(owner, _, weak)| *owner == pid && weak.strong_count() > 0);
    if let Some(found) = all
        .iter()
        .find(|(_, their, _)| *their == key)
        .and_then(|(_, _, weak)| weak.upgrade())
    {
        return Some(found);
    }
    let conn = open(path, busy_timeout).ok()?;
    let wanted = Arc::new(Signal::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_wanted, thread_stop) = (wanted.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("celeriac-sqlite-ckpt".into())
        .spawn(move || {
            let mut seen = thread_wanted.generation();
            while !thread_stop.load(Ordering::Acquire) {
                if !thread_wanted.wait(seen, Duration::from_secs(30)) {
                    continue;
                }
                seen = thread_wanted.generation();
                if thread_stop.load(Ordering::Acquire) {
                    break;
                }
                // PASSIVE copies most of the log without blocking anyone; under a
                // steady stream of commits it never catches up, so the log would grow
                // without end (every append then allocates new file blocks). RESTART
                // then holds writers back (their busy handler waits) for the last few
                // frames and one sync, so that the next commit starts the log over.
                // A failure is retried when the next commit asks again.
                use rusqlite::wal::CheckpointMode;
                let _ = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE);
                let _ = conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::RESTART);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .ok()?;
    let made = Arc::new(Checkpointer {
        wanted,
        stop,
        thread: Some(thread),
    });
    all.push((pid, key, Arc::downgrade(&made)));
    Some(made)
}

/// Have `conn`'s commits ask `checkpointer` for a checkpoint instead of running one.
pub(super) fn hand_checkpoints_to(
    conn: &mut Connection,
    checkpointer: &Checkpointer,
) -> rusqlite::Result<()> {
    let wanted = checkpointer.wanted.clone();
    // Replaces SQLite's automatic checkpoint (itself a WAL hook).
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            wanted.notify();
        }
        Ok(())
    }))
}

/// Open a connection for a busy writer: its checkpoints run on this process's
/// checkpointer thread for the file.
pub(crate) fn open_writer(
    path: &Path,
    busy_timeout: Duration,
) -> Result<(Connection, Option<Arc<Checkpointer>>)> {
    let mut conn = open(path, busy_timeout)?;
    let checkpointer = checkpointer(path, busy_timeout);
    if let Some(checkpointer) = &checkpointer {
        hand_checkpoints_to(&mut conn, checkpointer).map_err(|e| db_error(path, &e))?;
    }
    Ok((conn, checkpointer))
}

/// Open on tokio's blocking pool (never on a runtime worker).
pub(super) async fn open_async(
    path: PathBuf,
    busy_timeout: Duration,
) -> Result<(Connection, Option<Arc<Checkpointer>>)> {
    let shown_path = shown(&path);
    tokio::task::spawn_blocking(move || open_writer(&path, busy_timeout))
        .await
        .map_err(|err| {
            Error::Connection(format!(
                "SQLite database {shown_path}: the opening thread failed: {err}"
            ))
        })?
}

pub(super) fn sqlite_path(url: &BrokerUrl) -> Result<PathBuf> {
    url.sqlite_path
        .clone()
        .ok_or_else(|| Error::InvalidUrl(format!("{:?} is not a SQLite URL", url.masked())))
}

/// JSON bytes, stored as TEXT when they are UTF-8 (so that the `sqlite3` shell shows
/// them), as a BLOB otherwise.
pub(crate) struct JsonBytes<'a>(pub &'a [u8]);

impl ToSql for JsonBytes<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match std::str::from_utf8(self.0) {
            Ok(_) => ValueRef::Text(self.0),
            Err(_) => ValueRef::Blob(self.0),
        }))
    }
}

/// A TEXT or BLOB column's bytes.
pub(crate) fn column_bytes(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Vec<u8>> {
    match row.get_ref(index)? {
        ValueRef::Text(bytes) | ValueRef::Blob(bytes) => Ok(bytes.to_vec()),
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            index,
            other.data_type(),
            "expected JSON text".into(),
        )),
    }
}
