//! Installing bob as users do: the Helm chart rendered by Helm's own engine
//! (`scripts/render-chart`, helm-python-sdk), its CRD and manifests applied with kubectl, and the
//! controller run as a process with the arguments and environment of the rendered Deployment.
//! What a pod has and a process here does not is supplied, and only that: the pod's name
//! (`HOSTNAME`, the leader identity), its credentials (a kubeconfig: the ServiceAccount's token on
//! a cluster), and a free loopback port for the admin address (pods have a network each,
//! processes share one).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::apiserver::root;
use super::daemon::Daemon;
use super::kubectl::Kubectl;

/// Whether Helm's engine can render (the .venv that `.ci/run` makes); else what to do.
pub fn renderer_ready() -> Result<(), String> {
    let out = Command::new(root().join("scripts/render-chart"))
        .arg("--help")
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// The rendered chart.
pub struct Release {
    /// The release namespace (the controller's, the leader Lease's).
    pub ns: String,
    /// Every rendered object, CRDs first.
    pub docs: Vec<Value>,
}

impl Release {
    /// Renders charts/bob into namespace `ns` with charts/bob/ci/e2e-values.yaml, then each of
    /// `values` merged over it in order.
    pub fn render(ns: &str, values: &[Value]) -> Self {
        let mut cmd = Command::new(root().join("scripts/render-chart"));
        cmd.args(["--include-crds", "--name", "bob", "--namespace", ns, "-f"])
            .arg(root().join("charts/bob/ci/e2e-values.yaml"));
        for v in values {
            cmd.args(["--set-json", &v.to_string()]);
        }
        let out = cmd.output().expect("scripts/render-chart runs");
        assert!(out.status.success(), "rendering the chart failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&text)
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .collect();
        Release { ns: ns.to_string(), docs }
    }

    fn of_kind(&self, crd: bool) -> Vec<&Value> {
        self.docs.iter().filter(|d| (d["kind"] == "CustomResourceDefinition") == crd).collect()
    }

    /// The controller's container in the rendered Deployment.
    pub fn container(&self) -> &Value {
        let d = self.docs.iter().find(|d| d["kind"] == "Deployment").expect("the chart renders a Deployment");
        &d["spec"]["template"]["spec"]["containers"][0]
    }

    /// Applies the CRDs (as Helm does from crds/, before anything else), waits until they are
    /// established, creates the release namespace and applies the rest, all server-side.
    pub async fn install(&self, kubectl: &Kubectl) {
        let stream = |docs: Vec<&Value>| docs.iter().map(|d| format!("---\n{d}\n")).collect::<String>();
        let apply = ["apply", "--server-side", "--force-conflicts", "--field-manager", "helm", "-f", "-"];
        kubectl.ok(&apply, Some(&stream(self.of_kind(true)))).await;
        kubectl
            .ok(
                &[
                    "wait",
                    "--for",
                    "condition=established",
                    "--timeout",
                    "30s",
                    "crd/imagebuilds.bob.dev",
                    "crd/buildlogs.bob.dev",
                ],
                None,
            )
            .await;
        if let Err(e) = kubectl.run(&["create", "namespace", &self.ns], None).await {
            assert!(e.contains("AlreadyExists"), "{e}");
        }
        kubectl.ok(&apply, Some(&stream(self.of_kind(false)))).await;
    }
}

/// One controller replica: `bob controller` with the Deployment's arguments and environment.
pub struct Controller {
    /// Its pod name (`HOSTNAME`): the leader identity.
    pub identity: String,
    /// `127.0.0.1:<port>` of /metrics, /healthz, /readyz.
    pub admin: String,
    /// The process.
    pub daemon: Daemon,
}

impl Controller {
    /// Starts a replica named `identity` that reaches the API server through `kubeconfig`; waits
    /// until it answers /readyz (ready while standing by too).
    /// `env` comes on top of the Deployment's (what a webhook would add, e.g. a cloud identity).
    pub fn start(
        release: &Release,
        kubeconfig: &Path,
        identity: &str,
        dir: &Path,
        env: &[(String, String)],
    ) -> Self {
        Self::try_start(release, kubeconfig, identity, dir, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Controller::start`], or why the replica did not become ready (it is stopped then).
    pub fn try_start(
        release: &Release,
        kubeconfig: &Path,
        identity: &str,
        dir: &Path,
        env: &[(String, String)],
    ) -> Result<Self, String> {
        let c = release.container();
        let bob = env!("CARGO_BIN_EXE_bob");
        // The image's ENTRYPOINT is the bob binary; the container gives no command, only args.
        let mut argv: Vec<String> = c["command"].as_array().map_or(vec![bob.into()], |a| {
            a.iter().map(|s| s.as_str().unwrap().replace("/usr/local/bin/bob", bob)).collect()
        });
        argv.extend(c["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap().to_string()));
        let admin = free_port();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(f)) if f == "metadata.namespace" => release.ns.clone(),
                (_, Value::String(f)) if f == "metadata.name" => identity.to_string(),
                (other, from) => panic!("env {name}: no stand-in for value {other} / valueFrom {from}"),
            };
            cmd.env(name, value);
        }
        cmd.env("HOSTNAME", identity).env("KUBECONFIG", kubeconfig).env("BOB_ADMIN_ADDR", &admin);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let log = dir.join(format!("{identity}.log"));
        let mut daemon = Daemon::spawn(&format!("controller {identity}"), cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(&admin) {
            if let Some(s) = daemon.try_wait() {
                return Err(format!(
                    "controller {identity} exited ({s}) before it was ready:\n{}",
                    daemon.tail(40)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!("controller {identity} not ready in 30 s:\n{}", daemon.tail(40)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Controller { identity: identity.to_string(), admin, daemon })
    }
}

fn ready(admin: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// `127.0.0.1:<a free port>`.
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A kubeconfig that authenticates as the chart's ServiceAccount (a cluster that enforces RBAC):
/// the cluster's server and CA with a token from the TokenRequest API.
pub async fn service_account_kubeconfig(kubectl: &Kubectl, release: &Release, path: &Path) {
    let token =
        kubectl.ok(&["create", "token", "bob-controller", "-n", &release.ns, "--duration", "2h"], None).await;
    let view: Value =
        serde_json::from_str(&kubectl.ok(&["config", "view", "--minify", "--raw", "-o", "json"], None).await)
            .unwrap();
    let cluster = view["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "bob-controller", "user": {"token": token.trim()}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "bob-controller", "namespace": release.ns}}],
        "current-context": "e2e",
    });
    std::fs::write(path, config.to_string()).unwrap();
}
