//! The Unix tools acceptance tests: through a real mount of a real S3 server, `cp -a`,
//! `rsync -a`, `tar x`, `git clone`, a SQLite database `mv`'d in, and Python's `shutil.copy2`
//! succeed, and the bucket then holds exactly what a local directory would hold: the same names,
//! kinds, bytes, mode bits, owners, mtimes (to the nanosecond) and symlink targets. Each tree is
//! compared through the mount, then through a fresh mount of the bucket (a new daemon with an
//! empty cache, so what is compared is what S3 persisted), and the raw SDK checks that the keys
//! are exactly the tree's: one object per file and symlink, one marker per directory, no stray
//! temporary or lock files.
//!
//! Each tool has its own test (and bucket), so a failure names the tool.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

both_servers!(
    cp_a_copies_the_tree_exactly,
    rsync_a_copies_the_tree_exactly,
    tar_x_extracts_the_tree_exactly,
    git_clone_into_the_mount_is_a_working_repository,
    sqlite3_database_moved_into_the_mount_reads_back,
    shutil_copy2_copies_the_tree_exactly,
);

/// The key prefix every test mounts.
const PREFIX: &str = "p";

// ---- the source tree ----------------------------------------------------------------------------

/// A realistic local tree at `root` (`<tempdir>/tree`): nested and empty directories, files of
/// 0 B, a few KiB and ~10 MiB (above the multipart threshold), names with spaces, unicode and
/// `#%+&`, symlinks (to a file, to a directory, dangling), modes 0755/0600/0700, a file owned by
/// another user, and an explicit mtime with nanoseconds on every entry.
struct Source {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn source_tree() -> Source {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    let file = |rel: &str, bytes: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    let chmod = |rel: &str, mode: u32| {
        std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap()
    };
    file("empty.txt", b"");
    file("small.txt", &data(3 * 1024 + 7, 1));
    file("big.bin", &data(10 * MIB + 12_345, 2));
    file("run.sh", b"#!/bin/sh\necho hello\n");
    chmod("run.sh", 0o755);
    file("private/secret.key", &data(64, 3));
    chmod("private/secret.key", 0o600);
    chmod("private", 0o700);
    file("owned.txt", b"owned by someone else\n");
    std::os::unix::fs::chown(root.join("owned.txt"), Some(1234), Some(5678)).unwrap();
    file("with space.txt", b"spaces\n");
    file("ünïcödé-漢字-😀.md", "# ünïcödé\n".as_bytes());
    file("100%+more&less #1.txt", b"odd characters\n");
    file("docs/a/b/c/deep.txt", &data(5000, 4));
    file("docs/notes (2).txt", b"notes\n");
    std::fs::create_dir(root.join("empty dir")).unwrap();
    symlink("small.txt", root.join("link to small")).unwrap();
    symlink("docs/a/b", root.join("docs-link")).unwrap();
    symlink("no/such/target", root.join("dangling")).unwrap();
    // Old, distinct mtimes with nanoseconds; directories last and deepest first, since every
    // entry made inside a directory changes its mtime.
    let mut entries: Vec<PathBuf> = walk(&root).into_keys().collect();
    entries.sort_by_key(|rel| std::cmp::Reverse(rel.components().count()));
    for (i, rel) in entries.iter().enumerate() {
        let when = 1_000_000_000 + 86_400 * i as i64;
        set_times(&at(&root, rel), when, 123_456_789 + i as i64);
    }
    Source { _dir: dir, root }
}

/// utimensat(2) without following a symlink: sets atime and mtime.
fn set_times(path: &Path, secs: i64, nanos: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs as _,
        tv_nsec: nanos as _,
    };
    // SAFETY: a valid C string and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

// ---- comparing trees ----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    Other(u32),
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
}

/// `root` itself for the empty relative path (a tree may be a single file).
fn at(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

/// Every entry under `root` (`root` itself as the empty path), symlinks not followed.
fn walk(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn visit(root: &Path, rel: PathBuf, out: &mut BTreeMap<PathBuf, Node>) {
        let path = at(root, &rel);
        let md = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let ft = md.file_type();
        let kind = if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()));
            Kind::Symlink(target)
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other(md.mode() & libc::S_IFMT)
        };
        if kind == Kind::Dir {
            let entries = std::fs::read_dir(&path)
                .unwrap_or_else(|e| panic!("readdir {}: {e}", path.display()));
            for entry in entries {
                let entry = entry.unwrap_or_else(|e| panic!("readdir {}: {e}", path.display()));
                visit(root, rel.join(entry.file_name()), out);
            }
        }
        let node = Node {
            kind,
            perm: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
        };
        out.insert(rel, node);
    }
    let mut out = BTreeMap::new();
    visit(root, PathBuf::new(), &mut out);
    out
}

/// What a comparison checks besides names, kinds, bytes, mode bits and symlink targets.
#[derive(Clone, Copy)]
struct Check {
    /// Modification times, to the nanosecond.
    mtime: bool,
    /// Owner and group.
    owner: bool,
    /// Files whose bytes legitimately differ (git's index records inode numbers).
    skip_bytes: &'static [&'static str],
    /// Directories' mode, owner and mtime (SeaweedFS keeps no metadata on `dir/` markers).
    dir_attrs: bool,
}

impl Check {
    /// This check as far as `server` can keep it: SeaweedFS stores no user metadata on a
    /// `dir/` key (docs/TESTING.md), so there directory attributes are not compared.
    fn on(self, server: Server) -> Check {
        Check {
            dir_attrs: self.dir_attrs && server != Server::SeaweedFs,
            ..self
        }
    }
}

/// Everything: what `cp -a`, `rsync -a` and `tar x` as root keep.
const EXACT: Check = Check {
    mtime: true,
    owner: true,
    skip_bytes: &[],
    dir_attrs: true,
};

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    }
}

fn show_time((secs, nanos): (i64, i64)) -> String {
    format!("{secs}.{nanos:09}")
}

/// How the bytes of two files differ, if they do.
fn bytes_differ(expected: &Path, actual: &Path) -> Option<String> {
    let want =
        std::fs::read(expected).unwrap_or_else(|e| panic!("read {}: {e}", expected.display()));
    let got = std::fs::read(actual).unwrap_or_else(|e| panic!("read {}: {e}", actual.display()));
    if want == got {
        return None;
    }
    let offset = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
    let mut why = format!(
        "{} bytes expected, {} found, first difference at offset {offset}",
        want.len(),
        got.len()
    );
    if let (Ok(w), Ok(g)) = (std::str::from_utf8(&want), std::str::from_utf8(&got))
        && want.len().max(got.len()) <= 64 * 1024
    {
        let line = w.lines().zip(g.lines()).position(|(a, b)| a != b);
        let line = line.unwrap_or(w.lines().count().min(g.lines().count()));
        let pick = |s: &str| s.lines().nth(line).unwrap_or("<end of file>").to_string();
        why += &format!(
            "; line {}: {:?} expected, {:?} found",
            line + 1,
            pick(w),
            pick(g)
        );
    }
    Some(why)
}

/// Asserts that the tree at `actual` is the tree at `expected`; on mismatch the panic lists every
/// difference, one line each.
fn assert_same_tree(expected: &Path, actual: &Path, check: Check, context: &str) {
    let want = walk(expected);
    let got = walk(actual);
    let mut diffs = Vec::new();
    for (rel, w) in &want {
        let name = show(rel);
        let Some(g) = got.get(rel) else {
            diffs.push(format!("missing  {name}"));
            continue;
        };
        if w.kind != g.kind {
            diffs.push(format!(
                "kind     {name}: {:?} expected, {:?} found",
                w.kind, g.kind
            ));
            continue;
        }
        let attrs = w.kind != Kind::Dir || check.dir_attrs;
        if attrs && w.perm != g.perm {
            diffs.push(format!(
                "mode     {name}: {:04o} expected, {:04o} found",
                w.perm, g.perm
            ));
        }
        if attrs && check.owner && (w.uid, w.gid) != (g.uid, g.gid) {
            diffs.push(format!(
                "owner    {name}: {}:{} expected, {}:{} found",
                w.uid, w.gid, g.uid, g.gid
            ));
        }
        if attrs && check.mtime && w.mtime != g.mtime {
            diffs.push(format!(
                "mtime    {name}: {} expected, {} found",
                show_time(w.mtime),
                show_time(g.mtime)
            ));
        }
        if w.kind == Kind::File
            && !check.skip_bytes.contains(&name.as_str())
            && let Some(why) = bytes_differ(&at(expected, rel), &at(actual, rel))
        {
            diffs.push(format!("bytes    {name}: {why}"));
        }
    }
    for rel in got.keys().filter(|rel| !want.contains_key(*rel)) {
        diffs.push(format!("extra    {}", show(rel)));
    }
    assert!(
        diffs.is_empty(),
        "{context}: {} differs from {} in {} ways:\n  {}",
        actual.display(),
        expected.display(),
        diffs.len(),
        diffs.join("\n  ")
    );
}

/// The keys the tree at `tree` makes under the key `base`: an object per file and symlink, a
/// marker `…/` per directory.
fn keys_of(tree: &Path, base: &str) -> Vec<String> {
    walk(tree)
        .into_iter()
        .map(|(rel, node)| {
            let mut key = match rel.to_str().unwrap() {
                "" => base.to_string(),
                rel => format!("{base}/{rel}"),
            };
            if node.kind == Kind::Dir {
                key.push('/');
            }
            key
        })
        .collect()
}

/// Asserts that the bucket holds exactly `expected` (in any order), listing what is missing and
/// what is extra.
async fn assert_keys(server: Server, bucket: &str, mut expected: Vec<String>, context: &str) {
    let client = sdk_client(server).await;
    let mut keys = list_keys(&client, bucket, "").await;
    keys.sort();
    expected.sort();
    let missing: Vec<_> = expected.iter().filter(|k| !keys.contains(k)).collect();
    let extra: Vec<_> = keys.iter().filter(|k| !expected.contains(k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: the keys of bucket {bucket} differ:\n  missing {missing:?}\n  extra {extra:?}"
    );
}

/// What every test ends with: each `(expected, dst)` pair (a local tree and where the tool put
/// it, relative to the mount) is the same through the mount; after the daemon drained and
/// stopped, the bucket holds exactly their keys; and a fresh mount of the bucket, with nothing
/// cached, shows the same trees again. Returns that fresh mount.
async fn assert_persisted(
    server: Server,
    bucket: &str,
    m: Mount,
    trees: &[(&Path, &str)],
    check: Check,
) -> Mount {
    let check = check.on(server);
    for (expected, dst) in trees {
        assert_same_tree(expected, &m.join(dst), check, "through the mount");
    }
    assert!(m.stop().success(), "the daemon did not drain and exit 0");
    let keys = trees
        .iter()
        .flat_map(|(expected, dst)| keys_of(expected, &format!("{PREFIX}/{dst}")))
        .collect();
    assert_keys(server, bucket, keys, "after unmounting").await;
    let m = Mount::s3(server, bucket, PREFIX, &[]);
    for (expected, dst) in trees {
        assert_same_tree(expected, &m.join(dst), check, "after a fresh remount");
    }
    m
}

// ---- running the tools --------------------------------------------------------------------------

/// Runs `cmd` to success and returns its stdout; on failure the panic shows its output and the
/// warnings and last lines of the mount's log.
fn run(m: &Mount, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        let log = m.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let notable: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}\nbucketfs warnings and errors:\n{}\n\
             last lines of the bucketfs log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            notable.join("\n"),
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cmd(program: &str) -> Command {
    Command::new(program)
}

// ---- the tools ----------------------------------------------------------------------------------

async fn cp_a_copies_the_tree_exactly(server: Server) {
    let src = source_tree();
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    run(&m, cmd("cp").arg("-a").arg(&src.root).arg(m.path()));
    let m = assert_persisted(server, &bucket, m, &[(&src.root, "tree")], EXACT).await;
    assert!(m.stop().success());
}

/// Also: a second `rsync -a` from a fresh mount finds nothing to transfer (rsync's own view that
/// sizes, mtimes, modes, owners and links all match).
async fn rsync_a_copies_the_tree_exactly(server: Server) {
    let src = source_tree();
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    run(&m, cmd("rsync").arg("-a").arg(&src.root).arg(m.path()));
    let m = assert_persisted(server, &bucket, m, &[(&src.root, "tree")], EXACT).await;
    let changes = run(
        &m,
        cmd("rsync")
            .args(["-a", "--itemize-changes", "--dry-run"])
            .arg(&src.root)
            .arg(m.path()),
    );
    // Where directories keep no attributes (SeaweedFS, see `Check::on`), only they may differ.
    let keeps_dir_attrs = EXACT.on(server).dir_attrs;
    let changes: Vec<&str> = changes
        .lines()
        .filter(|l| keeps_dir_attrs || !l.starts_with(".d"))
        .collect();
    assert!(
        changes.is_empty(),
        "rsync would transfer again: {changes:#?}"
    );
    assert!(m.stop().success());
}

/// A POSIX-format archive (nanosecond mtimes) extracted as root (owners and modes kept); then
/// `tar --diff` from a fresh mount finds no difference.
async fn tar_x_extracts_the_tree_exactly(server: Server) {
    let src = source_tree();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("tree.tar");
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    run(
        &m,
        cmd("tar")
            .arg("-C")
            .arg(src.root.parent().unwrap())
            .args(["--format=posix", "-cf"])
            .arg(&archive)
            .arg("tree"),
    );
    run(
        &m,
        cmd("tar")
            .arg("-C")
            .arg(m.path())
            .args(["--same-owner", "--same-permissions", "-xf"])
            .arg(&archive),
    );
    let m = assert_persisted(server, &bucket, m, &[(&src.root, "tree")], EXACT).await;
    let out = cmd("tar")
        .arg("-C")
        .arg(m.path())
        .arg("-df")
        .arg(&archive)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // Where directories keep no attributes (SeaweedFS, see `Check::on`), only they may differ.
    let keeps_dir_attrs = EXACT.on(server).dir_attrs;
    let about_a_dir = |line: &str| {
        line.split_once(": ")
            .is_some_and(|(path, _)| src.root.parent().unwrap().join(path).is_dir())
    };
    let diffs: Vec<&str> = stdout
        .lines()
        .filter(|l| keeps_dir_attrs || !about_a_dir(l))
        .collect();
    assert!(
        diffs.is_empty() && stderr.is_empty() && (out.status.success() || !keeps_dir_attrs),
        "tar --diff: {}\n{stdout}{stderr}",
        out.status
    );
    assert!(m.stop().success());
}

/// `git` with no system or user configuration and fixed identities and dates, so that two
/// clones making the same commit make the same objects.
fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Tess Ter")
        .env("GIT_AUTHOR_EMAIL", "tess@example.com")
        .env("GIT_AUTHOR_DATE", "2020-01-02T03:04:05Z")
        .env("GIT_COMMITTER_NAME", "Tess Ter")
        .env("GIT_COMMITTER_EMAIL", "tess@example.com")
        .env("GIT_COMMITTER_DATE", "2020-01-02T03:04:05Z")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE");
    cmd
}

/// A small local repository with a few commits (no network): text, binary, an executable, a
/// symlink, a unicode name, a rename, a tag.
fn origin_repo(dir: &Path, m: &Mount) -> PathBuf {
    let origin = dir.join("origin");
    std::fs::create_dir(&origin).unwrap();
    let g = |args: &[&str]| run(m, git(&origin).args(args));
    g(&["init", "-q", "-b", "main"]);
    std::fs::create_dir_all(origin.join("src")).unwrap();
    std::fs::create_dir_all(origin.join("bin")).unwrap();
    std::fs::create_dir_all(origin.join("docs")).unwrap();
    std::fs::write(origin.join("README.md"), "# origin\n\nA test repository.\n").unwrap();
    std::fs::write(origin.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    std::fs::write(origin.join("bin/run.sh"), "#!/bin/sh\nexec true\n").unwrap();
    std::fs::set_permissions(
        origin.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(origin.join("data.bin"), data(200 * 1024, 9)).unwrap();
    symlink("README.md", origin.join("readme-link")).unwrap();
    g(&["add", "-A"]);
    g(&["commit", "-q", "-m", "first"]);
    std::fs::write(origin.join("docs/ünïcödé 漢字 #1.txt"), "unicode\n").unwrap();
    std::fs::write(origin.join("src/main.c"), "int main(void) { return 42; }\n").unwrap();
    g(&["add", "-A"]);
    g(&["commit", "-q", "-m", "second"]);
    g(&["mv", "src/main.c", "src/app.c"]);
    g(&["commit", "-q", "-m", "third: rename"]);
    g(&["tag", "v1"]);
    origin
}

/// `git clone` into the mount and the same clone on local disk hold the same files (bytes, modes,
/// owners; the index aside, which records inode numbers and times), `git status` is clean,
/// `git fsck` finds nothing, `git log` is the origin's; a commit made in both clones (lock files,
/// renames, read-only loose objects) keeps them identical; all of it again from a fresh mount.
async fn git_clone_into_the_mount_is_a_working_repository(server: Server) {
    const CHECK: Check = Check {
        mtime: false,
        owner: true,
        skip_bytes: &[".git/index"],
        dir_attrs: true,
    };
    let work = tempfile::tempdir().unwrap();
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    let origin = origin_repo(work.path(), &m);
    let url = format!("file://{}", origin.display());
    let local = work.path().join("clone");
    run(&m, git(work.path()).args(["clone", "-q", &url, "clone"]));
    run(&m, git(m.path()).args(["clone", "-q", &url, "clone"]));
    let mounted = m.join("clone");
    assert_same_tree(&local, &mounted, CHECK.on(server), "right after the clone");
    let log = |m: &Mount, dir: &Path| run(m, git(dir).args(["log", "--format=%H %s"]));
    let expected_log = log(&m, &origin);
    assert_eq!(expected_log.lines().count(), 3);
    let healthy = |m: &Mount, dir: &Path, expected_log: &str| {
        assert_eq!(
            run(m, git(dir).args(["status", "--porcelain"])),
            "",
            "git status in {}",
            dir.display()
        );
        run(m, git(dir).args(["fsck", "--full", "--strict"]));
        assert_eq!(log(m, dir), expected_log, "git log in {}", dir.display());
    };
    healthy(&m, &mounted, &expected_log);
    // The same commit in both clones: the same objects, refs and reflogs.
    for dir in [&local, &mounted] {
        let readme = dir.join("README.md");
        let mut text = std::fs::read_to_string(&readme).unwrap();
        text.push_str("\nEdited in a clone.\n");
        std::fs::write(&readme, text).unwrap();
        run(&m, git(dir).args(["commit", "-q", "-a", "-m", "fourth"]));
        run(&m, git(dir).args(["status", "--porcelain"]));
    }
    let expected_log = log(&m, &local);
    assert_eq!(expected_log.lines().count(), 4);
    healthy(&m, &mounted, &expected_log);
    let m = assert_persisted(server, &bucket, m, &[(&local, "clone")], CHECK).await;
    healthy(&m, &m.join("clone"), &expected_log);
    assert!(m.stop().success());
}

/// A database made by the sqlite3 CLI on local disk, `mv`'d into the mount (across devices: a
/// copy keeping mode, owner and mtime, then an unlink), opens read-only from the mount and from
/// a fresh mount, passes its integrity check, answers a query, and leaves no journal behind.
async fn sqlite3_database_moved_into_the_mount_reads_back(server: Server) {
    let work = tempfile::tempdir().unwrap();
    let (local, reference) = (work.path().join("local"), work.path().join("reference"));
    std::fs::create_dir(&local).unwrap();
    std::fs::create_dir(&reference).unwrap();
    let db = local.join("app.db");
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    run(
        &m,
        cmd("sqlite3").arg(&db).arg(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, payload BLOB);
             WITH RECURSIVE n(x) AS (VALUES(1) UNION ALL SELECT x + 1 FROM n WHERE x < 5000)
             INSERT INTO t SELECT x, 'name ' || x, randomblob(200) FROM n;
             CREATE INDEX t_name ON t(name);",
        ),
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&db, Some(1234), Some(5678)).unwrap();
    set_times(&db, 1_234_567_890, 987_654_321);
    run(&m, cmd("cp").arg("-a").arg(&db).arg(&reference));
    let reference = reference.join("app.db");
    run(&m, cmd("mv").arg(&db).arg(m.path()));
    assert!(!db.exists(), "mv left the source behind");
    let query = "PRAGMA integrity_check;
                 SELECT count(*), sum(length(payload)) FROM t;
                 SELECT name FROM t WHERE id = 4242;";
    let expected = "ok\n5000|1000000\nname 4242\n";
    let select = |m: &Mount| {
        run(
            m,
            cmd("sqlite3")
                .arg("-readonly")
                .arg(m.join("app.db"))
                .arg(query),
        )
    };
    assert_eq!(select(&m), expected, "through the mount");
    let m = assert_persisted(server, &bucket, m, &[(&reference, "app.db")], EXACT).await;
    assert_eq!(select(&m), expected, "from a fresh mount");
    assert!(m.stop().success());
    let keys = vec![format!("{PREFIX}/app.db")];
    assert_keys(server, &bucket, keys, "after the read-only queries").await;
    let client = sdk_client(server).await;
    let stored = get_object(&client, &bucket, &format!("{PREFIX}/app.db")).await;
    assert!(
        stored == std::fs::read(&reference).unwrap(),
        "reading changed the database"
    );
}

/// `shutil.copytree` (whose per-file copy is `shutil.copy2`: bytes, mode, mtime) with symlinks
/// kept, and one `shutil.copy2` of a file under a new name. Neither copies owners.
async fn shutil_copy2_copies_the_tree_exactly(server: Server) {
    const CHECK: Check = Check {
        mtime: true,
        owner: false,
        skip_bytes: &[],
        dir_attrs: true,
    };
    let src = source_tree();
    let bucket = s3::fresh_bucket(server).await;
    let m = Mount::s3(server, &bucket, PREFIX, &[]);
    let script = "import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True, copy_function=shutil.copy2)
shutil.copy2(sys.argv[3], sys.argv[4])";
    let big = src.root.join("big.bin");
    run(
        &m,
        cmd("python3")
            .arg("-c")
            .arg(script)
            .arg(&src.root)
            .arg(m.join("tree"))
            .arg(&big)
            .arg(m.join("big copy.bin")),
    );
    let trees: &[(&Path, &str)] = &[(&src.root, "tree"), (&big, "big copy.bin")];
    let m = assert_persisted(server, &bucket, m, trees, CHECK).await;
    assert!(m.stop().success());
}
