//! Batched UDP sends: WireGuard datagrams to a peer go out as one UDP GSO
//! send (`UDP_SEGMENT`, via quinn-udp) per run of equal-sized datagrams;
//! frames to nodes go out with one `sendmmsg` per batch, as separate
//! datagrams (a node program must see one frame per packet, and over veth a
//! GSO send would reach it as one super-frame).

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
};

use quinn_udp::{Transmit, UdpSocketState};

/// A run of datagrams for one destination, all `segment` bytes long but
/// the last, which may be shorter.
pub struct GsoBatch {
    buf: Vec<u8>,
    destination: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
    max_segments: usize,
}

/// Kernel limit on the bytes of one UDP GSO send.
const GSO_MAX_BYTES: usize = 65_000;

impl GsoBatch {
    pub fn new(max_segments: usize) -> Self {
        GsoBatch {
            buf: Vec::with_capacity(GSO_MAX_BYTES + 2048),
            destination: None,
            segment: 0,
            count: 0,
            closed: false,
            max_segments: max_segments.max(1),
        }
    }

    /// Room for a datagram of `len` bytes to `destination`; sends what is
    /// batched first when the new datagram cannot join it. The caller
    /// writes into the slice and then calls [`GsoBatch::commit`].
    pub fn reserve(&mut self, destination: SocketAddr, len: usize, sender: &Sender) -> &mut [u8] {
        let joins = self.count == 0
            || (self.destination == Some(destination)
                && !self.closed
                && len <= self.segment
                && self.count < self.max_segments
                && self.buf.len() + len <= GSO_MAX_BYTES);
        if !joins {
            self.flush(sender);
        }
        if self.count == 0 {
            self.destination = Some(destination);
            self.segment = len;
        }
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        &mut self.buf[start..]
    }

    /// Keeps the `len` bytes written at the reserved place (`len` may be
    /// less than reserved), or drops them when `len` is 0.
    pub fn commit(&mut self, reserved: usize, len: usize) {
        let start = self.buf.len() - reserved;
        self.buf.truncate(start + len);
        if len == 0 {
            if self.count == 0 {
                self.destination = None;
            }
            return;
        }
        self.count += 1;
        if len < self.segment {
            self.closed = true;
        }
    }

    /// Sends what is batched. Returns the datagrams handed to the kernel.
    pub fn flush(&mut self, sender: &Sender) -> usize {
        let sent = match self.destination {
            Some(destination) if self.count > 0 => {
                let transmit = Transmit {
                    destination,
                    ecn: None,
                    contents: &self.buf,
                    segment_size: (self.count > 1).then_some(self.segment),
                    src_ip: None,
                };
                match sender.send(&transmit) {
                    Ok(()) => self.count,
                    Err(_) => 0,
                }
            }
            _ => 0,
        };
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.destination = None;
        sent
    }
}

/// A UDP socket with quinn-udp's state (GSO/GRO support, DF set).
pub struct Sender {
    pub socket: UdpSocket,
    pub state: UdpSocketState,
}

impl Sender {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        // quinn-udp makes the socket non-blocking: recvmmsg then returns
        // what is queued at once, and workers wait in `wait_readable`.
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Sender { socket, state })
    }

    /// Waits until a datagram is queued or `timeout_ms` passes (so workers
    /// notice shutdown). Returns whether the socket is readable.
    pub fn wait_readable(&self, timeout_ms: i32) -> bool {
        wait_for(&self.socket, libc::POLLIN, timeout_ms)
    }

    /// Sends, waiting for room in the socket buffer when it is full (the
    /// socket is non-blocking): backpressure rather than loss.
    pub fn send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        loop {
            match self.state.try_send((&self.socket).into(), transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_for(&self.socket, libc::POLLOUT, 100) {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    pub fn send_one(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        self.send(&Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        })
    }
}

/// Frames for nodes, sent with one `sendmmsg` call per flush.
#[derive(Default)]
pub struct FrameBatch {
    buf: Vec<u8>,
    frames: Vec<(SocketAddrV4, usize, usize)>,
}

/// Frames per `sendmmsg` call (the kernel caps one call at UIO_MAXIOV).
const MAX_FRAMES: usize = 64;

impl FrameBatch {
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Appends a frame made of `header` then `body`.
    pub fn push(&mut self, socket: &UdpSocket, to: SocketAddrV4, header: &[u8], body: &[u8]) {
        if self.frames.len() == MAX_FRAMES {
            self.flush(socket);
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(header);
        self.buf.extend_from_slice(body);
        self.frames.push((to, start, self.buf.len()));
    }

    /// Sends every frame; returns how many the kernel took.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        let mut sent = 0;
        while sent < self.frames.len() {
            match send_frames(socket, &self.buf, &self.frames[sent..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n,
            }
        }
        self.buf.clear();
        self.frames.clear();
        sent
    }
}

/// Polls `socket` for `events` up to `timeout_ms`.
fn wait_for(socket: &UdpSocket, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives across the call.
    let n = unsafe { libc::poll(&mut fds, 1, timeout_ms) };
    n > 0 && fds.revents & events != 0
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn send_frames(
    socket: &UdpSocket,
    buf: &[u8],
    frames: &[(SocketAddrV4, usize, usize)],
) -> io::Result<usize> {
    let mut addrs: Vec<libc::sockaddr_in> = frames.iter().map(|f| sockaddr(f.0)).collect();
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|&(_, start, end)| libc::iovec {
            iov_base: buf[start..end].as_ptr() as *mut libc::c_void,
            iov_len: end - start,
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .map(|(addr, iov)| {
            // SAFETY: msghdr is plain old data; all-zero is its empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (addr as *mut libc::sockaddr_in).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = iov;
            msg.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            }
        })
        .collect();
    loop {
        // SAFETY: every header points at an address and an iovec that live
        // in `addrs`/`iovs` until this call returns, and each iovec at bytes
        // of `buf`, which the kernel only reads.
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                0,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if wait_for(socket, libc::POLLOUT, 100) => {}
            _ => return Err(e),
        }
    }
}
