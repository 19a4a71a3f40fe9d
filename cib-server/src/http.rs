//! Small HTTP helpers on hyper: response builders, bounded body reading, query strings.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;

/// The body type of every response: a whole buffer, or a stream for server-sent events.
pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error answer: `{"error": "..."}` with a status that says whose fault it is.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Why a body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge,
    Broken(String),
}

/// Reads a whole body, refusing more than `limit` bytes (hyper sets no limit of its own).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Err(e) => Err(BodyError::Broken(e.to_string())),
    }
}

/// Decodes `a=1&b=two` (with `+` and `%XX`), keeping the last value of a repeated key.
pub fn query(uri: &http::Uri) -> std::collections::BTreeMap<String, String> {
    pairs(uri.query().unwrap_or_default())
}

/// The pairs of `application/x-www-form-urlencoded` text (a query, or a form's body); a key
/// given twice keeps its last value.
pub fn pairs(text: &str) -> std::collections::BTreeMap<String, String> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit() => {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(bytes[i + 1]) * 16 + hex(bytes[i + 2]));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_segments_decode() {
        let uri: http::Uri = "/x?repo=acme%2Fshop&branch=feature+one&empty=&flag".parse().expect("uri");
        let q = query(&uri);
        assert_eq!(q.get("repo").map(String::as_str), Some("acme/shop"));
        assert_eq!(q.get("branch").map(String::as_str), Some("feature one"));
        assert_eq!(q.get("empty").map(String::as_str), Some(""));
        assert_eq!(q.get("flag").map(String::as_str), Some(""));
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("%4"), "%4");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = Full::new(Bytes::from(vec![b'x'; 100]));
        assert!(matches!(read_body(body, 10).await, Err(BodyError::TooLarge)));
        let body = Full::new(Bytes::from_static(b"ok"));
        assert_eq!(read_body(body, 10).await.ok(), Some(Bytes::from_static(b"ok")));
    }
}
