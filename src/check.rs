//! `check`: the doctor. One ✓/✗ line per check, with the likely fix; never a secret.

use std::fmt::Write as _;
use std::path::Path;

use crate::md5::Md5;

use crate::config::{DatabaseConfig, S3Config};
use crate::upload::s3::{IncompleteUploads, ObjectStore, PROBE_MARK};

/// The outcome of all checks: printable lines, and whether any failed.
#[derive(Debug, Default)]
pub struct Checks {
    pub lines: Vec<String>,
    pub failed: usize,
}

impl Checks {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.lines.push(format!("✓ {what}: {detail}"));
    }
    fn fail(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.failed += 1;
        self.lines.push(format!("✗ {what}: {detail}"));
    }
    fn note(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.lines.push(format!("! {what}: {detail}"));
    }
}

/// Checks the config at `path` and everything it points to. A bad key is a ✗ line of its own;
/// what does not depend on it is still checked (S3 with a right `s3:` and a wrong media path).
pub async fn run_file(path: &Path) -> Checks {
    let mut c = Checks::default();
    let layers = match crate::config::load_layers(path) {
        Ok(l) => l,
        Err(e) => {
            c.fail("config", crate::Chain(&e).to_string());
            return c;
        }
    };
    let warnings = layers.warnings;
    let parts = crate::config::validate_parts(layers.raw, &layers.origins);
    let errors = parts.errors();
    if errors.is_empty() {
        c.ok("config", format!("{} is valid", path.display()));
    }
    for e in errors {
        c.fail("config", crate::Chain(e).to_string());
    }
    for w in &warnings {
        c.note("synapse config", w);
    }
    // The part size only shapes the client; a bad upload: section does not stop the S3 check.
    let part_size = parts
        .upload
        .as_ref()
        .map_or(16 << 20, |u| u.multipart_part_size);
    match &parts.s3 {
        Ok(s3) => check_s3(s3, part_size, &mut c).await,
        Err(_) => c.note("S3", "not checked: fix the s3 key above first"),
    }
    match &parts.database {
        Ok(db) => check_database(db.as_ref(), &mut c).await,
        Err(_) => c.note("database", "not checked: fix the config key above first"),
    }
    match &parts.media_store_path {
        Ok(root) => {
            check_media_store(root, &mut c);
            check_inotify(root, &mut c);
        }
        Err(_) => c.note("media store", "not checked: fix media_store_path first"),
    }
    if let Ok(dir) = &parts.state_dir {
        check_state_dir(dir, &mut c).await;
        if let Ok(root) = &parts.media_store_path
            && let Some(p) = crate::owner::problem(crate::owner::euid(), root, dir)
        {
            c.fail("user", p);
        }
    }
    match parts.into_config() {
        Ok(config) => match crate::sweep::provider::check_provider(&config) {
            Ok(()) => c.ok("sweep safety", "Synapse reads media back from this bucket"),
            Err(e) if config.database.is_some() && config.sweep.enabled => {
                c.fail("sweep safety", crate::Chain(&e).to_string())
            }
            Err(e) => c.note("sweep safety", crate::Chain(&e).to_string()),
        },
        Err(_) => c.note("sweep safety", "not checked: fix the config first"),
    }
    c
}

async fn check_s3(s3: &S3Config, part_size: u64, c: &mut Checks) {
    let store = ObjectStore::new(s3, part_size).await;
    let where_ = format!(
        "bucket {} at {}",
        s3.bucket,
        s3.endpoint_url.as_deref().unwrap_or("AWS S3")
    );
    if let Err(e) = store.check_bucket().await {
        return c.fail("S3 bucket", format!("{where_}: {}", crate::Chain(&e)));
    }
    c.ok("S3 bucket", &where_);
    let key = format!(
        "{}{PROBE_MARK}{}-{}",
        s3.prefix,
        std::process::id(),
        crate::state::now_ms()
    );
    let body = bytes::Bytes::from(format!("synapse-s3-offload check probe {key}"));
    let md5: [u8; 16] = Md5::digest(&body);
    let steps = async {
        store
            .put_bytes(&key, body.clone(), &md5)
            .await
            .map_err(|e| ("PUT", crate::Chain(&e).to_string()))?;
        match store.head(&key).await {
            Ok(Some(info)) if info.confirms(body.len() as u64, &md5) => {}
            Ok(None) => {
                return Err((
                    "HEAD",
                    "the object just written is not there (does the provider list what it stores?)"
                        .into(),
                ));
            }
            Ok(Some(info)) => {
                return Err((
                    "HEAD",
                    format!(
                        "the object does not match what was written: {} bytes instead of {}, or a different digest (x-amz-meta-md5 {}, ETag {})",
                        info.size,
                        body.len(),
                        if info.meta_md5.is_some() {
                            "present"
                        } else {
                            "missing"
                        },
                        info.etag.as_deref().unwrap_or("none")
                    ),
                ));
            }
            Err(e) => return Err(("HEAD", crate::Chain(&e).to_string())),
        }
        match store.get_bytes(&key).await {
            Ok(got) if got == body => {}
            Ok(_) => {
                return Err((
                    "GET",
                    "the object read back differs from what was written".into(),
                ));
            }
            Err(e) => return Err(("GET", crate::Chain(&e).to_string())),
        }
        Ok(())
    };
    let mut result = steps.await;
    if let Err(("PUT", e)) = &mut result
        && let Some(cause) = blame_setting(s3, part_size, &format!("{key}-without")).await
    {
        e.push_str(&format!(" — {cause}"));
    }
    let deleted = store.delete_probe(&key).await;
    match (result, deleted) {
        (Ok(()), Ok(())) => c.ok("S3 read/write", format!("PUT, HEAD, GET and DELETE of a probe object under prefix {:?}", s3.prefix)),
        (Err((step, e)), _) => c.fail("S3 read/write", format!("{step} of the probe object failed: {e}")),
        (Ok(()), Err(e)) => c.fail("S3 read/write", format!("DELETE of the probe object failed (the daemon itself never deletes objects; the probe {key} stays): {}", crate::Chain(&e))),
    }
    check_incomplete_uploads(&store, c).await;
}

/// What to do about incomplete multipart uploads, whatever the provider lists.
const LIFECYCLE_FIX: &str = "add a bucket lifecycle rule AbortIncompleteMultipartUpload with DaysAfterInitiation 1 to 7 (README, \"Incomplete multipart uploads\")";

/// Incomplete multipart uploads under our prefix (a crash or `kill -9` mid-upload leaves one;
/// their parts are billed). A note, not a failure: one may be an upload in flight right now.
async fn check_incomplete_uploads(store: &ObjectStore, c: &mut Checks) {
    const WHAT: &str = "incomplete multipart uploads";
    let prefix = store.prefix();
    match store.incomplete_uploads().await {
        Ok(IncompleteUploads::Listed { uploads, .. }) if uploads.is_empty() => {
            c.ok(WHAT, format!("none under prefix {prefix:?}"))
        }
        Ok(IncompleteUploads::Listed { uploads, truncated }) => {
            let now = crate::state::now_ms();
            let oldest = uploads.first().map_or_else(|| "unknown".into(), |u| u.age(now));
            c.note(
                WHAT,
                format!(
                    "{}{} under prefix {prefix:?}, the oldest started {oldest} ago: their parts are stored and billed until aborted (a crash or kill -9 mid-upload leaves one; one started minutes ago may be an upload in flight). {LIFECYCLE_FIX}; to clean now, `audit --fix` aborts those of media keys older than a day",
                    if truncated { "at least " } else { "" },
                    uploads.len()
                ),
            );
        }
        Ok(IncompleteUploads::Unsupported(_)) => c.note(
            WHAT,
            format!("not supported by this provider (it does not implement ListMultipartUploads), so they cannot be counted; where it supports lifecycle rules, {LIFECYCLE_FIX}"),
        ),
        Err(e) if e.status == Some(403) => c.note(
            WHAT,
            format!("cannot list them: access denied (the key needs s3:ListBucketMultipartUploads on the bucket); {LIFECYCLE_FIX}"),
        ),
        Err(e) => c.note(WHAT, format!("cannot list them: {}", crate::Chain(&e))),
    }
}

/// When the probe PUT failed with SSE-C or a storage class configured, PUTs again without each:
/// the setting whose absence makes the PUT work is the cause, named with what is known of it.
async fn blame_setting(s3: &S3Config, part_size: u64, key: &str) -> Option<String> {
    let mut variants = Vec::new();
    if s3.sse_customer_key.is_some() {
        let mut c = s3.clone();
        c.sse_customer_key = None;
        variants.push((c, String::from(
            "the same PUT without SSE-C works, so the bucket refuses SSE-C uploads. AWS S3 blocks SSE-C on new buckets (and on those of accounts that had no SSE-C objects) since April 2026: allow it in the bucket's default encryption (PutBucketEncryption, BlockedEncryptionTypes NONE), or remove s3.sse_customer_key here and in Synapse's s3_storage_provider config (objects already written with the key still need it)"
        )));
    }
    if let Some(class) = &s3.storage_class {
        let mut c = s3.clone();
        c.storage_class = None;
        variants.push((c, format!(
            "the same PUT without s3.storage_class works, so this provider does not accept storage class {class}: remove s3.storage_class or pick one it supports (Garage and s3s-fs have none; MinIO knows STANDARD and REDUCED_REDUNDANCY)"
        )));
    }
    let body = bytes::Bytes::from_static(b"synapse-s3-offload check probe, without a setting");
    let md5: [u8; 16] = Md5::digest(&body);
    for (cfg, cause) in variants {
        let store = ObjectStore::new(&cfg, part_size).await;
        if store.put_bytes(key, body.clone(), &md5).await.is_ok() {
            let _ = store.delete_probe(key).await;
            return Some(cause);
        }
    }
    None
}

async fn check_database(database: Option<&DatabaseConfig>, c: &mut Checks) {
    let Some(dbc) = database else {
        c.note(
            "database",
            "no database: section and no synapse_config, so no sweep or audit (uploads work)",
        );
        return;
    };
    let what = dbc.kind();
    let db = match crate::synapse_db::Db::new(dbc) {
        Ok(db) => db,
        Err(e) => return c.fail(what, crate::Chain(&e).to_string()),
    };
    let counts = match db.media_counts().await {
        Ok((local, remote)) => {
            format!("media tables found: {local} local media, {remote} cached remote media")
        }
        Err(e) => return c.fail(what, crate::Chain(&e).to_string()),
    };
    let DatabaseConfig::Sqlite(s) = dbc else {
        return c.ok(what, counts);
    };
    let file = s.path.display();
    match db.journal_mode().await {
        Ok(Some(mode)) if mode.eq_ignore_ascii_case("wal") => c.ok(
            what,
            format!("{file} is readable; {counts}; journal mode wal (as Synapse sets it: our reads never block its writes)"),
        ),
        Ok(mode) => {
            c.ok(what, format!("{file} is readable; {counts}"));
            c.note(
                what,
                format!(
                    "journal mode {} (Synapse sets wal when it starts): while Synapse writes, our reads wait up to database.statement_timeout, and a sweep that waits longer stops and deletes nothing",
                    mode.as_deref().unwrap_or("unknown")
                ),
            );
        }
        Err(e) => c.fail(what, crate::Chain(&e).to_string()),
    }
}

fn check_media_store(root: &Path, c: &mut Checks) {
    let probe = root.join(format!(".{PROBE_MARK}{}", std::process::id()));
    match std::fs::write(&probe, b"probe").and_then(|()| std::fs::remove_file(&probe)) {
        Ok(()) => c.ok("media store", format!("{} is readable and writable", root.display())),
        Err(e) => c.fail(
            "media store",
            format!("{} is not writable ({e}); the sweep must delete files there: run as Synapse's user (e.g. matrix-synapse)", root.display()),
        ),
    }
}

fn check_inotify(root: &Path, c: &mut Checks) {
    let dirs = crate::scan::count_dirs(root);
    let max: Option<u64> = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match max {
        Some(max) if dirs * 10 > max * 9 => c.fail(
            "inotify",
            format!("{dirs} directories to watch but fs.inotify.max_user_watches is {max}: raise it, e.g. `sysctl fs.inotify.max_user_watches={}` (and persist it in /etc/sysctl.d/); until then new files are found by periodic scans only", (dirs * 2).max(524_288)),
        ),
        Some(max) => c.ok("inotify", format!("{dirs} directories to watch, fs.inotify.max_user_watches is {max}")),
        None => c.note("inotify", format!("{dirs} directories; cannot read fs.inotify.max_user_watches")),
    }
}

async fn check_state_dir(dir: &Path, c: &mut Checks) {
    // Not created here: a typo'd path would then look like a fresh install with 0 files verified.
    if !dir.exists() {
        return c.note(
            "state_dir",
            format!(
                "{} does not exist: `run` or `upload` creates it (if you expected the state of earlier uploads there, the path is wrong)",
                dir.display()
            ),
        );
    }
    if let Ok(Some(_)) = crate::control::request(dir, &crate::control::Request::Status).await {
        return c.ok(
            "state_dir",
            format!("{} is in use by the running daemon", dir.display()),
        );
    }
    match crate::state::State::open(dir) {
        Ok(_) => c.ok("state_dir", format!("{} is writable", dir.display())),
        Err(e) => c.fail("state_dir", crate::Chain(&e).to_string()),
    }
}

impl std::fmt::Display for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        for l in &self.lines {
            let _ = writeln!(s, "{l}");
        }
        if self.lines.iter().any(|l| l.starts_with('!')) {
            let _ = writeln!(
                s,
                "(a line starting with ! is a note: worth reading, not a failure)"
            );
        }
        f.write_str(&s)
    }
}
