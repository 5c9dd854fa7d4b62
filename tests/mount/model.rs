//! A reference-model test through a real mount: random sequences of file operations run both
//! on a mount of a fresh bucket and on a local directory (the model). After every step the
//! two must agree on the outcome (success or the same errno) and on the whole tree (names,
//! kinds, bytes, file modes). The sequences include SIGKILL of the daemon followed by a restart
//! on the same cache directory (every file was closed, so nothing may be lost) and a clean
//! remount on an empty cache (everything must come back from S3 alone).
//!
//! The in-memory counterpart with thousands of cases is `src/fs/model.rs`; this one runs a few
//! dozen sequences against each real server. SeaweedFS keeps a removed prefix listed for
//! minutes (docs/TESTING.md), so there directory removal and directory rename are left out.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;

both_servers!(random_operations_match_a_local_directory);

const DIRS: [&str; 3] = ["", "a", "b"];
const FILES: [&str; 3] = ["x", "y", "z"];

/// Sequences per server (`BUCKETFS_MODEL_CASES` overrides it for a longer hunt), and at most
/// this many operations per sequence.
const CASES: u32 = 8;
const OPS: usize = 40;

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: (usize, usize),
        offset: u64,
        len: usize,
        seed: u64,
    },
    Append {
        path: (usize, usize),
        len: usize,
        seed: u64,
    },
    Truncate {
        path: (usize, usize),
        len: u64,
    },
    Rename {
        from: (usize, usize),
        to: (usize, usize),
    },
    Unlink {
        path: (usize, usize),
    },
    Chmod {
        path: (usize, usize),
        mode: u32,
    },
    Fsync {
        path: (usize, usize),
    },
    Mkdir {
        dir: usize,
    },
    Rmdir {
        dir: usize,
    },
    RenameDir {
        from: usize,
        to: usize,
    },
    Crash,
    Remount,
}

fn path_choice() -> impl Strategy<Value = (usize, usize)> {
    (0..DIRS.len(), 0..FILES.len())
}

fn op(dirs_may_go: bool) -> BoxedStrategy<Op> {
    let dir = || 1..DIRS.len();
    let mode = prop_oneof![Just(0o600u32), Just(0o640), Just(0o755), Just(0o444)];
    let mut choices: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            6,
            (path_choice(), 0..40_000u64, 0..20_000usize, any::<u64>())
                .prop_map(|(path, offset, len, seed)| Op::Write {
                    path,
                    offset,
                    len,
                    seed,
                })
                .boxed(),
        ),
        (
            3,
            (path_choice(), 0..10_000usize, any::<u64>())
                .prop_map(|(path, len, seed)| Op::Append { path, len, seed })
                .boxed(),
        ),
        (
            2,
            (path_choice(), 0..50_000u64)
                .prop_map(|(path, len)| Op::Truncate { path, len })
                .boxed(),
        ),
        (
            3,
            (path_choice(), path_choice())
                .prop_map(|(from, to)| Op::Rename { from, to })
                .boxed(),
        ),
        (
            2,
            path_choice().prop_map(|path| Op::Unlink { path }).boxed(),
        ),
        (
            2,
            (path_choice(), mode)
                .prop_map(|(path, mode)| Op::Chmod { path, mode })
                .boxed(),
        ),
        (1, path_choice().prop_map(|path| Op::Fsync { path }).boxed()),
        (3, dir().prop_map(|dir| Op::Mkdir { dir }).boxed()),
        (1, Just(Op::Crash).boxed()),
        (1, Just(Op::Remount).boxed()),
    ];
    if dirs_may_go {
        choices.push((1, dir().prop_map(|dir| Op::Rmdir { dir }).boxed()));
        choices.push((
            1,
            (dir(), dir())
                .prop_map(|(from, to)| Op::RenameDir { from, to })
                .boxed(),
        ));
    }
    proptest::strategy::Union::new_weighted(choices).boxed()
}

fn file_path(root: &Path, (d, f): (usize, usize)) -> PathBuf {
    root.join(DIRS[d]).join(FILES[f])
}

fn errno(r: std::io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Run one operation on the tree at `root` (the mount or the model). Every file is closed
/// when it returns.
fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let open = |path: (usize, usize)| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file_path(root, path))
    };
    match op {
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => errno((|| {
            let mut f = open(*path)?;
            f.seek(SeekFrom::Start(*offset))?;
            f.write_all(&data(*len, *seed))
        })()),
        Op::Append { path, len, seed } => errno((|| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file_path(root, *path))?;
            f.write_all(&data(*len, *seed))
        })()),
        Op::Truncate { path, len } => errno(open(*path).and_then(|f| f.set_len(*len))),
        Op::Rename { from, to } => errno(std::fs::rename(
            file_path(root, *from),
            file_path(root, *to),
        )),
        Op::Unlink { path } => errno(std::fs::remove_file(file_path(root, *path))),
        Op::Chmod { path, mode } => errno(std::fs::set_permissions(
            file_path(root, *path),
            std::fs::Permissions::from_mode(*mode),
        )),
        Op::Fsync { path } => errno(
            std::fs::OpenOptions::new()
                .write(true)
                .open(file_path(root, *path))
                .and_then(|f| f.sync_all()),
        ),
        Op::Mkdir { dir } => errno(std::fs::create_dir(root.join(DIRS[*dir]))),
        Op::Rmdir { dir } => errno(std::fs::remove_dir(root.join(DIRS[*dir]))),
        Op::RenameDir { from, to } => errno(std::fs::rename(
            root.join(DIRS[*from]),
            root.join(DIRS[*to]),
        )),
        Op::Crash | Op::Remount => Ok(()),
    }
}

/// What a tree holds: relative path to (mode of a file, or None for a directory; bytes).
type Tree = BTreeMap<String, (Option<u32>, Vec<u8>)>;

fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, (None, Vec::new()));
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(rel, (Some(meta.permissions().mode() & 0o7777), bytes));
            }
        }
    }
    out
}

fn describe(t: &Tree) -> String {
    t.iter()
        .map(|(k, (mode, bytes))| match mode {
            Some(m) => format!("{k} {m:o} {}B", bytes.len()),
            None => format!("{k}/"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One sequence: a fresh bucket and mount, the model in a temp dir.
fn run_sequence(server: Server, ops: &[Op]) -> Result<(), TestCaseError> {
    let handle = tokio::runtime::Handle::current();
    let bucket = tokio::task::block_in_place(|| handle.block_on(s3::fresh_bucket(server)));
    let model = tempfile::tempdir().unwrap();
    // The mount's cache directory; a clean remount starts a new one (the last is current).
    let mut caches = vec![tempfile::tempdir().unwrap()];
    let current = |caches: &[tempfile::TempDir]| caches[caches.len() - 1].path().to_path_buf();
    let mut mount = Some(Mount::s3_with_cache(
        server,
        &bucket,
        "m",
        &[],
        &current(&caches),
    ));
    for (step, op) in ops.iter().enumerate() {
        let m = mount.take().unwrap();
        let m = match op {
            Op::Crash => {
                m.kill();
                Mount::s3_with_cache(server, &bucket, "m", &[], &current(&caches))
            }
            Op::Remount => {
                prop_assert!(m.stop().success(), "step {step}: the drain failed");
                caches.push(tempfile::tempdir().unwrap());
                Mount::s3_with_cache(server, &bucket, "m", &[], &current(&caches))
            }
            _ => m,
        };
        let expected = apply(model.path(), op);
        let got = apply(m.path(), op);
        prop_assert_eq!(got, expected, "step {}: {:?}", step, op);
        let (want, have) = (tree(model.path()), tree(m.path()));
        prop_assert!(
            want == have,
            "step {step} ({op:?}): the trees differ\n model: {}\n mount: {}\n{}",
            describe(&want),
            describe(&have),
            m.log_text()
        );
        mount = Some(m);
    }
    let m = mount.take().unwrap();
    prop_assert!(m.stop().success(), "the final drain failed");
    Ok(())
}

async fn random_operations_match_a_local_directory(server: Server) {
    let dirs_may_go = server != Server::SeaweedFs;
    let cases = std::env::var("BUCKETFS_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let ops = proptest::collection::vec(op(dirs_may_go), 1..OPS);
    let result = runner.run(&ops, |ops| run_sequence(server, &ops));
    if let Err(e) = result {
        panic!("{e}");
    }
}
