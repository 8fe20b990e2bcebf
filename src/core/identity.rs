//! Long-term identities: signature key pairs, their public halves and peer IDs.
//!
//! Two algorithms: FN-DSA-512 (Falcon-512; the default: 897-byte keys, 666-byte signatures,
//! fast) and SLH-DSA-SHA2-128f (SPHINCS+, hash-based: the conservative choice whose security
//! rests only on SHA-2; the "f" set because a handshake signs interactively and 128f signs
//! tens of times faster than 128s, at 17 088 instead of 7 856 bytes per signature).
//!
//! A peer ID is SHA-256(label || algorithm id || u16 key length || public key): it commits to
//! the algorithm, so the same key bytes under another algorithm are another peer.

use super::codec::{DecodeError, Reader, Writer};
use super::crypto::{sha256, RandCore06, SecureRandom};
use super::labels;
use fn_dsa::{
    hashed_vrfykey_from_signkey, hashed_vrfykey_from_vrfykey, sign_key_size, signature_size,
    vrfy_key_size, KeyPairGenerator, KeyPairGeneratorStandard, SigningKey as _, SigningKeyStandard,
    VerifyingKey as _, VerifyingKeyStandard, DOMAIN_NONE, FN_DSA_LOGN_512, HASH_ID_RAW,
};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;
use zeroize::Zeroizing;

/// Signature algorithms, with their wire ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algorithm {
    Falcon512 = 1,
    SlhDsaSha2_128f = 2,
}

type Slh = slh_dsa::Sha2_128f;

pub const FALCON512_PK_LEN: usize = vrfy_key_size(FN_DSA_LOGN_512);
pub const FALCON512_SK_LEN: usize = sign_key_size(FN_DSA_LOGN_512);
pub const FALCON512_SIG_LEN: usize = signature_size(FN_DSA_LOGN_512);
pub const SLH_PK_LEN: usize = 32;
/// SLH-DSA secret half: SK.seed || SK.prf (the FIPS 205 secret key minus its public key).
pub const SLH_SK_LEN: usize = 32;
pub const SLH_SIG_LEN: usize = 17_088;
/// Largest public key of any supported algorithm.
pub const MAX_PUBLIC_KEY: usize = FALCON512_PK_LEN;
/// Largest signature of any supported algorithm.
pub const MAX_SIGNATURE: usize = SLH_SIG_LEN;

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Falcon512, Algorithm::SlhDsaSha2_128f];

    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|a| *a as u8 == id)
    }
    pub fn public_key_len(self) -> usize {
        match self {
            Algorithm::Falcon512 => FALCON512_PK_LEN,
            Algorithm::SlhDsaSha2_128f => SLH_PK_LEN,
        }
    }
    pub fn secret_key_len(self) -> usize {
        match self {
            Algorithm::Falcon512 => FALCON512_SK_LEN,
            Algorithm::SlhDsaSha2_128f => SLH_SK_LEN,
        }
    }
    pub fn signature_len(self) -> usize {
        match self {
            Algorithm::Falcon512 => FALCON512_SIG_LEN,
            Algorithm::SlhDsaSha2_128f => SLH_SIG_LEN,
        }
    }
    /// Name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Falcon512 => "falcon512",
            Algorithm::SlhDsaSha2_128f => "slh-dsa-sha2-128f",
        }
    }
    /// Name for humans.
    pub fn display_name(self) -> &'static str {
        match self {
            Algorithm::Falcon512 => "FN-DSA-512 (Falcon-512)",
            Algorithm::SlhDsaSha2_128f => "SLH-DSA-SHA2-128f (SPHINCS+)",
        }
    }
}

impl FromStr for Algorithm {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "falcon512" | "falcon-512" | "fn-dsa-512" | "fndsa512" => Ok(Algorithm::Falcon512),
            "slh-dsa-sha2-128f" | "slh-dsa" | "sphincs+" | "sphincs" => {
                Ok(Algorithm::SlhDsaSha2_128f)
            }
            _ => Err(IdentityError::UnknownAlgorithmName(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("unknown signature algorithm id {0}")]
    UnknownAlgorithm(u8),
    #[error("unknown signature algorithm {0:?} (use falcon512 or slh-dsa-sha2-128f)")]
    UnknownAlgorithmName(String),
    #[error("not a qssh identity file (bad magic)")]
    BadMagic,
    #[error("identity file is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("malformed public key")]
    BadPublicKey,
    #[error("malformed encoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid peer ID {0:?}: expected {PEER_ID_TEXT_LEN} base32 characters")]
    BadPeerId(String),
}

/// A peer's public identity: algorithm and public key, validated on construction.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicIdentity {
    alg: Algorithm,
    key: Vec<u8>,
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({}, {})", self.alg.name(), self.peer_id())
    }
}

impl PublicIdentity {
    pub fn new(alg: Algorithm, key: &[u8]) -> Result<Self, IdentityError> {
        if key.len() != alg.public_key_len() {
            return Err(IdentityError::BadPublicKey);
        }
        let ok = match alg {
            Algorithm::Falcon512 => VerifyingKeyStandard::decode(key).is_some(),
            Algorithm::SlhDsaSha2_128f => slh_dsa::VerifyingKey::<Slh>::try_from(key).is_ok(),
        };
        if !ok {
            return Err(IdentityError::BadPublicKey);
        }
        Ok(PublicIdentity {
            alg,
            key: key.to_vec(),
        })
    }
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
    pub fn key(&self) -> &[u8] {
        &self.key
    }
    pub fn peer_id(&self) -> PeerId {
        let len = (self.key.len() as u16).to_be_bytes();
        PeerId(sha256(&[
            labels::PEER_ID,
            &[self.alg as u8],
            &len,
            &self.key,
        ]))
    }

    /// Verifies `sig` over `context || message`. Wrong lengths simply fail.
    pub fn verify(&self, context: &[u8], message: &[u8], sig: &[u8]) -> bool {
        if sig.len() != self.alg.signature_len() {
            return false;
        }
        let mut m = Vec::with_capacity(context.len() + message.len());
        m.extend_from_slice(context);
        m.extend_from_slice(message);
        match self.alg {
            Algorithm::Falcon512 => match VerifyingKeyStandard::decode(&self.key) {
                Some(vk) => vk.verify(sig, &DOMAIN_NONE, &HASH_ID_RAW, &m),
                None => false,
            },
            Algorithm::SlhDsaSha2_128f => {
                let (Ok(vk), Ok(s)) = (
                    slh_dsa::VerifyingKey::<Slh>::try_from(&self.key[..]),
                    slh_dsa::Signature::<Slh>::try_from(sig),
                ) else {
                    return false;
                };
                vk.try_verify_with_context(&m, &[], &s).is_ok()
            }
        }
    }

    /// Wire form: algorithm id (u8), u16 key length, key.
    pub fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.alg as u8).vec16(&self.key);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, IdentityError> {
        let id = r.u8()?;
        let alg = Algorithm::from_id(id).ok_or(IdentityError::UnknownAlgorithm(id))?;
        let key = r.vec16(MAX_PUBLIC_KEY)?;
        Self::new(alg, key)
    }
}

/// Magic at the start of an identity file (format version 1).
pub const IDENTITY_MAGIC: &[u8; 8] = b"QSSHID\x00\x01";

/// A long-term signing identity. The secret key is zeroized on drop and never printed.
pub struct Identity {
    public: PublicIdentity,
    secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({:?}, <secret>)", self.public)
    }
}

impl Identity {
    pub fn generate(alg: Algorithm, rng: &mut dyn SecureRandom) -> Self {
        match alg {
            Algorithm::Falcon512 => {
                let mut sk = Zeroizing::new(vec![0u8; FALCON512_SK_LEN]);
                let mut pk = vec![0u8; FALCON512_PK_LEN];
                KeyPairGeneratorStandard::default().keygen(
                    FN_DSA_LOGN_512,
                    &mut RandCore06(rng),
                    &mut sk,
                    &mut pk,
                );
                Identity {
                    public: PublicIdentity { alg, key: pk },
                    secret: sk,
                }
            }
            Algorithm::SlhDsaSha2_128f => {
                let seeds = Zeroizing::new(super::crypto::random_array::<48>(rng));
                let sk = slh_dsa::SigningKey::<Slh>::slh_keygen_internal(
                    &seeds[..16],
                    &seeds[16..32],
                    &seeds[32..],
                );
                let bytes = Zeroizing::new(sk.to_vec());
                Identity {
                    public: PublicIdentity {
                        alg,
                        key: bytes[SLH_SK_LEN..].to_vec(),
                    },
                    secret: Zeroizing::new(bytes[..SLH_SK_LEN].to_vec()),
                }
            }
        }
    }

    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }
    pub fn peer_id(&self) -> PeerId {
        self.public.peer_id()
    }

    /// Signs `context || message` (hedged: fresh randomness mixed in).
    pub fn sign(&self, rng: &mut dyn SecureRandom, context: &[u8], message: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(context.len() + message.len());
        m.extend_from_slice(context);
        m.extend_from_slice(message);
        match self.public.alg {
            Algorithm::Falcon512 => {
                let mut sk = SigningKeyStandard::decode(&self.secret)
                    .expect("identity secret validated at load");
                let mut sig = vec![0u8; FALCON512_SIG_LEN];
                sk.sign(
                    &mut RandCore06(rng),
                    &DOMAIN_NONE,
                    &HASH_ID_RAW,
                    &m,
                    &mut sig,
                );
                sig
            }
            Algorithm::SlhDsaSha2_128f => {
                let sk = self
                    .slh_signing_key()
                    .expect("identity secret validated at load");
                let opt_rand = super::crypto::random_array::<16>(rng);
                sk.try_sign_with_context(&m, &[], Some(&opt_rand))
                    .expect("empty context is valid")
                    .to_vec()
            }
        }
    }

    fn slh_signing_key(&self) -> Option<slh_dsa::SigningKey<Slh>> {
        let mut full = Zeroizing::new(Vec::with_capacity(SLH_SK_LEN + SLH_PK_LEN));
        full.extend_from_slice(&self.secret);
        full.extend_from_slice(&self.public.key);
        slh_dsa::SigningKey::<Slh>::try_from(&full[..]).ok()
    }

    /// File form: magic, algorithm id, u16 secret length, secret, u16 public length, public.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::new());
        let mut w = Writer::new(&mut v);
        w.bytes(IDENTITY_MAGIC);
        w.u8(self.public.alg as u8);
        w.vec16(&self.secret);
        w.vec16(&self.public.key);
        v
    }

    /// Parses and fully validates an identity file: the public key must be the one the
    /// secret key derives, so a corrupt file is an error, never a different identity.
    pub fn decode(bytes: &[u8]) -> Result<Self, IdentityError> {
        let mut r = Reader::new(bytes);
        if r.take(IDENTITY_MAGIC.len()).ok() != Some(&IDENTITY_MAGIC[..]) {
            return Err(IdentityError::BadMagic);
        }
        let id = r.u8()?;
        let alg = Algorithm::from_id(id).ok_or(IdentityError::UnknownAlgorithm(id))?;
        let secret = r.vec16(alg.secret_key_len())?;
        let public = r.vec16(MAX_PUBLIC_KEY)?;
        r.finish()?;
        Self::from_key_pair(alg, secret, public)
    }

    /// Builds an identity from raw key bytes (used by [`Identity::decode`] and to import or
    /// cross-check keys made by other implementations) and validates that they form a pair.
    ///
    /// Formats (fn-dsa 0.4 and slh-dsa; `docs/INTEROP.md` compares them with PQClean):
    /// FN-DSA-512 `secret` is the 1345-byte fn-dsa signing key (0x59, f and g in 6-bit and F in
    /// 8-bit fields packed least-significant-bit first, then SHAKE256(public key), 64 bytes),
    /// `public` the 897-byte verifying key (0x09, h in 14-bit fields, same bit order).
    /// SLH-DSA `secret` is SK.seed || SK.prf (32 bytes), `public` PK.seed || PK.root (32
    /// bytes). The secret is copied into zeroizing memory; the caller wipes its own buffer.
    pub fn from_key_pair(
        alg: Algorithm,
        secret: &[u8],
        public: &[u8],
    ) -> Result<Self, IdentityError> {
        if secret.len() != alg.secret_key_len() || public.len() != alg.public_key_len() {
            return Err(IdentityError::Corrupt("key length"));
        }
        let public =
            PublicIdentity::new(alg, public).map_err(|_| IdentityError::Corrupt("public key"))?;
        let ident = Identity {
            public,
            secret: Zeroizing::new(secret.to_vec()),
        };
        let consistent = match alg {
            // fn-dsa does not check the embedded public-key hash when decoding a signing key;
            // a wrong hash would silently produce signatures that never verify, so check it.
            Algorithm::Falcon512 => match SigningKeyStandard::decode(&ident.secret) {
                Some(sk) => {
                    let mut derived = vec![0u8; FALCON512_PK_LEN];
                    sk.to_verifying_key(&mut derived);
                    derived == ident.public.key
                        && hashed_vrfykey_from_signkey(&ident.secret)
                            == hashed_vrfykey_from_vrfykey(&ident.public.key)
                }
                None => false,
            },
            Algorithm::SlhDsaSha2_128f => ident.slh_signing_key().is_some_and(|sk| {
                let seeds = sk.to_bytes();
                let again = slh_dsa::SigningKey::<Slh>::slh_keygen_internal(
                    &seeds[..16],
                    &seeds[16..32],
                    &ident.public.key[..16],
                );
                again.to_bytes()[..] == seeds[..]
            }),
        };
        if !consistent {
            return Err(IdentityError::Corrupt("secret and public key do not match"));
        }
        Ok(ident)
    }
}

/// Length of a peer ID's text form.
pub const PEER_ID_TEXT_LEN: usize = 52;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// SHA-256 of a public identity; shown as 52 lowercase base32 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// First 12 characters: what chat prints beside a name.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
    /// A human-comparable fingerprint: the first 20 characters in groups of 4.
    pub fn fingerprint(&self) -> String {
        let s = self.to_string();
        s.as_bytes()[..20]
            .chunks(4)
            .map(|c| std::str::from_utf8(c).expect("base32 is ascii"))
            .collect::<Vec<_>>()
            .join("-")
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::with_capacity(PEER_ID_TEXT_LEN);
        let (mut acc, mut bits) = (0u32, 0u32);
        for &b in &self.0 {
            acc = (acc << 8) | b as u32;
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(BASE32[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
        }
        f.write_str(&out)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self)
    }
}

impl FromStr for PeerId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadPeerId(s.chars().take(80).collect());
        if s.len() != PEER_ID_TEXT_LEN {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        let (mut acc, mut bits, mut i) = (0u32, 0u32, 0usize);
        for c in s.bytes() {
            let v = BASE32
                .iter()
                .position(|&x| x == c.to_ascii_lowercase())
                .ok_or_else(bad)? as u32;
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out[i] = (acc >> bits) as u8;
                i += 1;
            }
        }
        // 52 chars carry 260 bits: the 4 padding bits must be zero (one text form per ID).
        if acc & ((1 << bits) - 1) != 0 {
            return Err(bad());
        }
        Ok(PeerId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crypto::DeterministicRandom;

    #[test]
    fn sign_verify_both_algorithms() {
        let mut rng = DeterministicRandom::new(9);
        for alg in Algorithm::ALL {
            let id = Identity::generate(alg, &mut rng);
            let sig = id.sign(&mut rng, b"ctx", b"msg");
            assert_eq!(sig.len(), alg.signature_len());
            assert!(id.public().verify(b"ctx", b"msg", &sig));
            assert!(!id.public().verify(b"ctx", b"msh", &sig));
            assert!(!id.public().verify(b"cty", b"msg", &sig));
            let other = Identity::generate(alg, &mut rng);
            assert!(!other.public().verify(b"ctx", b"msg", &sig));
            // file round trip keeps the same peer ID
            let back = Identity::decode(&id.encode()).unwrap();
            assert_eq!(back.peer_id(), id.peer_id());
        }
    }

    #[test]
    fn corrupt_identity_file_is_an_error() {
        let mut rng = DeterministicRandom::new(10);
        for alg in Algorithm::ALL {
            let id = Identity::generate(alg, &mut rng);
            let enc = id.encode();
            assert_eq!(
                Identity::decode(b"garbage").unwrap_err(),
                IdentityError::BadMagic
            );
            assert!(Identity::decode(&enc[..enc.len() - 1]).is_err());
            // flip a bit in the public key: the pair no longer matches
            let mut bad = enc.to_vec();
            let last = bad.len() - 3;
            bad[last] ^= 0x40;
            assert!(Identity::decode(&bad).is_err(), "{alg:?}");
        }
    }

    #[test]
    fn falcon_secret_with_wrong_public_key_hash_is_rejected() {
        let mut rng = DeterministicRandom::new(12);
        let id = Identity::generate(Algorithm::Falcon512, &mut rng);
        let mut secret = id.secret.to_vec();
        // The last 64 bytes of an fn-dsa signing key are SHAKE256(public key).
        secret[FALCON512_SK_LEN - 1] ^= 1;
        assert_eq!(
            Identity::from_key_pair(Algorithm::Falcon512, &secret, id.public().key()).unwrap_err(),
            IdentityError::Corrupt("secret and public key do not match")
        );
        secret[FALCON512_SK_LEN - 1] ^= 1;
        let back = Identity::from_key_pair(Algorithm::Falcon512, &secret, id.public().key());
        assert_eq!(back.unwrap().peer_id(), id.peer_id());
    }

    #[test]
    fn peer_id_text_round_trip_and_commits_to_algorithm() {
        let mut rng = DeterministicRandom::new(11);
        let id = Identity::generate(Algorithm::Falcon512, &mut rng);
        let pid = id.peer_id();
        let s = pid.to_string();
        assert_eq!(s.len(), PEER_ID_TEXT_LEN);
        assert_eq!(s.parse::<PeerId>().unwrap(), pid);
        assert_eq!(s.to_uppercase().parse::<PeerId>().unwrap(), pid);
        assert!(s[1..].parse::<PeerId>().is_err());
        assert!(format!("{}1", &s[..51]).parse::<PeerId>().is_err());
        assert_eq!(pid.fingerprint().len(), 24);
        let spoof = PublicIdentity {
            alg: Algorithm::SlhDsaSha2_128f,
            key: id.public().key().to_vec(),
        };
        assert_ne!(spoof.peer_id(), pid);
    }
}
