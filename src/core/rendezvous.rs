//! Wire formats of the UDP side of qssh (NAT traversal): the first-byte demultiplexing map,
//! address candidates, the rendezvous/relay control messages and the punch probes. Codecs
//! only; the relay's state machine is [`super::relay`], the drivers are in `net/`.
//!
//! One UDP socket carries STUN, QUIC, punch probes, relay traffic and VPN datagrams; the first
//! byte of every UDP payload says which (RFC 7983 / RFC 9443 style, byte-exact in
//! `docs/nat-traversal.md`):
//!
//! | first byte | what |
//! |---|---|
//! | 0x00–0x03 | STUN (RFC 8489: the two top bits of a STUN message are zero) |
//! | 0x05 | DATAGRAM record (`core::datagram`) |
//! | 0x08 | PUNCH probe / acknowledgement / path keepalive |
//! | 0x0A | RELAY_CTRL: registration, lookup, introductions |
//! | 0x0B | RELAY_DATA: an opaque packet relayed between the two ends of a slot |
//! | 0x40–0x7F | QUIC short header (fixed bit set; we never negotiate greasing it) |
//! | 0xC0–0xFF | QUIC long header |
//!
//! Everything else is dropped. Our types sit in 4–15, which RFC 7983 leaves unassigned and
//! which neither STUN, DTLS (20–63), TURN channels (64–79) nor QUIC can start with.

use super::codec::{DecodeError, Reader, Writer};
use super::identity::{
    PeerId, MAX_PUBLIC_KEY as MAX_PUBLIC_KEY_WIRE, MAX_SIGNATURE as MAX_SIGNATURE_WIRE,
};
use super::limits::{MAX_CANDIDATES, MAX_RELAY_ERROR_TEXT as MAX_ALERT_TEXT};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// First-byte values of qssh's own UDP messages.
pub mod udp_type {
    /// `core::datagram` records (VPN packets).
    pub const DATAGRAM: u8 = 0x05;
    /// Punch probes and direct-path keepalives.
    pub const PUNCH: u8 = 0x08;
    /// Control messages between a peer and a relay.
    pub const RELAY_CTRL: u8 = 0x0A;
    /// A packet relayed between the two ends of a relay slot.
    pub const RELAY_DATA: u8 = 0x0B;
}

/// What a UDP payload is, from its first byte alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpKind {
    Stun,
    Datagram,
    Punch,
    RelayCtrl,
    RelayData,
    Quic,
    Unknown,
}

/// Classifies a UDP payload by its first byte (see the module table).
pub fn classify(payload: &[u8]) -> UdpKind {
    match payload.first() {
        None => UdpKind::Unknown,
        Some(0x00..=0x03) => UdpKind::Stun,
        Some(&udp_type::DATAGRAM) => UdpKind::Datagram,
        Some(&udp_type::PUNCH) => UdpKind::Punch,
        Some(&udp_type::RELAY_CTRL) => UdpKind::RelayCtrl,
        Some(&udp_type::RELAY_DATA) => UdpKind::RelayData,
        Some(0x40..=0x7F) | Some(0xC0..=0xFF) => UdpKind::Quic,
        Some(_) => UdpKind::Unknown,
    }
}

/// How a candidate address was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    /// An address of a local interface.
    Host = 1,
    /// The NAT mapping seen by a STUN server or by the relay (server-reflexive).
    ServerReflexive = 2,
}

impl CandidateKind {
    fn from_wire(b: u8) -> Result<Self, DecodeError> {
        match b {
            1 => Ok(CandidateKind::Host),
            2 => Ok(CandidateKind::ServerReflexive),
            _ => Err(DecodeError::Invalid("candidate kind")),
        }
    }
}

/// A transport address a peer may be reachable at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

/// `family u8 (4|6) | ip (4|16) | port u16`.
pub fn encode_addr(w: &mut Writer<'_>, addr: SocketAddr) {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => w.u8(4).bytes(&ip.octets()),
        IpAddr::V6(ip) => w.u8(6).bytes(&ip.octets()),
    };
    w.u16(addr.port());
}

pub fn decode_addr(r: &mut Reader<'_>) -> Result<SocketAddr, DecodeError> {
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        _ => return Err(DecodeError::Invalid("address family")),
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}

/// `count u8 (≤ MAX_CANDIDATES) | count × (kind u8 | addr)`.
pub fn encode_candidates(w: &mut Writer<'_>, cands: &[Candidate]) {
    let n = cands.len().min(MAX_CANDIDATES);
    w.u8(n as u8);
    for c in &cands[..n] {
        w.u8(c.kind as u8);
        encode_addr(w, c.addr);
    }
}

pub fn decode_candidates(r: &mut Reader<'_>) -> Result<Vec<Candidate>, DecodeError> {
    let n = r.u8()? as usize;
    if n > MAX_CANDIDATES {
        return Err(DecodeError::TooLong(n, MAX_CANDIDATES));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = CandidateKind::from_wire(r.u8()?)?;
        out.push(Candidate {
            kind,
            addr: decode_addr(r)?,
        });
    }
    Ok(out)
}

/// The candidates' wire form alone (what a registration signs).
pub fn candidates_bytes(cands: &[Candidate]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_candidates(&mut Writer::new(&mut v), cands);
    v
}

/// Length of a relay cookie.
pub const COOKIE_LEN: usize = 32;
/// Length of a HELLO nonce.
pub const NONCE_LEN: usize = 16;
/// A HELLO is padded to this many bytes, at least the size of the COOKIE it asks for, so the
/// relay never answers an unverified source with more bytes than it received.
pub const HELLO_LEN: usize = 72;
/// Length of a slot's punch key.
pub const PUNCH_KEY_LEN: usize = 32;

/// Relay control message kinds (second byte after [`udp_type::RELAY_CTRL`]).
pub mod ctrl_kind {
    pub const HELLO: u8 = 1;
    pub const COOKIE: u8 = 2;
    pub const REGISTER: u8 = 3;
    pub const REGISTERED: u8 = 4;
    pub const CONNECT: u8 = 5;
    pub const CONNECT_OK: u8 = 6;
    pub const INCOMING: u8 = 7;
    pub const ERROR: u8 = 8;
}

/// Error codes in [`Ctrl::Error`].
pub mod error_code {
    /// The cookie is wrong or expired: send HELLO again.
    pub const BAD_COOKIE: u8 = 1;
    /// The registration's signature does not verify under its key.
    pub const BAD_SIGNATURE: u8 = 2;
    /// No registration under that peer ID.
    pub const UNKNOWN_PEER: u8 = 3;
    /// A relay limit was reached.
    pub const LIMIT: u8 = 4;
}

/// A relay control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ctrl {
    /// Peer → relay: asks for a cookie (return-routability check).
    Hello { nonce: [u8; NONCE_LEN] },
    /// Relay → peer: the cookie for the source address, and that address as the relay saw it.
    Cookie {
        nonce: [u8; NONCE_LEN],
        cookie: [u8; COOKIE_LEN],
        observed: SocketAddr,
    },
    /// Listener → relay: register (or refresh) under the peer ID of `public_key`, signed.
    Register {
        cookie: [u8; COOKIE_LEN],
        alg: u8,
        public_key: Vec<u8>,
        candidates: Vec<Candidate>,
        signature: Vec<u8>,
    },
    /// Relay → listener: registered for `ttl_secs`.
    Registered {
        peer: PeerId,
        ttl_secs: u16,
        observed: SocketAddr,
    },
    /// Connector → relay: introduce me to `target`.
    Connect {
        cookie: [u8; COOKIE_LEN],
        target: PeerId,
        candidates: Vec<Candidate>,
    },
    /// Relay → connector: the listener's candidates, the slot and its punch key; also the
    /// start signal for punching.
    ConnectOk {
        target: PeerId,
        slot: u64,
        punch_key: [u8; PUNCH_KEY_LEN],
        candidates: Vec<Candidate>,
    },
    /// Relay → listener: a connector's candidates, the slot and its punch key; also the
    /// start signal for punching.
    Incoming {
        slot: u64,
        punch_key: [u8; PUNCH_KEY_LEN],
        candidates: Vec<Candidate>,
    },
    /// Relay → peer: a request failed.
    Error { code: u8, reason: String },
}

impl Ctrl {
    /// The full UDP payload (first byte included).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(128);
        let mut w = Writer::new(&mut v);
        w.u8(udp_type::RELAY_CTRL);
        match self {
            Ctrl::Hello { nonce } => {
                w.u8(ctrl_kind::HELLO).bytes(nonce);
                let pad = HELLO_LEN - 2 - NONCE_LEN;
                w.bytes(&[0u8; HELLO_LEN][..pad]);
            }
            Ctrl::Cookie {
                nonce,
                cookie,
                observed,
            } => {
                w.u8(ctrl_kind::COOKIE).bytes(nonce).bytes(cookie);
                encode_addr(&mut w, *observed);
            }
            Ctrl::Register {
                cookie,
                alg,
                public_key,
                candidates,
                signature,
            } => {
                w.u8(ctrl_kind::REGISTER).bytes(cookie).u8(*alg);
                w.vec16(public_key);
                encode_candidates(&mut w, candidates);
                w.vec16(signature);
            }
            Ctrl::Registered {
                peer,
                ttl_secs,
                observed,
            } => {
                w.u8(ctrl_kind::REGISTERED)
                    .bytes(peer.as_bytes())
                    .u16(*ttl_secs);
                encode_addr(&mut w, *observed);
            }
            Ctrl::Connect {
                cookie,
                target,
                candidates,
            } => {
                w.u8(ctrl_kind::CONNECT)
                    .bytes(cookie)
                    .bytes(target.as_bytes());
                encode_candidates(&mut w, candidates);
            }
            Ctrl::ConnectOk {
                target,
                slot,
                punch_key,
                candidates,
            } => {
                w.u8(ctrl_kind::CONNECT_OK)
                    .bytes(target.as_bytes())
                    .u64(*slot)
                    .bytes(punch_key);
                encode_candidates(&mut w, candidates);
            }
            Ctrl::Incoming {
                slot,
                punch_key,
                candidates,
            } => {
                w.u8(ctrl_kind::INCOMING).u64(*slot).bytes(punch_key);
                encode_candidates(&mut w, candidates);
            }
            Ctrl::Error { code, reason } => {
                let mut end = reason.len().min(MAX_ALERT_TEXT);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                w.u8(ctrl_kind::ERROR)
                    .u8(*code)
                    .vec16(&reason.as_bytes()[..end]);
            }
        }
        v
    }

    /// Parses a full UDP payload; anything but an exact message is refused.
    pub fn decode(payload: &[u8]) -> Result<Ctrl, DecodeError> {
        let mut r = Reader::new(payload);
        if r.u8()? != udp_type::RELAY_CTRL {
            return Err(DecodeError::Invalid("relay control type"));
        }
        let msg = match r.u8()? {
            ctrl_kind::HELLO => {
                let nonce = r.array()?;
                let pad = r.take(HELLO_LEN - 2 - NONCE_LEN)?;
                if pad.iter().any(|&b| b != 0) {
                    return Err(DecodeError::Invalid("hello padding"));
                }
                Ctrl::Hello { nonce }
            }
            ctrl_kind::COOKIE => Ctrl::Cookie {
                nonce: r.array()?,
                cookie: r.array()?,
                observed: decode_addr(&mut r)?,
            },
            ctrl_kind::REGISTER => Ctrl::Register {
                cookie: r.array()?,
                alg: r.u8()?,
                public_key: r.vec16(MAX_PUBLIC_KEY_WIRE)?.to_vec(),
                candidates: decode_candidates(&mut r)?,
                signature: r.vec16(MAX_SIGNATURE_WIRE)?.to_vec(),
            },
            ctrl_kind::REGISTERED => Ctrl::Registered {
                peer: PeerId(r.array()?),
                ttl_secs: r.u16()?,
                observed: decode_addr(&mut r)?,
            },
            ctrl_kind::CONNECT => Ctrl::Connect {
                cookie: r.array()?,
                target: PeerId(r.array()?),
                candidates: decode_candidates(&mut r)?,
            },
            ctrl_kind::CONNECT_OK => Ctrl::ConnectOk {
                target: PeerId(r.array()?),
                slot: r.u64()?,
                punch_key: r.array()?,
                candidates: decode_candidates(&mut r)?,
            },
            ctrl_kind::INCOMING => Ctrl::Incoming {
                slot: r.u64()?,
                punch_key: r.array()?,
                candidates: decode_candidates(&mut r)?,
            },
            ctrl_kind::ERROR => {
                let code = r.u8()?;
                let reason = String::from_utf8_lossy(r.vec16(MAX_ALERT_TEXT)?).into_owned();
                Ctrl::Error { code, reason }
            }
            _ => return Err(DecodeError::Invalid("relay control kind")),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// RELAY_DATA header: `0x0B | slot u64`, then the opaque packet.
pub const RELAY_DATA_HEADER: usize = 9;

/// Wraps `packet` for the relay slot `slot`.
pub fn encode_relay_data(slot: u64, packet: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RELAY_DATA_HEADER + packet.len());
    v.push(udp_type::RELAY_DATA);
    v.extend_from_slice(&slot.to_be_bytes());
    v.extend_from_slice(packet);
    v
}

/// Splits a RELAY_DATA payload into slot and packet.
pub fn decode_relay_data(payload: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    if payload.len() < RELAY_DATA_HEADER {
        return Err(DecodeError::Truncated);
    }
    if payload[0] != udp_type::RELAY_DATA {
        return Err(DecodeError::Invalid("relay data type"));
    }
    let slot = u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"));
    Ok((slot, &payload[RELAY_DATA_HEADER..]))
}

/// Punch probe kinds.
pub mod punch_kind {
    /// "Can you hear me on this path?" (also the direct path's keepalive).
    pub const PING: u8 = 1;
    /// The answer, sent to the address the PING came from.
    pub const PONG: u8 = 2;
}

/// Length of the truncated HMAC on a punch probe.
pub const PUNCH_MAC_LEN: usize = 16;
/// A punch probe: `0x08 | kind u8 | slot u64 | txid u64 | mac[16]`, 34 bytes.
pub const PUNCH_LEN: usize = 2 + 8 + 8 + PUNCH_MAC_LEN;

/// A punch probe, authenticated with the slot's punch key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Punch {
    pub kind: u8,
    pub slot: u64,
    pub txid: u64,
}

impl Punch {
    pub fn encode(&self, key: &[u8; PUNCH_KEY_LEN]) -> Vec<u8> {
        let mut v = Vec::with_capacity(PUNCH_LEN);
        Writer::new(&mut v)
            .u8(udp_type::PUNCH)
            .u8(self.kind)
            .u64(self.slot)
            .u64(self.txid);
        let mac = super::crypto::hmac_sha256(key, &[super::labels::PUNCH_MAC, &v]);
        v.extend_from_slice(&mac[..PUNCH_MAC_LEN]);
        v
    }

    /// The slot a probe claims, before authentication (to find the key).
    pub fn peek_slot(payload: &[u8]) -> Option<u64> {
        (payload.len() == PUNCH_LEN && payload[0] == udp_type::PUNCH)
            .then(|| u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes")))
    }

    /// Parses and authenticates a probe under `key`.
    pub fn decode(payload: &[u8], key: &[u8; PUNCH_KEY_LEN]) -> Result<Punch, DecodeError> {
        if payload.len() != PUNCH_LEN {
            return Err(DecodeError::Invalid("punch length"));
        }
        let (body, mac) = payload.split_at(PUNCH_LEN - PUNCH_MAC_LEN);
        let want = super::crypto::hmac_sha256(key, &[super::labels::PUNCH_MAC, body]);
        if !super::crypto::ct_eq(&want[..PUNCH_MAC_LEN], mac) {
            return Err(DecodeError::Invalid("punch mac"));
        }
        let mut r = Reader::new(body);
        r.u8()?;
        let kind = r.u8()?;
        if kind != punch_kind::PING && kind != punch_kind::PONG {
            return Err(DecodeError::Invalid("punch kind"));
        }
        Ok(Punch {
            kind,
            slot: r.u64()?,
            txid: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr_strategy() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| { SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p) }),
        ]
        .prop_map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
    }

    fn cands() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec(
            (prop::bool::ANY, addr_strategy()).prop_map(|(h, addr)| Candidate {
                kind: if h {
                    CandidateKind::Host
                } else {
                    CandidateKind::ServerReflexive
                },
                addr,
            }),
            0..=MAX_CANDIDATES,
        )
    }

    fn ctrl() -> impl Strategy<Value = Ctrl> {
        prop_oneof![
            any::<[u8; 16]>().prop_map(|nonce| Ctrl::Hello { nonce }),
            (any::<[u8; 16]>(), any::<[u8; 32]>(), addr_strategy()).prop_map(
                |(nonce, cookie, observed)| Ctrl::Cookie {
                    nonce,
                    cookie,
                    observed
                }
            ),
            (
                any::<[u8; 32]>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                cands(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(cookie, alg, public_key, candidates, signature)| {
                    Ctrl::Register {
                        cookie,
                        alg,
                        public_key,
                        candidates,
                        signature,
                    }
                }),
            (any::<[u8; 32]>(), any::<u16>(), addr_strategy()).prop_map(
                |(p, ttl_secs, observed)| {
                    Ctrl::Registered {
                        peer: PeerId(p),
                        ttl_secs,
                        observed,
                    }
                }
            ),
            (any::<[u8; 32]>(), any::<[u8; 32]>(), cands()).prop_map(|(cookie, t, candidates)| {
                Ctrl::Connect {
                    cookie,
                    target: PeerId(t),
                    candidates,
                }
            }),
            (any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>(), cands()).prop_map(
                |(t, slot, punch_key, candidates)| Ctrl::ConnectOk {
                    target: PeerId(t),
                    slot,
                    punch_key,
                    candidates
                }
            ),
            (any::<u64>(), any::<[u8; 32]>(), cands()).prop_map(|(slot, punch_key, candidates)| {
                Ctrl::Incoming {
                    slot,
                    punch_key,
                    candidates,
                }
            }),
            (any::<u8>(), "[a-z ]{0,40}").prop_map(|(code, reason)| Ctrl::Error { code, reason }),
        ]
    }

    proptest! {
        #[test]
        fn ctrl_round_trip(m in ctrl()) {
            let wire = m.encode();
            prop_assert_eq!(classify(&wire), UdpKind::RelayCtrl);
            prop_assert_eq!(Ctrl::decode(&wire).unwrap(), m);
            // Any truncation or extension is refused.
            prop_assert!(Ctrl::decode(&wire[..wire.len() - 1]).is_err());
            let mut longer = wire.clone();
            longer.push(0);
            prop_assert!(Ctrl::decode(&longer).is_err());
        }

        #[test]
        fn ctrl_decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Ctrl::decode(&data);
            let _ = decode_relay_data(&data);
            let _ = Punch::decode(&data, &[7; 32]);
        }

        #[test]
        fn punch_round_trip(kind in 1u8..=2, slot in any::<u64>(), txid in any::<u64>(), key in any::<[u8; 32]>()) {
            let p = Punch { kind, slot, txid };
            let wire = p.encode(&key);
            prop_assert_eq!(wire.len(), PUNCH_LEN);
            prop_assert_eq!(classify(&wire), UdpKind::Punch);
            prop_assert_eq!(Punch::peek_slot(&wire), Some(slot));
            prop_assert_eq!(Punch::decode(&wire, &key).unwrap(), p);
            let mut other = key;
            other[0] ^= 1;
            prop_assert!(Punch::decode(&wire, &other).is_err());
        }
    }

    #[test]
    fn hello_is_padded_to_the_cookie_size() {
        let hello = Ctrl::Hello { nonce: [1; 16] }.encode();
        assert_eq!(hello.len(), HELLO_LEN);
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        let cookie = Ctrl::Cookie {
            nonce: [1; 16],
            cookie: [2; 32],
            observed: v6,
        }
        .encode();
        assert!(cookie.len() <= HELLO_LEN, "{}", cookie.len());
    }

    #[test]
    fn every_bit_of_a_punch_is_authenticated() {
        let key = [9u8; 32];
        let wire = Punch {
            kind: punch_kind::PING,
            slot: 77,
            txid: 5,
        }
        .encode(&key);
        for i in 0..wire.len() * 8 {
            let mut w = wire.clone();
            w[i / 8] ^= 1 << (i % 8);
            assert!(Punch::decode(&w, &key).is_err(), "bit {i}");
        }
    }

    #[test]
    fn first_byte_map_has_no_overlap() {
        // STUN's first byte (two zero bits then the top of the method) is 0..=3.
        for b in 0u8..=3 {
            assert_eq!(classify(&[b]), UdpKind::Stun);
        }
        // QUIC with the fixed bit set.
        for b in 0x40u8..=0x7F {
            assert_eq!(classify(&[b]), UdpKind::Quic);
        }
        for b in 0xC0u8..=0xFF {
            assert_eq!(classify(&[b]), UdpKind::Quic);
        }
        for (b, k) in [
            (udp_type::DATAGRAM, UdpKind::Datagram),
            (udp_type::PUNCH, UdpKind::Punch),
            (udp_type::RELAY_CTRL, UdpKind::RelayCtrl),
            (udp_type::RELAY_DATA, UdpKind::RelayData),
        ] {
            assert_eq!(classify(&[b]), k);
            assert!((4..=15).contains(&b));
        }
        assert_eq!(classify(&[]), UdpKind::Unknown);
        assert_eq!(classify(&[0x20]), UdpKind::Unknown);
        assert_eq!(classify(&[0x80]), UdpKind::Unknown);
    }
}
