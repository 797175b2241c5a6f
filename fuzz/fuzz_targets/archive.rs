#![no_main]
//! Fuzzes `spillway::fuzz_targets::archive` (see there for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway::fuzz_targets::archive(data));
