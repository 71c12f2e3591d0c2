//! A counting proxy in front of a plain-HTTP API server (kube-sim, or `kubectl proxy` in front of
//! a TLS cluster): the controller talks to it, and it records every request's method and path, so
//! a scenario can count the controller's API calls (no retry storm, one pod create). Responses,
//! watches included, stream through unchanged.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures::TryStreamExt;

/// One request the controller made.
#[derive(Clone, Debug)]
pub struct Call {
    /// When it arrived.
    pub at: Instant,
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// How long the API server took to answer (its response head), once it did.
    pub took: Option<std::time::Duration>,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    http: reqwest::Client,
    calls: Arc<Mutex<Vec<Call>>>,
}

/// The proxy; it stops when dropped.
pub struct Counter {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Counter {
    /// Starts a proxy to `upstream` (`http://host:port`) on a free loopback port, in a thread of
    /// its own (it outlives the scenario's runtime until dropped). With `fresh`, every request
    /// goes upstream on a new connection (see `Options::fresh_connections`).
    pub fn start(upstream: &str, fresh: bool) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: match fresh {
                true => reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap(),
                false => reqwest::Client::builder().no_proxy().build().unwrap(),
            },
            calls: calls.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                // As an API server does: a streamed response's head and first chunk are two
                // writes, and with Nagle the second waits for the client's delayed ACK (~40 ms).
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let app = axum::Router::new().fallback(forward).with_state(shared);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().unwrap();
        Counter { url: format!("http://{addr}"), calls, stop: Some(stop), thread: Some(thread) }
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Open watches end when the controller is gone; do not wait for them here.
        drop(self.thread.take());
    }
}

async fn forward(State(s): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let at = Instant::now();
    let index = {
        let mut calls = s.calls.lock().unwrap();
        calls.push(Call { at, method: parts.method.to_string(), path: path.clone(), took: None });
        calls.len() - 1
    };
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let mut up = s.http.request(parts.method, format!("{}{path}", s.upstream)).body(body);
    let framing = [http::header::HOST, http::header::CONTENT_LENGTH, http::header::TRANSFER_ENCODING];
    for (name, value) in parts.headers.iter().filter(|(n, _)| !framing.contains(n)) {
        up = up.header(name, value);
    }
    let answer = up.send().await;
    s.calls.lock().unwrap()[index].took = Some(at.elapsed());
    match answer {
        Ok(r) => {
            let mut out = Response::builder().status(r.status());
            // Hop-by-hop and framing headers are the server's own: the body is re-framed here.
            let framing =
                [http::header::TRANSFER_ENCODING, http::header::CONNECTION, http::header::CONTENT_LENGTH];
            for (name, value) in r.headers().iter().filter(|(n, _)| !framing.contains(n)) {
                out = out.header(name, value);
            }
            let stream = r.bytes_stream().map_err(std::io::Error::other);
            out.body(Body::from_stream(stream)).unwrap()
        }
        Err(e) => Response::builder().status(502).body(Body::from(format!("counter: {e}"))).unwrap(),
    }
}
