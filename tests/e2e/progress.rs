//! Long work reports progress: `spillway archive` of a model folder with 64 MB of
//! incompressible bytes into a `.tar.gz` logs bytes done of the total and the rate every
//! `SPILLWAY_PROGRESS_SECONDS` (0.05 here, 3 by default) when stderr is not a terminal.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::Command;

use crate::support::{BIN, Fixture};

#[test]
fn a_long_archive_logs_its_progress() {
    let fixture = Fixture::new();
    let dir = fixture.tiny_bert("big", &Default::default());
    // Incompressible filler, so gzip takes its time.
    let mut filler =
        std::io::BufWriter::new(std::fs::File::create(dir.join("filler.bin")).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..64 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        filler.write_all(&block).unwrap();
    }
    drop(filler);
    let filler = dir.join("filler.bin");
    let output = Command::new(BIN)
        .args([
            "archive",
            "--model-name",
            "big",
            "--handler",
            "text_embedding",
        ])
        .arg("--model-dir")
        .arg(&dir)
        .args(["--archive-format", "tgz", "--extra-files"])
        .arg(&filler)
        .arg("--export-path")
        .arg(fixture.store())
        .env("RUST_LOG", "info")
        .env("SPILLWAY_PROGRESS_SECONDS", "0.05")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("spillway archive: writing big.tar.gz:"))
        .unwrap_or_else(|| panic!("no progress line in:\n{stderr}"));
    assert!(
        line.contains(" MiB of 64.") && line.contains("MB/s"),
        "{line}"
    );
    let lines = stderr
        .lines()
        .filter(|l| l.contains("writing big.tar.gz:"))
        .count();
    assert!(lines >= 2, "reported as it went, not once: {stderr}");
}
