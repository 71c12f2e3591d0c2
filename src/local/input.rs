//! The file `bob run -f` reads: one ImageBuild, and optionally the Secrets it names (a registry
//! `kubernetes.io/dockerconfigjson` Secret, a git `kubernetes.io/basic-auth` Secret), as
//! `kubectl apply -f` would take them. Secrets missing from the file come from local defaults.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde_json::Value;

use crate::crd::ImageBuild;

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It cannot be read, or it is larger than an ImageBuild file can be.
    #[error(transparent)]
    Read(#[from] crate::bounded::Error),
    /// It is not YAML.
    #[error("{path} is not valid YAML")]
    Yaml {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// No ImageBuild, or more than one.
    #[error("{path} must hold exactly one ImageBuild (apiVersion bob.dev/v1alpha1), found {found}")]
    Count {
        /// The file.
        path: String,
        /// How many there are.
        found: usize,
    },
    /// The API server would refuse the ImageBuild (unknown fields, the CRD's rules).
    #[error("the ImageBuild in {path} is invalid (the API server would refuse it): {reasons}")]
    Refused {
        /// The file.
        path: String,
        /// What is wrong, in the API server's words.
        reasons: String,
    },
    /// The ImageBuild does not match the schema.
    #[error("the ImageBuild in {path} does not match the schema")]
    Schema {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The ImageBuild and the Secrets of a file.
#[derive(Debug)]
pub struct Input {
    /// The ImageBuild.
    pub image_build: ImageBuild,
    /// Secret name → key → decoded value.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

impl Input {
    /// Reads (at most `bounded::IMAGEBUILD_FILE`) and parses `path`.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = crate::bounded::read_to_string(path, crate::bounded::IMAGEBUILD_FILE)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a file named `path`.
    pub fn parse(text: &str, path: &str) -> Result<Self, Error> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| Error::Yaml { path: path.into(), source: Box::new(e) })?;
        let builds: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ImageBuild").collect();
        let [doc] = builds.as_slice() else {
            return Err(Error::Count { path: path.into(), found: builds.len() });
        };
        if doc["apiVersion"] != "bob.dev/v1alpha1" {
            return Err(Error::Count { path: path.into(), found: 0 });
        }
        let refused = super::validate::refusals(doc);
        if !refused.is_empty() {
            return Err(Error::Refused { path: path.into(), reasons: refused.join("; ") });
        }
        let mut image_build: ImageBuild = serde_json::from_value((*doc).clone())
            .map_err(|source| Error::Schema { path: path.into(), source })?;
        image_build.metadata.namespace.get_or_insert_with(|| "default".into());
        let secrets = docs.iter().filter(|d| d["kind"] == "Secret").filter_map(secret).collect();
        Ok(Self { image_build, secrets })
    }

    /// The value of `key` in the Secret `name`, if the file has it.
    pub fn secret_value(&self, name: &str, key: &str) -> Option<&str> {
        self.secrets.get(name)?.get(key).map(String::as_str)
    }
}

/// A Secret's name and its `data` (base64) merged with `stringData`, decoded.
fn secret(doc: &Value) -> Option<(String, BTreeMap<String, String>)> {
    let name = doc["metadata"]["name"].as_str()?.to_string();
    let mut values = BTreeMap::new();
    if let Some(data) = doc["data"].as_object() {
        for (k, v) in data {
            let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str()?.trim()).ok()?;
            values.insert(k.clone(), String::from_utf8(bytes).ok()?);
        }
    }
    if let Some(data) = doc["stringData"].as_object() {
        for (k, v) in data {
            values.insert(k.clone(), v.as_str()?.to_string());
        }
    }
    Some((name, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_imagebuild_and_decodes_secrets() {
        let text = r#"
apiVersion: v1
kind: Secret
metadata: {name: reg}
data: {.dockerconfigjson: eyJhdXRocyI6e319}
---
apiVersion: bob.dev/v1alpha1
kind: ImageBuild
metadata: {name: x}
spec:
  source: {image: {ref: "reg.test/a:1"}}
  workspaceImageRepository: reg.test/ws
"#;
        let input = Input::parse(text, "f.yaml").unwrap();
        assert_eq!(input.image_build.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(input.secret_value("reg", ".dockerconfigjson"), Some(r#"{"auths":{}}"#));
        assert!(matches!(
            Input::parse("kind: Secret\nmetadata: {name: a}\n", "f"),
            Err(Error::Count { found: 0, .. })
        ));
        let bad = "apiVersion: bob.dev/v1alpha1\nkind: ImageBuild\nmetadata: {name: x}\nspec: {source: {}}\n";
        assert!(matches!(Input::parse(bad, "f"), Err(Error::Refused { .. })));
    }
}
