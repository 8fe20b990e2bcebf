//! The fuzz targets' bodies (`fuzz/src/`) driven without libFuzzer: over their seed corpora
//! and over thousands of seeded random and mutated inputs. Runs on the stable toolchain as a
//! normal test, so every `cargo test` exercises the targets; `fuzz/smoke.sh` runs it with
//! more inputs, and libFuzzer itself when cargo-fuzz works (see `fuzz/README.md`).
//!
//! Environment: `QSSH_FUZZ_ITERS` (inputs per target, default 300; frame_decode gets 20x),
//! `QSSH_FUZZ_SEED` (generator seed, default fixed so runs are reproducible),
//! `QSSH_FUZZ_WRITE_SEEDS=1` (rewrite `fuzz/seeds/`, as `fuzz/gen-seeds.sh` does).

#[path = "../fuzz/src/lib.rs"]
mod targets;

use qssh::core::handshake::HandshakeError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;
use targets::handshake_responder::Message;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        }
        Err(_) => default,
    }
}

/// SplitMix64: a small, seeded, reproducible generator (not for keys).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

const INTERESTING_U8: [u8; 7] = [0, 1, 0x7f, 0x80, 0xfe, 0xff, 0x10];
const INTERESTING_U32: [u32; 9] = [
    0,
    1,
    0x7f,
    0xff,
    0x4000,
    0xffff,
    0x8001,
    0x7fff_ffff,
    0xffff_ffff,
];

/// One libFuzzer-style mutation round (1 to 4 edits) of `input`; `other` is for splicing.
fn mutate(g: &mut Gen, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + g.below(4) {
        if v.is_empty() {
            let n = 1 + g.below(16);
            v = g.bytes(n);
            continue;
        }
        let at = g.below(v.len());
        match g.below(8) {
            0 => v[at] ^= 1 << g.below(8),
            1 => v[at] = INTERESTING_U8[g.below(INTERESTING_U8.len())],
            2 => {
                let x = INTERESTING_U32[g.below(INTERESTING_U32.len())];
                let width = if g.below(2) == 0 { 2 } else { 4 };
                let bytes = &x.to_be_bytes()[4 - width..];
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            3 => {
                let end = (at + 1 + g.below(64)).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let from = g.below(v.len());
                let end = (from + 1 + g.below(64)).min(v.len());
                let chunk = v[from..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 => v.truncate(at),
            6 => {
                if !other.is_empty() {
                    let from = g.below(other.len());
                    v.truncate(at);
                    v.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                let n = 1 + g.below(32);
                let bytes = g.bytes(n);
                v.splice(at..at, bytes);
            }
        }
    }
    v
}

/// Runs `body` on `input`; on a panic, saves the input under `fuzz/artifacts/TARGET/` and
/// fails with how to reproduce it.
fn guarded<T>(target: &str, input: &[u8], body: impl FnOnce(&[u8]) -> T) -> T {
    match catch_unwind(AssertUnwindSafe(|| body(input))) {
        Ok(out) => out,
        Err(_) => {
            let dir = fuzz_dir().join("artifacts").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let hash = qssh::core::crypto::sha256(&[input]);
            let name: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
            let path = dir.join(format!("crash-{name}"));
            let saved = std::fs::write(&path, input).is_ok();
            let shown: String = input.iter().take(64).map(|b| format!("{b:02x}")).collect();
            panic!(
                "fuzz target {target} panicked on a {}-byte input (first bytes {shown}); {}; \
                 reproduce with: cd fuzz && cargo fuzz run -s none {target} {}",
                input.len(),
                if saved { "saved" } else { "could NOT be saved" },
                path.display()
            );
        }
    }
}

/// Feeds `QSSH_FUZZ_ITERS * weight` inputs to a target (cheap targets get more): mutated
/// seeds (4 in 5) and random bytes. Returns the outcomes, for the caller's checks.
fn drive<T>(target: &str, salt: u64, weight: usize, run: impl Fn(&[u8]) -> T) -> Vec<T> {
    let iters = env_u64("QSSH_FUZZ_ITERS", 300) as usize * weight;
    let seed = env_u64("QSSH_FUZZ_SEED", 0x5eed_f022) ^ salt;
    let seeds: Vec<Vec<u8>> = targets::seeds(target).into_iter().map(|(_, s)| s).collect();
    let mut g = Gen(seed);
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(iters);
    for _ in 0..iters {
        let input = if g.below(5) == 0 {
            let n = g.below(512);
            g.bytes(n)
        } else {
            let a = &seeds[g.below(seeds.len())];
            let b = &seeds[g.below(seeds.len())];
            mutate(&mut g, a, b)
        };
        outcomes.push(guarded(target, &input, &run));
    }
    println!(
        "fuzz smoke: {target}: {iters} random and mutated inputs (QSSH_FUZZ_SEED={seed:#x}) in {:.1} s, no panic",
        started.elapsed().as_secs_f64()
    );
    outcomes
}

#[test]
fn frame_decode_survives_random_and_mutated_records() {
    let out = drive("frame_decode", 1, 20, targets::frame_decode::run);
    let decoded = out.iter().filter(|o| o.is_some()).count();
    assert!(
        decoded > 0,
        "no input decoded: the mutator never kept a valid frame"
    );
    assert!(
        decoded < out.len(),
        "every input decoded: the decoder refuses nothing?"
    );
}

#[test]
fn handshake_responder_survives_random_and_mutated_messages() {
    let out = drive(
        "handshake_responder",
        2,
        1,
        targets::handshake_responder::run,
    );
    let got = |m: Message, ok: bool| {
        out.iter()
            .flatten()
            .filter(|(msg, r)| *msg == m && r.is_ok() == ok)
            .count()
    };
    // Mutations of a valid message: many are refused, and the ones that only touch the
    // random or the ephemeral key (X25519 accepts most values) still go through.
    assert!(got(Message::Init, false) > 0 && got(Message::Finish, false) > 0);
    assert!(
        got(Message::Init, true) > 0,
        "no mutated INIT reached the signature: mutations too coarse"
    );
}

#[test]
fn session_input_survives_random_and_mutated_streams() {
    let out = drive("session_input", 3, 1, targets::session_input::run);
    if !targets::fixture::fast_peer_setup() {
        println!("note: fuzz/src/fixture.rs replays the initiator per input (slower); see initiator_keys()");
    }
    let out: Vec<_> = out.into_iter().flatten().collect();
    assert!(out.iter().any(|o| o.established && o.data_events > 0));
    assert!(out.iter().any(|o| o.closed));
    assert!(out.iter().any(|o| !o.established));
}

#[test]
fn seeds_reach_deep_states() {
    use targets::session_input::Outcome;
    for (name, input) in targets::seeds("frame_decode") {
        let n = targets::frame_decode::run(&input);
        let want = if name == "all-frames" { 11 } else { 1 };
        assert_eq!(n, Some(want), "frame seed {name}");
    }

    for (name, input) in targets::seeds("handshake_responder") {
        let got = targets::handshake_responder::run(&input).expect("seeds are not empty");
        let want = match name.as_str() {
            "init-valid" => (Message::Init, Ok(())),
            "finish-valid" => (Message::Finish, Ok(())),
            "init-psk" => (Message::Init, Err(HandshakeError::PskUnexpected)),
            "init-slh-dsa-only" => (
                Message::Init,
                Err(HandshakeError::SignatureAlgorithmRefused("falcon512")),
            ),
            "init-unknown-version" => (
                Message::Init,
                Err(HandshakeError::NoCommonVersion(vec![0xEE])),
            ),
            other => panic!("no expectation for handshake seed {other}"),
        };
        assert_eq!(got, want, "handshake seed {name}");
    }

    for (name, input) in targets::seeds("session_input") {
        let o: Outcome = targets::session_input::run(&input).expect("seeds are not empty");
        assert!(
            o.established,
            "session seed {name} never established: {o:?}"
        );
        let ok = match name.as_str() {
            "responder-handshake" => !o.closed && o.events >= 2,
            "established-record" => !o.closed && o.events >= 1,
            "responder-handshake-bytewise" | "initiator-resp" => !o.closed,
            "script-chat" => o.data_events == 1 && o.closed,
            "script-we-open" => !o.closed && o.records_sent >= 4,
            "script-tamper" | "script-replay" | "script-timers" | "script-split-raw-eof" => {
                o.closed
            }
            "script-ratchet-steps" => {
                o.data_events == 20 && !o.closed && o.dh_steps >= 10 && o.pq_steps >= 1
            }
            other => panic!("no expectation for session seed {other}"),
        };
        assert!(ok, "session seed {name}: unexpected outcome {o:?}");
    }
}

/// The committed corpora under `fuzz/seeds/` are exactly what the seed functions generate
/// (so they stay valid as the protocol changes). `QSSH_FUZZ_WRITE_SEEDS=1` rewrites them.
#[test]
fn committed_seed_corpora_are_current() {
    let write = std::env::var("QSSH_FUZZ_WRITE_SEEDS").is_ok_and(|v| v == "1");
    for target in targets::TARGETS {
        let dir = fuzz_dir().join("seeds").join(target);
        let seeds = targets::seeds(target);
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, input) in &seeds {
                std::fs::write(dir.join(name), input).unwrap();
            }
            println!("wrote {} seeds to {}", seeds.len(), dir.display());
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run bash fuzz/gen-seeds.sh)", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut names: Vec<String> = seeds.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        assert_eq!(
            on_disk,
            names,
            "{}: run bash fuzz/gen-seeds.sh",
            dir.display()
        );
        for (name, input) in &seeds {
            let disk = std::fs::read(dir.join(name)).unwrap();
            assert!(
                disk == *input,
                "{}/{name} is stale: run bash fuzz/gen-seeds.sh",
                dir.display()
            );
        }
    }
}
