//! Matchers: how a rule tests a field of a delivery or of an agent's known state.

use regex::Regex;
use serde_json::Value;
use std::fmt;

/// A JSON pointer and what the value there must satisfy.
#[derive(Debug, Clone)]
pub struct Condition {
    pub path: String,
    pub matcher: Matcher,
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.matcher.to_json() == other.matcher.to_json()
    }
}

impl Condition {
    /// `"/disposition"` or a bare field name `"status"` (read as `/status`).
    pub fn new(path: &str, spec: &Value) -> Result<Self, String> {
        Ok(Self {
            path: normalize_pointer(path)?,
            matcher: Matcher::from_json(spec)?,
        })
    }

    pub fn list_to_json(conditions: &[Condition]) -> Value {
        Value::Object(
            conditions
                .iter()
                .map(|c| (c.path.clone(), c.matcher.to_json()))
                .collect(),
        )
    }

    pub fn list_from_json(v: &Value) -> Result<Vec<Condition>, String> {
        match v {
            Value::Object(map) => map.iter().map(|(k, v)| Condition::new(k, v)).collect(),
            Value::Null => Ok(Vec::new()),
            other => Err(format!("conditions must be a table, found {other}")),
        }
    }
}

pub fn normalize_pointer(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("an empty field path; write a JSON pointer such as \"/event\"".into());
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    })
}

#[derive(Debug, Clone)]
pub enum Matcher {
    Eq(Value),
    In(Vec<Value>),
    Regex(Regex),
    Gt(f64),
    Lt(f64),
    Gte(f64),
    Lte(f64),
    Exists(bool),
    /// Several operators in one table (`{ gte = 1, lt = 5 }`): all must hold.
    All(Vec<Matcher>),
}

const OPERATORS: &str = "`eq`, `in`, `regex`, `gt`, `lt`, `gte`, `lte`, `exists`";

impl Matcher {
    /// A literal is an equality test; a table holds operators.
    pub fn from_json(spec: &Value) -> Result<Self, String> {
        let Value::Object(ops) = spec else {
            return match spec {
                Value::Array(_) => Err("a list is ambiguous here; write `{ in = [...] }`".into()),
                Value::Null => Err("null cannot be matched; use `{ exists = false }`".into()),
                v => Ok(Matcher::Eq(v.clone())),
            };
        };
        if ops.is_empty() {
            return Err(format!("an empty matcher table; use one of {OPERATORS}"));
        }
        let mut all = Vec::new();
        for (op, arg) in ops {
            let num = || {
                arg.as_f64()
                    .ok_or_else(|| format!("`{op}` needs a number, found {arg}"))
            };
            all.push(match op.as_str() {
                "eq" => Matcher::Eq(arg.clone()),
                "in" => match arg {
                    Value::Array(items) if !items.is_empty() => Matcher::In(items.clone()),
                    _ => return Err(format!("`in` needs a non-empty list, found {arg}")),
                },
                "regex" => {
                    let pattern = arg
                        .as_str()
                        .ok_or_else(|| format!("`regex` needs a string, found {arg}"))?;
                    Matcher::Regex(
                        Regex::new(pattern).map_err(|e| format!("bad regex {pattern:?}: {e}"))?,
                    )
                }
                "gt" => Matcher::Gt(num()?),
                "lt" => Matcher::Lt(num()?),
                "gte" => Matcher::Gte(num()?),
                "lte" => Matcher::Lte(num()?),
                "exists" => Matcher::Exists(
                    arg.as_bool()
                        .ok_or_else(|| format!("`exists` needs true or false, found {arg}"))?,
                ),
                other => return Err(format!("unknown matcher `{other}`; use one of {OPERATORS}")),
            });
        }
        Ok(if all.len() == 1 {
            all.remove(0)
        } else {
            Matcher::All(all)
        })
    }

    pub fn to_json(&self) -> Value {
        use serde_json::json;
        match self {
            Matcher::Eq(v) => json!({ "eq": v }),
            Matcher::In(v) => json!({ "in": v }),
            Matcher::Regex(r) => json!({ "regex": r.as_str() }),
            Matcher::Gt(n) => json!({ "gt": n }),
            Matcher::Lt(n) => json!({ "lt": n }),
            Matcher::Gte(n) => json!({ "gte": n }),
            Matcher::Lte(n) => json!({ "lte": n }),
            Matcher::Exists(b) => json!({ "exists": b }),
            Matcher::All(ms) => {
                let mut map = serde_json::Map::new();
                for m in ms {
                    if let Value::Object(o) = m.to_json() {
                        map.extend(o);
                    }
                }
                Value::Object(map)
            }
        }
    }

    /// Form-encoded deliveries carry every value as a string, so a number or boolean in a
    /// rule also matches its decimal or `true`/`false` text.
    pub fn matches(&self, actual: Option<&Value>) -> bool {
        let present = actual.filter(|v| !v.is_null());
        match self {
            Matcher::Exists(want) => present.is_some() == *want,
            Matcher::All(ms) => ms.iter().all(|m| m.matches(actual)),
            _ => {
                let Some(v) = present else { return false };
                match self {
                    Matcher::Eq(want) => loose_eq(v, want),
                    Matcher::In(wants) => wants.iter().any(|w| loose_eq(v, w)),
                    Matcher::Regex(r) => r.is_match(&as_text(v)),
                    Matcher::Gt(n) => as_number(v).is_some_and(|x| x > *n),
                    Matcher::Lt(n) => as_number(v).is_some_and(|x| x < *n),
                    Matcher::Gte(n) => as_number(v).is_some_and(|x| x >= *n),
                    Matcher::Lte(n) => as_number(v).is_some_and(|x| x <= *n),
                    Matcher::Exists(_) | Matcher::All(_) => unreachable!("handled above"),
                }
            }
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Eq(v) => write!(f, "= {v}"),
            other => write!(f, "{}", other.to_json()),
        }
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn loose_eq(actual: &Value, want: &Value) -> bool {
    if actual == want {
        return true;
    }
    match (actual, want) {
        (Value::String(s), Value::Number(_)) | (Value::Number(_), Value::String(s)) => {
            let n = if actual.is_number() { actual } else { want };
            s.trim().parse::<f64>().ok() == n.as_f64()
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(s), Value::Bool(b)) | (Value::Bool(b), Value::String(s)) => {
            s.trim() == if *b { "true" } else { "false" }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(spec: Value) -> Matcher {
        Matcher::from_json(&spec).unwrap()
    }

    #[test]
    fn operators() {
        assert!(m(json!("post_call")).matches(Some(&json!("post_call"))));
        assert!(!m(json!("post_call")).matches(Some(&json!("pre_call"))));
        assert!(m(json!(101)).matches(Some(&json!("101"))));
        assert!(m(json!(true)).matches(Some(&json!("true"))));
        assert!(m(json!({"in": ["A", "B"]})).matches(Some(&json!("B"))));
        assert!(m(json!({"regex": "^\\+1206"})).matches(Some(&json!("+12065550123"))));
        assert!(m(json!({"gte": 80})).matches(Some(&json!(82))));
        assert!(m(json!({"gt": 80})).matches(Some(&json!("82"))));
        assert!(!m(json!({"lt": 80})).matches(Some(&json!(82))));
        assert!(m(json!({"gte": 1, "lt": 5})).matches(Some(&json!(4))));
        assert!(!m(json!({"gte": 1, "lt": 5})).matches(Some(&json!(5))));
        assert!(m(json!({"exists": false})).matches(None));
        assert!(m(json!({"exists": true})).matches(Some(&json!(0))));
        assert!(!m(json!({"gt": 1})).matches(None));
        assert!(!m(json!({"gt": 1})).matches(Some(&json!("abc"))));
    }

    #[test]
    fn bad_specs_say_why() {
        assert!(Matcher::from_json(&json!({"regexp": "x"}))
            .unwrap_err()
            .contains("unknown matcher `regexp`"));
        assert!(Matcher::from_json(&json!({"regex": "("}))
            .unwrap_err()
            .contains("bad regex"));
        assert!(Matcher::from_json(&json!({"in": []}))
            .unwrap_err()
            .contains("non-empty"));
        assert!(Matcher::from_json(&json!(["a"]))
            .unwrap_err()
            .contains("in = [...]"));
    }

    #[test]
    fn conditions_round_trip_through_json() {
        let c = vec![Condition::new("status", &json!("active")).unwrap()];
        let back = Condition::list_from_json(&Condition::list_to_json(&c)).unwrap();
        assert_eq!(c, back);
        assert_eq!(back[0].path, "/status");
    }
}
