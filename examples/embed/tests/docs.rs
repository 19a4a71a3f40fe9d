//! `docs/embedding.md` quotes code from this example and from the backends' tests. Every code
//! block in it is checked here against the file it names, so the guide cannot drift from code
//! that compiles and runs; a block that names no source fails.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The lines between `// ANCHOR: name` and `// ANCHOR_END: name`, without their common
/// indentation, as the guide shows them.
fn anchored(path: &str, name: &str) -> String {
    let text = read(path);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim() == format!("// ANCHOR: {name}")).unwrap_or_else(|| {
        panic!("{path} has no anchor {name}");
    });
    let end = lines[start..]
        .iter()
        .position(|l| l.trim() == format!("// ANCHOR_END: {name}"))
        .unwrap_or_else(|| panic!("{path}: anchor {name} is not closed"));
    let body = &lines[start + 1..start + end];
    let indent =
        body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    body.iter().map(|l| if l.len() >= indent { &l[indent..] } else { l.trim_start() }).collect::<Vec<_>>().join("\n")
}

/// The directory of the workspace package called `name`.
fn package_dir(name: &str) -> PathBuf {
    let manifest = read("Cargo.toml");
    let members = manifest.lines().find(|l| l.starts_with("members")).expect("workspace members");
    members
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|m| root().join(m))
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == format!("name = \"{name}\"")))
        })
        .unwrap_or_else(|| panic!("no workspace package {name}"))
}

/// A command the guide tells readers to run: a `cargo run` of a workspace package on a
/// directory with a spec, or a `cargo test` of a workspace package's test module that exists.
fn check_command(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["cargo", "run", "-p", package, "--", dir] => {
            package_dir(package);
            assert!(root().join(dir).join(".cib.yml").is_file(), "{dir} has no spec: {line}");
        }
        ["cargo", "test", "-p", package, "--test", target, filter] => {
            let module = package_dir(package).join("tests").join(target).join(format!("{filter}.rs"));
            assert!(module.is_file(), "no {}: {line}", module.display());
        }
        _ => panic!("a command the guide cannot vouch for: {line}"),
    }
}

#[test]
fn every_code_block_of_the_guide_is_real() {
    let guide = read("docs/embedding.md");
    let lines: Vec<&str> = guide.lines().collect();
    let mut checked = 0;
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let len = lines[i + 1..].iter().position(|l| *l == "```").expect("a closed code block");
        let block = lines[i + 1..i + 1 + len].join("\n");
        let source = i.checked_sub(1).map(|j| lines[j]).unwrap_or("");
        if let Some(what) = source.strip_prefix("<!-- include: ").and_then(|s| s.strip_suffix(" -->")) {
            let expected = match what.split_once('#') {
                Some((path, anchor)) => anchored(path, anchor),
                None => read(what).trim_end().to_owned(),
            };
            assert_eq!(block, expected, "the guide's quotation of {what} (line {}) is not what the file says", i + 1);
        } else if let Some(path) = source.strip_prefix("<!-- excerpt: ").and_then(|s| s.strip_suffix(" -->")) {
            assert!(read(path).contains(&format!("{block}\n")), "line {}: not a part of {path}:\n{block}", i + 1);
        } else {
            assert_eq!(lang, "sh", "line {}: a code block that names no source", i + 1);
            block.lines().for_each(check_command);
        }
        checked += 1;
        i += len + 2;
    }
    // The guide quotes the notifier, the ports, the engine, the stop, the secrets, two suites,
    // two manifests and two command blocks.
    assert_eq!(checked, 11, "code blocks checked");
}
