//! The bucket: an `aws-sdk-s3` client configured for S3-compatible providers, and the few calls we
//! make (HEAD, PUT, multipart), with every SDK error classified once, here.
//!
//! Retries: the SDK's standard retry layer is the only one for a single request
//! (`s3.max_attempts`, default 3 attempts with the SDK's jittered exponential backoff). Nothing in
//! this module loops around it. Throttling answers on any attempt also reach the client's
//! [`Limiter`] (through an interceptor), which slows every upload, not just the refused one. Every request has `s3.connect_timeout` and an attempt timeout of
//! `s3.request_timeout`.
//!
//! Checksums: by default (`when_required`) no `x-amz-checksum-*` headers and no aws-chunked bodies
//! are sent, which B2, R2, OVH and older MinIO reject. Integrity comes from `Content-MD5` instead,
//! which every S3 implementation checks, and the digest is also stored as `x-amz-meta-md5`, because
//! the ETag is not an MD5 for multipart or SSE-C objects.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::md5::Md5;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::config::{ChecksumMode, S3Config};

use super::limiter::{Limiter, ThrottleInterceptor};
use super::s3_compat::{CollapseRepeatedSseHeaders, etag_contradicts};
pub use super::s3_error::{ErrorKind, S3Error};
use super::s3_error::{classify, read_error};

/// User-metadata key holding the hex MD5 of the whole file (`x-amz-meta-md5`).
pub const META_MD5: &str = "md5";
/// Marks the keys of `check`'s probe objects (never a Synapse media path).
pub const PROBE_MARK: &str = "synapse-s3-offload-check-";
/// Parts uploaded at once for one multipart upload.
pub const PART_CONCURRENCY: usize = 4;
/// The limiter's ceiling until the runner of uploads sets `upload.concurrency`.
const START_CAP: usize = 8;
/// S3 accepts at most this many parts in one multipart upload.
pub const MAX_PARTS: u64 = 10_000;

/// The part size for a file of `size` bytes: `configured`, unless the file would need more than
/// [`MAX_PARTS`] parts (above 156 GiB with the default 16 MiB): then the smallest whole number of
/// MiB that fits, instead of a rejection at part 10 001 after uploading the first 156 GiB. Hashing
/// ([`crate::upload::digest`]) and sending both use this, so their part boundaries agree.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    if size.div_ceil(configured) <= MAX_PARTS {
        configured
    } else {
        size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20
    }
}

/// What a HEAD says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Digest from our `x-amz-meta-md5`, when the object carries it.
    pub meta_md5: Option<[u8; 16]>,
    /// The ETag without quotes; equals the hex MD5 only for single-part, non-SSE-C uploads.
    pub etag: Option<String>,
}

impl ObjectInfo {
    /// Whether this object is certainly the file with this size and MD5: same size, and the digest
    /// matches our metadata or (for objects other tools uploaded in one part) the ETag. An ETag that
    /// is not an MD5 (multipart, SSE-C) never equals one, so it cannot confirm a wrong object.
    pub fn confirms(&self, size: u64, md5: &[u8; 16]) -> bool {
        if self.size != size {
            return false;
        }
        match self.meta_md5 {
            Some(m) => &m == md5,
            None => self
                .etag
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(&hex::encode(md5))),
        }
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Without quotes. An MD5 only for single-part objects without SSE-C/KMS; S3 servers that do
    /// not compute one (s3s-fs) leave it out.
    pub etag: Option<String>,
    pub last_modified_ms: Option<i64>,
}

/// A request's answer, with "no such object" as `None` rather than an error.
fn absent_as_none<T>(r: Result<T, S3Error>) -> Result<Option<T>, S3Error> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A path that opens `file` itself again, whatever happened to its name since: the SDK streams a
/// body from a path (and opens it again for each retry or part), and the media path may have been
/// swapped for a symlink or another file since it was opened without following symlinks and
/// hashed. `/proc/self/fd/N` names the open file, not the path.
fn fd_path(file: &File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Adds the SSE-C headers to any request builder that takes them (PUT, HEAD, parts).
macro_rules! with_sse {
    ($req:ident, $sse:expr) => {
        if let Some(s) = &$sse {
            $req = $req
                .sse_customer_algorithm(&s.algo)
                .sse_customer_key(&s.key_b64)
                .sse_customer_key_md5(&s.key_md5_b64);
        }
    };
}

/// SSE-C headers, precomputed. The key never reaches a log: no Debug/Display.
struct SseC {
    algo: String,
    key_b64: String,
    key_md5_b64: String,
}

/// The configured bucket.
pub struct ObjectStore {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    storage_class: Option<StorageClass>,
    sse: Option<SseC>,
    part_size: u64,
    limiter: Arc<Limiter>,
    /// `request_checksum_calculation: when_supported` (aws-chunked bodies with trailers).
    checksum_trailers: bool,
    /// Multipart uploads created and neither completed nor aborted yet (upload id → key): an
    /// upload dropped at shutdown leaves its entry here for [`ObjectStore::abort_abandoned`].
    multiparts: multipart::InFlight,
}

impl ObjectStore {
    /// Builds the client. Does not contact the provider (see [`ObjectStore::check_bucket`]).
    pub async fn new(cfg: &S3Config, part_size: u64) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        let region = cfg.region_name.clone().or_else(|| {
            // Custom endpoints rarely care about the region; don't make the SDK probe IMDS for one.
            std::env::var("AWS_REGION")
                .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                .ok()
                .or_else(|| cfg.endpoint_url.as_ref().map(|_| "us-east-1".to_owned()))
        });
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        if let (Some(ak), Some(sk)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            let token = cfg.session_token.as_ref().map(|t| t.expose().to_owned());
            loader = loader.credentials_provider(Credentials::new(
                ak,
                sk.expose(),
                token,
                None,
                "config",
            ));
        }
        let sdk = loader.load().await;
        let limiter = Limiter::new(START_CAP);
        let checksum = |m| matches!(m, ChecksumMode::WhenSupported);
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.force_path_style)
            .request_checksum_calculation(if checksum(cfg.request_checksum_calculation) {
                RequestChecksumCalculation::WhenSupported
            } else {
                RequestChecksumCalculation::WhenRequired
            })
            .response_checksum_validation(if checksum(cfg.response_checksum_validation) {
                ResponseChecksumValidation::WhenSupported
            } else {
                ResponseChecksumValidation::WhenRequired
            })
            .interceptor(CollapseRepeatedSseHeaders)
            .retry_config(RetryConfig::standard().with_max_attempts(cfg.max_attempts))
            .interceptor(ThrottleInterceptor(limiter.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .read_timeout(cfg.request_timeout)
                    .operation_attempt_timeout(cfg.request_timeout)
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint_url {
            b = b.endpoint_url(ep);
        }
        let sse = cfg.sse_customer_key.as_ref().map(|k| SseC {
            algo: cfg.sse_customer_algo.clone(),
            key_b64: B64.encode(k.expose().as_bytes()),
            key_md5_b64: B64.encode(Md5::digest(k.expose().as_bytes())),
        });
        ObjectStore {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            endpoint: cfg.endpoint_url.clone().unwrap_or_else(|| "AWS S3".into()),
            storage_class: cfg.storage_class.as_deref().map(StorageClass::from),
            sse,
            part_size,
            limiter,
            checksum_trailers: checksum(cfg.request_checksum_calculation),
            multiparts: multipart::InFlight::default(),
        }
    }

    /// The limit on uploads in flight through this client, fed by its throttling answers.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn err<E>(
        &self,
        op: &'static str,
        target: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut err = classify(op, target, &self.endpoint, e);
        // A provider that does not take aws-chunked bodies with a checksum trailer answers 400
        // with its own words (Garage: "Invalid payload signature"; B2: "Unsupported header
        // x-amz-sdk-checksum-algorithm"): name the setting that sends them.
        if self.checksum_trailers
            && err.status == Some(400)
            && matches!(op, "PUT" | "UploadPart")
            && !err.hint.contains("request_checksum_calculation")
        {
            err.hint = " — request_checksum_calculation: when_supported sends aws-chunked bodies with checksum trailers, which this provider may not accept: set s3.request_checksum_calculation: when_required (the default)".into();
        }
        err
    }

    /// HEAD bucket: fails fast on a wrong bucket, bad credentials or an unreachable endpoint.
    pub async fn check_bucket(&self) -> Result<(), S3Error> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| self.err("HEAD bucket", &self.bucket, e))?;
        Ok(())
    }

    /// GET of a whole (small) object; used by `check`'s probe.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, S3Error> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        with_sse!(req, self.sse);
        let out = req.send().await.map_err(|e| self.err("GET", key, e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| read_error("GET", key, e))?;
        Ok(body.into_bytes())
    }

    /// DELETE of `check`'s own probe object. The daemon never deletes media objects: this refuses
    /// any key that is not a probe.
    pub async fn delete_probe(&self, key: &str) -> Result<(), S3Error> {
        assert!(
            key.contains(PROBE_MARK),
            "only check's probe objects are ever deleted"
        );
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err("DELETE", key, e))?;
        Ok(())
    }

    /// DELETE of an orphaned media object (`audit --delete-orphans`, the only deletion of media
    /// objects). The key is derived from a validated path, so it is always under our prefix.
    pub async fn delete_media(&self, path: &crate::layout::MediaPath) -> Result<(), S3Error> {
        let key = path.key(&self.prefix);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.err("DELETE", &key, e))?;
        Ok(())
    }

    /// GET of a whole object as a stream (healing a bad local copy from its verified object).
    /// `None` when there is no such object.
    pub async fn get_stream(&self, key: &str) -> Result<Option<ByteStream>, S3Error> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        with_sse!(req, self.sse);
        let out = req.send().await.map_err(|e| self.err("GET", key, e));
        Ok(absent_as_none(out)?.map(|out| out.body))
    }

    /// HEAD of `key`: `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
        let mut req = self.client.head_object().bucket(&self.bucket).key(key);
        with_sse!(req, self.sse);
        self.limiter.pace().await;
        let out = req.send().await.map_err(|e| self.err("HEAD", key, e));
        Ok(absent_as_none(out)?.map(|out| ObjectInfo {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            meta_md5: out
                .metadata()
                .and_then(|m| m.get(META_MD5))
                .and_then(|h| hex::decode(h).ok())
                .and_then(|v| v.try_into().ok()),
            etag: out.e_tag().map(|e| e.trim_matches('"').to_owned()),
        }))
    }

    /// One PUT of an in-memory body. The server checks `Content-MD5` against what it received.
    pub async fn put_bytes(&self, key: &str, body: Bytes, md5: &[u8; 16]) -> Result<(), S3Error> {
        let len = body.len() as u64;
        self.put(key, ByteStream::from(body), len, md5).await
    }

    /// One PUT streamed from `file` (too large to hold in memory, below the multipart threshold).
    /// `Content-MD5` makes the provider reject the body if the file changed since hashing.
    pub async fn put_file(
        &self,
        key: &str,
        file: &File,
        size: u64,
        md5: &[u8; 16],
    ) -> Result<(), S3Error> {
        let body = ByteStream::read_from()
            .path(fd_path(file))
            .length(Length::Exact(size))
            .buffer_size(256 * 1024)
            .build()
            .await
            .map_err(|e| read_error("PUT", key, e))?;
        self.put(key, body, size, md5).await
    }

    async fn put(
        &self,
        key: &str,
        body: ByteStream,
        size: u64,
        md5: &[u8; 16],
    ) -> Result<(), S3Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size as i64)
            .content_md5(B64.encode(md5))
            .metadata(META_MD5, hex::encode(md5))
            .set_storage_class(self.storage_class.clone())
            .body(body);
        with_sse!(req, self.sse);
        // UNSIGNED-PAYLOAD instead of a SHA-256 of the body in the signature: the signed
        // Content-MD5 header already binds the body (the server rejects any other), and hashing
        // every in-memory body a second time was the largest CPU cost per file in the profile.
        // Bodies streamed from disk are never payload-signed by the SDK anyway.
        self.limiter.pace().await;
        let out = req
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.err("PUT", key, e))?;
        self.check_etag("PUT", key, out.e_tag(), md5, out.server_side_encryption())
    }

    /// Refuses a success answer whose ETag proves other bytes were stored (see
    /// [`etag_contradicts`]): the file is not recorded, and the error names the likely cause.
    fn check_etag(
        &self,
        op: &'static str,
        key: &str,
        etag: Option<&str>,
        md5: &[u8; 16],
        sse: Option<&aws_sdk_s3::types::ServerSideEncryption>,
    ) -> Result<(), S3Error> {
        if !etag_contradicts(etag, md5, sse, self.sse.is_some()) {
            return Ok(());
        }
        Err(S3Error {
            op,
            target: key.to_owned(),
            kind: ErrorKind::Permanent,
            status: None,
            code: None,
            detail: format!(
                "the provider answered with ETag {} for a body whose MD5 is {}: it stored other bytes than were sent (and did not check Content-MD5)",
                etag.unwrap_or_default(),
                hex::encode(md5)
            ),
            hint: if self.checksum_trailers {
                " — the provider stores aws-chunked bodies as they came (checksum trailers): set s3.request_checksum_calculation: when_required".into()
            } else {
                " — the upload is tried again; if it keeps happening, the provider corrupts uploads"
                    .into()
            },
        })
    }

    /// Multipart upload of `file`, streamed part by part from disk with each part's
    /// `Content-MD5` (computed beforehand by [`crate::upload::digest`]). Aborted on any failure so no
    /// half-upload lingers; one dropped mid-way (the shutdown's grace ended) stays registered and
    /// is aborted by [`ObjectStore::abort_abandoned`]. A crash or `kill -9` can still leave one:
    /// `check` and `audit` list them, a bucket lifecycle rule cleans them.
    pub async fn put_multipart(
        &self,
        key: &str,
        file: &File,
        size: u64,
        md5: &[u8; 16],
        part_md5s: &[[u8; 16]],
    ) -> Result<(), S3Error> {
        let part_size = part_size_for(size, self.part_size);
        if part_md5s.len() as u64 != size.div_ceil(part_size) {
            // Hashed with another plan: the file's size changed between its stat and its read
            // across the 10 000-part boundary. Retried with a fresh look at the file.
            return Err(read_error(
                "CreateMultipartUpload",
                key,
                "the file changed while it was read",
            ));
        }
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .metadata(META_MD5, hex::encode(md5))
            .set_storage_class(self.storage_class.clone());
        with_sse!(req, self.sse);
        let created = req
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(S3Error {
                op: "CreateMultipartUpload",
                target: key.to_owned(),
                kind: ErrorKind::Transient,
                status: None,
                code: None,
                detail: "the provider returned no upload id".into(),
                hint: String::new(),
            });
        };
        // Registered before the first part: from here on a dropped future leaves the id behind.
        // (Dropped while CreateMultipartUpload is in flight, the id is never known: only the
        // lifecycle rule cleans that one.)
        self.multiparts.insert(&upload_id, key);
        let path = fd_path(file);
        let result = self
            .upload_parts(key, &upload_id, &path, size, part_size, part_md5s)
            .await;
        let result = match result {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.err("CompleteMultipartUpload", key, e)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Best effort: the error that matters is the one we return.
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send();
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), abort)
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                tracing::warn!(key, error = %e, "Could not abort the failed multipart upload; a lifecycle rule will clean it.");
            }
        }
        self.multiparts.remove(&upload_id);
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        part_md5s: &[[u8; 16]],
    ) -> Result<Vec<CompletedPart>, S3Error> {
        let mut parts: Vec<CompletedPart> =
            futures::stream::iter(part_md5s.iter().copied().enumerate())
                .map(|(i, part_md5)| async move {
                    let offset = i as u64 * part_size;
                    let len = part_size.min(size - offset);
                    let number = i as i32 + 1;
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(offset)
                        .length(Length::Exact(len))
                        .buffer_size(256 * 1024)
                        .build()
                        .await
                        .map_err(|e| read_error("UploadPart", key, e))?;
                    let mut req = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(len as i64)
                        .content_md5(B64.encode(part_md5))
                        .body(body);
                    with_sse!(req, self.sse);
                    self.limiter.pace().await;
                    let out = req
                        .send()
                        .await
                        .map_err(|e| self.err("UploadPart", key, e))?;
                    let sse = out.server_side_encryption();
                    self.check_etag("UploadPart", key, out.e_tag(), &part_md5, sse)?;
                    Ok::<_, S3Error>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag().map(str::to_owned))
                            .build(),
                    )
                })
                .buffer_unordered(PART_CONCURRENCY)
                .try_collect()
                .await?;
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

mod list;
mod multipart;

pub use self::multipart::{ABANDONED_WITHIN, Incomplete, IncompleteUploads};

#[cfg(test)]
#[path = "s3_tests.rs"]
mod tests;
