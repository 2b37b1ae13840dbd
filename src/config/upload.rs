//! The `upload:` section, validated.

use super::{
    ConfigError, MAX_PART_SIZE, MIN_PART_SIZE, RawUpload, SizeValue, UploadConfig, duration,
    invalid, parse_size,
};

/// `upload.concurrency` by default: the ceiling of the adaptive limit (`upload::limiter`), which
/// starts at 16 and finds what the link and the provider take. On a quiet machine at 30 ms RTT
/// the limit sat at a cap of 64 (1.07-1.10x s5cmd's 256 workers); 96 gave 1.35x there and kept
/// 1.36x s5cmd-16 at 0 ms, where 128 fell to 1.29x: more in flight only costs CPU on a fast link
/// (BENCHMARKS.md). Each upload in flight holds at most 9 descriptors (the daemon raises its soft
/// open-file limit to the hard one, and lowers this cap if even that is too low) and at most one
/// body of up to 1 MiB in memory (`digest::INLINE_MAX`; larger files stream from disk).
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 96;

pub(super) fn validate_upload(raw: RawUpload) -> Result<UploadConfig, ConfigError> {
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_UPLOAD_CONCURRENCY);
    if !(1..=256).contains(&concurrency) {
        return Err(invalid("upload.concurrency", "must be between 1 and 256"));
    }
    let size = |key, v: Option<SizeValue>, default: u64| match v {
        None => Ok(default),
        Some(v) => parse_size(&v).map_err(|r| invalid(key, r)),
    };
    let multipart_threshold = size(
        "upload.multipart_threshold",
        raw.multipart_threshold,
        16 << 20,
    )?;
    let multipart_part_size = size(
        "upload.multipart_part_size",
        raw.multipart_part_size,
        16 << 20,
    )?;
    if multipart_threshold < MIN_PART_SIZE {
        return Err(invalid(
            "upload.multipart_threshold",
            "must be at least 5MiB (S3's minimum part size)",
        ));
    }
    // Above 5 GiB a file under the threshold would go as one PUT, which S3 refuses for ever
    // (EntityTooLarge): every such file would fail on each retry.
    if multipart_threshold > MAX_PART_SIZE {
        return Err(invalid(
            "upload.multipart_threshold",
            "must be at most 5GiB (S3's largest single PUT); larger files go up in parts",
        ));
    }
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&multipart_part_size) {
        return Err(invalid(
            "upload.multipart_part_size",
            "must be between 5MiB and 5GiB (S3's part size limits)",
        ));
    }
    let max_requests_per_second = match raw.max_requests_per_second {
        Some(r) if !(r.is_finite() && r > 0.0) => {
            return Err(invalid(
                "upload.max_requests_per_second",
                "must be a positive number of requests per second (or left out: no cap)",
            ));
        }
        r => r,
    };
    // 0 turns the hold off (every other duration of ours must be positive).
    let off = |v: &str| v == "0" || humantime::parse_duration(v).is_ok_and(|d| d.is_zero());
    let hold_after_close = match raw.hold_after_close {
        Some(v) if off(v.trim()) => std::time::Duration::ZERO,
        v => duration("upload.hold_after_close", v, "1s")?,
    };
    if hold_after_close > std::time::Duration::from_secs(60) {
        return Err(invalid(
            "upload.hold_after_close",
            "must be at most 60s: every new file waits this long before its upload (1s covers spam checkers that answer at once; a slower one's rejections are deleted from the bucket right after their upload)",
        ));
    }
    Ok(UploadConfig {
        max_requests_per_second,
        concurrency,
        multipart_threshold,
        multipart_part_size,
        include_url_cache: raw.include_url_cache.unwrap_or(false),
        max_backoff: duration("upload.max_backoff", raw.max_backoff, "5m")?,
        settle: duration("upload.settle", raw.settle, "2s")?,
        hold_after_close,
        failed_retry_interval: duration(
            "upload.failed_retry_interval",
            raw.failed_retry_interval,
            "10m",
        )?,
        heal_bad_local_copies: raw.heal_bad_local_copies.unwrap_or(true),
    })
}
