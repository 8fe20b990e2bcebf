//! Thin wrappers over the maintained primitive crates: randomness, secrets, HKDF/HMAC-SHA-256,
//! AES-256-GCM, X25519 and ML-KEM-768. No primitive is implemented here; these wrappers only
//! fix sizes, zeroize what is secret and turn failures into typed errors.

use hmac::Mac;
use ml_kem::kem::{Decapsulate, Encapsulate, KeyExport};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::mem::ManuallyDrop;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Source of cryptographic randomness. Production uses [`OsRandom`]; tests and fuzzers use
/// [`DeterministicRandom`] so that runs are reproducible.
pub trait SecureRandom {
    fn fill(&mut self, out: &mut [u8]);
}

/// The operating system's CSPRNG (getrandom).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl SecureRandom for OsRandom {
    fn fill(&mut self, out: &mut [u8]) {
        getrandom::fill(out).expect("operating system random source failed");
    }
}

/// SHA-256 in counter mode over a seed. Reproducible, for tests and fuzzing only: its output
/// is as predictable as its seed.
#[derive(Clone)]
pub struct DeterministicRandom {
    seed: [u8; 32],
    counter: u64,
}

impl DeterministicRandom {
    pub fn new(seed: u64) -> Self {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&seed.to_be_bytes());
        DeterministicRandom {
            seed: s,
            counter: 0,
        }
    }
}

impl SecureRandom for DeterministicRandom {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(32) {
            let block = Sha256::new()
                .chain_update(self.seed)
                .chain_update(self.counter.to_be_bytes())
                .finalize();
            self.counter += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

pub fn random_array<const N: usize>(rng: &mut dyn SecureRandom) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill(&mut out);
    out
}

/// Adapter to the rand_core 0.10 traits (ml-kem).
pub(crate) struct RandCore10<'a>(pub &'a mut dyn SecureRandom);

impl rand_core::TryRng for RandCore10<'_> {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill(dst);
        Ok(())
    }
}
impl rand_core::TryCryptoRng for RandCore10<'_> {}

/// Adapter to the rand_core 0.6 traits that fn-dsa re-exports.
pub(crate) struct RandCore06<'a>(pub &'a mut dyn SecureRandom);

impl fn_dsa::RngCore for RandCore06<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), fn_dsa::RngError> {
        self.0.fill(dest);
        Ok(())
    }
}
impl fn_dsa::CryptoRng for RandCore06<'_> {}

/// A 32-byte secret: zeroized on drop, compared in constant time, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Secret32(b)
    }
    pub fn random(rng: &mut dyn SecureRandom) -> Self {
        Secret32(random_array(rng))
    }
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret32(<secret>)")
    }
}

impl PartialEq for Secret32 {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for Secret32 {}

/// Failures of the primitive layer. Deliberately coarse: an attacker learns only "failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CryptoError {
    #[error("authentication failed")]
    Auth,
    #[error("invalid public key")]
    BadPublicKey,
    #[error("invalid key encoding")]
    BadEncoding,
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

type HmacSha256 = hmac::Hmac<Sha256>;

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// HMAC-SHA256 of two messages under one key, with the key's inner and outer states
/// computed once (6 SHA-256 blocks instead of 8 for the ratchet's chain step).
pub fn hmac_sha256_pair(key: &[u8], a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
    let mut first = <HmacSha256 as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    let mut second = first.clone();
    first.update(a);
    second.update(b);
    (
        first.finalize().into_bytes().into(),
        second.finalize().into_bytes().into(),
    )
}

/// Constant-time equality of two MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// HKDF-Extract(salt, ikm parts concatenated).
pub fn hkdf_extract(salt: &[u8], ikm: &[&[u8]]) -> Secret32 {
    let mut ex = hkdf::HkdfExtract::<Sha256>::new(Some(salt));
    for p in ikm {
        ex.input_ikm(p);
    }
    let (prk, _) = ex.finalize();
    Secret32(prk.into())
}

/// HKDF-Expand(prk, label || context) to 32 bytes.
pub fn hkdf_expand(prk: &Secret32, label: &[u8], context: &[u8]) -> Secret32 {
    let hk = hkdf::Hkdf::<Sha256>::from_prk(prk.expose()).expect("32-byte PRK is valid");
    let mut out = [0u8; 32];
    hk.expand_multi_info(&[label, context], &mut out)
        .expect("32 bytes is a valid HKDF length");
    Secret32(out)
}

/// AES-256-GCM tag length.
pub const TAG_LEN: usize = 16;

/// Encrypts `buf[start..]` in place and appends the tag. `nonce` must never repeat for a key;
/// callers guarantee that by construction (one key per message, or a strict counter).
pub fn aead_seal(key: &Secret32, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, start: usize) {
    AeadKey::new(key).seal(nonce, aad, buf, start);
}

/// Decrypts `ciphertext || tag` in place; returns the plaintext length.
pub fn aead_open(
    key: &Secret32,
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<usize, CryptoError> {
    AeadKey::new(key).open(nonce, aad, buf)
}

/// Decrypts `buf[src..]` (`ciphertext || tag`) into the start of `buf`; returns the
/// plaintext length. On failure the output part is overwritten with zeros.
pub fn aead_open_within(
    key: &Secret32,
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
    src: usize,
) -> Result<usize, CryptoError> {
    AeadKey::new(key).open_within(nonce, aad, buf, src)
}

/// An AES-256-GCM key with its key schedule and GHASH table computed once: built per message
/// by [`aead_seal`]/[`aead_open`] (the ratchet's one-message keys), and kept for keys that
/// seal or open many messages (datagram epochs: one key, up to 2^32 packets). Never printed.
///
/// The implementation is `ring`'s (assembly AES-NI/CLMUL, about 3x the throughput of the
/// RustCrypto `aes-gcm` crate here; see bench/README.md). `ring` does not wipe its key
/// schedules, so this wrapper does: the key lives in a `ManuallyDrop` (ring's type has no drop
/// glue and owns no heap memory; a test checks it) and its bytes are overwritten with zeros,
/// volatile, when the wrapper drops. That overwrite is the crate's only `unsafe` code.
pub struct AeadKey(ManuallyDrop<LessSafeKey>);

impl AeadKey {
    pub fn new(key: &Secret32) -> Self {
        let unbound =
            UnboundKey::new(&AES_256_GCM, key.expose()).expect("AES-256-GCM takes 32-byte keys");
        AeadKey(ManuallyDrop::new(LessSafeKey::new(unbound)))
    }

    /// Encrypts `buf[start..]` in place and appends the tag; the nonce rule of [`aead_seal`]
    /// applies.
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, start: usize) {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut buf[start..],
            )
            .expect("AES-GCM input within limits");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext length. On failure the
    /// ciphertext part is overwritten with zeros (ring decrypts while it authenticates, then
    /// erases the result), so unauthenticated plaintext is never left behind.
    pub fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Result<usize, CryptoError> {
        self.0
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map(|plain| plain.len())
            .map_err(|_| CryptoError::Auth)
    }

    /// [`AeadKey::open`] moving the result: decrypts `buf[src..]` into the start of `buf` in
    /// the same pass (ring reads ahead of where it writes). On failure the first
    /// `buf.len() - src - TAG_LEN` bytes are overwritten with zeros.
    pub fn open_within(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        src: usize,
    ) -> Result<usize, CryptoError> {
        self.0
            .open_within(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                buf,
                src..,
            )
            .map(|plain| plain.len())
            .map_err(|_| CryptoError::Auth)
    }
}

impl Drop for AeadKey {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // Word by word (one key per record: the wipe is on the hot path); the asserts below
        // make the key's storage a whole number of aligned words.
        const _: () = assert!(std::mem::align_of::<LessSafeKey>() >= 8);
        const _: () = assert!(std::mem::size_of::<LessSafeKey>() % 8 == 0);
        let key: *mut LessSafeKey = &mut *self.0;
        let words = key.cast::<u64>();
        for i in 0..std::mem::size_of::<LessSafeKey>() / 8 {
            // SAFETY: `words..words + size_of::<LessSafeKey>() / 8` is exactly the key's own
            // storage (its size is a multiple of 8 and its alignment at least 8, asserted at
            // compile time), which `&mut self` borrows exclusively; writing integers is valid
            // for any memory (padding included). The key is never used again: this is its
            // drop, and `ManuallyDrop` keeps its (empty) drop glue from running on the zeroed
            // value.
            unsafe { std::ptr::write_volatile(words.add(i), 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl ZeroizeOnDrop for AeadKey {}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey(<secret>)")
    }
}

/// Convenience: seal to a new vector.
pub fn aead_seal_vec(key: &Secret32, nonce: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(plaintext.len() + TAG_LEN);
    v.extend_from_slice(plaintext);
    aead_seal(key, nonce, aad, &mut v, 0);
    v
}

/// Convenience: open to a new vector.
pub fn aead_open_vec(
    key: &Secret32,
    nonce: &[u8; 12],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut v = ciphertext.to_vec();
    let n = aead_open(key, nonce, aad, &mut v)?;
    v.truncate(n);
    Ok(v)
}

/// X25519 public key length.
pub const X25519_LEN: usize = 32;

/// An X25519 key pair (ephemeral or ratchet key).
pub struct X25519Secret(x25519_dalek::StaticSecret);

impl X25519Secret {
    pub fn generate(rng: &mut dyn SecureRandom) -> Self {
        let mut b = random_array::<32>(rng);
        let s = x25519_dalek::StaticSecret::from(b);
        b.zeroize();
        X25519Secret(s)
    }
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }
    /// Diffie-Hellman; refuses low-order peer keys (all-zero output).
    pub fn agree(&self, peer: &[u8; 32]) -> Result<Secret32, CryptoError> {
        let ss = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !ss.was_contributory() {
            return Err(CryptoError::BadPublicKey);
        }
        Ok(Secret32(ss.to_bytes()))
    }
}

impl std::fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "X25519Secret(public={:02x?}, <secret>)",
            &self.public()[..4]
        )
    }
}

/// ML-KEM-768 encapsulation key length.
pub const MLKEM_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length.
pub const MLKEM_CT_LEN: usize = 1088;

/// An ML-KEM-768 decapsulation key (zeroized on drop by the ml-kem crate).
pub struct MlKemSecret(ml_kem::DecapsulationKey768);

impl MlKemSecret {
    pub fn generate(rng: &mut dyn SecureRandom) -> Self {
        let mut seed = ml_kem::Seed::default();
        rng.fill(&mut seed);
        let dk = ml_kem::DecapsulationKey768::from_seed(seed);
        seed.zeroize();
        MlKemSecret(dk)
    }
    pub fn public(&self) -> Vec<u8> {
        self.0.encapsulation_key().to_bytes().to_vec()
    }
    pub fn decapsulate(&self, ct: &[u8]) -> Result<Secret32, CryptoError> {
        if ct.len() != MLKEM_CT_LEN {
            return Err(CryptoError::BadEncoding);
        }
        let ss = self
            .0
            .decapsulate_slice(ct)
            .map_err(|_| CryptoError::BadEncoding)?;
        Ok(Secret32(ss.into()))
    }
}

impl std::fmt::Debug for MlKemSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlKemSecret(<secret>)")
    }
}

/// Encapsulates to a peer's ML-KEM-768 key: returns (ciphertext, shared secret).
pub fn mlkem_encapsulate(
    rng: &mut dyn SecureRandom,
    ek: &[u8],
) -> Result<(Vec<u8>, Secret32), CryptoError> {
    let key = ml_kem::kem::Key::<ml_kem::EncapsulationKey768>::try_from(ek)
        .map_err(|_| CryptoError::BadPublicKey)?;
    let ek = ml_kem::EncapsulationKey768::new(&key).map_err(|_| CryptoError::BadPublicKey)?;
    let (ct, ss) = ek.encapsulate_with_rng(&mut RandCore10(rng));
    Ok((ct.to_vec(), Secret32(ss.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aead_round_trip_and_tamper() {
        let key = Secret32([7; 32]);
        let n = [1u8; 12];
        let ct = aead_seal_vec(&key, &n, b"aad", b"hello");
        assert_eq!(aead_open_vec(&key, &n, b"aad", &ct).unwrap(), b"hello");
        assert_eq!(aead_open_vec(&key, &n, b"aaX", &ct), Err(CryptoError::Auth));
        for i in 0..ct.len() {
            let mut t = ct.clone();
            t[i] ^= 1;
            assert_eq!(aead_open_vec(&key, &n, b"aad", &t), Err(CryptoError::Auth));
        }
        assert_eq!(
            aead_open_vec(&key, &n, b"aad", &ct[..3]),
            Err(CryptoError::Auth)
        );
    }

    #[test]
    fn hmac_pair_matches_two_single_macs() {
        // RFC 4231 test case 2 as the anchor, then keys of every block-boundary length.
        let (a, _) = hmac_sha256_pair(b"Jefe", b"what do ya want for nothing?", b"");
        assert_eq!(
            a[..],
            unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")[..]
        );
        for len in [0, 1, 32, 63, 64, 65, 200] {
            let key = vec![0x5c; len];
            let (x, y) = hmac_sha256_pair(&key, &[1], b"second message");
            assert_eq!(x, hmac_sha256(&key, &[&[1]]));
            assert_eq!(y, hmac_sha256(&key, &[b"second", b" message"]));
            assert_ne!(x, y);
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn cached_key_matches_one_shot_aead() {
        let key = Secret32([9; 32]);
        let cached = AeadKey::new(&key);
        let n = [3u8; 12];
        let mut buf = b"hdr".to_vec();
        buf.extend_from_slice(b"payload");
        cached.seal(&n, b"aad", &mut buf, 3);
        assert_eq!(&buf[3..], &aead_seal_vec(&key, &n, b"aad", b"payload")[..]);
        let mut ct = buf[3..].to_vec();
        assert_eq!(cached.open(&n, b"aad", &mut ct), Ok(7));
        assert_eq!(&ct[..7], b"payload");
        let mut bad = buf[3..].to_vec();
        bad[0] ^= 1;
        assert_eq!(cached.open(&n, b"aad", &mut bad), Err(CryptoError::Auth));
        assert_eq!(
            cached.open(&n, b"aad", &mut [0u8; 15]),
            Err(CryptoError::Auth)
        );
        assert_eq!(format!("{cached:?}"), "AeadKey(<secret>)");
    }

    /// ring's key type must stay plain data (no drop glue, nothing on the heap) for the
    /// wipe in `AeadKey::drop` to be complete; and the drop must leave only zeros behind.
    #[test]
    #[allow(unsafe_code)]
    fn aead_key_schedule_is_wiped_on_drop() {
        assert!(!std::mem::needs_drop::<LessSafeKey>());
        let mut slot = ManuallyDrop::new(AeadKey::new(&Secret32([0x5a; 32])));
        // The schedule is there and in use: 14 AES-256 round keys alone are 240 bytes.
        let size = std::mem::size_of::<LessSafeKey>();
        assert!(size >= 240, "{size}");
        let sealed = aead_seal_vec(&Secret32([0x5a; 32]), &[1; 12], b"", b"x");
        let mut buf = b"x".to_vec();
        slot.seal(&[1; 12], b"", &mut buf, 0);
        assert_eq!(buf, sealed);
        let base: *const u8 = (&*slot.0 as *const LessSafeKey).cast();
        // SAFETY: runs AeadKey's Drop in place; `slot` is not used as a key afterwards, and
        // its storage (this stack frame) stays live for the reads below, which read only
        // bytes that the drop has just written.
        unsafe { ManuallyDrop::drop(&mut slot) };
        let left = (0..size)
            .filter(|&i| unsafe { std::ptr::read_volatile(base.add(i)) } != 0)
            .count();
        assert_eq!(left, 0, "bytes of the key schedule survived the drop");
    }

    /// ring and the RustCrypto `aes-gcm` crate (a dev-dependency) agree on AES-256-GCM.
    #[test]
    fn aead_matches_an_independent_implementation() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key = [0x42; 32];
        let reference = aes_gcm::Aes256Gcm::new(&key.into());
        for len in [0usize, 1, 15, 16, 17, 255, 4096, 65_537] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let nonce = [len as u8; 12];
            let ours = aead_seal_vec(&Secret32(key), &nonce, b"header", &plain);
            let theirs = reference
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: &plain,
                        aad: b"header",
                    },
                )
                .unwrap();
            assert_eq!(ours, theirs, "len {len}");
        }
    }

    #[test]
    fn hybrid_primitives_agree() {
        let mut rng = DeterministicRandom::new(1);
        let a = X25519Secret::generate(&mut rng);
        let b = X25519Secret::generate(&mut rng);
        assert_eq!(a.agree(&b.public()).unwrap(), b.agree(&a.public()).unwrap());
        assert_eq!(a.agree(&[0u8; 32]).unwrap_err(), CryptoError::BadPublicKey);

        let dk = MlKemSecret::generate(&mut rng);
        let ek = dk.public();
        assert_eq!(ek.len(), MLKEM_EK_LEN);
        let (ct, ss) = mlkem_encapsulate(&mut rng, &ek).unwrap();
        assert_eq!(ct.len(), MLKEM_CT_LEN);
        assert_eq!(dk.decapsulate(&ct).unwrap(), ss);
        assert!(mlkem_encapsulate(&mut rng, &ek[1..]).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret32([0xab; 32]);
        assert!(!format!("{s:?}").contains("ab"));
        let mut rng = DeterministicRandom::new(2);
        assert!(format!("{:?}", MlKemSecret::generate(&mut rng)).contains("<secret>"));
    }
}
