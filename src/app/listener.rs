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
use super::vpn::{ListenerVpn, VpnOptions, VpnServer};
use crate::core::admission::Admission;
use crate::core::crypto::{OsRandom, Secret32};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::PeerId;
use crate::core::session::{Session, SessionConfig};
use crate::net::tcp::spawn_session;
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
    /// `--vpn`: serve VPN channels on this tunnel configuration.
    pub vpn: Option<VpnOptions>,
}

/// Which authenticated peers may open which channel kinds.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Listener switches: off for everyone.
    pub no_shell: bool,
    pub no_forward: bool,
    /// The listener serves VPN channels (`--vpn`).
    pub vpn: bool,
    /// `--allow PEERID`: peers authorized for everything offered, besides authorized_peers.
    pub allow: Vec<PeerId>,
    /// Where authorized_peers is read, at each request (edits apply without a restart).
    pub home: Option<Home>,
}

impl Policy {
    /// `Ok` if `peer` may open a channel of `kind`; otherwise the reason the peer is told.
    pub fn authorize(&self, peer: &PeerId, kind: ChannelKind) -> Result<(), String> {
        match kind {
            ChannelKind::Chat => Ok(()),
            ChannelKind::Vpn => self.authorize_vpn(peer),
            _ => Err(format!("{kind:?} is not offered by this listener")),
        }
    }

    /// VPN: offered (`--vpn`), and the peer is in `--allow` or has the `vpn` option in
    /// authorized_peers. An unreadable authorized_peers authorizes nobody.
    fn authorize_vpn(&self, peer: &PeerId) -> Result<(), String> {
        if !self.vpn {
            return Err("this listener offers no VPN (start it with --vpn)".into());
        }
        if self.allow.contains(peer) {
            return Ok(());
        }
        let entry = match &self.home {
            Some(home) => home.find_authorized(peer).map_err(|e| {
                warn!("cannot read authorized_peers: {e}");
                "the listener cannot read its authorized_peers".to_string()
            })?,
            None => None,
        };
        match entry {
            Some(a) if a.options.allows_vpn() => Ok(()),
            Some(_) => Err("this peer is not authorized for the VPN (no `vpn` option in the listener's authorized_peers)".into()),
            None => Err("this peer is not authorized for the VPN (not in the listener's authorized_peers or --allow)".into()),
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
    vpn: Option<Arc<VpnServer>>,
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
    // The tunnel first: without the right to create it, the one error line is all there is.
    let vpn = match opts.vpn {
        Some(v) => Some(VpnServer::start(v, local)?),
        None => None,
    };
    eprintln!(
        "listening on {} as {} ({})",
        match opts.bind {
            None => format!("port {} (all IPv4 and IPv6 addresses)", local.port()),
            Some(_) => local.to_string(),
        },
        identity.peer_id(),
        sanitize(&opts.name)
    );
    let mut hs = HandshakeConfig::new(identity, &opts.name);
    hs.psk = opts.psk;
    let (console, mut input) = start_input();
    let shared = Arc::new(Shared {
        room: Arc::new(Mutex::new(BTreeMap::new())),
        admission: Mutex::new(Admission::default()),
        policy: opts.policy,
        console: console.clone(),
        vpn,
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
                tasks.spawn(serve_peer(next_id, stream, addr, session, shared.clone()));
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

async fn serve_peer(
    id: u64,
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    session: Session,
    shared: Arc<Shared>,
) {
    let (handle, events, task) = spawn_session(stream, session);
    let (router, mut incoming) = route(handle, events);
    let mut who: Option<(PeerId, String)> = None;
    let mut vpn: Option<ListenerVpn> = None;
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
                if kind == ChannelKind::Vpn {
                    match (&shared.vpn, &vpn) {
                        (Some(_), Some(_)) => {
                            router.reject(ch, CloseCode::Limit, "one VPN channel per session");
                        }
                        (Some(server), None) => match server.accept(&router, ch, &params, peer) {
                            Ok(v) => vpn = Some(v),
                            Err(why) => warn!(peer = %peer, %addr, "refused VPN: {why}"),
                        },
                        (None, _) => router.reject(ch, CloseCode::Refused, "no VPN here"),
                    }
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
            Incoming::DatagramEpoch { .. } | Incoming::DatagramEpochConfirmed { .. } => {
                if let Some(v) = &vpn {
                    v.on_incoming(&inc);
                }
            }
            Incoming::Pong(_) => {}
        }
    }
    if who.is_some() {
        shared
            .admission
            .lock()
            .expect("admission lock")
            .session_done();
        if let Some(m) = shared.room.lock().expect("room lock").remove(&id) {
            shared
                .console
                .notice(&format!("{} ({}) left", sanitize(&m.name), m.peer.short()));
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
