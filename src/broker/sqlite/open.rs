//! Opening a database: creating or checking the schema, pragmas, the busy handler.

use super::*;

/// The path as shown in errors: absolute, so that a relative URL is unambiguous.
pub(crate) fn shown(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// An error about the database at `path`, naming it.
pub(crate) fn db_error(path: &Path, err: &rusqlite::Error) -> Error {
    Error::Connection(format!(
        "SQLite database {}: {}",
        shown(path),
        describe(path, err)
    ))
}

pub(super) fn describe(path: &Path, err: &rusqlite::Error) -> String {
    let dir_hint = || {
        let dir = parent_dir(path);
        let err = match err.sqlite_error_code() {
            Some(ErrorCode::CannotOpen) => "cannot create or open the file".to_owned(),
            _ => err.to_string(),
        };
        format!(
            "{err}; the directory {} must be writable (SQLite keeps -wal and -shm files beside the database)",
            shown(&dir)
        )
    };
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => format!("the file is not a SQLite database ({err})"),
        Some(ErrorCode::DatabaseCorrupt) => format!("the file is corrupt ({err})"),
        Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => {
            dir_hint()
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            format!("{err} (another process held the write lock longer than busy_timeout)")
        }
        _ => err.to_string(),
    }
}

pub(super) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Retry a locked database for `timeout`, in short sleeps (SQLite's own handler
/// sleeps up to 100 ms at a time, which idles the lock under contention).
pub(super) fn install_busy_handler(
    conn: &mut Connection,
    timeout: Duration,
) -> rusqlite::Result<()> {
    let mut started: Option<Instant> = None;
    conn.busy_handler(Some(move |attempt: i32| {
        if attempt == 0 {
            started = Some(Instant::now());
        }
        let since = started.get_or_insert_with(Instant::now);
        if since.elapsed() >= timeout {
            return false;
        }
        let pause = 20u64 << attempt.clamp(0, 6) as u32;
        std::thread::sleep(Duration::from_micros(pause.min(1000)));
        true
    }))
}

/// Open (creating if needed) the celeriac database at `path` and check it is one.
///
/// Refuses, naming the file: a missing directory, a directory, a read-only file or
/// directory, a file that is not SQLite or is corrupt, a SQLite file of another
/// application, and a schema newer than this build's. Never rewrites existing data.
pub fn open(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    // Processes that open a fresh file at the same moment race to switch it to WAL
    // and create the schema; SQLite answers some of those steps with "locked" without
    // calling the busy handler, so the whole opening is retried within busy_timeout.
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match open_once(path, busy_timeout) {
            Err(Error::Connection(text))
                if text.contains("locked") && started.elapsed() < busy_timeout =>
            {
                std::thread::sleep(Duration::from_millis((5u64 << attempt.min(5)).min(100)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(super) fn open_once(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let fail = |why: String| Error::Connection(format!("SQLite database {}: {why}", shown(path)));
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(fail(format!(
            "the directory {} does not exist",
            shown(&dir)
        )));
    }
    if path.is_dir() {
        return Err(fail("the path is a directory".into()));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, &e))?;
    if conn.is_readonly("main").unwrap_or(false) {
        return Err(fail(
            "the file is read-only; celeriac needs to write to it".into(),
        ));
    }
    install_busy_handler(&mut conn, busy_timeout).map_err(|e| db_error(path, &e))?;
    let read_header = |conn: &Connection| -> rusqlite::Result<(i64, i64)> {
        let app: i64 = conn.pragma_query_value(None, "application_id", |row| row.get(0))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        Ok((app, version))
    };
    let (app, version) = read_header(&conn).map_err(|e| db_error(path, &e))?;
    check_header(path, app, version)?;
    if version == 0 {
        check_no_foreign_tables(&conn, path)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(fail(format!(
            "cannot switch to WAL mode (SQLite answered {mode:?}); is the file on a network filesystem?"
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| db_error(path, &e))?;
    if version < SCHEMA_VERSION {
        create_schema(&mut conn, path)?;
    }
    let present: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('messages', 'results', 'peers', 'broadcast')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| db_error(path, &e))?;
    if present != OUR_TABLES.len() as i64 {
        return Err(fail(
            "it is marked as a celeriac database but its tables are missing (damaged?); \
             move it away to start afresh"
                .into(),
        ));
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

pub(super) fn check_header(path: &Path, app: i64, version: i64) -> Result<()> {
    let fail = |why: String| Error::Connection(format!("SQLite database {}: {why}", shown(path)));
    if app != 0 && app != APPLICATION_ID {
        return Err(fail(format!(
            "it belongs to another application (application_id {app:#x}); celeriac will not write into it"
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(fail(format!(
            "it was written by a newer celeriac (schema version {version}; this one knows up to \
             {SCHEMA_VERSION}): upgrade celeriac or use another file"
        )));
    }
    if version < 0 {
        return Err(fail(format!("it has an unknown schema version {version}")));
    }
    Ok(())
}

/// A file with no celeriac schema yet must be empty: never write into someone
/// else's database.
pub(super) fn check_no_foreign_tables(conn: &Connection, path: &Path) -> Result<()> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .map_err(|e| db_error(path, &e))?;
    let names: Vec<String> = stmt
        .query_map([], |row| row.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| db_error(path, &e))?;
    let foreign: Vec<&String> = names
        .iter()
        .filter(|name| !OUR_TABLES.contains(&name.as_str()))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let list: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
    Err(Error::Connection(format!(
        "SQLite database {}: it holds tables of another application ({}); celeriac will not \
         write into it",
        shown(path),
        list.join(", ")
    )))
}

pub(super) fn create_schema(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_error(path, &e))?;
    // Another process may have created it since we looked.
    let app: i64 = tx
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| db_error(path, &e))?;
    check_header(path, app, version)?;
    if version == 0 {
        check_no_foreign_tables(&tx, path)?;
        tx.execute_batch(SCHEMA).map_err(|e| db_error(path, &e))?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(|e| db_error(path, &e))?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_V2)
            .map_err(|e| db_error(path, &e))?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(|e| db_error(path, &e))?;
    }
    tx.commit().map_err(|e| db_error(path, &e))
}
