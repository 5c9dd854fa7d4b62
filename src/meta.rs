//! POSIX attributes kept in object metadata, compatible with s3fs.
//!
//! S3 has no mode, owner or modification time of its own (LastModified is the upload time), so
//! chmod, chown and utimens are stored as user metadata under the names s3fs uses, and the two
//! tools read each other's objects:
//!
//! | header              | value                                                    |
//! | ------------------- | -------------------------------------------------------- |
//! | `x-amz-meta-mode`   | the full `st_mode` in decimal, file type bits included    |
//! | `x-amz-meta-uid`    | decimal                                                  |
//! | `x-amz-meta-gid`    | decimal                                                  |
//! | `x-amz-meta-mtime`  | seconds since the epoch, `SECS` or `SECS.NANOS`           |
//!
//! Only what was set is stored, plus the mtime of every upload but a streamed one (the time of
//! the last write it holds, so the file shows the same mtime before and after it leaves the
//! cache): an object another S3 tool wrote carries none of them, shows the mount's defaults,
//! and LastModified as its mtime. A write clears a stored mtime set by `utimens` (the file
//! changed now). A symlink is an object whose body is the target and whose mode has the
//! `S_IFLNK` type bits, as in s3fs.
//!
//! Values that do not parse are ignored (the defaults apply), never an error: metadata is
//! written by other tools too.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::store::Metadata;

pub const MODE: &str = "mode";
pub const UID: &str = "uid";
pub const GID: &str = "gid";
pub const MTIME: &str = "mtime";

/// The file type bits of `st_mode`.
const S_IFMT: u32 = libc::S_IFMT;

/// The POSIX attributes an object carries (each `None` when not stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixMeta {
    /// The full `st_mode`, or only permission bits when the writer stored no type bits.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
}

impl PosixMeta {
    /// The attributes in `metadata` (names in lower case, without `x-amz-meta-`).
    pub fn from_metadata(metadata: &Metadata) -> PosixMeta {
        let number = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        PosixMeta {
            mode: number(MODE),
            uid: number(UID),
            gid: number(GID),
            mtime: metadata.get(MTIME).and_then(|v| parse_time(v)),
        }
    }

    /// `metadata` with these attributes set (and those not set removed).
    pub fn apply_to(&self, metadata: &mut Metadata) {
        let mut set = |name: &str, value: Option<String>| match value {
            Some(v) => {
                metadata.insert(name.to_string(), v);
            }
            None => {
                metadata.remove(name);
            }
        };
        set(MODE, self.mode.map(|m| m.to_string()));
        set(UID, self.uid.map(|u| u.to_string()));
        set(GID, self.gid.map(|g| g.to_string()));
        set(MTIME, self.mtime.map(format_time));
    }

    pub fn to_metadata(&self) -> Metadata {
        let mut metadata = Metadata::new();
        self.apply_to(&mut metadata);
        metadata
    }

    /// The permission bits, if stored.
    pub fn perm(&self) -> Option<u16> {
        self.mode.map(|m| (m & 0o7777) as u16)
    }

    /// Whether the stored mode says symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.mode.is_some_and(|m| m & S_IFMT == libc::S_IFLNK)
    }

    /// Set the permission bits, keeping (or setting) the type bits `kind_bits`.
    pub fn set_perm(&mut self, perm: u32, kind_bits: u32) {
        let kind = self.mode.map(|m| m & S_IFMT).filter(|k| *k != 0);
        self.mode = Some(kind.unwrap_or(kind_bits) | (perm & 0o7777));
    }
}

fn parse_time(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: u64 = secs.parse().ok()?;
    // Up to nine digits of fraction are nanoseconds (rclone writes a float, s3fs whole seconds).
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn format_time(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    match d.subsec_nanos() {
        0 => d.as_secs().to_string(),
        n => format!("{}.{n:09}", d.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_metadata() {
        let meta = PosixMeta {
            mode: Some(libc::S_IFREG | 0o755),
            uid: Some(1000),
            gid: Some(100),
            mtime: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
        };
        let md = meta.to_metadata();
        assert_eq!(
            md.get("mode").unwrap(),
            "33261",
            "s3fs writes st_mode in decimal"
        );
        assert_eq!(md.get("mtime").unwrap(), "1700000000.000000005");
        assert_eq!(PosixMeta::from_metadata(&md), meta);
    }

    #[test]
    fn reads_what_s3fs_and_rclone_write() {
        let md: Metadata = [
            ("mode".to_string(), "41471".to_string()), // S_IFLNK | 0777
            ("mtime".to_string(), "1600000000".to_string()),
            ("uid".to_string(), "junk".to_string()),
        ]
        .into();
        let meta = PosixMeta::from_metadata(&md);
        assert!(meta.is_symlink());
        assert_eq!(meta.perm(), Some(0o777));
        assert_eq!(meta.uid, None, "unparsable values are ignored");
        assert_eq!(
            meta.mtime,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        );
        let rclone = parse_time("1600000000.5").unwrap();
        assert_eq!(
            rclone,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_600_000_000_500)
        );
    }

    #[test]
    fn unset_fields_are_removed_and_other_metadata_kept() {
        let mut md: Metadata = [
            ("mode".to_string(), "33188".to_string()),
            ("other".to_string(), "x".to_string()),
        ]
        .into();
        PosixMeta::default().apply_to(&mut md);
        assert_eq!(md.len(), 1);
        assert_eq!(md.get("other").unwrap(), "x");
    }

    #[test]
    fn set_perm_keeps_the_type_bits() {
        let mut m = PosixMeta::default();
        m.set_perm(0o600, libc::S_IFREG);
        assert_eq!(m.mode, Some(libc::S_IFREG | 0o600));
        let mut link = PosixMeta {
            mode: Some(libc::S_IFLNK | 0o777),
            ..Default::default()
        };
        link.set_perm(0o700, libc::S_IFREG);
        assert_eq!(link.mode, Some(libc::S_IFLNK | 0o700));
    }
}
