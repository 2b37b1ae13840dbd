//! The sanity limits of orphan pruning (DESIGN.md 9). An orphan is an object whose media has no
//! row in Synapse's database; pointed at a wrong or empty database (a typo in `database:`, a
//! restored dump, a fresh test server), every object looks orphaned, and the fresh re-check before
//! each DELETE asks that same wrong database. So before anything is deleted the whole picture must
//! look like a real Synapse: media in the database, few orphans among the objects, a bounded
//! number of deletions. Used by `audit --delete-orphans` and by any other pruning job.

use crate::config::PruneConfig;

/// What one pruning run saw, from one consistent audit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Media files the database lists.
    pub database_files: u64,
    /// Objects under the prefix.
    pub objects: u64,
    /// Objects found orphaned (deletable now or later).
    pub orphans: u64,
    /// Orphans this run would delete.
    pub deletions: u64,
}

/// Why a pruning run deletes nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PruneRefused {
    #[error(
        "the database lists no media at all, so every object would look orphaned; check that database: is Synapse's database for this bucket"
    )]
    EmptyDatabase,
    #[error(
        "{orphans} of the {objects} objects under the prefix ({percent:.1} %) have no database row, more than prune.max_orphan_percent ({max} %); check that database: is Synapse's database for this bucket and prefix. If these orphans are real (after a large purge), raise prune.max_orphan_percent or pass --ignore-prune-limits once"
    )]
    TooManyOrphans {
        orphans: u64,
        objects: u64,
        percent: f64,
        max: f64,
    },
    #[error(
        "this run would delete {deletions} orphaned objects, more than prune.max_deletions_per_run ({max}); raise it or pass --ignore-prune-limits once if that many are expected"
    )]
    TooManyDeletions { deletions: u64, max: u64 },
}

impl PruneRefused {
    /// A bounded name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            PruneRefused::EmptyDatabase => "empty_database",
            PruneRefused::TooManyOrphans { .. } => "too_many_orphans",
            PruneRefused::TooManyDeletions { .. } => "too_many_deletions",
        }
    }
}

/// `Ok` when pruning may go on with these counts.
pub fn check(limits: &PruneConfig, c: &Counts) -> Result<(), PruneRefused> {
    if c.database_files == 0 {
        return Err(PruneRefused::EmptyDatabase);
    }
    let percent = if c.objects == 0 {
        0.0
    } else {
        c.orphans as f64 * 100.0 / c.objects as f64
    };
    if percent > limits.max_orphan_percent {
        return Err(PruneRefused::TooManyOrphans {
            orphans: c.orphans,
            objects: c.objects,
            percent,
            max: limits.max_orphan_percent,
        });
    }
    if c.deletions > limits.max_deletions_per_run {
        return Err(PruneRefused::TooManyDeletions {
            deletions: c.deletions,
            max: limits.max_deletions_per_run,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_empty_databases_many_orphans_and_many_deletions() {
        let limits = PruneConfig::default(); // 5 %, 10,000
        let c = |database_files, objects, orphans, deletions| Counts {
            database_files,
            objects,
            orphans,
            deletions,
        };
        for (counts, refused) in [
            (c(1000, 1000, 50, 50), None),
            (c(1000, 0, 0, 0), None),
            (c(0, 1000, 1000, 1000), Some("no media")),
            (c(0, 0, 0, 0), Some("no media")),
            (
                c(1000, 1000, 51, 1),
                Some("51 of the 1000 objects under the prefix (5.1 %)"),
            ),
            (
                c(10, 1000, 990, 990),
                Some("prune.max_orphan_percent (5 %)"),
            ),
            (
                c(10, 1_000_000, 10_001, 10_001),
                Some("delete 10001 orphaned"),
            ),
            (c(10, 1_000_000, 10_000, 10_000), None),
        ] {
            let got = check(&limits, &counts).map_err(|e| e.to_string());
            match refused {
                None => assert_eq!(got, Ok(()), "{counts:?}"),
                Some(why) => {
                    let e = got.expect_err(&format!("{counts:?} must be refused"));
                    assert!(e.contains(why), "{counts:?}: {e}");
                }
            }
        }
        let lax = PruneConfig {
            max_orphan_percent: 100.0,
            max_deletions_per_run: u64::MAX,
            ..PruneConfig::default()
        };
        assert_eq!(check(&lax, &c(1, 1000, 999, 999)), Ok(()));
        assert_eq!(
            check(&lax, &c(0, 1000, 1000, 1000)),
            Err(PruneRefused::EmptyDatabase),
            "no setting prunes against an empty database"
        );
    }
}
