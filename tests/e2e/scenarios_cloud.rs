//! ECR through the controller's cloud identity: moto plays IRSA's web identity, STS, IAM (with
//! enforcement on) and ECR; a real `docker-registry` serves the ECR host name (through the
//! `test-hooks` hook) and accepts only the token moto mints. A mapped namespace builds with no
//! Secret; the pod's own Secret holds only that registry's credential and names exactly the
//! build's repositories (the session policy itself is unit-tested: moto ignores session
//! policies), only the proxy mounts it, it is minted again when due and gone when the build ends;
//! an unmapped namespace, a refused role, a missing repository and a namespace without a
//! NetworkPolicy each get their reason; a Secret forged in an unmapped namespace to look like
//! bob's gets no credential and is deleted, and so do Secrets of pods forged in the mapped
//! namespace (under a new name, or under the recorded build pod's name after it is gone): the
//! refresher feeds only the pod an ImageBuild's status records by name and UID.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::apiserver::Target;
use super::builds::poll;
use super::common::build::busybox_image;
use super::common::moto::Moto;
use super::common::{Direct, Registry, RegistryAuth, docker_config};
use super::scenario::{Options, Scenario};
use super::scenarios::BUILD;

crate::scenarios!(ecr_builds_with_a_minted_credential_and_every_refusal_has_its_reason);

const ACCOUNT: &str = "123456789012";
const ECR: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
/// The label by which the mapping selects namespaces (the build namespace's name is made up at
/// start, so entries select by label).
const LABEL: &str = "bob-e2e/ecr";

fn statement(actions: &[&str]) -> Value {
    json!(actions)
}

async fn ecr_builds_with_a_minted_credential_and_every_refusal_has_its_reason(t: Target) -> Scenario {
    // ECR host names reach the loopback registry only through the test hook.
    if !cfg!(feature = "test-hooks") {
        panic!(
            "this test needs the test hook: run it with `cargo test --features test-hooks` (as scripts/test does)"
        );
    }
    assert!(
        t.is_kube_sim(),
        "the ECR scenario needs kube-sim (a cluster's pods cannot reach this machine's loopback)"
    );
    let moto = Moto::start(&json!({
        "account": ACCOUNT,
        "region": "us-east-1",
        "repositories": ["ecr-e2e/busybox", "ecr-e2e/base", "ecr-e2e/workspace"],
        "roles": [
            {"name": "controller", "trust": "web-identity", "actions": statement(&["sts:AssumeRole"]), "resources": "*"},
            {"name": "builder", "trust": "account", "resources": "*", "actions": statement(&[
                "ecr:GetAuthorizationToken", "ecr:DescribeRepositories", "ecr:BatchGetImage",
                "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability", "ecr:PutImage",
                "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload"])},
            {"name": "denied", "trust": "account", "resources": "*", "actions": statement(&["ecr:DescribeRepositories"])},
        ],
    }));
    let password = Moto::ecr_password(ACCOUNT);
    let ecr = Registry::start(RegistryAuth::Basic { user: "AWS", password: &password });
    let creds = docker_config(&ecr.host, "AWS", &password);
    let image = busybox_image();
    Direct::new(&ecr.host, Some(&creds)).push_image("ecr-e2e/busybox", "1", &image).await;

    let entry = |name: &str, selects: &str, role: &str| {
        json!({"name": name, "namespaceSelector": {"matchLabels": {LABEL: selects}}, "registry": ECR,
               "pull": ["ecr-e2e/busybox"], "push": ["ecr-e2e"], "roleArn": moto.roles[role]})
    };
    let mut env = moto.irsa_env("controller");
    env.push(("BOB_TEST_ECR_REGISTRY".into(), ecr.host.clone()));
    env.push(("BOB_CLOUD_REFRESH_INTERVAL".into(), "1s".into()));
    let opts = Options {
        secret: false,
        labels: vec![(LABEL, "builds")],
        values: json!({
            "cloudIdentity": {"region": "us-east-1", "sessionDuration": "15m",
                              "registries": [entry("builds", "builds", "builder"), entry("refused", "refused", "denied")]},
            "networkPolicy": {"enabled": true, "buildNamespaces": ["$NS"]},
        }),
        controller_env: env,
        ..Options::default()
    };
    let s = Scenario::start(&t, "ecr_minted_credentials", opts).await;

    // A build with no Secret, from and to ECR. Its RUN step lasts long enough to watch the pod.
    let spec = |workspace: &str| {
        json!({
            "source": {"dockerfile": {"inline": format!("FROM {ECR}/ecr-e2e/busybox:1\nRUN sleep 12 && echo ok > /ok\n")}},
            "baseImageRepository": format!("{ECR}/ecr-e2e/base"),
            "workspaceImageRepository": format!("{ECR}/{workspace}"),
        })
    };
    s.create(&[("app", spec("ecr-e2e/workspace"))]).await;
    let building = s.wait("app", "building", BUILD, |v| v["status"]["podName"].is_string()).await;
    let pod_name = building["status"]["podName"].as_str().unwrap().to_string();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let secret_name = format!("{pod_name}-registry");
    let minted = poll("the minted Secret of the build pod", Duration::from_secs(60), || async {
        secrets.get_opt(&secret_name).await.unwrap()
    })
    .await;
    let pod: Pod = Api::namespaced(s.client.clone(), &s.ns).get(&pod_name).await.unwrap();
    assert_minted_secret(&minted, &pod, &password);
    assert_only_the_proxy_holds_it(&pod, &secret_name);

    // Due for refresh (as if half its life had passed): the controller mints it again.
    let past = "2000-01-01T00:00:00Z";
    s.kubectl
        .ok(
            &[
                "annotate",
                "secret",
                &secret_name,
                "-n",
                &s.ns,
                "--overwrite",
                &format!("bob.dev/refresh-at={past}"),
            ],
            None,
        )
        .await;
    let expired_before = minted.metadata.annotations.as_ref().unwrap()["bob.dev/expires-at"].clone();
    let refreshed = poll("the credential minted again", Duration::from_secs(60), || async {
        let now = secrets.get_opt(&secret_name).await.unwrap()?;
        let at = now.metadata.annotations.as_ref()?.get("bob.dev/refresh-at")?.clone();
        (at != past).then_some(now)
    })
    .await;
    assert_minted_secret(&refreshed, &pod, &password);
    // A new session, not the old Secret put back (moto's password is the same every time).
    let expires_now = &refreshed.metadata.annotations.as_ref().unwrap()["bob.dev/expires-at"];
    assert!(expires_now > &expired_before, "{expired_before} then {expires_now}");

    let st = s.finished("app", BUILD).await;
    assert_eq!((st["phase"].as_str(), st["reason"].as_str()), (Some("Succeeded"), Some("Built")), "{st:#}");
    let output = st["output"]["ref"].as_str().unwrap();
    let (_, path) = output.split_once('/').unwrap();
    let (repo, tag) = path.rsplit_once(':').unwrap();
    let digest = Direct::new(&ecr.host, Some(&creds)).manifest_digest(repo, tag).await;
    assert_eq!(st["output"]["digest"].as_str(), digest.as_deref(), "the registry's digest: {st:#}");
    // The credential goes with its pod; no other Secret was ever needed.
    poll("the minted Secret gone after the build", Duration::from_secs(60), || async {
        secrets.get_opt(&secret_name).await.unwrap().is_none().then_some(())
    })
    .await;
    let left = secrets.list(&ListParams::default()).await.unwrap().items;
    assert!(
        left.is_empty(),
        "Secrets left in {}: {:?}",
        s.ns,
        left.iter().map(|x| x.metadata.name.clone()).collect::<Vec<_>>()
    );

    // A repository the build pushes to that does not exist: its reason, and how to create it.
    s.create(&[("missing", spec("ecr-e2e/nowhere"))]).await;
    let st = s.reaches("missing", "Pending", "RepositoryNotFound", BUILD).await;
    let message = st["message"].as_str().unwrap();
    assert!(message.contains("ecr-e2e/nowhere") && message.contains("create-repository"), "{message}");

    // Other namespaces: unmapped, mapped to a role AWS refuses, mapped without a NetworkPolicy.
    let policy =
        s.release.docs.iter().find(|d| d["kind"] == "NetworkPolicy").expect("the chart's policy").clone();
    for (suffix, label, with_policy, reason, says) in [
        ("unmapped", None, true, "RegistryNotMapped", "no entry maps namespace"),
        ("refused", Some("refused"), true, "AccessDenied", "refused"),
        ("open", Some("builds"), false, "NetworkPolicyMissing", "metadata endpoints"),
    ] {
        let ns = format!("{}-{suffix}", s.ns);
        s.kubectl.ok(&["create", "namespace", &ns], None).await;
        if let Some(l) = label {
            s.kubectl.ok(&["label", "namespace", &ns, &format!("{LABEL}={l}")], None).await;
        }
        if with_policy {
            let mut p = policy.clone();
            p["metadata"]["namespace"] = json!(ns);
            s.kubectl.ok(&["apply", "-f", "-"], Some(&p.to_string())).await;
        }
        let ib = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
                        "metadata": {"name": "app", "namespace": ns}, "spec": spec("ecr-e2e/workspace")});
        s.kubectl.ok(&["apply", "-f", "-"], Some(&ib.to_string())).await;
        let st = s.reaches_in(&ns, "app", "Pending", reason, BUILD).await;
        let message = st["message"].as_str().unwrap();
        assert!(message.contains(says), "{ns}: {message}");
        assert!(
            !message.contains("role/controller"),
            "{ns}: the controller's identity is not named: {message}"
        );
        // Nothing starts there.
        let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
        assert!(pods.list(&ListParams::default()).await.unwrap().items.is_empty(), "{ns}: a pod started");
    }

    // A user of the unmapped namespace dresses a pod and a Secret as bob's and asks the refresher
    // for a push credential with the builder role: the mapping decides, and the Secret goes.
    let ns = format!("{}-unmapped", s.ns);
    let evil = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "evil", "namespace": ns,
                     "labels": {"app.kubernetes.io/managed-by": "bob", "app.kubernetes.io/component": "build"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "300"]}]}});
    s.kubectl.ok(&["apply", "-f", "-"], Some(&evil.to_string())).await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let uid = pods.get("evil").await.unwrap().metadata.uid.unwrap();
    let grants = json!([{"entry": "builds", "host": ECR, "roleArn": moto.roles["builder"],
                         "repositories": [{"host": ECR, "repository": "ecr-e2e/workspace", "push": true}]}]);
    let forged = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "evil-registry", "namespace": ns,
                     "labels": {"app.kubernetes.io/managed-by": "bob", "bob.dev/credential": "registry"},
                     "annotations": {"bob.dev/grants": grants.to_string(), "bob.dev/refresh-at": past},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "evil", "uid": uid}]},
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode("{}")}});
    s.kubectl.ok(&["apply", "-f", "-"], Some(&forged.to_string())).await;
    let forged_api: Api<Secret> = Api::namespaced(s.client.clone(), &ns);
    poll("the forged Secret deleted", Duration::from_secs(60), || async {
        match forged_api.get_opt("evil-registry").await.unwrap() {
            None => Some(()),
            Some(x) => {
                let config = String::from_utf8(x.data.unwrap()[".dockerconfigjson"].0.clone()).unwrap();
                assert_eq!(config, "{}", "the forged Secret got a credential");
                None
            }
        }
    })
    .await;

    // A user of the mapped namespace (who may create pods and Secrets there) dresses pods and
    // Secrets as bob's: one under the name of the build pod the status of `app` records, now
    // gone (a new UID), claiming `app` as its owner; one under a new name. Both ask for a push
    // credential the mapping allows. Neither is recorded by an ImageBuild's status by name and
    // UID: the refresher mints nothing into their Secrets and deletes them.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    poll("the build pod of app gone", Duration::from_secs(60), || async {
        pods.get_opt(&pod_name).await.unwrap().is_none().then_some(())
    })
    .await;
    let app = s.kubectl.ok(&["get", "imagebuild", "app", "-n", &s.ns, "-o", "json"], None).await;
    let app: Value = serde_json::from_str(&app).unwrap();
    assert_eq!(app["status"]["podName"].as_str(), Some(pod_name.as_str()), "{app:#}");
    let recorded_uid = app["status"]["podUid"].as_str().expect("the status records the pod's UID");
    assert_eq!(Some(recorded_uid), pod.metadata.uid.as_deref(), "the UID of the pod it created");
    let app_owner = json!({"apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild", "name": "app",
                           "uid": app["metadata"]["uid"]});
    for (name, owners) in [(pod_name.clone(), json!([app_owner])), ("evil-mapped".to_string(), json!([]))] {
        let fake = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": s.ns, "ownerReferences": owners,
                         "labels": {"app.kubernetes.io/name": "bob", "app.kubernetes.io/managed-by": "bob",
                                    "app.kubernetes.io/component": "build", "bob.dev/imagebuild": "app"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "300"]}]}});
        s.kubectl.ok(&["apply", "-f", "-"], Some(&fake.to_string())).await;
        let uid = pods.get(&name).await.unwrap().metadata.uid.unwrap();
        assert_ne!(Some(uid.as_str()), pod.metadata.uid.as_deref(), "a new pod under the name");
        let forged = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": format!("{name}-registry"), "namespace": s.ns,
                         "labels": {"app.kubernetes.io/managed-by": "bob", "bob.dev/credential": "registry"},
                         "annotations": {"bob.dev/grants": grants.to_string(), "bob.dev/refresh-at": past},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]},
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode("{}")}});
        s.kubectl.ok(&["apply", "-f", "-"], Some(&forged.to_string())).await;
        let secret_name = format!("{name}-registry");
        poll(&format!("the forged Secret {secret_name} deleted"), Duration::from_secs(60), || async {
            match secrets.get_opt(&secret_name).await.unwrap() {
                None => Some(()),
                Some(x) => {
                    let config = String::from_utf8(x.data.unwrap()[".dockerconfigjson"].0.clone()).unwrap();
                    assert_eq!(config, "{}", "the forged Secret {secret_name} got a credential");
                    None
                }
            }
        })
        .await;
        s.kubectl.ok(&["delete", "pod", &name, "-n", &s.ns, "--wait=false"], None).await;
    }
    let controller_logs: Vec<String> =
        s.controllers.iter().map(|c| std::fs::read_to_string(&c.daemon.log).unwrap()).collect();
    assert!(
        controller_logs.iter().any(|l| l.contains("no ImageBuild records this pod")),
        "the refresher says why it deleted a Secret"
    );

    // No credential in the controller's log, in an Event or in a status.
    let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
    let events = s.kubectl.ok(&["get", "events", "-A", "-o", "json"], None).await;
    let statuses = s.kubectl.ok(&["get", "imagebuilds", "-A", "-o", "json"], None).await;
    let logs: Vec<String> =
        s.controllers.iter().map(|c| std::fs::read_to_string(&c.daemon.log).unwrap()).collect();
    assert!(
        logs.iter().any(|l| l.contains("refreshed a minted registry credential")),
        "the refresh is logged"
    );
    for (what, text) in
        [("events", &events), ("statuses", &statuses)].into_iter().chain(logs.iter().map(|l| ("log", l)))
    {
        assert!(!text.contains(&password) && !text.contains(&token), "a credential in the {what}");
    }
    s
}

/// The minted Secret: a docker config for the ECR host alone with the token moto minted, owned by
/// the pod, annotated with the build's grants and nothing secret.
fn assert_minted_secret(secret: &Secret, pod: &Pod, password: &str) {
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let data = secret.data.as_ref().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), [".dockerconfigjson"]);
    let config: Value = serde_json::from_slice(&data[".dockerconfigjson"].0).unwrap();
    let auths = config["auths"].as_object().unwrap();
    assert_eq!(auths.keys().collect::<Vec<_>>(), [ECR], "only the ECR registry: {auths:?}");
    let auth =
        base64::engine::general_purpose::STANDARD.decode(auths[ECR]["auth"].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8(auth).unwrap(), format!("AWS:{password}"));
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), Some(owner.uid.as_str())), ("Pod", pod.metadata.uid.as_deref()));
    let annotations = secret.metadata.annotations.as_ref().unwrap();
    let grants: Value = serde_json::from_str(&annotations["bob.dev/grants"]).unwrap();
    let repos: Vec<(String, bool)> = grants[0]["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["repository"].as_str().unwrap().to_string(), r["push"].as_bool().unwrap()))
        .collect();
    let want = [("ecr-e2e/base", true), ("ecr-e2e/busybox", false), ("ecr-e2e/workspace", true)];
    assert_eq!(repos, want.map(|(r, p)| (r.to_string(), p)), "exactly the build's repositories");
    assert_eq!(grants[0]["entry"], "builds");
    let refresh: k8s_openapi::jiff::Timestamp = annotations["bob.dev/refresh-at"].parse().unwrap();
    let expires: k8s_openapi::jiff::Timestamp = annotations["bob.dev/expires-at"].parse().unwrap();
    assert!(refresh > k8s_openapi::jiff::Timestamp::now() && refresh < expires, "{annotations:?}");
}

/// Only the proxy mounts the Secret; no container has an AWS variable or a token volume.
fn assert_only_the_proxy_holds_it(pod: &Pod, secret: &str) {
    let spec = pod.spec.as_ref().unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret));
    let volume = volume.expect("the pod mounts its minted Secret").name.clone();
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        let mounts = c.volume_mounts.iter().flatten().any(|m| m.name == volume);
        assert_eq!(mounts, c.name == "proxy", "{} mounts the credential", c.name);
        let aws: Vec<&String> =
            c.env.iter().flatten().map(|e| &e.name).filter(|n| n.starts_with("AWS_")).collect();
        assert!(aws.is_empty(), "{} has {aws:?}", c.name);
    }
    assert!(bob::cloud::guard::identity_leaks(pod).is_empty());
}
