//! A serde deserializer over [`Tree`] that reports every mistake in one pass.
//!
//! serde's derived code stops at the first error. To report all of them, deserialization runs in
//! rounds: each failing round names the node that failed, that node is recorded and then treated
//! as absent, and the next round goes on past it. Each round removes one node, so the number of
//! rounds is bounded by the number of mistakes (and by [`MAX_ROUNDS`]). A "missing field" that
//! only appears because its value was removed is not reported twice.
//!
//! Unknown keys are not errors that stop a round: the deserializer knows the struct's fields,
//! reports the key with a did-you-mean, and skips it. Keys starting with `x-` are skipped
//! silently, so that anchors have a home (as in Compose files).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

use super::diag::{Diagnostic, MAX_DIAGNOSTICS, Pos, suggestion};
use super::yaml::{Kind, NodeId, Tree};

/// The name by which [`super::Spanned`] asks this deserializer for a position.
pub(crate) const SPANNED: &str = "$cib::Spanned";
pub(crate) const SPANNED_FIELDS: &[&str] = &["$line", "$col", "$value"];

/// The name by which [`super::types::Keyed`] asks for the position of the key its value is
/// written under (`matrix:`), rather than of the value (which, for a block mapping, starts on
/// the next line).
pub(crate) const KEYED: &str = "$cib::Keyed";

/// The name by which [`super::types::Text`] asks for a scalar's text, whatever its type.
pub(crate) const TEXT: &str = "$cib::Text";

/// More rounds than this and the rest of the mistakes go unreported (the first ones are enough).
const MAX_ROUNDS: usize = 100;

/// More unknown keys than this and the rest are counted in one last diagnostic instead, which
/// makes [`MAX_DIAGNOSTICS`] in all.
const MAX_SOFT: usize = MAX_DIAGNOSTICS - 1;

#[derive(Debug)]
pub(crate) struct DeError {
    message: String,
    node: Option<NodeId>,
    missing: Option<&'static str>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

fn describe_unexpected(u: &de::Unexpected<'_>) -> String {
    match u {
        de::Unexpected::Map => "a mapping".into(),
        de::Unexpected::Seq => "a list".into(),
        de::Unexpected::Unit | de::Unexpected::Option => "nothing (null)".into(),
        de::Unexpected::Str(s) => format!("'{s}'"),
        de::Unexpected::Bool(b) => format!("the boolean {b}"),
        de::Unexpected::Unsigned(n) => format!("the number {n}"),
        de::Unexpected::Signed(n) => format!("the number {n}"),
        de::Unexpected::Float(n) => format!("the number {n}"),
        other => other.to_string(),
    }
}

/// How YAML 1.2's core schema reads a plain scalar that is not a string.
fn resolved(text: &str) -> de::Unexpected<'_> {
    match text {
        "true" | "True" | "TRUE" => de::Unexpected::Bool(true),
        "false" | "False" | "FALSE" => de::Unexpected::Bool(false),
        t => {
            if let Ok(n) = t.parse::<u64>() {
                de::Unexpected::Unsigned(n)
            } else if let Ok(n) = t.parse::<i64>() {
                de::Unexpected::Signed(n)
            } else if let Some(n) = t.parse::<f64>().ok().filter(|_| t.chars().any(|c| c.is_ascii_digit())) {
                de::Unexpected::Float(n)
            } else {
                de::Unexpected::Str(t)
            }
        }
    }
}

fn resolves_to_non_string(text: &str) -> bool {
    !matches!(resolved(text), de::Unexpected::Str(_))
}

fn describe_expected(e: &dyn de::Expected) -> String {
    let text = e.to_string();
    if text.starts_with("struct ") || text == "a map" {
        return "a mapping".into();
    }
    match text.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        _ => text,
    }
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError { message: msg.to_string(), node: None, missing: None }
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::custom(format!("expected {}, found {}", describe_expected(exp), describe_unexpected(&unexp)))
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::custom(format!("invalid value {}: expected {}", describe_unexpected(&unexp), describe_expected(exp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format!(
            "unknown value '{variant}', expected one of: {}{}",
            expected.join(", "),
            suggestion(variant, expected.iter().copied())
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format!("unknown key '{field}'{}", suggestion(field, expected.iter().copied())))
    }

    fn missing_field(field: &'static str) -> Self {
        DeError { message: format!("missing key '{field}'"), node: None, missing: Some(field) }
    }
}

impl DeError {
    fn at(mut self, node: NodeId) -> Self {
        self.node.get_or_insert(node);
        self
    }
}

trait At<T> {
    fn at(self, node: NodeId) -> Result<T, DeError>;
}

impl<T> At<T> for Result<T, DeError> {
    fn at(self, node: NodeId) -> Result<T, DeError> {
        self.map_err(|e| e.at(node))
    }
}

struct Ctx<'t> {
    tree: &'t Tree,
    removed: HashSet<NodeId>,
    /// Problems that do not stop a round (unknown keys), kept across rounds without repeats.
    soft: RefCell<BTreeSet<Diagnostic>>,
    /// Key nodes already reported as unknown, or counted in `left_out`, indexed by node.
    reported: RefCell<Vec<bool>>,
    /// Unknown keys past [`MAX_SOFT`], and where the first of them is.
    left_out: Cell<(usize, Pos)>,
}

/// Deserializes `tree` as a `T`, returning every diagnostic found on the way, and the value
/// built once the broken nodes were left out (`None` when even the root could not be built).
pub(crate) fn from_tree<T: DeserializeOwned>(tree: &Tree) -> (Option<T>, Vec<Diagnostic>) {
    let mut ctx = Ctx {
        tree,
        removed: HashSet::new(),
        soft: RefCell::new(BTreeSet::new()),
        reported: RefCell::new(vec![false; tree.nodes.len()]),
        left_out: Cell::new((0, Pos::default())),
    };
    let mut hard: Vec<Diagnostic> = Vec::new();
    let mut value = None;
    for _ in 0..MAX_ROUNDS {
        match T::deserialize(NodeDe { ctx: &ctx, id: tree.root, key: None }) {
            Ok(v) => {
                value = Some(v);
                break;
            }
            Err(e) => {
                let node = e.node.unwrap_or(tree.root);
                let suppressed = e.missing.is_some_and(|field| ctx.missing_because_removed(node, field));
                if !suppressed {
                    hard.push(Diagnostic::error(tree.node(node).pos, e.message));
                }
                if node == tree.root || !ctx.removed.insert(node) {
                    break;
                }
            }
        }
    }
    let mut all: Vec<Diagnostic> = ctx.soft.into_inner().into_iter().collect();
    if let (left_out @ 1.., first) = ctx.left_out.get() {
        all.push(Diagnostic::error(
            first,
            format!(
                "and {left_out} more unknown keys from here on; cib reports at most {MAX_DIAGNOSTICS} problems at once"
            ),
        ));
    }
    all.extend(hard);
    all.sort();
    all.dedup();
    // The value may have had broken nodes removed; callers decide what a partial value is worth.
    (value, all)
}

impl Ctx<'_> {
    fn missing_because_removed(&self, map: NodeId, field: &str) -> bool {
        match &self.tree.node(map).kind {
            Kind::Map(entries) => {
                entries.iter().any(|(k, v)| self.tree.text(*k) == Some(field) && self.removed.contains(v))
            }
            _ => false,
        }
    }

    fn pos(&self, id: NodeId) -> Pos {
        self.tree.node(id).pos
    }
}

#[derive(Clone, Copy)]
struct NodeDe<'c, 't> {
    ctx: &'c Ctx<'t>,
    id: NodeId,
    /// The key this node is the value of, when it is a mapping's value.
    key: Option<NodeId>,
}

impl<'c, 't> NodeDe<'c, 't> {
    fn kind(&self) -> &'t Kind {
        &self.ctx.tree.node(self.id).kind
    }

    fn unexpected(&self) -> de::Unexpected<'t> {
        match self.kind() {
            Kind::Null => de::Unexpected::Unit,
            Kind::Scalar { text, plain: true } => resolved(text),
            Kind::Scalar { text, plain: false } => de::Unexpected::Str(text),
            Kind::Seq(_) => de::Unexpected::Seq,
            Kind::Map(_) => de::Unexpected::Map,
        }
    }

    fn type_error(&self, exp: &dyn de::Expected) -> DeError {
        <DeError as de::Error>::invalid_type(self.unexpected(), exp).at(self.id)
    }

    fn scalar(&self) -> Option<(&'t str, bool)> {
        match self.kind() {
            Kind::Scalar { text, plain } => Some((text, *plain)),
            _ => None,
        }
    }

    fn seq_access(&self, items: &'t [NodeId]) -> SeqAcc<'c, 't> {
        SeqAcc { ctx: self.ctx, items: items.iter(), current: None }
    }

    fn map_access(&self, entries: &'t [(NodeId, NodeId)], fields: Option<&'static [&'static str]>) -> MapAcc<'c, 't> {
        MapAcc { ctx: self.ctx, entries: entries.iter(), fields, value: None, key: None }
    }

    fn parse_number<T: std::str::FromStr>(&self, exp: &dyn de::Expected) -> Result<T, DeError> {
        match self.scalar() {
            Some((text, _)) => text.trim().replace('_', "").parse::<T>().map_err(|_| self.type_error(exp)),
            None => Err(self.type_error(exp)),
        }
    }
}

struct Expecting(&'static str);

impl de::Expected for Expecting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

macro_rules! number {
    ($method:ident, $visit:ident, $ty:ty, $what:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let n: $ty = self.parse_number(&Expecting($what))?;
            visitor.$visit(n).at(self.id)
        }
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match self.kind() {
            Kind::Null => visitor.visit_unit(),
            Kind::Scalar { text, plain: false } => visitor.visit_str(text),
            Kind::Scalar { text, plain: true } => match resolved(text) {
                de::Unexpected::Bool(b) => visitor.visit_bool(b),
                de::Unexpected::Unsigned(n) => visitor.visit_u64(n),
                de::Unexpected::Signed(n) => visitor.visit_i64(n),
                de::Unexpected::Float(n) => visitor.visit_f64(n),
                _ => visitor.visit_str(text),
            },
            Kind::Seq(items) => visitor.visit_seq(self.seq_access(items)),
            Kind::Map(entries) => visitor.visit_map(self.map_access(entries, None)),
        };
        result.at(self.id)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // YAML 1.2 booleans only: `yes`, `on` and friends are strings, never silently true.
        match self.scalar() {
            Some(("true" | "True" | "TRUE", true)) => visitor.visit_bool(true).at(self.id),
            Some(("false" | "False" | "FALSE", true)) => visitor.visit_bool(false).at(self.id),
            _ => Err(self.type_error(&Expecting("a boolean (true or false)"))),
        }
    }

    number!(deserialize_u8, visit_u8, u8, "a whole number from 0 to 255");
    number!(deserialize_u16, visit_u16, u16, "a whole number from 0 to 65535");
    number!(deserialize_u32, visit_u32, u32, "a whole number (0 or more)");
    number!(deserialize_u64, visit_u64, u64, "a whole number (0 or more)");
    number!(deserialize_i8, visit_i8, i8, "a whole number");
    number!(deserialize_i16, visit_i16, i16, "a whole number");
    number!(deserialize_i32, visit_i32, i32, "a whole number");
    number!(deserialize_i64, visit_i64, i64, "a whole number");
    number!(deserialize_f32, visit_f32, f32, "a number");
    number!(deserialize_f64, visit_f64, f64, "a number");

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // A plain `true` or `3` is a boolean or a number, as the schema (and every other YAML
        // reader) sees it; asking for quotes keeps the reader exactly as strict as the schema.
        match self.scalar() {
            Some((text, true)) if resolves_to_non_string(text) => Err(<DeError as de::Error>::custom(format!(
                "expected a string, found {}: put it in quotes, like \"{text}\"",
                describe_unexpected(&resolved(text))
            ))
            .at(self.id)),
            Some((text, _)) => visitor.visit_str(text).at(self.id),
            None => Err(self.type_error(&Expecting("a string"))),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.kind() {
            Kind::Null => visitor.visit_none().at(self.id),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.kind() {
            Kind::Null => visitor.visit_unit().at(self.id),
            _ => Err(self.type_error(&Expecting("nothing (null)"))),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        if name == TEXT {
            // Values that are text whatever they look like (environment values, commands).
            return match self.scalar() {
                Some((text, _)) => visitor.visit_str(text).at(self.id),
                None => Err(self.type_error(&Expecting("a string, number or boolean"))),
            };
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.kind() {
            Kind::Seq(items) => visitor.visit_seq(self.seq_access(items)).at(self.id),
            _ => Err(self.type_error(&Expecting("a list"))),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.kind() {
            Kind::Map(entries) => visitor.visit_map(self.map_access(entries, None)).at(self.id),
            _ => Err(self.type_error(&Expecting("a mapping"))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == SPANNED {
            let pos = self.ctx.pos(self.id);
            return visitor.visit_map(SpannedAcc { de: self, pos, step: 0 });
        }
        if name == KEYED {
            let pos = self.ctx.pos(self.key.unwrap_or(self.id));
            return visitor.visit_map(SpannedAcc { de: self, pos, step: 0 });
        }
        match self.kind() {
            Kind::Map(entries) => visitor.visit_map(self.map_access(entries, Some(fields))).at(self.id),
            // A struct that has a shorthand (`ready: pg_isready`) accepts a string through
            // `visit_str`; derived structs refuse it with a type error, which is what we want.
            Kind::Scalar { text, .. } => visitor.visit_str(text).at(self.id),
            _ => Err(self.type_error(&Expecting("a mapping"))),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.kind() {
            Kind::Scalar { text, .. } => visitor.visit_enum(text.as_str().into_deserializer()).at(self.id),
            Kind::Map(entries) if entries.len() == 1 => {
                let (key, value) = entries[0];
                visitor.visit_enum(EnumAcc { ctx: self.ctx, key, value }).at(self.id)
            }
            Kind::Map(entries) if entries.is_empty() => {
                Err(<DeError as de::Error>::custom(format!("expected one of: {}", variants.join(", "))).at(self.id))
            }
            Kind::Map(entries) => Err(<DeError as de::Error>::custom(format!(
                "expected exactly one of: {} (found {} keys)",
                variants.join(", "),
                entries.len()
            ))
            .at(self.id)),
            _ => Err(<DeError as de::Error>::custom(format!("expected one of: {}", variants.join(", "))).at(self.id)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqAcc<'c, 't> {
    ctx: &'c Ctx<'t>,
    items: std::slice::Iter<'t, NodeId>,
    current: Option<NodeId>,
}

impl<'de> de::SeqAccess<'de> for SeqAcc<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        for &item in self.items.by_ref() {
            if self.ctx.removed.contains(&item) {
                continue;
            }
            self.current = Some(item);
            return seed.deserialize(NodeDe { ctx: self.ctx, id: item, key: None }).at(item).map(Some);
        }
        Ok(None)
    }
}

struct MapAcc<'c, 't> {
    ctx: &'c Ctx<'t>,
    entries: std::slice::Iter<'t, (NodeId, NodeId)>,
    /// The struct's fields, when deserializing a struct: other keys are reported and skipped.
    fields: Option<&'static [&'static str]>,
    value: Option<NodeId>,
    key: Option<NodeId>,
}

impl<'de> de::MapAccess<'de> for MapAcc<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        for &(key, value) in self.entries.by_ref() {
            if self.ctx.removed.contains(&value) {
                continue;
            }
            let text = self.ctx.tree.text(key).unwrap_or_default();
            if let Some(fields) = self.fields
                && !fields.contains(&text)
            {
                // Each unknown key is reported once, whatever the rounds and aliases, and past
                // MAX_SOFT of them the rest are only counted: a did-you-mean for each of a
                // hundred thousand keys would cost seconds and help no one.
                if !text.starts_with("x-") && !std::mem::replace(&mut self.ctx.reported.borrow_mut()[key], true) {
                    if self.ctx.soft.borrow().len() < MAX_SOFT {
                        let message = format!("unknown key '{text}'{}", suggestion(text, fields.iter().copied()));
                        self.ctx.soft.borrow_mut().insert(Diagnostic::error(self.ctx.pos(key), message));
                    } else {
                        let (n, first) = self.ctx.left_out.get();
                        self.ctx.left_out.set((n + 1, if n == 0 { self.ctx.pos(key) } else { first }));
                    }
                }
                continue;
            }
            self.value = Some(value);
            self.key = Some(key);
            // Keys go through the node deserializer too, so that `Spanned<String>` keys know
            // where they stand.
            return seed.deserialize(NodeDe { ctx: self.ctx, id: key, key: None }).at(key).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let value = self.value.take().ok_or_else(|| <DeError as de::Error>::custom("value asked before key"))?;
        seed.deserialize(NodeDe { ctx: self.ctx, id: value, key: self.key.take() }).at(value)
    }
}

struct EnumAcc<'c, 't> {
    ctx: &'c Ctx<'t>,
    key: NodeId,
    value: NodeId,
}

impl<'de, 'c, 't> de::EnumAccess<'de> for EnumAcc<'c, 't> {
    type Error = DeError;
    type Variant = NodeDe<'c, 't>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), DeError> {
        let text = self.ctx.tree.text(self.key).unwrap_or_default();
        let key_de: de::value::StrDeserializer<'_, DeError> = text.into_deserializer();
        let v = seed.deserialize(key_de).at(self.key)?;
        Ok((v, NodeDe { ctx: self.ctx, id: self.value, key: Some(self.key) }))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'_, '_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.kind() {
            Kind::Null => Ok(()),
            _ => Err(self.type_error(&Expecting("nothing (null)"))),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self).at(self.id)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

/// Feeds a [`super::Spanned`] its position, then its value.
struct SpannedAcc<'c, 't> {
    de: NodeDe<'c, 't>,
    pos: Pos,
    step: u8,
}

impl<'de> de::MapAccess<'de> for SpannedAcc<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(&name) = SPANNED_FIELDS.get(usize::from(self.step)) else {
            return Ok(None);
        };
        let key_de: de::value::StrDeserializer<'_, DeError> = name.into_deserializer();
        seed.deserialize(key_de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let step = self.step;
        self.step += 1;
        match step {
            0 => seed.deserialize(self.pos.line.into_deserializer()),
            1 => seed.deserialize(self.pos.col.into_deserializer()),
            _ => seed.deserialize(self.de),
        }
    }
}
