//! Chat: the first service on a session. One Chat channel per session; each DATA frame is one
//! message (a line of UTF-8 text).
//!
//! Terminal mode: a rustyline prompt with history and editing; incoming messages are printed
//! above the prompt. Pipe mode (stdin not a terminal): every stdin line is one message, every
//! received message is one stdout line `NAME (SHORTID): TEXT`; at stdin EOF a connector closes
//! the session after everything it sent was delivered and exits 0.

use super::dial::{dial, ConnectError, DialOptions};
use super::store::Home;
use super::target::Target;
use crate::core::admission::Admission;
use crate::core::crypto::{OsRandom, Secret32};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::{Algorithm, Identity, PeerId};
use crate::core::limits::MAX_CHAT_MESSAGE;
use crate::core::session::{CloseReason, Event, Session, SessionConfig};
use crate::net::tcp::{spawn_session, SessionHandle};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long a shutting-down listener waits for its sessions to say goodbye.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Removes control characters (terminal escapes) from text a peer sent.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

/// One printed chat line.
pub fn format_message(name: &str, peer: &PeerId, text: &str) -> String {
    format!("{} ({}): {}", sanitize(name), peer.short(), sanitize(text))
}

/// Where output goes: above a rustyline prompt on a terminal, plain stdout otherwise.
#[derive(Clone)]
pub struct Console {
    printer: Option<Arc<Mutex<Box<dyn rustyline::ExternalPrinter + Send>>>>,
}

impl Console {
    pub fn print(&self, line: &str) {
        if let Some(p) = &self.printer {
            if let Ok(mut p) = p.lock() {
                if p.print(format!("{line}\n")).is_ok() {
                    return;
                }
            }
        }
        println!("{line}");
    }
}

/// A line the user typed, or the end of input.
pub enum Input {
    Line(String),
    Eof,
}

/// Starts reading user input: rustyline on a terminal, lines of stdin otherwise.
pub fn start_input() -> (Console, mpsc::UnboundedReceiver<Input>) {
    let (tx, rx) = mpsc::unbounded_channel();
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let (ptx, prx) = std::sync::mpsc::channel();
        std::thread::spawn(move || readline_loop(tx, ptx));
        if let Ok(Some(printer)) = prx.recv() {
            return (
                Console {
                    printer: Some(Arc::new(Mutex::new(printer))),
                },
                rx,
            );
        }
        return (Console { printer: None }, rx);
    }
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(Input::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(Input::Eof);
    });
    (Console { printer: None }, rx)
}

type PrinterTx = std::sync::mpsc::Sender<Option<Box<dyn rustyline::ExternalPrinter + Send>>>;

fn readline_loop(tx: mpsc::UnboundedSender<Input>, printer: PrinterTx) {
    use rustyline::error::ReadlineError;
    let Ok(mut rl) = rustyline::DefaultEditor::new() else {
        let _ = printer.send(None);
        return;
    };
    let p = rl
        .create_external_printer()
        .ok()
        .map(|p| Box::new(p) as Box<dyn rustyline::ExternalPrinter + Send>);
    let _ = printer.send(p);
    loop {
        match rl.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = rl.add_history_entry(line.as_str());
                }
                if tx.send(Input::Line(line)).is_err() {
                    return;
                }
            }
            Err(ReadlineError::Interrupted) | Err(ReadlineError::Eof) | Err(_) => {
                let _ = tx.send(Input::Eof);
                return;
            }
        }
    }
}

/// Reassembles newline-terminated messages from channel data, whatever the frame boundaries.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Set while skipping the rest of an over-long line.
    discarding: bool,
}

impl LineBuffer {
    /// Returns the complete messages in `data`; a message longer than MAX_CHAT_MESSAGE is
    /// cut there and the rest of that line dropped, so a peer cannot grow the buffer.
    pub fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                if !self.discarding {
                    out.push(String::from_utf8_lossy(&self.buf).into_owned());
                }
                self.buf.clear();
                self.discarding = false;
            } else if !self.discarding {
                self.buf.push(b);
                if self.buf.len() >= MAX_CHAT_MESSAGE {
                    out.push(String::from_utf8_lossy(&self.buf).into_owned() + " [cut]");
                    self.buf.clear();
                    self.discarding = true;
                }
            }
        }
        out
    }
}

/// Sends one message (newline-terminated on the wire).
async fn send_line(handle: &SessionHandle, ch: u32, mut text: String) {
    if text.len() >= MAX_CHAT_MESSAGE {
        let mut cut = MAX_CHAT_MESSAGE - 1;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        warn!("message cut to {cut} bytes");
    }
    text.retain(|c| c != '\n');
    text.push('\n');
    let _ = handle.send(ch, text.into_bytes()).await;
}

const HELP: &str = "commands: /peers (list connected peers), /quit (leave), /help";

/// What a chat-line command asks for.
enum Command {
    Send(String),
    Peers,
    Quit,
    Help,
    Unknown(String),
    Nothing,
}

fn parse_line(line: &str) -> Command {
    let t = line.trim_end_matches(['\r', '\n']);
    match t.trim() {
        "/quit" | "/exit" => Command::Quit,
        "/peers" => Command::Peers,
        "/help" | "/?" => Command::Help,
        s if s.starts_with('/') && !s.starts_with("//") => Command::Unknown(s.to_string()),
        "" => Command::Nothing,
        _ => Command::Send(t.strip_prefix('/').unwrap_or(t).to_string()),
    }
}

fn load_identity(home: &Home) -> Result<Arc<Identity>> {
    let loaded = home.load_or_create_identity(Algorithm::Falcon512)?;
    if loaded.created {
        eprintln!(
            "created identity {} (peer ID {})",
            home.identity_path().display(),
            loaded.identity.peer_id()
        );
    }
    Ok(Arc::new(loaded.identity))
}

pub struct ConnectOptions {
    pub target: String,
    pub default_port: u16,
    pub accept_new: bool,
    pub name: String,
    pub psk: Option<Secret32>,
}

/// `qssh connect`: chat with one peer.
pub async fn connect(home: &Home, opts: ConnectOptions) -> Result<i32> {
    let identity = load_identity(home)?;
    let target = Target::parse(&opts.target, opts.default_port).map_err(ConnectError::from)?;
    let c = dial(
        home,
        identity,
        DialOptions {
            target,
            accept_new: opts.accept_new,
            name: opts.name,
            psk: opts.psk,
        },
    )
    .await?;
    let peer_id = c.peer.peer_id();
    eprintln!(
        "connected to {} ({}) at {} — {} identity, X25519+ML-KEM-768 handshake in {} ms",
        sanitize(&c.peer_name),
        peer_id.short(),
        c.addr,
        c.peer.algorithm().display_name(),
        c.handshake_time.as_millis()
    );
    let handle = c.handle;
    let peer_name = c.peer_name;
    let mut events = c.events;
    let mut lines = LineBuffer::default();
    let ch = handle
        .open_channel(ChannelKind::Chat, b"")
        .await
        .map_err(|e| anyhow::anyhow!("cannot open chat channel: {e}"))?;
    let (console, mut input) = start_input();
    let mut input_open = true;
    let mut chat_ready = false;
    let mut backlog: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::ChannelAccepted { ch: c }) if c == ch => {
                    chat_ready = true;
                    for line in backlog.drain(..) {
                        send_line(&handle, ch, line).await;
                    }
                    if !input_open {
                        handle.close(CloseCode::Normal, "bye");
                    }
                }
                Some(Event::ChannelRefused { reason, .. }) => {
                    anyhow::bail!("peer refused chat: {reason}");
                }
                Some(Event::Data { ch: c, data }) if c == ch => {
                    handle.consumed(ch, data.len());
                    for text in lines.push(&data) {
                        console.print(&format_message(&peer_name, &peer_id, &text));
                    }
                }
                Some(Event::Closed { reason }) => {
                    return Ok(match reason {
                        CloseReason::Normal | CloseReason::PeerClosed(_) => {
                            if !matches!(reason, CloseReason::Normal) {
                                eprintln!("{reason}");
                            }
                            0
                        }
                        other => {
                            eprintln!("qssh: session ended: {other}");
                            crate::cli::EXIT_CONNECT
                        }
                    });
                }
                Some(_) => {}
                None => return Ok(crate::cli::EXIT_CONNECT),
            },
            line = input.recv(), if input_open => match line {
                Some(Input::Line(l)) => match parse_line(&l) {
                    Command::Send(text) => {
                        if chat_ready { send_line(&handle, ch, text).await } else { backlog.push(text) }
                    }
                    Command::Peers => console.print(&format!("connected: {} ({peer_id})", sanitize(&peer_name))),
                    Command::Quit => { input_open = false; handle.close(CloseCode::Normal, "bye"); }
                    Command::Help => console.print(HELP),
                    Command::Unknown(c) => console.print(&format!("unknown command {c}; {HELP}")),
                    Command::Nothing => {}
                },
                Some(Input::Eof) | None => {
                    input_open = false;
                    if chat_ready {
                        handle.close(CloseCode::Normal, "bye");
                    }
                }
            },
        }
    }
}

pub struct ListenOptions {
    pub bind: Option<IpAddr>,
    pub port: u16,
    pub name: String,
    pub psk: Option<Secret32>,
}

/// A connected peer of a listener.
struct Member {
    name: String,
    peer: PeerId,
    addr: SocketAddr,
    handle: SessionHandle,
    chat: Option<u32>,
}

type Room = Arc<Mutex<BTreeMap<u64, Member>>>;

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

/// `qssh listen`: serve chat to every peer that connects, until SIGINT/SIGTERM.
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
    let mut hs = HandshakeConfig::new(identity, &opts.name);
    hs.psk = opts.psk;
    let room: Room = Arc::new(Mutex::new(BTreeMap::new()));
    let admission = Arc::new(Mutex::new(Admission::default()));
    let (console, mut input) = start_input();
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
                if let Err(why) = admission.lock().expect("admission lock").admit(Instant::now(), addr.ip()) {
                    info!(%addr, "refused connection: {why}");
                    drop(stream);
                    continue;
                }
                next_id += 1;
                let session = Session::responder(
                    SessionConfig { handshake: hs.clone(), expected_peer: None },
                    Instant::now(),
                    Box::new(OsRandom),
                );
                tasks.spawn(serve_peer(next_id, stream, addr, session, room.clone(), admission.clone(), console.clone()));
            }
            line = input.recv(), if input_open => match line {
                Some(Input::Line(l)) => match parse_line(&l) {
                    Command::Send(text) => broadcast(&room, text).await,
                    Command::Peers => {
                        let members: Vec<String> = room.lock().expect("room lock").values()
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
    for m in room.lock().expect("room lock").values() {
        m.handle
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
    let targets: Vec<(SessionHandle, u32)> = room
        .lock()
        .expect("room lock")
        .values()
        .filter_map(|m| m.chat.map(|ch| (m.handle.clone(), ch)))
        .collect();
    for (h, ch) in targets {
        send_line(&h, ch, text.clone()).await;
    }
}

async fn serve_peer(
    id: u64,
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    session: Session,
    room: Room,
    admission: Arc<Mutex<Admission>>,
    console: Console,
) {
    let (handle, mut events, task) = spawn_session(stream, session);
    let mut established = false;
    let mut lines = LineBuffer::default();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Established { peer, name, .. } => {
                let r = admission
                    .lock()
                    .expect("admission lock")
                    .handshake_done(true);
                if let Err(why) = r {
                    handle.close(CloseCode::Limit, &why.to_string());
                    continue;
                }
                established = true;
                let peer_id = peer.peer_id();
                eprintln!(
                    "{} ({}) connected from {addr}",
                    sanitize(&name),
                    peer_id.short()
                );
                info!(peer = %peer_id, %addr, "session established");
                room.lock().expect("room lock").insert(
                    id,
                    Member {
                        name,
                        peer: peer_id,
                        addr,
                        handle: handle.clone(),
                        chat: None,
                    },
                );
            }
            Event::ChannelRequest { ch, kind, .. } => match kind {
                ChannelKind::Chat => {
                    handle.accept_channel(ch);
                    if let Some(m) = room.lock().expect("room lock").get_mut(&id) {
                        m.chat = Some(ch);
                    }
                }
                other => {
                    let who = room.lock().expect("room lock").get(&id).map(|m| m.peer);
                    warn!(peer = ?who, "refused {other:?} channel: not offered by this listener");
                    handle.reject_channel(
                        ch,
                        CloseCode::Unsupported,
                        "this listener offers chat only",
                    );
                }
            },
            Event::Data { ch, data } => {
                handle.consumed(ch, data.len());
                let who = room
                    .lock()
                    .expect("room lock")
                    .get(&id)
                    .filter(|m| m.chat == Some(ch))
                    .map(|m| (m.name.clone(), m.peer));
                if let Some((name, peer)) = who {
                    for text in lines.push(&data) {
                        console.print(&format_message(&name, &peer, &text));
                    }
                }
            }
            Event::Closed { reason } => {
                if !established {
                    let _ = admission
                        .lock()
                        .expect("admission lock")
                        .handshake_done(false);
                    info!(%addr, "handshake failed: {reason}");
                }
                break;
            }
            _ => {}
        }
    }
    if established {
        admission.lock().expect("admission lock").session_done();
        if let Some(m) = room.lock().expect("room lock").remove(&id) {
            eprintln!("{} ({}) left", sanitize(&m.name), m.peer.short());
        }
    }
    let _ = task.await;
}
