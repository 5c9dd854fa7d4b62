//! `MeteredStore`: any store, with every request counted and timed.
//!
//! One wrapper instead of counters sprinkled through each store: every request the core makes
//! goes through it, so `bucketfs_s3_requests_total{op,outcome}`, the request-latency histogram
//! and the bytes moved each way are complete by construction. The names live in
//! `crate::metrics`; without a recorder installed (no `--metrics-addr`) each call costs one
//! atomic load.

use std::ops::Range;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Body, CompletedPart, Condition, ListPage, ListRequest, Metadata, MultipartUpload, ObjectMeta,
    ObjectStore, PartInfo, PutOptions, Result, StoreError,
};
use crate::metrics::names;
use std::sync::Arc;

#[derive(Debug)]
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> MeteredStore {
        MeteredStore { inner }
    }
}

/// The `outcome` label of a request's result.
fn outcome<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::NotFound(_)) => "not_found",
        Err(StoreError::NoSuchBucket(_)) => "no_such_bucket",
        Err(StoreError::PreconditionFailed(_)) => "precondition_failed",
        Err(StoreError::Throttled(_)) => "throttled",
        Err(StoreError::PermissionDenied(_)) => "denied",
        Err(StoreError::Transient(_)) => "transient",
        Err(StoreError::Invalid(_)) => "invalid",
        Err(StoreError::Other(_)) => "error",
    }
}

/// Record one request `op` that started at `start`.
fn record<T>(op: &'static str, start: Instant, result: &Result<T>) {
    metrics::counter!(names::S3_REQUESTS, "op" => op, "outcome" => outcome(result)).increment(1);
    metrics::histogram!(names::S3_REQUEST_SECONDS, "op" => op)
        .record(start.elapsed().as_secs_f64());
}

fn bytes_up(n: u64) {
    metrics::counter!(names::S3_BYTES, "direction" => "up").increment(n);
}

fn bytes_down(n: u64) {
    metrics::counter!(names::S3_BYTES, "direction" => "down").increment(n);
}

/// Time `$call` as request `$op`.
macro_rules! metered {
    ($op:literal, $call:expr) => {{
        let start = Instant::now();
        let result = $call.await;
        record($op, start, &result);
        result
    }};
}

#[async_trait]
impl ObjectStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn check_access(&self) -> Result<()> {
        metered!("check_access", self.inner.check_access())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        metered!("head", self.inner.head(key))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Bytes> {
        let result = metered!("get", self.inner.get_range(key, range, if_match));
        if let Ok(bytes) = &result {
            bytes_down(bytes.len() as u64);
        }
        result
    }

    async fn list(&self, request: ListRequest<'_>) -> Result<ListPage> {
        metered!("list", self.inner.list(request))
    }

    async fn put(&self, key: &str, body: Body, options: &PutOptions) -> Result<String> {
        let len = body.len();
        let result = metered!("put", self.inner.put(key, body, options));
        if result.is_ok() {
            bytes_up(len);
        }
        result
    }

    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<String> {
        metered!("copy", self.inner.copy(from, to, metadata))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        metered!("delete", self.inner.delete(key))
    }

    async fn create_multipart(&self, key: &str, options: &PutOptions) -> Result<String> {
        metered!(
            "create_multipart",
            self.inner.create_multipart(key, options)
        )
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Body,
    ) -> Result<String> {
        let len = body.len();
        let result = metered!(
            "upload_part",
            self.inner.upload_part(key, upload_id, number, body)
        );
        if result.is_ok() {
            bytes_up(len);
        }
        result
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        from: &str,
        range: Range<u64>,
    ) -> Result<String> {
        metered!(
            "upload_part_copy",
            self.inner
                .upload_part_copy(key, upload_id, number, from, range)
        )
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: &Condition,
    ) -> Result<String> {
        metered!(
            "complete_multipart",
            self.inner
                .complete_multipart(key, upload_id, parts, condition)
        )
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        metered!(
            "abort_multipart",
            self.inner.abort_multipart(key, upload_id)
        )
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        metered!("list_parts", self.inner.list_parts(key, upload_id))
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<MultipartUpload>> {
        metered!(
            "list_multipart_uploads",
            self.inner.list_multipart_uploads(prefix)
        )
    }
}
