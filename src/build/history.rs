//! Whether the images a Dockerfile starts from carry a build history that matches their layers.
//! buildah 1.28 commits every step as a layer (`--layers`) only on such images: on one without
//! (an image not built from a Dockerfile, e.g. AWS Lambda's bases) its second commit fails with
//! "history lists N non-empty layers, but we have M layers on disk". bob builds on those with
//! `--omit-history` (still one layer per step) and without the layer cache, which buildah matches
//! by history. The check reads each `FROM` image's config through the proxy's mirror route; when
//! it cannot tell, the build goes ahead and a failure of that kind is retried (`base.rs`).

use serde::Deserialize;

use crate::oci::Reference;
use crate::oci::client::Client;
use crate::oci::manifest::{self, Parsed};

/// The largest image config read: distribution caps manifests at 4 MiB, configs are far smaller.
const CONFIG_LIMIT: usize = 4 << 20;

/// The words of buildah 1.28's failure on an image without a matching history.
pub fn is_history_error(line: &str) -> bool {
    line.contains("history lists") && line.contains("layers on disk")
}

#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    history: Vec<HistoryEntry>,
    #[serde(default)]
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct HistoryEntry {
    #[serde(default)]
    empty_layer: bool,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Whether an image config's history names exactly its layers (what buildah's commit checks).
pub fn history_matches(config: &[u8]) -> bool {
    let Ok(c) = serde_json::from_slice::<Config>(config) else { return false };
    c.history.iter().filter(|h| !h.empty_layer).count() == c.rootfs.diff_ids.len()
}

/// The platform buildah builds for: the build node's.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The first of `images` (as written, and as the proxy's mirror serves it pinned) without a
/// history that matches its layers; one that cannot be read counts as having one.
pub async fn first_without(client: &Client, images: Vec<(String, Reference)>) -> Option<String> {
    for (image, mirrored) in images {
        match lacks_history(client, &mirrored).await {
            Ok(true) => return Some(image),
            Ok(false) => {}
            Err(why) => {
                tracing::debug!(%image, %why, "cannot read the image's history; building as if it had one")
            }
        }
    }
    None
}

/// Whether `image` (a proxy-local mirror reference pinned by digest) lacks a matching history;
/// `Err` when it cannot be read (then the build goes ahead as if it had one).
pub async fn lacks_history(client: &Client, image: &Reference) -> Result<bool, String> {
    let err = |e: crate::oci::client::Error| crate::oci::error::chain(&e);
    let mut m = client.manifest(image).await.map_err(err)?;
    let mut parsed = manifest::parse(&m.media_type, &m.bytes).map_err(|e| e.to_string())?;
    if let Parsed::Index { manifests } = &parsed {
        let child = manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == host_arch()))
            .or(manifests.first())
            .ok_or("an empty index")?;
        let r = Reference::with_digest(
            image.registry().to_string(),
            image.repository().to_string(),
            child.digest.clone(),
        );
        m = client.manifest(&r).await.map_err(err)?;
        parsed = manifest::parse(&m.media_type, &m.bytes).map_err(|e| e.to_string())?;
    }
    let Parsed::Image { config, .. } = parsed else { return Err("an index inside an index".into()) };
    let resp = client.blob(image.registry(), image.repository(), &config.digest).await.map_err(err)?;
    let mut bytes = Vec::new();
    let mut stream = resp;
    while let Some(chunk) = stream.chunk().await.map_err(|e| e.to_string())? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > CONFIG_LIMIT {
            return Err(format!("its config is larger than {CONFIG_LIMIT} bytes"));
        }
    }
    if manifest::sha256(&bytes) != config.digest {
        return Err("its config does not match its digest".into());
    }
    Ok(!history_matches(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_matches_when_it_names_every_layer() {
        let layers = r#""rootfs":{"type":"layers","diff_ids":["sha256:a","sha256:b"]}"#;
        let with = format!(
            r#"{{"history":[{{"created_by":"a"}},{{"empty_layer":true}},{{"created_by":"b"}}],{layers}}}"#
        );
        assert!(history_matches(with.as_bytes()));
        assert!(!history_matches(format!("{{{layers}}}").as_bytes()), "no history");
        let short = format!(r#"{{"history":[{{"created_by":"a"}}],{layers}}}"#);
        assert!(!history_matches(short.as_bytes()), "a squashed or partial history");
        assert!(history_matches(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#), "scratch");
        assert!(is_history_error(
            "Error: committing container for step {RUN x}: copying layers and metadata for container \"e\": \
             initializing source containers-storage:x: internal error: history lists 2 non-empty layers, but we have 3 layers on disk"
        ));
    }
}
