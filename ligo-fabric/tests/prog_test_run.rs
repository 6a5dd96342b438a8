//! The real eBPF object, run with BPF_PROG_TEST_RUN on crafted frames built
//! by an independent library (etherparse): exact output bytes, return codes
//! and counter movement for every program path. Needs root.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice,
    UdpHeader,
};
use ligo_fabric::{
    config::parse,
    desired::desired_state,
    fabric_maps::{FabricMaps, Snapshot},
    host::{HostFacts, Interfaces},
    programs::ScratchLoad,
};
use ligo_fabric_common::{
    headers::{outer, ENCAP_LEN},
    DropReason,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PORT: u16 = 4799;

/// Cluster 1 (10.244.0.0/16); peer 2 has real 10.100.16.0/20, seen as the
/// non-octet-aligned 10.200.32.0/20.
const PEER: &str = r#"
[[peers]]
id = 2
pod_cidr = "10.100.16.0/20"
view_cidr = "10.200.32.0/20"
"#;

fn node_config() -> String {
    format!(
        "cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\n[node]\nuplink = \"eth0\"\nunderlay_ip = \"192.0.2.11\"\ngateway_ip = \"192.0.2.1\"\n{PEER}"
    )
}

fn gateway_config() -> String {
    format!(
        "cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\n[gateway]\nunderlay_interface = \"eth0\"\nunderlay_ip = \"192.0.2.1\"\npublic_interface = \"eth1\"\npublic_ip = \"203.0.113.1\"\nnode_slices = [{{ node_ip = \"192.0.2.11\", pod_cidr = \"10.244.1.0/24\" }}, {{ node_ip = \"192.0.2.12\", pod_cidr = \"10.244.2.0/24\" }}]\n{PEER}endpoint = \"203.0.113.2:4799\"\ntransport = \"plain\"\n"
    )
}

/// The gateway with peer 2 over WireGuard (the key file is not read here).
fn wireguard_gateway_config() -> String {
    gateway_config()
        .replace(
            "endpoint = \"203.0.113.2:4799\"\ntransport = \"plain\"\n",
            "endpoint = \"203.0.113.2:51820\"\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n",
        )
        .replace(
            "public_ip = \"203.0.113.1\"\n",
            "public_ip = \"203.0.113.1\"\nprivate_key_file = \"/etc/ligo/wg.key\"\n",
        )
}

// The same skip rule as every privileged test (fails under CI, counted as
// skipped by `cargo xtask test` otherwise).
#[path = "../../xtask/src/privileged.rs"]
mod privileged;

/// The eBPF object loaded with its maps pinned in a private bpffs, and
/// filled from a daemon configuration through the daemon's own code.
struct Fixture {
    // Dropped in this order: map handles, then the object and its bpffs.
    maps: FabricMaps,
    load: ScratchLoad,
}

static FIXTURES: AtomicU32 = AtomicU32::new(0);

impl Fixture {
    fn new(config: &str) -> Self {
        let tag = format!("test{}", FIXTURES.fetch_add(1, Ordering::Relaxed));
        let load = ScratchLoad::new(&tag).expect("load object");
        let mut maps = FabricMaps::open(load.pin_dir()).expect("open maps");
        let config = parse(config).expect("config");
        let desired = desired_state(&config.local, &config.spec, &HostFacts::default());
        maps.apply(
            &desired,
            Interfaces {
                underlay: 5,
                public: Some(6),
            },
        )
        .expect("apply");
        Self { maps, load }
    }

    fn snapshot(&self) -> Snapshot {
        self.maps.snapshot().expect("snapshot")
    }

    fn run_tc(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        run(&*self.load.classifier(name).expect(name), frame)
    }

    fn run_xdp(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        run(&*self.load.xdp(name).expect(name), frame)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.snapshot()
            .drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }

    /// (packets, bytes) counted for peer 2 in `direction` (0 to, 1 from).
    fn traffic(&self, direction: u32) -> (u64, u64) {
        let c = self
            .snapshot()
            .peer_counters
            .get(&(2, direction))
            .copied()
            .unwrap_or_default();
        (c.packets, c.bytes)
    }
}

/// The two node ingress programs do one job at two hooks.
#[derive(Clone, Copy, Debug)]
enum IngressHook {
    Xdp,
    Tc,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

impl Fixture {
    fn run_ingress(&mut self, hook: IngressHook, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let (ret, out) = match hook {
            IngressHook::Xdp => self.run_xdp("node_ingress", frame),
            IngressHook::Tc => self.run_tc("node_ingress_tc", frame),
        };
        let verdict = match (hook, ret) {
            (IngressHook::Xdp, XDP_PASS) | (IngressHook::Tc, TC_ACT_OK) => Verdict::Pass,
            (IngressHook::Xdp, XDP_DROP) | (IngressHook::Tc, TC_ACT_SHOT) => Verdict::Drop,
            other => panic!("unexpected return {other:?}"),
        };
        (verdict, out)
    }
}

const HOOKS: [IngressHook; 2] = [IngressHook::Xdp, IngressHook::Tc];

fn run<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; 4096];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run of a {}-byte frame: {e:?}", frame.len()));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn ip(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().expect("ip").octets()
}

#[derive(Clone, Copy)]
enum L4 {
    Udp,
    Tcp,
    Icmp,
}

/// An Ethernet frame carrying an IPv4 packet built by etherparse.
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: &str,
    dst: &str,
    l4: L4,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(ip(src), ip(dst), 64);
    let mut out = Vec::new();
    match l4 {
        L4::Udp => b.udp(40000, 53).write(&mut out, payload),
        L4::Tcp => b.tcp(40000, 80, 7, 65535).write(&mut out, payload),
        L4::Icmp => b.icmpv4_echo_request(9, 1).write(&mut out, payload),
    }
    .expect("build");
    out
}

/// The outer headers of a fabric frame.
struct Outer<'a> {
    /// (destination, source) MACs of the outer Ethernet header.
    macs: ([u8; 6], [u8; 6]),
    src: &'a str,
    dst: &'a str,
    src_port: u16,
    dst_port: u16,
    vni: u32,
}

/// A fabric frame as RFC 7348 lays it out, built from etherparse's headers
/// (outer IPv4: TTL 64, DF, id 0; UDP checksum 0) and the 8 VXLAN bytes
/// written from the RFC (flags 0x08, VNI, reserved), around `inner` (an
/// Ethernet frame). Independent of `encap_header`, which the programs use.
fn vxlan_frame(outer: &Outer<'_>, inner: &[u8]) -> Vec<u8> {
    let vni = outer.vni.to_be_bytes();
    let mut udp_payload = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    udp_payload.extend_from_slice(inner);
    let udp_len = (UdpHeader::LEN + udp_payload.len()) as u16;
    let mut ipv4 = Ipv4Header::new(udp_len, 64, IpNumber::UDP, ip(outer.src), ip(outer.dst))
        .expect("outer IPv4");
    ipv4.dont_fragment = true;
    let udp = UdpHeader {
        source_port: outer.src_port,
        destination_port: outer.dst_port,
        length: udp_len,
        checksum: 0,
    };
    let eth = Ethernet2Header {
        destination: outer.macs.0,
        source: outer.macs.1,
        ether_type: EtherType::IPV4,
    };
    let mut f = Vec::new();
    eth.write(&mut f).expect("ethernet");
    ipv4.write(&mut f).expect("ipv4");
    udp.write(&mut f).expect("udp");
    f.extend_from_slice(&udp_payload);
    f
}

/// Wraps `inner` (an Ethernet frame) as the fabric frame a peer or node
/// sends us with VNI `vni`.
fn encapsulated(outer_src: &str, outer_dst: &str, vni: u32, inner: &[u8]) -> Vec<u8> {
    vxlan_frame(
        &Outer {
            macs: (NODE_MAC, GW_MAC),
            src: outer_src,
            dst: outer_dst,
            src_port: 50000,
            dst_port: PORT,
            vni,
        },
        inner,
    )
}

/// Checks IP and L4 checksums of the IPv4 packet in an Ethernet frame.
fn assert_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("parse");
    let Some(etherparse::NetSlice::Ipv4(ipv4)) = &sliced.net else {
        panic!("not ipv4")
    };
    let header = ipv4.header().to_header();
    assert_eq!(
        header.calc_header_checksum(),
        header.header_checksum,
        "IPv4 checksum"
    );
    match sliced.transport {
        Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            assert_eq!(
                udp.to_header()
                    .calc_checksum_ipv4(&header, udp.payload())
                    .expect("udp"),
                udp.checksum(),
                "UDP checksum"
            )
        }
        Some(TransportSlice::Tcp(tcp)) => {
            assert_eq!(
                tcp.to_header()
                    .calc_checksum_ipv4(&header, tcp.payload())
                    .expect("tcp"),
                tcp.checksum(),
                "TCP checksum"
            )
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            assert_eq!(
                icmp.icmp_type().calc_checksum(icmp.payload()),
                icmp.checksum(),
                "ICMP checksum"
            )
        }
        _ => {}
    }
}

#[test]
fn node_egress_remaps_and_encapsulates_exactly() {
    if !privileged::require_root("node_egress_remaps_and_encapsulates_exactly") {
        return;
    }
    let mut fx = Fixture::new(&node_config());
    let payload = b"ligo fabric payload that is long enough to matter...";
    for (i, l4) in [L4::Udp, L4::Tcp, L4::Icmp].into_iter().enumerate() {
        let before = fx.traffic(0);
        let input = frame(NODE_MAC, GW_MAC, "10.244.1.10", "10.200.33.11", l4, payload);
        let (ret, out) = fx.run_tc("node_egress", &input);
        assert_eq!(ret, TC_ACT_OK, "case {i}");
        assert_eq!(out.len(), input.len() + ENCAP_LEN);

        // Expected: the same packet as if sent to the real address, wrapped.
        let translated = frame(NODE_MAC, GW_MAC, "10.244.1.10", "10.100.17.11", l4, payload);
        let src_port = u16::from_be_bytes([out[outer::UDP], out[outer::UDP + 1]]);
        assert!(
            src_port >= 49152,
            "flow-hash source port {src_port} outside the dynamic range"
        );
        // The frame's own Ethernet header stays outermost; the inner one
        // repeats it.
        let expected = vxlan_frame(
            &Outer {
                macs: (GW_MAC, NODE_MAC),
                src: "192.0.2.11",
                dst: "192.0.2.1",
                src_port,
                dst_port: PORT,
                vni: 2,
            },
            &translated,
        );
        assert_eq!(
            out, expected,
            "case {i}: output differs from the expected bytes"
        );
        assert_checksums_valid(&out[outer::INNER_ETH..]);
        let after = fx.traffic(0);
        assert_eq!(after.0, before.0 + 1);
        assert_eq!(after.1, before.1 + (input.len() - 14) as u64);
    }
    // The same flow always gets the same outer source port.
    let input = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.200.33.11",
        L4::Udp,
        payload,
    );
    let (_, first) = fx.run_tc("node_egress", &input);
    let (_, second) = fx.run_tc("node_egress", &input);
    assert_eq!(
        first[outer::UDP..outer::UDP + 2],
        second[outer::UDP..outer::UDP + 2]
    );
}

#[test]
fn node_egress_keeps_a_zero_udp_checksum_and_skips_l4_of_later_fragments() {
    if !privileged::require_root(
        "node_egress_keeps_a_zero_udp_checksum_and_skips_l4_of_later_fragments",
    ) {
        return;
    }
    let mut fx = Fixture::new(&node_config());
    let mut input = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.200.33.11",
        L4::Udp,
        b"no checksum",
    );
    input[14 + 20 + 6] = 0;
    input[14 + 20 + 7] = 0;
    let (ret, out) = fx.run_tc("node_egress", &input);
    assert_eq!(ret, TC_ACT_OK);
    let inner = &out[outer::INNER_IP..];
    assert_eq!(&inner[16..20], &ip("10.100.17.11"));
    assert_eq!(
        &inner[20 + 6..20 + 8],
        &[0, 0],
        "UDP checksum 0 must stay 0"
    );

    // A non-first fragment: bytes after the IP header are payload, not a
    // UDP header, and must not be touched.
    let mut fragment = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.200.33.11",
        L4::Udp,
        b"fragment payload bytes",
    );
    fragment[14 + 6] = 0x00;
    fragment[14 + 7] = 0x10; // offset 16 * 8 bytes
    let mut header = etherparse::Ipv4Header::from_slice(&fragment[14..])
        .expect("ip")
        .0;
    header.header_checksum = header.calc_header_checksum();
    fragment[14..34].copy_from_slice(&header.to_bytes());
    let (ret, out) = fx.run_tc("node_egress", &fragment);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(
        &out[outer::INNER_IP + 20..],
        &fragment[34..],
        "fragment payload changed"
    );
    assert_eq!(
        &out[outer::INNER_IP + 16..outer::INNER_IP + 20],
        &ip("10.100.17.11")
    );
    let inner_header = etherparse::Ipv4Header::from_slice(&out[outer::INNER_IP..])
        .expect("ip")
        .0;
    assert_eq!(
        inner_header.calc_header_checksum(),
        inner_header.header_checksum
    );
}

#[test]
fn node_egress_passes_foreign_traffic_untouched() {
    if !privileged::require_root("node_egress_passes_foreign_traffic_untouched") {
        return;
    }
    let mut fx = Fixture::new(&node_config());
    let local = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.244.2.11",
        L4::Udp,
        b"in-cluster",
    );
    let mut arp = local.clone();
    arp[12] = 0x08;
    arp[13] = 0x06;
    for input in [local, arp, vec![0u8; 14]] {
        let (ret, out) = fx.run_tc("node_egress", &input);
        assert_eq!((ret, &out), (TC_ACT_OK, &input));
    }
    assert_eq!(fx.traffic(0), (0, 0));
}

#[test]
fn gateway_forwards_between_nodes_and_peer_gateways() {
    if !privileged::require_root("gateway_forwards_between_nodes_and_peer_gateways") {
        return;
    }
    let mut fx = Fixture::new(&gateway_config());
    let inner = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.100.17.11",
        L4::Tcp,
        b"to the peer",
    );

    // From a local node (VNI = peer id) to the peer gateway (VNI = our id).
    let input = encapsulated("192.0.2.11", "192.0.2.1", 2, &inner);
    let (ret, out) = fx.run_tc("gateway", &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    // Re-addressed in place: outer addresses, VNI = our id, fabric port;
    // the flow's source port and the inner frame kept.
    let expected = vxlan_frame(
        &Outer {
            macs: (NODE_MAC, GW_MAC),
            src: "203.0.113.1",
            dst: "203.0.113.2",
            src_port: 50000,
            dst_port: PORT,
            vni: 1,
        },
        &inner,
    );
    assert_eq!(out, expected);
    assert_eq!(fx.traffic(0), (1, (inner.len() - 14) as u64));

    // From the peer gateway (VNI = its id) to the node owning the slice.
    let reply = frame(
        GW_MAC,
        NODE_MAC,
        "10.100.17.11",
        "10.244.2.11",
        L4::Udp,
        b"reply",
    );
    let input = encapsulated("203.0.113.2", "203.0.113.1", 2, &reply);
    let (ret, out) = fx.run_tc("gateway", &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let expected = vxlan_frame(
        &Outer {
            macs: (NODE_MAC, GW_MAC),
            src: "192.0.2.1",
            dst: "192.0.2.12",
            src_port: 50000,
            dst_port: PORT,
            vni: 2,
        },
        &reply,
    );
    assert_eq!(out, expected);
    assert_eq!(fx.traffic(1), (1, (reply.len() - 14) as u64));
}

#[test]
fn gateway_drops_with_the_right_reason() {
    if !privileged::require_root("gateway_drops_with_the_right_reason") {
        return;
    }
    let mut fx = Fixture::new(&gateway_config());
    let inner = frame(
        GW_MAC,
        NODE_MAC,
        "10.100.17.11",
        "10.244.2.11",
        L4::Udp,
        b"x",
    );
    let cases = [
        (
            encapsulated("203.0.113.9", "203.0.113.1", 2, &inner),
            DropReason::UnknownEndpoint,
        ),
        (
            encapsulated("203.0.113.2", "203.0.113.1", 3, &inner),
            DropReason::PeerVniMismatch,
        ),
        (
            encapsulated("192.0.2.11", "192.0.2.1", 7, &inner),
            DropReason::UnknownPeer,
        ),
        (
            encapsulated(
                "203.0.113.2",
                "203.0.113.1",
                2,
                &frame(
                    GW_MAC,
                    NODE_MAC,
                    "10.100.17.11",
                    "10.244.9.1",
                    L4::Udp,
                    b"x",
                ),
            ),
            DropReason::NoNodeForDestination,
        ),
        (
            {
                let mut f = encapsulated("192.0.2.11", "192.0.2.1", 2, &inner);
                f[outer::VXLAN] = 0x0c;
                f
            },
            DropReason::MalformedTunnelHeader,
        ),
    ];
    for (input, reason) in cases {
        let before = fx.drops(reason);
        let (ret, _) = fx.run_tc("gateway", &input);
        assert_eq!(ret, TC_ACT_SHOT, "{reason:?}");
        assert_eq!(fx.drops(reason), before + 1, "{reason:?} not counted");
    }
    // Not fabric traffic: untouched.
    let plain = frame(
        NODE_MAC,
        GW_MAC,
        "192.0.2.11",
        "192.0.2.1",
        L4::Udp,
        b"dns?",
    );
    assert_eq!(fx.run_tc("gateway", &plain), (TC_ACT_OK, plain.clone()));
}

#[test]
fn node_ingress_decapsulates_and_remaps_the_source_exactly() {
    if !privileged::require_root("node_ingress_decapsulates_and_remaps_the_source_exactly") {
        return;
    }
    for hook in HOOKS {
        let mut fx = Fixture::new(&node_config());
        for l4 in [L4::Tcp, L4::Udp, L4::Icmp] {
            // Inner MACs are whatever the sender wrote; the output carries the
            // outer ones so the stack accepts the frame.
            let inner = frame(
                [2, 9, 9, 9, 9, 9],
                [2, 8, 8, 8, 8, 8],
                "10.100.17.11",
                "10.244.1.10",
                l4,
                b"reply payload",
            );
            let input = encapsulated("192.0.2.1", "192.0.2.11", 2, &inner);
            let before = fx.traffic(1);
            let (verdict, out) = fx.run_ingress(hook, &input);
            assert_eq!(verdict, Verdict::Pass, "{hook:?}");
            let expected = frame(
                GW_MAC,
                NODE_MAC,
                "10.200.33.11",
                "10.244.1.10",
                l4,
                b"reply payload",
            );
            assert_eq!(out, expected, "{hook:?}");
            let after = fx.traffic(1);
            assert_eq!(after, (before.0 + 1, before.1 + (inner.len() - 14) as u64));
        }
    }
}

#[test]
fn node_ingress_drops_with_the_right_reason_and_passes_the_rest() {
    if !privileged::require_root("node_ingress_drops_with_the_right_reason_and_passes_the_rest") {
        return;
    }
    for hook in HOOKS {
        let mut fx = Fixture::new(&node_config());
        let inner = frame(
            GW_MAC,
            NODE_MAC,
            "10.100.17.11",
            "10.244.1.10",
            L4::Tcp,
            b"data",
        );
        let mut truncated = encapsulated("192.0.2.1", "192.0.2.11", 2, &inner);
        truncated.truncate(outer::INNER_IP + 20 + 10);
        let cases = [
            (
                encapsulated("192.0.2.99", "192.0.2.11", 2, &inner),
                DropReason::NotFromGateway,
            ),
            (
                encapsulated("192.0.2.1", "192.0.2.11", 5, &inner),
                DropReason::UnknownPeer,
            ),
            (
                encapsulated(
                    "192.0.2.1",
                    "192.0.2.11",
                    2,
                    &frame(
                        GW_MAC,
                        NODE_MAC,
                        "10.244.1.99",
                        "10.244.1.10",
                        L4::Udp,
                        b"spoof",
                    ),
                ),
                DropReason::SourceOutsidePeerCidr,
            ),
            (truncated, DropReason::TruncatedInnerPacket),
            (
                {
                    let mut f = encapsulated("192.0.2.1", "192.0.2.11", 2, &inner);
                    f[outer::INNER_ETH + 12] = 0x86;
                    f[outer::INNER_ETH + 13] = 0xdd;
                    f
                },
                DropReason::InnerNotIpv4,
            ),
        ];
        for (input, reason) in cases {
            let before = fx.drops(reason);
            let (verdict, _) = fx.run_ingress(hook, &input);
            assert_eq!(verdict, Verdict::Drop, "{hook:?} {reason:?}");
            assert_eq!(fx.drops(reason), before + 1, "{reason:?} not counted");
        }
        let mut other_port = encapsulated("192.0.2.1", "192.0.2.11", 2, &inner);
        other_port[outer::UDP + 2..outer::UDP + 4].copy_from_slice(&8472u16.to_be_bytes());
        let plain = frame(
            GW_MAC,
            NODE_MAC,
            "192.0.2.1",
            "192.0.2.11",
            L4::Icmp,
            b"ping",
        );
        for input in [other_port, plain] {
            assert_eq!(
                fx.run_ingress(hook, &input),
                (Verdict::Pass, input.clone()),
                "{hook:?}"
            );
        }
        assert_eq!(fx.traffic(1), (0, 0));
    }
}

/// With WireGuard the gateway program hands node frames to the stack (the
/// tunnel's socket) untouched but counted, and `gateway_tunnel` turns a
/// decrypted packet written to the tunnel device into the fabric frame a
/// node expects: VXLAN with VNI = the peer id from the source MAC, toward
/// the node owning the destination.
#[test]
fn wireguard_frames_go_up_and_tunnel_device_frames_go_to_the_owning_node() {
    if !privileged::require_root(
        "wireguard_frames_go_up_and_tunnel_device_frames_go_to_the_owning_node",
    ) {
        return;
    }
    let mut fx = Fixture::new(&wireguard_gateway_config());
    let inner = frame(
        NODE_MAC,
        GW_MAC,
        "10.244.1.10",
        "10.100.17.11",
        L4::Tcp,
        b"to the peer",
    );
    let input = encapsulated("192.0.2.11", "192.0.2.1", 2, &inner);
    let (ret, out) = fx.run_tc("gateway", &input);
    assert_eq!(ret, TC_ACT_OK, "up the stack to the tunnel");
    assert_eq!(out, input, "untouched");
    assert_eq!(fx.traffic(0), (1, (inner.len() - 14) as u64));

    let tunnel_mac = ligo_fabric_common::headers::tunnel_source_mac(2);
    let decrypted = frame(
        tunnel_mac,
        [0x02, 0x4c, 0x47, 0xff, 0xff, 0xff],
        "10.100.17.11",
        "10.244.2.11",
        L4::Udp,
        b"from the peer",
    );
    let (ret, out) = fx.run_tc("gateway_tunnel", &decrypted);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let expected = vxlan_frame(
        &Outer {
            macs: (decrypted[..6].try_into().expect("mac"), tunnel_mac),
            src: "192.0.2.1",
            dst: "192.0.2.12",
            src_port: u16::from_be_bytes([out[outer::UDP], out[outer::UDP + 1]]),
            dst_port: PORT,
            vni: 2,
        },
        &decrypted,
    );
    assert_eq!(out, expected);
    assert_eq!(fx.traffic(1), (1, (decrypted.len() - 14) as u64));

    // A peer id nobody configured, a MAC without the prefix, a destination
    // no node owns: dropped, each with its reason.
    for (mac, dst, reason) in [
        (
            ligo_fabric_common::headers::tunnel_source_mac(9),
            "10.244.2.11",
            DropReason::UnknownPeer,
        ),
        (NODE_MAC, "10.244.2.11", DropReason::UnknownPeer),
        (tunnel_mac, "10.244.9.1", DropReason::NoNodeForDestination),
    ] {
        let before = fx.drops(reason);
        let bad = frame(mac, GW_MAC, "10.100.17.11", dst, L4::Udp, b"x");
        assert_eq!(fx.run_tc("gateway_tunnel", &bad).0, TC_ACT_SHOT);
        assert_eq!(fx.drops(reason), before + 1, "{reason:?}");
    }
}

/// An ICMP port-unreachable (type 3) from `from` to `to`, quoting a UDP
/// packet `quoted_src` -> `quoted_dst`, in an Ethernet frame.
fn icmp_error_frame(
    macs: ([u8; 6], [u8; 6]),
    from: &str,
    to: &str,
    quoted_src: &str,
    quoted_dst: &str,
) -> Vec<u8> {
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(ip(quoted_src), ip(quoted_dst), 63)
        .udp(40000, 33434)
        .write(&mut quoted, b"probe payload")
        .expect("quoted");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(ip(from), ip(to), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut out, &quoted[..28])
        .expect("icmp");
    out
}

/// `packet` (an IPv4 ICMP error, from its IP header) with the two fields
/// the comparison leaves out zeroed: the ICMP checksum (checked on its own)
/// and the quoted UDP checksum, which no kernel verifies and the fabric
/// leaves as it was.
fn masked_icmp_error(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[20 + 2..20 + 4].copy_from_slice(&[0, 0]);
    p[20 + 28 + 6..20 + 28 + 8].copy_from_slice(&[0, 0]);
    p
}

/// ICMP errors about fabric flows read, at the kernel that gets them, as
/// about the packet it sent: the egress puts the quoted source back into
/// the peer's real space (and sends an error the node made itself from the
/// packet's destination), the ingress puts the quoted destination into our
/// view. Every checksum stays valid; both ingress hooks agree.
#[test]
fn icmp_errors_quote_the_packet_as_its_sender_sent_it() {
    if !privileged::require_root("icmp_errors_quote_the_packet_as_its_sender_sent_it") {
        return;
    }
    let mut fx = Fixture::new(&node_config());
    // Our pod 10.244.1.10 (or this node, 10.244.1.1) answers a packet from
    // the peer's 10.100.17.11, which it saw as 10.200.33.11.
    for from in ["10.244.1.10", "10.244.1.1"] {
        let input = icmp_error_frame(
            (NODE_MAC, GW_MAC),
            from,
            "10.200.33.11",
            "10.200.33.11",
            "10.244.1.10",
        );
        let (ret, out) = fx.run_tc("node_egress", &input);
        assert_eq!(ret, TC_ACT_OK);
        let expected = icmp_error_frame(
            (NODE_MAC, GW_MAC),
            "10.244.1.10",
            "10.100.17.11",
            "10.100.17.11",
            "10.244.1.10",
        );
        assert_eq!(
            masked_icmp_error(&out[14 + ENCAP_LEN..]),
            masked_icmp_error(&expected[14..]),
            "error from {from}"
        );
        assert_eq!(
            out[out.len() - 2..],
            input[input.len() - 2..],
            "quoted UDP checksum"
        );
        assert_checksums_valid(&out[outer::INNER_ETH..]);
    }
    // The peer's error about our packet 10.244.1.10 -> 10.100.17.11.
    for hook in HOOKS {
        let inner = icmp_error_frame(
            ([2, 9, 9, 9, 9, 9], [2, 8, 8, 8, 8, 8]),
            "10.100.17.11",
            "10.244.1.10",
            "10.244.1.10",
            "10.100.17.11",
        );
        let input = encapsulated("192.0.2.1", "192.0.2.11", 2, &inner);
        let (verdict, out) = fx.run_ingress(hook, &input);
        assert_eq!(verdict, Verdict::Pass, "{hook:?}");
        let expected = icmp_error_frame(
            (GW_MAC, NODE_MAC),
            "10.200.33.11",
            "10.244.1.10",
            "10.244.1.10",
            "10.200.33.11",
        );
        assert_eq!(out[..14], expected[..14], "{hook:?}");
        assert_eq!(
            masked_icmp_error(&out[14..]),
            masked_icmp_error(&expected[14..]),
            "{hook:?}"
        );
        assert_checksums_valid(&out);
    }
}

/// 12,000 hostile frames built with scapy (truncated at and around every
/// header boundary, bad IHL and total length, IP options, fragments, TTL 1,
/// ICMP errors, IPv6, ARP, VLAN tags, frames beyond the MTU, VXLAN with
/// wrong flags or unknown VNI, strangers' sources and ports) through
/// node_ingress at both hooks, node_egress, gateway and gateway_tunnel.
/// Every frame's outcome must be
/// what the reference model in `ligo-fabric-common` says (each program sees
/// the part of the corpus built for its hook): passed untouched,
/// dropped with the right counted reason, or translated, with the addresses
/// the rules give and every checksum that was valid before still valid by
/// scapy's reckoning.
#[test]
fn hostile_corpus_matches_the_reference_model() {
    use ligo_fabric_common::model::Outcome;
    if !privileged::require_root("hostile_corpus_matches_the_reference_model") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ligo-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/hostile.py");
    let corpus = dir.join("frames.bin");
    let status = std::process::Command::new("python3")
        .args([script, "generate", &corpus.to_string_lossy(), "3000"])
        .status()
        .expect("python3 with scapy (installed by xtask/bootstrap.sh)");
    assert!(status.success(), "corpus generation failed");
    let data = std::fs::read(&corpus).expect("corpus");

    use ligo_fabric_common::model::corpus::{
        GATEWAY as gateway_model, NODE as model, REAL_TO_VIEW as real_to_view,
    };
    let views = model.views;
    let mut fx = Fixture::new(&node_config());
    let mut gw = Fixture::new(&gateway_config());
    let drops_before: Vec<u64> = DropReason::ALL
        .iter()
        .map(|r| fx.drops(*r) + gw.drops(*r))
        .collect();
    let mut expected_drops = [0u64; DropReason::COUNT as usize];
    let mut pairs = Vec::new();
    let mut tally = std::collections::BTreeMap::<String, u64>::new();
    let (mut at, mut frames) = (0, 0);
    while at < data.len() {
        let direction = data[at];
        let len = usize::from(u16::from_be_bytes([data[at + 1], data[at + 2]]));
        let frame = data[at + 3..at + 3 + len].to_vec();
        at += 3 + len;
        frames += 1;
        let record = |pairs: &mut Vec<u8>, before: &[u8], after: &[u8]| {
            for part in [before, after] {
                pairs.extend_from_slice(&(part.len() as u32).to_be_bytes());
                pairs.extend_from_slice(part);
            }
        };
        if direction == 0 {
            let expected = model.ingress(&frame);
            *tally.entry(format!("ingress {expected:?}")).or_default() += 1;
            for hook in HOOKS {
                let (verdict, out) = fx.run_ingress(hook, &frame);
                match expected {
                    Outcome::Pass => {
                        assert_eq!(
                            verdict,
                            Verdict::Pass,
                            "{hook:?} frame {frames}: {frame:02x?}"
                        );
                        assert_eq!(out, frame, "{hook:?} frame {frames} changed");
                    }
                    Outcome::Drop(reason) => {
                        assert_eq!(
                            verdict,
                            Verdict::Drop,
                            "{hook:?} frame {frames} ({reason:?}): {frame:02x?}"
                        );
                        expected_drops[reason as usize] += 1;
                    }
                    Outcome::Translate => {
                        assert_eq!(
                            verdict,
                            Verdict::Pass,
                            "{hook:?} frame {frames}: {frame:02x?}"
                        );
                        let inner = &frame[outer::INNER_IP..];
                        let packet = &out[14..];
                        assert_eq!(packet.len(), inner.len(), "{hook:?} frame {frames}");
                        let src: [u8; 4] = inner[12..16].try_into().expect("src");
                        assert_eq!(
                            packet[12..16],
                            real_to_view.apply(src),
                            "{hook:?} frame {frames}"
                        );
                        assert_eq!(packet[16..20], inner[16..20], "{hook:?} frame {frames}");
                        record(&mut pairs, inner, packet);
                    }
                }
            }
        } else if direction == 3 {
            let expected = gateway_model.tunnel_device(&frame);
            *tally.entry(format!("tunnel {expected:?}")).or_default() += 1;
            let (ret, out) = gw.run_tc("gateway_tunnel", &frame);
            match expected {
                Outcome::Pass => unreachable!("the tunnel device passes nothing"),
                Outcome::Drop(reason) => {
                    assert_eq!(
                        ret, TC_ACT_SHOT,
                        "tunnel frame {frames} ({reason:?}): {frame:02x?}"
                    );
                    expected_drops[reason as usize] += 1;
                }
                Outcome::Translate => {
                    assert_eq!(ret, TC_ACT_REDIRECT, "tunnel frame {frames}: {frame:02x?}");
                    assert_eq!(out[14 + ENCAP_LEN..], frame[14..], "inner packet untouched");
                    let inner_dst: [u8; 4] = frame[30..34].try_into().expect("dst");
                    let node = gateway_model.node_for(inner_dst).expect("slice");
                    assert_eq!(
                        (&out[26..30], &out[30..34]),
                        (&ip("192.0.2.1")[..], &node[..])
                    );
                    assert_eq!(out[outer::VXLAN + 4..outer::VXLAN + 7], [0, 0, 2], "VNI");
                    let outer_ip =
                        etherparse::Ipv4HeaderSlice::from_slice(&out[14..34]).expect("outer IPv4");
                    assert_eq!(
                        outer_ip.to_header().calc_header_checksum(),
                        outer_ip.header_checksum(),
                        "tunnel frame {frames}: outer IPv4 checksum"
                    );
                }
            }
        } else if direction == 2 {
            let expected = gateway_model.ingress(&frame);
            *tally.entry(format!("gateway {expected:?}")).or_default() += 1;
            let (ret, out) = gw.run_tc("gateway", &frame);
            match expected {
                Outcome::Pass => {
                    assert_eq!(ret, TC_ACT_OK, "gateway frame {frames}: {frame:02x?}");
                    assert_eq!(out, frame, "gateway frame {frames} changed");
                }
                Outcome::Drop(reason) => {
                    assert_eq!(
                        ret, TC_ACT_SHOT,
                        "gateway frame {frames} ({reason:?}): {frame:02x?}"
                    );
                    expected_drops[reason as usize] += 1;
                }
                Outcome::Translate => {
                    assert_eq!(ret, TC_ACT_REDIRECT, "gateway frame {frames}: {frame:02x?}");
                    assert_eq!(
                        out[outer::VXLAN + 8..],
                        frame[outer::VXLAN + 8..],
                        "inner frame untouched"
                    );
                    let (src, dst) = if frame[30..34] == ip("203.0.113.1") {
                        let inner_dst: [u8; 4] = frame[outer::INNER_IP + 16..outer::INNER_IP + 20]
                            .try_into()
                            .expect("dst");
                        (
                            ip("192.0.2.1"),
                            gateway_model.node_for(inner_dst).expect("slice"),
                        )
                    } else {
                        (ip("203.0.113.1"), ip("203.0.113.2"))
                    };
                    assert_eq!(
                        (&out[26..30], &out[30..34]),
                        (&src[..], &dst[..]),
                        "gateway frame {frames}"
                    );
                    record(&mut pairs, &frame[14..], &out[14..]);
                }
            }
        } else {
            let expected = model.egress(&frame);
            *tally.entry(format!("egress {expected:?}")).or_default() += 1;
            let (ret, out) = fx.run_tc("node_egress", &frame);
            match expected {
                Outcome::Pass => {
                    assert_eq!(ret, TC_ACT_OK, "frame {frames}: {frame:02x?}");
                    assert_eq!(out, frame, "frame {frames} changed");
                }
                Outcome::Drop(reason) => {
                    assert_eq!(
                        ret, TC_ACT_SHOT,
                        "frame {frames} ({reason:?}): {frame:02x?}"
                    );
                    expected_drops[reason as usize] += 1;
                }
                Outcome::Translate => {
                    assert_eq!(ret, TC_ACT_OK, "frame {frames}: {frame:02x?}");
                    assert_eq!(out.len(), frame.len() + ENCAP_LEN, "frame {frames}");
                    let packet = &out[14 + ENCAP_LEN..];
                    let dst: [u8; 4] = frame[30..34].try_into().expect("dst");
                    assert_eq!(packet[16..20], views[0].apply(dst), "frame {frames}");
                    record(&mut pairs, &frame[14..], packet);
                }
            }
        }
    }
    eprintln!("corpus: {frames} frames, outcomes {tally:?}");
    assert!(frames >= 12_000, "corpus too small: {frames}");
    for (i, reason) in DropReason::ALL.iter().enumerate() {
        assert_eq!(
            fx.drops(*reason) + gw.drops(*reason) - drops_before[i],
            expected_drops[i],
            "drops counted as {reason:?}"
        );
    }
    // Every program's translation and pass paths are exercised, not only
    // its drops (a corpus that stopped reaching one would pass unnoticed).
    for outcome in [
        "ingress Translate",
        "ingress Pass",
        "egress Translate",
        "egress Pass",
        "gateway Translate",
        "gateway Pass",
        "tunnel Translate",
    ] {
        assert!(
            tally.get(outcome).is_some_and(|n| *n > 100),
            "too few {outcome}: {tally:?}"
        );
    }
    let pairs_path = dir.join("pairs.bin");
    std::fs::write(&pairs_path, &pairs).expect("pairs");
    let verified = std::process::Command::new("python3")
        .args([script, "verify", &pairs_path.to_string_lossy()])
        .output()
        .expect("verifier");
    let report = String::from_utf8_lossy(&verified.stdout);
    eprintln!("{report}");
    assert!(
        verified.status.success(),
        "scapy found bad checksums: {report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
