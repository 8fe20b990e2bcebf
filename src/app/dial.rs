//! The connecting side of every command (connect, shell, exec, forwarding, vpn, ping):
//! resolve the target, open the link (TCP; or QUIC over UDP, by address or through a relay
//! with hole punching: [`dial_with`]), run the handshake and decide trust as ssh does.
//!
//! Trust: a pinned `PEERID@host:port` must match exactly; otherwise `known_peers` decides; an
//! unknown peer is asked about on a terminal, accepted with `--accept-new`, refused otherwise;
//! a peer whose ID differs from `known_peers` is always refused, naming file and line. Our
//! own identity is only revealed (FINISH) after that decision.

use super::store::{Home, KnownStatus};
use super::target::Target;
use crate::core::crypto::{OsRandom, Secret32};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::{Identity, PublicIdentity};
use crate::core::session::{CloseReason, Event, Session, SessionConfig};
use crate::net::path::{host_candidates, Agent, AgentConfig, PathEvent};
use crate::net::tcp::{spawn_session, SessionHandle, Spawned};
use crate::net::udp::UdpMux;
use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;

/// TCP connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure to reach or authenticate the peer: the CLI exits 255 for these.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("{0}")]
    Target(#[from] super::target::TargetError),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("connect to {addr}: {reason}")]
    Tcp { addr: String, reason: String },
    #[error("{0}")]
    Session(CloseReason),
    #[error("{0}")]
    Trust(String),
    #[error("{0}")]
    Discovery(#[from] crate::core::announce::ResolveError),
    #[error("QUIC to {addr}: {reason}")]
    Udp { addr: String, reason: String },
    #[error("{0}")]
    Relay(String),
}

/// How to reach the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transport {
    /// TCP to the target's address (the default).
    #[default]
    Tcp,
    /// QUIC over UDP to the target's address.
    Udp,
    /// Through a rendezvous/relay peer (`HOST:PORT`): the session starts at once, relayed if
    /// need be, and moves to a direct UDP path as soon as punching succeeds. `stun` servers
    /// add server-reflexive candidates.
    Relay { relay: String, stun: Vec<String> },
}

/// The UDP side of a connection (kept alive as long as the session).
pub struct UdpLink {
    pub mux: UdpMux,
    pub endpoint: quinn::Endpoint,
    /// With a relay: the path agent and the peer's virtual address.
    pub agent: Option<(Agent, SocketAddr)>,
    pub relay: Option<SocketAddr>,
}

impl UdpLink {
    /// `direct IP:PORT`, `relayed via HOST:PORT` or `direct (UDP) IP:PORT` for --udp.
    pub fn describe_path(&self) -> String {
        match (&self.agent, self.relay) {
            (Some((agent, virt)), Some(relay)) => match agent.direct_path(*virt) {
                Some(d) => format!("direct {d}"),
                None => format!("relayed via {relay}"),
            },
            _ => "direct (UDP, by address)".to_string(),
        }
    }
}

/// How long `connect NAME` listens for announcements before choosing.
pub const CONNECT_DISCOVERY_TIMEOUT: Duration = Duration::from_millis(1200);

/// Turns what the user typed into a target: a bare word is looked up by LAN discovery first
/// (exact peer ID, unique prefix of at least 8 characters, or unique name — the announced ID
/// is then pinned); anything else, or a word nobody announces, is a host.
pub async fn resolve_target(
    s: &str,
    default_port: u16,
    own: crate::core::identity::PeerId,
) -> Result<Target, ConnectError> {
    use crate::core::announce::ResolveError;
    use crate::net::discovery::{discover_until, DiscoverOptions};
    if Target::may_be_discovered(s) {
        let opts = DiscoverOptions {
            timeout: CONNECT_DISCOVERY_TIMEOUT,
            exclude: vec![own],
            ..DiscoverOptions::default()
        };
        let exact = s.trim().parse::<crate::core::identity::PeerId>().ok();
        // Only an exact ID may stop early: a clashing name can still arrive later.
        let found = discover_until(&opts, |peers| {
            exact.is_some_and(|id| peers.iter().any(|p| p.peer_id == id))
        })
        .await;
        match found {
            Ok(d) => match d.resolve(s) {
                Ok(p) => {
                    return Ok(Target {
                        peer: Some(p.peer_id),
                        host: p.name.clone(),
                        port: p.addrs.first().map_or(default_port, |a| a.port()),
                        addrs: p.addrs.clone(),
                    })
                }
                Err(ResolveError::NotFound(_)) | Err(ResolveError::PrefixTooShort { .. }) => {}
                Err(e) => return Err(e.into()),
            },
            Err(e) => tracing::debug!("discovery unavailable: {e}"),
        }
        if exact.is_some() {
            return Err(ConnectError::Trust(format!(
                "no peer with ID {} announced itself on this network: give its address as {}@HOST[:PORT]",
                s.trim(),
                s.trim()
            )));
        }
    }
    Ok(Target::parse(s, default_port)?)
}

pub struct DialOptions {
    pub target: Target,
    pub accept_new: bool,
    /// May ask the trust-on-first-use question on the terminal (not while a line editor runs).
    pub ask: bool,
    pub name: String,
    pub psk: Option<Secret32>,
}

/// An established session from the connecting side.
pub struct Connected {
    pub handle: SessionHandle,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    pub peer: PublicIdentity,
    pub peer_name: String,
    pub addr: std::net::SocketAddr,
    pub handshake_time: Duration,
    pub task: tokio::task::JoinHandle<()>,
    /// Set when the session runs over QUIC/UDP (keeps socket, endpoint and path agent alive).
    pub udp: Option<UdpLink>,
}

impl Connected {
    /// The session's remaining events (everything after Established). Taken once.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<Event> {
        self.events
            .take()
            .unwrap_or_else(|| mpsc::unbounded_channel().1)
    }
}

/// Resolves `host:port` (first address).
pub async fn resolve(host_port: &str) -> Result<SocketAddr, ConnectError> {
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(|c| c == '[' || c == ']'), p),
        None => (host_port, ""),
    };
    let port: u16 = port.parse().map_err(|_| ConnectError::Resolve {
        host: host_port.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "expected HOST:PORT"),
    })?;
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            host: host_port.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| ConnectError::Resolve {
            host: host_port.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })
}

/// Prints every path change of the session (`path: direct IP:PORT`, `path: relayed via ...`).
pub fn print_path_events(mut events: mpsc::UnboundedReceiver<PathEvent>) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if matches!(e, PathEvent::Direct { .. } | PathEvent::Relayed { .. }) {
                eprintln!("{e}");
            }
        }
    });
}

/// Server-reflexive candidates from STUN servers, learned on `mux` (failures are logged).
pub async fn stun_candidates(
    mux: &UdpMux,
    servers: &[String],
) -> Vec<crate::core::rendezvous::Candidate> {
    let mut out = Vec::new();
    for s in servers {
        let Ok(addr) = resolve(s).await else {
            tracing::warn!("cannot resolve STUN server {s}");
            continue;
        };
        match crate::net::stun::binding(mux, addr, crate::net::stun::Change::None).await {
            Ok(b) => out.push(crate::core::rendezvous::Candidate {
                kind: crate::core::rendezvous::CandidateKind::ServerReflexive,
                addr: b.mapped,
            }),
            Err(e) => tracing::warn!("STUN server {s}: {e}"),
        }
    }
    out
}

/// Like [`dial`], over the chosen transport.
pub async fn dial_with(
    home: &Home,
    identity: Arc<Identity>,
    mut opts: DialOptions,
    transport: Transport,
) -> Result<Connected, ConnectError> {
    match transport {
        Transport::Tcp => dial(home, identity, opts).await,
        Transport::Udp => {
            let t = &opts.target;
            let addr = resolve(&t.host_port()).await?;
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let udp_err = |reason: String| ConnectError::Udp {
                addr: t.host_port(),
                reason,
            };
            let (mux, _control) = UdpMux::bind(bind, false)
                .await
                .map_err(|e| udp_err(e.to_string()))?;
            let endpoint =
                crate::net::quic::endpoint(&mux, false).map_err(|e| udp_err(e.to_string()))?;
            let started = Instant::now();
            let link = crate::net::quic::connect(&endpoint, addr, CONNECT_TIMEOUT)
                .await
                .map_err(|e| udp_err(e.to_string()))?;
            let session = new_initiator(&identity, &opts, started);
            let spawned = crate::net::quic::spawn_session(link, session);
            let host_port = t.host_port();
            let udp = UdpLink {
                mux,
                endpoint,
                agent: None,
                relay: None,
            };
            establish(home, spawned, &opts, &host_port, addr, started, Some(udp)).await
        }
        Transport::Relay { relay, stun } => {
            let t = &opts.target;
            let Some(peer) = t
                .peer
                .or_else(|| t.host.parse::<crate::core::identity::PeerId>().ok())
            else {
                return Err(ConnectError::Relay(
                    "through a relay, the target is a peer ID: qssh connect PEERID --relay HOST:PORT"
                        .into(),
                ));
            };
            // By peer ID: the peer must prove exactly this identity (no trust question).
            opts.target.peer = Some(peer);
            let relay_addr = resolve(&relay).await?;
            let bind: SocketAddr = if relay_addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let relay_err =
                |reason: String| ConnectError::Relay(format!("relay {relay}: {reason}"));
            let started = Instant::now();
            let (mux, control) = UdpMux::bind(bind, false)
                .await
                .map_err(|e| relay_err(e.to_string()))?;
            let mut candidates = host_candidates(&[relay_addr], mux.local_addr().port());
            candidates.extend(stun_candidates(&mux, &stun).await);
            let (agent, path_events) = Agent::spawn(
                mux.clone(),
                control,
                AgentConfig {
                    register_as: None,
                    relay: Some(relay_addr),
                    candidates,
                },
            );
            print_path_events(path_events);
            let virt = agent
                .connect(relay_addr, peer)
                .await
                .map_err(|e| ConnectError::Relay(e.to_string()))?;
            let endpoint =
                crate::net::quic::endpoint(&mux, false).map_err(|e| relay_err(e.to_string()))?;
            let link = crate::net::quic::connect(&endpoint, virt, CONNECT_TIMEOUT)
                .await
                .map_err(|e| ConnectError::Udp {
                    addr: format!("{peer} via {relay}"),
                    reason: e.to_string(),
                })?;
            let session = new_initiator(&identity, &opts, started);
            let spawned = crate::net::quic::spawn_session(link, session);
            let udp = UdpLink {
                mux,
                endpoint,
                agent: Some((agent, virt)),
                relay: Some(relay_addr),
            };
            let key = format!("{peer}");
            establish(home, spawned, &opts, &key, relay_addr, started, Some(udp)).await
        }
    }
}

fn new_initiator(identity: &Arc<Identity>, opts: &DialOptions, started: Instant) -> Session {
    let mut hs = HandshakeConfig::new(identity.clone(), &opts.name);
    hs.psk = opts.psk.clone();
    Session::initiator(
        SessionConfig {
            handshake: hs,
            expected_peer: opts.target.peer,
        },
        started,
        Box::new(OsRandom),
    )
}

/// Connects, authenticates and returns once the session is established.
pub async fn dial(
    home: &Home,
    identity: Arc<Identity>,
    opts: DialOptions,
) -> Result<Connected, ConnectError> {
    let t = &opts.target;
    let addrs: Vec<_> = if t.addrs.is_empty() {
        tokio::net::lookup_host((t.host.as_str(), t.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                host: t.host.clone(),
                source,
            })?
            .collect()
    } else {
        t.addrs.clone()
    };
    // Several addresses (discovery may list unreachable ones): Happy Eyeballs, so that one
    // silent address does not stall the others.
    let stream = crate::net::eyeballs::connect(&addrs, CONNECT_TIMEOUT)
        .await
        .map_err(|e| ConnectError::Tcp {
            addr: t.host_port(),
            reason: e.to_string(),
        })?;
    let addr = stream.peer_addr().map_err(|e| ConnectError::Tcp {
        addr: t.host_port(),
        reason: e.to_string(),
    })?;
    let started = Instant::now();
    let session = new_initiator(&identity, &opts, started);
    let spawned = spawn_session(stream, session);
    let host_port = t.host_port();
    establish(home, spawned, &opts, &host_port, addr, started, None).await
}

/// Runs the handshake of a spawned initiator session to the end: trust decision, then
/// `Established` (or the reason it failed).
async fn establish(
    home: &Home,
    spawned: Spawned,
    opts: &DialOptions,
    host_port: &str,
    addr: SocketAddr,
    started: Instant,
    udp: Option<UdpLink>,
) -> Result<Connected, ConnectError> {
    let (handle, mut events, task) = spawned;
    // Time spent waiting for the user's answer is not handshake time.
    let mut asked = Duration::ZERO;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::VerifyPeer { peer, name } => {
                let t0 = Instant::now();
                let decision =
                    decide_trust(home, host_port, &peer, &name, opts.accept_new, opts.ask).await;
                asked = t0.elapsed();
                match decision {
                    Ok(()) => handle.accept_peer(true),
                    Err(e) => {
                        handle.accept_peer(false);
                        return Err(e);
                    }
                }
            }
            Event::Established { peer, name, .. } => {
                return Ok(Connected {
                    handle,
                    events: Some(events),
                    peer,
                    peer_name: name,
                    addr,
                    handshake_time: started.elapsed().saturating_sub(asked),
                    task,
                    udp,
                });
            }
            Event::Closed { reason } => return Err(ConnectError::Session(reason)),
            _ => {}
        }
    }
    Err(ConnectError::Session(CloseReason::TransportClosed))
}

async fn decide_trust(
    home: &Home,
    host_port: &str,
    peer: &PublicIdentity,
    name: &str,
    accept_new: bool,
    ask: bool,
) -> Result<(), ConnectError> {
    let id = peer.peer_id();
    let status = home
        .check_known(host_port, &id)
        .and_then(|s| s.into_result(host_port, &id))
        .map_err(|e| ConnectError::Trust(e.to_string()))?;
    match status {
        KnownStatus::Known => return Ok(()),
        KnownStatus::Mismatch { .. } => unreachable!("into_result turns a mismatch into an error"),
        KnownStatus::Unknown => {}
    }
    let remember = |home: &Home| {
        home.add_known(host_port, &id)
            .map(|_| ())
            .map_err(|e| ConnectError::Trust(e.to_string()))
    };
    if accept_new {
        remember(home)?;
        eprintln!(
            "Warning: permanently added peer {id} ({}) for {host_port} to {}.",
            peer.algorithm().display_name(),
            home.known_peers_path().display()
        );
        return Ok(());
    }
    if !ask || !std::io::stdin().is_terminal() {
        return Err(ConnectError::Trust(format!(
            "peer at {host_port} is unknown (ID {id}, fingerprint {}); refusing without a terminal to ask: pass --accept-new, or pin it as {id}@{host_port}",
            id.fingerprint()
        )));
    }
    let question = format!(
        "The authenticity of peer '{host_port}' can't be established.\n\
         It calls itself {name:?}.\n\
         {} key, peer ID:\n  {id}\n  fingerprint {}\n\
         Are you sure you want to continue connecting (yes/no)? ",
        peer.algorithm().display_name(),
        id.fingerprint()
    );
    let answer = tokio::task::spawn_blocking(move || ask_terminal(&question))
        .await
        .unwrap_or(None);
    match answer.as_deref().map(str::trim) {
        Some("yes") | Some("y") => {
            remember(home)?;
            eprintln!(
                "Warning: permanently added peer {id} for {host_port} to {}.",
                home.known_peers_path().display()
            );
            Ok(())
        }
        _ => Err(ConnectError::Trust(format!(
            "peer {id} at {host_port} was not accepted"
        ))),
    }
}

/// Asks on the controlling terminal (like ssh), falling back to stdin/stderr.
fn ask_terminal(question: &str) -> Option<String> {
    let mut line = String::new();
    if let Ok(tty) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    {
        let mut w = &tty;
        w.write_all(question.as_bytes()).ok()?;
        std::io::BufReader::new(&tty).read_line(&mut line).ok()?;
    } else {
        eprint!("{question}");
        std::io::stdin().lock().read_line(&mut line).ok()?;
    }
    Some(line)
}
