//! The OpenAPI 3.1 description's parts: each handler describes its operation ([`Op`]) with the
//! JSON Schemas of the types it reads and writes (derived with schemars, the same generator as
//! the spec's schema), and [`document`] assembles the route table's entries into the whole
//! description. The committed `docs/openapi.json` is its output, and a test fails when they
//! differ.

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

use crate::auth::Access;
use crate::config::Role;
use crate::error::ErrorBody;

/// Collects the schemas an operation uses, as references into `components.schemas`.
#[derive(Debug)]
pub struct DocGen {
    generator: SchemaGenerator,
}

impl Default for DocGen {
    fn default() -> Self {
        let mut settings = SchemaSettings::draft2020_12();
        settings.definitions_path = "/components/schemas".into();
        DocGen { generator: SchemaGenerator::new(settings) }
    }
}

impl DocGen {
    /// The schema of `T`: a reference when `T` is a named type, inline otherwise.
    pub fn schema<T: JsonSchema>(&mut self) -> Value {
        self.generator.subschema_for::<T>().to_value()
    }
}

/// Where a parameter is.
#[derive(Debug, Clone, Copy)]
pub enum In {
    Path,
    Query,
    Header,
}

/// One parameter of an operation.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: &'static str,
    pub location: In,
    pub required: bool,
    pub description: &'static str,
    pub schema: Value,
}

impl Param {
    pub fn path(name: &'static str, description: &'static str) -> Self {
        Param {
            name,
            location: In::Path,
            required: true,
            description,
            schema: json!({ "type": "string", "minLength": 1 }),
        }
    }

    pub fn query(name: &'static str, description: &'static str, schema: Value) -> Self {
        Param { name, location: In::Query, required: false, description, schema }
    }

    pub fn header(name: &'static str, description: &'static str, schema: Value) -> Self {
        Param { name, location: In::Header, required: false, description, schema }
    }

    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }
}

/// What an answer carries.
#[derive(Debug, Clone)]
pub enum Content {
    None,
    Json(Value),
    Text { media: &'static str, schema: Value },
}

/// One answer of an operation.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub description: &'static str,
    pub content: Content,
    pub headers: Vec<(&'static str, &'static str, Value)>,
}

/// One operation: what a route does, in the description's terms.
#[derive(Debug, Clone, Default)]
pub struct Op {
    pub summary: &'static str,
    pub description: &'static str,
    pub params: Vec<Param>,
    /// The JSON body's schema, and whether the body may be left empty.
    pub body: Option<(Value, bool)>,
    pub answers: Vec<Answer>,
}

impl Op {
    pub fn new(summary: &'static str) -> Self {
        Op { summary, ..Op::default() }
    }

    pub fn describe(mut self, description: &'static str) -> Self {
        self.description = description;
        self
    }

    pub fn param(mut self, p: Param) -> Self {
        self.params.push(p);
        self
    }

    /// A JSON body that must be present.
    pub fn body(mut self, schema: Value) -> Self {
        self.body = Some((schema, true));
        self
    }

    /// A JSON body that may be empty.
    pub fn optional_body(mut self, schema: Value) -> Self {
        self.body = Some((schema, false));
        self
    }

    pub fn json(mut self, status: u16, description: &'static str, schema: Value) -> Self {
        self.answers.push(Answer { status, description, content: Content::Json(schema), headers: Vec::new() });
        self
    }

    pub fn text(mut self, status: u16, description: &'static str, media: &'static str) -> Self {
        let schema = json!({ "type": "string" });
        self.answers.push(Answer {
            status,
            description,
            content: Content::Text { media, schema },
            headers: Vec::new(),
        });
        self
    }

    /// A header on the last answer added.
    pub fn header(mut self, name: &'static str, description: &'static str, schema: Value) -> Self {
        if let Some(last) = self.answers.last_mut() {
            last.headers.push((name, description, schema));
        }
        self
    }

    /// An error answer, in the common error shape.
    pub fn error(mut self, g: &mut DocGen, status: u16, description: &'static str) -> Self {
        if self.answers.iter().any(|a| a.status == status) {
            return self;
        }
        let schema = g.schema::<ErrorBody>();
        self.answers.push(Answer { status, description, content: Content::Json(schema), headers: Vec::new() });
        self
    }
}

/// A route as the description sees it.
#[derive(Debug)]
pub struct Described<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub access: Access,
    pub op: Op,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Trigger => "trigger",
        Role::Approve => "approve",
        Role::Admin => "admin",
    }
}

/// Adds what follows from the route's place in the table rather than from its handler: the
/// answers of the role layer, of the body reader and of the path extractor.
fn complete(g: &mut DocGen, access: Access, mut op: Op) -> Op {
    if op.body.is_some() {
        op = op.error(g, 400, "The body is not valid JSON of the documented shape.");
        op = op.error(g, 413, "The body is larger than the server accepts.");
    }
    if op.params.iter().any(|p| matches!(p.location, In::Path)) {
        op = op.error(g, 400, "A path parameter is malformed.");
    }
    if let Access::Role(_) = access {
        op = op.error(g, 401, "No bearer token, or one the server does not know.");
        op = op.error(g, 403, "The token's role is too low for this route.");
        op = op.error(g, 503, "The store or the engine failed; try again.");
    }
    op.answers.sort_by_key(|a| a.status);
    op
}

fn param_value(p: &Param) -> Value {
    let location = match p.location {
        In::Path => "path",
        In::Query => "query",
        In::Header => "header",
    };
    json!({
        "name": p.name,
        "in": location,
        "required": p.required,
        "description": p.description,
        "schema": p.schema,
    })
}

fn operation_value(d: &Described<'_>) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), json!(d.op.summary));
    if !d.op.description.is_empty() {
        op.insert("description".into(), json!(d.op.description));
    }
    let id = format!("{}{}", d.method.as_str().to_lowercase(), d.path.replace(['/', '{', '}', '.'], "_"));
    op.insert("operationId".into(), json!(id.trim_end_matches('_')));
    match d.access {
        Access::Role(role) => {
            op.insert("security".into(), json!([{ "bearer": [] }]));
            op.insert("x-cib-role".into(), json!(role_name(role)));
        }
        Access::Public => {
            op.insert("security".into(), json!([]));
        }
        Access::Signed => {
            op.insert("security".into(), json!([]));
            op.insert("x-cib-signed".into(), json!(true));
        }
        // Pages are not described (`routes::document` leaves them out); were one given, it
        // would need a session cookie, which the description has no scheme for.
        Access::Page | Access::Session(_) => {
            op.insert("security".into(), json!([]));
        }
    }
    if !d.op.params.is_empty() {
        op.insert("parameters".into(), Value::Array(d.op.params.iter().map(param_value).collect()));
    }
    if let Some((schema, required)) = &d.op.body {
        op.insert(
            "requestBody".into(),
            json!({ "required": required, "content": { "application/json": { "schema": schema } } }),
        );
    }
    let mut answers = Map::new();
    for a in &d.op.answers {
        let mut answer = Map::new();
        answer.insert("description".into(), json!(a.description));
        match &a.content {
            Content::None => {}
            Content::Json(schema) => {
                answer.insert("content".into(), json!({ "application/json": { "schema": schema } }));
            }
            Content::Text { media, schema } => {
                answer.insert("content".into(), json!({ *media: { "schema": schema } }));
            }
        }
        if a.status == 401 && matches!(d.access, Access::Role(_)) {
            answer.insert(
                "headers".into(),
                json!({ "WWW-Authenticate": { "description": "`Bearer`", "schema": { "type": "string" } } }),
            );
        }
        if !a.headers.is_empty() {
            let headers: Map<String, Value> = a
                .headers
                .iter()
                .map(|(name, description, schema)| {
                    ((*name).to_owned(), json!({ "description": description, "schema": schema }))
                })
                .collect();
            answer.insert("headers".into(), Value::Object(headers));
        }
        answers.insert(a.status.to_string(), Value::Object(answer));
    }
    op.insert("responses".into(), Value::Object(answers));
    Value::Object(op)
}

/// The whole description, from the route table's entries: method, path, access, description.
pub fn document<'a>(
    entries: impl Iterator<Item = (&'a http::Method, &'a str, Access, fn(&mut DocGen) -> Op)>,
) -> Value {
    let mut g = DocGen::default();
    let mut paths = Map::new();
    for (method, path, access, doc) in entries {
        let op = doc(&mut g);
        let op = complete(&mut g, access, op);
        let d = Described { method, path, access, op };
        let item = paths.entry(path.to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(item) = item {
            item.insert(method.as_str().to_lowercase(), operation_value(&d));
        }
    }
    let mut schemas = g.generator.take_definitions(true);
    schemas.sort_keys();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cib",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of cib's server. Generated from the server's route table; see docs/api.md for the prose.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}
