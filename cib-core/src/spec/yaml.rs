//! A YAML document as a tree of nodes that remember where they came from.
//!
//! We build our own small tree from `saphyr-parser`'s events rather than deserialize straight
//! from text, for three reasons: every node keeps its line and column (so that every diagnostic
//! can point at the user's text), the deserializer in `de` can skip a broken node and go on
//! (so that one pass reports every mistake, not only the first), and aliases are shared rather
//! than copied (so that an alias bomb costs memory proportional to its text, and a budget on the
//! expanded size turns it into a diagnostic).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::diag::{Diagnostic, MAX_DIAGNOSTICS, Pos};

/// Index of a node in [`Tree::nodes`].
pub(crate) type NodeId = usize;

/// Nodes a document may expand to once aliases are followed; more is an alias bomb. Every node
/// counts as it is read and every alias counts its target's size as it is met, so a document
/// over the budget is refused there, before the parser has read the rest of it. Entries copied
/// by merge keys (`<<`) count against the same budget as they are copied, so that a chain of
/// merges stops as soon as it has done this much work.
pub(crate) const EXPANDED_NODE_BUDGET: u64 = 200_000;

/// Bytes of scalar text a document may expand to once aliases are followed, counted the same
/// way. The node budget alone would let a long scalar behind many aliases cost its length at
/// every use.
pub(crate) const EXPANDED_TEXT_BUDGET: u64 = 16 * 1024 * 1024;

/// Stands for "no node" in the tables indexed by anchor and by node.
const NONE: u32 = u32::MAX;

/// Longest key quoted in a message; a longer one is cut, so that a hostile key repeated through
/// aliases cannot make every diagnostic as long as itself.
const QUOTED_KEY_CHARS: usize = 60;

/// Nesting deeper than this is refused, so that recursion in the deserializer stays bounded.
const MAX_DEPTH: usize = 64;

/// A spec may define at most this many anchors. Real specs name a handful; a file of tens of
/// thousands costs the YAML parser's own anchor bookkeeping most of the 100 ms a hostile spec
/// may take, so it is refused at the first anchor over the limit instead of read to the end.
pub const MAX_ANCHORS: usize = 1000;

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

/// A hasher for keys that are already hashes: it passes the `u64` through.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed with it; folding bytes in keeps it correct for anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `text` for a message, cut to [`QUOTED_KEY_CHARS`] characters.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_KEY_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// Refuses the anchor that goes over [`MAX_ANCHORS`] (the parser numbers anchors from 1, in the
/// order they are written).
fn anchor_check(anchor: usize, span: &Span) -> Result<(), Diagnostic> {
    if anchor > MAX_ANCHORS {
        return Err(Diagnostic::error(
            pos(span),
            format!("more than {MAX_ANCHORS} anchors (`&name`): a spec needs a few; refusing it"),
        ));
    }
    Ok(())
}

fn budget_exceeded() -> Diagnostic {
    Diagnostic::error(
        Pos { line: 1, col: 1 },
        format!(
            "the document expands to more than {EXPANDED_NODE_BUDGET} values once aliases are followed; refusing it"
        ),
    )
}

fn text_budget_exceeded() -> Diagnostic {
    Diagnostic::error(
        Pos { line: 1, col: 1 },
        format!(
            "the document expands to more than {} MiB of text once aliases are followed; refusing it",
            EXPANDED_TEXT_BUDGET / (1024 * 1024)
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
    Map(MapFrame),
}

/// A mapping being read. Its keys are checked as they come, so that a text made of duplicate
/// keys reaches [`MAX_DIAGNOSTICS`] and stops early rather than after the parser read it all.
struct MapFrame {
    id: NodeId,
    anchor: usize,
    /// Its number in [`Builder::seen`].
    serial: u32,
    /// Entries with explicit keys, without duplicates, in document order.
    entries: Vec<(NodeId, NodeId)>,
    /// Values of merge keys (`<<`), with the number of entries written before each.
    merges: Vec<(usize, NodeId)>,
    pending_key: Option<NodeId>,
    /// The entries of [`Builder::seen`] this mapping replaced, to put back when it ends, so that
    /// the mapping it is nested in finds its own keys again.
    undo: Vec<(u32, (u32, Pos))>,
}

/// Parses `source` into a tree. A syntax error or a budget overrun ends parsing with a single
/// diagnostic; duplicate keys and other structural problems are collected and the tree is still
/// returned. Once [`MAX_DIAGNOSTICS`] of those are collected, parsing stops there, and the
/// collected ones are returned with a last one saying where reading stopped.
pub(crate) fn parse(source: &str) -> Result<(Tree, Vec<Diagnostic>), Vec<Diagnostic>> {
    // Room for about one node per eight bytes of text up front, so that a long document is not
    // copied again and again as the tables grow; memory that is reserved and never written
    // costs nothing.
    let room = (source.len() / 8).min(EXPANDED_NODE_BUDGET as usize);
    let mut builder = Builder {
        nodes: Vec::with_capacity(room),
        anchors: Vec::new(),
        diags: Vec::new(),
        stack: Vec::new(),
        root: None,
        documents: 0,
        merged: 0,
        expanded: (0, 0),
        symbols: HashMap::default(),
        symbol_hasher: RandomState::new(),
        symbol_next: Vec::new(),
        symbol_node: Vec::new(),
        symbol_of: Vec::new(),
        seen: Vec::new(),
        map_serial: 0,
        sizes: Vec::with_capacity(room),
    };
    for event in Parser::new_from_str(source) {
        let (event, span) = event.map_err(|e| {
            vec![Diagnostic::error(
                Pos {
                    line: u32::try_from(e.marker().line()).unwrap_or(u32::MAX).max(1),
                    col: u32::try_from(e.marker().col() + 1).unwrap_or(u32::MAX),
                },
                format!("invalid YAML: {}", e.info()),
            )]
        })?;
        builder.event(event, &span).map_err(|d| vec![d])?;
        // One place is kept for the diagnostic that says reading stopped.
        if builder.diags.len() >= MAX_DIAGNOSTICS - 1 {
            // A text this wrong is not a spec with a few mistakes; reading on would only
            // cost time and memory for messages no one reads.
            let mut diags = builder.diags;
            diags.push(Diagnostic::error(
                pos(&span),
                format!("stopped reading here: cib reports at most {MAX_DIAGNOSTICS} problems at once"),
            ));
            return Err(diags);
        }
    }
    let root = match builder.root {
        Some(root) => root,
        None => builder.push(Kind::Null, Pos { line: 1, col: 1 }).map_err(|d| vec![d])?,
    };
    let tree = Tree { nodes: builder.nodes, root };
    Ok((tree, builder.diags))
}

struct Builder {
    nodes: Vec<Node>,
    /// The node of each anchor, indexed by the parser's anchor number (numbered from 1 in
    /// order, so the table is as long as the number of anchors written).
    anchors: Vec<u32>,
    diags: Vec<Diagnostic>,
    stack: Vec<Frame>,
    root: Option<NodeId>,
    documents: usize,
    /// Entries visited by merge keys so far, counted against [`EXPANDED_NODE_BUDGET`].
    merged: u64,
    /// Nodes and bytes of scalar text read so far, aliases counted at their target's size,
    /// against [`EXPANDED_NODE_BUDGET`] and [`EXPANDED_TEXT_BUDGET`].
    expanded: (u64, u64),
    /// Each distinct key text gets a small number, so that checking keys costs a hash of a
    /// key's text once per node rather than once per use of the node through an alias.
    /// The table goes from the text's hash (keyed SipHash, computed once per key node, so
    /// that a hostile text cannot choose keys that collide) to the newest number with that
    /// hash; growing the table then costs no hashing of text again, and no text is copied.
    symbols: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    symbol_hasher: RandomState,
    /// For each key number, an older number whose text has the same hash ([`NONE`] if none).
    symbol_next: Vec<u32>,
    /// For each key number, a node holding its text.
    symbol_node: Vec<NodeId>,
    /// The number of each node's key text, indexed by node ([`NONE`] until asked).
    symbol_of: Vec<u32>,
    /// For each key number, the mapping (by [`Builder::map_serial`]) that last held it and
    /// where. Mappings are finished one at a time, so one table serves them all, and finding
    /// duplicate keys costs no hashing and nothing per mapping.
    seen: Vec<(u32, Pos)>,
    /// Counts the mappings finished, numbering them for [`Builder::seen`].
    map_serial: u32,
    /// For each finished node, how many nodes and bytes of scalar text it expands to once
    /// aliases are followed. An alias can only name a finished node, so a container's size is
    /// known the moment it ends, and an alias bomb is refused as soon as one of its levels
    /// goes over the budget rather than after the whole text is read.
    sizes: Vec<(u64, u64)>,
}

impl Builder {
    fn push(&mut self, kind: Kind, pos: Pos) -> Result<NodeId, Diagnostic> {
        let size = match &kind {
            Kind::Scalar { text, .. } => (1, text.len() as u64),
            _ => (1, 0),
        };
        self.charge(size)?;
        self.nodes.push(Node { kind, pos });
        self.sizes.push(size);
        Ok(self.nodes.len() - 1)
    }

    /// Counts nodes and text read (or reached through an alias) against the budgets, so that
    /// a document too big once expanded is refused as soon as it is, not once it is all read.
    fn charge(&mut self, (nodes, bytes): (u64, u64)) -> Result<(), Diagnostic> {
        self.expanded.0 = self.expanded.0.saturating_add(nodes);
        self.expanded.1 = self.expanded.1.saturating_add(bytes);
        if self.expanded.0 > EXPANDED_NODE_BUDGET {
            return Err(budget_exceeded());
        }
        if self.expanded.1 > EXPANDED_TEXT_BUDGET {
            return Err(text_budget_exceeded());
        }
        Ok(())
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
            return Err(text_budget_exceeded());
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
                anchor_check(anchor, span)?;
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
                let id = self.push(kind, at)?;
                self.remember(anchor, id);
                self.add(id)?;
            }
            Event::Alias(anchor) => match self.anchors.get(anchor).copied().filter(|&id| id != NONE) {
                Some(id) => {
                    let id = id as NodeId;
                    self.charge(self.sizes[id])?;
                    self.add(id)?;
                }
                None => return Err(Diagnostic::error(pos(span), "alias to an unknown anchor")),
            },
            Event::SequenceStart(anchor, tag) => {
                anchor_check(anchor, span)?;
                self.depth_check(span)?;
                self.check_tag(tag.as_deref(), span);
                let id = self.push(Kind::Seq(Vec::new()), pos(span))?;
                self.stack.push(Frame::Seq { id, anchor, items: Vec::new() });
            }
            Event::MappingStart(anchor, tag) => {
                anchor_check(anchor, span)?;
                self.depth_check(span)?;
                self.check_tag(tag.as_deref(), span);
                let id = self.push(Kind::Map(Vec::new()), pos(span))?;
                // Serial 0 stands for "no mapping" in `seen`, so mappings are numbered from 1.
                self.map_serial += 1;
                self.stack.push(Frame::Map(MapFrame {
                    id,
                    anchor,
                    serial: self.map_serial,
                    entries: Vec::new(),
                    merges: Vec::new(),
                    pending_key: None,
                    undo: Vec::new(),
                }));
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
                if let Some(Frame::Map(frame)) = self.stack.pop() {
                    let (id, anchor) = (frame.id, frame.anchor);
                    let entries = self.finish_map(frame)?;
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
            if self.anchors.len() <= anchor {
                self.anchors.resize(anchor + 1, NONE);
            }
            // A document has fewer nodes than bytes, and its size is limited far below u32.
            self.anchors[anchor] = u32::try_from(id).unwrap_or(NONE);
        }
    }

    /// Adds a finished node to its parent, or makes it the root.
    fn add(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        match self.stack.last_mut() {
            None => self.root = Some(id),
            Some(Frame::Seq { items, .. }) => items.push(id),
            Some(Frame::Map(frame)) => match frame.pending_key.take() {
                None => frame.pending_key = Some(id),
                Some(key) => self.entry(key, id),
            },
        }
        Ok(())
    }

    /// The number standing for a scalar key's text.
    fn symbol(&mut self, id: NodeId) -> Option<u32> {
        if let Some(&symbol) = self.symbol_of.get(id).filter(|&&s| s != NONE) {
            return Some(symbol);
        }
        let Kind::Scalar { text, .. } = &self.nodes[id].kind else { return None };
        let hash = self.symbol_hasher.hash_one(text.as_str());
        let newest = self.symbols.get(&hash).copied().unwrap_or(NONE);
        let mut candidate = newest;
        while candidate != NONE {
            if matches!(&self.nodes[self.symbol_node[candidate as usize]].kind, Kind::Scalar { text: t, .. } if t == text)
            {
                break;
            }
            candidate = self.symbol_next[candidate as usize];
        }
        let symbol = if candidate != NONE {
            candidate
        } else {
            let next = u32::try_from(self.symbol_node.len()).unwrap_or(NONE);
            self.symbols.insert(hash, next);
            self.symbol_next.push(newest);
            self.symbol_node.push(id);
            self.seen.push((0, Pos::default()));
            next
        };
        if self.symbol_of.len() <= id {
            self.symbol_of.resize(self.nodes.len(), NONE);
        }
        self.symbol_of[id] = symbol;
        Some(symbol)
    }

    /// Adds an entry to the mapping being read: a merge key is kept for [`Self::finish_map`],
    /// a key that is not a string or that the mapping already holds is reported and left out.
    fn entry(&mut self, key: NodeId, value: NodeId) {
        let key_pos = self.nodes[key].pos;
        let merge = match &self.nodes[key].kind {
            Kind::Scalar { text, plain } => *plain && text == "<<",
            Kind::Null => {
                self.diags.push(Diagnostic::error(key_pos, "a mapping key is empty"));
                return;
            }
            _ => {
                self.diags.push(Diagnostic::error(key_pos, "mapping keys must be plain strings"));
                return;
            }
        };
        let symbol = if merge { None } else { self.symbol(key) };
        let Some(Frame::Map(frame)) = self.stack.last_mut() else { return };
        let Some(symbol) = symbol else {
            frame.merges.push((frame.entries.len(), value));
            return;
        };
        let slot = &mut self.seen[symbol as usize];
        if slot.0 == frame.serial {
            let first = slot.1.line;
            let text = match &self.nodes[key].kind {
                Kind::Scalar { text, .. } => quoted(text),
                _ => String::new(),
            };
            self.diags
                .push(Diagnostic::error(key_pos, format!("duplicate key '{text}' (first defined at line {first})")));
            return;
        }
        frame.undo.push((symbol, *slot));
        *slot = (frame.serial, key_pos);
        frame.entries.push((key, value));
    }

    /// Checks keys and applies merge keys (`<<: *defaults`): explicit keys win over merged ones,
    /// and among several merged mappings the first one wins, as in YAML 1.1's merge key type.
    /// Every merged entry looked at counts against the expansion budget before it is copied.
    fn finish_map(&mut self, frame: MapFrame) -> Result<Vec<(NodeId, NodeId)>, Diagnostic> {
        let MapFrame { serial, entries: mut out, merges, mut undo, .. } = frame;
        let merged = self.merge(serial, &mut out, merges, &mut undo);
        // Put back what the mapping this one is nested in had marked, newest change first.
        for (symbol, old) in undo.into_iter().rev() {
            self.seen[symbol as usize] = old;
        }
        merged?;
        Ok(out)
    }

    /// Applies a mapping's merge keys to its entries `out`.
    fn merge(
        &mut self,
        serial: u32,
        out: &mut Vec<(NodeId, NodeId)>,
        merges: Vec<(usize, NodeId)>,
        undo: &mut Vec<(u32, (u32, Pos))>,
    ) -> Result<(), Diagnostic> {
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
                        && self.seen[symbol as usize].0 != serial
                    {
                        undo.push((symbol, self.seen[symbol as usize]));
                        self.seen[symbol as usize] = (serial, self.nodes[k].pos);
                        add.push((k, v));
                    }
                }
            }
            let n = add.len();
            let idx = (at + inserted).min(out.len());
            out.splice(idx..idx, add);
            inserted += n;
        }
        Ok(())
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
