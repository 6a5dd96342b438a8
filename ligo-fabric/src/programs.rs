//! Loading the eBPF object and attaching its programs for a role.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use tracing::{info, warn};

use crate::{config::IngressHook, tunnel::device::TUNNEL_DEVICE};

/// The programs, built by build.rs from `ligo-fabric-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ligo-fabric-ebpf.o"));

pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

/// Loads the object with its maps pinned under `pin_dir`; maps already
/// pinned there (by an earlier run) are reused rather than recreated.
pub fn load(pin_dir: &Path) -> Result<Ebpf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)
        .with_context(|| format!("creating pin_dir {}", pin_dir.display()))?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the eBPF object with maps pinned in {}: pin_dir must be on a bpf filesystem \
                 (mount -t bpf bpf {}) and the daemon needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
                pin_dir.display(),
                pin_dir.display()
            )
        })
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(program)
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(program)
}

/// Where a program's pinned link at an interface lives. Pinned links keep
/// the programs attached while no daemon runs (restarts, crashes,
/// upgrades); a starting daemon swaps its own programs into them.
fn link_path(pin_dir: &Path, program: &str, interface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{program}@{interface}"))
}

/// The hook a program attaches to.
#[derive(Clone, Copy, Debug)]
enum Hook {
    Tc(TcAttachType),
    Xdp,
}

/// What attaching found at the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A pinned link from an earlier daemon: its program was replaced
    /// atomically (`bpf_link_update`), so no packet saw neither program.
    Adopted,
    /// Nothing was attached; a new pinned link was made.
    New,
}

/// Attaches `program` at `hook` of `interface` through a pinned link.
fn attach_pinned(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    program: &str,
    interface: &str,
    ifindex: u32,
    hook: Hook,
) -> Result<(PathBuf, Attached)> {
    let path = link_path(pin_dir, program, interface);
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let what = format!("{program} at {interface} ({hook:?})");
    if path.exists() {
        match adopt(ebpf, &path, program, hook) {
            Ok(()) => return Ok((path, Attached::Adopted)),
            Err(e) => {
                // A link left by a daemon whose interface went away (or of
                // another kind): replace it.
                warn!(link = %path.display(), error = format!("{e:#}"), "pinned link not reusable; attaching anew");
                fs::remove_file(&path)
                    .with_context(|| format!("removing stale link {}", path.display()))?;
            }
        }
    }
    let link: FdLink = match hook {
        Hook::Tc(attach_type) => {
            let prog = classifier(ebpf, program)?;
            let id = prog
                .attach(
                    ifindex,
                    TcAttach::Tcx {
                        attach_type,
                        order: LinkOrder::default(),
                    },
                )
                .with_context(|| format!("attaching {what} (TCX, Linux >= 6.6)"))?;
            prog.take_link(id)?.try_into()?
        }
        Hook::Xdp => {
            let prog = xdp_program(ebpf, program)?;
            let id = match prog.attach(ifindex, XdpMode::Driver) {
                Ok(id) => id,
                Err(native) => {
                    warn!(interface, error = %native, "native XDP unavailable, falling back to generic XDP (slower); consider ingress = \"tc\"");
                    prog.attach(ifindex, XdpMode::Skb)
                        .with_context(|| format!("attaching {what} in generic mode"))?
                }
            };
            prog.take_link(id)?
                .try_into()
                .with_context(|| format!("{what}: the kernel gave no link to pin"))?
        }
    };
    link.pin(&path)
        .with_context(|| format!("pinning {what} at {}", path.display()))?;
    Ok((path, Attached::New))
}

/// Swaps our program into the pinned link at `path`.
fn adopt(ebpf: &mut Ebpf, path: &Path, program: &str, hook: Hook) -> Result<()> {
    let link = FdLink::from(PinnedLink::from_pin(path)?);
    match hook {
        Hook::Tc(_) => {
            let prog = classifier(ebpf, program)?;
            let id = prog.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            // The pin keeps the link; our handle may close.
            drop(prog.take_link(id)?);
        }
        Hook::Xdp => {
            let prog = xdp_program(ebpf, program)?;
            let id = prog.attach_to_link(XdpLink::try_from(link)?)?;
            drop(prog.take_link(id)?);
        }
    }
    Ok(())
}

/// Removes pinned links other than `keep` (a changed ingress hook, a
/// removed role): unpinning the last reference detaches the program.
fn remove_other_links(pin_dir: &Path, keep: &[PathBuf]) -> Result<usize> {
    let dir = pin_dir.join("links");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry?.path();
        if !keep.contains(&path) {
            fs::remove_file(&path).with_context(|| format!("removing link {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes every pinned link under `pin_dir`, detaching the programs.
pub fn remove_links(pin_dir: &Path) -> Result<usize> {
    let removed = remove_other_links(pin_dir, &[])?;
    let _ = fs::remove_dir(pin_dir.join("links"));
    Ok(removed)
}

fn report(attached: &[(PathBuf, Attached)], removed: usize) -> Attached {
    let adopted = attached
        .iter()
        .filter(|(_, a)| *a == Attached::Adopted)
        .count();
    info!(
        adopted,
        new = attached.len() - adopted,
        removed,
        "programs attached through pinned links"
    );
    if adopted > 0 {
        Attached::Adopted
    } else {
        Attached::New
    }
}

/// Node role: remap+encapsulate on uplink egress, decapsulate+remap on
/// uplink ingress with the chosen hook (XDP in native mode when the driver
/// has it).
pub fn attach_node(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    uplink: &str,
    uplink_index: u32,
    ingress: IngressHook,
) -> Result<Attached> {
    let mut attached = vec![attach_pinned(
        ebpf,
        pin_dir,
        "node_egress",
        uplink,
        uplink_index,
        Hook::Tc(TcAttachType::Egress),
    )?];
    let (program, hook) = if ingress == IngressHook::Tc {
        ("node_ingress_tc", Hook::Tc(TcAttachType::Ingress))
    } else {
        ("node_ingress", Hook::Xdp)
    };
    attached.push(attach_pinned(
        ebpf,
        pin_dir,
        program,
        uplink,
        uplink_index,
        hook,
    )?);
    info!(interface = uplink, hook = ?hook, "node ingress attached");
    let keep: Vec<PathBuf> = attached.iter().map(|(p, _)| p.clone()).collect();
    let removed = remove_other_links(pin_dir, &keep)?;
    Ok(report(&attached, removed))
}

/// Gateway role: one TC ingress program on each gateway interface, and
/// `gateway_tunnel` on the tunnel device (index `tunnel_device`) when there
/// are WireGuard peers.
pub fn attach_gateway(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interfaces: &[(&str, u32)],
    tunnel_device: Option<u32>,
) -> Result<Attached> {
    let mut attached = Vec::new();
    let mut done = Vec::new();
    for (name, index) in interfaces {
        if done.contains(index) {
            continue;
        }
        attached.push(attach_pinned(
            ebpf,
            pin_dir,
            "gateway",
            name,
            *index,
            Hook::Tc(TcAttachType::Ingress),
        )?);
        done.push(*index);
    }
    if let Some(index) = tunnel_device {
        attached.push(attach_pinned(
            ebpf,
            pin_dir,
            "gateway_tunnel",
            TUNNEL_DEVICE,
            index,
            Hook::Tc(TcAttachType::Ingress),
        )?);
    }
    let keep: Vec<PathBuf> = attached.iter().map(|(p, _)| p.clone()).collect();
    let removed = remove_other_links(pin_dir, &keep)?;
    Ok(report(&attached, removed))
}

/// The object loaded with its maps pinned in a private bpffs mounted for
/// the purpose (unmounted on drop): for tests and benchmarks that run the
/// programs with BPF_PROG_TEST_RUN without touching a running daemon.
pub struct ScratchLoad {
    // Field order matters: the programs and maps close before the unmount.
    pub ebpf: Ebpf,
    mount: ScratchMount,
}

struct ScratchMount {
    dir: std::path::PathBuf,
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_dir(&self.dir);
    }
}

impl ScratchLoad {
    /// `tag` keeps concurrent scratch loads of one process apart.
    pub fn new(tag: &str) -> Result<Self> {
        let dir =
            std::path::PathBuf::from(format!("/run/ligo-scratch-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let mount = ScratchMount { dir };
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount.dir)
            .status()
            .context("running mount")?;
        anyhow::ensure!(
            status.success(),
            "mounting a bpffs at {}",
            mount.dir.display()
        );
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&mount.dir)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        Ok(Self { ebpf, mount })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.mount.dir
    }

    /// A TC program by name, loaded into the kernel.
    pub fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        classifier(&mut self.ebpf, name)
    }

    /// An XDP program by name, loaded into the kernel.
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, name)
    }
}
