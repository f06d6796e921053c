//! The module tree runs one way: layers → `ops` → `kernels` → `grad_core::cpu`. A kernel never
//! names anything of this crate outside `kernels`; an op names only kernels, other ops, the
//! crate's error and shape checks, and the configuration enums it maps onto kernels.

use std::fs;
use std::path::{Path, PathBuf};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The `crate::X` heads named by the code (not the comments) of the `.rs` files in `dir`; it
/// fails when `dir` holds fewer than 5 of them (a moved folder must not pass vacuously).
fn crate_paths(dir: &Path) -> Result<Vec<(PathBuf, String)>, std::io::Error> {
    let mut found = Vec::new();
    let mut files = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        for line in fs::read_to_string(&path)?.lines() {
            let code = line.split("//").next().unwrap_or_default();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                // `crate::{A, b::C}` names A and b; `crate::a::B` names a.
                let items: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .collect(),
                    None => vec![rest],
                };
                for item in items {
                    let head: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    found.push((path.clone(), head));
                }
            }
        }
    }
    assert!(files >= 5, "only {files} source files in {}", dir.display());
    Ok(found)
}

fn src(part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(part)
}

#[test]
fn kernels_name_nothing_outside_kernels() -> TestResult {
    let found = crate_paths(&src("kernels"))?;
    let wrong: Vec<_> = found.iter().filter(|(_, h)| h != "kernels").collect();
    assert!(wrong.is_empty(), "kernels reach out of kernels: {wrong:?}");
    Ok(())
}

#[test]
fn ops_name_only_kernels_checks_errors_and_config_enums() -> TestResult {
    const ALLOWED: [&str; 8] = [
        "kernels",
        "check",
        "Error",
        "Result",
        "Activation",
        "GeluApproximation",
        "ChannelAxis",
        "ops",
    ];
    let found = crate_paths(&src("ops"))?;
    assert!(!found.is_empty(), "the scan found no crate paths in ops/");
    let wrong: Vec<_> = found
        .iter()
        .filter(|(_, h)| !ALLOWED.contains(&h.as_str()))
        .collect();
    assert!(wrong.is_empty(), "ops reach into layers: {wrong:?}");
    Ok(())
}
