//! The one back-off every transport and result store uses between attempts after an
//! error (a lost connection, a refused write): 0.1 s, 0.2 s, 0.4 s, ... up to 2 s.

use std::time::Duration;

const FIRST_MS: u64 = 100;
const LONGEST_MS: u64 = 2000;

/// How long to wait before attempt `attempt + 1` (the first retry is attempt 0).
pub fn backoff(attempt: u32) -> Duration {
    // Doubling stops at 2^5 so the shift cannot overflow however many attempts failed.
    Duration::from_millis((FIRST_MS << attempt.min(5)).min(LONGEST_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_tenth_of_a_second_up_to_two_seconds() {
        let waits: Vec<u64> = (0..7).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(2));
    }
}
