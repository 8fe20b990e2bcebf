//! `qssh listen`: accept peers, admit them (limits before any cryptography), run each session
//! as its own task, and serve the channels each peer may open under the listener's policy.
//!
//! Chat is open to every authenticated peer: typed lines go to every connected peer, and what
//! any peer sends is printed as `NAME (SHORTID): TEXT`. Other channel kinds are served only
//! to peers the [`Policy`] authorizes; every refusal is logged with the peer ID.

use super::chat::{
    format_message, load_identity, parse_line, sanitize, send_line, start_input, Command, Console,
    Input, LineBuffer, HELP,
};
use super::router::{route, Channel, ChannelEvent, ChannelSender, Incoming, RouterHandle};
use super::store::Home;
use crate::core::admission::Admission;
use crate::core::crypto::{OsRandom, Secret32};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::PeerId;
use crate::core::limits::HANDSHAKE_TIMEOUT;
use crate::core::session::{Session, SessionConfig};
use crate::net::path::{host_candidates, Agent, AgentConfig, PathEvent};
use crate::net::tcp::{spawn_session, Spawned};
use crate::net::udp::UdpMux;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// How long a shutting-down listener waits for its sessions to say goodbye.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub struct ListenOptions {
    pub bind: Option<IpAddr>,
    pub port: u16,
    pub name: String,
    pub psk: Option<Secret32>,
    pub policy: Policy,
    /// Register at this rendezvous/relay peer (`HOST:PORT`) so connectors can reach us by
    /// peer ID from behind NATs.
    pub relay: Option<String>,
    /// STUN servers for our server-reflexive candidates.
    pub stun: Vec<String>,
}

/// Which authenticated peers may open which channel kinds.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Listener switches: off for everyone.
    pub no_shell: bool,
    pub no_forward: bool,
}

impl Policy {
    /// `Ok` if `peer` may open a channel of `kind`; otherwise the reason the peer is told.
    pub fn authorize(&self, _peer: &PeerId, kind: ChannelKind) -> Result<(), String> {
        match kind {
            ChannelKind::Chat => Ok(()),
            _ => Err(format!("{kind:?} is not offered by this listener")),
        }
    }
}

/// A connected peer.
struct Member {
    name: String,
    peer: PeerId,
    addr: SocketAddr,
    router: RouterHandle,
    chat: Option<ChannelSender>,
}

type Room = Arc<Mutex<BTreeMap<u64, Member>>>;

/// Shared by every session task of one listener.
struct Shared {
    room: Room,
    admission: Mutex<Admission>,
    policy: Policy,
    console: Console,
}

/// Binds the listening socket: `[::]` (IPv4 and IPv6) by default, IPv4 if IPv6 is off.
pub async fn bind(bind: Option<IpAddr>, port: u16) -> Result<TcpListener> {
    match bind {
        Some(ip) => TcpListener::bind((ip, port))
            .await
            .with_context(|| format!("cannot listen on {}", SocketAddr::new(ip, port))),
        None => match TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await {
            Ok(l) => Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e).with_context(|| {
                format!("cannot listen on port {port} (another listener? try --port)")
            }),
            Err(_) => TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port))
                .await
                .with_context(|| format!("cannot listen on port {port}")),
        },
    }
}

/// Runs the listener until SIGINT/SIGTERM (or `/quit` on its terminal).
pub async fn listen(home: &Home, opts: ListenOptions) -> Result<i32> {
    let identity = load_identity(home)?;
    let listener = bind(opts.bind, opts.port).await?;
    let local = listener.local_addr()?;
    eprintln!(
        "listening on {} as {} ({})",
        match opts.bind {
            None => format!("port {} (all IPv4 and IPv6 addresses)", local.port()),
            Some(_) => local.to_string(),
        },
        identity.peer_id(),
        sanitize(&opts.name)
    );
    // QUIC over UDP on the same port number (connect --udp, and relayed/punched peers).
    let udp = bind_udp(opts.bind, local.port()).await;
    let mut _keep_udp: Option<(UdpMux, Option<Agent>)> = None;
    let endpoint = match udp {
        Ok((mux, control)) => {
            let ep = crate::net::quic::endpoint(&mux, true).context("cannot start QUIC")?;
            eprintln!("UDP (QUIC) on port {}", mux.local_addr().port());
            let agent = match &opts.relay {
                Some(relay) => {
                    let relay_addr = crate::app::dial::resolve(relay).await?;
                    let mut candidates = host_candidates(&[relay_addr], mux.local_addr().port());
                    candidates.extend(crate::app::dial::stun_candidates(&mux, &opts.stun).await);
                    let (agent, events) = Agent::spawn(
                        mux.clone(),
                        control,
                        AgentConfig {
                            register_as: Some(identity.clone()),
                            relay: Some(relay_addr),
                            candidates,
                        },
                    );
                    print_listener_path_events(events);
                    Some(agent)
                }
                None => None,
            };
            _keep_udp = Some((mux, agent));
            Some(ep)
        }
        Err(e) if opts.relay.is_none() => {
            warn!("UDP disabled: {e:#}");
            None
        }
        Err(e) => return Err(e),
    };
    let mut hs = HandshakeConfig::new(identity, &opts.name);
    hs.psk = opts.psk;
    let (console, mut input) = start_input();
    let shared = Arc::new(Shared {
        room: Arc::new(Mutex::new(BTreeMap::new())),
        admission: Mutex::new(Admission::default()),
        policy: opts.policy,
        console: console.clone(),
    });
    let mut input_open = true;
    let mut next_id = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install SIGTERM handler")?;
    loop {
        tokio::select! {
            acc = listener.accept() => {
                let (stream, addr) = match acc {
                    Ok((s, a)) => (s, SocketAddr::new(a.ip().to_canonical(), a.port())),
                    Err(e) => { warn!("accept failed: {e}"); continue; }
                };
                if let Err(why) = shared.admission.lock().expect("admission lock").admit(Instant::now(), addr.ip()) {
                    info!(%addr, "refused connection: {why}");
                    continue;
                }
                next_id += 1;
                let session = Session::responder(
                    SessionConfig { handshake: hs.clone(), expected_peer: None },
                    Instant::now(),
                    Box::new(OsRandom),
                );
                tasks.spawn(serve_peer(next_id, spawn_session(stream, session), addr, shared.clone()));
            }
            inc = async { endpoint.as_ref().expect("guarded").accept().await }, if endpoint.is_some() => {
                let Some(incoming) = inc else { continue };
                let a = incoming.remote_address();
                let addr = SocketAddr::new(a.ip().to_canonical(), a.port());
                if let Err(why) = shared.admission.lock().expect("admission lock").admit(Instant::now(), addr.ip()) {
                    info!(%addr, "refused QUIC connection: {why}");
                    incoming.refuse();
                    continue;
                }
                next_id += 1;
                let session = Session::responder(
                    SessionConfig { handshake: hs.clone(), expected_peer: None },
                    Instant::now(),
                    Box::new(OsRandom),
                );
                let (id, shared) = (next_id, shared.clone());
                tasks.spawn(async move {
                    match crate::net::quic::accept(incoming, HANDSHAKE_TIMEOUT).await {
                        Ok(link) => serve_peer(id, crate::net::quic::spawn_session(link, session), addr, shared).await,
                        Err(e) => {
                            let _ = shared.admission.lock().expect("admission lock").handshake_done(false);
                            info!(%addr, "QUIC connection failed: {e}");
                        }
                    }
                });
            }
            line = input.recv(), if input_open => match line {
                Some(Input::Line(l)) => match parse_line(&l) {
                    Command::Send(text) => broadcast(&shared.room, text).await,
                    Command::Peers => {
                        let members: Vec<String> = shared.room.lock().expect("room lock").values()
                            .map(|m| format!("{} ({}) from {}", sanitize(&m.name), m.peer, m.addr)).collect();
                        if members.is_empty() { console.print("no peers connected"); }
                        for m in members { console.print(&m); }
                    }
                    Command::Quit => break,
                    Command::Help => console.print(HELP),
                    Command::Unknown(c) => console.print(&format!("unknown command {c}; {HELP}")),
                    Command::Nothing => {}
                },
                // A listener keeps serving after its input ends.
                Some(Input::Eof) | None => input_open = false,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Tell every peer, then give the sessions a moment to flush the goodbye.
    for m in shared.room.lock().expect("room lock").values() {
        m.router
            .close(CloseCode::Shutdown, "listener shutting down");
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    eprintln!("listener stopped");
    Ok(0)
}

/// Binds the UDP socket for QUIC on `port` (the TCP port): `[::]` by default (IPv4 too),
/// IPv4 if IPv6 is off, or `bind`.
async fn bind_udp(
    bind: Option<IpAddr>,
    port: u16,
) -> Result<(
    UdpMux,
    tokio::sync::mpsc::Receiver<crate::net::udp::Control>,
)> {
    match bind {
        Some(ip) => UdpMux::bind(SocketAddr::new(ip, port), false)
            .await
            .with_context(|| format!("cannot bind UDP {}", SocketAddr::new(ip, port))),
        None => match UdpMux::bind((std::net::Ipv6Addr::UNSPECIFIED, port).into(), false).await {
            Ok(x) => Ok(x),
            Err(_) => UdpMux::bind((std::net::Ipv4Addr::UNSPECIFIED, port).into(), false)
                .await
                .with_context(|| format!("cannot bind UDP port {port}")),
        },
    }
}

/// Shows path changes and relay registration on stderr.
fn print_listener_path_events(mut events: tokio::sync::mpsc::UnboundedReceiver<PathEvent>) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            eprintln!("{e}");
        }
    });
}

async fn broadcast(room: &Room, text: String) {
    let targets: Vec<ChannelSender> = room
        .lock()
        .expect("room lock")
        .values()
        .filter_map(|m| m.chat.clone())
        .collect();
    for chat in targets {
        send_line(&chat, text.clone()).await;
    }
}

async fn serve_peer(id: u64, spawned: Spawned, addr: SocketAddr, shared: Arc<Shared>) {
    let (handle, events, task) = spawned;
    let (router, mut incoming) = route(handle, events);
    let mut who: Option<(PeerId, String)> = None;
    while let Some(inc) = incoming.recv().await {
        match inc {
            Incoming::Established { peer, name } => {
                let r = shared
                    .admission
                    .lock()
                    .expect("admission lock")
                    .handshake_done(true);
                if let Err(why) = r {
                    router.close(CloseCode::Limit, &why.to_string());
                    continue;
                }
                let peer_id = peer.peer_id();
                eprintln!(
                    "{} ({}) connected from {addr}",
                    sanitize(&name),
                    peer_id.short()
                );
                info!(peer = %peer_id, %addr, "session established");
                shared.room.lock().expect("room lock").insert(
                    id,
                    Member {
                        name: name.clone(),
                        peer: peer_id,
                        addr,
                        router: router.clone(),
                        chat: None,
                    },
                );
                who = Some((peer_id, name));
            }
            Incoming::Request { ch, kind, params } => {
                let Some((peer, name)) = who.clone() else {
                    continue;
                };
                if let Err(why) = shared.policy.authorize(&peer, kind) {
                    warn!(peer = %peer, %addr, "refused {kind:?} channel: {why}");
                    router.reject(ch, CloseCode::Refused, &why);
                    continue;
                }
                let channel = router.accept(ch, kind);
                match kind {
                    ChannelKind::Chat => {
                        let (tx, rx) = channel.split();
                        if let Some(m) = shared.room.lock().expect("room lock").get_mut(&id) {
                            m.chat = Some(tx.clone());
                        }
                        tokio::spawn(chat_member(tx, rx, name, peer, shared.console.clone()));
                    }
                    other => serve_channel(other, channel, params),
                }
            }
            Incoming::Closed(reason) => {
                if who.is_none() {
                    let _ = shared
                        .admission
                        .lock()
                        .expect("admission lock")
                        .handshake_done(false);
                    info!(%addr, "handshake failed: {reason}");
                }
                break;
            }
            Incoming::DatagramEpoch { .. } | Incoming::Pong(_) => {}
        }
    }
    if who.is_some() {
        shared
            .admission
            .lock()
            .expect("admission lock")
            .session_done();
        if let Some(m) = shared.room.lock().expect("room lock").remove(&id) {
            eprintln!("{} ({}) left", sanitize(&m.name), m.peer.short());
        }
    }
    let _ = task.await;
}

/// Channel kinds other than chat, once authorized.
fn serve_channel(kind: ChannelKind, channel: Channel, _params: Vec<u8>) {
    channel.close(
        CloseCode::Unsupported,
        &format!("{kind:?} is not offered by this listener"),
    );
}

async fn chat_member(
    tx: ChannelSender,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<ChannelEvent>,
    name: String,
    peer: PeerId,
    console: Console,
) {
    let mut lines = LineBuffer::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            ChannelEvent::Data(data) => {
                tx.consumed(data.len());
                for text in lines.push(&data) {
                    console.print(&format_message(&name, &peer, &text));
                }
            }
            ChannelEvent::Eof => {}
            ChannelEvent::Closed { .. } => break,
        }
    }
}
