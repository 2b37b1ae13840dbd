//! Where each config value came from (our file and line, an environment variable, Synapse's
//! config), so that an error can name it; and YAML errors described without any source text.
//!
//! serde_saphyr's own messages quote the source (a snippet, or the offending value in "invalid
//! type: string …"), and a config file holds secrets: issue 14 reproduced a duplicate key printing
//! the `password:` line above it. So an error says the file, the line, the key and the kind of
//! problem, never a value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Our config file (line 0: unknown, e.g. TOML).
    File { path: PathBuf, line: u64 },
    /// A `SYNAPSE_S3_OFFLOAD__…` environment variable.
    Env { var: String },
    /// Synapse's homeserver.yaml or one of its conf.d files.
    Synapse { path: PathBuf, line: u64 },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line: 0 } => write!(f, "{}", path.display()),
            Origin::File { path, line } => write!(f, "{} line {line}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Synapse { path, line: 0 } => write!(f, "Synapse's config {}", path.display()),
            Origin::Synapse { path, line } => {
                write!(f, "Synapse's config {} line {line}", path.display())
            }
        }
    }
}

/// Origins by dotted key (`s3.bucket`). A key that is not here has its default.
#[derive(Debug, Clone, Default)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    pub fn set(&mut self, key: impl Into<String>, origin: Origin) {
        self.0.insert(key.into(), origin);
    }
    /// The origin of `key` (not of its section: that would point at the wrong line).
    pub fn get(&self, key: &str) -> Option<&Origin> {
        self.0.get(key)
    }
    /// Replaces every origin under top-level `key` by those of `other` (a later Synapse file).
    pub fn replace_under(&mut self, key: &str, other: &Origins) {
        let under = |k: &str| k == key || k.starts_with(&format!("{key}."));
        self.0.retain(|k, _| !under(k));
        for (k, o) in &other.0 {
            if under(k) {
                self.0.insert(k.clone(), o.clone());
            }
        }
    }
}

/// The line of every key of a YAML document, by dotted path (`database.args.password`). Built by
/// a second, value-free pass over a document that already parsed.
#[derive(Debug, Default)]
pub struct KeyLines(pub BTreeMap<String, u64>);

impl KeyLines {
    pub fn of(text: &str) -> KeyLines {
        let mut out = KeyLines::default();
        if let Ok(tree) = serde_saphyr::from_str_with_options::<Node>(text, yaml_options()) {
            tree.flatten("", &mut out.0);
        }
        out
    }
    /// The key defined on `line` (the deepest one; keys share a line in flow style).
    pub fn key_at(&self, line: u64) -> Option<&str> {
        self.0
            .iter()
            .filter(|(_, l)| **l == line)
            .max_by_key(|(k, _)| k.len())
            .map(|(k, _)| k.as_str())
    }
}

/// How we read every YAML file, ours and Synapse's: as PyYAML does for duplicate keys (the last
/// one wins), so a homeserver.yaml that Synapse accepts never stops us.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::LastWins,
    }
}

/// A mapping's keys with their lines and nested mappings; anything else is skipped.
#[derive(Default)]
struct Node(BTreeMap<String, (u64, Node)>);

impl Node {
    fn flatten(self, prefix: &str, out: &mut BTreeMap<String, u64>) {
        for (k, (line, child)) in self.0 {
            let path = if prefix.is_empty() {
                k
            } else {
                format!("{prefix}.{k}")
            };
            child.flatten(&path, out);
            out.insert(path, line);
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("anything")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
                let mut out = BTreeMap::new();
                // Keys are read as text (type-driven: `8008:` is "8008"); the last one wins, as
                // in the values themselves.
                while let Some(k) = m.next_key::<String>()? {
                    let v: serde_saphyr::Spanned<Node> = m.next_value()?;
                    out.insert(k, (v.referenced.line(), v.value));
                }
                Ok(Node(out))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Node, A::Error> {
                while s.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Node::default())
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// What is wrong in a YAML file, at which line and key, without a single character of its text:
/// ` line 8, key `upload.concurrency`: wrong kind of value: expected a whole number`.
pub fn describe_yaml_error(e: &serde_saphyr::Error, lines: &KeyLines) -> String {
    use serde_saphyr::Error as E;
    let mut e = e;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = e {
        e = error;
    }
    let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
    let key = line.and_then(|l| lines.key_at(l));
    let kind = match e {
        E::SerdeUnknownField { field, .. } if is_key_like(field) => {
            format!("unknown key `{field}` (a typo? every key is listed in config/example.yaml)")
        }
        E::SerdeUnknownField { .. } => "unknown key".into(),
        E::SerdeMissingField { field, .. } => format!("key `{field}` is missing"),
        E::SerdeInvalidType { expected, .. } | E::SerdeInvalidValue { expected, .. } => {
            format!("wrong kind of value: expected {}", plain_expected(expected))
        }
        E::InvalidScalar { ty, .. } => {
            format!("wrong kind of value: expected {}", plain_expected(ty))
        }
        E::Budget { .. } => "the file is too large or too deeply nested".into(),
        E::IOError { .. } => "cannot be read".into(),
        E::Message { .. } => {
            "a value of the wrong kind (see the key in README or config/example.yaml)".into()
        }
        _ => "not valid YAML (check indentation, quotes and `key: value` syntax)".into(),
    };
    let mut out = String::new();
    if let Some(l) = line {
        out.push_str(&format!(" line {l}"));
    }
    if let Some(k) = key {
        out.push_str(&format!(", key `{k}`"));
    }
    out.push_str(&format!(": {kind}"));
    out
}

fn is_key_like(s: &str) -> bool {
    s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// serde's "expected" texts in an admin's words ("struct RawUpload" is programmer output).
pub fn plain_expected(expected: &str) -> String {
    if expected.starts_with("struct ") || expected.starts_with("a map") {
        "a section of `key: value` lines (or nothing, for the defaults)".into()
    } else if expected.contains("untagged enum SizeValue") {
        "a size, e.g. 16MiB".into()
    } else if expected.contains("untagged enum DurationValue") {
        "a duration, e.g. 10s".into()
    } else if ["u8", "u16", "u32", "u64", "usize", "i64", "i32"].contains(&expected)
        || expected.contains("integer")
    {
        "a whole number".into()
    } else if expected.contains("bool") {
        "true or false".into()
    } else {
        expected.into()
    }
}
