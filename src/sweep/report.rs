//! What a sweep did, and the last one remembered in the state's text table for `status`: the sweep
//! owns its report; `control` only serves it.

use serde::{Deserialize, Serialize};

use crate::state::{Op, State, StateError};

/// Key of the last sweep's report (JSON, without its file list) in the state database.
pub const LAST_SWEEP: &str = "last_sweep";
/// The same for the last dry run: it deleted nothing, so it must not pass for the last sweep.
pub const LAST_DRY_RUN: &str = "last_dry_run";
/// How many deleted paths a report lists (see [`Report::deleted`]).
pub const DELETED_LISTED: usize = 1000;

/// The op that remembers `report` as the last sweep (or the last dry run).
pub fn remember(report: &Report) -> Op {
    let mut r = report.clone();
    r.deleted.clear();
    Op::SetText(
        if r.dry_run { LAST_DRY_RUN } else { LAST_SWEEP },
        serde_json::to_string(&r).expect("reports serialize"),
    )
}

/// The last sweep and the last dry run remembered in a state (`None`: never, or unreadable).
#[derive(Debug, Default)]
pub struct Last {
    pub sweep: Option<Box<Report>>,
    pub dry_run: Option<Box<Report>>,
}

impl Last {
    pub fn load(state: &State) -> Result<Last, StateError> {
        let load = |key| -> Result<Option<Box<Report>>, StateError> {
            Ok(state.text(key)?.and_then(|t| serde_json::from_str(&t).ok()))
        };
        Ok(Last {
            sweep: load(LAST_SWEEP)?,
            dry_run: load(LAST_DRY_RUN)?,
        })
    }
}

/// What a sweep did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub dry_run: bool,
    /// Another instance held the lock: nothing was done.
    pub skipped_locked: bool,
    /// Aged media that still had local files.
    pub media_examined: u64,
    /// Aged media with no local file left (swept before): nothing to do.
    #[serde(default)]
    pub media_without_local_files: u64,
    pub files_deleted: u64,
    pub bytes_freed: u64,
    /// Kept because no object is at their key (queued for upload).
    pub kept_not_in_bucket: u64,
    /// Kept because the object differs in size or digest (queued for upload).
    pub kept_different: u64,
    /// Kept because confirming them failed (S3 error, timeout, permission).
    pub kept_error: u64,
    /// Files of aged media changed during the sweep (kept).
    pub kept_changed: u64,
    /// Kept because the local file does not match Synapse's sha256 (a bad local copy, queued for
    /// healing from the bucket).
    #[serde(default)]
    pub kept_bad_copy: u64,
    /// The first [`DELETED_LISTED`] relative paths deleted (or that would be, with `dry_run`);
    /// `files_deleted` counts them all, and the log has every one at level debug. Capped: a first
    /// sweep of a large store deletes millions of files, and this list is held for the whole run
    /// and sent to the CLI as one JSON line (≈ 1 GB for 10M files). Not kept with the last sweep's
    /// report (so not in `status --json`): the counts are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// First errors, for the report.
    pub errors: Vec<String>,
    /// Set when the sweep stopped before the end (database error, shutdown).
    pub stopped: Option<String>,
    /// `sweep.max_deletions_per_run` was reached; the next sweep goes on.
    pub limit_reached: bool,
    pub started_at_ms: u64,
    pub seconds: f64,
    /// Confirmed from bucket listings (a dense sweep, see `sweep::dense`) rather than HEADs.
    #[serde(default)]
    pub dense: bool,
    /// S3 requests by type, and the files a listing confirmed without a HEAD.
    #[serde(default)]
    pub head_requests: u64,
    #[serde(default)]
    pub list_requests: u64,
    #[serde(default)]
    pub confirmed_by_listing: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.skipped_locked {
            return write!(
                f,
                "another sweep is running (PostgreSQL advisory lock held); skipped"
            );
        }
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        write!(
            f,
            "{} aged media with local files examined",
            self.media_examined
        )?;
        if self.media_without_local_files > 0 {
            write!(
                f,
                " ({} more have no local file left)",
                self.media_without_local_files
            )?;
        }
        write!(
            f,
            ", {verb} {} files ({:.1} MB); kept: {} not in bucket, {} different, {} errors, {} changed; {:.1}s",
            self.files_deleted,
            self.bytes_freed as f64 / 1e6,
            self.kept_not_in_bucket,
            self.kept_different,
            self.kept_error,
            self.kept_changed,
            self.seconds
        )?;
        if self.kept_bad_copy > 0 {
            write!(
                f,
                "; {} bad local copies (not matching Synapse's sha256) kept and queued for healing",
                self.kept_bad_copy
            )?;
        }
        write!(
            f,
            "; S3 requests: {} HEAD, {} LIST",
            self.head_requests, self.list_requests
        )?;
        if self.dense {
            write!(
                f,
                " (dense: {} files confirmed from the listing)",
                self.confirmed_by_listing
            )?;
        }
        if let Some(s) = &self.stopped {
            write!(f, "; stopped early: {s}")?;
        }
        if self.limit_reached {
            write!(f, "; sweep.max_deletions_per_run reached")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::files::MediaOutcome;

    #[test]
    fn the_report_lists_the_first_deletions_and_counts_them_all() {
        let mut r = Report::default();
        for m in 0..600 {
            let outcome = MediaOutcome {
                deleted: vec![
                    (format!("local_content/aa/bb/{m}"), 2),
                    (format!("t/{m}"), 3),
                ],
                ..MediaOutcome::default()
            };
            outcome.add_to(&mut r);
        }
        assert_eq!(r.files_deleted, 1200);
        assert_eq!(r.bytes_freed, 3000);
        assert_eq!(r.deleted.len(), DELETED_LISTED);
        assert_eq!(r.deleted[0], "local_content/aa/bb/0");
    }
}
