//! Chat: the first service on a session. One Chat channel per session; each DATA frame is one
//! message (a line of UTF-8 text).
//!
//! Terminal mode: a rustyline prompt with history and editing; incoming messages are printed
//! above the prompt. Pipe mode (stdin not a terminal): every stdin line is one message, every
//! received message is one stdout line `NAME (SHORTID): TEXT`; at stdin EOF a connector closes
//! the session after everything it sent was delivered and exits 0.

use super::router::ChannelSender;
use super::store::Home;
use crate::core::identity::{Algorithm, Identity, PeerId};
use crate::core::limits::MAX_CHAT_MESSAGE;
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

type Printer = Box<dyn rustyline::ExternalPrinter + Send>;

/// Where output goes: above a rustyline prompt on a terminal, plain stdout otherwise.
/// Cheap to clone; [`start_input`] attaches the prompt's printer to every clone at once.
#[derive(Clone, Default)]
pub struct Console {
    printer: Arc<Mutex<Option<Printer>>>,
}

impl Console {
    pub fn plain() -> Self {
        Console::default()
    }

    fn has_prompt(&self) -> bool {
        self.printer.lock().is_ok_and(|p| p.is_some())
    }

    pub fn print(&self, line: &str) {
        if let Ok(mut p) = self.printer.lock() {
            if let Some(p) = p.as_mut() {
                if p.print(format!("{line}\n")).is_ok() {
                    return;
                }
            }
        }
        println!("{line}");
    }

    /// A status line: above the prompt on a terminal, on stderr otherwise (stdout carries
    /// only messages, for scripts).
    pub fn notice(&self, line: &str) {
        if self.has_prompt() {
            self.print(line);
        } else {
            eprintln!("{line}");
        }
    }
}

/// A line the user typed, or the end of input.
pub enum Input {
    Line(String),
    Eof,
}

/// Starts reading user input: rustyline on a terminal (its printer is attached to
/// `console`), lines of stdin otherwise.
pub fn start_input(console: &Console) -> mpsc::UnboundedReceiver<Input> {
    let (tx, rx) = mpsc::unbounded_channel();
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let (ptx, prx) = std::sync::mpsc::channel();
        std::thread::spawn(move || readline_loop(tx, ptx));
        if let Ok(Some(printer)) = prx.recv() {
            if let Ok(mut p) = console.printer.lock() {
                *p = Some(printer);
            }
        }
        return rx;
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
    rx
}

type PrinterTx = std::sync::mpsc::Sender<Option<Printer>>;

fn readline_loop(tx: mpsc::UnboundedSender<Input>, printer: PrinterTx) {
    use rustyline::error::ReadlineError;
    let Ok(mut rl) = rustyline::DefaultEditor::new() else {
        let _ = printer.send(None);
        return;
    };
    let p = rl
        .create_external_printer()
        .ok()
        .map(|p| Box::new(p) as Printer);
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

pub(crate) const HELP: &str = "commands: /peers (connected and LAN peers), /dial NAME|PEERID|ADDR, /quit, /help (start a line with // to send a literal /)";

/// What a chat-line command asks for.
pub(crate) enum Command {
    Send(String),
    Peers,
    Dial(String),
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
        d if d.starts_with("/dial ") && !d[6..].trim().is_empty() => {
            Command::Dial(d[6..].trim().to_string())
        }
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
