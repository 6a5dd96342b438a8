//! The hostile corpus through the live testbed. The 12,000 frames scapy
//! builds (`ligo-fabric/tests/corpus/hostile.py`, the same ones
//! `prog_test_run.rs` feeds BPF_PROG_TEST_RUN) are put on the wire of a
//! running fabric — into the node's uplink from the underlay (node ingress
//! at TC, then at XDP), out of it from the node, into the gateway from
//! nodes and from the peer gateway, into the gateway's WireGuard tunnel
//! device — and what comes out is captured where it goes. Each frame's
//! fate must be what the reference model in `ligo-fabric-common` says: its
//! drop counted under the right reason (the daemons' counters move by
//! exactly the model's numbers), passed on untouched, or translated — seen
//! at its destination, in order, with the rules' addresses and every
//! checksum that was valid still valid by scapy's reckoning. Needs root
//! (skipped with a message otherwise; under CI=true it must run).

use std::{collections::BTreeMap, fs, net::Ipv4Addr, path::Path, thread, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use ligo_fabric_common::{
    headers::outer,
    model::{corpus, Outcome},
    DropReason,
};
use xtask::{
    daemon_binary,
    netns::{self, ipc},
    require_root,
    testbed::{Scenario, Testbed, FABRIC_PORT},
    wire::PacketSocket,
    workspace_root,
};

/// Encapsulation: outer IPv4 + UDP + VXLAN + inner Ethernet.
const ENCAP_LEN: usize = 50;
/// Headers the programs may rewrite (L4 checksums, a SYN's MSS option, an
/// ICMP error's quoted header) lie within this many bytes after the IPv4
/// header; the bytes beyond must arrive unchanged.
const REWRITABLE: usize = 80;
/// Frames up to 3,000 bytes are in the corpus: the links they cross get
/// jumbo MTUs, so no frame is lost to an MTU check we did not ask for.
const JUMBO: &str = "9000";

fn ip(text: &str) -> [u8; 4] {
    text.parse::<Ipv4Addr>()
        .map(|a| a.octets())
        .unwrap_or_else(|_| panic!("bad address {text}"))
}

fn addr_at(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// The corpus, by kind (0 node ingress, 1 node egress, 2 gateway).
fn corpus(dir: &Path) -> Result<BTreeMap<u8, Vec<Vec<u8>>>> {
    let script = workspace_root().join("ligo-fabric/tests/corpus/hostile.py");
    let out = dir.join("corpus.bin");
    let status = std::process::Command::new("python3")
        .arg(&script)
        .args(["generate", &out.to_string_lossy(), "3000"])
        .status()
        .context("python3 with scapy (installed by xtask/bootstrap.sh)")?;
    ensure!(status.success(), "corpus generation failed");
    let data = fs::read(&out)?;
    let mut kinds: BTreeMap<u8, Vec<Vec<u8>>> = BTreeMap::new();
    let mut at = 0;
    while at + 3 <= data.len() {
        let len = usize::from(u16::from_be_bytes([data[at + 1], data[at + 2]]));
        kinds
            .entry(data[at])
            .or_default()
            .push(data[at + 3..at + 3 + len].to_vec());
        at += 3 + len;
    }
    Ok(kinds)
}

/// The drop counters of the daemon in `ns`, by reason.
fn drops(bed: &Testbed, ns: &str) -> Result<BTreeMap<String, u64>> {
    let json = bed.lab.inspect(&daemon_binary(), ns)?;
    let list = json["drops"].as_array().context("no drops in inspect")?;
    Ok(list
        .iter()
        .filter_map(|d| Some((d["reason"].as_str()?.to_string(), d["packets"].as_u64()?)))
        .collect())
}

/// Drops the model predicts, by reason name.
fn predicted(outcomes: &[Outcome]) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), 0))
        .collect();
    for o in outcomes {
        if let Outcome::Drop(reason) = o {
            *out.entry(reason.name().to_string()).or_default() += 1;
        }
    }
    out
}

fn assert_drops(
    what: &str,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    want: &BTreeMap<String, u64>,
) {
    let got: BTreeMap<String, u64> = want
        .keys()
        .map(|k| {
            let delta = after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
            (k.clone(), delta)
        })
        .collect();
    assert_eq!(&got, want, "{what}: drops counted (left) vs the model");
}

/// Calls `send` for each of `items` from this thread, pinned to one CPU so
/// that every frame takes the same per-CPU backlog and arrives in order,
/// pausing now and then so the softirq drains the backlog (1,000 deep).
fn in_order<T, R>(items: &[T], mut send: impl FnMut(&T) -> Result<R>) -> Result<Vec<R>> {
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        results.push(send(item)?);
        if i % 64 == 63 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(results)
}

/// Sends `frames` on their sockets in order; per frame, whether the
/// sending interface's egress took it.
fn inject(frames: &[(&PacketSocket, &[u8])]) -> Result<Vec<bool>> {
    in_order(frames, |(socket, frame)| socket.send(frame))
}

/// The fabric frames from `source` a socket received (other traffic on
/// the link is the hosts' own).
fn fabric_frames(socket: &PacketSocket, source: [u8; 4], idle: Duration) -> Result<Vec<Vec<u8>>> {
    Ok(socket
        .received_until_idle(idle)?
        .into_iter()
        .filter(|f| is_fabric_udp_from(f, source))
        .collect())
}

/// Injection where no program of ours runs on the way out: all taken.
fn inject_all(frames: &[(&PacketSocket, &[u8])]) -> Result<()> {
    let taken = inject(frames)?;
    ensure!(
        taken.iter().all(|t| *t),
        "a frame was refused on the way in"
    );
    Ok(())
}

/// Frames the model expects to come out somewhere, in injection order.
struct Expected<'a> {
    frame: &'a [u8],
    /// May legitimately go elsewhere (to the stack, into a pod).
    optional: bool,
}

/// Frames of the host's own stack tolerated in a capture. Measured: 0 in
/// every run; not 0 because the node may refresh its gateway's ARP entry
/// (an ARP request and reply) at any moment of the half-minute run.
const HOST_NOISE_LIMIT: usize = 4;

/// What matching found.
#[derive(Default)]
struct Matched {
    seen: usize,
    went_elsewhere: usize,
    noise: usize,
    /// (index in expected, index in captured) of every match.
    pairs: Vec<(usize, usize)>,
}

impl std::fmt::Debug for Matched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seen {}, went elsewhere {}, host noise {}",
            self.seen, self.went_elsewhere, self.noise
        )
    }
}

/// Matches `captured` against `expected` in order. A captured frame that
/// fits no pending expectation fails the test unless `is_noise` says it is
/// the host's own traffic (at most `HOST_NOISE_LIMIT` such); an expectation
/// not met is a failure unless optional.
fn match_in_order(
    what: &str,
    expected: &[Expected<'_>],
    captured: &[Vec<u8>],
    fits: impl Fn(&[u8], &[u8]) -> Result<()>,
    is_noise: impl Fn(&[u8]) -> bool,
) -> Result<Matched> {
    let mut m = Matched::default();
    let mut next = 0;
    for (c, out) in captured.iter().enumerate() {
        let mut k = next;
        let mut found = None;
        let mut last_error = None;
        while k < expected.len() {
            match fits(expected[k].frame, out) {
                Ok(()) => {
                    found = Some(k);
                    break;
                }
                Err(e) if expected[k].optional => {
                    last_error.get_or_insert(e);
                    k += 1;
                }
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            }
        }
        match found {
            Some(k) => {
                m.went_elsewhere += k - next;
                m.seen += 1;
                m.pairs.push((k, c));
                next = k + 1;
            }
            None => {
                m.noise += 1;
                if !is_noise(out) || m.noise > HOST_NOISE_LIMIT {
                    bail!(
                        "{what}: a frame fits no expected outcome (the next one: {:?})\ncaptured {out:02x?}\nexpected {:02x?}",
                        last_error,
                        expected.get(next).map(|e| e.frame)
                    );
                }
            }
        }
    }
    for e in &expected[next..] {
        ensure!(
            e.optional,
            "{what}: a frame the model translates or passes never arrived: {:02x?}",
            e.frame
        );
        m.went_elsewhere += 1;
    }
    Ok(m)
}

/// Appends an (input, output) IPv4 pair for scapy's checksum check.
fn record(pairs: &mut Vec<u8>, before: &[u8], after: &[u8]) {
    for part in [before, after] {
        pairs.extend_from_slice(&(part.len() as u32).to_be_bytes());
        pairs.extend_from_slice(part);
    }
}

/// The bytes of a translated IPv4 packet that no rule may touch: the
/// header but TTL, checksum and addresses; everything past the rewritable
/// region.
fn untouched_parts_equal(before: &[u8], after: &[u8]) -> Result<()> {
    ensure!(
        before.len() == after.len(),
        "length {} -> {}",
        before.len(),
        after.len()
    );
    ensure!(before[..8] == after[..8], "IPv4 header fields changed");
    ensure!(before[9] == after[9], "protocol changed");
    let ihl = (usize::from(before[0] & 0x0f) * 4).min(before.len());
    let keep = (ihl + REWRITABLE).min(before.len());
    ensure!(before[keep..] == after[keep..], "payload changed");
    if ihl > 20 {
        ensure!(before[20..ihl] == after[20..ihl], "IP options changed");
    }
    Ok(())
}

fn is_fabric_udp_from(frame: &[u8], source: [u8; 4]) -> bool {
    frame.len() >= outer::VXLAN
        && frame[12..14] == [0x08, 0x00]
        && frame[outer::IP + 9] == 17
        && addr_at(frame, outer::IP + 12) == source
        && u16::from_be_bytes([frame[outer::UDP + 2], frame[outer::UDP + 3]]) == FABRIC_PORT
}

fn set_mtu(ns: &str, dev: &str) -> Result<()> {
    ipc(&format!("-n {ns} link set {dev} mtu {JUMBO}")).map(drop)
}

#[test]
fn hostile_corpus_through_the_live_testbed_matches_the_model() {
    if !require_root("hostile_corpus_through_the_live_testbed_matches_the_model") {
        return;
    }
    let mut bed = Testbed::up("lt-livecorp", Scenario::different_cidrs()).expect("testbed");
    // Plain between the gateways: the gateway program's own path (the
    // WireGuard side has its own hostile-datagram test).
    bed.transport = "plain";
    if let Err(e) = run(&mut bed) {
        panic!("{e:#}\n{}", bed.lab.logs());
    }
}

fn run(bed: &mut Testbed) -> Result<()> {
    let dir = bed.lab.file("corpus");
    fs::create_dir_all(&dir)?;
    let kinds = corpus(&dir)?;
    let (plan_a, plan_b) = (bed.scenario.a.clone(), bed.scenario.b.clone());
    let (a_gw, a_n1, a_ul) = (
        bed.ns(&plan_a, "gw"),
        bed.ns(&plan_a, "n1"),
        bed.ns(&plan_a, "ul"),
    );
    let b_gw = bed.ns(&plan_b, "gw");
    for (ns, dev) in [
        (&a_ul, "n1"),
        (&a_n1, "eth0"),
        (&a_ul, "gw"),
        (&a_gw, "eth0"),
        (&a_gw, "eth1"),
        (&b_gw, "eth1"),
    ] {
        set_mtu(ns, dev)?;
    }
    // No IPv6 chatter from the hosts whose frames we capture.
    for ns in [&a_n1, &a_gw] {
        netns::sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
    }
    // Where node_ingress hands translated packets: a "pod" link with a
    // route for the whole pod CIDR through a next hop with a permanent
    // neighbour, so the fib lookup succeeds for any address in it.
    let cap = bed.lab.add_ns("capture")?;
    netns::sysctl(&cap, "net.ipv6.conf.all.disable_ipv6", "1")?;
    netns::veth(&a_n1, "cap0", &cap, "eth0")?;
    set_mtu(&a_n1, "cap0")?;
    set_mtu(&cap, "eth0")?;
    let cap_mac = xtask::lab::interface_mac(&cap, "eth0")?;
    ipc(&format!(
        "-n {a_n1} route add 169.254.2.1 dev cap0 scope link"
    ))?;
    ipc(&format!(
        "-n {a_n1} neigh add 169.254.2.1 lladdr {cap_mac} dev cap0 nud permanent"
    ))?;
    ipc(&format!(
        "-n {a_n1} route add 10.244.0.0/16 via 169.254.2.1 dev cap0"
    ))?;

    let (node, gateway, real_to_view) = (corpus::NODE, corpus::GATEWAY, corpus::REAL_TO_VIEW);
    let views = node.views;
    let slices = gateway.slices;
    let mut pairs = Vec::new();
    let mut report = Vec::new();

    // 1. The gateway, before any node program runs (so nothing the gateway
    //    sends to a node comes back through one).
    let daemon = daemon_binary();
    bed.lab
        .start_daemon(&daemon, &a_gw, &bed.daemon_config(&plan_a, "gw"))?;
    for target in ["192.0.2.11", "192.0.2.12", "203.0.113.2"] {
        netns::exec(&a_gw, "ping", &["-c", "1", "-W", "2", target])
            .with_context(|| format!("resolving {target} from the gateway"))?;
    }
    let underlay_port = PacketSocket::open(&a_ul, "gw")?;
    let peer_port = PacketSocket::open(&b_gw, "eth1")?;
    let frames = &kinds[&2];
    let outcomes: Vec<Outcome> = frames.iter().map(|f| gateway.ingress(f)).collect();
    let from_peer =
        |f: &[u8]| f.len() >= outer::UDP && addr_at(f, outer::IP + 16) == ip("203.0.113.1");
    let before = drops(bed, &a_gw)?;
    inject_all(
        &frames
            .iter()
            .map(|f| {
                let port = if from_peer(f) {
                    &peer_port
                } else {
                    &underlay_port
                };
                (port, f.as_slice())
            })
            .collect::<Vec<_>>(),
    )?;
    let to_nodes = fabric_frames(&underlay_port, ip("192.0.2.1"), Duration::from_millis(500))?;
    let to_peer = fabric_frames(&peer_port, ip("203.0.113.1"), Duration::from_millis(100))?;
    assert_drops(
        "gateway",
        &before,
        &drops(bed, &a_gw)?,
        &predicted(&outcomes),
    );
    let translated = |peer_side: bool| -> Vec<Expected<'_>> {
        frames
            .iter()
            .zip(&outcomes)
            .filter(|(f, o)| **o == Outcome::Translate && from_peer(f) == peer_side)
            .map(|(f, _)| Expected {
                frame: f,
                optional: false,
            })
            .collect()
    };
    let gateway_fits = |frame: &[u8], out: &[u8]| -> Result<()> {
        ensure!(out.len() == frame.len(), "length");
        ensure!(
            out[outer::VXLAN + 8..] == frame[outer::VXLAN + 8..],
            "inner frame changed"
        );
        let (src, dst) = if from_peer(frame) {
            let inner_dst = addr_at(frame, outer::INNER_IP + 16);
            (
                ip("192.0.2.1"),
                gateway.node_for(inner_dst).context("no slice")?,
            )
        } else {
            (ip("203.0.113.1"), ip("203.0.113.2"))
        };
        ensure!(
            (addr_at(out, outer::IP + 12), addr_at(out, outer::IP + 16)) == (src, dst),
            "outer addresses"
        );
        Ok(())
    };
    for (what, expected, captured) in [
        ("gateway → nodes", translated(true), &to_nodes),
        ("gateway → peer", translated(false), &to_peer),
    ] {
        let m = match_in_order(what, &expected, captured, gateway_fits, |_| false)?;
        for (e, c) in &m.pairs {
            record(
                &mut pairs,
                &expected[*e].frame[outer::IP..],
                &captured[*c][outer::IP..],
            );
        }
        report.push(format!("{what}: {} expected, {m:?}", expected.len()));
    }

    // 2. Node egress: frames leave the node's uplink through node_egress.
    bed.lab
        .start_daemon(&daemon, &a_n1, &bed.daemon_config(&plan_a, "n1"))?;
    let uplink = PacketSocket::open(&a_n1, "eth0")?;
    let underlay_of_node = PacketSocket::open(&a_ul, "n1")?;
    let frames = &kinds[&1];
    let outcomes: Vec<Outcome> = frames.iter().map(|f| node.egress(f)).collect();
    let before = drops(bed, &a_n1)?;
    let taken = inject(
        &frames
            .iter()
            .map(|f| (&uplink, f.as_slice()))
            .collect::<Vec<_>>(),
    )?;
    for ((frame, outcome), taken) in frames.iter().zip(&outcomes).zip(&taken) {
        ensure!(
            *taken != matches!(outcome, Outcome::Drop(_)),
            "node_egress {} a frame the model says {outcome:?}: {frame:02x?}",
            if *taken { "let through" } else { "dropped" }
        );
    }
    let left = underlay_of_node.received_until_idle(Duration::from_millis(500))?;
    assert_drops(
        "node egress",
        &before,
        &drops(bed, &a_n1)?,
        &predicted(&outcomes),
    );
    let expected: Vec<Expected<'_>> = frames
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| !matches!(o, Outcome::Drop(_)))
        .map(|(f, _)| Expected {
            frame: f,
            optional: false,
        })
        .collect();
    let egress_fits = |frame: &[u8], out: &[u8]| -> Result<()> {
        if node.egress(frame) == Outcome::Pass {
            ensure!(out == frame, "a passed frame changed");
            return Ok(());
        }
        ensure!(out.len() == frame.len() + ENCAP_LEN, "length");
        ensure!(
            is_fabric_udp_from(out, ip("192.0.2.11")),
            "not a fabric frame from the node"
        );
        ensure!(addr_at(out, outer::IP + 16) == ip("192.0.2.1"), "outer dst");
        ensure!(out[outer::VXLAN + 4..outer::VXLAN + 7] == [0, 0, 2], "VNI");
        let (before, after) = (&frame[14..], &out[14 + ENCAP_LEN..]);
        // An ICMP error a node made about a packet from the peer (its
        // quoted source in the view) leaves from the quoted destination;
        // every other packet keeps its source. Exactly one is right.
        let ihl = usize::from(before[0] & 0x0f) * 4;
        let first_fragment = u16::from_be_bytes([before[6], before[7]]) & 0x1fff == 0;
        let q = ihl + 8;
        let node_made_error = before[9] == 1
            && ihl == 20
            && first_fragment
            && before.len() >= q + 20
            && [3, 11, 12].contains(&before[ihl])
            && before[q] == 0x45
            && views[0].matches(addr_at(before, q + 12));
        let expected_src = if node_made_error {
            addr_at(before, q + 16)
        } else {
            addr_at(before, 12)
        };
        ensure!(
            addr_at(after, 12) == expected_src,
            "source {:?}, expected {expected_src:?} (node-made ICMP error: {node_made_error})",
            addr_at(after, 12)
        );
        ensure!(
            after[16..20] == views[0].apply(addr_at(before, 16)),
            "destination not rewritten view → real"
        );
        ensure!(after[8] == before[8], "TTL changed");
        untouched_parts_equal(before, after)
    };
    // The node's own stack may speak (ARP), never in fabric frames.
    let m = match_in_order("node egress", &expected, &left, egress_fits, |f| {
        !is_fabric_udp_from(f, ip("192.0.2.11")) && !frames.iter().any(|x| x == f)
    })?;
    for (e, c) in &m.pairs {
        let frame = expected[*e].frame;
        if node.egress(frame) == Outcome::Translate {
            record(&mut pairs, &frame[14..], &left[*c][14 + ENCAP_LEN..]);
        }
    }
    report.push(format!("node egress: {} expected, {m:?}", expected.len()));

    // 3. Node ingress, at TC and then at XDP: frames arrive at the node's
    //    uplink from the underlay; translated packets for the pod CIDR reach
    //    the capture "pod" (TTL 1, the second node's slice and real pods go
    //    elsewhere, as forwarding would send them). TC hands them over
    //    itself; XDP passes them to the stack, which forwards them, so the
    //    frames the model translates are addressed to the node's MAC, as
    //    the gateway addresses them, and packets the stack refuses (a bad
    //    IPv4 header inside) may go missing there.
    let pod_link = PacketSocket::open(&cap, "eth0")?;
    let pod_mac = parse_mac(&cap_mac)?;
    let node_mac = parse_mac(&xtask::lab::interface_mac(&a_n1, "eth0")?)?;
    for hook in ["tc", "xdp"] {
        if hook == "xdp" {
            bed.lab.stop_daemon(&a_n1)?;
            bed.node_ingress = "xdp";
            bed.lab
                .start_daemon(&daemon, &a_n1, &bed.daemon_config(&plan_a, "n1"))?;
        }
        // The daemon lists the new veth as a pod interface within a second.
        thread::sleep(Duration::from_millis(1500));
        let frames: Vec<Vec<u8>> = kinds[&0]
            .iter()
            .map(|f| {
                let mut f = f.clone();
                if hook == "xdp" && node.ingress(&f) == Outcome::Translate {
                    f[..6].copy_from_slice(&node_mac);
                }
                f
            })
            .collect();
        let outcomes: Vec<Outcome> = frames.iter().map(|f| node.ingress(f)).collect();
        let before = drops(bed, &a_n1)?;
        inject_all(
            &frames
                .iter()
                .map(|f| (&underlay_of_node, f.as_slice()))
                .collect::<Vec<_>>(),
        )?;
        let delivered = pod_link.received_until_idle(Duration::from_millis(500))?;
        let what = format!("node ingress ({hook})");
        assert_drops(&what, &before, &drops(bed, &a_n1)?, &predicted(&outcomes));
        let pods = [ip("10.244.1.10"), ip("10.244.1.11")];
        let expected: Vec<Expected<'_>> = frames
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == Outcome::Translate)
            .map(|(f, _)| {
                let inner = &f[outer::INNER_IP..];
                let dst = addr_at(inner, 16);
                let elsewhere = inner[8] <= 1 || slices[1].0.matches(dst) || pods.contains(&dst);
                Expected {
                    frame: f,
                    optional: elsewhere || (hook == "xdp" && !stack_accepts(inner)),
                }
            })
            .collect();
        let ingress_fits = |frame: &[u8], out: &[u8]| -> Result<()> {
            let mut before = &frame[outer::INNER_IP..];
            if hook == "xdp" {
                // The stack trims the Ethernet padding to the IPv4 length.
                let total = usize::from(u16::from_be_bytes([before[2], before[3]]));
                before = &before[..total.min(before.len())];
            }
            let after = &out[14..];
            ensure!(out[..6] == pod_mac, "not addressed to the pod");
            ensure!(
                after.len() >= 20 && after[12..16] == real_to_view.apply(addr_at(before, 12)),
                "source not rewritten real → view"
            );
            ensure!(after[16..20] == before[16..20], "destination changed");
            ensure!(after[8] + 1 == before[8], "TTL not decremented once");
            untouched_parts_equal(before, after)
        };
        let m = match_in_order(&what, &expected, &delivered, ingress_fits, |_| false)?;
        // Exactly the frames forwarding sends to this pod link arrive: the
        // optional ones go elsewhere (TTL 1, the other node's slice, real
        // pods, or packets the IPv4 stack refuses at XDP), never here.
        let required = expected.iter().filter(|e| !e.optional).count();
        ensure!(
            m.seen == required,
            "{what}: {required} translated packets must reach the pod link, {m:?}"
        );
        for (e, c) in &m.pairs {
            record(
                &mut pairs,
                &expected[*e].frame[outer::INNER_IP..],
                &delivered[*c][14..],
            );
        }
        report.push(format!("{what}: {} translated, {m:?}", expected.len()));
    }

    // 4. The gateway's tunnel device: what the WireGuard tunnel writes there
    //    (decrypted packets, the peer id in the source MAC) is wrapped in
    //    VXLAN toward the owning node by gateway_tunnel. The daemon makes
    //    the device once a peer uses WireGuard; frames go in through a
    //    queue of our own, as the tunnel's workers write them.
    bed.transport = "wireguard";
    bed.write_keys()?;
    bed.lab.stop_daemon(&a_gw)?;
    bed.lab
        .start_daemon(&daemon, &a_gw, &bed.daemon_config(&plan_a, "gw"))?;
    let queue = netns::join(netns::within(&a_gw, || {
        ligo_fabric::tunnel::device::open_queue()
    }))?;
    let frames = &kinds[&3];
    let outcomes: Vec<Outcome> = frames.iter().map(|f| gateway.tunnel_device(f)).collect();
    let before = drops(bed, &a_gw)?;
    write_to_tunnel_device(&queue, frames)?;
    let to_nodes = fabric_frames(&underlay_port, ip("192.0.2.1"), Duration::from_millis(500))?;
    assert_drops(
        "tunnel device",
        &before,
        &drops(bed, &a_gw)?,
        &predicted(&outcomes),
    );
    let expected: Vec<Expected<'_>> = frames
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == Outcome::Translate)
        .map(|(f, _)| Expected {
            frame: f,
            optional: false,
        })
        .collect();
    let tunnel_fits = |frame: &[u8], out: &[u8]| -> Result<()> {
        ensure!(out.len() == frame.len() + ENCAP_LEN, "length");
        ensure!(out[14 + ENCAP_LEN..] == frame[14..], "inner packet changed");
        let node_ip = gateway
            .node_for(addr_at(frame, 14 + 16))
            .context("no slice")?;
        ensure!(
            (addr_at(out, outer::IP + 12), addr_at(out, outer::IP + 16))
                == (ip("192.0.2.1"), node_ip),
            "outer addresses"
        );
        ensure!(out[outer::VXLAN + 4..outer::VXLAN + 7] == [0, 0, 2], "VNI");
        ensure!(
            internet_checksum(&out[outer::IP..outer::UDP]) == 0,
            "outer IPv4 checksum"
        );
        Ok(())
    };
    let m = match_in_order("tunnel device", &expected, &to_nodes, tunnel_fits, |_| {
        false
    })?;
    report.push(format!("tunnel device: {} expected, {m:?}", expected.len()));

    // Every checksum that was valid before is valid after, by scapy.
    let pairs_path = dir.join("pairs.bin");
    fs::write(&pairs_path, &pairs)?;
    let script = workspace_root().join("ligo-fabric/tests/corpus/hostile.py");
    let verified = std::process::Command::new("python3")
        .arg(&script)
        .args(["verify", &pairs_path.to_string_lossy()])
        .output()?;
    let scapy = String::from_utf8_lossy(&verified.stdout);
    eprintln!("live corpus: {}\nscapy: {scapy}", report.join("\n  "));
    ensure!(
        verified.status.success(),
        "scapy found bad checksums: {scapy}"
    );
    Ok(())
}

/// Whether the IPv4 stack takes `packet` in (ip_rcv's checks): version 4,
/// a sane header length and total length, a valid header checksum.
fn stack_accepts(packet: &[u8]) -> bool {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    packet[0] >> 4 == 4
        && ihl >= 20
        && packet.len() >= ihl
        && total >= ihl
        && total <= packet.len()
        && internet_checksum(&packet[..ihl]) == 0
}

/// RFC 1071 sum of `bytes`, folded and complemented (0 over a header whose
/// checksum is right).
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes `frames` to a queue of the tunnel device, each after a
/// virtio-net header that asks for nothing (no offload), from one CPU.
fn write_to_tunnel_device(queue: &fs::File, frames: &[Vec<u8>]) -> Result<()> {
    use std::io::Write;
    let mut queue = queue;
    in_order(frames, |frame| {
        let mut record = vec![0u8; 10];
        record.extend_from_slice(frame);
        queue
            .write_all(&record)
            .with_context(|| format!("writing a {}-byte frame to the tunnel device", frame.len()))
    })
    .map(drop)
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {text}");
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text}"))?;
    }
    Ok(mac)
}
