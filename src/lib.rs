//! synapse-s3-offload: uploads a Matrix Synapse media store to S3-compatible storage.
//!
//! Stages (see DESIGN.md): [`scan`] lists the store, [`upload`] verifies one file into the bucket and
//! records it in [`state`]; [`backfill`] is the one-shot `upload` command built from them.

pub mod audit;
pub mod backfill;
pub mod check;
pub mod config;
pub mod control;
pub mod daemon;
pub mod layout;
pub mod md5;
pub mod metrics;
pub mod queue;
pub mod scan;
pub mod sha256;
pub mod state;
pub mod sweep;
pub mod synapse;
pub mod upload;
pub mod watch;

/// Displays an error with its chain of sources (`outer: inner: innermost`), for logs, reports and
/// messages built outside `main` (where anyhow's `{:#}` does the same).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
