//! Plain domain types the core speaks in (the FUSE adapter converts them to fuser's).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::cache::CacheLimits;

pub type Ino = u64;
/// The kernel's fixed inode number for the mount's root.
pub const ROOT_INO: Ino = 1;
/// Longest file name the mount accepts (as ext4): longer names get `ENAMETOOLONG`, which Open
/// WebUI relies on to fall back to shorter names.
pub const NAME_MAX: usize = 255;

/// Settings of the filesystem core.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub read_only: bool,
    /// How long attributes and directory entries from S3 are trusted.
    pub metadata_ttl: Duration,
    /// Multipart part size; objects at least this big are uploaded in parts.
    pub part_size: u64,
    /// Parts of one upload in flight at once.
    pub upload_concurrency: usize,
    /// Quiet time after a close before the file is uploaded (rewrites within it coalesce).
    pub writeback_delay: Duration,
    /// Files uploading at once.
    pub max_uploads: usize,
    /// Largest directory (objects at any depth) that `rename` moves; above it, EXDEV.
    pub max_rename_objects: usize,
    /// Trust listings for attributes: `opendir` does not HEAD its entries for their stored
    /// mode, owner and mtime (they show the defaults until a later HEAD reads them).
    pub listing_attributes: bool,
    /// This mount's cache directory.
    pub cache_dir: PathBuf,
    /// The cache's byte budget and back-pressure timeout.
    pub cache_limits: CacheLimits,
    /// Uploads carry `If-None-Match`/`If-Match` so another client's change is never
    /// overwritten unseen (off for servers that do not support conditional writes).
    pub conditional_writes: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            read_only: false,
            metadata_ttl: Duration::from_secs(1),
            part_size: 8 << 20,
            upload_concurrency: 4,
            writeback_delay: Duration::from_secs(1),
            max_uploads: 8,
            max_rename_objects: 10_000,
            listing_attributes: false,
            cache_dir: std::env::temp_dir().join("bucketfs-cache"),
            cache_limits: CacheLimits::default(),
            conditional_writes: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    /// Shown for a file object whose stored mode says symbolic link (in the inode table it is
    /// a `File`: an object like any other).
    Symlink,
}

/// What `stat` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// A looked-up entry and how long the kernel may cache it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: Attr,
    pub ttl: Duration,
}

/// One directory entry; `offset` is the cookie that resumes the listing after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: FileKind,
    pub name: String,
    pub offset: u64,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
}

impl OpenMode {
    /// From `open(2)` flags.
    pub fn from_flags(flags: i32) -> OpenMode {
        let acc = flags & libc::O_ACCMODE;
        OpenMode {
            write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            truncate: flags & libc::O_TRUNC != 0,
            append: flags & libc::O_APPEND != 0,
        }
    }
}

/// The changes of a `setattr` call; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    /// The handle the change came through (`ftruncate`), if any.
    pub fh: Option<u64>,
}

/// `rename(2)` flags the core honours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// What `statfs` reports. S3 has no capacity: report a large, mostly free filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}
