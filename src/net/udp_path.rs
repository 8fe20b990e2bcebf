//! Datagram paths: how sealed datagram records (core::datagram) reach the peer.
//!
//! [`PacketPath`] is what the VPN needs from any UDP link: send a batch of records to an
//! address. [`UdpLink`] implements it over one plain UDP socket, with quinn's socket layer
//! (`quinn-udp`): UDP GSO sends up to 64 equal-sized records in one `sendmsg`, recvmmsg and
//! UDP GRO receive many per system call. [`MuxPath`] implements it over the NAT traversal
//! socket ([`UdpMux`]: one socket demultiplexed by first byte, STUN and QUIC beside qssh
//! records), sending to a peer's virtual address so each record follows the session's
//! current path (direct once punched, else through the relay); records arriving there
//! (first byte 0x05) come out of [`UdpMux::datagrams`] and go to the VPN's incoming-record
//! hook (`app::vpn::Tunnel::handle_records`).

use quinn::udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::udp::UdpMux;

/// Socket buffer size asked for (the kernel caps it at net.core.[rw]mem_max).
pub const UDP_SOCKET_BUFFER: usize = 8 << 20;
/// Largest UDP payload one receive buffer must hold without GRO.
pub const MAX_UDP_PAYLOAD: usize = 65_535;
/// Largest total payload of one GSO send: the kernel segments one UDP "super-datagram",
/// whose length must fit the 16-bit IP/UDP length fields with headers.
pub const MAX_GSO_BYTES: usize = 65_000;

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
}

/// One UDP socket with batched I/O.
pub struct UdpLink {
    sock: UdpSocket,
    state: UdpSocketState,
}

/// Reusable receive buffers for [`UdpLink::recv_batch`].
pub struct RecvBuffers {
    /// Grown on demand up to `BATCH_SIZE` buffers of `size` bytes (see `recv_batch`).
    bufs: Vec<Vec<u8>>,
    size: usize,
    meta: Vec<RecvMeta>,
}

impl RecvBuffers {
    /// Received buffer `i` (below what `recv_batch` returned): sender, payload, and the
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
    /// Binds `addr` (use port 0 for any). Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpLink> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std).into())?;
        // Best effort: bigger buffers absorb bursts (tunnels are loss-limited by them).
        let _ = state.set_send_buffer_size((&std).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_recv_buffer_size((&std).into(), UDP_SOCKET_BUFFER);
        Ok(UdpLink {
            sock: UdpSocket::from_std(std)?,
            state,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
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
        }
    }

    /// Waits for datagrams; returns how many buffers [`RecvBuffers::get`] now holds.
    ///
    /// The full set of buffers is about 3 MB with GRO, and allocating it zeroed costs
    /// milliseconds of page faults; a VPN peer used to pay that in front of its first
    /// packet. So there is one buffer at first, and the set doubles each time a batch fills
    /// every buffer there is, up to `BATCH_SIZE`.
    pub async fn recv_batch(&self, rb: &mut RecvBuffers) -> io::Result<usize> {
        let n = loop {
            self.sock.readable().await?;
            if rb.bufs.is_empty() {
                rb.bufs.push(vec![0u8; rb.size]);
            }
            let mut slices: Vec<IoSliceMut<'_>> =
                rb.bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let meta = &mut rb.meta[..slices.len()];
            match self.sock.try_io(Interest::READABLE, || {
                self.state.recv((&self.sock).into(), &mut slices, meta)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == rb.bufs.len() && n < BATCH_SIZE {
            let more = n.min(BATCH_SIZE - n);
            rb.bufs.extend((0..more).map(|_| vec![0u8; rb.size]));
        }
        Ok(n)
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
    fn send_records<'a>(
        &'a self,
        dest: SocketAddr,
        buf: &'a [u8],
        stride: usize,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            if stride == 0 {
                return Ok(());
            }
            for t in gso_transmits(buf, stride, dest, self.max_segments(), 0) {
                self.sock
                    .async_io(Interest::WRITABLE, || {
                        self.state.try_send((&self.sock).into(), &t)
                    })
                    .await?;
            }
            Ok(())
        })
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

    #[tokio::test]
    async fn batched_records_arrive_whole_and_in_order() {
        let a = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = UdpLink::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dest = b.local_addr().unwrap();
        // 10 records of 100 bytes and a short last one, in one call.
        let mut buf = Vec::new();
        for i in 0..10u8 {
            buf.extend_from_slice(&[i; 100]);
        }
        buf.extend_from_slice(&[10; 7]);
        a.send_records(dest, &buf, 100).await.unwrap();
        let mut rb = b.recv_buffers();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let from = a.local_addr().unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 11 && tokio::time::Instant::now() < deadline {
            let n = tokio::time::timeout_at(deadline, b.recv_batch(&mut rb))
                .await
                .expect("records within 5 s")
                .unwrap();
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
    /// time a batch fills them all, up to `BATCH_SIZE`; every datagram still arrives.
    #[tokio::test]
    async fn receive_buffers_grow_with_the_traffic_and_stay_bounded() {
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
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while got < count {
            let n = tokio::time::timeout_at(deadline, b.recv_batch(&mut rb))
                .await
                .expect("datagrams within 5 s")
                .unwrap();
            got += n;
            sizes.push(rb.bufs.len());
        }
        assert_eq!(got, count);
        assert_eq!(sizes[0], 2, "one buffer first, filled, then two: {sizes:?}");
        // Each batch keeps the set or doubles it, never past BATCH_SIZE.
        assert!(
            sizes
                .windows(2)
                .all(|w| w[1] == w[0] || w[1] == (2 * w[0]).min(BATCH_SIZE)),
            "{sizes:?}"
        );
        assert_eq!(*sizes.last().unwrap(), BATCH_SIZE, "{sizes:?}");
    }
}
