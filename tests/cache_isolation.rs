//! The layer cache's trust boundary end to end (issue 21), with `bob run`, real buildah, a real
//! registry and `bob proxy`: a step planted in one scope through the proxy's `cache` alias — as
//! any `RUN` step of a build in that scope can — decides that scope's images and never another
//! scope's. The victim's build of the same Dockerfile in a clean scope runs its Dockerfile and
//! its image holds what its steps wrote.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use bob::controller::cache_scope::{ScopeOrigin, scope_component};
use common::build::*;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NAMESPACE: &str = "users";
const PLANTED: &str = "PWNED by mallory\n";

fn dockerfile(fx: &Fixture) -> String {
    format!("FROM {}\nRUN echo slow-step > /slow.txt\n", fx.from)
}

/// ImageBuild `name` of `dockerfile` in scope `scope` (cache below `<reg>/cache`), pushing to the
/// repositories `<reg>/<prefix>base` and `<reg>/<prefix>workspace`, with the registry Secret.
fn imagebuild(fx: &Fixture, name: &str, scope: &str, prefix: &str) -> String {
    let ib = json!({
        "apiVersion": "bob.dev/v1alpha1", "kind": "ImageBuild",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"dockerfile": {"inline": dockerfile(fx)}},
            "baseImageRepository": fx.reg.repo(&format!("{prefix}base")),
            "workspaceImageRepository": fx.reg.repo(&format!("{prefix}workspace")),
            "registryAuth": {"secretRef": {"name": "reg"}},
            "layerCache": {"repository": fx.reg.repo("cache"), "scope": scope},
        }
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "reg", "namespace": NAMESPACE},
        "stringData": {".dockerconfigjson": fx.creds},
    });
    format!("{ib}\n---\n{secret}\n")
}

/// `bob run -f` on `yaml`; the output and the printed status.
fn bob_run(dir: &Path, name: &str, yaml: &str) -> (Output, Value) {
    let file = write_file(dir, &format!("{name}.yaml"), yaml);
    let out = Command::new(env!("CARGO_BIN_EXE_bob"))
        .args(["run", "-f"])
        .arg(&file)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let doc: Value = serde_saphyr::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("status YAML: {e}\n{}\n{}", text(&out.stdout), text(&out.stderr)));
    assert!(out.status.success(), "{:#}\n{}", doc["status"], text(&out.stderr));
    (out, doc["status"].clone())
}

/// `/slow.txt` of the workspace image a status names.
async fn slow_txt(fx: &Fixture, status: &Value) -> Option<String> {
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let r = status["output"]["ref"].as_str().unwrap();
    let (repo, tag) = r[fx.reg.host.len() + 1..].rsplit_once(':').unwrap();
    let manifest: Value = serde_json::from_slice(&d.manifest(repo, tag).await).unwrap();
    file_in_image(&d, repo, &manifest, "slow.txt").await
}

/// A gzip layer holding `slow.txt` with `content`, and its diff id.
fn planted_layer(content: &str) -> (Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.txt"), content).unwrap();
    let out = Command::new("tar")
        .args(["--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir.path())
        .args(["-cf", "-", "slow.txt"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let diff_id = format!("sha256:{}", hex(&out.stdout));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&out.stdout).unwrap();
    (gz.finish().unwrap(), diff_id)
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Replaces the cached `RUN echo slow-step` step of scope `scope`'s cache with one whose layer
/// writes [`PLANTED`], keeping its history, as a `RUN` step of mallory's could: every write goes
/// through `bob proxy`'s `cache` alias with no credentials on this side. The step keys are read
/// from the registry (an attacker computes them as buildah does). Returns the keys replaced.
async fn plant(fx: &Fixture, scope: &str) -> usize {
    let cache = fx.reg.repo(&format!("cache/{NAMESPACE}/{}", scope_component(ScopeOrigin::Spec, scope)));
    let cache_path = &cache[fx.reg.host.len() + 1..];
    let d = Direct::new(&fx.reg.host, Some(&fx.creds));
    let tags: Value = {
        let url = format!("http://{}/v2/{cache_path}/tags/list", fx.reg.host);
        let (user, pass) = ("builder", PASSWORD);
        let r = reqwest::Client::new().get(url).basic_auth(user, Some(pass)).send().await.unwrap();
        r.json().await.unwrap()
    };
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &fx.reg.repo("unused-base:x")),
        ("BOB_PROXY_TARGET_REF", &fx.reg.repo("unused-ws:x")),
        ("BOB_AUTH", &fx.creds),
        ("BOB_PROXY_CACHE_REPOSITORY", &cache),
    ]);
    let via_proxy = Direct::new(&proxy.addr, None);
    let mut replaced = 0;
    for tag in tags["tags"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let mut manifest: Value = serde_json::from_slice(&d.manifest(cache_path, tag).await).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
        let mut config: Value = serde_json::from_slice(&d.blob(cache_path, &config_digest).await).unwrap();
        let last_step = config["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
        if !last_step["created_by"].as_str().unwrap_or_default().contains("slow-step") {
            continue;
        }
        let (layer, diff_id) = planted_layer(PLANTED);
        let layer = Blob::new(layer);
        via_proxy.push_blob("cache", &layer).await;
        let diff_ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
        *diff_ids.last_mut().unwrap() = json!(diff_id);
        let config = Blob::new(serde_json::to_vec(&config).unwrap());
        via_proxy.push_blob("cache", &config).await;
        let layers = manifest["layers"].as_array_mut().unwrap();
        let last = layers.last_mut().unwrap();
        last["digest"] = json!(layer.digest);
        last["size"] = json!(layer.bytes.len());
        manifest["config"]["digest"] = json!(config.digest);
        manifest["config"]["size"] = json!(config.bytes.len());
        let media_type = manifest["mediaType"].as_str().unwrap().to_string();
        via_proxy.push_manifest("cache", tag, &media_type, &serde_json::to_vec(&manifest).unwrap()).await;
        replaced += 1;
    }
    replaced
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_planted_in_one_scope_never_decides_another_scopes_image() {
    let fx = Fixture::new().await;
    let dir = fx.dir.path();
    // Mallory builds the victim's Dockerfile once in her own scope (into repositories of her own),
    // which fills her scope with the steps' keys, then plants her step under its key.
    bob_run(dir, "prepare", &imagebuild(&fx, "prepare", "mallory", "scratch-"));
    assert_eq!(plant(&fx, "mallory").await, 1, "the RUN step's cached image was found and replaced");

    // Her own build of it in her scope takes the planted step: a scope is one trust domain.
    let (_, mallory) = bob_run(dir, "mallory", &imagebuild(&fx, "mallory", "mallory", ""));
    assert_eq!(mallory["reason"], "Built", "{mallory:#}");
    assert_eq!(slow_txt(&fx, &mallory).await.as_deref(), Some(PLANTED), "the planted step was used");

    // Alice's build of the same Dockerfile in her clean scope is not a hit on mallory's image: it
    // runs the Dockerfile, and her image holds what her step wrote.
    let (out, alice) = bob_run(dir, "alice", &imagebuild(&fx, "alice", "alice", ""));
    assert_eq!(
        (alice["reason"].as_str(), alice["cacheHit"].as_bool()),
        (Some("Built"), Some(false)),
        "{alice:#}"
    );
    assert_ne!(alice["cacheKey"], mallory["cacheKey"]);
    assert_ne!(alice["output"]["ref"], mallory["output"]["ref"]);
    assert_ne!(alice["baseImage"]["ref"], mallory["baseImage"]["ref"]);
    assert_eq!(slow_txt(&fx, &alice).await.as_deref(), Some("slow-step\n"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("slow-step"), "alice's RUN step ran:\n{}", text(&out.stderr));
}
