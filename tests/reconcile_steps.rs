//! One reconcile's steps, watched through a recording API client (a fake API that keeps pods)
//! and a real registry: observing only reads, the one create is the attempt, every other write
//! is the act step's, and the pod is planned once. Then the faults a real API server has: a
//! create whose answer is lost, a pod read that fails — neither starts a second pod, and an
//! image bob built is never reported as a cache hit.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bob::controller::act::act;
use bob::controller::decide::{Need, Observed};
use bob::controller::engine::{self, World};
use bob::controller::observe::Cluster;
use bob::controller::pod::PLANNED;
use bob::crd::ImageBuild;
use common::fake_api::*;
use common::*;
use http::Method;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

const PASSWORD: &str = "steps-pass-9";

/// Which step of a reconcile made each API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Observe,
    Attempt,
    Act,
}

/// A world that runs the cluster's and notes which calls each of its steps made.
struct Recording<'a> {
    inner: Cluster<'a>,
    calls: Arc<Mutex<Vec<Call>>>,
    parts: Vec<(Part, Call)>,
}

impl Recording<'_> {
    fn note(&mut self, part: Part, from: usize) {
        let calls = self.calls.lock().unwrap();
        self.parts.extend(calls[from..].iter().cloned().map(|c| (part, c)));
    }
}

impl World for Recording<'_> {
    async fn observe(&mut self, ib: &ImageBuild, need: Need, seen: &mut Observed) {
        let from = self.calls.lock().unwrap().len();
        self.inner.observe(ib, need, seen).await;
        self.note(Part::Observe, from);
    }

    async fn attempt(&mut self, ib: &ImageBuild, pod: Pod, seen: &mut Observed) {
        let from = self.calls.lock().unwrap().len();
        self.inner.attempt(ib, pod, seen).await;
        self.note(Part::Attempt, from);
    }
}

/// Counts the pods `build_pod` plans (its tracing events).
#[derive(Clone, Default)]
struct Plans(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Plans {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == PLANNED {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// What the fake API does to the next pod create.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnCreate {
    Store,
    /// Store it, then answer 500 as if the connection dropped after the write.
    StoreAndLoseTheAnswer,
}

/// A fake API keeping pods, the registry Secret `reg`, and a switch for pod reads that fail.
struct Api {
    client: kube::Client,
    calls: Arc<Mutex<Vec<Call>>>,
    pods: Arc<Mutex<BTreeMap<String, Value>>>,
    on_create: Arc<Mutex<OnCreate>>,
    reads_fail: Arc<Mutex<bool>>,
}

fn api(secret: Value) -> Api {
    let pods = Arc::new(Mutex::new(BTreeMap::<String, Value>::new()));
    let on_create = Arc::new(Mutex::new(OnCreate::Store));
    let reads_fail = Arc::new(Mutex::new(false));
    let (store, mode, failing) = (pods.clone(), on_create.clone(), reads_fail.clone());
    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                             "code": 500, "message": "etcdserver: request timed out"});
    let (client, calls) = fake_api(move |c| {
        let name = c.path.split('?').next().unwrap_or_default().rsplit('/').next().unwrap_or_default();
        let mut pods = store.lock().unwrap();
        match (c.method.clone(), c.route()) {
            (_, r) if r == "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
            (Method::GET, r) if r.contains("/pods/") && *failing.lock().unwrap() => {
                (500, unavailable.clone())
            }
            (Method::GET, r) if r.contains("/pods/") => {
                pods.get(name).map_or_else(not_found, |p| (200, p.clone()))
            }
            (Method::POST, r) if r.ends_with("/pods") => {
                let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
                if pods.contains_key(&name) {
                    let exists = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "AlreadyExists", "code": 409, "message": "exists"});
                    return (409, exists);
                }
                let mut pod = c.body.clone();
                pod["metadata"]["uid"] = json!(format!("pod-uid-{}", pods.len() + 1));
                pods.insert(name, pod.clone());
                match *mode.lock().unwrap() {
                    OnCreate::Store => (201, pod),
                    OnCreate::StoreAndLoseTheAnswer => (500, unavailable.clone()),
                }
            }
            _ => default_reply(c),
        }
    });
    Api { client, calls, pods, on_create, reads_fail }
}

/// A registry with an image at `lib/app:1`; the Secret's docker config and the image.
async fn registry() -> (Registry, String, Image) {
    let reg = Registry::start(RegistryAuth::Basic { user: "steps", password: PASSWORD });
    let config = docker_config(&reg.host, "steps", PASSWORD);
    let img = small_image(47, "amd64");
    Direct::new(&reg.host, Some(&config)).push_image("lib/app", "1", &img).await;
    (reg, config, img)
}

fn spec(reg: &Registry) -> Value {
    json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo("ws"),
           "registryAuth": {"secretRef": {"name": "reg"}}})
}

/// One reconcile of `ib`, recorded: the calls by step, the pods planned, the status written.
async fn reconcile(
    api: &Api,
    ctx: &bob::controller::Context,
    ib: &ImageBuild,
) -> (Vec<(Part, Call)>, usize, Option<Value>) {
    use tracing_subscriber::layer::SubscriberExt;
    let plans = Plans::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(plans.clone()));
    let mut world =
        Recording { inner: Cluster::new(ctx, "default".into()), calls: api.calls.clone(), parts: vec![] };
    let t = engine::run(ib, &ctx.settings, &mut world, Timestamp::now()).await.unwrap();
    let Recording { inner, parts: mut steps, .. } = world;
    let from = api.calls.lock().unwrap().len();
    let _ = act(ib, &inner, t).await;
    steps.extend(api.calls.lock().unwrap()[from..].iter().cloned().map(|c| (Part::Act, c)));
    let written = last_status(&api.calls.lock().unwrap(), ib.metadata.name.as_deref().unwrap());
    (steps, plans.0.load(Ordering::SeqCst), written)
}

fn routes(steps: &[(Part, Call)], part: Part) -> Vec<String> {
    steps.iter().filter(|(p, _)| *p == part).map(|(_, c)| c.route()).collect()
}

/// `ib` with the status the last reconcile wrote (as the next watch event brings it).
fn with_status(ib: &ImageBuild, status: &Value) -> ImageBuild {
    let mut next = ib.clone();
    next.status = Some(serde_json::from_value(status.clone()).unwrap());
    next
}

#[tokio::test(flavor = "current_thread")]
async fn observation_only_reads_the_create_is_the_one_attempt_and_every_other_write_is_the_acts() {
    let (reg, config, _) = registry().await;
    let api = api(registry_secret("reg", &config));
    let ctx = context(api.client.clone());
    let ib = image_build("steps", spec(&reg), None);
    let (steps, plans, status) = reconcile(&api, &ctx, &ib).await;
    let observed = routes(&steps, Part::Observe);
    assert!(
        steps.iter().filter(|(p, _)| *p == Part::Observe).all(|(_, c)| c.method == Method::GET),
        "{observed:?}"
    );
    assert_eq!(
        observed,
        [
            "GET /api/v1/namespaces/default/secrets/reg",
            &format!("GET /api/v1/namespaces/default/pods/{}", pod_of(&api))
        ],
        "the Secret, then the attempt's pod (not there yet)"
    );
    assert_eq!(routes(&steps, Part::Attempt), ["POST /api/v1/namespaces/default/pods"], "one create");
    let acted = routes(&steps, Part::Act);
    assert_eq!(
        acted[0], "PATCH /apis/bob.dev/v1alpha1/namespaces/default/imagebuilds/steps/status",
        "{acted:?}"
    );
    assert!(acted[1..].iter().all(|r| r.contains("/events")), "then Events only: {acted:?}");
    assert_eq!(plans, 1, "planned once per reconcile");
    let status = status.unwrap();
    assert_eq!(status["phase"], "Building");
    assert_eq!(status["podUid"], "pod-uid-1");

    // The next reconcile follows the pod: reads only, and nothing is planned.
    let running = with_status(&ib, &status);
    let (steps, plans, _) = reconcile(&api, &ctx, &running).await;
    assert!(steps.iter().filter(|(p, _)| *p != Part::Act).all(|(_, c)| c.method == Method::GET), "{steps:?}");
    assert_eq!(plans, 0);
}

/// The one pod the fake API holds.
fn pod_of(api: &Api) -> String {
    api.pods.lock().unwrap().keys().next().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "current_thread")]
async fn a_create_whose_answer_is_lost_is_found_and_followed_never_made_twice_or_taken_for_a_hit() {
    let (reg, config, img) = registry().await;
    let api = api(registry_secret("reg", &config));
    let ctx = context(api.client.clone());
    let ib = image_build("lost", spec(&reg), None);
    *api.on_create.lock().unwrap() = OnCreate::StoreAndLoseTheAnswer;
    let (_, _, status) = reconcile(&api, &ctx, &ib).await;
    let status = status.expect("a status all the same");
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("ApiUnavailable"))
    );
    let condition =
        status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "ApiReachable").cloned();
    assert_eq!(condition.as_ref().map(|c| c["status"].clone()), Some(json!("False")), "{status}");

    // Meanwhile the pod ran and pushed the workspace image.
    let pod = pod_of(&api);
    let workspace = status["output"]["ref"].as_str().map(str::to_string);
    let workspace = workspace.unwrap_or_else(|| {
        let base = format!("{}@{}", reg.repo("lib/app"), img.digest);
        bob::key::workspace_ref(&reg.repo("ws"), &base)
    });
    let (repo, tag) = workspace[reg.host.len() + 1..].rsplit_once(':').unwrap();
    Direct::new(&reg.host, Some(&config)).push_image(repo, tag, &img).await;

    *api.on_create.lock().unwrap() = OnCreate::Store;
    let (steps, _, status) = reconcile(&api, &ctx, &with_status(&ib, &status)).await;
    let status = status.unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["podName"].as_str()),
        (Some("Building"), Some(pod.as_str())),
        "{status}"
    );
    assert_ne!(status["reason"], "CacheHit");
    assert!(routes(&steps, Part::Attempt).is_empty(), "no second create");
    assert_eq!(api.pods.lock().unwrap().len(), 1);
    let kept = status["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "ApiReachable");
    assert!(!kept, "the API answered: the condition is gone");
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_read_that_fails_keeps_the_build_and_its_attempt() {
    let (reg, config, _) = registry().await;
    let api = api(registry_secret("reg", &config));
    let ctx = context(api.client.clone());
    let ib = image_build("flaky", spec(&reg), None);
    let (_, _, status) = reconcile(&api, &ctx, &ib).await;
    let building = status.unwrap();
    *api.reads_fail.lock().unwrap() = true;
    let (steps, _, status) = reconcile(&api, &ctx, &with_status(&ib, &building)).await;
    let status = status.unwrap();
    assert_eq!(
        (&status["phase"], &status["attempts"], &status["podName"]),
        (&building["phase"], &building["attempts"], &building["podName"]),
        "{status}"
    );
    assert!(routes(&steps, Part::Attempt).is_empty(), "no new attempt for an unknown pod");
    assert_eq!(api.pods.lock().unwrap().len(), 1);
}
