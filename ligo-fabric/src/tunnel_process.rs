//! `ligo-fabric tunnel`: the gateway's WireGuard tunnel as a process of its
//! own, next to the daemon (`ligo-fabric run`) and reading the same
//! configuration file.
//!
//! The tunnel holds the only state of the fabric that lives in userspace:
//! WireGuard sessions. Keeping it out of the daemon lets the daemon stop,
//! crash or be upgraded on a gateway without a packet lost, as on nodes:
//! the eBPF programs stay attached through pinned links, and the tunnel
//! keeps its sessions. The daemon owns the tunnel device (and the program
//! on it); this process only attaches queues to it, so neither restarts the
//! other. Status goes to the daemon over `gateway.wireguard_status_socket`.
//! A tunnel process started while another serves the gateway takes over
//! from it without loss (`tunnel/handover.rs`): that is how the tunnel
//! itself is upgraded.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Result};
use tracing::{error, info, warn};

use crate::{
    config::{self, FabricSpec, LocalConfig, LocalRole},
    host::{HostFacts, Interfaces},
    routes::RouteManager,
    source::{self, Revision, SpecRevision, StopSignals},
    tunnel::{device, handover, status, StatusSource, Tunnel, TunnelConfig},
};

/// How often the tunnel device is looked for while it is missing, and a
/// finished hand-over noticed.
const POLL: Duration = Duration::from_secs(1);

/// The tunnel part of `local` and `spec`, key files read and checked.
async fn tunnel_config(
    netlink: &RouteManager,
    local: &LocalConfig,
    spec: &FabricSpec,
) -> Result<Option<TunnelConfig>> {
    let host = HostFacts::read(netlink, Interfaces::resolve(local)?).await?;
    TunnelConfig::from_spec(local, spec, &host)
}

enum Event {
    Revision(Revision),
    Tick,
    Stop,
}

/// What the tunnel process waits on: stop signals, its poll, and the
/// configuration source.
struct Events {
    stop: StopSignals,
    poll: tokio::time::Interval,
    revisions: tokio::sync::mpsc::Receiver<Revision>,
}

impl Events {
    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.stop.recv() => Event::Stop,
            _ = self.poll.tick() => Event::Tick,
            revision = self.revisions.recv() => match revision {
                Some(revision) => Event::Revision(revision),
                None => Event::Stop,
            },
        }
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = config::read_file(config_path)?;
    let mut events = Events {
        stop: StopSignals::new()?,
        poll: tokio::time::interval(POLL),
        revisions: source::watch_file(config_path)?,
    };
    let LocalRole::Gateway(gateway) = &cfg.local.role else {
        bail!(
            "{}: not a gateway ([gateway] section), so there is no tunnel to run",
            config_path.display()
        );
    };
    let socket = gateway.status_socket.clone();
    let netlink = RouteManager::new()?;
    let Some(wanted) = tunnel_config(&netlink, &cfg.local, &cfg.spec).await? else {
        bail!(
            "{}: no peer uses WireGuard on this gateway (gateway.private_key_file and a peer with transport = \"wireguard\"), so there is no tunnel to run",
            config_path.display()
        );
    };
    let source = StatusSource::default();
    let (_lock, running) = match status::lock_instance(&socket) {
        Ok(lock) => {
            // The daemon makes the device (with its program) and brings it
            // up; we may start first.
            if !device::is_ready() {
                info!(
                    device = device::TUNNEL_DEVICE,
                    "waiting for the fabric daemon to create the tunnel device"
                );
                while !device::is_ready() {
                    if let Event::Stop = events.next().await {
                        return Ok(());
                    }
                }
            }
            (lock, Tunnel::start(wanted, &source)?)
        }
        Err(busy) => {
            // Another process serves this gateway: take over from it
            // without losing a packet (`tunnel/handover.rs`).
            let Some((handover, inherited)) = handover::request(&socket)? else {
                return Err(busy);
            };
            info!("another tunnel process serves this gateway; taking over from it");
            let tunnel = Tunnel::take_over(wanted, &source, inherited)?;
            handover.complete(&tunnel)?;
            (
                status::wait_for_instance(&socket, Duration::from_secs(30))?,
                tunnel,
            )
        }
    };
    let mut tunnel = Some(running);
    status::serve(&socket, source.clone())?;
    let handed_over = Arc::new(AtomicBool::new(false));
    handover::serve(&socket, source.clone(), handed_over.clone())?;
    info!(config = %config_path.display(), "tunnel ready");

    let (mut local, mut spec) = (cfg.local, cfg.spec);
    loop {
        let (reason, new_local, new_spec) = match events.next().await {
            Event::Stop => break,
            Event::Tick if handed_over.load(Ordering::SeqCst) => break,
            Event::Tick => continue,
            Event::Revision(Revision::Rejected { reason, error }) => {
                source::log_rejected("tunnel", reason, &error);
                continue;
            }
            Event::Revision(Revision::Spec(revision)) => {
                let SpecRevision {
                    reason,
                    local: new_local,
                    spec: new_spec,
                } = *revision;
                (reason, new_local.unwrap_or_else(|| local.clone()), new_spec)
            }
        };
        if new_local == local && new_spec == spec {
            continue;
        }
        // The same rule as the daemon's: both refuse the same revisions.
        if let Some(field) = source::restart_needed_for(&local, &new_local) {
            error!(reason, field, "new configuration changes the role, an interface or another setting that only a restart applies; these need a restart of the tunnel process. The tunnel keeps running unchanged");
            continue;
        }
        match tunnel_config(&netlink, &new_local, &new_spec).await {
            Err(e) => source::log_rejected("tunnel", reason, &e),
            Ok(wanted) => {
                tunnel = reconcile(tunnel, wanted, &source);
                local = new_local;
                spec = new_spec;
            }
        }
    }
    info!("shutting down the tunnel");
    if let Some(running) = tunnel {
        running.stop(&source);
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(handover::socket_path(&socket));
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
                    warn!(error = format!("{e:#}"), "starting the tunnel with the new configuration failed; fix it and save the file again");
                    None
                }
            }
        }
    }
}
