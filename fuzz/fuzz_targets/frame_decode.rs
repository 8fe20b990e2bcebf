//! libFuzzer entry point of target `frame_decode` (body in `fuzz/src/frame_decode.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qssh_fuzz::frame_decode::run(data);
});
