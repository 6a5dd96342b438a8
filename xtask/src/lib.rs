//! Support code for `cargo xtask`: network namespaces, the two-cluster
//! testbed, and traffic checks. Shared by the demo and the end-to-end tests.

pub mod lab;
pub mod netns;
pub mod privileged;
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

pub use privileged::require_root;
