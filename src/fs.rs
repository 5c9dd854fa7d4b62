//! The filesystem core: POSIX operations on top of an [`ObjectStore`].
//!
//! Design (DESIGN.md §3):
//! - Async operations on plain domain types ([`Attr`], [`Entry`], [`DirEntry`]); this module
//!   never sees a fuser type, so it is tested directly against the in-memory store.
//! - A file is the object at `prefix + path`; a directory is a key prefix `prefix + path + "/"`,
//!   shown whether it exists through other keys (implicit) or through a `path/` marker object
//!   (what `mkdir` writes).
//! - Attributes come from LIST (readdir) and HEAD (lookup) and are trusted for `metadata_ttl`.
//! - Reads of files without local data are ranged GETs pinned to the ETag seen at open
//!   (`crate::read`). Opening for writing stages the file in the local cache (`crate::cache`);
//!   `flush` (every `close`) and `fsync` upload it when it changed (`crate::upload`).
//!
//! Lock order: the inode table (`inodes`, a std mutex, never held across `.await`) before a
//! `LocalFile`'s state lock; the handle table (`handles`) is never held together with either.
//! A handle's `Reader` and a `LocalFile`'s `upload_lock` are async mutexes taken with no other
//! lock held.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

mod inode;
mod types;

pub use inode::Remote;
pub use types::*;

use crate::cache::{Cache, LocalFile};
use crate::error::{FsError, FsResult};
use crate::read::Reader;
use crate::store::{ListRequest, ObjectStore, PutOptions, StoreError};
use crate::upload::Uploader;
use inode::InodeTable;

/// Objects fetched into the cache for a write-open are downloaded in pieces of this size.
const DOWNLOAD_CHUNK: u64 = 8 << 20;

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
    /// A directory listing, snapshotted at `opendir`.
    Dir { entries: Arc<Vec<DirEntry>> },
}

pub struct Filesystem {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    config: FsConfig,
    cache: Cache,
    uploader: Uploader,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Keys already reported as unusable names (logged once each).
    warned_keys: Mutex<HashSet<String>>,
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

impl Filesystem {
    /// A filesystem over `store`, with every key under `prefix` (empty, or ending in `/`).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: String,
        config: FsConfig,
    ) -> std::io::Result<Self> {
        let cache = Cache::open(&config.cache_dir)?;
        let uploader = Uploader::new(store.clone(), config.part_size, config.upload_concurrency);
        Ok(Filesystem {
            store,
            prefix,
            config,
            cache,
            uploader,
            inodes: Mutex::new(InodeTable::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            warned_keys: Mutex::new(HashSet::new()),
            mounted_at: SystemTime::now(),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
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
            (FileKind::File, _) => format!("{}{path}", self.prefix),
            (FileKind::Directory, true) => self.prefix.clone(),
            (FileKind::Directory, false) => format!("{}{path}/", self.prefix),
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

    fn attr_of(&self, table: &InodeTable, ino: Ino) -> FsResult<Attr> {
        let node = table.get(ino).ok_or_else(FsError::not_found)?;
        let (size, mtime) = match (&node.local, &node.remote) {
            (Some(local), _) => (local.size(), local.mtime()),
            (None, Some(r)) => (r.size, r.mtime),
            (None, None) => (0, self.mounted_at),
        };
        let default_perm = match node.kind {
            FileKind::File => self.config.file_mode,
            FileKind::Directory => self.config.dir_mode,
        };
        Ok(Attr {
            ino,
            kind: node.kind,
            size: if node.kind == FileKind::Directory {
                0
            } else {
                size
            },
            mtime: node.mtime.unwrap_or(mtime),
            perm: node.mode.unwrap_or(default_perm),
            uid: node.uid.unwrap_or(self.config.uid),
            gid: node.gid.unwrap_or(self.config.gid),
        })
    }

    fn entry(&self, table: &InodeTable, ino: Ino) -> FsResult<Entry> {
        Ok(Entry {
            attr: self.attr_of(table, ino)?,
            ttl: self.config.metadata_ttl,
        })
    }

    fn is_fresh(&self, validated: Instant) -> bool {
        validated.elapsed() < self.config.metadata_ttl
    }

    // ---- name resolution --------------------------------------------------------------------

    /// Find `parent/name`, from the table while fresh, else from S3: a directory if any key lies
    /// under `name/` (a key that is both an object and a prefix shows as the directory), else a
    /// file if the object exists. Does not count a kernel lookup.
    async fn resolve(&self, parent: Ino, name: &str) -> FsResult<Ino> {
        check_name(name)?;
        let parent_path = {
            let table = self.table();
            let node = table.get(parent).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            if let Some(ino) = table.child(parent, name) {
                let child = table.get(ino).ok_or_else(FsError::not_found)?;
                if child.local.is_some() || self.is_fresh(child.validated) {
                    return Ok(ino);
                }
            }
            Self::path_of(&table, parent)?
        };
        let path = Self::child_path(&parent_path, name);
        let file_key = self.key(&path, FileKind::File);
        let dir_key = self.key(&path, FileKind::Directory);
        let listing = ListRequest {
            prefix: &dir_key,
            delimiter: Some("/"),
            continuation: None,
            max_keys: Some(1),
        };
        let (head, list) = tokio::join!(self.store.head(&file_key), self.store.list(listing));
        let list = list?;
        let is_dir = !list.objects.is_empty() || !list.prefixes.is_empty();
        let head = match head {
            Ok(meta) => Some(meta),
            Err(StoreError::NotFound(_)) => None,
            Err(e) if is_dir => {
                tracing::debug!(key = file_key, "HEAD failed beside a directory: {e}");
                None
            }
            Err(e) => return Err(e.into()),
        };
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
                node.validated = Instant::now();
            }
            Ok(ino)
        } else if let Some(meta) = head {
            let ino = table.upsert_child(parent, name, FileKind::File);
            if let Some(node) = table.get_mut(ino) {
                node.remote = Some(Remote {
                    size: meta.size,
                    etag: meta.etag,
                    mtime: meta.last_modified,
                });
                node.validated = Instant::now();
            }
            Ok(ino)
        } else {
            // Gone from S3: forget the stale edge unless something local keeps it alive.
            if let Some(ino) = table.child(parent, name) {
                if table.get(ino).is_some_and(|n| n.local.is_some()) {
                    return Ok(ino);
                }
                table.detach(parent, name);
            }
            Err(FsError::not_found())
        }
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
        let refresh = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::File && node.local.is_none() && !self.is_fresh(node.validated)
            {
                Some(self.key(&Self::path_of(&table, ino)?, FileKind::File))
            } else {
                return self.attr_of(&table, ino);
            }
        };
        if let Some(key) = refresh {
            match self.store.head(&key).await {
                Ok(meta) => {
                    let mut table = self.table();
                    if let Some(node) = table.get_mut(ino) {
                        node.remote = Some(Remote {
                            size: meta.size,
                            etag: meta.etag,
                            mtime: meta.last_modified,
                        });
                        node.validated = Instant::now();
                    }
                }
                // Deleted behind our back: keep showing what we knew until the next lookup
                // fails; an open handle still reads its pinned version or gets ESTALE.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.attr_of(&self.table(), ino)
    }

    pub async fn setattr(&self, ino: Ino, change: SetAttr) -> FsResult<Attr> {
        if change.size.is_some()
            || change.mode.is_some()
            || change.uid.is_some()
            || change.gid.is_some()
        {
            self.writable()?;
        }
        if let Some(size) = change.size {
            self.truncate(ino, size).await?;
        }
        let mut table = self.table();
        let node = table.get_mut(ino).ok_or_else(FsError::not_found)?;
        if let Some(mode) = change.mode {
            node.mode = Some((mode & 0o7777) as u16);
        }
        if let Some(uid) = change.uid {
            node.uid = Some(uid);
        }
        if let Some(gid) = change.gid {
            node.gid = Some(gid);
        }
        if let Some(mtime) = change.mtime {
            match &node.local {
                Some(local) => local.set_mtime(mtime),
                None => node.mtime = Some(mtime),
            }
        }
        self.attr_of(&table, ino)
    }

    async fn truncate(&self, ino: Ino, size: u64) -> FsResult<()> {
        let existing = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Err(FsError::errno(libc::EISDIR));
            }
            node.local.clone()
        };
        if let Some(local) = existing {
            // Open (or not yet uploaded): change the local data; the next flush uploads it.
            return Ok(local.set_len(size)?);
        }
        // `truncate(2)` on a closed file: stage it, change it and upload it now.
        let local = self.stage(ino, size == 0).await?;
        local.set_len(size)?;
        let result = self.upload(ino, &local).await;
        self.unstage_if_idle(ino);
        result
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

    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let (path, parent) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            (Self::path_of(&table, ino)?, node.parent)
        };
        let prefix = self.key(&path, FileKind::Directory);
        let mut dirs: Vec<String> = Vec::new();
        let mut files: Vec<crate::store::ObjectMeta> = Vec::new();
        let mut continuation = None;
        loop {
            let page = self
                .store
                .list(ListRequest {
                    prefix: &prefix,
                    delimiter: Some("/"),
                    continuation,
                    max_keys: None,
                })
                .await?;
            for p in page.prefixes {
                let name = &p[prefix.len()..p.len() - 1];
                if self.usable_name(name, &p) {
                    dirs.push(name.to_string());
                }
            }
            for o in page.objects {
                if o.key.len() == prefix.len() {
                    continue; // the directory's own marker
                }
                let name = &o.key[prefix.len()..];
                if self.usable_name(name, &o.key) {
                    files.push(o);
                }
            }
            match page.next {
                Some(token) => continuation = Some(token),
                None => break,
            }
        }
        let dir_names: HashSet<&str> = dirs.iter().map(String::as_str).collect();
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileKind::Directory,
                name: ".".into(),
                offset: 1,
            },
            DirEntry {
                ino: parent,
                kind: FileKind::Directory,
                name: "..".into(),
                offset: 2,
            },
        ];
        let mut table = self.table();
        let now = Instant::now();
        let push = |entries: &mut Vec<DirEntry>, ino: Ino, kind: FileKind, name: String| {
            let offset = entries.len() as u64 + 1;
            entries.push(DirEntry {
                ino,
                kind,
                name,
                offset,
            });
        };
        for name in &dirs {
            let child = table.upsert_child(ino, name, FileKind::Directory);
            if let Some(node) = table.get_mut(child) {
                node.validated = now;
            }
            push(&mut entries, child, FileKind::Directory, name.clone());
        }
        let mut listed: HashSet<String> = HashSet::new();
        for o in files {
            let name = o.key[prefix.len()..].to_string();
            if dir_names.contains(name.as_str()) {
                self.warn_once(
                    &o.key,
                    "is both an object and a prefix; the directory is shown",
                );
                continue;
            }
            let child = table.upsert_child(ino, &name, FileKind::File);
            if let Some(node) = table.get_mut(child) {
                node.remote = Some(Remote {
                    size: o.size,
                    etag: o.etag,
                    mtime: o.last_modified,
                });
                node.validated = now;
            }
            listed.insert(name.clone());
            push(&mut entries, child, FileKind::File, name);
        }
        for (name, child, kind) in table.local_only_children(ino) {
            if !listed.contains(&name) && !dir_names.contains(name.as_str()) {
                push(&mut entries, child, kind, name);
            }
        }
        drop(table);
        Ok(self.insert_handle(Handle::Dir {
            entries: Arc::new(entries),
        }))
    }

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

    /// Entries after `offset` (0 = from the start).
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let handles = self.handle_table();
        match handles.get(&fh) {
            Some(Handle::Dir { entries }) => {
                Ok(entries.iter().skip(offset as usize).cloned().collect())
            }
            _ => Err(FsError::errno(libc::EBADF)),
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handle_table().remove(&fh);
    }

    pub async fn mkdir(&self, parent: Ino, name: &str) -> FsResult<Entry> {
        self.writable()?;
        match self.resolve(parent, name).await {
            Ok(_) => return Err(FsError::errno(libc::EEXIST)),
            Err(e) if e.errno_value() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let path = Self::child_path(&Self::path_of(&self.table(), parent)?, name);
        let marker = self.key(&path, FileKind::Directory);
        self.store
            .put(
                &marker,
                crate::store::Body::Bytes(Bytes::new()),
                &PutOptions::default(),
            )
            .await?;
        let mut table = self.table();
        let ino = table.upsert_child(parent, name, FileKind::Directory);
        let entry = self.entry(&table, ino)?;
        if let Some(node) = table.get_mut(ino) {
            node.lookups += 1;
            node.validated = Instant::now();
        }
        Ok(entry)
    }

    pub async fn rmdir(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.writable()?;
        let ino = self.resolve(parent, name).await?;
        let (prefix, has_local_children) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            (
                self.key(&Self::path_of(&table, ino)?, FileKind::Directory),
                !table.local_only_children(ino).is_empty(),
            )
        };
        if has_local_children {
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
        let local = Arc::new(self.cache.create_file()?);
        local.mark_dirty(); // a new file is an object to create, even if empty
        let mut table = self.table();
        let parent_node = table.get(parent).ok_or_else(FsError::not_found)?;
        if parent_node.kind != FileKind::Directory {
            return Err(FsError::errno(libc::ENOTDIR));
        }
        let ino = table.upsert_child(parent, name, FileKind::File);
        let node = table.get_mut(ino).ok_or_else(FsError::not_found)?;
        if let Some(old) = node.local.replace(local.clone()) {
            old.mark_unlinked();
        }
        node.lookups += 1;
        node.open_handles += 1;
        node.mode = Some((mode & 0o7777) as u16).filter(|m| *m != self.config.file_mode);
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
        if mode.write {
            self.writable()?;
        }
        let (local, remote, key) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Err(FsError::errno(libc::EISDIR));
            }
            let key = self.key(&Self::path_of(&table, ino)?, FileKind::File);
            let remote = node
                .remote
                .clone()
                .filter(|_| self.is_fresh(node.validated));
            (node.local.clone(), remote, key)
        };
        let local = match local {
            Some(local) => Some(local),
            None if mode.write => Some(self.stage(ino, mode.truncate).await?),
            None => None,
        };
        let handle = match local {
            Some(file) => {
                if mode.truncate && file.size() > 0 {
                    file.set_len(0)?;
                }
                Handle::Local {
                    ino,
                    file,
                    append: mode.append,
                    write: mode.write,
                }
            }
            None => {
                // Pin the version we open: the ETag from a fresh HEAD unless just validated.
                let remote = match remote {
                    Some(r) => r,
                    None => {
                        let meta = self.store.head(&key).await?;
                        let r = Remote {
                            size: meta.size,
                            etag: meta.etag,
                            mtime: meta.last_modified,
                        };
                        if let Some(node) = self.table().get_mut(ino) {
                            node.remote = Some(r.clone());
                            node.validated = Instant::now();
                        }
                        r
                    }
                };
                let reader = Reader::new(key, remote.etag, remote.size);
                Handle::Remote {
                    ino,
                    reader: Arc::new(tokio::sync::Mutex::new(reader)),
                }
            }
        };
        if let Some(node) = self.table().get_mut(ino) {
            node.open_handles += 1;
        }
        Ok(self.insert_handle(handle))
    }

    /// Give `ino` local data: empty when `empty`, else a copy of its object (pinned to the ETag
    /// we know). If another task staged it meanwhile, that copy wins.
    async fn stage(&self, ino: Ino, empty: bool) -> FsResult<Arc<LocalFile>> {
        let (key, remote) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if let Some(local) = &node.local {
                return Ok(local.clone());
            }
            (
                self.key(&Self::path_of(&table, ino)?, FileKind::File),
                node.remote.clone(),
            )
        };
        let local = Arc::new(self.cache.create_file()?);
        if empty {
            local.mark_dirty();
        } else if let Some(remote) = &remote {
            let mut offset = 0;
            while offset < remote.size {
                let end = (offset + DOWNLOAD_CHUNK).min(remote.size);
                let data = self
                    .store
                    .get_range(&key, offset..end, Some(&remote.etag))
                    .await?;
                if data.len() as u64 != end - offset {
                    return Err(FsError::with_message(
                        libc::EIO,
                        format!("short read of {key}"),
                    ));
                }
                local.fill_at(offset, &data)?;
                offset = end;
            }
            local.set_mtime(remote.mtime);
        } else {
            // Known to the table but never uploaded and no local data: an empty new object.
            local.mark_dirty();
        }
        let mut table = self.table();
        let node = table.get_mut(ino).ok_or_else(FsError::not_found)?;
        Ok(node.local.get_or_insert(local).clone())
    }

    /// Drop `ino`'s local data if it is clean and nothing has it open.
    fn unstage_if_idle(&self, ino: Ino) {
        let mut table = self.table();
        if let Some(node) = table.get_mut(ino) {
            let idle = node.open_handles == 0 && node.local.as_ref().is_some_and(|l| !l.is_dirty());
            if idle {
                node.local = None;
            }
        }
        table.collect(ino);
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = {
            let handles = self.handle_table();
            match handles.get(&fh) {
                Some(Handle::Local { file, .. }) => Ok(file.clone()),
                Some(Handle::Remote { reader, .. }) => Err(reader.clone()),
                _ => return Err(FsError::errno(libc::EBADF)),
            }
        };
        match handle {
            Ok(file) => Ok(Bytes::from(file.read_at(offset, size)?)),
            Err(reader) => Ok(reader.lock().await.read(&self.store, offset, size).await?),
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
        if append {
            file.append(data)?;
        } else {
            file.write_at(offset, data)?;
        }
        Ok(data.len() as u32)
    }

    fn handle_ino(&self, fh: u64) -> FsResult<(Ino, Option<Arc<LocalFile>>)> {
        match self.handle_table().get(&fh) {
            Some(Handle::Local { ino, file, .. }) => Ok((*ino, Some(file.clone()))),
            Some(Handle::Remote { ino, .. }) => Ok((*ino, None)),
            _ => Err(FsError::errno(libc::EBADF)),
        }
    }

    /// `close` of one descriptor: upload the file if it changed.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        match self.handle_ino(fh)? {
            (ino, Some(file)) => self.upload(ino, &file).await,
            (_, None) => Ok(()),
        }
    }

    /// `fsync`: returns once the file's current contents are an object in S3.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle_table().remove(&fh);
        let Some(handle) = handle else {
            return Err(FsError::errno(libc::EBADF));
        };
        let ino = match handle {
            Handle::Local { ino, .. } | Handle::Remote { ino, .. } => ino,
            Handle::Dir { .. } => return Ok(()),
        };
        let last = {
            let mut table = self.table();
            match table.get_mut(ino) {
                Some(node) => {
                    node.open_handles = node.open_handles.saturating_sub(1);
                    node.open_handles == 0
                }
                None => false,
            }
        };
        if !last {
            return Ok(());
        }
        let local = self.table().get(ino).and_then(|n| n.local.clone());
        let mut result = Ok(());
        if let Some(local) = local
            && local.is_dirty()
        {
            // The flush at close failed: try once more before giving up the descriptor.
            result = self.upload(ino, &local).await;
            if let Err(e) = &result {
                tracing::error!(
                    path = %local.path().display(),
                    "upload failed at release; the data stays in the cache file: {e}"
                );
            }
        }
        self.unstage_if_idle(ino);
        result
    }

    /// Upload `file` as the object of `ino` if it has changes; marks it clean on success.
    async fn upload(&self, ino: Ino, file: &Arc<LocalFile>) -> FsResult<()> {
        let _serial = file.upload_lock.lock().await;
        if !file.is_dirty() {
            return Ok(());
        }
        let key = {
            let table = self.table();
            self.key(&Self::path_of(&table, ino)?, FileKind::File)
        };
        let snapshot = file.snapshot();
        let etag = self
            .uploader
            .upload_file(&key, file.path(), snapshot.size, &PutOptions::default())
            .await?;
        if file.mark_clean(snapshot) {
            tracing::debug!(key, size = snapshot.size, etag, "uploaded");
        }
        let mut table = self.table();
        if let Some(node) = table.get_mut(ino) {
            node.remote = Some(Remote {
                size: snapshot.size,
                etag,
                mtime: file.mtime(),
            });
            node.validated = Instant::now();
        }
        Ok(())
    }

    /// Upload every file with unsaved changes (`syncfs`, unmount, SIGTERM).
    pub async fn sync_all(&self) -> FsResult<()> {
        let files = self.table().local_files();
        let mut first_error = Ok(());
        for (ino, file) in files {
            if file.is_dirty()
                && let Err(e) = self.upload(ino, &file).await
            {
                tracing::error!(path = %file.path().display(), "upload failed: {e}");
                if first_error.is_ok() {
                    first_error = Err(e);
                }
            }
        }
        first_error
    }

    pub async fn unlink(&self, parent: Ino, name: &str) -> FsResult<()> {
        self.writable()?;
        let ino = self.resolve(parent, name).await?;
        let (key, local) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind == FileKind::Directory {
                return Err(FsError::errno(libc::EISDIR));
            }
            (
                self.key(&Self::path_of(&table, ino)?, FileKind::File),
                node.local.clone(),
            )
        };
        if let Some(local) = local {
            // Open handles keep their data; no close will re-create the object.
            local.mark_unlinked();
        }
        self.store.delete(&key).await?;
        let mut table = self.table();
        if table.child(parent, name) == Some(ino) {
            table.detach(parent, name);
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
        let (kind, old_key, new_key, local, has_remote) = {
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
                node.local.clone(),
                node.remote.is_some(),
            )
        };
        if kind == FileKind::Directory {
            // Moving a prefix means copying every object under it: not done yet. EXDEV makes
            // mv(1) fall back to copying the tree and removing the original.
            return Err(FsError::errno(libc::EXDEV));
        }
        let dirty = local.as_ref().is_some_and(|l| l.is_dirty());
        // Copy first: if it fails, nothing has changed. The copy is a new object with an ETag
        // of its own (a copied multipart object gets a single-part ETag).
        let copied_etag = if !dirty && has_remote {
            Some(self.store.copy(&old_key, &new_key, None).await?)
        } else {
            None
        };
        {
            let mut table = self.table();
            if let Some(t) = target
                .and_then(|t| table.get(t))
                .and_then(|t| t.local.clone())
            {
                t.mark_unlinked();
            }
            table.rename(ino, new_parent, new_name);
            if let (Some(etag), Some(node)) = (copied_etag, table.get_mut(ino)) {
                if let Some(remote) = &mut node.remote {
                    remote.etag = etag;
                }
                node.validated = Instant::now();
            }
        }
        if dirty {
            // The local copy is the newest version: it goes to the new key now (or at close).
            let open = self.table().get(ino).is_some_and(|n| n.open_handles > 0);
            if let (Some(local), false) = (&local, open) {
                self.upload(ino, local).await?;
                self.unstage_if_idle(ino);
            }
        }
        if has_remote {
            self.store.delete(&old_key).await?;
        }
        Ok(())
    }
}
