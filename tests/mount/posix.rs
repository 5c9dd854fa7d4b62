//! POSIX semantics beyond plain files, through a real mount: attributes kept in object metadata
//! (s3fs-compatible), symbolic links, hard links, directory rename, and the Unix tools that
//! depend on them (`cp -a`, `rsync -a`, `tar x`, `shutil.copy2`, `git clone`, `mv`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;

both_servers!(
    attributes_persist_in_s3fs_compatible_metadata,
    symlinks_are_objects_and_hard_links_are_refused,
    directory_rename_moves_every_object,
    an_upload_never_overwrites_another_clients_change,
    a_written_file_keeps_its_mtime_after_the_upload_and_a_remount,
);

async fn head_metadata(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> std::collections::HashMap<String, String> {
    let head = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)));
    head.metadata().cloned().unwrap_or_default()
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// A file written through the mount (no utimens) shows the time of its last write before its
/// upload, after it, and on a fresh mount with an empty cache: the upload stores that time as
/// `x-amz-meta-mtime` (LastModified, the upload's time, would move it).
async fn a_written_file_keeps_its_mtime_after_the_upload_and_a_remount(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let written = {
        let m = Mount::s3(server, &bucket, "p", &[]);
        std::fs::write(m.join("f.txt"), b"contents").unwrap();
        let written = std::fs::metadata(m.join("f.txt"))
            .unwrap()
            .modified()
            .unwrap();
        // Uploaded a second or more later (the write-back delay).
        assert!(m.stop().success(), "the drain uploads everything");
        written
    };
    let md = head_metadata(&client, &bucket, "p/f.txt").await;
    assert!(md.contains_key("mtime"), "{md:?}");
    let m = Mount::s3(server, &bucket, "p", &[]);
    let st = std::fs::metadata(m.join("f.txt")).unwrap();
    assert_eq!(st.modified().unwrap(), written);
    assert_eq!(std::fs::read(m.join("f.txt")).unwrap(), b"contents");
}

/// chmod, chown and utimens land in `x-amz-meta-{mode,uid,gid,mtime}` with s3fs's encodings,
/// whether the file is dirty (with its upload) or already in S3 (a self-copy); objects written
/// by another tool with those headers show them; everything survives a remount.
async fn attributes_persist_in_s3fs_compatible_metadata(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 500_000_000);
    {
        let m = Mount::s3(server, &bucket, "p", &[]);
        // Dirty: the attributes go with the upload.
        std::fs::write(m.join("dirty.txt"), b"dirty").unwrap();
        std::fs::set_permissions(m.join("dirty.txt"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::chown(m.join("dirty.txt"), Some(1234), Some(5678)).unwrap();
        set_mtime(&m.join("dirty.txt"), t);
        // Clean (already in S3): a self-copy replaces the metadata, the bytes stay.
        write_synced(&m.join("clean.txt"), b"clean");
        std::fs::set_permissions(m.join("clean.txt"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        // A directory's attributes go on its marker.
        std::fs::create_dir(m.join("d")).unwrap();
        std::fs::set_permissions(m.join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let st = std::fs::metadata(m.join("dirty.txt")).unwrap();
        assert_eq!(st.mode() & 0o7777, 0o600);
        assert_eq!((st.uid(), st.gid()), (1234, 5678));
        assert_eq!(st.modified().unwrap(), t);
        assert!(m.stop().success(), "the drain uploads everything");
    }
    let md = head_metadata(&client, &bucket, "p/dirty.txt").await;
    assert_eq!(md.get("mode").map(String::as_str), Some("33152"), "{md:?}"); // S_IFREG|0600
    assert_eq!(md.get("uid").map(String::as_str), Some("1234"));
    assert_eq!(md.get("gid").map(String::as_str), Some("5678"));
    assert_eq!(
        md.get("mtime").map(String::as_str),
        Some("1600000000.500000000")
    );
    assert_eq!(get_object(&client, &bucket, "p/dirty.txt").await, b"dirty");
    let md = head_metadata(&client, &bucket, "p/clean.txt").await;
    assert_eq!(md.get("mode").map(String::as_str), Some("33256")); // S_IFREG|0750
    assert_eq!(get_object(&client, &bucket, "p/clean.txt").await, b"clean");
    // SeaweedFS keeps no user metadata on a `dir/` key (docs/TESTING.md): directory
    // attributes persist on the other servers only.
    let markers_keep_metadata = server != Server::SeaweedFs;
    let md = head_metadata(&client, &bucket, "p/d/").await;
    if markers_keep_metadata {
        assert_eq!(md.get("mode").map(String::as_str), Some("16832")); // S_IFDIR|0700
    }
    // Written by another tool (s3fs's encoding of 0755 and a whole-second mtime).
    client
        .put_object()
        .bucket(&bucket)
        .key("p/foreign.sh")
        .metadata("mode", "33261")
        .metadata("mtime", "1500000000")
        .body(b"#!/bin/sh\n".to_vec().into())
        .send()
        .await
        .unwrap();
    let m = Mount::s3(server, &bucket, "p", &[]);
    // Listed first (readdir), then stat'ed: the listing's entries get their stored attributes.
    let names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let st = std::fs::symlink_metadata(m.join("foreign.sh")).unwrap();
    assert_eq!(st.mode() & 0o7777, 0o755);
    assert_eq!(
        st.modified().unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000)
    );
    let st = std::fs::metadata(m.join("dirty.txt")).unwrap();
    assert_eq!(st.mode() & 0o7777, 0o600, "after a remount");
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    assert_eq!(st.modified().unwrap(), t);
    assert_eq!(
        std::fs::metadata(m.join("clean.txt")).unwrap().mode() & 0o7777,
        0o750
    );
    if markers_keep_metadata {
        assert_eq!(
            std::fs::metadata(m.join("d")).unwrap().mode() & 0o7777,
            0o700
        );
    }
    // A write makes the mtime "now" again (the stored one no longer applies); the mode stays.
    let before = SystemTime::now() - Duration::from_secs(5);
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("dirty.txt"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    let st = std::fs::metadata(m.join("dirty.txt")).unwrap();
    let written = st.modified().unwrap();
    assert!(written > before);
    assert_eq!(st.mode() & 0o7777, 0o600);
    assert!(m.stop().success());
    let md = head_metadata(&client, &bucket, "p/dirty.txt").await;
    assert_eq!(md.get("mode").map(String::as_str), Some("33152"));
    let since_epoch = written.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let stored = format!(
        "{}.{:09}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    );
    assert_eq!(
        md.get("mtime"),
        Some(&stored),
        "the upload stores the write's time, not the utimens one"
    );
    assert_eq!(get_object(&client, &bucket, "p/dirty.txt").await, b"dirty+");
}

/// A symbolic link is an object whose body is the target, with s3fs's link mode; it reads
/// back as a link after a remount. A hard link is refused with EPERM.
async fn symlinks_are_objects_and_hard_links_are_refused(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    {
        let m = Mount::s3(server, &bucket, "", &[]);
        std::fs::write(m.join("real.txt"), b"through the link").unwrap();
        std::os::unix::fs::symlink("real.txt", m.join("link")).unwrap();
        std::os::unix::fs::symlink("/nowhere/at/all", m.join("dangling")).unwrap();
        assert_eq!(
            std::fs::read_link(m.join("link")).unwrap(),
            Path::new("real.txt")
        );
        assert_eq!(std::fs::read(m.join("link")).unwrap(), b"through the link");
        assert!(
            std::fs::symlink_metadata(m.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            errno_of(std::fs::hard_link(m.join("real.txt"), m.join("hard"))),
            libc::EPERM
        );
        assert_eq!(
            errno_of(std::os::unix::fs::symlink("x", m.join("link"))),
            libc::EEXIST
        );
        assert!(m.stop().success());
    }
    assert_eq!(get_object(&client, &bucket, "link").await, b"real.txt");
    let md = head_metadata(&client, &bucket, "link").await;
    assert_eq!(md.get("mode").map(String::as_str), Some("41471")); // S_IFLNK|0777
    let m = Mount::s3(server, &bucket, "", &[]);
    let kinds: std::collections::BTreeMap<String, bool> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.file_type().unwrap().is_symlink(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("dangling".to_string(), true),
            ("link".to_string(), true),
            ("real.txt".to_string(), false)
        ]
        .into()
    );
    assert_eq!(
        std::fs::read_link(m.join("dangling")).unwrap(),
        Path::new("/nowhere/at/all")
    );
    assert_eq!(std::fs::read(m.join("link")).unwrap(), b"through the link");
    std::fs::remove_file(m.join("link")).unwrap();
    assert!(m.stop().success());
    assert!(
        !list_keys(&client, &bucket, "")
            .await
            .contains(&"link".to_string())
    );
}

/// Renaming a directory moves every object under its prefix (markers, nested files, a file
/// still dirty in the cache) and leaves nothing under the old name; above
/// `--max-rename-objects` it is EXDEV with nothing changed, and `mv` falls back to copying.
async fn directory_rename_moves_every_object(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(
        server,
        &bucket,
        "r",
        &["--max-rename-objects", "5", "--writeback-delay", "30s"],
    );
    std::fs::create_dir_all(m.join("d/sub/deeper")).unwrap();
    write_synced(&m.join("d/a.txt"), b"a");
    write_synced(&m.join("d/sub/b.txt"), b"b");
    std::fs::set_permissions(
        m.join("d/sub/b.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    // Dirty for 30 s: moves as local data and uploads under the new name.
    std::fs::write(m.join("d/sub/deeper/dirty.txt"), b"dirty").unwrap();
    std::fs::rename(m.join("d"), m.join("e")).unwrap();
    assert_eq!(errno_of(std::fs::metadata(m.join("d"))), libc::ENOENT);
    assert_eq!(std::fs::read(m.join("e/a.txt")).unwrap(), b"a");
    assert_eq!(std::fs::read(m.join("e/sub/b.txt")).unwrap(), b"b");
    assert_eq!(
        std::fs::metadata(m.join("e/sub/b.txt")).unwrap().mode() & 0o7777,
        0o640,
        "a copy keeps the metadata"
    );
    assert_eq!(
        std::fs::read(m.join("e/sub/deeper/dirty.txt")).unwrap(),
        b"dirty"
    );
    let keys = list_keys(&client, &bucket, "r/d/").await;
    assert!(keys.is_empty(), "left under the old name: {keys:?}");
    // Over an empty directory: replaced. Over a non-empty one: ENOTEMPTY.
    std::fs::create_dir(m.join("empty")).unwrap();
    std::fs::create_dir(m.join("full")).unwrap();
    write_synced(&m.join("full/x"), b"x");
    assert_eq!(
        errno_of(std::fs::rename(m.join("e"), m.join("full"))),
        libc::ENOTEMPTY
    );
    std::fs::rename(m.join("e"), m.join("empty")).unwrap();
    assert_eq!(std::fs::read(m.join("empty/a.txt")).unwrap(), b"a");
    // Too big for one rename: EXDEV, nothing moved; mv(1) copies instead.
    for i in 0..6 {
        std::fs::write(m.join(&format!("full/f{i}")), [i as u8]).unwrap();
    }
    // fsync each file so that they are objects (the EXDEV count is of objects in S3).
    for i in 0..6 {
        std::fs::File::options()
            .write(true)
            .open(m.join(&format!("full/f{i}")))
            .unwrap()
            .sync_all()
            .unwrap();
    }
    assert_eq!(
        errno_of(std::fs::rename(m.join("full"), m.join("moved"))),
        libc::EXDEV
    );
    assert_eq!(std::fs::read(m.join("full/f3")).unwrap(), [3]);
    let status = std::process::Command::new("mv")
        .arg(m.join("full"))
        .arg(m.join("moved"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(m.join("moved/f3")).unwrap(), [3]);
    assert!(
        m.stop().success(),
        "the dirty file drains under its new name"
    );
    let mut keys = list_keys(&client, &bucket, "r/").await;
    keys.sort();
    let expected_files = [
        "r/empty/a.txt",
        "r/empty/sub/b.txt",
        "r/empty/sub/deeper/dirty.txt",
        "r/moved/f0",
        "r/moved/x",
    ];
    for k in expected_files {
        assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
    }
    assert!(
        keys.iter()
            .all(|k| k.starts_with("r/empty/") || k.starts_with("r/moved/")),
        "{keys:?}"
    );
    assert_eq!(
        get_object(&client, &bucket, "r/empty/sub/deeper/dirty.txt").await,
        b"dirty"
    );
}

/// The lost-update guard through a real server: a file read here, then replaced by another
/// client, then changed here, does not overwrite the other client's version; the local version
/// is uploaded as `NAME.conflict-<time>` and both show in the mount. A file renamed and
/// rewritten here raises no false conflict (the ETags a server gives copies are what it checks).
async fn an_upload_never_overwrites_another_clients_change(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let client = sdk_client(server).await;
    let m = Mount::s3(server, &bucket, "c", &[]);
    assert!(
        m.log_text().contains("conditional writes: supported"),
        "{}",
        m.log_text()
    );
    write_synced(&m.join("x"), b"version one");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("x"))
        .unwrap();
    put_object(&client, &bucket, "c/x", b"theirs").await;
    f.write_all(b" + mine").unwrap();
    f.sync_all().unwrap(); // durable, under the conflict name
    drop(f);
    let keys = list_keys(&client, &bucket, "c/").await;
    let conflicts: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("c/x.conflict-"))
        .collect();
    assert_eq!(conflicts.len(), 1, "{keys:?}");
    assert_eq!(get_object(&client, &bucket, "c/x").await, b"theirs");
    assert_eq!(
        get_object(&client, &bucket, conflicts[0]).await,
        b"version one + mine"
    );
    assert!(
        m.log_text()
            .contains("conflict: the object was changed in S3")
    );
    let name = conflicts[0].strip_prefix("c/").unwrap();
    assert_eq!(std::fs::read(m.join(name)).unwrap(), b"version one + mine");
    // The mount shows their version once the metadata TTL (1 s) has passed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read(m.join("x")).unwrap() != b"theirs" {
        assert!(
            std::time::Instant::now() < deadline,
            "x never showed theirs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Rename and rewrite: the copy's ETag is the version the next upload replaces.
    write_synced(&m.join("a"), b"one");
    std::fs::rename(m.join("a"), m.join("b")).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("b"))
        .unwrap();
    f.write_all(b" two").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(m.stop().success());
    assert_eq!(get_object(&client, &bucket, "c/b").await, b"one two");
    let keys = list_keys(&client, &bucket, "c/").await;
    assert_eq!(
        keys.iter().filter(|k| k.contains(".conflict-")).count(),
        1,
        "only the real conflict: {keys:?}"
    );
}
