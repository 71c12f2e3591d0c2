//! `bob proxy`'s upload sessions against a real `docker-registry`: a cap on open sessions that
//! refuses the next POST with 429 before anything is opened upstream (and never evicts a live
//! session), idle sessions that expire and are cancelled upstream, and a client's DELETE.
//! Upstream uploads are counted as distribution's `_uploads` directories.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// POSTs an upload start through the proxy; returns the status, body and `Location`.
async fn start_upload(proxy: &ProxyProc) -> (u16, String, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("{}/v2/target/blobs/uploads/", proxy.url()))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let location = r.headers().get("location").map(|l| l.to_str().unwrap().to_string());
    (status, r.text().await.unwrap(), location)
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_beyond_the_cap_get_429_without_an_upstream_upload_and_live_ones_stay() {
    let reg = Registry::start(RegistryAuth::Basic { user: "u", password: "cap-pass" });
    let creds = docker_config(&reg.host, "u", "cap-pass");
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")),
        ("BOB_AUTH", &creds),
        ("BOB_PROXY_MAX_UPLOADS", "3"),
    ]);
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let (status, body, location) = start_upload(&proxy).await;
        assert_eq!(status, 202, "{body}");
        sessions.push(location.expect("an upload URL"));
    }
    assert_eq!(reg.open_uploads_in("ws"), 3);
    for _ in 0..5 {
        let (status, body, _) = start_upload(&proxy).await;
        assert_eq!(status, 429, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
    }
    assert_eq!(reg.open_uploads_in("ws"), 3, "a refused POST opened an upload upstream");
    // The first session still works: it completes its blob.
    let blob = Blob::new(pseudo_random(7, 4096));
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}{}?digest={}", proxy.url(), sessions[0], blob.digest))
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    assert!(Direct::new(&reg.host, Some(&creds)).blob_exists("ws", &blob.digest).await);
    // A client's DELETE cancels its upload upstream and frees its slot too.
    let del = http.delete(format!("{}{}", proxy.url(), sessions[1])).send().await.unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(reg.open_uploads_in("ws"), 1);
    for _ in 0..2 {
        assert_eq!(start_upload(&proxy).await.0, 202, "finished sessions free their slots");
    }
    assert_eq!(start_upload(&proxy).await.0, 429);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_expire_and_their_upstream_uploads_are_cancelled() {
    let reg = Registry::start(RegistryAuth::Basic { user: "u", password: "idle-pass" });
    let creds = docker_config(&reg.host, "u", "idle-pass");
    let proxy = ProxyProc::start(&[
        ("BOB_PROXY_TARGET_REF", &reg.repo("ws:t")),
        ("BOB_AUTH", &creds),
        ("BOB_PROXY_UPLOAD_IDLE_TIMEOUT", "1s"),
    ]);
    let (status, _, location) = start_upload(&proxy).await;
    assert_eq!(status, 202);
    let location = location.unwrap();
    assert_eq!(reg.open_uploads_in("ws"), 1);
    // The idle timeout plus one sweep (a quarter of it) plus the DELETE's round trip.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reg.open_uploads_in("ws") > 0 {
        assert!(Instant::now() < deadline, "the expired upload is still open upstream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = reqwest::Client::new()
        .patch(format!("{}{location}", proxy.url()))
        .body(vec![1u8; 16])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "an expired session is unknown");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UPLOAD_UNKNOWN");
    assert!(proxy.proc.output().contains("cancelled"), "{}", proxy.proc.output());
}
