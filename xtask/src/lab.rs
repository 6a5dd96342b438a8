//! A lab: a named set of network namespaces with fabric daemons running in
//! some of them, and the files, bpffs mount and processes that go with them.
//! Dropping a [`Lab`] (or calling [`Lab::down`]) stops the daemons — each
//! removes what it installed — and deletes everything; [`Lab::new`] first
//! clears leftovers of a killed run with the same prefix.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{self, ip, ipc};

pub struct Lab {
    pub prefix: String,
    run_dir: PathBuf,
    bpffs_mounted: bool,
    processes: Vec<(String, Child)>,
    torn_down: bool,
}

impl Lab {
    pub fn new(prefix: &str) -> Result<Self> {
        let run_dir = run_dir(prefix);
        clear_leftovers(prefix, &run_dir);
        fs::create_dir_all(run_dir.join("bpffs"))
            .with_context(|| format!("creating {}", run_dir.display()))?;
        Ok(Self {
            prefix: prefix.into(),
            run_dir,
            bpffs_mounted: false,
            processes: vec![],
            torn_down: false,
        })
    }

    /// The namespace name for `host` in this lab.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Creates namespace `host` of this lab and returns its name.
    pub fn add_ns(&self, host: &str) -> Result<String> {
        let ns = self.ns(host);
        netns::add(&ns)?;
        Ok(ns)
    }

    pub fn config_path(&self, ns: &str) -> PathBuf {
        self.run_dir.join(format!("{ns}.toml"))
    }

    pub fn log_path(&self, ns: &str) -> PathBuf {
        self.run_dir.join(format!("{ns}.log"))
    }

    pub fn pid_path(&self, ns: &str) -> PathBuf {
        self.run_dir.join(format!("{ns}.pid"))
    }

    /// Where the daemon in `ns` pins its maps (on the lab's own bpffs).
    pub fn pin_dir(&self, ns: &str) -> PathBuf {
        self.run_dir.join("bpffs").join(ns)
    }

    /// Writes `config` and starts a daemon in `ns`, waiting until it is ready.
    pub fn start_daemon(&mut self, daemon: &Path, ns: &str, config: &str) -> Result<()> {
        self.start_daemon_via(&[], daemon, ns, config)
    }

    /// Like [`Lab::start_daemon`], the daemon run through `wrapper` (a
    /// command and its arguments, e.g. `setpriv` with capability options).
    pub fn start_daemon_via(
        &mut self,
        wrapper: &[&str],
        daemon: &Path,
        ns: &str,
        config: &str,
    ) -> Result<()> {
        self.mount_bpffs()?;
        fs::write(self.config_path(ns), config)?;
        let config_path = self.config_path(ns);
        let run_args = [
            daemon.as_os_str(),
            OsStr::new("run"),
            OsStr::new("--config"),
            config_path.as_os_str(),
        ];
        let mut command: Vec<&OsStr> = wrapper.iter().map(OsStr::new).collect();
        command.extend(run_args);
        self.spawn(ns, ns, command[0], &command[1..])?;
        self.wait_for_log(ns, "fabric ready")
    }

    /// Starts `daemon run ARGS` in `ns` (arguments other than a config file,
    /// e.g. `--kubernetes …`) and waits until it reports ready.
    pub fn start_daemon_with(&mut self, daemon: &Path, ns: &str, args: &[&str]) -> Result<()> {
        self.mount_bpffs()?;
        let mut command: Vec<&OsStr> = vec![OsStr::new("run")];
        command.extend(args.iter().map(OsStr::new));
        self.spawn(ns, ns, daemon.as_os_str(), &command)?;
        self.wait_for_log(ns, "fabric ready")
    }

    /// The lab's bpffs (pin dirs live in it), mounted once.
    fn mount_bpffs(&mut self) -> Result<()> {
        if !self.bpffs_mounted {
            netns::run(
                "mount",
                &[
                    "-t",
                    "bpf",
                    "bpf",
                    &self.run_dir.join("bpffs").to_string_lossy(),
                ],
            )?;
            self.bpffs_mounted = true;
        }
        Ok(())
    }

    /// The name the tunnel process of the gateway in `ns` runs under.
    pub fn tunnel_process(ns: &str) -> String {
        format!("{ns}-tunnel")
    }

    /// Starts `ligo-fabric tunnel` (the WireGuard tunnel of the gateway in
    /// `ns`, configured by its daemon) and waits until it is up.
    pub fn start_tunnel(&mut self, daemon: &Path, ns: &str) -> Result<()> {
        self.start_tunnel_via(&[], daemon, ns)
    }

    /// Like [`Lab::start_tunnel`], run through `wrapper`.
    pub fn start_tunnel_via(&mut self, wrapper: &[&str], daemon: &Path, ns: &str) -> Result<()> {
        let name = Self::tunnel_process(ns);
        self.spawn_tunnel(wrapper, daemon, ns, &name)?;
        self.wait_for_log(&name, "tunnel ready")
    }

    /// Starts `ligo-fabric tunnel` for the gateway in `ns` as process
    /// `name`, through `wrapper`, without waiting.
    pub fn spawn_tunnel(
        &mut self,
        wrapper: &[&str],
        daemon: &Path,
        ns: &str,
        name: &str,
    ) -> Result<()> {
        let socket = self.wireguard_socket(ns);
        let mut command: Vec<&OsStr> = wrapper.iter().map(OsStr::new).collect();
        command.extend([
            daemon.as_os_str(),
            OsStr::new("tunnel"),
            OsStr::new("--status-socket"),
            socket.as_os_str(),
        ]);
        self.spawn(ns, name, command[0], &command[1..])
    }

    /// Starts a new tunnel process (from `binary`) for the gateway in `ns`
    /// while the running one serves: the new one takes over, the old one
    /// exits by itself. Returns the old one's log.
    pub fn take_over_tunnel(&mut self, binary: &Path, ns: &str) -> Result<String> {
        let name = Self::tunnel_process(ns);
        let old_log = self.log_path(&format!("{name}-old"));
        let pos = self
            .processes
            .iter()
            .position(|(n, _)| *n == name)
            .with_context(|| format!("no tunnel process runs in {ns}"))?;
        let (_, mut old) = self.processes.remove(pos);
        // The old process keeps writing to its (renamed) log.
        fs::rename(self.log_path(&name), &old_log)?;
        let started = self.start_tunnel(binary, ns);
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            match old.try_wait()? {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => break None,
                None => thread::sleep(Duration::from_millis(20)),
            }
        };
        let log = fs::read_to_string(&old_log).unwrap_or_default();
        started?;
        match exited {
            Some(status) if status.success() => Ok(log),
            Some(status) => bail!("the old tunnel process exited with {status}:\n{log}"),
            None => {
                let _ = old.kill();
                let _ = old.wait();
                bail!("the old tunnel process did not exit after the take-over:\n{log}")
            }
        }
    }

    /// Waits until process `name`'s log contains `needle`.
    pub fn wait_for_log(&mut self, name: &str, needle: &str) -> Result<()> {
        let log_path = self.log_path(name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains(needle) {
                return Ok(());
            }
            let exited = self
                .processes
                .iter_mut()
                .find(|(n, _)| n == name)
                .and_then(|(_, c)| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!("{name} exited ({status}) before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("{name} not ready after 20 s:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts boringtun-cli in `ns` as process `name` (in the foreground,
    /// with `flags` too), creating interface `wg_if`, and configures it with
    /// `wg set wg_if wg_set_args…`.
    ///
    /// `wg` must not be run before boringtun-cli listens: between its bind()
    /// and listen() a connect is refused, and `wg` then unlinks the socket as
    /// stale; boringtun-cli notices its socket is gone and exits without a
    /// word. So wait for the socket to accept a connection of our own first.
    pub fn start_boringtun_cli(
        &mut self,
        ns: &str,
        name: &str,
        flags: &[&str],
        wg_if: &str,
        wg_set_args: &[&str],
    ) -> Result<()> {
        let mut argv: Vec<&OsStr> = vec![
            "--foreground".as_ref(),
            "--disable-drop-privileges".as_ref(),
        ];
        argv.extend(flags.iter().map(OsStr::new));
        argv.push(wg_if.as_ref());
        self.spawn(ns, name, "boringtun-cli".as_ref(), &argv)?;
        // Shared by all namespaces: each caller picks its own interface name.
        let socket = PathBuf::from(format!("/var/run/wireguard/{wg_if}.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let exited = self
                .processes
                .iter_mut()
                .find(|(n, _)| n == name)
                .and_then(|(_, c)| c.try_wait().ok().flatten());
            let log = || fs::read_to_string(self.log_path(name)).unwrap_or_default();
            if let Some(status) = exited {
                bail!(
                    "boringtun-cli ({name}) exited ({status}) before it listened on {}:\n{}",
                    socket.display(),
                    log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "boringtun-cli ({name}) did not listen on {} within 20 s:\n{}",
                    socket.display(),
                    log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let mut args = vec!["set", wg_if];
        args.extend_from_slice(wg_set_args);
        netns::exec(ns, "wg", &args)
            .map(drop)
            .with_context(|| format!("configuring boringtun-cli ({name}) with wg"))
    }

    /// Starts `program args` in namespace `ns` as process `name` (its log
    /// and pid file are named after it); the lab stops it on teardown.
    pub fn spawn(&mut self, ns: &str, name: &str, program: &OsStr, args: &[&OsStr]) -> Result<()> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        self.spawn_command(name, command)
            .with_context(|| format!("starting {} in {ns}", program.to_string_lossy()))
    }

    /// Like [`Lab::spawn`], in the root network namespace.
    pub fn spawn_here(&mut self, name: &str, program: &OsStr, args: &[&OsStr]) -> Result<()> {
        let mut command = Command::new(program);
        command.args(args);
        self.spawn_command(name, command)
            .with_context(|| format!("starting {}", program.to_string_lossy()))
    }

    /// Starts `command` as process `name`, logging to its log file.
    fn spawn_command(&mut self, name: &str, mut command: Command) -> Result<()> {
        let log = fs::File::create(self.log_path(name))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        fs::write(self.pid_path(name), child.id().to_string())?;
        self.processes.push((name.to_owned(), child));
        Ok(())
    }

    /// The bpffs directory that stands for node `ns`'s `/sys/fs/bpf`
    /// (a daemon's `--pin-dir` lies below it).
    pub fn bpffs_of(&mut self, ns: &str) -> Result<PathBuf> {
        self.mount_bpffs()?;
        let dir = self.pin_dir(ns);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// A file in this lab's run directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// The status socket of the gateway in `ns` (its daemon's
    /// gateway.wireguard_status_socket; the tunnel's desired configuration
    /// lies beside it).
    pub fn wireguard_socket(&self, ns: &str) -> PathBuf {
        self.file(&format!("{ns}-wireguard.sock"))
    }

    /// Stops the daemon in `ns` with SIGTERM and waits; returns its log.
    pub fn stop_daemon(&mut self, ns: &str) -> Result<String> {
        if let Some(pos) = self.processes.iter().position(|(n, _)| n == ns) {
            let (_, mut child) = self.processes.remove(pos);
            terminate(&mut child);
        }
        Ok(fs::read_to_string(self.log_path(ns)).unwrap_or_default())
    }

    /// Kills the daemon in `ns` with SIGKILL (a crash) and reaps it.
    pub fn kill_daemon(&mut self, ns: &str) -> Result<()> {
        kill_named(&mut self.processes, ns)
    }

    /// `ligo-fabric inspect maps -o json` for the daemon in `ns`.
    pub fn inspect(&self, daemon: &Path, ns: &str) -> Result<serde_json::Value> {
        let out = netns::run(
            &daemon.to_string_lossy(),
            &[
                "inspect",
                "maps",
                "--pin-dir",
                &self.pin_dir(ns).to_string_lossy(),
                "-o",
                "json",
            ],
        )?;
        serde_json::from_str(&out).context("inspect printed invalid JSON")
    }

    /// `ligo-fabric inspect tunnels -o json` for the gateway daemon in `ns`
    /// (it asks the daemon's metrics endpoint, so it runs inside `ns`).
    pub fn inspect_tunnels(&self, daemon: &Path, ns: &str) -> Result<serde_json::Value> {
        let config = self.config_path(ns);
        let out = netns::exec(
            ns,
            &daemon.to_string_lossy(),
            &[
                "inspect",
                "tunnels",
                "--config",
                &config.to_string_lossy(),
                "-o",
                "json",
            ],
        )?;
        serde_json::from_str(&out).context("inspect tunnels printed invalid JSON")
    }

    /// The daemon logs, for failure reports.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (ns, _) in &self.processes {
            let _ = writeln!(
                out,
                "--- {ns} ---\n{}",
                fs::read_to_string(self.log_path(ns)).unwrap_or_default()
            );
        }
        out
    }

    /// Leaves the lab and its daemons running after `self` is dropped.
    pub fn detach(mut self) {
        self.torn_down = true;
        self.processes.clear();
    }

    pub fn down(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        for (_, mut child) in self.processes.drain(..) {
            terminate(&mut child);
        }
        clear_leftovers(&self.prefix, &self.run_dir);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

fn run_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/ligo-testbed/{prefix}"))
}

/// The MAC address of interface `name` in namespace `ns`.
pub fn interface_mac(ns: &str, name: &str) -> Result<String> {
    let out = ip(&["-n", ns, "-br", "link", "show", name])?;
    out.split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .with_context(|| format!("no MAC address for {name} in {ns}: {out}"))
}

/// Wires pod namespace `pod_ns` (address `pod_ip`) to node `node_ns` the
/// way Calico does: a /32 on the pod's eth0, the node end of the veth
/// (`host_if`) as its next hop 169.254.1.1, a /32 route on the node.
pub fn attach_pod(node_ns: &str, host_if: &str, pod_ns: &str, pod_ip: Ipv4Addr) -> Result<()> {
    netns::veth(node_ns, host_if, pod_ns, "eth0")?;
    ipc(&format!("-n {pod_ns} addr add {pod_ip}/32 dev eth0"))?;
    ipc(&format!(
        "-n {pod_ns} route add 169.254.1.1 dev eth0 scope link"
    ))?;
    ipc(&format!(
        "-n {pod_ns} route add default via 169.254.1.1 dev eth0"
    ))?;
    let node_mac = interface_mac(node_ns, host_if)?;
    ipc(&format!(
        "-n {pod_ns} neigh add 169.254.1.1 lladdr {node_mac} dev eth0 nud permanent"
    ))?;
    ipc(&format!("-n {node_ns} route add {pod_ip}/32 dev {host_if}"))?;
    Ok(())
}

/// SIGTERM, then SIGKILL after 5 s; always reaps. (`ip netns exec` execs
/// the program, so the child's pid is the program's own.)
pub(crate) fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills process `name` of `processes` with SIGKILL (a crash) and reaps it.
pub(crate) fn kill_named(processes: &mut Vec<(String, Child)>, name: &str) -> Result<()> {
    if let Some(pos) = processes.iter().position(|(n, _)| n == name) {
        let (_, mut child) = processes.remove(pos);
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

/// Removes everything a lab named `prefix` may have left behind.
pub fn remove(prefix: &str) {
    clear_leftovers(prefix, &run_dir(prefix));
}

/// Daemons (by recorded pid), namespaces, the bpffs mount, the run directory.
fn clear_leftovers(prefix: &str, run_dir: &Path) {
    if let Ok(entries) = fs::read_dir(run_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                if let Some(pid) = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
    if let Ok(names) = netns::list() {
        for ns in names
            .iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
        {
            netns::delete(ns);
        }
    }
    let bpffs = run_dir.join("bpffs");
    let _ = Command::new("umount")
        .arg(&bpffs)
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir_all(run_dir);
}
