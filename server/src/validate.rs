//! Checks of everything a client or worker sends, with messages a person can act on.

use std::time::Duration;

use aiki_proto::prost_types;
use serde_json::Value as Json;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The namespace of a request ("default" when empty).
pub fn namespace(ns: &str) -> Result<String> {
    if ns.is_empty() {
        return Ok("default".to_owned());
    }
    name("namespace", ns, 64)
}

/// A name of workflow, queue, version, ...: 1 to `max` characters, no control characters.
pub fn name(what: &str, s: &str, max: usize) -> Result<String> {
    // ASCII (nearly every name) is checked byte by byte: a task key is checked on every
    // report, and walking it by `char` was a tenth of a completion's time in the server.
    let (len, control) = if s.is_ascii() {
        (s.len(), s.bytes().any(|b| b.is_ascii_control()))
    } else {
        (s.chars().count(), s.chars().any(char::is_control))
    };
    if len == 0 || len > max {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to {max} characters long, got {len}"
        )));
    }
    if control {
        return Err(Error::InvalidArgument(format!(
            "{what} {} must not contain control characters",
            quote(s)
        )));
    }
    Ok(s.to_owned())
}

/// An optional name: empty means absent.
pub fn opt_name(what: &str, s: &str, max: usize) -> Result<Option<String>> {
    if s.is_empty() {
        Ok(None)
    } else {
        name(what, s, max).map(Some)
    }
}

/// Most characters of a client's input quoted in an error message.
const QUOTED_CHARS: usize = 64;

/// `s` quoted for an error message: whole if short, else its first [`QUOTED_CHARS`]
/// characters and its length, so that no input can make an error message large.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTED_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// A UUID sent as a string.
pub fn uuid(what: &str, s: &str) -> Result<Uuid> {
    if s.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    Uuid::parse_str(s).map_err(|_| Error::InvalidArgument(format!("{what} {} is not a valid UUID", quote(s))))
}

/// A payload converted to JSON and checked against the size limit.
pub fn payload(what: &str, v: Option<&prost_types::Value>, max_bytes: usize) -> Result<Json> {
    let json = payload_json(what, v)?;
    payload_size(what, &json, max_bytes)?;
    Ok(json)
}

/// A payload converted to JSON, checked for what can be stored whatever its size: a JSON form
/// (no NaN), no NUL character, at most `aiki_proto::MAX_PAYLOAD_DEPTH` levels deep.
pub fn payload_json(what: &str, v: Option<&prost_types::Value>) -> Result<Json> {
    let json = match v {
        None => Json::Null,
        Some(v) => aiki_proto::value_to_json(v).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?,
    };
    aiki_proto::check_depth(what, &json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if has_nul(&json) {
        return Err(Error::InvalidArgument(format!(
            "{what} contains a NUL character (\\u0000), which cannot be stored; encode binary data, e.g. as base64"
        )));
    }
    Ok(json)
}

/// Checks a payload's size against the server's limit (`RESOURCE_EXHAUSTED`).
pub fn payload_size(what: &str, json: &Json, max_bytes: usize) -> Result<()> {
    let size = json_len(json);
    if size > max_bytes {
        return Err(Error::ResourceExhausted(format!(
            "{what} is {size} bytes of JSON; the limit is {max_bytes} bytes (store large data elsewhere and pass a reference)"
        )));
    }
    Ok(())
}

/// The length of `j` serialized as JSON, counted without building the text.
fn json_len(j: &Json) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, j) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn has_nul(j: &Json) -> bool {
    match j {
        Json::String(s) => s.contains('\0'),
        Json::Array(a) => a.iter().any(has_nul),
        Json::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Free text (an error message, a reason) made storable: at most `max` characters, NUL
/// replaced. Never refused, so that a failure can always be reported.
pub fn text(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c == '\0' { '\u{fffd}' } else { c })
        .collect()
}

/// A non-negative duration, at most `max`.
pub fn duration(what: &str, d: Option<&prost_types::Duration>, max: Duration) -> Result<Duration> {
    let Some(d) = d else {
        return Ok(Duration::ZERO);
    };
    let d = aiki_proto::duration_from_proto(d)
        .ok_or_else(|| Error::InvalidArgument(format!("{what} must be a non-negative duration")))?;
    if d > max {
        return Err(Error::InvalidArgument(format!(
            "{what} must be at most {}",
            humantime::format_duration(max)
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_the_length_of_the_text() {
        for j in [
            serde_json::json!(null),
            serde_json::json!({"a": [1, 2.5, "x\u{00e9}\"y"], "b": {"c": true}}),
            serde_json::json!("é"),
        ] {
            assert_eq!(json_len(&j), serde_json::to_vec(&j).unwrap().len(), "{j}");
        }
    }

    #[test]
    fn errors_quote_a_short_prefix_of_any_input() {
        let huge = "x".repeat(10 * 1024 * 1024);
        let Err(Error::InvalidArgument(m)) = uuid("run_id", &huge) else {
            panic!("a 10 MB string is not a UUID")
        };
        assert!(m.len() < 200, "{} bytes of message", m.len());
        assert!(m.contains("10485760 bytes"), "{m}");
        assert_eq!(quote("short"), "\"short\"");
        // Cut on a character boundary.
        assert!(quote(&"é".repeat(100)).starts_with(&format!("{:?}", "é".repeat(64))));
    }

    #[test]
    fn names() {
        assert_eq!(namespace("").unwrap(), "default");
        assert!(name("workflow", "", 128).is_err());
        assert!(name("workflow", &"x".repeat(129), 128).is_err());
        assert!(name("queue", "a\nb", 128).is_err());
        assert!(name("queue", "billing-eu", 128).is_ok());
        // ASCII and other text take the same rules: length in characters, no control ones.
        assert!(name("queue", "a\x7fb", 128).is_err());
        assert!(name("queue", "a\u{85}b", 128).is_err());
        assert!(name("queue", "café-ü", 6).is_ok());
        assert!(name("queue", "café-üx", 6).is_err());
    }

    #[test]
    fn nul_is_refused_in_payloads_and_replaced_in_text() {
        let v = aiki_proto::json_to_value(&serde_json::json!({"a": ["x\0y"]}));
        assert!(matches!(
            payload("input", Some(&v), 1024),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(text("a\0b", 10), "a\u{fffd}b");
    }

    #[test]
    fn a_payload_nested_past_the_limit_is_refused_naming_it() {
        let deep = (0..aiki_proto::MAX_PAYLOAD_DEPTH + 1).fold(Json::Null, |v, _| Json::Array(vec![v]));
        match payload("input", Some(&aiki_proto::json_to_value(&deep)), 1024) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("at most 32 levels"), "{m}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        let at_limit = (0..aiki_proto::MAX_PAYLOAD_DEPTH).fold(Json::Null, |v, _| Json::Array(vec![v]));
        assert!(payload("input", Some(&aiki_proto::json_to_value(&at_limit)), 1024).is_ok());
    }

    #[test]
    fn payload_limit_is_resource_exhausted() {
        let v = aiki_proto::json_to_value(&Json::String("x".repeat(2000)));
        assert!(matches!(
            payload("input", Some(&v), 1024),
            Err(Error::ResourceExhausted(_))
        ));
    }
}
