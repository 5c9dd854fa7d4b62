//! The object store seam (DESIGN.md §3).
//!
//! Everything above this module speaks to a bucket only through [`ObjectStore`]: a small async
//! trait shaped after S3's own operations, with multipart uploads addressed by upload id so the
//! write-back journal can resume one after a crash. Three implementations live beside it:
//! [`S3Store`] (aws-sdk-s3; the only file that sees SDK types), [`DirStore`] (a local directory
//! used as a bucket: the embedded default behind `file://` sources) and [`MemoryStore`] (unit
//! tests). [`conformance`] is one suite of async checks that every implementation passes, which
//! is what lets the fast in-memory store stand in for S3 in core tests.
//!
//! Errors are one semantic enum, [`StoreError`]; each implementation maps its own failures onto
//! it in one place, and `crate::error` maps it onto errno.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub mod conformance;
mod dir;
mod faulty;
mod memory;
mod metered;
mod s3;

pub use dir::DirStore;
pub use faulty::{FaultyCall, FaultyOutcome, FaultyStore};
pub use memory::MemoryStore;
pub use metered::MeteredStore;
pub use s3::{AddressingStyle, S3Config, S3Store};

/// S3 refuses multipart uploads with more parts than this.
pub const MAX_PARTS: u32 = 10_000;
/// S3's smallest part size (every part but the last must be at least this big).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What went wrong, in terms the filesystem can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key (or multipart upload id) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The bucket itself does not exist.
    #[error("bucket {0:?} does not exist")]
    NoSuchBucket(String),
    /// An `If-Match` / `If-None-Match` condition was not met.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The server asked us to slow down (HTTP 429/503 SlowDown).
    #[error("throttled: {0}")]
    Throttled(String),
    /// Credentials missing, wrong or lacking permission. The message never holds a secret.
    #[error("access denied: {0}")]
    PermissionDenied(String),
    /// Network failure, timeout or server-side 5xx: worth retrying.
    #[error("transient failure: {0}")]
    Transient(String),
    /// A request the store refuses (bad argument, unsupported feature).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Throttled(_) | StoreError::Transient(_))
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound(_))
    }
}

/// User metadata (`x-amz-meta-NAME`), keyed by NAME in lower case.
pub type Metadata = BTreeMap<String, String>;

/// One object as listed or HEADed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// The ETag without surrounding quotes (`md5hex`, or `md5hex-N` for multipart uploads).
    pub etag: String,
    pub last_modified: SystemTime,
    /// User metadata. Filled by `head`; listings do not carry it and leave it empty.
    pub metadata: Metadata,
}

/// One page of a ListObjectsV2-style listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects directly matching (with a delimiter: those not rolled up into a prefix).
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes, each ending with the delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// A request for one page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListRequest<'a> {
    pub prefix: &'a str,
    pub delimiter: Option<&'a str>,
    pub continuation: Option<String>,
    /// At most this many objects + prefixes (`None`: the store's page size, 1,000 on S3).
    pub max_keys: Option<u32>,
}

/// A write condition (S3 conditional writes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Condition {
    #[default]
    None,
    /// `If-None-Match: *`: only create, never replace.
    IfNoneMatch,
    /// `If-Match: etag`: only replace this exact version.
    IfMatch(String),
}

/// Options of a whole-object write (`put`, `complete_multipart`, `create_multipart`).
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub condition: Condition,
    pub metadata: Metadata,
}

/// The bytes of a write: in memory, or a range of a local file (the cache file; streamed, never
/// read whole into memory).
#[derive(Clone)]
pub enum Body {
    Bytes(Bytes),
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read the whole body into memory (for stores that keep objects in memory).
    pub async fn into_bytes(self) -> std::io::Result<Bytes> {
        match self {
            Body::Bytes(b) => Ok(b),
            Body::File { path, offset, len } => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let mut f = tokio::fs::File::open(&path).await?;
                f.seek(std::io::SeekFrom::Start(offset)).await?;
                let mut buf = Vec::with_capacity(len as usize);
                f.take(len).read_to_end(&mut buf).await?;
                if (buf.len() as u64) < len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} is shorter than {} bytes", path.display(), offset + len),
                    ));
                }
                Ok(Bytes::from(buf))
            }
        }
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Body::Bytes({} bytes)", b.len()),
            Body::File { path, offset, len } => {
                write!(f, "Body::File({}, {offset}+{len})", path.display())
            }
        }
    }
}

/// A finished part, as recorded by the uploader and sent to `complete_multipart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    /// 1-based part number.
    pub number: u32,
    pub etag: String,
}

/// A part as reported by `list_parts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub etag: String,
    pub size: u64,
}

/// An unfinished multipart upload, as reported by `list_multipart_uploads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartUpload {
    pub key: String,
    pub upload_id: String,
    pub initiated: SystemTime,
}

/// A bucket, seen through S3's data operations.
///
/// Keys are full object keys (the mount's prefix already applied). ETags are returned without
/// quotes. Every method is safe to call concurrently.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// A short description for logs (`s3://bucket`, `file:///path`); never holds a secret.
    fn describe(&self) -> String;

    /// Check that the bucket exists and the credentials may use it (run once at mount).
    async fn check_access(&self) -> Result<()>;

    async fn head(&self, key: &str) -> Result<ObjectMeta>;

    /// The bytes of `range` (clamped to the object's size; a range starting at or past the end
    /// reads as empty). With `if_match`, fails with `PreconditionFailed` if the object's ETag
    /// differs, so reads of one open file never mix two versions.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Bytes>;

    async fn list(&self, request: ListRequest<'_>) -> Result<ListPage>;

    /// Write a whole object; returns its ETag.
    async fn put(&self, key: &str, body: Body, options: &PutOptions) -> Result<String>;

    /// Server-side copy. `metadata: None` keeps the source's metadata, `Some` replaces it.
    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<String>;

    /// Delete a key; deleting a missing key succeeds (as on S3).
    async fn delete(&self, key: &str) -> Result<()>;

    /// Start a multipart upload; returns its upload id. The condition is checked at completion.
    async fn create_multipart(&self, key: &str, options: &PutOptions) -> Result<String>;

    /// Upload part `number` (1-based); returns the part's ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Body,
    ) -> Result<String>;

    /// Make part `number` a server-side copy of `range` of object `from`; returns its ETag.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        from: &str,
        range: Range<u64>,
    ) -> Result<String>;

    /// Assemble the parts into the object; returns the object's ETag.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: &Condition,
    ) -> Result<String>;

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()>;

    /// The parts uploaded so far, in part-number order.
    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>>;

    /// Unfinished multipart uploads whose keys start with `prefix`.
    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<MultipartUpload>>;
}

/// Whether `store` honours `If-None-Match: *`: the object `scratch` is created twice, the
/// second time conditionally (it must be refused), then deleted. A server that ignores the
/// header (the second write succeeds) or rejects it (`NotImplemented`) does not; transient
/// and access errors are returned.
pub async fn honours_conditional_writes(store: &dyn ObjectStore, scratch: &str) -> Result<bool> {
    let create_only = PutOptions {
        condition: Condition::IfNoneMatch,
        ..PutOptions::default()
    };
    let empty = || Body::Bytes(Bytes::new());
    let first = store.put(scratch, empty(), &create_only).await;
    let second = match &first {
        Ok(_) => Some(store.put(scratch, empty(), &create_only).await),
        Err(_) => None,
    };
    if first.is_ok()
        && let Err(e) = store.delete(scratch).await
    {
        tracing::warn!(
            key = scratch,
            "cannot delete the conditional-write probe: {e}"
        );
    }
    match (first, second) {
        (Ok(_), Some(Err(StoreError::PreconditionFailed(_)))) => Ok(true),
        (Ok(_), Some(Ok(_))) => Ok(false),
        (Err(e), _) | (_, Some(Err(e))) if e.is_transient() => Err(e),
        (Err(e @ StoreError::PermissionDenied(_)), _) => Err(e),
        _ => Ok(false),
    }
}

/// The largest object one CopyObject may copy (S3's limit); larger ones are copied in parts.
pub const MAX_COPY_SIZE: u64 = 5 << 30;

/// Part size of a multipart copy: big parts keep the request count low (each part is one
/// server-side UploadPartCopy, no bytes pass through us); it doubles past 10,000 parts.
const COPY_PART_SIZE: u64 = 512 << 20;

/// Parts of one multipart copy in flight at once.
const COPY_CONCURRENCY: usize = 4;

/// Server-side copy of `from` (`size` bytes) to `to`: one CopyObject up to 5 GiB, above that
/// a multipart upload of UploadPartCopy parts (aborted if a part fails). `metadata: None`
/// keeps the source's metadata, `Some` replaces it. Returns the new object's ETag.
pub async fn copy_object(
    store: &dyn ObjectStore,
    from: &str,
    to: &str,
    size: u64,
    metadata: Option<&Metadata>,
) -> Result<String> {
    copy_object_in_parts(
        store,
        (from, to),
        size,
        metadata,
        (MAX_COPY_SIZE, COPY_PART_SIZE),
    )
    .await
}

/// [`copy_object`] with its limits, `(largest single copy, part size)`, as parameters.
async fn copy_object_in_parts(
    store: &dyn ObjectStore,
    (from, to): (&str, &str),
    size: u64,
    metadata: Option<&Metadata>,
    (single_max, part_size): (u64, u64),
) -> Result<String> {
    use futures::StreamExt;
    if size <= single_max {
        return store.copy(from, to, metadata).await;
    }
    let metadata = match metadata {
        Some(m) => m.clone(),
        None => store.head(from).await?.metadata,
    };
    let options = PutOptions {
        metadata,
        ..PutOptions::default()
    };
    let upload_id = store.create_multipart(to, &options).await?;
    let parts: Vec<Result<CompletedPart>> = futures::stream::iter(
        crate::upload::plan_parts(size, part_size)
            .into_iter()
            .zip(1..),
    )
    .map(|(range, number)| {
        let upload_id = &upload_id;
        async move {
            let etag = store
                .upload_part_copy(to, upload_id, number, from, range)
                .await?;
            Ok(CompletedPart { number, etag })
        }
    })
    .buffered(COPY_CONCURRENCY)
    .collect()
    .await;
    let completed = match parts.into_iter().collect::<Result<Vec<_>>>() {
        Ok(parts) => {
            store
                .complete_multipart(to, &upload_id, &parts, &Condition::None)
                .await
        }
        Err(e) => Err(e),
    };
    if completed.is_err()
        && let Err(e) = store.abort_multipart(to, &upload_id).await
    {
        tracing::warn!(
            key = to,
            upload_id,
            "cannot abort a failed multipart copy: {e}"
        );
    }
    completed
}

/// The ETag S3 gives a multipart object: MD5 of the concatenated binary part MD5s, `-N`.
pub fn multipart_etag<'a>(part_etags: impl IntoIterator<Item = &'a str>) -> String {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    let mut count = 0;
    for etag in part_etags {
        let raw = hex::decode(etag.trim_matches('"')).unwrap_or_default();
        hasher.update(&raw);
        count += 1;
    }
    format!("{}-{count}", hex::encode(hasher.finalize()))
}

/// MD5 hex of a byte slice: the ETag of a single-part object.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_above_the_single_copy_limit_go_part_by_part() {
        let store = MemoryStore::new();
        let data: Vec<u8> = (0..12 << 20).map(|i: u32| (i % 251) as u8).collect();
        let metadata: Metadata = [("mode".to_string(), "33188".to_string())].into();
        let options = PutOptions {
            metadata: metadata.clone(),
            ..PutOptions::default()
        };
        store
            .put("src", Body::Bytes(Bytes::from(data.clone())), &options)
            .await
            .unwrap();
        let limits = (1 << 20, MIN_PART_SIZE); // 12 MiB: three parts, 5 + 5 + 2 MiB
        let etag = copy_object_in_parts(&store, ("src", "dst"), 12 << 20, None, limits)
            .await
            .unwrap();
        assert!(etag.ends_with("-3"), "a three-part object: {etag}");
        let got = store.get_range("dst", 0..u64::MAX, None).await.unwrap();
        assert!(got == data[..], "the copy has the source's bytes");
        assert_eq!(store.head("dst").await.unwrap().metadata, metadata);
        // A failing part aborts the upload: nothing is left behind.
        let err = copy_object_in_parts(
            &store,
            ("missing", "dst2"),
            12 << 20,
            Some(&metadata),
            limits,
        )
        .await
        .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
        assert!(store.head("dst2").await.is_err());
    }
}
