//! The plan on the samples in `config/samples/` (pure, no cluster): refs and key, containers and
//! their env, where each Secret is mounted (and where not), probes, labels, annotations, owner,
//! and invalid specs rejected with `InvalidSpec` naming the field.

mod common;

use bob::controller::{Invalid, PlanConfig, Resolved, plan};
use bob::crd::ImageBuild;
use bob::key;
use common::samples::*;
use k8s_openapi::api::core::v1::Pod;

/// Asserts the registry Secret is mounted by the proxy only, and git credentials reach only `clone`.
fn secrets_stay_in_their_container(pod: &Pod) {
    for c in containers(pod) {
        assert_eq!(mounts(c).contains(&"registry-auth".to_string()), c.name == "proxy", "{}", c.name);
        let secret_env =
            c.env.iter().flatten().any(|e| e.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some()));
        assert!(!secret_env || c.name == "clone", "{} reads a Secret", c.name);
    }
    assert_eq!(pod.spec.as_ref().unwrap().automount_service_account_token, Some(false));
}

#[test]
fn image_source_uses_the_resolved_digest_and_a_read_only_base() {
    let (ib, p) = planned("image-source.yaml");
    assert_eq!(p.key, None);
    assert_eq!(p.base_ref, format!("registry.example.com/library/busybox@{DIGEST}"));
    assert_eq!(p.workspace_ref, key::workspace_ref("registry.example.com/workspaces/images", &p.base_ref));
    let names: Vec<&str> = containers(&p.pod).iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["proxy", "build"], "no clone for an image source");
    let proxy = env(container(&p.pod, "proxy"));
    assert_eq!(proxy["BOB_PROXY_BASE_READ_ONLY"], "true");
    assert_eq!(proxy["BOB_PROXY_BASE_REF"], p.base_ref);
    assert_eq!(proxy["BOB_AUTH_FILE"], "/var/run/secrets/bob/registry/config.json");
    let build = env(container(&p.pod, "build"));
    assert_eq!(build["BOB_BUILD_BASE"], "false");
    assert_eq!(build["BOB_BASE_REF"], format!("127.0.0.1:8080/base@{DIGEST}"));
    assert!(!build.contains_key("BOB_AUTH_FILE") && !build.contains_key("BOB_AUTH"));
    secrets_stay_in_their_container(&p.pod);
    let owner = &p.pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ImageBuild", "from-image", Some(true))
    );
    assert_eq!(owner.uid, ib.metadata.uid.unwrap());
}

#[test]
fn proxy_is_a_native_sidecar_with_an_exec_startup_probe() {
    let (_, p) = planned("image-source.yaml");
    let proxy = container(&p.pod, "proxy");
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "native sidecar");
    let probe = proxy.startup_probe.as_ref().unwrap().exec.as_ref().unwrap();
    assert_eq!(probe.command.as_deref().unwrap(), ["bob", "proxy", "--check"]);
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(env(proxy)["BOB_PROXY_ADDR"], "127.0.0.1:8080");
}

#[test]
fn inline_dockerfile_is_keyed_pinned_and_projected_from_an_annotation() {
    let (ib, p) = planned("inline-dockerfile.yaml");
    let key = p.key.clone().unwrap();
    let mut inputs =
        key::BuildInputs::inline(ib.spec.source.dockerfile.as_ref().unwrap().inline.clone().unwrap());
    inputs.build_args.insert("GREETING".into(), "hi".into());
    inputs.from_digests.insert("registry.example.com/library/busybox:1.36".into(), DIGEST.into());
    assert_eq!(key, inputs.key().unwrap(), "the key is the documented function of the inputs");
    assert_eq!(p.base_ref, format!("registry.example.com/workspaces/base:{key}"));
    let pin = format!("registry.example.com/library/busybox:1.36@{DIGEST}");
    assert_eq!(p.from_refs, std::slice::from_ref(&pin));
    assert_eq!(env(container(&p.pod, "proxy"))["BOB_PROXY_MIRROR_REFS"], pin);
    let build = env(container(&p.pod, "build"));
    assert_eq!(build["BOB_FROM_REFS"], pin);
    assert_eq!(build["BOB_BUILD_BASE"], "true");
    assert_eq!(build["BOB_BUILD_ARGS"], r#"{"GREETING":"hi"}"#);
    assert_eq!(build["BOB_DOCKERFILE_PATH"], "/bob/dockerfile/Dockerfile");
    assert_eq!(build["BOB_BASE_REF"], format!("127.0.0.1:8080/base:{key}"));
    let meta = &p.pod.metadata;
    let annotations = meta.annotations.as_ref().unwrap();
    assert_eq!(
        annotations["bob.dev/dockerfile"],
        ib.spec.source.dockerfile.as_ref().unwrap().inline.clone().unwrap()
    );
    assert_eq!(annotations["bob.dev/key"], key);
    let labels = meta.labels.as_ref().unwrap();
    assert_eq!(labels["bob.dev/key"], key[..32]);
    assert_eq!(labels["bob.dev/imagebuild"], "inline-dockerfile");
    let spec = p.pod.spec.as_ref().unwrap();
    assert_eq!(spec.active_deadline_seconds, Some(45 * 60));
    assert_eq!(spec.host_users, Some(false), "the builder's root is a user-namespace root");
    assert!(spec.node_selector.is_none() && spec.tolerations.is_none(), "the sample places nothing");
    let limits = container(&p.pod, "build").resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "4Gi");
    secrets_stay_in_their_container(&p.pod);
}

#[test]
fn git_source_clones_the_resolved_commit_with_credentials_only_in_the_clone_container() {
    let (_, p) = planned("git-dockerfile.yaml");
    let names: Vec<&str> = containers(&p.pod).iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["clone", "proxy", "build"], "the clone runs before the proxy and the build");
    let clone = container(&p.pod, "clone");
    assert_eq!(env(clone)["BOB_GIT_COMMIT"], COMMIT);
    let secret_refs: Vec<(String, String)> = clone
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            e.value_from.as_ref()?.secret_key_ref.as_ref().map(|s| (e.name.clone(), s.name.clone()))
        })
        .collect();
    assert_eq!(
        secret_refs,
        [
            ("GIT_USERNAME".into(), "git-credentials".into()),
            ("GIT_PASSWORD".into(), "git-credentials".into())
        ]
    );
    let build = env(container(&p.pod, "build"));
    assert_eq!(build["BOB_DOCKERFILE_PATH"], "/workspace/.gitpod/Dockerfile");
    assert_eq!(build["BOB_CONTEXT_DIR"], "/workspace/.");
    assert_eq!(build["BOB_BUILD_TARGET"], "dev");
    let pin = format!("registry.example.com/library/golang:1.22@{DIGEST}");
    assert_eq!(build["BOB_FROM_REFS"], pin, "the git Dockerfile's FROM is pinned like an inline one");
    assert_eq!(env(container(&p.pod, "proxy"))["BOB_PROXY_MIRROR_REFS"], pin);
    secrets_stay_in_their_container(&p.pod);
    // The key follows the commit.
    let ib = sample("git-dockerfile.yaml");
    let mut other = resolved_for(&ib);
    other.git_commit = Some("f".repeat(40));
    assert_ne!(plan(&ib, &other, &PlanConfig::default()).unwrap().key, p.key);
}

#[test]
fn labels_fit_63_characters_for_long_names() {
    let mut ib = sample("inline-dockerfile.yaml");
    ib.metadata.name = Some("a".repeat(120));
    let p = plan(&ib, &resolved_for(&ib), &PlanConfig::default()).unwrap();
    for (k, v) in p.pod.metadata.labels.as_ref().unwrap() {
        assert!(v.len() <= 63, "label {k} is {} characters", v.len());
    }
    assert!(p.pod.metadata.name.as_ref().unwrap().len() <= 63);
}

fn invalid(ib: &ImageBuild, resolved: &Resolved) -> Invalid {
    let e = plan(ib, resolved, &PlanConfig::default()).unwrap_err();
    assert_eq!(e.reason(), bob::reason::Reason::InvalidSpec);
    e
}

#[test]
fn invalid_specs_name_the_field() {
    let ib = sample("inline-dockerfile.yaml");
    assert_eq!(invalid(&ib, &Resolved::default()).field, "spec.source.dockerfile", "unresolved FROM");

    let mut bad = ib.clone();
    bad.spec.source.dockerfile.as_mut().unwrap().inline = Some("RUN echo no from\n".into());
    let e = invalid(&bad, &resolved_for(&ib));
    assert!(e.field == "spec.source.dockerfile.inline" && e.message.contains("before the first FROM"), "{e}");

    let mut bad = ib.clone();
    bad.spec.workspace_image_repository = "registry.example.com/ws:latest".into();
    assert_eq!(invalid(&bad, &resolved_for(&ib)).field, "spec.workspaceImageRepository");

    let mut bad = ib.clone();
    bad.spec.base_image_repository = None;
    assert_eq!(invalid(&bad, &resolved_for(&ib)).field, "spec.baseImageRepository");

    let mut bad = ib.clone();
    bad.spec.timeouts.as_mut().unwrap().build = Some("soon".into());
    assert_eq!(invalid(&bad, &resolved_for(&ib)).field, "spec.timeouts.build");

    let git = sample("git-dockerfile.yaml");
    assert_eq!(invalid(&git, &Resolved::default()).field, "spec.source.dockerfile.git.revision");
    let unread = Resolved { git_commit: Some(COMMIT.into()), ..Default::default() };
    assert_eq!(invalid(&git, &unread).field, "spec.source.dockerfile.git.dockerfilePath");
    let image = sample("image-source.yaml");
    assert_eq!(invalid(&image, &Resolved::default()).field, "spec.source.image.ref");
}

/// What the Pod Security `restricted` level (Kubernetes 1.33) refuses in a pod, one line each.
fn restricted_violations(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().unwrap();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    let mut out = Vec::new();
    if spec.host_network == Some(true) || spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        out.push("host namespaces".into());
    }
    for v in spec.volumes.iter().flatten() {
        let allowed = v.config_map.is_some()
            || v.csi.is_some()
            || v.downward_api.is_some()
            || v.empty_dir.is_some()
            || v.ephemeral.is_some()
            || v.persistent_volume_claim.is_some()
            || v.projected.is_some()
            || v.secret.is_some();
        if !allowed {
            out.push(format!("volume {} has a restricted type", v.name));
        }
    }
    for c in containers(pod) {
        let sc = c.security_context.clone().unwrap_or_default();
        let n = &c.name;
        if sc.privileged == Some(true) {
            out.push(format!("{n}: privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            out.push(format!("{n}: allowPrivilegeEscalation != false"));
        }
        if sc.run_as_non_root.or(pod_sc.run_as_non_root) != Some(true) {
            out.push(format!("{n}: runAsNonRoot != true"));
        }
        if sc.run_as_user.or(pod_sc.run_as_user) == Some(0) {
            out.push(format!("{n}: runAsUser=0"));
        }
        let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile.clone()).map(|p| p.type_);
        if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
            out.push(format!("{n}: seccompProfile {seccomp:?}"));
        }
        if sc.app_armor_profile.is_some_and(|p| p.type_ == "Unconfined") {
            out.push(format!("{n}: AppArmor Unconfined"));
        }
        let caps = sc.capabilities.unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
            out.push(format!("{n}: capabilities do not drop ALL"));
        }
        if let Some(bad) = caps.add.unwrap_or_default().iter().find(|a| *a != "NET_BIND_SERVICE") {
            out.push(format!("{n}: adds capability {bad}"));
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            out.push(format!("{n}: hostPort"));
        }
    }
    out
}

#[test]
fn an_image_source_pod_passes_the_restricted_pod_security_level() {
    let (_, p) = planned("image-source.yaml");
    assert_eq!(restricted_violations(&p.pod), Vec::<String>::new());
    assert_eq!(p.pod.spec.as_ref().unwrap().host_users, None, "needs no user namespace either");
    // The checker does catch what a Dockerfile build needs (it runs at the privileged level).
    let (_, dockerfile) = planned("inline-dockerfile.yaml");
    let violations = restricted_violations(&dockerfile.pod);
    assert!(violations.iter().any(|v| v.contains("build: adds capability")), "{violations:?}");
}

#[test]
fn the_pod_knobs_reach_the_build_pod() {
    let mut ib = sample("inline-dockerfile.yaml");
    let knobs = ib.spec.pod.get_or_insert_with(Default::default);
    knobs.node_selector = Some([("kubernetes.io/arch".to_string(), "amd64".to_string())].into());
    knobs.tolerations = Some(vec![k8s_openapi::api::core::v1::Toleration {
        key: Some("builds".into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }]);
    let p = plan(&ib, &resolved_for(&ib), &PlanConfig::default()).unwrap();
    let spec = p.pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_selector.as_ref().unwrap()["kubernetes.io/arch"], "amd64");
    assert_eq!(spec.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("builds"));
    let limits = container(&p.pod, "build").resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "4Gi");
}
