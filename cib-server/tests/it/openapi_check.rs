//! Holds the server to its generated OpenAPI description: every answer a test receives is
//! checked against the operation it belongs to (its status is listed, its JSON body validates
//! against the listed schema), so the description cannot lie about what the tests see.

use std::sync::OnceLock;

use serde_json::{Value, json};

/// The description, generated once per test binary.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(cib_server::routes::document)
}

/// The operation of `method` on the template matching `path` (without its query), preferring
/// the template with the most fixed segments, as the router does.
pub fn find_op(method: &str, path: &str) -> Option<(String, &'static Value)> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let paths = document()["paths"].as_object()?;
    let mut best: Option<(usize, &String)> = None;
    for template in paths.keys() {
        let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut fixed = 0;
        let matches = parts.iter().zip(&segments).all(|(t, s)| {
            if t.starts_with('{') {
                !s.is_empty()
            } else {
                fixed += 1;
                t == s
            }
        });
        if matches && best.is_none_or(|(f, _)| fixed > f) {
            best = Some((fixed, template));
        }
    }
    let (_, template) = best?;
    let op = paths[template].get(method.to_lowercase())?;
    Some((template.clone(), op))
}

/// A schema of the description, made whole: references into `components` resolve.
pub fn rooted(schema: &Value) -> Value {
    let mut root = json!({ "allOf": [schema] });
    root["components"] = document()["components"].clone();
    root
}

/// Whether `instance` validates against `schema` (a schema of the description).
pub fn valid(schema: &Value, instance: &Value) -> Result<(), String> {
    let validator = jsonschema::validator_for(&rooted(schema)).map_err(|e| format!("bad schema: {e}"))?;
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

/// Panics unless the answer is one the description lists for this request.
pub fn check_answer(method: &str, path: &str, status: u16, content_type: Option<&str>, body: &[u8]) {
    let Some((template, op)) = find_op(method, path) else {
        // A path or method the description does not have: the router's 404 and 405.
        assert!(status == 404 || status == 405, "{method} {path} is not described, yet answered {status}");
        return;
    };
    let Some(answer) = op["responses"].get(status.to_string()) else {
        panic!(
            "{method} {template} answered {status}, which its description does not list: {}",
            String::from_utf8_lossy(body)
        );
    };
    let Some(content) = answer.get("content") else { return };
    if let Some(media) = content.get("application/json") {
        assert_eq!(content_type, Some("application/json"), "{method} {template} {status}: content type");
        let value: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{method} {template} {status}: the body is not JSON ({e})"));
        if let Err(e) = valid(&media["schema"], &value) {
            panic!("{method} {template} {status}: the body does not match the description: {e}\n{value:#}");
        }
    } else {
        let declared: Vec<&String> = content.as_object().map(|m| m.keys().collect()).unwrap_or_default();
        let ct = content_type.unwrap_or_default();
        assert!(
            declared.iter().any(|d| d.as_str() == ct),
            "{method} {template} {status}: {ct} is not one of {declared:?}"
        );
    }
}
