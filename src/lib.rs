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
pub mod owner;
pub mod queue;
pub mod scan;
pub mod sha256;
pub mod state;
pub mod sweep;
pub mod synapse_db;
pub mod upload;
pub mod watch;

#[cfg(test)]
mod architecture_tests;

/// Displays an error with its chain of sources (`outer: inner: innermost`), for logs, reports and
/// messages built outside `main` (where anyhow's `{:#}` does the same).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A source whose text its wrapper already shows is skipped: tokio-postgres's "db error"
        // is both a wrapper's suffix and a source of its own ("db error: db error: FATAL: …").
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            let text = e.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cur = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect: wrapped: db error")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Inner(#[source] Root);
    #[derive(Debug, thiserror::Error)]
    #[error("FATAL: no such database")]
    struct Root;

    #[test]
    fn a_chain_says_each_thing_once() {
        let e = Outer(Inner(Root));
        assert_eq!(
            super::Chain(&e).to_string(),
            "cannot connect: wrapped: db error: FATAL: no such database"
        );
    }
}
