//! What the Secrets a spec names mean for the build, decided once for both worlds: the
//! cluster's Secrets (`observe.rs`) and the ones in `bob run`'s file (`local/world.rs`) are read
//! into [`Keys`] and mapped here to a usable credential or to the reason it is not one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use super::resolve::GitAuth;
use super::step::Failure;
use crate::crd::ImageBuild;
use crate::reason::Reason;

/// The key of a docker config in a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// A Secret's keys and their values (not UTF-8 bytes replaced: credentials are text).
pub type Keys = BTreeMap<String, String>;

/// The keys of a Secret read from the API (`data`, and `stringData` of a Secret not yet stored).
pub fn keys(secret: &Secret) -> Keys {
    let data =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()));
    let strings = secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone()));
    data.chain(strings).collect()
}

/// The Secrets a spec names: the registry's (`spec.registryAuth`) and git's
/// (`credentialsSecretRef`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// The registry Secret's name.
    pub registry: Option<String>,
    /// The git credentials Secret's name.
    pub git: Option<String>,
}

impl Named {
    /// The Secrets `ib` names.
    pub fn of(ib: &ImageBuild) -> Self {
        let registry = ib.spec.registry_auth.as_ref().map(|a| a.secret_ref.name.clone());
        let git = ib.spec.source.dockerfile.as_ref().and_then(|d| d.git.as_ref());
        let git = git.and_then(|g| g.credentials_secret_ref.as_ref()).map(|r| r.name.clone());
        Self { registry, git }
    }
}

/// The docker config of the registry Secret `place` (e.g. `Secret ns/name`), or why it has none.
pub fn registry<'a>(place: &str, found: Option<&'a Keys>) -> Result<&'a str, Failure> {
    let Some(keys) = found else {
        return Err(Failure::new(
            Reason::SecretNotFound,
            format!("{place} (spec.registryAuth) does not exist"),
        ));
    };
    keys.get(DOCKER_CONFIG_KEY).map(String::as_str).ok_or_else(|| {
        let message = format!("{place} has no {DOCKER_CONFIG_KEY} key (type kubernetes.io/dockerconfigjson)");
        Failure::new(Reason::SecretInvalid, message)
    })
}

/// The git credentials of the Secret `place`, or why it has none.
pub fn git(place: &str, found: Option<&Keys>) -> Result<GitAuth, Failure> {
    let Some(keys) = found else {
        let message = format!("{place} (git credentialsSecretRef) does not exist");
        return Err(Failure::new(Reason::SecretNotFound, message));
    };
    match (keys.get("username"), keys.get("password")) {
        (Some(username), Some(password)) => {
            Ok(GitAuth { username: username.clone(), password: crate::oci::Secret::new(password.clone()) })
        }
        _ => {
            Err(Failure::new(Reason::SecretInvalid, format!("{place} needs the keys username and password")))
        }
    }
}

/// A docker config that the registry client refused, said of the Secret it came from.
pub fn not_a_docker_config(place: &str, f: Failure) -> Failure {
    let message = format!("{place} key {DOCKER_CONFIG_KEY} is not a docker config: {}", f.message);
    Failure::new(f.reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(pairs: &[(&str, &str)]) -> Keys {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_missing_secret_is_not_found_and_a_secret_without_its_keys_is_invalid() {
        assert_eq!(registry("Secret ns/reg", None).unwrap_err().reason, Reason::SecretNotFound);
        let wrong = keys_of(&[("config.json", "{}")]);
        let f = registry("Secret ns/reg", Some(&wrong)).unwrap_err();
        assert_eq!(f.reason, Reason::SecretInvalid);
        assert!(f.message.contains(".dockerconfigjson"), "{}", f.message);
        assert_eq!(git("Secret ns/git", None).unwrap_err().reason, Reason::SecretNotFound);
        let half = keys_of(&[("username", "u")]);
        assert_eq!(git("Secret ns/git", Some(&half)).unwrap_err().reason, Reason::SecretInvalid);
    }

    #[test]
    fn usable_secrets_give_their_values() {
        let reg = keys_of(&[(DOCKER_CONFIG_KEY, "{\"auths\":{}}")]);
        assert_eq!(registry("Secret ns/reg", Some(&reg)).unwrap(), "{\"auths\":{}}");
        let g = git("Secret ns/git", Some(&keys_of(&[("username", "u"), ("password", "p")]))).unwrap();
        assert_eq!((g.username.as_str(), g.password.expose()), ("u", "p"));
    }

    #[test]
    fn keys_decodes_data_and_string_data() {
        let s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"b": "y"}
        }))
        .unwrap();
        assert_eq!(keys(&s), keys_of(&[("a", "x"), ("b", "y")]));
    }
}
