//! Typed handles on the pinned fabric maps, shared by the daemon (which
//! writes them) and `inspect` (which reads them from another process).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        PerCpuValues,
    },
    util::nr_cpus,
};
use ligo_fabric_common::{
    maps::{
        names, Direction, FabricConfig, NodeSlice, Peer, PeerCounterKey, PeerView, TrafficCounters,
    },
    DropReason,
};

use crate::{
    desired::{plan, DesiredState, Prefix},
    host::Interfaces,
};

pub struct FabricMaps {
    pub config: Array<MapData, FabricConfig>,
    pub peer_views: LpmTrie<MapData, [u8; 4], PeerView>,
    pub peers: HashMap<MapData, u32, Peer>,
    pub peer_endpoints: HashMap<MapData, [u8; 4], u32>,
    pub node_slices: LpmTrie<MapData, [u8; 4], NodeSlice>,
    pub pod_interfaces: HashMap<MapData, u32, u8>,
    pub peer_counters: PerCpuHashMap<MapData, PeerCounterKey, TrafficCounters>,
    pub drop_counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for FabricMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FabricMaps")
    }
}

/// Every map name, for pin clean-up.
pub const ALL_MAP_NAMES: [&str; 8] = [
    names::CONFIG,
    names::PEER_VIEWS,
    names::PEERS,
    names::PEER_ENDPOINTS,
    names::NODE_SLICES,
    names::POD_INTERFACES,
    names::PEER_COUNTERS,
    names::DROP_COUNTERS,
];

fn open<T>(dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {}: is a ligo-fabric daemon running with pin_dir {}, and are you root?",
            path.display(),
            dir.display()
        )
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("reading map {name}"))?;
    T::try_from(map)
        .with_context(|| format!("map {name} does not have the layout this binary expects"))
}

fn prefix_of(key: &Key<[u8; 4]>) -> Prefix {
    (Ipv4Addr::from(key.data()), key.prefix_len() as u8)
}

fn lpm_key((addr, len): Prefix) -> Key<[u8; 4]> {
    Key::new(u32::from(len), addr.octets())
}

/// A readable snapshot of every map, summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub config: FabricConfig,
    pub peer_views: BTreeMap<Prefix, PeerView>,
    pub peers: BTreeMap<u32, Peer>,
    pub peer_endpoints: BTreeMap<[u8; 4], u32>,
    pub node_slices: BTreeMap<Prefix, NodeSlice>,
    pub pod_interfaces: BTreeSet<u32>,
    pub peer_counters: BTreeMap<(u32, u32), TrafficCounters>,
    pub drops: Vec<(DropReason, u64)>,
}

impl FabricMaps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            config: open(pin_dir, names::CONFIG)?,
            peer_views: open(pin_dir, names::PEER_VIEWS)?,
            peers: open(pin_dir, names::PEERS)?,
            peer_endpoints: open(pin_dir, names::PEER_ENDPOINTS)?,
            node_slices: open(pin_dir, names::NODE_SLICES)?,
            pod_interfaces: open(pin_dir, names::POD_INTERFACES)?,
            peer_counters: open(pin_dir, names::PEER_COUNTERS)?,
            drop_counters: open(pin_dir, names::DROP_COUNTERS)?,
        })
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot {
            config: self.config.get(&0, 0).context("reading FABRIC_CONFIG")?,
            ..Default::default()
        };
        for entry in self.peer_views.iter() {
            let (k, v) = entry.context("reading PEER_VIEWS")?;
            snap.peer_views.insert(prefix_of(&k), v);
        }
        for entry in self.peers.iter() {
            let (k, v) = entry.context("reading PEERS")?;
            snap.peers.insert(k, v);
        }
        for entry in self.peer_endpoints.iter() {
            let (k, v) = entry.context("reading PEER_ENDPOINTS")?;
            snap.peer_endpoints.insert(k, v);
        }
        for entry in self.node_slices.iter() {
            let (k, v) = entry.context("reading NODE_SLICES")?;
            snap.node_slices.insert(prefix_of(&k), v);
        }
        for key in self.pod_interfaces.keys() {
            snap.pod_interfaces
                .insert(key.context("reading POD_INTERFACES")?);
        }
        for entry in self.peer_counters.iter() {
            let (k, per_cpu) = entry.context("reading PEER_COUNTERS")?;
            let sum = per_cpu
                .iter()
                .fold(TrafficCounters::default(), |acc, c| TrafficCounters {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                    last_seen_ns: acc.last_seen_ns.max(c.last_seen_ns),
                });
            snap.peer_counters.insert((k.peer_id, k.direction), sum);
        }
        for reason in DropReason::ALL {
            let per_cpu = self
                .drop_counters
                .get(&(reason as u32), 0)
                .context("reading DROP_COUNTERS")?;
            snap.drops.push((reason, per_cpu.iter().sum()));
        }
        Ok(snap)
    }

    /// Brings the maps to `desired` by difference. Order matters for packets
    /// in flight: peers before the views that point at them on the way in,
    /// views before their peers on the way out, and the config entry last so
    /// programs only act once the tables they read are complete. Counters of
    /// kept peers are preserved. Returns the number of entries written or
    /// removed.
    pub fn apply(&mut self, desired: &DesiredState, interfaces: Interfaces) -> Result<usize> {
        let current = self.snapshot()?;
        let mut changes = 0;

        let peers = plan(&current.peers, &desired.peers);
        let views = plan(&current.peer_views, &desired.peer_views);
        let endpoints = plan(&current.peer_endpoints, &desired.peer_endpoints);
        let slices = plan(&current.node_slices, &desired.node_slices);

        let cpus = nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?
            .get() as usize;
        for peer_id in desired.peers.keys() {
            for direction in [Direction::ToPeer, Direction::FromPeer] {
                let key = PeerCounterKey {
                    peer_id: *peer_id,
                    direction: direction as u32,
                };
                if !current
                    .peer_counters
                    .contains_key(&(key.peer_id, key.direction))
                {
                    let zero = PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])?;
                    self.peer_counters
                        .insert(&key, zero, 0)
                        .context("creating peer counters")?;
                }
            }
        }
        for (id, peer) in &peers.upserts {
            self.peers
                .insert(id, peer, 0)
                .with_context(|| format!("writing peer {id}"))?;
        }
        for (endpoint, id) in &endpoints.upserts {
            self.peer_endpoints
                .insert(endpoint, id, 0)
                .context("writing PEER_ENDPOINTS")?;
        }
        for (prefix, slice) in &slices.upserts {
            self.node_slices
                .insert(&lpm_key(*prefix), slice, 0)
                .context("writing NODE_SLICES")?;
        }
        for (prefix, view) in &views.upserts {
            self.peer_views
                .insert(&lpm_key(*prefix), view, 0)
                .context("writing PEER_VIEWS")?;
        }
        for prefix in &views.deletes {
            self.peer_views
                .remove(&lpm_key(*prefix))
                .context("removing from PEER_VIEWS")?;
        }
        for prefix in &slices.deletes {
            self.node_slices
                .remove(&lpm_key(*prefix))
                .context("removing from NODE_SLICES")?;
        }
        for endpoint in &endpoints.deletes {
            self.peer_endpoints
                .remove(endpoint)
                .context("removing from PEER_ENDPOINTS")?;
        }
        for id in &peers.deletes {
            self.peers.remove(id).context("removing from PEERS")?;
            for direction in [Direction::ToPeer, Direction::FromPeer] {
                let key = PeerCounterKey {
                    peer_id: *id,
                    direction: direction as u32,
                };
                // A missing counter entry is not an error: nothing to remove.
                let _ = self.peer_counters.remove(&key);
            }
        }
        changes +=
            peers.upserts.len() + peers.deletes.len() + views.upserts.len() + views.deletes.len();
        changes += endpoints.upserts.len()
            + endpoints.deletes.len()
            + slices.upserts.len()
            + slices.deletes.len();

        let config = FabricConfig {
            underlay_ifindex: interfaces.underlay,
            public_ifindex: interfaces.public.unwrap_or(0),
            ..desired.config
        };
        if config != current.config {
            self.config
                .set(0, &config, 0)
                .context("writing FABRIC_CONFIG")?;
            changes += 1;
        }
        Ok(changes)
    }
}

impl FabricMaps {
    /// Makes POD_INTERFACES equal `wanted` (host ends of pod veths). New
    /// entries first; a stale one only matters if a route still points at
    /// its interface, which the kernel removes with the interface.
    pub fn sync_pod_interfaces(&mut self, wanted: &BTreeSet<u32>) -> Result<usize> {
        let current: BTreeSet<u32> = self
            .pod_interfaces
            .keys()
            .collect::<Result<_, _>>()
            .context("reading POD_INTERFACES")?;
        let mut changes = 0;
        for index in wanted.difference(&current) {
            self.pod_interfaces
                .insert(index, &1, 0)
                .context("writing POD_INTERFACES")?;
            changes += 1;
        }
        for index in current.difference(wanted) {
            self.pod_interfaces
                .remove(index)
                .context("removing from POD_INTERFACES")?;
            changes += 1;
        }
        Ok(changes)
    }
}

/// Removes the pinned maps of a daemon (they outlive it otherwise).
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    for name in ALL_MAP_NAMES {
        let path: PathBuf = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin_dir.display())),
    }
}
