//! The bodies of qssh's fuzz targets, shared by the libFuzzer binaries in `fuzz_targets/` and
//! by the seeded smoke harness `tests/fuzz_smoke.rs` of the main crate (which includes this
//! file with `#[path]`, so it must build with nothing but `qssh` and `std`).
//!
//! Every `run` must never panic, whatever its input: that is the only property the fuzzers
//! check. Each also returns a small summary of what the input reached, which the smoke
//! harness uses to check that the seeds get deep into the code. `seeds()` gives each target's
//! seed corpus (written to `fuzz/seeds/` by `fuzz/gen-seeds.sh`).

pub mod fixture;
pub mod frame_decode;
pub mod handshake_responder;
pub mod session_input;

/// Target names, in the order of `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["frame_decode", "handshake_responder", "session_input"];

/// Seed inputs of a target, by name.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "frame_decode" => frame_decode::seeds(),
        "handshake_responder" => handshake_responder::seeds(),
        "session_input" => session_input::seeds(),
        other => panic!("unknown fuzz target {other}"),
    }
}
