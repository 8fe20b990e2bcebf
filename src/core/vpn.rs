//! The VPN channel, sans IO: its open parameters, the messages on its byte stream, the
//! checks every tunnelled packet passes (crypto-routing, as WireGuard's allowed-ips), and the
//! state of the UDP path. Specified in docs/vpn.md.
//!
//! # Open parameters (OPEN of a channel of kind VPN, and the listener's PARAMS answer)
//!
//! ```text
//! params  = version u8 (1) | flags u8 | mtu u16 | receiver_session u32 | udp_port u16
//!         | count u8 (1..=MAX_TUNNEL_ADDRESSES) | count × address
//! address = family u8 (4 | 6) | ip (4 | 16 bytes) | prefix u8 (≤ 32 | ≤ 128)
//! flags   : bit 0 = the sender can use a UDP path;
//!           bit 1 = the session runs over QUIC, and the sender sends and receives datagram
//!                   records on the session's own UDP socket and path (NAT traversal:
//!                   direct or relayed, as the session); other bits must be zero
//! ```
//!
//! `receiver_session` is the id the sender's datagram receiver expects in the records sent
//! to it (core::datagram); `udp_port` is the UDP port the sender receives datagram records
//! on (0: none, e.g. a connector that learns nothing by listening). When both sides set
//! bit 1, records travel on the session's path and `udp_port` is not used. At most one address per
//! family; addresses are unicast (not unspecified, loopback, multicast or link-local).
//!
//! # Messages on the channel's byte stream
//!
//! ```text
//! message = type u8 | len u16 | body[len]
//! 1 PARAMS    params (listener → connector, exactly once, the first message)
//! 2 PACKET    one IP packet, MIN_IP_PACKET ..= MAX_VPN_MTU bytes
//! 3 UDP_OK    empty: "authentic datagram records from you reach me"
//! 4 UDP_LOST  empty: "they stopped reaching me"
//! ```
//!
//! Anything else (unknown type, wrong length, a second PARAMS) is a protocol error that
//! closes the channel.

use super::codec::{DecodeError, Reader, Writer};
use super::datagram::DATAGRAM_OVERHEAD;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Version byte of the VPN parameters.
pub const VPN_VERSION: u8 = 1;
/// Tunnel addresses per side: one IPv4 and one IPv6.
pub const MAX_TUNNEL_ADDRESSES: usize = 2;
/// Routes one side may send through its tunnel (`--route`), a local bound.
pub const MAX_ROUTES: usize = 64;
/// Smallest tunnel MTU (IPv6's minimum link MTU).
pub const MIN_VPN_MTU: u16 = 1280;
/// Largest tunnel MTU: a packet still fits one datagram record and one stream message.
pub const MAX_VPN_MTU: u16 = 65_000;
/// Default tunnel MTU: a 1500-byte underlay minus IPv6, UDP and datagram record overhead.
pub const DEFAULT_VPN_MTU: u16 = (1500 - 40 - 8 - DATAGRAM_OVERHEAD) as u16;
/// Smallest IP packet we forward (an IPv4 header).
pub const MIN_IP_PACKET: usize = 20;
/// Header of one stream message: type and length.
pub const MESSAGE_HEADER_LEN: usize = 3;
/// Largest body of any stream message.
pub const MAX_MESSAGE_BODY: usize = MAX_VPN_MTU as usize;
/// Encoded size of the largest parameter block: the fixed part, one IPv4 and one IPv6
/// address (MAX_TUNNEL_ADDRESSES = 2, at most one per family).
pub const MAX_PARAMS_LEN: usize = 11 + (1 + 4 + 1) + (1 + 16 + 1);

/// The sender can use a UDP path.
pub const FLAG_UDP: u8 = 0x01;
/// The sender carries datagram records on the session's own UDP path (QUIC sessions).
pub const FLAG_SESSION_PATH: u8 = 0x02;

const MSG_PARAMS: u8 = 1;
const MSG_PACKET: u8 = 2;
const MSG_UDP_OK: u8 = 3;
const MSG_UDP_LOST: u8 = 4;

/// Why VPN input was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VpnError {
    #[error("malformed VPN parameters: {0}")]
    Params(&'static str),
    #[error("VPN parameters: {0}")]
    Decode(#[from] DecodeError),
    #[error("unknown VPN message type {0}")]
    UnknownMessage(u8),
    #[error("VPN message of type {ty} has a bad length {len}")]
    BadLength { ty: u8, len: usize },
    #[error("invalid address {0:?}: expected IP/PREFIX, e.g. 10.200.0.1/24 or fd00::1/64")]
    AddressSyntax(String),
}

/// An address with a prefix length: a tunnel address (`10.200.0.1/24`) or a route
/// (`10.99.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { addr, len })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// The network: the address with the host bits cleared.
    pub fn network(&self) -> Prefix {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.len))),
        };
        Prefix {
            addr,
            len: self.len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = mask32(self.len);
                u32::from(n) & m == u32::from(a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = mask128(self.len);
                u128::from(n) & m == u128::from(a) & m
            }
            _ => false,
        }
    }

    /// Whether this can be a tunnel address: unicast and routable between two peers.
    pub fn is_usable_tunnel_address(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    || a.is_broadcast()
                    || a.is_link_local())
                    && self.len >= 1
            }
            IpAddr::V6(a) => {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    || a.is_unicast_link_local())
                    && self.len >= 1
            }
        }
    }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = VpnError;
    /// `IP/LEN`; a bare IP is a host prefix.
    fn from_str(s: &str) -> Result<Self, VpnError> {
        let bad = || VpnError::AddressSyntax(s.to_string());
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| bad())?;
        match len {
            None => Ok(Prefix::host(addr)),
            Some(l) => {
                let l: u8 = l.trim().parse().map_err(|_| bad())?;
                Prefix::new(addr, l).ok_or_else(bad)
            }
        }
    }
}

/// The parameters each side announces (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpnParams {
    pub udp: bool,
    pub mtu: u16,
    pub receiver_session: u32,
    pub udp_port: u16,
    /// FLAG_SESSION_PATH: records on the session's own UDP path.
    pub session_path: bool,
    pub addresses: Vec<Prefix>,
}

impl VpnParams {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_PARAMS_LEN);
        let mut w = Writer::new(&mut out);
        w.u8(VPN_VERSION)
            .u8(if self.udp { FLAG_UDP } else { 0 }
                | if self.session_path {
                    FLAG_SESSION_PATH
                } else {
                    0
                })
            .u16(self.mtu)
            .u32(self.receiver_session)
            .u16(self.udp_port)
            .u8(self.addresses.len() as u8);
        for a in &self.addresses {
            match a.addr {
                IpAddr::V4(v4) => w.u8(4).bytes(&v4.octets()),
                IpAddr::V6(v6) => w.u8(6).bytes(&v6.octets()),
            };
            w.u8(a.len);
        }
        out
    }

    /// Parses exactly one parameter block and checks every rule of the module doc.
    pub fn decode(bytes: &[u8]) -> Result<Self, VpnError> {
        if bytes.len() > MAX_PARAMS_LEN {
            return Err(VpnError::Params("too long"));
        }
        let mut r = Reader::new(bytes);
        if r.u8()? != VPN_VERSION {
            return Err(VpnError::Params("unsupported version"));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_UDP | FLAG_SESSION_PATH) != 0 {
            return Err(VpnError::Params("unknown flags"));
        }
        let mtu = r.u16()?;
        if !(MIN_VPN_MTU..=MAX_VPN_MTU).contains(&mtu) {
            return Err(VpnError::Params("MTU out of range"));
        }
        let receiver_session = r.u32()?;
        let udp_port = r.u16()?;
        let count = usize::from(r.u8()?);
        if !(1..=MAX_TUNNEL_ADDRESSES).contains(&count) {
            return Err(VpnError::Params("address count out of range"));
        }
        let mut addresses: Vec<Prefix> = Vec::with_capacity(count);
        for _ in 0..count {
            let addr = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
                _ => return Err(VpnError::Params("unknown address family")),
            };
            let p = Prefix::new(addr, r.u8()?).ok_or(VpnError::Params("prefix too long"))?;
            if !p.is_usable_tunnel_address() {
                return Err(VpnError::Params("address not usable in a tunnel"));
            }
            if addresses.iter().any(|a| a.addr.is_ipv4() == addr.is_ipv4()) {
                return Err(VpnError::Params("two addresses of one family"));
            }
            addresses.push(p);
        }
        r.finish()?;
        Ok(VpnParams {
            udp: flags & FLAG_UDP != 0,
            mtu,
            receiver_session,
            udp_port,
            session_path: flags & FLAG_SESSION_PATH != 0,
            addresses,
        })
    }
}

/// One message of the VPN channel's byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VpnMessage<'a> {
    Params(VpnParams),
    Packet(&'a [u8]),
    UdpOk,
    UdpLost,
}

impl VpnMessage<'_> {
    /// Appends the encoded message to `out`. A packet must be within MIN_IP_PACKET ..=
    /// MAX_VPN_MTU bytes (the TUN device never gives more than its MTU).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (ty, body): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            VpnMessage::Params(p) => (MSG_PARAMS, p.encode().into()),
            VpnMessage::Packet(p) => (MSG_PACKET, (*p).into()),
            VpnMessage::UdpOk => (MSG_UDP_OK, (&[][..]).into()),
            VpnMessage::UdpLost => (MSG_UDP_LOST, (&[][..]).into()),
        };
        debug_assert!(body.len() <= MAX_MESSAGE_BODY);
        out.reserve(MESSAGE_HEADER_LEN + body.len());
        Writer::new(out).u8(ty).u16(body.len() as u16).bytes(&body);
    }
}

/// Reassembles messages from the channel's data, whatever the DATA frame boundaries. It
/// holds at most one incomplete message (≤ MESSAGE_HEADER_LEN + MAX_MESSAGE_BODY bytes).
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    /// Appends received channel data.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Calls `f` for every complete message; keeps an incomplete tail for the next push.
    /// A malformed message is an error: the channel must be closed (nothing after it is
    /// trustworthy on a byte stream).
    pub fn drain(
        &mut self,
        mut f: impl FnMut(VpnMessage<'_>) -> Result<(), VpnError>,
    ) -> Result<(), VpnError> {
        let mut off = 0;
        let result = loop {
            let avail = &self.buf[off..];
            if avail.len() < MESSAGE_HEADER_LEN {
                break Ok(());
            }
            let ty = avail[0];
            let len = usize::from(u16::from_be_bytes([avail[1], avail[2]]));
            let ok_len = match ty {
                MSG_PARAMS => len <= MAX_PARAMS_LEN,
                MSG_PACKET => (MIN_IP_PACKET..=MAX_MESSAGE_BODY).contains(&len),
                MSG_UDP_OK | MSG_UDP_LOST => len == 0,
                other => break Err(VpnError::UnknownMessage(other)),
            };
            if !ok_len {
                break Err(VpnError::BadLength { ty, len });
            }
            if avail.len() < MESSAGE_HEADER_LEN + len {
                break Ok(());
            }
            let body = &avail[MESSAGE_HEADER_LEN..MESSAGE_HEADER_LEN + len];
            off += MESSAGE_HEADER_LEN + len;
            let msg = match ty {
                MSG_PARAMS => match VpnParams::decode(body) {
                    Ok(p) => VpnMessage::Params(p),
                    Err(e) => break Err(e),
                },
                MSG_PACKET => VpnMessage::Packet(body),
                MSG_UDP_OK => VpnMessage::UdpOk,
                _ => VpnMessage::UdpLost,
            };
            if let Err(e) = f(msg) {
                break Err(e);
            }
        };
        self.buf.drain(..off);
        if result.is_err() {
            self.buf.clear();
        }
        result
    }

    /// Bytes held for an incomplete message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Why a tunnelled packet was dropped before its addresses were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("packet shorter than its IP header")]
    Truncated,
    #[error("not an IPv4 or IPv6 packet")]
    BadVersion,
}

/// The IP version, source and destination of a packet from its header.
pub fn ip_addresses(pkt: &[u8]) -> Result<(IpAddr, IpAddr), PacketError> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            if pkt.len() < 20 {
                return Err(PacketError::Truncated);
            }
            let src: [u8; 4] = pkt[12..16].try_into().expect("4 bytes");
            let dst: [u8; 4] = pkt[16..20].try_into().expect("4 bytes");
            Ok((IpAddr::from(src), IpAddr::from(dst)))
        }
        Some(6) => {
            if pkt.len() < 40 {
                return Err(PacketError::Truncated);
            }
            let src: [u8; 16] = pkt[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = pkt[24..40].try_into().expect("16 bytes");
            Ok((IpAddr::from(src), IpAddr::from(dst)))
        }
        Some(_) => Err(PacketError::BadVersion),
        None => Err(PacketError::Truncated),
    }
}

/// The source prefixes a peer may send from: its crypto-routing table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedIps {
    prefixes: Vec<Prefix>,
}

impl AllowedIps {
    pub fn new(prefixes: impl IntoIterator<Item = Prefix>) -> Self {
        AllowedIps {
            prefixes: prefixes.into_iter().map(|p| p.network()).collect(),
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.prefixes.iter().any(|p| p.contains(ip))
    }
    pub fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }
}

/// What the packet check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Not an IP packet, or too short for its header.
    Malformed,
    /// The source address is not one the peer may use.
    Spoofed,
}

/// The crypto-routing check for a packet that came out of the tunnel from a peer.
pub fn check_inbound(allowed: &AllowedIps, pkt: &[u8]) -> Verdict {
    match ip_addresses(pkt) {
        Ok((src, _)) if allowed.contains(src) => Verdict::Accept,
        Ok(_) => Verdict::Spoofed,
        Err(_) => Verdict::Malformed,
    }
}

/// Keepalive datagrams go out when nothing was sent on the UDP path for this long (below
/// the 30 s that NATs keep an unanswered UDP mapping).
pub const UDP_KEEPALIVE: Duration = Duration::from_secs(10);
/// The UDP path counts as lost when no authentic datagram arrived for this long.
pub const UDP_PATH_TIMEOUT: Duration = Duration::from_secs(31);
/// First probe interval while the path is not confirmed; it doubles up to UDP_KEEPALIVE.
pub const UDP_PROBE_FIRST: Duration = Duration::from_millis(50);

/// State of the UDP path towards one peer (see docs/vpn.md, "Path selection"). Packets go
/// over UDP only while both directions are known to work: we received an authentic
/// datagram recently, and the peer told us (UDP_OK) that ours reach it.
#[derive(Debug)]
pub struct UdpPath {
    last_heard: Option<Instant>,
    peer_hears_us: bool,
    /// What we last told the peer: true after UDP_OK, false after UDP_LOST or initially.
    told_ok: bool,
    last_sent: Option<Instant>,
    probe_interval: Duration,
    next_probe: Option<Instant>,
}

/// What the driver must do after an input to [`UdpPath`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathActions {
    /// Send this message on the channel.
    pub tell: Option<PathNews>,
    /// Send an empty datagram (keepalive / probe) now.
    pub send_keepalive: bool,
}

/// The two path messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathNews {
    UdpOk,
    UdpLost,
}

impl UdpPath {
    /// `probing`: whether this side knows the peer's UDP address and should probe it (the
    /// connector); the listener learns the address from the first authentic datagram.
    pub fn new(now: Instant, probing: bool) -> Self {
        UdpPath {
            last_heard: None,
            peer_hears_us: false,
            told_ok: false,
            last_sent: None,
            probe_interval: UDP_PROBE_FIRST,
            next_probe: probing.then_some(now),
        }
    }

    fn hearing(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < UDP_PATH_TIMEOUT)
    }

    /// Whether packets should go over UDP now.
    pub fn use_udp(&self, now: Instant) -> bool {
        self.peer_hears_us && self.hearing(now)
    }

    /// An authentic datagram arrived.
    pub fn on_datagram(&mut self, now: Instant) -> PathActions {
        let was_hearing = self.hearing(now);
        self.last_heard = Some(now);
        let mut a = PathActions::default();
        if !self.told_ok {
            self.told_ok = true;
            a.tell = Some(PathNews::UdpOk);
        }
        if !was_hearing {
            // Answer at once, so the peer hears us without waiting for its next probe.
            a.send_keepalive = true;
            if self.next_probe.is_none() {
                self.next_probe = Some(now + UDP_KEEPALIVE);
            }
        }
        a
    }

    /// The peer said UDP_OK or UDP_LOST.
    pub fn on_news(&mut self, news: PathNews) {
        self.peer_hears_us = news == PathNews::UdpOk;
    }

    /// A datagram (packet or keepalive) went out on the path.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
    }

    /// Timer work: probes until the path is confirmed, keepalives while it is idle, and
    /// UDP_LOST when the peer fell silent.
    pub fn poll(&mut self, now: Instant) -> PathActions {
        let mut a = PathActions::default();
        if self.told_ok && !self.hearing(now) {
            self.told_ok = false;
            a.tell = Some(PathNews::UdpLost);
        }
        if let Some(t) = self.next_probe {
            if now >= t {
                let idle = self
                    .last_sent
                    .is_none_or(|s| now.saturating_duration_since(s) >= UDP_KEEPALIVE);
                let confirmed = self.use_udp(now);
                if !confirmed || idle {
                    a.send_keepalive = true;
                }
                let step = if confirmed {
                    UDP_KEEPALIVE
                } else {
                    let s = self.probe_interval;
                    self.probe_interval = (s * 2).min(UDP_KEEPALIVE);
                    s
                };
                self.next_probe = Some(now + step);
            }
        }
        a
    }

    /// When [`Self::poll`] has work next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let lost = self
            .last_heard
            .filter(|_| self.told_ok)
            .map(|t| t + UDP_PATH_TIMEOUT);
        match (self.next_probe, lost) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn params() -> VpnParams {
        VpnParams {
            udp: true,
            mtu: DEFAULT_VPN_MTU,
            receiver_session: 0xdead_beef,
            udp_port: 22222,
            session_path: false,
            addresses: vec![p("10.200.0.2/24"), p("fd00:200::2/64")],
        }
    }

    #[test]
    fn prefix_parse_and_contains() {
        let n = p("10.200.0.1/24");
        assert_eq!(n.network(), p("10.200.0.0/24"));
        assert!(n.contains("10.200.0.77".parse().unwrap()));
        assert!(!n.contains("10.201.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        assert_eq!(p("fd00::1"), Prefix::host("fd00::1".parse().unwrap()));
        assert!(p("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(p("::/0").contains("fd00::9".parse().unwrap()));
        assert_eq!(p("fd00:1:2:3::9/48").network().to_string(), "fd00:1:2::/48");
        for bad in [
            "10.0.0.1/33",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.1/-1",
            "",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert!(!p("127.0.0.1/8").is_usable_tunnel_address());
        assert!(!p("fe80::1/64").is_usable_tunnel_address());
        assert!(!p("224.0.0.1/4").is_usable_tunnel_address());
        assert!(p("10.200.0.1/24").is_usable_tunnel_address());
    }

    #[test]
    fn params_are_byte_exact_and_round_trip() {
        let enc = params().encode();
        assert_eq!(
            &enc[..11],
            &[1, 1, 0x05, 0x8b, 0xde, 0xad, 0xbe, 0xef, 0x56, 0xce, 2]
        );
        assert_eq!(&enc[11..17], &[4, 10, 200, 0, 2, 24]);
        assert_eq!(enc[17], 6);
        assert_eq!(enc[34], 64);
        assert_eq!(enc.len(), MAX_PARAMS_LEN);
        assert_eq!(VpnParams::decode(&enc).unwrap(), params());
        for cut in 0..enc.len() {
            assert!(VpnParams::decode(&enc[..cut]).is_err(), "cut {cut}");
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(VpnParams::decode(&long).is_err());
        // Bit 1: records on the session's own path.
        let mut sp = params();
        sp.session_path = true;
        sp.udp_port = 0;
        let enc = sp.encode();
        assert_eq!(enc[1], 3);
        assert_eq!(VpnParams::decode(&enc).unwrap(), sp);
    }

    #[test]
    fn params_rules() {
        let check = |f: &dyn Fn(&mut Vec<u8>), why: &str| {
            let mut b = params().encode();
            f(&mut b);
            assert!(VpnParams::decode(&b).is_err(), "{why}");
        };
        check(&|b| b[0] = 2, "version");
        check(&|b| b[1] = 4, "flags");
        check(&|b| b[1] = 0x83, "flags");
        check(&|b| b[2..4].copy_from_slice(&100u16.to_be_bytes()), "mtu");
        check(&|b| b[10] = 0, "no address");
        check(&|b| b[10] = 3, "three addresses");
        check(&|b| b[11] = 5, "family");
        check(&|b| b[16] = 33, "prefix");
        check(&|b| b[12..16].copy_from_slice(&[127, 0, 0, 1]), "loopback");
        let mut two_v4 = params();
        two_v4.addresses[1] = p("10.0.0.9/8");
        assert_eq!(
            VpnParams::decode(&two_v4.encode()),
            Err(VpnError::Params("two addresses of one family"))
        );
    }

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0] = 0x45;
        v[12..16].copy_from_slice(&src);
        v[16..20].copy_from_slice(&dst);
        v
    }

    #[test]
    fn deframer_handles_any_split_and_rejects_garbage() {
        let pkt = ipv4_packet([10, 200, 0, 2], [10, 200, 0, 1], 84);
        let mut stream = Vec::new();
        VpnMessage::Params(params()).encode(&mut stream);
        VpnMessage::Packet(&pkt).encode(&mut stream);
        VpnMessage::UdpOk.encode(&mut stream);
        VpnMessage::UdpLost.encode(&mut stream);
        for split in 0..stream.len() {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                d.push(part);
                d.drain(|m| {
                    got.push(match m {
                        VpnMessage::Params(_) => "params".to_string(),
                        VpnMessage::Packet(p) => format!("packet {}", p.len()),
                        VpnMessage::UdpOk => "ok".into(),
                        VpnMessage::UdpLost => "lost".into(),
                    });
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(got, ["params", "packet 84", "ok", "lost"], "split {split}");
            assert_eq!(d.buffered(), 0);
        }
        let mut d = Deframer::default();
        d.push(&[9, 0, 0]);
        assert_eq!(d.drain(|_| Ok(())), Err(VpnError::UnknownMessage(9)));
        let mut d = Deframer::default();
        d.push(&[MSG_UDP_OK, 0, 1, 0]);
        assert_eq!(
            d.drain(|_| Ok(())),
            Err(VpnError::BadLength { ty: 3, len: 1 })
        );
        let mut d = Deframer::default();
        d.push(&[MSG_PACKET, 0xff, 0xff]);
        assert_eq!(
            d.drain(|_| Ok(())),
            Err(VpnError::BadLength { ty: 2, len: 65_535 })
        );
        let mut d = Deframer::default();
        d.push(&[MSG_PACKET, 0, 5, 0x45, 0, 0, 0, 0]);
        assert!(
            d.drain(|_| Ok(())).is_err(),
            "packet shorter than an IP header"
        );
    }

    #[test]
    fn crypto_routing() {
        let allowed = AllowedIps::new([p("10.200.0.2/24"), p("fd00:200::2/128")]);
        let ok = ipv4_packet([10, 200, 0, 99], [10, 200, 0, 1], 40);
        assert_eq!(check_inbound(&allowed, &ok), Verdict::Accept);
        let forged = ipv4_packet([192, 0, 2, 1], [10, 200, 0, 1], 40);
        assert_eq!(check_inbound(&allowed, &forged), Verdict::Spoofed);
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00:200::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(check_inbound(&allowed, &v6), Verdict::Accept);
        v6[23] = 3;
        assert_eq!(check_inbound(&allowed, &v6), Verdict::Spoofed);
        assert_eq!(check_inbound(&allowed, &v6[..39]), Verdict::Malformed);
        assert_eq!(check_inbound(&allowed, &ok[..19]), Verdict::Malformed);
        assert_eq!(check_inbound(&allowed, &[0x10; 40]), Verdict::Malformed);
        assert_eq!(check_inbound(&allowed, &[]), Verdict::Malformed);
    }

    #[test]
    fn udp_path_needs_both_directions() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut c = UdpPath::new(t0, true);
        let mut l = UdpPath::new(t0, false);
        // The connector probes at once and backs off; the listener waits.
        assert!(c.poll(t0).send_keepalive);
        assert!(!c.poll(ms(10)).send_keepalive);
        assert!(c.poll(ms(50)).send_keepalive);
        assert_eq!(c.next_deadline(), Some(ms(150)));
        assert_eq!(l.poll(ms(50)), PathActions::default());
        // The listener hears the probe: tells UDP_OK and answers.
        let a = l.on_datagram(ms(60));
        assert_eq!(a.tell, Some(PathNews::UdpOk));
        assert!(a.send_keepalive);
        assert!(
            !l.use_udp(ms(60)),
            "the listener does not know yet that it is heard"
        );
        c.on_news(PathNews::UdpOk);
        assert!(
            !c.use_udp(ms(61)),
            "the connector has not heard the listener"
        );
        let a = c.on_datagram(ms(62));
        assert_eq!(a.tell, Some(PathNews::UdpOk));
        assert!(c.use_udp(ms(62)));
        l.on_news(PathNews::UdpOk);
        assert!(l.use_udp(ms(63)));
        // A second datagram changes nothing.
        assert_eq!(l.on_datagram(ms(64)), PathActions::default());
        // Silence: the path is lost, and the peer is told once.
        let late = ms(64) + UDP_PATH_TIMEOUT;
        assert!(!l.use_udp(late));
        assert_eq!(l.poll(late).tell, Some(PathNews::UdpLost));
        assert_eq!(l.poll(late).tell, None);
        c.on_news(PathNews::UdpLost);
        assert!(!c.use_udp(ms(70)));
        // Hearing again restores it.
        assert_eq!(l.on_datagram(late).tell, Some(PathNews::UdpOk));
    }

    #[test]
    fn keepalives_only_when_idle() {
        let t0 = Instant::now();
        let mut c = UdpPath::new(t0, true);
        c.on_news(PathNews::UdpOk);
        c.on_datagram(t0);
        c.poll(t0);
        let next = c.next_deadline().unwrap();
        c.on_sent(next - Duration::from_millis(1));
        assert!(!c.poll(next).send_keepalive, "traffic is the keepalive");
        let later = c.next_deadline().unwrap();
        assert!(c.poll(later).send_keepalive);
    }

    proptest! {
        #[test]
        fn deframer_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut d = Deframer::default();
            for c in chunks {
                d.push(&c);
                if d.drain(|_| Ok(())).is_err() {
                    break;
                }
                prop_assert!(d.buffered() <= MESSAGE_HEADER_LEN + MAX_MESSAGE_BODY);
            }
        }

        #[test]
        fn params_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = VpnParams::decode(&bytes);
        }

        #[test]
        fn prefix_contains_its_network(a in any::<u32>(), len in 0u8..=32) {
            let pre = Prefix::new(IpAddr::V4(Ipv4Addr::from(a)), len).unwrap();
            prop_assert!(pre.network().contains(pre.addr));
        }
    }
}
