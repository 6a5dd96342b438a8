//! The Markdown report and its SVG chart.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use plotters::{coord::types::RangedCoordf64, prelude::*};

use crate::{paths::PathKind, programs::ProgramCost, stats::Samples};

/// Everything measured on one end-to-end path.
#[derive(Default, Clone)]
pub struct PathFigures {
    pub tcp1_gbps: Samples,
    pub tcp4_gbps: Samples,
    pub cpu_s_per_gbit: Samples,
    /// Per core, busy percent during the 1-stream TCP run.
    pub core_busy_pct: Vec<Samples>,
    pub udp_kpps: Samples,
    pub p50_us: Samples,
    pub p99_us: Samples,
    pub p999_us: Samples,
}

pub struct Report {
    pub title: String,
    pub machine: String,
    pub command: String,
    pub settings: String,
    pub paths: Vec<(PathKind, PathFigures)>,
    pub program_costs: Vec<ProgramCost>,
    /// Fabric program, ns per invocation in traffic, do-nothing ns at the
    /// same hooks, invocations in the last repetition.
    pub in_traffic: Vec<(&'static str, Samples, Samples, u64)>,
    pub lookup: Vec<(u32, f64)>,
    pub apply_10k_ms: Samples,
    pub change_to_packet_ms: Samples,
}

impl Report {
    fn figures(&self, kind: PathKind) -> Option<&PathFigures> {
        self.paths.iter().find(|(k, _)| *k == kind).map(|(_, f)| f)
    }

    /// ratio of ligo-plain to `base` for one figure.
    fn ratio(&self, base: PathKind, pick: impl Fn(&PathFigures) -> &Samples) -> f64 {
        self.ratio_of(PathKind::LigoPlain, base, pick)
    }

    fn ratio_of(
        &self,
        of: PathKind,
        base: PathKind,
        pick: impl Fn(&PathFigures) -> &Samples,
    ) -> f64 {
        match (self.figures(of), self.figures(base)) {
            (Some(l), Some(b)) => pick(l).median() / pick(b).median(),
            _ => f64::NAN,
        }
    }

    /// (target, measured, met) rows for the targets.
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        let tcp_ref = self.ratio(PathKind::KernelReference, |f| &f.tcp1_gbps);
        let wg_btc = self.ratio_of(PathKind::LigoWireguard, PathKind::BoringtunCli, |f| {
            &f.tcp1_gbps
        });
        let wg_plain = self.ratio_of(PathKind::LigoWireguard, PathKind::LigoPlain, |f| {
            &f.tcp1_gbps
        });
        let tcp_direct = self.ratio(PathKind::Direct, |f| &f.tcp1_gbps);
        let p99_ref = self.ratio(PathKind::KernelReference, |f| &f.p99_us);
        let p99_direct = self.ratio(PathKind::Direct, |f| &f.p99_us);
        let worst_program = self
            .program_costs
            .iter()
            .map(|c| c.ns / c.baseline_ns)
            .fold(f64::NAN, f64::max);
        let worst_in_traffic = self
            .in_traffic
            .iter()
            .map(|(_, ns, base, _)| ns.median() / base.median())
            .fold(f64::NAN, f64::max);
        let lookup = match (self.lookup.first(), self.lookup.last()) {
            (Some((_, first)), Some((_, last))) => last / first,
            _ => f64::NAN,
        };
        let apply = self.apply_10k_ms.median();
        let change = self.change_to_packet_ms.median();
        vec![
            (
                "encrypted TCP (ligo-wireguard) ≥ 1.5x boringtun-cli".into(),
                format!("{wg_btc:.2}x"),
                wg_btc >= 1.5,
            ),
            (
                "encrypted TCP (ligo-wireguard) ≥ 0.5x ligo-plain".into(),
                format!("{wg_plain:.2}x"),
                wg_plain >= 0.5,
            ),
            (
                "TCP throughput ≥ 1.5x kernel-reference".into(),
                format!("{tcp_ref:.2}x"),
                tcp_ref >= 1.5,
            ),
            (
                "TCP throughput ≥ 0.8x direct".into(),
                format!("{tcp_direct:.2}x"),
                tcp_direct >= 0.8,
            ),
            (
                "p99 latency ≤ 0.8x kernel-reference".into(),
                format!("{p99_ref:.2}x"),
                p99_ref <= 0.8,
            ),
            (
                "p99 latency ≤ 1.1x direct".into(),
                format!("{p99_direct:.2}x"),
                p99_direct <= 1.1,
            ),
            (
                "program cost in traffic ≤ 3x do-nothing at the same hooks (worst program)".into(),
                format!("{worst_in_traffic:.2}x"),
                worst_in_traffic <= 3.0,
            ),
            (
                "program cost under BPF_PROG_TEST_RUN ≤ 3x do-nothing (worst path)".into(),
                format!("{worst_program:.2}x"),
                worst_program <= 3.0,
            ),
            (
                "cost at 10,000 views ≤ 1.2x cost at 10".into(),
                format!("{lookup:.2}x"),
                lookup <= 1.2,
            ),
            (
                "10,000 map entries applied ≤ 100 ms".into(),
                format!("{apply:.1} ms"),
                apply <= 100.0,
            ),
            (
                "config change to first packet ≤ 50 ms".into(),
                format!("{change:.1} ms"),
                change <= 50.0,
            ),
        ]
    }

    /// The WireGuard paths side by side, with each core's load.
    fn encrypted_section(&self, md: &mut String) {
        let kinds = [
            PathKind::LigoWireguard,
            PathKind::BoringtunCli,
            PathKind::LigoPlain,
        ];
        if kinds.iter().any(|k| self.figures(*k).is_none()) {
            return;
        }
        let _ = writeln!(
            md,
            "\n## Encrypted between gateways (WireGuard)\n\nligo-wireguard: the fabric with its userspace WireGuard transport; boringtun-cli: direct routing through a boringtun-cli tunnel between the gateways (MTU 1420, as wg-quick sets it); ligo-plain: the fabric unencrypted. Core load is each core's busy share during the 1-stream TCP run (the whole machine: both clusters, iperf3 and every daemon).\n"
        );
        let _ = writeln!(
            md,
            "| figure | ligo-wireguard | boringtun-cli | ligo-plain | wireguard / boringtun-cli | wireguard / plain |\n|---|---|---|---|---|---|"
        );
        let ratio = |pick: &dyn Fn(&PathFigures) -> &Samples| {
            (
                self.ratio_of(kinds[0], kinds[1], pick),
                self.ratio_of(kinds[0], kinds[2], pick),
            )
        };
        type Pick = fn(&PathFigures) -> &Samples;
        let rows: [(&str, Pick, usize); 3] = [
            ("TCP, 1 stream (Gbit/s)", |f| &f.tcp1_gbps, 2),
            ("TCP, 4 streams (Gbit/s)", |f| &f.tcp4_gbps, 2),
            ("CPU-seconds per Gbit (1 stream)", |f| &f.cpu_s_per_gbit, 3),
        ];
        for (name, pick, decimals) in rows {
            let (btc, plain) = ratio(&pick);
            let cells = kinds
                .map(|k| {
                    self.figures(k)
                        .map(|f| pick(f).show(decimals))
                        .unwrap_or_default()
                })
                .join(" | ");
            let _ = writeln!(md, "| {name} | {cells} | {btc:.2}x | {plain:.2}x |");
        }
        let cores = self.figures(kinds[0]).map_or(0, |f| f.core_busy_pct.len());
        for core in 0..cores {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| {
                    self.figures(*k)
                        .and_then(|f| f.core_busy_pct.get(core))
                        .map(|s| s.show(0))
                        .unwrap_or_default()
                })
                .collect();
            let _ = writeln!(
                md,
                "| core {core} busy (%), 1 stream | {} | | |",
                cells.join(" | ")
            );
        }
    }

    pub fn markdown(&self, chart_file: &str) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {}\n", self.title);
        let _ = writeln!(md, "- Machine: {}", self.machine);
        let _ = writeln!(md, "- Command: `{}`", self.command);
        let _ = writeln!(md, "- Settings: {}", self.settings);
        let _ = writeln!(md, "- Figures: median (min–max) over the repetitions; ratios use medians measured in this same run.\n");
        let _ = writeln!(md, "![throughput and latency]({chart_file})\n");
        let _ = writeln!(
            md,
            "## Targets\n\n| target | measured | met |\n|---|---|---|"
        );
        for (target, measured, met) in self.targets() {
            let _ = writeln!(
                md,
                "| {target} | {measured} | {} |",
                if met { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(md, "\n## Pod in cluster A to pod in cluster B\n");
        let _ = writeln!(md, "{PATHS_DESCRIBED}\n");
        let _ = write!(md, "| figure |");
        for (k, _) in &self.paths {
            let _ = write!(md, " {} |", k.name());
        }
        let _ = writeln!(md, " ligo / direct | ligo / reference |");
        let _ = writeln!(md, "|---|{}---|---|", "---|".repeat(self.paths.len()));
        type Pick = fn(&PathFigures) -> &Samples;
        let rows: [(&str, Pick, usize); 7] = [
            ("TCP, 1 stream (Gbit/s)", |f| &f.tcp1_gbps, 2),
            ("TCP, 4 streams (Gbit/s)", |f| &f.tcp4_gbps, 2),
            ("CPU-seconds per Gbit (1 stream)", |f| &f.cpu_s_per_gbit, 3),
            ("UDP 64 B received (kpps)", |f| &f.udp_kpps, 0),
            ("latency p50 (µs)", |f| &f.p50_us, 1),
            ("latency p99 (µs)", |f| &f.p99_us, 1),
            ("latency p99.9 (µs)", |f| &f.p999_us, 1),
        ];
        for (name, pick, decimals) in rows {
            let _ = write!(md, "| {name} |");
            for (_, f) in &self.paths {
                let _ = write!(md, " {} |", pick(f).show(decimals));
            }
            let _ = writeln!(
                md,
                " {:.2}x | {:.2}x |",
                self.ratio(PathKind::Direct, pick),
                self.ratio(PathKind::KernelReference, pick)
            );
        }
        self.encrypted_section(&mut md);
        let _ = writeln!(md, "\n## The programs alone (BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(md, "Fabric paths rewrite the packet, so they are the median of single runs (a repeated run would keep working on the rewritten packet); pass paths are one run with many repetitions. Each is compared with a do-nothing program of the same type measured the same way in this run.\n");
        let _ = writeln!(
            md,
            "| program | path | ns | do-nothing ns | ratio |\n|---|---|---|---|---|"
        );
        for c in &self.program_costs {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {:.2}x |",
                c.program,
                c.path,
                c.ns,
                c.baseline_ns,
                c.ns / c.baseline_ns
            );
        }
        let _ = writeln!(md, "\nIn traffic: the kernel's run-time statistics during a 1-stream TCP transfer on ligo-plain, each fabric program against a do-nothing program attached in front of it at every hook where it runs (both see the same packets; a GSO packet counts once).\n");
        let _ = writeln!(md, "| program | invocations | ns per invocation | do-nothing ns | ratio |\n|---|---|---|---|---|");
        for (program, ns, base, invocations) in &self.in_traffic {
            let _ = writeln!(
                md,
                "| {program} | {invocations} | {} | {} | {:.2}x |",
                ns.show(1),
                base.show(1),
                ns.median() / base.median()
            );
        }
        let _ = writeln!(md, "\nRemap lookup (node_egress fabric path) by installed peer views:\n\n| views | ns | vs. first |\n|---|---|---|");
        let first = self.lookup.first().map(|(_, ns)| *ns).unwrap_or(f64::NAN);
        for (n, ns) in &self.lookup {
            let _ = writeln!(md, "| {n} | {ns:.1} | {:.2}x |", ns / first);
        }
        let _ = writeln!(md, "\n## Control plane\n");
        let _ = writeln!(
            md,
            "- 10,000 node slices written to the maps: {} ms",
            self.apply_10k_ms.show(1)
        );
        let _ = writeln!(
            md,
            "- SIGHUP with a moved peer view to the first echo through the new view: {} ms",
            self.change_to_packet_ms.show(1)
        );
        md
    }

    /// Bars: TCP throughput (1 and 4 streams) and p99 latency per path.
    pub fn chart(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (900, 360)).into_drawing_area();
        root.fill(&WHITE).context("chart")?;
        let (left, right) = root.split_horizontally(450);
        let n = self.paths.len() as f64;
        let colors = [
            RGBColor(120, 120, 120),
            RGBColor(214, 96, 77),
            RGBColor(33, 102, 172),
            RGBColor(120, 180, 90),
        ];

        let max_tcp = self
            .paths
            .iter()
            .map(|(_, f)| f.tcp4_gbps.median().max(f.tcp1_gbps.median()))
            .fold(0.0, f64::max);
        let mut tcp = ChartBuilder::on(&left)
            .caption(
                "TCP throughput, Gbit/s (1 and 4 streams)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..n, 0.0..(max_tcp * 1.5).max(0.1))
            .context("chart")?;
        tcp.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .draw()
            .context("chart")?;
        for (i, (kind, f)) in self.paths.iter().enumerate() {
            let x = i as f64;
            let color = colors[i % colors.len()];
            tcp.draw_series([
                Rectangle::new(
                    [(x + 0.1, 0.0), (x + 0.48, f.tcp1_gbps.median())],
                    color.filled(),
                ),
                Rectangle::new(
                    [(x + 0.52, 0.0), (x + 0.9, f.tcp4_gbps.median())],
                    color.mix(0.6).filled(),
                ),
            ])
            .context("chart")?
            .label(kind.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        draw_legend(&mut tcp)?;

        let max_p99 = self
            .paths
            .iter()
            .map(|(_, f)| f.p99_us.median())
            .fold(0.0, f64::max);
        let mut lat = ChartBuilder::on(&right)
            .caption("Request/response p99 latency, µs", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0.0..n, 0.0..(max_p99 * 1.5).max(1.0))
            .context("chart")?;
        lat.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .draw()
            .context("chart")?;
        for (i, (kind, f)) in self.paths.iter().enumerate() {
            let x = i as f64;
            let color = colors[i % colors.len()];
            lat.draw_series([Rectangle::new(
                [(x + 0.2, 0.0), (x + 0.8, f.p99_us.median())],
                color.filled(),
            )])
            .context("chart")?
            .label(kind.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        draw_legend(&mut lat)?;
        root.present().context("writing the chart")?;
        Ok(())
    }
}

type BarChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The path legend, top right on a light background.
fn draw_legend<'a>(chart: &mut BarChart<'a, 'a>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .context("chart")?;
    Ok(())
}

/// What each measured path is, for the report.
const PATHS_DESCRIBED: &str = "The paths: **direct**: plain routing between the clusters' address spaces, no tunnel (the ceiling). **kernel-reference**: what a user would build from kernel parts: three VXLAN legs per direction (node → gateway, gateway → gateway, gateway → node; one VXLAN device per leg), nftables prefix DNAT of our view to the peer's real CIDR and prefix SNAT of arrivals into our view, with conntrack undoing both for replies, and policy routing on the gateways. **ligo-plain** / **ligo-plain-xdp**: the fabric unencrypted, node ingress at TC / at XDP. **ligo-wireguard**: the fabric with its userspace WireGuard transport. **boringtun-cli**: direct routing through a boringtun-cli tunnel between the gateways, configured with `wg`, MTU 1420 as wg-quick sets it.";
