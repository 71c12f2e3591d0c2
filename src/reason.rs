//! The one closed set of reasons bob reports: `bob build` writes them into its result,
//! and the controller puts them in `status.reason`, events and metric labels. New reasons are
//! added here (never spelled elsewhere) so the set stays bounded.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an ImageBuild is where it is (mostly: why it failed). Serialised in CamelCase
/// (`"BuildStepFailed"`), as Kubernetes reasons are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Reason {
    /// Succeeded: the image was built and verified in the registry.
    Built,
    /// Succeeded: the workspace image already existed; nothing ran.
    CacheHit,
    /// The ImageBuild's spec is invalid (a field the schema could not check).
    InvalidSpec,
    /// The git source could not be resolved or fetched (revision, URL, credentials).
    SourceFetchFailed,
    /// The build's configuration (environment, flags) is invalid.
    InvalidConfig,
    /// The Dockerfile is not where the ImageBuild says.
    DockerfileNotFound,
    /// The Dockerfile cannot be parsed (or has no `FROM`).
    DockerfileInvalid,
    /// A `FROM` image cannot be resolved or pulled (missing, unauthorized, unreachable).
    BaseImagePullFailed,
    /// A `RUN` (or other) step failed; the message names the step and its exit code.
    BuildStepFailed,
    /// The build engine failed outside any step (it could not start, or crashed).
    EngineFailed,
    /// Pushing the built base image failed.
    PushFailed,
    /// Copying the base image to the workspace image failed.
    CopyFailed,
    /// The registry proxy of the build pod did not answer.
    ProxyUnavailable,
    /// The build ran out of disk space.
    DiskFull,
    /// The build (or a step) was killed for memory.
    OutOfMemory,
    /// The build printed nothing for longer than the watchdog allows.
    NoProgress,
    /// The build reported success, but the registry does not hold the workspace image with the
    /// reported digest.
    VerifyFailed,
    /// The registry Secret named by the ImageBuild does not exist (yet).
    SecretNotFound,
    /// A Secret the ImageBuild names exists but cannot be used (not a docker config JSON, a
    /// missing key): fix the Secret; the build waits for it until the queue time limit.
    SecretInvalid,
    /// A registry refused the credentials for a repository the build needs (401/403): fix the
    /// Secret or the registry's permissions; the build waits until the queue time limit.
    RegistryDenied,
    /// No entry of the controller's registry mapping (`cloudIdentity.registries`) lets the
    /// ImageBuild's namespace use a repository it needs: the operator adds one, or the ImageBuild
    /// names a Secret (`spec.registryAuth`). The build waits until the queue time limit.
    RegistryNotMapped,
    /// The cloud refused to mint the build's registry credential (AWS `AccessDenied`: the role's
    /// policy or trust policy): fix the role; the build waits until the queue time limit.
    AccessDenied,
    /// A repository the build pushes to does not exist and the registry creates none on push
    /// (ECR): create it; the build waits until the queue time limit.
    RepositoryNotFound,
    /// Cloud-minted credentials are refused because no NetworkPolicy keeps build pods from the
    /// cloud's metadata endpoints: enable the chart's build-pod network policy.
    NetworkPolicyMissing,
    /// The API server refused the build pod for good (Pod Security admission, an admission
    /// webhook, an invalid pod): change the namespace's policy or the ImageBuild.
    PodRejected,
    /// The installation's policy forbids what the ImageBuild asks for: a node selector or
    /// toleration not on the operator's allow-list, or a Dockerfile build in a namespace that may
    /// not use the installation's privileged build mode. Final for the generation: the ImageBuild
    /// asks for less, or the operator widens the policy and the ImageBuild is edited.
    PolicyDenied,
    /// A ResourceQuota has no room for the build pod yet: it waits until the queue time limit.
    QuotaExceeded,
    /// A call to the Kubernetes API failed (RBAC, an unavailable API server): retried with
    /// backoff until the queue time limit.
    ApiUnavailable,
    /// The build pod cannot be scheduled (not terminal: the cluster may scale up).
    Unschedulable,
    /// The bob image of the build pod cannot be pulled.
    BuilderImagePullFailed,
    /// The build pod was evicted (node pressure, preemption).
    PodEvicted,
    /// The build pod was deleted before it finished.
    PodDeleted,
    /// The build pod failed for a reason bob cannot tell more precisely.
    PodFailed,
    /// The build ran longer than its time limit.
    BuildTimeout,
    /// The ImageBuild waited longer than its queue time limit.
    QueueTimeout,
    /// A registry did not answer (unreachable, timeout, 5xx): retried, not the user's fault.
    RegistryUnavailable,
    /// `spec.cancel` stopped the build (in `bob build`'s result and `bob run`'s status: SIGTERM or
    /// SIGINT did; the controller reports a build container stopped that way by the pod's fate).
    Cancelled,
    /// A bug or an unexpected state in bob itself.
    Internal,
}

impl Reason {
    /// Every reason, for documentation and exhaustive tests.
    pub const ALL: [Reason; 38] = [
        Reason::Built,
        Reason::CacheHit,
        Reason::InvalidSpec,
        Reason::SourceFetchFailed,
        Reason::InvalidConfig,
        Reason::DockerfileNotFound,
        Reason::DockerfileInvalid,
        Reason::BaseImagePullFailed,
        Reason::BuildStepFailed,
        Reason::EngineFailed,
        Reason::PushFailed,
        Reason::CopyFailed,
        Reason::ProxyUnavailable,
        Reason::DiskFull,
        Reason::OutOfMemory,
        Reason::NoProgress,
        Reason::VerifyFailed,
        Reason::SecretNotFound,
        Reason::SecretInvalid,
        Reason::RegistryDenied,
        Reason::RegistryNotMapped,
        Reason::AccessDenied,
        Reason::RepositoryNotFound,
        Reason::NetworkPolicyMissing,
        Reason::PodRejected,
        Reason::PolicyDenied,
        Reason::QuotaExceeded,
        Reason::ApiUnavailable,
        Reason::Unschedulable,
        Reason::BuilderImagePullFailed,
        Reason::PodEvicted,
        Reason::PodDeleted,
        Reason::PodFailed,
        Reason::BuildTimeout,
        Reason::QueueTimeout,
        Reason::RegistryUnavailable,
        Reason::Cancelled,
        Reason::Internal,
    ];

    /// The CamelCase name, as in status and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Built => "Built",
            Reason::CacheHit => "CacheHit",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SourceFetchFailed => "SourceFetchFailed",
            Reason::InvalidConfig => "InvalidConfig",
            Reason::DockerfileNotFound => "DockerfileNotFound",
            Reason::DockerfileInvalid => "DockerfileInvalid",
            Reason::BaseImagePullFailed => "BaseImagePullFailed",
            Reason::BuildStepFailed => "BuildStepFailed",
            Reason::EngineFailed => "EngineFailed",
            Reason::PushFailed => "PushFailed",
            Reason::CopyFailed => "CopyFailed",
            Reason::ProxyUnavailable => "ProxyUnavailable",
            Reason::DiskFull => "DiskFull",
            Reason::OutOfMemory => "OutOfMemory",
            Reason::NoProgress => "NoProgress",
            Reason::VerifyFailed => "VerifyFailed",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretInvalid => "SecretInvalid",
            Reason::RegistryDenied => "RegistryDenied",
            Reason::RegistryNotMapped => "RegistryNotMapped",
            Reason::AccessDenied => "AccessDenied",
            Reason::RepositoryNotFound => "RepositoryNotFound",
            Reason::NetworkPolicyMissing => "NetworkPolicyMissing",
            Reason::PodRejected => "PodRejected",
            Reason::PolicyDenied => "PolicyDenied",
            Reason::QuotaExceeded => "QuotaExceeded",
            Reason::ApiUnavailable => "ApiUnavailable",
            Reason::Unschedulable => "Unschedulable",
            Reason::BuilderImagePullFailed => "BuilderImagePullFailed",
            Reason::PodEvicted => "PodEvicted",
            Reason::PodDeleted => "PodDeleted",
            Reason::PodFailed => "PodFailed",
            Reason::BuildTimeout => "BuildTimeout",
            Reason::QueueTimeout => "QueueTimeout",
            Reason::RegistryUnavailable => "RegistryUnavailable",
            Reason::Cancelled => "Cancelled",
            Reason::Internal => "Internal",
        }
    }

    /// Whether the user's input caused it (fix the Dockerfile or the spec) rather than the
    /// infrastructure (worth a retry on a fresh pod).
    pub fn is_user_error(self) -> bool {
        matches!(
            self,
            Reason::InvalidSpec
                | Reason::SecretNotFound
                | Reason::SecretInvalid
                | Reason::RegistryDenied
                | Reason::RegistryNotMapped
                | Reason::AccessDenied
                | Reason::RepositoryNotFound
                | Reason::NetworkPolicyMissing
                | Reason::PodRejected
                | Reason::PolicyDenied
                | Reason::SourceFetchFailed
                | Reason::InvalidConfig
                | Reason::DockerfileNotFound
                | Reason::DockerfileInvalid
                | Reason::BaseImagePullFailed
                | Reason::BuildStepFailed
                | Reason::NoProgress
        )
    }
}

impl Reason {
    /// Whether a failure for this reason is worth a new build pod: the infrastructure failed
    /// (eviction, a lost pod, a registry or proxy that did not answer, a builder image that could
    /// not be pulled — perhaps fixed since), not the user's input.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Reason::PodEvicted
                | Reason::PodDeleted
                | Reason::PodFailed
                | Reason::ProxyUnavailable
                | Reason::RegistryUnavailable
                | Reason::BuilderImagePullFailed
                | Reason::EngineFailed
                | Reason::PushFailed
                | Reason::CopyFailed
                | Reason::DiskFull
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serialised_form_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&format!("\"{r}\"")).unwrap(), r);
            assert!(seen.insert(r.as_str()), "{r} twice");
        }
    }

    #[test]
    fn user_errors_are_never_retried() {
        for r in Reason::ALL {
            assert!(!(r.is_user_error() && r.is_retryable()), "{r} is both");
        }
        assert!(Reason::PodEvicted.is_retryable() && Reason::RegistryUnavailable.is_retryable());
        assert!(!Reason::BuildStepFailed.is_retryable() && !Reason::InvalidSpec.is_retryable());
        assert!(!Reason::BuildTimeout.is_retryable() && !Reason::Cancelled.is_retryable());
    }

    #[test]
    fn user_errors_are_not_infrastructure() {
        assert!(Reason::BuildStepFailed.is_user_error() && Reason::DockerfileNotFound.is_user_error());
        assert!(!Reason::DiskFull.is_user_error() && !Reason::ProxyUnavailable.is_user_error());
    }
}
