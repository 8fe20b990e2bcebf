//! Every domain-separation label used by qssh, in one place.
//!
//! Each label names the protocol, its version and the purpose of the derived value, so a
//! value computed for one purpose can never be mistaken for another, and a future protocol
//! version derives unrelated keys. `docs/PROTOCOL.md` lists the same labels; a test below
//! keeps them pairwise distinct.

/// Hashed, together with the algorithm id and public key, into a peer ID.
pub const PEER_ID: &[u8] = b"qssh v1 peer id";
/// First input of the handshake transcript hash.
pub const TRANSCRIPT: &[u8] = b"qssh v1 handshake transcript";
/// HKDF-Extract salt for the pre-shared key (early secret).
pub const PSK_EXTRACT: &[u8] = b"qssh v1 psk extract";
/// Salt under which the hybrid KEM shared secrets are extracted into the handshake secret.
pub const HANDSHAKE_SECRET: &[u8] = b"qssh v1 handshake secret";
/// Key protecting the encrypted part of the responder's handshake message.
pub const HS_KEY_RESPONDER: &[u8] = b"qssh v1 hs key responder";
/// Key protecting the encrypted part of the initiator's finish message.
pub const HS_KEY_INITIATOR: &[u8] = b"qssh v1 hs key initiator";
/// MAC key for the responder's key confirmation.
pub const FINISHED_RESPONDER: &[u8] = b"qssh v1 finished responder";
/// MAC key for the initiator's key confirmation.
pub const FINISHED_INITIATOR: &[u8] = b"qssh v1 finished initiator";
/// Context prefixed to the transcript hash that the responder signs.
pub const SIGN_RESPONDER: &[u8] = b"qssh v1 responder signature";
/// Context prefixed to the transcript hash that the initiator signs.
pub const SIGN_INITIATOR: &[u8] = b"qssh v1 initiator signature";
/// Root key of the ratchet, derived from the handshake secret and the full transcript.
pub const RATCHET_ROOT: &[u8] = b"qssh v1 ratchet root";
/// Initial sending chain of the initiator (= receiving chain of the responder).
pub const CHAIN_INITIATOR: &[u8] = b"qssh v1 chain initiator";
/// Initial sending chain of the responder (= receiving chain of the initiator).
pub const CHAIN_RESPONDER: &[u8] = b"qssh v1 chain responder";
/// Root-key step of the ratchet (DH output, optionally followed by a KEM shared secret).
pub const RATCHET_ROOT_STEP: &[u8] = b"qssh v1 ratchet step";
/// New chain key output by a root-key step (the new root key uses [`RATCHET_ROOT_STEP`]).
pub const RATCHET_STEP_CHAIN: &[u8] = b"qssh v1 ratchet chain key";
/// Session identifier exported to the application (channel binding, logs).
pub const SESSION_ID: &[u8] = b"qssh v1 session id";
/// Message-key derivation from a chain key: mk = HMAC(ck, label).
pub const CHAIN_MESSAGE_KEY: &[u8] = b"qssh v1 chain message key";
/// Next chain key derivation from a chain key: ck' = HMAC(ck, label).
pub const CHAIN_NEXT: &[u8] = b"qssh v1 chain next";
/// Datagram epoch key expansion (direction and epoch follow).
pub const DATAGRAM_EPOCH: &[u8] = b"qssh v1 datagram epoch";
/// MAC key use of a relay slot's punch key on punch probes.
pub const PUNCH_MAC: &[u8] = b"qssh v1 punch mac";
/// Context of a listener's signature on its relay registration.
pub const SIGN_RELAY_REGISTRATION: &[u8] = b"qssh v1 relay registration";
/// A relay's stateless cookie: HMAC(relay secret, label || address || period).
pub const RELAY_COOKIE: &[u8] = b"qssh v1 relay cookie";

/// All labels, for the distinctness test and the protocol document.
pub const ALL: &[&[u8]] = &[
    PEER_ID,
    TRANSCRIPT,
    PSK_EXTRACT,
    HANDSHAKE_SECRET,
    HS_KEY_RESPONDER,
    HS_KEY_INITIATOR,
    FINISHED_RESPONDER,
    FINISHED_INITIATOR,
    SIGN_RESPONDER,
    SIGN_INITIATOR,
    RATCHET_ROOT,
    CHAIN_INITIATOR,
    CHAIN_RESPONDER,
    RATCHET_ROOT_STEP,
    RATCHET_STEP_CHAIN,
    SESSION_ID,
    CHAIN_MESSAGE_KEY,
    CHAIN_NEXT,
    DATAGRAM_EPOCH,
    PUNCH_MAC,
    SIGN_RELAY_REGISTRATION,
    RELAY_COOKIE,
];

#[cfg(test)]
mod tests {
    #[test]
    fn labels_are_distinct_and_versioned() {
        for (i, a) in super::ALL.iter().enumerate() {
            assert!(
                a.starts_with(b"qssh v1 "),
                "{:?}",
                String::from_utf8_lossy(a)
            );
            for b in &super::ALL[i + 1..] {
                assert_ne!(a, b);
                assert!(!a.starts_with(b) && !b.starts_with(a), "prefix-free");
            }
        }
    }
}
