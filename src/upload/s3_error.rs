//! Classification of S3 errors: the single place that looks inside the SDK's error types, and
//! the hints that turn a provider's answer into the config key to fix.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// How a failed request should be treated by whoever decides about retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying later: 5xx, 429/SlowDown, timeouts, connection failures, a changed body.
    Transient,
    /// Retrying will not help until the operator fixes something (403, NoSuchBucket, bad config).
    Permanent,
    /// The object (or bucket, for HEAD) does not exist.
    NotFound,
}

/// A failed S3 call, classified. Its message names the step, the key, the provider's answer and a
/// likely fix; it never contains a secret.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target} failed: {detail}{hint}")]
pub struct S3Error {
    pub op: &'static str,
    pub target: String,
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub(super) detail: String,
    pub(super) hint: String,
}

impl S3Error {
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// Classifies an SDK error. The single place that looks inside SDK error types.
pub(super) fn classify<E>(
    op: &'static str,
    target: &str,
    endpoint: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    // Without credentials the request never leaves: the SDK reports a dispatch failure, which
    // would read as "cannot connect, check s3.endpoint_url", with a multi-line chain. Say what it is.
    if let Some(cred) = credentials_error(&err) {
        use aws_credential_types::provider::error::CredentialsError;
        let (kind, detail, hint) = match cred {
            CredentialsError::CredentialsNotLoaded(_) => (
                ErrorKind::Permanent,
                "no S3 credentials found".to_owned(),
                "set s3.access_key_id and s3.secret_access_key, or provide AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
            ),
            // A provider that failed (instance metadata timed out, …) may work next time.
            other => (
                ErrorKind::Transient,
                format!("loading S3 credentials failed: {}", one_line(other)),
                "check the AWS credential provider (AWS_PROFILE, web identity, instance role) or set s3.access_key_id and s3.secret_access_key",
            ),
        };
        return S3Error {
            op,
            target: target.to_owned(),
            kind,
            status,
            code,
            detail,
            hint: format!(" — {hint}"),
        };
    }
    let (kind, detail) = match &err {
        SdkError::TimeoutError(_) => (ErrorKind::Transient, "timed out".to_owned()),
        SdkError::DispatchFailure(f) => {
            let what = if f.is_timeout() {
                "connection timed out"
            } else if broke_mid_request(&err) {
                "the connection broke during the request"
            } else {
                "cannot connect"
            };
            (
                ErrorKind::Transient,
                format!("{what} to {endpoint}: {}", source_chain(&err)),
            )
        }
        SdkError::ResponseError(_) => (
            ErrorKind::Transient,
            format!(
                "unreadable response (HTTP {}): {}",
                status.unwrap_or(0),
                source_chain(&err)
            ),
        ),
        SdkError::ConstructionFailure(_) => (ErrorKind::Permanent, source_chain(&err)),
        _ => {
            let kind = match (status, code.as_deref()) {
                (
                    _,
                    Some(
                        "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"
                        | "BadDigest",
                    ),
                ) => ErrorKind::Transient,
                (Some(s), _) if s >= 500 || s == 429 || s == 408 => ErrorKind::Transient,
                (_, Some("NoSuchKey" | "NotFound")) => ErrorKind::NotFound,
                (Some(404), None) => ErrorKind::NotFound,
                _ => ErrorKind::Permanent,
            };
            let mut msg = err.message().unwrap_or("").to_owned();
            if msg.is_empty() && status.is_some_and(|s| (200..300).contains(&s)) {
                // A success answer the SDK could not read (e.g. SeaweedFS repeating a
                // single-value header) has no code or message: "HTTP 200" alone said nothing.
                msg = format!("the answer could not be read: {}", source_chain(&err));
            }
            let detail = format!(
                "HTTP {} {}{}{}",
                status.map_or("?".into(), |s| s.to_string()),
                code.as_deref().unwrap_or(""),
                if msg.is_empty() { "" } else { ": " },
                msg
            );
            (kind, detail.trim_end().to_owned())
        }
    };
    let hint = match &err {
        SdkError::DispatchFailure(f) if !f.is_timeout() && broke_mid_request(&err) => Some(
            "the server or something on the way (proxy, load balancer, NAT) closed the connection; it is retried. If it keeps happening, check their logs and idle timeouts",
        ),
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            Some("check s3.endpoint_url and that the server is up and reachable")
        }
        _ => hint(op, status, code.as_deref()),
    };
    let hint = hint.map(|h| format!(" — {h}")).unwrap_or_default();
    S3Error {
        op,
        target: target.to_owned(),
        kind,
        status,
        code,
        detail,
        hint,
    }
}

/// Whether a request that got no answer failed on a connection that was up (reset, closed
/// mid-request) rather than while connecting. The HTTP client reports both as a dispatch failure;
/// only a failure to connect (refused, DNS, TLS handshake) points at `s3.endpoint_url`.
fn broke_mid_request(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut exchange = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(client) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            return !client.is_connect();
        }
        // hyper's own errors come from the HTTP exchange; connecting fails below hyper.
        exchange |= e.is::<hyper::Error>();
        cur = e.source();
    }
    exchange
}

/// The credential provider's error, if that is why the request failed.
fn credentials_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a aws_credential_types::provider::error::CredentialsError> {
    let mut cur = err.source();
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// An error and its sources on one line (the SDK's credential chain lists providers on lines).
fn one_line(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn source_chain(err: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

fn hint(op: &str, status: Option<u16>, code: Option<&str>) -> Option<&'static str> {
    Some(match (status, code) {
        (_, Some("InvalidAccessKeyId")) => {
            "the access key is unknown to the provider: check s3.access_key_id (or AWS_ACCESS_KEY_ID)"
        }
        (_, Some("SignatureDoesNotMatch")) => {
            "check s3.secret_access_key; if it is right, check s3.region_name and s3.force_path_style"
        }
        (_, Some("RequestTimeTooSkewed")) => {
            "this machine's clock is off; sync it (e.g. systemd-timesyncd or chrony)"
        }
        (_, Some("AccessDenied")) => {
            "the credentials lack permission on this bucket/prefix (need s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject)"
        }
        (_, Some("NoSuchBucket")) => {
            "the bucket does not exist at this endpoint: check s3.bucket, s3.endpoint_url and s3.region_name"
        }
        (
            _,
            Some(
                "PermanentRedirect"
                | "AuthorizationHeaderMalformed"
                | "IllegalLocationConstraintException",
            ),
        ) => "the bucket is in another region: set s3.region_name",
        (_, Some("InvalidStorageClass")) => {
            "this provider does not accept s3.storage_class; remove it or pick one it supports"
        }
        (_, Some("BadDigest")) => {
            "the file changed while it was being sent; it will be uploaded again"
        }
        (_, Some("XAmzContentSHA256Mismatch" | "InvalidDigest")) => {
            "the provider rejects checksum headers: set s3.request_checksum_calculation: when_required"
        }
        (Some(403), None) => {
            "access denied: check s3.access_key_id / s3.secret_access_key and the bucket policy"
        }
        (Some(404), _) if op == "HEAD bucket" => {
            "the bucket does not exist at this endpoint: check s3.bucket, s3.endpoint_url and s3.region_name"
        }
        (Some(301), _) => "the bucket is in another region: set s3.region_name",
        (Some(400), _) if op == "HEAD bucket" => {
            "the provider refused the request: check s3.region_name and s3.force_path_style"
        }
        _ => return None,
    })
}

/// The file could not be opened for streaming (gone or unreadable): transient, the caller re-stats.
pub(super) fn read_error(op: &'static str, key: &str, e: impl std::fmt::Display) -> S3Error {
    S3Error {
        op,
        target: key.to_owned(),
        kind: ErrorKind::Transient,
        status: None,
        code: None,
        detail: format!("cannot read the local file: {e}"),
        hint: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_key_to_fix() {
        assert!(
            hint("PUT", Some(403), Some("InvalidAccessKeyId"))
                .unwrap()
                .contains("s3.access_key_id")
        );
        assert!(
            hint("HEAD bucket", Some(404), None)
                .unwrap()
                .contains("s3.bucket")
        );
        assert!(hint("PUT", Some(500), Some("InternalError")).is_none());
    }
}
