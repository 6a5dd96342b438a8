//! Ligo fabric eBPF programs, one source file per attach point:
//!
//! - [`node_egress`]: TC egress on a node's uplink: remap the destination of
//!   packets bound for a peer view and encapsulate them toward the gateway.
//! - [`gateway`]: TC ingress on a gateway's interfaces: forward fabric frames
//!   from local nodes to peer gateways and back, rewriting outer headers only
//!   (plain transport); frames for WireGuard peers go up to the tunnel.
//! - [`gateway_tunnel`]: TC ingress on the gateway's tunnel device: wrap
//!   decrypted WireGuard traffic in VXLAN toward the owning node.
//! - [`node_ingress`] (XDP) and [`node_ingress_tc`] (TC ingress) on a node's
//!   uplink: decapsulate, remap the source by the sending peer's rule, pass
//!   to the stack for delivery. One of the two is attached, by uplink kind.
//!
//! Shared pieces: [`maps`] (the map definitions), [`counters`] (per-peer
//! traffic and drop accounting), [`decap`] (validation of arriving frames),
//! [`encap`] (VXLAN encapsulation). The packet logic itself lives in
//! `ligo-fabric-common`, where it is unit-tested on the host.
#![no_std]
#![no_main]

mod counters;
mod decap;
mod deliver;
mod encap;
mod gateway;
mod gateway_tunnel;
mod maps;
mod node_egress;
mod node_ingress;
mod node_ingress_tc;
mod noop;
mod vlan;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
