//! Which bytes are right when a local file and the object at its key differ (DESIGN.md
//! invariant 8). Pure: the uploader gathers the facts, this decides.
//!
//! The rule. Until a file's first verified upload the local file is the truth. After it, the
//! verified object is: Synapse media are immutable (a media's bytes never change; a thumbnail is
//! generated once per size and method), and Synapse rewrites local copies without atomicity
//! (`ensure_media_is_in_local_cache` streams the object back with `open(path, "wb")`, no temp
//! file, no cleanup when the stream fails), so a local file that differs from a verified object is
//! a **bad local copy**, never an upload. Where Synapse's database holds the media's SHA-256, that
//! hash decides which bytes are right, whoever wrote them.
//!
//! | object at the key | decision |
//! |---|---|
//! | none | PUT: the local file is the only copy |
//! | the local file's bytes | adopt (record it) |
//! | written by us in this upload, or provisional (the file changed during our upload) | PUT: it was never the file's final content |
//! | other bytes, Synapse's hash known | the local file matches it: PUT; else heal from the object if *its* bytes match the hash (checked on the GET), else conflict |
//! | other bytes, verified by us | bad local copy: heal from the object (GET checked against our digest) |
//! | other bytes, while the local file holds the bytes we verified (the object was replaced behind our back) | PUT: restores the verified bytes |
//! | other bytes, never verified by us (e.g. uploaded by `s3_media_upload`) | conflict: keep both, report |

use super::s3::ObjectInfo;
use crate::state::Record;

/// The local file as it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub size: u64,
    pub md5: [u8; 16],
    pub sha256: [u8; 32],
}

/// What the object's bytes must be for a heal to use them; every field that is set is checked on
/// the GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expect {
    pub size: Option<u64>,
    pub md5: Option<[u8; 16]>,
    pub sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No object, or one that may be replaced: PUT the local file.
    Put,
    /// The object already holds the local file's bytes: record it.
    Adopt,
    /// The local file is a bad copy: replace it with the object's bytes, which must match.
    BadCopy(Expect),
    /// Nothing tells which is right: keep both and report (the reason says what differs).
    Conflict(String),
}

impl Decision {
    /// Whether Synapse's hash could change this decision (so it is worth asking the database).
    pub fn wants_arbiter(&self) -> bool {
        matches!(self, Decision::BadCopy(_) | Decision::Conflict(_))
    }
}

/// Decides for one file. `ours` is an object this same upload wrote in an earlier round (the file
/// changed under it); `synapse` is the media's SHA-256 from Synapse's database, when known.
pub fn decide(
    local: &Local,
    record: Option<&Record>,
    ours: Option<(u64, [u8; 16])>,
    object: Option<&ObjectInfo>,
    synapse: Option<[u8; 32]>,
) -> Decision {
    let Some(o) = object else {
        return Decision::Put;
    };
    if o.confirms(local.size, &local.md5) {
        return Decision::Adopt;
    }
    // The object holds other bytes than the local file.
    if ours.is_some_and(|(size, md5)| o.confirms(size, &md5)) {
        return Decision::Put;
    }
    let holds = |r: &&Record| o.confirms(r.size, &r.md5);
    if record.filter(holds).is_some_and(|r| r.provisional) {
        return Decision::Put;
    }
    let verified = record.filter(holds).filter(|r| !r.provisional);
    if let Some(h) = synapse {
        if local.sha256 == h {
            // The arbiter says the local bytes are right: the object is wrong, whoever wrote it.
            return Decision::Put;
        }
        if verified.is_some_and(|r| r.sha256.is_some_and(|s| s != h)) {
            return Decision::Conflict(
                "neither the local file nor the verified object matches Synapse's sha256".into(),
            );
        }
        return Decision::BadCopy(Expect {
            size: verified.map(|r| r.size),
            md5: verified.map(|r| r.md5),
            sha256: Some(h),
        });
    }
    // The local file still holds the bytes we verified: the object was replaced behind our back
    // (by hand, another tool); putting the verified bytes back overwrites nothing verified.
    if record.is_some_and(|r| !r.provisional && r.same_bytes(local.size, &local.md5)) {
        return Decision::Put;
    }
    match verified {
        Some(r) => Decision::BadCopy(Expect {
            size: Some(r.size),
            md5: Some(r.md5),
            sha256: r.sha256,
        }),
        None => Decision::Conflict(format!(
            "the object differs from the local file and was never verified by us{}",
            match record {
                Some(_) => " (our record describes other bytes than either)",
                None => "",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(n: u8) -> Local {
        Local {
            size: n as u64,
            md5: [n; 16],
            sha256: [n; 32],
        }
    }

    fn object(n: u8) -> ObjectInfo {
        ObjectInfo {
            size: n as u64,
            meta_md5: Some([n; 16]),
            etag: None,
        }
    }

    fn record(n: u8) -> Record {
        Record::new(n as u64, 1, [n; 16]).with_sha256([n; 32])
    }

    #[test]
    fn the_verified_object_wins_over_a_different_local_file() {
        // Verified 10; the local file now holds 3 (a truncated write-back): heal, never PUT.
        let d = decide(&local(3), Some(&record(10)), None, Some(&object(10)), None);
        assert_eq!(
            d,
            Decision::BadCopy(Expect {
                size: Some(10),
                md5: Some([10; 16]),
                sha256: Some([10; 32])
            })
        );
        // Even when the record was marked stale by a sweep (object found different once).
        let d = decide(
            &local(3),
            Some(&record(10).stale()),
            None,
            Some(&object(10)),
            None,
        );
        assert!(matches!(d, Decision::BadCopy(_)), "{d:?}");
    }

    #[test]
    fn plain_cases() {
        assert_eq!(decide(&local(3), None, None, None, None), Decision::Put);
        assert_eq!(
            decide(&local(3), Some(&record(10)), None, None, None),
            Decision::Put,
            "the object is gone: the local file is the only copy"
        );
        assert_eq!(
            decide(&local(3), None, None, Some(&object(3)), None),
            Decision::Adopt
        );
        assert_eq!(
            decide(&local(3), Some(&record(10)), None, Some(&object(3)), None),
            Decision::Adopt
        );
    }

    #[test]
    fn our_own_unverified_objects_are_replaced() {
        // Written by an earlier round of this upload.
        assert_eq!(
            decide(&local(4), None, Some((3, [3; 16])), Some(&object(3)), None),
            Decision::Put
        );
        // Written by an upload the file changed under (recorded provisional).
        assert_eq!(
            decide(
                &local(4),
                Some(&record(3).provisional()),
                None,
                Some(&object(3)),
                None
            ),
            Decision::Put
        );
    }

    #[test]
    fn an_object_never_verified_by_us_is_a_conflict() {
        assert!(matches!(
            decide(&local(4), None, None, Some(&object(3)), None),
            Decision::Conflict(_)
        ));
        // A record of other bytes than either (the object was replaced by someone else).
        assert!(matches!(
            decide(&local(4), Some(&record(9)), None, Some(&object(3)), None),
            Decision::Conflict(_)
        ));
    }

    #[test]
    fn verified_bytes_replaced_behind_our_back_are_put_back() {
        // We verified 4, the local file still holds 4, the object now holds 3.
        assert_eq!(
            decide(&local(4), Some(&record(4)), None, Some(&object(3)), None),
            Decision::Put
        );
        assert_eq!(
            decide(
                &local(4),
                Some(&record(4).stale()),
                None,
                Some(&object(3)),
                None
            ),
            Decision::Put
        );
    }

    #[test]
    fn synapse_hash_is_the_arbiter() {
        // The local file matches Synapse's hash: the object is wrong, even a verified one.
        assert_eq!(
            decide(
                &local(4),
                Some(&record(3)),
                None,
                Some(&object(3)),
                Some([4; 32])
            ),
            Decision::Put
        );
        assert_eq!(
            decide(&local(4), None, None, Some(&object(3)), Some([4; 32])),
            Decision::Put
        );
        // The local file does not match it: heal from the object if the object does (checked on
        // the GET), whether or not we verified it.
        assert_eq!(
            decide(&local(4), None, None, Some(&object(3)), Some([3; 32])),
            Decision::BadCopy(Expect {
                sha256: Some([3; 32]),
                ..Expect::default()
            })
        );
        assert_eq!(
            decide(
                &local(4),
                Some(&record(3)),
                None,
                Some(&object(3)),
                Some([3; 32])
            ),
            Decision::BadCopy(Expect {
                size: Some(3),
                md5: Some([3; 16]),
                sha256: Some([3; 32])
            })
        );
        // Our record says the object's bytes do not match it either: nothing to heal from.
        assert!(matches!(
            decide(
                &local(4),
                Some(&record(3)),
                None,
                Some(&object(3)),
                Some([7; 32])
            ),
            Decision::Conflict(_)
        ));
        assert!(Decision::Conflict(String::new()).wants_arbiter());
        assert!(!Decision::Put.wants_arbiter());
    }
}
