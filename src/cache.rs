//! The on-disk cache: local data of files being written, not yet uploaded, or kept for reading.
//!
//! Layout of one mount's cache directory (created mode 0700, locked with `flock` so two daemons
//! can never share it):
//!
//! ```text
//! lock            flock'd by the running daemon; holds its pid
//! data/<id>       one data file per cached file (sparse, written with pwrite)
//! journal/<id>.json   one record per file that must still reach S3 (see `journal`)
//! ```
//!
//! The [`Cache`] is the one owner of local file state, indexed by object key: the filesystem
//! core asks it for a key's [`LocalFile`], renames re-key it, unlinks remove it. Files with a
//! journal record are *dirty*: never evicted, uploaded by `crate::writeback`, recovered at start.
//! Clean, closed files stay cached for reads (least recently used first out) within the byte
//! budget, which counts dirty and clean data alike; when dirty data alone fills the budget,
//! writers wait for uploads to free space and get `ENOSPC` after `cache_full_timeout`.
//!
//! Lock order: the index lock before any `LocalFile` state lock.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

mod file;
pub mod journal;
mod ranges;

pub use file::{LocalFile, Snapshot};
pub use journal::Base;
use journal::{Journal, UploadRecord};
pub use ranges::RangeSet;

/// How often a writer waiting for cache space re-checks without a wake-up.
const SPACE_RECHECK: Duration = Duration::from_millis(250);

/// Limits of the cache.
#[derive(Debug, Clone)]
pub struct CacheLimits {
    /// Byte budget for dirty and clean data together.
    pub max_bytes: u64,
    /// How long a writer waits for uploads to free space before `ENOSPC`.
    pub full_timeout: Duration,
    /// Free space to leave on the filesystem holding the cache.
    pub min_free_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_bytes: 10 << 30,
            full_timeout: Duration::from_secs(60),
            min_free_bytes: 256 << 20,
        }
    }
}

/// Missing ranges of a sparse file are fetched in GETs of at most this size, and a read is
/// widened to whole aligned pieces of it ([`fill_span`]): a sequential read through the file
/// runs near the server's streaming speed, while a random 4 KiB read or write costs one such
/// GET, not the whole object.
pub const FILL_CHUNK: u64 = 8 << 20;

/// `range` widened to whole `FILL_CHUNK` pieces (what a read fetches).
pub fn fill_span(range: std::ops::Range<u64>) -> std::ops::Range<u64> {
    let start = range.start / FILL_CHUNK * FILL_CHUNK;
    start..range.end.div_ceil(FILL_CHUNK).saturating_mul(FILL_CHUNK)
}

/// Why the missing bytes of a sparse file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("local cache: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache directory {0} is in use by another bucketfs process{1}")]
    Locked(PathBuf, String),
    #[error("cache directory {0}: {1}")]
    Io(PathBuf, io::Error),
}

#[derive(Debug)]
struct Index {
    by_key: BTreeMap<String, Arc<LocalFile>>,
    /// Least recently used first; every cached file has an entry.
    lru: lru::LruCache<u64, ()>,
    next_id: u64,
}

#[derive(Debug)]
pub struct Cache {
    data_dir: PathBuf,
    journal: Journal,
    limits: CacheLimits,
    index: Mutex<Index>,
    /// Bytes of every indexed file (kept in step by each file's size changes).
    used: Arc<AtomicU64>,
    /// Woken when space is freed (an upload finished, a file was removed).
    space: tokio::sync::Notify,
    _lock: File,
}

impl Cache {
    /// Open (creating) the cache directory `dir`, take its lock, and recover the journal.
    /// Returns the cache and the recovered dirty files.
    pub fn open(
        dir: &Path,
        limits: CacheLimits,
    ) -> Result<(Cache, Vec<Arc<LocalFile>>), CacheError> {
        let io_err = |e| CacheError::Io(dir.to_path_buf(), e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        let lock = lock_dir(dir)?;
        let data_dir = dir.join("data");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .map_err(io_err)?;
        let journal = Journal::open(dir.join("journal")).map_err(io_err)?;
        let cache = Cache {
            data_dir,
            journal,
            limits,
            index: Mutex::new(Index {
                by_key: BTreeMap::new(),
                lru: lru::LruCache::unbounded(),
                next_id: 1,
            }),
            used: Arc::new(AtomicU64::new(0)),
            space: tokio::sync::Notify::new(),
            _lock: lock,
        };
        let recovered = cache.recover().map_err(io_err)?;
        Ok((cache, recovered))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-open every journaled file; delete data files nothing refers to.
    fn recover(&self) -> io::Result<Vec<Arc<LocalFile>>> {
        let records = self.journal.load()?;
        let mut recovered = Vec::new();
        let mut index = self.index();
        for r in records {
            let path = self.data_dir.join(r.id.to_string());
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(key = r.key, path = %path.display(), "journaled data file is missing; the record is kept: {e}");
                    continue;
                }
            };
            let actual = file.metadata()?.len();
            if actual < r.size {
                tracing::error!(
                    key = r.key,
                    "data file is shorter than its journal record ({actual} < {}); kept for inspection, not uploaded",
                    r.size
                );
                continue;
            }
            if actual > r.size {
                // Writes after the record (a writer open at the crash, never closed): cut
                // off, or growing the file later would show them instead of zeros.
                file.set_len(r.size)?;
            }
            let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.mtime_ns as u64);
            let local = Arc::new(LocalFile::new(
                r.id,
                path,
                file,
                self.used.clone(),
                r.key.clone(),
                r.size,
                mtime,
            ));
            {
                let mut s = local.state();
                s.bump(); // dirty: generation 1, nothing clean yet
                s.journaled = true;
                s.upload = r.upload.clone();
                s.meta = r.meta;
                s.base = r.base.clone();
                s.missing = RangeSet::from_pairs(&r.missing);
            }
            index.next_id = index.next_id.max(r.id + 1);
            if let Some(old) = index.by_key.insert(r.key.clone(), local.clone()) {
                // Two records for one key: the newer id is the newer data.
                tracing::warn!(
                    key = r.key,
                    "two journal records for one key; keeping the newer"
                );
                old.mark_unlinked();
                self.journal.remove(old.id())?;
                index.lru.pop(&old.id());
            }
            index.lru.put(r.id, ());
            local.set_indexed(true);
            recovered.push(local);
        }
        recovered.retain(|f| !f.is_unlinked());
        // Data files without any record hold nothing that was promised: remove them. Ids of
        // every record and data file, even unusable ones, are never handed out again.
        let recorded = self.journal.ids()?;
        for entry in std::fs::read_dir(&self.data_dir)? {
            let entry = entry?;
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(id) = id {
                index.next_id = index.next_id.max(id + 1);
            }
            if !id.is_some_and(|id| recorded.contains(&id)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if let Some(max) = recorded.iter().max() {
            index.next_id = index.next_id.max(max + 1);
        }
        Ok(recovered)
    }

    /// The cached file of `key`, if any (marks it recently used).
    pub fn get(&self, key: &str) -> Option<Arc<LocalFile>> {
        let mut index = self.index();
        let file = index.by_key.get(key)?.clone();
        index.lru.get(&file.id());
        Some(file)
    }

    /// A new, empty local file for `key`, replacing any cached one. With `dirty`, it is a new
    /// object to create even if nothing is written.
    pub fn create(&self, key: &str, dirty: bool) -> io::Result<Arc<LocalFile>> {
        let mut index = self.index();
        let id = index.next_id;
        index.next_id += 1;
        let path = self.data_dir.join(id.to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let local = Arc::new(LocalFile::new(
            id,
            path,
            file,
            self.used.clone(),
            key.to_string(),
            0,
            SystemTime::now(),
        ));
        if dirty {
            local.mark_dirty();
        }
        if let Some(old) = index.by_key.insert(key.to_string(), local.clone()) {
            self.forget_file(&mut index, &old);
        }
        index.lru.put(id, ());
        local.set_indexed(true);
        Ok(local)
    }

    /// Install `local` for its key unless another file got there first; returns the winner.
    pub fn insert_if_absent(&self, local: Arc<LocalFile>) -> Arc<LocalFile> {
        let mut index = self.index();
        let key = local.key();
        if let Some(existing) = index.by_key.get(&key) {
            return existing.clone();
        }
        index.lru.put(local.id(), ());
        index.by_key.insert(key, local.clone());
        local.set_indexed(true);
        local
    }

    /// A data file not yet visible under any key (filled by a download, then `insert_if_absent`).
    pub fn create_detached(&self, key: &str) -> io::Result<Arc<LocalFile>> {
        let mut index = self.index();
        let id = index.next_id;
        index.next_id += 1;
        drop(index);
        let path = self.data_dir.join(id.to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Arc::new(LocalFile::new(
            id,
            path,
            file,
            self.used.clone(),
            key.to_string(),
            0,
            SystemTime::now(),
        )))
    }

    fn forget_file(&self, index: &mut Index, file: &Arc<LocalFile>) {
        file.state().drop_upload();
        file.mark_unlinked();
        file.set_indexed(false);
        index.lru.pop(&file.id());
        if let Err(e) = self.journal.remove(file.id()) {
            tracing::warn!(key = file.key(), "cannot remove journal record: {e}");
        }
        self.space.notify_waiters();
    }

    /// `unlink`: the key's data must never be uploaded; open handles keep their data.
    pub fn remove(&self, key: &str) -> Option<Arc<LocalFile>> {
        let mut index = self.index();
        let file = index.by_key.remove(key)?;
        self.forget_file(&mut index, &file);
        Some(file)
    }

    /// `rename`: move the cached file of `from` to `to`; if it is dirty, its data then replaces
    /// `base` at `to`. Returns the file `to` had, now forgotten (the caller waits for its
    /// upload in flight).
    pub fn rekey(&self, from: &str, to: &str, base: Base) -> io::Result<Option<Arc<LocalFile>>> {
        let mut index = self.index();
        let replaced = index.by_key.remove(to);
        if let Some(old) = &replaced {
            self.forget_file(&mut index, old);
        }
        let Some(file) = index.by_key.remove(from) else {
            return Ok(replaced);
        };
        index.by_key.insert(to.to_string(), file.clone());
        drop(index);
        let mut s = file.state();
        if s.generation != s.clean_generation {
            // An upload under the old key is void: the generation bump makes it abort, and a
            // journaled multipart upload (addressed by key) must not be resumed.
            s.drop_upload();
            s.generation += 1;
            s.base = base;
        }
        s.key = to.to_string();
        if s.journaled {
            self.journal.write(&file.record_locked(&s), true)?;
            s.journaled_generation = s.generation;
        }
        Ok(replaced)
    }

    /// Cached files directly under the directory prefix `dir` (which ends with `/` or is
    /// empty): (name, file).
    pub fn children(&self, dir: &str) -> Vec<(String, Arc<LocalFile>)> {
        let index = self.index();
        index
            .by_key
            .range(dir.to_string()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .filter_map(|(k, f)| {
                let name = &k[dir.len()..];
                (!name.is_empty() && !name.contains('/')).then(|| (name.to_string(), f.clone()))
            })
            .collect()
    }

    /// Cached files at any depth under the key prefix `prefix`: (key, file).
    pub fn under(&self, prefix: &str) -> Vec<(String, Arc<LocalFile>)> {
        let index = self.index();
        index
            .by_key
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect()
    }

    /// Every file with changes not yet in S3.
    pub fn dirty_files(&self) -> Vec<Arc<LocalFile>> {
        self.index()
            .by_key
            .values()
            .filter(|f| f.is_dirty())
            .cloned()
            .collect()
    }

    /// Persist that `file` must reach S3 (at `close`). Survives a daemon crash; `durable` also
    /// survives power loss.
    pub fn journal_dirty(&self, file: &LocalFile, durable: bool) -> io::Result<()> {
        // Written under the file's state lock, so two closes can never land their records in
        // the wrong order.
        let mut s = file.state();
        let dirty = s.generation != s.clean_generation && !s.unlinked;
        if !dirty || (s.journaled && s.journaled_generation == s.generation && !durable) {
            return Ok(());
        }
        self.journal.write(&file.record_locked(&s), durable)?;
        s.journaled = true;
        s.journaled_generation = s.generation;
        Ok(())
    }

    /// `pwrite` into `file`; a multipart upload the change voids is struck from the journal
    /// before the write is acknowledged.
    pub fn write(
        &self,
        file: &LocalFile,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> io::Result<u64> {
        file.write_with(offset, data, append, |f, s| {
            self.journal.write(&f.record_locked(s), true)
        })
    }

    /// chmod/chown/utimens of `file`'s data to be uploaded, with the same journal rule as
    /// `write`.
    pub fn change_meta(
        &self,
        file: &LocalFile,
        change: impl FnOnce(&mut crate::meta::PosixMeta),
    ) -> io::Result<()> {
        file.change_meta_with(change, |f, s| self.journal.write(&f.record_locked(s), true))
    }

    /// `ftruncate` of `file`, with the same journal rule as `write`.
    pub fn set_len(&self, file: &LocalFile, size: u64) -> io::Result<()> {
        file.set_len_with(size, |f, s| self.journal.write(&f.record_locked(s), true))
    }

    // ---- the streaming uploader's bookkeeping (see `crate::writeback::stream`) ------------

    /// Mark `file` as streamed for its current writers; false if it already was, or cannot be
    /// (a sparse staging, whose parts may be server-side copies decided only at close; an
    /// unlinked file).
    pub fn begin_streaming(&self, file: &LocalFile) -> bool {
        let mut s = file.state();
        if s.streaming || !s.missing.is_empty() || s.unlinked {
            return false;
        }
        s.streaming = true;
        true
    }

    /// Adopt `record`, a multipart upload just created for `snapshot`, as `file`'s upload in
    /// progress: only if the file has none and its key, metadata and base version are still
    /// the snapshot's (the upload was created with them).
    pub fn start_streamed_upload(
        &self,
        file: &LocalFile,
        snapshot: &Snapshot,
        record: UploadRecord,
    ) -> io::Result<bool> {
        let mut s = file.state();
        if s.upload.is_some()
            || s.unlinked
            || s.key != snapshot.key
            || s.meta != snapshot.meta
            || s.base != snapshot.base
        {
            return Ok(false);
        }
        s.upload = Some(record);
        s.claimed = 0;
        if s.journaled {
            self.journal.write(&file.record_locked(&s), true)?;
        }
        Ok(true)
    }

    /// Commit bytes `[0, end)` of `file` to its upload `upload_id` before their parts are sent:
    /// from now on a change below `end` voids the upload. False if the upload was voided.
    pub fn claim_for_upload(&self, file: &LocalFile, upload_id: &str, end: u64) -> bool {
        let mut s = file.state();
        if s.upload.as_ref().is_none_or(|u| u.upload_id != upload_id) {
            return false;
        }
        s.claimed = s.claimed.max(end);
        true
    }

    /// Record part `number` of upload `upload_id` as sent (journaled, fsync'd, if the file is).
    /// False if the upload was voided meanwhile: the part must not be trusted.
    pub fn record_streamed_part(
        &self,
        file: &LocalFile,
        upload_id: &str,
        number: u32,
        etag: String,
    ) -> io::Result<bool> {
        let mut s = file.state();
        let Some(upload) = s.upload.as_mut().filter(|u| u.upload_id == upload_id) else {
            return Ok(false);
        };
        upload.parts.retain(|(n, _)| *n != number);
        upload.parts.push((number, etag));
        upload.parts.sort();
        if s.journaled {
            self.journal.write(&file.record_locked(&s), true)?;
        }
        Ok(true)
    }

    /// Record the multipart upload in progress for data generation `generation` (durably: it
    /// is what a resume relies on). Returns false, recording nothing, if the data has changed
    /// since: the upload is stale and must not be resumed.
    pub fn journal_upload(
        &self,
        file: &LocalFile,
        generation: u64,
        upload: Option<UploadRecord>,
    ) -> io::Result<bool> {
        let mut s = file.state();
        if s.generation != generation || s.unlinked {
            return Ok(false);
        }
        s.upload = upload;
        s.journaled = true;
        self.journal.write(&file.record_locked(&s), true)?;
        Ok(true)
    }

    /// `file` reached S3 as `etag` (if `snapshot` is still current): drop its record.
    pub fn mark_clean(
        &self,
        file: &LocalFile,
        snapshot: &Snapshot,
        etag: String,
    ) -> io::Result<bool> {
        {
            // Under the state lock: a close racing with this cannot have its record removed.
            let mut s = file.state();
            if !file.mark_clean_locked(&mut s, snapshot, etag) {
                if s.journaled && !s.unlinked && s.key == snapshot.key {
                    // Still dirty, but its base moved to our upload: a restart must know.
                    self.journal.write(&file.record_locked(&s), false)?;
                }
                return Ok(false);
            }
            self.journal.remove(file.id())?;
            s.journaled = false;
        }
        file.changed.notify_waiters();
        self.space.notify_waiters();
        Ok(true)
    }

    /// Fetch the bytes of `range` that sparse `file` lacks from its base version (pinned by
    /// ETag: a base another client replaced fails with `PreconditionFailed`), one GET per
    /// aligned `FILL_CHUNK` piece, each reserved against the budget first.
    pub async fn fill(
        &self,
        store: &dyn crate::store::ObjectStore,
        file: &LocalFile,
        range: std::ops::Range<u64>,
    ) -> Result<(), FillError> {
        if file.missing_in(range.clone()).is_empty() {
            return Ok(());
        }
        let Base::Version(etag) = file.base() else {
            return Err(io::Error::other(format!(
                "{}: part of the data is in no known object version",
                file.key()
            ))
            .into());
        };
        let key = file.key();
        let mut at = range.start / FILL_CHUNK * FILL_CHUNK;
        while at < range.end {
            // The span of this piece's missing bytes: they all lie within the base object
            // (missing ranges only ever shrink), so no GET asks for bytes past its end.
            let missing = file.missing_in(at.max(range.start)..(at + FILL_CHUNK).min(range.end));
            at += FILL_CHUNK;
            let (Some(first), Some(last)) = (missing.first(), missing.last()) else {
                continue;
            };
            let span = first.start..last.end;
            self.reserve(span.end - span.start).await?;
            let data = store.get_range(&key, span.clone(), Some(&etag)).await?;
            if (data.len() as u64) < span.end - span.start {
                return Err(io::Error::other(format!(
                    "{key}: short read of {span:?} ({} bytes)",
                    data.len()
                ))
                .into());
            }
            file.fill_missing(span.start, &data)?;
        }
        Ok(())
    }

    // ---- budget -----------------------------------------------------------------------------

    /// Bytes the cache holds, dirty and clean (what `--cache-size` bounds).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Drop clean, closed files, least recently used first, until the cache fits the budget
    /// with `room` bytes to spare.
    pub fn evict(&self, room: u64) {
        let target = self.limits.max_bytes.saturating_sub(room);
        if self.used.load(Ordering::Relaxed) <= target {
            return;
        }
        let mut index = self.index();
        let mut total = self.used.load(Ordering::Relaxed);
        let by_id: HashMap<u64, String> = index
            .by_key
            .iter()
            .map(|(k, f)| (f.id(), k.clone()))
            .collect();
        let order: Vec<u64> = index.lru.iter().rev().map(|(id, _)| *id).collect();
        for id in order {
            if total <= target {
                break;
            }
            let Some(key) = by_id.get(&id) else { continue };
            let Some(file) = index.by_key.get(key).cloned() else {
                continue;
            };
            // Index + this clone = 2: anything more is an operation using the file right now.
            if file.is_dirty()
                || file.open_count() > 0
                || file.state().journaled
                || Arc::strong_count(&file) > 2
            {
                continue;
            }
            total = total.saturating_sub(file.size());
            index.by_key.remove(key);
            index.lru.pop(&id);
            file.set_indexed(false);
            metrics::counter!(crate::metrics::names::EVICTIONS).increment(1);
            tracing::debug!(key, "evicted from the cache");
        }
    }

    /// Drop the clean copy of `key` (it no longer matches S3). Dirty or open files stay.
    pub fn evict_key(&self, key: &str) {
        let mut index = self.index();
        let Some(file) = index.by_key.get(key).cloned() else {
            return;
        };
        if file.is_dirty() || file.open_count() > 0 || file.state().journaled {
            return;
        }
        index.by_key.remove(key);
        index.lru.pop(&file.id());
        file.set_indexed(false);
        self.space.notify_waiters();
    }

    /// Wait until `bytes` more can be written without passing the budget: evict clean files,
    /// then wait for uploads; `ENOSPC` after `full_timeout`. Also refuses to fill the disk.
    pub async fn reserve(&self, bytes: u64) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + self.limits.full_timeout;
        loop {
            let notified = self.space.notified();
            self.evict(bytes);
            let total = self.used.load(Ordering::Relaxed);
            let disk_ok = free_bytes(&self.data_dir)
                .is_none_or(|free| free >= bytes + self.limits.min_free_bytes);
            if total + bytes <= self.limits.max_bytes && disk_ok {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            // Woken when space may have been freed, and in any case every `SPACE_RECHECK`: a
            // file marked clean is evictable only once its uploader lets go of it, a moment
            // after the wake-up.
            let _ = tokio::time::timeout_at((now + SPACE_RECHECK).min(deadline), notified).await;
        }
    }

    pub fn limits(&self) -> &CacheLimits {
        &self.limits
    }
}

/// Take an exclusive `flock` on `dir/lock`, writing our pid into it.
fn lock_dir(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CacheError::Io(dir.to_path_buf(), e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path)
            .ok()
            .map(|p| format!(" (pid {})", p.trim()))
            .unwrap_or_default();
        return Err(CacheError::Locked(dir.to_path_buf(), holder));
    }
    file.set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()))
        .map_err(|e| CacheError::Io(dir.to_path_buf(), e))?;
    Ok(file)
}

/// Bytes available to us on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a valid C string and a zeroed out-struct.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u64) -> CacheLimits {
        CacheLimits {
            max_bytes: max,
            full_timeout: Duration::from_millis(200),
            min_free_bytes: 0,
        }
    }

    #[test]
    fn a_second_daemon_is_refused_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_cache, _) = Cache::open(dir.path(), limits(1 << 20)).unwrap();
        let err = Cache::open(dir.path(), limits(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
    }

    #[test]
    fn journaled_files_survive_a_restart_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (cache, recovered) = Cache::open(dir.path(), limits(1 << 20)).unwrap();
            assert!(recovered.is_empty());
            let a = cache.create("k/a", true).unwrap();
            a.write(0, b"closed", false).unwrap();
            cache.journal_dirty(&a, false).unwrap();
            let b = cache.create("k/b", true).unwrap();
            b.write(0, b"never closed", false).unwrap();
            // Simulate a crash: nothing is dropped cleanly.
            std::mem::forget(a);
            std::mem::forget(b);
            std::mem::forget(cache);
        }
        // The lock died with the "process": drop the leaked fd's lock by closing all is not
        // possible here, so re-open through a fresh directory copy.
        let copy = tempfile::tempdir().unwrap();
        for sub in ["data", "journal"] {
            std::fs::create_dir_all(copy.path().join(sub)).unwrap();
            for e in std::fs::read_dir(dir.path().join(sub)).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), copy.path().join(sub).join(e.file_name())).unwrap();
            }
        }
        let (cache, recovered) = Cache::open(copy.path(), limits(1 << 20)).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].key(), "k/a");
        assert!(recovered[0].is_dirty());
        assert_eq!(recovered[0].read_at(0, 100).unwrap(), b"closed");
        assert!(cache.get("k/b").is_none());
        assert_eq!(
            std::fs::read_dir(copy.path().join("data")).unwrap().count(),
            1,
            "the unjournaled data file is gone"
        );
        // A new file gets an id that does not collide with the recovered one.
        let c = cache.create("k/c", true).unwrap();
        assert_ne!(c.id(), recovered[0].id());
    }

    #[test]
    fn dirty_generations_protect_rewrites_during_upload() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open(dir.path(), limits(1 << 20)).unwrap();
        let f = cache.create("k", true).unwrap();
        f.write(0, b"hello", false).unwrap();
        let snap = f.snapshot();
        f.write(5, b" world", false).unwrap(); // a write while `snap` uploads
        assert!(!cache.mark_clean(&f, &snap, "e1".into()).unwrap());
        assert!(f.is_dirty());
        let snap = f.snapshot();
        assert!(cache.mark_clean(&f, &snap, "e2".into()).unwrap());
        assert!(!f.is_dirty());
        assert_eq!(f.etag().as_deref(), Some("e2"));
    }

    #[test]
    fn rename_and_unlink_move_and_drop_local_state() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open(dir.path(), limits(1 << 20)).unwrap();
        let f = cache.create("d/a", true).unwrap();
        cache.create("d/sub/x", true).unwrap();
        cache.rekey("d/a", "d/b", Base::Unknown).unwrap();
        assert!(cache.get("d/a").is_none());
        assert_eq!(cache.get("d/b").unwrap().id(), f.id());
        let names: Vec<String> = cache.children("d/").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b"]);
        cache.remove("d/b");
        assert!(f.is_unlinked());
        assert!(!f.is_dirty());
    }

    #[tokio::test]
    async fn budget_evicts_clean_files_and_pushes_back_on_dirty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = Cache::open(dir.path(), limits(1000)).unwrap();
        let clean = cache.create("clean", false).unwrap();
        clean.fill_at(0, &[1; 600]).unwrap();
        drop(clean); // a file someone holds is in use and never evicted
        let dirty = cache.create("dirty", true).unwrap();
        dirty.write(0, &[2; 300], false).unwrap();
        // 900 used; 400 more fits only by evicting the clean file.
        cache.reserve(400).await.unwrap();
        assert!(cache.get("clean").is_none());
        assert!(cache.get("dirty").is_some(), "dirty data is never evicted");
        // Dirty data alone: 300 + 800 > 1000, and nothing can be evicted: ENOSPC after the timeout.
        let err = cache.reserve(800).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }
}
