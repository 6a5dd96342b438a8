//! `ligo-bench`: builds each path on a fresh testbed and measures it in the
//! same run, then writes a Markdown report with an SVG chart. Run through
//! `cargo xtask bench [--quick]` (root: namespaces and eBPF).

mod control;
mod endtoend;
mod in_traffic;
mod kubernetes;
mod offload;
mod paths;
mod programs;
mod report;
mod stats;

use std::{fs, path::PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use paths::PathKind;
use report::{PathFigures, Report};
use stats::Samples;

#[derive(Parser)]
struct Args {
    /// A short smoke run (what CI executes); its report is not for quoting.
    #[arg(long)]
    quick: bool,
    /// The ligo-fabric daemon binary the testbed runs.
    #[arg(long)]
    daemon: PathBuf,
    /// Where the report and chart go.
    #[arg(long)]
    out: PathBuf,
    /// Measure only these paths (names as in the report), e.g. while
    /// working on one of them.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Skip the program costs and control-plane figures.
    #[arg(long)]
    paths_only: bool,
    /// Measure the Kubernetes half only (peering, unpeering, requests,
    /// memory with many peers), in a report of its own.
    #[arg(long)]
    kubernetes: bool,
    /// Measure the big node only (100 and 1,000 pods offloaded at once,
    /// controller memory per mirrored pod, API requests per pod), in a
    /// report of its own.
    #[arg(long)]
    offload: bool,
}

struct Settings {
    repetitions: u32,
    tcp_seconds: u32,
    udp_seconds: u32,
    latency_samples: u64,
    single_runs: u32,
    repeat: u32,
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

/// Per fabric program: ns per invocation, and the do-nothing beside it.
type InTraffic = std::collections::BTreeMap<&'static str, (Samples, Samples, u64)>;

fn measure_path(
    kind: PathKind,
    rep: u32,
    daemon: &std::path::Path,
    s: &Settings,
    figures: &mut PathFigures,
    in_traffic: &mut InTraffic,
) -> Result<()> {
    let tag = match kind {
        PathKind::Direct => "dir",
        PathKind::KernelReference => "ref",
        PathKind::LigoPlain => "tc",
        PathKind::LigoPlainXdp => "xdp",
        PathKind::LigoWireguard => "wg",
        PathKind::BoringtunCli => "btc",
    };
    let prefix = format!("lb-{tag}{rep}");
    let (mut bed, client, server) =
        paths::build(kind, &prefix, daemon).with_context(|| format!("building {}", kind.name()))?;
    let dst = paths::server_address(&bed, kind, &server);
    let result = (|| -> Result<()> {
        xtask::traffic::ping(&client, dst, 1)
            .with_context(|| format!("{} path does not carry traffic", kind.name()))?;
        let one = endtoend::tcp_throughput(&client, &server, dst, 1, s.tcp_seconds)?;
        figures.tcp1_gbps.push(one.gbit_per_s);
        figures.cpu_s_per_gbit.push(one.cpu_s_per_gbit);
        figures
            .core_busy_pct
            .resize(one.core_busy_pct.len(), Samples::default());
        for (samples, busy) in figures.core_busy_pct.iter_mut().zip(&one.core_busy_pct) {
            samples.push(*busy);
        }
        figures
            .tcp4_gbps
            .push(endtoend::tcp_throughput(&client, &server, dst, 4, s.tcp_seconds)?.gbit_per_s);
        figures
            .udp_kpps
            .push(endtoend::udp_pps(&client, &server, dst, s.udp_seconds)? / 1e3);
        let latency = endtoend::latency(&client, &server, dst, s.latency_samples)?;
        figures.p50_us.push(latency.p50_us);
        figures.p99_us.push(latency.p99_us);
        figures.p999_us.push(latency.p999_us);
        if kind == PathKind::LigoPlain {
            // A separate transfer, so the baselines do not weigh on the
            // throughput figures above.
            let baselines = in_traffic::attach_baselines(&in_traffic::fabric_hooks(&bed))?;
            let costs = in_traffic::measure(&baselines, &in_traffic::FABRIC_PROGRAMS, || {
                endtoend::tcp_throughput(&client, &server, dst, 1, s.udp_seconds).map(drop)
            })?;
            for c in costs {
                let entry = in_traffic.entry(c.program).or_default();
                entry.0.push(c.ns);
                entry.1.push(c.baseline_ns);
                entry.2 = c.invocations;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", bed.lab.logs());
    }
    bed.lab.down()?;
    result
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("the bench builds network namespaces and loads eBPF programs: run it as root");
    }
    let s = if args.quick {
        Settings {
            repetitions: 1,
            tcp_seconds: 2,
            udp_seconds: 2,
            latency_samples: 2_000,
            single_runs: 20_000,
            repeat: 100_000,
        }
    } else {
        Settings {
            repetitions: 5,
            tcp_seconds: 10,
            udp_seconds: 5,
            latency_samples: 100_000,
            single_runs: 1_000_000,
            repeat: 1_000_000,
        }
    };

    if args.kubernetes {
        return kubernetes_report(&args);
    }
    if args.offload {
        return offload_report(&args);
    }
    let mut paths: Vec<(PathKind, PathFigures)> = PathKind::ALL
        .iter()
        .filter(|k| args.paths.is_empty() || args.paths.iter().any(|p| p == k.name()))
        .map(|k| (*k, PathFigures::default()))
        .collect();
    let mut change_to_packet_ms = Samples::default();
    let mut apply_10k_ms = Samples::default();
    let mut in_traffic = InTraffic::new();
    for rep in 0..s.repetitions {
        // Paths interleave within each repetition, so slow phases of a
        // shared machine hit every path alike.
        for (kind, figures) in paths.iter_mut() {
            eprintln!(
                "bench: repetition {}/{}: {}",
                rep + 1,
                s.repetitions,
                kind.name()
            );
            measure_path(*kind, rep, &args.daemon, &s, figures, &mut in_traffic)?;
        }
        if args.paths_only {
            continue;
        }
        let (mut bed, client, server) =
            paths::build(PathKind::LigoPlain, &format!("lb-ctl{rep}"), &args.daemon)?;
        let change = control::config_change_to_first_packet_ms(&bed, &client, &server);
        bed.lab.down()?;
        change_to_packet_ms.push(change?);
        apply_10k_ms.push(programs::apply_time_ms(10_000)?);
    }
    let (program_costs, lookup) = if args.paths_only {
        (vec![], vec![])
    } else {
        eprintln!("bench: program costs");
        (
            programs::costs(s.single_runs, s.repeat)?,
            programs::lookup_scaling(&[10, 1_000, 10_000], s.single_runs / 4)?,
        )
    };

    let date = today()?;
    let machine = machine();
    let report = Report {
        title: format!("Ligo bench, {date}{}", if args.quick { " (quick smoke run)" } else { "" }),
        machine,
        command: format!("cargo xtask bench{}", if args.quick { " --quick" } else { "" }),
        settings: format!(
            "{} repetition(s); iperf3 TCP {} s, UDP {} s; {} latency samples; {} single program runs, {} repeats",
            s.repetitions, s.tcp_seconds, s.udp_seconds, s.latency_samples, s.single_runs, s.repeat
        ),
        paths,
        program_costs,
        in_traffic: in_traffic.into_iter().map(|(p, (ns, base, n))| (p, ns, base, n)).collect(),
        lookup,
        apply_10k_ms,
        change_to_packet_ms,
    };
    fs::create_dir_all(&args.out)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let stem = format!(
        "{date}-x86_64-{cores}core{}",
        if args.quick { "-quick" } else { "" }
    );
    let chart = format!("{stem}.svg");
    report.chart(&args.out.join(&chart))?;
    let md = report.markdown(&chart);
    let md_path = args.out.join(format!("{stem}.md"));
    fs::write(&md_path, &md)?;
    println!("{md}");
    eprintln!("bench: report written to {}", md_path.display());
    Ok(())
}

fn today() -> Result<String> {
    Ok(String::from_utf8_lossy(
        &std::process::Command::new("date")
            .arg("+%Y-%m-%d")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned())
}

/// `--kubernetes`: its own report, `<date>-kubernetes-x86_64-<n>core.md`.
fn kubernetes_report(args: &Args) -> Result<()> {
    let (repetitions, peers) = if args.quick { (1, 10) } else { (5, 100) };
    let figures = kubernetes::measure(repetitions, peers)?;
    let date = today()?;
    let md = kubernetes::markdown(
        &figures,
        &title("Kubernetes", &date, args.quick),
        &machine(),
        &command("--kubernetes", args.quick),
    );
    write_report(args, "kubernetes", &date, &md)
}

/// `--offload`: its own report, `<date>-offload-x86_64-<n>core.md`.
fn offload_report(args: &Args) -> Result<()> {
    let (sizes, repetitions): (&[usize], u32) = if args.quick {
        (&[20], 1)
    } else {
        (&[100, 1000], 3)
    };
    let figures = offload::measure(sizes, repetitions)?;
    let date = today()?;
    let md = offload::markdown(
        &figures,
        &title("the big node", &date, args.quick),
        &machine(),
        &command("--offload", args.quick),
    );
    write_report(args, "offload", &date, &md)
}

fn title(what: &str, date: &str, quick: bool) -> String {
    format!(
        "Ligo bench, {what}, {date}{}",
        if quick { " (quick smoke run)" } else { "" }
    )
}

fn command(flag: &str, quick: bool) -> String {
    format!(
        "cargo xtask bench {flag}{}",
        if quick { " --quick" } else { "" }
    )
}

fn write_report(args: &Args, kind: &str, date: &str, md: &str) -> Result<()> {
    fs::create_dir_all(&args.out)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let path = args.out.join(format!(
        "{date}-{kind}-x86_64-{cores}core{}.md",
        if args.quick { "-quick" } else { "" }
    ));
    fs::write(&path, md)?;
    println!("{md}");
    eprintln!("bench: report written to {}", path.display());
    Ok(())
}
