//! Safe defaults: loopback listeners, tokens, no remote registration, hostile archives.

#![allow(clippy::unwrap_used)]

use std::io::Write;

use reqwest::Method;

use crate::support::{BIN, Fixture, TestServer, error, json};

#[test]
fn an_open_management_address_without_a_token_refuses_to_start() {
    let fixture = Fixture::new();
    let output = std::process::Command::new(BIN)
        .args([
            "serve",
            "--management-address",
            "0.0.0.0:0",
            "--model-store",
        ])
        .arg(fixture.store())
        .env_remove("SPILLWAY_MANAGEMENT_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SPILLWAY_MANAGEMENT_TOKEN"));
}

#[test]
fn tokens_guard_the_apis_they_are_set_for() {
    let fixture = Fixture::new();
    fixture.archive("echo", "1.0", "echo", None, &[]);
    let server = TestServer::start_with_env(
        &fixture.store(),
        &fixture.cache(),
        &[],
        &[
            ("SPILLWAY_MANAGEMENT_TOKEN", "m-secret"),
            ("SPILLWAY_INFERENCE_TOKEN", "i-secret"),
        ],
    );
    server.wait_healthy(); // /ping needs no token
    error(server.manage(Method::GET, "/models"), 401);
    let wrong = server
        .http
        .get(format!("{}/models", server.management))
        .bearer_auth("i-secret")
        .send()
        .unwrap();
    error(wrong, 401);
    let right = server
        .http
        .get(format!("{}/models", server.management))
        .bearer_auth("m-secret")
        .send()
        .unwrap();
    json(right, 200);
    error(server.predict("echo", "x"), 401);
    let ok = server
        .http
        .post(format!("{}/predictions/echo", server.inference))
        .bearer_auth("i-secret")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn registration_takes_only_archives_inside_the_store() {
    let fixture = Fixture::new();
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    for url in [
        "https://example.com/evil.mar",
        "/etc/passwd",
        "../cache",
        "a/../../b.mar",
    ] {
        let message = error(
            server.manage(Method::POST, &format!("/models?url={}", urlencode(url))),
            400,
        );
        assert!(message.contains(url), "{message}");
    }
}

#[test]
fn a_zip_slip_archive_is_refused_with_the_entry_named() {
    let fixture = Fixture::new();
    let path = fixture.store().join("evil.mar");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("MAR-INF/MANIFEST.json", options).unwrap();
    zip.write_all(br#"{"model": {"modelName": "evil", "modelVersion": "1.0", "handler": "echo"}}"#)
        .unwrap();
    zip.start_file("../../outside.txt", options).unwrap();
    zip.write_all(b"pwned").unwrap();
    zip.finish().unwrap();
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    let message = error(
        server.manage(Method::POST, "/models?url=evil.mar&synchronous=true"),
        400,
    );
    assert!(message.contains("../../outside.txt"), "{message}");
    assert!(!fixture.dir.path().join("outside.txt").exists());
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
