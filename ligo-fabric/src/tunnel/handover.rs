//! Replacing a running tunnel process without losing a packet (an upgrade,
//! or a restart done by starting the new process first).
//!
//! WireGuard session keys cannot leave boringtun, so the new process makes
//! sessions of its own while the old one keeps serving, then takes the
//! sockets over:
//!
//! 1. The new process, finding the instance lock taken, connects to the old
//!    one's hand-over socket (`<wireguard_status_socket>.handover`) and
//!    receives, by SCM_RIGHTS, the old process's UDP sockets (same ports,
//!    same queues: nothing queued is lost) and one end of a datagram
//!    channel between the two, plus the old process's epoch.
//! 2. The new process takes the other epoch: the top bit of every session
//!    index it makes. Whoever reads a datagram whose receiver index carries
//!    the other epoch passes it over the channel; the other process
//!    decrypts it and writes it to the tunnel device (a shared, persistent
//!    device: both have queues on it).
//! 3. The new process handshakes with every peer (responses reach it over
//!    the channel), then asks the old one to switch: the old process's
//!    workers stop reading after the batch in hand, it says so with the
//!    number of datagrams it passed over the channel, and the new process's
//!    workers start once all of those are written out (so none is
//!    overtaken). Packets that arrived meanwhile wait in the socket buffers.
//! 4. For a while the old process still decrypts what peers had in flight
//!    on its sessions (passed over the channel); once the channel has been
//!    quiet for two seconds the new process says it is done, and the old
//!    one exits.
//!
//! If the new process goes away before saying it is done, the old one
//! carries on (resuming its workers if they had stopped) and handshakes
//! with every peer at once: a peer may already be sending on a session the
//! dead process made, and the new handshake moves it back to ours.

use std::{
    fs,
    io::{IoSlice, IoSliceMut, Read, Write},
    net::UdpSocket,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixDatagram, UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use tracing::{info, warn};

use super::{Inherited, Shared, StatusSource, Tunnel};

/// The new process asks the old one to stop reading the sockets.
const SWITCH: u8 = b'S';
/// The old process has stopped reading; followed by how many datagrams
/// it passed over the channel (u64, little-endian).
const PAUSED: u8 = b'P';
/// The new process no longer needs the old one.
const DONE: u8 = b'D';
/// How long the new process waits for its handshakes before switching.
const HANDSHAKES_WAIT: Duration = Duration::from_secs(5);
/// How long the new process waits to write out what the old one passed
/// before the switch.
const PASSED_WAIT: Duration = Duration::from_secs(1);
/// Time for the kernel's per-CPU queues to pass on what the old process
/// sent and wrote before the new one starts.
const SETTLE: Duration = Duration::from_millis(5);
/// The channel must be quiet this long before the old process may go.
const DRAIN_QUIET: Duration = Duration::from_secs(2);
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// Room for the fds of a large machine's workers.
const MAX_FDS: usize = 1 + 2 * 128;

pub fn socket_path(status_socket: &Path) -> PathBuf {
    super::status::beside(status_socket, ".handover")
}

/// Old process: accepts hand-over requests in the background. `done` is
/// set once a new process has taken over; the caller then exits.
pub fn serve(status_socket: &Path, source: StatusSource, done: Arc<AtomicBool>) -> Result<()> {
    let path = socket_path(status_socket);
    // The instance lock is held, so a file here is a dead process's socket.
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("ligo-wg-handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = give(conn, &source, &done) {
                    warn!(
                        error = format!("{e:#}"),
                        "hand-over to a new tunnel process failed; this one carries on"
                    );
                }
                if done.load(Ordering::SeqCst) {
                    break;
                }
            }
        })
        .context("starting the hand-over thread")?;
    Ok(())
}

fn give(mut conn: UnixStream, source: &StatusSource, done: &AtomicBool) -> Result<()> {
    let shared = source
        .running()
        .context("no tunnel runs here to hand over")?;
    let (mine, theirs) = UnixDatagram::pair().context("making the hand-over channel")?;
    let mut fds: Vec<RawFd> = vec![theirs.as_raw_fd()];
    fds.extend(shared.wireguard.iter().map(|s| s.socket.as_raw_fd()));
    fds.extend(shared.fabric.iter().map(|s| s.socket.as_raw_fd()));
    let header = [
        shared.epoch as u8,
        shared.wireguard.len() as u8,
        shared.fabric.len() as u8,
    ];
    sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[IoSlice::new(&header)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("passing the sockets to the new tunnel process")?;
    drop(theirs);
    shared.set_partner(Some(mine));
    info!(
        "a new tunnel process is taking over: it handshakes with every peer while we keep serving"
    );
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut byte = [0u8; 1];
    if conn.read_exact(&mut byte).is_err() || byte[0] != SWITCH {
        abandon(&shared);
        bail!("the new process went away before switching");
    }
    shared.pause_and_wait();
    // Our workers are parked: nothing more is passed on, so this count is
    // final. The new process writes all of it out before it reads the
    // sockets, or its own decryptions would overtake what we passed.
    let mut paused = [PAUSED; 9];
    paused[1..].copy_from_slice(&shared.forwarded.load(Ordering::SeqCst).to_le_bytes());
    if conn.write_all(&paused).is_err() {
        abandon(&shared);
        bail!("the new process went away at the switch");
    }
    info!("switched: the new tunnel process reads the sockets; we decrypt what was in flight on our sessions");
    if conn.read_exact(&mut byte).is_ok() && byte[0] == DONE {
        done.store(true, Ordering::SeqCst);
        info!("hand-over complete; this tunnel process exits");
        return Ok(());
    }
    abandon(&shared);
    bail!("the new process went away after the switch")
}

/// Back to serving alone after a hand-over that did not finish.
fn abandon(shared: &Shared) {
    shared.set_partner(None);
    shared.resume();
    shared.initiate_handshakes();
    warn!("hand-over abandoned: serving alone again, fresh handshakes sent to every peer");
}

/// The new process's side of a hand-over in progress.
pub struct Handover {
    control: UnixStream,
}

/// New process: asks the process serving `status_socket` to hand over;
/// returns what it passed (start the tunnel with it, then
/// [`Handover::complete`]). `None` when no process listens there.
pub fn request(status_socket: &Path) -> Result<Option<(Handover, Inherited)>> {
    let path = socket_path(status_socket);
    let Ok(control) = UnixStream::connect(&path) else {
        return Ok(None);
    };
    control.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut header = [0u8; 3];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut header)];
        let msg = recvmsg::<UnixAddr>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the old tunnel process's sockets")?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for cmsg in msg.cmsgs().context("reading the passed descriptors")? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in our
                // table just now; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    let [epoch, wireguard, fabric] = header;
    let (wireguard, fabric) = (usize::from(wireguard), usize::from(fabric));
    if bytes != 3 || fds.len() != 1 + wireguard + fabric || epoch > 1 {
        bail!(
            "the old tunnel process sent {} bytes and {} descriptors; expected 3 and {}",
            bytes,
            fds.len(),
            1 + wireguard + fabric
        );
    }
    let mut fds = fds.into_iter();
    let partner = UnixDatagram::from(fds.next().context("no channel")?);
    let wireguard: Vec<UdpSocket> = fds.by_ref().take(wireguard).map(UdpSocket::from).collect();
    let fabric: Vec<UdpSocket> = fds.map(UdpSocket::from).collect();
    Ok(Some((
        Handover { control },
        Inherited {
            epoch: 1 - u32::from(epoch),
            wireguard,
            fabric,
            partner,
        },
    )))
}

impl Handover {
    /// Runs steps 3 and 4 with `tunnel` (started from what was inherited).
    pub fn complete(mut self, tunnel: &Tunnel) -> Result<()> {
        tunnel.initiate_handshakes();
        let started = Instant::now();
        while !tunnel.sessions_ready() && started.elapsed() < HANDSHAKES_WAIT {
            std::thread::sleep(Duration::from_millis(10));
        }
        if tunnel.sessions_ready() {
            info!("sessions with every peer are up; switching");
        } else {
            warn!(
                seconds = HANDSHAKES_WAIT.as_secs(),
                "not every peer completed a handshake with us; switching anyway (their packets wait for it)"
            );
        }
        self.control
            .write_all(&[SWITCH])
            .context("asking the old tunnel process to switch")?;
        let mut paused = [0u8; 9];
        self.control
            .read_exact(&mut paused)
            .context("waiting for the old tunnel process to switch")?;
        let [answer, count @ ..] = paused;
        if answer != PAUSED {
            bail!("the old tunnel process answered {answer} to the switch");
        }
        let passed = u64::from_le_bytes(count);
        if !tunnel.wait_partner_delivered(passed, PASSED_WAIT) {
            warn!(
                passed,
                "what the old tunnel process passed on was not all written out in time; switching anyway (a few packets may arrive out of order)"
            );
        }
        // What either process wrote may still sit in the kernel's per-CPU
        // receive queues of the next hop; ours would overtake it from
        // another CPU. Meanwhile arrivals wait in the socket buffers.
        std::thread::sleep(SETTLE);
        tunnel.resume();
        let switched = Instant::now();
        while tunnel.partner_quiet_for() < DRAIN_QUIET && switched.elapsed() < DRAIN_MAX {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.control.write_all(&[DONE])?;
        tunnel.end_partnership();
        info!(
            handshakes_ms = switched.duration_since(started).as_millis() as u64,
            drained_ms = switched.elapsed().as_millis() as u64,
            "took over from the old tunnel process"
        );
        Ok(())
    }
}
