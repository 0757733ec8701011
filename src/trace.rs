//! Opt-in hop timestamps for the latency timeline (docs/latency.md).
//!
//! With `CELERIAC_TRACE=FILE` in the environment, every [`hop`] appends one line,
//! `<CLOCK_MONOTONIC ns> <pid> <tid> <hop>`, to FILE with a single `write(2)` on an
//! `O_APPEND` descriptor, so the lines of every thread and process (the Python side
//! writes the same format, `celeriac._trace`) interleave whole and share one clock.
//! Unset, a hop is one atomic load and a branch: the file is looked up once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

/// The variable that names the trace file.
pub const TRACE_ENV: &str = "CELERIAC_TRACE";

static SINK: OnceLock<Option<File>> = OnceLock::new();

fn open_sink() -> Option<File> {
    let path = std::env::var_os(TRACE_ENV).filter(|path| !path.is_empty())?;
    // Tracing is a diagnostic: a file that cannot be opened turns it off, not the caller.
    OpenOptions::new().create(true).append(true).open(path).ok()
}

/// Whether hops are being recorded.
#[inline]
pub fn enabled() -> bool {
    SINK.get_or_init(open_sink).is_some()
}

/// Record that this thread reached `name` now (a no-op unless tracing is on).
#[inline]
pub fn hop(name: &str) {
    if let Some(file) = SINK.get_or_init(open_sink) {
        write_hop(file, name);
    }
}

#[cold]
fn write_hop(mut file: &File, name: &str) {
    let line = format!(
        "{} {} {} {name}\n",
        monotonic_ns(),
        std::process::id(),
        thread_id()
    );
    // A lost trace line is not worth failing the task for.
    let _ = file.write_all(line.as_bytes());
}

/// CLOCK_MONOTONIC in nanoseconds: Python's `time.monotonic_ns()` reads the same clock.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

fn thread_id() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward() {
        let first = monotonic_ns();
        let second = monotonic_ns();
        assert!(second >= first);
    }
}
