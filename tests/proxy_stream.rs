//! Streaming through `bob proxy` (a separate process, so its memory can be read from /proc):
//! a blob of hundreds of MiB generated on the fly keeps the proxy's peak RSS flat, and a
//! chunked upload (PATCH with Content-Range) works through proxy-issued upload URLs.

mod common;

use common::*;
use futures::StreamExt;
use sha2::{Digest, Sha256};

const BLOB_MIB: usize = 384;
const CHUNK: usize = 1 << 20;

fn hex_digest(h: Sha256) -> String {
    format!("sha256:{}", h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn chunks(seed: u64) -> impl Iterator<Item = Vec<u8>> {
    (0..BLOB_MIB as u64).map(move |i| pseudo_random(seed * 100_000 + i, CHUNK))
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_streams_both_ways_with_flat_proxy_memory() {
    let reg = Registry::start(RegistryAuth::None);
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("big:t"))]);
    let mut h = Sha256::new();
    for c in chunks(7) {
        h.update(&c);
    }
    let digest = hex_digest(h);
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/v2/target/blobs/uploads/", proxy.url())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let body = futures::stream::iter(chunks(7).map(Ok::<_, std::io::Error>));
    let put = http
        .put(format!("{}{loc}?digest={digest}", proxy.url()))
        .header("content-length", (BLOB_MIB * CHUNK).to_string())
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    // Read it back through the proxy, hashing as it streams.
    let get = http.get(format!("{}/v2/target/blobs/{digest}", proxy.url())).send().await.unwrap();
    assert_eq!(get.status(), 200);
    let mut stream = get.bytes_stream();
    let (mut h, mut n) = (Sha256::new(), 0usize);
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        n += c.len();
        h.update(&c);
    }
    assert_eq!(n, BLOB_MIB * CHUNK);
    let back = hex_digest(h);
    assert_eq!(back, digest);
    let peak_mib = proxy.proc.peak_rss_kib() / 1024;
    eprintln!("proxy peak RSS after {BLOB_MIB} MiB up and down: {peak_mib} MiB");
    assert!(peak_mib < 64, "the proxy buffered: peak RSS {peak_mib} MiB for a {BLOB_MIB} MiB blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_with_content_range_goes_through_issued_sessions() {
    // Relative upload URLs from the registry (absolute ones are what every other test gets).
    let reg = Registry::start_with(RegistryAuth::Basic { user: "c", password: "chunk-pass" }, true);
    let creds = docker_config(&reg.host, "c", "chunk-pass");
    let proxy = ProxyProc::start(&[("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")), ("BOB_AUTH", &creds)]);
    let data = pseudo_random(99, 3 * 1024 * 1024 + 17);
    let digest = digest_of(&data);
    let http = reqwest::Client::new();
    let r = http.post(format!("{}/v2/target/blobs/uploads/", proxy.url())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let session = r.headers()["location"].to_str().unwrap().to_string();
    let mut offset = 0;
    for part in data.chunks(1024 * 1024 + 5) {
        let end = offset + part.len() - 1;
        let r = http
            .patch(format!("{}{session}", proxy.url()))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{end}"))
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "PATCH {offset}-{end}");
        assert_eq!(r.headers()["range"], format!("0-{end}").as_str());
        assert_eq!(r.headers()["location"], session.as_str(), "the session URL stays the proxy's");
        offset = end + 1;
    }
    let r = http.put(format!("{}{session}?digest={digest}", proxy.url())).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(Direct::new(&reg.host, Some(&creds)).blob_exists("ws", &digest).await);
    // The session is finished: it cannot be reused.
    let again = http.patch(format!("{}{session}", proxy.url())).body("x").send().await.unwrap();
    assert_eq!(again.status(), 404);
}
