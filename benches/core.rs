//! CPU benchmarks of the sans-IO core (criterion; see `bench/README.md`).
//!
//! - `handshake/initiator`: `initiate` + `handle_response` + `finish` (one ML-KEM-768 key
//!   generation and decapsulation, two X25519, one Falcon-512 verification and signature).
//! - `handshake/responder`: `respond` + `handle_finish` (one ML-KEM-768 encapsulation, two
//!   X25519, one Falcon-512 signature and verification).
//! - `ratchet/seal+open/N`: one message of N bytes sealed by one `Ratchet` and opened by its
//!   peer (symmetric chain step, AES-256-GCM both ways), steady state: the clock does not
//!   move, so no DH step is due. `ratchet/seal/N` and `ratchet/open/N` (N =
//!   `MAX_RECORD_PLAINTEXT`): one direction only. Throughput is reported in plaintext bytes
//!   per second.
//! - `ratchet/ping-pong-dh-step/64`: a message each way, further apart (simulated time) than
//!   `DH_RATCHET_MIN_INTERVAL`, so every message starts a DH ratchet step (and every 8th step
//!   a PQ ML-KEM step): the cost of a direction change.
//! - `session/send+recv/N`: one N-byte message on an open channel through the whole session
//!   path of both ends (frame, record, ratchet, flow control, events), in memory.
//! - `aead/seal/N` (N = `MAX_RECORD_PLAINTEXT`): AES-256-GCM alone (`crypto::aead_seal`, in
//!   place, one key): the ceiling for `ratchet/seal`.
//!
//! Identities and handshake messages come from fixed deterministic generators, so every run
//! does the same work.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qssh::core::crypto::{aead_seal, DeterministicRandom, Secret32};
use qssh::core::frame::ChannelKind;
use qssh::core::handshake::{self, HandshakeConfig, HandshakeOutput};
use qssh::core::identity::{Algorithm, Identity};
use qssh::core::limits::{DH_RATCHET_MIN_INTERVAL, MAX_FRAME_DATA, MAX_RECORD_PLAINTEXT};
use qssh::core::ratchet::{Ratchet, RatchetInit};
use qssh::core::session::{Event, Session, SessionConfig};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(seed: u64, name: &str) -> HandshakeConfig {
    let id = Identity::generate(Algorithm::Falcon512, &mut DeterministicRandom::new(seed));
    HandshakeConfig::new(Arc::new(id), name)
}

/// Two configs, the generators both sides start from, and the three messages they produce.
struct Fixture {
    ci: HandshakeConfig,
    cr: HandshakeConfig,
    ri: DeterministicRandom,
    rr: DeterministicRandom,
    init: Vec<u8>,
    resp: Vec<u8>,
    finish: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let (ci, cr) = (config(1, "alice"), config(2, "bob"));
        let (ri, rr) = (DeterministicRandom::new(10), DeterministicRandom::new(20));
        let (init, resp, finish, _, _) = handshake_pair(&ci, &cr, &ri, &rr);
        Fixture {
            ci,
            cr,
            ri,
            rr,
            init,
            resp,
            finish,
        }
    }
}

/// A whole handshake: the three messages and both outputs (initiator first).
fn handshake_pair(
    ci: &HandshakeConfig,
    cr: &HandshakeConfig,
    ri: &DeterministicRandom,
    rr: &DeterministicRandom,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, HandshakeOutput, HandshakeOutput) {
    let (mut ri, mut rr) = (ri.clone(), rr.clone());
    let (st, init) = handshake::initiate(&mut ri, ci.clone());
    let (rs, resp) = handshake::respond(&mut rr, cr.clone(), &init).expect("respond");
    let (finish, oi) = st.handle_response(&resp).expect("response").finish(&mut ri);
    let or = rs.handle_finish(&finish).expect("finish");
    (init, resp, finish, oi, or)
}

fn handshake(c: &mut Criterion) {
    let f = Fixture::new();
    let mut g = c.benchmark_group("handshake");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    // The generator is cloned per iteration, so each iteration repeats the same handshake and
    // the recorded peer messages stay valid.
    g.bench_function("initiator", |b| {
        b.iter_batched(
            || (f.ri.clone(), f.ci.clone()),
            |(mut rng, cfg)| {
                let (st, init) = handshake::initiate(&mut rng, cfg);
                let verified = st.handle_response(&f.resp).expect("valid RESP");
                let (finish, out) = verified.finish(&mut rng);
                black_box((init, finish, out.session_id))
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("responder", |b| {
        b.iter_batched(
            || (f.rr.clone(), f.cr.clone()),
            |(mut rng, cfg)| {
                let (st, resp) = handshake::respond(&mut rng, cfg, &f.init).expect("valid INIT");
                let out = st.handle_finish(&f.finish).expect("valid FINISH");
                black_box((resp, out.session_id))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Both ends' ratchets right after a handshake (as `Session` starts them), and the session
/// id they bind into every message.
fn ratchet_pair(now: Instant) -> (Ratchet, Ratchet, [u8; 32]) {
    let f = Fixture::new();
    let (_, _, _, oi, or) = handshake_pair(&f.ci, &f.cr, &f.ri, &f.rr);
    let sid = oi.session_id;
    let start = |out: HandshakeOutput, initiator: bool| {
        let (send_chain, recv_chain) = if initiator {
            (out.chain_initiator, out.chain_responder)
        } else {
            (out.chain_responder, out.chain_initiator)
        };
        Ratchet::new(
            RatchetInit {
                root: out.root,
                initiator,
                own_dh: out.own_dh,
                peer_dh: out.peer_dh,
                send_chain,
                recv_chain,
            },
            now,
        )
    };
    (start(oi, true), start(or, false), sid)
}

fn ratchet(c: &mut Criterion) {
    let now = Instant::now();
    let mut rng = DeterministicRandom::new(99);
    let mut g = c.benchmark_group("ratchet");
    g.measurement_time(Duration::from_secs(3));
    for size in [64usize, 1400, MAX_RECORD_PLAINTEXT] {
        let (mut a, mut b, sid) = ratchet_pair(now);
        let pt = vec![0xa5u8; size];
        let mut buf = Vec::with_capacity(size + Ratchet::MAX_OVERHEAD);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("seal+open/{size}"), |bench| {
            bench.iter(|| {
                buf.clear();
                a.seal(now, &mut rng, &sid, black_box(&pt), &mut buf);
                let out = b.open(now, &mut rng, &sid, &buf).expect("opens");
                black_box(out)
            })
        });
    }

    let size = MAX_RECORD_PLAINTEXT;
    let pt = vec![0xa5u8; size];
    g.throughput(Throughput::Bytes(size as u64));
    let (mut a, _, sid) = ratchet_pair(now);
    let mut buf = Vec::with_capacity(size + Ratchet::MAX_OVERHEAD);
    g.bench_function(format!("seal/{size}"), |bench| {
        bench.iter(|| {
            buf.clear();
            a.seal(now, &mut rng, &sid, black_box(&pt), &mut buf);
            black_box(buf.len())
        })
    });
    // A fresh pair: messages are sealed in setup and opened in order, so no key is skipped.
    let (mut a, mut b, sid) = ratchet_pair(now);
    let mut seal_rng = DeterministicRandom::new(98);
    g.bench_function(format!("open/{size}"), |bench| {
        bench.iter_batched(
            || {
                let mut m = Vec::with_capacity(size + Ratchet::MAX_OVERHEAD);
                a.seal(now, &mut seal_rng, &sid, &pt, &mut m);
                m
            },
            |m| b.open(now, &mut rng, &sid, &m).expect("opens"),
            BatchSize::SmallInput,
        )
    });

    let (mut a, mut b, sid) = ratchet_pair(now);
    let mut t = now;
    let pt = [0x5au8; 64];
    g.throughput(Throughput::Bytes(2 * 64));
    let gap = DH_RATCHET_MIN_INTERVAL + Duration::from_millis(5);
    g.bench_function("ping-pong-dh-step/64", |bench| {
        bench.iter(|| {
            let mut m = Vec::with_capacity(256);
            t += gap;
            a.seal(t, &mut rng, &sid, &pt, &mut m);
            b.open(t, &mut rng, &sid, &m).expect("opens");
            m.clear();
            t += gap;
            b.seal(t, &mut rng, &sid, &pt, &mut m);
            black_box(a.open(t, &mut rng, &sid, &m).expect("opens"))
        })
    });
    // Every message must have started a DH step, and a long run PQ steps too.
    let (sa, sb) = (a.stats(), b.stats());
    assert!(
        sa.dh_steps == sa.messages_sent && sb.dh_steps == sb.messages_sent,
        "each ping-pong message must step the ratchet: {sa:?} {sb:?}"
    );
    assert!(
        sa.messages_sent < 32 || sb.pq_steps_completed > 0,
        "ping-pong must make PQ steps: {sa:?} {sb:?}"
    );
    g.finish();
}

/// Moves every queued record from `from` to `to`.
fn deliver(now: Instant, from: &mut Session, to: &mut Session) {
    while let Some(rec) = from.poll_transmit(now) {
        to.handle_input(now, &rec);
    }
}

/// An established in-memory session pair with one open Exec channel.
fn session_pair(now: Instant) -> (Session, Session, u32) {
    let (ci, cr) = (config(1, "alice"), config(2, "bob"));
    let expected = Some(cr.identity.peer_id());
    let mut a = Session::initiator(
        SessionConfig {
            handshake: ci,
            expected_peer: expected,
        },
        now,
        Box::new(DeterministicRandom::new(10)),
    );
    let mut b = Session::responder(
        SessionConfig {
            handshake: cr,
            expected_peer: None,
        },
        now,
        Box::new(DeterministicRandom::new(20)),
    );
    let ch = loop {
        deliver(now, &mut a, &mut b);
        deliver(now, &mut b, &mut a);
        if a.is_established() && b.is_established() {
            break a.open_channel(now, ChannelKind::Exec, b"").expect("open");
        }
    };
    deliver(now, &mut a, &mut b);
    while let Some(ev) = b.poll_event() {
        if let Event::ChannelRequest { ch, .. } = ev {
            b.accept_channel(now, ch).expect("accept");
        }
    }
    deliver(now, &mut b, &mut a);
    while a.poll_event().is_some() {}
    assert!(a.send_window(ch) > 0, "channel must be open");
    (a, b, ch)
}

fn session(c: &mut Criterion) {
    let now = Instant::now();
    let mut g = c.benchmark_group("session");
    g.measurement_time(Duration::from_secs(3));
    for size in [64usize, 1400, MAX_FRAME_DATA] {
        let (mut a, mut b, ch) = session_pair(now);
        let msg = vec![0x3cu8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("send+recv/{size}"), |bench| {
            bench.iter(|| {
                let sent = a.send(now, ch, black_box(&msg)).expect("send");
                assert_eq!(sent, size, "window exhausted");
                deliver(now, &mut a, &mut b);
                while let Some(ev) = b.poll_event() {
                    if let Event::Data { ch, data } = ev {
                        b.consumed(now, ch, data.len());
                        // As the applications do: the emptied buffer carries the next event.
                        b.recycle(black_box(data.into_buffer()));
                    }
                }
                // Window updates back to the sender.
                deliver(now, &mut b, &mut a);
            })
        });
    }
    g.finish();
}

fn aead(c: &mut Criterion) {
    let key = Secret32::from_bytes([7; 32]);
    let size = MAX_RECORD_PLAINTEXT;
    let mut buf = vec![0xa5u8; size];
    let mut g = c.benchmark_group("aead");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function(format!("seal/{size}"), |bench| {
        bench.iter(|| {
            buf.truncate(size);
            aead_seal(&key, &[0; 12], &[], &mut buf, 0);
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, handshake, ratchet, session, aead);
criterion_main!(benches);
