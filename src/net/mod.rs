//! Tokio drivers that move the sans-IO core's bytes over real links.

pub mod discovery;
pub mod eyeballs;
pub mod path;
pub mod quic;
pub mod relay;
pub mod stun;
pub mod tcp;
pub mod tun;
pub mod udp;
pub mod udp_path;
