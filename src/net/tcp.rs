//! Tokio driver for a [`Session`] over any reliable ordered byte stream — a TCP connection
//! ([`spawn_session`]) or a QUIC bidirectional stream ([`spawn_session_io`] with quinn's
//! `RecvStream`/`SendStream`): moves bytes between the stream and the sans-IO core, runs its
//! timer, and exposes the session to the application as a command handle plus an event
//! stream.
//!
//! The stream is split: a writer task drains sealed records so that reading never stalls
//! behind a blocked write (two peers pushing bulk data at each other cannot deadlock). Bytes
//! handed to the writer but not yet written are bounded by [`WRITE_HIGH_WATER`]; above it
//! the driver stops taking application data, which is how backpressure reaches the sender.

use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::limits::{MAX_DATA_EVENT, MAX_SPARE_RECORDS};
use crate::core::ratchet::RatchetStats;
use crate::core::session::{self, Event, Session, SessionError, SessionStats};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, trace};

/// Bytes queued to the socket writer before the driver stops taking application data.
pub const WRITE_HIGH_WATER: usize = 4 << 20;
/// Read buffer size: every complete record in it is handled before the next read.
const READ_CHUNK: usize = 256 * 1024;
// Read buffers go to the application as Data events and come back as spares.
const _: () = assert!(READ_CHUNK <= MAX_DATA_EVENT);
/// Buffers handed to one vectored write at most ([`write_all_bufs`]: sealed records here,
/// stdin data for a command in `app::cmdio`); far below `IOV_MAX`.
pub const MAX_WRITE_SLICES: usize = 64;
/// Commands the driver applies in one turn of its loop before it seals and writes.
const MAX_COMMANDS_PER_TURN: usize = 64;

/// What the application asks the driver to do with its session.
enum Command {
    AcceptPeer(bool),
    Open {
        kind: ChannelKind,
        params: Vec<u8>,
        reply: oneshot::Sender<Result<u32, SessionError>>,
    },
    Accept(u32),
    Reject(u32, CloseCode, String),
    Send {
        ch: u32,
        data: Vec<u8>,
        done: oneshot::Sender<Result<Vec<u8>, SessionError>>,
    },
    SendRecords {
        ch: u32,
        recs: VecDeque<Vec<u8>>,
        done: oneshot::Sender<Result<Vec<Vec<u8>>, SessionError>>,
    },
    Recycle(Vec<u8>),
    Eof(u32),
    CloseChannel(u32, CloseCode, String),
    Consumed(u32, usize),
    Ping,
    DatagramEpoch(u32, [u8; 32]),
    DatagramEpochOk(u32),
    Stats(oneshot::Sender<(SessionStats, Option<RatchetStats>)>),
    Close(CloseCode, String),
}

/// Cloneable handle to a running session.
#[derive(Clone)]
pub struct SessionHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl SessionHandle {
    fn cmd(&self, c: Command) {
        // A closed driver simply drops commands: the event stream has told the app why.
        let _ = self.tx.send(c);
    }
    pub fn accept_peer(&self, accept: bool) {
        self.cmd(Command::AcceptPeer(accept));
    }
    pub async fn open_channel(
        &self,
        kind: ChannelKind,
        params: &[u8],
    ) -> Result<u32, SessionError> {
        let (reply, rx) = oneshot::channel();
        self.cmd(Command::Open {
            kind,
            params: params.to_vec(),
            reply,
        });
        rx.await.unwrap_or(Err(SessionError::Closed))
    }
    pub fn accept_channel(&self, ch: u32) {
        self.cmd(Command::Accept(ch));
    }
    pub fn reject_channel(&self, ch: u32, code: CloseCode, reason: &str) {
        self.cmd(Command::Reject(ch, code, reason.to_string()));
    }
    /// Sends all of `data` on `ch`; completes once the session has taken it (flow control
    /// and the socket's pace are the backpressure), and gives the emptied buffer back for
    /// the caller's next message.
    pub async fn send(&self, ch: u32, data: Vec<u8>) -> Result<Vec<u8>, SessionError> {
        let (done, rx) = oneshot::channel();
        self.cmd(Command::Send { ch, data, done });
        rx.await.unwrap_or(Err(SessionError::Closed))
    }
    /// Sends data read straight into record buffers ([`Session::send_records`]); completes
    /// once the session has taken all of it, with as many empty record buffers for the
    /// caller's next read.
    pub async fn send_records(
        &self,
        ch: u32,
        recs: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, SessionError> {
        let (done, rx) = oneshot::channel();
        self.cmd(Command::SendRecords {
            ch,
            recs: recs.into(),
            done,
        });
        rx.await.unwrap_or(Err(SessionError::Closed))
    }
    /// Hands an emptied Data buffer back to the session for reuse ([`Session::recycle`]).
    pub fn recycle(&self, buf: Vec<u8>) {
        self.cmd(Command::Recycle(buf));
    }
    pub fn send_eof(&self, ch: u32) {
        self.cmd(Command::Eof(ch));
    }
    pub fn close_channel(&self, ch: u32, code: CloseCode, reason: &str) {
        self.cmd(Command::CloseChannel(ch, code, reason.to_string()));
    }
    /// The application processed `n` bytes of `ch`; the peer may send more.
    pub fn consumed(&self, ch: u32, n: usize) {
        self.cmd(Command::Consumed(ch, n));
    }
    pub fn ping(&self) {
        self.cmd(Command::Ping);
    }
    pub fn announce_datagram_epoch(&self, epoch: u32, secret: [u8; 32]) {
        self.cmd(Command::DatagramEpoch(epoch, secret));
    }
    /// Tells the peer we installed its datagram epoch `epoch`.
    pub fn confirm_datagram_epoch(&self, epoch: u32) {
        self.cmd(Command::DatagramEpochOk(epoch));
    }
    /// Record and ratchet counters (None once the session is gone).
    pub async fn stats(&self) -> Option<(SessionStats, Option<RatchetStats>)> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Command::Stats(tx));
        rx.await.ok()
    }
    /// Graceful close: queued data is delivered first; the Closed event follows.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.cmd(Command::Close(code, reason.to_string()));
    }
}

/// Application data waiting for channel window; an EOF marker keeps its place in line.
enum PendingSend {
    Bytes {
        data: Vec<u8>,
        off: usize,
        done: oneshot::Sender<Result<Vec<u8>, SessionError>>,
    },
    Records {
        recs: VecDeque<Vec<u8>>,
        /// Buffers the caller gave, and gets back empty.
        given: usize,
        done: oneshot::Sender<Result<Vec<Vec<u8>>, SessionError>>,
    },
    Eof,
}

impl PendingSend {
    /// Completes the send; on success the caller gets its buffers back, emptied (record
    /// buffers: the session's spares, the given ones having become records).
    fn finish(self, s: &mut Session, r: Result<(), SessionError>) {
        match self {
            PendingSend::Bytes { mut data, done, .. } => {
                data.clear();
                let _ = done.send(r.map(|()| data));
            }
            PendingSend::Records { given, done, .. } => {
                let _ = done.send(r.map(|()| (0..given).map(|_| s.record_buffer()).collect()));
            }
            PendingSend::Eof => {}
        }
    }
}

/// What [`spawn_session`] and [`spawn_session_io`] return: the handle, the event stream and
/// the driver task (which ends after the session closed and its last records were written).
pub type Spawned = (
    SessionHandle,
    mpsc::UnboundedReceiver<Event>,
    tokio::task::JoinHandle<()>,
);

/// Starts driving `session` over a TCP connection.
pub fn spawn_session(stream: TcpStream, session: Session) -> Spawned {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "tcp".to_string(), |a| a.to_string());
    let (rd, wr) = stream.into_split();
    spawn_session_io(rd, wr, session, peer)
}

/// Starts driving `session` over any reliable ordered byte stream given as its two halves
/// (for QUIC: a bidirectional stream's `RecvStream` and `SendStream`). `label` names the
/// link in logs. At the end of the session the writer is shut down (QUIC: `finish`).
pub fn spawn_session_io<R, W>(rd: R, wr: W, session: Session, label: String) -> Spawned
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(drive(rd, wr, session, rx, ev_tx, label));
    (SessionHandle { tx }, ev_rx, task)
}

async fn drive<R, W>(
    mut rd: R,
    mut wr: W,
    mut s: Session,
    mut cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    peer_addr: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    // Written record buffers on their way back to the session (Session::recycle_record).
    let written = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    // Batches of sealed records, one batch per turn of the driver loop.
    let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<Vec<u8>>>();
    let writer = {
        let in_flight = in_flight.clone();
        let drained = drained.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let mut batches = Vec::new();
            let mut recs = Vec::new();
            // Everything queued by the time the writer runs goes out in vectored writes.
            while wrx.recv_many(&mut batches, MAX_WRITE_SLICES).await > 0 {
                recs.extend(batches.drain(..).flatten());
                let n: usize = recs.iter().map(Vec::len).sum();
                if let Err(e) = write_all_bufs(&mut wr, &recs).await {
                    debug!("write failed: {e}");
                    in_flight.store(0, Ordering::Release);
                    drained.notify_one();
                    return;
                }
                if let Ok(mut w) = written.lock() {
                    let room = MAX_SPARE_RECORDS.saturating_sub(w.len());
                    w.extend(recs.drain(..).filter(session::is_record_buffer).take(room));
                }
                recs.clear();
                in_flight.fetch_sub(n, Ordering::AcqRel);
                drained.notify_one();
            }
            let _ = wr.shutdown().await;
        })
    };

    let mut pending: HashMap<u32, VecDeque<PendingSend>> = HashMap::new();
    let mut close_after: Option<(CloseCode, String)> = None;
    // Received bytes, after the start of an unfinished record the session left at its front;
    // the session may hand the whole buffer to the application and put a spare here.
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let mut read_open = true;
    loop {
        let now = Instant::now();
        if let Ok(mut w) = written.try_lock() {
            for rec in w.drain(..) {
                s.recycle_record(rec);
            }
        }
        // Move application data into the session as far as windows and buffers allow.
        if in_flight.load(Ordering::Acquire) < WRITE_HIGH_WATER {
            pump_sends(&mut s, now, &mut pending);
        }
        if pending.is_empty() {
            if let Some((code, reason)) = close_after.take() {
                s.close(now, code, &reason);
            }
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(rec) = s.poll_transmit(now) {
            bytes += rec.len();
            batch.push(rec);
        }
        if !batch.is_empty() {
            in_flight.fetch_add(bytes, Ordering::AcqRel);
            let _ = wtx.send(batch);
        }
        while let Some(ev) = s.poll_event() {
            trace!(peer = %peer_addr, "event {ev:?}");
            let _ = events.send(ev);
        }
        if s.is_closed() {
            break;
        }
        let deadline = s.poll_timeout().map(tokio::time::Instant::from_std);
        let can_take = in_flight.load(Ordering::Acquire) < WRITE_HIGH_WATER;
        tokio::select! {
            r = rd.read_buf(&mut buf), if read_open => match r {
                Ok(0) | Err(_) => {
                    read_open = false;
                    s.handle_eof();
                }
                Ok(_) => s.handle_input_buf(Instant::now(), &mut buf),
            },
            c = cmds.recv(), if can_take => {
                // Everything else already queued goes into this turn too, so window updates
                // and recycled buffers ride with the data they follow instead of costing a
                // record and a write of their own.
                let now = Instant::now();
                let mut next = c;
                let mut applied = 0;
                loop {
                    match next {
                        Some(Command::Close(code, reason)) => {
                            close_after = Some((code, reason));
                            break;
                        }
                        Some(c) => apply(&mut s, now, c, &mut pending),
                        None => {
                            s.close(now, CloseCode::Normal, "application ended");
                            break;
                        }
                    }
                    applied += 1;
                    // Take the next command only if it will be applied in this turn: one
                    // taken from the queue and then left would be lost.
                    if applied == MAX_COMMANDS_PER_TURN
                        || in_flight.load(Ordering::Acquire) >= WRITE_HIGH_WATER
                    {
                        break;
                    }
                    match cmds.try_recv() {
                        Ok(c) => next = Some(c),
                        Err(_) => break,
                    }
                }
            }
            _ = drained.notified(), if !can_take => {}
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                s.handle_timeout(Instant::now());
            }
        }
    }
    let st = s.stats();
    debug!(
        peer = %peer_addr,
        records_sent = st.records_sent,
        bytes_sent = st.bytes_sent,
        records_received = st.records_received,
        bytes_received = st.bytes_received,
        records_reused = st.records_reused,
        "session transferred"
    );
    for (_, q) in pending.drain() {
        for p in q {
            p.finish(&mut s, Err(SessionError::Closed));
        }
    }
    drop(wtx);
    // Let the writer flush the final records (close acknowledgement), bounded in time.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
}

/// Writes every buffer of `bufs` in order, in vectored writes of up to `MAX_WRITE_SLICES`.
async fn write_all_bufs<W: AsyncWrite + Unpin>(wr: &mut W, bufs: &[Vec<u8>]) -> io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < bufs.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(&bufs[i][off..])
            .chain(bufs[i + 1..].iter().map(Vec::as_slice))
            .take(MAX_WRITE_SLICES)
            .map(IoSlice::new)
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while i < bufs.len() && n >= bufs[i].len() - off {
            n -= bufs[i].len() - off;
            i += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

fn pump_sends(s: &mut Session, now: Instant, pending: &mut HashMap<u32, VecDeque<PendingSend>>) {
    pending.retain(|&ch, q| {
        while let Some(p) = q.front_mut() {
            if !s.can_send() {
                return true;
            }
            // Whether all of the front entry went into the session.
            let r = match p {
                PendingSend::Eof => s.send_eof(now, ch).map(|()| true),
                PendingSend::Bytes { data, off, .. } => s.send(now, ch, &data[*off..]).map(|n| {
                    *off += n;
                    *off == data.len()
                }),
                PendingSend::Records { recs, .. } => {
                    s.send_records(now, ch, recs).map(|_| recs.is_empty())
                }
            };
            match r {
                Ok(false) => return true,
                Ok(true) => q.pop_front().expect("front exists").finish(s, Ok(())),
                Err(e) => {
                    for p in q.drain(..) {
                        p.finish(s, Err(e.clone()));
                    }
                }
            }
        }
        false
    });
}

fn apply(
    s: &mut Session,
    now: Instant,
    c: Command,
    pending: &mut HashMap<u32, VecDeque<PendingSend>>,
) {
    match c {
        Command::AcceptPeer(true) => s.accept_peer(now),
        Command::AcceptPeer(false) => s.reject_peer(now),
        Command::Open {
            kind,
            params,
            reply,
        } => {
            let _ = reply.send(s.open_channel(now, kind, &params));
        }
        Command::Accept(ch) => {
            let _ = s.accept_channel(now, ch);
        }
        Command::Reject(ch, code, reason) => {
            let _ = s.reject_channel(now, ch, code, &reason);
        }
        Command::Send { ch, data, done } => {
            pending
                .entry(ch)
                .or_default()
                .push_back(PendingSend::Bytes { data, off: 0, done });
            pump_sends(s, now, pending);
        }
        Command::SendRecords { ch, recs, done } => {
            let given = recs.len();
            pending
                .entry(ch)
                .or_default()
                .push_back(PendingSend::Records { recs, given, done });
            pump_sends(s, now, pending);
        }
        Command::Eof(ch) => {
            // After any data already queued for the channel.
            pending.entry(ch).or_default().push_back(PendingSend::Eof);
            pump_sends(s, now, pending);
        }
        Command::CloseChannel(ch, code, reason) => {
            pending.remove(&ch);
            let _ = s.close_channel(now, ch, code, &reason);
        }
        Command::Consumed(ch, n) => s.consumed(now, ch, n),
        Command::Recycle(buf) => s.recycle(buf),
        Command::Ping => {
            let _ = s.ping(now);
        }
        Command::Stats(reply) => {
            let _ = reply.send((s.stats(), s.ratchet_stats()));
        }
        Command::DatagramEpoch(epoch, secret) => {
            let _ = s.announce_datagram_epoch(now, epoch, secret);
        }
        Command::DatagramEpochOk(epoch) => {
            let _ = s.confirm_datagram_epoch(now, epoch);
        }
        // Deferred by the driver loop until queued data has gone out.
        Command::Close(code, reason) => s.close(now, code, &reason),
    }
}
