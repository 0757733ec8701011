//! One tokio runtime per process.
//!
//! tokio's worker threads do not survive `fork()`: a forked child that used the
//! parent's runtime would wait forever on threads that no longer exist. The runtime
//! is therefore built lazily and keyed by the pid that built it; a child notices the
//! pid changed and builds its own (the parent's copy is leaked, never dropped, since
//! dropping it would try to join threads that are gone).

use std::sync::{Mutex, OnceLock};

use tokio::runtime::{Builder, Handle, Runtime};

struct Owned {
    pid: u32,
    runtime: &'static Runtime,
}

static RUNTIME: OnceLock<Mutex<Option<Owned>>> = OnceLock::new();

/// The handle of this process's runtime, building it on first use (or after a fork).
pub fn handle() -> Handle {
    let cell = RUNTIME.get_or_init(|| Mutex::new(None));
    // A poisoned lock only means another thread panicked while building; the value
    // inside is still either None or a complete runtime.
    let mut guard = cell.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if let Some(owned) = guard.as_ref() {
        if owned.pid == pid {
            return owned.runtime.handle().clone();
        }
    }
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("celeriac-io")
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("cannot start the I/O runtime: {err}"));
    let runtime: &'static Runtime = Box::leak(Box::new(runtime));
    let handle = runtime.handle().clone();
    *guard = Some(Owned { pid, runtime });
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_process_gets_the_same_runtime() {
        let a = handle();
        let b = handle();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.block_on(async { 1 + 1 }), 2);
    }
}
