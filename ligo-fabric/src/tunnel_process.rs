//! `ligo-fabric tunnel`: the gateway's WireGuard tunnel as a process of its
//! own, next to the daemon (`ligo-fabric run`), configured by it.
//!
//! The tunnel holds the only state of the fabric that lives in userspace:
//! WireGuard sessions. Keeping it out of the daemon lets the daemon stop,
//! crash or be upgraded on a gateway without a packet lost, as on nodes:
//! the eBPF programs stay attached through pinned links, and the tunnel
//! keeps its sessions. The daemon owns the tunnel device (and the program
//! on it); this process only attaches queues to it, so neither restarts the
//! other. The daemon is the only reader of desired state: it hands this
//! process its configuration through the file beside the status socket
//! (`tunnel/config.rs`), which this process reads at start and whenever the
//! daemon replaces it. Status goes back over the status socket. A tunnel
//! process started while another serves the gateway takes over from it
//! without loss (`tunnel/handover.rs`): that is how the tunnel itself is
//! upgraded.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use anyhow::Result;
use tracing::{info, warn};

use crate::{
    source::StopSignals,
    tunnel::{
        config::{desired_changed_at, desired_path, read_desired, Desired},
        device, handover, status, StatusSource, Tunnel, TunnelConfig,
    },
};

/// How often the desired configuration is looked at (a stat), the tunnel
/// device looked for while it is missing, and a finished hand-over noticed.
const POLL: Duration = Duration::from_millis(250);

/// What the tunnel process waits on: stop signals and its poll.
struct Events {
    stop: StopSignals,
    poll: tokio::time::Interval,
}

impl Events {
    /// `false` once the process is asked to stop.
    async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.stop.recv() => false,
            _ = self.poll.tick() => true,
        }
    }
}

/// Watches the daemon's desired configuration for this tunnel.
struct DesiredWatch<'a> {
    socket: &'a Path,
    seen: Option<(SystemTime, u64)>,
}

impl DesiredWatch<'_> {
    /// The desired configuration when it changed since the last call, keys
    /// read; `Some(None)` when the daemon wants no tunnel.
    fn changed(&mut self) -> Option<Option<TunnelConfig>> {
        let now = desired_changed_at(self.socket);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        let loaded = read_desired(self.socket).and_then(|desired| match desired {
            None | Some(Desired { tunnel: None }) => Ok(None),
            Some(Desired { tunnel: Some(spec) }) => spec.load().map(Some),
        });
        match loaded {
            Ok(wanted) => Some(wanted),
            Err(e) => {
                warn!(error = format!("{e:#}"), "the tunnel configuration the daemon wrote cannot be used; the tunnel keeps running unchanged until the daemon writes another");
                None
            }
        }
    }
}

pub async fn run(socket: &Path) -> Result<()> {
    let mut events = Events {
        stop: StopSignals::new()?,
        poll: tokio::time::interval(POLL),
    };
    let mut watch = DesiredWatch { socket, seen: None };
    // The daemon may not have written a configuration yet, or may want no
    // tunnel: wait for one.
    let mut announced = false;
    let wanted = loop {
        if let Some(Some(wanted)) = watch.changed() {
            break wanted;
        }
        if !announced {
            info!(file = %desired_path(socket).display(), "waiting for the fabric daemon to hand over a tunnel configuration with a WireGuard peer");
            announced = true;
        }
        if !events.tick().await {
            return Ok(());
        }
    };
    let source = StatusSource::default();
    let (_lock, running) = match status::lock_instance(socket) {
        Ok(lock) => {
            // The daemon makes the device (with its program) and brings it
            // up; we may start first.
            if !device::is_ready() {
                info!(
                    device = device::TUNNEL_DEVICE,
                    "waiting for the fabric daemon to create the tunnel device"
                );
                while !device::is_ready() {
                    if !events.tick().await {
                        return Ok(());
                    }
                }
            }
            (lock, Tunnel::start(wanted, &source)?)
        }
        Err(busy) => {
            // Another process serves this gateway: take over from it
            // without losing a packet (`tunnel/handover.rs`).
            let Some((handover, inherited)) = handover::request(socket)? else {
                return Err(busy);
            };
            info!("another tunnel process serves this gateway; taking over from it");
            let tunnel = Tunnel::take_over(wanted, &source, inherited)?;
            handover.complete(&tunnel)?;
            (
                status::wait_for_instance(socket, Duration::from_secs(30))?,
                tunnel,
            )
        }
    };
    let mut tunnel = Some(running);
    status::serve(socket, source.clone())?;
    let handed_over = Arc::new(AtomicBool::new(false));
    handover::serve(socket, source.clone(), handed_over.clone())?;
    info!(status_socket = %socket.display(), "tunnel ready");

    while events.tick().await {
        if handed_over.load(Ordering::SeqCst) {
            break;
        }
        if let Some(wanted) = watch.changed() {
            tunnel = reconcile(tunnel, wanted, &source);
        }
    }
    info!("shutting down the tunnel");
    if let Some(running) = tunnel {
        running.stop(&source);
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(handover::socket_path(socket));
    Ok(())
}

/// Updates `running` to `wanted` in place when it can; restarts it when the
/// key or addresses changed; stops it when no WireGuard peer is left.
fn reconcile(
    running: Option<Tunnel>,
    wanted: Option<TunnelConfig>,
    source: &StatusSource,
) -> Option<Tunnel> {
    match (running, wanted) {
        (Some(mut tunnel), Some(config)) if !tunnel.needs_restart_for(&config) => {
            tunnel.update(config);
            info!("tunnel configuration applied");
            Some(tunnel)
        }
        (running, wanted) => {
            if let Some(tunnel) = running {
                tunnel.stop(source);
            }
            let config = wanted.or_else(|| {
                info!("no WireGuard peer left; the tunnel is idle until one is configured");
                None
            })?;
            match Tunnel::start(config, source) {
                Ok(tunnel) => Some(tunnel),
                Err(e) => {
                    warn!(error = format!("{e:#}"), "starting the tunnel with the new configuration failed; it stays idle until the daemon hands over another");
                    None
                }
            }
        }
    }
}
