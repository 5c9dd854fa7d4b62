//! Reference-model property test of the filesystem core (DESIGN.md §8, layer 4).
//!
//! A case is a random sequence of operations on a tiny name space (`d0`, `d1`, `f0`…`f3`, at
//! most two levels deep, so operations collide), applied both to a [`Filesystem`] over a
//! [`MemoryStore`] and to a [`Model`]: plain maps from paths to file identities, from
//! identities to bytes and mode, and of directories to their mode. Open handles point at
//! identities, so a file unlinked or replaced while open keeps its data for them.
//!
//! The harness plays the kernel: it walks every path with `lookup`, answers itself what the
//! VFS answers without asking the filesystem (a write-open of a directory, a rename into its
//! own subtree, `unlink` of a directory…), forwards the rest, and compares every result and
//! errno with the model. In half the cases it forgets every lookup as soon as it can, as a
//! kernel short of memory would. Every few steps the whole mount is compared (every name of
//! the name space looked up, stat sizes and modes, contents of every file, readdir of every
//! directory); after an `fsync` the bucket must hold exactly the file, and after a sync of
//! everything the bucket must equal the model key for key and byte for byte, `dir/` markers
//! of the directories included.
//!
//! Other S3 clients put and delete objects directly in the store, only on names with no
//! local state (no open handle, nothing written since the last fsync or sync): racing local
//! changes is the conflict handling's business, not modelled here. A crash drops the
//! filesystem and its runtime (with any upload in flight) without draining and starts a new
//! one on the same cache directory and store: a file closed before the crash must come back
//! exactly as closed; a file with a writer open at the crash is indeterminate, whatever the
//! mount shows for it becomes the model's truth, and the outcomes are counted and printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use super::*;
use crate::store::{Body, MIN_PART_SIZE, MemoryStore};

const PREFIX: &str = "p/";
const PARENTS: [&str; 3] = ["", "d0", "d1"];
const LEAVES: [&str; 6] = ["d0", "d1", "f0", "f1", "f2", "f3"];
const FILE_MODE: u16 = 0o644;
const DIR_MODE: u16 = 0o755;
/// Short, so that closed files are uploaded in the background during a case.
const WRITEBACK_DELAY: Duration = Duration::from_millis(5);
/// An operation taking longer than this fails the case as hung.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole mount is compared with the model after every this many steps.
const FULL_CHECK_EVERY: usize = 3;
/// Cases run by default (`PROPTEST_CASES` overrides).
const DEFAULT_CASES: u32 = 2_000;

type Check<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

// ---- operations ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    ReadWrite,
    Append,
}

#[derive(Debug, Clone, Copy)]
struct OpenHow {
    /// `O_CREAT` (a created file is always opened read-write).
    create: bool,
    access: Access,
    /// `O_TRUNC`, honoured only when writing.
    truncate: bool,
    /// The mode of a created file.
    mode: u16,
}

/// One step. A `handle` is an index into the open handles (modulo their number): with none
/// open, the step does nothing.
#[derive(Debug, Clone)]
enum Op {
    Open {
        path: String,
        how: OpenHow,
    },
    Write {
        handle: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Read {
        handle: usize,
        offset: u64,
        len: u32,
    },
    Truncate {
        path: String,
        size: u64,
    },
    Ftruncate {
        handle: usize,
        size: u64,
    },
    Fstat {
        handle: usize,
    },
    Rename {
        from: String,
        to: String,
        noreplace: bool,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u16,
    },
    Rmdir {
        path: String,
    },
    Chmod {
        path: String,
        mode: u16,
    },
    Fsync {
        handle: usize,
    },
    Close {
        handle: usize,
    },
    /// Another S3 client writes the object (no metadata, as most tools do).
    ExternalPut {
        path: String,
        len: usize,
        seed: u8,
    },
    /// Another S3 client deletes the object.
    ExternalDelete {
        path: String,
    },
    /// Let background uploads run.
    Wait,
    /// Upload every dirty file and wait (`syncfs`, unmount): the bucket then equals the model.
    SyncAll,
    /// The daemon dies and starts again on the same cache directory and bucket.
    Crash,
}

#[derive(Debug, Clone)]
struct Case {
    /// Return every lookup to the filesystem right after the step that made it (else never).
    forget_lookups: bool,
    ops: Vec<Op>,
}

fn join(parent: &str, leaf: &str) -> String {
    if parent.is_empty() {
        leaf.to_string()
    } else {
        format!("{parent}/{leaf}")
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn leaf_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, leaf)| leaf)
}

/// A path of the name space whose leaf is drawn from `leaves`.
fn path_from(leaves: &'static [&'static str]) -> impl Strategy<Value = String> {
    let parent = prop_oneof![2 => Just(PARENTS[0]), 1 => Just(PARENTS[1]), 1 => Just(PARENTS[2])];
    (parent, prop::sample::select(leaves)).prop_map(|(parent, leaf)| join(parent, leaf))
}

/// Any path, but mostly one named like a file.
fn file_path() -> BoxedStrategy<String> {
    prop_oneof![3 => path_from(&LEAVES[2..]), 1 => path_from(&LEAVES)].boxed()
}

/// Any path, but mostly one named like a directory.
fn dir_path() -> BoxedStrategy<String> {
    prop_oneof![3 => path_from(&LEAVES[..2]), 1 => path_from(&LEAVES)].boxed()
}

fn mode() -> impl Strategy<Value = u16> {
    prop::sample::select(&[0o644u16, 0o600, 0o640, 0o755][..])
}

/// Mostly a few KiB; sometimes around the part size, so the upload goes multipart.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0..3_000u64,
        2 => Just(0u64),
        1 => (MIN_PART_SIZE - 1)..(MIN_PART_SIZE + 200),
    ]
}

fn handle() -> impl Strategy<Value = usize> {
    0..8usize
}

fn op() -> impl Strategy<Value = Op> {
    let access = prop_oneof![
        Just(Access::Read),
        Just(Access::ReadWrite),
        Just(Access::Append)
    ];
    let how = (any::<bool>(), access, prop::bool::weighted(0.25), mode()).prop_map(
        |(create, access, truncate, mode)| OpenHow {
            create,
            access,
            truncate,
            mode,
        },
    );
    prop_oneof![
        14 => (file_path(), how).prop_map(|(path, how)| Op::Open { path, how }),
        12 => (handle(), 0..4_096u64, 1..600usize, any::<u8>())
            .prop_map(|(handle, offset, len, seed)| Op::Write { handle, offset, len, seed }),
        6 => (handle(), 0..5_000u64, 1..3_000u32)
            .prop_map(|(handle, offset, len)| Op::Read { handle, offset, len }),
        3 => (file_path(), size()).prop_map(|(path, size)| Op::Truncate { path, size }),
        3 => (handle(), size()).prop_map(|(handle, size)| Op::Ftruncate { handle, size }),
        2 => handle().prop_map(|handle| Op::Fstat { handle }),
        8 => (
            prop_oneof![file_path(), dir_path()],
            prop_oneof![file_path(), dir_path()],
            prop::bool::weighted(0.2),
        )
            .prop_map(|(from, to, noreplace)| Op::Rename { from, to, noreplace }),
        5 => file_path().prop_map(|path| Op::Unlink { path }),
        5 => (dir_path(), prop::sample::select(&[DIR_MODE, 0o700, 0o750][..]))
            .prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        3 => dir_path().prop_map(|path| Op::Rmdir { path }),
        3 => (prop_oneof![file_path(), dir_path()], mode())
            .prop_map(|(path, mode)| Op::Chmod { path, mode }),
        4 => handle().prop_map(|handle| Op::Fsync { handle }),
        10 => handle().prop_map(|handle| Op::Close { handle }),
        4 => (file_path(), 0..3_000usize, any::<u8>())
            .prop_map(|(path, len, seed)| Op::ExternalPut { path, len, seed }),
        2 => file_path().prop_map(|path| Op::ExternalDelete { path }),
        2 => Just(Op::Wait),
        2 => Just(Op::SyncAll),
        2 => Just(Op::Crash),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (any::<bool>(), prop::collection::vec(op(), 1..60)).prop_map(|(forget_lookups, ops)| Case {
        forget_lookups,
        ops,
    })
}

/// Recognisable bytes: `len` of them, different for each seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(97))
                ^ (i >> 8) as u8
        })
        .collect()
}

// ---- the model ----------------------------------------------------------------------------

type FileId = u64;

#[derive(Debug, Clone)]
struct FileState {
    bytes: Vec<u8>,
    mode: u16,
    /// The bucket holds exactly these bytes and mode (after an fsync, a sync of everything or
    /// an external put); cleared by every change of the data.
    synced: bool,
    handles: u32,
    writers: u32,
    /// While writers are open: the contents when the first of them opened the file (`None`
    /// when it created it). Only to report what a crash did to the file, as is:
    before_writers: Option<Vec<u8>>,
    /// The contents at the last fsync or sync of everything.
    last_synced: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct OpenHandle {
    file: FileId,
    write: bool,
    append: bool,
    fh: u64,
    ino: Ino,
}

/// What the model has at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// A parent is missing (ENOENT) or a file (ENOTDIR).
    NoParent(i32),
    Missing,
    File(FileId),
    Dir(u16),
}

#[derive(Debug, Default)]
struct Model {
    /// Every file that exists: linked under a name, or unlinked and still open.
    files: BTreeMap<FileId, FileState>,
    names: BTreeMap<String, FileId>,
    /// Directory paths and their modes; the root is `""`.
    dirs: BTreeMap<String, u16>,
    handles: Vec<OpenHandle>,
    next_file: FileId,
}

impl Model {
    fn new() -> Model {
        Model {
            dirs: BTreeMap::from([(String::new(), DIR_MODE)]),
            ..Model::default()
        }
    }

    fn at(&self, path: &str) -> At {
        let mut ancestor = String::new();
        let mut parts: Vec<&str> = path.split('/').collect();
        parts.pop();
        for part in parts {
            ancestor = join(&ancestor, part);
            if self.names.contains_key(&ancestor) {
                return At::NoParent(libc::ENOTDIR);
            }
            if !self.dirs.contains_key(&ancestor) {
                return At::NoParent(libc::ENOENT);
            }
        }
        match (self.dirs.get(path), self.names.get(path)) {
            (Some(mode), _) => At::Dir(*mode),
            (None, Some(id)) => At::File(*id),
            (None, None) => At::Missing,
        }
    }

    fn file(&mut self, id: FileId) -> &mut FileState {
        self.files.get_mut(&id).expect("a file the model knows")
    }

    fn path_of(&self, id: FileId) -> Option<&str> {
        self.names
            .iter()
            .find(|(_, f)| **f == id)
            .map(|(path, _)| path.as_str())
    }

    /// The names directly in directory `dir`, with their kinds.
    fn children(&self, dir: &str) -> BTreeMap<String, FileKind> {
        let files = self.names.keys().map(|p| (p, FileKind::File));
        let dirs = self
            .dirs
            .keys()
            .filter(|p| !p.is_empty())
            .map(|p| (p, FileKind::Directory));
        files
            .chain(dirs)
            .filter(|(path, _)| parent_of(path) == dir)
            .map(|(path, kind)| (leaf_of(path).to_string(), kind))
            .collect()
    }

    fn add_file(&mut self, path: &str, bytes: Vec<u8>, mode: u16, synced: bool) -> FileId {
        let id = self.next_file;
        self.next_file += 1;
        let state = FileState {
            bytes,
            mode,
            synced,
            handles: 0,
            writers: 0,
            before_writers: None,
            last_synced: None,
        };
        self.files.insert(id, state);
        if let Some(old) = self.names.insert(path.to_string(), id) {
            self.drop_if_gone(old);
        }
        id
    }

    /// Forget file `id` if it has neither a name nor an open handle.
    fn drop_if_gone(&mut self, id: FileId) {
        if self.files[&id].handles == 0 && self.path_of(id).is_none() {
            self.files.remove(&id);
        }
    }

    fn unlink(&mut self, path: &str) {
        if let Some(id) = self.names.remove(path) {
            self.drop_if_gone(id);
        }
    }

    fn open(&mut self, id: FileId, write: bool, append: bool, fh: u64, ino: Ino) {
        let file = self.file(id);
        file.handles += 1;
        if write {
            if file.writers == 0 {
                file.before_writers = Some(file.bytes.clone());
            }
            file.writers += 1;
        }
        self.handles.push(OpenHandle {
            file: id,
            write,
            append,
            fh,
            ino,
        });
    }

    fn close(&mut self, index: usize) -> OpenHandle {
        let handle = self.handles.remove(index);
        let file = self.file(handle.file);
        file.handles -= 1;
        if handle.write {
            file.writers -= 1;
            if file.writers == 0 {
                file.before_writers = None;
            }
        }
        self.drop_if_gone(handle.file);
        handle
    }

    /// `write`: at `offset`, or at the end when `None` (`O_APPEND`).
    fn write(&mut self, id: FileId, offset: Option<u64>, data: &[u8]) {
        let file = self.file(id);
        let start = offset.map_or(file.bytes.len(), |o| o as usize);
        if file.bytes.len() < start + data.len() {
            file.bytes.resize(start + data.len(), 0);
        }
        file.bytes[start..start + data.len()].copy_from_slice(data);
        file.synced = false;
    }

    fn truncate(&mut self, id: FileId, size: u64) {
        let file = self.file(id);
        file.bytes.resize(size as usize, 0);
        file.synced = false;
    }

    /// A successful `rename` (the caller checked every error case).
    fn rename(&mut self, from: &str, to: &str) {
        if !self.dirs.contains_key(from) {
            let id = self.names.remove(from).expect("renamed file exists");
            if let Some(replaced) = self.names.insert(to.to_string(), id) {
                self.drop_if_gone(replaced);
            }
            return;
        }
        self.dirs.remove(to); // an empty directory it replaces
        let moved = |path: &str| -> Option<String> {
            (path == from || path.starts_with(&format!("{from}/")))
                .then(|| format!("{to}{}", &path[from.len()..]))
        };
        let dirs: Vec<(String, String, u16)> = self
            .dirs
            .iter()
            .filter_map(|(path, mode)| Some((path.clone(), moved(path)?, *mode)))
            .collect();
        for (old, _, _) in &dirs {
            self.dirs.remove(old);
        }
        for (_, new, mode) in dirs {
            self.dirs.insert(new, mode);
        }
        let names: Vec<(String, String)> = self
            .names
            .keys()
            .filter_map(|path| Some((path.clone(), moved(path)?)))
            .collect();
        for (old, new) in names {
            let id = self.names.remove(&old).expect("listed above");
            self.names.insert(new, id);
        }
    }

    /// Handles are gone with the daemon; so are files only they kept.
    fn lose_handles(&mut self) {
        self.handles.clear();
        for file in self.files.values_mut() {
            file.handles = 0;
            file.writers = 0;
            file.before_writers = None;
        }
        let linked: BTreeSet<FileId> = self.names.values().copied().collect();
        self.files.retain(|id, _| linked.contains(id));
    }
}

// ---- the filesystem under test ------------------------------------------------------------

/// One life of the daemon. Fields drop in order: the filesystem, then the runtime with every
/// task still running on it (an upload in flight dies as in a crash).
struct Mount {
    fs: Filesystem,
    rt: tokio::runtime::Runtime,
}

fn config(cache_dir: &Path) -> FsConfig {
    FsConfig {
        cache_dir: cache_dir.to_path_buf(),
        // External changes must show at once: nothing is trusted from an earlier answer.
        metadata_ttl: Duration::ZERO,
        writeback_delay: WRITEBACK_DELAY,
        // S3's smallest: the files around it are uploaded in two parts.
        part_size: MIN_PART_SIZE,
        ..FsConfig::default()
    }
}

impl Mount {
    fn start(store: Arc<MemoryStore>, cache_dir: &Path) -> Check<Mount> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let fs = {
            let _in_runtime = rt.enter();
            Filesystem::new(store, PREFIX.into(), config(cache_dir))
        }
        .map_err(|e| format!("start: {e}"))?;
        Ok(Mount { fs, rt })
    }

    fn run<F: std::future::Future>(&self, what: &str, op: F) -> Check<F::Output> {
        self.rt
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, op).await })
            .map_err(|_| format!("{what} hung for {OP_TIMEOUT:?}"))
    }
}

/// What the mount shows at a path, found as the kernel finds it.
#[derive(Debug)]
enum Seen {
    /// A parent is missing or not a directory (the errno).
    NoParent(i32),
    /// The parent's inode and the leaf's lookup.
    Leaf {
        parent: Ino,
        leaf: Result<Attr, i32>,
    },
}

/// A path the mount and the model agree on.
enum Resolved {
    NoParent,
    Missing { parent: Ino },
    File { parent: Ino, attr: Attr, id: FileId },
    Dir { parent: Ino, attr: Attr },
}

/// How a file with a writer open at a crash came back, counted over the run.
static CRASH_OUTCOMES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

struct World {
    store: Arc<MemoryStore>,
    cache: tempfile::TempDir,
    /// `None` only while crashing.
    mount: Option<Mount>,
    model: Model,
    forget_lookups: bool,
    /// Lookups made during the current step, returned after it (with `forget_lookups`).
    lookups: Vec<Ino>,
}

fn errno<T>(result: FsResult<T>) -> Result<T, i32> {
    result.map_err(|e| e.errno_value())
}

impl World {
    fn new(forget_lookups: bool) -> Check<World> {
        let store = Arc::new(MemoryStore::new());
        let cache = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = Mount::start(store.clone(), &cache.path().join("cache"))?;
        Ok(World {
            store,
            cache,
            mount: Some(mount),
            model: Model::new(),
            forget_lookups,
            lookups: Vec::new(),
        })
    }

    fn mount(&self) -> &Mount {
        self.mount.as_ref().expect("mounted")
    }

    fn fs(&self) -> &Filesystem {
        &self.mount().fs
    }

    fn run<F: std::future::Future>(&self, what: &str, op: F) -> Check<F::Output> {
        self.mount().run(what, op)
    }

    fn lookup(&mut self, parent: Ino, name: &str) -> Check<Result<Attr, i32>> {
        let found = errno(self.run("lookup", self.fs().lookup(parent, name))?);
        if let Ok(entry) = &found {
            self.lookups.push(entry.attr.ino);
        }
        Ok(found.map(|e| e.attr))
    }

    /// The handle about to be opened keeps one lookup of `ino` until it is closed.
    fn keep_lookup(&mut self, ino: Ino) {
        if let Some(i) = self.lookups.iter().rposition(|l| *l == ino) {
            self.lookups.swap_remove(i);
        }
    }

    fn return_lookups(&mut self) {
        let lookups = std::mem::take(&mut self.lookups);
        if self.forget_lookups {
            for ino in lookups {
                self.fs().forget(ino, 1);
            }
        }
    }

    fn walk(&mut self, path: &str) -> Check<Seen> {
        let mut parts: Vec<&str> = path.split('/').collect();
        let leaf = parts.pop().expect("a path has a leaf");
        let mut parent = ROOT_INO;
        for name in parts {
            match self.lookup(parent, name)? {
                Ok(attr) if attr.kind == FileKind::Directory => parent = attr.ino,
                Ok(_) => return Ok(Seen::NoParent(libc::ENOTDIR)),
                Err(e) => return Ok(Seen::NoParent(e)),
            }
        }
        Ok(Seen::Leaf {
            parent,
            leaf: self.lookup(parent, leaf)?,
        })
    }

    /// Walk `path` and check that the mount shows what the model has there (kind, size, mode).
    fn resolve(&mut self, path: &str) -> Check<Resolved> {
        let seen = self.walk(path)?;
        let expected = self.model.at(path);
        match (expected, seen) {
            (At::NoParent(want), Seen::NoParent(got)) if want == got => Ok(Resolved::NoParent),
            (
                At::Missing,
                Seen::Leaf {
                    parent,
                    leaf: Err(libc::ENOENT),
                },
            ) => Ok(Resolved::Missing { parent }),
            (
                At::File(id),
                Seen::Leaf {
                    parent,
                    leaf: Ok(attr),
                },
            ) if attr.kind == FileKind::File => {
                let file = &self.model.files[&id];
                ensure!(
                    attr.size == file.bytes.len() as u64 && attr.perm == file.mode,
                    "stat {path}: size {} mode {:o}; the model has size {} mode {:o}",
                    attr.size,
                    attr.perm,
                    file.bytes.len(),
                    file.mode
                );
                Ok(Resolved::File { parent, attr, id })
            }
            (
                At::Dir(mode),
                Seen::Leaf {
                    parent,
                    leaf: Ok(attr),
                },
            ) if attr.kind == FileKind::Directory => {
                ensure!(
                    attr.perm == mode,
                    "stat {path}: mode {:o}; the model has {mode:o}",
                    attr.perm
                );
                Ok(Resolved::Dir { parent, attr })
            }
            (expected, seen) => Err(format!(
                "{path}: the mount shows {seen:?}; the model has {expected:?}"
            )),
        }
    }

    fn pick(&self, handle: usize) -> Option<usize> {
        (!self.model.handles.is_empty()).then(|| handle % self.model.handles.len())
    }

    /// The whole of file `ino`, read through a handle of its own.
    fn read_all(&mut self, ino: Ino) -> Check<Vec<u8>> {
        const CHUNK: u32 = 1 << 20;
        let fs = self.fs();
        let fh = errno(self.run("open", fs.open(ino, OpenMode::default()))?)
            .map_err(|e| format!("open for reading: errno {e}"))?;
        let mut data = Vec::new();
        loop {
            let chunk = errno(self.run("read", fs.read(fh, data.len() as u64, CHUNK))?)
                .map_err(|e| format!("read at {}: errno {e}", data.len()))?;
            data.extend_from_slice(&chunk);
            if chunk.len() < CHUNK as usize {
                break;
            }
        }
        errno(self.run("release", fs.release(fh))?).map_err(|e| format!("release: {e}"))?;
        Ok(data)
    }

    // ---- steps ------------------------------------------------------------------------------

    fn step(&mut self, op: &Op) -> Check {
        let result = self.apply(op);
        self.return_lookups();
        result
    }

    fn apply(&mut self, op: &Op) -> Check {
        match op {
            Op::Open { path, how } => self.open(path, *how),
            Op::Write {
                handle,
                offset,
                len,
                seed,
            } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                let h = self.model.handles[h].clone();
                if !h.write {
                    return Ok(()); // the kernel refuses (EBADF)
                }
                let data = pattern(*len, *seed);
                let n = errno(self.run("write", self.fs().write(h.fh, *offset, &data))?)
                    .map_err(|e| format!("write: errno {e}"))?;
                ensure!(n as usize == data.len(), "short write: {n}");
                let at = (!h.append).then_some(*offset);
                self.model.write(h.file, at, &data);
                Ok(())
            }
            Op::Read {
                handle,
                offset,
                len,
            } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                let h = self.model.handles[h].clone();
                let got = errno(self.run("read", self.fs().read(h.fh, *offset, *len))?)
                    .map_err(|e| format!("read: errno {e}"))?;
                let bytes = &self.model.files[&h.file].bytes;
                let start = (*offset as usize).min(bytes.len());
                let end = (*offset as usize + *len as usize).min(bytes.len());
                ensure!(
                    got[..] == bytes[start..end],
                    "read {len} at {offset}: {} bytes, not the model's {} (file of {})",
                    got.len(),
                    end - start,
                    bytes.len()
                );
                Ok(())
            }
            Op::Truncate { path, size } => {
                // truncate(2) of a directory is the kernel's EISDIR.
                if let Resolved::File { attr, id, .. } = self.resolve(path)? {
                    self.truncate(attr.ino, None, id, *size)?;
                }
                Ok(())
            }
            Op::Ftruncate { handle, size } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                let h = self.model.handles[h].clone();
                if h.write {
                    self.truncate(h.ino, Some(h.fh), h.file, *size)?;
                }
                Ok(())
            }
            Op::Fstat { handle } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                let h = self.model.handles[h].clone();
                let attr = errno(self.run("getattr", self.fs().getattr(h.ino))?)
                    .map_err(|e| format!("fstat: errno {e}"))?;
                let file = &self.model.files[&h.file];
                ensure!(
                    attr.size == file.bytes.len() as u64 && attr.perm == file.mode,
                    "fstat: size {} mode {:o}; the model has size {} mode {:o}",
                    attr.size,
                    attr.perm,
                    file.bytes.len(),
                    file.mode
                );
                Ok(())
            }
            Op::Rename {
                from,
                to,
                noreplace,
            } => self.rename(from, to, *noreplace),
            Op::Unlink { path } => {
                // unlink(2) of a directory is the kernel's EISDIR.
                if let Resolved::File { parent, .. } = self.resolve(path)? {
                    errno(self.run("unlink", self.fs().unlink(parent, leaf_of(path)))?)
                        .map_err(|e| format!("unlink: errno {e}"))?;
                    self.model.unlink(path);
                }
                Ok(())
            }
            Op::Mkdir { path, mode } => {
                // An existing name is the kernel's EEXIST.
                if let Resolved::Missing { parent } = self.resolve(path)? {
                    let mkdir = self.fs().mkdir(parent, leaf_of(path), *mode as u32);
                    let entry = errno(self.run("mkdir", mkdir)?)
                        .map_err(|e| format!("mkdir: errno {e}"))?;
                    self.lookups.push(entry.attr.ino);
                    ensure!(
                        entry.attr.kind == FileKind::Directory && entry.attr.perm == *mode,
                        "mkdir made {:?}",
                        entry.attr
                    );
                    self.model.dirs.insert(path.clone(), *mode);
                }
                Ok(())
            }
            Op::Rmdir { path } => {
                // rmdir(2) of a file is the kernel's ENOTDIR.
                if let Resolved::Dir { parent, .. } = self.resolve(path)? {
                    let got = errno(self.run("rmdir", self.fs().rmdir(parent, leaf_of(path)))?);
                    let want = if self.model.children(path).is_empty() {
                        Ok(())
                    } else {
                        Err(libc::ENOTEMPTY)
                    };
                    ensure!(got == want, "rmdir: {got:?}; the model says {want:?}");
                    if got.is_ok() {
                        self.model.dirs.remove(path);
                    }
                }
                Ok(())
            }
            Op::Chmod { path, mode } => {
                let (ino, type_bits) = match self.resolve(path)? {
                    Resolved::File { attr, .. } => (attr.ino, libc::S_IFREG),
                    Resolved::Dir { attr, .. } => (attr.ino, libc::S_IFDIR),
                    Resolved::NoParent | Resolved::Missing { .. } => return Ok(()),
                };
                let change = SetAttr {
                    mode: Some(type_bits | *mode as u32),
                    ..SetAttr::default()
                };
                let attr = errno(self.run("chmod", self.fs().setattr(ino, change))?)
                    .map_err(|e| format!("chmod: errno {e}"))?;
                ensure!(attr.perm == *mode, "chmod: the mode is {:o}", attr.perm);
                match self.model.at(path) {
                    At::File(id) => self.model.file(id).mode = *mode,
                    _ => {
                        self.model.dirs.insert(path.clone(), *mode);
                    }
                }
                Ok(())
            }
            Op::Fsync { handle } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                let h = self.model.handles[h].clone();
                errno(self.run("fsync", self.fs().fsync(h.fh))?)
                    .map_err(|e| format!("fsync: errno {e}"))?;
                if let Some(path) = self.model.path_of(h.file) {
                    let file = &self.model.files[&h.file];
                    self.check_object(
                        &format!("{PREFIX}{path}"),
                        &file.bytes,
                        file.mode,
                        FILE_MODE,
                    )
                    .map_err(|e| format!("after fsync: {e}"))?;
                }
                let file = self.model.file(h.file);
                file.synced = true;
                file.last_synced = Some(file.bytes.clone());
                Ok(())
            }
            Op::Close { handle } => {
                let Some(h) = self.pick(*handle) else {
                    return Ok(());
                };
                self.close(h)
            }
            Op::ExternalPut { path, len, seed } => {
                match self.model.at(path) {
                    At::Missing => {}
                    At::File(id) if self.is_clean(id) => {}
                    _ => return Ok(()),
                }
                let data = pattern(*len, *seed);
                let body = Body::Bytes(data.clone().into());
                let key = format!("{PREFIX}{path}");
                let options = PutOptions::default();
                self.run("external put", self.store.put(&key, body, &options))?
                    .map_err(|e| format!("external put: {e}"))?;
                self.model.add_file(path, data, FILE_MODE, true);
                Ok(())
            }
            Op::ExternalDelete { path } => {
                if let At::File(id) = self.model.at(path)
                    && self.is_clean(id)
                {
                    let key = format!("{PREFIX}{path}");
                    self.run("external delete", self.store.delete(&key))?
                        .map_err(|e| format!("external delete: {e}"))?;
                    self.model.unlink(path);
                }
                Ok(())
            }
            Op::Wait => {
                self.run("wait", async {
                    tokio::time::sleep(WRITEBACK_DELAY * 4).await
                })?;
                Ok(())
            }
            Op::SyncAll => self.sync_all(),
            Op::Crash => self.crash(),
        }
    }

    /// Whether another S3 client may change file `id`'s object without racing local changes.
    fn is_clean(&self, id: FileId) -> bool {
        let file = &self.model.files[&id];
        file.handles == 0 && file.synced
    }

    fn open(&mut self, path: &str, how: OpenHow) -> Check {
        let write = how.access != Access::Read;
        let append = how.access == Access::Append;
        match self.resolve(path)? {
            // Missing parents are the lookups' errors; a directory is the kernel's EISDIR for
            // writing and an opendir for reading.
            Resolved::NoParent | Resolved::Dir { .. } => {}
            Resolved::Missing { .. } if !how.create => {}
            Resolved::Missing { parent } => {
                let mut flags = libc::O_RDWR | libc::O_CREAT;
                if append {
                    flags |= libc::O_APPEND;
                }
                let mode = libc::S_IFREG | how.mode as u32;
                let create = self.fs().create(parent, leaf_of(path), mode, flags);
                let (entry, fh) =
                    errno(self.run("create", create)?).map_err(|e| format!("create: errno {e}"))?;
                ensure!(
                    entry.attr.size == 0 && entry.attr.perm == how.mode,
                    "create made {:?}",
                    entry.attr
                );
                let id = self.model.add_file(path, Vec::new(), how.mode, false);
                self.model.open(id, true, append, fh, entry.attr.ino);
                self.model.file(id).before_writers = None; // created by this writer
            }
            Resolved::File { attr, id, .. } => {
                let mode = OpenMode {
                    write,
                    truncate: write && how.truncate,
                    append,
                };
                let fh = errno(self.run("open", self.fs().open(attr.ino, mode))?)
                    .map_err(|e| format!("open {mode:?}: errno {e}"))?;
                self.keep_lookup(attr.ino);
                self.model.open(id, write, append, fh, attr.ino);
                if mode.truncate {
                    self.model.truncate(id, 0);
                }
            }
        }
        Ok(())
    }

    fn truncate(&mut self, ino: Ino, fh: Option<u64>, id: FileId, size: u64) -> Check {
        let change = SetAttr {
            size: Some(size),
            fh,
            ..SetAttr::default()
        };
        let attr = errno(self.run("truncate", self.fs().setattr(ino, change))?)
            .map_err(|e| format!("truncate: errno {e}"))?;
        ensure!(
            attr.size == size,
            "truncate to {size}: the size is {}",
            attr.size
        );
        self.model.truncate(id, size);
        Ok(())
    }

    fn close(&mut self, index: usize) -> Check {
        let h = self.model.close(index);
        errno(self.run("flush", self.fs().flush(h.fh))?).map_err(|e| format!("flush: {e}"))?;
        errno(self.run("release", self.fs().release(h.fh))?)
            .map_err(|e| format!("release: {e}"))?;
        if self.forget_lookups {
            self.fs().forget(h.ino, 1);
        }
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str, noreplace: bool) -> Check {
        let source = self.resolve(from)?;
        let target = self.resolve(to)?;
        // What the VFS decides before asking the filesystem (fs/namei.c: do_renameat2 and
        // vfs_rename): missing names, RENAME_NOREPLACE, a directory into its own subtree, a
        // target that is an ancestor of the source, the same file, a kind mismatch.
        let (parent, is_dir) = match source {
            Resolved::File { parent, .. } => (parent, false),
            Resolved::Dir { parent, .. } => (parent, true),
            Resolved::NoParent | Resolved::Missing { .. } => return Ok(()),
        };
        let (new_parent, target_dir) = match target {
            Resolved::NoParent => return Ok(()),
            Resolved::Missing { parent } => (parent, None),
            Resolved::File { parent, .. } => (parent, Some(false)),
            Resolved::Dir { parent, .. } => (parent, Some(true)),
        };
        let into_itself = is_dir && to.starts_with(&format!("{from}/"));
        let onto_ancestor = from.starts_with(&format!("{to}/"));
        if (noreplace && target_dir.is_some())
            || into_itself
            || onto_ancestor
            || from == to
            || target_dir.is_some_and(|d| d != is_dir)
        {
            return Ok(());
        }
        let flags = RenameFlags {
            noreplace,
            exchange: false,
        };
        let rename = self
            .fs()
            .rename(parent, leaf_of(from), new_parent, leaf_of(to), flags);
        let got = errno(self.run("rename", rename)?);
        let want = if target_dir == Some(true) && !self.model.children(to).is_empty() {
            Err(libc::ENOTEMPTY)
        } else {
            Ok(())
        };
        ensure!(got == want, "rename: {got:?}; the model says {want:?}");
        if got.is_ok() {
            self.model.rename(from, to);
        }
        Ok(())
    }

    /// Upload everything (as `syncfs` or an unmount would) and check the bucket.
    fn sync_all(&mut self) -> Check {
        let fs = self.fs();
        let left = self.run("sync of everything", async {
            for file in fs.cache.dirty_files() {
                fs.writeback
                    .sync(&file)
                    .await
                    .map_err(|e| format!("upload of {}: {e}", file.key()))?;
            }
            Ok::<_, String>(fs.drain(Duration::from_secs(10)).await)
        })??;
        ensure!(left == 0, "{left} files still dirty after a drain");
        for file in self.model.files.values_mut() {
            file.synced = true;
            file.last_synced = Some(file.bytes.clone());
        }
        self.verify_bucket()
    }

    fn crash(&mut self) -> Check {
        let open_for_writing: Vec<(String, FileState)> = self
            .model
            .names
            .iter()
            .map(|(path, id)| (path.clone(), self.model.files[id].clone()))
            .filter(|(_, file)| file.writers > 0)
            .collect();
        drop(self.mount.take());
        self.lookups.clear();
        self.model.lose_handles();
        self.mount = Some(Mount::start(
            self.store.clone(),
            &self.cache.path().join("cache"),
        )?);
        // Whatever shows for a file written at the crash becomes the truth.
        for (path, at_crash) in open_for_writing {
            self.model.unlink(&path);
            let outcome = match self.walk(&path)? {
                Seen::Leaf {
                    leaf: Err(libc::ENOENT),
                    ..
                } => "absent".to_string(),
                Seen::Leaf { leaf: Ok(attr), .. } if attr.kind == FileKind::File => {
                    let data = self.read_all(attr.ino)?;
                    ensure!(
                        data.len() as u64 == attr.size,
                        "{path} after the crash: {} bytes read, stat says {}",
                        data.len(),
                        attr.size
                    );
                    let outcome = if Some(&data) == at_crash.before_writers.as_ref() {
                        "as before its writers opened it"
                    } else if data == at_crash.bytes {
                        "as at the crash"
                    } else if Some(&data) == at_crash.last_synced.as_ref() {
                        "as at its last fsync"
                    } else {
                        "none of those (a mix)"
                    };
                    let mode = if attr.perm == at_crash.mode {
                        "same mode"
                    } else {
                        "other mode"
                    };
                    self.model.add_file(&path, data, attr.perm, false);
                    format!("{outcome}, {mode}")
                }
                seen => return Err(format!("{path} after the crash: {seen:?}")),
            };
            let origin = if at_crash.before_writers.is_some() {
                "an existing file open for writing"
            } else {
                "a file created by a writer still open"
            };
            *CRASH_OUTCOMES
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(format!("{origin}: {outcome}"))
                .or_default() += 1;
        }
        self.verify_mount()
            .map_err(|e| format!("after the restart: {e}"))
    }

    fn finish(&mut self) -> Check {
        while !self.model.handles.is_empty() {
            self.close(0)?;
        }
        self.sync_all()?;
        self.verify_mount()
    }

    // ---- whole comparisons ------------------------------------------------------------------

    /// Every name of the name space and of the model, every file's contents, every directory's
    /// listing.
    fn verify_mount(&mut self) -> Check {
        let mut paths: BTreeSet<String> = PARENTS
            .iter()
            .flat_map(|p| LEAVES.iter().map(|l| join(p, l)))
            .collect();
        paths.extend(self.model.names.keys().cloned());
        paths.extend(self.model.dirs.keys().filter(|d| !d.is_empty()).cloned());
        let mut dirs = vec![(String::new(), ROOT_INO)];
        for path in paths {
            match self.resolve(&path)? {
                Resolved::File { attr, id, .. } => {
                    let data = self.read_all(attr.ino)?;
                    let want = &self.model.files[&id].bytes;
                    ensure!(
                        data == *want,
                        "{path}: contents differ ({} bytes, the model {})",
                        data.len(),
                        want.len()
                    );
                }
                Resolved::Dir { attr, .. } => dirs.push((path, attr.ino)),
                Resolved::NoParent | Resolved::Missing { .. } => {}
            }
        }
        for (dir, ino) in dirs {
            let fs = self.fs();
            let fh = errno(self.run("opendir", fs.opendir(ino))?)
                .map_err(|e| format!("opendir {dir:?}: errno {e}"))?;
            let entries = errno(self.run("readdir", fs.readdir_to_end(fh))?)
                .map_err(|e| format!("readdir: errno {e}"))?;
            fs.releasedir(fh);
            let listed: BTreeMap<String, FileKind> = entries
                .into_iter()
                .filter(|e| e.name != "." && e.name != "..")
                .map(|e| (e.name, e.kind))
                .collect();
            let want = self.model.children(&dir);
            ensure!(
                listed == want,
                "readdir {dir:?}: {listed:?}; the model has {want:?}"
            );
        }
        self.return_lookups();
        Ok(())
    }

    /// The bucket holds exactly the model's files and directory markers.
    fn verify_bucket(&self) -> Check {
        let mut expected: BTreeMap<String, (&[u8], u16, u16)> = BTreeMap::new();
        for (path, id) in &self.model.names {
            let file = &self.model.files[id];
            expected.insert(
                format!("{PREFIX}{path}"),
                (&file.bytes, file.mode, FILE_MODE),
            );
        }
        for (dir, mode) in self.model.dirs.iter().filter(|(d, _)| !d.is_empty()) {
            expected.insert(format!("{PREFIX}{dir}/"), (&[], *mode, DIR_MODE));
        }
        let mut keys = BTreeSet::new();
        let mut continuation = None;
        loop {
            let request = ListRequest {
                prefix: "",
                delimiter: None,
                continuation,
                max_keys: None,
            };
            let page = self
                .run("list", self.store.list(request))?
                .map_err(|e| format!("list: {e}"))?;
            keys.extend(page.objects.into_iter().map(|o| o.key));
            match page.next {
                Some(token) => continuation = Some(token),
                None => break,
            }
        }
        let want: BTreeSet<String> = expected.keys().cloned().collect();
        ensure!(keys == want, "the bucket has {keys:?}; the model {want:?}");
        for (key, (bytes, mode, default_mode)) in expected {
            self.check_object(&key, bytes, mode, default_mode)?;
        }
        Ok(())
    }

    /// Object `key` holds `bytes`, with `mode` stored (or not stored, when it is the default).
    fn check_object(&self, key: &str, bytes: &[u8], mode: u16, default_mode: u16) -> Check {
        let store = &self.store;
        let (data, head) = self.run("read the bucket", async {
            (
                store.get_range(key, 0..u64::MAX, None).await,
                store.head(key).await,
            )
        })?;
        let data = data.map_err(|e| format!("{key}: {e}"))?;
        let head = head.map_err(|e| format!("{key}: {e}"))?;
        ensure!(
            data[..] == *bytes,
            "{key} in the bucket: {} bytes, not the model's {}",
            data.len(),
            bytes.len()
        );
        let stored = crate::meta::PosixMeta::from_metadata(&head.metadata)
            .perm()
            .unwrap_or(default_mode);
        ensure!(
            stored == mode,
            "{key} in the bucket: mode {stored:o}, the model {mode:o}"
        );
        Ok(())
    }
}

fn run_case(case: &Case) -> Check {
    let mut world = World::new(case.forget_lookups)?;
    for (i, op) in case.ops.iter().enumerate() {
        world
            .step(op)
            .map_err(|e| format!("step {i} {op:?}: {e}"))?;
        if i % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1 {
            world
                .verify_mount()
                .map_err(|e| format!("after step {i} {op:?}: {e}"))?;
        }
    }
    world.finish().map_err(|e| format!("at the end: {e}"))
}

#[test]
fn the_mount_and_the_bucket_follow_the_model() {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let config = ProptestConfig {
        cases,
        // Shrunk failures become named tests below, not files beside the source.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let result =
        TestRunner::new(config).run(&case(), |case| run_case(&case).map_err(TestCaseError::fail));
    let outcomes = CRASH_OUTCOMES.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!("files with a writer open at a crash, as they came back: {outcomes:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- regressions: shrunk failures of the model, as named tests -----------------------------

/// A filesystem over a new bucket, as the model runs it; `delay` is the write-back delay.
fn mount_for_test(cache: &Path, delay: Duration) -> (Arc<MemoryStore>, Filesystem) {
    let store = Arc::new(MemoryStore::new());
    let config = FsConfig {
        writeback_delay: delay,
        ..config(cache)
    };
    let fs = Filesystem::new(store.clone(), PREFIX.into(), config).unwrap();
    (store, fs)
}

async fn object(store: &MemoryStore, key: &str) -> Option<Vec<u8>> {
    store
        .get_range(key, 0..u64::MAX, None)
        .await
        .ok()
        .map(|b| b.to_vec())
}

async fn listed_names(fs: &Filesystem, dir: Ino) -> Vec<String> {
    let fh = fs.opendir(dir).await.unwrap();
    let entries = fs.readdir_to_end(fh).await.unwrap();
    let names = entries.into_iter().skip(2).map(|e| e.name);
    fs.releasedir(fh);
    names.collect()
}

/// Another client replaces, then deletes, objects this mount has clean copies of (written and
/// uploaded here): `stat`, `readdir` and `rmdir` follow the bucket, not the copies.
#[tokio::test(flavor = "multi_thread")]
async fn a_clean_cached_copy_does_not_hide_another_clients_changes() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), WRITEBACK_DELAY);
    let d = fs
        .mkdir(ROOT_INO, "d", DIR_MODE.into())
        .await
        .unwrap()
        .attr
        .ino;
    for (dir, name) in [(ROOT_INO, "f"), (ROOT_INO, "g"), (d, "h")] {
        let (_, fh) = fs.create(dir, name, 0o644, libc::O_RDWR).await.unwrap();
        fs.write(fh, 0, b"ours").await.unwrap();
        fs.fsync(fh).await.unwrap();
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    let theirs = Body::Bytes(b"their longer version".to_vec().into());
    store
        .put("p/f", theirs, &PutOptions::default())
        .await
        .unwrap();
    let f = fs.lookup(ROOT_INO, "f").await.unwrap().attr;
    assert_eq!(f.size, 20, "stat shows their version");
    let fh = fs.open(f.ino, OpenMode::default()).await.unwrap();
    assert_eq!(
        &fs.read(fh, 0, 100).await.unwrap()[..],
        b"their longer version"
    );
    fs.release(fh).await.unwrap();

    store.delete("p/g").await.unwrap();
    store.delete("p/d/h").await.unwrap();
    assert!(!listed_names(&fs, ROOT_INO).await.contains(&"g".to_string()));
    assert_eq!(
        fs.lookup(ROOT_INO, "g").await.unwrap_err().errno_value(),
        libc::ENOENT
    );
    fs.rmdir(ROOT_INO, "d").await.unwrap();
}

/// `ftruncate` through the last handle of an unlinked file changes that file only: the object
/// is not created again under its old name.
#[tokio::test(flavor = "multi_thread")]
async fn ftruncate_of_an_unlinked_file_does_not_recreate_it() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), WRITEBACK_DELAY);
    let (entry, fh) = fs.create(ROOT_INO, "f", 0o644, libc::O_RDWR).await.unwrap();
    fs.unlink(ROOT_INO, "f").await.unwrap();
    let change = SetAttr {
        size: Some(3),
        fh: Some(fh),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(entry.attr.ino, change).await.unwrap().size, 3);
    assert_eq!(&fs.read(fh, 0, 10).await.unwrap()[..], [0, 0, 0]);
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    assert_eq!(
        object(&store, "p/f").await,
        None,
        "the unlinked file came back"
    );
}

/// `fstat` of an unlinked open file shows its own data, also once the kernel has forgotten
/// the directory it was in (its old path leads nowhere).
#[tokio::test(flavor = "multi_thread")]
async fn fstat_of_an_unlinked_file_shows_its_own_data() {
    let cache = tempfile::tempdir().unwrap();
    let (_store, fs) = mount_for_test(cache.path(), WRITEBACK_DELAY);
    let d = fs
        .mkdir(ROOT_INO, "d", DIR_MODE.into())
        .await
        .unwrap()
        .attr
        .ino;
    let (entry, fh) = fs.create(d, "f", 0o600, libc::O_RDWR).await.unwrap();
    fs.write(fh, 0, b"abc").await.unwrap();
    fs.unlink(d, "f").await.unwrap();
    fs.forget(d, 1);
    let (_, other) = fs
        .create(ROOT_INO, "d2", 0o644, libc::O_RDWR)
        .await
        .unwrap();
    let attr = fs.getattr(entry.attr.ino).await.unwrap();
    assert_eq!((attr.size, attr.perm), (3, 0o600));
    let change = SetAttr {
        size: Some(1),
        fh: Some(fh),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(entry.attr.ino, change).await.unwrap().size, 1);
    for fh in [fh, other] {
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
    }
}

/// A handle opened for reading while the file had no local data (served from S3) sees what
/// another handle of the mount writes, and its `fsync` uploads it.
#[tokio::test(flavor = "multi_thread")]
async fn a_reading_handle_sees_and_fsyncs_what_another_handle_wrote() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), Duration::from_secs(3600));
    let old = Body::Bytes(b"old".to_vec().into());
    store.put("p/f", old, &PutOptions::default()).await.unwrap();
    let ino = fs.lookup(ROOT_INO, "f").await.unwrap().attr.ino;
    let reader = fs.open(ino, OpenMode::default()).await.unwrap();
    let rewrite = OpenMode {
        write: true,
        truncate: true,
        append: false,
    };
    let writer = fs.open(ino, rewrite).await.unwrap();
    fs.write(writer, 0, b"new!").await.unwrap();
    assert_eq!(&fs.read(reader, 0, 10).await.unwrap()[..], b"new!");
    fs.fsync(reader).await.unwrap();
    assert_eq!(object(&store, "p/f").await.as_deref(), Some(&b"new!"[..]));
    for fh in [reader, writer] {
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
    }
}

/// A directory renamed while a file in it is uploading: the upload ends under the old name
/// while the rename waits for it, and that object must move too.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_a_directory_during_an_upload_in_it_leaves_nothing_behind() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), Duration::from_secs(3600));
    let d = fs
        .mkdir(ROOT_INO, "d", DIR_MODE.into())
        .await
        .unwrap()
        .attr
        .ino;
    let (_, fh) = fs.create(d, "f", 0o644, libc::O_RDWR).await.unwrap();
    fs.write(fh, 0, b"data").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    // An upload of d/f holds the file's upload lock (as the uploader does) when the rename
    // lists the directory, and publishes the file after the rename starts waiting for it.
    let file = fs.cache.get("p/d/f").unwrap();
    let uploading = file.upload_lock.lock().await;
    let (file, store_ref, fs_ref) = (&file, &store, &fs);
    let upload = async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (snapshot, bytes) = file.read_snapshot().unwrap();
        let body = Body::Bytes(bytes.into());
        let etag = store_ref
            .put("p/d/f", body, &PutOptions::default())
            .await
            .unwrap();
        assert!(fs_ref.cache.mark_clean(file, &snapshot, etag).unwrap());
        drop(uploading);
    };
    let rename = fs.rename(ROOT_INO, "d", ROOT_INO, "e", RenameFlags::default());
    let (renamed, ()) = tokio::join!(rename, upload);
    renamed.unwrap();
    assert_eq!(object(&store, "p/e/f").await.as_deref(), Some(&b"data"[..]));
    assert_eq!(object(&store, "p/d/f").await, None, "the old key stays");
    let d = fs.lookup(ROOT_INO, "d").await;
    assert_eq!(d.unwrap_err().errno_value(), libc::ENOENT);
}

/// `truncate(2)` of a closed file that readers still have open is as good as a close: it is
/// journaled, so it survives a crash and is uploaded by the next start.
#[tokio::test(flavor = "multi_thread")]
async fn truncating_a_file_only_readers_have_open_survives_a_crash() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), Duration::from_secs(3600));
    let (entry, fh) = fs.create(ROOT_INO, "f", 0o644, libc::O_RDWR).await.unwrap();
    fs.write(fh, 0, b"x").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let _reader = fs.open(entry.attr.ino, OpenMode::default()).await.unwrap();
    let change = SetAttr {
        size: Some(2),
        ..SetAttr::default()
    };
    fs.setattr(entry.attr.ino, change).await.unwrap();
    drop(fs); // a crash: nothing drained
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fs = Filesystem::new(store.clone(), PREFIX.into(), config(cache.path())).unwrap();
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    assert_eq!(object(&store, "p/f").await.as_deref(), Some(&b"x\0"[..]));
}

/// A multipart object of `len` pattern bytes at `key`, written by another client in parts of
/// `MIN_PART_SIZE`: its ETag (`md5-N`) changes with any server-side copy.
async fn put_multipart(store: &MemoryStore, key: &str, len: usize) -> Vec<u8> {
    let data = pattern(len, 7);
    let id = store
        .create_multipart(key, &PutOptions::default())
        .await
        .unwrap();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(MIN_PART_SIZE as usize).enumerate() {
        let number = i as u32 + 1;
        let body = Body::Bytes(chunk.to_vec().into());
        let etag = store.upload_part(key, &id, number, body).await.unwrap();
        parts.push(crate::store::CompletedPart { number, etag });
    }
    let none = crate::store::Condition::default();
    store
        .complete_multipart(key, &id, &parts, &none)
        .await
        .unwrap();
    data
}

/// A handle that reads a multipart object from S3 (no local data), opened by looking `name` up
/// in the root.
async fn open_remote(fs: &Filesystem, name: &str) -> (Ino, u64) {
    let ino = fs.lookup(ROOT_INO, name).await.unwrap().attr.ino;
    let fh = fs.open(ino, OpenMode::default()).await.unwrap();
    assert!(
        matches!(fs.handle_table().get(&fh), Some(Handle::Remote { .. })),
        "the handle reads from S3"
    );
    (ino, fh)
}

/// The shrunk failure of CI's model run: a chmod's metadata self-copy gave a multipart object
/// a new ETag, and a handle reading it from S3 (pinned to the old one) failed with ESTALE. The
/// mount's own copies, by chmod and by rename of a file or a directory, move open readers
/// along; unlink and a rename over the file give them a local copy of the data.
#[tokio::test(flavor = "multi_thread")]
async fn handles_reading_from_s3_survive_the_mounts_own_chmod_rename_and_unlink() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), WRITEBACK_DELAY);
    let len = MIN_PART_SIZE as usize + 1000;
    let read_all = |fh| {
        let fs = &fs;
        async move { fs.read(fh, 0, len as u32 + 1).await.unwrap().to_vec() }
    };

    let data = put_multipart(&store, "p/chmod", len).await;
    let (ino, fh) = open_remote(&fs, "chmod").await;
    let change = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    fs.setattr(ino, change).await.unwrap();
    assert_eq!(read_all(fh).await, data, "after chmod");
    fs.release(fh).await.unwrap();

    let data = put_multipart(&store, "p/old", len).await;
    let (_, fh) = open_remote(&fs, "old").await;
    fs.rename(ROOT_INO, "old", ROOT_INO, "new", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(object(&store, "p/old").await, None);
    assert_eq!(read_all(fh).await, data, "after rename");
    fs.release(fh).await.unwrap();

    fs.mkdir(ROOT_INO, "d", DIR_MODE.into()).await.unwrap();
    let data = put_multipart(&store, "p/d/f", len).await;
    let d = fs.lookup(ROOT_INO, "d").await.unwrap().attr.ino;
    let f = fs.lookup(d, "f").await.unwrap().attr.ino;
    let fh = fs.open(f, OpenMode::default()).await.unwrap();
    fs.rename(ROOT_INO, "d", ROOT_INO, "e", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(object(&store, "p/d/f").await, None);
    assert_eq!(read_all(fh).await, data, "after a rename of its directory");
    fs.release(fh).await.unwrap();

    let data = put_multipart(&store, "p/gone", len).await;
    let (_, fh) = open_remote(&fs, "gone").await;
    fs.unlink(ROOT_INO, "gone").await.unwrap();
    assert_eq!(object(&store, "p/gone").await, None);
    assert_eq!(read_all(fh).await, data, "after unlink");
    fs.release(fh).await.unwrap();

    let data = put_multipart(&store, "p/target", len).await;
    let (_, fh) = open_remote(&fs, "target").await;
    fs.rename(ROOT_INO, "new", ROOT_INO, "target", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(read_all(fh).await, data, "after a rename over it");
    fs.release(fh).await.unwrap();
}

/// A shrunk failure of the model: `truncate(2)` by path of a file two handles read from S3
/// gave it local data, which became a clean copy once uploaded, and those handles went back to
/// their pinned (old, empty) version. Handles reading from S3 move onto the local data when the
/// mount makes some.
#[tokio::test(flavor = "multi_thread")]
async fn handles_reading_from_s3_see_a_truncate_after_its_upload() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), Duration::from_millis(10));
    let empty = Body::Bytes(Bytes::new());
    store
        .put("p/f", empty, &PutOptions::default())
        .await
        .unwrap();
    let (ino, first) = open_remote(&fs, "f").await;
    let second = fs.open(ino, OpenMode::default()).await.unwrap();
    let change = SetAttr {
        size: Some(1106),
        ..SetAttr::default()
    };
    fs.setattr(ino, change).await.unwrap();
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    assert_eq!(object(&store, "p/f").await.map(|b| b.len()), Some(1106));
    for fh in [first, second] {
        assert_eq!(fs.read(fh, 0, 2000).await.unwrap().len(), 1106);
        fs.release(fh).await.unwrap();
    }
}

/// A writer that grew a closed file was cut off by a crash: recovery takes the journaled size
/// and cuts the data file to it, so growing the file afterwards shows zeros, not the lost
/// writes.
#[tokio::test(flavor = "multi_thread")]
async fn growing_a_file_recovered_from_a_crash_shows_zeros_not_lost_writes() {
    let cache = tempfile::tempdir().unwrap();
    let (store, fs) = mount_for_test(cache.path(), Duration::from_secs(3600));
    let (entry, fh) = fs.create(ROOT_INO, "f", 0o644, libc::O_RDWR).await.unwrap();
    fs.write(fh, 0, b"closed").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let writing = OpenMode {
        write: true,
        ..OpenMode::default()
    };
    let fh = fs.open(entry.attr.ino, writing).await.unwrap();
    fs.write(fh, 6, b"lost").await.unwrap();
    drop(fs); // a crash with the writer open
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fs = Filesystem::new(store.clone(), PREFIX.into(), config(cache.path())).unwrap();
    let f = fs.lookup(ROOT_INO, "f").await.unwrap().attr;
    assert_eq!(f.size, 6, "the journaled size");
    let change = SetAttr {
        size: Some(10),
        ..SetAttr::default()
    };
    fs.setattr(f.ino, change).await.unwrap();
    let fh = fs.open(f.ino, OpenMode::default()).await.unwrap();
    assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"closed\0\0\0\0");
    fs.release(fh).await.unwrap();
}
