//! Operations: each deployment recipe of `docs/OPERATIONS.md`, exercised on this machine as far
//! as it allows — the systemd unit (`systemd-analyze verify`, a fake `NOTIFY_SOCKET`), the fstab
//! helper run the way mount(8) runs it (and through mount(8) itself), the Docker files (lint and
//! the entrypoint's behaviour without a Docker engine), and the logs (no secret ever printed).
//!
//! Tests that mount use `common::mount::Mount` (SIGTERM then `umount -l` on drop) or, where
//! mount(8) starts the daemon, `Unmount`, which runs `umount -l` on drop.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::{self, Mount};
use common::proxy::FaultProxy;
use common::s3::{self, Server};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Poll `cond` every 50 ms for up to `timeout`.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

// ---- systemd ----------------------------------------------------------------------------------

/// The unit's `KEY=VALUE` lines (comments and sections dropped).
fn unit_directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("systemd/bucketfs@.service");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit_here = unit.replace("/usr/local/bin/bucketfs", mount::bin());
    std::fs::write(dir.path().join("bucketfs@.service"), unit_here).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("bucketfs@owui.service"))
        .output()
        .expect("systemd-analyze (package systemd; scripts/test.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("bucketfs@"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_unit_has_the_directives_a_safe_fuse_service_needs() {
    let unit = read("systemd/bucketfs@.service");
    let d = unit_directives(&unit);
    let get = |k: &str| {
        d.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("EnvironmentFile"), ["/etc/bucketfs/%i.env"]);
    assert_eq!(get("Restart"), ["on-failure"]);
    assert!(get("DeviceAllow").contains(&"/dev/fuse rw"));
    assert!(get("CapabilityBoundingSet")[0].contains("CAP_SYS_ADMIN"));
    // Longer than the default drain timeout (5 min), so a drain is never SIGKILLed.
    let stop = get("TimeoutStopSec")[0];
    let stop = humantime::parse_duration(stop).unwrap();
    assert!(
        stop > Duration::from_secs(5 * 60),
        "TimeoutStopSec={stop:?}"
    );
    // Each of these gives the service its own mount namespace: the FUSE mount would be
    // invisible to the host.
    for private in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "MountFlags",
    ] {
        assert!(get(private).is_empty(), "{private}= would hide the mount");
    }
    // The example env file uses Open WebUI's names.
    let env = read("systemd/example.env");
    for name in [
        "S3_BUCKET_NAME",
        "S3_KEY_PREFIX",
        "S3_ENDPOINT_URL",
        "S3_REGION_NAME",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
        "S3_ADDRESSING_STYLE",
        "BUCKETFS_MOUNTPOINT",
    ] {
        assert!(
            env.contains(&format!("\n{name}=")),
            "example.env lacks {name}"
        );
    }
}

/// A fake systemd: collects every datagram sent to the socket, with when it arrived.
struct FakeNotify {
    messages: Arc<Mutex<Vec<String>>>,
}

impl FakeNotify {
    fn bind(sock: UnixDatagram) -> FakeNotify {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Stops when the test (and so the Arc's other owner) is gone.
            while Arc::strong_count(&sink) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push(text);
                }
            }
        });
        FakeNotify { messages }
    }

    fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    fn wait(&self, what: &str, timeout: Duration) -> bool {
        wait_for(timeout, || self.all().iter().any(|m| m.contains(what)))
    }
}

/// Mount a fresh `file://` store with `NOTIFY_SOCKET=socket_name`, write three files (dirty: the
/// write-back delay is an hour), stop with SIGTERM, and check the notifications' order.
fn notifications_in_order(socket_name: &str, notify: FakeNotify) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut cmd = mount::command();
    cmd.arg("mount")
        .arg(format!("file://{}", store.display()))
        .args(["--writeback-delay", "1h"])
        .env("NOTIFY_SOCKET", socket_name);
    let m = Mount::start(cmd);
    assert!(
        notify.wait("READY=1", Duration::from_secs(10)),
        "no READY=1: {:?}\n{}",
        notify.all(),
        m.log_text()
    );
    // READY means the mount answers (FUSE magic from statfs, root stat'able).
    assert!(bucketfs::service::mount_answers(m.path()));
    for i in 0..3 {
        std::fs::write(m.join(&format!("f{i}")), vec![b'x'; 1000]).unwrap();
    }
    assert!(
        notify.wait("STATUS=serving: 3 dirty files", Duration::from_secs(10)),
        "no status with the dirty files: {:?}",
        notify.all()
    );
    let status = m.stop();
    assert!(status.success(), "exit {status}");
    assert!(notify.wait("STATUS=drained", Duration::from_secs(5)));
    let all = notify.all();
    let at = |what: &str| {
        all.iter()
            .position(|m| m.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} in {all:?}"))
    };
    let ready = at("READY=1");
    let serving = at("STATUS=serving: 3 dirty files");
    let stopping = at("STOPPING=1");
    let drained = at("STATUS=drained");
    assert!(
        ready < serving && serving < stopping && stopping < drained,
        "out of order: {all:?}"
    );
    // STOPPING=1 carries what the drain has left to upload.
    assert!(
        all[stopping].contains("STATUS=draining: 3 dirty files"),
        "{all:?}"
    );
    assert_eq!(
        all.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{all:?}"
    );
}

#[test]
fn notify_socket_gets_ready_status_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notify = FakeNotify::bind(UnixDatagram::bind(&path).unwrap());
    notifications_in_order(path.to_str().unwrap(), notify);
}

#[test]
fn notify_socket_with_an_abstract_name_works() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("bucketfs-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let notify = FakeNotify::bind(UnixDatagram::bind_addr(&addr).unwrap());
    notifications_in_order(&format!("@{name}"), notify);
}

// ---- fstab: the mount(8) helper ---------------------------------------------------------------

/// Runs `umount -l` on drop: for mounts whose daemon mount(8) started, not a `Mount`.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if mount::is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A scratch layout for a helper-started mount: a `file://` store, a mount point, a cache, an
/// env file and the log file the daemon's stderr goes to.
struct HelperDirs {
    dir: tempfile::TempDir,
}

impl HelperDirs {
    fn new() -> HelperDirs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        // The env file holds what must not be in fstab; the secret here only has to stay out
        // of every log.
        std::fs::write(
            dir.path().join("x.env"),
            "# as /etc/bucketfs/x.env\nBUCKETFS_WRITEBACK_DELAY=50ms\nS3_SECRET_ACCESS_KEY=helper-secret-value-1234\n",
        )
        .unwrap();
        HelperDirs { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn source(&self) -> String {
        format!("file://{}", self.path("store").display())
    }
    fn options(&self) -> String {
        format!(
            "rw,_netdev,nofail,allow_other,cache_dir={},env_file={},metadata_ttl=1s,x-systemd.automount",
            self.path("cache").display(),
            self.path("x.env").display()
        )
    }
    fn log(&self) -> std::fs::File {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap()
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// Write a file through the mount, unmount with umount(8), and check the object reached
    /// the store once the daemon exits.
    fn write_unmount_and_check(&self, mnt: &Path) {
        std::fs::write(mnt.join("hello.txt"), b"through fstab").unwrap();
        let status = Command::new("umount").arg(mnt).status().unwrap();
        assert!(status.success(), "umount failed");
        // The daemon drains, then releases the store's lock: open it and look.
        let store = self.path("store");
        let opened = wait_for(Duration::from_secs(30), || {
            bucketfs::store::DirStore::open(&store).is_ok()
        });
        assert!(opened, "the daemon never exited:\n{}", self.log_text());
        let store = bucketfs::store::DirStore::open(&store).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let got = rt
            .block_on(bucketfs::store::ObjectStore::get_range(
                &store,
                "hello.txt",
                0..1024,
                None,
            ))
            .unwrap();
        assert_eq!(&got[..], b"through fstab");
        assert!(!self.log_text().contains("helper-secret-value-1234"));
    }
}

#[test]
fn mount_helper_run_as_mount_8_runs_it_mounts_and_returns() {
    let d = HelperDirs::new();
    let helper = d.path("mount.fuse.bucketfs");
    std::os::unix::fs::symlink(mount::bin(), &helper).unwrap();
    let mnt = d.path("mnt");
    let _guard = Unmount(mnt.clone());
    // util-linux: /sbin/mount.<type> SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE].
    let started = Instant::now();
    let status = Command::new(&helper)
        .arg(d.source())
        .arg(&mnt)
        .args(["-n", "-o", &d.options(), "-t", "fuse.bucketfs"])
        .stdin(Stdio::null())
        .stdout(d.log())
        .stderr(d.log())
        .status()
        .unwrap();
    assert!(status.success(), "helper: {status}\n{}", d.log_text());
    assert!(
        mount::is_mounted(&mnt),
        "returned before mounting:\n{}",
        d.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    d.write_unmount_and_check(&mnt);
}

#[test]
fn mount_helper_refuses_secrets_and_unknown_options_and_fakes_with_f() {
    let d = HelperDirs::new();
    let helper = d.path("mount.bucketfs");
    std::os::unix::fs::symlink(mount::bin(), &helper).unwrap();
    let mnt = d.path("mnt");
    let _guard = Unmount(mnt.clone());
    let run = |opts: &str, extra: &[&str]| {
        Command::new(&helper)
            .arg(d.source())
            .arg(&mnt)
            .args(extra)
            .args(["-o", opts])
            .output()
            .unwrap()
    };
    let out = run("allow_other,secret_access_key=hunter2", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("env_file") && !err.contains("hunter2"),
        "{err}"
    );
    let out = run("allow_other,no_such_option=1", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_option"));
    // A bad value is reported by the flag's own parser.
    let out = run("part_size=1MiB", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("5MiB"));
    // -f: everything checked, nothing mounted.
    let out = run(&d.options(), &["-f"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!mount::is_mounted(&mnt));
}

/// Where util-linux looks for the helper of type `fuse.bucketfs`.
const SBIN_HELPER: &str = "/sbin/mount.fuse.bucketfs";

/// Installs `/sbin/mount.fuse.bucketfs` → the binary under test for the test's duration, unless
/// a real installation is there (then the test leaves it alone and says so).
struct SbinHelper {
    installed: bool,
}

impl SbinHelper {
    fn install() -> Option<SbinHelper> {
        let path = Path::new(SBIN_HELPER);
        match std::fs::read_link(path) {
            // A previous test run's link: ours to replace.
            Ok(target) if target.to_string_lossy().contains("/target/release/") => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => return None,
            Err(_) if path.exists() => return None,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(mount::bin(), path).ok()?;
        Some(SbinHelper { installed: true })
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        if self.installed {
            let _ = std::fs::remove_file(SBIN_HELPER);
        }
    }
}

#[test]
fn fstab_line_mounts_with_mount_8() {
    let d = HelperDirs::new();
    let mnt = d.path("mnt");
    // The fstab line of docs/OPERATIONS.md, in a private fstab (mount -T) so the machine's is
    // untouched.
    let fstab = d.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test\n{} {} fuse.bucketfs {},noauto 0 0\n",
            d.source(),
            mnt.display(),
            d.options()
        ),
    )
    .unwrap();
    let Some(_helper) = SbinHelper::install() else {
        panic!("{SBIN_HELPER} exists and is not a test link: remove it or run elsewhere");
    };
    let _guard = Unmount(mnt.clone());
    let status = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .stdin(Stdio::null())
        // The daemon inherits mount's stderr: a file, never a pipe the test would wait on.
        .stdout(d.log())
        .stderr(d.log())
        .status()
        .unwrap();
    assert!(status.success(), "mount: {status}\n{}", d.log_text());
    assert!(mount::is_mounted(&mnt), "{}", d.log_text());
    d.write_unmount_and_check(&mnt);
}

// ---- metrics, health and status ---------------------------------------------------------------

const SERVER: Server = Server::SeaweedFs;

/// A mount of `bucket` through `proxy` (so a test can take S3 away) with `extra` flags.
fn proxied_mount(bucket: &str, proxy: &FaultProxy, extra: &[&str]) -> Mount {
    let mut cmd = mount::command();
    cmd.arg("mount")
        .arg(format!("s3://{bucket}/"))
        .args(["--endpoint-url", &proxy.endpoint(), "--region", s3::REGION])
        .args(extra)
        .env("S3_ACCESS_KEY_ID", s3::access_key(SERVER))
        .env("S3_SECRET_ACCESS_KEY", s3::secret_key(SERVER));
    Mount::start(cmd)
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `GET path` over HTTP/1.0: (status code, body); `None` if nothing listens.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The value of one series (`name` or `name{labels}`, exactly as rendered) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Wait until `/healthz` answers `code`: whether it did, and the last body it answered.
fn healthz_turns(addr: &str, code: u16, timeout: Duration) -> (bool, String) {
    let mut last = String::new();
    let turned = wait_for(timeout, || {
        http_get(addr, "/healthz").is_some_and(|(answered, body)| {
            last = body;
            answered == code
        })
    });
    (turned, last)
}

fn scrape(addr: &str) -> String {
    let (code, text) = http_get(addr, "/metrics").expect("metrics endpoint answers");
    assert_eq!(code, 200, "{text}");
    text
}

/// `fsync` of a file of the mount, through a descriptor open for writing (no truncation).
fn fsync(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .sync_all()
}

/// Drop the kernel's cached pages of `path` (`POSIX_FADV_DONTNEED`), so the next read asks the
/// filesystem.
fn drop_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: fadvise on a descriptor we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

fn state_of(path: &Path) -> String {
    let value = xattr::get(path, "user.bucketfs.state")
        .unwrap_or_else(|e| panic!("getxattr {}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{} has no user.bucketfs.state", path.display()));
    String::from_utf8(value).unwrap()
}

fn bucketfs(args: &[&str]) -> (bool, String) {
    let out = mount::command().args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_and_healthz_follows_s3_and_the_mount() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let proxy = FaultProxy::start(&s3::endpoint(SERVER));
    let addr = free_addr();
    let m = proxied_mount(
        &bucket,
        &proxy,
        &["--metrics-addr", &addr, "--writeback-delay", "1h"],
    );
    let (code, body) = http_get(&addr, "/healthz").unwrap();
    assert_eq!((code, body.trim()), (200, "ok"), "{}", m.log_text());
    assert_eq!(http_get(&addr, "/nothing").unwrap().0, 404);

    // A closed, not yet uploaded file is in the state gauges.
    std::fs::write(m.join("a.bin"), vec![7u8; 100_000]).unwrap();
    let text = scrape(&addr);
    assert_eq!(sample(&text, "bucketfs_dirty_files"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "bucketfs_dirty_bytes"), Some(100_000.0));
    assert_eq!(sample(&text, "bucketfs_upload_queue"), Some(1.0));
    assert!(sample(&text, "bucketfs_oldest_dirty_seconds").unwrap() > 0.0);
    assert_eq!(sample(&text, "bucketfs_cache_bytes"), Some(100_000.0));

    // Uploaded: the request, byte and upload counters moved; the gauges are back to zero.
    fsync(&m.join("a.bin")).unwrap();
    // The kernel keeps the pages written; drop them so that the read reaches the daemon.
    drop_page_cache(&m.join("a.bin"));
    std::fs::read(m.join("a.bin")).unwrap();
    let text = scrape(&addr);
    assert_eq!(sample(&text, "bucketfs_dirty_files"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "bucketfs_oldest_dirty_seconds"), Some(0.0));
    assert_eq!(sample(&text, "bucketfs_uploads_total"), Some(1.0));
    assert!(
        sample(
            &text,
            "bucketfs_s3_requests_total{op=\"put\",outcome=\"ok\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(sample(&text, "bucketfs_s3_bytes_total{direction=\"up\"}").unwrap() >= 100_000.0);
    assert!(sample(&text, "bucketfs_read_bytes_total{source=\"cache\"}").unwrap() >= 100_000.0);
    assert!(sample(&text, "bucketfs_fuse_op_seconds_count{op=\"write\"}").unwrap() >= 1.0);
    assert!(
        sample(
            &text,
            "bucketfs_fuse_op_seconds_bucket{op=\"fsync\",le=\"+Inf\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(sample(&text, "bucketfs_s3_reachable"), Some(1.0));

    // S3 goes away: /healthz says so within the probe interval, and recovers with S3.
    proxy.set_down(true);
    let (down, last) = healthz_turns(&addr, 503, Duration::from_secs(40));
    assert!(
        down,
        "healthz stayed {last:?} with S3 down\n{}",
        m.log_text()
    );
    assert!(last.contains("S3 does not answer"), "{last}");
    assert_eq!(sample(&scrape(&addr), "bucketfs_s3_reachable"), Some(0.0));
    proxy.set_down(false);
    let up = wait_for(Duration::from_secs(40), || {
        http_get(&addr, "/healthz").is_some_and(|(code, _)| code == 200)
    });
    assert!(up, "healthz did not recover\n{}", m.log_text());

    // SIGTERM with a file still to upload and S3 away: while the drain waits, /healthz says
    // 503 (the mount is no longer served) and /metrics still answers.
    std::fs::write(m.join("b.bin"), b"pending").unwrap();
    proxy.set_down(true);
    // SAFETY: plain kill(2) on the test's own child.
    unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) };
    let (draining, last) = healthz_turns(&addr, 503, Duration::from_secs(20));
    assert!(
        draining,
        "healthz during the drain: {last:?}\n{}",
        m.log_text()
    );
    assert!(last.contains("not serving"), "{last}");
    assert_eq!(sample(&scrape(&addr), "bucketfs_dirty_files"), Some(1.0));
    proxy.set_down(false);

    // Once the daemon has drained and exited, nothing listens.
    assert!(m.stop().success());
    assert!(http_get(&addr, "/healthz").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_the_state_attribute_follow_a_file_to_s3() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = s3::sdk_client(SERVER).await;
    let proxy = FaultProxy::start(&s3::endpoint(SERVER));
    let m = proxied_mount(&bucket, &proxy, &["--writeback-delay", "1h"]);
    let mnt = m.path().to_str().unwrap().to_string();
    let file = m.join("report.txt");
    std::fs::write(&file, b"quarterly figures").unwrap();
    std::fs::create_dir(m.join("dir")).unwrap();

    assert_eq!(state_of(&file), "dirty");
    assert_eq!(state_of(&m.join("dir")), "directory");
    let (ok, report) = bucketfs(&["status", &mnt]);
    assert!(ok, "{report}");
    assert!(report.contains("1 dirty file"), "{report}");
    assert!(report.contains("report.txt  17 B  dirty"), "{report}");
    let (ok, one) = bucketfs(&["status", file.to_str().unwrap()]);
    assert!(ok, "{one}");
    assert_eq!(one.trim(), format!("{}: dirty", file.display()));

    // S3 unreachable: the upload fails, fsync says EIO, and the state carries the reason.
    proxy.set_down(true);
    let err = fsync(&file).expect_err("fsync while S3 is down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let failed = state_of(&file);
    assert!(failed.starts_with("failed: "), "{failed}");
    let (_, report) = bucketfs(&["status", &mnt]);
    assert!(report.contains("report.txt  17 B  failed: "), "{report}");

    // Back: uploaded, and the state names the object's ETag as S3 reports it.
    proxy.set_down(false);
    fsync(&file).unwrap();
    let head = client
        .head_object()
        .bucket(&bucket)
        .key("report.txt")
        .send()
        .await
        .unwrap();
    let etag = head.e_tag().unwrap().trim_matches('"').to_string();
    assert_eq!(state_of(&file), format!("clean {etag}"));
    let (_, report) = bucketfs(&["status", &mnt]);
    assert!(report.contains("0 dirty files"), "{report}");
    assert!(!report.contains("report.txt"), "{report}");

    // Outside a bucketfs mount, status says so and fails.
    let plain = tempfile::tempdir().unwrap();
    let (ok, text) = bucketfs(&["status", plain.path().to_str().unwrap()]);
    assert!(!ok && text.contains("not in a bucketfs mount"), "{text}");
    assert!(m.stop().success());
}

// ---- logs ---------------------------------------------------------------------------------------

/// A run at the most verbose level, from a refused start with a wrong secret to a full mount,
/// upload, listing and drain: no log line holds the secret key, in text or JSON; JSON lines
/// are each one object.
#[tokio::test(flavor = "multi_thread")]
async fn logs_never_hold_a_secret_and_json_lines_parse() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let secret = s3::secret_key(SERVER);
    let wrong_secret = "bucketfs-wrong-secret-Zq8X";

    // A refused start (wrong secret) prints its reason, not the secret.
    let dir = tempfile::tempdir().unwrap();
    let out = mount::s3_command(SERVER, &bucket, "")
        .arg(dir.path())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env("S3_SECRET_ACCESS_KEY", wrong_secret)
        .env("BUCKETFS_LOG", "trace")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("S3_SECRET_ACCESS_KEY"), "{text}");
    assert!(
        !text.contains(wrong_secret),
        "the wrong secret is in the log:\n{text}"
    );

    for format in ["text", "json"] {
        let mut cmd = mount::s3_command(SERVER, &bucket, "logs");
        cmd.args(["--log-format", format])
            .env("BUCKETFS_LOG", "trace");
        let m = Mount::start(cmd);
        std::fs::write(m.join("f.txt"), b"x").unwrap();
        fsync(&m.join("f.txt")).unwrap();
        std::fs::read_dir(m.path()).unwrap().for_each(drop);
        let (status, log) = m.stop_with_log();
        assert!(status.success(), "{log}");
        assert!(
            log.lines().count() > 20,
            "a trace log of a whole run:\n{log}"
        );
        assert!(
            !log.contains(&secret),
            "the secret key is in the {format} log"
        );
        if format == "json" {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let value: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    value.get("level").is_some() && value.get("fields").is_some(),
                    "{line}"
                );
            }
        }
    }
}

/// A re-read of a file unchanged since its last open is served by the kernel's page cache (no
/// read reaches the daemon); once another client replaces the object, the next open after the
/// metadata TTL drops those pages and reads the new version.
#[tokio::test(flavor = "multi_thread")]
async fn rereads_of_an_unchanged_file_come_from_the_page_cache_until_it_changes() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = s3::sdk_client(SERVER).await;
    let old = vec![1u8; 3 << 20];
    s3::put_object(&client, &bucket, "f.bin", &old).await;
    let proxy = FaultProxy::start(&s3::endpoint(SERVER));
    let addr = free_addr();
    let m = proxied_mount(
        &bucket,
        &proxy,
        &["--metrics-addr", &addr, "--metadata-ttl", "1s"],
    );
    let reads = || {
        sample(
            &scrape(&addr),
            "bucketfs_fuse_op_seconds_count{op=\"read\"}",
        )
        .unwrap_or(0.0)
    };

    assert_eq!(std::fs::read(m.join("f.bin")).unwrap(), old);
    let first = reads();
    assert!(first >= 1.0);
    assert_eq!(std::fs::read(m.join("f.bin")).unwrap(), old);
    assert_eq!(reads(), first, "the second read reached the daemon");

    let new = vec![2u8; 3 << 20];
    s3::put_object(&client, &bucket, "f.bin", &new).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(std::fs::read(m.join("f.bin")).unwrap(), new);
    assert!(reads() > first);
    assert!(m.stop().success());
}

/// `ls -l` of a directory reads each entry's stored attributes with one HEAD; with
/// `--listing-attributes` it makes no HEAD at all and shows the defaults. Either way the
/// entries reach the kernel with their attributes (READDIRPLUS): no LOOKUP per entry.
#[tokio::test(flavor = "multi_thread")]
async fn listing_attributes_make_ls_l_cost_only_the_listing() {
    use std::os::unix::fs::PermissionsExt;
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = s3::sdk_client(SERVER).await;
    for i in 0..30 {
        s3::put_object(&client, &bucket, &format!("d/f{i:02}"), b"x").await;
    }
    // chmod 600 as bucketfs (and s3fs) store it.
    client
        .put_object()
        .bucket(&bucket)
        .key("d/private")
        .metadata("mode", (libc::S_IFREG | 0o600).to_string())
        .body(b"secret".to_vec().into())
        .send()
        .await
        .unwrap();
    let proxy = FaultProxy::start(&s3::endpoint(SERVER));
    for (flags, heads_expected, private_mode) in [
        (&[][..], true, 0o600),
        (&["--listing-attributes"][..], false, 0o644),
    ] {
        let addr = free_addr();
        let mut args = vec!["--metrics-addr", addr.as_str()];
        args.extend_from_slice(flags);
        let m = proxied_mount(&bucket, &proxy, &args);
        let modes: Vec<(String, u32)> = std::fs::read_dir(m.join("d"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let mode = std::fs::symlink_metadata(e.path())
                    .unwrap()
                    .permissions()
                    .mode();
                (e.file_name().into_string().unwrap(), mode & 0o7777)
            })
            .collect();
        assert_eq!(modes.len(), 31);
        let private = modes.iter().find(|(n, _)| n == "private").unwrap().1;
        assert_eq!(private, private_mode, "{flags:?}");
        let heads = sample(
            &scrape(&addr),
            "bucketfs_s3_requests_total{op=\"head\",outcome=\"ok\"}",
        )
        .unwrap_or(0.0);
        if heads_expected {
            assert!(heads >= 31.0, "{heads} HEADs without the flag");
        } else {
            assert_eq!(heads, 0.0, "HEADs with --listing-attributes");
        }
        // READDIRPLUS gave the kernel every entry's attributes: no LOOKUP per entry.
        let lookups = sample(
            &scrape(&addr),
            "bucketfs_fuse_op_seconds_count{op=\"lookup\"}",
        )
        .unwrap_or(0.0);
        assert!(lookups < 5.0, "{lookups} LOOKUPs for `ls -l` of 31 entries");
        assert!(m.stop().success());
    }
}
