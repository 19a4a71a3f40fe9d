//! A YAML document as a tree of nodes that remember where they came from.
//!
//! We build our own small tree from `saphyr-parser`'s events rather than deserialize straight
//! from text, for three reasons: every node keeps its line and column (so that every diagnostic
//! can point at the user's text), the deserializer in `de` can skip a broken node and go on
//! (so that one pass reports every mistake, not only the first), and aliases are shared rather
//! than copied (so that an alias bomb costs memory proportional to its text, and a budget on the
//! expanded size turns it into a diagnostic).

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::diag::{Diagnostic, Pos};

/// Index of a node in [`Tree::nodes`].
pub(crate) type NodeId = usize;

/// Nodes a document may expand to once aliases are followed; more is an alias bomb. Entries
/// copied by merge keys (`<<`) count against the same budget as they are copied, so that a
/// chain of merges stops as soon as it has done this much work.
pub(crate) const EXPANDED_NODE_BUDGET: u64 = 200_000;

/// Bytes of scalar text a document may expand to once aliases are followed. The node budget
/// alone would let a long scalar behind many aliases cost its length at every use.
pub(crate) const EXPANDED_TEXT_BUDGET: u64 = 16 * 1024 * 1024;

/// Longest key quoted in a message; a longer one is cut, so that a hostile key repeated through
/// aliases cannot make every diagnostic as long as itself.
const QUOTED_KEY_CHARS: usize = 60;

/// Nesting deeper than this is refused, so that recursion in the deserializer stays bounded.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// An explicit or implicit null (`~`, `null`, or nothing at all).
    Null,
    /// A scalar with its text; `plain` scalars may be resolved as booleans or numbers.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<NodeId>),
    /// Entries in document order, merge keys (`<<`) already applied.
    Map(Vec<(NodeId, NodeId)>),
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

/// A parsed YAML document.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

impl Tree {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// The text of a scalar node, if it is one.
    pub fn text(&self, id: NodeId) -> Option<&str> {
        match &self.nodes[id].kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
}

/// `text` for a message, cut to [`QUOTED_KEY_CHARS`] characters.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_KEY_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

fn budget_exceeded() -> Diagnostic {
    Diagnostic::error(
        Pos { line: 1, col: 1 },
        format!(
            "the document expands to more than {EXPANDED_NODE_BUDGET} values once aliases are followed; refusing it"
        ),
    )
}

fn pos(span: &Span) -> Pos {
    Pos {
        line: u32::try_from(span.start.line()).unwrap_or(u32::MAX),
        col: u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
    }
}

enum Frame {
    Seq { id: NodeId, anchor: usize, items: Vec<NodeId> },
    Map { id: NodeId, anchor: usize, entries: Vec<(NodeId, NodeId)>, pending_key: Option<NodeId> },
}

/// Parses `source` into a tree. A syntax error ends parsing with a single diagnostic; duplicate
/// keys and other structural problems are collected and the tree is still returned.
pub(crate) fn parse(source: &str) -> Result<(Tree, Vec<Diagnostic>), Diagnostic> {
    let mut builder = Builder {
        nodes: Vec::new(),
        anchors: HashMap::new(),
        diags: Vec::new(),
        stack: Vec::new(),
        root: None,
        documents: 0,
        merged: 0,
        symbols: HashMap::new(),
        symbol_of: HashMap::new(),
        sizes: Vec::new(),
    };
    for event in Parser::new_from_str(source) {
        let (event, span) = event.map_err(|e| {
            Diagnostic::error(
                Pos {
                    line: u32::try_from(e.marker().line()).unwrap_or(u32::MAX).max(1),
                    col: u32::try_from(e.marker().col() + 1).unwrap_or(u32::MAX),
                },
                format!("invalid YAML: {}", e.info()),
            )
        })?;
        builder.event(event, &span)?;
    }
    let root = match builder.root {
        Some(root) => root,
        None => builder.push(Kind::Null, Pos { line: 1, col: 1 }),
    };
    let tree = Tree { nodes: builder.nodes, root };
    Ok((tree, builder.diags))
}

struct Builder {
    nodes: Vec<Node>,
    anchors: HashMap<usize, NodeId>,
    diags: Vec<Diagnostic>,
    stack: Vec<Frame>,
    root: Option<NodeId>,
    documents: usize,
    /// Entries visited by merge keys so far, counted against [`EXPANDED_NODE_BUDGET`].
    merged: u64,
    /// Each distinct key text gets a small number, so that checking keys costs a hash of a
    /// key's text once per node rather than once per use of the node through an alias.
    symbols: HashMap<String, u32>,
    symbol_of: HashMap<NodeId, u32>,
    /// For each finished node, how many nodes and bytes of scalar text it expands to once
    /// aliases are followed. An alias can only name a finished node, so a container's size is
    /// known the moment it ends, and an alias bomb is refused as soon as one of its levels
    /// goes over the budget rather than after the whole text is read.
    sizes: Vec<(u64, u64)>,
}

impl Builder {
    fn push(&mut self, kind: Kind, pos: Pos) -> NodeId {
        let size = match &kind {
            Kind::Scalar { text, .. } => (1, text.len() as u64),
            _ => (1, 0),
        };
        self.nodes.push(Node { kind, pos });
        self.sizes.push(size);
        self.nodes.len() - 1
    }

    /// Computes a finished container's expanded size from its children's, and refuses the
    /// document once it is over either budget.
    fn check_size(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        let children: &mut dyn Iterator<Item = NodeId> = match &self.nodes[id].kind {
            Kind::Seq(items) => &mut items.iter().copied(),
            Kind::Map(entries) => &mut entries.iter().flat_map(|(k, v)| [*k, *v]),
            Kind::Scalar { .. } | Kind::Null => &mut std::iter::empty(),
        };
        let (mut nodes, mut bytes) = self.sizes[id];
        for c in children {
            let (n, b) = self.sizes[c];
            nodes = nodes.saturating_add(n);
            bytes = bytes.saturating_add(b);
        }
        self.sizes[id] = (nodes, bytes);
        if nodes > EXPANDED_NODE_BUDGET {
            return Err(budget_exceeded());
        }
        if bytes > EXPANDED_TEXT_BUDGET {
            return Err(Diagnostic::error(
                Pos { line: 1, col: 1 },
                format!(
                    "the document expands to more than {} MiB of text once aliases are followed; refusing it",
                    EXPANDED_TEXT_BUDGET / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    fn event(&mut self, event: Event<'_>, span: &Span) -> Result<(), Diagnostic> {
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(Diagnostic::error(
                        pos(span),
                        "a spec holds one YAML document; found a second one here",
                    ));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let at = pos(span);
                let mut plain = style == ScalarStyle::Plain;
                if let Some(tag) = tag {
                    if tag.is_yaml_core_schema() && tag.suffix == "str" {
                        plain = false;
                    } else {
                        self.check_tag(Some(&tag), span);
                    }
                }
                let kind = if plain && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Kind::Null
                } else {
                    Kind::Scalar { text: text.into_owned(), plain }
                };
                let id = self.push(kind, at);
                self.remember(anchor, id);
                self.add(id)?;
            }
            Event::Alias(anchor) => match self.anchors.get(&anchor) {
                Some(&id) => self.add(id)?,
                None => return Err(Diagnostic::error(pos(span), "alias to an unknown anchor")),
            },
            Event::SequenceStart(anchor, tag) => {
                self.depth_check(span)?;
                self.check_tag(tag.as_deref(), span);
                let id = self.push(Kind::Seq(Vec::new()), pos(span));
                self.stack.push(Frame::Seq { id, anchor, items: Vec::new() });
            }
            Event::MappingStart(anchor, tag) => {
                self.depth_check(span)?;
                self.check_tag(tag.as_deref(), span);
                let id = self.push(Kind::Map(Vec::new()), pos(span));
                self.stack.push(Frame::Map { id, anchor, entries: Vec::new(), pending_key: None });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { id, anchor, items }) = self.stack.pop() {
                    self.nodes[id].kind = Kind::Seq(items);
                    self.check_size(id)?;
                    self.remember(anchor, id);
                    self.add(id)?;
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { id, anchor, entries, .. }) = self.stack.pop() {
                    let entries = self.finish_map(entries)?;
                    self.nodes[id].kind = Kind::Map(entries);
                    self.check_size(id)?;
                    self.remember(anchor, id);
                    self.add(id)?;
                }
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    /// Custom tags (GitLab's `!reference`, say) mean nothing to cib; core tags are harmless.
    fn check_tag(&mut self, tag: Option<&saphyr_parser::Tag>, span: &Span) {
        if let Some(tag) = tag.filter(|t| !t.is_yaml_core_schema()) {
            self.diags.push(Diagnostic::error(pos(span), format!("YAML tags such as '{tag}' are not supported here")));
        }
    }

    fn depth_check(&self, span: &Span) -> Result<(), Diagnostic> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Diagnostic::error(pos(span), format!("the document nests deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, id: NodeId) {
        if anchor != 0 {
            self.anchors.insert(anchor, id);
        }
    }

    /// Adds a finished node to its parent, or makes it the root.
    fn add(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        match self.stack.last_mut() {
            None => self.root = Some(id),
            Some(Frame::Seq { items, .. }) => items.push(id),
            Some(Frame::Map { entries, pending_key, .. }) => match pending_key.take() {
                None => *pending_key = Some(id),
                Some(key) => entries.push((key, id)),
            },
        }
        Ok(())
    }

    /// The number standing for a scalar key's text.
    fn symbol(&mut self, id: NodeId) -> Option<u32> {
        if let Some(&symbol) = self.symbol_of.get(&id) {
            return Some(symbol);
        }
        let Kind::Scalar { text, .. } = &self.nodes[id].kind else { return None };
        let next = u32::try_from(self.symbols.len()).unwrap_or(u32::MAX);
        let symbol = match self.symbols.get(text.as_str()) {
            Some(&symbol) => symbol,
            None => {
                self.symbols.insert(text.clone(), next);
                next
            }
        };
        self.symbol_of.insert(id, symbol);
        Some(symbol)
    }

    /// Checks keys and applies merge keys (`<<: *defaults`): explicit keys win over merged ones,
    /// and among several merged mappings the first one wins, as in YAML 1.1's merge key type.
    /// Every merged entry looked at counts against the expansion budget before it is copied.
    fn finish_map(&mut self, entries: Vec<(NodeId, NodeId)>) -> Result<Vec<(NodeId, NodeId)>, Diagnostic> {
        let mut out: Vec<(NodeId, NodeId)> = Vec::with_capacity(entries.len());
        let mut seen: HashMap<u32, Pos> = HashMap::new();
        let mut merges: Vec<(usize, NodeId)> = Vec::new();
        for (key, value) in entries {
            let key_node = &self.nodes[key];
            let key_pos = key_node.pos;
            match &key_node.kind {
                Kind::Scalar { text, plain } => {
                    if *plain && text == "<<" {
                        merges.push((out.len(), value));
                        continue;
                    }
                }
                Kind::Null => {
                    self.diags.push(Diagnostic::error(key_pos, "a mapping key is empty"));
                    continue;
                }
                _ => {
                    self.diags.push(Diagnostic::error(key_pos, "mapping keys must be plain strings"));
                    continue;
                }
            }
            let Some(symbol) = self.symbol(key) else { continue };
            if let Some(first) = seen.get(&symbol) {
                let text = quoted(self.text(key).unwrap_or_default());
                self.diags.push(Diagnostic::error(
                    key_pos,
                    format!("duplicate key '{text}' (first defined at line {})", first.line),
                ));
                continue;
            }
            seen.insert(symbol, key_pos);
            out.push((key, value));
        }
        // Merged entries go where the `<<` key stood, so that order stays what the reader sees.
        let mut inserted = 0;
        for (at, source) in merges {
            let sources: Vec<NodeId> = match &self.nodes[source].kind {
                Kind::Map(_) => vec![source],
                Kind::Seq(items) => items.clone(),
                _ => {
                    self.diags.push(Diagnostic::error(
                        self.nodes[source].pos,
                        "a merge key ('<<') takes a mapping or a list of mappings",
                    ));
                    continue;
                }
            };
            let mut add = Vec::new();
            for s in sources {
                let Kind::Map(merged) = &self.nodes[s].kind else {
                    self.diags.push(Diagnostic::error(
                        self.nodes[s].pos,
                        "a merge key ('<<') takes a mapping or a list of mappings",
                    ));
                    continue;
                };
                // The entries are cloned (they are node ids, not nodes) so that keys can be
                // numbered while walking them; the budget is charged first, so the clone and
                // the walk are bounded by it.
                self.merged = self.merged.saturating_add(1 + merged.len() as u64);
                if self.merged > EXPANDED_NODE_BUDGET {
                    return Err(budget_exceeded());
                }
                for (k, v) in merged.clone() {
                    if let Some(symbol) = self.symbol(k)
                        && !seen.contains_key(&symbol)
                    {
                        seen.insert(symbol, self.nodes[k].pos);
                        add.push((k, v));
                    }
                }
            }
            let n = add.len();
            let idx = (at + inserted).min(out.len());
            out.splice(idx..idx, add);
            inserted += n;
        }
        Ok(out)
    }

    fn text(&self, id: NodeId) -> Option<&str> {
        match &self.nodes[id].kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
}

/// The tree as JSON, resolving plain scalars by YAML 1.2's core schema.
pub(crate) fn to_json(tree: &Tree) -> serde_json::Value {
    use serde_json::Value;
    fn go(tree: &Tree, id: NodeId) -> Value {
        match &tree.node(id).kind {
            Kind::Null => Value::Null,
            Kind::Scalar { text, plain: false } => Value::String(text.clone()),
            Kind::Scalar { text, plain: true } => match text.as_str() {
                "true" | "True" | "TRUE" => Value::Bool(true),
                "false" | "False" | "FALSE" => Value::Bool(false),
                t => {
                    if let Ok(n) = t.parse::<i64>() {
                        Value::from(n)
                    } else if let Ok(n) = t.parse::<u64>() {
                        Value::from(n)
                    } else if let Some(n) =
                        t.parse::<f64>().ok().filter(|n| n.is_finite() && t.chars().any(|c| c.is_ascii_digit()))
                    {
                        Value::from(n)
                    } else {
                        Value::String(t.to_owned())
                    }
                }
            },
            Kind::Seq(items) => Value::Array(items.iter().map(|i| go(tree, *i)).collect()),
            Kind::Map(entries) => Value::Object(
                entries.iter().map(|(k, v)| (tree.text(*k).unwrap_or_default().to_owned(), go(tree, *v))).collect(),
            ),
        }
    }
    go(tree, tree.root)
}
