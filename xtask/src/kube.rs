//! A real Kubernetes control plane per simulated cluster: etcd and
//! kube-apiserver (and, when asked, kube-controller-manager and
//! kube-scheduler), built by `xtask/kube/build-kube.sh` into a cache outside
//! the clone.
//!
//! Network safety: each control plane runs in a network namespace of its own
//! and is reached from the root namespace through one veth with link-local
//! addresses (169.254.N.0/30). The root namespace gets no route to any pod,
//! service, view or underlay range, so identical pod CIDRs in two clusters
//! stay unambiguous and nothing of a cluster can leave the machine. etcd
//! listens on the namespace's own loopback, so every cluster uses the same
//! ports without collisions.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{
    lab::{kill_named, terminate},
    netns::{self, ipc},
};

/// The API server's port inside its namespace.
pub const APISERVER_PORT: u16 = 6443;
/// The admin token the harness's kubeconfig carries (static token file).
const ADMIN_TOKEN: &str = "ligo-test-admin";

/// Where `xtask/kube/build-kube.sh` leaves the Kubernetes binaries:
/// `LIGO_KUBE_BIN`, else `~/.cache/ligo-kube`.
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LIGO_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ligo-kube")
}

fn kube_binary(name: &str) -> Result<PathBuf> {
    let path = kube_bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: `./x bootstrap` builds the Kubernetes binaries (about 7 minutes, once)",
            path.display()
        );
    }
    Ok(path)
}

/// What a control plane is started with.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Picks the link-local /30 (169.254.N.0/30); unique per concurrent test.
    pub index: u8,
    /// `--service-cluster-ip-range` (must end in .0).
    pub service_cidr: String,
    /// kube-controller-manager's `--cluster-cidr`, when it runs.
    pub cluster_cidr: String,
    /// Also run kube-controller-manager (garbage collector, token Secrets,
    /// node IPAM, …; not the node lifecycle controller: nodes are hand-made)
    /// and kube-scheduler.
    pub controllers: bool,
    /// More addresses the API server's certificate names (where nodes
    /// reach it: see [`ControlPlane::attach`]); the first is also the
    /// address it advertises (the `kubernetes` Service's endpoint).
    pub extra_addresses: Vec<Ipv4Addr>,
    /// Real kubelets will join (not hand-made Nodes): the ServiceAccount
    /// admission plugin mounts pods' tokens, and taints and the node
    /// lifecycle controller follow the kubelets' reports.
    pub real_nodes: bool,
    /// Run the node lifecycle controller even with hand-made Nodes (they
    /// turn NotReady after the grace period: for tests of a node that does
    /// report, such as a virtual node).
    pub node_lifecycle: bool,
    /// `--kube-api-qps` for kube-controller-manager and kube-scheduler
    /// (burst twice that); their defaults (20 and 50) when not given.
    pub controllers_qps: Option<u32>,
}

impl ControlPlaneOptions {
    pub fn new(index: u8) -> Self {
        Self {
            index,
            service_cidr: "10.96.0.0/24".into(),
            cluster_cidr: "10.244.0.0/16".into(),
            controllers: false,
            extra_addresses: Vec::new(),
            real_nodes: false,
            node_lifecycle: false,
            controllers_qps: None,
        }
    }
}

/// A running control plane; dropping it stops every process and removes
/// its namespace and files.
pub struct ControlPlane {
    pub name: String,
    /// The namespace etcd and the API server run in.
    pub netns: String,
    /// The API server as the root namespace reaches it.
    pub url: String,
    /// An admin kubeconfig for [`Self::url`].
    pub kubeconfig: PathBuf,
    /// The CA bundle (PEM) that signed the API server's certificate.
    pub ca_pem: String,
    dir: PathBuf,
    processes: Vec<(String, Child)>,
    /// How kube-apiserver was started (to start it again after an outage).
    apiserver_command: Vec<String>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver (and the controllers when asked) and
    /// returns once `/readyz` answers. `name` prefixes the namespace and
    /// the files; leftovers of a killed run with the same name go first.
    pub fn start(name: &str, options: &ControlPlaneOptions) -> Result<Self> {
        let apiserver = kube_binary("kube-apiserver")?;
        let dir = PathBuf::from(format!("/run/ligo-testbed/{name}-kube"));
        let netns = format!("{name}-cp");
        clear_leftovers(&netns, &dir);
        fs::create_dir_all(dir.join("etcd"))?;
        let host_if = format!("{name}-k");
        let root_addr = Ipv4Addr::new(169, 254, options.index, 1);
        let cp_addr = Ipv4Addr::new(169, 254, options.index, 2);
        netns::add(&netns)?;
        ipc(&format!(
            "link add {host_if} type veth peer name k0 netns {netns}"
        ))?;
        ipc(&format!("addr add {root_addr}/30 dev {host_if}"))?;
        ipc(&format!("link set {host_if} up"))?;
        ipc(&format!("-n {netns} addr add {cp_addr}/30 dev k0"))?;
        ipc(&format!("-n {netns} link set k0 up"))?;

        // Pods reach the API server at the first address of the service
        // range (the `kubernetes` Service).
        let kubernetes_service = first_service_address(&options.service_cidr)?;
        let mut addresses = vec![
            IpAddr::V4(cp_addr),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(kubernetes_service),
        ];
        addresses.extend(options.extra_addresses.iter().copied().map(IpAddr::V4));
        let pki = Pki::generate(&addresses)?;
        pki.write(&dir)?;
        fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )?;
        let url = format!("https://{cp_addr}:{APISERVER_PORT}");
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, admin_kubeconfig(&url, &pki.ca_pem))?;
        // The controllers reach the API server on the namespace's loopback.
        let local_kubeconfig = dir.join("kubeconfig.local");
        fs::write(
            &local_kubeconfig,
            admin_kubeconfig(&format!("https://127.0.0.1:{APISERVER_PORT}"), &pki.ca_pem),
        )?;

        let mut plane = ControlPlane {
            name: name.to_owned(),
            netns,
            url,
            kubeconfig,
            ca_pem: pki.ca_pem.clone(),
            dir,
            processes: Vec::new(),
            apiserver_command: Vec::new(),
        };
        let d = plane.dir.clone();
        let p = |file: &str| d.join(file).to_string_lossy().into_owned();
        plane.spawn(
            "etcd",
            Path::new("etcd"),
            &[
                "--name",
                "ligo-test",
                "--data-dir",
                &p("etcd"),
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "ligo-test=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ],
        )?;
        // A link-local address may not be an Endpoints address.
        let advertise = options
            .extra_addresses
            .first()
            .copied()
            .unwrap_or(cp_addr)
            .to_string();
        let (disabled_admission, controllers) = if options.real_nodes {
            ("", "*")
        } else if options.node_lifecycle {
            ("ServiceAccount,TaintNodesByCondition", "*")
        } else {
            // Hand-made Nodes stay schedulable (no kubelet clears the
            // not-ready taint) and pods need no ServiceAccount.
            ("ServiceAccount,TaintNodesByCondition", "*,-nodelifecycle")
        };
        let port = APISERVER_PORT.to_string();
        let apiserver_args: Vec<String> = [
            "--etcd-servers",
            "http://127.0.0.1:2379",
            "--bind-address",
            "0.0.0.0",
            "--advertise-address",
            &advertise,
            "--secure-port",
            &port,
            "--tls-cert-file",
            &p("server.crt"),
            "--tls-private-key-file",
            &p("server.key"),
            "--client-ca-file",
            &p("ca.crt"),
            "--token-auth-file",
            &p("tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--service-account-key-file",
            &p("sa.pub"),
            "--service-account-signing-key-file",
            &p("sa.key"),
            "--service-cluster-ip-range",
            &options.service_cidr,
            "--allow-privileged=true",
            "--disable-admission-plugins",
            disabled_admission,
            "--endpoint-reconciler-type",
            "lease",
            "--kubelet-preferred-address-types",
            "InternalIP",
            "--cert-dir",
            &p("certs"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        plane.apiserver_command = std::iter::once(apiserver.to_string_lossy().into_owned())
            .chain(apiserver_args)
            .collect();
        plane.spawn_apiserver()?;
        plane.wait_ready()?;
        if options.controllers {
            let kcm = kube_binary("kube-controller-manager")?;
            let scheduler = kube_binary("kube-scheduler")?;
            let kc = local_kubeconfig.to_string_lossy().into_owned();
            let qps: Vec<String> = options
                .controllers_qps
                .map(|q| {
                    vec![
                        format!("--kube-api-qps={q}"),
                        format!("--kube-api-burst={}", 2 * q),
                    ]
                })
                .unwrap_or_default();
            let qps: Vec<&str> = qps.iter().map(String::as_str).collect();
            let (sa_key, ca_crt, ca_key) = (p("sa.key"), p("ca.crt"), p("ca.key"));
            let mut kcm_args = vec![
                "--kubeconfig",
                &kc,
                "--leader-elect=false",
                "--port=0",
                "--bind-address",
                "127.0.0.1",
                "--controllers",
                controllers,
                "--service-account-private-key-file",
                &sa_key,
                "--root-ca-file",
                &ca_crt,
                "--cluster-signing-cert-file",
                &ca_crt,
                "--cluster-signing-key-file",
                &ca_key,
                "--allocate-node-cidrs",
                "--cluster-cidr",
                &options.cluster_cidr,
                "--node-cidr-mask-size",
                "24",
                "--service-cluster-ip-range",
                &options.service_cidr,
            ];
            kcm_args.extend(&qps);
            plane.spawn("kube-controller-manager", &kcm, &kcm_args)?;
            let mut scheduler_args = vec![
                "--kubeconfig",
                &kc,
                "--leader-elect=false",
                "--port=0",
                "--bind-address",
                "127.0.0.1",
            ];
            scheduler_args.extend(&qps);
            plane.spawn("kube-scheduler", &scheduler, &scheduler_args)?;
        }
        Ok(plane)
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<()> {
        let netns = self.netns.clone();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &netns])
            .arg(program)
            .args(args);
        self.spawn_command(name, command)
    }

    /// Starts `program args` in the root namespace (it reaches the API
    /// server over the link-local veth) as process `name` of this cluster:
    /// logged beside the others, stopped with them.
    pub fn start_process(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<()> {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        self.spawn_command(name, command)
    }

    /// Kills process `name` with SIGKILL (a crash) and reaps it.
    pub fn kill_process(&mut self, name: &str) -> Result<()> {
        kill_named(&mut self.processes, name)
    }

    fn spawn_command(&mut self, name: &str, mut command: Command) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} for {}", self.name))?;
        fs::write(self.dir.join(format!("{name}.pid")), child.id().to_string())?;
        self.processes.push((name.to_owned(), child));
        Ok(())
    }

    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
    }

    /// The last lines of every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for (name, _) in &self.processes {
            let log = fs::read_to_string(self.log_path(name)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            all.push_str(&format!("--- {} {name} ---\n", self.name));
            for line in tail.iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.kubectl(&["get", "--raw", "/readyz"]).is_ok() {
                return Ok(());
            }
            for (name, child) in &mut self.processes {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = fs::read_to_string(self.dir.join(format!("{name}.log")))
                        .unwrap_or_default();
                    bail!("{name} of {} exited ({status}):\n{log}", self.name);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the API server of {} was not ready within 60 s:\n{}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs kubectl against this cluster as admin; returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let kubeconfig = self.kubeconfig.to_string_lossy();
        let mut full = vec!["--kubeconfig", &kubeconfig, "--request-timeout", "10s"];
        full.extend_from_slice(args);
        netns::run("kubectl", &full)
    }

    /// Puts the control plane on a cluster's underlay too: a veth from its
    /// namespace into bridge `br0` of namespace `underlay_ns`, holding
    /// `address`/24, so the cluster's nodes reach the API server at
    /// `https://address:6443` (name `address` in `extra_addresses`).
    /// Returns a kubeconfig for that URL (admin).
    pub fn attach(&self, underlay_ns: &str, address: Ipv4Addr) -> Result<PathBuf> {
        self.attach_to(underlay_ns, "kube", "ul0", address)?;
        let path = self.dir.join("kubeconfig.underlay");
        fs::write(
            &path,
            admin_kubeconfig(&format!("https://{address}:{APISERVER_PORT}"), &self.ca_pem),
        )?;
        Ok(path)
    }

    /// Puts the control plane on bridge `br0` of namespace `bridge_ns`
    /// (port `port` there, `ifname` here) holding `address`/24.
    pub fn attach_to(
        &self,
        bridge_ns: &str,
        port: &str,
        ifname: &str,
        address: Ipv4Addr,
    ) -> Result<()> {
        netns::veth(bridge_ns, port, &self.netns, ifname)?;
        ipc(&format!("-n {bridge_ns} link set {port} master br0"))?;
        ipc(&format!(
            "-n {} addr add {address}/24 dev {ifname}",
            self.netns
        ))
        .map(drop)
    }

    /// `kubectl apply` of a YAML document (or several).
    pub fn apply(&self, yaml: &str) -> Result<String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let file = self.dir.join(format!(
            "apply-{}.yaml",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&file, yaml)?;
        self.kubectl(&["apply", "-f", &file.to_string_lossy()])
    }

    /// `kubectl get KIND NAME -o jsonpath=PATH`.
    pub fn jsonpath(&self, kind: &str, name: &str, path: &str) -> Result<String> {
        self.kubectl(&["get", kind, name, "-o", &format!("jsonpath={path}")])
    }

    /// Polls `check` every 100 ms until it returns `Some` or `timeout`
    /// passes; the error says what was awaited and the last answer.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => "not yet".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{}: {what} not within {timeout:?} (last: {last})\n{}",
                    self.name,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_apiserver(&mut self) -> Result<()> {
        let command = self.apiserver_command.clone();
        let (program, args) = command.split_first().context("no kube-apiserver command")?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn("kube-apiserver", Path::new(program), &args)
    }

    /// Starts the API server again after [`Self::stop_apiserver`]; returns
    /// once it is ready.
    pub fn start_apiserver(&mut self) -> Result<()> {
        self.spawn_apiserver()?;
        self.wait_ready()
    }

    /// Stops the API server (etcd keeps the state): an outage.
    pub fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(pos) = self
            .processes
            .iter()
            .position(|(n, _)| n == "kube-apiserver")
        {
            let (_, mut child) = self.processes.remove(pos);
            terminate(&mut child);
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The controllers first, etcd last, so nothing logs a lost store.
        while let Some((_, mut child)) = self.processes.pop() {
            terminate(&mut child);
        }
        clear_leftovers(&self.netns, &self.dir);
    }
}

/// Removes what a control plane named `name` left behind (an interrupted
/// demo, a killed test).
pub fn remove(name: &str) {
    clear_leftovers(
        &format!("{name}-cp"),
        &PathBuf::from(format!("/run/ligo-testbed/{name}-kube")),
    );
}

/// Kills what a killed run left (by its pid files) and removes its
/// namespace (which takes the veth with it) and files.
fn clear_leftovers(netns: &str, dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                if let Some(pid) = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // `ip netns exec` execs the program, so the pid is its.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
    let _ = netns::ip(&["netns", "del", netns]);
    // The root namespace's end of the link-local veth: gone with the
    // namespace normally, but a namespace something still pins outlives
    // `netns del`, and the next start would find the name taken.
    if let Some(name) = netns.strip_suffix("-cp") {
        let _ = netns::ip(&["link", "del", &format!("{name}-k")]);
    }
    let _ = fs::remove_dir_all(dir);
}

fn first_service_address(service_cidr: &str) -> Result<Ipv4Addr> {
    let base: Ipv4Addr = service_cidr
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("service CIDR {service_cidr}"))?;
    Ok(Ipv4Addr::from(u32::from(base) + 1))
}

fn admin_kubeconfig(url: &str, ca_pem: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ligo-test
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {ADMIN_TOKEN}
contexts:
- name: ligo-test
  context:
    cluster: ligo-test
    user: admin
current-context: ligo-test
"
    )
}

/// The control plane's keys and certificates (ECDSA P-256: generated in
/// milliseconds, where RSA took the harness a second or two).
struct Pki {
    ca_pem: String,
    ca_key: String,
    server_pem: String,
    server_key: String,
    service_account_key: String,
    service_account_public: String,
}

impl Pki {
    fn generate(addresses: &[IpAddr]) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ligo-test-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, &ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        for address in addresses {
            server.subject_alt_names.push(SanType::IpAddress(*address));
        }
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer)?;
        let service_account = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            server_pem: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            service_account_key: service_account.serialize_pem(),
            service_account_public: service_account.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        for (file, content) in [
            ("ca.crt", &self.ca_pem),
            ("ca.key", &self.ca_key),
            ("server.crt", &self.server_pem),
            ("server.key", &self.server_key),
            ("sa.key", &self.service_account_key),
            ("sa.pub", &self.service_account_public),
        ] {
            fs::write(dir.join(file), content)?;
        }
        fs::create_dir_all(dir.join("certs"))?;
        Ok(())
    }
}
