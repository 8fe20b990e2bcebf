//! libFuzzer entry point of target `session_input` (body in `fuzz/src/session_input.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qssh_fuzz::session_input::run(data);
});
