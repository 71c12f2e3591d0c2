//! The one decision of a reconcile, as a table over (ImageBuild, observed) fixtures: every path
//! a reconcile can take ends in a status with a phase and a reason (or, for a running build, a
//! phase and a message), and asks for nothing it does not need.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bob::controller::decide::{
    Access, Count, Created, Effect, Failure, Need, Next, Observed, Settings, Slots, Step, Transition, refusal,
};
use bob::controller::metrics::Metrics;
use bob::controller::{PlanConfig, Policy, Resolved};
use bob::crd::{ImageBuild, ImageBuildStatus, Phase};
use bob::layer_cache::Mode;
use bob::reason::Reason;
use common::fake_api::decide;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn now() -> Timestamp {
    "2026-11-30T12:00:00Z".parse().unwrap()
}

fn settings(max: Option<usize>) -> Settings {
    Settings {
        plan: PlanConfig::default(),
        policy: Policy::default(),
        queue_timeout: Duration::from_secs(1800),
        max_concurrent_builds: max,
    }
}

/// An image-source ImageBuild created `age` seconds ago, with `status`.
fn ib(age: i64, status: Option<Value>) -> ImageBuild {
    let created = now() - SignedDuration::from_secs(age);
    let mut v = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
        "metadata": {"name": "ws", "namespace": "team", "uid": "u-1", "generation": 1, "creationTimestamp": created.to_string()},
        "spec": {"source": {"image": {"ref": "reg.test/lib/app:1"}}, "workspaceImageRepository": "reg.test/ws",
                 "registryAuth": {"secretRef": {"name": "reg"}}}});
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).unwrap()
}

fn seen() -> Observed {
    Observed::at(now())
}

/// Observed up to a planned build: credentials usable, the image resolved, no cache hit.
fn planned() -> Observed {
    let mut o = seen();
    o.credentials = Some(Ok(Access::FromSpec));
    o.resolved = Some(Ok(Resolved { image_digest: Some(DIGEST.into()), ..Default::default() }));
    o.cache = Some(Ok(None));
    o.pod = Some(None);
    o
}

/// The attempt's pod as the API server stored it, owned by the ImageBuilds of `owners` (UIDs).
fn stored(owners: &[&str]) -> Box<Pod> {
    let owners: Vec<Value> = owners
        .iter()
        .map(|uid| json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "name": "x", "uid": uid}))
        .collect();
    let v = json!({"metadata": {"name": "bob-build-x-1", "uid": "pod-uid-1", "ownerReferences": owners}});
    Box::new(serde_json::from_value(v).unwrap())
}

fn act(step: Step) -> Transition {
    match step {
        Step::Act(t) => t,
        Step::Observe(n) => panic!("expected a transition, got a need: {n:?}"),
        Step::Attempt(p) => panic!("expected a transition, got a create: {:?}", p.metadata.name),
        Step::Plan => panic!("the fixture helper plans"),
    }
}

fn need(step: Step) -> Need {
    match step {
        Step::Observe(n) => n,
        Step::Act(t) => panic!("expected a need, got {t:?}"),
        Step::Attempt(p) => panic!("expected a need, got a create: {:?}", p.metadata.name),
        Step::Plan => panic!("the fixture helper plans"),
    }
}

fn status(t: &Transition) -> &ImageBuildStatus {
    t.status.as_ref().expect("a status is written")
}

fn phase_reason(t: &Transition) -> (Phase, Option<Reason>) {
    (status(t).phase.unwrap(), status(t).reason)
}

fn events(t: &Transition) -> Vec<(bool, String)> {
    t.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event { warning, reason, .. } => Some((*warning, reason.clone())),
            _ => None,
        })
        .collect()
}

fn pod(status: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
}

fn building(pod: &str) -> Value {
    json!({"phase": "Building", "observedGeneration": 1, "podName": pod, "attempts": 1,
           "startTime": (now() - SignedDuration::from_secs(60)).to_string(),
           "output": {"ref": "reg.test/ws:abc"}, "baseImage": {"ref": format!("reg.test/lib/app@{DIGEST}")}})
}

#[test]
fn a_new_build_asks_in_order_for_what_it_needs_and_nothing_more() {
    let b = ib(0, None);
    let cfg = settings(None);
    let mut o = seen();
    assert_eq!(need(decide(&b, &o, &cfg)), Need::Credentials);
    o.credentials = Some(Ok(Access::FromSpec));
    assert_eq!(need(decide(&b, &o, &cfg)), Need::Resolve);
    o.resolved = Some(Ok(Resolved { image_digest: Some(DIGEST.into()), ..Default::default() }));
    // The attempt's pod is looked for first: one whose create or status write lost its answer.
    let Need::Pod(name) = need(decide(&b, &o, &cfg)) else { panic!("pod") };
    assert!(name.ends_with("-1"), "attempt 1's pod");
    o.pod = Some(None);
    let Need::Cache(r) = need(decide(&b, &o, &cfg)) else { panic!("cache") };
    assert!(r.whole().starts_with("reg.test/ws:"));
    o.cache = Some(Ok(None));
    let Step::Attempt(p) = decide(&b, &o, &cfg) else { panic!("create") };
    assert_eq!(p.metadata.name, Some(name), "the pod looked for is the pod created");
    // With a concurrency limit, a slot is asked for first.
    assert_eq!(need(decide(&b, &o, &settings(Some(2)))), Need::Slots);
}

#[test]
fn a_cache_hit_succeeds_without_a_pod() {
    let mut o = planned();
    o.cache = Some(Ok(Some(DIGEST.into())));
    let t = act(decide(&ib(0, None), &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Succeeded, Some(Reason::CacheHit)));
    assert_eq!(status(&t).cache_hit, Some(true));
    assert_eq!(status(&t).output.as_ref().unwrap().digest.as_deref(), Some(DIGEST));
    assert_eq!(t.next, Next::Change);
    assert!(t.effects.iter().all(|e| !matches!(e, Effect::Cleanup(_))), "no pod to clean up");
}

#[test]
fn started_joined_and_found_pods_are_building_with_an_event() {
    let cases = [
        (Created::New(stored(&["u-1"])), Some(true), false),
        (Created::Exists(stored(&["other"])), Some(false), true),
        (Created::Exists(stored(&["other", "u-1"])), None, false),
    ];
    for (created, counted, owns) in cases {
        let mut o = planned();
        o.created = Some(created.clone());
        let t = act(decide(&ib(5, None), &o, &settings(None)));
        assert_eq!(phase_reason(&t), (Phase::Building, None), "{created:?}");
        assert!(status(&t).pod_name.is_some() && status(&t).attempts == Some(1));
        assert_eq!(events(&t), [(false, "Building".to_string())]);
        let own = Effect::Own("bob-build-x-1".into());
        assert_eq!(t.effects.contains(&own), owns, "{created:?}: joined pods get this owner");
        let started = t.effects.iter().find_map(|e| match e {
            Effect::Count(Count::PodStarted { created, .. }) => Some(*created),
            _ => None,
        });
        assert_eq!(started, counted, "{created:?}: a found pod was counted when it started");
    }
}

#[test]
fn a_pod_the_api_server_refuses_ends_or_waits_by_the_kind_of_refusal() {
    let pss = r#"pods "bob-build-x-1" is forbidden: violates PodSecurity "baseline:latest": non-default capabilities (container "build" must not include "SYS_ADMIN" in securityContext.capabilities.add)"#;
    let cases = [
        (403, pss, Phase::Failed, Reason::PodRejected),
        (
            422,
            r#"Pod "bob-build-x-1" is invalid: spec.containers[0].image: Required value"#,
            Phase::Failed,
            Reason::PodRejected,
        ),
        (
            400,
            r#"admission webhook "policy.example.com" denied the request: no privileged builds"#,
            Phase::Failed,
            Reason::PodRejected,
        ),
        (
            403,
            r#"pods "bob-build-x-1" is forbidden: exceeded quota: compute, requested: pods=1, used: pods=4, limited: pods=4"#,
            Phase::Pending,
            Reason::QuotaExceeded,
        ),
        (
            403,
            r#"pods is forbidden: User "system:serviceaccount:bob:bob" cannot create resource "pods""#,
            Phase::Pending,
            Reason::ApiUnavailable,
        ),
        (500, "etcdserver: request timed out", Phase::Pending, Reason::ApiUnavailable),
    ];
    for (code, message, phase, reason) in cases {
        let mut o = planned();
        o.created = Some(Created::Refused { code, message: message.into() });
        let t = act(decide(&ib(5, None), &o, &settings(None)));
        assert_eq!(phase_reason(&t), (phase, Some(reason)), "{message}");
        let written = status(&t).message.clone().unwrap();
        assert!(written.contains(message), "the API server's message is in status.message: {written}");
        assert_eq!(events(&t), [(true, reason.to_string())], "each with an Event");
        match phase {
            Phase::Failed => assert_eq!(t.next, Next::Change, "a permanent refusal is not retried"),
            _ => assert!(
                matches!(t.next, Next::After(d) if d >= Duration::from_secs(5)),
                "backoff: {:?}",
                t.next
            ),
        }
    }
    assert_eq!(refusal(403, "p", pss).reason, Reason::PodRejected);
}

#[test]
fn waits_back_off_and_end_at_the_queue_time_limit() {
    let cases = [
        Failure::new(Reason::SecretNotFound, "Secret team/reg (spec.registryAuth) does not exist"),
        Failure::new(
            Reason::SecretInvalid,
            "Secret team/reg key .dockerconfigjson is not a docker config: expected value at line 1 column 1",
        ),
    ];
    for f in cases {
        let mut o = seen();
        o.credentials = Some(Err(f.clone()));
        let first = act(decide(&ib(0, None), &o, &settings(None)));
        assert_eq!(phase_reason(&first), (Phase::Pending, Some(f.reason)));
        assert_eq!(status(&first).message.as_deref(), Some(f.message.as_str()));
        assert_eq!(first.next, Next::After(Duration::from_secs(5)), "quick at first");
        assert_eq!(events(&first).len(), 1);
        // The same wait again writes nothing and announces nothing; it looks less often.
        let again_ib = ib(600, Some(serde_json::to_value(status(&first)).unwrap()));
        let again = act(decide(&again_ib, &o, &settings(None)));
        assert!(again.status.is_none() && again.effects.is_empty(), "no write, no event: {again:?}");
        assert_eq!(again.next, Next::After(Duration::from_secs(60)), "at most once a minute");
        // Past the queue time limit it ends.
        let late = act(decide(&ib(1801, None), &o, &settings(None)));
        assert_eq!(phase_reason(&late), (Phase::Failed, Some(Reason::QueueTimeout)));
        assert!(status(&late).message.as_ref().unwrap().contains(&f.message));
    }
}

fn api_reachable(s: &ImageBuildStatus) -> Option<(String, String, String)> {
    let c = s.conditions.iter().find(|c| c.type_ == "ApiReachable")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[test]
fn an_api_error_leaves_phase_reason_and_attempt_and_says_so_in_a_condition() {
    let mut o = seen();
    o.api_error = Some(Failure::new(Reason::ApiUnavailable, "cannot read build pod p1: connection reset"));
    // A running build: an unknown pod is not a gone pod; no new attempt, no new reason.
    let b = ib(60, Some(building("p1")));
    let t = act(decide(&b, &o, &settings(None)));
    let s = status(&t);
    assert_eq!(
        (s.phase, s.reason, s.attempts, s.pod_name.as_deref()),
        (Some(Phase::Building), None, Some(1), Some("p1"))
    );
    let reachable =
        ("False".into(), "ApiUnavailable".into(), "cannot read build pod p1: connection reset".into());
    assert_eq!(api_reachable(s), Some(reachable));
    assert_eq!(events(&t), [(true, "ApiUnavailable".to_string())]);
    assert_eq!(t.next, Next::After(Duration::from_secs(5)));
    // Still failing: nothing new to write or announce.
    let again = ib(60, Some(serde_json::to_value(s).unwrap()));
    let t2 = act(decide(&again, &o, &settings(None)));
    assert!(t2.status.is_none() && t2.effects.iter().all(|e| !matches!(e, Effect::Event { .. })), "{t2:?}");
    // The API answers again: the condition goes even though nothing else changed.
    let mut ok = seen();
    ok.pod = Some(Some(pod(json!({"phase": "Pending"}))));
    let mut quiet = serde_json::to_value(s).unwrap();
    quiet["message"] = json!("build pod p1 is starting");
    let t3 = act(decide(&ib(60, Some(quiet)), &ok, &settings(None)));
    let s3 = status(&t3);
    assert_eq!((s3.phase, api_reachable(s3)), (Some(Phase::Building), None), "{s3:?}");
    // A new ImageBuild gets a phase all the same.
    let t4 = act(decide(&ib(0, None), &o, &settings(None)));
    assert_eq!(phase_reason(&t4), (Phase::Pending, Some(Reason::ApiUnavailable)));
    assert!(api_reachable(status(&t4)).is_some());
    // A retry waiting for its backoff keeps its attempt count too.
    let mut retrying = building("p1");
    retrying["phase"] = json!("Pending");
    retrying["podName"] = Value::Null;
    let t5 = act(decide(&ib(60, Some(retrying.clone())), &o, &settings(None)));
    assert_eq!((status(&t5).phase, status(&t5).attempts), (Some(Phase::Pending), Some(1)));
    // One that never started and never gets an answer (RBAC) ends at the queue time limit.
    let t6 = act(decide(&ib(1801, Some(retrying)), &o, &settings(None)));
    assert_eq!(phase_reason(&t6), (Phase::Failed, Some(Reason::QueueTimeout)));
    let t7 = act(decide(&ib(1801, Some(building("p1"))), &o, &settings(None)));
    assert_eq!(status(&t7).phase, Some(Phase::Building), "a started build is not on the queue clock");
}

#[test]
fn the_attempts_own_pod_found_before_the_cache_is_followed_not_taken_for_a_cache_hit() {
    // The pod was created and pushed the image, but the status write after the create was lost.
    let mut o = planned();
    o.pod = Some(Some(*stored(&["u-1"])));
    o.cache = Some(Ok(Some(DIGEST.into())));
    let t = act(decide(&ib(5, None), &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Building, None));
    assert_eq!(status(&t).pod_name.as_deref(), Some("bob-build-x-1"));
    assert_eq!(status(&t).cache_hit, Some(false));
    assert!(
        !t.effects.iter().any(|e| matches!(e, Effect::Count(Count::PodStarted { .. }))),
        "not counted twice"
    );
    // Another ImageBuild's pod of the key: the image exists, so that is a cache hit for this one.
    o.pod = Some(Some(*stored(&["other"])));
    assert_eq!(
        phase_reason(&act(decide(&ib(5, None), &o, &settings(None)))),
        (Phase::Succeeded, Some(Reason::CacheHit))
    );
    // ... and without the image, this one joins it (no slot, no create).
    o.cache = Some(Ok(None));
    let t = act(decide(&ib(5, None), &o, &settings(Some(1))));
    assert!(t.effects.contains(&Effect::Own("bob-build-x-1".into())), "{t:?}");
}

#[test]
fn registry_answers_before_the_build_wait_or_end() {
    let mut o = planned();
    o.cache = Some(Err(Failure::new(Reason::RegistryUnavailable, "registry reg.test is unreachable")));
    let t = act(decide(&ib(0, None), &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Pending, Some(Reason::RegistryUnavailable)));
    o.cache = Some(Err(Failure::new(Reason::RegistryDenied, "unauthorized")));
    assert_eq!(
        phase_reason(&act(decide(&ib(0, None), &o, &settings(None)))),
        (Phase::Pending, Some(Reason::RegistryDenied))
    );
    let mut o = planned();
    o.resolved = Some(Err(Failure::new(Reason::BaseImagePullFailed, "FROM x does not exist")));
    let t = act(decide(&ib(0, None), &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Failed, Some(Reason::BaseImagePullFailed)));
    o.resolved = Some(Err(Failure::new(Reason::RegistryUnavailable, "down")));
    assert_eq!(phase_reason(&act(decide(&ib(0, None), &o, &settings(None)))).0, Phase::Pending);
}

#[test]
fn an_unplannable_spec_fails_with_invalid_spec() {
    let mut b = ib(0, None);
    b.spec.workspace_image_repository = "reg.test/ws:tagged".into();
    let t = act(decide(&b, &planned(), &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Failed, Some(Reason::InvalidSpec)));
}

#[test]
fn a_full_cluster_queues_until_the_queue_time_limit() {
    let mut o = planned();
    o.slots = Some(Slots { position: Some(2), running: 2, max: 2 });
    let t = act(decide(&ib(0, None), &o, &settings(Some(2))));
    assert_eq!(phase_reason(&t), (Phase::Queued, None));
    assert_eq!(status(&t).message.as_deref(), Some("queued at position 2: 2 of 2 builds running"));
    let late = act(decide(&ib(3600, None), &o, &settings(Some(2))));
    assert_eq!(phase_reason(&late), (Phase::Failed, Some(Reason::QueueTimeout)));
}

#[test]
fn a_running_build_is_followed_and_its_end_decided() {
    let b = ib(60, Some(building("p1")));
    let cfg = settings(None);
    assert_eq!(need(decide(&b, &seen(), &cfg)), Need::Pod("p1".into()));
    let mut o = seen();
    o.pod = Some(Some(pod(json!({"phase": "Running"}))));
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Building, None));
    assert_eq!(t.next, Next::After(Duration::from_secs(60)));
    // Gone: an infrastructure failure, retried on a new pod after the backoff.
    o.pod = Some(None);
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Pending, Some(Reason::PodDeleted)));
    assert!(status(&t).next_attempt_at.is_some() && status(&t).pod_name.is_none());
    assert!(t.effects.contains(&Effect::Cleanup("p1".into())));
    assert!(t.effects.contains(&Effect::Count(Count::Retry(Reason::PodDeleted))));
    // A failed step is final.
    let result = r#"{"version":1,"reason":"BuildStepFailed","message":"step 2/2: `RUN make` failed with exit code 2","logTail":"make: error\n"}"#;
    o.pod = Some(Some(pod(
        json!({"phase": "Failed", "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0,
        "image": "bob", "imageID": "", "state": {"terminated": {"exitCode": 1, "message": result}}}]}),
    )));
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Failed, Some(Reason::BuildStepFailed)));
    assert_eq!(status(&t).failure.as_ref().unwrap().log_tail.as_deref(), Some("make: error\n"));
}

#[test]
fn a_reported_success_is_verified_before_succeeded() {
    let b = ib(60, Some(building("p1")));
    let cfg = settings(None);
    let result = format!(r#"{{"version":1,"baseDigest":"{DIGEST}","targetDigest":"{DIGEST}"}}"#);
    let mut o = seen();
    o.pod = Some(Some(pod(
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0,
        "image": "bob", "imageID": "", "state": {"terminated": {"exitCode": 0, "message": result}}}]}),
    )));
    assert!(matches!(need(decide(&b, &o, &cfg)), Need::Verify(_)));
    o.verified = Some(Ok(Some(DIGEST.into())));
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Succeeded, Some(Reason::Built)));
    assert!(t.effects.contains(&Effect::Cleanup("p1".into())));
    o.verified = Some(Ok(None));
    assert_eq!(phase_reason(&act(decide(&b, &o, &cfg))), (Phase::Failed, Some(Reason::VerifyFailed)));
    o.verified = Some(Err(Failure::new(Reason::RegistryUnavailable, "down")));
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Verifying, Some(Reason::RegistryUnavailable)));
}

#[test]
fn a_verified_build_reports_its_layer_cache_in_status_and_metrics() {
    let b = ib(60, Some(building("p1")));
    let cfg = settings(None);
    let result = format!(
        r#"{{"version":1,"baseDigest":"{DIGEST}","targetDigest":"{DIGEST}","layerCache":{{"mode":"ReadOnly","hits":3,"note":"the layer cache refused writes"}}}}"#
    );
    let mut o = seen();
    o.pod = Some(Some(pod(
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0,
        "image": "bob", "imageID": "", "state": {"terminated": {"exitCode": 0, "message": result}}}]}),
    )));
    o.verified = Some(Ok(Some(DIGEST.into())));
    let t = act(decide(&b, &o, &cfg));
    assert_eq!(phase_reason(&t), (Phase::Succeeded, Some(Reason::Built)));
    let report = status(&t).layer_cache.clone().expect("status.layerCache");
    assert_eq!((report.mode, report.hits), (Mode::ReadOnly, 3));
    assert_eq!(report.note.as_deref(), Some("the layer cache refused writes"));
    let counted = Count::LayerCache { mode: Mode::ReadOnly, hits: 3 };
    assert!(t.effects.contains(&Effect::Count(counted.clone())), "{:?}", t.effects);
    let metrics = Metrics::default();
    metrics.count(counted);
    let text = metrics.encode();
    assert!(text.contains("bob_layer_cache_hits_total 3"), "{text}");
    assert!(text.contains(r#"bob_layer_cache_builds_total{mode="ReadOnly"} 1"#), "{text}");
    // The status stays small: the whole status with the report is a few hundred bytes.
    assert!(serde_json::to_string(status(&t)).unwrap().len() < 2048);
}

#[test]
fn terminal_is_final_a_backoff_is_waited_out_and_cancel_keeps_the_output() {
    let done = json!({"phase": "Failed", "reason": "BuildStepFailed", "observedGeneration": 1});
    let t = act(decide(&ib(0, Some(done)), &seen(), &settings(None)));
    assert!(t.status.is_none() && t.effects.is_empty() && t.next == Next::Change);

    let later = now() + SignedDuration::from_secs(30);
    let backoff = json!({"phase": "Pending", "reason": "PodEvicted", "observedGeneration": 1, "attempts": 1,
                         "nextAttemptAt": later.to_string()});
    let t = act(decide(&ib(0, Some(backoff)), &seen(), &settings(None)));
    assert!(t.status.is_none());
    assert_eq!(t.next, Next::After(Duration::from_secs(30)));

    let mut b = ib(60, Some(building("p1")));
    b.spec.cancel = true;
    assert_eq!(need(decide(&b, &seen(), &settings(None))), Need::LogTail("p1".into()));
    let mut o = seen();
    o.log_tail = Some(Some("step 1\n".into()));
    let t = act(decide(&b, &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Cancelled, Some(Reason::Cancelled)));
    assert_eq!(status(&t).failure.as_ref().unwrap().log_tail.as_deref(), Some("step 1\n"));
    assert!(t.effects.contains(&Effect::Cleanup("p1".into())));
}

#[test]
fn every_transition_that_writes_has_a_phase_and_every_terminal_one_a_reason() {
    // A sweep over the facts above: no combination leaves an ImageBuild without a phase.
    let statuses = [None, Some(building("p1"))];
    let facts: Vec<Observed> = {
        let mut v = vec![seen()];
        let mut o = planned();
        for created in
            [Created::New(stored(&["u-1"])), Created::Refused { code: 403, message: "exceeded quota".into() }]
        {
            o.created = Some(created);
            v.push(o.clone());
        }
        let mut o = seen();
        o.api_error = Some(Failure::new(Reason::ApiUnavailable, "x"));
        v.push(o);
        v
    };
    let mut checked = BTreeMap::new();
    for s in &statuses {
        for o in &facts {
            if let Step::Act(t) = decide(&ib(0, s.clone()), o, &settings(None))
                && let Some(st) = &t.status
            {
                assert!(st.phase.is_some(), "{st:?}");
                if st.phase.is_some_and(Phase::is_terminal) {
                    assert!(st.reason.is_some(), "{st:?}");
                }
                *checked.entry(format!("{:?}", st.phase)).or_insert(0) += 1;
            }
        }
    }
    assert!(checked.len() >= 2, "{checked:?}");
}

#[test]
fn each_attempt_records_where_its_log_is_and_ships_it_while_it_runs() {
    let mut o = planned();
    o.created = Some(Created::New(stored(&["u-1"])));
    let t = act(decide(&ib(5, None), &o, &settings(None)));
    let name = status(&t).pod_name.clone().unwrap();
    assert_eq!(status(&t).log_refs, [bob::crd::LogRef { attempt: 1, build_log: name.clone() }]);
    assert!(t.effects.contains(&Effect::ShipLog { pod: name.clone(), attempt: 1 }));
    // While it runs, the shipping is ensured again (after a controller restart too).
    let mut running = seen();
    running.pod = Some(Some(pod(json!({"phase": "Running"}))));
    let b = ib(60, Some(serde_json::to_value(status(&t)).unwrap()));
    let t2 = act(decide(&b, &running, &settings(None)));
    assert!(t2.effects.contains(&Effect::ShipLog { pod: name.clone(), attempt: 1 }), "{t2:?}");
    // A retry's attempt adds its own entry; the first stays.
    let mut retried = serde_json::to_value(status(&t)).unwrap();
    retried["phase"] = json!("Pending");
    retried["podName"] = Value::Null;
    retried["nextAttemptAt"] = json!((now() - SignedDuration::from_secs(1)).to_string());
    let mut o2 = planned();
    o2.created = Some(Created::New(stored(&["u-1"])));
    let t3 = act(decide(&ib(60, Some(retried)), &o2, &settings(None)));
    let refs: Vec<i32> = status(&t3).log_refs.iter().map(|r| r.attempt).collect();
    assert_eq!(refs, [1, 2]);
}

#[test]
fn the_status_records_the_uid_of_the_pod_it_created_joined_or_found() {
    for created in [Created::New(stored(&["u-1"])), Created::Exists(stored(&["other"]))] {
        let mut o = planned();
        o.created = Some(created.clone());
        let t = act(decide(&ib(5, None), &o, &settings(None)));
        assert_eq!(status(&t).pod_uid.as_deref(), Some("pod-uid-1"), "{created:?}");
    }
    let mut recorded = building("p1");
    recorded["podUid"] = json!("pod-uid-1");
    let b = ib(60, Some(recorded.clone()));
    let mut o = seen();
    // Followed: kept; a status that did not record it yet (an older bob's) gets the UID of the
    // pod it names.
    let mut running: Pod = pod(json!({"phase": "Running"}));
    running.metadata.uid = Some("pod-uid-1".into());
    o.pod = Some(Some(running.clone()));
    let t = act(decide(&b, &o, &settings(None)));
    assert_eq!(status(&t).pod_uid.as_deref(), Some("pod-uid-1"));
    let t = act(decide(&ib(60, Some(building("p1"))), &o, &settings(None)));
    assert_eq!(status(&t).pod_uid.as_deref(), Some("pod-uid-1"), "backfilled");
    let mut unchanged = recorded.clone();
    unchanged["message"] = json!("build pod p1 is running");
    let t = act(decide(&ib(60, Some(unchanged)), &o, &settings(None)));
    assert!(t.status.is_none(), "nothing new to write: {:?}", t.status);
    // A retry forgets the old pod with its UID.
    o.pod = Some(None);
    let t = act(decide(&b, &o, &settings(None)));
    assert_eq!(phase_reason(&t), (Phase::Pending, Some(Reason::PodDeleted)));
    assert_eq!((status(&t).pod_name.as_deref(), status(&t).pod_uid.as_deref()), (None, None));
}
