//! The prune job's incremental path: our upload records checked against Synapse's database in
//! pages, instead of the whole bucket listed and merged.
//!
//! Why it is enough most of the time: a media Synapse deletes has no row left, so the database
//! cannot list it, but we recorded every key we uploaded. A record whose media has no row (neither
//! the media nor any of its thumbnails) is an orphan candidate; one page of records costs one
//! lookup per table (`= ANY($1)` on the primary keys), not a sort of every row. What it cannot see
//! (objects we never uploaded: another tool's, or records lost with a state database moved aside)
//! the full path (`audit`'s merge with the bucket listing) finds at `prune.full_every`.
//!
//! The rules are the full path's: a first sighting is recorded; a later run deletes only once that
//! sighting is older than the grace period, the object itself (its Last-Modified) too, no local
//! file exists, and a fresh query right before the DELETE still finds no row ([`super::prune`]).
//! The sanity limits see the share of our records that lost their row.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::job::{PrunePath, PruneReport};
use super::sources::StateStream;
use super::{AuditError, Auditor, limits};
use crate::layout::{MediaPath, MediaRef};
use crate::state::{Op, now_ms};

/// Records read (and media looked up) per round trip.
const PAGE: usize = 5000;

pub(super) async fn run(
    a: &Auditor<'_>,
    grace: Duration,
    dry_run: bool,
    examples: usize,
    cancel: &CancellationToken,
) -> Result<PruneReport, AuditError> {
    let mut r = PruneReport::new(PrunePath::Incremental, dry_run);
    let now = now_ms();
    let grace_ms = grace.as_millis() as u64;
    let old = |ms: u64| ms.saturating_add(grace_ms) <= now;
    let (local_rows, remote_rows) = a.db.media_counts().await?;
    r.db_queries += 2;
    let mut seen = StateStream::sightings(a.state.clone());
    let mut after: Option<String> = None;
    let mut candidates = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(AuditError::Cancelled);
        }
        let (state, from) = (a.state.clone(), after.clone());
        let page = tokio::task::spawn_blocking(move || state.records_after(from.as_deref(), PAGE))
            .await
            .expect("state reads do not panic")?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        let full_page = page.len() == PAGE;
        // Only media paths name a media (url_cache previews and anything else are never judged).
        let media: Vec<(MediaPath, MediaRef)> = page
            .into_iter()
            .filter_map(|(k, _)| {
                let p = MediaPath::parse(&k).ok()?;
                let m = p.is_uploadable(false).then(|| p.media())??;
                Some((p, m))
            })
            .collect();
        let (mut local, mut remote) = (HashSet::new(), HashSet::new());
        for (_, m) in &media {
            match m {
                MediaRef::Local(id) => {
                    local.insert(id.clone());
                }
                MediaRef::Remote { origin, fs_id } => {
                    remote.insert((origin.clone(), fs_id.clone()));
                }
            }
        }
        let present_local = if local.is_empty() {
            HashSet::new()
        } else {
            r.db_queries += 1;
            a.db.local_media_present(&local.into_iter().collect::<Vec<_>>())
                .await?
        };
        let present_remote = if remote.is_empty() {
            HashSet::new()
        } else {
            r.db_queries += 1;
            let (origins, fs_ids): (Vec<_>, Vec<_>) = remote.into_iter().unzip();
            a.db.remote_media_present(&origins, &fs_ids).await?
        };
        let mut ops = Vec::new();
        for (path, m) in media {
            r.checked += 1;
            let sighting = take_sighting(&mut seen, path.as_str()).await?;
            let present = match &m {
                MediaRef::Local(id) => present_local.contains(id),
                MediaRef::Remote { origin, fs_id } => {
                    present_remote.contains(&(origin.clone(), fs_id.clone()))
                }
            };
            if present {
                // Its row is back (a restore, a re-fetch): the grace starts again next time.
                if sighting.is_some() {
                    r.reappeared += 1;
                    ops.push(Op::OrphanClear(path));
                }
                continue;
            }
            r.orphans += 1;
            match sighting {
                None => {
                    r.waiting += 1;
                    ops.push(Op::OrphanSeen(path, now));
                }
                Some(first) if old(first) && candidates.len() < super::MAX_DELETIONS => {
                    candidates.push(path)
                }
                Some(_) => r.waiting += 1,
            }
        }
        a.committer.apply(ops).await?;
        if !full_page {
            break;
        }
    }
    let counts = limits::Counts {
        database_files: (local_rows + remote_rows).max(0) as u64,
        objects: r.checked,
        orphans: r.orphans,
        deletions: candidates.len() as u64,
    };
    if let Err(why) = limits::check(&a.config.prune, &counts) {
        tracing::error!(reason = %why, "Refusing to delete orphaned objects.");
        r.waiting += counts.deletions;
        r.refused_reason = Some(why.label().to_owned());
        r.refused = Some(why.to_string());
        return Ok(r);
    }
    // The object must exist and be old itself: a key uploaded again lately is not yet prunable.
    let mut ready = Vec::new();
    let mut gone = Vec::new();
    for path in candidates {
        if cancel.is_cancelled() {
            return Err(AuditError::Cancelled);
        }
        r.s3_requests += 1;
        let key = path.key(a.store.prefix());
        let listed = a.store.list_under(path.as_str()).await?;
        match listed.into_iter().find(|o| o.key == key) {
            None => {
                // Deleted already (by `forget`, another tool): the record would claim it.
                r.already_gone += 1;
                if !dry_run {
                    gone.push(Op::Forget(path.clone()));
                    gone.push(Op::OrphanClear(path));
                }
            }
            Some(o) if o.last_modified_ms.is_some_and(|t| old(t.max(0) as u64)) => {
                ready.push((path, o.size))
            }
            Some(_) => r.waiting += 1,
        }
    }
    a.committer.apply(gone).await?;
    let mut rep = super::Report::default();
    let n = ready.len() as u64;
    super::prune::prune(a, &mut rep, ready, dry_run, examples, cancel).await?;
    r.db_queries += n.div_ceil(1000) * 2;
    r.s3_requests += rep.orphans_deleted.count;
    r.absorb(&rep);
    Ok(r)
}

/// The sighting of `key`, skipping sightings of paths that have no record (the full path's).
async fn take_sighting(seen: &mut StateStream<u64>, key: &str) -> Result<Option<u64>, AuditError> {
    loop {
        seen.fill().await?;
        match seen.items.peek() {
            Some(k) if k < key => {
                seen.items.pop();
            }
            Some(k) if k == key => return Ok(seen.items.take(key)),
            _ => return Ok(None),
        }
    }
}
