//! `google.protobuf.Value` ⇄ `serde_json::Value`.
//!
//! Payloads travel as `Value` so that grpcurl shows plain JSON; the server stores them as
//! `jsonb` and the SDK (de)serializes them with serde. Protobuf numbers are doubles, so a
//! number that JSON cannot represent (NaN, ±infinity) is refused rather than silently mangled.

use prost_types::{ListValue, Struct, Value, value::Kind};

/// A `google.protobuf.Value` that has no JSON form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError(pub String);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonError {}

/// The deepest that a payload (an input, an output, a task result, an event's data, an error's
/// details) may nest arrays and objects inside each other. Every edge checks it: the SDK, the
/// worker runtime and the CLI before sending, the server on receipt (`INVALID_ARGUMENT`).
///
/// Why 32: protobuf decoders stop at 100 nested messages, and each level of a
/// `google.protobuf.Value` costs two (`Value`, then `ListValue` or `Struct`). The server sends a
/// payload back inside up to four more messages (e.g. a poll's answer, its run, a task result)
/// and wraps some payloads one or two levels deeper (an event received by a waiting run, a
/// child's outcome), so a 32-level payload is at most about 75 messages deep wherever it
/// travels: everything the server accepts it can also send back, and every client can read.
pub const MAX_PAYLOAD_DEPTH: usize = 32;

/// How deeply `json` nests arrays and objects: 0 for a scalar, 1 for `[1]` or `{"a": 1}`, 2 for
/// `[[1]]`. Walks without recursion, so any value can be measured.
pub fn json_depth(json: &serde_json::Value) -> usize {
    use serde_json::Value::{Array, Object};
    if !matches!(json, Array(_) | Object(_)) {
        return 0;
    }
    let mut deepest = 0;
    let mut stack = vec![(json, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Array(a) => {
                deepest = deepest.max(depth + 1);
                stack.extend(a.iter().map(|c| (c, depth + 1)));
            }
            Object(o) => {
                deepest = deepest.max(depth + 1);
                stack.extend(o.values().map(|c| (c, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// A payload that nests deeper than [`MAX_PAYLOAD_DEPTH`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooDeep {
    /// What the payload is, e.g. "input" or "task \"charge\" output".
    pub what: String,
    /// How deep it nests.
    pub depth: usize,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nests arrays and objects {} levels deep; payloads may nest at most {MAX_PAYLOAD_DEPTH} levels \
             (flatten the data, or store it elsewhere and pass a reference)",
            self.what, self.depth
        )
    }
}

impl std::error::Error for TooDeep {}

/// Checks `json`, the payload `what`, against [`MAX_PAYLOAD_DEPTH`].
pub fn check_depth(what: &str, json: &serde_json::Value) -> Result<(), TooDeep> {
    match json_depth(json) {
        depth if depth > MAX_PAYLOAD_DEPTH => Err(TooDeep {
            what: what.to_owned(),
            depth,
        }),
        _ => Ok(()),
    }
}

/// Converts a protobuf `Value` to JSON. An unset kind is `null`.
pub fn value_to_json(value: &Value) -> Result<serde_json::Value, JsonError> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                serde_json::Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| JsonError(format!("{n} is not a JSON number")))?
            }
        }
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect::<Result<_, _>>()?)
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), value_to_json(v)?)))
                .collect::<Result<_, JsonError>>()?,
        ),
    })
}

/// Converts JSON to a protobuf `Value`. Integers beyond 2^53 lose precision, as in any
/// JSON-as-double encoding.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_json() {
        let json = serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {"c": -3}});
        assert_eq!(value_to_json(&json_to_value(&json)).unwrap(), json);
    }

    /// `depth` arrays inside each other around `1`.
    fn nested(depth: usize) -> serde_json::Value {
        (0..depth).fold(serde_json::json!(1), |v, _| serde_json::Value::Array(vec![v]))
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(json_depth(&serde_json::json!(1)), 0);
        assert_eq!(json_depth(&serde_json::json!([])), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": {}}], "c": 2})), 4);
        assert_eq!(json_depth(&nested(60)), 60);
        assert!(check_depth("input", &nested(MAX_PAYLOAD_DEPTH)).is_ok());
        let e = check_depth("input", &nested(MAX_PAYLOAD_DEPTH + 1)).unwrap_err();
        assert_eq!(e.depth, MAX_PAYLOAD_DEPTH + 1);
        assert!(e.to_string().contains("at most 32 levels"), "{e}");
    }

    /// The bound the limit is chosen for: a payload at the limit, wrapped as deeply as the
    /// server ever wraps one and inside the deepest answer that carries it, still decodes.
    #[test]
    fn a_payload_at_the_limit_decodes_in_the_deepest_answer() {
        use crate::v1::{LeasedRun, PollTasksResponse, TaskResult, task_result};
        use prost::Message;
        // A child's outcome as a waiting parent gets it: {"child", "error": {"details": payload}}.
        let wrapped = serde_json::json!({"child": "x", "error": {"details": nested(MAX_PAYLOAD_DEPTH)}});
        let answer = PollTasksResponse {
            runs: vec![LeasedRun {
                tasks: vec![TaskResult {
                    result: Some(task_result::Result::Output(json_to_value(&wrapped))),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let decoded = PollTasksResponse::decode(answer.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, answer);
    }

    #[test]
    fn refuses_nan() {
        let v = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert!(value_to_json(&v).is_err());
    }
}
