//! The HTTP listener under slow and idle clients: a client that does not finish its
//! headers in time is dropped, and connections beyond the cap are closed at once while
//! the open ones keep working.

use axum::routing::get;
use axum::Router;
use slmesh_inference::http::{serve_router_with, ConnectionLimits};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn start(limits: ConnectionLimits) -> (String, tokio::sync::oneshot::Sender<()>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new().route("/ping", get(|| async { "pong" }));
    rt.spawn(serve_router_with(listener, router, Default::default(), limits, async {
        let _ = stopped.await;
    }));
    (addr, stop, rt)
}

fn ping(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET /ping HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn a_client_that_does_not_finish_its_headers_is_dropped() {
    let limits = ConnectionLimits { max_connections: 8, header_read_timeout: Duration::from_secs(1) };
    let (addr, _stop, _rt) = start(limits);
    let mut slow = TcpStream::connect(&addr).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    slow.write_all(format!("GET /ping HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).expect("half a request");
    let started = Instant::now();
    let mut rest = vec![];
    let _ = slow.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(5), "held for {:?}", started.elapsed());
    assert!(!String::from_utf8_lossy(&rest).contains("pong"));
    assert!(ping(&addr).expect("ping").contains("pong"), "the server still answers");
}

#[test]
fn connections_beyond_the_cap_are_closed_and_the_open_ones_keep_working() {
    let limits = ConnectionLimits { max_connections: 3, header_read_timeout: Duration::from_secs(30) };
    let (addr, _stop, _rt) = start(limits);
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    // The fourth is accepted by the kernel, then closed by the server without an answer.
    let answer = ping(&addr).unwrap_or_default();
    assert!(!answer.contains("pong"), "a connection beyond the cap was served: {answer}");
    // One of the open ones is served.
    let mut first = idle.into_iter().next().expect("one");
    first.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    first.write_all(format!("GET /ping HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).expect("w");
    let mut answer = String::new();
    first.read_to_string(&mut answer).expect("read");
    assert!(answer.contains("pong"), "{answer}");
    // Its slot is free again once it has closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping(&addr).unwrap_or_default().contains("pong") {
        assert!(Instant::now() < deadline, "no slot came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}
