//! Whether the app this node balances for answers: the verdicts of a health checker, with
//! thresholds so that one lost check does not move traffic.
//!
//! The checker's IO (a TCP connect or an HTTP GET to the VIP on this node) lives in the binary;
//! here only the rule: `fall` failures in a row make a healthy app unhealthy, `rise` successes
//! in a row make it healthy again. A node starts *unknown*, which counts as unhealthy, and its
//! first success makes it healthy at once: a starting node takes new flows only once its app
//! answers, but without waiting for `rise` checks.

use crate::Timestamp;

/// What the checker last concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHealth {
    /// No check has succeeded yet.
    Unknown,
    Healthy,
    Unhealthy,
}

impl AppHealth {
    pub fn name(self) -> &'static str {
        match self {
            AppHealth::Unknown => "unknown",
            AppHealth::Healthy => "healthy",
            AppHealth::Unhealthy => "unhealthy",
        }
    }

    /// Whether the node may take new flows.
    pub fn takes_flows(self) -> bool {
        self == AppHealth::Healthy
    }
}

/// Thresholds and the running count.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    rise: u32,
    fall: u32,
    state: AppHealth,
    /// Successes (positive) or failures (negative) in a row.
    streak: i64,
    since: Timestamp,
    pub checks_ok: u64,
    pub checks_failed: u64,
}

impl HealthCheck {
    /// `rise` and `fall` are at least 1.
    pub fn new(rise: u32, fall: u32, now: Timestamp) -> Self {
        HealthCheck {
            rise: rise.max(1),
            fall: fall.max(1),
            state: AppHealth::Unknown,
            streak: 0,
            since: now,
            checks_ok: 0,
            checks_failed: 0,
        }
    }

    pub fn state(&self) -> AppHealth {
        self.state
    }

    /// When the state last changed.
    pub fn since(&self) -> Timestamp {
        self.since
    }

    /// Records one check; the new state when it changed.
    pub fn record(&mut self, now: Timestamp, ok: bool) -> Option<AppHealth> {
        if ok {
            self.checks_ok += 1;
            self.streak = self.streak.max(0) + 1;
        } else {
            self.checks_failed += 1;
            self.streak = self.streak.min(0) - 1;
        }
        let next = match (self.state, ok) {
            (AppHealth::Unknown, true) => AppHealth::Healthy,
            (AppHealth::Unknown, false) if -self.streak >= i64::from(self.fall) => AppHealth::Unhealthy,
            (AppHealth::Healthy, false) if -self.streak >= i64::from(self.fall) => AppHealth::Unhealthy,
            (AppHealth::Unhealthy, true) if self.streak >= i64::from(self.rise) => AppHealth::Healthy,
            (s, _) => s,
        };
        (next != self.state).then(|| {
            self.state = next;
            self.since = now;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_duration(std::time::Duration::from_secs(s))
    }

    #[test]
    fn the_first_success_makes_a_new_node_healthy() {
        let mut h = HealthCheck::new(3, 2, at(0));
        assert!(!h.state().takes_flows(), "unknown takes no flows");
        assert_eq!(h.record(at(1), true), Some(AppHealth::Healthy));
        assert_eq!(h.since(), at(1));
    }

    #[test]
    fn fall_failures_in_a_row_make_it_unhealthy_and_rise_successes_bring_it_back() {
        let mut h = HealthCheck::new(2, 3, at(0));
        h.record(at(0), true);
        assert_eq!(h.record(at(1), false), None);
        assert_eq!(h.record(at(2), false), None);
        assert_eq!(h.record(at(3), true), None, "a success resets the failures");
        assert_eq!(h.record(at(4), false), None);
        assert_eq!(h.record(at(5), false), None);
        assert_eq!(h.record(at(6), false), Some(AppHealth::Unhealthy));
        assert_eq!(h.record(at(7), true), None);
        assert_eq!(h.record(at(8), false), None, "a failure resets the successes");
        assert_eq!(h.record(at(9), true), None);
        assert_eq!(h.record(at(10), true), Some(AppHealth::Healthy));
        assert_eq!((h.checks_ok, h.checks_failed), (5, 6));
    }

    #[test]
    fn an_app_that_never_answers_is_unhealthy_after_fall_checks() {
        let mut h = HealthCheck::new(2, 2, at(0));
        assert_eq!(h.record(at(1), false), None);
        assert_eq!(h.record(at(2), false), Some(AppHealth::Unhealthy));
    }
}
