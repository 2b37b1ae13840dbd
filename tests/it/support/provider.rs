//! Which S3 implementation the tests run against (`SSO_PROVIDER`, set by
//! scripts/test-providers.sh; s3s-fs when unset, as scripts/test.sh runs it), and what each one
//! supports. The endpoint and credentials still come from `SSO_TEST_S3_*` ([`super::s3_env`]).
//!
//! A check a server cannot do is skipped for that server only, and never silently: [`skip`]
//! prints the reason and appends it to `SSO_TEST_SKIP_LOG`, from which the script's table is made.

use std::io::Write as _;

/// The S3 servers the conformance suite knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    S3sFs,
    Garage,
    SeaweedFs,
    Moto,
    S3rver,
}

/// What a check needs from a server beyond PUT/HEAD/GET/LIST/DELETE and multipart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// SSE-C: objects written with a customer key, readable only with it.
    SseC,
    /// `x-amz-storage-class` kept and reported back by HEAD.
    StorageClasses,
    /// SigV4 signatures verified (a wrong secret is refused).
    Signatures,
    /// aws-chunked bodies with a checksum trailer (`request_checksum_calculation: when_supported`).
    ChecksumTrailers,
    /// Objects survive a restart of the server.
    Persistence,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::S3sFs => "s3s-fs",
            Provider::Garage => "garage",
            Provider::SeaweedFs => "seaweedfs",
            Provider::Moto => "moto",
            Provider::S3rver => "s3rver",
        }
    }

    /// `None` when the server has `f`, else why not (verified against the server, see README).
    pub fn lacks(self, f: Feature) -> Option<&'static str> {
        use Feature::*;
        use Provider::*;
        match (self, f) {
            (S3sFs, SseC) => {
                Some("s3s-fs 0.14 accepts SSE-C headers but stores objects unencrypted")
            }
            (S3sFs, StorageClasses) => {
                Some("s3s-fs 0.14 refuses STANDARD_IA (InvalidStorageClass) and reports no class")
            }
            (Garage, StorageClasses) => Some("Garage has no storage classes"),
            (Moto, Persistence) => {
                Some("moto keeps everything in memory: a restart loses every bucket")
            }
            (Moto, SseC) => {
                Some("moto accepts SSE-C headers but serves the object without the key")
            }
            (S3rver, SseC) => {
                Some("s3rver accepts SSE-C headers but serves the object without the key")
            }
            (S3rver, Signatures) => Some("s3rver does not verify signatures"),
            (Garage, ChecksumTrailers) => Some(
                "Garage 2.5 refuses aws-chunked bodies with an unsigned checksum trailer (400 Invalid payload signature)",
            ),
            (S3rver, ChecksumTrailers) => Some(
                "s3rver stores an aws-chunked body with its chunk framing, unchecked: with trailers every streamed object is damaged",
            ),
            _ => None,
        }
    }
}

/// The provider named by `SSO_PROVIDER` (default s3s-fs). An unknown name is a failure.
pub fn provider() -> Provider {
    match std::env::var("SSO_PROVIDER").as_deref() {
        Err(_) | Ok("") | Ok("s3s-fs") => Provider::S3sFs,
        Ok("garage") => Provider::Garage,
        Ok("seaweedfs") => Provider::SeaweedFs,
        Ok("moto") => Provider::Moto,
        Ok("s3rver") => Provider::S3rver,
        Ok(other) => {
            panic!("SSO_PROVIDER={other:?} is not one of s3s-fs, garage, seaweedfs, moto, s3rver")
        }
    }
}

/// Whether the current provider lacks `f` for `check`; if so, reports the skip (stdout and
/// `SSO_TEST_SKIP_LOG`) so the caller can return. Never a silent pass.
pub fn skip_unless(check: &str, f: Feature) -> bool {
    let p = provider();
    match p.lacks(f) {
        None => false,
        Some(why) => {
            skip(check, &format!("not supported by {}: {why}", p.name()));
            true
        }
    }
}

/// Records that `check` (or a part of it) did not run on this provider, and why.
pub fn skip(check: &str, why: &str) {
    let line = format!("SSO-SKIP\t{}\t{check}\t{why}", provider().name());
    println!("{line}");
    if let Ok(path) = std::env::var("SSO_TEST_SKIP_LOG") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("SSO_TEST_SKIP_LOG {path}: {e}"));
        writeln!(f, "{line}").unwrap();
    }
}
