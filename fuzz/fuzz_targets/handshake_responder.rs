//! libFuzzer entry point of target `handshake_responder` (body in `fuzz/src/handshake_responder.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qssh_fuzz::handshake_responder::run(data);
});
