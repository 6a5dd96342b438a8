//! `ligo-control`: the Kubernetes side of Ligo: the controller (`run`)
//! and the CRDs (`crds`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Ligo's Kubernetes control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach a cluster, as kubectl takes it.
#[derive(clap::Args, Clone, Debug)]
struct ClusterAccess {
    /// A kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long)]
    context: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller: resolves ClusterFabric/local, keeps the gateway
    /// key, allocates peer views and checks peers' API servers.
    Run {
        #[command(flatten)]
        access: ClusterAccess,
        /// Where the gateway key and peers' credentials Secrets live.
        #[arg(long, env = "POD_NAMESPACE", default_value = "ligo-system")]
        namespace: String,
    },
    /// Print the CustomResourceDefinitions (or write one file per CRD).
    Crds {
        /// Write `<name>.yaml` files into this directory instead.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { access, namespace } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async {
                let client = client(&access).await?;
                ligo_control::controller::run(
                    client,
                    ligo_control::controller::Options { namespace },
                )
                .await
            })
        }
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

async fn client(access: &ClusterAccess) -> Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    let config = match &access.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None if access.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("reading the kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not in a cluster: pass --kubeconfig")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}
