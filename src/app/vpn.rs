//! The VPN service: `qssh listen --vpn ADDR` and `qssh connect TARGET --vpn ADDR`.
//!
//! Each side owns one TUN interface ([`Tunnel`]) and a table of peers. A packet read from the
//! TUN goes to the peer its destination belongs to (the listener: the peer whose tunnel
//! address it is; the connector: its one peer), over the UDP path when both directions of it
//! are confirmed, otherwise over the VPN channel of the session (reliable, on the TCP link).
//! A packet that arrives from a peer, by either path, is written to the TUN only if its
//! source address is one that peer may use (crypto-routing: `core::vpn::check_inbound`);
//! everything else is dropped and counted.
//!
//! UDP: packets travel as datagram records (`core::datagram`) under per-direction epoch keys.
//! Each side announces its epoch secrets through the session (DATAGRAM_EPOCH), the receiver
//! installs them and confirms (DATAGRAM_EPOCH_OK), and only then does the sender seal under
//! the new epoch, so a rotation never leaves the receiver without the key of a packet in
//! flight. Senders rotate on the schedule of `DatagramSender::needs_rotation` (packets and
//! time). Wire formats and the path rules are in docs/vpn.md.
//!
//! Per tunnel, one packet thread ([`PacketThread`]) waits on the TUN and the direct UDP
//! socket with epoll: it reads the TUN in batches of up to 128 packets (GSO-split by tun-rs
//! with offload) and sends each packet on, and it reads the UDP socket (recvmmsg/GRO) and
//! writes what opens to the TUN, with no async runtime in between. Async tasks, per peer: one
//! channel reader (packets that came over the session) and one control task (epochs, path
//! probes and keepalives, key expiry); per tunnel, one reader of the records that arrive on
//! the NAT traversal socket. Nothing here parses wire bytes itself: that is `core::vpn` and
//! `core::datagram`.

use super::dial::{dial_with, resolve_target, ConnectError, DialOptions, Transport};
use super::router::{route, ChannelEvent, ChannelSender, Incoming, RouterHandle};
use super::store::Home;
use crate::core::crypto::{random_array, OsRandom, Secret32};
use crate::core::datagram::{
    peek_receiver_session, DatagramReceiver, DatagramSender, DatagramStats, Direction,
    EpochAnnouncement, DATAGRAM_OVERHEAD,
};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::PeerId;
use crate::core::limits::VPN_DATAGRAM_QUEUE;
use crate::core::session::CloseReason;
use crate::core::vpn::{
    check_inbound, ip_addresses, AllowedIps, Deframer, PathNews, Prefix, UdpPath, Verdict,
    VpnError, VpnMessage, VpnParams, MAX_ROUTES, MAX_TUNNEL_ADDRESSES, MAX_VPN_MTU, MIN_VPN_MTU,
};
use crate::net::tcp::SessionHandle;
use crate::net::tun::{Tun, TunConfig, TunError};
use crate::net::udp::UdpMux;
use crate::net::udp_path::{records, MuxPath, PacketPath, RecvBuffers, UdpLink};
use anyhow::{Context, Result};
use rustix::event::epoll;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// How long a connector waits for the listener's PARAMS after the channel opened.
pub const PARAMS_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest tunnel MTU when records ride the session's path: the default minus the relay's
/// RELAY_DATA header, since the path may be relayed at any time.
pub const SESSION_PATH_MAX_MTU: u16 =
    crate::core::vpn::DEFAULT_VPN_MTU - crate::core::rendezvous::RELAY_DATA_HEADER as u16;
/// Control tasks look at their timers at least this often (rotation by age, key expiry).
const CONTROL_TICK: Duration = Duration::from_secs(1);
/// A TUN read batch keeps reading without waiting while this many buffers are free (one
/// GSO super-packet splits into at most 64 KiB / 1240 < 64 packets).
const TUN_BATCH_FREE: usize = 64;
/// Bytes of packets framed into one channel send on the TCP path.
const TCP_BATCH_BYTES: usize = 256 * 1024;
/// How long closing a tunnel waits for its packet thread to let go of it.
const PACKET_THREAD_STOP: Duration = Duration::from_secs(1);

/// Local VPN configuration (command line).
#[derive(Debug, Clone)]
pub struct VpnOptions {
    /// This side's tunnel addresses: at most one IPv4 and one IPv6, with prefix.
    pub addresses: Vec<Prefix>,
    pub tun_name: Option<String>,
    /// Connector only: networks routed into the tunnel (and accepted from it).
    pub routes: Vec<Prefix>,
    pub mtu: u16,
    /// Offer and use a UDP path.
    pub udp: bool,
    /// TUN offload (IFF_VNET_HDR, TSO/GRO batching).
    pub offload: bool,
    /// Rotate datagram epochs sooner than the protocol limits (tests, benchmarks).
    pub rekey: Option<(u64, Duration)>,
}

/// Why the VPN could not start.
#[derive(Debug, Error)]
pub enum VpnSetupError {
    #[error("{0}")]
    Tun(#[from] TunError),
    #[error("--vpn needs at least one address, e.g. --vpn 10.200.0.1/24")]
    NoAddress,
    #[error("--vpn takes at most one IPv4 and one IPv6 address")]
    TwoOfFamily,
    #[error(
        "{0} cannot be a tunnel address (use a unicast address with a prefix, e.g. 10.200.0.1/24)"
    )]
    Unusable(Prefix),
    #[error("at most {MAX_ROUTES} --route networks")]
    TooManyRoutes,
    #[error("--mtu must be between {MIN_VPN_MTU} and {MAX_VPN_MTU}")]
    Mtu,
    #[error("the peer refused the VPN: {0}")]
    Refused(String),
    #[error("VPN protocol error: {0}")]
    Protocol(String),
    #[error("cannot start the VPN's packet thread: {0} (the system is out of threads or file descriptors)")]
    Thread(String),
}

impl VpnOptions {
    pub fn validate(&self) -> Result<(), VpnSetupError> {
        if self.addresses.is_empty() {
            return Err(VpnSetupError::NoAddress);
        }
        let v4 = self.addresses.iter().filter(|a| a.addr.is_ipv4()).count();
        if v4 > 1 || self.addresses.len() - v4 > 1 || self.addresses.len() > MAX_TUNNEL_ADDRESSES {
            return Err(VpnSetupError::TwoOfFamily);
        }
        if let Some(a) = self
            .addresses
            .iter()
            .find(|a| !a.is_usable_tunnel_address())
        {
            return Err(VpnSetupError::Unusable(*a));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(VpnSetupError::TooManyRoutes);
        }
        if !(MIN_VPN_MTU..=MAX_VPN_MTU).contains(&self.mtu) {
            return Err(VpnSetupError::Mtu);
        }
        Ok(())
    }
}

/// Per-peer counters (atomics: the data tasks update them without locks).
#[derive(Debug, Default)]
pub struct PeerStats {
    pub tx_udp: AtomicU64,
    pub tx_tcp: AtomicU64,
    pub tx_errors: AtomicU64,
    pub rx_udp: AtomicU64,
    pub rx_tcp: AtomicU64,
    pub spoofed: AtomicU64,
    pub malformed: AtomicU64,
    pub epochs_sent: AtomicU64,
    pub epochs_received: AtomicU64,
}

/// Control work for a peer's control task.
#[derive(Debug)]
enum Ctl {
    Tell(PathNews),
    Keepalive,
    Install(EpochAnnouncement),
    Confirmed(u32),
}

/// The listener's handle on one peer's VPN: forwards that session's datagram epoch events.
pub struct ListenerVpn {
    ctl: mpsc::UnboundedSender<Ctl>,
}

/// One peer of a tunnel.
struct Peer {
    label: String,
    addresses: Vec<Prefix>,
    allowed: AllowedIps,
    chan: ChannelSender,
    session: SessionHandle,
    tx: Mutex<DatagramSender>,
    rx: Mutex<DatagramReceiver>,
    local_session: u32,
    path: Mutex<UdpPath>,
    /// Cache of `path.use_udp(now)` for the data tasks.
    udp_on: AtomicBool,
    endpoint: Mutex<Option<SocketAddr>>,
    /// The endpoint is the session's own peer address (records on the session's path, which
    /// the NAT traversal socket routes): authentic records do not move it.
    fixed_endpoint: bool,
    link: Option<Arc<dyn PacketPath>>,
    /// On a direct link: a socket connected to the peer's endpoint, made by the packet
    /// thread once records arrive from there ([`UdpLink::connected`]). It closes with the
    /// peer.
    socket: Mutex<Option<Arc<UdpLink>>>,
    ctl: mpsc::UnboundedSender<Ctl>,
    stats: PeerStats,
}

impl Peer {
    fn now_udp(&self, now: Instant) {
        let on = self.path.lock().expect("path lock").use_udp(now) && self.link.is_some();
        if self.udp_on.swap(on, Ordering::AcqRel) != on {
            info!(peer = %self.label, "packets now go over {}", if on { "UDP" } else { "the TCP link" });
        }
    }

    /// Rotates the sending epoch when the schedule says so; the announcement goes through
    /// the session, and activation waits for the peer's confirmation.
    fn maybe_rotate(&self, tx: &mut DatagramSender, now: Instant) {
        if self.link.is_none() || !tx.needs_rotation(now) {
            return;
        }
        match tx.rotate(now, &mut OsRandom) {
            Ok(a) => {
                self.session
                    .announce_datagram_epoch(a.epoch, *a.secret.expose());
                self.stats.epochs_sent.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %self.label, epoch = a.epoch, "announced datagram epoch");
            }
            Err(e) => warn!(peer = %self.label, "cannot rotate datagram epoch: {e}"),
        }
    }

    fn summary(&self) -> String {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d: DatagramStats = self.rx.lock().expect("rx lock").stats();
        format!(
            "vpn: peer {}: sent {} packets ({} over UDP, {} UDP send errors), received {} ({} over UDP); dropped {} with a spoofed source, {} malformed, {} replayed, {} failed authentication, {} with an unknown epoch; datagram epochs {} sent, {} received",
            self.label,
            g(&s.tx_udp) + g(&s.tx_tcp),
            g(&s.tx_udp),
            g(&s.tx_errors),
            g(&s.rx_udp) + g(&s.rx_tcp),
            g(&s.rx_udp),
            g(&s.spoofed),
            g(&s.malformed) + d.malformed,
            d.replayed,
            d.bad_auth,
            d.unknown_epoch,
            g(&s.epochs_sent),
            g(&s.epochs_received),
        )
    }
}

#[derive(Default)]
struct PeerTable {
    by_addr: HashMap<IpAddr, Arc<Peer>>,
    by_session: HashMap<u32, Arc<Peer>>,
    /// Connector: every packet goes to its one peer.
    default: Option<Arc<Peer>>,
}

impl PeerTable {
    fn lookup(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.default.as_ref().or_else(|| self.by_addr.get(&dst))
    }
}

/// Tunnel-wide counters.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Packets from our TUN for which no peer exists.
    pub no_peer: AtomicU64,
    /// Packets from our TUN with a link-local, multicast or unspecified source (router
    /// solicitations and the like): not forwarded.
    pub local_only: AtomicU64,
}

/// One TUN interface and its peers.
pub struct Tunnel {
    tun: Tun,
    mtu: u16,
    headroom: usize,
    peers: RwLock<PeerTable>,
    pub stats: TunnelStats,
}

/// Reusable buffers for writes to the TUN (a GRO batch).
struct TunWriter {
    bufs: Vec<Vec<u8>>,
    n: usize,
    /// tun-rs's coalescing tables: about 1.5 MB, written as they are built, which costs
    /// milliseconds of page faults. Built on the first batch of two or more packets, never
    /// for a lone packet (the first ping, interactive traffic).
    gro: Option<Box<GROTable>>,
    headroom: usize,
}

impl TunWriter {
    fn new(headroom: usize) -> Self {
        TunWriter {
            bufs: Vec::new(),
            n: 0,
            gro: None,
            headroom,
        }
    }
    /// The next buffer, holding `headroom` zero bytes; [`Self::commit`] keeps it.
    fn slot(&mut self) -> &mut Vec<u8> {
        if self.n == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(2048));
        }
        let b = &mut self.bufs[self.n];
        b.clear();
        b.resize(self.headroom, 0);
        b
    }
    fn commit(&mut self) {
        self.n += 1;
    }
    fn flush(&mut self, t: &Tunnel) {
        let result = match self.n {
            0 => return,
            // One packet: one write. Its headroom is a zeroed virtio-net header when offload
            // is on ("no offload needed"), nothing otherwise.
            1 => t.tun.dev.send(&self.bufs[0]).map(drop),
            n => {
                let gro = self.gro.get_or_insert_with(Box::default);
                t.tun
                    .dev
                    .send_multiple(gro, &mut self.bufs[..n], self.headroom)
                    .map(drop)
            }
        };
        if let Err(e) = result {
            debug!("TUN write failed: {e}");
        }
        self.n = 0;
    }
}

fn is_local_only(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_link_local(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local(),
    }
}

impl Tunnel {
    fn create(opts: &VpnOptions) -> Result<Tunnel, VpnSetupError> {
        let tun = Tun::create(&TunConfig {
            name: opts.tun_name.clone(),
            addresses: opts.addresses.clone(),
            mtu: opts.mtu,
            offload: opts.offload,
        })?;
        let headroom = if tun.offload { VIRTIO_NET_HDR_LEN } else { 0 };
        Ok(Tunnel {
            tun,
            mtu: opts.mtu,
            headroom,
            peers: RwLock::new(PeerTable::default()),
            stats: TunnelStats::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.tun.name
    }

    fn peer_by_session(&self, session: u32) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .expect("peers lock")
            .by_session
            .get(&session)
            .cloned()
    }

    /// The crypto-routing check for a packet that came from `peer`; drops are counted (and
    /// logged, sparsely). Returns whether the packet may go to the TUN.
    fn admit(&self, peer: &Peer, pkt: &[u8]) -> bool {
        match check_inbound(&peer.allowed, pkt) {
            Verdict::Accept => true,
            Verdict::Spoofed => {
                let n = peer.stats.spoofed.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    let src = ip_addresses(pkt)
                        .map(|(s, _)| s.to_string())
                        .unwrap_or_default();
                    warn!(peer = %peer.label, %src, "dropped a packet with a source address the peer may not use ({n} so far)");
                }
                false
            }
            Verdict::Malformed => {
                peer.stats.malformed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Adds a packet that came from `peer` over the channel to the TUN batch, if admitted.
    fn deliver(&self, peer: &Peer, pkt: &[u8], w: &mut TunWriter) {
        if self.admit(peer, pkt) {
            peer.stats.rx_tcp.fetch_add(1, Ordering::Relaxed);
            w.slot().extend_from_slice(pkt);
            w.commit();
        }
    }

    /// Opens datagram records received from `from` (several of `stride` bytes each with
    /// GRO) into the TUN batch `w`: records for unknown sessions and records that fail any
    /// check are dropped and counted. Full GRO batches are written on the way, the rest
    /// stays for the caller's flush. With `learned`, each peer heard from is noted once.
    fn records_to_tun(
        &self,
        from: SocketAddr,
        buf: &[u8],
        stride: usize,
        w: &mut TunWriter,
        cache: &mut Option<(u32, Arc<Peer>)>,
        mut learned: Option<&mut Vec<(Arc<Peer>, SocketAddr)>>,
    ) {
        let now = Instant::now();
        for rec in records(buf, stride) {
            let peer = self.open_record(now, from, rec, w, cache);
            if let (Some(p), Some(l)) = (peer, learned.as_deref_mut()) {
                if !l.iter().any(|(q, f)| Arc::ptr_eq(q, p) && *f == from) {
                    l.push((p.clone(), from));
                }
            }
            // GRO coalescing works on batches of this size.
            if w.n >= IDEAL_BATCH_SIZE {
                w.flush(self);
            }
        }
    }

    /// Opens one record into the TUN batch; returns its peer if the record was authentic.
    /// The peer of the last record is kept in `cache` (a packet's cold turn then touches no
    /// peer table and no reference count).
    fn open_record<'c>(
        &self,
        now: Instant,
        from: SocketAddr,
        rec: &[u8],
        w: &mut TunWriter,
        cache: &'c mut Option<(u32, Arc<Peer>)>,
    ) -> Option<&'c Arc<Peer>> {
        let session = peek_receiver_session(rec)?;
        if cache.as_ref().is_none_or(|(s, _)| *s != session) {
            *cache = Some((session, self.peer_by_session(session)?));
        }
        let peer = &cache.as_ref()?.1;
        let buf = w.slot();
        let start = buf.len();
        let opened = peer.rx.lock().expect("rx lock").open(now, rec, buf).is_ok();
        if !opened {
            return None;
        }
        // Authentic: this is where the peer is (it may have roamed).
        if !peer.fixed_endpoint {
            let mut ep = peer.endpoint.lock().expect("endpoint lock");
            if *ep != Some(from) {
                debug!(peer = %peer.label, %from, "UDP endpoint");
                *ep = Some(from);
            }
        }
        let actions = peer.path.lock().expect("path lock").on_datagram(now);
        if let Some(news) = actions.tell {
            let _ = peer.ctl.send(Ctl::Tell(news));
        }
        if actions.send_keepalive {
            let _ = peer.ctl.send(Ctl::Keepalive);
        }
        if !peer.udp_on.load(Ordering::Relaxed) {
            peer.now_udp(now);
        }
        let pkt = &w.bufs[w.n][start..];
        // Empty: a keepalive.
        if !pkt.is_empty() && self.admit(peer, pkt) {
            peer.stats.rx_udp.fetch_add(1, Ordering::Relaxed);
            w.commit();
        }
        Some(peer)
    }

    /// Reads what the TUN holds (up to a batch) and sends every packet to its peer. The
    /// first read of a wake-up goes out before the TUN is read again, so a lone packet (a
    /// ping, a keystroke) does not wait for the read that finds the TUN empty; what came in
    /// meanwhile is read as one batch. Returns false when the TUN failed.
    fn read_tun(&self, rt: &Handle, r: &mut TunReader) -> bool {
        for until_empty in [false, true] {
            match self.fill(r, until_empty) {
                Ok(0) => break,
                Ok(filled) => self.send_read(rt, r, filled),
                Err(e) => {
                    warn!(tun = %self.tun.name, "TUN read failed: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Reads the TUN into `r`'s buffers: one read, or with `until_empty` reads until it is
    /// empty or a batch is full. Returns how many packets were read.
    fn fill(&self, r: &mut TunReader, until_empty: bool) -> io::Result<usize> {
        let mut filled = 0;
        while filled + TUN_BATCH_FREE <= IDEAL_BATCH_SIZE {
            match self.tun.dev.recv_multiple(
                &mut r.original,
                &mut r.bufs[filled..],
                &mut r.sizes[filled..],
                0,
            ) {
                Ok(n) if until_empty => filled += n,
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Sends the first `filled` packets in `r`'s buffers, each to the peer its destination
    /// routes to.
    fn send_read(&self, rt: &Handle, r: &mut TunReader, filled: usize) {
        r.groups.clear();
        {
            let table = self.peers.read().expect("peers lock");
            for i in 0..filled {
                let pkt = &r.bufs[i][..r.sizes[i]];
                let Ok((src, dst)) = ip_addresses(pkt) else {
                    continue;
                };
                if is_local_only(src) {
                    self.stats.local_only.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match table.lookup(dst) {
                    Some(p) => match r.groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, p)) {
                        Some((_, v)) => v.push(i),
                        None => {
                            let mut v = r.spare.pop().unwrap_or_default();
                            v.push(i);
                            r.groups.push((p.clone(), v));
                        }
                    },
                    None => {
                        self.stats.no_peer.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        for (peer, mut idx) in r.groups.drain(..) {
            let pkts = idx.iter().map(|&i| &r.bufs[i][..r.sizes[i]]);
            send_packets(rt, &peer, pkts, &mut r.out);
            idx.clear();
            r.spare.push(idx);
        }
    }

    /// Receives the datagram records waiting on `link` and writes what opens to the TUN.
    fn read_udp(
        &self,
        link: &UdpLink,
        rb: &mut RecvBuffers,
        w: &mut TunWriter,
        cache: &mut Option<(u32, Arc<Peer>)>,
        mut learned: Option<&mut Vec<(Arc<Peer>, SocketAddr)>>,
    ) {
        let n = match link.try_recv_batch(rb) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("UDP receive failed: {e}");
                return;
            }
        };
        for i in 0..n {
            let (from, payload, stride) = rb.get(i);
            self.records_to_tun(from, payload, stride, w, cache, learned.as_deref_mut());
        }
        w.flush(self);
    }

    /// Receives datagram records from the NAT traversal socket ([`UdpMux::datagrams`]) until
    /// it closes; what is queued is taken in one batch, so TUN writes coalesce (GRO).
    async fn mux_reader(self: Arc<Self>, mut rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>) {
        let mut w = TunWriter::new(self.headroom);
        let mut cache = None;
        while let Some((from, rec)) = rx.recv().await {
            self.records_to_tun(from, &rec, rec.len(), &mut w, &mut cache, None);
            let mut more = 0;
            while more < IDEAL_BATCH_SIZE {
                let Ok((from, rec)) = rx.try_recv() else {
                    break;
                };
                self.records_to_tun(from, &rec, rec.len(), &mut w, &mut cache, None);
                more += 1;
            }
            w.flush(&self);
        }
    }

    /// Reads the VPN channel of `peer` until it closes: packets to the TUN, path news to
    /// the path state.
    async fn channel_reader(
        self: Arc<Self>,
        peer: Arc<Peer>,
        mut events: mpsc::UnboundedReceiver<ChannelEvent>,
        early: Vec<Vec<u8>>,
    ) -> String {
        let mut w = TunWriter::new(self.headroom);
        for pkt in &early {
            self.deliver(&peer, pkt, &mut w);
        }
        w.flush(&self);
        let mut deframer = Deframer::default();
        loop {
            let data = match events.recv().await {
                Some(ChannelEvent::Data(d)) => d,
                Some(ChannelEvent::Eof) => continue,
                Some(ChannelEvent::Closed { reason, .. }) => return reason,
                None => return "session ended".into(),
            };
            deframer.push(&data);
            let r = deframer.drain(|m| {
                match m {
                    VpnMessage::Packet(p) => self.deliver(&peer, p, &mut w),
                    VpnMessage::UdpOk => path_news(&peer, PathNews::UdpOk),
                    VpnMessage::UdpLost => path_news(&peer, PathNews::UdpLost),
                    VpnMessage::Params(_) => {
                        return Err(VpnError::Params("PARAMS after the channel started"))
                    }
                }
                Ok(())
            });
            w.flush(&self);
            peer.chan.consumed_buffer(data.len(), data);
            if let Err(e) = r {
                peer.chan.close(CloseCode::Protocol, &e.to_string());
                return format!("protocol error: {e}");
            }
        }
    }
}

fn path_news(peer: &Peer, news: PathNews) {
    peer.path.lock().expect("path lock").on_news(news);
    peer.now_udp(Instant::now());
}

/// Sends packets read from the TUN to `peer`: sealed datagram records over UDP when that
/// path is up, PACKET messages on the VPN channel otherwise (and for whatever cannot be
/// sealed). A direct socket is written right here on the packet thread; the session's path
/// and the channel belong to the async runtime, which this thread waits on through `rt`
/// (so a full session still holds the TUN reader back, as flow control should).
fn send_packets<'a, I>(rt: &Handle, peer: &Peer, pkts: I, out: &mut Outbox)
where
    I: ExactSizeIterator<Item = &'a [u8]> + Clone,
{
    let mut sealed = 0;
    if peer.udp_on.load(Ordering::Relaxed) {
        let dest = *peer.endpoint.lock().expect("endpoint lock");
        if let (Some(dest), Some(link)) = (dest, peer.link.as_ref()) {
            let now = Instant::now();
            let Outbox { buf, runs } = out;
            buf.clear();
            runs.clear();
            // Runs of equal-sized records (the last of a run may be shorter), one GSO send
            // each: `runs` holds (end, stride) of each.
            let mut run_open = false;
            {
                let mut tx = peer.tx.lock().expect("tx lock");
                peer.maybe_rotate(&mut tx, now);
                for pkt in pkts.clone() {
                    let before = buf.len();
                    if tx.seal(now, pkt, buf).is_err() {
                        break;
                    }
                    sealed += 1;
                    let len = buf.len() - before;
                    match runs.last_mut() {
                        Some((end, stride)) if run_open && len <= *stride => {
                            *end = buf.len();
                            run_open = len == *stride;
                        }
                        _ => {
                            runs.push((buf.len(), len));
                            run_open = true;
                        }
                    }
                }
            }
            let connected = peer
                .socket
                .lock()
                .expect("socket lock")
                .clone()
                .filter(|s| s.peer() == Some(dest));
            let mut start = 0;
            for &(end, stride) in runs.iter() {
                let batch = &buf[start..end];
                let sent = match (connected.as_deref(), link.direct()) {
                    (Some(udp), _) | (None, Some(udp)) => {
                        udp.send_records_blocking(dest, batch, stride)
                    }
                    (None, None) => rt.block_on(link.send_records(dest, batch, stride)),
                };
                if let Err(e) = sent {
                    peer.stats.tx_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer.label, "UDP send failed: {e}");
                }
                start = end;
            }
            if sealed > 0 {
                peer.stats
                    .tx_udp
                    .fetch_add(sealed as u64, Ordering::Relaxed);
                peer.path.lock().expect("path lock").on_sent(now);
            }
        }
    }
    let rest = pkts.len() - sealed;
    if rest == 0 {
        return;
    }
    let buf = &mut out.buf;
    buf.clear();
    for (i, pkt) in pkts.skip(sealed).enumerate() {
        VpnMessage::Packet(pkt).encode(buf);
        if buf.len() >= TCP_BATCH_BYTES || i + 1 == rest {
            match rt.block_on(peer.chan.send(std::mem::take(buf))) {
                Ok(back) => *buf = back,
                Err(_) => return,
            }
        }
    }
    peer.stats.tx_tcp.fetch_add(rest as u64, Ordering::Relaxed);
}

/// Reusable send state: sealed records (or PACKET messages for the channel) and the runs
/// of equal-sized records among them, as (end, stride).
struct Outbox {
    buf: Vec<u8>,
    runs: Vec<(usize, usize)>,
}

/// The packet thread's reusable TUN read state.
struct TunReader {
    /// One read with offload: a virtio-net header and a super-packet of up to 64 KiB.
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    out: Outbox,
    /// This batch's packets by peer (indices into `bufs`), and emptied index lists to reuse.
    groups: Vec<(Arc<Peer>, Vec<usize>)>,
    spare: Vec<Vec<usize>>,
}

impl TunReader {
    fn new(mtu: u16) -> TunReader {
        let size = usize::from(mtu).max(1500) + 64;
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: (0..IDEAL_BATCH_SIZE).map(|_| vec![0u8; size]).collect(),
            sizes: vec![0usize; IDEAL_BATCH_SIZE],
            out: Outbox {
                buf: Vec::with_capacity(TCP_BATCH_BYTES),
                runs: Vec::new(),
            },
            groups: Vec::new(),
            spare: Vec::new(),
        }
    }
}

/// A tunnel's packet thread: it reads the TUN and the direct UDP socket, waiting on both
/// with one epoll, and sends on the direct socket itself, so no async runtime stands
/// between a packet and its system calls (the shape of boringtun's and wireguard-go's
/// loops; tokio's wake-ups there cost a VPN ping about 13 % of its round trip, see
/// docs/vpn.md). The thread ends when the TUN fails or this handle goes.
struct PacketThread {
    /// Write end of a pipe whose read end the thread waits on: closing it wakes the thread.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PacketThread {
    /// Starts the thread for `tunnel` with `link`, the direct UDP socket if there is one.
    /// Must be called inside the tokio runtime that runs the sessions.
    fn start(tunnel: Arc<Tunnel>, link: Option<Arc<UdpLink>>) -> io::Result<PacketThread> {
        let rt = Handle::current();
        let (stop_rx, stop_tx) = rustix::pipe::pipe()?;
        let thread = std::thread::Builder::new()
            .name("qssh-vpn-packets".into())
            .spawn(move || tunnel.packet_loop(&rt, link.as_deref(), &stop_rx))?;
        Ok(PacketThread {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits, at most [`PACKET_THREAD_STOP`], until it has let go of
    /// the tunnel (the runtime keeps running meanwhile: the thread may be waiting on it).
    async fn stop(mut self) {
        self.stop.take();
        let deadline = Instant::now() + PACKET_THREAD_STOP;
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Tunnel {
    /// The packet thread's loop (see [`PacketThread`]).
    fn packet_loop(&self, rt: &Handle, link: Option<&UdpLink>, stop: &OwnedFd) {
        // Registered once (level-triggered), so a wake-up costs one epoll_wait.
        let ep = (|| {
            let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
            watch(&ep, stop, STOP)?;
            watch(&ep, &self.tun.dev, TUN)?;
            if let Some(l) = link {
                watch(&ep, l, UDP)?;
            }
            rustix::io::Result::Ok(ep)
        })();
        let ep = match ep {
            Ok(ep) => ep,
            Err(e) => {
                warn!(tun = %self.tun.name, "VPN packet thread: cannot set up epoll: {e}");
                return;
            }
        };
        let mut reader = TunReader::new(self.mtu);
        let mut rb = link.map(UdpLink::recv_buffers);
        let mut w = TunWriter::new(self.headroom);
        let mut cache = None;
        // Sockets connected to one peer each (token PEER_SOCKETS + index); the peer owns
        // the socket, so it closes (and leaves the epoll set) when the peer goes.
        let mut sockets: Vec<Weak<UdpLink>> = Vec::new();
        let mut learned = Vec::new();
        let none = epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(STOP),
        };
        let mut events = [none; 8];
        loop {
            let n = match epoll::wait(&ep, &mut events, None) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(tun = %self.tun.name, "VPN packet thread: epoll failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data.u64() {
                    STOP => return,
                    TUN => {
                        if !self.read_tun(rt, &mut reader) {
                            return;
                        }
                    }
                    token => {
                        let (Some(main), Some(rb)) = (link, rb.as_mut()) else {
                            continue;
                        };
                        if token == UDP {
                            self.read_udp(main, rb, &mut w, &mut cache, Some(&mut learned));
                            for (peer, from) in learned.drain(..) {
                                connect_peer(&ep, main, &peer, from, &mut sockets);
                            }
                        } else if let Some(sock) = usize::try_from(token - PEER_SOCKETS)
                            .ok()
                            .and_then(|i| sockets.get(i))
                            .and_then(Weak::upgrade)
                        {
                            self.read_udp(&sock, rb, &mut w, &mut cache, None);
                        }
                    }
                }
            }
        }
    }
}

/// Packet thread epoll tokens.
const STOP: u64 = 0;
const TUN: u64 = 1;
const UDP: u64 = 2;
const PEER_SOCKETS: u64 = 3;

fn watch(ep: &OwnedFd, fd: &impl AsFd, token: u64) -> rustix::io::Result<()> {
    epoll::add(
        ep,
        fd,
        epoll::EventData::new_u64(token),
        epoll::EventFlags::IN,
    )
}

/// Gives `peer`, just heard from `from` on the main socket of a direct link, a socket
/// connected to `from` (unless it has one already), watched by the packet thread.
fn connect_peer(
    ep: &OwnedFd,
    main: &UdpLink,
    peer: &Peer,
    from: SocketAddr,
    sockets: &mut Vec<Weak<UdpLink>>,
) {
    if peer.link.as_ref().and_then(|l| l.direct()).is_none() {
        return;
    }
    let mut current = peer.socket.lock().expect("socket lock");
    if current.as_ref().is_some_and(|s| s.peer() == Some(from)) {
        return;
    }
    let sock = match main.connected(from) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            debug!(peer = %peer.label, %from, "no connected UDP socket: {e}");
            return;
        }
    };
    let i = sockets
        .iter()
        .position(|w| w.strong_count() == 0)
        .unwrap_or_else(|| {
            sockets.push(Weak::new());
            sockets.len() - 1
        });
    if let Err(e) = watch(ep, &*sock, PEER_SOCKETS + i as u64) {
        debug!(peer = %peer.label, "cannot watch the connected UDP socket: {e}");
        return;
    }
    sockets[i] = Arc::downgrade(&sock);
    // A socket connected to an earlier address closes here.
    *current = Some(sock);
}

/// Sends one empty datagram record (probe or keepalive) if the path has a destination.
async fn send_keepalive(peer: &Peer) {
    let (Some(link), Some(dest)) = (
        peer.link.as_ref(),
        *peer.endpoint.lock().expect("endpoint lock"),
    ) else {
        return;
    };
    let now = Instant::now();
    let mut rec = Vec::with_capacity(DATAGRAM_OVERHEAD);
    let sealed = {
        let mut tx = peer.tx.lock().expect("tx lock");
        peer.maybe_rotate(&mut tx, now);
        tx.seal(now, &[], &mut rec).is_ok()
    };
    if sealed {
        if let Err(e) = link.send_records(dest, &rec, rec.len()).await {
            debug!(peer = %peer.label, "UDP keepalive failed: {e}");
        }
        peer.path.lock().expect("path lock").on_sent(now);
    }
}

/// A peer's control task: epoch announcements and confirmations, path probes, keepalives
/// and news, key expiry. Ends when the peer's control channel closes.
async fn control(peer: Arc<Peer>, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
    loop {
        let now = Instant::now();
        let deadline = {
            let path = peer.path.lock().expect("path lock").next_deadline();
            let keys = peer.rx.lock().expect("rx lock").next_deadline();
            [path, keys, Some(now + CONTROL_TICK)]
                .into_iter()
                .flatten()
                .min()
                .expect("tick is always set")
        };
        let cmd = tokio::select! {
            c = ctl.recv() => match c {
                Some(c) => Some(c),
                None => return,
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => None,
        };
        let now = Instant::now();
        match cmd {
            Some(Ctl::Tell(news)) => {
                let mut msg = Vec::new();
                match news {
                    PathNews::UdpOk => VpnMessage::UdpOk.encode(&mut msg),
                    PathNews::UdpLost => VpnMessage::UdpLost.encode(&mut msg),
                }
                let _ = peer.chan.send(msg).await;
            }
            Some(Ctl::Keepalive) => send_keepalive(&peer).await,
            Some(Ctl::Install(a)) => {
                let epoch = a.epoch;
                match peer.rx.lock().expect("rx lock").install(now, a) {
                    Ok(()) => {
                        peer.session.confirm_datagram_epoch(epoch);
                        peer.stats.epochs_received.fetch_add(1, Ordering::Relaxed);
                        debug!(peer = %peer.label, epoch, "installed datagram epoch");
                    }
                    Err(e) => {
                        warn!(peer = %peer.label, "refused datagram epoch: {e}");
                        peer.chan.close(CloseCode::Protocol, &e.to_string());
                    }
                }
            }
            Some(Ctl::Confirmed(epoch)) => {
                let first = {
                    let mut tx = peer.tx.lock().expect("tx lock");
                    let first = tx.active_epoch().is_none();
                    if let Err(e) = tx.activate(epoch) {
                        debug!(peer = %peer.label, "confirmation ignored: {e}");
                    }
                    first
                };
                // The sender can seal now: probe at once rather than at the next backoff.
                if first && peer.endpoint.lock().expect("endpoint lock").is_some() {
                    send_keepalive(&peer).await;
                }
            }
            None => {
                peer.rx.lock().expect("rx lock").expire(now);
                {
                    let mut tx = peer.tx.lock().expect("tx lock");
                    peer.maybe_rotate(&mut tx, now);
                }
                let actions = peer.path.lock().expect("path lock").poll(now);
                if let Some(news) = actions.tell {
                    let _ = peer.ctl.send(Ctl::Tell(news));
                }
                if actions.send_keepalive {
                    send_keepalive(&peer).await;
                }
                peer.now_udp(now);
            }
        }
    }
}

/// Everything needed to build a peer once both parameter blocks are known.
struct PeerSetup {
    label: String,
    /// The peer's tunnel addresses.
    addresses: Vec<Prefix>,
    allowed: AllowedIps,
    chan: ChannelSender,
    session: SessionHandle,
    initiator: bool,
    local_session: u32,
    peer_session: u32,
    endpoint: Option<SocketAddr>,
    fixed_endpoint: bool,
    link: Option<Arc<dyn PacketPath>>,
    rekey: Option<(u64, Duration)>,
}

fn build_peer(s: PeerSetup) -> (Arc<Peer>, mpsc::UnboundedReceiver<Ctl>) {
    let (send_dir, recv_dir) = if s.initiator {
        (
            Direction::InitiatorToResponder,
            Direction::ResponderToInitiator,
        )
    } else {
        (
            Direction::ResponderToInitiator,
            Direction::InitiatorToResponder,
        )
    };
    let mut tx = DatagramSender::new(send_dir, s.peer_session);
    if let Some((packets, interval)) = s.rekey {
        tx.set_rekey_limits(packets, interval);
    }
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let probing = s.endpoint.is_some() && s.link.is_some();
    let peer = Arc::new(Peer {
        label: s.label,
        addresses: s.addresses,
        allowed: s.allowed,
        chan: s.chan,
        session: s.session,
        tx: Mutex::new(tx),
        rx: Mutex::new(DatagramReceiver::new(recv_dir, s.local_session)),
        local_session: s.local_session,
        path: Mutex::new(UdpPath::new(now, probing)),
        udp_on: AtomicBool::new(false),
        endpoint: Mutex::new(s.endpoint),
        fixed_endpoint: s.fixed_endpoint,
        link: s.link,
        socket: Mutex::new(None),
        ctl: ctl_tx,
        stats: PeerStats::default(),
    });
    if peer.link.is_some() {
        let mut tx = peer.tx.lock().expect("tx lock");
        peer.maybe_rotate(&mut tx, now);
    }
    (peer, ctl_rx)
}

fn new_session_id() -> u32 {
    loop {
        let id = u32::from_be_bytes(random_array(&mut OsRandom));
        if id != 0 {
            return id;
        }
    }
}

// ----- listener side -----

/// The listener's tunnel: one TUN, one UDP socket, any number of VPN peers.
pub struct VpnServer {
    tunnel: Arc<Tunnel>,
    opts: VpnOptions,
    link: Option<Arc<UdpLink>>,
    udp_port: u16,
    /// The listener's NAT traversal socket, for peers whose session runs over QUIC on it.
    mux: Mutex<Option<Arc<MuxPath>>>,
    tasks: Mutex<JoinSet<()>>,
    /// Runs as long as the listener.
    _packets: PacketThread,
}

impl VpnServer {
    /// Creates the TUN interface and, unless UDP is off, binds UDP on `udp_addr` (the TCP
    /// listener's address and port). Prints the interface name.
    pub fn start(opts: VpnOptions, udp_addr: SocketAddr) -> Result<Arc<VpnServer>, VpnSetupError> {
        opts.validate()?;
        let tunnel = Arc::new(Tunnel::create(&opts)?);
        let link = if opts.udp {
            match UdpLink::bind(udp_addr) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    warn!("no UDP path for the VPN: cannot bind {udp_addr}: {e}");
                    None
                }
            }
        } else {
            None
        };
        let udp_port = link
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port());
        let packets = PacketThread::start(tunnel.clone(), link.clone())
            .map_err(|e| VpnSetupError::Thread(e.to_string()))?;
        eprintln!(
            "vpn: interface {} up with {} (MTU {}){}",
            tunnel.name(),
            join(&opts.addresses),
            opts.mtu,
            if udp_port != 0 {
                format!(", UDP port {udp_port}")
            } else {
                String::new()
            }
        );
        Ok(Arc::new(VpnServer {
            tunnel,
            opts,
            link,
            udp_port,
            mux: Mutex::new(None),
            tasks: Mutex::new(JoinSet::new()),
            _packets: packets,
        }))
    }

    /// Carries the datagram records of peers whose session runs over QUIC on `mux` (the
    /// listener's UDP socket: direct, punched or relayed) on that same socket.
    pub fn attach_mux(&self, mux: &UdpMux) {
        if !self.opts.udp {
            return;
        }
        let rx = mux.datagrams(VPN_DATAGRAM_QUEUE);
        self.tasks
            .lock()
            .expect("tasks lock")
            .spawn(self.tunnel.clone().mux_reader(rx));
        *self.mux.lock().expect("mux lock") = Some(Arc::new(MuxPath::new(mux.clone())));
    }

    pub fn interface(&self) -> &str {
        self.tunnel.name()
    }

    /// Answers an authorized peer's VPN channel request: checks its parameters, accepts the
    /// channel, and serves the peer until the channel closes. Refusals are sent to the peer
    /// and returned for the log. `session_addr`: the peer's address on the listener's UDP
    /// socket when the session runs over QUIC there (virtual for relayed peers).
    pub fn accept(
        self: &Arc<Self>,
        router: &RouterHandle,
        ch: u32,
        params: &[u8],
        peer_id: PeerId,
        session_addr: Option<SocketAddr>,
    ) -> Result<ListenerVpn, String> {
        let refuse = |code: CloseCode, why: String| {
            router.reject(ch, code, &why);
            Err(why)
        };
        let p = match VpnParams::decode(params) {
            Ok(p) => p,
            Err(e) => return refuse(CloseCode::Unsupported, e.to_string()),
        };
        if let Err(why) = self.check_addresses(&p.addresses) {
            return refuse(CloseCode::Refused, why);
        }
        let channel = router.accept(ch, ChannelKind::Vpn);
        let session = channel.session().clone();
        let (chan, events) = channel.split();
        let local_session = new_session_id();
        // Records ride the session's own path when both sides can; otherwise our own port.
        let session_path = match (session_addr, self.mux.lock().expect("mux lock").clone()) {
            (Some(a), Some(m)) if p.udp && p.session_path => Some((a, m)),
            _ => None,
        };
        let (link, endpoint): (Option<Arc<dyn PacketPath>>, _) = match &session_path {
            Some((a, m)) => (Some(m.clone()), Some(*a)),
            None if p.udp => match &self.link {
                Some(l) => (Some(l.clone()), None),
                None => (None, None),
            },
            None => (None, None),
        };
        let use_udp = link.is_some();
        let mine = VpnParams {
            udp: use_udp,
            mtu: self.opts.mtu,
            receiver_session: local_session,
            udp_port: if use_udp && session_path.is_none() {
                self.udp_port
            } else {
                0
            },
            session_path: session_path.is_some(),
            addresses: self.opts.addresses.clone(),
        };
        let label = peer_id.short();
        let (peer, ctl_rx) = build_peer(PeerSetup {
            label: label.clone(),
            addresses: p.addresses.clone(),
            allowed: AllowedIps::new(p.addresses.iter().map(|a| Prefix::host(a.addr))),
            chan: chan.clone(),
            session,
            initiator: false,
            local_session,
            peer_session: p.receiver_session,
            endpoint,
            fixed_endpoint: session_path.is_some(),
            link,
            rekey: self.opts.rekey,
        });
        // PARAMS first on the channel; our epoch announcement follows on the session.
        let mut msg = Vec::new();
        VpnMessage::Params(mine).encode(&mut msg);
        {
            let chan = chan.clone();
            tokio::spawn(async move {
                let _ = chan.send(msg).await;
            });
        }
        {
            let mut t = self.tunnel.peers.write().expect("peers lock");
            if let Some(taken) = p.addresses.iter().find(|a| t.by_addr.contains_key(&a.addr)) {
                drop(t);
                chan.close(CloseCode::Refused, "address in use");
                return Err(format!(
                    "tunnel address {} is in use by another peer",
                    taken.addr
                ));
            }
            for a in &p.addresses {
                t.by_addr.insert(a.addr, peer.clone());
            }
            t.by_session.insert(local_session, peer.clone());
        }
        eprintln!(
            "vpn: peer {label} joined with {}{}",
            join(&p.addresses),
            if session_path.is_some() {
                " (UDP on the session's path)"
            } else if use_udp {
                ""
            } else {
                " (TCP link only)"
            }
        );
        let ctl = peer.ctl.clone();
        let server = self.clone();
        let mut tasks = self.tasks.lock().expect("tasks lock");
        while tasks.try_join_next().is_some() {}
        let task_peer = peer.clone();
        tasks.spawn(async move {
            let control = tokio::spawn(control(task_peer.clone(), ctl_rx));
            let why = server
                .tunnel
                .clone()
                .channel_reader(task_peer.clone(), events, Vec::new())
                .await;
            control.abort();
            server.remove(&task_peer);
            eprintln!("{}", task_peer.summary());
            eprintln!("vpn: peer {} left ({why})", task_peer.label);
        });
        Ok(ListenerVpn { ctl })
    }

    fn check_addresses(&self, addrs: &[Prefix]) -> Result<(), String> {
        for a in addrs {
            let Some(net) = self
                .opts
                .addresses
                .iter()
                .find(|m| m.addr.is_ipv4() == a.addr.is_ipv4())
            else {
                return Err(format!(
                    "this listener has no {} tunnel network for {}",
                    if a.addr.is_ipv4() { "IPv4" } else { "IPv6" },
                    a.addr
                ));
            };
            if !net.contains(a.addr) || a.addr == net.addr || a.addr == net.network().addr {
                return Err(format!(
                    "tunnel address {} is not a host address of the listener's network {}",
                    a.addr,
                    net.network()
                ));
            }
            if self
                .tunnel
                .peers
                .read()
                .expect("peers lock")
                .by_addr
                .contains_key(&a.addr)
            {
                return Err(format!(
                    "tunnel address {} is in use by another peer",
                    a.addr
                ));
            }
        }
        Ok(())
    }

    fn remove(&self, peer: &Arc<Peer>) {
        let mut t = self.tunnel.peers.write().expect("peers lock");
        for a in &peer.addresses {
            if t.by_addr.get(&a.addr).is_some_and(|p| Arc::ptr_eq(p, peer)) {
                t.by_addr.remove(&a.addr);
            }
        }
        t.by_session.remove(&peer.local_session);
    }
}

impl ListenerVpn {
    /// Session-level datagram epoch events for this peer's VPN.
    pub fn on_incoming(&self, inc: &Incoming) {
        let c = match inc {
            Incoming::DatagramEpoch { epoch, secret } => {
                match EpochAnnouncement::from_bytes(&announcement_bytes(*epoch, secret)) {
                    Ok(a) => Ctl::Install(a),
                    Err(e) => {
                        warn!("bad datagram epoch announcement: {e}");
                        return;
                    }
                }
            }
            Incoming::DatagramEpochConfirmed { epoch } => Ctl::Confirmed(*epoch),
            _ => return,
        };
        let _ = self.ctl.send(c);
    }
}

fn announcement_bytes(epoch: u32, secret: &[u8; 32]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut v = zeroize::Zeroizing::new(Vec::with_capacity(36));
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(secret);
    v
}

fn join(addrs: &[Prefix]) -> String {
    addrs
        .iter()
        .map(Prefix::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// ----- connector side -----

/// `qssh connect TARGET --vpn ADDR`: connects (over TCP, QUIC by address, or through a
/// relay by peer ID), brings up the tunnel, and runs until SIGINT/SIGTERM or until the peer
/// leaves. Returns the exit status.
pub async fn connect(
    home: &Home,
    target: &str,
    default_port: u16,
    dial_opts: (bool, String, Option<Secret32>),
    transport: Transport,
    opts: VpnOptions,
) -> Result<i32> {
    opts.validate()?;
    // The interface is created (ioctls, and `ip` for --route) on a blocking thread while
    // this task loads the identity, connects and runs the handshake: its setup is off the
    // path to the first packet. A failure (no CAP_NET_ADMIN) ends the command at once with
    // that one error, abandoning the dial. Packets routed into the interface before the
    // peer answers wait in its queue.
    let tun_opts = opts.clone();
    let make_tunnel = async move {
        tokio::task::spawn_blocking(move || -> Result<Tunnel, VpnSetupError> {
            let t = Tunnel::create(&tun_opts)?;
            for r in &tun_opts.routes {
                t.add_route(r)?;
            }
            Ok(t)
        })
        .await
        .context("TUN setup task")?
        .map_err(anyhow::Error::from)
    };
    let (accept_new, name, psk) = dial_opts;
    let connect = async {
        let identity = super::chat::load_identity(home)?;
        let target = match transport {
            // A peer ID for the relay: no LAN lookup.
            Transport::Relay { .. } => super::target::Target::parse(target, default_port)?,
            _ => resolve_target(target, default_port, identity.peer_id()).await?,
        };
        let c = dial_with(
            home,
            identity,
            DialOptions {
                target,
                accept_new,
                ask: true,
                name,
                psk,
            },
            transport,
        )
        .await?;
        anyhow::Ok(c)
    };
    let (tunnel, mut c) = tokio::try_join!(make_tunnel, connect)?;
    let tunnel = Arc::new(tunnel);
    let label = c.peer.peer_id().short();
    let listener_ip = c.addr.ip().to_canonical();
    let (router, mut incoming) = route(c.handle.clone(), c.take_events());
    let local_session = new_session_id();
    // Over QUIC, records can ride the session's own socket and path: the peer's address as
    // QUIC sees it (virtual when reached through a relay, resolved per send to the punched
    // direct address or the relay).
    let session_path = match (&c.udp, opts.udp) {
        (Some(u), true) => Some((
            u.agent.as_ref().map_or(c.addr, |(_, virt)| *virt),
            u.mux.clone(),
        )),
        _ => None,
    };
    let mine = VpnParams {
        udp: opts.udp,
        mtu: opts.mtu,
        receiver_session: local_session,
        udp_port: 0,
        session_path: session_path.is_some(),
        addresses: opts.addresses.clone(),
    };
    // Over TCP, the socket of a direct UDP path is bound while the channel request is in
    // flight (the OPEN goes out first); it is dropped if the listener offers no UDP.
    let bind_spare = async {
        if !opts.udp || c.udp.is_some() {
            return None;
        }
        let any: SocketAddr = if listener_ip.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        match UdpLink::bind(any) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                warn!("no UDP path: cannot bind a UDP socket: {e}");
                None
            }
        }
    };
    let params = mine.encode();
    let (opened, spare) = tokio::join!(router.open(ChannelKind::Vpn, &params), bind_spare);
    let channel = match opened {
        Ok(ch) => ch,
        Err(super::router::OpenError::Refused(_, why)) => {
            return Err(ConnectError::Session(CloseReason::Protocol(
                VpnSetupError::Refused(why).to_string(),
            ))
            .into())
        }
        Err(e) => return Err(ConnectError::Session(CloseReason::Protocol(e.to_string())).into()),
    };
    let session = channel.session().clone();
    let (chan, mut events) = channel.split();

    // The listener's PARAMS come first; session events that arrive meanwhile wait.
    let mut stash: Vec<Incoming> = Vec::new();
    let mut deframer = Deframer::default();
    let mut theirs: Option<VpnParams> = None;
    let mut early: Vec<Vec<u8>> = Vec::new();
    let mut early_news: Vec<PathNews> = Vec::new();
    let deadline = tokio::time::Instant::now() + PARAMS_TIMEOUT;
    while theirs.is_none() {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ChannelEvent::Data(d)) => {
                    chan.consumed(d.len());
                    deframer.push(&d);
                    deframer.drain(|m| {
                        match m {
                            VpnMessage::Params(p) if theirs.is_none() => theirs = Some(p),
                            VpnMessage::Params(_) => return Err(VpnError::Params("second PARAMS")),
                            _ if theirs.is_none() => return Err(VpnError::Params("data before PARAMS")),
                            VpnMessage::Packet(p) => early.push(p.to_vec()),
                            VpnMessage::UdpOk => early_news.push(PathNews::UdpOk),
                            VpnMessage::UdpLost => early_news.push(PathNews::UdpLost),
                        }
                        Ok(())
                    }).map_err(|e| VpnSetupError::Protocol(e.to_string()))?;
                }
                Some(ChannelEvent::Eof) => {}
                Some(ChannelEvent::Closed { reason, .. }) => {
                    return Err(VpnSetupError::Refused(reason).into());
                }
                None => return Err(ConnectError::Session(CloseReason::TransportClosed).into()),
            },
            inc = incoming.recv() => match inc {
                Some(Incoming::Closed(reason)) => return Err(ConnectError::Session(reason).into()),
                Some(other) => stash.push(other),
                None => return Err(ConnectError::Session(CloseReason::TransportClosed).into()),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(VpnSetupError::Protocol("the listener sent no VPN parameters".into()).into());
            }
        }
    }
    let theirs = theirs.expect("loop ends with params");
    let mut tasks = JoinSet::new();
    let mut opts = opts;
    let session_path = session_path.filter(|_| theirs.udp && theirs.session_path);
    // On the session's path a record may be relayed: leave room for the relay's header so a
    // full-sized packet still fits the link the default MTU was chosen for.
    let mut mtu = opts.mtu.min(theirs.mtu);
    if session_path.is_some() {
        mtu = mtu.min(SESSION_PATH_MAX_MTU);
    }
    if mtu != opts.mtu {
        opts.mtu = mtu;
        tunnel.set_mtu(opts.mtu)?;
    }
    let use_udp = opts.udp && theirs.udp && theirs.udp_port != 0 && c.udp.is_none();
    let spare_link = spare.filter(|_| use_udp);
    let link: Option<Arc<dyn PacketPath>> = if let Some((_, mux)) = &session_path {
        tasks.spawn(tunnel.clone().mux_reader(mux.datagrams(VPN_DATAGRAM_QUEUE)));
        Some(Arc::new(MuxPath::new(mux.clone())))
    } else if let Some(l) = spare_link.clone() {
        Some(l)
    } else {
        None
    };
    let endpoint = match &session_path {
        Some((addr, _)) => Some(*addr),
        None => link
            .as_ref()
            .map(|_| SocketAddr::new(listener_ip, theirs.udp_port)),
    };
    // From the listener we accept its tunnel networks and what we route through it.
    let allowed = AllowedIps::new(
        theirs
            .addresses
            .iter()
            .map(Prefix::network)
            .chain(opts.routes.iter().copied()),
    );
    let (peer, ctl_rx) = build_peer(PeerSetup {
        label: label.clone(),
        addresses: theirs.addresses.clone(),
        allowed,
        chan: chan.clone(),
        session,
        initiator: true,
        local_session,
        peer_session: theirs.receiver_session,
        endpoint,
        fixed_endpoint: session_path.is_some(),
        link: link.clone(),
        rekey: opts.rekey,
    });
    for n in early_news {
        path_news(&peer, n);
    }
    {
        let mut t = tunnel.peers.write().expect("peers lock");
        t.default = Some(peer.clone());
        t.by_session.insert(local_session, peer.clone());
    }
    // The data path first: packets queued in the TUN go out (over the channel: the UDP path
    // needs a round trip more) before anything else is set up or printed.
    let packets = PacketThread::start(
        tunnel.clone(),
        spare_link.clone().filter(|_| session_path.is_none()),
    )
    .map_err(|e| VpnSetupError::Thread(e.to_string()))?;
    let reader = tokio::spawn(tunnel.clone().channel_reader(
        peer.clone(),
        events,
        std::mem::take(&mut early),
    ));
    tasks.spawn(control(peer.clone(), ctl_rx));
    let up = format!(
        "vpn: interface {} up with {} (MTU {}), peer {} at {}{}{}\n",
        tunnel.name(),
        join(&opts.addresses),
        opts.mtu,
        label,
        join(&theirs.addresses),
        if opts.routes.is_empty() {
            String::new()
        } else {
            format!(", routes {}", join(&opts.routes))
        },
        match (endpoint, &session_path) {
            (Some(_), Some(_)) => "; UDP on the session's path".to_string(),
            (Some(e), None) => format!("; UDP to {e}"),
            (None, _) => "; TCP link only".into(),
        }
    );
    // One write: stderr is unbuffered, and eprintln! would write each piece on its own.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), up.as_bytes());
    let forward = |inc: &Incoming| {
        let c = match inc {
            Incoming::DatagramEpoch { epoch, secret } => {
                match EpochAnnouncement::from_bytes(&announcement_bytes(*epoch, secret)) {
                    Ok(a) => Ctl::Install(a),
                    Err(_) => return,
                }
            }
            Incoming::DatagramEpochConfirmed { epoch } => Ctl::Confirmed(*epoch),
            _ => return,
        };
        let _ = peer.ctl.send(c);
    };
    for inc in &stash {
        forward(inc);
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install SIGTERM handler")?;
    let mut reader = reader;
    let code = loop {
        tokio::select! {
            inc = incoming.recv() => match inc {
                Some(Incoming::Closed(reason)) => {
                    break match reason {
                        CloseReason::Normal => 0,
                        CloseReason::PeerClosed(_) => {
                            eprintln!("{reason}");
                            0
                        }
                        other => {
                            eprintln!("qssh: session ended: {other}");
                            crate::cli::EXIT_CONNECT
                        }
                    };
                }
                Some(Incoming::Request { ch, .. }) => {
                    router.reject(ch, CloseCode::Unsupported, "a connector offers no services");
                }
                Some(other) => forward(&other),
                None => break crate::cli::EXIT_CONNECT,
            },
            why = &mut reader => {
                let why = why.unwrap_or_else(|e| e.to_string());
                eprintln!("vpn: the peer closed the VPN ({why})");
                router.close(CloseCode::Normal, "vpn closed");
                break 0;
            }
            _ = tokio::signal::ctrl_c() => {
                router.close(CloseCode::Normal, "bye");
                break 0;
            }
            _ = sigterm.recv() => {
                router.close(CloseCode::Normal, "bye");
                break 0;
            }
        }
    };
    eprintln!("{}", peer.summary());
    // Give the goodbye a moment to reach the peer, then tear everything down: dropping the
    // last reference to the tunnel closes the TUN, and the kernel removes the interface and
    // its routes.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(inc) = incoming.recv().await {
            if matches!(inc, Incoming::Closed(_)) {
                break;
            }
        }
    })
    .await;
    reader.abort();
    tasks.shutdown().await;
    packets.stop().await;
    drop(peer);
    let name = tunnel.name().to_string();
    drop(tunnel);
    eprintln!("vpn: interface {name} removed");
    Ok(code)
}

impl Tunnel {
    fn add_route(&self, r: &Prefix) -> Result<(), TunError> {
        self.tun.add_route(r)
    }
    fn set_mtu(&self, mtu: u16) -> Result<(), TunError> {
        self.tun
            .dev
            .set_mtu(mtu)
            .map_err(|source| TunError::Configure {
                name: self.tun.name.clone(),
                what: format!("set MTU {mtu}"),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(addrs: &[&str]) -> VpnOptions {
        VpnOptions {
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            tun_name: None,
            routes: Vec::new(),
            mtu: crate::core::vpn::DEFAULT_VPN_MTU,
            udp: true,
            offload: false,
            rekey: None,
        }
    }

    #[test]
    fn option_rules() {
        assert!(opts(&["10.200.0.1/24", "fd00::1/64"]).validate().is_ok());
        assert!(matches!(
            opts(&[]).validate(),
            Err(VpnSetupError::NoAddress)
        ));
        assert!(matches!(
            opts(&["10.200.0.1/24", "10.201.0.1/24"]).validate(),
            Err(VpnSetupError::TwoOfFamily)
        ));
        assert!(matches!(
            opts(&["127.0.0.1/8"]).validate(),
            Err(VpnSetupError::Unusable(_))
        ));
        let mut o = opts(&["10.200.0.1/24"]);
        o.mtu = 100;
        assert!(matches!(o.validate(), Err(VpnSetupError::Mtu)));
        o.mtu = 1400;
        o.routes = vec!["10.0.0.0/8".parse().unwrap(); MAX_ROUTES + 1];
        assert!(matches!(o.validate(), Err(VpnSetupError::TooManyRoutes)));
    }

    #[test]
    fn local_only_sources_are_not_forwarded() {
        for ip in [
            "fe80::1",
            "ff02::2",
            "::",
            "0.0.0.0",
            "224.0.0.251",
            "169.254.1.1",
        ] {
            assert!(is_local_only(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.200.0.1", "fd00::1", "2001:db8::1"] {
            assert!(!is_local_only(ip.parse().unwrap()), "{ip}");
        }
    }
}
