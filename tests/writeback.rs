//! The crash-safe write-back cache through a real mount (SeaweedFS unless stated): close at local
//! speed, upload in the background, fsync means in S3, SIGTERM drains, SIGKILL loses nothing
//! that was closed, a multipart upload resumes without resending finished parts, a rewrite
//! during an upload wins, a second daemon cannot share the cache, the budget holds, and an S3
//! outage delays uploads without losing them.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mount::{self, Mount};
use common::proxy::FaultProxy;
use common::s3::{self, Server, get_object, list_keys, sdk_client};

const MIB: usize = 1 << 20;
const SERVER: Server = Server::SeaweedFs;

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

/// Wait until every `(key, bytes)` is in the bucket, byte for byte (at most `limit`).
async fn wait_all(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    expected: &[(String, Vec<u8>)],
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let keys = list_keys(client, bucket, "").await;
        if expected.iter().all(|(k, _)| keys.contains(k)) {
            let mut all_equal = true;
            for (key, bytes) in expected {
                let got = get_object(client, bucket, key).await;
                if &got != bytes {
                    assert!(
                        Instant::now() < deadline,
                        "{key}: {} bytes, expected {}",
                        got.len(),
                        bytes.len()
                    );
                    all_equal = false;
                    break;
                }
            }
            if all_equal {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} objects arrived",
            keys.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Objects present now must be complete versions of what was written: never partial, never a
/// zero-byte stand-in.
async fn assert_no_partial_objects(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    expected: &[(String, Vec<u8>)],
) {
    for key in list_keys(client, bucket, "").await {
        let want = &expected
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("unexpected {key}"))
            .1;
        let got = get_object(client, bucket, &key).await;
        assert!(
            &got == want,
            "{key} is visible but not complete ({} of {} bytes)",
            got.len(),
            want.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_is_local_stat_and_read_see_the_new_file_before_the_upload() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let m = Mount::s3(SERVER, &bucket, "owui", &["--writeback-delay", "3s"]);
    let body = data(300_000, 1);
    std::fs::write(m.join("upload.pdf"), &body).unwrap();
    // Open WebUI stats and reads the file milliseconds after close.
    assert_eq!(
        std::fs::metadata(m.join("upload.pdf")).unwrap().len(),
        body.len() as u64
    );
    assert!(std::fs::read(m.join("upload.pdf")).unwrap() == body);
    let names: Vec<_> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["upload.pdf"]);
    assert!(
        list_keys(&client, &bucket, "").await.is_empty(),
        "uploaded before the write-back delay"
    );
    wait_all(
        &client,
        &bucket,
        &[("owui/upload.pdf".into(), body)],
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fsync_returns_once_the_object_is_in_the_bucket() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let m = Mount::s3(SERVER, &bucket, "", &["--writeback-delay", "1h"]);
    for (i, size) in [10, 20 * MIB].into_iter().enumerate() {
        let body = data(size, i as u64);
        let name = format!("f{i}");
        let mut f = std::fs::File::create(m.join(&name)).unwrap();
        f.write_all(&body).unwrap();
        f.sync_all().unwrap();
        assert!(
            get_object(&client, &bucket, &name).await == body,
            "fsync returned before {name} was in S3"
        );
        // A write after the fsync makes it dirty again; the next fsync waits for that too.
        f.write_all(b"more").unwrap();
        f.sync_data().unwrap();
        let mut longer = body.clone();
        longer.extend_from_slice(b"more");
        assert!(get_object(&client, &bucket, &name).await == longer);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_uploads_50_dirty_files_then_exits_zero() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let m = Mount::s3(SERVER, &bucket, "", &["--writeback-delay", "1h"]);
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("dirty-{i:02}"), data(1000 + i * 3000, i as u64)))
        .collect();
    for (name, body) in &files {
        std::fs::write(m.join(name), body).unwrap();
    }
    assert!(list_keys(&client, &bucket, "").await.is_empty());
    let status = m.stop();
    assert!(status.success(), "{status}");
    let keys = list_keys(&client, &bucket, "").await;
    assert_eq!(
        keys.len(),
        50,
        "every dirty file is in S3 when the daemon exits"
    );
    wait_all(&client, &bucket, &files, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_uploads_of_200_files_then_a_restart_uploads_everything() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let cache = tempfile::tempdir().unwrap();
    let m = Mount::s3_with_cache(
        SERVER,
        &bucket,
        "p",
        &["--writeback-delay", "0s", "--max-uploads", "1"],
        cache.path(),
    );
    let files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| {
            (
                format!("p/f{i:03}"),
                data(20_000 + (i % 7) * 50_000, i as u64),
            )
        })
        .collect();
    std::thread::scope(|scope| {
        for chunk in files.chunks(25) {
            let m = &m;
            scope.spawn(move || {
                for (key, body) in chunk {
                    std::fs::write(m.join(key.strip_prefix("p/").unwrap()), body).unwrap();
                }
            });
        }
    });
    // Every file is closed: kill the daemon while the uploader (one at a time) is mid-way.
    m.kill();
    let arrived = list_keys(&client, &bucket, "").await.len();
    assert!(
        arrived < 200,
        "all uploads finished before the kill; the test proves nothing"
    );
    assert_no_partial_objects(&client, &bucket, &files).await;
    let m = Mount::s3_with_cache(SERVER, &bucket, "p", &[], cache.path());
    wait_all(&client, &bucket, &files, Duration::from_secs(60)).await;
    assert!(m.stop().success());
    eprintln!("{arrived} of 200 objects were in S3 at the kill; the restart uploaded the rest");
}

/// The kill lands during a 100 MiB multipart upload: the restart resumes it and sends only the
/// parts the journal does not list as finished.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_multipart_upload_resumes_it_without_resending_parts() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let cache = tempfile::tempdir().unwrap();
    let args = ["--writeback-delay", "0s", "--upload-concurrency", "1"];
    let m = Mount::s3_with_cache(SERVER, &bucket, "", &args, cache.path());
    let body = data(100 * MIB, 42);
    std::fs::write(m.join("model.gguf"), &body).unwrap();
    // Wait until the journal lists at least 3 finished parts (of 13), then crash.
    let journal_parts = |cache: &Path| -> usize {
        let dir = std::fs::read_dir(cache.join(mount_subdir(cache)).join("journal")).unwrap();
        dir.filter_map(|e| std::fs::read(e.unwrap().path()).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map(|v| v["upload"]["parts"].as_array().map_or(0, Vec::len))
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_parts(cache.path()) < 3 {
        assert!(
            Instant::now() < deadline,
            "the multipart upload never got going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    m.kill();
    let done = journal_parts(cache.path());
    assert!(done < 13, "the upload finished before the kill");
    assert!(
        list_keys(&client, &bucket, "").await.is_empty(),
        "a partial object was published"
    );
    let m = Mount::s3_with_cache(SERVER, &bucket, "", &[], cache.path());
    wait_all(
        &client,
        &bucket,
        &[("model.gguf".into(), body)],
        Duration::from_secs(60),
    )
    .await;
    let log = m.log_text();
    let uploads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("multipart") || l.contains("upload failed"))
        .collect();
    let line = log
        .lines()
        .find(|l| l.contains("resuming multipart upload"))
        .expect(&log);
    assert!(
        line.contains(&format!("done={done}")) && line.contains(&format!("missing={}", 13 - done)),
        "journal had {done} parts at the kill; the restart logged:\n{}",
        uploads.join("\n")
    );
    let head = client
        .head_object()
        .bucket(&bucket)
        .key("model.gguf")
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().ends_with("-13\""),
        "one 13-part upload: {:?}",
        head.e_tag()
    );
    eprintln!(
        "{done} of 13 parts were done at the kill; the restart sent {}",
        13 - done
    );
}

/// The single per-mount subdirectory of a cache root.
fn mount_subdir(cache: &Path) -> std::path::PathBuf {
    let mut dirs = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name());
    let first = dirs.next().expect("no mount cache directory");
    first.into()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewrite_during_an_upload_is_what_ends_up_in_the_bucket() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let m = Mount::s3(
        SERVER,
        &bucket,
        "",
        &["--writeback-delay", "0s", "--upload-concurrency", "1"],
    );
    let mut last = Vec::new();
    for round in 0..4 {
        last = data(24 * MIB + round, round as u64 + 100);
        std::fs::write(m.join("busy.bin"), &last).unwrap();
        std::thread::sleep(Duration::from_millis(150)); // let an upload start
    }
    wait_all(
        &client,
        &bucket,
        &[("busy.bin".into(), last.clone())],
        Duration::from_secs(60),
    )
    .await;
    // It stays the last version (no older upload lands after it).
    std::thread::sleep(Duration::from_secs(2));
    assert!(get_object(&client, &bucket, "busy.bin").await == last);
    assert!(std::fs::read(m.join("busy.bin")).unwrap() == last);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_cache_is_refused() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let cache = tempfile::tempdir().unwrap();
    let _first = Mount::s3_with_cache(SERVER, &bucket, "", &[], cache.path());
    let mnt = tempfile::tempdir().unwrap();
    let out = mount::s3_command(SERVER, &bucket, "")
        .arg(mnt.path())
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another bucketfs process"),
        "{stderr}"
    );
    assert!(!mount::is_mounted(mnt.path()));
}

/// 1 GiB in 200 files through a 64 MiB cache: the cache never passes the budget by more than a
/// part, writers wait for uploads instead of failing, and every byte lands.
#[tokio::test(flavor = "multi_thread")]
async fn the_cache_budget_holds_and_back_pressure_loses_nothing() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let cache = tempfile::tempdir().unwrap();
    let m = Mount::s3_with_cache(
        SERVER,
        &bucket,
        "",
        &["--cache-size", "64MiB", "--writeback-delay", "0s"],
        cache.path(),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(dir_bytes(cache.path()));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        for i in 0..200u64 {
            let body = data(5 * MIB + 123, i);
            std::fs::write(m.join(&format!("f{i:03}")), &body).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    let budget = 64 * MIB as u64;
    assert!(
        peak <= budget + 8 * MIB as u64,
        "cache peaked at {} MiB",
        peak / MIB as u64
    );
    let expected: Vec<(String, Vec<u8>)> = (0..200u64)
        .map(|i| (format!("f{i:03}"), data(5 * MIB + 123, i)))
        .collect();
    wait_all(&client, &bucket, &expected, Duration::from_secs(120)).await;
    eprintln!(
        "cache peak {:.1} MiB for a 64 MiB budget",
        peak as f64 / MIB as f64
    );
}

/// Bytes of data files under `dir` (allocated blocks, so sparse holes do not count).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            total += dir_bytes(&e.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// S3 goes away while files are written: close still succeeds, the files read back from the
/// cache, nothing is lost, and everything lands once S3 is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_s3_outage_delays_uploads_without_losing_them() {
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let proxy = FaultProxy::start(&s3::endpoint(SERVER));
    let mut cmd = mount::command();
    cmd.arg("mount")
        .arg(format!("s3://{bucket}/"))
        .args([
            "--endpoint-url",
            &proxy.endpoint(),
            "--region",
            s3::REGION,
            "--writeback-delay",
            "2s",
        ])
        .env("S3_ACCESS_KEY_ID", s3::access_key(SERVER))
        .env("S3_SECRET_ACCESS_KEY", s3::secret_key(SERVER));
    let m = Mount::start(cmd);
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("o{i}"), data(100_000 * (i + 1), i as u64)))
        .collect();
    for (name, body) in &files {
        std::fs::write(m.join(name), body).unwrap();
    }
    // S3 goes down before the write-back delay ends: every upload attempt fails for a while.
    proxy.set_down(true);
    std::thread::sleep(Duration::from_secs(5));
    for (name, body) in &files {
        assert!(
            &std::fs::read(m.join(name)).unwrap() == body,
            "{name} reads back while S3 is down"
        );
    }
    assert!(list_keys(&client, &bucket, "").await.is_empty());
    proxy.set_down(false);
    wait_all(&client, &bucket, &files, Duration::from_secs(90)).await;
    assert!(
        m.log_text().contains("upload failed; retrying"),
        "the failures were logged"
    );
    assert!(m.stop().success());
}

/// Parts of `key`'s unfinished multipart uploads in `bucket` (all uploads together).
async fn streamed_parts(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> usize {
    let uploads = client
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    let mut parts = 0;
    for u in uploads.uploads() {
        let listed = client
            .list_parts()
            .bucket(bucket)
            .key(key)
            .upload_id(u.upload_id().unwrap())
            .send()
            .await
            .unwrap();
        parts += listed.parts().len();
    }
    parts
}

/// A large file written sequentially goes up while it is written: its complete parts are in S3
/// before the close (and nothing is published), and the close only sends the tail. A rewrite
/// of bytes already sent voids those parts, and the object still ends up exactly as written.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_sequential_write_is_uploaded_while_it_is_written() {
    use std::os::unix::fs::FileExt;
    let bucket = s3::fresh_bucket(SERVER).await;
    let client = sdk_client(SERVER).await;
    let m = Mount::s3(SERVER, &bucket, "", &["--writeback-delay", "1h"]);
    for (name, rewrite) in [("streamed.bin", false), ("rewritten.bin", true)] {
        let mut body = data(40 * MIB, 7);
        let mut f = std::fs::File::create(m.join(name)).unwrap();
        for piece in body.chunks(MIB) {
            f.write_all(piece).unwrap();
        }
        // Still open: parts 1-4 of 5 go up meanwhile (the last complete one waits for the close).
        let deadline = Instant::now() + Duration::from_secs(60);
        while streamed_parts(&client, &bucket, name).await < 4 {
            assert!(
                Instant::now() < deadline,
                "no parts streamed for {name}\n{}",
                m.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            list_keys(&client, &bucket, name).await.is_empty(),
            "published while open"
        );
        if rewrite {
            // Voids the streamed upload: this file then waits for the write-back delay like any
            // other, so fsync it.
            body[..5].copy_from_slice(b"HELLO");
            f.write_all_at(b"HELLO", 0).unwrap();
            f.sync_all().unwrap();
        }
        drop(f);
        // Written with a 1 h write-back delay: a file whose parts were streamed goes at once.
        wait_all(
            &client,
            &bucket,
            &[(name.to_string(), body)],
            Duration::from_secs(60),
        )
        .await;
        let head = client
            .head_object()
            .bucket(&bucket)
            .key(name)
            .send()
            .await
            .unwrap();
        assert!(
            head.e_tag().unwrap().ends_with("-5\""),
            "{name}: {:?}",
            head.e_tag()
        );
        assert_eq!(
            streamed_parts(&client, &bucket, name).await,
            0,
            "{name}: an upload was left behind"
        );
    }
    assert!(m.stop().success());
}
