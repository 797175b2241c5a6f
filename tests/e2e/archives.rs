//! Archives: what `spillway archive` writes, and the server loading each format.

#![allow(clippy::unwrap_used)]

use std::io::Read;

use reqwest::Method;

use crate::support::{Fixture, TestServer, embeddings, error, json};

#[test]
fn a_zip_store_mar_holds_a_torchserve_manifest_and_stored_entries() {
    let fixture = Fixture::new();
    let name = fixture.tiny_archive("tiny", "2.5", &[]);
    assert_eq!(name, "tiny.mar");
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(fixture.store().join(&name)).unwrap()).unwrap();
    let mut manifest = String::new();
    zip.by_name("MAR-INF/MANIFEST.json")
        .unwrap()
        .read_to_string(&mut manifest)
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["model"]["modelName"], "tiny");
    assert_eq!(manifest["model"]["modelVersion"], "2.5");
    assert_eq!(manifest["model"]["handler"], "text_embedding");
    assert_eq!(manifest["model"]["serializedFile"], "model.safetensors");
    let created = manifest["createdOn"].as_str().unwrap();
    assert_eq!(created.len(), "23/11/2026 09:41:07".len(), "{created}");
    assert!(manifest["runtime"].is_string() && manifest["archiverVersion"].is_string());
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).unwrap();
        let name = entry.name().unwrap().to_string();
        assert_eq!(
            entry.compression(),
            zip::CompressionMethod::Stored,
            "{name}"
        );
        if name == "model.safetensors" {
            assert_eq!(
                entry.data_start().unwrap() % 64,
                0,
                "weights are 64-byte aligned"
            );
        }
    }
    for file in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert!(zip.by_name(file).is_ok(), "{file} missing");
    }
}

#[test]
fn every_archive_format_serves_the_same_embeddings_as_the_folder() {
    let fixture = Fixture::new();
    let model = fixture.tiny_bert("model", &Default::default());
    let formats = [
        ("zip-store", "store"),
        ("default", "deflated"),
        ("tgz", "tgz"),
        ("no-archive", "folder"),
    ];
    let mut archives = Vec::new();
    for (format, name) in formats {
        archives.push(fixture.archive(
            name,
            "1.0",
            "text_embedding",
            Some(&model),
            &["--archive-format", format],
        ));
    }
    assert_eq!(
        archives,
        ["store.mar", "deflated.mar", "tgz.tar.gz", "folder"]
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let body = r#"{"inputs": ["hello world", "the quick brown fox"]}"#;
    let reference = embeddings(&json(server.predict("folder", body), 200));
    for name in ["store", "deflated", "tgz"] {
        assert_eq!(
            embeddings(&json(server.predict(name, body), 200)),
            reference,
            "{name}"
        );
    }
    let formats: Vec<_> = ["store", "deflated", "tgz", "folder"]
        .iter()
        .map(|n| {
            json(server.manage(Method::GET, &format!("/models/{n}")), 200)[0]["archiveFormat"]
                .clone()
        })
        .collect();
    assert_eq!(formats, ["zip-store", "zip", "tgz", "folder"]);

    // Only the deflated .mar and the .tar.gz needed a copy on disk; the zip-store
    // archive's weights were mapped straight out of it.
    let cached: Vec<String> = walk(&fixture.cache());
    assert!(
        cached
            .iter()
            .any(|p| p.starts_with("inflated/deflated.mar") && p.ends_with("model.safetensors")),
        "{cached:?}"
    );
    assert!(
        cached
            .iter()
            .any(|p| p.starts_with("unpacked/tgz.tar.gz") && p.ends_with("model.safetensors")),
        "{cached:?}"
    );
    assert!(
        !cached.iter().any(|p| p.contains("store.mar")),
        "{cached:?}"
    );
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

#[test]
fn the_archiver_refuses_to_overwrite_without_force_and_python_handlers_are_refused() {
    let fixture = Fixture::new();
    fixture.archive("e", "1.0", "echo", None, &[]);
    let again = std::process::Command::new(crate::support::BIN)
        .args([
            "archive",
            "--model-name",
            "e",
            "--handler",
            "echo",
            "--export-path",
        ])
        .arg(fixture.store())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    fixture.archive("e", "1.0", "echo", None, &["--force"]);

    let custom = std::process::Command::new(crate::support::BIN)
        .args([
            "archive",
            "--model-name",
            "py",
            "--handler",
            "my_handler.py",
            "--export-path",
        ])
        .arg(fixture.store())
        .output()
        .unwrap();
    assert!(!custom.status.success());
    assert!(String::from_utf8_lossy(&custom.stderr).contains("text_embedding"));

    // An archive whose manifest names a Python handler is refused by the server too.
    let dir = fixture.dir.path().join("py");
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    std::fs::write(
        dir.join("MAR-INF/MANIFEST.json"),
        r#"{"model": {"modelName": "py", "modelVersion": "1.0", "handler": "handler.py"}}"#,
    )
    .unwrap();
    std::fs::rename(&dir, fixture.store().join("py")).unwrap();
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    let message = error(
        server.manage(Method::POST, "/models?url=py&synchronous=true"),
        400,
    );
    assert!(message.contains("never executed"), "{message}");
}
