//! Loading the eBPF object and attaching its programs for a role.

use std::{fs, os::unix::fs::DirBuilderExt, path::Path};

use anyhow::{Context, Result};
use aya::{
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use tracing::{info, warn};

use crate::config::IngressHook;

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

/// Node role: remap+encapsulate on uplink egress, decapsulate+remap on
/// uplink ingress with the chosen hook (XDP in native mode when the driver
/// has it).
pub fn attach_node(
    ebpf: &mut Ebpf,
    uplink: &str,
    uplink_index: u32,
    ingress: IngressHook,
) -> Result<()> {
    classifier(ebpf, "node_egress")?
        .attach(uplink_index, TcAttachType::Egress)
        .with_context(|| format!("attaching node_egress to {uplink} egress"))?;
    if ingress == IngressHook::Tc {
        classifier(ebpf, "node_ingress_tc")?
            .attach(uplink_index, TcAttachType::Ingress)
            .with_context(|| format!("attaching node_ingress_tc to {uplink} ingress"))?;
        info!(interface = uplink, "node ingress at TC");
        return Ok(());
    }
    let xdp = xdp_program(ebpf, "node_ingress")?;
    if let Err(native) = xdp.attach(uplink_index, XdpMode::Driver) {
        warn!(interface = uplink, error = %native, "native XDP unavailable, falling back to generic XDP (slower); consider ingress = \"tc\"");
        xdp.attach(uplink_index, XdpMode::Skb)
            .with_context(|| format!("attaching node_ingress to {uplink} in generic XDP mode"))?;
    }
    info!(interface = uplink, "node ingress at XDP");
    Ok(())
}

/// Gateway role: one TC ingress program on each gateway interface.
pub fn attach_gateway(ebpf: &mut Ebpf, interfaces: &[(&str, u32)]) -> Result<()> {
    let program = classifier(ebpf, "gateway")?;
    let mut done = Vec::new();
    for (name, index) in interfaces {
        if done.contains(index) {
            continue;
        }
        program
            .attach(*index, TcAttachType::Ingress)
            .with_context(|| format!("attaching gateway to {name} ingress"))?;
        done.push(*index);
    }
    Ok(())
}

/// Attaches `gateway_tunnel` to the WireGuard tunnel device's ingress.
pub fn attach_tunnel_device(ebpf: &mut Ebpf, ifindex: u32) -> Result<()> {
    classifier(ebpf, "gateway_tunnel")?
        .attach(ifindex, TcAttachType::Ingress)
        .context("attaching gateway_tunnel to the tunnel device")?;
    Ok(())
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
