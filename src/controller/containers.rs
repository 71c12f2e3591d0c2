//! The parts of the build pod that do not depend on the ImageBuild: the containers' security
//! contexts (non-root for proxy and clone, buildah's modes for the build), env and mount
//! builders, and the git clone init container.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    AppArmorProfile, Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::plan::{BuildSecurity, PlanConfig};
use super::pod::{CONTAINER_CLONE, WORKSPACE};

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

pub(super) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

pub(super) fn empty_dir(name: &str) -> Volume {
    Volume { name: name.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

/// Non-root, read-only, no capabilities: the proxy and the clone need nothing more.
pub(super) fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// What buildah needs: root with the capabilities to set up its mount namespace and chroot.
pub(super) fn builder(security: BuildSecurity) -> SecurityContext {
    if security == BuildSecurity::Privileged {
        return SecurityContext { privileged: Some(true), run_as_user: Some(0), ..Default::default() };
    }
    let caps = [
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "SETFCAP",
        "SETGID",
        "SETUID",
        "SYS_ADMIN",
        "SYS_CHROOT",
    ];
    SecurityContext {
        run_as_user: Some(0),
        run_as_group: Some(0),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            add: Some(caps.iter().map(|c| c.to_string()).collect()),
            drop: Some(vec!["ALL".into()]),
        }),
        // The default seccomp profile and AppArmor refuse the mount and unshare calls buildah makes.
        seccomp_profile: Some(SeccompProfile { type_: "Unconfined".into(), ..Default::default() }),
        app_armor_profile: Some(AppArmorProfile { type_: "Unconfined".into(), ..Default::default() }),
        ..Default::default()
    }
}

pub(super) fn small_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.into());
    ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".into(), q("50m")), ("memory".into(), q("32Mi"))])),
        limits: Some(BTreeMap::from([("memory".into(), q("256Mi"))])),
        ..Default::default()
    }
}

/// The git credential helper: answers git from `GIT_USERNAME`/`GIT_PASSWORD`, so credentials are
/// never written to disk. Used by the clone container and by `bob run`'s resolver.
pub const GIT_CREDENTIAL_HELPER: &str =
    r#"!f() { echo "username=$GIT_USERNAME"; echo "password=$GIT_PASSWORD"; }; f"#;

/// The clone script: fetch exactly the commit (with the credential helper when credentials are
/// given), then check it out.
fn clone_script() -> String {
    format!(
        r#"set -eu
cd /workspace
git init -q .
if [ -n "${{GIT_USERNAME:-}}" ]; then git config credential.helper '{GIT_CREDENTIAL_HELPER}'; fi
git fetch -q --depth 1 "$BOB_GIT_URL" "$BOB_GIT_COMMIT"
git -c advice.detachedHead=false checkout -q FETCH_HEAD
echo "checked out $BOB_GIT_COMMIT"
"#
    )
}

pub(super) fn clone_container(git: &crate::crd::GitSource, commit: &str, cfg: &PlanConfig) -> Container {
    let mut envs = vec![env("BOB_GIT_URL", &git.url), env("BOB_GIT_COMMIT", commit), env("HOME", "/tmp")];
    if let Some(s) = &git.credentials_secret_ref {
        envs.push(secret_env("GIT_USERNAME", &s.name, "username"));
        envs.push(secret_env("GIT_PASSWORD", &s.name, "password"));
    }
    Container {
        name: CONTAINER_CLONE.into(),
        image: Some(cfg.image.clone()),
        command: Some(vec!["sh".into(), "-c".into(), clone_script()]),
        env: Some(envs),
        volume_mounts: Some(vec![mount("workspace", WORKSPACE, false), mount("tmp", "/tmp", false)]),
        resources: Some(small_resources()),
        security_context: Some(restricted()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}
