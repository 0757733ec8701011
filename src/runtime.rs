//! One tokio runtime per process.
//!
//! tokio's worker threads do not survive `fork()`: a forked child that used the
//! parent's runtime would wait forever on threads that no longer exist. The runtime
//! is therefore built lazily and keyed by the pid that built it; a child notices the
//! pid changed and builds its own (the parent's copy is leaked, never dropped, since
//! dropping it would try to join threads that are gone).

use std::sync::{Mutex, OnceLock};

use tokio::runtime::{Builder, Handle, Runtime};

/// The stack of every thread the core starts. lapin parses an AMQP header table
/// recursively on its I/O thread, and a publisher may nest one as deep as a frame holds
/// (some 25,000 levels in RabbitMQ's 128 KiB): at about 1.5 KiB a level, Rust's default
/// 2 MiB overflows near 1,300 levels and aborts the worker. Address space, not memory:
/// only the pages a thread uses are ever touched.
pub const THREAD_STACK: usize = 64 << 20;

/// Give [`THREAD_STACK`] to the threads started without a size (lapin's I/O loop), by
/// `RUST_MIN_STACK`, which Rust reads when it starts the first such thread: call this
/// before any thread starts (the extension does when Python imports it). A value the
/// user set is kept.
pub fn reserve_thread_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK.to_string());
    }
}

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
        .thread_stack_size(THREAD_STACK)
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
