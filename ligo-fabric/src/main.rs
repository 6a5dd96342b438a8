//! `ligo-fabric`: the Ligo fabric node daemon and its CLI.

use ligo_fabric::{config, daemon, fabric_maps, inspect, routes, tunnel_process};

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "Ligo cross-cluster network fabric: node daemon and CLI"
)]
struct Cli {
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `run --kubernetes`: what the DaemonSet passes (the rest comes from the
/// Node and Ligo objects).
#[derive(clap::Args)]
struct KubernetesArgs {
    /// Take the desired state from the Kubernetes API (in-cluster config,
    /// or --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name (the DaemonSet sets NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
    node_name: Option<String>,
    #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    #[arg(long, default_value = config::DEFAULT_METRICS_ADDRESS)]
    metrics_address: std::net::SocketAddr,
    /// The gateway key Secret's private-key file, where it is mounted.
    #[arg(long, value_name = "FILE")]
    private_key_file: Option<PathBuf>,
    /// How arriving packets reach pods: direct skips the node's stack
    /// (and its netfilter: a conntrack-based FORWARD policy such as
    /// kube-proxy's then drops the pods' answers), stack routes them.
    #[arg(long, value_enum, default_value_t = config::PodDelivery::Direct)]
    pod_delivery: config::PodDelivery,
    /// The tunnel process's status socket (gateways).
    #[arg(long, value_name = "SOCKET", default_value = config::DEFAULT_WIREGUARD_STATUS_SOCKET)]
    status_socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the programs and keep the fabric in sync with
    /// FILE, or (--kubernetes) with the cluster's Ligo objects.
    Run {
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config: Option<PathBuf>,
        #[command(flatten)]
        kubernetes: KubernetesArgs,
    },
    /// Run a gateway's WireGuard tunnel: a process of its own beside `run`
    /// (so either restarts without the other), configured by the daemon
    /// through the file beside SOCKET and reporting to it on SOCKET.
    Tunnel {
        /// The daemon's gateway.wireguard_status_socket.
        #[arg(long, value_name = "SOCKET", default_value = config::DEFAULT_WIREGUARD_STATUS_SOCKET)]
        status_socket: PathBuf,
    },
    /// Remove the data path from this host: detach the programs, delete our
    /// routes, the tunnel device and the pinned maps. Stop the daemon first (it leaves the data
    /// path running when it exits, so restarts and upgrades lose nothing).
    Uninstall {
        /// The daemon's config file (gives pin_dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's pin_dir (default: from --config, else /sys/fs/bpf/ligo).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Validate a configuration file without applying anything.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the state of a running daemon.
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
    },
}

#[derive(Subcommand)]
enum InspectWhat {
    /// Everything in the pinned maps: config, peers, views, node slices, counters, drops.
    Maps(InspectArgs),
    /// Per peer: mapping, endpoint, traffic each way, last packet; drops by reason.
    Peers(InspectArgs),
    /// Per-peer counters and every drop reason.
    Counters(InspectArgs),
    /// The steering routes the daemon installed in this network namespace.
    Routes(InspectArgs),
    /// Gateway WireGuard tunnels: public keys, endpoints, latest handshake,
    /// traffic per peer, drops (asks the daemon's metrics endpoint).
    Tunnels(TunnelsArgs),
}

#[derive(clap::Args)]
struct TunnelsArgs {
    /// The daemon's config file: gives its metrics_address.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The daemon's metrics address (default: from --config, else 127.0.0.1:9477).
    #[arg(long, value_name = "IP:PORT")]
    address: Option<std::net::SocketAddr>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The daemon's pin_dir (default: from --config, else /sys/fs/bpf/ligo).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// The daemon's config file: gives pin_dir and peer names.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: container logs are files an operator greps.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ligo-fabric: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Run { config, kubernetes } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            match config {
                Some(config) => runtime.block_on(daemon::run(&config)),
                None => runtime.block_on(run_kubernetes(kubernetes)),
            }
        }
        Command::Tunnel { status_socket } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tunnel_process::run(&status_socket)),
        Command::Uninstall { config, pin_dir } => {
            let local = config
                .map(|c| config::read_file(&c))
                .transpose()?
                .map(|c| c.local);
            let pin_dir = match (pin_dir, &local) {
                (Some(dir), _) => dir,
                (None, Some(local)) => local.pin_dir.clone(),
                (None, None) => PathBuf::from(config::DEFAULT_PIN_DIR),
            };
            let status_socket = match local.map(|l| l.role) {
                Some(config::LocalRole::Gateway(gw)) => Some(gw.status_socket),
                Some(config::LocalRole::Node(_)) => None,
                None => Some(PathBuf::from(config::DEFAULT_WIREGUARD_STATUS_SOCKET)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(daemon::uninstall(&pin_dir, status_socket.as_deref()))
        }
        Command::CheckConfig { config } => {
            let cfg = config::read_file(&config)?;
            println!(
                "{}: valid ({} peers)",
                config.display(),
                cfg.spec.peers.len()
            );
            Ok(())
        }
        Command::Inspect { what } => inspect(what),
    }
}

fn inspect_tunnels(args: TunnelsArgs) -> Result<()> {
    let config = args.config.as_deref().map(config::read_file).transpose()?;
    let mut address = args
        .address
        .or_else(|| config.map(|c| c.local.metrics_address))
        .unwrap_or_else(|| ([127, 0, 0, 1], 9477).into());
    if address.ip().is_unspecified() {
        address.set_ip([127, 0, 0, 1].into());
    }
    let status = inspect::fetch_tunnels(address)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{}", inspect::tunnels_table(&status)),
    }
    Ok(())
}

fn inspect(what: InspectWhat) -> Result<()> {
    #[derive(Clone, Copy, PartialEq)]
    enum View {
        Maps,
        Peers,
        Counters,
        Routes,
    }
    let (args, view) = match what {
        InspectWhat::Maps(a) => (a, View::Maps),
        InspectWhat::Peers(a) => (a, View::Peers),
        InspectWhat::Counters(a) => (a, View::Counters),
        InspectWhat::Routes(a) => (a, View::Routes),
        InspectWhat::Tunnels(a) => return inspect_tunnels(a),
    };
    let config = args.config.as_deref().map(config::read_file).transpose()?;
    let names: inspect::PeerNames = config
        .iter()
        .flat_map(|c| c.spec.peers.values().map(|p| (p.id, p.name.clone())))
        .collect();
    let json = matches!(args.output, Output::Json);
    if view == View::Routes {
        let (routes, interfaces) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let manager = routes::RouteManager::new()?;
                let current = manager.current().await?;
                let names = manager.interface_names().await?;
                anyhow::Ok((current, names))
            })?;
        match json {
            true => println!("{:#}", inspect::routes_json(&routes, &interfaces)),
            false => print!("{}", inspect::routes_table(&routes, &interfaces)),
        }
        return Ok(());
    }
    let pin_dir = args
        .pin_dir
        .or_else(|| config.map(|c| c.local.pin_dir))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PIN_DIR));
    let snapshot = fabric_maps::FabricMaps::open(&pin_dir)?.snapshot()?;
    let text = match (view, json) {
        (View::Peers, true) => format!("{:#}\n", inspect::peers_json(&snapshot, &names)),
        (View::Peers, false) => inspect::peers_table(&snapshot, &names),
        (View::Counters, true) => format!("{:#}\n", inspect::counters_json(&snapshot, &names)),
        (View::Counters, false) => inspect::counters_table(&snapshot, &names),
        (_, true) => format!("{:#}\n", inspect::maps_json(&snapshot)),
        (_, false) => inspect::maps_table(&snapshot),
    };
    print!("{text}");
    Ok(())
}

async fn run_kubernetes(args: KubernetesArgs) -> Result<()> {
    use anyhow::Context as _;
    let node_name = args
        .node_name
        .context("--node-name (or NODE_NAME) is required with --kubernetes")?;
    let config = match &args.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("not in a pod (no service account): pass --kubeconfig")?,
    };
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    daemon::run_kubernetes(
        client,
        ligo_fabric::kube_source::DaemonFlags {
            node_name,
            pin_dir: args.pin_dir,
            metrics_address: args.metrics_address,
            ingress: config::IngressHook::Auto,
            pod_delivery: args.pod_delivery,
            private_key_file: args.private_key_file,
            status_socket: args.status_socket,
        },
    )
    .await
}
