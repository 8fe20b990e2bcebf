//! One UDP socket for everything: STUN, QUIC, punch probes, relay traffic and VPN
//! datagram records, demultiplexed by the first byte of each payload
//! ([`crate::core::rendezvous::classify`], RFC 7983 style).
//!
//! QUIC (quinn) runs on this socket through [`QuicSocket`], quinn's `AsyncUdpSocket`. A peer
//! reached by rendezvous gets a *virtual address* (in 240.0.0.0/4, which is reserved and never
//! a real source): quinn only ever sees that address, and the [`Routes`] table decides at each
//! send whether the packet goes straight to the peer's punched address or, wrapped in
//! RELAY_DATA, through the relay. Moving a session between relayed and direct paths is
//! therefore invisible to QUIC and to the qssh session inside it: nothing is interrupted.
//!
//! The main socket does batched I/O through quinn's socket layer (`quinn::udp`): one
//! `sendmsg` sends up to `max_transmit_segments` equal-sized QUIC packets (UDP GSO; relayed
//! ones each get their RELAY_DATA header and go out as one GSO batch to the relay), and one
//! `recvmmsg` receives many buffers, each possibly several GRO-coalesced datagrams. While a
//! QUIC endpoint exists, quinn's endpoint driver reads the main socket itself
//! ([`QuicSocket::poll_recv`]): each received buffer is demultiplexed where it lies, its QUIC
//! packets stay in quinn's buffer (relayed ones unwrapped in place), and only the others are
//! copied out (STUN answers to their waiters, punch/relay control/datagram records to the
//! control queue). Before and after that (and on a relay, which has no QUIC endpoint) a
//! receive task reads the main socket the same way and queues QUIC packets for quinn.
//! Extra (birthday-probing) sockets are plain sockets read by a task of their own.

use super::udp_path::{gso_transmits, UDP_SOCKET_BUFFER};
use crate::core::limits::{MAX_STUN_PENDING, MAX_UDP_PAYLOAD, QUIC_RECV_QUEUE};
use crate::core::rendezvous::{
    classify, decode_relay_data, encode_relay_data, UdpKind, RELAY_DATA_HEADER,
};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, trace};

/// Extra sockets (birthday probing) one mux opens at most.
pub const MAX_EXTRA_SOCKETS: usize = 1024;
/// Control packets (punch, relay control, datagrams) queued for the socket's owner.
const CONTROL_QUEUE: usize = 1024;
/// Receive buffers (of [`MAX_UDP_PAYLOAD`] bytes: one GRO batch each) of the task that
/// reads the main socket when quinn does not.
const RECV_TASK_BATCH: usize = 8;

/// Where packets for one peer go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerRoute {
    /// Relay address and slot, when the peer is reachable through a relay.
    pub relay: Option<(SocketAddr, u64)>,
    /// The punched direct address, when a direct path is up ...
    pub direct: Option<SocketAddr>,
    /// ... and the socket it uses (0: the main socket; others: birthday-probing sockets).
    pub via: usize,
    /// Addresses proven (by an authenticated punch probe) to be this peer's: QUIC packets
    /// from them are shown to quinn as coming from the virtual address.
    pub aliases: Vec<SocketAddr>,
}

/// The virtual-address table shared by the socket and the path managers.
#[derive(Debug, Default)]
pub struct Routes {
    peers: HashMap<SocketAddr, PeerRoute>,
    by_direct: HashMap<SocketAddr, SocketAddr>,
    by_slot: HashMap<u64, SocketAddr>,
    /// Relays this socket talks to: RELAY_DATA from them for an unknown slot makes a route.
    relays: Vec<SocketAddr>,
    next: u32,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether `a` is one of our virtual addresses (240.0.0.0/4).
pub fn is_virtual(a: SocketAddr) -> bool {
    matches!(a.ip().to_canonical(), IpAddr::V4(v4) if v4.octets()[0] >= 240 && v4.octets()[0] < 255)
}

impl Routes {
    /// A new peer reached through `relay` on `slot`; returns its virtual address (the same
    /// one again for a slot already known).
    pub fn add_relayed(&mut self, relay: SocketAddr, slot: u64) -> SocketAddr {
        if let Some(v) = self.by_slot.get(&slot) {
            return *v;
        }
        self.next = self.next.wrapping_add(1).max(1);
        let ip = Ipv4Addr::from(0xF000_0000u32 | (self.next & 0x0FFF_FFFF));
        let v = SocketAddr::new(ip.into(), 1);
        self.peers.insert(
            v,
            PeerRoute {
                relay: Some((canonical(relay), slot)),
                direct: None,
                via: 0,
                aliases: Vec::new(),
            },
        );
        self.by_slot.insert(slot, v);
        v
    }

    /// Sends `virt`'s packets straight to `direct` from now on (`None`: through the relay).
    pub fn set_direct(&mut self, virt: SocketAddr, direct: Option<SocketAddr>) {
        self.set_direct_via(virt, direct, 0);
    }

    /// Like [`Routes::set_direct`], through socket `via` of the mux.
    pub fn set_direct_via(&mut self, virt: SocketAddr, direct: Option<SocketAddr>, via: usize) {
        if let Some(d) = direct {
            self.learn(virt, d);
        }
        if let Some(route) = self.peers.get_mut(&virt) {
            route.direct = direct.map(canonical);
            route.via = via;
        }
    }

    /// Records that `addr` is proven to be `virt`'s (receive side only).
    pub fn learn(&mut self, virt: SocketAddr, addr: SocketAddr) {
        let addr = canonical(addr);
        let Some(route) = self.peers.get_mut(&virt) else {
            return;
        };
        if route.aliases.contains(&addr) {
            return;
        }
        if route.aliases.len() >= 2 * crate::core::limits::MAX_CANDIDATES {
            let old = route.aliases.remove(0);
            if Some(old) != route.direct {
                self.by_direct.remove(&old);
            }
        }
        route.aliases.push(addr);
        self.by_direct.insert(addr, virt);
    }

    /// The peer `addr` is a proven alias of, if any.
    pub fn peer_of(&self, addr: SocketAddr) -> Option<SocketAddr> {
        self.by_direct.get(&canonical(addr)).copied()
    }

    pub fn route(&self, virt: SocketAddr) -> Option<PeerRoute> {
        self.peers.get(&virt).cloned()
    }

    /// Forgets a peer.
    pub fn remove(&mut self, virt: SocketAddr) {
        if let Some(r) = self.peers.remove(&virt) {
            for a in r.aliases {
                self.by_direct.remove(&a);
            }
            if let Some((_, slot)) = r.relay {
                self.by_slot.remove(&slot);
            }
        }
    }

    pub fn add_relay_server(&mut self, relay: SocketAddr) {
        let relay = canonical(relay);
        if !self.relays.contains(&relay) {
            self.relays.push(relay);
        }
    }

    /// Where a packet for `dest` really goes, and whether it must be wrapped for a slot.
    fn resolve(&self, dest: SocketAddr) -> Option<(SocketAddr, Option<u64>, usize)> {
        match self.peers.get(&dest) {
            Some(PeerRoute {
                direct: Some(d),
                via,
                ..
            }) => Some((*d, None, *via)),
            Some(PeerRoute {
                relay: Some((r, slot)),
                ..
            }) => Some((*r, Some(*slot), 0)),
            Some(_) => None,
            None if is_virtual(dest) => None,
            None => Some((dest, None, 0)),
        }
    }
}

/// A packet that is neither STUN nor QUIC (nor relayed QUIC), for the socket's owner.
#[derive(Debug)]
pub struct Control {
    pub from: SocketAddr,
    /// The socket it arrived on (0: main).
    pub via: usize,
    pub kind: UdpKind,
    pub payload: Vec<u8>,
}

/// Counters.
#[derive(Debug, Default)]
pub struct MuxStats {
    pub quic_in: AtomicU64,
    pub quic_dropped: AtomicU64,
    pub relayed_in: AtomicU64,
    pub control_in: AtomicU64,
    pub unknown: AtomicU64,
    /// Datagrams of our own that arrived from a direct (non-relay) address.
    pub direct_in: AtomicU64,
    /// DATAGRAM records handed to [`UdpMux::datagrams`]' receiver ...
    pub datagram_in: AtomicU64,
    /// ... and dropped because it was full.
    pub datagram_dropped: AtomicU64,
}

/// A received payload and the address it is shown as coming from.
pub type Received = (SocketAddr, Vec<u8>);

type StunWaiters = HashMap<[u8; 12], oneshot::Sender<(SocketAddr, Vec<u8>)>>;
type Queued = (SocketAddr, Vec<u8>);

/// The main socket with quinn's batched-I/O state: GSO on send, GRO and `recvmmsg` on
/// receive. Every read of it goes through [`MainSocket::try_recv`], which reports GRO
/// segment boundaries (a plain `recv_from` would return coalesced datagrams as one).
struct MainSocket {
    io: UdpSocket,
    state: UdpSocketState,
}

impl MainSocket {
    fn bind(addr: SocketAddr) -> io::Result<MainSocket> {
        let std = std::net::UdpSocket::bind(addr)?;
        let state = UdpSocketState::new((&std).into())?;
        allow_fragmentation(&std, addr.is_ipv6())?;
        // Best effort: the kernel caps both at net.core.[rw]mem_max.
        let _ = state.set_recv_buffer_size((&std).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&std).into(), UDP_SOCKET_BUFFER);
        std.set_nonblocking(true)?;
        Ok(MainSocket {
            io: UdpSocket::from_std(std)?,
            state,
        })
    }

    /// One batch (`recvmmsg`, each buffer possibly several GRO segments), without waiting.
    fn try_recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.io.try_io(Interest::READABLE, || {
            self.state.recv((&self.io).into(), bufs, meta)
        })
    }

    /// Sends a transmit (several equal segments with GSO), without waiting. Only
    /// `WouldBlock` is returned as an error: the rest is the network's loss.
    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.io
            .try_io(Interest::WRITABLE, || self.state.send((&self.io).into(), t))
    }
}

/// Undoes quinn-udp's "never fragment" socket options (`IP_PMTUDISC_PROBE`,
/// `IPV6_DONTFRAG`) and goes back to the kernel's default, path MTU discovery with local
/// fragmentation: relay control messages exceed one packet (a REGISTER carries a public key
/// and a signature: about 1.6 KB with Falcon-512, 17 KB with SLH-DSA) and must still go out,
/// as IP fragments. QUIC packets stay below every usual MTU (`QUIC_MAX_UDP_PAYLOAD`), so
/// they are not fragmented in practice, as before batching.
fn allow_fragmentation(socket: &std::net::UdpSocket, ipv6: bool) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::WANT)?;
    if ipv6 {
        sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::WANT)?;
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Ipv6DontFrag, &false)
            .map_err(io::Error::from)?;
    }
    Ok(())
}

struct Inner {
    main: Arc<MainSocket>,
    /// Extra sockets (birthday probing), index `via - 1`; never closed while the mux lives.
    /// Plain sockets (no GRO): their receive tasks read one datagram at a time.
    extra: std::sync::RwLock<Vec<Arc<UdpSocket>>>,
    /// QUIC packets not read by quinn itself from the main socket: from extra sockets, from
    /// the main socket while quinn is not reading it, and relayed packets of a second peer in
    /// one GRO batch. [`QuicSocket::poll_recv`] hands them to quinn first.
    quic_tx: mpsc::Sender<Queued>,
    quic_rx: Mutex<mpsc::Receiver<Queued>>,
    control_tx: mpsc::Sender<Control>,
    /// How many [`QuicSocket`]s exist: while any does, quinn reads the main socket; the
    /// receive task reads it otherwise.
    quinn_reads: watch::Sender<usize>,
    local: SocketAddr,
    routes: Arc<Mutex<Routes>>,
    stun: Mutex<StunWaiters>,
    stats: MuxStats,
    /// Last time a packet arrived from each address.
    last_rx: Mutex<HashMap<SocketAddr, std::time::Instant>>,
    /// Scratch space for wrapping a transmit's segments in RELAY_DATA.
    wrap: Mutex<Vec<u8>>,
    relay_mode: bool,
    /// Where DATAGRAM records (first byte 0x05) go, once someone asked for them.
    datagrams: Mutex<Option<mpsc::Sender<Received>>>,
    id: u32,
}

/// Where the QUIC packets of one received buffer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    /// The address quinn is shown.
    addr: SocketAddr,
    /// Bytes kept at the start of the buffer ...
    len: usize,
    /// ... as packets of this size (the last may be shorter).
    stride: usize,
    /// Unwrapped from RELAY_DATA (no ECN marks of its own).
    relayed: bool,
}

impl Inner {
    /// Sends a transmit (GSO segments of `segment_size`) to `t.destination` along its route:
    /// a virtual address resolves to the peer's direct path, or through its relay slot
    /// (each segment wrapped in RELAY_DATA); any other address is used as is. Without
    /// waiting: only `WouldBlock` on the main socket is an error, the rest is the network's
    /// loss (QUIC retransmits; VPN packets are lossy anyway).
    fn try_send_routed(&self, t: &Transmit) -> io::Result<()> {
        let dest = canonical(t.destination);
        let resolved = self.routes.lock().expect("routes lock").resolve(dest);
        let Some((to, slot, via)) = resolved else {
            // A peer with no path at the moment: the packet is lost, QUIC retransmits.
            return Ok(());
        };
        let segment = t.segment_size.unwrap_or(t.contents.len());
        if via != 0 {
            // A birthday-probing socket: plain, one datagram per call. A full buffer loses
            // the rest (quinn waits only for the main socket's writability; QUIC
            // retransmits), as do unreachable networks and the like.
            let Some(socket) = self.extra.read().expect("extra lock").get(via - 1).cloned() else {
                return Ok(());
            };
            for seg in t.contents.chunks(segment.max(1)) {
                let r = match slot {
                    None => socket.try_send_to(seg, to),
                    Some(slot) => socket.try_send_to(&encode_relay_data(slot, seg), to),
                };
                if let Err(e) = r {
                    trace!("send to {to} via {via} failed: {e}");
                    break;
                }
            }
            return Ok(());
        }
        let ecn = t.ecn;
        // The kernel picks the source address: the path is ours, not quinn's.
        match slot {
            None => self.main.try_send(&Transmit {
                destination: to,
                ecn,
                contents: t.contents,
                segment_size: t.segment_size,
                src_ip: None,
            }),
            Some(slot) => {
                let mut wrap = self.wrap.lock().expect("wrap lock");
                wrap_segments(&mut wrap, slot, t.contents, segment);
                self.main.try_send(&Transmit {
                    destination: to,
                    ecn,
                    contents: &wrap,
                    segment_size: t.segment_size.map(|s| s + RELAY_DATA_HEADER),
                    src_ip: None,
                })
            }
        }
    }

    /// Sorts the datagrams of one received buffer (`stride`-sized GRO segments, the last maybe
    /// shorter) from `from`: STUN answers to their waiters, punch/relay/datagram records to
    /// the control queue, QUIC (and unwrapped relayed QUIC) for quinn. With `in_place`, the
    /// QUIC packets of the first peer in the buffer are moved to its start (usually they are
    /// already there: a GRO batch is one flow) and described by the returned [`Kept`]; those
    /// of any other peer, and all of them without `in_place`, are copied to the QUIC queue.
    fn demux(
        &self,
        via: usize,
        from: SocketAddr,
        buf: &mut [u8],
        stride: usize,
        in_place: bool,
    ) -> Option<Kept> {
        let from = canonical(from);
        let len = buf.len();
        if len == 0 {
            return None;
        }
        let stride = if stride == 0 { len } else { stride };
        self.last_rx
            .lock()
            .expect("last_rx lock")
            .insert(from, std::time::Instant::now());
        let mut kept: Option<Kept> = None;
        // Once a packet shorter than the stride is kept, nothing more can follow it.
        let mut closed = false;
        let mut routes: Option<MutexGuard<'_, Routes>> = None;
        let mut direct: Option<Option<SocketAddr>> = None;
        let mut off = 0;
        while off < len {
            let seg = off..(off + stride).min(len);
            off = seg.end;
            let (addr, packet, relayed) = match classify(&buf[seg.clone()]) {
                UdpKind::Quic => {
                    let r = routes.get_or_insert_with(|| self.routes.lock().expect("routes lock"));
                    let shown = *direct.get_or_insert_with(|| r.by_direct.get(&from).copied());
                    if shown.is_some() {
                        self.stats.direct_in.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stats.quic_in.fetch_add(1, Ordering::Relaxed);
                    (present(self.local, shown.unwrap_or(from)), seg, false)
                }
                UdpKind::Datagram if !self.relay_mode => {
                    let r = routes.get_or_insert_with(|| self.routes.lock().expect("routes lock"));
                    let shown = *direct.get_or_insert_with(|| r.by_direct.get(&from).copied());
                    deliver_datagram(self, shown.unwrap_or(from), &buf[seg]);
                    continue;
                }
                UdpKind::RelayData if !self.relay_mode => {
                    let Ok((slot, packet)) = decode_relay_data(&buf[seg.clone()]) else {
                        continue;
                    };
                    let inner_kind = classify(packet);
                    if inner_kind != UdpKind::Quic && inner_kind != UdpKind::Datagram {
                        continue;
                    }
                    let r = routes.get_or_insert_with(|| self.routes.lock().expect("routes lock"));
                    let virt = match r.by_slot.get(&slot).copied() {
                        Some(v)
                            if r.peers.get(&v).and_then(|p| p.relay).map(|x| x.0) == Some(from) =>
                        {
                            Some(v)
                        }
                        Some(_) => None,
                        // A relay we use introduces a peer whose INCOMING we missed.
                        None if r.relays.contains(&from) => Some(r.add_relayed(from, slot)),
                        None => None,
                    };
                    let Some(virt) = virt else {
                        self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    self.stats.relayed_in.fetch_add(1, Ordering::Relaxed);
                    if inner_kind == UdpKind::Datagram {
                        deliver_datagram(self, virt, packet);
                        continue;
                    }
                    (
                        present(self.local, virt),
                        seg.start + RELAY_DATA_HEADER..seg.end,
                        true,
                    )
                }
                UdpKind::Stun => {
                    let data = &buf[seg];
                    if data.len() >= 20 {
                        let txid: [u8; 12] = data[8..20].try_into().expect("12 bytes");
                        if let Some(w) = self.stun.lock().expect("stun lock").remove(&txid) {
                            let _ = w.send((from, data.to_vec()));
                        }
                    }
                    continue;
                }
                UdpKind::Unknown => {
                    self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                kind => {
                    self.stats.control_in.fetch_add(1, Ordering::Relaxed);
                    let c = Control {
                        from,
                        via,
                        kind,
                        payload: buf[seg].to_vec(),
                    };
                    if self.control_tx.try_send(c).is_err() {
                        debug!(
                            mux = self.id,
                            "control queue full: dropped a {kind:?} packet"
                        );
                    }
                    continue;
                }
            };
            let n = packet.len();
            let fits = match &kept {
                _ if !in_place || closed => false,
                None => true,
                Some(k) => k.addr == addr && n <= k.stride,
            };
            if fits {
                let k = kept.get_or_insert(Kept {
                    addr,
                    len: 0,
                    stride: n,
                    relayed,
                });
                if packet.start != k.len {
                    buf.copy_within(packet, k.len);
                }
                k.len += n;
                closed = n < k.stride;
            } else if self.quic_tx.try_send((addr, buf[packet].to_vec())).is_err() {
                self.stats.quic_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        kept
    }
}

/// The shared socket. Cloning shares it.
#[derive(Clone)]
pub struct UdpMux {
    inner: Arc<Inner>,
}

/// Why a STUN transaction could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StunSendError {
    #[error("too many STUN requests in flight")]
    TooMany,
    #[error("send: {0}")]
    Io(#[from] io::Error),
}

static MUX_IDS: AtomicU32 = AtomicU32::new(0);

impl UdpMux {
    /// Binds `addr` and starts the receive task. Control packets arrive on the returned
    /// receiver. In `relay_mode` RELAY_DATA goes to the control receiver too (a relay
    /// forwards it) instead of being unwrapped into QUIC.
    pub async fn bind(
        addr: SocketAddr,
        relay_mode: bool,
    ) -> io::Result<(UdpMux, mpsc::Receiver<Control>)> {
        let main = Arc::new(MainSocket::bind(addr)?);
        let local = main.io.local_addr()?;
        let (qtx, qrx) = mpsc::channel(QUIC_RECV_QUEUE);
        let (ctx, crx) = mpsc::channel(CONTROL_QUEUE);
        let (quinn_reads, quinn_reads_rx) = watch::channel(0usize);
        let id = MUX_IDS.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(Inner {
            main: main.clone(),
            extra: std::sync::RwLock::new(Vec::new()),
            quic_tx: qtx,
            quic_rx: Mutex::new(qrx),
            control_tx: ctx,
            quinn_reads,
            local,
            routes: Arc::new(Mutex::new(Routes::default())),
            stun: Mutex::new(HashMap::new()),
            stats: MuxStats::default(),
            last_rx: Mutex::new(HashMap::new()),
            wrap: Mutex::new(Vec::new()),
            relay_mode,
            datagrams: Mutex::new(None),
            id,
        });
        tokio::spawn(main_recv_loop(Arc::downgrade(&inner), main, quinn_reads_rx));
        Ok((UdpMux { inner }, crx))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }
    pub fn routes(&self) -> Arc<Mutex<Routes>> {
        self.inner.routes.clone()
    }
    pub fn stats(&self) -> &MuxStats {
        &self.inner.stats
    }

    /// When a packet last arrived from `addr` (any kind).
    pub fn last_heard(&self, addr: SocketAddr) -> Option<std::time::Instant> {
        self.inner
            .last_rx
            .lock()
            .expect("last_rx lock")
            .get(&canonical(addr))
            .copied()
    }

    /// Sends one payload as is.
    pub async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<()> {
        self.inner.main.io.send_to(payload, to).await.map(|_| ())
    }

    fn extra_socket(&self, via: usize) -> Option<Arc<UdpSocket>> {
        self.inner
            .extra
            .read()
            .expect("extra lock")
            .get(via.checked_sub(1)?)
            .cloned()
    }

    /// Sends one payload from socket `via` (0: main).
    pub async fn send_via(&self, payload: &[u8], to: SocketAddr, via: usize) -> io::Result<()> {
        if via == 0 {
            return self.send_to(payload, to).await;
        }
        let s = self
            .extra_socket(via)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such socket"))?;
        s.send_to(payload, to).await.map(|_| ())
    }

    /// From now on, DATAGRAM records (`core::datagram`, first byte 0x05) that arrive on this
    /// socket, directly or inside RELAY_DATA from a relay slot we know, go to the returned
    /// receiver, at most `queue` waiting (more are dropped, as a full socket buffer would).
    /// The sender is shown as the peer's virtual address when the record came through the
    /// relay or from a proven alias of a peer, so replies sent with
    /// [`UdpMux::send_routed_records`]
    /// follow the peer's current path. A second call replaces the first receiver.
    pub fn datagrams(&self, queue: usize) -> mpsc::Receiver<Received> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        *self.inner.datagrams.lock().expect("datagrams lock") = Some(tx);
        rx
    }

    /// Sends `buf`, consecutive payloads of `stride` bytes each (the last may be shorter),
    /// to `dest` the way QUIC packets go (a virtual address resolves to the peer's direct
    /// path, or through its relay slot, each payload wrapped in RELAY_DATA; any other
    /// address is used as is), in GSO batches on the main socket; waits while its buffer is
    /// full. A peer without a path at the moment loses the payloads (UDP). The VPN's
    /// datagram records go this way.
    pub async fn send_routed_records(
        &self,
        buf: &[u8],
        stride: usize,
        dest: SocketAddr,
    ) -> io::Result<()> {
        if stride == 0 {
            return Ok(());
        }
        // Room for a RELAY_DATA header on every segment, should the route be relayed.
        let max = self.inner.main.state.max_gso_segments();
        for t in gso_transmits(buf, stride, dest, max, RELAY_DATA_HEADER) {
            self.inner
                .main
                .io
                .async_io(Interest::WRITABLE, || self.inner.try_send_routed(&t))
                .await?;
        }
        Ok(())
    }

    /// Extra sockets open so far.
    pub fn extra_sockets(&self) -> usize {
        self.inner.extra.read().expect("extra lock").len()
    }

    /// Opens `n` more sockets on ephemeral ports (for birthday probing: each gets its own NAT
    /// mapping); returns their `via` indices. Their packets are demultiplexed like the main
    /// socket's. At most [`MAX_EXTRA_SOCKETS`] in total.
    pub fn open_extra(&self, n: usize) -> io::Result<Vec<usize>> {
        let mut extra = self.inner.extra.write().expect("extra lock");
        let n = n.min(MAX_EXTRA_SOCKETS.saturating_sub(extra.len()));
        let bind = SocketAddr::new(
            match self.inner.local {
                SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            },
            0,
        );
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let std = std::net::UdpSocket::bind(bind)?;
            std.set_nonblocking(true)?;
            let s = Arc::new(UdpSocket::from_std(std)?);
            extra.push(s.clone());
            let via = extra.len();
            tokio::spawn(extra_recv_loop(Arc::downgrade(&self.inner), s, via));
            out.push(via);
        }
        Ok(out)
    }

    /// Sends `request` (a STUN message with transaction id `txid`) to `server`; the answer
    /// with the same transaction id arrives on the returned receiver.
    pub async fn stun_request(
        &self,
        server: SocketAddr,
        txid: [u8; 12],
        request: &[u8],
    ) -> Result<oneshot::Receiver<(SocketAddr, Vec<u8>)>, StunSendError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.inner.stun.lock().expect("stun lock");
            w.retain(|_, s| !s.is_closed());
            if w.len() >= MAX_STUN_PENDING && !w.contains_key(&txid) {
                return Err(StunSendError::TooMany);
            }
            w.insert(txid, tx);
        }
        self.send_to(request, server).await?;
        Ok(rx)
    }

    /// The socket as quinn sees it. From now until quinn drops it, quinn's endpoint reads
    /// the main socket itself (batched, demultiplexing in place) and the receive task pauses.
    /// One QUIC endpoint per mux.
    pub fn quic_socket(&self) -> Arc<dyn AsyncUdpSocket> {
        self.inner.quinn_reads.send_modify(|n| *n += 1);
        Arc::new(QuicSocket {
            inner: self.inner.clone(),
        })
    }
}

/// Reads the main socket while quinn does not (before a QUIC endpoint exists, after it is
/// gone, and always on a relay), in batches; every packet is copied to its queue.
async fn main_recv_loop(
    inner: std::sync::Weak<Inner>,
    main: Arc<MainSocket>,
    mut quinn_reads: watch::Receiver<usize>,
) {
    let mut storage = vec![0u8; RECV_TASK_BATCH * MAX_UDP_PAYLOAD];
    let mut meta = [RecvMeta::default(); RECV_TASK_BATCH];
    loop {
        // The mux is gone when the watch's sender (in `Inner`) is.
        if *quinn_reads.borrow_and_update() > 0 {
            if quinn_reads.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            r = main.io.readable() => {
                if let Err(e) = r {
                    debug!("receive task ends: {e}");
                    return;
                }
            }
            r = quinn_reads.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut bufs: Vec<IoSliceMut<'_>> = storage
            .chunks_mut(MAX_UDP_PAYLOAD)
            .map(IoSliceMut::new)
            .collect();
        match main.try_recv(&mut bufs, &mut meta) {
            Ok(n) => {
                for (m, b) in meta.iter().zip(bufs.iter_mut()).take(n) {
                    let len = m.len.min(b.len());
                    inner.demux(0, m.addr, &mut b[..len], m.stride, false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP errors (port unreachable) surface here on Linux: not fatal.
            Err(e) => trace!(mux = inner.id, "recv error: {e}"),
        }
    }
}

/// Reads one extra (birthday-probing) socket, one datagram at a time.
async fn extra_recv_loop(inner: std::sync::Weak<Inner>, socket: Arc<UdpSocket>, via: usize) {
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    loop {
        let r = socket.recv_from(&mut buf).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match r {
            Ok((n, from)) => {
                inner.demux(via, from, &mut buf[..n], n, false);
            }
            Err(e) => trace!(mux = inner.id, via, "recv error: {e}"),
        }
    }
}

/// Hands a DATAGRAM record to whoever asked for them ([`UdpMux::datagrams`]).
fn deliver_datagram(inner: &Inner, shown: SocketAddr, data: &[u8]) {
    let tx = inner.datagrams.lock().expect("datagrams lock").clone();
    match tx {
        Some(tx) => {
            inner.stats.datagram_in.fetch_add(1, Ordering::Relaxed);
            if tx.try_send((shown, data.to_vec())).is_err() {
                inner.stats.datagram_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            inner.stats.unknown.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The address quinn is shown: in the socket's own family (quinn keeps IPv4 peers of an
/// IPv6 socket as IPv4-mapped addresses and compares them as such).
fn present(local: SocketAddr, a: SocketAddr) -> SocketAddr {
    match (local, a) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => a,
    }
}

/// quinn's view of the shared socket. While it exists, quinn's endpoint driver reads the
/// main socket through [`AsyncUdpSocket::poll_recv`].
struct QuicSocket {
    inner: Arc<Inner>,
}

impl Drop for QuicSocket {
    fn drop(&mut self) {
        self.inner
            .quinn_reads
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl std::fmt::Debug for QuicSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicSocket")
            .field("local", &self.inner.local)
            .finish()
    }
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits for socket writability; any number of these may wait at once.
struct Poller {
    inner: Arc<Inner>,
    fut: Option<WritableFuture>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Poller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        if self.fut.is_none() {
            let inner = self.inner.clone();
            self.fut = Some(Box::pin(async move { inner.main.io.writable().await }));
        }
        let r = self.fut.as_mut().expect("set above").as_mut().poll(cx);
        if r.is_ready() {
            self.fut = None;
        }
        r
    }
}

/// Copies `contents` (segments of `segment` bytes, the last maybe shorter) into `out`, each
/// segment behind a RELAY_DATA header for `slot`.
fn wrap_segments(out: &mut Vec<u8>, slot: u64, contents: &[u8], segment: usize) {
    out.clear();
    for seg in contents.chunks(segment.max(1)) {
        out.push(crate::core::rendezvous::udp_type::RELAY_DATA);
        out.extend_from_slice(&slot.to_be_bytes());
        out.extend_from_slice(seg);
    }
}

impl AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            inner: self.inner.clone(),
            fut: None,
        })
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.inner.try_send_routed(t)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let max = bufs.len().min(meta.len());
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        // First the packets other readers queued (this also registers for their arrival).
        {
            let mut rx = self.inner.quic_rx.lock().expect("quic queue lock");
            let mut n = 0;
            while n < max {
                let Poll::Ready(Some((from, data))) = rx.poll_recv(cx) else {
                    break;
                };
                let len = data.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&data[..len]);
                meta[n] = RecvMeta {
                    addr: from,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                n += 1;
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        // Then a batch from the main socket, demultiplexed where it lies.
        let main = &self.inner.main;
        loop {
            if let Err(e) = ready!(main.io.poll_recv_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            let n = match main.try_recv(&mut bufs[..max], &mut meta[..max]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // ICMP errors (port unreachable) surface here on Linux: not fatal.
                Err(e) => {
                    trace!(mux = self.inner.id, "recv error: {e}");
                    continue;
                }
            };
            for (m, b) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                let len = m.len.min(b.len());
                *m = match self.inner.demux(0, m.addr, &mut b[..len], m.stride, true) {
                    Some(k) => RecvMeta {
                        addr: k.addr,
                        len: k.len,
                        stride: k.stride,
                        ecn: if k.relayed { None } else { m.ecn },
                        dst_ip: None,
                    },
                    // Nothing for quinn in this buffer (quinn skips empty ones).
                    None => RecvMeta {
                        len: 0,
                        stride: 0,
                        ..*m
                    },
                };
            }
            return Poll::Ready(Ok(n));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.inner.local)
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.main.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.main.state.gro_segments()
    }

    /// Only what exceeds the link MTU is fragmented (see `allow_fragmentation`), and QUIC
    /// stays below `QUIC_MAX_UDP_PAYLOAD`: MTU discovery stays on up to that bound.
    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::rendezvous::udp_type;

    #[test]
    fn routes_resolve_virtual_addresses() {
        let mut r = Routes::default();
        let relay: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let v = r.add_relayed(relay, 42);
        assert!(is_virtual(v));
        assert_eq!(r.add_relayed(relay, 42), v, "same slot, same address");
        assert_eq!(r.resolve(v), Some((relay, Some(42), 0)));
        let d: SocketAddr = "198.51.100.2:5000".parse().unwrap();
        r.set_direct(v, Some(d));
        assert_eq!(r.resolve(v), Some((d, None, 0)));
        assert_eq!(r.by_direct.get(&d), Some(&v));
        r.set_direct_via(v, Some(d), 3);
        assert_eq!(r.resolve(v), Some((d, None, 3)));
        r.set_direct(v, None);
        assert_eq!(r.resolve(v), Some((relay, Some(42), 0)));
        // The address stays a known alias for receiving.
        assert_eq!(r.peer_of(d), Some(v));
        // Plain addresses pass through; unknown virtual ones go nowhere.
        assert_eq!(r.resolve(d), Some((d, None, 0)));
        let other: SocketAddr = "240.0.0.99:1".parse().unwrap();
        assert_eq!(r.resolve(other), None);
        r.remove(v);
        assert_eq!(r.resolve(v), None);
        assert_eq!(r.peer_of(d), None);
    }

    fn packet(first: u8, len: usize, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; len];
        p[0] = first;
        p
    }

    #[tokio::test]
    async fn demux_keeps_quic_in_place_and_copies_the_rest() {
        let (mux, mut control) = UdpMux::bind("127.0.0.1:0".parse().unwrap(), false)
            .await
            .unwrap();
        let from: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        // A GRO batch of one flow: QUIC, a punch probe of the same size, QUIC, short QUIC.
        let mut buf = [
            packet(0x40, 100, 1),
            packet(udp_type::PUNCH, 100, 2),
            packet(0x41, 100, 3),
            packet(0xC0, 60, 4),
        ]
        .concat();
        let k = mux.inner.demux(0, from, &mut buf, 100, true).unwrap();
        assert_eq!(
            (k.addr, k.len, k.stride, k.relayed),
            (from, 260, 100, false)
        );
        assert_eq!(&buf[..100], &packet(0x40, 100, 1)[..]);
        assert_eq!(&buf[100..200], &packet(0x41, 100, 3)[..]);
        assert_eq!(&buf[200..260], &packet(0xC0, 60, 4)[..]);
        let c = control.try_recv().unwrap();
        assert_eq!(
            (c.from, c.kind, c.payload),
            (from, UdpKind::Punch, packet(udp_type::PUNCH, 100, 2))
        );
        assert!(control.try_recv().is_err());
        assert!(mux.inner.quic_rx.lock().unwrap().try_recv().is_err());
        assert!(mux.last_heard(from).is_some());

        // Without `in_place` (the receive task), QUIC goes to the queue.
        let mut buf = [packet(0x40, 50, 5), packet(0x40, 20, 6)].concat();
        assert_eq!(mux.inner.demux(0, from, &mut buf, 50, false), None);
        let mut q = mux.inner.quic_rx.lock().unwrap();
        assert_eq!(q.try_recv().unwrap(), (from, packet(0x40, 50, 5)));
        assert_eq!(q.try_recv().unwrap(), (from, packet(0x40, 20, 6)));
    }

    #[tokio::test]
    async fn demux_unwraps_relayed_quic_in_place() {
        let (mux, _control) = UdpMux::bind("127.0.0.1:0".parse().unwrap(), false)
            .await
            .unwrap();
        let relay: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let (va, vb) = {
            let r = mux.routes();
            let mut r = r.lock().unwrap();
            (r.add_relayed(relay, 7), r.add_relayed(relay, 8))
        };
        let wrap = |slot, p: Vec<u8>| encode_relay_data(slot, &p);
        let mut buf = [
            wrap(7, packet(0x40, 100, 1)),
            wrap(7, packet(0x40, 100, 2)),
            wrap(8, packet(0x40, 100, 3)),
            wrap(99, packet(0x40, 100, 4)), // unknown slot: dropped
            wrap(7, packet(0x40, 30, 5)),
        ]
        .concat();
        let k = mux.inner.demux(0, relay, &mut buf, 109, true).unwrap();
        assert_eq!((k.addr, k.len, k.stride, k.relayed), (va, 230, 100, true));
        assert_eq!(&buf[..100], &packet(0x40, 100, 1)[..]);
        assert_eq!(&buf[100..200], &packet(0x40, 100, 2)[..]);
        assert_eq!(&buf[200..230], &packet(0x40, 30, 5)[..]);
        // The other peer's packet waits in the queue.
        let mut q = mux.inner.quic_rx.lock().unwrap();
        assert_eq!(q.try_recv().unwrap(), (vb, packet(0x40, 100, 3)));
        assert!(q.try_recv().is_err());
        // RELAY_DATA from anyone but the slot's relay is not accepted.
        let mut buf = wrap(7, packet(0x40, 100, 1));
        let other: SocketAddr = "192.0.2.2:3478".parse().unwrap();
        assert_eq!(mux.inner.demux(0, other, &mut buf, 109, true), None);
    }

    #[test]
    fn wrap_segments_heads_every_segment() {
        let mut out = Vec::new();
        let contents = [packet(0x40, 10, 1), packet(0x41, 10, 2), packet(0x42, 4, 3)].concat();
        wrap_segments(&mut out, 5, &contents, 10);
        let expected = [
            encode_relay_data(5, &packet(0x40, 10, 1)),
            encode_relay_data(5, &packet(0x41, 10, 2)),
            encode_relay_data(5, &packet(0x42, 4, 3)),
        ]
        .concat();
        assert_eq!(out, expected);
    }
}
