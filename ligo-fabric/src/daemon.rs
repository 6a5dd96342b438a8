//! `ligo-fabric run`: load and attach the programs (adopting the data path
//! an earlier daemon left), keep maps and routes equal to the
//! configuration, reload on SIGHUP or when the file changes. On
//! SIGTERM/SIGINT the daemon exits and the data path keeps forwarding;
//! `uninstall` removes it. On a gateway with WireGuard peers the daemon
//! owns the tunnel device and its program; the tunnel itself runs in its
//! own process (`tunnel_process.rs`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, IngressHook, RoleConfig, ValidConfig},
    desired::desired_state,
    fabric_maps::{remove_pins, FabricMaps},
    metrics::{self, DaemonMetrics},
    programs,
    routes::RouteManager,
    tunnel::{device, TunnelConfig},
};

/// How often the config file's modification time is checked, and the
/// pod interfaces are listed.
const CONFIG_POLL: Duration = Duration::from_secs(1);

pub fn read_config(path: &Path) -> Result<ValidConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
}

fn ifindex(name: &str, field: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("{field}: no interface named {name:?} in this network namespace"))
}

/// Interface indexes the programs and routes need: (underlay, public).
fn resolve_interfaces(role: &RoleConfig) -> Result<(u32, u32)> {
    match role {
        RoleConfig::Node { uplink, .. } => Ok((ifindex(uplink, "node.uplink")?, 0)),
        RoleConfig::Gateway {
            underlay_interface,
            public_interface,
            ..
        } => Ok((
            ifindex(underlay_interface, "gateway.underlay_interface")?,
            ifindex(public_interface, "gateway.public_interface")?,
        )),
    }
}

/// The parts of a configuration that a reload cannot change.
fn restart_only(
    cfg: &ValidConfig,
) -> (
    std::mem::Discriminant<RoleConfig>,
    Vec<String>,
    PathBuf,
    std::net::SocketAddr,
) {
    let interfaces = match &cfg.role {
        RoleConfig::Node { uplink, .. } => vec![uplink.clone()],
        RoleConfig::Gateway {
            underlay_interface,
            public_interface,
            ..
        } => {
            vec![underlay_interface.clone(), public_interface.clone()]
        }
    };
    (
        std::mem::discriminant(&cfg.role),
        interfaces,
        cfg.pin_dir.clone(),
        cfg.metrics_address,
    )
}

struct Fabric {
    cfg: ValidConfig,
    metrics: DaemonMetrics,
    interfaces: (u32, u32),
    maps: FabricMaps,
    routes: RouteManager,
    /// Owns the loaded programs; dropping it detaches them.
    ebpf: Option<Ebpf>,
    /// The tunnel device's index, on gateways with WireGuard peers.
    tunnel_device: Option<u32>,
    /// The tunnel device `gateway_tunnel` is attached to.
    tunnel_device_attached: Option<u32>,
    attached: bool,
    uplink_is_veth: bool,
}

impl Fabric {
    async fn link_mtu(&self, index: u32) -> Result<u32> {
        self.routes.link_mtu(index).await
    }

    /// Reads (and checks the permissions of) the key files `cfg` names.
    async fn check_key_files(&self, cfg: &ValidConfig) -> Result<()> {
        if let RoleConfig::Gateway { .. } = cfg.role {
            let public_mtu = self.link_mtu(self.interfaces.1).await?;
            TunnelConfig::from_config(cfg, public_mtu)?;
        }
        Ok(())
    }

    /// Makes the tunnel device exist exactly when a WireGuard tunnel is
    /// configured, and points the status client at the tunnel process.
    async fn reconcile_tunnel_device(&mut self, wanted: Option<&TunnelConfig>) -> Result<()> {
        let socket = match &self.cfg.role {
            RoleConfig::Gateway {
                wireguard: Some(wg),
                ..
            } if wanted.is_some() => Some(wg.status_socket.clone()),
            _ => None,
        };
        self.metrics.tunnel.set_socket(socket);
        self.tunnel_device = match wanted {
            Some(_) => Some(device::ensure_persistent()?),
            None => {
                if self.routes.delete_link(device::TUNNEL_DEVICE).await? {
                    info!(
                        device = device::TUNNEL_DEVICE,
                        "no WireGuard peer left; tunnel device removed"
                    );
                }
                None
            }
        };
        Ok(())
    }

    /// Applies `cfg` by difference: maps first (so routes never steer traffic
    /// into a table that lacks its entry), then routes.
    async fn apply(&mut self) -> Result<()> {
        let started = Instant::now();
        self.metrics.set_ready(false);
        let result = self.apply_inner(started).await;
        match &result {
            Ok(()) => {
                self.metrics.reconciles.inc();
                self.metrics
                    .reconcile_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.set_peer_names(
                    self.cfg
                        .peers
                        .values()
                        .map(|p| (p.id, p.name.clone()))
                        .collect(),
                );
                self.metrics.set_ready(self.attached);
            }
            Err(_) => {
                self.metrics.reconcile_errors.inc();
            }
        }
        result
    }

    async fn apply_inner(&mut self, started: Instant) -> Result<()> {
        // Key files are read (and their permissions checked) before anything
        // changes, so a bad key leaves the running state alone.
        let tunnel = match self.cfg.role {
            RoleConfig::Gateway { .. } => {
                let public_mtu = self.link_mtu(self.interfaces.1).await?;
                TunnelConfig::from_config(&self.cfg, public_mtu)?
            }
            RoleConfig::Node { .. } => None,
        };
        let uplink_mtu = match self.cfg.role {
            RoleConfig::Node { .. } => Some(self.link_mtu(self.interfaces.0).await?),
            RoleConfig::Gateway { .. } => None,
        };
        let desired = match uplink_mtu {
            Some(mtu) => desired_state(&self.cfg).with_uplink_mtu(mtu),
            None => desired_state(&self.cfg),
        };
        let map_changes = self.maps.apply(&desired, self.interfaces)?;
        self.reconcile_tunnel_device(tunnel.as_ref()).await?;
        // At start-up `attach` follows; later, a tunnel device that came or
        // went changes what is attached.
        if self.attached && self.tunnel_device != self.tunnel_device_attached {
            self.attach()?;
        }
        let route_changes = match uplink_mtu {
            Some(mtu) => {
                self.routes
                    .reconcile(&desired.routes, self.interfaces.0, mtu)
                    .await?
            }
            None => 0,
        };
        info!(
            map_changes,
            route_changes,
            peers = self.cfg.peers.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "configuration applied"
        );
        Ok(())
    }

    /// `auto` means TC on veth (where XDP forces the peer to segment GSO
    /// packets and copies frames; see ARCHITECTURE.md), XDP elsewhere.
    fn ingress_hook(configured: IngressHook, uplink_is_veth: bool) -> IngressHook {
        match configured {
            IngressHook::Auto if uplink_is_veth => IngressHook::Tc,
            IngressHook::Auto => IngressHook::Xdp,
            chosen => chosen,
        }
    }

    /// Node role: keeps POD_INTERFACES equal to this node's veths (but the
    /// uplink), so arriving packets can skip the stack on their way in.
    async fn sync_pod_interfaces(&mut self) -> Result<()> {
        if !matches!(self.cfg.role, RoleConfig::Node { .. }) {
            return Ok(());
        }
        let veths = self.routes.veth_indexes(self.interfaces.0).await?;
        let changes = self.maps.sync_pod_interfaces(&veths)?;
        if changes > 0 {
            debug!(
                changes,
                pod_interfaces = veths.len(),
                "pod interfaces updated"
            );
        }
        Ok(())
    }

    fn attach(&mut self) -> Result<()> {
        let is_veth = self.uplink_is_veth;
        let pin_dir = self.cfg.pin_dir.clone();
        let ebpf = self.ebpf.as_mut().context("programs already unloaded")?;
        let result = match &self.cfg.role {
            RoleConfig::Node {
                uplink, ingress, ..
            } => programs::attach_node(
                ebpf,
                &pin_dir,
                uplink,
                self.interfaces.0,
                Self::ingress_hook(*ingress, is_veth),
            ),
            RoleConfig::Gateway {
                underlay_interface,
                public_interface,
                ..
            } => programs::attach_gateway(
                ebpf,
                &pin_dir,
                &[
                    (underlay_interface, self.interfaces.0),
                    (public_interface, self.interfaces.1),
                ],
                self.tunnel_device,
            )
            .and_then(|attached| {
                self.tunnel_device_attached = self.tunnel_device;
                if self.tunnel_device.is_some() {
                    // Only now may the tunnel process write into it.
                    device::set_up()?;
                }
                Ok(attached)
            }),
        };
        self.attached = result.is_ok();
        if let Ok(programs::Attached::Adopted) = result {
            info!("adopted the running data path: programs replaced in place, maps and routes reconciled by difference");
        }
        result.map(drop)
    }

    /// Stops the daemon but leaves the data path running: programs stay
    /// attached through their pinned links, maps, routes and the tunnel
    /// device stay, and the tunnel process keeps its sessions.
    fn stop(mut self) {
        self.metrics.set_ready(false);
        self.ebpf.take();
        info!(
            pin_dir = %self.cfg.pin_dir.display(),
            "daemon stopped; the data path keeps forwarding. `ligo-fabric uninstall --config FILE` removes it"
        );
    }

    /// Removes everything, after a failed first start-up.
    async fn teardown(mut self) -> Result<()> {
        self.metrics.set_ready(false);
        self.ebpf.take();
        drop(self.maps);
        uninstall(&self.cfg.pin_dir).await
    }
}

pub async fn run(config_path: &Path) -> Result<()> {
    let cfg = read_config(config_path)?;
    let interfaces = resolve_interfaces(&cfg.role)?;
    let adopting = cfg.pin_dir.join("links").is_dir();
    let ebpf = programs::load(&cfg.pin_dir)?;
    let maps = FabricMaps::open(&cfg.pin_dir)?;
    let routes = RouteManager::new()?;
    let metrics = DaemonMetrics::new();
    let mut fabric = Fabric {
        cfg,
        metrics: metrics.clone(),
        interfaces,
        maps,
        routes,
        ebpf: Some(ebpf),
        tunnel_device: None,
        tunnel_device_attached: None,
        attached: false,
        uplink_is_veth: false,
    };
    let started = async {
        fabric.uplink_is_veth = fabric.routes.is_veth(fabric.interfaces.0).await?;
        // The endpoints come up first: /readyz answers 503 until ready.
        let scrape_maps = FabricMaps::open(&fabric.cfg.pin_dir)?;
        metrics::serve(fabric.cfg.metrics_address, &metrics, scrape_maps).await?;
        fabric.apply().await?;
        fabric.sync_pod_interfaces().await?;
        fabric.attach()
    };
    if let Err(e) = started.await {
        if adopting {
            // Tearing down a data path that forwarded before we started
            // would turn a failed upgrade into an outage.
            error!(
                error = format!("{e:#}"),
                "start-up failed; the data path an earlier daemon left keeps running unchanged where we did not reach it"
            );
            fabric.stop();
        } else {
            error!(
                error = format!("{e:#}"),
                "start-up failed; removing what was installed"
            );
            if let Err(cleanup) = fabric.teardown().await {
                error!(
                    error = format!("{cleanup:#}"),
                    "clean-up after failed start-up also failed"
                );
            }
        }
        return Err(e);
    }
    metrics.set_ready(true);
    info!(config = %config_path.display(), "fabric ready");

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut last_modified = modified(config_path);
    let mut poll = tokio::time::interval(CONFIG_POLL);
    loop {
        let reason = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = poll.tick() => {
                if let Err(e) = fabric.sync_pod_interfaces().await {
                    warn!(error = format!("{e:#}"), "listing pod interfaces failed; arriving packets go through the stack until it works again");
                }
                let now = modified(config_path);
                if now == last_modified { continue; }
                last_modified = now;
                "config file changed"
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        reload(&mut fabric, config_path, reason).await;
    }
    info!("shutting down");
    fabric.stop();
    Ok(())
}

/// `ligo-fabric uninstall`: detaches the programs (removing their pinned
/// links), removes our routes and the tunnel device from this network
/// namespace and the pinned maps. Run it with no daemon running (and no
/// tunnel process: it would lose its device).
pub async fn uninstall(pin_dir: &Path) -> Result<()> {
    let links = programs::remove_links(pin_dir)?;
    let netlink = RouteManager::new()?;
    let routes = netlink.remove_all().await?;
    let tunnel_device = netlink.delete_link(device::TUNNEL_DEVICE).await?;
    remove_pins(pin_dir)?;
    info!(
        links,
        routes,
        tunnel_device,
        pin_dir = %pin_dir.display(),
        "fabric removed from this host"
    );
    Ok(())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

async fn reload(fabric: &mut Fabric, path: &Path, reason: &str) {
    let cfg = match read_config(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            fabric.metrics.config_rejections.inc();
            error!(reason, error = format!("{e:#}"), "new configuration rejected; the running state is unchanged. Fix the file and save it again");
            return;
        }
    };
    if restart_only(&cfg) != restart_only(&fabric.cfg) {
        fabric.metrics.config_rejections.inc();
        error!(reason, "new configuration changes the role, an interface, pin_dir or metrics_address; these need a restart of the daemon. The running state is unchanged");
        return;
    }
    if cfg == fabric.cfg {
        info!(reason, "configuration unchanged");
        return;
    }
    // Key files are part of the configuration: one that cannot be used
    // refuses the file like any other invalid field.
    if let Err(e) = fabric.check_key_files(&cfg).await {
        fabric.metrics.config_rejections.inc();
        error!(reason, error = format!("{e:#}"), "new configuration rejected; the running state is unchanged. Fix the file and save it again");
        return;
    }
    let previous = std::mem::replace(&mut fabric.cfg, cfg);
    if let Err(e) = fabric.apply().await {
        warn!(
            reason,
            error = format!("{e:#}"),
            "applying the new configuration failed; restoring the previous one"
        );
        fabric.cfg = previous;
        if let Err(e) = fabric.apply().await {
            error!(
                error = format!("{e:#}"),
                "restoring the previous configuration failed; restart the daemon"
            );
        }
    }
}
