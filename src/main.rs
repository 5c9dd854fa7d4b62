//! The `bucketfs` binary: parse flags, set up logging, mount, serve, drain, unmount.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use bucketfs::cli::{Cli, Command, LogFormat, MountArgs};
use bucketfs::config::Config;
use bucketfs::mount::{self, StartError};
use bucketfs::{helper, metrics, service};

/// Set in the environment of the detached child that `--daemon` starts.
const DAEMON_CHILD_ENV: &str = "BUCKETFS_DAEMON_CHILD";
/// What the detached child prints on stdout once the mount answers.
const READY_LINE: &str = "bucketfs-ready";
/// How long a fresh mount may take to answer its first `statfs` before start-up fails (it
/// answers within milliseconds; a kernel that takes longer is stuck elsewhere).
const MOUNT_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if helper::is_helper(&argv0) {
        return run_helper();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Mount(args) => run_mount(*args, std::env::args_os().skip(1).collect()),
        Command::Health(args) => match service::health(&args.mountpoint, args.timeout) {
            Ok(verdict) => {
                println!("healthy: {verdict}");
                ExitCode::SUCCESS
            }
            Err(reason) => {
                println!("unhealthy: {reason}");
                ExitCode::FAILURE
            }
        },
        Command::Status(args) => match service::query_status(&args.mountpoint, args.timeout) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(reason) => fail(reason),
        },
    }
}

/// Run as `/sbin/mount.fuse.bucketfs SPEC DIR -o OPTIONS` (mount(8), fstab).
fn run_helper() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let invocation = match helper::parse(&argv) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if let Some(path) = &invocation.env_file {
        let vars = match helper::read_env_file(path) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        for (key, value) in vars {
            // SAFETY: still single-threaded: nothing else reads or writes the environment yet.
            unsafe { std::env::set_var(key, value) };
        }
    }
    if invocation.verbose {
        let shown: Vec<String> = invocation
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        eprintln!("bucketfs: running: bucketfs {}", shown.join(" "));
    }
    let mut full = vec![OsString::from("bucketfs")];
    full.extend(invocation.args.iter().cloned());
    let cli = match Cli::try_parse_from(&full) {
        Ok(c) => c,
        Err(e) => return fail(format!("mount options: {}", first_line(&e.to_string()))),
    };
    let Command::Mount(args) = cli.command else {
        return fail("mount options: not a mount command");
    };
    if invocation.fake {
        // -f: check the options, mount nothing.
        return match Config::from_args(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    run_mount(*args, invocation.args)
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("bucketfs: error: {message}");
    ExitCode::FAILURE
}

/// Mount with `args`; `child_args` is the same command line (without the program name), which
/// `--daemon` hands to the detached child.
fn run_mount(args: MountArgs, child_args: Vec<OsString>) -> ExitCode {
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    init_logging(&config.log_level, config.log_format);
    if config.daemon && std::env::var_os(DAEMON_CHILD_ENV).is_none() {
        return detach(child_args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(serve(config)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(e),
    }
}

async fn serve(mut config: Config) -> Result<bool, StartError> {
    let signals = mount::StopSignals::catch();
    mount::check_mountpoint(&config.mountpoint)?;
    // The metrics port is bound first: a taken port fails the start, not the running mount.
    let metrics = match config.metrics_addr {
        Some(addr) => {
            let listener = metrics::bind(addr).await.map_err(StartError)?;
            Some((listener, metrics::install().map_err(StartError)?))
        }
        None => None,
    };
    let store = mount::open_store(&config).await?;
    config.fs.conditional_writes = mount::conditional_writes(&config, store.as_ref()).await;
    let mounted = mount::mount(&config, store.clone(), tokio::runtime::Handle::current())?;
    let health = metrics::Health::new(config.mountpoint.clone());
    let observers = metrics.map(|(listener, handle)| {
        let exporter = Arc::new(metrics::Exporter {
            handle,
            fs: mounted.fs.clone(),
            health: health.clone(),
        });
        [
            metrics::spawn_server(listener, exporter),
            health.spawn_s3_probe(store),
        ]
    });
    // READY only once the kernel routes requests to us and the root answers; a mount that
    // never answers is taken down again and the start fails (nothing was written through it).
    if !service::wait_until_answers(&config.mountpoint, MOUNT_ANSWER_TIMEOUT).await {
        mounted.shutdown(config.drain_timeout).await;
        for task in observers.into_iter().flatten() {
            task.abort();
        }
        return Err(StartError(format!(
            "the new mount at {} did not answer within {}s",
            config.mountpoint.display(),
            MOUNT_ANSWER_TIMEOUT.as_secs()
        )));
    }
    service::ready(&config.source.url(), &config.mountpoint);
    if std::env::var_os(DAEMON_CHILD_ENV).is_some() {
        announce_ready();
    }
    health.set_serving(true);
    let reporter = service::spawn_status_reporter(mounted.fs.clone(), "serving: ");
    mounted.wait(signals).await;
    health.set_serving(false);
    reporter.abort();
    // /metrics keeps answering during the drain (its progress is worth watching).
    let synced = mounted.shutdown(config.drain_timeout).await;
    for task in observers.into_iter().flatten() {
        task.abort();
    }
    Ok(synced)
}

/// In the detached child: once the mount answers, tell the parent and let go of its pipe.
fn announce_ready() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY_LINE}");
    let _ = out.flush();
    // Point stdout at /dev/null so the parent sees EOF and nothing blocks on a closed pipe.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 with a valid open descriptor; no Rust object owns fd 1's state.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// `--daemon`: run the same command as a detached child and return once it reports the mount
/// live (exit 0), or with its failure.
fn detach(child_args: Vec<OsString>) -> ExitCode {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find own executable: {e}")),
    };
    let mut child = match std::process::Command::new(exe)
        .args(child_args)
        .env(DAEMON_CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    let ready = child.stdout.take().is_some_and(|out| {
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == READY_LINE)
    });
    if ready {
        return ExitCode::SUCCESS;
    }
    // The child failed before the mount was live; its stderr already holds the reason.
    match child.wait() {
        Ok(status) if status.success() => fail("the daemon exited before the mount was live"),
        Ok(_) => ExitCode::FAILURE,
        Err(e) => fail(format!("waiting for the daemon: {e}")),
    }
}

/// Logs go to stderr (journald under systemd, `docker logs` in a container): plain text
/// with colours only on a terminal, or one JSON object per line.
fn init_logging(level: &str, format: LogFormat) {
    // fuser warns "Unmount failed: Invalid argument" after every outside `umount` (it unmounts
    // again what is already gone): quiet unless the filter asks for fuser explicitly.
    let directives = if level.contains("fuser") {
        level.to_string()
    } else {
        format!("{level},fuser::mnt=error")
    };
    let filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}
