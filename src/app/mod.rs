//! Services and state built on the core: on-disk state and key management (chat and the
//! other session services come later).

pub mod keys;
pub mod store;
