//! The audit's report: counts, bytes and a few examples per category. Its JSON field names are a
//! stable interface (`audit --json` feeds monitoring): add fields, never rename them.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Options;
use crate::upload::s3::ObjectStore;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Example {
    pub path: String,
    pub detail: String,
}

impl From<(&str, &str)> for Example {
    fn from((path, detail): (&str, &str)) -> Self {
        Example {
            path: path.to_owned(),
            detail: detail.to_owned(),
        }
    }
}

impl From<&String> for Example {
    fn from(path: &String) -> Self {
        Example {
            path: path.clone(),
            detail: String::new(),
        }
    }
}

/// One category: how many, how many bytes, the first few (in path order).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Category {
    pub count: u64,
    pub bytes: u64,
    pub examples: Vec<Example>,
}

impl Category {
    pub fn add(&mut self, path: &str, bytes: u64, detail: &str, max_examples: usize) {
        self.count += 1;
        self.bytes += bytes;
        if self.examples.len() < max_examples {
            self.examples.push((path, detail).into());
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub started_at_ms: u64,
    pub seconds: f64,
    pub bucket: String,
    pub prefix: String,
    pub media_store_path: String,
    /// Files the database lists (originals and thumbnails).
    pub database_files: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub local_files: u64,
    pub local_bytes: u64,
    pub records: u64,
    /// Objects under the prefix that are not Synapse media paths (URL previews, other tools' keys).
    pub ignored_objects: u64,
    /// Listed by the database, neither local nor in the bucket: users get errors for these.
    pub lost: Category,
    pub not_uploaded: Category,
    pub mismatched: Category,
    pub orphans: Category,
    pub unknown_local: Category,
    /// Local files that differ from their verified object (e.g. a write-back by Synapse cut
    /// short): Synapse serves them as they are until the upload heals them from the bucket.
    #[serde(default)]
    pub bad_local_copies: Category,
    /// Local files that differ from an object we never verified, with no database hash to tell
    /// which is right: both are kept until the operator decides.
    #[serde(default)]
    pub conflicts: Category,
    /// Rows whose ids make no safe path; never acted on.
    pub invalid_database_rows: Category,
    pub fix: bool,
    pub fix_queued: u64,
    pub delete_orphans: bool,
    pub dry_run: bool,
    /// Orphans deleted (or, with `dry_run`, that would be).
    pub orphans_deleted: Category,
    /// Orphans kept this time: first seen less than the grace period ago, or seen only once.
    pub orphans_waiting: u64,
    /// Orphans kept because their media has a database row again (checked right before deleting).
    pub orphans_reappeared: u64,
    /// Why `--delete-orphans` deleted nothing: the sanity limits refused (see `audit::limits`).
    #[serde(default)]
    pub prune_refused: Option<String>,
    /// Which limit refused, as a bounded word (`empty_database`, `too_many_orphans`,
    /// `too_many_deletions`), for metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_refused_reason: Option<String>,
    /// Incomplete multipart uploads under the prefix (ListMultipartUploads), by key without the
    /// prefix, oldest first; their parts are billed. `bytes`: the parts of the oldest 100.
    #[serde(default)]
    pub incomplete_uploads: Category,
    /// More than 10,000: `incomplete_uploads` counts the first ones.
    #[serde(default)]
    pub incomplete_uploads_more: bool,
    /// Why they were not listed: "not supported by this provider" (no ListMultipartUploads), or
    /// the error. `None`: listed.
    #[serde(default)]
    pub incomplete_uploads_unlisted: Option<String>,
    /// With `--fix`: those older than a day with a media key, aborted (with `--dry-run`: would be).
    #[serde(default)]
    pub incomplete_uploads_aborted: u64,
}

impl Report {
    pub fn new(store: &ObjectStore, root: &Path, opts: &Options) -> Self {
        Report {
            started_at_ms: crate::state::now_ms(),
            bucket: store.bucket().to_owned(),
            prefix: store.prefix().to_owned(),
            media_store_path: root.display().to_string(),
            fix: opts.fix,
            delete_orphans: opts.delete_orphans,
            dry_run: opts.dry_run,
            ..Report::default()
        }
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn category(f: &mut fmt::Formatter<'_>, title: &str, c: &Category, unit: &str) -> fmt::Result {
    writeln!(f, "{title:<22}{} {unit} ({})", c.count, mb(c.bytes))?;
    for e in &c.examples {
        if e.detail.is_empty() {
            writeln!(f, "    {}", e.path)?;
        } else {
            writeln!(f, "    {}  ({})", e.path, e.detail)?;
        }
    }
    if c.count > c.examples.len() as u64 && !c.examples.is_empty() {
        writeln!(f, "    … and {} more", c.count - c.examples.len() as u64)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "audit of bucket {} (prefix {:?}) and {} in {:.1}s",
            self.bucket, self.prefix, self.media_store_path, self.seconds
        )?;
        writeln!(
            f,
            "  database: {} files; bucket: {} objects ({}); local: {} files ({}); upload records: {}",
            self.database_files,
            self.objects,
            mb(self.object_bytes),
            self.local_files,
            mb(self.local_bytes),
            self.records
        )?;
        category(f, "lost:", &self.lost, "files")?;
        category(f, "not uploaded:", &self.not_uploaded, "files")?;
        category(f, "mismatched:", &self.mismatched, "objects")?;
        category(f, "bad local copies:", &self.bad_local_copies, "files")?;
        category(f, "conflicts:", &self.conflicts, "files")?;
        category(f, "orphans:", &self.orphans, "objects")?;
        category(f, "unknown local files:", &self.unknown_local, "files")?;
        if self.invalid_database_rows.count > 0 {
            category(
                f,
                "unsafe database ids:",
                &self.invalid_database_rows,
                "rows",
            )?;
        }
        match &self.incomplete_uploads_unlisted {
            Some(why) => writeln!(f, "incomplete uploads:   {why}")?,
            None => {
                // More than were listed: the count is a lower bound.
                let title = if self.incomplete_uploads_more {
                    "incomplete uploads:   at least "
                } else {
                    "incomplete uploads:"
                };
                category(f, title, &self.incomplete_uploads, "multipart uploads")?;
                if self.incomplete_uploads.count > 0 && !self.fix {
                    writeln!(
                        f,
                        "    (their parts are billed until aborted: a bucket lifecycle rule AbortIncompleteMultipartUpload removes them; `audit --fix` aborts those older than a day now)"
                    )?;
                }
            }
        }
        if self.ignored_objects > 0 {
            writeln!(
                f,
                "ignored:              {} objects under the prefix that are not Synapse media paths",
                self.ignored_objects
            )?;
        }
        if self.fix {
            let verb = if self.dry_run {
                "would queue"
            } else {
                "queued"
            };
            writeln!(
                f,
                "fix:                  {verb} {} uploads",
                self.fix_queued
            )?;
            let verb = if self.dry_run {
                "would abort"
            } else {
                "aborted"
            };
            if self.incomplete_uploads.count > 0 {
                writeln!(
                    f,
                    "fix:                  {verb} {} incomplete multipart uploads older than a day",
                    self.incomplete_uploads_aborted
                )?;
            }
        }
        if self.delete_orphans {
            let verb = if self.dry_run {
                "would delete"
            } else {
                "deleted"
            };
            writeln!(
                f,
                "orphans {verb}: {} ({}); {} waiting for their grace period or a second audit; {} have a database row again",
                self.orphans_deleted.count,
                mb(self.orphans_deleted.bytes),
                self.orphans_waiting,
                self.orphans_reappeared
            )?;
        }
        if let Some(why) = &self.prune_refused {
            writeln!(f, "orphans not deleted:  refused: {why}")?;
        }
        Ok(())
    }
}
