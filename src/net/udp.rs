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

use crate::core::limits::{MAX_STUN_PENDING, MAX_UDP_PAYLOAD, QUIC_RECV_QUEUE};

/// Extra sockets (birthday probing) one mux opens at most.
pub const MAX_EXTRA_SOCKETS: usize = 1024;
use crate::core::rendezvous::{classify, decode_relay_data, encode_relay_data, UdpKind};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

/// Control packets (punch, relay control, datagrams) queued for the socket's owner.
const CONTROL_QUEUE: usize = 1024;

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

struct Inner {
    socket: Arc<UdpSocket>,
    /// Extra sockets (birthday probing), index `via - 1`; never closed while the mux lives.
    extra: std::sync::RwLock<Vec<Arc<UdpSocket>>>,
    quic_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    control_tx: mpsc::Sender<Control>,
    local: SocketAddr,
    routes: Arc<Mutex<Routes>>,
    quic_rx: Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
    stun: Mutex<StunWaiters>,
    stats: MuxStats,
    /// Last time (ms since the socket started) a packet arrived from each direct address.
    last_rx: Mutex<HashMap<SocketAddr, std::time::Instant>>,
    relay_mode: bool,
    /// Where DATAGRAM records (first byte 0x05) go, once someone asked for them.
    datagrams: Mutex<Option<mpsc::Sender<Received>>>,
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
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let local = socket.local_addr()?;
        let (qtx, qrx) = mpsc::channel(QUIC_RECV_QUEUE);
        let (ctx, crx) = mpsc::channel(CONTROL_QUEUE);
        let inner = Arc::new(Inner {
            socket: socket.clone(),
            extra: std::sync::RwLock::new(Vec::new()),
            quic_tx: qtx.clone(),
            control_tx: ctx.clone(),
            local,
            routes: Arc::new(Mutex::new(Routes::default())),
            quic_rx: Mutex::new(qrx),
            stun: Mutex::new(HashMap::new()),
            stats: MuxStats::default(),
            last_rx: Mutex::new(HashMap::new()),
            relay_mode,
            datagrams: Mutex::new(None),
        });
        let id = MUX_IDS.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(recv_loop(Arc::downgrade(&inner), socket, 0, qtx, ctx, id));
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
        self.inner.socket.send_to(payload, to).await.map(|_| ())
    }

    fn socket(&self, via: usize) -> Option<Arc<UdpSocket>> {
        if via == 0 {
            return Some(self.inner.socket.clone());
        }
        self.inner
            .extra
            .read()
            .expect("extra lock")
            .get(via - 1)
            .cloned()
    }

    /// Sends one payload from socket `via` (0: main).
    pub async fn send_via(&self, payload: &[u8], to: SocketAddr, via: usize) -> io::Result<()> {
        let s = self
            .socket(via)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such socket"))?;
        s.send_to(payload, to).await.map(|_| ())
    }

    /// From now on, DATAGRAM records (`core::datagram`, first byte 0x05) that arrive on this
    /// socket, directly or inside RELAY_DATA from a relay slot we know, go to the returned
    /// receiver, at most `queue` waiting (more are dropped, as a full socket buffer would).
    /// The sender is shown as the peer's virtual address when the record came through the
    /// relay or from a proven alias of a peer, so replies sent with [`UdpMux::send_routed`]
    /// follow the peer's current path. A second call replaces the first receiver.
    pub fn datagrams(&self, queue: usize) -> mpsc::Receiver<Received> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        *self.inner.datagrams.lock().expect("datagrams lock") = Some(tx);
        rx
    }

    /// Sends one payload to `dest` the way QUIC packets go: a virtual address resolves to
    /// the peer's direct path, or through its relay slot (wrapped in RELAY_DATA); any other
    /// address is used as is. A peer without a path at the moment loses the packet (UDP).
    pub async fn send_routed(&self, payload: &[u8], dest: SocketAddr) -> io::Result<()> {
        let resolved = self
            .inner
            .routes
            .lock()
            .expect("routes lock")
            .resolve(canonical(dest));
        let Some((to, slot, via)) = resolved else {
            return Ok(());
        };
        match slot {
            None => self.send_via(payload, to, via).await,
            Some(slot) => {
                self.send_via(&encode_relay_data(slot, payload), to, via)
                    .await
            }
        }
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
            tokio::spawn(recv_loop(
                Arc::downgrade(&self.inner),
                s,
                via,
                self.inner.quic_tx.clone(),
                self.inner.control_tx.clone(),
                u32::MAX,
            ));
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

    /// The socket as quinn sees it.
    pub fn quic_socket(&self) -> Arc<dyn AsyncUdpSocket> {
        Arc::new(QuicSocket {
            inner: self.inner.clone(),
        })
    }
}

async fn recv_loop(
    inner: std::sync::Weak<Inner>,
    socket: Arc<UdpSocket>,
    via: usize,
    quic: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    control: mpsc::Sender<Control>,
    id: u32,
) {
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors (port unreachable) surface here on Linux: not fatal.
            Err(e) => {
                trace!(mux = id, "recv error: {e}");
                if inner.strong_count() == 0 {
                    return;
                }
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let from = canonical(from);
        let data = &buf[..n];
        inner
            .last_rx
            .lock()
            .expect("last_rx lock")
            .insert(from, std::time::Instant::now());
        match classify(data) {
            UdpKind::Stun => {
                if data.len() >= 20 {
                    let txid: [u8; 12] = data[8..20].try_into().expect("12 bytes");
                    if let Some(w) = inner.stun.lock().expect("stun lock").remove(&txid) {
                        let _ = w.send((from, data.to_vec()));
                    }
                }
            }
            UdpKind::Quic => {
                let shown = inner
                    .routes
                    .lock()
                    .expect("routes lock")
                    .by_direct
                    .get(&from)
                    .copied();
                if shown.is_some() {
                    inner.stats.direct_in.fetch_add(1, Ordering::Relaxed);
                }
                inner.stats.quic_in.fetch_add(1, Ordering::Relaxed);
                let shown = present(inner.local, shown.unwrap_or(from));
                if quic.try_send((shown, data.to_vec())).is_err() {
                    inner.stats.quic_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            UdpKind::Datagram if !inner.relay_mode => {
                let shown = inner
                    .routes
                    .lock()
                    .expect("routes lock")
                    .by_direct
                    .get(&from)
                    .copied();
                deliver_datagram(&inner, shown.unwrap_or(from), data);
            }
            UdpKind::RelayData if !inner.relay_mode => {
                let Ok((slot, packet)) = decode_relay_data(data) else {
                    continue;
                };
                let kind = classify(packet);
                if kind != UdpKind::Quic && kind != UdpKind::Datagram {
                    continue;
                }
                let virt = {
                    let mut r = inner.routes.lock().expect("routes lock");
                    match r.by_slot.get(&slot).copied() {
                        Some(v)
                            if r.peers.get(&v).and_then(|p| p.relay).map(|x| x.0) == Some(from) =>
                        {
                            Some(v)
                        }
                        Some(_) => None,
                        // A relay we use introduces a peer whose INCOMING we missed.
                        None if r.relays.contains(&from) => Some(r.add_relayed(from, slot)),
                        None => None,
                    }
                };
                let Some(virt) = virt else {
                    inner.stats.unknown.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                inner.stats.relayed_in.fetch_add(1, Ordering::Relaxed);
                if kind == UdpKind::Datagram {
                    deliver_datagram(&inner, virt, packet);
                    continue;
                }
                if quic
                    .try_send((present(inner.local, virt), packet.to_vec()))
                    .is_err()
                {
                    inner.stats.quic_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            UdpKind::Unknown => {
                inner.stats.unknown.fetch_add(1, Ordering::Relaxed);
            }
            kind => {
                inner.stats.control_in.fetch_add(1, Ordering::Relaxed);
                if control
                    .try_send(Control {
                        from,
                        via,
                        kind,
                        payload: data.to_vec(),
                    })
                    .is_err()
                {
                    debug!(mux = id, "control queue full: dropped a {kind:?} packet");
                }
            }
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

/// quinn's view of the shared socket.
#[derive(Clone)]
struct QuicSocket {
    inner: Arc<Inner>,
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
    socket: Arc<UdpSocket>,
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
            let s = self.socket.clone();
            self.fut = Some(Box::pin(async move { s.writable().await }));
        }
        let r = self.fut.as_mut().expect("set above").as_mut().poll(cx);
        if r.is_ready() {
            self.fut = None;
        }
        r
    }
}

impl AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            socket: self.inner.socket.clone(),
            fut: None,
        })
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let dest = canonical(t.destination);
        let resolved = self.inner.routes.lock().expect("routes lock").resolve(dest);
        let Some((to, slot, via)) = resolved else {
            // A peer with no path at the moment: the packet is lost, QUIC retransmits.
            return Ok(());
        };
        let socket = if via == 0 {
            self.inner.socket.clone()
        } else {
            match self.inner.extra.read().expect("extra lock").get(via - 1) {
                Some(s) => s.clone(),
                None => return Ok(()),
            }
        };
        let r = match slot {
            None => socket.try_send_to(t.contents, to),
            Some(slot) => socket.try_send_to(&encode_relay_data(slot, t.contents), to),
        };
        match r {
            Ok(_) => Ok(()),
            // Only the main socket's writability is what quinn waits for; an extra socket's
            // full buffer loses the packet (QUIC retransmits).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && via == 0 => Err(e),
            // Unreachable networks and the like: drop the packet as the network would.
            Err(e) => {
                trace!("send to {to} failed: {e}");
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.inner.quic_rx.lock().expect("quic queue lock");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let item = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => item,
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "socket closed",
                        )))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                }
            };
            let (from, data) = item;
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
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.inner.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
