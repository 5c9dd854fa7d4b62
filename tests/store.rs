//! The store conformance suite on every implementation: memory, dir, and S3 on the two real
//! local servers (DESIGN.md §8, §10), plus the directory store's own guarantees (layout,
//! restart, one process at a time).

mod common;

use bytes::Bytes;
use common::s3::{self, Server};

use bucketfs::store::conformance::{self, Profile, pattern};
use bucketfs::store::{
    Body, CompletedPart, Condition, DirStore, ListRequest, MIN_PART_SIZE, MemoryStore, Metadata,
    ObjectStore, PutOptions, StoreError, md5_hex, multipart_etag,
};

fn bytes(data: &[u8]) -> Body {
    Body::Bytes(Bytes::copy_from_slice(data))
}

async fn read_all(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let size = store.head(key).await.expect("head").size;
    store
        .get_range(key, 0..size, None)
        .await
        .expect("get")
        .to_vec()
}

async fn list_keys(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut continuation = None;
    loop {
        let page = store
            .list(ListRequest {
                prefix,
                continuation,
                ..Default::default()
            })
            .await
            .expect("list");
        keys.extend(page.objects.into_iter().map(|o| o.key));
        match page.next {
            Some(next) => continuation = Some(next),
            None => return keys,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conformance() {
    let store = MemoryStore::new();
    assert_eq!(store.describe(), "memory://");
    store.check_access().await.unwrap();
    conformance::run(&store, "conformance", &Profile::strict()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_store_conformance() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bucket");
    let store = DirStore::open(&root).unwrap();
    assert_eq!(
        store.describe(),
        format!("file://{}", root.canonicalize().unwrap().display())
    );
    store.check_access().await.unwrap();
    conformance::run(&store, "conformance", &Profile::strict()).await;
    // Everything the suite wrote it deleted, temp files included.
    assert!(list_keys(&store, "").await.is_empty());
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(root.join("uploads")).unwrap().count(), 0);
}

/// Objects (with metadata, odd keys) and an unfinished multipart upload survive closing and
/// reopening the store; orphan temp files of a crash are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_store_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("bucket");
    let long = format!("deep/{}/leaf", "x".repeat(300));
    let keys = [
        "a",
        "a/b",
        "a//b",
        "dir/",
        "spaces and ünïcode #%+&?",
        long.as_str(),
    ];
    let metadata: Metadata = [("mode".to_string(), "100644".to_string())].into();
    let min = MIN_PART_SIZE as usize;
    let part1 = pattern(min, 1);
    let (upload_id, etag1, mtime_a) = {
        let store = DirStore::open(&root).unwrap();
        for key in keys {
            let options = PutOptions {
                condition: Condition::None,
                metadata: metadata.clone(),
            };
            store
                .put(key, bytes(key.as_bytes()), &options)
                .await
                .unwrap();
        }
        store.delete("a//b").await.unwrap();
        store
            .put("a//b", bytes(b"rewritten"), &PutOptions::default())
            .await
            .unwrap();
        let upload_id = store
            .create_multipart(
                "big",
                &PutOptions {
                    metadata: metadata.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let etag1 = store
            .upload_part("big", &upload_id, 1, bytes(&part1))
            .await
            .unwrap();
        let mtime_a = store.head("a").await.unwrap().last_modified;

        // Another process (here: another open) may not use the directory meanwhile.
        let err = DirStore::open(&root).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        (upload_id, etag1, mtime_a)
    };
    // A crash leaves temp files behind.
    std::fs::write(root.join("tmp").join("orphan.tmp"), b"half-written").unwrap();

    let store = DirStore::open(&root).unwrap();
    assert_eq!(
        std::fs::read_dir(root.join("tmp")).unwrap().count(),
        0,
        "orphans removed"
    );
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(list_keys(&store, "").await, want);
    for key in keys {
        let head = store.head(key).await.unwrap();
        let data = if key == "a//b" {
            &b"rewritten"[..]
        } else {
            key.as_bytes()
        };
        assert_eq!(head.size, data.len() as u64, "{key}");
        assert_eq!(head.etag, md5_hex(data), "{key}");
        let want_meta = if key == "a//b" {
            Metadata::new()
        } else {
            metadata.clone()
        };
        assert_eq!(head.metadata, want_meta, "{key}");
        assert_eq!(read_all(&store, key).await, data, "{key}");
    }
    assert_eq!(
        store.head("a").await.unwrap().last_modified,
        mtime_a,
        "last-modified kept"
    );

    // The upload resumes by id.
    let uploads = store.list_multipart_uploads("").await.unwrap();
    assert_eq!(uploads.len(), 1);
    assert_eq!(
        (uploads[0].key.as_str(), uploads[0].upload_id.as_str()),
        ("big", upload_id.as_str())
    );
    let parts = store.list_parts("big", &upload_id).await.unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(
        (parts[0].number, parts[0].size, parts[0].etag.as_str()),
        (1, min as u64, etag1.as_str())
    );
    let etag2 = store
        .upload_part("big", &upload_id, 2, bytes(b"tail"))
        .await
        .unwrap();
    let completed = [
        CompletedPart {
            number: 1,
            etag: etag1.clone(),
        },
        CompletedPart {
            number: 2,
            etag: etag2.clone(),
        },
    ];
    let etag = store
        .complete_multipart("big", &upload_id, &completed, &Condition::IfNoneMatch)
        .await
        .unwrap();
    assert_eq!(etag, multipart_etag([etag1.as_str(), etag2.as_str()]));
    let head = store.head("big").await.unwrap();
    assert_eq!(
        (head.size, head.etag.as_str()),
        (min as u64 + 4, etag.as_str())
    );
    assert_eq!(head.metadata, metadata);
    assert_eq!(
        read_all(&store, "big").await,
        [&part1[..], b"tail"].concat()
    );
    assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
    drop(store);

    // And the completed object survives too.
    let store = DirStore::open(&root).unwrap();
    assert_eq!(store.head("big").await.unwrap().etag, etag);
}

/// `a` is an object and `a/` a prefix at once; removing one leaves the other.
#[tokio::test]
async fn dir_store_key_that_is_also_a_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::open(tmp.path()).unwrap();
    let none = PutOptions::default();
    store.put("a", bytes(b"file"), &none).await.unwrap();
    store.put("a/b", bytes(b"child"), &none).await.unwrap();
    store.put("a/", bytes(b""), &none).await.unwrap();
    let page = store
        .list(ListRequest {
            prefix: "",
            delimiter: Some("/"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.objects
            .iter()
            .map(|o| o.key.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(page.prefixes, ["a/"]);
    assert_eq!(read_all(&store, "a").await, b"file");
    assert_eq!(read_all(&store, "a/b").await, b"child");
    assert_eq!(read_all(&store, "a/").await, b"");
    store.delete("a").await.unwrap();
    assert!(store.head("a").await.unwrap_err().is_not_found());
    assert_eq!(read_all(&store, "a/b").await, b"child");
    store.put("a", bytes(b"again"), &none).await.unwrap();
    store.delete("a/b").await.unwrap();
    assert_eq!(read_all(&store, "a").await, b"again");
    assert_eq!(list_keys(&store, "").await, ["a", "a/"]);
}

/// `a//b`, `a/b`, `a///b` and `/a` are four keys.
#[tokio::test]
async fn dir_store_double_slash() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::open(tmp.path()).unwrap();
    let keys = ["a//b", "a/b", "a///b", "/a", "a/./b", "a/../b"];
    for key in keys {
        store
            .put(key, bytes(key.as_bytes()), &PutOptions::default())
            .await
            .unwrap();
    }
    for key in keys {
        assert_eq!(read_all(&store, key).await, key.as_bytes(), "{key}");
    }
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(list_keys(&store, "").await, want);
    let page = store
        .list(ListRequest {
            prefix: "a/",
            delimiter: Some("/"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page.objects
            .iter()
            .map(|o| o.key.as_str())
            .collect::<Vec<_>>(),
        ["a/b"]
    );
    assert_eq!(page.prefixes, ["a/../", "a/./", "a//"]);
    // Nothing was created at the key paths themselves.
    assert!(!tmp.path().join("a").exists());
}

/// A non-empty directory that is not a store is refused, not mixed with; keys over 1,024 bytes
/// are refused.
#[tokio::test]
async fn dir_store_refuses_foreign_directories_and_long_keys() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("photo.jpg"), b"jpeg").unwrap();
    let err = DirStore::open(tmp.path()).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    let store = DirStore::open(tmp.path().join("new/nested")).unwrap();
    let key = "k".repeat(1025);
    let err = store
        .put(&key, bytes(b"x"), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = store
        .put("", bytes(b"x"), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    // A body file shorter than announced is an error, and writes nothing.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"short").unwrap();
    let body = Body::File {
        path: file.path().to_path_buf(),
        offset: 2,
        len: 10,
    };
    let err = store
        .put("short", body, &PutOptions::default())
        .await
        .unwrap_err();
    assert!(!err.is_not_found(), "{err:?}");
    assert!(store.head("short").await.unwrap_err().is_not_found());
}

async fn s3_conformance(server: Server) {
    let bucket = s3::fresh_bucket(server).await;
    let store = s3::s3_store(server, &bucket).await;
    store
        .check_access()
        .await
        .unwrap_or_else(|e| panic!("check_access: {e}"));
    let scratch = format!("conformance-{}", std::process::id());
    conformance::run(&store, &scratch, &server.profile()).await;

    // Looked at independently of bucketfs: the suite cleaned up after itself.
    let client = s3::sdk_client(server).await;
    assert_eq!(
        s3::list_keys(&client, &bucket, &scratch).await,
        Vec::<String>::new()
    );

    // A file is an object: what bucketfs writes any S3 client reads, and the other way round.
    let data = pattern(300_000, 7);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), [&b"junk"[..], &data].concat()).unwrap();
    let body = Body::File {
        path: file.path().to_path_buf(),
        offset: 4,
        len: data.len() as u64,
    };
    let etag = store
        .put("interop/from-bucketfs", body, &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(etag, md5_hex(&data));
    assert_eq!(
        s3::get_object(&client, &bucket, "interop/from-bucketfs").await,
        data
    );
    s3::put_object(&client, &bucket, "interop/from-sdk", b"written by the SDK").await;
    assert_eq!(
        read_all(&store, "interop/from-sdk").await,
        b"written by the SDK"
    );
    assert_eq!(
        s3::list_keys(&client, &bucket, "interop/").await,
        ["interop/from-bucketfs", "interop/from-sdk"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conformance_seaweedfs() {
    s3_conformance(Server::SeaweedFs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_store_conformance_localstack() {
    s3_conformance(Server::LocalStack).await;
}

/// The fault-injecting wrapper is transparent when no fault is set: it passes the whole suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faulty_store_without_faults_conformance() {
    let store = bucketfs::store::FaultyStore::new(std::sync::Arc::new(MemoryStore::new()));
    assert_eq!(store.describe(), "faulty+memory://");
    store.check_access().await.unwrap();
    conformance::run(&store, "conformance", &Profile::strict()).await;
    assert_eq!(store.total_failures(), 0);
    assert!(store.calls("put") > 0 && store.calls("upload_part") > 0);
    assert!(list_keys(&store, "").await.is_empty());
}
