//! Delivery of decapsulated packets at a node's TC ingress: straight into
//! the pod's network namespace when the route to it leaves by a pod veth
//! the daemon knows (no second pass through this node's stack), otherwise
//! to the stack, which routes whatever the CNI set up.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_peer},
    programs::TcContext,
    EbpfContext,
};
use ligo_fabric_common::headers::{ipv4, ETH_HDR_LEN, IPV4_HDR_LEN};

use crate::maps::POD_INTERFACES;

const AF_INET: u8 = 2;

/// Redirects the (decapsulated, Ethernet + IPv4) packet to its pod, or
/// returns TC_ACT_OK to let the stack deliver it.
#[inline(always)]
pub fn to_pod_or_stack(ctx: &TcContext) -> i32 {
    let pass = TC_ACT_OK as i32;
    let Ok(ip) = ctx.load::<[u8; IPV4_HDR_LEN]>(ETH_HDR_LEN) else {
        return pass;
    };
    let ttl = ip[8];
    if ttl <= 1 {
        // The stack answers with ICMP time exceeded.
        return pass;
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip[ipv4::PROTOCOL];
    // tot_len stays 0: the helper then checks the skb against the pod
    // link's MTU itself, which lets GSO super-packets through (their
    // tot_len is the whole super-packet's) and turns a too-big packet into
    // FRAG_NEEDED, for the stack to answer with an ICMP error.
    params.__bindgen_anon_2.tos = ip[1];
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: the context is the live __sk_buff of this invocation.
    params.ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ingress_ifindex };
    // SAFETY: params is a valid bpf_fib_lookup on our stack, of the size given.
    let ret = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return pass;
    }
    let out = params.ifindex;
    // SAFETY: not preallocated; only presence is read.
    if unsafe { POD_INTERFACES.get(&out) }.is_none() {
        return pass;
    }
    // Decrement the TTL as forwarding would.
    let old = u16::from_ne_bytes([ttl, ip[ipv4::PROTOCOL]]) as u64;
    let new = u16::from_ne_bytes([ttl - 1, ip[ipv4::PROTOCOL]]) as u64;
    // SAFETY: reading the union member the successful lookup filled in.
    let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
    if ctx
        .l3_csum_replace(ETH_HDR_LEN + ipv4::CHECKSUM, old, new, 2)
        .is_err()
        || ctx.store(ETH_HDR_LEN + 8, &(ttl - 1), 0).is_err()
        || ctx.store(0, &macs.dmac, 0).is_err()
        || ctx.store(6, &macs.smac, 0).is_err()
    {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a plain helper call; the kernel validates the ifindex.
    unsafe { bpf_redirect_peer(out, 0) as i32 }
}
