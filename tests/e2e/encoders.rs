//! Every encoder family served (issue 31), from the tiny checkpoints that `handlers`
//! holds to transformers' own outputs: as `text_embedding` through `/predictions`,
//! OpenAI's `/v1/embeddings` and KServe v2; as `text_classification` with texts and text
//! pairs; and the one-logit XLM-RoBERTa cross-encoder through both rerank APIs. Each
//! answer is the handler's own, in process, for the same input. Cohere's Python client
//! reranks too (tests/clients/cohere_client.py), where the package is installed.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use spillway_handlers::tasks::text_classification::TextClassification;
use spillway_handlers::tasks::text_embedding::TextEmbedding;
use spillway_handlers::tasks::token_classification::TokenClassification;
use spillway_handlers::testing::decoder_fixtures::write_weights;
use spillway_handlers::testing::write_tokenizer;
use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::{Handler, LoadOptions, Output, Request};

use crate::support::{Fixture, TestServer, embeddings, json, repo_root};

const CLASSIFIERS: [&str; 4] = ["bert", "roberta", "distilbert", "modernbert"];
const RERANKER: &str = "xlm_roberta_reranker";
const QUERY: &str = "the quick brown fox";
const PASSAGES: [&str; 3] = [
    "hello world",
    "the quick brown fox jumps",
    "rust model server",
];

/// The fixture as a model folder: its config.json and weights, and the tiny WordPiece
/// tokenizer.
fn model_folder(fixture: &str, into: &Path) {
    let source = repo_root()
        .join("handlers/tests/fixtures/encoders")
        .join(fixture);
    std::fs::create_dir_all(into).unwrap();
    write_weights(&source, into).unwrap();
    std::fs::copy(source.join("config.json"), into.join("config.json")).unwrap();
    write_tokenizer(into).unwrap();
}

/// The handler's own answer, in process.
fn in_process(handler: &dyn Handler, request: Request) -> Output {
    let input = handler.prepare(request).unwrap();
    handler.run(&[input]).unwrap().remove(0).unwrap()
}

/// KServe v2's answer to `texts` as the BYTES tensor `text`.
fn kserve_texts(server: &TestServer, model: &str, texts: &[String]) -> serde_json::Value {
    json(
        reqwest::blocking::Client::new()
            .post(format!("{}/v2/models/{model}/infer", server.inference))
            .json(
                &serde_json::json!({"inputs": [{"name": "text", "shape": [texts.len()],
                "datatype": "BYTES", "data": texts}]}),
            )
            .send()
            .unwrap(),
        200,
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

#[test]
fn every_encoder_family_embeds_classifies_and_reranks_through_the_server() {
    let fixture = Fixture::new();
    let options = LoadOptions::default();
    let texts = vec![
        "hello world".to_string(),
        "spillway serves rust".to_string(),
    ];
    let pairs: Vec<(String, String)> = PASSAGES
        .iter()
        .map(|p| (QUERY.to_string(), p.to_string()))
        .collect();
    let mut expected = Vec::new();
    for name in CLASSIFIERS.iter().chain([&RERANKER]) {
        let folder = fixture.dir.path().join(name);
        model_folder(name, &folder);
        let files = FolderFiles::new(&folder);
        let Output::Embeddings(vectors) = in_process(
            &TextEmbedding::load(&files, &options).unwrap(),
            Request::Texts(texts.clone()),
        ) else {
            panic!("{name}: embeddings expected")
        };
        let classifier = TextClassification::load(&files, &options).unwrap();
        let Output::Classifications(single) =
            in_process(&classifier, Request::Texts(texts.clone()))
        else {
            panic!("{name}: classifications expected")
        };
        let Output::Classifications(paired) =
            in_process(&classifier, Request::Pairs(pairs.clone()))
        else {
            panic!("{name}: classifications expected")
        };
        fixture.archive(
            &format!("{name}-emb"),
            "1.0",
            "text_embedding",
            Some(&folder),
            &[],
        );
        fixture.archive(name, "1.0", "text_classification", Some(&folder), &[]);
        expected.push((*name, vectors, single, paired));
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let http = reqwest::blocking::Client::new();
    let texts_body = serde_json::json!({"inputs": texts}).to_string();
    for (name, vectors, single, paired) in &expected {
        // Embeddings, by each protocol.
        let emb = format!("{name}-emb");
        let got = embeddings(&json(server.predict(&emb, &texts_body), 200));
        assert_eq!(&got, vectors, "{name}: /predictions embeddings");
        let openai = json(
            http.post(format!("{}/v1/embeddings", server.inference))
                .json(&serde_json::json!({"model": emb, "input": texts}))
                .send()
                .unwrap(),
            200,
        );
        let got: Vec<Vec<f32>> = openai["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
            .collect();
        assert_eq!(&got, vectors, "{name}: /v1/embeddings");
        let kserve = kserve_texts(&server, &emb, &texts);
        let flat: Vec<f32> = serde_json::from_value(kserve["outputs"][0]["data"].clone()).unwrap();
        assert_eq!(flat, vectors.concat(), "{name}: KServe v2");

        // Classification of texts and of pairs in both shapes.
        let labels = json(server.predict(name, &texts_body), 200);
        for (i, want) in single.iter().enumerate() {
            assert_eq!(labels[i]["label"], want.label.as_str(), "{name}: {labels}");
            assert!(close(
                labels[i]["score"].as_f64().unwrap(),
                f64::from(want.score)
            ));
        }
        let arrays =
            serde_json::json!({"inputs": pairs.iter().map(|(q, p)| [q, p]).collect::<Vec<_>>()});
        let objects = serde_json::json!({"inputs": pairs.iter()
            .map(|(q, p)| serde_json::json!({"text": q, "text_pair": p})).collect::<Vec<_>>()});
        for body in [arrays, objects] {
            let labels = json(server.predict(name, &body.to_string()), 200);
            for (i, want) in paired.iter().enumerate() {
                assert_eq!(labels[i]["label"], want.label.as_str(), "{name}: {labels}");
                assert!(
                    close(labels[i]["score"].as_f64().unwrap(), f64::from(want.score)),
                    "{name} pair {i}: {labels} vs {want:?}"
                );
            }
        }
    }

    // The cross-encoder reranks: scores are its sigmoids (logits when raw), best first.
    let (_, _, _, paired) = expected.iter().find(|e| e.0 == RERANKER).unwrap();
    let mut order: Vec<usize> = (0..PASSAGES.len()).collect();
    order.sort_by(|&a, &b| paired[b].score.total_cmp(&paired[a].score));
    let tei = json(
        http.post(format!("{}/rerank", server.inference))
            .json(&serde_json::json!({"model": RERANKER, "query": QUERY,
                "texts": PASSAGES, "return_text": true}))
            .send()
            .unwrap(),
        200,
    );
    let ranked: Vec<usize> = tei
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(ranked, order, "{tei}");
    for result in tei.as_array().unwrap() {
        let i = result["index"].as_u64().unwrap() as usize;
        assert!(close(
            result["score"].as_f64().unwrap(),
            f64::from(paired[i].score)
        ));
        assert_eq!(result["text"], PASSAGES[i]);
    }
    let raw = json(
        http.post(format!("{}/rerank", server.inference))
            .json(&serde_json::json!({"model": RERANKER, "query": QUERY,
                "texts": PASSAGES, "raw_scores": true}))
            .send()
            .unwrap(),
        200,
    );
    let best = &raw[0];
    assert!(best.get("text").is_none(), "{raw}");
    assert!(close(
        best["score"].as_f64().unwrap(),
        f64::from(paired[order[0]].logit)
    ));
    let v1 = json(
        http.post(format!("{}/v1/rerank", server.inference))
            .json(&serde_json::json!({"model": RERANKER, "query": QUERY,
                "documents": [PASSAGES[0], {"text": PASSAGES[1]}, PASSAGES[2]], "top_n": 2}))
            .send()
            .unwrap(),
        200,
    );
    let results = v1["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{v1}");
    for (result, &i) in results.iter().zip(&order) {
        assert_eq!(result["index"], i);
        assert!(close(
            result["relevance_score"].as_f64().unwrap(),
            f64::from(paired[i].score)
        ));
        assert_eq!(result["document"]["text"], PASSAGES[i]);
    }
    assert!(v1["usage"]["total_tokens"].as_u64().unwrap() > 0, "{v1}");

    // Several classifiers: the model must be named; an embedding model cannot rerank.
    let unnamed = http
        .post(format!("{}/v1/rerank", server.inference))
        .json(&serde_json::json!({"query": QUERY, "documents": PASSAGES}))
        .send()
        .unwrap();
    let body = json(unnamed, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"model\""),
        "{body}"
    );
    let wrong = http
        .post(format!("{}/rerank", server.inference))
        .json(&serde_json::json!({"model": "bert-emb", "query": QUERY, "texts": PASSAGES}))
        .send()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 400);

    // Cohere's own client package.
    let test = "every_encoder_family_embeds_classifies_and_reranks_through_the_server (cohere)";
    if crate::clients::python_has("cohere", test) {
        crate::clients::run_client(
            &server,
            "cohere_client.py",
            &[server.inference.as_ref(), RERANKER.as_ref()],
            "done",
        );
    }
}

/// The token classifiers (BERT's and ModernBERT's) answer each text's entities through
/// /predictions and KServe v2, as the handler groups them in process.
#[test]
fn token_classifiers_answer_entities_through_the_server() {
    let fixture = Fixture::new();
    let texts = vec![
        "hello world from the rust model server".to_string(),
        "the quick brown fox".to_string(),
    ];
    let mut expected = Vec::new();
    for name in ["bert_ner", "modernbert_ner"] {
        let folder = fixture.dir.path().join(name);
        model_folder(name, &folder);
        let handler =
            TokenClassification::load(&FolderFiles::new(&folder), &LoadOptions::default()).unwrap();
        let Output::Entities(entities) = in_process(&handler, Request::Texts(texts.clone())) else {
            panic!("{name}: entities expected")
        };
        assert!(
            entities.iter().any(|e| !e.is_empty()),
            "{name}: no entity found"
        );
        fixture.archive(name, "1.0", "token_classification", Some(&folder), &[]);
        expected.push((name, entities));
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for (name, entities) in &expected {
        let got = json(
            server.predict(name, &serde_json::json!({"inputs": texts}).to_string()),
            200,
        );
        let kserve = kserve_texts(&server, name, &texts);
        for (i, want) in entities.iter().enumerate() {
            let via_kserve: serde_json::Value =
                serde_json::from_str(kserve["outputs"][0]["data"][i].as_str().unwrap()).unwrap();
            for answer in [&got[i], &via_kserve] {
                let answer = answer.as_array().unwrap();
                assert_eq!(answer.len(), want.len(), "{name} text {i}: {answer:?}");
                for (a, w) in answer.iter().zip(want) {
                    assert_eq!(a["entity_group"], w.entity_group.as_str());
                    assert_eq!(a["word"], w.word.as_str());
                    assert_eq!(
                        (a["start"].as_u64(), a["end"].as_u64()),
                        (Some(w.start as u64), Some(w.end as u64))
                    );
                    assert!(close(a["score"].as_f64().unwrap(), f64::from(w.score)));
                    // The span is the word's text (a group opening on a subword keeps its
                    // `##`, as transformers' decoder leaves it).
                    let span = &texts[i][w.start..w.end];
                    assert_eq!(span, w.word.trim_start_matches("##"), "{name}");
                }
            }
        }
    }
    // Pairs are for classifiers.
    let pairs = server.predict("bert_ner", r#"{"inputs": [["a", "b"]]}"#);
    assert_eq!(pairs.status().as_u16(), 400);
}
