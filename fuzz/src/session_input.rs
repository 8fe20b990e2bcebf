//! Target `session_input`: sessions fed arbitrary stream bytes through
//! [`Session::handle_input`], with every transmit and event drained after each step, the
//! clock starting at [`fixture::base`] and only moving forward.
//!
//! Input: a mode byte, then the mode's data.
//! - mode 0, fresh responder: a chunk byte, then raw stream bytes (what an unknown connector
//!   sends before and during the handshake);
//! - mode 1, fresh initiator that pinned the fixed responder and queued INIT: a chunk byte,
//!   then raw stream bytes (what a hostile listener answers);
//! - mode 2, responder established by a valid handshake: a chunk byte, then raw stream bytes
//!   (forged, truncated, oversized or misplaced records);
//! - mode 3, the same established responder driven by a script of [`ops`](op), most of them
//!   plaintext that the authenticated peer seals with its real ratchet, so hostile frames get
//!   past the record authentication into the frame, channel and flow-control logic, while the
//!   session's own records are fed back to the peer's ratchet (DH and PQ steps happen).
//!
//! Chunk byte: 0 feeds the stream at once, n feeds it n bytes at a time.

use super::fixture::{self, Peer};
use qssh::core::frame::{ChannelKind, CloseCode, Frame};
use qssh::core::limits::{DH_RATCHET_MIN_INTERVAL, MAX_RECORD_PLAINTEXT};
use qssh::core::session::{record_type, Event, Session};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A pause (ms) longer than `DH_RATCHET_MIN_INTERVAL`: a direction change after it steps.
const STEP_GAP_MS: u16 = DH_RATCHET_MIN_INTERVAL.as_millis() as u16 + 5;

/// Mode bytes.
pub mod mode {
    pub const RESPONDER_RAW: u8 = 0;
    pub const INITIATOR_RAW: u8 = 1;
    pub const ESTABLISHED_RAW: u8 = 2;
    pub const ESTABLISHED_SCRIPT: u8 = 3;
}

/// Script operations of mode 3 (first byte of each op, modulo 8). `len` is a big-endian u16,
/// cut to the bytes that remain.
pub mod op {
    /// `len, bytes`: the peer seals `bytes` (at most one record's plaintext) and sends it.
    pub const SEAL: u8 = 0;
    /// `len, bytes`: raw stream bytes.
    pub const RAW: u8 = 1;
    /// `ms u16`: the clock moves on; the timer fires if it is due.
    pub const ADVANCE: u8 = 2;
    /// `action, arg`: an application call, one of [`app`](super::app).
    pub const APP: u8 = 3;
    /// `len, bytes, pos u16, xor`: a sealed record with one byte changed.
    pub const TAMPER: u8 = 4;
    /// The last record the peer sealed, again.
    pub const REPLAY: u8 = 5;
    /// `len, bytes, cut u16`: a sealed record delivered in two reads.
    pub const SEAL_SPLIT: u8 = 6;
    /// The link ends; the script stops.
    pub const EOF: u8 = 7;
}

/// Application calls of [`op::APP`] (the action byte, modulo 8).
pub mod app {
    /// Accept the oldest unanswered channel request.
    pub const ACCEPT: u8 = 0;
    /// Reject the oldest unanswered channel request.
    pub const REJECT: u8 = 1;
    /// Open a channel of kind `arg % 7` (unknown kinds: chat).
    pub const OPEN: u8 = 2;
    /// Send `64 * arg` bytes on an open channel chosen by `arg`.
    pub const SEND: u8 = 3;
    /// Report `arg << 12` bytes consumed on a channel chosen by `arg`.
    pub const CONSUMED: u8 = 4;
    pub const PING: u8 = 5;
    /// Even `arg`: EOF on a channel chosen by `arg`; odd: close it.
    pub const EOF_OR_CLOSE: u8 = 6;
    /// Close the session.
    pub const CLOSE: u8 = 7;
}

/// Most operations one input may run (bounds the time per input).
pub const MAX_OPS: usize = 256;

/// What one input did, for the smoke test's checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The session was established at some point.
    pub established: bool,
    /// It ended (Closed event).
    pub closed: bool,
    /// Channel data delivered to the application.
    pub data_events: usize,
    /// Events of any kind.
    pub events: usize,
    /// Records the session sent.
    pub records_sent: usize,
    /// Ratchet steps of the session at the end: DH steps it made, PQ steps completed.
    pub dh_steps: u64,
    pub pq_steps: u64,
}

struct Driver {
    s: Session,
    now: Instant,
    out: Outcome,
    /// Channel requests from the peer not yet answered.
    requests: VecDeque<u32>,
    /// Channels that are open (either side opened them).
    open: Vec<u32>,
}

impl Driver {
    fn new(s: Session) -> Self {
        let mut d = Driver {
            out: Outcome {
                established: s.is_established(),
                ..Outcome::default()
            },
            s,
            now: fixture::base(),
            requests: VecDeque::new(),
            open: Vec::new(),
        };
        d.pump(None);
        d
    }

    /// Drains transmits (handing ratchet records to the peer, if any) and events.
    fn pump(&mut self, mut peer: Option<&mut Peer>) {
        while let Some(rec) = self.s.poll_transmit(self.now) {
            self.out.records_sent += 1;
            if let (Some(p), Some((&record_type::RATCHET, body))) = (
                peer.as_deref_mut(),
                rec.get(4..).and_then(|r| r.split_first()),
            ) {
                // The peer may legitimately fail to open (e.g. after a replayed record made
                // the session close); only panics matter here.
                let _ = p.ratchet.open(self.now, &mut p.rng, &p.session_id, body);
            }
        }
        if let Some(r) = self.s.ratchet_stats() {
            self.out.dh_steps = r.dh_steps;
            self.out.pq_steps = r.pq_steps_completed;
        }
        while let Some(ev) = self.s.poll_event() {
            self.out.events += 1;
            match ev {
                Event::Established { .. } => self.out.established = true,
                Event::Closed { .. } => self.out.closed = true,
                Event::Data { .. } => self.out.data_events += 1,
                Event::ChannelRequest { ch, .. } => self.requests.push_back(ch),
                Event::ChannelAccepted { ch } => self.open.push(ch),
                Event::ChannelRefused { ch, .. } | Event::ChannelClosed { ch, .. } => {
                    self.open.retain(|c| *c != ch)
                }
                _ => {}
            }
        }
    }

    fn feed(&mut self, bytes: &[u8], chunk: u8, peer: Option<&mut Peer>) {
        let chunk = match chunk {
            0 => bytes.len().max(1),
            n => usize::from(n),
        };
        let mut peer = peer;
        for part in bytes.chunks(chunk) {
            self.s.handle_input(self.now, part);
            self.pump(peer.as_deref_mut());
        }
    }

    fn channel(&self, arg: u8) -> u32 {
        match self.open.len() {
            0 => u32::from(arg),
            n => self.open[usize::from(arg) % n],
        }
    }

    fn app(&mut self, action: u8, arg: u8) {
        let now = self.now;
        // Errors are the API refusing a call in the current state: fine, only panics count.
        match action % 8 {
            app::ACCEPT => {
                if let Some(ch) = self.requests.pop_front() {
                    if self.s.accept_channel(now, ch).is_ok() {
                        self.open.push(ch);
                    }
                }
            }
            app::REJECT => {
                if let Some(ch) = self.requests.pop_front() {
                    let _ = self.s.reject_channel(now, ch, CloseCode::Refused, "no");
                }
            }
            app::OPEN => {
                let kind = ChannelKind::from_u8(arg % 7).unwrap_or(ChannelKind::Chat);
                let _ = self.s.open_channel(now, kind, &[arg; 3]);
            }
            app::SEND => {
                let ch = self.channel(arg);
                let _ = self.s.send(now, ch, &vec![arg; usize::from(arg) * 64]);
            }
            app::CONSUMED => {
                let ch = self.channel(arg);
                self.s.consumed(now, ch, usize::from(arg) << 12);
            }
            app::PING => {
                let _ = self.s.ping(now);
            }
            app::EOF_OR_CLOSE => {
                let ch = self.channel(arg);
                if arg % 2 == 0 {
                    let _ = self.s.send_eof(now, ch);
                } else {
                    let _ = self.s.close_channel(now, ch, CloseCode::Normal, "done");
                }
            }
            _ => self.s.close(now, CloseCode::Normal, "bye"),
        }
    }
}

/// Reads the script's input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    /// `len u16, bytes`, the length cut to what remains.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }
}

fn seal(peer: &mut Peer, now: Instant, plaintext: &[u8]) -> Vec<u8> {
    let plaintext = &plaintext[..plaintext.len().min(MAX_RECORD_PLAINTEXT)];
    let mut body = Vec::with_capacity(plaintext.len() + 64);
    peer.ratchet
        .seal(now, &mut peer.rng, &peer.session_id, plaintext, &mut body);
    fixture::record(record_type::RATCHET, &body)
}

fn script(data: &[u8]) -> Outcome {
    let (s, mut peer) = fixture::established_responder();
    let mut d = Driver::new(s);
    let mut input = Input(data);
    let mut last: Option<Vec<u8>> = None;
    for _ in 0..MAX_OPS {
        if d.s.is_closed() {
            break;
        }
        let Some(code) = input.u8() else { break };
        match code % 8 {
            op::SEAL => {
                let Some(pt) = input.bytes() else { break };
                let rec = seal(&mut peer, d.now, pt);
                d.feed(&rec, 0, Some(&mut peer));
                last = Some(rec);
            }
            op::RAW => {
                let Some(raw) = input.bytes() else { break };
                d.feed(raw, 0, Some(&mut peer));
            }
            op::ADVANCE => {
                let Some(ms) = input.u16() else { break };
                d.now += Duration::from_millis(u64::from(ms));
                if d.s.poll_timeout().is_some_and(|t| t <= d.now) {
                    d.s.handle_timeout(d.now);
                }
                d.pump(Some(&mut peer));
            }
            op::APP => {
                let (Some(action), Some(arg)) = (input.u8(), input.u8()) else {
                    break;
                };
                d.app(action, arg);
                d.pump(Some(&mut peer));
            }
            op::TAMPER => {
                let (Some(pt), Some(pos), Some(xor)) = (input.bytes(), input.u16(), input.u8())
                else {
                    break;
                };
                let mut rec = seal(&mut peer, d.now, pt);
                let at = usize::from(pos) % rec.len();
                rec[at] ^= xor.max(1);
                d.feed(&rec, 0, Some(&mut peer));
            }
            op::REPLAY => {
                if let Some(rec) = last.clone() {
                    d.feed(&rec, 0, Some(&mut peer));
                }
            }
            op::SEAL_SPLIT => {
                let (Some(pt), Some(cut)) = (input.bytes(), input.u16()) else {
                    break;
                };
                let rec = seal(&mut peer, d.now, pt);
                let at = usize::from(cut) % (rec.len() + 1);
                d.feed(&rec[..at], 0, Some(&mut peer));
                d.feed(&rec[at..], 0, Some(&mut peer));
                last = Some(rec);
            }
            _ => {
                d.s.handle_eof();
                d.pump(Some(&mut peer));
                break;
            }
        }
    }
    d.out
}

/// Runs one input; `None` if it is empty.
pub fn run(data: &[u8]) -> Option<Outcome> {
    let (&m, rest) = data.split_first()?;
    let m = m % 4;
    if m == mode::ESTABLISHED_SCRIPT {
        return Some(script(rest));
    }
    let (chunk, stream) = rest.split_first().map_or((0, &[][..]), |(c, s)| (*c, s));
    let mut d = match m {
        mode::RESPONDER_RAW => Driver::new(fixture::responder_session()),
        mode::INITIATOR_RAW => Driver::new(fixture::initiator_session()),
        _ => {
            let (s, mut peer) = fixture::established_responder();
            let mut d = Driver::new(s);
            d.feed(stream, chunk, Some(&mut peer));
            return Some(d.out);
        }
    };
    d.feed(stream, chunk, None);
    Some(d.out)
}

/// Builds mode-3 scripts (for seeds and tests).
pub struct Script {
    bytes: Vec<u8>,
}

impl Script {
    pub fn start() -> Self {
        Script {
            bytes: vec![mode::ESTABLISHED_SCRIPT],
        }
    }
    fn frames(frames: &[Frame<'_>]) -> Vec<u8> {
        let mut pt = Vec::new();
        for f in frames {
            f.encode(&mut pt);
        }
        pt
    }
    fn with_len(mut self, code: u8, bytes: &[u8]) -> Self {
        self.bytes.push(code);
        self.bytes
            .extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(bytes);
        self
    }
    /// The peer seals these frames into one record.
    pub fn seal(self, frames: &[Frame<'_>]) -> Self {
        self.with_len(op::SEAL, &Self::frames(frames))
    }
    pub fn raw(self, bytes: &[u8]) -> Self {
        self.with_len(op::RAW, bytes)
    }
    pub fn advance(mut self, ms: u16) -> Self {
        self.bytes.push(op::ADVANCE);
        self.bytes.extend_from_slice(&ms.to_be_bytes());
        self
    }
    pub fn app(mut self, action: u8, arg: u8) -> Self {
        self.bytes.extend_from_slice(&[op::APP, action, arg]);
        self
    }
    /// The peer seals these frames and byte `pos` (modulo the record length) is xored.
    pub fn tamper(self, frames: &[Frame<'_>], pos: u16, xor: u8) -> Self {
        let mut s = self.with_len(op::TAMPER, &Self::frames(frames));
        s.bytes.extend_from_slice(&pos.to_be_bytes());
        s.bytes.push(xor);
        s
    }
    pub fn replay(mut self) -> Self {
        self.bytes.push(op::REPLAY);
        self
    }
    /// The peer seals these frames; the record arrives in two reads, cut at `cut`.
    pub fn seal_split(self, frames: &[Frame<'_>], cut: u16) -> Self {
        let mut s = self.with_len(op::SEAL_SPLIT, &Self::frames(frames));
        s.bytes.extend_from_slice(&cut.to_be_bytes());
        s
    }
    pub fn eof(mut self) -> Self {
        self.bytes.push(op::EOF);
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.bytes
    }
}

/// Seed inputs: a valid handshake for each raw mode (byte-wise too), a valid record after
/// it, and scripts that walk channels, flow control, timers, ratchet steps, tampering and
/// replay.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let rec = fixture::recorded();
    let (_, mut peer) = fixture::established_responder();
    let first = seal(
        &mut peer,
        fixture::base(),
        &Script::frames(&[open(0), Frame::Ping { opaque: 1 }]),
    );
    let raw = |m: u8, chunk: u8, parts: &[&[u8]]| {
        let mut v = vec![m, chunk];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let init = fixture::record(record_type::INIT, &rec.init);
    let finish = fixture::record(record_type::FINISH, &rec.finish);
    let resp = fixture::record(record_type::RESP, &rec.resp);
    let mut steps = Script::start().seal(&[open(0)]).app(app::ACCEPT, 0);
    for i in 0..20u8 {
        // Direction changes more than DH_RATCHET_MIN_INTERVAL apart: both sides step.
        steps = steps
            .seal(&[data(0, &[b'a' + i, b'\n'])])
            .advance(STEP_GAP_MS)
            .app(app::SEND, 1)
            .advance(STEP_GAP_MS);
    }
    let scripts = [
        (
            "script-chat",
            Script::start()
                .seal(&[open(0)])
                .app(app::ACCEPT, 0)
                .seal(&[data(0, b"hello\n"), Frame::Ping { opaque: 9 }])
                .app(app::CONSUMED, 0)
                .advance(30)
                .app(app::SEND, 2)
                .seal(&[Frame::Window {
                    ch: 0,
                    increment: 4096,
                }])
                .seal(&[Frame::Eof { ch: 0 }])
                .seal(&[Frame::Close {
                    ch: 0,
                    code: CloseCode::Normal,
                    reason: b"done",
                }])
                .seal(&[Frame::SessionClose {
                    code: CloseCode::Normal,
                    reason: b"bye",
                }])
                .build(),
        ),
        (
            "script-we-open",
            Script::start()
                .app(app::OPEN, ChannelKind::Chat as u8)
                .seal(&[Frame::OpenOk {
                    ch: 1,
                    window: 1 << 20,
                }])
                .app(app::SEND, 3)
                .app(app::OPEN, ChannelKind::Exec as u8)
                .seal(&[Frame::OpenFail {
                    ch: 3,
                    code: CloseCode::Refused,
                    reason: b"no exec",
                }])
                .seal(&[Frame::DatagramEpoch {
                    epoch: 1,
                    secret: [7; 32],
                }])
                .app(app::EOF_OR_CLOSE, 1)
                .seal(&[Frame::Close {
                    ch: 1,
                    code: CloseCode::Normal,
                    reason: b"",
                }])
                .app(app::CLOSE, 0)
                .build(),
        ),
        (
            "script-tamper",
            Script::start()
                .seal(&[open(0)])
                .tamper(&[data(0, b"x\n")], 40, 1)
                .build(),
        ),
        (
            "script-replay",
            Script::start()
                .seal(&[Frame::Ping { opaque: 1 }])
                .replay()
                .build(),
        ),
        (
            "script-timers",
            Script::start()
                .advance(16_000)
                .seal(&[Frame::Pong { opaque: 3 }])
                .advance(61_000)
                .build(),
        ),
        (
            "script-split-raw-eof",
            Script::start()
                .seal_split(&[open(0), data(0, b"split\n")], 3)
                .app(app::REJECT, 0)
                .raw(&[0, 0, 0, 9, record_type::RATCHET, 1, 2, 3])
                .eof()
                .build(),
        ),
        ("script-ratchet-steps", steps.build()),
    ];
    let mut out = vec![
        (
            "responder-handshake".to_string(),
            raw(mode::RESPONDER_RAW, 0, &[&init, &finish, &first]),
        ),
        (
            "responder-handshake-bytewise".to_string(),
            raw(mode::RESPONDER_RAW, 1, &[&init, &finish]),
        ),
        (
            "initiator-resp".to_string(),
            raw(mode::INITIATOR_RAW, 0, &[&resp]),
        ),
        (
            "established-record".to_string(),
            raw(mode::ESTABLISHED_RAW, 0, &[&first]),
        ),
    ];
    out.extend(scripts.into_iter().map(|(n, s)| (n.to_string(), s)));
    out
}

fn open(ch: u32) -> Frame<'static> {
    Frame::Open {
        ch,
        kind: ChannelKind::Chat as u8,
        window: 1 << 20,
        params: b"",
    }
}

fn data(ch: u32, data: &[u8]) -> Frame<'_> {
    Frame::Data { ch, data }
}
