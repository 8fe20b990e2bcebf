//! LAN discovery driver: moves [`crate::core::announce`] datagrams over real sockets and runs
//! mDNS/DNS-SD through the `mdns-sd` crate.
//!
//! - [`Announcer`]: started by a listener. Announces on every LAN interface (IPv4 subnet
//!   broadcast, IPv6 link-local multicast [`DISCOVERY_MULTICAST_V6`]) to [`DISCOVERY_PORT`]
//!   on a schedule, answers QUERY datagrams at once (rate limited), and registers the
//!   `_qssh._udp.local.` service over mDNS.
//! - [`discover`] / [`discover_until`]: on every interface sends a QUERY (broadcast and IPv6
//!   multicast) and a one-shot mDNS query (answered by unicast at once, see
//!   [`mdns_wire`]), listens for announcements, browses mDNS, and returns the merged,
//!   deduplicated peers when the timeout passes (or earlier when the caller's predicate says
//!   so). Queries repeat at [`QUERY_SCHEDULE`] offsets in case one is lost.
//!
//! Several processes on one host can announce and discover at once: the discovery port is
//! bound with SO_REUSEADDR and SO_REUSEPORT, broadcast and multicast datagrams reach every
//! such socket, and QUERY answers go to the querier's own ephemeral port.

use crate::core::announce::{
    decode_datagram, mdns_host_name, mdns_instance_name, mdns_txt, mdns_wire, resolve,
    sanitize_name, sighting_from_mdns, validate_ports, AnnounceError, Announcement, Conflict,
    Datagram, DiscoveredPeer, DiscoveryTable, ListenPort, Observed, Query, ResolveError, Sighting,
    SourceLimiter, TableStats, TokenBucket, Via, ANNOUNCE_INTERVAL, ANNOUNCE_STARTUP_BURST,
    DEFAULT_DISCOVER_TIMEOUT, DISCOVERY_MULTICAST_V6, DISCOVERY_PORT, MAX_DISCOVERY_DATAGRAM,
    MDNS_SERVICE_TYPE, MIN_ANNOUNCE_INTERVAL, QUERY_SCHEDULE, REPLIES_PER_SEC,
    REPLIES_PER_SOURCE_PER_SEC, REPLY_BURST, REPLY_BURST_PER_SOURCE, RX_BURST_PER_SOURCE,
    RX_PER_SOURCE_PER_SEC,
};
use crate::core::crypto::{random_array, OsRandom};
use crate::core::identity::PeerId;
use crate::core::limits::PROTOCOL_VERSION;
use mdns_sd::{ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// At most one log line per category per this interval; the rest are counted and the count
/// is reported with the next line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long [`Announcer::stop`] waits for the mDNS goodbye to go out.
const MDNS_GOODBYE_WAIT: Duration = Duration::from_millis(1000);
/// After a receive error, wait this long before the next receive (no busy loop).
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// Receive buffer: one byte more than the largest datagram, so an oversized one is seen.
const RX_BUF: usize = MAX_DISCOVERY_DATAGRAM + 1;

/// Why discovery could not run.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("invalid announcement: {0}")]
    Announce(#[from] AnnounceError),
    #[error("the display name is empty after sanitizing")]
    EmptyName,
    #[error("discovery socket: {0}")]
    Io(#[from] io::Error),
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    #[error("both broadcast and mDNS are disabled")]
    NothingEnabled,
    #[error("no discovery socket could be opened (IPv4: {v4}; IPv6: {v6})")]
    NoSocket { v4: String, v6: String },
}

/// What to announce and how.
#[derive(Debug, Clone)]
pub struct AnnouncerConfig {
    pub peer_id: PeerId,
    /// Display name; sanitized on start (see [`sanitize_name`]).
    pub name: String,
    /// Listening ports, primary (the session port) first; 1..=MAX_ANNOUNCED_PORTS.
    pub ports: Vec<ListenPort>,
    /// IPv4 subnet broadcast + IPv6 link-local multicast announcements and QUERY answers.
    pub broadcast: bool,
    /// mDNS/DNS-SD registration of `_qssh._udp.local.`.
    pub mdns: bool,
    /// UDP port of the broadcast mechanism ([`DISCOVERY_PORT`]; tests may move it).
    pub discovery_port: u16,
    /// Period of unsolicited announcements after the start-up burst (at least
    /// [`MIN_ANNOUNCE_INTERVAL`]).
    pub interval: Duration,
}

impl AnnouncerConfig {
    /// Both mechanisms, the standard port and period.
    pub fn new(peer_id: PeerId, name: &str, ports: Vec<ListenPort>) -> Self {
        AnnouncerConfig {
            peer_id,
            name: name.to_string(),
            ports,
            broadcast: true,
            mdns: true,
            discovery_port: DISCOVERY_PORT,
            interval: ANNOUNCE_INTERVAL,
        }
    }
}

/// Counters of a discovery socket loop (announcer or discover).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    /// Datagrams received on discovery sockets.
    pub received: u64,
    pub oversized: u64,
    /// Not a qssh discovery datagram (bad magic).
    pub foreign: u64,
    /// qssh magic, but malformed, of an unknown type, or of an unsupported version.
    pub malformed: u64,
    /// Dropped by the per-source receive rate limit.
    pub rate_limited: u64,
    pub queries_received: u64,
    pub queries_answered: u64,
    /// QUERYs not answered because of the reply rate limits.
    pub replies_limited: u64,
    pub announcements_received: u64,
    pub announcements_sent: u64,
    pub queries_sent: u64,
    pub send_errors: u64,
    /// One-shot mDNS queries sent (one per interface and address family).
    pub mdns_queries_sent: u64,
    /// Complete mDNS records received (one-shot answers and browse results).
    pub mdns_records: u64,
    /// mDNS answers or records that failed to parse or validate.
    pub mdns_rejected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    oversized: AtomicU64,
    foreign: AtomicU64,
    malformed: AtomicU64,
    rate_limited: AtomicU64,
    queries_received: AtomicU64,
    queries_answered: AtomicU64,
    replies_limited: AtomicU64,
    announcements_received: AtomicU64,
    announcements_sent: AtomicU64,
    queries_sent: AtomicU64,
    send_errors: AtomicU64,
    mdns_queries_sent: AtomicU64,
    mdns_records: AtomicU64,
    mdns_rejected: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> DiscoveryStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiscoveryStats {
            received: g(&self.received),
            oversized: g(&self.oversized),
            foreign: g(&self.foreign),
            malformed: g(&self.malformed),
            rate_limited: g(&self.rate_limited),
            queries_received: g(&self.queries_received),
            queries_answered: g(&self.queries_answered),
            replies_limited: g(&self.replies_limited),
            announcements_received: g(&self.announcements_received),
            announcements_sent: g(&self.announcements_sent),
            queries_sent: g(&self.queries_sent),
            send_errors: g(&self.send_errors),
            mdns_queries_sent: g(&self.mdns_queries_sent),
            mdns_records: g(&self.mdns_records),
            mdns_rejected: g(&self.mdns_rejected),
        }
    }
}

/// Lets one log line through per LOG_INTERVAL and counts the ones it held back.
#[derive(Debug, Default)]
struct LogGate {
    next: Option<Instant>,
    held: u64,
}

impl LogGate {
    /// `Some(number held back since the last line)` when a line may be logged now.
    fn pass(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|n| now < n) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + LOG_INTERVAL);
        Some(std::mem::take(&mut self.held))
    }
}

fn random_u64() -> u64 {
    u64::from_be_bytes(random_array::<8>(&mut OsRandom))
}

/// A nonzero random u64 (0 means "no query" in `reply_to`).
fn random_nonzero_u64() -> u64 {
    random_u64().max(1)
}

// ---------------------------------------------------------------------------------------------
// Sockets and interfaces

/// A UDP socket for discovery. `reuse`: SO_REUSEADDR + SO_REUSEPORT, so several processes
/// share the discovery port.
fn bind_udp(addr: SocketAddr, reuse: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_multicast_loop_v6(true)?;
        s.set_multicast_hops_v6(1)?;
    } else {
        s.set_broadcast(true)?;
    }
    if reuse {
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Where announcements and queries go on the current interfaces.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct LinkTargets {
    /// Subnet broadcast address of every up, non-loopback IPv4 interface that has one.
    v4_broadcast: BTreeSet<Ipv4Addr>,
    /// Index of every up, non-loopback interface with an IPv6 link-local address.
    v6_ifindex: BTreeSet<u32>,
    /// (address, prefix length, interface index) of every up, non-loopback IPv4 interface.
    v4_ifaces: BTreeSet<(Ipv4Addr, u8, u32)>,
}

impl LinkTargets {
    /// The interface whose IPv4 subnet holds `ip`.
    fn v4_ifindex_for(&self, ip: Ipv4Addr) -> Option<u32> {
        self.v4_ifaces.iter().find_map(|&(addr, prefix, index)| {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            (u32::from(addr) & mask == u32::from(ip) & mask).then_some(index)
        })
    }
}

fn link_targets() -> io::Result<LinkTargets> {
    let mut t = LinkTargets::default();
    for iface in if_addrs::get_if_addrs()? {
        if iface.is_loopback() || iface.oper_status == if_addrs::IfOperStatus::Down {
            continue;
        }
        match &iface.addr {
            if_addrs::IfAddr::V4(v4) => {
                if let Some(i) = iface.index {
                    t.v4_ifaces.insert((v4.ip, v4.prefixlen, i));
                }
                if let Some(b) = v4.broadcast {
                    if !b.is_broadcast() && !b.is_unspecified() {
                        t.v4_broadcast.insert(b);
                    }
                }
            }
            if_addrs::IfAddr::V6(v6) => {
                if v6.ip.segments()[0] & 0xffc0 == 0xfe80 {
                    if let Some(i) = iface.index {
                        t.v6_ifindex.insert(i);
                    }
                }
            }
        }
    }
    Ok(t)
}

/// The IPv4 and IPv6 sockets of one role (port listener or querier), either may be absent.
struct SocketPair {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    joined_v6: BTreeSet<u32>,
}

impl SocketPair {
    fn bind(port: u16, reuse: bool) -> Result<Self, DiscoveryError> {
        let v4 = bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), reuse);
        let v6 = bind_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), reuse);
        match (v4, v6) {
            (Err(e4), Err(e6)) => Err(DiscoveryError::NoSocket {
                v4: e4.to_string(),
                v6: e6.to_string(),
            }),
            (v4, v6) => {
                if let Err(e) = &v4 {
                    debug!("discovery: no IPv4 socket on port {port}: {e}");
                }
                if let Err(e) = &v6 {
                    debug!("discovery: no IPv6 socket on port {port}: {e}");
                }
                Ok(SocketPair {
                    v4: v4.ok(),
                    v6: v6.ok(),
                    joined_v6: BTreeSet::new(),
                })
            }
        }
    }

    /// Joins the IPv6 discovery group on interfaces not joined yet (new interfaces appear).
    fn join_groups(&mut self, targets: &LinkTargets) {
        let Some(v6) = &self.v6 else { return };
        for &i in &targets.v6_ifindex {
            if self.joined_v6.contains(&i) {
                continue;
            }
            match v6.join_multicast_v6(&DISCOVERY_MULTICAST_V6, i) {
                Ok(()) => {
                    self.joined_v6.insert(i);
                }
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    self.joined_v6.insert(i);
                }
                Err(e) => debug!("discovery: cannot join IPv6 group on interface {i}: {e}"),
            }
        }
        // Interfaces that vanished: forget them, so they are joined again if they return.
        self.joined_v6.retain(|i| targets.v6_ifindex.contains(i));
    }

    /// Sends `bytes` to every broadcast address and every IPv6 interface. Never blocks: a
    /// datagram the socket cannot take now is counted and dropped.
    fn send_all(&self, port: u16, bytes: &[u8], targets: &LinkTargets, counters: &Counters) -> u64 {
        let mut sent = 0;
        if let Some(v4) = &self.v4 {
            for b in &targets.v4_broadcast {
                match v4.try_send_to(bytes, SocketAddr::V4(SocketAddrV4::new(*b, port))) {
                    Ok(_) => sent += 1,
                    Err(_) => bump(&counters.send_errors),
                }
            }
        }
        if let Some(v6) = &self.v6 {
            for i in &targets.v6_ifindex {
                let to = SocketAddrV6::new(DISCOVERY_MULTICAST_V6, port, 0, *i);
                match v6.try_send_to(bytes, SocketAddr::V6(to)) {
                    Ok(_) => sent += 1,
                    Err(_) => bump(&counters.send_errors),
                }
            }
        }
        sent
    }
}

async fn recv_opt(s: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// One-shot mDNS querier (see [`mdns_wire`]): ephemeral sockets, so responders answer by
/// unicast, at once, and without their multicast rate limit.
struct MdnsQuerier {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    id: u16,
    query: Vec<u8>,
}

impl MdnsQuerier {
    fn bind() -> Result<Self, DiscoveryError> {
        let pair = SocketPair::bind(0, false)?;
        // RFC 6762 §11: mDNS traffic is sent with IP TTL / hop limit 255.
        if let Some(s) = &pair.v4 {
            SockRef::from(s).set_multicast_ttl_v4(255)?;
        }
        if let Some(s) = &pair.v6 {
            SockRef::from(s).set_multicast_hops_v6(255)?;
        }
        let id = (random_u64() as u16).max(1);
        Ok(MdnsQuerier {
            v4: pair.v4,
            v6: pair.v6,
            id,
            query: mdns_wire::legacy_ptr_query(id, MDNS_SERVICE_TYPE),
        })
    }

    /// Sends the query on every interface; never blocks.
    fn send(&self, targets: &LinkTargets, counters: &Counters) {
        if let Some(v4) = &self.v4 {
            for (ip, _, _) in &targets.v4_ifaces {
                let to = SocketAddr::from((mdns_wire::MDNS_GROUP_V4, mdns_wire::MDNS_PORT));
                let sent = SockRef::from(v4)
                    .set_multicast_if_v4(ip)
                    .and_then(|()| v4.try_send_to(&self.query, to));
                match sent {
                    Ok(_) => bump(&counters.mdns_queries_sent),
                    Err(_) => bump(&counters.send_errors),
                }
            }
        }
        if let Some(v6) = &self.v6 {
            for i in &targets.v6_ifindex {
                let to = SocketAddrV6::new(mdns_wire::MDNS_GROUP_V6, mdns_wire::MDNS_PORT, 0, *i);
                match v6.try_send_to(&self.query, SocketAddr::V6(to)) {
                    Ok(_) => bump(&counters.mdns_queries_sent),
                    Err(_) => bump(&counters.send_errors),
                }
            }
        }
    }

    /// Turns one answer into sightings. Link-local IPv6 addresses get the scope of the
    /// interface the answer came from; loopback addresses are dropped (they reach only this
    /// host, whose processes are listed with their LAN addresses anyway).
    fn sightings(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        targets: &LinkTargets,
        counters: &Counters,
    ) -> Result<Vec<Sighting>, AnnounceError> {
        let scope = match src {
            SocketAddr::V6(v6) => Some(v6.scope_id()).filter(|s| *s != 0),
            SocketAddr::V4(v4) => targets.v4_ifindex_for(*v4.ip()),
        };
        let mut out = Vec::new();
        for inst in mdns_wire::parse_response(bytes, self.id, MDNS_SERVICE_TYPE)? {
            let addrs: Vec<SocketAddr> = inst
                .ips
                .iter()
                .filter(|ip| !ip.is_loopback())
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(SocketAddr::from((*v4, inst.port))),
                    IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
                        scope.map(|s| SocketAddr::V6(SocketAddrV6::new(*v6, inst.port, 0, s)))
                    }
                    IpAddr::V6(v6) => Some(SocketAddr::V6(SocketAddrV6::new(*v6, inst.port, 0, 0))),
                })
                .collect();
            match sighting_from_mdns(&|k| inst.get(k), &inst.fullname, inst.port, &addrs) {
                Ok(s) => {
                    bump(&counters.mdns_records);
                    out.push(s);
                }
                Err(_) => bump(&counters.mdns_rejected),
            }
        }
        Ok(out)
    }
}

/// Classifies one received datagram: rate limit, size, decode. Updates counters; returns
/// the decoded datagram when it should be acted on.
fn accept_datagram(
    now: Instant,
    bytes: &[u8],
    src: SocketAddr,
    limiter: &mut SourceLimiter,
    counters: &Counters,
    gate: &mut LogGate,
) -> Option<Datagram> {
    bump(&counters.received);
    if !limiter.allow(now, src.ip()) {
        bump(&counters.rate_limited);
        if let Some(held) = gate.pass(now) {
            debug!("discovery: rate limiting {src} ({held} earlier drops not logged)");
        }
        return None;
    }
    match decode_datagram(bytes) {
        Ok(d) => Some(d),
        Err(e) => {
            match e {
                AnnounceError::Oversized(_) => bump(&counters.oversized),
                AnnounceError::Foreign => bump(&counters.foreign),
                _ => bump(&counters.malformed),
            }
            if let Some(held) = gate.pass(now) {
                debug!("discovery: ignoring datagram from {src}: {e} ({held} earlier drops not logged)");
            }
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Announcer

struct MdnsRegistration {
    daemon: ServiceDaemon,
    fullname: String,
}

impl MdnsRegistration {
    fn start(a: &Announcement) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let props = mdns_txt(a);
        let port = a.ports.first().map(|p| p.port).unwrap_or(0);
        let info = ServiceInfo::new(
            MDNS_SERVICE_TYPE,
            &mdns_instance_name(a),
            &mdns_host_name(a),
            (),
            port,
            &props[..],
        )?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon.register(info)?;
        Ok(MdnsRegistration { daemon, fullname })
    }

    /// Sends the goodbye (bounded wait) and stops the daemon thread.
    async fn stop(self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = tokio::time::timeout(MDNS_GOODBYE_WAIT, rx.recv_async()).await;
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(MDNS_GOODBYE_WAIT, rx.recv_async()).await;
        }
    }
}

/// A running announcer. Stop it with [`Announcer::stop`] (sends the mDNS goodbye); dropping
/// it stops it too, without waiting.
pub struct Announcer {
    peer_id: PeerId,
    instance: u64,
    name: String,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    mdns: Option<MdnsRegistration>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("peer_id", &self.peer_id)
            .field("instance", &format_args!("{:016x}", self.instance))
            .field("broadcast", &self.task.is_some())
            .field("mdns", &self.mdns.is_some())
            .finish()
    }
}

impl Announcer {
    /// Starts announcing (must be called inside a tokio runtime). Fails if the name is
    /// empty after sanitizing, the ports are invalid, nothing is enabled, or no enabled
    /// mechanism could start (no socket for either IP family; mDNS daemon error).
    pub async fn start(cfg: AnnouncerConfig) -> Result<Announcer, DiscoveryError> {
        if !cfg.broadcast && !cfg.mdns {
            return Err(DiscoveryError::NothingEnabled);
        }
        let name = sanitize_name(&cfg.name);
        if name.is_empty() {
            return Err(DiscoveryError::EmptyName);
        }
        validate_ports(&cfg.ports)?;
        let template = Announcement {
            peer_id: cfg.peer_id,
            protocol_version: PROTOCOL_VERSION,
            instance: random_nonzero_u64(),
            seq: 0,
            reply_to: 0,
            name: name.clone(),
            ports: cfg.ports.clone(),
        };
        // Fail early (and never later) on an unencodable announcement.
        template.encode()?;
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        // Either mechanism may fail alone (port taken by a program without SO_REUSEADDR, no
        // multicast): the other one still announces. Only nothing at all is an error.
        let sockets = match cfg.broadcast {
            false => None,
            true => match SocketPair::bind(cfg.discovery_port, true) {
                Ok(s) => Some(s),
                Err(e) if cfg.mdns => {
                    warn!("discovery: broadcast announcements unavailable: {e}");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let mdns = match cfg.mdns {
            false => None,
            true => match MdnsRegistration::start(&template) {
                Ok(m) => Some(m),
                Err(e) if sockets.is_some() => {
                    warn!("discovery: mDNS announcements unavailable: {e}");
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let task = sockets.map(|sockets| {
            let counters = counters.clone();
            let template = template.clone();
            // Send-side rate limit: never more often than MIN_ANNOUNCE_INTERVAL.
            let (port, interval) = (cfg.discovery_port, cfg.interval.max(MIN_ANNOUNCE_INTERVAL));
            tokio::spawn(async move {
                run_announcer(sockets, template, port, interval, counters, stop_rx).await
            })
        });
        info!(
            peer_id = %cfg.peer_id,
            name = %name,
            broadcast = task.is_some(),
            mdns = mdns.is_some(),
            "announcing on the LAN"
        );
        Ok(Announcer {
            peer_id: cfg.peer_id,
            instance: template.instance,
            name,
            stop_tx: Some(stop_tx),
            task,
            mdns,
            counters,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The random instance of this announcer (the mDNS `inst` TXT value).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The sanitized name being announced.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mechanisms actually announcing (one may have failed to start; see `start`).
    pub fn active(&self) -> Via {
        Via {
            broadcast: self.task.is_some(),
            mdns: self.mdns.is_some(),
        }
    }

    /// Counters of the broadcast side.
    pub fn stats(&self) -> DiscoveryStats {
        self.counters.snapshot()
    }

    /// Stops announcing: ends the broadcast task and sends the mDNS goodbye (waiting at
    /// most MDNS_GOODBYE_WAIT for each mDNS step).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(m) = self.mdns.take() {
            m.stop().await;
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(m) = self.mdns.take() {
            let _ = m.daemon.unregister(&m.fullname);
            let _ = m.daemon.shutdown();
        }
    }
}

/// The next periodic announcement: ±10 % jitter so announcers started together drift apart.
fn jittered(interval: Duration) -> Duration {
    let tenth = interval / 10;
    let nanos = u64::try_from(tenth.as_nanos()).unwrap_or(u64::MAX).max(1);
    interval - tenth + Duration::from_nanos(random_u64() % nanos.saturating_mul(2))
}

struct AnnouncerLoop {
    template: Announcement,
    seq: u64,
    port: u16,
    counters: Arc<Counters>,
    rx_limit: SourceLimiter,
    reply_limit: SourceLimiter,
    reply_total: TokenBucket,
    drop_gate: LogGate,
    send_gate: LogGate,
}

impl AnnouncerLoop {
    fn next_announcement(&mut self, reply_to: u64) -> Option<Vec<u8>> {
        self.seq += 1;
        let a = Announcement {
            seq: self.seq,
            reply_to,
            ..self.template.clone()
        };
        // The template was encoded once at start; this cannot fail.
        a.encode().ok()
    }

    fn round(&mut self, sockets: &mut SocketPair) {
        let targets = match link_targets() {
            Ok(t) => t,
            Err(e) => {
                if let Some(held) = self.send_gate.pass(Instant::now()) {
                    warn!("discovery: cannot list interfaces: {e} ({held} similar not logged)");
                }
                return;
            }
        };
        sockets.join_groups(&targets);
        if let Some(bytes) = self.next_announcement(0) {
            let n = sockets.send_all(self.port, &bytes, &targets, &self.counters);
            self.counters
                .announcements_sent
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, sock: &UdpSocket, bytes: &[u8], src: SocketAddr) {
        let now = Instant::now();
        let counters = self.counters.clone();
        match accept_datagram(
            now,
            bytes,
            src,
            &mut self.rx_limit,
            &counters,
            &mut self.drop_gate,
        ) {
            Some(Datagram::Query(q)) => {
                bump(&counters.queries_received);
                if !self.reply_limit.allow(now, src.ip()) || !self.reply_total.take(now) {
                    bump(&counters.replies_limited);
                    return;
                }
                if let Some(reply) = self.next_announcement(q.nonce) {
                    match sock.try_send_to(&reply, src) {
                        Ok(_) => bump(&counters.queries_answered),
                        Err(e) => {
                            bump(&counters.send_errors);
                            if let Some(held) = self.send_gate.pass(now) {
                                warn!("discovery: cannot answer {src}: {e} ({held} similar not logged)");
                            }
                        }
                    }
                }
            }
            Some(Datagram::Announce(_)) => bump(&counters.announcements_received),
            None => {}
        }
    }
}

async fn run_announcer(
    mut sockets: SocketPair,
    template: Announcement,
    port: u16,
    interval: Duration,
    counters: Arc<Counters>,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let start = Instant::now();
    let mut st = AnnouncerLoop {
        template,
        seq: 0,
        port,
        counters,
        rx_limit: SourceLimiter::new(RX_PER_SOURCE_PER_SEC, RX_BURST_PER_SOURCE, start),
        reply_limit: SourceLimiter::new(REPLIES_PER_SOURCE_PER_SEC, REPLY_BURST_PER_SOURCE, start),
        reply_total: TokenBucket::new(REPLIES_PER_SEC, REPLY_BURST, start),
        drop_gate: LogGate::default(),
        send_gate: LogGate::default(),
    };
    // Start-up burst at fixed offsets from start, then the jittered period.
    let mut burst_idx = 0usize;
    let mut next = tokio::time::Instant::from_std(start + ANNOUNCE_STARTUP_BURST[0]);
    let mut buf4 = vec![0u8; RX_BUF];
    let mut buf6 = vec![0u8; RX_BUF];
    // Join the IPv6 group before the first announcement, so QUERYs are heard from the start.
    if let Ok(t) = link_targets() {
        sockets.join_groups(&t);
    }
    loop {
        tokio::select! {
            _ = &mut stop_rx => break,
            _ = tokio::time::sleep_until(next) => {
                st.round(&mut sockets);
                burst_idx += 1;
                next = match ANNOUNCE_STARTUP_BURST.get(burst_idx) {
                    Some(d) => tokio::time::Instant::from_std(start + *d),
                    None => tokio::time::Instant::now() + jittered(interval),
                };
            }
            r = recv_opt(sockets.v4.as_ref(), &mut buf4) => match r {
                Ok((n, src)) => {
                    if let Some(s) = sockets.v4.as_ref() {
                        st.handle(s, &buf4[..n], src);
                    }
                }
                Err(_) => tokio::time::sleep(RECV_ERROR_BACKOFF).await,
            },
            r = recv_opt(sockets.v6.as_ref(), &mut buf6) => match r {
                Ok((n, src)) => {
                    if let Some(s) = sockets.v6.as_ref() {
                        st.handle(s, &buf6[..n], src);
                    }
                }
                Err(_) => tokio::time::sleep(RECV_ERROR_BACKOFF).await,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Discover

/// How to discover.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Total time to listen ([`DEFAULT_DISCOVER_TIMEOUT`] by default).
    pub timeout: Duration,
    /// Send QUERYs and listen for broadcast/multicast announcements.
    pub broadcast: bool,
    /// Browse `_qssh._udp.local.` over mDNS.
    pub mdns: bool,
    /// UDP port of the broadcast mechanism.
    pub discovery_port: u16,
    /// Peer IDs left out of the result (e.g. our own).
    pub exclude: Vec<PeerId>,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            timeout: DEFAULT_DISCOVER_TIMEOUT,
            broadcast: true,
            mdns: true,
            discovery_port: DISCOVERY_PORT,
            exclude: Vec::new(),
        }
    }
}

/// What a discovery run found.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// Deduplicated peers in display order (see [`DiscoveryTable::peers`]).
    pub peers: Vec<DiscoveredPeer>,
    /// Conflicts seen (including ones involving excluded peer IDs).
    pub conflicts: Vec<Conflict>,
    /// How long the run took.
    pub elapsed: Duration,
    /// When each peer was first seen, relative to the start (same order as `peers`).
    pub first_seen: Vec<Duration>,
    pub stats: DiscoveryStats,
    pub table: TableStats,
}

impl Discovery {
    /// Resolves a `connect` target (peer ID, unique prefix of at least 8, unique name).
    pub fn resolve(&self, target: &str) -> Result<&DiscoveredPeer, ResolveError> {
        resolve(&self.peers, target)
    }
}

/// Discovers for `opts.timeout` and returns everything seen.
pub async fn discover(opts: &DiscoverOptions) -> Result<Discovery, DiscoveryError> {
    discover_until(opts, |_| false).await
}

/// Like [`discover`], but returns as soon as `done` returns true for the peers seen so far
/// (it is called after every change). Stop early only on something that cannot become
/// ambiguous later, e.g. an exact peer ID: a name conflict may arrive after the first match.
pub async fn discover_until<F>(
    opts: &DiscoverOptions,
    mut done: F,
) -> Result<Discovery, DiscoveryError>
where
    F: FnMut(&[DiscoveredPeer]) -> bool,
{
    if !opts.broadcast && !opts.mdns {
        return Err(DiscoveryError::NothingEnabled);
    }
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + opts.timeout);
    let mut rx = RxCtx {
        limiter: SourceLimiter::new(RX_PER_SOURCE_PER_SEC, RX_BURST_PER_SOURCE, start),
        counters: Counters::default(),
        gate: LogGate::default(),
    };
    let mut table = DiscoveryTable::new();
    let mut first_seen: std::collections::BTreeMap<PeerId, Duration> = Default::default();

    // Broadcast: an ephemeral querier pair (QUERY answers come back to it) and, best effort,
    // a pair on the discovery port for periodic announcements.
    let (querier, mut listener) = if opts.broadcast {
        let q = SocketPair::bind(0, false)?;
        let l = match SocketPair::bind(opts.discovery_port, true) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!("discovery: not listening on the discovery port: {e}");
                None
            }
        };
        (Some(q), l)
    } else {
        (None, None)
    };

    // mDNS: one-shot queries answered by unicast (fast, not rate limited), plus a browse on a
    // private mdns-sd daemon (continuous querying; unsolicited announcements).
    // Each part may fail alone; only when nothing of an mDNS-only run works is it an error.
    let (mdns_querier, mdns) = if opts.mdns {
        let oneshot = match MdnsQuerier::bind() {
            Ok(q) => Some(q),
            Err(e) => {
                debug!("discovery: no one-shot mDNS querier: {e}");
                None
            }
        };
        let browse = ServiceDaemon::new().and_then(|d| {
            let rx = d.browse(MDNS_SERVICE_TYPE)?;
            Ok((d, rx))
        });
        match browse {
            Ok(b) => (oneshot, Some(b)),
            Err(e) if oneshot.is_some() || opts.broadcast => {
                debug!("discovery: no mDNS browse: {e}");
                (oneshot, None)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        (None, None)
    };
    let mut mdns_rx = mdns.as_ref().map(|(_, rx)| rx.clone());

    let query = Query {
        nonce: random_nonzero_u64(),
    }
    .encode();
    let mut query_round = 0usize;
    let mut next_query = tokio::time::Instant::from_std(start + QUERY_SCHEDULE[0]);
    let mut targets = LinkTargets::default();
    let (mut b0, mut b1, mut b2, mut b3) = (
        vec![0u8; RX_BUF],
        vec![0u8; RX_BUF],
        vec![0u8; RX_BUF],
        vec![0u8; RX_BUF],
    );
    let (mut m0, mut m1) = (
        vec![0u8; mdns_wire::MAX_MDNS_MESSAGE + 1],
        vec![0u8; mdns_wire::MAX_MDNS_MESSAGE + 1],
    );

    let exclude: BTreeSet<PeerId> = opts.exclude.iter().copied().collect();
    let visible = |t: &DiscoveryTable, now: Instant| -> Vec<DiscoveredPeer> {
        t.peers(now)
            .into_iter()
            .filter(|p| !exclude.contains(&p.peer_id))
            .collect()
    };

    loop {
        let mut changed = false;
        let mut seen: Vec<Sighting> = Vec::new();
        let qs = querier.as_ref();
        let ls = listener.as_ref();
        let mq = mdns_querier.as_ref();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(next_query), if query_round < QUERY_SCHEDULE.len() => {
                match link_targets() {
                    Ok(t) => targets = t,
                    Err(e) => debug!("discovery: cannot list interfaces: {e}"),
                }
                if let Some(l) = listener.as_mut() {
                    l.join_groups(&targets);
                }
                if let Some(q) = querier.as_ref() {
                    let n = q.send_all(opts.discovery_port, &query, &targets, &rx.counters);
                    rx.counters.queries_sent.fetch_add(n, Ordering::Relaxed);
                }
                if let Some(m) = mdns_querier.as_ref() {
                    m.send(&targets, &rx.counters);
                }
                query_round += 1;
                if let Some(d) = QUERY_SCHEDULE.get(query_round) {
                    next_query = tokio::time::Instant::from_std(start + *d);
                }
            }
            r = recv_opt(qs.and_then(|p| p.v4.as_ref()), &mut b0) => seen.extend(on_recv(r, &b0, &mut rx).await),
            r = recv_opt(qs.and_then(|p| p.v6.as_ref()), &mut b1) => seen.extend(on_recv(r, &b1, &mut rx).await),
            r = recv_opt(ls.and_then(|p| p.v4.as_ref()), &mut b2) => seen.extend(on_recv(r, &b2, &mut rx).await),
            r = recv_opt(ls.and_then(|p| p.v6.as_ref()), &mut b3) => seen.extend(on_recv(r, &b3, &mut rx).await),
            r = recv_opt(mq.and_then(|m| m.v4.as_ref()), &mut m0) => {
                if let Some(m) = mq {
                    seen = on_mdns_answer(r, &m0, m, &targets, &mut rx).await;
                }
            }
            r = recv_opt(mq.and_then(|m| m.v6.as_ref()), &mut m1) => {
                if let Some(m) = mq {
                    seen = on_mdns_answer(r, &m1, m, &targets, &mut rx).await;
                }
            }
            ev = async {
                match &mdns_rx {
                    Some(rx) => rx.recv_async().await.ok(),
                    None => std::future::pending().await,
                }
            } => match ev {
                Some(ServiceEvent::ServiceResolved(svc)) => {
                    let port = svc.get_port();
                    let addrs: Vec<SocketAddr> = svc
                        .get_addresses()
                        .iter()
                        // Loopback addresses only reach this host's own processes, which
                        // are listed with their LAN addresses anyway.
                        .filter(|a| !a.is_loopback())
                        .filter_map(|a| match a {
                            ScopedIp::V4(v4) => Some(SocketAddr::V4(SocketAddrV4::new(*v4.addr(), port))),
                            ScopedIp::V6(v6) => Some(SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, v6.scope_id().index))),
                            _ => None,
                        })
                        .collect();
                    let get = |k: &str| svc.get_property_val_str(k).map(str::to_string);
                    match sighting_from_mdns(&get, svc.get_fullname(), port, &addrs) {
                        Ok(s) => {
                            bump(&rx.counters.mdns_records);
                            seen.push(s);
                        }
                        Err(e) => {
                            bump(&rx.counters.mdns_rejected);
                            if let Some(held) = rx.gate.pass(Instant::now()) {
                                debug!("discovery: ignoring mDNS record {:?}: {e} ({held} earlier drops not logged)", svc.get_fullname());
                            }
                        }
                    }
                }
                Some(_) => {}
                // The daemon went away: stop polling it.
                None => mdns_rx = None,
            },
        }
        for s in seen {
            let now = Instant::now();
            let r = table.observe(now, &s);
            if !exclude.contains(&s.peer_id) {
                first_seen
                    .entry(s.peer_id)
                    .or_insert_with(|| now.saturating_duration_since(start));
            }
            changed |= matches!(
                r,
                Observed::NewPeer | Observed::NewClaim | Observed::Updated
            );
        }
        if changed && done(&visible(&table, Instant::now())) {
            break;
        }
    }

    if let Some((daemon, _)) = mdns {
        let _ = daemon.stop_browse(MDNS_SERVICE_TYPE);
        let _ = daemon.shutdown();
    }
    drop((querier, listener, mdns_querier));
    let now = Instant::now();
    let peers = visible(&table, now);
    let conflicts = table.conflicts(now);
    for c in &conflicts {
        if let Some(held) = rx.gate.pass(now) {
            warn!("discovery conflict: {c} ({held} similar not logged)");
        }
    }
    let first = peers
        .iter()
        .map(|p| first_seen.get(&p.peer_id).copied().unwrap_or_default())
        .collect();
    Ok(Discovery {
        peers,
        conflicts,
        elapsed: now.saturating_duration_since(start),
        first_seen: first,
        stats: rx.counters.snapshot(),
        table: table.stats(),
    })
}

/// Receive-side state of one discover run.
struct RxCtx {
    limiter: SourceLimiter,
    counters: Counters,
    gate: LogGate,
}

/// Handles an answer to the one-shot mDNS query.
async fn on_mdns_answer(
    r: io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    querier: &MdnsQuerier,
    targets: &LinkTargets,
    rx: &mut RxCtx,
) -> Vec<Sighting> {
    let (n, src) = match r {
        Ok(x) => x,
        Err(_) => {
            tokio::time::sleep(RECV_ERROR_BACKOFF).await;
            return Vec::new();
        }
    };
    let now = Instant::now();
    bump(&rx.counters.received);
    if !rx.limiter.allow(now, src.ip()) {
        bump(&rx.counters.rate_limited);
        return Vec::new();
    }
    match querier.sightings(&buf[..n], src, targets, &rx.counters) {
        Ok(v) => v,
        Err(e) => {
            bump(&rx.counters.mdns_rejected);
            if let Some(held) = rx.gate.pass(now) {
                debug!("discovery: ignoring mDNS answer from {src}: {e} ({held} earlier drops not logged)");
            }
            Vec::new()
        }
    }
}

/// Handles a datagram on a broadcast-mechanism socket.
async fn on_recv(
    r: io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    rx: &mut RxCtx,
) -> Option<Sighting> {
    let (n, src) = match r {
        Ok(x) => x,
        Err(_) => {
            tokio::time::sleep(RECV_ERROR_BACKOFF).await;
            return None;
        }
    };
    let d = accept_datagram(
        Instant::now(),
        &buf[..n],
        src,
        &mut rx.limiter,
        &rx.counters,
        &mut rx.gate,
    )?;
    match d {
        Datagram::Announce(a) => {
            bump(&rx.counters.announcements_received);
            Some(Sighting::from_announcement(&a, src))
        }
        Datagram::Query(_) => {
            bump(&rx.counters.queries_received);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_gate_lets_one_line_per_interval() {
        let t0 = Instant::now();
        let mut g = LogGate::default();
        assert_eq!(g.pass(t0), Some(0));
        assert_eq!(g.pass(t0 + Duration::from_secs(1)), None);
        assert_eq!(g.pass(t0 + Duration::from_secs(2)), None);
        assert_eq!(g.pass(t0 + LOG_INTERVAL), Some(2));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let base = Duration::from_secs(5);
        for _ in 0..200 {
            let j = jittered(base);
            assert!(j >= base - base / 10 && j < base + base / 10, "{j:?}");
        }
    }

    #[test]
    fn accept_datagram_classifies_and_limits() {
        let t0 = Instant::now();
        let counters = Counters::default();
        let mut limiter = SourceLimiter::new(1, 3, t0);
        let mut gate = LogGate::default();
        let src: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let q = Query { nonce: 5 }.encode();
        assert_eq!(
            accept_datagram(t0, &q, src, &mut limiter, &counters, &mut gate),
            Some(Datagram::Query(Query { nonce: 5 }))
        );
        assert!(accept_datagram(t0, b"junk", src, &mut limiter, &counters, &mut gate).is_none());
        assert!(
            accept_datagram(t0, &[0u8; RX_BUF], src, &mut limiter, &counters, &mut gate).is_none()
        );
        // The bucket (burst 3) is empty now.
        assert!(accept_datagram(t0, &q, src, &mut limiter, &counters, &mut gate).is_none());
        let s = counters.snapshot();
        assert_eq!(
            (s.received, s.foreign, s.oversized, s.rate_limited),
            (4, 1, 1, 1)
        );
    }

    #[test]
    fn v4_interface_by_subnet() {
        let mut t = LinkTargets::default();
        t.v4_ifaces.insert((Ipv4Addr::new(10, 1, 2, 3), 24, 7));
        t.v4_ifaces.insert((Ipv4Addr::new(192, 168, 0, 9), 16, 9));
        assert_eq!(t.v4_ifindex_for(Ipv4Addr::new(10, 1, 2, 200)), Some(7));
        assert_eq!(t.v4_ifindex_for(Ipv4Addr::new(192, 168, 77, 1)), Some(9));
        assert_eq!(t.v4_ifindex_for(Ipv4Addr::new(10, 1, 3, 1)), None);
    }

    #[tokio::test]
    async fn nothing_enabled_is_an_error() {
        let opts = DiscoverOptions {
            broadcast: false,
            mdns: false,
            ..Default::default()
        };
        assert!(matches!(
            discover(&opts).await,
            Err(DiscoveryError::NothingEnabled)
        ));
        let mut cfg = AnnouncerConfig::new(PeerId([1; 32]), "x", vec![ListenPort::tcp(1)]);
        cfg.broadcast = false;
        cfg.mdns = false;
        assert!(matches!(
            Announcer::start(cfg).await,
            Err(DiscoveryError::NothingEnabled)
        ));
        let cfg = AnnouncerConfig::new(PeerId([1; 32]), "\u{7}", vec![ListenPort::tcp(1)]);
        assert!(matches!(
            Announcer::start(cfg).await,
            Err(DiscoveryError::EmptyName)
        ));
    }
}
