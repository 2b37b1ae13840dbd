//! SHA-256 through AWS-LC (like [`crate::md5`]): the digest Synapse itself records for each media
//! (`local_media_repository.sha256`, `remote_media_cache.sha256`, Synapse ≥ 1.128). We compute it
//! in the same pass as the MD5, so the sweep and the audit can compare what we uploaded with
//! Synapse's hash without reading the object back.

use std::mem::MaybeUninit;

use aws_lc_sys::{SHA256_CTX, SHA256_Final, SHA256_Init, SHA256_Update};

/// A SHA-256 computation in progress.
#[derive(Clone)]
pub struct Sha256(SHA256_CTX);

impl Sha256 {
    pub fn new() -> Self {
        let mut ctx = MaybeUninit::<SHA256_CTX>::uninit();
        // SAFETY: SHA256_Init writes every field of the context (a plain C struct of integers and
        // bytes) and cannot fail: it always returns 1.
        unsafe {
            SHA256_Init(ctx.as_mut_ptr());
            Sha256(ctx.assume_init())
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        // SAFETY: the context is initialised (new) and exclusively borrowed; AWS-LC reads exactly
        // `data.len()` bytes from `data` and keeps no pointer to them. Always returns 1.
        unsafe {
            SHA256_Update(&mut self.0, data.as_ptr().cast(), data.len());
        }
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // SAFETY: `out` is the 32 bytes SHA256_Final writes; the context is initialised and owned.
        unsafe {
            SHA256_Final(out.as_mut_ptr(), &mut self.0);
        }
        out
    }

    /// The SHA-256 of `data` in one call.
    pub fn digest(data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(data);
        h.finalize()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// Parses Synapse's hex SHA-256 column; `None` for anything that is not 64 hex digits.
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    hex::decode(s.trim()).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answers() {
        // FIPS 180-2, appendix B.
        assert_eq!(
            hex::encode(Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(Sha256::digest(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex::encode(Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let h = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_hex(h), Some(Sha256::digest(b"abc")));
        assert_eq!(parse_hex("abc"), None);
    }

    proptest! {
        /// Any split of the input hashes as the whole does.
        #[test]
        fn split_does_not_matter(data in proptest::collection::vec(any::<u8>(), 0..5000), cut in 0usize..5000) {
            let cut = cut.min(data.len());
            let mut h = Sha256::default();
            h.update(&data[..cut]);
            h.update(&data[cut..]);
            prop_assert_eq!(h.finalize(), Sha256::digest(&data));
        }
    }
}
