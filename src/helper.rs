//! The mount(8) helper: `/sbin/mount.fuse.bucketfs` (a symlink to the `bucketfs` binary), so
//! that an fstab line such as
//!
//! ```text
//! s3://bucket/prefix  /mnt/x  fuse.bucketfs  _netdev,allow_other,cache_dir=/var/cache/bucketfs,env_file=/etc/bucketfs/x.env  0 0
//! ```
//!
//! works with `mount /mnt/x`.
//!
//! Design: util-linux runs `/sbin/mount.<type> SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`
//! for a filesystem of type `<type>` (here `fuse.bucketfs`). This module turns that into the
//! ordinary command line, `bucketfs mount SPEC DIR --daemon --flag value…`, so the helper has no
//! options of its own to drift from the CLI: an option `name=value` is the flag `--name value`
//! with `_` read as `-` (`cache_dir=…` is `--cache-dir …`), a bare `name` is the switch
//! `--name`, and the list of valid names is read from the clap definition itself. `ro` is
//! `--read-only`; the options mount(8) and systemd use for themselves (`_netdev`, `nofail`,
//! `noauto`, `x-systemd.*`, `defaults`, `rw`, …) are accepted and ignored.
//!
//! Secrets never travel in mount options (fstab is world-readable): the one helper-only option,
//! `env_file=PATH`, names a `KEY=VALUE` file (the systemd env file works as is) whose variables
//! are set before the command line is read, exactly as if they were in the environment; an
//! option whose name looks like a credential is refused.
//!
//! The helper always detaches (`--daemon`): mount(8) expects it to return once the mount is
//! live, with the daemon left running.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::CommandFactory;

use crate::cli::Cli;

/// The names the binary answers to as a mount helper.
pub const HELPER_NAMES: [&str; 2] = ["mount.fuse.bucketfs", "mount.bucketfs"];

/// Whether `argv0` names the helper.
pub fn is_helper(argv0: &std::ffi::OsStr) -> bool {
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    HELPER_NAMES.contains(&name)
}

/// What mount(8) asked for, as the ordinary command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `mount SPEC DIR --daemon …` (without the program name).
    pub args: Vec<OsString>,
    /// `env_file=`: variables to set before parsing `args`.
    pub env_file: Option<PathBuf>,
    /// `-f`: check everything, mount nothing.
    pub fake: bool,
    /// `-v`: say what is run.
    pub verbose: bool,
}

/// Options mount(8), systemd or fstab conventions use for themselves: accepted, ignored.
/// (`nosuid`, `nodev` and `noatime` are what bucketfs always mounts with anyway.)
const IGNORED: &[&str] = &[
    "defaults",
    "rw",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "nolazytime",
    "async",
    "sync",
    "dirsync",
    "loud",
    "silent",
];

/// Parse the helper's arguments (after the program name).
pub fn parse(argv: &[OsString]) -> Result<Invocation, String> {
    let mut positional: Vec<OsString> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut fake, mut verbose, mut sloppy) = (false, false, false);
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "-o" => {
                let value = it.next().ok_or("-o needs an option list")?;
                options.extend(split_options(&value.to_string_lossy()));
            }
            "-t" => {
                it.next().ok_or("-t needs a type")?;
            }
            "-N" => return Err("-N (another mount namespace) is not supported".into()),
            flags if flags.starts_with("-o") && flags.len() > 2 => {
                options.extend(split_options(&flags[2..]));
            }
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for c in flags[1..].chars() {
                    match c {
                        'f' => fake = true,
                        'v' => verbose = true,
                        's' => sloppy = true,
                        // -n: do not write /etc/mtab (there is none to write).
                        'n' => {}
                        other => return Err(format!("unknown helper flag -{other}")),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [spec, dir] = <[OsString; 2]>::try_from(positional)
        .map_err(|p| format!("expected SOURCE and MOUNTPOINT, got {} arguments", p.len()))?;

    let flags = mount_flags();
    let mut args: Vec<OsString> = vec!["mount".into(), spec, dir, "--daemon".into()];
    let mut env_file = None;
    for option in options {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (option.clone(), None),
        };
        if looks_secret(&name) {
            return Err(format!(
                "option {name:?} looks like a credential: secrets go in the env_file=, never in mount options (fstab is world-readable)"
            ));
        }
        if name == "env_file" {
            env_file = Some(PathBuf::from(value.ok_or("env_file needs a path")?));
            continue;
        }
        if name == "ro" {
            args.push("--read-only".into());
            continue;
        }
        if IGNORED.contains(&name.as_str()) || name.starts_with("x-") || name == "comment" {
            continue;
        }
        let long = name.replace('_', "-");
        match (flags.iter().find(|f| f.name == long), value) {
            // Always on: mount(8) waits for the helper to return.
            (Some(f), _) if f.name == "daemon" => {}
            (Some(f), Some(v)) if f.takes_value => {
                args.push(format!("--{long}").into());
                args.push(v.into());
            }
            (Some(f), None) if f.takes_value => {
                return Err(format!("option {name} needs a value ({name}=…)"));
            }
            (Some(_), None) => args.push(format!("--{long}").into()),
            (Some(_), Some(v)) => match v.as_str() {
                "true" | "yes" | "on" | "1" => args.push(format!("--{long}").into()),
                "false" | "no" | "off" | "0" => {}
                _ => return Err(format!("option {name} is a switch: {name} or {name}=false")),
            },
            (None, _) if sloppy => {}
            (None, _) => {
                return Err(format!(
                    "unknown option {name:?} (options are the `bucketfs mount` flags with _ for -; see docs/CONFIGURATION.md)"
                ));
            }
        }
    }
    Ok(Invocation {
        args,
        env_file,
        fake,
        verbose,
    })
}

/// Split `a,b=c,d` on commas (a value cannot contain one: mount(8) has no quoting either).
fn split_options(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "secret",
        "password",
        "passwd",
        "access_key",
        "token",
        "credential",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// One `bucketfs mount` flag, as the helper sees it.
struct Flag {
    name: String,
    takes_value: bool,
}

/// The long flags of `bucketfs mount`, read from the clap definition.
fn mount_flags() -> Vec<Flag> {
    let cli = Cli::command();
    let Some(mount) = cli.find_subcommand("mount") else {
        return Vec::new();
    };
    mount
        .get_arguments()
        .filter_map(|a| {
            Some(Flag {
                name: a.get_long()?.to_string(),
                takes_value: a.get_action().takes_values(),
            })
        })
        .collect()
}

/// Read a `KEY=VALUE` file (`#` comments, blank lines, optional `export `, optional single or
/// double quotes around the value): the format of a systemd `EnvironmentFile` and of a
/// docker-compose `.env` without interpolation.
pub fn read_env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("env_file {}: {e}", path.display()))?;
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "env_file {} line {}: expected KEY=VALUE",
                path.display(),
                n + 1
            ));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "env_file {} line {}: {key:?} is not a variable name",
                path.display(),
                n + 1
            ));
        }
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| value.strip_prefix(*a)?.strip_suffix(*b))
            .unwrap_or(value);
        vars.push((key.to_string(), value.to_string()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn strings(i: &Invocation) -> Vec<String> {
        i.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn names() {
        assert!(is_helper("/sbin/mount.fuse.bucketfs".as_ref()));
        assert!(is_helper("mount.bucketfs".as_ref()));
        assert!(!is_helper("/usr/local/bin/bucketfs".as_ref()));
    }

    #[test]
    fn options_map_onto_flags() {
        let i = parse(&os(&[
            "s3://b/owui",
            "/mnt/x",
            "-o",
            "rw,_netdev,nofail,allow_other,cache_dir=/var/cache/bucketfs,metadata_ttl=5s,x-systemd.automount,ro,uid=33",
            "-n",
        ]))
        .unwrap();
        assert_eq!(
            strings(&i),
            [
                "mount",
                "s3://b/owui",
                "/mnt/x",
                "--daemon",
                "--allow-other",
                "--cache-dir",
                "/var/cache/bucketfs",
                "--metadata-ttl",
                "5s",
                "--read-only",
                "--uid",
                "33"
            ]
        );
        assert!(!i.fake && i.env_file.is_none());
    }

    #[test]
    fn flags_env_file_and_refusals() {
        let i = parse(&os(&[
            "s3://b",
            "/m",
            "-fv",
            "-oenv_file=/etc/bucketfs/x.env,allow_other=false",
            "-t",
            "fuse.bucketfs",
        ]))
        .unwrap();
        assert!(i.fake && i.verbose);
        assert_eq!(i.env_file, Some(PathBuf::from("/etc/bucketfs/x.env")));
        assert_eq!(strings(&i), ["mount", "s3://b", "/m", "--daemon"]);

        let e = parse(&os(&["s3://b", "/m", "-o", "secret_access_key=abc"])).unwrap_err();
        assert!(e.contains("env_file") && !e.contains("abc"), "{e}");
        assert!(parse(&os(&["s3://b", "/m", "-o", "frobnicate"])).is_err());
        assert!(parse(&os(&["s3://b", "/m", "-s", "-o", "frobnicate"])).is_ok());
        assert!(parse(&os(&["s3://b", "/m", "-o", "cache_dir"])).is_err());
        assert!(parse(&os(&["s3://b"])).is_err());
    }

    #[test]
    fn env_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.env");
        std::fs::write(
            &path,
            "# comment\n\nS3_BUCKET_NAME=b\nexport S3_KEY_PREFIX=\"owui\"\nX='a b'\n",
        )
        .unwrap();
        assert_eq!(
            read_env_file(&path).unwrap(),
            [
                ("S3_BUCKET_NAME".to_string(), "b".to_string()),
                ("S3_KEY_PREFIX".to_string(), "owui".to_string()),
                ("X".to_string(), "a b".to_string()),
            ]
        );
        std::fs::write(&path, "not a line\n").unwrap();
        assert!(read_env_file(&path).is_err());
    }
}
