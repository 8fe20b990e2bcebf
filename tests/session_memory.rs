//! Two sessions in memory with a simulated clock: the handshake, channels, flow control,
//! ratchet steps, close, timers, and what happens to tampered or misplaced records.

use qssh::core::crypto::{DeterministicRandom, Secret32};
use qssh::core::frame::{ChannelKind, CloseCode};
use qssh::core::handshake::{HandshakeConfig, HandshakeError};
use qssh::core::identity::{Algorithm, Identity, PeerId};
use qssh::core::limits::{
    CHANNEL_WINDOW, DH_RATCHET_MIN_INTERVAL, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, KEEPALIVE_INTERVAL,
    MAX_DATA_EVENT, MAX_FRAME_DATA, MAX_HANDSHAKE_MSG, MAX_RECORD_BODY, MAX_SPARE_BUFFERS,
    MAX_SPARE_RECORDS, PQ_RATCHET_EVERY_STEPS,
};
use qssh::core::session::{
    is_record_buffer, new_record_buffer, record_type, CloseReason, Event, Session, SessionConfig,
    DATA_RECORD_HEAD, RECORD_CAPACITY,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Pair {
    a: Session,
    b: Session,
    now: Instant,
    a_ev: Vec<Event>,
    b_ev: Vec<Event>,
    /// Record types A sent, in order.
    a_sent_types: Vec<u8>,
}

fn ident(seed: u64) -> Arc<Identity> {
    Arc::new(Identity::generate(
        Algorithm::Falcon512,
        &mut DeterministicRandom::new(seed),
    ))
}

fn cfg(id: &Arc<Identity>, name: &str) -> HandshakeConfig {
    HandshakeConfig::new(id.clone(), name)
}

impl Pair {
    fn new(ci: HandshakeConfig, cr: HandshakeConfig, expected: Option<PeerId>) -> Self {
        let now = Instant::now();
        let a = Session::initiator(
            SessionConfig {
                handshake: ci,
                expected_peer: expected,
            },
            now,
            Box::new(DeterministicRandom::new(100)),
        );
        let b = Session::responder(
            SessionConfig {
                handshake: cr,
                expected_peer: None,
            },
            now,
            Box::new(DeterministicRandom::new(200)),
        );
        Pair {
            a,
            b,
            now,
            a_ev: vec![],
            b_ev: vec![],
            a_sent_types: vec![],
        }
    }

    fn established() -> Self {
        let (ia, ib) = (ident(1), ident(2));
        let mut p = Pair::new(cfg(&ia, "alice"), cfg(&ib, "bob"), Some(ib.peer_id()));
        p.run();
        assert!(p.a.is_established() && p.b.is_established());
        p.a_ev.clear();
        p.b_ev.clear();
        p
    }

    /// Moves records both ways until nothing moves (bounded).
    fn run(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(rec) = self.a.poll_transmit(self.now) {
                self.a_sent_types.push(rec[4]);
                self.b.handle_input(self.now, &rec);
                moved = true;
            }
            while let Some(rec) = self.b.poll_transmit(self.now) {
                self.a.handle_input(self.now, &rec);
                moved = true;
            }
            while let Some(e) = self.a.poll_event() {
                self.a_ev.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_ev.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
    }

    /// Opens a channel from A, accepted by B; returns (A's id, B's id).
    fn open(&mut self, kind: ChannelKind) -> u32 {
        let ch = self.a.open_channel(self.now, kind, b"params").unwrap();
        self.run();
        let req = self.b_ev.drain(..).find_map(|e| match e {
            Event::ChannelRequest {
                ch,
                kind: k,
                params,
            } => {
                assert_eq!((k, params.as_slice()), (kind, &b"params"[..]));
                Some(ch)
            }
            _ => None,
        });
        assert_eq!(req, Some(ch));
        self.b.accept_channel(self.now, ch).unwrap();
        self.run();
        assert!(self
            .a_ev
            .drain(..)
            .any(|e| e == Event::ChannelAccepted { ch }));
        ch
    }
}

fn data_of(events: &mut Vec<Event>, ch: u32) -> Vec<u8> {
    let mut out = Vec::new();
    events.retain(|e| match e {
        Event::Data { ch: c, data } if *c == ch => {
            out.extend_from_slice(data);
            false
        }
        _ => true,
    });
    out
}

fn closed_reason(events: &[Event]) -> Option<CloseReason> {
    events.iter().find_map(|e| match e {
        Event::Closed { reason } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn handshake_then_many_messages_both_ways_with_both_ratchet_kinds() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Chat);
    let mut expect_b = Vec::new();
    let mut expect_a = Vec::new();
    // Longer than the DH step rate limit: every direction change steps.
    let gap = DH_RATCHET_MIN_INTERVAL + Duration::from_millis(5);
    for i in 0..(4 * PQ_RATCHET_EVERY_STEPS + 4) {
        // A burst from A, then a burst from B: every burst is a direction change.
        for j in 0..5 {
            let m = format!("a{i}.{j}\n");
            p.a.send(p.now, ch, m.as_bytes()).unwrap();
            expect_b.extend_from_slice(m.as_bytes());
        }
        p.run();
        p.advance(gap);
        let m = format!("b{i}\n");
        p.b.send(p.now, ch, m.as_bytes()).unwrap();
        expect_a.extend_from_slice(m.as_bytes());
        p.run();
        p.advance(gap);
        p.a.consumed(p.now, ch, 1 << 30);
        p.b.consumed(p.now, ch, 1 << 30);
    }
    assert_eq!(data_of(&mut p.b_ev, ch), expect_b);
    assert_eq!(data_of(&mut p.a_ev, ch), expect_a);
    let (ra, rb) = (p.a.ratchet_stats().unwrap(), p.b.ratchet_stats().unwrap());
    assert!(ra.dh_steps >= 30 && rb.dh_steps >= 30, "{ra:?} {rb:?}");
    assert!(
        ra.pq_steps_completed >= 2 && rb.pq_steps_completed >= 2,
        "{ra:?} {rb:?}"
    );
    assert_eq!(p.a.session_id(), p.b.session_id());
}

#[test]
fn unpinned_initiator_reveals_nothing_until_it_accepts() {
    let (ia, ib) = (ident(1), ident(2));
    let mut p = Pair::new(cfg(&ia, "alice"), cfg(&ib, "bob"), None);
    p.run();
    let asked = p.a_ev.iter().find_map(|e| match e {
        Event::VerifyPeer { peer, name } => Some((peer.peer_id(), name.clone())),
        _ => None,
    });
    assert_eq!(asked, Some((ib.peer_id(), "bob".to_string())));
    assert!(!p.a_sent_types.contains(&record_type::FINISH));
    p.a.reject_peer(p.now);
    p.run();
    assert_eq!(closed_reason(&p.a_ev), Some(CloseReason::PeerNotAccepted));
    assert!(
        !p.a_sent_types.contains(&record_type::FINISH),
        "our identity must not be sent to a refused peer"
    );

    let mut p = Pair::new(cfg(&ia, "alice"), cfg(&ib, "bob"), None);
    p.run();
    p.a.accept_peer(p.now);
    p.run();
    assert!(p.a.is_established() && p.b.is_established());
    let b_saw = p.b_ev.iter().find_map(|e| match e {
        Event::Established { peer, .. } => Some(peer.peer_id()),
        _ => None,
    });
    assert_eq!(b_saw, Some(ia.peer_id()));
}

#[test]
fn pinned_peer_id_refuses_any_other_key() {
    let (ia, ib, other) = (ident(1), ident(2), ident(3));
    let mut p = Pair::new(cfg(&ia, "alice"), cfg(&ib, "bob"), Some(other.peer_id()));
    p.run();
    assert_eq!(
        closed_reason(&p.a_ev),
        Some(CloseReason::WrongPeer {
            expected: other.peer_id(),
            got: ib.peer_id()
        })
    );
    assert!(!p.a.is_established() && !p.b.is_established());
    assert!(!p.a_sent_types.contains(&record_type::FINISH));
}

#[test]
fn psk_mismatch_fails_and_match_succeeds() {
    let (ia, ib) = (ident(1), ident(2));
    let (mut ci, mut cr) = (cfg(&ia, "a"), cfg(&ib, "b"));
    ci.psk = Some(Secret32::from_bytes([7; 32]));
    cr.psk = Some(Secret32::from_bytes([8; 32]));
    let mut p = Pair::new(ci.clone(), cr.clone(), Some(ib.peer_id()));
    p.run();
    assert_eq!(
        closed_reason(&p.a_ev),
        Some(CloseReason::Handshake(HandshakeError::Decrypt))
    );
    cr.psk = Some(Secret32::from_bytes([7; 32]));
    let mut p = Pair::new(ci.clone(), cr, Some(ib.peer_id()));
    p.run();
    assert!(p.a.is_established() && p.b.is_established());
    // A listener without a PSK tells the connector why, in an alert.
    let mut p = Pair::new(ci, cfg(&ib, "b"), Some(ib.peer_id()));
    p.run();
    assert!(
        matches!(closed_reason(&p.a_ev), Some(CloseReason::PeerAlert(m)) if m.contains("pre-shared"))
    );
}

#[test]
fn flow_control_window_bounds_what_the_peer_must_buffer() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let big = vec![0x5a; 3 * CHANNEL_WINDOW as usize];
    let n = p.a.send(p.now, ch, &big).unwrap();
    assert_eq!(
        n, CHANNEL_WINDOW as usize,
        "only one window may be in flight"
    );
    p.run();
    assert_eq!(data_of(&mut p.b_ev, ch).len(), CHANNEL_WINDOW as usize);
    assert_eq!(p.a.send(p.now, ch, &big[n..]).unwrap(), 0);
    p.b.consumed(p.now, ch, CHANNEL_WINDOW as usize);
    p.run();
    let m = p.a.send(p.now, ch, &big[n..]).unwrap();
    assert_eq!(m, CHANNEL_WINDOW as usize);
    p.run();
    assert_eq!(data_of(&mut p.b_ev, ch).len(), m);
}

#[test]
fn graceful_close_delivers_everything_first() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Chat);
    for i in 0..100 {
        p.a.send(p.now, ch, format!("{i}\n").as_bytes()).unwrap();
    }
    p.a.close(p.now, CloseCode::Normal, "bye");
    p.run();
    let got = String::from_utf8(data_of(&mut p.b_ev, ch)).unwrap();
    assert_eq!(got.lines().count(), 100);
    assert!(matches!(closed_reason(&p.b_ev), Some(CloseReason::PeerClosed(r)) if r == "bye"));
    assert_eq!(closed_reason(&p.a_ev), Some(CloseReason::Normal));
    assert!(p.a.is_closed() && p.b.is_closed());
}

#[test]
fn channel_refusal_reaches_the_opener() {
    let mut p = Pair::established();
    let ch = p.a.open_channel(p.now, ChannelKind::Shell, b"").unwrap();
    p.run();
    assert!(p
        .b_ev
        .iter()
        .any(|e| matches!(e, Event::ChannelRequest { .. })));
    p.b_ev.clear();
    p.b.reject_channel(p.now, ch, CloseCode::Refused, "not authorized")
        .unwrap();
    p.run();
    assert!(p.a_ev.iter().any(|e| matches!(e,
        Event::ChannelRefused { ch: c, code: CloseCode::Refused, reason } if *c == ch && reason == "not authorized")));
    // The refused channel is gone: sending on it is an error, the session lives on.
    assert!(p.a.send(p.now, ch, b"x").is_err());
    let chat = p.open(ChannelKind::Chat);
    p.a.send(p.now, chat, b"still here\n").unwrap();
    p.run();
    assert_eq!(data_of(&mut p.b_ev, chat), b"still here\n");
}

#[test]
fn keepalive_then_idle_timeout() {
    let mut p = Pair::established();
    let sent = p.a.stats().records_sent;
    p.advance(KEEPALIVE_INTERVAL + Duration::from_millis(1));
    p.run();
    assert!(p.a.stats().records_sent > sent, "idle session sends a ping");
    assert!(p.a_ev.iter().any(|e| matches!(e, Event::Pong { .. })));
    // Now B goes silent: A gives up after IDLE_TIMEOUT without input.
    for _ in 0..(IDLE_TIMEOUT.as_secs() / KEEPALIVE_INTERVAL.as_secs() + 1) {
        p.now += KEEPALIVE_INTERVAL;
        p.a.handle_timeout(p.now);
        while p.a.poll_transmit(p.now).is_some() {}
    }
    while let Some(e) = p.a.poll_event() {
        p.a_ev.push(e);
    }
    assert_eq!(closed_reason(&p.a_ev), Some(CloseReason::IdleTimeout));
}

#[test]
fn handshake_times_out() {
    let (ia, ib) = (ident(1), ident(2));
    let mut p = Pair::new(cfg(&ia, "a"), cfg(&ib, "b"), None);
    p.now += HANDSHAKE_TIMEOUT;
    p.b.handle_timeout(p.now);
    assert!(matches!(
        p.b.poll_event(),
        Some(Event::Closed {
            reason: CloseReason::HandshakeTimeout
        })
    ));
    assert_eq!(p.b.poll_timeout(), None);
}

#[test]
fn application_data_before_key_confirmation_is_refused() {
    let (ia, ib) = (ident(1), ident(2));
    let mut p = Pair::new(cfg(&ia, "a"), cfg(&ib, "b"), Some(ib.peer_id()));
    let init = p.a.poll_transmit(p.now).unwrap();
    p.b.handle_input(p.now, &init);
    let resp = p.b.poll_transmit(p.now).unwrap();
    p.a.handle_input(p.now, &resp);
    let fin = p.a.poll_transmit(p.now).unwrap();
    let ch = p.a.open_channel(p.now, ChannelKind::Chat, b"").unwrap();
    let _ = ch;
    let data = p.a.poll_transmit(p.now).unwrap();
    assert_eq!(
        (fin[4], data[4]),
        (record_type::FINISH, record_type::RATCHET)
    );
    p.b.handle_input(p.now, &data);
    let mut reason = None;
    while let Some(e) = p.b.poll_event() {
        if let Event::Closed { reason: r } = e {
            reason = Some(r);
        }
    }
    assert!(
        matches!(reason, Some(CloseReason::Protocol(m)) if m.contains("before key confirmation"))
    );
}

#[test]
fn oversized_length_prefix_closes_at_once() {
    let mut p = Pair::established();
    p.b.handle_input(p.now, &[0xff, 0xff, 0xff, 0xff, 4]);
    p.run();
    assert!(
        matches!(closed_reason(&p.b_ev), Some(CloseReason::Protocol(m)) if m.contains("out of range"))
    );
    assert!(p.b.is_closed());
}

/// Before the handshake completes a record may be at most a handshake message long; the
/// larger ratchet-record limit applies only once the session is established.
#[test]
fn record_length_limit_follows_the_session_state() {
    let prefix = |body: usize| ((1 + body) as u32).to_be_bytes();
    // A responder waiting for INIT: one byte over MAX_HANDSHAKE_MSG ends it at once.
    let (ia, ib) = (ident(1), ident(2));
    let mut p = Pair::new(cfg(&ia, "alice"), cfg(&ib, "bob"), None);
    p.b.handle_input(p.now, &prefix(MAX_HANDSHAKE_MSG + 1));
    assert!(
        p.b.is_closed(),
        "a handshake record above MAX_HANDSHAKE_MSG was accepted"
    );
    // Established: a prefix up to MAX_RECORD_BODY waits for its body, one more byte ends it.
    let mut p = Pair::established();
    p.b.handle_input(p.now, &prefix(MAX_RECORD_BODY));
    assert!(!p.b.is_closed());
    let mut p = Pair::established();
    p.b.handle_input(p.now, &prefix(MAX_RECORD_BODY + 1));
    assert!(p.b.is_closed());
    const { assert!(MAX_RECORD_BODY > MAX_HANDSHAKE_MSG) };
}

#[test]
fn every_flipped_byte_of_a_record_is_rejected() {
    let mut base = Pair::established();
    let ch = base.open(ChannelKind::Chat);
    base.a.send(base.now, ch, b"secret message\n").unwrap();
    let rec = base.a.poll_transmit(base.now).unwrap();
    // Each flip needs a fresh, identical pair: sessions are deterministic given their seeds.
    for i in 0..rec.len() {
        let mut p = Pair::established();
        let ch2 = p.open(ChannelKind::Chat);
        assert_eq!(ch2, ch);
        p.a.send(p.now, ch, b"secret message\n").unwrap();
        let mut r = p.a.poll_transmit(p.now).unwrap();
        assert_eq!(r, rec, "deterministic replay of the pair");
        r[i] ^= 0x01;
        p.b.handle_input(p.now, &r);
        let mut evs = Vec::new();
        while let Some(e) = p.b.poll_event() {
            evs.push(e);
        }
        assert!(
            !evs.iter().any(|e| matches!(e, Event::Data { .. })),
            "byte {i}: tampered record delivered"
        );
        if i >= 4 {
            assert!(
                closed_reason(&evs).is_some(),
                "byte {i}: tampering not detected"
            );
        }
    }
}

#[test]
fn replayed_record_is_rejected() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Chat);
    p.a.send(p.now, ch, b"once\n").unwrap();
    let rec = p.a.poll_transmit(p.now).unwrap();
    p.b.handle_input(p.now, &rec);
    p.b.handle_input(p.now, &rec);
    let mut evs = Vec::new();
    while let Some(e) = p.b.poll_event() {
        evs.push(e);
    }
    let n = evs
        .iter()
        .filter(|e| matches!(e, Event::Data { .. }))
        .count();
    assert_eq!(n, 1);
    assert!(matches!(closed_reason(&evs), Some(CloseReason::Ratchet(_))));
}

/// All records A has queued, as one byte string (as a link would deliver them together).
fn a_records(p: &mut Pair) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(rec) = p.a.poll_transmit(p.now) {
        all.extend_from_slice(&rec);
    }
    all
}

/// `bytes` in a read buffer of the TCP driver's size, for `handle_input_buf`.
fn read_buffer(bytes: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(MAX_DATA_EVENT);
    buf.extend_from_slice(bytes);
    buf
}

#[test]
fn stream_data_arriving_together_is_one_event_chat_messages_stay_apart() {
    let mut p = Pair::established();
    let exec = p.open(ChannelKind::Exec);
    let chat = p.open(ChannelKind::Chat);
    let bulk: Vec<u8> = (0..3 * MAX_FRAME_DATA + 100).map(|i| i as u8).collect();
    assert_eq!(p.a.send(p.now, exec, &bulk).unwrap(), bulk.len());
    assert!(p.a.send_message(p.now, chat, b"one").unwrap());
    assert!(p.a.send_message(p.now, chat, b"two").unwrap());
    let mut input = a_records(&mut p);
    p.b.handle_input_buf(p.now, &mut input);
    let evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    let data: Vec<(u32, usize)> = evs
        .iter()
        .filter_map(|e| match e {
            Event::Data { ch, data } => Some((*ch, data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(data, vec![(exec, bulk.len()), (chat, 3), (chat, 3)]);
    let mut evs = evs;
    assert_eq!(data_of(&mut evs, exec), bulk);
    assert_eq!(data_of(&mut evs, chat), b"onetwo");
}

/// However much arrives in one input, no Data event holds more than MAX_DATA_EVENT bytes or
/// a buffer larger than that.
#[test]
fn data_events_stay_within_max_data_event() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let bulk: Vec<u8> = (0..6 * MAX_FRAME_DATA).map(|i| (i % 249) as u8).collect();
    assert_eq!(p.a.send(p.now, ch, &bulk).unwrap(), bulk.len());
    let input = a_records(&mut p);
    p.b.handle_input(p.now, &input);
    let mut got = Vec::new();
    while let Some(e) = p.b.poll_event() {
        if let Event::Data { data, .. } = e {
            assert!(data.len() <= MAX_DATA_EVENT, "{} bytes", data.len());
            got.extend_from_slice(&data);
            assert!(data.into_buffer().capacity() <= MAX_DATA_EVENT);
        }
    }
    assert_eq!(got, bulk);
}

/// A Data event's buffer handed back with `recycle` is reused: as the buffer that replaces
/// a read buffer handed to the application, or to carry data too small to take the read
/// buffer. Chat messages never take a spare; at most MAX_SPARE_BUFFERS are kept and buffers
/// larger than a Data event are refused.
#[test]
fn recycled_data_buffers_are_reused_and_bounded() {
    let mut p = Pair::established();
    let exec = p.open(ChannelKind::Exec);
    let chat = p.open(ChannelKind::Chat);
    // Delivers `data` to B in a read buffer of MAX_DATA_EVENT bytes (as the TCP driver's);
    // returns the Data event's buffer and the read buffer B left.
    let take = |p: &mut Pair, ch: u32, data: &[u8]| -> (Vec<u8>, Vec<u8>) {
        if ch == chat {
            assert!(p.a.send_message(p.now, ch, data).unwrap());
        } else {
            assert_eq!(p.a.send(p.now, ch, data).unwrap(), data.len());
        }
        let mut input = read_buffer(&a_records(p));
        p.b.handle_input_buf(p.now, &mut input);
        p.b.consumed(p.now, ch, data.len());
        let got = std::iter::from_fn(|| p.b.poll_event())
            .find_map(|e| match e {
                Event::Data { ch: c, data } if c == ch => Some(data),
                _ => None,
            })
            .expect("a data event");
        assert_eq!(&got[..], data);
        // Let A see B's window updates before the next send.
        while let Some(rec) = p.b.poll_transmit(p.now) {
            p.a.handle_input(p.now, &rec);
        }
        (got.into_buffer(), input)
    };
    // Enough data to take the read buffer itself; its replacement is new.
    let (first, _) = take(&mut p, exec, &[1; 2 * MAX_FRAME_DATA]);
    assert_eq!(first.capacity(), MAX_DATA_EVENT);
    let ptr = first.as_ptr();
    p.b.recycle(first);
    let (chat_msg, _) = take(&mut p, chat, b"hello");
    assert_ne!(
        chat_msg.as_ptr(),
        ptr,
        "a chat message took the spare buffer"
    );
    // Too little data for the read buffer: copied, into the spare.
    let (second, _) = take(&mut p, exec, &[2; 3000]);
    assert_eq!(second.as_ptr(), ptr, "the recycled buffer was not reused");
    p.b.recycle(second);
    // A read buffer handed over is replaced by the spare.
    let (_, input) = take(&mut p, exec, &[3; 2 * MAX_FRAME_DATA]);
    assert_eq!(
        input.as_ptr(),
        ptr,
        "the spare did not replace the read buffer"
    );

    // Bounded: only MAX_SPARE_BUFFERS are kept, buffers too large or too small never.
    assert_eq!(p.b.spare_buffers(), 0);
    p.b.recycle(Vec::with_capacity(MAX_DATA_EVENT + 1));
    p.b.recycle(Vec::with_capacity(MAX_FRAME_DATA - 1));
    assert_eq!(p.b.spare_buffers(), 0);
    for _ in 0..MAX_SPARE_BUFFERS + 2 {
        p.b.recycle(Vec::with_capacity(MAX_DATA_EVENT));
    }
    assert_eq!(p.b.spare_buffers(), MAX_SPARE_BUFFERS);
    // Each stream Data event takes one.
    for i in 0..MAX_SPARE_BUFFERS {
        let (got, _) = take(&mut p, exec, &[i as u8; 100]);
        assert_eq!(got.capacity(), MAX_DATA_EVENT);
    }
    assert_eq!(p.b.spare_buffers(), 0);

    // A spare too small for the data at hand stays spare: the event gets a buffer of its
    // size instead of growing one (growing would copy what it already holds).
    p.b.recycle(Vec::with_capacity(MAX_FRAME_DATA));
    let small = p.b.spare_buffers();
    let (got, _) = take(&mut p, exec, &[7; MAX_FRAME_DATA + 1]);
    assert!(got.capacity() > MAX_FRAME_DATA);
    assert_eq!(
        p.b.spare_buffers(),
        small,
        "the small spare was taken and grown"
    );
}

/// Bulk data is delivered in the read buffer it arrived in, decrypted and lined up in place
/// (no copy), even when other frames sit between the DATA frames; the unfinished record at
/// the end stays in the buffer that replaces it, and completes with the next read.
#[test]
fn bulk_data_is_delivered_in_the_read_buffer_it_arrived_in() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    // B sends to A first, so that A's records carry window updates ahead of its data.
    assert_eq!(p.b.send(p.now, ch, &[9; 5000]).unwrap(), 5000);
    p.run();
    p.a.consumed(p.now, ch, 5000);
    let bulk: Vec<u8> = (0..3 * MAX_FRAME_DATA + 1234)
        .map(|i| (i % 251) as u8)
        .collect();
    assert_eq!(p.a.send(p.now, ch, &bulk).unwrap(), bulk.len());
    let records = a_records(&mut p);
    // The buffer ends 100 bytes into the last record.
    let mut last = 0;
    while let Some(len) = records.get(last..last + 4) {
        let next = last + 4 + u32::from_be_bytes(len.try_into().unwrap()) as usize;
        if next == records.len() {
            break;
        }
        last = next;
    }
    assert!(last > 0);
    let cut = last + 100;
    let mut input = read_buffer(&records[..cut]);
    let base = input.as_ptr() as usize;
    p.b.handle_input_buf(p.now, &mut input);
    let evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(closed_reason(&evs).is_none(), "{evs:?}");
    let first = evs
        .iter()
        .find_map(|e| match e {
            Event::Data { data, .. } => Some(data),
            _ => None,
        })
        .expect("a data event");
    let at = first.as_ptr() as usize;
    assert!(
        (base..base + MAX_DATA_EVENT).contains(&at),
        "the data was copied out of the read buffer"
    );
    assert_eq!(
        input.len(),
        cut - last,
        "the unfinished record was not kept"
    );
    assert_ne!(input.as_ptr() as usize, base);
    input.extend_from_slice(&records[cut..]);
    p.b.handle_input_buf(p.now, &mut input);
    assert!(input.is_empty());
    let mut evs: Vec<Event> = evs
        .into_iter()
        .chain(std::iter::from_fn(|| p.b.poll_event()))
        .collect();
    assert_eq!(data_of(&mut evs, ch), bulk);
}

/// Data of several channels in one read: each channel's bytes arrive whole and in order,
/// whichever of them takes the read buffer.
#[test]
fn interleaved_channels_in_one_read_each_arrive_whole() {
    let mut p = Pair::established();
    let (x, y, chat) = (
        p.open(ChannelKind::Exec),
        p.open(ChannelKind::Exec),
        p.open(ChannelKind::Chat),
    );
    let data = |seed: usize, n: usize| -> Vec<u8> { (0..n).map(|i| (i * seed) as u8).collect() };
    let (mut want_x, mut want_y) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let dx = data(3 + round, MAX_FRAME_DATA / 2 + round);
        let dy = data(7 + round, 1000 + round);
        assert_eq!(p.a.send(p.now, x, &dx).unwrap(), dx.len());
        assert!(p.a.send_message(p.now, chat, b"hi").unwrap());
        assert_eq!(p.a.send(p.now, y, &dy).unwrap(), dy.len());
        want_x.extend(dx);
        want_y.extend(dy);
    }
    let mut input = read_buffer(&a_records(&mut p));
    p.b.handle_input_buf(p.now, &mut input);
    let mut evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(closed_reason(&evs).is_none(), "{evs:?}");
    assert_eq!(data_of(&mut evs, x), want_x);
    assert_eq!(data_of(&mut evs, y), want_y);
    assert_eq!(data_of(&mut evs, chat), b"hihihi");
}

/// A record that fails authentication in the middle of a read leaves the data lined up
/// before it intact (its plaintext is written over the last bytes of that data, and ring
/// zeroes what it wrote on failure): the application gets exactly the authentic bytes, then
/// the close.
#[test]
fn a_forged_record_after_lined_up_data_leaves_that_data_intact() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let bulk: Vec<u8> = (0..3 * MAX_FRAME_DATA)
        .map(|i| (i % 253) as u8 | 1)
        .collect();
    assert_eq!(p.a.send(p.now, ch, &bulk).unwrap(), bulk.len());
    let mut records = a_records(&mut p);
    let n = records.len();
    records[n - 20] ^= 0x40; // in the last record's ciphertext
    let mut input = read_buffer(&records);
    p.b.handle_input_buf(p.now, &mut input);
    let mut evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
    assert!(
        closed_reason(&evs).is_some(),
        "the forgery was not detected"
    );
    assert_eq!(data_of(&mut evs, ch), bulk[..2 * MAX_FRAME_DATA]);
}

#[test]
fn records_split_anywhere_across_inputs_are_reassembled() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let bulk: Vec<u8> = (0..2 * MAX_FRAME_DATA + 77)
        .map(|i| (i * 7) as u8)
        .collect();
    let mut got = Vec::new();
    let steps = [1usize, 3, 4, 5, 4097, 16_400, 40_000];
    // Through `handle_input`, then through one read buffer kept as the TCP driver keeps it.
    for via_buf in [false, true] {
        let mut buf = Vec::with_capacity(MAX_DATA_EVENT);
        // Cut points before, inside and after the 4-byte length prefixes and the bodies.
        for (round, step) in steps.into_iter().enumerate() {
            assert_eq!(p.a.send(p.now, ch, &bulk).unwrap(), bulk.len());
            let input = a_records(&mut p);
            for chunk in input.chunks(step) {
                if via_buf {
                    buf.extend_from_slice(chunk);
                    p.b.handle_input_buf(p.now, &mut buf);
                } else {
                    p.b.handle_input(p.now, chunk);
                }
            }
            let mut evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
            assert!(closed_reason(&evs).is_none(), "round {round}: {evs:?}");
            got.extend(data_of(&mut evs, ch));
            p.b.consumed(p.now, ch, bulk.len());
            p.run();
        }
    }
    assert_eq!(got, bulk.repeat(2 * steps.len()));
}

/// A full read from a command's pipe, from stdin or from a forwarded connection (with the
/// message header where there is one) fills whole records: no short record trails every
/// message.
#[test]
fn a_full_read_goes_out_in_full_records_only() {
    use qssh::app::bulk::{RecordReads, BULK_READ_CHUNK, RECORDS_PER_READ};
    use qssh::app::{forward::FORWARD_READ_CHUNK, shell::STDIN_READ_CHUNK};
    use qssh::core::service::{Stream, MSG_HEADER};
    for (len, records) in [
        (MSG_HEADER + STDIN_READ_CHUNK, RECORDS_PER_READ),
        (FORWARD_READ_CHUNK, 1),
    ] {
        let mut p = Pair::established();
        let ch = p.open(ChannelKind::Exec);
        let data = vec![7u8; len];
        assert_eq!(p.a.send(p.now, ch, &data).unwrap(), len);
        let sent = std::iter::from_fn(|| p.a.poll_transmit(p.now)).count();
        assert_eq!(sent, records, "a read of {len} bytes");
    }
    // Pipes and stdin: read straight into records.
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let mut reads = RecordReads::new(Stream::Stdout);
    let mut recs: VecDeque<Vec<u8>> = reads.filled(BULK_READ_CHUNK).into();
    assert_eq!(
        p.a.send_records(p.now, ch, &mut recs).unwrap(),
        MSG_HEADER + BULK_READ_CHUNK
    );
    let sent = std::iter::from_fn(|| p.a.poll_transmit(p.now)).count();
    assert_eq!(sent, RECORDS_PER_READ);
}

/// `len` bytes of `ch`'s data read into record buffers from A's spares, as a reader does.
fn records_of(p: &mut Pair, data: &[u8]) -> VecDeque<Vec<u8>> {
    data.chunks(MAX_FRAME_DATA)
        .map(|chunk| {
            let mut rec = p.a.record_buffer();
            assert_eq!(rec.len(), DATA_RECORD_HEAD + MAX_FRAME_DATA);
            rec.truncate(DATA_RECORD_HEAD + chunk.len());
            rec[DATA_RECORD_HEAD..].copy_from_slice(chunk);
            rec
        })
        .collect()
}

#[test]
fn data_read_into_records_is_sealed_where_it_lies_after_frames_queued_before() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let bulk: Vec<u8> = (0..3 * MAX_FRAME_DATA + 999)
        .map(|i| (i % 251) as u8)
        .collect();
    // Written records come back from the driver and are read into again.
    for round in 0..3 {
        p.a.send(p.now, ch, b"before").unwrap();
        let mut recs = records_of(&mut p, &bulk);
        let places: Vec<*const u8> = recs.iter().map(|r| r.as_ptr()).collect();
        assert_eq!(p.a.send_records(p.now, ch, &mut recs).unwrap(), bulk.len());
        assert!(recs.is_empty());
        let out: Vec<Vec<u8>> = std::iter::from_fn(|| p.a.poll_transmit(p.now)).collect();
        // The small record with the earlier frames, then one record per buffer, in place.
        assert_eq!(out.len(), 1 + places.len(), "round {round}");
        let sealed: Vec<*const u8> = out[1..].iter().map(|r| r.as_ptr()).collect();
        assert_eq!(sealed, places, "round {round}: records were copied");
        for rec in &out {
            p.b.handle_input(p.now, rec);
        }
        let mut evs: Vec<Event> = std::iter::from_fn(|| p.b.poll_event()).collect();
        let mut expect = b"before".to_vec();
        expect.extend_from_slice(&bulk);
        assert_eq!(data_of(&mut evs, ch), expect, "round {round}");
        for rec in out {
            p.a.recycle_record(rec);
        }
        p.b.consumed(p.now, ch, expect.len());
        p.run();
    }
}

#[test]
fn records_read_in_place_cross_dh_and_pq_ratchet_steps() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let gap = DH_RATCHET_MIN_INTERVAL + Duration::from_millis(5);
    let mut expect_b = Vec::new();
    for i in 0..(4 * PQ_RATCHET_EVERY_STEPS + 4) as usize {
        let data: Vec<u8> = (0..MAX_FRAME_DATA + 17 * i)
            .map(|j| (i + j) as u8)
            .collect();
        let mut recs = records_of(&mut p, &data);
        assert_eq!(p.a.send_records(p.now, ch, &mut recs).unwrap(), data.len());
        expect_b.extend_from_slice(&data);
        p.run();
        p.advance(gap);
        // B answers, so A's next record steps the ratchet (and carries KEM fields at times).
        p.b.send(p.now, ch, b"ack").unwrap();
        p.run();
        p.advance(gap);
        p.b.consumed(p.now, ch, data.len());
        p.run();
    }
    assert_eq!(data_of(&mut p.b_ev, ch), expect_b);
    let ra = p.a.ratchet_stats().unwrap();
    assert!(ra.pq_steps_completed >= 2, "{ra:?}");
}

#[test]
fn a_window_ending_inside_a_record_takes_its_share_and_keeps_the_rest_in_place() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    let window = CHANNEL_WINDOW as usize;
    // More than the window, so that it ends 1000 bytes into a record.
    let data: Vec<u8> = (0..window + MAX_FRAME_DATA)
        .map(|i| (i % 253) as u8)
        .collect();
    let mut recs = records_of(&mut p, &data);
    let all = recs.len();
    assert_eq!(p.a.send_records(p.now, ch, &mut recs).unwrap(), window);
    assert_eq!(p.a.send_window(ch), 0);
    let rest = data.len() - window;
    assert_eq!(
        recs.iter()
            .map(|r| r.len() - DATA_RECORD_HEAD)
            .sum::<usize>(),
        rest
    );
    assert!(recs.len() < all);
    // Nothing more goes while the window is shut.
    assert_eq!(p.a.send_records(p.now, ch, &mut recs).unwrap(), 0);
    p.run();
    assert_eq!(data_of(&mut p.b_ev, ch), data[..window]);
    p.b.consumed(p.now, ch, window);
    p.run();
    assert_eq!(p.a.send_records(p.now, ch, &mut recs).unwrap(), rest);
    assert!(recs.is_empty());
    p.run();
    assert_eq!(data_of(&mut p.b_ev, ch), data[window..]);
}

#[test]
fn record_buffers_are_checked_reused_and_bounded() {
    let mut p = Pair::established();
    let ch = p.open(ChannelKind::Exec);
    // A buffer without room for the headers, or with more than a frame of data, is refused
    // before anything is sent.
    for len in [DATA_RECORD_HEAD - 1, DATA_RECORD_HEAD + MAX_FRAME_DATA + 1] {
        let mut good = p.a.record_buffer();
        good.truncate(DATA_RECORD_HEAD + 10);
        let mut bad = new_record_buffer();
        bad.resize(len, 0);
        let mut recs = VecDeque::from([good, bad]);
        assert!(p.a.send_records(p.now, ch, &mut recs).is_err());
        assert_eq!(recs.len(), 2);
        assert!(p.a.poll_transmit(p.now).is_none());
    }
    // An empty one is skipped, and kept for the next read.
    let mut empty = new_record_buffer();
    empty.truncate(DATA_RECORD_HEAD);
    let place = empty.as_ptr();
    assert_eq!(
        p.a.send_records(p.now, ch, &mut VecDeque::from([empty]))
            .unwrap(),
        0
    );
    assert!(p.a.poll_transmit(p.now).is_none());
    let again = p.a.record_buffer();
    assert_eq!(again.as_ptr(), place);
    // Spares: at most MAX_SPARE_RECORDS, only of RECORD_CAPACITY, used newest first, also
    // for records of frames sent by copy.
    p.a.recycle_record(Vec::with_capacity(1024));
    let spares: Vec<Vec<u8>> = (0..MAX_SPARE_RECORDS + 3)
        .map(|_| new_record_buffer())
        .collect();
    let kept: Vec<*const u8> = spares[..MAX_SPARE_RECORDS]
        .iter()
        .map(|r| r.as_ptr())
        .collect();
    for rec in spares {
        p.a.recycle_record(rec);
    }
    p.a.send(p.now, ch, b"by copy").unwrap();
    let rec = p.a.poll_transmit(p.now).unwrap();
    assert_eq!(rec.as_ptr(), kept[MAX_SPARE_RECORDS - 1]);
    assert!(is_record_buffer(&rec));
    let mut taken = vec![rec];
    for i in (0..MAX_SPARE_RECORDS - 1).rev() {
        let buf = p.a.record_buffer();
        assert_eq!(buf.as_ptr(), kept[i]);
        assert_eq!(buf.capacity(), RECORD_CAPACITY);
        taken.push(buf);
    }
    // Then new ones (the kept ones are still in use, so a new one is elsewhere).
    let fresh = p.a.record_buffer();
    assert!(!kept.contains(&fresh.as_ptr()));
}
