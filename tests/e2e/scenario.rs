//! One scenario's world: an API server (its own kube-sim, or the shared cluster), bob installed
//! from the chart into a release namespace of its own, a build namespace, a registry with a
//! busybox base image under repositories of its own, the Secret, and the controller replicas.
//! On failure it prints the controllers' log tails, the ImageBuilds' YAML, the pods and Events;
//! it always stops every process and removes what it made.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use super::apiserver::{ApiServer, SimFlags, Target, plain_kubeconfig};
use super::common::build::busybox_image;
use super::common::{Direct, Registry, RegistryAuth, docker_config};
use super::counter::Counter;
use super::daemon::Daemon;
use super::install::{Controller, Release, service_account_kubeconfig};
use super::kubectl::Kubectl;

/// kube-sim runs every pod on this machine's network, where the build pod's proxy always listens
/// on 127.0.0.1:8080: scenarios that run build pods take turns (a cluster gives each pod its own
/// network; there they run in parallel). Scenarios with isolated pod networks share a turn:
/// kube-sim relays into a pod every host port its spec names that something on the host listens
/// on, 127.0.0.1:8080 (the proxy's own address) too, so a host-network build pod running at that
/// moment would take the isolated pod's proxy port.
static HOST_NETWORK: LazyLock<Arc<tokio::sync::RwLock<()>>> = LazyLock::new(Arc::default);

/// A scenario's turn on this machine's network: alone, or shared by isolated scenarios.
#[allow(dead_code)] // held for its Drop
enum Turn {
    Alone(tokio::sync::OwnedRwLockWriteGuard<()>),
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
}

const PASSWORD: &str = "e2e-pass-7f3a";

/// The User-Agent of the scenario's own API client.
pub const AGENT: &str = "bob-e2e";

/// What a scenario needs besides the defaults.
pub struct Options {
    /// Controller replicas (the chart turns on leader election above one).
    pub replicas: u32,
    /// Chart values over charts/bob/ci/e2e-values.yaml; `$NS` in a string stands for the build
    /// namespace (made up when the scenario starts).
    pub values: Value,
    /// Environment of the controllers besides the Deployment's (a cloud identity in tests).
    pub controller_env: Vec<(String, String)>,
    /// Labels of the build namespace (Pod Security levels).
    pub labels: Vec<(&'static str, &'static str)>,
    /// Create the registry Secret `reg` in the build namespace.
    pub secret: bool,
    /// Build pods run (kube-sim: take the host network's turn).
    pub pods: bool,
    /// The controllers reach the API server through the counting proxy (off only for the
    /// benchmark, which measures what users run).
    pub counted: bool,
    /// The counting proxy opens a new connection to the API server for every request: kube-sim
    /// (Python's http.server, no TCP_NODELAY) writes a response's head and body separately, and
    /// on a kept-alive connection the body waits for the client's delayed ACK, about 40 ms
    /// (docs/benchmarks.md). A real API server does not; the benchmark measures both ways.
    pub fresh_connections: bool,
    /// kube-sim's `--faults SPEC` from the start (`Scenario::faults` switches them later).
    pub faults: Option<String>,
    /// kube-sim's `--pod-network isolated`: build pods do not share this machine's network, so
    /// the scenario's builds run at once, and it shares its turn with other isolated scenarios
    /// (see `HOST_NETWORK`; needs root).
    pub isolated: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            replicas: 1,
            values: json!({}),
            controller_env: Vec::new(),
            labels: Vec::new(),
            secret: true,
            pods: true,
            counted: true,
            fresh_connections: false,
            faults: None,
            isolated: false,
        }
    }
}

/// Every pod the build namespace had: name → (uid, most owners seen).
pub type PodLog = Arc<Mutex<BTreeMap<String, (String, usize)>>>;

/// A running scenario.
pub struct Scenario {
    /// The scenario's name.
    pub name: String,
    /// The build namespace.
    pub ns: String,
    /// The chart's release.
    pub release: Release,
    /// kubectl for the API server.
    pub kubectl: Kubectl,
    /// A client for reading and watching (never for changes; those go through kubectl).
    pub client: kube::Client,
    /// The `FROM` image: `<registry>/<prefix>/busybox:1`, and its digest.
    pub from: String,
    /// Its manifest digest.
    pub from_digest: String,
    /// `<registry>/<prefix>`: the scenario's repositories.
    pub repos: String,
    /// The docker config of the registry Secret.
    pub creds: String,
    /// Controller replicas.
    pub controllers: Vec<Controller>,
    /// The kubeconfig the controllers use.
    pub controller_kubeconfig: PathBuf,
    /// Every pod seen in the build namespace.
    pub pods: PodLog,
    /// Environment of the controllers besides the Deployment's.
    pub controller_env: Vec<(String, String)>,
    /// The counting proxy in front of the API server, for the controllers.
    pub counter: Option<Counter>,
    pub(super) registry_host: String,
    dir: PathBuf,
    target: Target,
    registry: Option<Registry>,
    api: ApiServer,
    extra: Vec<Daemon>,
    _turn: Option<Turn>,
    work: Option<tempfile::TempDir>,
}

fn short(name: &str) -> String {
    let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(24).collect();
    let rand: u32 = std::process::id()
        ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos());
    format!("e2e-{}-{:04x}", s.trim_end_matches('-'), rand & 0xffff)
}

impl Scenario {
    /// Sets up the world of scenario `name`.
    pub async fn start(target: &Target, name: &str, opts: Options) -> Self {
        let turn = match (target.is_kube_sim() && opts.pods, opts.isolated) {
            (true, false) => Some(Turn::Alone(HOST_NETWORK.clone().write_owned().await)),
            (true, true) => Some(Turn::Shared(HOST_NETWORK.clone().read_owned().await)),
            (false, _) => None,
        };
        let work = tempfile::Builder::new().prefix("bob-e2e-").tempdir().unwrap();
        let dir = work.path().to_path_buf();
        let flags = SimFlags { faults: opts.faults.clone(), isolated: opts.isolated };
        let api = ApiServer::start(target, &dir, &flags);
        let kubectl = Kubectl::new(&api.kubeconfig, &dir.join("kubectl-cache"));
        let prefix = short(name);
        let ns = prefix.clone();
        let release_ns = format!("{prefix}-sys");

        let (registry, host, creds) = match target {
            Target::KubeSim { .. } => {
                let reg = Registry::start(RegistryAuth::Basic { user: "builder", password: PASSWORD });
                let creds = docker_config(&reg.host, "builder", PASSWORD);
                let host = reg.host.clone();
                (Some(reg), host, creds)
            }
            // The cluster's registry needs no credentials; the Secret still names it.
            Target::Cluster { registry, .. } => {
                (None, registry.clone(), docker_config(registry, "e2e", "unused"))
            }
        };
        let image = busybox_image();
        Direct::new(&host, Some(&creds)).push_image(&format!("{prefix}/busybox"), "1", &image).await;
        let from = format!("{host}/{prefix}/busybox:1");

        let mut values: Value = serde_json::from_str(&opts.values.to_string().replace("$NS", &ns)).unwrap();
        values["replicas"] = json!(opts.replicas);
        if let Target::Cluster { image, registry, .. } = target {
            let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
            values["image"] = json!({"repository": repo, "tag": tag});
            values["controller"]["insecureRegistries"] = json!([registry]);
            // Scenarios share the cluster: each controller sees only its own namespace.
            values["controller"]["watchNamespace"] = json!(ns);
        }
        // The installation's own values (a cluster's needs, e.g. buildSecurity), then the scenario's.
        let site: Value = match std::env::var("BOB_E2E_VALUES") {
            Ok(v) => serde_json::from_str(&v).expect("BOB_E2E_VALUES is a JSON object of chart values"),
            Err(_) => json!({}),
        };
        let release = Release::render(&release_ns, &[site, values]);
        // The build namespace first: the chart may render objects into it (its NetworkPolicy).
        kubectl.ok(&["create", "namespace", &ns], None).await;
        for (k, v) in &opts.labels {
            kubectl.ok(&["label", "namespace", &ns, &format!("{k}={v}")], None).await;
        }
        release.install(&kubectl).await;

        let config = kube::config::Kubeconfig::read_from(&api.kubeconfig).unwrap();
        let mut config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await.unwrap();
        // The test's own reads and watches are spared by kube-sim's fault injection
        // (`agent=^(?!kubectl|bob-e2e)`), as kubectl is: the faults are the controller's.
        config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(AGENT)));
        let client = kube::Client::try_from(config).unwrap();
        let pods = watch_pods(client.clone(), &ns);

        // The controller reaches the API server through the counting proxy (every call is
        // counted and checked against the chart's RBAC); on a TLS cluster the plain-HTTP hop
        // behind it is `kubectl proxy` authenticated as the chart's ServiceAccount.
        let mut extra = Vec::new();
        let upstream = match target {
            Target::KubeSim { .. } => api.plain_url.clone().unwrap(),
            Target::Cluster { .. } => {
                let sa = dir.join("controller-sa.kubeconfig");
                service_account_kubeconfig(&kubectl, &release, &sa).await;
                let mut cmd = std::process::Command::new("kubectl");
                cmd.args(["proxy", "--port", "0", "--kubeconfig"]).arg(&sa);
                let mut p = Daemon::spawn("kubectl proxy", cmd, &dir.join("kubectl-proxy.log"));
                let line = p.wait_for_line("Starting to serve on", Duration::from_secs(20));
                extra.push(p);
                format!("http://{}", line.rsplit(' ').next().unwrap().trim())
            }
        };
        let counter = opts.counted.then(|| Counter::start(&upstream, opts.fresh_connections));
        let controller_kubeconfig = dir.join("controller.kubeconfig");
        match (&counter, target) {
            (Some(c), _) => plain_kubeconfig(&controller_kubeconfig, &c.url, &ns),
            (None, Target::KubeSim { .. }) => plain_kubeconfig(&controller_kubeconfig, &upstream, &ns),
            (None, Target::Cluster { .. }) => {
                service_account_kubeconfig(&kubectl, &release, &controller_kubeconfig).await
            }
        }
        let mut s = Scenario {
            name: name.to_string(),
            ns,
            release,
            kubectl,
            client,
            from,
            from_digest: image.digest,
            repos: format!("{host}/{prefix}"),
            creds,
            controllers: Vec::new(),
            controller_kubeconfig,
            pods,
            controller_env: opts.controller_env.clone(),
            counter,
            registry_host: host,
            dir,
            target: target.clone(),
            registry,
            api,
            extra,
            _turn: turn,
            work: Some(work),
        };
        if opts.secret {
            s.create_secret().await;
        }
        for _ in 0..opts.replicas {
            s.start_controller();
        }
        s
    }

    /// The scenario's API server (kube-sim's fault switch and pod directory).
    pub fn api(&self) -> &ApiServer {
        &self.api
    }

    /// The kubeconfig of a user of the API server (what `kubectl` and `bob logs` use).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.api.kubeconfig
    }

    /// The registry Secret's password (to prove it never reaches a log).
    pub fn password(&self) -> &'static str {
        PASSWORD
    }

    /// `kubectl create secret docker-registry reg` for the scenario's registry.
    pub async fn create_secret(&self) {
        let args = [
            "create",
            "secret",
            "docker-registry",
            "reg",
            "-n",
            &self.ns,
            "--docker-server",
            &self.registry_host,
            "--docker-username",
            "builder",
            "--docker-password",
            PASSWORD,
        ];
        self.kubectl.ok(&args, None).await;
    }

    /// Starts one more controller replica (a new pod of the Deployment).
    pub fn start_controller(&mut self) -> &Controller {
        self.try_start_controller().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Scenario::start_controller`], or why the replica did not become ready (a pod that the
    /// kubelet would start again; the next try appends to the same log).
    pub fn try_start_controller(&mut self) -> Result<&Controller, String> {
        let identity = format!("bob-controller-e2e-{}", self.controllers.len());
        let c = Controller::try_start(
            &self.release,
            &self.controller_kubeconfig,
            &identity,
            &self.dir,
            &self.controller_env,
        )?;
        self.controllers.push(c);
        Ok(self.controllers.last().unwrap())
    }

    /// The end of every scenario: no ImageBuild is left without a phase. Then cleans up.
    pub async fn finish(self) {
        let all = self.builds().list(&ListParams::default()).await.unwrap();
        let phaseless: Vec<String> = all
            .items
            .iter()
            .filter(|o| o.data["status"]["phase"].as_str().is_none())
            .map(|o| o.metadata.name.clone().unwrap_or_default())
            .collect();
        assert!(phaseless.is_empty(), "ImageBuilds without a phase at the end: {phaseless:?}");
        if self.counter.is_some() {
            super::rbac::check(&self.release, &self.calls());
        }
    }

    fn diagnostics(&self) {
        let mut out = format!("\n===== e2e diagnostics: {} (namespace {}) =====\n", self.name, self.ns);
        for c in &self.controllers {
            out += &format!(
                "--- controller {} (last 40 lines of {}):\n{}\n",
                c.identity,
                c.daemon.log.display(),
                c.daemon.tail(40)
            );
        }
        let k = &self.kubectl;
        out += &format!(
            "--- kubectl get imagebuilds -o yaml:\n{}",
            k.now(&["get", "imagebuilds", "-n", &self.ns, "-o", "yaml"])
        );
        out += &format!(
            "--- kubectl get pods -o wide:\n{}",
            k.now(&["get", "pods", "-n", &self.ns, "-o", "wide"])
        );
        let pods = k.now(&["get", "pods", "-n", &self.ns, "-o", "yaml"]);
        out += &format!(
            "--- kubectl get pods -o yaml (first 150 lines):\n{}\n",
            pods.lines().take(150).collect::<Vec<_>>().join("\n")
        );
        out += &format!("--- kubectl get events:\n{}", k.now(&["get", "events", "-n", &self.ns]));
        if let Some(sim) = &self.api.sim {
            out += &format!("--- kube-sim (last 30 lines of {}):\n{}\n", sim.log.display(), sim.tail(30));
        }
        eprintln!("{out}===== end of diagnostics: {} =====", self.name);
    }
}

/// Records every pod of `ns` from a watch: a pod that lived between two looks is seen too.
fn watch_pods(client: kube::Client, ns: &str) -> PodLog {
    let log: PodLog = Arc::default();
    let api: Api<Pod> = Api::namespaced(client, ns);
    let seen = log.clone();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).applied_objects().boxed();
        while let Some(ev) = stream.next().await {
            let Ok(pod) = ev else { continue };
            let owners = pod.metadata.owner_references.as_ref().map_or(0, |o| o.len());
            let mut seen = seen.lock().unwrap();
            let entry = seen
                .entry(pod.metadata.name.clone().unwrap_or_default())
                .or_insert((pod.metadata.uid.clone().unwrap_or_default(), 0));
            entry.1 = entry.1.max(owners);
        }
    });
    log
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.diagnostics();
        }
        if std::env::var_os("BOB_E2E_KEEP").is_some() {
            let kept = self.work.take().unwrap().keep();
            eprintln!("e2e: BOB_E2E_KEEP: kept {} ({})", kept.display(), self.name);
        }
        for c in &mut self.controllers {
            c.daemon.stop(Duration::from_secs(10));
        }
        self.counter.take();
        self.extra.clear();
        if matches!(self.target, Target::Cluster { .. }) {
            for ns in [&self.ns, &self.release.ns] {
                let _ = self.kubectl.now(&["delete", "namespace", ns, "--wait=false"]);
            }
            let _ = self.kubectl.now(&[
                "delete",
                "clusterrole,clusterrolebinding",
                &format!("bob-controller-{}", self.release.ns),
            ]);
        }
        if let Some(sim) = &mut self.api.sim {
            sim.stop(Duration::from_secs(15));
        }
        self.registry.take();
    }
}
