//! [`FaultyStore`]: an [`ObjectStore`] wrapper that injects failures, for tests of the code above
//! the store seam (the filesystem core, the uploader, the write-back queue).
//!
//! It delegates every call to an inner store and, controlled at run time through `&self`, can
//! make calls fail instead:
//!
//! - **queued faults** ([`FaultyStore::fail_next`], [`FaultyStore::fail_next_op`]): the next `n`
//!   calls (of one operation, or of any) fail with a chosen error, without reaching the inner
//!   store;
//! - **lost responses** ([`FaultyStore::fail_after`]): the next `n` calls of one operation do
//!   reach the inner store (and take effect there), then fail anyway — the request succeeded
//!   but its answer was lost, which is what idempotent retries must survive;
//! - **a failure rate** ([`FaultyStore::set_failure_rate`]): each call fails with probability `p`,
//!   drawn from a seeded RNG ([`FaultyStore::set_seed`]), so a run is reproducible: the n-th call
//!   that reaches the draw always gets the same verdict (with concurrent callers, which call is
//!   the n-th depends on scheduling);
//! - **an outage** ([`FaultyStore::set_outage`]): every call fails until it is lifted;
//! - **latency** ([`FaultyStore::set_latency`]): a tokio sleep before each call.
//!
//! Precedence when several apply: outage, then queued faults and lost responses (in the order
//! they were queued), then the rate. Injected failures other than queued ones are
//! `StoreError::Transient`.
//!
//! Every call is counted ([`FaultyStore::calls`], [`FaultyStore::failures`],
//! [`FaultyStore::forwarded`]) and logged ([`FaultyStore::history`], with key and part number),
//! so a test can assert, say, that a part already uploaded was not uploaded again.
//!
//! Operations are named as the trait's methods (`put`, `upload_part`, `complete_multipart`, ...;
//! the full list is [`FaultyStore::OPS`]); an unknown name panics, so a typo cannot make an
//! assertion pass vacuously. State lives in one `std::sync::Mutex`, never held across an
//! `.await`.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    Body, CompletedPart, Condition, ListPage, ListRequest, Metadata, MultipartUpload, ObjectMeta,
    ObjectStore, PartInfo, PutOptions, Result, StoreError,
};

/// The operations of [`ObjectStore`], by method name.
const OPS: [&str; 14] = [
    "check_access",
    "head",
    "get_range",
    "list",
    "put",
    "copy",
    "delete",
    "create_multipart",
    "upload_part",
    "upload_part_copy",
    "complete_multipart",
    "abort_multipart",
    "list_parts",
    "list_multipart_uploads",
];

/// The index of `op` in [`OPS`]; panics on an unknown name.
fn op_index(op: &str) -> usize {
    OPS.iter()
        .position(|o| *o == op)
        .unwrap_or_else(|| panic!("FaultyStore: unknown operation {op:?} (one of {OPS:?})"))
}

/// How one call ended, as seen by the wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultyOutcome {
    /// Forwarded to the inner store, which succeeded.
    Ok,
    /// Forwarded to the inner store, which failed on its own.
    InnerError,
    /// Failed by the wrapper without reaching the inner store.
    Injected,
    /// Forwarded (the inner store's result was `inner_ok`), then failed by the wrapper anyway.
    InjectedAfter { inner_ok: bool },
}

impl FaultyOutcome {
    /// Whether the wrapper failed the call.
    pub fn injected(self) -> bool {
        matches!(
            self,
            FaultyOutcome::Injected | FaultyOutcome::InjectedAfter { .. }
        )
    }

    /// Whether the call reached the inner store.
    pub fn forwarded(self) -> bool {
        !matches!(self, FaultyOutcome::Injected)
    }
}

/// One call, as logged by [`FaultyStore::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultyCall {
    /// The operation (a name from [`FaultyStore::OPS`]).
    pub op: &'static str,
    /// The key the call is about (the destination of a copy; the prefix of a listing; empty for
    /// `check_access`).
    pub key: String,
    /// The part number of `upload_part` and `upload_part_copy`.
    pub part: Option<u32>,
    pub outcome: FaultyOutcome,
}

/// One call of operation `op` running; counted out on drop.
struct Running<'a> {
    store: &'a FaultyStore,
    op: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.store.state().in_flight[self.op] -= 1;
    }
}

/// A queued fault.
#[derive(Debug)]
struct Fault {
    /// `None`: any operation.
    op: Option<usize>,
    remaining: usize,
    error: fn() -> StoreError,
    /// Forward the call first, then fail (a lost response).
    after: bool,
}

/// What to do with one call.
enum Verdict {
    Forward,
    Fail(StoreError),
    ForwardThenFail(StoreError),
}

struct State {
    faults: VecDeque<Fault>,
    rate: f64,
    rng: StdRng,
    outage: bool,
    latency: Duration,
    calls: [usize; OPS.len()],
    failures: [usize; OPS.len()],
    forwarded: [usize; OPS.len()],
    /// Calls running now, and the most that ran at once.
    in_flight: [usize; OPS.len()],
    max_in_flight: [usize; OPS.len()],
    history: Vec<FaultyCall>,
}

impl State {
    fn new(seed: u64) -> State {
        State {
            faults: VecDeque::new(),
            rate: 0.0,
            rng: StdRng::seed_from_u64(seed),
            outage: false,
            latency: Duration::ZERO,
            calls: [0; OPS.len()],
            failures: [0; OPS.len()],
            forwarded: [0; OPS.len()],
            in_flight: [0; OPS.len()],
            max_in_flight: [0; OPS.len()],
            history: Vec::new(),
        }
    }

    fn verdict(&mut self, op: usize) -> Verdict {
        if self.outage {
            return Verdict::Fail(StoreError::Transient("injected outage".into()));
        }
        if let Some(i) = self
            .faults
            .iter()
            .position(|f| f.op.is_none_or(|o| o == op))
        {
            let fault = &mut self.faults[i];
            let error = (fault.error)();
            let after = fault.after;
            fault.remaining -= 1;
            if fault.remaining == 0 {
                self.faults.remove(i);
            }
            return if after {
                Verdict::ForwardThenFail(error)
            } else {
                Verdict::Fail(error)
            };
        }
        if self.rate > 0.0 && self.rng.random_bool(self.rate) {
            return Verdict::Fail(StoreError::Transient("injected".into()));
        }
        Verdict::Forward
    }

    fn record(&mut self, op: usize, key: &str, part: Option<u32>, outcome: FaultyOutcome) {
        if outcome.injected() {
            self.failures[op] += 1;
        }
        if outcome.forwarded() {
            self.forwarded[op] += 1;
        }
        self.history.push(FaultyCall {
            op: OPS[op],
            key: key.to_string(),
            part,
            outcome,
        });
    }
}

/// An [`ObjectStore`] that delegates to another and fails calls on demand (see the module
/// documentation).
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Mutex<State>,
}

impl FaultyStore {
    /// The operation names the fault and counter methods accept.
    pub const OPS: &'static [&'static str] = &OPS;

    /// Wraps `inner` with no faults (it is transparent until told otherwise). The failure-rate
    /// RNG is seeded with 0.
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            state: Mutex::new(State::new(0)),
        }
    }

    /// The wrapped store (to look at the bucket past the faults).
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not turn every later call into a second panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` calls, of any operation, fail with `error()` without reaching the inner
    /// store.
    pub fn fail_next(&self, n: usize, error: fn() -> StoreError) {
        self.queue(None, n, error, false);
    }

    /// The next `n` calls of `op` fail with `error()` without reaching the inner store.
    pub fn fail_next_op(&self, op: &str, n: usize, error: fn() -> StoreError) {
        self.queue(Some(op_index(op)), n, error, false);
    }

    /// The next `n` calls of `op` are forwarded to the inner store (and take effect there), then
    /// fail with `error()` anyway: a request that succeeded but whose answer was lost.
    pub fn fail_after(&self, op: &str, n: usize, error: fn() -> StoreError) {
        self.queue(Some(op_index(op)), n, error, true);
    }

    fn queue(&self, op: Option<usize>, n: usize, error: fn() -> StoreError, after: bool) {
        if n > 0 {
            self.state().faults.push_back(Fault {
                op,
                remaining: n,
                error,
                after,
            });
        }
    }

    /// How many queued failures (of `fail_next`, `fail_next_op` and `fail_after`) have not
    /// happened yet.
    pub fn pending_faults(&self) -> usize {
        self.state().faults.iter().map(|f| f.remaining).sum()
    }

    /// Each later call fails with probability `p` (`StoreError::Transient("injected")`); 0
    /// turns it off.
    pub fn set_failure_rate(&self, p: f64) {
        assert!(
            (0.0..=1.0).contains(&p),
            "failure rate {p} is not in [0, 1]"
        );
        self.state().rate = p;
    }

    /// Restarts the failure-rate RNG from `seed`.
    pub fn set_seed(&self, seed: u64) {
        self.state().rng = StdRng::seed_from_u64(seed);
    }

    /// While on, every call fails with `StoreError::Transient("injected outage")`.
    pub fn set_outage(&self, on: bool) {
        self.state().outage = on;
    }

    /// A delay before each later call (`Duration::ZERO`: none).
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// Drops every queued fault and turns the rate, outage and latency off; counters and history
    /// are kept.
    pub fn clear_faults(&self) {
        let mut state = self.state();
        state.faults.clear();
        state.rate = 0.0;
        state.outage = false;
        state.latency = Duration::ZERO;
    }

    /// Calls of `op` so far, failed ones included.
    pub fn calls(&self, op: &str) -> usize {
        self.state().calls[op_index(op)]
    }

    /// Calls of `op` that the wrapper failed (inner errors, such as `NotFound`, not counted).
    pub fn failures(&self, op: &str) -> usize {
        self.state().failures[op_index(op)]
    }

    /// Calls of `op` that reached the inner store.
    pub fn forwarded(&self, op: &str) -> usize {
        self.state().forwarded[op_index(op)]
    }

    /// Calls of every operation so far.
    pub fn total_calls(&self) -> usize {
        self.state().calls.iter().sum()
    }

    /// Injected failures of every operation so far.
    pub fn total_failures(&self) -> usize {
        self.state().failures.iter().sum()
    }

    /// Every finished call so far, in the order they finished.
    /// The most calls of `op` that ran at once.
    pub fn max_in_flight(&self, op: &str) -> usize {
        self.state().max_in_flight[op_index(op)]
    }

    pub fn history(&self) -> Vec<FaultyCall> {
        self.state().history.clone()
    }

    /// Zeroes the counters and clears the history (faults are kept).
    pub fn reset_counters(&self) {
        let mut state = self.state();
        state.calls = [0; OPS.len()];
        state.failures = [0; OPS.len()];
        state.forwarded = [0; OPS.len()];
        state.max_in_flight = state.in_flight;
        state.history.clear();
    }

    /// Runs one call: latency, the verdict, then (maybe) the inner call, and the bookkeeping.
    async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        part: Option<u32>,
        inner: impl Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        let op = op_index(op);
        let latency = {
            let mut state = self.state();
            state.calls[op] += 1;
            state.in_flight[op] += 1;
            state.max_in_flight[op] = state.max_in_flight[op].max(state.in_flight[op]);
            state.latency
        };
        // Counts the call out however it ends (a cancelled future included).
        let _running = Running { store: self, op };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // Decided after the sleep, so an outage that starts meanwhile applies.
        let verdict = self.state().verdict(op);
        match verdict {
            Verdict::Fail(error) => {
                self.state().record(op, key, part, FaultyOutcome::Injected);
                Err(error)
            }
            Verdict::ForwardThenFail(error) => {
                let inner_ok = inner.await.is_ok();
                self.state()
                    .record(op, key, part, FaultyOutcome::InjectedAfter { inner_ok });
                Err(error)
            }
            Verdict::Forward => {
                let result = inner.await;
                let outcome = if result.is_ok() {
                    FaultyOutcome::Ok
                } else {
                    FaultyOutcome::InnerError
                };
                self.state().record(op, key, part, outcome);
                result
            }
        }
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner)
            .field("queued_faults", &state.faults.len())
            .field("rate", &state.rate)
            .field("outage", &state.outage)
            .field("latency", &state.latency)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        format!("faulty+{}", self.inner.describe())
    }

    async fn check_access(&self) -> Result<()> {
        self.call("check_access", "", None, self.inner.check_access())
            .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        self.call("head", key, None, self.inner.head(key)).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> Result<Bytes> {
        self.call(
            "get_range",
            key,
            None,
            self.inner.get_range(key, range, if_match),
        )
        .await
    }

    async fn list(&self, request: ListRequest<'_>) -> Result<ListPage> {
        let prefix = request.prefix;
        self.call("list", prefix, None, self.inner.list(request))
            .await
    }

    async fn put(&self, key: &str, body: Body, options: &PutOptions) -> Result<String> {
        self.call("put", key, None, self.inner.put(key, body, options))
            .await
    }

    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<String> {
        self.call("copy", to, None, self.inner.copy(from, to, metadata))
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.call("delete", key, None, self.inner.delete(key)).await
    }

    async fn create_multipart(&self, key: &str, options: &PutOptions) -> Result<String> {
        self.call(
            "create_multipart",
            key,
            None,
            self.inner.create_multipart(key, options),
        )
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        body: Body,
    ) -> Result<String> {
        self.call(
            "upload_part",
            key,
            Some(number),
            self.inner.upload_part(key, upload_id, number, body),
        )
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        from: &str,
        range: Range<u64>,
    ) -> Result<String> {
        self.call(
            "upload_part_copy",
            key,
            Some(number),
            self.inner
                .upload_part_copy(key, upload_id, number, from, range),
        )
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
        condition: &Condition,
    ) -> Result<String> {
        self.call(
            "complete_multipart",
            key,
            None,
            self.inner
                .complete_multipart(key, upload_id, parts, condition),
        )
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.call(
            "abort_multipart",
            key,
            None,
            self.inner.abort_multipart(key, upload_id),
        )
        .await
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>> {
        self.call(
            "list_parts",
            key,
            None,
            self.inner.list_parts(key, upload_id),
        )
        .await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> Result<Vec<MultipartUpload>> {
        self.call(
            "list_multipart_uploads",
            prefix,
            None,
            self.inner.list_multipart_uploads(prefix),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn store() -> FaultyStore {
        FaultyStore::new(Arc::new(MemoryStore::new()))
    }

    fn body(data: &[u8]) -> Body {
        Body::Bytes(Bytes::copy_from_slice(data))
    }

    async fn put(store: &FaultyStore, key: &str) -> Result<String> {
        store
            .put(key, body(key.as_bytes()), &PutOptions::default())
            .await
    }

    fn throttled() -> StoreError {
        StoreError::Throttled("injected".into())
    }

    #[tokio::test]
    async fn transparent_by_default() {
        let store = store();
        assert_eq!(store.describe(), "faulty+memory://");
        store.check_access().await.unwrap();
        let etag = put(&store, "a").await.unwrap();
        assert_eq!(store.head("a").await.unwrap().etag, etag);
        assert_eq!(&store.get_range("a", 0..1, None).await.unwrap()[..], b"a");
        assert!(store.head("missing").await.unwrap_err().is_not_found());
        assert_eq!(store.calls("put"), 1);
        assert_eq!(store.calls("head"), 2);
        assert_eq!(store.forwarded("head"), 2);
        assert_eq!(
            store.failures("head"),
            0,
            "inner errors are not injected ones"
        );
        assert_eq!(store.total_calls(), 5);
        assert_eq!(store.total_failures(), 0);
        let history = store.history();
        assert_eq!(history.len(), 5);
        assert_eq!(
            (history[4].op, history[4].key.as_str(), history[4].outcome),
            ("head", "missing", FaultyOutcome::InnerError)
        );
    }

    #[tokio::test]
    async fn fail_next_any_op() {
        let store = store();
        store.fail_next(2, throttled);
        assert_eq!(store.pending_faults(), 2);
        assert!(matches!(
            put(&store, "a").await.unwrap_err(),
            StoreError::Throttled(_)
        ));
        assert!(matches!(
            store.head("a").await.unwrap_err(),
            StoreError::Throttled(_)
        ));
        assert_eq!(store.pending_faults(), 0);
        // The failed put never reached the store.
        assert!(store.head("a").await.unwrap_err().is_not_found());
        put(&store, "a").await.unwrap();
        assert_eq!(
            (
                store.calls("put"),
                store.failures("put"),
                store.forwarded("put")
            ),
            (2, 1, 1)
        );
        assert_eq!((store.calls("head"), store.failures("head")), (2, 1));
        assert_eq!(store.total_failures(), 2);
    }

    #[tokio::test]
    async fn fail_next_op_only_hits_that_op() {
        let store = store();
        store.fail_next_op("upload_part", 1, || {
            StoreError::PermissionDenied("no".into())
        });
        put(&store, "big").await.unwrap();
        let id = store
            .create_multipart("big", &PutOptions::default())
            .await
            .unwrap();
        let err = store
            .upload_part("big", &id, 1, body(b"one"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::PermissionDenied(_)), "{err:?}");
        let etag = store
            .upload_part("big", &id, 1, body(b"one"))
            .await
            .unwrap();
        store
            .complete_multipart(
                "big",
                &id,
                &[CompletedPart { number: 1, etag }],
                &Condition::None,
            )
            .await
            .unwrap();
        assert_eq!(store.head("big").await.unwrap().size, 3);
        assert_eq!(
            (store.calls("upload_part"), store.failures("upload_part")),
            (2, 1)
        );
        let parts: Vec<_> = store
            .history()
            .into_iter()
            .filter(|c| c.op == "upload_part")
            .map(|c| (c.key, c.part, c.outcome))
            .collect();
        assert_eq!(
            parts,
            [
                ("big".to_string(), Some(1), FaultyOutcome::Injected),
                ("big".to_string(), Some(1), FaultyOutcome::Ok)
            ]
        );
    }

    #[tokio::test]
    async fn queued_faults_apply_in_order() {
        let store = store();
        store.fail_next_op("head", 1, throttled);
        store.fail_next(1, || StoreError::Other("second".into()));
        // The first head consumes the head-only fault, the put the catch-all.
        assert!(matches!(
            store.head("x").await.unwrap_err(),
            StoreError::Throttled(_)
        ));
        assert!(matches!(
            put(&store, "x").await.unwrap_err(),
            StoreError::Other(_)
        ));
        put(&store, "x").await.unwrap();
    }

    #[tokio::test]
    async fn fail_after_forwards_then_fails() {
        let store = store();
        store.fail_after("put", 1, || StoreError::Transient("response lost".into()));
        let err = put(&store, "a").await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        // The write happened: the retry finds the same object.
        let head = store.head("a").await.unwrap();
        assert_eq!(head.size, 1);
        let etag = put(&store, "a").await.unwrap();
        assert_eq!(etag, head.etag);
        assert_eq!(
            (
                store.calls("put"),
                store.failures("put"),
                store.forwarded("put")
            ),
            (2, 1, 2)
        );
        assert_eq!(
            store.history()[0].outcome,
            FaultyOutcome::InjectedAfter { inner_ok: true }
        );

        // A conditional create whose answer is lost comes back as PreconditionFailed on retry,
        // just like S3 behind the SDK's retries.
        store.fail_after("put", 1, || StoreError::Transient("response lost".into()));
        let create = PutOptions {
            condition: Condition::IfNoneMatch,
            ..Default::default()
        };
        assert!(
            store
                .put("b", body(b"b"), &create)
                .await
                .unwrap_err()
                .is_transient()
        );
        let err = store.put("b", body(b"b"), &create).await.unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn outage_fails_everything_until_lifted() {
        let store = store();
        put(&store, "a").await.unwrap();
        store.set_outage(true);
        for _ in 0..3 {
            let err = store.head("a").await.unwrap_err();
            assert!(
                matches!(&err, StoreError::Transient(m) if m == "injected outage"),
                "{err:?}"
            );
        }
        assert!(store.delete("a").await.unwrap_err().is_transient());
        assert!(
            store
                .list(ListRequest::default())
                .await
                .unwrap_err()
                .is_transient()
        );
        store.set_outage(false);
        assert_eq!(store.head("a").await.unwrap().size, 1, "delete never ran");
        assert_eq!((store.calls("head"), store.failures("head")), (4, 3));
        assert_eq!(store.failures("delete"), 1);
        assert_eq!(store.forwarded("delete"), 0);
    }

    #[tokio::test]
    async fn outage_wins_over_queued_faults() {
        let store = store();
        store.fail_next(1, throttled);
        store.set_outage(true);
        assert!(matches!(
            store.head("a").await.unwrap_err(),
            StoreError::Transient(_)
        ));
        store.set_outage(false);
        assert_eq!(store.pending_faults(), 1, "kept for after the outage");
        assert!(matches!(
            store.head("a").await.unwrap_err(),
            StoreError::Throttled(_)
        ));
    }

    /// The verdicts of `n` heads at rate `p` with `seed`.
    async fn verdicts(seed: u64, p: f64, n: usize) -> Vec<bool> {
        let store = store();
        put(&store, "a").await.unwrap();
        store.set_seed(seed);
        store.set_failure_rate(p);
        let mut out = Vec::new();
        for _ in 0..n {
            match store.head("a").await {
                Ok(_) => out.push(true),
                Err(StoreError::Transient(m)) => {
                    assert_eq!(m, "injected");
                    out.push(false)
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(
            store.failures("head"),
            out.iter().filter(|ok| !**ok).count()
        );
        out
    }

    #[tokio::test]
    async fn failure_rate_is_deterministic_per_seed() {
        let a = verdicts(7, 0.3, 1000).await;
        let b = verdicts(7, 0.3, 1000).await;
        assert_eq!(a, b, "same seed, same failures");
        let failed = a.iter().filter(|ok| !**ok).count();
        assert!((200..400).contains(&failed), "{failed} of 1000 at p = 0.3");
        assert_ne!(a, verdicts(8, 0.3, 1000).await, "another seed differs");
        assert!(verdicts(7, 0.0, 100).await.iter().all(|ok| *ok));
        assert!(verdicts(7, 1.0, 100).await.iter().all(|ok| !*ok));
    }

    async fn heads_from_seed(store: &FaultyStore, seed: u64) -> Vec<bool> {
        store.set_seed(seed);
        let mut out = Vec::new();
        for _ in 0..64 {
            out.push(store.head("a").await.is_ok());
        }
        out
    }

    #[tokio::test]
    async fn set_seed_restarts_the_sequence() {
        let store = store();
        put(&store, "a").await.unwrap();
        store.set_failure_rate(0.5);
        let first = heads_from_seed(&store, 42).await;
        assert!(first.contains(&true) && first.contains(&false));
        assert_eq!(first, heads_from_seed(&store, 42).await);
        store.clear_faults();
        assert!(
            heads_from_seed(&store, 42).await.iter().all(|ok| *ok),
            "rate cleared"
        );
    }

    // Real time (the crate's tokio has no `test-util`): lower bounds are exact, upper ones loose.
    #[tokio::test]
    async fn latency_delays_each_call() {
        let store = store();
        store.set_latency(Duration::from_millis(100));
        let started = std::time::Instant::now();
        put(&store, "a").await.unwrap();
        store.head("a").await.unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        store.set_latency(Duration::ZERO);
        let started = std::time::Instant::now();
        store.head("a").await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn an_outage_starting_during_the_latency_applies() {
        let store = Arc::new(store());
        store.set_latency(Duration::from_millis(500));
        let call = tokio::spawn({
            let store = store.clone();
            async move { store.head("a").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.set_outage(true);
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(&err, StoreError::Transient(m) if m == "injected outage"));
    }

    #[tokio::test]
    async fn counters_reset() {
        let store = store();
        put(&store, "a").await.unwrap();
        store.reset_counters();
        assert_eq!(store.total_calls(), 0);
        assert!(store.history().is_empty());
        for op in FaultyStore::OPS {
            assert_eq!(store.calls(op), 0);
        }
    }

    #[test]
    #[should_panic(expected = "unknown operation \"upload_parts\"")]
    fn unknown_op_names_panic() {
        store().calls("upload_parts");
    }
}
