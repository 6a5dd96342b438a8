//! The eBPF programs stamp packets with CLOCK_BOOTTIME nanoseconds; these
//! turn such stamps into ages and Unix times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{clock_gettime, ClockId};

/// Now, in CLOCK_BOOTTIME nanoseconds.
pub fn boot_now_ns() -> Option<u64> {
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    Some(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// How long ago a stamp was taken; `None` for 0 (never).
pub fn age(boot_ns: u64) -> Option<Duration> {
    if boot_ns == 0 {
        return None;
    }
    Some(Duration::from_nanos(boot_now_ns()?.saturating_sub(boot_ns)))
}

/// The Unix time of a stamp, in seconds; `None` for 0 (never).
pub fn unix_seconds(boot_ns: u64) -> Option<f64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some(now.checked_sub(age(boot_ns)?)?.as_secs_f64())
}

/// "3.2s ago", "5m ago", "never".
pub fn human_age(boot_ns: u64) -> String {
    match age(boot_ns) {
        None => "never".into(),
        Some(a) if a < Duration::from_secs(120) => format!("{:.1}s ago", a.as_secs_f64()),
        Some(a) if a < Duration::from_secs(7200) => format!("{}m ago", a.as_secs() / 60),
        Some(a) => format!("{}h ago", a.as_secs() / 3600),
    }
}
