//! One validated configuration, built from the parsed command line and the environment.
//!
//! `Config::from_args` is the only place that reads environment variables that clap does not
//! (the credential pair and the `AWS_*` fallbacks), so tests can build a `Config` by hand.

use std::path::{Path, PathBuf};

use std::time::Duration;

use crate::cache::CacheLimits;
use crate::cli::{ConditionalWrites, MountArgs};
use crate::fs::FsConfig;
use crate::store::{AddressingStyle, S3Config};

/// Open WebUI's container keeps uploads here; the mount replaces that directory.
pub const DEFAULT_MOUNTPOINT: &str = "/app/backend/data/uploads";

/// What is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bucket; `prefix` is empty or ends with `/`.
    S3 { bucket: String, prefix: String },
    /// A local directory used as a bucket (the embedded default).
    Dir { path: PathBuf },
}

impl Source {
    /// Parse `s3://BUCKET[/PREFIX]` or `file:///PATH`.
    pub fn parse(url: &str) -> Result<Source, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "{url:?}: no bucket name (expected s3://BUCKET[/PREFIX])"
                ));
            }
            Ok(Source::S3 {
                bucket: bucket.to_string(),
                prefix: normalize_prefix(prefix),
            })
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!("{url:?}: expected an absolute path, file:///PATH"));
            }
            Ok(Source::Dir {
                path: PathBuf::from(path),
            })
        } else {
            Err(format!(
                "{url:?}: expected s3://BUCKET[/PREFIX] or file:///PATH"
            ))
        }
    }

    /// The key prefix every file's key starts with.
    pub fn prefix(&self) -> &str {
        match self {
            Source::S3 { prefix, .. } => prefix,
            Source::Dir { .. } => "",
        }
    }

    pub fn url(&self) -> String {
        match self {
            Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Source::Dir { path } => format!("file://{}", path.display()),
        }
    }
}

/// The key prefix as Open WebUI's provider applies it (`os.path.join(prefix, name)`): `owui` and
/// `owui/` both give `owui/NAME`, `a/b` gives `a/b/NAME`, nothing gives `NAME`.
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

/// S3 connection settings other than the bucket. `Debug` shows whether credentials are set,
/// never their values.
#[derive(Clone, Default)]
pub struct S3Settings {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub addressing_style: AddressingStyle,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Settings")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("addressing_style", &self.addressing_style)
            .field("access_key_id", &redacted(&self.access_key_id))
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .finish()
    }
}

impl S3Settings {
    pub fn store_config(&self, bucket: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            addressing_style: self.addressing_style,
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub mountpoint: PathBuf,
    pub s3: S3Settings,
    /// Root of the cache; this mount uses `cache_root/<mount id>`.
    pub cache_root: PathBuf,
    pub allow_other: bool,
    pub daemon: bool,
    /// How long shutdown waits for pending uploads.
    pub drain_timeout: Duration,
    pub log_level: String,
    pub log_format: crate::cli::LogFormat,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--conditional-writes`; `fs.conditional_writes` holds the outcome once settled.
    pub conditional_writes: ConditionalWrites,
    pub fs: FsConfig,
}

impl Config {
    /// Resolve parsed flags plus the environment into a `Config`.
    pub fn from_args(args: &MountArgs) -> Result<Config, String> {
        Self::resolve(args, |name| {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        })
    }

    /// As `from_args`, with the environment given as a lookup function (for tests).
    pub fn resolve(
        args: &MountArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let (source, mountpoint) = match (&args.source, &args.mountpoint) {
            (Some(s), mp) if s.contains("://") => (Source::parse(s)?, mp.clone()),
            // One positional argument that is not a URL: it is the mount point.
            (Some(s), None) => (Self::source_from_env(args)?, Some(PathBuf::from(s))),
            (Some(s), Some(_)) => return Err(Source::parse(s).unwrap_err()),
            (None, mp) => (Self::source_from_env(args)?, mp.clone()),
        };
        let mountpoint = mountpoint
            .or_else(|| env("BUCKETFS_MOUNTPOINT").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNTPOINT));
        let s3 = S3Settings {
            endpoint_url: args
                .s3
                .endpoint_url
                .clone()
                .or_else(|| env("AWS_ENDPOINT_URL")),
            region: args.s3.region.clone().or_else(|| env("AWS_REGION")),
            addressing_style: args.s3.addressing_style,
            access_key_id: env("S3_ACCESS_KEY_ID"),
            secret_access_key: env("S3_SECRET_ACCESS_KEY"),
        };
        if args.cache.part_size < crate::store::MIN_PART_SIZE {
            return Err(format!(
                "--part-size must be at least 5MiB (S3's smallest part), got {}",
                args.cache.part_size
            ));
        }
        let process_uid = unsafe { libc::geteuid() };
        let process_gid = unsafe { libc::getegid() };
        let fs = FsConfig {
            uid: args.mount.uid.unwrap_or(process_uid),
            gid: args.mount.gid.unwrap_or(process_gid),
            file_mode: args.mount.file_mode,
            dir_mode: args.mount.dir_mode,
            read_only: args.mount.read_only,
            metadata_ttl: args.mount.metadata_ttl,
            // `auto` is settled by a probe at mount (`mount::open_store`); until then, on.
            conditional_writes: args.mount.conditional_writes != ConditionalWrites::Off,
            part_size: args.cache.part_size,
            upload_concurrency: args.cache.upload_concurrency.max(1),
            writeback_delay: args.cache.writeback_delay,
            max_uploads: args.cache.max_uploads.max(1),
            max_rename_objects: args.mount.max_rename_objects,
            listing_attributes: args.mount.listing_attributes,
            cache_dir: PathBuf::new(), // set below, once the mount id is known
            cache_limits: CacheLimits {
                max_bytes: args.cache.cache_size,
                full_timeout: args.cache.cache_full_timeout,
                ..CacheLimits::default()
            },
        };
        let mut config = Config {
            source,
            mountpoint,
            s3,
            cache_root: args.cache.cache_dir.clone(),
            allow_other: args.mount.allow_other,
            daemon: args.mount.daemon,
            drain_timeout: args.cache.drain_timeout,
            log_level: args.logging.log_level.clone(),
            log_format: args.logging.log_format,
            metrics_addr: args.logging.metrics_addr,
            conditional_writes: args.mount.conditional_writes,
            fs,
        };
        config.fs.cache_dir = config.cache_root.join(config.mount_id());
        Ok(config)
    }

    fn source_from_env(args: &MountArgs) -> Result<Source, String> {
        match &args.s3.bucket {
            Some(bucket) => Ok(Source::S3 {
                bucket: bucket.clone(),
                prefix: normalize_prefix(args.s3.key_prefix.as_deref().unwrap_or("")),
            }),
            None => Err("no SOURCE given and S3_BUCKET_NAME is not set \
                 (use s3://BUCKET[/PREFIX], file:///PATH, or set S3_BUCKET_NAME)"
                .to_string()),
        }
    }

    /// A stable name for this mount's cache subdirectory: the same source and endpoint always
    /// find the same cache (which is what lets a restarted daemon resume its uploads).
    pub fn mount_id(&self) -> String {
        let identity = format!(
            "{}\n{}",
            self.source.url(),
            self.s3.endpoint_url.as_deref().unwrap_or("")
        );
        let name: String = match &self.source {
            Source::S3 { bucket, .. } => bucket.clone(),
            Source::Dir { path } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
        format!(
            "{name}-{}",
            &crate::store::md5_hex(identity.as_bytes())[..12]
        )
    }

    pub fn cache_dir(&self) -> &Path {
        &self.fs.cache_dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let mut full = vec!["bucketfs", "mount"];
        full.extend_from_slice(argv);
        let Command::Mount(args) = Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .command
        else {
            unreachable!("a mount command line")
        };
        Config::resolve(&args, |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    /// The Open WebUI provider's `os.path.join(S3_KEY_PREFIX or "", name)`, as a table.
    #[test]
    fn prefix_matches_open_webui() {
        for (prefix, name, key) in [
            ("owui", "f.txt", "owui/f.txt"),
            ("owui/", "f.txt", "owui/f.txt"),
            ("a/b", "f.txt", "a/b/f.txt"),
            ("", "f.txt", "f.txt"),
            ("owui", "a b#%+&?ü漢.pdf", "owui/a b#%+&?ü漢.pdf"),
        ] {
            assert_eq!(
                format!("{}{name}", normalize_prefix(prefix)),
                key,
                "prefix {prefix:?}"
            );
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            Source::parse("s3://b/owui").unwrap(),
            Source::S3 {
                bucket: "b".into(),
                prefix: "owui/".into()
            }
        );
        assert_eq!(
            Source::parse("s3://b").unwrap(),
            Source::S3 {
                bucket: "b".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Source::parse("file:///var/lib/x").unwrap(),
            Source::Dir {
                path: "/var/lib/x".into()
            }
        );
        assert!(Source::parse("s3://").is_err());
        assert!(Source::parse("file://relative").is_err());
        assert!(Source::parse("/just/a/path").is_err());
    }

    #[test]
    fn source_and_mountpoint_from_positionals_and_env() {
        let c = parse(&["s3://b/p", "/mnt/x"], &[]).unwrap();
        assert_eq!(
            c.source,
            Source::S3 {
                bucket: "b".into(),
                prefix: "p/".into()
            }
        );
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/x"));

        // Only a mount point: the bucket comes from S3_BUCKET_NAME (clap reads it).
        let Command::Mount(mut args) = Cli::try_parse_from(["bucketfs", "mount", "/mnt/y"])
            .unwrap()
            .command
        else {
            unreachable!()
        };
        args.s3.bucket = Some("envbucket".into());
        args.s3.key_prefix = Some("owui".into());
        let c = Config::resolve(&args, |_| None).unwrap();
        assert_eq!(
            c.source,
            Source::S3 {
                bucket: "envbucket".into(),
                prefix: "owui/".into()
            }
        );
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/y"));
        // BUCKETFS_MOUNTPOINT (the systemd env file's way) when no positional names one.
        let c = Config::resolve(&args, |k| {
            (k == "BUCKETFS_MOUNTPOINT").then(|| "/mnt/env".to_string())
        })
        .unwrap();
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/y"));
        let Command::Mount(mut args) = Cli::try_parse_from(["bucketfs", "mount"]).unwrap().command
        else {
            unreachable!()
        };
        args.s3.bucket = Some("envbucket".into());
        let c = Config::resolve(&args, |k| {
            (k == "BUCKETFS_MOUNTPOINT").then(|| "/mnt/env".to_string())
        })
        .unwrap();
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/env"));

        let Command::Mount(args) = Cli::try_parse_from(["bucketfs", "mount"]).unwrap().command
        else {
            unreachable!()
        };
        if args.s3.bucket.is_none() {
            let c = Config::resolve(&args, |_| None);
            assert!(c.unwrap_err().contains("S3_BUCKET_NAME"));
        }
    }

    #[test]
    fn credentials_and_fallbacks_come_from_env() {
        let c = parse(
            &["s3://b", "/m"],
            &[
                ("S3_ACCESS_KEY_ID", "AK"),
                ("S3_SECRET_ACCESS_KEY", "SK"),
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
                ("AWS_REGION", "eu-west-1"),
            ],
        )
        .unwrap();
        assert_eq!(c.s3.access_key_id.as_deref(), Some("AK"));
        assert_eq!(c.s3.secret_access_key.as_deref(), Some("SK"));
        assert_eq!(c.s3.region.as_deref(), Some("eu-west-1"));
        let c = parse(
            &["s3://b", "/m", "--endpoint-url", "http://h:1"],
            &[("AWS_ENDPOINT_URL", "http://x")],
        )
        .unwrap();
        assert_eq!(c.s3.endpoint_url.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn mount_id_is_stable_and_distinct() {
        let a = parse(&["s3://b/p", "/m"], &[]).unwrap();
        let b = parse(&["s3://b/p", "/other"], &[]).unwrap();
        let c = parse(&["s3://b/q", "/m"], &[]).unwrap();
        assert_eq!(a.mount_id(), b.mount_id());
        assert_ne!(a.mount_id(), c.mount_id());
        assert!(a.cache_dir().starts_with("/var/cache/bucketfs"));
    }

    #[test]
    fn part_size_below_s3_minimum_is_refused() {
        assert!(
            parse(&["s3://b", "/m", "--part-size", "1MiB"], &[])
                .unwrap_err()
                .contains("5MiB")
        );
    }
}
