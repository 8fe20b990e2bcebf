//! Services on top of a session (chat, shell, exec, forwarding, the VPN) and the local
//! state they use (identity, known and authorized peers).

pub mod bulk;
pub mod chat;
pub mod cmdio;
pub mod demo;
pub mod dial;
pub mod exec;
pub mod forward;
pub mod keys;
pub mod listener;
pub mod netcmd;
pub mod policy;
pub mod pty;
pub mod router;
pub mod shell;
pub mod store;
pub mod target;
pub mod vpn;
