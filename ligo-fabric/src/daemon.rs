//! `ligo-fabric run`: load and attach the programs (adopting the data path
//! an earlier daemon left), keep maps and routes equal to the desired state
//! (`desired.rs`) of the local configuration and the latest fabric spec
//! revision from the source (`source.rs`: the file today). On
//! SIGTERM/SIGINT the daemon exits and the data path keeps forwarding;
//! `uninstall` removes it. On a gateway with WireGuard peers the daemon
//! owns the tunnel device and its program; the tunnel itself runs in its
//! own process (`tunnel_process.rs`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::Ebpf;
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, FabricSpec, IngressHook, LocalConfig, LocalRole},
    desired::desired_state,
    fabric_maps::{remove_pins, FabricMaps},
    host::{HostFacts, Interfaces},
    kube_source::{self, report, Programmed},
    metrics::{self, DaemonMetrics},
    programs,
    routes::RouteManager,
    source::{self, Revision, SpecRevision, StopSignals},
    tunnel::{
        self,
        config::{write_desired, Desired},
        device,
        status::StatusClient,
        TunnelSpec,
    },
};
use tokio::sync::watch;

/// How often the node's pod interfaces are listed.
const POD_INTERFACE_POLL: Duration = Duration::from_secs(1);

struct Fabric {
    local: LocalConfig,
    spec: FabricSpec,
    metrics: DaemonMetrics,
    interfaces: Interfaces,
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
    /// Where what is programmed is reported (the Kubernetes source's
    /// NodeFabric status), when a source wants it.
    report: Option<watch::Sender<Programmed>>,
    revisions_applied: i64,
}

impl Fabric {
    /// Tells the reporter what is programmed now, and what was refused
    /// (`None`: nothing, so an earlier refusal no longer stands).
    fn report(&self, refused: Option<String>) {
        if let Some(report) = &self.report {
            report.send_replace(Programmed {
                revisions: self.revisions_applied,
                state: Some((self.local.clone(), self.spec.clone())),
                refused,
            });
        }
    }

    /// The tunnel part of `local` and `spec`, its key files read and
    /// checked: a key that cannot be used refuses the revision before
    /// anything changes (the tunnel process reads the same files).
    async fn tunnel_spec(
        &self,
        local: &LocalConfig,
        spec: &FabricSpec,
    ) -> Result<Option<TunnelSpec>> {
        if !local.is_gateway() || spec.wireguard_peers().next().is_none() {
            return Ok(None);
        }
        let host = HostFacts::read(&self.routes, self.interfaces).await?;
        let tunnel = TunnelSpec::from_fabric(local, spec, &host)?;
        if let Some(tunnel) = &tunnel {
            tunnel.load()?;
        }
        Ok(tunnel)
    }

    /// Hands the tunnel process its configuration (gateways): it reads the
    /// file now if it runs, at its start otherwise.
    fn hand_over_tunnel_config(&self, tunnel: Option<TunnelSpec>) -> Result<()> {
        let LocalRole::Gateway(gw) = &self.local.role else {
            return Ok(());
        };
        write_desired(&gw.status_socket, &Desired { tunnel })
    }

    /// Makes the tunnel device exist exactly when a WireGuard tunnel is
    /// configured, and points the status client at the tunnel process.
    async fn reconcile_tunnel_device(&mut self, wanted: Option<&TunnelSpec>) -> Result<()> {
        let socket = match &self.local.role {
            LocalRole::Gateway(gw) if wanted.is_some() => Some(gw.status_socket.clone()),
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

    /// Applies the running spec by difference: maps first (so routes never
    /// steer traffic into a table that lacks its entry), then routes.
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
                    self.spec
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
        let host = HostFacts::read(&self.routes, self.interfaces).await?;
        // Key files are read (and their permissions checked) before anything
        // changes, so a bad key leaves the running state alone.
        let tunnel = TunnelSpec::from_fabric(&self.local, &self.spec, &host)?;
        if let Some(tunnel) = &tunnel {
            tunnel.load()?;
        }
        let desired = desired_state(&self.local, &self.spec, &host);
        let map_changes = self.maps.apply(&desired, self.interfaces)?;
        self.reconcile_tunnel_device(tunnel.as_ref()).await?;
        // At start-up `attach` follows; later, a tunnel device that came or
        // went changes what is attached.
        if self.attached && self.tunnel_device != self.tunnel_device_attached {
            self.attach()?;
        }
        let route_changes = match (&self.local.role, host.underlay_mtu) {
            (LocalRole::Node(_), Some(mtu)) => {
                self.routes
                    .reconcile(&desired.routes, self.interfaces.underlay, mtu)
                    .await?
            }
            (LocalRole::Node(_), None) => anyhow::bail!("the uplink's MTU is not known"),
            (LocalRole::Gateway(_), _) => 0,
        };
        // Last: the device exists and carries its program by now.
        self.hand_over_tunnel_config(tunnel)?;
        info!(
            map_changes,
            route_changes,
            peers = self.spec.peers.len(),
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
    /// uplink), so arriving packets can skip the stack on their way in;
    /// empty with `pod_delivery = stack`.
    async fn sync_pod_interfaces(&mut self) -> Result<()> {
        let LocalRole::Node(node) = &self.local.role else {
            return Ok(());
        };
        let veths = match node.pod_delivery {
            config::PodDelivery::Direct => {
                self.routes.veth_indexes(self.interfaces.underlay).await?
            }
            config::PodDelivery::Stack => Default::default(),
        };
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
        let pin_dir = self.local.pin_dir.clone();
        let ebpf = self.ebpf.as_mut().context("programs already unloaded")?;
        let result = match &self.local.role {
            LocalRole::Node(node) => programs::attach_node(
                ebpf,
                &pin_dir,
                &node.uplink,
                self.interfaces.underlay,
                Self::ingress_hook(node.ingress, is_veth),
            ),
            LocalRole::Gateway(gw) => programs::attach_gateway(
                ebpf,
                &pin_dir,
                &[
                    (&gw.underlay_interface, self.interfaces.underlay),
                    (
                        &gw.public_interface,
                        self.interfaces
                            .public
                            .context("gateway without a public interface")?,
                    ),
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
            pin_dir = %self.local.pin_dir.display(),
            "daemon stopped; the data path keeps forwarding. `ligo-fabric uninstall --config FILE` removes it"
        );
    }

    /// Removes everything, after a failed first start-up.
    async fn teardown(mut self) -> Result<()> {
        self.metrics.set_ready(false);
        self.ebpf.take();
        drop(self.maps);
        let socket = match &self.local.role {
            LocalRole::Gateway(gw) => Some(gw.status_socket.clone()),
            LocalRole::Node(_) => None,
        };
        uninstall(&self.local.pin_dir, socket.as_deref()).await
    }

    /// Considers a revision from the source: refused whole when it is
    /// invalid, changes a setting only a restart applies, or names a key
    /// file that cannot be used; otherwise applied by difference, and the
    /// previous state restored if applying fails.
    async fn consider(&mut self, revision: Revision) {
        let (reason, local, spec) = match revision {
            Revision::Rejected { reason, error } => {
                self.metrics.config_rejections.inc();
                error!(reason, error = format!("{error:#}"), "new configuration rejected; the running state is unchanged. Fix the file and save it again");
                self.report(Some(format!("{reason}: {error:#}")));
                return;
            }
            Revision::Spec(revision) => {
                let SpecRevision {
                    reason,
                    local,
                    spec,
                } = *revision;
                (reason, local.unwrap_or_else(|| self.local.clone()), spec)
            }
        };
        if let Some(field) = source::restart_needed_for(&self.local, &local) {
            self.metrics.config_rejections.inc();
            error!(reason, field, "new configuration changes the role, an interface or another setting that only a restart applies; these need a restart of the daemon. The running state is unchanged");
            self.report(Some(format!(
                "{field} changed: only a restart of the daemon applies it"
            )));
            return;
        }
        if local == self.local && spec == self.spec {
            info!(reason, "configuration unchanged");
            // Objects fixed back to what runs clear an earlier refusal.
            self.report(None);
            return;
        }
        if let Err(e) = self.tunnel_spec(&local, &spec).await {
            self.metrics.config_rejections.inc();
            error!(reason, error = format!("{e:#}"), "new configuration rejected; the running state is unchanged. Fix the file and save it again");
            self.report(Some(format!("{e:#}")));
            return;
        }
        let previous_local = std::mem::replace(&mut self.local, local);
        let previous_spec = std::mem::replace(&mut self.spec, spec);
        if let Err(e) = self.apply().await {
            warn!(
                reason,
                error = format!("{e:#}"),
                "applying the new configuration failed; restoring the previous one"
            );
            self.local = previous_local;
            self.spec = previous_spec;
            if let Err(restoring) = self.apply().await {
                error!(
                    error = format!("{restoring:#}"),
                    "restoring the previous configuration failed; restart the daemon"
                );
            }
            self.report(Some(format!("applying failed, previous state kept: {e:#}")));
            return;
        }
        self.revisions_applied += 1;
        self.report(None);
    }
}

/// `ligo-fabric run --config FILE`: the file is both the local settings and
/// the source of spec revisions.
pub async fn run(config_path: &std::path::Path) -> Result<()> {
    // Watching starts first (and installs the SIGHUP handler), so no change
    // after the start-up read is missed.
    let revisions = source::watch_file(config_path)?;
    let cfg = config::read_file(config_path)?;
    start(
        cfg,
        revisions,
        &format!("config {}", config_path.display()),
        None,
    )
    .await
}

/// `ligo-fabric run --kubernetes`: the local settings and the spec both
/// come from the API server's objects. Until every watch has listed once
/// nothing on this host is touched: a data path an earlier daemon left
/// pinned keeps forwarding while the API server cannot be read.
pub async fn run_kubernetes(client: kube::Client, flags: kube_source::DaemonFlags) -> Result<()> {
    let node_name = flags.node_name.clone();
    let mut revisions = kube_source::watch(client.clone(), flags);
    let mut stop = StopSignals::new()?;
    info!("waiting for the API server's objects; nothing on this host changes until every watch has listed");
    let cfg = loop {
        tokio::select! {
            _ = stop.recv() => {
                info!("stopped before the first revision; the data path is left as it was");
                return Ok(());
            }
            revision = revisions.recv() => match revision {
                Some(Revision::Spec(r)) => match r.local {
                    Some(local) => break config::Configuration { local, spec: r.spec },
                    None => continue,
                },
                Some(Revision::Rejected { error, .. }) => warn!(
                    error = format!("{error:#}"),
                    "cannot start yet: waiting for the objects to be fixed"
                ),
                None => anyhow::bail!("the Kubernetes source stopped before it listed"),
            },
        }
    };
    let (programmed, reported) = watch::channel(Programmed::default());
    let tunnel = StatusClient::default();
    tokio::spawn(report::report(client, node_name, reported, tunnel.clone()));
    start(
        cfg,
        revisions,
        "the Kubernetes API",
        Some((programmed, tunnel)),
    )
    .await
}

/// Loads (or adopts) the data path for `cfg`, then applies revisions until
/// stopped.
async fn start(
    cfg: config::Configuration,
    revisions: tokio::sync::mpsc::Receiver<Revision>,
    source: &str,
    report: Option<(watch::Sender<Programmed>, StatusClient)>,
) -> Result<()> {
    let interfaces = Interfaces::resolve(&cfg.local)?;
    let pin_dir = cfg.local.pin_dir.clone();
    let adopting = pin_dir.join("links").is_dir();
    let ebpf = programs::load(&pin_dir)?;
    let maps = FabricMaps::open(&pin_dir)?;
    let routes = RouteManager::new()?;
    let mut metrics = DaemonMetrics::new();
    let report = report.map(|(sender, tunnel)| {
        // The reporter asks the tunnel process what /metrics asks it.
        metrics.tunnel = tunnel;
        sender
    });
    let mut fabric = Fabric {
        local: cfg.local,
        spec: cfg.spec,
        metrics: metrics.clone(),
        interfaces,
        maps,
        routes,
        ebpf: Some(ebpf),
        tunnel_device: None,
        tunnel_device_attached: None,
        attached: false,
        uplink_is_veth: false,
        report,
        revisions_applied: 0,
    };
    let started = async {
        fabric.uplink_is_veth = fabric.routes.is_veth(fabric.interfaces.underlay).await?;
        // The endpoints come up first: /readyz answers 503 until ready.
        let scrape_maps = FabricMaps::open(&fabric.local.pin_dir)?;
        metrics::serve(fabric.local.metrics_address, &metrics, scrape_maps).await?;
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
    fabric.revisions_applied = 1;
    fabric.report(None);
    info!(source, "fabric ready");
    serve(fabric, revisions).await
}

/// The daemon's life after start-up: revisions applied as they come, pod
/// interfaces kept in sync, until SIGTERM/SIGINT.
async fn serve(
    mut fabric: Fabric,
    mut revisions: tokio::sync::mpsc::Receiver<Revision>,
) -> Result<()> {
    let mut stop = StopSignals::new()?;
    let mut poll = tokio::time::interval(POD_INTERFACE_POLL);
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = poll.tick() => {
                if let Err(e) = fabric.sync_pod_interfaces().await {
                    warn!(error = format!("{e:#}"), "listing pod interfaces failed; arriving packets go through the stack until it works again");
                }
            }
            revision = revisions.recv() => match revision {
                Some(revision) => fabric.consider(revision).await,
                None => {
                    fabric.stop();
                    anyhow::bail!("the configuration source stopped; the data path keeps its last state. Restart the daemon");
                }
            },
        }
    }
    info!("shutting down");
    fabric.stop();
    Ok(())
}

/// `ligo-fabric uninstall`: detaches the programs (removing their pinned
/// links), removes our routes and the tunnel device from this network
/// namespace, the pinned maps and the tunnel's desired configuration beside
/// `status_socket`. Run it with no daemon running (and no tunnel process: it
/// would lose its device).
pub async fn uninstall(
    pin_dir: &std::path::Path,
    status_socket: Option<&std::path::Path>,
) -> Result<()> {
    let links = programs::remove_links(pin_dir)?;
    let netlink = RouteManager::new()?;
    let routes = netlink.remove_all().await?;
    let tunnel_device = netlink.delete_link(device::TUNNEL_DEVICE).await?;
    let tunnel_config = match status_socket {
        Some(socket) => tunnel::config::remove_desired(socket)?,
        None => false,
    };
    remove_pins(pin_dir)?;
    info!(
        links,
        routes,
        tunnel_device,
        tunnel_config,
        pin_dir = %pin_dir.display(),
        "fabric removed from this host"
    );
    Ok(())
}
