//! The build pod and cloud identities (pure, no cluster): every container is named in the EKS
//! webhooks' skip annotation; a pod that a webhook mutated anyway (as the IRSA and Pod Identity
//! webhooks mutate pods) is caught, whatever the container and the route (variables, `envFrom`,
//! a token, a mounted AWS credentials file or whole Secret), and a service mesh's token is not; a
//! minted credential is mounted by the proxy alone, as a whole Secret volume the kubelet
//! refreshes; a decision that meets such a pod fails the ImageBuild with a message saying what to
//! change; and the refresher feeds only a pod an ImageBuild's status records by name and UID.

mod common;

use std::collections::BTreeMap;

use bob::cloud::guard::{SKIP_CONTAINERS, identity_leaks};
use bob::controller::cloud::{recorded, refreshable};
use bob::controller::decide::{Access, Created, Effect, Need, Observed, Settings, Step};
use bob::controller::pod::use_minted_credential;
use bob::controller::{PlanConfig, Policy, Resolved};
use bob::crd::{ImageBuild, Phase};
use bob::reason::Reason;
use common::fake_api::decide;
use common::samples::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
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
    let Step::Observe(Need::Pod(_)) = decide(&b, &o, &settings()) else { panic!("looks for the pod first") };
    o.pod = Some(None);
    let Step::Attempt(pod) = decide(&b, &o, &settings()) else { panic!("create") };
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

    // A webhook gave the build container an IAM role at admission.
    let stored = mutated(&pod, |v| {
        v["metadata"]["uid"] = json!("pod-uid-9");
        let build = v["spec"]["containers"].as_array_mut().unwrap().iter_mut().find(|c| c["name"] == "build");
        let env = build.unwrap()["env"].as_array_mut().unwrap();
        env.push(json!({"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::1:role/x"}));
    });
    o.created = Some(Created::New(Box::new(stored)));
    let Step::Act(t) = decide(&b, &o, &settings()) else { panic!("a transition") };
    assert_eq!(
        t.effects.first(),
        Some(&Effect::DeletePod { pod: name.clone(), uid: "pod-uid-9".into() }),
        "the unsafe pod is deleted (by its UID) before the status is written"
    );
    let s = t.status.unwrap();
    assert_eq!((s.phase, s.reason), (Some(Phase::Failed), Some(Reason::PodRejected)));
    let message = s.message.unwrap();
    assert!(message.contains("AWS_ROLE_ARN") && message.contains("serviceAccountName"), "{message}");
    assert!(s.pod_name.is_none(), "the deleted pod is not followed");
}

/// `pod` with `f` applied to its JSON (as an admission webhook edits it).
fn mutated(pod: &Pod, f: impl FnOnce(&mut Value)) -> Pod {
    let mut v = serde_json::to_value(pod).unwrap();
    f(&mut v);
    serde_json::from_value(v).unwrap()
}

/// The planned pod of `file`, with the minted credential as the controller creates it.
fn bob_pod(file: &str) -> Pod {
    let (_, p) = planned(file);
    let mut pod = p.pod.clone();
    pod.metadata.name = Some("bob-build-abc-1".into());
    use_minted_credential(&mut pod);
    pod
}

/// Adds volume `volume` to the pod and mounts it in the container `build` at `at`.
fn mount_in_build(v: &mut Value, volume: Value, at: &str) {
    let name = volume["name"].clone();
    v["spec"]["volumes"].as_array_mut().unwrap().push(volume);
    let build = v["spec"]["containers"].as_array_mut().unwrap().iter_mut().find(|c| c["name"] == "build");
    build.unwrap()["volumeMounts"].as_array_mut().unwrap().push(json!({"name": name, "mountPath": at}));
}

#[test]
fn the_aws_config_and_shared_credentials_file_variables_are_identities() {
    let pod = bob_pod("inline-dockerfile.yaml");
    for (name, value) in
        [("AWS_CONFIG_FILE", "/etc/aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "/etc/aws/credentials")]
    {
        let leaks = identity_leaks(&mutated(&pod, |v| {
            let init = v["spec"]["initContainers"].as_array_mut().unwrap();
            let proxy = init.iter_mut().find(|c| c["name"] == "proxy").unwrap();
            proxy["env"].as_array_mut().unwrap().push(json!({"name": name, "value": value}));
        }));
        assert_eq!(leaks, [format!("container proxy has {name}")]);
    }
}

#[test]
fn any_env_from_is_an_identity_whatever_it_reads() {
    // envFrom is refused unread (bob's containers never use it): a Secret's or a ConfigMap's
    // keys may be AWS_* now or after the check, and the controller may not read ConfigMaps.
    let pod = bob_pod("git-dockerfile.yaml");
    let leaks = identity_leaks(&mutated(&pod, |v| {
        let clone =
            v["spec"]["initContainers"].as_array_mut().unwrap().iter_mut().find(|c| c["name"] == "clone");
        clone.unwrap()["envFrom"] = json!([{"secretRef": {"name": "aws-keys"}}]);
        let build = v["spec"]["containers"].as_array_mut().unwrap().iter_mut().find(|c| c["name"] == "build");
        build.unwrap()["envFrom"] =
            json!([{"configMapRef": {"name": "team-env", "optional": true}, "prefix": "X_"}]);
    }));
    assert_eq!(
        leaks,
        [
            "container clone takes variables from Secret aws-keys (envFrom)",
            "container build takes variables from ConfigMap team-env (envFrom)",
        ]
    );
}

#[test]
fn a_mounted_aws_credentials_file_or_a_whole_secret_is_an_identity() {
    let pod = bob_pod("inline-dockerfile.yaml");
    let cases = [
        (
            json!({"name": "keys", "secret": {"secretName": "aws", "items": [{"key": "aws_access_key_id", "path": "id"}]}}),
            "/etc/keys",
            vec!["container build mounts volume keys with key aws_access_key_id of Secret aws"],
        ),
        (
            json!({"name": "shared", "secret": {"secretName": "aws", "items": [{"key": "creds", "path": "aws/credentials"}]}}),
            "/etc/shared",
            vec!["container build mounts volume shared with key creds of Secret aws"],
        ),
        (
            json!({"name": "whole", "secret": {"secretName": "team-secrets"}}),
            "/etc/team",
            vec!["container build mounts volume whole with the whole Secret team-secrets"],
        ),
        (
            json!({"name": "cfg", "configMap": {"name": "aws-profile", "items": [{"key": "config", "path": "config"}]}}),
            "/etc/cfg",
            vec!["container build mounts volume cfg with key config of ConfigMap aws-profile"],
        ),
        (
            json!({"name": "bundle", "projected": {"sources": [
                {"configMap": {"name": "ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"secret": {"name": "aws", "items": [{"key": "AWS_SECRET_ACCESS_KEY", "path": "secret"}]}}]}}),
            "/etc/bundle",
            vec!["container build mounts volume bundle with key AWS_SECRET_ACCESS_KEY of Secret aws"],
        ),
        (
            json!({"name": "projected-whole", "projected": {"sources": [{"secret": {"name": "team-secrets"}}]}}),
            "/etc/projected",
            vec!["container build mounts volume projected-whole with the whole Secret team-secrets"],
        ),
        (
            // Where the SDKs look by default, whatever the volume holds.
            json!({"name": "home-aws", "emptyDir": {}}),
            "/root/.aws",
            vec!["container build mounts volume home-aws at /root/.aws, where AWS SDKs look for credentials"],
        ),
    ];
    for (volume, at, want) in cases {
        let leaks = identity_leaks(&mutated(&pod, |v| mount_in_build(v, volume.clone(), at)));
        assert_eq!(leaks, want, "{volume}");
    }
    // A volume no container mounts gives nobody anything.
    let unmounted = mutated(&pod, |v| {
        v["spec"]["volumes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "whole", "secret": {"secretName": "x"}}))
    });
    assert!(identity_leaks(&unmounted).is_empty());
}

#[test]
fn an_ephemeral_container_is_checked_like_any_other() {
    // `kubectl debug` adds one to the running pod, which the refresher checks as it is now.
    let pod = bob_pod("inline-dockerfile.yaml");
    let debugged = mutated(&pod, |v| {
        v["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox",
            "env": [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIA"}],
            "envFrom": [{"secretRef": {"name": "aws-keys"}}]}]);
    });
    assert_eq!(
        identity_leaks(&debugged),
        [
            "container debugger has AWS_ACCESS_KEY_ID",
            "container debugger takes variables from Secret aws-keys (envFrom)",
        ]
    );
}

#[test]
fn bob_pods_and_a_mesh_injected_pod_have_no_identity() {
    for file in SAMPLES {
        let (_, p) = planned(file);
        assert_eq!(identity_leaks(&p.pod), Vec::<String>::new(), "{file}: with the spec's Secret");
        assert_eq!(identity_leaks(&bob_pod(file)), Vec::<String>::new(), "{file}: with a minted credential");
    }
    // What Istio's sidecar injector adds (its token has Istio's audience, its CA bundle is a whole
    // ConfigMap), and the API server's projected ServiceAccount token volume.
    let meshed = mutated(&bob_pod("inline-dockerfile.yaml"), |v| {
        let volumes = v["spec"]["volumes"].as_array_mut().unwrap();
        volumes.extend([
            json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
            json!({"name": "istio-data", "emptyDir": {}}),
            json!({"name": "istio-podinfo", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels"}}]}}),
            json!({"name": "istio-token", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}}),
            json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}),
            json!({"name": "kube-api-access-x1y2z", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}),
        ]);
        let mounts = json!([
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
            {"name": "istio-data", "mountPath": "/var/lib/istio/data"},
            {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istio-podinfo", "mountPath": "/etc/istio/pod"},
            {"name": "kube-api-access-x1y2z", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
        ]);
        v["spec"]["initContainers"].as_array_mut().unwrap().push(json!({
            "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0", "restartPolicy": "Always",
            "env": [{"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
            "volumeMounts": mounts}));
    });
    assert_eq!(identity_leaks(&meshed), Vec::<String>::new());
}

/// A build pod `name` with UID `uid` in namespace `team`, labelled as bob labels its build pods.
fn build_pod(name: &str, uid: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "team", "uid": uid,
        "labels": {"app.kubernetes.io/name": "bob", "app.kubernetes.io/managed-by": "bob",
                   "app.kubernetes.io/component": "build", "bob.dev/imagebuild": "ws"}},
        "spec": {"containers": [{"name": "build", "image": "bob", "env": [], "volumeMounts": []}], "volumes": []}}))
    .unwrap()
}

/// An ImageBuild `name` in `ns` whose status records `pod` (and its UID, when given).
fn recording(name: &str, ns: &str, pod: &str, uid: Option<&str>) -> ImageBuild {
    let mut status = json!({"phase": "Building", "podName": pod});
    if let Some(uid) = uid {
        status["podUid"] = json!(uid);
    }
    serde_json::from_value(json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
        "metadata": {"name": name, "namespace": ns, "uid": format!("ib-{name}")},
        "spec": {"source": {"image": {"ref": "reg.test/app:1"}}, "workspaceImageRepository": "reg.test/ws"},
        "status": status}))
    .unwrap()
}

#[test]
fn only_a_pod_a_status_records_by_name_and_uid_is_refreshed() {
    let pod = build_pod("bob-build-abc-1", "uid-1");
    let mine = recording("ws", "team", "bob-build-abc-1", Some("uid-1"));
    assert!(recorded(&pod, std::slice::from_ref(&mine)));
    // The same name with another UID (deleted and made again), no UID (an older status), no
    // status, another namespace, another name: not recorded.
    let not_mine = [
        recording("ws", "team", "bob-build-abc-1", Some("uid-0")),
        recording("ws", "team", "bob-build-abc-1", None),
        recording("ws", "other", "bob-build-abc-1", Some("uid-1")),
        recording("ws", "team", "bob-build-abc-2", Some("uid-1")),
    ];
    assert!(!recorded(&pod, &not_mine));
    let mut no_status = mine.clone();
    no_status.status = None;
    assert!(!recorded(&pod, &[no_status]));
    assert!(!recorded(&pod, &[]));
    // A pod without a UID matches nothing (not even a status without one).
    let mut no_uid = pod.clone();
    no_uid.metadata.uid = None;
    assert!(!recorded(&no_uid, &[recording("ws", "team", "bob-build-abc-1", None)]));
    // ImageBuilds of one key share the pod: any one of them recording it will do.
    let shared = [
        recording("a", "team", "bob-build-abc-2", Some("uid-2")),
        recording("b", "team", "bob-build-abc-1", Some("uid-1")),
    ];
    assert!(recorded(&pod, &shared));

    // Recorded, and the guards of its creation must still hold.
    let policy: NetworkPolicy = serde_json::from_value(json!({"metadata": {"name": "bob-build-pods"},
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "bob", "app.kubernetes.io/component": "build"}},
                 "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}]}]}}))
    .unwrap();
    let policies = std::slice::from_ref(&policy);
    assert_eq!(refreshable(&pod, std::slice::from_ref(&mine), policies), Ok(()));
    let why = refreshable(&pod, &not_mine, policies).unwrap_err();
    assert!(why.contains("no ImageBuild records this pod"), "{why}");
    let why = refreshable(&pod, std::slice::from_ref(&mine), &[]).unwrap_err();
    assert!(why.contains("no NetworkPolicy"), "{why}");
    let given = irsa_webhook(&pod, false);
    let why = refreshable(&given, std::slice::from_ref(&mine), policies).unwrap_err();
    assert!(why.contains("container build has AWS_ROLE_ARN"), "{why}");
}
