//! The `s3:` section: the storage provider's key names, validated.

use super::{ChecksumMode, ConfigError, RawS3, S3Config, duration, invalid};

/// Storage classes `s3_storage_provider` can read back without a restore.
const READABLE_STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "EXPRESS_ONEZONE",
    "OUTPOSTS",
];
const ARCHIVE_STORAGE_CLASSES: &[&str] = &["GLACIER", "DEEP_ARCHIVE", "SNOW"];

pub(super) fn validate_s3(raw: RawS3) -> Result<S3Config, ConfigError> {
    let bucket = raw.bucket.ok_or(ConfigError::Missing {
        key: "s3.bucket",
        hint: "the bucket of your s3_storage_provider config",
    })?;
    validate_bucket(&bucket)?;
    let prefix = raw.prefix.unwrap_or_default();
    if prefix.starts_with('/') {
        return Err(invalid(
            "s3.prefix",
            "must not start with '/' (keys are prefix + path, as in s3_storage_provider)",
        ));
    }
    let endpoint_url = raw.endpoint_url.filter(|s| !s.is_empty());
    if let Some(url) = &endpoint_url {
        validate_endpoint(url)?;
    }
    match (&raw.access_key_id, &raw.secret_access_key) {
        (Some(_), None) => {
            return Err(invalid(
                "s3.secret_access_key",
                "access_key_id is set but secret_access_key is not; set both or neither (to use the AWS_* environment or profile)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "s3.access_key_id",
                "secret_access_key is set but access_key_id is not; set both or neither",
            ));
        }
        _ => {}
    }
    if raw.session_token.is_some() && raw.access_key_id.is_none() {
        return Err(invalid(
            "s3.session_token",
            "needs access_key_id and secret_access_key",
        ));
    }
    let storage_class = match raw.storage_class.filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => {
            let upper = c.to_ascii_uppercase();
            if ARCHIVE_STORAGE_CLASSES.contains(&upper.as_str()) {
                return Err(invalid(
                    "s3.storage_class",
                    format!(
                        "{c} objects cannot be read without a restore, so Synapse could not serve them; use STANDARD, STANDARD_IA, INTELLIGENT_TIERING or GLACIER_IR"
                    ),
                ));
            }
            if !READABLE_STORAGE_CLASSES.contains(&upper.as_str()) {
                return Err(invalid(
                    "s3.storage_class",
                    format!(
                        "unknown storage class {c:?}; expected one of {}",
                        READABLE_STORAGE_CLASSES.join(", ")
                    ),
                ));
            }
            Some(upper)
        }
    };
    let sse_customer_algo = raw.sse_customer_algo.unwrap_or_else(|| "AES256".into());
    if let Some(key) = &raw.sse_customer_key {
        if sse_customer_algo != "AES256" {
            return Err(invalid(
                "s3.sse_customer_algo",
                "only AES256 is supported by S3 for SSE-C",
            ));
        }
        // The provider hands the key to boto3 as-is, which requires exactly 32 bytes for AES256.
        if key.expose().len() != 32 {
            return Err(invalid(
                "s3.sse_customer_key",
                format!(
                    "must be exactly 32 bytes for AES256 (it is {} bytes)",
                    key.expose().len()
                ),
            ));
        }
    }
    let max_attempts = raw.max_attempts.unwrap_or(3);
    if !(1..=10).contains(&max_attempts) {
        return Err(invalid("s3.max_attempts", "must be between 1 and 10"));
    }
    Ok(S3Config {
        force_path_style: raw.force_path_style.unwrap_or(endpoint_url.is_some()),
        bucket,
        prefix,
        endpoint_url,
        region_name: raw.region_name.filter(|s| !s.is_empty()),
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key,
        session_token: raw.session_token,
        storage_class,
        sse_customer_key: raw.sse_customer_key,
        sse_customer_algo,
        request_checksum_calculation: checksum_mode(
            "s3.request_checksum_calculation",
            raw.request_checksum_calculation,
        )?,
        response_checksum_validation: checksum_mode(
            "s3.response_checksum_validation",
            raw.response_checksum_validation,
        )?,
        max_attempts,
        connect_timeout: duration("s3.connect_timeout", raw.connect_timeout, "10s")?,
        request_timeout: duration("s3.request_timeout", raw.request_timeout, "2m")?,
    })
}

#[cfg(test)]
pub(crate) fn validate_s3_for_tests(raw: RawS3) -> S3Config {
    validate_s3(raw).expect("valid s3 section")
}

fn validate_bucket(bucket: &str) -> Result<(), ConfigError> {
    // Lenient on purpose: Ceph/B2/legacy buckets allow uppercase and underscores; we only refuse
    // what cannot be a bucket name anywhere (and what would make a broken URL).
    let ok_chars = bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !(3..=255).contains(&bucket.len()) || !ok_chars {
        return Err(invalid(
            "s3.bucket",
            format!(
                "{bucket:?} is not a bucket name (3-63 letters, digits, '.', '-'; no '/' or spaces — put paths in s3.prefix)"
            ),
        ));
    }
    Ok(())
}

fn validate_endpoint(url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url.parse().map_err(|e| {
        invalid(
            "s3.endpoint_url",
            format!("{url:?} is not a URL ({e}); e.g. https://s3.example.com"),
        )
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(invalid(
                "s3.endpoint_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("s3.endpoint_url", format!("{url:?} has no host")));
    }
    Ok(())
}

fn checksum_mode(key: &'static str, v: Option<String>) -> Result<ChecksumMode, ConfigError> {
    match v.as_deref() {
        None | Some("when_required") => Ok(ChecksumMode::WhenRequired),
        Some("when_supported") => Ok(ChecksumMode::WhenSupported),
        Some(other) => Err(invalid(
            key,
            format!("{other:?} is not when_required or when_supported"),
        )),
    }
}
