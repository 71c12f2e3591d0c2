//! The real `kubectl`, as a user runs it: every change a scenario makes to the cluster (installing
//! the chart, namespaces, Secrets, ImageBuilds, cancel, delete) goes through it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// `kubectl` with a kubeconfig and a discovery cache of its own.
#[derive(Clone)]
pub struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    /// kubectl for the API server of `kubeconfig`, caching discovery under `cache`.
    pub fn new(kubeconfig: &Path, cache: &Path) -> Self {
        super::common::require("kubectl", "kubectl (shipped with these machines; any kubectl >= 1.30)");
        Kubectl { kubeconfig: kubeconfig.to_path_buf(), cache: cache.to_path_buf() }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).arg("--cache-dir").arg(&self.cache).args(args);
        c
    }

    /// Runs kubectl with `stdin`; the output, or the error with its stderr.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("cannot run kubectl: {e}"))?;
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).await.map_err(|e| e.to_string())?;
        }
        drop(pipe);
        let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "kubectl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                stdout
            ))
        }
    }

    /// Runs kubectl; panics when it fails.
    pub async fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.run(args, stdin).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs kubectl synchronously (diagnostics while unwinding); the output or the error text.
    pub fn now(&self, args: &[&str]) -> String {
        match self.command(args).output() {
            Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => format!("cannot run kubectl: {e}"),
        }
    }
}
