//! qssh: a daemonless, quantum-safe, SSH-like peer-to-peer tool.
//!
//! - [`core`]: the sans-IO protocol (no sockets, no clocks).
//! - [`net`]: tokio drivers that move the core's bytes over real links.
//! - [`app`]: chat and the other services built on a session.
//! - [`cli`]: the command-line front end shared by `qssh` and `examples/p2p_demo.rs`.
#![deny(unsafe_code)]

pub mod app;
pub mod cli;
pub mod core;
pub mod net;
