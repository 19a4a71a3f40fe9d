//! Diagnostics: what is wrong in a spec, and where, rendered like a compiler's.

use std::fmt;

use serde::Serialize;

/// The most problems reported for one spec. A spec with more is not a spec with a few
/// mistakes but the wrong file or an attack; past this many, the rest are summed up in one last
/// diagnostic, so that building messages never costs more than reading the text.
pub const MAX_DIAGNOSTICS: usize = 1_000;

/// A position in the spec's text: line and column, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Diagnostic {
    pub pos: Pos,
    pub message: String,
}

impl Diagnostic {
    pub fn error(pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic { pos, message: message.into() }
    }

    /// The one-line form tools parse: `PATH:LINE:COL: error: MESSAGE`.
    pub fn line(&self, path: &str) -> String {
        format!("{path}:{}:{}: error: {}", self.pos.line, self.pos.col, self.message)
    }

    /// The one-line form followed by the offending source line and a caret under the column,
    /// as compilers print them.
    pub fn render(&self, path: &str, source: &str) -> String {
        let mut out = self.line(path);
        let source = normalize_newlines(source);
        let line_no = self.pos.line as usize;
        if let Some(text) = source.lines().nth(line_no.saturating_sub(1)) {
            let gutter = line_no.to_string();
            let pad = " ".repeat(gutter.len());
            let caret_at: String = text
                .chars()
                .take((self.pos.col as usize).saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            out.push_str(&format!("\n{pad} |\n{gutter} | {text}\n{pad} | {caret_at}^"));
        }
        out
    }
}

impl Diagnostic {
    /// The did-you-mean of this diagnostic (`commands` for "unknown key 'comands' (did you
    /// mean 'commands'?)"), read back from the message that [`suggestion`] wrote, so that
    /// tools get it as data without a second place that makes suggestions.
    pub fn suggestion(&self) -> Option<&str> {
        let rest = self.message.strip_suffix("'?)")?;
        let start = rest.rfind(SUGGESTION_START)? + SUGGESTION_START.len();
        Some(&rest[start..]).filter(|s| !s.is_empty())
    }
}

/// How [`suggestion`] starts its text.
const SUGGESTION_START: &str = " (did you mean '";

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: error: {}", self.pos, self.message)
    }
}

/// YAML counts a lone carriage return as a line break, as it counts `\r\n`; lines are counted
/// the same way everywhere once both are plain `\n`.
pub(crate) fn normalize_newlines(source: &str) -> std::borrow::Cow<'_, str> {
    if source.contains('\r') {
        std::borrow::Cow::Owned(source.replace("\r\n", "\n").replace('\r', "\n"))
    } else {
        std::borrow::Cow::Borrowed(source)
    }
}

/// Keeps the first [`MAX_DIAGNOSTICS`] of sorted diagnostics and says how many more there were,
/// at the place of the first one left out.
pub(crate) fn cap(mut diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    if let Some(first_left_out) = diags.get(MAX_DIAGNOSTICS).map(|d| d.pos) {
        let more = diags.len() - MAX_DIAGNOSTICS;
        diags.truncate(MAX_DIAGNOSTICS);
        diags.push(Diagnostic::error(
            first_left_out,
            format!("and {more} more problems from here on; cib reports at most {MAX_DIAGNOSTICS} at once"),
        ));
    }
    diags
}

/// Suggests the closest of `candidates` to a misspelt `word`, if one is close enough.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // No name cib knows is this long, and comparing a hostile, very long word costs its length
    // for every candidate.
    if word.len() > 100 {
        return None;
    }
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// ` (did you mean 'x'?)` or nothing.
pub(crate) fn suggestion<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(word, candidates).map(|c| format!("{SUGGESTION_START}{c}'?)")).unwrap_or_default()
}
