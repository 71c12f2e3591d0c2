//! A counting proxy in front of a plain-HTTP API server (kube-sim, or `kubectl proxy` in front of
//! a TLS cluster): the controller talks to it, and it records every request's method and path, so
//! a scenario can count the controller's API calls (no retry storm, one pod create). Responses,
//! watches included, stream through unchanged; a connection the API server drops (kube-sim's
//! `drop` and `drop-after` faults) is dropped here too, so the controller meets the same fault.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::TryStreamExt;
use hyper_util::rt::TokioIo;
use tower::ServiceExt;

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
    /// Its `User-Agent` (which of the controller's clients made it).
    pub agent: Option<String>,
}

/// Marks a response that stands for no answer: its connection is closed instead.
#[derive(Clone)]
struct NoAnswer;

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
                let app = axum::Router::new().fallback(forward).with_state(shared);
                let mut stopped = std::pin::pin!(stopped);
                loop {
                    let tcp = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, _)) => tcp,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => break,
                    };
                    // As an API server does: a streamed response's head and first chunk are two
                    // writes, and with Nagle the second waits for the client's delayed ACK (~40 ms).
                    let _ = tcp.set_nodelay(true);
                    let app = app.clone();
                    // A service error makes hyper close the connection without a response: the
                    // controller meets a dropped connection, not a 502 it could tell apart.
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        async move {
                            let response = app.oneshot(req.map(Body::new)).await.unwrap();
                            match response.extensions().get::<NoAnswer>() {
                                Some(_) => Err(std::io::Error::other("the API server gave no answer")),
                                None => Ok(response),
                            }
                        }
                    });
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    });
                }
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
    let agent =
        parts.headers.get(http::header::USER_AGENT).map(|a| String::from_utf8_lossy(a.as_bytes()).into());
    let index = {
        let mut calls = s.calls.lock().unwrap();
        let method = parts.method.to_string();
        calls.push(Call { at, method, path: path.clone(), took: None, agent });
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
        // The connection dropped (a fault) or the server is gone: no answer for the client either.
        Err(e) if e.is_connect() || e.is_request() || e.is_body() => {
            let mut r = Response::builder().status(502).body(Body::from(format!("counter: {e}"))).unwrap();
            r.extensions_mut().insert(NoAnswer);
            r
        }
        Err(e) => Response::builder().status(502).body(Body::from(format!("counter: {e}"))).unwrap(),
    }
}
