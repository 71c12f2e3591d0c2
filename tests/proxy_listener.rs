//! `bob proxy`'s listener under hostile clients: slow-loris connections that never finish their
//! request head, silent connections, idle keep-alive connections, and more of them than the proxy
//! has room for. The proxy runs as a process with a small file-descriptor limit (as a small
//! `ulimit -n`), so that exhausting it takes dozens of sockets, not thousands.

mod common;

use std::time::{Duration, Instant};

use common::ProxyProc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::task::JoinHandle;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// A proxy with small listener limits, and at most `max_fds` descriptors when given.
fn proxy(max_fds: Option<u64>) -> ProxyProc {
    common::init();
    ProxyProc::start_with_fd_limit(
        &[
            ("BOB_PROXY_MAX_CONNECTIONS", "16"),
            ("BOB_PROXY_HEADER_TIMEOUT", "2s"),
            ("BOB_PROXY_IDLE_TIMEOUT", "4s"),
            ("RUST_LOG", "info"),
        ],
        max_fds,
    )
}

/// A connection that sends a request head one header line every 300 ms and never finishes it.
/// Returns the read half (to see the proxy close it) and the writing task.
async fn slow_loris(addr: &str) -> (OwnedReadHalf, JoinHandle<()>) {
    let (read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
    write.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for i in 0u64.. {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write.write_all(format!("X-Slow-{i}: a\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    });
    (read, writer)
}

/// Waits until the peer closes the connection (end of stream or reset).
async fn closed(read: &mut OwnedReadHalf) {
    let mut buf = [0u8; 1024];
    while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// `GET /v2/` on a new connection.
async fn ping(addr: &str) -> reqwest::Result<reqwest::StatusCode> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    Ok(client.get(format!("http://{addr}/v2/")).send().await?.status())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_gets_through_more_hostile_connections_than_the_limit_and_the_fds() {
    // 64 descriptors: the 80 hostile connections below would exhaust them without a limit.
    let p = proxy(Some(64));
    let (mut silent, mut loris, mut writers) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..40 {
        silent.push(TcpStream::connect(&p.addr).await.unwrap());
        let (read, writer) = slow_loris(&p.addr).await;
        loris.push(read);
        writers.push(writer);
    }
    let started = Instant::now();
    let status = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(1), ping(&p.addr))
        .await
        .expect("a normal request must get through within the header timeout plus one second")
        .expect("the proxy answers");
    assert_eq!(status, 200, "after {:?}", started.elapsed());
    for w in writers {
        w.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_loris_and_silent_connections_are_closed_after_the_header_timeout() {
    let p = proxy(None);
    let started = Instant::now();
    let (mut loris, writer) = slow_loris(&p.addr).await;
    let (mut silent, _w) = TcpStream::connect(&p.addr).await.unwrap().into_split();
    let bound = HEADER_TIMEOUT + Duration::from_secs(1);
    tokio::time::timeout(bound, closed(&mut loris))
        .await
        .expect("a slow-loris connection must be closed by the header timeout");
    assert!(started.elapsed() >= HEADER_TIMEOUT, "closed before the timeout: {:?}", started.elapsed());
    tokio::time::timeout(bound.saturating_sub(started.elapsed()), closed(&mut silent))
        .await
        .expect("a connection that sends nothing must be closed by the header timeout");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let p = proxy(None);
    let (mut read, mut write) = TcpStream::connect(&p.addr).await.unwrap().into_split();
    // The connection goes idle after this request is served, so after this instant.
    let sent = Instant::now();
    write.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", p.addr).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("\r\n\r\n{}") {
        let n = read.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let bound = (sent + IDLE_TIMEOUT + Duration::from_secs(1)).saturating_duration_since(Instant::now());
    tokio::time::timeout(bound, closed(&mut read))
        .await
        .expect("an idle keep-alive connection must be closed by the idle timeout");
    // Longer than the header timeout: between requests the idle timeout applies, not that one.
    assert!(sent.elapsed() >= IDLE_TIMEOUT, "closed after {:?}", sent.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_idle_connections_and_exits_cleanly() {
    let mut p = proxy(None);
    assert_eq!(ping(&p.addr).await.unwrap(), 200);
    // A kept-alive connection between requests and one that has sent nothing yet.
    let mut kept = TcpStream::connect(&p.addr).await.unwrap();
    kept.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", p.addr).as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(kept.read(&mut buf).await.unwrap() > 0);
    let _silent = TcpStream::connect(&p.addr).await.unwrap();
    // Well below the header and idle timeouts: shutdown itself closes them.
    let status = p.proc.terminate(Duration::from_secs(1)).expect("bob proxy exits on SIGTERM");
    assert!(status.success(), "{status}");
}
