//! Our wire format against implementations nobody here wrote: the kernel's
//! VXLAN device stands in for the gateway (it decapsulates what our node
//! programs encapsulate and encapsulates what they must decapsulate), and
//! tshark decodes the frames on the wire. Needs root.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use xtask::{
    daemon_binary,
    lab::{attach_pod, interface_mac, Lab},
    netns::{self, ipc},
    require_root,
    testbed::{Pod, FABRIC_PORT},
    traffic,
};

/// Node 192.0.2.11 with a pod 10.244.1.10; a "kernel" host 192.0.2.1 whose
/// VXLAN device (VNI 2) holds the peer pod address 10.100.17.11, which the
/// node sees through the remapped view 10.200.32.0/20.
fn build(lab: &mut Lab) -> (Pod, Pod) {
    let node = lab.add_ns("node").expect("ns");
    let pod = lab.add_ns("pod").expect("ns");
    let kernel = lab.add_ns("kern").expect("ns");
    netns::veth(&node, "eth0", &kernel, "eth0").expect("veth");
    ipc(&format!("-n {node} addr add 192.0.2.11/24 dev eth0")).expect("addr");
    ipc(&format!("-n {kernel} addr add 192.0.2.1/24 dev eth0")).expect("addr");
    netns::sysctl(&node, "net.ipv4.ip_forward", "1").expect("sysctl");
    attach_pod(&node, "pod1", &pod, Ipv4Addr::new(10, 244, 1, 10)).expect("pod");

    // No IPv6 chatter (router solicitations) from the VXLAN device: the
    // capture below should see only the test's own frames.
    for scope in ["all", "default"] {
        netns::sysctl(&kernel, &format!("net.ipv6.conf.{scope}.disable_ipv6"), "1")
            .expect("sysctl");
    }
    // The kernel VXLAN device answers to the MAC our node addresses the
    // gateway with (the inner frame keeps the outer MACs).
    let kernel_mac = interface_mac(&kernel, "eth0").expect("mac");
    let node_mac = interface_mac(&node, "eth0").expect("mac");
    for line in [
        format!("-n {kernel} link add vxlan0 type vxlan id 2 local 192.0.2.1 remote 192.0.2.11 dstport {FABRIC_PORT} dev eth0"),
        format!("-n {kernel} link set vxlan0 address {kernel_mac}"),
        format!("-n {kernel} link set vxlan0 up"),
        format!("-n {kernel} addr add 10.100.17.11/20 dev vxlan0"),
        format!("-n {kernel} route add 10.244.0.0/16 dev vxlan0"),
        format!("-n {kernel} neigh add 10.244.1.10 lladdr {node_mac} dev vxlan0 nud permanent"),
    ] {
        ipc(&line).expect("kernel VXLAN set-up");
    }

    let config = format!(
        "cluster_id = 1\npod_cidrs = [\"10.244.0.0/16\"]\nfabric_port = {FABRIC_PORT}\npin_dir = \"{}\"\n\
         [node]\nuplink = \"eth0\"\nunderlay_ip = \"192.0.2.11\"\ngateway_ip = \"192.0.2.1\"\n\
         [[peers]]\nid = 2\npod_cidr = \"10.100.16.0/20\"\nview_cidr = \"10.200.32.0/20\"\n",
        lab.pin_dir(&node).display()
    );
    if let Err(e) = lab.start_daemon(&daemon_binary(), &node, &config) {
        panic!("{e:#}");
    }
    let pod = Pod {
        netns: pod,
        ip: Ipv4Addr::new(10, 244, 1, 10),
        cluster: 0,
    };
    let peer = Pod {
        netns: kernel,
        ip: Ipv4Addr::new(10, 100, 17, 11),
        cluster: 1,
    };
    (pod, peer)
}

#[test]
fn kernel_vxlan_device_and_our_programs_understand_each_other() {
    if !require_root("kernel_vxlan_device_and_our_programs_understand_each_other") {
        return;
    }
    let mut lab = Lab::new("lt-vx").expect("lab");
    let (pod, peer) = build(&mut lab);
    let view: Ipv4Addr = "10.200.33.11".parse().expect("addr");

    // tshark on the kernel side decodes the first frames as VXLAN.
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            &peer.netns,
            "tshark",
            "-i",
            "eth0",
            "-c",
            "2",
            "-l",
            "-n",
        ])
        .args([
            "-f",
            &format!("udp port {FABRIC_PORT}"),
            "-d",
            &format!("udp.port=={FABRIC_PORT},vxlan"),
        ])
        .args([
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "vxlan.vni",
            "-e",
            "vxlan.flags",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "udp.dstport",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tshark");
    // Traffic starts only once dumpcap says it captures (its start-up time
    // varies a lot on a loaded machine; a fixed sleep once missed every
    // frame and the test then waited forever).
    let mut capture = capture;
    let stderr = capture.stderr.take().expect("tshark stderr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("Capturing on") {
                let _ = ready_tx.send(());
            }
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = capture.kill();
        panic!("tshark did not start capturing within 60 s");
    }

    // Our encapsulation -> kernel decapsulation; kernel encapsulation ->
    // our decapsulation, for ICMP, TCP and UDP.
    let ping = traffic::ping(&pod, view, 3).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    assert!(ping.contains("3 received"), "{ping}");
    let tcp =
        traffic::tcp_transfer(&pod, &peer, view, 7400, 4 << 20).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(tcp.server_saw, pod.ip, "the peer must see the real source");
    let udp =
        traffic::udp_exchange(&pod, &peer, view, 7401, 20).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        udp.reply_from, view,
        "replies must come back from the view address"
    );

    // Two frames have crossed by now; a capture still waiting is a failure,
    // not a hang.
    let started = std::time::Instant::now();
    while capture.try_wait().expect("tshark").is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = capture.kill();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = capture.wait_with_output().expect("tshark output");
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "tshark decoded too few frames: {text:?}");
    for line in &lines {
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(fields[0], "2", "VNI in {line}");
        assert!(
            fields[2].contains("192.0.2.") && fields[3].contains("192.0.2."),
            "outer addresses in {line}"
        );
        assert!(
            fields[2].contains("10.") && fields[3].contains("10."),
            "no inner IPv4 decoded in {line}"
        );
        assert_eq!(fields[4], FABRIC_PORT.to_string(), "UDP port in {line}");
    }
    // Our frame (node -> kernel) carries the peer's real address inside.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("192.0.2.11,10.244.1.10") && l.contains("192.0.2.1,10.100.17.11")),
        "{text}"
    );
}
