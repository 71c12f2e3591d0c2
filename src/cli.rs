//! The command line: one binary, `bob`, with a subcommand per job. Each subcommand's options
//! live next to its subsystem; this file only lists them.

use clap::{Parser, Subcommand};

use crate::build::BuildArgs;
use crate::controller::ControllerArgs;
use crate::copy::CopyArgs;
use crate::local::RunArgs;
use crate::logs::LogsArgs;
use crate::proxy::ProxyArgs;

/// bob: a Kubernetes-native builder of workspace images.
#[derive(Parser)]
#[command(name = "bob", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Registry proxy of the build pod: holds the credentials, maps `base`/`target`, mirrors `FROM`s.
    Proxy(ProxyArgs),
    /// Build pod main container: build the base from a Dockerfile, copy it to the workspace image.
    Build(BuildArgs),
    /// Reconcile ImageBuilds into build pods (runs in the cluster).
    Controller(ControllerArgs),
    /// Run one ImageBuild locally (no cluster): resolve, check the cache, build, verify, print status.
    Run(RunArgs),
    /// Print the CRDs (ImageBuild, BuildLog) as YAML, generated from the Rust types.
    Crd,
    /// Copy an image (or a whole index) between registries, keeping its digest.
    Copy(CopyArgs),
    /// Print an ImageBuild's build log (-f: follow it while it runs); as a kubectl plugin too.
    Logs(LogsArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help_and_env() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version" | "check") || arg.is_positional() {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{} --{id} has no help", sub.get_name());
                assert!(arg.get_env().is_some(), "{} --{id} has no env variable", sub.get_name());
            }
        }
    }
}
