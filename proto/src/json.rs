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

    #[test]
    fn refuses_nan() {
        let v = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert!(value_to_json(&v).is_err());
    }
}
