//! The ends of a build against a fake API (tower-test): infrastructure failures retried on a new
//! pod after a backoff, user failures final, cancel keeping the build's last output, finished
//! pods deleted only when no other owner follows them, and the metrics that count all of it.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bob::controller::pod::pod_name;
use bob::controller::reconcile::reconcile;
use common::fake_api::*;
use http::Method;
use serde_json::{Value, json};
use tower::ServiceExt;

const WS: &str = "reg.test/ws:0123";

fn spec() -> Value {
    json!({"source": {"image": {"ref": "reg.test/lib/app:1"}}, "workspaceImageRepository": "reg.test/ws"})
}

fn owner(name: &str, controller: bool) -> Value {
    let ib = image_build(name, spec(), None);
    json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "name": name, "uid": ib.metadata.uid, "controller": controller})
}

fn pod(name: &str, owners: Vec<Value>, status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "ownerReferences": owners},
           "status": status})
}

fn building(pod: &str, attempts: i32) -> Value {
    json!({"phase": "Building", "observedGeneration": 1, "podName": pod, "attempts": attempts, "output": {"ref": WS}})
}

/// A fake API with pods and ImageBuilds by name; logs of `build` are fixed text.
fn cluster(pods: Vec<Value>, builds: Vec<Value>) -> (kube::Client, Arc<Mutex<Vec<Call>>>) {
    let pods: BTreeMap<String, Value> =
        pods.into_iter().map(|p| (p["metadata"]["name"].as_str().unwrap().to_string(), p)).collect();
    let builds: BTreeMap<String, Value> =
        builds.into_iter().map(|b| (b["metadata"]["name"].as_str().unwrap().to_string(), b)).collect();
    let pods = Mutex::new(pods);
    fake_api(move |c| {
        let path = c.path.split('?').next().unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default();
        match c.method.clone() {
            Method::GET if path.ends_with("/log") => (200, Value::String("step 1\nstill compiling\n".into())),
            Method::GET if path.contains("/pods/") => {
                pods.lock().unwrap().get(name).map_or_else(not_found, |p| (200, p.clone()))
            }
            Method::GET if path.contains("/secrets/") => not_found(),
            Method::GET if path.contains("/imagebuilds/") => {
                builds.get(name).map_or_else(not_found, |b| (200, b.clone()))
            }
            Method::DELETE if path.contains("/pods/") => {
                let removed = pods.lock().unwrap().remove(name);
                removed.map_or_else(not_found, |p| (200, p))
            }
            Method::POST if path.ends_with("/pods") => {
                let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
                pods.lock().unwrap().insert(name, c.body.clone());
                (201, c.body.clone())
            }
            _ => default_reply(c),
        }
    })
}

fn deleted(calls: &[Call], pod: &str) -> bool {
    calls.iter().any(|c| c.method == Method::DELETE && c.path.contains(&format!("/pods/{pod}")))
}

fn evicted() -> Value {
    json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."})
}

#[tokio::test(flavor = "multi_thread")]
async fn an_eviction_is_retried_on_a_new_pod_after_the_backoff() {
    // A real registry, so that attempt 2 can be planned; the image source is anonymous here.
    let reg = common::Registry::start(common::RegistryAuth::None);
    let img = common::small_image(8, "amd64");
    common::Direct::new(&reg.host, None).push_image("lib/app", "1", &img).await;
    let spec = json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo("ws")});
    let ws = bob::key::workspace_ref(&reg.repo("ws"), &format!("{}@{}", reg.repo("lib/app"), img.digest));
    let (first, second) = (pod_name(None, &ws, 1), pod_name(None, &ws, 2));
    let mut status = building(&first, 1);
    status["output"]["ref"] = json!(ws);
    let ib = image_build("retry", spec, Some(status));
    let (client, calls) = cluster(vec![pod(&first, vec![owner("retry", true)], evicted())], vec![]);
    let ctx = context(client);
    reconcile(Arc::new(ib.clone()), ctx.clone()).await.unwrap();
    let status = last_status(&calls.lock().unwrap(), "retry").unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("PodEvicted")),
        "{status:#}"
    );
    assert_eq!(status["attempts"], 1);
    assert!(status["nextAttemptAt"].is_string() && status.get("podName").is_none(), "{status:#}");
    assert!(status["message"].as_str().unwrap().contains("attempt 2 of 3"), "{status:#}");
    assert_eq!(status["failure"]["reason"], "PodEvicted", "the evidence of the failed attempt is kept");
    assert!(deleted(&calls.lock().unwrap(), &first), "the evicted pod is cleaned up");

    // Before the backoff ends nothing starts; after it, attempt 2 gets its own pod.
    let mut waiting = ib.clone();
    waiting.status = serde_json::from_value(status).unwrap();
    calls.lock().unwrap().clear();
    reconcile(Arc::new(waiting.clone()), ctx.clone()).await.unwrap();
    assert!(calls.lock().unwrap().is_empty(), "still backing off");
    waiting.status.as_mut().unwrap().next_attempt_at = None;
    reconcile(Arc::new(waiting), ctx.clone()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let created: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == Method::POST && c.route().ends_with("/pods"))
        .map(|c| c.body["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(created, [second.as_str()], "attempt 2 has its own pod");
    let status = last_status(&calls, "retry").unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["attempts"].as_i64()),
        (Some("Building"), Some(2)),
        "{status:#}"
    );
    assert!(ctx.metrics.encode().contains(r#"bob_build_retries_total{reason="PodEvicted"} 1"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_build_step_is_final_and_its_pod_cleaned_up() {
    let name = pod_name(None, WS, 1);
    let msg = r#"{"version":1,"reason":"BuildStepFailed","message":"step 2/2 failed","logTail":"boom\n"}"#;
    let failed = json!({"phase": "Failed", "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0, "image": "b",
        "imageID": "", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": msg}}}]});
    let ib = image_build("user", spec(), Some(building(&name, 1)));
    let (client, calls) = cluster(vec![pod(&name, vec![owner("user", true)], failed)], vec![]);
    let ctx = context(client);
    reconcile(Arc::new(ib), ctx.clone()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let status = last_status(&calls, "user").unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Failed"), Some("BuildStepFailed"))
    );
    assert_eq!(status["failure"]["logTail"], "boom\n");
    assert!(deleted(&calls, &name), "evidence recorded, pod removed");
    let event =
        calls.iter().find(|c| c.method == Method::POST && c.path.contains("/events")).expect("an Event");
    assert_eq!(
        (event.body["type"].as_str(), event.body["reason"].as_str()),
        (Some("Warning"), Some("BuildStepFailed"))
    );
    assert_eq!(event.body["regarding"]["name"], "user");
    assert!(
        ctx.metrics.encode().contains(r#"bob_builds_total{outcome="Failed",reason="BuildStepFailed"} 1"#),
        "{}",
        ctx.metrics.encode()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_keeps_the_last_output_and_stops_the_pod_only_if_no_one_else_needs_it() {
    let name = pod_name(None, WS, 1);
    let running = json!({"phase": "Running"});
    let mut ib = image_build("stop", spec(), Some(building(&name, 1)));
    ib.spec.cancel = true;
    ib.metadata.generation = Some(2);
    let (client, calls) = cluster(vec![pod(&name, vec![owner("stop", true)], running.clone())], vec![]);
    reconcile(Arc::new(ib.clone()), context(client)).await.unwrap();
    let calls_now = calls.lock().unwrap().clone();
    let status = last_status(&calls_now, "stop").unwrap();
    assert_eq!(
        (status["phase"].as_str(), status["observedGeneration"].as_i64()),
        (Some("Cancelled"), Some(2))
    );
    assert_eq!(status["failure"]["logTail"], "step 1\nstill compiling\n");
    assert!(deleted(&calls_now, &name), "the only owner cancelled: the build stops");

    // A shared build another ImageBuild still follows keeps running.
    let other = serde_json::to_value(image_build("other", spec(), Some(building(&name, 1)))).unwrap();
    let shared = pod(&name, vec![owner("other", true), owner("stop", false)], running);
    let (client, calls) = cluster(vec![shared], vec![other]);
    reconcile(Arc::new(ib), context(client)).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(last_status(&calls, "stop").unwrap()["phase"], "Cancelled");
    assert!(!deleted(&calls, &name), "another ImageBuild still needs the pod");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_surface_serves_metrics_health_and_readiness() {
    let (client, _) = cluster(vec![], vec![]);
    let ctx = context(client);
    use bob::controller::metrics::{OutcomeLabels, ReasonLabel};
    ctx.metrics.pods_created.inc();
    let outcome = OutcomeLabels { outcome: "Succeeded".into(), reason: "CacheHit".into() };
    ctx.metrics.builds.get_or_create(&outcome).inc();
    ctx.metrics.reconcile_errors.get_or_create(&ReasonLabel { reason: "kube".into() }).inc();
    let app = bob::controller::metrics::router(ctx.metrics.clone());
    let get = |path: &str| http::Request::get(path).body(axum::body::Body::empty()).unwrap();
    let resp = app.clone().oneshot(get("/readyz")).await.unwrap();
    assert_eq!(resp.status(), 503, "not ready before the controller watches");
    ctx.metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(app.clone().oneshot(get("/readyz")).await.unwrap().status(), 200);
    assert_eq!(app.clone().oneshot(get("/healthz")).await.unwrap().status(), 200);
    let body = app.oneshot(get("/metrics")).await.unwrap().into_body();
    let text = String::from_utf8(axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec()).unwrap();
    for name in [
        r#"bob_builds_total{outcome="Succeeded",reason="CacheHit"} 1"#,
        "# TYPE bob_build_duration_seconds histogram",
        "bob_pods_created_total 1",
        "bob_pods_joined_total 0",
        r#"bob_reconcile_errors_total{reason="kube"} 1"#,
        "# TYPE bob_queue_depth gauge",
        "# TYPE bob_queue_wait_seconds histogram",
        "# TYPE bob_leader gauge",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_the_concurrency_limit_builds_wait_queued_in_order() {
    use kube::runtime::{reflector, watcher};
    let reg = common::Registry::start(common::RegistryAuth::None);
    let img = common::small_image(9, "amd64");
    common::Direct::new(&reg.host, None).push_image("lib/app", "1", &img).await;
    let spec = |n: u8| json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo(&format!("ws{n}"))});
    let (older, newer) = (image_build("older", spec(1), None), image_build("newer", spec(2), None));
    let running = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        {"metadata": {"name": "bob-build-busy-1", "namespace": "default"}, "status": {"phase": "Running"}}]});
    let slots_taken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let taken = slots_taken.clone();
    let (client, calls) = fake_api(move |c| match c.method.clone() {
        Method::GET if c.route() == "GET /api/v1/pods" => {
            let busy = taken.load(std::sync::atomic::Ordering::SeqCst);
            (
                200,
                if busy {
                    running.clone()
                } else {
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
                },
            )
        }
        Method::GET if c.path.contains("/pods/") => not_found(),
        Method::POST if c.route().ends_with("/pods") => (201, c.body.clone()),
        _ => default_reply(c),
    });
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(older.clone()));
    writer.apply_watcher_event(&watcher::Event::Apply(newer.clone()));
    let ctx = one_slot(client, reader);

    // The only slot is taken: both wait, the older one first.
    reconcile(Arc::new(newer.clone()), ctx.clone()).await.unwrap();
    reconcile(Arc::new(older.clone()), ctx.clone()).await.unwrap();
    let now = calls.lock().unwrap().clone();
    let (n, o) = (last_status(&now, "newer").unwrap(), last_status(&now, "older").unwrap());
    assert_eq!((n["phase"].as_str(), o["phase"].as_str()), (Some("Queued"), Some("Queued")));
    assert!(
        o["message"].as_str().unwrap().contains("position 1")
            && n["message"].as_str().unwrap().contains("position 2"),
        "{o:#} {n:#}"
    );
    assert_eq!(o["conditions"][0]["reason"], "Queued");
    assert!(
        now.iter().all(|c| !(c.method == Method::POST && c.path.contains("/pods"))),
        "no pod while queued"
    );

    // A slot frees: the older one starts; the newer one still waits behind it.
    slots_taken.store(false, std::sync::atomic::Ordering::SeqCst);
    reconcile(Arc::new(newer), ctx.clone()).await.unwrap();
    reconcile(Arc::new(older), ctx).await.unwrap();
    let now = calls.lock().unwrap().clone();
    assert_eq!(last_status(&now, "older").unwrap()["phase"], "Building");
    assert_eq!(
        last_status(&now, "newer").unwrap()["phase"],
        "Queued",
        "FIFO: the newer one does not jump the queue"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_clock_ends_a_wait_that_lasts_too_long() {
    let (client, calls) = cluster(vec![], vec![]);
    let mut spec = spec();
    spec["registryAuth"] = json!({"secretRef": {"name": "missing"}});
    spec["timeouts"] = json!({"queue": "1m"});
    let mut ib = image_build("late", spec, None);
    let ctx = context(client);
    reconcile(Arc::new(ib.clone()), ctx.clone()).await.unwrap();
    let waiting = last_status(&calls.lock().unwrap(), "late").unwrap();
    assert_eq!(
        (waiting["phase"].as_str(), waiting["reason"].as_str()),
        (Some("Pending"), Some("SecretNotFound"))
    );

    let created = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(120);
    ib.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
    reconcile(Arc::new(ib), ctx).await.unwrap();
    let done = last_status(&calls.lock().unwrap(), "late").unwrap();
    assert_eq!(
        (done["phase"].as_str(), done["reason"].as_str()),
        (Some("Failed"), Some("QueueTimeout")),
        "{done:#}"
    );
    assert!(done["message"].as_str().unwrap().contains("spec.timeouts.queue"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_starts_queued_builds_in_order_and_no_more_than_the_limit() {
    use futures::StreamExt;
    use kube::runtime::controller::Controller;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let reg = common::Registry::start(common::RegistryAuth::None);
    let img = common::small_image(12, "amd64");
    common::Direct::new(&reg.host, None).push_image("lib/app", "1", &img).await;
    let builds: Vec<_> = (0..3)
        .map(|i| {
            let spec = json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo(&format!("q{i}"))});
            let mut ib = image_build(&format!("q{i}"), spec, None);
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let at = k8s_openapi::jiff::Timestamp::from_second(now - 10 + i).unwrap();
            ib.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
            ib
        })
        .collect();
    let pods = Arc::new(Mutex::new(Vec::<Value>::new()));
    let store = pods.clone();
    let (client, calls) = fake_api(move |c| match c.method.clone() {
        Method::GET if c.route() == "GET /api/v1/pods" => (
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": store.lock().unwrap().clone()}),
        ),
        Method::GET if c.path.contains("/pods/") => not_found(),
        Method::POST if c.route().ends_with("/pods") => {
            store.lock().unwrap().push(c.body.clone());
            (201, c.body.clone())
        }
        _ => default_reply(c),
    });
    let (reader, writer) = reflector::store();
    let ctx = one_slot(client, reader.clone());
    let mut events = vec![watcher::Event::Init];
    events.extend(builds.iter().rev().cloned().map(watcher::Event::InitApply));
    events.push(watcher::Event::InitDone);
    let stream = futures::stream::iter(events.into_iter().map(Ok)).chain(futures::stream::pending());
    let results = Controller::for_stream(reflector(writer, stream).applied_objects(), reader).run(
        reconcile,
        bob::controller::error_policy,
        ctx,
    );
    let done: Vec<_> =
        tokio::time::timeout(std::time::Duration::from_secs(20), results.take(3).collect::<Vec<_>>())
            .await
            .unwrap();
    assert!(done.iter().all(Result::is_ok), "{done:?}");
    assert_eq!(pods.lock().unwrap().len(), 1, "one slot, one pod");
    let calls = calls.lock().unwrap().clone();
    let phases: Vec<String> = (0..3)
        .map(|i| last_status(&calls, &format!("q{i}")).unwrap()["phase"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        phases,
        ["Building", "Queued", "Queued"],
        "the oldest starts, whatever order the controller saw them in"
    );
}

/// A controller context with one build slot and the queue order of `store`.
fn one_slot(
    client: kube::Client,
    store: kube::runtime::reflector::Store<bob::crd::ImageBuild>,
) -> Arc<bob::controller::Context> {
    let mut ctx = bob::controller::Context::new(
        client,
        bob::controller::PlanConfig::default(),
        std::time::Duration::from_secs(1800),
        bob::controller::Policy::default(),
    );
    ctx.settings.max_concurrent_builds = Some(1);
    ctx.store = Some(store);
    Arc::new(ctx)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_new_image_build_is_reconciled_at_once_not_after_a_debounce() {
    use futures::StreamExt;
    use kube::runtime::controller::Controller;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    // A missing Secret: the reconcile talks only to the (fake) API, so the paused clock moves
    // only when the controller itself waits.
    let mut spec = spec();
    spec["registryAuth"] = json!({"secretRef": {"name": "missing"}});
    let ib = image_build("fresh", spec, None);
    let (client, calls) = cluster(vec![], vec![]);
    let (reader, writer) = reflector::store();
    let events = [watcher::Event::Init, watcher::Event::InitApply(ib), watcher::Event::InitDone];
    let stream = futures::stream::iter(events.into_iter().map(Ok)).chain(futures::stream::pending());
    let started = tokio::time::Instant::now();
    let results = Controller::for_stream(reflector(writer, stream).applied_objects(), reader)
        .with_config(bob::controller::controller_config(16))
        .run(reconcile, bob::controller::error_policy, context(client));
    let first: Vec<_> = results.take(1).collect().await;
    assert!(first[0].is_ok(), "{first:?}");
    assert!(last_status(&calls.lock().unwrap(), "fresh").is_some());
    let waited = started.elapsed();
    assert_eq!(
        waited,
        std::time::Duration::ZERO,
        "the first reconcile waited {waited:?} on the controller's clock"
    );
}
