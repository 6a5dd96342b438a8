//! Cost of the fabric programs per invocation in real traffic, from the
//! kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`), against a
//! do-nothing program attached first at every hook where a fabric program
//! runs, so both see exactly the same packets (TCX runs it, then ours).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::programs::{loaded_programs, LinkOrder, TcAttach, TcAttachType};
use ligo_fabric::programs::ScratchLoad;
use xtask::netns::{join, within};

/// One hook of the path: where a fabric program runs.
pub struct Hook {
    pub netns: String,
    pub interface: &'static str,
    pub direction: TcAttachType,
    /// The fabric program the baseline there stands beside.
    pub program: &'static str,
}

/// The do-nothing programs, attached; dropping this detaches them.
pub struct Baselines {
    // Each owns its program, link and private bpffs.
    _loads: Vec<ScratchLoad>,
    /// Baseline program id -> the fabric program it stands beside.
    beside: BTreeMap<u32, &'static str>,
}

pub fn attach_baselines(hooks: &[Hook]) -> Result<Baselines> {
    let mut loads = vec![];
    let mut beside = BTreeMap::new();
    for (i, hook) in hooks.iter().enumerate() {
        let (interface, direction) = (hook.interface, hook.direction);
        let tag = format!("base{i}");
        let mut load = join(within(&hook.netns, move || {
            let index = nix::net::if_::if_nametoindex(interface)
                .with_context(|| format!("no interface {interface}"))?;
            let mut load = ScratchLoad::new(&tag)?;
            load.classifier("tc_next")?.attach(
                index,
                TcAttach::Tcx {
                    attach_type: direction,
                    order: LinkOrder::first(),
                },
            )?;
            Ok(load)
        }))
        .with_context(|| format!("attaching the baseline at {} {interface}", hook.netns))?;
        let id = load.classifier("tc_next")?.info()?.id();
        beside.insert(id, hook.program);
        loads.push(load);
    }
    Ok(Baselines {
        _loads: loads,
        beside,
    })
}

/// Turns the kernel's per-program statistics on for its lifetime.
struct StatsEnabled {
    previous: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsEnabled {
    fn new() -> Result<Self> {
        let previous = std::fs::read_to_string(STATS_SYSCTL)?.trim().to_owned();
        std::fs::write(STATS_SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, &self.previous);
    }
}

/// (name, invocations, run time ns) of every loaded program, by id.
fn run_stats() -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info?;
        let name = info.name_as_str().unwrap_or_default().to_owned();
        out.insert(
            info.id(),
            (name, info.run_count(), info.run_time().as_nanos() as u64),
        );
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct InTrafficCost {
    pub program: &'static str,
    pub invocations: u64,
    pub ns: f64,
    pub baseline_ns: f64,
}

/// Runs `work` with statistics on; per fabric program: its invocations and
/// mean run time, and the mean run time of the baselines beside it.
pub fn measure(
    baselines: &Baselines,
    programs: &[&'static str],
    work: impl FnOnce() -> Result<()>,
) -> Result<Vec<InTrafficCost>> {
    let stats = StatsEnabled::new()?;
    let before = run_stats()?;
    work()?;
    let after = run_stats()?;
    drop(stats);
    let delta = |id: &u32| -> (u64, u64) {
        match (before.get(id), after.get(id)) {
            (Some((_, c0, t0)), Some((_, c1, t1))) => (c1 - c0, t1 - t0),
            (None, Some((_, c1, t1))) => (*c1, *t1),
            _ => (0, 0),
        }
    };
    let mut out = vec![];
    for program in programs {
        let (mut count, mut time, mut base_count, mut base_time) = (0, 0, 0, 0);
        for (id, (name, _, _)) in &after {
            if baselines.beside.get(id) == Some(program) {
                let (c, t) = delta(id);
                base_count += c;
                base_time += t;
            } else if name == program {
                let (c, t) = delta(id);
                count += c;
                time += t;
            }
        }
        out.push(InTrafficCost {
            program,
            invocations: count,
            ns: time as f64 / count.max(1) as f64,
            baseline_ns: base_time as f64 / base_count.max(1) as f64,
        });
    }
    Ok(out)
}

/// Every hook the fabric programs run at between the client pod (cluster A,
/// node 1) and the server pod (cluster B, node 2), both directions.
pub fn fabric_hooks(bed: &xtask::testbed::Testbed) -> Vec<Hook> {
    let (a, b) = (&bed.scenario.a, &bed.scenario.b);
    let hook = |netns: String, interface, direction, program| Hook {
        netns,
        interface,
        direction,
        program,
    };
    vec![
        hook(bed.ns(a, "n1"), "eth0", TcAttachType::Egress, "node_egress"),
        hook(bed.ns(b, "n2"), "eth0", TcAttachType::Egress, "node_egress"),
        hook(bed.ns(a, "gw"), "eth0", TcAttachType::Ingress, "gateway"),
        hook(bed.ns(a, "gw"), "eth1", TcAttachType::Ingress, "gateway"),
        hook(bed.ns(b, "gw"), "eth0", TcAttachType::Ingress, "gateway"),
        hook(bed.ns(b, "gw"), "eth1", TcAttachType::Ingress, "gateway"),
        hook(
            bed.ns(b, "n2"),
            "eth0",
            TcAttachType::Ingress,
            "node_ingress_tc",
        ),
        hook(
            bed.ns(a, "n1"),
            "eth0",
            TcAttachType::Ingress,
            "node_ingress_tc",
        ),
    ]
}

pub const FABRIC_PROGRAMS: [&str; 3] = ["node_egress", "gateway", "node_ingress_tc"];
