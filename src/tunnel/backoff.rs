//! Jittered exponential backoff for reconnect loops ("full jitter": a random wait between zero
//! and the current cap, so a fleet of agents does not reconnect in lockstep after a relay restart).
//!
//! A reconnect loop reports how long each connection stayed up ([`Backoff::connection_ended`]);
//! only one that stayed up for [`STABLE_AFTER`] starts the next wait from the base again. A relay
//! that accepts and then drops every connection at once is therefore backed off from like one
//! that refuses, instead of being hammered at the base rate.

use std::time::Duration;

use rand::Rng;

/// A connection that stayed up this long was healthy: the failure that ended it is treated as
/// the first. Two ping intervals: long enough to prove the peer really serves us.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let millis = cap.as_millis().max(1) as u64;
        // Never less than half the cap: a full-jitter zero would hammer a relay that is down.
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A connection that had been established ended after `up_for`: forget earlier failures
    /// only when it had proved stable.
    pub fn connection_ended(&mut self, up_for: Duration) {
        if up_for >= STABLE_AFTER {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn only_a_stable_connection_resets_the_wait() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            b.next_delay();
        }
        // A connection that dropped straight away changes nothing: the wait keeps growing.
        b.connection_ended(Duration::from_millis(500));
        assert!(b.next_delay() >= Duration::from_millis(1600));
        b.connection_ended(STABLE_AFTER);
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
