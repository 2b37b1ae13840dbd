//! Environment overrides: `SYNAPSE_S3_OFFLOAD__S3__BUCKET=…` sets `s3.bucket`.
//!
//! Each variable is deserialized on its own into a [`RawConfig`] holding just that key, so an
//! error names the variable, then laid over the file's values. Values are parsed by the type of
//! their key: `…__SECRET_ACCESS_KEY=00123` stays the string `00123` (the `config` crate we used
//! before parsed every value as a number first and turned it into `123`), while
//! `…__UPLOAD__CONCURRENCY=16` is the number 16.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

use super::RawConfig;

/// Names the variables that are ours: the prefix, then `__`.
pub const ENV_VAR_PREFIX: &str = "SYNAPSE_S3_OFFLOAD__";

/// What a variable does not say right. Never carries its value (it may be a secret).
#[derive(Debug)]
pub struct EnvError(String);

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EnvError {}

impl de::Error for EnvError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        EnvError(msg.to_string())
    }
    // The defaults quote the value ("invalid type: string \"hunter2\""); these do not.
    fn invalid_type(_: de::Unexpected, exp: &dyn de::Expected) -> Self {
        EnvError(format!(
            "expected {}",
            super::origin::plain_expected(&exp.to_string())
        ))
    }
    fn invalid_value(_: de::Unexpected, exp: &dyn de::Expected) -> Self {
        Self::invalid_type(de::Unexpected::Other(""), exp)
    }
    fn unknown_field(field: &str, _: &'static [&'static str]) -> Self {
        EnvError(format!(
            "`{field}` is not a config key (a typo? every key is listed in config/example.yaml)"
        ))
    }
}

/// The dotted key a variable sets (`s3.secret_access_key`), or `None` if it is not ours.
pub fn key_of(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_VAR_PREFIX)?;
    Some(
        rest.split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The config that `var=value` alone describes.
pub fn parse_one(var: &str, value: &str) -> Result<RawConfig, EnvError> {
    let key = key_of(var).ok_or_else(|| EnvError("not a config variable".into()))?;
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(EnvError(
            "empty key segment (write SECTION__KEY with exactly two underscores)".into(),
        ));
    }
    RawConfig::deserialize(Node {
        path: &segments,
        value,
    })
}

/// A mapping with one key (the first segment) whose value is the rest of the path, down to the
/// value itself.
struct Node<'a> {
    path: &'a [&'a str],
    value: &'a str,
}

impl<'de> Deserializer<'de> for Node<'_> {
    type Error = EnvError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        match self.path.split_first() {
            Some((first, rest)) => v.visit_map(OneEntry {
                key: Some(first),
                value: Some(Node {
                    path: rest,
                    value: self.value,
                }),
            }),
            None => v.visit_str(self.value),
        }
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        v.visit_some(self)
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        match (
            self.path.is_empty(),
            self.value.to_ascii_lowercase().as_str(),
        ) {
            (true, "true" | "yes" | "on" | "1") => v.visit_bool(true),
            (true, "false" | "no" | "off" | "0") => v.visit_bool(false),
            (true, _) => Err(EnvError("expected true or false".into())),
            (false, _) => self.deserialize_any(v),
        }
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        if !self.path.is_empty() {
            return self.deserialize_any(v);
        }
        let n: u64 = self
            .value
            .trim()
            .parse()
            .map_err(|_| EnvError("expected a whole number".into()))?;
        v.visit_u64(n)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        self.deserialize_u64(v)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        self.deserialize_u64(v)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        self.deserialize_u64(v)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        self.deserialize_u64(v)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, EnvError> {
        if !self.path.is_empty() {
            return self.deserialize_any(v);
        }
        let n: f64 = self
            .value
            .trim()
            .parse()
            .map_err(|_| EnvError("expected a number".into()))?;
        v.visit_f64(n)
    }
    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u128 f32 char str string bytes byte_buf unit unit_struct
        newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct OneEntry<'a> {
    key: Option<&'a str>,
    value: Option<Node<'a>>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = EnvError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, EnvError> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, EnvError> {
        seed.deserialize(self.value.take().expect("a value follows its key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_the_type_of_their_key() {
        let r = parse_one("SYNAPSE_S3_OFFLOAD__S3__SECRET_ACCESS_KEY", "00123").unwrap();
        assert_eq!(r.s3.secret_access_key.unwrap().expose(), "00123");
        let r = parse_one("SYNAPSE_S3_OFFLOAD__DATABASE__PASSWORD", "0123").unwrap();
        assert_eq!(r.database.unwrap().password.unwrap().expose(), "0123");
        let r = parse_one("SYNAPSE_S3_OFFLOAD__S3__BUCKET", "true").unwrap();
        assert_eq!(r.s3.bucket.as_deref(), Some("true"));
        let r = parse_one("SYNAPSE_S3_OFFLOAD__UPLOAD__CONCURRENCY", "16").unwrap();
        assert_eq!(r.upload.concurrency, Some(16));
        let r = parse_one("SYNAPSE_S3_OFFLOAD__DATABASE__PORT", "5433").unwrap();
        assert_eq!(r.database.unwrap().port, Some(5433));
        let r = parse_one("SYNAPSE_S3_OFFLOAD__SWEEP__DRY_RUN", "true").unwrap();
        assert_eq!(r.sweep.dry_run, Some(true));
        let r = parse_one("SYNAPSE_S3_OFFLOAD__STATE_DIR", "/x").unwrap();
        assert_eq!(r.state_dir.as_deref(), Some(std::path::Path::new("/x")));
    }

    #[test]
    fn errors_name_the_problem_and_never_the_value() {
        let e = parse_one("SYNAPSE_S3_OFFLOAD__S3__BUKET", "secret-ish").unwrap_err();
        assert!(e.to_string().contains("`buket` is not a config key"), "{e}");
        let e = parse_one("SYNAPSE_S3_OFFLOAD__DATABASE__PORT", "hunter2").unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = parse_one("SYNAPSE_S3_OFFLOAD__S3", "hunter2").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
