//! Programs that do nothing: the baseline for per-packet cost measurements,
//! and the XDP program a veth peer needs so that XDP_REDIRECT/XDP_TX frames
//! into it are not dropped.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
