//! `examples/drop_in.rs` is `examples/drop_in_plain.rs` with gradkit added in at most five
//! changed lines (the module doc comments aside), as the README promises.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The code lines of an example: everything after its `//!` header.
fn code(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.lines()
        .skip_while(|l| l.starts_with("//!"))
        .map(str::to_owned)
        .collect()
}

/// The length of the longest common subsequence of lines.
fn common(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                row[j + 1].max(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[test]
fn gradkit_is_added_in_at_most_five_lines() -> TestResult {
    let plain = code("examples/drop_in_plain.rs");
    let with = code("examples/drop_in.rs");
    let kept = common(&plain, &with);
    let (added, removed) = (with.len() - kept, plain.len() - kept);
    assert!(added <= 5, "{added} lines added or changed");
    assert!(removed <= added, "{removed} lines removed");
    Ok(())
}
