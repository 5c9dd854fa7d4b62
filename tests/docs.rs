//! The documentation checks itself against the code:
//! - every test that `docs/SEMANTICS.md` names as the proof of a claim, and that
//!   `docs/OPERATIONS.md` names as exercising a recipe, exists;
//! - every flag `bucketfs mount --help` lists is described in `docs/CONFIGURATION.md`;
//! - every metric `src/metrics.rs` defines is described in `docs/OPERATIONS.md`.

use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, concatenated.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Backticked words that look like test names: lower snake case with at least three words.
fn test_names(doc: &str) -> BTreeSet<String> {
    doc.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            // `bucketfs_…` words are metric names (checked by `every_metric_is_in_operations_md`).
            !w.starts_with("bucketfs_")
                && w.split('_').count() >= 4
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// Every test `doc` cites exists in the sources (at least `min` are cited).
fn check_cited_tests(doc_path: &str, min: usize) {
    let doc = read(doc_path);
    let mut code = String::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    sources(&root.join("src"), &mut code);
    sources(&root.join("tests"), &mut code);
    let cited = test_names(&doc);
    assert!(cited.len() >= min, "only {} tests cited", cited.len());
    let missing: Vec<&String> = cited
        .iter()
        .filter(|name| !code.contains(&format!("fn {name}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "{doc_path} cites tests that do not exist: {missing:?}"
    );
}

#[test]
fn every_test_semantics_md_cites_exists() {
    check_cited_tests("docs/SEMANTICS.md", 30);
}

#[test]
fn every_test_operations_md_cites_exists() {
    check_cited_tests("docs/OPERATIONS.md", 15);
}

#[test]
fn every_mount_flag_is_in_configuration_md() {
    let doc = read("docs/CONFIGURATION.md");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_bucketfs"))
        .args(["mount", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: BTreeSet<&str> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches([',', '.', ':']))
        .map(|w| w.split(['=', '[', '<']).next().unwrap_or(w))
        .filter(|w| !w.is_empty() && !["help", "version"].contains(w))
        .collect();
    assert!(flags.len() >= 15, "parsed only {flags:?}");
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|f| !doc.contains(&format!("`--{f}")))
        .collect();
    assert!(
        missing.is_empty(),
        "flags missing from CONFIGURATION.md: {missing:?}"
    );
}

#[test]
fn every_metric_is_in_operations_md() {
    let doc = read("docs/OPERATIONS.md");
    let code = read("src/metrics.rs");
    let names: Vec<&str> = code
        .split('"')
        .filter(|w| w.starts_with("bucketfs_") && !w.contains(' '))
        .collect();
    assert!(names.len() >= 15, "parsed only {names:?}");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from OPERATIONS.md: {missing:?}"
    );
}
