//! [`MemoryStore`]: a bucket held in memory, for unit tests.
//!
//! It behaves like S3 on every data operation the [`ObjectStore`] trait exposes (ETags, listing
//! order and paging, conditional writes, multipart rules such as `EntityTooSmall`), and passes
//! the same [`conformance`](super::conformance) suite as the real stores, which is what lets the
//! filesystem core be tested against it.
//!
//! State lives in one `std::sync::Mutex`, never held across an `.await`.
//!
//! This file also holds the small pieces of S3 behaviour shared with [`DirStore`](super::DirStore):
//! the listing algorithm over a sorted map, key validation and the write-condition check.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Body, CompletedPart, Condition, ListPage, ListRequest, MAX_PARTS, MIN_PART_SIZE, Metadata,
    MultipartUpload, ObjectMeta, ObjectStore, PartInfo, PutOptions, Result, StoreError, md5_hex,
    multipart_etag,
};

/// The longest key S3 accepts, in bytes.
pub(super) const MAX_KEY_LEN: usize = 1024;
/// S3's page size (and the most `max-keys` may ask for).
pub(super) const DEFAULT_PAGE: u32 = 1000;

/// An in-memory bucket.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    uploads: BTreeMap<String, Upload>,
    next_upload: u64,
}

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    etag: String,
    last_modified: SystemTime,
    metadata: Metadata,
}

#[derive(Debug)]
struct Upload {
    key: String,
    initiated: SystemTime,
    metadata: Metadata,
    parts: BTreeMap<u32, Part>,
}

#[derive(Debug, Clone)]
struct Part {
    data: Bytes,
    etag: String,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Object {
    fn meta(&self, key: &str, with_metadata: bool) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: self.data.len() as u64,
            etag: self.etag.clone(),
            last_modified: self.last_modified,
            metadata: if with_metadata {
                self.metadata.clone()
            } else {
                Metadata::new()
            },
        }
    }
}

impl State {
    fn upload(&mut self, key: &str, upload_id: &str) -> Result<&mut Upload> {
        match self.uploads.get_mut(upload_id) {
            Some(upload) if upload.key == key => Ok(upload),
            _ => Err(no_such_upload(key, upload_id)),
        }
    }
}

async fn body_bytes(body: Body) -> Result<Bytes> {
    let what = format!("{body:?}");
    body.into_bytes()
        .await
        .map_err(|e| StoreError::Other(format!("reading {what}: {e}")))
}

#[async_trait]
impl ObjectStore for MemoryStore {
    fn describe(&self) -> String {
        "memory://".to_string()
    }

    async fn check_access(&self) -> Result<()> {
        Ok(())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let state = self.state();
        let object = state.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(object.meta(key, true))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Bytes> {
        let state = self.state();
        let object = state.objects.get(key).ok_or_else(|| not_found(key))?;
        check_if_match(key, &object.etag, if_match)?;
        let range = clamp_range(range, object.data.len() as u64);
        Ok(object.data.slice(range.start as usize..range.end as usize))
    }

    async fn list(&self, request: ListRequest<'_>) -> Result<ListPage> {
        let state = self.state();
        Ok(list_page(&state.objects, &request, |key, object| {
            object.meta(key, false)
        }))
    }

    async fn put(&self, key: &str, body: Body, options: &PutOptions) -> Result<String> {
        check_key(key)?;
        let data = body_bytes(body).await?;
        let etag = md5_hex(&data);
        let mut state = self.state();
        check_condition(
            key,
            state.objects.get(key).map(|o| o.etag.as_str()),
            &options.condition,
        )?;
        state.objects.insert(
            key.to_string(),
            Object {
                data,
                etag: etag.clone(),
                last_modified: SystemTime::now(),
                metadata: normalize_metadata(&options.metadata),
            },
        );
        Ok(etag)
    }

    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<String> {
        check_key(to)?;
        let source = self
            .state()
            .objects
            .get(from)
            .cloned()
            .ok_or_else(|| not_found(from))?;
        // CopyObject writes a single-part object: its ETag is the MD5 of the data, even when
        // the source was a multipart upload.
        let etag = md5_hex(&source.data);
        let copy = Object {
            data: source.data,
            etag: etag.clone(),
            last_modified: SystemTime::now(),
            metadata: match metadata {
                Some(m) => normalize_metadata(m),
                None => source.metadata,
            },
        };
        self.state().objects.insert(to.to_string(), copy);
        Ok(etag)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.state().objects.remove(key);
        Ok(())
    }

    async fn create_multipart(&self, key: &str, options: &PutOptions) -> Result<String> {
        check_key(key)?;
        let mut state = self.state();
        state.next_upload += 1;
        let upload_id = format!("mem-upload-{}", state.next_upload);
        state.uploads.insert(
            upload_id.clone(),
            Upload {
                key: key.to_string(),
                initiated: SystemTime::now(),
                metadata: normalize_metadata(&options.metadata),
                parts: BTreeMap::new(),
            },
        );
        Ok(upload_id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Body,
    ) -> Result<String> {
        check_part_number(number)?;
        // Fail fast on an unknown upload before reading the body.
        self.state().upload(key, upload_id)?;
        let data = body_bytes(body).await?;
        let etag = md5_hex(&data);
        let mut state = self.state();
        let upload = state.upload(key, upload_id)?;
        upload.parts.insert(
            number,
            Part {
                data,
                etag: etag.clone(),
            },
        );
        Ok(etag)
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        from: &str,
        range: Range<u64>,
    ) -> Result<String> {
        check_part_number(number)?;
        let mut state = self.state();
        state.upload(key, upload_id)?;
        let source = state.objects.get(from).ok_or_else(|| not_found(from))?;
        check_copy_range(from, &range, source.data.len() as u64)?;
        let data = source.data.slice(range.start as usize..range.end as usize);
        let etag = md5_hex(&data);
        let upload = state.upload(key, upload_id)?;
        upload.parts.insert(
            number,
            Part {
                data,
                etag: etag.clone(),
            },
        );
        Ok(etag)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: &Condition,
    ) -> Result<String> {
        let mut state = self.state();
        let upload = state.upload(key, upload_id)?;
        let sizes = check_completed_parts(parts, |number| {
            upload
                .parts
                .get(&number)
                .map(|p| (p.etag.clone(), p.data.len() as u64))
        })?;
        let mut data = Vec::with_capacity(sizes.iter().sum::<u64>() as usize);
        for part in parts {
            data.extend_from_slice(&upload.parts[&part.number].data);
        }
        let etag = multipart_etag(parts.iter().map(|p| p.etag.as_str()));
        let metadata = upload.metadata.clone();
        check_condition(
            key,
            state.objects.get(key).map(|o| o.etag.as_str()),
            condition,
        )?;
        state.uploads.remove(upload_id);
        state.objects.insert(
            key.to_string(),
            Object {
                data: Bytes::from(data),
                etag: etag.clone(),
                last_modified: SystemTime::now(),
                metadata,
            },
        );
        Ok(etag)
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        let mut state = self.state();
        state.upload(key, upload_id)?;
        state.uploads.remove(upload_id);
        Ok(())
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        let mut state = self.state();
        let upload = state.upload(key, upload_id)?;
        Ok(upload
            .parts
            .iter()
            .map(|(&number, part)| PartInfo {
                number,
                etag: part.etag.clone(),
                size: part.data.len() as u64,
            })
            .collect())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<MultipartUpload>> {
        let state = self.state();
        let mut uploads: Vec<MultipartUpload> = state
            .uploads
            .iter()
            .filter(|(_, u)| u.key.starts_with(prefix))
            .map(|(id, u)| MultipartUpload {
                key: u.key.clone(),
                upload_id: id.clone(),
                initiated: u.initiated,
            })
            .collect();
        uploads.sort_by(|a, b| (&a.key, a.initiated).cmp(&(&b.key, b.initiated)));
        Ok(uploads)
    }
}

// ---- S3 behaviour shared with DirStore -------------------------------------------------------

pub(super) fn not_found(key: &str) -> StoreError {
    StoreError::NotFound(key.to_string())
}

pub(super) fn no_such_upload(key: &str, upload_id: &str) -> StoreError {
    StoreError::NotFound(format!("multipart upload {upload_id} of {key}"))
}

/// S3's key rules: non-empty, at most 1,024 bytes of UTF-8.
pub(super) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".to_string()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::Invalid(format!(
            "key is {} bytes long (at most {MAX_KEY_LEN})",
            key.len()
        )));
    }
    Ok(())
}

pub(super) fn check_part_number(number: u32) -> Result<()> {
    if (1..=MAX_PARTS).contains(&number) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "part number {number} is outside 1..={MAX_PARTS}"
        )))
    }
}

/// Lower-cases metadata names, as S3 does (they travel as HTTP headers).
pub(super) fn normalize_metadata(metadata: &Metadata) -> Metadata {
    metadata
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

/// The write condition against the current ETag of the key (`None`: the key is absent).
/// As on S3: `If-None-Match: *` on an existing key and `If-Match` with another ETag answer 412,
/// `If-Match` on a missing key answers 404.
pub(super) fn check_condition(
    key: &str,
    current: Option<&str>,
    condition: &Condition,
) -> Result<()> {
    match (condition, current) {
        (Condition::None, _) => Ok(()),
        (Condition::IfNoneMatch, None) => Ok(()),
        (Condition::IfNoneMatch, Some(_)) => Err(StoreError::PreconditionFailed(format!(
            "{key} already exists (If-None-Match: *)"
        ))),
        (Condition::IfMatch(_), None) => Err(not_found(key)),
        (Condition::IfMatch(want), Some(etag)) => {
            if etag == want.trim_matches('"') {
                Ok(())
            } else {
                Err(StoreError::PreconditionFailed(format!(
                    "{key} has ETag {etag}, not {want}"
                )))
            }
        }
    }
}

/// `If-Match` on a read.
pub(super) fn check_if_match(key: &str, etag: &str, if_match: Option<&str>) -> Result<()> {
    match if_match {
        Some(want) if want.trim_matches('"') != etag => Err(StoreError::PreconditionFailed(
            format!("{key} has ETag {etag}, not {want}"),
        )),
        _ => Ok(()),
    }
}

/// A read range clamped to an object of `size` bytes (empty when it starts at or past the end).
pub(super) fn clamp_range(range: Range<u64>, size: u64) -> Range<u64> {
    let end = range.end.min(size);
    let start = range.start.min(end);
    start..end
}

/// The source range of `UploadPartCopy` must be non-empty and inside the object.
pub(super) fn check_copy_range(from: &str, range: &Range<u64>, size: u64) -> Result<()> {
    if range.start < range.end && range.end <= size {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "copy range {range:?} is not inside {from} ({size} bytes)"
        )))
    }
}

/// S3's checks at `CompleteMultipartUpload`: at least one part, part numbers ascending, each
/// part uploaded with that ETag (`InvalidPart`), every part but the last at least
/// [`MIN_PART_SIZE`] (`EntityTooSmall`). `lookup` gives a part's (etag, size). Returns the sizes.
pub(super) fn check_completed_parts(
    parts: &[CompletedPart],
    mut lookup: impl FnMut(u32) -> Option<(String, u64)>,
) -> Result<Vec<u64>> {
    if parts.is_empty() {
        return Err(StoreError::Invalid(
            "a multipart upload needs at least one part".to_string(),
        ));
    }
    let mut sizes = Vec::with_capacity(parts.len());
    let mut previous = 0;
    for (i, part) in parts.iter().enumerate() {
        if part.number <= previous {
            return Err(StoreError::Invalid(format!(
                "part numbers must be ascending ({} after {previous})",
                part.number
            )));
        }
        previous = part.number;
        let Some((etag, size)) = lookup(part.number) else {
            return Err(StoreError::Invalid(format!(
                "part {} was not uploaded",
                part.number
            )));
        };
        if etag != part.etag.trim_matches('"') {
            return Err(StoreError::Invalid(format!(
                "part {} has ETag {etag}, not {}",
                part.number, part.etag
            )));
        }
        if i + 1 < parts.len() && size < MIN_PART_SIZE {
            return Err(StoreError::Invalid(format!(
                "part {} is {size} bytes, smaller than the minimum {MIN_PART_SIZE} (EntityTooSmall)",
                part.number
            )));
        }
        sizes.push(size);
    }
    Ok(sizes)
}

/// One ListObjectsV2 page over a map sorted by key (UTF-8 byte order, as S3 lists).
///
/// The continuation token is the last key or common prefix returned; the next page starts after
/// it. `max_keys` counts objects and prefixes together, defaults to and is capped at 1,000.
pub(super) fn list_page<V>(
    map: &BTreeMap<String, V>,
    request: &ListRequest<'_>,
    meta: impl Fn(&str, &V) -> ObjectMeta,
) -> ListPage {
    let prefix = request.prefix;
    let delimiter = request.delimiter.filter(|d| !d.is_empty());
    let max = request.max_keys.unwrap_or(DEFAULT_PAGE).min(DEFAULT_PAGE) as usize;
    let token = request.continuation.as_deref();
    let mut page = ListPage::default();
    if max == 0 {
        return page;
    }

    let mut cursor: Bound<String> = match token {
        Some(t) if t >= prefix => Bound::Excluded(t.to_string()),
        _ => Bound::Included(prefix.to_string()),
    };
    let mut count = 0;
    let mut last: Option<String> = None;
    while let Some((key, value)) = map.range((cursor.clone(), Bound::Unbounded)).next() {
        if !key.starts_with(prefix) {
            break;
        }
        let rolled_up = delimiter.and_then(|d| {
            key[prefix.len()..]
                .find(d)
                .map(|i| &key[..prefix.len() + i + d.len()])
        });
        if let Some(common) = rolled_up
            && token.is_some_and(|t| common <= t)
        {
            cursor = after_prefix(map, common); // returned on an earlier page
            continue;
        }
        if count == max {
            // Something is left for another page.
            page.next = last;
            return page;
        }
        match rolled_up {
            Some(common) => {
                cursor = after_prefix(map, common);
                page.prefixes.push(common.to_string());
                last = Some(common.to_string());
            }
            None => {
                page.objects.push(meta(key, value));
                last = Some(key.clone());
                cursor = Bound::Excluded(key.clone());
            }
        }
        count += 1;
    }
    page
}

/// The cursor just past every key starting with `prefix`.
fn after_prefix<V>(map: &BTreeMap<String, V>, prefix: &str) -> Bound<String> {
    // The smallest string above all those starting with `prefix`: its last char, incremented.
    let mut chars = prefix.chars();
    if let Some(last) = chars.next_back() {
        let mut next = last as u32 + 1;
        if (0xD800..0xE000).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            let mut bound = chars.as_str().to_string();
            bound.push(c);
            return Bound::Included(bound);
        }
    }
    // The prefix ends with U+10FFFF: walk past it.
    let mut cursor = Bound::Excluded(prefix.to_string());
    while let Some((key, _)) = map.range((cursor.clone(), Bound::Unbounded)).next() {
        if !key.starts_with(prefix) {
            break;
        }
        cursor = Bound::Excluded(key.clone());
    }
    cursor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(keys: &[&str]) -> BTreeMap<String, ()> {
        keys.iter().map(|k| (k.to_string(), ())).collect()
    }

    fn page(
        map: &BTreeMap<String, ()>,
        request: ListRequest<'_>,
    ) -> (Vec<String>, Vec<String>, Option<String>) {
        let p = list_page(map, &request, |key, _| ObjectMeta {
            key: key.to_string(),
            size: 0,
            etag: String::new(),
            last_modified: SystemTime::UNIX_EPOCH,
            metadata: Metadata::new(),
        });
        (
            p.objects.into_iter().map(|o| o.key).collect(),
            p.prefixes,
            p.next,
        )
    }

    #[test]
    fn delimiter_pages_resume_after_a_prefix() {
        let m = map(&["a", "b/1", "b/2", "b/3", "c", "d/1", "e"]);
        let mut token = None;
        let mut seen = Vec::new();
        loop {
            let (objects, prefixes, next) = page(
                &m,
                ListRequest {
                    prefix: "",
                    delimiter: Some("/"),
                    continuation: token,
                    max_keys: Some(2),
                },
            );
            seen.extend(objects);
            seen.extend(prefixes);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["a", "b/", "c", "d/", "e"]);
    }

    #[test]
    fn exact_fit_has_no_next_page() {
        let m = map(&["p/a", "p/b", "q"]);
        let (objects, _, next) = page(
            &m,
            ListRequest {
                prefix: "p/",
                max_keys: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(objects, ["p/a", "p/b"]);
        assert_eq!(next, None);
    }

    #[test]
    fn prefix_ending_in_the_last_char() {
        let m = map(&["a\u{10FFFF}x", "a\u{10FFFF}y", "b"]);
        let (objects, prefixes, _) = page(
            &m,
            ListRequest {
                prefix: "",
                delimiter: Some("\u{10FFFF}"),
                ..Default::default()
            },
        );
        assert_eq!(prefixes, ["a\u{10FFFF}"]);
        assert_eq!(objects, ["b"]);
    }
}
