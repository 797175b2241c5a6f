//! The protocols' own clients against the real binary, with MiniLM and SmolLM2
//! registered: the official `openai` Python package (tests/clients/openai_client.py)
//! and NVIDIA's `tritonclient[http]` for KServe v2 (tests/clients/kserve_client.py).
//!
//! Without the package installed the test reports itself skipped, by name — unless
//! `SPILLWAY_REQUIRE_CLIENTS` is set (CI sets it, after installing the packages).

#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::support::{Fixture, TestServer, fetch_model, repo_root};

/// Whether `python3` can import `module`; a skip notice (or, where the clients are
/// required, a failure) when it cannot.
pub(crate) fn python_has(module: &str, test: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("SPILLWAY_REQUIRE_CLIENTS").is_none(),
            "{test}: the Python package {module} is required (SPILLWAY_REQUIRE_CLIENTS is set)"
        );
        eprintln!(
            "SKIPPED {test}: the Python package `{module}` is not installed (pip install {module})"
        );
    }
    found
}

/// A server with MiniLM (`minilm`) and SmolLM2 (`smollm2`) registered.
fn serve_minilm_and_smollm2() -> (Fixture, TestServer) {
    let fixture = Fixture::new();
    let minilm = fetch_model("minilm");
    let smollm2 = fetch_model("smollm2");
    fixture.archive("minilm", "1.0", "text_embedding", Some(&minilm), &[]);
    // float32, as the references the clients compare with were computed.
    let float32 = fixture.file("setup_config.json", r#"{"torch_dtype": "float32"}"#);
    let extra = ["--extra-files", float32.to_str().unwrap()];
    fixture.archive("smollm2", "1.0", "text_generation", Some(&smollm2), &extra);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    (fixture, server)
}

/// Runs a client script from tests/clients/ with `args`; fails with its output and the
/// server's log unless it prints `done`.
pub(crate) fn run_client(server: &TestServer, script: &str, args: &[&std::ffi::OsStr], done: &str) {
    let output = Command::new("python3")
        .arg(repo_root().join("tests/clients").join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success() && stdout.contains(done),
        "{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
}

#[test]
fn the_openai_python_client_embeds_chats_and_streams_as_the_references_say() {
    let test = "the_openai_python_client_embeds_chats_and_streams_as_the_references_say";
    if !python_has("openai", test) {
        return;
    }
    let (_fixture, server) = serve_minilm_and_smollm2();
    let refs = repo_root().join("../shared/refs/smollm2_dev_refs.json");
    run_client(
        &server,
        "openai_client.py",
        &[
            server.inference.as_ref(),
            refs.as_os_str(),
            "minilm".as_ref(),
            "smollm2".as_ref(),
        ],
        "all OpenAI client checks passed",
    );
}

#[test]
fn tritonclient_reads_metadata_and_infers_with_binary_and_json_tensors() {
    let test = "tritonclient_reads_metadata_and_infers_with_binary_and_json_tensors";
    if !python_has("tritonclient.http", test) {
        return;
    }
    let (_fixture, server) = serve_minilm_and_smollm2();
    run_client(
        &server,
        "kserve_client.py",
        &[
            server.inference.as_ref(),
            "minilm".as_ref(),
            "smollm2".as_ref(),
        ],
        "all KServe v2 client checks passed",
    );
}

#[test]
fn the_openai_client_gets_json_that_validates_and_tool_calls_that_parse() {
    let test = "the_openai_client_gets_json_that_validates_and_tool_calls_that_parse";
    if !python_has("openai", test) || !python_has("jsonschema", test) {
        return;
    }
    let fixture = Fixture::new();
    let smollm2 = fetch_model("smollm2");
    fixture.archive("smollm2", "1.0", "text_generation", Some(&smollm2), &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    run_client(
        &server,
        "structured_client.py",
        &[server.inference.as_ref(), "smollm2".as_ref()],
        "all structured-output checks passed",
    );
}
