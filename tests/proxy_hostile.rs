//! `bob proxy` in process against an in-process upstream that misbehaves on demand (what the
//! real registry cannot do): 5xx then success, persistent 5xx, a connection cut mid-upload, a
//! slow upstream, an unreachable one; and every refusal, proven never to reach upstream.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bob::proxy::ProxyArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Upstream {
    requests: AtomicUsize,
    flaky_left: AtomicUsize,
    seen_headers: std::sync::Mutex<Vec<String>>,
    seen: std::sync::Mutex<Vec<String>>,
}

async fn upstream_handler(State(s): State<Arc<Upstream>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path == "/v2/" {
        return (axum::http::StatusCode::OK, "{}").into_response();
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.seen.lock().unwrap().push(format!("{} {path}", req.method()));
    s.seen_headers.lock().unwrap().extend(req.headers().keys().map(|k| k.to_string()));
    let unavailable = || {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            r#"{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}"#,
        )
            .into_response()
    };
    match path.as_str() {
        "/v2/flaky/manifests/t" => {
            if s.flaky_left.load(Ordering::SeqCst) > 0 {
                s.flaky_left.fetch_sub(1, Ordering::SeqCst);
                return unavailable();
            }
            ([("content-type", common::OCI_MANIFEST), ("docker-content-digest", "sha256:aa")], "{}")
                .into_response()
        }
        "/v2/down/manifests/t" => unavailable(),
        "/v2/html/manifests/t" => (
            axum::http::StatusCode::BAD_GATEWAY,
            [("content-type", "text/html"), ("retry-after", "1")],
            "<html>bad gateway</html>",
        )
            .into_response(),
        "/v2/silent/manifests/t" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "{}".into_response()
        }
        "/v2/slow/manifests/t" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "{}".into_response()
        }
        _ => {
            (axum::http::StatusCode::NOT_FOUND, r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#)
                .into_response()
        }
    }
}

async fn start_upstream() -> (String, Arc<Upstream>) {
    let state = Arc::new(Upstream::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new().fallback(upstream_handler).with_state(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

/// Serves `bob proxy` in process on a free port, with its real listener.
async fn start_proxy(mut args: ProxyArgs) -> String {
    common::init();
    args.upstream_timeout = args.upstream_timeout.min(Duration::from_secs(30));
    let proxy = Arc::new(args.build().expect("valid proxy config"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let limits = args.limits();
    tokio::spawn(bob::proxy::serve(listener, proxy, limits, std::future::pending()));
    addr
}

/// Sends a raw HTTP/1.1 request (so paths are not normalised by a client) and returns the status
/// and body.
async fn raw(addr: &str, request_line: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{request_line}\r\nHost: {addr}\r\n{extra}Connection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn code_of(body: &str) -> String {
    // the body may be chunked; find the JSON object
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map(|e| e + 1).unwrap_or(body.len());
    let v: serde_json::Value =
        serde_json::from_str(&body[start..end]).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

fn args(upstream: &str, repo: &str) -> ProxyArgs {
    let mut a = ProxyArgs::for_refs(Some(format!("{upstream}/base:k")), Some(format!("{upstream}/{repo}:t")));
    a.retries = 3;
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_has_its_status_and_code_and_never_reaches_upstream() {
    let (up, state) = start_upstream().await;
    let mut a = args(&up, "ws");
    a.base_read_only = true;
    let proxy = start_proxy(a).await;
    let cases = [
        ("GET /v2/other/manifests/latest HTTP/1.1", 404, "NAME_UNKNOWN"),
        ("GET /v2/base/../other/manifests/latest HTTP/1.1", 400, "NAME_INVALID"),
        ("GET /v2/base%2F..%2Fother/manifests/latest HTTP/1.1", 400, "NAME_INVALID"),
        ("GET /v2/target%2fmanifests/latest HTTP/1.1", 400, "NAME_INVALID"),
        (&format!("GET http://{up}/v2/target/manifests/latest HTTP/1.1"), 400, "NAME_INVALID"),
        ("DELETE /v2/target/manifests/latest HTTP/1.1", 405, "UNSUPPORTED"),
        ("PATCH /v2/target/blobs/uploads/deadbeef HTTP/1.1", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("GET /target/artifacts-uploads/x HTTP/1.1", 404, "NAME_UNKNOWN"),
        ("GET /v2/library/busybox/manifests/latest?ns=docker.io HTTP/1.1", 404, "NAME_UNKNOWN"),
        ("PUT /v2/base/manifests/latest HTTP/1.1", 403, "DENIED"),
        ("POST /v2/base/blobs/uploads/ HTTP/1.1", 403, "DENIED"),
        ("GET /v2/_catalog HTTP/1.1", 404, "NAME_UNKNOWN"),
        ("GET /v2/mirror/evil.test/x/tags/list HTTP/1.1", 404, "NAME_UNKNOWN"),
        ("POST /v2/target/tags/list HTTP/1.1", 405, "UNSUPPORTED"),
        ("GET /v2/mirror/evil.test/x/manifests/latest HTTP/1.1", 403, "DENIED"),
    ];
    for (line, status, code) in cases {
        let (got, body) = raw(&proxy, line, "").await;
        assert_eq!((got, code_of(&body).as_str()), (status, code), "{line}: {body}");
    }
    assert_eq!(state.requests.load(Ordering::SeqCst), 0, "a refused request reached upstream");
}

/// `GET <path>` through the proxy as JSON.
async fn get_json(proxy: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{proxy}{path}")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_is_answered_locally_with_the_planned_tag_only_when_it_exists() {
    let (up, state) = start_upstream().await;
    let d = format!("sha256:{}", "ab".repeat(32));
    let mut a = args(&up, "flaky");
    a.base_ref = Some(format!("{up}/pinned@{d}"));
    let proxy = start_proxy(a).await;
    let (status, v) = get_json(&proxy, "/v2/target/tags/list").await;
    assert_eq!((status, v), (200, serde_json::json!({"name": "target", "tags": ["t"]})));
    let (status, v) = get_json(&proxy, "/v2/target/tags/list?n=1&last=t").await;
    assert_eq!((status, v), (200, serde_json::json!({"name": "target", "tags": []})), "pagination");
    // A digest-pinned alias has no tag to list; upstream is not asked.
    let (status, v) = get_json(&proxy, "/v2/base/tags/list").await;
    assert_eq!((status, v), (200, serde_json::json!({"name": "base", "tags": []})));
    assert_eq!(*state.seen.lock().unwrap(), ["HEAD /v2/flaky/manifests/t"; 2], "only the planned manifest");
    // The planned tag does not exist upstream: an empty list, as for an existing repository.
    let (up, _) = start_upstream().await;
    let proxy = start_proxy(args(&up, "ws")).await;
    let (status, v) = get_json(&proxy, "/v2/target/tags/list").await;
    assert_eq!((status, v), (200, serde_json::json!({"name": "target", "tags": []})));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_authorization_and_forwarding_headers_are_stripped() {
    let (up, state) = start_upstream().await;
    let proxy = start_proxy(args(&up, "flaky")).await;
    let extra = "Authorization: Basic YWRtaW46YWRtaW4=\r\nX-Forwarded-Host: evil.test\r\nCookie: a=b\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n";
    let (status, _) = raw(&proxy, "GET /v2/target/manifests/latest HTTP/1.1", extra).await;
    assert_eq!(status, 200);
    let seen = state.seen_headers.lock().unwrap().clone();
    assert!(seen.contains(&"accept".to_string()), "{seen:?}");
    for h in ["authorization", "x-forwarded-host", "cookie"] {
        assert!(!seen.contains(&h.to_string()), "{h} reached upstream: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_requests_are_retried_on_5xx_then_succeed() {
    let (up, state) = start_upstream().await;
    state.flaky_left.store(2, Ordering::SeqCst);
    let proxy = start_proxy(args(&up, "flaky")).await;
    let r = reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(state.requests.load(Ordering::SeqCst), 3, "two 503s, then the success");
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_5xx_keeps_its_status_and_json_after_bounded_retries() {
    let (up, state) = start_upstream().await;
    let mut a = args(&up, "down");
    a.retries = 2;
    let proxy = start_proxy(a).await;
    let r = reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")).await.unwrap();
    assert_eq!(r.status(), 503, "the upstream's status is kept, not a blanket 502");
    assert_eq!(code_of(&r.text().await.unwrap()), "UNAVAILABLE");
    assert_eq!(state.requests.load(Ordering::SeqCst), 3, "1 try + 2 retries");
}

#[tokio::test(flavor = "multi_thread")]
async fn non_registry_error_pages_become_registry_errors_with_their_status() {
    let (up, _) = start_upstream().await;
    let mut a = args(&up, "html");
    a.retries = 0;
    let proxy = start_proxy(a).await;
    let r = reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["retry-after"], "1");
    let body = r.text().await.unwrap();
    assert_eq!(code_of(&body), "UNAVAILABLE");
    assert!(body.contains("answered 502"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_times_out_with_504() {
    let (up, _) = start_upstream().await;
    let mut a = args(&up, "slow");
    a.upstream_timeout = Duration::from_millis(300);
    a.retries = 0;
    let proxy = start_proxy(a).await;
    let r = tokio::time::timeout(
        Duration::from_secs(8),
        reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")),
    )
    .await
    .expect("the proxy must not wait for the slow upstream")
    .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(code_of(&r.text().await.unwrap()), "UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_costs_one_timeout_not_one_per_retry() {
    let (up, state) = start_upstream().await;
    let mut a = args(&up, "silent");
    a.upstream_timeout = Duration::from_secs(1);
    a.retries = 3;
    let proxy = start_proxy(a).await;
    let started = std::time::Instant::now();
    let r = reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 504);
    assert_eq!(code_of(&r.text().await.unwrap()), "UNAVAILABLE");
    // The bound is the behaviour: retries and backoff fit in the one budget (they used to take
    // 4 x 1 s + 1.4 s of backoff).
    assert!(took < Duration::from_secs(2), "a silent upstream held the client for {took:?}");
    assert_eq!(state.requests.load(Ordering::SeqCst), 1, "no retry can fit in the budget");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_a_502_registry_error() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut a = args(&format!("127.0.0.1:{port}"), "ws");
    a.retries = 1;
    let proxy = start_proxy(a).await;
    let r = reqwest::get(format!("http://{proxy}/v2/target/manifests/latest")).await.unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert_eq!(code_of(&body), "UNAVAILABLE");
    assert!(body.contains(&format!("127.0.0.1:{port}")), "the message names the upstream: {body}");
}

/// An upstream that opens uploads and then cuts the connection in the middle of a PATCH body.
async fn start_cutting_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                if head.starts_with("GET /v2/ ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                        .await;
                } else if head.starts_with("POST ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 202 Accepted\r\nLocation: /v2/ws/blobs/uploads/u1?_state=s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                } else {
                    // read a little of the body, then drop the connection without an answer
                    let _ = s.read(&mut buf).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_cut_mid_upload_is_a_clean_error_not_a_hang() {
    let up = start_cutting_upstream().await;
    let proxy = start_proxy(args(&up, "ws")).await;
    let http = reqwest::Client::new();
    let r = http.post(format!("http://{proxy}/v2/target/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let body = vec![7u8; 8 << 20];
    let sent = tokio::time::timeout(
        Duration::from_secs(20),
        http.patch(format!("http://{proxy}{loc}"))
            .header("content-range", format!("0-{}", body.len() - 1))
            .body(body)
            .send(),
    )
    .await
    .expect("a cut upstream must not hang the client");
    // Either the proxy answers 502 in the registry format, or it closes the client's upload too.
    if let Ok(r) = sent {
        assert_eq!(r.status(), 502);
        assert_eq!(code_of(&r.text().await.unwrap()), "UNAVAILABLE");
    }
}
