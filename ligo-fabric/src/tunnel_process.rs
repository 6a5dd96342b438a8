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
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::{RoleConfig, ValidConfig},
    daemon::read_config,
    routes::RouteManager,
    tunnel::{device, handover, status, StatusSource, Tunnel, TunnelConfig},
};

/// How often the config file's modification time is checked (as the
/// daemon does), and the tunnel device looked for while it is missing.
const POLL: Duration = Duration::from_secs(1);

/// The fields a running tunnel process cannot take from a reload.
fn restart_only(cfg: &ValidConfig) -> Option<(String, PathBuf)> {
    match &cfg.role {
        RoleConfig::Gateway {
            public_interface,
            wireguard: Some(wg),
            ..
        } => Some((public_interface.clone(), wg.status_socket.clone())),
        _ => None,
    }
}

/// The tunnel part of `cfg`, key files read and checked.
async fn tunnel_config(netlink: &RouteManager, cfg: &ValidConfig) -> Result<Option<TunnelConfig>> {
    let RoleConfig::Gateway {
        public_interface, ..
    } = &cfg.role
    else {
        return Ok(None);
    };
    let index = nix::net::if_::if_nametoindex(public_interface.as_str()).with_context(|| {
        format!("gateway.public_interface: no interface named {public_interface:?} in this network namespace")
    })?;
    let public_mtu = netlink.link_mtu(index).await?;
    TunnelConfig::from_config(cfg, public_mtu)
}

struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

enum Event {
    Reload(&'static str),
    Tick,
    Stop,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self, poll: &mut tokio::time::Interval) -> Event {
        tokio::select! {
            _ = self.hangup.recv() => Event::Reload("SIGHUP"),
            _ = poll.tick() => Event::Tick,
            _ = self.terminate.recv() => Event::Stop,
            _ = self.interrupt.recv() => Event::Stop,
        }
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = read_config(config_path)?;
    let Some((_, socket)) = restart_only(&cfg) else {
        bail!(
            "{}: no peer uses WireGuard on a gateway (gateway.private_key_file and a peer with transport = \"wireguard\"), so there is no tunnel to run",
            config_path.display()
        );
    };
    let netlink = RouteManager::new()?;
    let Some(wanted) = tunnel_config(&netlink, &cfg).await? else {
        bail!("no WireGuard tunnel in {}", config_path.display());
    };
    let source = StatusSource::default();
    let mut signals = Signals::new()?;
    let mut poll = tokio::time::interval(POLL);
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
                    if let Event::Stop = signals.next(&mut poll).await {
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

    let mut current = cfg;
    let mut last_modified = modified(config_path);
    loop {
        let reason = match signals.next(&mut poll).await {
            Event::Stop => break,
            Event::Reload(reason) => reason,
            Event::Tick if handed_over.load(Ordering::SeqCst) => break,
            Event::Tick => {
                let now = modified(config_path);
                if now == last_modified {
                    continue;
                }
                last_modified = now;
                "config file changed"
            }
        };
        let cfg = match read_config(config_path) {
            Ok(cfg) => cfg,
            Err(e) => {
                error!(reason, error = format!("{e:#}"), "new configuration rejected; the tunnel keeps running unchanged. Fix the file and save it again");
                continue;
            }
        };
        if cfg == current {
            continue;
        }
        if restart_only(&cfg).is_some() && restart_only(&cfg) != restart_only(&current) {
            error!(reason, "new configuration changes gateway.public_interface or gateway.wireguard_status_socket; these need a restart of the tunnel process. The tunnel keeps running unchanged");
            continue;
        }
        match tunnel_config(&netlink, &cfg).await {
            Err(e) => {
                error!(reason, error = format!("{e:#}"), "new configuration rejected; the tunnel keeps running unchanged. Fix the file and save it again");
            }
            Ok(wanted) => {
                tunnel = reconcile(tunnel, wanted, &source);
                current = cfg;
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

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
