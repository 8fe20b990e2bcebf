//! The connecting side of every command (connect, later shell, exec, forwarding, vpn):
//! resolve the target, open TCP, run the handshake and decide trust as ssh does.
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
use crate::net::tcp::{spawn_session, SessionHandle};
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpStream;
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
}

impl Connected {
    /// The session's remaining events (everything after Established). Taken once.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<Event> {
        self.events
            .take()
            .unwrap_or_else(|| mpsc::unbounded_channel().1)
    }
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
    let mut last = String::from("no addresses");
    let mut stream = None;
    for addr in &addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()),
        }
    }
    let stream = stream.ok_or_else(|| ConnectError::Tcp {
        addr: t.host_port(),
        reason: last,
    })?;
    let addr = stream.peer_addr().map_err(|e| ConnectError::Tcp {
        addr: t.host_port(),
        reason: e.to_string(),
    })?;
    let mut hs = HandshakeConfig::new(identity, &opts.name);
    hs.psk = opts.psk.clone();
    let started = Instant::now();
    let session = Session::initiator(
        SessionConfig {
            handshake: hs,
            expected_peer: t.peer,
        },
        started,
        Box::new(OsRandom),
    );
    let (handle, mut events, task) = spawn_session(stream, session);
    let host_port = t.host_port();
    // Time spent waiting for the user's answer is not handshake time.
    let mut asked = Duration::ZERO;
    while let Some(ev) = events.recv().await {
        match ev {
            Event::VerifyPeer { peer, name } => {
                let t0 = Instant::now();
                let decision =
                    decide_trust(home, &host_port, &peer, &name, opts.accept_new, opts.ask).await;
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
