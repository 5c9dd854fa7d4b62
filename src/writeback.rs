//! The write-back uploader: turns dirty cached files into objects in the background.
//!
//! `close` journals a dirty file and queues it here; the scheduler uploads it once it has been
//! quiet for `delay` (so quick rewrites coalesce into one upload), with at most `max_uploads`
//! files in flight. `fsync` and the shutdown drain queue files for right now and wait.
//!
//! One upload of one file:
//! - below the part size: the file is read under its state lock (a consistent snapshot) and sent
//!   as one PutObject;
//! - otherwise a multipart upload whose id and finished parts are journaled durably as they
//!   happen; after a crash the upload resumes with ListParts and sends only the missing parts.
//!   Before completing, the data's generation is checked: if the file changed during the upload,
//!   the upload is aborted (it would publish a torn mix) and the file stays queued.
//!
//! Failures are never dropped: transient ones (network, 5xx, throttling) retry with exponential
//! backoff and jitter, permanent ones (access denied, missing bucket) are logged loudly and
//! retried slowly; the file stays dirty and readable from the cache throughout.
//!
//! Lost updates: with `conditional` on, every upload carries the condition of the version its
//! data replaces ([`Base`]): `If-None-Match: *` for a new file, `If-Match: <etag>` for one read
//! from (or last uploaded to) S3. If another client changed the object in between, S3 refuses
//! the write; the local data is then moved to a conflict name (`NAME.conflict-<UTC time>`) and
//! uploaded there, so both versions survive and nothing is overwritten unseen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rand::Rng;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::cache::journal::UploadRecord;
use crate::cache::{Base, Cache, FillError, LocalFile, Snapshot};
use crate::fs::NAME_MAX;
use crate::store::{
    Body, CompletedPart, Condition, MAX_PARTS, ObjectStore, PutOptions, StoreError,
};
use crate::upload::{effective_part_size, plan_parts};

/// First retry delay after a transient failure; doubles per failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Retry delay after a permanent failure (access denied…): slow, but never give up on data.
const PERMANENT_RETRY: Duration = Duration::from_secs(60);
/// The scheduler re-scans at least this often.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// A file being written is streamed once it holds this many parts (with fewer, the close
/// sends it in one go about as fast).
const STREAM_MIN_PARTS: u64 = 2;
/// How often the streaming uploader looks for newly complete parts of a file being written.
const STREAM_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct WriteBackConfig {
    /// Quiet time after the last close before a file is uploaded.
    pub delay: Duration,
    /// Files uploading at once.
    pub max_uploads: usize,
    /// Multipart part size, and parts in flight per file.
    pub part_size: u64,
    pub part_concurrency: usize,
    /// Guard against lost updates with conditional writes (the server supports them).
    pub conditional: bool,
}

/// Why an upload attempt did not make the file clean.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("local cache: {0}")]
    Io(#[from] std::io::Error),
    #[error("the file changed during the upload")]
    Superseded,
    /// Another client changed the object: the data moved to a conflict name (or, if the object
    /// was deleted, will create it anew) and goes up at once.
    #[error("the object changed in S3; the local version is kept as {0}")]
    Conflict(String),
}

impl From<FillError> for UploadError {
    fn from(e: FillError) -> Self {
        match e {
            FillError::Store(e) => UploadError::Store(e),
            FillError::Io(e) => UploadError::Io(e),
        }
    }
}

impl UploadError {
    fn is_permanent(&self) -> bool {
        match self {
            UploadError::Store(e) => !e.is_transient(),
            UploadError::Io(_) => true,
            UploadError::Superseded | UploadError::Conflict(_) => false,
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// Queued files by id: when they are due, the file, and whether the upload is forced
    /// (fsync, drain), which uploads a file even while it is open for writing.
    due: HashMap<u64, (Instant, Arc<LocalFile>, bool)>,
    /// Ids being uploaded now.
    running: HashMap<u64, Arc<LocalFile>>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    cache: Arc<Cache>,
    config: WriteBackConfig,
    queue: Mutex<Queue>,
    /// Shared so the scheduler can sleep on it without keeping `Inner` (and the cache's lock)
    /// alive after the last handle is gone.
    wake: Arc<Notify>,
    uploads: Arc<Semaphore>,
    uploaded: AtomicU64,
    failed: AtomicU64,
    conflicts: AtomicU64,
}

/// Counters of the uploader since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Files queued or uploading now.
    pub pending: usize,
    pub uploaded: u64,
    pub failed_attempts: u64,
    /// Uploads refused because another client had changed the object (kept under a new name).
    pub conflicts: u64,
}

/// Where a cached file stands on its way to S3 (`user.bucketfs.state`, `bucketfs status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// The data equals the object with this ETag.
    Clean { etag: Option<String> },
    /// Changed, waiting for its upload (the quiet period, a writer's close, a free slot).
    Dirty,
    /// Being uploaded: parts done of parts (a single PUT is one part).
    Uploading { done: u64, parts: u64 },
    /// The last attempts failed; the data stays in the cache and is retried.
    Failed { attempts: u32, error: String },
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileState::Clean { etag: Some(etag) } => write!(f, "clean {etag}"),
            FileState::Clean { etag: None } => write!(f, "clean"),
            FileState::Dirty => write!(f, "dirty"),
            FileState::Uploading { done, parts } => write!(f, "uploading {done}/{parts}"),
            FileState::Failed { attempts, error } => {
                write!(f, "failed: {error} ({attempts} attempts, retrying)")
            }
        }
    }
}

/// Handle to the uploader; cheap to clone.
#[derive(Debug, Clone)]
pub struct WriteBack {
    inner: Arc<Inner>,
}

impl WriteBack {
    /// Start the scheduler on the current tokio runtime.
    pub fn start(
        store: Arc<dyn ObjectStore>,
        cache: Arc<Cache>,
        config: WriteBackConfig,
    ) -> WriteBack {
        let uploads = Arc::new(Semaphore::new(config.max_uploads.max(1)));
        let inner = Arc::new(Inner {
            store,
            cache,
            config,
            queue: Mutex::new(Queue::default()),
            wake: Arc::new(Notify::new()),
            uploads,
            uploaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        });
        tokio::spawn(scheduler(Arc::downgrade(&inner)));
        WriteBack { inner }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `file` for upload after the write-back delay (or now with `now`). A file already
    /// queued keeps the earlier of the two times, except that a plain enqueue restarts the
    /// quiet period (the file was just written again).
    pub fn enqueue(&self, file: &Arc<LocalFile>, now: bool) {
        // A file whose parts were streamed while it was written goes at once: the quiet period
        // would only delay an upload that is mostly done.
        let at = if now || file.journaled_upload().is_some() {
            Instant::now()
        } else {
            Instant::now() + self.inner.config.delay
        };
        let mut q = self.queue();
        let entry = q.due.entry(file.id()).or_insert((at, file.clone(), now));
        entry.0 = if now { entry.0.min(at) } else { at };
        entry.2 |= now;
        drop(q);
        self.inner.wake.notify_one();
    }

    /// `file`, open for writing, was just written: once it holds `STREAM_MIN_PARTS` parts, start
    /// streaming its complete parts to S3 while the writer goes on (see [`stream`]).
    pub fn written(&self, file: &Arc<LocalFile>) {
        let threshold = STREAM_MIN_PARTS * self.inner.config.part_size;
        if file.size() < threshold || !file.has_writers() {
            return;
        }
        if !self.inner.cache.begin_streaming(file) {
            return;
        }
        let (inner, file) = (self.inner.clone(), file.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(&inner, &file).await {
                tracing::debug!(
                    key = file.key(),
                    "streaming upload stopped; the upload after the close sends the rest: {e}"
                );
            }
        });
    }

    /// Abort in the background the multipart uploads `file` gave up, for a file no upload
    /// attempt will visit again (unlinked or replaced; the next attempt does it otherwise).
    pub fn abort_abandoned(&self, file: &Arc<LocalFile>) {
        let abandoned = file.take_abandoned();
        if !abandoned.is_empty() {
            let inner = self.inner.clone();
            tokio::spawn(async move { abort_all(&inner, abandoned).await });
        }
    }

    /// `fsync`: upload `file` now and wait until its current contents are in S3. Returns the
    /// error of a failed attempt (the file stays queued and is retried in the background).
    pub async fn sync(&self, file: &Arc<LocalFile>) -> Result<(), UploadError> {
        let generation = file.generation();
        let failures = file.failures();
        loop {
            let changed = file.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if file.is_clean_since(generation) {
                return Ok(());
            }
            if file.failures() > failures {
                let error = file.last_error().unwrap_or_default();
                return Err(UploadError::Store(StoreError::Other(error)));
            }
            self.enqueue(file, true);
            changed.await;
        }
    }

    /// Upload every dirty file now and wait until none is left or `timeout` passes, logging
    /// progress. Returns the number of files still dirty.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut last_log = Instant::now();
        loop {
            let dirty = self.inner.cache.dirty_files();
            if dirty.is_empty() {
                return 0;
            }
            for f in &dirty {
                self.enqueue(f, true);
            }
            if Instant::now() >= deadline {
                return dirty.len();
            }
            if last_log.elapsed() >= Duration::from_secs(2) {
                let bytes: u64 = dirty.iter().map(|f| f.size()).sum();
                tracing::info!(files = dirty.len(), bytes, "draining: waiting for uploads");
                last_log = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where `file` stands (see [`FileState`]).
    pub fn file_state(&self, file: &Arc<LocalFile>) -> FileState {
        // Lock order: the queue, then the file's state (as in `finish_queue`).
        let q = self.queue();
        if !file.is_dirty() {
            return FileState::Clean { etag: file.etag() };
        }
        if q.running.contains_key(&file.id()) {
            let size = file.size();
            let part_size = self.inner.config.part_size;
            return match file.journaled_upload() {
                Some(record) => FileState::Uploading {
                    done: record.parts.len() as u64,
                    parts: size.div_ceil(record.part_size).max(1),
                },
                None if size <= part_size => FileState::Uploading { done: 0, parts: 1 },
                None => FileState::Uploading {
                    done: 0,
                    parts: size.div_ceil(effective_part_size(size, part_size)),
                },
            };
        }
        match file.failures() {
            0 => FileState::Dirty,
            attempts => FileState::Failed {
                attempts,
                error: file.last_error().unwrap_or_default(),
            },
        }
    }

    pub fn stats(&self) -> UploadStats {
        let q = self.queue();
        UploadStats {
            pending: q.due.len() + q.running.len(),
            uploaded: self.inner.uploaded.load(Ordering::Relaxed),
            failed_attempts: self.inner.failed.load(Ordering::Relaxed),
            conflicts: self.inner.conflicts.load(Ordering::Relaxed),
        }
    }
}

/// Pick due files, start their uploads within the concurrency limit, sleep until the next one.
async fn scheduler(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(this) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut next = now + IDLE_TICK;
        let mut ready = Vec::new();
        {
            let mut q = this.queue.lock().unwrap_or_else(|e| e.into_inner());
            let mut ids: Vec<(Instant, u64)> =
                q.due.iter().map(|(id, (at, _, _))| (*at, *id)).collect();
            ids.sort();
            for (at, id) in ids {
                if at > now {
                    next = next.min(at);
                    break;
                }
                if q.running.contains_key(&id) {
                    continue; // re-queued while uploading: picked up when that upload ends
                }
                let Ok(permit) = this.uploads.clone().try_acquire_owned() else {
                    break;
                };
                if let Some((_, file, forced)) = q.due.remove(&id) {
                    q.running.insert(id, file.clone());
                    ready.push((permit, file, forced));
                }
            }
        }
        for (permit, file, forced) in ready {
            let this = this.clone();
            tokio::spawn(async move {
                let failed_before = file.failures();
                let result = upload(&this, &file, forced).await;
                drop(permit);
                if result.is_ok() && failed_before > 0 && file.failures() == 0 {
                    tracing::info!(
                        key = file.key(),
                        failed_attempts = failed_before,
                        "upload recovered: in S3 after earlier failures"
                    );
                }
                finish(&this, &file, result);
                this.wake.notify_one();
            });
        }
        let wake = this.wake.clone();
        drop(this);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

fn finish(inner: &Inner, file: &Arc<LocalFile>, result: Result<(), UploadError>) {
    finish_queue(inner, file, result);
    // Every outcome wakes `sync` waiters: they re-check and, if needed, queue again.
    file.changed.notify_waiters();
}

fn finish_queue(inner: &Inner, file: &Arc<LocalFile>, result: Result<(), UploadError>) {
    let mut q = inner.queue.lock().unwrap_or_else(|e| e.into_inner());
    q.running.remove(&file.id());
    match result {
        Ok(()) => {
            inner.uploaded.fetch_add(1, Ordering::Relaxed);
            if file.is_dirty() && !file.has_writers() {
                // Written again during the upload: go again after the quiet period. (A file
                // still open for writing is queued again by its last close.)
                let at = Instant::now() + inner.config.delay;
                q.due.entry(file.id()).or_insert((at, file.clone(), false));
            }
        }
        Err(UploadError::Conflict(_)) => {
            // Moved to its conflict name (or to be created anew): upload that right away.
            q.due
                .entry(file.id())
                .or_insert((Instant::now(), file.clone(), true));
        }
        Err(e) => {
            let retry_in = if matches!(e, UploadError::Superseded) {
                inner.config.delay
            } else {
                let failures = file.record_failure(e.to_string());
                if e.is_permanent() {
                    PERMANENT_RETRY
                } else {
                    backoff(failures)
                }
            };
            if !matches!(e, UploadError::Superseded) {
                inner.failed.fetch_add(1, Ordering::Relaxed);
                if e.is_permanent() {
                    tracing::error!(key = file.key(), retry_in = ?retry_in, "upload failed (permanent error; the data stays in the cache and is retried): {e}");
                } else {
                    tracing::warn!(key = file.key(), retry_in = ?retry_in, "upload failed; retrying: {e}");
                }
            }
            if file.is_dirty() {
                let at = Instant::now() + retry_in;
                let entry = q.due.entry(file.id()).or_insert((at, file.clone(), false));
                entry.0 = entry.0.max(at);
            }
            file.changed.notify_waiters();
        }
    }
}

/// Exponential backoff with full jitter: a random delay in [d/2, d], d = base·2^(n-1) capped.
fn backoff(failures: u32) -> Duration {
    let exp = BASE_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let cap = exp.min(MAX_BACKOFF);
    let half = cap / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// One upload attempt of `file`. A file open for writing is left alone unless `forced`: its
/// last close queues it again.
async fn upload(inner: &Inner, file: &Arc<LocalFile>, forced: bool) -> Result<(), UploadError> {
    let _serial = file.upload_lock.lock().await;
    // Multipart uploads given up since the last attempt (voided by a change) are never
    // completed: abort them first.
    abort_all(inner, file.take_abandoned()).await;
    if !file.is_dirty() || (file.has_writers() && !forced) {
        return Ok(());
    }
    let snapshot = file.snapshot();
    let (snapshot, sent) = if snapshot.size < inner.config.part_size {
        // One PUT replaces the object: a multipart upload in progress (one not voided, with no
        // part below the file's new end) will never be completed.
        file.give_up_upload();
        abort_all(inner, file.take_abandoned()).await;
        // A sparse file shrunk below a part: fetch the rest, then send it whole.
        inner
            .cache
            .fill(inner.store.as_ref(), file, 0..snapshot.size)
            .await?;
        match file.read_snapshot() {
            Ok((snapshot, bytes)) => {
                let options = put_options(inner, &snapshot);
                let sent = inner
                    .store
                    .put(&snapshot.key, Body::Bytes(bytes.into()), &options)
                    .await
                    .map_err(UploadError::from);
                (snapshot, sent)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        let sent = upload_multipart(inner, file, &snapshot).await;
        (snapshot, sent)
    };
    match sent {
        Ok(etag) => mark_clean(inner, file, &snapshot, etag),
        Err(UploadError::Store(e)) if inner.config.conditional => {
            Err(refused_write(inner, file, &snapshot, e)?)
        }
        Err(e) => Err(e),
    }
}

/// The object's metadata (the file's mode, owner and explicit mtime, DESIGN.md §6) and the
/// condition that protects the version the data replaces.
fn put_options(inner: &Inner, snapshot: &Snapshot) -> PutOptions {
    PutOptions {
        metadata: snapshot.meta.to_metadata(),
        condition: condition(inner, &snapshot.base),
    }
}

fn condition(inner: &Inner, base: &Base) -> Condition {
    match base {
        _ if !inner.config.conditional => Condition::None,
        Base::Unknown => Condition::None,
        Base::Absent => Condition::IfNoneMatch,
        Base::Version(etag) => Condition::IfMatch(etag.clone()),
    }
}

/// A conditional upload of `snapshot` failed with `error`. If the condition was not met,
/// another client changed the object since this data was based on it: keep the local data
/// under a conflict name (uploaded next, as a new object) and leave theirs in place. If the
/// version we replace was deleted, the data simply creates the object again. Other errors
/// pass through.
fn refused_write(
    inner: &Inner,
    file: &Arc<LocalFile>,
    snapshot: &Snapshot,
    error: StoreError,
) -> Result<UploadError, UploadError> {
    let replaces_a_version = matches!(snapshot.base, Base::Version(_));
    match error {
        StoreError::NotFound(_) if replaces_a_version => {
            tracing::info!(
                key = snapshot.key,
                "the object was deleted in S3 since it was read here; the local version creates it anew"
            );
            file.set_base(Base::Absent);
            Ok(UploadError::Conflict(snapshot.key.clone()))
        }
        StoreError::PreconditionFailed(detail) => {
            // The upload lock is held, so no rename moves the file meanwhile; an unlink or a
            // replacing create has made it unlinked, and then it must not be uploaded at all.
            if file.is_unlinked() || file.key() != snapshot.key {
                return Ok(UploadError::Superseded);
            }
            if file.is_sparse() {
                // The bytes it never fetched were the replaced version's: there is no complete
                // local version to keep. It stays dirty, and this is reported on every attempt.
                return Err(UploadError::Io(std::io::Error::other(format!(
                    "conflict: {} was replaced in S3 by another client before the unchanged \
                     ranges of this (sparsely staged) file were copied; the local changes stay \
                     in the cache but cannot be completed ({detail})",
                    snapshot.key
                ))));
            }
            let to = conflict_key(&snapshot.key, SystemTime::now(), |k| {
                inner.cache.get(k).is_some()
            });
            inner.cache.rekey(&snapshot.key, &to, Base::Absent)?;
            inner.conflicts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                key = snapshot.key,
                kept_as = to,
                "conflict: the object was changed in S3 by another client since this file was \
                 read or written here; S3 keeps their version and the local version is \
                 uploaded under the conflict name ({detail})"
            );
            Ok(UploadError::Conflict(to))
        }
        other => Err(other.into()),
    }
}

/// `dir/NAME.conflict-YYYYMMDDTHHMMSSZ` (UTC), with `-2`, `-3`… while `taken`, and `NAME` cut
/// (at a character boundary) so that the file name stays within 255 bytes.
fn conflict_key(key: &str, now: SystemTime, taken: impl Fn(&str) -> bool) -> String {
    let (dir, name) = key.rsplit_once('/').map_or(("", key), |(d, n)| (d, n));
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    (1..)
        .map(|n| {
            let suffix = match n {
                1 => format!(".conflict-{stamp}"),
                n => format!(".conflict-{stamp}-{n}"),
            };
            let mut cut = NAME_MAX.saturating_sub(suffix.len()).min(name.len());
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            let file = format!("{}{suffix}", &name[..cut]);
            if dir.is_empty() {
                file
            } else {
                format!("{dir}/{file}")
            }
        })
        .find(|k| !taken(k))
        .unwrap_or_else(|| unreachable!("an unbounded range always has a free name"))
}

fn mark_clean(
    inner: &Inner,
    file: &LocalFile,
    snapshot: &Snapshot,
    etag: String,
) -> Result<(), UploadError> {
    if inner.cache.mark_clean(file, snapshot, etag)? {
        tracing::debug!(key = snapshot.key, size = snapshot.size, "uploaded");
    }
    Ok(())
}

async fn upload_multipart(
    inner: &Inner,
    file: &Arc<LocalFile>,
    snapshot: &Snapshot,
) -> Result<String, UploadError> {
    let key = &snapshot.key;
    let part_size = effective_part_size(snapshot.size, inner.config.part_size);
    // The parts must match durable data: a crash after a part is journaled must find the
    // same bytes in the data file.
    file.sync_data()?;
    let mut record = match file.journaled_upload().filter(|r| r.part_size == part_size) {
        Some(r) => resume(inner, key, r).await?,
        None => None,
    };
    if record.is_none() {
        abort_stale_uploads(inner, key).await;
        let upload_id = inner
            .store
            .create_multipart(key, &put_options(inner, snapshot))
            .await?;
        let fresh = UploadRecord {
            upload_id,
            part_size,
            parts: Vec::new(),
        };
        if !inner
            .cache
            .journal_upload(file, snapshot.generation, Some(fresh.clone()))?
        {
            abort(inner, key, &fresh.upload_id).await;
            return Err(UploadError::Superseded);
        }
        record = Some(fresh);
    }
    let Some(record) = record else {
        unreachable!("set above")
    };
    let upload_id = record.upload_id.clone();
    let done: HashMap<u32, String> = record.parts.iter().cloned().collect();
    let shared = Mutex::new(record);
    let todo: Vec<(u32, std::ops::Range<u64>)> = plan_parts(snapshot.size, part_size)
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i as u32 + 1, r))
        .filter(|(n, _)| !done.contains_key(n))
        .collect();
    if !done.is_empty() {
        tracing::info!(
            key,
            upload_id,
            done = done.len(),
            missing = todo.len(),
            "resuming multipart upload"
        );
    }
    let results: Vec<Result<(), UploadError>> = futures::stream::iter(todo)
        .map(|(number, range)| {
            let (upload_id, shared) = (&upload_id, &shared);
            async move {
                let etag = if copies_from_base(inner, file, snapshot, &range) {
                    // Never fetched, so unchanged: copied from the base version server-side
                    // (the completion's If-Match proves the base was still the object).
                    inner
                        .store
                        .upload_part_copy(key, upload_id, number, key, range)
                        .await?
                } else {
                    inner
                        .cache
                        .fill(inner.store.as_ref(), file, range.clone())
                        .await?;
                    // Journaled parts must match durable data (a resume trusts them).
                    file.sync_data()?;
                    let body = Body::File {
                        path: file.path().to_path_buf(),
                        offset: range.start,
                        len: range.end - range.start,
                    };
                    inner
                        .store
                        .upload_part(key, upload_id, number, body)
                        .await?
                };
                let updated = {
                    let mut r = shared.lock().unwrap_or_else(|e| e.into_inner());
                    r.parts.push((number, etag));
                    r.parts.sort();
                    r.clone()
                };
                if !inner
                    .cache
                    .journal_upload(file, snapshot.generation, Some(updated))?
                {
                    return Err(UploadError::Superseded);
                }
                Ok(())
            }
        })
        .buffer_unordered(inner.config.part_concurrency.max(1))
        .collect()
        .await;
    let failed = results.into_iter().find_map(Result::err);
    // A file changed during the attempt supersedes it, whatever its parts met meanwhile (a
    // truncate cuts short the range a part is reading): the next attempt sends the new data.
    if matches!(failed, Some(UploadError::Superseded))
        || file.generation() != snapshot.generation
        || file.is_unlinked()
    {
        abort(inner, key, &upload_id).await;
        return Err(UploadError::Superseded);
    }
    if let Some(e) = failed {
        // Keep the upload: the journal lets the retry skip the finished parts.
        return Err(e);
    }
    let parts: Vec<CompletedPart> = {
        let r = shared.lock().unwrap_or_else(|e| e.into_inner());
        r.parts
            .iter()
            .map(|(number, etag)| CompletedPart {
                number: *number,
                etag: etag.clone(),
            })
            .collect()
    };
    match inner
        .store
        .complete_multipart(key, &upload_id, &parts, &condition(inner, &snapshot.base))
        .await
    {
        Ok(etag) => {
            file.upload_completed(&upload_id);
            Ok(etag)
        }
        Err(e @ StoreError::PreconditionFailed(_)) => {
            // Another client's version stands: these parts go up again under the conflict name.
            abort(inner, key, &upload_id).await;
            let _ = inner.cache.journal_upload(file, snapshot.generation, None);
            Err(e.into())
        }
        Err(StoreError::NotFound(e)) => {
            let _ = inner.cache.journal_upload(file, snapshot.generation, None);
            // With `If-Match`, the object we replace may be gone (deleted by another client).
            if matches!(condition(inner, &snapshot.base), Condition::IfMatch(_))
                && matches!(inner.store.head(key).await, Err(StoreError::NotFound(_)))
            {
                return Err(StoreError::NotFound(e).into());
            }
            // Else the upload vanished (aborted by someone, or expired): start over next time.
            Err(UploadError::Store(StoreError::Transient(format!(
                "multipart upload {upload_id} of {key} vanished; restarting it"
            ))))
        }
        Err(e) => Err(e.into()),
    }
}

/// The streaming uploader of `file` while a writer has it open: each part the writer has moved
/// past (every complete part but the last, which a writer finishing a record may still touch)
/// goes up as a part of a multipart upload, `part_concurrency` at a time, recorded in the
/// file's state (and journal, if the file is journaled). The upload after the last close finds
/// that record, sends only the tail and completes the upload, so a large sequential write is
/// in S3 shortly after `close`. Parts are claimed before they are sent: a change to a claimed
/// byte voids the upload, and streaming stops for this open (the close uploads everything
/// afresh); so does a file that outgrows `MAX_PARTS` parts (its part size will grow). The
/// file's upload lock is held only while a batch of parts is in flight, so an unlink or rename
/// waits at most that long; nothing is completed here, so a file is never published while it
/// is being written.
async fn stream(inner: &Arc<Inner>, file: &Arc<LocalFile>) -> Result<(), UploadError> {
    let part_size = inner.config.part_size;
    let mut ours: Option<String> = None;
    loop {
        if !file.has_writers() || file.is_unlinked() {
            return Ok(());
        }
        let ready = (file.size() / part_size).saturating_sub(1);
        if ready > MAX_PARTS as u64 {
            return Ok(());
        }
        if ready <= file.claimed() / part_size {
            tokio::time::sleep(STREAM_POLL).await;
            continue;
        }
        let _serial = file.upload_lock.lock().await;
        let current = file.journaled_upload();
        let upload_id = match (current, &ours) {
            (Some(r), Some(id)) if &r.upload_id == id => r.upload_id,
            // Voided (a change reached a claimed part), completed by an fsync, or replaced:
            // the rest is the close's business.
            (_, Some(_)) => return Ok(()),
            // Another upload is in progress (a resumed or failed one): leave it to the close.
            (Some(_), None) => return Ok(()),
            (None, None) => {
                let snapshot = file.streaming_snapshot();
                abort_stale_uploads(inner, &snapshot.key).await;
                let options = put_options(inner, &snapshot);
                let upload_id = inner
                    .store
                    .create_multipart(&snapshot.key, &options)
                    .await?;
                let record = UploadRecord {
                    upload_id: upload_id.clone(),
                    part_size,
                    parts: Vec::new(),
                };
                if !inner.cache.start_streamed_upload(file, &snapshot, record)? {
                    abort(inner, &snapshot.key, &upload_id).await;
                    return Ok(());
                }
                ours = Some(upload_id.clone());
                upload_id
            }
        };
        let first = file.claimed() / part_size + 1;
        if !inner
            .cache
            .claim_for_upload(file, &upload_id, ready * part_size)
        {
            return Ok(());
        }
        // Recorded parts must match durable data when the record is journaled (a resume after
        // a crash trusts them).
        file.sync_data()?;
        let key = file.key();
        let results: Vec<Result<(), UploadError>> = futures::stream::iter(first..=ready)
            .map(|number| {
                let (key, upload_id) = (&key, &upload_id);
                async move {
                    let body = Body::File {
                        path: file.path().to_path_buf(),
                        offset: (number - 1) * part_size,
                        len: part_size,
                    };
                    let number = number as u32;
                    let etag = inner
                        .store
                        .upload_part(key, upload_id, number, body)
                        .await?;
                    if !inner
                        .cache
                        .record_streamed_part(file, upload_id, number, etag)?
                    {
                        return Err(UploadError::Superseded);
                    }
                    Ok(())
                }
            })
            .buffer_unordered(inner.config.part_concurrency.max(1))
            .collect()
            .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e);
        }
    }
}

/// Whether part `range` of `snapshot` can be a server-side copy of the base version: none of
/// its bytes were ever fetched or written (a sparse staging's untouched range), the base is
/// the object at the same key, and the completion is conditional on it.
fn copies_from_base(
    inner: &Inner,
    file: &LocalFile,
    snapshot: &Snapshot,
    range: &std::ops::Range<u64>,
) -> bool {
    inner.config.conditional
        && matches!(snapshot.base, Base::Version(_))
        && file.missing_in(range.clone()) == [range.clone()]
}

/// Check a journaled upload against the server: keep the parts it really has.
async fn resume(
    inner: &Inner,
    key: &str,
    mut record: UploadRecord,
) -> Result<Option<UploadRecord>, UploadError> {
    match inner.store.list_parts(key, &record.upload_id).await {
        Ok(listed) => {
            let server: HashMap<u32, String> =
                listed.into_iter().map(|p| (p.number, p.etag)).collect();
            record.parts.retain(|(n, etag)| server.get(n) == Some(etag));
            Ok(Some(record))
        }
        Err(StoreError::NotFound(_)) => {
            tracing::warn!(
                key,
                upload_id = record.upload_id,
                "journaled multipart upload no longer exists; starting over"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Abort unfinished multipart uploads of exactly `key` before starting a new one: uploads a
/// crash left between CreateMultipartUpload and its journal record (the journal cannot name
/// them), or ones the journal gave up on. Whatever they held is about to be replaced anyway.
async fn abort_stale_uploads(inner: &Inner, key: &str) {
    match inner.store.list_multipart_uploads(key).await {
        Ok(uploads) => {
            for u in uploads.into_iter().filter(|u| u.key == key) {
                tracing::info!(
                    key,
                    upload_id = u.upload_id,
                    "aborting a stale multipart upload"
                );
                abort(inner, key, &u.upload_id).await;
            }
        }
        Err(e) => tracing::debug!(key, "cannot list multipart uploads: {e}"),
    }
}

/// Abort multipart uploads a file gave up: (key, upload id) (see `State::abandoned`).
async fn abort_all(inner: &Inner, abandoned: Vec<(String, String)>) {
    for (key, upload_id) in abandoned {
        tracing::debug!(key, upload_id, "aborting an abandoned multipart upload");
        abort(inner, &key, &upload_id).await;
    }
}

async fn abort(inner: &Inner, key: &str, upload_id: &str) {
    match inner.store.abort_multipart(key, upload_id).await {
        // Aborted already (an upload is given up both by the attempt that ran it and by the
        // change that voided it).
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => tracing::warn!(key, upload_id, "cannot abort a stale multipart upload: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for n in 1..40 {
            let d = backoff(n);
            let exp = BASE_BACKOFF
                .saturating_mul(1 << (n - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(d >= exp / 2 && d <= exp, "{n}: {d:?}");
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }

    #[test]
    fn conflict_names_are_unique_and_fit_in_255_bytes() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_820_800); // 2025-12-04 04:00
        let free = |_: &str| false;
        assert_eq!(
            conflict_key("owui/a b.pdf", t, free),
            "owui/a b.pdf.conflict-20251204T040000Z"
        );
        assert_eq!(
            conflict_key("top", t, free),
            "top.conflict-20251204T040000Z"
        );
        let taken = |k: &str| k.ends_with("Z") || k.ends_with("Z-2");
        assert_eq!(conflict_key("x", t, taken), "x.conflict-20251204T040000Z-3");
        // A 255-byte name of 2-byte characters is cut at a character boundary.
        let long = "é".repeat(127) + "e";
        let key = conflict_key(&format!("d/{long}"), t, free);
        let name = key.strip_prefix("d/").unwrap();
        assert!(name.len() <= NAME_MAX, "{}", name.len());
        assert!(name.ends_with(".conflict-20251204T040000Z"));
    }
}
