#![no_main]
//! Fuzzes `spillway::fuzz_targets::safetensors` (see there for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway::fuzz_targets::safetensors(data));
