//! Services on top of a session (chat, and later shell, exec, forwarding, VPN) and the local
//! state they use (identity, known and authorized peers).

pub mod chat;
pub mod demo;
pub mod dial;
pub mod keys;
pub mod listener;
pub mod netcmd;
pub mod router;
pub mod store;
pub mod target;
