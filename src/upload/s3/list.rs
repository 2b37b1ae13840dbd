//! Listing the bucket: whether the prefix is empty (`upload`'s first run), the audit's pages,
//! one media's objects (`forget`, the prune job) and the dense sweep's pages after a key.

use super::{Listed, ObjectStore, S3Error};

impl ObjectStore {
    /// Whether no object at all exists under the prefix (one LIST of at most one key).
    pub async fn prefix_is_empty(&self) -> Result<bool, S3Error> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.err("LIST", &self.prefix, e))?;
        Ok(out.key_count().unwrap_or(0) == 0 && out.contents().is_empty())
    }

    /// One page (up to 1,000 keys) of ListObjectsV2 under the prefix, continuing after `token`;
    /// returns the objects (keys in the server's order, UTF-8 binary per S3) and the next token.
    pub async fn list_page(
        &self,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), S3Error> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.err("LIST", &self.prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(|e| e.trim_matches('"').to_owned()),
                    last_modified_ms: o.last_modified().map(|t| t.secs().saturating_mul(1000)),
                })
            })
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok((objects, next))
    }

    /// Every object whose key starts with `prefix + sub` (one media's original, or its thumbnail
    /// folder with a trailing `/`), following continuation tokens: `forget` and the prune job
    /// look up one media's objects this way, with their size and age.
    pub async fn list_under(&self, sub: &str) -> Result<Vec<Listed>, S3Error> {
        let prefix = format!("{}{sub}", self.prefix);
        let mut token = None;
        let mut all = Vec::new();
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| self.err("LIST", &prefix, e))?;
            all.extend(out.contents().iter().filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(|e| e.trim_matches('"').to_owned()),
                    last_modified_ms: o.last_modified().map(|t| t.secs().saturating_mul(1000)),
                })
            }));
            token = match out.is_truncated() {
                Some(true) => out.next_continuation_token().map(str::to_owned),
                _ => None,
            };
            if token.is_none() {
                return Ok(all);
            }
        }
    }

    /// One page of ListObjectsV2 under `prefix + within` (a top-level media folder), starting
    /// after the key `start_after` (which must lie under it); returns the objects and whether
    /// the listing went on past them. The sweep's dense mode reads the bucket this way.
    pub async fn list_after(
        &self,
        within: &str,
        start_after: &str,
        max_keys: i32,
    ) -> Result<(Vec<Listed>, bool), S3Error> {
        let prefix = format!("{}{within}", self.prefix);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .start_after(start_after)
            .max_keys(max_keys)
            .send()
            .await
            .map_err(|e| self.err("LIST", &prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(|e| e.trim_matches('"').to_owned()),
                    last_modified_ms: o.last_modified().map(|t| t.secs().saturating_mul(1000)),
                })
            })
            .collect();
        Ok((objects, out.is_truncated() == Some(true)))
    }
}
