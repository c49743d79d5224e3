//! Fuzz target: `switchyard::checks::commands` on arbitrary bytes (see src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::checks::commands(data));
