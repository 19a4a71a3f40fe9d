//! `cib init`: a starting `.cib.yml` for the project in a directory, chosen by the files that
//! say what kind of project it is. The spec it writes lints clean (a test checks every kind),
//! starts with the schema modeline for editors, and says where the reference is.

use std::path::Path;
use std::process::ExitCode;

use super::client::{err, out};

/// The kinds of project `cib init` knows, in the order it looks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Python,
    Node,
    Rust,
    Go,
    Shell,
}

impl Kind {
    /// The file that marks the kind, when there is one.
    fn marker(self) -> Option<&'static str> {
        match self {
            Kind::Python => Some("pyproject.toml"),
            Kind::Node => Some("package.json"),
            Kind::Rust => Some("Cargo.toml"),
            Kind::Go => Some("go.mod"),
            Kind::Shell => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Python => "Python",
            Kind::Node => "Node",
            Kind::Rust => "Rust",
            Kind::Go => "Go",
            Kind::Shell => "shell",
        }
    }

    /// The first kind whose marker the directory holds; shell when none does.
    pub fn detect(dir: &Path) -> Kind {
        [Kind::Python, Kind::Node, Kind::Rust, Kind::Go]
            .into_iter()
            .find(|k| k.marker().is_some_and(|m| dir.join(m).is_file()))
            .unwrap_or(Kind::Shell)
    }
}

const HEADER: &str = "\
# yaml-language-server: $schema=https://cib.invalid/schema/cib.schema.json
# The build spec of this repository, started by `cib init` for a {KIND} project.
# Every key, its default and complete examples: docs/spec.md in cib's repository.
# `cib lint` checks this file, `cib plan` shows what a push would run, and `cib run` runs it
# here, in containers, as the server would.
version: 1

pipelines:
  # `test` needs no `on:`: by the default layout it runs on every push to a branch other than
  # master and production, and on every pull request (docs/spec.md, \"The default layout\").
  # Add `staging` (pushes to master) and `production` (promotions) when you deploy; see
  # docs/spec.md, \"Complete examples\".
  test:
    steps:
";

fn steps(kind: Kind, dir: &Path) -> String {
    match kind {
        Kind::Python => {
            // A `src/` layout is importable without installing the project, which would need
            // its build backend from a package index.
            let path = if dir.join("src").is_dir() { "src" } else { "." };
            format!(
                "      # Steps run `sh -e` in the image, in a copy of the repository (docs/spec.md, \"Steps\").
      - name: unit
        image: python:3.11-slim
        env: {{ PYTHONPATH: {path} }}
        commands:
          # pytest from the image when it has it, else from the package index.
          - python -c 'import pytest' 2>/dev/null || python -m pip install --quiet --disable-pip-version-check pytest
          - python -m pytest -q
      # Steps without `depends_on` run in parallel.
      - name: compile
        image: python:3.11-slim
        network: none
        commands: [python -m compileall -q .]
"
            )
        }
        Kind::Node => {
            let install = if dir.join("package-lock.json").is_file() { "npm ci" } else { "npm install" };
            format!(
                "      # Steps run `sh -e` in the image, in a copy of the repository (docs/spec.md, \"Steps\").
      - name: test
        image: node:20
        commands:
          - {install} --no-audit --no-fund
          - npm test
"
            )
        }
        Kind::Rust => "      # Steps run `sh -e` in the image, in a copy of the repository (docs/spec.md, \"Steps\").
      - name: test
        image: rust:1.95
        timeout: 30m
        commands:
          - cargo build --all-targets
          - cargo test
"
        .to_owned(),
        Kind::Go => "      # Steps run `sh -e` in the image, in a copy of the repository (docs/spec.md, \"Steps\").
      - name: test
        image: golang:1.23
        commands:
          - go vet ./...
          - go test ./...
"
        .to_owned(),
        Kind::Shell => "      # Steps run `sh -e` in the image, in a copy of the repository (docs/spec.md, \"Steps\").
      # This one checks the syntax of every shell script; add the project's own tests after it.
      - name: check
        image: busybox
        network: none
        commands:
          - find . -name '*.sh' -not -path './.git/*' -exec sh -n {} \\;
"
        .to_owned(),
    }
}

/// The spec `cib init` writes for a project of `kind` in `dir`.
pub fn spec_for(kind: Kind, dir: &Path) -> String {
    format!("{}{}", HEADER.replace("{KIND}", kind.name()), steps(kind, dir))
}

/// `cib init [DIR] [--kind KIND] [--force]`: exit 0 when written, 1 when a spec is already
/// there (without `--force`), 2 when the directory cannot be used.
pub fn run(dir: &Path, kind: Option<Kind>, force: bool) -> ExitCode {
    if !dir.is_dir() {
        err(&format!("cib init: {} is not a directory", dir.display()));
        return ExitCode::from(2);
    }
    let path = dir.join(cib_core::spec::FILE_NAME);
    if path.exists() && !force {
        err(&format!("cib init: {} already exists; pass --force to replace it", path.display()));
        return ExitCode::from(1);
    }
    let kind = kind.unwrap_or_else(|| Kind::detect(dir));
    let text = spec_for(kind, dir);
    // What is written must lint clean; were a template ever wrong, nothing is written.
    if let Err(diags) = cib_core::spec::parse(&text) {
        for d in diags {
            err(&format!("cib init: the {} template is not valid: {d}", kind.name()));
        }
        return ExitCode::from(3);
    }
    if let Err(e) = std::fs::write(&path, &text) {
        err(&format!("cib init: cannot write {}: {e}", path.display()));
        return ExitCode::from(2);
    }
    out(&format!(
        "wrote {} for a {} project{}; check it with `cib lint`, run it with `cib run`",
        path.display(),
        kind.name(),
        kind.marker().map(|m| format!(" ({m})")).unwrap_or_default()
    ));
    ExitCode::SUCCESS
}
