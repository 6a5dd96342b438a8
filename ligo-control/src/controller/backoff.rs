//! How the controller's watches retry: after 0.5 s, doubling up to 5 s,
//! and from 0.5 s again once a watch works. kube's default waits up to
//! 30 s and stays there for two minutes, so after an API server restart
//! (whose first answer to a resumed watch is "too old resource version")
//! the stores stayed stale for half a minute: a deleted Peer went on
//! being served that long.

use std::time::Duration;

use kube::runtime::utils::Backoff;

const FIRST: Duration = Duration::from_millis(500);
const LONGEST: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(LONGEST);
        Some(now)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_grow_to_five_seconds_and_start_over_after_a_success() {
        let mut b = WatchBackoff::default();
        let seen: Vec<u64> = (0..6)
            .filter_map(|_| b.next())
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(seen, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), Some(FIRST));
    }
}
