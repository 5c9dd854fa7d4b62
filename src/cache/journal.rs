//! The journal: one small JSON record per file whose data must still reach S3.
//!
//! A record exists exactly while its file is dirty: it names the key, the data file, the size
//! and mtime, and, during a multipart upload, the upload id and the parts already finished with
//! their ETags. Records are replaced atomically (write a temp file, fsync it, rename over the
//! old one), so after any crash a record is either the old or the new version, never torn. At
//! start the daemon re-queues every record; an upload id lets it resume the multipart upload
//! with ListParts and send only the missing parts.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bumped when the record format changes incompatibly.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// The object key the data goes to.
    pub key: String,
    /// The data file's id (its name under `data/`).
    pub id: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: u128,
    /// A multipart upload of exactly this data, when one is in progress.
    pub upload: Option<UploadRecord>,
    /// Mode, owner and explicit mtime to upload with the data (absent in older records).
    #[serde(default)]
    pub meta: crate::meta::PosixMeta,
    /// The version of the object this data replaces (absent in older records).
    #[serde(default)]
    pub base: Base,
    /// Byte ranges of a sparse data file not fetched yet: they are the base version's bytes
    /// (absent in older records: the data file is complete).
    #[serde(default)]
    pub missing: Vec<(u64, u64)>,
}

/// The S3 version a file's local data replaces: what a conditional upload checks, so that a
/// change another client made in between is never overwritten unseen (DESIGN.md §1.5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Base {
    /// Not known (a rename's target, an older record): upload unconditionally.
    #[default]
    Unknown,
    /// There was no object: create it only if there still is none (`If-None-Match: *`).
    Absent,
    /// This version, by ETag: replace it only if it is still the current one (`If-Match`).
    Version(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub upload_id: String,
    pub part_size: u64,
    /// Finished parts: (number, ETag).
    pub parts: Vec<(u32, String)>,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(dir: PathBuf) -> io::Result<Journal> {
        std::fs::create_dir_all(&dir)?;
        Ok(Journal { dir })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Replace the record of `record.id` atomically. With `durable`, the record is fsync'd
    /// before the rename (surviving power loss); without, it survives a daemon crash only.
    pub fn write(&self, record: &Record, durable: bool) -> io::Result<()> {
        let path = self.path(record.id);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(record).map_err(io::Error::other)?;
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        if durable {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn remove(&self, id: u64) -> io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The ids of every record file, readable or not.
    pub fn ids(&self) -> io::Result<std::collections::HashSet<u64>> {
        let mut ids = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse().ok())
            {
                ids.insert(id);
            }
        }
        Ok(ids)
    }

    /// Every readable record. Unreadable ones (a format from the future, a torn temp file) are
    /// reported and left in place for a human, never deleted.
    pub fn load(&self) -> io::Result<Vec<Record>> {
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                if path.extension().and_then(|e| e.to_str()) == Some("tmp") {
                    let _ = std::fs::remove_file(&path); // an interrupted replace: the old record stands
                }
                continue;
            }
            match read_record(&path) {
                Ok(r) if r.format == FORMAT => records.push(r),
                Ok(r) => {
                    tracing::error!(path = %path.display(), format = r.format, "journal record of an unknown format; left in place")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "unreadable journal record, left in place: {e}")
                }
            }
        }
        records.sort_by_key(|r| r.id);
        Ok(records)
    }
}

fn read_record(path: &Path) -> io::Result<Record> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path().join("journal")).unwrap();
        let mut r = Record {
            format: FORMAT,
            key: "owui/a b.pdf".into(),
            id: 7,
            size: 10,
            mtime_ns: 1,
            upload: None,
            meta: crate::meta::PosixMeta {
                mode: Some(libc::S_IFREG | 0o600),
                ..Default::default()
            },
            base: Base::Version("\"e0\"".into()),
            missing: vec![(8, 10)],
        };
        j.write(&r, true).unwrap();
        r.upload = Some(UploadRecord {
            upload_id: "u1".into(),
            part_size: 8 << 20,
            parts: vec![(1, "e1".into())],
        });
        j.write(&r, false).unwrap();
        std::fs::write(dir.path().join("journal/9.tmp"), b"{torn").unwrap();
        std::fs::write(dir.path().join("journal/8.json"), b"{torn").unwrap();
        let loaded = j.load().unwrap();
        assert_eq!(loaded, vec![r]);
        assert!(!dir.path().join("journal/9.tmp").exists());
        assert!(
            dir.path().join("journal/8.json").exists(),
            "unreadable records are kept"
        );
        j.remove(7).unwrap();
        j.remove(7).unwrap();
        assert!(j.load().unwrap().is_empty());
    }

    #[test]
    fn records_without_a_base_load_as_unknown() {
        let old = r#"{"format":1,"key":"k","id":3,"size":1,"mtime_ns":5,"upload":null}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(r.base, Base::Unknown);
    }
}
