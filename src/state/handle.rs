//! The state database opened together with its commit thread, and closed in the one safe order.
//!
//! Every command that writes the state (the daemon, `sweep`, `audit`, `status`, `upload`) needs the
//! same sequence: open the database, start the [`Committer`], hand clones of it to the queue and
//! the stage, and at the end drop every clone before joining the thread. The thread commits
//! whatever is still queued before it ends, so joining it is what makes the last records durable;
//! an exit without the join could lose them. The queue is opened by its user on top of the handle
//! (`Queue::open(&h.state, h.committer.clone(), …)`): `state` must not import `queue`, which is
//! built on it.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Committer, State, StateError};

pub struct StateHandle {
    pub state: State,
    pub committer: Committer,
    commit_thread: JoinHandle<()>,
}

impl StateHandle {
    /// Opens (or creates) `state_dir/state.redb` and starts its commit thread.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        Ok(Self::start(State::open(state_dir)?))
    }

    /// Like [`StateHandle::open`], but waits up to `wait` while another process holds the
    /// database (see [`State::open_waiting`]).
    pub async fn open_waiting(state_dir: &Path, wait: Duration) -> Result<Self, StateError> {
        Ok(Self::start(State::open_waiting(state_dir, wait).await?))
    }

    /// Starts the commit thread of a state opened by the caller (the daemon first makes sure no
    /// other daemon holds it).
    pub fn start(state: State) -> Self {
        let (committer, commit_thread) = Committer::start(state.clone());
        StateHandle {
            state,
            committer,
            commit_thread,
        }
    }

    /// Like [`StateHandle::start`], with a commit thread that gathers ops for `linger` before each
    /// commit (see [`Committer::start_lingering`]).
    pub fn start_lingering(state: State, linger: Duration) -> Self {
        let (committer, commit_thread) = Committer::start_lingering(state.clone(), linger);
        StateHandle {
            state,
            committer,
            commit_thread,
        }
    }

    /// Waits until everything handed to the committer is committed and its thread has ended.
    /// The thread ends once the last [`Committer`] clone is gone: drop every other holder of one
    /// (the queue, the stage) first, or this waits for them.
    pub async fn close(self) {
        let thread = self.into_thread();
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    /// [`StateHandle::close`] for callers outside the async runtime's tasks (`status`).
    pub fn close_blocking(self) {
        let _ = self.into_thread().join();
    }

    fn into_thread(self) -> JoinHandle<()> {
        let StateHandle {
            state,
            committer,
            commit_thread,
        } = self;
        drop((committer, state));
        commit_thread
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Op;

    /// What was handed to the committer and not yet awaited is durable once `close` returns, and
    /// the database is free for the next opener.
    #[tokio::test]
    async fn close_commits_what_was_submitted_and_frees_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateHandle::open(dir.path()).unwrap();
        let clone = h.committer.clone();
        let pending = clone.submit(vec![Op::SetText("handle_test", "kept".into())]);
        drop(clone);
        h.close().await;
        pending.wait().await.unwrap();
        let h = StateHandle::open(dir.path()).unwrap();
        assert_eq!(
            h.state.text("handle_test").unwrap().as_deref(),
            Some("kept")
        );
        h.close_blocking();
    }
}
