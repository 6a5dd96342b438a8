//! The eBPF crate builds with a nightly that ships no clippy, so its
//! `undocumented_unsafe_blocks` rule (enforced by clippy everywhere else)
//! is checked here: every `unsafe` block is preceded, within its statement,
//! by a `// SAFETY:` comment.

use std::fs;

use xtask::workspace_root;

/// The `unsafe {` lines of `source` with no `SAFETY:` comment before them
/// in the same statement.
fn undocumented_unsafe_lines(source: &str) -> Vec<usize> {
    let lines: Vec<&str> = source.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.contains("unsafe {") || line.contains("SAFETY:") {
            continue;
        }
        let documented = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            // Walk back over comments and the earlier lines of the same
            // statement; a line that ends a statement or block stops it.
            .take_while(|l| !(l.ends_with(';') || l.ends_with('}') || l.is_empty()))
            .any(|l| l.starts_with("//") && l.contains("SAFETY:"));
        if !documented {
            missing.push(i + 1);
        }
    }
    missing
}

#[test]
fn every_unsafe_block_in_the_ebpf_crate_says_why_it_is_sound() {
    let dir = workspace_root().join("ligo-fabric-ebpf/src");
    let mut checked = 0;
    let mut missing = Vec::new();
    for entry in fs::read_dir(&dir).expect("ebpf sources") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let source = fs::read_to_string(&path).expect("source");
            checked += source.matches("unsafe {").count();
            for line in undocumented_unsafe_lines(&source) {
                missing.push(format!("{}:{line}", path.display()));
            }
        }
    }
    assert!(
        checked > 10,
        "found only {checked} unsafe blocks in {dir:?}"
    );
    assert!(missing.is_empty(), "unsafe without SAFETY: {missing:#?}");
}

#[test]
fn the_check_finds_an_undocumented_block() {
    let documented = "// SAFETY: the pointer is checked above.\nlet v = unsafe { *p };\n";
    let split = "let v =\n    // SAFETY: checked.\n    unsafe { *p };\n";
    let bare = "let a = 1;\nlet v = unsafe { *p };\n";
    let after_other = "// SAFETY: for a.\nlet a = unsafe { *q };\nlet v = unsafe { *p };\n";
    assert!(undocumented_unsafe_lines(documented).is_empty());
    assert!(undocumented_unsafe_lines(split).is_empty());
    assert_eq!(undocumented_unsafe_lines(bare), [2]);
    assert_eq!(undocumented_unsafe_lines(after_other), [3]);
}
