//! Incomplete multipart uploads: the ones this process started and dropped at shutdown (aborted
//! by [`ObjectStore::abort_abandoned`]), and those left in the bucket by crashes and other tools
//! (listed for `check` and `audit`, aborted by `audit --fix` once old). Their parts are stored and
//! billed until aborted; S3 never lists them among the objects.
//!
//! Only keys under our prefix are listed or aborted, never other users' of the bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;

use super::{ErrorKind, ObjectStore, S3Error};

/// Each AbortMultipartUpload at shutdown gets this long (the whole batch [`ABANDONED_WITHIN`]).
const ABORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a shutdown spends at most aborting the multipart uploads it dropped.
pub const ABANDONED_WITHIN: Duration = Duration::from_secs(5);
/// Incomplete uploads listed at most (ten pages): enough to count, date and show them.
const MAX_LISTED: usize = 10_000;

/// The multipart uploads created by this process and not finished yet: upload id → key.
#[derive(Default)]
pub(super) struct InFlight(Mutex<HashMap<String, String>>);

impl InFlight {
    pub(super) fn insert(&self, upload_id: &str, key: &str) {
        let mut map = self.0.lock().expect("not poisoned");
        map.insert(upload_id.to_owned(), key.to_owned());
    }

    pub(super) fn remove(&self, upload_id: &str) {
        self.0.lock().expect("not poisoned").remove(upload_id);
    }

    fn take_all(&self) -> Vec<(String, String)> {
        self.0.lock().expect("not poisoned").drain().collect()
    }
}

/// One incomplete multipart upload under our prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    pub key: String,
    pub upload_id: String,
    /// When it was created (ms since the epoch), as the provider says.
    pub initiated_ms: Option<i64>,
}

/// What ListMultipartUploads said about our prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncompleteUploads {
    /// The provider does not implement ListMultipartUploads (s3s-fs: NotImplemented): nothing
    /// can be said; the provider's words.
    Unsupported(String),
    /// The uploads (at most [`MAX_LISTED`]; `truncated` when there were more), oldest first.
    Listed {
        uploads: Vec<Incomplete>,
        truncated: bool,
    },
}

/// Whether the provider says it has no such operation (rather than failing to answer).
fn unsupported(e: &S3Error) -> bool {
    matches!(e.status, Some(501 | 405))
        || matches!(
            e.code.as_deref(),
            Some("NotImplemented" | "NotSupported" | "UnsupportedOperation" | "MethodNotAllowed")
        )
}

impl ObjectStore {
    /// Aborts the multipart uploads of this process that were dropped before they completed or
    /// aborted themselves (the shutdown's grace ended): within [`ABANDONED_WITHIN`] in all.
    /// Call once nothing uploads any more (their futures are gone). Returns how many were aborted;
    /// one that could not be is logged, and left to the lifecycle rule, `audit --fix` or a later
    /// cleanup.
    pub async fn abort_abandoned(&self) -> usize {
        let left = self.multiparts.take_all();
        if left.is_empty() {
            return 0;
        }
        let n = left.len();
        let aborts = futures::stream::iter(left)
            .map(|(upload_id, key)| async move {
                let abort = self.abort_one(&key, &upload_id);
                let r = match tokio::time::timeout(ABORT_TIMEOUT, abort).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(crate::Chain(&e).to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                match &r {
                    Ok(()) => tracing::info!(key, "Aborted the multipart upload the shutdown interrupted (its parts are deleted)."),
                    Err(e) => tracing::warn!(key, error = %e, "Could not abort the multipart upload the shutdown interrupted; `audit --fix` or a lifecycle rule cleans it."),
                }
                r.is_ok()
            })
            .buffer_unordered(16)
            .collect::<Vec<bool>>();
        match tokio::time::timeout(ABANDONED_WITHIN, aborts).await {
            Ok(done) => done.into_iter().filter(|ok| *ok).count(),
            Err(_) => {
                tracing::warn!(
                    uploads = n,
                    "Aborting the interrupted multipart uploads took too long; `audit --fix` or a lifecycle rule cleans what is left."
                );
                0
            }
        }
    }

    /// AbortMultipartUpload; one that is already gone (completed or aborted) counts as done.
    async fn abort_one(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let r = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.err("AbortMultipartUpload", key, e));
        match r {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Aborts an incomplete upload found by [`ObjectStore::incomplete_uploads`] (`audit --fix`).
    /// Refuses keys outside our prefix.
    pub async fn abort_incomplete(&self, upload: &Incomplete) -> Result<(), S3Error> {
        assert!(
            upload.key.starts_with(&self.prefix),
            "only uploads under our prefix are aborted"
        );
        self.abort_one(&upload.key, &upload.upload_id).await
    }

    /// The incomplete multipart uploads under our prefix (ListMultipartUploads, paged), or
    /// `Unsupported` where the provider does not implement it.
    pub async fn incomplete_uploads(&self) -> Result<IncompleteUploads, S3Error> {
        let mut uploads = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| self.err("ListMultipartUploads", &self.prefix, e));
            let out = match out {
                Ok(o) => o,
                Err(e) if unsupported(&e) => {
                    return Ok(IncompleteUploads::Unsupported(crate::Chain(&e).to_string()));
                }
                Err(e) => return Err(e),
            };
            uploads.extend(out.uploads().iter().filter_map(|u| {
                let (key, upload_id) = (u.key()?, u.upload_id()?);
                // The provider filtered by prefix; a key outside it is never ours to touch.
                key.starts_with(&self.prefix).then(|| Incomplete {
                    key: key.to_owned(),
                    upload_id: upload_id.to_owned(),
                    initiated_ms: u.initiated().map(|t| t.secs().saturating_mul(1000)),
                })
            }));
            let more = out.is_truncated() == Some(true);
            key_marker = out.next_key_marker().map(str::to_owned);
            id_marker = out.next_upload_id_marker().map(str::to_owned);
            if !more || key_marker.is_none() || uploads.len() >= MAX_LISTED {
                uploads.sort_by_key(|u| u.initiated_ms.unwrap_or(i64::MAX));
                return Ok(IncompleteUploads::Listed {
                    uploads,
                    truncated: more,
                });
            }
        }
    }

    /// The bytes an incomplete upload's parts hold so far (ListParts, paged).
    pub async fn incomplete_bytes(&self, upload: &Incomplete) -> Result<u64, S3Error> {
        let mut bytes = 0u64;
        let mut marker = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .set_part_number_marker(marker)
                .send()
                .await
                .map_err(|e| self.err("ListParts", &upload.key, e))?;
            bytes += out
                .parts()
                .iter()
                .map(|p| p.size().unwrap_or(0).max(0) as u64)
                .sum::<u64>();
            marker = match out.is_truncated() {
                Some(true) => out.next_part_number_marker().map(str::to_owned),
                _ => None,
            };
            if marker.is_none() {
                return Ok(bytes);
            }
        }
    }
}

impl Incomplete {
    /// How long ago it was started, roughly ("3 days", "5 hours", "12 minutes").
    pub fn age(&self, now_ms: u64) -> String {
        let Some(t) = self.initiated_ms else {
            return "an unknown time".into();
        };
        let mins = now_ms.saturating_sub(t.max(0) as u64) / 60_000;
        match mins {
            m if m >= 2 * 1440 => format!("{} days", m / 1440),
            m if m >= 120 => format!("{} hours", m / 60),
            m => format!("{m} minutes"),
        }
    }

    /// Older than `age` at `now_ms` (an upload without a start time is never old).
    pub fn older_than(&self, age: Duration, now_ms: u64) -> bool {
        self.initiated_ms
            .is_some_and(|t| (t.max(0) as u64).saturating_add(age.as_millis() as u64) <= now_ms)
    }
}
