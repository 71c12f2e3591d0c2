//! `bob copy` against real registries (htpasswd and token auth): a two-platform index across
//! registries, a same-registry mount under token auth, a streamed Docker v2 image, and each
//! failure class with its exit code — including a hostile upstream serving a corrupt blob.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bob::oci::CredentialStore;
use bob::oci::copy::{CopyOptions, Progress, copy};
use common::*;
use futures::StreamExt;

fn bob_copy(src: &str, dst: &str, auth: Option<&std::path::Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bob"));
    c.args(["copy", src, dst]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c.env("HOME", "/nonexistent").env("RUST_LOG", "info");
    if let Some(a) = auth {
        c.arg("--auth-file").arg(a);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The same image with Docker v2 media types (a different manifest digest).
fn docker_image(img: &Image) -> (Vec<u8>, String) {
    let mut m: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    m["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
    m["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
    for l in m["layers"].as_array_mut().unwrap() {
        l["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
    }
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = digest_of(&bytes);
    (bytes, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_a_two_platform_index_across_registries_keeping_every_digest() {
    let src = Registry::start(RegistryAuth::Basic { user: "src", password: "src-pass-1" });
    let dst = Registry::start(RegistryAuth::Basic { user: "dst", password: "dst-pass-2" });
    let (amd, arm) = (small_image(10, "amd64"), small_image(20, "arm64"));
    let idx = index(&[(&amd, "amd64"), (&arm, "arm64")]);
    let src_creds = docker_config(&src.host, "src", "src-pass-1");
    let s = Direct::new(&src.host, Some(&src_creds));
    for img in [&amd, &arm] {
        s.push_image("app", &img.digest, img).await;
    }
    s.push_manifest("app", "v1", OCI_INDEX, &idx.bytes).await;

    let both = docker_config_for(&[(&src.host, "src", "src-pass-1"), (&dst.host, "dst", "dst-pass-2")]);
    let dir = tempfile::tempdir().unwrap();
    let auth = write_file(dir.path(), "config.json", &both);
    let out = bob_copy(&src.repo("app:v1"), &dst.repo("mirror/app:v1"), Some(&auth));
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("{}@{}", dst.repo("mirror/app:v1"), idx.digest));

    let d = Direct::new(&dst.host, Some(&docker_config(&dst.host, "dst", "dst-pass-2")));
    assert_eq!(d.manifest_digest("mirror/app", "v1").await, Some(idx.digest.clone()));
    for img in [&amd, &arm] {
        assert_eq!(d.manifest_digest("mirror/app", &img.digest).await, Some(img.digest.clone()));
        for b in img.layers.iter().chain([&img.config]) {
            assert!(d.blob_exists("mirror/app", &b.digest).await, "blob {} copied", b.digest);
        }
    }
    assert!(!stderr(&out).contains("src-pass-1") && !stderr(&out).contains(&b64("src:src-pass-1")));

    // A second run finds the destination up to date and still succeeds.
    let again = bob_copy(&src.repo("app:v1"), &dst.repo("mirror/app:v1"), Some(&auth));
    assert!(again.status.success() && stderr(&again).contains("up_to_date=true"), "{}", stderr(&again));
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn client(creds: &str) -> bob::oci::client::Client {
    init();
    let creds = CredentialStore::inline(creds).unwrap();
    bob::oci::client::Client::connect(creds, &[], std::time::Duration::from_secs(30), None).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn same_registry_copy_mounts_every_blob_under_token_auth() {
    let ts = TokenServer::start("carol", "tok-pass-3", 300).await;
    let reg = Registry::start(RegistryAuth::Token(&ts));
    let creds = docker_config(&reg.host, "carol", "tok-pass-3");
    let img =
        image(vec![pseudo_random(1, 300_000), pseudo_random(2, 200_000), pseudo_random(3, 1000)], "amd64");
    Direct::new(&reg.host, Some(&creds)).push_image("team/base", "k1", &img).await;

    let client = client(&creds);
    let progress = Arc::new(Progress::default());
    let (src, dst) = (reg.repo("team/base:k1").parse().unwrap(), reg.repo("team/ws:w1").parse().unwrap());
    let r = copy(&client, &src, &dst, &CopyOptions::default(), &progress).await.unwrap();
    assert_eq!(r.digest, img.digest);
    assert_eq!(
        (r.blobs, r.mounted, r.skipped, r.bytes),
        (4, 4, 0, 0),
        "all mounted, nothing streamed: {r:?}"
    );
    let d = Direct::new(&reg.host, Some(&creds));
    assert_eq!(d.manifest_digest("team/ws", "w1").await, Some(img.digest.clone()));
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_registry_copy_streams_a_docker_v2_image_and_skips_what_exists() {
    let a = Registry::start(RegistryAuth::None);
    let b = Registry::start(RegistryAuth::None);
    let img = image((0..4).map(|i| pseudo_random(40 + i, 2 << 20)).collect(), "amd64");
    let (manifest, digest) = docker_image(&img);
    let s = Direct::new(&a.host, None);
    s.push_image("src", "oci", &img).await;
    s.push_manifest("src", "docker", "application/vnd.docker.distribution.manifest.v2+json", &manifest).await;
    // One layer is already at the destination.
    Direct::new(&b.host, None).push_blob("dst", &img.layers[0]).await;

    let client = client("{}");
    let progress = Arc::new(Progress::default());
    let (src, dst) = (a.repo("src:docker").parse().unwrap(), b.repo("dst:d").parse().unwrap());
    let r = copy(&client, &src, &dst, &CopyOptions { jobs: 2 }, &progress).await.unwrap();
    let streamed: u64 =
        img.layers[1..].iter().map(|l| l.bytes.len() as u64).sum::<u64>() + img.config.bytes.len() as u64;
    assert_eq!((r.digest.as_str(), r.skipped, r.mounted, r.bytes), (digest.as_str(), 1, 0, streamed));
    assert_eq!(r.media_type, "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(Direct::new(&b.host, None).manifest_digest("dst", "d").await, Some(digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_have_their_own_exit_codes_and_one_line() {
    let reg = Registry::start(RegistryAuth::Basic { user: "u", password: "right-pass" });
    let dir = tempfile::tempdir().unwrap();
    let good = write_file(dir.path(), "good.json", &docker_config(&reg.host, "u", "right-pass"));
    let bad = write_file(dir.path(), "bad.json", &docker_config(&reg.host, "u", "wrong-pass"));
    Direct::new(&reg.host, Some(&docker_config(&reg.host, "u", "right-pass")))
        .push_image("x", "t", &small_image(5, "amd64"))
        .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cases = [
        (bob_copy(&reg.repo("x:missing"), &reg.repo("y:t"), Some(&good)), 3, "not found"),
        (bob_copy(&reg.repo("x:t"), &reg.repo("y:t"), Some(&bad)), 4, "unauthorized"),
        (bob_copy(&format!("{closed}/x:t"), &reg.repo("y:t"), Some(&good)), 7, "is unreachable"),
        (bob_copy("Not A Ref", &reg.repo("y:t"), Some(&good)), 1, "invalid image reference"),
    ];
    for (out, code, needle) in cases {
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{needle}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("bob: ") && last.contains(needle), "{needle:?} not in {last:?}");
    }
}

/// A registry that serves one image whose layer bytes do not match their digest, and a schema-1
/// manifest; it accepts uploads so that only bob's own verification can catch the corruption.
async fn hostile(req: Request) -> Response {
    let layer = pseudo_random(77, 10_000);
    let img = image(vec![layer.clone()], "amd64");
    let path = req.uri().path().to_string();
    let ok = |ct: &str, body: Vec<u8>| ([("content-type", ct.to_string())], body).into_response();
    match path.as_str() {
        "/v2/" => ok("application/json", b"{}".to_vec()),
        "/v2/evil/manifests/t" => ok(OCI_MANIFEST, img.manifest.clone()),
        "/v2/old/manifests/t" => {
            ok("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}".to_vec())
        }
        p if p == format!("/v2/evil/blobs/{}", img.config.digest) => {
            ok("application/octet-stream", img.config.bytes)
        }
        p if p.starts_with("/v2/evil/blobs/") => {
            let mut bytes = layer;
            bytes[5000] ^= 0xff;
            ok("application/octet-stream", bytes)
        }
        _ => {
            (axum::http::StatusCode::NOT_FOUND, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#)
                .into_response()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_from_a_hostile_upstream_is_caught_and_never_committed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(hostile)).await.unwrap();
    });
    let dst = Registry::start(RegistryAuth::None);
    let (src, dst_ref) = (format!("{evil}/evil:t"), dst.repo("victim:t"));
    let out = tokio::task::spawn_blocking(move || bob_copy(&src, &dst_ref, None)).await.unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("digest mismatch"), "{}", stderr(&out));
    let img = image(vec![pseudo_random(77, 10_000)], "amd64");
    let d = Direct::new(&dst.host, None);
    assert!(!d.blob_exists("victim", &img.layers[0].digest).await, "the corrupt layer was not committed");
    assert_eq!(d.manifest_digest("victim", "t").await, None);
    assert_eq!(dst.open_uploads(), Vec::<std::path::PathBuf>::new(), "the failed upload was cancelled");

    let src = format!("{evil}/old:t");
    let dst_ref = dst.repo("victim:old");
    let out = tokio::task::spawn_blocking(move || bob_copy(&src, &dst_ref, None)).await.unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("unsupported manifest media type"), "{}", stderr(&out));
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_proxy_across_registries_a_refused_mount_streams_or_skips_existing_blobs() {
    let a = Registry::start(RegistryAuth::Basic { user: "a", password: "a-pass-9" });
    let b = Registry::start(RegistryAuth::Basic { user: "b", password: "b-pass-8" });
    let both = docker_config_for(&[(&a.host, "a", "a-pass-9"), (&b.host, "b", "b-pass-8")]);
    let img = image(vec![pseudo_random(61, 100_000), pseudo_random(62, 50_000)], "amd64");
    Direct::new(&a.host, Some(&docker_config(&a.host, "a", "a-pass-9"))).push_image("base", "k", &img).await;
    let target = Direct::new(&b.host, Some(&docker_config(&b.host, "b", "b-pass-8")));
    target.push_blob("ws", &img.layers[0]).await;
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &a.repo("base:k")),
        ("BOB_PROXY_TARGET_REF", &b.repo("ws:w")),
        ("BOB_AUTH", &both),
    ]);

    // Phase 2's copy: no credentials, both sides through the proxy, which answers the mount of
    // a base blob into the target (another registry) with a plain upload.
    let client = client("{}");
    let (src, dst) = (format!("{}/base:latest", proxy.addr), format!("{}/target:latest", proxy.addr));
    let r = copy(
        &client,
        &src.parse().unwrap(),
        &dst.parse().unwrap(),
        &CopyOptions::default(),
        &Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    let streamed = (img.layers[1].bytes.len() + img.config.bytes.len()) as u64;
    assert_eq!((r.skipped, r.mounted, r.bytes), (1, 0, streamed), "{r:?}");
    assert_eq!(target.manifest_digest("ws", "w").await, Some(img.digest.clone()));
}

/// A source whose layers stream slowly except one that is missing: the copy fails while other
/// blobs are in flight, with their uploads open at the destination.
async fn half_broken(req: Request) -> Response {
    let img = broken_image();
    let path = req.uri().path().to_string();
    let missing = format!("/v2/app/blobs/{}", img.layers[0].digest);
    if path == "/v2/" {
        return "{}".into_response();
    }
    if path == "/v2/app/manifests/t" {
        return ([("content-type", OCI_MANIFEST)], img.manifest).into_response();
    }
    if path == missing {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        return (
            axum::http::StatusCode::NOT_FOUND,
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}"#,
        )
            .into_response();
    }
    let blob = img.layers.iter().chain([&img.config]).find(|b| path.ends_with(&b.digest)).cloned();
    match blob {
        Some(b) => {
            // Half now, the rest much later: the copy is mid-blob when the missing one fails.
            let (first, rest) = b.bytes.split_at(b.bytes.len() / 2);
            let (first, rest) = (bytes::Bytes::copy_from_slice(first), bytes::Bytes::copy_from_slice(rest));
            let body = futures::stream::iter([Ok::<_, std::io::Error>(first)]).chain(futures::stream::once(
                async move {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    Ok(rest)
                },
            ));
            let len = b.bytes.len().to_string();
            ([("content-length", len)], axum::body::Body::from_stream(body)).into_response()
        }
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

fn broken_image() -> Image {
    image((0..4).map(|i| pseudo_random(90 + i, 200_000)).collect(), "amd64")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_copy_leaves_no_upload_open_at_the_destination() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let src = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(half_broken)).await.unwrap();
    });
    let dst = Registry::start(RegistryAuth::None);
    let (s, d) = (format!("{src}/app:t"), dst.repo("app:t"));
    let out = tokio::task::spawn_blocking(move || bob_copy(&s, &d, None)).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(dst.open_uploads(), Vec::<std::path::PathBuf>::new(), "uploads left open");
    server.abort();
}

/// Serves a chain of `levels` indexes, each naming the next, ending in an image.
fn index_chain(levels: usize) -> (std::collections::HashMap<String, (String, Vec<u8>)>, String) {
    let img = small_image(99, "amd64");
    let mut manifests = std::collections::HashMap::new();
    manifests.insert(img.digest.clone(), (OCI_MANIFEST.to_string(), img.manifest.clone()));
    let (mut digest, mut size, mut media) = (img.digest.clone(), img.manifest.len(), OCI_MANIFEST);
    for _ in 0..levels {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": media, "digest": digest, "size": size}],
        }))
        .unwrap();
        (digest, size, media) = (digest_of(&bytes), bytes.len(), OCI_INDEX);
        manifests.insert(digest.clone(), (OCI_INDEX.to_string(), bytes));
    }
    let blobs = [&img.config].into_iter().chain(&img.layers);
    for b in blobs {
        manifests.insert(b.digest.clone(), ("application/octet-stream".into(), b.bytes.clone()));
    }
    (manifests, digest)
}

async fn serve_chain(levels: usize) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (objects, root) = index_chain(levels);
    let objects = Arc::new(objects);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (objects, root) = (objects.clone(), root.clone());
        async move {
            let path = req.uri().path();
            let key = if path.ends_with("/manifests/t") {
                root
            } else {
                path.rsplit('/').next().unwrap().to_string()
            };
            match objects.get(&key) {
                _ if path == "/v2/" => "{}".into_response(),
                Some((ct, bytes)) => ([("content-type", ct.clone())], bytes.clone()).into_response(),
                None => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_indexes_are_followed_to_a_bounded_depth() {
    let dst = Registry::start(RegistryAuth::None);
    let (ok_src, ok_server) = serve_chain(bob::oci::copy::MAX_INDEX_DEPTH).await;
    let (s, d) = (format!("{ok_src}/deep:t"), dst.repo("deep:ok"));
    let out = tokio::task::spawn_blocking(move || bob_copy(&s, &d, None)).await.unwrap();
    assert!(
        out.status.success(),
        "{} nested indexes are copied: {}",
        bob::oci::copy::MAX_INDEX_DEPTH,
        stderr(&out)
    );

    let (src, server) = serve_chain(1000).await;
    let (s, d) = (format!("{src}/deep:t"), dst.repo("deep:t"));
    let out = tokio::task::spawn_blocking(move || bob_copy(&s, &d, None)).await.unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(8), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("nests indexes more than 8 deep"), "{err}");
    assert_eq!(Direct::new(&dst.host, None).manifest_digest("deep", "t").await, None);
    server.abort();
    ok_server.abort();
}
