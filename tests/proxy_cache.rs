//! The proxy's `cache` alias against a real registry: it reaches its scope's repository and
//! nothing else, its tags are build-step keys that pass as they are (never forced to a planned
//! tag), it allows only what buildah's `--cache-from`/`--cache-to` need, nothing is mounted into
//! it (a step's layer is mounted out of it into the build's own base), and a scope cannot read
//! another scope's steps or blobs.

mod common;

use common::*;

const KEY: &str = "5c1ef51cc026a25f7b8d97b65d7b5469923c3af99806e308ac76f0e085ad1266";
const KEY2: &str = "6fd656de3dcfa0e86630a705bb0168c06904d0634c59ead75a1ab6b228b18b39";
const PASSWORD: &str = "cache-pass-41d2";

/// The registry error code of a response body.
async fn code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_alias_reaches_its_scope_only_and_only_as_buildahs_cache_needs() {
    let reg = Registry::start(RegistryAuth::Basic { user: "builder", password: PASSWORD });
    let creds = docker_config(&reg.host, "builder", PASSWORD);
    let d = Direct::new(&reg.host, Some(&creds));
    // A step cached in scope `a` and one in scope `b` under the same key; this build's base.
    let (a, b, base) = (small_image(1, "amd64"), small_image(2, "amd64"), small_image(3, "amd64"));
    d.push_image("cache/ns/a", KEY, &a).await;
    d.push_image("cache/ns/b", KEY, &b).await;
    d.push_image("base", "k", &base).await;
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_BASE_REF", &reg.repo("base:k")),
        ("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")),
        ("BOB_PROXY_CACHE_REPOSITORY", &reg.repo("cache/ns/a")),
        ("BOB_AUTH", &creds),
    ]);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}/v2/{p}", proxy.url());
    let get = |p: String| http.get(url(&p)).header("accept", ACCEPT_ALL).send();

    // The key passes as it is: scope a's step, never b's, never a planned tag.
    let r = get(format!("cache/manifests/{KEY}")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), a.digest);
    assert_eq!(get(format!("cache/blobs/{}", a.layers[0].digest)).await.unwrap().status(), 200);
    // Scope b's blob is not linked in scope a's repository: a digest alone does not reach it.
    let r = get(format!("cache/blobs/{}", b.layers[0].digest)).await.unwrap();
    assert_eq!((r.status().as_u16(), code(r).await.as_str()), (404, "BLOB_UNKNOWN"));

    // Everything buildah's cache does not need is refused.
    let refused = [
        (reqwest::Method::GET, "cache/manifests/latest".to_string(), 403, "DENIED"),
        (reqwest::Method::PUT, "cache/manifests/latest".to_string(), 403, "DENIED"),
        (reqwest::Method::GET, format!("cache/manifests/{}", a.digest), 403, "DENIED"),
        (reqwest::Method::DELETE, format!("cache/manifests/{KEY}"), 405, "UNSUPPORTED"),
        (reqwest::Method::DELETE, format!("cache/blobs/{}", a.layers[0].digest), 405, "UNSUPPORTED"),
        (reqwest::Method::GET, "cache/tags/list".to_string(), 404, "NAME_UNKNOWN"),
        (reqwest::Method::GET, format!("cache/ns/b/manifests/{KEY}"), 404, "NAME_UNKNOWN"),
        (reqwest::Method::GET, format!("cache/b/manifests/{KEY}"), 404, "NAME_UNKNOWN"),
        (reqwest::Method::GET, "_catalog".to_string(), 404, "NAME_UNKNOWN"),
    ];
    for (m, p, status, want) in refused {
        let r = http.request(m.clone(), url(&p)).header("accept", ACCEPT_ALL).send().await.unwrap();
        assert_eq!((r.status().as_u16(), code(r).await), (status, want.to_string()), "{m} {p}");
    }

    // A step written through the alias lands in scope a under its key, and nowhere else.
    let c = small_image(4, "amd64");
    Direct::new(&proxy.addr, None).push_image("cache", KEY2, &c).await;
    assert_eq!(d.manifest_digest("cache/ns/a", KEY2).await, Some(c.digest.clone()));
    assert_eq!(d.manifest_digest("cache/ns/b", KEY2).await, None);

    // Nothing is mounted into the cache, not even from this build's own aliases: the proxy drops
    // the mount and the registry answers a plain upload (the same mount into `target` is made).
    let layer = &base.layers[0].digest;
    for from in ["base", "target", "mirror/x"] {
        let r =
            http.post(url(&format!("cache/blobs/uploads/?mount={layer}&from={from}"))).send().await.unwrap();
        assert_eq!(r.status(), 202, "from={from}: a plain upload, not a mount");
        let session = r.headers()["location"].to_str().unwrap().to_string();
        assert_eq!(http.delete(format!("{}{session}", proxy.url())).send().await.unwrap().status(), 204);
    }
    assert!(!d.blob_exists("cache/ns/a", layer).await, "the base's layer was not linked into the cache");
    let r = http.post(url(&format!("target/blobs/uploads/?mount={layer}&from=base"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "the same request mounts into target");
    // Out of the cache into this build's own base: a mount (a cold build pushes a layer once).
    let cached = &a.layers[0].digest;
    let r = http.post(url(&format!("base/blobs/uploads/?mount={cached}&from=cache"))).send().await.unwrap();
    assert_eq!(r.status(), 201, "mounted from the scope's cache");
    assert!(d.blob_exists("base", cached).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cache_repository_the_alias_does_not_exist() {
    let reg = Registry::start(RegistryAuth::None);
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("ws:t"))]);
    let r = reqwest::get(format!("{}/v2/cache/manifests/{KEY}", proxy.url())).await.unwrap();
    assert_eq!((r.status().as_u16(), code(r).await.as_str()), (404, "NAME_UNKNOWN"));
    // A tag or digest in the repository value is refused at start, with the variable named.
    let out = bob_bounded(
        &["proxy"],
        &[("BOB_PROXY_ADDR", "127.0.0.1:0"), ("BOB_PROXY_CACHE_REPOSITORY", &reg.repo("cache:latest"))],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BOB_PROXY_CACHE_REPOSITORY"), "{err}");
}
