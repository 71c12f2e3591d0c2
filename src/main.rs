//! The `bob` binary: parse the command line, set up logging and TLS, run the subcommand.

use std::process::ExitCode;

use bob::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    // Installed as `kubectl-bob`, bob is a kubectl plugin: `kubectl bob logs NAME`.
    let cli = Cli::parse();
    bob::telemetry::init();
    // reqwest is built without a default crypto provider: pick ring once, before any client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bob: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match cli.command {
            Command::Proxy(args) => bob::proxy::run(args).await?,
            Command::Copy(args) => bob::copy::run(args).await?,
            Command::Logs(args) => bob::logs::run(args).await?,
            Command::Controller(args) => bob::controller::run(args).await?,
            Command::Crd => print!("{}", bob::crd::crd_yaml()),
            Command::Run(args) => {
                let status = bob::local::run(args).await?;
                print!("{}", serde_saphyr::to_string(&serde_json::json!({ "status": status }))?);
                bob::local::outcome(&status)?;
            }
            Command::Build(args) => {
                let result = bob::build::run(args).await;
                if let (Some(reason), Some(message)) = (result.reason, result.message) {
                    anyhow::bail!("build failed: {reason}: {message}");
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bob: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for an error: the subcommand's own classes where it has them, else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(run) = e.downcast_ref::<bob::local::NotSucceeded>() {
        return run.code;
    }
    e.downcast_ref::<bob::copy::Error>().map_or(1, bob::copy::Error::exit_code)
}
