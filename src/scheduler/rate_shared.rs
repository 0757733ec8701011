//! Rate-limit buckets shared by every process of one worker node, so a task's
//! `rate_limit` holds per node as in Celery (whose pool children take no messages of
//! their own), not per prefork child: `-c 8` must not run a `10/m` task at 80/m.
//!
//! The table lives in `SharedMemory` made by the supervisor before it forks. Each
//! bucket is kombu's `TokenBucket` with capacity 1 written as one atomic: the monotonic
//! time at which its next token is there ("generic cell rate"). Taking a token is a
//! compare-and-swap of that time from `t <= now` to `now + 1/rate`; a bucket left idle
//! holds one token at most, as kombu's does. A name's entry is claimed once (empty ->
//! claimed -> ready) and never moves or goes away, so lookups take no lock either.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use super::shared_mem::{monotonic_ns, SharedMemory};
use crate::error::Result;

/// Bytes of a name kept in its entry; a longer name is told apart by its length and
/// hash beyond these.
pub const NAME_BYTES: usize = 216;
/// Fewest entries a table has, whatever it is sized for.
const MIN_ENTRIES: usize = 64;
/// Spins while another process writes the name of an entry it just claimed.
const CLAIM_SPINS: u32 = 100_000;

const EMPTY: u32 = 0;
const CLAIMED: u32 = 1;
const READY: u32 = 2;

#[repr(C)]
struct Entry {
    state: AtomicU32,
    len: AtomicU32,
    hash: AtomicU64,
    /// The rate in tokens per second as `f64` bits; 0: not limited.
    rate: AtomicU64,
    /// `monotonic_ns()` from which the next token may be taken (0: the bucket is full).
    next_free: AtomicU64,
    name: [AtomicU8; NAME_BYTES],
}

const ENTRY_SIZE: usize = std::mem::size_of::<Entry>();

/// Every entry is taken: the name cannot be shared (the caller keeps its own bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// Per-task token buckets in memory shared by a node's processes.
#[derive(Debug)]
pub struct SharedRateLimits {
    memory: SharedMemory,
    entries: usize,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn valid_rate(rate: f64) -> bool {
    rate.is_finite() && rate > 0.0
}

impl SharedRateLimits {
    /// A table for at least `names` task names (twice that, at least 64, so probing
    /// stays short and names added later by remote control find room).
    pub fn new(names: usize) -> Result<Self> {
        let entries = names.saturating_mul(2).max(MIN_ENTRIES);
        let memory = SharedMemory::new(entries * ENTRY_SIZE)?;
        Ok(Self { memory, entries })
    }

    pub fn capacity(&self) -> usize {
        self.entries
    }

    fn entry(&self, index: usize) -> &Entry {
        // SAFETY: `index < entries` (callers reduce modulo it), ENTRY_SIZE is a multiple
        // of 8 and the base is page-aligned; an Entry is atomics only, valid for any
        // bits (zero: empty).
        unsafe { self.memory.at::<Entry>(index * ENTRY_SIZE) }
    }

    fn matches(entry: &Entry, name: &[u8], hash: u64) -> bool {
        if entry.hash.load(Ordering::Acquire) != hash
            || entry.len.load(Ordering::Acquire) as usize != name.len()
        {
            return false;
        }
        name.iter()
            .take(NAME_BYTES)
            .zip(entry.name.iter())
            .all(|(byte, kept)| kept.load(Ordering::Relaxed) == *byte)
    }

    /// Wait for a claimed entry's name; false when its writer seems gone (killed
    /// between claim and ready): the entry is skipped.
    fn wait_ready(entry: &Entry) -> bool {
        for _ in 0..CLAIM_SPINS {
            if entry.state.load(Ordering::Acquire) == READY {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    /// The entry of `name`; with `insert`, claimed for it when there is none.
    fn find(&self, name: &str, insert: bool) -> Result<Option<&Entry>, TableFull> {
        let bytes = name.as_bytes();
        let hash = fnv1a(bytes);
        let start = (hash % self.entries as u64) as usize;
        for step in 0..self.entries {
            let entry = self.entry((start + step) % self.entries);
            let mut state = entry.state.load(Ordering::Acquire);
            if state == EMPTY {
                if !insert {
                    return Ok(None);
                }
                match entry.state.compare_exchange(
                    EMPTY,
                    CLAIMED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        for (slot, byte) in entry.name.iter().zip(bytes) {
                            slot.store(*byte, Ordering::Relaxed);
                        }
                        // Names are short; a length past u32 is told apart by hash.
                        entry.len.store(
                            u32::try_from(bytes.len()).unwrap_or(u32::MAX),
                            Ordering::Relaxed,
                        );
                        entry.hash.store(hash, Ordering::Relaxed);
                        entry.state.store(READY, Ordering::Release);
                        return Ok(Some(entry));
                    }
                    Err(now) => state = now,
                }
            }
            if state == CLAIMED && !Self::wait_ready(entry) {
                continue;
            }
            if Self::matches(entry, bytes, hash) {
                return Ok(Some(entry));
            }
        }
        if insert {
            Err(TableFull)
        } else {
            Ok(None)
        }
    }

    /// Set (or with a rate that is not a positive number, remove) the limit of `name`
    /// in tokens per second. An unchanged rate keeps the bucket; a new one starts full.
    pub fn set(&self, name: &str, rate: f64) -> Result<(), TableFull> {
        if !valid_rate(rate) {
            if let Some(entry) = self.find(name, false)? {
                entry.rate.store(0, Ordering::Release);
            }
            return Ok(());
        }
        let Some(entry) = self.find(name, true)? else {
            return Err(TableFull);
        };
        let bits = rate.to_bits();
        if entry.rate.swap(bits, Ordering::AcqRel) != bits {
            entry.next_free.store(0, Ordering::Release);
        }
        Ok(())
    }

    /// The rate of `name` in tokens per second (0.0: not limited); `None` when it
    /// has no entry.
    pub fn rate(&self, name: &str) -> Option<f64> {
        let entry = self.find(name, false).ok().flatten()?;
        Some(f64::from_bits(entry.rate.load(Ordering::Acquire)))
    }

    pub fn is_limited(&self, name: &str) -> bool {
        self.rate(name).is_some_and(valid_rate)
    }

    /// `0.0` when a message of `name` may run now (a token is taken), else the seconds
    /// to wait before asking again. A name without a limit always goes.
    pub fn acquire(&self, name: &str) -> f64 {
        self.acquire_at(name, monotonic_ns())
    }

    /// `acquire` at `now` (`monotonic_ns()` nanoseconds).
    pub fn acquire_at(&self, name: &str, now: u64) -> f64 {
        let Ok(Some(entry)) = self.find(name, false) else {
            return 0.0;
        };
        let rate = f64::from_bits(entry.rate.load(Ordering::Acquire));
        if !valid_rate(rate) {
            return 0.0;
        }
        // At least 1 ns; a rate so low its interval overflows waits "forever".
        let interval = (1e9 / rate).clamp(1.0, u64::MAX as f64) as u64;
        let mut next = entry.next_free.load(Ordering::Acquire);
        loop {
            if next > now {
                return ((next - now) as f64 / 1e9).max(1e-6);
            }
            match entry.next_free.compare_exchange_weak(
                next,
                now.saturating_add(interval),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return 0.0,
                Err(seen) => next = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_shared_bucket_starts_full_then_refills_at_its_rate() {
        let limits = SharedRateLimits::new(4).expect("mapping");
        limits.set("t", 2.0).expect("room"); // "2/s"
        let start = 10 * SEC;
        assert_eq!(limits.acquire_at("t", start), 0.0);
        let wait = limits.acquire_at("t", start);
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        assert_eq!(limits.acquire_at("t", start + SEC / 2), 0.0);
        let wait = limits.acquire_at("t", start + SEC / 2 + SEC / 10);
        assert!((wait - 0.4).abs() < 1e-6, "{wait}");
        // Idle for long: one token, not several.
        assert_eq!(limits.acquire_at("t", start + 100 * SEC), 0.0);
        assert!(limits.acquire_at("t", start + 100 * SEC) > 0.0);
    }

    #[test]
    fn one_token_per_interval_whatever_the_number_of_takers() {
        let limits = SharedRateLimits::new(1).expect("mapping");
        limits.set("t", 1.0).expect("room");
        let now = 5 * SEC;
        let taken: usize = std::thread::scope(|scope| {
            let takers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        (0..100)
                            .filter(|_| limits.acquire_at("t", now) == 0.0)
                            .count()
                    })
                })
                .collect();
            takers.into_iter().map(|t| t.join().expect("taker")).sum()
        });
        assert_eq!(taken, 1);
    }

    #[test]
    fn names_are_kept_apart_and_a_change_of_rate_starts_full() {
        let limits = SharedRateLimits::new(1).expect("mapping");
        assert_eq!(limits.acquire("free"), 0.0);
        assert!(!limits.is_limited("free"));
        limits.set("a", 1.0 / 60.0).expect("room");
        limits.set("b", 1.0 / 60.0).expect("room");
        let long = "x".repeat(NAME_BYTES + 10);
        let longer = format!("{long}y");
        limits.set(&long, 1.0).expect("room");
        assert!(!limits.is_limited(&longer));
        assert_eq!(limits.acquire("a"), 0.0);
        assert_eq!(limits.acquire("b"), 0.0);
        let wait = limits.acquire("a");
        assert!(wait > 59.0 && wait <= 60.0, "{wait}");
        limits.set("a", 1.0 / 60.0).expect("room"); // the same rate: still empty
        assert!(limits.acquire("a") > 0.0);
        limits.set("a", 10.0).expect("room"); // a new rate: full again
        assert_eq!(limits.acquire("a"), 0.0);
        limits.set("a", 0.0).expect("room");
        assert!(!limits.is_limited("a"));
        assert_eq!(limits.acquire("a"), 0.0);
        limits.set("n", f64::NAN).expect("room");
        assert_eq!(limits.rate("n"), None);
    }

    #[test]
    fn a_forked_process_takes_from_the_same_bucket() {
        let limits = SharedRateLimits::new(1).expect("mapping");
        limits.set("t", 1.0 / 3600.0).expect("room");
        // SAFETY: the child only does atomics on the inherited mapping, then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let taken = limits.acquire("t") == 0.0;
            unsafe { libc::_exit(if taken { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(
            limits.acquire("t") > 3000.0,
            "the child's token was taken here too"
        );
    }

    #[test]
    fn a_full_table_says_so() {
        let limits = SharedRateLimits::new(0).expect("mapping");
        for i in 0..limits.capacity() {
            limits.set(&format!("t{i}"), 1.0).expect("room");
        }
        assert_eq!(limits.set("one-more", 1.0), Err(TableFull));
        assert!(limits.is_limited("t0"));
        assert_eq!(limits.acquire("one-more"), 0.0);
    }
}
