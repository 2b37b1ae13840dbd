//! Synapse's media-store layout: which files we handle and how a file's path maps to its object key.
//!
//! Everything downstream (queue, records, S3 keys, sweep deletions) is keyed by [`MediaPath`], a
//! path relative to `media_store_path` that has been validated once, here. It can never be absolute,
//! contain `..`/`.`, empty components or non-UTF-8 bytes, so joining it to the store root can never
//! escape the store (safety invariant 5), and the object key is `prefix + MediaPath` in exactly one
//! place ([`MediaPath::key`]), the same rule `s3_storage_provider` uses to read objects back.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Top-level folders of a Synapse media store, in the order we scan them.
pub const MEDIA_DIRS: &[&str] = &[
    "local_content",
    "local_thumbnails",
    "remote_content",
    "remote_thumbnail",
];

/// URL-preview folders: uploaded only with `upload.include_url_cache: true`, never swept by default.
pub const URL_CACHE_DIRS: &[&str] = &["url_cache", "url_cache_thumbnails"];

/// Names of our own temporary files in the store (a heal's download, renamed over the bad copy
/// once verified). Never media: scans and the watcher skip them.
pub const TEMP_PREFIX: &str = ".synapse-s3-offload-heal.";

/// Whether a file name is one of our temporary files ([`TEMP_PREFIX`]).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// The media a file belongs to, as Synapse's database names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MediaRef {
    /// `local_media_repository.media_id`.
    Local(String),
    /// `remote_media_cache (media_origin, filesystem_id)`.
    Remote { origin: String, fs_id: String },
}

/// Why a path was refused as a [`MediaPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is absolute; media paths are relative to media_store_path")]
    Absolute(String),
    #[error("path {0:?} contains '..', '.' or an empty component")]
    NotNormal(String),
    #[error("path {0:?} is not valid UTF-8, so it has no S3 key; rename the file to upload it")]
    NotUtf8(String),
    #[error("path {0:?} is not inside the media store {1:?}")]
    OutsideStore(String, String),
    #[error("path {0:?} contains a control character, which S3 keys should not hold")]
    ControlChar(String),
}

/// A validated path of a file relative to the media store root, using `/` separators.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaPath(String);

impl MediaPath {
    /// Validates a relative path given as a string (from the queue, the database or a test).
    pub fn parse(rel: &str) -> Result<Self, PathError> {
        if rel.is_empty() {
            return Err(PathError::Empty);
        }
        if rel.starts_with('/') {
            return Err(PathError::Absolute(rel.to_owned()));
        }
        if rel.chars().any(char::is_control) {
            return Err(PathError::ControlChar(rel.to_owned()));
        }
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(PathError::NotNormal(rel.to_owned()));
        }
        Ok(MediaPath(rel.to_owned()))
    }

    /// Validates `abs`, a path found on disk, against the (canonical) store root.
    pub fn from_absolute(root: &Path, abs: &Path) -> Result<Self, PathError> {
        let rel = abs.strip_prefix(root).map_err(|_| {
            PathError::OutsideStore(
                abs.to_string_lossy().into_owned(),
                root.to_string_lossy().into_owned(),
            )
        })?;
        Self::from_relative(rel)
    }

    /// Validates a relative filesystem path.
    pub fn from_relative(rel: &Path) -> Result<Self, PathError> {
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(s) => match s.to_str() {
                    Some(s) => parts.push(s),
                    None => return Err(PathError::NotUtf8(rel.to_string_lossy().into_owned())),
                },
                Component::RootDir | Component::Prefix(_) => {
                    return Err(PathError::Absolute(rel.to_string_lossy().into_owned()));
                }
                Component::CurDir | Component::ParentDir => {
                    return Err(PathError::NotNormal(rel.to_string_lossy().into_owned()));
                }
            }
        }
        Self::parse(&parts.join("/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object key: the storage provider's rule, `prefix + path`, applied here and nowhere else.
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.0)
    }

    /// The file's location under the store root. Cannot escape `root` (see the type's invariant).
    pub fn to_path(&self, root: &Path) -> PathBuf {
        root.join(&self.0)
    }

    /// Whether every directory between `root` and this path's file is a real directory, not a
    /// symlink (`false` too when one is missing: there is nothing to read or delete then).
    ///
    /// `O_NOFOLLOW` and `symlink_metadata` only refuse a symlink in the *last* component; the kernel
    /// still follows one in the directory part, so a symlinked `local_content/ab` would lead an
    /// upload's read or a sweep's unlink out of the store (invariant 5). Callers check this right
    /// before they read or unlink. A symlink swapped in between the check and the syscall is not
    /// caught; the daemon runs as Synapse's user, so that needs someone who could already delete
    /// those files.
    pub fn parents_are_dirs(&self, root: &Path) -> std::io::Result<bool> {
        let mut dir = root.to_path_buf();
        let mut components = self.0.split('/').peekable();
        while let Some(c) = components.next() {
            if components.peek().is_none() {
                break;
            }
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The top-level folder (`local_content`, `remote_thumbnail`, …).
    pub fn top_dir(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }

    /// Whether files under this path are uploaded, given the url-cache setting.
    pub fn is_uploadable(&self, include_url_cache: bool) -> bool {
        let top = self.top_dir();
        // A bare file at the top level (no folder) is never Synapse media.
        self.0.contains('/')
            && !is_temp_name(self.file_name())
            && (MEDIA_DIRS.contains(&top) || (include_url_cache && URL_CACHE_DIRS.contains(&top)))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }

    /// The media this file belongs to, inverting Synapse's layout (`AB/CD/REST` of an id): an
    /// original (`local_content`, `remote_content`) or one of its thumbnails. `None` for anything
    /// not laid out exactly so.
    pub fn media(&self) -> Option<MediaRef> {
        let parts: Vec<&str> = self.0.split('/').collect();
        let id = |ab: &str, cd: &str, rest: &str| {
            (ab.chars().count() == 2 && cd.chars().count() == 2).then(|| format!("{ab}{cd}{rest}"))
        };
        match (parts[0], parts.len()) {
            ("local_content", 4) | ("local_thumbnails", 5) => {
                id(parts[1], parts[2], parts[3]).map(MediaRef::Local)
            }
            ("remote_content", 5) | ("remote_thumbnail", 6) => id(parts[2], parts[3], parts[4])
                .map(|fs_id| MediaRef::Remote {
                    origin: parts[1].to_owned(),
                    fs_id,
                }),
            _ => None,
        }
    }

    /// Whether this is a media's original (whose SHA-256 Synapse's database may hold), not a
    /// thumbnail.
    pub fn is_original(&self) -> bool {
        matches!(self.top_dir(), "local_content" | "remote_content") && self.media().is_some()
    }
}

impl fmt::Display for MediaPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MediaPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MediaPath({:?})", self.0)
    }
}

/// Splits a Synapse media id (or a remote media's `filesystem_id`) into its three path components
/// the way Synapse does: `id[0:2]`, `id[2:4]`, `id[4:]`, counted in characters (Python `str`
/// slicing), not bytes, so an id starting with a multi-byte character is split where Synapse split
/// it instead of panicking on a char boundary. `None` when a component would be empty, `.`, `..`,
/// or hold a `/` or a control character: such an id cannot name a file inside the store.
pub fn split_id(id: &str) -> Option<(&str, &str, &str)> {
    let mut bounds = id.char_indices().map(|(i, _)| i).skip(2).step_by(2);
    let (two, four) = (bounds.next()?, bounds.next()?);
    let parts = (&id[..two], &id[two..four], &id[four..]);
    let ok = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && !c.contains('/')
            && !c.chars().any(char::is_control)
    };
    (ok(parts.0) && ok(parts.1) && ok(parts.2)).then_some(parts)
}

/// The top-level folders to upload from, given the url-cache setting.
pub fn upload_dirs(include_url_cache: bool) -> impl Iterator<Item = &'static str> {
    let extra: &[&str] = if include_url_cache {
        URL_CACHE_DIRS
    } else {
        &[]
    };
    MEDIA_DIRS.iter().chain(extra.iter()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_synapse_paths() {
        for p in [
            "local_content/ab/cd/efghijkl",
            "local_thumbnails/ab/cd/efgh/32-32-image-png-crop",
            "remote_content/matrix.org/ab/cd/efgh",
            "remote_thumbnail/example.com:8448/ab/cd/ef/640-480-image-jpeg-scale",
            "local_content/ab/cd/with space é",
        ] {
            assert_eq!(MediaPath::parse(p).unwrap().as_str(), p);
        }
    }

    #[test]
    fn parse_rejects_escapes() {
        let cases = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute("/etc/passwd".into())),
            (
                "local_content/../../etc",
                PathError::NotNormal("local_content/../../etc".into()),
            ),
            (
                "remote_content/../x",
                PathError::NotNormal("remote_content/../x".into()),
            ),
            (
                "local_content//x",
                PathError::NotNormal("local_content//x".into()),
            ),
            (
                "local_content/./x",
                PathError::NotNormal("local_content/./x".into()),
            ),
            (
                "local_content/x/",
                PathError::NotNormal("local_content/x/".into()),
            ),
            (
                "local_content/a\nb",
                PathError::ControlChar("local_content/a\nb".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(MediaPath::parse(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn from_absolute_requires_the_root() {
        let root = Path::new("/srv/media");
        let p = MediaPath::from_absolute(root, Path::new("/srv/media/local_content/ab/cd/ef"));
        assert_eq!(p.unwrap().as_str(), "local_content/ab/cd/ef");
        assert!(matches!(
            MediaPath::from_absolute(root, Path::new("/srv/other/x")),
            Err(PathError::OutsideStore(..))
        ));
        assert!(matches!(
            MediaPath::from_absolute(root, Path::new("/srv/media/local_content/../../x")),
            Err(PathError::NotNormal(_))
        ));
    }

    #[test]
    fn non_utf8_is_refused() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let rel = Path::new(OsStr::from_bytes(b"local_content/ab/cd/\xff\xfe"));
        assert!(matches!(
            MediaPath::from_relative(rel),
            Err(PathError::NotUtf8(_))
        ));
    }

    #[test]
    fn key_is_prefix_plus_path() {
        let p = MediaPath::parse("local_content/ab/cd/ef").unwrap();
        assert_eq!(p.key(""), "local_content/ab/cd/ef");
        assert_eq!(p.key("synapse/"), "synapse/local_content/ab/cd/ef");
        assert_eq!(
            p.to_path(Path::new("/m")),
            PathBuf::from("/m/local_content/ab/cd/ef")
        );
    }

    #[test]
    fn parents_must_be_real_directories() {
        let store = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = store.path();
        std::fs::create_dir_all(root.join("local_content/ab/cd")).unwrap();
        std::fs::create_dir_all(outside.path().join("cd")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("local_content/xy")).unwrap();
        std::fs::write(root.join("local_content/fi"), b"").unwrap();
        let ok = |p: &str| MediaPath::parse(p).unwrap().parents_are_dirs(root).unwrap();
        assert!(
            ok("local_content/ab/cd/efgh"),
            "the file itself need not exist"
        );
        assert!(
            ok("local_content/ab/cd"),
            "the last component may be anything"
        );
        assert!(!ok("local_content/xy/cd/efgh"), "a symlinked directory");
        assert!(
            !ok("local_content/fi/cd/efgh"),
            "a file where a directory should be"
        );
        assert!(!ok("local_content/zz/cd/efgh"), "a missing directory");
    }

    #[test]
    fn split_id_counts_characters_like_python() {
        assert_eq!(split_id("abcdefgh"), Some(("ab", "cd", "efgh")));
        assert_eq!(split_id("abcde"), Some(("ab", "cd", "e")));
        // Multi-byte characters in the first four: split by character, as Synapse's id[0:2].
        assert_eq!(split_id("éabcdef"), Some(("éa", "bc", "def")));
        assert_eq!(
            split_id("日本語のファイル"),
            Some(("日本", "語の", "ファイル"))
        );
        assert_eq!(split_id("😀😀😀😀😀"), Some(("😀😀", "😀😀", "😀")));
        for bad in [
            "",
            "a",
            "abcd",
            "日本語の",
            "..cdefg",
            "ab..efg",
            "abcd..",
            "abcd.",
            "a/cdefg",
            "abcd/x",
            "abcd\nx",
            "ab\0defg",
        ] {
            assert_eq!(split_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn uploadable_dirs() {
        let ok = |p: &str, url| MediaPath::parse(p).unwrap().is_uploadable(url);
        assert!(ok("local_content/ab/cd/ef", false));
        assert!(ok("remote_thumbnail/x/ab/cd/ef/1-1-a-b-c", false));
        assert!(!ok("url_cache/2024-01-01/abc", false));
        assert!(ok("url_cache/2024-01-01/abc", true));
        assert!(!ok("local_content", false));
        assert!(!ok("something_else/x", true));
        let dirs: Vec<_> = upload_dirs(true).collect();
        assert_eq!(dirs.len(), 6);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Path-like strings: separators, dots and a few multi-byte characters are frequent.
        fn pathish() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z./é日\\-]{0,6}(/[a-z./é日 ]{0,5}){0,5}",
                any::<String>(),
            ]
        }

        fn check_valid(p: &MediaPath, prefix: &str) -> Result<(), TestCaseError> {
            let s = p.as_str();
            prop_assert!(!s.is_empty() && !s.starts_with('/'));
            for c in s.split('/') {
                prop_assert!(!c.is_empty() && c != "." && c != "..", "{:?}", s);
            }
            prop_assert!(!s.chars().any(char::is_control));
            let again = MediaPath::parse(s);
            prop_assert_eq!(again.as_ref(), Ok(p), "parse(as_str()) round trip");
            prop_assert_eq!(p.key(prefix), format!("{prefix}{s}"));
            // Joined to a root it stays below it, component by component.
            let root = Path::new("/srv/media");
            let joined = p.to_path(root);
            let rel = joined.strip_prefix(root).unwrap();
            prop_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
            prop_assert_eq!(rel.components().count(), s.split('/').count());
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn parse_accepts_only_normal_relative_paths(s in pathish(), prefix in "[a-z/]{0,8}") {
                if let Ok(p) = MediaPath::parse(&s) {
                    prop_assert_eq!(p.as_str(), s.as_str());
                    check_valid(&p, &prefix)?;
                }
            }

            #[test]
            fn from_relative_accepts_only_normal_utf8_paths(
                bytes in proptest::collection::vec(
                    prop_oneof![Just(b'/'), Just(b'.'), Just(b'a'), Just(0xffu8), any::<u8>()],
                    0..16,
                ),
            ) {
                use std::os::unix::ffi::OsStrExt;
                let rel = Path::new(std::ffi::OsStr::from_bytes(&bytes));
                if let Ok(p) = MediaPath::from_relative(rel) {
                    prop_assert!(!rel.has_root());
                    prop_assert!(!rel.components().any(|c| c == Component::ParentDir));
                    check_valid(&p, "")?;
                }
            }

            #[test]
            fn split_id_reassembles_the_id_in_characters(id in pathish()) {
                if let Some((a, b, c)) = split_id(&id) {
                    prop_assert_eq!(format!("{a}{b}{c}"), id.clone());
                    prop_assert_eq!((a.chars().count(), b.chars().count()), (2, 2));
                    let joined = format!("local_content/{a}/{b}/{c}");
                    let p = MediaPath::parse(&joined);
                    prop_assert!(p.is_ok(), "{:?} makes {:?}", id, joined);
                }
            }
        }
    }
}
