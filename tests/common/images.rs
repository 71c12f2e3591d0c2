//! Small OCI images made in memory (no internet), pushed straight to a registry or written as an
//! OCI layout for skopeo; and a direct registry client for reading results back.

use std::path::Path;
use std::sync::Arc;

use bob::oci::token::{Authenticator, repository_scope};
use bob::oci::{CredentialStore, Endpoints};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// `sha256:<hex>` of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    format!("sha256:{}", sum.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Deterministic pseudo-random bytes (xorshift), so layers differ per seed without an RNG crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob with its digest.
#[derive(Clone)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(bytes: Vec<u8>) -> Self {
        Blob { digest: digest_of(&bytes), bytes }
    }
}

/// An image manifest with its config and layers.
#[derive(Clone)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

/// An OCI image for `arch` with the given layers and no build history (as tools other than
/// Dockerfile builders make them).
pub fn image(layers: Vec<Vec<u8>>, arch: &str) -> Image {
    image_of(layers, arch, false)
}

/// An OCI image for `arch` with the given layers and a history entry per layer (as Dockerfile
/// builders make them).
pub fn image_with_history(layers: Vec<Vec<u8>>, arch: &str) -> Image {
    image_of(layers, arch, true)
}

fn image_of(layers: Vec<Vec<u8>>, arch: &str, history: bool) -> Image {
    let layers: Vec<Blob> = layers.into_iter().map(Blob::new).collect();
    let mut config = json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
    });
    if history {
        let entries: Vec<_> = (0..layers.len())
            .map(|i| json!({"created": "1970-01-01T00:00:00Z", "created_by": format!("layer {i}")}))
            .collect();
        config["history"] = json!(entries);
    }
    let config = Blob::new(serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.bytes.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": OCI_LAYER, "digest": l.digest, "size": l.bytes.len()})).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    Image { digest: digest_of(&manifest), config, layers, manifest }
}

/// A small single-layer image whose content depends on `seed`.
pub fn small_image(seed: u64, arch: &str) -> Image {
    image(vec![pseudo_random(seed, 4096), pseudo_random(seed + 1000, 1024)], arch)
}

/// An OCI index over images (platform from each image's config).
pub fn index(images: &[(&Image, &str)]) -> Blob {
    let manifests: Vec<_> = images
        .iter()
        .map(|(img, arch)| {
            json!({"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len(),
                   "platform": {"architecture": arch, "os": "linux"}})
        })
        .collect();
    Blob::new(
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
            .unwrap(),
    )
}

/// Writes an OCI image layout holding `image` under `tag` (for `skopeo copy oci:<dir>:<tag>`).
pub fn write_layout(dir: &Path, tag: &str, images: &[&Image], index_blob: Option<&Blob>) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| std::fs::write(blobs.join(&digest_of(b)[7..]), b).unwrap();
    for img in images {
        put(&img.config.bytes);
        put(&img.manifest);
        for l in &img.layers {
            put(&l.bytes);
        }
    }
    let top = match index_blob {
        Some(ix) => {
            put(&ix.bytes);
            json!({"mediaType": OCI_INDEX, "digest": ix.digest, "size": ix.bytes.len()})
        }
        None => {
            json!({"mediaType": OCI_MANIFEST, "digest": images[0].digest, "size": images[0].manifest.len()})
        }
    };
    let mut top = top;
    top["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("index.json"), json!({"schemaVersion": 2, "manifests": [top]}).to_string())
        .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A direct client for a test registry (fixtures in, results out), bypassing the proxy.
pub struct Direct {
    pub host: String,
    http: reqwest::Client,
    auth: Authenticator,
}

impl Direct {
    /// A client for `host` with an optional docker config JSON.
    pub fn new(host: &str, docker_config: Option<&str>) -> Self {
        super::init();
        let creds = match docker_config {
            Some(json) => CredentialStore::inline(json).unwrap(),
            None => CredentialStore::anonymous(),
        };
        let http = reqwest::Client::new();
        let auth = Authenticator::new(http.clone(), Arc::new(creds), Endpoints::default());
        Direct { host: host.to_string(), http, auth }
    }

    async fn req(
        &self,
        method: reqwest::Method,
        repo: &str,
        path: &str,
        push: bool,
    ) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("http://{}/v2/{repo}/{path}", self.host)
        };
        let mut r = self.http.request(method, url);
        if let Some(h) = self.auth.authorization(&self.host, &[repository_scope(repo, push)]).await.unwrap() {
            r = r.header("authorization", h);
        }
        r
    }

    /// Pushes a blob (monolithic POST + PUT) unless it exists.
    pub async fn push_blob(&self, repo: &str, blob: &Blob) {
        if self.blob_exists(repo, &blob.digest).await {
            return;
        }
        let r = self.req(reqwest::Method::POST, repo, "blobs/uploads/", true).await.send().await.unwrap();
        assert_eq!(r.status(), 202, "upload start on {repo}");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let loc = if loc.starts_with('/') { format!("http://{}{loc}", self.host) } else { loc };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let url = format!("{loc}{sep}digest={}", blob.digest);
        let r = self
            .req(reqwest::Method::PUT, repo, &url, true)
            .await
            .body(blob.bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "blob put on {repo}: {}", r.text().await.unwrap_or_default());
    }

    /// Pushes a manifest under a tag or digest.
    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let r = self
            .req(reqwest::Method::PUT, repo, &format!("manifests/{reference}"), true)
            .await
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "manifest put on {repo}: {}", r.text().await.unwrap_or_default());
    }

    /// Pushes an image with its blobs under `tag`.
    pub async fn push_image(&self, repo: &str, tag: &str, img: &Image) {
        self.push_blob(repo, &img.config).await;
        for l in &img.layers {
            self.push_blob(repo, l).await;
        }
        self.push_manifest(repo, tag, OCI_MANIFEST, &img.manifest).await;
    }

    /// The digest a reference resolves to, if it exists.
    pub async fn manifest_digest(&self, repo: &str, reference: &str) -> Option<String> {
        let r = self
            .req(reqwest::Method::HEAD, repo, &format!("manifests/{reference}"), false)
            .await
            .header("accept", ACCEPT_ALL)
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            return None;
        }
        assert_eq!(r.status(), 200, "HEAD manifest {repo}:{reference}");
        Some(r.headers()["docker-content-digest"].to_str().unwrap().to_string())
    }

    /// Whether a blob exists.
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> bool {
        let r = self
            .req(reqwest::Method::HEAD, repo, &format!("blobs/{digest}"), false)
            .await
            .send()
            .await
            .unwrap();
        r.status() == 200
    }

    /// A manifest's bytes.
    pub async fn manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        let r = self
            .req(reqwest::Method::GET, repo, &format!("manifests/{reference}"), false)
            .await
            .header("accept", ACCEPT_ALL)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET manifest {repo}:{reference}");
        r.bytes().await.unwrap().to_vec()
    }

    /// A blob's bytes.
    pub async fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = self
            .req(reqwest::Method::GET, repo, &format!("blobs/{digest}"), false)
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET blob {repo}@{digest}");
        r.bytes().await.unwrap().to_vec()
    }
}
