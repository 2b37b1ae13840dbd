//! synapse-s3-offload: uploads a Matrix Synapse media store to S3-compatible storage.
//!
//! Stages (see DESIGN.md): [`scan`] lists the store, [`upload`] verifies one file into the bucket and
//! records it in [`state`]; [`backfill`] is the one-shot `upload` command built from them.

pub mod backfill;
pub mod config;
pub mod control;
pub mod daemon;
pub mod layout;
pub mod queue;
pub mod scan;
pub mod state;
pub mod sweep;
pub mod synapse;
pub mod upload;
pub mod watch;
