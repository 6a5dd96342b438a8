//! Programs that do nothing: the baseline for per-packet cost measurements,
//! and the XDP program a veth peer needs so that XDP_REDIRECT/XDP_TX frames
//! into it are not dropped.

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}
