//! Where the daemon's desired state comes from: revisions of the fabric
//! spec, delivered over a channel by a source. The file source watches the
//! configuration file (modification time, SIGHUP); a Kubernetes source
//! plugs in beside it and sends the same revisions.
//!
//! A revision may carry the local settings too (the file holds both): the
//! settings that need a restart are compared with the running ones by
//! [`restart_needed_for`]. The daemon is the only consumer; it hands the
//! tunnel process its part (`tunnel/config.rs`).

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};

use crate::config::{self, FabricSpec, LocalConfig, LocalRole};

/// How often the file's modification time is checked.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// A new desired state, or why a source could not produce one.
#[derive(Debug)]
pub enum Revision {
    Spec(Box<SpecRevision>),
    Rejected {
        reason: &'static str,
        error: anyhow::Error,
    },
}

#[derive(Debug)]
pub struct SpecRevision {
    /// What caused it ("SIGHUP", "config file changed").
    pub reason: &'static str,
    /// Local settings, from sources that carry them (the file).
    pub local: Option<LocalConfig>,
    pub spec: FabricSpec,
}

/// Starts watching `path`: a revision for every change of its modification
/// time or SIGHUP. Call it before reading the file for start-up: a change
/// from this call on is sent (one made before the start-up read arrives as
/// a revision equal to what runs, and is found unchanged).
pub fn watch_file(path: &Path) -> Result<mpsc::Receiver<Revision>> {
    let (sender, receiver) = mpsc::channel(4);
    let mut hangup = signal(SignalKind::hangup())?;
    let path = path.to_path_buf();
    let mut last_modified = modified(&path);
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(FILE_POLL);
        loop {
            let reason = tokio::select! {
                _ = hangup.recv() => "SIGHUP",
                _ = poll.tick() => {
                    let now = modified(&path);
                    if now == last_modified { continue; }
                    last_modified = now;
                    "config file changed"
                }
            };
            if sender.send(read_revision(&path, reason)).await.is_err() {
                return;
            }
        }
    });
    Ok(receiver)
}

fn read_revision(path: &Path, reason: &'static str) -> Revision {
    match config::read_file(path) {
        Ok(cfg) => Revision::Spec(Box::new(SpecRevision {
            reason,
            local: Some(cfg.local),
            spec: cfg.spec,
        })),
        Err(error) => Revision::Rejected { reason, error },
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The local setting a revision changes that only a restart can apply, if
/// any: the role, an interface, the ingress hook, pin_dir, metrics_address,
/// the tunnel's status socket. Addresses and key file paths apply live.
pub fn restart_needed_for(running: &LocalConfig, new: &LocalConfig) -> Option<&'static str> {
    if running.pin_dir != new.pin_dir {
        return Some("pin_dir");
    }
    if running.metrics_address != new.metrics_address {
        return Some("metrics_address");
    }
    match (&running.role, &new.role) {
        (LocalRole::Node(a), LocalRole::Node(b)) => {
            if a.uplink != b.uplink {
                return Some("node.uplink");
            }
            if a.ingress != b.ingress {
                return Some("node.ingress");
            }
            if a.pod_delivery != b.pod_delivery {
                return Some("node.pod_delivery");
            }
            None
        }
        (LocalRole::Gateway(a), LocalRole::Gateway(b)) => {
            if a.underlay_interface != b.underlay_interface {
                return Some("gateway.underlay_interface");
            }
            if a.public_interface != b.public_interface {
                return Some("gateway.public_interface");
            }
            if a.status_socket != b.status_socket {
                return Some("gateway.wireguard_status_socket");
            }
            None
        }
        _ => Some("the role ([node] or [gateway])"),
    }
}

/// SIGTERM and SIGINT: both stop the process (the data path stays).
pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub fn new() -> Result<Self> {
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Returns when either signal arrives.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = r#"
cluster_id = 1
pod_cidrs = ["10.244.0.0/16"]
[gateway]
underlay_interface = "eth0"
underlay_ip = "192.0.2.1"
public_interface = "eth1"
public_ip = "203.0.113.1"
"#;

    fn local(text: &str) -> LocalConfig {
        config::parse(text).unwrap().local
    }

    #[test]
    fn interfaces_and_sockets_need_a_restart_addresses_do_not() {
        let running = local(GATEWAY);
        let cases = [
            (
                "public_interface = \"eth1\"",
                "public_interface = \"eth9\"",
                Some("gateway.public_interface"),
            ),
            (
                "underlay_interface = \"eth0\"",
                "underlay_interface = \"eth9\"",
                Some("gateway.underlay_interface"),
            ),
            (
                "public_ip = \"203.0.113.1\"",
                "public_ip = \"203.0.113.1\"\nwireguard_status_socket = \"/run/x.sock\"",
                Some("gateway.wireguard_status_socket"),
            ),
            (
                "cluster_id = 1",
                "cluster_id = 1\npin_dir = \"/sys/fs/bpf/x\"",
                Some("pin_dir"),
            ),
            (
                "cluster_id = 1",
                "cluster_id = 1\nmetrics_address = \"127.0.0.1:1\"",
                Some("metrics_address"),
            ),
            (
                "public_ip = \"203.0.113.1\"",
                "public_ip = \"203.0.113.9\"",
                None,
            ),
            (
                "public_ip = \"203.0.113.1\"",
                "public_ip = \"203.0.113.1\"\nprivate_key_file = \"/k\"",
                None,
            ),
        ];
        for (from, to, expected) in cases {
            assert!(GATEWAY.contains(from), "{from}");
            let new = local(&GATEWAY.replacen(from, to, 1));
            assert_eq!(restart_needed_for(&running, &new), expected, "{to}");
        }
        let node = local(
            "cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\n[node]\nuplink = \"eth0\"\nunderlay_ip = \"192.0.2.11\"\ngateway_ip = \"192.0.2.1\"\n",
        );
        assert_eq!(
            restart_needed_for(&running, &node),
            Some("the role ([node] or [gateway])")
        );
    }
}
