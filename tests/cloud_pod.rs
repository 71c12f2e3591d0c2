//! The build pod and cloud identities (pure, no cluster): every container is named in the EKS
//! webhooks' skip annotation; a pod that a webhook mutated anyway (as the IRSA and Pod Identity
//! webhooks mutate pods) is caught, whatever the container, and a service mesh's token is not; a minted credential is mounted by the
//! proxy alone, as a whole Secret volume the kubelet refreshes; and a decision that meets such a
//! pod fails the ImageBuild with a message saying what to change.

mod common;

use std::collections::BTreeMap;

use bob::cloud::guard::{SKIP_CONTAINERS, identity_leaks};
use bob::controller::decide::{Access, Created, Need, Observed, Settings, Step, decide};
use bob::controller::pod::use_minted_credential;
use bob::controller::{PlanConfig, Policy, Resolved};
use bob::crd::{ImageBuild, Phase};
use bob::reason::Reason;
use common::samples::*;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const SAMPLES: [&str; 3] = ["image-source.yaml", "inline-dockerfile.yaml", "git-dockerfile.yaml"];

/// What the EKS Pod Identity Webhook (IRSA) adds to a pod whose ServiceAccount names a role, in
/// every container its skip annotation does not name (or in all, for a webhook that ignores it).
fn irsa_webhook(pod: &Pod, honours_skip: bool) -> Pod {
    let mut v = serde_json::to_value(pod).unwrap();
    let skip: Vec<String> = v["metadata"]["annotations"][SKIP_CONTAINERS]
        .as_str()
        .filter(|_| honours_skip)
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let mut mutated = false;
    for list in ["initContainers", "containers"] {
        for c in v["spec"][list].as_array_mut().into_iter().flatten() {
            if skip.iter().any(|s| c["name"] == s.as_str()) {
                continue;
            }
            mutated = true;
            let env = c["env"].as_array_mut().unwrap();
            for (name, value) in [
                ("AWS_STS_REGIONAL_ENDPOINTS", "regional"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/broad"),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"),
            ] {
                env.push(json!({"name": name, "value": value}));
            }
            let mounts = c["volumeMounts"].as_array_mut().unwrap();
            mounts.push(json!({"name": "aws-iam-token", "mountPath": "/var/run/secrets/eks.amazonaws.com/serviceaccount", "readOnly": true}));
        }
    }
    if mutated {
        v["spec"]["volumes"].as_array_mut().unwrap().push(json!({"name": "aws-iam-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"}}]}}));
    }
    serde_json::from_value(v).unwrap()
}

/// What EKS Pod Identity's webhook adds to one container: the agent's URL and a token file.
fn pod_identity_webhook(pod: &Pod, container: &str) -> Pod {
    let mut v = serde_json::to_value(pod).unwrap();
    for list in ["initContainers", "containers"] {
        for c in v["spec"][list].as_array_mut().into_iter().flatten().filter(|c| c["name"] == container) {
            c["env"].as_array_mut().unwrap().push(
                json!({"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://169.254.170.23/v1/credentials"}),
            );
        }
    }
    serde_json::from_value(v).unwrap()
}

fn names(pod: &Pod) -> Vec<String> {
    containers(pod).iter().map(|c| c.name.clone()).collect()
}

#[test]
fn every_container_is_named_in_the_webhooks_skip_annotation() {
    for file in SAMPLES {
        let (_, p) = planned(file);
        let skip = p.pod.metadata.annotations.as_ref().unwrap()[SKIP_CONTAINERS].clone();
        let mut listed: Vec<String> = skip.split(',').map(str::to_string).collect();
        let mut all = names(&p.pod);
        listed.sort();
        all.sort();
        assert_eq!(listed, all, "{file}");
        // A webhook that honours it leaves the pod without any identity.
        assert_eq!(identity_leaks(&irsa_webhook(&p.pod, true)), Vec::<String>::new(), "{file}");
    }
}

#[test]
fn a_pod_a_webhook_gave_an_identity_is_caught_in_every_container() {
    for file in SAMPLES {
        let (_, p) = planned(file);
        assert!(identity_leaks(&p.pod).is_empty(), "{file}: the planned pod has no identity");
        let leaks = identity_leaks(&irsa_webhook(&p.pod, false));
        for name in names(&p.pod) {
            assert!(
                leaks.iter().any(|l| l == &format!("container {name} has AWS_ROLE_ARN")),
                "{file}: {leaks:?}"
            );
            assert!(
                leaks.iter().any(|l| l == &format!("container {name} mounts the token volume aws-iam-token")),
                "{file}: {leaks:?}"
            );
        }
        let leaks = identity_leaks(&pod_identity_webhook(&p.pod, "build"));
        assert_eq!(leaks, ["container build has AWS_CONTAINER_CREDENTIALS_FULL_URI"], "{file}");
    }
    // A token counts by its audience: AWS's (in any volume) is an identity, a mesh's is not.
    let (_, p) = planned("inline-dockerfile.yaml");
    let with_token = |volume: &str, audience: &str| {
        let mut v = serde_json::to_value(&p.pod).unwrap();
        v["spec"]["volumes"].as_array_mut().unwrap().push(json!({"name": volume, "projected": {"sources": [
            {"serviceAccountToken": {"audience": audience, "expirationSeconds": 3607, "path": "token"}}]}}));
        v["spec"]["containers"][0]["volumeMounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": volume, "mountPath": "/var/run/secrets/tokens"}));
        identity_leaks(&serde_json::from_value(v).unwrap())
    };
    assert_eq!(with_token("custom", "sts.amazonaws.com"), ["container build mounts the token volume custom"]);
    assert_eq!(
        with_token("agent", "pods.eks.amazonaws.com"),
        ["container build mounts the token volume agent"]
    );
    assert!(with_token("istio-token", "istio-ca").is_empty(), "a service mesh's token is no cloud identity");
}

#[test]
fn a_minted_credential_is_the_proxys_alone_and_refreshable() {
    for file in SAMPLES {
        let (_, p) = planned(file);
        let mut pod = p.pod.clone();
        pod.metadata.name = Some("bob-build-abc-1".into());
        use_minted_credential(&mut pod);
        let spec = pod.spec.as_ref().unwrap();
        let volume = spec.volumes.iter().flatten().find(|v| v.name == "registry-auth").expect("the volume");
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("bob-build-abc-1-registry"), "{file}");
        for c in containers(&pod) {
            let mine =
                c.volume_mounts.iter().flatten().filter(|m| m.name == "registry-auth").collect::<Vec<_>>();
            assert_eq!(!mine.is_empty(), c.name == "proxy", "{file}: {} mounts it", c.name);
            // No subPath: the kubelet swaps the whole volume when the Secret is refreshed.
            assert!(mine.iter().all(|m| m.sub_path.is_none() && m.read_only == Some(true)), "{file}");
            let auth_file = env(c).get("BOB_AUTH_FILE").cloned();
            assert_eq!(auth_file.is_some(), c.name == "proxy", "{file}: {}", c.name);
        }
    }
}

fn settings() -> Settings {
    Settings {
        plan: PlanConfig::default(),
        policy: Policy::default(),
        queue_timeout: std::time::Duration::from_secs(1800),
        max_concurrent_builds: None,
    }
}

fn ecr_build() -> ImageBuild {
    let v: Value = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
        "metadata": {"name": "ws", "namespace": "team", "uid": "u-1", "generation": 1},
        "spec": {"source": {"image": {"ref": "123456789012.dkr.ecr.us-east-1.amazonaws.com/lib/app:1"}},
                 "workspaceImageRepository": "123456789012.dkr.ecr.us-east-1.amazonaws.com/ws"}});
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_minted_build_creates_its_pod_with_the_credential_and_fails_on_an_identity() {
    let b = ecr_build();
    let mut o = Observed::at("2026-11-30T12:00:00Z".parse().unwrap());
    o.credentials = Some(Ok(Access::Minted));
    o.resolved = Some(Ok(Resolved { image_digest: Some(DIGEST.into()), ..Default::default() }));
    o.cache = Some(Ok(None));
    let Step::Observe(Need::Create(pod)) = decide(&b, &o, &settings()) else { panic!("create") };
    let name = pod.metadata.name.clone().unwrap();
    let volumes: BTreeMap<String, Option<String>> = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), v.secret.as_ref().and_then(|s| s.secret_name.clone())))
        .collect();
    assert_eq!(volumes["registry-auth"], Some(format!("{name}-registry")));

    o.created = Some(Created::Unsafe { leaks: vec!["container build has AWS_ROLE_ARN".into()] });
    let Step::Act(t) = decide(&b, &o, &settings()) else { panic!("a transition") };
    let s = t.status.unwrap();
    assert_eq!((s.phase, s.reason), (Some(Phase::Failed), Some(Reason::PodRejected)));
    let message = s.message.unwrap();
    assert!(
        message.contains("container build has AWS_ROLE_ARN") && message.contains("serviceAccountName"),
        "{message}"
    );
    assert!(s.pod_name.is_none(), "the deleted pod is not followed");
}
