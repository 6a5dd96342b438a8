//! Support code for `cargo xtask`: network namespaces, the two-cluster
//! testbed, and traffic checks. Shared by the demo and the end-to-end tests.

pub mod demo;
pub mod kube;
pub mod kube_fixtures;
pub mod kube_nodes;
pub mod kube_testbed;
pub mod lab;
pub mod netns;
pub mod played_kubelet;
pub mod privileged;
pub mod prometheus;
pub mod real_cluster;
pub mod testbed;
pub mod traffic;
pub mod wire;
pub mod workloads;

use std::{path::PathBuf, process::Command, sync::Mutex};

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

/// The ligo-control binary the tests run: `LIGO_CONTROL_BIN`, else the
/// workspace's debug build (`cargo test --workspace` builds it).
pub fn control_binary() -> PathBuf {
    std::env::var_os("LIGO_CONTROL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/ligo-control"))
}

/// The build marker of the "upgraded" daemon: its eBPF programs carry it in
/// their instructions (ligo-fabric-ebpf/src/maps.rs), so they load as
/// different programs from the workspace build's.
pub const UPGRADE_BUILD_MARKER: &str = "1";

/// Where `cargo xtask test` leaves the upgraded daemon.
pub fn prebuilt_upgrade_binary() -> PathBuf {
    workspace_root().join("target/upgrade/ligo-fabric")
}

/// Set by `cargo xtask test` to the upgraded daemon it built for this run.
pub const UPGRADE_BIN_ENV: &str = "LIGO_FABRIC_UPGRADE_BIN";

/// A second build of the daemon whose programs differ from
/// [`daemon_binary`]'s, for upgrade tests. `cargo xtask test` builds it
/// beforehand (and says where in `LIGO_FABRIC_UPGRADE_BIN`); a test run
/// alone builds it here, in a target dir of its own so the workspace build
/// is left alone (cargo makes that a no-op when it is up to date).
pub fn upgraded_daemon_binary() -> anyhow::Result<PathBuf> {
    static BUILT: Mutex<()> = Mutex::new(());
    let _once = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(prebuilt) = std::env::var_os(UPGRADE_BIN_ENV) {
        return Ok(PathBuf::from(prebuilt));
    }
    let target_dir = workspace_root().join("target/upgrade-build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--package", "ligo-fabric", "--bin", "ligo-fabric"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("LIGO_BUILD_MARKER", UPGRADE_BUILD_MARKER)
        .current_dir(workspace_root())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "building the upgraded daemon failed ({status})"
    );
    Ok(target_dir.join("debug/ligo-fabric"))
}
