//! Worker-side scheduling that needs no Python: per-task token buckets for rate limits
//! (docs/wire.md §7: capacity 1, refilled continuously; per process here, per prefork
//! node in `rate_shared`), the timer that holds ETA/countdown messages until due
//! (`eta`), and the memory a prefork node's processes share (`shared_mem`).

pub mod eta;
pub mod rate_shared;
pub mod shared_mem;

pub use eta::EtaSchedule;
pub use rate_shared::{SharedRateLimits, TableFull};
pub use shared_mem::{SharedCounters, SharedMemory};

use std::collections::HashMap;
use std::time::Instant;

/// kombu's `TokenBucket`: `rate` tokens per second up to `capacity`; starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket refilled at `rate` tokens per second (must be > 0).
    pub fn new(rate: f64, capacity: f64) -> Self {
        let capacity = capacity.max(1.0);
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Take one token if there is one: `0.0`. Otherwise the seconds until there is
    /// one (nothing taken).
    pub fn acquire_at(&mut self, now: Instant) -> f64 {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return 0.0;
        }
        ((1.0 - self.tokens) / self.rate).max(1e-6)
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// One bucket per task name; a name without a (positive) rate is never limited.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: HashMap<String, TokenBucket>,
}

impl RateLimits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set (or with `rate <= 0`, remove) the limit of `name`, in tokens per second.
    /// An unchanged rate keeps the bucket's current tokens.
    pub fn set(&mut self, name: &str, rate: f64) {
        if rate.is_nan() || rate <= 0.0 || !rate.is_finite() {
            self.buckets.remove(name);
            return;
        }
        match self.buckets.get(name) {
            Some(bucket) if bucket.rate() == rate => {}
            _ => {
                self.buckets
                    .insert(name.to_owned(), TokenBucket::new(rate, 1.0));
            }
        }
    }

    pub fn is_limited(&self, name: &str) -> bool {
        self.buckets.contains_key(name)
    }

    /// `0.0` when a message of `name` may run now (a token is taken), else the
    /// seconds to wait before asking again.
    pub fn acquire(&mut self, name: &str) -> f64 {
        self.acquire_at(name, Instant::now())
    }

    pub fn acquire_at(&mut self, name: &str, now: Instant) -> f64 {
        match self.buckets.get_mut(name) {
            Some(bucket) => bucket.acquire_at(now),
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_starts_full_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut limits = RateLimits::new();
        limits.set("t", 2.0); // "2/s"
        assert_eq!(limits.acquire_at("t", start), 0.0);
        let wait = limits.acquire_at("t", start);
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        assert_eq!(
            limits.acquire_at("t", start + Duration::from_millis(500)),
            0.0
        );
        let wait = limits.acquire_at("t", start + Duration::from_millis(600));
        assert!((wait - 0.4).abs() < 1e-6, "{wait}");
    }

    #[test]
    fn unlimited_names_always_go_and_zero_removes_a_limit() {
        let mut limits = RateLimits::new();
        assert_eq!(limits.acquire("free"), 0.0);
        limits.set("t", 1.0 / 60.0); // "1/m"
        assert_eq!(limits.acquire("t"), 0.0);
        let wait = limits.acquire("t");
        assert!(wait > 59.0 && wait <= 60.0, "{wait}");
        limits.set("t", 0.0);
        assert!(!limits.is_limited("t"));
        assert_eq!(limits.acquire("t"), 0.0);
        limits.set("n", f64::NAN);
        assert!(!limits.is_limited("n"));
    }

    #[test]
    fn the_same_rate_keeps_the_bucket() {
        let start = Instant::now();
        let mut limits = RateLimits::new();
        limits.set("t", 1.0);
        assert_eq!(limits.acquire_at("t", start), 0.0);
        limits.set("t", 1.0);
        assert!(limits.acquire_at("t", start) > 0.0);
    }
}
