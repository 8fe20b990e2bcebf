//! TCP port forwarding, as ssh's `-L` and `-R`: every forwarded TCP connection is its own
//! channel with its own flow control, so one slow connection never stalls another.
//!
//! - `-L [bind:]port:host:hostport`: the client listens on `bind:port`; each connection
//!   opens a ForwardTcp channel asking the peer to connect to `host:hostport`.
//! - `-R [bind:]port:host:hostport`: the client opens a ReverseForward LISTEN channel asking
//!   the listener to listen on `bind:port`; for each connection it accepts, the listener
//!   opens a ReverseForward CONNECTION channel back, and the client connects to
//!   `host:hostport`. The forward lasts while its LISTEN channel is open.
//!
//! Default bind address: loopback on both sides, as ssh's defaults (`GatewayPorts no`). A
//! listener binds remote forwards on loopback addresses only.

use super::router::{Channel, ChannelEvent, RouterHandle};
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::identity::PeerId;
use crate::core::limits::MAX_FRAME_DATA;
use crate::core::service::{ForwardParams, ReverseParams};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// Bytes read from a forwarded TCP connection per channel message: about 64 KiB, exactly
/// one full frame.
pub const FORWARD_READ_CHUNK: usize = MAX_FRAME_DATA;
/// How long connecting to a forward's destination may take.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the listener to report the port of a remote forward.
pub const REMOTE_BIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bind address when a forward names none.
pub const DEFAULT_BIND: &str = "127.0.0.1";

/// `[bind:]port:host:hostport`, with IPv6 addresses in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// `None`: loopback. `*` or empty: every address.
    pub bind: Option<String>,
    pub port: u16,
    pub host: String,
    pub host_port: u16,
}

/// Why a forward could not be set up.
#[derive(Debug, Error)]
pub enum ForwardError {
    #[error("invalid forward {0:?}: expected [BIND:]PORT:HOST:HOSTPORT")]
    Spec(String),
    #[error("cannot listen on {addr} for forward {spec}: {source}")]
    Bind {
        addr: String,
        spec: String,
        source: std::io::Error,
    },
    #[error("remote forward {spec} refused by the peer: {reason}")]
    Refused { spec: String, reason: String },
    #[error("remote forward {spec}: the peer did not report its port")]
    NoPort { spec: String },
    #[error("{0}")]
    Params(#[from] crate::core::service::ParamsError),
}

/// Splits on ':' outside brackets; removes the brackets.
fn fields(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_brackets = false;
    for c in s.chars() {
        match c {
            '[' if !in_brackets && cur.is_empty() => in_brackets = true,
            ']' if in_brackets => in_brackets = false,
            ':' if !in_brackets => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if in_brackets {
        return None;
    }
    out.push(cur);
    Some(out)
}

impl FromStr for ForwardSpec {
    type Err = ForwardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ForwardError::Spec(s.to_string());
        let f = fields(s).ok_or_else(bad)?;
        let (bind, rest) = match f.len() {
            3 => (None, &f[..]),
            4 => (Some(f[0].clone()), &f[1..]),
            _ => return Err(bad()),
        };
        let port = rest[0].parse().map_err(|_| bad())?;
        let host_port = rest[2].parse().map_err(|_| bad())?;
        let host = rest[1].clone();
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad());
        }
        Ok(ForwardSpec {
            bind,
            port,
            host,
            host_port,
        })
    }
}

fn bracket(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.bind {
            write!(f, "{}:", bracket(b))?;
        }
        write!(
            f,
            "{}:{}:{}",
            self.port,
            bracket(&self.host),
            self.host_port
        )
    }
}

/// The address a client-side (`-L`) listener binds.
fn local_bind_host(bind: &Option<String>) -> String {
    match bind.as_deref() {
        None => DEFAULT_BIND.to_string(),
        Some("") | Some("*") => "::".to_string(),
        Some(b) => b.to_string(),
    }
}

async fn bind_any(host: &str, port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind((host, port)).await {
        // `::` without IPv6: all IPv4 addresses instead.
        Err(_) if host == "::" => TcpListener::bind(("0.0.0.0", port)).await,
        r => r,
    }
}

/// Moves bytes between a channel and a TCP connection until both directions ended (EOF is
/// passed on as a half close) or either side broke. Window is given back only after the
/// bytes were written to the socket.
pub async fn splice(channel: Channel, sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let (tx, mut rx) = channel.split();
    let (mut rd, mut wr) = sock.into_split();
    let up = async {
        // One buffer for the connection: the session hands it back after each send.
        let mut buf = Vec::with_capacity(FORWARD_READ_CHUNK);
        loop {
            buf.clear();
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    tx.eof();
                    return true;
                }
                Ok(_) => match tx.send(buf).await {
                    Ok(back) => buf = back,
                    Err(_) => return false,
                },
                Err(e) => {
                    debug!("forwarded connection: read: {e}");
                    return false;
                }
            }
        }
    };
    /// How the channel-to-socket direction ended.
    enum Down {
        Eof,
        PeerClosed,
        Broken,
    }
    let down = async {
        while let Some(ev) = rx.recv().await {
            match ev {
                ChannelEvent::Data(d) => {
                    if let Err(e) = wr.write_all(&d).await {
                        debug!("forwarded connection: write: {e}");
                        return Down::Broken;
                    }
                    tx.consumed_buffer(d.len(), d);
                }
                ChannelEvent::Eof => {
                    let _ = wr.shutdown().await;
                    return Down::Eof;
                }
                ChannelEvent::Closed { .. } => return Down::PeerClosed,
            }
        }
        Down::PeerClosed
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            ok = &mut up, if !up_done => {
                if !ok {
                    tx.close(CloseCode::Error, "connection broken");
                    return;
                }
                up_done = true;
            }
            end = &mut down, if !down_done => match end {
                Down::Eof => down_done = true,
                Down::PeerClosed => return,
                Down::Broken => {
                    tx.close(CloseCode::Error, "connection broken");
                    return;
                }
            },
        }
    }
    // Both directions ended: wait for the peer's CLOSE or send ours.
    tx.close(CloseCode::Normal, "");
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    match tokio::time::timeout(FORWARD_CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connect to {}:{port} failed: {e}", bracket(host))),
        Err(_) => Err(format!(
            "connect to {}:{port} timed out after {}s",
            bracket(host),
            FORWARD_CONNECT_TIMEOUT.as_secs()
        )),
    }
}

// ----- client side -----

/// Starts a `-L` forward: binds now (so a failure is reported before anything runs) and
/// serves connections in the background for as long as the session lives.
pub async fn start_local(router: RouterHandle, spec: ForwardSpec) -> Result<(), ForwardError> {
    let host = local_bind_host(&spec.bind);
    let listener = bind_any(&host, spec.port)
        .await
        .map_err(|source| ForwardError::Bind {
            addr: format!("{}:{}", bracket(&host), spec.port),
            spec: spec.to_string(),
            source,
        })?;
    info!("forwarding {} to the peer", spec);
    tokio::spawn(async move {
        loop {
            let (sock, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    warn!("forward {spec}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let router = router.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                let params = ForwardParams {
                    host: spec.host.clone(),
                    port: spec.host_port,
                    originator: from.ip().to_canonical().to_string(),
                    originator_port: from.port(),
                }
                .encode();
                let params = match params {
                    Ok(p) => p,
                    Err(e) => return eprintln!("qssh: forward {spec}: {e}"),
                };
                match router.open(ChannelKind::ForwardTcp, &params).await {
                    Ok(ch) => splice(ch, sock).await,
                    Err(e) => eprintln!("qssh: forward {spec}: {e}"),
                }
            });
        }
    });
    Ok(())
}

/// The client's remote forwards, by the id of their LISTEN channel.
#[derive(Clone, Default)]
pub struct RemoteForwards {
    map: Arc<Mutex<HashMap<u32, ForwardSpec>>>,
}

impl RemoteForwards {
    /// Asks the listener to listen for a `-R` forward and waits for its port. With port 0
    /// the allocated port is printed, as ssh does.
    pub async fn request(
        &self,
        router: &RouterHandle,
        spec: ForwardSpec,
    ) -> Result<u16, ForwardError> {
        let params = ReverseParams::Listen {
            bind: spec.bind.clone().unwrap_or_default(),
            port: spec.port,
        }
        .encode()?;
        let channel = router
            .open(ChannelKind::ReverseForward, &params)
            .await
            .map_err(|e| ForwardError::Refused {
                spec: spec.to_string(),
                reason: match e {
                    super::router::OpenError::Refused(_, r) => r,
                    other => other.to_string(),
                },
            })?;
        let id = channel.id;
        let (tx, mut rx) = channel.split();
        let no_port = || ForwardError::NoPort {
            spec: spec.to_string(),
        };
        let mut got = Vec::new();
        let wait = async {
            while got.len() < 2 {
                match rx.recv().await {
                    Some(ChannelEvent::Data(d)) => {
                        tx.consumed(d.len());
                        got.extend_from_slice(&d);
                    }
                    _ => return false,
                }
            }
            true
        };
        if !tokio::time::timeout(REMOTE_BIND_TIMEOUT, wait)
            .await
            .unwrap_or(false)
            || got.len() != 2
        {
            tx.close(CloseCode::Protocol, "expected the bound port");
            return Err(no_port());
        }
        let port = u16::from_be_bytes([got[0], got[1]]);
        if spec.port == 0 {
            eprintln!(
                "Allocated port {port} for remote forward to {}:{}",
                bracket(&spec.host),
                spec.host_port
            );
        }
        info!("remote forward {spec} listening on the peer's port {port}");
        self.map.lock().expect("forwards lock").insert(id, spec);
        let map = self.map.clone();
        tokio::spawn(async move {
            // The forward lasts until the listener closes it or the session ends.
            while let Some(ev) = rx.recv().await {
                match ev {
                    ChannelEvent::Data(d) => tx.consumed(d.len()),
                    ChannelEvent::Eof => {}
                    ChannelEvent::Closed { reason, .. } => {
                        debug!("remote forward ended: {reason}");
                        break;
                    }
                }
            }
            map.lock().expect("forwards lock").remove(&id);
        });
        Ok(port)
    }

    /// Answers a channel the listener opened for a connection to one of our remote
    /// forwards: connects to its destination and splices, or refuses the channel.
    pub fn handle(&self, router: &RouterHandle, ch: u32, params: &[u8]) {
        let spec = match ReverseParams::decode(params) {
            Ok(ReverseParams::Connection { forward, .. }) => self
                .map
                .lock()
                .expect("forwards lock")
                .get(&forward)
                .cloned(),
            _ => None,
        };
        let Some(spec) = spec else {
            warn!("peer opened a forwarded connection we did not ask for");
            router.reject(ch, CloseCode::Refused, "no such remote forward");
            return;
        };
        let router = router.clone();
        tokio::spawn(async move {
            match connect(&spec.host, spec.host_port).await {
                Ok(sock) => splice(router.accept(ch, ChannelKind::ReverseForward), sock).await,
                Err(why) => {
                    eprintln!("qssh: remote forward {spec}: {why}");
                    router.reject(ch, CloseCode::Error, &why);
                }
            }
        });
    }
}

// ----- listener side -----

/// Serves an authorized direct forward (`-L` of the peer): connect, then accept and splice.
pub async fn serve_direct(router: RouterHandle, ch: u32, params: Vec<u8>, peer: PeerId) {
    let p = match ForwardParams::decode(&params) {
        Ok(p) => p,
        Err(e) => {
            router.reject(
                ch,
                CloseCode::Unsupported,
                &format!("malformed parameters: {e}"),
            );
            return;
        }
    };
    match connect(&p.host, p.port).await {
        Ok(sock) => {
            info!(%peer, "forwarding {}:{} -> {}:{}", p.originator, p.originator_port, p.host, p.port);
            splice(router.accept(ch, ChannelKind::ForwardTcp), sock).await;
        }
        Err(why) => {
            info!(%peer, "forward: {why}");
            router.reject(ch, CloseCode::Error, &why);
        }
    }
}

/// The address a listener binds for a remote forward: loopback only.
fn remote_bind_addr(bind: &str) -> Result<String, String> {
    match bind {
        "" => Ok(DEFAULT_BIND.to_string()),
        "localhost" => Ok(bind.to_string()),
        b => match b.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => Ok(b.to_string()),
            _ => Err(format!(
                "this listener binds remote forwards on loopback addresses only, not {b:?}"
            )),
        },
    }
}

/// Serves an authorized remote forward (`-R` of the peer): listen, accept the LISTEN channel
/// with the bound port, and open a channel back to the peer for every connection, until the
/// peer closes the forward or the session ends.
pub async fn serve_reverse(router: RouterHandle, ch: u32, params: Vec<u8>, peer: PeerId) {
    let (bind, port) = match ReverseParams::decode(&params) {
        Ok(ReverseParams::Listen { bind, port }) => (bind, port),
        Ok(ReverseParams::Connection { .. }) => {
            router.reject(
                ch,
                CloseCode::Unsupported,
                "only the listener opens forwarded connections",
            );
            return;
        }
        Err(e) => {
            router.reject(
                ch,
                CloseCode::Unsupported,
                &format!("malformed parameters: {e}"),
            );
            return;
        }
    };
    let host = match remote_bind_addr(&bind) {
        Ok(h) => h,
        Err(why) => {
            warn!(%peer, "refused remote forward: {why}");
            router.reject(ch, CloseCode::Refused, &why);
            return;
        }
    };
    let listener = match TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            let why = format!("cannot listen on {}:{port}: {e}", bracket(&host));
            info!(%peer, "remote forward: {why}");
            router.reject(ch, CloseCode::Error, &why);
            return;
        }
    };
    let bound = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    let (tx, mut rx) = router.accept(ch, ChannelKind::ReverseForward).split();
    if tx.send(bound.to_be_bytes().to_vec()).await.is_err() {
        return;
    }
    info!(%peer, "remote forward listening on {}:{bound}", bracket(&host));
    loop {
        tokio::select! {
            acc = listener.accept() => match acc {
                Ok((sock, from)) => {
                    let router = router.clone();
                    tokio::spawn(open_back(router, ch, sock, from));
                }
                Err(e) => {
                    warn!("remote forward accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            ev = rx.recv() => match ev {
                Some(ChannelEvent::Data(d)) => tx.consumed(d.len()),
                Some(ChannelEvent::Eof) => {}
                Some(ChannelEvent::Closed { .. }) | None => break,
            },
        }
    }
    info!(%peer, "remote forward on port {bound} closed");
}

async fn open_back(router: RouterHandle, forward: u32, sock: TcpStream, from: SocketAddr) {
    let params = ReverseParams::Connection {
        forward,
        originator: from.ip().to_canonical().to_string(),
        originator_port: from.port(),
    }
    .encode();
    let Ok(params) = params else { return };
    match router.open(ChannelKind::ReverseForward, &params).await {
        Ok(channel) => splice(channel, sock).await,
        Err(e) => debug!("forwarded connection from {from} not taken: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_parse_like_ssh() {
        let s: ForwardSpec = "8080:localhost:80".parse().unwrap();
        assert_eq!(
            s,
            ForwardSpec {
                bind: None,
                port: 8080,
                host: "localhost".into(),
                host_port: 80
            }
        );
        let s: ForwardSpec = "[::1]:0:[fe80::1]:22".parse().unwrap();
        assert_eq!(s.bind.as_deref(), Some("::1"));
        assert_eq!((s.port, s.host.as_str(), s.host_port), (0, "fe80::1", 22));
        assert_eq!(s.to_string(), "[::1]:0:[fe80::1]:22");
        let s: ForwardSpec = "*:1:h:2".parse().unwrap();
        assert_eq!(local_bind_host(&s.bind), "::");
        assert_eq!(local_bind_host(&None), DEFAULT_BIND);
        for bad in [
            "80",
            "a:b:c",
            "1:h:x",
            "1:2:3:4:5",
            "[::1:1:h:2",
            "1::2",
            "70000:h:1",
        ] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_binds_remote_forwards_on_loopback_only() {
        assert_eq!(remote_bind_addr("").unwrap(), DEFAULT_BIND);
        assert!(remote_bind_addr("localhost").is_ok());
        assert!(remote_bind_addr("::1").is_ok());
        assert!(remote_bind_addr("127.0.0.5").is_ok());
        assert!(remote_bind_addr("0.0.0.0").is_err());
        assert!(remote_bind_addr("*").is_err());
        assert!(remote_bind_addr("192.0.2.1").is_err());
    }
}
