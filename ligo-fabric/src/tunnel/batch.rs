//! Batched UDP sends: WireGuard datagrams to a peer go out as one UDP GSO
//! send (`UDP_SEGMENT`, via quinn-udp) per run of equal-sized datagrams.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
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
    pub fn reserve(
        &mut self,
        destination: SocketAddr,
        len: usize,
        sender: &BatchSocket,
    ) -> &mut [u8] {
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
    pub fn flush(&mut self, sender: &BatchSocket) -> usize {
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
pub struct BatchSocket {
    pub socket: UdpSocket,
    pub state: UdpSocketState,
}

impl BatchSocket {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        // quinn-udp makes the socket non-blocking: recvmmsg then returns
        // what is queued at once, and workers wait in `wait_readable`.
        let state = UdpSocketState::new((&socket).into())?;
        Ok(BatchSocket { socket, state })
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
