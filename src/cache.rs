//! Local data files: where writes land before they are uploaded.
//!
//! Each file open for writing (or written and not yet uploaded) has one [`LocalFile`]: a data file
//! under the mount's cache directory, written with `pwrite`, plus its size, mtime and a dirty
//! *generation* that every change bumps. An upload snapshots the generation first and marks the
//! file clean only if no write happened meanwhile, so a rewrite during an upload is never lost.
//!
//! This is the staging half of the write-back cache (DESIGN.md §4); the journal, the byte budget
//! and eviction build on it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// The cache directory of one mount.
#[derive(Debug)]
pub struct Cache {
    staging: PathBuf,
    next_id: AtomicU64,
}

impl Cache {
    /// Open (creating, mode 0700) the cache directory `dir`.
    pub fn open(dir: &Path) -> io::Result<Cache> {
        let staging = dir.join("staging");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging)?;
        Ok(Cache {
            staging,
            next_id: AtomicU64::new(1),
        })
    }

    /// A new, empty local file.
    pub fn create_file(&self) -> io::Result<LocalFile> {
        // Names are unique per process start (pid + time) and per file (counter), so files left
        // behind by an earlier daemon are never reused.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let path = self
            .staging
            .join(format!("{}-{}-{id}", std::process::id(), stamp.as_nanos()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(LocalFile {
            path,
            file,
            state: Mutex::new(LocalState {
                size: 0,
                mtime: SystemTime::now(),
                generation: 0,
                clean_generation: 0,
                unlinked: false,
            }),
            upload_lock: tokio::sync::Mutex::new(()),
        })
    }
}

#[derive(Debug, Clone)]
struct LocalState {
    size: u64,
    mtime: SystemTime,
    /// Bumped by every change.
    generation: u64,
    /// The generation that is known to be in S3.
    clean_generation: u64,
    /// The name was unlinked: never upload again.
    unlinked: bool,
}

/// One file's local data.
#[derive(Debug)]
pub struct LocalFile {
    path: PathBuf,
    file: File,
    state: Mutex<LocalState>,
    /// Serialises uploads of this file (two `close`s of dup'd descriptors).
    pub upload_lock: tokio::sync::Mutex<()>,
}

/// A consistent view of a local file for an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub size: u64,
    pub generation: u64,
}

impl LocalFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LocalState> {
        // A poisoned lock means a panic mid-update of plain integers: the values are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    pub fn mtime(&self) -> SystemTime {
        self.state().mtime
    }

    pub fn is_dirty(&self) -> bool {
        let s = self.state();
        s.generation != s.clean_generation && !s.unlinked
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.state();
        Snapshot {
            size: s.size,
            generation: s.generation,
        }
    }

    /// Record that `snapshot` is in S3; returns false if the file changed since (still dirty).
    pub fn mark_clean(&self, snapshot: Snapshot) -> bool {
        let mut s = self.state();
        if s.generation == snapshot.generation {
            s.clean_generation = snapshot.generation;
            true
        } else {
            false
        }
    }

    /// Mark the contents as differing from S3 (a new file, or a truncate).
    pub fn mark_dirty(&self) {
        let mut s = self.state();
        s.generation += 1;
        s.mtime = SystemTime::now();
    }

    pub fn mark_unlinked(&self) {
        self.state().unlinked = true;
    }

    pub fn is_unlinked(&self) -> bool {
        self.state().unlinked
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

    /// `pwrite` at `offset`; the file grows as needed.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        let mut s = self.state();
        s.size = s.size.max(offset + data.len() as u64);
        s.generation += 1;
        s.mtime = SystemTime::now();
        Ok(())
    }

    /// Append at the current end; returns the offset written at.
    pub fn append(&self, data: &[u8]) -> io::Result<u64> {
        // Hold the state lock across the write so two appenders never pick the same offset.
        let mut s = self.state();
        let offset = s.size;
        self.file.write_all_at(data, offset)?;
        s.size = offset + data.len() as u64;
        s.generation += 1;
        s.mtime = SystemTime::now();
        Ok(offset)
    }

    pub fn set_len(&self, size: u64) -> io::Result<()> {
        let mut s = self.state();
        self.file.set_len(size)?;
        s.size = size;
        s.generation += 1;
        s.mtime = SystemTime::now();
        Ok(())
    }

    /// Fill the file from downloaded bytes without marking it dirty (it matches S3).
    pub fn fill_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        let mut s = self.state();
        s.size = s.size.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn set_mtime(&self, mtime: SystemTime) {
        self.state().mtime = mtime;
    }
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove cache file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_protect_rewrites_during_upload() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let f = cache.create_file().unwrap();
        assert!(!f.is_dirty());
        f.write_at(0, b"hello").unwrap();
        assert!(f.is_dirty());
        let snap = f.snapshot();
        f.write_at(5, b" world").unwrap(); // a write while the upload of `snap` runs
        assert!(!f.mark_clean(snap));
        assert!(f.is_dirty());
        let snap = f.snapshot();
        assert!(f.mark_clean(snap));
        assert!(!f.is_dirty());
        assert_eq!(f.read_at(0, 100).unwrap(), b"hello world");
    }

    #[test]
    fn append_truncate_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let f = cache.create_file().unwrap();
        assert_eq!(f.append(b"ab").unwrap(), 0);
        assert_eq!(f.append(b"cd").unwrap(), 2);
        f.set_len(3).unwrap();
        assert_eq!(f.read_at(0, 10).unwrap(), b"abc");
        f.set_len(5).unwrap();
        assert_eq!(f.read_at(0, 10).unwrap(), b"abc\0\0");
        let path = f.path().to_path_buf();
        drop(f);
        assert!(!path.exists());
    }
}
