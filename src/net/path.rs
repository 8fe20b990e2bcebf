//! The per-socket path agent: talks to the relay (registration with refresh, introductions),
//! punches holes toward peers' candidates, keeps direct paths alive, and moves each peer
//! between its relayed and direct path in the shared [`Routes`] table — which QUIC never
//! notices, so sessions continue across every change.
//!
//! Per peer (one relay slot): **punching** — every [`PUNCH_INTERVAL`] a PING to every
//! candidate, for at most [`PUNCH_ROUNDS`] rounds; a PING is answered with a PONG to the
//! address it came from, and that address becomes a candidate too (peer-reflexive, so a
//! full-cone side reaches a symmetric one); the first PONG makes its source the **direct**
//! path. A direct path gets a PING every [`PATH_KEEPALIVE`]; if nothing arrived from it for
//! [`PATH_TIMEOUT`], traffic falls back to the relay and punching starts again (and again
//! every [`REPUNCH_INTERVAL`] while relayed). Probes carry an HMAC under the slot's punch key,
//! which only the two peers and the relay know: nobody else can steer a path.

use super::udp::{Control, Routes, UdpMux};
use crate::core::crypto::{OsRandom, SecureRandom};
use crate::core::identity::{Identity, PeerId};
use crate::core::labels::SIGN_RELAY_REGISTRATION;
use crate::core::limits::{
    BIRTHDAY_DURATION, BIRTHDAY_PROBES, BIRTHDAY_SOCKETS, MAX_CANDIDATES, PATH_KEEPALIVE,
    PATH_TIMEOUT, PUNCH_INTERVAL, PUNCH_ROUNDS, REGISTRATION_REFRESH, REPUNCH_INTERVAL,
};
use crate::core::relay::registration_message;
use crate::core::rendezvous::{
    error_code, punch_kind, Candidate, CandidateKind, Ctrl, Punch, UdpKind, COOKIE_LEN,
    PUNCH_KEY_LEN,
};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How long a connector waits for the relay's introduction.
pub const INTRODUCTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests to the relay are repeated this often until answered.
pub const RELAY_RETRY: Duration = Duration::from_millis(300);
/// The agent's timer when nothing is being punched.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Outstanding punch transaction ids remembered per peer.
const MAX_TXIDS: usize = 4096;
/// Plain punching rounds before birthday probing starts, when exactly one side is hard.
const BIRTHDAY_AFTER_ROUNDS: u32 = 25;
/// The hard side re-probes from all its sockets this often ...
const BIRTHDAY_HARD_INTERVAL: Duration = Duration::from_millis(400);
/// ... and the easy side sends a batch of random-port probes this often.
const BIRTHDAY_EASY_INTERVAL: Duration = Duration::from_millis(50);

/// A path change, for the application to show (`path: direct IP:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    Direct {
        virt: SocketAddr,
        addr: SocketAddr,
    },
    Relayed {
        virt: SocketAddr,
        relay: SocketAddr,
    },
    /// The relay accepted our registration (first time, and after it was lost).
    Registered {
        relay: SocketAddr,
        observed: SocketAddr,
    },
    /// The relay refused our registration.
    RegistrationFailed {
        relay: SocketAddr,
        reason: String,
    },
}

impl std::fmt::Display for PathEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathEvent::Direct { addr, .. } => write!(f, "path: direct {addr}"),
            PathEvent::Relayed { relay, .. } => write!(f, "path: relayed via {relay}"),
            PathEvent::Registered { relay, observed } => {
                write!(f, "registered at relay {relay} (seen as {observed})")
            }
            PathEvent::RegistrationFailed { relay, reason } => {
                write!(f, "relay {relay} refused the registration: {reason}")
            }
        }
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum IntroError {
    #[error("relay {relay} did not answer within {secs}s")]
    Timeout { relay: SocketAddr, secs: u64 },
    #[error("relay {relay}: {reason}")]
    Refused { relay: SocketAddr, reason: String },
    #[error("path agent stopped")]
    Stopped,
}

enum Cmd {
    Connect {
        relay: SocketAddr,
        target: PeerId,
        reply: oneshot::Sender<Result<SocketAddr, IntroError>>,
    },
}

/// Handle to a running agent.
#[derive(Clone)]
pub struct Agent {
    tx: mpsc::UnboundedSender<Cmd>,
    routes: Arc<Mutex<Routes>>,
}

/// What a new agent needs.
pub struct AgentConfig {
    /// Listeners register under this identity (None: a connector, which never registers).
    pub register_as: Option<Arc<Identity>>,
    pub relay: Option<SocketAddr>,
    /// Our own candidates besides what the relay observes (host, STUN server-reflexive).
    pub candidates: Vec<Candidate>,
}

impl Agent {
    /// Starts the agent on `mux`, consuming its control packets.
    pub fn spawn(
        mux: UdpMux,
        control: mpsc::Receiver<Control>,
        cfg: AgentConfig,
    ) -> (Agent, mpsc::UnboundedReceiver<PathEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let routes = mux.routes();
        if let Some(r) = cfg.relay {
            routes.lock().expect("routes lock").add_relay_server(r);
        }
        let state = State {
            mux,
            cfg,
            rng: Box::new(OsRandom),
            events: etx,
            peers: HashMap::new(),
            connects: Vec::new(),
            reg: Registration::default(),
            observed: None,
        };
        tokio::spawn(run(state, control, rx));
        (Agent { tx, routes }, erx)
    }

    /// Asks `relay` to introduce us to `target`; returns the peer's virtual address, to
    /// which QUIC can connect at once (through the relay until a direct path is punched).
    pub async fn connect(
        &self,
        relay: SocketAddr,
        target: PeerId,
    ) -> Result<SocketAddr, IntroError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Connect {
                relay,
                target,
                reply,
            })
            .map_err(|_| IntroError::Stopped)?;
        rx.await.unwrap_or(Err(IntroError::Stopped))
    }

    /// The current path of `virt`: `Some(direct address)`, or `None` while relayed.
    pub fn direct_path(&self, virt: SocketAddr) -> Option<SocketAddr> {
        self.routes
            .lock()
            .expect("routes lock")
            .route(virt)
            .and_then(|r| r.direct)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Sending probes: `round` rounds done.
    Punching { round: u32 },
    /// A direct path; `last_pong` is the last authenticated answer from it (liveness is a
    /// round trip, so a path that works one way only is dead too).
    Direct {
        addr: SocketAddr,
        via: usize,
        last_ping: Instant,
        last_pong: Instant,
    },
    /// Birthday probing until `until`: the easy (cone) side sprays probes at random ports of
    /// `target` (the hard side's public IP); the hard (symmetric) side (`target` None) keeps
    /// many mappings open by probing the easy side from many sockets.
    Birthday {
        until: Instant,
        target: Option<IpAddr>,
    },
    /// Punching gave up; try again at `retry`.
    Relayed { retry: Instant },
}

struct Peer {
    virt: SocketAddr,
    relay: SocketAddr,
    key: [u8; PUNCH_KEY_LEN],
    candidates: Vec<SocketAddr>,
    phase: Phase,
    next_round: Instant,
    txids: HashMap<u64, SocketAddr>,
    /// The peer's server-reflexive candidates.
    peer_srflx: Vec<SocketAddr>,
    birthday_tried: bool,
    birthday_sockets: Vec<usize>,
    birthday_sent: usize,
}

impl Peer {
    /// The peer's NAT maps per destination if its server-reflexive candidates (seen by the
    /// relay and by a STUN server) differ in port.
    fn peer_hard(&self) -> Option<IpAddr> {
        hard(&self.peer_srflx)
    }
}

/// `Some(ip)` when `srflx` holds two mappings of one IP with different ports.
fn hard(srflx: &[SocketAddr]) -> Option<IpAddr> {
    srflx.iter().enumerate().find_map(|(i, a)| {
        srflx[i + 1..]
            .iter()
            .any(|b| b.ip() == a.ip() && b.port() != a.port())
            .then_some(a.ip())
    })
}

#[derive(Default)]
struct Registration {
    /// When the next HELLO (registration refresh) is due.
    next: Option<Instant>,
    registered: bool,
    /// Until answered, HELLO is repeated at RELAY_RETRY.
    awaiting_since: Option<Instant>,
}

struct PendingConnect {
    relay: SocketAddr,
    target: PeerId,
    cookie: Option<[u8; COOKIE_LEN]>,
    started: Instant,
    last_sent: Instant,
    reply: oneshot::Sender<Result<SocketAddr, IntroError>>,
}

struct State {
    mux: UdpMux,
    cfg: AgentConfig,
    rng: Box<dyn SecureRandom + Send + Sync>,
    events: mpsc::UnboundedSender<PathEvent>,
    /// By relay slot.
    peers: HashMap<u64, Peer>,
    connects: Vec<PendingConnect>,
    reg: Registration,
    /// Our address as the relay sees it.
    observed: Option<SocketAddr>,
}

async fn run(
    mut st: State,
    mut control: mpsc::Receiver<Control>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    if st.cfg.register_as.is_some() && st.cfg.relay.is_some() {
        st.reg.next = Some(Instant::now());
    }
    let mut cmds_open = true;
    loop {
        let now = Instant::now();
        st.tick(now).await;
        let next = st.next_deadline(now);
        tokio::select! {
            c = control.recv() => match c {
                Some(c) => st.handle_control(Instant::now(), c).await,
                None => return,
            },
            c = cmds.recv(), if cmds_open => match c {
                Some(Cmd::Connect { relay, target, reply }) => {
                    st.mux.routes().lock().expect("routes lock").add_relay_server(relay);
                    let now = Instant::now();
                    st.connects.push(PendingConnect { relay, target, cookie: None, started: now, last_sent: now, reply });
                    let hello = Ctrl::Hello { nonce: st.nonce() }.encode();
                    st.send(&hello, relay).await;
                }
                None => cmds_open = false,
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
        }
    }
}

impl State {
    fn nonce(&mut self) -> [u8; 16] {
        crate::core::crypto::random_array(&mut *self.rng)
    }

    async fn send(&self, payload: &[u8], to: SocketAddr) {
        if let Err(e) = self.mux.send_to(payload, to).await {
            debug!("send to {to}: {e}");
        }
    }

    fn emit(&self, e: PathEvent) {
        info!("{e}");
        let _ = self.events.send(e);
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = now + IDLE_TICK;
        for p in self.peers.values() {
            if matches!(p.phase, Phase::Punching { .. } | Phase::Birthday { .. }) {
                next = next.min(p.next_round);
            }
        }
        if !self.connects.is_empty() || self.reg.awaiting_since.is_some() {
            next = next.min(now + RELAY_RETRY);
        }
        if let Some(r) = self.reg.next {
            next = next.min(r);
        }
        next.max(now + Duration::from_millis(1))
    }

    async fn tick(&mut self, now: Instant) {
        // Registration refresh (listeners).
        if let (Some(relay), Some(due)) = (self.cfg.relay, self.reg.next) {
            let retry = self
                .reg
                .awaiting_since
                .is_some_and(|t| now.saturating_duration_since(t) >= RELAY_RETRY);
            if now >= due || retry {
                if now >= due {
                    self.reg.next = Some(now + REGISTRATION_REFRESH);
                    self.reg.awaiting_since = Some(now);
                } else {
                    self.reg.awaiting_since = Some(now);
                }
                let hello = Ctrl::Hello {
                    nonce: self.nonce(),
                }
                .encode();
                self.send(&hello, relay).await;
            }
        }
        // Introductions in progress (connectors).
        let mut i = 0;
        while i < self.connects.len() {
            let c = &self.connects[i];
            if now.saturating_duration_since(c.started) >= INTRODUCTION_TIMEOUT {
                let c = self.connects.remove(i);
                let _ = c.reply.send(Err(IntroError::Timeout {
                    relay: c.relay,
                    secs: INTRODUCTION_TIMEOUT.as_secs(),
                }));
                continue;
            }
            if now.saturating_duration_since(c.last_sent) >= RELAY_RETRY {
                let msg = match c.cookie {
                    Some(cookie) => Ctrl::Connect {
                        cookie,
                        target: c.target,
                        candidates: self.cfg.candidates.clone(),
                    },
                    None => Ctrl::Hello {
                        nonce: self.nonce(),
                    },
                };
                let relay = self.connects[i].relay;
                self.connects[i].last_sent = now;
                self.send(&msg.encode(), relay).await;
            }
            i += 1;
        }
        // Punching and path upkeep.
        let slots: Vec<u64> = self.peers.keys().copied().collect();
        for slot in slots {
            self.upkeep(now, slot).await;
        }
    }

    async fn upkeep(&mut self, now: Instant, slot: u64) {
        let me_hard = self.me_hard().is_some();
        let Some(p) = self.peers.get_mut(&slot) else {
            return;
        };
        match p.phase {
            Phase::Punching { round } => {
                if now < p.next_round {
                    return;
                }
                let peer_hard = p.peer_hard();
                let one_hard = me_hard != peer_hard.is_some();
                if one_hard && !p.birthday_tried && round >= BIRTHDAY_AFTER_ROUNDS {
                    p.birthday_tried = true;
                    p.next_round = now;
                    p.phase = Phase::Birthday {
                        until: now + BIRTHDAY_DURATION,
                        target: if me_hard { None } else { peer_hard },
                    };
                    if me_hard {
                        match self.mux.open_extra(BIRTHDAY_SOCKETS) {
                            Ok(v) => p.birthday_sockets = v,
                            Err(e) => warn!("birthday probing: cannot open sockets: {e}"),
                        }
                    }
                    info!(slot, me_hard, "birthday probing");
                    return;
                }
                if round >= PUNCH_ROUNDS {
                    p.phase = Phase::Relayed {
                        retry: now + REPUNCH_INTERVAL,
                    };
                    debug!(slot, "punching gave up for now; staying relayed");
                    return;
                }
                p.phase = Phase::Punching { round: round + 1 };
                p.next_round = now + PUNCH_INTERVAL;
                let targets = p.candidates.clone();
                let key = p.key;
                for addr in targets {
                    self.ping(slot, key, addr, 0).await;
                }
            }
            Phase::Birthday { until, target } => {
                if now >= until {
                    p.phase = Phase::Relayed {
                        retry: now + REPUNCH_INTERVAL,
                    };
                    debug!(slot, "birthday probing found no path; staying relayed");
                    return;
                }
                if now < p.next_round {
                    return;
                }
                let key = p.key;
                match target {
                    // Easy side: a batch of random ports of the hard side's IP.
                    Some(ip) => {
                        p.next_round = now + BIRTHDAY_EASY_INTERVAL;
                        let batches = (BIRTHDAY_DURATION.as_millis()
                            / BIRTHDAY_EASY_INTERVAL.as_millis())
                        .max(1) as usize;
                        let batch = BIRTHDAY_PROBES.div_ceil(batches);
                        let n = batch.min(BIRTHDAY_PROBES.saturating_sub(p.birthday_sent));
                        p.birthday_sent += n;
                        for _ in 0..n {
                            let r: [u8; 2] = crate::core::crypto::random_array(&mut *self.rng);
                            let port = 1024 + (u16::from_be_bytes(r) % (65535 - 1024 + 1));
                            self.ping(slot, key, SocketAddr::new(ip, port), 0).await;
                        }
                    }
                    // Hard side: every socket probes the easy side's mappings.
                    None => {
                        p.next_round = now + BIRTHDAY_HARD_INTERVAL;
                        let socks = p.birthday_sockets.clone();
                        let mut dests = p.peer_srflx.clone();
                        dests.dedup();
                        for via in socks {
                            for d in &dests {
                                self.ping(slot, key, *d, via).await;
                            }
                        }
                    }
                }
            }
            Phase::Direct {
                addr,
                via,
                last_ping,
                last_pong,
            } => {
                if now.saturating_duration_since(last_pong) > PATH_TIMEOUT {
                    let (virt, relay) = (p.virt, p.relay);
                    p.phase = Phase::Punching { round: 0 };
                    p.next_round = now;
                    self.mux
                        .routes()
                        .lock()
                        .expect("routes lock")
                        .set_direct(virt, None);
                    warn!(slot, %addr, "no answer on the direct path for {}s: back to the relay", PATH_TIMEOUT.as_secs());
                    self.emit(PathEvent::Relayed { virt, relay });
                } else if now.saturating_duration_since(last_ping) >= PATH_KEEPALIVE {
                    p.phase = Phase::Direct {
                        addr,
                        via,
                        last_ping: now,
                        last_pong,
                    };
                    let key = p.key;
                    self.ping(slot, key, addr, via).await;
                }
            }
            Phase::Relayed { retry } => {
                if now >= retry {
                    p.phase = Phase::Punching { round: 0 };
                    p.next_round = now;
                }
            }
        }
    }

    /// Our NAT maps per destination: the relay and a STUN server saw different ports.
    fn me_hard(&self) -> Option<IpAddr> {
        let mut srflx: Vec<SocketAddr> = self
            .cfg
            .candidates
            .iter()
            .filter(|c| c.kind == CandidateKind::ServerReflexive)
            .map(|c| c.addr)
            .collect();
        srflx.extend(self.observed);
        hard(&srflx)
    }

    async fn ping(&mut self, slot: u64, key: [u8; PUNCH_KEY_LEN], addr: SocketAddr, via: usize) {
        let txid = u64::from_be_bytes(crate::core::crypto::random_array(&mut *self.rng));
        if let Some(p) = self.peers.get_mut(&slot) {
            if p.txids.len() >= MAX_TXIDS {
                p.txids.clear();
            }
            p.txids.insert(txid, addr);
        }
        let msg = Punch {
            kind: punch_kind::PING,
            slot,
            txid,
        }
        .encode(&key);
        if let Err(e) = self.mux.send_via(&msg, addr, via).await {
            debug!("probe to {addr} via {via}: {e}");
        }
    }

    /// A new peer on `slot`: route through the relay at once, start punching.
    fn add_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        slot: u64,
        key: [u8; PUNCH_KEY_LEN],
        candidates: &[Candidate],
    ) -> SocketAddr {
        if let Some(p) = self.peers.get(&slot) {
            return p.virt;
        }
        let virt = self
            .mux
            .routes()
            .lock()
            .expect("routes lock")
            .add_relayed(relay, slot);
        let mut cands: Vec<SocketAddr> = Vec::new();
        for c in candidates {
            let a = SocketAddr::new(c.addr.ip().to_canonical(), c.addr.port());
            if !cands.contains(&a) && a.port() != 0 && !a.ip().is_unspecified() {
                cands.push(a);
            }
        }
        self.peers.insert(
            slot,
            Peer {
                virt,
                relay,
                key,
                candidates: cands,
                phase: Phase::Punching { round: 0 },
                next_round: now,
                txids: HashMap::new(),
                peer_srflx: candidates
                    .iter()
                    .filter(|c| c.kind == CandidateKind::ServerReflexive)
                    .map(|c| SocketAddr::new(c.addr.ip().to_canonical(), c.addr.port()))
                    .collect(),
                birthday_tried: false,
                birthday_sockets: Vec::new(),
                birthday_sent: 0,
            },
        );
        self.emit(PathEvent::Relayed { virt, relay });
        virt
    }

    async fn handle_control(&mut self, now: Instant, c: Control) {
        match c.kind {
            UdpKind::RelayCtrl => {
                let Ok(msg) = Ctrl::decode(&c.payload) else {
                    return;
                };
                self.handle_relay(now, c.from, msg).await;
            }
            UdpKind::Punch => self.handle_punch(now, c.from, c.via, &c.payload).await,
            _ => {}
        }
    }

    async fn handle_relay(&mut self, now: Instant, from: SocketAddr, msg: Ctrl) {
        let is_reg_relay = self.cfg.relay == Some(from);
        match msg {
            Ctrl::Cookie {
                cookie, observed, ..
            } => {
                if is_reg_relay && self.reg.awaiting_since.is_some() {
                    if let Some(id) = self.cfg.register_as.clone() {
                        let mut cands = self.cfg.candidates.clone();
                        cands.truncate(MAX_CANDIDATES);
                        let sig = id.sign(
                            &mut *self.rng,
                            SIGN_RELAY_REGISTRATION,
                            &registration_message(&cookie, &cands),
                        );
                        let reg = Ctrl::Register {
                            cookie,
                            alg: id.public().algorithm() as u8,
                            public_key: id.public().key().to_vec(),
                            candidates: cands,
                            signature: sig,
                        };
                        self.send(&reg.encode(), from).await;
                    }
                }
                for c in self.connects.iter_mut().filter(|c| c.relay == from) {
                    c.cookie = Some(cookie);
                    c.last_sent = now;
                    let m = Ctrl::Connect {
                        cookie,
                        target: c.target,
                        candidates: self.cfg.candidates.clone(),
                    };
                    if let Err(e) = self.mux.send_to(&m.encode(), from).await {
                        debug!("send to {from}: {e}");
                    }
                }
                if is_reg_relay || self.observed.is_none() {
                    self.observed = Some(observed);
                }
                debug!(%observed, "relay sees us as");
            }
            Ctrl::Registered { observed, .. } if is_reg_relay => {
                self.reg.awaiting_since = None;
                if !self.reg.registered {
                    self.reg.registered = true;
                    self.emit(PathEvent::Registered {
                        relay: from,
                        observed,
                    });
                }
            }
            Ctrl::ConnectOk {
                target,
                slot,
                punch_key,
                candidates,
            } => {
                let Some(i) = self
                    .connects
                    .iter()
                    .position(|c| c.relay == from && c.target == target)
                else {
                    return;
                };
                let c = self.connects.remove(i);
                let virt = self.add_peer(now, from, slot, punch_key, &candidates);
                let _ = c.reply.send(Ok(virt));
                self.upkeep(now, slot).await;
            }
            Ctrl::Incoming {
                slot,
                punch_key,
                candidates,
            } if is_reg_relay => {
                self.add_peer(now, from, slot, punch_key, &candidates);
                self.upkeep(now, slot).await;
            }
            Ctrl::Error { code, reason } => {
                if code == error_code::BAD_COOKIE {
                    // Cookie period rolled over: start again.
                    let hello = Ctrl::Hello {
                        nonce: self.nonce(),
                    }
                    .encode();
                    self.send(&hello, from).await;
                    return;
                }
                if is_reg_relay && self.reg.awaiting_since.is_some() {
                    self.reg.awaiting_since = None;
                    self.reg.registered = false;
                    self.emit(PathEvent::RegistrationFailed {
                        relay: from,
                        reason: reason.clone(),
                    });
                }
                // An error answers every introduction we asked this relay for.
                let mut i = 0;
                while i < self.connects.len() {
                    if self.connects[i].relay == from && self.connects[i].cookie.is_some() {
                        let c = self.connects.remove(i);
                        let _ = c.reply.send(Err(IntroError::Refused {
                            relay: from,
                            reason: reason.clone(),
                        }));
                    } else {
                        i += 1;
                    }
                }
            }
            _ => {}
        }
    }

    async fn handle_punch(&mut self, now: Instant, from: SocketAddr, via: usize, payload: &[u8]) {
        let Some(slot) = Punch::peek_slot(payload) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&slot) else {
            return;
        };
        let Ok(msg) = Punch::decode(payload, &p.key) else {
            debug!(%from, "punch probe failed authentication");
            return;
        };
        let key = p.key;
        let virt = p.virt;
        self.mux
            .routes()
            .lock()
            .expect("routes lock")
            .learn(virt, from);
        match msg.kind {
            punch_kind::PING => {
                let pong = Punch {
                    kind: punch_kind::PONG,
                    slot,
                    txid: msg.txid,
                }
                .encode(&key);
                if let Err(e) = self.mux.send_via(&pong, from, via).await {
                    debug!("pong to {from}: {e}");
                }
                // The source is a candidate too (peer-reflexive): probe it back unless a
                // direct path is already up.
                let p = self.peers.get_mut(&slot).expect("peer exists");
                if !p.candidates.contains(&from) && p.candidates.len() < 2 * MAX_CANDIDATES {
                    p.candidates.push(from);
                }
                if !matches!(p.phase, Phase::Direct { .. }) {
                    if matches!(p.phase, Phase::Relayed { .. }) {
                        p.phase = Phase::Punching { round: 0 };
                        p.next_round = now;
                    }
                    self.ping(slot, key, from, via).await;
                }
            }
            punch_kind::PONG => {
                let p = self.peers.get_mut(&slot).expect("peer exists");
                if !p.txids.contains_key(&msg.txid) {
                    return;
                }
                if let Phase::Direct {
                    addr,
                    via: dvia,
                    last_ping,
                    ..
                } = p.phase
                {
                    if addr == from && dvia == via {
                        p.phase = Phase::Direct {
                            addr,
                            via,
                            last_ping,
                            last_pong: now,
                        };
                    }
                    // Otherwise keep the current direct path: it works.
                    return;
                }
                p.phase = Phase::Direct {
                    addr: from,
                    via,
                    last_ping: now,
                    last_pong: now,
                };
                self.mux
                    .routes()
                    .lock()
                    .expect("routes lock")
                    .set_direct_via(virt, Some(from), via);
                self.emit(PathEvent::Direct { virt, addr: from });
            }
            _ => {}
        }
    }
}

/// Host candidates: the local address this host would use toward `toward` (found with a
/// connected UDP socket, which sends nothing), with `port`.
pub fn host_candidates(toward: &[SocketAddr], port: u16) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for t in toward {
        let bind: SocketAddr = if t.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let Ok(s) = std::net::UdpSocket::bind(bind) else {
            continue;
        };
        if s.connect(t).is_err() {
            continue;
        }
        if let Ok(local) = s.local_addr() {
            let c = Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::new(local.ip().to_canonical(), port),
            };
            if !out.contains(&c) && out.len() < MAX_CANDIDATES {
                out.push(c);
            }
        }
    }
    out
}
