//! Which API server the suite runs against, and how a scenario gets one: its own kube-sim (found
//! beside the checkout at `../shared/tools/kube-sim`, started with a fake kubelet that runs the
//! pods' containers as local processes, the fresh `bob` first on its PATH), or the cluster that
//! `KUBECONFIG` names when `BOB_E2E_REGISTRY` says which registry it reaches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::Daemon;

/// Where the scenarios run.
#[derive(Clone, Debug)]
pub enum Target {
    /// A kube-sim per scenario (`server.py` here).
    KubeSim {
        /// `server.py`.
        server: PathBuf,
    },
    /// A real cluster, shared by the scenarios (each in namespaces of its own).
    Cluster {
        /// Its kubeconfig.
        kubeconfig: PathBuf,
        /// A registry that the pods and this machine reach under one name (`kind-registry:5000`).
        registry: String,
        /// The bob image the cluster's nodes can pull.
        image: String,
    },
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Target {
    /// Finds an API server, or says in one line why there is none.
    pub fn detect() -> Result<Target, String> {
        if std::env::var("BOB_E2E").as_deref() == Ok("off") {
            return Err("BOB_E2E=off".into());
        }
        if let (Some(kubeconfig), Ok(registry)) =
            (std::env::var_os("KUBECONFIG"), std::env::var("BOB_E2E_REGISTRY"))
        {
            let image = std::env::var("BOB_E2E_IMAGE")
                .map_err(|_| "KUBECONFIG and BOB_E2E_REGISTRY are set but BOB_E2E_IMAGE (the bob image the nodes pull) is not".to_string())?;
            return Ok(Target::Cluster { kubeconfig: kubeconfig.into(), registry, image });
        }
        let sim = root().join("../shared/tools/kube-sim");
        let server = sim.join("server.py");
        if !server.is_file() {
            return Err(format!(
                "no API server: kube-sim is not beside the checkout ({}) and KUBECONFIG with BOB_E2E_REGISTRY is not set (README: \"End-to-end tests\")",
                sim.display()
            ));
        }
        if Command::new("python3").arg("--version").output().is_err() {
            return Err("no API server: kube-sim needs python3 (apt-get install -y python3)".into());
        }
        Ok(Target::KubeSim { server: server.canonicalize().unwrap_or(server) })
    }

    /// What it is, for the one line the suite prints and for the benchmark.
    pub fn describe(&self) -> String {
        match self {
            Target::KubeSim { server } => format!("kube-sim ({}), one per scenario", server.display()),
            Target::Cluster { kubeconfig, registry, .. } => {
                format!("the cluster of {} with registry {registry}", kubeconfig.display())
            }
        }
    }

    /// Whether pods are local processes sharing this machine's network (kube-sim).
    pub fn is_kube_sim(&self) -> bool {
        matches!(self, Target::KubeSim { .. })
    }
}

/// A scenario's API server.
pub struct ApiServer {
    /// The admin kubeconfig (kubectl and the test's client).
    pub kubeconfig: PathBuf,
    /// `http://127.0.0.1:<port>` for kube-sim; `None` for a TLS cluster.
    pub plain_url: Option<String>,
    /// The kube-sim process.
    pub sim: Option<Daemon>,
    /// Where kube-sim's fake kubelet makes a directory per pod it runs (`<ns>_<name>_<uid8>`).
    pub pod_dir: Option<PathBuf>,
}

/// How a scenario's kube-sim runs (ignored on a cluster).
#[derive(Clone, Debug, Default)]
pub struct SimFlags {
    /// `--faults SPEC` from the start (`None`: none until [`ApiServer::faults`] sets some).
    pub faults: Option<String>,
    /// `--pod-network isolated`: each pod has a network namespace of its own (needs root).
    pub isolated: bool,
}

impl ApiServer {
    /// The API server for one scenario, with its files under `dir` (outside every pod mount path).
    pub fn start(target: &Target, dir: &Path, flags: &SimFlags) -> Self {
        match target {
            Target::Cluster { kubeconfig, .. } => {
                ApiServer { kubeconfig: kubeconfig.clone(), plain_url: None, sim: None, pod_dir: None }
            }
            Target::KubeSim { server } => {
                let kubeconfig = dir.join("kubeconfig");
                let pods = dir.join("pods");
                std::fs::create_dir_all(&pods).unwrap();
                // The pods' containers run `bob proxy`, `bob build` and `sh`: the fresh binary first.
                let bob_dir = Path::new(env!("CARGO_BIN_EXE_bob")).parent().unwrap().to_path_buf();
                let path = std::env::join_paths(
                    std::iter::once(bob_dir)
                        .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
                )
                .unwrap();
                let mut cmd = Command::new("python3");
                cmd.arg(server)
                    .args(["--port", "0", "--kubelet", "-v", "--kubeconfig-out"])
                    .arg(&kubeconfig)
                    .arg("--pod-dir")
                    .arg(&pods)
                    .env("PATH", path)
                    .args(flags.faults.iter().flat_map(|f| ["--faults", f.as_str()]))
                    .args(flags.isolated.then_some(["--pod-network", "isolated"]).into_iter().flatten())
                    .env("PYTHONUNBUFFERED", "1")
                    .env_remove("KUBECONFIG");
                let mut sim = Daemon::spawn("kube-sim", cmd, &dir.join("kube-sim.log"));
                let line = sim.wait_for_line("kube-sim listening on ", Duration::from_secs(20));
                let url = line.rsplit(' ').next().unwrap().trim().to_string();
                sim.wait_for_line("kubeconfig written", Duration::from_secs(5));
                ApiServer { kubeconfig, plain_url: Some(url), sim: Some(sim), pod_dir: Some(pods) }
            }
        }
    }

    /// kube-sim's fault counts by kind (`GET /_sim/faults`); with `set`, the faults are replaced
    /// from then on first (`Some("")`: none). Panics on a cluster, which has no such switch.
    pub async fn faults(&self, set: Option<&str>) -> BTreeMap<String, u64> {
        let url = self.plain_url.as_deref().expect("fault injection needs kube-sim");
        let mut url = url::Url::parse(&format!("{url}/_sim/faults")).unwrap();
        if let Some(spec) = set {
            url.query_pairs_mut().append_pair("set", spec);
        }
        let answer = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await;
        let answer = answer.and_then(|r| r.error_for_status()).expect("kube-sim answers /_sim/faults");
        answer.json().await.expect("fault counts are a JSON object of numbers")
    }
}

/// Writes a kubeconfig for a plain-HTTP server without credentials (kube-sim, a counter,
/// `kubectl proxy`).
pub fn plain_kubeconfig(path: &Path, url: &str, namespace: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster: {{server: \"{url}\"}}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: e2e, namespace: {namespace}}}\ncurrent-context: e2e\nusers:\n- name: e2e\n  user: {{}}\n"
    );
    std::fs::write(path, text).unwrap();
}
