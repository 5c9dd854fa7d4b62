//! The real local S3 servers of the test suite (DESIGN.md §10): SeaweedFS and LocalStack.
//!
//! `scripts/s3-servers.sh start DIR` starts both and writes `DIR/env`, which exports
//! `BUCKETFS_TEST_<SEAWEEDFS|LOCALSTACK>_{ENDPOINT,ACCESS_KEY,SECRET_KEY}`; this module reads
//! exactly those variables (`./scripts/test.sh` does all of it). Every test takes a fresh bucket.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bucketfs::store::conformance::Profile;
use bucketfs::store::{AddressingStyle, S3Config, S3Store};

pub const REGION: &str = "us-east-1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    SeaweedFs,
    LocalStack,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::SeaweedFs => "seaweedfs",
            Server::LocalStack => "localstack",
        }
    }

    pub fn all() -> [Server; 2] {
        [Server::SeaweedFs, Server::LocalStack]
    }

    /// The server's documented gaps, for the conformance suite.
    pub fn profile(self) -> Profile {
        match self {
            Server::SeaweedFs => Profile::seaweedfs(),
            Server::LocalStack => Profile::localstack(),
        }
    }

    fn env_name(self) -> &'static str {
        match self {
            Server::SeaweedFs => "SEAWEEDFS",
            Server::LocalStack => "LOCALSTACK",
        }
    }
}

fn var(server: Server, what: &str) -> String {
    let name = format!("BUCKETFS_TEST_{}_{what}", server.env_name());
    match std::env::var(&name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{name} is not set: the {} server is not running. Run ./scripts/test.sh, or \
             scripts/s3-servers.sh start DIR and source DIR/env",
            server.name()
        ),
    }
}

pub fn endpoint(server: Server) -> String {
    var(server, "ENDPOINT")
}

pub fn access_key(server: Server) -> String {
    var(server, "ACCESS_KEY")
}

pub fn secret_key(server: Server) -> String {
    var(server, "SECRET_KEY")
}

/// bucketfs's configuration for `bucket` on `server`: path-style, `us-east-1`, explicit keys.
pub fn s3_config(server: Server, bucket: &str) -> S3Config {
    S3Config {
        bucket: bucket.to_string(),
        endpoint_url: Some(endpoint(server)),
        region: Some(REGION.to_string()),
        addressing_style: AddressingStyle::Path,
        access_key_id: Some(access_key(server)),
        secret_access_key: Some(secret_key(server)),
    }
}

/// bucketfs's store for `bucket` on `server`.
pub async fn s3_store(server: Server, bucket: &str) -> S3Store {
    S3Store::new(s3_config(server, bucket))
        .await
        .unwrap_or_else(|e| panic!("S3Store for {bucket} on {}: {e}", server.name()))
}

/// A raw SDK client, to look into a bucket independently of bucketfs. Built from scratch (no
/// environment, profile or IMDS lookups), so ambient `AWS_*` settings do not leak in.
pub async fn sdk_client(server: Server) -> Client {
    let credentials = Credentials::new(
        access_key(server),
        secret_key(server),
        None,
        None,
        "bucketfs-tests",
    );
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint(server))
        .credentials_provider(credentials)
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

/// Creates a bucket with a unique name (`t-<pid>-<counter>-<nanos>`). Retries for a while:
/// SeaweedFS's S3 port answers before its filer is ready to create buckets.
pub async fn fresh_bucket(server: Server) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let bucket = format!(
        "t-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    assert!(bucket.len() <= 63);
    let client = sdk_client(server).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.create_bucket().bucket(&bucket).send().await {
            Ok(_) => return bucket,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(
                    "create bucket {bucket} on {}: {e:?}; retrying",
                    server.name()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!(
                "cannot create bucket {bucket} on {} ({}): {}",
                server.name(),
                endpoint(server),
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        }
    }
}

/// PUT through the raw SDK.
pub async fn put_object(client: &Client, bucket: &str, key: &str, data: &[u8]) {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(data.to_vec()))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "raw put {bucket}/{key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
}

/// GET through the raw SDK.
pub async fn get_object(client: &Client, bucket: &str, key: &str) -> Vec<u8> {
    let out = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "raw get {bucket}/{key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
    out.body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("raw get {bucket}/{key}: reading the body: {e}"))
        .into_bytes()
        .to_vec()
}

/// Every key under `prefix` (no delimiter), through the raw SDK, all pages.
pub async fn list_keys(client: &Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.unwrap_or_else(|e| {
            panic!(
                "raw list {bucket}/{prefix}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
    }
    keys
}
