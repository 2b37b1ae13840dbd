//! What a state record says about one file, and the copy problems kept for `status` and `audit`.

use super::now_ms;

/// What we verified in the bucket for one file.
///
/// A record outlives its local file (the sweep deletes the file, the record stays): it is our
/// memory that the object at this key was verified to hold these bytes, and therefore which bytes
/// are right once the local file differs (DESIGN.md invariant 8: Synapse media are immutable, a
/// verified object is never overwritten with different bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub size: u64,
    /// Modification time in nanoseconds since the epoch, as seen before reading the file.
    pub mtime_ns: i64,
    pub md5: [u8; 16],
    /// SHA-256 of the bytes (computed in the same pass as the MD5); `None` in records written by
    /// versions before it was kept.
    pub sha256: Option<[u8; 32]>,
    /// When the object was verified, milliseconds since the epoch.
    pub verified_at_ms: u64,
    /// The (size, mtime) shortcut no longer holds (the sweep or audit found the object missing or
    /// different): the file must be looked at again, but the digest is still what was verified.
    pub stale: bool,
    /// We wrote the object from a file that changed during its upload (the queue's dirty flag): the
    /// object holds these bytes, but they were never the file's final content, so it may be
    /// replaced. Never confirms anything for the sweep.
    pub provisional: bool,
    /// The object's ETag when it was verified, if it is a multipart ETag (the MD5 of the parts'
    /// MD5s, and the number of parts): such an ETag is not the MD5 of the bytes, so without it
    /// the sweep could not recognise the object by its ETag (HEAD without our digest metadata, or
    /// a listing) and would read the file again to recompute it. `None` for single-part objects,
    /// whose ETag is the MD5 above.
    pub multipart_etag: Option<([u8; 16], u32)>,
}

const RECORD_V1_LEN: usize = 1 + 8 + 8 + 16 + 8;
const RECORD_V1: u8 = 1;
const RECORD_V2_LEN: usize = RECORD_V1_LEN + 1 + 32;
const RECORD_V2: u8 = 2;
/// Version 2 and the multipart ETag; written only for records that have one, so that records of
/// single-part objects stay readable by versions before it.
const RECORD_V3_LEN: usize = RECORD_V2_LEN + 16 + 4;
const RECORD_V3: u8 = 3;
const FLAG_SHA256: u8 = 1;
const FLAG_STALE: u8 = 2;
const FLAG_PROVISIONAL: u8 = 4;

impl Record {
    pub fn new(size: u64, mtime_ns: i64, md5: [u8; 16]) -> Self {
        Record {
            size,
            mtime_ns,
            md5,
            sha256: None,
            verified_at_ms: now_ms(),
            stale: false,
            provisional: false,
            multipart_etag: None,
        }
    }

    /// With the multipart ETag the object had when verified (`"<hex>-<parts>"`, quotes allowed);
    /// anything else (a single-part ETag, garbage) leaves the record as it is.
    pub fn with_etag(mut self, etag: Option<&str>) -> Self {
        if let Some(e) = etag.and_then(parse_multipart_etag) {
            self.multipart_etag = Some(e);
        }
        self
    }

    /// Whether `etag` (as a HEAD or a listing shows it) is the multipart ETag this record
    /// verified. The caller checks that the local file holds this record's bytes.
    pub fn etag_is_verified(&self, etag: &str) -> bool {
        self.multipart_etag.is_some() && parse_multipart_etag(etag) == self.multipart_etag
    }

    /// Whether an object of `object_size` showing `etag` holds the bytes of a file of `size` and
    /// `md5`, by this record: the record verified an object with those bytes and that multipart
    /// ETag (the MD5 of its parts' MD5s: other bytes give another one). Never by a provisional
    /// record (its bytes were never the file's final content).
    pub fn vouches_for(&self, size: u64, md5: &[u8; 16], object_size: u64, etag: &str) -> bool {
        !self.provisional
            && object_size == size
            && self.same_bytes(size, md5)
            && self.etag_is_verified(etag)
    }

    pub fn with_sha256(mut self, sha256: [u8; 32]) -> Self {
        self.sha256 = Some(sha256);
        self
    }

    /// The same verified digest, without the (size, mtime) shortcut: the next upload looks at the
    /// file and the bucket again, and still knows which bytes were verified.
    pub fn stale(mut self) -> Self {
        self.stale = true;
        self
    }

    /// See [`Record::provisional`].
    pub fn provisional(mut self) -> Self {
        self.provisional = true;
        self
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_V2_LEN];
        b[0] = RECORD_V2;
        if let Some((digest, parts)) = self.multipart_etag {
            b[0] = RECORD_V3;
            b.extend(digest);
            b.extend(parts.to_le_bytes());
        }
        b[1..9].copy_from_slice(&self.size.to_le_bytes());
        b[9..17].copy_from_slice(&self.mtime_ns.to_le_bytes());
        b[17..33].copy_from_slice(&self.md5);
        b[33..41].copy_from_slice(&self.verified_at_ms.to_le_bytes());
        let mut flags = 0;
        if let Some(sha) = &self.sha256 {
            flags |= FLAG_SHA256;
            b[42..74].copy_from_slice(sha);
        }
        if self.stale {
            flags |= FLAG_STALE;
        }
        if self.provisional {
            flags |= FLAG_PROVISIONAL;
        }
        b[41] = flags;
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<Self> {
        let (v2, v3) = match (b.first(), b.len()) {
            (Some(&RECORD_V1), RECORD_V1_LEN) => (false, false),
            (Some(&RECORD_V2), RECORD_V2_LEN) => (true, false),
            (Some(&RECORD_V3), RECORD_V3_LEN) => (true, true),
            _ => return None,
        };
        let flags = if v2 { b[41] } else { 0 };
        Some(Record {
            size: u64::from_le_bytes(b[1..9].try_into().ok()?),
            mtime_ns: i64::from_le_bytes(b[9..17].try_into().ok()?),
            md5: b[17..33].try_into().ok()?,
            sha256: if flags & FLAG_SHA256 != 0 {
                Some(b[42..74].try_into().ok()?)
            } else {
                None
            },
            verified_at_ms: u64::from_le_bytes(b[33..41].try_into().ok()?),
            stale: flags & FLAG_STALE != 0,
            provisional: flags & FLAG_PROVISIONAL != 0,
            multipart_etag: if v3 {
                Some((
                    b[RECORD_V2_LEN..RECORD_V2_LEN + 16].try_into().ok()?,
                    u32::from_le_bytes(b[RECORD_V2_LEN + 16..].try_into().ok()?),
                ))
            } else {
                None
            },
        })
    }

    /// Whether this record still describes a file of this size and mtime (so the file needs no
    /// look: it is verified). Never for a stale or provisional record.
    pub fn matches(&self, size: u64, mtime_ns: i64) -> bool {
        !self.stale && !self.provisional && self.size == size && self.mtime_ns == mtime_ns
    }

    /// Whether these are the bytes this record verified (same size and MD5).
    pub fn same_bytes(&self, size: u64, md5: &[u8; 16]) -> bool {
        self.size == size && &self.md5 == md5
    }
}

/// `"<32 hex>-<parts>"` (quotes allowed) as (digest, parts); `None` for any other ETag.
fn parse_multipart_etag(etag: &str) -> Option<([u8; 16], u32)> {
    let (digest, parts) = etag.trim_matches('"').split_once('-')?;
    let digest: [u8; 16] = hex::decode(digest).ok()?.try_into().ok()?;
    let parts: u32 = parts.parse().ok()?;
    (parts > 0).then_some((digest, parts))
}

/// What is wrong between a local file and its object, for `status` and `audit`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// Sizes and digests, for the operator.
    pub detail: String,
    pub seen_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The local file differs from the verified object (not healed: healing is off, or failed).
    BadLocalCopy,
    /// The local file differs from an object we never verified, and nothing tells which is right.
    Conflict,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(Record::decode(&[1, 2, 3]), None);
        let mut b = Record::new(1, 2, [3; 16]).encode();
        b[0] = 9;
        assert_eq!(Record::decode(&b), None);
    }

    #[test]
    fn records_keep_their_digests_and_flags_and_old_ones_still_read() {
        let r = Record::new(5, 6, [7; 16]).with_sha256([8; 32]);
        let mp = r.with_etag(Some(&format!("\"{}-3\"", "ab".repeat(16))));
        assert_eq!(mp.multipart_etag, Some(([0xab; 16], 3)));
        for r in [
            r,
            r.stale(),
            r.provisional(),
            Record::new(1, 2, [3; 16]),
            mp,
            mp.stale(),
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(
            r.encode().len(),
            RECORD_V2_LEN,
            "no multipart ETag: still version 2"
        );
        assert!(mp.etag_is_verified(&format!("{}-3", "AB".repeat(16))));
        assert!(!mp.etag_is_verified(&format!("{}-4", "ab".repeat(16))));
        assert!(!mp.etag_is_verified(&"ab".repeat(16)));
        assert!(!r.etag_is_verified(&format!("{}-3", "ab".repeat(16))));
        for single in [
            Some("ab".repeat(16)),
            Some("x-1".into()),
            Some(format!("{}-0", "ab".repeat(16))),
            None,
        ] {
            assert_eq!(r.with_etag(single.as_deref()), r);
        }
        assert!(r.matches(5, 6));
        assert!(!r.stale().matches(5, 6), "a stale record is no shortcut");
        assert!(!r.provisional().matches(5, 6));
        assert!(
            r.stale().same_bytes(5, &[7; 16]),
            "but it still knows the bytes"
        );
        // A record as version 1 wrote it (before the SHA-256 was kept).
        let mut v1 = Vec::from([RECORD_V1]);
        v1.extend(5u64.to_le_bytes());
        v1.extend(6i64.to_le_bytes());
        v1.extend([7u8; 16]);
        v1.extend(9u64.to_le_bytes());
        let old = Record::decode(&v1).unwrap();
        assert_eq!((old.size, old.sha256, old.verified_at_ms), (5, None, 9));
        assert!(old.matches(5, 6));
    }
}
