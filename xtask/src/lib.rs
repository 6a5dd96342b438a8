//! Support code for `cargo xtask`: network namespaces, the two-cluster
//! testbed, and traffic checks. Shared by the demo and the end-to-end tests.

pub mod lab;
pub mod netns;
pub mod prometheus;
pub mod testbed;
pub mod traffic;
pub mod wire;

use std::path::PathBuf;

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The ligo-fabric binary the testbed runs: `LIGO_FABRIC_BIN`, else the
/// workspace's debug build.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("LIGO_FABRIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/ligo-fabric"))
}

/// Whether privileged tests can run. Under CI=true they must: a test that
/// cannot is a failure, never a skip.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root and CI=true: privileged tests must run in CI");
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, eBPF)");
    false
}
