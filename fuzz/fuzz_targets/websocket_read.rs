//! Fuzz target: `switchyard::checks::websocket_read` on arbitrary bytes (see src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::checks::websocket_read(data));
