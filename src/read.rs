//! Reading an object that is not in the local cache: ranged GETs with a parallel read-ahead.
//!
//! One [`Reader`] per open handle. A reader keeps a queue of *chunks*: contiguous ranges of the
//! object just ahead of the read position, each fetched by its own GET task. Sequential reads
//! double the read-ahead window (from `MIN_AHEAD` up to `MAX_AHEAD`); a window wider than
//! `CHUNK` is fetched as several GETs in flight at once, which is what fills a fast link (one
//! GET stream is limited by its round trips). The first read after open or a seek is one small
//! GET, so first-byte latency does not pay for read-ahead; a read far from the stream (random
//! access) drops the queue and fetches just what was asked, so random readers do not drag in
//! megabytes they never use. Memory per handle is bounded by `MAX_AHEAD + CHUNK`.
//!
//! Every GET carries `If-Match` with the ETag seen at open: if the object is replaced while the
//! file is open, reads fail (`PreconditionFailed`, surfaced as `ESTALE`) instead of mixing two
//! versions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use crate::store::{ObjectStore, Result, StoreError};

/// First read-ahead window of a sequential reader.
const MIN_AHEAD: u64 = 1 << 20;
/// Largest read-ahead window: 8 GETs of `CHUNK` in flight, enough to saturate loopback S3 here
/// (docs/BENCHMARKS.md), and a bound on one open handle's memory.
const MAX_AHEAD: u64 = 32 << 20;
/// Largest single read-ahead GET; wider windows are split into GETs of this size.
const CHUNK: u64 = 4 << 20;
/// Chunks kept behind the furthest read of a stream: the kernel sends a file's read-ahead as
/// several requests at once, which may arrive out of order. (A larger kernel read-ahead,
/// `read_ahead_kb` of the mount's bdi, was measured slower here: its concurrent requests wait
/// on the handle's reader in turn.)
const KEEP_BEHIND: u64 = 4 << 20;

/// A range of the object, being fetched or fetched.
#[derive(Debug)]
struct Chunk {
    range: Range<u64>,
    fetch: Fetch,
}

#[derive(Debug)]
enum Fetch {
    Pending(JoinHandle<Result<Bytes>>),
    Ready(Bytes),
}

impl Chunk {
    /// The chunk's bytes, waiting for its GET if needed.
    async fn bytes(&mut self) -> Result<Bytes> {
        if let Fetch::Pending(task) = &mut self.fetch {
            let data = task
                .await
                .map_err(|e| StoreError::Other(format!("read-ahead task: {e}")))??;
            self.fetch = Fetch::Ready(data);
        }
        match &self.fetch {
            Fetch::Ready(data) => Ok(data.clone()),
            Fetch::Pending(_) => unreachable!("just resolved"),
        }
    }
}

#[derive(Debug)]
pub struct Reader {
    key: String,
    etag: String,
    size: u64,
    /// Contiguous, ascending chunks around and ahead of the read position.
    chunks: VecDeque<Chunk>,
    /// Bytes to keep fetched or in flight past the furthest read of the stream.
    ahead: u64,
    /// Where the furthest read of the stream ended (0 before the first read).
    high: u64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Reader {
    pub fn new(key: String, etag: String, size: u64) -> Reader {
        Reader {
            key,
            etag,
            size,
            chunks: VecDeque::new(),
            ahead: MIN_AHEAD,
            high: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The object version this reader is pinned to: `(key, ETag)`.
    pub fn pinned(&self) -> (&str, &str) {
        (&self.key, &self.etag)
    }

    /// Follow the same bytes to another object version: the mount's own server-side copy of
    /// the pinned version (a rename, a metadata self-copy) made `(key, etag)`. GETs in flight
    /// for the old version are dropped.
    pub fn repin(&mut self, key: String, etag: String) {
        self.clear();
        self.key = key;
        self.etag = etag;
    }

    /// Drop every chunk, cancelling GETs in flight.
    fn clear(&mut self) {
        for chunk in self.chunks.drain(..) {
            if let Fetch::Pending(task) = chunk.fetch {
                task.abort();
            }
        }
    }

    fn fetched_from(&self) -> Option<u64> {
        self.chunks.front().map(|c| c.range.start)
    }

    fn fetched_to(&self) -> Option<u64> {
        self.chunks.back().map(|c| c.range.end)
    }

    /// Whether a read at `offset` continues the stream: inside the chunks, or at most one
    /// window past the furthest read (requests the kernel sends together arrive in any order).
    fn continues_stream(&self, offset: u64) -> bool {
        let in_chunks = self
            .fetched_from()
            .zip(self.fetched_to())
            .is_some_and(|(from, to)| (from..to).contains(&offset));
        in_chunks || (offset >= self.high && offset <= self.high + self.ahead)
    }

    /// Start a GET for `range`.
    fn spawn_fetch(&self, store: &Arc<dyn ObjectStore>, range: Range<u64>) -> Chunk {
        let (store, key, etag) = (store.clone(), self.key.clone(), self.etag.clone());
        let fetched = range.clone();
        let task = tokio::spawn(async move { store.get_range(&key, fetched, Some(&etag)).await });
        Chunk {
            range,
            fetch: Fetch::Pending(task),
        }
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
        if !self.continues_stream(offset) {
            // Random access: just what was asked, one GET; a sequential read from its end on
            // starts a new stream.
            self.clear();
            self.ahead = MIN_AHEAD;
            self.high = end;
            let data = store
                .get_range(&self.key, offset..end, Some(&self.etag))
                .await?;
            self.chunks.push_back(Chunk {
                range: offset..offset + data.len() as u64,
                fetch: Fetch::Ready(data.clone()),
            });
            return Ok(data);
        }
        // Forget what the stream is well past; schedule the window past its furthest read.
        self.high = self.high.max(end);
        let behind = self.high.saturating_sub(KEEP_BEHIND).min(offset);
        while self.chunks.front().is_some_and(|c| c.range.end <= behind) {
            self.chunks.pop_front();
        }
        let target = (self.high + self.ahead).min(self.size);
        let piece = self.ahead.min(CHUNK);
        // From the last chunk on, so that the chunks stay contiguous.
        let mut next = self.fetched_to().unwrap_or(offset);
        while next < target {
            let range = next..(next + piece).min(self.size);
            next = range.end;
            let chunk = self.spawn_fetch(store, range);
            self.chunks.push_back(chunk);
        }
        self.ahead = (self.ahead * 2).min(MAX_AHEAD);
        match self.copy_out(offset..end).await {
            Ok(data) if data.len() as u64 == end - offset => Ok(data),
            // The chunks did not cover the read (cannot happen while they stay contiguous
            // from before `offset`): fetch it directly rather than return a short read.
            Ok(_) => {
                store
                    .get_range(&self.key, offset..end, Some(&self.etag))
                    .await
            }
            Err(e) => {
                self.clear();
                Err(e)
            }
        }
    }

    /// The bytes of `want` from the chunks (which cover it), waiting for their GETs.
    async fn copy_out(&mut self, want: Range<u64>) -> Result<Bytes> {
        let mut parts = Vec::new();
        for chunk in self.chunks.iter_mut() {
            if chunk.range.end <= want.start {
                continue;
            }
            if chunk.range.start >= want.end {
                break;
            }
            let data = chunk.bytes().await?;
            let from = want.start.max(chunk.range.start) - chunk.range.start;
            let to = (want.end.min(chunk.range.end) - chunk.range.start).min(data.len() as u64);
            parts.push(data.slice(from as usize..to.max(from) as usize));
        }
        Ok(match parts.len() {
            1 => parts.pop().unwrap_or_default(),
            _ => {
                let mut out = BytesMut::with_capacity((want.end - want.start) as usize);
                for p in parts {
                    out.extend_from_slice(&p);
                }
                out.freeze()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Body, FaultyStore, MemoryStore, PutOptions, StoreError};

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

    /// A sequential reader has several GETs in flight once its window passes one chunk, and
    /// makes far fewer GETs than reads; a random reader fetches exactly what it asks for.
    #[tokio::test(flavor = "multi_thread")]
    async fn sequential_reads_fetch_ahead_in_parallel_and_random_reads_do_not() {
        let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let data: Vec<u8> = (0..(24u32 << 20)).map(|i| (i % 251) as u8).collect();
        let etag = memory
            .put(
                "k",
                Body::Bytes(data.clone().into()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let faulty = Arc::new(FaultyStore::new(memory));
        faulty.set_latency(std::time::Duration::from_millis(20));
        let store: Arc<dyn ObjectStore> = faulty.clone();

        let mut r = Reader::new("k".into(), etag.clone(), data.len() as u64);
        let mut off = 0usize;
        let mut reads = 0;
        while off < data.len() {
            let got = r.read(&store, off as u64, 131_072).await.unwrap();
            assert_eq!(&got[..], &data[off..off + got.len()], "at {off}");
            off += got.len();
            reads += 1;
        }
        let gets = faulty.calls("get_range");
        assert!(gets * 10 < reads, "{gets} GETs for {reads} reads");

        // Reads the kernel sent together arrive out of order: still one stream, right bytes.
        faulty.reset_counters();
        let mut r = Reader::new("k".into(), etag.clone(), data.len() as u64);
        let mut order: Vec<usize> = (0..data.len() / 131_072).collect();
        for group in order.chunks_mut(4) {
            group.reverse();
        }
        for i in order {
            let off = i * 131_072;
            let got = r.read(&store, off as u64, 131_072).await.unwrap();
            assert_eq!(&got[..], &data[off..off + 131_072], "at {off}");
        }
        let gets = faulty.calls("get_range");
        assert!(gets * 10 < reads, "{gets} GETs for out-of-order reads");
        assert!(
            faulty.max_in_flight("get_range") >= 4,
            "{}",
            faulty.max_in_flight("get_range")
        );

        // Random 4 KiB reads: one GET each, of 4 KiB.
        faulty.reset_counters();
        let mut r = Reader::new("k".into(), etag, data.len() as u64);
        for i in 1..=20u64 {
            let at = (i * 7_919_993) % (data.len() as u64 - 4096);
            let got = r.read(&store, at, 4096).await.unwrap();
            assert_eq!(&got[..], &data[at as usize..at as usize + 4096]);
        }
        assert_eq!(faulty.calls("get_range"), 20);
        assert_eq!(faulty.max_in_flight("get_range"), 1);
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
