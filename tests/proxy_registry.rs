//! `bob proxy` against the real registry (basic and token auth) with real clients (skopeo):
//! pushes without client credentials, indexes, mounts, the mirror route, logs without secrets,
//! token expiry and Secret rotation.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn skopeo() -> Command {
    require("skopeo", "skopeo");
    let mut c = Command::new("skopeo");
    // No credentials on the client side: prove the proxy alone holds them.
    c.env("REGISTRY_AUTH_FILE", "/nonexistent/auth.json").env_remove("DOCKER_CONFIG");
    c
}

fn skopeo_copy(src: &str, dst: &str, all: bool) {
    let mut c = skopeo();
    c.args([
        "copy",
        "-q",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-no-creds",
        "--dest-no-creds",
    ]);
    if all {
        c.arg("--all");
    }
    run_ok(c.args([src, dst]));
}

/// Pushes an OCI layout through the proxy to `target` and checks the digest at the planned tag.
async fn push_through_proxy(reg: &Registry, creds: &str) -> ProxyProc {
    let target = reg.repo("workspace:planned");
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &target), ("BOB_AUTH", creds)]);
    let img = small_image(1, "amd64");
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "latest", &[&img], None);
    let src = format!("oci:{}:latest", dir.path().display());
    skopeo_copy(&src, &format!("docker://{}/target:whatever", proxy.addr), false);
    let direct = Direct::new(&reg.host, Some(creds));
    assert_eq!(direct.manifest_digest("workspace", "planned").await, Some(img.digest.clone()));
    assert_eq!(
        direct.manifest_digest("workspace", "whatever").await,
        None,
        "the tag is forced to the planned one"
    );
    proxy
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_through_proxy_to_basic_auth_registry_without_client_credentials() {
    let reg = Registry::start(RegistryAuth::Basic { user: "alice", password: "basic-pass-7f3a" });
    let creds = docker_config(&reg.host, "alice", "basic-pass-7f3a");
    // Without the proxy, the same anonymous push is refused.
    let img = small_image(2, "amd64");
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "latest", &[&img], None);
    let out = skopeo()
        .args(["copy", "-q", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg(format!("oci:{}:latest", dir.path().display()))
        .arg(format!("docker://{}/workspace:direct", reg.host))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the registry must require credentials");
    let proxy = push_through_proxy(&reg, &creds).await;
    let log = proxy.proc.output();
    assert!(!log.contains("basic-pass-7f3a"), "password in proxy log");
    assert!(!log.contains(&creds[30..50]), "encoded credentials in proxy log");
    assert!(log.contains("bob::access"), "one access-log line per request:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pushes_through_proxy_to_token_auth_registry_and_no_token_is_logged() {
    let ts = TokenServer::start("bob", "token-pass-91c2", 300).await;
    let reg = Registry::start(RegistryAuth::Token(&ts));
    let creds = docker_config(&reg.host, "bob", "token-pass-91c2");
    let proxy = push_through_proxy(&reg, &creds).await;
    let log = proxy.proc.output();
    assert!(!log.contains("token-pass-91c2"));
    let issued = ts.issued();
    assert!(!issued.is_empty(), "the proxy used the token server");
    for t in issued {
        // the signature part is unique per token
        assert!(!log.contains(t.rsplit('.').next().unwrap()), "a token reached the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_tokens_are_exchanged_at_the_token_endpoint() {
    let ts = TokenServer::start("bob", "pw-identity", 300).await;
    let reg = Registry::start(RegistryAuth::Token(&ts));
    let creds = format!(r#"{{"auths":{{"{}":{{"identitytoken":"{}"}}}}}}"#, reg.host, ts.refresh_token());
    push_through_proxy(&reg, &creds).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_a_two_platform_index_through_the_proxy() {
    let reg = Registry::start(RegistryAuth::Basic { user: "u", password: "index-pass" });
    let creds = docker_config(&reg.host, "u", "index-pass");
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("ws:planned")), ("BOB_AUTH", &creds)]);
    let (amd, arm) = (small_image(10, "amd64"), small_image(11, "arm64"));
    let ix = index(&[(&amd, "amd64"), (&arm, "arm64")]);
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "latest", &[&amd, &arm], Some(&ix));
    skopeo_copy(
        &format!("oci:{}:latest", dir.path().display()),
        &format!("docker://{}/target:x", proxy.addr),
        true,
    );
    let direct = Direct::new(&reg.host, Some(&creds));
    assert_eq!(direct.manifest_digest("ws", "planned").await, Some(ix.digest.clone()));
    for child in [&amd, &arm] {
        assert_eq!(direct.manifest_digest("ws", &child.digest).await, Some(child.digest.clone()));
    }
}

/// skopeo copies `base` to `target`, both through the proxy.
fn copy_base_to_target(proxy: &ProxyProc) {
    skopeo_copy(
        &format!("docker://{}/base:x", proxy.addr),
        &format!("docker://{}/target:y", proxy.addr),
        false,
    );
}

async fn raw_mount(proxy: &ProxyProc, digest: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v2/target/blobs/uploads/?mount={digest}&from=base", proxy.url()))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn same_registry_mount_is_rewritten_to_the_real_repository() {
    let ts = TokenServer::start("m", "mount-pass", 300).await;
    let reg = Registry::start(RegistryAuth::Token(&ts));
    let creds = docker_config(&reg.host, "m", "mount-pass");
    let direct = Direct::new(&reg.host, Some(&creds));
    let img = small_image(20, "amd64");
    direct.push_image("base-images", "key1", &img).await;
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &reg.repo("base-images:key1")),
        ("BOB_PROXY_TARGET_REF", &reg.repo("workspace-images:ws1")),
        ("BOB_AUTH", &creds),
    ]);
    let layer = &img.layers[0].digest;
    let r = raw_mount(&proxy, layer).await;
    assert_eq!(r.status(), 201, "mount through the proxy: {:?}", r.text().await);
    assert_eq!(r.headers()["location"], format!("/v2/target/blobs/{layer}").as_str());
    assert!(direct.blob_exists("workspace-images", layer).await);
    // A whole copy base -> target with skopeo lands at the planned tag with the same digest.
    copy_base_to_target(&proxy);
    assert_eq!(direct.manifest_digest("workspace-images", "ws1").await, Some(img.digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_registry_mount_falls_back_to_a_plain_upload() {
    let a = Registry::start(RegistryAuth::Basic { user: "a", password: "pass-a" });
    let b = Registry::start(RegistryAuth::Basic { user: "b", password: "pass-b" });
    let creds = format!(
        r#"{{"auths":{{"{}":{{"username":"a","password":"pass-a"}},"{}":{{"username":"b","password":"pass-b"}}}}}}"#,
        a.host, b.host
    );
    let img = small_image(30, "amd64");
    Direct::new(&a.host, Some(&creds)).push_image("base", "k", &img).await;
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &a.repo("base:k")),
        ("BOB_PROXY_TARGET_REF", &b.repo("ws:t")),
        ("BOB_AUTH", &creds),
    ]);
    let layer = &img.layers[0];
    let r = raw_mount(&proxy, &layer.digest).await;
    assert_eq!(r.status(), 202, "no mount across registries: a plain upload is opened");
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with("/v2/target/blobs/uploads/"), "{loc}");
    let put = reqwest::Client::new()
        .put(format!("{}{loc}?digest={}", proxy.url(), layer.digest))
        .body(layer.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let direct_b = Direct::new(&b.host, Some(&creds));
    assert!(direct_b.blob_exists("ws", &layer.digest).await);
    copy_base_to_target(&proxy);
    assert_eq!(direct_b.manifest_digest("ws", "t").await, Some(img.digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_serves_declared_references_with_credentials_and_nothing_else() {
    let reg = Registry::start(RegistryAuth::Basic { user: "m", password: "mirror-pass" });
    let creds = docker_config(&reg.host, "m", "mirror-pass");
    let direct = Direct::new(&reg.host, Some(&creds));
    let (tools, other) = (small_image(40, "amd64"), small_image(41, "amd64"));
    direct.push_image("tools", "1.0", &tools).await;
    direct.push_image("tools", "2.0", &other).await;
    direct.push_image("secret", "1.0", &other).await;
    let proxy = ProxyProc::start(&[("BOB_PROXY_MIRROR_REFS", &reg.repo("tools:1.0")), ("BOB_AUTH", &creds)]);
    let m = format!("{}/v2/mirror/{}", proxy.url(), reg.host.replace(':', "__"));
    let http = reqwest::Client::new();
    let get = |url: String| http.get(url).header("accept", ACCEPT_ALL).send();
    let r = get(format!("{m}/tools/manifests/1.0")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], tools.digest.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), tools.manifest.as_slice());
    for blob in std::iter::once(&tools.config).chain(&tools.layers) {
        let body = get(format!("{m}/tools/blobs/{}", blob.digest)).await.unwrap().bytes().await.unwrap();
        assert_eq!(digest_of(&body), blob.digest);
    }
    // skopeo reads it through the mirror route with no credentials
    let out = tempfile::tempdir().unwrap();
    let mirror_ref = format!("docker://{}/mirror/{}/tools:1.0", proxy.addr, reg.host.replace(':', "__"));
    skopeo_copy(&mirror_ref, &format!("oci:{}:x", out.path().display()), false);
    // Anything else is refused with the registry's error format.
    let refused = [
        (format!("{m}/tools/manifests/2.0"), 403),
        (format!("{m}/tools/manifests/{}", other.digest), 403),
        (format!("{m}/tools/blobs/{}", other.layers[0].digest), 403),
        (format!("{m}/secret/manifests/1.0"), 403),
    ];
    for (url, status) in refused {
        let r = get(url.clone()).await.unwrap();
        assert_eq!(r.status(), status, "{url}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED", "{url}");
    }
    let put = http.put(format!("{m}/tools/manifests/1.0")).body("{}").send().await.unwrap();
    assert_eq!(put.status(), 405);
    let post = http.post(format!("{m}/tools/blobs/uploads/")).send().await.unwrap();
    assert_eq!(post.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_refetched_after_they_expire() {
    let ts = TokenServer::start("e", "expiry-pass", 2).await;
    let reg = Registry::start(RegistryAuth::Token(&ts));
    let creds = docker_config(&reg.host, "e", "expiry-pass");
    let img = small_image(50, "amd64");
    Direct::new(&reg.host, Some(&creds)).push_image("ws", "t", &img).await;
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")), ("BOB_AUTH", &creds)]);
    let head = || {
        reqwest::Client::new()
            .head(format!("{}/v2/target/manifests/latest", proxy.url()))
            .header("accept", ACCEPT_ALL)
            .send()
    };
    assert_eq!(head().await.unwrap().status(), 200);
    let before = ts.requests();
    assert_eq!(head().await.unwrap().status(), 200);
    assert_eq!(ts.requests(), before, "a fresh token is reused");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(head().await.unwrap().status(), 200);
    assert!(ts.requests() > before, "an expired token is replaced");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_secret_file_is_picked_up_without_restart() {
    let reg = Registry::start(RegistryAuth::Basic { user: "r", password: "right-pass" });
    let good = docker_config(&reg.host, "r", "right-pass");
    let img = small_image(60, "amd64");
    Direct::new(&reg.host, Some(&good)).push_image("ws", "t", &img).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "config.json", &docker_config(&reg.host, "r", "stale-pass"));
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")),
        ("BOB_AUTH_FILE", file.to_str().unwrap()),
    ]);
    let head = || {
        reqwest::Client::new()
            .head(format!("{}/v2/target/manifests/latest", proxy.url()))
            .header("accept", ACCEPT_ALL)
            .send()
    };
    assert_eq!(head().await.unwrap().status(), 401, "stale credentials are refused upstream");
    // Kubernetes updates a Secret volume by swapping in a new file.
    let new = write_file(dir.path(), "new.json", &good);
    std::fs::rename(new, &file).unwrap();
    assert_eq!(head().await.unwrap().status(), 200, "rotated credentials are used");
    assert!(!proxy.proc.output().contains("right-pass"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_shows_only_the_planned_tag_and_skopeo_inspect_works() {
    let reg = Registry::start(RegistryAuth::Basic { user: "t", password: "tags-pass" });
    let creds = docker_config(&reg.host, "t", "tags-pass");
    let direct = Direct::new(&reg.host, Some(&creds));
    let (planned, other) = (small_image(70, "amd64"), small_image(71, "amd64"));
    direct.push_image("ws", "planned", &planned).await;
    direct.push_image("ws", "someone-elses", &other).await;
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("ws:planned")), ("BOB_AUTH", &creds)]);
    let r = reqwest::get(format!("{}/v2/target/tags/list", proxy.url())).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v, serde_json::json!({"name": "target", "tags": ["planned"]}), "never the real list");
    let out = run_ok(
        skopeo()
            .args(["inspect", "--tls-verify=false", "--no-creds"])
            .arg(format!("docker://{}/target:anything", proxy.addr)),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], planned.digest.as_str(), "{out}");
    assert_eq!(v["RepoTags"], serde_json::json!(["planned"]), "{out}");
}
