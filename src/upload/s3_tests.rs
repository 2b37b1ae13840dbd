//! Unit tests of `s3.rs` (the part plan, what a HEAD confirms).

use super::*;

#[test]
fn part_plan_stays_within_s3_limits() {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    // A 5 GiB file: 1024 parts of 5 MiB, or 320 of 16 MiB (the default).
    assert_eq!(part_size_for(5 * GIB, 5 * MIB), 5 * MIB);
    assert_eq!((5 * GIB).div_ceil(part_size_for(5 * GIB, 5 * MIB)), 1024);
    assert_eq!((5 * GIB).div_ceil(part_size_for(5 * GIB, 16 * MIB)), 320);
    // Exactly 10 000 parts still fits; one byte more takes a larger part.
    assert_eq!(part_size_for(10_000 * 16 * MIB, 16 * MIB), 16 * MIB);
    assert_eq!(part_size_for(10_000 * 16 * MIB + 1, 16 * MIB), 17 * MIB);
    // Up to S3's largest object (5 TiB), parts stay within 5 MiB..5 GiB and 10 000.
    for size in [200 * GIB, 1024 * GIB, 5 * 1024 * GIB] {
        for configured in [5 * MIB, 16 * MIB, 5 * GIB] {
            let p = part_size_for(size, configured);
            assert!(p >= configured && p <= 5 * GIB, "{size} {configured}: {p}");
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size} {configured}: {p}");
        }
    }
}

#[test]
fn confirms_needs_size_and_digest() {
    let md5 = [0xab; 16];
    let info = |size, meta, etag: Option<&str>| ObjectInfo {
        size,
        meta_md5: meta,
        etag: etag.map(str::to_owned),
    };
    assert!(info(10, Some(md5), None).confirms(10, &md5));
    assert!(!info(11, Some(md5), None).confirms(10, &md5));
    assert!(
        !info(10, Some([0; 16]), Some(&hex::encode(md5))).confirms(10, &md5),
        "metadata wins over ETag"
    );
    assert!(info(10, None, Some(&hex::encode(md5).to_uppercase())).confirms(10, &md5));
    assert!(!info(10, None, Some("abababab-2")).confirms(10, &md5));
    assert!(!info(10, None, None).confirms(10, &md5));
}
