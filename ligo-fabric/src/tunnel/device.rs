//! The gateway's tunnel device: a multi-queue TAP with virtio-net headers.
//! The inbound workers write decrypted packets into it, coalesced TCP
//! segments as one GSO super-packet per write; the `gateway_tunnel` program
//! on its ingress wraps them in VXLAN toward the owning node. The kernel
//! thus carries one GSO packet node-ward where it would otherwise carry
//! dozens of small ones.
//!
//! The device is persistent and belongs to the fabric daemon, which creates
//! it down, attaches `gateway_tunnel` through a pinned link and only then
//! brings it up; the tunnel process attaches its queues to it once it is up.
//! So neither process's restart removes the device or its program, and no
//! decrypted packet reaches the device before the program does.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::fd::AsRawFd,
};

use anyhow::{bail, Context, Result};

/// Name of the device in the gateway's network namespace.
pub const TUNNEL_DEVICE: &str = "ligo-wg";

/// Length of `struct virtio_net_hdr`, which precedes every frame.
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

/// The virtio-net header of a frame (legacy layout, native endianness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub needs_csum: bool,
    /// TCPv4 segmentation with this payload size per segment.
    pub tcp4_gso_size: Option<u16>,
    pub hdr_len: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    pub fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = if self.needs_csum {
            VIRTIO_NET_HDR_F_NEEDS_CSUM
        } else {
            0
        };
        if let Some(size) = self.tcp4_gso_size {
            h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
            h[4..6].copy_from_slice(&size.to_ne_bytes());
        }
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }
}

/// The tunnel process's queues on the device, one per inbound worker.
/// Closing them detaches the queues; the device stays.
pub struct TunnelDevice {
    queues: Vec<File>,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn if_request(name: &str, flags: libc::c_short) -> IfReqFlags {
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    for (dst, src) in req
        .name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// Opens one queue of the device (virtio-net header first in every frame),
/// creating the device if it does not exist.
pub fn open_queue() -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun (is the tun module available?)")?;
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
        as libc::c_short;
    let mut req = if_request(TUNNEL_DEVICE, flags);
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (name,
    // flags, padding to the kernel's size).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    check(
        rc,
        &format!("opening a queue of tunnel device {TUNNEL_DEVICE}"),
    )?;
    let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
    // SAFETY: TUNSETOFFLOAD takes the offload bits by value.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offload as libc::c_ulong,
        )
    };
    check(rc, "enabling checksum and TSO offload on the tunnel device")?;
    Ok(file)
}

/// Daemon side: makes sure the persistent device exists (created down when
/// it did not) and returns its index. The caller attaches `gateway_tunnel`
/// and then calls [`set_up`].
pub fn ensure_persistent() -> Result<u32> {
    // Only the daemon creates it, persistent: one that exists is ours.
    if let Ok(index) = nix::net::if_::if_nametoindex(TUNNEL_DEVICE) {
        return Ok(index);
    }
    let queue = open_queue()?;
    // SAFETY: TUNSETPERSIST takes its flag by value.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    check(rc, &format!("making {TUNNEL_DEVICE} persistent"))?;
    nix::net::if_::if_nametoindex(TUNNEL_DEVICE)
        .with_context(|| format!("{TUNNEL_DEVICE} has no interface index"))
}

/// Whether the device exists and is up, i.e. its program is attached.
pub fn is_ready() -> bool {
    interface_flags(TUNNEL_DEVICE).is_ok_and(|flags| flags & libc::IFF_UP as libc::c_short != 0)
}

impl TunnelDevice {
    /// Tunnel side: attaches `queues` queues to the device the daemon made.
    pub fn open(queues: usize) -> Result<Self> {
        if !is_ready() {
            bail!(
                "tunnel device {TUNNEL_DEVICE} is missing or down: the fabric daemon \
                 (`ligo-fabric run`) creates it on a gateway with WireGuard peers"
            );
        }
        let queues = (0..queues.max(1))
            .map(|_| open_queue())
            .collect::<Result<Vec<_>>>()?;
        Ok(TunnelDevice { queues })
    }

    /// Writes one frame (virtio-net header, Ethernet, IPv4) to `queue`.
    pub fn write(&self, queue: usize, frame: &[u8]) -> io::Result<()> {
        let mut file = &self.queues[queue % self.queues.len()];
        file.write_all(frame)
    }
}

/// A plain datagram socket for interface ioctls, closed on drop.
struct IoctlSocket(libc::c_int);

impl IoctlSocket {
    fn new() -> Result<Self> {
        // SAFETY: socket(2) with constant arguments; the fd is owned by the
        // returned value and closed in its Drop.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        check(fd, "opening a socket for interface flags")?;
        Ok(IoctlSocket(fd))
    }
}

impl Drop for IoctlSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and open.
        unsafe { libc::close(self.0) };
    }
}

fn interface_flags(name: &str) -> Result<libc::c_short> {
    let socket = IoctlSocket::new()?;
    let mut req = if_request(name, 0);
    // SAFETY: SIOCGIFFLAGS reads and writes one ifreq.
    let rc = unsafe { libc::ioctl(socket.0, libc::SIOCGIFFLAGS, &mut req) };
    check(rc, &format!("reading the flags of {name}"))?;
    Ok(req.flags)
}

/// Brings the device up (the daemon, once `gateway_tunnel` is attached).
pub fn set_up() -> Result<()> {
    let socket = IoctlSocket::new()?;
    let mut req = if_request(TUNNEL_DEVICE, 0);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq.
    let rc = unsafe {
        let mut rc = libc::ioctl(socket.0, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(socket.0, libc::SIOCSIFFLAGS, &mut req);
        }
        rc
    };
    check(rc, &format!("bringing {TUNNEL_DEVICE} up"))
}
