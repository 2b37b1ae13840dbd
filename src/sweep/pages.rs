//! Paging through the aged media: local media first, then remote, by media id (a dense sweep
//! pages remote media by filesystem id, the order of their files' keys).

use crate::synapse_db::AgedMedia;

/// Aged media per database page.
pub(super) const PAGE: i64 = 1000;
/// Where the next page of aged media starts: after this local media id, or after this remote
/// (origin, media id); a dense sweep pages remote media by (origin, filesystem id) instead, the
/// order of their files' keys (see [`super::dense`]).
pub(super) enum Cursor {
    Local(String),
    Remote(String, String),
    RemoteByPath(String, String),
}

/// Where the page after `page` (fetched at `cursor`) starts; `None` after the last one. A short
/// page ends its table: local media first, then remote (`by_path` in a dense sweep).
pub(super) fn next_cursor(page: &[AgedMedia], cursor: &Cursor, by_path: bool) -> Option<Cursor> {
    let full = page.len() as i64 == PAGE;
    match (page.last(), cursor) {
        (Some(AgedMedia::Local { media_id, .. }), _) if full => {
            Some(Cursor::Local(media_id.clone()))
        }
        (
            Some(AgedMedia::Remote {
                origin,
                filesystem_id,
                ..
            }),
            Cursor::RemoteByPath(..),
        ) if full => Some(Cursor::RemoteByPath(origin.clone(), filesystem_id.clone())),
        (
            Some(AgedMedia::Remote {
                origin, media_id, ..
            }),
            _,
        ) if full => Some(Cursor::Remote(origin.clone(), media_id.clone())),
        (_, Cursor::Local(_)) if by_path => {
            Some(Cursor::RemoteByPath(String::new(), String::new()))
        }
        (_, Cursor::Local(_)) => Some(Cursor::Remote(String::new(), String::new())),
        (_, Cursor::Remote(..) | Cursor::RemoteByPath(..)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(n: usize) -> Vec<AgedMedia> {
        (0..n)
            .map(|i| AgedMedia::Local {
                media_id: format!("m{i:05}"),
                sha256: None,
            })
            .collect()
    }

    fn remote(n: usize) -> Vec<AgedMedia> {
        (0..n)
            .map(|i| AgedMedia::Remote {
                origin: "a.org".into(),
                media_id: format!("r{i:05}"),
                filesystem_id: format!("f{i:05}"),
                sha256: None,
            })
            .collect()
    }

    /// Pages walk the local table to its end, then the remote one, then stop; a full page
    /// continues after its last media.
    #[test]
    fn pages_walk_local_then_remote() {
        let start = Cursor::Local(String::new());
        let full = local(PAGE as usize);
        for dense in [false, true] {
            assert!(
                matches!(next_cursor(&full, &start, dense), Some(Cursor::Local(m)) if m == "m00999")
            );
        }
        for short in [local(0), local(3)] {
            assert!(matches!(
                next_cursor(&short, &start, false),
                Some(Cursor::Remote(o, m)) if o.is_empty() && m.is_empty()
            ));
            assert!(matches!(
                next_cursor(&short, &start, true),
                Some(Cursor::RemoteByPath(o, f)) if o.is_empty() && f.is_empty()
            ));
        }
        let at_remote = Cursor::Remote(String::new(), String::new());
        assert!(matches!(
            next_cursor(&remote(PAGE as usize), &at_remote, false),
            Some(Cursor::Remote(o, m)) if o == "a.org" && m == "r00999"
        ));
        assert!(next_cursor(&remote(999), &at_remote, false).is_none());
        assert!(next_cursor(&[], &at_remote, false).is_none());
        // A dense sweep pages remote media by their files' names.
        let by_path = Cursor::RemoteByPath(String::new(), String::new());
        assert!(matches!(
            next_cursor(&remote(PAGE as usize), &by_path, true),
            Some(Cursor::RemoteByPath(o, f)) if o == "a.org" && f == "f00999"
        ));
        assert!(next_cursor(&remote(999), &by_path, true).is_none());
    }
}
