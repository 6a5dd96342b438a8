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

/// TCX "next": hands the packet on to the next program at the hook. The
/// in-traffic baseline, attached in front of a fabric program.
#[classifier]
pub fn tc_next(_ctx: TcContext) -> i32 {
    TC_NEXT
}

/// TC_ACT_UNSPEC, which TCX reads as "run the next program".
const TC_NEXT: i32 = -1;
