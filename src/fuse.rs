//! The FUSE adapter: `fuser::Filesystem` onto the core.
//!
//! Thin by design (DESIGN.md §3): each handler copies what it needs out of the request, opens one
//! tracing span (`op`, `req`, `ino`, `fh`, `pid`…), spawns the core operation onto the tokio
//! runtime under a semaphore (so a slow S3 call never blocks the FUSE threads or unrelated
//! operations), and replies from the task. A reply dropped without an answer becomes `EIO` in
//! fuser, never a hang. Nothing below this module sees a fuser type.

use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::{FsError, FsResult};
use crate::fs::{Attr, FileKind, Filesystem, OpenMode, ROOT_INO, RenameFlags, SetAttr};

/// Largest write the kernel sends in one request (fewer, larger requests for streaming writers).
pub const MAX_WRITE: u32 = 1 << 20;
/// Kernel read-ahead per file: large, so sequential readers send big requests.
pub const MAX_READAHEAD: u32 = 1 << 20;
/// Extended attribute of any file or symlink: where it stands on its way to S3 (`clean
/// <etag>`, `dirty`, `uploading n/m`, `failed: <reason> …`).
pub const STATE_XATTR: &str = "user.bucketfs.state";
/// Extended attribute of the mount's root: the daemon's status report (`bucketfs status`).
/// Neither is listed by `listxattr`, so tools that copy attributes (`cp -a`, `rsync -X`) do not
/// copy them out of the mount.
pub const STATUS_XATTR: &str = "user.bucketfs.status";

/// Core operations in flight at once; beyond this, requests wait (back-pressure on the kernel
/// queue rather than unbounded tasks and memory).
pub const MAX_IN_FLIGHT: usize = 64;

pub struct FuseAdapter {
    fs: Arc<Filesystem>,
    runtime: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Filesystem>, runtime: tokio::runtime::Handle) -> FuseAdapter {
        FuseAdapter {
            fs,
            runtime,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Run `op` on the runtime inside its span, then hand its result to `reply`; the time
    /// from here to the reply is the operation's latency.
    fn spawn<T, F>(
        &self,
        Op { name, span }: Op,
        op: impl FnOnce(Arc<Filesystem>) -> F,
        reply: impl FnOnce(FsResult<T>) + Send + 'static,
    ) where
        F: Future<Output = FsResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let start = Instant::now();
        let fut = op(self.fs.clone());
        let permits = self.permits.clone();
        self.runtime.spawn(
            async move {
                let _permit = permits.acquire_owned().await;
                let result = fut.await;
                if let Err(e) = &result {
                    log_error(e);
                }
                reply(result);
                record_latency(name, start);
            }
            .instrument(span),
        );
    }
}

/// An operation's name (the `op` label of its latency) and tracing span.
struct Op {
    name: &'static str,
    span: tracing::Span,
}

fn record_latency(op: &'static str, start: Instant) {
    metrics::histogram!(crate::metrics::names::FUSE_OP_SECONDS, "op" => op)
        .record(start.elapsed().as_secs_f64());
}

fn log_error(e: &FsError) {
    match e.level() {
        tracing::Level::ERROR => tracing::error!("{e}"),
        tracing::Level::WARN => tracing::warn!("{e}"),
        _ => tracing::debug!("{e}"),
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno_value())
}

/// Names are object keys, which are UTF-8: other byte strings cannot be stored.
fn utf8(name: &OsStr) -> FsResult<String> {
    name.to_str()
        .map(str::to_string)
        .ok_or_else(|| FsError::errno(libc::EINVAL))
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: if a.kind == FileKind::Directory { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

macro_rules! span {
    ($op:literal, $req:expr $(, $field:ident = $value:expr)*) => {
        Op {
            name: $op,
            span: tracing::debug_span!("fuse", op = $op, req = $req.unique().0, pid = $req.pid() $(, $field = $value)*),
        }
    };
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel may cap both values; what it cannot take it reports back, which is fine.
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        // Attributes with directory entries: `ls -l` then needs no LOOKUP per entry. AUTO lets
        // the kernel use it only when entries are looked up after a listing.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = utf8(name);
        let negative_ttl = self.fs.config().metadata_ttl;
        self.spawn(
            span!("lookup", req, ino = parent.0),
            |fs| async move { fs.lookup(parent.0, &name?).await },
            move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                // A negative entry (inode 0): the kernel remembers the miss for the TTL, which
                // saves a second lookup on every `open(O_CREAT)` of a new name.
                Err(e) if e.errno_value() == libc::ENOENT => {
                    let mut attr = file_attr(&Attr {
                        ino: 0,
                        kind: FileKind::File,
                        size: 0,
                        mtime: SystemTime::UNIX_EPOCH,
                        perm: 0,
                        uid: 0,
                        gid: 0,
                    });
                    attr.ino = INodeNo(0);
                    reply.entry(&negative_ttl, &attr, Generation(0))
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.fs.config().metadata_ttl;
        self.spawn(
            span!("getattr", req, ino = ino.0),
            |fs| async move { fs.getattr(ino.0).await },
            move |r| match r {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.fs.config().metadata_ttl;
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(time),
            fh: fh.map(|f| f.0),
        };
        self.spawn(
            span!("setattr", req, ino = ino.0, size = size),
            |fs| async move { fs.setattr(ino.0, change).await },
            move |r| match r {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = utf8(name);
        self.spawn(
            span!("mkdir", req, ino = parent.0),
            |fs| async move { fs.mkdir(parent.0, &name?, mode & !umask).await },
            move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let names = utf8(link_name).and_then(|n| Ok((n, utf8(target.as_os_str())?)));
        self.spawn(
            span!("symlink", req, ino = parent.0),
            |fs| async move {
                let (name, target) = names?;
                fs.symlink(parent.0, &name, &target).await
            },
            move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(
            span!("readlink", req, ino = ino.0),
            |fs| async move { fs.readlink(ino.0).await },
            move |r| match r {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    /// Hard links: an object has one key, so there is no second name for it (documented).
    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = utf8(name);
        self.spawn(
            span!("unlink", req, ino = parent.0),
            |fs| async move { fs.unlink(parent.0, &name?).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = utf8(name);
        self.spawn(
            span!("rmdir", req, ino = parent.0),
            |fs| async move { fs.rmdir(parent.0, &name?).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let names = utf8(name).and_then(|a| Ok((a, utf8(newname)?)));
        let flags = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        self.spawn(
            span!("rename", req, ino = parent.0),
            |fs| async move {
                let (name, newname) = names?;
                fs.rename(parent.0, &name, newparent.0, &newname, flags)
                    .await
            },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = OpenMode::from_flags(flags.0);
        self.spawn(
            span!("open", req, ino = ino.0),
            |fs| async move { fs.open_keeping_cache(ino.0, mode).await },
            move |r| match r {
                Ok((fh, true)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
                Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(
            span!(
                "read",
                req,
                ino = ino.0,
                fh = fh.0,
                offset = offset,
                size = size
            ),
            |fs| async move { fs.read(fh.0, offset, size).await },
            move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn(
            span!(
                "write",
                req,
                ino = ino.0,
                fh = fh.0,
                offset = offset,
                size = data.len()
            ),
            |fs| async move { fs.write(fh.0, offset, &data).await },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            span!("flush", req, ino = ino.0, fh = fh.0),
            |fs| async move { fs.flush(fh.0).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            span!("release", req, ino = ino.0, fh = fh.0),
            |fs| async move { fs.release(fh.0).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(
            span!("fsync", req, ino = ino.0, fh = fh.0),
            |fs| async move { fs.fsync(fh.0).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(
            span!("opendir", req, ino = ino.0),
            |fs| async move { fs.opendir(ino.0).await },
            move |r| match r {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // A chunk already listed is answered at once; past it, the next LIST page is fetched.
        self.spawn(
            span!("readdir", req, ino = ino.0, fh = fh.0, offset = offset),
            |fs| async move { fs.readdir(fh.0, offset).await },
            move |r| match r {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let fs = self.fs.clone();
        self.spawn(
            span!("readdirplus", req, ino = ino.0, fh = fh.0, offset = offset),
            |fs| async move { fs.readdir(fh.0, offset).await },
            move |r| match r {
                Ok(entries) => {
                    fs.readdir_plus(ino.0, &entries, |e, entry| {
                        reply.add(
                            INodeNo(e.ino),
                            e.offset,
                            &e.name,
                            &entry.ttl,
                            &file_attr(&entry.attr),
                            Generation(0),
                        )
                    });
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes (mkdir, rmdir, rename, unlink) reach S3 before they return.
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Answered inline (both values come from memory): the kernel asks for
        // `security.capability` before writes, and that answer must be quick.
        let value = match name.to_str() {
            Some(STATE_XATTR) => self.fs.upload_state(ino.0),
            Some(STATUS_XATTR) if ino.0 == ROOT_INO => Ok(crate::service::report(&self.fs)),
            _ => Err(FsError::errno(libc::ENODATA)),
        };
        match value {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(v.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = utf8(name);
        self.spawn(
            span!("create", req, ino = parent.0),
            |fs| async move { fs.create(parent.0, &name?, mode & !umask, flags).await },
            move |r| match r {
                Ok((e, fh)) => reply.created(
                    &e.ttl,
                    &file_attr(&e.attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno(e)),
            },
        );
    }
}
