//! Raw frames on an interface of a lab namespace (AF_PACKET): put a frame
//! on the wire exactly as built, and see exactly what arrives.
//!
//! A frame sent on interface X leaves by X (through X's TC egress) and
//! arrives at X's veth peer; a socket on X receives what X receives,
//! before X's TC ingress runs. The kernel moves a received VLAN tag out of
//! the frame; as libpcap does, the tag is put back from PACKET_AUXDATA.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns;

/// The kernel's PACKET_OUTGOING: a frame we (or the host) sent.
const PACKET_OUTGOING: u8 = 4;

pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    what: String,
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

impl PacketSocket {
    /// A socket on interface `ifname` of namespace `ns`, with a receive
    /// buffer deep enough for a whole burst.
    pub fn open(ns: &str, ifname: &str) -> Result<Self> {
        let what = format!("{ifname} in {ns}");
        let name = ifname.to_string();
        let (fd, ifindex) = netns::join(netns::within(ns, move || {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no interface {name}"))? as i32;
            let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
            // SAFETY: socket(2) with constant arguments; ownership of the fd
            // passes to OwnedFd right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
            check(raw, "opening a packet socket")?;
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex;
            // SAFETY: `addr` is a sockaddr_ll of the size passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            check(rc, "binding the packet socket")?;
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))?;
            let on: libc::c_int = 1;
            // SAFETY: PACKET_AUXDATA takes an int; pointer and length describe `on`.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            check(rc, "asking for packet auxdata")?;
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBufForce, &(8 << 20))?;
            Ok((fd, ifindex))
        }))?;
        Ok(Self { fd, ifindex, what })
    }

    /// Puts `frame` on the wire as it is. `Ok(false)`: the interface's
    /// egress dropped it (a TC program said so; the kernel reports ENOBUFS).
    pub fn send(&self, frame: &[u8]) -> Result<bool> {
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        // SAFETY: `frame` and `addr` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(false);
            }
            return Err(e)
                .with_context(|| format!("sending a {}-byte frame on {}", frame.len(), self.what));
        }
        if sent as usize != frame.len() {
            bail!("short send on {}: {sent} of {}", self.what, frame.len());
        }
        Ok(true)
    }

    /// Every frame received (not sent) on the interface until none came
    /// for `idle`, VLAN tags where they were on the wire.
    pub fn received_until_idle(&self, idle: Duration) -> Result<Vec<Vec<u8>>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65_536];
        // Room for one cmsghdr carrying a tpacket_auxdata, 8-aligned.
        let mut control = [0u64; 8];
        let mut last = Instant::now();
        while last.elapsed() < idle {
            // SAFETY: an all-zero sockaddr_ll is valid output space.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: an all-zero msghdr is valid; the pointers are set below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: every pointer in `msg` refers to a live buffer of the
            // length given next to it.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                return Err(e).with_context(|| format!("receiving on {}", self.what));
            }
            last = Instant::now();
            if from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let mut frame = buf[..n as usize].to_vec();
            if let Some((tpid, tci)) = vlan_tag(&msg) {
                if frame.len() >= 12 {
                    let mut tag = tpid.to_be_bytes().to_vec();
                    tag.extend_from_slice(&tci.to_be_bytes());
                    frame.splice(12..12, tag);
                }
            }
            frames.push(frame);
        }
        Ok(frames)
    }
}

/// The VLAN tag the kernel took out of a received frame, from its
/// PACKET_AUXDATA control message: (TPID, TCI).
fn vlan_tag(msg: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within
    // msg_control/msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg pointers from CMSG_*HDR point into the
        // control buffer at a complete header.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_PACKET && header.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: a PACKET_AUXDATA message carries one tpacket_auxdata;
            // read_unaligned because CMSG_DATA need not be aligned for it.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                aux.tp_vlan_tpid
            } else {
                0x8100
            };
            return Some((tpid, aux.tp_vlan_tci));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}
