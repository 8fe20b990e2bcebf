//! The sans-IO protocol core: identity, handshake, ratchet, record and frame codecs, channel
//! multiplexing and replay protection. Nothing in here opens a socket, reads a clock or spawns
//! a task: callers pass bytes and the current time in, and poll actions out.

pub mod admission;
pub mod announce;
pub mod codec;
pub mod crypto;
pub mod datagram;
pub mod frame;
pub mod handshake;
pub mod identity;
pub mod labels;
pub mod limits;
pub mod ratchet;
pub mod relay;
pub mod rendezvous;
pub mod replay;
pub mod service;
pub mod session;
pub mod vpn;
