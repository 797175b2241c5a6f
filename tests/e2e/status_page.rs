//! The status page (`GET /` on the management API) in a real browser: headless Chromium
//! (Debian's `chromium`) loads it from a server with two models, one resident and one
//! split between the CPU and disk; the test reads the DOM Chromium built and saves a
//! screenshot (`target/status-page.png`, or where `SPILLWAY_STATUS_SCREENSHOT` says).
//!
//! Without Chromium the browser test reports itself skipped, by name — unless
//! `SPILLWAY_REQUIRE_CLIENTS` is set (CI installs it).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::support::{Fixture, TestServer, repo_root};

/// Chromium's binary, if installed.
fn chromium() -> Option<&'static str> {
    ["chromium", "/usr/bin/chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn headless(binary: &str, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The values of `attribute` on the elements of the DOM text that carry it.
fn attribute_values(dom: &str, attribute: &str) -> Vec<String> {
    let needle = format!("{attribute}=\"");
    dom.match_indices(&needle)
        .map(|(at, _)| {
            let rest = &dom[at + needle.len()..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

fn serve_two_models(fixture: &Fixture, extra: &[&str]) -> TestServer {
    fixture.tiny_archive("resident", "1.0", &[]);
    let split = fixture.file(
        "setup_config.json",
        r#"{"device_map": {"embeddings": "cpu", "encoder": "disk"}}"#,
    );
    fixture.tiny_archive("split", "2.0", &["--extra-files", split.to_str().unwrap()]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), extra);
    server.wait_healthy();
    server
}

#[test]
fn the_status_page_is_behind_the_management_token() {
    let fixture = Fixture::new();
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--management-token", "s3cret"],
    );
    let page = |token: Option<&str>| {
        let mut request = server.http.get(format!("{}/", server.management));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };
    assert_eq!(page(None).status(), 401);
    let answer = page(Some("s3cret"));
    assert_eq!(answer.status(), 200);
    assert!(answer.text().unwrap().contains("No model is registered."));
}

#[test]
fn headless_chromium_shows_every_model_its_units_and_the_devices() {
    let test = "headless_chromium_shows_every_model_its_units_and_the_devices";
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("SPILLWAY_REQUIRE_CLIENTS").is_none(),
            "{test}: chromium is required (SPILLWAY_REQUIRE_CLIENTS is set)"
        );
        eprintln!("SKIPPED {test}: no chromium on the PATH (apt-get install chromium)");
        return;
    };
    let fixture = Fixture::new();
    let server = serve_two_models(&fixture, &[]);
    for model in ["resident", "split"] {
        for _ in 0..5 {
            let answer = server.predict(model, r#"{"inputs": ["hello world"]}"#);
            assert_eq!(answer.status(), 200);
        }
    }
    let url = format!("{}/", server.management);

    let dom = headless(browser, &url, &["--dump-dom"]);
    // Both models, ready, with their versions, and their last minute of answers.
    assert_eq!(attribute_values(&dom, "data-model"), ["resident", "split"]);
    assert_eq!(attribute_values(&dom, "data-version"), ["1.0", "2.0"]);
    assert_eq!(attribute_values(&dom, "data-state"), ["READY", "READY"]);
    let rates = attribute_values(&dom, "data-stat");
    assert_eq!(rates.iter().filter(|s| *s == "rate").count(), 2, "{dom}");
    assert!(dom.contains("req/s") && dom.contains("p95"), "{dom}");
    // Each model's strip: every unit of its plan, on the device the plan says.
    let describe: serde_json::Value = server
        .http
        .get(format!("{}/models/split", server.management))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let planned: Vec<(String, String)> = describe[0]["placement"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().to_string(),
                u["device"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let units = attribute_values(&dom, "data-unit");
    let devices = attribute_values(&dom, "data-device");
    assert_eq!(units.len(), devices.len());
    let shown: Vec<(String, String)> = units.into_iter().zip(devices).collect();
    let split_shown = &shown[shown.len() - planned.len()..];
    assert_eq!(split_shown, planned.as_slice(), "the split model's strip");
    assert!(split_shown.iter().any(|(_, d)| d == "disk"));
    assert!(split_shown.iter().any(|(_, d)| d == "cpu"));
    assert!(dom.contains("class=\"unit disk\"") && dom.contains("class=\"unit cpu\""));
    // The device manager's pools.
    assert!(
        attribute_values(&dom, "data-pool").contains(&"cpu".to_string()),
        "{dom}"
    );
    // It reloads itself and runs no script.
    assert!(dom.contains("http-equiv=\"refresh\""));
    assert!(!dom.contains("<script"));

    let screenshot = std::env::var("SPILLWAY_STATUS_SCREENSHOT").map_or_else(
        |_| repo_root().join("target/status-page.png"),
        std::path::PathBuf::from,
    );
    let _ = std::fs::remove_file(&screenshot);
    // target/ is absent where CARGO_TARGET_DIR builds elsewhere.
    if let Some(folder) = screenshot.parent() {
        std::fs::create_dir_all(folder).unwrap();
    }
    headless(
        browser,
        &url,
        &[
            "--window-size=1100,760",
            &format!("--screenshot={}", screenshot.display()),
        ],
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "{} bytes: a blank page?", png.len());
}
