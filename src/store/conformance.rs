//! The store conformance suite: one set of async checks that every [`ObjectStore`] passes
//! (memory, dir, and S3 against the real local servers), so the fast in-memory store can stand in
//! for S3 in core tests.
//!
//! [`run`] runs every check in sequence; each check is also a `pub async fn check_xxx(store,
//! scratch, profile)`, so a failure names it. `scratch` is a key prefix unique to the run: every
//! key a check writes is under it (each check under `scratch/<check name>/` when run by [`run`]),
//! and checks delete what they write.
//!
//! The expected behaviour is AWS S3's. A [`Profile`] lists the documented gaps of a server
//! (DESIGN.md §10) and relaxes exactly the assertions they affect; the relaxed assertion still
//! checks what the server does do. Nothing else is skipped.
//!
//! Checks panic with a message naming what differs (this is test support code).

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{
    Body, CompletedPart, Condition, ListPage, ListRequest, MIN_PART_SIZE, Metadata, ObjectMeta,
    ObjectStore, PutOptions, Result, StoreError, md5_hex, multipart_etag,
};

/// Documented behaviours of a server that differ from AWS S3 (DESIGN.md §10). Each field relaxes
/// the assertions of the checks it names; `Profile::strict()` relaxes nothing.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub name: &'static str,
    /// `PUT If-Match` on a missing key answers 412 (`PreconditionFailed`) instead of 404
    /// (`NotFound`). Relaxes [`check_conditional_put`]; the object must still not appear.
    pub if_match_missing_is_precondition_failed: bool,
    /// `a//b` is stored as `a/b`. Relaxes [`check_double_slash`]: the object must then be
    /// listed and readable as `a/b`.
    pub collapses_double_slash: bool,
    /// HEAD of `dir/` answers 200 with no marker when objects exist under `dir/`. Relaxes
    /// [`check_list_delimiter`]: such a HEAD may succeed, as an empty object.
    pub implicit_dir_head: bool,
    /// A key cannot be both an object and a prefix (`a` and `a/b`). Relaxes
    /// [`check_object_and_prefix`]: writing the second one may fail, and the first one must then
    /// be intact.
    pub no_object_and_prefix: bool,
    /// After the last object under a prefix is deleted, the prefix stays in CommonPrefixes for
    /// a while. Relaxes [`check_delete`]: the stale prefix may still be listed.
    pub stale_common_prefixes: bool,
    /// A `dir/` key loses a non-empty body. Relaxes [`check_dir_marker_body`]: the marker may
    /// read as empty.
    pub dir_marker_drops_body: bool,
    /// Keys with a `.` or `..` segment (`a/./b`, `a/..`) are refused. Relaxes
    /// [`check_dot_segments`]: the refusal must not be transient and must write nothing.
    pub rejects_dot_segments: bool,
    /// `UploadPartCopy` answers a part ETag that is not the MD5 of the copied bytes (SeaweedFS:
    /// `md5-N` over its internal chunks). Relaxes [`check_upload_part_copy`]: the ETags must
    /// still be what `list_parts` reports, and completing with them must give the exact bytes.
    pub part_copy_etag_not_md5: bool,
    /// Continuing a listing after a page that ends on a non-ASCII key fails (LocalStack 4.14:
    /// HTTP 500, "'ascii' codec can't decode" on its own continuation token). Relaxes
    /// [`check_list_utf8_order`]: such a page may be the last one listed, and every key before
    /// it must be in order.
    pub continuation_after_non_ascii_fails: bool,
    /// Concurrent `If-None-Match: *` creates of one key may all succeed. Relaxes
    /// [`check_conditional_race`]: the object must still be one winner's.
    pub racy_conditional_create: bool,
}

impl Profile {
    /// AWS S3 behaviour, no gaps (memory, dir, LocalStack).
    pub fn strict() -> Profile {
        Profile {
            name: "strict",
            ..Profile::default()
        }
    }

    /// LocalStack 4.14: AWS-faithful on data operations, with one listing bug.
    pub fn localstack() -> Profile {
        Profile {
            name: "localstack",
            continuation_after_non_ascii_fails: true,
            ..Profile::default()
        }
    }

    /// SeaweedFS 4.x (DESIGN.md §10).
    pub fn seaweedfs() -> Profile {
        Profile {
            name: "seaweedfs",
            if_match_missing_is_precondition_failed: true,
            collapses_double_slash: true,
            implicit_dir_head: true,
            no_object_and_prefix: true,
            stale_common_prefixes: true,
            dir_marker_drops_body: true,
            rejects_dot_segments: true,
            part_copy_etag_not_md5: true,
            continuation_after_non_ascii_fails: false,
            racy_conditional_create: false,
        }
    }
}

/// Runs every check in sequence, each under `scratch/<check name>/`.
pub async fn run(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    macro_rules! checks {
        ($($check:ident),* $(,)?) => {$(
            {
                let name = stringify!($check);
                let _guard = Guard { check: name, store: store.describe(), profile: profile.name };
                let started = std::time::Instant::now();
                $check(store, &join(scratch, name.trim_start_matches("check_")), profile).await;
                eprintln!(
                    "conformance [{}] {name}: ok ({:.1} s)",
                    store.describe(),
                    started.elapsed().as_secs_f64()
                );
            }
        )*};
    }
    checks!(
        check_put_get_bytes,
        check_put_get_file,
        check_overwrite,
        check_get_range,
        check_head,
        check_list_delimiter,
        check_list_utf8_order,
        check_list_pagination,
        check_copy,
        check_delete,
        check_conditional_put,
        check_conditional_race,
        check_multipart,
        check_multipart_abort,
        check_multipart_rules,
        check_upload_part_copy,
        check_multipart_conditional,
        check_list_multipart_uploads,
        check_error_kinds,
        check_object_and_prefix,
        check_double_slash,
        check_dir_marker_body,
        check_dot_segments,
        check_long_keys,
    );
}

/// Names the failing check when a check panics.
struct Guard {
    check: &'static str,
    store: String,
    profile: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "conformance check `{}` FAILED on {} (profile {})",
                self.check, self.store, self.profile
            );
        }
    }
}

// ---- helpers ---------------------------------------------------------------------------------

/// Logs that a documented gap of the profile showed up (and its relaxed assertion applies).
fn gap(profile: &Profile, what: &str) {
    eprintln!("conformance: documented {} gap: {what}", profile.name);
}

fn join(scratch: &str, rest: &str) -> String {
    let scratch = scratch.trim_end_matches('/');
    if scratch.is_empty() {
        rest.to_string()
    } else {
        format!("{scratch}/{rest}")
    }
}

/// Deterministic pseudo-random bytes (so a misplaced range shows as a mismatch).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

trait Expect<T> {
    fn expect_ok(self, what: impl fmt::Display) -> T;
}

impl<T> Expect<T> for Result<T> {
    #[track_caller]
    fn expect_ok(self, what: impl fmt::Display) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: unexpected error {e:?}"),
        }
    }
}

/// Asserts that a result is an error of the given kind.
macro_rules! assert_err {
    ($result:expr, $pattern:pat, $($what:tt)+) => {
        match $result {
            Err(e @ $pattern) => e,
            other => panic!(
                "{}: expected Err({}), got {:?}",
                format!($($what)+),
                stringify!($pattern),
                other
            ),
        }
    };
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: impl fmt::Display) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {} (first difference at {first:?})",
            got.len(),
            want.len()
        );
    }
}

fn no_options() -> PutOptions {
    PutOptions::default()
}

async fn put(store: &dyn ObjectStore, key: &str, data: &[u8]) -> String {
    store
        .put(
            key,
            Body::Bytes(Bytes::copy_from_slice(data)),
            &no_options(),
        )
        .await
        .expect_ok(format_args!("put {key:?}"))
}

async fn put_with(store: &dyn ObjectStore, key: &str, data: &[u8], metadata: Metadata) -> String {
    let options = PutOptions {
        condition: Condition::None,
        metadata,
    };
    store
        .put(key, Body::Bytes(Bytes::copy_from_slice(data)), &options)
        .await
        .expect_ok(format_args!("put {key:?}"))
}

/// The whole object, through `head` + `get_range`.
async fn get(store: &dyn ObjectStore, key: &str) -> Bytes {
    let size = store
        .head(key)
        .await
        .expect_ok(format_args!("head {key:?}"))
        .size;
    store
        .get_range(key, 0..size, None)
        .await
        .expect_ok(format_args!("get {key:?} 0..{size}"))
}

async fn delete_all(store: &dyn ObjectStore, keys: impl IntoIterator<Item = String>) {
    futures::stream::iter(keys)
        .map(|key| async move {
            store
                .delete(&key)
                .await
                .expect_ok(format_args!("delete {key:?}"))
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Every page of a listing: (objects, prefixes, pages).
async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    delimiter: Option<&str>,
    max_keys: Option<u32>,
) -> (Vec<ObjectMeta>, Vec<String>, Vec<ListPage>) {
    let mut pages = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let page = store
            .list(ListRequest {
                prefix,
                delimiter,
                continuation: continuation.clone(),
                max_keys,
            })
            .await
            .expect_ok(format_args!(
                "list prefix {prefix:?} delimiter {delimiter:?} after {continuation:?}"
            ));
        if let Some(max) = max_keys {
            let n = page.objects.len() + page.prefixes.len();
            assert!(
                n <= max as usize,
                "list {prefix:?}: page of {n} entries with max_keys {max}"
            );
        }
        let next = page.next.clone();
        pages.push(page);
        assert!(pages.len() < 10_000, "list {prefix:?}: endless pagination");
        match next {
            Some(token) => {
                assert_ne!(
                    Some(&token),
                    continuation.as_ref(),
                    "list {prefix:?}: the continuation token does not advance"
                );
                continuation = Some(token);
            }
            None => break,
        }
    }
    let objects = pages.iter().flat_map(|p| p.objects.clone()).collect();
    let prefixes = pages.iter().flat_map(|p| p.prefixes.clone()).collect();
    (objects, prefixes, pages)
}

fn keys(objects: &[ObjectMeta]) -> Vec<String> {
    objects.iter().map(|o| o.key.clone()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort(); // String order is UTF-8 byte order
    v
}

#[track_caller]
fn assert_recent(t: SystemTime, what: impl fmt::Display) {
    let now = SystemTime::now();
    let skew = Duration::from_secs(600);
    assert!(
        t > now - skew && t < now + skew,
        "{what}: last modified {t:?} is not near now ({now:?})"
    );
}

/// A temp file holding `before` junk bytes, `data`, then junk: a `Body::File` of exactly `data`.
fn file_body(data: &[u8], before: usize) -> (tempfile::NamedTempFile, Body) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&pattern(before, 99))
        .expect("write temp file");
    file.write_all(data).expect("write temp file");
    file.write_all(&pattern(333, 98)).expect("write temp file");
    file.flush().expect("flush temp file");
    let body = Body::File {
        path: file.path().to_path_buf(),
        offset: before as u64,
        len: data.len() as u64,
    };
    (file, body)
}

async fn upload_part(
    store: &dyn ObjectStore,
    key: &str,
    upload_id: &str,
    number: u32,
    data: &[u8],
) -> CompletedPart {
    let etag = store
        .upload_part(
            key,
            upload_id,
            number,
            Body::Bytes(Bytes::copy_from_slice(data)),
        )
        .await
        .expect_ok(format_args!("upload part {number} of {key:?}"));
    assert_eq!(etag, md5_hex(data), "ETag of part {number} of {key:?}");
    CompletedPart { number, etag }
}

// ---- checks ----------------------------------------------------------------------------------

/// PUT from memory and GET back: 0 B, 1 B, ~1 MiB; ETag is the MD5 hex.
pub async fn check_put_get_bytes(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let mut written = Vec::new();
    for (i, len) in [0usize, 1, (1 << 20) + 3].into_iter().enumerate() {
        let key = join(scratch, &format!("size-{len}"));
        let data = pattern(len, i as u64);
        let etag = put(store, &key, &data).await;
        assert_eq!(etag, md5_hex(&data), "ETag returned by put {key:?}");
        let head = store
            .head(&key)
            .await
            .expect_ok(format_args!("head {key:?}"));
        assert_eq!(head.key, key);
        assert_eq!(head.size, len as u64, "size of {key:?}");
        assert_eq!(head.etag, etag, "ETag of {key:?}");
        assert_bytes(&get(store, &key).await, &data, format_args!("get {key:?}"));
        written.push(key);
    }
    delete_all(store, written).await;
}

/// PUT streamed from a range of a local file (the SDK's aws-chunked path) and GET back.
pub async fn check_put_get_file(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let mut written = Vec::new();
    for (i, len) in [0usize, 1, (1 << 20) + 3].into_iter().enumerate() {
        let key = join(scratch, &format!("size-{len}"));
        let data = pattern(len, 10 + i as u64);
        let (_file, body) = file_body(&data, 4097);
        let etag = store
            .put(&key, body, &no_options())
            .await
            .expect_ok(format_args!("put {key:?} from a file"));
        assert_eq!(etag, md5_hex(&data), "ETag returned by put {key:?}");
        let head = store
            .head(&key)
            .await
            .expect_ok(format_args!("head {key:?}"));
        assert_eq!(head.size, len as u64, "size of {key:?}");
        assert_eq!(head.etag, etag, "ETag of {key:?}");
        assert_bytes(&get(store, &key).await, &data, format_args!("get {key:?}"));
        written.push(key);
    }
    // A whole file, from offset 0.
    let key = join(scratch, "whole");
    let data = pattern(70_000, 20);
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&data).expect("write temp file");
    file.flush().expect("flush temp file");
    let body = Body::File {
        path: file.path().to_path_buf(),
        offset: 0,
        len: data.len() as u64,
    };
    let etag = store
        .put(&key, body, &no_options())
        .await
        .expect_ok("put a whole file");
    assert_eq!(etag, md5_hex(&data));
    assert_bytes(&get(store, &key).await, &data, "get a whole file");
    written.push(key);
    delete_all(store, written).await;
}

/// A second PUT replaces the object: bytes, size and ETag, in HEAD and in listings.
pub async fn check_overwrite(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "obj");
    put_with(store, &key, b"first version", meta(&[("v", "1")])).await;
    let etag = put(store, &key, b"second").await;
    assert_eq!(etag, md5_hex(b"second"));
    let head = store.head(&key).await.expect_ok("head");
    assert_eq!((head.size, head.etag.as_str()), (6, etag.as_str()));
    assert!(
        head.metadata.is_empty(),
        "a PUT without metadata replaces the old metadata, got {:?}",
        head.metadata
    );
    assert_bytes(&get(store, &key).await, b"second", "get after overwrite");
    let (objects, _, _) = list_all(store, &join(scratch, ""), None, None).await;
    assert_eq!(keys(&objects), [key.as_str()]);
    assert_eq!(
        (objects[0].size, objects[0].etag.as_str()),
        (6, etag.as_str())
    );
    delete_all(store, [key]).await;
}

/// Ranged reads: clamping, empty reads at and past the end, `If-Match` pinning.
pub async fn check_get_range(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "obj");
    let data = pattern(1000, 3);
    let etag = put(store, &key, &data).await;
    let read = |range: std::ops::Range<u64>, if_match: Option<String>| {
        let key = key.clone();
        async move {
            let what = format!("get_range {key:?} {range:?} if_match {if_match:?}");
            (
                store.get_range(&key, range, if_match.as_deref()).await,
                what,
            )
        }
    };
    for (range, want) in [
        (100..200, &data[100..200]),
        (0..1, &data[..1]),
        (999..1000, &data[999..]),
        (0..1000, &data[..]),
        (900..5000, &data[900..]),
        (0..1_000_000, &data[..]),
        (1000..1010, &[][..]),
        (2000..3000, &[][..]),
        (10..10, &[][..]),
    ] {
        let (result, what) = read(range, None).await;
        assert_bytes(&result.expect_ok(&what), want, &what);
    }
    let (result, what) = read(10..20, Some(etag.clone())).await;
    assert_bytes(&result.expect_ok(&what), &data[10..20], &what);
    let (result, what) = read(10..20, Some(md5_hex(b"another version"))).await;
    assert_err!(result, StoreError::PreconditionFailed(_), "{what}");

    // An empty object reads as empty, whatever the range.
    let empty = join(scratch, "empty");
    let empty_etag = put(store, &empty, b"").await;
    for range in [0..0, 0..10, 5..10] {
        let what = format!("get_range {empty:?} {range:?}");
        let got = store
            .get_range(&empty, range, Some(&empty_etag))
            .await
            .expect_ok(&what);
        assert!(got.is_empty(), "{what}: got {} bytes", got.len());
    }
    let missing = join(scratch, "missing");
    assert_err!(
        store.get_range(&missing, 0..10, None).await,
        StoreError::NotFound(_),
        "get_range of a missing key"
    );
    assert_err!(
        store.get_range(&missing, 0..10, Some(&etag)).await,
        StoreError::NotFound(_),
        "get_range of a missing key with If-Match"
    );
    delete_all(store, [key, empty]).await;
}

/// HEAD: size, ETag, user metadata, last-modified; listings agree; missing keys are `NotFound`.
pub async fn check_head(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "obj");
    let data = pattern(4321, 4);
    let metadata = meta(&[
        ("mode", "100644"),
        ("uid", "1000"),
        ("mtime", "1700000000.5"),
        ("color", "sky blue"),
    ]);
    let etag = put_with(store, &key, &data, metadata.clone()).await;
    let head = store.head(&key).await.expect_ok("head");
    assert_eq!(head.key, key);
    assert_eq!(head.size, 4321);
    assert_eq!(head.etag, md5_hex(&data));
    assert_eq!(head.etag, etag);
    assert_eq!(head.metadata, metadata, "user metadata round trip");
    assert_recent(head.last_modified, "head");

    let (objects, prefixes, _) = list_all(store, &join(scratch, ""), Some("/"), None).await;
    assert!(prefixes.is_empty(), "prefixes {prefixes:?}");
    assert_eq!(keys(&objects), [key.as_str()]);
    let listed = &objects[0];
    assert_eq!((listed.size, listed.etag.as_str()), (4321, etag.as_str()));
    assert_recent(listed.last_modified, "listed");
    let skew = match listed.last_modified.duration_since(head.last_modified) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        skew <= Duration::from_secs(1),
        "listing and HEAD disagree on last modified: {:?} vs {:?}",
        listed.last_modified,
        head.last_modified
    );
    assert!(
        listed.metadata.is_empty(),
        "listings carry no user metadata"
    );

    let missing = join(scratch, "missing");
    let e = assert_err!(
        store.head(&missing).await,
        StoreError::NotFound(_),
        "head of a missing key"
    );
    assert!(e.is_not_found() && !e.is_transient());
    delete_all(store, [key]).await;
}

/// Listing with a prefix and the `/` delimiter: common prefixes, `dir/` markers.
pub async fn check_list_delimiter(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let l = |rest: &str| join(scratch, rest);
    let all = [
        "a.txt", "b/c.txt", "b/d.txt", "dir/", "dir/x", "e/", "f/g/h", "ab",
    ]
    .map(l);
    // Markers are empty (a marker's body is not kept everywhere: see `check_dir_marker_body`).
    let body = |key: &str| -> Vec<u8> {
        if key.ends_with('/') {
            Vec::new()
        } else {
            key.as_bytes().to_vec()
        }
    };
    for key in &all {
        put(store, key, &body(key)).await;
    }
    let root = l("");

    let (objects, prefixes, _) = list_all(store, &root, None, None).await;
    assert!(prefixes.is_empty());
    assert_eq!(
        keys(&objects),
        sorted(all.to_vec()),
        "list without delimiter"
    );
    for o in &objects {
        let want = body(&o.key);
        assert_eq!(o.size, want.len() as u64, "listed size of {:?}", o.key);
        assert_eq!(o.etag, md5_hex(&want), "listed ETag of {:?}", o.key);
    }

    let (objects, prefixes, _) = list_all(store, &root, Some("/"), None).await;
    assert_eq!(
        keys(&objects),
        [l("a.txt"), l("ab")],
        "objects with delimiter"
    );
    assert_eq!(
        prefixes,
        [l("b/"), l("dir/"), l("e/"), l("f/")],
        "common prefixes"
    );

    let (objects, prefixes, _) = list_all(store, &l("dir/"), Some("/"), None).await;
    assert_eq!(
        keys(&objects),
        [l("dir/"), l("dir/x")],
        "a directory with a marker"
    );
    assert!(prefixes.is_empty());
    assert_eq!(objects[0].size, 0);

    let (objects, prefixes, _) = list_all(store, &l("e/"), Some("/"), None).await;
    assert_eq!(keys(&objects), [l("e/")], "a marker alone");
    assert!(prefixes.is_empty());

    let (objects, prefixes, _) = list_all(store, &l("f/"), Some("/"), None).await;
    assert!(objects.is_empty());
    assert_eq!(prefixes, [l("f/g/")], "nested prefixes");

    let (objects, prefixes, _) = list_all(store, &l("d"), Some("/"), None).await;
    assert!(objects.is_empty());
    assert_eq!(
        prefixes,
        [l("dir/")],
        "a prefix that is not a whole segment"
    );

    let (objects, prefixes, _) = list_all(store, &l("a"), Some("/"), None).await;
    assert_eq!(keys(&objects), [l("a.txt"), l("ab")]);
    assert!(prefixes.is_empty());

    let page = store
        .list(ListRequest {
            prefix: &l("nothing-here/"),
            delimiter: Some("/"),
            ..Default::default()
        })
        .await
        .expect_ok("list an empty prefix");
    assert_eq!(page, ListPage::default(), "an empty listing");

    // `b/` has objects under it and no marker.
    match store.head(&l("b/")).await {
        Err(StoreError::NotFound(_)) => {}
        Ok(head) if profile.implicit_dir_head => {
            gap(profile, "HEAD of a prefix without marker answers 200");
            assert_eq!(head.size, 0, "implicit directory HEAD");
        }
        other => panic!("head of a prefix without marker: expected NotFound, got {other:?}"),
    }
    delete_all(store, all).await;
}

/// Listing order is UTF-8 byte order, and odd key names round-trip.
pub async fn check_list_utf8_order(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let names = [
        "a b",
        "a+b",
        "a%b",
        "a%2Fb",
        "a#b",
        "a&b",
        "a?b",
        "a=b",
        "a;b",
        "a,b",
        "a'b",
        "a!b",
        "a@b",
        "a$b",
        "a*b",
        "(x)",
        "[y]",
        "Z",
        "z",
        "~",
        "é",
        "日本語",
        "\u{FF5E}",
        "😀",
        "A",
        "0",
        "-",
        "_",
        ".hidden",
        "a.b",
    ];
    let all: Vec<String> = names.iter().map(|n| join(scratch, n)).collect();
    futures::stream::iter(all.iter())
        .map(|key| put(store, key, key.as_bytes()))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let want = sorted(all.clone());
    // U+FF5E sorts before U+1F600 in UTF-8 (and after it in UTF-16).
    assert!(
        want.iter().position(|k| k.ends_with('\u{FF5E}'))
            < want.iter().position(|k| k.ends_with('😀'))
    );
    let root = join(scratch, "");
    let (objects, _, _) = list_all(store, &root, None, None).await;
    assert_eq!(keys(&objects), want, "listing order");
    let (objects, prefixes, _) = list_all(store, &root, Some("/"), None).await;
    assert_eq!(keys(&objects), want, "listing order with delimiter");
    assert!(prefixes.is_empty());
    // Pages of 4: page boundaries fall on ASCII and non-ASCII keys.
    let mut listed = Vec::new();
    let mut pages = 0;
    let mut continuation: Option<String> = None;
    loop {
        let request = ListRequest {
            prefix: &root,
            delimiter: None,
            continuation: continuation.clone(),
            max_keys: Some(4),
        };
        let page = match store.list(request).await {
            Err(e) if profile.continuation_after_non_ascii_fails && continuation.is_some() => {
                let last = listed.last().map(String::as_str).unwrap_or_default();
                assert!(
                    !last.is_ascii(),
                    "listing failed after the ASCII key {last:?}: {e:?}"
                );
                gap(profile, &format!("continuing after {last:?} failed: {e}"));
                assert_eq!(
                    listed[..],
                    want[..listed.len()],
                    "pages of 4 before the failure"
                );
                break;
            }
            result => result.expect_ok(format_args!("list in pages of 4 after {continuation:?}")),
        };
        assert!(page.objects.len() <= 4);
        pages += 1;
        listed.extend(keys(&page.objects));
        match page.next {
            Some(next) => continuation = Some(next),
            None => {
                assert_eq!(listed, want, "listing order in pages of 4");
                assert_eq!(pages, want.len().div_ceil(4));
                break;
            }
        }
    }
    let (objects, _, _) = list_all(store, &join(scratch, "日"), None, None).await;
    assert_eq!(
        keys(&objects),
        [join(scratch, "日本語")],
        "a Unicode prefix"
    );
    for key in &all {
        assert_bytes(
            &get(store, key).await,
            key.as_bytes(),
            format_args!("get {key:?}"),
        );
    }
    delete_all(store, all).await;
}

/// More than 1,000 keys: the store's own paging, then small pages, with and without delimiter.
pub async fn check_list_pagination(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    const N: usize = 1100;
    let many = join(scratch, "many/");
    let all: Vec<String> = (0..N).map(|i| format!("{many}k{i:05}")).collect();
    futures::stream::iter(all.iter().enumerate())
        .map(|(i, key)| async move {
            store
                .put(key, Body::Bytes(Bytes::from(i.to_string())), &no_options())
                .await
                .map(|_| ())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect_ok(format_args!("put {N} keys"));

    let (objects, prefixes, pages) = list_all(store, &many, None, None).await;
    assert!(prefixes.is_empty());
    assert_eq!(keys(&objects), all, "all {N} keys, in order, once each");
    assert!(
        pages.len() >= 2 && pages.iter().all(|p| p.objects.len() <= 1000),
        "the store's page size is at most 1,000: pages of {:?}",
        pages.iter().map(|p| p.objects.len()).collect::<Vec<_>>()
    );
    assert!(
        pages[..pages.len() - 1]
            .iter()
            .all(|p| !p.objects.is_empty())
    );
    assert_eq!(objects[7].size, 1);
    assert_eq!(objects[123].etag, md5_hex(b"123"));

    let (objects, _, pages) = list_all(store, &many, None, Some(250)).await;
    assert_eq!(keys(&objects), all, "pages of 250");
    let sizes: Vec<usize> = pages.iter().map(|p| p.objects.len()).collect();
    assert_eq!(sizes, [250, 250, 250, 250, 100], "pages of 250");

    let (objects, _, pages) = list_all(store, &many, Some("/"), Some(550)).await;
    assert_eq!(keys(&objects), all, "pages of 550 with delimiter");
    assert_eq!(pages.len(), 2);

    // Pages that end on a common prefix resume after it.
    let pg = |rest: &str| join(scratch, &format!("pg/{rest}"));
    let small = ["a", "b/1", "b/2", "b/3/x", "c", "d/1", "e"].map(pg);
    for key in &small {
        put(store, key, b"x").await;
    }
    let want: Vec<String> = ["a", "b/", "c", "d/", "e"].map(pg).to_vec();
    for max in [1u32, 2, 3, 5] {
        let mut entries = Vec::new();
        let (_, _, pages) = list_all(store, &pg(""), Some("/"), Some(max)).await;
        for page in &pages {
            let mut page_entries: Vec<String> = keys(&page.objects);
            page_entries.extend(page.prefixes.iter().cloned());
            entries.extend(sorted(page_entries));
        }
        assert_eq!(entries, want, "delimiter listing in pages of {max}");
        assert_eq!(
            pages.len(),
            want.len().div_ceil(max as usize),
            "number of pages of {max}"
        );
    }
    delete_all(store, all.into_iter().chain(small)).await;
}

/// Server-side copy keeps or replaces metadata, handles odd key names, overwrites.
pub async fn check_copy(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let src = join(scratch, "src");
    let data = pattern(100_000, 5);
    let red = meta(&[("color", "red"), ("mode", "100600")]);
    put_with(store, &src, &data, red.clone()).await;

    let kept = join(scratch, "kept");
    let etag = store
        .copy(&src, &kept, None)
        .await
        .expect_ok("copy keeping metadata");
    assert_eq!(etag, md5_hex(&data), "ETag of a copy");
    let head = store.head(&kept).await.expect_ok("head of the copy");
    assert_eq!((head.size, &head.etag), (data.len() as u64, &etag));
    assert_eq!(head.metadata, red, "a copy keeps the metadata");
    assert_bytes(&get(store, &kept).await, &data, "copy");

    let replaced = join(scratch, "replaced");
    let round = meta(&[("shape", "round")]);
    let etag = store
        .copy(&src, &replaced, Some(&round))
        .await
        .expect_ok("copy replacing metadata");
    assert_eq!(etag, md5_hex(&data));
    let head = store.head(&replaced).await.expect_ok("head");
    assert_eq!(head.metadata, round, "a copy with new metadata replaces it");
    assert_bytes(&get(store, &replaced).await, &data, "copy");
    assert_eq!(
        store
            .head(&src)
            .await
            .expect_ok("head of the source")
            .metadata,
        red,
        "the source keeps its metadata"
    );

    // Copy onto itself with new metadata: how chmod/utimens update an object in place.
    let same = join(scratch, "in-place");
    put_with(store, &same, &data, red.clone()).await;
    let updated = meta(&[("color", "green"), ("mtime", "1700000001")]);
    let etag = store
        .copy(&same, &same, Some(&updated))
        .await
        .expect_ok("copy onto itself with new metadata");
    assert_eq!(etag, md5_hex(&data));
    let head = store.head(&same).await.expect_ok("head");
    assert_eq!(head.metadata, updated, "metadata replaced in place");
    assert_eq!((head.size, &head.etag), (data.len() as u64, &etag));
    assert_bytes(&get(store, &same).await, &data, "copy onto itself");

    // Copy onto an existing object replaces it.
    let small = join(scratch, "small");
    put(store, &small, b"small").await;
    store
        .copy(&small, &kept, None)
        .await
        .expect_ok("copy over an object");
    let head = store.head(&kept).await.expect_ok("head");
    assert_eq!((head.size, head.metadata.is_empty()), (5, true));
    assert_bytes(&get(store, &kept).await, b"small", "copy over an object");

    let odd_src = join(scratch, "odd src #%+&?=é 日本");
    let odd_dst = join(scratch, "odd dst ü+%20&?#/x y");
    put(store, &odd_src, b"odd").await;
    store
        .copy(&odd_src, &odd_dst, None)
        .await
        .expect_ok("copy with odd names");
    assert_bytes(&get(store, &odd_dst).await, b"odd", "copy with odd names");

    assert_err!(
        store
            .copy(&join(scratch, "missing"), &join(scratch, "never"), None)
            .await,
        StoreError::NotFound(_),
        "copy of a missing key"
    );
    assert_err!(
        store.head(&join(scratch, "never")).await,
        StoreError::NotFound(_),
        "a failed copy writes nothing"
    );
    delete_all(store, [src, kept, replaced, small, odd_src, odd_dst, same]).await;
}

/// Delete: the key is gone from HEAD, GET and listings; deleting a missing key succeeds.
pub async fn check_delete(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let key = join(scratch, "obj");
    let keep = join(scratch, "keep");
    put(store, &key, b"doomed").await;
    put(store, &keep, b"kept").await;
    store.delete(&key).await.expect_ok("delete");
    assert_err!(
        store.head(&key).await,
        StoreError::NotFound(_),
        "head after delete"
    );
    assert_err!(
        store.get_range(&key, 0..10, None).await,
        StoreError::NotFound(_),
        "get after delete"
    );
    store.delete(&key).await.expect_ok("delete again");
    store
        .delete(&join(scratch, "never-existed"))
        .await
        .expect_ok("delete of a missing key");
    let (objects, _, _) = list_all(store, &join(scratch, ""), None, None).await;
    assert_eq!(keys(&objects), [keep.as_str()], "listing after delete");
    assert_bytes(&get(store, &keep).await, b"kept", "the other object");

    // The last object under a prefix: the prefix goes away with it.
    let only = join(scratch, "sub/only");
    put(store, &only, b"x").await;
    store.delete(&only).await.expect_ok("delete");
    let (objects, prefixes, _) = list_all(store, &join(scratch, ""), Some("/"), None).await;
    assert_eq!(keys(&objects), [keep.as_str()]);
    if profile.stale_common_prefixes {
        if !prefixes.is_empty() {
            gap(profile, "an emptied prefix is still listed");
        }
        assert!(
            prefixes.is_empty() || prefixes == [join(scratch, "sub/")],
            "prefixes {prefixes:?}"
        );
    } else {
        assert!(
            prefixes.is_empty(),
            "an emptied prefix is still listed: {prefixes:?}"
        );
    }
    delete_all(store, [keep]).await;
}

/// Conditional PUT: `If-None-Match: *` and `If-Match: etag`.
pub async fn check_conditional_put(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let key = join(scratch, "obj");
    let put_if = |data: &'static [u8], condition: Condition| {
        let key = key.clone();
        async move {
            let options = PutOptions {
                condition,
                metadata: Metadata::new(),
            };
            store
                .put(&key, Body::Bytes(Bytes::from_static(data)), &options)
                .await
        }
    };
    let e1 = put_if(b"one", Condition::IfNoneMatch)
        .await
        .expect_ok("If-None-Match on a new key");
    assert_eq!(e1, md5_hex(b"one"));
    assert_err!(
        put_if(b"two", Condition::IfNoneMatch).await,
        StoreError::PreconditionFailed(_),
        "If-None-Match on an existing key"
    );
    assert_bytes(
        &get(store, &key).await,
        b"one",
        "after a failed If-None-Match",
    );

    let e2 = put_if(b"two", Condition::IfMatch(e1.clone()))
        .await
        .expect_ok("If-Match with the current ETag");
    assert_eq!(e2, md5_hex(b"two"));
    assert_bytes(&get(store, &key).await, b"two", "after If-Match");
    assert_err!(
        put_if(b"three", Condition::IfMatch(e1.clone())).await,
        StoreError::PreconditionFailed(_),
        "If-Match with a stale ETag"
    );
    assert_err!(
        put_if(b"three", Condition::IfMatch(md5_hex(b"never"))).await,
        StoreError::PreconditionFailed(_),
        "If-Match with a wrong ETag"
    );
    assert_bytes(&get(store, &key).await, b"two", "after failed If-Match");
    put_if(b"four", Condition::None)
        .await
        .expect_ok("unconditional put");
    assert_bytes(
        &get(store, &key).await,
        b"four",
        "after an unconditional put",
    );

    let missing = join(scratch, "missing");
    let result = store
        .put(
            &missing,
            Body::Bytes(Bytes::from_static(b"x")),
            &PutOptions {
                condition: Condition::IfMatch(e1.clone()),
                metadata: Metadata::new(),
            },
        )
        .await;
    if profile.if_match_missing_is_precondition_failed {
        if let Err(StoreError::PreconditionFailed(_)) = &result {
            gap(profile, "If-Match on a missing key answers 412");
        }
        assert_err!(
            result,
            StoreError::NotFound(_) | StoreError::PreconditionFailed(_),
            "If-Match on a missing key"
        );
    } else {
        assert_err!(result, StoreError::NotFound(_), "If-Match on a missing key");
    }
    assert_err!(
        store.head(&missing).await,
        StoreError::NotFound(_),
        "a failed If-Match writes nothing"
    );
    delete_all(store, [key]).await;
}

/// Concurrent `If-None-Match: *` creates of one key: exactly one wins, the object is the
/// winner's, the others fail (`PreconditionFailed`, or another non-`NotFound` refusal such as
/// AWS's 409 `ConditionalRequestConflict`).
pub async fn check_conditional_race(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    const WRITERS: usize = 8;
    for round in 0..3 {
        let key = join(scratch, &format!("race-{round}"));
        let results: Vec<(usize, Result<String>)> = futures::stream::iter(0..WRITERS)
            .map(|i| {
                let key = key.clone();
                async move {
                    let options = PutOptions {
                        condition: Condition::IfNoneMatch,
                        metadata: Metadata::new(),
                    };
                    let body = Body::Bytes(Bytes::from(format!("writer {i}")));
                    (i, store.put(&key, body, &options).await)
                }
            })
            .buffer_unordered(WRITERS)
            .collect()
            .await;
        let winners: Vec<usize> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| *i)
            .collect();
        let content = get(store, &key).await;
        if profile.racy_conditional_create && winners.len() > 1 {
            gap(
                profile,
                &format!(
                    "{} concurrent If-None-Match creates succeeded",
                    winners.len()
                ),
            );
            let last = String::from_utf8_lossy(&content).to_string();
            assert!(
                winners.iter().any(|i| last == format!("writer {i}")),
                "the object {last:?} is one of the winners' {winners:?}"
            );
        } else {
            assert_eq!(
                winners.len(),
                1,
                "exactly one If-None-Match create wins: {results:?}"
            );
            assert_bytes(
                &content,
                format!("writer {}", winners[0]).as_bytes(),
                "the winner's object",
            );
        }
        for (i, result) in &results {
            if let Err(e) = result {
                assert!(
                    !e.is_not_found(),
                    "writer {i}: a lost race is not NotFound: {e:?}"
                );
            }
        }
        delete_all(store, [key]).await;
    }
}

/// Multipart: two parts of `MIN_PART_SIZE` (from memory and from a file) and a small last part.
pub async fn check_multipart(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "big");
    let metadata = meta(&[("mode", "100640")]);
    let options = PutOptions {
        condition: Condition::None,
        metadata: metadata.clone(),
    };
    let upload_id = store
        .create_multipart(&key, &options)
        .await
        .expect_ok("create multipart");
    let min = MIN_PART_SIZE as usize;
    let datas = [pattern(min, 31), pattern(min, 32), pattern(12_345, 33)];

    let p1 = upload_part(store, &key, &upload_id, 1, &datas[0]).await;
    let (_file, body) = file_body(&datas[1], 777);
    let etag2 = store
        .upload_part(&key, &upload_id, 2, body)
        .await
        .expect_ok("upload part 2 from a file");
    assert_eq!(etag2, md5_hex(&datas[1]), "ETag of part 2");
    let p2 = CompletedPart {
        number: 2,
        etag: etag2,
    };
    let p3 = upload_part(store, &key, &upload_id, 3, &datas[2]).await;

    let listed = store
        .list_parts(&key, &upload_id)
        .await
        .expect_ok("list parts");
    let got: Vec<(u32, u64, &str)> = listed
        .iter()
        .map(|p| (p.number, p.size, p.etag.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, min as u64, p1.etag.as_str()),
            (2, min as u64, p2.etag.as_str()),
            (3, 12_345, p3.etag.as_str()),
        ],
        "list_parts"
    );
    assert_err!(
        store.head(&key).await,
        StoreError::NotFound(_),
        "an unfinished upload is not an object"
    );

    let parts = [p1, p2, p3];
    let etag = store
        .complete_multipart(&key, &upload_id, &parts, &Condition::None)
        .await
        .expect_ok("complete multipart");
    assert_eq!(
        etag,
        multipart_etag(parts.iter().map(|p| p.etag.as_str())),
        "multipart ETag"
    );
    assert!(etag.ends_with("-3"));
    let head = store.head(&key).await.expect_ok("head");
    assert_eq!(head.etag, etag);
    assert_eq!(head.size, (2 * min + 12_345) as u64);
    assert_eq!(head.metadata, metadata, "metadata given at create");
    let got = get(store, &key).await;
    assert_bytes(&got, &datas.concat(), "multipart object");
    let straddle = store
        .get_range(&key, (min - 10) as u64..(min + 10) as u64, Some(&etag))
        .await
        .expect_ok("a range across a part boundary");
    assert_bytes(&straddle, &got[min - 10..min + 10], "range across parts");

    assert_err!(
        store.list_parts(&key, &upload_id).await,
        StoreError::NotFound(_),
        "list_parts of a completed upload"
    );
    let open = store
        .list_multipart_uploads(&join(scratch, ""))
        .await
        .expect_ok("list uploads");
    assert!(
        open.is_empty(),
        "a completed upload is still listed: {open:?}"
    );
    delete_all(store, [key]).await;
}

/// Abort: parts and upload are gone, no object appears.
pub async fn check_multipart_abort(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "aborted");
    let upload_id = store
        .create_multipart(&key, &no_options())
        .await
        .expect_ok("create");
    upload_part(store, &key, &upload_id, 1, b"some bytes").await;
    store
        .abort_multipart(&key, &upload_id)
        .await
        .expect_ok("abort");
    assert_err!(
        store.list_parts(&key, &upload_id).await,
        StoreError::NotFound(_),
        "list_parts after abort"
    );
    assert_err!(
        store
            .upload_part(
                &key,
                &upload_id,
                2,
                Body::Bytes(Bytes::from_static(b"late"))
            )
            .await,
        StoreError::NotFound(_),
        "upload_part after abort"
    );
    assert_err!(
        store.head(&key).await,
        StoreError::NotFound(_),
        "head after abort"
    );
    let open = store
        .list_multipart_uploads(&join(scratch, ""))
        .await
        .expect_ok("list uploads");
    assert!(
        open.is_empty(),
        "an aborted upload is still listed: {open:?}"
    );
}

/// S3's rules at completion: `EntityTooSmall`, unknown parts, wrong part ETags.
pub async fn check_multipart_rules(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let key = join(scratch, "obj");
    let upload_id = store
        .create_multipart(&key, &no_options())
        .await
        .expect_ok("create");
    let p1 = upload_part(store, &key, &upload_id, 1, &pattern(1024, 41)).await;
    let p2 = upload_part(store, &key, &upload_id, 2, &pattern(1024, 42)).await;
    assert_err!(
        store
            .complete_multipart(
                &key,
                &upload_id,
                &[p1.clone(), p2.clone()],
                &Condition::None
            )
            .await,
        StoreError::Invalid(_),
        "complete with a first part under MIN_PART_SIZE (EntityTooSmall)"
    );
    let wrong = CompletedPart {
        number: 2,
        etag: md5_hex(b"not this part"),
    };
    assert_err!(
        store
            .complete_multipart(&key, &upload_id, &[wrong], &Condition::None)
            .await,
        StoreError::Invalid(_),
        "complete with a wrong part ETag (InvalidPart)"
    );
    let unknown = CompletedPart {
        number: 7,
        etag: p1.etag.clone(),
    };
    assert_err!(
        store
            .complete_multipart(&key, &upload_id, &[unknown], &Condition::None)
            .await,
        StoreError::Invalid(_),
        "complete with a part never uploaded (InvalidPart)"
    );
    assert_err!(
        store.head(&key).await,
        StoreError::NotFound(_),
        "no object after failed completes"
    );

    // The upload is still usable: the last part alone may be small.
    let etag = store
        .complete_multipart(
            &key,
            &upload_id,
            std::slice::from_ref(&p2),
            &Condition::None,
        )
        .await
        .expect_ok("complete with a single small part");
    assert_eq!(etag, multipart_etag([p2.etag.as_str()]));
    assert_bytes(
        &get(store, &key).await,
        &pattern(1024, 42),
        "single-part upload",
    );
    delete_all(store, [key]).await;
}

/// `UploadPartCopy` from ranges of an existing object.
pub async fn check_upload_part_copy(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let src = join(scratch, "src");
    let min = MIN_PART_SIZE as usize;
    let data = pattern(min + 100, 51);
    put(store, &src, &data).await;
    let key = join(scratch, "dst");
    let upload_id = store
        .create_multipart(&key, &no_options())
        .await
        .expect_ok("create");
    let e1 = store
        .upload_part_copy(&key, &upload_id, 1, &src, 50..(min as u64 + 50))
        .await
        .expect_ok("upload_part_copy of MIN_PART_SIZE bytes");
    let e2 = store
        .upload_part_copy(&key, &upload_id, 2, &src, 0..100)
        .await
        .expect_ok("upload_part_copy of 100 bytes");
    let p3 = upload_part(store, &key, &upload_id, 3, b"tail").await;
    let listed = store
        .list_parts(&key, &upload_id)
        .await
        .expect_ok("list parts");
    let got: Vec<(u32, u64, &str)> = listed
        .iter()
        .map(|p| (p.number, p.size, p.etag.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, min as u64, e1.as_str()),
            (2, 100, e2.as_str()),
            (3, 4, p3.etag.as_str())
        ],
        "list_parts reports the copied parts with the ETags upload_part_copy returned"
    );
    let md5s = [md5_hex(&data[50..min + 50]), md5_hex(&data[..100])];
    if profile.part_copy_etag_not_md5 {
        if [&e1, &e2] != [&md5s[0], &md5s[1]] {
            gap(
                profile,
                &format!("copied part ETags {e1}, {e2} are not MD5s"),
            );
        }
        assert!(!e1.is_empty() && !e2.is_empty() && e1 != e2);
    } else {
        assert_eq!([&e1, &e2], [&md5s[0], &md5s[1]], "ETags of copied parts");
    }
    let parts = [
        CompletedPart {
            number: 1,
            etag: e1,
        },
        CompletedPart {
            number: 2,
            etag: e2,
        },
        p3,
    ];
    // Part 2 (100 bytes) is not the last: too small.
    assert_err!(
        store
            .complete_multipart(&key, &upload_id, &parts, &Condition::None)
            .await,
        StoreError::Invalid(_),
        "complete with a small middle part"
    );
    let etag = store
        .complete_multipart(&key, &upload_id, &parts[..2], &Condition::None)
        .await
        .expect_ok("complete");
    if profile.part_copy_etag_not_md5 {
        assert!(etag.ends_with("-2"), "ETag {etag}");
    } else {
        assert_eq!(etag, multipart_etag(md5s.iter().map(String::as_str)));
    }
    assert_eq!(store.head(&key).await.expect_ok("head").etag, etag);
    let want = [&data[50..min + 50], &data[..100]].concat();
    assert_bytes(&get(store, &key).await, &want, "object from copied parts");
    delete_all(store, [src, key]).await;
}

/// Conditional completion: `If-None-Match: *` and `If-Match` on `CompleteMultipartUpload`.
pub async fn check_multipart_conditional(
    store: &dyn ObjectStore,
    scratch: &str,
    _profile: &Profile,
) {
    let key = join(scratch, "obj");
    let existing = put(store, &key, b"existing").await;
    let small = |data: &'static [u8], condition: Condition| {
        let key = key.clone();
        async move {
            let upload_id = store
                .create_multipart(&key, &no_options())
                .await
                .expect_ok("create");
            let part = upload_part(store, &key, &upload_id, 1, data).await;
            let result = store
                .complete_multipart(&key, &upload_id, &[part], &condition)
                .await;
            if result.is_err() {
                // S3 keeps the upload after a failed condition; clean up either way.
                let _ = store.abort_multipart(&key, &upload_id).await;
            }
            result
        }
    };
    assert_err!(
        small(b"new", Condition::IfNoneMatch).await,
        StoreError::PreconditionFailed(_),
        "complete with If-None-Match on an existing key"
    );
    assert_bytes(
        &get(store, &key).await,
        b"existing",
        "after a failed conditional complete",
    );
    assert_err!(
        small(b"new", Condition::IfMatch(md5_hex(b"other"))).await,
        StoreError::PreconditionFailed(_),
        "complete with a wrong If-Match"
    );
    let etag = small(b"replaced", Condition::IfMatch(existing))
        .await
        .expect_ok("complete with the right If-Match");
    assert_eq!(etag, multipart_etag([md5_hex(b"replaced").as_str()]));
    assert_bytes(
        &get(store, &key).await,
        b"replaced",
        "after a conditional complete",
    );

    let fresh = join(scratch, "fresh");
    let upload_id = store
        .create_multipart(&fresh, &no_options())
        .await
        .expect_ok("create");
    let part = upload_part(store, &fresh, &upload_id, 1, b"fresh").await;
    store
        .complete_multipart(&fresh, &upload_id, &[part], &Condition::IfNoneMatch)
        .await
        .expect_ok("complete with If-None-Match on a new key");
    assert_bytes(
        &get(store, &fresh).await,
        b"fresh",
        "conditional create by multipart",
    );
    delete_all(store, [key, fresh]).await;
}

/// Unfinished uploads are listed by key prefix, with their ids, until completed or aborted.
pub async fn check_list_multipart_uploads(
    store: &dyn ObjectStore,
    scratch: &str,
    _profile: &Profile,
) {
    let a = join(scratch, "a");
    let b = join(scratch, "sub/b");
    let id_a1 = store
        .create_multipart(&a, &no_options())
        .await
        .expect_ok("create");
    let id_a2 = store
        .create_multipart(&a, &no_options())
        .await
        .expect_ok("create");
    let id_b = store
        .create_multipart(&b, &no_options())
        .await
        .expect_ok("create");
    assert!(id_a1 != id_a2 && id_a1 != id_b, "upload ids are unique");

    let open = store
        .list_multipart_uploads(&join(scratch, ""))
        .await
        .expect_ok("list uploads");
    let got: BTreeSet<(String, String)> = open
        .iter()
        .map(|u| (u.key.clone(), u.upload_id.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        (a.clone(), id_a1.clone()),
        (a.clone(), id_a2.clone()),
        (b.clone(), id_b.clone()),
    ]
    .into();
    assert_eq!(got, want, "open uploads");
    assert_eq!(open.len(), 3);
    for u in &open {
        assert_recent(u.initiated, "upload initiated");
    }
    let sub = store
        .list_multipart_uploads(&join(scratch, "sub/"))
        .await
        .expect_ok("list uploads under a prefix");
    assert_eq!(
        sub.iter().map(|u| u.upload_id.as_str()).collect::<Vec<_>>(),
        [id_b.as_str()]
    );

    // An upload id belongs to its key.
    assert_err!(
        store.list_parts(&b, &id_a1).await,
        StoreError::NotFound(_),
        "list_parts with another key's upload id"
    );
    for (key, id) in [(&a, &id_a1), (&a, &id_a2), (&b, &id_b)] {
        store.abort_multipart(key, id).await.expect_ok("abort");
    }
    let open = store
        .list_multipart_uploads(&join(scratch, ""))
        .await
        .expect_ok("list uploads");
    assert!(open.is_empty(), "aborted uploads still listed: {open:?}");
}

/// Missing keys and uploads are `NotFound`, distinct from every other kind.
pub async fn check_error_kinds(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let missing = join(scratch, "missing");
    let other = join(scratch, "other");
    let checks: Vec<(&str, Result<()>)> = vec![
        ("head", store.head(&missing).await.map(drop)),
        (
            "get_range",
            store.get_range(&missing, 0..1, None).await.map(drop),
        ),
        ("copy", store.copy(&missing, &other, None).await.map(drop)),
        (
            "list_parts of an unknown upload",
            store.list_parts(&missing, "no-such-upload").await.map(drop),
        ),
        (
            "upload_part to an unknown upload",
            store
                .upload_part(
                    &missing,
                    "no-such-upload",
                    1,
                    Body::Bytes(Bytes::from_static(b"x")),
                )
                .await
                .map(drop),
        ),
        (
            "complete an unknown upload",
            store
                .complete_multipart(
                    &missing,
                    "no-such-upload",
                    &[CompletedPart {
                        number: 1,
                        etag: md5_hex(b"x"),
                    }],
                    &Condition::None,
                )
                .await
                .map(drop),
        ),
        (
            "abort an unknown upload",
            store.abort_multipart(&missing, "no-such-upload").await,
        ),
    ];
    for (what, result) in checks {
        let e = assert_err!(result, StoreError::NotFound(_), "{what}");
        assert!(e.is_not_found() && !e.is_transient(), "{what}: {e:?}");
    }
    // A real upload id, but the part copy source is missing.
    let key = join(scratch, "upload");
    let upload_id = store
        .create_multipart(&key, &no_options())
        .await
        .expect_ok("create");
    assert_err!(
        store
            .upload_part_copy(&key, &upload_id, 1, &missing, 0..1)
            .await,
        StoreError::NotFound(_),
        "upload_part_copy from a missing key"
    );
    store
        .abort_multipart(&key, &upload_id)
        .await
        .expect_ok("abort");
    assert_err!(
        store.head(&other).await,
        StoreError::NotFound(_),
        "nothing was written"
    );
}

/// `a` and `a/b` are two objects, whichever is written first; with the delimiter `a` is an
/// object and `a/` a prefix.
pub async fn check_object_and_prefix(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    for (case, object_first) in [("object-first", true), ("prefix-first", false)] {
        let base = join(scratch, case);
        let file = join(&base, "a");
        let child = join(&base, "a/b");
        let (first, second) = if object_first {
            ((&file, &b"file"[..]), (&child, &b"child"[..]))
        } else {
            ((&child, &b"child"[..]), (&file, &b"file"[..]))
        };
        put(store, first.0, first.1).await;
        let result = store
            .put(
                second.0,
                Body::Bytes(Bytes::copy_from_slice(second.1)),
                &no_options(),
            )
            .await;
        match result {
            Err(e) if profile.no_object_and_prefix => {
                gap(
                    profile,
                    &format!("{case}: {:?} refused next to {:?}: {e}", second.0, first.0),
                );
                assert!(
                    !e.is_transient(),
                    "a refusal, not a transient failure: {e:?}"
                );
                assert_bytes(&get(store, first.0).await, first.1, "the first object");
                let (objects, _, _) = list_all(store, &join(&base, ""), None, None).await;
                assert_eq!(keys(&objects), [first.0.as_str()]);
                delete_all(store, [first.0.clone()]).await;
                continue;
            }
            other => {
                other.expect_ok(format_args!("{case}: put {:?}", second.0));
            }
        }
        assert_bytes(&get(store, &file).await, b"file", format_args!("{case}: a"));
        assert_bytes(
            &get(store, &child).await,
            b"child",
            format_args!("{case}: a/b"),
        );
        let (objects, prefixes, _) = list_all(store, &join(&base, ""), Some("/"), None).await;
        assert_eq!(keys(&objects), [file.as_str()], "{case}");
        assert_eq!(prefixes, [join(&base, "a/")], "{case}");
        let (objects, _, _) = list_all(store, &join(&base, ""), None, None).await;
        assert_eq!(keys(&objects), [file.clone(), child.clone()], "{case}");
        assert_eq!(
            store.head(&file).await.expect_ok("head a").size,
            4,
            "{case}"
        );
        delete_all(store, [file, child]).await;
    }
}

/// `a//b` is its own key, not `a/b`.
pub async fn check_double_slash(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let key = join(scratch, "a//b");
    let single = join(scratch, "a/b");
    put(store, &key, b"double").await;
    let (objects, _, _) = list_all(store, &join(scratch, ""), None, None).await;
    if profile.collapses_double_slash && keys(&objects) == [single.clone()] {
        gap(profile, "a//b is stored as a/b");
        assert_bytes(&get(store, &single).await, b"double", "a//b stored as a/b");
        delete_all(store, [single]).await;
        return;
    }
    assert_eq!(keys(&objects), [key.as_str()], "listing of a//b");
    assert_bytes(&get(store, &key).await, b"double", "a//b");
    assert_err!(
        store.head(&single).await,
        StoreError::NotFound(_),
        "a/b is another key"
    );
    let (objects, prefixes, _) = list_all(store, &join(scratch, "a/"), Some("/"), None).await;
    assert!(objects.is_empty());
    assert_eq!(
        prefixes,
        [join(scratch, "a//")],
        "an empty segment as a prefix"
    );
    delete_all(store, [key]).await;
}

/// A `dir/` key may hold bytes like any object.
pub async fn check_dir_marker_body(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let key = join(scratch, "dir/");
    let etag = put(store, &key, b"not empty").await;
    let head = store.head(&key).await.expect_ok("head of dir/");
    if profile.dir_marker_drops_body && head.size == 0 {
        gap(profile, "a dir/ key lost its body");
        assert!(get(store, &key).await.is_empty());
    } else {
        assert_eq!((head.size, head.etag.as_str()), (9, etag.as_str()));
        assert_bytes(&get(store, &key).await, b"not empty", "dir/ with a body");
    }
    let (objects, _, _) = list_all(store, &join(scratch, ""), None, None).await;
    assert_eq!(keys(&objects), [key.as_str()]);
    delete_all(store, [key]).await;
}

/// `.` and `..` segments are ordinary characters in keys, never path navigation.
pub async fn check_dot_segments(store: &dyn ObjectStore, scratch: &str, profile: &Profile) {
    let names = ["x/./y", "x/../y", "x/.", "x/..", "x/.../y"];
    let mut written = Vec::new();
    for name in names {
        let key = join(scratch, name);
        let result = store
            .put(&key, Body::Bytes(Bytes::from(key.clone())), &no_options())
            .await;
        match result {
            Err(e) if profile.rejects_dot_segments && name != "x/.../y" => {
                gap(profile, &format!("{name:?} refused: {e}"));
                assert!(
                    !e.is_transient(),
                    "{key:?} refused with a transient error: {e:?}"
                );
            }
            result => {
                result.expect_ok(format_args!("put {key:?}"));
                assert_bytes(
                    &get(store, &key).await,
                    key.as_bytes(),
                    format_args!("{key:?}"),
                );
                written.push(key);
            }
        }
    }
    let (objects, _, _) = list_all(store, &join(scratch, ""), None, None).await;
    assert_eq!(
        keys(&objects),
        sorted(written.clone()),
        "dot segments are kept verbatim"
    );
    assert_err!(
        store.head(&join(scratch, "y")).await,
        StoreError::NotFound(_),
        "`x/../y` is not `y`"
    );
    delete_all(store, written).await;
}

/// Keys up to 1,024 bytes, with segments longer than a file name may be.
pub async fn check_long_keys(store: &dyn ObjectStore, scratch: &str, _profile: &Profile) {
    let long_segment = join(scratch, &format!("{}/x", "s".repeat(300)));
    let base = join(scratch, "");
    assert!(base.len() < 900, "scratch prefix too long for this check");
    let mut longest = base.clone();
    while longest.len() < 1024 {
        longest.push(if longest.len() % 100 == 99 { '/' } else { 'k' });
    }
    assert_eq!(longest.len(), 1024);
    for key in [&long_segment, &longest] {
        put(store, key, key.as_bytes()).await;
        assert_bytes(
            &get(store, key).await,
            key.as_bytes(),
            format_args!("{}-byte key", key.len()),
        );
    }
    let (objects, _, _) = list_all(store, &base, None, None).await;
    assert_eq!(
        keys(&objects),
        sorted(vec![long_segment.clone(), longest.clone()])
    );
    let too_long = format!("{longest}k");
    assert!(
        store
            .put(
                &too_long,
                Body::Bytes(Bytes::from_static(b"x")),
                &no_options()
            )
            .await
            .is_err(),
        "a 1,025-byte key is refused"
    );
    delete_all(store, [long_segment, longest]).await;
}
