//! Directory listings, streamed from ListObjectsV2 pages (DESIGN.md §6).
//!
//! `opendir` opens a [`DirStream`] and asks S3 nothing; each `readdir` hands out the chunk of
//! entries its offset falls in, fetching the next LIST page once the kernel has taken the
//! current one. Entries carry offsets `1, 2, …` in listing order: `.`, `..`, the listing, then
//! the local files S3 does not list yet (appended to the last page's chunk). A `readdir` at an
//! offset before the current chunk (`rewinddir`) lists again from the start.
//!
//! While a chunk's HEADs run, the next page is already being listed. Memory per open
//! directory is two pages (at most 1,000 entries each) plus the directory's local files,
//! whatever its size. In a directory larger than `LISTING_MAX`, the inodes of chunks
//! already handed out are dropped again unless the kernel holds them (READDIRPLUS entries are
//! lookups the kernel forgets later), so a listing of 100,000 objects does not grow the inode
//! table by 100,000.
//!
//! Names: a common prefix is a directory; an object is a file unless a prefix of the same name
//! shadows it (the directory is shown, the object logged once). S3 lists in byte order, where
//! `a` < `a-b` < `a/`, so an object is only settled once the listing has passed `name/`. The
//! objects waiting are each a prefix of the next one (a chain no longer than a key), never a
//! page's worth.
//!
//! Stored attributes (`x-amz-meta-*`, which a listing lacks) are read with a HEAD per entry of a
//! chunk before it is handed out, so that `ls -l` finds them in the table; with
//! `--listing-attributes` the defaults are taken instead.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{
    Entry, FileKind, Filesystem, Handle, Ino, LISTING_MAX, META_FETCH_CONCURRENCY, local_decides,
};
use crate::cache::LocalFile;
use crate::error::{FsError, FsResult};
use crate::meta::PosixMeta;
use crate::store::{ListPage, ListRequest, ObjectMeta};

use super::types::DirEntry;

/// One open directory's place in its listing.
pub(super) struct DirStream {
    dir: Ino,
    parent: Ino,
    /// The directory's key prefix (ends in `/`, or empty for the root of a bucket).
    prefix: String,
    /// The entries handed out now: offsets `base + 1 ..= base + chunk.len()`.
    chunk: Vec<DirEntry>,
    base: u64,
    next: NextPage,
    /// The page at `next`, fetched while the current chunk's HEADs ran.
    prefetched: Option<ListPage>,
    /// Listed objects a prefix later in the listing could still shadow, ascending; each is a
    /// prefix of the next.
    waiting: Vec<ObjectMeta>,
    /// The directory's local files (in the cache) the listing has not shown yet.
    local: BTreeMap<String, Arc<LocalFile>>,
    /// Names cached only as clean copies when the stream began: if the listing lacks one,
    /// another client deleted it.
    clean_copies: HashSet<String>,
    /// Every name listed so far while there are at most `LISTING_MAX` (kept for negative
    /// lookups once the listing is complete); `None` beyond.
    names: Option<HashSet<String>>,
    started: Instant,
}

/// What the next chunk of a stream comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NextPage {
    /// `.`, `..` and the first page.
    First,
    /// The page at this continuation token.
    At(String),
    /// Nothing: the listing is complete.
    Done,
}

/// A name a LIST page settled.
#[derive(Debug, PartialEq, Eq)]
enum Listed {
    Dir(String),
    File(ObjectMeta),
}

impl DirStream {
    fn new(dir: Ino, parent: Ino, prefix: String, local: Vec<(String, Arc<LocalFile>)>) -> Self {
        let clean_copies = local
            .iter()
            .filter(|(_, l)| !local_decides(l))
            .map(|(name, _)| name.clone())
            .collect();
        DirStream {
            dir,
            parent,
            prefix,
            chunk: Vec::new(),
            base: 0,
            next: NextPage::First,
            prefetched: None,
            waiting: Vec::new(),
            local: local.into_iter().collect(),
            clean_copies,
            names: Some(HashSet::new()),
            started: Instant::now(),
        }
    }

    /// The names one LIST page settles, in listing order; `last`: no page follows, so every
    /// waiting object is settled too. `usable(name, key)` says whether a name can be shown;
    /// `shadowed(key)` is told of an object a prefix hides.
    fn take_page(
        &mut self,
        page: ListPage,
        last: bool,
        usable: impl Fn(&str, &str) -> bool,
        shadowed: impl Fn(&str),
    ) -> Vec<Listed> {
        let mut out = Vec::new();
        let mut prefixes = page.prefixes.into_iter().peekable();
        let mut objects = page.objects.into_iter().peekable();
        loop {
            let prefix_first = match (prefixes.peek(), objects.peek()) {
                (Some(p), Some(o)) => p.as_str() < o.key.as_str(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if prefix_first {
                let Some(p) = prefixes.next() else { break };
                self.settle_before(&p, &mut out);
                // The object `name` of the prefix `name/`, if it waits: the directory wins.
                if let Some(o) = self
                    .waiting
                    .pop_if(|o| p.len() == o.key.len() + 1 && p.starts_with(o.key.as_str()))
                {
                    shadowed(&o.key);
                }
                let name = &p[self.prefix.len()..p.len() - 1];
                if usable(name, &p) {
                    out.push(Listed::Dir(name.to_string()));
                }
            } else {
                let Some(o) = objects.next() else { break };
                if o.key.len() == self.prefix.len() {
                    continue; // the directory's own marker
                }
                self.settle_before(&o.key, &mut out);
                if usable(&o.key[self.prefix.len()..], &o.key) {
                    self.waiting.push(o);
                }
            }
        }
        if last {
            out.extend(self.waiting.drain(..).rev().map(Listed::File));
        }
        out
    }

    /// Settle the waiting objects no prefix at or after `key` can shadow (`name/` < `key`).
    fn settle_before(&mut self, key: &str, out: &mut Vec<Listed>) {
        while let Some(o) = self.waiting.last() {
            // Whether `name/` < `key`, without building `name/`.
            let bound_before_key = match key.strip_prefix(o.key.as_str()) {
                Some(rest) => rest > "/",
                None => o.key.as_str() < key,
            };
            if !bound_before_key {
                break;
            }
            if let Some(o) = self.waiting.pop() {
                out.push(Listed::File(o));
            }
        }
    }

    fn note_name(&mut self, name: &str) {
        if let Some(names) = &mut self.names {
            names.insert(name.to_string());
            if names.len() > LISTING_MAX {
                self.names = None;
            }
        }
    }
}

impl Filesystem {
    pub async fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let stream = self.dir_stream_from_start(ino)?;
        Ok(self.insert_handle(Handle::Dir {
            stream: Arc::new(tokio::sync::Mutex::new(stream)),
        }))
    }

    fn dir_stream_from_start(&self, ino: Ino) -> FsResult<DirStream> {
        let (path, parent) = {
            let table = self.table();
            let node = table.get(ino).ok_or_else(FsError::not_found)?;
            if node.kind != FileKind::Directory {
                return Err(FsError::errno(libc::ENOTDIR));
            }
            (Self::path_of(&table, ino)?, node.parent)
        };
        let prefix = self.key(&path, FileKind::Directory);
        let local = self.cache.children(&prefix);
        Ok(DirStream::new(ino, parent, prefix, local))
    }

    /// The entries of directory handle `fh` after `offset` (0: from the start) that one chunk
    /// holds; empty at the end of the listing.
    pub async fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let stream = match self.handle_table().get(&fh) {
            Some(Handle::Dir { stream }) => stream.clone(),
            _ => return Err(FsError::errno(libc::EBADF)),
        };
        let mut s = stream.lock().await;
        if offset < s.base {
            *s = self.dir_stream_from_start(s.dir)?;
        }
        while offset >= s.base + s.chunk.len() as u64 && s.next != NextPage::Done {
            self.next_chunk(&mut s).await?;
        }
        let from = (offset - s.base) as usize;
        Ok(s.chunk.get(from..).map(<[_]>::to_vec).unwrap_or_default())
    }

    /// Every entry of directory handle `fh` from the start (for tests: the kernel pages).
    #[cfg(test)]
    pub async fn readdir_to_end(&self, fh: u64) -> FsResult<Vec<DirEntry>> {
        let mut all: Vec<DirEntry> = Vec::new();
        loop {
            let offset = all.last().map_or(0, |e| e.offset);
            let chunk = self.readdir(fh, offset).await?;
            if chunk.is_empty() {
                return Ok(all);
            }
            all.extend(chunk);
        }
    }

    /// Replace `s`'s chunk by the next one: the next LIST page's names, in the inode table.
    async fn next_chunk(&self, s: &mut DirStream) -> FsResult<()> {
        let continuation = match &s.next {
            NextPage::First => None,
            NextPage::At(token) => Some(token.clone()),
            NextPage::Done => return Ok(()),
        };
        let page = match s.prefetched.take() {
            Some(page) => page,
            None => self.list_page(&s.prefix, continuation.clone()).await?,
        };
        let next = match page.next.clone() {
            Some(token) => NextPage::At(token),
            None => NextPage::Done,
        };
        let listed = s.take_page(
            page,
            next == NextPage::Done,
            |name, key| self.usable_name(name, key),
            |key| {
                self.warn_once(
                    key,
                    "is both an object and a prefix; the directory is shown",
                )
            },
        );
        let old = std::mem::take(&mut s.chunk);
        s.base += old.len() as u64;
        let mut chunk = Vec::new();
        {
            let mut table = self.table();
            if s.base > LISTING_MAX as u64 {
                // A large directory: what the kernel does not hold is not kept either.
                for e in &old {
                    table.collect(e.ino);
                }
            }
            let push = |chunk: &mut Vec<DirEntry>, ino: Ino, kind: FileKind, name: String| {
                let offset = s.base + chunk.len() as u64 + 1;
                chunk.push(DirEntry {
                    ino,
                    kind,
                    name,
                    offset,
                });
            };
            if continuation.is_none() {
                push(&mut chunk, s.dir, FileKind::Directory, ".".into());
                push(&mut chunk, s.parent, FileKind::Directory, "..".into());
            }
            let now = Some(Instant::now());
            for item in listed {
                let (ino, kind, name) = match item {
                    Listed::Dir(name) => {
                        let ino = table.upsert_child(s.dir, &name, FileKind::Directory);
                        if let Some(node) = table.get_mut(ino) {
                            node.validated = now;
                        }
                        (ino, FileKind::Directory, name)
                    }
                    Listed::File(o) => {
                        let name = o.key[s.prefix.len()..].to_string();
                        let ino = table.upsert_child(s.dir, &name, FileKind::File);
                        if let Some(node) = table.get_mut(ino) {
                            node.set_listed(&o, Instant::now());
                        }
                        (ino, FileKind::File, name)
                    }
                };
                s.local.remove(&name);
                push(&mut chunk, ino, kind, name);
            }
            if next == NextPage::Done {
                // Files written here and not yet in S3 (or not yet in its listing); a clean
                // copy the listing lacks was deleted by another client.
                for (name, file) in std::mem::take(&mut s.local) {
                    if local_decides(&file) || !s.clean_copies.contains(&name) {
                        let ino = table.upsert_child(s.dir, &name, FileKind::File);
                        push(&mut chunk, ino, FileKind::File, name);
                    }
                }
            }
        }
        for e in chunk.iter().filter(|e| e.name != "." && e.name != "..") {
            s.note_name(&e.name);
        }
        // The chunk's HEADs, and meanwhile the next page (if that fails, the next chunk asks
        // again and reports it).
        let prefetch = async {
            match &next {
                NextPage::At(token) => self.list_page(&s.prefix, Some(token.clone())).await.ok(),
                _ => None,
            }
        };
        let ((), prefetched) = tokio::join!(self.fetch_meta(&s.prefix, &chunk), prefetch);
        s.prefetched = prefetched;
        {
            // Symbolic links are known once their stored mode is.
            let table = self.table();
            for e in chunk.iter_mut().filter(|e| e.name != "." && e.name != "..") {
                if let Ok(attr) = self.attr_of(&table, e.ino) {
                    e.kind = attr.kind;
                }
            }
        }
        if next == NextPage::Done
            && let Some(names) = s.names.take()
            && let Some(node) = self.table().get_mut(s.dir)
        {
            node.listing = Some((s.started, names));
        }
        s.chunk = chunk;
        s.next = next;
        Ok(())
    }

    /// One page of the listing of the directory at `prefix`.
    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> FsResult<ListPage> {
        let request = ListRequest {
            prefix,
            delimiter: Some("/"),
            continuation,
            max_keys: None,
        };
        Ok(self.store.list(request).await?)
    }

    /// Read the stored attributes of the entries of a chunk (of the directory at `prefix`)
    /// that a listing left unknown, in parallel, so that `ls -l` right after `readdir` answers
    /// every `stat` from the table. With `listing_attributes`, take them for the defaults
    /// instead (no request).
    async fn fetch_meta(&self, prefix: &str, entries: &[DirEntry]) {
        let todo: Vec<(Ino, String)> = {
            let mut table = self.table();
            let mut todo = Vec::new();
            for e in entries.iter().filter(|e| e.name != "." && e.name != "..") {
                let Some(node) = table.get_mut(e.ino).filter(|n| n.meta.is_none()) else {
                    continue;
                };
                if self.config.listing_attributes {
                    node.meta = Some(PosixMeta::default());
                    continue;
                }
                let key = format!("{prefix}{}", node.name);
                todo.push(match node.kind {
                    FileKind::Directory => (e.ino, format!("{key}/")),
                    _ => (e.ino, key),
                });
            }
            todo
        };
        let found: Vec<(Ino, FsResult<ObjectMeta>)> =
            futures::stream::iter(todo)
                .map(|(ino, key)| async move {
                    (ino, self.store.head(&key).await.map_err(FsError::from))
                })
                .buffer_unordered(META_FETCH_CONCURRENCY)
                .collect()
                .await;
        let mut table = self.table();
        for (ino, head) in found {
            let Some(node) = table.get_mut(ino) else {
                continue;
            };
            match (node.kind, head) {
                (FileKind::Directory, Ok(head)) => {
                    node.meta = Some(PosixMeta::from_metadata(&head.metadata));
                }
                (FileKind::Directory, Err(e)) if e.errno_value() == libc::ENOENT => {
                    node.meta = Some(PosixMeta::default());
                }
                // Only if the object is still the version listed (else the next stat asks).
                (_, Ok(head)) if node.remote.as_ref().is_some_and(|r| r.etag == head.etag) => {
                    node.set_head(&head);
                }
                (_, Ok(_)) => {}
                (_, Err(e)) => tracing::debug!(ino, "metadata of a listed entry: {e}"),
            }
        }
    }

    /// `readdir` with attributes (FUSE READDIRPLUS), so that the kernel needs no LOOKUP per
    /// entry: `entries` (from [`Self::readdir`] of directory `dir`) go to `add` one by one,
    /// which hands an entry to the kernel and says whether the reply is full (that entry not
    /// taken). Each entry taken, `.` and `..` aside, is a lookup the kernel will FORGET,
    /// counted here. An entry unlinked since it was listed is left out; one renamed since, or
    /// whose attributes are not confirmed within the TTL, goes with a zero TTL, so the kernel
    /// asks again before trusting it.
    pub fn readdir_plus(
        &self,
        dir: Ino,
        entries: &[DirEntry],
        mut add: impl FnMut(&DirEntry, &Entry) -> bool,
    ) {
        let mut table = self.table();
        for e in entries {
            let dot = e.name == "." || e.name == "..";
            let Some(node) = table.get(e.ino) else {
                continue;
            };
            let current = dot || (node.parent == dir && node.name == e.name);
            let Ok(attr) = self.attr_of(&table, e.ino) else {
                continue;
            };
            let ttl = if current && self.answers_locally(node) {
                self.config.metadata_ttl
            } else {
                Duration::ZERO
            };
            if add(e, &Entry { attr, ttl }) {
                break;
            }
            if !dot && let Some(node) = table.get_mut(e.ino) {
                node.lookups += 1;
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handle_table().remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn object(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: 1,
            etag: "e".into(),
            last_modified: SystemTime::UNIX_EPOCH,
            metadata: Default::default(),
        }
    }

    fn page(objects: &[&str], prefixes: &[&str]) -> ListPage {
        ListPage {
            objects: objects.iter().map(|k| object(k)).collect(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            next: None,
        }
    }

    fn names(listed: &[Listed]) -> Vec<String> {
        listed
            .iter()
            .map(|l| match l {
                Listed::Dir(name) => format!("{name}/"),
                Listed::File(o) => o.key.clone(),
            })
            .collect()
    }

    /// Objects shadowed by a prefix of the same name are dropped (and reported) even when the
    /// prefix comes pages later; others settle as soon as the listing passes `name/`.
    #[test]
    fn a_prefix_shadows_its_object_across_pages() {
        let mut s = DirStream::new(1, 1, String::new(), Vec::new());
        let shadowed = std::cell::RefCell::new(Vec::new());
        let usable = |_: &str, _: &str| true;
        let report = |key: &str| shadowed.borrow_mut().push(key.to_string());
        // Byte order: a < a-b < a-b-c < a-b/ < a.txt < a/ < a0 < b.
        let first = s.take_page(page(&["a", "a-b", "a-b-c"], &[]), false, usable, report);
        assert!(first.is_empty(), "each may still be shadowed: {first:?}");
        let second = page(&["a.txt", "a0", "b"], &["a-b/", "a/"]);
        let second = s.take_page(second, true, usable, report);
        assert_eq!(names(&second), ["a-b-c", "a-b/", "a.txt", "a/", "a0", "b"]);
        assert_eq!(*shadowed.borrow(), ["a-b", "a"]);
        assert!(s.waiting.is_empty());
    }

    /// What waits for a possible shadow is a chain of prefixes, never a page.
    #[test]
    fn waiting_objects_stay_few_in_a_long_listing() {
        let mut s = DirStream::new(1, 1, "d/".into(), Vec::new());
        let keys: Vec<String> = (0..5000).map(|i| format!("d/f{i:05}")).collect();
        let mut settled = 0;
        for chunk in keys.chunks(1000) {
            let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let out = s.take_page(page(&keys, &[]), false, |_, _| true, |_| {});
            settled += out.len();
            assert!(s.waiting.len() <= 1, "{} waiting", s.waiting.len());
        }
        let out = s.take_page(page(&[], &[]), true, |_, _| true, |_| {});
        assert_eq!(settled + out.len(), 5000);
    }
}
