//! Small value types of the spec that check their own text when read: positions, durations,
//! globs, cron expressions, memory sizes, commands and environment values.
//!
//! A value that does not parse fails its own deserialization with a message saying what was
//! expected; the deserializer in `de` attaches the value's line and column to that message.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::{Serialize, Serializer};

use super::de::{KEYED, SPANNED, SPANNED_FIELDS, TEXT};
use super::diag::Pos;

/// A value with the position it was read from, so that later checks can point at it.
///
/// Equality, ordering and hashing look at the value only.
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    pub pos: Pos,
    pub value: T,
}

impl<T> Spanned<T> {
    pub fn new(pos: Pos, value: T) -> Self {
        Spanned { pos, value }
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl<T: Eq> Eq for Spanned<T> {}
impl<T: Hash> Hash for Spanned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value.hash(state);
    }
}
impl<T: PartialOrd> PartialOrd for Spanned<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.value.partial_cmp(&other.value)
    }
}
impl<T: Ord> Ord for Spanned<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

/// Reads a position (`$line`, `$col`) and then the value, as the deserializer in `de` feeds them.
struct SpannedVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for SpannedVisitor<T> {
    type Value = Spanned<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value with a position")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut line = 0u32;
        let mut col = 0u32;
        while let Some(key) = map.next_key::<Cow<'_, str>>()? {
            match key.as_ref() {
                "$line" => line = map.next_value()?,
                "$col" => col = map.next_value()?,
                _ => {
                    let value = map.next_value()?;
                    return Ok(Spanned { pos: Pos { line, col }, value });
                }
            }
        }
        Err(de::Error::custom("a positioned value without its value"))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(SPANNED, SPANNED_FIELDS, SpannedVisitor(std::marker::PhantomData))
    }
}

/// A value with the position of the key it is written under: `matrix:` rather than the first
/// line of the mapping below it, so that a problem with the whole value points at its key.
#[derive(Debug, Clone)]
pub struct Keyed<T>(pub Spanned<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Keyed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(KEYED, SPANNED_FIELDS, SpannedVisitor(std::marker::PhantomData)).map(Keyed)
    }
}

impl<T: JsonSchema> JsonSchema for Keyed<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// Deserializes through `FromStr`-like parsing of a string, with a message on failure.
fn from_text<'de, D, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    parse(&text).map_err(de::Error::custom)
}

/// A length of time written as `90s`, `10m`, `1h30m` or `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    secs: u64,
}

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration { secs }
    }

    pub fn as_secs(&self) -> u64 {
        self.secs
    }

    pub fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.secs)
    }

    /// Parses `1h30m`-style text: one or more whole numbers, each followed by `d`, `h`, `m` or `s`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration '{text}': write it like 90s, 10m, 1h30m or 2d");
        let t = text.trim();
        if t.is_empty() {
            return Err(bad());
        }
        if t.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid duration '{text}': add a unit, for example {t}s or {t}m"));
        }
        let mut secs: u64 = 0;
        let mut number = String::new();
        let mut last_unit = u64::MAX;
        for c in t.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = match c {
                'd' => 86_400,
                'h' => 3_600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            // Units go from the largest to the smallest, each once: `1h30m`, not `30m1h`.
            if number.is_empty() || unit >= last_unit {
                return Err(bad());
            }
            last_unit = unit;
            let n: u64 = number.parse().map_err(|_| bad())?;
            secs = n.checked_mul(unit).and_then(|s| secs.checked_add(s)).ok_or_else(bad)?;
            number.clear();
        }
        if !number.is_empty() {
            return Err(bad());
        }
        Ok(Duration { secs })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secs == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.secs;
        for (unit, name) in [(86_400, 'd'), (3_600, 'h'), (60, 'm'), (1, 's')] {
            if rest >= unit {
                write!(f, "{}{name}", rest / unit)?;
                rest %= unit;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Duration::parse)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$",
            "minLength": 2,
            "description": "A length of time: whole numbers with units d, h, m, s, largest first, e.g. 90s, 10m, 1h30m, 2d.",
            "examples": ["90s", "10m", "1h30m"]
        })
    }
}

/// A glob over branch names or paths: `*` stays within a `/` segment, `**` crosses them.
#[derive(Clone)]
pub struct Glob {
    text: String,
    matcher: globset::GlobMatcher,
}

impl Glob {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a glob cannot be empty".into());
        }
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("invalid glob '{text}': {}", e.kind()))?;
        Ok(Glob { text: text.to_owned(), matcher: glob.compile_matcher() })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_match(&self, candidate: &str) -> bool {
        self.matcher.is_match(candidate)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for Glob {}

impl Serialize for Glob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Glob::parse)
    }
}

impl JsonSchema for Glob {
    fn schema_name() -> Cow<'static, str> {
        "Glob".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "description": "A glob: `*` matches within one path segment, `**` across segments, `?` one character, `[abc]` a class, `{a,b}` alternatives.",
            "examples": ["feature/**", "release-*", "src/**/*.py"]
        })
    }
}

/// A cron expression with five fields: minute, hour, day of month, month, day of week.
#[derive(Clone)]
pub struct Cron {
    text: String,
    cron: croner::Cron,
}

impl Cron {
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields = text.split_whitespace().count();
        if fields != 5 && !text.trim_start().starts_with('@') {
            return Err(format!(
                "invalid cron expression '{text}': expected 5 fields (minute hour day-of-month month day-of-week), found {fields}"
            ));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| {
                let reason = e.to_string();
                let reason = reason.trim_start_matches("Component error: ").trim_end_matches('.');
                format!("invalid cron expression '{text}': {}", reason.to_lowercase())
            })?;
        Ok(Cron { text: text.to_owned(), cron })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed schedule, for whoever computes the next run from a time it is given.
    pub fn schedule(&self) -> &croner::Cron {
        &self.cron
    }
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?})", self.text)
    }
}

impl PartialEq for Cron {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for Cron {}

impl Serialize for Cron {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Cron {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Cron::parse)
    }
}

impl JsonSchema for Cron {
    fn schema_name() -> Cow<'static, str> {
        "Cron".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A cron expression with five fields (minute hour day-of-month month day-of-week), in UTC, or @daily, @hourly, @weekly, @monthly, @yearly.",
            "examples": ["0 3 * * *", "*/15 * * * 1-5", "@daily"]
        })
    }
}

/// A memory size in bytes, written as a number of bytes or with a `k`, `m` or `g` suffix (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(pub u64);

impl Memory {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid memory size '{text}': write it like 512m or 2g");
        let t = text.trim().to_ascii_lowercase();
        let t = t.strip_suffix('b').unwrap_or(&t);
        let (digits, factor) = match t.char_indices().last() {
            Some((i, 'k')) => (&t[..i], 1u64 << 10),
            Some((i, 'm')) => (&t[..i], 1 << 20),
            Some((i, 'g')) => (&t[..i], 1 << 30),
            Some(_) => (t, 1),
            None => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n.checked_mul(factor).ok_or_else(bad)?;
        if bytes < 4 << 20 {
            return Err(format!("memory size '{text}' is below Docker's minimum of 4m"));
        }
        Ok(Memory(bytes))
    }
}

impl Serialize for Memory {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Memory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, Memory::parse)
    }
}

impl JsonSchema for Memory {
    fn schema_name() -> Cow<'static, str> {
        "Memory".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "string", "pattern": "^[0-9]+([kKmMgG][bB]?)?$" },
                { "type": "integer", "minimum": 4194304 }
            ],
            "description": "Memory in bytes, or with a k, m or g suffix (powers of 1024), e.g. 512m, 2g.",
            "examples": ["512m", "2g"]
        })
    }
}

/// An environment variable's value. YAML numbers and booleans are taken as their text, so
/// `PORT: 8080` works as a person expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Text::deserialize(d).map(|t| EnvValue(t.0))
    }
}

/// A scalar's text as written, whether YAML would read it as a string, a number or a boolean,
/// so that `PORT: 8080` stays `8080` and `RATIO: 0.50` stays `0.50`.
pub(crate) struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
                String::deserialize(d).map(Text)
            }
        }
        d.deserialize_newtype_struct(TEXT, V)
    }
}

impl JsonSchema for EnvValue {
    fn schema_name() -> Cow<'static, str> {
        "EnvValue".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": ["string", "number", "boolean"] })
    }
}

/// Shell commands: a list, or one string (which may hold several lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Commands(pub Vec<String>);

impl<'de> Deserialize<'de> for Commands {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Commands;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command or a list of commands")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Commands, E> {
                Ok(Commands(vec![v.to_owned()]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Commands, E> {
                Ok(Commands(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Commands, E> {
                Ok(Commands(vec![v.to_string()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Commands, A::Error> {
                let mut out = Vec::new();
                while let Some(c) = seq.next_element::<Text>()? {
                    out.push(c.0);
                }
                Ok(Commands(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Commands {
    fn schema_name() -> Cow<'static, str> {
        "Commands".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Shell commands run in order with `sh -e`: a list, or one (possibly multi-line) string.",
            "anyOf": [
                { "type": ["string", "number", "boolean"] },
                { "type": "array", "items": { "type": ["string", "number", "boolean"] } }
            ]
        })
    }
}
