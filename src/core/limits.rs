//! Named limits. Every quantity a peer can make us store, wait for or compute is bounded by
//! one of these constants, and every decoder checks against them before it allocates.

use std::time::Duration;

/// Wire protocol version spoken by this build. It is inside every signed transcript.
/// Version 2: ratchet records of up to 64 KiB (version 1 had 16 KiB).
pub const PROTOCOL_VERSION: u8 = 2;

/// Largest handshake message body (an SLH-DSA-SHA2-128f signature is 17 088 bytes).
pub const MAX_HANDSHAKE_MSG: usize = 32 * 1024;
/// Largest application plaintext carried by one ratchet record. Every record costs a
/// chain-key step, an AES key schedule and its header and tag; at 64 KiB instead of 16 KiB
/// bulk transfer spent about 5 % less CPU (bench/README, exec session 8).
pub const MAX_RECORD_PLAINTEXT: usize = 64 * 1024;
/// Largest record body on an established stream link (a ratchet record with KEM fields; the
/// ratchet asserts it is enough). Before establishment records are handshake messages,
/// bounded by [`MAX_HANDSHAKE_MSG`].
pub const MAX_RECORD_BODY: usize = 72 * 1024;
/// Largest datagram record (one IP packet plus overhead).
pub const MAX_DATAGRAM: usize = 65_535;

/// A chain may skip at most this many message keys in one jump (Signal's MAX_SKIP).
pub const MAX_SKIP: u32 = 1000;
/// Total skipped message keys kept across all chains; the oldest are evicted beyond this.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Receiving chains remembered besides the current one (for late messages of old chains).
pub const MAX_OLD_CHAINS: usize = 4;

/// A DH ratchet step happens on the first send after a new peer ratchet key arrived, but at
/// most once per this interval. It bounds the cost of fast direction changes: a step costs
/// each side two or three X25519 operations, and every eighth one an ML-KEM step. At 20 ms,
/// bulk traffic both ways spent about 2 % of each session thread on X25519; at 100 ms a
/// fifth of that, and a compromise still heals within a few tenths of a second of traffic.
pub const DH_RATCHET_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// A receiver that has taken this many records without sending sends an empty ratchet
/// acknowledgement, so a one-way stream still steps the ratchet every N messages.
pub const RATCHET_ACK_EVERY_MESSAGES: u32 = 1024;
/// ... or after this long.
pub const RATCHET_ACK_INTERVAL: Duration = Duration::from_secs(10);
/// A post-quantum KEM ratchet step is started after this many DH steps of our own ...
pub const PQ_RATCHET_EVERY_STEPS: u32 = 8;
/// ... or when this much time has passed since the last one, whichever comes first.
pub const PQ_RATCHET_INTERVAL: Duration = Duration::from_secs(60);

/// Datagram replay window, in packets (a multiple of 64).
pub const REPLAY_WINDOW: u64 = 4096;
/// A datagram sender moves to a new epoch key after this many packets ...
pub const DATAGRAM_REKEY_PACKETS: u64 = 1 << 24;
/// ... or after this long.
pub const DATAGRAM_REKEY_INTERVAL: Duration = Duration::from_secs(120);
/// Receivers keep the previous epoch key this long after the first authenticated datagram of
/// the next epoch, so packets in flight across a rotation still open.
pub const DATAGRAM_EPOCH_GRACE: Duration = Duration::from_secs(10);
/// Hard stop per datagram epoch key (AES-GCM confidentiality bound; the counter runs in
/// `0 .. DATAGRAM_MAX_PACKETS`); it must have rotated long before (at DATAGRAM_REKEY_PACKETS).
pub const DATAGRAM_MAX_PACKETS: u64 = 1 << 32;
/// Hard stop: a sender never seals under an epoch key older than this (counted from its
/// creation), so a rotation that never completes cannot keep a key in use indefinitely.
/// Receivers drop an epoch key this long plus DATAGRAM_EPOCH_GRACE after installing it.
pub const DATAGRAM_REJECT_AFTER: Duration = Duration::from_secs(180);

/// A handshake must complete within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle sessions send a ping after this long ...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// ... and are closed when nothing at all arrived for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Channels open at once in one session.
pub const MAX_CHANNELS: usize = 256;
/// Initial and maximum receive window per channel, in bytes.
pub const CHANNEL_WINDOW: u32 = 1 << 20;
/// Bytes of a single DATA frame (its length is a u16 on the wire).
pub const MAX_FRAME_DATA: usize = MAX_RECORD_PLAINTEXT - 16;
const _: () = assert!(MAX_FRAME_DATA <= u16::MAX as usize);
/// Bytes of a channel open parameter block or a close reason.
pub const MAX_CHANNEL_PARAMS: usize = 4096;
/// Bytes of a display name.
pub const MAX_NAME: usize = 64;
/// Bytes of a chat message.
pub const MAX_CHAT_MESSAGE: usize = 8192;
/// Largest Data event a session hands to the application: consecutive DATA frames of one
/// stream channel (not chat) that arrive together are joined up to this many bytes.
pub const MAX_DATA_EVENT: usize = 256 * 1024;
/// A link's read buffer becomes a Data event (no copy) only when the event's data fills at
/// least this fraction of it: buffers waiting in the application stay within this factor of
/// the channel windows that bound their data.
pub const MAX_DATA_EVENT_SLACK: usize = 4;
/// Emptied Data buffers the application may hand back for reuse ([`MAX_DATA_EVENT`] each):
/// bulk transfer then allocates no new buffers.
pub const MAX_SPARE_BUFFERS: usize = 4;
/// Written record buffers a session keeps for the next records and for data read straight
/// into records (`session::RECORD_CAPACITY`, about 66 KiB, each).
pub const MAX_SPARE_RECORDS: usize = 8;
/// Records a session queues for sending before the application must wait.
pub const MAX_QUEUED_RECORDS: usize = 4096;

/// Handshakes in progress at once on a listener.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// Established sessions at once on a listener.
pub const MAX_SESSIONS: usize = 256;
/// Handshakes per second accepted from one IP address (token bucket rate) ...
pub const HANDSHAKES_PER_IP_PER_SEC: u32 = 5;
/// ... and the bucket's burst.
pub const HANDSHAKE_BURST_PER_IP: u32 = 20;
/// Pre-shared key length in bytes.
pub const PSK_LEN: usize = 32;

/// Bytes of a terminal type name (`TERM`) in shell/exec parameters.
pub const MAX_TERM_NAME: usize = 64;
/// Environment variables one shell/exec request may carry.
pub const MAX_ENV_VARS: usize = 32;
/// Bytes of an environment variable name ...
pub const MAX_ENV_NAME: usize = 64;
/// ... and of its value.
pub const MAX_ENV_VALUE: usize = 1024;
/// Words of a remote command (the whole request is also bounded by MAX_CHANNEL_PARAMS).
pub const MAX_EXEC_ARGS: usize = 1024;
/// Bytes of a host name or address in forwarding parameters (a DNS name is at most 253).
pub const MAX_HOST_NAME: usize = 255;
/// Largest body of one STDIN/STDOUT/STDERR message inside a shell/exec channel. Receivers
/// stream data bodies without buffering them whole; control messages are a few bytes.
pub const MAX_EXEC_DATA: usize = 1 << 20;
// ---- NAT traversal: UDP socket, STUN, rendezvous and relay (docs/nat-traversal.md) ----

/// Candidate addresses in one registration, introduction or lookup answer.
pub const MAX_CANDIDATES: usize = 8;
/// Bytes of a relay error reason.
pub const MAX_RELAY_ERROR_TEXT: usize = 256;
/// Largest UDP payload read from the shared socket (anything larger is truncated and dropped).
pub const MAX_UDP_PAYLOAD: usize = 65_535;
/// Largest packet a relay forwards in one RELAY_DATA message (QUIC packets are at most
/// QUIC_MAX_UDP_PAYLOAD; the rest is headroom).
pub const MAX_RELAY_PACKET: usize = 1500;
/// QUIC's largest UDP payload: MTU discovery stops here, so a packet still fits a 1500-byte
/// link with IPv6 and UDP headers after the relay adds its 9-byte header.
pub const QUIC_MAX_UDP_PAYLOAD: u16 = 1400;
/// QUIC flow-control window of one stream: bytes a peer may send ahead of what we have read.
/// Bounds throughput to window / RTT (4 MiB: 40 MiB/s at 100 ms, 130 MiB/s at 30 ms), like
/// the kernel's TCP receive buffer (`tcp_rmem`, 6 MiB at most by default) does for TCP.
pub const QUIC_STREAM_WINDOW: u32 = 4 << 20;
/// QUIC flow-control window of a whole connection (one session stream in use).
pub const QUIC_CONNECTION_WINDOW: u32 = QUIC_STREAM_WINDOW;
/// Unacknowledged bytes we buffer for sending on one QUIC connection.
pub const QUIC_SEND_WINDOW: u64 = 8 << 20;
/// Received QUIC packets queued for the QUIC engine; beyond this they are dropped (as a full
/// socket buffer would).
pub const QUIC_RECV_QUEUE: usize = 4096;
/// Received VPN datagram records queued between the shared NAT traversal socket and the
/// tunnel; beyond this they are dropped (as a full socket buffer would).
pub const VPN_DATAGRAM_QUEUE: usize = 4096;
/// STUN transactions waiting for an answer on one socket.
pub const MAX_STUN_PENDING: usize = 64;
/// A STUN request is retransmitted after this long ...
pub const STUN_RETRANSMIT: std::time::Duration = std::time::Duration::from_millis(250);
/// ... and given up after this long.
pub const STUN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Registrations a relay holds at once.
pub const MAX_REGISTRATIONS: usize = 4096;
/// A registration lives this long without a refresh ...
pub const REGISTRATION_TTL: Duration = Duration::from_secs(30);
/// ... and listeners refresh it this often (this also keeps their NAT mapping to the relay).
pub const REGISTRATION_REFRESH: Duration = Duration::from_secs(10);
/// Relay slots (connector–listener pairs) at once, in total ...
pub const MAX_SLOTS: usize = 4096;
/// ... and per registered listener.
pub const MAX_SLOTS_PER_PEER: usize = 32;
/// A slot with no relayed packet and no introduction for this long is dropped.
pub const SLOT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A relay cookie is valid for the period it was made in and the next one.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(30);
/// Control messages per second accepted from one source IP (IPv6: /64) ...
pub const RELAY_CTRL_PER_IP_PER_SEC: u32 = 20;
/// ... with this burst.
pub const RELAY_CTRL_BURST_PER_IP: u32 = 40;
/// Source addresses whose control rate a relay tracks (the oldest are forgotten beyond).
pub const MAX_RELAY_TRACKED_SOURCES: usize = 16_384;
/// Relayed bytes per second per slot (both directions together) ...
pub const RELAY_BYTES_PER_SEC: u64 = 8 << 20;
/// ... with this burst.
pub const RELAY_BYTES_BURST: u64 = 2 << 20;
/// Relayed packets per second per slot ...
pub const RELAY_PACKETS_PER_SEC: u64 = 8192;
/// ... with this burst.
pub const RELAY_PACKETS_BURST: u64 = 2048;

/// Punch probes go out this often while punching ...
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(20);
/// ... for at most this many rounds (each round probes every candidate).
pub const PUNCH_ROUNDS: u32 = 150;
/// A direct path is kept alive (and checked) with a probe this often: well inside Linux's
/// 30 s timeout for unreplied UDP mappings.
pub const PATH_KEEPALIVE: Duration = Duration::from_secs(2);
/// A direct path from which nothing arrived for this long is dead: traffic falls back to the
/// relay and punching starts again.
pub const PATH_TIMEOUT: Duration = Duration::from_secs(7);
/// While relayed, punching is retried this often.
pub const REPUNCH_INTERVAL: Duration = Duration::from_secs(10);
/// Birthday probing (port-restricted cone ↔ symmetric): sockets the symmetric side opens ...
pub const BIRTHDAY_SOCKETS: usize = 256;
/// ... and random destination ports the cone side probes, in total ...
pub const BIRTHDAY_PROBES: usize = 1024;
/// ... within this time.
pub const BIRTHDAY_DURATION: Duration = Duration::from_secs(5);
