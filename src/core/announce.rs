//! LAN discovery, sans-IO: the announcement/query datagram codec, the mDNS TXT mapping, and
//! the [`DiscoveryTable`] that merges what broadcast and mDNS saw, reports conflicts and
//! resolves `connect` targets. Callers pass datagrams, sightings and the current time in.
//!
//! Announcements are unauthenticated *hints*: anyone on the LAN can send one, so nothing in
//! them is secret and nothing in them is trusted. What makes `connect NAME` safe is that the
//! resolved peer ID is pinned: whoever answers at an announced address must prove that ID in
//! the handshake. The table therefore only has to keep bounded state, refuse replays that
//! would roll content back or keep a vanished peer alive, and make impostors *visible*.
//!
//! Datagram layout (all integers big-endian; every datagram is one UDP payload < 1200 bytes):
//!
//! ```text
//! header:   magic "QSDP" (4) | version (1) | type (1)
//! ANNOUNCE: peer id (32) | protocol version (1) | instance (8) | seq (8) | reply-to (8)
//!           | name length (1) | name (<= MAX_NAME, canonical UTF-8)
//!           | port count (1, 1..=MAX_ANNOUNCED_PORTS) | count x (transport (1) | port (2))
//! QUERY:    nonce (8) | zero padding up to QUERY_LEN
//! ```
//!
//! A QUERY is padded to at least the size of the largest ANNOUNCE, so answering one never
//! amplifies traffic towards a spoofed source. A QUERY carries no identity: discovering
//! reveals nothing about the one who asks.

use super::codec::{DecodeError, Reader, Writer};
use super::crypto::sha256;
use super::identity::PeerId;
use super::limits::MAX_NAME;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use thiserror::Error;

/// First bytes of every discovery datagram.
pub const DISCOVERY_MAGIC: [u8; 4] = *b"QSDP";
/// Version of the discovery datagram format (independent of the session protocol version).
pub const DISCOVERY_VERSION: u8 = 1;
/// UDP port that announcers listen on and announce to.
pub const DISCOVERY_PORT: u16 = 22223;
/// Link-local IPv6 multicast group for announcements and queries ("qssh" in the low 32 bits).
pub const DISCOVERY_MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0x7173, 0x7368);
/// DNS-SD service type registered over mDNS.
pub const MDNS_SERVICE_TYPE: &str = "_qssh._udp.local.";

/// Largest discovery datagram accepted or sent (one unfragmented datagram on any LAN).
pub const MAX_DISCOVERY_DATAGRAM: usize = 1199;
/// Listening ports one announcement can carry.
pub const MAX_ANNOUNCED_PORTS: usize = 4;
const HEADER_LEN: usize = 4 + 1 + 1;
/// Size of an ANNOUNCE without name bytes and port entries.
pub const ANNOUNCE_FIXED_LEN: usize = HEADER_LEN + 32 + 1 + 8 + 8 + 8 + 1 + 1;
/// Size of the largest ANNOUNCE.
pub const MAX_ANNOUNCE_LEN: usize = ANNOUNCE_FIXED_LEN + MAX_NAME + 3 * MAX_ANNOUNCED_PORTS;
/// Exact size of a QUERY (padded: see the module documentation).
pub const QUERY_LEN: usize = 160;
const _: () = assert!(MAX_NAME <= u8::MAX as usize);
const _: () = assert!(MAX_ANNOUNCE_LEN <= QUERY_LEN);
const _: () = assert!(QUERY_LEN <= MAX_DISCOVERY_DATAGRAM);

/// Periodic announcements are sent this often (after the start-up burst) ...
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);
/// ... and never more often than this, whatever an announcer is configured with.
pub const MIN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// ... and right after start at these offsets, so a new listener is seen at once.
pub const ANNOUNCE_STARTUP_BURST: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
];
/// A claim not refreshed for this long is forgotten.
pub const DISCOVERY_ENTRY_TTL: Duration = Duration::from_secs(20);
/// `discover` sends its QUERY at these offsets (repeats cover a lost datagram).
pub const QUERY_SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(300),
    Duration::from_millis(1000),
];
/// Default `discover` timeout.
pub const DEFAULT_DISCOVER_TIMEOUT: Duration = Duration::from_secs(3);

/// Datagrams per second accepted from one source address (token bucket rate) ...
pub const RX_PER_SOURCE_PER_SEC: u32 = 50;
/// ... and that bucket's burst.
pub const RX_BURST_PER_SOURCE: u32 = 100;
/// QUERY answers per second sent to one source address ...
pub const REPLIES_PER_SOURCE_PER_SEC: u32 = 4;
/// ... and that bucket's burst.
pub const REPLY_BURST_PER_SOURCE: u32 = 8;
/// QUERY answers per second in total ...
pub const REPLIES_PER_SEC: u32 = 64;
/// ... and that bucket's burst.
pub const REPLY_BURST: u32 = 128;
/// Source addresses a rate limiter keeps buckets for; the rest share one overflow bucket.
pub const MAX_RATE_LIMITED_SOURCES: usize = 1024;

/// Peers a discovery table holds.
pub const MAX_DISCOVERED_PEERS: usize = 1024;
/// Concurrent claims (announcing processes) remembered per peer ID.
pub const MAX_CLAIMS_PER_PEER: usize = 4;
/// Addresses remembered per claim.
pub const MAX_ADDRS_PER_CLAIM: usize = 8;
/// Shortest peer-ID prefix `resolve` accepts.
pub const MIN_PEER_ID_PREFIX: usize = 8;
/// Longest mDNS TXT value parsed (a TXT string is at most 255 bytes anyway).
pub const MAX_TXT_VALUE: usize = 255;

/// Why a discovery datagram or record was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnnounceError {
    #[error("not a qssh discovery datagram")]
    Foreign,
    #[error("datagram of {0} bytes exceeds {MAX_DISCOVERY_DATAGRAM}")]
    Oversized(usize),
    #[error("unsupported discovery version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown discovery message type {0}")]
    UnknownType(u8),
    #[error("malformed discovery message: {0}")]
    Malformed(&'static str),
    #[error("malformed encoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid name (empty after sanitizing, or not in canonical form)")]
    BadName,
    #[error("bad port list: {0}")]
    BadPorts(&'static str),
}

/// Transport of an announced listening port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Transport {
    Tcp = 1,
    Udp = 2,
}

impl Transport {
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Transport::Tcp),
            2 => Some(Transport::Udp),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// One listening port a peer announces. The first port of a list is the primary one: the
/// address list of a discovered peer uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenPort {
    pub transport: Transport,
    pub port: u16,
}

impl ListenPort {
    pub fn tcp(port: u16) -> Self {
        ListenPort {
            transport: Transport::Tcp,
            port,
        }
    }
    pub fn udp(port: u16) -> Self {
        ListenPort {
            transport: Transport::Udp,
            port,
        }
    }
}

impl fmt::Display for ListenPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.transport.name(), self.port)
    }
}

/// Checks a port list: 1..=MAX_ANNOUNCED_PORTS entries, no port 0, no duplicates.
pub fn validate_ports(ports: &[ListenPort]) -> Result<(), AnnounceError> {
    if ports.is_empty() {
        return Err(AnnounceError::BadPorts("no port"));
    }
    if ports.len() > MAX_ANNOUNCED_PORTS {
        return Err(AnnounceError::BadPorts("too many ports"));
    }
    if ports.iter().any(|p| p.port == 0) {
        return Err(AnnounceError::BadPorts("port 0"));
    }
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].contains(p) {
            return Err(AnnounceError::BadPorts("duplicate port"));
        }
    }
    Ok(())
}

fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Canonical form of a display name: no control characters, no invisible or bidirectional
/// formatting characters (they could make one name look like another, or reorder a terminal
/// line), whitespace runs collapsed to one space, trimmed, at most MAX_NAME bytes (cut on a
/// character boundary). Idempotent. May return an empty string.
pub fn sanitize_name(raw: &str) -> String {
    let mut out = String::new();
    let mut pending_space = false;
    for c in raw.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if c.is_control() || is_invisible_format(c) {
            continue;
        }
        let space = usize::from(pending_space);
        if out.len() + space + c.len_utf8() > MAX_NAME {
            break;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
    out
}

/// What a listener announces about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub peer_id: PeerId,
    /// Session protocol version the listener speaks.
    pub protocol_version: u8,
    /// Random per announcing process; a restart is a new instance.
    pub instance: u64,
    /// Increases with every announcement an instance sends (replay suppression).
    pub seq: u64,
    /// Nonce of the QUERY this answers, 0 for a periodic announcement.
    pub reply_to: u64,
    /// Canonical display name (see [`sanitize_name`]), not empty.
    pub name: String,
    /// Listening ports, primary first.
    pub ports: Vec<ListenPort>,
}

impl Announcement {
    /// Encodes after checking that the name is canonical and not empty and the port list
    /// valid, so an encoded announcement always decodes again.
    pub fn encode(&self) -> Result<Vec<u8>, AnnounceError> {
        if self.name.is_empty() || sanitize_name(&self.name) != self.name {
            return Err(AnnounceError::BadName);
        }
        validate_ports(&self.ports)?;
        let mut v = Vec::with_capacity(MAX_ANNOUNCE_LEN);
        let mut w = Writer::new(&mut v);
        w.bytes(&DISCOVERY_MAGIC)
            .u8(DISCOVERY_VERSION)
            .u8(MessageType::Announce as u8)
            .bytes(self.peer_id.as_bytes())
            .u8(self.protocol_version)
            .u64(self.instance)
            .u64(self.seq)
            .u64(self.reply_to)
            // Checked above: sanitize_name bounds the name by MAX_NAME <= 255.
            .u8(self.name.len() as u8)
            .bytes(self.name.as_bytes())
            .u8(self.ports.len() as u8);
        for p in &self.ports {
            w.u8(p.transport as u8).u16(p.port);
        }
        debug_assert!(v.len() <= MAX_ANNOUNCE_LEN);
        Ok(v)
    }

    /// The content that must agree between two sightings of one claim.
    fn content(&self) -> ClaimContent {
        ClaimContent {
            name: self.name.clone(),
            protocol_version: self.protocol_version,
            ports: self.ports.clone(),
        }
    }
}

/// A request for every listener on the link to announce itself now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub nonce: u64,
}

impl Query {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(QUERY_LEN);
        Writer::new(&mut v)
            .bytes(&DISCOVERY_MAGIC)
            .u8(DISCOVERY_VERSION)
            .u8(MessageType::Query as u8)
            .u64(self.nonce);
        v.resize(QUERY_LEN, 0);
        v
    }
}

#[repr(u8)]
enum MessageType {
    Announce = 1,
    Query = 2,
}

/// A decoded discovery datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram {
    Announce(Announcement),
    Query(Query),
}

/// Decodes one discovery datagram. Exact-size parsing: every length is checked against its
/// named limit before use, and trailing bytes are an error. Never panics.
pub fn decode_datagram(bytes: &[u8]) -> Result<Datagram, AnnounceError> {
    if bytes.len() > MAX_DISCOVERY_DATAGRAM {
        return Err(AnnounceError::Oversized(bytes.len()));
    }
    let mut r = Reader::new(bytes);
    match r.take(DISCOVERY_MAGIC.len()) {
        Ok(m) if m == DISCOVERY_MAGIC => {}
        _ => return Err(AnnounceError::Foreign),
    }
    let version = r.u8()?;
    if version != DISCOVERY_VERSION {
        return Err(AnnounceError::UnsupportedVersion(version));
    }
    match r.u8()? {
        t if t == MessageType::Announce as u8 => decode_announce(r).map(Datagram::Announce),
        t if t == MessageType::Query as u8 => {
            if bytes.len() != QUERY_LEN {
                return Err(AnnounceError::Malformed("query length"));
            }
            let nonce = r.u64()?;
            if r.rest().iter().any(|&b| b != 0) {
                return Err(AnnounceError::Malformed("query padding"));
            }
            Ok(Datagram::Query(Query { nonce }))
        }
        t => Err(AnnounceError::UnknownType(t)),
    }
}

fn decode_announce(mut r: Reader<'_>) -> Result<Announcement, AnnounceError> {
    let peer_id = PeerId(r.array()?);
    let protocol_version = r.u8()?;
    let instance = r.u64()?;
    let seq = r.u64()?;
    let reply_to = r.u64()?;
    let name_len = r.u8()? as usize;
    if name_len == 0 || name_len > MAX_NAME {
        return Err(AnnounceError::BadName);
    }
    let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| AnnounceError::BadName)?;
    if sanitize_name(name) != name {
        return Err(AnnounceError::BadName);
    }
    let count = r.u8()? as usize;
    if count == 0 || count > MAX_ANNOUNCED_PORTS {
        return Err(AnnounceError::BadPorts("port count"));
    }
    let mut ports = Vec::with_capacity(count);
    for _ in 0..count {
        let t = r.u8()?;
        let transport = Transport::from_id(t).ok_or(AnnounceError::BadPorts("transport"))?;
        ports.push(ListenPort {
            transport,
            port: r.u16()?,
        });
    }
    validate_ports(&ports)?;
    r.finish()?;
    Ok(Announcement {
        peer_id,
        protocol_version,
        instance,
        seq,
        reply_to,
        name: name.to_string(),
        ports,
    })
}

// ---------------------------------------------------------------------------------------------
// mDNS / DNS-SD mapping

/// TXT keys of the `_qssh._udp` service.
pub mod txt {
    /// Peer ID, 52 base32 characters.
    pub const ID: &str = "id";
    /// Display name.
    pub const NAME: &str = "name";
    /// Session protocol version, decimal.
    pub const VERSION: &str = "v";
    /// Primary listening port, decimal (also the SRV port).
    pub const PORT: &str = "port";
    /// All listening ports: comma-separated `tcp/N` or `udp/N`.
    pub const PORTS: &str = "ports";
    /// Announcing instance, 16 hex digits (merges mDNS and broadcast sightings).
    pub const INSTANCE: &str = "inst";
}

/// The TXT properties announcing `a` over mDNS. Every value is ASCII-bounded well under 255
/// bytes except the name, which is at most MAX_NAME bytes.
pub fn mdns_txt(a: &Announcement) -> Vec<(&'static str, String)> {
    let ports = a
        .ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    vec![
        (txt::ID, a.peer_id.to_string()),
        (txt::NAME, a.name.clone()),
        (txt::VERSION, a.protocol_version.to_string()),
        (
            txt::PORT,
            a.ports.first().map(|p| p.port).unwrap_or(0).to_string(),
        ),
        (txt::PORTS, ports),
        (txt::INSTANCE, format!("{:016x}", a.instance)),
    ]
}

/// A DNS-SD instance label for `a`: readable in standard browsers, unique per instance, at
/// most 63 bytes (one DNS label).
pub fn mdns_instance_name(a: &Announcement) -> String {
    let id = a.peer_id.to_string();
    let suffix = format!(" [{}-{:04x}]", &id[..8], a.instance & 0xffff);
    let mut out = String::new();
    for c in a.name.chars() {
        if out.len() + c.len_utf8() + suffix.len() > 63 {
            break;
        }
        out.push(c);
    }
    out.push_str(&suffix);
    out
}

/// A host name for the mDNS A/AAAA records of instance `a` (unique per instance).
pub fn mdns_host_name(a: &Announcement) -> String {
    let id = a.peer_id.to_string();
    format!("qssh-{}-{:08x}.local.", &id[..16], a.instance as u32)
}

/// Turns a resolved DNS-SD record into a sighting. `get` returns a TXT value by key;
/// `fullname` is the service instance's full name; `srv_port` the SRV port; `addrs` its
/// A/AAAA addresses (IPv6 with scope). Foreign or inconsistent records are rejected.
pub fn sighting_from_mdns(
    get: &dyn Fn(&str) -> Option<String>,
    fullname: &str,
    srv_port: u16,
    addrs: &[SocketAddr],
) -> Result<Sighting, AnnounceError> {
    let field = |k: &str| -> Result<Option<String>, AnnounceError> {
        match get(k) {
            Some(v) if v.len() > MAX_TXT_VALUE => Err(AnnounceError::Malformed("TXT value")),
            v => Ok(v),
        }
    };
    let peer_id: PeerId = field(txt::ID)?
        .ok_or(AnnounceError::Malformed("TXT id missing"))?
        .parse()
        .map_err(|_| AnnounceError::Malformed("TXT id"))?;
    let name = sanitize_name(&field(txt::NAME)?.unwrap_or_default());
    if name.is_empty() {
        return Err(AnnounceError::BadName);
    }
    let protocol_version = match field(txt::VERSION)? {
        Some(v) => v
            .parse::<u8>()
            .map_err(|_| AnnounceError::Malformed("TXT v"))?,
        None => return Err(AnnounceError::Malformed("TXT v missing")),
    };
    if let Some(p) = field(txt::PORT)? {
        if p.parse::<u16>().ok() != Some(srv_port) {
            return Err(AnnounceError::BadPorts("TXT port differs from SRV port"));
        }
    }
    let mut ports = vec![ListenPort::tcp(srv_port)];
    if let Some(list) = field(txt::PORTS)? {
        ports.clear();
        for item in list.split(',') {
            if ports.len() == MAX_ANNOUNCED_PORTS {
                return Err(AnnounceError::BadPorts("too many ports"));
            }
            let (t, p) = item
                .split_once('/')
                .ok_or(AnnounceError::BadPorts("TXT ports"))?;
            let transport = match t {
                "tcp" => Transport::Tcp,
                "udp" => Transport::Udp,
                _ => return Err(AnnounceError::BadPorts("transport")),
            };
            let port = p
                .parse::<u16>()
                .map_err(|_| AnnounceError::BadPorts("TXT ports"))?;
            ports.push(ListenPort { transport, port });
        }
        if ports.first().map(|p| p.port) != Some(srv_port) {
            return Err(AnnounceError::BadPorts(
                "primary port differs from SRV port",
            ));
        }
    }
    validate_ports(&ports)?;
    let instance = match field(txt::INSTANCE)? {
        Some(h) if h.len() == 16 => {
            u64::from_str_radix(&h, 16).map_err(|_| AnnounceError::Malformed("TXT inst"))?
        }
        Some(_) => return Err(AnnounceError::Malformed("TXT inst")),
        // Another implementation: one claim per service instance name.
        None => {
            let h = sha256(&[b"qssh mdns instance", fullname.as_bytes()]);
            u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
        }
    };
    Ok(Sighting {
        peer_id,
        instance,
        seq: None,
        content: ClaimContent {
            name,
            protocol_version,
            ports,
        },
        addrs: addrs.iter().take(MAX_ADDRS_PER_CLAIM).copied().collect(),
        mechanism: Mechanism::Mdns,
    })
}

/// A one-shot ("legacy unicast", RFC 6762 §6.7) DNS-SD query and a bounded parser for its
/// answer. A query sent from a port other than 5353 is answered at once, by unicast, with the
/// full record set, and is exempt from the responder's once-per-second multicast rate limit:
/// so `discover` sees mDNS peers in milliseconds, however often it runs. Standard responders
/// (Avahi, Bonjour, mdns-sd) all implement it.
pub mod mdns_wire {
    use super::AnnounceError;
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// The mDNS port and groups.
    pub const MDNS_PORT: u16 = 5353;
    pub const MDNS_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
    pub const MDNS_GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb);
    /// Largest mDNS message accepted (RFC 6762 §17: up to 9000 bytes).
    pub const MAX_MDNS_MESSAGE: usize = 9000;
    /// Records (all sections together) parsed from one message.
    pub const MAX_DNS_RECORDS: usize = 128;
    /// Compression pointers followed in one name.
    pub const MAX_NAME_POINTERS: usize = 32;
    /// Service instances taken from one message.
    pub const MAX_INSTANCES: usize = 32;
    /// TXT strings kept per record, and addresses per host.
    pub const MAX_TXT_STRINGS: usize = 32;
    pub const MAX_HOST_ADDRS: usize = 8;
    const MAX_DNS_NAME: usize = 255;

    const TYPE_A: u16 = 1;
    const TYPE_PTR: u16 = 12;
    const TYPE_TXT: u16 = 16;
    const TYPE_AAAA: u16 = 28;
    const TYPE_SRV: u16 = 33;
    const CLASS_IN: u16 = 1;

    /// Lower-cased labels of a domain name.
    type Name = Vec<Vec<u8>>;

    fn err(what: &'static str) -> AnnounceError {
        AnnounceError::Malformed(what)
    }

    fn labels_of(dotted: &str) -> Name {
        dotted
            .trim_end_matches('.')
            .split('.')
            .map(|l| l.as_bytes().to_ascii_lowercase())
            .collect()
    }

    /// A PTR question for `service` (e.g. "_qssh._udp.local."), class IN, with message `id`.
    /// `service` is a constant of ours: labels of at most 63 bytes.
    pub fn legacy_ptr_query(id: u16, service: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in service.trim_end_matches('.').split('.') {
            debug_assert!(!l.is_empty() && l.len() <= 63);
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v.extend_from_slice(&TYPE_PTR.to_be_bytes());
        v.extend_from_slice(&CLASS_IN.to_be_bytes());
        v
    }

    fn u16_at(m: &[u8], at: usize) -> Result<u16, AnnounceError> {
        let b = m.get(at..at + 2).ok_or(err("dns truncated"))?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a (possibly compressed) name at `pos`; returns it and the position after it.
    /// Every pointer must go strictly backwards from where the current run started, so
    /// decoding always terminates; at most MAX_NAME_POINTERS are followed.
    fn read_name(m: &[u8], mut pos: usize) -> Result<(Name, usize), AnnounceError> {
        let mut labels = Name::new();
        let mut total = 0usize;
        let mut after: Option<usize> = None;
        let mut run_start = pos;
        let mut jumps = 0usize;
        loop {
            let len = *m.get(pos).ok_or(err("dns name truncated"))? as usize;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    return Ok((labels, after.unwrap_or(pos + 1)));
                }
                0x00 => {
                    let label = m
                        .get(pos + 1..pos + 1 + len)
                        .ok_or(err("dns name truncated"))?;
                    total += len + 1;
                    if total > MAX_DNS_NAME {
                        return Err(err("dns name too long"));
                    }
                    labels.push(label.to_ascii_lowercase());
                    pos += 1 + len;
                }
                0xc0 => {
                    let lo = *m.get(pos + 1).ok_or(err("dns name truncated"))? as usize;
                    let target = ((len & 0x3f) << 8) | lo;
                    if target >= run_start {
                        return Err(err("dns pointer does not go backwards"));
                    }
                    jumps += 1;
                    if jumps > MAX_NAME_POINTERS {
                        return Err(err("dns pointer chain"));
                    }
                    after.get_or_insert(pos + 2);
                    run_start = target;
                    pos = target;
                }
                _ => return Err(err("dns label type")),
            }
        }
    }

    /// One service instance as a DNS-SD answer describes it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ResolvedInstance {
        /// Full instance name, lower-cased, dotted, with the trailing dot.
        pub fullname: String,
        /// SRV port.
        pub port: u16,
        /// TXT key/value pairs (keys lower-cased; the first of a key wins).
        pub txt: Vec<(String, String)>,
        /// A/AAAA addresses of the SRV target.
        pub ips: Vec<IpAddr>,
    }

    impl ResolvedInstance {
        pub fn get(&self, key: &str) -> Option<String> {
            self.txt
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        }
    }

    fn dotted(n: &Name) -> String {
        let mut s = n
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>()
            .join(".");
        s.push('.');
        s
    }

    /// Parses a response to [`legacy_ptr_query`] with message `id` and returns the complete
    /// instances of `service` it carries (PTR + SRV + TXT + addresses). Never panics; every
    /// count and length is checked against a named limit before use.
    pub fn parse_response(
        m: &[u8],
        id: u16,
        service: &str,
    ) -> Result<Vec<ResolvedInstance>, AnnounceError> {
        if m.len() > MAX_MDNS_MESSAGE {
            return Err(AnnounceError::Oversized(m.len()));
        }
        if m.len() < 12 {
            return Err(err("dns header"));
        }
        if u16_at(m, 0)? != id {
            return Err(AnnounceError::Foreign);
        }
        let flags = u16_at(m, 2)?;
        if flags & 0x8000 == 0 || flags & 0x000f != 0 {
            return Err(err("not a dns answer"));
        }
        let qd = u16_at(m, 4)? as usize;
        let rr = u16_at(m, 6)? as usize + u16_at(m, 8)? as usize + u16_at(m, 10)? as usize;
        if qd + rr > MAX_DNS_RECORDS {
            return Err(err("too many dns records"));
        }
        let mut pos = 12;
        for _ in 0..qd {
            let (_, next) = read_name(m, pos)?;
            pos = next + 4;
            if pos > m.len() {
                return Err(err("dns question truncated"));
            }
        }
        let service = labels_of(service);
        let mut instances: Vec<Name> = Vec::new();
        let mut srv: BTreeMap<Name, (u16, Name)> = BTreeMap::new();
        let mut txt: BTreeMap<Name, Vec<(String, String)>> = BTreeMap::new();
        let mut addrs: BTreeMap<Name, Vec<IpAddr>> = BTreeMap::new();
        for _ in 0..rr {
            let (owner, next) = read_name(m, pos)?;
            let rtype = u16_at(m, next)?;
            let class = u16_at(m, next + 2)? & 0x7fff;
            let ttl = m
                .get(next + 4..next + 8)
                .ok_or(err("dns record truncated"))?;
            let ttl = u32::from_be_bytes([ttl[0], ttl[1], ttl[2], ttl[3]]);
            let rdlen = u16_at(m, next + 8)? as usize;
            let start = next + 10;
            let end = start + rdlen;
            let rdata = m.get(start..end).ok_or(err("dns rdata truncated"))?;
            pos = end;
            // Another class, or a goodbye (TTL 0): nothing to learn.
            if class != CLASS_IN || ttl == 0 {
                continue;
            }
            match rtype {
                TYPE_PTR if owner == service => {
                    let (inst, after) = read_name(m, start)?;
                    if after > end {
                        return Err(err("dns PTR overruns its record"));
                    }
                    if !instances.contains(&inst) && instances.len() < MAX_INSTANCES {
                        instances.push(inst);
                    }
                }
                TYPE_SRV => {
                    if rdlen < 7 {
                        return Err(err("dns SRV"));
                    }
                    let port = u16_at(m, start + 4)?;
                    let (target, after) = read_name(m, start + 6)?;
                    if after > end {
                        return Err(err("dns SRV overruns its record"));
                    }
                    srv.entry(owner).or_insert((port, target));
                }
                TYPE_TXT => {
                    let mut kv = Vec::new();
                    let mut i = 0;
                    while i < rdata.len() && kv.len() < MAX_TXT_STRINGS {
                        let n = rdata[i] as usize;
                        let s = rdata.get(i + 1..i + 1 + n).ok_or(err("dns TXT"))?;
                        i += 1 + n;
                        let s = String::from_utf8_lossy(s);
                        let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                        let k = k.to_ascii_lowercase();
                        if !k.is_empty() && !kv.iter().any(|(kk, _)| *kk == k) {
                            kv.push((k, v.to_string()));
                        }
                    }
                    txt.entry(owner).or_insert(kv);
                }
                TYPE_A | TYPE_AAAA => {
                    let ip = match rdata.len() {
                        4 if rtype == TYPE_A => {
                            IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))
                        }
                        16 if rtype == TYPE_AAAA => {
                            let b: [u8; 16] = rdata.try_into().map_err(|_| err("dns AAAA"))?;
                            IpAddr::V6(Ipv6Addr::from(b))
                        }
                        _ => return Err(err("dns address length")),
                    };
                    let list = addrs.entry(owner).or_default();
                    if !list.contains(&ip) && list.len() < MAX_HOST_ADDRS {
                        list.push(ip);
                    }
                }
                _ => {}
            }
        }
        Ok(instances
            .into_iter()
            .filter_map(|inst| {
                let (port, target) = srv.get(&inst)?;
                let txt = txt.get(&inst)?.clone();
                Some(ResolvedInstance {
                    fullname: dotted(&inst),
                    port: *port,
                    txt,
                    ips: addrs.get(target).cloned().unwrap_or_default(),
                })
            })
            .collect())
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        const SVC: &str = "_qssh._udp.local.";

        fn name(out: &mut Vec<u8>, dotted: &str) {
            for l in dotted.trim_end_matches('.').split('.') {
                out.push(l.len() as u8);
                out.extend_from_slice(l.as_bytes());
            }
            out.push(0);
        }

        fn rr(out: &mut Vec<u8>, owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) {
            out.extend_from_slice(owner);
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&0x8001u16.to_be_bytes()); // cache-flush + IN
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(rdata);
        }

        /// A response as a responder would send it: question echoed, PTR answer, SRV, TXT
        /// and A in additionals, with compression pointers.
        fn response(id: u16) -> Vec<u8> {
            let mut m = id.to_be_bytes().to_vec();
            m.extend_from_slice(&[0x84, 0x00, 0, 1, 0, 1, 0, 0, 0, 3]);
            let svc_at = m.len() as u16;
            name(&mut m, SVC);
            m.extend_from_slice(&[0, 12, 0, 1]);
            let svc_ptr = (0xc000 | svc_at).to_be_bytes();
            // PTR: owner = pointer to the service; rdata = "Alice" + pointer.
            let mut inst = vec![5];
            inst.extend_from_slice(b"Alice");
            inst.extend_from_slice(&svc_ptr);
            let inst_at = m.len() as u16 + 2 + 10;
            rr(&mut m, &svc_ptr, TYPE_PTR, 4500, &inst);
            let inst_ptr = (0xc000 | inst_at).to_be_bytes();
            let mut host = Vec::new();
            name(&mut host, "h1.local.");
            let mut srv = vec![0, 0, 0, 0, 0x56, 0xce];
            srv.extend_from_slice(&host);
            rr(&mut m, &inst_ptr, TYPE_SRV, 120, &srv);
            let mut t = Vec::new();
            for s in ["id=abc", "port=22222", "ID=dup", "flag"] {
                t.push(s.len() as u8);
                t.extend_from_slice(s.as_bytes());
            }
            rr(&mut m, &inst_ptr, TYPE_TXT, 4500, &t);
            rr(&mut m, &host, TYPE_A, 120, &[10, 0, 0, 1]);
            m
        }

        #[test]
        fn query_shape() {
            let q = legacy_ptr_query(0x1234, SVC);
            assert_eq!(&q[..12], &[0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(read_name(&q, 12).unwrap().0, labels_of(SVC));
            assert_eq!(&q[q.len() - 4..], &[0, 12, 0, 1]);
        }

        #[test]
        fn parses_a_compressed_answer() {
            let got = parse_response(&response(7), 7, SVC).unwrap();
            assert_eq!(
                got,
                vec![ResolvedInstance {
                    fullname: "alice._qssh._udp.local.".into(),
                    port: 22222,
                    txt: vec![
                        ("id".into(), "abc".into()),
                        ("port".into(), "22222".into()),
                        ("flag".into(), "".into())
                    ],
                    ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
                }]
            );
            assert_eq!(got[0].get("ID").as_deref(), Some("abc"));
        }

        #[test]
        fn rejects_wrong_id_queries_loops_and_truncation() {
            let r = response(7);
            assert_eq!(parse_response(&r, 8, SVC), Err(AnnounceError::Foreign));
            let mut q = r.clone();
            q[2] = 0; // a query, not an answer
            assert!(parse_response(&q, 7, SVC).is_err());
            for n in 0..r.len() {
                assert!(parse_response(&r[..n], 7, SVC).is_err(), "prefix {n}");
            }
            // A pointer to itself, and a forward pointer.
            let mut m = 7u16.to_be_bytes().to_vec();
            m.extend_from_slice(&[0x84, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 12, 0, 1]);
            assert!(parse_response(&m, 7, SVC).is_err());
            let mut m = 7u16.to_be_bytes().to_vec();
            m.extend_from_slice(&[0x84, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 20, 0, 12, 0, 1]);
            assert!(parse_response(&m, 7, SVC).is_err());
            // Counts beyond the limit.
            let mut m = r.clone();
            m[11] = 200;
            assert!(parse_response(&m, 7, SVC).is_err());
            assert!(matches!(
                parse_response(&vec![0; MAX_MDNS_MESSAGE + 1], 0, SVC),
                Err(AnnounceError::Oversized(_))
            ));
        }

        #[test]
        fn goodbyes_and_other_services_are_not_instances() {
            let mut m = 7u16.to_be_bytes().to_vec();
            m.extend_from_slice(&[0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
            let mut owner = Vec::new();
            name(&mut owner, "_other._udp.local.");
            let mut inst = Vec::new();
            name(&mut inst, "x._other._udp.local.");
            rr(&mut m, &owner, TYPE_PTR, 100, &inst);
            assert!(parse_response(&m, 7, SVC).unwrap().is_empty());
        }

        proptest! {
            #[test]
            fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                let _ = parse_response(&bytes, u16::from_be_bytes([bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)]), SVC);
            }

            #[test]
            fn parser_never_panics_near_valid(i in any::<usize>(), b in any::<u8>(), cut in any::<usize>()) {
                let mut r = response(9);
                let i = i % r.len();
                r[i] = b;
                let cut = cut % (r.len() + 1);
                let _ = parse_response(&r[..cut], 9, SVC);
                let _ = parse_response(&r, 9, SVC);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sightings and the discovery table

/// How a peer was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Broadcast,
    Mdns,
}

/// The set of mechanisms a peer was seen through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Via {
    pub broadcast: bool,
    pub mdns: bool,
}

impl Via {
    fn add(&mut self, m: Mechanism) {
        match m {
            Mechanism::Broadcast => self.broadcast = true,
            Mechanism::Mdns => self.mdns = true,
        }
    }
    fn union(self, o: Via) -> Via {
        Via {
            broadcast: self.broadcast || o.broadcast,
            mdns: self.mdns || o.mdns,
        }
    }
    /// "broadcast", "mdns", "both" (or "none" for an empty set).
    pub fn as_str(self) -> &'static str {
        match (self.broadcast, self.mdns) {
            (true, true) => "both",
            (true, false) => "broadcast",
            (false, true) => "mdns",
            (false, false) => "none",
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one announcing process says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimContent {
    pub name: String,
    pub protocol_version: u8,
    pub ports: Vec<ListenPort>,
}

/// One observation of a peer by one mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub peer_id: PeerId,
    pub instance: u64,
    /// Broadcast announcements are sequenced; mDNS records are not.
    pub seq: Option<u64>,
    pub content: ClaimContent,
    /// Where it came from (the port is ignored: the table uses the primary listening port).
    pub addrs: Vec<SocketAddr>,
    pub mechanism: Mechanism,
}

impl Sighting {
    /// A broadcast/multicast announcement received from `src`.
    pub fn from_announcement(a: &Announcement, src: SocketAddr) -> Self {
        Sighting {
            peer_id: a.peer_id,
            instance: a.instance,
            seq: Some(a.seq),
            content: a.content(),
            addrs: vec![src],
            mechanism: Mechanism::Broadcast,
        }
    }
}

/// What [`DiscoveryTable::observe`] did with a sighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A peer ID not seen before.
    NewPeer,
    /// A new announcing instance for a known peer ID.
    NewClaim,
    /// A known claim refreshed or updated.
    Updated,
    /// Same announcement again (e.g. over another interface); only new addresses merged.
    Duplicate,
    /// An old sequence number with other content: a replay, ignored.
    Replayed,
    /// The table is full: ignored.
    TableFull,
}

#[derive(Debug, Clone)]
struct Claim {
    instance: u64,
    max_seq: Option<u64>,
    content: ClaimContent,
    addrs: BTreeSet<SocketAddr>,
    via: Via,
    first_seen: Instant,
    last_seen: Instant,
}

impl Claim {
    fn add_addrs(&mut self, addrs: &[SocketAddr]) -> bool {
        let mut added = false;
        for a in addrs {
            let a = strip_port(*a);
            if self.addrs.len() >= MAX_ADDRS_PER_CLAIM {
                break;
            }
            added |= self.addrs.insert(a);
        }
        added
    }
    fn addrs_with_port(&self) -> Vec<SocketAddr> {
        let port = self.content.ports.first().map(|p| p.port).unwrap_or(0);
        let mut v: Vec<SocketAddr> = self
            .addrs
            .iter()
            .map(|a| {
                let mut a = *a;
                a.set_port(port);
                a
            })
            .collect();
        v.sort_by_key(addr_order);
        v
    }
}

fn strip_port(mut a: SocketAddr) -> SocketAddr {
    a.set_port(0);
    if let SocketAddr::V6(v6) = &mut a {
        v6.set_flowinfo(0);
        // A scope only means something for link-local addresses.
        if !is_link_local_v6(v6.ip()) {
            v6.set_scope_id(0);
        }
    }
    a
}

fn is_link_local_v6(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// IPv4 first, then global IPv6, then link-local IPv6; each in address order.
fn addr_order(a: &SocketAddr) -> (u8, SocketAddr) {
    let class = match a {
        SocketAddr::V4(_) => 0,
        SocketAddr::V6(v6) if is_link_local_v6(v6.ip()) => 2,
        SocketAddr::V6(_) => 1,
    };
    (class, *a)
}

/// A peer as discovery shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredPeer {
    pub peer_id: PeerId,
    /// Name of the primary (earliest seen live) claim.
    pub name: String,
    pub protocol_version: u8,
    /// Listening ports of the primary claim, primary first.
    pub ports: Vec<ListenPort>,
    /// Endpoints (IP and primary port), the primary claim's first. With a conflict, other
    /// claims' endpoints follow: connecting pins the peer ID, so only the real one can finish
    /// a handshake on any of them.
    pub addrs: Vec<SocketAddr>,
    pub via: Via,
    /// Another live claim of this ID, or another peer ID with the same name: see
    /// [`DiscoveryTable::conflicts`].
    pub conflict: bool,
    pub last_seen: Instant,
}

impl DiscoveredPeer {
    /// The `discover` output line: `PEERID NAME ADDR[,ADDR...] via broadcast|mdns|both`.
    pub fn line(&self) -> String {
        let addrs = self
            .addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut s = format!("{} {} {} via {}", self.peer_id, self.name, addrs, self.via);
        if self.conflict {
            s.push_str(" CONFLICT");
        }
        s
    }

    /// One JSON object (no trailing newline).
    pub fn to_json(&self) -> String {
        format!(
            "{{\"peer_id\":{},\"name\":{},\"protocol_version\":{},\"ports\":[{}],\"addrs\":[{}],\"via\":{},\"conflict\":{}}}",
            json_str(&self.peer_id.to_string()),
            json_str(&self.name),
            self.protocol_version,
            self.ports
                .iter()
                .map(|p| format!(
                    "{{\"transport\":{},\"port\":{}}}",
                    json_str(p.transport.name()),
                    p.port
                ))
                .collect::<Vec<_>>()
                .join(","),
            json_addrs(&self.addrs),
            json_str(self.via.as_str()),
            self.conflict
        )
    }
}

impl fmt::Display for DiscoveredPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line())
    }
}

/// One claim of a conflicting peer ID, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimView {
    pub name: String,
    pub ports: Vec<ListenPort>,
    pub addrs: Vec<SocketAddr>,
    pub via: Via,
}

/// Something on the LAN that does not add up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Several live announcing processes on different hosts (or with different content)
    /// claim one peer ID: at most one of them can prove it.
    PeerId {
        peer_id: PeerId,
        claims: Vec<ClaimView>,
    },
    /// Several peer IDs announce the same name (compared case-insensitively).
    Name { name: String, peers: Vec<PeerId> },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::PeerId { peer_id, claims } => {
                write!(
                    f,
                    "peer ID {peer_id} is claimed by {} announcers:",
                    claims.len()
                )?;
                for c in claims {
                    write!(f, " [{} at {}]", c.name, json_addrs_plain(&c.addrs))?;
                }
                Ok(())
            }
            Conflict::Name { name, peers } => {
                write!(f, "name {name:?} is announced by {} peer IDs:", peers.len())?;
                for p in peers {
                    write!(f, " {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl Conflict {
    pub fn to_json(&self) -> String {
        match self {
            Conflict::PeerId { peer_id, claims } => format!(
                "{{\"kind\":\"peer_id\",\"peer_id\":{},\"claims\":[{}]}}",
                json_str(&peer_id.to_string()),
                claims
                    .iter()
                    .map(|c| format!(
                        "{{\"name\":{},\"ports\":[{}],\"addrs\":[{}],\"via\":{}}}",
                        json_str(&c.name),
                        c.ports
                            .iter()
                            .map(|p| json_str(&p.to_string()))
                            .collect::<Vec<_>>()
                            .join(","),
                        json_addrs(&c.addrs),
                        json_str(c.via.as_str())
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Conflict::Name { name, peers } => format!(
                "{{\"kind\":\"name\",\"name\":{},\"peers\":[{}]}}",
                json_str(name),
                peers
                    .iter()
                    .map(|p| json_str(&p.to_string()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

fn json_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| json_str(&a.to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

fn json_addrs_plain(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A JSON string literal for `s` (RFC 8259 escaping).
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why a `connect` target did not resolve to exactly one peer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResolveError {
    #[error("no discovered peer matches {0:?}")]
    NotFound(String),
    #[error("{target:?} is too short for a peer ID prefix (at least {MIN_PEER_ID_PREFIX} characters) and names no peer")]
    PrefixTooShort { target: String },
    #[error("{target:?} is ambiguous; candidates:{}", candidate_lines(.candidates))]
    Ambiguous {
        target: String,
        /// (peer ID, name) of every match, in display order.
        candidates: Vec<(PeerId, String)>,
    },
}

fn candidate_lines(c: &[(PeerId, String)]) -> String {
    c.iter()
        .map(|(id, name)| format!("\n  {id} {name}"))
        .collect()
}

/// Resolves a `connect` target against discovered peers: an exact peer ID, a unique peer-ID
/// prefix of at least MIN_PEER_ID_PREFIX characters, or a unique name (case-insensitive).
/// A target matching several peers (by name, by prefix, or one by name and another by
/// prefix) is refused with the list of candidates.
pub fn resolve<'a>(
    peers: &'a [DiscoveredPeer],
    target: &str,
) -> Result<&'a DiscoveredPeer, ResolveError> {
    let t = target.trim();
    if let Ok(id) = t.parse::<PeerId>() {
        return peers
            .iter()
            .find(|p| p.peer_id == id)
            .ok_or_else(|| ResolveError::NotFound(t.to_string()));
    }
    let lower = t.to_lowercase();
    let looks_like_prefix = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    let prefix_ok = looks_like_prefix && lower.len() >= MIN_PEER_ID_PREFIX;
    let matches: Vec<&DiscoveredPeer> = peers
        .iter()
        .filter(|p| {
            p.name.to_lowercase() == lower
                || (prefix_ok && p.peer_id.to_string().starts_with(&lower))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] if looks_like_prefix && !prefix_ok => Err(ResolveError::PrefixTooShort {
            target: t.to_string(),
        }),
        [] => Err(ResolveError::NotFound(t.to_string())),
        many => Err(ResolveError::Ambiguous {
            target: t.to_string(),
            candidates: many.iter().map(|p| (p.peer_id, p.name.clone())).collect(),
        }),
    }
}

/// Counters of what a table accepted and refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub new_peers: u64,
    pub updates: u64,
    pub duplicates: u64,
    pub replayed: u64,
    pub table_full: u64,
}

#[derive(Debug, Clone)]
struct PeerEntry {
    claims: Vec<Claim>,
}

/// Peers seen by broadcast and mDNS, merged by peer ID. Bounded: at most
/// MAX_DISCOVERED_PEERS peers of at most MAX_CLAIMS_PER_PEER claims of at most
/// MAX_ADDRS_PER_CLAIM addresses.
///
/// A *claim* is one announcing process (peer ID + random instance). Sightings of the same
/// instance through broadcast, IPv6 multicast and mDNS merge into one claim. A new instance
/// from an address an old claim used replaces it (the process restarted); otherwise it is a
/// second claim, and two live claims of one peer ID are a conflict.
#[derive(Debug, Clone)]
pub struct DiscoveryTable {
    peers: BTreeMap<PeerId, PeerEntry>,
    ttl: Duration,
    stats: TableStats,
}

impl Default for DiscoveryTable {
    fn default() -> Self {
        Self::new()
    }
}

impl DiscoveryTable {
    pub fn new() -> Self {
        Self::with_ttl(DISCOVERY_ENTRY_TTL)
    }

    pub fn with_ttl(ttl: Duration) -> Self {
        DiscoveryTable {
            peers: BTreeMap::new(),
            ttl,
            stats: TableStats::default(),
        }
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Number of peer IDs held (live or not yet expired).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Merges one sighting.
    pub fn observe(&mut self, now: Instant, s: &Sighting) -> Observed {
        self.expire(now);
        let r = self.observe_inner(now, s);
        match r {
            Observed::NewPeer => self.stats.new_peers += 1,
            Observed::NewClaim | Observed::Updated => self.stats.updates += 1,
            Observed::Duplicate => self.stats.duplicates += 1,
            Observed::Replayed => self.stats.replayed += 1,
            Observed::TableFull => self.stats.table_full += 1,
        }
        r
    }

    fn observe_inner(&mut self, now: Instant, s: &Sighting) -> Observed {
        let new_claim = |s: &Sighting| {
            let mut via = Via::default();
            via.add(s.mechanism);
            let mut c = Claim {
                instance: s.instance,
                max_seq: s.seq,
                content: s.content.clone(),
                addrs: BTreeSet::new(),
                via,
                first_seen: now,
                last_seen: now,
            };
            c.add_addrs(&s.addrs);
            c
        };
        let Some(entry) = self.peers.get_mut(&s.peer_id) else {
            if self.peers.len() >= MAX_DISCOVERED_PEERS {
                return Observed::TableFull;
            }
            self.peers.insert(
                s.peer_id,
                PeerEntry {
                    claims: vec![new_claim(s)],
                },
            );
            return Observed::NewPeer;
        };
        if let Some(c) = entry.claims.iter_mut().find(|c| c.instance == s.instance) {
            let same = c.content == s.content;
            let fresh = match (s.seq, c.max_seq) {
                (Some(q), Some(m)) => q > m,
                // mDNS is not sequenced: it refreshes, but may only change content of a
                // claim no sequenced announcement has spoken for.
                (None, Some(_)) => same,
                (Some(_), None) | (None, None) => true,
            };
            if fresh {
                if let Some(q) = s.seq {
                    c.max_seq = Some(q);
                }
                c.content = s.content.clone();
                c.add_addrs(&s.addrs);
                c.via.add(s.mechanism);
                c.last_seen = now;
                return Observed::Updated;
            }
            if same {
                c.via.add(s.mechanism);
                let added = c.add_addrs(&s.addrs);
                return if added {
                    Observed::Updated
                } else {
                    Observed::Duplicate
                };
            }
            return Observed::Replayed;
        }
        // A new instance. One from an address an existing claim uses is that host's process
        // restarted: it replaces the old claim.
        let incoming: BTreeSet<SocketAddr> = s.addrs.iter().map(|a| strip_port(*a)).collect();
        entry
            .claims
            .retain(|c| c.addrs.intersection(&incoming).next().is_none());
        if entry.claims.len() >= MAX_CLAIMS_PER_PEER {
            // Evict the stalest: an attacker inventing instances can churn them, but every
            // real announcer comes back at its next announcement, and the conflict stays shown.
            if let Some(i) = entry
                .claims
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(i, _)| i)
            {
                entry.claims.remove(i);
            }
        }
        entry.claims.push(new_claim(s));
        Observed::NewClaim
    }

    /// Forgets claims not refreshed within the TTL, and peers without claims.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.peers.retain(|_, e| {
            e.claims
                .retain(|c| now.saturating_duration_since(c.last_seen) < ttl);
            !e.claims.is_empty()
        });
    }

    /// Live peers in display order: by name (case-insensitive), then by peer ID.
    pub fn peers(&self, now: Instant) -> Vec<DiscoveredPeer> {
        let name_clash = self.name_clashes(now);
        let mut out: Vec<DiscoveredPeer> = self
            .peers
            .iter()
            .filter_map(|(id, e)| {
                let live: Vec<&Claim> = self.live_claims(e, now);
                let primary = live.iter().min_by_key(|c| (c.first_seen, c.instance))?;
                let mut addrs = primary.addrs_with_port();
                let mut via = Via::default();
                for c in &live {
                    via = via.union(c.via);
                    if c.instance != primary.instance {
                        for a in c.addrs_with_port() {
                            if !addrs.contains(&a) {
                                addrs.push(a);
                            }
                        }
                    }
                }
                Some(DiscoveredPeer {
                    peer_id: *id,
                    name: primary.content.name.clone(),
                    protocol_version: primary.content.protocol_version,
                    ports: primary.content.ports.clone(),
                    addrs,
                    via,
                    conflict: live.len() > 1
                        || name_clash.contains_key(&primary.content.name.to_lowercase()),
                    last_seen: live.iter().map(|c| c.last_seen).max()?,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (a.name.to_lowercase(), a.peer_id).cmp(&(b.name.to_lowercase(), b.peer_id))
        });
        out
    }

    fn live_claims<'a>(&self, e: &'a PeerEntry, now: Instant) -> Vec<&'a Claim> {
        e.claims
            .iter()
            .filter(|c| now.saturating_duration_since(c.last_seen) < self.ttl)
            .collect()
    }

    /// Lower-cased primary names announced by more than one peer ID.
    fn name_clashes(&self, now: Instant) -> BTreeMap<String, (String, Vec<PeerId>)> {
        let mut by_name: BTreeMap<String, (String, Vec<PeerId>)> = BTreeMap::new();
        for (id, e) in &self.peers {
            if let Some(primary) = self
                .live_claims(e, now)
                .into_iter()
                .min_by_key(|c| (c.first_seen, c.instance))
            {
                by_name
                    .entry(primary.content.name.to_lowercase())
                    .or_insert_with(|| (primary.content.name.clone(), Vec::new()))
                    .1
                    .push(*id);
            }
        }
        by_name.retain(|_, (_, ids)| ids.len() > 1);
        by_name
    }

    /// Current conflicts: peer IDs with several live claims, then names with several IDs.
    pub fn conflicts(&self, now: Instant) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (id, e) in &self.peers {
            let mut live = self.live_claims(e, now);
            if live.len() > 1 {
                live.sort_by_key(|c| (c.first_seen, c.instance));
                out.push(Conflict::PeerId {
                    peer_id: *id,
                    claims: live
                        .iter()
                        .map(|c| ClaimView {
                            name: c.content.name.clone(),
                            ports: c.content.ports.clone(),
                            addrs: c.addrs_with_port(),
                            via: c.via,
                        })
                        .collect(),
                });
            }
        }
        for (_, (name, peers)) in self.name_clashes(now) {
            out.push(Conflict::Name { name, peers });
        }
        out
    }

    /// [`resolve`] over the live peers.
    pub fn resolve(&self, target: &str, now: Instant) -> Result<DiscoveredPeer, ResolveError> {
        resolve(&self.peers(now), target).cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limiting

/// A token bucket (integer arithmetic in micro-tokens; time is passed in).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: u64,
    burst_micro: u64,
    micro: u64,
    last: Instant,
}

const MICRO: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate_per_sec: rate_per_sec as u64,
            burst_micro: burst as u64 * MICRO,
            micro: burst as u64 * MICRO,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        if dt.is_zero() {
            return;
        }
        self.last = now;
        // rate * micros elapsed: tokens in micro-tokens; saturating to stay panic-free.
        let add = self
            .rate_per_sec
            .saturating_mul(u64::try_from(dt.as_micros()).unwrap_or(u64::MAX));
        self.micro = self.micro.saturating_add(add).min(self.burst_micro);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.micro >= MICRO {
            self.micro -= MICRO;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.micro >= self.burst_micro
    }
}

/// Token buckets per source IP, at most MAX_RATE_LIMITED_SOURCES of them; sources beyond
/// that share one overflow bucket (so a spoofed-source flood cannot grow memory, and cannot
/// starve sources that already have a bucket).
#[derive(Debug, Clone)]
pub struct SourceLimiter {
    rate: u32,
    burst: u32,
    buckets: HashMap<IpAddr, TokenBucket>,
    overflow: TokenBucket,
    last_sweep: Instant,
}

impl SourceLimiter {
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        SourceLimiter {
            rate: rate_per_sec,
            burst,
            buckets: HashMap::new(),
            overflow: TokenBucket::new(rate_per_sec, burst, now),
            last_sweep: now,
        }
    }

    /// Whether one more datagram from `ip` is within its rate.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if let Some(b) = self.buckets.get_mut(&ip) {
            return b.take(now);
        }
        if self.buckets.len() >= MAX_RATE_LIMITED_SOURCES
            && now.saturating_duration_since(self.last_sweep) >= Duration::from_secs(1)
        {
            // Idle sources (full buckets) carry no state worth keeping.
            self.last_sweep = now;
            self.buckets.retain(|_, b| !b.is_full(now));
        }
        if self.buckets.len() >= MAX_RATE_LIMITED_SOURCES {
            return self.overflow.take(now);
        }
        let mut b = TokenBucket::new(self.rate, self.burst, now);
        let ok = b.take(now);
        self.buckets.insert(ip, b);
        ok
    }

    pub fn tracked_sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::PROTOCOL_VERSION;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

    fn pid(b: u8) -> PeerId {
        PeerId([b; 32])
    }

    fn ann(id: u8, name: &str, inst: u64, seq: u64) -> Announcement {
        Announcement {
            peer_id: pid(id),
            protocol_version: PROTOCOL_VERSION,
            instance: inst,
            seq,
            reply_to: 0,
            name: name.to_string(),
            ports: vec![ListenPort::tcp(22222), ListenPort::udp(22222)],
        }
    }

    fn v4(last: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 40000))
    }

    #[test]
    fn announce_round_trip_and_sizes() {
        let a = ann(7, "alice laptop", 42, 9);
        let enc = a.encode().unwrap();
        assert_eq!(enc.len(), ANNOUNCE_FIXED_LEN + 12 + 6);
        assert_eq!(decode_datagram(&enc).unwrap(), Datagram::Announce(a));
        let mut big = ann(1, &"x".repeat(MAX_NAME), 1, 1);
        big.ports = (1..=MAX_ANNOUNCED_PORTS as u16)
            .map(ListenPort::tcp)
            .collect();
        assert_eq!(big.encode().unwrap().len(), MAX_ANNOUNCE_LEN);
        let q = Query { nonce: 77 };
        let qe = q.encode();
        assert_eq!(qe.len(), QUERY_LEN);
        assert_eq!(decode_datagram(&qe).unwrap(), Datagram::Query(q));
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        assert_eq!(ann(1, "", 1, 1).encode(), Err(AnnounceError::BadName));
        assert_eq!(ann(1, " a", 1, 1).encode(), Err(AnnounceError::BadName));
        assert_eq!(
            ann(1, "a\u{202e}b", 1, 1).encode(),
            Err(AnnounceError::BadName)
        );
        let mut a = ann(1, "a", 1, 1);
        a.ports.clear();
        assert!(matches!(a.encode(), Err(AnnounceError::BadPorts(_))));
        a.ports = vec![ListenPort::tcp(1); 2];
        assert!(matches!(a.encode(), Err(AnnounceError::BadPorts(_))));
        a.ports = vec![ListenPort::tcp(0)];
        assert!(matches!(a.encode(), Err(AnnounceError::BadPorts(_))));
        a.ports = (1..=5).map(ListenPort::tcp).collect();
        assert!(matches!(a.encode(), Err(AnnounceError::BadPorts(_))));
    }

    #[test]
    fn decode_rejects_each_kind_of_bad_datagram() {
        let good = ann(3, "bob", 5, 6).encode().unwrap();
        assert_eq!(decode_datagram(b"hello"), Err(AnnounceError::Foreign));
        assert_eq!(decode_datagram(b""), Err(AnnounceError::Foreign));
        assert_eq!(
            decode_datagram(&vec![0u8; MAX_DISCOVERY_DATAGRAM + 1]),
            Err(AnnounceError::Oversized(MAX_DISCOVERY_DATAGRAM + 1))
        );
        let mut v = good.clone();
        v[4] = 2;
        assert_eq!(
            decode_datagram(&v),
            Err(AnnounceError::UnsupportedVersion(2))
        );
        let mut v = good.clone();
        v[5] = 9;
        assert_eq!(decode_datagram(&v), Err(AnnounceError::UnknownType(9)));
        // Every truncation fails; so does a trailing byte.
        for n in 0..good.len() {
            assert!(decode_datagram(&good[..n]).is_err(), "prefix {n}");
        }
        let mut v = good.clone();
        v.push(0);
        assert!(decode_datagram(&v).is_err());
        // Name length beyond MAX_NAME, and a non-canonical name.
        let name_at = ANNOUNCE_FIXED_LEN - 2;
        let mut v = good.clone();
        v[name_at] = (MAX_NAME + 1) as u8;
        assert_eq!(decode_datagram(&v), Err(AnnounceError::BadName));
        let mut v = good.clone();
        v[name_at + 1] = b'\n';
        assert_eq!(decode_datagram(&v), Err(AnnounceError::BadName));
        let mut v = good.clone();
        v[name_at + 1] = 0xff;
        assert_eq!(decode_datagram(&v), Err(AnnounceError::BadName));
        // Port count 0 and too many; unknown transport.
        let count_at = name_at + 1 + 3;
        let mut v = good.clone();
        v[count_at] = 0;
        assert!(matches!(
            decode_datagram(&v),
            Err(AnnounceError::BadPorts(_))
        ));
        let mut v = good.clone();
        v[count_at] = (MAX_ANNOUNCED_PORTS + 1) as u8;
        assert!(matches!(
            decode_datagram(&v),
            Err(AnnounceError::BadPorts(_))
        ));
        let mut v = good.clone();
        v[count_at + 1] = 3;
        assert!(matches!(
            decode_datagram(&v),
            Err(AnnounceError::BadPorts(_))
        ));
        // Queries: wrong length, nonzero padding.
        let q = Query { nonce: 1 }.encode();
        assert!(decode_datagram(&q[..QUERY_LEN - 1]).is_err());
        let mut v = q.clone();
        v[QUERY_LEN - 1] = 1;
        assert_eq!(
            decode_datagram(&v),
            Err(AnnounceError::Malformed("query padding"))
        );
    }

    #[test]
    fn sanitize_name_rules() {
        assert_eq!(sanitize_name("  alice \t\n laptop  "), "alice laptop");
        assert_eq!(sanitize_name("a\x1b[31mb"), "a[31mb");
        assert_eq!(sanitize_name("evil\u{202e}txt.exe"), "eviltxt.exe");
        assert_eq!(sanitize_name("zero\u{200b}width"), "zerowidth");
        assert_eq!(sanitize_name("\u{7}\u{0}"), "");
        let long = "é".repeat(MAX_NAME);
        let s = sanitize_name(&long);
        assert!(s.len() <= MAX_NAME && s.len() > MAX_NAME - 2);
        assert_eq!(sanitize_name("Ünïcødé ok"), "Ünïcødé ok");
    }

    #[test]
    fn table_merges_mechanisms_and_addresses() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        let a = ann(1, "alice", 10, 1);
        assert_eq!(
            t.observe(t0, &Sighting::from_announcement(&a, v4(1))),
            Observed::NewPeer
        );
        // Same seq over IPv6: a duplicate path, address merged.
        let ll = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 0, 3));
        assert_eq!(
            t.observe(t0, &Sighting::from_announcement(&a, ll)),
            Observed::Updated
        );
        assert_eq!(
            t.observe(t0, &Sighting::from_announcement(&a, ll)),
            Observed::Duplicate
        );
        // The same instance over mDNS.
        let props = mdns_txt(&a);
        let get = |k: &str| {
            props
                .iter()
                .find(|(kk, _)| *kk == k)
                .map(|(_, v)| v.clone())
        };
        let m = sighting_from_mdns(&get, "alice [x]._qssh._udp.local.", 22222, &[v4(1)]).unwrap();
        assert_eq!(m.instance, 10);
        // Refreshes the claim and adds mDNS to its mechanisms.
        assert_eq!(t.observe(t0, &m), Observed::Updated);
        let peers = t.peers(t0);
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(p.via.as_str(), "both");
        assert!(!p.conflict);
        assert_eq!(
            p.addrs,
            vec![
                "10.0.0.1:22222".parse().unwrap(),
                "[fe80::1%3]:22222".parse().unwrap()
            ]
        );
        assert_eq!(
            p.line(),
            format!("{} alice 10.0.0.1:22222,[fe80::1%3]:22222 via both", pid(1))
        );
        assert!(t.conflicts(t0).is_empty());
    }

    #[test]
    fn replays_are_ignored_and_do_not_refresh() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::with_ttl(Duration::from_secs(10));
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "alice", 10, 5), v4(1)),
        );
        // Renamed at seq 6.
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "alice2", 10, 6), v4(1)),
        );
        // A replay of seq 5 (old name) must not roll the name back ...
        let t1 = t0 + Duration::from_secs(9);
        assert_eq!(
            t.observe(
                t1,
                &Sighting::from_announcement(&ann(1, "alice", 10, 5), v4(1))
            ),
            Observed::Replayed
        );
        assert_eq!(t.peers(t1)[0].name, "alice2");
        // ... nor keep the peer alive: same content at an old seq is only a duplicate.
        assert_eq!(
            t.observe(
                t1,
                &Sighting::from_announcement(&ann(1, "alice2", 10, 6), v4(1))
            ),
            Observed::Duplicate
        );
        assert!(t.peers(t0 + Duration::from_secs(11)).is_empty());
        assert_eq!(t.stats().replayed, 1);
    }

    #[test]
    fn restart_replaces_claim_but_other_host_conflicts() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "alice", 10, 1), v4(1)),
        );
        // Restart on the same host: new instance, same address: replaced, no conflict.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            t.observe(
                t1,
                &Sighting::from_announcement(&ann(1, "alice", 11, 1), v4(1))
            ),
            Observed::NewClaim
        );
        assert!(t.conflicts(t1).is_empty());
        assert!(!t.peers(t1)[0].conflict);
        // An impostor on another host with the same ID and name.
        let mut imp = ann(1, "alice", 99, 1);
        imp.ports = vec![ListenPort::tcp(4444)];
        t.observe(t1, &Sighting::from_announcement(&imp, v4(66)));
        let peers = t.peers(t1);
        assert_eq!(peers.len(), 1);
        assert!(peers[0].conflict);
        // The earlier claim stays primary; the impostor's endpoint is listed after it.
        assert_eq!(
            peers[0].ports,
            vec![ListenPort::tcp(22222), ListenPort::udp(22222)]
        );
        assert_eq!(
            peers[0].addrs,
            vec![
                "10.0.0.1:22222".parse().unwrap(),
                "10.0.0.66:4444".parse().unwrap()
            ]
        );
        let c = t.conflicts(t1);
        assert_eq!(c.len(), 1);
        match &c[0] {
            Conflict::PeerId { peer_id, claims } => {
                assert_eq!(*peer_id, pid(1));
                assert_eq!(claims.len(), 2);
                assert_eq!(claims[1].addrs, vec!["10.0.0.66:4444".parse().unwrap()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn name_clash_is_a_conflict_and_ambiguous() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "Alice", 1, 1), v4(1)),
        );
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(2, "alice", 2, 1), v4(2)),
        );
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(3, "bob", 3, 1), v4(3)),
        );
        let c = t.conflicts(t0);
        assert_eq!(
            c,
            vec![Conflict::Name {
                name: "Alice".into(),
                peers: vec![pid(1), pid(2)]
            }]
        );
        match t.resolve("ALICE", t0) {
            Err(ResolveError::Ambiguous { candidates, .. }) => {
                assert_eq!(candidates.len(), 2)
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = t.resolve("alice", t0).unwrap_err().to_string();
        assert!(msg.contains(&pid(1).to_string()) && msg.contains(&pid(2).to_string()));
        assert_eq!(t.resolve("bob", t0).unwrap().peer_id, pid(3));
    }

    #[test]
    fn resolve_by_id_prefix_and_name() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        // pid(0) text starts "aaaa...", pid(1) starts "aeaq...": distinct 8-char prefixes.
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(0, "zed", 1, 1), v4(1)),
        );
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "amy", 2, 1), v4(2)),
        );
        let full = pid(1).to_string();
        assert_eq!(t.resolve(&full, t0).unwrap().peer_id, pid(1));
        assert_eq!(t.resolve(&full[..8], t0).unwrap().peer_id, pid(1));
        assert_eq!(
            t.resolve(&full[..8].to_uppercase(), t0).unwrap().peer_id,
            pid(1)
        );
        assert!(matches!(
            t.resolve(&full[..7], t0),
            Err(ResolveError::PrefixTooShort { .. })
        ));
        assert!(matches!(
            t.resolve(&pid(9).to_string(), t0),
            Err(ResolveError::NotFound(_))
        ));
        assert!(matches!(
            t.resolve("nobody-here", t0),
            Err(ResolveError::NotFound(_))
        ));
        assert_eq!(t.resolve(" zed ", t0).unwrap().peer_id, pid(0));
        // A name that is also another peer's ID prefix: ambiguous, both listed.
        let prefix = pid(0).to_string()[..8].to_string();
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(2, &prefix, 3, 1), v4(3)),
        );
        match t.resolve(&prefix, t0) {
            Err(ResolveError::Ambiguous { candidates, .. }) => {
                let ids: BTreeSet<PeerId> = candidates.iter().map(|c| c.0).collect();
                assert_eq!(ids, [pid(0), pid(2)].into_iter().collect());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn display_order_is_stable() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        for (i, n) in [(5u8, "carol"), (4, "Bob"), (3, "alice"), (2, "bob")] {
            t.observe(
                t0,
                &Sighting::from_announcement(&ann(i, n, i as u64, 1), v4(i)),
            );
        }
        let names: Vec<String> = t.peers(t0).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["alice", "bob", "Bob", "carol"]);
    }

    #[test]
    fn table_bounds_hold() {
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        for i in 0..(MAX_DISCOVERED_PEERS + 10) {
            let mut a = ann(0, "p", i as u64, 1);
            a.peer_id = PeerId(sha256(&[&(i as u64).to_be_bytes()]));
            t.observe(t0, &Sighting::from_announcement(&a, v4(1)));
        }
        assert_eq!(t.len(), MAX_DISCOVERED_PEERS);
        assert_eq!(t.stats().table_full, 10);
        // Claims per peer and addresses per claim.
        let mut t = DiscoveryTable::new();
        for i in 0..20u8 {
            t.observe(
                t0,
                &Sighting::from_announcement(&ann(1, "a", i as u64, 1), v4(i)),
            );
        }
        match &t.conflicts(t0)[0] {
            Conflict::PeerId { claims, .. } => assert_eq!(claims.len(), MAX_CLAIMS_PER_PEER),
            other => panic!("unexpected {other:?}"),
        }
        let mut t = DiscoveryTable::new();
        let a = ann(1, "a", 1, 1);
        for i in 0..50u8 {
            t.observe(t0, &Sighting::from_announcement(&a, v4(i)));
        }
        assert_eq!(t.peers(t0)[0].addrs.len(), MAX_ADDRS_PER_CLAIM);
    }

    #[test]
    fn mdns_txt_parsing_rejects_bad_records() {
        let a = ann(4, "dora", 0xabc, 1);
        let props = mdns_txt(&a);
        let with = |over: &'static str, val: Option<&'static str>| {
            let props = props.clone();
            move |k: &str| -> Option<String> {
                if k == over {
                    return val.map(str::to_string);
                }
                props
                    .iter()
                    .find(|(kk, _)| *kk == k)
                    .map(|(_, v)| v.clone())
            }
        };
        let ok = sighting_from_mdns(&with("none", None), "f", 22222, &[v4(4)]).unwrap();
        assert_eq!(ok.peer_id, pid(4));
        assert_eq!(ok.instance, 0xabc);
        assert_eq!(ok.content, a.content());
        for (k, v) in [
            (txt::ID, None),
            (txt::ID, Some("short")),
            (txt::NAME, Some("\u{7}")),
            (txt::VERSION, Some("300")),
            (txt::PORT, Some("1")),
            (txt::PORTS, Some("sctp/22222")),
            (txt::PORTS, Some("tcp/1")),
            (txt::PORTS, Some("tcp/22222,tcp/2,tcp/3,tcp/4,tcp/5")),
            (txt::INSTANCE, Some("xyz")),
        ] {
            assert!(
                sighting_from_mdns(&with(k, v), "f", 22222, &[v4(4)]).is_err(),
                "{k}={v:?}"
            );
        }
        // Without inst: the instance derives from the full name, stably.
        let a1 = sighting_from_mdns(&with(txt::INSTANCE, None), "f1", 22222, &[]).unwrap();
        let a2 = sighting_from_mdns(&with(txt::INSTANCE, None), "f1", 22222, &[]).unwrap();
        assert_eq!(a1.instance, a2.instance);
        assert!(mdns_instance_name(&ann(1, &"n".repeat(MAX_NAME), 1, 1)).len() <= 63);
        assert!(mdns_host_name(&a).ends_with(".local."));
    }

    #[test]
    fn json_output_escapes() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        let t0 = Instant::now();
        let mut t = DiscoveryTable::new();
        t.observe(
            t0,
            &Sighting::from_announcement(&ann(1, "say \"hi\"", 1, 1), v4(1)),
        );
        let j = t.peers(t0)[0].to_json();
        assert!(j.contains("\"name\":\"say \\\"hi\\\"\""), "{j}");
        assert!(j.contains("\"via\":\"broadcast\""), "{j}");
    }

    #[test]
    fn rate_limiter_bounds_per_source_and_memory() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(10, 20, t0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(t0, a)).count(), 20);
        // Another source is unaffected.
        assert!(l.allow(t0, b));
        // Refill at the rate: 1 s later, 10 more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| l.allow(t1, a)).count(), 10);
        // Spoofed-source flood: memory stays bounded.
        for i in 0..(MAX_RATE_LIMITED_SOURCES as u32 * 3) {
            l.allow(t1, IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)));
        }
        assert!(l.tracked_sources() <= MAX_RATE_LIMITED_SOURCES);
        // Known sources keep their own buckets during the flood.
        let t2 = t1 + Duration::from_secs(1);
        assert!(l.allow(t2, a));
    }

    fn arb_announcement() -> impl Strategy<Value = Announcement> {
        (
            any::<[u8; 32]>(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            "\\PC{1,70}",
            proptest::collection::btree_set((1u8..=2, 1u16..), 1..=MAX_ANNOUNCED_PORTS),
        )
            .prop_filter_map("name sanitizes to empty", |(id, v, i, s, r, n, ports)| {
                let name = sanitize_name(&n);
                (!name.is_empty()).then(|| Announcement {
                    peer_id: PeerId(id),
                    protocol_version: v,
                    instance: i,
                    seq: s,
                    reply_to: r,
                    name,
                    ports: ports
                        .into_iter()
                        .map(|(t, port)| ListenPort {
                            transport: Transport::from_id(t).unwrap(),
                            port,
                        })
                        .collect(),
                })
            })
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = decode_datagram(&bytes);
        }

        #[test]
        fn decoder_never_panics_near_valid(a in arb_announcement(), i in any::<usize>(), b in any::<u8>(), cut in any::<usize>()) {
            let mut enc = a.encode().unwrap();
            let i = i % enc.len();
            enc[i] = b;
            let cut = cut % (enc.len() + 1);
            let _ = decode_datagram(&enc[..cut]);
            if let Ok(Datagram::Announce(d)) = decode_datagram(&enc) {
                // Whatever decodes re-encodes to the same bytes (one encoding per message).
                prop_assert_eq!(d.encode().unwrap(), enc);
            }
        }

        #[test]
        fn announcement_round_trip(a in arb_announcement()) {
            let enc = a.encode().unwrap();
            prop_assert!(enc.len() <= MAX_ANNOUNCE_LEN);
            prop_assert_eq!(decode_datagram(&enc).unwrap(), Datagram::Announce(a));
        }

        #[test]
        fn query_round_trip(n in any::<u64>()) {
            prop_assert_eq!(decode_datagram(&Query { nonce: n }.encode()).unwrap(), Datagram::Query(Query { nonce: n }));
        }

        #[test]
        fn sanitize_is_idempotent_and_bounded(s in "\\PC*|[\\x00-\\x7f\\u{200b}-\\u{202e}]*") {
            let once = sanitize_name(&s);
            prop_assert!(once.len() <= MAX_NAME);
            prop_assert_eq!(sanitize_name(&once), once.clone());
            prop_assert!(!once.chars().any(|c| c.is_control()));
        }

        #[test]
        fn mdns_txt_round_trip(a in arb_announcement()) {
            let props = mdns_txt(&a);
            prop_assert!(props.iter().all(|(k, v)| k.len() + 1 + v.len() <= 255));
            let get = |k: &str| props.iter().find(|(kk, _)| *kk == k).map(|(_, v)| v.clone());
            let s = sighting_from_mdns(&get, "x", a.ports[0].port, &[]).unwrap();
            prop_assert_eq!(s.peer_id, a.peer_id);
            prop_assert_eq!(s.instance, a.instance);
            prop_assert_eq!(s.content, a.content());
        }
    }
}
