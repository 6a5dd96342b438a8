//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All checksum values are the 16-bit field exactly as it sits in the packet,
//! read big-endian (`u16::from_be_bytes`).

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
const fn word(hi: u8, lo: u8) -> u16 {
    ((hi as u16) << 8) | lo as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for a 32-bit field (an IPv4
/// address) changing from `old` to `new`.
#[inline(always)]
pub const fn replace_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let sum = (!check) as u32
        + (!word(old[0], old[1])) as u32
        + (!word(old[2], old[3])) as u32
        + word(new[0], new[1]) as u32
        + word(new[2], new[3]) as u32;
    !fold(sum)
}

/// RFC 1624 eqn. 3 for one 16-bit word changing from `old` to `new`.
#[inline(always)]
pub const fn replace_word(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// An address quoted in an ICMP error changes from `old` to `new`: the
/// quoted IPv4 header's checksum changes with it, and the ICMP checksum
/// (which covers both, and no pseudo-header) follows both. Returns (ICMP
/// checksum, quoted header checksum).
#[inline(always)]
pub const fn replace_quoted_addr(
    icmp_check: u16,
    quoted_check: u16,
    old: [u8; 4],
    new: [u8; 4],
) -> (u16, u16) {
    let quoted = replace_addr(quoted_check, old, new);
    let icmp = replace_word(replace_addr(icmp_check, old, new), quoted_check, quoted);
    (icmp, quoted)
}

/// Like [`replace_addr`] for a UDP checksum, where 0 means "no checksum":
/// 0 stays 0, and a computed 0 is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace_addr(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// IPv4 header checksum over a 20-byte header (no options) whose checksum
/// field (bytes 10..12) is ignored.
#[inline(always)]
pub fn ipv4_header_checksum(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += ((header[i] as u32) << 8) | header[i + 1] as u32;
        }
        i += 2;
    }
    !fold(sum)
}

/// One's-complement sum of `data` added to `acc`, not folded: 32-bit words
/// at a time into a 64-bit accumulator, for whole packets in userspace (the
/// tunnel). A 64 KiB packet adds at most 2^30 per word count, far from
/// overflowing. Odd trailing bytes are padded with zeros, as RFC 1071 says.
pub fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let (words, rest) = data.as_chunks::<4>();
    for w in words {
        acc += u64::from(u32::from_be_bytes(*w));
    }
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds a [`ones_sum`] accumulator to the 16-bit one's-complement sum.
pub const fn fold_wide(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum of an IPv4 header of any length (options included) whose
/// checksum field is ignored.
pub fn ipv4_header_checksum_with_options(header: &[u8]) -> u16 {
    let stored = u64::from(u16::from_be_bytes([header[10], header[11]]));
    !fold_wide(ones_sum(header, 0) - stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum, the reference the incremental update must match.
    fn full_checksum(words: &[u8]) -> u16 {
        let mut sum = 0u32;
        for chunk in words.chunks(2) {
            let hi = chunk[0] as u32;
            let lo = *chunk.get(1).unwrap_or(&0) as u32;
            sum += (hi << 8) | lo;
        }
        !fold(sum)
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut data = [0u8; 24];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let before = full_checksum(&data);
        let old = [data[4], data[5], data[6], data[7]];
        let new = [10, 200, 33, 10];
        data[4..8].copy_from_slice(&new);
        assert_eq!(replace_addr(before, old, new), full_checksum(&data));
    }

    #[test]
    fn incremental_handles_carries_for_many_values() {
        let mut seed = 0x1234_5678u32;
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let mut data = seed.to_be_bytes().repeat(3);
            data[0] = (seed >> 3) as u8;
            let before = full_checksum(&data);
            let old = [data[4], data[5], data[6], data[7]];
            let new = (seed.rotate_left(13)).to_be_bytes();
            data[4..8].copy_from_slice(&new);
            assert_eq!(
                replace_addr(before, old, new),
                full_checksum(&data),
                "seed {seed:#x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace_addr(0, [10, 0, 0, 1], [10, 0, 0, 2]), 0);
    }

    #[test]
    fn udp_computed_zero_is_sent_as_ffff() {
        // Choose a change that makes the one's-complement result 0.
        let old = [0, 0, 0, 0];
        let new = [0, 0, 0, 1];
        // check' = ~(~check + 1) == 0  <=>  ~check + 1 == 0xffff  <=>  check == 1
        assert_eq!(replace_addr(1, old, new), 0);
        assert_eq!(udp_replace_addr(1, old, new), 0xffff);
    }

    #[test]
    fn ipv4_header_checksum_known_vector() {
        // Wikipedia's IPv4 header checksum example: checksum 0xb861.
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&header), 0xb861);
    }
}

/// The arithmetic above applied to whole packets built and verified by an
/// independent library (etherparse), as the node ingress program applies it.
#[cfg(test)]
mod packet_tests {
    extern crate std;
    use super::*;
    use crate::prefix::PrefixRewrite;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use std::vec::Vec;

    const SRC: [u8; 4] = [10, 244, 1, 10];
    const DST: [u8; 4] = [10, 100, 17, 10];

    /// Rewrites the IPv4 source of `packet` (starting at its IP header) the
    /// way `node_ingress` does: IP checksum, then the L4 checksum by proto.
    fn rewrite_source(packet: &mut [u8], new_src: [u8; 4]) {
        let ihl = (packet[0] & 0x0f) as usize * 4;
        let old: [u8; 4] = packet[12..16].try_into().unwrap();
        packet[12..16].copy_from_slice(&new_src);
        let ip_check = u16::from_be_bytes([packet[10], packet[11]]);
        packet[10..12].copy_from_slice(&replace_addr(ip_check, old, new_src).to_be_bytes());
        let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
        let l4 = match packet[9] {
            6 if first_fragment => Some((ihl + 16, false)),
            17 if first_fragment => Some((ihl + 6, true)),
            _ => None,
        };
        if let Some((at, udp)) = l4 {
            let c = u16::from_be_bytes([packet[at], packet[at + 1]]);
            let c = if udp {
                udp_replace_addr(c, old, new_src)
            } else {
                replace_addr(c, old, new_src)
            };
            packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }

    fn assert_checksums_valid(packet: &[u8], expect_src: [u8; 4]) {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("not ipv4")
        };
        let header = ip.header();
        assert_eq!(header.source(), expect_src);
        assert_eq!(
            header.to_header().calc_header_checksum(),
            header.header_checksum()
        );
        let ip_header = header.to_header();
        match sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                let expected = tcp
                    .to_header()
                    .calc_checksum_ipv4(&ip_header, tcp.payload())
                    .unwrap();
                assert_eq!(tcp.checksum(), expected);
            }
            Some(TransportSlice::Udp(udp)) => {
                if udp.checksum() != 0 {
                    let expected = udp
                        .to_header()
                        .calc_checksum_ipv4(&ip_header, udp.payload())
                        .unwrap();
                    assert_eq!(udp.checksum(), expected);
                }
            }
            Some(TransportSlice::Icmpv4(icmp)) => {
                let expected = icmp.icmp_type().calc_checksum(icmp.payload());
                assert_eq!(icmp.checksum(), expected);
            }
            other => panic!("unexpected transport {other:?}"),
        }
    }

    #[test]
    fn tcp_udp_icmp_checksums_stay_valid_across_a_non_octet_prefix_rewrite() {
        let rewrite = PrefixRewrite::new([10, 244, 0, 0], [10, 200, 32, 0], 20);
        let new_src = rewrite.apply(SRC);
        assert_eq!(new_src, [10, 200, 33, 10]);
        let payload: Vec<u8> = (0..999u32).map(|i| (i * 7) as u8).collect();

        let mut tcp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .tcp(40000, 80, 1, 65535)
            .write(&mut tcp, &payload)
            .unwrap();
        let mut udp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .udp(40000, 53)
            .write(&mut udp, &payload)
            .unwrap();
        let mut icmp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut icmp, &payload)
            .unwrap();

        for mut packet in [tcp, udp, icmp] {
            rewrite_source(&mut packet, new_src);
            assert_checksums_valid(&packet, new_src);
        }
    }

    #[test]
    fn udp_without_checksum_keeps_zero() {
        let mut udp = Vec::new();
        PacketBuilder::ipv4(SRC, DST, 64)
            .udp(1, 2)
            .write(&mut udp, b"hello")
            .unwrap();
        udp[20 + 6] = 0;
        udp[20 + 7] = 0;
        rewrite_source(&mut udp, [10, 245, 1, 10]);
        assert_eq!(&udp[26..28], &[0, 0]);
        assert_checksums_valid(&udp, [10, 245, 1, 10]);
    }

    #[test]
    fn quoted_address_rewrite_keeps_icmp_and_quoted_checksums_valid() {
        use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, PacketBuilder};
        // The packet an ICMP error is about: UDP from 10.246.1.10 to 10.244.2.11.
        let mut quoted = Vec::new();
        PacketBuilder::ipv4([10, 246, 1, 10], [10, 244, 2, 11], 63)
            .udp(40000, 33434)
            .write(&mut quoted, b"probe")
            .unwrap();
        let build = |quote: &[u8]| {
            let mut out = Vec::new();
            PacketBuilder::ipv4([10, 244, 2, 11], [10, 246, 1, 10], 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::Port,
                ))
                .write(&mut out, &quote[..28])
                .unwrap();
            out
        };
        let before = build(&quoted);
        let (old, new) = ([10, 246, 1, 10], [10, 244, 1, 10]);
        let icmp = 20;
        let q = icmp + 8;
        let (icmp_check, quoted_check) = replace_quoted_addr(
            u16::from_be_bytes([before[icmp + 2], before[icmp + 3]]),
            u16::from_be_bytes([before[q + 10], before[q + 11]]),
            old,
            new,
        );
        let mut rewritten_quote = quoted.clone();
        rewritten_quote[12..16].copy_from_slice(&new);
        let header: [u8; 20] = rewritten_quote[..20].try_into().unwrap();
        rewritten_quote[10..12].copy_from_slice(&ipv4_header_checksum(&header).to_be_bytes());
        let expected = build(&rewritten_quote);
        assert_eq!(
            quoted_check.to_be_bytes(),
            [expected[q + 10], expected[q + 11]]
        );
        assert_eq!(
            icmp_check.to_be_bytes(),
            [expected[icmp + 2], expected[icmp + 3]]
        );
    }
}
