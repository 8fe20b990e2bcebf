//! Unreliable datagram records under per-direction epoch keys: how VPN packets travel over
//! UDP. Each datagram stands alone (loss, reordering and duplication are expected); keys
//! change by *epochs* whose secrets travel through the session's reliable ratchet channel.
//!
//! # Record layout
//!
//! A datagram record is exactly one UDP payload; there is no length field.
//!
//! ```text
//! offset  size  field
//!      0     1  type              0x05 (DATAGRAM_RECORD_TYPE)
//!      1     4  receiver_session  u32, big-endian: session id chosen by the receiving peer
//!      5     4  epoch             u32, big-endian: the sender's epoch number, 1, 2, 3, ...
//!      9     8  counter           u64, big-endian: packet number within the epoch, from 0
//!     17     n  ciphertext        AES-256-GCM encryption of the n-byte plaintext
//!   17+n    16  tag               AES-256-GCM tag
//! ```
//!
//! - Header: bytes 0..17. Overhead: 17 + 16 = 33 bytes (DATAGRAM_OVERHEAD).
//! - Size: 0 <= n <= MAX_DATAGRAM_PLAINTEXT = MAX_DATAGRAM - 33 = 65 502, so a record is
//!   33 ..= 65 535 bytes. An empty plaintext is valid (keepalive).
//! - AAD: the 17 header bytes exactly as sent.
//! - Nonce (12 bytes): `00 00 00 00 || counter (u64 big-endian)`. The epoch is not in the
//!   nonce: each key belongs to exactly one (direction, receiver_session, epoch) and is
//!   derived from a fresh random secret, and within an epoch a sender never repeats or wraps
//!   a counter (it hard-stops at DATAGRAM_MAX_PACKETS = 2^32, well inside AES-GCM's per-key limits), so no (key, nonce) pair ever
//!   repeats.
//! - Key: `HKDF-Expand(PRK = epoch_secret, info = "qssh v1 datagram epoch" || direction (u8)
//!   || receiver_session (u32 BE) || epoch (u32 BE), L = 32)`, where `epoch_secret` is the
//!   32-byte secret of the epoch announcement and `direction` is 0x01 for datagrams sent by
//!   the handshake initiator (to the responder) and 0x02 for datagrams sent by the responder.
//!   Binding the direction makes a reflected datagram fail authentication even if both peers
//!   chose the same session id; binding the epoch and session makes a key useless under any
//!   other header.
//!
//! # Epoch announcement
//!
//! `epoch (u32 BE) || epoch_secret (32 bytes)`, 36 bytes, carried only inside the reliable
//! ratchet channel (encrypted, ordered, retransmitted), never on the datagram path. The
//! frame that carries it belongs to the channel layer. Epoch 0 is never used.
//!
//! # Sender rules (one sender per direction)
//!
//! 1. A new sender has no epoch; sealing fails (`NoActiveEpoch`) until one is active.
//! 2. `rotate` creates epoch `last + 1` (the first is 1) with a fresh 32-byte secret from the
//!    CSPRNG, keeps it *pending* and returns the announcement. At most one epoch is pending:
//!    `rotate` fails while one is (`RotationPending`), and after epoch `u32::MAX`
//!    (`EpochsExhausted`).
//! 3. `activate(e)` makes the pending epoch `e` the active one; the previous active key is
//!    erased. Until then the sender keeps sealing under the old epoch.
//! 4. `seal` uses the active epoch with counters 0, 1, 2, ... It refuses (`EpochExhausted`)
//!    once DATAGRAM_MAX_PACKETS were sealed, and (`EpochExpired`) once the epoch is
//!    DATAGRAM_REJECT_AFTER (180 s) old, counted from `rotate`.
//! 5. `needs_rotation` is true when nothing is pending and there is no active epoch, or it
//!    sealed DATAGRAM_REKEY_PACKETS (2^24) datagrams, or it is DATAGRAM_REKEY_INTERVAL
//!    (120 s) old. Drivers check it before sealing and on their timer.
//!
//! # Receiver rules
//!
//! 1. `install(e)` requires `e = last installed + 1` (the first is 1), else
//!    `EpochOutOfOrder`. Epoch `e` becomes *current* with an empty replay window, the old
//!    current becomes *previous*, and the epoch before that (if any) is erased.
//! 2. `open`: the length must be 33 ..= MAX_DATAGRAM, the type 0x05 and the receiver session
//!    ours (else a malformed-class error). The epoch selects the current or the previous key;
//!    any other epoch is `UnknownEpoch`. The record is then authenticated; on failure
//!    (`BadAuth`) nothing changes. Only an authentic record reaches its epoch's replay
//!    window (see `replay.rs`: REPLAY_WINDOW = 4096 counters, each accepted once, counter
//!    2^64 - 1 never); a rejected counter is `Replayed`. Each epoch has its own window.
//! 3. The previous epoch is erased DATAGRAM_EPOCH_GRACE (10 s) after the first authentic
//!    datagram of the current epoch: that datagram proves the sender switched, and the grace
//!    lets packets already in flight (and reordered across the switch) still open. Until
//!    then the previous key stays, because the sender may still be using it.
//! 4. Every epoch is erased DATAGRAM_REJECT_AFTER + DATAGRAM_EPOCH_GRACE after it was
//!    installed: its sender created it before we installed it and stops using it
//!    DATAGRAM_REJECT_AFTER after creating it. This bounds how long any key lives.
//!
//! # Rotation, step by step (sender A, receiver B, datagrams A -> B)
//!
//! 1. A: `needs_rotation` -> `rotate` -> announcement for `e+1`. A still seals under `e`.
//! 2. A's driver hands the announcement to the reliable channel.
//! 3. B: `install(e+1)`. B now opens both `e` and `e+1`.
//! 4. B's driver confirms `e+1` to A through the reliable channel.
//! 5. A: `activate(e+1)` on that confirmation. From now on A seals under `e+1`.
//! 6. B: the first authentic `e+1` datagram, at time t, starts the grace: `e` opens until
//!    t + DATAGRAM_EPOCH_GRACE and is then erased.
//!
//! B holds `e+1` before A uses it (steps 3-5), and `e` until well after A stopped using it
//! (step 6), so a rotation loses no datagram unless one is delayed more than the grace
//! behind a later one. A driver without a confirmation message may activate right after
//! step 2; datagrams that overtake the announcement then fail as `UnknownEpoch` (dropped and
//! counted; the tunnelled protocols recover as from any loss). Because A rotates again only
//! after activating `e+1`, installing `e+2` at B erases only `e`, which A no longer uses.
//!
//! # What a forger can do
//!
//! Header fields are used before authentication only to pick a key; they are all covered by
//! the tag. A forged, corrupted or misdirected record changes nothing but a statistics
//! counter: it cannot move a replay window, start the grace period or install a key. No
//! input makes `open` panic or allocate beyond the record's own (bounded) size.

use super::codec::{DecodeError, Reader};
use super::crypto::{hkdf_expand, AeadKey, Secret32, SecureRandom, TAG_LEN};
use super::labels;
use super::limits::{
    DATAGRAM_EPOCH_GRACE, DATAGRAM_MAX_PACKETS, DATAGRAM_REJECT_AFTER, DATAGRAM_REKEY_INTERVAL,
    DATAGRAM_REKEY_PACKETS, MAX_DATAGRAM,
};
use super::replay::ReplayWindow;
use std::fmt;
use std::time::{Duration, Instant};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// Record type byte of a datagram record.
pub const DATAGRAM_RECORD_TYPE: u8 = 0x05;
/// Header bytes: type, receiver session, epoch, counter.
pub const DATAGRAM_HEADER_LEN: usize = 1 + 4 + 4 + 8;
/// Bytes a record adds to its plaintext.
pub const DATAGRAM_OVERHEAD: usize = DATAGRAM_HEADER_LEN + TAG_LEN;
/// Largest plaintext of one datagram record.
pub const MAX_DATAGRAM_PLAINTEXT: usize = MAX_DATAGRAM - DATAGRAM_OVERHEAD;
/// Encoded length of an [`EpochAnnouncement`].
pub const EPOCH_ANNOUNCEMENT_LEN: usize = 4 + 32;

/// Which way datagrams flow, by handshake role. Bound into every epoch key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the handshake initiator, received by the responder.
    InitiatorToResponder,
    /// Sent by the handshake responder, received by the initiator.
    ResponderToInitiator,
}

impl Direction {
    /// The byte that goes into the key derivation context.
    pub fn wire(self) -> u8 {
        match self {
            Direction::InitiatorToResponder => 0x01,
            Direction::ResponderToInitiator => 0x02,
        }
    }
}

/// Why a datagram operation failed. Receive errors say only what the stats count; the
/// record should simply be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DatagramError {
    #[error("datagram record shorter than its overhead")]
    Truncated,
    #[error("datagram record longer than MAX_DATAGRAM")]
    TooLarge,
    #[error("not a datagram record")]
    WrongType,
    #[error("datagram record for another session")]
    WrongSession,
    #[error("datagram epoch unknown or expired")]
    UnknownEpoch,
    #[error("datagram authentication failed")]
    BadAuth,
    #[error("datagram replayed or too old")]
    Replayed,
    #[error("datagram plaintext too long ({len} > {max})")]
    PlaintextTooLarge { len: usize, max: usize },
    #[error("no active datagram epoch")]
    NoActiveEpoch,
    #[error("datagram epoch used for its maximum number of packets")]
    EpochExhausted,
    #[error("datagram epoch older than its maximum lifetime")]
    EpochExpired,
    #[error("a datagram epoch rotation is already pending")]
    RotationPending,
    #[error("datagram epoch numbers exhausted")]
    EpochsExhausted,
    #[error("datagram epoch {0} is not the pending epoch")]
    NotPending(u32),
    #[error("datagram epoch announcement out of order (expected {expected}, got {got})")]
    EpochOutOfOrder { expected: u32, got: u32 },
    #[error("malformed datagram epoch announcement")]
    BadAnnouncement,
}

/// A new epoch secret, from [`DatagramSender::rotate`] to [`DatagramReceiver::install`]
/// through the reliable channel. The secret is zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochAnnouncement {
    pub epoch: u32,
    pub secret: Secret32,
}

impl fmt::Debug for EpochAnnouncement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochAnnouncement")
            .field("epoch", &self.epoch)
            .field("secret", &self.secret)
            .finish()
    }
}

impl EpochAnnouncement {
    /// `epoch (u32 BE) || secret`, in a buffer that is zeroized on drop.
    pub fn to_bytes(&self) -> Zeroizing<[u8; EPOCH_ANNOUNCEMENT_LEN]> {
        let mut out = Zeroizing::new([0u8; EPOCH_ANNOUNCEMENT_LEN]);
        out[..4].copy_from_slice(&self.epoch.to_be_bytes());
        out[4..].copy_from_slice(self.secret.expose());
        out
    }

    /// Parses exactly [`EPOCH_ANNOUNCEMENT_LEN`] bytes; epoch 0 is invalid.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DatagramError> {
        if bytes.len() != EPOCH_ANNOUNCEMENT_LEN {
            return Err(DatagramError::BadAnnouncement);
        }
        let mut r = Reader::new(bytes);
        let epoch = r.u32().map_err(|_| DatagramError::BadAnnouncement)?;
        let mut secret: [u8; 32] = r.array().map_err(|_| DatagramError::BadAnnouncement)?;
        let secret32 = Secret32::from_bytes(secret);
        secret.zeroize();
        if epoch == 0 {
            return Err(DatagramError::BadAnnouncement);
        }
        Ok(EpochAnnouncement {
            epoch,
            secret: secret32,
        })
    }
}

/// Receive statistics, for the VPN to report. Every `open` call increments exactly one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramStats {
    /// Records that opened.
    pub ok: u64,
    /// Authentic records rejected by the replay window (duplicate or too old).
    pub replayed: u64,
    /// Records that failed authentication.
    pub bad_auth: u64,
    /// Records for an epoch we do not hold (not yet installed, expired or forged).
    pub unknown_epoch: u64,
    /// Records with a bad length, type or receiver session.
    pub malformed: u64,
}

/// The receiver session id of something that looks like a datagram record (right type and
/// a plausible length), for a driver that demultiplexes one UDP socket across sessions.
/// Nothing is authenticated yet: use it only to pick the [`DatagramReceiver`].
pub fn peek_receiver_session(record: &[u8]) -> Option<u32> {
    if !(DATAGRAM_OVERHEAD..=MAX_DATAGRAM).contains(&record.len())
        || record[0] != DATAGRAM_RECORD_TYPE
    {
        return None;
    }
    let mut r = Reader::new(&record[1..5]);
    r.u32().ok()
}

/// The epoch's AES-256-GCM key, with its key schedule ready (one expansion per epoch, not
/// per packet); the derived bytes are erased when this returns.
fn epoch_key(secret: &Secret32, direction: Direction, session: u32, epoch: u32) -> AeadKey {
    let mut ctx = [0u8; 9];
    ctx[0] = direction.wire();
    ctx[1..5].copy_from_slice(&session.to_be_bytes());
    ctx[5..9].copy_from_slice(&epoch.to_be_bytes());
    AeadKey::new(&hkdf_expand(secret, labels::DATAGRAM_EPOCH, &ctx))
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn header(session: u32, epoch: u32, counter: u64) -> [u8; DATAGRAM_HEADER_LEN] {
    let mut h = [0u8; DATAGRAM_HEADER_LEN];
    h[0] = DATAGRAM_RECORD_TYPE;
    h[1..5].copy_from_slice(&session.to_be_bytes());
    h[5..9].copy_from_slice(&epoch.to_be_bytes());
    h[9..17].copy_from_slice(&counter.to_be_bytes());
    h
}

/// Type, receiver session, epoch and counter of a record's header.
fn parse_header(record: &[u8]) -> Result<(u8, u32, u32, u64), DecodeError> {
    let mut r = Reader::new(record);
    Ok((r.u8()?, r.u32()?, r.u32()?, r.u64()?))
}

/// `now + d`, or `now` if that is not representable (then the deadline is already due,
/// which errs on the side of erasing keys).
fn deadline(now: Instant, d: std::time::Duration) -> Instant {
    now.checked_add(d).unwrap_or(now)
}

struct SendEpoch {
    epoch: u32,
    key: AeadKey,
    next_counter: u64,
    created: Instant,
}

/// Seals datagrams in one direction. See the module documentation for the rules.
pub struct DatagramSender {
    direction: Direction,
    receiver_session: u32,
    active: Option<SendEpoch>,
    pending: Option<SendEpoch>,
    /// Highest epoch number created so far (0: none).
    last_epoch: u32,
    sealed: u64,
    /// Rotation thresholds: the protocol limits unless lowered by [`Self::set_rekey_limits`].
    rekey_packets: u64,
    rekey_interval: Duration,
}

impl fmt::Debug for DatagramSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramSender")
            .field("direction", &self.direction)
            .field("receiver_session", &self.receiver_session)
            .field("active_epoch", &self.active.as_ref().map(|e| e.epoch))
            .field(
                "active_packets",
                &self.active.as_ref().map(|e| e.next_counter),
            )
            .field("pending_epoch", &self.pending.as_ref().map(|e| e.epoch))
            .field("sealed", &self.sealed)
            .finish_non_exhaustive()
    }
}

impl DatagramSender {
    /// A sender of datagrams flowing in `direction` to the peer whose receiver session id is
    /// `receiver_session`. It has no epoch yet: call [`Self::rotate`] and [`Self::activate`].
    pub fn new(direction: Direction, receiver_session: u32) -> Self {
        DatagramSender {
            direction,
            receiver_session,
            active: None,
            pending: None,
            last_epoch: 0,
            sealed: 0,
            rekey_packets: DATAGRAM_REKEY_PACKETS,
            rekey_interval: DATAGRAM_REKEY_INTERVAL,
        }
    }

    /// Asks for rotation sooner than DATAGRAM_REKEY_PACKETS / DATAGRAM_REKEY_INTERVAL, never
    /// later (values above the limits are clamped to them): rotation under load is then
    /// observable in tests and benchmarks.
    pub fn set_rekey_limits(&mut self, packets: u64, interval: Duration) {
        self.rekey_packets = packets.clamp(1, DATAGRAM_REKEY_PACKETS);
        self.rekey_interval = interval.min(DATAGRAM_REKEY_INTERVAL);
    }

    /// The epoch new datagrams are sealed under.
    pub fn active_epoch(&self) -> Option<u32> {
        self.active.as_ref().map(|e| e.epoch)
    }

    /// The epoch created by [`Self::rotate`] and not yet activated.
    pub fn pending_epoch(&self) -> Option<u32> {
        self.pending.as_ref().map(|e| e.epoch)
    }

    /// Datagrams sealed over the sender's lifetime.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    /// Whether the driver should call [`Self::rotate`] now.
    pub fn needs_rotation(&self, now: Instant) -> bool {
        if self.pending.is_some() {
            return false;
        }
        match &self.active {
            None => true,
            Some(e) => {
                e.next_counter >= self.rekey_packets
                    || now.saturating_duration_since(e.created) >= self.rekey_interval
            }
        }
    }

    /// Creates the next epoch (pending until [`Self::activate`]) and returns its announcement
    /// for the peer's [`DatagramReceiver::install`], to be sent through the reliable channel.
    pub fn rotate(
        &mut self,
        now: Instant,
        rng: &mut dyn SecureRandom,
    ) -> Result<EpochAnnouncement, DatagramError> {
        if self.pending.is_some() {
            return Err(DatagramError::RotationPending);
        }
        let epoch = self
            .last_epoch
            .checked_add(1)
            .ok_or(DatagramError::EpochsExhausted)?;
        let secret = Secret32::random(rng);
        let key = epoch_key(&secret, self.direction, self.receiver_session, epoch);
        self.pending = Some(SendEpoch {
            epoch,
            key,
            next_counter: 0,
            created: now,
        });
        self.last_epoch = epoch;
        Ok(EpochAnnouncement { epoch, secret })
    }

    /// Starts sealing under the pending epoch `epoch`; the old key is erased.
    pub fn activate(&mut self, epoch: u32) -> Result<(), DatagramError> {
        match &self.pending {
            Some(p) if p.epoch == epoch => {
                self.active = self.pending.take();
                Ok(())
            }
            _ => Err(DatagramError::NotPending(epoch)),
        }
    }

    /// Appends one datagram record carrying `plaintext` to `out`. On error `out` is
    /// unchanged.
    pub fn seal(
        &mut self,
        now: Instant,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DatagramError> {
        if plaintext.len() > MAX_DATAGRAM_PLAINTEXT {
            return Err(DatagramError::PlaintextTooLarge {
                len: plaintext.len(),
                max: MAX_DATAGRAM_PLAINTEXT,
            });
        }
        let ep = self.active.as_mut().ok_or(DatagramError::NoActiveEpoch)?;
        if now.saturating_duration_since(ep.created) >= DATAGRAM_REJECT_AFTER {
            return Err(DatagramError::EpochExpired);
        }
        let counter = ep.next_counter;
        if counter >= DATAGRAM_MAX_PACKETS {
            return Err(DatagramError::EpochExhausted);
        }
        let hdr = header(self.receiver_session, ep.epoch, counter);
        out.reserve(DATAGRAM_OVERHEAD + plaintext.len());
        out.extend_from_slice(&hdr);
        let body = out.len();
        out.extend_from_slice(plaintext);
        ep.key.seal(&nonce(counter), &hdr, out, body);
        ep.next_counter = counter + 1;
        self.sealed = self.sealed.saturating_add(1);
        Ok(())
    }
}

struct RecvEpoch {
    epoch: u32,
    key: AeadKey,
    window: ReplayWindow,
    /// Erased at this time whatever else happens (rule 4).
    hard_deadline: Instant,
}

/// Opens datagrams in one direction. See the module documentation for the rules.
pub struct DatagramReceiver {
    direction: Direction,
    local_session: u32,
    current: Option<RecvEpoch>,
    previous: Option<RecvEpoch>,
    /// Set by the first authentic datagram of the current epoch (rule 3).
    previous_deadline: Option<Instant>,
    current_confirmed: bool,
    /// Highest epoch installed so far (0: none).
    last_epoch: u32,
    stats: DatagramStats,
}

impl fmt::Debug for DatagramReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramReceiver")
            .field("direction", &self.direction)
            .field("local_session", &self.local_session)
            .field("current_epoch", &self.current_epoch())
            .field("previous_epoch", &self.previous_epoch())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl DatagramReceiver {
    /// A receiver of datagrams flowing in `direction`, addressed to our session id
    /// `local_session`. It opens nothing until an epoch is installed.
    pub fn new(direction: Direction, local_session: u32) -> Self {
        DatagramReceiver {
            direction,
            local_session,
            current: None,
            previous: None,
            previous_deadline: None,
            current_confirmed: false,
            last_epoch: 0,
            stats: DatagramStats::default(),
        }
    }

    pub fn stats(&self) -> DatagramStats {
        self.stats
    }

    /// The newest installed epoch, unless it expired.
    pub fn current_epoch(&self) -> Option<u32> {
        self.current.as_ref().map(|e| e.epoch)
    }

    /// The epoch before the current one, while it is still accepted.
    pub fn previous_epoch(&self) -> Option<u32> {
        self.previous.as_ref().map(|e| e.epoch)
    }

    /// Installs the sender's next epoch, received through the reliable channel.
    pub fn install(
        &mut self,
        now: Instant,
        announcement: EpochAnnouncement,
    ) -> Result<(), DatagramError> {
        self.expire(now);
        let expected = self.last_epoch.saturating_add(1);
        if self.last_epoch == u32::MAX || announcement.epoch != expected {
            return Err(DatagramError::EpochOutOfOrder {
                expected,
                got: announcement.epoch,
            });
        }
        let key = epoch_key(
            &announcement.secret,
            self.direction,
            self.local_session,
            announcement.epoch,
        );
        let new = RecvEpoch {
            epoch: announcement.epoch,
            key,
            window: ReplayWindow::new(),
            hard_deadline: deadline(now, DATAGRAM_REJECT_AFTER + DATAGRAM_EPOCH_GRACE),
        };
        // The old previous epoch (if any) is dropped here, and its key zeroized.
        self.previous = self.current.replace(new);
        self.previous_deadline = None;
        self.current_confirmed = false;
        self.last_epoch = announcement.epoch;
        Ok(())
    }

    /// Erases the keys whose time is up. `open` and `install` call it; drivers may also call
    /// it from their timer (see [`Self::next_deadline`]) so idle keys do not linger.
    pub fn expire(&mut self, now: Instant) {
        if let Some(p) = &self.previous {
            let soft = self.previous_deadline.is_some_and(|d| now >= d);
            if soft || now >= p.hard_deadline {
                self.previous = None;
                self.previous_deadline = None;
            }
        }
        if self
            .current
            .as_ref()
            .is_some_and(|c| now >= c.hard_deadline)
        {
            self.current = None;
        }
    }

    /// The next time [`Self::expire`] would erase a key.
    pub fn next_deadline(&self) -> Option<Instant> {
        let prev = self
            .previous
            .as_ref()
            .map(|p| match self.previous_deadline {
                Some(d) => d.min(p.hard_deadline),
                None => p.hard_deadline,
            });
        let cur = self.current.as_ref().map(|c| c.hard_deadline);
        match (prev, cur) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Opens one datagram record and appends its plaintext to `out`. On error `out` is
    /// unchanged and the record should be dropped; only the stats record the failure.
    pub fn open(
        &mut self,
        now: Instant,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DatagramError> {
        let result = self.open_inner(now, record, out);
        let s = &mut self.stats;
        let counter = match result {
            Ok(()) => &mut s.ok,
            Err(DatagramError::Replayed) => &mut s.replayed,
            Err(DatagramError::BadAuth) => &mut s.bad_auth,
            Err(DatagramError::UnknownEpoch) => &mut s.unknown_epoch,
            Err(_) => &mut s.malformed,
        };
        *counter = counter.saturating_add(1);
        result
    }

    fn open_inner(
        &mut self,
        now: Instant,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DatagramError> {
        if record.len() < DATAGRAM_OVERHEAD {
            return Err(DatagramError::Truncated);
        }
        if record.len() > MAX_DATAGRAM {
            return Err(DatagramError::TooLarge);
        }
        let (ty, session, epoch, counter) =
            parse_header(record).map_err(|_| DatagramError::Truncated)?;
        if ty != DATAGRAM_RECORD_TYPE {
            return Err(DatagramError::WrongType);
        }
        if session != self.local_session {
            return Err(DatagramError::WrongSession);
        }
        self.expire(now);
        let is_current = self.current.as_ref().is_some_and(|c| c.epoch == epoch);
        let ep = if is_current {
            self.current.as_mut()
        } else {
            self.previous.as_mut().filter(|p| p.epoch == epoch)
        }
        .ok_or(DatagramError::UnknownEpoch)?;

        let (hdr, sealed) = record.split_at(DATAGRAM_HEADER_LEN);
        let start = out.len();
        out.extend_from_slice(sealed);
        match ep.key.open(&nonce(counter), hdr, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(_) => {
                out[start..].zeroize();
                out.truncate(start);
                return Err(DatagramError::BadAuth);
            }
        }
        if !ep.window.update(counter) {
            out[start..].zeroize();
            out.truncate(start);
            return Err(DatagramError::Replayed);
        }
        if is_current && !self.current_confirmed {
            self.current_confirmed = true;
            if self.previous.is_some() {
                self.previous_deadline = Some(deadline(now, DATAGRAM_EPOCH_GRACE));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::DeterministicRandom;
    use crate::core::limits::REPLAY_WINDOW;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    const SESSION: u32 = 0x1234_5678;
    const DIR: Direction = Direction::InitiatorToResponder;

    struct Pair {
        tx: DatagramSender,
        rx: DatagramReceiver,
        rng: DeterministicRandom,
        t0: Instant,
    }

    impl Pair {
        fn new(seed: u64) -> Self {
            let t0 = Instant::now();
            let mut p = Pair {
                tx: DatagramSender::new(DIR, SESSION),
                rx: DatagramReceiver::new(DIR, SESSION),
                rng: DeterministicRandom::new(seed),
                t0,
            };
            p.rotate_full(t0);
            p
        }
        /// The recommended order: rotate, install, activate.
        fn rotate_full(&mut self, now: Instant) -> u32 {
            let a = self.tx.rotate(now, &mut self.rng).unwrap();
            let e = a.epoch;
            self.rx.install(now, a).unwrap();
            self.tx.activate(e).unwrap();
            e
        }
        fn seal(&mut self, now: Instant, pt: &[u8]) -> Vec<u8> {
            let mut v = Vec::new();
            self.tx.seal(now, pt, &mut v).unwrap();
            v
        }
        fn open(&mut self, now: Instant, rec: &[u8]) -> Result<Vec<u8>, DatagramError> {
            let mut v = Vec::new();
            self.rx.open(now, rec, &mut v).map(|()| v)
        }
    }

    fn counter_of(rec: &[u8]) -> u64 {
        u64::from_be_bytes(rec[9..17].try_into().unwrap())
    }
    fn epoch_of(rec: &[u8]) -> u32 {
        u32::from_be_bytes(rec[5..9].try_into().unwrap())
    }

    #[test]
    fn layout_is_byte_exact() {
        let mut p = Pair::new(1);
        let t = p.t0;
        let _ = p.seal(t, b"first");
        let mut out = b"prefix".to_vec();
        p.tx.seal(t, b"hello", &mut out).unwrap();
        assert_eq!(&out[..6], b"prefix");
        let rec = &out[6..];
        assert_eq!(rec.len(), DATAGRAM_OVERHEAD + 5);
        assert_eq!(
            &rec[..DATAGRAM_HEADER_LEN],
            &[0x05, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(peek_receiver_session(rec), Some(SESSION));
        // Recompute the record from the documented derivation.
        let mut rng = DeterministicRandom::new(1);
        let secret = Secret32::random(&mut rng);
        let mut info = [0u8; 9];
        info[0] = 0x01;
        info[1..5].copy_from_slice(&SESSION.to_be_bytes());
        info[5..].copy_from_slice(&1u32.to_be_bytes());
        let key = hkdf_expand(&secret, b"qssh v1 datagram epoch", &info);
        let mut n = [0u8; 12];
        n[11] = 1;
        let expected = crate::core::crypto::aead_seal_vec(&key, &n, &rec[..17], b"hello");
        assert_eq!(&rec[17..], &expected[..]);
        let mut got = b"keep".to_vec();
        p.rx.open(t, rec, &mut got).unwrap();
        assert_eq!(got, b"keephello");
    }

    #[test]
    fn round_trip_sizes() {
        let mut p = Pair::new(2);
        let t = p.t0;
        for len in [0usize, 1, 15, 16, 17, 64, 1400, MAX_DATAGRAM_PLAINTEXT] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let rec = p.seal(t, &pt);
            assert_eq!(rec.len(), len + DATAGRAM_OVERHEAD);
            assert!(rec.len() <= MAX_DATAGRAM);
            assert_eq!(p.open(t, &rec).unwrap(), pt);
        }
        assert_eq!(p.rx.stats().ok, 8);
        assert_eq!(p.tx.sealed(), 8);
    }

    #[test]
    fn loss_and_reordering_within_window() {
        let mut p = Pair::new(3);
        let t = p.t0;
        let recs: Vec<Vec<u8>> = (0..300u32).map(|i| p.seal(t, &i.to_be_bytes())).collect();
        // Deliver every third packet, the rest lost; then the rest in reverse order.
        for (i, r) in recs.iter().enumerate().step_by(3) {
            assert_eq!(p.open(t, r).unwrap(), (i as u32).to_be_bytes());
        }
        for (i, r) in recs.iter().enumerate().rev() {
            let res = p.open(t, r);
            if i % 3 == 0 {
                assert_eq!(res, Err(DatagramError::Replayed));
            } else {
                assert_eq!(res.unwrap(), (i as u32).to_be_bytes());
            }
        }
        assert_eq!(p.rx.stats().ok, 300);
        assert_eq!(p.rx.stats().replayed, 100);
    }

    #[test]
    fn too_old_for_the_window_rejected() {
        let mut p = Pair::new(4);
        let t = p.t0;
        let old = p.seal(t, b"old");
        for _ in 0..REPLAY_WINDOW {
            let r = p.seal(t, b"x");
            p.open(t, &r).unwrap();
        }
        assert_eq!(p.open(t, &old), Err(DatagramError::Replayed));
    }

    #[test]
    fn captured_record_replay_rejected() {
        let mut p = Pair::new(5);
        let t = p.t0;
        let rec = p.seal(t, b"pay me");
        assert_eq!(p.open(t, &rec).unwrap(), b"pay me");
        for _ in 0..3 {
            let mut out = b"x".to_vec();
            assert_eq!(p.rx.open(t, &rec, &mut out), Err(DatagramError::Replayed));
            assert_eq!(out, b"x", "nothing appended on failure");
        }
        assert_eq!(p.rx.stats().replayed, 3);
    }

    #[test]
    fn tampering_any_byte_is_rejected_without_side_effects() {
        let mut p = Pair::new(6);
        let t = p.t0;
        let rec = p.seal(t, b"tamper with me, I dare you");
        for i in 0..rec.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = rec.clone();
                bad[i] ^= flip;
                let mut out = Vec::new();
                assert!(
                    p.rx.open(t, &bad, &mut out).is_err(),
                    "byte {i} ^ {flip:#x}"
                );
                assert!(out.is_empty());
            }
        }
        for n in 0..rec.len() {
            assert!(p.open(t, &rec[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = rec.clone();
        longer.push(0);
        assert!(p.open(t, &longer).is_err());
        // Forgeries moved no replay window: the genuine record still opens, once.
        assert_eq!(p.open(t, &rec).unwrap(), b"tamper with me, I dare you");
        assert_eq!(p.open(t, &rec), Err(DatagramError::Replayed));
        let s = p.rx.stats();
        assert_eq!(s.ok, 1);
        assert!(s.bad_auth > 0 && s.malformed > 0 && s.unknown_epoch > 0);
    }

    #[test]
    fn malformed_headers() {
        let mut p = Pair::new(7);
        let t = p.t0;
        let rec = p.seal(t, b"abc");
        let mut other_type = rec.clone();
        other_type[0] = 0x04;
        assert_eq!(p.open(t, &other_type), Err(DatagramError::WrongType));
        assert_eq!(peek_receiver_session(&other_type), None);
        let mut other_session = rec.clone();
        other_session[4] ^= 1;
        assert_eq!(p.open(t, &other_session), Err(DatagramError::WrongSession));
        assert_eq!(p.open(t, &rec[..32]), Err(DatagramError::Truncated));
        assert_eq!(peek_receiver_session(&rec[..32]), None);
        assert_eq!(p.open(t, &[]), Err(DatagramError::Truncated));
        assert_eq!(peek_receiver_session(&[]), None);
        assert_eq!(p.rx.stats().malformed, 4);
    }

    #[test]
    fn oversize_rejected() {
        let mut p = Pair::new(8);
        let t = p.t0;
        let big = vec![0u8; MAX_DATAGRAM_PLAINTEXT + 1];
        let mut out = Vec::new();
        assert_eq!(
            p.tx.seal(t, &big, &mut out),
            Err(DatagramError::PlaintextTooLarge {
                len: MAX_DATAGRAM_PLAINTEXT + 1,
                max: MAX_DATAGRAM_PLAINTEXT
            })
        );
        assert!(out.is_empty());
        let mut rec = p.seal(t, &big[1..]);
        assert_eq!(rec.len(), MAX_DATAGRAM);
        rec.push(0);
        assert_eq!(p.open(t, &rec), Err(DatagramError::TooLarge));
        assert_eq!(peek_receiver_session(&rec), None);
        rec.pop();
        assert!(p.open(t, &rec).is_ok());
    }

    #[test]
    fn rotation_old_epoch_survives_until_grace_then_rejected() {
        let mut p = Pair::new(9);
        let t = p.t0;
        let old1 = p.seal(t, b"old 1");
        let old2 = p.seal(t, b"old 2");
        let old3 = p.seal(t, b"old 3");
        // Rotation announced and installed, not yet activated: the sender stays on epoch 1.
        let a = p.tx.rotate(t, &mut p.rng).unwrap();
        assert_eq!(a.epoch, 2);
        assert!(!p.tx.needs_rotation(t));
        assert_eq!(
            p.tx.rotate(t, &mut p.rng),
            Err(DatagramError::RotationPending)
        );
        p.rx.install(t, a).unwrap();
        let still_old = p.seal(t, b"still old");
        assert_eq!(epoch_of(&still_old), 1);
        // Long after install, but before any epoch-2 datagram: epoch 1 still opens.
        let t1 = t + DATAGRAM_EPOCH_GRACE * 3;
        assert_eq!(p.open(t1, &still_old).unwrap(), b"still old");
        p.tx.activate(2).unwrap();
        let new1 = p.seal(t1, b"new 1");
        assert_eq!((epoch_of(&new1), counter_of(&new1)), (2, 0));
        assert_eq!(p.open(t1, &new1).unwrap(), b"new 1");
        assert_eq!(p.rx.previous_epoch(), Some(1));
        assert_eq!(p.rx.next_deadline(), Some(t1 + DATAGRAM_EPOCH_GRACE));
        // In flight across the rotation: still opens within the grace ...
        let almost = t1 + DATAGRAM_EPOCH_GRACE - Duration::from_millis(1);
        assert_eq!(p.open(almost, &old2).unwrap(), b"old 2");
        assert_eq!(p.open(almost, &old2), Err(DatagramError::Replayed));
        // ... and not after it.
        let after = t1 + DATAGRAM_EPOCH_GRACE;
        assert_eq!(p.open(after, &old1), Err(DatagramError::UnknownEpoch));
        assert_eq!(p.open(after, &old3), Err(DatagramError::UnknownEpoch));
        assert_eq!(p.rx.previous_epoch(), None);
        assert_eq!(p.rx.stats().unknown_epoch, 2);
        // The current epoch keeps working.
        let new2 = p.seal(after, b"new 2");
        assert_eq!(p.open(after, &new2).unwrap(), b"new 2");
    }

    #[test]
    fn installing_a_third_epoch_erases_the_first() {
        let mut p = Pair::new(10);
        let t = p.t0;
        let e1 = p.seal(t, b"e1");
        assert_eq!(p.rotate_full(t), 2);
        let e2 = p.seal(t, b"e2");
        assert_eq!(p.rotate_full(t), 3);
        assert_eq!(
            (p.rx.current_epoch(), p.rx.previous_epoch()),
            (Some(3), Some(2))
        );
        assert_eq!(p.open(t, &e1), Err(DatagramError::UnknownEpoch));
        assert_eq!(p.open(t, &e2).unwrap(), b"e2");
        let e3 = p.seal(t, b"e3");
        assert_eq!(p.open(t, &e3).unwrap(), b"e3");
    }

    #[test]
    fn unknown_epoch_rejected() {
        let mut p = Pair::new(11);
        let t = p.t0;
        // The driver activated before the peer installed: datagrams that overtake the
        // announcement are unknown, the ones after installation open.
        let a = p.tx.rotate(t, &mut p.rng).unwrap();
        p.tx.activate(a.epoch).unwrap();
        let early = p.seal(t, b"early");
        assert_eq!(p.open(t, &early), Err(DatagramError::UnknownEpoch));
        p.rx.install(t, a).unwrap();
        assert_eq!(p.open(t, &early).unwrap(), b"early");
        // Forged epoch numbers.
        for e in [0u32, 1_000, u32::MAX] {
            let mut f = p.seal(t, b"f");
            f[5..9].copy_from_slice(&e.to_be_bytes());
            assert_eq!(p.open(t, &f), Err(DatagramError::UnknownEpoch));
        }
        // A receiver with no epoch at all.
        let mut rx = DatagramReceiver::new(DIR, SESSION);
        let mut out = Vec::new();
        assert_eq!(
            rx.open(t, &p.seal(t, b"x"), &mut out),
            Err(DatagramError::UnknownEpoch)
        );
    }

    #[test]
    fn keys_bound_to_direction_and_session() {
        let t = Instant::now();
        let mut rng = DeterministicRandom::new(12);
        let mut tx = DatagramSender::new(DIR, SESSION);
        let a = tx.rotate(t, &mut rng).unwrap();
        tx.activate(1).unwrap();
        let mut rec = Vec::new();
        tx.seal(t, b"reflect me", &mut rec).unwrap();
        // The same secret installed for the other direction (a reflection) does not open it.
        let mut reflected = DatagramReceiver::new(Direction::ResponderToInitiator, SESSION);
        reflected.install(t, a.clone()).unwrap();
        assert_eq!(
            reflected.open(t, &rec, &mut Vec::new()),
            Err(DatagramError::BadAuth)
        );
        // A different session id with the header rewritten to match does not open it either.
        let mut other = DatagramReceiver::new(DIR, SESSION + 1);
        other.install(t, a.clone()).unwrap();
        let mut moved = rec.clone();
        moved[1..5].copy_from_slice(&(SESSION + 1).to_be_bytes());
        assert_eq!(
            other.open(t, &moved, &mut Vec::new()),
            Err(DatagramError::BadAuth)
        );
        let mut right = DatagramReceiver::new(DIR, SESSION);
        right.install(t, a).unwrap();
        let mut out = Vec::new();
        right.open(t, &rec, &mut out).unwrap();
        assert_eq!(out, b"reflect me");
    }

    #[test]
    fn sender_rules() {
        let t = Instant::now();
        let mut rng = DeterministicRandom::new(13);
        let mut tx = DatagramSender::new(DIR, SESSION);
        assert!(tx.needs_rotation(t));
        assert_eq!(
            tx.seal(t, b"x", &mut Vec::new()),
            Err(DatagramError::NoActiveEpoch)
        );
        assert_eq!(tx.activate(1), Err(DatagramError::NotPending(1)));
        let a = tx.rotate(t, &mut rng).unwrap();
        assert_eq!(
            (a.epoch, tx.pending_epoch(), tx.active_epoch()),
            (1, Some(1), None)
        );
        assert_eq!(tx.activate(2), Err(DatagramError::NotPending(2)));
        tx.activate(1).unwrap();
        assert_eq!(tx.activate(1), Err(DatagramError::NotPending(1)));
        assert!(!tx.needs_rotation(t));
        // Rotation by age, then a hard stop by age.
        let soon = t + DATAGRAM_REKEY_INTERVAL - Duration::from_millis(1);
        assert!(!tx.needs_rotation(soon));
        assert!(tx.needs_rotation(t + DATAGRAM_REKEY_INTERVAL));
        assert!(tx
            .seal(t + DATAGRAM_REKEY_INTERVAL, b"x", &mut Vec::new())
            .is_ok());
        assert_eq!(
            tx.seal(t + DATAGRAM_REJECT_AFTER, b"x", &mut Vec::new()),
            Err(DatagramError::EpochExpired)
        );
        // Rotation by packet count, then a hard stop by packet count.
        let b = tx.rotate(t, &mut rng).unwrap();
        tx.activate(b.epoch).unwrap();
        tx.active.as_mut().unwrap().next_counter = DATAGRAM_REKEY_PACKETS - 1;
        assert!(!tx.needs_rotation(t));
        tx.seal(t, b"x", &mut Vec::new()).unwrap();
        assert!(tx.needs_rotation(t));
        tx.active.as_mut().unwrap().next_counter = DATAGRAM_MAX_PACKETS - 1;
        let mut last = Vec::new();
        tx.seal(t, b"x", &mut last).unwrap();
        assert_eq!(counter_of(&last), DATAGRAM_MAX_PACKETS - 1);
        let mut out = Vec::new();
        assert_eq!(
            tx.seal(t, b"x", &mut out),
            Err(DatagramError::EpochExhausted)
        );
        assert!(out.is_empty());
        // Epoch numbers run out instead of wrapping.
        tx.last_epoch = u32::MAX;
        assert_eq!(
            tx.rotate(t, &mut rng).map(|a| a.epoch),
            Err(DatagramError::EpochsExhausted)
        );
    }

    #[test]
    fn rekey_limits_only_lower() {
        let t = Instant::now();
        let mut rng = DeterministicRandom::new(19);
        let mut tx = DatagramSender::new(DIR, SESSION);
        tx.set_rekey_limits(3, Duration::from_secs(1));
        let a = tx.rotate(t, &mut rng).unwrap();
        tx.activate(a.epoch).unwrap();
        for _ in 0..3 {
            assert!(!tx.needs_rotation(t));
            tx.seal(t, b"x", &mut Vec::new()).unwrap();
        }
        assert!(tx.needs_rotation(t));
        let b = tx.rotate(t, &mut rng).unwrap();
        tx.activate(b.epoch).unwrap();
        assert!(tx.needs_rotation(t + Duration::from_secs(1)));
        // Asking for later rotation than the protocol allows keeps the protocol limits.
        tx.set_rekey_limits(u64::MAX, Duration::from_secs(100_000));
        assert!(!tx.needs_rotation(t + DATAGRAM_REKEY_INTERVAL - Duration::from_millis(1)));
        assert!(tx.needs_rotation(t + DATAGRAM_REKEY_INTERVAL));
    }

    #[test]
    fn receiver_install_rules_and_hard_expiry() {
        let t = Instant::now();
        let mut rng = DeterministicRandom::new(14);
        let mut tx = DatagramSender::new(DIR, SESSION);
        let mut rx = DatagramReceiver::new(DIR, SESSION);
        let a1 = tx.rotate(t, &mut rng).unwrap();
        tx.activate(1).unwrap();
        let a2 = tx.rotate(t, &mut rng).unwrap();
        assert_eq!(
            rx.install(t, a2.clone()),
            Err(DatagramError::EpochOutOfOrder {
                expected: 1,
                got: 2
            })
        );
        rx.install(t, a1.clone()).unwrap();
        assert_eq!(
            rx.install(t, a1),
            Err(DatagramError::EpochOutOfOrder {
                expected: 2,
                got: 1
            })
        );
        let mut rec = Vec::new();
        tx.seal(t, b"x", &mut rec).unwrap();
        // Never confirmed, epoch 1 is still erased at install + REJECT_AFTER + GRACE.
        let hard = t + DATAGRAM_REJECT_AFTER + DATAGRAM_EPOCH_GRACE;
        assert_eq!(rx.next_deadline(), Some(hard));
        rx.expire(hard);
        assert_eq!(rx.current_epoch(), None);
        assert_eq!(
            rx.open(hard, &rec, &mut Vec::new()),
            Err(DatagramError::UnknownEpoch)
        );
        // Installing continues with the next number after an expiry.
        rx.install(hard, a2).unwrap();
        assert_eq!(rx.current_epoch(), Some(2));
    }

    #[test]
    fn announcement_encoding() {
        let mut rng = DeterministicRandom::new(15);
        let a = EpochAnnouncement {
            epoch: 7,
            secret: Secret32::random(&mut rng),
        };
        let b = a.to_bytes();
        assert_eq!(&b[..4], &[0, 0, 0, 7]);
        assert_eq!(&b[4..], a.secret.expose());
        assert_eq!(EpochAnnouncement::from_bytes(&b[..]).unwrap(), a);
        assert_eq!(
            EpochAnnouncement::from_bytes(&b[..35]),
            Err(DatagramError::BadAnnouncement)
        );
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(
            EpochAnnouncement::from_bytes(&long),
            Err(DatagramError::BadAnnouncement)
        );
        let mut zero = *b;
        zero[..4].fill(0);
        assert_eq!(
            EpochAnnouncement::from_bytes(&zero),
            Err(DatagramError::BadAnnouncement)
        );
    }

    #[test]
    fn secrets_never_printed() {
        let mut p = Pair::new(16);
        let t = p.t0;
        let a = p.tx.rotate(t, &mut p.rng).unwrap();
        let hex: String = a.secret.expose()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dec = format!("{:?}", &a.secret.expose()[..4]);
        for s in [
            format!("{a:?}"),
            format!("{:?}", p.tx),
            format!("{:?}", p.rx),
        ] {
            assert!(
                !s.contains(&hex) && !s.contains(&dec[1..dec.len() - 1]),
                "{s}"
            );
        }
        assert!(format!("{a:?}").contains("<secret>"));
    }

    proptest! {
        #[test]
        fn open_never_panics_on_arbitrary_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            force_header in any::<bool>(),
        ) {
            let mut p = Pair::new(17);
            let t = p.t0;
            let mut rec = bytes;
            if force_header && rec.len() >= DATAGRAM_HEADER_LEN {
                rec[0] = DATAGRAM_RECORD_TYPE;
                rec[1..5].copy_from_slice(&SESSION.to_be_bytes());
                rec[5..9].copy_from_slice(&1u32.to_be_bytes());
            }
            let mut out = Vec::new();
            prop_assert!(p.rx.open(t, &rec, &mut out).is_err());
            prop_assert!(out.is_empty());
            let _ = peek_receiver_session(&rec);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(u16),
        Deliver(usize),
        Duplicate(usize),
        Drop(usize),
        ReplayOld(usize),
        Rotate,
        Install,
        Activate,
        Advance(u16),
        Pause(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u16..1500).prop_map(Op::Send),
            6 => any::<usize>().prop_map(Op::Deliver),
            2 => any::<usize>().prop_map(Op::Duplicate),
            2 => any::<usize>().prop_map(Op::Drop),
            2 => any::<usize>().prop_map(Op::ReplayOld),
            1 => Just(Op::Rotate),
            1 => Just(Op::Install),
            1 => Just(Op::Activate),
            2 => (0u16..4000).prop_map(Op::Advance),
            1 => (0u8..=200).prop_map(Op::Pause),
        ]
    }

    /// What the property test knows about the records it sent and opened.
    #[derive(Default)]
    struct Model {
        sent: HashMap<(u32, u64), Vec<u8>>,
        opened: HashSet<(u32, u64)>,
        highest_opened: HashMap<u32, u64>,
        calls: u64,
    }

    impl Model {
        fn deliver(&mut self, p: &mut Pair, now: Instant, rec: &[u8]) -> Result<(), TestCaseError> {
            self.calls += 1;
            let id = (epoch_of(rec), counter_of(rec));
            // A record of the current epoch above everything opened in it must open.
            p.rx.expire(now);
            let known = p.rx.current_epoch() == Some(id.0) || p.rx.previous_epoch() == Some(id.0);
            let must_open = p.rx.current_epoch() == Some(id.0)
                && self.highest_opened.get(&id.0).is_none_or(|h| id.1 > *h);
            let mut out = Vec::new();
            match p.rx.open(now, rec, &mut out) {
                Ok(()) => {
                    prop_assert!(self.opened.insert(id), "opened twice: {:?}", id);
                    prop_assert_eq!(Some(&out), self.sent.get(&id));
                    let h = self.highest_opened.entry(id.0).or_insert(id.1);
                    *h = (*h).max(id.1);
                }
                Err(e) => {
                    prop_assert!(!must_open, "fresh record {:?} failed: {}", id, e);
                    prop_assert!(out.is_empty());
                    let expected = if known {
                        DatagramError::Replayed
                    } else {
                        DatagramError::UnknownEpoch
                    };
                    prop_assert_eq!(e, expected);
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random send / drop / reorder / duplicate / replay / rotate / time sequences: every
        /// record opens at most once and with the plaintext it was sealed with, a duplicate
        /// never opens, and a fresh in-order record of the current epoch always opens.
        #[test]
        fn datagram_model(ops in proptest::collection::vec(op(), 1..500)) {
            let mut p = Pair::new(18);
            let mut now = p.t0;
            let mut m = Model::default();
            let mut in_flight: Vec<Vec<u8>> = Vec::new();
            let mut delivered: Vec<Vec<u8>> = Vec::new();
            let mut announcements: Vec<EpochAnnouncement> = Vec::new();
            let mut pt_seq = 0u32;

            for op in ops {
                match op {
                    Op::Send(len) => {
                        pt_seq += 1;
                        let mut pt = vec![(pt_seq % 251) as u8; len as usize];
                        if len >= 4 {
                            pt[..4].copy_from_slice(&pt_seq.to_be_bytes());
                        }
                        let mut rec = Vec::new();
                        match p.tx.seal(now, &pt, &mut rec) {
                            Ok(()) => {
                                let id = (epoch_of(&rec), counter_of(&rec));
                                prop_assert!(m.sent.insert(id, pt).is_none(), "nonce reuse");
                                in_flight.push(rec);
                            }
                            Err(e) => prop_assert_eq!(e, DatagramError::EpochExpired),
                        }
                    }
                    Op::Deliver(i) if !in_flight.is_empty() => {
                        let rec = in_flight.swap_remove(i % in_flight.len());
                        m.deliver(&mut p, now, &rec)?;
                        delivered.push(rec);
                    }
                    Op::Duplicate(i) if !in_flight.is_empty() => {
                        let rec = in_flight[i % in_flight.len()].clone();
                        m.deliver(&mut p, now, &rec)?;
                        delivered.push(rec);
                    }
                    Op::Drop(i) if !in_flight.is_empty() => {
                        in_flight.swap_remove(i % in_flight.len());
                    }
                    Op::ReplayOld(i) if !delivered.is_empty() => {
                        let rec = delivered[i % delivered.len()].clone();
                        m.deliver(&mut p, now, &rec)?;
                    }
                    Op::Rotate => match p.tx.rotate(now, &mut p.rng) {
                        Ok(a) => announcements.push(a),
                        Err(e) => prop_assert_eq!(e, DatagramError::RotationPending),
                    },
                    Op::Install if !announcements.is_empty() => {
                        let a = announcements.remove(0);
                        p.rx.install(now, a).unwrap();
                    }
                    Op::Activate => {
                        if let Some(e) = p.tx.pending_epoch() {
                            p.tx.activate(e).unwrap();
                        }
                    }
                    Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                    Op::Pause(secs) => now += Duration::from_secs(u64::from(secs)),
                    _ => {}
                }
            }
            let s = p.rx.stats();
            prop_assert_eq!(s.ok, m.opened.len() as u64);
            prop_assert_eq!(s.ok + s.replayed + s.unknown_epoch, m.calls);
            prop_assert_eq!(s.bad_auth + s.malformed, 0);
        }
    }
}
