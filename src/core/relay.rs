//! The rendezvous and relay peer, sans-IO: registrations signed by the listener's identity,
//! introductions with a start signal for simultaneous punching, and relaying of opaque
//! (end-to-end encrypted) packets between the two ends of a slot, under per-source and
//! per-slot limits.
//!
//! Calling order: [`RelayServer::handle`] for every UDP payload of type RELAY_CTRL or
//! RELAY_DATA with its source address (answers are appended to `out`), and
//! [`RelayServer::expire`] at least once per second.
//!
//! What the relay learns: peer IDs and public keys of listeners, candidate addresses, and the
//! size and timing of relayed packets. What it never has: any session key — the packets it
//! relays are QUIC packets whose payload is qssh records sealed by the end-to-end ratchet.

use super::crypto::{ct_eq, hmac_sha256, random_array, SecureRandom};
use super::identity::{Algorithm, PeerId, PublicIdentity};
use super::labels::{RELAY_COOKIE, SIGN_RELAY_REGISTRATION};
use super::limits::{
    COOKIE_PERIOD, MAX_REGISTRATIONS, MAX_RELAY_PACKET, MAX_RELAY_TRACKED_SOURCES, MAX_SLOTS,
    MAX_SLOTS_PER_PEER, REGISTRATION_TTL, RELAY_BYTES_BURST, RELAY_BYTES_PER_SEC,
    RELAY_CTRL_BURST_PER_IP, RELAY_CTRL_PER_IP_PER_SEC, RELAY_PACKETS_BURST, RELAY_PACKETS_PER_SEC,
    SLOT_IDLE_TIMEOUT,
};
use super::rendezvous::{
    candidates_bytes, decode_relay_data, encode_addr, Candidate, CandidateKind, Ctrl, UdpKind,
    COOKIE_LEN, PUNCH_KEY_LEN,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The message a listener signs to register: `cookie || candidates` (wire form), under the
/// context [`SIGN_RELAY_REGISTRATION`]. The cookie binds it to this relay, to the listener's
/// source address and to a cookie period, so a captured registration is useless elsewhere.
pub fn registration_message(cookie: &[u8; COOKIE_LEN], candidates: &[Candidate]) -> Vec<u8> {
    let mut m = cookie.to_vec();
    m.extend_from_slice(&candidates_bytes(candidates));
    m
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant, burst: f64) -> Self {
        Bucket {
            tokens: burst,
            at: now,
        }
    }
    fn take(&mut self, now: Instant, rate: f64, burst: f64, n: f64) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub registrations: u64,
    pub bad_cookies: u64,
    pub bad_signatures: u64,
    pub rate_limited: u64,
    pub introductions: u64,
    pub unknown_peer: u64,
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    pub dropped_packets: u64,
    pub malformed: u64,
}

struct Registration {
    addr: SocketAddr,
    candidates: Vec<Candidate>,
    expires: Instant,
    slots: usize,
}

struct Slot {
    listener: PeerId,
    connector: SocketAddr,
    punch_key: [u8; PUNCH_KEY_LEN],
    connector_candidates: Vec<Candidate>,
    last_active: Instant,
    bytes: Bucket,
    packets: Bucket,
}

/// The relay's whole state.
pub struct RelayServer {
    secret: [u8; 32],
    epoch: Instant,
    rng: Box<dyn SecureRandom + Send>,
    regs: HashMap<PeerId, Registration>,
    slots: HashMap<u64, Slot>,
    by_connector: HashMap<(SocketAddr, PeerId), u64>,
    sources: HashMap<IpAddr, Bucket>,
    stats: RelayStats,
}

/// IPv4 address, or the /64 of an IPv6 address: the unit of per-source limits.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl RelayServer {
    pub fn new(now: Instant, mut rng: Box<dyn SecureRandom + Send>) -> Self {
        RelayServer {
            secret: random_array(&mut *rng),
            epoch: now,
            rng,
            regs: HashMap::new(),
            slots: HashMap::new(),
            by_connector: HashMap::new(),
            sources: HashMap::new(),
            stats: RelayStats::default(),
        }
    }

    pub fn stats(&self) -> RelayStats {
        self.stats
    }
    pub fn registrations(&self) -> usize {
        self.regs.len()
    }
    pub fn slots(&self) -> usize {
        self.slots.len()
    }
    /// The address a peer ID is registered from, if any.
    pub fn registered_addr(&self, peer: &PeerId) -> Option<SocketAddr> {
        self.regs.get(peer).map(|r| r.addr)
    }

    fn period(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / COOKIE_PERIOD.as_secs()
    }

    fn cookie_for(&self, from: SocketAddr, period: u64) -> [u8; COOKIE_LEN] {
        let mut a = Vec::with_capacity(19);
        encode_addr(&mut super::codec::Writer::new(&mut a), from);
        hmac_sha256(&self.secret, &[RELAY_COOKIE, &a, &period.to_be_bytes()])
    }

    fn cookie_ok(&self, now: Instant, from: SocketAddr, cookie: &[u8; COOKIE_LEN]) -> bool {
        let p = self.period(now);
        ct_eq(&self.cookie_for(from, p), cookie)
            || (p > 0 && ct_eq(&self.cookie_for(from, p - 1), cookie))
    }

    fn admit_source(&mut self, now: Instant, ip: IpAddr) -> bool {
        let key = rate_key(ip);
        let rate = f64::from(RELAY_CTRL_PER_IP_PER_SEC);
        let burst = f64::from(RELAY_CTRL_BURST_PER_IP);
        if self.sources.len() >= MAX_RELAY_TRACKED_SOURCES && !self.sources.contains_key(&key) {
            // Forget sources whose bucket has refilled; if none has, the oldest.
            self.sources.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if self.sources.len() >= MAX_RELAY_TRACKED_SOURCES {
                if let Some(oldest) = self
                    .sources
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| *k)
                {
                    self.sources.remove(&oldest);
                }
            }
        }
        let b = self
            .sources
            .entry(key)
            .or_insert_with(|| Bucket::full(now, burst));
        b.take(now, rate, burst, 1.0)
    }

    /// Handles one UDP payload from `from`; answers and forwarded packets go to `out`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        payload: &[u8],
        out: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) {
        let from = canonical(from);
        match super::rendezvous::classify(payload) {
            UdpKind::RelayData => self.handle_data(now, from, payload, out),
            UdpKind::RelayCtrl => {
                if !self.admit_source(now, from.ip()) {
                    self.stats.rate_limited += 1;
                    return;
                }
                match Ctrl::decode(payload) {
                    Ok(m) => self.handle_ctrl(now, from, m, out),
                    Err(_) => self.stats.malformed += 1,
                }
            }
            _ => self.stats.malformed += 1,
        }
    }

    fn error(out: &mut Vec<(SocketAddr, Vec<u8>)>, to: SocketAddr, code: u8, reason: &str) {
        out.push((
            to,
            Ctrl::Error {
                code,
                reason: reason.into(),
            }
            .encode(),
        ));
    }

    fn handle_ctrl(
        &mut self,
        now: Instant,
        from: SocketAddr,
        m: Ctrl,
        out: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) {
        use super::rendezvous::error_code::*;
        match m {
            Ctrl::Hello { nonce } => {
                let cookie = self.cookie_for(from, self.period(now));
                out.push((
                    from,
                    Ctrl::Cookie {
                        nonce,
                        cookie,
                        observed: from,
                    }
                    .encode(),
                ));
            }
            Ctrl::Register {
                cookie,
                alg,
                public_key,
                candidates,
                signature,
            } => {
                if !self.cookie_ok(now, from, &cookie) {
                    self.stats.bad_cookies += 1;
                    return Self::error(out, from, BAD_COOKIE, "cookie expired or not yours");
                }
                let Some(alg) = Algorithm::from_id(alg) else {
                    self.stats.bad_signatures += 1;
                    return Self::error(out, from, BAD_SIGNATURE, "unknown algorithm");
                };
                let Ok(public) = PublicIdentity::new(alg, &public_key) else {
                    self.stats.bad_signatures += 1;
                    return Self::error(out, from, BAD_SIGNATURE, "bad public key");
                };
                let msg = registration_message(&cookie, &candidates);
                if !public.verify(SIGN_RELAY_REGISTRATION, &msg, &signature) {
                    self.stats.bad_signatures += 1;
                    return Self::error(
                        out,
                        from,
                        BAD_SIGNATURE,
                        "registration signature does not verify",
                    );
                }
                let peer = public.peer_id();
                if !self.regs.contains_key(&peer) && self.regs.len() >= MAX_REGISTRATIONS {
                    return Self::error(out, from, LIMIT, "relay full");
                }
                let expires = now + REGISTRATION_TTL;
                let reg = self.regs.entry(peer).or_insert(Registration {
                    addr: from,
                    candidates: Vec::new(),
                    expires,
                    slots: 0,
                });
                reg.addr = from;
                reg.candidates = candidates;
                reg.expires = expires;
                self.stats.registrations += 1;
                out.push((
                    from,
                    Ctrl::Registered {
                        peer,
                        ttl_secs: REGISTRATION_TTL.as_secs() as u16,
                        observed: from,
                    }
                    .encode(),
                ));
            }
            Ctrl::Connect {
                cookie,
                target,
                candidates,
            } => {
                if !self.cookie_ok(now, from, &cookie) {
                    self.stats.bad_cookies += 1;
                    return Self::error(out, from, BAD_COOKIE, "cookie expired or not yours");
                }
                let Some(reg) = self.regs.get(&target) else {
                    self.stats.unknown_peer += 1;
                    return Self::error(out, from, UNKNOWN_PEER, "peer is not registered here");
                };
                let (reg_addr, mut listener_cands) = (reg.addr, reg.candidates.clone());
                let reg_slots = reg.slots;
                let slot_id = match self.by_connector.get(&(from, target)) {
                    Some(&id) if self.slots.contains_key(&id) => id,
                    _ => {
                        if self.slots.len() >= MAX_SLOTS || reg_slots >= MAX_SLOTS_PER_PEER {
                            return Self::error(out, from, LIMIT, "too many relayed sessions");
                        }
                        let mut id = u64::from_be_bytes(random_array(&mut *self.rng));
                        while id == 0 || self.slots.contains_key(&id) {
                            id = u64::from_be_bytes(random_array(&mut *self.rng));
                        }
                        let mut cands = candidates;
                        push_reflexive(&mut cands, from);
                        self.slots.insert(
                            id,
                            Slot {
                                listener: target,
                                connector: from,
                                punch_key: random_array(&mut *self.rng),
                                connector_candidates: cands,
                                last_active: now,
                                bytes: Bucket::full(now, RELAY_BYTES_BURST as f64),
                                packets: Bucket::full(now, RELAY_PACKETS_BURST as f64),
                            },
                        );
                        self.by_connector.insert((from, target), id);
                        if let Some(r) = self.regs.get_mut(&target) {
                            r.slots += 1;
                        }
                        id
                    }
                };
                let slot = self.slots.get_mut(&slot_id).expect("slot exists");
                slot.last_active = now;
                push_reflexive(&mut listener_cands, reg_addr);
                self.stats.introductions += 1;
                // Both messages leave together: they are the start signal for punching.
                out.push((
                    from,
                    Ctrl::ConnectOk {
                        target,
                        slot: slot_id,
                        punch_key: slot.punch_key,
                        candidates: listener_cands,
                    }
                    .encode(),
                ));
                out.push((
                    reg_addr,
                    Ctrl::Incoming {
                        slot: slot_id,
                        punch_key: slot.punch_key,
                        candidates: slot.connector_candidates.clone(),
                    }
                    .encode(),
                ));
            }
            // Relay-to-peer messages are not accepted by a relay.
            _ => self.stats.malformed += 1,
        }
    }

    fn handle_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        payload: &[u8],
        out: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) {
        let Ok((slot_id, packet)) = decode_relay_data(payload) else {
            self.stats.malformed += 1;
            return;
        };
        if packet.len() > MAX_RELAY_PACKET {
            self.stats.dropped_packets += 1;
            return;
        }
        let Some(slot) = self.slots.get_mut(&slot_id) else {
            self.stats.dropped_packets += 1;
            return;
        };
        let Some(listener_addr) = self.regs.get(&slot.listener).map(|r| r.addr) else {
            self.stats.dropped_packets += 1;
            return;
        };
        let to = if from == slot.connector {
            listener_addr
        } else if from == listener_addr {
            slot.connector
        } else {
            // Only the two ends of a slot may use it.
            self.stats.dropped_packets += 1;
            return;
        };
        let ok_p = slot.packets.take(
            now,
            RELAY_PACKETS_PER_SEC as f64,
            RELAY_PACKETS_BURST as f64,
            1.0,
        );
        let ok_b = ok_p
            && slot.bytes.take(
                now,
                RELAY_BYTES_PER_SEC as f64,
                RELAY_BYTES_BURST as f64,
                payload.len() as f64,
            );
        if !ok_b {
            self.stats.rate_limited += 1;
            self.stats.dropped_packets += 1;
            return;
        }
        slot.last_active = now;
        self.stats.relayed_packets += 1;
        self.stats.relayed_bytes += packet.len() as u64;
        out.push((to, payload.to_vec()));
    }

    /// Drops registrations that stopped refreshing and idle slots.
    pub fn expire(&mut self, now: Instant) {
        self.regs.retain(|_, r| r.expires > now);
        let regs = &mut self.regs;
        let mut dropped = Vec::new();
        self.slots.retain(|id, s| {
            let keep = regs.contains_key(&s.listener)
                && now.saturating_duration_since(s.last_active) < SLOT_IDLE_TIMEOUT;
            if !keep {
                dropped.push((*id, s.connector, s.listener));
            }
            keep
        });
        for (_, conn, listener) in dropped {
            self.by_connector.remove(&(conn, listener));
            if let Some(r) = self.regs.get_mut(&listener) {
                r.slots = r.slots.saturating_sub(1);
            }
        }
        let rate = f64::from(RELAY_CTRL_PER_IP_PER_SEC);
        let burst = f64::from(RELAY_CTRL_BURST_PER_IP);
        self.sources.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
        });
    }

    /// How often [`RelayServer::expire`] should run.
    pub const EXPIRE_EVERY: Duration = Duration::from_secs(1);
}

/// Adds `addr` as a server-reflexive candidate unless it is already listed (the relay saw it
/// as the packet's source: the mapping this peer's NAT made toward the relay).
fn push_reflexive(cands: &mut Vec<Candidate>, addr: SocketAddr) {
    if cands.iter().any(|c| c.addr == addr) {
        return;
    }
    if cands.len() >= super::limits::MAX_CANDIDATES {
        cands.pop();
    }
    cands.insert(
        0,
        Candidate {
            kind: CandidateKind::ServerReflexive,
            addr,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::crypto::DeterministicRandom;
    use super::super::identity::Identity;
    use super::super::rendezvous::{encode_relay_data, error_code};
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn one(
        relay: &mut RelayServer,
        now: Instant,
        from: SocketAddr,
        m: &[u8],
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        relay.handle(now, from, m, &mut out);
        out
    }

    fn cookie(relay: &mut RelayServer, now: Instant, from: SocketAddr) -> [u8; 32] {
        let out = one(relay, now, from, &Ctrl::Hello { nonce: [3; 16] }.encode());
        match Ctrl::decode(&out[0].1).unwrap() {
            Ctrl::Cookie {
                cookie,
                observed,
                nonce,
            } => {
                assert_eq!((observed, nonce), (from, [3; 16]));
                cookie
            }
            m => panic!("{m:?}"),
        }
    }

    fn register_msg(
        id: &Identity,
        signer: &Identity,
        cookie: [u8; 32],
        cands: &[Candidate],
    ) -> Vec<u8> {
        let mut rng = DeterministicRandom::new(5);
        let sig = signer.sign(
            &mut rng,
            SIGN_RELAY_REGISTRATION,
            &registration_message(&cookie, cands),
        );
        Ctrl::Register {
            cookie,
            alg: id.public().algorithm() as u8,
            public_key: id.public().key().to_vec(),
            candidates: cands.to_vec(),
            signature: sig,
        }
        .encode()
    }

    fn setup() -> (RelayServer, Instant, Identity, Identity) {
        let now = Instant::now();
        let relay = RelayServer::new(now, Box::new(DeterministicRandom::new(1)));
        let mut rng = DeterministicRandom::new(2);
        let a = Identity::generate(Algorithm::Falcon512, &mut rng);
        let b = Identity::generate(Algorithm::Falcon512, &mut rng);
        (relay, now, a, b)
    }

    #[test]
    fn register_connect_relay_and_expire() {
        let (mut relay, now, a, _) = setup();
        let la = addr("198.51.100.1:4000");
        let ca = addr("203.0.113.9:5000");
        let c = cookie(&mut relay, now, la);
        let host = Candidate {
            kind: CandidateKind::Host,
            addr: addr("10.0.0.2:4000"),
        };
        let out = one(&mut relay, now, la, &register_msg(&a, &a, c, &[host]));
        assert!(
            matches!(Ctrl::decode(&out[0].1).unwrap(), Ctrl::Registered { peer, .. } if peer == a.peer_id())
        );
        assert_eq!(relay.registered_addr(&a.peer_id()), Some(la));

        let cc = cookie(&mut relay, now, ca);
        let out = one(
            &mut relay,
            now,
            ca,
            &Ctrl::Connect {
                cookie: cc,
                target: a.peer_id(),
                candidates: vec![],
            }
            .encode(),
        );
        assert_eq!(out.len(), 2);
        let (slot, key) = match Ctrl::decode(&out[0].1).unwrap() {
            Ctrl::ConnectOk {
                slot,
                punch_key,
                candidates,
                ..
            } => {
                // The listener's own candidate and the address the relay saw.
                assert!(candidates.contains(&host));
                assert!(candidates
                    .iter()
                    .any(|c| c.addr == la && c.kind == CandidateKind::ServerReflexive));
                (slot, punch_key)
            }
            m => panic!("{m:?}"),
        };
        assert_eq!(out[1].0, la);
        match Ctrl::decode(&out[1].1).unwrap() {
            Ctrl::Incoming {
                slot: s,
                punch_key,
                candidates,
            } => {
                assert_eq!((s, punch_key), (slot, key));
                assert!(candidates.iter().any(|c| c.addr == ca));
            }
            m => panic!("{m:?}"),
        }
        // A repeated CONNECT (lost answer) gets the same slot.
        let again = one(
            &mut relay,
            now,
            ca,
            &Ctrl::Connect {
                cookie: cc,
                target: a.peer_id(),
                candidates: vec![],
            }
            .encode(),
        );
        assert!(
            matches!(Ctrl::decode(&again[0].1).unwrap(), Ctrl::ConnectOk { slot: s, .. } if s == slot)
        );
        assert_eq!(relay.slots(), 1);

        // Data flows both ways, byte for byte; a third address is ignored.
        let pkt = encode_relay_data(slot, b"\xC0opaque");
        assert_eq!(one(&mut relay, now, ca, &pkt), vec![(la, pkt.clone())]);
        assert_eq!(one(&mut relay, now, la, &pkt), vec![(ca, pkt.clone())]);
        assert!(one(&mut relay, now, addr("192.0.2.66:1"), &pkt).is_empty());
        assert!(one(&mut relay, now, ca, &encode_relay_data(slot ^ 1, b"x")).is_empty());

        // Without refreshes the registration and its slots go away.
        relay.expire(now + REGISTRATION_TTL + Duration::from_secs(1));
        assert_eq!((relay.registrations(), relay.slots()), (0, 0));
        assert!(one(&mut relay, now + REGISTRATION_TTL * 2, ca, &pkt).is_empty());
    }

    #[test]
    fn nobody_registers_another_peers_id() {
        let (mut relay, now, a, b) = setup();
        let from = addr("198.51.100.7:1");
        let c = cookie(&mut relay, now, from);
        // A's key, B's signature.
        let out = one(&mut relay, now, from, &register_msg(&a, &b, c, &[]));
        assert!(matches!(
            Ctrl::decode(&out[0].1).unwrap(),
            Ctrl::Error {
                code: error_code::BAD_SIGNATURE,
                ..
            }
        ));
        assert_eq!(relay.registrations(), 0);
        assert_eq!(relay.stats().bad_signatures, 1);
        // A genuine registration from A, captured and replayed from another address: the
        // cookie is bound to A's address.
        let la = addr("198.51.100.1:4000");
        let ca = cookie(&mut relay, now, la);
        let genuine = register_msg(&a, &a, ca, &[]);
        let out = one(&mut relay, now, from, &genuine);
        assert!(matches!(
            Ctrl::decode(&out[0].1).unwrap(),
            Ctrl::Error {
                code: error_code::BAD_COOKIE,
                ..
            }
        ));
        assert_eq!(relay.registrations(), 0);
        // Tampered candidates break the signature.
        let other = Candidate {
            kind: CandidateKind::Host,
            addr: addr("10.9.9.9:1"),
        };
        let mut rng = DeterministicRandom::new(5);
        let sig = a.sign(
            &mut rng,
            SIGN_RELAY_REGISTRATION,
            &registration_message(&ca, &[]),
        );
        let forged = Ctrl::Register {
            cookie: ca,
            alg: a.public().algorithm() as u8,
            public_key: a.public().key().to_vec(),
            candidates: vec![other],
            signature: sig,
        }
        .encode();
        assert!(matches!(
            Ctrl::decode(&one(&mut relay, now, la, &forged)[0].1).unwrap(),
            Ctrl::Error {
                code: error_code::BAD_SIGNATURE,
                ..
            }
        ));
        assert_eq!(relay.registrations(), 0);
        // The genuine one from the right address works, and a cookie expires.
        one(&mut relay, now, la, &genuine);
        assert_eq!(relay.registrations(), 1);
        let late = now + COOKIE_PERIOD * 3;
        let out = one(&mut relay, late, la, &genuine);
        assert!(matches!(
            Ctrl::decode(&out[0].1).unwrap(),
            Ctrl::Error {
                code: error_code::BAD_COOKIE,
                ..
            }
        ));
    }

    #[test]
    fn a_flooding_source_is_limited_and_others_still_served() {
        let (mut relay, now, a, _) = setup();
        let bad = addr("192.0.2.1:9");
        let junk = Ctrl::Connect {
            cookie: [0; 32],
            target: PeerId([7; 32]),
            candidates: vec![],
        }
        .encode();
        let mut answered = 0;
        for _ in 0..10_000 {
            answered += one(&mut relay, now, bad, &junk).len();
        }
        assert!(answered <= RELAY_CTRL_BURST_PER_IP as usize, "{answered}");
        assert!(relay.stats().rate_limited >= 10_000 - u64::from(RELAY_CTRL_BURST_PER_IP));
        // Many distinct bogus sources: bounded table, and a legitimate peer still registers.
        for i in 0..(MAX_RELAY_TRACKED_SOURCES as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(0x0A00_0000u32 + i);
            one(&mut relay, now, SocketAddr::new(ip.into(), 1), &junk);
        }
        assert!(relay.sources.len() <= MAX_RELAY_TRACKED_SOURCES);
        let la = addr("198.51.100.1:4000");
        let c = cookie(&mut relay, now, la);
        one(&mut relay, now, la, &register_msg(&a, &a, c, &[]));
        assert_eq!(relay.registrations(), 1);
    }

    #[test]
    fn relayed_bytes_are_rate_limited_per_slot() {
        let (mut relay, now, a, _) = setup();
        let la = addr("198.51.100.1:4000");
        let ca = addr("203.0.113.9:5000");
        let c = cookie(&mut relay, now, la);
        one(&mut relay, now, la, &register_msg(&a, &a, c, &[]));
        let cc = cookie(&mut relay, now, ca);
        let out = one(
            &mut relay,
            now,
            ca,
            &Ctrl::Connect {
                cookie: cc,
                target: a.peer_id(),
                candidates: vec![],
            }
            .encode(),
        );
        let Ctrl::ConnectOk { slot, .. } = Ctrl::decode(&out[0].1).unwrap() else {
            panic!()
        };
        let pkt = encode_relay_data(slot, &[0xC0; 1400]);
        let mut passed = 0u64;
        for _ in 0..10_000 {
            passed += one(&mut relay, now, ca, &pkt).len() as u64;
        }
        // At one instant, at most the burst passes.
        assert!(passed * pkt.len() as u64 <= RELAY_BYTES_BURST, "{passed}");
        assert!(passed > 0);
        // Oversized packets never pass.
        let big = encode_relay_data(slot, &vec![0xC0; MAX_RELAY_PACKET + 1]);
        assert!(one(&mut relay, now + Duration::from_secs(5), ca, &big).is_empty());
    }
}
