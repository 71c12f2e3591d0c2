//! Builds: an inline Dockerfile, the cache hit of the same spec, two at once on one pod, one
//! Dockerfile in two layer-cache scopes on two pods, a failing `RUN`, and a missing Secret
//! created later. Each asserts the final status fields and
//! the registry's word for the digest, not only the phase.

use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::Target;
use super::common::Direct;
use super::common::build::file_in_image;
use super::scenario::{Options, Scenario};
use bob::controller::cache_scope::{ScopeOrigin, scope_component};

/// Longest a build may take here (a busybox build takes seconds; CI's machine is shared).
pub const BUILD: Duration = Duration::from_secs(240);

/// Declares the scenarios of a module as `ALL`, in order.
#[macro_export]
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// This module's scenarios, in order.
        pub const ALL: &[(&str, $crate::Run)] = &[$((stringify!($name), |t| Box::pin($name(t)))),*];
    };
}

scenarios!(
    inline_dockerfile_builds,
    same_spec_again_is_a_cache_hit_without_a_pod,
    two_submitted_at_once_share_one_pod,
    one_dockerfile_in_two_cache_scopes_builds_twice_on_two_pods,
    failing_run_step_reports_step_exit_code_and_log,
    missing_secret_waits_then_builds_once_created,
);

/// `Succeeded` with `reason`, the Ready condition true, for generation 1.
fn assert_succeeded(name: &str, s: &Value, reason: &str) {
    assert_eq!(
        (s["phase"].as_str(), s["reason"].as_str()),
        (Some("Succeeded"), Some(reason)),
        "{name}: {s:#}"
    );
    assert_eq!(s["observedGeneration"], 1, "{name}: {s:#}");
    let ready = &s["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str(), ready["reason"].as_str()),
        (Some("Ready"), Some("True"), Some(reason)),
        "{name}: {s:#}"
    );
    assert!(s["completionTime"].is_string() && s["startTime"].is_string(), "{name}: {s:#}");
}

async fn inline_dockerfile_builds(t: Target) -> Scenario {
    let s = Scenario::start(&t, "inline_dockerfile_builds", Options::default()).await;
    let mut spec = s.dockerfile("ARG WHO=nobody\nRUN echo \"built for $WHO\" > /who.txt");
    spec["source"]["dockerfile"]["buildArgs"] = json!({"WHO": "e2e"});
    s.create(&[("inline", spec)]).await;
    let st = s.finished("inline", BUILD).await;
    assert_succeeded("inline", &st, "Built");
    assert_eq!((&st["cacheHit"], &st["attempts"]), (&json!(false), &json!(1)), "{st:#}");
    let key = st["cacheKey"].as_str().expect("a cache key");
    let base = st["baseImage"]["ref"].as_str().unwrap();
    assert_eq!(base, format!("{}/base:{key}", s.repos), "the base is tagged with the key");
    assert_eq!(
        st["baseImage"]["digest"].as_str(),
        s.registry_digest(base).await.as_deref(),
        "base digest: {st:#}"
    );
    let output = st["output"]["ref"].as_str().unwrap();
    assert!(output.starts_with(&format!("{}/workspace:", s.repos)), "{st:#}");
    let digest = s.registry_digest(output).await.expect("the workspace image is in the registry");
    assert_eq!(
        st["output"]["digest"].as_str(),
        Some(digest.as_str()),
        "output.digest is the registry's: {st:#}"
    );
    let pod = st["podName"].as_str().expect("podName");
    assert_eq!(s.pods.lock().unwrap().keys().collect::<Vec<_>>(), [pod], "exactly the one build pod");
    s.no_pods_within(Duration::from_secs(60)).await;

    let (host, path) = output.split_once('/').unwrap();
    let (repo, tag) = path.rsplit_once(':').unwrap();
    let d = Direct::new(host, Some(&s.creds));
    let manifest: Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    assert_eq!(file_in_image(&d, repo, &manifest, "who.txt").await.as_deref(), Some("built for e2e\n"));
    s
}

async fn same_spec_again_is_a_cache_hit_without_a_pod(t: Target) -> Scenario {
    let opts = Options::default();
    let s = Scenario::start(&t, "same_spec_again_is_a_cache_hit", opts).await;
    let spec = s.dockerfile("RUN echo cached > /cached.txt");
    s.create(&[("first", spec.clone())]).await;
    let first = s.finished("first", BUILD).await;
    assert_succeeded("first", &first, "Built");
    let creates_before = pod_creates(&s);
    assert_eq!(creates_before, 1, "the first build created one pod");

    s.create(&[("again", spec)]).await;
    let again = s.finished("again", Duration::from_secs(60)).await;
    assert_succeeded("again", &again, "CacheHit");
    assert_eq!(again["cacheHit"], true, "{again:#}");
    assert_eq!(again["output"], first["output"], "the same image, ref and digest");
    assert_eq!(again["cacheKey"], first["cacheKey"]);
    assert!(again["podName"].is_null() && again["attempts"].is_null(), "no pod for a cache hit: {again:#}");
    assert_eq!(pod_creates(&s), creates_before, "the controller created no pod for the cache hit");
    assert_eq!(s.pods.lock().unwrap().len(), 1, "the namespace saw one pod: {:?}", s.pods.lock().unwrap());
    s
}

/// The controller's pod creates (`POST .../pods`).
pub fn pod_creates(s: &Scenario) -> usize {
    s.calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path.split('?').next().unwrap().ends_with("/pods"))
        .count()
}

async fn two_submitted_at_once_share_one_pod(t: Target) -> Scenario {
    let s = Scenario::start(&t, "two_submitted_at_once_share_one_pod", Options::default()).await;
    let spec = s.dockerfile("RUN echo shared > /shared.txt");
    s.create(&[("one", spec.clone()), ("two", spec)]).await;
    let (one, two) = tokio::join!(s.finished("one", BUILD), s.finished("two", BUILD));
    assert_succeeded("one", &one, "Built");
    assert_succeeded("two", &two, "Built");
    assert_eq!(one["podName"], two["podName"], "one pod for both");
    assert_eq!(one["output"], two["output"]);
    let pods = s.pods.lock().unwrap().clone();
    assert_eq!(pods.len(), 1, "one pod in the namespace: {pods:?}");
    let (_, owners) = pods.values().next().unwrap();
    assert_eq!(*owners, 2, "both ImageBuilds own the pod");
    s.no_pods_within(Duration::from_secs(60)).await;
    s
}

async fn one_dockerfile_in_two_cache_scopes_builds_twice_on_two_pods(t: Target) -> Scenario {
    // The issue 21 attack's precondition: alice's image must never come out of a build that read
    // mallory's layer-cache scope, so the same Dockerfile in scopes `alice` and `mallory` is two
    // builds on two pods, while a second ImageBuild in alice's scope is a hit on hers. (kube-sim
    // runs pods on the host's network, so the builds take turns; their keys already differ.)
    let s = Scenario::start(&t, "two_cache_scopes", Options::default()).await;
    let scoped = |scope: &str| {
        let mut spec = s.dockerfile("RUN echo scoped > /scoped.txt");
        spec["layerCache"] = json!({"repository": format!("{}/cache", s.repos), "scope": scope});
        spec
    };
    s.create(&[("alice-ws", scoped("alice"))]).await;
    let alice = s.finished("alice-ws", BUILD).await;
    assert_succeeded("alice-ws", &alice, "Built");

    s.create(&[("mallory-ws", scoped("mallory")), ("alice-tools", scoped("alice"))]).await;
    let mallory = s.finished("mallory-ws", BUILD).await;
    assert_succeeded("mallory-ws", &mallory, "Built");
    assert_eq!(mallory["cacheHit"], false, "not a hit on alice's image: {mallory:#}");
    assert_ne!(mallory["cacheKey"], alice["cacheKey"]);
    assert_ne!(mallory["output"]["ref"], alice["output"]["ref"]);
    assert_ne!(mallory["podName"], alice["podName"], "two scopes, two pods");
    let tools = s.finished("alice-tools", Duration::from_secs(60)).await;
    assert_succeeded("alice-tools", &tools, "CacheHit");
    assert_eq!(tools["output"], alice["output"], "one scope shares its images");

    let pods = s.pods.lock().unwrap().clone();
    assert_eq!(pods.len(), 2, "one pod per scope: {pods:?}");
    assert_eq!(pod_creates(&s), 2, "the controller created two pods");
    // Each build wrote its own scope's cache: `<repos>/cache/<namespace>/<scope>-<hash>`.
    for (scope, st) in [("alice", &alice), ("mallory", &mallory)] {
        let repo = format!("{}/cache/{}/{}", s.repos, s.ns, scope_component(ScopeOrigin::Spec, scope));
        let path = repo.strip_prefix(&format!("{}/", s.registry_host)).unwrap();
        let url = format!("http://{}/v2/{path}/tags/list", s.registry_host);
        let tags: Value = reqwest::Client::new()
            .get(url)
            .basic_auth("builder", Some(s.password()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            !tags["tags"].as_array().is_none_or(Vec::is_empty),
            "{scope}'s cache {repo}: {tags} ({st:#})"
        );
    }
    s.no_pods_within(Duration::from_secs(60)).await;
    s
}

async fn failing_run_step_reports_step_exit_code_and_log(t: Target) -> Scenario {
    let s = Scenario::start(&t, "failing_run_step", Options::default()).await;
    s.create(&[("fails", s.dockerfile("RUN echo e2e-boom && exit 7"))]).await;
    let st = s.finished("fails", BUILD).await;
    assert_eq!(
        (st["phase"].as_str(), st["reason"].as_str()),
        (Some("Failed"), Some("BuildStepFailed")),
        "{st:#}"
    );
    let f = &st["failure"];
    assert_eq!(
        (f["reason"].as_str(), f["container"].as_str()),
        (Some("BuildStepFailed"), Some("build")),
        "{st:#}"
    );
    let message = f["message"].as_str().unwrap();
    assert!(
        message.contains("RUN echo e2e-boom && exit 7") && message.contains("exit code 7"),
        "step and exit code: {message}"
    );
    assert!(f["logTail"].as_str().unwrap_or_default().contains("e2e-boom"), "the step's output: {st:#}");
    assert_eq!(st["attempts"], 1, "a failed step is not retried: {st:#}");
    assert_eq!(
        (st["conditions"][0]["status"].as_str(), st["conditions"][0]["reason"].as_str()),
        (Some("False"), Some("BuildStepFailed"))
    );
    s.no_pods_within(Duration::from_secs(60)).await;
    s
}

async fn missing_secret_waits_then_builds_once_created(t: Target) -> Scenario {
    let s =
        Scenario::start(&t, "missing_secret_then_created", Options { secret: false, ..Default::default() })
            .await;
    s.create(&[("waits", s.dockerfile("RUN echo after-secret > /s.txt"))]).await;
    let st = s.reaches("waits", "Pending", "SecretNotFound", Duration::from_secs(60)).await;
    let want = format!("Secret {}/reg (spec.registryAuth) does not exist", s.ns);
    assert_eq!(st["message"].as_str(), Some(want.as_str()), "{st:#}");
    assert_eq!(st["conditions"][0]["status"], "False", "{st:#}");
    assert!(s.pods.lock().unwrap().is_empty(), "no pod while the Secret is missing");

    s.create_secret().await;
    let st = s.finished("waits", Duration::from_secs(90) + BUILD).await;
    assert_succeeded("waits", &st, "Built");
    s
}
