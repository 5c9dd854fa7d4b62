//! Command-line interface: clap definitions only.
//!
//! Every flag that has an Open WebUI (`S3_*`) or bucketfs (`BUCKETFS_*`) environment name reads
//! it; a flag on the command line wins over the environment. Secrets are read from the
//! environment only (never flags: argv is visible to every user in `ps`). `config.rs` turns the
//! parsed arguments into one validated `Config`.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::store::AddressingStyle;

#[derive(Debug, Parser)]
#[command(
    name = "bucketfs",
    version,
    about = "Mount an S3 bucket (or a local directory store) as a POSIX filesystem",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount SOURCE at MOUNTPOINT and serve it until unmounted or signalled.
    Mount(Box<MountArgs>),
    /// Exit 0 if the bucketfs mount at MOUNTPOINT answers, 1 otherwise (container healthcheck).
    Health(ProbeArgs),
    /// Print what the daemon serving MOUNTPOINT has not uploaded yet: dirty, uploading and
    /// failing files (with the last error) and the cache use; for a file inside the mount,
    /// its own state.
    Status(ProbeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// The mount point (for `status`, also a file or directory inside the mount).
    #[arg(value_name = "MOUNTPOINT", env = "BUCKETFS_MOUNTPOINT", default_value = crate::config::DEFAULT_MOUNTPOINT)]
    pub mountpoint: PathBuf,

    /// How long the mount may take to answer.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "\
SOURCE is s3://BUCKET[/PREFIX] or file:///PATH (a local directory used as a bucket). Without it, \
the bucket and prefix come from S3_BUCKET_NAME and S3_KEY_PREFIX; with only one positional \
argument that is not a URL, it is the mount point.

Credentials come from S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY when both are set, otherwise from \
the standard AWS chain (AWS_ACCESS_KEY_ID, profiles, web identity, instance metadata).

See docs/CONFIGURATION.md for every flag and variable.")]
pub struct MountArgs {
    /// s3://BUCKET[/PREFIX] or file:///PATH
    #[arg(value_name = "SOURCE")]
    pub source: Option<String>,

    /// Where to mount.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: Option<PathBuf>,

    #[command(flatten)]
    pub s3: S3Args,

    #[command(flatten)]
    pub mount: MountOptions,

    #[command(flatten)]
    pub cache: CacheArgs,

    #[command(flatten)]
    pub logging: LogArgs,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "S3 connection")]
pub struct S3Args {
    /// Bucket name, when SOURCE is not given.
    #[arg(long, env = "S3_BUCKET_NAME", value_name = "NAME")]
    pub bucket: Option<String>,

    /// Key prefix inside the bucket, when SOURCE is not given ("owui" and "owui/" both put a
    /// file NAME at key owui/NAME, as Open WebUI's own S3 provider does).
    #[arg(long, env = "S3_KEY_PREFIX", value_name = "PREFIX")]
    pub key_prefix: Option<String>,

    /// S3 endpoint URL (MinIO, SeaweedFS, Ceph, R2…); AWS when unset. Also AWS_ENDPOINT_URL.
    #[arg(long, env = "S3_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// Region; us-east-1 when nothing sets one. Also AWS_REGION.
    #[arg(long, env = "S3_REGION_NAME", value_name = "REGION")]
    pub region: Option<String>,

    /// Path-style (http://host/bucket/key) or virtual-host (http://bucket.host/key) requests;
    /// auto is path-style with a custom endpoint and virtual-host on AWS.
    #[arg(long, env = "S3_ADDRESSING_STYLE", value_enum, default_value_t = AddressingStyle::Auto)]
    pub addressing_style: AddressingStyle,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Mount")]
pub struct MountOptions {
    /// Let users other than the mounting one (e.g. another container) use the mount.
    #[arg(long, env = "BUCKETFS_ALLOW_OTHER", value_parser = BoolishValueParser::new())]
    pub allow_other: bool,

    /// Owner of every file and directory [default: the mounting user].
    #[arg(long, env = "BUCKETFS_UID")]
    pub uid: Option<u32>,

    /// Group of every file and directory [default: the mounting user's group].
    #[arg(long, env = "BUCKETFS_GID")]
    pub gid: Option<u32>,

    /// Permission bits of files, in octal.
    #[arg(long, env = "BUCKETFS_FILE_MODE", default_value = "0644", value_parser = parse_mode)]
    pub file_mode: u16,

    /// Permission bits of directories, in octal.
    #[arg(long, env = "BUCKETFS_DIR_MODE", default_value = "0755", value_parser = parse_mode)]
    pub dir_mode: u16,

    /// Refuse every change (EROFS).
    #[arg(long, env = "BUCKETFS_READ_ONLY", value_parser = BoolishValueParser::new())]
    pub read_only: bool,

    /// How long file attributes, directory entries and missing names are trusted before S3 is
    /// asked again (e.g. 1s, 500ms, 1m); changes made through this mount show at once, other
    /// clients' within the TTL. `indefinite` for a bucket no one else writes.
    #[arg(long, env = "BUCKETFS_METADATA_TTL", default_value = "1s", value_parser = parse_ttl)]
    pub metadata_ttl: Duration,

    /// Guard against lost updates with S3 conditional writes (If-None-Match / If-Match): a file
    /// another client changed meanwhile is kept under NAME.conflict-<time> instead of
    /// overwriting theirs. `auto` probes the server once at mount.
    #[arg(long, env = "BUCKETFS_CONDITIONAL_WRITES", value_enum, default_value_t = ConditionalWrites::Auto)]
    pub conditional_writes: ConditionalWrites,

    /// Largest directory `rename` moves, in objects at any depth (each is copied then deleted,
    /// so the move is not atomic). Above it rename fails with EXDEV, and `mv` falls back to
    /// copying the files one by one.
    #[arg(long, env = "BUCKETFS_MAX_RENAME_OBJECTS", default_value_t = 10_000)]
    pub max_rename_objects: usize,

    /// Take directory listings' word for attributes: `ls -l` of a large directory then costs
    /// only its LIST requests, instead of one HEAD per entry to read the mode, owner and mtime
    /// stored by chmod/chown/touch (x-amz-meta-*). Entries show the default mode and owner and
    /// LastModified until a later lookup reads their metadata. For buckets whose objects carry
    /// no such metadata (Open WebUI's uploads, objects written by other S3 tools).
    #[arg(long, env = "BUCKETFS_LISTING_ATTRIBUTES", value_parser = BoolishValueParser::new())]
    pub listing_attributes: bool,

    /// Detach: return once the mount is live (exit 0), or fail with the reason.
    #[arg(long, short = 'd')]
    pub daemon: bool,
}

/// `--conditional-writes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConditionalWrites {
    /// Probe the server at mount (a scratch object is created twice, then deleted).
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cache and uploads")]
pub struct CacheArgs {
    /// Directory for the local cache (one subdirectory per mount).
    #[arg(
        long,
        env = "BUCKETFS_CACHE_DIR",
        default_value = "/var/cache/bucketfs"
    )]
    pub cache_dir: PathBuf,

    /// Part size of multipart uploads (e.g. 8MiB). Files at least this big are uploaded in
    /// parts; 8 MiB matches boto3 and Open WebUI's own provider, so ETags agree.
    #[arg(long, env = "BUCKETFS_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Parts of one multipart upload sent in parallel.
    #[arg(long, env = "BUCKETFS_UPLOAD_CONCURRENCY", default_value_t = 4)]
    pub upload_concurrency: usize,

    /// Quiet time after a file is closed before it is uploaded; rewrites within it coalesce
    /// into one upload. fsync, sync and unmount do not wait for it.
    #[arg(long, env = "BUCKETFS_WRITEBACK_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub writeback_delay: Duration,

    /// Files uploaded at once.
    #[arg(long, env = "BUCKETFS_MAX_UPLOADS", default_value_t = 8)]
    pub max_uploads: usize,

    /// Byte budget of the cache, dirty and clean data together (e.g. 10GiB). Clean files are
    /// evicted least-recently-used; when dirty data fills it, writers wait for uploads.
    #[arg(long, env = "BUCKETFS_CACHE_SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// How long a writer waits for uploads to free cache space before getting ENOSPC.
    #[arg(long, env = "BUCKETFS_CACHE_FULL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub cache_full_timeout: Duration,

    /// On SIGTERM/SIGINT/unmount, how long to wait for pending uploads before exiting non-zero
    /// (the journal keeps what is left for the next start).
    #[arg(long, env = "BUCKETFS_DRAIN_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// "bucketfs=debug".
    #[arg(long, env = "BUCKETFS_LOG", default_value = "info")]
    pub log_level: String,

    /// Log line format: `text` (colours only on a terminal; journald gets plain lines) or
    /// `json` (one object per line, for log shippers).
    #[arg(long, env = "BUCKETFS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics at http://ADDR/metrics and a health check at /healthz
    /// (200 while the mount answers and S3 is reachable, else 503), e.g. 127.0.0.1:9464.
    /// Off by default.
    #[arg(long, env = "BUCKETFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parse an octal permission mode such as `0644` or `755`.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u16::from_str_radix(digits, 8).map_err(|_| format!("{s:?} is not an octal mode"))?;
    if mode > 0o7777 {
        return Err(format!("{s:?} has bits beyond 07777"));
    }
    Ok(mode)
}

/// Parse a byte size: a number with an optional unit (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`: all
/// binary) — `8MiB`, `8M`, `8388608`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    number
        .checked_shl(shift)
        .filter(|v| v >> shift == number)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse a duration such as `1s`, `500ms` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// What `--metadata-ttl indefinite` stands for: a century, far beyond any mount's life, yet
/// small enough that adding it to an `Instant` or a kernel timeout cannot overflow.
pub const INDEFINITE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parse a cache TTL: a duration, or `indefinite`.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "indefinite" => Ok(INDEFINITE_TTL),
        other => parse_duration(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("5 GiB"), Ok(5 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("8 parsecs").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_ttl("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_ttl("indefinite"), Ok(INDEFINITE_TTL));
        assert!(parse_ttl("forever").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("17777").is_err());
    }
}
