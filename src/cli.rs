//! The command line: one binary, `bob`, with a subcommand per job. Each subcommand's options
//! live next to its subsystem; this file only lists them.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::build::BuildArgs;
use crate::controller::ControllerArgs;
use crate::copy::CopyArgs;
use crate::local::RunArgs;
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
    /// Print the ImageBuild CRD (YAML) generated from the Rust types.
    Crd,
    /// Copy an image (or a whole index) between registries, keeping its digest.
    Copy(CopyArgs),
}

/// Parses durations such as `500ms`, `30s`, `5m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (use e.g. 500ms, 30s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit {unit:?} (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 days").is_err());
    }
}
