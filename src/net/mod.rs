//! Tokio drivers that move the sans-IO core's bytes over real links.

pub mod discovery;
pub mod tcp;
