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
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mount::{self, Mount};

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
