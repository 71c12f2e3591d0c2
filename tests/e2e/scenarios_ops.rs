//! Waits, admission and operations: a malformed Secret (its own reason, no retry storm), Pod
//! Security `baseline` refusing the Dockerfile pod and `restricted` admitting an image source, the
//! chart's placement allow-lists refusing a control-plane toleration and a privileged build, a
//! zero-pod ResourceQuota until the queue limit, cancel and delete mid-build, a controller killed
//! and restarted mid-build, and two replicas handing over on SIGTERM.

use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{Value, json};

use super::apiserver::Target;
use super::builds::poll;
use super::scenario::{Options, Scenario};
use super::scenarios::{BUILD, pod_creates};

crate::scenarios!(
    malformed_secret_has_its_own_reason_and_no_retry_storm,
    baseline_namespace_rejects_the_dockerfile_pod,
    placement_outside_the_charts_allow_lists_is_policy_denied,
    restricted_namespace_builds_an_image_source,
    zero_pod_quota_waits_then_times_out,
    cancel_mid_build_keeps_the_log_tail,
    delete_mid_build_collects_the_pod,
    controller_killed_mid_build_restarts_without_a_second_pod,
    two_replicas_hand_over_on_sigterm,
);

/// How long the malformed-Secret scenario watches the controller's calls.
const WINDOW: Duration = Duration::from_secs(20);

async fn malformed_secret_has_its_own_reason_and_no_retry_storm(t: Target) -> Scenario {
    let opts = Options { secret: false, ..Default::default() };
    let s = Scenario::start(&t, "malformed_secret", opts).await;
    // Valid JSON (a real API server checks that much for this type), but no docker config.
    let bad = r#"--from-literal=.dockerconfigjson={"auths": "not-a-map"}"#;
    s.kubectl
        .ok(
            &[
                "create",
                "secret",
                "generic",
                "reg",
                "-n",
                &s.ns,
                "--type",
                "kubernetes.io/dockerconfigjson",
                bad,
            ],
            None,
        )
        .await;
    s.create(&[("bad-secret", s.dockerfile("RUN true"))]).await;
    let st = s.reaches("bad-secret", "Pending", "SecretInvalid", Duration::from_secs(60)).await;
    let message = st["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("Secret {}/reg", s.ns)) && message.contains(".dockerconfigjson"),
        "names the Secret and the key: {message}"
    );

    // The window opens once the transition is done: its status write, then its one Event.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.calls().iter().any(|c| c.method == "POST" && c.path.contains("/events")) {
        assert!(Instant::now() < deadline, "no Event for SecretInvalid");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let calls: Vec<_> = s.calls().into_iter().filter(|c| c.at >= start && c.at < start + WINDOW).collect();
    let count = |pred: &dyn Fn(&super::counter::Call) -> bool| calls.iter().filter(|c| pred(c)).count();
    let secret_reads = count(&|c| c.method == "GET" && c.path.contains("/secrets/reg"));
    let status_writes = count(&|c| c.method == "PATCH" && c.path.contains("/imagebuilds/"));
    let events = count(&|c| c.path.contains("/events"));
    let listing: Vec<String> = calls.iter().map(|c| format!("{} {}", c.method, c.path)).collect();
    eprintln!(
        "malformed_secret: {} controller calls in {WINDOW:?}, {secret_reads} of them Secret reads",
        calls.len()
    );
    // A wait is looked at again after half the time it waited, at least 5 s (docs/controller.md).
    let looks = WINDOW.as_secs() as usize / 5 + 1;
    assert!(
        secret_reads <= looks,
        "{secret_reads} reads of the Secret in {WINDOW:?} (at most {looks}): {listing:#?}"
    );
    assert!(secret_reads >= 1, "the wait is looked at again: {listing:#?}");
    assert_eq!((status_writes, events), (0, 0), "an unchanged wait writes nothing: {listing:#?}");
    assert!(calls.len() <= 3 * looks, "{} calls in {WINDOW:?}: {listing:#?}", calls.len());
    assert_eq!(pod_creates(&s), 0, "no pod without credentials");

    // Fixed, it builds.
    s.kubectl.ok(&["delete", "secret", "reg", "-n", &s.ns], None).await;
    s.create_secret().await;
    let st = s.finished("bad-secret", Duration::from_secs(90) + BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    s
}

async fn baseline_namespace_rejects_the_dockerfile_pod(t: Target) -> Scenario {
    let labels = vec![("pod-security.kubernetes.io/enforce", "baseline")];
    let s =
        Scenario::start(&t, "baseline_rejects", Options { labels, pods: false, ..Default::default() }).await;
    s.create(&[("refused", s.dockerfile("RUN true"))]).await;
    let st = s.finished("refused", Duration::from_secs(60)).await;
    assert_eq!(
        (st["phase"].as_str(), st["reason"].as_str()),
        (Some("Failed"), Some("PodRejected")),
        "{st:#}"
    );
    let message = st["message"].as_str().unwrap();
    assert!(message.starts_with("the API server refused build pod bob-build-"), "{message}");
    assert!(
        message.contains(r#"violates PodSecurity "baseline:latest""#),
        "the admission's own words: {message}"
    );
    assert_eq!(st["failure"]["reason"], "PodRejected", "{st:#}");
    assert!(s.pods.lock().unwrap().is_empty(), "no pod exists");
    // The Event is an effect, published right after the status write: it may trail the status.
    poll("a Warning Event PodRejected", Duration::from_secs(30), || async {
        let events: Value =
            serde_json::from_str(&s.kubectl.ok(&["get", "events", "-n", &s.ns, "-o", "json"], None).await)
                .unwrap();
        let items = events["items"].as_array().unwrap();
        items.iter().any(|e| e["reason"] == "PodRejected" && e["type"] == "Warning").then_some(())
    })
    .await;
    s
}

async fn restricted_namespace_builds_an_image_source(t: Target) -> Scenario {
    let labels = vec![("pod-security.kubernetes.io/enforce", "restricted")];
    let s = Scenario::start(&t, "restricted_image_source", Options { labels, ..Default::default() }).await;
    s.create(&[("from-image", s.image_source())]).await;
    let st = s.finished("from-image", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    let output = st["output"]["ref"].as_str().unwrap();
    assert_eq!(
        st["output"]["digest"].as_str(),
        Some(s.from_digest.as_str()),
        "the workspace image is the image: {st:#}"
    );
    assert_eq!(s.registry_digest(output).await.as_deref(), Some(s.from_digest.as_str()));
    assert_eq!(s.pods.lock().unwrap().len(), 1, "its pod was admitted");
    s
}

/// Installed with a toleration allowed and the privileged mode limited to another namespace: a
/// control-plane toleration and a Dockerfile build here both end `PolicyDenied`, with no pod.
async fn placement_outside_the_charts_allow_lists_is_policy_denied(t: Target) -> Scenario {
    let values = json!({"controller": {
        "buildSecurity": "privileged",
        "buildSecurityNamespaces": ["elsewhere"],
        "placement": {"allowedTolerations": ["builds:NoSchedule"]}
    }});
    let s =
        Scenario::start(&t, "placement_denied", Options { values, pods: false, ..Default::default() }).await;
    let mut steer = s.dockerfile("RUN true");
    steer["pod"] = json!({"tolerations": [
        {"key": "builds", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    ]});
    s.create(&[("steer", steer), ("privileged", s.dockerfile("RUN true"))]).await;
    let not_listed = format!("{:?} is not one", s.ns);
    for (name, words) in [
        (
            "steer",
            [
                "spec.pod.tolerations[1]",
                "node-role.kubernetes.io/control-plane:NoSchedule",
                "--allowed-tolerations",
            ],
        ),
        ("privileged", ["privileged mode", not_listed.as_str(), "controller.buildSecurityNamespaces"]),
    ] {
        let st = s.finished(name, Duration::from_secs(60)).await;
        assert_eq!(
            (st["phase"].as_str(), st["reason"].as_str()),
            (Some("Failed"), Some("PolicyDenied")),
            "{st:#}"
        );
        let message = st["message"].as_str().unwrap();
        for w in words {
            assert!(message.contains(w), "{name}: {w:?} missing from {message}");
        }
        assert!(st["podName"].is_null(), "{st:#}");
    }
    assert_eq!(pod_creates(&s), 0, "no build pod was asked for");
    s
}

async fn zero_pod_quota_waits_then_times_out(t: Target) -> Scenario {
    let s = Scenario::start(&t, "zero_pod_quota", Options { pods: false, ..Default::default() }).await;
    let quota = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods", "namespace": s.ns},
                       "spec": {"hard": {"pods": "0"}}});
    s.kubectl.ok(&["apply", "-f", "-"], Some(&quota.to_string())).await;
    let mut spec = s.dockerfile("RUN true");
    spec["timeouts"] = json!({"queue": "10s"});
    s.create(&[("no-room", spec)]).await;
    let st = s.reaches("no-room", "Pending", "QuotaExceeded", Duration::from_secs(30)).await;
    let message = st["message"].as_str().unwrap();
    assert!(message.contains("exceeded quota: no-pods"), "the quota's message: {message}");
    let st = s.finished("no-room", Duration::from_secs(60)).await;
    assert_eq!(
        (st["phase"].as_str(), st["reason"].as_str()),
        (Some("Failed"), Some("QueueTimeout")),
        "{st:#}"
    );
    let message = st["message"].as_str().unwrap();
    assert!(
        message.starts_with("still waiting after 10s (spec.timeouts.queue): ")
            && message.contains("exceeded quota"),
        "{message}"
    );
    assert!(s.pods.lock().unwrap().is_empty());
    s
}

/// Starts a build that runs until stopped; returns once its `RUN` step printed its marker.
async fn long_build(s: &Scenario, name: &str) -> String {
    s.create(&[(name, s.dockerfile("RUN echo e2e-started && sleep 300"))]).await;
    s.printed(name, "e2e-started").await
}

async fn cancel_mid_build_keeps_the_log_tail(t: Target) -> Scenario {
    let s = Scenario::start(&t, "cancel_mid_build", Options::default()).await;
    let pod = long_build(&s, "cancelled").await;
    s.kubectl
        .ok(
            &[
                "patch",
                "imagebuild",
                "cancelled",
                "-n",
                &s.ns,
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"cancel":true}}"#,
            ],
            None,
        )
        .await;
    let st = s.finished("cancelled", Duration::from_secs(60)).await;
    assert_eq!(
        (st["phase"].as_str(), st["reason"].as_str()),
        (Some("Cancelled"), Some("Cancelled")),
        "{st:#}"
    );
    assert_eq!(st["podName"].as_str(), Some(pod.as_str()));
    let f = &st["failure"];
    assert_eq!((f["reason"].as_str(), f["container"].as_str()), (Some("Cancelled"), Some("build")), "{st:#}");
    assert!(
        f["logTail"].as_str().unwrap_or_default().contains("e2e-started"),
        "the log tail is kept: {st:#}"
    );
    s.no_pods_within(Duration::from_secs(60)).await;
    s
}

async fn delete_mid_build_collects_the_pod(t: Target) -> Scenario {
    let s = Scenario::start(&t, "delete_mid_build", Options::default()).await;
    long_build(&s, "deleted").await;
    s.kubectl.ok(&["delete", "imagebuild", "deleted", "-n", &s.ns], None).await;
    s.no_pods_within(Duration::from_secs(60)).await;
    assert!(s.get("deleted").await.is_none());
    s
}

async fn controller_killed_mid_build_restarts_without_a_second_pod(t: Target) -> Scenario {
    let mut s = Scenario::start(&t, "controller_killed", Options::default()).await;
    s.create(&[("survives", s.dockerfile("RUN echo e2e-started && sleep 8 && echo done > /done"))]).await;
    let v = s.wait("survives", "Building", BUILD, |v| v["status"]["phase"] == "Building").await;
    let pod = v["status"]["podName"].as_str().unwrap().to_string();
    let killed = &mut s.controllers[0].daemon;
    killed.signal(Signal::KILL);
    assert!(killed.wait_exit(Duration::from_secs(10)).is_some(), "SIGKILL ends the controller");
    s.start_controller();
    let st = s.finished("survives", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    assert_eq!((st["podName"].as_str(), &st["attempts"]), (Some(pod.as_str()), &json!(1)), "{st:#}");
    assert_eq!(pod_creates(&s), 1, "one pod create across both controllers");
    assert_eq!(s.pods.lock().unwrap().len(), 1, "one pod: {:?}", s.pods.lock().unwrap());
    s
}

/// The Lease's holder, if any.
async fn holder(s: &Scenario) -> Option<String> {
    let args =
        ["get", "lease", "bob-controller", "-n", &s.release.ns, "-o", "jsonpath={.spec.holderIdentity}"];
    s.kubectl.run(&args, None).await.ok().filter(|h| !h.is_empty())
}

async fn holder_becomes(s: &Scenario, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while holder(s).await.as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "the Lease is not held by {want} after {timeout:?}: {:?}",
            holder(s).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn two_replicas_hand_over_on_sigterm(t: Target) -> Scenario {
    let mut s =
        Scenario::start(&t, "two_replicas_hand_over", Options { replicas: 2, ..Default::default() }).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let Some(h) = holder(&s).await {
            break h;
        }
        assert!(Instant::now() < deadline, "no replica took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (lead, standby) = match s.controllers.iter().position(|c| c.identity == leader) {
        Some(0) => (0, 1),
        Some(_) => (1, 0),
        None => panic!("the Lease holder {leader} is not a replica"),
    };
    s.create(&[("during", s.dockerfile("RUN echo e2e-started && sleep 6 && echo one > /one"))]).await;
    s.wait("during", "Building", BUILD, |v| v["status"]["phase"] == "Building").await;
    assert!(
        !s.controllers[standby].daemon.output().contains("created build pod"),
        "the standby reconciles nothing"
    );

    let old = &mut s.controllers[lead].daemon;
    old.signal(Signal::TERM);
    let exit = old.wait_exit(Duration::from_secs(30)).expect("the leader stops on SIGTERM");
    assert!(exit.success(), "a clean stop: {exit}");
    let new = s.controllers[standby].identity.clone();
    holder_becomes(&s, &new, Duration::from_secs(60)).await;

    let st = s.finished("during", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    s.create(&[("after", s.dockerfile("RUN echo two > /two"))]).await;
    let st = s.finished("after", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    assert!(s.controllers[standby].daemon.output().contains("created build pod"), "the new leader built");
    assert_eq!(s.pods.lock().unwrap().len(), 2, "one pod per build: {:?}", s.pods.lock().unwrap());
    s
}
