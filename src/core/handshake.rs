//! The qssh handshake: one round trip plus key confirmation, mutually authenticated by
//! signatures over the transcript, keyed by a hybrid of X25519 and ML-KEM-768 and an optional
//! pre-shared key.
//!
//! ```text
//! Initiator                                              Responder
//! INIT:   versions, suites, sig algs, flags, random,
//!         X25519 e_i, ML-KEM-768 ek_i            ------>
//!                                                 <------ RESP: version, suite, flags, random,
//!                                                         X25519 e_r, ML-KEM ct(ek_i),
//!                                                         {ID_r, name_r, Sig_r, Fin_r}k_r
//! FINISH: {ID_i, name_i, Sig_i, Fin_i}k_i        ------>
//! ```
//!
//! Each side's state is a struct consumed by value by the call that handles the next message,
//! so a state can never be used twice. The byte layouts, the transcript and the key schedule
//! are specified in `docs/PROTOCOL.md`.

use super::codec::{DecodeError, Reader, Writer};
use super::crypto::{
    aead_open_vec, aead_seal_vec, ct_eq, hkdf_expand, hkdf_extract, hmac_sha256, mlkem_encapsulate,
    random_array, CryptoError, MlKemSecret, Secret32, SecureRandom, X25519Secret, MLKEM_CT_LEN,
    MLKEM_EK_LEN, X25519_LEN,
};
use super::identity::{Algorithm, Identity, IdentityError, PublicIdentity, MAX_SIGNATURE};
use super::labels;
use super::limits::{MAX_HANDSHAKE_MSG, MAX_NAME, PROTOCOL_VERSION};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use thiserror::Error;

/// Magic at the start of INIT, so a stray client on the port is told apart from a peer.
pub const INIT_MAGIC: &[u8; 4] = b"QSSH";
/// Key-exchange suite id: X25519 + ML-KEM-768, HKDF-SHA-256, AES-256-GCM.
pub const SUITE_X25519_MLKEM768: u8 = 1;
/// Suites this build offers, most preferred first.
pub const SUITES: &[u8] = &[SUITE_X25519_MLKEM768];
/// Protocol versions this build speaks, most preferred first.
pub const VERSIONS: &[u8] = &[PROTOCOL_VERSION];
/// Longest version, suite or algorithm list accepted in INIT.
pub const MAX_LIST: usize = 16;
/// INIT flag: the initiator mixes a pre-shared key into the key schedule.
pub const FLAG_PSK: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_PSK;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("malformed handshake message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("not a qssh peer (bad magic)")]
    NotQssh,
    #[error("no common protocol version (peer offers {0:?}, we speak {VERSIONS:?})")]
    NoCommonVersion(Vec<u8>),
    #[error("no common key-exchange suite")]
    NoCommonSuite,
    #[error("peer does not accept our signature algorithm ({0})")]
    SignatureAlgorithmRefused(&'static str),
    #[error("peer chose a version or suite we did not offer (downgrade attempt?)")]
    Downgrade,
    #[error("the listener requires a pre-shared key (pass --psk-file)")]
    PskRequired,
    #[error("the listener has no pre-shared key configured but the connector used one")]
    PskUnexpected,
    #[error("handshake decryption failed: pre-shared key mismatch or tampering")]
    Decrypt,
    #[error("peer's signature over the handshake is invalid")]
    BadSignature,
    #[error("key confirmation failed")]
    BadFinished,
    #[error("bad peer identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("bad ephemeral key")]
    BadKey(#[from] CryptoError),
}

/// What a side brings to a handshake.
#[derive(Clone)]
pub struct HandshakeConfig {
    pub identity: Arc<Identity>,
    /// Display name sent to the peer inside the encrypted part (at most MAX_NAME bytes).
    pub name: String,
    pub psk: Option<Secret32>,
    /// Signature algorithms accepted from the peer.
    pub accept_algorithms: Vec<Algorithm>,
}

impl HandshakeConfig {
    pub fn new(identity: Arc<Identity>, name: &str) -> Self {
        HandshakeConfig {
            identity,
            name: sanitize_name(name),
            psk: None,
            accept_algorithms: Algorithm::ALL.to_vec(),
        }
    }
}

/// Keeps printable characters only and bounds the length, so a peer's name can never carry
/// terminal escapes or grow without bound.
pub fn sanitize_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_NAME {
            break;
        }
        out.push(c);
    }
    out
}

/// Everything the session needs once the handshake has completed.
pub struct HandshakeOutput {
    pub peer: PublicIdentity,
    pub peer_name: String,
    pub version: u8,
    pub suite: u8,
    /// Public session identifier (an HKDF output, safe to show and log).
    pub session_id: [u8; 32],
    pub root: Secret32,
    pub chain_initiator: Secret32,
    pub chain_responder: Secret32,
    /// Our handshake X25519 key and the peer's: the first ratchet keys.
    pub own_dh: X25519Secret,
    pub peer_dh: [u8; 32],
}

/// Running transcript hash: every element is absorbed with a u32 length prefix.
#[derive(Clone)]
struct Transcript(Sha256);

impl Transcript {
    fn new() -> Self {
        let mut t = Transcript(Sha256::new());
        t.absorb(labels::TRANSCRIPT);
        t
    }
    fn absorb(&mut self, part: &[u8]) {
        self.0.update((part.len() as u32).to_be_bytes());
        self.0.update(part);
    }
    fn hash(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

struct Keys {
    hs: Secret32,
    k_resp: Secret32,
    k_init: Secret32,
    fin_resp: Secret32,
    fin_init: Secret32,
}

fn derive_keys(psk: Option<&Secret32>, kem_ss: &Secret32, dh_ss: &Secret32, th: &[u8; 32]) -> Keys {
    let zero = [0u8; 32];
    let early = hkdf_extract(labels::PSK_EXTRACT, &[psk.map_or(&zero, |p| p.expose())]);
    // Hybrid combiner: both shared secrets and the transcript (which holds both ephemeral
    // public keys and the KEM ciphertext) go into one extraction; either secret alone keeps
    // the output secret.
    let hs = hkdf_extract(
        early.expose(),
        &[
            labels::HANDSHAKE_SECRET,
            kem_ss.expose(),
            dh_ss.expose(),
            th,
        ],
    );
    Keys {
        k_resp: hkdf_expand(&hs, labels::HS_KEY_RESPONDER, th),
        k_init: hkdf_expand(&hs, labels::HS_KEY_INITIATOR, th),
        fin_resp: hkdf_expand(&hs, labels::FINISHED_RESPONDER, th),
        fin_init: hkdf_expand(&hs, labels::FINISHED_INITIATOR, th),
        hs,
    }
}

fn finish_output(
    keys: &Keys,
    t: &Transcript,
    peer: AuthBlock,
    (version, suite): (u8, u8),
    own_dh: X25519Secret,
    peer_dh: [u8; 32],
) -> HandshakeOutput {
    let th = t.hash();
    HandshakeOutput {
        peer: peer.identity,
        peer_name: peer.name,
        version,
        suite,
        session_id: *hkdf_expand(&keys.hs, labels::SESSION_ID, &th).expose(),
        root: hkdf_expand(&keys.hs, labels::RATCHET_ROOT, &th),
        chain_initiator: hkdf_expand(&keys.hs, labels::CHAIN_INITIATOR, &th),
        chain_responder: hkdf_expand(&keys.hs, labels::CHAIN_RESPONDER, &th),
        own_dh,
        peer_dh,
    }
}

const NONCE0: [u8; 12] = [0; 12];

/// The authenticated block each side sends encrypted: identity, name, signature, finished.
struct AuthBlock {
    identity: PublicIdentity,
    name: String,
}

/// Signs and MACs our identity into the transcript; returns the block's plaintext.
fn make_auth(
    rng: &mut dyn SecureRandom,
    t: &mut Transcript,
    identity: &Identity,
    name: &str,
    sign_label: &[u8],
    fin_key: &Secret32,
) -> Vec<u8> {
    let mut id_part = Vec::new();
    let mut w = Writer::new(&mut id_part);
    identity.public().encode(&mut w);
    w.vec16(name.as_bytes());
    t.absorb(&id_part);
    let signature = identity.sign(rng, sign_label, &t.hash());
    t.absorb(&signature);
    let finished = hmac_sha256(fin_key.expose(), &[&t.hash()]);
    t.absorb(&finished);
    let mut block = id_part;
    Writer::new(&mut block).vec16(&signature).bytes(&finished);
    block
}

/// Parses and checks the peer's block, absorbing it into the transcript exactly as the peer
/// did. The signature is verified before the finished MAC.
fn check_auth(
    t: &mut Transcript,
    block: &[u8],
    sign_label: &[u8],
    fin_key: &Secret32,
    accept: &[Algorithm],
) -> Result<AuthBlock, HandshakeError> {
    let mut r = Reader::new(block);
    let identity = PublicIdentity::decode(&mut r)?;
    let name_bytes = r.vec16(MAX_NAME)?;
    let id_len = block.len() - r.remaining();
    let signature = r.vec16(MAX_SIGNATURE)?;
    let finished: [u8; 32] = r.array()?;
    r.finish()?;
    if !accept.contains(&identity.algorithm()) {
        return Err(HandshakeError::SignatureAlgorithmRefused(
            identity.algorithm().name(),
        ));
    }
    let name = std::str::from_utf8(name_bytes).map_err(|_| DecodeError::Invalid("name"))?;
    t.absorb(&block[..id_len]);
    if !identity.verify(sign_label, &t.hash(), signature) {
        return Err(HandshakeError::BadSignature);
    }
    t.absorb(signature);
    let expect = hmac_sha256(fin_key.expose(), &[&t.hash()]);
    if !ct_eq(&expect, &finished) {
        return Err(HandshakeError::BadFinished);
    }
    t.absorb(&finished);
    Ok(AuthBlock {
        identity,
        name: sanitize_name(name),
    })
}

fn list(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
    let n = r.u8()? as usize;
    if n == 0 || n > MAX_LIST {
        return Err(DecodeError::Invalid("list length"));
    }
    Ok(r.take(n)?.to_vec())
}

fn write_list(w: &mut Writer<'_>, l: &[u8]) {
    w.u8(l.len() as u8).bytes(l);
}

/// Initiator waiting for RESP.
pub struct InitiatorSent {
    cfg: HandshakeConfig,
    t: Transcript,
    dh: X25519Secret,
    kem: MlKemSecret,
}

/// Initiator that has authenticated the responder and awaits the caller's trust decision
/// (pinned ID, known_peers, or a trust-on-first-use question) before revealing its identity.
pub struct InitiatorVerified {
    cfg: HandshakeConfig,
    t: Transcript,
    keys: Keys,
    dh: X25519Secret,
    peer_dh: [u8; 32],
    version: u8,
    suite: u8,
    peer: AuthBlock,
}

/// Starts a handshake: returns the state and the INIT body.
pub fn initiate(rng: &mut dyn SecureRandom, cfg: HandshakeConfig) -> (InitiatorSent, Vec<u8>) {
    let dh = X25519Secret::generate(rng);
    let kem = MlKemSecret::generate(rng);
    let mut body = Vec::with_capacity(64 + MLKEM_EK_LEN);
    let mut w = Writer::new(&mut body);
    w.bytes(INIT_MAGIC);
    write_list(&mut w, VERSIONS);
    write_list(&mut w, SUITES);
    let algs: Vec<u8> = cfg.accept_algorithms.iter().map(|a| *a as u8).collect();
    write_list(&mut w, &algs);
    w.u8(if cfg.psk.is_some() { FLAG_PSK } else { 0 });
    w.bytes(&random_array::<32>(rng));
    w.bytes(&dh.public());
    w.bytes(&kem.public());
    let mut t = Transcript::new();
    t.absorb(&body);
    (InitiatorSent { cfg, t, dh, kem }, body)
}

impl InitiatorSent {
    /// Handles RESP: checks the choices against what we offered, derives the handshake keys,
    /// decrypts and verifies the responder's signature and key confirmation.
    pub fn handle_response(self, body: &[u8]) -> Result<InitiatorVerified, HandshakeError> {
        if body.len() > MAX_HANDSHAKE_MSG {
            return Err(DecodeError::TooLong(body.len(), MAX_HANDSHAKE_MSG).into());
        }
        let mut r = Reader::new(body);
        let version = r.u8()?;
        let suite = r.u8()?;
        let flags = r.u8()?;
        r.take(32)?; // responder random
        let peer_dh: [u8; X25519_LEN] = r.array()?;
        let ct = r.take(MLKEM_CT_LEN)?;
        let clear_len = body.len() - r.remaining();
        let sealed = r.rest();
        if !VERSIONS.contains(&version) || !SUITES.contains(&suite) {
            return Err(HandshakeError::Downgrade);
        }
        let ours = if self.cfg.psk.is_some() { FLAG_PSK } else { 0 };
        if flags != ours {
            return Err(HandshakeError::Downgrade);
        }
        let InitiatorSent {
            cfg,
            mut t,
            dh,
            kem,
        } = self;
        t.absorb(&body[..clear_len]);
        let kem_ss = kem.decapsulate(ct)?;
        let dh_ss = dh.agree(&peer_dh)?;
        let keys = derive_keys(cfg.psk.as_ref(), &kem_ss, &dh_ss, &t.hash());
        let block = aead_open_vec(&keys.k_resp, &NONCE0, &body[..clear_len], sealed)
            .map_err(|_| HandshakeError::Decrypt)?;
        let peer = check_auth(
            &mut t,
            &block,
            labels::SIGN_RESPONDER,
            &keys.fin_resp,
            &cfg.accept_algorithms,
        )?;
        Ok(InitiatorVerified {
            cfg,
            t,
            keys,
            dh,
            peer_dh,
            version,
            suite,
            peer,
        })
    }
}

impl InitiatorVerified {
    /// The responder's authenticated identity (it proved possession of this key).
    pub fn peer(&self) -> &PublicIdentity {
        &self.peer.identity
    }
    pub fn peer_name(&self) -> &str {
        &self.peer.name
    }
    /// The caller trusts the peer: produce FINISH and the session keys.
    pub fn finish(self, rng: &mut dyn SecureRandom) -> (Vec<u8>, HandshakeOutput) {
        let InitiatorVerified {
            cfg,
            mut t,
            keys,
            dh,
            peer_dh,
            version,
            suite,
            peer,
        } = self;
        let block = make_auth(
            rng,
            &mut t,
            &cfg.identity,
            &cfg.name,
            labels::SIGN_INITIATOR,
            &keys.fin_init,
        );
        let body = aead_seal_vec(&keys.k_init, &NONCE0, &[], &block);
        let out = finish_output(&keys, &t, peer, (version, suite), dh, peer_dh);
        (body, out)
    }
}

/// Responder waiting for FINISH.
pub struct ResponderSent {
    cfg: HandshakeConfig,
    t: Transcript,
    keys: Keys,
    dh: X25519Secret,
    peer_dh: [u8; 32],
    version: u8,
    suite: u8,
}

/// Handles INIT: negotiates, encapsulates, signs; returns the state and the RESP body.
pub fn respond(
    rng: &mut dyn SecureRandom,
    cfg: HandshakeConfig,
    body: &[u8],
) -> Result<(ResponderSent, Vec<u8>), HandshakeError> {
    if body.len() > MAX_HANDSHAKE_MSG {
        return Err(DecodeError::TooLong(body.len(), MAX_HANDSHAKE_MSG).into());
    }
    let mut r = Reader::new(body);
    if r.take(INIT_MAGIC.len())? != INIT_MAGIC {
        return Err(HandshakeError::NotQssh);
    }
    let versions = list(&mut r)?;
    let suites = list(&mut r)?;
    let algs = list(&mut r)?;
    let flags = r.u8()?;
    r.take(32)?; // initiator random
    let peer_dh: [u8; X25519_LEN] = r.array()?;
    let ek = r.take(MLKEM_EK_LEN)?;
    r.finish()?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Invalid("flags").into());
    }
    let version = *VERSIONS
        .iter()
        .find(|v| versions.contains(v))
        .ok_or_else(|| HandshakeError::NoCommonVersion(versions.clone()))?;
    let suite = *SUITES
        .iter()
        .find(|s| suites.contains(s))
        .ok_or(HandshakeError::NoCommonSuite)?;
    let our_alg = cfg.identity.public().algorithm();
    if !algs.contains(&(our_alg as u8)) {
        return Err(HandshakeError::SignatureAlgorithmRefused(our_alg.name()));
    }
    match (flags & FLAG_PSK != 0, cfg.psk.is_some()) {
        (false, true) => return Err(HandshakeError::PskRequired),
        (true, false) => return Err(HandshakeError::PskUnexpected),
        _ => {}
    }
    let dh = X25519Secret::generate(rng);
    let (ct, kem_ss) = mlkem_encapsulate(rng, ek)?;
    let dh_ss = dh.agree(&peer_dh)?;

    let mut out = Vec::with_capacity(8 * 1024);
    let mut w = Writer::new(&mut out);
    w.u8(version).u8(suite).u8(flags);
    w.bytes(&random_array::<32>(rng));
    w.bytes(&dh.public());
    w.bytes(&ct);
    let mut t = Transcript::new();
    t.absorb(body);
    t.absorb(&out);
    let keys = derive_keys(cfg.psk.as_ref(), &kem_ss, &dh_ss, &t.hash());
    let block = make_auth(
        rng,
        &mut t,
        &cfg.identity,
        &cfg.name,
        labels::SIGN_RESPONDER,
        &keys.fin_resp,
    );
    let sealed = aead_seal_vec(&keys.k_resp, &NONCE0, &out, &block);
    out.extend_from_slice(&sealed);
    Ok((
        ResponderSent {
            cfg,
            t,
            keys,
            dh,
            peer_dh,
            version,
            suite,
        },
        out,
    ))
}

impl ResponderSent {
    /// Handles FINISH: decrypts and verifies the initiator's identity, signature and key
    /// confirmation; the session is established on success.
    pub fn handle_finish(self, body: &[u8]) -> Result<HandshakeOutput, HandshakeError> {
        if body.len() > MAX_HANDSHAKE_MSG {
            return Err(DecodeError::TooLong(body.len(), MAX_HANDSHAKE_MSG).into());
        }
        let ResponderSent {
            cfg,
            mut t,
            keys,
            dh,
            peer_dh,
            version,
            suite,
        } = self;
        let block =
            aead_open_vec(&keys.k_init, &NONCE0, &[], body).map_err(|_| HandshakeError::Decrypt)?;
        let peer = check_auth(
            &mut t,
            &block,
            labels::SIGN_INITIATOR,
            &keys.fin_init,
            &cfg.accept_algorithms,
        )?;
        Ok(finish_output(
            &keys,
            &t,
            peer,
            (version, suite),
            dh,
            peer_dh,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::DeterministicRandom;

    fn cfg(rng: &mut DeterministicRandom, alg: Algorithm, name: &str) -> HandshakeConfig {
        HandshakeConfig::new(Arc::new(Identity::generate(alg, rng)), name)
    }

    fn run(
        rng: &mut DeterministicRandom,
        ci: HandshakeConfig,
        cr: HandshakeConfig,
    ) -> Result<(HandshakeOutput, HandshakeOutput), HandshakeError> {
        let (s, init) = initiate(rng, ci);
        let (rs, resp) = respond(rng, cr, &init)?;
        let v = s.handle_response(&resp)?;
        let (fin, oi) = v.finish(rng);
        let or = rs.handle_finish(&fin)?;
        Ok((oi, or))
    }

    #[test]
    fn both_algorithms_agree_on_keys_and_identities() {
        let mut rng = DeterministicRandom::new(1);
        for (ai, ar) in [
            (Algorithm::Falcon512, Algorithm::Falcon512),
            (Algorithm::SlhDsaSha2_128f, Algorithm::Falcon512),
            (Algorithm::Falcon512, Algorithm::SlhDsaSha2_128f),
        ] {
            let ci = cfg(&mut rng, ai, "alice");
            let cr = cfg(&mut rng, ar, "bob\x1b[31m");
            let (idi, idr) = (ci.identity.peer_id(), cr.identity.peer_id());
            let (oi, or) = run(&mut rng, ci, cr).unwrap();
            assert_eq!(oi.peer.peer_id(), idr);
            assert_eq!(or.peer.peer_id(), idi);
            assert_eq!(oi.peer_name, "bob[31m", "control characters stripped");
            assert_eq!(or.peer_name, "alice");
            assert_eq!(oi.root, or.root);
            assert_eq!(oi.chain_initiator, or.chain_initiator);
            assert_eq!(oi.chain_responder, or.chain_responder);
            assert_ne!(oi.chain_initiator, oi.chain_responder);
            assert_eq!(oi.session_id, or.session_id);
            assert_eq!(oi.peer_dh, or.own_dh.public());
        }
    }

    #[test]
    fn psk_must_match() {
        let mut rng = DeterministicRandom::new(2);
        let mut ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let mut cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        ci.psk = Some(Secret32::from_bytes([1; 32]));
        cr.psk = Some(Secret32::from_bytes([1; 32]));
        let (oi, or) = run(&mut rng, ci.clone(), cr.clone()).unwrap();
        assert_eq!(oi.root, or.root);
        cr.psk = Some(Secret32::from_bytes([2; 32]));
        assert_eq!(
            run(&mut rng, ci.clone(), cr.clone()).err(),
            Some(HandshakeError::Decrypt)
        );
        cr.psk = None;
        assert_eq!(
            run(&mut rng, ci.clone(), cr.clone()).err(),
            Some(HandshakeError::PskUnexpected)
        );
        ci.psk = None;
        cr.psk = Some(Secret32::from_bytes([1; 32]));
        assert_eq!(
            run(&mut rng, ci, cr).err(),
            Some(HandshakeError::PskRequired)
        );
    }

    #[test]
    fn algorithm_refusal_both_ways() {
        let mut rng = DeterministicRandom::new(3);
        let mut ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let cr = cfg(&mut rng, Algorithm::SlhDsaSha2_128f, "b");
        ci.accept_algorithms = vec![Algorithm::Falcon512];
        assert!(matches!(
            run(&mut rng, ci, cr).err(),
            Some(HandshakeError::SignatureAlgorithmRefused(_))
        ));
        let ci = cfg(&mut rng, Algorithm::SlhDsaSha2_128f, "a");
        let mut cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        cr.accept_algorithms = vec![Algorithm::Falcon512];
        assert!(matches!(
            run(&mut rng, ci, cr).err(),
            Some(HandshakeError::SignatureAlgorithmRefused(_))
        ));
    }

    #[test]
    fn altered_version_or_suite_lists_are_detected() {
        let mut rng = DeterministicRandom::new(4);
        let ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        let (s, mut init) = initiate(&mut rng, ci.clone());
        // A man in the middle appends an extra (fake, older) version to the offered list:
        // the responder still negotiates, but its signature covers the altered INIT, which
        // the initiator never sent.
        let n = init[4] as usize;
        init.insert(5 + n, 0);
        init[4] += 1;
        let (_, resp) = respond(&mut rng, cr.clone(), &init).unwrap();
        assert!(matches!(
            s.handle_response(&resp).err(),
            Some(HandshakeError::BadSignature) | Some(HandshakeError::Decrypt)
        ));
        // The responder's choice is changed in flight.
        let (s, init) = initiate(&mut rng, ci);
        let (_, mut resp) = respond(&mut rng, cr, &init).unwrap();
        resp[0] = 9;
        assert_eq!(
            s.handle_response(&resp).err(),
            Some(HandshakeError::Downgrade)
        );
    }

    /// A peer that speaks only protocol version 1 (16 KiB records) is refused at the
    /// handshake, never in the middle of a session.
    #[test]
    fn a_version_1_peer_is_refused_at_the_handshake() {
        let mut rng = DeterministicRandom::new(6);
        let ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        let (_, mut init) = initiate(&mut rng, ci);
        assert_eq!((init[4], init[5]), (1, PROTOCOL_VERSION));
        init[5] = 1;
        assert_eq!(
            respond(&mut rng, cr, &init).err(),
            Some(HandshakeError::NoCommonVersion(vec![1]))
        );
    }

    #[test]
    fn every_byte_flip_is_rejected() {
        let mut rng = DeterministicRandom::new(5);
        let ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        // Same seed, same messages: each flip replays the handshake up to the tampered one.
        let seed = rng.clone();
        let (_, init) = initiate(&mut seed.clone(), ci.clone());
        let mut r = seed.clone();
        let (_, init2) = initiate(&mut r, ci.clone());
        assert_eq!(init, init2);
        let (_, resp) = respond(&mut r, cr.clone(), &init).unwrap();
        let mut r3 = r.clone();
        let (fin, _) = {
            let mut rr = seed.clone();
            let (s, _) = initiate(&mut rr, ci.clone());
            s.handle_response(&resp).unwrap().finish(&mut r3)
        };
        for i in 0..init.len() {
            let mut rr = seed.clone();
            let (s, mut bad) = initiate(&mut rr, ci.clone());
            bad[i] ^= 0x01;
            if let Ok((_, resp)) = respond(&mut rr, cr.clone(), &bad) {
                assert!(s.handle_response(&resp).is_err(), "INIT byte {i}");
            }
        }
        for i in 0..resp.len() {
            let (s, _) = initiate(&mut seed.clone(), ci.clone());
            let mut bad = resp.clone();
            bad[i] ^= 0x01;
            assert!(s.handle_response(&bad).is_err(), "RESP byte {i}");
        }
        for i in 0..fin.len() {
            let mut rr = seed.clone();
            let _ = initiate(&mut rr, ci.clone());
            let (rs, resp2) = respond(&mut rr, cr.clone(), &init).unwrap();
            assert_eq!(resp2, resp);
            let mut bad = fin.clone();
            bad[i] ^= 0x01;
            assert!(rs.handle_finish(&bad).is_err(), "FINISH byte {i}");
        }
    }

    #[test]
    fn impostor_cannot_sign_for_another_identity() {
        // A block that names a victim's public key but is signed by mallory's secret key.
        let mut rng = DeterministicRandom::new(6);
        let victim = Identity::generate(Algorithm::Falcon512, &mut rng);
        let mallory = Identity::generate(Algorithm::Falcon512, &mut rng);
        let fin = Secret32::from_bytes([3; 32]);
        let t = Transcript::new();
        let block = make_auth(
            &mut rng,
            &mut t.clone(),
            &mallory,
            "m",
            labels::SIGN_RESPONDER,
            &fin,
        );
        let mut r = Reader::new(&block);
        PublicIdentity::decode(&mut r).unwrap();
        let mut swapped = Vec::new();
        victim.public().encode(&mut Writer::new(&mut swapped));
        swapped.extend_from_slice(r.rest());
        let check = |b: &[u8]| {
            check_auth(
                &mut t.clone(),
                b,
                labels::SIGN_RESPONDER,
                &fin,
                &Algorithm::ALL,
            )
            .err()
        };
        assert_eq!(check(&block), None);
        assert_eq!(check(&swapped), Some(HandshakeError::BadSignature));
        // A signature made for the other role does not verify either.
        let as_init = make_auth(
            &mut rng,
            &mut t.clone(),
            &mallory,
            "m",
            labels::SIGN_INITIATOR,
            &fin,
        );
        assert_eq!(check(&as_init), Some(HandshakeError::BadSignature));
    }

    #[test]
    fn not_qssh_and_truncation() {
        let mut rng = DeterministicRandom::new(8);
        let cr = cfg(&mut rng, Algorithm::Falcon512, "b");
        assert_eq!(
            respond(&mut rng, cr.clone(), b"SSH-2.0-OpenSSH_9.2\r\n").err(),
            Some(HandshakeError::NotQssh)
        );
        let ci = cfg(&mut rng, Algorithm::Falcon512, "a");
        let (_, init) = initiate(&mut rng, ci);
        for cut in [0, 4, 10, init.len() - 1] {
            assert!(respond(&mut rng, cr.clone(), &init[..cut]).is_err());
        }
        let mut long = init.clone();
        long.push(0);
        assert_eq!(
            respond(&mut rng, cr, &long).err(),
            Some(HandshakeError::Malformed(DecodeError::Trailing))
        );
    }
}
