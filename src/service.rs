//! Telling a supervisor (systemd, `Type=notify`) and an operator (`bucketfs status`,
//! `bucketfs health`) how the daemon is doing.
//!
//! The operator's view is a text [`report`] the daemon serves as an extended attribute of the
//! mount's root (`user.bucketfs.status`, see `crate::fuse`): it needs no socket or state file,
//! reaches the daemon behind any mount point, and dies with it.
//!
//! Design of the supervisor side: the sd_notify protocol is one datagram per message on the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`), each datagram a
//! few `KEY=VALUE` lines. It is small enough to speak directly over
//! [`std::os::unix::net::UnixDatagram`] instead of pulling in a crate. Without `$NOTIFY_SOCKET`
//! (not under systemd) every call is a no-op, so the binary calls these unconditionally.
//!
//! What the daemon sends, in this order:
//! - `READY=1` with a first `STATUS=`, only once the mount answers (a `statfs` of the mount point
//!   reports the FUSE magic and a `stat` of its root succeeds);
//! - `STATUS=` while serving, whenever the dirty/upload summary changes (checked every second);
//! - `STOPPING=1` when SIGTERM, SIGINT or an outside unmount starts the drain, then `STATUS=`
//!   lines with the drain's progress, and a last `STATUS=` with the outcome.
//!
//! Failures to send are logged once at debug level and otherwise ignored: a supervisor that
//! stopped listening must never stop the mount.

use std::fmt::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use crate::fs::Filesystem;

/// The kernel's `statfs` magic of a FUSE filesystem (`FUSE_SUPER_MAGIC` in linux/magic.h).
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// How often the serving and draining summaries are refreshed (a summary visits every cached
/// file, so not much more often than a human reads `systemctl status`).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// The notification socket, if the supervisor gave one.
fn socket() -> Option<&'static (UnixDatagram, std::os::unix::net::SocketAddr)> {
    static SOCKET: OnceLock<Option<(UnixDatagram, std::os::unix::net::SocketAddr)>> =
        OnceLock::new();
    SOCKET
        .get_or_init(|| {
            let name = std::env::var_os("NOTIFY_SOCKET")?;
            match connect_addr(&name) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET is set but unusable, not notifying: {e}");
                    None
                }
            }
        })
        .as_ref()
}

fn connect_addr(
    name: &std::ffi::OsStr,
) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?,
        None if bytes.starts_with(b"/") => std::os::unix::net::SocketAddr::from_pathname(name)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "expected an absolute path or an @abstract name",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    // Never block the mount on a supervisor that does not read: a full queue drops a status.
    sock.set_nonblocking(true)?;
    Ok((sock, addr))
}

/// Send one notification (`KEY=VALUE` lines). No-op outside systemd.
pub fn notify(message: &str) {
    let Some((sock, addr)) = socket() else {
        return;
    };
    if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
        static WARNED: OnceLock<()> = OnceLock::new();
        if WARNED.set(()).is_ok() {
            tracing::debug!("sd_notify: {e}");
        }
    }
}

/// Whether a supervisor listens (`$NOTIFY_SOCKET` names a usable socket).
pub fn enabled() -> bool {
    socket().is_some()
}

/// `STATUS=` on a single line (newlines would start a new `KEY=VALUE` pair).
fn status_line(status: &str) -> String {
    format!("STATUS={}", status.replace('\n', " "))
}

pub fn status(status: &str) {
    notify(&status_line(status));
}

/// Wait (at most `timeout`) until `mountpoint` is a FUSE mount that answers; returns whether
/// it did.
pub async fn wait_until_answers(mountpoint: &Path, timeout: Duration) -> bool {
    let path = mountpoint.to_path_buf();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let probe = path.clone();
        // statfs/stat go through the kernel into our own FUSE session: off the runtime threads.
        let answers = tokio::task::spawn_blocking(move || mount_answers(&probe))
            .await
            .unwrap_or(false);
        if answers {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `mountpoint` is a FUSE filesystem and its root can be stat'ed.
pub fn mount_answers(mountpoint: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) into a zeroed struct we own, with a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type as i64 == FUSE_SUPER_MAGIC && std::fs::metadata(mountpoint).is_ok()
}

/// Run `probe` on its own thread and wait at most `timeout` for it: a hung FUSE daemon blocks
/// `statfs` and `getxattr` forever, and a healthcheck or status query must answer anyway.
fn within<T: Send + 'static>(
    timeout: Duration,
    probe: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(probe());
    });
    rx.recv_timeout(timeout).ok()
}

/// `bucketfs health`: whether the mount at `mountpoint` answers within `timeout`, as a one-line
/// verdict.
pub fn health(mountpoint: &Path, timeout: Duration) -> Result<String, String> {
    let path = mountpoint.to_path_buf();
    match within(timeout, move || mount_answers(&path)) {
        Some(true) => Ok(format!("{} answers", mountpoint.display())),
        Some(false) => Err(format!("{} is not a live FUSE mount", mountpoint.display())),
        None => Err(format!(
            "{} did not answer within {:?} (hung daemon?)",
            mountpoint.display(),
            timeout
        )),
    }
}

/// `bucketfs status`: the daemon's report when `path` is a bucketfs mount's root, or
/// `path: <state>` for a file inside one.
pub fn query_status(path: &Path, timeout: Duration) -> Result<String, String> {
    use crate::fuse::{STATE_XATTR, STATUS_XATTR};
    let owned = path.to_path_buf();
    let answer = within(timeout, move || match xattr::get(&owned, STATUS_XATTR) {
        Ok(Some(report)) => Ok((true, report)),
        Ok(None) => xattr::get(&owned, STATE_XATTR).map(|state| (false, state.unwrap_or_default())),
        Err(e) => Err(e),
    });
    let shown = path.display();
    match answer {
        None => Err(format!(
            "{shown} did not answer within {timeout:?} (hung daemon?)"
        )),
        Some(Ok((true, report))) => Ok(String::from_utf8_lossy(&report).into_owned()),
        Some(Ok((false, state))) if !state.is_empty() => {
            Ok(format!("{shown}: {}\n", String::from_utf8_lossy(&state)))
        }
        Some(Ok(_)) => Err(format!("{shown} is not in a bucketfs mount")),
        Some(Err(e)) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            Err(format!("{shown} is not in a bucketfs mount"))
        }
        Some(Err(e)) => Err(format!("{shown}: {e}")),
    }
}

/// The mount is live: `READY=1` and a first status.
pub fn ready(source: &str, mountpoint: &Path) {
    notify(&format!(
        "READY=1\n{}",
        status_line(&format!("serving {source} at {}", mountpoint.display()))
    ));
}

/// The drain started: `STOPPING=1` and what is left to upload.
pub fn stopping(fs: &Filesystem) {
    notify(&format!(
        "STOPPING=1\n{}",
        status_line(&format!("draining: {}", summary(fs)))
    ));
}

/// One line on what is not yet in the bucket and how uploads are going.
pub fn summary(fs: &Filesystem) -> String {
    let stats = fs.writeback().stats();
    let dirty = fs.cache().dirty_files();
    let bytes: u64 = dirty.iter().map(|f| f.size()).sum();
    format!(
        "{} dirty file{} ({}), {} queued or uploading, {} uploaded, {} failed attempt{}, {} conflict{}",
        dirty.len(),
        plural(dirty.len() as u64),
        human_bytes(bytes),
        stats.pending,
        stats.uploaded,
        stats.failed_attempts,
        plural(stats.failed_attempts),
        stats.conflicts,
        plural(stats.conflicts),
    )
}

/// Dirty files listed one by one in a status report; the rest are counted. Keeps the report
/// within an extended attribute's 64 KiB.
const REPORT_FILES: usize = 200;

/// The multi-line report of `bucketfs status` (served as the root's `user.bucketfs.status`):
/// the summary, cache use, then each file not yet in S3 with its state, failures first.
pub fn report(fs: &Filesystem) -> String {
    use crate::writeback::FileState;
    let mut out = String::new();
    let dirty = fs.cache().dirty_files();
    let cached = fs.cache().used_bytes();
    let _ = writeln!(out, "uploads: {}", summary(fs));
    if let Some(oldest) = dirty.iter().filter_map(|f| f.dirty_since()).min() {
        let _ = writeln!(
            out,
            "oldest change not in S3: {} ago",
            humantime::format_duration(Duration::from_secs(oldest.elapsed().as_secs()))
        );
    }
    let _ = writeln!(
        out,
        "cache: {} of {} used",
        human_bytes(cached),
        human_bytes(fs.cache().limits().max_bytes)
    );
    let mut files: Vec<(u8, String, String, u64)> = dirty
        .iter()
        .map(|f| {
            let state = fs.writeback().file_state(f);
            let rank = match state {
                FileState::Failed { .. } => 0,
                FileState::Uploading { .. } => 1,
                _ => 2,
            };
            (rank, f.key(), state.to_string(), f.size())
        })
        .collect();
    files.sort();
    if !files.is_empty() {
        let _ = writeln!(out, "not yet in S3 (key, size, state):");
    }
    for (_, key, state, size) in files.iter().take(REPORT_FILES) {
        let _ = writeln!(out, "  {key}  {}  {state}", human_bytes(*size));
    }
    if files.len() > REPORT_FILES {
        let _ = writeln!(out, "  … and {} more", files.len() - REPORT_FILES);
    }
    out
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// While the returned task runs, send `STATUS=<prefix><summary>` whenever the summary changes.
/// Abort the task to stop it. Does nothing outside systemd.
pub fn spawn_status_reporter(
    fs: Arc<Filesystem>,
    prefix: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled() {
            return;
        }
        let mut last = String::new();
        loop {
            tokio::time::sleep(STATUS_INTERVAL).await;
            let now = format!("{prefix}{}", summary(&fs));
            if now != last {
                status(&now);
                last = now;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(status_line("a\nb"), "STATUS=a b");
    }

    #[test]
    fn bytes_read_like_humans_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }

    #[test]
    fn socket_names() {
        assert!(connect_addr("@bucketfs-test".as_ref()).is_ok());
        assert!(connect_addr("/run/systemd/notify".as_ref()).is_ok());
        assert!(connect_addr("relative".as_ref()).is_err());
    }
}
