//! Fixed, deterministic material shared by the fuzz targets: two Falcon-512 identities, their
//! handshake configurations, a base instant, and one valid handshake recorded with
//! deterministic random number generators. Everything is built once per process.
//!
//! A responder [`Session`] built with [`responder_rng`] draws its randomness exactly as the
//! recorded handshake's responder did, so the recorded FINISH completes it: that is how the
//! targets reach an established session without paying for a whole handshake per input.

use qssh::core::crypto::{DeterministicRandom, Secret32, X25519Secret};
use qssh::core::handshake::{self, HandshakeConfig, HandshakeOutput};
use qssh::core::identity::{Algorithm, Identity};
use qssh::core::ratchet::{Ratchet, RatchetInit};
use qssh::core::session::{Session, SessionConfig};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Seeds of the deterministic generators (identities, then each side's handshake rng).
pub const RESPONDER_IDENTITY_SEED: u64 = 0xF022_0001;
pub const INITIATOR_IDENTITY_SEED: u64 = 0xF022_0002;
pub const RESPONDER_RNG_SEED: u64 = 0xF022_0003;
pub const INITIATOR_RNG_SEED: u64 = 0xF022_0004;

/// The instant every target's clock starts from (time only ever moves forward from it).
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn identity(slot: &'static OnceLock<Arc<Identity>>, seed: u64) -> Arc<Identity> {
    slot.get_or_init(|| {
        Arc::new(Identity::generate(
            Algorithm::Falcon512,
            &mut DeterministicRandom::new(seed),
        ))
    })
    .clone()
}

/// The listener's fixed identity.
pub fn responder_identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    identity(&ID, RESPONDER_IDENTITY_SEED)
}

/// The connector's fixed identity.
pub fn initiator_identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    identity(&ID, INITIATOR_IDENTITY_SEED)
}

pub fn responder_config() -> HandshakeConfig {
    HandshakeConfig::new(responder_identity(), "fuzz-responder")
}

pub fn initiator_config() -> HandshakeConfig {
    HandshakeConfig::new(initiator_identity(), "fuzz-initiator")
}

pub fn responder_rng() -> DeterministicRandom {
    DeterministicRandom::new(RESPONDER_RNG_SEED)
}

pub fn initiator_rng() -> DeterministicRandom {
    DeterministicRandom::new(INITIATOR_RNG_SEED)
}

/// Bodies of one valid handshake between the fixed identities.
pub struct Recorded {
    pub init: Vec<u8>,
    pub resp: Vec<u8>,
    pub finish: Vec<u8>,
}

/// The recorded handshake (computed once).
pub fn recorded() -> &'static Recorded {
    static REC: OnceLock<Recorded> = OnceLock::new();
    REC.get_or_init(|| {
        let mut ri = initiator_rng();
        let (st, init) = handshake::initiate(&mut ri, initiator_config());
        let (rs, resp) = handshake::respond(&mut responder_rng(), responder_config(), &init)
            .expect("the fixed INIT must be accepted by the responder");
        let verified = st
            .handle_response(&resp)
            .expect("the fixed RESP must verify");
        let (finish, _) = verified.finish(&mut ri);
        rs.handle_finish(&finish)
            .expect("the fixed FINISH must complete the responder");
        Recorded { init, resp, finish }
    })
}

/// The initiator's side of the recorded handshake, replayed: same generator, same RESP, so
/// the same keys.
fn initiator_output() -> HandshakeOutput {
    let mut ri = initiator_rng();
    let (st, _init) = handshake::initiate(&mut ri, initiator_config());
    let verified = st
        .handle_response(&recorded().resp)
        .expect("the recorded RESP must verify");
    verified.finish(&mut ri).1
}

/// The initiator's keys from the recorded handshake, kept to start its ratchet cheaply.
struct InitiatorKeys {
    root: Secret32,
    chain_initiator: Secret32,
    chain_responder: Secret32,
    session_id: [u8; 32],
    peer_dh: [u8; 32],
    /// `handshake::initiate` draws its X25519 key first from the fixed generator, so a fresh
    /// generator regenerates it (the secret type is not clonable). Checked once; if a
    /// change to `initiate` breaks it, each input replays the initiator's handshake instead.
    dh_regenerates: bool,
}

fn initiator_keys() -> &'static InitiatorKeys {
    static KEYS: OnceLock<InitiatorKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let out = initiator_output();
        InitiatorKeys {
            dh_regenerates: X25519Secret::generate(&mut initiator_rng()).public()
                == out.own_dh.public(),
            root: out.root,
            chain_initiator: out.chain_initiator,
            chain_responder: out.chain_responder,
            session_id: out.session_id,
            peer_dh: out.peer_dh,
        }
    })
}

/// False when establishing a session replays the initiator's handshake too (slower).
pub fn fast_peer_setup() -> bool {
    initiator_keys().dh_regenerates
}

/// The initiator's ratchet state right after the recorded handshake: its keys and its
/// handshake X25519 key.
fn initiator_ratchet_init() -> (RatchetInit, [u8; 32]) {
    let k = initiator_keys();
    if !k.dh_regenerates {
        let out = initiator_output();
        let init = RatchetInit {
            root: out.root,
            initiator: true,
            own_dh: out.own_dh,
            peer_dh: out.peer_dh,
            send_chain: out.chain_initiator,
            recv_chain: out.chain_responder,
        };
        return (init, out.session_id);
    }
    let init = RatchetInit {
        root: k.root.clone(),
        initiator: true,
        own_dh: X25519Secret::generate(&mut initiator_rng()),
        peer_dh: k.peer_dh,
        send_chain: k.chain_initiator.clone(),
        recv_chain: k.chain_responder.clone(),
    };
    (init, k.session_id)
}

/// A stream record: `len u32 | type u8 | body`.
pub fn record(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(5 + body.len());
    rec.extend_from_slice(&(1 + body.len() as u32).to_be_bytes());
    rec.push(ty);
    rec.extend_from_slice(body);
    rec
}

/// A fresh responder session waiting for INIT, at [`base`].
pub fn responder_session() -> Session {
    Session::responder(
        SessionConfig {
            handshake: responder_config(),
            expected_peer: None,
        },
        base(),
        Box::new(responder_rng()),
    )
}

/// A fresh initiator session that has queued INIT and pins the responder's identity, at
/// [`base`]. Its INIT is the recorded one, so the recorded RESP completes it.
pub fn initiator_session() -> Session {
    Session::initiator(
        SessionConfig {
            handshake: initiator_config(),
            expected_peer: Some(responder_identity().peer_id()),
        },
        base(),
        Box::new(initiator_rng()),
    )
}

/// The peer (initiator) side of an established session: its ratchet and the session id that
/// both sides bind into every record.
pub struct Peer {
    pub ratchet: Ratchet,
    pub session_id: [u8; 32],
    pub rng: DeterministicRandom,
}

/// A responder session established by the recorded handshake, and the initiator's ratchet
/// that can seal arbitrary plaintext (frames) for it. Both at [`base`]. Cost: the responder's half
/// of one handshake (the initiator's keys are kept from the recorded one).
pub fn established_responder() -> (Session, Peer) {
    let rec = recorded();
    let mut s = responder_session();
    let now = base();
    s.handle_input(
        now,
        &record(qssh::core::session::record_type::INIT, &rec.init),
    );
    s.handle_input(
        now,
        &record(qssh::core::session::record_type::FINISH, &rec.finish),
    );
    while s.poll_transmit(now).is_some() {}
    while s.poll_event().is_some() {}
    assert!(
        s.is_established(),
        "the recorded handshake must establish the responder session"
    );
    let (init, session_id) = initiator_ratchet_init();
    let peer = Peer {
        ratchet: Ratchet::new(init, now),
        session_id,
        rng: DeterministicRandom::new(INITIATOR_RNG_SEED ^ 0xFFFF),
    };
    assert_eq!(s.session_id(), Some(peer.session_id));
    (s, peer)
}
