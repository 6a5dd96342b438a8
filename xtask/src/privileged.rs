//! Whether a privileged test may run, and how a skip is counted.
//!
//! Shared by the xtask tests and, through `#[path]`, by ligo-fabric's
//! BPF_PROG_TEST_RUN tests, so every privileged test skips (or fails under
//! CI) by the same rule. Needs only `std` and `nix`.

use std::io::Write as _;

/// Environment variable naming a file where a skipped test appends its name;
/// `cargo xtask test` sets it and counts the lines as skipped, not passed.
pub const SKIP_LOG_ENV: &str = "LIGO_SKIP_LOG";

/// Whether `CI` holds a true value (`true`, `1`, `yes`, `on`, any case).
pub fn ci_requires_every_test() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on"
        )
    })
}

/// Whether privileged tests can run. Under CI they must: a test that cannot
/// is a failure, never a skip. A skip is recorded for the test runner.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if ci_requires_every_test() {
        panic!("{test} needs root and CI is set: privileged tests must run in CI");
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, eBPF)");
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV) {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| writeln!(f, "{test}"));
        if let Err(e) = written {
            panic!("{test}: cannot record the skip in {log:?}: {e}");
        }
    }
    false
}
