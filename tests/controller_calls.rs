//! The controller's API calls where they matter, against a fake API (tower-test) and a real
//! registry: a cache hit writes Succeeded and creates no pod; a new build creates one pod; a
//! finished build is verified in the registry; ImageBuilds of one key share
//! one pod, also across a controller restart (`Controller::for_stream`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bob::controller::reconcile::reconcile;
use bob::controller::{error_policy, pod::pod_name};
use bob::crd::ImageBuild;
use bob::key;
use common::fake_api::*;
use common::*;
use futures::StreamExt;
use http::Method;
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};

const PASSWORD: &str = "ctrl-pass-41";

/// A registry with basic auth holding one image at `lib/app:1`; the Secret's docker config.
async fn registry() -> (Registry, String, Image) {
    let reg = Registry::start(RegistryAuth::Basic { user: "ctrl", password: PASSWORD });
    let config = docker_config(&reg.host, "ctrl", PASSWORD);
    let img = small_image(31, "amd64");
    Direct::new(&reg.host, Some(&config)).push_image("lib/app", "1", &img).await;
    (reg, config, img)
}

fn image_spec(reg: &Registry) -> Value {
    json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo("ws"),
           "registryAuth": {"secretRef": {"name": "reg"}}})
}

/// The workspace ref an image source at `digest` plans to.
fn workspace_ref(reg: &Registry, digest: &str) -> String {
    key::workspace_ref(&reg.repo("ws"), &format!("{}@{digest}", reg.repo("lib/app")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_hit_writes_succeeded_and_creates_no_pod() {
    let (reg, config, img) = registry().await;
    let ws = workspace_ref(&reg, &img.digest);
    let (repo, tag) = ws[reg.host.len() + 1..].rsplit_once(':').unwrap();
    Direct::new(&reg.host, Some(&config)).push_image(repo, tag, &img).await;
    let secret = registry_secret("reg", &config);
    let (client, calls) = fake_api(move |c| match c.route().as_str() {
        "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
        _ => default_reply(c),
    });
    let ib = Arc::new(image_build("hit", image_spec(&reg), None));
    let ctx = context(client);
    let ctx_metrics = ctx.metrics.clone();
    reconcile(ib, ctx).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    // The attempt's pod is looked for (a lost answer may have left one), never created.
    assert!(
        calls.iter().all(|c| !c.path.contains("/pods") || c.method == http::Method::GET),
        "no pod written: {:?}",
        calls.iter().map(|c| c.route()).collect::<Vec<_>>()
    );
    let status = last_status(&calls, "hit").expect("status written");
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str(), &status["cacheHit"]),
        (Some("Succeeded"), Some("CacheHit"), &json!(true))
    );
    assert_eq!(status["output"]["digest"].as_str(), Some(img.digest.as_str()), "the verified digest");
    let metrics = ctx_metrics.encode();
    assert!(metrics.contains(r#"bob_registry_requests_total{status="2xx"}"#), "{metrics}");
    assert!(metrics.contains(r#"bob_builds_total{outcome="Succeeded",reason="CacheHit"} 1"#), "{metrics}");
    let patch = calls.iter().find(|c| c.path.contains("/status")).unwrap();
    assert!(
        patch.path.contains("fieldManager=bob-controller") && patch.path.contains("force=true"),
        "{}",
        patch.path
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_build_creates_one_pod_then_reports_building() {
    let (reg, config, _) = registry().await;
    let secret = registry_secret("reg", &config);
    let (client, calls) = builder_api(secret);
    let ib = Arc::new(image_build("new", image_spec(&reg), None));
    reconcile(ib, context(client)).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let writes: Vec<_> =
        calls.iter().filter(|c| c.method != Method::GET && c.path.contains("/pods")).collect();
    assert_eq!(writes.len(), 1, "exactly one pod write");
    let pod = &writes[0].body;
    assert_eq!(writes[0].method, Method::POST, "created, so one key can never make two pods");
    assert!(writes[0].path.contains("fieldManager=bob-controller"), "{}", writes[0].path);
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["name"], "new");
    let status = last_status(&calls, "new").unwrap();
    assert_eq!(status["phase"], "Building");
    assert_eq!(status["podName"], pod["metadata"]["name"]);
    assert_eq!(status["observedGeneration"], 1);
}

fn finished_pod(name: &str, result: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0,
              "image": "bob", "imageID": "", "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": result.to_string()}}}]}})
}

async fn verify_case(push_workspace: bool) -> Value {
    let (reg, config, img) = registry().await;
    let ws = workspace_ref(&reg, &img.digest);
    if push_workspace {
        let (repo, tag) = ws[reg.host.len() + 1..].rsplit_once(':').unwrap();
        Direct::new(&reg.host, Some(&config)).push_image(repo, tag, &img).await;
    }
    let pod = pod_name(Some("reg"), &ws, 1);
    let result = json!({"version": 1, "baseDigest": img.digest, "targetDigest": img.digest, "timings": {"resolveMs": 1, "totalMs": 5}});
    let (secret, running) = (registry_secret("reg", &config), finished_pod(&pod, &result));
    let (client, calls) = fake_api(move |c| match c.route().as_str() {
        "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
        r if r.starts_with("GET /api/v1/namespaces/default/pods/") => (200, running.clone()),
        _ => default_reply(c),
    });
    let status = json!({"phase": "Building", "observedGeneration": 1, "podName": pod, "attempts": 1,
                        "output": {"ref": ws}, "baseImage": {"ref": format!("{}@{}", reg.repo("lib/app"), img.digest)}});
    let ib = Arc::new(image_build("verify", image_spec(&reg), Some(status)));
    reconcile(ib, context(client)).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|c| !matches!(c.method, Method::POST | Method::PATCH) || !c.path.contains("/pods")),
        "no pod created or changed while following (a finished pod may be deleted)"
    );
    let mut status = last_status(&calls, "verify").unwrap();
    status["expected"] = json!(img.digest);
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_build_is_verified_in_the_registry_before_succeeded() {
    let ok = verify_case(true).await;
    assert_eq!((ok["phase"].as_str(), ok["reason"].as_str()), (Some("Succeeded"), Some("Built")));
    assert_eq!(ok["output"]["digest"], ok["expected"]);
    let missing = verify_case(false).await;
    assert_eq!(
        (missing["phase"].as_str(), missing["reason"].as_str()),
        (Some("Failed"), Some("VerifyFailed"))
    );
    assert!(
        missing["message"].as_str().unwrap().starts_with("image build did not produce a workspace image")
    );
}

/// Pods by name, kept by the fake API.
type Pods = Arc<Mutex<BTreeMap<String, Value>>>;

/// A fake API that keeps pods (a create of an existing one is 409; join by strategic merge).
fn pod_store(secret: Value) -> (kube::Client, Arc<Mutex<Vec<Call>>>, Pods) {
    let pods = Arc::new(Mutex::new(BTreeMap::<String, Value>::new()));
    let store = pods.clone();
    let (client, calls) = fake_api(move |c| {
        let name =
            c.path.split('?').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
        let mut pods = store.lock().unwrap();
        match (c.method.clone(), c.route()) {
            (_, r) if r == "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
            (Method::GET, r) if r.contains("/pods/") => {
                pods.get(&name).map_or_else(not_found, |p| (200, p.clone()))
            }
            (Method::POST, r) if r.ends_with("/pods") => {
                let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
                if pods.contains_key(&name) {
                    let exists = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "AlreadyExists", "code": 409, "message": "exists"});
                    return (409, exists);
                }
                pods.insert(name, c.body.clone());
                (201, c.body.clone())
            }
            (Method::PATCH, r) if r.contains("/pods/") => {
                let pod = pods.get_mut(&name).expect("joined pods exist");
                let owners = pod["metadata"]["ownerReferences"].as_array_mut().unwrap();
                owners.extend(c.body["metadata"]["ownerReferences"].as_array().unwrap().iter().cloned());
                (200, pod.clone())
            }
            _ => default_reply(c),
        }
    });
    (client, calls, pods)
}

/// Runs the real Controller over a fixed set of ImageBuilds until each was reconciled once.
async fn run_controller(client: kube::Client, builds: Vec<ImageBuild>) {
    let (reader, writer) = reflector::store();
    let mut events = vec![watcher::Event::Init];
    events.extend(builds.iter().cloned().map(watcher::Event::InitApply));
    events.push(watcher::Event::InitDone);
    let stream = futures::stream::iter(events.into_iter().map(Ok)).chain(futures::stream::pending());
    let objects = reflector(writer, stream).applied_objects();
    let results = Controller::for_stream(objects, reader).run(reconcile, error_policy, context(client));
    let done: Vec<_> =
        tokio::time::timeout(Duration::from_secs(20), results.take(builds.len()).collect::<Vec<_>>())
            .await
            .unwrap();
    assert!(done.iter().all(Result::is_ok), "{done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_builds_of_one_key_share_one_pod_also_after_a_restart() {
    let (reg, config, _) = registry().await;
    let (client, calls, pods) = pod_store(registry_secret("reg", &config));
    let a = image_build("team-a", image_spec(&reg), None);
    let b = image_build("team-b", image_spec(&reg), None);
    run_controller(client.clone(), vec![a.clone(), b.clone()]).await;
    assert_eq!(pods.lock().unwrap().len(), 1, "one pod for one key");
    let pod = pods.lock().unwrap().values().next().unwrap().clone();
    let owners: Vec<&str> = pod["metadata"]["ownerReferences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 2, "both ImageBuilds own it, so deleting one keeps it: {owners:?}");
    let controllers = pod["metadata"]["ownerReferences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["controller"] == true)
        .count();
    assert_eq!(controllers, 1, "one controller owner");
    let calls_now = calls.lock().unwrap().clone();
    let (sa, sb) = (last_status(&calls_now, "team-a").unwrap(), last_status(&calls_now, "team-b").unwrap());
    assert_eq!(sa["podName"], sb["podName"], "followers report the shared pod");

    // A restarted controller whose status writes were lost finds the pod instead of making another.
    run_controller(client, vec![a, b]).await;
    assert_eq!(pods.lock().unwrap().len(), 1, "no duplicate pod after a restart");
    let stored = pods.lock().unwrap().values().next().unwrap().clone();
    let owners = stored["metadata"]["ownerReferences"].as_array().unwrap().len();
    assert_eq!(owners, 2, "no owner was added twice after the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_phase_is_final_for_its_generation_and_a_new_generation_plans_again() {
    let (reg, config, _) = registry().await;
    let secret = registry_secret("reg", &config);
    let (client, calls) = builder_api(secret);
    let done = json!({"phase": "Failed", "reason": "BuildStepFailed", "observedGeneration": 1, "message": "step 2/2 failed"});
    let ib = Arc::new(image_build("edited", image_spec(&reg), Some(done)));
    let ctx = context(client);
    reconcile(ib.clone(), ctx.clone()).await.unwrap();
    assert!(
        calls.lock().unwrap().is_empty(),
        "nothing happens to a terminal ImageBuild of the same generation"
    );

    let mut edited = (*ib).clone();
    edited.metadata.generation = Some(2);
    reconcile(Arc::new(edited), ctx).await.unwrap();
    let status = last_status(&calls.lock().unwrap(), "edited").unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["observedGeneration"].as_i64()),
        (Some("Building"), Some(2))
    );
    assert!(status.get("failure").is_none(), "the old generation's failure is gone: {status:#}");
}
