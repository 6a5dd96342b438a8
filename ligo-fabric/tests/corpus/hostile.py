"""Hostile frames for the node programs, built with scapy (a packet library
nobody on this project wrote), and the checksum verifier for what the
programs make of them.

  hostile.py generate OUT COUNT   writes COUNT node-ingress, node-egress,
                                  gateway and tunnel-device frames each
  hostile.py verify PAIRS         checks every (input, output) IPv4 pair

Frame file: records of [u8 kind (0 node ingress, 1 node egress, 2 gateway,
3 gateway tunnel device)]
[u16 length][frame].
Pair file: records of [u32 length][input IPv4][u32 length][output IPv4].
The node under test: underlay 192.0.2.11, gateway 192.0.2.1, fabric port
4799; peer 2's pod CIDR 10.100.16.0/20, seen as 10.200.32.0/20; our pods in
10.244.0.0/16.
"""

import random
import struct
import sys

from scapy.all import ARP, Dot1Q, Ether, ICMP, IP, IPOption, IPv6, Raw, TCP, UDP, conf
from scapy.layers.inet import in4_chksum
from scapy.layers.vxlan import VXLAN
from scapy.utils import checksum

conf.verb = 0
NODE_MAC, GW_MAC = "02:00:00:00:00:11", "02:00:00:00:00:01"
rnd = random.Random(20261128)


def addr(choices):
    return rnd.choice(choices)()


PEER_REAL = lambda: f"10.100.{rnd.randint(16, 31)}.{rnd.randint(1, 254)}"
PEER_VIEW = lambda: f"10.200.{rnd.randint(32, 47)}.{rnd.randint(1, 254)}"
OURS = lambda: f"10.244.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}"
ANY = lambda: ".".join(str(rnd.randint(0, 255)) for _ in range(4))


def payload():
    return bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 1, 7, 64, 512, 1400, 2400])))


def l4(src, dst):
    """An L4 layer (or an ICMP error quoting a packet src -> dst)."""
    kind = rnd.choice(["tcp", "tcp_syn", "udp", "udp0", "icmp", "icmp_err", "other"])
    if kind == "tcp":
        return TCP(sport=rnd.randint(1, 65535), dport=80, flags="PA") / Raw(payload())
    if kind == "tcp_syn":
        mss = rnd.choice([536, 1400, 1460, 8960])
        opts = [("MSS", mss), ("SAckOK", b""), ("Timestamp", (1, 0))]
        if rnd.random() < 0.3:
            opts = opts[1:] + opts[:1]
        return TCP(sport=rnd.randint(1, 65535), dport=80, flags="S", options=opts)
    if kind == "udp":
        return UDP(sport=rnd.randint(1, 65535), dport=53) / Raw(payload())
    if kind == "udp0":
        return UDP(sport=5, dport=6, chksum=0) / Raw(payload())
    if kind == "icmp":
        return ICMP(type=8) / Raw(payload())
    if kind == "icmp_err":
        quoted = IP(src=dst, dst=src, ttl=1) / UDP(sport=33434, dport=40000) / Raw(b"q" * 8)
        return ICMP(type=rnd.choice([3, 11, 12]), code=rnd.choice([0, 3, 4])) / bytes(quoted)[:28]
    return Raw(payload())


def inner_ip(src, dst):
    ip = IP(src=src, dst=dst, ttl=rnd.choice([1, 2, 64]))
    r = rnd.random()
    if r < 0.1:
        ip.options = [IPOption(b"\x01" * 4 * rnd.randint(1, 10))]
    elif r < 0.2:
        ip.flags = "MF"
        ip.frag = rnd.choice([0, 0, 100])
    elif r < 0.25:
        ip.frag = rnd.randint(1, 1000)
    pkt = ip / l4(src, dst)
    if rnd.random() < 0.1:
        pkt.proto = rnd.choice([6, 17, 47, 50])
    return pkt


def mutate(raw, boundaries):
    """Truncation at header boundaries and around them, bad IHL, bad total
    length, a flipped byte; or nothing."""
    b = bytearray(raw)
    r = rnd.random()
    if r < 0.25:
        cut = rnd.choice(boundaries) + rnd.choice([-1, 0, 1, 2])
        return bytes(b[: max(0, min(len(b), cut))])
    if r < 0.32:
        at = rnd.choice(boundaries[1:3])
        if at < len(b):
            b[at] = (b[at] & 0xF0) | rnd.randint(0, 15)
    elif r < 0.39:
        at = rnd.choice(boundaries[1:3]) + 2
        if at + 1 < len(b):
            b[at : at + 2] = struct.pack("!H", rnd.choice([0, 19, 20, 60000, len(b)]))
    elif r < 0.45 and len(b) > 1:
        b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    return bytes(b)


def ingress_frame():
    outer_src = "192.0.2.1" if rnd.random() < 0.9 else ANY()
    dport = 4799 if rnd.random() < 0.9 else rnd.choice([4789, 8472, 53])
    vni = 2 if rnd.random() < 0.85 else rnd.choice([0, 1, 3, 0xFFFFFF])
    flags = 0x08 if rnd.random() < 0.92 else rnd.choice([0, 0x0C, 0x80])
    src = addr([PEER_REAL] * 8 + [OURS, ANY])
    dst = OURS()
    r = rnd.random()
    if r < 0.05:
        inner = Ether(src=GW_MAC, dst=NODE_MAC) / IPv6(src="fd00::1", dst="fd00::2") / UDP() / Raw(payload())
    elif r < 0.08:
        inner = Ether(src=GW_MAC, dst=NODE_MAC) / ARP()
    elif r < 0.1:
        inner = Ether(src=GW_MAC, dst=NODE_MAC) / Dot1Q(vlan=7) / inner_ip(src, dst)
    else:
        inner = Ether(src=GW_MAC, dst=NODE_MAC) / inner_ip(src, dst)
    outer = Ether(src=GW_MAC, dst=NODE_MAC)
    if rnd.random() < 0.03:
        outer = outer / Dot1Q(vlan=5)
    frame = (
        outer
        / IP(src=outer_src, dst="192.0.2.11", flags="DF")
        / UDP(sport=rnd.randint(49152, 65535), dport=dport, chksum=0)
        / VXLAN(flags=flags, vni=vni)
        / inner
    )
    raw = bytes(frame)
    if rnd.random() < 0.03:
        raw = bytes(Ether(src=GW_MAC, dst=NODE_MAC) / IPv6() / UDP(dport=4799) / Raw(payload()))
    return mutate(raw, [14, 34, 42, 50, 64, 84, 88, 104])[:3000]


def egress_frame():
    dst = addr([PEER_VIEW] * 6 + [PEER_REAL, OURS, ANY])
    src = OURS()
    r = rnd.random()
    if r < 0.04:
        raw = bytes(Ether(src=NODE_MAC, dst=GW_MAC) / IPv6(src="fd00::1", dst="fd00::2") / UDP())
    elif r < 0.07:
        raw = bytes(Ether(src=NODE_MAC, dst=GW_MAC) / ARP())
    elif r < 0.1:
        raw = bytes(Ether(src=NODE_MAC, dst=GW_MAC) / Dot1Q(vlan=9) / inner_ip(src, dst))
    else:
        raw = bytes(Ether(src=NODE_MAC, dst=GW_MAC) / inner_ip(src, dst))
    return mutate(raw, [14, 14, 34, 38, 42, 54, 62])[:3000]


def gateway_frame():
    """A frame at a gateway (underlay 192.0.2.1, public 203.0.113.1; peer 2
    at 203.0.113.2; node slices 10.244.1.0/24 and 10.244.2.0/24): from a
    node toward a peer, or from a peer gateway toward a node."""
    if rnd.random() < 0.5:
        src, dst = rnd.choice(["192.0.2.11", "192.0.2.12", "192.0.2.99"]), "192.0.2.1"
        vni = 2 if rnd.random() < 0.85 else rnd.choice([0, 1, 3])
        inner = inner_ip(OURS(), PEER_REAL())
    else:
        src = "203.0.113.2" if rnd.random() < 0.85 else rnd.choice(["203.0.113.9", ANY()])
        dst = "203.0.113.1"
        vni = 2 if rnd.random() < 0.85 else rnd.choice([0, 1, 3])
        inner_dst = f"10.244.{rnd.choice([1, 2, 3])}.{rnd.randint(1, 254)}"
        inner = inner_ip(PEER_REAL(), inner_dst)
    if rnd.random() < 0.05:
        dst = rnd.choice(["192.0.2.7", ANY()])
    dport = 4799 if rnd.random() < 0.9 else rnd.choice([4789, 51820])
    flags = 0x08 if rnd.random() < 0.93 else rnd.choice([0, 0x0C])
    inner_eth = Ether(src=GW_MAC, dst=NODE_MAC)
    if rnd.random() < 0.05:
        inner_frame = inner_eth / IPv6() / UDP()
    else:
        inner_frame = inner_eth / inner
    frame = (
        Ether(src=NODE_MAC, dst=GW_MAC)
        / IP(src=src, dst=dst, flags="DF")
        / UDP(sport=rnd.randint(49152, 65535), dport=dport, chksum=0)
        / VXLAN(flags=flags, vni=vni)
        / inner_frame
    )
    return mutate(bytes(frame), [14, 34, 42, 50, 64, 84, 88])[:3000]


def tunnel_device_frame():
    """A frame the WireGuard tunnel writes to the gateway's tunnel device:
    the peer id in the source MAC (02:4c:47 + 24-bit id)."""
    peer = 2 if rnd.random() < 0.85 else rnd.choice([0, 3, 0xFFFFFF])
    src_mac = "02:4c:47:%02x:%02x:%02x" % (peer >> 16, (peer >> 8) & 255, peer & 255)
    if rnd.random() < 0.05:
        src_mac = "02:00:00:00:00:02"
    dst = f"10.244.{rnd.choice([1, 2, 3])}.{rnd.randint(1, 254)}"
    r = rnd.random()
    if r < 0.05:
        frame = Ether(src=src_mac, dst=GW_MAC) / IPv6() / UDP()
    else:
        frame = Ether(src=src_mac, dst=GW_MAC) / inner_ip(PEER_REAL(), dst)
    return mutate(bytes(frame), [14, 14, 30, 34, 42, 54])[:3000]


def generate(out, count):
    with open(out, "wb") as f:
        makers = ((0, ingress_frame), (1, egress_frame), (2, gateway_frame), (3, tunnel_device_frame))
        for direction, make in makers:
            for _ in range(count):
                frame = make()
                # A truncated frame reaches a program padded to the Ethernet
                # minimum, as on the wire (the IP length tells the truth).
                if len(frame) < 60:
                    frame = frame + bytes(60 - len(frame))
                f.write(struct.pack("!BH", direction, len(frame)) + frame)


def checks(pkt):
    """Which checksums of an IPv4 packet scapy finds valid."""
    ok = {}
    if len(pkt) < 20:
        return ok
    ihl = (pkt[0] & 15) * 4
    if ihl < 20 or len(pkt) < ihl:
        return ok
    ok["ip"] = checksum(pkt[:ihl]) == 0
    total = struct.unpack("!H", pkt[2:4])[0]
    if total < ihl or total > len(pkt) or struct.unpack("!H", pkt[6:8])[0] & 0x3FFF:
        return ok
    l4, proto = pkt[ihl:total], pkt[9]
    header = IP(pkt[:ihl])
    if proto == 6 and len(l4) >= 20:
        ok["tcp"] = in4_chksum(6, header, l4) == 0
    elif proto == 17 and len(l4) >= 8 and l4[6:8] != b"\0\0":
        ok["udp"] = in4_chksum(17, header, l4) == 0
    elif proto == 1 and len(l4) >= 8:
        ok["icmp"] = checksum(l4) == 0
        if l4[0] in (3, 11, 12) and len(l4) >= 28 and l4[8] == 0x45:
            ok["quoted_ip"] = checksum(l4[8:28]) == 0
    return ok


def verify(path):
    data = open(path, "rb").read()
    at, pairs, verified, failures = 0, 0, {}, []
    while at < len(data):
        (n,) = struct.unpack("!I", data[at : at + 4])
        before = data[at + 4 : at + 4 + n]
        at += 4 + n
        (m,) = struct.unpack("!I", data[at : at + 4])
        after = data[at + 4 : at + 4 + m]
        at += 4 + m
        valid_before, valid_after = checks(before), checks(after)
        for kind, good in valid_before.items():
            if good:
                verified[kind] = verified.get(kind, 0) + 1
                if not valid_after.get(kind):
                    failures.append((pairs, kind))
        pairs += 1
    print(f"pairs {pairs} checksums verified {verified} failures {len(failures)} {failures[:10]}")
    if pairs == 0 or not verified:
        # Nothing was checked: the caller wrote no pairs, or none had a
        # valid checksum to keep. That must not read as success.
        print("nothing to verify: no pairs, or no valid checksum among them")
        sys.exit(2)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]))
    else:
        verify(sys.argv[2])
