//! Chat: the first service on a session. One Chat channel per session; each DATA frame is one
//! message (a line of UTF-8 text).
//!
//! Terminal mode: a rustyline prompt with history and editing; incoming messages are printed
//! above the prompt. Pipe mode (stdin not a terminal): every stdin line is one message, every
//! received message is one stdout line `NAME (SHORTID): TEXT`; at stdin EOF a connector closes
//! the session after everything it sent was delivered and exits 0.

use super::dial::{dial_with, ConnectError, DialOptions, Transport};
use super::router::{route, ChannelEvent, ChannelSender, Incoming};
use super::store::Home;
use super::target::Target;
use crate::core::crypto::Secret32;
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::{Algorithm, Identity, PeerId};
use crate::core::limits::MAX_CHAT_MESSAGE;
use crate::core::session::CloseReason;
use anyhow::Result;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::warn;
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
pub(crate) async fn send_line(chat: &ChannelSender, mut text: String) {
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
    let _ = chat.send(text.into_bytes()).await;
}

pub(crate) const HELP: &str = "commands: /peers (list connected peers), /quit (leave), /help";

/// What a chat-line command asks for.
pub(crate) enum Command {
    Send(String),
    Peers,
    Quit,
    Help,
    Unknown(String),
    Nothing,
}

pub(crate) fn parse_line(line: &str) -> Command {
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

pub(crate) fn load_identity(home: &Home) -> Result<Arc<Identity>> {
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
    /// TCP (default), QUIC over UDP, or through a relay.
    pub transport: Transport,
}

/// `qssh connect`: chat with one peer.
pub async fn connect(home: &Home, opts: ConnectOptions) -> Result<i32> {
    let identity = load_identity(home)?;
    let target = Target::parse(&opts.target, opts.default_port).map_err(ConnectError::from)?;
    let c = dial_with(
        home,
        identity,
        DialOptions {
            target,
            accept_new: opts.accept_new,
            name: opts.name,
            psk: opts.psk,
        },
        opts.transport,
    )
    .await?;
    let peer_id = c.peer.peer_id();
    let peer_name = c.peer_name.clone();
    let at = match &c.udp {
        None => c.addr.to_string(),
        Some(u) if u.relay.is_some() => format!("relay {} (QUIC)", c.addr),
        Some(_) => format!("{} (QUIC)", c.addr),
    };
    eprintln!(
        "connected to {} ({}) at {} — {} identity, X25519+ML-KEM-768 handshake in {} ms",
        sanitize(&peer_name),
        peer_id.short(),
        at,
        c.peer.algorithm().display_name(),
        c.handshake_time.as_millis()
    );
    // Keeps the UDP socket, QUIC endpoint and path agent alive with the session.
    let _udp = c.udp;
    let (router, mut incoming) = route(c.handle, c.events);
    let chat = router
        .open(ChannelKind::Chat, b"")
        .await
        .map_err(|e| anyhow::anyhow!("cannot open chat: {e}"))?;
    let (tx, mut chat_events) = chat.split();
    let (console, mut input) = start_input();
    let mut input_open = true;
    let mut lines = LineBuffer::default();
    loop {
        tokio::select! {
            ev = chat_events.recv() => match ev {
                Some(ChannelEvent::Data(data)) => {
                    tx.consumed(data.len());
                    for text in lines.push(&data) {
                        console.print(&format_message(&peer_name, &peer_id, &text));
                    }
                }
                Some(ChannelEvent::Eof) => {}
                // The session's own Closed (below) says how it ended.
                Some(ChannelEvent::Closed { .. }) | None => {}
            },
            inc = incoming.recv() => match inc {
                Some(Incoming::Request { ch, .. }) => {
                    router.reject(ch, CloseCode::Unsupported, "a connector offers no services");
                }
                Some(Incoming::Closed(reason)) => {
                    return Ok(match reason {
                        CloseReason::Normal => 0,
                        CloseReason::PeerClosed(_) => {
                            eprintln!("{reason}");
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
                    Command::Send(text) => send_line(&tx, text).await,
                    Command::Peers => console.print(&format!("connected: {} ({peer_id})", sanitize(&peer_name))),
                    Command::Quit => {
                        input_open = false;
                        router.close(CloseCode::Normal, "bye");
                    }
                    Command::Help => console.print(HELP),
                    Command::Unknown(c) => console.print(&format!("unknown command {c}; {HELP}")),
                    Command::Nothing => {}
                },
                Some(Input::Eof) | None => {
                    input_open = false;
                    router.close(CloseCode::Normal, "bye");
                }
            },
        }
    }
}
