//! [`DirStore`]: a local directory used as a bucket (the embedded default behind `file:///PATH`
//! sources, so a newcomer can mount with no S3 at all).
//!
//! It has the semantics of S3 (ETags, listing order and paging, conditional writes, multipart
//! uploads addressed by id) and passes the same [`conformance`](super::conformance) suite.
//!
//! # Layout
//!
//! S3 keys are any UTF-8 up to 1,024 bytes: `a` and `a/b` coexist, `dir/` is a key, `a//b` is not
//! `a/b`, and a segment may be longer than a file name may be. So objects are **not** files at
//! their key paths; the directory is an opaque store:
//!
//! ```text
//! ROOT/
//!   bucketfs-store.json       {"format":1}: marks the directory as a store
//!   .lock                     flock()ed by the process using the store
//!   objects/HH/NAME           one file per object (NAME = MD5 hex of the key, `-N` on collision,
//!                             HH = its first two characters)
//!   uploads/ID/upload.json    an unfinished multipart upload: key, initiation time, metadata
//!   uploads/ID/NNNNN.part     its part NNNNN
//!   tmp/                      files being written; emptied at open
//! ```
//!
//! An object file and a part file hold the data, then a JSON trailer, then the trailer's length
//! (u32, little endian) and an 8-byte magic: `DATA ‖ JSON ‖ LEN ‖ "bktfsv1\n"`. An object's
//! trailer holds its key, ETag, size, last-modified time and user metadata; a part's its number,
//! ETag and size. Data first means a range read is a plain `pread` at the range's offset.
//!
//! Every write goes to a file under `tmp/` that is fsynced and then renamed into place (and the
//! directory fsynced): one rename publishes data and metadata together, so a crash leaves either
//! the old object or the new one, never a mix. Orphan temp files of a crash are removed at open.
//! Uploads are directories created the same way and survive a restart, so the write-back
//! journal can resume an upload by id.
//!
//! [`DirStore::open`] reads every trailer into an in-memory index sorted by key (UTF-8 byte
//! order, as S3 lists), which serves `head` and `list` without I/O. Writers commit under the
//! index lock (condition check, rename, index update), so `If-None-Match`/`If-Match` are
//! race-free. **One process at a time may use a directory**: `open` takes an exclusive `flock`
//! on `ROOT/.lock` and fails if another process holds it.
//!
//! Blocking file I/O runs under `spawn_blocking`; bodies from files are streamed in 1 MiB
//! chunks, never read whole into memory.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::memory::{
    check_completed_parts, check_condition, check_copy_range, check_if_match, check_key,
    check_part_number, clamp_range, list_page, no_such_upload, normalize_metadata, not_found,
};
use super::{
    Body, CompletedPart, Condition, ListPage, ListRequest, Metadata, MultipartUpload, ObjectMeta,
    ObjectStore, PartInfo, PutOptions, Result, StoreError, multipart_etag,
};

const MARKER: &str = "bucketfs-store.json";
const MARKER_TMP: &str = "bucketfs-store.json.tmp";
const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"bktfsv1\n";
const FOOTER: u64 = 12;
const CHUNK: usize = 1 << 20;

/// A local directory used as a bucket. Cloning shares the same open store.
#[derive(Debug, Clone)]
pub struct DirStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
    /// Holds the `flock` on `ROOT/.lock` while the store is open.
    _lock: File,
}

#[derive(Debug, Default)]
struct Index {
    objects: BTreeMap<String, Entry>,
    /// Every file name under `objects/`, so a new key never takes an existing file's name.
    names: HashSet<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    size: u64,
    etag: String,
    last_modified: SystemTime,
    metadata: Metadata,
}

#[derive(Debug, Serialize, Deserialize)]
struct ObjectTrailer {
    key: String,
    etag: String,
    size: u64,
    mtime_ns: u64,
    #[serde(default)]
    metadata: Metadata,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartTrailer {
    part: u32,
    etag: String,
    size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct UploadManifest {
    key: String,
    initiated_ns: u64,
    #[serde(default)]
    metadata: Metadata,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreMarker {
    format: u32,
}

impl DirStore {
    /// Opens the store at `root`, creating the directory if it is missing.
    ///
    /// Fails if `root` is a non-empty directory that is not a store (it refuses to mix its files
    /// with someone else's) or if another process has the store open. This reads every object's
    /// trailer, so it blocks: inside a runtime, call it from `spawn_blocking` for big stores.
    pub fn open(root: impl AsRef<Path>) -> Result<DirStore> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(|e| io_err(root.display(), e))?;
        let root = fs::canonicalize(root).map_err(|e| io_err(root.display(), e))?;
        init_marker(&root)?;

        let lock_path = root.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(lock_path.display(), e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                StoreError::Other(format!(
                    "{} is in use by another process (one process at a time may use a directory store)",
                    root.display()
                ))
            } else {
                io_err(lock_path.display(), e)
            });
        }

        for sub in ["objects", "uploads", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| io_err(dir.display(), e))?;
        }
        clean_tmp(&root.join("tmp"))?;
        let index = load_index(&root.join("objects"))?;
        Ok(DirStore {
            inner: Arc::new(Inner {
                root,
                index: Mutex::new(index),
                tmp_seq: AtomicU64::new(0),
                _lock: lock,
            }),
        })
    }

    /// The store's directory (absolute).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Other(format!("directory store task failed: {e}")))?
    }
}

/// Writes the marker of a new store, or checks the marker of an existing one.
fn init_marker(root: &Path) -> Result<()> {
    let marker = root.join(MARKER);
    match fs::read(&marker) {
        Ok(bytes) => {
            let m: StoreMarker = serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Other(format!("{}: not a store marker: {e}", marker.display()))
            })?;
            if m.format != FORMAT {
                return Err(StoreError::Invalid(format!(
                    "{} is a directory store of format {}, this bucketfs reads format {FORMAT}",
                    root.display(),
                    m.format
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let foreign = fs::read_dir(root)
                .map_err(|e| io_err(root.display(), e))?
                .filter_map(|e| e.ok())
                // Leftovers of an initialization that crashed before the marker was renamed
                // into place are ours; `lost+found` is the file system's.
                .any(|e| {
                    let name = e.file_name();
                    name != "lost+found" && name != ".lock" && name != MARKER_TMP
                });
            if foreign {
                return Err(StoreError::Invalid(format!(
                    "{} is not empty and is not a bucketfs directory store (no {MARKER}); \
                     point the source at an empty or new directory",
                    root.display()
                )));
            }
            let json = serde_json::to_vec(&StoreMarker { format: FORMAT }).expect("marker");
            let tmp = root.join(MARKER_TMP);
            write_synced(&tmp, &json).map_err(|e| io_err(tmp.display(), e))?;
            fs::rename(&tmp, &marker).map_err(|e| io_err(marker.display(), e))?;
            fsync_dir(root).map_err(|e| io_err(root.display(), e))
        }
        Err(e) => Err(io_err(marker.display(), e)),
    }
}

fn clean_tmp(tmp: &Path) -> Result<()> {
    for entry in fs::read_dir(tmp).map_err(|e| io_err(tmp.display(), e))? {
        let entry = entry.map_err(|e| io_err(tmp.display(), e))?;
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::debug!(path = %path.display(), "removed an orphan temp file"),
            Err(e) => return Err(io_err(path.display(), e)),
        }
    }
    Ok(())
}

fn load_index(objects: &Path) -> Result<Index> {
    let mut index = Index::default();
    for sub in fs::read_dir(objects).map_err(|e| io_err(objects.display(), e))? {
        let sub = sub.map_err(|e| io_err(objects.display(), e))?;
        if !sub.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let sub = sub.path();
        for file in fs::read_dir(&sub).map_err(|e| io_err(sub.display(), e))? {
            let file = file.map_err(|e| io_err(sub.display(), e))?;
            let Some(name) = file.file_name().to_str().map(str::to_string) else {
                continue;
            };
            index.names.insert(name.clone());
            let path = file.path();
            let trailer = File::open(&path)
                .map_err(|e| io_err(path.display(), e))
                .and_then(|f| read_trailer::<ObjectTrailer>(&f, &path));
            let (t, data_len) = match trailer {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable object file");
                    continue;
                }
            };
            if t.size != data_len {
                tracing::warn!(path = %path.display(), "skipping an object file of the wrong size");
                continue;
            }
            let entry = Entry {
                name,
                size: t.size,
                etag: t.etag,
                last_modified: UNIX_EPOCH + Duration::from_nanos(t.mtime_ns),
                metadata: t.metadata,
            };
            match index.objects.get(&t.key) {
                Some(other) if other.last_modified >= entry.last_modified => {
                    tracing::warn!(key = %t.key, path = %path.display(), "ignoring an older duplicate object file");
                }
                _ => {
                    index.objects.insert(t.key, entry);
                }
            }
        }
    }
    Ok(index)
}

impl Inner {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn object_path(&self, name: &str) -> PathBuf {
        self.root.join("objects").join(&name[..2]).join(name)
    }

    fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    fn upload_dir(&self, upload_id: &str) -> PathBuf {
        self.uploads_dir().join(upload_id)
    }

    fn part_path(&self, upload_id: &str, number: u32) -> PathBuf {
        self.upload_dir(upload_id).join(format!("{number:05}.part"))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{seq}.{what}", std::process::id()))
    }

    fn new_temp(&self) -> Result<TempFile> {
        let path = self.tmp_path("tmp");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(path.display(), e))?;
        Ok(TempFile {
            path,
            file,
            persisted: false,
        })
    }

    /// Opens an object's file with its index entry, atomically with respect to writers.
    fn open_object(&self, key: &str) -> Result<(Entry, File)> {
        let index = self.index();
        let entry = index
            .objects
            .get(key)
            .ok_or_else(|| not_found(key))?
            .clone();
        let path = self.object_path(&entry.name);
        let file = File::open(&path)
            .map_err(|e| StoreError::Other(format!("{key}: data file {}: {e}", path.display())))?;
        Ok((entry, file))
    }

    /// Publishes `tmp` as the object `key` if `condition` holds.
    fn commit_object(
        &self,
        key: &str,
        tmp: TempFile,
        entry: Entry,
        condition: &Condition,
    ) -> Result<()> {
        let mut index = self.index();
        check_condition(
            key,
            index.objects.get(key).map(|e| e.etag.as_str()),
            condition,
        )?;
        let name = match index.objects.get(key) {
            Some(existing) => existing.name.clone(),
            None => {
                let base = super::md5_hex(key.as_bytes());
                let mut name = base.clone();
                let mut n = 0;
                while index.names.contains(&name) {
                    n += 1;
                    name = format!("{base}-{n}");
                }
                name
            }
        };
        let path = self.object_path(&name);
        let dir = path
            .parent()
            .expect("object path has a parent")
            .to_path_buf();
        let new_dir = match fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err(dir.display(), e)),
        };
        tmp.persist(&path)?;
        index.names.insert(name.clone());
        index
            .objects
            .insert(key.to_string(), Entry { name, ..entry });
        drop(index);
        if new_dir {
            fsync_dir(&self.root.join("objects")).map_err(|e| io_err(dir.display(), e))?;
        }
        fsync_dir(&dir).map_err(|e| io_err(dir.display(), e))
    }

    /// Reads and checks an upload's manifest (`NotFound` for an unknown id or another key).
    fn manifest(&self, key: &str, upload_id: &str) -> Result<UploadManifest> {
        if !valid_upload_id(upload_id) {
            return Err(no_such_upload(key, upload_id));
        }
        let path = self.upload_dir(upload_id).join("upload.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(no_such_upload(key, upload_id));
            }
            Err(e) => return Err(io_err(path.display(), e)),
        };
        let manifest: UploadManifest = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Other(format!("{}: {e}", path.display())))?;
        if manifest.key != key {
            return Err(no_such_upload(key, upload_id));
        }
        Ok(manifest)
    }

    /// Publishes `tmp` as part `number` of an upload.
    fn commit_part(&self, key: &str, upload_id: &str, number: u32, tmp: TempFile) -> Result<()> {
        let path = self.part_path(upload_id, number);
        match fs::rename(&tmp.path, &path) {
            Ok(()) => {}
            // The upload was completed or aborted meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(no_such_upload(key, upload_id));
            }
            Err(e) => return Err(io_err(path.display(), e)),
        }
        let mut tmp = tmp;
        tmp.persisted = true;
        let dir = self.upload_dir(upload_id);
        fsync_dir(&dir).map_err(|e| io_err(dir.display(), e))
    }

    fn read_part(&self, upload_id: &str, number: u32) -> Result<Option<(File, PartTrailer)>> {
        let path = self.part_path(upload_id, number);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path.display(), e)),
        };
        let (trailer, data_len) = read_trailer::<PartTrailer>(&file, &path)?;
        if trailer.size != data_len || trailer.part != number {
            return Err(StoreError::Other(format!(
                "{}: corrupt part",
                path.display()
            )));
        }
        Ok(Some((file, trailer)))
    }

    /// Removes an upload's directory: renamed away first, so it disappears at once.
    fn remove_upload(&self, upload_id: &str) -> Result<()> {
        let dir = self.upload_dir(upload_id);
        let doomed = self.tmp_path("upload-removed");
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(dir.display(), e)),
        }
        let uploads = self.uploads_dir();
        fsync_dir(&uploads).map_err(|e| io_err(uploads.display(), e))?;
        if let Err(e) = fs::remove_dir_all(&doomed) {
            tracing::warn!(path = %doomed.display(), error = %e, "could not remove a finished upload");
        }
        Ok(())
    }
}

/// A file under `tmp/`, removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// Appends the trailer and makes the file durable.
    fn finish<T: Serialize>(&mut self, trailer: &T) -> Result<()> {
        let json = serde_json::to_vec(trailer).expect("trailers serialize");
        let mut tail = json;
        tail.extend_from_slice(&(tail.len() as u32).to_le_bytes());
        tail.extend_from_slice(MAGIC);
        self.file
            .write_all(&tail)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| io_err(self.path.display(), e))
    }

    fn persist(mut self, to: &Path) -> Result<()> {
        fs::rename(&self.path, to).map_err(|e| io_err(to.display(), e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Reads the trailer of an object or part file; returns it with the length of the data.
fn read_trailer<T: DeserializeOwned>(file: &File, path: &Path) -> Result<(T, u64)> {
    let corrupt =
        |why: &str| StoreError::Other(format!("{}: corrupt store file: {why}", path.display()));
    let len = file
        .metadata()
        .map_err(|e| io_err(path.display(), e))?
        .len();
    if len < FOOTER {
        return Err(corrupt("too short"));
    }
    let mut footer = [0u8; FOOTER as usize];
    file.read_exact_at(&mut footer, len - FOOTER)
        .map_err(|e| io_err(path.display(), e))?;
    if &footer[4..] != MAGIC {
        return Err(corrupt("no trailer"));
    }
    let json_len = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as u64;
    if json_len + FOOTER > len {
        return Err(corrupt("trailer length"));
    }
    let data_len = len - FOOTER - json_len;
    let mut json = vec![0u8; json_len as usize];
    file.read_exact_at(&mut json, data_len)
        .map_err(|e| io_err(path.display(), e))?;
    let trailer = serde_json::from_slice(&json).map_err(|e| corrupt(&e.to_string()))?;
    Ok((trailer, data_len))
}

/// Writes `body` at the start of `dst`; returns the MD5 hex of the bytes and their count.
fn write_body(body: &Body, dst: &mut TempFile) -> Result<(String, u64)> {
    match body {
        Body::Bytes(bytes) => {
            dst.file
                .write_all(bytes)
                .map_err(|e| io_err(dst.path.display(), e))?;
            Ok((super::md5_hex(bytes), bytes.len() as u64))
        }
        Body::File { path, offset, len } => {
            let src = File::open(path)
                .map_err(|e| StoreError::Other(format!("body {}: {e}", path.display())))?;
            let etag = copy_hashed(&src, path, *offset, *len, dst)?;
            Ok((etag, *len))
        }
    }
}

/// Copies `len` bytes at `offset` of `src` to `dst`, streaming; returns their MD5 hex.
fn copy_hashed(
    src: &File,
    src_name: &Path,
    offset: u64,
    len: u64,
    dst: &mut TempFile,
) -> Result<String> {
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; len.min(CHUNK as u64) as usize];
    let mut done = 0;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = match src.read_at(&mut buf[..want], offset + done) {
            Ok(0) => {
                return Err(StoreError::Other(format!(
                    "{} is shorter than {} bytes",
                    src_name.display(),
                    offset + len
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(src_name.display(), e)),
        };
        hasher.update(&buf[..n]);
        dst.file
            .write_all(&buf[..n])
            .map_err(|e| io_err(dst.path.display(), e))?;
        done += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn valid_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn io_err(what: impl fmt::Display, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            StoreError::PermissionDenied(format!("{what}: {e}"))
        }
        _ => StoreError::Other(format!("{what}: {e}")),
    }
}

impl Entry {
    fn meta(&self, key: &str, with_metadata: bool) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: self.size,
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

/// Writes a new object file from `fill` (which writes the data and returns its ETag and size),
/// then commits it under `condition`.
fn write_object(
    inner: &Inner,
    key: &str,
    metadata: Metadata,
    condition: &Condition,
    fill: impl FnOnce(&mut TempFile) -> Result<(String, u64)>,
) -> Result<String> {
    let mut tmp = inner.new_temp()?;
    let (etag, size) = fill(&mut tmp)?;
    let last_modified = SystemTime::now();
    tmp.finish(&ObjectTrailer {
        key: key.to_string(),
        etag: etag.clone(),
        size,
        mtime_ns: nanos(last_modified),
        metadata: metadata.clone(),
    })?;
    let entry = Entry {
        name: String::new(),
        size,
        etag: etag.clone(),
        last_modified,
        metadata,
    };
    inner.commit_object(key, tmp, entry, condition)?;
    Ok(etag)
}

#[async_trait]
impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        format!("file://{}", self.inner.root.display())
    }

    async fn check_access(&self) -> Result<()> {
        let describe = self.describe();
        self.blocking(move |inner| {
            match fs::metadata(inner.root.join("objects")) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(StoreError::NoSuchBucket(describe)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::NoSuchBucket(describe));
                }
                Err(e) => return Err(io_err(inner.root.display(), e)),
            }
            // A real write: access(2) says yes to root even on a read-only mount.
            let mut tmp = inner.new_temp()?;
            tmp.file
                .write_all(b"x")
                .map_err(|e| io_err(tmp.path.display(), e))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let index = self.inner.index();
        let entry = index.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(entry.meta(key, true))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Bytes> {
        let key = key.to_string();
        let if_match = if_match.map(str::to_string);
        self.blocking(move |inner| {
            let (entry, file) = inner.open_object(&key)?;
            check_if_match(&key, &entry.etag, if_match.as_deref())?;
            let range = clamp_range(range, entry.size);
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| StoreError::Other(format!("{key}: {e}")))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn list(&self, request: ListRequest<'_>) -> Result<ListPage> {
        let index = self.inner.index();
        Ok(list_page(&index.objects, &request, |key, entry| {
            entry.meta(key, false)
        }))
    }

    async fn put(&self, key: &str, body: Body, options: &PutOptions) -> Result<String> {
        check_key(key)?;
        let key = key.to_string();
        let metadata = normalize_metadata(&options.metadata);
        let condition = options.condition.clone();
        self.blocking(move |inner| {
            write_object(inner, &key, metadata, &condition, |tmp| {
                write_body(&body, tmp)
            })
        })
        .await
    }

    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<String> {
        check_key(to)?;
        let (from, to) = (from.to_string(), to.to_string());
        let metadata = metadata.map(normalize_metadata);
        self.blocking(move |inner| {
            let (source, file) = inner.open_object(&from)?;
            let metadata = metadata.unwrap_or(source.metadata);
            // CopyObject writes a single-part object: its ETag is the MD5 of the data.
            write_object(inner, &to, metadata, &Condition::None, |tmp| {
                let etag = copy_hashed(&file, Path::new(&from), 0, source.size, tmp)?;
                Ok((etag, source.size))
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let mut index = inner.index();
            let Some(entry) = index.objects.remove(&key) else {
                return Ok(());
            };
            let path = inner.object_path(&entry.name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    index.objects.insert(key, entry);
                    return Err(io_err(path.display(), e));
                }
            }
            index.names.remove(&entry.name);
            drop(index);
            let dir = path.parent().expect("object path has a parent");
            fsync_dir(dir).map_err(|e| io_err(dir.display(), e))
        })
        .await
    }

    async fn create_multipart(&self, key: &str, options: &PutOptions) -> Result<String> {
        check_key(key)?;
        let manifest = UploadManifest {
            key: key.to_string(),
            initiated_ns: nanos(SystemTime::now()),
            metadata: normalize_metadata(&options.metadata),
        };
        self.blocking(move |inner| {
            let upload_id = format!("{:032x}", rand::random::<u128>());
            let staging = inner.tmp_path("upload");
            fs::create_dir(&staging).map_err(|e| io_err(staging.display(), e))?;
            let json = serde_json::to_vec(&manifest).expect("manifests serialize");
            write_synced(&staging.join("upload.json"), &json)
                .and_then(|()| fsync_dir(&staging))
                .map_err(|e| io_err(staging.display(), e))?;
            let dir = inner.upload_dir(&upload_id);
            fs::rename(&staging, &dir).map_err(|e| io_err(dir.display(), e))?;
            let uploads = inner.uploads_dir();
            fsync_dir(&uploads).map_err(|e| io_err(uploads.display(), e))?;
            Ok(upload_id)
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Body,
    ) -> Result<String> {
        check_part_number(number)?;
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        self.blocking(move |inner| {
            inner.manifest(&key, &upload_id)?;
            let mut tmp = inner.new_temp()?;
            let (etag, size) = write_body(&body, &mut tmp)?;
            tmp.finish(&PartTrailer {
                part: number,
                etag: etag.clone(),
                size,
            })?;
            inner.commit_part(&key, &upload_id, number, tmp)?;
            Ok(etag)
        })
        .await
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
        let (key, upload_id, from) = (key.to_string(), upload_id.to_string(), from.to_string());
        self.blocking(move |inner| {
            inner.manifest(&key, &upload_id)?;
            let (source, file) = inner.open_object(&from)?;
            check_copy_range(&from, &range, source.size)?;
            let mut tmp = inner.new_temp()?;
            let size = range.end - range.start;
            let etag = copy_hashed(&file, Path::new(&from), range.start, size, &mut tmp)?;
            tmp.finish(&PartTrailer {
                part: number,
                etag: etag.clone(),
                size,
            })?;
            inner.commit_part(&key, &upload_id, number, tmp)?;
            Ok(etag)
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: &Condition,
    ) -> Result<String> {
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        let (parts, condition) = (parts.to_vec(), condition.clone());
        self.blocking(move |inner| {
            let manifest = inner.manifest(&key, &upload_id)?;
            let mut found = BTreeMap::new();
            for part in &parts {
                if let Some(p) = inner.read_part(&upload_id, part.number)? {
                    found.insert(part.number, p);
                }
            }
            let sizes = check_completed_parts(&parts, |number| {
                found.get(&number).map(|(_, t)| (t.etag.clone(), t.size))
            })?;
            let etag = multipart_etag(parts.iter().map(|p| p.etag.trim_matches('"')));
            write_object(inner, &key, manifest.metadata, &condition, |tmp| {
                for (part, size) in parts.iter().zip(&sizes) {
                    let (file, _) = &found[&part.number];
                    let copied = io::copy(&mut file.take(*size), &mut tmp.file)
                        .map_err(|e| io_err(tmp.path.display(), e))?;
                    if copied != *size {
                        return Err(StoreError::Other(format!(
                            "part {} of upload {upload_id} is short",
                            part.number
                        )));
                    }
                }
                Ok((etag.clone(), sizes.iter().sum()))
            })?;
            inner.remove_upload(&upload_id)?;
            Ok(etag)
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        self.blocking(move |inner| {
            inner.manifest(&key, &upload_id)?;
            inner.remove_upload(&upload_id)
        })
        .await
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        let (key, upload_id) = (key.to_string(), upload_id.to_string());
        self.blocking(move |inner| {
            inner.manifest(&key, &upload_id)?;
            let dir = inner.upload_dir(&upload_id);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(no_such_upload(&key, &upload_id));
                }
                Err(e) => return Err(io_err(dir.display(), e)),
            };
            let mut parts = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_err(dir.display(), e))?;
                let name = entry.file_name();
                let Some(number) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".part"))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((_, t)) = inner.read_part(&upload_id, number)? {
                    parts.push(PartInfo {
                        number,
                        etag: t.etag,
                        size: t.size,
                    });
                }
            }
            parts.sort_by_key(|p| p.number);
            Ok(parts)
        })
        .await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<MultipartUpload>> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let dir = inner.uploads_dir();
            let mut uploads = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| io_err(dir.display(), e))? {
                let entry = entry.map_err(|e| io_err(dir.display(), e))?;
                let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !valid_upload_id(&id) {
                    continue;
                }
                let path = entry.path().join("upload.json");
                let manifest: UploadManifest = match fs::read(&path) {
                    Ok(bytes) => serde_json::from_slice(&bytes)
                        .map_err(|e| StoreError::Other(format!("{}: {e}", path.display())))?,
                    // Completed or aborted meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(path.display(), e)),
                };
                if manifest.key.starts_with(&prefix) {
                    uploads.push(MultipartUpload {
                        key: manifest.key,
                        upload_id: id,
                        initiated: UNIX_EPOCH + Duration::from_nanos(manifest.initiated_ns),
                    });
                }
            }
            uploads.sort_by(|a, b| (&a.key, a.initiated).cmp(&(&b.key, b.initiated)));
            Ok(uploads)
        })
        .await
    }
}
