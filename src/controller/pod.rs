//! The desired build pod (pure): a git clone init container when needed, `bob proxy` as a native
//! sidecar holding the registry Secret, and `bob build` with no credentials. Each Secret is
//! mounted in exactly one container; labels tie the pod to its ImageBuild and key.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, DownwardAPIVolumeFile, DownwardAPIVolumeSource, ExecAction, KeyToPath, ObjectFieldSelector,
    Pod, PodSpec, Probe, SecretVolumeSource, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use super::cache_scope::{CachePlan, ttl_arg};
pub use super::containers::GIT_CREDENTIAL_HELPER;
use super::containers::{builder, clone_container, empty_dir, env, mount, restricted, small_resources};
use super::plan::{BuildSecurity, Invalid, PlanConfig};
use crate::build::Isolation;
use crate::cloud::guard::SKIP_CONTAINERS;
use crate::crd::ImageBuild;
use crate::key::{BuildInputs, DockerfileSource as KeySource};

/// Label: the ImageBuild's name (truncated to 63 characters).
pub const LABEL_IMAGEBUILD: &str = "bob.dev/imagebuild";
/// Label: the first 32 hex digits of the key (or of the workspace tag for image sources).
pub const LABEL_KEY: &str = "bob.dev/key";
/// Annotation: the whole key.
pub const ANNOTATION_KEY: &str = "bob.dev/key";
/// Annotation: the workspace image ref.
pub const ANNOTATION_WORKSPACE_REF: &str = "bob.dev/workspace-ref";
/// Annotation: an inline Dockerfile, projected into the build container as a file.
pub const ANNOTATION_DOCKERFILE: &str = "bob.dev/dockerfile";
/// The build pod's main container: `bob build`.
pub const CONTAINER_BUILD: &str = "build";
/// The registry proxy sidecar: `bob proxy`, the only holder of the registry Secret.
pub const CONTAINER_PROXY: &str = "proxy";
/// The git clone init container (git sources).
pub const CONTAINER_CLONE: &str = "clone";
/// Label key: who manages the pod.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label key: the pod's role.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// The label selector of the build pods bob manages (the pods the controller watches and counts).
pub const BUILD_POD_SELECTOR: &str = "app.kubernetes.io/managed-by=bob,app.kubernetes.io/component=build";
/// Where the workspace (git checkout, build context) is mounted.
pub const WORKSPACE: &str = "/workspace";
/// Where an inline Dockerfile is projected.
pub const DOCKERFILE_DIR: &str = "/bob/dockerfile";
/// Where the proxy finds the registry credentials.
pub const REGISTRY_AUTH_DIR: &str = "/var/run/secrets/bob/registry";

/// The plan's decisions the pod needs.
pub struct PodInputs<'a> {
    /// The key (Dockerfile sources).
    pub key: Option<&'a str>,
    /// The key's inputs (Dockerfile sources): paths and the git commit.
    pub inputs: Option<&'a BuildInputs>,
    /// The real base ref.
    pub base_ref: &'a str,
    /// The real workspace ref.
    pub workspace_ref: &'a str,
    /// Pinned `FROM` refs.
    pub from_refs: &'a [String],
    /// The layer cache, when the build has one.
    pub layer_cache: Option<&'a CachePlan>,
    /// The build's time limit (the spec's, else the installation's).
    pub build_timeout: Duration,
    /// Installation settings.
    pub cfg: &'a PlanConfig,
}

/// The build pod's name: the same for every ImageBuild of the namespace that builds the same
/// workspace image with the same registry Secret, so they share one pod (and a restarted
/// controller finds it again); a new attempt gets a new name. The layer-cache scope is in the key
/// and so in the workspace ref: ImageBuilds of different scopes never share a pod.
pub fn pod_name(registry_secret: Option<&str>, workspace_ref: &str, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    let sum = Sha256::digest(format!("{}\n{workspace_ref}", registry_secret.unwrap_or("")).as_bytes());
    let hex: String = sum.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("bob-build-{hex}-{attempt}")
}

/// The pod volume of the registry credential (the proxy mounts it whole: no `subPath`, so the
/// kubelet refreshes the file when the Secret changes).
const VOLUME_REGISTRY_AUTH: &str = "registry-auth";

fn registry_auth_volume(secret: &str) -> Volume {
    Volume {
        name: VOLUME_REGISTRY_AUTH.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: Some(vec![KeyToPath {
                key: ".dockerconfigjson".into(),
                path: "config.json".into(),
                mode: None,
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Gives the proxy of `pod` the credential minted for it (`<pod>-registry`, written by the
/// controller once the pod exists, refreshed while it runs) instead of a Secret the spec names.
pub fn use_minted_credential(pod: &mut Pod) {
    let name = crate::cloud::secret::name(pod.metadata.name.as_deref().unwrap_or_default());
    let Some(spec) = pod.spec.as_mut() else { return };
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != VOLUME_REGISTRY_AUTH);
    volumes.push(registry_auth_volume(&name));
    let Some(proxy) = spec.init_containers.iter_mut().flatten().find(|c| c.name == CONTAINER_PROXY) else {
        return;
    };
    let mounts = proxy.volume_mounts.get_or_insert_with(Vec::new);
    mounts.retain(|m| m.name != VOLUME_REGISTRY_AUTH);
    mounts.push(mount(VOLUME_REGISTRY_AUTH, REGISTRY_AUTH_DIR, true));
    let envs = proxy.env.get_or_insert_with(Vec::new);
    envs.retain(|e| e.name != "BOB_AUTH_FILE");
    envs.push(env("BOB_AUTH_FILE", format!("{REGISTRY_AUTH_DIR}/config.json")));
}

/// The value of [`LABEL_IMAGEBUILD`] for ImageBuild `name` (a label value has 63 characters at
/// most and ends with a letter or digit).
pub fn imagebuild_label(name: &str) -> String {
    name.chars().take(63).collect::<String>().trim_end_matches(['-', '.', '_']).to_string()
}

/// The tracing target of the event `build_pod` emits each time it plans a pod.
pub const PLANNED: &str = "bob::build_pod";

/// Builds the desired pod for an ImageBuild.
pub fn build_pod(ib: &ImageBuild, p: &PodInputs<'_>) -> Result<Pod, Invalid> {
    // Counted by a test: a reconcile plans its pod once.
    tracing::trace!(target: PLANNED, "planning the build pod");
    let name = ib.metadata.name.clone().unwrap_or_default();
    let spec = &ib.spec;
    let addr = format!("127.0.0.1:{}", p.cfg.proxy_port);
    let workspace_tag = p.workspace_ref.rsplit(':').next().unwrap_or_default();
    let label_key: String = p.key.unwrap_or(workspace_tag).chars().take(32).collect();
    let secret = spec.registry_auth.as_ref().map(|a| a.secret_ref.name.as_str());
    let pod_name = pod_name(secret, p.workspace_ref, 1);

    let mut volumes = vec![empty_dir("workspace"), empty_dir("storage"), empty_dir("tmp")];
    let mut annotations =
        BTreeMap::from([(ANNOTATION_WORKSPACE_REF.to_string(), p.workspace_ref.to_string())]);
    if let Some(k) = p.key {
        annotations.insert(ANNOTATION_KEY.into(), k.into());
    }

    let mut proxy_env = vec![
        env("BOB_PROXY_ADDR", &addr),
        env("BOB_PROXY_BASE_REF", p.base_ref),
        env("BOB_PROXY_TARGET_REF", p.workspace_ref),
        env("BOB_PROXY_MIRROR_REFS", p.from_refs.join(",")),
    ];
    if !p.cfg.insecure_registries.is_empty() {
        proxy_env.push(env("BOB_INSECURE_REGISTRIES", p.cfg.insecure_registries.join(",")));
    }
    if let Some(c) = p.layer_cache {
        proxy_env.push(env("BOB_PROXY_CACHE_REPOSITORY", &c.repository));
    }
    #[cfg(feature = "test-hooks")]
    if let Some(target) = crate::cloud::hook::ecr_registry() {
        // Tests: the proxy serves ECR names from the same loopback registry as the controller.
        proxy_env.push(env(crate::cloud::hook::ENV, target));
    }
    let mut proxy_mounts = Vec::new();
    if let Some(auth) = &spec.registry_auth {
        volumes.push(registry_auth_volume(&auth.secret_ref.name));
        proxy_mounts.push(mount(VOLUME_REGISTRY_AUTH, REGISTRY_AUTH_DIR, true));
        proxy_env.push(env("BOB_AUTH_FILE", format!("{REGISTRY_AUTH_DIR}/config.json")));
    }

    let image_source = spec.source.image.is_some();
    if image_source {
        proxy_env.push(env("BOB_PROXY_BASE_READ_ONLY", "true"));
    }
    let check = ExecAction { command: Some(vec!["bob".into(), "proxy".into(), "--check".into()]) };
    let proxy = Container {
        name: CONTAINER_PROXY.into(),
        image: Some(p.cfg.image.clone()),
        command: Some(vec!["bob".into(), "proxy".into()]),
        env: Some(proxy_env),
        volume_mounts: Some(proxy_mounts),
        restart_policy: Some("Always".into()),
        startup_probe: Some(Probe {
            exec: Some(check),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        resources: Some(small_resources()),
        security_context: Some(restricted()),
        // Its last log lines become the termination message when it fails: evidence for status.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let tag = |r: &str| r.rsplit_once(':').map(|(_, t)| t.to_string()).unwrap_or_else(|| "latest".into());
    let base_local = match p.base_ref.split_once('@') {
        Some((_, digest)) => format!("{addr}/base@{digest}"),
        None => format!("{addr}/base:{}", tag(p.base_ref)),
    };
    let mut build_env = vec![
        env("BOB_PROXY_ADDR", &addr),
        env("BOB_BASE_REF", base_local),
        env("BOB_TARGET_REF", format!("{addr}/target:{workspace_tag}")),
        env("BOB_BUILD_BASE", (!image_source).to_string()),
        env("BOB_TERMINATION_MESSAGE_PATH", "/dev/termination-log"),
        env("BOB_STORAGE_ROOT", "/var/lib/bob/storage"),
        env("BOB_STORAGE_RUNROOT", "/var/lib/bob/run"),
        env("BOB_ISOLATION", if p.cfg.isolation == Isolation::Oci { "oci" } else { "chroot" }),
        env("TMPDIR", "/tmp"),
    ];
    let mut build_mounts = vec![mount("storage", "/var/lib/bob", false), mount("tmp", "/tmp", false)];
    let mut init = Vec::new();
    if let Some(d) = &spec.source.dockerfile {
        build_env.push(env("BOB_FROM_REFS", p.from_refs.join(",")));
        if spec.force_rebuild {
            // Rebuild the base too, so what RUN steps fetch is fetched again.
            build_env.push(env("BOB_FORCE_BUILD", "true"));
        }
        if let Some(c) = p.layer_cache {
            // The build reaches its cache only as the proxy's `cache` alias.
            build_env.push(env("BOB_LAYER_CACHE_REF", format!("{addr}/cache")));
            build_env.push(env("BOB_LAYER_CACHE_READ", c.read.to_string()));
            build_env.push(env("BOB_LAYER_CACHE_TTL", ttl_arg(c.ttl)));
        }
        if !d.build_args.is_empty() {
            build_env.push(env("BOB_BUILD_ARGS", serde_json::to_string(&d.build_args).unwrap_or_default()));
        }
        if let Some(t) = &d.target {
            build_env.push(env("BOB_BUILD_TARGET", t));
        }
        build_mounts.push(mount("workspace", WORKSPACE, true));
        match (&d.inline, &d.git) {
            (Some(text), _) => {
                annotations.insert(ANNOTATION_DOCKERFILE.into(), text.clone());
                volumes.push(Volume {
                    name: "dockerfile".into(),
                    downward_api: Some(DownwardAPIVolumeSource {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "Dockerfile".into(),
                            // What the API server would default (an atomic struct).
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: format!("metadata.annotations['{ANNOTATION_DOCKERFILE}']"),
                            }),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                build_mounts.push(mount("dockerfile", DOCKERFILE_DIR, true));
                build_env.push(env("BOB_DOCKERFILE_PATH", format!("{DOCKERFILE_DIR}/Dockerfile")));
                build_env.push(env("BOB_CONTEXT_DIR", WORKSPACE));
            }
            (None, Some(git)) => {
                let (Some(inputs), Some(KeySource::Git { commit })) = (p.inputs, p.inputs.map(|i| &i.source))
                else {
                    return Err(Invalid {
                        field: "spec.source.dockerfile.git".into(),
                        message: "not resolved".into(),
                    });
                };
                build_env.push(env("BOB_DOCKERFILE_PATH", format!("{WORKSPACE}/{}", inputs.dockerfile_path)));
                build_env.push(env("BOB_CONTEXT_DIR", format!("{WORKSPACE}/{}", inputs.context_path)));
                init.push(clone_container(git, commit, p.cfg));
            }
            (None, None) => {
                return Err(Invalid { field: "spec.source.dockerfile".into(), message: "empty".into() });
            }
        }
    }
    init.push(proxy);
    // No container needs a cloud identity, the proxy included: the EKS webhooks (IRSA, Pod
    // Identity) must not add one, whatever ServiceAccount the pod runs as. The controller checks
    // the stored pod too (src/cloud/guard.rs), for webhooks that ignore this annotation.
    let mut names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    names.push(CONTAINER_BUILD);
    annotations.insert(SKIP_CONTAINERS.into(), names.join(","));
    let knobs = spec.pod.clone().unwrap_or_default();
    let build = Container {
        name: CONTAINER_BUILD.into(),
        image: Some(p.cfg.image.clone()),
        command: Some(vec!["bob".into(), "build".into()]),
        env: Some(build_env),
        volume_mounts: Some(build_mounts),
        resources: knobs.resources.clone(),
        // An image source only copies, through the proxy: it needs no privilege at all, so its
        // pod passes the `restricted` Pod Security level.
        security_context: Some(if image_source { restricted() } else { builder(p.cfg.security) }),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    // Whole seconds, rounded up: the pod never gets less time than the limit says.
    let deadline = p.build_timeout.as_secs() + u64::from(p.build_timeout.subsec_nanos() > 0);

    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "bob".to_string()),
        (LABEL_COMPONENT.to_string(), "build".to_string()),
        (LABEL_MANAGED_BY.to_string(), "bob".to_string()),
        (LABEL_IMAGEBUILD.to_string(), imagebuild_label(&name)),
        (LABEL_KEY.to_string(), label_key),
    ]);
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name),
            namespace: ib.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: ib.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(deadline as i64),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_users: (!image_source && p.cfg.security == BuildSecurity::UserNamespace).then_some(false),
            service_account_name: knobs.service_account_name,
            node_selector: knobs.node_selector,
            tolerations: knobs.tolerations,
            priority_class_name: knobs.priority_class_name,
            init_containers: Some(init),
            containers: vec![build],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_is_the_labels_the_pod_gets() {
        assert_eq!(BUILD_POD_SELECTOR, format!("{LABEL_MANAGED_BY}=bob,{LABEL_COMPONENT}=build"));
    }
}
