//! Property tests of the pure packet logic the programs run: random inputs,
//! results checked against a from-scratch computation or an invariant.
//! (`cargo test` runs 256 cases per property; PROPTEST_CASES raises it.)

use etherparse::{TcpHeader, TcpOptionElement};
use ligo_fabric_common::{
    checksum::{
        fold_wide, ipv4_header_checksum, ipv4_header_checksum_with_options, ones_sum, replace_addr,
        replace_quoted_addr, udp_replace_addr,
    },
    headers::{clamped_mss, peer_from_tunnel_mac, tunnel_source_mac},
    prefix::PrefixRewrite,
};
use proptest::prelude::*;

/// One's-complement checksum of `data` from scratch (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_header() -> impl Strategy<Value = [u8; 20]> {
    proptest::array::uniform20(any::<u8>()).prop_map(|mut h| {
        h[0] = 0x45;
        let c = ipv4_header_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    })
}

proptest! {
    #[test]
    fn prefix_rewrite_keeps_host_bits_and_round_trips(
        from in any::<[u8; 4]>(),
        to in any::<[u8; 4]>(),
        len in 0u8..=32,
        addr in any::<[u8; 4]>(),
    ) {
        let rule = PrefixRewrite::new(from, to, len);
        // The network mask from scratch: `len` leading one bits.
        let mask = (0..len).fold(0u32, |m, bit| m | (1 << (31 - bit)));
        let a = u32::from_be_bytes(addr);
        let inside = a & mask == u32::from_be_bytes(from) & mask;
        prop_assert_eq!(rule.matches(addr), inside);
        if inside {
            let out = u32::from_be_bytes(rule.apply(addr));
            prop_assert_eq!(out & !mask, a & !mask, "host bits kept");
            prop_assert_eq!(out & mask, u32::from_be_bytes(to) & mask, "network bits swapped");
            prop_assert_eq!(rule.reversed().apply(rule.apply(addr)), addr);
        }
    }

    #[test]
    fn incremental_ip_checksum_equals_recomputation(
        mut header in ipv4_header(),
        new_src in any::<[u8; 4]>(),
    ) {
        let old_check = u16::from_be_bytes([header[10], header[11]]);
        let old_src: [u8; 4] = header[12..16].try_into().unwrap();
        header[12..16].copy_from_slice(&new_src);
        let fresh = ipv4_header_checksum(&header);
        let incremental = replace_addr(old_check, old_src, new_src);
        // 0x0000 and 0xffff are the same one's-complement value.
        prop_assert!(incremental == fresh || (incremental ^ fresh) == 0xffff);
        header[10..12].copy_from_slice(&incremental.to_be_bytes());
        prop_assert_eq!(checksum(&header), 0);
    }

    /// The tunnel's bulk sum (32-bit words, 64-bit accumulator, any length,
    /// split anywhere) against RFC 1071's 16-bit sum from scratch.
    #[test]
    fn bulk_ones_sum_equals_the_rfc_1071_sum(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        split in any::<prop::sample::Index>(),
    ) {
        let at = split.index(data.len() + 1) & !3;
        let (a, b) = data.split_at(at.min(data.len()));
        let bulk = !fold_wide(ones_sum(b, ones_sum(a, 0)));
        let reference = checksum(&data);
        prop_assert!(bulk == reference || (bulk ^ reference) == 0xffff);
    }

    #[test]
    fn header_checksum_with_options_matches_the_fixed_one(header in ipv4_header()) {
        prop_assert_eq!(
            ipv4_header_checksum_with_options(&header),
            ipv4_header_checksum(&header)
        );
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_others_never_become_zero(
        check in any::<u16>(),
        old in any::<[u8; 4]>(),
        new in any::<[u8; 4]>(),
    ) {
        let out = udp_replace_addr(check, old, new);
        if check == 0 {
            prop_assert_eq!(out, 0);
        } else {
            prop_assert_ne!(out, 0);
        }
    }

    #[test]
    fn quoted_address_rewrite_keeps_icmp_valid(
        quoted in ipv4_header(),
        tail in proptest::collection::vec(any::<u8>(), 8..64),
        rest_of_icmp in any::<[u8; 4]>(),
        new_dst in any::<[u8; 4]>(),
    ) {
        // An ICMP error: type 3, code 3, checksum, 4 bytes, quoted header, tail.
        let mut icmp = vec![3, 3, 0, 0];
        icmp.extend_from_slice(&rest_of_icmp);
        icmp.extend_from_slice(&quoted);
        icmp.extend_from_slice(&tail);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let q = 8;
        let old_dst: [u8; 4] = icmp[q + 16..q + 20].try_into().unwrap();
        let (icmp_check, quoted_check) = replace_quoted_addr(
            u16::from_be_bytes([icmp[2], icmp[3]]),
            u16::from_be_bytes([icmp[q + 10], icmp[q + 11]]),
            old_dst,
            new_dst,
        );
        icmp[q + 16..q + 20].copy_from_slice(&new_dst);
        icmp[q + 10..q + 12].copy_from_slice(&quoted_check.to_be_bytes());
        icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
        prop_assert_eq!(checksum(&icmp[q..q + 20]), 0, "quoted header checksum");
        prop_assert_eq!(checksum(&icmp), 0, "ICMP checksum");
    }

    /// Real TCP headers built by etherparse: SYNs (with or without ACK)
    /// whose first option is an MSS, followed by the options Linux sends.
    /// Expected values come from the generated MSS, not from the function.
    #[test]
    fn mss_clamp_lowers_exactly_a_syn_mss_above_the_clamp(
        mss in any::<u16>(),
        random_clamp in any::<u16>(),
        // Half the cases put the clamp within 2 of the MSS: the boundary.
        near in proptest::option::of(-2i32..=2),
        ack in any::<bool>(),
        more_options in any::<bool>(),
        ports in any::<(u16, u16)>(),
        seq in any::<u32>(),
    ) {
        let clamp = match near {
            Some(d) => (i32::from(mss) + d).clamp(0, 0xffff) as u16,
            None => random_clamp,
        };
        let first_24 = |syn: bool, first: TcpOptionElement| {
            let mut header = TcpHeader::new(ports.0, ports.1, seq, 64240);
            header.syn = syn;
            header.ack = ack;
            let mut options = vec![first];
            if more_options {
                options.extend([
                    TcpOptionElement::SelectiveAcknowledgementPermitted,
                    TcpOptionElement::Timestamp(seq, 0),
                    TcpOptionElement::Noop,
                    TcpOptionElement::WindowScale(7),
                ]);
            }
            header.set_options(&options).expect("options fit");
            let bytes = header.to_bytes();
            let first: [u8; 24] = bytes[..24].try_into().expect("24 bytes");
            first
        };
        let syn = first_24(true, TcpOptionElement::MaximumSegmentSize(mss));
        let expected = (clamp != 0 && mss > clamp).then_some((mss, clamp));
        prop_assert_eq!(clamped_mss(&syn, clamp), expected);
        // Not a SYN: never touched.
        let segment = first_24(false, TcpOptionElement::MaximumSegmentSize(mss));
        prop_assert_eq!(clamped_mss(&segment, clamp), None);
        // A SYN whose first option is not the MSS is left alone (the
        // documented limit: only the first option's place is read).
        let other_first = first_24(true, TcpOptionElement::WindowScale(7));
        prop_assert_eq!(clamped_mss(&other_first, clamp), None);
    }

    #[test]
    fn tunnel_macs_carry_any_24_bit_peer_id(id in 0u32..(1 << 24)) {
        prop_assert_eq!(peer_from_tunnel_mac(tunnel_source_mac(id)), Some(id));
    }
}
