//! Per-channel plumbing over a running session: the session's single event stream is split
//! into one stream per channel, so every service (chat, shell, exec, forwarding, VPN) is a
//! task that owns a [`Channel`] and never sees another channel's events.

use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::PublicIdentity;
use crate::core::session::{CloseReason, Event, Payload, SessionError};
use crate::net::tcp::SessionHandle;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// What a channel's owner receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    Data(Payload),
    Eof,
    Closed { code: CloseCode, reason: String },
}

/// Session-level happenings for the session's owner.
#[derive(Debug)]
pub enum Incoming {
    /// The peer wants a channel: accept it with [`RouterHandle::accept`] or refuse it.
    Request {
        ch: u32,
        kind: ChannelKind,
        params: Vec<u8>,
    },
    Established {
        peer: PublicIdentity,
        name: String,
    },
    DatagramEpoch {
        epoch: u32,
        secret: [u8; 32],
    },
    /// The peer installed our datagram epoch `epoch`.
    DatagramEpochConfirmed {
        epoch: u32,
    },
    Pong(std::time::Duration),
    Closed(CloseReason),
}

/// One open channel of a session.
pub struct Channel {
    pub id: u32,
    pub kind: ChannelKind,
    handle: SessionHandle,
    events: mpsc::UnboundedReceiver<ChannelEvent>,
}

impl Channel {
    /// Next event; `None` once the session is gone.
    pub async fn recv(&mut self) -> Option<ChannelEvent> {
        self.events.recv().await
    }
    /// Sends all of `data` (waits for window and socket: backpressure); returns the emptied
    /// buffer for reuse.
    pub async fn send(&self, data: Vec<u8>) -> Result<Vec<u8>, SessionError> {
        self.handle.send(self.id, data).await
    }
    /// Gives back `n` bytes of receive window after the data was processed.
    pub fn consumed(&self, n: usize) {
        self.handle.consumed(self.id, n)
    }
    pub fn eof(&self) {
        self.handle.send_eof(self.id)
    }
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.handle.close_channel(self.id, code, reason)
    }
    pub fn session(&self) -> &SessionHandle {
        &self.handle
    }
    /// Splits into a sending half and the event receiver, for services that read and write
    /// concurrently.
    pub fn split(self) -> (ChannelSender, mpsc::UnboundedReceiver<ChannelEvent>) {
        (
            ChannelSender {
                id: self.id,
                handle: self.handle,
            },
            self.events,
        )
    }
}

/// The sending half of a [`Channel`].
#[derive(Clone)]
pub struct ChannelSender {
    pub id: u32,
    handle: SessionHandle,
}

impl ChannelSender {
    /// As [`Channel::send`].
    pub async fn send(&self, data: Vec<u8>) -> Result<Vec<u8>, SessionError> {
        self.handle.send(self.id, data).await
    }
    /// Sends data read straight into record buffers (`app::bulk`); returns empty buffers
    /// for the next read.
    pub async fn send_records(&self, recs: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, SessionError> {
        self.handle.send_records(self.id, recs).await
    }
    pub fn consumed(&self, n: usize) {
        self.handle.consumed(self.id, n)
    }
    /// `n` bytes were processed, and `buf` (a Data event's buffer) may be reused.
    pub fn consumed_buffer(&self, n: usize, buf: Payload) {
        self.handle.consumed(self.id, n);
        self.recycle(buf);
    }
    /// A Data event's buffer may be reused by the session.
    pub fn recycle(&self, buf: Payload) {
        self.handle.recycle(buf.into_buffer());
    }
    pub fn eof(&self) {
        self.handle.send_eof(self.id)
    }
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.handle.close_channel(self.id, code, reason)
    }
}

enum Route {
    /// We opened it and wait for the answer.
    Opening(
        ChannelKind,
        oneshot::Sender<Result<Channel, (CloseCode, String)>>,
    ),
    Open(mpsc::UnboundedSender<ChannelEvent>),
}

#[derive(Default)]
struct Routes {
    map: HashMap<u32, Route>,
    /// Events for a channel we opened that arrived before `open` registered it.
    early: HashMap<u32, Vec<Event>>,
    closed: bool,
}

impl Routes {
    /// Drops the routes of channels whose owner is gone (it closed the channel and dropped
    /// it; the session reports no event for a close we started), so a long session with many
    /// short channels (forwarded connections) keeps one route per live channel.
    fn forget_finished(&mut self) {
        self.map
            .retain(|_, route| !matches!(route, Route::Open(tx) if tx.is_closed()));
    }
}

/// Opens and accepts channels of one session.
#[derive(Clone)]
pub struct RouterHandle {
    handle: SessionHandle,
    routes: Arc<Mutex<Routes>>,
}

/// Why [`RouterHandle::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("peer refused the channel: {1}")]
    Refused(CloseCode, String),
    #[error("session closed")]
    Closed,
    #[error("{0}")]
    Session(#[from] SessionError),
}

impl RouterHandle {
    pub fn session(&self) -> &SessionHandle {
        &self.handle
    }

    /// Opens a channel and waits for the peer's answer.
    pub async fn open(&self, kind: ChannelKind, params: &[u8]) -> Result<Channel, OpenError> {
        let (tx, rx) = oneshot::channel();
        let ch = self.handle.open_channel(kind, params).await?;
        {
            let mut r = self.routes.lock().expect("routes lock");
            if r.closed {
                return Err(OpenError::Closed);
            }
            r.forget_finished();
            r.map.insert(ch, Route::Opening(kind, tx));
            // The answer may have overtaken the registration: replay it now.
            if let Some(early) = r.early.remove(&ch) {
                for ev in early {
                    dispatch(&mut r, &self.handle, ev);
                }
            }
        }
        match rx.await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err((code, reason))) => Err(OpenError::Refused(code, reason)),
            Err(_) => Err(OpenError::Closed),
        }
    }

    /// Accepts a channel the peer requested. On a session that has ended meanwhile, the
    /// channel's `recv` returns `None` at once.
    pub fn accept(&self, ch: u32, kind: ChannelKind) -> Channel {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut r = self.routes.lock().expect("routes lock");
            if !r.closed {
                r.forget_finished();
                r.map.insert(ch, Route::Open(tx));
            }
        }
        self.handle.accept_channel(ch);
        Channel {
            id: ch,
            kind,
            handle: self.handle.clone(),
            events: rx,
        }
    }

    pub fn reject(&self, ch: u32, code: CloseCode, reason: &str) {
        self.handle.reject_channel(ch, code, reason);
    }

    /// Graceful close of the whole session.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.handle.close(code, reason);
    }
}

/// Starts routing `events` of the session behind `handle`.
pub fn route(
    handle: SessionHandle,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> (RouterHandle, mpsc::UnboundedReceiver<Incoming>) {
    let routes = Arc::new(Mutex::new(Routes::default()));
    let (tx, rx) = mpsc::unbounded_channel();
    let rh = RouterHandle {
        handle: handle.clone(),
        routes: routes.clone(),
    };
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let mut r = routes.lock().expect("routes lock");
            let ev = match ev {
                Event::ChannelRequest { ch, kind, params } => {
                    Incoming::Request { ch, kind, params }
                }
                Event::Established { peer, name, .. } => Incoming::Established { peer, name },
                Event::DatagramEpoch { epoch, secret } => Incoming::DatagramEpoch { epoch, secret },
                Event::DatagramEpochConfirmed { epoch } => {
                    Incoming::DatagramEpochConfirmed { epoch }
                }
                Event::Pong { rtt } => Incoming::Pong(rtt),
                Event::VerifyPeer { .. } => continue,
                Event::Closed { reason } => {
                    r.closed = true;
                    r.early.clear();
                    for (_, route) in r.map.drain() {
                        if let Route::Open(etx) = route {
                            let _ = etx.send(ChannelEvent::Closed {
                                code: CloseCode::Error,
                                reason: reason.to_string(),
                            });
                        }
                    }
                    Incoming::Closed(reason)
                }
                channel_event => {
                    dispatch(&mut r, &handle, channel_event);
                    continue;
                }
            };
            let _ = tx.send(ev);
        }
        let mut r = routes.lock().expect("routes lock");
        r.closed = true;
        r.map.clear();
    });
    (rh, rx)
}

/// Delivers one channel event to its route (or keeps it until `open` registers the channel).
fn dispatch(r: &mut Routes, handle: &SessionHandle, ev: Event) {
    let ch = match &ev {
        Event::Data { ch, .. }
        | Event::Eof { ch }
        | Event::ChannelClosed { ch, .. }
        | Event::ChannelAccepted { ch }
        | Event::ChannelRefused { ch, .. } => *ch,
        _ => return,
    };
    match (r.map.remove(&ch), ev) {
        (Some(Route::Open(tx)), Event::Data { data, .. }) => {
            let _ = tx.send(ChannelEvent::Data(data));
            r.map.insert(ch, Route::Open(tx));
        }
        (Some(Route::Open(tx)), Event::Eof { .. }) => {
            let _ = tx.send(ChannelEvent::Eof);
            r.map.insert(ch, Route::Open(tx));
        }
        (Some(Route::Open(tx)), Event::ChannelClosed { code, reason, .. }) => {
            let _ = tx.send(ChannelEvent::Closed { code, reason });
        }
        (Some(Route::Opening(kind, reply)), Event::ChannelAccepted { .. }) => {
            let (etx, erx) = mpsc::unbounded_channel();
            r.map.insert(ch, Route::Open(etx));
            let _ = reply.send(Ok(Channel {
                id: ch,
                kind,
                handle: handle.clone(),
                events: erx,
            }));
        }
        (Some(Route::Opening(_, reply)), Event::ChannelRefused { code, reason, .. }) => {
            let _ = reply.send(Err((code, reason)));
        }
        (Some(route), _) => {
            r.map.insert(ch, route);
        }
        // Not registered yet (an `open` in flight): keep it, bounded by the channel window.
        (None, ev) => r.early.entry(ch).or_default().push(ev),
    }
}
