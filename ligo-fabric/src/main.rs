//! `ligo-fabric`: the Ligo fabric node daemon and its CLI.

use ligo_fabric::{config, daemon, fabric_maps, inspect};

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

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the programs and keep the fabric in sync with FILE.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
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
    /// Peers, views, node slices, counters and drops from the pinned maps.
    Maps {
        /// The daemon's pin_dir.
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(daemon::run(&config)),
        Command::CheckConfig { config } => {
            let cfg = daemon::read_config(&config)?;
            println!("{}: valid ({} peers)", config.display(), cfg.peers.len());
            Ok(())
        }
        Command::Inspect {
            what: InspectWhat::Maps { pin_dir, output },
        } => {
            let snapshot = fabric_maps::FabricMaps::open(&pin_dir)?.snapshot()?;
            match output {
                Output::Table => print!("{}", inspect::maps_table(&snapshot)),
                Output::Json => println!("{:#}", inspect::maps_json(&snapshot)),
            }
            Ok(())
        }
    }
}
