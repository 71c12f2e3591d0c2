//! Build logs that outlive the pod: how they are stored (`store.rs`), and `bob logs NAME`, which
//! reads them with the user's own Kubernetes credentials — whoever may read the ImageBuild and its
//! BuildLogs (namespace RBAC) — and no registry credentials: the live log while the build runs
//! (`-f`), the stored one afterwards. Also a kubectl plugin (`kubectl bob logs`).

pub mod store;

use std::io::Write;

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

use crate::crd::{ImageBuild, Phase};
use store::BuildLog;

/// `bob logs` options.
#[derive(clap::Args, Clone, Debug)]
pub struct LogsArgs {
    /// The ImageBuild.
    pub name: String,
    /// Its namespace [default: the kubeconfig context's].
    #[arg(short = 'n', long, env = "BOB_NAMESPACE")]
    pub namespace: Option<String>,
    /// Follow the build's output while it runs; print the stored log once it has finished.
    #[arg(short = 'f', long, env = "BOB_LOGS_FOLLOW")]
    pub follow: bool,
    /// The attempt of the ImageBuild's current generation [default: the latest].
    #[arg(long, env = "BOB_LOGS_ATTEMPT")]
    pub attempt: Option<i32>,
}

/// Why `bob logs` printed no log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client.
    #[error("cannot reach the Kubernetes API")]
    Client(#[source] crate::kubeclient::Error),
    /// The ImageBuild does not exist (or may not be read).
    #[error("cannot read ImageBuild {namespace}/{name}")]
    ImageBuild {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// No log is (or was) kept for what was asked.
    #[error("{0}")]
    NoLog(String),
    /// Reading the log failed.
    #[error("cannot read the log of {what}")]
    Read {
        /// Which log.
        what: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The stored log is damaged.
    #[error(transparent)]
    Damaged(#[from] store::Error),
    /// The output could not be written.
    #[error("cannot write the log")]
    Write(#[source] std::io::Error),
}

/// Runs `bob logs`: prints the log of an ImageBuild's attempt on stdout.
pub async fn run(args: LogsArgs) -> Result<(), Error> {
    let client = crate::kubeclient::client(crate::kubeclient::Agent::Logs).await.map_err(Error::Client)?;
    let ns = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let builds: Api<ImageBuild> = Api::namespaced(client.clone(), &ns);
    let ib = builds.get(&args.name).await.map_err(|source| Error::ImageBuild {
        namespace: ns.clone(),
        name: args.name.clone(),
        source,
    })?;
    let status = ib.status.clone().unwrap_or_default();
    let what = format!("ImageBuild {ns}/{}", args.name);
    let refs = &status.log_refs;
    let chosen = match args.attempt {
        Some(n) => refs.iter().find(|r| r.attempt == n),
        None => refs.iter().max_by_key(|r| r.attempt),
    };
    let Some(log_ref) = chosen else {
        let why = match (args.attempt, refs.is_empty()) {
            (Some(n), false) => {
                let have: Vec<String> = refs.iter().map(|r| r.attempt.to_string()).collect();
                format!("{what} has no attempt {n} (attempts with a log: {})", have.join(", "))
            }
            _ => {
                let phase = status.phase.map_or("new".to_string(), |p| format!("{p:?}"));
                let reason = status.reason.map(|r| format!(", {r}")).unwrap_or_default();
                format!(
                    "{what} has no build log: no build pod ran for its current generation ({phase}{reason})"
                )
            }
        };
        return Err(Error::NoLog(why));
    };
    let running = !status.phase.is_some_and(Phase::is_terminal);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if args.follow
        && running
        && status.pod_name.as_deref() == Some(log_ref.build_log.as_str())
        && let Some(pod) = pods.get_opt(&log_ref.build_log).await.ok().flatten()
    {
        return follow(&pods, &pod).await;
    }
    let logs: Api<BuildLog> = Api::namespaced(client, &ns);
    let name = &log_ref.build_log;
    let stored = logs.get_opt(name).await.map_err(|source| Error::Read { what: what.clone(), source })?;
    let Some(log) = stored else {
        return Err(Error::NoLog(format!(
            "the log of attempt {} of {what} is no longer kept (BuildLog {ns}/{name} is gone: logs are kept for the controller's --log-retention, and go with their ImageBuild)",
            log_ref.attempt
        )));
    };
    print(&log)
}

/// Prints a stored log: each container's output under a header line when there are several.
fn print(log: &BuildLog) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let several = log.spec.containers.len() > 1;
    for c in &log.spec.containers {
        if several {
            writeln!(out, "==> {} <==", c.name).map_err(Error::Write)?;
        }
        out.write_all(store::text(c)?.as_bytes()).map_err(Error::Write)?;
    }
    if !log.spec.complete {
        writeln!(out, "[bob: the log is still being written, or its pod was lost before it ended]")
            .map_err(Error::Write)?;
    }
    Ok(())
}

/// Follows a running build pod's containers (the clone, then the build), as `kubectl logs -f`.
async fn follow(pods: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.unwrap_or_default().into_iter().filter(|c| c.restart_policy.is_none());
    let names: Vec<String> =
        inits.map(|c| c.name).chain(spec.containers.into_iter().map(|c| c.name)).collect();
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let mut out = std::io::stdout();
    for name in &names {
        if names.len() > 1 {
            writeln!(out, "==> {name} <==").map_err(Error::Write)?;
        }
        let params = LogParams { container: Some(name.clone()), follow: true, ..Default::default() };
        let what = format!("container {name} of pod {pod_name}");
        let stream = loop {
            match pods.log_stream(&pod_name, &params).await {
                Ok(s) => break Some(s),
                // Not started yet: wait for it as kubectl does, unless the pod has ended.
                Err(kube::Error::Api(e)) if e.code == 400 => {
                    let current = pods.get_opt(&pod_name).await.ok().flatten();
                    let phase = current.as_ref().and_then(|p| p.status.as_ref()?.phase.clone());
                    if current.is_none() || matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                        break None;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(source) => return Err(Error::Read { what, source }),
            }
        };
        let Some(stream) = stream else {
            writeln!(out, "[bob: {what} did not run]").map_err(Error::Write)?;
            continue;
        };
        let mut lines = stream.lines();
        while let Some(line) = lines.try_next().await.map_err(Error::Write)? {
            writeln!(out, "{line}").map_err(Error::Write)?;
        }
    }
    Ok(())
}
