//! The `prune:` section: the daemon's job that follows Synapse's deletions into the bucket
//! (`enabled`, `interval`, `grace`, `full_every`), and the sanity limits of deleting orphaned
//! objects (`audit --delete-orphans` and that job). A wrong or empty database makes every object
//! look orphaned, and the fresh re-check before each DELETE asks that same database; these limits
//! are what stops it.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, duration, invalid};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrune {
    /// Run the prune job in the daemon (off by default: deleting from the bucket is opt-in).
    pub enabled: Option<bool>,
    /// Time between two runs of the job.
    pub interval: Option<String>,
    /// How long an object must have been seen orphaned (and be old) before it is deleted.
    pub grace: Option<String>,
    /// How often a run lists the whole bucket (the safety net for objects we did not upload)
    /// instead of checking only our upload records.
    pub full_every: Option<String>,
    /// Refuse when more than this share (percent) of the objects under the prefix are orphans.
    pub max_orphan_percent: Option<f64>,
    /// Refuse when one run would delete more orphaned objects than this.
    pub max_deletions_per_run: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PruneConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub grace: Duration,
    pub full_every: Duration,
    pub max_orphan_percent: f64,
    pub max_deletions_per_run: u64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig {
            enabled: false,
            interval: Duration::from_secs(3600),
            grace: Duration::from_secs(7 * 86400),
            full_every: Duration::from_secs(7 * 86400),
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
    let interval = duration("prune.interval", raw.interval, "1h")?;
    if interval < Duration::from_secs(1) {
        return Err(invalid("prune.interval", "must be at least 1s (e.g. 1h)"));
    }
    // A grace of 0 would delete an object on the second run after its row went, with no time
    // for a restore of Synapse's database (or a media re-fetched meanwhile) to bring it back.
    let grace = duration("prune.grace", raw.grace, "7d")?;
    if grace < Duration::from_secs(1) {
        return Err(invalid(
            "prune.grace",
            "must be at least 1s (days in production, e.g. 7d): objects are deleted only once seen orphaned this long; use `forget` for an immediate removal",
        ));
    }
    Ok(PruneConfig {
        enabled: raw.enabled.unwrap_or(false),
        interval,
        grace,
        full_every: duration("prune.full_every", raw.full_every, "7d")?,
        max_orphan_percent,
        max_deletions_per_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_is_off_by_default_and_a_grace_under_a_second_is_refused() {
        let d = validate_prune(RawPrune::default()).unwrap();
        assert_eq!(d, PruneConfig::default());
        assert!(!d.enabled);
        let raw = |grace: &str| RawPrune {
            grace: Some(grace.into()),
            ..RawPrune::default()
        };
        let e = validate_prune(raw("500ms")).unwrap_err().to_string();
        assert!(e.contains("prune.grace") && e.contains("forget"), "{e}");
        assert_eq!(
            validate_prune(raw("3d")).unwrap().grace,
            Duration::from_secs(3 * 86400)
        );
        let e = validate_prune(RawPrune {
            interval: Some("soon".into()),
            ..RawPrune::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("prune.interval"), "{e}");
    }
}
