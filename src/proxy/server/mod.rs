//! The proxy's listener. `axum::serve` has no header-read or idle timeout and no connection
//! limit, so slow or silent clients could hold sockets for ever and exhaust the pod's file
//! descriptors. Here each HTTP/1 connection is watched through its request cycle: a request head
//! must be complete within the header timeout (counted from the connection's start, or from the
//! first byte of the next request), a kept-alive connection is closed after the idle timeout
//! between requests, and at the connection limit the connection that has waited longest without a
//! request in flight is closed to make room. Connections with requests in flight are never cut;
//! when every connection has one, accepting pauses until one ends or goes idle.

mod phase;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use phase::{Conn, InFlight, Open, Table};

/// How long connections may wait and how many may be open.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest wait for a complete request head, from the connection's start or from the first
    /// byte of the next request on a kept-alive connection.
    pub header_timeout: Duration,
    /// Longest wait between requests on a kept-alive connection.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then stops
/// accepting, lets requests in flight finish and returns when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let table = Arc::new(Table::default());
    let (stop, stopping) = watch::channel(());
    tokio::pin!(shutdown);
    'accept: loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A response's head and body go out as they are ready, not after the
                    // client's delayed ACK of the head (about 40 ms on a kept-alive connection).
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while table.len() >= limits.max_connections {
            let changed = table.changed.notified();
            if !table.make_room() {
                tracing::debug!("connection limit reached and every connection is busy; waiting");
            }
            tokio::select! {
                () = changed => {}
                () = &mut shutdown => break 'accept,
            }
        }
        let (id, conn) = table.open();
        let (router, stopping, table) = (router.clone(), stopping.clone(), table.clone());
        tokio::spawn(async move {
            let _open = Open { table, id };
            connection(stream, router, conn, limits, stopping).await;
        });
    }
    drop(listener);
    let _ = stop.send(());
    loop {
        let changed = table.changed.notified();
        if table.len() == 0 {
            return;
        }
        changed.await;
    }
}

/// Serves one connection until it ends, overstays its phase, or shutdown drains it.
async fn connection(
    stream: TcpStream,
    router: Router,
    conn: Arc<Conn>,
    limits: Limits,
    mut stopping: watch::Receiver<()>,
) {
    let io = TokioIo::new(Watched { stream, conn: conn.clone() });
    let service = Tracking { inner: TowerToHyperService::new(router), conn: conn.clone() };
    // The watchdog below owns the timeouts: hyper's header timer would also run between requests.
    let serving = http1::Builder::new().header_read_timeout(None).serve_connection(io, service);
    tokio::pin!(serving);
    let mut draining = false;
    loop {
        tokio::select! {
            result = serving.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            why = conn.expired(&limits) => {
                tracing::debug!(why, "closing a client connection");
                return;
            }
            _ = stopping.changed(), if !draining => {
                draining = true;
                serving.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn accept_failed(e: io::Error) {
    // A peer that left before accept() is its own problem, not the listener's.
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    ) {
        return;
    }
    // Out of descriptors or memory: retrying at once would spin (axum::serve waits too).
    tracing::warn!(error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The socket, noting when bytes arrive (the start of a request head).
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router, marking each request in flight until its response body is written or dropped
/// (a blob download streams long after the handler returned).
struct Tracking {
    inner: TowerToHyperService<Router>,
    conn: Arc<Conn>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for Tracking {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let in_flight = self.conn.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(resp.map(|body| TrackedBody { body, _in_flight: in_flight }))
        })
    }
}

/// A response body that keeps its request in flight.
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
