//! The filesystem core: POSIX operations on top of an [`ObjectStore`].
//!
//! Design (DESIGN.md §3):
//! - Async operations on plain domain types ([`Attr`], [`Entry`], [`DirEntry`]); this module
//!   never sees a fuser type, so it is tested directly against the in-memory store.
//! - A file is the object at `prefix + path`; a directory is a key prefix `prefix + path + "/"`,
//!   shown whether it exists through other keys (implicit) or through a `path/` marker object
//!   (what `mkdir` writes).
//! - Attributes come from LIST (readdir) and HEAD (lookup) and are trusted for `metadata_ttl`.
//! - Local data lives in the on-disk cache (`crate::cache`), indexed by key: files being
//!   written, written and not yet uploaded, or kept for reading. A key with local data shows its
//!   local size and mtime at once. Other reads are ranged GETs pinned to the ETag seen at open
//!   (`crate::read`).
//! - Writes land in the cache; `close` journals the file and queues it for the background
//!   uploader (`crate::writeback`); `fsync` waits until the upload is done.
//!
//! Lock order: the inode table (`inodes`, a std mutex, never held across `.await`), then the
//! cache index, then a `LocalFile`'s state lock, then the negative-lookup cache; the handle
//! table is never held together with any of them; the orphans map is taken last, alone or
//! under the inode table. A handle's `Reader` and a `LocalFile`'s `upload_lock` are async
//! mutexes taken with no std lock held, readers before upload locks (an operation that copies
//! or deletes objects locks the readers of the files it touches first, see `lock_readers`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;

mod dir;
mod inode;
#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
mod types;

pub use inode::Remote;
pub use types::*;

use crate::cache::{Base, Cache, CacheError, LocalFile};
use crate::error::{FsError, FsResult};
use crate::meta::PosixMeta;
use crate::read::Reader;
use crate::store::{ListRequest, ObjectStore, PutOptions, StoreError};
use crate::writeback::{WriteBack, WriteBackConfig};
use inode::{DataVersion, InodeTable};

/// Directories with at most this many entries keep their names for negative lookups.
const LISTING_MAX: usize = 10_000;

/// Missing names remembered at once (each a few dozen bytes).
const NEGATIVE_ENTRIES: std::num::NonZeroUsize = std::num::NonZeroUsize::new(16_384).unwrap();

/// HEADs in flight while `opendir` reads its entries' stored attributes: `ls -l` of a large
/// directory is bound by them (docs/BENCHMARKS.md), so many; a HEAD is a small request, and
/// the uploads sharing the connection pool still get their turn.
const META_FETCH_CONCURRENCY: usize = 64;

/// Copies (and deletes) in flight during a directory rename.
const RENAME_CONCURRENCY: usize = 16;

/// Objects at least this big are staged sparse for writing: only the ranges read or
/// partially overwritten are fetched, and unchanged parts are copied server-side at upload.
/// Smaller ones are fetched whole at open (well under a second here), which keeps every
/// byte of the file local: a conflict copy (see `crate::writeback`) is then always complete.
const SPARSE_STAGING_MIN: u64 = 32 << 20;

/// A handle's reader, locked (see [`Filesystem::lock_readers`]).
type ReaderGuard = tokio::sync::OwnedMutexGuard<Reader>;

/// An open file or directory.
enum Handle {
    /// Reads from S3 (the file has no local data).
    Remote {
        ino: Ino,
        reader: Arc<tokio::sync::Mutex<Reader>>,
    },
    /// Reads and writes the local data file.
    Local {
        ino: Ino,
        file: Arc<LocalFile>,
        append: bool,
        write: bool,
    },
    /// A directory being listed (see `dir`).
    Dir {
        stream: Arc<tokio::sync::Mutex<dir::DirStream>>,
    },
}

pub struct Filesystem {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    config: FsConfig,
    cache: Arc<Cache>,
    writeback: WriteBack,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Names recently found missing in S3, with when (answered without S3 within the TTL;
    /// Open WebUI and `cp` look up many names that do not exist yet).
    negative: Mutex<lru::LruCache<(Ino, String), Instant>>,
    /// Keys already reported as unusable names (logged once each).
    warned_keys: Mutex<HashSet<String>>,
    /// The local data of files unlinked (or replaced by a rename) while open, by inode, until
    /// their last handle closes: what `fstat` and `ftruncate` through those handles see (the
    /// inode's old path is someone else's now).
    orphans: Mutex<HashMap<Ino, Arc<LocalFile>>>,
    /// Shown as the mtime of directories (S3 prefixes have none).
    mounted_at: SystemTime,
}

impl std::fmt::Debug for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filesystem")
            .field("store", &self.store)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Whether `name` can be a file name here.
fn check_name(name: &str) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(FsError::errno(libc::EINVAL));
    }
    Ok(())
}

/// Whether cached `local` decides what its file is, ahead of S3: it has changes not yet
/// uploaded, a descriptor is open on it, or it was never known to be in S3. A clean, closed
/// copy only caches one version of the object: it is shown while it is that version.
fn local_decides(local: &LocalFile) -> bool {
    local.is_dirty() || local.open_count() > 0 || local.etag().is_none()
}

/// A clean, closed cached copy as it was before asking S3 about its object.
struct CleanCopy {
    file: Arc<LocalFile>,
    etag: Option<String>,
}

impl Filesystem {
    /// A filesystem over `store`, with every key under `prefix` (empty, or ending in `/`).
    /// Opens (and locks) the cache directory, re-queues the files its journal holds, and starts
    /// the background uploader: call it inside a tokio runtime.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        config: FsConfig,
    ) -> Result<Self, CacheError> {
        let (cache, recovered) = Cache::open(&config.cache_dir, config.cache_limits.clone())?;
        let cache = Arc::new(cache);
        let writeback = WriteBack::start(
            store.clone(),
            cache.clone(),
            WriteBackConfig {
                delay: config.writeback_delay,
                max_uploads: config.max_uploads,
                part_size: config.part_size,
                part_concurrency: config.upload_concurrency,
                conditional: config.conditional_writes,
            },
        );
        if !recovered.is_empty() {
            let bytes: u64 = recovered.iter().map(|f| f.size()).sum();
            tracing::info!(
                files = recovered.len(),
                bytes,
                "resuming uploads left by the previous run"
            );
        }
        for file in &recovered {
            writeback.enqueue(file, true);
        }
        Ok(Filesystem {
            store,
            prefix,
            config,
            cache,
            writeback,
            inodes: Mutex::new(InodeTable::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            negative: Mutex::new(lru::LruCache::new(NEGATIVE_ENTRIES)),
            warned_keys: Mutex::new(HashSet::new()),
            orphans: Mutex::new(HashMap::new()),
            mounted_at: SystemTime::now(),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn writeback(&self) -> &WriteBack {
        &self.writeback
    }

    /// The local cache (for status reports and metrics).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Where inode `ino` stands on its way to S3, as `user.bucketfs.state` shows it: `clean
    /// <etag>`, `dirty`, `uploading n/m`, `failed: <reason> …`; `directory` for directories.
    pub fn upload_state(&self, ino: Ino) -> FsResult<String> {
        let (local, remote_etag) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Ok("directory".into());
            }
            let remote_etag = node.remote.as_ref().map(|r| r.etag.clone());
            (self.file_key(&table, ino)?.1, remote_etag)
        };
        // No std lock held: the uploader takes its queue, then the file's state.
        Ok(match local {
            Some(file) => self.writeback.file_state(&file).to_string(),
            None => crate::writeback::FileState::Clean { etag: remote_etag }.to_string(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, InodeTable> {
        self.inodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle_table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writable(&self) -> FsResult<()> {
        if self.config.read_only {
            Err(FsError::errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// The object key of file `path`, or the key prefix of directory `path` (ends with `/`).
    fn key(&self, path: &str, kind: FileKind) -> String {
        match (kind, path.is_empty()) {
            (FileKind::Directory, true) => self.prefix.clone(),
            (FileKind::Directory, false) => format!("{}{path}/", self.prefix),
            (FileKind::File | FileKind::Symlink, _) => format!("{}{path}", self.prefix),
        }
    }

    fn path_of(table: &InodeTable, ino: Ino) -> FsResult<String> {
        table.path(ino).ok_or_else(FsError::not_found)
    }

    fn child_path(parent_path: &str, name: &str) -> String {
        if parent_path.is_empty() {
            name.to_string()
        } else {
            format!("{parent_path}/{name}")
        }
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Arc<LocalFile>>> {
        self.orphans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key of file inode `ino` and its local data, if any (an unlinked open file's own).
    fn file_key(&self, table: &InodeTable, ino: Ino) -> FsResult<(String, Option<Arc<LocalFile>>)> {
        if let Some(orphan) = self.orphans().get(&ino) {
            // Its parent directory may be gone from the table: no path to walk.
            return Ok((orphan.key(), Some(orphan.clone())));
        }
        let key = self.key(&Self::path_of(table, ino)?, FileKind::File);
        let local = self.cache.get(&key);
        Ok((key, local))
    }

    /// `local`, if it is only a clean copy (which S3 must confirm, see `drop_if_stale`).
    fn clean_copy(local: Option<Arc<LocalFile>>) -> Option<CleanCopy> {
        let file = local.filter(|l| !local_decides(l))?;
        Some(CleanCopy {
            etag: file.etag(),
            file,
        })
    }

    /// Drop the clean copy of `key` taken before a request to S3 if S3 answered another
    /// version (`current`; `None`: the object is gone), meaning another client replaced or
    /// deleted it, and the copy is unchanged since (an upload of ours that ended meanwhile is
    /// newer than the answer).
    fn drop_if_stale(&self, key: &str, copy: Option<CleanCopy>, current: Option<&str>) {
        if let Some(copy) = copy
            && copy.etag.as_deref() != current
            && copy.file.etag() == copy.etag
            && !local_decides(&copy.file)
            && self
                .cache
                .get(key)
                .is_some_and(|l| Arc::ptr_eq(&l, &copy.file))
        {
            self.cache.evict_key(key);
        }
    }

    /// What `stat` shows: local data's size, mtime and attributes first, else the object's;
    /// what the object does not store, the mount's defaults (and LastModified as mtime).
    fn attr_of(&self, table: &InodeTable, ino: Ino) -> FsResult<Attr> {
        let node = table.get(ino).ok_or_else(FsError::not_found)?;
        let stored = node.meta.unwrap_or_default();
        let (size, mtime, meta) = match node.kind {
            FileKind::File | FileKind::Symlink => {
                match (self.file_key(table, ino)?.1, &node.remote) {
                    (Some(local), _) => (local.size(), local.mtime(), local.meta()),
                    (None, Some(r)) => (r.size, stored.mtime.unwrap_or(r.mtime), stored),
                    (None, None) => (0, self.mounted_at, stored),
                }
            }
            FileKind::Directory => (0, stored.mtime.unwrap_or(self.mounted_at), stored),
        };
        let (kind, default_perm) = match node.kind {
            FileKind::Directory => (FileKind::Directory, self.config.dir_mode),
            _ if meta.is_symlink() => (FileKind::Symlink, 0o777),
            _ => (FileKind::File, self.config.file_mode),
        };
        Ok(Attr {
            ino,
            kind,
            size,
            mtime,
            perm: meta.perm().unwrap_or(default_perm),
            uid: meta.uid.unwrap_or(self.config.uid),
            gid: meta.gid.unwrap_or(self.config.gid),
        })
    }

    /// Whether the table may answer for `node` without S3: confirmed within the TTL, and, for
    /// a file, with its stored attributes known (a listing alone does not carry them).
    fn answers_locally(&self, node: &inode::Inode) -> bool {
        self.is_fresh(node.validated) && (node.kind == FileKind::Directory || node.meta.is_some())
    }

    fn entry(&self, table: &InodeTable, ino: Ino) -> FsResult<Entry> {
        Ok(Entry {
            attr: self.attr_of(table, ino)?,
            ttl: self.config.metadata_ttl,
        })
    }

    fn is_fresh(&self, validated: Option<Instant>) -> bool {
        validated.is_some_and(|v| v.elapsed() < self.config.metadata_ttl)
    }

    // ---- name resolution --------------------------------------------------------------------

    /// Find `parent/name`: local data first (a file written here shows at once), then the table
    /// while fresh, else S3: a directory if any key lies under `name/` (a key that is both an
    /// object and a prefix shows as the directory), else a file if the object exists. Does not
    /// count a kernel lookup.
    async fn resolve(&self, parent: Ino, name: &str) -> FsResult<Ino> {
        check_name(name)?;
        let parent_path = {
            let mut table = self.table();
            let node = table.get(parent).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            let parent_path = Self::path_of(&table, parent)?;
            let path = Self::child_path(&parent_path, name);
            let local = self.cache.get(&self.key(&path, FileKind::File));
            if local.as_ref().is_some_and(|l| local_decides(l)) {
                let ino = table.upsert_child(parent, name, FileKind::File);
                return Ok(ino);
            }
            if let Some(ino) = table.child(parent, name)
                && table.get(ino).is_some_and(|c| self.answers_locally(c))
            {
                return Ok(ino);
            }
            // A clean cached copy means the object existed after the remembered misses and
            // listing were taken (a conflict copy the uploader created, say): ask S3.
            if local.is_none()
                && self
                    .negative()
                    .get(&(parent, name.to_string()))
                    .is_some_and(|t| self.is_fresh(Some(*t)))
            {
                return Err(FsError::not_found());
            }
            let listed_absent = local.is_none()
                && table
                    .get(parent)
                    .and_then(|p| p.listing.as_ref())
                    .is_some_and(|(at, names)| self.is_fresh(Some(*at)) && !names.contains(name));
            if listed_absent {
                self.negative()
                    .put((parent, name.to_string()), Instant::now());
                return Err(FsError::not_found());
            }
            parent_path
        };
        let path = Self::child_path(&parent_path, name);
        let file_key = self.key(&path, FileKind::File);
        let dir_key = self.key(&path, FileKind::Directory);
        let copy = Self::clean_copy(self.cache.get(&file_key));
        let listing = ListRequest {
            prefix: &dir_key,
            delimiter: Some("/"),
            continuation: None,
            max_keys: Some(1),
        };
        let (head, list) = tokio::join!(self.store.head(&file_key), self.store.list(listing));
        let list = list?;
        let is_dir = !list.objects.is_empty() || !list.prefixes.is_empty();
        // A marker (`name/`, listed first under its own prefix) may hold the directory's mode.
        let marker = match list.objects.first() {
            Some(o) if o.key == dir_key => Some(self.head_meta(&dir_key).await?),
            _ => Some(Default::default()),
        };
        let head = match head {
            Ok(meta) => Some(meta),
            Err(StoreError::NotFound(_)) => None,
            Err(e) if is_dir => {
                tracing::debug!(key = file_key, "HEAD failed beside a directory: {e}");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let stale_listing = {
            let mut table = self.table();
            if is_dir {
                if head.is_some() {
                    self.warn_once(
                        &file_key,
                        "is both an object and a prefix; the directory is shown",
                    );
                }
                let ino = table.upsert_child(parent, name, FileKind::Directory);
                if let Some(node) = table.get_mut(ino) {
                    node.validated = Some(Instant::now());
                    node.meta = marker;
                }
                return Ok(ino);
            }
            if let Some(meta) = head {
                let ino = table.upsert_child(parent, name, FileKind::File);
                if let Some(node) = table.get_mut(ino) {
                    node.set_head(&meta);
                }
                self.drop_if_stale(&file_key, copy, Some(&meta.etag));
                return Ok(ino);
            }
            if self.cache.get(&file_key).is_some_and(|l| local_decides(&l)) {
                // Created locally while we were asking S3.
                return Ok(table.upsert_child(parent, name, FileKind::File));
            }
            self.drop_if_stale(&file_key, copy, None);
            if table.child(parent, name).is_some() {
                table.detach(parent, name);
            }
            self.negative()
                .put((parent, name.to_string()), Instant::now());
            let listing = table.get(parent).and_then(|p| p.listing.as_ref());
            !listing.is_some_and(|(at, _)| self.is_fresh(Some(*at)))
        };
        if stale_listing {
            // A miss is often the first of many (`cp` into a directory, an app probing names):
            // one LIST of a small directory answers the next ones locally.
            self.prime_listing(parent, &self.key(&parent_path, FileKind::Directory))
                .await;
        }
        Err(FsError::not_found())
    }

    /// Remember `dir`'s names if one LIST page holds them all.
    async fn prime_listing(&self, dir: Ino, prefix: &str) {
        let request = ListRequest {
            prefix,
            delimiter: Some("/"),
            continuation: None,
            max_keys: None,
        };
        let Ok(page) = self.store.list(request).await else {
            return;
        };
        if page.next.is_some() {
            return; // too big to keep: lookups in it ask S3 name by name
        }
        let mut names: HashSet<String> = page
            .prefixes
            .iter()
            .map(|p| p[prefix.len()..p.len() - 1].to_string())
            .collect();
        names.extend(
            page.objects
                .iter()
                .map(|o| o.key[prefix.len()..].to_string()),
        );
        // Names created here meanwhile are in the cache, which `resolve` consults first.
        if let Some(node) = self.table().get_mut(dir) {
            node.listing = Some((Instant::now(), names));
        }
    }

    /// The attributes stored on `key` (none when there is no such object).
    async fn head_meta(&self, key: &str) -> FsResult<PosixMeta> {
        match self.store.head(key).await {
            Ok(head) => Ok(PosixMeta::from_metadata(&head.metadata)),
            Err(StoreError::NotFound(_)) => Ok(PosixMeta::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn negative(&self) -> std::sync::MutexGuard<'_, lru::LruCache<(Ino, String), Instant>> {
        self.negative.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `parent/name` exists now (created or renamed here).
    fn exists_now(&self, parent: Ino, name: &str) {
        self.negative().pop(&(parent, name.to_string()));
        self.table().note_listing(parent, name, true);
    }

    fn warn_once(&self, key: &str, what: &str) {
        let mut warned = self.warned_keys.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: past this many distinct keys, stop remembering (and stop warning).
        if warned.len() < 10_000 && warned.insert(key.to_string()) {
            tracing::warn!(key, "{what}");
        }
    }

    // ---- metadata operations ----------------------------------------------------------------

    pub async fn lookup(&self, parent: Ino, name: &str) -> FsResult<Entry> {
        let ino = self.resolve(parent, name).await?;
        let mut table = self.table();
        let entry = self.entry(&table, ino)?;
        if let Some(node) = table.get_mut(ino) {
            node.lookups += 1;
        }
        Ok(entry)
    }

    pub fn forget(&self, ino: Ino, nlookup: u64) {
        self.table().forget(ino, nlookup);
    }

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let (key, copy) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory || self.answers_locally(node) {
                return self.attr_of(&table, ino);
            }
            match self.file_key(&table, ino)? {
                (_, Some(local)) if local_decides(&local) => return self.attr_of(&table, ino),
                (key, local) => (key, Self::clean_copy(local)),
            }
        };
        match self.store.head(&key).await {
            Ok(meta) => {
                if let Some(node) = self.table().get_mut(ino) {
                    node.set_head(&meta);
                }
                self.drop_if_stale(&key, copy, Some(&meta.etag));
            }
            // Deleted behind our back: keep showing what we knew until the next lookup fails;
            // an open handle still reads its pinned version or gets ESTALE.
            Err(StoreError::NotFound(_)) => self.drop_if_stale(&key, copy, None),
            Err(e) => return Err(e.into()),
        }
        self.attr_of(&self.table(), ino)
    }

    pub async fn setattr(&self, ino: Ino, change: SetAttr) -> FsResult<Attr> {
        let meta_change = change.mode.is_some()
            || change.uid.is_some()
            || change.gid.is_some()
            || change.mtime.is_some();
        if change.size.is_some() || meta_change {
            self.writable()?;
        }
        if let Some(size) = change.size {
            self.truncate(ino, size, change.fh).await?;
        }
        if meta_change {
            self.store_meta(ino, &change).await?;
        }
        self.attr_of(&self.table(), ino)
    }

    /// chmod/chown/utimens, kept in the object's metadata: a file with changes to upload takes
    /// them with its upload; otherwise a server-side self-copy replaces the metadata at once (a
    /// directory's go on its marker, which is written if the directory had none).
    async fn store_meta(&self, ino: Ino, change: &SetAttr) -> FsResult<()> {
        let apply = |m: &mut PosixMeta, type_bits: u32| {
            if let Some(mode) = change.mode {
                m.set_perm(mode, type_bits);
            }
            if let Some(uid) = change.uid {
                m.uid = Some(uid);
            }
            if let Some(gid) = change.gid {
                m.gid = Some(gid);
            }
            if let Some(mtime) = change.mtime {
                m.mtime = Some(mtime);
            }
        };
        let (kind, path) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            (node.kind, Self::path_of(&table, ino)?)
        };
        if kind == FileKind::Directory {
            let marker = self.key(&path, FileKind::Directory);
            if marker.is_empty() {
                // The root of a mount without a key prefix has no key to hold attributes.
                return Ok(());
            }
            let mut meta = self.head_meta(&marker).await?;
            apply(&mut meta, libc::S_IFDIR);
            let options = PutOptions {
                metadata: meta.to_metadata(),
                ..PutOptions::default()
            };
            let empty = crate::store::Body::Bytes(Bytes::new());
            self.store.put(&marker, empty, &options).await?;
            if let Some(node) = self.table().get_mut(ino) {
                node.meta = Some(meta);
            }
            return Ok(());
        }
        let key = self.key(&path, FileKind::File);
        // A self-copy may give the object a new ETag (a multipart object's becomes a
        // single-part one): open handles reading the version copied follow it.
        let mut readers = self.lock_readers(|k| k == key).await;
        let local = self.cache.get(&key);
        // No upload of the file starts or ends while its attributes change.
        let _no_upload = match &local {
            Some(l) => Some(l.upload_lock.lock().await),
            None => None,
        };
        if let Some(local) = &local
            && (local.is_dirty() || local.etag().is_none())
        {
            self.cache.change_meta(local, |m| apply(m, libc::S_IFREG))?;
            if !local.has_writers() {
                self.cache.journal_dirty(local, false)?;
                self.writeback.enqueue(local, false);
            }
            return Ok(());
        }
        // In S3 only (or cached and clean): read the current metadata, other tools' names
        // included, and copy the object onto itself with the change.
        let head = self.store.head(&key).await?;
        let mut meta = PosixMeta::from_metadata(&head.metadata);
        apply(&mut meta, libc::S_IFREG);
        let mut metadata = head.metadata.clone();
        meta.apply_to(&mut metadata);
        let etag =
            crate::store::copy_object(self.store.as_ref(), &key, &key, head.size, Some(&metadata))
                .await?;
        Self::follow_copies(&mut readers, |_, pinned| {
            (pinned == head.etag).then(|| (key.clone(), etag.clone()))
        });
        if let Some(local) = &local {
            local.set_clean_meta(meta);
            local.set_etag(etag.clone());
        }
        if let Some(node) = self.table().get_mut(ino) {
            node.remote = Some(Remote {
                etag,
                ..Remote::from(&head)
            });
            node.meta = Some(meta);
            // LastModified changed with the copy: the next stat reads it.
            node.validated = None;
        }
        Ok(())
    }

    /// `truncate(2)`, or `ftruncate(2)` through handle `fh`: that handle's data, even when
    /// its name has been unlinked or replaced since (the inode's old path is someone else's).
    async fn truncate(&self, ino: Ino, size: u64, fh: Option<u64>) -> FsResult<()> {
        match self.table().get(ino).map(|n| n.kind) {
            None => return Err(FsError::not_found()),
            Some(FileKind::Directory) => return Err(FsError::errno(libc::EISDIR)),
            Some(FileKind::File | FileKind::Symlink) => {}
        }
        let file = match fh.map(|fh| self.handle_file(fh)).transpose()?.flatten() {
            Some(file) => file,
            None => self.stage(ino, size == 0).await?,
        };
        let growth = size.saturating_sub(file.size());
        self.cache.reserve(growth).await?;
        self.cache.set_len(&file, size)?;
        if !file.has_writers() {
            // `truncate(2)` of a file no one writes (readers may have it open): as good as a
            // close. A writer's close journals it otherwise.
            self.cache.journal_dirty(&file, false)?;
            self.writeback.enqueue(&file, false);
        }
        Ok(())
    }

    pub fn statfs(&self) -> StatFs {
        // S3 has no capacity limit: report 1 PiB, all free, in 4 KiB blocks.
        const BLOCKS: u64 = (1 << 50) / 4096;
        StatFs {
            blocks: BLOCKS,
            bfree: BLOCKS,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: 4096,
            namelen: NAME_MAX as u32,
        }
    }

    // ---- directories ------------------------------------------------------------------------

    fn usable_name(&self, name: &str, key: &str) -> bool {
        if name.is_empty() || name == "." || name == ".." || name.len() > NAME_MAX {
            self.warn_once(
                key,
                "cannot be shown as a file name (empty, '.', '..' or over 255 bytes); skipped",
            );
            return false;
        }
        true
    }

    /// A directory marker `name/`, carrying `mode` when it is not the mount's default.
    pub async fn mkdir(&self, parent: Ino, name: &str, mode: u32) -> FsResult<Entry> {
        self.writable()?;
        match self.resolve(parent, name).await {
            Ok(_) => return Err(FsError::errno(libc::EEXIST)),
            Err(e) if e.errno_value() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let path = Self::child_path(&Self::path_of(&self.table(), parent)?, name);
        let marker = self.key(&path, FileKind::Directory);
        let mut meta = PosixMeta::default();
        if (mode & 0o7777) as u16 != self.config.dir_mode {
            meta.set_perm(mode, libc::S_IFDIR);
        }
        let options = PutOptions {
            metadata: meta.to_metadata(),
            ..PutOptions::default()
        };
        self.store
            .put(&marker, crate::store::Body::Bytes(Bytes::new()), &options)
            .await?;
        self.exists_now(parent, name);
        let mut table = self.table();
        let ino = table.upsert_child(parent, name, FileKind::Directory);
        if let Some(node) = table.get_mut(ino) {
            node.lookups += 1;
            node.validated = Some(Instant::now());
            node.meta = Some(meta);
        }
        self.entry(&table, ino)
    }

    /// A symbolic link, stored as s3fs does: an object whose body is the target and whose
    /// stored mode is `S_IFLNK | 0777`. Written to S3 at once (it is small, and never changes).
    pub async fn symlink(&self, parent: Ino, name: &str, target: &str) -> FsResult<Entry> {
        self.writable()?;
        if target.len() > libc::PATH_MAX as usize {
            return Err(FsError::errno(libc::ENAMETOOLONG));
        }
        match self.resolve(parent, name).await {
            Ok(_) => return Err(FsError::errno(libc::EEXIST)),
            Err(e) if e.errno_value() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let key = self.key(
            &Self::child_path(&Self::path_of(&self.table(), parent)?, name),
            FileKind::File,
        );
        let meta = PosixMeta {
            mode: Some(libc::S_IFLNK | 0o777),
            ..PosixMeta::default()
        };
        let options = PutOptions {
            metadata: meta.to_metadata(),
            ..PutOptions::default()
        };
        let body = Bytes::copy_from_slice(target.as_bytes());
        let etag = self
            .store
            .put(&key, crate::store::Body::Bytes(body), &options)
            .await?;
        self.exists_now(parent, name);
        let mut table = self.table();
        let ino = table.upsert_child(parent, name, FileKind::File);
        let node = table.get_mut(ino).ok_or_else(FsError::not_found)?;
        node.remote = Some(Remote {
            size: target.len() as u64,
            etag,
            mtime: SystemTime::now(),
        });
        node.meta = Some(meta);
        node.validated = Some(Instant::now());
        node.lookups += 1;
        self.entry(&table, ino)
    }

    /// The target of symbolic link `ino`: its object's body.
    pub async fn readlink(&self, ino: Ino) -> FsResult<Bytes> {
        let (key, local, remote) = {
            let table = self.table();
            if self.attr_of(&table, ino)?.kind != FileKind::Symlink {
                return Err(FsError::errno(libc::EINVAL));
            }
            let (key, local) = self.file_key(&table, ino)?;
            let remote = table.get(ino).and_then(|n| n.remote.clone());
            (key, local, remote)
        };
        if let Some(local) = local {
            return Ok(Bytes::from(local.read_at(0, libc::PATH_MAX as u32)?));
        }
        let remote = remote.ok_or_else(FsError::not_found)?;
        Ok(self
            .store
            .get_range(&key, 0..remote.size, Some(&remote.etag))
            .await?)
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.writable()?;
        let ino = self.resolve(parent, name).await?;
        let prefix = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            self.key(&Self::path_of(&table, ino)?, FileKind::Directory)
        };
        if self
            .cache
            .children(&prefix)
            .iter()
            .any(|(_, l)| local_decides(l))
        {
            return Err(FsError::errno(libc::ENOTEMPTY));
        }
        let page = self
            .store
            .list(ListRequest {
                prefix: &prefix,
                delimiter: None,
                continuation: None,
                max_keys: Some(2),
            })
            .await?;
        if page.objects.iter().any(|o| o.key != prefix) || !page.prefixes.is_empty() {
            return Err(FsError::errno(libc::ENOTEMPTY));
        }
        self.store.delete(&prefix).await?;
        self.table().detach(parent, name);
        Ok(())
    }

    // ---- files ------------------------------------------------------------------------------

    fn insert_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handle_table().insert(fh, handle);
        fh
    }

    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> FsResult<(Entry, u64)> {
        self.writable()?;
        check_name(name)?;
        self.exists_now(parent, name);
        let mut table = self.table();
        let parent_node = table.get(parent).ok_or_else(FsError::not_found)?;
        if parent_node.kind != FileKind::Directory {
            return Err(FsError::errno(libc::ENOTDIR));
        }
        let path = Self::child_path(&Self::path_of(&table, parent)?, name);
        // A new file is an object to create, even if nothing is ever written to it.
        let local = self.cache.create(&self.key(&path, FileKind::File), true)?;
        // Believed new: its upload must not replace an object someone else creates meanwhile.
        local.set_base(Base::Absent);
        local.opened(true);
        let ino = table.upsert_child(parent, name, FileKind::File);
        let node = table.get_mut(ino).ok_or_else(FsError::not_found)?;
        node.lookups += 1;
        node.open_handles += 1;
        node.remote = None;
        node.validated = None;
        node.kernel_data = Some(DataVersion::Local(local.id()));
        if (mode & 0o7777) as u16 != self.config.file_mode {
            self.cache
                .change_meta(&local, |m| m.set_perm(mode, libc::S_IFREG))?;
        }
        let entry = self.entry(&table, ino)?;
        drop(table);
        let append = OpenMode::from_flags(flags).append;
        let fh = self.insert_handle(Handle::Local {
            ino,
            file: local,
            append,
            write: true,
        });
        Ok((entry, fh))
    }

    pub async fn open(&self, ino: Ino, mode: OpenMode) -> FsResult<u64> {
        Ok(self.open_keeping_cache(ino, mode).await?.0)
    }

    /// `open`, also saying whether the kernel may keep the pages it cached for the inode (FUSE's
    /// `FOPEN_KEEP_CACHE`): yes when this open serves the data version the previous open of
    /// the inode served — the same local data file (every change to it since went through the
    /// kernel, so its pages are current) or the same object version. Otherwise the kernel
    /// drops them. A re-read of an unchanged file is then served from memory.
    pub async fn open_keeping_cache(&self, ino: Ino, mode: OpenMode) -> FsResult<(u64, bool)> {
        if mode.write {
            self.writable()?;
        }
        let (key, local, remote) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Err(FsError::errno(libc::EISDIR));
            }
            let (key, local) = self.file_key(&table, ino)?;
            let remote = node
                .remote
                .clone()
                .filter(|_| self.is_fresh(node.validated));
            (key, local, remote)
        };
        let (local, remote) = match local {
            Some(local) => match self.still_current(&key, local, remote.as_ref()).await? {
                Some(local) => (Some(local), remote),
                // S3 has another version than the copy: the table's may be older still.
                None => (None, None),
            },
            None => (None, remote),
        };
        let local = match local {
            Some(local) => Some(local),
            None if mode.write => Some(self.stage(ino, mode.truncate).await?),
            None => None,
        };
        let (handle, version) = match local {
            Some(file) => {
                if mode.truncate && file.size() > 0 {
                    self.cache.set_len(&file, 0)?;
                }
                file.opened(mode.write);
                let version = DataVersion::Local(file.id());
                let handle = Handle::Local {
                    ino,
                    file,
                    append: mode.append,
                    write: mode.write,
                };
                (handle, version)
            }
            None => {
                // Pin the version we open: the ETag from a fresh HEAD unless just validated.
                let remote = match remote {
                    Some(r) => r,
                    None => {
                        let head = self.store.head(&key).await?;
                        if let Some(node) = self.table().get_mut(ino) {
                            node.set_head(&head);
                        }
                        Remote::from(&head)
                    }
                };
                let version = DataVersion::Object(remote.etag.clone());
                let reader = Reader::new(key, remote.etag, remote.size);
                let handle = Handle::Remote {
                    ino,
                    reader: Arc::new(tokio::sync::Mutex::new(reader)),
                };
                (handle, version)
            }
        };
        let mut keep_cache = false;
        if let Some(node) = self.table().get_mut(ino) {
            node.open_handles += 1;
            keep_cache = node.kernel_data.as_ref() == Some(&version);
            node.kernel_data = Some(version);
        }
        Ok((self.insert_handle(handle), keep_cache))
    }

    /// A clean cached copy is served only while its ETag is the object's: when the attributes
    /// are stale, a HEAD checks; a copy another client replaced (or deleted) is dropped.
    async fn still_current(
        &self,
        key: &str,
        local: Arc<LocalFile>,
        fresh_remote: Option<&Remote>,
    ) -> FsResult<Option<Arc<LocalFile>>> {
        if local.is_dirty() || local.open_count() > 0 {
            return Ok(Some(local));
        }
        let Some(etag) = local.etag() else {
            return Ok(Some(local));
        };
        let current = match fresh_remote {
            Some(r) if r.etag == etag => return Ok(Some(local)),
            // Unknown, or different: the table may predate our own latest upload of this file
            // (the uploader does not update it), so only S3 can say the copy is stale.
            _ => match self.store.head(key).await {
                Ok(meta) => Some(meta.etag),
                Err(StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
        };
        if current.as_deref() == Some(etag.as_str()) {
            return Ok(Some(local));
        }
        tracing::debug!(
            key,
            "cached copy is stale (the object changed in S3); dropped"
        );
        self.cache.evict_key(key);
        Ok(None)
    }

    /// Give file `ino` local data: empty when `empty`, else its object's bytes (pinned to the
    /// ETag we know): fetched at once, or, for a large object on a server with conditional
    /// writes, as a sparse file filled on demand. If another task staged it meanwhile, that
    /// copy wins. Handles reading the file from S3 move onto the local data
    /// ([`Self::adopt_readers`]).
    async fn stage(&self, ino: Ino, empty: bool) -> FsResult<Arc<LocalFile>> {
        let (key, local, remote, meta) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            let (key, local) = self.file_key(&table, ino)?;
            (key, local, node.remote.clone(), node.meta)
        };
        if let Some(local) = local {
            self.adopt_readers(ino, &local).await;
            return Ok(local);
        }
        // Not known to be in S3 (created here, or renamed while dirty, then uploaded and
        // evicted), or its attributes unknown: ask, rather than take the object for new and
        // upload an empty file over it, or drop its mode.
        let (remote, meta) = match (&remote, meta, empty) {
            (None, _, false) | (_, None, _) => match self.store.head(&key).await {
                Ok(head) => (
                    Some(Remote::from(&head)),
                    PosixMeta::from_metadata(&head.metadata),
                ),
                Err(StoreError::NotFound(_)) => (None, PosixMeta::default()),
                Err(e) => return Err(e.into()),
            },
            (_, Some(meta), _) => (remote, meta),
        };
        let local = self.cache.create_detached(&key)?;
        match (&remote, empty) {
            (Some(remote), false) => {
                local.make_sparse(remote.size)?;
                local.set_mtime(remote.mtime);
                local.set_clean_meta(meta);
                local.set_etag(remote.etag.clone());
                // Server-side part copies are only safe where the upload's If-Match catches
                // a base replaced meanwhile.
                if remote.size < SPARSE_STAGING_MIN || !self.config.conditional_writes {
                    self.cache
                        .fill(self.store.as_ref(), &local, 0..remote.size)
                        .await?;
                }
            }
            // Truncated, or known to the table but not in S3: a new (possibly empty) object,
            // keeping the old one's mode and owner.
            _ => {
                local.set_clean_meta(PosixMeta {
                    mtime: None,
                    ..meta
                });
                local.set_base(match &remote {
                    Some(remote) => Base::Version(remote.etag.clone()),
                    None => Base::Absent,
                });
                local.mark_dirty();
            }
        }
        let local = self.cache.insert_if_absent(local);
        if let Some(node) = self.table().get_mut(ino) {
            node.validated = None;
        }
        self.adopt_readers(ino, &local).await;
        Ok(local)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let reader = match self.handle_table().get(&fh) {
            Some(Handle::Local { .. }) => None,
            Some(Handle::Remote { reader, .. }) => Some(reader.clone()),
            _ => return Err(FsError::errno(libc::EBADF)),
        };
        // The reader's lock comes first: the mount's own operations that copy or delete the
        // object hold it while they re-point or convert the handle (`lock_readers`,
        // `localize_readers`), so what it reads from is decided after them.
        let reader = match reader {
            Some(reader) => Some(reader.lock_owned().await),
            None => None,
        };
        match (self.handle_data(fh)?, reader) {
            (Some(file), _) => {
                let end = offset.saturating_add(size as u64);
                let span = crate::cache::fill_span(offset..end);
                // A read that needs bytes fetched from S3 first is a cache miss.
                let source = if file.missing_in(offset..end).is_empty() {
                    "cache"
                } else {
                    "s3"
                };
                self.cache.fill(self.store.as_ref(), &file, span).await?;
                let data = file.read_at(offset, size)?;
                metrics::counter!(crate::metrics::names::READ_BYTES, "source" => source)
                    .increment(data.len() as u64);
                Ok(Bytes::from(data))
            }
            (None, Some(mut reader)) => {
                let data = reader.read(&self.store, offset, size).await?;
                metrics::counter!(crate::metrics::names::READ_BYTES, "source" => "s3")
                    .increment(data.len() as u64);
                Ok(data)
            }
            (None, None) => Err(FsError::errno(libc::EBADF)),
        }
    }

    /// The readers of the handles that read from S3 a file whose key `selects`, locked: no read
    /// through them runs until the guards drop. Taken before the mount's own server-side copy
    /// of those objects (a rename, a metadata self-copy), after which [`Self::follow_copies`]
    /// re-points them, so no read sees the interval where the pinned version is gone.
    async fn lock_readers(&self, selects: impl Fn(&str) -> bool) -> Vec<ReaderGuard> {
        let remote: Vec<(Ino, Arc<tokio::sync::Mutex<Reader>>)> = self
            .handle_table()
            .values()
            .filter_map(|h| match h {
                Handle::Remote { ino, reader } => Some((*ino, reader.clone())),
                _ => None,
            })
            .collect();
        let selected: Vec<_> = {
            let table = self.table();
            remote
                .into_iter()
                .filter(|(ino, _)| self.file_key(&table, *ino).is_ok_and(|(k, _)| selects(&k)))
                .map(|(_, reader)| reader)
                .collect()
        };
        let mut guards = Vec::with_capacity(selected.len());
        for reader in selected {
            guards.push(reader.lock_owned().await);
        }
        guards
    }

    /// Re-point locked readers at the copies the mount made of their pinned versions:
    /// `copied(key, etag)` is the `(key, etag)` of the copy, if that version was copied. A
    /// reader pinned to another version (replaced by another client) stays as it is.
    fn follow_copies(
        readers: &mut [ReaderGuard],
        copied: impl Fn(&str, &str) -> Option<(String, String)>,
    ) {
        for reader in readers {
            let (key, etag) = reader.pinned();
            if let Some((key, etag)) = copied(key, etag) {
                reader.repin(key, etag);
            }
        }
    }

    /// Handles reading file `ino` from S3 become handles on local data holding its bytes, so
    /// they keep reading after the mount's own delete or replacement of the object (POSIX
    /// keeps an open file's data until its last close): the file is staged (which adopts the
    /// handles, see [`Self::adopt_readers`]) and its whole object fetched into the cache.
    async fn localize_readers(&self, ino: Ino) -> FsResult<()> {
        if self.remote_handles(ino).is_empty() {
            return Ok(());
        }
        let staged = async {
            let file = self.stage(ino, false).await?;
            self.cache
                .fill(self.store.as_ref(), &file, 0..file.size())
                .await?;
            FsResult::Ok(())
        };
        match staged.await {
            // The object changed or went away in S3: the handles' version is gone already.
            Err(e) if matches!(e.errno_value(), libc::ESTALE | libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// The handles reading file `ino` from S3, with their readers.
    fn remote_handles(&self, ino: Ino) -> Vec<(u64, Arc<tokio::sync::Mutex<Reader>>)> {
        self.handle_table()
            .iter()
            .filter_map(|(fh, h)| match h {
                Handle::Remote { ino: i, reader } if *i == ino => Some((*fh, reader.clone())),
                _ => None,
            })
            .collect()
    }

    /// File `ino` has local data now (`file`): the handles reading it from S3 become handles on
    /// it when it holds what they read, the mount's own change (every descriptor sees those)
    /// or the very version they are pinned to. As local handles they keep the data in the
    /// cache until they close. A handle pinned to a version another client has replaced since
    /// is left as it is, and its reads fail with `ESTALE`, as they would have.
    async fn adopt_readers(&self, ino: Ino, file: &Arc<LocalFile>) {
        let remote = self.remote_handles(ino);
        if remote.is_empty() {
            return;
        }
        // Decided once, before the first adopted handle counts as an open of the file.
        let ours = local_decides(file);
        let etag = file.etag();
        for (fh, reader) in remote {
            let reader = reader.lock().await;
            if !ours && etag.as_deref() != Some(reader.pinned().1) {
                continue;
            }
            let mut handles = self.handle_table();
            if let Some(handle @ Handle::Remote { .. }) = handles.get_mut(&fh) {
                file.opened(false);
                *handle = Handle::Local {
                    ino,
                    file: file.clone(),
                    append: false,
                    write: false,
                };
            }
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (file, append) = {
            let handles = self.handle_table();
            match handles.get(&fh) {
                Some(Handle::Local {
                    file,
                    append,
                    write: true,
                    ..
                }) => (file.clone(), *append),
                _ => return Err(FsError::errno(libc::EBADF)),
            }
        };
        let end = if append { file.size() } else { offset } + data.len() as u64;
        let growth = end.saturating_sub(file.size());
        if growth > 0 {
            self.cache.reserve(growth).await?;
        }
        self.cache.write(&file, offset, data, append)?;
        self.writeback.written(&file);
        Ok(data.len() as u32)
    }

    /// The local data handle `fh` works on: its own, or, for a handle reading from S3, the data
    /// its file has been given since through another handle (the mount's own changes are seen
    /// through every descriptor).
    fn handle_data(&self, fh: u64) -> FsResult<Option<Arc<LocalFile>>> {
        let ino = match self.handle_table().get(&fh) {
            Some(Handle::Local { file, .. }) => return Ok(Some(file.clone())),
            Some(Handle::Remote { ino, .. }) => *ino,
            _ => return Err(FsError::errno(libc::EBADF)),
        };
        let local = self.file_key(&self.table(), ino).ok().and_then(|(_, l)| l);
        Ok(local.filter(|l| local_decides(l)))
    }

    fn handle_file(&self, fh: u64) -> FsResult<Option<Arc<LocalFile>>> {
        match self.handle_table().get(&fh) {
            Some(Handle::Local { file, .. }) => Ok(Some(file.clone())),
            Some(Handle::Remote { .. }) => Ok(None),
            _ => Err(FsError::errno(libc::EBADF)),
        }
    }

    /// `close` of one descriptor: a changed file is journaled (it now survives a daemon crash)
    /// and queued for upload after the write-back delay.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let writer = matches!(
            self.handle_table().get(&fh),
            Some(Handle::Local { write: true, .. })
        );
        if writer
            && let Some(file) = self.handle_file(fh)?
            && file.is_dirty()
        {
            self.cache.journal_dirty(&file, false)?;
            self.writeback.enqueue(&file, false);
        }
        Ok(())
    }

    /// `fsync`: returns once the file's current contents are an object in S3.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let Some(file) = self.handle_data(fh)? else {
            return Ok(());
        };
        if !file.is_dirty() {
            return Ok(());
        }
        self.cache.journal_dirty(&file, true)?;
        self.writeback
            .sync(&file)
            .await
            .map_err(|e| FsError::with_message(libc::EIO, format!("fsync of {}: {e}", file.key())))
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle_table().remove(&fh);
        let Some(handle) = handle else {
            return Err(FsError::errno(libc::EBADF));
        };
        let ino = match handle {
            Handle::Local {
                ino, file, write, ..
            } => {
                file.closed(write);
                // The uploader leaves files open for writing alone: the last writer's release
                // (which the kernel sends after the close's flush) queues it.
                if write && !file.has_writers() && file.is_dirty() {
                    self.cache.journal_dirty(&file, false)?;
                    self.writeback.enqueue(&file, false);
                }
                ino
            }
            Handle::Remote { ino, .. } => ino,
            Handle::Dir { .. } => return Ok(()),
        };
        let mut table = self.table();
        if let Some(node) = table.get_mut(ino) {
            node.open_handles = node.open_handles.saturating_sub(1);
            if node.open_handles == 0 {
                self.orphans().remove(&ino);
            }
        }
        table.collect(ino);
        Ok(())
    }

    /// `syncfs`, unmount, SIGTERM: upload every dirty file now and wait (at most `timeout`).
    /// Returns how many files are still dirty (their data stays journaled in the cache).
    pub async fn drain(&self, timeout: std::time::Duration) -> usize {
        self.writeback.drain(timeout).await
    }

    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.writable()?;
        let ino = self.resolve(parent, name).await?;
        let key = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Err(FsError::errno(libc::EISDIR));
            }
            self.key(&Self::path_of(&table, ino)?, FileKind::File)
        };
        // Open handles keep their data (those reading from S3 get a local copy first); no
        // upload will re-create the object. An upload already running finishes first, so the
        // delete below is the last word.
        self.localize_readers(ino).await?;
        let local = self.cache.remove(&key);
        if let Some(file) = &local {
            let _after_upload = file.upload_lock.lock().await;
            self.writeback.abort_abandoned(file);
        }
        self.store.delete(&key).await?;
        let mut table = self.table();
        if table.child(parent, name) == Some(ino) {
            table.detach(parent, name);
        }
        if let Some(file) = local
            && table.get(ino).is_some_and(|n| n.open_handles > 0)
        {
            self.orphans().insert(ino, file);
        }
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        flags: RenameFlags,
    ) -> FsResult<()> {
        self.writable()?;
        check_name(new_name)?;
        if flags.exchange {
            return Err(FsError::errno(libc::EINVAL));
        }
        let ino = self.resolve(parent, name).await?;
        let target = match self.resolve(new_parent, new_name).await {
            Ok(t) => Some(t),
            Err(e) if e.errno_value() == libc::ENOENT => None,
            Err(e) => return Err(e),
        };
        if target == Some(ino) {
            return Ok(());
        }
        let (kind, old_key, new_key, remote) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if let Some(t) = target {
                if flags.noreplace {
                    return Err(FsError::errno(libc::EEXIST));
                }
                let t = table.get(t).ok_or_else(FsError::not_found)?;
                match (node.kind, t.kind) {
                    (FileKind::File, FileKind::Directory) => {
                        return Err(FsError::errno(libc::EISDIR));
                    }
                    (FileKind::Directory, FileKind::File) => {
                        return Err(FsError::errno(libc::ENOTDIR));
                    }
                    _ => {}
                }
            }
            let new_path = Self::child_path(&Self::path_of(&table, new_parent)?, new_name);
            (
                node.kind,
                self.key(&Self::path_of(&table, ino)?, node.kind),
                self.key(&new_path, node.kind),
                node.remote.clone(),
            )
        };
        if kind == FileKind::Directory {
            return self
                .rename_dir(ino, (new_parent, new_name), &old_key, &new_key, target)
                .await;
        }
        if let Some(target) = target {
            // The replaced file's open handles keep its data.
            self.localize_readers(target).await?;
        }
        // Open handles reading the version copied follow it to the new key.
        let mut readers = self.lock_readers(|k| k == old_key).await;
        let local = self.cache.get(&old_key);
        // Holding the file's upload lock, no upload of it starts or ends while it moves: it is
        // either dirty (and moves as local data) or clean and in S3 (and is copied there).
        let _no_upload = match &local {
            Some(l) => Some(l.upload_lock.lock().await),
            None => None,
        };
        let dirty = local.as_ref().is_some_and(|l| l.is_dirty());
        if let Some(local) = local.as_ref().filter(|_| dirty) {
            // Its unfetched bytes are the old key's object, which the rename deletes.
            self.cache
                .fill(self.store.as_ref(), local, 0..local.size())
                .await?;
        }
        // Clean: copy first (if it fails, nothing has changed). The copy is a new object with
        // an ETag of its own (a copied multipart object gets a single-part ETag).
        let size = local
            .as_ref()
            .map(|l| l.size())
            .or(remote.as_ref().map(|r| r.size));
        let copied_from = local
            .as_ref()
            .and_then(|l| l.etag())
            .or(remote.map(|r| r.etag));
        let copied_etag = match size.filter(|_| !dirty) {
            Some(size) => {
                let etag =
                    crate::store::copy_object(self.store.as_ref(), &old_key, &new_key, size, None)
                        .await?;
                Self::follow_copies(&mut readers, |_, pinned| {
                    (copied_from.as_deref() == Some(pinned))
                        .then(|| (new_key.clone(), etag.clone()))
                });
                Some(etag)
            }
            None => None,
        };
        // Dirty: the local data is the newest version; it is re-keyed and uploaded under the
        // new name. A replaced target's upload in flight finishes (or aborts) before this
        // file's upload can start, so it can never land over it.
        // The data replaces whatever is at the new name (rename's meaning): no version check.
        let replaced = self.cache.rekey(&old_key, &new_key, Base::Unknown)?;
        if let Some(replaced) = &replaced {
            let _after_its_upload = replaced.upload_lock.lock().await;
            self.writeback.abort_abandoned(replaced);
        }
        if let Some(local) = &local {
            match &copied_etag {
                Some(etag) => local.set_etag(etag.clone()),
                None if dirty => {
                    self.cache.journal_dirty(local, false)?;
                    self.writeback.enqueue(local, false);
                }
                None => {}
            }
        }
        self.exists_now(new_parent, new_name);
        {
            let mut table = self.table();
            table.rename(ino, new_parent, new_name);
            if let (Some(target), Some(file)) = (target, replaced)
                && table.get(target).is_some_and(|n| n.open_handles > 0)
            {
                self.orphans().insert(target, file);
            }
            if let Some(node) = table.get_mut(ino) {
                if let (Some(etag), Some(remote)) = (copied_etag, &mut node.remote) {
                    remote.etag = etag;
                    node.validated = Some(Instant::now());
                } else if dirty {
                    node.remote = None;
                    node.validated = None;
                }
            }
        }
        // The old key may hold an object (uploaded earlier, or by the upload that just ended).
        self.store.delete(&old_key).await?;
        Ok(())
    }

    /// Move directory `ino` (key prefix `from`) to `to` (`new`): every object under the prefix
    /// is copied server-side, then the originals deleted; files with changes not yet uploaded
    /// are re-keyed and uploaded under the new name. Not atomic: another client can see both
    /// trees, or part of the new one, while it runs; if a copy fails, the originals stay and
    /// the copies made so far remain under the new name.
    async fn rename_dir(
        &self,
        ino: Ino,
        new: (Ino, &str),
        from: &str,
        to: &str,
        target: Option<Ino>,
    ) -> FsResult<()> {
        if to.starts_with(from) {
            return Err(FsError::errno(libc::EINVAL)); // into its own subtree
        }
        if target.is_some() {
            // Replacing a directory is allowed only when it is empty.
            let page = self
                .store
                .list(ListRequest {
                    prefix: to,
                    delimiter: None,
                    continuation: None,
                    max_keys: Some(2),
                })
                .await?;
            if page.objects.iter().any(|o| o.key != to)
                || self.cache.under(to).iter().any(|(_, l)| local_decides(l))
            {
                return Err(FsError::errno(libc::ENOTEMPTY));
            }
        }
        // Everything under the prefix, counted before anything changes.
        let mut objects = Vec::new();
        let mut sizes = HashMap::new();
        let mut etags = HashMap::new();
        let mut continuation = None;
        loop {
            let page = self
                .store
                .list(ListRequest {
                    prefix: from,
                    delimiter: None,
                    continuation,
                    max_keys: None,
                })
                .await?;
            for o in page.objects {
                sizes.insert(o.key.clone(), o.size);
                etags.insert(o.key.clone(), o.etag);
                objects.push(o.key);
            }
            if objects.len() > self.config.max_rename_objects {
                return Err(FsError::with_message(
                    libc::EXDEV,
                    format!(
                        "rename of {from}: more than {} objects (--max-rename-objects)",
                        self.config.max_rename_objects
                    ),
                ));
            }
            match page.next {
                Some(token) => continuation = Some(token),
                None => break,
            }
        }
        let renamed = |key: &str| -> String { format!("{to}{}", &key[from.len()..]) };
        // Open handles reading a version that is copied follow it to its new key: `copied`
        // maps (old key, ETag copied) to the copy's ETag.
        let mut readers = self.lock_readers(|k| k.starts_with(from)).await;
        let mut copied: HashMap<(String, String), String> = HashMap::new();
        // Local files first, each under its upload lock (no upload of it starts or ends while
        // it moves): a dirty one is re-keyed and uploads under the new name; a clean one is
        // copied in S3 like the rest, and its cached data re-keyed.
        let mut moved = HashSet::new();
        let listed: HashSet<&str> = objects.iter().map(String::as_str).collect();
        for (key, local) in self.cache.under(from) {
            let _no_upload = local.upload_lock.lock().await;
            if !local_decides(&local) && listed.contains(key.as_str()) {
                // A clean copy of a listed object, which is copied with the others: the copy
                // may be of a version another client has replaced since, and is dropped.
                self.cache.evict_key(&key);
                continue;
            }
            let new_key = renamed(&key);
            if local.is_dirty() {
                // Its unfetched bytes are the old key's object, which the rename deletes.
                self.cache
                    .fill(self.store.as_ref(), &local, 0..local.size())
                    .await?;
            } else {
                let copy = crate::store::copy_object(
                    self.store.as_ref(),
                    &key,
                    &new_key,
                    local.size(),
                    None,
                );
                let source = local.etag();
                let etag = match copy.await {
                    Ok(etag) => etag,
                    Err(StoreError::NotFound(_)) if !local_decides(&local) => {
                        // Another client deleted the object: the copy goes with it.
                        self.cache.evict_key(&key);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(source) = source {
                    copied.insert((key.clone(), source), etag.clone());
                }
                local.set_etag(etag);
            }
            self.cache.rekey(&key, &new_key, Base::Unknown)?;
            if local.is_dirty() {
                self.cache.journal_dirty(&local, false)?;
                self.writeback.enqueue(&local, false);
            }
            moved.insert(key);
        }
        let pairs: Vec<(String, String, u64)> = objects
            .iter()
            .filter(|k| !moved.contains(*k))
            .map(|k| (k.clone(), renamed(k), sizes.get(k).copied().unwrap_or(0)))
            .collect();
        let store = &self.store;
        let copies: Vec<(String, Result<String, StoreError>)> = futures::stream::iter(pairs)
            .map(|(from, to, size)| async move {
                let copy = async {
                    if from.ends_with('/') {
                        // A directory marker is written anew (some servers, SeaweedFS among them,
                        // cannot copy one), with its stored attributes.
                        let head = store.head(&from).await?;
                        let options = PutOptions {
                            metadata: head.metadata,
                            ..PutOptions::default()
                        };
                        let empty = crate::store::Body::Bytes(Bytes::new());
                        return store.put(&to, empty, &options).await;
                    }
                    crate::store::copy_object(store.as_ref(), &from, &to, size, None).await
                };
                let copied = copy.await;
                (from, copied)
            })
            .buffer_unordered(RENAME_CONCURRENCY)
            .collect()
            .await;
        for (key, copy) in copies {
            let etag = copy?;
            if let Some(source) = etags.remove(&key) {
                copied.insert((key, source), etag);
            }
        }
        Self::follow_copies(&mut readers, |key, pinned| {
            let etag = copied.get(&(key.to_owned(), pinned.to_owned()))?;
            Some((renamed(key), etag.clone()))
        });
        let (new_parent, new_name) = new;
        self.exists_now(new_parent, new_name);
        {
            let mut table = self.table();
            table.rename(ino, new_parent, new_name);
            table.invalidate_subtree(ino);
        }
        // A local file's old key may hold an object the listing lacks: uploaded by the upload
        // that ended while the rename waited for it.
        let old_keys: HashSet<String> = objects.into_iter().chain(moved).collect();
        let deletes: Vec<Result<(), StoreError>> = futures::stream::iter(old_keys)
            .map(|key| async move {
                match store.delete(&key).await {
                    Err(StoreError::NotFound(_)) => Ok(()),
                    other => other,
                }
            })
            .buffer_unordered(RENAME_CONCURRENCY)
            .collect()
            .await;
        for delete in deletes {
            delete?;
        }
        Ok(())
    }
}
