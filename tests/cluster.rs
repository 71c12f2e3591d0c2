//! End to end in a real cluster (kind or k3d) with `bob controller` running against it. Ignored
//! by default: no API server can run on the machines that run the other tests. README section
//! "Cluster tests" says how to set up the cluster, the registry and the controller.
//!
//! Environment: `KUBECONFIG` (the cluster), `BOB_E2E_REGISTRY` (a registry that pods and the
//! controller both reach under that name, e.g. `kind-registry:5000`), `BOB_E2E_BASE` (an image in
//! it with a shell, e.g. `kind-registry:5000/library/busybox:1.36`).

use std::time::Duration;

use bob::crd::{ImageBuild, Phase};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: see the README section \"Cluster tests\""))
}

async fn api() -> Api<ImageBuild> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await.expect("KUBECONFIG points at the test cluster");
    Api::namespaced(client, "default")
}

/// Creates an ImageBuild and waits until it is terminal; returns its status.
async fn build(api: &Api<ImageBuild>, name: &str, source: Value) -> Value {
    let registry = env("BOB_E2E_REGISTRY");
    let ib: ImageBuild = serde_json::from_value(json!({
        "apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "metadata": {"name": name},
        "spec": {"source": source, "baseImageRepository": format!("{registry}/e2e/base"),
                 "workspaceImageRepository": format!("{registry}/e2e/workspace")}}))
    .unwrap();
    let _ = api.delete(name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), &ib).await.unwrap();
    for _ in 0..600 {
        let got = api.get(name).await.unwrap();
        if got.status.as_ref().and_then(|s| s.phase).is_some_and(Phase::is_terminal) {
            return serde_json::to_value(got.status).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{name} did not finish in 5 minutes");
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn image_source_builds_then_hits_the_cache() {
    let api = api().await;
    let source = json!({"image": {"ref": env("BOB_E2E_BASE")}});
    let first = build(&api, "e2e-image", source.clone()).await;
    assert_eq!(first["phase"], "Succeeded", "{first:#}");
    let second = build(&api, "e2e-image-again", source).await;
    assert_eq!(
        (second["reason"].as_str(), &second["cacheHit"]),
        (Some("CacheHit"), &json!(true)),
        "{second:#}"
    );
    assert_eq!(second["output"]["digest"], first["output"]["digest"]);
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn dockerfiles_build_and_failures_carry_their_log_tail() {
    let api = api().await;
    let ok = format!("FROM {}\nRUN echo from-the-cluster > /e2e.txt\n", env("BOB_E2E_BASE"));
    let built = build(&api, "e2e-inline", json!({"dockerfile": {"inline": ok}})).await;
    assert_eq!(
        (built["phase"].as_str(), built["reason"].as_str()),
        (Some("Succeeded"), Some("Built")),
        "{built:#}"
    );
    let bad = format!("FROM {}\nRUN echo e2e-boom && exit 4\n", env("BOB_E2E_BASE"));
    let failed = build(&api, "e2e-failing", json!({"dockerfile": {"inline": bad}})).await;
    assert_eq!(failed["reason"], "BuildStepFailed", "{failed:#}");
    assert!(failed["failure"]["logTail"].as_str().unwrap_or_default().contains("e2e-boom"), "{failed:#}");
}
