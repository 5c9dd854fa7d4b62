//! The inode table: the names the kernel knows, mapped to keys.
//!
//! An inode is a (parent, name) edge plus what we last learned about its object. Keys are never
//! stored: they are derived by walking parents, so renaming a directory would re-key its whole
//! subtree for free. The table is behind one `std::sync::Mutex` in `Filesystem` and is never
//! held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::time::{Instant, SystemTime};

use super::types::{FileKind, Ino, ROOT_INO};
use crate::meta::PosixMeta;
use crate::store::ObjectMeta;

/// What S3 last told us about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub size: u64,
    pub etag: String,
    /// LastModified: the upload time.
    pub mtime: SystemTime,
}

impl From<&ObjectMeta> for Remote {
    fn from(o: &ObjectMeta) -> Remote {
        Remote {
            size: o.size,
            etag: o.etag.clone(),
            mtime: o.last_modified,
        }
    }
}

#[derive(Debug)]
pub struct Inode {
    pub parent: Ino,
    pub name: String,
    pub kind: FileKind,
    /// The object in S3 (`None`: not uploaded yet, or a directory without a marker).
    pub remote: Option<Remote>,
    /// When `remote` (or the directory's existence) was last confirmed with S3; `None` forces
    /// the next stat to ask S3 (set while the file has local data, whose size and mtime win).
    pub validated: Option<Instant>,
    /// Kernel lookup count (`lookup` adds one, `forget` subtracts).
    pub lookups: u64,
    /// Open handles.
    pub open_handles: u32,
    /// The POSIX attributes stored in the object's metadata (a directory's: its marker's), for
    /// the version in `remote`; `None` until a HEAD reads them (listings do not carry them).
    pub meta: Option<PosixMeta>,
    /// A directory's complete list of names as S3 showed it (plus local changes since), and
    /// when: within the TTL a name not in it is missing without asking S3. Kept only for
    /// directories small enough to list in one page.
    pub listing: Option<(Instant, HashSet<String>)>,
    /// The data version the kernel's page cache may hold for this file: what its last open
    /// served (see `Filesystem::open_keeping_cache`).
    pub kernel_data: Option<DataVersion>,
    /// A directory's children by name (empty for files).
    children: HashMap<String, Ino>,
}

/// Which data an open file serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataVersion {
    /// A local data file, by its cache id.
    Local(u64),
    /// An object version, by its ETag.
    Object(String),
}

impl Inode {
    /// Take what a HEAD of the object found: its version and its stored attributes.
    pub fn set_head(&mut self, head: &ObjectMeta) {
        self.remote = Some(Remote::from(head));
        self.meta = Some(PosixMeta::from_metadata(&head.metadata));
        self.validated = Some(Instant::now());
    }

    /// Take a listing's entry for the object: a new version's stored attributes are unknown
    /// until the next HEAD (listings do not carry metadata).
    pub fn set_listed(&mut self, listed: &ObjectMeta, at: Instant) {
        if self.remote.as_ref().is_none_or(|r| r.etag != listed.etag) {
            self.meta = None;
        }
        self.remote = Some(Remote::from(listed));
        self.validated = Some(at);
    }

    fn new(parent: Ino, name: String, kind: FileKind) -> Inode {
        Inode {
            parent,
            name,
            kind,
            remote: None,
            validated: Some(Instant::now()),
            lookups: 0,
            open_handles: 0,
            meta: None,
            listing: None,
            kernel_data: None,
            children: HashMap::new(),
        }
    }

    /// An inode that must stay even when the kernel forgets it.
    fn pinned(&self) -> bool {
        self.lookups > 0 || self.open_handles > 0
    }
}

#[derive(Debug)]
pub struct InodeTable {
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
}

impl InodeTable {
    pub fn new() -> InodeTable {
        let mut inodes = HashMap::new();
        let mut root = Inode::new(ROOT_INO, String::new(), FileKind::Directory);
        root.lookups = 1; // the root is never forgotten
        inodes.insert(ROOT_INO, root);
        InodeTable {
            inodes,
            next_ino: ROOT_INO + 1,
        }
    }

    /// Inodes held (the root included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn get(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: Ino) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    pub fn child(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.inodes.get(&parent)?.children.get(name).copied()
    }

    /// The path of `ino` relative to the mount root (`a/b/c`; empty for the root).
    pub fn path(&self, ino: Ino) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let node = self.inodes.get(&cur)?;
            parts.push(node.name.as_str());
            cur = node.parent;
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// The child `name` of `parent` with this kind: the existing inode when the kind matches,
    /// else a new inode replacing the old edge.
    pub fn upsert_child(&mut self, parent: Ino, name: &str, kind: FileKind) -> Ino {
        if let Some(ino) = self.child(parent, name) {
            if self.inodes.get(&ino).is_some_and(|n| n.kind == kind) {
                return ino;
            }
            self.detach(parent, name);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes
            .insert(ino, Inode::new(parent, name.to_string(), kind));
        self.link(parent, name, ino);
        ino
    }

    /// Remove the edge `parent/name`. The inode itself stays while the kernel or a handle still
    /// refers to it (an unlinked open file), and is dropped otherwise.
    /// Keep `parent`'s listing in step with a local change: `name` now exists or not.
    pub fn note_listing(&mut self, parent: Ino, name: &str, exists: bool) {
        if let Some((_, names)) = self
            .inodes
            .get_mut(&parent)
            .and_then(|p| p.listing.as_mut())
        {
            if exists {
                names.insert(name.to_string());
            } else {
                names.remove(name);
            }
        }
    }

    pub fn detach(&mut self, parent: Ino, name: &str) -> Option<Ino> {
        self.note_listing(parent, name, false);
        let ino = self.inodes.get_mut(&parent)?.children.remove(name)?;
        self.collect(ino);
        Some(ino)
    }

    fn link(&mut self, parent: Ino, name: &str, ino: Ino) {
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.children.insert(name.to_string(), ino);
        }
    }

    /// Move `ino` to `new_parent/new_name`, replacing whatever edge was there.
    pub fn rename(&mut self, ino: Ino, new_parent: Ino, new_name: &str) {
        let Some(node) = self.inodes.get(&ino) else {
            return;
        };
        let (old_parent, old_name) = (node.parent, node.name.clone());
        if let Some(p) = self.inodes.get_mut(&old_parent) {
            p.children.remove(&old_name);
        }
        self.note_listing(old_parent, &old_name, false);
        if self.child(new_parent, new_name) != Some(ino) {
            self.detach(new_parent, new_name);
        }
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.parent = new_parent;
            node.name = new_name.to_string();
        }
        self.link(new_parent, new_name, ino);
        // After the detach above: the new name exists (a remembered listing must say so).
        self.note_listing(new_parent, new_name, true);
    }

    /// Make every inode under `dir` ask S3 again at its next stat (its objects were moved).
    pub fn invalidate_subtree(&mut self, dir: Ino) {
        let mut todo = vec![dir];
        while let Some(ino) = todo.pop() {
            if let Some(node) = self.inodes.get_mut(&ino) {
                node.validated = None;
                node.listing = None;
                todo.extend(node.children.values().copied());
            }
        }
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        let Some(node) = self.inodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        self.collect(ino);
    }

    /// Drop `ino` (and its unreferenced descendants) if nothing pins it. A directory with a
    /// pinned descendant stays, so every pinned inode keeps a path.
    pub fn collect(&mut self, ino: Ino) {
        if ino == ROOT_INO || !self.collectable(ino) {
            return;
        }
        let Some(node) = self.inodes.remove(&ino) else {
            return;
        };
        for child in node.children.into_values() {
            self.collect_detached(child);
        }
        if let Some(p) = self.inodes.get_mut(&node.parent)
            && p.children.get(&node.name) == Some(&ino)
        {
            p.children.remove(&node.name);
        }
    }

    fn collectable(&self, ino: Ino) -> bool {
        self.inodes
            .get(&ino)
            .is_some_and(|n| !n.pinned() && n.children.values().all(|c| self.collectable(*c)))
    }

    fn collect_detached(&mut self, ino: Ino) {
        if let Some(node) = self.inodes.remove(&ino) {
            for child in node.children.into_values() {
                self.collect_detached(child);
            }
        }
    }
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_parents_and_renames() {
        let mut t = InodeTable::new();
        let a = t.upsert_child(ROOT_INO, "a", FileKind::Directory);
        let b = t.upsert_child(a, "b", FileKind::File);
        assert_eq!(t.path(b).unwrap(), "a/b");
        assert_eq!(
            t.upsert_child(a, "b", FileKind::File),
            b,
            "same kind reuses the inode"
        );
        let c = t.upsert_child(ROOT_INO, "c", FileKind::Directory);
        t.get_mut(b).unwrap().lookups = 1;
        t.rename(b, c, "d");
        assert_eq!(t.path(b).unwrap(), "c/d");
        assert_eq!(t.child(a, "b"), None);
        assert_eq!(t.child(c, "d"), Some(b));
    }

    #[test]
    fn a_renamed_entry_is_in_its_new_parents_listing() {
        let mut t = InodeTable::new();
        let d = t.upsert_child(ROOT_INO, "d", FileKind::Directory);
        let old = t.upsert_child(ROOT_INO, "e", FileKind::Directory);
        t.get_mut(ROOT_INO).unwrap().listing =
            Some((Instant::now(), ["d".to_string(), "e".to_string()].into()));
        t.rename(d, ROOT_INO, "e");
        let names = &t.get(ROOT_INO).unwrap().listing.as_ref().unwrap().1;
        assert!(names.contains("e") && !names.contains("d"), "{names:?}");
        assert_eq!(t.child(ROOT_INO, "e"), Some(d));
        assert!(t.get(old).is_none(), "the replaced inode is gone");
    }

    #[test]
    fn kind_change_makes_a_new_inode() {
        let mut t = InodeTable::new();
        let f = t.upsert_child(ROOT_INO, "x", FileKind::File);
        let d = t.upsert_child(ROOT_INO, "x", FileKind::Directory);
        assert_ne!(f, d);
        assert_eq!(t.child(ROOT_INO, "x"), Some(d));
    }

    #[test]
    fn forget_drops_unreferenced_inodes() {
        let mut t = InodeTable::new();
        let f = t.upsert_child(ROOT_INO, "x", FileKind::File);
        t.get_mut(f).unwrap().lookups = 2;
        t.forget(f, 1);
        assert!(t.get(f).is_some());
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        assert_eq!(t.child(ROOT_INO, "x"), None);
    }

    #[test]
    fn detached_open_file_survives_until_released() {
        let mut t = InodeTable::new();
        let f = t.upsert_child(ROOT_INO, "x", FileKind::File);
        t.get_mut(f).unwrap().open_handles = 1;
        t.detach(ROOT_INO, "x");
        assert!(t.get(f).is_some());
        t.get_mut(f).unwrap().open_handles = 0;
        t.collect(f);
        assert!(t.get(f).is_none());
    }
}
