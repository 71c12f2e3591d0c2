//! `bob run` and `bob copy` on a laptop: ECR registries the docker config has no entry for get a
//! token from the ambient AWS credentials (profile, SSO, environment; feature `aws`), as
//! `docker-credential-ecr-login` would give one. A docker config entry always wins.

use std::collections::BTreeMap;

use super::ecr::{self, Registry};
use crate::oci::credentials::DockerConfig;

/// The ECR hosts among `hosts` that need a token: private registries the config has no entry
/// for, and the public gallery when it is pushed to (its pulls are anonymous).
pub fn missing(config: &str, hosts: &[(String, bool)]) -> Vec<String> {
    let parsed = DockerConfig::parse(config).unwrap_or_default();
    let mut out: Vec<String> = hosts
        .iter()
        .filter(|(host, push)| match ecr::parse(host) {
            Some(Registry::Private { .. }) => true,
            Some(Registry::Public) => *push,
            None => false,
        })
        .filter(|(host, _)| parsed.lookup(host).is_none())
        .map(|(host, _)| host.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `config` with an `auths` entry per `host → auth` added (a legacy flat config is wrapped).
pub fn merge(config: &str, tokens: &BTreeMap<String, String>) -> String {
    let mut value: serde_json::Value = serde_json::from_str(config).unwrap_or_else(|_| serde_json::json!({}));
    if !value.is_object() {
        value = serde_json::json!({});
    }
    if value.get("auths").is_none() {
        // The legacy `.dockercfg` layout holds the entries at the top.
        let legacy =
            value.as_object().is_some_and(|o| o.values().all(|v| v.get("auth").is_some()) && !o.is_empty());
        value = if legacy { serde_json::json!({"auths": value}) } else { merge_into(value) };
    }
    if let Some(auths) = value.get_mut("auths").and_then(|a| a.as_object_mut()) {
        for (host, auth) in tokens {
            auths.insert(host.clone(), serde_json::json!({"auth": auth}));
        }
    }
    value.to_string()
}

fn merge_into(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(o) = value.as_object_mut() {
        o.insert("auths".into(), serde_json::json!({}));
    }
    value
}

/// `config` completed with ambient tokens for the ECR `hosts` (with whether each is pushed to)
/// that it has no entry for. A failed AWS call is a warning: the registry's own refusal follows.
pub async fn complete(config: String, hosts: &[(String, bool)]) -> String {
    let missing = missing(&config, hosts);
    if missing.is_empty() {
        return config;
    }
    #[cfg(feature = "aws")]
    match super::aws::ambient(&missing).await {
        Ok(tokens) => {
            tracing::info!(registries = ?missing, "ECR tokens from the ambient AWS credentials");
            return merge(&config, &tokens);
        }
        Err(e) => tracing::warn!(registries = ?missing, "no ECR token from the ambient AWS credentials: {e}"),
    }
    #[cfg(not(feature = "aws"))]
    tracing::warn!(registries = ?missing, "no docker config entry for these ECR registries, and bob was built without the `aws` feature");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECR: &str = "123456789012.dkr.ecr.us-gov-west-1.amazonaws.com";

    #[test]
    fn only_ecr_hosts_without_an_entry_and_config_entries_win() {
        let hosts = vec![
            (ECR.to_string(), false),
            ("ghcr.io".to_string(), true),
            ("public.ecr.aws".to_string(), false),
        ];
        assert_eq!(missing("{}", &hosts), vec![ECR.to_string()]);
        let with_entry = format!(r#"{{"auths": {{"{ECR}": {{"auth": "QVdTOng="}}}}}}"#);
        assert!(missing(&with_entry, &hosts).is_empty());
        assert_eq!(
            missing("{}", &[("public.ecr.aws".to_string(), true)]),
            vec!["public.ecr.aws".to_string()]
        );
    }

    #[test]
    fn merged_tokens_keep_the_other_entries() {
        let tokens = BTreeMap::from([(ECR.to_string(), "QVdTOnB3".to_string())]);
        let merged = merge(r#"{"auths": {"ghcr.io": {"auth": "dTpw"}}, "credsStore": "x"}"#, &tokens);
        let c = DockerConfig::parse(&merged).unwrap();
        assert!(c.lookup("ghcr.io").is_some() && c.lookup(ECR).is_some());
        let legacy = merge(r#"{"ghcr.io": {"auth": "dTpw"}}"#, &tokens);
        assert!(DockerConfig::parse(&legacy).unwrap().lookup("ghcr.io").is_some(), "{legacy}");
        let empty = merge("{}", &tokens);
        assert!(DockerConfig::parse(&empty).unwrap().lookup(ECR).is_some());
    }
}
