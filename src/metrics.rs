//! Metrics and health over HTTP (`--metrics-addr`): Prometheus text at `/metrics`, a liveness
//! verdict at `/healthz`.
//!
//! Two kinds of figures, two mechanisms:
//! - *Events* (S3 requests, bytes moved, FUSE operation latencies, reads by source, evictions)
//!   are recorded where they happen through the `metrics` facade under the names below. With
//!   no recorder installed (no `--metrics-addr`) each one costs an atomic load.
//! - *State* (dirty files and bytes, queue depth, oldest dirty age, cache use, the uploader's
//!   totals) is never tracked incrementally: it is read from the core at each scrape, so a
//!   gauge can never drift from the truth.
//!
//! `/healthz` answers 200 while the mount is served, answers `statfs`, and S3 answered the
//! last periodic probe (`HEALTH_PROBE_INTERVAL`); 503 with the reason otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::fs::Filesystem;
use crate::store::ObjectStore;

/// Metric names, in one place (docs/OPERATIONS.md lists them with their labels).
pub mod names {
    /// Counter `{op, outcome}`: every S3 request, by operation and result.
    pub const S3_REQUESTS: &str = "bucketfs_s3_requests_total";
    /// Histogram `{op}`: S3 request latency (SDK retries included), seconds.
    pub const S3_REQUEST_SECONDS: &str = "bucketfs_s3_request_seconds";
    /// Counter `{op}`: attempts the SDK made again after a failed one (throttling, 5xx, a lost
    /// connection), by SDK operation name (`PutObject`…).
    pub const S3_RETRIES: &str = "bucketfs_s3_retries_total";
    /// Counter `{direction="up"|"down"}`: object bytes sent and received.
    pub const S3_BYTES: &str = "bucketfs_s3_bytes_total";
    /// Histogram `{op}`: FUSE operation latency as the kernel sees it, seconds.
    pub const FUSE_OP_SECONDS: &str = "bucketfs_fuse_op_seconds";
    /// Counter `{source="cache"|"s3"}`: bytes returned by `read`, by where they came from.
    pub const READ_BYTES: &str = "bucketfs_read_bytes_total";
    /// Counter: clean files dropped from the cache to make room.
    pub const EVICTIONS: &str = "bucketfs_cache_evictions_total";
    /// Counters, from the uploader's totals.
    pub const UPLOADS: &str = "bucketfs_uploads_total";
    pub const UPLOAD_RETRIES: &str = "bucketfs_upload_retries_total";
    pub const CONFLICTS: &str = "bucketfs_conflicts_total";
    /// Gauges, read from the core at each scrape.
    pub const DIRTY_FILES: &str = "bucketfs_dirty_files";
    pub const DIRTY_BYTES: &str = "bucketfs_dirty_bytes";
    pub const UPLOAD_QUEUE: &str = "bucketfs_upload_queue";
    pub const OLDEST_DIRTY_SECONDS: &str = "bucketfs_oldest_dirty_seconds";
    pub const CACHE_BYTES: &str = "bucketfs_cache_bytes";
    pub const CACHE_LIMIT_BYTES: &str = "bucketfs_cache_limit_bytes";
    pub const S3_REACHABLE: &str = "bucketfs_s3_reachable";
}

/// Latency buckets (seconds): from a FUSE round trip answered from memory (~50 µs) to an
/// upload held back by retries (tens of seconds).
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
    30.0,
];

/// How often `/healthz` state asks S3 whether the bucket still answers.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How long one probe (S3, or `statfs` of the mount) may take before it counts as failed.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Install the process-wide recorder (once, before anything is recorded).
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))
}

/// What `/healthz` knows: whether the mount is being served, and the last S3 probe.
#[derive(Debug)]
pub struct Health {
    mountpoint: PathBuf,
    serving: AtomicBool,
    /// The last S3 probe's failure (None: it answered).
    s3_error: Mutex<Option<String>>,
    /// A `statfs` probe of the mount is running (a hung mount must not pile up threads).
    probing_mount: AtomicBool,
}

impl Health {
    pub fn new(mountpoint: PathBuf) -> Arc<Health> {
        Arc::new(Health {
            mountpoint,
            serving: AtomicBool::new(false),
            s3_error: Mutex::new(None),
            probing_mount: AtomicBool::new(false),
        })
    }

    /// The mount is live (true) or being torn down (false).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    fn s3_error(&self) -> Option<String> {
        self.s3_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Probe S3 every `HEALTH_PROBE_INTERVAL` until the task is aborted.
    pub fn spawn_s3_probe(
        self: &Arc<Self>,
        store: Arc<dyn ObjectStore>,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEALTH_PROBE_INTERVAL).await;
                let error =
                    match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, store.check_access()).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some(format!("no answer within {HEALTH_PROBE_TIMEOUT:?}")),
                    };
                let mut slot = health.s3_error.lock().unwrap_or_else(|e| e.into_inner());
                match (&*slot, &error) {
                    (None, Some(e)) => tracing::warn!("S3 health probe failed: {e}"),
                    (Some(_), None) => tracing::info!("S3 health probe: answering again"),
                    _ => {}
                }
                *slot = error;
            }
        })
    }

    /// `Ok` with a one-line verdict, or `Err` with the reason the mount is unhealthy.
    pub async fn verdict(self: &Arc<Self>) -> Result<String, String> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("not serving (starting or shutting down)".into());
        }
        if let Some(e) = self.s3_error() {
            return Err(format!("S3 does not answer: {e}"));
        }
        if self.probing_mount.swap(true, Ordering::AcqRel) {
            return Err("the previous statfs of the mount has not returned (hung?)".into());
        }
        // The probe clears the flag itself: if it outlives the timeout, later verdicts say
        // so until it returns.
        let this = self.clone();
        let probe = tokio::task::spawn_blocking(move || {
            let answers = crate::service::mount_answers(&this.mountpoint);
            this.probing_mount.store(false, Ordering::Release);
            answers
        });
        match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, probe).await {
            Ok(Ok(true)) => Ok("ok".into()),
            Ok(_) => Err(format!(
                "{} is not a live FUSE mount",
                self.mountpoint.display()
            )),
            Err(_) => Err(format!(
                "{} did not answer statfs within {HEALTH_PROBE_TIMEOUT:?}",
                self.mountpoint.display()
            )),
        }
    }
}

/// Set the state gauges and the uploader's totals from the core (just before a render).
fn refresh(fs: &Filesystem, health: &Health) {
    use names::*;
    let stats = fs.writeback().stats();
    let dirty = fs.cache().dirty_files();
    let cached = fs.cache().used_bytes();
    let oldest = dirty
        .iter()
        .filter_map(|f| f.dirty_since())
        .map(|t| t.elapsed().as_secs_f64())
        .fold(0.0, f64::max);
    metrics::gauge!(DIRTY_FILES).set(dirty.len() as f64);
    metrics::gauge!(DIRTY_BYTES).set(dirty.iter().map(|f| f.size()).sum::<u64>() as f64);
    metrics::gauge!(UPLOAD_QUEUE).set(stats.pending as f64);
    metrics::gauge!(OLDEST_DIRTY_SECONDS).set(oldest);
    metrics::gauge!(CACHE_BYTES).set(cached as f64);
    metrics::gauge!(CACHE_LIMIT_BYTES).set(fs.cache().limits().max_bytes as f64);
    metrics::gauge!(S3_REACHABLE).set(if health.s3_error().is_none() {
        1.0
    } else {
        0.0
    });
    metrics::counter!(UPLOADS).absolute(stats.uploaded);
    metrics::counter!(UPLOAD_RETRIES).absolute(stats.failed_attempts);
    metrics::counter!(CONFLICTS).absolute(stats.conflicts);
}

/// What the HTTP endpoint serves.
#[derive(Debug)]
pub struct Exporter {
    pub handle: PrometheusHandle,
    pub fs: Arc<Filesystem>,
    pub health: Arc<Health>,
}

impl Exporter {
    async fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/metrics" => {
                refresh(&self.fs, &self.health);
                self.handle.run_upkeep();
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.handle.render(),
                )
            }
            "/healthz" => match self.health.verdict().await {
                Ok(v) => (
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    format!("{v}\n"),
                ),
                Err(e) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("unhealthy: {e}\n"),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: try /metrics or /healthz\n".to_string(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, v);
        }
        response
    }
}

/// Bind `addr` (at start, so a taken port fails the mount with one line).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))
}

/// Serve `/metrics` and `/healthz` on `listener` until the task is aborted.
pub fn spawn_server(listener: TcpListener, exporter: Arc<Exporter>) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: wait instead of spinning.
                    tracing::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let exporter = exporter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let exporter = exporter.clone();
                    async move { Ok::<_, Infallible>(exporter.respond(request.uri().path()).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!("metrics endpoint connection: {e}");
                }
            });
        }
    })
}
