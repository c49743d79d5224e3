//! Fuzz target: `switchyard::checks::request` on arbitrary bytes (see src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::checks::request(data));
