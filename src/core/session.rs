//! A qssh session over a reliable, ordered byte stream (TCP today, a QUIC stream later):
//! stream records, the handshake, the ratchet, channels with flow control, keepalives and a
//! graceful close — with no I/O.
//!
//! Calling order, as in quinn-proto's `Connection`:
//! 1. feed received bytes with [`Session::handle_input`] (or [`Session::handle_input_buf`],
//!    which decrypts records in the caller's read buffer and may hand that buffer to the
//!    application as a Data event) and expired timers with [`Session::handle_timeout`];
//! 2. drain [`Session::poll_transmit`] to the link, [`Session::poll_event`] to the
//!    application, and arm a timer for [`Session::poll_timeout`];
//! 3. application calls ([`Session::open_channel`], [`Session::send`], ...) queue frames that
//!    the next `poll_transmit` seals into records (several frames per record when they fit).
//!
//! Stream record: `len u32 | type u8 | body`, `len` = 1 + body length, at most
//! `1 + MAX_HANDSHAKE_MSG` before the session is established and `1 + MAX_RECORD_BODY`
//! after; an oversized prefix ends the session before its body is read.

use super::codec::{extend_bulk, DecodeError, Reader, Writer};
use super::crypto::SecureRandom;
use super::frame::{ChannelKind, CloseCode, Frame};
use super::handshake::{
    self, HandshakeConfig, HandshakeError, InitiatorSent, InitiatorVerified, ResponderSent,
};
use super::identity::{PeerId, PublicIdentity};
use super::limits::{
    CHANNEL_WINDOW, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, KEEPALIVE_INTERVAL, MAX_CHANNELS,
    MAX_CHANNEL_PARAMS, MAX_DATA_EVENT, MAX_DATA_EVENT_SLACK, MAX_FRAME_DATA, MAX_HANDSHAKE_MSG,
    MAX_QUEUED_RECORDS, MAX_RECORD_BODY, MAX_RECORD_PLAINTEXT, MAX_SPARE_BUFFERS,
    MAX_SPARE_RECORDS,
};
use super::ratchet::{Ratchet, RatchetError, RatchetInit, HEADER_LEN};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Instant;
use thiserror::Error;

/// Stream record types (the first byte after the length). UDP links reuse the same numbers
/// as their first byte (RFC 7983-style demultiplexing).
pub mod record_type {
    pub const INIT: u8 = 1;
    pub const RESP: u8 = 2;
    pub const FINISH: u8 = 3;
    pub const RATCHET: u8 = 4;
    pub const DATAGRAM: u8 = 5;
    /// Unauthenticated refusal during the handshake (code u8, reason vec16 ≤ 256 bytes).
    pub const ALERT: u8 = 6;
}

/// Longest reason accepted in an ALERT.
pub const MAX_ALERT_REASON: usize = 256;

/// Stream record prefix: `len u32 | type u8`.
const RECORD_HEAD: usize = 5;
/// Room in front of the frames of the record being built: its record prefix and the ratchet
/// header, both written when it is sealed (in place, so the frames are never copied again).
const PENDING_HEAD: usize = RECORD_HEAD + HEADER_LEN;
/// Capacity of a record buffer from [`Session::record_buffer`]: room for the longest record
/// (prefix, ratchet header with KEM fields, a full plaintext, tag), so sealing never
/// reallocates.
pub const RECORD_CAPACITY: usize = RECORD_HEAD + Ratchet::MAX_OVERHEAD + MAX_RECORD_PLAINTEXT;
/// Bytes in front of the data in a buffer for [`Session::send_records`]: the record prefix,
/// the ratchet header and the DATA frame header, all written when the record is sealed.
pub const DATA_RECORD_HEAD: usize = PENDING_HEAD + Frame::DATA_OVERHEAD;

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CloseReason {
    #[error("closed")]
    Normal,
    #[error("peer closed the session: {0}")]
    PeerClosed(String),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("peer refused the handshake: {0}")]
    PeerAlert(String),
    #[error("peer identity {got} is not the expected {expected}")]
    WrongPeer { expected: PeerId, got: PeerId },
    #[error("peer identity not accepted")]
    PeerNotAccepted,
    #[error("record authentication failed: {0}")]
    Ratchet(#[from] RatchetError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("peer stopped responding")]
    IdleTimeout,
    #[error("connection closed by the transport before the session ended")]
    TransportClosed,
}

impl From<DecodeError> for CloseReason {
    fn from(e: DecodeError) -> Self {
        CloseReason::Protocol(e.to_string())
    }
}

/// What the application learns from the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Initiator without a pinned peer ID: the responder proved this identity. Call
    /// [`Session::accept_peer`] (after known_peers or a trust-on-first-use question).
    VerifyPeer {
        peer: PublicIdentity,
        name: String,
    },
    /// Both sides are authenticated and confirmed; channels can be used.
    Established {
        peer: PublicIdentity,
        name: String,
        session_id: [u8; 32],
    },
    /// The peer asks to open a channel: answer with accept_channel or reject_channel.
    ChannelRequest {
        ch: u32,
        kind: ChannelKind,
        params: Vec<u8>,
    },
    ChannelAccepted {
        ch: u32,
    },
    ChannelRefused {
        ch: u32,
        code: CloseCode,
        reason: String,
    },
    Data {
        ch: u32,
        data: Payload,
    },
    Eof {
        ch: u32,
    },
    ChannelClosed {
        ch: u32,
        code: CloseCode,
        reason: String,
    },
    /// The peer announced a new datagram epoch secret for its sending direction.
    DatagramEpoch {
        epoch: u32,
        secret: [u8; 32],
    },
    /// The peer installed our datagram epoch `epoch` (answer to our announcement): activate
    /// it in the datagram sender.
    DatagramEpochConfirmed {
        epoch: u32,
    },
    /// A ping we sent came back.
    Pong {
        rtt: std::time::Duration,
    },
    /// The session is over; nothing more will be accepted. Remaining transmits (a close
    /// acknowledgement) should still be flushed.
    Closed {
        reason: CloseReason,
    },
}

/// Errors returned to the application's own calls.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("session is not established")]
    NotEstablished,
    #[error("session is closed")]
    Closed,
    #[error("no such channel {0}")]
    NoChannel(u32),
    #[error("too many channels")]
    TooManyChannels,
    #[error("channel parameters too long")]
    ParamsTooLong,
    #[error("message too long ({0} bytes)")]
    TooLong(usize),
    #[error("channel {0} already finished sending")]
    AfterEof(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChanState {
    /// We asked; waiting for OPEN_OK.
    Opening,
    /// The peer asked; waiting for the application's answer.
    Requested,
    Open,
}

#[derive(Debug)]
struct Channel {
    kind: ChannelKind,
    state: ChanState,
    /// Bytes the peer still allows us to send.
    send_window: u64,
    /// Bytes we still allow the peer to send.
    recv_window: u64,
    /// Bytes delivered to the application but not yet consumed (returned as window).
    unacked: u64,
    sent_eof: bool,
    recv_eof: bool,
    /// We sent CLOSE and wait for the peer's CLOSE.
    closing: bool,
}

struct Established {
    ratchet: Ratchet,
    session_id: [u8; 32],
    peer: PublicIdentity,
    peer_name: String,
    initiator: bool,
    channels: HashMap<u32, Channel>,
    next_channel: u32,
    /// We sent SESSION_CLOSE.
    close_sent: bool,
    ping: Option<(u64, Instant)>,
}

enum State {
    InitSent(InitiatorSent),
    AwaitTrust(InitiatorVerified),
    AwaitInit(HandshakeConfig),
    RespSent(ResponderSent),
    Established(Box<Established>),
    Closed,
}

/// Configuration of a session endpoint.
pub struct SessionConfig {
    pub handshake: HandshakeConfig,
    /// Initiator only: the peer must prove exactly this ID (no trust question).
    pub expected_peer: Option<PeerId>,
}

/// Received stream bytes: `buf[start..]` of a buffer that is often the link's read buffer
/// itself (records decrypted where they arrived). Hand the buffer back with
/// [`Session::recycle`] once written, so the next reads reuse it.
#[derive(Default, Clone)]
pub struct Payload {
    buf: Vec<u8>,
    start: usize,
}

impl Payload {
    /// The buffer, for [`Session::recycle`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl From<Vec<u8>> for Payload {
    fn from(buf: Vec<u8>) -> Self {
        Payload { buf, start: 0 }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Equal when the bytes are (whatever lies before `start`).
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

/// Channel data is the user's: logs show its length only.
impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

/// One stream channel's data lined up in the input buffer during one
/// [`Session::handle_input_buf`]: `buf[start..end]`, for the Data event at `event`.
struct Run {
    ch: u32,
    start: usize,
    end: usize,
    event: usize,
}

/// Counters for diagnostics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    pub records_sent: u64,
    pub records_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Records built in a written record's buffer handed back ([`Session::recycle_record`])
    /// instead of a new one.
    pub records_reused: u64,
}

/// A session endpoint. See the module documentation for the calling order.
pub struct Session {
    state: State,
    rng: Box<dyn SecureRandom + Send>,
    expected_peer: Option<PeerId>,
    /// [`Session::handle_input`]'s buffer: the start of an unfinished record.
    inbuf: Vec<u8>,
    /// Bytes [`Session::handle_input_buf`] left in its buffer last time (not counted again).
    carried: usize,
    transmit: VecDeque<Vec<u8>>,
    /// The next record: empty, or `PENDING_HEAD` bytes of room followed by the frames
    /// waiting to be sealed (at most `MAX_RECORD_PLAINTEXT` bytes of them).
    pending: Vec<u8>,
    /// Frames answering the peer (pong, close acknowledgements, refusals), queued after the
    /// record that caused them has been handled.
    replies: Vec<Frame<'static>>,
    /// Bytes of input from the record being handled to the end of the current input: the
    /// most DATA a Data event can still gather in this call (its first allocation).
    input_left: usize,
    events: VecDeque<Event>,
    /// Emptied Data buffers handed back by the application ([`Session::recycle`]).
    spare: Vec<Vec<u8>>,
    /// Written records handed back by the driver ([`Session::recycle_record`]), for the next
    /// records and for [`Session::record_buffer`].
    spare_records: Vec<Vec<u8>>,
    created: Instant,
    last_received: Instant,
    last_sent: Instant,
    stats: SessionStats,
    /// The peer's SESSION_CLOSE arrived: flush our acknowledgement, then close.
    peer_closed: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::InitSent(_) => "init-sent",
            State::AwaitTrust(_) => "await-trust",
            State::AwaitInit(_) => "await-init",
            State::RespSent(_) => "resp-sent",
            State::Established(_) => "established",
            State::Closed => "closed",
        };
        f.debug_struct("Session")
            .field("state", &state)
            .field("stats", &self.stats)
            .finish()
    }
}

/// A new buffer of [`RECORD_CAPACITY`] holding `DATA_RECORD_HEAD + MAX_FRAME_DATA` zeros: room
/// for a record's headers and a full frame of data to be read in ([`Session::send_records`]).
pub fn new_record_buffer() -> Vec<u8> {
    let mut rec = Vec::with_capacity(RECORD_CAPACITY);
    rec.resize(DATA_RECORD_HEAD + MAX_FRAME_DATA, 0);
    rec
}

/// Whether a written record's buffer is one worth reusing ([`Session::recycle_record`]): it
/// has [`RECORD_CAPACITY`] (and not much more).
pub fn is_record_buffer(rec: &Vec<u8>) -> bool {
    (RECORD_CAPACITY..2 * RECORD_CAPACITY).contains(&rec.capacity())
}

fn push_record(out: &mut VecDeque<Vec<u8>>, ty: u8, body: &[u8]) {
    let mut rec = Vec::with_capacity(5 + body.len());
    Writer::new(&mut rec)
        .u32(1 + body.len() as u32)
        .u8(ty)
        .bytes(body);
    out.push_back(rec);
}

impl Session {
    /// Starts a session as the initiator; INIT is queued for transmission at once.
    pub fn initiator(
        cfg: SessionConfig,
        now: Instant,
        mut rng: Box<dyn SecureRandom + Send>,
    ) -> Self {
        let (st, init) = handshake::initiate(&mut *rng, cfg.handshake);
        let mut s = Session::new(State::InitSent(st), rng, cfg.expected_peer, now);
        push_record(&mut s.transmit, record_type::INIT, &init);
        s
    }

    /// Starts a session as the responder, waiting for INIT.
    pub fn responder(cfg: SessionConfig, now: Instant, rng: Box<dyn SecureRandom + Send>) -> Self {
        Session::new(State::AwaitInit(cfg.handshake), rng, None, now)
    }

    fn new(
        state: State,
        rng: Box<dyn SecureRandom + Send>,
        expected_peer: Option<PeerId>,
        now: Instant,
    ) -> Self {
        Session {
            state,
            rng,
            expected_peer,
            inbuf: Vec::new(),
            carried: 0,
            transmit: VecDeque::new(),
            pending: Vec::new(),
            replies: Vec::new(),
            input_left: 0,
            events: VecDeque::new(),
            spare: Vec::new(),
            spare_records: Vec::new(),
            created: now,
            last_received: now,
            last_sent: now,
            stats: SessionStats::default(),
            peer_closed: false,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }
    pub fn stats(&self) -> SessionStats {
        self.stats
    }
    pub fn peer(&self) -> Option<&PublicIdentity> {
        match &self.state {
            State::Established(e) => Some(&e.peer),
            State::AwaitTrust(v) => Some(v.peer()),
            _ => None,
        }
    }
    pub fn peer_name(&self) -> Option<&str> {
        match &self.state {
            State::Established(e) => Some(&e.peer_name),
            _ => None,
        }
    }
    pub fn session_id(&self) -> Option<[u8; 32]> {
        match &self.state {
            State::Established(e) => Some(e.session_id),
            _ => None,
        }
    }
    /// Ratchet counters (DH and PQ steps), for diagnostics and tests.
    pub fn ratchet_stats(&self) -> Option<super::ratchet::RatchetStats> {
        match &self.state {
            State::Established(e) => Some(e.ratchet.stats()),
            _ => None,
        }
    }

    /// True when the application may queue more data (bounded send queue).
    pub fn can_send(&self) -> bool {
        self.transmit.len() < MAX_QUEUED_RECORDS
    }

    /// Feeds bytes received from the link.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.inbuf);
        extend_bulk(&mut buf, data);
        self.handle_input_buf(now, &mut buf);
        self.inbuf = buf;
    }

    /// Feeds bytes received from the link in the caller's read buffer, without copying
    /// them: records are decrypted in place, and the data of one stream channel is lined up
    /// at the front of `buf` as it is decrypted (each record's plaintext lands right after
    /// the previous one's). When that data fills at least `1 / MAX_DATA_EVENT_SLACK` of the
    /// buffer (of at most `MAX_DATA_EVENT` bytes), the buffer itself becomes the channel's
    /// Data event and `buf` is replaced by a spare of the same capacity.
    ///
    /// `buf` must hold what this call left in it last time followed by the new bytes. On
    /// return it holds only the start of an unfinished record (moved to its front), with
    /// room to read more after it.
    pub fn handle_input_buf(&mut self, now: Instant, buf: &mut Vec<u8>) {
        if self.is_closed() {
            buf.clear();
            return;
        }
        self.last_received = now;
        self.stats.bytes_received += buf.len().saturating_sub(self.carried) as u64;
        let mut run = None;
        let used = self.handle_records(now, buf, &mut run);
        let mut handed_off = false;
        if let Some(run) = run {
            let len = run.end - run.start;
            let cap = buf.capacity();
            let data = if len * MAX_DATA_EVENT_SLACK >= cap && cap <= MAX_DATA_EVENT {
                handed_off = true;
                let mut fresh = self.take_spare(cap);
                extend_bulk(&mut fresh, &buf[used..]);
                let mut taken = std::mem::replace(buf, fresh);
                taken.truncate(run.end);
                Payload {
                    buf: taken,
                    start: run.start,
                }
            } else {
                let mut copy = self.take_spare(len);
                extend_bulk(&mut copy, &buf[run.start..run.end]);
                Payload::from(copy)
            };
            if let Some(Event::Data { data: slot, .. }) = self.events.get_mut(run.event) {
                *slot = data;
            }
        }
        if self.is_closed() {
            buf.clear();
        } else if !handed_off {
            buf.copy_within(used.., 0);
            buf.truncate(buf.len() - used);
        }
        self.carried = buf.len();
        self.flush(now);
    }

    /// A spare buffer with room for `cap` bytes, or a new one.
    fn take_spare(&mut self, cap: usize) -> Vec<u8> {
        match self.spare.iter().position(|b| b.capacity() >= cap) {
            Some(i) => self.spare.swap_remove(i),
            None => Vec::with_capacity(cap),
        }
    }

    /// The length of the record whose prefix is `prefix`, or None (and the session closed) if
    /// it is out of range: an oversized prefix ends the session before its body is read.
    fn record_len(&mut self, now: Instant, prefix: &[u8]) -> Option<usize> {
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        let max = match self.state {
            State::Established(_) => MAX_RECORD_BODY,
            _ => MAX_HANDSHAKE_MSG,
        };
        if len == 0 || len > 1 + max {
            self.fail(
                now,
                CloseReason::Protocol(format!("record length {len} out of range")),
            );
            return None;
        }
        Some(len)
    }

    /// Handles the complete records at the start of `buf` in place; returns the bytes used.
    fn handle_records(&mut self, now: Instant, buf: &mut [u8], run: &mut Option<Run>) -> usize {
        let mut off = 0;
        while !self.is_closed() && buf.len() - off >= 4 {
            let Some(len) = self.record_len(now, &buf[off..off + 4]) else {
                break;
            };
            if buf.len() - off < 4 + len {
                break;
            }
            self.input_left = buf.len() - off;
            let rec = off..off + 4 + len;
            off += 4 + len;
            self.stats.records_received += 1;
            if let Err(reason) = self.handle_record(now, buf, rec, run) {
                self.fail(now, reason);
            }
        }
        off
    }

    /// The link reached end of stream.
    pub fn handle_eof(&mut self) {
        if !self.is_closed() {
            let close_sent = matches!(&self.state, State::Established(e) if e.close_sent);
            let reason = if close_sent {
                CloseReason::Normal
            } else {
                CloseReason::TransportClosed
            };
            self.state = State::Closed;
            self.events.push_back(Event::Closed { reason });
        }
    }

    fn fail(&mut self, now: Instant, reason: CloseReason) {
        // Tell the peer why, if we can still speak to it.
        if let State::Established(_) = &self.state {
            let text = reason.to_string();
            self.queue_frame(
                now,
                Frame::SessionClose {
                    code: CloseCode::Protocol,
                    reason: text.as_bytes(),
                },
            );
            self.flush(now);
        }
        self.state = State::Closed;
        self.pending.clear();
        self.replies.clear();
        self.events.push_back(Event::Closed { reason });
    }

    /// Responder: tells the initiator in plaintext why its handshake was refused (the only
    /// unauthenticated message we send; it carries no secret).
    fn alert(&mut self, e: HandshakeError) -> CloseReason {
        let mut body = Vec::new();
        let text = e.to_string();
        let text = &text.as_bytes()[..text.len().min(MAX_ALERT_REASON)];
        Writer::new(&mut body)
            .u8(CloseCode::Refused as u8)
            .vec16(text);
        push_record(&mut self.transmit, record_type::ALERT, &body);
        CloseReason::Handshake(e)
    }

    /// Handles the record `buf[rec]` (prefix included).
    fn handle_record(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        rec: std::ops::Range<usize>,
        run: &mut Option<Run>,
    ) -> Result<(), CloseReason> {
        let ty = buf[rec.start + 4];
        let body = &mut buf[rec.start + 5..rec.end];
        let state = std::mem::replace(&mut self.state, State::Closed);
        match (state, ty) {
            (State::AwaitInit(cfg), record_type::INIT) => {
                let (st, resp) =
                    handshake::respond(&mut *self.rng, cfg, body).map_err(|e| self.alert(e))?;
                push_record(&mut self.transmit, record_type::RESP, &resp);
                self.state = State::RespSent(st);
            }
            (State::InitSent(st), record_type::RESP) => {
                let verified = st.handle_response(body)?;
                let got = verified.peer().peer_id();
                match self.expected_peer {
                    Some(expected) if expected != got => {
                        return Err(CloseReason::WrongPeer { expected, got });
                    }
                    Some(_) => self.finish_initiator(now, verified),
                    None => {
                        self.events.push_back(Event::VerifyPeer {
                            peer: verified.peer().clone(),
                            name: verified.peer_name().to_string(),
                        });
                        self.state = State::AwaitTrust(verified);
                    }
                }
            }
            (State::RespSent(st), record_type::FINISH) => {
                let out = st.handle_finish(body).map_err(|e| self.alert(e))?;
                self.establish(now, out, false);
            }
            (State::InitSent(_) | State::AwaitInit(_) | State::RespSent(_), record_type::ALERT) => {
                let mut r = Reader::new(body);
                let _code = r.u8()?;
                let reason = r.vec16(MAX_ALERT_REASON)?;
                let text = String::from_utf8_lossy(reason);
                let text: String = text.chars().filter(|c| !c.is_control()).collect();
                return Err(CloseReason::PeerAlert(text));
            }
            (State::Established(mut e), record_type::RATCHET) => {
                let res = self.handle_ratchet(now, &mut e, buf, rec, run);
                self.state = State::Established(e);
                res?;
                for frame in std::mem::take(&mut self.replies) {
                    self.queue_frame(now, frame);
                }
                self.maybe_close_after_peer(now);
            }
            (state, ty) => {
                let what = match state {
                    State::AwaitTrust(_) => "a record before we confirmed the peer",
                    State::RespSent(_) if ty == record_type::RATCHET => {
                        "application data before key confirmation"
                    }
                    _ => "unexpected record type",
                };
                self.state = state;
                return Err(CloseReason::Protocol(format!("{what} ({ty})")));
            }
        }
        Ok(())
    }

    /// Initiator: the application trusts the peer (known, pinned or accepted on first use).
    pub fn accept_peer(&mut self, now: Instant) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitTrust(v) => self.finish_initiator(now, v),
            other => self.state = other,
        }
    }

    /// Initiator: the application refuses the peer; our identity is never revealed to it.
    pub fn reject_peer(&mut self, _now: Instant) {
        if matches!(self.state, State::AwaitTrust(_)) {
            self.state = State::Closed;
            self.events.push_back(Event::Closed {
                reason: CloseReason::PeerNotAccepted,
            });
        }
    }

    fn finish_initiator(&mut self, now: Instant, v: InitiatorVerified) {
        let (fin, out) = v.finish(&mut *self.rng);
        push_record(&mut self.transmit, record_type::FINISH, &fin);
        self.establish(now, out, true);
    }

    fn establish(&mut self, now: Instant, out: handshake::HandshakeOutput, initiator: bool) {
        let (send_chain, recv_chain) = if initiator {
            (out.chain_initiator, out.chain_responder)
        } else {
            (out.chain_responder, out.chain_initiator)
        };
        let ratchet = Ratchet::new(
            RatchetInit {
                root: out.root,
                initiator,
                own_dh: out.own_dh,
                peer_dh: out.peer_dh,
                send_chain,
                recv_chain,
            },
            now,
        );
        self.events.push_back(Event::Established {
            peer: out.peer.clone(),
            name: out.peer_name.clone(),
            session_id: out.session_id,
        });
        self.state = State::Established(Box::new(Established {
            ratchet,
            session_id: out.session_id,
            peer: out.peer,
            peer_name: out.peer_name,
            initiator,
            channels: HashMap::new(),
            next_channel: if initiator { 0 } else { 1 },
            close_sent: false,
            ping: None,
        }));
    }

    /// Opens the ratchet record `buf[rec]` and handles its frames. The plaintext goes where
    /// its first DATA's bytes continue `run`, if there is one: its 7-byte header then lies
    /// over the run's last bytes, which are put back afterwards (on every path: data
    /// already delivered stays intact even when this record fails).
    fn handle_ratchet(
        &mut self,
        now: Instant,
        e: &mut Established,
        buf: &mut [u8],
        rec: std::ops::Range<usize>,
        run: &mut Option<Run>,
    ) -> Result<(), CloseReason> {
        const HEAD: usize = Frame::DATA_OVERHEAD;
        let (dst, saved) = match run {
            Some(r) => {
                let at = r.end - HEAD;
                let saved: [u8; HEAD] = buf[at..r.end].try_into().expect("HEAD bytes");
                (at, Some(saved))
            }
            None => (rec.start, None),
        };
        let res = self.open_and_handle(now, e, buf, dst, rec, run);
        if let Some(saved) = saved {
            buf[dst..dst + HEAD].copy_from_slice(&saved);
        }
        res
    }

    fn open_and_handle(
        &mut self,
        now: Instant,
        e: &mut Established,
        buf: &mut [u8],
        dst: usize,
        rec: std::ops::Range<usize>,
        run: &mut Option<Run>,
    ) -> Result<(), CloseReason> {
        let sid = e.session_id;
        let msg = rec.start + 5 - dst;
        let len = e
            .ratchet
            .open_within(now, &mut *self.rng, &sid, &mut buf[dst..rec.end], msg)?;
        let end = dst + len;
        let mut at = dst;
        while at < end {
            let mut r = Reader::new(&buf[at..end]);
            let frame = Frame::decode(&mut r)?;
            let next = end - r.remaining();
            match frame {
                Frame::Data { ch, data } => {
                    let data = next - data.len()..next;
                    self.handle_data(e, ch, buf, data, run)?;
                }
                frame => self.handle_frame(now, e, frame)?,
            }
            at = next;
        }
        Ok(())
    }

    /// DATA for `ch`, in `buf[data]`: joins `run` when it is the run's channel and the run
    /// stays within `MAX_DATA_EVENT` (moved up to the run's end if other frames came between),
    /// starts the run if there is none, and is copied to an event of its own otherwise.
    fn handle_data(
        &mut self,
        e: &mut Established,
        ch: u32,
        buf: &mut [u8],
        data: std::ops::Range<usize>,
        run: &mut Option<Run>,
    ) -> Result<(), CloseReason> {
        let n = data.len();
        let c = chan(e, ch)?;
        if c.state != ChanState::Open || c.recv_eof {
            return Err(CloseReason::Protocol(format!(
                "data on channel {ch} that is not open"
            )));
        }
        if n as u64 > c.recv_window {
            return Err(CloseReason::Protocol(format!(
                "channel {ch} window exceeded"
            )));
        }
        c.recv_window -= n as u64;
        c.unacked += n as u64;
        if c.closing {
            return Ok(());
        }
        // Stream channels: DATA of one channel that arrives together becomes one event (fewer
        // hand-offs downstream). A chat message stays one event.
        if c.kind == ChannelKind::Chat {
            let data = Payload::from(buf[data].to_vec());
            self.events.push_back(Event::Data { ch, data });
            return Ok(());
        }
        match run {
            Some(r) if r.ch == ch && r.end - r.start + n <= MAX_DATA_EVENT => {
                if data.start != r.end {
                    buf.copy_within(data, r.end);
                }
                r.end += n;
            }
            None => {
                *run = Some(Run {
                    ch,
                    start: data.start,
                    end: data.end,
                    event: self.events.len(),
                });
                self.events.push_back(Event::Data {
                    ch,
                    data: Payload::default(),
                });
            }
            Some(_) => {
                let data = &buf[data];
                match self.events.back_mut() {
                    Some(Event::Data { ch: last, data: ev })
                        if *last == ch && ev.buf.len() + n <= ev.buf.capacity() =>
                    {
                        extend_bulk(&mut ev.buf, data)
                    }
                    _ => {
                        // Sized once for the rest of this input: a Data event never grows
                        // (growing copies what it holds; a full one is followed by a new one).
                        let cap = self.input_left.min(MAX_DATA_EVENT).max(n);
                        let mut b = self.take_spare(cap);
                        extend_bulk(&mut b, data);
                        self.events.push_back(Event::Data {
                            ch,
                            data: Payload::from(b),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn handle_frame(
        &mut self,
        now: Instant,
        e: &mut Established,
        frame: Frame<'_>,
    ) -> Result<(), CloseReason> {
        let text = |b: &[u8]| -> String {
            String::from_utf8_lossy(b)
                .chars()
                .filter(|c| !c.is_control())
                .collect()
        };
        match frame {
            Frame::Open {
                ch,
                kind,
                window,
                params,
            } => {
                if ch % 2 == u32::from(!e.initiator) {
                    return Err(CloseReason::Protocol(format!(
                        "peer opened channel {ch} with our parity"
                    )));
                }
                if e.channels.contains_key(&ch) {
                    return Err(CloseReason::Protocol(format!("channel {ch} opened twice")));
                }
                let refuse = |code, why: &'static str, replies: &mut Vec<Frame<'static>>| {
                    replies.push(Frame::OpenFail {
                        ch,
                        code,
                        reason: why.as_bytes(),
                    })
                };
                let Some(kind) = ChannelKind::from_u8(kind) else {
                    refuse(
                        CloseCode::Unsupported,
                        "unknown channel type",
                        &mut self.replies,
                    );
                    return Ok(());
                };
                if e.channels.len() >= MAX_CHANNELS {
                    refuse(CloseCode::Limit, "too many channels", &mut self.replies);
                    return Ok(());
                }
                e.channels.insert(
                    ch,
                    Channel {
                        kind,
                        state: ChanState::Requested,
                        send_window: u64::from(window),
                        recv_window: u64::from(CHANNEL_WINDOW),
                        unacked: 0,
                        sent_eof: false,
                        recv_eof: false,
                        closing: false,
                    },
                );
                self.events.push_back(Event::ChannelRequest {
                    ch,
                    kind,
                    params: params.to_vec(),
                });
            }
            Frame::OpenOk { ch, window } => {
                let c = chan(e, ch)?;
                if c.state != ChanState::Opening {
                    return Err(CloseReason::Protocol(format!(
                        "OPEN_OK for channel {ch} we did not open"
                    )));
                }
                c.state = ChanState::Open;
                c.send_window = u64::from(window);
                self.events.push_back(Event::ChannelAccepted { ch });
            }
            Frame::OpenFail { ch, code, reason } => {
                let c = chan(e, ch)?;
                if c.state != ChanState::Opening {
                    return Err(CloseReason::Protocol(format!(
                        "OPEN_FAIL for channel {ch} we did not open"
                    )));
                }
                e.channels.remove(&ch);
                self.events.push_back(Event::ChannelRefused {
                    ch,
                    code,
                    reason: text(reason),
                });
            }
            Frame::Data { .. } => unreachable!("DATA is handled by handle_data"),
            Frame::Window { ch, increment } => {
                let c = chan(e, ch)?;
                c.send_window = c.send_window.saturating_add(u64::from(increment));
                if c.send_window > u64::from(u32::MAX) {
                    return Err(CloseReason::Protocol(format!(
                        "channel {ch} window overflow"
                    )));
                }
            }
            Frame::Eof { ch } => {
                let c = chan(e, ch)?;
                if c.recv_eof {
                    return Err(CloseReason::Protocol(format!("second EOF on channel {ch}")));
                }
                c.recv_eof = true;
                if !c.closing {
                    self.events.push_back(Event::Eof { ch });
                }
            }
            Frame::Close { ch, code, reason } => {
                let c = e.channels.remove(&ch).ok_or_else(|| no_chan(ch))?;
                if !c.closing {
                    // Acknowledge so the peer can free the id.
                    self.replies.push(Frame::Close {
                        ch,
                        code: CloseCode::Normal,
                        reason: b"",
                    });
                    self.events.push_back(Event::ChannelClosed {
                        ch,
                        code,
                        reason: text(reason),
                    });
                }
            }
            Frame::Ping { opaque } => self.replies.push(Frame::Pong { opaque }),
            Frame::Pong { opaque } => {
                if let Some((id, at)) = e.ping {
                    if id == opaque {
                        e.ping = None;
                        self.events.push_back(Event::Pong {
                            rtt: now.saturating_duration_since(at),
                        });
                    }
                }
            }
            Frame::SessionClose { code, reason } => {
                if !e.close_sent {
                    // Acknowledge: everything we queued before is delivered before this.
                    e.close_sent = true;
                    self.replies.push(Frame::SessionClose {
                        code: CloseCode::Normal,
                        reason: b"",
                    });
                    let why = text(reason);
                    let reason = if code == CloseCode::Normal || code == CloseCode::Shutdown {
                        CloseReason::PeerClosed(if why.is_empty() { "bye".into() } else { why })
                    } else {
                        CloseReason::PeerClosed(format!("{code:?}: {why}"))
                    };
                    self.events.push_back(Event::Closed { reason });
                } else {
                    self.events.push_back(Event::Closed {
                        reason: CloseReason::Normal,
                    });
                }
                e.channels.clear();
                self.peer_closed = true;
            }
            Frame::DatagramEpoch { epoch, secret } => {
                self.events
                    .push_back(Event::DatagramEpoch { epoch, secret });
            }
            Frame::DatagramEpochOk { epoch } => {
                self.events
                    .push_back(Event::DatagramEpochConfirmed { epoch });
            }
        }
        Ok(())
    }
}

fn no_chan(ch: u32) -> CloseReason {
    CloseReason::Protocol(format!("frame for unknown channel {ch}"))
}

fn chan(e: &mut Established, ch: u32) -> Result<&mut Channel, CloseReason> {
    e.channels.get_mut(&ch).ok_or_else(|| no_chan(ch))
}

/// Application API and output.
impl Session {
    fn est(&mut self) -> Result<&mut Established, SessionError> {
        match &mut self.state {
            State::Established(e) if !e.close_sent => Ok(e),
            State::Established(_) | State::Closed => Err(SessionError::Closed),
            _ => Err(SessionError::NotEstablished),
        }
    }

    /// Opens a channel; the peer answers with ChannelAccepted or ChannelRefused.
    pub fn open_channel(
        &mut self,
        now: Instant,
        kind: ChannelKind,
        params: &[u8],
    ) -> Result<u32, SessionError> {
        if params.len() > MAX_CHANNEL_PARAMS {
            return Err(SessionError::ParamsTooLong);
        }
        let e = self.est()?;
        if e.channels.len() >= MAX_CHANNELS {
            return Err(SessionError::TooManyChannels);
        }
        let ch = e.next_channel;
        e.next_channel = e.next_channel.wrapping_add(2);
        e.channels.insert(
            ch,
            Channel {
                kind,
                state: ChanState::Opening,
                send_window: 0,
                recv_window: u64::from(CHANNEL_WINDOW),
                unacked: 0,
                sent_eof: false,
                recv_eof: false,
                closing: false,
            },
        );
        self.queue_frame(
            now,
            Frame::Open {
                ch,
                kind: kind as u8,
                window: CHANNEL_WINDOW,
                params,
            },
        );
        Ok(ch)
    }

    pub fn channel_kind(&self, ch: u32) -> Option<ChannelKind> {
        match &self.state {
            State::Established(e) => e.channels.get(&ch).map(|c| c.kind),
            _ => None,
        }
    }

    /// Accepts a channel the peer requested.
    pub fn accept_channel(&mut self, now: Instant, ch: u32) -> Result<(), SessionError> {
        let e = self.est()?;
        let c = e.channels.get_mut(&ch).ok_or(SessionError::NoChannel(ch))?;
        if c.state != ChanState::Requested {
            return Err(SessionError::NoChannel(ch));
        }
        c.state = ChanState::Open;
        self.queue_frame(
            now,
            Frame::OpenOk {
                ch,
                window: CHANNEL_WINDOW,
            },
        );
        Ok(())
    }

    /// Refuses a channel the peer requested, with a reason the peer will show.
    pub fn reject_channel(
        &mut self,
        now: Instant,
        ch: u32,
        code: CloseCode,
        reason: &str,
    ) -> Result<(), SessionError> {
        let e = self.est()?;
        match e.channels.get(&ch) {
            Some(c) if c.state == ChanState::Requested => {}
            _ => return Err(SessionError::NoChannel(ch)),
        }
        e.channels.remove(&ch);
        self.queue_frame(
            now,
            Frame::OpenFail {
                ch,
                code,
                reason: reason.as_bytes(),
            },
        );
        Ok(())
    }

    /// Bytes that may be sent on `ch` right now (flow-control window).
    pub fn send_window(&self, ch: u32) -> usize {
        match &self.state {
            State::Established(e) => e
                .channels
                .get(&ch)
                .filter(|c| c.state == ChanState::Open && !c.sent_eof && !c.closing)
                .map_or(0, |c| c.send_window.min(usize::MAX as u64) as usize),
            _ => 0,
        }
    }

    /// Sends as much of `data` as the channel window allows; returns the bytes taken.
    pub fn send(&mut self, now: Instant, ch: u32, data: &[u8]) -> Result<usize, SessionError> {
        let e = self.est()?;
        let c = e.channels.get_mut(&ch).ok_or(SessionError::NoChannel(ch))?;
        if c.sent_eof || c.closing {
            return Err(SessionError::AfterEof(ch));
        }
        if c.state != ChanState::Open {
            return Ok(0);
        }
        let n = data
            .len()
            .min(c.send_window.min(usize::MAX as u64) as usize);
        c.send_window -= n as u64;
        for chunk in data[..n].chunks(MAX_FRAME_DATA) {
            self.queue_frame(now, Frame::Data { ch, data: chunk });
        }
        Ok(n)
    }

    /// Sends data that was read straight into record buffers, each sealed where it lies (no
    /// copy): every buffer of `recs` holds [`DATA_RECORD_HEAD`] bytes of room and then at
    /// most `MAX_FRAME_DATA` bytes of `ch`'s data. Buffers leave `recs` from the front while
    /// the window takes their data whole; the one it takes only in part is copied as far
    /// as it goes, and the rest stays at the front of `recs`, in the same layout. Returns the
    /// bytes of data taken. Frames queued earlier are sent first.
    pub fn send_records(
        &mut self,
        now: Instant,
        ch: u32,
        recs: &mut VecDeque<Vec<u8>>,
    ) -> Result<usize, SessionError> {
        if let Some(r) = recs
            .iter()
            .find(|r| !(DATA_RECORD_HEAD..=DATA_RECORD_HEAD + MAX_FRAME_DATA).contains(&r.len()))
        {
            return Err(SessionError::TooLong(
                r.len().saturating_sub(DATA_RECORD_HEAD),
            ));
        }
        let mut taken = 0;
        while let Some(rec) = recs.front_mut() {
            let len = rec.len() - DATA_RECORD_HEAD;
            let window = self.send_window(ch);
            if window < len {
                // A window that ends inside this record: the copying path takes its share.
                let n = self.send(now, ch, &rec[DATA_RECORD_HEAD..DATA_RECORD_HEAD + window])?;
                rec.drain(DATA_RECORD_HEAD..DATA_RECORD_HEAD + n);
                return Ok(taken + n);
            }
            let mut rec = recs.pop_front().expect("front exists");
            if len == 0 {
                self.recycle_record(rec);
                continue;
            }
            let e = self.est()?;
            let c = e
                .channels
                .get_mut(&ch)
                .expect("window implies an open channel");
            c.send_window -= len as u64;
            if !self.pending.is_empty() {
                self.flush(now);
            }
            Frame::write_data_header(ch, len, &mut rec[PENDING_HEAD..DATA_RECORD_HEAD]);
            self.seal(now, rec);
            taken += len;
        }
        Ok(taken)
    }

    /// A buffer to read data into for [`Session::send_records`]: a written record handed back
    /// if there is one, else a new one ([`new_record_buffer`]). It holds
    /// `DATA_RECORD_HEAD + MAX_FRAME_DATA` bytes, zeros or an old record's ciphertext (reused
    /// as they are: filling them again would cost what the copy it saves did).
    pub fn record_buffer(&mut self) -> Vec<u8> {
        match self.take_spare_record() {
            Some(mut rec) => {
                rec.resize(DATA_RECORD_HEAD + MAX_FRAME_DATA, 0);
                rec
            }
            None => new_record_buffer(),
        }
    }

    /// The newest written record handed back, if any (counted as reused).
    fn take_spare_record(&mut self) -> Option<Vec<u8>> {
        let rec = self.spare_records.pop()?;
        self.stats.records_reused += 1;
        Some(rec)
    }

    /// Gives a written record back for reuse (kept while fewer than [`MAX_SPARE_RECORDS`]
    /// wait, and only if it has [`RECORD_CAPACITY`]).
    pub fn recycle_record(&mut self, rec: Vec<u8>) {
        if self.spare_records.len() < MAX_SPARE_RECORDS && is_record_buffer(&rec) {
            self.spare_records.push(rec);
        }
    }

    /// Sends one whole message on a message channel (chat); fails if it does not fit the
    /// window or a frame, rather than splitting it.
    pub fn send_message(
        &mut self,
        now: Instant,
        ch: u32,
        msg: &[u8],
    ) -> Result<bool, SessionError> {
        if msg.len() > MAX_FRAME_DATA {
            return Err(SessionError::TooLong(msg.len()));
        }
        if self.send_window(ch) < msg.len() {
            let _ = self.est()?;
            return Ok(false);
        }
        self.send(now, ch, msg).map(|n| n == msg.len())
    }

    /// Tells the peer we will send no more on `ch` (half close).
    pub fn send_eof(&mut self, now: Instant, ch: u32) -> Result<(), SessionError> {
        let e = self.est()?;
        let c = e.channels.get_mut(&ch).ok_or(SessionError::NoChannel(ch))?;
        if c.sent_eof {
            return Ok(());
        }
        c.sent_eof = true;
        self.queue_frame(now, Frame::Eof { ch });
        Ok(())
    }

    /// Closes a channel; the peer's acknowledgement frees its id.
    pub fn close_channel(
        &mut self,
        now: Instant,
        ch: u32,
        code: CloseCode,
        reason: &str,
    ) -> Result<(), SessionError> {
        let e = self.est()?;
        let c = e.channels.get_mut(&ch).ok_or(SessionError::NoChannel(ch))?;
        if c.closing {
            return Ok(());
        }
        c.closing = true;
        self.queue_frame(
            now,
            Frame::Close {
                ch,
                code,
                reason: reason.as_bytes(),
            },
        );
        Ok(())
    }

    /// Gives an emptied Data buffer back for reuse by the next Data event (kept only while
    /// fewer than [`MAX_SPARE_BUFFERS`] wait, and only if it is no larger than a Data event
    /// needs).
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE_BUFFERS
            && (MAX_FRAME_DATA..=MAX_DATA_EVENT).contains(&buf.capacity())
        {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Emptied buffers waiting to carry the next Data events (at most
    /// [`MAX_SPARE_BUFFERS`]).
    pub fn spare_buffers(&self) -> usize {
        self.spare.len()
    }

    /// The application has processed `n` bytes of `ch`: the peer may send that much more.
    pub fn consumed(&mut self, now: Instant, ch: u32, n: usize) {
        let Ok(e) = self.est() else { return };
        let Some(c) = e.channels.get_mut(&ch) else {
            return;
        };
        c.unacked = c.unacked.saturating_sub(n as u64);
        // Return window in batches of a quarter window, like SSH implementations do.
        let outstanding = u64::from(CHANNEL_WINDOW) - c.recv_window - c.unacked;
        if outstanding >= u64::from(CHANNEL_WINDOW / 4) && !c.recv_eof {
            c.recv_window += outstanding;
            let increment = outstanding as u32;
            self.queue_frame(now, Frame::Window { ch, increment });
        }
    }

    /// Sends a ping; a Pong event reports the round-trip time.
    pub fn ping(&mut self, now: Instant) -> Result<(), SessionError> {
        let mut b = [0u8; 8];
        self.rng.fill(&mut b);
        let opaque = u64::from_be_bytes(b);
        let e = self.est()?;
        e.ping = Some((opaque, now));
        self.queue_frame(now, Frame::Ping { opaque });
        Ok(())
    }

    /// Announces a datagram epoch secret for our sending direction (VPN over UDP).
    pub fn announce_datagram_epoch(
        &mut self,
        now: Instant,
        epoch: u32,
        secret: [u8; 32],
    ) -> Result<(), SessionError> {
        self.est()?;
        self.queue_frame(now, Frame::DatagramEpoch { epoch, secret });
        Ok(())
    }

    /// Confirms that we installed the peer's datagram epoch `epoch`, so it may activate it.
    pub fn confirm_datagram_epoch(&mut self, now: Instant, epoch: u32) -> Result<(), SessionError> {
        self.est()?;
        self.queue_frame(now, Frame::DatagramEpochOk { epoch });
        Ok(())
    }

    /// Starts a graceful close: everything queued before is delivered, then the peer
    /// acknowledges and the session ends (Closed event). Before establishment it just ends.
    pub fn close(&mut self, now: Instant, code: CloseCode, reason: &str) {
        match &mut self.state {
            State::Established(e) if !e.close_sent => {
                e.close_sent = true;
                self.queue_frame(
                    now,
                    Frame::SessionClose {
                        code,
                        reason: reason.as_bytes(),
                    },
                );
                self.flush(now);
            }
            State::Established(_) | State::Closed => {}
            _ => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed {
                    reason: CloseReason::Normal,
                });
            }
        }
    }

    fn queue_frame(&mut self, now: Instant, frame: Frame<'_>) {
        let len = frame.encoded_len();
        if !self.pending.is_empty()
            && self.pending.len() - PENDING_HEAD + len > MAX_RECORD_PLAINTEXT
        {
            // Seal what is there; the frame starts the next record.
            self.flush(now);
        }
        if self.pending.is_empty() {
            // Room for the longest header too (KEM fields), so sealing never reallocates.
            self.pending = match self.take_spare_record() {
                Some(mut rec) => {
                    rec.clear();
                    rec
                }
                None => Vec::with_capacity(RECORD_HEAD + Ratchet::MAX_OVERHEAD + len),
            };
            self.pending.resize(PENDING_HEAD, 0);
        }
        frame.encode(&mut self.pending);
    }

    /// Seals pending frames into a record, in place.
    fn flush(&mut self, now: Instant) {
        let State::Established(e) = &self.state else {
            self.pending.clear();
            return;
        };
        let wants_ack = self.pending.is_empty() && e.ratchet.wants_ack(now);
        if self.pending.is_empty() && !wants_ack {
            return;
        }
        let mut rec = std::mem::take(&mut self.pending);
        if rec.is_empty() {
            rec.resize(PENDING_HEAD, 0);
        }
        self.seal(now, rec);
    }

    /// Seals `PENDING_HEAD` bytes of room followed by frames into a record, in place, and
    /// queues it (established sessions only).
    fn seal(&mut self, now: Instant, mut rec: Vec<u8>) {
        let State::Established(e) = &mut self.state else {
            return;
        };
        let sid = e.session_id;
        e.ratchet
            .seal_in_place(now, &mut *self.rng, &sid, &mut rec, RECORD_HEAD);
        let len = (rec.len() - 4) as u32;
        rec[..4].copy_from_slice(&len.to_be_bytes());
        rec[4] = record_type::RATCHET;
        self.transmit.push_back(rec);
    }

    fn maybe_close_after_peer(&mut self, now: Instant) {
        if self.peer_closed {
            self.flush(now);
            self.state = State::Closed;
        }
    }

    /// Next bytes to write to the link, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.transmit.is_empty() {
            self.flush(now);
        }
        let rec = self.transmit.pop_front()?;
        self.last_sent = now;
        self.stats.records_sent += 1;
        self.stats.bytes_sent += rec.len() as u64;
        Some(rec)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Closed => None,
            State::Established(e) => {
                let mut t =
                    (self.last_received + IDLE_TIMEOUT).min(self.last_sent + KEEPALIVE_INTERVAL);
                if let Some(r) = e.ratchet.poll_timeout() {
                    t = t.min(r);
                }
                Some(t)
            }
            _ => Some(self.created + HANDSHAKE_TIMEOUT),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Closed => {}
            State::Established(_) => {
                if now >= self.last_received + IDLE_TIMEOUT {
                    self.fail(now, CloseReason::IdleTimeout);
                    return;
                }
                if now >= self.last_sent + KEEPALIVE_INTERVAL {
                    let _ = self.ping(now);
                }
                self.flush(now);
            }
            _ => {
                if now >= self.created + HANDSHAKE_TIMEOUT {
                    self.state = State::Closed;
                    self.events.push_back(Event::Closed {
                        reason: CloseReason::HandshakeTimeout,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Payload;

    #[test]
    fn payloads_compare_and_print_their_bytes_only() {
        let lined_up = Payload {
            buf: b"junk:data".to_vec(),
            start: 5,
        };
        assert_eq!(&lined_up[..], b"data");
        assert_eq!(lined_up, Payload::from(b"data".to_vec()));
        assert_ne!(lined_up, Payload::from(b"junk:data".to_vec()));
        assert_eq!(format!("{lined_up:?}"), "Payload(4 bytes)");
        assert_eq!(lined_up.into_buffer(), b"junk:data");
    }
}
