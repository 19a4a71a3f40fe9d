//! Terminal colours in logs, as styled spans: SGR sequences (`ESC [ … m`) become classes
//! (`f1`…`f15` for the foreground, `g1`…`g15` for the background, `b`, `i`, `u`, `dim`), every other escape
//! sequence and control byte is dropped, and all text is HTML-escaped by maud. No byte of an
//! escape reaches the page, and no text of the log can become markup.

use maud::{Markup, html};

/// The style in force at a point of a line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
}

impl Style {
    fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(f) = self.fg {
            c.push(format!("f{f}"));
        }
        if let Some(b) = self.bg {
            c.push(format!("g{b}"));
        }
        if self.bold {
            c.push("b".into());
        }
        if self.dim {
            c.push("dim".into());
        }
        if self.italic {
            c.push("i".into());
        }
        if self.underline {
            c.push("u".into());
        }
        c.join(" ")
    }

    fn apply(&mut self, params: &str) {
        let codes: Vec<u16> =
            if params.is_empty() { vec![0] } else { params.split(';').map(|p| p.parse().unwrap_or(0)).collect() };
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                c @ 30..=37 => self.fg = Some((c - 30) as u8),
                39 => self.fg = None,
                c @ 40..=47 => self.bg = Some((c - 40) as u8),
                49 => self.bg = None,
                c @ 90..=97 => self.fg = Some((c - 90 + 8) as u8),
                c @ 100..=107 => self.bg = Some((c - 100 + 8) as u8),
                // 256-colour and true-colour forms: the first 16 map onto the palette, the
                // rest are skipped with their arguments rather than misread as other codes.
                38 | 48 => {
                    let fg = codes[i] == 38;
                    match codes.get(i + 1) {
                        Some(5) => {
                            let n = codes.get(i + 2).copied().unwrap_or(0);
                            let colour = (n < 16).then_some(n as u8);
                            if fg {
                                self.fg = colour;
                            } else {
                                self.bg = colour;
                            }
                            i += 2;
                        }
                        // A true colour has no place in the palette: the default is shown.
                        Some(2) => {
                            if fg {
                                self.fg = None;
                            } else {
                                self.bg = None;
                            }
                            i += 4;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// Splits one line of a log (no newline) into runs of text with their style, the escapes
/// removed.
fn runs(line: &str) -> Vec<(Style, String)> {
    let mut out: Vec<(Style, String)> = Vec::new();
    let mut style = Style::default();
    let mut text = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                match chars.peek() {
                    Some('[') => {
                        chars.next();
                        let mut params = String::new();
                        let mut last = None;
                        for p in chars.by_ref() {
                            if ('\u{40}'..='\u{7e}').contains(&p) {
                                last = Some(p);
                                break;
                            }
                            params.push(p);
                        }
                        if last == Some('m') {
                            if !text.is_empty() {
                                out.push((style, std::mem::take(&mut text)));
                            }
                            style.apply(&params);
                        }
                    }
                    // Operating system commands (titles, hyperlinks) end at BEL or ESC \.
                    Some(']') => {
                        chars.next();
                        while let Some(p) = chars.next() {
                            if p == '\u{7}' {
                                break;
                            }
                            if p == '\u{1b}' {
                                chars.next();
                                break;
                            }
                        }
                    }
                    _ => {
                        chars.next();
                    }
                }
            }
            '\t' => text.push('\t'),
            // A carriage return inside a line (progress bars) shows what was written last.
            '\r' => {
                if chars.peek().is_some() {
                    text.clear();
                    out.clear();
                }
            }
            c if c.is_control() => {}
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push((style, text));
    }
    out
}

/// One line of a log as markup.
pub fn line(text: &str) -> Markup {
    html! {
        @for (style, run) in runs(text) {
            @if style == Style::default() {
                (run)
            } @else {
                span class=(style.classes()) { (run) }
            }
        }
    }
}

/// The line's text without its escapes, for searching.
pub fn plain(text: &str) -> String {
    runs(text).into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_spans_and_markup_stays_text() {
        let out = line("\u{1b}[1;31merror\u{1b}[0m: <script>alert(1)</script> & more").into_string();
        assert_eq!(out, "<span class=\"f1 b\">error</span>: &lt;script&gt;alert(1)&lt;/script&gt; &amp; more");
        assert!(!out.contains('\u{1b}'));
    }

    #[test]
    fn other_escapes_and_controls_are_dropped() {
        let out = line("a\u{1b}[2Kb\u{1b}]0;title\u{7}c\u{0}d\u{1b}[38;5;2me\u{1b}[38;2;1;2;3mf").into_string();
        assert_eq!(out, "abcd<span class=\"f2\">e</span>f");
        assert_eq!(plain("\u{1b}[32mok\u{1b}[0m done"), "ok done");
        assert_eq!(plain("10%\r50%\r100%"), "100%");
    }
}
