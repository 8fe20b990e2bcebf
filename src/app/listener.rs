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
use super::dial::{dial_with, resolve_target, ConnectError, Connected, DialOptions, Transport};
use super::exec::{self, Requester};
use super::forward;
pub use super::policy::Policy;
use super::router::{route, Channel, ChannelEvent, ChannelSender, Incoming, RouterHandle};
use super::store::Home;
use super::vpn::{ListenerVpn, VpnOptions, VpnServer};
use crate::core::admission::Admission;
use crate::core::announce::ListenPort;
use crate::core::crypto::{OsRandom, Secret32};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::{Identity, PeerId};
use crate::core::limits::HANDSHAKE_TIMEOUT;
use crate::core::session::{CloseReason, Session, SessionConfig};
use crate::net::discovery::{discover, Announcer, AnnouncerConfig, DiscoverOptions};
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

/// Where a listener listens.
pub struct ListenOn {
    pub bind: Option<IpAddr>,
    pub port: u16,
    /// Announce on the LAN (broadcast and mDNS) so `discover` and `connect NAME` find us.
    pub announce: bool,
    /// Register at this rendezvous/relay peer (`HOST:PORT`) so connectors can reach us by
    /// peer ID from behind NATs.
    pub relay: Option<String>,
    /// STUN servers for our server-reflexive candidates.
    pub stun: Vec<String>,
}

/// A chat room: a listener (`listen: Some`), a connector (`dial: Some`), or both. Typed
/// lines go to every member; `/dial` adds members, `/peers` lists them and the LAN.
pub struct ListenOptions {
    pub listen: Option<ListenOn>,
    /// Connect to this target first; failing that is a connection error (exit 255).
    pub dial: Option<String>,
    pub default_port: u16,
    /// Trust a first-seen peer without asking (connect --accept-new).
    pub accept_new: bool,
    pub name: String,
    pub psk: Option<Secret32>,
    pub policy: Policy,
    /// `--vpn`: serve VPN channels on this tunnel configuration.
    pub vpn: Option<VpnOptions>,
    /// How the command-line target is reached: TCP, QUIC over UDP, or through a relay.
    pub transport: Transport,
}

/// A connected peer.
struct Member {
    name: String,
    peer: PeerId,
    addr: SocketAddr,
    router: RouterHandle,
    chat: Option<ChannelSender>,
    /// We dialed it (connect, /dial) rather than accepted it.
    outgoing: bool,
}

type Room = Arc<Mutex<BTreeMap<u64, Member>>>;

/// Shared by every session task of one listener.
struct Shared {
    room: Room,
    admission: Mutex<Admission>,
    policy: Policy,
    console: Console,
    home: Home,
    identity: Arc<Identity>,
    name: String,
    psk: Option<Secret32>,
    accept_new: bool,
    default_port: u16,
    transport: Transport,
    /// How the first dialed session ended (the connector's exit status follows it).
    first_close: Mutex<Option<CloseReason>>,
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

/// Runs the room: until SIGINT/SIGTERM or `/quit` for a listener; for a connector also
/// until its input ends (then every session is closed gracefully) or its last peer leaves.
pub async fn listen(home: &Home, opts: ListenOptions) -> Result<i32> {
    let identity = load_identity(home)?;
    let (listener, vpn) = match &opts.listen {
        Some(on) => {
            let (l, a, u, v) = start_listening(&identity, &opts.name, on, opts.vpn.clone()).await?;
            (Some((l, a, u)), v)
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        room: Arc::new(Mutex::new(BTreeMap::new())),
        admission: Mutex::new(Admission::default()),
        policy: opts.policy,
        console: Console::plain(),
        home: home.clone(),
        identity: identity.clone(),
        name: opts.name.clone(),
        psk: opts.psk.clone(),
        accept_new: opts.accept_new,
        default_port: opts.default_port,
        transport: opts.transport.clone(),
        first_close: Mutex::new(None),
        vpn,
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    // A connector's first peer: failing to reach it is the command's failure.
    if let Some(target) = &opts.dial {
        let d = open_chat(dial_target(&shared, target, true).await?).await?;
        next_id += 1;
        tasks.spawn(serve_dialed(next_id, d, shared.clone(), true));
    }
    // The line editor starts after the first dial: its trust question owns the terminal.
    let console = shared.console.clone();
    let mut input = start_input(&console);
    let mut hs = HandshakeConfig::new(identity, &opts.name);
    hs.psk = opts.psk;
    let mut input_open = true;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install SIGTERM handler")?;
    loop {
        let accept = async {
            match &listener {
                Some((l, _, _)) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        let quic_accept = async {
            match &listener {
                Some((_, _, Some(u))) => u.endpoint.accept().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            inc = quic_accept => {
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
                let udp_local = incoming.local_ip().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |ip| SocketAddr::new(ip, 0));
                tasks.spawn(async move {
                    match crate::net::quic::accept(incoming, HANDSHAKE_TIMEOUT).await {
                        Ok(link) => serve_peer(id, crate::net::quic::spawn_session(link, session), addr, udp_local, true, shared).await,
                        Err(e) => {
                            let _ = shared.admission.lock().expect("admission lock").handshake_done(false);
                            info!(%addr, "QUIC connection failed: {e}");
                        }
                    }
                });
            }
            acc = accept => {
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
                let local = stream.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let (id, shared) = (next_id, shared.clone());
                if shared.vpn.is_some() {
                    // VPN peers share the listener's tunnel tasks: one runtime for all.
                    tasks.spawn(serve_peer(id, spawn_session(stream, session), addr, local, false, shared));
                    continue;
                }
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => { warn!(%addr, "cannot hand the connection over: {e}"); continue; }
                };
                tasks.spawn(on_own_thread(move || async move {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => serve_peer(id, spawn_session(stream, session), addr, local, false, shared).await,
                        Err(e) => warn!(%addr, "cannot register the connection: {e}"),
                    }
                }));
            }
            line = input.recv(), if input_open => match line {
                Some(Input::Line(l)) => match parse_line(&l) {
                    Command::Send(text) => broadcast(&shared.room, text).await,
                    Command::Peers => list_peers(&shared),
                    Command::Dial(target) => {
                        next_id += 1;
                        let (id, shared) = (next_id, shared.clone());
                        tasks.spawn(async move {
                            let d = match dial_target(&shared, &target, false).await {
                                Ok(c) => open_chat(c).await,
                                Err(e) => Err(e),
                            };
                            match d {
                                Ok(d) => serve_dialed(id, d, shared, false).await,
                                Err(e) => shared.console.notice(&format!("/dial {target}: {e}")),
                            }
                        });
                    }
                    Command::Quit => break,
                    Command::Help => console.print(HELP),
                    Command::Unknown(c) => console.print(&format!("unknown command {c}; {HELP}")),
                    Command::Nothing => {}
                },
                Some(Input::Eof) | None => {
                    input_open = false;
                    // A listener keeps serving after its input ends; a connector says goodbye.
                    if listener.is_none() {
                        for m in shared.room.lock().expect("room lock").values() {
                            m.router.close(CloseCode::Normal, "bye");
                        }
                    }
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                if listener.is_none() && tasks.is_empty() {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Tell every peer, then give the sessions a moment to flush the goodbye.
    let why = if listener.is_some() {
        "listener shutting down"
    } else {
        "bye"
    };
    for m in shared.room.lock().expect("room lock").values() {
        m.router.close(CloseCode::Shutdown, why);
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if let Some((_, Some(a), _)) = listener {
        a.stop().await;
        eprintln!("listener stopped");
    } else if opts.listen.is_some() {
        eprintln!("listener stopped");
    }
    if opts.dial.is_some() {
        let first = shared.first_close.lock().expect("first_close lock").take();
        return Ok(match first {
            None | Some(CloseReason::Normal) => 0,
            Some(reason @ CloseReason::PeerClosed(_)) => {
                eprintln!("{reason}");
                0
            }
            Some(other) => {
                eprintln!("qssh: session ended: {other}");
                crate::cli::EXIT_CONNECT
            }
        });
    }
    Ok(0)
}

/// The UDP side of a listener: QUIC endpoint on the shared socket, and the path agent when
/// registered at a relay.
struct UdpSide {
    endpoint: quinn::Endpoint,
    mux: UdpMux,
    _agent: Option<Agent>,
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

/// QUIC over UDP on the TCP port number (connect --udp, and relayed/punched peers); with a
/// relay, registration and punching. Without a relay, a UDP failure only disables UDP.
async fn start_udp(identity: &Arc<Identity>, port: u16, on: &ListenOn) -> Result<Option<UdpSide>> {
    let (mux, control) = match bind_udp(on.bind, port).await {
        Ok(x) => x,
        Err(e) if on.relay.is_none() => {
            warn!("UDP disabled: {e:#}");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let endpoint = crate::net::quic::endpoint(&mux, true).context("cannot start QUIC")?;
    eprintln!("UDP (QUIC) on port {}", mux.local_addr().port());
    let agent = match &on.relay {
        Some(relay) => {
            let relay_addr = crate::app::dial::resolve(relay).await?;
            let mut candidates = host_candidates(&[relay_addr], mux.local_addr().port());
            candidates.extend(crate::app::dial::stun_candidates(&mux, &on.stun).await);
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
    Ok(Some(UdpSide {
        endpoint,
        mux,
        _agent: agent,
    }))
}

/// Shows path changes and relay registration on stderr.
fn print_listener_path_events(mut events: tokio::sync::mpsc::UnboundedReceiver<PathEvent>) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            eprintln!("{e}");
        }
    });
}

/// Binds, prints the banner and starts announcing.
async fn start_listening(
    identity: &Arc<Identity>,
    name: &str,
    on: &ListenOn,
    vpn: Option<VpnOptions>,
) -> Result<(
    TcpListener,
    Option<Announcer>,
    Option<UdpSide>,
    Option<Arc<VpnServer>>,
)> {
    let listener = bind(on.bind, on.port).await?;
    let local = listener.local_addr()?;
    // The tunnel first: without the right to create it, the one error line is all there is.
    let vpn = match vpn {
        // The listener port's UDP socket carries QUIC; the VPN's datagrams get their own
        // (ephemeral) port, told to the connector in the VPN channel parameters.
        Some(v) => Some(VpnServer::start(v, SocketAddr::new(local.ip(), 0))?),
        None => None,
    };
    eprintln!(
        "listening on {} as {} ({})",
        match on.bind {
            None => format!("port {} (all IPv4 and IPv6 addresses)", local.port()),
            Some(_) => local.to_string(),
        },
        identity.peer_id(),
        sanitize(name)
    );
    // Announcing an address we do not listen on would only mislead: not for loopback binds.
    let announcer = if on.announce && !on.bind.is_some_and(|ip| ip.is_loopback()) {
        let cfg = AnnouncerConfig::new(
            identity.peer_id(),
            name,
            vec![ListenPort::tcp(local.port())],
        );
        match Announcer::start(cfg).await {
            Ok(a) => Some(a),
            Err(e) => {
                warn!("not announcing on the LAN: {e}");
                None
            }
        }
    } else {
        None
    };
    let udp = start_udp(identity, local.port(), on).await?;
    // VPN peers whose session runs over QUIC (direct, punched or relayed) send their
    // datagram records on that same socket.
    if let (Some(v), Some(u)) = (&vpn, &udp) {
        v.attach_mux(&u.mux);
    }
    Ok((listener, announcer, udp, vpn))
}

/// Resolves and dials `target` for the room. Only the command-line target may ask the
/// trust-on-first-use question (a `/dial` runs beside the line editor).
async fn dial_target(
    shared: &Shared,
    target: &str,
    may_ask: bool,
) -> Result<Connected, ConnectError> {
    // The command-line target uses the chosen transport; /dial uses TCP.
    let transport = if may_ask {
        shared.transport.clone()
    } else {
        Transport::Tcp
    };
    let t = match transport {
        // A peer ID for the relay: no LAN lookup.
        Transport::Relay { .. } => super::target::Target::parse(target, shared.default_port)?,
        _ => resolve_target(target, shared.default_port, shared.identity.peer_id()).await?,
    };
    let c = dial_with(
        &shared.home,
        shared.identity.clone(),
        DialOptions {
            target: t,
            accept_new: shared.accept_new,
            ask: may_ask,
            name: shared.name.clone(),
            psk: shared.psk.clone(),
        },
        transport,
    )
    .await?;
    let at = match &c.udp {
        None => c.addr.to_string(),
        Some(u) if u.relay.is_some() => format!("relay {} (QUIC)", c.addr),
        Some(_) => format!("{} (QUIC)", c.addr),
    };
    let peer_id = c.peer.peer_id();
    shared.console.notice(&format!(
        "connected to {} ({}) at {} — {} identity, X25519+ML-KEM-768 handshake in {} ms",
        sanitize(&c.peer_name),
        peer_id.short(),
        at,
        c.peer.algorithm().display_name(),
        c.handshake_time.as_millis()
    ));
    Ok(c)
}

/// `/peers`: members now, then whoever announces on the LAN (looked up in the background).
fn list_peers(shared: &Arc<Shared>) {
    let (members, ids): (Vec<String>, Vec<PeerId>) = shared
        .room
        .lock()
        .expect("room lock")
        .values()
        .map(|m| {
            let dir = if m.outgoing { "to" } else { "from" };
            (
                format!(
                    "connected: {} ({}) {dir} {}",
                    sanitize(&m.name),
                    m.peer,
                    m.addr
                ),
                m.peer,
            )
        })
        .unzip();
    if members.is_empty() {
        shared.console.print("connected: nobody");
    }
    for m in members {
        shared.console.print(&m);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut exclude = ids;
        exclude.push(shared.identity.peer_id());
        let opts = DiscoverOptions {
            timeout: Duration::from_secs(1),
            exclude,
            ..DiscoverOptions::default()
        };
        match discover(&opts).await {
            Ok(d) if d.peers.is_empty() => shared.console.print("on the LAN: nobody else"),
            Ok(d) => {
                for p in d.peers {
                    shared
                        .console
                        .print(&format!("on the LAN: {}", sanitize(&p.line())));
                }
            }
            Err(e) => shared
                .console
                .print(&format!("LAN discovery unavailable: {e}")),
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

/// Runs the future `make` returns on a thread of its own with a single-threaded runtime, as
/// sshd gives each connection a process of its own: a session's records, channels and
/// commands never wake another thread, and sessions spread over the cores. Completes when
/// that future has. Tasks the session left behind are dropped with its runtime (their
/// cleanup, such as hanging up a command's process group, runs on drop).
async fn on_own_thread<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("qssh-session".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(make()),
                Err(e) => warn!("cannot start a session's runtime: {e}"),
            }
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => warn!("cannot start a session's thread: {e}"),
    }
}

/// `on_udp`: the session runs over QUIC on the listener's UDP socket, where `addr` is the
/// peer's address (virtual for peers reached through the relay).
async fn serve_peer(
    id: u64,
    spawned: Spawned,
    addr: SocketAddr,
    local: SocketAddr,
    on_udp: bool,
    shared: Arc<Shared>,
) {
    let (handle, events, task) = spawned;
    let (router, incoming) = route(handle, events);
    serve_session(id, addr, local, on_udp, router, incoming, shared, None).await;
    let _ = task.await;
}

/// A session we dialed, established and with its chat channel open.
struct Dialed {
    addr: SocketAddr,
    c: Connected,
    router: RouterHandle,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Incoming>,
    chat: Channel,
}

/// Opens the chat channel on a fresh dialed session, so lines typed from now on reach it.
async fn open_chat(mut c: Connected) -> Result<Dialed, ConnectError> {
    let addr = c.addr;
    let (router, incoming) = route(c.handle.clone(), c.take_events());
    let chat = router
        .open(ChannelKind::Chat, b"")
        .await
        .map_err(|e| ConnectError::Trust(format!("cannot open chat: {e}")))?;
    Ok(Dialed {
        addr,
        c,
        router,
        incoming,
        chat,
    })
}

/// Runs a dialed session as a room member until it ends. The session joins the room when
/// this is called, not when the returned future first runs: a line typed (or piped) right
/// after the dial must reach it.
fn serve_dialed(
    id: u64,
    d: Dialed,
    shared: Arc<Shared>,
    first: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let peer = d.c.peer.peer_id();
    let name = d.c.peer_name.clone();
    let (tx, rx) = d.chat.split();
    shared.room.lock().expect("room lock").insert(
        id,
        Member {
            name: name.clone(),
            peer,
            addr: d.addr,
            router: d.router.clone(),
            chat: Some(tx.clone()),
            outgoing: true,
        },
    );
    let chat = tokio::spawn(chat_member(
        tx,
        rx,
        name.clone(),
        peer,
        shared.console.clone(),
    ));
    async move {
        let reason = serve_session(
            id,
            d.addr,
            SocketAddr::from(([0, 0, 0, 0], 0)),
            false,
            d.router,
            d.incoming,
            shared.clone(),
            Some((peer, name)),
        )
        .await;
        if first {
            *shared.first_close.lock().expect("first_close lock") = reason;
        }
        chat.abort();
        let _ = d.c.task.await;
    }
}

/// Serves one session's requests under the policy until it ends; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn serve_session(
    id: u64,
    addr: SocketAddr,
    local: SocketAddr,
    on_udp: bool,
    router: RouterHandle,
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Incoming>,
    shared: Arc<Shared>,
    mut who: Option<(PeerId, String)>,
) -> Option<CloseReason> {
    let outgoing = who.is_some();
    let mut ended = None;
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
                shared.console.notice(&format!(
                    "{} ({}) connected from {addr}",
                    sanitize(&name),
                    peer_id.short()
                ));
                info!(peer = %peer_id, %addr, "session established");
                shared.room.lock().expect("room lock").insert(
                    id,
                    Member {
                        name: name.clone(),
                        peer: peer_id,
                        addr,
                        router: router.clone(),
                        chat: None,
                        outgoing: false,
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
                    router.reject(ch, CloseCode::Refused, &why.to_string());
                    continue;
                }
                if kind == ChannelKind::Vpn {
                    match (&shared.vpn, &vpn) {
                        (Some(_), Some(_)) => {
                            router.reject(ch, CloseCode::Limit, "one VPN channel per session");
                        }
                        (Some(server), None) => {
                            match server.accept(&router, ch, &params, peer, on_udp.then_some(addr))
                            {
                                Ok(v) => vpn = Some(v),
                                Err(why) => warn!(peer = %peer, %addr, "refused VPN: {why}"),
                            }
                        }
                        (None, _) => router.reject(ch, CloseCode::Refused, "no VPN here"),
                    }
                    continue;
                }
                match kind {
                    ChannelKind::Chat => {
                        let (tx, rx) = router.accept(ch, kind).split();
                        if let Some(m) = shared.room.lock().expect("room lock").get_mut(&id) {
                            m.chat = Some(tx.clone());
                        }
                        tokio::spawn(chat_member(tx, rx, name, peer, shared.console.clone()));
                    }
                    other => serve_channel(
                        other,
                        router.clone(),
                        ch,
                        params,
                        Requester {
                            peer,
                            remote: addr,
                            local,
                        },
                    ),
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
                ended = Some(reason);
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
        if !outgoing {
            shared
                .admission
                .lock()
                .expect("admission lock")
                .session_done();
        }
        if let Some(m) = shared.room.lock().expect("room lock").remove(&id) {
            shared
                .console
                .notice(&format!("{} ({}) left", sanitize(&m.name), m.peer.short()));
        }
    }
    ended
}

/// Channel kinds other than chat, once authorized: each request is served by its own task,
/// which accepts or refuses the channel once it knows whether it can serve it.
fn serve_channel(
    kind: ChannelKind,
    router: RouterHandle,
    ch: u32,
    params: Vec<u8>,
    who: Requester,
) {
    match kind {
        ChannelKind::Shell | ChannelKind::Exec => {
            tokio::spawn(exec::serve(router, ch, kind, params, who));
        }
        ChannelKind::ForwardTcp => {
            tokio::spawn(forward::serve_direct(router, ch, params, who.peer));
        }
        ChannelKind::ReverseForward => {
            tokio::spawn(forward::serve_reverse(router, ch, params, who.peer));
        }
        ChannelKind::Chat | ChannelKind::Vpn => router.reject(
            ch,
            CloseCode::Unsupported,
            &format!("{kind:?} is not offered by this listener"),
        ),
    }
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
