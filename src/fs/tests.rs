//! Core tests: the filesystem without FUSE, on the in-memory store, through a fault-injecting
//! wrapper. Fast, and they exercise what a real mount cannot easily force (a failure rate on
//! every request, a permanent error, a crash between two exact points).

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::{FaultyStore, MemoryStore};

fn config(cache: &std::path::Path) -> FsConfig {
    FsConfig {
        cache_dir: cache.to_path_buf(),
        writeback_delay: Duration::from_millis(10),
        part_size: 5 << 20,
        ..FsConfig::default()
    }
}

async fn write_file(fs: &Filesystem, name: &str, body: &[u8]) {
    let (_, fh) = fs
        .create(ROOT_INO, name, 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    for (i, chunk) in body.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, chunk).await.unwrap();
    }
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
}

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_survive_a_30_percent_failure_rate() {
    let memory = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(memory.clone()));
    faulty.set_seed(7);
    faulty.set_failure_rate(0.3);
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(faulty.clone(), "p/".into(), config(cache.path())).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("f{i}"),
                body(if i % 5 == 0 { 12 << 20 } else { 1000 * i }, i as u8),
            )
        })
        .collect();
    for (name, data) in &files {
        write_file(&fs, name, data).await;
        // Reads are served locally while the uploads fail and retry.
        let fh = fs
            .open(
                fs.lookup(ROOT_INO, name).await.unwrap().attr.ino,
                OpenMode::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            &fs.read(fh, 0, data.len() as u32).await.unwrap()[..],
            &data[..]
        );
        fs.release(fh).await.unwrap();
    }
    assert_eq!(
        fs.drain(Duration::from_secs(120)).await,
        0,
        "everything lands despite the faults"
    );
    for (name, data) in &files {
        let got = memory
            .get_range(&format!("p/{name}"), 0..u64::MAX, None)
            .await
            .unwrap();
        assert!(got == data[..], "{name} differs");
    }
    assert!(faulty.total_failures() > 0, "the test injected no failure");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_error_keeps_the_data_dirty_and_retries() {
    let memory = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(memory.clone()));
    faulty.fail_next_op("put", 1, || StoreError::PermissionDenied("injected".into()));
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(faulty.clone(), String::new(), config(cache.path())).unwrap();
    let (_, fh) = fs
        .create(ROOT_INO, "x", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"precious").await.unwrap();
    let err = fs.fsync(fh).await.unwrap_err();
    assert_eq!(err.errno_value(), libc::EIO);
    assert!(memory.head("x").await.is_err(), "nothing was published");
    // The next fsync retries (the fault is gone) and succeeds.
    fs.fsync(fh).await.unwrap();
    assert_eq!(
        &memory.get_range("x", 0..100, None).await.unwrap()[..],
        b"precious"
    );
    fs.release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_uploads_what_the_journal_holds() {
    let memory = Arc::new(MemoryStore::new());
    let faulty = Arc::new(FaultyStore::new(memory.clone()));
    faulty.set_outage(true);
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    {
        let fs = Filesystem::new(faulty.clone(), String::new(), config(&cache)).unwrap();
        write_file(&fs, "a", b"first life").await;
        write_file(&fs, "big", &body(11 << 20, 3)).await;
        // A daemon that dies here: dropping it does not remove journaled data.
        assert_eq!(fs.drain(Duration::from_millis(300)).await, 2);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    faulty.set_outage(false);
    let fs = Filesystem::new(faulty.clone(), String::new(), config(&cache)).unwrap();
    // Visible before the upload, from the recovered journal.
    let entry = fs.lookup(ROOT_INO, "a").await.unwrap();
    assert_eq!(entry.attr.size, 10);
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    assert_eq!(
        &memory.get_range("a", 0..100, None).await.unwrap()[..],
        b"first life"
    );
    assert!(memory.get_range("big", 0..u64::MAX, None).await.unwrap() == body(11 << 20, 3)[..]);
}

/// A file written here, uploaded (clean, still cached), then renamed: the new key must hold it
/// (a server-side copy), the old key must be gone, and nothing is lost when the cache drops it.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_a_clean_cached_file_copies_it_in_s3() {
    let memory = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), String::new(), config(cache.path())).unwrap();
    let (_, fh) = fs
        .create(ROOT_INO, "a", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(fh, 0, b"keep me").await.unwrap();
    fs.fsync(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    fs.rename(ROOT_INO, "a", ROOT_INO, "b", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    assert_eq!(
        &memory.get_range("b", 0..100, None).await.unwrap()[..],
        b"keep me"
    );
    assert!(memory.head("a").await.is_err());
}

/// Opening for writing a file whose S3 state is unknown (created here, uploaded, evicted) must
/// fetch the object, not upload an empty file over it.
#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_file_is_fetched_not_replaced_by_an_empty_one() {
    let memory = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(cache.path());
    cfg.cache_limits.max_bytes = 100; // every clean file is evicted at the next reservation
    let fs = Filesystem::new(memory.clone(), String::new(), cfg).unwrap();
    write_file(&fs, "a", &[7u8; 80]).await;
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    write_file(&fs, "b", &[8u8; 60]).await; // evicts "a"
    let ino = fs.lookup(ROOT_INO, "a").await.unwrap().attr.ino;
    let fh = fs
        .open(
            ino,
            OpenMode {
                write: true,
                truncate: false,
                append: true,
            },
        )
        .await
        .unwrap();
    fs.write(fh, 0, b"!").await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    let got = memory.get_range("a", 0..1000, None).await.unwrap();
    assert_eq!(got.len(), 81, "the object kept its 80 bytes and gained one");
}

// ---- lost-update guard (conditional writes) ---------------------------------------------------

/// Every key of `store` under `prefix`, with its bytes.
async fn objects(store: &MemoryStore, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let page = store
        .list(ListRequest {
            prefix,
            ..ListRequest::default()
        })
        .await
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for o in page.objects {
        let body = store.get_range(&o.key, 0..u64::MAX, None).await.unwrap();
        out.insert(o.key, body.to_vec());
    }
    out
}

async fn put_external(store: &MemoryStore, key: &str, body: &[u8]) {
    store
        .put(
            key,
            crate::store::Body::Bytes(Bytes::copy_from_slice(body)),
            &PutOptions::default(),
        )
        .await
        .unwrap();
}

/// Open `name` for writing (staging it from S3), let `meanwhile` change the bucket, then write
/// `mine` at offset 0 and close; returns once everything is uploaded.
async fn write_after<F: std::future::Future<Output = ()>>(
    fs: &Filesystem,
    name: &str,
    mine: &[u8],
    meanwhile: F,
) {
    let ino = fs.lookup(ROOT_INO, name).await.unwrap().attr.ino;
    let mode = OpenMode {
        write: true,
        ..OpenMode::default()
    };
    let fh = fs.open(ino, mode).await.unwrap();
    meanwhile.await;
    fs.write(fh, 0, mine).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
}

/// The single conflict copy of `key` among `objects`.
fn conflict_of<'a>(
    objects: &'a std::collections::BTreeMap<String, Vec<u8>>,
    key: &str,
) -> (&'a String, &'a Vec<u8>) {
    let copies: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{key}.conflict-")))
        .collect();
    assert_eq!(copies.len(), 1, "one conflict copy of {key}: {objects:?}");
    copies[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_changed_in_s3_meanwhile_is_kept_under_a_conflict_name() {
    let memory = Arc::new(MemoryStore::new());
    put_external(&memory, "p/x", b"version one").await;
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), "p/".into(), config(cache.path())).unwrap();
    write_after(&fs, "x", b"MINE", put_external(&memory, "p/x", b"theirs")).await;
    let objects = objects(&memory, "p/").await;
    assert_eq!(objects["p/x"], b"theirs", "their version stands");
    let (key, body) = conflict_of(&objects, "p/x");
    assert_eq!(body, b"MINEion one", "the local version is kept whole");
    assert_eq!(fs.writeback().stats().conflicts, 1);
    // Both show in the mount, by name and in listings.
    let name = key.strip_prefix("p/").unwrap();
    assert!(name.len() <= NAME_MAX);
    let entry = fs.lookup(ROOT_INO, name).await.unwrap();
    assert_eq!(entry.attr.size, 11);
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let names: Vec<String> = fs
        .readdir_to_end(fh)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"x".to_string()) && names.contains(&name.to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_file_never_replaces_one_another_client_created() {
    let memory = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(cache.path());
    cfg.writeback_delay = Duration::from_secs(60); // the other client is quicker
    let fs = Filesystem::new(memory.clone(), String::new(), cfg).unwrap();
    write_file(&fs, "n", b"mine").await;
    put_external(&memory, "n", b"theirs").await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    let objects = objects(&memory, "").await;
    assert_eq!(objects["n"], b"theirs");
    assert_eq!(conflict_of(&objects, "n").1, b"mine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_over_a_changed_object_is_kept_under_a_conflict_name() {
    let memory = Arc::new(MemoryStore::new());
    let big = body(11 << 20, 9);
    put_external(&memory, "big", &big).await;
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), String::new(), config(cache.path())).unwrap();
    write_after(
        &fs,
        "big",
        b"MINE",
        put_external(&memory, "big", b"small now"),
    )
    .await;
    let objects = objects(&memory, "").await;
    assert_eq!(objects["big"], b"small now");
    let mut expected = big.clone();
    expected[..4].copy_from_slice(b"MINE");
    assert!(*conflict_of(&objects, "big").1 == expected);
    let uploads = memory.list_multipart_uploads("").await.unwrap();
    assert!(
        uploads.is_empty(),
        "the refused upload was aborted: {uploads:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_deleted_in_s3_meanwhile_is_created_anew() {
    let memory = Arc::new(MemoryStore::new());
    put_external(&memory, "x", b"version one").await;
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), String::new(), config(cache.path())).unwrap();
    write_after(&fs, "x", b"MINE", async {
        memory.delete("x").await.unwrap();
    })
    .await;
    let objects = objects(&memory, "").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects["x"], b"MINEion one");
    assert_eq!(fs.writeback().stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn successive_uploads_and_renames_raise_no_false_conflict() {
    let memory = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), String::new(), config(cache.path())).unwrap();
    write_file(&fs, "a", b"one").await;
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    write_after(&fs, "a", b"two", async {}).await;
    fs.rename(ROOT_INO, "a", ROOT_INO, "b", RenameFlags::default())
        .await
        .unwrap();
    write_after(&fs, "b", b"six", async {}).await;
    let objects = objects(&memory, "").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects["b"], b"six");
    assert_eq!(fs.writeback().stats().conflicts, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_conditional_writes_the_last_upload_wins() {
    let memory = Arc::new(MemoryStore::new());
    put_external(&memory, "x", b"version one").await;
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(cache.path());
    cfg.conditional_writes = false;
    let fs = Filesystem::new(memory.clone(), String::new(), cfg).unwrap();
    write_after(&fs, "x", b"MINE", put_external(&memory, "x", b"theirs")).await;
    let objects = objects(&memory, "").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects["x"], b"MINEion one");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_found_by_fsync_is_visible_by_name() {
    let memory = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let fs = Filesystem::new(memory.clone(), "c/".into(), config(cache.path())).unwrap();
    write_file(&fs, "y", b"version one").await;
    assert_eq!(fs.drain(Duration::from_secs(10)).await, 0);
    let ino = fs.lookup(ROOT_INO, "y").await.unwrap().attr.ino;
    let mode = OpenMode {
        write: true,
        append: true,
        ..OpenMode::default()
    };
    let fh = fs.open(ino, mode).await.unwrap();
    put_external(&memory, "c/y", b"theirs").await;
    fs.write(fh, 0, b" + mine").await.unwrap();
    fs.fsync(fh).await.unwrap();
    let objects = objects(&memory, "c/").await;
    let (key, _) = conflict_of(&objects, "c/y");
    let name = key.strip_prefix("c/").unwrap().to_string();
    fs.lookup(ROOT_INO, &name).await.unwrap();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let entry = fs.lookup(ROOT_INO, &name).await.unwrap();
    assert_eq!(entry.attr.size, 18);
}

// ---- sparse staging of large objects -----------------------------------------------------------

/// A `size`-byte object put behind the filesystem's back, and a filesystem counting requests.
async fn large_object(
    key: &str,
    size: usize,
    cache: &std::path::Path,
) -> (Arc<MemoryStore>, Arc<FaultyStore>, Filesystem, Vec<u8>) {
    let memory = Arc::new(MemoryStore::new());
    let original = body(size, 5);
    put_external(&memory, key, &original).await;
    let counted = Arc::new(FaultyStore::new(memory.clone()));
    let fs = Filesystem::new(counted.clone(), String::new(), config(cache)).unwrap();
    (memory, counted, fs, original)
}

/// A filesystem over a new memory store, through a wrapper that counts (and can slow) its
/// requests.
fn counted_fs(cache: &std::path::Path) -> (Arc<MemoryStore>, Arc<FaultyStore>, Filesystem) {
    let memory = Arc::new(MemoryStore::new());
    let counted = Arc::new(FaultyStore::new(memory.clone()));
    let fs = Filesystem::new(counted.clone(), String::new(), config(cache)).unwrap();
    (memory, counted, fs)
}

/// Wait up to 6 s until `store` has seen `n` calls of `op`; whether it has.
async fn saw_calls(store: &FaultyStore, op: &str, n: usize) -> bool {
    for _ in 0..600 {
        if store.calls(op) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn open_rw(fs: &Filesystem, name: &str, append: bool) -> u64 {
    let ino = fs.lookup(ROOT_INO, name).await.unwrap().attr.ino;
    let mode = OpenMode {
        write: true,
        append,
        truncate: false,
    };
    fs.open(ino, mode).await.unwrap()
}

async fn close(fs: &Filesystem, fh: u64) {
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn appending_to_a_large_object_downloads_nothing_and_copies_its_parts() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, counted, fs, mut expected) = large_object("big", 40 << 20, cache.path()).await;
    let fh = open_rw(&fs, "big", true).await;
    fs.write(fh, 0, b"appended").await.unwrap();
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    expected.extend_from_slice(b"appended");
    let got = memory.get_range("big", 0..u64::MAX, None).await.unwrap();
    assert!(
        got == expected[..],
        "the object is the original plus the append"
    );
    assert_eq!(counted.calls("get_range"), 0, "nothing was downloaded");
    // 40 MiB in 5 MiB parts: all 8 copied server-side; the appended bytes are a 9th part.
    assert_eq!(counted.calls("upload_part_copy"), 8);
    assert_eq!(counted.calls("upload_part"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_into_a_large_object_fetches_only_the_pieces_it_needs() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, counted, fs, mut expected) = large_object("big", 40 << 20, cache.path()).await;
    let fh = open_rw(&fs, "big", false).await;
    fs.write(fh, 17 << 20, b"0123456789").await.unwrap();
    expected[17 << 20..(17 << 20) + 10].copy_from_slice(b"0123456789");
    // Reads see the base's bytes and the write, from one GET of an 8 MiB piece each.
    let got = fs.read(fh, (17 << 20) - 2, 14).await.unwrap();
    assert_eq!(&got[..], &expected[(17 << 20) - 2..(17 << 20) + 12]);
    let got = fs.read(fh, 30 << 20, 4096).await.unwrap();
    assert_eq!(&got[..], &expected[30 << 20..(30 << 20) + 4096]);
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    let got = memory.get_range("big", 0..u64::MAX, None).await.unwrap();
    assert!(got == expected[..]);
    let fetched = counted.calls("get_range");
    assert!(fetched <= 4, "{fetched} GETs: more than the touched pieces");
    assert!(
        counted.calls("upload_part_copy") >= 4,
        "untouched parts are copied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_file_survives_a_restart_and_a_rename() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let memory = Arc::new(MemoryStore::new());
    let mut expected = body(40 << 20, 6);
    put_external(&memory, "big", &expected).await;
    {
        let mut cfg = config(&cache);
        cfg.writeback_delay = Duration::from_secs(3600); // nothing uploads before the "crash"
        let fs = Filesystem::new(memory.clone(), String::new(), cfg).unwrap();
        let fh = open_rw(&fs, "big", false).await;
        fs.write(fh, 1 << 20, b"survives").await.unwrap();
        close(&fs, fh).await;
    } // dropped without a drain: as a daemon killed here
    expected[1 << 20..(1 << 20) + 8].copy_from_slice(b"survives");
    let fs = Filesystem::new(memory.clone(), String::new(), config(&cache)).unwrap();
    // Its unfetched bytes are the old key's: the rename fetches them before deleting it.
    fs.rename(ROOT_INO, "big", ROOT_INO, "moved", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    assert!(memory.head("big").await.is_err());
    let got = memory.get_range("moved", 0..u64::MAX, None).await.unwrap();
    assert!(
        got == expected[..],
        "the moved file is the base plus the write"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_file_truncated_and_grown_keeps_exactly_its_bytes() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, _, fs, original) = large_object("big", 40 << 20, cache.path()).await;
    let fh = open_rw(&fs, "big", false).await;
    let ino = fs.lookup(ROOT_INO, "big").await.unwrap().attr.ino;
    let set_len = |size| SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    fs.setattr(ino, set_len(3 << 20)).await.unwrap();
    fs.setattr(ino, set_len(4 << 20)).await.unwrap();
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    let mut expected = original[..3 << 20].to_vec();
    expected.resize(4 << 20, 0);
    let got = memory.get_range("big", 0..u64::MAX, None).await.unwrap();
    assert!(got == expected[..], "3 MiB of the base, then zeros");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sparse_file_whose_base_is_replaced_stays_dirty_and_overwrites_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, _, fs, _) = large_object("big", 40 << 20, cache.path()).await;
    let fh = open_rw(&fs, "big", true).await;
    fs.write(fh, 0, b"mine").await.unwrap();
    put_external(&memory, "big", b"theirs").await;
    let err = fs.fsync(fh).await.unwrap_err();
    assert_eq!(err.errno_value(), libc::EIO);
    close(&fs, fh).await;
    assert_eq!(
        &memory.get_range("big", 0..u64::MAX, None).await.unwrap()[..],
        b"theirs"
    );
    assert_eq!(fs.drain(Duration::from_millis(300)).await, 1, "still dirty");
}

/// Found by the real-mount reference model: a file rewritten while its first upload (of a new
/// name) was in flight took that upload for another client's and was kept as a conflict copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_rewrite_during_the_first_upload_is_no_conflict() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, slow, fs) = counted_fs(cache.path());
    slow.set_latency(Duration::from_millis(300));
    write_file(&fs, "z", b"first").await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the upload is in flight
    let fh = open_rw(&fs, "z", false).await;
    fs.write(fh, 0, b"FIRST").await.unwrap();
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    let objects = objects(&memory, "").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects["z"], b"FIRST");
    assert_eq!(fs.writeback().stats().conflicts, 0);
}

/// A truncate while the parts of a multipart upload are read from the cache file cuts their
/// ranges short: that attempt is superseded, so its multipart upload is aborted (not left in
/// the bucket), it counts as no failure, and `fsync` returns once the new contents are in (the
/// model test found it as an `fsync` error).
#[tokio::test(flavor = "multi_thread")]
async fn a_truncate_during_a_multipart_upload_supersedes_it() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, slow, fs) = counted_fs(cache.path());
    write_file(&fs, "t", &body(12 << 20, 1)).await;
    let ino = fs.lookup(ROOT_INO, "t").await.unwrap().attr.ino;
    let fh = fs.open(ino, OpenMode::default()).await.unwrap();
    // Every request waits, so the parts' bodies are read after the truncate below.
    slow.set_latency(Duration::from_millis(300));
    let (synced, truncated) = tokio::join!(fs.fsync(fh), async {
        while slow.calls("upload_part") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let change = SetAttr {
            size: Some(1000),
            ..SetAttr::default()
        };
        fs.setattr(ino, change).await
    });
    truncated.unwrap();
    synced.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    assert_eq!(objects(&memory, "").await["t"], body(1000, 1));
    let left = memory.list_multipart_uploads("").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(fs.writeback().stats().failed_attempts, 0);
}

/// A file unlinked while the streaming uploader has parts of it in S3 leaves no multipart
/// upload behind (it would be billed storage no listing shows).
#[tokio::test(flavor = "multi_thread")]
async fn an_unlinked_file_leaves_no_multipart_upload_behind() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, counted, fs) = counted_fs(cache.path());
    let (_, fh) = fs
        .create(ROOT_INO, "u", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    for (i, chunk) in body(12 << 20, 2).chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, chunk).await.unwrap();
    }
    assert!(
        saw_calls(&counted, "upload_part", 1).await,
        "nothing streamed"
    );
    fs.unlink(ROOT_INO, "u").await.unwrap();
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    let mut left = Vec::new();
    for _ in 0..200 {
        left = memory.list_multipart_uploads("").await.unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left.is_empty(), "{left:?}");
    assert!(objects(&memory, "").await.is_empty());
}

/// The streaming uploader sends the parts of a file while it is written; a rewrite of a part
/// already sent voids them, and what is completed at the close is exactly the file. Nothing is
/// published while the file is open, and no multipart upload is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_parts_are_voided_by_a_rewrite_and_the_object_is_exact() {
    let cache = tempfile::tempdir().unwrap();
    let (memory, counted, fs) = counted_fs(cache.path());
    let mut expected = body(26 << 20, 3);
    let (_, fh) = fs
        .create(ROOT_INO, "f", 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    for (i, chunk) in expected.chunks(1 << 20).enumerate() {
        fs.write(fh, (i << 20) as u64, chunk).await.unwrap();
    }
    // 26 MiB in 5 MiB parts: parts 1-4 are complete, 1-3 go up while the file is open.
    assert!(
        saw_calls(&counted, "upload_part", 3).await,
        "nothing streamed"
    );
    assert!(
        objects(&memory, "").await.is_empty(),
        "published while open"
    );
    fs.write(fh, 6 << 20, b"rewritten").await.unwrap();
    expected[6 << 20..(6 << 20) + 9].copy_from_slice(b"rewritten");
    close(&fs, fh).await;
    assert_eq!(fs.drain(Duration::from_secs(30)).await, 0);
    assert_eq!(objects(&memory, "").await.get("f"), Some(&expected));
    assert!(memory.list_multipart_uploads("").await.unwrap().is_empty());
}

/// A directory of 100,000 objects lists completely, one LIST page per chunk, and memory stays
/// bounded: no chunk holds more than a page (plus `.` and `..`), and with nothing the kernel
/// holds on to, the inode table ends with at most `LISTING_MAX` plus a page of entries, not one
/// per object.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_of_100_000_objects_lists_in_bounded_memory() {
    const N: usize = 100_000;
    let store = Arc::new(MemoryStore::new());
    for i in 0..N {
        let key = format!("p/big/f{i:06}");
        store
            .put(
                &key,
                crate::store::Body::Bytes(Bytes::new()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let config = FsConfig {
        listing_attributes: true, // no HEAD per entry: 100,000 would only slow the test
        ..config(cache.path())
    };
    let fs = Filesystem::new(store, "p/".into(), config).unwrap();
    let dir = fs.lookup(ROOT_INO, "big").await.unwrap().attr.ino;
    let fh = fs.opendir(dir).await.unwrap();
    let (mut offset, mut listed, mut largest) = (0, 0, 0);
    loop {
        let chunk = fs.readdir(fh, offset).await.unwrap();
        let Some(last) = chunk.last() else { break };
        offset = last.offset;
        largest = largest.max(chunk.len());
        listed += chunk.iter().filter(|e| e.name.starts_with('f')).count();
    }
    fs.releasedir(fh);
    assert_eq!(listed, N);
    assert!(largest <= 1002, "a chunk of {largest} entries");
    let inodes = fs.table().len();
    assert!(
        inodes <= LISTING_MAX + 1100,
        "{inodes} inodes after the listing"
    );
}
