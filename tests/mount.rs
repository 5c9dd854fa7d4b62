//! Real-mount integration tests: the `bucketfs` binary mounts a real S3 server on loopback
//! (SeaweedFS and LocalStack, started by `scripts/test.sh`), the tests use plain `std::fs`, and
//! the raw SDK looks into the bucket independently of bucketfs.
//!
//! Every scenario runs against both servers (`both_servers!`); a scenario that depends on one
//! server's documented behaviour says so and runs there only.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::mount::{self, Mount};
use common::s3::{self, Server, get_object, list_keys, put_object, sdk_client};
use futures::StreamExt;

const MIB: usize = 1 << 20;

/// Deterministic, non-repeating-ish test bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write a file and fsync it: when this returns, the object is in the bucket.
fn write_synced(path: &std::path::Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// Wait (up to 30 s) until the object `key` holds `expected` (the write-back uploader sends a
/// closed file about a second later), then assert it.
async fn wait_object(client: &aws_sdk_s3::Client, bucket: &str, key: &str, expected: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = list_keys(client, bucket, key).await;
        if keys.iter().any(|k| k == key) {
            let got = get_object(client, bucket, key).await;
            if got == expected || Instant::now() > deadline {
                assert!(
                    got == expected,
                    "object {key}: {} bytes, expected {}",
                    got.len(),
                    expected.len()
                );
                return;
            }
        } else if Instant::now() > deadline {
            panic!("object {key} never appeared");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run a `bucketfs mount` that must be refused at start: it mounts at a fresh directory, fails
/// within 20 s without mounting, and its stderr is returned.
fn refused_start(mut cmd: std::process::Command) -> String {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = cmd
        .arg(dir.path())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the mount was not refused");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(!mount::is_mounted(dir.path()));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

macro_rules! both_servers {
    ($($name:ident),* $(,)?) => {
        mod seaweedfs {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Server::SeaweedFs).await })*
        }
        mod localstack {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Server::LocalStack).await })*
        }
    };
}

#[path = "mount/model.rs"]
mod model;
#[path = "mount/posix.rs"]
mod posix;
#[path = "mount/semantics.rs"]
mod semantics;
#[path = "mount/tools.rs"]
mod tools;

both_servers!(
    files_round_trip_as_objects_under_the_prefix,
    objects_put_by_any_client_appear_in_the_mount,
    readdir_pages_through_2500_objects,
    nested_directories_mkdir_and_rmdir,
    rename_and_unlink_files,
    odd_names_map_byte_for_byte,
    long_names_and_statfs,
    overwrite_truncate_and_partial_writes,
    missing_bucket_is_refused_at_mount,
    sigterm_unmounts_and_exits_zero,
);

/// 0 B, 1 B, around the 8 MiB multipart threshold, and 100 MiB: the key is `owui/NAME`, the bytes
/// are the file's, and they read back through the mount.
async fn files_round_trip_as_objects_under_the_prefix(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "owui", &[]);
    let sizes = [0, 1, 8 * MIB - 1, 8 * MIB + 1, 100 * MIB];
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("file-{size}.bin");
        let bytes = data(*size, i as u64);
        write_synced(&m.join(&name), &bytes);
        let stored = get_object(&client, &bucket, &format!("owui/{name}")).await;
        assert!(
            stored == bytes,
            "object owui/{name} differs from the file ({} vs {size} bytes)",
            stored.len()
        );
        let back = std::fs::read(m.join(&name)).unwrap();
        assert!(back == bytes, "{name} read back differently");
        assert_eq!(
            std::fs::metadata(m.join(&name)).unwrap().len(),
            *size as u64
        );
    }
    let mut keys = list_keys(&client, &bucket, "").await;
    keys.sort();
    let mut expected: Vec<String> = sizes.iter().map(|s| format!("owui/file-{s}.bin")).collect();
    expected.sort();
    assert_eq!(
        keys, expected,
        "nothing but the files' objects is in the bucket"
    );
    assert!(m.stop().success());
}

async fn objects_put_by_any_client_appear_in_the_mount(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    put_object(&client, &bucket, "owui/early.txt", b"before the mount").await;
    let m = Mount::s3(server, &bucket, "owui/", &[]);
    assert_eq!(
        std::fs::read(m.join("early.txt")).unwrap(),
        b"before the mount"
    );
    put_object(&client, &bucket, "owui/late.txt", b"after the mount").await;
    put_object(&client, &bucket, "owui/sub/deep/nested.txt", b"nested").await;
    put_object(&client, &bucket, "elsewhere.txt", b"outside the prefix").await;
    let mut names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["early.txt", "late.txt", "sub"]);
    assert!(m.join("sub").is_dir());
    assert_eq!(
        std::fs::read(m.join("sub/deep/nested.txt")).unwrap(),
        b"nested"
    );
    assert_eq!(std::fs::metadata(m.join("late.txt")).unwrap().len(), 15);
    // Seeks and partial reads of an object the mount never wrote.
    let big = data(3 * MIB + 5, 7);
    put_object(&client, &bucket, "owui/big.bin", &big).await;
    // The directory was just listed: a name it lacked shows up within --metadata-ttl (1 s).
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut f = loop {
        match std::fs::File::open(m.join("big.bin")) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("big.bin never appeared: {e}"),
        }
    };
    f.seek(SeekFrom::End(-100)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &big[big.len() - 100..]);
    f.seek(SeekFrom::Start(MIB as u64 + 3)).unwrap();
    let mut chunk = vec![0; 8192];
    f.read_exact(&mut chunk).unwrap();
    assert_eq!(chunk, &big[MIB + 3..MIB + 3 + 8192]);
    assert_eq!(
        errno_of(std::fs::metadata(m.join("absent.txt"))),
        libc::ENOENT
    );
}

async fn readdir_pages_through_2500_objects(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    futures::stream::iter(0..2500)
        .map(|i| {
            let (client, bucket) = (client.clone(), bucket.clone());
            async move { put_object(&client, &bucket, &format!("many/f{i:05}"), b"x").await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let m = Mount::s3(server, &bucket, "", &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: Vec<String> = (0..2500).map(|i| format!("f{i:05}")).collect();
    assert_eq!(names, expected);
    // `ls -l`: every entry stats without error, with the size from the listing.
    for name in names.iter().step_by(97) {
        assert_eq!(
            std::fs::metadata(m.join("many").join(name)).unwrap().len(),
            1
        );
    }
}

async fn nested_directories_mkdir_and_rmdir(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "p", &[]);
    std::fs::create_dir_all(m.join("a/b/c")).unwrap();
    write_synced(&m.join("a/b/c/f.txt"), b"deep");
    let mut keys = list_keys(&client, &bucket, "").await;
    keys.sort();
    assert_eq!(keys, ["p/a/", "p/a/b/", "p/a/b/c/", "p/a/b/c/f.txt"]);
    assert_eq!(errno_of(std::fs::create_dir(m.join("a"))), libc::EEXIST);
    assert_eq!(
        errno_of(std::fs::remove_dir(m.join("a/b/c"))),
        libc::ENOTEMPTY
    );
    assert_eq!(errno_of(std::fs::remove_dir(m.join("a"))), libc::ENOTEMPTY);
    std::fs::remove_file(m.join("a/b/c/f.txt")).unwrap();
    std::fs::remove_dir(m.join("a/b/c")).unwrap();
    let mut keys = list_keys(&client, &bucket, "").await;
    keys.sort();
    assert_eq!(keys, ["p/a/", "p/a/b/"]);
    // An empty directory made by mkdir persists across a remount (its marker object).
    std::fs::create_dir(m.join("empty")).unwrap();
    assert!(m.stop().success());
    let m = Mount::s3(server, &bucket, "p", &[]);
    assert!(m.join("empty").is_dir());
    assert!(m.join("a/b").is_dir());
}

async fn rename_and_unlink_files(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "", &[]);
    let body = data(9 * MIB, 3);
    std::fs::write(m.join("old.bin"), &body).unwrap();
    std::fs::create_dir(m.join("dir")).unwrap();
    std::fs::rename(m.join("old.bin"), m.join("dir/new.bin")).unwrap();
    assert_eq!(errno_of(std::fs::metadata(m.join("old.bin"))), libc::ENOENT);
    assert!(std::fs::read(m.join("dir/new.bin")).unwrap() == body);
    wait_object(&client, &bucket, "dir/new.bin", &body).await;
    assert!(
        !list_keys(&client, &bucket, "")
            .await
            .contains(&"old.bin".to_string())
    );
    // Rename over an existing file replaces it.
    std::fs::write(m.join("a.txt"), b"A").unwrap();
    std::fs::write(m.join("b.txt"), b"B").unwrap();
    std::fs::rename(m.join("a.txt"), m.join("b.txt")).unwrap();
    assert_eq!(std::fs::read(m.join("b.txt")).unwrap(), b"A");
    wait_object(&client, &bucket, "b.txt", b"A").await;
    // The temp-file-then-rename pattern, with the temp file still open for writing.
    let mut tmp = std::fs::File::create(m.join(".tmp-save")).unwrap();
    tmp.write_all(b"saved atomically").unwrap();
    std::fs::rename(m.join(".tmp-save"), m.join("saved.txt")).unwrap();
    drop(tmp);
    wait_object(&client, &bucket, "saved.txt", b"saved atomically").await;
    std::fs::remove_file(m.join("b.txt")).unwrap();
    assert_eq!(errno_of(std::fs::read(m.join("b.txt"))), libc::ENOENT);
    let mut keys = list_keys(&client, &bucket, "").await;
    keys.sort();
    assert_eq!(keys, ["dir/", "dir/new.bin", "saved.txt"]);
}

async fn odd_names_map_byte_for_byte(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "owui", &[]);
    let names = [
        "a b.txt",
        "0b5c7e1a-9f1e-4b8a-8f5e-2d1c3b4a5f6e_Quarterly Report (final) #2.pdf",
        "100%+more&less?.txt",
        "ünïcödé-漢字-😀.md",
        "semi;colon=equals,comma'quote\"",
    ];
    for (i, name) in names.iter().enumerate() {
        std::fs::write(m.join(name), format!("content {i}")).unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        let key = format!("owui/{name}");
        wait_object(&client, &bucket, &key, format!("content {i}").as_bytes()).await;
    }
    let mut listed: Vec<Vec<u8>> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    listed.sort();
    let mut expected: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

async fn long_names_and_statfs(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, "", &[]);
    let ok = "n".repeat(255);
    std::fs::write(m.join(&ok), b"fits").unwrap();
    assert_eq!(std::fs::read(m.join(&ok)).unwrap(), b"fits");
    let long = "n".repeat(256);
    assert_eq!(
        errno_of(std::fs::write(m.join(&long), b"x")),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(std::fs::metadata(m.join(&long))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(std::fs::create_dir(m.join(&long))),
        libc::ENAMETOOLONG
    );
    let path = std::ffi::CString::new(m.path().as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    assert_eq!(st.f_namemax, 255);
    assert!(st.f_bavail > 0);
}

async fn overwrite_truncate_and_partial_writes(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "", &[]);
    let mut expected = data(10 * MIB, 5);
    std::fs::write(m.join("f.bin"), &expected).unwrap();
    // pwrite into the middle of an existing object.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("f.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
    f.write_all(b"PATCH").unwrap();
    drop(f);
    expected[4 * MIB..4 * MIB + 5].copy_from_slice(b"PATCH");
    wait_object(&client, &bucket, "f.bin", &expected).await;
    // Append.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("f.bin"))
        .unwrap();
    f.write_all(b"TAIL").unwrap();
    drop(f);
    expected.extend_from_slice(b"TAIL");
    wait_object(&client, &bucket, "f.bin", &expected).await;
    // truncate(2) on a closed file: shrink and grow.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("f.bin"))
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    wait_object(&client, &bucket, "f.bin", &expected[..1000]).await;
    std::process::Command::new("truncate")
        .args(["-s", "2000"])
        .arg(m.join("f.bin"))
        .status()
        .unwrap();
    let mut grown = expected[..1000].to_vec();
    grown.resize(2000, 0);
    wait_object(&client, &bucket, "f.bin", &grown).await;
    // O_TRUNC overwrite.
    std::fs::write(m.join("f.bin"), b"short").unwrap();
    wait_object(&client, &bucket, "f.bin", b"short").await;
    assert_eq!(std::fs::read(m.join("f.bin")).unwrap(), b"short");
}

async fn missing_bucket_is_refused_at_mount(server: Server) {
    let stderr = refused_start(mount::s3_command(server, "no-such-bucket-bucketfs", ""));
    let line = stderr
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default();
    assert!(
        line.contains("no-such-bucket-bucketfs") && line.contains("does not exist"),
        "{stderr}"
    );
}

async fn sigterm_unmounts_and_exits_zero(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "", &[]);
    std::fs::write(m.join("before-stop.txt"), b"kept").unwrap();
    let status = m.stop();
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        get_object(&client, &bucket, "before-stop.txt").await,
        b"kept"
    );
}

// ---- one server only ----------------------------------------------------------------------------

/// SeaweedFS checks signatures (LocalStack does not), so only it can refuse a wrong secret.
#[tokio::test(flavor = "multi_thread")]
async fn seaweedfs_wrong_secret_is_refused_at_mount() {
    let server = Server::SeaweedFs;
    let bucket = s3::fresh_bucket(server).await;
    let wrong = "wrong-secret-Zq8uX2";
    let mut cmd = mount::s3_command(server, &bucket, "");
    cmd.env("S3_SECRET_ACCESS_KEY", wrong);
    let stderr = refused_start(cmd);
    assert!(
        !stderr.contains(wrong),
        "the secret leaked into the error: {stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("bucketfs: error:"))
        .expect(&stderr);
    assert!(
        line.to_lowercase().contains("access denied") || line.contains("signature"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_and_missing_mountpoint_are_refused() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = mount::command();
    cmd.args([
        "mount",
        "s3://b",
        "--endpoint-url",
        &format!("http://127.0.0.1:{port}"),
    ])
    .env("S3_ACCESS_KEY_ID", "k")
    .env("S3_SECRET_ACCESS_KEY", "s");
    let stderr = refused_start(cmd);
    assert!(
        stderr.contains(&port.to_string()),
        "the error names the endpoint: {stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = mount::command()
        .args(["mount", "file:///tmp/bucketfs-unused-store"])
        .arg(dir.path().join("does-not-exist"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not exist") && stderr.contains("does-not-exist"),
        "{stderr}"
    );
}

/// The embedded default: a `file://` store, no S3 at all.
#[tokio::test(flavor = "multi_thread")]
async fn file_store_round_trip_and_remount() {
    let store = tempfile::tempdir().unwrap();
    let m = Mount::dir(store.path(), &[]);
    let big = data(20 * MIB, 11);
    std::fs::create_dir(m.join("docs")).unwrap();
    std::fs::write(m.join("docs/big.bin"), &big).unwrap();
    std::fs::write(m.join("small.txt"), b"small").unwrap();
    assert!(m.stop().success());
    let m = Mount::dir(store.path(), &[]);
    assert!(std::fs::read(m.join("docs/big.bin")).unwrap() == big);
    assert_eq!(std::fs::read(m.join("small.txt")).unwrap(), b"small");
}

/// `--daemon` returns once the mount is live, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_mode_returns_once_mounted() {
    let dirs = tempfile::tempdir().unwrap();
    let (store, mnt) = (dirs.path().join("store"), dirs.path().join("mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    // Unmounts, then waits for the detached daemon (found by its unique mount path) to exit,
    // killing it after 10 s: no daemon outlives the test.
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
            let pattern = format!("bucketfs mount .* {} ", self.0.display());
            let alive = || {
                std::process::Command::new("pgrep")
                    .args(["-f", &pattern])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::process::Command::new("pkill")
                .args(["-KILL", "-f", &pattern])
                .status();
        }
    }
    let _guard = Unmount(&mnt);
    let status = mount::command()
        .arg("mount")
        .arg(format!("file://{}", store.display()))
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(dirs.path().join("cache"))
        .arg("--daemon")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        mount::is_mounted(&mnt),
        "--daemon returned before the mount was live"
    );
    // fsync: the daemon then has nothing left to upload when the guard unmounts it.
    let mut f = std::fs::File::create(mnt.join("x")).unwrap();
    f.write_all(b"served by the daemon").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(mnt.join("x")).unwrap(),
        b"served by the daemon"
    );
}
