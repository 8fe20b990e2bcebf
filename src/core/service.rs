//! Wire formats of the service channels (docs/protocol-services.md): the OPEN parameters of
//! shell, exec and forwarding channels, and the typed messages inside shell/exec channels.
//!
//! Everything here is sans-IO and bounded: every decoder checks lengths against the named
//! limits in [`super::limits`] before it copies, and the message decoder streams data bodies
//! out in the pieces they arrived in, so it never holds more than one small header.

use super::codec::{DecodeError, Reader, Writer};
use super::limits::{
    MAX_CHANNEL_PARAMS, MAX_ENV_NAME, MAX_ENV_VALUE, MAX_ENV_VARS, MAX_EXEC_ARGS, MAX_EXEC_DATA,
    MAX_HOST_NAME, MAX_TERM_NAME,
};
use thiserror::Error;

/// Why parameters could not be encoded (they are checked against the same limits a peer
/// enforces, so a request we build is never refused for its size by a correct peer).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamsError {
    #[error(
        "remote command too long ({0} bytes of parameters; the limit is {MAX_CHANNEL_PARAMS})"
    )]
    TooLong(usize),
    #[error("too many command words ({0}; the limit is {MAX_EXEC_ARGS})")]
    TooManyArgs(usize),
    #[error("{0}")]
    Invalid(String),
}

/// A terminal's size in characters and pixels (pixels are 0 when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
    pub width_px: u16,
    pub height_px: u16,
}

impl WindowSize {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u16(self.cols)
            .u16(self.rows)
            .u16(self.width_px)
            .u16(self.height_px);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(WindowSize {
            cols: r.u16()?,
            rows: r.u16()?,
            width_px: r.u16()?,
            height_px: r.u16()?,
        })
    }
}

const FLAG_PTY: u8 = 1;

/// OPEN parameters of a shell (kind 2) or exec (kind 3) channel:
///
/// `flags u8 (bit 0: pty) | cols u16 | rows u16 | width_px u16 | height_px u16 |
///  vec16(term) | n_env u8 | n_env × (vec16(name) vec16(value)) | argc u16 | argc × vec16(arg)`
///
/// A shell has no words; an exec request has at least one. The listener runs the words
/// joined by single spaces with its user's shell (`$SHELL -c LINE`), exactly as sshd does,
/// so `qssh exec host 'ls *.txt | wc -l'` means what it means with ssh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandParams {
    /// A pseudo-terminal of this size, or plain pipes.
    pub pty: Option<WindowSize>,
    /// `TERM` for the remote side (empty: not set).
    pub term: String,
    /// Environment the client asks for (the listener takes only the names it accepts).
    pub env: Vec<(String, Vec<u8>)>,
    /// The command words (empty for a shell).
    pub argv: Vec<Vec<u8>>,
}

fn valid_term(t: &str) -> bool {
    t.len() <= MAX_TERM_NAME && t.bytes().all(|b| b.is_ascii_graphic())
}

/// Environment variable names: `[A-Za-z_][A-Za-z0-9_]*`, at most MAX_ENV_NAME bytes.
pub fn valid_env_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && n.len() <= MAX_ENV_NAME
}

impl CommandParams {
    pub fn encode(&self) -> Result<Vec<u8>, ParamsError> {
        if !valid_term(&self.term) {
            return Err(ParamsError::Invalid(format!(
                "TERM {:?} is not a terminal name",
                self.term
            )));
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(ParamsError::Invalid(format!(
                "too many environment variables ({}; the limit is {MAX_ENV_VARS})",
                self.env.len()
            )));
        }
        for (name, value) in &self.env {
            if !valid_env_name(name) || value.len() > MAX_ENV_VALUE || value.contains(&0) {
                return Err(ParamsError::Invalid(format!(
                    "environment variable {name:?} cannot be sent"
                )));
            }
        }
        if self.argv.len() > MAX_EXEC_ARGS {
            return Err(ParamsError::TooManyArgs(self.argv.len()));
        }
        // flags 1, window size 8, TERM length 2, env count 1, argc 2.
        let total: usize = 14
            + self.term.len()
            + self
                .env
                .iter()
                .map(|(n, v)| 4 + n.len() + v.len())
                .sum::<usize>()
            + self.argv.iter().map(|a| 2 + a.len()).sum::<usize>();
        if total > MAX_CHANNEL_PARAMS {
            return Err(ParamsError::TooLong(total));
        }
        if self.argv.iter().any(|a| a.contains(&0)) {
            return Err(ParamsError::Invalid(
                "the remote command contains a NUL byte".into(),
            ));
        }
        let mut out = Vec::with_capacity(total);
        let mut w = Writer::new(&mut out);
        w.u8(if self.pty.is_some() { FLAG_PTY } else { 0 });
        self.pty.unwrap_or_default().encode(&mut w);
        w.vec16(self.term.as_bytes());
        w.u8(self.env.len() as u8);
        for (name, value) in &self.env {
            w.vec16(name.as_bytes()).vec16(value);
        }
        w.u16(self.argv.len() as u16);
        for a in &self.argv {
            w.vec16(a);
        }
        debug_assert_eq!(out.len(), total);
        Ok(out)
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() > MAX_CHANNEL_PARAMS {
            return Err(DecodeError::TooLong(buf.len(), MAX_CHANNEL_PARAMS));
        }
        let mut r = Reader::new(buf);
        let flags = r.u8()?;
        if flags & !FLAG_PTY != 0 {
            return Err(DecodeError::Invalid("command flags"));
        }
        let size = WindowSize::decode(&mut r)?;
        let term = std::str::from_utf8(r.vec16(MAX_TERM_NAME)?)
            .ok()
            .filter(|t| valid_term(t))
            .ok_or(DecodeError::Invalid("terminal name"))?
            .to_string();
        let n_env = r.u8()? as usize;
        if n_env > MAX_ENV_VARS {
            return Err(DecodeError::TooLong(n_env, MAX_ENV_VARS));
        }
        let mut env = Vec::with_capacity(n_env);
        for _ in 0..n_env {
            let name = std::str::from_utf8(r.vec16(MAX_ENV_NAME)?)
                .ok()
                .filter(|n| valid_env_name(n))
                .ok_or(DecodeError::Invalid("environment variable name"))?
                .to_string();
            let value = r.vec16(MAX_ENV_VALUE)?;
            if value.contains(&0) {
                return Err(DecodeError::Invalid("environment variable value"));
            }
            env.push((name, value.to_vec()));
        }
        let argc = r.u16()? as usize;
        if argc > MAX_EXEC_ARGS {
            return Err(DecodeError::TooLong(argc, MAX_EXEC_ARGS));
        }
        let mut argv = Vec::with_capacity(argc.min(r.remaining() / 2));
        for _ in 0..argc {
            let a = r.vec16(MAX_CHANNEL_PARAMS)?;
            if a.contains(&0) {
                return Err(DecodeError::Invalid("command word"));
            }
            argv.push(a.to_vec());
        }
        r.finish()?;
        Ok(CommandParams {
            pty: (flags & FLAG_PTY != 0).then_some(size),
            term,
            env,
            argv,
        })
    }

    /// The command line the listener's shell runs: the words joined by single spaces.
    pub fn command_line(&self) -> Vec<u8> {
        self.argv.join(&b' ')
    }
}

fn host(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let h = r.vec16(MAX_HOST_NAME)?;
    std::str::from_utf8(h)
        .ok()
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .ok_or(DecodeError::Invalid("host name"))
}

fn check_host(h: &str) -> Result<(), ParamsError> {
    if h.len() > MAX_HOST_NAME || !h.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ParamsError::Invalid(format!(
            "{h:?} is not a host name or address"
        )));
    }
    Ok(())
}

/// OPEN parameters of a direct forward (kind 4, `-L`): the opener asks the peer to connect to
/// `host:port`; the originator is the address the local connection came from (for logs).
///
/// `vec16(host) | port u16 | vec16(originator) | originator_port u16`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardParams {
    pub host: String,
    pub port: u16,
    pub originator: String,
    pub originator_port: u16,
}

impl ForwardParams {
    pub fn encode(&self) -> Result<Vec<u8>, ParamsError> {
        check_host(&self.host)?;
        check_host(&self.originator)?;
        let mut out = Vec::new();
        Writer::new(&mut out)
            .vec16(self.host.as_bytes())
            .u16(self.port)
            .vec16(self.originator.as_bytes())
            .u16(self.originator_port);
        Ok(out)
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let p = ForwardParams {
            host: host(&mut r)?,
            port: r.u16()?,
            originator: host(&mut r)?,
            originator_port: r.u16()?,
        };
        r.finish()?;
        Ok(p)
    }
}

const REVERSE_LISTEN: u8 = 1;
const REVERSE_CONNECTION: u8 = 2;

/// OPEN parameters of a reverse-forward channel (kind 5, `-R`), which has two uses:
///
/// - `LISTEN` (`1 | vec16(bind) | port u16`), opened by the client: the listener binds
///   `bind:port` (port 0: any) and keeps listening while this control channel is open. Its
///   first and only message on the channel is the bound port, `u16`.
/// - `CONNECTION` (`2 | forward u32 | vec16(originator) | originator_port u16`), opened by
///   the listener for each connection it accepted: `forward` is the id of the client's
///   LISTEN channel, so the client knows which local `host:port` to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReverseParams {
    Listen {
        bind: String,
        port: u16,
    },
    Connection {
        forward: u32,
        originator: String,
        originator_port: u16,
    },
}

impl ReverseParams {
    pub fn encode(&self) -> Result<Vec<u8>, ParamsError> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        match self {
            ReverseParams::Listen { bind, port } => {
                check_host(bind)?;
                w.u8(REVERSE_LISTEN).vec16(bind.as_bytes()).u16(*port);
            }
            ReverseParams::Connection {
                forward,
                originator,
                originator_port,
            } => {
                check_host(originator)?;
                w.u8(REVERSE_CONNECTION)
                    .u32(*forward)
                    .vec16(originator.as_bytes())
                    .u16(*originator_port);
            }
        }
        Ok(out)
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let p = match r.u8()? {
            REVERSE_LISTEN => ReverseParams::Listen {
                bind: host(&mut r)?,
                port: r.u16()?,
            },
            REVERSE_CONNECTION => ReverseParams::Connection {
                forward: r.u32()?,
                originator: host(&mut r)?,
                originator_port: r.u16()?,
            },
            _ => return Err(DecodeError::Invalid("reverse forward operation")),
        };
        r.finish()?;
        Ok(p)
    }
}

/// Which byte stream of a remote command a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
}

impl Stream {
    fn from_u8(v: u8) -> Option<Self> {
        [Stream::Stdin, Stream::Stdout, Stream::Stderr]
            .into_iter()
            .find(|s| *s as u8 == v)
    }
    fn data_type(self) -> u8 {
        match self {
            Stream::Stdin => T_STDIN,
            Stream::Stdout => T_STDOUT,
            Stream::Stderr => T_STDERR,
        }
    }
}

/// Message types inside shell/exec channels: `type u8 | len u32 | body[len]`.
const T_STDIN: u8 = 1;
const T_STDOUT: u8 = 2;
const T_STDERR: u8 = 3;
const T_EOF: u8 = 4;
const T_WINDOW_CHANGE: u8 = 5;
const T_EXIT_STATUS: u8 = 6;
const T_EXIT_SIGNAL: u8 = 7;

/// Bytes of a message header.
pub const MSG_HEADER: usize = 5;
/// Largest control message body (WINDOW_CHANGE).
const MAX_CONTROL_BODY: usize = 8;

/// One message (or, for data, one piece of a message body) of a shell/exec channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Bytes of one stream; a message's body may arrive as several pieces.
    Data(Stream, &'a [u8]),
    /// The stream has ended (stdin: the client's input; stdout/stderr: the command's).
    Eof(Stream),
    /// The client's terminal changed size.
    WindowChange(WindowSize),
    /// The command exited with this status (0..=255); the last message of the listener.
    ExitStatus(u32),
    /// The command was killed by this signal (Linux numbering); the client reports 128+N.
    ExitSignal { signal: u8, core_dumped: bool },
}

impl Msg<'_> {
    /// Appends the encoded message (data bodies at most MAX_EXEC_DATA bytes).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match *self {
            Msg::Data(s, d) => {
                assert!(d.len() <= MAX_EXEC_DATA, "data message over MAX_EXEC_DATA");
                w.u8(s.data_type()).u32(d.len() as u32).bytes(d);
            }
            Msg::Eof(s) => {
                w.u8(T_EOF).u32(1).u8(s as u8);
            }
            Msg::WindowChange(ws) => {
                w.u8(T_WINDOW_CHANGE).u32(8);
                ws.encode(&mut w);
            }
            Msg::ExitStatus(code) => {
                w.u8(T_EXIT_STATUS).u32(4).u32(code);
            }
            Msg::ExitSignal {
                signal,
                core_dumped,
            } => {
                w.u8(T_EXIT_SIGNAL)
                    .u32(2)
                    .u8(signal)
                    .u8(u8::from(core_dumped));
            }
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Writes the header of a data message whose body of `len` bytes follows; lets a sender read
/// straight into a buffer after [`MSG_HEADER`] reserved bytes (no copy).
pub fn data_header(stream: Stream, len: usize) -> [u8; MSG_HEADER] {
    assert!(len <= MAX_EXEC_DATA, "data message over MAX_EXEC_DATA");
    let l = (len as u32).to_be_bytes();
    [stream.data_type(), l[0], l[1], l[2], l[3]]
}

/// What [`MsgDecoder::split`] finds in a block of channel data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data(Stream, std::ops::Range<usize>),
    Eof(Stream),
    WindowChange(WindowSize),
    ExitStatus(u32),
    ExitSignal { signal: u8, core_dumped: bool },
}

/// Streaming decoder of shell/exec channel messages. Holds at most one header and one
/// control body, whatever the peer sends.
#[derive(Debug, Default)]
pub struct MsgDecoder {
    head: [u8; MSG_HEADER],
    head_len: usize,
    /// Data bytes still expected for the current data message, and its stream.
    data_left: usize,
    data_stream: Option<Stream>,
    body: [u8; MAX_CONTROL_BODY],
    body_len: usize,
    body_want: usize,
}

impl MsgDecoder {
    /// Takes bytes from the front of `input` and returns the next message or data piece;
    /// `None` once `input` is used up without completing one.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Msg<'a>>, DecodeError> {
        loop {
            if let Some(stream) = self.data_stream {
                if input.is_empty() {
                    return Ok(None);
                }
                let n = self.data_left.min(input.len());
                let (piece, rest) = input.split_at(n);
                *input = rest;
                self.data_left -= n;
                if self.data_left == 0 {
                    self.data_stream = None;
                }
                return Ok(Some(Msg::Data(stream, piece)));
            }
            if self.head_len < MSG_HEADER {
                let n = (MSG_HEADER - self.head_len).min(input.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
                self.head_len += n;
                *input = &input[n..];
                if self.head_len < MSG_HEADER {
                    return Ok(None);
                }
                let ty = self.head[0];
                let len = u32::from_be_bytes(self.head[1..].try_into().expect("4 bytes")) as usize;
                let data = match ty {
                    T_STDIN => Some(Stream::Stdin),
                    T_STDOUT => Some(Stream::Stdout),
                    T_STDERR => Some(Stream::Stderr),
                    _ => None,
                };
                if let Some(stream) = data {
                    if len > MAX_EXEC_DATA {
                        return Err(DecodeError::TooLong(len, MAX_EXEC_DATA));
                    }
                    self.head_len = 0;
                    if len > 0 {
                        self.data_left = len;
                        self.data_stream = Some(stream);
                    }
                    continue;
                }
                let want = match ty {
                    T_EOF => 1,
                    T_WINDOW_CHANGE => 8,
                    T_EXIT_STATUS => 4,
                    T_EXIT_SIGNAL => 2,
                    _ => return Err(DecodeError::Invalid("channel message type")),
                };
                if len != want {
                    return Err(DecodeError::Invalid("channel message length"));
                }
                self.body_want = want;
                self.body_len = 0;
            }
            let n = (self.body_want - self.body_len).min(input.len());
            self.body[self.body_len..self.body_len + n].copy_from_slice(&input[..n]);
            self.body_len += n;
            *input = &input[n..];
            if self.body_len < self.body_want {
                return Ok(None);
            }
            self.head_len = 0;
            let mut r = Reader::new(&self.body[..self.body_want]);
            let msg = match self.head[0] {
                T_EOF => Msg::Eof(Stream::from_u8(r.u8()?).ok_or(DecodeError::Invalid("stream"))?),
                T_WINDOW_CHANGE => Msg::WindowChange(WindowSize::decode(&mut r)?),
                T_EXIT_STATUS => Msg::ExitStatus(r.u32()?),
                _ => {
                    let signal = r.u8()?;
                    let core = r.u8()?;
                    if core > 1 {
                        return Err(DecodeError::Invalid("core-dumped flag"));
                    }
                    Msg::ExitSignal {
                        signal,
                        core_dumped: core == 1,
                    }
                }
            };
            return Ok(Some(msg));
        }
    }

    /// Decodes one block of channel data into [`Piece`]s, in order: data as byte ranges of
    /// `data` (so a caller can write them without copying), control messages by value.
    pub fn split(&mut self, data: &[u8]) -> Result<Vec<Piece>, DecodeError> {
        let mut out = Vec::new();
        let mut input = data;
        while let Some(msg) = self.next(&mut input)? {
            let end = data.len() - input.len();
            out.push(match msg {
                Msg::Data(s, piece) => Piece::Data(s, end - piece.len()..end),
                Msg::Eof(s) => Piece::Eof(s),
                Msg::WindowChange(ws) => Piece::WindowChange(ws),
                Msg::ExitStatus(c) => Piece::ExitStatus(c),
                Msg::ExitSignal {
                    signal,
                    core_dumped,
                } => Piece::ExitSignal {
                    signal,
                    core_dumped,
                },
            });
        }
        Ok(out)
    }

    /// True between messages (nothing partial is pending).
    pub fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.data_stream.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_params() -> CommandParams {
        CommandParams {
            pty: Some(WindowSize {
                cols: 80,
                rows: 24,
                width_px: 0,
                height_px: 0,
            }),
            term: "xterm-256color".into(),
            env: vec![("LANG".into(), b"C.UTF-8".to_vec())],
            argv: vec![b"ls".to_vec(), b"-l".to_vec(), b"a b".to_vec()],
        }
    }

    #[test]
    fn command_params_round_trip_and_line() {
        let p = sample_params();
        let enc = p.encode().unwrap();
        assert_eq!(CommandParams::decode(&enc).unwrap(), p);
        assert_eq!(p.command_line(), b"ls -l a b");
        let shell = CommandParams::default();
        assert_eq!(
            CommandParams::decode(&shell.encode().unwrap()).unwrap(),
            shell
        );
        // Every strict prefix and any trailing byte is refused.
        for cut in 0..enc.len() {
            assert!(CommandParams::decode(&enc[..cut]).is_err());
        }
        let mut long = enc.clone();
        long.push(0);
        assert_eq!(CommandParams::decode(&long), Err(DecodeError::Trailing));
    }

    #[test]
    fn command_params_limits() {
        let mut p = CommandParams {
            argv: vec![vec![b'x'; MAX_CHANNEL_PARAMS]],
            ..Default::default()
        };
        assert!(matches!(p.encode(), Err(ParamsError::TooLong(_))));
        p.argv = vec![b"a".to_vec(); MAX_EXEC_ARGS + 1];
        assert!(matches!(p.encode(), Err(ParamsError::TooManyArgs(_))));
        p.argv = vec![b"a\0b".to_vec()];
        assert!(p.encode().is_err());
        p.argv = vec![b"ok".to_vec()];
        p.term = "bad term".into();
        assert!(p.encode().is_err());
        p.term = String::new();
        p.env = vec![("1X".into(), b"v".to_vec())];
        assert!(p.encode().is_err());
        // A hand-made request with unknown flags or a bad env name is refused.
        let mut enc = sample_params().encode().unwrap();
        enc[0] = 0x80;
        assert_eq!(
            CommandParams::decode(&enc),
            Err(DecodeError::Invalid("command flags"))
        );
        assert!(valid_env_name("LC_ALL") && !valid_env_name("A-B") && !valid_env_name(""));
    }

    #[test]
    fn forward_params_round_trip() {
        let f = ForwardParams {
            host: "::1".into(),
            port: 8080,
            originator: "127.0.0.1".into(),
            originator_port: 5555,
        };
        assert_eq!(ForwardParams::decode(&f.encode().unwrap()).unwrap(), f);
        for r in [
            ReverseParams::Listen {
                bind: "localhost".into(),
                port: 0,
            },
            ReverseParams::Connection {
                forward: 6,
                originator: "10.0.0.1".into(),
                originator_port: 1,
            },
        ] {
            assert_eq!(ReverseParams::decode(&r.encode().unwrap()).unwrap(), r);
        }
        assert!(ReverseParams::decode(&[9]).is_err());
        let bad = ForwardParams {
            host: "a b".into(),
            ..f
        };
        assert!(bad.encode().is_err());
    }

    fn all_messages() -> Vec<Msg<'static>> {
        vec![
            Msg::Data(Stream::Stdin, b"hello"),
            Msg::Eof(Stream::Stdin),
            Msg::WindowChange(WindowSize {
                cols: 1,
                rows: 2,
                width_px: 3,
                height_px: 4,
            }),
            Msg::Data(Stream::Stdout, b"out"),
            Msg::Data(Stream::Stderr, b"err"),
            Msg::Eof(Stream::Stdout),
            Msg::Eof(Stream::Stderr),
            Msg::ExitSignal {
                signal: 9,
                core_dumped: false,
            },
            Msg::ExitStatus(42),
        ]
    }

    /// Decodes `bytes` fed in pieces of `step`, joining the pieces of each data message.
    fn decode_in_steps(bytes: &[u8], step: usize) -> Vec<Vec<u8>> {
        let mut d = MsgDecoder::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut continuing = false;
        for chunk in bytes.chunks(step) {
            let mut input = chunk;
            while let Some(m) = d.next(&mut input).unwrap() {
                match m {
                    Msg::Data(s, piece) if continuing => {
                        let last = out.last_mut().unwrap();
                        assert_eq!(last[0], s as u8);
                        last.extend_from_slice(piece);
                    }
                    Msg::Data(s, piece) => out.push([&[s as u8], piece].concat()),
                    other => out.push(other.to_vec()),
                }
                continuing = !d.at_boundary();
            }
        }
        assert!(d.at_boundary());
        out
    }

    #[test]
    fn messages_decode_whatever_the_split() {
        let mut bytes = Vec::new();
        for m in all_messages() {
            m.encode(&mut bytes);
        }
        let whole = decode_in_steps(&bytes, bytes.len());
        assert_eq!(whole.len(), all_messages().len());
        for step in 1..12 {
            assert_eq!(decode_in_steps(&bytes, step), whole, "step {step}");
        }
    }

    #[test]
    fn decoder_refuses_bad_messages() {
        let mut d = MsgDecoder::default();
        let mut over = &[T_STDOUT, 0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(d.next(&mut over), Err(DecodeError::TooLong(..))));
        let mut d = MsgDecoder::default();
        let mut bad_len = &[T_EXIT_STATUS, 0, 0, 0, 9][..];
        assert!(d.next(&mut bad_len).is_err());
        let mut d = MsgDecoder::default();
        let mut bad_type = &[0x77, 0, 0, 0, 0][..];
        assert!(d.next(&mut bad_type).is_err());
        let mut d = MsgDecoder::default();
        let mut bad_stream = &[T_EOF, 0, 0, 0, 1, 7][..];
        assert!(d.next(&mut bad_stream).is_err());
        // A zero-length data message is a no-op.
        let mut d = MsgDecoder::default();
        let mut empty = &[T_STDOUT, 0, 0, 0, 0, T_EOF, 0, 0, 0, 1, 1][..];
        assert_eq!(d.next(&mut empty).unwrap(), Some(Msg::Eof(Stream::Stdout)));
    }

    #[test]
    fn split_gives_ranges_in_order() {
        let mut bytes = Vec::new();
        Msg::Data(Stream::Stdout, b"abc").encode(&mut bytes);
        Msg::Eof(Stream::Stdout).encode(&mut bytes);
        Msg::Data(Stream::Stderr, b"de").encode(&mut bytes);
        Msg::ExitStatus(3).encode(&mut bytes);
        let mut d = MsgDecoder::default();
        let (a, b) = bytes.split_at(MSG_HEADER + 1);
        assert_eq!(d.split(a).unwrap(), vec![Piece::Data(Stream::Stdout, 5..6)]);
        let pieces = d.split(b).unwrap();
        assert_eq!(pieces[0], Piece::Data(Stream::Stdout, 0..2));
        assert_eq!(&b[0..2], b"bc");
        assert_eq!(pieces[1], Piece::Eof(Stream::Stdout));
        let Piece::Data(Stream::Stderr, r) = pieces[2].clone() else {
            panic!("expected stderr data, got {:?}", pieces[2]);
        };
        assert_eq!(&b[r], b"de");
        assert_eq!(pieces[3], Piece::ExitStatus(3));
        assert!(d.at_boundary());
    }

    #[test]
    fn data_header_matches_encode() {
        let mut v = Vec::new();
        Msg::Data(Stream::Stderr, b"abc").encode(&mut v);
        assert_eq!(&v[..MSG_HEADER], &data_header(Stream::Stderr, 3));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), step in 1usize..64) {
            let mut d = MsgDecoder::default();
            for chunk in bytes.chunks(step) {
                let mut input = chunk;
                while let Ok(Some(_)) = d.next(&mut input) {}
            }
        }

        #[test]
        fn params_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = CommandParams::decode(&bytes);
            let _ = ForwardParams::decode(&bytes);
            let _ = ReverseParams::decode(&bytes);
        }
    }
}
