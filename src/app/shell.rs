//! Connecting side of `qssh shell`, `qssh exec` and `qssh connect ... -- CMD` / `-N`: dial,
//! set up forwards, open a shell or exec channel and carry the local terminal or stdio over
//! it, as ssh does.
//!
//! - A terminal session (shell with a terminal on stdin, or `-t`) puts the local terminal in
//!   raw mode, sends TERM and the window size at start and at every SIGWINCH, and restores
//!   the terminal on every exit path. `~.` after a newline disconnects, `~~` sends a `~`,
//!   `~?` lists the escapes, as with ssh.
//! - Otherwise stdin, stdout and stderr are carried separately and binary-safe; stdin's end
//!   is passed on; the remote exit status becomes ours (a death by signal N: 128+N).
//! - Output goes through a writer thread that gives window back only after the bytes were
//!   written: a slow reader of our stdout stops the remote command, nothing piles up.
//! - We exit only after every output byte was written and the exit status arrived; any
//!   failure to connect, authenticate or be authorized exits 255, as ssh does.

use super::bulk::{RecordReads, BULK_READ_CHUNK};
use super::dial::{dial_with, resolve_target, ConnectError, DialOptions, Transport};
use super::forward::{start_local, ForwardError, ForwardSpec, RemoteForwards};
use super::pty::{window_size, RawTerminal};
use super::router::{route, ChannelEvent, ChannelSender, Incoming, OpenError, RouterHandle};
use super::store::{Home, StoreError};
use crate::core::crypto::Secret32;
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::{Algorithm, Identity};
use crate::core::limits::MAX_ENV_VARS;
use crate::core::service::{
    data_header, valid_env_name, CommandParams, Msg, MsgDecoder, ParamsError, Piece, Stream,
    MSG_HEADER,
};
use crate::core::session::{CloseReason, Payload};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::debug;

/// Bytes read from a local terminal per channel message (from a pipe or file, stdin is read
/// straight into records, [`BULK_READ_CHUNK`] at a time).
pub const STDIN_READ_CHUNK: usize = BULK_READ_CHUNK;
/// Kernel buffer asked for our stdin/stdout when they are pipes, about one bulk read
/// (fewer wake-ups in bulk; see `exec::CHILD_PIPE_SIZE` for why not larger).
pub const LOCAL_PIPE_SIZE: usize = 256 * 1024;
/// After the exit status, how long we wait for the peer to acknowledge the session's close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The escape character of terminal sessions.
pub const ESCAPE_CHAR: u8 = b'~';
/// Signal numbers for exit statuses (128 + N), as a shell reports a death by signal.
const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGPIPE: i32 = 13;
const SIGTERM: i32 = 15;
/// ssh's exit status for its own failures (and `~.`).
const EXIT_FAILURE: i32 = 255;

/// What runs on the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// An interactive login shell.
    Shell,
    /// A command line (the words are joined by spaces and run by the peer user's shell).
    Exec(Vec<OsString>),
    /// Only the forwards (`-N`).
    ForwardOnly,
}

pub struct RemoteOptions {
    pub target: String,
    pub default_port: u16,
    pub accept_new: bool,
    pub name: String,
    pub psk: Option<Secret32>,
    pub mode: Mode,
    /// `-t` given this many times: 1 asks for a terminal if stdin is one, 2 forces one.
    pub tty: u8,
    /// `-n`: stdin from nothing.
    pub stdin_null: bool,
    pub local_forwards: Vec<ForwardSpec>,
    pub remote_forwards: Vec<ForwardSpec>,
    /// TCP, QUIC over UDP, or through a relay (then `target` is a peer ID).
    pub transport: Transport,
}

/// Failures of a remote session; the CLI exits 255 for every one of them, as ssh does.
#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("{what} refused by the peer: {reason}")]
    Refused { what: &'static str, reason: String },
    #[error("connection to {peer} lost: {reason}")]
    Lost { peer: String, reason: String },
    #[error("cannot use the local terminal: {0}")]
    Terminal(io::Error),
}

fn load_identity(home: &Home) -> Result<Arc<Identity>, StoreError> {
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

/// The locale variables we pass on (ssh's usual `SendEnv LANG LC_*`).
fn locale_env() -> Vec<(String, Vec<u8>)> {
    let mut env: Vec<(String, Vec<u8>)> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            ((k == "LANG" || k.starts_with("LC_")) && valid_env_name(&k)).then(|| (k, v.into_vec()))
        })
        .filter(|(_, v)| v.len() <= crate::core::limits::MAX_ENV_VALUE && !v.contains(&0))
        .collect();
    env.sort();
    env.truncate(MAX_ENV_VARS);
    env
}

/// Runs a remote shell, command or forward-only session; returns the exit status.
pub async fn run(home: &Home, opts: RemoteOptions) -> Result<i32, RemoteError> {
    let stdin_tty = io::stdin().is_terminal();
    let pty = match &opts.mode {
        Mode::Shell => stdin_tty || opts.tty >= 2,
        Mode::Exec(_) => opts.tty >= 2 || (opts.tty == 1 && stdin_tty),
        Mode::ForwardOnly => false,
    };
    if !pty && !opts.stdin_null && (opts.mode == Mode::Shell || opts.tty == 1) {
        eprintln!("Pseudo-terminal will not be allocated because stdin is not a terminal.");
    }
    // Build the request first: a command too long fails before any network traffic.
    let request = match &opts.mode {
        Mode::ForwardOnly => None,
        mode => {
            let argv = match mode {
                Mode::Exec(words) => words.iter().map(|w| w.as_bytes().to_vec()).collect(),
                _ => Vec::new(),
            };
            let size = window_size(io::stdin()).or_else(|| window_size(io::stdout()));
            let params = CommandParams {
                pty: pty.then(|| size.unwrap_or_default()),
                term: if pty {
                    std::env::var("TERM").unwrap_or_default()
                } else {
                    String::new()
                },
                env: locale_env(),
                argv,
            };
            let kind = if *mode == Mode::Shell {
                ChannelKind::Shell
            } else {
                ChannelKind::Exec
            };
            Some((kind, params.encode()?))
        }
    };
    let identity = load_identity(home)?;
    let target = match opts.transport {
        // A peer ID for the relay: no LAN lookup.
        Transport::Relay { .. } => super::target::Target::parse(&opts.target, opts.default_port)
            .map_err(ConnectError::from)?,
        _ => resolve_target(&opts.target, opts.default_port, identity.peer_id()).await?,
    };
    let peer = target.host_port();
    // `c` (with its UDP socket and path agent, if any) lives until the command ends.
    let mut c = dial_with(
        home,
        identity,
        DialOptions {
            target,
            accept_new: opts.accept_new,
            ask: true,
            name: opts.name,
            psk: opts.psk,
        },
        opts.transport,
    )
    .await?;
    debug!(
        "connected to {} in {} ms",
        c.peer.peer_id(),
        c.handshake_time.as_millis()
    );
    let (router, mut incoming) = route(c.handle.clone(), c.take_events());
    let reverse = RemoteForwards::default();
    for spec in opts.remote_forwards {
        reverse.request(&router, spec).await?;
    }
    for spec in opts.local_forwards {
        start_local(router.clone(), spec).await?;
    }
    let session = Session {
        router,
        reverse,
        peer,
    };
    match request {
        None => session.forward_only(&mut incoming).await,
        Some((kind, params)) => {
            session
                .command(
                    &mut incoming,
                    kind,
                    &params,
                    pty && stdin_tty,
                    opts.stdin_null,
                )
                .await
        }
    }
}

struct Session {
    router: RouterHandle,
    reverse: RemoteForwards,
    peer: String,
}

/// How a command session ended, before cleanup.
enum Outcome {
    Exit(i32),
    /// Ended locally by a signal (or a broken stdout: SIGPIPE).
    Signal(i32),
    /// `~.`
    Disconnected,
    Failed(String),
}

/// The signals that end a session from outside.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => SIGINT,
            _ = self.term.recv() => SIGTERM,
            _ = self.hup.recv() => SIGHUP,
        }
    }
}

impl Session {
    /// Answers a channel the peer wants to open: only connections of our remote forwards.
    fn on_request(&self, ch: u32, kind: ChannelKind, params: &[u8]) {
        if kind == ChannelKind::ReverseForward {
            self.reverse.handle(&self.router, ch, params);
        } else {
            debug!("refusing a {kind:?} channel the peer opened");
            self.router.reject(
                ch,
                CloseCode::Refused,
                "a connecting peer offers no services",
            );
        }
    }

    fn lost(&self, reason: impl ToString) -> RemoteError {
        RemoteError::Lost {
            peer: self.peer.clone(),
            reason: reason.to_string(),
        }
    }

    /// Closes the session gracefully and waits (bounded) for the peer's acknowledgement.
    async fn close(&self, incoming: &mut mpsc::UnboundedReceiver<Incoming>) {
        self.router.close(CloseCode::Normal, "bye");
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(i) = incoming.recv().await {
                if matches!(i, Incoming::Closed(_)) {
                    return;
                }
            }
        })
        .await;
    }

    /// `-N`: serve the forwards until a signal or the end of the session.
    async fn forward_only(
        &self,
        incoming: &mut mpsc::UnboundedReceiver<Incoming>,
    ) -> Result<i32, RemoteError> {
        let mut signals = Signals::new().map_err(RemoteError::Terminal)?;
        loop {
            tokio::select! {
                inc = incoming.recv() => match inc {
                    Some(Incoming::Request { ch, kind, params }) => self.on_request(ch, kind, &params),
                    Some(Incoming::Closed(reason)) => return Err(self.lost(reason)),
                    None => return Err(self.lost(CloseReason::TransportClosed)),
                    Some(_) => {}
                },
                sig = signals.recv() => {
                    debug!("signal {sig}: closing the forwards");
                    self.close(incoming).await;
                    return Ok(0);
                }
            }
        }
    }

    async fn command(
        &self,
        incoming: &mut mpsc::UnboundedReceiver<Incoming>,
        kind: ChannelKind,
        params: &[u8],
        raw: bool,
        stdin_null: bool,
    ) -> Result<i32, RemoteError> {
        let what = if kind == ChannelKind::Shell {
            "shell"
        } else {
            "exec"
        };
        let channel = self.router.open(kind, params).await.map_err(|e| match e {
            OpenError::Refused(_, reason) => RemoteError::Refused { what, reason },
            other => self.lost(other),
        })?;
        let terminal = if raw {
            Some(RawTerminal::enter().map_err(RemoteError::Terminal)?)
        } else {
            None
        };
        let pty = CommandParams::decode(params)
            .map(|p| p.pty.is_some())
            .unwrap_or(false);
        let (tx, mut rx) = channel.split();
        let (broken_tx, mut broken) = mpsc::unbounded_channel();
        let output = OutputWriter::start(tx.clone(), broken_tx).map_err(RemoteError::Terminal)?;
        let (disconnect_tx, mut disconnect) = mpsc::unbounded_channel();
        if stdin_null {
            let _ = tx.send(Msg::Eof(Stream::Stdin).to_vec()).await;
        } else {
            start_stdin(tx.clone(), terminal.is_some(), disconnect_tx)
                .map_err(RemoteError::Terminal)?;
        }
        // Window changes go out in order through their own task, so a full window never
        // stalls this loop (which must keep draining output).
        let (resize_tx, mut resize_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(m) = resize_rx.recv().await {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
        let mut winch = if pty {
            Some(signal(SignalKind::window_change()).map_err(RemoteError::Terminal)?)
        } else {
            None
        };
        let mut signals = Signals::new().map_err(RemoteError::Terminal)?;
        let mut dec = MsgDecoder::default();
        let outcome = loop {
            tokio::select! {
                ev = rx.recv() => {
                    // Take what else has already arrived too: one write (and one wake-up of
                    // the writer thread) per batch instead of per frame.
                    let mut job = OutJob::default();
                    let mut next = ev;
                    let end = loop {
                        if let Some(o) = absorb(&mut dec, next, &mut job) {
                            break Some(o);
                        }
                        if job.consume >= OUTPUT_BATCH {
                            break None;
                        }
                        match rx.try_recv() {
                            Ok(ev) => next = Some(ev),
                            Err(mpsc::error::TryRecvError::Empty) => break None,
                            Err(mpsc::error::TryRecvError::Disconnected) => next = None,
                        }
                    };
                    output.send(job);
                    if let Some(o) = end {
                        break o;
                    }
                }
                inc = incoming.recv() => match inc {
                    Some(Incoming::Request { ch, kind, params }) => self.on_request(ch, kind, &params),
                    Some(Incoming::Closed(reason)) => break Outcome::Failed(reason.to_string()),
                    None => break Outcome::Failed(CloseReason::TransportClosed.to_string()),
                    Some(_) => {}
                },
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    if let Some(size) = window_size(io::stdin()).or_else(|| window_size(io::stdout())) {
                        let _ = resize_tx.send(Msg::WindowChange(size).to_vec());
                    }
                }
                Some(()) = disconnect.recv() => break Outcome::Disconnected,
                Some(()) = broken.recv() => break Outcome::Signal(SIGPIPE),
                sig = signals.recv() => break Outcome::Signal(sig),
            }
        };
        // Everything received is written before we go on.
        output.finish().await;
        drop(terminal);
        match outcome {
            Outcome::Exit(code) => {
                self.close(incoming).await;
                Ok(code)
            }
            Outcome::Signal(sig) => {
                tx.close(CloseCode::Normal, "interrupted");
                self.close(incoming).await;
                Ok(128 + sig)
            }
            Outcome::Disconnected => {
                tx.close(CloseCode::Normal, "disconnected");
                self.close(incoming).await;
                eprintln!("Connection to {} closed.", self.peer);
                Ok(EXIT_FAILURE)
            }
            Outcome::Failed(reason) => Err(self.lost(reason)),
        }
    }
}

/// Channel bytes gathered into one output batch before it goes to the writer.
pub const OUTPUT_BATCH: usize = 256 * 1024;

/// Output to write: ranges of the received blocks for stdout or stderr, then `consume` bytes
/// of window to give back.
#[derive(Default)]
struct OutJob {
    bufs: Vec<Payload>,
    pieces: Vec<(usize, Stream, std::ops::Range<usize>)>,
    consume: usize,
}

/// Adds one channel event to `job`; returns how the session ends if this event ends it.
fn absorb(dec: &mut MsgDecoder, ev: Option<ChannelEvent>, job: &mut OutJob) -> Option<Outcome> {
    let data = match ev {
        Some(ChannelEvent::Data(d)) => d,
        Some(ChannelEvent::Eof) => return None,
        Some(ChannelEvent::Closed { reason, .. }) => {
            return Some(Outcome::Failed(if reason.is_empty() {
                "the remote command ended without an exit status".into()
            } else {
                reason
            }))
        }
        None => return Some(Outcome::Failed("session ended".into())),
    };
    job.consume += data.len();
    let pieces = match dec.split(&data) {
        Ok(p) => p,
        Err(e) => {
            return Some(Outcome::Failed(format!(
                "malformed message from the peer: {e}"
            )))
        }
    };
    let idx = job.bufs.len();
    job.bufs.push(data);
    let mut end = None;
    for p in pieces {
        match p {
            Piece::Data(s @ (Stream::Stdout | Stream::Stderr), r) => job.pieces.push((idx, s, r)),
            Piece::Eof(_) => {}
            Piece::ExitStatus(c) => end = Some(Outcome::Exit((c & 0xff) as i32)),
            Piece::ExitSignal {
                signal,
                core_dumped,
            } => {
                debug!(
                    "remote command killed by signal {signal}{}",
                    if core_dumped { " (core dumped)" } else { "" }
                );
                end = Some(Outcome::Exit(128 + i32::from(signal)));
            }
            other => {
                return Some(Outcome::Failed(format!(
                    "unexpected message from the peer: {other:?}"
                )))
            }
        }
    }
    end
}

/// Writes every slice, with as few system calls as the kernel allows.
fn write_all_slices(f: &mut File, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match f.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes remote output on a thread with plain blocking writes (our stdout may be a slow
/// pipe or a terminal) and returns window after each write.
struct OutputWriter {
    jobs: std::sync::mpsc::Sender<OutJob>,
    thread: std::thread::JoinHandle<()>,
}

impl OutputWriter {
    fn start(tx: ChannelSender, broken: mpsc::UnboundedSender<()>) -> io::Result<Self> {
        let mut out = File::from(rustix::io::dup(io::stdout())?);
        let mut err = File::from(rustix::io::dup(io::stderr())?);
        let _ = rustix::pipe::fcntl_setpipe_size(&out, LOCAL_PIPE_SIZE);
        let (jobs, rx) = std::sync::mpsc::channel::<OutJob>();
        let thread = std::thread::Builder::new()
            .name("qssh-output".into())
            .spawn(move || {
                let mut stdout_ok = true;
                for job in rx {
                    let mut i = 0;
                    while i < job.pieces.len() {
                        let stream = job.pieces[i].1;
                        let run = job.pieces[i..].iter().take_while(|p| p.1 == stream).count();
                        let mut slices: Vec<io::IoSlice<'_>> = job.pieces[i..i + run]
                            .iter()
                            .map(|(b, _, r)| io::IoSlice::new(&job.bufs[*b][r.clone()]))
                            .collect();
                        i += run;
                        let res = match stream {
                            Stream::Stdout if stdout_ok => write_all_slices(&mut out, &mut slices),
                            Stream::Stdout => Ok(()),
                            _ => write_all_slices(&mut err, &mut slices),
                        };
                        if let Err(e) = res {
                            if stream == Stream::Stdout {
                                debug!("stdout: {e}");
                                stdout_ok = false;
                                let _ = broken.send(());
                            }
                        }
                    }
                    tx.consumed(job.consume);
                    for b in job.bufs {
                        tx.recycle(b);
                    }
                }
            })?;
        Ok(OutputWriter { jobs, thread })
    }

    fn send(&self, job: OutJob) {
        let _ = self.jobs.send(job);
    }

    /// Waits until everything sent was written.
    async fn finish(self) {
        drop(self.jobs);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// The `~` escapes of terminal sessions, recognized right after a newline as in ssh.
#[derive(Debug)]
struct Escapes {
    at_line_start: bool,
    after_tilde: bool,
}

/// What the user asked for with an escape.
#[derive(Debug, PartialEq, Eq)]
enum Escape {
    Disconnect,
    Help,
}

const ESCAPE_HELP: &str = "Supported escape sequences:\r\n ~.  - terminate connection\r\n ~?  - this message\r\n ~~  - send the escape character\r\n(Note that escapes are only recognized immediately after newline.)\r\n";

impl Default for Escapes {
    fn default() -> Self {
        Escapes {
            at_line_start: true,
            after_tilde: false,
        }
    }
}

impl Escapes {
    /// Copies `input` to `out` without the escapes; returns the first action requested.
    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<Escape> {
        let mut action = None;
        for &b in input {
            if self.after_tilde {
                self.after_tilde = false;
                match b {
                    b'.' => return Some(Escape::Disconnect),
                    b'?' => {
                        action.get_or_insert(Escape::Help);
                        self.at_line_start = true;
                        continue;
                    }
                    ESCAPE_CHAR => {
                        out.push(ESCAPE_CHAR);
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(ESCAPE_CHAR),
                }
            } else if b == ESCAPE_CHAR && self.at_line_start {
                self.after_tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        action
    }
}

/// Reads local stdin on a thread and sends it as STDIN messages, then stdin's EOF. On a
/// terminal session the escapes are handled here.
fn start_stdin(
    tx: ChannelSender,
    escapes: bool,
    disconnect: mpsc::UnboundedSender<()>,
) -> io::Result<()> {
    let input = File::from(rustix::io::dup(io::stdin())?);
    let _ = rustix::pipe::fcntl_setpipe_size(&input, LOCAL_PIPE_SIZE);
    let rt = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("qssh-stdin".into())
        .spawn(move || {
            let ended = if escapes {
                stdin_with_escapes(&input, &tx, &rt, &disconnect)
            } else {
                stdin_records(&input, &tx, &rt)
            };
            if ended {
                let _ = rt.block_on(tx.send(Msg::Eof(Stream::Stdin).to_vec()));
            }
        })?;
    Ok(())
}

/// Bytes one read of stdin gave, retried when a signal interrupts it; 0 at its end, and
/// after an error (logged), which ends it too.
fn read_stdin(mut read: impl FnMut() -> rustix::io::Result<usize>) -> usize {
    loop {
        match read() {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                debug!("stdin: {e}");
                return 0;
            }
            Ok(n) => return n,
        }
    }
}

/// Sends stdin read straight into records until its end (true) or until the channel refuses
/// data (false).
fn stdin_records(input: &File, tx: &ChannelSender, rt: &tokio::runtime::Handle) -> bool {
    let mut reads = RecordReads::new(Stream::Stdin);
    loop {
        let n = read_stdin(|| rustix::io::readv(input, &mut reads.slices()));
        if n == 0 {
            return true;
        }
        match rt.block_on(tx.send_records(reads.filled(n))) {
            Ok(back) => reads.refill(back),
            Err(e) => {
                debug!("stdin: channel refused data: {e}");
                return false;
            }
        }
    }
}

/// Sends a terminal's input, with the escapes handled, until its end (true), a disconnect
/// escape or the channel refusing data (false).
fn stdin_with_escapes(
    input: &File,
    tx: &ChannelSender,
    rt: &tokio::runtime::Handle,
    disconnect: &mpsc::UnboundedSender<()>,
) -> bool {
    let mut esc = Escapes::default();
    // One buffer for the whole stream: the session hands it back after each send.
    let mut buf = Vec::with_capacity(MSG_HEADER + STDIN_READ_CHUNK);
    loop {
        buf.clear();
        buf.extend_from_slice(&[0; MSG_HEADER]);
        let n = read_stdin(|| rustix::io::read(input, rustix::buffer::spare_capacity(&mut buf)));
        if n == 0 {
            return true;
        }
        let mut clean = Vec::with_capacity(n);
        match esc.filter(&buf[MSG_HEADER..], &mut clean) {
            Some(Escape::Disconnect) => {
                let _ = disconnect.send(());
                return false;
            }
            Some(Escape::Help) => {
                let _ = io::stderr().write_all(ESCAPE_HELP.as_bytes());
            }
            None => {}
        }
        buf.truncate(MSG_HEADER);
        buf.extend_from_slice(&clean);
        let len = buf.len() - MSG_HEADER;
        if len == 0 {
            continue;
        }
        buf[..MSG_HEADER].copy_from_slice(&data_header(Stream::Stdin, len));
        match rt.block_on(tx.send(buf)) {
            Ok(back) => buf = back,
            Err(e) => {
                debug!("stdin: channel refused data: {e}");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[&[u8]]) -> (Vec<u8>, Vec<Option<Escape>>) {
        let mut e = Escapes::default();
        let mut out = Vec::new();
        let actions = input.iter().map(|i| e.filter(i, &mut out)).collect();
        (out, actions)
    }

    #[test]
    fn escapes_after_newline_only() {
        assert_eq!(run(&[b"~."]).1, vec![Some(Escape::Disconnect)]);
        assert_eq!(
            run(&[b"ls\r", b"~", b"."]).1,
            vec![None, None, Some(Escape::Disconnect)]
        );
        // Not at the start of a line: passed through.
        let (out, acts) = run(&[b"a~.b"]);
        assert_eq!((out.as_slice(), acts), (&b"a~.b"[..], vec![None]));
        // ~~ sends one ~; ~x sends both.
        assert_eq!(run(&[b"~~"]).0, b"~");
        assert_eq!(run(&[b"\n~x"]).0, b"\n~x");
        let (out, acts) = run(&[b"~?"]);
        assert!(out.is_empty());
        assert_eq!(acts, vec![Some(Escape::Help)]);
    }

    #[test]
    fn locale_env_is_bounded_and_valid() {
        for (k, v) in locale_env() {
            assert!(k == "LANG" || k.starts_with("LC_"));
            assert!(!v.contains(&0));
        }
        assert!(locale_env().len() <= MAX_ENV_VARS);
    }
}
