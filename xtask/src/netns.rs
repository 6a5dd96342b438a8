//! Network namespaces as test hosts: run commands in them (through
//! iproute2) and run Rust closures in them (a thread that joined the
//! namespace, so its sockets live there).

use std::{
    fs::File,
    process::{Command, Output, Stdio},
    thread,
};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Runs a command and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {program}: is it installed? `./x bootstrap` installs the test tools")
        })?;
    check(program, args, output)
}

fn check(program: &str, args: &[&str], output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip` with arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// `ip` with a whitespace-separated argument line (no argument of ours
/// contains spaces): `ipc("-n ns1 link set eth0 up")`.
pub fn ipc(line: &str) -> Result<String> {
    let args: Vec<&str> = line.split_whitespace().collect();
    ip(&args)
}

/// Runs `program args` inside namespace `ns`.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    ip(&full)
}

pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    exec(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
}

pub fn add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace, ignoring "does not exist".
pub fn delete(ns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
}

pub fn list() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> Result<()> {
    ip(&[
        "-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b,
    ])?;
    ip(&["-n", ns_a, "link", "set", name_a, "up"])?;
    ip(&["-n", ns_b, "link", "set", name_b, "up"])?;
    Ok(())
}

/// Runs `f` on a thread that has joined namespace `ns`; sockets it opens
/// belong to that namespace.
pub fn within<T, F>(ns: &str, f: F) -> thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
        f()
    })
}

/// Joins a thread started by [`within`].
pub fn join<T>(handle: thread::JoinHandle<Result<T>>) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow!("namespace thread panicked"))?
}
