//! Services on top of a session and the local state they use.

pub mod chat;
pub mod demo;
pub mod dial;
pub mod keys;
pub mod store;
pub mod target;
