//! What a build pod says, as pure functions over pod-status fixtures: every outcome the
//! controller reports (success, each failure mode, running, pending, unschedulable).

use bob::controller::status::{PodState, observe};
use bob::reason::Reason;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

fn pod(status: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "bob-build-x-1"}, "status": status})).unwrap()
}

fn terminated(name: &str, exit: i32, reason: &str, message: Option<&str>) -> Value {
    json!({"name": name, "ready": false, "restartCount": 0, "image": "bob", "imageID": "",
           "state": {"terminated": {"exitCode": exit, "reason": reason, "message": message}}})
}

fn waiting(name: &str, reason: &str, message: &str) -> Value {
    json!({"name": name, "ready": false, "restartCount": 3, "image": "bob", "imageID": "",
           "state": {"waiting": {"reason": reason, "message": message}}})
}

fn running(name: &str) -> Value {
    json!({"name": name, "ready": true, "restartCount": 0, "image": "bob", "imageID": "",
           "state": {"running": {"startedAt": "2026-11-25T00:00:00Z"}}})
}

fn failed(state: PodState) -> (Reason, String, Option<String>, Option<String>) {
    match state {
        PodState::Failed(f) => (f.reason, f.message, f.container, f.log_tail),
        other => panic!("expected a failure, got {other:?}"),
    }
}

const OK: &str = r#"{"version":1,"baseDigest":"sha256:aa","baseBuilt":true,"targetDigest":"sha256:aa","timings":{"resolveMs":1,"totalMs":9}}"#;

#[test]
fn a_successful_build_yields_its_result_for_verification() {
    let p =
        pod(json!({"phase": "Succeeded", "initContainerStatuses": [terminated("proxy", 143, "Error", None)],
                       "containerStatuses": [terminated("build", 0, "Completed", Some(OK))]}));
    let PodState::Finished(r) = observe(&p) else { panic!("finished") };
    assert_eq!(r.target_digest.as_deref(), Some("sha256:aa"));
}

#[test]
fn a_failed_build_reports_the_result_reason_message_and_tail() {
    let msg = r#"{"version":1,"reason":"BuildStepFailed","message":"step 2/2: `RUN make` failed with exit code 2","step":"RUN make","exitCode":2,"logTail":"make: *** [all] Error 2\n"}"#;
    let p =
        pod(json!({"phase": "Failed", "containerStatuses": [terminated("build", 1, "Error", Some(msg))]}));
    let (reason, message, container, tail) = failed(observe(&p));
    assert_eq!(reason, Reason::BuildStepFailed);
    assert!(message.contains("exit code 2"));
    assert_eq!((container.as_deref(), tail.as_deref()), (Some("build"), Some("make: *** [all] Error 2\n")));
}

#[test]
fn an_exit_without_a_result_is_a_pod_failure_with_what_it_printed() {
    let p = pod(
        json!({"phase": "Failed", "containerStatuses": [terminated("build", 2, "Error", Some("panic: boom"))]}),
    );
    let (reason, message, _, tail) = failed(observe(&p));
    assert_eq!(reason, Reason::PodFailed);
    assert!(message.contains("exited with code 2"));
    assert_eq!(tail.as_deref(), Some("panic: boom"));
}

#[test]
fn oom_killed_builds_are_out_of_memory() {
    let p =
        pod(json!({"phase": "Failed", "containerStatuses": [terminated("build", 137, "OOMKilled", None)]}));
    assert_eq!(failed(observe(&p)).0, Reason::OutOfMemory);
}

#[test]
fn the_deadline_is_a_build_timeout_and_eviction_is_named() {
    let p = pod(
        json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}),
    );
    assert_eq!(failed(observe(&p)).0, Reason::BuildTimeout);
    let p = pod(
        json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage."}),
    );
    let (reason, message, _, _) = failed(observe(&p));
    assert_eq!(reason, Reason::PodEvicted);
    assert!(message.contains("ephemeral-storage"));
}

#[test]
fn image_pull_back_off_of_the_builder_image_fails_early() {
    let p = pod(
        json!({"phase": "Pending", "initContainerStatuses": [waiting("proxy", "ImagePullBackOff", "Back-off pulling image \"ghcr.io/bob-dev/bob:0\"")]}),
    );
    let (reason, message, container, _) = failed(observe(&p));
    assert_eq!((reason, container.as_deref()), (Reason::BuilderImagePullFailed, Some("proxy")));
    assert!(message.contains("ghcr.io/bob-dev/bob:0"));
}

#[test]
fn a_missing_secret_in_a_container_is_secret_not_found() {
    let p = pod(
        json!({"phase": "Pending", "initContainerStatuses": [waiting("clone", "CreateContainerConfigError", "secret \"git-credentials\" not found")]}),
    );
    let (reason, message, _, _) = failed(observe(&p));
    assert_eq!(reason, Reason::SecretNotFound);
    assert!(message.contains("git-credentials"));
}

#[test]
fn a_failed_clone_is_a_source_fetch_failure_with_its_log() {
    let p = pod(
        json!({"phase": "Failed", "initContainerStatuses": [terminated("clone", 128, "Error", Some("fatal: could not read Username"))]}),
    );
    let (reason, _, container, tail) = failed(observe(&p));
    assert_eq!((reason, container.as_deref()), (Reason::SourceFetchFailed, Some("clone")));
    assert_eq!(tail.as_deref(), Some("fatal: could not read Username"));
}

#[test]
fn a_crashing_proxy_is_proxy_unavailable() {
    let mut proxy = waiting("proxy", "CrashLoopBackOff", "back-off 40s");
    proxy["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error", "message": "bob: invalid BOB_PROXY_BASE_REF"}});
    let p = pod(json!({"phase": "Pending", "initContainerStatuses": [proxy]}));
    let (reason, _, _, tail) = failed(observe(&p));
    assert_eq!(reason, Reason::ProxyUnavailable);
    assert_eq!(tail.as_deref(), Some("bob: invalid BOB_PROXY_BASE_REF"));
}

#[test]
fn running_pending_and_unschedulable_are_not_terminal() {
    let p = pod(
        json!({"phase": "Running", "initContainerStatuses": [running("proxy")], "containerStatuses": [running("build")]}),
    );
    assert_eq!(observe(&p), PodState::Running);
    assert_eq!(observe(&pod(json!({"phase": "Pending"}))), PodState::Waiting(None));
    let p = pod(
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": "0/3 nodes are available: 3 Insufficient memory."}]}),
    );
    let PodState::Waiting(Some((reason, message))) = observe(&p) else { panic!("unschedulable") };
    assert_eq!(reason, Reason::Unschedulable);
    assert!(message.contains("Insufficient memory"));
}

#[test]
fn a_pod_deleted_mid_build_is_recorded_as_such() {
    let mut p = pod(json!({"phase": "Running", "containerStatuses": [running("build")]}));
    p.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    assert_eq!(failed(observe(&p)).0, Reason::PodDeleted);
}

#[test]
fn a_build_stopped_by_a_signal_is_the_pods_fate_not_a_user_cancel() {
    // bob build writes `Cancelled` when kubelet's SIGTERM stops it; the ImageBuild was not
    // cancelled by its user, so the pod's fate is reported, and it is retryable.
    let msg = r#"{"version":1,"reason":"Cancelled","message":"stopped by SIGTERM before the build finished","logTail":"STEP 2/2: RUN make\n"}"#;
    let build = [terminated("build", 1, "Error", Some(msg))];
    let mut p = pod(json!({"phase": "Running", "containerStatuses": build}));
    let (reason, message, container, tail) = failed(observe(&p));
    assert_eq!(
        (reason, container.as_deref(), tail.as_deref()),
        (Reason::PodFailed, Some("build"), Some("STEP 2/2: RUN make\n"))
    );
    assert!(message.contains("stopped by SIGTERM"), "{message}");
    p.metadata.deletion_timestamp = serde_json::from_value(json!("2026-11-25T00:00:00Z")).unwrap();
    assert_eq!(failed(observe(&p)).0, Reason::PodDeleted);
    assert!(Reason::PodFailed.is_retryable() && Reason::PodDeleted.is_retryable());
}
