//! Images (issue 35): a DenseNet shipped as TorchServe's quickstart ships one — a `.pth`
//! state dict with the legacy key names, `index_to_name.json`, and a `model.py` that is
//! never run — served by `image_classifier` and asked the way TorchServe's users ask:
//! `curl -T` (a PUT of the raw image), a POST of the raw body, a multipart field `data`,
//! base64 in JSON, KServe v1 and KServe v2 (base64 and the binary extension). Every answer
//! is the handler's own, in process, for the same file. Broken images are client errors
//! that name the problem while good requests sent with them keep their answers.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use spillway_handlers::tasks::image_classifier::ImageClassifier;
use spillway_handlers::testing::decoder_fixtures::rebuild;
use spillway_handlers::testing::pth::write_state_dict;
use spillway_handlers::weights::files::{ConvertedWeights, FolderFiles};
use spillway_handlers::{Handler, LoadOptions, Output, Request, ScoredLabel};

use crate::support::{Fixture, TestServer, json, repo_root};

fn images() -> PathBuf {
    repo_root().join("handlers/tests/fixtures/images")
}

/// The quickstart's archive contents, from the DenseNet fixture: the state dict as
/// `torch.save` writes it, labels as `[wnid, label]` lists, and a `model.py` that would
/// fail loudly if anything ran it.
fn quickstart_folder(into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let tensors = rebuild(&images().join("densenet")).unwrap();
    write_state_dict(&tensors, &into.join("densenet161-8d451a50.pth")).unwrap();
    let labels: serde_json::Map<String, serde_json::Value> = (0..10)
        .map(|i| {
            (
                i.to_string(),
                serde_json::json!([format!("n0{i}"), format!("label_{i}")]),
            )
        })
        .collect();
    std::fs::write(
        into.join("index_to_name.json"),
        serde_json::to_vec(&labels).unwrap(),
    )
    .unwrap();
    std::fs::write(
        into.join("model.py"),
        "raise SystemExit('model.py must never run')\n",
    )
    .unwrap();
}

/// The handler's own answer for `image`, in process.
fn in_process(folder: &Path, image: &[u8]) -> Vec<ScoredLabel> {
    let offload = tempfile::tempdir().unwrap();
    let archive = FolderFiles::new(folder);
    let converted = spillway_handlers::weights::pickle::materialize(
        &archive,
        "densenet161-8d451a50.pth",
        offload.path(),
    )
    .unwrap();
    let files = ConvertedWeights {
        weights: FolderFiles::new(converted),
        rest: Arc::new(archive),
    };
    let handler = ImageClassifier::load(&files, &LoadOptions::default()).unwrap();
    let input = handler
        .prepare(Request::Images(vec![image.to_vec()]))
        .unwrap();
    match handler.run(&[input]).unwrap().remove(0).unwrap() {
        Output::Labels(mut per_image) => per_image.remove(0),
        other => panic!("{other:?}"),
    }
}

/// An answer object's (label, probability) pairs in the order written.
fn pairs(text: &str) -> Vec<(String, f64)> {
    // The object is parsed by hand to see the order (serde_json's maps sort keys).
    let inner = text.trim().trim_start_matches('{').trim_end_matches('}');
    inner
        .split(',')
        .map(|field| {
            let (label, p) = field.rsplit_once(':').unwrap();
            (serde_json::from_str(label).unwrap(), p.parse().unwrap())
        })
        .collect()
}

fn assert_answer(text: &str, want: &[ScoredLabel], how: &str) {
    let got = pairs(text);
    assert_eq!(got.len(), 5, "{how}: {text}");
    for ((label, p), want) in got.iter().zip(want) {
        assert_eq!(label, &want.label, "{how}: {text}");
        assert!(
            (p - f64::from(want.probability)).abs() < 1e-6,
            "{how}: {text} vs {want:?}"
        );
    }
}

/// A multipart/form-data body with `image` as the part `data`.
fn form(image: &[u8]) -> (String, Vec<u8>) {
    let mut body = b"--spillwayXboundary\r\nContent-Disposition: form-data; name=\"data\"; filename=\"kitten.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".to_vec();
    body.extend_from_slice(image);
    body.extend_from_slice(b"\r\n--spillwayXboundary--\r\n");
    (
        "multipart/form-data; boundary=spillwayXboundary".into(),
        body,
    )
}

#[test]
fn the_quickstart_archive_answers_curl_t_and_every_protocol() {
    let fixture = Fixture::new();
    let folder = fixture.dir.path().join("densenet161");
    quickstart_folder(&folder);
    fixture.archive("densenet161", "1.0", "image_classifier", Some(&folder), &[]);
    let jpeg = std::fs::read(images().join("inputs/scene.jpg")).unwrap();
    let png = std::fs::read(images().join("inputs/tall.png")).unwrap();
    let want_jpeg = in_process(&folder, &jpeg);
    let want_png = in_process(&folder, &png);
    assert!(
        want_jpeg.iter().all(|l| l.label.starts_with("label_")),
        "{want_jpeg:?}"
    );

    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--service-envelope", "kserve"],
    );
    server.wait_healthy();
    let url = format!("{}/predictions/densenet161", server.inference);
    let http = reqwest::blocking::Client::new();
    let text = |r: reqwest::blocking::Response, how: &str| {
        let status = r.status().as_u16();
        let body = r.text().unwrap();
        assert_eq!(status, 200, "{how}: {body}");
        body
    };

    // TorchServe's quickstart command, with the real curl where there is one.
    let kitten = fixture.dir.path().join("kitten_small.jpg");
    std::fs::write(&kitten, &jpeg).unwrap();
    match Command::new("curl").arg("--version").output() {
        Ok(_) => {
            let out = Command::new("curl")
                .args(["--silent", "--show-error", &url, "-T", "kitten_small.jpg"])
                .current_dir(fixture.dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_answer(&String::from_utf8_lossy(&out.stdout), &want_jpeg, "curl -T");
        }
        Err(_) => eprintln!("SKIPPED curl -T: no curl on this machine (the PUT below stands in)"),
    }
    assert_answer(
        &text(http.put(&url).body(jpeg.clone()).send().unwrap(), "PUT"),
        &want_jpeg,
        "PUT",
    );
    let posted = http
        .post(&url)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .unwrap();
    assert_answer(&text(posted, "POST png"), &want_png, "POST png");
    let (content_type, body) = form(&jpeg);
    let multipart = http
        .post(&url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .unwrap();
    assert_answer(&text(multipart, "multipart"), &want_jpeg, "multipart");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    let b64_png = base64::engine::general_purpose::STANDARD.encode(&png);
    let json_body = http
        .post(&url)
        .json(&serde_json::json!({"data": b64}))
        .send()
        .unwrap();
    assert_answer(&text(json_body, "base64 JSON"), &want_jpeg, "base64 JSON");
    // Several images in one request: one object each, in order.
    let both = text(
        http.post(&url)
            .json(&serde_json::json!([b64, b64_png]))
            .send()
            .unwrap(),
        "two",
    );
    let both = objects(&both);
    assert_eq!(both.len(), 2);
    assert_answer(&both[0], &want_jpeg, "first of two");
    assert_answer(&both[1], &want_png, "second of two");

    // KServe v1 and v2.
    let v1 = text(
        http.post(format!(
            "{}/v1/models/densenet161:predict",
            server.inference
        ))
        .json(&serde_json::json!({"instances": [{"data": b64}, {"b64": b64_png}]}))
        .send()
        .unwrap(),
        "KServe v1",
    );
    let predictions = objects(&v1[v1.find('[').unwrap()..]);
    assert_eq!(predictions.len(), 2, "{v1}");
    assert_answer(&predictions[0], &want_jpeg, "KServe v1");
    assert_answer(&predictions[1], &want_png, "KServe v1");
    let v2 = json(
        http.post(format!("{}/v2/models/densenet161/infer", server.inference))
            .json(
                &serde_json::json!({"inputs": [{"name": "data", "shape": [1],
                "datatype": "BYTES", "data": [b64]}]}),
            )
            .send()
            .unwrap(),
        200,
    );
    assert_eq!(v2["outputs"][0]["name"], "labels", "{v2}");
    assert_answer(
        v2["outputs"][0]["data"][0].as_str().unwrap(),
        &want_jpeg,
        "KServe v2",
    );
    // The binary extension: the JPEG's bytes as they are, after the JSON header.
    let header = serde_json::json!({"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": jpeg.len() + 4}}]})
    .to_string();
    let mut binary = header.clone().into_bytes();
    binary.extend_from_slice(&(jpeg.len() as u32).to_le_bytes());
    binary.extend_from_slice(&jpeg);
    let v2_binary = json(
        http.post(format!("{}/v2/models/densenet161/infer", server.inference))
            .header("content-type", "application/octet-stream")
            .header("Inference-Header-Content-Length", header.len().to_string())
            .body(binary)
            .send()
            .unwrap(),
        200,
    );
    assert_answer(
        v2_binary["outputs"][0]["data"][0].as_str().unwrap(),
        &want_jpeg,
        "KServe v2 binary",
    );
    server.terminate();
}

/// The objects of a JSON array of flat objects, as written (their order kept).
fn objects(array: &str) -> Vec<String> {
    let inner = array.trim().trim_start_matches('[');
    let inner = &inner[..inner.rfind(']').unwrap()];
    inner
        .split("},{")
        .map(|o| format!("{{{}}}", o.trim_matches(|c| c == '{' || c == '}')))
        .collect()
}

/// Broken images each get a 400 naming the problem, sent together with good requests
/// that all keep their answers; the server stays up.
#[test]
fn broken_images_are_client_errors_and_good_requests_keep_their_answers() {
    let fixture = Fixture::new();
    let folder = fixture.dir.path().join("quick");
    quickstart_folder(&folder);
    fixture.archive("quick", "1.0", "image_classifier", Some(&folder), &[]);
    let jpeg = std::fs::read(images().join("inputs/scene.jpg")).unwrap();
    let want = in_process(&folder, &jpeg);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let url = format!("{}/predictions/quick", server.inference);

    let bomb = spillway_handlers::testing::images::png_declaring(200_000);
    let broken: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated JPEG",
            jpeg[..jpeg.len() / 3].to_vec(),
            "cannot be decoded",
        ),
        ("huge declared PNG", bomb, "past the limit"),
        (
            "zip renamed .png",
            b"PK\x03\x04\x14\x00\x00\x00\x08\x00 not a picture".to_vec(),
            "not an image",
        ),
        ("empty body", Vec::new(), "no image"),
    ];
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for round in 0..3 {
            for (what, bytes, says) in &broken {
                let url = url.clone();
                handles.push(scope.spawn(move || {
                    let r = reqwest::blocking::Client::new()
                        .put(&url)
                        .body(bytes.clone())
                        .send()
                        .unwrap();
                    let status = r.status().as_u16();
                    let body = r.text().unwrap();
                    assert_eq!(status, 400, "{what} (round {round}): {body}");
                    let message =
                        serde_json::from_str::<serde_json::Value>(&body).unwrap()["message"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                    assert!(message.contains(says), "{what}: {body}");
                }));
            }
            let (url, jpeg, want) = (url.clone(), jpeg.clone(), want.clone());
            handles.push(scope.spawn(move || {
                let r = reqwest::blocking::Client::new()
                    .put(&url)
                    .body(jpeg)
                    .send()
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                assert_answer(&r.text().unwrap(), &want, "good request among broken ones");
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    let after = reqwest::blocking::Client::new()
        .put(&url)
        .body(jpeg)
        .send()
        .unwrap();
    assert_eq!(after.status().as_u16(), 200);
    server.terminate();
}

/// README's quickstart block: its three commands, in order.
fn readme_quickstart() -> [String; 3] {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("TorchServe's quickstart runs unchanged")
        .expect("the README shows the quickstart");
    let block = &readme[start..];
    let block = &block[block.find("```sh").unwrap() + 5..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("torch-model-archiver ") && lines[1].starts_with("spillway serve ")
    );
    assert!(lines[2].starts_with("curl "));
    [lines[0].clone(), lines[1].clone(), lines[2].clone()]
}

/// TorchServe's quickstart as the README shows it: torch-model-archiver (the real one,
/// from PyPI) packs model.py, the .pth and index_to_name.json; `spillway serve` takes the
/// store and `--models` as written; curl -T gets the handler's own answer.
#[test]
fn the_readme_quickstart_runs_as_written() {
    let [archive, serve, curl] = readme_quickstart();
    if !crate::clients::python_has("model_archiver", "the_readme_quickstart_runs_as_written") {
        return;
    }
    let fixture = Fixture::new();
    let work = fixture.dir.path().join("quickstart");
    quickstart_folder(&work);
    std::fs::create_dir_all(work.join("model_store")).unwrap();
    std::fs::copy(
        images().join("inputs/scene.jpg"),
        work.join("kitten_small.jpg"),
    )
    .unwrap();
    // The console script where pip put it on PATH, else the same entry point by module.
    let archive = if Command::new("torch-model-archiver")
        .arg("--help")
        .output()
        .is_ok()
    {
        archive
    } else {
        archive.replacen(
            "torch-model-archiver",
            "python3 -m model_archiver.model_packaging",
            1,
        )
    };
    let packed = Command::new("bash")
        .args(["-c", &archive])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(
        packed.status.success(),
        "{archive}: {}",
        String::from_utf8_lossy(&packed.stderr)
    );
    let mar = work.join("model_store/densenet161.mar");
    assert!(
        mar.is_file(),
        "torch-model-archiver wrote no {}",
        mar.display()
    );

    // `spillway serve --model-store model_store --models ...`: the store and the flags as
    // written, on free ports.
    let words: Vec<&str> = serve.split_whitespace().collect();
    let store_at = words.iter().position(|w| *w == "--model-store").unwrap();
    let store = work.join(words[store_at + 1]);
    let rest: Vec<&str> = words[2..]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i + 2 != store_at && *i + 2 != store_at + 1)
        .map(|(_, w)| *w)
        .collect();
    let server = TestServer::start(&store, &fixture.cache(), &rest);
    server.wait_healthy();
    let host = server.inference.trim_start_matches("http://").to_string();
    let curl = curl.replace("127.0.0.1:8080", &host);
    let out = Command::new("bash")
        .args([
            "-c",
            &curl.replacen("curl ", "curl --silent --show-error ", 1),
        ])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{curl}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = in_process(
        &work,
        &std::fs::read(work.join("kitten_small.jpg")).unwrap(),
    );
    assert_answer(
        &String::from_utf8_lossy(&out.stdout),
        &want,
        "the README's curl -T",
    );
    server.terminate();
}

/// Hugging Face image classifiers — ViT, ResNet and ConvNeXt (config.json,
/// preprocessor_config.json, safetensors) — served by image_classifier: planned from
/// their headers, labels from id2label, preprocessing from their processor; each answer
/// is the handler's own.
#[test]
fn hugging_face_classifiers_classify_through_the_server() {
    let fixture = Fixture::new();
    let families = [
        ("vit", "vit_label_"),
        ("hf_resnet", "resnet_label_"),
        ("convnext", "convnext_label_"),
    ];
    let png = std::fs::read(images().join("inputs/scene.png")).unwrap();
    let mut wants = Vec::new();
    for (family, label) in families {
        let folder = fixture.dir.path().join(family);
        let source = images().join(family);
        spillway_handlers::testing::decoder_fixtures::write_weights(&source, &folder).unwrap();
        for file in ["config.json", "preprocessor_config.json"] {
            std::fs::copy(source.join(file), folder.join(file)).unwrap();
        }
        fixture.archive(family, "1.0", "image_classifier", Some(&folder), &[]);
        let handler =
            ImageClassifier::load(&FolderFiles::new(&folder), &LoadOptions::default()).unwrap();
        let input = handler.prepare(Request::Images(vec![png.clone()])).unwrap();
        let Output::Labels(mut want) = handler.run(&[input]).unwrap().remove(0).unwrap() else {
            panic!("labels expected")
        };
        let want = want.remove(0);
        assert!(
            want.iter().all(|l| l.label.starts_with(label)),
            "{family}: {want:?}"
        );
        wants.push(want);
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for ((family, _), want) in families.iter().zip(&wants) {
        let answer = reqwest::blocking::Client::new()
            .put(format!("{}/predictions/{family}", server.inference))
            .body(png.clone())
            .send()
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{family}");
        assert_answer(&answer.text().unwrap(), want, family);
    }
    server.terminate();
}
