//! The filesystem's error type and the one place where failures become errno values.
//!
//! Every core operation returns [`FsError`]: an errno for the kernel, a log level (a missing file
//! is routine and logs at `debug`; an S3 failure behind an `EIO` logs at `warn`), and the source
//! error for the log line. Lower layers keep their own semantic enums (`StoreError`,
//! `std::io::Error`); the `From` impls below are the only mapping onto errno.

use std::fmt;

use tracing::Level;

use crate::store::StoreError;

pub type FsResult<T> = Result<T, FsError>;

pub struct FsError {
    errno: i32,
    level: Level,
    message: String,
}

impl FsError {
    /// A routine errno (`ENOENT`, `EEXIST`, `ENOTEMPTY`…): logged at `debug`.
    pub fn errno(errno: i32) -> Self {
        FsError {
            errno,
            level: Level::DEBUG,
            message: errno_name(errno).to_string(),
        }
    }

    /// An errno with an explanation worth a `warn` line.
    pub fn with_message(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            level: Level::WARN,
            message: message.into(),
        }
    }

    pub fn not_found() -> Self {
        Self::errno(libc::ENOENT)
    }

    pub fn errno_value(&self) -> i32 {
        self.errno
    }

    pub fn level(&self) -> Level {
        self.level
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, errno_name(self.errno))
    }
}

impl fmt::Debug for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for FsError {}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        let errno = match &e {
            StoreError::NotFound(_) => return FsError::not_found(),
            // The object changed under an open file (If-Match failed): the handle is stale.
            StoreError::PreconditionFailed(_) => libc::ESTALE,
            StoreError::PermissionDenied(_) => libc::EACCES,
            StoreError::Invalid(_) => libc::EINVAL,
            StoreError::NoSuchBucket(_)
            | StoreError::Throttled(_)
            | StoreError::Transient(_)
            | StoreError::Other(_) => libc::EIO,
        };
        FsError::with_message(errno, e.to_string())
    }
}

impl From<crate::cache::FillError> for FsError {
    fn from(e: crate::cache::FillError) -> Self {
        match e {
            crate::cache::FillError::Store(e) => e.into(),
            crate::cache::FillError::Io(e) => e.into(),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        FsError::with_message(errno, format!("local cache I/O: {e}"))
    }
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        libc::EBADF => "EBADF",
        libc::ESTALE => "ESTALE",
        libc::EROFS => "EROFS",
        libc::ENOSPC => "ENOSPC",
        libc::EXDEV => "EXDEV",
        libc::ENOSYS => "ENOSYS",
        libc::EFBIG => "EFBIG",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_errno() {
        assert_eq!(
            FsError::from(StoreError::NotFound("k".into())).errno_value(),
            libc::ENOENT
        );
        assert_eq!(
            FsError::from(StoreError::NotFound("k".into())).level(),
            Level::DEBUG
        );
        assert_eq!(
            FsError::from(StoreError::PreconditionFailed("k".into())).errno_value(),
            libc::ESTALE
        );
        assert_eq!(
            FsError::from(StoreError::Transient("x".into())).errno_value(),
            libc::EIO
        );
        assert_eq!(
            FsError::from(StoreError::PermissionDenied("x".into())).errno_value(),
            libc::EACCES
        );
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(FsError::from(e).errno_value(), libc::ENOSPC);
    }
}
