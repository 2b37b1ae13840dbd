//! Incomplete multipart uploads under our prefix, for the audit's report: counted, dated and sized
//! (ListParts for the oldest few), and with `--fix` aborted once they are older than a day and
//! their key is a media path (what we upload). An upload of ours in flight right now is never that
//! old, so it is never aborted under a running daemon; other tools' keys under the prefix are only
//! counted.

use std::time::Duration;

use super::report::Report;
use crate::layout::MediaPath;
use crate::upload::s3::{Incomplete, IncompleteUploads, ObjectStore};

/// `--fix` aborts incomplete uploads older than this (a lifecycle rule's shortest setting).
pub const ABORT_AFTER: Duration = Duration::from_secs(86_400);
/// Uploads whose parts are summed (one ListParts each); the report's bytes are theirs.
const SIZED: usize = 100;

/// Whether `--fix` may abort `u`: old enough that nothing of ours can still be uploading it, and
/// a media key under our prefix.
fn abortable(u: &Incomplete, prefix: &str, now_ms: u64) -> bool {
    u.older_than(ABORT_AFTER, now_ms)
        && u.key
            .strip_prefix(prefix)
            .is_some_and(|rel| MediaPath::parse(rel).is_ok_and(|p| p.is_uploadable(true)))
}

/// Fills the report's incomplete-upload fields. Never fails the audit: a provider without
/// ListMultipartUploads, or a key not allowed to list them, is said in the report.
pub async fn audit(store: &ObjectStore, r: &mut Report, fix: bool, dry_run: bool, n: usize) {
    let (uploads, truncated) = match store.incomplete_uploads().await {
        Ok(IncompleteUploads::Listed { uploads, truncated }) => (uploads, truncated),
        Ok(IncompleteUploads::Unsupported(_)) => {
            r.incomplete_uploads_unlisted = Some("not supported by this provider".into());
            return;
        }
        Err(e) => {
            r.incomplete_uploads_unlisted = Some(format!("cannot list them: {}", crate::Chain(&e)));
            return;
        }
    };
    let now = crate::state::now_ms();
    r.incomplete_uploads_more = truncated;
    for (i, u) in uploads.iter().enumerate() {
        let bytes = if i < SIZED {
            store.incomplete_bytes(u).await.unwrap_or(0)
        } else {
            0
        };
        let detail = format!("started {} ago", u.age(now));
        let rel = u.key.strip_prefix(store.prefix()).unwrap_or(&u.key);
        r.incomplete_uploads.add(rel, bytes, &detail, n);
        if !(fix && abortable(u, store.prefix(), now)) {
            continue;
        }
        if dry_run {
            r.incomplete_uploads_aborted += 1;
            continue;
        }
        match store.abort_incomplete(u).await {
            Ok(()) => {
                tracing::info!(key = %u.key, "Aborted an incomplete multipart upload older than a day.");
                r.incomplete_uploads_aborted += 1;
            }
            Err(e) => {
                tracing::warn!(key = %u.key, error = %crate::Chain(&e), "Could not abort an incomplete multipart upload.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_uploads_of_media_keys_under_the_prefix_are_abortable() {
        let now = 10 * 86_400_000u64;
        let up = |key: &str, days_ago: f64| Incomplete {
            key: key.into(),
            upload_id: "u".into(),
            initiated_ms: Some(now as i64 - (days_ago * 86_400_000.0) as i64),
        };
        let media = "p/local_content/ab/cd/efgh";
        assert!(abortable(&up(media, 1.5), "p/", now));
        // In flight right now, for all we know.
        assert!(!abortable(&up(media, 0.5), "p/", now));
        // Not ours: outside the prefix, or not a media path (another tool's key).
        assert!(!abortable(
            &up("q/local_content/ab/cd/efgh", 3.0),
            "p/",
            now
        ));
        assert!(!abortable(&up("p/backups/db.tar", 3.0), "p/", now));
        let undated = Incomplete {
            initiated_ms: None,
            ..up(media, 3.0)
        };
        assert!(!abortable(&undated, "p/", now));
    }
}
