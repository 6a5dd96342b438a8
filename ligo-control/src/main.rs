//! `ligo-control`: the Kubernetes side of Ligo (more to come: peering,
//! status, the controllers).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Ligo's Kubernetes control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (or write one file per CRD).
    Crds {
        /// Write `<name>.yaml` files into this directory instead.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crds { write: None } => {
            for (_, yaml) in ligo_control::crd_manifests()? {
                print!("---\n{yaml}");
            }
            Ok(())
        }
        Command::Crds { write: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, yaml) in ligo_control::crd_manifests()? {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
