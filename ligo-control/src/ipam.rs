//! Allocation of peer views: the block of our address space through which
//! we address a peer's pod CIDR.
//!
//! A pure function of the objects (the state is in the `Peer` specs, so the
//! result is the same after a controller restart): a peer that already has
//! a view keeps it; otherwise it gets its real CIDR when that collides with
//! nothing, else the first free block of the same size in the pools, in the
//! pools' order, lowest address first.

use std::fmt;

use ipnetwork::Ipv4Network;

/// Everything a view must not overlap, and where to take views from.
#[derive(Debug, Clone, Default)]
pub struct AddressSpace {
    /// Our pod CIDRs, service CIDR, node addresses (as /32), reserved
    /// ranges, and the views other peers already hold.
    pub taken: Vec<Ipv4Network>,
    /// Where views come from when a peer's real CIDR is taken.
    pub pools: Vec<Ipv4Network>,
}

/// Why no view could be allocated: the reason of `ViewAllocated=False`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewError {
    /// Every /len block of every pool overlaps something taken.
    PoolsExhausted { prefix: u8, pools: Vec<Ipv4Network> },
}

impl ViewError {
    /// The condition reason (CamelCase).
    pub fn reason(&self) -> &'static str {
        match self {
            ViewError::PoolsExhausted { .. } => "PoolsExhausted",
        }
    }
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViewError::PoolsExhausted { prefix, pools } if pools.is_empty() => write!(
                f,
                "the peer's pod CIDR collides with our address space and no view pool is configured; add a pool of /{prefix} blocks or larger to the cluster's fabric settings"
            ),
            ViewError::PoolsExhausted { prefix, pools } => {
                let pools: Vec<String> = pools.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "no free /{prefix} block left in the view pools {}; add a pool or remove a peer",
                    pools.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for ViewError {}

/// The view for a peer whose real pod CIDR is `real`.
pub fn allocate_view(real: Ipv4Network, space: &AddressSpace) -> Result<Ipv4Network, ViewError> {
    let real = canonical(real);
    if !space.taken.iter().any(|t| overlaps(*t, real)) {
        return Ok(real);
    }
    for pool in &space.pools {
        if let Some(view) = first_free_block(canonical(*pool), real.prefix(), &space.taken) {
            return Ok(view);
        }
    }
    Err(ViewError::PoolsExhausted {
        prefix: real.prefix(),
        pools: space.pools.clone(),
    })
}

/// The lowest /`prefix` block inside `pool` that overlaps nothing in
/// `taken`. Skips past each collision instead of trying every block, so a
/// /8 pool of /28 blocks is cheap.
fn first_free_block(pool: Ipv4Network, prefix: u8, taken: &[Ipv4Network]) -> Option<Ipv4Network> {
    if prefix < pool.prefix() {
        return None;
    }
    let size = block_size(prefix);
    let pool_end = u64::from(u32::from(pool.network())) + block_size(pool.prefix());
    let mut start = u64::from(u32::from(pool.network()));
    while start + size <= pool_end {
        let end = start + size;
        // The furthest end among the taken ranges this candidate overlaps.
        let blocked_until = taken
            .iter()
            .map(|t| range(*t))
            .filter(|(t_start, t_end)| *t_start < end && start < *t_end)
            .map(|(_, t_end)| t_end)
            .max();
        match blocked_until {
            None => {
                let address = u32::try_from(start).ok()?;
                return Ipv4Network::new(address.into(), prefix).ok();
            }
            // Next aligned block at or after the collision's end.
            Some(t_end) => start = t_end.max(end).div_ceil(size) * size,
        }
    }
    None
}

/// [start, end) of a network, in a u64 so /0 fits.
fn range(net: Ipv4Network) -> (u64, u64) {
    let start = u64::from(u32::from(net.network()));
    (start, start + block_size(net.prefix()))
}

fn block_size(prefix: u8) -> u64 {
    1u64 << (32 - u32::from(prefix.min(32)))
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    let ((a0, a1), (b0, b1)) = (range(a), range(b));
    a0 < b1 && b0 < a1
}

/// The network with host bits cleared.
fn canonical(net: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Ipv4Network {
        text.parse().expect("test CIDR")
    }

    fn space(taken: &[&str], pools: &[&str]) -> AddressSpace {
        AddressSpace {
            taken: taken.iter().map(|t| net(t)).collect(),
            pools: pools.iter().map(|p| net(p)).collect(),
        }
    }

    #[test]
    fn a_free_real_cidr_is_its_own_view() {
        let s = space(&["10.244.0.0/16", "10.96.0.0/16"], &["10.128.0.0/10"]);
        assert_eq!(
            allocate_view(net("10.100.16.0/20"), &s),
            Ok(net("10.100.16.0/20"))
        );
        // A node address inside the real CIDR takes it too.
        let s = space(&["10.244.0.0/16", "10.100.17.5/32"], &["10.128.0.0/10"]);
        assert_eq!(
            allocate_view(net("10.100.16.0/20"), &s),
            Ok(net("10.128.0.0/20"))
        );
        // Kubernetes' default service CIDR 10.96.0.0/12 covers 10.100.x.
        let s = space(&["10.244.0.0/16", "10.96.0.0/12"], &["10.128.0.0/10"]);
        assert_eq!(
            allocate_view(net("10.100.16.0/20"), &s),
            Ok(net("10.128.0.0/20"))
        );
    }

    #[test]
    fn an_identical_cidr_gets_the_first_free_block_of_its_size() {
        // Pool 10.244.0.0/14 holds 10.244/16 (ours), 10.245/16 (another
        // peer's view), so the next is 10.246.0.0/16.
        let s = space(&["10.244.0.0/16", "10.245.0.0/16"], &["10.244.0.0/14"]);
        assert_eq!(
            allocate_view(net("10.244.0.0/16"), &s),
            Ok(net("10.246.0.0/16"))
        );
    }

    #[test]
    fn non_octet_aligned_prefixes_are_aligned_blocks() {
        // A /20 view in a pool that starts mid-way through taken /22s.
        let s = space(
            &[
                "10.100.16.0/20",
                "10.200.0.0/22",
                "10.200.4.0/23",
                "10.200.17.1/32",
            ],
            &["10.200.0.0/19"],
        );
        // 10.200.0.0/20 is blocked by the /22 and /23, 10.200.16.0/20 by a
        // node address: nothing free in /19 ...
        assert!(allocate_view(net("10.100.16.0/20"), &s).is_err());
        // ... but a /23 fits right after the taken /22 + /23.
        let s23 = space(
            &["10.9.0.0/23", "10.200.0.0/22", "10.200.4.0/23"],
            &["10.200.0.0/19"],
        );
        assert_eq!(
            allocate_view(net("10.9.0.0/23"), &s23),
            Ok(net("10.200.6.0/23"))
        );
        // A /27 from 10.100.16.0/20's pool skips the /32 inside its block.
        let s27 = space(&["10.1.0.0/27", "10.200.0.5/32"], &["10.200.0.0/24"]);
        assert_eq!(
            allocate_view(net("10.1.0.0/27"), &s27),
            Ok(net("10.200.0.32/27"))
        );
    }

    #[test]
    fn a_pool_filled_to_the_last_block_then_exhausted() {
        // A /24 pool of /26 blocks: three taken, the last one free.
        let mut s = space(
            &[
                "10.0.0.0/26",
                "10.9.0.0/26",
                "10.9.0.64/26",
                "10.9.0.128/26",
            ],
            &["10.9.0.0/24"],
        );
        let last = allocate_view(net("10.0.0.0/26"), &s);
        assert_eq!(last, Ok(net("10.9.0.192/26")));
        s.taken.push(net("10.9.0.192/26"));
        let exhausted = allocate_view(net("10.0.0.0/26"), &s).unwrap_err();
        assert_eq!(exhausted.reason(), "PoolsExhausted");
        assert_eq!(
            exhausted.to_string(),
            "no free /26 block left in the view pools 10.9.0.0/24; add a pool or remove a peer"
        );
    }

    #[test]
    fn pools_are_tried_in_order_and_smaller_pools_are_skipped() {
        let s = space(
            &["10.244.0.0/16"],
            &["10.250.0.0/24", "10.251.0.0/16", "10.252.0.0/16"],
        );
        assert_eq!(
            allocate_view(net("10.244.0.0/16"), &s),
            Ok(net("10.251.0.0/16"))
        );
        let none = space(&["10.244.0.0/16"], &[]);
        assert!(allocate_view(net("10.244.0.0/16"), &none)
            .unwrap_err()
            .to_string()
            .contains("no view pool is configured"));
    }

    #[test]
    fn the_result_depends_only_on_the_inputs() {
        let s = space(&["10.244.0.0/16", "10.96.0.0/12"], &["10.244.0.0/14"]);
        let first = allocate_view(net("10.244.0.0/16"), &s);
        let mut shuffled = s.clone();
        shuffled.taken.reverse();
        assert_eq!(allocate_view(net("10.244.0.0/16"), &shuffled), first);
    }

    #[test]
    fn a_big_pool_of_small_blocks_finds_the_last_free_one() {
        // 2^20 /28 blocks in a /8; all but the last /16 taken.
        let s = space(
            &[
                "10.0.0.0/9",
                "10.128.0.0/10",
                "10.192.0.0/11",
                "10.224.0.0/12",
                "10.240.0.0/13",
                "10.248.0.0/14",
                "10.252.0.0/15",
                "10.254.0.0/16",
                "192.168.0.0/28",
            ],
            &["10.0.0.0/8"],
        );
        assert_eq!(
            allocate_view(net("192.168.0.0/28"), &s),
            Ok(net("10.255.0.0/28"))
        );
    }
}
