//! `ligo-control`: the Kubernetes side of Ligo: the controller (`run`),
//! peering (`peer`, `unpeer`, `status`) and the CRDs (`crds`).

use std::path::PathBuf;

/// mimalloc gives memory a watch's burst freed back to the system within
/// milliseconds; with glibc's per-thread arenas the controller's RSS kept
/// every pass's high-water mark (`bench/results/*-offload-*.md`). `Cap`
/// counts the bytes it holds (no limit): `ligo_control_heap_bytes`.
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ligo_control::cli::{
    self,
    offload::OffloadArgs,
    peer::{PeerArgs, UnpeerArgs},
    status::StatusArgs,
    Access,
};

#[derive(Parser)]
#[command(version, about = "Ligo's Kubernetes control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: resolves ClusterFabric/local, keeps the gateway
    /// key, allocates peer views and checks peers' API servers.
    Run {
        #[command(flatten)]
        access: Access,
        /// Where the gateway key and peers' credentials Secrets live.
        #[arg(long, env = "POD_NAMESPACE", default_value = "ligo-system")]
        namespace: String,
        /// Where /metrics and /healthz are served.
        #[arg(long, default_value = "0.0.0.0:9478")]
        metrics_address: std::net::SocketAddr,
    },
    /// Peer this cluster with another: identities, credentials and Peer
    /// objects in both, after checking both.
    Peer(PeerArgs),
    /// Remove a peering from both clusters.
    Unpeer(UnpeerArgs),
    /// This cluster's fabric and its peers.
    Status(StatusArgs),
    /// Let a namespace's pods run on peers (through their virtual nodes).
    Offload(OffloadArgs),
    /// Stop offloading a namespace (its copies in the peers are removed).
    Unoffload(OffloadArgs),
    /// Print the CustomResourceDefinitions (or write one file per CRD).
    Crds {
        /// Write `<name>.yaml` files into this directory instead.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn main() {
    let outcome = match Cli::parse().command {
        Command::Run {
            access,
            namespace,
            metrics_address,
        } => run_controller(access, namespace, metrics_address),
        Command::Peer(args) => block_on(cli::peer::peer(args)),
        Command::Unpeer(args) => block_on(cli::peer::unpeer(args)),
        Command::Status(args) => block_on(cli::status::status(args)),
        Command::Offload(args) => block_on(cli::offload::offload(args, true)),
        Command::Unoffload(args) => block_on(cli::offload::offload(args, false)),
        Command::Crds { write } => crds(write),
    };
    if let Err(e) = outcome {
        eprintln!("✗ {e:#}");
        std::process::exit(1);
    }
}

fn block_on<F: std::future::Future<Output = Result<()>>>(future: F) -> Result<()> {
    tokio::runtime::Runtime::new()
        .context("starting the runtime")?
        .block_on(future)
}

fn run_controller(
    access: Access,
    namespace: String,
    metrics_address: std::net::SocketAddr,
) -> Result<()> {
    // Colour only on a terminal: container logs are files an operator greps.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    ligo_control::controller::metrics::count_heap_with(|| ALLOCATOR.allocated());
    block_on(async {
        let cluster = cli::connect_with(
            access.kubeconfig.as_ref(),
            access.context.as_deref(),
            cli::WATCH_READ_TIMEOUT,
        )
        .await?;
        ligo_control::controller::run(
            cluster.client,
            ligo_control::controller::Options {
                namespace,
                metrics_address,
            },
        )
        .await
    })
}

fn crds(write: Option<PathBuf>) -> Result<()> {
    let Some(dir) = write else {
        for (_, yaml) in ligo_control::crd_manifests()? {
            print!("---\n{yaml}");
        }
        return Ok(());
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, yaml) in ligo_control::crd_manifests()? {
        let path = dir.join(name);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
