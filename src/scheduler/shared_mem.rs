//! Memory shared by the processes of one worker node: an anonymous `MAP_SHARED`
//! mapping made before the prefork supervisor forks, so every child inherits it and
//! sees the same bytes. Only atomics live in it.
//!
//! Design note (fork, unsafe): a mapping is a run of zeroed, page-aligned bytes that
//! stays valid until this process drops its `SharedMemory` (each process unmaps its own
//! view; the pages live until the last one does). Everything stored in it is an atomic
//! of the same layout in every process (the same binary), so processes coordinate
//! without locks: one killed half-way through an update can leave no lock taken.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::error::{Error, Result};

/// An anonymous shared mapping of `len` zeroed bytes (page-aligned).
#[derive(Debug)]
pub struct SharedMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory that only atomics are read and written through;
// any thread (or process) may use it at once.
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    pub fn new(len: usize) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: a fresh anonymous mapping aliases nothing; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::SharedMemory(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| {
            Error::SharedMemory(std::io::Error::other("mmap returned a null mapping"))
        })?;
        Ok(Self { base, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `T` at byte `offset`. Panics (a caller's bug, never input) when it does not
    /// fit or is misaligned.
    ///
    /// # Safety
    /// `T` must be valid for any bit pattern written by this crate's code at that
    /// offset (zeroes included): atomics, or `repr(C)` structs of atomics.
    pub unsafe fn at<T>(&self, offset: usize) -> &T {
        assert!(
            offset + std::mem::size_of::<T>() <= self.len,
            "outside the mapping"
        );
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        assert_eq!(ptr as usize % std::mem::align_of::<T>(), 0, "misaligned");
        unsafe { &*ptr.cast::<T>() }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are this mapping's; nothing borrows it past `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// `count` signed counters shared by the processes of a node (`fetch_add` on each).
#[derive(Debug)]
pub struct SharedCounters {
    memory: SharedMemory,
    count: usize,
}

impl SharedCounters {
    pub fn new(count: usize) -> Result<Self> {
        let memory = SharedMemory::new(count * std::mem::size_of::<AtomicI64>())?;
        Ok(Self { memory, count })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    fn counter(&self, index: usize) -> Option<&AtomicI64> {
        // SAFETY: in bounds (checked) and 8-aligned (page-aligned base); any bit
        // pattern is a valid i64.
        (index < self.count).then(|| unsafe { self.memory.at::<AtomicI64>(index * 8) })
    }

    /// Add `delta` to counter `index`; its new value (None: no such counter).
    pub fn add(&self, index: usize, delta: i64) -> Option<i64> {
        self.counter(index)
            .map(|c| c.fetch_add(delta, Ordering::AcqRel).wrapping_add(delta))
    }

    pub fn get(&self, index: usize) -> Option<i64> {
        self.counter(index).map(|c| c.load(Ordering::Acquire))
    }

    pub fn set(&self, index: usize, value: i64) -> Option<()> {
        self.counter(index)
            .map(|c| c.store(value, Ordering::Release))
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC`: one clock for every process of the machine (an
/// `Instant` cannot be shared between processes).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists on
    // Linux and the BSDs.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now);
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_start_at_zero_and_add_up_across_threads() {
        let counters = SharedCounters::new(3).expect("mapping");
        assert_eq!(counters.get(2), Some(0));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        counters.add(1, 1);
                    }
                });
            }
        });
        assert_eq!(counters.get(1), Some(4000));
        assert_eq!(counters.add(1, -1), Some(3999));
        counters.set(0, 7);
        assert_eq!(counters.get(0), Some(7));
        assert_eq!(counters.get(3), None);
        assert_eq!(counters.add(3, 1), None);
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let first = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_ns() >= first + 2_000_000);
    }
}
