//! Matrix steps: one step written once, run once per combination of values (a cell).
//!
//! The raw form (`RawMatrix`) keeps every value's position; [`cells`] works the combinations
//! out (the product of the axes, less `exclude`, plus `include`), refusing more than the limit
//! before building them; [`expand`] turns a checked step into one step per cell, named
//! `unit (python=3.12, db=postgres)`, with `MATRIX_<KEY>` variables and `{{ matrix.key }}`
//! replaced in its image. Everything downstream (the machine, the executor, the store) sees
//! ordinary steps, so each cell has its own log, status, retries and attempts for free; only
//! `fail_fast` needs the machine to know which cells belong together ([`MatrixCell`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::diag::{Diagnostic, Pos, suggestion};
use super::model::{Action, Step};
use super::types::{EnvValue, Spanned};

/// How many cells one matrix may make when the server sets no other limit.
pub const DEFAULT_MAX_CELLS: u32 = 256;

/// Past this many combinations (before `exclude`), the matrix is refused without building them,
/// so that a spec cannot make the reader allocate billions of cells to find out it is too large.
const MAX_COMBINATIONS: u64 = 1 << 20;

/// One key of a matrix and its values, as written.
pub type RawAxis = (Spanned<String>, Spanned<Vec<Spanned<EnvValue>>>);

/// One entry of `include` or `exclude`: values by key.
pub type RawCellValues = IndexMap<Spanned<String>, Spanned<EnvValue>>;

/// `matrix:` as written: axes (a key and its list of values), and the reserved keys `include`
/// and `exclude`, each a list of mappings of key to value.
#[derive(Debug, Default)]
pub struct RawMatrix {
    pub axes: Vec<RawAxis>,
    pub include: Vec<Spanned<RawCellValues>>,
    pub exclude: Vec<Spanned<RawCellValues>>,
}

impl<'de> Deserialize<'de> for RawMatrix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMatrix;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of each key to its list of values, with optional include and exclude")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawMatrix, A::Error> {
                let mut out = RawMatrix::default();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    match key.value.as_str() {
                        "include" => out.include = map.next_value()?,
                        "exclude" => out.exclude = map.next_value()?,
                        k if k.starts_with("x-") => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                        _ => {
                            let values = map.next_value()?;
                            out.axes.push((key, values));
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

impl JsonSchema for RawMatrix {
    fn schema_name() -> Cow<'static, str> {
        "Matrix".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let scalar = json_schema!({ "type": ["string", "number", "boolean"] });
        let cells = json_schema!({
            "type": "array",
            "items": { "type": "object", "additionalProperties": scalar, "minProperties": 1 }
        });
        json_schema!({
            "description": "Run the step once per combination of these values. Each key lists its values; `include` adds cells (or values to the cells it matches) and `exclude` removes the cells it matches. Steps read each value as `MATRIX_<KEY>`, and `image` may use `{{ matrix.key }}`.",
            "type": "object",
            "properties": {
                "include": cells,
                "exclude": cells,
            },
            "patternProperties": { "^x-": {} },
            "additionalProperties": { "type": "array", "minItems": 1, "items": scalar },
        })
    }
}

/// Which matrix a step is a cell of, and with which values. The machine reads `step` and
/// `fail_fast` to cancel a failed cell's siblings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatrixCell {
    /// The step's name as written, shared by its cells.
    pub step: String,
    /// The cell's values, axes first in the order written, then values added by `include`.
    pub values: Vec<(String, String)>,
    /// When one cell fails, the others are cancelled.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fail_fast: bool,
}

/// The combinations a matrix makes, each as its values in order, or the problems found.
pub fn cells(matrix: &Spanned<RawMatrix>, max_cells: u32) -> Result<Vec<Vec<(String, String)>>, Vec<Diagnostic>> {
    let m = &matrix.value;
    let mut diags = Vec::new();
    let axis_names: Vec<&str> = m.axes.iter().map(|(k, _)| k.value.as_str()).collect();
    for (key, values) in &m.axes {
        if !is_key(&key.value) {
            diags.push(Diagnostic::error(
                key.pos,
                format!("invalid matrix key '{}': use letters, digits, '-' and '_'", key.value),
            ));
        }
        if values.value.is_empty() {
            diags.push(Diagnostic::error(values.pos, format!("matrix key '{}' lists no values", key.value)));
        }
        let mut seen: BTreeMap<&str, Pos> = BTreeMap::new();
        for v in &values.value {
            if let Some(first) = seen.insert(&v.value.0, v.pos) {
                diags.push(Diagnostic::error(v.pos, format!("'{}' is listed twice (first at {first})", v.value.0)));
            }
        }
    }
    for entry in &m.exclude {
        for key in entry.value.keys() {
            if !axis_names.contains(&key.value.as_str()) {
                diags.push(Diagnostic::error(
                    key.pos,
                    format!(
                        "exclude names '{}', which is not a key of this matrix{}",
                        key.value,
                        suggestion(&key.value, axis_names.iter().copied())
                    ),
                ));
            }
        }
    }
    for entry in &m.include {
        for key in entry.value.keys() {
            if !is_key(&key.value) {
                diags.push(Diagnostic::error(
                    key.pos,
                    format!("invalid matrix key '{}': use letters, digits, '-' and '_'", key.value),
                ));
            }
        }
    }
    if m.axes.is_empty() && m.include.is_empty() {
        diags.push(Diagnostic::error(matrix.pos, "the matrix has no keys: list each key with its values"));
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let combinations = m.axes.iter().fold(1u64, |n, (_, v)| n.saturating_mul(v.value.len() as u64));
    let combinations = if m.axes.is_empty() { 0 } else { combinations };
    if combinations > MAX_COMBINATIONS {
        return Err(vec![over(matrix.pos, combinations, max_cells, " before exclude")]);
    }
    let mut out: Vec<Vec<(String, String)>> = Vec::new();
    if !m.axes.is_empty() {
        out.push(Vec::new());
        for (key, values) in &m.axes {
            out = out
                .into_iter()
                .flat_map(|cell| {
                    values.value.iter().map(move |v| {
                        let mut cell = cell.clone();
                        cell.push((key.value.clone(), v.value.0.clone()));
                        cell
                    })
                })
                .collect();
        }
    }
    let matches = |cell: &[(String, String)], entry: &RawCellValues, only_axes: bool| {
        entry
            .iter()
            .filter(|(k, _)| !only_axes || axis_names.contains(&k.value.as_str()))
            .all(|(k, v)| cell.iter().find(|(ck, _)| *ck == k.value).is_some_and(|(_, cv)| *cv == v.value.0))
    };
    out.retain(|cell| !m.exclude.iter().any(|e| matches(cell, &e.value, false)));
    for entry in &m.include {
        // As in GitHub Actions: an entry whose values for the matrix's own keys match some cells
        // adds its other values to them (never changing a value of the matrix's own keys);
        // one that matches none is a cell of its own.
        let extra = entry.value.keys().any(|k| !axis_names.contains(&k.value.as_str()));
        let matching: Vec<usize> =
            (0..out.len()).filter(|&i| !m.axes.is_empty() && matches(&out[i], &entry.value, true)).collect();
        if matching.is_empty() {
            let cell: Vec<(String, String)> =
                entry.value.iter().map(|(k, v)| (k.value.clone(), v.value.0.clone())).collect();
            if !out.contains(&cell) {
                out.push(cell);
            }
        } else if extra {
            for i in matching {
                for (k, v) in entry.value.iter().filter(|(k, _)| !axis_names.contains(&k.value.as_str())) {
                    match out[i].iter_mut().find(|(ck, _)| *ck == k.value) {
                        Some(slot) => slot.1 = v.value.0.clone(),
                        None => out[i].push((k.value.clone(), v.value.0.clone())),
                    }
                }
            }
        }
        if out.len() as u64 > MAX_COMBINATIONS {
            break;
        }
    }
    if out.is_empty() {
        return Err(vec![Diagnostic::error(
            matrix.pos,
            "the matrix makes no cells: exclude removes every combination",
        )]);
    }
    if out.len() as u64 > u64::from(max_cells) {
        return Err(vec![over(matrix.pos, out.len() as u64, max_cells, "")]);
    }
    Ok(out)
}

fn over(at: Pos, count: u64, max_cells: u32, when: &str) -> Diagnostic {
    Diagnostic::error(
        at,
        format!(
            "the matrix makes {count} cells{when}, over the limit of {max_cells} (max_matrix_cells in the server's [limits]): remove values or exclude cells"
        ),
    )
}

fn is_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// `MATRIX_` and the key upper-cased, other characters as `_`.
pub fn env_name(key: &str) -> String {
    let key: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("MATRIX_{key}")
}

/// A cell's name: the step's name and its values, `unit (python=3.12, db=postgres)`.
pub fn cell_name(step: &str, values: &[(String, String)]) -> String {
    let values: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{step} ({})", values.join(", "))
}

/// `{{ matrix.key }}` replaced by the cell's values; the keys it names that the cell lacks.
pub fn substitute(text: &str, values: &[(String, String)]) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else { break };
        let inner = rest[start + 2..start + len].trim();
        out.push_str(&rest[..start]);
        match inner.strip_prefix("matrix.") {
            Some(key) => match values.iter().find(|(k, _)| k == key) {
                Some((_, v)) => out.push_str(v),
                None => {
                    missing.push(key.to_owned());
                    out.push_str(&rest[start..start + len + 2]);
                }
            },
            None => out.push_str(&rest[start..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    (out, missing)
}

/// The steps a checked step becomes: itself when it has no matrix, else one per cell.
pub fn expand(
    step: Step,
    matrix: Option<&Spanned<RawMatrix>>,
    fail_fast: bool,
    image_pos: Pos,
    max_cells: u32,
) -> Result<Vec<Step>, Vec<Diagnostic>> {
    let Some(matrix) = matrix else {
        if let Action::Run { image, .. } = &step.action {
            let (_, missing) = substitute(image, &[]);
            if let Some(key) = missing.first() {
                return Err(vec![Diagnostic::error(
                    image_pos,
                    format!("'image' uses {{{{ matrix.{key} }}}}, but step '{}' has no matrix", step.name),
                )]);
            }
        }
        return Ok(vec![step]);
    };
    let cells = cells(matrix, max_cells)?;
    let mut diags = Vec::new();
    let mut env_keys: BTreeMap<String, &str> = BTreeMap::new();
    for (k, _) in cells.iter().flatten() {
        let env = env_name(k);
        if let Some(other) = env_keys.insert(env.clone(), k)
            && other != k
        {
            diags.push(Diagnostic::error(matrix.pos, format!("matrix keys '{other}' and '{k}' would both be {env}")));
        }
    }
    let mut out = Vec::with_capacity(cells.len());
    for values in cells {
        let mut cell = step.clone();
        cell.name = cell_name(&step.name, &values);
        if let Action::Run { image, .. } = &mut cell.action {
            let (text, missing) = substitute(image, &values);
            for key in missing {
                let known: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
                diags.push(Diagnostic::error(
                    image_pos,
                    format!(
                        "'image' uses {{{{ matrix.{key} }}}}, but cell '{}' has no value for '{key}'{}",
                        cell.name,
                        suggestion(&key, known.iter().copied())
                    ),
                ));
            }
            *image = text;
        }
        for (k, v) in &values {
            cell.env.insert(env_name(k), v.clone());
        }
        cell.matrix = Some(MatrixCell { step: step.name.clone(), values, fail_fast });
        out.push(cell);
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        diags.sort();
        diags.dedup();
        Err(diags)
    }
}
