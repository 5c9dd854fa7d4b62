//! One file's local data: the data file plus its in-memory state.
//!
//! Every change bumps a *generation*; an upload snapshots the generation first and marks the file
//! clean only if no change happened meanwhile, so a rewrite during an upload is never lost and an
//! older generation never passes for the newest. Writes hold the state lock across the `pwrite`,
//! so a snapshot read under the same lock is consistent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use super::journal::{Base, FORMAT, Record, UploadRecord};
use super::ranges::RangeSet;
use crate::meta::PosixMeta;

#[derive(Debug)]
pub(super) struct State {
    pub key: String,
    pub size: u64,
    pub mtime: SystemTime,
    /// Mode, owner and explicitly set mtime, uploaded as object metadata with the data.
    pub meta: PosixMeta,
    /// Bumped by every change.
    pub generation: u64,
    /// The generation known to be in S3.
    pub clean_generation: u64,
    /// When the file last went from clean to dirty (None while clean): the age of the oldest
    /// change not yet in S3.
    pub dirty_since: Option<Instant>,
    /// The name was unlinked: never upload again.
    pub unlinked: bool,
    /// Open descriptors (an open file is never evicted), and how many of them may write (a
    /// file being written is not uploaded unless forced: it would publish a half-written file).
    pub open: u32,
    pub writers: u32,
    /// ETag of the object this data equals, when clean.
    pub etag: Option<String>,
    /// The object version the data replaces (the condition of its next upload).
    pub base: Base,
    /// Ranges of the data file not fetched from `base` yet (a sparse staging of a large
    /// object): reads and uploads fill them first. Empty for a complete file.
    pub missing: RangeSet,
    /// A journal record exists (the file is dirty and was closed, or is uploading).
    pub journaled: bool,
    /// The generation the journal record describes (a close that changed nothing since the
    /// last record does not rewrite it).
    pub journaled_generation: u64,
    /// Whether the file is in the cache's index, and the bytes it adds to the cache's usage.
    pub indexed: bool,
    pub accounted: u64,
    /// The multipart upload in progress, mirrored in the journal (while the file is journaled).
    pub upload: Option<UploadRecord>,
    /// Bytes `[0, claimed)` are committed to `upload` by the streaming uploader: uploaded, or
    /// being uploaded now. A change below them voids the upload.
    pub claimed: u64,
    /// Multipart uploads (key, upload id) this file started and will never complete: voided
    /// by a change, a rename or an unlink. The uploader aborts them. Not persisted: after a
    /// crash, the next multipart upload of the key (or a bucket lifecycle rule) clears them.
    pub abandoned: Vec<(String, String)>,
    /// The streaming uploader was started for the current writers (see `crate::writeback`); it
    /// is not started again, even once it has stopped, until the last writer closes.
    pub streaming: bool,
    /// When the uploader should next try (None: not queued).
    pub due: Option<Instant>,
    /// Consecutive failed upload attempts, and the last failure.
    pub failures: u32,
    pub last_error: Option<String>,
}

impl State {
    /// Bytes below which a change voids the multipart upload in progress: what its recorded
    /// parts cover, or what the streaming uploader has claimed.
    fn upload_floor(&self) -> u64 {
        self.upload.as_ref().map_or(0, |u| {
            let recorded = u.parts.iter().map(|(n, _)| *n as u64).max().unwrap_or(0);
            (recorded * u.part_size).max(self.claimed)
        })
    }

    /// Give up the multipart upload in progress: it is aborted later (see `abandoned`).
    pub fn drop_upload(&mut self) {
        if let Some(upload) = self.upload.take() {
            self.abandoned.push((self.key.clone(), upload.upload_id));
        }
        self.claimed = 0;
    }

    /// A change: the next generation. A clean file turns dirty now.
    pub fn bump(&mut self) {
        if self.generation == self.clean_generation {
            self.dirty_since = Some(Instant::now());
        }
        self.generation += 1;
    }
}

#[derive(Debug)]
pub struct LocalFile {
    id: u64,
    path: PathBuf,
    file: File,
    /// The cache's byte count, kept in step with this file's size while it is indexed.
    usage: Arc<AtomicU64>,
    pub(super) state: Mutex<State>,
    /// Serialises uploads of this file.
    pub upload_lock: tokio::sync::Mutex<()>,
    /// Woken whenever the file becomes clean or an upload attempt fails (fsync waits on it).
    pub changed: tokio::sync::Notify,
}

/// A consistent view of a local file for an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub key: String,
    pub size: u64,
    pub generation: u64,
    pub meta: PosixMeta,
    pub base: Base,
}

impl LocalFile {
    pub(super) fn new(
        id: u64,
        path: PathBuf,
        file: File,
        usage: Arc<AtomicU64>,
        key: String,
        size: u64,
        mtime: SystemTime,
    ) -> LocalFile {
        LocalFile {
            id,
            path,
            file,
            usage,
            state: Mutex::new(State {
                key,
                size,
                mtime,
                meta: PosixMeta::default(),
                generation: 0,
                clean_generation: 0,
                dirty_since: None,
                unlinked: false,
                open: 0,
                writers: 0,
                etag: None,
                base: Base::Unknown,
                missing: RangeSet::new(),
                journaled: false,
                journaled_generation: 0,
                indexed: false,
                accounted: 0,
                upload: None,
                claimed: 0,
                abandoned: Vec::new(),
                streaming: false,
                due: None,
                failures: 0,
                last_error: None,
            }),
            upload_lock: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update of plain values: they are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn key(&self) -> String {
        self.state().key.clone()
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    pub fn mtime(&self) -> SystemTime {
        self.state().mtime
    }

    pub fn etag(&self) -> Option<String> {
        self.state().etag.clone()
    }

    pub fn is_dirty(&self) -> bool {
        let s = self.state();
        s.generation != s.clean_generation && !s.unlinked
    }

    /// When the oldest change not yet in S3 was made (None: clean, or unlinked).
    pub fn dirty_since(&self) -> Option<Instant> {
        let s = self.state();
        (s.generation != s.clean_generation && !s.unlinked)
            .then_some(s.dirty_since)
            .flatten()
    }

    pub fn is_unlinked(&self) -> bool {
        self.state().unlinked
    }

    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Whether generation `g` (or a later one) is in S3, or the file no longer needs uploading.
    pub fn is_clean_since(&self, g: u64) -> bool {
        let s = self.state();
        s.clean_generation >= g || s.unlinked
    }

    pub fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    /// Count a failed upload attempt; returns the number of consecutive failures.
    pub fn record_failure(&self, error: String) -> u32 {
        let mut s = self.state();
        s.failures += 1;
        s.last_error = Some(error);
        s.failures
    }

    pub fn failures(&self) -> u32 {
        self.state().failures
    }

    /// The ETag of the object this (clean) data equals.
    pub fn set_etag(&self, etag: String) {
        let mut s = self.state();
        s.base = Base::Version(etag.clone());
        s.etag = Some(etag);
    }

    /// The object version the data replaces (see [`Base`]).
    pub fn base(&self) -> Base {
        self.state().base.clone()
    }

    pub fn set_base(&self, base: Base) {
        self.state().base = base;
    }

    /// Bytes committed to the streamed upload in progress (see `State::claimed`).
    pub fn claimed(&self) -> u64 {
        self.state().claimed
    }

    /// Upload `upload_id` was completed: it is the object now, not an upload to abandon.
    pub fn upload_completed(&self, upload_id: &str) {
        let mut s = self.state();
        if s.upload.as_ref().is_some_and(|u| u.upload_id == upload_id) {
            s.upload = None;
            s.claimed = 0;
        }
    }

    /// Give up the multipart upload in progress, if any (see `State::abandoned`).
    pub fn give_up_upload(&self) {
        self.state().drop_upload();
    }

    /// The multipart uploads given up since the last call, to abort (key, upload id).
    pub fn take_abandoned(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.state().abandoned)
    }

    /// The multipart upload the journal holds for this file, if any.
    pub fn journaled_upload(&self) -> Option<UploadRecord> {
        self.state().upload.clone()
    }

    /// The upload's view of the file now. Its mtime goes up with the data (`x-amz-meta-mtime`,
    /// unless one is stored already): the time of the last write this data holds, so the file
    /// shows the same mtime after it leaves the cache or the mount restarts (Open WebUI's HTTP
    /// ETags and `rsync` derive from it). A later write makes the file dirty again, and its
    /// upload carries the later time.
    pub fn snapshot(&self) -> Snapshot {
        Self::snapshot_locked(&self.state())
    }

    /// The view a streamed upload is created with, while the file is still being written: its
    /// metadata is fixed before the data is final, so it carries only the stored attributes
    /// and no implied mtime (such an object shows its LastModified once it leaves the cache).
    pub fn streaming_snapshot(&self) -> Snapshot {
        let s = self.state();
        Snapshot {
            meta: s.meta,
            ..Self::snapshot_locked(&s)
        }
    }

    fn snapshot_locked(s: &State) -> Snapshot {
        let mut meta = s.meta;
        meta.mtime.get_or_insert(s.mtime);
        Snapshot {
            key: s.key.clone(),
            size: s.size,
            generation: s.generation,
            meta,
            base: s.base.clone(),
        }
    }

    /// The whole file and its snapshot, read under the state lock (for small uploads).
    pub fn read_snapshot(&self) -> io::Result<(Snapshot, Vec<u8>)> {
        let s = self.state();
        let mut buf = vec![0u8; s.size as usize];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok((Self::snapshot_locked(&s), buf))
    }

    /// Record that `snapshot` is in S3 as `etag`; returns false if the file changed since.
    pub fn mark_clean(&self, snapshot: &Snapshot, etag: String) -> bool {
        self.mark_clean_locked(&mut self.state(), snapshot, etag)
    }

    pub(super) fn mark_clean_locked(
        &self,
        s: &mut State,
        snapshot: &Snapshot,
        etag: String,
    ) -> bool {
        if s.key != snapshot.key || s.unlinked {
            return false;
        }
        // Our upload is the object now, even if the data changed since: the next upload
        // replaces this version (else it would take our own upload for a conflict).
        s.base = Base::Version(etag.clone());
        if s.generation != snapshot.generation {
            return false;
        }
        s.clean_generation = snapshot.generation;
        s.dirty_since = None;
        s.etag = Some(etag);
        s.drop_upload();
        s.failures = 0;
        s.last_error = None;
        s.due = None;
        true
    }

    pub fn mark_dirty(&self) {
        let mut s = self.state();
        s.bump();
        s.mtime = SystemTime::now();
    }

    pub(super) fn mark_unlinked(&self) {
        self.state().unlinked = true;
        self.changed.notify_waiters();
    }

    pub fn open_count(&self) -> u32 {
        self.state().open
    }

    pub fn opened(&self, write: bool) {
        let mut s = self.state();
        s.open += 1;
        s.writers += write as u32;
    }

    pub fn closed(&self, write: bool) {
        let mut s = self.state();
        s.open = s.open.saturating_sub(1);
        s.writers = s.writers.saturating_sub(write as u32);
        if s.writers == 0 {
            // The next writer may stream again (see `crate::writeback::stream`).
            s.streaming = false;
        }
    }

    /// Whether a descriptor open for writing exists.
    pub fn has_writers(&self) -> bool {
        self.state().writers > 0
    }

    pub fn read_at(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let size = self.size();
        let len = (len as u64).min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = self.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break; // a shrink raced with this read: return what exists
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// `pwrite` at `offset` (or at the end with `append`), under the state lock; `on_change`
    /// runs, still under the lock, when the change voids a journaled multipart upload (its
    /// parts no longer match the data, so it must never be resumed).
    pub(super) fn write_with(
        &self,
        offset: u64,
        data: &[u8],
        append: bool,
        on_void: impl FnOnce(&Self, &State) -> io::Result<()>,
    ) -> io::Result<u64> {
        let mut s = self.state();
        let offset = if append { s.size } else { offset };
        self.file.write_all_at(data, offset)?;
        s.size = s.size.max(offset + data.len() as u64);
        s.missing.remove(offset..offset + data.len() as u64);
        self.changed_locked(&mut s, offset, on_void)?;
        Ok(offset)
    }

    pub(super) fn set_len_with(
        &self,
        size: u64,
        on_void: impl FnOnce(&Self, &State) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut s = self.state();
        self.file.set_len(size)?;
        let touched = s.size.min(size);
        s.size = size;
        // Bytes past a shrink are gone; a growth adds zeros, which are local.
        s.missing.truncate(size);
        self.changed_locked(&mut s, touched, on_void)
    }

    /// Bring the cache's usage in step with the bytes this file holds locally (while it is
    /// indexed): its size, less what a sparse file has not fetched.
    pub(super) fn account(&self, s: &mut State) {
        if s.indexed {
            let local = s.size.saturating_sub(s.missing.len());
            if local >= s.accounted {
                self.usage.fetch_add(local - s.accounted, Ordering::Relaxed);
            } else {
                self.usage.fetch_sub(s.accounted - local, Ordering::Relaxed);
            }
            s.accounted = local;
        }
    }

    /// Enter or leave the cache's index (and its usage).
    pub(super) fn set_indexed(&self, indexed: bool) {
        let mut s = self.state();
        if indexed {
            s.indexed = true;
            self.account(&mut s);
        } else if s.indexed {
            self.usage.fetch_sub(s.accounted, Ordering::Relaxed);
            s.accounted = 0;
            s.indexed = false;
        }
    }

    /// A change of the data from byte `touched` on: a new generation, mtime now (a stored
    /// mtime no longer applies).
    fn changed_locked(
        &self,
        s: &mut State,
        touched: u64,
        on_void: impl FnOnce(&Self, &State) -> io::Result<()>,
    ) -> io::Result<()> {
        s.mtime = SystemTime::now();
        // Dropping a stored mtime changes the metadata the upload was created with.
        let touched = if s.meta.mtime.take().is_some() {
            0
        } else {
            touched
        };
        self.account(s);
        self.new_generation_locked(s, touched, on_void)
    }

    /// A new generation to upload, changed from byte `touched` on. A multipart upload in
    /// progress is void if the change reaches the parts it holds or claims (or the metadata it
    /// was created with: `touched` 0); `on_void` then strikes it from the journal.
    fn new_generation_locked(
        &self,
        s: &mut State,
        touched: u64,
        on_void: impl FnOnce(&Self, &State) -> io::Result<()>,
    ) -> io::Result<()> {
        s.bump();
        if s.upload.is_some() && (touched == 0 || touched < s.upload_floor()) {
            s.drop_upload();
            if s.journaled {
                on_void(self, s)?;
            }
        }
        Ok(())
    }

    /// A write with no journal attached (tests and files never journaled).
    pub fn write(&self, offset: u64, data: &[u8], append: bool) -> io::Result<u64> {
        self.write_with(offset, data, append, |_, _| Ok(()))
    }

    /// Fill from downloaded bytes without making the file dirty (it matches S3).
    pub fn fill_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        let mut s = self.state();
        s.size = s.size.max(offset + data.len() as u64);
        s.missing.remove(offset..offset + data.len() as u64);
        self.account(&mut s);
        Ok(())
    }

    /// Make this (new, empty) data file a sparse stand-in for a `size`-byte object: nothing is
    /// local yet, every range is fetched from the base version when first needed.
    pub fn make_sparse(&self, size: u64) -> io::Result<()> {
        let mut s = self.state();
        self.file.set_len(size)?;
        s.size = size;
        s.missing = RangeSet::of(0..size);
        self.account(&mut s);
        Ok(())
    }

    /// The parts of `range` not fetched yet.
    pub fn missing_in(&self, range: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
        self.state().missing.intersect(range)
    }

    /// Whether some bytes are not local yet.
    pub fn is_sparse(&self) -> bool {
        !self.state().missing.is_empty()
    }

    /// Store fetched bytes `data` (of the base version, at `offset`) where they are still
    /// missing, never over bytes written meanwhile; not a change of the data.
    pub fn fill_missing(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state();
        let end = offset + data.len() as u64;
        for r in s.missing.intersect(offset..end) {
            let slice = &data[(r.start - offset) as usize..(r.end - offset) as usize];
            self.file.write_all_at(slice, r.start)?;
        }
        s.missing.remove(offset..end);
        self.account(&mut s);
        Ok(())
    }

    /// Set the mtime without changing the data (a staged copy's mtime, or a restart's).
    pub fn set_mtime(&self, mtime: SystemTime) {
        self.state().mtime = mtime;
    }

    pub fn meta(&self) -> PosixMeta {
        self.state().meta
    }

    /// Set the attributes of data that matches the object (staged, or just copied in S3).
    pub fn set_clean_meta(&self, meta: PosixMeta) {
        let mut s = self.state();
        s.meta = meta;
        if let Some(mtime) = meta.mtime {
            s.mtime = mtime;
        }
    }

    /// chmod/chown/utimens of a file whose data is to be uploaded: a new generation (so an
    /// upload already running cannot mark it clean with the old metadata), same data.
    pub(super) fn change_meta_with(
        &self,
        change: impl FnOnce(&mut PosixMeta),
        on_void: impl FnOnce(&Self, &State) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut s = self.state();
        change(&mut s.meta);
        if let Some(mtime) = s.meta.mtime {
            s.mtime = mtime;
        }
        self.new_generation_locked(&mut s, 0, on_void)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub(super) fn record_locked(&self, s: &State) -> Record {
        Record {
            format: FORMAT,
            key: s.key.clone(),
            id: self.id,
            size: s.size,
            mtime_ns: s
                .mtime
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            upload: s.upload.clone(),
            meta: s.meta,
            base: s.base.clone(),
            missing: s.missing.to_pairs(),
        }
    }
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        let s = self.state();
        if s.journaled && !s.unlinked {
            return; // dirty data the journal still points at: the next start uploads it
        }
        drop(s);
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), "cannot remove cache file: {e}");
        }
    }
}
