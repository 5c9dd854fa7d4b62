//! The claims of `docs/SEMANTICS.md` that no other real-mount test covers, one test each:
//! version-pinned reads, unlink of an open file, `mmap` (shared writable mappings included),
//! append and truncate in both directions, `RENAME_NOREPLACE`, and other clients' changes
//! showing within the metadata TTL.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use super::*;

both_servers!(
    reads_of_an_open_file_never_mix_two_versions,
    an_unlinked_open_file_keeps_its_data_until_the_last_close,
    mmap_reads_and_shared_writes_reach_the_object,
    append_and_truncate_grow_and_shrink_any_file,
    rename_noreplace_refuses_an_existing_target,
    other_clients_changes_show_within_the_metadata_ttl,
    large_objects_change_in_place_without_a_full_download,
);

/// A file opened for reading is pinned to the version it opened: once another client replaces
/// the object, the next read that needs S3 fails with ESTALE rather than returning a mix; a
/// new open reads the new version.
async fn reads_of_an_open_file_never_mix_two_versions(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let old = data(4 * MIB, 1);
    put_object(&client, &bucket, "v/f", &old).await;
    let m = Mount::s3(server, &bucket, "v", &[]);
    let mut f = std::fs::File::open(m.join("f")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert_eq!(head, old[..4096]);
    let new = data(4 * MIB, 2);
    put_object(&client, &bucket, "v/f", &new).await;
    // Far past the read-ahead window: this read must go to S3, pinned to the old ETag.
    f.seek(SeekFrom::Start(3 * MIB as u64)).unwrap();
    let mut tail = vec![0u8; 4096];
    let err = f.read_exact(&mut tail).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    drop(f);
    // The metadata TTL (1 s) lets the kernel and bucketfs see the new version.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(std::fs::read(m.join("f")).unwrap() == new);
}

/// `unlink` of an open file deletes the object at once; the open descriptor still reads and
/// writes its data, and its close re-creates nothing.
async fn an_unlinked_open_file_keeps_its_data_until_the_last_close(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "u", &[]);
    write_synced(&m.join("f"), b"still here");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    std::fs::remove_file(m.join("f")).unwrap();
    assert_eq!(errno_of(std::fs::metadata(m.join("f"))), libc::ENOENT);
    assert!(list_keys(&client, &bucket, "u/").await.is_empty());
    let mut got = String::new();
    f.read_to_string(&mut got).unwrap();
    assert_eq!(got, "still here");
    f.write_all(b", and more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    got.clear();
    f.read_to_string(&mut got).unwrap();
    assert_eq!(got, "still here, and more");
    assert_eq!(
        f.metadata().unwrap().len(),
        20,
        "fstat of the unlinked file"
    );
    drop(f);
    assert!(m.stop().success());
    let keys = list_keys(&client, &bucket, "u/").await;
    assert!(keys.is_empty(), "the unlinked file came back: {keys:?}");
}

/// `mmap`: a private mapping reads the file; a shared writable mapping's stores reach the file
/// and, after `msync` and `fsync`, the object.
async fn mmap_reads_and_shared_writes_reach_the_object(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "m", &[]);
    let original = data(64 * 1024, 3);
    write_synced(&m.join("f"), &original);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    let len = original.len();
    // SAFETY: a fresh mapping of `len` bytes of an open file, unmapped below; nothing else
    // aliases it while the slice lives.
    unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let bytes = std::slice::from_raw_parts_mut(p as *mut u8, len);
        assert!(bytes[..] == original[..], "mapped bytes differ");
        bytes[100..105].copy_from_slice(b"HELLO");
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(p, len), 0);
    }
    f.sync_all().unwrap();
    drop(f);
    let mut expected = original.clone();
    expected[100..105].copy_from_slice(b"HELLO");
    assert!(get_object(&client, &bucket, "m/f").await == expected);
    assert!(std::fs::read(m.join("f")).unwrap() == expected);
}

/// `O_APPEND` (Open WebUI's resumed downloads) appends to a file already in S3; `truncate`
/// grows with zeros and shrinks, on closed and open files.
async fn append_and_truncate_grow_and_shrink_any_file(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    put_object(&client, &bucket, "t/model.gguf", b"part one;").await;
    let m = Mount::s3(server, &bucket, "t", &[]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("model.gguf"))
        .unwrap();
    f.write_all(b"part two;").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        get_object(&client, &bucket, "t/model.gguf").await,
        b"part one;part two;"
    );
    // Grow a closed file with truncate(2), then shrink it through an open descriptor.
    let path = m.join("model.gguf");
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 24) }, 0);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(4).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(get_object(&client, &bucket, "t/model.gguf").await, b"part");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        get_object(&client, &bucket, "t/model.gguf").await,
        b"part\0\0\0\0"
    );
}

/// `renameat2(RENAME_NOREPLACE)` fails with EEXIST over an existing name and moves nothing;
/// onto a free name it renames.
async fn rename_noreplace_refuses_an_existing_target(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "n", &[]);
    write_synced(&m.join("a"), b"a");
    write_synced(&m.join("b"), b"b");
    let rename = |from: &str, to: &str| -> i32 {
        let from = std::ffi::CString::new(m.join(from).as_os_str().as_bytes()).unwrap();
        let to = std::ffi::CString::new(m.join(to).as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated paths; AT_FDCWD with absolute paths.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    };
    assert_eq!(rename("a", "b"), libc::EEXIST);
    assert_eq!(std::fs::read(m.join("a")).unwrap(), b"a");
    assert_eq!(std::fs::read(m.join("b")).unwrap(), b"b");
    assert_eq!(rename("a", "c"), 0);
    assert_eq!(std::fs::read(m.join("c")).unwrap(), b"a");
    assert!(m.stop().success());
    let mut keys = list_keys(&client, &bucket, "n/").await;
    keys.sort();
    assert_eq!(keys, ["n/b", "n/c"]);
}

/// Objects another client puts, replaces or deletes show in the mount within the metadata TTL
/// (1 s by default; the kernel's entry and attribute caches use the same TTL).
async fn other_clients_changes_show_within_the_metadata_ttl(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    put_object(&client, &bucket, "e/kept", b"one").await;
    let m = Mount::s3(server, &bucket, "e", &[]);
    assert_eq!(std::fs::read(m.join("kept")).unwrap(), b"one");
    assert_eq!(errno_of(std::fs::metadata(m.join("new"))), libc::ENOENT);
    let changed = Instant::now();
    put_object(&client, &bucket, "e/kept", b"replaced").await;
    put_object(&client, &bucket, "e/new", b"new").await;
    client
        .delete_object()
        .bucket(&bucket)
        .key("e/kept")
        .send()
        .await
        .unwrap();
    put_object(&client, &bucket, "e/kept", b"replaced again").await;
    // Visible within the TTL plus scheduling slack; well before 5 s.
    loop {
        let kept = std::fs::read(m.join("kept")).unwrap_or_default();
        let new = std::fs::read(m.join("new")).unwrap_or_default();
        if kept == b"replaced again" && new == b"new" {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "after {:?}: kept={kept:?} new={new:?}",
            changed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    client
        .delete_object()
        .bucket(&bucket)
        .key("e/new")
        .send()
        .await
        .unwrap();
    let deleted = Instant::now();
    while std::fs::metadata(m.join("new")).is_ok() {
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "a deleted object still shows"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Keys that cannot be file names are skipped (and logged once each) instead of crashing or
/// hiding the rest of the directory; a key that is both an object and a prefix shows as the
/// directory. LocalStack only: SeaweedFS cannot store such keys (it folds `a//b` into `a/b` and
/// refuses an object where a prefix is).
#[tokio::test(flavor = "multi_thread")]
async fn localstack_keys_that_cannot_be_names_are_skipped_and_logged() {
    let server = Server::LocalStack;
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let long = "l".repeat(256);
    for key in [
        "k/fine.txt".to_string(),
        "k/both".to_string(),
        "k/both/inner.txt".to_string(),
        "k/empty//segment".to_string(),
        "k/./dot".to_string(),
        "k/../dotdot".to_string(),
        format!("k/{long}"),
    ] {
        put_object(&client, &bucket, &key, key.as_bytes()).await;
    }
    let m = Mount::s3(server, &bucket, "k", &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["both", "empty", "fine.txt"]);
    assert!(std::fs::metadata(m.join("both")).unwrap().is_dir());
    assert_eq!(
        std::fs::read(m.join("both/inner.txt")).unwrap(),
        b"k/both/inner.txt"
    );
    let inside: Vec<_> = std::fs::read_dir(m.join("empty")).unwrap().collect();
    assert!(
        inside.is_empty(),
        "the empty segment is skipped: {inside:?}"
    );
    // Listed twice, logged once per key.
    let _ = std::fs::read_dir(m.path()).unwrap().count();
    let log = m.log_text();
    for key in ["k/both", "k/empty//", "k/./", "k/../"] {
        let lines = log
            .lines()
            .filter(|l| l.contains(&format!("key=\"{key}\"")))
            .count();
        assert_eq!(lines, 1, "{key} logged {lines} times:\n{log}");
    }
    assert!(log.contains(&format!("key=\"k/{long}\"")), "{log}");
}

/// Opening a large object for an append (Open WebUI's resumed model downloads) or a write in
/// the middle fetches only what it needs and copies the unchanged parts server-side; the
/// object ends up byte-exact either way.
async fn large_objects_change_in_place_without_a_full_download(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let mut expected = data(48 * MIB, 7);
    put_object(&client, &bucket, "g/model.gguf", &expected).await;
    let m = Mount::s3(server, &bucket, "g", &[]);
    let started = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("model.gguf"))
        .unwrap();
    f.write_all(b"resumed").unwrap();
    f.sync_all().unwrap();
    drop(f);
    expected.extend_from_slice(b"resumed");
    assert!(get_object(&client, &bucket, "g/model.gguf").await == expected);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("model.gguf"))
        .unwrap();
    f.seek(SeekFrom::Start(20 * MIB as u64)).unwrap();
    f.write_all(b"patched").unwrap();
    f.sync_all().unwrap();
    drop(f);
    expected[20 * MIB..20 * MIB + 7].copy_from_slice(b"patched");
    assert!(get_object(&client, &bucket, "g/model.gguf").await == expected);
    assert!(std::fs::read(m.join("model.gguf")).unwrap() == expected);
    eprintln!("append + patch of 48 MiB: {:?}", started.elapsed());
}
