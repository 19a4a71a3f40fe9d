//! The build spec, `.cib.yml`: reading it, checking it, and describing it as a JSON Schema.
//!
//! Reading goes in three stages, each reporting every problem it finds with a line and column:
//! YAML text to a tree of positioned nodes (`yaml`), the tree to the raw serde types (`de`,
//! `raw`), and the raw types to the checked model the engine runs (`validate`, `model`).
//! Nothing here does I/O: callers hand in the text.

// Pure code: no clock, environment, files or threads (see clippy.toml).
#![deny(clippy::disallowed_methods)]

mod de;
mod diag;
pub mod limits;
pub mod matrix;
pub mod model;
pub mod raw;
mod types;
mod validate;
mod yaml;

pub use diag::{Diagnostic, MAX_DIAGNOSTICS, Pos, did_you_mean};
pub use limits::OperatorLimits;
pub use model::*;
pub use types::{Commands, Cron, Duration, EnvValue, Glob, Keyed, Memory, Spanned};
pub use validate::{DEFAULT_INTEGRATION_BRANCH, DEFAULT_LAYOUT, DEFAULT_RELEASE_BRANCH};

/// The conventional file name of a spec, at the root of a repository.
pub const FILE_NAME: &str = ".cib.yml";

/// The largest spec cib reads: 1 MiB. A build spec is a few kilobytes; past this the text is a
/// mistake or an attack, and refusing it before parsing bounds what parsing may cost.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// A spec file's bytes as text: refused with a diagnostic when longer than [`MAX_SPEC_BYTES`],
/// or when not UTF-8 (at the line and column of the first byte that is not).
pub fn decode(bytes: &[u8]) -> Result<&str, Diagnostic> {
    check_size(bytes.len())?;
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        // The prefix is valid UTF-8 by construction; `from_utf8_lossy` avoids a second error path.
        let before = String::from_utf8_lossy(valid);
        let before = diag::normalize_newlines(&before);
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
        let byte = bytes.get(e.valid_up_to()).copied().unwrap_or_default();
        Diagnostic::error(
            Pos { line: u32::try_from(line).unwrap_or(u32::MAX), col: u32::try_from(col).unwrap_or(u32::MAX) },
            format!("the spec is not UTF-8 text: byte 0x{byte:02X} here is not valid UTF-8"),
        )
    })
}

/// [`parse`] over a file's bytes, refusing text that [`decode`] refuses.
pub fn parse_bytes(bytes: &[u8]) -> Result<Spec, Vec<Diagnostic>> {
    parse(decode(bytes).map_err(|d| vec![d])?)
}

/// [`parse_limited`] over a file's bytes, refusing text that [`decode`] refuses.
pub fn parse_bytes_limited(bytes: &[u8], limits: &OperatorLimits) -> Result<Spec, Vec<Diagnostic>> {
    parse_limited(decode(bytes).map_err(|d| vec![d])?, limits)
}

fn check_size(len: usize) -> Result<(), Diagnostic> {
    if len > MAX_SPEC_BYTES {
        return Err(Diagnostic::error(
            Pos { line: 1, col: 1 },
            format!("the spec is {len} bytes long; cib reads specs of at most {MAX_SPEC_BYTES} bytes (1 MiB)"),
        ));
    }
    Ok(())
}

/// Reads and checks a spec. On failure, every problem found, sorted by position, up to
/// [`MAX_DIAGNOSTICS`] of them and then one saying how many more there were.
///
/// When some values are malformed, the rest of the spec is still checked, so that one run shows
/// every problem. Checks of references (to steps, services, pipelines) are then left out, since
/// the thing referred to may be one of the malformed values.
pub fn parse(source: &str) -> Result<Spec, Vec<Diagnostic>> {
    parse_limited(source, &OperatorLimits::default())
}

/// [`parse`] under a server's limits: a value over a maximum is one more diagnostic (with the
/// key's path, the value and the limit), and the spec that passes has the defaults filled in
/// ([`OperatorLimits::apply`]), so that every step that runs commands has a timeout.
pub fn parse_limited(source: &str, limits: &OperatorLimits) -> Result<Spec, Vec<Diagnostic>> {
    let (raw, mut diags) = read(source);
    let Some(raw) = raw else { return Err(diag::cap(diags)) };
    // Values over a limit are well formed, so they do not make the rest of the checks partial.
    let partial = !diags.is_empty();
    diags.extend(limits.check(&raw));
    diags.sort();
    match validate::validate(raw, partial, limits.max_cells()) {
        Ok(mut spec) if diags.is_empty() => {
            spec.pipelines.iter_mut().for_each(|p| limits.apply(p));
            Ok(spec)
        }
        Ok(_) => Err(diag::cap(diags)),
        Err(more) => {
            diags.extend(more);
            diags.sort();
            diags.dedup();
            Err(diag::cap(diags))
        }
    }
}

/// Reads a spec into its raw form, without the checks that need the whole spec.
pub fn parse_raw(source: &str) -> Result<raw::RawSpec, Vec<Diagnostic>> {
    match read(source) {
        (Some(v), diags) if diags.is_empty() => Ok(v),
        (_, diags) => Err(diag::cap(diags)),
    }
}

fn read(source: &str) -> (Option<raw::RawSpec>, Vec<Diagnostic>) {
    if let Err(d) = check_size(source.len()) {
        return (None, vec![d]);
    }
    let source = diag::normalize_newlines(source);
    let (tree, mut diags) = match yaml::parse(&source) {
        Ok(parsed) => parsed,
        Err(diags) => return (None, diags),
    };
    let (value, more) = de::from_tree::<raw::RawSpec>(&tree);
    diags.extend(more);
    diags.sort();
    diags.dedup();
    (value, diags)
}

/// The YAML document as JSON (merge keys applied, aliases expanded, YAML 1.2 core types), for
/// tools that check a spec against the JSON Schema.
pub fn to_json(source: &str) -> Result<serde_json::Value, Diagnostic> {
    check_size(source.len())?;
    let (tree, _) = yaml::parse(&diag::normalize_newlines(source)).map_err(|diags| {
        // Parsing fails with at least one diagnostic; the first is where it went wrong.
        diags.into_iter().next().unwrap_or_else(|| Diagnostic::error(Pos { line: 1, col: 1 }, "invalid YAML"))
    })?;
    Ok(yaml::to_json(&tree))
}

/// The JSON Schema of the spec (draft 7, which editors' YAML language servers read best).
pub fn schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<raw::RawSpec>();
    schema.insert("$id".into(), SCHEMA_ID.into());
    let mut value = schema.to_value();
    drop_null_defaults(&mut value);
    value
}

/// `"default": null` says nothing a reader needs, and editors insert it as a placeholder
/// (`workdir: null`), so it is left out.
fn drop_null_defaults(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map.get("default").is_some_and(serde_json::Value::is_null) {
                map.remove("default");
            }
            map.values_mut().for_each(drop_null_defaults);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_null_defaults),
        _ => {}
    }
}

/// Where the schema is published; a spec names it on a `# yaml-language-server: $schema=` line.
pub const SCHEMA_ID: &str = "https://cib.invalid/schema/cib.schema.json";
