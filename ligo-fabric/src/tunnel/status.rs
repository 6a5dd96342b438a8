//! The tunnel process tells the daemon how it is doing over a Unix socket
//! (`gateway.wireguard_status_socket`): on every connection it writes its
//! [`TunnelStatus`] as JSON and closes. The daemon reads it at scrape time
//! for `/metrics` and `/tunnels`. Public material only, like `/tunnels`.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::{
            fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tracing::warn;

use serde::{Deserialize, Serialize};

use super::{keys::public_key_base64, packet::TunnelDrop, shared::Shared};

/// How long the daemon waits for the tunnel process's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Proof that this is the only tunnel process of its gateway: two would
/// share the UDP ports (SO_REUSEPORT) and split every peer's traffic.
/// Held until the process exits.
pub struct InstanceLock(#[allow(dead_code)] File);

/// Takes the lock next to `socket` (`<socket>.lock`), refusing when another
/// tunnel process holds it.
pub fn lock_instance(socket: &Path) -> Result<InstanceLock> {
    if let Some(dir) = socket.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let path = beside(socket, ".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another tunnel process (pid {}) already serves this gateway ({} is locked); stop it first",
            holder.trim(),
            path.display()
        );
    }
    let mut file = file;
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(InstanceLock(file))
}

/// Waits up to `timeout` for the lock a process that is going away holds.
pub fn wait_for_instance(socket: &Path, timeout: Duration) -> Result<InstanceLock> {
    let started = std::time::Instant::now();
    loop {
        match lock_instance(socket) {
            Ok(lock) => return Ok(lock),
            Err(e) if started.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `<socket><suffix>`: the files that go with the status socket.
pub fn beside(socket: &Path, suffix: &str) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Serves `source`'s status on `socket` from a background thread.
pub fn serve(socket: &Path, source: StatusSource) -> Result<()> {
    // The instance lock is held, so a file here is a dead process's socket.
    let _ = fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("ligo-wg-status".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let answer = serde_json::to_vec(&source.status()).unwrap_or_default();
                match stream {
                    Ok(mut stream) => {
                        let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
                        let _ = stream.write_all(&answer);
                    }
                    Err(e) => {
                        warn!(error = %e, "status socket accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting the status thread")?;
    Ok(())
}

/// The daemon's side: where to ask, when this gateway has WireGuard peers.
#[derive(Clone, Default)]
pub struct StatusClient(Arc<Mutex<Option<PathBuf>>>);

impl std::fmt::Debug for StatusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusClient")
    }
}

impl StatusClient {
    pub fn set_socket(&self, socket: Option<PathBuf>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = socket;
    }

    /// `None` when no tunnel is configured; an error when the tunnel
    /// process does not answer (not running, or stuck).
    pub fn fetch(&self) -> Option<Result<TunnelStatus>> {
        let socket = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        Some(fetch_from(&socket))
    }
}

fn fetch_from(socket: &Path) -> Result<TunnelStatus> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "the WireGuard tunnel process does not answer on {} (is `ligo-fabric tunnel --status-socket {}` running?)",
            socket.display(),
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("reading the tunnel status from {}", socket.display()))?;
    let status: Option<TunnelStatus> =
        serde_json::from_slice(&answer).context("decoding the tunnel status")?;
    status.context("the tunnel process runs but has no WireGuard peers configured")
}

/// Per-peer figures for metrics and `inspect tunnels`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: u32,
    pub name: String,
    pub public_key: String,
    pub endpoint: String,
    pub latest_handshake_seconds_ago: Option<f64>,
    pub up: bool,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub public_key: String,
    pub listen: String,
    pub inner_mtu: usize,
    pub peers: Vec<PeerStatus>,
    pub drops: Vec<(String, u64)>,
}

/// The running tunnel's state and its listen address.
type RunningTunnel = (Arc<Shared>, String);

/// A handle the metrics endpoint reads; empty until a tunnel runs.
#[derive(Clone, Default)]
pub struct StatusSource(Arc<Mutex<Option<RunningTunnel>>>);

impl StatusSource {
    pub fn status(&self) -> Option<TunnelStatus> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (shared, listen) = guard.as_ref()?;
        Some(status(shared, listen))
    }

    /// The running tunnel's state (for a hand-over).
    pub(super) fn running(&self) -> Option<Arc<Shared>> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|(shared, _)| shared.clone())
    }

    pub(super) fn set(&self, value: Option<(Arc<Shared>, String)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

fn status(shared: &Shared, listen: &str) -> TunnelStatus {
    let table = shared.snapshot();
    let mut peers: Vec<PeerStatus> = table
        .by_id
        .values()
        .map(|p| {
            let (handshake, ..) = p.tunn().stats();
            PeerStatus {
                id: p.spec.id,
                name: p.spec.name.clone(),
                public_key: public_key_base64(&p.spec.public_key),
                endpoint: p.endpoint().to_string(),
                latest_handshake_seconds_ago: handshake.map(|d| d.as_secs_f64()),
                up: p.up.load(Ordering::Relaxed),
                tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                tx_packets: p.tx_packets.load(Ordering::Relaxed),
                rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                rx_packets: p.rx_packets.load(Ordering::Relaxed),
            }
        })
        .collect();
    peers.sort_by_key(|p| p.id);
    TunnelStatus {
        public_key: public_key_base64(shared.public.as_bytes()),
        listen: listen.to_string(),
        inner_mtu: shared.inner_mtu,
        peers,
        drops: TunnelDrop::ALL
            .iter()
            .map(|r| {
                (
                    r.label().to_string(),
                    shared.drops[r.index()].load(Ordering::Relaxed),
                )
            })
            .collect(),
    }
}
