//! The README's `curl` examples, run verbatim with the real curl against a server that
//! serves the models they name (MiniLM as all-MiniLM-L6-v2 with the repository's
//! configs, SmolLM2 as smollm2) — only the addresses (inference, management, metrics)
//! are swapped for the test's ports.
//! Sample output written under an example (`# [[...` or `# {...`) must match what the
//! server answers.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::support::{Fixture, TestServer, fetch_model, repo_root};

/// A curl command from the README and the sample output written under it.
#[derive(Debug)]
struct Example {
    command: String,
    expected: Vec<String>,
}

/// Every `curl` to the local server in the README's `sh` blocks (continued lines
/// joined), with the `# {` / `# [[` comment lines that follow it.
fn examples(readme: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            continue;
        }
        let whole = std::mem::take(&mut pending) + line;
        let trimmed = whole.trim();
        if trimmed.starts_with("curl ") && trimmed.contains("localhost:808") {
            examples.push(Example {
                command: trimmed.to_string(),
                expected: Vec::new(),
            });
        } else if let Some(sample) = trimmed.strip_prefix("# ")
            && (sample.starts_with('{') || sample.starts_with("[["))
            && let Some(last) = examples.last_mut()
        {
            last.expected.push(sample.to_string());
        }
    }
    examples
}

/// Checks `output` against a sample line: `[[a, b, ...]]` gives an embedding's first
/// numbers (to the 4 decimals shown); `{...}` gives fragments, split at `...`, that
/// must each appear in the output.
fn check_sample(command: &str, sample: &str, output: &str) {
    if let Some(numbers) = sample.strip_prefix("[[") {
        let shown: Vec<f64> = numbers
            .split("...")
            .next()
            .unwrap()
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        assert!(!shown.is_empty(), "{sample}");
        let answer: Vec<Vec<f64>> = serde_json::from_str(output).unwrap();
        for (i, want) in shown.iter().enumerate() {
            assert!(
                (answer[0][i] - want).abs() <= 5e-5,
                "{command}\n  sample {sample}\n  answer starts {:?}",
                &answer[0][..shown.len()]
            );
        }
        return;
    }
    for fragment in sample.split("...") {
        let fragment = fragment.trim().trim_matches(',');
        if !fragment.is_empty() {
            assert!(
                output.contains(fragment),
                "{command}\n  sample fragment {fragment}\n  not in the answer {output}"
            );
        }
    }
}

#[test]
fn the_readme_curl_examples_run_verbatim_and_answer_as_their_samples_show() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let examples = examples(&readme);
    for api in ["/predictions/", "localhost:8081", "/v1/", "/v2/"] {
        assert!(
            examples.iter().any(|e| e.command.contains(api)),
            "the README shows no curl example for {api}: {examples:#?}"
        );
    }
    assert!(examples.iter().any(|e| !e.expected.is_empty()));

    let fixture = Fixture::new();
    let minilm = fetch_model("minilm");
    let smollm2 = fetch_model("smollm2");
    let configs = repo_root().join("configs");
    fixture.archive(
        "all-MiniLM-L6-v2",
        "1.0",
        "text_embedding",
        Some(&minilm),
        &[
            "--config-file",
            configs.join("model-config.yaml").to_str().unwrap(),
            "--extra-files",
            configs.join("setup_config.json").to_str().unwrap(),
        ],
    );
    fixture.archive("smollm2", "1.0", "text_generation", Some(&smollm2), &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let host = |url: &str| url.trim_start_matches("http://").to_string();
    for example in &examples {
        let command = example
            .command
            .replace("localhost:8080", &host(&server.inference))
            .replace("localhost:8081", &host(&server.management))
            .replace("localhost:8082", &host(&server.metrics));
        let started = std::time::Instant::now();
        let output = Command::new("bash")
            .args([
                "-c",
                &command.replacen("curl ", "curl --silent --show-error ", 1),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!(
            "{:>7.1?}  {}",
            started.elapsed(),
            example.command.lines().next().unwrap_or("")
        );
        assert!(
            output.status.success() && !stdout.is_empty(),
            "{command}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !stdout.contains("\"error\"")
                && !stdout.contains("\"code\":4")
                && !stdout.contains("\"code\":5"),
            "{command}\n  answered {stdout}"
        );
        for sample in &example.expected {
            check_sample(&example.command, sample, &stdout);
        }
    }
}
