//! `spillway pull` against a loopback HTTP server that serves a tiny model in the Hub's
//! URL layout (`/api/models/{id}/revision/{rev}`, `/{id}/resolve/{rev}/{file}` with the
//! Hub's `ETag`, `X-Repo-Commit` and `Content-Range` headers): HF_ENDPOINT and HF_HOME
//! honoured, only the files Spillway reads fetched, a download cut off half-way resumed
//! with a `Range` request, nothing fetched twice, and `plan`, `archive` and the server's
//! registration then take the cached `org/name`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use crate::support::{BIN, Fixture};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the fake Hub serves and what it was asked.
struct FakeHub {
    files: BTreeMap<String, Vec<u8>>,
    /// `(file, Range header)` of every resolve request.
    asked: Mutex<Vec<(String, String)>>,
    /// The file whose first whole download is cut off half-way.
    cut: Mutex<Option<String>>,
}

impl FakeHub {
    fn serve(self: Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let hub = self.clone();
                std::thread::spawn(move || hub.answer(stream));
            }
        });
        address
    }

    fn answer(&self, mut stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut range = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                range = value.trim().to_string();
            }
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
        let info = "/api/models/org/tiny/revision/main";
        let resolve = "/org/tiny/resolve/main/";
        if path == info {
            let siblings: Vec<_> = self
                .files
                .keys()
                .map(|f| serde_json::json!({"rfilename": f}))
                .collect();
            let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        let Some(file) = path
            .strip_prefix(resolve)
            .filter(|f| self.files.contains_key(*f))
        else {
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            return;
        };
        self.asked
            .lock()
            .unwrap()
            .push((file.to_string(), range.clone()));
        let bytes = &self.files[file];
        let start: usize = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let end = if range == "bytes=0-0" { 1 } else { bytes.len() };
        let body = &bytes[start.min(end)..end];
        let _ = write!(
            stream,
            "HTTP/1.1 206 Partial Content\r\netag: \"blob-{}-{}\"\r\nx-repo-commit: {COMMIT}\r\n\
             content-range: bytes {start}-{}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            file.replace(['/', '.'], "_"),
            bytes.len(),
            end.saturating_sub(1),
            bytes.len(),
            body.len()
        );
        let mut cut = self.cut.lock().unwrap();
        if range == "bytes=0-" && cut.as_deref() == Some(file) {
            // Half the body, then the connection drops.
            *cut = None;
            let _ = stream.write_all(&body[..body.len() / 2]);
            return;
        }
        drop(cut);
        let _ = stream.write_all(body);
    }
}

fn spillway(args: &[&str], endpoint: &str, home: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn pull_fetches_what_spillway_reads_resumes_and_feeds_plan_and_archive() {
    let fixture = Fixture::new();
    let model = fixture.tiny_bert("tiny", &Default::default());
    // Every file of the folder, by its path in the repository (1_Pooling/config.json...).
    let mut files = BTreeMap::new();
    let mut folders = vec![model.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let name = path
                    .strip_prefix(&model)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    assert!(
        files.contains_key("model.safetensors"),
        "{:?}",
        files.keys()
    );
    files.insert("pytorch_model.bin".into(), vec![7u8; 4096]);
    let hub = Arc::new(FakeHub {
        files: files.clone(),
        asked: Mutex::new(Vec::new()),
        cut: Mutex::new(Some("model.safetensors".into())),
    });
    let endpoint = hub.clone().serve();
    let home = tempfile::tempdir().unwrap();

    let pulled = spillway(&["pull", "org/tiny"], &endpoint, home.path());
    let stderr = String::from_utf8_lossy(&pulled.stderr);
    assert!(pulled.status.success(), "{stderr}");
    let snapshot = std::path::PathBuf::from(String::from_utf8_lossy(&pulled.stdout).trim());
    assert_eq!(
        snapshot,
        home.path()
            .join(format!("hub/models--org--tiny/snapshots/{COMMIT}"))
    );
    for (name, bytes) in &files {
        let path = snapshot.join(name);
        if name == "pytorch_model.bin" {
            assert!(!path.exists(), "a PyTorch pickle is not fetched");
        } else {
            assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{name}");
        }
    }
    // The cut-off download was taken up where it stopped.
    let asked = hub.asked.lock().unwrap().clone();
    let ranges: Vec<&str> = asked
        .iter()
        .filter(|(f, r)| f == "model.safetensors" && r != "bytes=0-0")
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(ranges.len(), 2, "{asked:?}");
    assert_eq!(ranges[0], "bytes=0-");
    let resumed_at: usize = ranges[1]["bytes=".len()..]
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(resumed_at > 0, "resumed, not restarted: {asked:?}");

    // Pulled again: everything is in the cache, nothing is fetched.
    let again = spillway(&["pull", "org/tiny"], &endpoint, home.path());
    assert!(again.status.success());
    assert_eq!(
        hub.asked.lock().unwrap().len(),
        asked.len(),
        "fetched twice"
    );

    // plan and archive take the cached org/name.
    let plan = spillway(&["plan", "org/tiny"], &endpoint, home.path());
    let plan_out = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(plan_out.contains("embeddings"), "{plan_out}");
    let export = tempfile::tempdir().unwrap();
    let archived = spillway(
        &[
            "archive",
            "--model-name",
            "tiny",
            "--handler",
            "text_embedding",
            "--model-dir",
            "org/tiny",
            "--export-path",
            export.path().to_str().unwrap(),
        ],
        &endpoint,
        home.path(),
    );
    assert!(
        archived.status.success(),
        "{}",
        String::from_utf8_lossy(&archived.stderr)
    );
    assert!(export.path().join("tiny.mar").is_file());

    // The server registers the cached org/name (handler from its config.json), and
    // serves it; a model neither in the store nor cached is a 404 that says what to do.
    let store = tempfile::tempdir().unwrap();
    let server = crate::support::TestServer::start_with_env(
        store.path(),
        &store.path().join(".cache"),
        &[],
        &[("HF_HOME", home.path().to_str().unwrap())],
    );
    let registered = server.manage(
        reqwest::Method::POST,
        "/models?url=org/tiny&synchronous=true",
    );
    assert_eq!(registered.status(), 200, "{}", registered.text().unwrap());
    let described = crate::support::json(server.manage(reqwest::Method::GET, "/models/tiny"), 200);
    assert_eq!(described[0]["modelVersion"], &COMMIT[..12]);
    assert_eq!(described[0]["handler"], "text_embedding");
    assert_eq!(
        server.predict("tiny", r#"{"inputs": ["hello"]}"#).status(),
        200
    );
    let missing = server.manage(reqwest::Method::POST, "/models?url=org/absent");
    assert_eq!(missing.status(), 404);
    assert!(missing.text().unwrap().contains("spillway pull org/absent"));

    // Not a Hub model id: refused before any request.
    let bad = spillway(&["pull", "../etc"], &endpoint, home.path());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("org/name"));
}
