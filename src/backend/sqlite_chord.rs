//! The chord join on the SQLite result store, each step one transaction.
//!
//! The same steps as the Redis join (`redis/chord.rs`), with the same entry points, kept
//! as rows of the `results` table (no schema change), named after Celery's Redis keys:
//! `<prefix><group id>.s` (the header size, written by the client), one
//! `<prefix><group id>.j:<index, 20 digits>:<task id>` row per recorded header result
//! (so rows sort in header order and a redelivered header task counts once), and
//! `<prefix><group id>.c` (the claim of the worker that sends the body, then `done`).
//! Every row carries an `expires_at`; an expired row counts as absent.
//!
//! Each step runs in one `BEGIN IMMEDIATE` transaction on the store's reader
//! connection, so two processes recording the last two parts cannot both claim.

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::SqliteBackend;
use crate::backend::redis::ChordPart;
use crate::broker::sqlite::{column_bytes, unix_now, JsonBytes};
use crate::error::Result;

const DONE: &[u8] = b"done";

/// The row keys of one chord.
struct ChordKeys {
    size: String,
    claim: String,
    /// `.j:` and the key just after every `.j:` row (`.j;`), for range scans.
    parts_low: String,
    parts_high: String,
}

impl ChordKeys {
    fn part(&self, index: Option<i64>, task_id: &str) -> String {
        // No index (Celery's "+inf" score): after every indexed part.
        let index = index.map_or(u64::MAX, |i| u64::try_from(i).unwrap_or(0));
        format!("{}{index:020}:{task_id}", self.parts_low)
    }
}

fn expiry(seconds: u64) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    (seconds > 0).then(|| unix_now() + seconds as f64)
}

fn read_row(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT meta FROM results WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        params![key, unix_now()],
        |row| column_bytes(row, 0),
    )
    .optional()
}

fn write_row(
    conn: &Connection,
    key: &str,
    value: &[u8],
    expires_at: Option<f64>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO results (key, meta, stored_at, expires_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE SET meta = excluded.meta,
             stored_at = excluded.stored_at, expires_at = excluded.expires_at",
    )?
    .execute(params![key, JsonBytes(value), unix_now(), expires_at])?;
    Ok(())
}

fn delete_row(conn: &Connection, key: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM results WHERE key = ?1")?
        .execute(params![key])?;
    Ok(())
}

fn count_parts(conn: &Connection, keys: &ChordKeys) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM results WHERE key >= ?1 AND key < ?2
             AND (expires_at IS NULL OR expires_at > ?3)",
        params![keys.parts_low, keys.parts_high, unix_now()],
        |row| row.get(0),
    )
}

fn parse_size(raw: Option<Vec<u8>>) -> Option<i64> {
    raw.and_then(|bytes| std::str::from_utf8(&bytes).ok()?.trim().parse().ok())
}

impl SqliteBackend {
    fn chord_keys(&self, group_id: &str) -> ChordKeys {
        let base = self.shared.key_for(group_id);
        ChordKeys {
            size: format!("{base}.s"),
            claim: format!("{base}.c"),
            parts_low: format!("{base}.j:"),
            parts_high: format!("{base}.j;"),
        }
    }

    /// Run `step` in one immediate (write-locking) transaction, committed if it succeeds.
    fn chord_transaction<T>(
        &self,
        step: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.check_open()?;
        self.shared.with_reader(|conn| {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            let value = step(&tx)?;
            tx.commit()?;
            Ok(value)
        })
    }

    /// What the client does before the last header message: a new run (the claim
    /// removed) of `size` parts.
    pub fn chord_set_size(&self, group_id: &str, size: u64, expires: u64) -> Result<()> {
        let keys = self.chord_keys(group_id);
        self.chord_transaction(|tx| {
            delete_row(tx, &keys.claim)?;
            write_row(tx, &keys.size, size.to_string().as_bytes(), expiry(expires))
        })
    }

    /// Record a header task's result (`member`: JSON `[1, id, state, result]`) at
    /// `index`; see [`ChordPart`]. One transaction: record, count, claim.
    #[allow(clippy::too_many_arguments)]
    pub fn chord_part_return(
        &self,
        group_id: &str,
        task_id: &str,
        index: Option<i64>,
        member: &[u8],
        expires: u64,
        claim_expires: u64,
        token: &str,
    ) -> Result<ChordPart> {
        let keys = self.chord_keys(group_id);
        self.chord_transaction(|tx| {
            let claim = read_row(tx, &keys.claim)?;
            if claim.as_deref() == Some(DONE) {
                return Ok(ChordPart {
                    ready: -1,
                    total: 0,
                    claimed: false,
                });
            }
            tx.prepare_cached(
                "INSERT INTO results (key, meta, stored_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO NOTHING",
            )?
            .execute(params![
                keys.part(index, task_id),
                JsonBytes(member),
                unix_now(),
                expiry(expires)
            ])?;
            let ready = count_parts(tx, &keys)?;
            let size = parse_size(read_row(tx, &keys.size)?);
            let mut claimed = false;
            if size == Some(ready) && claim.is_none() {
                write_row(
                    tx,
                    &keys.claim,
                    token.as_bytes(),
                    expiry(claim_expires.max(1)),
                )?;
                claimed = true;
            }
            Ok(ChordPart {
                ready,
                total: size.unwrap_or(0),
                claimed,
            })
        })
    }

    /// The header results in header order.
    pub fn chord_results(&self, group_id: &str) -> Result<Vec<Vec<u8>>> {
        let keys = self.chord_keys(group_id);
        self.check_open()?;
        self.shared.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT meta FROM results WHERE key >= ?1 AND key < ?2
                     AND (expires_at IS NULL OR expires_at > ?3) ORDER BY key",
            )?;
            let rows = stmt.query_map(
                params![keys.parts_low, keys.parts_high, unix_now()],
                |row| column_bytes(row, 0),
            )?;
            rows.collect()
        })
    }

    /// Extend our claim before sending the body (or take it back if it expired while
    /// the chord is still there); false when it is no longer ours.
    pub fn chord_claim_extend(&self, group_id: &str, token: &str, expires: u64) -> Result<bool> {
        let keys = self.chord_keys(group_id);
        self.chord_transaction(|tx| {
            let claim = read_row(tx, &keys.claim)?;
            let ours = claim.as_deref() == Some(token.as_bytes());
            let free = claim.is_none() && read_row(tx, &keys.size)?.is_some();
            if ours || free {
                write_row(tx, &keys.claim, token.as_bytes(), expiry(expires.max(1)))?;
            }
            Ok(ours || free)
        })
    }

    /// After the body was sent: drop the join rows, mark the chord done.
    pub fn chord_cleanup(&self, group_id: &str, token: &str, done_expires: u64) -> Result<bool> {
        let keys = self.chord_keys(group_id);
        self.chord_transaction(|tx| {
            if read_row(tx, &keys.claim)?.as_deref() != Some(token.as_bytes()) {
                return Ok(false);
            }
            tx.prepare_cached("DELETE FROM results WHERE key >= ?1 AND key < ?2")?
                .execute(params![keys.parts_low, keys.parts_high])?;
            delete_row(tx, &keys.size)?;
            write_row(tx, &keys.claim, DONE, expiry(done_expires))?;
            Ok(true)
        })
    }

    /// A failed chord: drop its size, so a late copy of a header task cannot fail it
    /// again (the parts are left to expire, as on Redis).
    pub fn chord_drop_size(&self, group_id: &str) -> Result<()> {
        let keys = self.chord_keys(group_id);
        self.chord_transaction(|tx| delete_row(tx, &keys.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sqlite::SqliteBackendOptions;

    fn store(dir: &tempfile::TempDir) -> SqliteBackend {
        let url = format!("sqlite://{}/chord.db", dir.path().display());
        SqliteBackend::connect(&url, SqliteBackendOptions::default()).unwrap()
    }

    #[test]
    fn the_last_part_claims_once_and_results_come_in_header_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (store(&dir), store(&dir));
        a.chord_set_size("g", 2, 60).unwrap();
        let first = b
            .chord_part_return("g", "t1", Some(1), b"[1,\"t1\",\"SUCCESS\",2]", 60, 10, "x")
            .unwrap();
        assert_eq!((first.ready, first.claimed), (1, false));
        // A redelivered copy counts once.
        let again = a
            .chord_part_return("g", "t1", Some(1), b"[1,\"t1\",\"SUCCESS\",2]", 60, 10, "y")
            .unwrap();
        assert_eq!((again.ready, again.claimed), (1, false));
        let last = a
            .chord_part_return("g", "t0", Some(0), b"[1,\"t0\",\"SUCCESS\",1]", 60, 10, "z")
            .unwrap();
        assert_eq!((last.ready, last.total, last.claimed), (2, 2, true));
        let late = b
            .chord_part_return("g", "t9", Some(0), b"[1,\"t9\",\"SUCCESS\",1]", 60, 10, "w")
            .unwrap();
        assert!(!late.claimed);
        let results = b.chord_results("g").unwrap();
        assert_eq!(results[0], b"[1,\"t0\",\"SUCCESS\",1]");
        assert!(a.chord_claim_extend("g", "z", 20).unwrap());
        assert!(!b.chord_claim_extend("g", "w", 20).unwrap());
        assert!(a.chord_cleanup("g", "z", 300).unwrap());
        let done = b
            .chord_part_return("g", "t1", Some(1), b"[]", 60, 10, "q")
            .unwrap();
        assert_eq!(done.ready, -1);
    }
}
