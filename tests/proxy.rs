//! The fault-injecting TCP proxy of the test harness (`tests/common/proxy.rs`): first on a plain
//! TCP echo server (forwarding, outage, cut connections, the fail rate; from a plain `#[test]`),
//! then in front of SeaweedFS with bucketfs's `S3Store` going through it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::s3::{self, Server};

use bucketfs::store::{Body, ObjectStore, PutOptions, S3Store, StoreError};
use bytes::Bytes;

/// A TCP echo server on its own threads, for as long as the test process lives.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let conn = TcpStream::connect(proxy.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn
}

/// Whether `msg` comes back through `conn`; `false` if the connection was closed or reset.
fn echoes(conn: &mut TcpStream, msg: &[u8]) -> bool {
    if conn.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    match conn.read_exact(&mut buf) {
        Ok(()) => {
            assert_eq!(buf, msg);
            true
        }
        Err(e) => {
            assert_ne!(e.kind(), ErrorKind::WouldBlock, "no answer and no close");
            false
        }
    }
}

/// Whether the connection has been closed by the other side (EOF or reset).
fn is_closed(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected {n} bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

#[test]
fn forwards_and_cuts_on_outage() {
    let proxy = FaultProxy::start(&format!("http://{}", echo_server()));
    assert!(proxy.endpoint().starts_with("http://127.0.0.1:"));
    let mut open = connect(&proxy);
    assert!(echoes(&mut open, b"hello"));
    assert_eq!((proxy.connections(), proxy.active()), (1, 1));

    proxy.set_down(true);
    assert!(proxy.is_down());
    // The open connection is cut...
    assert!(is_closed(&mut open), "open connection not cut");
    // ... and new ones are accepted, then closed at once.
    let mut refused = connect(&proxy);
    assert!(is_closed(&mut refused), "new connection not closed");
    assert_eq!(proxy.connections(), 2);
    assert_eq!((proxy.refused(), proxy.cut()), (1, 1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.active() != 0 {
        assert!(Instant::now() < deadline, "cut connection still active");
        std::thread::sleep(Duration::from_millis(10));
    }

    proxy.set_down(false);
    let mut again = connect(&proxy);
    assert!(echoes(&mut again, b"back"));
    assert!(echoes(&mut again, b"and again"));
    assert_eq!(proxy.connections(), 3);
}

/// The pattern of connections the fail rate closes, for one seed.
fn fail_pattern(p: f64, seed: u64, n: usize) -> Vec<bool> {
    let proxy = FaultProxy::start(&echo_server().to_string());
    proxy.set_fail_rate_seeded(p, seed);
    let pattern: Vec<bool> = (0..n)
        .map(|i| echoes(&mut connect(&proxy), format!("msg {i}").as_bytes()))
        .collect();
    assert_eq!(proxy.connections(), n);
    assert_eq!(proxy.refused(), pattern.iter().filter(|ok| !**ok).count());
    pattern
}

#[test]
fn fail_rate_is_deterministic_per_seed() {
    let a = fail_pattern(0.5, 3, 40);
    assert_eq!(a, fail_pattern(0.5, 3, 40));
    let failed = a.iter().filter(|ok| !**ok).count();
    assert!((5..35).contains(&failed), "{failed} of 40 at p = 0.5");
    assert!(fail_pattern(0.0, 3, 10).iter().all(|ok| *ok));
    assert!(fail_pattern(1.0, 3, 10).iter().all(|ok| !*ok));
}

#[test]
fn dropping_the_proxy_closes_everything() {
    let proxy = FaultProxy::start(&echo_server().to_string());
    let addr = proxy.addr();
    let mut open = connect(&proxy);
    assert!(echoes(&mut open, b"x"));
    drop(proxy);
    assert!(is_closed(&mut open));
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}

fn body(data: &[u8]) -> Body {
    Body::Bytes(Bytes::copy_from_slice(data))
}

async fn read_all(store: &S3Store, key: &str) -> Vec<u8> {
    let size = store.head(key).await.expect("head").size;
    store
        .get_range(key, 0..size, None)
        .await
        .expect("get")
        .to_vec()
}

/// An outage bounded in time: the SDK retries internally (with backoff) before giving up.
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| panic!("{what} through a down proxy did not fail within 30 s"));
    eprintln!(
        "{what} during the outage: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out
}

/// The SDK's own retries during an outage are counted (`bucketfs_s3_retries_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_through_the_proxy_survives_an_outage() {
    // The only test of this binary that installs the (process-wide) metrics recorder.
    let metrics = bucketfs::metrics::install().expect("metrics recorder");
    let server = Server::SeaweedFs;
    let bucket = s3::fresh_bucket(server).await;
    let proxy = FaultProxy::start(&s3::endpoint(server));
    let mut config = s3::s3_config(server, &bucket);
    config.endpoint_url = Some(proxy.endpoint());
    let store = S3Store::new(config).await.expect("S3Store via the proxy");
    store.check_access().await.expect("check_access");

    store
        .put("before", body(b"written before"), &PutOptions::default())
        .await
        .expect("put before the outage");
    assert_eq!(read_all(&store, "before").await, b"written before");
    assert!(proxy.connections() >= 1);
    assert_eq!(proxy.refused(), 0);

    proxy.set_down(true);
    let err = bounded("head", store.head("before")).await.unwrap_err();
    eprintln!("head during the outage: {err}");
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    let err = bounded(
        "put",
        store.put("during", body(b"lost"), &PutOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
    assert!(proxy.refused() >= 2, "refused {}", proxy.refused());
    let rendered = metrics.render();
    let retries: f64 = rendered
        .lines()
        .filter(|l| l.starts_with("bucketfs_s3_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(retries >= 2.0, "SDK retries not counted:\n{rendered}");

    proxy.set_down(false);
    assert_eq!(read_all(&store, "before").await, b"written before");
    store
        .put("after", body(b"written after"), &PutOptions::default())
        .await
        .expect("put after the outage");
    assert_eq!(read_all(&store, "after").await, b"written after");

    // Seen directly (not through the proxy): the put during the outage never arrived.
    let client = s3::sdk_client(server).await;
    assert_eq!(
        s3::list_keys(&client, &bucket, "").await,
        ["after", "before"]
    );
}
