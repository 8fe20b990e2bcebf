//! Datagram paths: how sealed datagram records (core::datagram) reach the peer.
//!
//! [`PacketPath`] is what the VPN needs from any UDP link: send a batch of records to an
//! address. [`UdpLink`] implements it over one plain UDP socket, with quinn's socket layer
//! (`quinn-udp`): UDP GSO sends up to 64 equal-sized records in one `sendmsg`, recvmmsg and
//! UDP GRO receive many per system call. A `UdpLink` is not registered with the async
//! runtime: the VPN's packet thread (`app::vpn`) waits on it with epoll and uses it
//! without tokio in between, as boringtun's and wireguard-go's packet loops do.
//! [`MuxPath`] implements it over the NAT traversal socket ([`UdpMux`]: one socket
//! demultiplexed by first byte, STUN and QUIC beside qssh records), sending to a peer's
//! virtual address so each record follows the session's current path (direct once punched,
//! else through the relay); records arriving there (first byte 0x05) come out of
//! [`UdpMux::datagrams`] and go to the VPN's incoming-record hook.

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::time::Duration;

use super::udp::UdpMux;

/// Socket buffer size asked for (the kernel caps it at net.core.[rw]mem_max).
pub const UDP_SOCKET_BUFFER: usize = 8 << 20;
/// Largest UDP payload one receive buffer must hold without GRO.
pub const MAX_UDP_PAYLOAD: usize = 65_535;
/// Largest total payload of one GSO send: the kernel segments one UDP "super-datagram",
/// whose length must fit the 16-bit IP/UDP length fields with headers.
pub const MAX_GSO_BYTES: usize = 65_000;
/// Longest wait for room in a full socket send buffer before a batch is given up (lost, as
/// UDP may lose it).
pub const UDP_SEND_WAIT: Duration = Duration::from_secs(1);
/// A quiet socket is read one datagram at a time, but at most this many times in a row
/// before a batch receive checks whether it is busy after all
/// ([`UdpLink::try_recv_batch`]).
pub const QUIET_BATCH_EVERY: u32 = 32;

/// Something that carries datagram records to a peer.
pub trait PacketPath: Send + Sync {
    /// Sends `buf` to `dest` as consecutive records of `stride` bytes each (the last may be
    /// shorter), in order. Waits while the socket buffer is full; other errors are the
    /// network's business (UDP is lossy) and are returned for counting.
    fn send_records<'a>(
        &'a self,
        dest: SocketAddr,
        buf: &'a [u8],
        stride: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

    /// The plain socket under this path, when it is one: the packet thread sends on it
    /// directly instead of through the async runtime.
    fn direct(&self) -> Option<&UdpLink> {
        None
    }
}

/// One UDP socket with batched I/O, non-blocking, outside the async runtime.
pub struct UdpLink {
    sock: UdpSocket,
    state: UdpSocketState,
    /// The peer this socket is connected to ([`UdpLink::connected`]).
    peer: Option<SocketAddr>,
}

/// Reusable receive buffers for [`UdpLink::try_recv_batch`].
pub struct RecvBuffers {
    /// Grown on demand up to `BATCH_SIZE` buffers of `size` bytes (see `try_recv_batch`).
    bufs: Vec<Vec<u8>>,
    size: usize,
    meta: Vec<RecvMeta>,
    /// Receives in a row that took a single datagram with one `recvmsg` (see
    /// `try_recv_batch`); `None` while the socket is busy and read in batches.
    quiet: Option<u32>,
    /// Control-message room for that `recvmsg`: GRO segment size, packet info, TOS.
    cmsg: Vec<u8>,
}

impl RecvBuffers {
    /// Received buffer `i` (below what `try_recv_batch` returned): sender, payload, and the
    /// stride of the records in it (GRO: several records of `stride` bytes, the last maybe
    /// shorter; otherwise one record).
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8], usize) {
        let (m, b) = (&self.meta[i], &self.bufs[i]);
        let len = m.len.min(b.len());
        let stride = if m.stride == 0 { len } else { m.stride };
        (m.addr, &b[..len], stride)
    }
}

impl UdpLink {
    /// Binds `addr` (use port 0 for any). The port is then opened to sockets connected to
    /// one peer each ([`UdpLink::connected`]); being bound first, it is one nobody else had.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpLink> {
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        sock.bind(&addr.into())?;
        sock.set_reuse_port(true)?;
        UdpLink::new(sock.into(), None)
    }

    /// A socket on this one's address and port, connected to `peer`: the kernel gives it
    /// the peer's datagrams (the connected socket matches first) and keeps the route of
    /// both directions with it (a received datagram is matched to the socket early, with no
    /// route lookup; a lone record goes out by `send`, without one either). Its peer sees
    /// the same address and port as before.
    pub fn connected(&self, peer: SocketAddr) -> io::Result<UdpLink> {
        let local = self.local_addr()?;
        let sock = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_reuse_port(true)?;
        sock.bind(&local.into())?;
        sock.connect(&peer.into())?;
        UdpLink::new(sock.into(), Some(peer))
    }

    fn new(sock: UdpSocket, peer: Option<SocketAddr>) -> io::Result<UdpLink> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        // Best effort: bigger buffers absorb bursts (tunnels are loss-limited by them).
        let _ = state.set_send_buffer_size((&sock).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_recv_buffer_size((&sock).into(), UDP_SOCKET_BUFFER);
        Ok(UdpLink { sock, state, peer })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// The peer this socket is connected to, if it is.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Records one GSO send may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Buffers sized for this socket's GRO, allocated as traffic needs them.
    pub fn recv_buffers(&self) -> RecvBuffers {
        RecvBuffers {
            bufs: Vec::new(),
            size: (self.state.gro_segments().max(1) * 1500).max(MAX_UDP_PAYLOAD),
            meta: vec![RecvMeta::default(); BATCH_SIZE],
            quiet: Some(0),
            cmsg: nix::cmsg_space!(libc::c_int, libc::in6_pktinfo, libc::c_int),
        }
    }

    /// Takes what the socket holds without waiting (`WouldBlock` when it holds nothing);
    /// returns how many buffers [`RecvBuffers::get`] now holds.
    ///
    /// The full set of buffers is about 3 MB with GRO, and allocating it zeroed costs
    /// milliseconds of page faults; a VPN peer used to pay that in front of its first
    /// packet. So there is one buffer at first, and the set doubles each time a batch fills
    /// every buffer there is, up to `BATCH_SIZE`.
    ///
    /// A quiet socket (the last receive found one datagram, not coalesced) is read with one
    /// plain `recvmsg` instead: the batch receive prepares `BATCH_SIZE` message headers and
    /// costs a VPN ping's cold turn about 4 µs more (docs/vpn.md, session 13). Every
    /// [`QUIET_BATCH_EVERY`]th receive in a row is a batch again, so a busy socket whose
    /// datagrams GRO cannot join is still read in batches after a few calls.
    pub fn try_recv_batch(&self, rb: &mut RecvBuffers) -> io::Result<usize> {
        if rb.bufs.is_empty() {
            rb.bufs.push(vec![0u8; rb.size]);
        }
        if let Some(singles) = rb.quiet.filter(|&n| n < QUIET_BATCH_EVERY) {
            self.recv_one(rb)?;
            let m = &rb.meta[0];
            rb.quiet = (m.stride >= m.len).then_some(singles + 1);
            return Ok(1);
        }
        let count = rb.bufs.len();
        let mut slices: [IoSliceMut<'_>; BATCH_SIZE] =
            std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (s, b) in slices.iter_mut().zip(&mut rb.bufs) {
            *s = IoSliceMut::new(b);
        }
        let meta = &mut rb.meta[..count];
        let n = self
            .state
            .recv((&self.sock).into(), &mut slices[..count], meta)?;
        if n == count && n < BATCH_SIZE {
            let more = n.min(BATCH_SIZE - n);
            rb.bufs.extend((0..more).map(|_| vec![0u8; rb.size]));
        }
        // Quiet: room for more, and only one datagram, not coalesced.
        let m = &rb.meta[0];
        rb.quiet = (n == 1 && count > 1 && m.stride >= m.len).then_some(0);
        Ok(n)
    }

    /// One datagram into the first buffer, by `recvmsg`.
    fn recv_one(&self, rb: &mut RecvBuffers) -> io::Result<()> {
        let mut iov = [IoSliceMut::new(&mut rb.bufs[0])];
        let msg = recvmsg::<SockaddrStorage>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut rb.cmsg),
            MsgFlags::empty(),
        )?;
        let len = msg.bytes;
        // The GRO control message comes first when there is one (udp_recvmsg).
        let stride = msg
            .cmsgs()
            .ok()
            .and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::UdpGroSegments(s) => usize::try_from(s).ok(),
                    _ => None,
                })
            })
            .unwrap_or(len);
        let addr = match self.peer {
            Some(p) => p,
            None => {
                let a = msg.address.as_ref();
                match (
                    a.and_then(SockaddrStorage::as_sockaddr_in),
                    a.and_then(SockaddrStorage::as_sockaddr_in6),
                ) {
                    (Some(v4), _) => SocketAddr::V4((*v4).into()),
                    (_, Some(v6)) => SocketAddr::V6((*v6).into()),
                    _ => return Err(io::Error::other("datagram without a sender address")),
                }
            }
        };
        let m = &mut rb.meta[0];
        m.addr = addr;
        m.len = len;
        m.stride = stride;
        Ok(())
    }

    /// Sends `buf` to `dest` as records of `stride` bytes in GSO batches, waiting (at most
    /// [`UDP_SEND_WAIT`] each time) while the socket buffer is full. For the packet thread.
    pub fn send_records_blocking(
        &self,
        dest: SocketAddr,
        buf: &[u8],
        stride: usize,
    ) -> io::Result<()> {
        self.send_all(dest, buf, stride, true)
    }

    /// [`Self::send_records_blocking`]; without `wait`, a full socket buffer is an error
    /// (`WouldBlock`) and the rest of the records are lost.
    fn send_all(&self, dest: SocketAddr, buf: &[u8], stride: usize, wait: bool) -> io::Result<()> {
        if stride == 0 {
            return Ok(());
        }
        if buf.len() <= stride && self.peer == Some(dest) {
            // One record to the connected peer: no destination, so no route lookup.
            return self.until_sent(wait, || self.sock.send(buf).map(drop));
        }
        for t in gso_transmits(buf, stride, dest, self.max_segments(), 0) {
            self.until_sent(wait, || self.state.send((&self.sock).into(), &t))?;
        }
        Ok(())
    }

    /// Runs `send`; with `wait`, again after each full socket buffer once there is room (at
    /// most [`UDP_SEND_WAIT`] each time).
    fn until_sent(&self, wait: bool, mut send: impl FnMut() -> io::Result<()>) -> io::Result<()> {
        loop {
            match send() {
                Err(e) if wait && e.kind() == io::ErrorKind::WouldBlock => {
                    wait_writable(self.sock.as_fd(), UDP_SEND_WAIT)?
                }
                r => return r,
            }
        }
    }
}

impl AsFd for UdpLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// `d` as poll(2) takes it.
fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// Waits until `fd` can be written, at most `limit`.
fn wait_writable(fd: BorrowedFd<'_>, limit: Duration) -> io::Result<()> {
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
    match poll(&mut fds, Some(&timespec(limit))) {
        Ok(0) => Err(io::ErrorKind::TimedOut.into()),
        Ok(_) => Ok(()),
        Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `buf`, records of `stride` bytes (the last may be shorter; `stride` > 0), as GSO sends to
/// `dest`: at most `max_segments` records each, and at most `MAX_GSO_BYTES` even after every
/// segment grew by `extra` bytes (a RELAY_DATA header, when relayed).
pub fn gso_transmits(
    buf: &[u8],
    stride: usize,
    dest: SocketAddr,
    max_segments: usize,
    extra: usize,
) -> impl Iterator<Item = Transmit<'_>> {
    let segments = max_segments.min(MAX_GSO_BYTES / (stride + extra)).max(1);
    buf.chunks(stride * segments).map(move |chunk| Transmit {
        destination: dest,
        ecn: None,
        contents: chunk,
        segment_size: (chunk.len() > stride).then_some(stride),
        src_ip: None,
    })
}

impl PacketPath for UdpLink {
    /// From async code (keepalives): never waits; a full socket buffer loses the records.
    fn send_records<'a>(
        &'a self,
        dest: SocketAddr,
        buf: &'a [u8],
        stride: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(std::future::ready(self.send_all(dest, buf, stride, false)))
    }

    fn direct(&self) -> Option<&UdpLink> {
        Some(self)
    }
}

/// Datagram records over the NAT traversal socket, on the same path as the QUIC session
/// with the peer: `dest` is the session's peer address (virtual for peers reached through a
/// relay), resolved per record by the socket's route table.
pub struct MuxPath {
    mux: UdpMux,
}

impl MuxPath {
    pub fn new(mux: UdpMux) -> MuxPath {
        MuxPath { mux }
    }
}

impl PacketPath for MuxPath {
    fn send_records<'a>(
        &'a self,
        dest: SocketAddr,
        buf: &'a [u8],
        stride: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(self.mux.send_routed_records(buf, stride, dest))
    }
}

/// Splits a received buffer into records of `stride` bytes (the last may be shorter).
pub fn records(buf: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    buf.chunks(stride.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits (until `deadline`) for `link` to be readable, then takes a batch.
    fn recv_by(link: &UdpLink, rb: &mut RecvBuffers, deadline: Instant) -> usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(link, PollFlags::IN)];
        assert_eq!(
            poll(&mut fds, Some(&timespec(left))).unwrap(),
            1,
            "datagrams in time"
        );
        link.try_recv_batch(rb).unwrap()
    }

    #[test]
    fn batched_records_arrive_whole_and_in_order() {
        let a = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dest = b.local_addr().unwrap();
        // 10 records of 100 bytes and a short last one, in one call.
        let mut buf = Vec::new();
        for i in 0..10u8 {
            buf.extend_from_slice(&[i; 100]);
        }
        buf.extend_from_slice(&[10; 7]);
        a.send_records_blocking(dest, &buf, 100).unwrap();
        let mut rb = b.recv_buffers();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let from = a.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 11 {
            let n = recv_by(&b, &mut rb, deadline);
            for i in 0..n {
                let (src, payload, stride) = rb.get(i);
                assert_eq!(src, from);
                got.extend(records(payload, stride).map(<[u8]>::to_vec));
            }
        }
        assert_eq!(got.len(), 11);
        for (i, r) in got.iter().enumerate() {
            let want = if i < 10 { 100 } else { 7 };
            assert_eq!(r.len(), want);
            assert!(r.iter().all(|&x| x == i as u8));
        }
    }

    /// Receive buffers cost nothing before the first datagram, start at one and double each
    /// time a batch fills them all, up to `BATCH_SIZE`; every datagram still arrives. The
    /// first receives of a quiet socket take one datagram each, and a busy one is read in
    /// batches after a few of them, even though GRO cannot join its datagrams.
    #[test]
    fn receive_buffers_grow_with_the_traffic_and_stay_bounded() {
        let b = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut rb = b.recv_buffers();
        assert!(rb.bufs.is_empty(), "allocated before any traffic");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Strictly growing sizes: GRO never joins two of them into one buffer.
        let count = 4 * BATCH_SIZE;
        for i in 0..count {
            sender
                .send_to(&vec![7u8; 10 + i], b.local_addr().unwrap())
                .unwrap();
        }
        let mut sizes = Vec::new();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got < count {
            let n = recv_by(&b, &mut rb, deadline);
            got += n;
            sizes.push(rb.bufs.len());
        }
        assert_eq!(got, count);
        let singles = QUIET_BATCH_EVERY as usize;
        assert!(sizes[..singles].iter().all(|&s| s == 1), "{sizes:?}");
        assert_eq!(
            sizes[singles], 2,
            "one buffer first, filled, then two: {sizes:?}"
        );
        assert!(sizes.len() < count / 2, "mostly batches: {sizes:?}");
        // Each batch keeps the set or doubles it, never past BATCH_SIZE.
        assert!(
            sizes
                .windows(2)
                .all(|w| w[1] == w[0] || w[1] == (2 * w[0]).min(BATCH_SIZE)),
            "{sizes:?}"
        );
        assert_eq!(*sizes.last().unwrap(), BATCH_SIZE, "{sizes:?}");
    }

    /// Lone datagrams are read one at a time; a coalesced (GRO) one, or a batch that finds
    /// several, means the socket is busy, and it is read in batches until a batch finds one.
    #[test]
    fn a_quiet_socket_is_read_one_datagram_at_a_time() {
        let a = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dest = b.local_addr().unwrap();
        let mut rb = b.recv_buffers();
        let deadline = Instant::now() + Duration::from_secs(5);
        for i in 1..=2 {
            a.send_records_blocking(dest, b"ping", 4).unwrap();
            assert_eq!(recv_by(&b, &mut rb, deadline), 1);
            assert_eq!(rb.quiet, Some(i));
        }
        if a.max_segments() == 1 || b.state.gro_segments() == 1 {
            eprintln!("the rest skipped: no UDP GSO/GRO here");
            return;
        }
        a.send_records_blocking(dest, &[1; 400], 100).unwrap();
        assert_eq!(recv_by(&b, &mut rb, deadline), 1);
        assert_eq!(rb.get(0).2, 100, "four records in one buffer");
        assert_eq!(rb.quiet, None, "busy");
        // A batch of one buffer is full with one datagram: it cannot tell, and grows.
        a.send_records_blocking(dest, b"ping", 4).unwrap();
        assert_eq!(recv_by(&b, &mut rb, deadline), 1);
        assert_eq!((rb.bufs.len(), rb.quiet), (2, None));
        a.send_records_blocking(dest, b"ping", 4).unwrap();
        assert_eq!(recv_by(&b, &mut rb, deadline), 1);
        assert_eq!(
            rb.quiet,
            Some(0),
            "a batch with room found one: quiet again"
        );
    }

    /// The quiet path reads the sender's address and the GRO segment size over IPv6 too
    /// (packet info and traffic class come along and must fit the control-message room).
    #[test]
    fn the_quiet_path_reads_ipv6_senders_and_gro() {
        let Ok(b) = UdpLink::bind("[::1]:0".parse().unwrap()) else {
            eprintln!("skipped: no IPv6 loopback");
            return;
        };
        let a = UdpLink::bind("[::1]:0".parse().unwrap()).unwrap();
        let dest = b.local_addr().unwrap();
        let mut rb = b.recv_buffers();
        let deadline = Instant::now() + Duration::from_secs(5);
        a.send_records_blocking(dest, b"ping", 4).unwrap();
        assert_eq!(recv_by(&b, &mut rb, deadline), 1);
        let (src, payload, stride) = rb.get(0);
        assert_eq!(
            (src, payload, stride),
            (a.local_addr().unwrap(), &b"ping"[..], 4)
        );
        if a.max_segments() == 1 || b.state.gro_segments() == 1 {
            eprintln!("GRO part skipped: no UDP GSO/GRO here");
            return;
        }
        a.send_records_blocking(dest, &[2; 250], 100).unwrap();
        assert_eq!(recv_by(&b, &mut rb, deadline), 1);
        let (_, payload, stride) = rb.get(0);
        assert_eq!((payload.len(), stride), (250, 100));
    }

    /// A socket connected to one peer shares the main socket's port: that peer's
    /// datagrams reach it (and it answers from the same port), everyone else's still reach
    /// the main socket; closing it gives the peer back to the main socket.
    #[test]
    fn connected_socket_takes_its_peer_and_only_its_peer() {
        let main = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = main.local_addr().unwrap();
        let peer = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let other = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = main.connected(peer.local_addr().unwrap()).unwrap();
        assert_eq!(conn.local_addr().unwrap(), port);
        assert_eq!(conn.peer(), Some(peer.local_addr().unwrap()));
        let deadline = Instant::now() + Duration::from_secs(5);
        let one = |from: &UdpLink, to: &UdpLink, what: &[u8]| {
            from.send_records_blocking(port, what, what.len()).unwrap();
            let mut rb = to.recv_buffers();
            assert_eq!(recv_by(to, &mut rb, deadline), 1);
            let (src, payload, _) = rb.get(0);
            assert_eq!((src, payload), (from.local_addr().unwrap(), what));
        };
        one(&peer, &conn, b"from the peer");
        one(&other, &main, b"from someone else");
        // The answer leaves from the shared port, by the connected fast path.
        conn.send_records_blocking(peer.local_addr().unwrap(), b"reply", 5)
            .unwrap();
        let mut rb = peer.recv_buffers();
        assert_eq!(recv_by(&peer, &mut rb, deadline), 1);
        assert_eq!(rb.get(0).0, port);
        assert_eq!(rb.get(0).1, b"reply");
        drop(conn);
        one(&peer, &main, b"after the close");
    }
}
