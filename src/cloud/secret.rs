//! The build pod's minted credential as a Secret (pure): a docker config holding only the scoped
//! registry token, named after its pod and owned by it (Kubernetes deletes it with the pod), with
//! the times that say when the controller must refresh it and the grants to mint it again.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::mapping::Grant;
use crate::oci::Secret as Sensitive;

/// Label: what the Secret holds (`registry`), so the startup sweep finds bob's credential Secrets.
pub const LABEL_CREDENTIAL: &str = "bob.dev/credential";
/// The label selector of bob's minted credential Secrets.
pub const SELECTOR: &str = "app.kubernetes.io/managed-by=bob,bob.dev/credential=registry";
/// Annotation: when the credential expires (RFC 3339).
pub const ANNOTATION_EXPIRES_AT: &str = "bob.dev/expires-at";
/// Annotation: when the controller refreshes it at the latest (half its lifetime).
pub const ANNOTATION_REFRESH_AT: &str = "bob.dev/refresh-at";
/// Annotation: the grants it was minted for (no secret: registries, repositories, entries).
pub const ANNOTATION_GRANTS: &str = "bob.dev/grants";
/// The pod volume that holds it (mounted by the proxy alone).
pub const VOLUME: &str = "registry-credential";

/// The Secret of build pod `pod`.
pub fn name(pod: &str) -> String {
    format!("{pod}-registry")
}

/// A minted credential: a docker config with one entry per registry.
#[derive(Clone, Debug)]
pub struct Minted {
    /// `{"auths": {...}}`.
    pub docker_config: Sensitive,
    /// When it was minted.
    pub minted_at: Timestamp,
    /// When its first part expires.
    pub expires_at: Timestamp,
}

impl Minted {
    /// Half its lifetime: the latest moment it is refreshed.
    pub fn refresh_at(&self) -> Timestamp {
        let life = self.expires_at.duration_since(self.minted_at);
        self.minted_at + SignedDuration::from_secs(life.as_secs().max(0) / 2)
    }

    /// Whether it is past half its lifetime at `now`.
    pub fn stale(&self, now: Timestamp) -> bool {
        now >= self.refresh_at()
    }
}

/// A docker config entry for a registry token (`AWS:<password>`, base64 as ECR hands it out).
pub fn docker_config(entries: &BTreeMap<String, String>) -> Sensitive {
    let auths: serde_json::Map<String, serde_json::Value> =
        entries.iter().map(|(host, auth)| (host.clone(), serde_json::json!({"auth": auth}))).collect();
    Sensitive::new(serde_json::json!({"auths": auths}).to_string())
}

/// `user:password` as a docker config's `auth`.
pub fn basic_auth(user: &str, password: &str) -> String {
    STANDARD.encode(format!("{user}:{password}"))
}

/// The Secret for `pod` (with `uid`) in `ns`.
pub fn secret(ns: &str, pod: &str, uid: &str, grants: &[Grant], minted: &Minted) -> Secret {
    let labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), "bob".to_string()),
        (LABEL_CREDENTIAL.to_string(), "registry".to_string()),
    ]);
    let annotations = BTreeMap::from([
        (ANNOTATION_EXPIRES_AT.to_string(), minted.expires_at.to_string()),
        (ANNOTATION_REFRESH_AT.to_string(), minted.refresh_at().to_string()),
        (ANNOTATION_GRANTS.to_string(), serde_json::to_string(grants).unwrap_or_default()),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name(pod)),
            namespace: Some(ns.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.to_string(),
                uid: uid.to_string(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(minted.docker_config.expose().as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// When a stored credential Secret must be refreshed (`None`: unreadable, refresh now).
pub fn refresh_at(s: &Secret) -> Option<Timestamp> {
    s.metadata.annotations.as_ref()?.get(ANNOTATION_REFRESH_AT)?.parse().ok()
}

/// The grants a stored credential Secret was minted for.
pub fn grants(s: &Secret) -> Option<Vec<Grant>> {
    serde_json::from_str(s.metadata.annotations.as_ref()?.get(ANNOTATION_GRANTS)?).ok()
}

/// The docker config a stored credential Secret holds.
pub fn docker_config_of(s: &Secret) -> Option<String> {
    s.data.as_ref()?.get(".dockerconfigjson").map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshed_at_half_its_lifetime_and_never_printed() {
        let minted_at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let m = Minted {
            docker_config: docker_config(&BTreeMap::from([("h".into(), basic_auth("AWS", "pw-123"))])),
            minted_at,
            expires_at: minted_at + SignedDuration::from_hours(1),
        };
        assert_eq!(m.refresh_at().to_string(), "2026-01-01T00:30:00Z");
        assert!(!m.stale(minted_at + SignedDuration::from_mins(29)) && m.stale(m.refresh_at()));
        let s = secret("ns", "bob-build-x-1", "uid-1", &[], &m);
        assert_eq!(refresh_at(&s), Some(m.refresh_at()));
        assert_eq!(s.metadata.name.as_deref(), Some("bob-build-x-1-registry"));
        assert!(!format!("{m:?}").contains(&basic_auth("AWS", "pw-123")));
    }
}
