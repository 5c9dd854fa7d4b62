//! Reading an object that is not in the local cache: ranged GETs with a read-ahead window.
//!
//! One [`Reader`] per open handle. Sequential reads double the window (from 1 MiB up to 32 MiB),
//! so a streaming reader makes few large GETs; a read elsewhere drops back to fetching just what
//! was asked, so random access does not drag in megabytes it will never use. Every GET carries
//! `If-Match` with the ETag seen at open: if the object is replaced while the file is open, reads
//! fail (`PreconditionFailed`, surfaced as `ESTALE`) instead of mixing two versions.

use std::sync::Arc;

use bytes::Bytes;

use crate::store::{ObjectStore, Result};

/// First window of a sequential reader: one small GET before the pattern is known.
const MIN_WINDOW: u64 = 1 << 20;
/// Largest window: bounds the memory of one open handle.
const MAX_WINDOW: u64 = 32 << 20;

#[derive(Debug)]
pub struct Reader {
    key: String,
    etag: String,
    size: u64,
    /// Bytes `buffer_start..buffer_start + buffer.len()` of the object.
    buffer_start: u64,
    buffer: Bytes,
    /// The next window to fetch when reading sequentially.
    window: u64,
    /// Where the previous read ended (a read starting here is sequential).
    last_end: u64,
}

impl Reader {
    pub fn new(key: String, etag: String, size: u64) -> Reader {
        Reader {
            key,
            etag,
            size,
            buffer_start: 0,
            buffer: Bytes::new(),
            window: MIN_WINDOW,
            last_end: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Up to `len` bytes at `offset` (fewer at the end of the object).
    pub async fn read(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        offset: u64,
        len: u32,
    ) -> Result<Bytes> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let sequential = offset == self.last_end;
        self.last_end = end;
        let buffered_end = self.buffer_start + self.buffer.len() as u64;
        if offset >= self.buffer_start && end <= buffered_end {
            let from = (offset - self.buffer_start) as usize;
            return Ok(self.buffer.slice(from..from + (end - offset) as usize));
        }
        let fetch = if sequential {
            let w = self.window;
            self.window = (self.window * 2).min(MAX_WINDOW);
            w.max(end - offset)
        } else {
            self.window = MIN_WINDOW;
            end - offset
        };
        let fetch_end = (offset + fetch).min(self.size);
        let data = store
            .get_range(&self.key, offset..fetch_end, Some(&self.etag))
            .await?;
        let n = (end - offset).min(data.len() as u64) as usize;
        let out = data.slice(..n);
        self.buffer_start = offset;
        self.buffer = data;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Body, MemoryStore, PutOptions, StoreError};

    #[tokio::test]
    async fn sequential_and_random_reads_return_the_right_bytes() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let etag = store
            .put(
                "k",
                Body::Bytes(data.clone().into()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let mut r = Reader::new("k".into(), etag, data.len() as u64);
        let mut off = 0u64;
        while off < data.len() as u64 {
            let got = r.read(&store, off, 131_072).await.unwrap();
            assert_eq!(&got[..], &data[off as usize..(off as usize + got.len())]);
            off += got.len() as u64;
        }
        let got = r.read(&store, 1234, 10).await.unwrap();
        assert_eq!(&got[..], &data[1234..1244]);
        assert!(
            r.read(&store, data.len() as u64, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_replaced_object_makes_reads_fail_instead_of_mixing() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let etag = store
            .put(
                "k",
                Body::Bytes(vec![1u8; 3 << 20].into()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let mut r = Reader::new("k".into(), etag, 3 << 20);
        r.read(&store, 0, 4096).await.unwrap();
        store
            .put(
                "k",
                Body::Bytes(vec![2u8; 3 << 20].into()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let err = r.read(&store, 2 << 20, 4096).await.unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed(_)), "{err:?}");
    }
}
