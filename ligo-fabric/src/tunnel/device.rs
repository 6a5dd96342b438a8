//! The gateway's tunnel device: a multi-queue TAP with virtio-net headers.
//! The inbound workers write decrypted packets into it, coalesced TCP
//! segments as one GSO super-packet per write; the `gateway_tunnel` program
//! on its ingress wraps them in VXLAN toward the owning node. The kernel
//! thus carries one GSO packet node-ward where it would otherwise carry
//! dozens of small ones.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::fd::AsRawFd,
};

use anyhow::{Context, Result};

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

/// The device with one queue per inbound worker. Closing the queues
/// removes it.
pub struct TunnelDevice {
    pub ifindex: u32,
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

impl TunnelDevice {
    pub fn create(queues: usize) -> Result<Self> {
        let mut files = Vec::new();
        for _ in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun (is the tun module available?)")?;
            let flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
                    as libc::c_short;
            let mut req = if_request(TUNNEL_DEVICE, flags);
            // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is
            // (name, flags, padding to the kernel's size).
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            check(rc, &format!("creating tunnel device {TUNNEL_DEVICE}"))?;
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
            files.push(file);
        }
        set_up(TUNNEL_DEVICE)?;
        let ifindex = nix::net::if_::if_nametoindex(TUNNEL_DEVICE)
            .with_context(|| format!("{TUNNEL_DEVICE} has no interface index"))?;
        Ok(TunnelDevice {
            ifindex,
            queues: files,
        })
    }

    /// Writes one frame (virtio-net header, Ethernet, IPv4) to `queue`.
    pub fn write(&self, queue: usize, frame: &[u8]) -> io::Result<()> {
        let mut file = &self.queues[queue % self.queues.len()];
        file.write_all(frame)
    }
}

fn set_up(name: &str) -> Result<()> {
    // SAFETY: a plain datagram socket used only for interface ioctls; it is
    // closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    check(fd, "opening a socket for interface flags")?;
    let mut req = if_request(name, 0);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq.
    let result = unsafe {
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req);
        }
        rc
    };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    check(result, &format!("bringing {name} up"))
}
