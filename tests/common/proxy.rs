//! A fault-injecting TCP proxy in front of a real S3 server, to simulate an outage while a
//! daemon (or an `S3Store`) runs.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every connection, byte for byte,
//! to the upstream server; point bucketfs's `--endpoint-url` (or `S3Config::endpoint_url`) at
//! [`FaultProxy::endpoint`]. The proxy passes the `Host` header through untouched, and SigV4 signs
//! the host the client connected to, so signatures still check out upstream.
//!
//! [`FaultProxy::set_down`] makes it refuse service: new connections are accepted and closed at
//! once, and the open ones are cut. [`FaultProxy::set_fail_rate`] closes a fraction of new
//! connections at once (seeded, so a run is reproducible).
//!
//! It runs on its own thread with its own tokio runtime, so it keeps working while a test blocks
//! its thread in `std::fs` calls on a mount, and it serves `#[test]` and `#[tokio::test]` alike.
//! Dropping it stops the thread and closes every connection.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// State shared between the test's handle and the proxy thread.
struct Shared {
    /// `host:port` of the upstream server.
    upstream: String,
    /// Whether the proxy is down; connection tasks watch it to cut themselves.
    down: watch::Sender<bool>,
    /// Probability of closing a new connection at once, and its RNG.
    fail: Mutex<(f64, StdRng)>,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    active: AtomicUsize,
    cut: AtomicUsize,
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// `host:port` out of `http://host:port[/...]` or `host:port`.
fn host_port(upstream: &str) -> String {
    let rest = upstream
        .strip_prefix("http://")
        .or_else(|| upstream.strip_prefix("https://"))
        .unwrap_or(upstream);
    let authority = rest.split('/').next().unwrap_or(rest);
    assert!(
        authority.contains(':'),
        "upstream {upstream:?} names no port"
    );
    authority.to_string()
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT` as in the servers' env, or
    /// `127.0.0.1:PORT`). Synchronous, so it works with or without a runtime: the listener is
    /// bound before it returns.
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream: host_port(upstream),
            down: watch::Sender::new(false),
            fail: Mutex::new((0.0, StdRng::seed_from_u64(0))),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            cut: AtomicUsize::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn({
                let shared = shared.clone();
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the proxy's runtime");
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("tokio listener");
                        tokio::select! {
                            _ = stopped => {}
                            _ = accept_loop(listener, shared) => {}
                        }
                    });
                    // Dropping the runtime drops every connection task and closes its sockets.
                    drop(runtime);
                }
            })
            .expect("spawn the proxy thread");
        FaultProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `--endpoint-url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Down: new connections are closed as soon as they are accepted, and every open one is cut
    /// now. Up again: connections are forwarded as before.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    pub fn is_down(&self) -> bool {
        *self.shared.down.borrow()
    }

    /// Closes each new connection at once with probability `p` (0: never), from an RNG seeded
    /// with `seed`, so the n-th connection always meets the same fate.
    pub fn set_fail_rate_seeded(&self, p: f64, seed: u64) {
        assert!((0.0..=1.0).contains(&p), "fail rate {p} is not in [0, 1]");
        *self.shared.fail.lock().unwrap() = (p, StdRng::seed_from_u64(seed));
    }

    /// [`set_fail_rate_seeded`](Self::set_fail_rate_seeded) with seed 0.
    pub fn set_fail_rate(&self, p: f64) {
        self.set_fail_rate_seeded(p, 0);
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections closed at once (down, or the fail rate), or whose upstream was unreachable.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections being forwarded right now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Open connections cut by `set_down(true)`.
    pub fn cut(&self) -> usize {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and the like: keep serving rather than end the proxy.
                eprintln!("fault proxy: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let refuse = *shared.down.borrow() || {
            let mut fail = shared.fail.lock().unwrap();
            let p = fail.0;
            p > 0.0 && fail.1.random_bool(p)
        };
        if refuse {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        tokio::spawn(forward(client, shared.clone()));
    }
}

/// Counts a connection as active while it lives.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(mut client: TcpStream, shared: Arc<Shared>) {
    let mut down = shared.down.subscribe();
    let mut upstream = match TcpStream::connect(&shared.upstream).await {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("fault proxy: connect to {}: {e}", shared.upstream);
            shared.refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard(shared.clone());
    tokio::select! {
        // Either side closing (or failing) ends both.
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        // `wait_for` looks at the current value first, so a cut that raced the connect applies.
        _ = down.wait_for(|down| *down) => {
            shared.cut.fetch_add(1, Ordering::SeqCst);
        }
    }
    // Both sockets are dropped here: the client sees its connection closed mid-request.
}
