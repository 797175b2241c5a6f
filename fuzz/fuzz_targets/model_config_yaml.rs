#![no_main]
//! Fuzzes `spillway::fuzz_targets::model_config_yaml` (see there for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spillway::fuzz_targets::model_config_yaml(data));
