//! Per-packet cost of each program under BPF_PROG_TEST_RUN, as a ratio to a
//! do-nothing program of the same type loaded in the same run, and how the
//! remap lookup scales with the number of peer views.
//!
//! The fabric paths rewrite the packet, and a repeated test run keeps
//! running on the rewritten packet (which then takes the pass path). So a
//! fabric-path figure is the median of many single runs (`repeat = 1`),
//! baseline included; the pass path (traffic the fabric does not touch)
//! is measured with one run of `repeat` iterations.

use anyhow::{Context, Result};
use aya::{
    maps::lpm_trie::Key,
    programs::{TestRun, TestRunOptions, TestRunResult},
};
use ligo_fabric::{
    config::parse,
    desired::desired_state,
    fabric_maps::FabricMaps,
    host::{HostFacts, Interfaces},
    programs::ScratchLoad,
};
use ligo_fabric_common::{
    headers::{encap_header, EncapParams},
    maps::PeerView,
    prefix::PrefixRewrite,
};

/// Interface indexes written into the config map; test runs never reach them.
const TEST_RUN_INTERFACES: Interfaces = Interfaces {
    underlay: 1,
    public: Some(1),
};

fn run_once<P>(program: &P, frame: &[u8], repeat: u32) -> Result<TestRunResult>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; 4096];
    program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")
}

/// Median ns of `calls` single runs.
fn median_single_run_ns<P>(program: &P, frame: &[u8], calls: u32) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut samples = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        samples.push(run_once(program, frame, 1)?.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// ns per iteration of one run repeated `repeat` times.
fn repeated_ns<P>(program: &P, frame: &[u8], repeat: u32) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    Ok(run_once(program, frame, repeat)?.duration.as_nanos() as f64)
}

const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];

/// Ethernet + IPv4 + UDP with a 64-byte payload.
fn udp_frame(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = [0x5au8; 64];
    let total = 20 + 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let csum = ligo_fabric_common::checksum::ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

fn encapsulated(outer_src: [u8; 4], outer_dst: [u8; 4], vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut f = inner[..14].to_vec();
    f.extend_from_slice(&encap_header(&EncapParams {
        outer_src,
        outer_dst,
        src_port: 50000,
        dst_port: 4799,
        vni,
        inner_ip_len: (inner.len() - 14) as u32,
        inner_dst_mac: NODE_MAC,
        inner_src_mac: GW_MAC,
    }));
    f.extend_from_slice(&inner[14..]);
    f
}

const PEER: &str =
    "[[peers]]\nid = 2\npod_cidr = \"10.100.16.0/20\"\nview_cidr = \"10.200.32.0/20\"\n";

fn node_config() -> String {
    format!("cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\n[node]\nuplink = \"eth0\"\nunderlay_ip = \"192.0.2.11\"\ngateway_ip = \"192.0.2.1\"\n{PEER}")
}

fn gateway_config() -> String {
    format!("cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\n[gateway]\nunderlay_interface = \"eth0\"\nunderlay_ip = \"192.0.2.1\"\npublic_interface = \"eth1\"\npublic_ip = \"203.0.113.1\"\nnode_slices = [{{ node_ip = \"192.0.2.11\", pod_cidr = \"10.244.1.0/24\" }}]\n{PEER}endpoint = \"203.0.113.2:4799\"\ntransport = \"plain\"\n")
}

fn loaded(tag: &str, config: &str) -> Result<(FabricMaps, ScratchLoad)> {
    let load = ScratchLoad::new(tag)?;
    let mut maps = FabricMaps::open(load.pin_dir())?;
    let config = parse(config)?;
    let desired = desired_state(&config.local, &config.spec, &HostFacts::default());
    maps.apply(&desired, TEST_RUN_INTERFACES)?;
    Ok((maps, load))
}

#[derive(Debug, Clone)]
pub struct ProgramCost {
    pub program: &'static str,
    pub path: &'static str,
    pub ns: f64,
    pub baseline_ns: f64,
}

/// Fabric-path and pass-path costs of every program, against the no-op.
pub fn costs(calls: u32, repeat: u32) -> Result<Vec<ProgramCost>> {
    let mut results = vec![];
    let to_view = udp_frame([10, 244, 1, 10], [10, 200, 33, 11], 53);
    let in_cluster = udp_frame([10, 244, 1, 10], [10, 244, 2, 11], 53);
    let from_gateway = encapsulated(
        [192, 0, 2, 1],
        [192, 0, 2, 11],
        2,
        &udp_frame([10, 100, 17, 11], [10, 244, 1, 10], 53),
    );
    let plain_to_node = udp_frame([192, 0, 2, 1], [192, 0, 2, 11], 53);
    let from_node = encapsulated([192, 0, 2, 11], [192, 0, 2, 1], 2, &to_view);
    let plain_to_gateway = udp_frame([192, 0, 2, 11], [192, 0, 2, 1], 53);

    let (node_maps, mut node) = loaded("bench-node", &node_config())?;
    let tc_base = median_single_run_ns(&*node.classifier("tc_pass")?, &to_view, calls)?;
    let xdp_base = median_single_run_ns(&*node.xdp("xdp_pass")?, &from_gateway, calls)?;
    let tc_base_rep = repeated_ns(&*node.classifier("tc_pass")?, &in_cluster, repeat)?;
    let xdp_base_rep = repeated_ns(&*node.xdp("xdp_pass")?, &plain_to_node, repeat)?;
    let egress = median_single_run_ns(&*node.classifier("node_egress")?, &to_view, calls)?;
    let egress_pass = repeated_ns(&*node.classifier("node_egress")?, &in_cluster, repeat)?;
    let ingress = median_single_run_ns(&*node.xdp("node_ingress")?, &from_gateway, calls)?;
    let ingress_pass = repeated_ns(&*node.xdp("node_ingress")?, &plain_to_node, repeat)?;
    let ingress_tc =
        median_single_run_ns(&*node.classifier("node_ingress_tc")?, &from_gateway, calls)?;
    let ingress_tc_pass = repeated_ns(&*node.classifier("node_ingress_tc")?, &in_cluster, repeat)?;
    results.push(ProgramCost {
        program: "node_egress",
        path: "remap + encapsulate",
        ns: egress,
        baseline_ns: tc_base,
    });
    results.push(ProgramCost {
        program: "node_egress",
        path: "pass (not for a peer)",
        ns: egress_pass,
        baseline_ns: tc_base_rep,
    });
    results.push(ProgramCost {
        program: "node_ingress",
        path: "decapsulate + remap",
        ns: ingress,
        baseline_ns: xdp_base,
    });
    results.push(ProgramCost {
        program: "node_ingress",
        path: "pass (not fabric)",
        ns: ingress_pass,
        baseline_ns: xdp_base_rep,
    });
    results.push(ProgramCost {
        program: "node_ingress_tc",
        path: "decapsulate + remap",
        ns: ingress_tc,
        baseline_ns: tc_base,
    });
    results.push(ProgramCost {
        program: "node_ingress_tc",
        path: "pass (not fabric)",
        ns: ingress_tc_pass,
        baseline_ns: tc_base_rep,
    });
    drop((node_maps, node));

    let (_maps, mut gw) = loaded("bench-gw", &gateway_config())?;
    let forward = median_single_run_ns(&*gw.classifier("gateway")?, &from_node, calls)?;
    let gw_pass = repeated_ns(&*gw.classifier("gateway")?, &plain_to_gateway, repeat)?;
    results.push(ProgramCost {
        program: "gateway",
        path: "forward node -> peer",
        ns: forward,
        baseline_ns: tc_base,
    });
    results.push(ProgramCost {
        program: "gateway",
        path: "pass (not fabric)",
        ns: gw_pass,
        baseline_ns: tc_base_rep,
    });
    Ok(results)
}

/// node_egress fabric-path cost with `n` peer views installed.
pub fn lookup_scaling(counts: &[u32], calls: u32) -> Result<Vec<(u32, f64)>> {
    let (mut maps, mut node) = loaded("bench-lpm", &node_config())?;
    let frame = udp_frame([10, 244, 1, 10], [10, 200, 33, 11], 53);
    let mut installed = 1u32; // the configured view
    let mut out = vec![];
    for &n in counts {
        while installed < n {
            // Extra /24 views spread over 11.0.0.0/8..; all map to peer 2.
            let i = installed;
            let view = [11 + (i >> 16) as u8, (i >> 8) as u8, i as u8, 0];
            let entry = PeerView {
                peer_id: 2,
                view_to_real: PrefixRewrite::new(view, [10, 100, 16, 0], 24),
                ..Default::default()
            };
            maps.peer_views.insert(&Key::new(24, view), &entry, 0)?;
            installed += 1;
        }
        let ns = median_single_run_ns(&*node.classifier("node_egress")?, &frame, calls)?;
        out.push((n, ns));
    }
    Ok(out)
}

/// Milliseconds to apply `n` node slices to the maps of a gateway.
pub fn apply_time_ms(n: u32) -> Result<f64> {
    let (mut maps, _load) = loaded("bench-apply", &gateway_config())?;
    let mut config = gateway_config().replace(
        "pod_cidrs = [\"10.244.0.0/16\"]",
        "pod_cidrs = [\"10.0.0.0/9\"]",
    );
    let slices: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{ node_ip = \"192.0.2.{}\", pod_cidr = \"10.{}.{}.0/24\" }}",
                2 + i % 250,
                i >> 8,
                i & 0xff
            )
        })
        .collect();
    config = config.replace(
        "node_slices = [{ node_ip = \"192.0.2.11\", pod_cidr = \"10.244.1.0/24\" }]",
        &format!("node_slices = [{}]", slices.join(", ")),
    );
    let config = parse(&config)?;
    let desired = desired_state(&config.local, &config.spec, &HostFacts::default());
    let started = std::time::Instant::now();
    let changes = maps.apply(&desired, TEST_RUN_INTERFACES)?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        changes as u32 >= n,
        "only {changes} changes applied for {n} slices"
    );
    Ok(elapsed.as_secs_f64() * 1e3)
}
