//! Recording HTTP servers on loopback for the credential tests: each records every request it
//! gets (method, path and query, the `Authorization` header) and answers with a handler of the
//! test's choosing. `Front` is one of them that forwards to a real registry and can send blob
//! reads and uploads on to another host, as registries with S3 or GCS storage do.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};

/// One request a recorder got.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// A recording server; stops when dropped.
pub struct Recorder {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// Starts a server on a free port that records each request, then answers with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let handler = handler.clone();
            let log = log.clone();
            async move {
                log.lock().unwrap().push(Seen {
                    method: req.method().to_string(),
                    uri: req.uri().to_string(),
                    authorization: req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("<binary>").to_string()),
                });
                handler(req).await
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder { addr, seen, task }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests so far that carried an `Authorization` header.
    pub fn authorized(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.authorization.is_some()).collect()
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// What the front does besides forwarding.
#[derive(Default)]
pub struct Traps {
    /// Blob reads of these digests are redirected (307) to the storage host.
    pub redirect_blobs: Vec<String>,
    /// Upload `Location`s point at the storage host instead of the registry.
    pub uploads_to_storage: bool,
}

/// A recording front of a real registry (started with relative URLs) at its own origin.
pub struct Front {
    /// The recorder; its address is the registry's origin as clients see it.
    pub recorder: Recorder,
    /// What to do besides forwarding; change it while the test runs.
    pub traps: Arc<Mutex<Traps>>,
}

impl Front {
    /// Forwards to `registry` (`host:port`), sending trapped requests on to `storage` (`host:port`).
    pub async fn start(registry: &str, storage: &str) -> Self {
        let traps: Arc<Mutex<Traps>> = Arc::default();
        let (registry, storage, t) = (registry.to_string(), storage.to_string(), traps.clone());
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let recorder = Recorder::start(move |req: Request| {
            let (registry, storage, traps, http) =
                (registry.clone(), storage.clone(), t.clone(), http.clone());
            async move { forward(req, &registry, &storage, &traps, &http).await }
        })
        .await;
        Front { recorder, traps }
    }

    /// `127.0.0.1:<port>`: the registry host clients are given.
    pub fn host(&self) -> &str {
        &self.recorder.addr
    }
}

async fn forward(
    req: Request,
    registry: &str,
    storage: &str,
    traps: &Mutex<Traps>,
    http: &reqwest::Client,
) -> Response {
    let path = req.uri().path().to_string();
    let redirect = {
        let t = traps.lock().unwrap();
        t.redirect_blobs.iter().find(|d| path.ends_with(&format!("/blobs/{d}"))).cloned()
    };
    if let Some(digest) = redirect {
        let to = format!("http://{storage}/blobs/{digest}?X-Amz-Signature=s3cr3t");
        return (axum::http::StatusCode::TEMPORARY_REDIRECT, [("location", to)]).into_response();
    }
    let uri = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or(path);
    let mut out = http.request(req.method().clone(), format!("http://{registry}{uri}"));
    for (k, v) in req.headers() {
        if k != "host" {
            out = out.header(k, v);
        }
    }
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let resp = out.body(body).send().await.unwrap();
    let mut answer = Response::builder().status(resp.status());
    let to_storage = traps.lock().unwrap().uploads_to_storage && resp.status() == 202;
    for (k, v) in resp.headers() {
        if k == "location" && to_storage {
            answer = answer.header(k, format!("http://{storage}{}", v.to_str().unwrap()));
        } else {
            answer = answer.header(k, v);
        }
    }
    answer.body(Body::from_stream(resp.bytes_stream())).unwrap()
}
