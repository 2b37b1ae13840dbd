//! The dense sweep: when many media age out at once (the first sweep after a migration, a
//! `keep_local_for` shortened), the files are confirmed from a bucket listing instead of one HEAD
//! each. A ListObjectsV2 page answers for up to 1,000 keys: size and ETag, which is the MD5 of the
//! bytes for an object uploaded in one part without SSE-C/KMS.
//!
//! # When (the rule)
//! [`choose`]: with `sweep.listing: auto`, dense when the aged local media are at least
//! [`MIN_AGED`] and at least 1 in [`DENSITY`] of all local media (counts from Synapse's database at
//! the start of the sweep, one `count(*)` query); the remote media of a dense sweep are confirmed
//! the same way. Why that ratio: a listing reads every object of
//! the folder between the aged media, at most about `objects / 1000` requests (fewer, see
//! [`Cursor`]); one HEAD per aged file costs `aged files` requests. At 1 in 50 the listing costs at
//! most 1 request per 20 files confirmed (and on a store where every media is uploaded the
//! objects of a folder are about its media times their files, so the ratio of media is the ratio
//! of files). Below it (the hourly steady state: a few media an hour) HEADs are cheaper: no page
//! of 1,000 keys is read to confirm one.
//!
//! # The merge
//! Aged local media come from the database in `media_id` order, which is the byte order of their
//! keys (`local_content/AB/CD/REST` and `local_thumbnails/AB/CD/REST/…` split the id at the same
//! characters; Synapse requires `COLLATE C` of its database); aged remote media, in a dense sweep,
//! in (origin, `filesystem_id`) order, the order of `remote_content/ORIGIN/AB/CD/REST` but at
//! origins that prefix one another. One [`Cursor`] per folder walks the
//! listing forward in step: a key inside the interval its last page covers is answered from that
//! page; a key past it starts the next page at that key (`StartAfter`), so the listing skips the
//! objects between two aged media that are far apart instead of reading them. Keys that come out
//! of order cost a page each and stay correct: a page answers only for the interval it covers.
//!
//! # Why a listing page is as good a confirmation as a HEAD
//! Only a *positive* answer is taken from the listing: a listed object of the file's size whose
//! ETag equals the MD5 of the file's bytes (from our record while the file still matches it, else
//! read once) holds those bytes (MD5 of the same bytes; an ETag that is not an MD5 — multipart,
//! SSE-C, SSE-KMS — never equals one). Anything else (not listed, another size, another ETag,
//! no ETag: s3s-fs lists none) gets a HEAD exactly as a sparse sweep does, so the listing can only
//! save requests, never decide a deletion that a HEAD would refuse on the same object.
//! The page is read during this sweep, at most [`MAX_PAGE_AGE`] before the file is deleted (an
//! older page is read again), never taken from an earlier audit. AWS S3 has strong read-after-write consistency for every operation, listings
//! included (since December 2020): a page read after a PUT or DELETE completed shows it, exactly
//! as a HEAD would. S3-compatible servers that store the listing in the same metadata store as the
//! objects (MinIO, Garage, Ceph RGW with its bucket index, SeaweedFS filer, s3s-fs) promise the
//! same; a server whose listing lags its writes (an eventually consistent index) can only show an
//! object deleted or replaced moments ago as still there, which is the window below.
//!
//! # The window that remains
//! Between the read that confirmed a file and its unlink, the object can be deleted or replaced by
//! someone else (an admin, a lifecycle rule, another tool); neither we nor Synapse delete or
//! overwrite a verified object. A HEAD leaves the same window, from its answer to the unlink
//! (milliseconds); a listing page widens it to the time from the page's read to the unlink of the
//! last file it confirms: the sweep of one page of aged media, bounded by [`MAX_PAGE_AGE`]. The
//! local side is unchanged: size and mtime are re-checked right before each unlink.

use std::time::{Duration, Instant};

use crate::config::Listing;
use crate::state::Record;
use crate::upload::s3::{Listed, ObjectStore, S3Error};

/// Aged local media below which a sweep stays on HEADs whatever the ratio (one page of them).
pub const MIN_AGED: i64 = 1000;
/// Dense when at least 1 in this many local media are aged (see the module docs).
pub const DENSITY: i64 = 50;
/// A listing page older than this confirms nothing: it is read again.
pub const MAX_PAGE_AGE: Duration = Duration::from_secs(30);
/// Keys per ListObjectsV2 page (S3's maximum).
const PAGE_KEYS: i32 = 1000;

/// Whether this sweep confirms from listings (see the module docs for the rule).
pub fn choose(mode: Listing, aged_local: i64, local_media: i64) -> bool {
    match mode {
        Listing::Never => false,
        Listing::Always => true,
        Listing::Auto => {
            aged_local >= MIN_AGED && aged_local.saturating_mul(DENSITY) >= local_media
        }
    }
}

/// What the listing showed at one key, and when the page was read.
#[derive(Debug, Clone)]
pub struct Seen {
    pub object: Listed,
    pub read_at: Instant,
}

impl Seen {
    /// Whether this listing entry, still fresh, proves the object holds the bytes of this size
    /// and MD5: its ETag is that MD5, or the multipart ETag that `record` verified for those
    /// bytes (see the module docs; `false` only means "ask with a HEAD").
    pub fn confirms(&self, size: u64, md5: &[u8; 16], record: Option<&Record>) -> bool {
        let Some(etag) = self.object.etag.as_deref() else {
            return false;
        };
        self.read_at.elapsed() < MAX_PAGE_AGE
            && ((self.object.size == size && etag.eq_ignore_ascii_case(&hex::encode(md5)))
                || record.is_some_and(|r| r.vouches_for(size, md5, self.object.size, etag)))
    }
}

/// A forward walk of the listing of one top-level folder (see the module docs).
pub struct Cursor {
    within: &'static str,
    /// The last page, sorted by key, and the interval of keys it answers for: after `after`
    /// (exclusive), through `through` (inclusive; `None`: to the end of the folder).
    page: Vec<Listed>,
    after: Option<String>,
    through: Option<String>,
    read_at: Instant,
    /// LIST requests made.
    pub requests: u64,
}

impl Cursor {
    pub fn new(within: &'static str) -> Cursor {
        Cursor {
            within,
            page: Vec::new(),
            after: None,
            through: None,
            read_at: Instant::now(),
            requests: 0,
        }
    }

    /// The folder this cursor lists (relative to the prefix).
    pub fn within(&self) -> &'static str {
        self.within
    }

    fn covers(&self, key: &str) -> bool {
        let Some(after) = &self.after else {
            return false;
        };
        key > after.as_str()
            && self.through.as_deref().is_none_or(|t| key <= t)
            && self.read_at.elapsed() < MAX_PAGE_AGE / 2
    }

    /// The listing's entry at `key` (a full key under this cursor's folder), reading the page
    /// that starts at it unless the last page covers it. `None`: not listed (or no longer
    /// answerable), which the caller takes as "ask with a HEAD".
    pub async fn lookup(
        &mut self,
        store: &ObjectStore,
        key: &str,
    ) -> Result<Option<Seen>, S3Error> {
        if !self.covers(key) {
            // StartAfter is exclusive: start after the key less its last character, so the key
            // itself is in the page (the few keys between them are skipped over below).
            let mut start = key.to_owned();
            start.pop();
            let read_at = Instant::now();
            self.requests += 1;
            let (mut page, truncated) = store.list_after(self.within, &start, PAGE_KEYS).await?;
            // S3 lists in byte order; sorted again so that a server that does not cannot make a
            // lookup miss a key it listed (a miss is only a HEAD, but costs one).
            page.sort_by(|a, b| a.key.cmp(&b.key));
            self.through = if truncated {
                Some(page.last().map_or_else(|| start.clone(), |l| l.key.clone()))
            } else {
                None
            };
            self.after = Some(start);
            self.page = page;
            self.read_at = read_at;
        }
        Ok(self
            .page
            .binary_search_by(|l| l.key.as_str().cmp(key))
            .ok()
            .map(|i| Seen {
                object: self.page[i].clone(),
                read_at: self.read_at,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_only_when_many_age_out_at_once() {
        // Hourly steady state: a few aged media among many.
        assert!(!choose(Listing::Auto, 40, 1_000_000));
        // A whole page but under 1 in 50.
        assert!(!choose(Listing::Auto, 10_000, 1_000_000));
        assert!(choose(Listing::Auto, 20_000, 1_000_000));
        assert!(choose(Listing::Auto, 100_000, 1_000_000));
        // A small store entirely aged: fewer than a page, HEADs are cheap enough.
        assert!(!choose(Listing::Auto, 999, 999));
        assert!(choose(Listing::Always, 1, 1_000_000));
        assert!(!choose(Listing::Never, 1_000_000, 1_000_000));
    }

    fn seen(size: u64, etag: Option<&str>, age: Duration) -> Seen {
        Seen {
            object: Listed {
                key: "k".into(),
                size,
                etag: etag.map(str::to_owned),
                last_modified_ms: None,
            },
            read_at: Instant::now() - age,
        }
    }

    #[test]
    fn a_listing_confirms_only_the_same_size_and_md5_from_a_fresh_page() {
        let md5 = [0xab; 16];
        let hex = hex::encode(md5);
        let fresh = Duration::ZERO;
        assert!(seen(5, Some(&hex), fresh).confirms(5, &md5, None));
        assert!(seen(5, Some(&hex.to_uppercase()), fresh).confirms(5, &md5, None));
        assert!(!seen(6, Some(&hex), fresh).confirms(5, &md5, None), "size");
        assert!(
            !seen(5, Some(&"cd".repeat(16)), fresh).confirms(5, &md5, None),
            "digest"
        );
        assert!(
            !seen(5, None, fresh).confirms(5, &md5, None),
            "no ETag (s3s-fs)"
        );
        let mp = format!("{}-2", "cd".repeat(16));
        assert!(
            !seen(5, Some(&mp), fresh).confirms(5, &md5, None),
            "multipart"
        );
        assert!(
            !seen(5, Some(&hex), MAX_PAGE_AGE).confirms(5, &md5, None),
            "stale page"
        );
        // A multipart ETag our record verified for these bytes confirms; not for other bytes,
        // another ETag, another size, or from a provisional record.
        let r = Record::new(5, 1, md5).with_etag(Some(&mp));
        assert!(seen(5, Some(&mp), fresh).confirms(5, &md5, Some(&r)));
        assert!(!seen(5, Some(&mp), fresh).confirms(5, &[1; 16], Some(&r)));
        assert!(
            !seen(5, Some(&format!("{}-3", "cd".repeat(16))), fresh).confirms(5, &md5, Some(&r))
        );
        assert!(!seen(6, Some(&mp), fresh).confirms(5, &md5, Some(&r)));
        assert!(!seen(5, Some(&mp), fresh).confirms(5, &md5, Some(&r.provisional())));
    }
}
