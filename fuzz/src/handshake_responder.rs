//! Target `handshake_responder`: the responder's handshake functions on arbitrary bodies.
//!
//! Input: one selector byte, then a message body.
//! - selector even: the body is an INIT for [`handshake::respond`] (fixed Falcon-512 identity,
//!   deterministic generator);
//! - selector odd: the body is a FINISH for the [`ResponderSent`] state obtained from the
//!   recorded valid INIT.

use super::fixture;
use qssh::core::crypto::Secret32;
use qssh::core::handshake::{self, HandshakeError};
use qssh::core::identity::Algorithm;

/// Which message an input fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Init,
    Finish,
}

/// What one input did: the message it fed and whether the responder accepted it.
pub fn run(data: &[u8]) -> Option<(Message, Result<(), HandshakeError>)> {
    let (&selector, body) = data.split_first()?;
    let mut rng = fixture::responder_rng();
    if selector % 2 == 0 {
        let res = handshake::respond(&mut rng, fixture::responder_config(), body);
        Some((Message::Init, res.map(|_| ())))
    } else {
        let (state, _resp) = handshake::respond(
            &mut rng,
            fixture::responder_config(),
            &fixture::recorded().init,
        )
        .expect("the recorded INIT must be accepted");
        Some((Message::Finish, state.handle_finish(body).map(|_| ())))
    }
}

/// Seed inputs: the recorded INIT and FINISH, and INITs that take the other negotiation
/// branches (a pre-shared key the responder does not have, an algorithm list without
/// Falcon-512, an unknown protocol version only).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let rec = fixture::recorded();
    let with = |sel: u8, body: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(body);
        v
    };
    let init_with = |edit: fn(&mut handshake::HandshakeConfig)| {
        let mut cfg = fixture::initiator_config();
        edit(&mut cfg);
        handshake::initiate(&mut fixture::initiator_rng(), cfg).1
    };
    let psk = init_with(|c| c.psk = Some(Secret32::from_bytes([0x5a; 32])));
    let slh_only = init_with(|c| c.accept_algorithms = vec![Algorithm::SlhDsaSha2_128f]);
    let mut version = rec.init.clone();
    // magic, then the version list: length byte, first version.
    version[handshake::INIT_MAGIC.len() + 1] = 0xEE;
    [
        ("init-valid", with(0, &rec.init)),
        ("finish-valid", with(1, &rec.finish)),
        ("init-psk", with(0, &psk)),
        ("init-slh-dsa-only", with(0, &slh_only)),
        ("init-unknown-version", with(0, &version)),
    ]
    .into_iter()
    .map(|(name, input)| (name.to_string(), input))
    .collect()
}
