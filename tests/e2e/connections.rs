//! Slow and greedy clients: connections that never finish their headers (slowloris),
//! bodies that trickle, bodies declared far past `max_request_size`, and more
//! connections than the server holds. None may keep the server from answering others.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Fixture, TestServer, json};

/// The host and port of a base URL (`http://127.0.0.1:1234`).
fn address(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `within` passes); what it sent.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[test]
fn slow_and_greedy_clients_cannot_keep_the_server_from_answering() {
    let fixture = Fixture::new();
    fixture.tiny_archive("m", "1.0", &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &[
            "--max-connections",
            "4",
            "--request-read-timeout",
            "2",
            "--max-request-size",
            "1000",
        ],
    );
    server.wait_healthy();
    let body = r#"{"inputs": ["hello world"]}"#;
    let want = json(server.predict("m", body), 200);
    let inference = address(&server.inference);

    // Every connection slot taken by a client that never finishes its headers.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&inference).unwrap();
            s.write_all(b"POST /predictions/m HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // A good request still gets its answer, once the header deadline frees a slot.
    let answered = json(server.predict("m", body), 200);
    assert_eq!(answered, want);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    // ... and the slow clients were cut off at the deadline.
    for stream in &mut slow {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(5));
        assert!(
            closed,
            "a client that never sent its headers was disconnected"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // A body that trickles: 408, JSON, and the connection closed.
    let mut trickle = TcpStream::connect(&inference).unwrap();
    trickle
        .write_all(
            b"POST /predictions/m HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"inputs\": [",
        )
        .unwrap();
    let (response, closed) = read_until_closed(&mut trickle, Duration::from_secs(6));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"code\":408"), "{response}");
    assert!(closed, "{response}");

    // A body declared at 1 GB: 413 once it passes max_request_size, without waiting for
    // the rest.
    let mut huge = TcpStream::connect(&inference).unwrap();
    let asked = Instant::now();
    huge.write_all(
        b"POST /predictions/m HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000000000\r\n\r\n",
    )
    .unwrap();
    huge.write_all(&[b' '; 2000]).unwrap();
    let (response, _) = read_until_closed(&mut huge, Duration::from_secs(5));
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    // The server is still whole.
    assert_eq!(json(server.predict("m", body), 200), want);
}
