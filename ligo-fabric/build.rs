//! Builds the eBPF programs (`../ligo-fabric-ebpf`) with their own pinned
//! nightly toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! aya-build is not used: it builds the eBPF crate as a member of this
//! workspace, while ours stays outside it with its own toolchain file and
//! lock file, so host builds never touch the nightly.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

const EBPF_TOOLCHAIN: &str = "nightly-2026-06-25";
const EBPF_TARGET: &str = "bpfel-unknown-none";
const EBPF_CRATE: &str = "ligo-fabric-ebpf";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("ligo-fabric has no parent dir")?;
    let ebpf_dir = workspace.join(EBPF_CRATE);
    let common_dir = workspace.join("ligo-fabric-common");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for watched in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo::rerun-if-changed={}", watched.display());
    }

    // A build marker (see ligo-fabric-ebpf/src/maps.rs) makes a different
    // object: it gets a target dir of its own so builds with and without it
    // do not rebuild each other.
    println!("cargo::rerun-if-env-changed=LIGO_BUILD_MARKER");
    let marker = env::var("LIGO_BUILD_MARKER").ok();
    // One target dir for every profile and tool (build, clippy, test), so
    // the eBPF crate compiles once; the nested cargo locks it properly.
    let target_dir = match &marker {
        None => workspace.join("target").join("ebpf"),
        Some(marker) => workspace
            .join("target")
            .join(format!("ebpf-marker-{marker}")),
    };
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        EBPF_TOOLCHAIN,
        "cargo",
        "build",
        "--release",
        "--locked",
    ])
    .args(["-Z", "build-std=core", "--target", EBPF_TARGET])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    // The outer cargo's settings are for the host toolchain: keep them out.
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().with_context(|| {
        format!("running {cmd:?}: is rustup installed? `./x bootstrap` installs what is missing")
    })?;
    if !status.success() {
        bail!(
            "building the eBPF programs failed ({status}); `./x bootstrap` installs the {EBPF_TOOLCHAIN} toolchain and bpf-linker"
        );
    }
    let object = target_dir
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_CRATE);
    fs::copy(&object, out_dir.join("ligo-fabric-ebpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
