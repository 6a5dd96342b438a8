//! `cargo xtask`: build, demo and test entry points (see README.md).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use xtask::{
    daemon_binary, lab,
    testbed::{Scenario, Testbed},
    workspace_root,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScenarioName {
    /// Both clusters on 10.244.0.0/16.
    Identical,
    /// 10.244.0.0/16 and 10.100.16.0/20 (each keeps the other's real CIDR as
    /// its view: it collides with nothing).
    Different,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the daemon (and, through its build script, the eBPF programs).
    Build,
    /// Two simulated clusters with overlapping pod CIDRs talking through the fabric.
    Demo {
        #[arg(long, value_enum, default_value_t = ScenarioName::Identical)]
        scenario: ScenarioName,
    },
    /// Every check: formatting, lints, unit, eBPF test-run and end-to-end tests.
    Test,
    /// Measure the fabric against direct routing and the kernel reference design.
    Bench {
        /// A short smoke run (CI runs it so the harness never rots).
        #[arg(long)]
        quick: bool,
        /// The Kubernetes figures (peering, unpeering, requests, memory
        /// with many peers) instead of the data path's.
        #[arg(long)]
        kubernetes: bool,
        /// The big node's figures (pods offloaded at once, controller
        /// memory per mirrored pod, API requests per pod).
        #[arg(long, conflicts_with = "kubernetes")]
        offload: bool,
    },
    /// Leave a testbed running for manual debugging (`ligo-dev-*` namespaces), or remove it.
    Testbed {
        #[arg(value_enum)]
        action: TestbedAction,
        #[arg(long, value_enum, default_value_t = ScenarioName::Identical)]
        scenario: ScenarioName,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TestbedAction {
    Up,
    Down,
}

const DEV_PREFIX: &str = "ligo-dev";

impl ScenarioName {
    fn scenario(self) -> Scenario {
        match self {
            ScenarioName::Identical => Scenario::identical_cidrs(),
            ScenarioName::Different => {
                let mut s = Scenario::different_cidrs();
                s.a.view_of_peer = s.b.pod_cidr;
                s
            }
        }
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs cargo in the eBPF crate, which has its own nightly toolchain: the
/// outer cargo's toolchain settings must not leak into it.
fn ebpf_cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let dir = workspace_root().join("ligo-fabric-ebpf");
    let status = Command::new("cargo")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(&dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .status()
        .with_context(|| format!("running cargo {} in {}", args.join(" "), dir.display()))?;
    if !status.success() {
        bail!(
            "cargo {} in ligo-fabric-ebpf failed ({status})",
            args.join(" ")
        );
    }
    Ok(())
}

/// `cargo test --workspace`, echoing its output, then one closing line with
/// the totals over every test binary. A privileged test that returned early
/// (not root, outside CI) reports "ok" to cargo; it records itself in the
/// skip log (`xtask::privileged`) and is counted as skipped, not passed.
fn test_with_summary() -> Result<()> {
    let skip_log = workspace_root().join("target/skipped-tests.txt");
    match std::fs::remove_file(&skip_log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", skip_log.display()))
        }
        _ => {}
    }
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--no-fail-fast"])
        .env(xtask::privileged::SKIP_LOG_ENV, &skip_log)
        .env(xtask::UPGRADE_BIN_ENV, xtask::prebuilt_upgrade_binary())
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = TestTotals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add_result_line(&line);
    }
    let status = child.wait()?;
    let skipped_early = match std::fs::read_to_string(&skip_log) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", skip_log.display())),
    };
    for test in &skipped_early {
        println!("skipped (needs root): {test}");
    }
    let (passed, failed, skipped) = totals.with_early_skips(skipped_early.len() as u64);
    println!("\nsummary: {passed} passed, {failed} failed, {skipped} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Totals over the `test result:` lines of every test binary.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next(), words.next()) {
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }

    /// (passed, failed, skipped) once `early` tests that cargo counted as
    /// passed are known to have returned without running.
    fn with_early_skips(&self, early: u64) -> (u64, u64, u64) {
        (
            self.passed.saturating_sub(early),
            self.failed,
            self.ignored + early,
        )
    }
}

fn build() -> Result<()> {
    cargo(&[
        "build",
        "--package",
        "ligo-fabric",
        "--package",
        "ligo-control",
    ])
}

/// Builds the daemon with a build marker (different programs, see
/// `xtask::upgraded_daemon_binary`) and keeps a copy for the upgrade tests;
/// the plain build that follows puts the workspace's back. Dependencies are
/// shared, so this costs two compiles of ligo-fabric alone.
fn build_upgraded_daemon() -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--package", "ligo-fabric", "--bin", "ligo-fabric"])
        .env("LIGO_BUILD_MARKER", xtask::UPGRADE_BUILD_MARKER)
        .current_dir(workspace_root())
        .status()
        .context("building the upgraded daemon")?;
    if !status.success() {
        bail!("building the upgraded daemon failed ({status})");
    }
    let copy = xtask::prebuilt_upgrade_binary();
    if let Some(dir) = copy.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(workspace_root().join("target/debug/ligo-fabric"), &copy)
        .with_context(|| format!("copying the upgraded daemon to {}", copy.display()))?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Build => build(),
        Cmd::Demo { scenario } => {
            build()?;
            xtask::demo::run(scenario.scenario())
        }
        Cmd::Test => {
            build_upgraded_daemon()?;
            build()?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            // The eBPF nightly ships no clippy: a format check, and a build
            // that turns warnings into errors.
            ebpf_cargo(&["fmt", "--check"], &[])?;
            ebpf_cargo(
                &[
                    "build",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ],
                &[("RUSTFLAGS", "-D warnings")],
            )?;
            // The bench harness must not rot: a short smoke run, before the
            // tests so that their summary closes the output.
            bench(true, false, false)?;
            bench(true, true, false)?;
            bench(true, false, true)?;
            test_with_summary()
        }
        Cmd::Bench {
            quick,
            kubernetes,
            offload,
        } => bench(quick, kubernetes, offload),
        Cmd::Testbed {
            action: TestbedAction::Down,
            ..
        } => {
            lab::remove(DEV_PREFIX);
            Ok(())
        }
        Cmd::Testbed {
            action: TestbedAction::Up,
            scenario,
        } => {
            build()?;
            let mut bed = Testbed::up(DEV_PREFIX, scenario.scenario())?;
            bed.start_fabric(&daemon_binary())?;
            for pod in bed.all_pods() {
                println!(
                    "{:<20} {:<14} seen from the other cluster as {}",
                    pod.netns,
                    pod.ip,
                    bed.address_seen_from_peer(&pod)
                );
            }
            println!("logs and configs: /run/ligo-testbed/{DEV_PREFIX}/; remove with `cargo xtask testbed down`");
            bed.lab.detach();
            Ok(())
        }
    }
}

/// Builds release binaries and runs the harness; a full run writes its
/// report to bench/results, a quick one to target/bench.
fn bench(quick: bool, kubernetes: bool, offload: bool) -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "ligo-fabric",
        "--package",
        "ligo-control",
        "--package",
        "ligo-bench",
    ])?;
    let root = workspace_root();
    let out = if quick {
        root.join("target/bench")
    } else {
        root.join("bench/results")
    };
    let mut args = vec![
        "--daemon".to_owned(),
        root.join("target/release/ligo-fabric")
            .to_string_lossy()
            .into_owned(),
        "--out".to_owned(),
        out.to_string_lossy().into_owned(),
    ];
    if quick {
        args.push("--quick".to_owned());
    }
    if kubernetes {
        args.push("--kubernetes".to_owned());
    }
    if offload {
        args.push("--offload".to_owned());
    }
    // The testbeds run the release binaries too.
    let status = Command::new(root.join("target/release/ligo-bench"))
        .args(&args)
        .env("LIGO_FABRIC_BIN", root.join("target/release/ligo-fabric"))
        .env("LIGO_CONTROL_BIN", root.join("target/release/ligo-control"))
        .status()
        .context("running ligo-bench")?;
    if !status.success() {
        bail!("ligo-bench failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn early_skips_move_from_passed_to_skipped() {
        let mut totals = TestTotals::default();
        totals.add_result_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        totals.add_result_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.50s");
        totals.add_result_line("running 5 tests");
        assert_eq!(
            totals,
            TestTotals {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
        assert_eq!(totals.with_early_skips(4), (11, 2, 5));
    }
}
