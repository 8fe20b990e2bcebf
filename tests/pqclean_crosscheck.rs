//! Cross-checks our maintained implementations (ml-kem, fn-dsa, slh-dsa, through qssh's own
//! wrappers where they apply) against the PQClean reference code (pqcrypto-* crates).
//!
//! Where the formats agree, both directions are tested. Where they do not, a test pins the
//! exact, documented difference, so that a change in either implementation is noticed.
//! `docs/INTEROP.md` summarises the results.
//!
//! PQClean draws its own randomness (keys, encapsulation, signatures) from the OS; the
//! properties tested hold for every draw.

use pqcrypto_traits::kem::{Ciphertext as _, PublicKey as _, SecretKey as _, SharedSecret as _};
use pqcrypto_traits::sign::{DetachedSignature as _, PublicKey as _, SecretKey as _};
use qssh::core::codec::Reader;
use qssh::core::crypto::{
    mlkem_encapsulate, random_array, DeterministicRandom, MlKemSecret, MLKEM_CT_LEN, MLKEM_EK_LEN,
};
use qssh::core::identity::{
    Algorithm, Identity, PublicIdentity, FALCON512_PK_LEN, FALCON512_SIG_LEN, FALCON512_SK_LEN,
    IDENTITY_MAGIC, MAX_PUBLIC_KEY, SLH_PK_LEN, SLH_SIG_LEN, SLH_SK_LEN,
};

use pqcrypto_falcon::{falcon512, falconpadded512};
use pqcrypto_mlkem::mlkem768;
use pqcrypto_sphincsplus::sphincssha2128fsimple as sphincs;

/// Rounds of the randomised two-way checks.
const ROUNDS: usize = 4;
const CONTEXT: &[u8] = b"qssh v1 interop context";
const MESSAGE: &[u8] = b"transcript hash stand-in";

/// Length of PQClean's Falcon-512 secret key: the fn-dsa signing key's size without the
/// trailing 64-byte SHAKE256 hash of the public key.
const PQCLEAN_FALCON512_SK_LEN: usize = 1281;
/// Length of that trailing public-key hash in an fn-dsa signing key.
const FNDSA_HASHED_VK_LEN: usize = 64;
/// Largest unpadded (variable-length) Falcon-512 signature PQClean may produce.
const PQCLEAN_FALCON512_MAX_SIG_LEN: usize = 752;
/// Falcon-512 header bytes (0x00 / 0x50 / 0x30 + logn), the same in both implementations.
const FALCON512_PK_HEADER: u8 = 0x09;
const FALCON512_SK_HEADER: u8 = 0x59;
const FALCON512_SIG_HEADER: u8 = 0x39;
/// Falcon-512 polynomial degree.
const FALCON512_N: usize = 512;
/// Bits per coefficient: h (public key), f and g, F (secret key).
const FALCON512_H_BITS: u32 = 14;
const FALCON512_FG_BITS: u32 = 6;
const FALCON512_BIG_F_BITS: u32 = 8;
/// FIPS 205 / FN-DSA "pure" domain separator and an empty context's length byte.
const PURE_EMPTY_CONTEXT: [u8; 2] = [0x00, 0x00];
/// ML-KEM-768 expanded decapsulation key length (FIPS 203 dk, PQClean secret key) and the
/// length of its first part, dk_pke (the encapsulation key follows it).
const MLKEM768_EXPANDED_DK_LEN: usize = 2400;
const MLKEM768_DK_PKE_LEN: usize = 1152;
/// ML-KEM shared secret length.
const MLKEM_SS_LEN: usize = 32;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Splits our identity file (magic, algorithm id, u16-prefixed secret, u16-prefixed public)
/// into its raw key bytes. Test-only: the product never exposes the secret this way.
fn raw_keys(id: &Identity) -> (Vec<u8>, Vec<u8>) {
    let file = id.encode();
    let mut r = Reader::new(&file);
    assert_eq!(r.take(IDENTITY_MAGIC.len()).unwrap(), IDENTITY_MAGIC);
    assert_eq!(r.u8().unwrap(), id.public().algorithm() as u8);
    let secret = r.vec16(usize::from(u16::MAX)).unwrap().to_vec();
    let public = r.vec16(MAX_PUBLIC_KEY).unwrap().to_vec();
    r.finish().unwrap();
    assert_eq!(public, id.public().key());
    (secret, public)
}

// ---------------------------------------------------------------------------------------
// ML-KEM-768: FIPS 203 on both sides; every encoding agrees.
// ---------------------------------------------------------------------------------------

#[test]
fn mlkem768_sizes_agree() {
    assert_eq!(mlkem768::public_key_bytes(), MLKEM_EK_LEN);
    assert_eq!(mlkem768::ciphertext_bytes(), MLKEM_CT_LEN);
    assert_eq!(mlkem768::shared_secret_bytes(), MLKEM_SS_LEN);
    assert_eq!(mlkem768::secret_key_bytes(), MLKEM768_EXPANDED_DK_LEN);
    let dk = MlKemSecret::generate(&mut DeterministicRandom::new(1));
    assert_eq!(dk.public().len(), mlkem768::public_key_bytes());
}

#[test]
fn mlkem768_pqclean_encapsulates_to_our_key() {
    let mut rng = DeterministicRandom::new(2);
    for _ in 0..ROUNDS {
        let ours = MlKemSecret::generate(&mut rng);
        let pk = mlkem768::PublicKey::from_bytes(&ours.public()).unwrap();
        let (ss, ct) = mlkem768::encapsulate(&pk);
        assert_eq!(ct.as_bytes().len(), MLKEM_CT_LEN);
        let got = ours.decapsulate(ct.as_bytes()).unwrap();
        assert_eq!(got.expose(), ss.as_bytes());
    }
}

#[test]
fn mlkem768_we_encapsulate_to_pqclean_key() {
    let mut rng = DeterministicRandom::new(3);
    for _ in 0..ROUNDS {
        let (pk, sk) = mlkem768::keypair();
        let (ct, ss) = mlkem_encapsulate(&mut rng, pk.as_bytes()).unwrap();
        assert_eq!(ct.len(), mlkem768::ciphertext_bytes());
        let theirs = mlkem768::decapsulate(&mlkem768::Ciphertext::from_bytes(&ct).unwrap(), &sk);
        assert_eq!(theirs.as_bytes(), ss.expose());
    }
}

/// qssh stores ML-KEM keys only as 64-byte seeds (they are ephemeral anyway), but the
/// expanded 2400-byte form also matches PQClean's secret key byte for byte, and both
/// implementations derive the same implicit-rejection secret for a tampered ciphertext
/// (which checks where `z` sits in the key and how J(z || c) is computed).
#[test]
#[allow(deprecated)] // ml-kem deprecates the expanded form in favour of seeds.
fn mlkem768_expanded_secret_key_and_implicit_rejection_agree() {
    use ml_kem::kem::{Decapsulate, KeyExport};
    use ml_kem::ExpandedKeyEncoding;

    let mut rng = DeterministicRandom::new(4);
    for _ in 0..ROUNDS {
        // MlKemSecret::generate draws its 64-byte seed (d || z) first; replay it.
        let mut replay = rng.clone();
        let ours = MlKemSecret::generate(&mut rng);
        let seed = ml_kem::Seed::try_from(&random_array::<64>(&mut replay)[..]).unwrap();
        let dk = ml_kem::DecapsulationKey768::from_seed(seed);
        assert_eq!(
            dk.encapsulation_key().to_bytes().to_vec(),
            ours.public(),
            "MlKemSecret::generate no longer derives its key from the first 64 random bytes"
        );
        let expanded = dk.to_expanded_bytes();
        assert_eq!(expanded.len(), MLKEM768_EXPANDED_DK_LEN);
        // FIPS 203 layout: dk_pke (1152) || ek (1184) || H(ek) (32) || z (32).
        let ek_at = MLKEM768_DK_PKE_LEN;
        assert_eq!(&expanded[ek_at..ek_at + MLKEM_EK_LEN], &ours.public()[..]);
        let sk = mlkem768::SecretKey::from_bytes(&expanded).unwrap();

        let (ct, ss) = mlkem_encapsulate(&mut rng, &ours.public()).unwrap();
        let pq_ct = mlkem768::Ciphertext::from_bytes(&ct).unwrap();
        assert_eq!(mlkem768::decapsulate(&pq_ct, &sk).as_bytes(), ss.expose());

        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        let ours_reject = ours.decapsulate(&tampered).unwrap();
        let pq_reject =
            mlkem768::decapsulate(&mlkem768::Ciphertext::from_bytes(&tampered).unwrap(), &sk);
        assert_ne!(ours_reject, ss);
        assert_eq!(ours_reject.expose(), pq_reject.as_bytes());

        // PQClean's expanded key loads into ml-kem and decapsulates PQClean's ciphertext.
        let (pk2, sk2) = mlkem768::keypair();
        let (ss2, ct2) = mlkem768::encapsulate(&pk2);
        let loaded = ml_kem::DecapsulationKey768::from_expanded_bytes(
            &ml_kem::array::Array::try_from(sk2.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            loaded.encapsulation_key().to_bytes().as_slice(),
            pk2.as_bytes()
        );
        let got = loaded.decapsulate_slice(ct2.as_bytes()).unwrap();
        assert_eq!(got.as_slice(), ss2.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Falcon-512: fn-dsa 0.4 implements a "best guess" of the FN-DSA draft (see its README).
// Sizes and header bytes agree with original Falcon (PQClean) and the keys are the same
// lattice objects, but no encoding is shared: every packed field is in the opposite bit
// order, and the public key holds h in the NTT domain instead of its coefficients.
// Signatures cannot be converted at all: the message is hashed to a different point.
// ---------------------------------------------------------------------------------------

/// Falcon's modulus.
const Q: u32 = 12289;
/// The primitive 1024th root of unity mod q whose odd powers fn-dsa evaluates h at (7^2).
const FN_DSA_NTT_ROOT: u32 = 49;

/// Splits `src` into `nbits`-wide fields, most significant bit first (original Falcon).
fn fields_msb_first(src: &[u8], nbits: u32) -> Vec<u32> {
    let (mut acc, mut len, mut out) = (0u64, 0u32, Vec::new());
    for &b in src {
        acc = (acc << 8) | u64::from(b);
        len += 8;
        while len >= nbits {
            len -= nbits;
            out.push(((acc >> len) & ((1 << nbits) - 1)) as u32);
        }
    }
    assert_eq!(len, 0, "whole fields only");
    out
}

/// Splits `src` into `nbits`-wide fields, least significant bit first (fn-dsa 0.4).
fn fields_lsb_first(src: &[u8], nbits: u32) -> Vec<u32> {
    let (mut acc, mut len, mut out) = (0u64, 0u32, Vec::new());
    for &b in src {
        acc |= u64::from(b) << len;
        len += 8;
        while len >= nbits {
            out.push((acc & ((1 << nbits) - 1)) as u32);
            acc >>= nbits;
            len -= nbits;
        }
    }
    assert_eq!(len, 0, "whole fields only");
    out
}

fn pack_msb_first(fields: &[u32], nbits: u32) -> Vec<u8> {
    let (mut acc, mut len, mut out) = (0u64, 0u32, Vec::new());
    for &f in fields {
        acc = (acc << nbits) | u64::from(f);
        len += nbits;
        while len >= 8 {
            len -= 8;
            out.push((acc >> len) as u8);
        }
    }
    assert_eq!(len, 0, "whole bytes only");
    out
}

fn pack_lsb_first(fields: &[u32], nbits: u32) -> Vec<u8> {
    let (mut acc, mut len, mut out) = (0u64, 0u32, Vec::new());
    for &f in fields {
        acc |= u64::from(f) << len;
        len += nbits;
        while len >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            len -= 8;
        }
    }
    assert_eq!(len, 0, "whole bytes only");
    out
}

fn mul_mod_q(a: u32, b: u32) -> u32 {
    (u64::from(a) * u64::from(b) % u64::from(Q)) as u32
}

fn pow_mod_q(mut base: u32, mut exp: u32) -> u32 {
    let mut r = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            r = mul_mod_q(r, base);
        }
        base = mul_mod_q(base, base);
        exp >>= 1;
    }
    r
}

/// The point fn-dsa's NTT slot `i` holds h at: 49^(2 * bitrev9(i) + 1).
fn fn_dsa_ntt_point(i: usize) -> u32 {
    let rev = (i as u32).reverse_bits() >> (32 - FALCON512_N.trailing_zeros());
    pow_mod_q(FN_DSA_NTT_ROOT, 2 * rev + 1)
}

/// Original Falcon public key (coefficients of h, 14-bit fields, MSB first) to fn-dsa's
/// (h evaluated at the NTT points, 14-bit fields, LSB first).
fn falcon512_pk_to_fn_dsa(pk: &[u8]) -> Vec<u8> {
    let h = fields_msb_first(&pk[1..], FALCON512_H_BITS);
    let ntt: Vec<u32> = (0..FALCON512_N)
        .map(|i| {
            let x = fn_dsa_ntt_point(i);
            h.iter()
                .rev()
                .fold(0, |acc, &c| (mul_mod_q(acc, x) + c) % Q)
        })
        .collect();
    cat(&[&[pk[0]], &pack_lsb_first(&ntt, FALCON512_H_BITS)])
}

/// The inverse: h_j = n^-1 * sum_i h(x_i) * x_i^-j over the 512 NTT points x_i.
fn falcon512_pk_from_fn_dsa(pk: &[u8]) -> Vec<u8> {
    let ntt = fields_lsb_first(&pk[1..], FALCON512_H_BITS);
    let mut h = vec![0u32; FALCON512_N];
    for (i, &v) in ntt.iter().enumerate() {
        let x_inv = pow_mod_q(fn_dsa_ntt_point(i), Q - 2);
        let mut term = v;
        for c in h.iter_mut() {
            *c = (*c + term) % Q;
            term = mul_mod_q(term, x_inv);
        }
    }
    let n_inv = pow_mod_q(FALCON512_N as u32, Q - 2);
    let h: Vec<u32> = h.into_iter().map(|c| mul_mod_q(c, n_inv)).collect();
    cat(&[&[pk[0]], &pack_msb_first(&h, FALCON512_H_BITS)])
}

/// Re-packs the f, g and F fields of a Falcon-512 secret key (1281 bytes, without fn-dsa's
/// trailing public-key hash) between the two bit orders; the header byte is kept.
fn falcon512_sk_repack(key: &[u8], to_fn_dsa: bool) -> Vec<u8> {
    let mut out = vec![key[0]];
    let mut at = 1;
    for nbits in [FALCON512_FG_BITS, FALCON512_FG_BITS, FALCON512_BIG_F_BITS] {
        let len = FALCON512_N * nbits as usize / 8;
        let src = &key[at..at + len];
        out.extend(if to_fn_dsa {
            pack_lsb_first(&fields_msb_first(src, nbits), nbits)
        } else {
            pack_msb_first(&fields_lsb_first(src, nbits), nbits)
        });
        at += len;
    }
    assert_eq!((at, out.len()), (key.len(), key.len()));
    out
}

/// SHAKE256 with a 64-byte output over the concatenated parts.
fn shake256_64(parts: &[&[u8]]) -> [u8; 64] {
    let mut sh = fn_dsa::SHAKE256::new();
    for p in parts {
        sh.inject(p);
    }
    sh.flip();
    let mut out = [0u8; 64];
    sh.extract(&mut out);
    out
}

/// The message representative fn-dsa 0.4 signs for `m` in pure mode with an empty context:
/// mu = SHAKE256(SHAKE256(pk) || 0x00 || 0x00 || m), 64 bytes. Original Falcon signs `m`.
fn fn_dsa_mu(pk: &[u8], m: &[u8]) -> [u8; 64] {
    shake256_64(&[&shake256_64(&[pk]), &PURE_EMPTY_CONTEXT, m])
}

/// A PQClean Falcon-512 key pair converted to our identity's raw key format.
fn pqclean_pair_as_ours(pk: &[u8], sk: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let public = falcon512_pk_to_fn_dsa(pk);
    let secret = cat(&[&falcon512_sk_repack(sk, true), &shake256_64(&[&public])]);
    (secret, public)
}

#[test]
fn falcon512_sizes_and_headers_agree() {
    assert_eq!(falcon512::public_key_bytes(), FALCON512_PK_LEN);
    assert_eq!(falconpadded512::public_key_bytes(), FALCON512_PK_LEN);
    assert_eq!(falcon512::secret_key_bytes(), PQCLEAN_FALCON512_SK_LEN);
    assert_eq!(
        falconpadded512::secret_key_bytes(),
        PQCLEAN_FALCON512_SK_LEN
    );
    assert_eq!(
        FALCON512_SK_LEN,
        PQCLEAN_FALCON512_SK_LEN + FNDSA_HASHED_VK_LEN
    );
    // fn-dsa signatures have the fixed "padded" size; unpadded ones vary up to 752 bytes.
    assert_eq!(falconpadded512::signature_bytes(), FALCON512_SIG_LEN);
    assert_eq!(falcon512::signature_bytes(), PQCLEAN_FALCON512_MAX_SIG_LEN);

    let mut rng = DeterministicRandom::new(5);
    let id = Identity::generate(Algorithm::Falcon512, &mut rng);
    let (secret, public) = raw_keys(&id);
    let sig = id.sign(&mut rng, CONTEXT, MESSAGE);
    assert_eq!(
        (public[0], secret[0], sig[0]),
        (
            FALCON512_PK_HEADER,
            FALCON512_SK_HEADER,
            FALCON512_SIG_HEADER
        )
    );
    assert_eq!(
        secret[PQCLEAN_FALCON512_SK_LEN..],
        shake256_64(&[&public])[..],
        "fn-dsa signing key ends with SHAKE256(public key)"
    );
    let (pk, sk) = falconpadded512::keypair();
    let theirs = falconpadded512::detached_sign(MESSAGE, &sk);
    assert_eq!(
        (pk.as_bytes()[0], sk.as_bytes()[0], theirs.as_bytes()[0]),
        (
            FALCON512_PK_HEADER,
            FALCON512_SK_HEADER,
            FALCON512_SIG_HEADER
        )
    );
}

/// The keys are the same lattice objects. Converted (bit order; h's coefficients <-> h at
/// fn-dsa's NTT points), a PQClean key pair loads as our identity, whose loader re-derives
/// h from f and g and G from f, g and F with fn-dsa and compares, and it signs; and PQClean
/// signs with our converted secret key and verifies with our converted public key. As
/// stored, neither side's public key decodes / verifies on the other side.
#[test]
fn falcon512_keys_agree_up_to_encoding() {
    let mut rng = DeterministicRandom::new(6);
    for _ in 0..ROUNDS {
        // PQClean -> ours.
        let (pk, sk) = falconpadded512::keypair();
        let (secret, public) = pqclean_pair_as_ours(pk.as_bytes(), sk.as_bytes());
        let id = Identity::from_key_pair(Algorithm::Falcon512, &secret, &public).unwrap();
        let sig = id.sign(&mut rng, CONTEXT, MESSAGE);
        assert!(id.public().verify(CONTEXT, MESSAGE, &sig));
        assert_eq!(falcon512_pk_from_fn_dsa(&public), pk.as_bytes());
        // As stored, PQClean's public key is not a valid fn-dsa key: read least significant
        // bit first, some of its 512 14-bit fields exceed q.
        assert!(PublicIdentity::new(Algorithm::Falcon512, pk.as_bytes()).is_err());

        // Ours -> PQClean.
        let id = Identity::generate(Algorithm::Falcon512, &mut rng);
        let (secret, public) = raw_keys(&id);
        let pq_pk = falcon512_pk_from_fn_dsa(&public);
        assert_eq!(falcon512_pk_to_fn_dsa(&pq_pk), public);
        let pk = falconpadded512::PublicKey::from_bytes(&pq_pk).unwrap();
        let sk = falconpadded512::SecretKey::from_bytes(&falcon512_sk_repack(
            &secret[..PQCLEAN_FALCON512_SK_LEN],
            false,
        ))
        .unwrap();
        let theirs = falconpadded512::detached_sign(MESSAGE, &sk);
        assert!(falconpadded512::verify_detached_signature(&theirs, MESSAGE, &pk).is_ok());
        let as_stored = falconpadded512::PublicKey::from_bytes(&public).unwrap();
        assert!(falconpadded512::verify_detached_signature(&theirs, MESSAGE, &as_stored).is_err());
    }
}

/// Pins the signature difference, with the keys already converted: no signature verifies
/// on the other side, neither over the message nor over FN-DSA's mu. Reasons, from the
/// sources: (1) fn-dsa signs mu = SHAKE256(SHAKE256(pk) || 0x00 || len(ctx) || ctx || m)
/// where Falcon signs m; (2) hash-to-point reads the SHAKE256 output as little-endian 16-bit
/// words in fn-dsa, big-endian in Falcon, so even a PQClean signature over mu is for another
/// lattice point; (3) the compressed s2 is packed in the opposite bit order. The nonce length
/// (40), header byte (0x39) and padded size (666) agree.
#[test]
fn falcon512_signatures_do_not_cross_verify() {
    let mut rng = DeterministicRandom::new(7);
    let m = cat(&[CONTEXT, MESSAGE]);
    let (pk, sk) = falconpadded512::keypair();
    let (secret, public) = pqclean_pair_as_ours(pk.as_bytes(), sk.as_bytes());
    let id = Identity::from_key_pair(Algorithm::Falcon512, &secret, &public).unwrap();
    let mu = fn_dsa_mu(&public, &m);

    let ours = id.sign(&mut rng, CONTEXT, MESSAGE);
    assert!(id.public().verify(CONTEXT, MESSAGE, &ours));
    let ours = falconpadded512::DetachedSignature::from_bytes(&ours).unwrap();
    assert!(falconpadded512::verify_detached_signature(&ours, &m, &pk).is_err());
    assert!(falconpadded512::verify_detached_signature(&ours, &mu, &pk).is_err());
    let unpadded_pk = falcon512::PublicKey::from_bytes(pk.as_bytes()).unwrap();
    let unpadded = falcon512::DetachedSignature::from_bytes(ours.as_bytes()).unwrap();
    assert!(falcon512::verify_detached_signature(&unpadded, &mu, &unpadded_pk).is_err());

    for input in [&m[..], &mu[..]] {
        let theirs = falconpadded512::detached_sign(input, &sk);
        assert!(falconpadded512::verify_detached_signature(&theirs, input, &pk).is_ok());
        assert_eq!(theirs.as_bytes().len(), FALCON512_SIG_LEN);
        assert!(!id.public().verify(CONTEXT, MESSAGE, theirs.as_bytes()));
    }
}

// ---------------------------------------------------------------------------------------
// SLH-DSA-SHA2-128f (slh-dsa, FIPS 205) vs SPHINCS+ 3.1 sha2-128f-simple (PQClean): the
// keys agree; the signatures do not, not even through the FIPS 205 internal functions.
// ---------------------------------------------------------------------------------------

type Slh = slh_dsa::Sha2_128f;

#[test]
fn slh_dsa_sizes_and_key_layout() {
    assert_eq!(sphincs::public_key_bytes(), SLH_PK_LEN);
    assert_eq!(sphincs::secret_key_bytes(), SLH_SK_LEN + SLH_PK_LEN);
    assert_eq!(sphincs::signature_bytes(), SLH_SIG_LEN);
    for _ in 0..ROUNDS {
        // SPHINCS+ sk = SK.seed || SK.prf || PK.seed || PK.root, pk = PK.seed || PK.root.
        let (pk, sk) = sphincs::keypair();
        assert_eq!(&sk.as_bytes()[SLH_SK_LEN..], pk.as_bytes());
    }
}

/// A SPHINCS+ key pair loads as our identity: the loader recomputes PK.root from SK.seed
/// and PK.seed with slh-dsa (WOTS+, XMSS, the tweakable hashes and address encoding of the
/// top layer), so both derive the same root. The other way, our secret || public is a
/// working SPHINCS+ secret key: PQClean's signature, whose authentication path PQClean
/// builds from SK.seed, verifies against our PK.root.
#[test]
fn slh_dsa_key_pairs_agree_both_ways() {
    for _ in 0..ROUNDS {
        let (pk, sk) = sphincs::keypair();
        let id = Identity::from_key_pair(
            Algorithm::SlhDsaSha2_128f,
            &sk.as_bytes()[..SLH_SK_LEN],
            pk.as_bytes(),
        )
        .unwrap();
        assert_eq!(id.public().key(), pk.as_bytes());
        let mut wrong_root = pk.as_bytes().to_vec();
        wrong_root[SLH_PK_LEN - 1] ^= 1;
        assert!(Identity::from_key_pair(
            Algorithm::SlhDsaSha2_128f,
            &sk.as_bytes()[..SLH_SK_LEN],
            &wrong_root
        )
        .is_err());
    }
    let id = Identity::generate(Algorithm::SlhDsaSha2_128f, &mut DeterministicRandom::new(8));
    let (secret, public) = raw_keys(&id);
    let sk = sphincs::SecretKey::from_bytes(&cat(&[&secret, &public])).unwrap();
    let sig = sphincs::detached_sign(MESSAGE, &sk);
    let pk = sphincs::PublicKey::from_bytes(&public).unwrap();
    assert!(sphincs::verify_detached_signature(&sig, MESSAGE, &pk).is_ok());
}

/// Pins the signature difference: nothing verifies across, neither our product signature
/// (FIPS 205 pure mode, empty context) against SPHINCS+ over the message with or without
/// the 0x00 || 0x00 prefix, nor slh-dsa's FIPS 205 *internal* functions (no prefix at all)
/// against SPHINCS+. So the difference is inside the algorithm, not only the pure-mode
/// wrapper: SPHINCS+ 3.1 `message_to_indices` reads the FORS indices from the digest
/// least-significant bit first, FIPS 205 `base_2b` most-significant bit first.
#[test]
fn slh_dsa_signatures_do_not_cross_verify() {
    let mut rng = DeterministicRandom::new(9);
    let m = cat(&[CONTEXT, MESSAGE]);
    let prefixed = cat(&[&PURE_EMPTY_CONTEXT, &m]);
    let (pk, sk) = sphincs::keypair();
    let id = Identity::from_key_pair(
        Algorithm::SlhDsaSha2_128f,
        &sk.as_bytes()[..SLH_SK_LEN],
        pk.as_bytes(),
    )
    .unwrap();

    // Product code, both directions.
    let ours = id.sign(&mut rng, CONTEXT, MESSAGE);
    assert!(id.public().verify(CONTEXT, MESSAGE, &ours));
    let ours = sphincs::DetachedSignature::from_bytes(&ours).unwrap();
    for input in [&m, &prefixed] {
        assert!(sphincs::verify_detached_signature(&ours, input, &pk).is_err());
        let theirs = sphincs::detached_sign(input, &sk);
        assert!(sphincs::verify_detached_signature(&theirs, input, &pk).is_ok());
        assert!(!id.public().verify(CONTEXT, MESSAGE, theirs.as_bytes()));
    }

    // FIPS 205 internal functions, both directions.
    let vk = slh_dsa::VerifyingKey::<Slh>::try_from(pk.as_bytes()).unwrap();
    let signer = slh_dsa::SigningKey::<Slh>::try_from(sk.as_bytes()).unwrap();
    let internal = signer.slh_sign_internal(&[&m], None);
    assert!(vk.slh_verify_internal(&[&m], &internal).is_ok());
    let internal = sphincs::DetachedSignature::from_bytes(&internal.to_vec()).unwrap();
    assert!(sphincs::verify_detached_signature(&internal, &m, &pk).is_err());
    let theirs = sphincs::detached_sign(&m, &sk);
    let theirs = slh_dsa::Signature::<Slh>::try_from(theirs.as_bytes()).unwrap();
    assert!(vk.slh_verify_internal(&[&m], &theirs).is_err());
}
