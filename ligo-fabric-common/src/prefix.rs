//! Stateless IPv4 prefix translation: keep the host bits, swap the network
//! bits. Works for any prefix length, octet-aligned or not.

/// Network mask for a prefix length (0..=32), as a host-order `u32`.
#[inline(always)]
pub const fn mask_for_len(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else if prefix_len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix_len)
    }
}

/// Rewrites addresses of one prefix into another prefix of the same length.
///
/// Stored in maps as network-order bytes so that neither side has to think
/// about endianness: `apply` is a byte-wise `network | (addr & host_mask)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefixRewrite {
    /// Network part of the target prefix (host bits zero).
    pub to_network: [u8; 4],
    /// Network part of the source prefix (host bits zero).
    pub from_network: [u8; 4],
    /// Inverted mask: 1 bits are the host bits kept from the address.
    pub host_mask: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<PrefixRewrite>() == 12);

impl PrefixRewrite {
    /// A rewrite from `from/len` to `to/len`. Host bits set in either network
    /// are ignored (the caller validates prefixes for the operator).
    pub const fn new(from: [u8; 4], to: [u8; 4], prefix_len: u8) -> Self {
        let mask = mask_for_len(prefix_len);
        Self {
            to_network: (u32::from_be_bytes(to) & mask).to_be_bytes(),
            from_network: (u32::from_be_bytes(from) & mask).to_be_bytes(),
            host_mask: (!mask).to_be_bytes(),
        }
    }

    /// True when `addr` lies in the source prefix.
    #[inline(always)]
    pub fn matches(&self, addr: [u8; 4]) -> bool {
        let mut i = 0;
        while i < 4 {
            if addr[i] & !self.host_mask[i] != self.from_network[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The translated address (same host bits, target network bits).
    #[inline(always)]
    pub fn apply(&self, addr: [u8; 4]) -> [u8; 4] {
        [
            self.to_network[0] | (addr[0] & self.host_mask[0]),
            self.to_network[1] | (addr[1] & self.host_mask[1]),
            self.to_network[2] | (addr[2] & self.host_mask[2]),
            self.to_network[3] | (addr[3] & self.host_mask[3]),
        ]
    }

    /// The rewrite in the opposite direction.
    pub const fn reversed(&self) -> Self {
        Self {
            to_network: self.from_network,
            from_network: self.to_network,
            host_mask: self.host_mask,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask_for_len(0), 0);
        assert_eq!(mask_for_len(16), 0xffff_0000);
        assert_eq!(mask_for_len(20), 0xffff_f000);
        assert_eq!(mask_for_len(32), u32::MAX);
    }

    #[test]
    fn octet_aligned_rewrite_keeps_host_bits() {
        let r = PrefixRewrite::new([10, 245, 0, 0], [10, 244, 0, 0], 16);
        assert!(r.matches([10, 245, 1, 10]));
        assert!(!r.matches([10, 244, 1, 10]));
        assert_eq!(r.apply([10, 245, 1, 10]), [10, 244, 1, 10]);
    }

    #[test]
    fn non_octet_aligned_rewrite() {
        // 10.200.32.0/20 <-> 10.100.16.0/20: the /20 boundary cuts the third octet.
        let r = PrefixRewrite::new([10, 200, 32, 0], [10, 100, 16, 0], 20);
        assert!(r.matches([10, 200, 47, 255]));
        assert!(!r.matches([10, 200, 48, 0]));
        assert!(!r.matches([10, 200, 31, 255]));
        assert_eq!(r.apply([10, 200, 33, 10]), [10, 100, 17, 10]);
        assert_eq!(r.apply([10, 200, 47, 255]), [10, 100, 31, 255]);
        assert_eq!(r.reversed().apply([10, 100, 17, 10]), [10, 200, 33, 10]);
    }

    #[test]
    fn host_bits_in_configured_network_are_ignored() {
        let r = PrefixRewrite::new([10, 200, 33, 7], [10, 100, 17, 9], 20);
        assert_eq!(r.apply([10, 200, 33, 10]), [10, 100, 17, 10]);
    }

    #[test]
    fn identity_rewrite() {
        let r = PrefixRewrite::new([10, 244, 0, 0], [10, 244, 0, 0], 16);
        assert_eq!(r.apply([10, 244, 3, 4]), [10, 244, 3, 4]);
    }
}
