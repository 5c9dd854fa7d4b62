//! Real mounts for integration tests: the `bucketfs` binary in its own process, over a real S3
//! server (or a `file://` store), with a guard that always unmounts.
//!
//! [`Mount`] starts `bucketfs mount` in the foreground, waits until the mount point shows up in
//! `/proc/self/mountinfo`, and on drop sends SIGTERM, waits, and finally runs `umount -l` so a
//! failing test never leaves a dead mount behind for the rest of the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::s3::{self, Server};

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping daemon may take to flush and exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bucketfs")
}

/// A `bucketfs mount` command with a clean environment: no ambient `AWS_*` or `S3_*` variable
/// reaches the daemon unless the test sets it.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("AWS_") || name.starts_with("S3_") || name.starts_with("BUCKETFS_") {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd.env("RUST_BACKTRACE", "1");
    cmd
}

/// Arguments and environment that point a daemon at `bucket` on `server`.
pub fn s3_command(server: Server, bucket: &str, prefix: &str) -> Command {
    let mut cmd = command();
    cmd.arg("mount")
        .arg(format!("s3://{bucket}/{prefix}"))
        .args(["--endpoint-url", &s3::endpoint(server)])
        .args(["--region", s3::REGION, "--addressing-style", "path"])
        .env("S3_ACCESS_KEY_ID", s3::access_key(server))
        .env("S3_SECRET_ACCESS_KEY", s3::secret_key(server));
    cmd
}

pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_ref()))
}

pub struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
    _dirs: tempfile::TempDir,
}

impl Mount {
    /// Mount `bucket/prefix` of `server`, with `extra` flags.
    pub fn s3(server: Server, bucket: &str, prefix: &str, extra: &[&str]) -> Mount {
        let mut cmd = s3_command(server, bucket, prefix);
        cmd.args(extra);
        Mount::start(cmd)
    }

    /// Mount a local directory store.
    pub fn dir(store: &Path, extra: &[&str]) -> Mount {
        let mut cmd = command();
        cmd.arg("mount")
            .arg(format!("file://{}", store.display()))
            .args(extra);
        Mount::start(cmd)
    }

    /// Start `cmd` (a `bucketfs mount SOURCE` without the mount point) and wait for the mount.
    pub fn start(cmd: Command) -> Mount {
        let dirs = tempfile::tempdir().expect("tempdir");
        let cache = dirs.path().join("cache");
        Mount::start_in(cmd, dirs, &cache)
    }

    /// Mount `bucket/prefix` of `server` with the cache directory `cache` (which outlives the
    /// mount: a later mount on the same cache resumes what this one left).
    pub fn s3_with_cache(
        server: Server,
        bucket: &str,
        prefix: &str,
        extra: &[&str],
        cache: &Path,
    ) -> Mount {
        let mut cmd = s3_command(server, bucket, prefix);
        cmd.args(extra);
        Mount::start_in(cmd, tempfile::tempdir().expect("tempdir"), cache)
    }

    fn start_in(mut cmd: Command, dirs: tempfile::TempDir, cache: &Path) -> Mount {
        let mountpoint = dirs.path().join("mnt");
        let log = dirs.path().join("bucketfs.log");
        std::fs::create_dir_all(&mountpoint).expect("mkdir mountpoint");
        let log_file = std::fs::File::create(&log).expect("log file");
        cmd.arg(&mountpoint).arg("--cache-dir").arg(cache);
        // Debug logs of our own code, unless the test chose a level through BUCKETFS_LOG.
        if !cmd
            .get_envs()
            .any(|(k, v)| k == "BUCKETFS_LOG" && v.is_some())
        {
            cmd.args(["--log-level", "bucketfs=debug,info"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file);
        let child = cmd.spawn().expect("spawn bucketfs");
        let mut mount = Mount {
            child: Some(child),
            mountpoint,
            log,
            _dirs: dirs,
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&mount.mountpoint) {
            if let Some(status) = mount
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "bucketfs exited with {status} before mounting:\n{}",
                    mount.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("no mount after {MOUNT_TIMEOUT:?}:\n{}", mount.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        mount
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGTERM the daemon and wait for it; returns its exit status.
    pub fn stop(mut self) -> ExitStatus {
        let status = self.terminate().expect("daemon already stopped");
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after the daemon exited ({status}):\n{}",
            self.log_text()
        );
        status
    }

    /// [`Mount::stop`], also returning the daemon's whole log (which goes with the guard).
    pub fn stop_with_log(mut self) -> (ExitStatus, String) {
        let status = self.terminate().expect("daemon already stopped");
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after the daemon exited ({status})"
        );
        (status, self.log_text())
    }

    /// SIGKILL the daemon (a crash) and clear the dead mount it leaves.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.terminate();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}
