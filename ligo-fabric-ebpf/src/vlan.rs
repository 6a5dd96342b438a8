//! Frames of a VLAN on top of our interface.

use aya_ebpf::{bindings::__sk_buff, programs::TcContext, EbpfContext};

/// Whether the kernel moved a VLAN tag out of this frame into the skb's
/// metadata (it does so on receive, and a VLAN device on our interface
/// sends that way). Such a frame belongs to that VLAN's network, not to the
/// untagged one the fabric runs on: the TC programs pass it untouched, as
/// the XDP program and the reference model do with a tag still in the frame.
#[inline(always)]
pub fn tagged(ctx: &TcContext) -> bool {
    // SAFETY: the context is the live __sk_buff of this invocation.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).vlan_present != 0 }
}
