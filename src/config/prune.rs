//! The `prune:` section: the sanity limits of deleting orphaned objects (`audit --delete-orphans`,
//! and any later job that prunes). A wrong or empty database makes every object look orphaned, and
//! the fresh re-check before each DELETE asks that same database; these limits are what stops it.

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrune {
    /// Refuse when more than this share (percent) of the objects under the prefix are orphans.
    pub max_orphan_percent: Option<f64>,
    /// Refuse when one run would delete more orphaned objects than this.
    pub max_deletions_per_run: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PruneConfig {
    pub max_orphan_percent: f64,
    pub max_deletions_per_run: u64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            max_orphan_percent: 5.0,
            max_deletions_per_run: 10_000,
        }
    }
}

pub(super) fn validate_prune(raw: RawPrune) -> Result<PruneConfig, ConfigError> {
    let d = PruneConfig::default();
    let max_orphan_percent = raw.max_orphan_percent.unwrap_or(d.max_orphan_percent);
    if !(max_orphan_percent > 0.0 && max_orphan_percent <= 100.0) {
        return Err(invalid(
            "prune.max_orphan_percent",
            "must be a percentage above 0 and at most 100 (e.g. 5)",
        ));
    }
    let max_deletions_per_run = raw.max_deletions_per_run.unwrap_or(d.max_deletions_per_run);
    if max_deletions_per_run == 0 {
        return Err(invalid(
            "prune.max_deletions_per_run",
            "0 would refuse every prune; leave out --delete-orphans instead",
        ));
    }
    Ok(PruneConfig {
        max_orphan_percent,
        max_deletions_per_run,
    })
}
