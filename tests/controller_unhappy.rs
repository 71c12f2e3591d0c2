//! The unhappy paths of a reconcile against a fake API (tower-test) answering as a real API
//! server does: a pod refused by Pod Security admission, one refused by a ResourceQuota, and a
//! registry Secret that is not a docker config. Each ends in a status with its own reason, the
//! API server's words and an Event — never in silence.

mod common;

use std::sync::Arc;

use bob::controller::reconcile::reconcile;
use common::fake_api::*;
use common::*;
use http::Method;
use serde_json::{Value, json};

/// A registry holding `lib/app:1`, and the image-source spec that builds from it.
async fn registry() -> (Registry, Value) {
    let reg = Registry::start(RegistryAuth::None);
    Direct::new(&reg.host, None).push_image("lib/app", "1", &small_image(3, "amd64")).await;
    let spec = json!({"source": {"image": {"ref": reg.repo("lib/app:1")}}, "workspaceImageRepository": reg.repo("ws"),
                      "registryAuth": {"secretRef": {"name": "reg"}}});
    (reg, spec)
}

fn status_error(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}),
    )
}

/// The Events the controller published: (type, reason, note).
fn events(calls: &[Call]) -> Vec<(String, String, String)> {
    calls
        .iter()
        .filter(|c| c.method == Method::POST && c.path.contains("/events"))
        .map(|c| {
            let s = |k: &str| c.body[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"))
        })
        .collect()
}

async fn refused(
    code: u16,
    reason: &'static str,
    message: &'static str,
) -> (Value, Vec<(String, String, String)>) {
    let (_reg, spec) = registry().await;
    let secret = registry_secret("reg", "{}");
    let (client, calls) = fake_api(move |c| match (c.method.clone(), c.route()) {
        (_, r) if r == "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
        (Method::GET, r) if r.contains("/pods/") => not_found(),
        (Method::POST, r) if r.ends_with("/pods") => status_error(code, reason, message),
        _ => default_reply(c),
    });
    let ib = Arc::new(image_build("refused", spec, None));
    reconcile(ib, context(client)).await.expect("a refusal is a status, not a reconcile error");
    let calls = calls.lock().unwrap().clone();
    (last_status(&calls, "refused").expect("a status is written"), events(&calls))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_refused_by_pod_security_fails_with_the_api_servers_words_and_an_event() {
    let message = r#"pods "bob-build-0-1" is forbidden: violates PodSecurity "baseline:latest": forbidden AppArmor profile (container "build" must not set AppArmor profile type to "Unconfined"), non-default capabilities (container "build" must not include "SYS_ADMIN")"#;
    let (status, events) = refused(403, "Forbidden", message).await;
    assert_eq!((status["phase"].as_str(), status["reason"].as_str()), (Some("Failed"), Some("PodRejected")));
    assert!(status["message"].as_str().unwrap().contains("violates PodSecurity"), "{status:#}");
    assert_eq!(status["conditions"][0]["reason"], "PodRejected");
    assert!(
        events.iter().any(|(t, r, n)| t == "Warning" && r == "PodRejected" && n.contains("PodSecurity")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_beyond_the_quota_waits_pending_with_the_quota_message() {
    let message = r#"pods "bob-build-0-1" is forbidden: exceeded quota: builds, requested: pods=1, used: pods=2, limited: pods=2"#;
    let (status, events) = refused(403, "Forbidden", message).await;
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("QuotaExceeded"))
    );
    assert!(status["message"].as_str().unwrap().contains("exceeded quota"), "{status:#}");
    assert!(events.iter().any(|(t, r, _)| t == "Warning" && r == "QuotaExceeded"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_pod_fails_with_pod_rejected() {
    let (status, _) = refused(
        422,
        "Invalid",
        r#"Pod "bob-build-0-1" is invalid: spec.activeDeadlineSeconds: Invalid value"#,
    )
    .await;
    assert_eq!((status["phase"].as_str(), status["reason"].as_str()), (Some("Failed"), Some("PodRejected")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_registry_secret_has_its_own_reason_naming_the_secret_and_the_key() {
    let (_reg, spec) = registry().await;
    let secret = registry_secret("reg", "this is not json");
    let (client, calls) = fake_api(move |c| match c.route().as_str() {
        "GET /api/v1/namespaces/default/secrets/reg" => (200, secret.clone()),
        _ => default_reply(c),
    });
    let ib = Arc::new(image_build("bad-secret", spec, None));
    let action =
        reconcile(ib, context(client)).await.expect("a bad Secret is a status, not a reconcile error");
    let calls = calls.lock().unwrap().clone();
    let status = last_status(&calls, "bad-secret").expect("a status is written");
    assert_eq!(
        (status["phase"].as_str(), status["reason"].as_str()),
        (Some("Pending"), Some("SecretInvalid"))
    );
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("Secret default/reg") && message.contains(".dockerconfigjson"), "{message}");
    assert!(calls.iter().all(|c| !c.path.contains("/pods")), "no pod for a build that cannot start");
    assert!(format!("{action:?}").contains("requeue_after: Some"), "looked at again later: {action:?}");
}
