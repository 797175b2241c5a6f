//! Files that change under a running server: an archive rewritten in place while its
//! weights stream from it (what `cp new.mar model-store/x.mar` does), and one replaced by
//! renaming another over it. The server must stay up, answer every request, and serve
//! the new weights once the file is complete; other models must not notice.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;
use spillway_handlers::testing::TinyBert;

use crate::support::{Fixture, TestServer, json};

const BODY: &str = r#"{"inputs": ["hello world", "the quick brown fox"]}"#;

/// A tiny BERT archived as `name.mar` with every unit on disk (its weights are read from
/// the archive's mapping on every request); `seed` picks its weights. Returns the path.
fn streamed_archive(fixture: &Fixture, name: &str, seed: u64) -> std::path::PathBuf {
    let spec = TinyBert {
        hidden_size: 64,
        layers: 4,
        seed: Some(seed),
        ..TinyBert::default()
    };
    let dir = fixture.tiny_bert(&format!("src-{name}-{seed}"), &spec);
    std::fs::write(dir.join("setup_config.json"), r#"{"device_map": "disk"}"#).unwrap();
    let setup = dir.join("setup_config.json");
    let file = fixture.archive(
        name,
        "1.0",
        "text_embedding",
        Some(&dir),
        &["--extra-files", setup.to_str().unwrap()],
    );
    fixture.store().join(file)
}

/// Registers `url` (with `&`-joined extra query parameters) synchronously; asserts 200.
fn register(server: &TestServer, query: &str) {
    let registered = server.manage(Method::POST, &format!("/models?{query}&synchronous=true"));
    let status = registered.status().as_u16();
    assert_eq!(status, 200, "{}", registered.text().unwrap());
}

/// A tiny BERT archived as `name` whose encoder blocks stream from disk in bfloat16,
/// converted into `offload` (each load writes or reuses a folder there).
fn offloaded_archive(
    fixture: &Fixture,
    name: &str,
    spec: &TinyBert,
    offload: &std::path::Path,
    extra: &[&str],
) {
    let dir = fixture.tiny_bert(&format!("src-{name}"), spec);
    let setup = serde_json::json!({"device_map": {"embeddings": "cpu", "encoder": "disk"},
                                   "torch_dtype": "bfloat16", "offload_folder": offload});
    std::fs::write(dir.join("setup_config.json"), setup.to_string()).unwrap();
    let setup = dir.join("setup_config.json");
    let mut args = vec!["--extra-files", setup.to_str().unwrap()];
    args.extend_from_slice(extra);
    fixture.archive(name, "1.0", "text_embedding", Some(&dir), &args);
}

/// What one client saw: each response's status and body.
type Seen = Vec<(u16, String)>;

/// Posts `BODY` to `model` until `stop`, recording every answer.
fn hammer(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .unwrap();
            let status = response.status().as_u16();
            seen.push((status, response.text().unwrap()));
        }
        seen
    })
}

#[test]
fn an_archive_rewritten_in_place_under_load_is_loaded_again_and_the_server_stays_up() {
    let fixture = Fixture::new();
    // The replacement, made first and moved out of the store.
    let next = fixture.dir.path().join("next.mar");
    std::fs::rename(streamed_archive(&fixture, "moving", 2), &next).unwrap();
    let archive = streamed_archive(&fixture, "moving", 1);
    fixture.tiny_archive("bystander", "1.0", &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let before = json(server.predict("moving", BODY), 200);
    let bystander = json(server.predict("bystander", BODY), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let moving: Vec<_> = (0..3)
        .map(|_| {
            hammer(
                format!("{}/predictions/moving", server.inference),
                stop.clone(),
            )
        })
        .collect();
    let other = hammer(
        format!("{}/predictions/bystander", server.inference),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(400));
    // `cp next.mar moving.mar`, slowed down: the file is truncated in place (the
    // server's mapping loses its pages), stays empty a while, then is written.
    let bytes = std::fs::read(&next).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&archive)
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    file.write_all(head).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    file.write_all(tail).unwrap();
    drop(file);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let seen: Vec<(u16, String)> = moving.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let other = other.join().unwrap();

    // The server is up, and answers from the new file.
    let after = json(server.predict("moving", BODY), 200);
    assert_ne!(after, before, "the new weights answer");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("changed while the model served from it"),
        "{log}"
    );
    // Every answer was the old model's, the new model's, or a JSON 503 saying why.
    let mut unavailable = 0;
    for (status, body) in &seen {
        let value: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {status} {body}"));
        match status {
            200 => assert!(value == before || value == after, "{body}"),
            503 => {
                unavailable += 1;
                assert_eq!(value["code"], 503, "{body}");
            }
            _ => panic!("unexpected answer {status}: {body}"),
        }
    }
    assert!(
        seen.iter().filter(|(s, _)| *s == 200).count() > 10,
        "served before and after: {seen:?}"
    );
    assert!(
        unavailable > 0,
        "the requests that read the truncated file failed: {seen:?}"
    );
    // The other model never noticed.
    assert!(other.len() > 10);
    for (status, body) in &other {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            bystander
        );
    }
    let metrics = server.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("spillway_weights_changed_total{") && l.contains("moving")),
        "{metrics}"
    );
    // The new file is the one served: the same answer as a copy of it registered apart.
    std::fs::copy(&next, fixture.store().join("witness.mar")).unwrap();
    register(&server, "url=witness.mar&model_name=witness");
    assert_eq!(json(server.predict("witness", BODY), 200), after);
}

#[test]
fn an_archive_replaced_by_rename_keeps_serving_the_old_weights_until_reloaded() {
    let fixture = Fixture::new();
    let next = fixture.dir.path().join("next.mar");
    std::fs::rename(streamed_archive(&fixture, "renamed", 4), &next).unwrap();
    let archive = streamed_archive(&fixture, "renamed", 3);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let before = json(server.predict("renamed", BODY), 200);
    // The safe way to update an archive: write it beside, then rename it in.
    std::fs::rename(&next, &archive).unwrap();
    for _ in 0..3 {
        assert_eq!(json(server.predict("renamed", BODY), 200), before);
    }
    // Registered again, it reads the new file.
    let gone = server.manage(Method::DELETE, "/models/renamed");
    assert_eq!(gone.status().as_u16(), 200, "{}", gone.text().unwrap());
    register(&server, "url=renamed.mar");
    assert_ne!(json(server.predict("renamed", BODY), 200), before);
}

#[test]
fn an_offload_folder_file_truncated_under_the_server_is_written_again() {
    let fixture = Fixture::new();
    let offload = fixture.dir.path().join("offload");
    offloaded_archive(&fixture, "offloaded", &TinyBert::default(), &offload, &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let before = json(server.predict("offloaded", BODY), 200);
    let converted: Vec<_> = std::fs::read_dir(&offload)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("model.safetensors"))
        .collect();
    assert_eq!(converted.len(), 1, "{converted:?}");
    // Truncated to its header: the streamed units' bytes are gone.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&converted[0])
        .unwrap();
    file.set_len(64).unwrap();
    drop(file);
    // A request may meet the truncation (503) while the model is loaded again; then
    // the folder is written again and the answers are as before.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = server.predict("offloaded", BODY);
        let status = response.status().as_u16();
        let value: serde_json::Value = response.json().unwrap();
        statuses.push(status);
        match status {
            200 => assert_eq!(value, before),
            503 => assert_eq!(value["code"], 503, "{value}"),
            _ => panic!("unexpected {status}: {value}"),
        }
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(
        std::fs::metadata(&converted[0]).unwrap().len() > 64,
        "the converted file was written again"
    );
    let log = server.log();
    assert!(log.contains("writing it again"), "{log}");
}

#[test]
fn a_server_killed_while_unpacking_and_converting_leaves_nothing_the_next_start_trusts() {
    let fixture = Fixture::new();
    let offload = fixture.dir.path().join("offload");
    // Big enough that unpacking and converting take a while to be killed in.
    let spec = TinyBert {
        hidden_size: 256,
        layers: 6,
        seed: Some(5),
        ..TinyBert::default()
    };
    offloaded_archive(
        &fixture,
        "packed",
        &spec,
        &offload,
        &["--archive-format", "tgz"],
    );
    // Killed at points spread over the start-up: before, during and after the unpack
    // and the conversion into the offload folder.
    for delay_ms in [0u64, 20, 40, 60, 90, 120, 160, 220, 300, 400] {
        let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        std::process::Command::new("kill")
            .args(["-9", &server.pid().to_string()])
            .status()
            .unwrap();
        drop(server);
    }
    // A reference from a clean cache and folder.
    let clean = Fixture::new();
    std::fs::copy(
        fixture.store().join("packed.tar.gz"),
        clean.store().join("packed.tar.gz"),
    )
    .unwrap();
    let reference = {
        let server = TestServer::start(&clean.store(), &clean.cache(), &[]);
        server.wait_healthy();
        json(server.predict("packed", BODY), 200)
    };
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    assert_eq!(json(server.predict("packed", BODY), 200), reference);
    // What the killed starts left half done is gone or ignored: every folder in use is whole.
    let partials_now = [offload.join("unpacked"), offload.clone()]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .count();
    assert_eq!(
        partials_now, 0,
        "what the killed starts left half written is removed"
    );
    let mut checked = 0;
    for root in [offload.join("unpacked"), offload.clone()] {
        for entry in std::fs::read_dir(&root).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains("partial") || name == "unpacked" || !entry.path().is_dir() {
                continue;
            }
            checked += 1;
            assert!(
                spillway_handlers::weights::offload::lengths_intact(&entry.path()),
                "{} is in use but not whole",
                entry.path().display()
            );
        }
    }
    // The unpacked archive and the converted weights, of this store's archive and of
    // the clean copy's (the setup names the same offload folder).
    assert_eq!(checked, 4);
}

/// A tmpfs of `bytes` mounted at `path` while it lives (None where mounting is not
/// allowed: the caller reports itself skipped).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, bytes: usize) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallDisk(path.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_disk_that_fills_while_converting_is_a_507_and_leaves_nothing_in_use() {
    let fixture = Fixture::new();
    let offload = fixture.dir.path().join("small-disk");
    let Some(disk) = SmallDisk::mount(&offload, 1 << 20) else {
        eprintln!(
            "SKIPPED faults::a_disk_that_fills_while_converting_is_a_507_and_leaves_nothing_in_use: \
             mounting a small tmpfs is not allowed here"
        );
        return;
    };
    // Its converted disk units (bfloat16) need several MB; the disk holds one.
    let spec = TinyBert {
        hidden_size: 256,
        layers: 6,
        ..TinyBert::default()
    };
    // Started on an empty store; the archive is registered below.
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    offloaded_archive(&fixture, "big", &spec, &offload, &[]);
    let message = crate::support::error(
        server.manage(Method::POST, "/models?url=big.mar&synchronous=true"),
        507,
    );
    assert!(message.contains("big"), "{message}");
    // Nothing half written is left on the disk, and the server serves on.
    let left: Vec<_> = std::fs::read_dir(&offload)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    fixture.tiny_archive("small", "1.0", &[]);
    register(&server, "url=small.mar");
    json(server.predict("small", BODY), 200);
    drop(disk);
}
