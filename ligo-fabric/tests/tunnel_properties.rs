//! Property tests of the WireGuard tunnel's packet code: whatever bytes
//! arrive, nothing panics and nothing oversized or with a bad checksum
//! leaves; well-formed TCP streams survive coalescing and segmentation
//! byte for byte.

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use ligo_fabric::tunnel::{
    device::VNET_HDR_LEN,
    packet::{for_each_tunnel_packet, parse_fabric_payload, Coalescer},
};
use proptest::prelude::*;

fn valid_checksums(packet: &[u8]) -> bool {
    let Ok(sliced) = SlicedPacket::from_ip(packet) else {
        return false;
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        return false;
    };
    let header = ip.header().to_header();
    if header.header_checksum != header.calc_header_checksum() {
        return false;
    }
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            tcp.to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .ok()
                == Some(tcp.checksum())
        }
        Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            udp.to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .ok()
                == Some(udp.checksum())
        }
        _ => true,
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_never_leave_oversized(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        mtu in 60usize..1500,
    ) {
        let _ = parse_fabric_payload(&bytes);
        let mut scratch = Vec::new();
        let _ = for_each_tunnel_packet(&bytes, mtu, &mut scratch, |p| {
            assert!(p.len() <= mtu, "{} > {mtu}", p.len());
        });
        let mut c = Coalescer::default();
        c.push(1, &bytes, &mut |_| {});
        c.flush(&mut |_| {});
    }

    #[test]
    fn tcp_super_packets_are_cut_to_the_mtu_with_valid_checksums(
        payload in proptest::collection::vec(any::<u8>(), 1..20_000),
        seq in any::<u32>(),
        mtu in 576usize..1500,
    ) {
        let mut packet = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 2], [10, 100, 17, 3], 63)
            .tcp(40000, 5201, seq, 512)
            .ack(1)
            .write(&mut packet, &payload)
            .unwrap();
        if packet.len() > 65_535 {
            return Ok(());
        }
        let mut joined = Vec::new();
        let mut next = seq;
        for_each_tunnel_packet(&packet, mtu, &mut Vec::new(), |p| {
            assert!(p.len() <= mtu);
            assert!(valid_checksums(p));
            let sliced = SlicedPacket::from_ip(p).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = sliced.transport else { panic!("not tcp") };
            assert_eq!(tcp.sequence_number(), next);
            next = next.wrapping_add(tcp.payload().len() as u32);
            joined.extend_from_slice(tcp.payload());
        }).unwrap();
        prop_assert_eq!(joined, payload);
    }

    #[test]
    fn coalesced_runs_split_back_into_the_original_segments(
        total in 1usize..40_000,
        mss in 600usize..1400,
    ) {
        // A flow's segments: all `mss` long but the last (as a sender emits).
        let payload: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut segments = Vec::new();
        for (i, chunk) in payload.chunks(mss).enumerate() {
            let mut seg = Vec::new();
            PacketBuilder::ipv4([10, 100, 17, 3], [10, 244, 1, 2], 63)
                .tcp(5201, 40000, 7 + (i * mss) as u32, 512)
                .ack(9)
                .write(&mut seg, chunk)
                .unwrap();
            segments.push(seg);
        }
        let mut frames = Vec::new();
        let mut c = Coalescer::default();
        for s in &segments {
            c.push(2, s, &mut |f| frames.push(f.to_vec()));
        }
        c.flush(&mut |f| frames.push(f.to_vec()));
        let mut again = Vec::new();
        for f in &frames {
            let packet = &f[VNET_HDR_LEN + 14..];
            for_each_tunnel_packet(packet, 40 + mss, &mut Vec::new(), |p| again.push(p.to_vec()))
                .unwrap();
        }
        // IP ids: the sender numbered them 0,0,..; segmentation numbers from
        // the first, as the kernel does. Compare with ids cleared.
        let clear = |p: &[u8]| {
            let mut p = p.to_vec();
            p[4..6].copy_from_slice(&[0, 0]);
            p[10..12].copy_from_slice(&[0, 0]);
            p
        };
        prop_assert_eq!(again.len(), segments.len());
        for (a, b) in again.iter().zip(&segments) {
            prop_assert_eq!(clear(a), clear(b));
            prop_assert!(valid_checksums(a));
        }
    }
}
