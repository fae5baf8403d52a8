//! A point in time by which work must be done, shared by everything one call does in a namespace:
//! waiting for another call's lock, each tool it runs, each netlink exchange.
//!
//! Nothing in `kernel` waits without one: a hung `iptables-restore` or a kernel that never answers
//! must end the call with an error the runtime can show, inside the runtime's own budget, never
//! hold the pod's sandbox forever.

use std::time::{Duration, Instant};

/// When work must be done by, and the budget it was given (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// `budget` from now.
    pub fn after(budget: Duration) -> Deadline {
        Deadline { at: Instant::now() + budget, budget }
    }

    /// The time left, zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Has it passed?
    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The budget it was made with.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_down_to_zero_and_stays_there() {
        let d = Deadline::after(Duration::from_millis(30));
        assert!(!d.expired() && d.remaining() <= Duration::from_millis(30));
        assert_eq!(d.budget(), Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert!(d.expired());
        assert_eq!(d.remaining(), Duration::ZERO);
    }
}
