#![no_main]
//! Fuzzes `spillway::fuzz_targets::setup_config` (see there for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway::fuzz_targets::setup_config(data));
