//! The tunnel's configuration and how it reaches the tunnel process.
//!
//! The daemon is the only reader of desired state: it derives a
//! [`TunnelSpec`] from the local configuration, the fabric spec and the
//! host's facts, checks that its key files can be used, and writes it next
//! to the tunnel's status socket (`<socket>.desired.json`, mode 0600, by
//! rename so it is never seen half-written). The tunnel process takes its
//! configuration from that file only: at start (so it can start, restart
//! or hand over while the daemon is down) and whenever the daemon replaces
//! it. The spec holds public material and key file *paths*; the tunnel reads
//! the keys itself, from the same files (a Secret mounted in both pods), so
//! no secret is copied anywhere.

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::{
    keys::{public_key_base64, read_key_file, SecretKey},
    status::beside,
};
use crate::{
    config::{decode_key, FabricSpec, LocalConfig, LocalRole, WIREGUARD_OVERHEAD},
    host::HostFacts,
};

/// Everything the tunnel needs, keys read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    pub underlay: SocketAddrV4,
    pub public: SocketAddrV4,
    pub private_key: SecretKey,
    /// Largest inner packet: public link MTU less the WireGuard overhead.
    pub inner_mtu: usize,
    pub node_slices: Vec<(Ipv4Network, Ipv4Addr)>,
    pub fabric_port: u16,
    pub peers: Vec<PeerSpec>,
}

/// A WireGuard peer as the tunnel runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub id: u32,
    pub name: String,
    pub pod_cidr: Ipv4Network,
    pub public_key: [u8; 32],
    pub preshared_key: Option<SecretKey>,
    pub persistent_keepalive: Option<u16>,
    pub endpoint: SocketAddrV4,
}

/// What the daemon hands the tunnel process: the tunnel's configuration
/// with key files by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSpec {
    pub underlay: SocketAddrV4,
    pub public: SocketAddrV4,
    pub private_key_file: PathBuf,
    pub inner_mtu: usize,
    pub node_slices: Vec<(Ipv4Network, Ipv4Addr)>,
    pub fabric_port: u16,
    pub peers: Vec<PeerTunnelSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTunnelSpec {
    pub id: u32,
    pub name: String,
    /// Where the source stated the peer (`peers[0]`): names it in errors.
    pub origin: String,
    pub pod_cidr: Ipv4Network,
    /// Base64, as `wg pubkey` prints it.
    pub public_key: String,
    pub preshared_key_file: Option<PathBuf>,
    pub persistent_keepalive: Option<u16>,
    pub endpoint: SocketAddrV4,
}

impl TunnelSpec {
    /// The tunnel part of a gateway's desired state; `None` when no peer
    /// uses WireGuard (or this is not a gateway).
    pub fn from_fabric(
        local: &LocalConfig,
        spec: &FabricSpec,
        host: &HostFacts,
    ) -> Result<Option<TunnelSpec>> {
        let LocalRole::Gateway(gw) = &local.role else {
            return Ok(None);
        };
        if spec.wireguard_peers().next().is_none() {
            return Ok(None);
        }
        let private_key_file = gw
            .private_key_file
            .clone()
            .context("gateway.private_key_file: required once a peer uses WireGuard")?;
        let public_mtu = host
            .public_mtu
            .context("the public interface's MTU is not known")?;
        let peers = spec
            .wireguard_peers()
            .filter_map(|peer| {
                let (wg, endpoint) = (peer.wireguard.as_ref()?, peer.endpoint?);
                Some(PeerTunnelSpec {
                    id: peer.id,
                    name: peer.name.clone(),
                    origin: peer.origin.clone(),
                    pod_cidr: peer.pod_cidr,
                    public_key: public_key_base64(&wg.public_key),
                    preshared_key_file: wg.preshared_key_file.clone(),
                    persistent_keepalive: wg.persistent_keepalive,
                    endpoint,
                })
            })
            .collect();
        Ok(Some(TunnelSpec {
            underlay: SocketAddrV4::new(gw.underlay_ip, spec.fabric_port),
            public: SocketAddrV4::new(gw.public_ip, spec.wireguard_port),
            private_key_file,
            inner_mtu: public_mtu.saturating_sub(WIREGUARD_OVERHEAD) as usize,
            node_slices: spec.node_slices.iter().map(|(n, a)| (*n, *a)).collect(),
            fabric_port: spec.fabric_port,
            peers,
        }))
    }

    /// The configuration the tunnel runs: key files read and their
    /// permissions checked. Errors name the field that names the file.
    pub fn load(&self) -> Result<TunnelConfig> {
        let private_key = read_key_file(&self.private_key_file, "gateway.private_key_file")?;
        let mut peers = Vec::with_capacity(self.peers.len());
        for peer in &self.peers {
            let public_key = decode_key(&peer.public_key)
                .with_context(|| format!("{}.public_key: not a WireGuard key", peer.origin))?;
            let preshared_key = match &peer.preshared_key_file {
                Some(path) => Some(read_key_file(
                    path,
                    &format!("{}.preshared_key_file", peer.origin),
                )?),
                None => None,
            };
            peers.push(PeerSpec {
                id: peer.id,
                name: peer.name.clone(),
                pod_cidr: peer.pod_cidr,
                public_key,
                preshared_key,
                persistent_keepalive: peer.persistent_keepalive,
                endpoint: peer.endpoint,
            });
        }
        Ok(TunnelConfig {
            underlay: self.underlay,
            public: self.public,
            private_key,
            inner_mtu: self.inner_mtu,
            node_slices: self.node_slices.clone(),
            fabric_port: self.fabric_port,
            peers,
        })
    }
}

/// What the daemon last asked of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// `None`: no WireGuard peer; the tunnel idles.
    pub tunnel: Option<TunnelSpec>,
}

/// `<status socket>.desired.json`.
pub fn desired_path(status_socket: &Path) -> PathBuf {
    beside(status_socket, ".desired.json")
}

/// Daemon: replaces the desired tunnel configuration (0600, atomically).
pub fn write_desired(status_socket: &Path, desired: &Desired) -> Result<()> {
    let path = desired_path(status_socket);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Named by our pid: two writers never share (and steal) one file.
    let temporary = beside(&path, &format!(".new.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(desired).context("encoding the tunnel configuration")?;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))
}

/// Tunnel process: the desired configuration, `None` before the daemon
/// first wrote one.
pub fn read_desired(status_socket: &Path) -> Result<Option<Desired>> {
    let path = desired_path(status_socket);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{} is not a tunnel configuration", path.display()))
}

/// When the desired file last changed (a rename replaces it, so its
/// modification time and inode move together).
pub fn desired_changed_at(status_socket: &Path) -> Option<(SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(desired_path(status_socket)).ok()?;
    Some((meta.modified().ok()?, meta.ino()))
}

/// Removes the desired file (`uninstall`).
pub fn remove_desired(status_socket: &Path) -> Result<bool> {
    match fs::remove_file(desired_path(status_socket)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).context("removing the desired tunnel configuration"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec() -> TunnelSpec {
        TunnelSpec {
            underlay: "192.0.2.1:4799".parse().unwrap(),
            public: "203.0.113.1:51820".parse().unwrap(),
            private_key_file: "/etc/ligo/wg.key".into(),
            inner_mtu: 1440,
            node_slices: vec![(
                "10.244.1.0/24".parse().unwrap(),
                Ipv4Addr::new(192, 0, 2, 11),
            )],
            fabric_port: 4799,
            peers: vec![PeerTunnelSpec {
                id: 2,
                name: "b".into(),
                origin: "peers[0]".into(),
                pod_cidr: "10.100.16.0/20".parse().unwrap(),
                public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
                preshared_key_file: None,
                persistent_keepalive: Some(5),
                endpoint: "203.0.113.2:51820".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn desired_file_round_trips_privately_and_holds_no_key() {
        let dir = std::env::temp_dir().join(format!("ligo-desired-{}", std::process::id()));
        let socket = dir.join("wireguard.sock");
        assert_eq!(read_desired(&socket).unwrap(), None, "nothing written yet");
        let desired = Desired {
            tunnel: Some(spec()),
        };
        write_desired(&socket, &desired).unwrap();
        assert_eq!(read_desired(&socket).unwrap(), Some(desired));
        let path = desired_path(&socket);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("/etc/ligo/wg.key") && !text.contains("private_key\""));
        let idle = Desired { tunnel: None };
        write_desired(&socket, &idle).unwrap();
        assert_eq!(read_desired(&socket).unwrap(), Some(idle));
        assert!(remove_desired(&socket).unwrap());
        assert_eq!(read_desired(&socket).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loading_names_the_field_and_the_peer_by_its_origin() {
        let dir = std::env::temp_dir().join(format!("ligo-load-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("wg.key");
        fs::write(&key, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        let mut spec = spec();
        spec.private_key_file = key;
        assert_eq!(
            spec.load().unwrap().peers[0].public_key[..3],
            [0x1c, 0x88, 0x28]
        );
        spec.peers[0].origin = "Peer/b".into();
        spec.peers[0].preshared_key_file = Some(dir.join("missing.psk"));
        let e = format!("{:#}", spec.load().unwrap_err());
        assert!(
            e.starts_with("Peer/b.preshared_key_file: cannot read"),
            "{e}"
        );
        spec.private_key_file = dir.join("missing.key");
        let e = format!("{:#}", spec.load().unwrap_err());
        assert!(
            e.starts_with("gateway.private_key_file: cannot read"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
