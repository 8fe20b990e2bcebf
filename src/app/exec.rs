//! Listener side of shell and exec channels: run the command as the user who runs the
//! listener (no privilege switch, like mosh-server), on plain pipes or on a pseudo-terminal,
//! and carry its streams and exit status over the channel (docs/protocol-services.md).
//!
//! Flow control stays honest in both directions: stdin bytes are given back to the peer's
//! window only after they were written to the command, and output is read from the command
//! only as fast as the channel takes it, so a command writing faster than the peer reads
//! blocks on its pipe instead of growing a buffer here.
//!
//! When the peer goes away first (channel closed, session lost) the command's process group
//! gets SIGHUP, as a terminal hang-up would deliver.

use super::cmdio::{self, Job};
use super::pty::{set_window_size, Pty, PTY_HELPER, SELF_EXE};
use super::router::{Channel, ChannelEvent, ChannelSender, RouterHandle};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::PeerId;
use crate::core::service::{
    data_header, CommandParams, Msg, MsgDecoder, Piece, Stream, MSG_HEADER,
};
use std::ffi::{OsStr, OsString};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Kernel buffer asked for the command's pipes: about one bulk read (`BULK_READ_CHUNK`);
/// 1 MiB pipes cost about 7 % more CPU per byte in the exec benchmark (likely their pages
/// leave the caches between writer and reader), 64 and 128 KiB ones more wake-ups
/// (bench/README, session 12).
pub const CHILD_PIPE_SIZE: usize = 256 * 1024;
/// Bytes read from a PTY master per message.
pub const PTY_READ_CHUNK: usize = 64 * 1024;
/// After the command on a PTY exited, output is drained until the terminal reports its end
/// or stays silent this long (a background job may keep the terminal open).
pub const PTY_DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Shell used when neither `$SHELL` nor the password database names one.
pub const FALLBACK_SHELL: &str = "/bin/sh";
/// `TERM` on a PTY when the client sent none.
pub const DEFAULT_TERM: &str = "dumb";
/// Variables of the listener's environment that describe the listener's own terminal
/// session and would mislead the command.
const DROPPED_ENV: [&str; 3] = ["TMUX", "TMUX_PANE", "QSSH_LOG"];

/// Environment variables a client may set, besides TERM (sshd's usual `AcceptEnv LANG LC_*`).
pub fn accepted_env(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_") || name == "COLORTERM"
}

/// Who asked for the channel, for the command's environment and the logs.
#[derive(Debug, Clone)]
pub struct Requester {
    pub peer: PeerId,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// Why a command could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("cannot allocate a pseudo-terminal: {0}")]
    Pty(io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
}

/// The user's shell: `$SHELL`, else the password database entry of our uid, else /bin/sh.
pub fn user_shell() -> PathBuf {
    if let Some(s) = std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
        return s.into();
    }
    let uid = rustix::process::getuid().as_raw().to_string();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() == 7 && f[2] == uid && !f[6].is_empty()).then(|| PathBuf::from(f[6]))
            })
        })
        .unwrap_or_else(|| PathBuf::from(FALLBACK_SHELL))
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .filter(|h| h.is_dir())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The listener's end of a command's PTY. tokio's `AsyncFd` constructor is `unsafe` (or
/// deprecated) since tokio 1.54, so the non-blocking master is read through tokio's pipe
/// type, whose unchecked constructor is safe: for readiness and reads a PTY master behaves
/// like a pipe (a hang-up reads as EIO, handled as the end).
struct Master {
    reader: pipe::Receiver,
    /// For input (on the stdin thread, [`cmdio`]) and window size changes.
    control: OwnedFd,
}

/// A started command: on pipes, or on a PTY whose master we keep.
enum Started {
    Pipes(Child),
    Pty(Child, Master),
}

/// Builds and starts the command for a validated request.
fn start(p: &CommandParams, who: &Requester) -> Result<Started, SpawnError> {
    let shell = user_shell();
    let base: OsString = shell
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_else(|| shell.clone().into_os_string());
    let line = p.command_line();
    // sshd's conventions: a shell is a login shell ("-bash"), a command runs with `-c`.
    let (argv0, args): (OsString, Vec<OsString>) = if p.argv.is_empty() {
        let mut login = OsString::from("-");
        login.push(&base);
        (login, Vec::new())
    } else {
        (
            base,
            vec!["-c".into(), OsStr::from_bytes(&line).to_os_string()],
        )
    };
    let spawn_err = |source| SpawnError::Spawn {
        program: shell.display().to_string(),
        source,
    };
    let mut cmd;
    let mut master = None;
    if let Some(size) = p.pty {
        let pty = Pty::open(size).map_err(SpawnError::Pty)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(SpawnError::Pty);
        cmd = tokio::process::Command::new(SELF_EXE);
        cmd.arg(PTY_HELPER)
            .arg(&shell)
            .arg(&argv0)
            .args(&args)
            .stdin(dup(&pty.slave)?)
            .stdout(dup(&pty.slave)?)
            .stderr(Stdio::from(pty.slave));
        cmd.env(
            "TERM",
            if p.term.is_empty() {
                DEFAULT_TERM
            } else {
                &p.term
            },
        );
        rustix::io::ioctl_fionbio(&pty.master, true).map_err(|e| SpawnError::Pty(e.into()))?;
        master = Some(Master {
            reader: pipe::Receiver::from_owned_fd_unchecked(
                pty.master.try_clone().map_err(SpawnError::Pty)?,
            )
            .map_err(SpawnError::Pty)?,
            control: pty.master,
        });
    } else {
        cmd = tokio::process::Command::new(&shell);
        cmd.arg0(&argv0)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C on the listener's terminal is not for it, and
            // a hang-up reaches everything it started.
            .process_group(0);
        if p.term.is_empty() {
            cmd.env_remove("TERM");
        } else {
            cmd.env("TERM", &p.term);
        }
    }
    for v in DROPPED_ENV {
        cmd.env_remove(v);
    }
    for (name, value) in &p.env {
        if accepted_env(name) {
            cmd.env(name, OsStr::from_bytes(value));
        }
    }
    cmd.env("QSSH_PEER", who.peer.to_string()).env(
        "QSSH_CONNECTION",
        format!(
            "{} {} {} {}",
            who.remote.ip(),
            who.remote.port(),
            who.local.ip(),
            who.local.port()
        ),
    );
    cmd.current_dir(home_dir());
    let child = cmd.spawn().map_err(spawn_err)?;
    // The parent's copies of the PTY slave go with `cmd`: the master then sees the end of
    // the terminal when the command and its children have closed it.
    drop(cmd);
    Ok(match master {
        Some(m) => Started::Pty(child, m),
        None => {
            for fd in [
                child.stdout.as_ref().map(|s| s as &dyn std::os::fd::AsFd),
                child.stderr.as_ref().map(|s| s as &dyn std::os::fd::AsFd),
                child.stdin.as_ref().map(|s| s as &dyn std::os::fd::AsFd),
            ]
            .into_iter()
            .flatten()
            {
                let _ = rustix::pipe::fcntl_setpipe_size(fd.as_fd(), CHILD_PIPE_SIZE);
            }
            Started::Pipes(child)
        }
    })
}

/// Serves an authorized shell or exec request: validates the parameters, starts the
/// command, accepts the channel and runs it to the end. Refuses the channel (with the reason
/// the peer will print) if the request is malformed or the command cannot be started.
pub async fn serve(
    router: RouterHandle,
    ch: u32,
    kind: ChannelKind,
    params: Vec<u8>,
    who: Requester,
) {
    let p = match CommandParams::decode(&params) {
        Ok(p) if (kind == ChannelKind::Shell) == p.argv.is_empty() => p,
        Ok(_) => {
            router.reject(
                ch,
                CloseCode::Unsupported,
                "a shell takes no command; exec needs one",
            );
            return;
        }
        Err(e) => {
            warn!(peer = %who.peer, "malformed {kind:?} parameters: {e}");
            router.reject(
                ch,
                CloseCode::Unsupported,
                &format!("malformed parameters: {e}"),
            );
            return;
        }
    };
    let started = match start(&p, &who) {
        Ok(s) => s,
        Err(e) => {
            warn!(peer = %who.peer, "{kind:?}: {e}");
            router.reject(ch, CloseCode::Error, &e.to_string());
            return;
        }
    };
    let channel = router.accept(ch, kind);
    let line = String::from_utf8_lossy(&p.command_line()).into_owned();
    match started {
        Started::Pipes(child) => {
            info!(peer = %who.peer, pid = ?child.id(), "exec: {line}");
            run_pipes(channel, child).await;
        }
        Started::Pty(child, master) => {
            info!(peer = %who.peer, pid = ?child.id(), "{} on a terminal: {line}", if line.is_empty() { "shell" } else { "exec" });
            run_pty(channel, child, master).await;
        }
    }
}

/// Sends SIGHUP to the command's process group when dropped, unless disarmed after the
/// command was reaped (its id could be reused then).
struct Hangup(Option<rustix::process::Pid>);

impl Hangup {
    fn new(child: &Child) -> Self {
        Hangup(
            child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id as i32)),
        )
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Hangup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            debug!("hanging up process group {}", pid.as_raw_nonzero());
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::HUP);
        }
    }
}

/// Reads the peer's messages until the channel is gone: stdin goes to the writer in order,
/// window changes are applied at once. Returns when the channel closed or broke.
async fn input_loop(
    mut rx: mpsc::UnboundedReceiver<ChannelEvent>,
    jobs: mpsc::UnboundedSender<Job>,
    tx: ChannelSender,
    pty: Option<OwnedFd>,
) {
    let mut dec = MsgDecoder::default();
    let mut stdin_done = false;
    while let Some(ev) = rx.recv().await {
        let data = match ev {
            ChannelEvent::Data(d) => d,
            ChannelEvent::Eof => continue,
            ChannelEvent::Closed { .. } => return,
        };
        let pieces = match dec.split(&data) {
            Ok(p) => p,
            Err(e) => {
                tx.close(
                    CloseCode::Protocol,
                    &format!("malformed channel message: {e}"),
                );
                return;
            }
        };
        let mut ranges = Vec::new();
        let mut eof = false;
        for piece in pieces {
            match piece {
                Piece::Data(Stream::Stdin, r) if !stdin_done => ranges.push(r),
                Piece::Eof(Stream::Stdin) if !stdin_done => {
                    stdin_done = true;
                    eof = true;
                }
                Piece::WindowChange(ws) => {
                    if let Some(m) = &pty {
                        let _ = set_window_size(m, ws);
                    }
                }
                other => {
                    tx.close(
                        CloseCode::Protocol,
                        &format!("unexpected message from the client: {other:?}"),
                    );
                    return;
                }
            }
        }
        let consume = data.len();
        if ranges.is_empty() {
            tx.consumed_buffer(consume, data);
        } else {
            let _ = jobs.send(Job::Data {
                buf: data,
                ranges,
                consume,
            });
        }
        if eof {
            let _ = jobs.send(Job::Eof);
        }
    }
}

fn exit_message(st: std::process::ExitStatus) -> Msg<'static> {
    match (st.code(), st.signal()) {
        (Some(code), _) => Msg::ExitStatus(code as u32 & 0xff),
        (None, Some(sig)) => Msg::ExitSignal {
            signal: sig as u8,
            core_dumped: st.core_dumped(),
        },
        (None, None) => Msg::ExitStatus(255),
    }
}

/// Final messages once the command is done: its exit status, then the channel's close.
async fn finish(tx: &ChannelSender, status: io::Result<std::process::ExitStatus>, delivered: bool) {
    match status {
        Ok(st) => {
            debug!("command ended: {st}");
            if delivered {
                let _ = tx.send(exit_message(st).to_vec()).await;
            }
            tx.close(CloseCode::Normal, "");
        }
        Err(e) => tx.close(
            CloseCode::Error,
            &format!("cannot wait for the command: {e}"),
        ),
    }
}

/// Runs a command's three halves until it ends: `output` (its output pumped to the peer,
/// then its exit status) finishes the channel; the peer leaving first (`input` ends) hangs
/// up, which `hangup` does on drop; `writer` (stdin) may end any time before either.
async fn supervise(
    input: impl std::future::Future<Output = ()>,
    writer: impl std::future::Future<Output = ()>,
    output: impl std::future::Future<Output = (bool, io::Result<std::process::ExitStatus>)>,
    tx: &ChannelSender,
    mut hangup: Hangup,
) {
    tokio::pin!(input, writer, output);
    let mut writer_done = false;
    loop {
        tokio::select! {
            (delivered, status) = &mut output => {
                hangup.disarm();
                finish(tx, status, delivered).await;
                return;
            }
            _ = &mut input => {
                debug!("peer left before the command ended: hanging up");
                return;
            }
            _ = &mut writer, if !writer_done => writer_done = true,
        }
    }
}

async fn run_pipes(channel: Channel, mut child: Child) {
    let hangup = Hangup::new(&child);
    let (tx, rx) = channel.split();
    // As plain non-blocking pipes, served on threads (cmdio).
    let stdin = child.stdin.take().and_then(|i| i.into_owned_fd().ok());
    let stdout = child.stdout.take().and_then(|o| o.into_owned_fd().ok());
    let stderr = child.stderr.take().and_then(|e| e.into_owned_fd().ok());
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let input = input_loop(rx, jobs_tx, tx.clone(), None);
    let writer = cmdio::write_stdin(stdin, true, jobs_rx, tx.clone());
    let output = async {
        let (a, b) = tokio::join!(
            cmdio::send_output(stdout, Stream::Stdout, tx.clone()),
            cmdio::send_output(stderr, Stream::Stderr, tx.clone())
        );
        (a.is_ok() && b.is_ok(), child.wait().await)
    };
    supervise(input, writer, output, &tx, hangup).await;
}

async fn run_pty(channel: Channel, mut child: Child, master: Master) {
    let hangup = Hangup::new(&child);
    let Master {
        mut reader,
        control,
    } = master;
    let (tx, rx) = channel.split();
    let input_fd = control
        .try_clone()
        .inspect_err(|e| warn!("cannot write to the terminal: {e}"))
        .ok();
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let input = input_loop(rx, jobs_tx, tx.clone(), Some(control));
    let writer = cmdio::write_stdin(input_fd, false, jobs_rx, tx.clone());
    let output = async {
        let mut status = None;
        let mut delivered = true;
        let wait = child.wait();
        tokio::pin!(wait);
        loop {
            let mut buf = Vec::with_capacity(MSG_HEADER + PTY_READ_CHUNK);
            buf.extend_from_slice(&[0; MSG_HEADER]);
            tokio::select! {
                st = &mut wait, if status.is_none() => status = Some(st),
                r = reader.read_buf(&mut buf) => match r {
                    Ok(0) => break,
                    Ok(n) => {
                        buf[..MSG_HEADER].copy_from_slice(&data_header(Stream::Stdout, n));
                        if tx.send(buf).await.is_err() {
                            delivered = false;
                            break;
                        }
                    }
                    // EIO: every holder of the terminal closed it.
                    Err(e) => {
                        debug!("terminal ended: {e}");
                        break;
                    }
                },
                _ = tokio::time::sleep(PTY_DRAIN_GRACE), if status.is_some() => break,
            }
        }
        if delivered {
            delivered = tx.send(Msg::Eof(Stream::Stdout).to_vec()).await.is_ok()
                && tx.send(Msg::Eof(Stream::Stderr).to_vec()).await.is_ok();
        }
        let status = match status {
            Some(s) => s,
            None => wait.await,
        };
        (delivered, status)
    };
    supervise(input, writer, output, &tx, hangup).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_environment_is_locale_only() {
        for ok in ["LANG", "LC_ALL", "LC_CTYPE", "COLORTERM"] {
            assert!(accepted_env(ok), "{ok}");
        }
        for no in ["LD_PRELOAD", "PATH", "BASH_ENV", "HOME", "SHELL"] {
            assert!(!accepted_env(no), "{no}");
        }
    }

    #[test]
    fn exit_statuses_map_to_messages() {
        use std::os::unix::process::ExitStatusExt;
        let code = std::process::ExitStatus::from_raw(42 << 8);
        assert_eq!(exit_message(code), Msg::ExitStatus(42));
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(
            exit_message(killed),
            Msg::ExitSignal {
                signal: 9,
                core_dumped: false
            }
        );
    }
}
