//! Wiring for the binary: check the source, build the store and the core, mount, serve until
//! unmounted or signalled, then flush and unmount.
//!
//! Everything that can fail at start (a missing mount point, an unreachable endpoint, a wrong
//! key, a missing bucket) fails here, before anything is mounted, with a one-line reason.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::ConditionalWrites;
use crate::config::{Config, Source};
use crate::fs::Filesystem;
use crate::fuse::FuseAdapter;
use crate::store::{self, DirStore, MeteredStore, ObjectStore, S3Store, StoreError};

/// How long the start-up check may take before the endpoint counts as unreachable.
const ACCESS_CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the serve loop checks whether the mount was removed from outside (`umount`).
const SESSION_POLL: Duration = Duration::from_millis(200);

/// A start-up failure: printed as one line, exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// Build the store for `config.source` (metered: every request counts in the metrics) and
/// check that it is usable.
pub async fn open_store(config: &Config) -> Result<Arc<dyn ObjectStore>, StartError> {
    let store: Arc<dyn ObjectStore> = match &config.source {
        Source::S3 { bucket, .. } => {
            let store = S3Store::new(config.s3.store_config(bucket))
                .await
                .map_err(|e| StartError(format!("cannot set up the S3 client: {e}")))?;
            Arc::new(store)
        }
        Source::Dir { path } => Arc::new(
            DirStore::open(path)
                .map_err(|e| StartError(format!("cannot open {}: {e}", path.display())))?,
        ),
    };
    let store: Arc<dyn ObjectStore> = Arc::new(MeteredStore::new(store));
    let what = store.describe();
    match tokio::time::timeout(ACCESS_CHECK_TIMEOUT, store.check_access()).await {
        Ok(Ok(())) => Ok(store),
        Ok(Err(StoreError::NoSuchBucket(b))) => {
            Err(StartError(format!("bucket {b:?} does not exist ({what})")))
        }
        Ok(Err(e @ StoreError::PermissionDenied(_))) => Err(StartError(format!(
            "{what}: {e} (check S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY)"
        ))),
        Ok(Err(e)) => Err(StartError(format!("{what}: {e}"))),
        Err(_) => Err(StartError(format!(
            "{what}: no answer within {}s (is the endpoint reachable?)",
            ACCESS_CHECK_TIMEOUT.as_secs()
        ))),
    }
}

/// Settle `--conditional-writes`: `auto` probes the store once (a writable mount only; the
/// probe writes and deletes one scratch object under the prefix).
pub async fn conditional_writes(config: &Config, store: &dyn ObjectStore) -> bool {
    match config.conditional_writes {
        ConditionalWrites::On => true,
        ConditionalWrites::Off => false,
        ConditionalWrites::Auto if config.fs.read_only => false,
        ConditionalWrites::Auto => {
            let scratch = format!(
                "{}.bucketfs-probe-{:016x}",
                config.source.prefix(),
                rand::random::<u64>()
            );
            let probe = store::honours_conditional_writes(store, &scratch);
            match tokio::time::timeout(ACCESS_CHECK_TIMEOUT, probe).await {
                Ok(Ok(true)) => {
                    tracing::info!(
                        "conditional writes: supported; uploads cannot overwrite other clients' changes unseen"
                    );
                    true
                }
                Ok(Ok(false)) => {
                    tracing::warn!(
                        "conditional writes: not supported by the server; uploads replace objects unconditionally"
                    );
                    false
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        "conditional writes: probe failed ({e}); uploads replace objects unconditionally"
                    );
                    false
                }
                Err(_) => {
                    tracing::warn!(
                        "conditional writes: probe timed out; uploads replace objects unconditionally"
                    );
                    false
                }
            }
        }
    }
}

/// Refuse mount points that do not exist, are not directories, or are dead FUSE mounts.
pub fn check_mountpoint(path: &Path) -> Result<(), StartError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(StartError(format!(
            "mount point {} is not a directory",
            path.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(StartError(format!(
            "mount point {} is a dead FUSE mount (its daemon died): run `umount -l {}` first",
            path.display(),
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StartError(format!(
            "mount point {} does not exist",
            path.display()
        ))),
        Err(e) => Err(StartError(format!("mount point {}: {e}", path.display()))),
    }
}

/// A live mount: the FUSE session thread plus the core it serves.
pub struct Mounted {
    pub fs: Arc<Filesystem>,
    session: fuser::BackgroundSession,
}

/// Mount `config` (store already opened and checked). Returns once the kernel has the mount.
pub fn mount(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Handle,
) -> Result<Mounted, StartError> {
    let fs = Filesystem::new(store, config.source.prefix().to_string(), config.fs.clone())
        .map_err(|e| StartError(e.to_string()))?;
    let fs = Arc::new(fs);
    let mut options = vec![
        fuser::MountOption::FSName(config.source.url()),
        fuser::MountOption::Subtype("bucketfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    if config.fs.read_only {
        options.push(fuser::MountOption::RO);
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if config.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    // Handlers only spawn onto tokio, so a few threads keep the kernel queue drained.
    fuse_config.n_threads = Some(4);
    fuse_config.clone_fd = true;
    let adapter = FuseAdapter::new(fs.clone(), runtime);
    let session = fuser::Session::new(adapter, &config.mountpoint, &fuse_config)
        .and_then(|s| s.spawn())
        .map_err(|e| {
            StartError(format!(
                "cannot mount at {}: {e}",
                config.mountpoint.display()
            ))
        })?;
    tracing::info!(source = %config.source.url(), mountpoint = %config.mountpoint.display(), "mounted");
    Ok(Mounted { fs, session })
}

/// Why `serve` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Signal,
    Unmounted,
}

/// SIGTERM and SIGINT, caught from the start of `serve` (before mounting): a stop requested
/// while the mount comes up (a supervisor or test that stops it at once) is then a clean drain
/// and unmount as soon as the mount is up, instead of the default action killing the process
/// and leaving a dead mount behind.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Catch the signals now (inside the runtime). `None` if that fails (logged).
    pub fn catch() -> Option<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some(StopSignals { term, int }),
            _ => {
                tracing::error!("cannot install signal handlers; serving until unmounted");
                None
            }
        }
    }
}

impl Mounted {
    /// Wait for SIGTERM/SIGINT (caught by `signals`) or for the mount to be removed from
    /// outside.
    pub async fn wait(&self, signals: Option<StopSignals>) -> Stop {
        let Some(StopSignals { mut term, mut int }) = signals else {
            return self.wait_unmounted().await;
        };
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: flushing and unmounting"); Stop::Signal }
            _ = int.recv() => { tracing::info!("SIGINT: flushing and unmounting"); Stop::Signal }
            stop = self.wait_unmounted() => stop,
        }
    }

    async fn wait_unmounted(&self) -> Stop {
        while !self.session.guard.is_finished() {
            tokio::time::sleep(SESSION_POLL).await;
        }
        tracing::info!("unmounted from outside");
        Stop::Unmounted
    }

    /// Upload everything pending (at most `drain_timeout`), then unmount. Returns whether all
    /// data reached the store.
    pub async fn shutdown(self, drain_timeout: Duration) -> bool {
        crate::service::stopping(&self.fs);
        let reporter = crate::service::spawn_status_reporter(self.fs.clone(), "draining: ");
        let left = self.fs.drain(drain_timeout).await;
        reporter.abort();
        let synced = left == 0;
        crate::service::status(&if synced {
            "drained: every change is in the bucket; unmounting".to_string()
        } else {
            format!("drain timed out: {left} files stay journaled for the next start; unmounting")
        });
        if synced {
            tracing::info!("every change is in the bucket");
        } else {
            tracing::error!(
                files = left,
                "drain timed out: these files stay journaled in the cache and upload at the next start"
            );
        }
        let session = self.session;
        let unmounted = tokio::task::spawn_blocking(move || {
            // Unmounted from outside: the session has ended, only the thread remains to join.
            if session.guard.is_finished() {
                session.join()
            } else {
                session.umount_and_join()
            }
        })
        .await;
        match unmounted {
            Ok(Ok(())) => tracing::info!("unmounted"),
            Ok(Err(e)) => tracing::warn!("unmount: {e}"),
            Err(e) => tracing::warn!("unmount task: {e}"),
        }
        synced
    }
}
