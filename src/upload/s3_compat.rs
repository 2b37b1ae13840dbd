//! What the provider conformance matrix (scripts/test-providers.sh) found in S3-compatible servers,
//! handled in one place: a response the SDK would refuse, and a success answer for bytes other
//! than the ones sent.

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::types::ServerSideEncryption;

/// SSE-C response headers the SDK reads as exactly one value.
const SSE_C_HEADERS: &[&str] = &[
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key-md5",
];

/// SeaweedFS (4.48) answers HEAD and GET of an SSE-C object with the key's MD5 header twice
/// (`x, x`); the SDK refuses a repeated single-value header, so every HEAD of such an object
/// failed with "HTTP 200" and nothing was ever confirmed. Identical repeats are collapsed into one
/// value; differing ones are left for the SDK to refuse.
#[derive(Debug)]
pub(super) struct CollapseRepeatedSseHeaders;

impl Intercept for CollapseRepeatedSseHeaders {
    fn name(&self) -> &'static str {
        "CollapseRepeatedSseHeaders"
    }

    fn modify_before_deserialization(
        &self,
        ctx: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let headers = ctx.response_mut().headers_mut();
        for name in SSE_C_HEADERS {
            if let Some(one) = collapse(headers.get_all(name)) {
                headers.insert(*name, one);
            }
        }
        Ok(())
    }
}

/// The single value of a header given more than once (several fields, or comma-separated) with
/// the same value each time; `None` when it is given once, never, or with different values.
fn collapse<'a>(fields: impl Iterator<Item = &'a str>) -> Option<String> {
    let values: Vec<&str> = fields.flat_map(|f| f.split(',')).map(str::trim).collect();
    match values.split_first() {
        Some((first, rest)) if !rest.is_empty() && rest.iter().all(|v| v == first) => {
            Some((*first).to_owned())
        }
        _ => None,
    }
}

/// Whether the ETag a PUT (or part) was answered with proves the provider stored other bytes than
/// the ones whose MD5 is `md5`. Only a plain MD5-shaped ETag of an object without SSE-C or SSE-KMS
/// can (S3 documents the ETag of those as the MD5 of the content); anything else proves nothing.
///
/// s3rver stores an aws-chunked body (checksum trailers, `request_checksum_calculation:
/// when_supported`) as it came, chunk signatures included, and answers 200 without checking
/// `Content-MD5`: without this check the damaged object was recorded as verified, and its
/// `x-amz-meta-md5` (ours) would let the sweep confirm it and delete the only good copy.
pub(super) fn etag_contradicts(
    etag: Option<&str>,
    md5: &[u8; 16],
    sse: Option<&ServerSideEncryption>,
    sse_c: bool,
) -> bool {
    let Some(etag) = etag.map(|e| e.trim_matches('"')) else {
        return false;
    };
    let plain_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
    let md5_etag = !sse_c && matches!(sse, None | Some(ServerSideEncryption::Aes256));
    plain_md5 && md5_etag && !etag.eq_ignore_ascii_case(&hex::encode(md5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_repeats_collapse_and_others_stay() {
        assert_eq!(collapse(["a, a"].into_iter()).as_deref(), Some("a"));
        assert_eq!(collapse(["a", "a"].into_iter()).as_deref(), Some("a"));
        assert_eq!(collapse(["a"].into_iter()), None);
        assert_eq!(collapse(["a, b"].into_iter()), None);
        assert_eq!(collapse(std::iter::empty()), None);
    }

    #[test]
    fn only_a_plain_md5_etag_can_contradict() {
        let md5 = [0x11; 16];
        let same = hex::encode(md5);
        let other = hex::encode([0x22; 16]);
        assert!(!etag_contradicts(
            Some(&format!("\"{same}\"")),
            &md5,
            None,
            false
        ));
        assert!(etag_contradicts(
            Some(&format!("\"{other}\"")),
            &md5,
            None,
            false
        ));
        let aes = ServerSideEncryption::Aes256;
        assert!(etag_contradicts(Some(&other), &md5, Some(&aes), false));
        // SSE-KMS and SSE-C ETags are not MD5s; multipart ETags and odd ones prove nothing.
        let kms = ServerSideEncryption::AwsKms;
        assert!(!etag_contradicts(Some(&other), &md5, Some(&kms), false));
        assert!(!etag_contradicts(Some(&other), &md5, None, true));
        assert!(!etag_contradicts(
            Some(&format!("{other}-3")),
            &md5,
            None,
            false
        ));
        assert!(!etag_contradicts(Some("abc"), &md5, None, false));
        assert!(!etag_contradicts(None, &md5, None, false));
    }
}
