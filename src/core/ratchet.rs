//! The session ratchet: Signal's Double Ratchet (symmetric chains + X25519 DH ratchet) with a
//! post-quantum ML-KEM-768 ratchet mixed into the root key. Sans-IO: time comes in as
//! `Instant` arguments and randomness as `&mut dyn SecureRandom`, so a run is deterministic
//! given its inputs.
//!
//! # Initial state
//!
//! The handshake gives both sides the root key `rk` (already post-quantum: it contains the
//! handshake's ML-KEM secret), one sending and one receiving chain key (the initiator's
//! sending chain is the responder's receiving chain and vice versa), and its ephemeral X25519
//! keys, which become the first ratchet keys (initiator: own = eph_i, peer = eph_r; responder
//! the reverse). Messages on these handshake chains carry the handshake ephemeral key as
//! `dh_pub`. The initiator starts with the peer key eph_r "new and unanswered", so it makes
//! the first DH step at its first send; from then on strict alternation holds. The handshake
//! counts as each side's previous DH step for the rate limit below, so an initiator that sends
//! within `DH_RATCHET_MIN_INTERVAL` of the handshake uses its handshake chain and steps at
//! its first send after that.
//!
//! # Rules
//!
//! - **Symmetric chain.** Per message: `mk = HMAC-SHA-256(ck, CHAIN_MESSAGE_KEY)`,
//!   `ck' = HMAC-SHA-256(ck, CHAIN_NEXT)`. One `mk` encrypts exactly one message with
//!   AES-256-GCM under nonce `0^8 || n` (n as u32 big-endian; unique per key by construction
//!   anyway) and AAD `ad || header`, where `ad` is the session binding supplied by the caller
//!   (not sent).
//! - **Root step.** `KDF_RK(rk, dh [, kem_ss])`: `prk = HKDF-Extract(salt = rk, ikm = dh ||
//!   kem_ss)` (kem_ss only when the step carries a KEM secret; the ikm lengths 32 and 64 keep
//!   the two cases apart), new `rk = HKDF-Expand(prk, RATCHET_ROOT_STEP)`, new chain key
//!   `ck = HKDF-Expand(prk, RATCHET_STEP_CHAIN)`.
//! - **DH ratchet (Signal, strict alternation).** A party creates a new X25519 ratchet key
//!   ONLY after it has received a new peer ratchet key since its own last step. The step is
//!   lazy: it happens at the first `seal` after the new peer key arrived, but at most once per
//!   `DH_RATCHET_MIN_INTERVAL` since this side's previous step (a rate limit for fast direction
//!   changes: while the interval has not passed, the party keeps sending on its current
//!   chain). The receiver of a new peer key immediately derives the receiving chain:
//!   `rk, ck_r = KDF_RK(rk, DH(own_current, peer_new) [|| kem_ss if that header carries a KEM
//!   ciphertext for us])`. The sending step: `rk, ck_s = KDF_RK(rk, DH(own_new, peer_current)
//!   [|| kem_ss of our encapsulation if we answer a peer KEM key in this step])`. Headers
//!   carry PN, the length of the sender's previous sending chain, so the receiver can keep the
//!   keys of that chain's messages still in flight.
//!
//!   Why alternation: every root step consumes the current `rk`, so both sides must apply
//!   the same steps in the same order. Under alternation only the side holding an unanswered
//!   peer key may step, so at any moment at most one step is in flight and the root chain is
//!   a single sequence both sides agree on. If either side stepped unilaterally "every N
//!   messages", both could step at the same time from the same `rk` (each with its new key
//!   against the other's old one); each side would then apply its own step first and the
//!   peer's second, the two orders give different root keys, and the root chain forks
//!   irrecoverably.
//! - **Acknowledgements ("every N messages or T seconds").** A one-way stream never lets the
//!   sender step, because the receiver never sends a new key. So the receiver sends an empty
//!   message when [`Ratchet::wants_ack`] says so: it holds an unanswered new peer key, its
//!   rate limit has passed, and it has either received `RATCHET_ACK_EVERY_MESSAGES` records
//!   since it last sent or held that key for `RATCHET_ACK_INTERVAL`. That empty message is
//!   sealed after the receiver's own DH step, so it carries its new ratchet key, and the
//!   sender steps at its next send. [`Ratchet::poll_timeout`] tells the driver when to check.
//! - **PQ KEM ratchet.** A party attaches a fresh ML-KEM-768 encapsulation key (1184 bytes) to
//!   the header of every message of a sending chain started by a DH step when a PQ step is
//!   due: it has no outstanding KEM key AND (its DH steps since the last completed PQ
//!   step ≥ `PQ_RATCHET_EVERY_STEPS` OR now − last completed PQ step ≥ `PQ_RATCHET_INTERVAL`).
//!   The peer, at ITS next DH sending step (which by alternation comes after receiving that
//!   chain), encapsulates to that key and carries the ciphertext (1088 bytes) in every message
//!   header of that new chain; the shared secret is mixed into that root step on both sides
//!   (the receiver decapsulates when it processes the first message of that chain, i.e. in the
//!   receiving-chain derivation). Carrying the KEM fields in every message of the chain makes
//!   it robust to loss and reordering: any message of the chain can start the receiving chain.
//!   (The peer encapsulates, and so validates the key, when it derives the receiving chain
//!   that carries it, and keeps ciphertext and secret for its next sending step.) A PQ step is
//!   complete for the encapsulating side at its sending step and for the key's owner when it
//!   decapsulates; both then restart the schedule. The initial root key is already PQ, so
//!   the first PQ ratchet waits for the schedule (its clock starts at the handshake). A new
//!   receiving chain whose header carries a ciphertext when we have no outstanding KEM key,
//!   lacks the ciphertext while we have one (by alternation the peer's next chain always
//!   answers it), or carries an encapsulation key that does not parse is an error (state
//!   unchanged). On messages of an already established chain the KEM fields are not
//!   processed again; they are authenticated as part of the header.
//! - **Skipped message keys (Signal).** Stored keyed by `(dh_pub, n)`; at most `MAX_SKIP`
//!   keys per jump (within the current chain, to PN of the chain being left, and within a new
//!   chain; otherwise `TooManySkipped`, state unchanged); at most `MAX_SKIPPED_KEYS` in total
//!   (the oldest are evicted); the keys of at most `MAX_OLD_CHAINS` previous receiving chains
//!   are kept (those of older chains are dropped). A message key is deleted when used, so a
//!   used or unknown old key is an error and a replay fails.
//! - **Transactional open.** `open` computes on copies and commits only after the AEAD tag
//!   verified; on any error the state is unchanged.
//!
//! # Message layout (byte exact)
//!
//! ```text
//! dh_pub[32] | pn u32 | n u32 | flags u8 | [ek 1184] | [ct 1088] | ciphertext | tag[16]
//! ```
//!
//! Integers are big-endian. `flags` bit 0: ML-KEM-768 encapsulation key present; bit 1:
//! ML-KEM-768 ciphertext present; the other bits must be 0. `n = u32::MAX` is never sent.
//! The ciphertext is at most `MAX_RECORD_PLAINTEXT` bytes. The header (everything before the
//! ciphertext) is the AEAD's AAD after the caller's `ad`.

use super::codec::{DecodeError, Reader};
use super::crypto::{
    aead_open, aead_open_within, aead_seal, hkdf_expand, hkdf_extract, hmac_sha256_pair,
    mlkem_encapsulate, MlKemSecret, Secret32, SecureRandom, X25519Secret, MLKEM_CT_LEN,
    MLKEM_EK_LEN, TAG_LEN, X25519_LEN,
};
use super::labels;
use super::limits::{
    DH_RATCHET_MIN_INTERVAL, MAX_OLD_CHAINS, MAX_RECORD_BODY, MAX_RECORD_PLAINTEXT, MAX_SKIP,
    MAX_SKIPPED_KEYS, PQ_RATCHET_EVERY_STEPS, PQ_RATCHET_INTERVAL, RATCHET_ACK_EVERY_MESSAGES,
    RATCHET_ACK_INTERVAL,
};
use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;
use thiserror::Error;

/// Fixed part of the header: dh_pub, pn, n, flags.
pub const HEADER_LEN: usize = X25519_LEN + 4 + 4 + 1;
/// Header flag: an ML-KEM-768 encapsulation key follows.
pub const FLAG_KEM_EK: u8 = 0x01;
/// Header flag: an ML-KEM-768 ciphertext follows.
pub const FLAG_KEM_CT: u8 = 0x02;

// A full record (largest plaintext plus largest ratchet overhead) fits a record body.
const _: () = assert!(MAX_RECORD_PLAINTEXT + Ratchet::MAX_OVERHEAD <= MAX_RECORD_BODY);

/// What the handshake hands to the ratchet.
pub struct RatchetInit {
    /// Root key (post-quantum already: derived from the hybrid handshake).
    pub root: Secret32,
    pub initiator: bool,
    /// Our handshake ephemeral X25519 key, the first ratchet key.
    pub own_dh: X25519Secret,
    /// The peer's handshake ephemeral X25519 key. The handshake has already agreed with it,
    /// so it is not a low-order point.
    pub peer_dh: [u8; 32],
    /// Our first sending chain (the peer's `recv_chain`).
    pub send_chain: Secret32,
    /// Our first receiving chain (the peer's `send_chain`).
    pub recv_chain: Secret32,
}

/// Why a message was rejected. In every case the ratchet state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RatchetError {
    #[error("malformed ratchet message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("ratchet message authentication failed")]
    Auth,
    #[error("ratchet message skips more than MAX_SKIP messages")]
    TooManySkipped,
    /// The message key was already used (a replay or duplicate) or never existed in a chain
    /// we still remember.
    #[error("ratchet message replayed or no longer decryptable")]
    Replay,
    /// A new peer ratchet key arrived while the previous one is still unanswered by us, which
    /// strict alternation rules out (also: late messages of forgotten chains).
    #[error("unexpected ratchet key")]
    UnexpectedKey,
    /// The peer's ratchet key is a low-order point.
    #[error("invalid ratchet key")]
    BadKey,
    /// KEM fields that do not fit the PQ ratchet state, or an unparsable encapsulation key.
    #[error("invalid post-quantum ratchet fields")]
    BadKem,
}

/// Counters for logs, tests and the status display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RatchetStats {
    /// DH ratchet steps we made (new own ratchet keys).
    pub dh_steps: u64,
    /// New peer ratchet keys we accepted (receiving chains derived).
    pub peer_dh_steps: u64,
    /// PQ ratchet steps completed (as encapsulator or as key owner).
    pub pq_steps_completed: u64,
    /// Skipped message keys held right now.
    pub skipped_keys_stored: usize,
    pub messages_sent: u64,
    pub messages_received: u64,
}

struct SendChain {
    ck: Secret32,
    n: u32,
    pn: u32,
    ek: Option<Vec<u8>>,
    ct: Option<Vec<u8>>,
}

struct RecvChain {
    /// The peer ratchet key of this chain (the current peer ratchet key).
    dh: [u8; 32],
    ck: Secret32,
    n: u32,
}

struct SkippedKey {
    dh: [u8; 32],
    n: u32,
    mk: Secret32,
}

/// An encapsulation to the peer's KEM key, waiting to be mixed into our next sending step.
struct KemAnswer {
    ct: Vec<u8>,
    ss: Secret32,
}

/// One side of a ratcheted session. See the module documentation for the rules.
pub struct Ratchet {
    initiator: bool,
    rk: Secret32,
    own: X25519Secret,
    own_pub: [u8; 32],
    send: SendChain,
    recv: RecvChain,
    /// Oldest first.
    skipped: VecDeque<SkippedKey>,
    /// Peer keys of previous receiving chains, oldest first.
    old_chains: VecDeque<[u8; 32]>,
    /// Some(since) while we hold a new peer ratchet key we have not answered with a step.
    unanswered_since: Option<Instant>,
    last_step: Instant,
    /// Our outstanding ML-KEM key (its public half travels on our current sending chain).
    kem_own: Option<MlKemSecret>,
    kem_answer: Option<KemAnswer>,
    steps_since_pq: u32,
    last_pq: Instant,
    recv_since_send: u32,
    stats: RatchetStats,
}

impl fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ratchet")
            .field("initiator", &self.initiator)
            .field("own_dh", &Hex4(&self.own_pub))
            .field("peer_dh", &Hex4(&self.recv.dh))
            .field("send_n", &self.send.n)
            .field("recv_n", &self.recv.n)
            .field("peer_key_unanswered", &self.unanswered_since.is_some())
            .field("kem_key_outstanding", &self.kem_own.is_some())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// First four bytes of a public key, in hex.
struct Hex4<'a>(&'a [u8; 32]);

impl fmt::Debug for Hex4<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

/// A parsed message header: fields borrowed from the input's header part.
struct Parsed<'a> {
    dh: [u8; 32],
    pn: u32,
    n: u32,
    ek: Option<&'a [u8]>,
    ct: Option<&'a [u8]>,
    header: &'a [u8],
}

/// Bounds-checks `msg` (flags, KEM fields, body length); returns the length of its header,
/// which [`parsed`] then reads.
fn header_len(msg: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader::new(msg);
    r.take(X25519_LEN + 4)?;
    let n = r.u32()?;
    let flags = r.u8()?;
    if flags & !(FLAG_KEM_EK | FLAG_KEM_CT) != 0 {
        return Err(DecodeError::Invalid("ratchet header flags"));
    }
    if n == u32::MAX {
        return Err(DecodeError::Invalid("ratchet message number"));
    }
    if flags & FLAG_KEM_EK != 0 {
        r.take(MLKEM_EK_LEN)?;
    }
    if flags & FLAG_KEM_CT != 0 {
        r.take(MLKEM_CT_LEN)?;
    }
    let body = r.rest().len();
    if body < TAG_LEN {
        return Err(DecodeError::Truncated);
    }
    if body - TAG_LEN > MAX_RECORD_PLAINTEXT {
        return Err(DecodeError::TooLong(body - TAG_LEN, MAX_RECORD_PLAINTEXT));
    }
    Ok(msg.len() - body)
}

/// The fields of a header that [`header_len`] accepted (exactly its bytes).
fn parsed(header: &[u8]) -> Parsed<'_> {
    const CHECKED: &str = "checked by header_len";
    let mut r = Reader::new(header);
    let dh = r.array::<X25519_LEN>().expect(CHECKED);
    let pn = r.u32().expect(CHECKED);
    let n = r.u32().expect(CHECKED);
    let flags = r.u8().expect(CHECKED);
    let mut field = |present: bool, len: usize| present.then(|| r.take(len).expect(CHECKED));
    let ek = field(flags & FLAG_KEM_EK != 0, MLKEM_EK_LEN);
    let ct = field(flags & FLAG_KEM_CT != 0, MLKEM_CT_LEN);
    Parsed {
        dh,
        pn,
        n,
        ek,
        ct,
        header,
    }
}

/// Where a message's `ciphertext || tag` is, and where its plaintext goes.
enum Body<'a> {
    /// Decrypted where it is.
    InPlace(&'a mut [u8]),
    /// `buf[src..]` is decrypted into the start of `buf`.
    Within { buf: &'a mut [u8], src: usize },
}

/// `KDF_RK`: returns (new root key, new chain key).
fn kdf_rk(rk: &Secret32, dh: &Secret32, kem_ss: Option<&Secret32>) -> (Secret32, Secret32) {
    let prk = match kem_ss {
        Some(ss) => hkdf_extract(rk.expose(), &[dh.expose(), ss.expose()]),
        None => hkdf_extract(rk.expose(), &[dh.expose()]),
    };
    (
        hkdf_expand(&prk, labels::RATCHET_ROOT_STEP, &[]),
        hkdf_expand(&prk, labels::RATCHET_STEP_CHAIN, &[]),
    )
}

/// `KDF_CK`: returns (message key, next chain key).
fn kdf_ck(ck: &Secret32) -> (Secret32, Secret32) {
    let (mk, next) = hmac_sha256_pair(ck.expose(), labels::CHAIN_MESSAGE_KEY, labels::CHAIN_NEXT);
    (Secret32::from_bytes(mk), Secret32::from_bytes(next))
}

fn nonce(n: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[8..].copy_from_slice(&n.to_be_bytes());
    nonce
}

fn aad(ad: &[u8], header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(ad.len() + header.len());
    aad.extend_from_slice(ad);
    aad.extend_from_slice(header);
    aad
}

/// Decrypts `ciphertext || tag`; returns the plaintext length. On failure the plaintext's
/// place is overwritten with zeros (ring decrypts while it authenticates).
fn decrypt(
    mk: &Secret32,
    ad: &[u8],
    m: &Parsed<'_>,
    body: Body<'_>,
) -> Result<usize, RatchetError> {
    let (nonce, aad) = (nonce(m.n), aad(ad, m.header));
    match body {
        Body::InPlace(buf) => aead_open(mk, &nonce, &aad, buf),
        Body::Within { buf, src } => aead_open_within(mk, &nonce, &aad, buf, src),
    }
    .map_err(|_| RatchetError::Auth)
}

/// Advances a copy of `ck` from message `from` to `to`, collecting the skipped keys, and
/// returns the chain key for message `to`.
fn skip_keys(
    dh: &[u8; 32],
    ck: &Secret32,
    from: u32,
    to: u32,
    out: &mut Vec<SkippedKey>,
) -> Secret32 {
    let mut ck = ck.clone();
    for n in from..to {
        let (mk, next) = kdf_ck(&ck);
        out.push(SkippedKey { dh: *dh, n, mk });
        ck = next;
    }
    ck
}

impl Ratchet {
    /// Largest encoded overhead of [`Ratchet::seal`]: the header with both KEM fields, plus
    /// the tag.
    pub const MAX_OVERHEAD: usize = HEADER_LEN + MLKEM_EK_LEN + MLKEM_CT_LEN + TAG_LEN;

    /// Starts the ratchet from the handshake's output at time `now` (the handshake counts as
    /// both sides' previous DH step and previous PQ step).
    ///
    /// # Panics
    /// If `init.peer_dh` is a low-order point; the handshake has already refused those.
    pub fn new(init: RatchetInit, now: Instant) -> Self {
        assert!(
            init.own_dh.agree(&init.peer_dh).is_ok(),
            "peer ratchet key must be validated by the handshake"
        );
        Ratchet {
            initiator: init.initiator,
            rk: init.root,
            own_pub: init.own_dh.public(),
            own: init.own_dh,
            send: SendChain {
                ck: init.send_chain,
                n: 0,
                pn: 0,
                ek: None,
                ct: None,
            },
            recv: RecvChain {
                dh: init.peer_dh,
                ck: init.recv_chain,
                n: 0,
            },
            skipped: VecDeque::new(),
            old_chains: VecDeque::new(),
            unanswered_since: init.initiator.then_some(now),
            last_step: now,
            kem_own: None,
            kem_answer: None,
            steps_since_pq: 0,
            last_pq: now,
            recv_since_send: 0,
            stats: RatchetStats::default(),
        }
    }

    fn step_allowed(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_step) >= DH_RATCHET_MIN_INTERVAL
    }

    fn pq_step_completed(&mut self, now: Instant) {
        self.steps_since_pq = 0;
        self.last_pq = now;
        self.stats.pq_steps_completed += 1;
    }

    /// Our sending DH step (and, when due or answering, the PQ part of it).
    fn dh_step(&mut self, now: Instant, rng: &mut dyn SecureRandom) {
        let own = X25519Secret::generate(rng);
        let dh = own
            .agree(&self.recv.dh)
            .expect("peer ratchet keys are validated before they are accepted");
        let answer = self.kem_answer.take();
        let (rk, ck) = kdf_rk(&self.rk, &dh, answer.as_ref().map(|a| &a.ss));
        self.rk = rk;
        self.steps_since_pq = self.steps_since_pq.saturating_add(1);
        let ct = answer.map(|a| {
            self.pq_step_completed(now);
            a.ct
        });
        let pq_due = self.kem_own.is_none()
            && (self.steps_since_pq >= PQ_RATCHET_EVERY_STEPS
                || now.saturating_duration_since(self.last_pq) >= PQ_RATCHET_INTERVAL);
        let ek = pq_due.then(|| {
            let dk = MlKemSecret::generate(rng);
            let ek = dk.public();
            self.kem_own = Some(dk);
            ek
        });
        self.send = SendChain {
            ck,
            n: 0,
            pn: self.send.n,
            ek,
            ct,
        };
        self.own_pub = own.public();
        self.own = own;
        self.unanswered_since = None;
        self.last_step = now;
        self.stats.dh_steps += 1;
    }

    /// Encrypts one message: appends `header || ciphertext || tag` to `out`. `ad` is bound into
    /// the AEAD (session binding) but not sent. Makes the pending DH step first when one is
    /// due and the rate limit allows it.
    ///
    /// # Panics
    /// If `plaintext` is longer than `MAX_RECORD_PLAINTEXT` (callers split records), or after
    /// `u32::MAX - 1` messages on one sending chain (the peer never acknowledged; drivers
    /// close such sessions long before).
    pub fn seal(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let head = out.len();
        out.reserve(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.resize(head + HEADER_LEN, 0);
        out.extend_from_slice(plaintext);
        self.seal_in_place(now, rng, ad, out, head);
    }

    /// [`Ratchet::seal`] without copying the plaintext: `buf[head..head + HEADER_LEN]` is
    /// room reserved for the header and the plaintext is `buf[head + HEADER_LEN..]`.
    /// Afterwards `buf[head..]` is the message exactly as `seal` makes it (the header is
    /// written into the reserved room; KEM fields, when the chain carries them, are inserted
    /// after it, moving the plaintext once). Same panics as `seal`, and if `buf` is shorter
    /// than `head + HEADER_LEN`.
    pub fn seal_in_place(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        buf: &mut Vec<u8>,
        head: usize,
    ) {
        assert!(
            buf.len() >= head + HEADER_LEN,
            "no room reserved for the ratchet header"
        );
        assert!(
            buf.len() - head - HEADER_LEN <= MAX_RECORD_PLAINTEXT,
            "ratchet plaintext longer than MAX_RECORD_PLAINTEXT"
        );
        if self.unanswered_since.is_some() && self.step_allowed(now) {
            self.dh_step(now, rng);
        }
        let n = self.send.n;
        assert!(n < u32::MAX, "ratchet sending chain exhausted");
        let flags = self.send.ek.as_ref().map_or(0, |_| FLAG_KEM_EK)
            | self.send.ct.as_ref().map_or(0, |_| FLAG_KEM_CT);
        let fixed = &mut buf[head..head + HEADER_LEN];
        fixed[..X25519_LEN].copy_from_slice(&self.own_pub);
        fixed[X25519_LEN..X25519_LEN + 4].copy_from_slice(&self.send.pn.to_be_bytes());
        fixed[X25519_LEN + 4..X25519_LEN + 8].copy_from_slice(&n.to_be_bytes());
        fixed[X25519_LEN + 8] = flags;
        let ek = self.send.ek.as_deref().unwrap_or_default();
        let ct = self.send.ct.as_deref().unwrap_or_default();
        let at = head + HEADER_LEN;
        let body = at + ek.len() + ct.len();
        if body > at {
            // Room for the KEM fields: the plaintext moves once, the fields are copied in.
            let end = buf.len();
            buf.resize(end + (body - at), 0);
            buf.copy_within(at..end, body);
            buf[at..at + ek.len()].copy_from_slice(ek);
            buf[at + ek.len()..body].copy_from_slice(ct);
        }
        let aad = aad(ad, &buf[head..body]);
        let (mk, next) = kdf_ck(&self.send.ck);
        aead_seal(&mk, &nonce(n), &aad, buf, body);
        self.send.ck = next;
        self.send.n = n + 1;
        self.recv_since_send = 0;
        self.stats.messages_sent += 1;
    }

    /// Decrypts one message (exactly the bytes `seal` produced). On any error the state is
    /// unchanged: everything is computed on copies and committed after the tag verified.
    pub fn open(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        msg: &[u8],
    ) -> Result<Vec<u8>, RatchetError> {
        let mut buf = msg.to_vec();
        let pt = self.open_in_place(now, rng, ad, &mut buf)?;
        buf.truncate(pt.end);
        buf.drain(..pt.start);
        Ok(buf)
    }

    /// [`Ratchet::open`] in place: decrypts the ciphertext inside `msg` and returns the range
    /// of `msg` that holds the plaintext. The ratchet state is unchanged on any error; on an
    /// authentication failure the ciphertext part of `msg` is overwritten with zeros (ring
    /// erases what it decrypted), so no unauthenticated plaintext is ever left behind.
    pub fn open_in_place(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        msg: &mut [u8],
    ) -> Result<std::ops::Range<usize>, RatchetError> {
        let at = header_len(msg)?;
        let (header, body) = msg.split_at_mut(at);
        let len = self.open_parsed(now, rng, ad, &parsed(header), Body::InPlace(body))?;
        Ok(at..at + len)
    }

    /// [`Ratchet::open_in_place`] for the message `buf[msg..]`, with its plaintext moved to
    /// the start of `buf` in the same pass (a receiver lines records' contents up this way).
    /// Returns the plaintext's length. On an authentication failure that many bytes at the
    /// start of `buf` are overwritten with zeros; on any other error `buf` is unchanged.
    pub fn open_within(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        buf: &mut [u8],
        msg: usize,
    ) -> Result<usize, RatchetError> {
        let len = header_len(&buf[msg..])?;
        // The header is read after the plaintext may have overwritten it: keep a copy (its
        // fixed part, or up to two KEM fields on the few messages that carry them).
        let header = buf[msg..msg + len].to_vec();
        let body = Body::Within {
            buf,
            src: msg + len,
        };
        self.open_parsed(now, rng, ad, &parsed(&header), body)
    }

    fn open_parsed(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        m: &Parsed<'_>,
        body: Body<'_>,
    ) -> Result<usize, RatchetError> {
        if let Some(i) = self.skipped.iter().position(|k| k.dh == m.dh && k.n == m.n) {
            let len = decrypt(&self.skipped[i].mk, ad, m, body)?;
            self.skipped.remove(i);
            self.received();
            Ok(len)
        } else if m.dh == self.recv.dh {
            self.open_current(ad, m, body)
        } else if self.old_chains.contains(&m.dh) {
            Err(RatchetError::Replay)
        } else {
            self.open_new_chain(now, rng, ad, m, body)
        }
    }

    fn open_current(
        &mut self,
        ad: &[u8],
        m: &Parsed<'_>,
        body: Body<'_>,
    ) -> Result<usize, RatchetError> {
        if m.n < self.recv.n {
            return Err(RatchetError::Replay);
        }
        if m.n - self.recv.n > MAX_SKIP {
            return Err(RatchetError::TooManySkipped);
        }
        let mut skipped = Vec::new();
        let ck = skip_keys(&m.dh, &self.recv.ck, self.recv.n, m.n, &mut skipped);
        let (mk, next) = kdf_ck(&ck);
        let len = decrypt(&mk, ad, m, body)?;
        self.recv.ck = next;
        self.recv.n = m.n + 1;
        self.store_skipped(skipped);
        self.received();
        Ok(len)
    }

    fn open_new_chain(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
        ad: &[u8],
        m: &Parsed<'_>,
        body: Body<'_>,
    ) -> Result<usize, RatchetError> {
        if self.unanswered_since.is_some() {
            return Err(RatchetError::UnexpectedKey);
        }
        if m.pn.saturating_sub(self.recv.n) > MAX_SKIP || m.n > MAX_SKIP {
            return Err(RatchetError::TooManySkipped);
        }
        let kem_ss = match (m.ct, &self.kem_own) {
            (Some(ct), Some(dk)) => Some(dk.decapsulate(ct).map_err(|_| RatchetError::BadKem)?),
            (None, None) => None,
            _ => return Err(RatchetError::BadKem),
        };
        let answer = match m.ek {
            Some(ek) => {
                let (ct, ss) = mlkem_encapsulate(rng, ek).map_err(|_| RatchetError::BadKem)?;
                Some(KemAnswer { ct, ss })
            }
            None => None,
        };
        let dh = self.own.agree(&m.dh).map_err(|_| RatchetError::BadKey)?;
        let (rk, ck) = kdf_rk(&self.rk, &dh, kem_ss.as_ref());
        let mut new_chain_skipped = Vec::new();
        let ck = skip_keys(&m.dh, &ck, 0, m.n, &mut new_chain_skipped);
        let (mk, next) = kdf_ck(&ck);
        let len = decrypt(&mk, ad, m, body)?;
        // Authenticated: only now spend the work on the rest of the chain being left.
        let mut skipped = Vec::new();
        skip_keys(
            &self.recv.dh,
            &self.recv.ck,
            self.recv.n,
            m.pn,
            &mut skipped,
        );
        skipped.append(&mut new_chain_skipped);

        self.rk = rk;
        let old = std::mem::replace(
            &mut self.recv,
            RecvChain {
                dh: m.dh,
                ck: next,
                n: m.n + 1,
            },
        );
        self.store_skipped(skipped);
        self.old_chains.push_back(old.dh);
        if self.old_chains.len() > MAX_OLD_CHAINS {
            if let Some(gone) = self.old_chains.pop_front() {
                self.skipped.retain(|k| k.dh != gone);
            }
        }
        self.unanswered_since = Some(now);
        self.kem_answer = answer;
        if kem_ss.is_some() {
            self.kem_own = None;
            self.pq_step_completed(now);
        }
        self.stats.peer_dh_steps += 1;
        self.received();
        Ok(len)
    }

    fn store_skipped(&mut self, keys: Vec<SkippedKey>) {
        self.skipped.extend(keys);
        while self.skipped.len() > MAX_SKIPPED_KEYS {
            self.skipped.pop_front();
        }
    }

    fn received(&mut self) {
        self.recv_since_send = self.recv_since_send.saturating_add(1);
        self.stats.messages_received += 1;
    }

    /// True when we should send an (empty) message so the peer can step: we hold an unanswered
    /// new peer key, our rate limit allows our step, and we have received
    /// `RATCHET_ACK_EVERY_MESSAGES` records since we last sent or held the key for
    /// `RATCHET_ACK_INTERVAL`.
    pub fn wants_ack(&self, now: Instant) -> bool {
        self.ack_due().is_some_and(|due| now >= due)
    }

    /// The instant from which [`Ratchet::wants_ack`] is true if nothing else happens before
    /// (no message received or sent), if any. A driver sleeps until then, sends the empty
    /// acknowledgement, and asks again after every event.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ack_due()
    }

    fn ack_due(&self) -> Option<Instant> {
        let since = self.unanswered_since?;
        let allowed = self.last_step.checked_add(DH_RATCHET_MIN_INTERVAL)?;
        if self.recv_since_send >= RATCHET_ACK_EVERY_MESSAGES {
            return Some(allowed);
        }
        Some(allowed.max(since.checked_add(RATCHET_ACK_INTERVAL)?))
    }

    pub fn stats(&self) -> RatchetStats {
        RatchetStats {
            skipped_keys_stored: self.skipped.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    bytes: [u8; 32],
    unanswered_since: Option<Instant>,
    last_step: Instant,
    last_pq: Instant,
    steps_since_pq: u32,
    recv_since_send: u32,
    stats: RatchetStats,
}

#[cfg(test)]
impl Ratchet {
    fn root_fingerprint(&self) -> [u8; 32] {
        super::crypto::sha256(&[self.rk.expose()])
    }

    /// Hashes of every root, chain, message and KEM shared secret the state holds.
    fn secret_fingerprints(&self) -> Vec<[u8; 32]> {
        let mut v = vec![
            self.rk.expose(),
            self.send.ck.expose(),
            self.recv.ck.expose(),
        ];
        v.extend(self.skipped.iter().map(|k| k.mk.expose()));
        v.extend(self.kem_answer.iter().map(|a| a.ss.expose()));
        v.into_iter().map(|s| super::crypto::sha256(&[s])).collect()
    }

    /// Everything the state holds, for "state unchanged" assertions.
    fn snapshot(&self) -> Snapshot {
        let mut b = Vec::new();
        let opt = |b: &mut Vec<u8>, v: &Option<Vec<u8>>| match v {
            Some(v) => {
                b.push(1);
                b.extend_from_slice(v)
            }
            None => b.push(0),
        };
        b.extend_from_slice(self.rk.expose());
        b.extend_from_slice(&self.own_pub);
        b.extend_from_slice(self.send.ck.expose());
        b.extend_from_slice(&self.send.n.to_be_bytes());
        b.extend_from_slice(&self.send.pn.to_be_bytes());
        opt(&mut b, &self.send.ek);
        opt(&mut b, &self.send.ct);
        b.extend_from_slice(&self.recv.dh);
        b.extend_from_slice(self.recv.ck.expose());
        b.extend_from_slice(&self.recv.n.to_be_bytes());
        for k in &self.skipped {
            b.extend_from_slice(&k.dh);
            b.extend_from_slice(&k.n.to_be_bytes());
            b.extend_from_slice(k.mk.expose());
        }
        b.push(0xff);
        for dh in &self.old_chains {
            b.extend_from_slice(dh);
        }
        opt(&mut b, &self.kem_own.as_ref().map(|k| k.public()));
        opt(&mut b, &self.kem_answer.as_ref().map(|a| a.ct.clone()));
        if let Some(a) = &self.kem_answer {
            b.extend_from_slice(a.ss.expose());
        }
        Snapshot {
            bytes: super::crypto::sha256(&[&b]),
            unanswered_since: self.unanswered_since,
            last_step: self.last_step,
            last_pq: self.last_pq,
            steps_since_pq: self.steps_since_pq,
            recv_since_send: self.recv_since_send,
            stats: self.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::codec::Writer;
    use crate::core::crypto::DeterministicRandom;
    use proptest::prelude::*;
    use std::time::Duration;

    const AD: &[u8] = b"test session binding";

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A pause a little longer than the DH step rate limit: the next send may step.
    fn past_limit() -> Duration {
        DH_RATCHET_MIN_INTERVAL + ms(5)
    }

    /// Two parties in memory with a simulated clock.
    struct World {
        a: Ratchet,
        b: Ratchet,
        t0: Instant,
        now: Instant,
        rng: DeterministicRandom,
    }

    impl World {
        fn new(seed: u64) -> Self {
            let mut rng = DeterministicRandom::new(seed);
            let root = Secret32::random(&mut rng);
            let chain_i = Secret32::random(&mut rng);
            let chain_r = Secret32::random(&mut rng);
            let eph_i = X25519Secret::generate(&mut rng);
            let eph_r = X25519Secret::generate(&mut rng);
            let (pub_i, pub_r) = (eph_i.public(), eph_r.public());
            let t0 = Instant::now();
            let a = Ratchet::new(
                RatchetInit {
                    root: root.clone(),
                    initiator: true,
                    own_dh: eph_i,
                    peer_dh: pub_r,
                    send_chain: chain_i.clone(),
                    recv_chain: chain_r.clone(),
                },
                t0,
            );
            let b = Ratchet::new(
                RatchetInit {
                    root,
                    initiator: false,
                    own_dh: eph_r,
                    peer_dh: pub_i,
                    send_chain: chain_r,
                    recv_chain: chain_i,
                },
                t0,
            );
            World {
                a,
                b,
                t0,
                now: t0,
                rng,
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
        }

        fn side(&mut self, a: bool) -> &mut Ratchet {
            if a {
                &mut self.a
            } else {
                &mut self.b
            }
        }

        fn seal(&mut self, from_a: bool, pt: &[u8]) -> Vec<u8> {
            let now = self.now;
            let r = if from_a { &mut self.a } else { &mut self.b };
            let mut out = vec![0xee];
            r.seal(now, &mut self.rng, AD, pt, &mut out);
            assert_eq!(out[0], 0xee, "seal appends");
            out.remove(0);
            assert!(out.len() <= pt.len() + Ratchet::MAX_OVERHEAD);
            out
        }

        /// Opens and, on failure, asserts that the receiver's state did not change.
        fn open(&mut self, to_a: bool, msg: &[u8]) -> Result<Vec<u8>, RatchetError> {
            let now = self.now;
            let r = if to_a { &mut self.a } else { &mut self.b };
            let before = r.snapshot();
            let res = r.open(now, &mut self.rng, AD, msg);
            if res.is_err() {
                assert_eq!(r.snapshot(), before, "failed open changed the state");
            }
            res
        }

        /// Sends `count` messages and delivers them in order; returns them.
        fn exchange(&mut self, from_a: bool, count: usize, tag: &str) -> Vec<Vec<u8>> {
            let mut msgs = Vec::new();
            for i in 0..count {
                let pt = format!("{tag}/{i}");
                let m = self.seal(from_a, pt.as_bytes());
                assert_eq!(self.open(!from_a, &m).unwrap(), pt.as_bytes());
                msgs.push(m);
            }
            msgs
        }
    }

    fn dh_of(msg: &[u8]) -> [u8; 32] {
        msg[..32].try_into().unwrap()
    }
    fn pn_of(msg: &[u8]) -> u32 {
        u32::from_be_bytes(msg[32..36].try_into().unwrap())
    }
    fn flags_of(msg: &[u8]) -> u8 {
        msg[40]
    }

    #[test]
    fn overhead_fits_a_record() {
        assert_eq!(Ratchet::MAX_OVERHEAD, 41 + 1184 + 1088 + 16);
        let mut w = World::new(30);
        let big = vec![0x5a; MAX_RECORD_PLAINTEXT];
        let m = w.seal(false, &big);
        assert_eq!(m.len(), HEADER_LEN + MAX_RECORD_PLAINTEXT + TAG_LEN);
        assert_eq!(w.open(true, &m).unwrap(), big);
    }

    #[test]
    fn in_place_seal_and_open_match_the_copying_calls() {
        // Same seed, same operations: `copy` uses seal/open, `inplace` the in-place calls,
        // `within` opens messages lying further into a buffer, over enough direction changes
        // for chains that carry KEM fields.
        let (mut copy, mut inplace, mut within) = (World::new(41), World::new(41), World::new(41));
        let mut kem_chains = 0;
        for round in 0..2 * u64::from(PQ_RATCHET_EVERY_STEPS) + 2 {
            for from_a in [true, false] {
                copy.advance(past_limit());
                inplace.advance(past_limit());
                let pt = format!("round {round}");
                within.advance(past_limit());
                let sealed = copy.seal(from_a, pt.as_bytes());
                assert_eq!(within.seal(from_a, pt.as_bytes()), sealed);
                kem_chains += usize::from(flags_of(&sealed) != 0);
                let mut buf = b"prefix".to_vec();
                buf.resize(6 + HEADER_LEN, 0);
                buf.extend_from_slice(pt.as_bytes());
                let now = inplace.now;
                let r = if from_a {
                    &mut inplace.a
                } else {
                    &mut inplace.b
                };
                r.seal_in_place(now, &mut inplace.rng, AD, &mut buf, 6);
                assert_eq!(&buf[..6], b"prefix");
                assert_eq!(&buf[6..], &sealed[..]);

                let mut bad = sealed.clone();
                *bad.last_mut().unwrap() ^= 1;
                assert_eq!(copy.open(!from_a, &bad), Err(RatchetError::Auth));
                let r = if from_a {
                    &mut inplace.b
                } else {
                    &mut inplace.a
                };
                let before = r.snapshot();
                let res = r.open_in_place(now, &mut inplace.rng, AD, &mut bad);
                assert_eq!(res, Err(RatchetError::Auth));
                assert_eq!(r.snapshot(), before, "failed open changed the ratchet");
                assert!(
                    !bad.windows(pt.len()).any(|w| w == pt.as_bytes()),
                    "failed open left plaintext behind"
                );

                assert_eq!(copy.open(!from_a, &sealed).unwrap(), pt.as_bytes());
                let mut msg = sealed.clone();
                let range = r
                    .open_in_place(now, &mut inplace.rng, AD, &mut msg)
                    .unwrap();
                assert_eq!(&msg[range], pt.as_bytes());

                // The message `lead` bytes into a buffer (from less than a header to more
                // than a KEM field), its plaintext moved to the buffer's start.
                let lead = [1, 7, 45, 1200, 3000][round as usize % 5];
                let r = if from_a { &mut within.b } else { &mut within.a };
                let mut buf = vec![0x77; lead];
                buf.extend_from_slice(&sealed);
                *buf.last_mut().unwrap() ^= 1;
                let before = r.snapshot();
                let res = r.open_within(now, &mut within.rng, AD, &mut buf, lead);
                assert_eq!(res, Err(RatchetError::Auth));
                assert_eq!(r.snapshot(), before, "failed open changed the ratchet");
                assert!(
                    !buf.windows(pt.len()).any(|w| w == pt.as_bytes()),
                    "failed open left plaintext behind"
                );
                let mut buf = vec![0x77; lead];
                buf.extend_from_slice(&sealed);
                let len = r
                    .open_within(now, &mut within.rng, AD, &mut buf, lead)
                    .unwrap();
                assert_eq!(&buf[..len], pt.as_bytes());
            }
        }
        assert!(kem_chains > 0, "no chain carried KEM fields");
    }

    #[test]
    #[should_panic(expected = "MAX_RECORD_PLAINTEXT")]
    fn oversized_plaintext_is_a_programming_error() {
        let mut w = World::new(31);
        w.seal(true, &vec![0; MAX_RECORD_PLAINTEXT + 1]);
    }

    /// Recomputes keys, nonce, AAD and layout from the documented rules, independently of the
    /// implementation's helpers.
    #[test]
    fn wire_format_matches_the_documented_rules() {
        use crate::core::crypto::{aead_open_vec, hmac_sha256};
        let mk_of = |ck: &Secret32| {
            Secret32::from_bytes(hmac_sha256(ck.expose(), &[labels::CHAIN_MESSAGE_KEY]))
        };
        let next =
            |ck: &Secret32| Secret32::from_bytes(hmac_sha256(ck.expose(), &[labels::CHAIN_NEXT]));
        let open_with = |mk: &Secret32, msg: &[u8], n: u32| {
            let mut nonce = [0u8; 12];
            nonce[8..].copy_from_slice(&n.to_be_bytes());
            let mut aad = AD.to_vec();
            aad.extend_from_slice(&msg[..HEADER_LEN]);
            aead_open_vec(mk, &nonce, &aad, &msg[HEADER_LEN..]).unwrap()
        };
        let mut w = World::new(18);
        // Responder's handshake chain, message 1.
        let ck0 = w.b.send.ck.clone();
        let b_pub = w.b.own_pub;
        w.seal(false, b"zero");
        let m1 = w.seal(false, b"one");
        assert_eq!(&m1[..32], &b_pub);
        assert_eq!(&m1[32..41], &[0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(m1.len(), HEADER_LEN + 3 + TAG_LEN);
        assert_eq!(open_with(&mk_of(&next(&ck0)), &m1, 1), b"one");
        // The initiator's first DH step: KDF_RK with the new key against B's handshake key.
        let rk0 = w.a.rk.clone();
        w.advance(past_limit());
        w.seal(true, b"x");
        let m = w.seal(true, b"after step");
        let dh = w.b.own.agree(&dh_of(&m)).unwrap();
        let prk = hkdf_extract(rk0.expose(), &[dh.expose()]);
        let rk1 = hkdf_expand(&prk, labels::RATCHET_ROOT_STEP, &[]);
        let ck = hkdf_expand(&prk, labels::RATCHET_STEP_CHAIN, &[]);
        assert_eq!(&m[32..41], &[0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(open_with(&mk_of(&next(&ck)), &m, 1), b"after step");
        assert_eq!(w.a.rk, rk1);
    }

    #[test]
    fn conversation_steps_on_direction_changes_and_roots_agree() {
        let mut w = World::new(1);
        let mut total = 0;
        for round in 0..80u64 {
            for from_a in [true, false] {
                w.advance(past_limit());
                let count = 1 + ((round * 7 + u64::from(from_a)) % 40) as usize;
                let msgs = w.exchange(from_a, count, &format!("{round}{from_a}"));
                total += count;
                // Every message of a chain carries the same new ratchet key.
                assert!(msgs.iter().all(|m| dh_of(m) == dh_of(&msgs[0])));
                let (sender, receiver) = if from_a { (&w.a, &w.b) } else { (&w.b, &w.a) };
                assert_eq!(dh_of(&msgs[0]), sender.own_pub);
                assert_eq!(sender.stats().dh_steps, round + 1);
                assert_eq!(receiver.stats().peer_dh_steps, round + 1);
                assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
                assert_eq!(receiver.stats().skipped_keys_stored, 0);
            }
        }
        assert!(total > 3000);
        let (sa, sb) = (w.a.stats(), w.b.stats());
        assert_eq!(sa.messages_sent, sb.messages_received);
        assert_eq!(sb.messages_sent, sa.messages_received);
        assert_eq!(sa.messages_sent + sb.messages_sent, total as u64);
        assert_eq!(sa.pq_steps_completed, 10);
        assert_eq!(sb.pq_steps_completed, 10);
    }

    #[test]
    fn rate_limit_defers_steps() {
        let mut w = World::new(2);
        let eph_i = w.a.own_pub;
        // Within DH_RATCHET_MIN_INTERVAL of the handshake: handshake chain, no step.
        w.advance(ms(5));
        let m0 = w.seal(true, b"early");
        assert_eq!((dh_of(&m0), w.a.stats().dh_steps), (eph_i, 0));
        assert_eq!(w.open(false, &m0).unwrap(), b"early");
        assert_eq!(w.b.stats().peer_dh_steps, 0);
        w.advance(DH_RATCHET_MIN_INTERVAL - ms(5));
        let m1 = w.seal(true, b"stepped");
        assert_eq!(w.a.stats().dh_steps, 1);
        assert_ne!(dh_of(&m1), eph_i);
        assert_eq!(pn_of(&m1), 1);
        w.open(false, &m1).unwrap();
        assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
        // B last "stepped" at the handshake, DH_RATCHET_MIN_INTERVAL + 1 ms ago: it may
        // step now.
        w.advance(ms(1));
        let b0 = w.seal(false, b"reply");
        assert_eq!(w.b.stats().dh_steps, 1);
        w.open(true, &b0).unwrap();
        // A stepped 1 ms ago: it keeps sending on its current chain.
        w.advance(ms(1));
        let m2 = w.seal(true, b"deferred");
        assert_eq!(w.a.stats().dh_steps, 1);
        assert_eq!(dh_of(&m2), dh_of(&m1));
        let allowed = w.now + DH_RATCHET_MIN_INTERVAL - ms(2);
        assert!(!w.a.wants_ack(allowed - ms(1)));
        w.advance(DH_RATCHET_MIN_INTERVAL - ms(3));
        let m3 = w.seal(true, b"still deferred");
        assert_eq!((w.a.stats().dh_steps, dh_of(&m3)), (1, dh_of(&m1)));
        w.advance(ms(1));
        assert_eq!(w.now, allowed);
        let m4 = w.seal(true, b"now");
        assert_eq!(w.a.stats().dh_steps, 2);
        assert_ne!(dh_of(&m4), dh_of(&m1));
        assert_eq!(pn_of(&m4), 3);
        for (m, pt) in [
            (&m2, &b"deferred"[..]),
            (&m3, b"still deferred"),
            (&m4, b"now"),
        ] {
            assert_eq!(w.open(false, m).unwrap(), pt);
        }
        assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
    }

    #[test]
    fn wants_ack_after_n_messages_and_after_interval() {
        let mut w = World::new(3);
        // The initiator holds the handshake key unanswered; the responder holds nothing.
        assert_eq!(w.a.poll_timeout(), Some(w.t0 + RATCHET_ACK_INTERVAL));
        assert!(!w.a.wants_ack(w.t0 + RATCHET_ACK_INTERVAL - ms(1)));
        assert!(w.a.wants_ack(w.t0 + RATCHET_ACK_INTERVAL));
        assert_eq!(w.b.poll_timeout(), None);
        assert!(!w.b.wants_ack(w.t0 + RATCHET_ACK_INTERVAL * 10));

        // A one-way stream: B asks to acknowledge after N records.
        w.advance(past_limit());
        let n = RATCHET_ACK_EVERY_MESSAGES as usize;
        w.exchange(true, n - 1, "stream");
        assert!(!w.b.wants_ack(w.now));
        w.exchange(true, 1, "last");
        assert!(w.b.wants_ack(w.now));
        assert_eq!(w.b.poll_timeout(), Some(w.t0 + DH_RATCHET_MIN_INTERVAL));
        let ack = w.seal(false, b"");
        assert_eq!(w.b.stats().dh_steps, 1);
        assert!(!w.b.wants_ack(w.now));
        assert_eq!(w.b.poll_timeout(), None);
        assert_eq!(w.open(true, &ack).unwrap(), b"");
        assert!(!w.a.wants_ack(w.now));
        w.advance(past_limit());
        let next = w.exchange(true, 1, "after ack");
        assert_eq!(w.a.stats().dh_steps, 2);
        assert_eq!(w.b.stats().peer_dh_steps, 2);
        assert_eq!(dh_of(&next[0]), w.a.own_pub);

        // ... or after RATCHET_ACK_INTERVAL holding the new key.
        let since = w.now;
        assert_eq!(w.b.poll_timeout(), Some(since + RATCHET_ACK_INTERVAL));
        assert!(!w.b.wants_ack(since + RATCHET_ACK_INTERVAL - ms(1)));
        assert!(w.b.wants_ack(since + RATCHET_ACK_INTERVAL));
        w.advance(RATCHET_ACK_INTERVAL);
        let ack = w.seal(false, b"");
        assert_eq!(w.b.stats().dh_steps, 2);
        w.open(true, &ack).unwrap();
        w.advance(past_limit());
        w.exchange(true, 1, "after timed ack");
        assert_eq!(w.a.stats().dh_steps, 3);
        assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
    }

    /// Alternates chains of `per_chain` messages; returns (from_a, sender chain, flags) for
    /// every message and asserts the roots agree after each chain and that both sides have
    /// completed `pq_after(round)` PQ steps after each round.
    fn alternate(
        w: &mut World,
        rounds: u64,
        gap: Duration,
        per_chain: usize,
        pq_after: fn(u64) -> u64,
    ) -> Vec<(bool, u64, u8)> {
        let mut seen = Vec::new();
        for round in 0..rounds {
            for from_a in [true, false] {
                w.advance(gap);
                for m in w.exchange(from_a, per_chain, &format!("{round}")) {
                    let chain = w.side(from_a).stats().dh_steps;
                    let kem = usize::from(flags_of(&m) & FLAG_KEM_EK != 0) * MLKEM_EK_LEN
                        + usize::from(flags_of(&m) & FLAG_KEM_CT != 0) * MLKEM_CT_LEN;
                    assert_eq!(m.len(), HEADER_LEN + kem + round.to_string().len() + 2 + 16);
                    seen.push((from_a, chain, flags_of(&m)));
                }
                assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
            }
            let pq = pq_after(round);
            assert_eq!(w.a.stats().pq_steps_completed, pq);
            assert_eq!(w.b.stats().pq_steps_completed, pq);
        }
        seen
    }

    #[test]
    fn pq_steps_by_step_count() {
        let mut w = World::new(4);
        let every = u64::from(PQ_RATCHET_EVERY_STEPS);
        let seen = alternate(&mut w, 4 * every + 3, past_limit(), 3, |r| {
            (r + 1) / u64::from(PQ_RATCHET_EVERY_STEPS)
        });
        for (from_a, chain, flags) in seen {
            // A's every 8th chain offers a KEM key; B's next chain answers it.
            let due = chain % every == 0;
            let expect = match (from_a, due) {
                (true, true) => FLAG_KEM_EK,
                (false, true) => FLAG_KEM_CT,
                _ => 0,
            };
            assert_eq!(flags, expect, "from_a={from_a} chain={chain}");
        }
        assert_eq!(w.a.stats().pq_steps_completed, 4);
    }

    #[test]
    fn pq_steps_by_time() {
        let mut w = World::new(5);
        let gap = PQ_RATCHET_INTERVAL + ms(500);
        let seen = alternate(&mut w, 5, gap, 2, |r| r + 1);
        // Every A chain starts more than an interval after the last PQ step; B's answers it.
        for (from_a, _, flags) in seen {
            assert_eq!(flags, if from_a { FLAG_KEM_EK } else { FLAG_KEM_CT });
        }
        assert_eq!(w.a.stats().pq_steps_completed, 5);
        // Few steps within one interval: no PQ step yet.
        let mut w = World::new(6);
        let seen = alternate(&mut w, 2, PQ_RATCHET_INTERVAL / 5, 1, |_| 0);
        assert!(seen.iter().all(|s| s.2 == 0));
    }

    #[test]
    fn out_of_order_within_and_across_chains() {
        let mut w = World::new(7);
        w.advance(past_limit());
        let a1: Vec<_> = (0..10).map(|i| w.seal(true, &[i])).collect();
        for i in [5, 0, 9, 3] {
            assert_eq!(w.open(false, &a1[i]).unwrap(), [i as u8]);
        }
        // Held back: 1, 2, 4, 6, 7, 8.
        assert_eq!(w.b.stats().skipped_keys_stored, 6);
        for i in [2, 8] {
            assert_eq!(w.open(false, &a1[i]).unwrap(), [i as u8]);
        }
        assert_eq!(w.b.stats().skipped_keys_stored, 4);
        // Direction change; A's next chain overtakes the rest of the old one.
        w.advance(past_limit());
        w.exchange(false, 1, "b");
        w.advance(past_limit());
        let a2: Vec<_> = (0..4).map(|i| w.seal(true, &[100 + i])).collect();
        assert_eq!(pn_of(&a2[0]), 10);
        assert_eq!(w.open(false, &a2[2]).unwrap(), [102]);
        assert_eq!(w.b.stats().skipped_keys_stored, 4 + 2);
        for i in [7, 1, 4, 6] {
            assert_eq!(w.open(false, &a1[i]).unwrap(), [i as u8]);
        }
        for i in [3, 0, 1] {
            assert_eq!(w.open(false, &a2[i]).unwrap(), [100 + i as u8]);
        }
        assert_eq!(w.b.stats().skipped_keys_stored, 0);
        assert_eq!(w.b.stats().peer_dh_steps, 2);
        assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
    }

    #[test]
    fn max_skip_is_enforced_without_state_change() {
        let mut w = World::new(8);
        w.advance(past_limit());
        let skip = MAX_SKIP as usize;
        let m: Vec<_> = (0..2 * skip + 4)
            .map(|i| w.seal(true, &i.to_be_bytes()))
            .collect();
        // New chain: n = MAX_SKIP + 1 is too far.
        assert_eq!(
            w.open(false, &m[skip + 1]),
            Err(RatchetError::TooManySkipped)
        );
        assert_eq!(w.open(false, &m[0]).unwrap(), 0usize.to_be_bytes());
        // Same chain: MAX_SKIP keys are fine, MAX_SKIP + 1 are not.
        assert_eq!(
            w.open(false, &m[skip + 1]).unwrap(),
            (skip + 1).to_be_bytes()
        );
        assert_eq!(w.b.stats().skipped_keys_stored, skip);
        let far = 2 * skip + 3;
        assert_eq!(w.open(false, &m[far]), Err(RatchetError::TooManySkipped));
        assert_eq!(
            w.open(false, &m[skip + 2]).unwrap(),
            (skip + 2).to_be_bytes()
        );
        assert_eq!(w.open(false, &m[far]).unwrap(), far.to_be_bytes());
        assert_eq!(w.b.stats().skipped_keys_stored, 2 * skip);
        assert!(2 * skip <= MAX_SKIPPED_KEYS);

        // The jump to PN of the chain being left counts too.
        let mut w = World::new(9);
        w.advance(past_limit());
        let m: Vec<_> = (0..skip + 2)
            .map(|i| w.seal(true, &i.to_be_bytes()))
            .collect();
        w.open(false, &m[0]).unwrap();
        w.advance(past_limit());
        w.exchange(false, 1, "ack");
        w.advance(past_limit());
        let next = w.seal(true, b"next chain");
        assert_eq!(pn_of(&next), MAX_SKIP + 2);
        assert_eq!(w.open(false, &next), Err(RatchetError::TooManySkipped));
        w.open(false, &m[1]).unwrap();
        assert_eq!(w.open(false, &next).unwrap(), b"next chain");
        assert_eq!(w.b.stats().skipped_keys_stored, skip);
    }

    #[test]
    fn skipped_keys_stay_bounded_oldest_evicted() {
        let mut w = World::new(10);
        let mut chains = Vec::new();
        for c in 0..4 {
            w.advance(past_limit());
            let m: Vec<_> = (0..600u32)
                .map(|i| w.seal(true, &i.to_be_bytes()))
                .collect();
            w.open(false, &m[599]).unwrap();
            assert!(w.b.stats().skipped_keys_stored <= MAX_SKIPPED_KEYS);
            assert_eq!(w.b.stats().skipped_keys_stored, (599 * (c + 1)).min(2000));
            chains.push(m);
            w.advance(past_limit());
            w.exchange(false, 1, "ack");
        }
        // 4 * 599 = 2396 keys were skipped; the 396 oldest (chain 0, n < 396) are gone.
        assert_eq!(w.open(false, &chains[0][395]), Err(RatchetError::Replay));
        assert_eq!(
            w.open(false, &chains[0][396]).unwrap(),
            396u32.to_be_bytes()
        );
        assert_eq!(w.open(false, &chains[3][0]).unwrap(), 0u32.to_be_bytes());
        assert_eq!(w.b.stats().skipped_keys_stored, MAX_SKIPPED_KEYS - 2);
    }

    #[test]
    fn only_max_old_chains_are_remembered() {
        let mut w = World::new(11);
        let mut held = Vec::new();
        let chains = MAX_OLD_CHAINS + 2;
        for _ in 0..chains {
            w.advance(past_limit());
            let m = [w.seal(true, b"late"), w.seal(true, b"on time")];
            w.open(false, &m[1]).unwrap();
            held.push(m[0].clone());
            w.advance(past_limit());
            w.exchange(false, 1, "ack");
        }
        assert_eq!(w.b.stats().skipped_keys_stored, MAX_OLD_CHAINS + 1);
        // Chains 1.. are A's stepped chains; B's current one is the last, so the first
        // (chains - 1 - MAX_OLD_CHAINS) are forgotten.
        let forgotten = chains - 1 - MAX_OLD_CHAINS;
        for (i, m) in held.iter().enumerate() {
            let res = w.open(false, m);
            if i < forgotten {
                assert!(res.is_err(), "chain {i} should be forgotten");
            } else {
                assert_eq!(res.unwrap(), b"late", "chain {i}");
            }
        }
        assert_eq!(w.b.stats().skipped_keys_stored, 0);
    }

    #[test]
    fn replays_fail_without_state_change() {
        let mut w = World::new(12);
        let mut delivered = Vec::new();
        for round in 0..3 {
            for from_a in [true, false] {
                w.advance(past_limit());
                let m: Vec<_> = (0..5u8).map(|i| w.seal(from_a, &[round, i])).collect();
                for i in [3, 0, 4, 1, 2] {
                    assert_eq!(w.open(!from_a, &m[i]).unwrap(), [round, i as u8]);
                    delivered.push((!from_a, m[i].clone()));
                }
            }
        }
        for (to_a, m) in &delivered {
            assert_eq!(w.open(*to_a, m), Err(RatchetError::Replay));
        }
        w.advance(past_limit());
        w.exchange(true, 1, "still alive");
    }

    /// Bit-flips every byte and tries truncations/extensions; all must fail without state
    /// change, and the original must open afterwards.
    fn assert_tamper_proof(w: &mut World, to_a: bool, msg: &[u8]) -> Vec<u8> {
        for i in 0..msg.len() {
            let mut t = msg.to_vec();
            t[i] ^= 1 << (i % 8);
            assert!(w.open(to_a, &t).is_err(), "flip at byte {i} accepted");
        }
        for len in [
            0,
            HEADER_LEN - 1,
            HEADER_LEN,
            msg.len() - TAG_LEN,
            msg.len() - 1,
        ] {
            assert!(w.open(to_a, &msg[..len]).is_err(), "truncation to {len}");
        }
        let mut longer = msg.to_vec();
        longer.push(0);
        assert!(w.open(to_a, &longer).is_err());
        w.open(to_a, msg).expect("original still opens")
    }

    #[test]
    fn tampered_messages_fail_without_state_change() {
        let mut w = World::new(13);
        // Reach the first PQ step: A's chain 8 offers a KEM key.
        for round in 1..PQ_RATCHET_EVERY_STEPS {
            w.advance(past_limit());
            w.exchange(true, 1, &format!("a{round}"));
            w.advance(past_limit());
            w.exchange(false, 1, &format!("b{round}"));
        }
        w.advance(past_limit());
        let a = [w.seal(true, b"offer 0"), w.seal(true, b"offer 1")];
        assert_eq!(flags_of(&a[0]), FLAG_KEM_EK);
        assert_eq!(assert_tamper_proof(&mut w, false, &a[0]), b"offer 0");
        assert_eq!(assert_tamper_proof(&mut w, false, &a[1]), b"offer 1");
        w.advance(past_limit());
        let b = w.seal(false, b"answer");
        assert_eq!(flags_of(&b), FLAG_KEM_CT);
        assert_eq!(assert_tamper_proof(&mut w, true, &b), b"answer");
        w.advance(past_limit());
        let plain = w.seal(true, b"plain");
        assert_eq!(flags_of(&plain), 0);
        assert_eq!(assert_tamper_proof(&mut w, false, &plain), b"plain");
        assert_eq!(w.a.stats().pq_steps_completed, 1);
        assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
    }

    /// A syntactically valid message from a fresh ratchet key with the given KEM fields.
    fn crafted(dh: [u8; 32], flags: u8, ek: &[u8], ct: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        Writer::new(&mut m)
            .bytes(&dh)
            .u32(0)
            .u32(0)
            .u8(flags)
            .bytes(ek)
            .bytes(ct);
        m.extend_from_slice(&[0u8; TAG_LEN]);
        m
    }

    #[test]
    fn protocol_violations_are_rejected() {
        let mut w = World::new(14);
        let fresh = X25519Secret::generate(&mut w.rng).public();
        let ok = w.seal(false, b"ok");
        let mut bad_flags = ok.clone();
        bad_flags[40] |= 0x04;
        assert_eq!(
            w.open(true, &bad_flags),
            Err(RatchetError::Malformed(DecodeError::Invalid(
                "ratchet header flags"
            )))
        );
        let mut max_n = ok.clone();
        max_n[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            w.open(true, &max_n),
            Err(RatchetError::Malformed(_))
        ));
        let mut huge = ok[..HEADER_LEN].to_vec();
        huge.resize(HEADER_LEN + MAX_RECORD_PLAINTEXT + TAG_LEN + 1, 0);
        assert!(matches!(
            w.open(true, &huge),
            Err(RatchetError::Malformed(DecodeError::TooLong(..)))
        ));
        assert_eq!(
            w.open(true, &ok[..HEADER_LEN + 3]),
            Err(RatchetError::Malformed(DecodeError::Truncated))
        );
        // A holds B's handshake key unanswered: a second new key breaks alternation.
        let m = crafted(fresh, 0, &[], &[]);
        assert_eq!(w.open(true, &m), Err(RatchetError::UnexpectedKey));
        // B (nothing unanswered, no KEM key outstanding):
        assert_eq!(w.open(false, &m), Err(RatchetError::Auth));
        let low_order = crafted([0; 32], 0, &[], &[]);
        assert_eq!(w.open(false, &low_order), Err(RatchetError::BadKey));
        let ct = crafted(fresh, FLAG_KEM_CT, &[], &[7; MLKEM_CT_LEN]);
        assert_eq!(w.open(false, &ct), Err(RatchetError::BadKem));
        let ek = crafted(fresh, FLAG_KEM_EK, &[0xff; MLKEM_EK_LEN], &[]);
        assert_eq!(w.open(false, &ek), Err(RatchetError::BadKem));
        let good_ek = MlKemSecret::generate(&mut w.rng).public();
        let ek = crafted(fresh, FLAG_KEM_EK, &good_ek, &[]);
        assert_eq!(w.open(false, &ek), Err(RatchetError::Auth));
        assert_eq!(w.open(true, &ok).unwrap(), b"ok");

        // A with a KEM key outstanding: B's next chain must carry the ciphertext.
        let mut w = World::new(15);
        let gap = PQ_RATCHET_INTERVAL + ms(1);
        w.advance(gap);
        let offer = w.exchange(true, 1, "offer");
        assert_eq!(flags_of(&offer[0]), FLAG_KEM_EK);
        let no_ct = crafted(fresh, 0, &[], &[]);
        assert_eq!(w.open(true, &no_ct), Err(RatchetError::BadKem));
        let with_ct = crafted(fresh, FLAG_KEM_CT, &[], &[7; MLKEM_CT_LEN]);
        assert_eq!(w.open(true, &with_ct), Err(RatchetError::Auth));
        w.advance(past_limit());
        w.exchange(false, 1, "answer");
        assert_eq!(w.a.stats().pq_steps_completed, 1);
    }

    #[test]
    fn forward_secrecy_old_keys_are_erased() {
        let mut w = World::new(16);
        w.advance(past_limit());
        let m: Vec<_> = (0..4u8).map(|i| w.seal(true, &[i])).collect();
        for i in [0, 2, 3] {
            w.open(false, &m[i]).unwrap();
        }
        // The skipped key of message 1 is held until it is used, then erased.
        let with_skipped = w.b.secret_fingerprints();
        w.open(false, &m[1]).unwrap();
        let after_use = w.b.secret_fingerprints();
        assert_eq!(with_skipped.len(), after_use.len() + 1);
        let used = with_skipped.iter().find(|f| !after_use.contains(f));
        assert!(used.is_some());
        for msg in &m {
            assert_eq!(w.open(false, msg), Err(RatchetError::Replay));
        }
        let (old_a, old_b) = (w.a.secret_fingerprints(), w.b.secret_fingerprints());
        let (pub_a, pub_b) = (w.a.own_pub, w.b.own_pub);
        for from_a in [false, true] {
            w.advance(past_limit());
            w.exchange(from_a, 2, "step");
        }
        assert_ne!(w.a.own_pub, pub_a);
        assert_ne!(w.b.own_pub, pub_b);
        for (old, new) in [
            (old_a, w.a.secret_fingerprints()),
            (old_b, w.b.secret_fingerprints()),
        ] {
            assert!(
                old.iter().all(|f| !new.contains(f)),
                "old key survived a DH step"
            );
        }
        for msg in &m {
            assert!(w.open(false, msg).is_err());
        }
    }

    #[test]
    fn debug_shows_no_secrets() {
        let mut w = World::new(17);
        w.advance(past_limit());
        w.exchange(true, 2, "x");
        let text = format!("{:?} {:?}", w.a, w.b);
        assert!(text.contains("dh_steps: 1"));
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        for r in [&w.a, &w.b] {
            for s in [r.rk.expose(), r.send.ck.expose(), r.recv.ck.expose()] {
                assert!(!text.contains(&hex(&s[..3])));
                assert!(!text.contains(format!("{:?}", &s[..3]).trim_end_matches(']')));
            }
        }
        assert!(text.contains(&hex(&w.a.own_pub[..4])));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send {
            from_a: bool,
            len: u8,
        },
        Deliver {
            to_a: bool,
            pick: usize,
        },
        Drop {
            to_a: bool,
            pick: usize,
        },
        Replay {
            to_a: bool,
            pick: usize,
        },
        /// Past the rate limit, send and deliver at once: a direction change.
        Turn {
            from_a: bool,
        },
        Advance(u16),
        Jump(u8),
        Ack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (any::<bool>(), 0u8..40).prop_map(|(from_a, len)| Op::Send { from_a, len }),
            4 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Deliver { to_a, pick }),
            // The newest message: moves the ratchet on and leaves older ones in flight.
            3 => any::<bool>().prop_map(|to_a| Op::Deliver { to_a, pick: usize::MAX }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Drop { to_a, pick }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Replay { to_a, pick }),
            2 => any::<bool>().prop_map(|from_a| Op::Turn { from_a }),
            3 => (0u16..40).prop_map(Op::Advance),
            1 => (1u8..70).prop_map(Op::Jump),
            1 => Just(Op::Ack),
        ]
    }

    #[derive(Clone)]
    struct Flight {
        msg: Vec<u8>,
        pt: Vec<u8>,
        chain: u64,
    }

    /// Delivers one message; it must open iff its chain is still remembered.
    fn deliver(w: &mut World, to_a: bool, f: Flight) -> Result<bool, TestCaseError> {
        let current = w.side(to_a).stats().peer_dh_steps;
        let res = w.open(to_a, &f.msg);
        if f.chain + MAX_OLD_CHAINS as u64 >= current {
            prop_assert_eq!(res, Ok(f.pt));
            Ok(true)
        } else {
            prop_assert!(res.is_err());
            Ok(false)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn random_interleavings(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..300)) {
            let mut w = World::new(seed);
            // Indexed by receiver: [to B, to A].
            let mut flight: [Vec<Flight>; 2] = [Vec::new(), Vec::new()];
            let mut delivered: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
            let mut lost = [0usize; 2];
            let mut id = 0u32;
            for op in ops {
                match op {
                    Op::Send { from_a, len } => {
                        id += 1;
                        let mut pt = id.to_be_bytes().to_vec();
                        pt.resize(4 + len as usize, len);
                        let msg = w.seal(from_a, &pt);
                        let chain = w.side(from_a).stats().dh_steps;
                        flight[usize::from(from_a)].push(Flight { msg, pt, chain });
                    }
                    Op::Turn { from_a } => {
                        w.advance(DH_RATCHET_MIN_INTERVAL);
                        id += 1;
                        let pt = id.to_be_bytes().to_vec();
                        let msg = w.seal(from_a, &pt);
                        let chain = w.side(from_a).stats().dh_steps;
                        if deliver(&mut w, !from_a, Flight { msg: msg.clone(), pt, chain })? {
                            delivered[usize::from(!from_a)].push(msg);
                        } else {
                            lost[usize::from(!from_a)] += 1;
                        }
                    }
                    Op::Ack => {
                        for from_a in [true, false] {
                            let now = w.now;
                            if w.side(from_a).wants_ack(now) {
                                let msg = w.seal(from_a, b"");
                                let chain = w.side(from_a).stats().dh_steps;
                                flight[usize::from(from_a)].push(Flight { msg, pt: vec![], chain });
                            }
                        }
                    }
                    Op::Deliver { to_a, pick } | Op::Drop { to_a, pick } => {
                        let q = &mut flight[usize::from(!to_a)];
                        if q.is_empty() {
                            continue;
                        }
                        let f = q.remove(if pick == usize::MAX { q.len() - 1 } else { pick % q.len() });
                        if matches!(op, Op::Drop { .. }) {
                            lost[usize::from(to_a)] += 1;
                        } else if deliver(&mut w, to_a, f.clone())? {
                            delivered[usize::from(to_a)].push(f.msg);
                        } else {
                            lost[usize::from(to_a)] += 1;
                        }
                    }
                    Op::Replay { to_a, pick } => {
                        let d = &delivered[usize::from(to_a)];
                        if !d.is_empty() {
                            let m = d[pick % d.len()].clone();
                            prop_assert!(w.open(to_a, &m).is_err());
                        }
                    }
                    Op::Advance(v) => w.advance(ms(u64::from(v))),
                    Op::Jump(s) => w.advance(Duration::from_secs(u64::from(s))),
                }
                for to_a in [true, false] {
                    let held = w.side(to_a).stats().skipped_keys_stored;
                    // Every skipped key belongs to a sent message not delivered yet.
                    prop_assert!(held <= flight[usize::from(!to_a)].len() + lost[usize::from(to_a)]);
                    prop_assert!(held <= MAX_SKIPPED_KEYS);
                }
            }
            for to_a in [true, false] {
                for f in std::mem::take(&mut flight[usize::from(!to_a)]) {
                    deliver(&mut w, to_a, f)?;
                }
            }
            // One more exchange brings both sides to the same root.
            w.advance(ms(100));
            let m = w.seal(true, b"sync a");
            prop_assert_eq!(w.open(false, &m).unwrap(), b"sync a");
            w.advance(ms(100));
            let m = w.seal(false, b"sync b");
            prop_assert_eq!(w.open(true, &m).unwrap(), b"sync b");
            prop_assert_eq!(w.a.root_fingerprint(), w.b.root_fingerprint());
            let (a, b) = (w.a.stats(), w.b.stats());
            prop_assert_eq!(a.dh_steps, b.peer_dh_steps);
            prop_assert_eq!(b.dh_steps, a.peer_dh_steps);
            prop_assert_eq!(a.pq_steps_completed, b.pq_steps_completed);
        }
    }
}
