//! Key facts for the command line. Nothing here prints: the CLI formats [`IdentityInfo`]
//! (line 1 the peer ID alone, so scripts can take it with `head -1`, then the rest).

use crate::core::identity::{Algorithm, Identity, PeerId, PublicIdentity};

/// What `qssh keygen` / `qssh id` show about an identity. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub peer_id: PeerId,
    pub algorithm: Algorithm,
    /// Human-readable algorithm name, e.g. "FN-DSA-512 (Falcon-512)".
    pub algorithm_name: &'static str,
    /// Short, human-comparable form of the peer ID (see [`PeerId::fingerprint`]).
    pub fingerprint: String,
    /// Public key length in bytes.
    pub public_key_len: usize,
    /// Signature length in bytes.
    pub signature_len: usize,
}

/// Describes our own identity.
pub fn describe_identity(identity: &Identity) -> IdentityInfo {
    describe_public(identity.public())
}

/// Describes any public identity (ours or a peer's).
pub fn describe_public(public: &PublicIdentity) -> IdentityInfo {
    let alg = public.algorithm();
    let peer_id = public.peer_id();
    IdentityInfo {
        peer_id,
        algorithm: alg,
        algorithm_name: alg.display_name(),
        fingerprint: peer_id.fingerprint(),
        public_key_len: public.key().len(),
        signature_len: alg.signature_len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::DeterministicRandom;

    #[test]
    fn describes_both_algorithms() {
        let mut rng = DeterministicRandom::new(20);
        for (alg, name, pk_len, sig_len) in [
            (Algorithm::Falcon512, "FN-DSA-512 (Falcon-512)", 897, 666),
            (
                Algorithm::SlhDsaSha2_128f,
                "SLH-DSA-SHA2-128f (SPHINCS+)",
                32,
                17_088,
            ),
        ] {
            let id = Identity::generate(alg, &mut rng);
            let info = describe_identity(&id);
            assert_eq!(info.peer_id, id.peer_id());
            assert_eq!(info.algorithm, alg);
            assert_eq!(info.algorithm_name, name);
            assert_eq!(info.fingerprint, id.peer_id().fingerprint());
            assert!(info.peer_id.to_string().starts_with(&info.fingerprint[..4]));
            assert_eq!((info.public_key_len, info.signature_len), (pk_len, sig_len));
            // The signature length is what signing really produces.
            assert_eq!(id.sign(&mut rng, b"c", b"m").len(), info.signature_len);
            assert_eq!(describe_public(id.public()), info);
        }
    }
}
