//! Turning a local file into an object: one PutObject, or a multipart upload with parallel parts.
//!
//! Files smaller than the part size go as one PutObject; larger ones as a multipart upload whose
//! parts are read straight from the cache file (`Body::File`, streamed, never held in memory)
//! with up to `concurrency` parts in flight. The part size grows for huge files so the upload
//! never needs more than S3's 10,000 parts. A failed multipart upload is aborted so it leaves no
//! parts behind; nothing is ever published unless every part succeeded.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::store::{Body, CompletedPart, MAX_PARTS, ObjectStore, PutOptions, Result};

#[derive(Debug, Clone)]
pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    part_size: u64,
    concurrency: usize,
}

impl Uploader {
    pub fn new(store: Arc<dyn ObjectStore>, part_size: u64, concurrency: usize) -> Uploader {
        Uploader {
            store,
            part_size,
            concurrency: concurrency.max(1),
        }
    }

    /// Upload bytes `0..size` of `path` as `key`; returns the new object's ETag.
    pub async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        options: &PutOptions,
    ) -> Result<String> {
        let body = |range: Range<u64>| Body::File {
            path: path.to_path_buf(),
            offset: range.start,
            len: range.end - range.start,
        };
        if size < self.part_size {
            return self.store.put(key, body(0..size), options).await;
        }
        let upload_id = self.store.create_multipart(key, options).await?;
        let parts = plan_parts(size, self.part_size);
        let result: Result<Vec<CompletedPart>> =
            futures::stream::iter(parts.into_iter().enumerate())
                .map(|(i, range)| {
                    let number = i as u32 + 1;
                    let upload_id = &upload_id;
                    let body = body(range);
                    async move {
                        let etag = self.store.upload_part(key, upload_id, number, body).await?;
                        Ok(CompletedPart { number, etag })
                    }
                })
                .buffered(self.concurrency)
                .try_collect()
                .await;
        let completed = match result {
            Ok(parts) => {
                self.store
                    .complete_multipart(key, &upload_id, &parts, &options.condition)
                    .await
            }
            Err(e) => Err(e),
        };
        if completed.is_err()
            && let Err(abort) = self.store.abort_multipart(key, &upload_id).await
        {
            tracing::warn!(
                key,
                upload_id,
                "cannot abort failed multipart upload: {abort}"
            );
        }
        completed
    }
}

/// The byte ranges of the parts of a `size`-byte object: `part_size` each (the last one shorter),
/// with the part size doubled until at most `MAX_PARTS` parts are needed.
pub fn plan_parts(size: u64, part_size: u64) -> Vec<Range<u64>> {
    let part = effective_part_size(size, part_size);
    (0..size.div_ceil(part))
        .map(|i| i * part..((i + 1) * part).min(size))
        .collect()
}

/// The part size actually used for an object of `size` bytes.
pub fn effective_part_size(size: u64, part_size: u64) -> u64 {
    let mut part = part_size.max(1);
    while size.div_ceil(part) > MAX_PARTS as u64 {
        part *= 2;
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, md5_hex, multipart_etag};

    const MIB: u64 = 1 << 20;

    #[test]
    fn part_plans() {
        assert_eq!(plan_parts(0, 8 * MIB), Vec::<Range<u64>>::new());
        assert_eq!(plan_parts(8 * MIB, 8 * MIB), vec![0..8 * MIB]);
        assert_eq!(
            plan_parts(8 * MIB + 1, 8 * MIB),
            vec![0..8 * MIB, 8 * MIB..8 * MIB + 1]
        );
        // 80,000 MiB at 8 MiB would be exactly 10,000 parts: allowed.
        assert_eq!(effective_part_size(80_000 * MIB, 8 * MIB), 8 * MIB);
        // One byte more needs 10,001 parts: the part size doubles.
        assert_eq!(effective_part_size(80_000 * MIB + 1, 8 * MIB), 16 * MIB);
        let plan = plan_parts(5 << 40, 8 * MIB); // 5 TiB, S3's largest object
        assert!(plan.len() <= MAX_PARTS as usize);
        assert_eq!(plan.last().unwrap().end, 5 << 40);
    }

    #[tokio::test]
    async fn small_files_are_one_put_and_large_ones_multipart() {
        let store = Arc::new(MemoryStore::new());
        let up = Uploader::new(store.clone(), 5 * MIB, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(11 * MIB + 7)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();

        let etag = up
            .upload_file("small", &path, 100, &PutOptions::default())
            .await
            .unwrap();
        assert_eq!(etag, md5_hex(&data[..100]));

        let etag = up
            .upload_file("big", &path, data.len() as u64, &PutOptions::default())
            .await
            .unwrap();
        let parts: Vec<String> = data.chunks(5 * MIB as usize).map(md5_hex).collect();
        assert_eq!(etag, multipart_etag(parts.iter().map(String::as_str)));
        let got = store.get_range("big", 0..u64::MAX, None).await.unwrap();
        assert!(got == data, "multipart object differs");
    }
}
