//! The management API: list, describe, register, scale, unregister, set-default.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use reqwest::Method;

use crate::support::{Fixture, TestServer, embeddings, error, json};

fn wait_ready(server: &TestServer, path: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let described = json(server.manage(Method::GET, path), 200);
        match described[0]["status"].as_str() {
            Some("READY") => return described,
            Some("LOADING") => {}
            other => panic!("unexpected status {other:?}: {described}"),
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn register_describe_scale_and_unregister() {
    let fixture = Fixture::new();
    let setup = fixture.file(
        "setup_config.json",
        r#"{"device_map": "cpu", "max_length": 16, "torch_dtype": "float32"}"#,
    );
    let yaml = fixture.file(
        "model-config.yaml",
        "minWorkers: 2\nmaxWorkers: 3\nbatchSize: 4\nmaxBatchDelay: 7\nresponseTimeout: 30\n",
    );
    fixture.tiny_archive(
        "tiny",
        "1.0",
        &[
            "--config-file",
            yaml.to_str().unwrap(),
            "--extra-files",
            setup.to_str().unwrap(),
        ],
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    server.wait_healthy();
    assert_eq!(
        json(server.manage(Method::GET, "/models"), 200)["models"],
        serde_json::json!([])
    );

    // Synchronous registration answers once the model serves.
    let registered = json(
        server.manage(Method::POST, "/models?url=tiny.mar&synchronous=true"),
        200,
    );
    assert!(
        registered["status"]
            .as_str()
            .unwrap()
            .contains("registered with 2 initial workers"),
        "{registered}"
    );
    let d = &json(server.manage(Method::GET, "/models/tiny"), 200)[0];
    assert_eq!(d["modelName"], "tiny");
    assert_eq!(d["modelVersion"], "1.0");
    assert_eq!(d["modelUrl"], "tiny.mar");
    assert_eq!(d["handler"], "text_embedding");
    assert_eq!(d["status"], "READY");
    assert_eq!(
        (d["minWorkers"].as_u64(), d["maxWorkers"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(
        (d["batchSize"].as_u64(), d["maxBatchDelay"].as_u64()),
        (Some(4), Some(7))
    );
    assert_eq!(d["responseTimeout"], 30);
    assert_eq!(d["workers"].as_array().unwrap().len(), 2);
    assert_eq!(d["queueDepth"], 0, "an idle model has nothing queued");
    assert!(d["loadTimeSeconds"].as_f64().unwrap() > 0.0);
    assert_eq!(d["setupConfig"]["max_length"], 16);
    assert_eq!(
        d["model"]["max_input_tokens"], 16,
        "setup_config's max_length reached the handler"
    );
    assert_eq!(d["archiveFormat"], "zip-store");

    // Registering the same version again is a conflict; bad requests are refused.
    error(
        server.manage(Method::POST, "/models?url=tiny.mar&synchronous=true"),
        409,
    );
    error(server.manage(Method::POST, "/models"), 400);
    error(server.manage(Method::POST, "/models?url="), 404);
    error(server.manage(Method::POST, "/models?url=missing.mar"), 404);
    // Handlers and runtimes are built in: naming another is refused.
    let message = error(
        server.manage(Method::POST, "/models?url=tiny.mar&handler=my_handler.py"),
        400,
    );
    assert!(message.contains("text_embedding"), "{message}");
    error(
        server.manage(Method::POST, "/models?url=tiny.mar&runtime=LSP"),
        400,
    );
    // Unparsable or negative numbers fall back to their defaults, as in TorchServe:
    // this registration goes ahead (and conflicts, being the same version).
    error(
        server.manage(
            Method::POST,
            "/models?url=tiny.mar&batch_size=lots&initial_workers=-1&max_batch_delay=x",
        ),
        409,
    );

    // Scale at run time: in the background (202) unless synchronous=true; TorchServe's
    // words for a backwards range.
    let message = error(
        server.manage(Method::PUT, "/models/tiny?min_worker=3&max_worker=2"),
        400,
    );
    assert_eq!(message, "max_worker cannot be less than min_worker.");
    let scaled = json(
        server.manage(
            Method::PUT,
            "/models/tiny/?min_worker=3&max_worker=4&synchronous=true",
        ),
        200,
    );
    assert_eq!(scaled["status"], "Workers scaled to 3 for model: tiny");
    let d = &json(server.manage(Method::GET, "/models/tiny"), 200)[0];
    assert_eq!(d["workers"].as_array().unwrap().len(), 3);
    assert_eq!(
        (d["minWorkers"].as_u64(), d["maxWorkers"].as_u64()),
        (Some(3), Some(4))
    );
    let accepted = json(
        server.manage(Method::PUT, "/models/tiny/1.0/?min_worker=1"),
        202,
    );
    assert_eq!(accepted["status"], "Processing worker updates...");
    assert_eq!(
        json(server.manage(Method::GET, "/models/tiny"), 200)[0]["workers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    error(
        server.manage(Method::PUT, "/models/ghost?min_worker=1"),
        404,
    );

    // Each API describes itself, as TorchServe's do.
    for (address, path) in [
        (&server.inference, "/predictions/{model_name}"),
        (&server.management, "/models/{model_name}"),
    ] {
        let described = json(
            server
                .http
                .request(Method::OPTIONS, format!("{address}/"))
                .send()
                .unwrap(),
            200,
        );
        assert_eq!(described["openapi"], "3.0.1");
        assert!(described["paths"][path].is_object(), "{described}");
    }

    // Unregister: gone from the list and from predictions.
    json(server.manage(Method::DELETE, "/models/tiny"), 200);
    error(server.manage(Method::GET, "/models/tiny"), 404);
    error(server.predict("tiny", r#"{"inputs": "x"}"#), 404);
    error(server.manage(Method::DELETE, "/models/tiny"), 404);
}

#[test]
fn versions_defaults_and_paging() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    // Version 2.0 has other random weights, so its answers differ.
    let v2 = fixture.tiny_bert("v2", &Default::default());
    fixture.archive(
        "tiny",
        "2.0",
        "text_embedding",
        Some(&v2),
        &["--archive-format", "no-archive", "--force"],
    );
    std::fs::rename(
        fixture.store().join("tiny"),
        fixture.store().join("tiny-v2"),
    )
    .unwrap();
    for name in ["a", "b", "c"] {
        fixture.archive(name, "1.0", "echo", None, &[]);
    }
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "tiny=tiny.mar,a.mar,b.mar,c.mar"],
    );
    server.wait_healthy();

    // Paging through four models two at a time.
    let first = json(server.manage(Method::GET, "/models?limit=2"), 200);
    assert_eq!(first["models"].as_array().unwrap().len(), 2);
    let token = first["nextPageToken"].as_str().unwrap().to_string();
    let second = json(
        server.manage(
            Method::GET,
            &format!("/models?limit=2&next_page_token={token}"),
        ),
        200,
    );
    let names: Vec<_> = first["models"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["models"].as_array().unwrap())
        .map(|m| m["modelName"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a", "b", "c", "tiny"]);
    assert!(second.get("nextPageToken").is_none());
    // As TorchServe: a negative or unparsable limit is 100, a bad page token 0.
    let lenient = json(
        server.manage(Method::GET, "/models/?limit=-3&next_page_token=soon"),
        200,
    );
    assert_eq!(lenient["models"].as_array().unwrap().len(), 4);

    // A second version, registered in the background.
    let accepted = server.manage(Method::POST, "/models?url=tiny-v2&synchronous=FALSE");
    assert_eq!(accepted.status(), 202);
    wait_ready(&server, "/models/tiny/2.0");
    let all = json(server.manage(Method::GET, "/models/tiny/all"), 200);
    let versions: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["modelVersion"].clone())
        .collect();
    assert_eq!(versions, ["1.0", "2.0"], "the default version first");

    let body = r#"{"inputs": "hello"}"#;
    let v1 = embeddings(&json(server.predict("tiny/1.0", body), 200));
    let v2 = embeddings(&json(server.predict("tiny/2.0", body), 200));
    assert_ne!(v1, v2);
    assert_eq!(embeddings(&json(server.predict("tiny", body), 200)), v1);

    // The default cannot be removed alone (TorchServe's 403); switch it, then it can.
    let message = error(server.manage(Method::DELETE, "/models/tiny/1.0"), 403);
    assert_eq!(message, "Cannot remove default version for model tiny");
    error(
        server.manage(Method::PUT, "/models/tiny/3.0/set-default"),
        404,
    );
    json(
        server.manage(Method::PUT, "/models/tiny/2.0/set-default"),
        200,
    );
    assert_eq!(embeddings(&json(server.predict("tiny", body), 200)), v2);
    json(server.manage(Method::DELETE, "/models/tiny/1.0"), 200);
    error(server.predict("tiny/1.0", body), 404);
    assert_eq!(embeddings(&json(server.predict("tiny", body), 200)), v2);
}

/// The status and words of each register and scale answer, as TorchServe's
/// `ApiUtils.handleRegister` and `updateModelWorkers` give them (and its postman suite
/// expects them).
#[test]
fn register_and_scale_answer_in_torchserves_words() {
    let fixture = Fixture::new();
    fixture.archive("e", "1.0", "echo", None, &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    server.wait_healthy();
    let status = |method: Method, path: &str, code: u16| {
        json(server.manage(method, path), code)["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let unregister = || {
        assert_eq!(
            status(Method::DELETE, "/models/e", 200),
            "Model \"e\" unregistered"
        );
    };

    // No initial workers: 200, synchronous or not.
    let zero = "Model \"e\" Version: 1.0 registered with 0 initial workers. Use scale workers \
                API to add workers for the model.";
    for sync in ["true", "false", "-1"] {
        let path = format!("/models?url=e.mar&initial_workers=0&synchronous={sync}");
        assert_eq!(status(Method::POST, &path, 200), zero);
        unregister();
    }
    // With workers: 200 once they serve, or 202 at once; a non-boolean is false.
    assert_eq!(
        status(Method::POST, "/models?url=e.mar&initial_workers=2", 200),
        "Model \"e\" Version: 1.0 registered with 2 initial workers"
    );
    unregister();
    for sync in ["false", "Nan"] {
        let path = format!("/models?url=e.mar&synchronous={sync}");
        assert_eq!(
            status(Method::POST, &path, 202),
            "Processing worker updates..."
        );
        unregister();
    }
    // `startup_timeout=0`: no worker starts in time, so a synchronous registration with
    // workers fails and leaves nothing registered; with none, the timeout never matters.
    let message = error(
        server.manage(
            Method::POST,
            "/models?url=e.mar&initial_workers=3&startup_timeout=0",
        ),
        500,
    );
    assert_eq!(message, "Failed to start workers for model e version: 1.0");
    error(server.manage(Method::GET, "/models/e"), 404);
    assert_eq!(
        status(
            Method::POST,
            "/models?url=e.mar&initial_workers=0&startup_timeout=0",
            200
        ),
        zero
    );

    // Scale: signed numbers. A negative max_worker alone is below min_worker's default
    // of 1 (400); a negative min_worker makes max_worker negative too (TorchServe's 500).
    let message = error(server.manage(Method::PUT, "/models/e?max_worker=-1"), 400);
    assert_eq!(message, "max_worker cannot be less than min_worker.");
    error(server.manage(Method::PUT, "/models/e?min_worker=-1"), 500);
    assert_eq!(
        status(Method::PUT, "/models/e?min_worker=nan&synchronous=nan", 202),
        "Processing worker updates..."
    );
    assert_eq!(
        status(
            Method::PUT,
            "/models/e/1.0?min_worker=0&synchronous=true",
            200
        ),
        "Workers scaled to 0 for model: e, version: 1.0"
    );
    // The range is checked before the model is looked up, as in TorchServe.
    error(
        server.manage(Method::PUT, "/models/ghost?min_worker=2&max_worker=1"),
        400,
    );
    unregister();

    // URLs TorchServe refuses in its own words: empty, and a remote archive whose file
    // name is already in the model store (found before any download).
    assert_eq!(
        error(server.manage(Method::POST, "/models?url="), 404),
        "empty url"
    );
    let message = error(
        server.manage(
            Method::POST,
            "/models?url=https://example.com/mar_files/e.mar&model_name=e",
        ),
        500,
    );
    assert_eq!(message, "Model file already exists e.mar");
    let message = error(server.manage(Method::POST, "/models"), 400);
    assert_eq!(message, "Parameter url is required.");
}
