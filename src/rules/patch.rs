//! The fields a partial update (`PATCH /v3/ai-voice-agents/{id}`) may carry, and how each
//! is written into the multipart form.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PatchField {
    VoiceagentName,
    VoiceId,
    Greetings,
    Prompt,
    Config,
    MaxCallDuration,
    NotificationTime,
    NotificationMessage,
    Urls,
    KnowledgeBase,
    MoreInformation,
    Status,
    /// Knowledge-base files: local paths, sent as file parts (appended by the platform).
    Files,
}

impl PatchField {
    pub const ALL: [PatchField; 13] = [
        PatchField::VoiceagentName,
        PatchField::VoiceId,
        PatchField::Greetings,
        PatchField::Prompt,
        PatchField::Config,
        PatchField::MaxCallDuration,
        PatchField::NotificationTime,
        PatchField::NotificationMessage,
        PatchField::Urls,
        PatchField::KnowledgeBase,
        PatchField::MoreInformation,
        PatchField::Status,
        PatchField::Files,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PatchField::VoiceagentName => "voiceagent_name",
            PatchField::VoiceId => "voice_id",
            PatchField::Greetings => "greetings",
            PatchField::Prompt => "prompt",
            PatchField::Config => "config",
            PatchField::MaxCallDuration => "max_call_duration",
            PatchField::NotificationTime => "notification_time",
            PatchField::NotificationMessage => "notification_message",
            PatchField::Urls => "urls",
            PatchField::KnowledgeBase => "knowledge_base",
            PatchField::MoreInformation => "more_information",
            PatchField::Status => "status",
            PatchField::Files => "files",
        }
    }

    pub fn parse(name: &str) -> Result<Self, String> {
        if let Some(f) = Self::ALL.iter().copied().find(|f| f.name() == name) {
            return Ok(f);
        }
        // The docs' prose writes `greeting`; the form field is `greetings`.
        let hint = match name {
            "greeting" => Some("greetings".to_string()),
            _ => Self::ALL
                .iter()
                .map(|f| (edit_distance(name, f.name()), f.name()))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, n)| n.to_string()),
        };
        let known: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
        Err(match hint {
            Some(h) => format!("unknown PATCH field `{name}`; did you mean `{h}`?"),
            None => format!(
                "unknown PATCH field `{name}`; the fields are {}",
                known.join(", ")
            ),
        })
    }

    /// Checks a value's type for this field and returns it in its stored form.
    fn check(self, v: &Value) -> Result<Value, String> {
        let name = self.name();
        match self {
            PatchField::VoiceagentName
            | PatchField::Greetings
            | PatchField::Prompt
            | PatchField::NotificationMessage
            | PatchField::MoreInformation => match v {
                Value::String(_) => Ok(v.clone()),
                _ => Err(format!("`{name}` must be a string, found {v}")),
            },
            PatchField::VoiceId | PatchField::MaxCallDuration | PatchField::NotificationTime => {
                match v.as_u64() {
                    Some(_) => Ok(v.clone()),
                    None => Err(format!(
                        "`{name}` must be a whole number of {}, found {v}",
                        if self == PatchField::VoiceId {
                            "id"
                        } else {
                            "seconds"
                        }
                    )),
                }
            }
            PatchField::Config => match v {
                Value::Object(_) => Ok(v.clone()),
                _ => Err(format!(
                    "`config` must be a table such as {{ volume = 0.7 }}, found {v}"
                )),
            },
            PatchField::Urls | PatchField::KnowledgeBase | PatchField::Files => match v {
                Value::String(s) => Ok(Value::Array(vec![Value::String(s.clone())])),
                Value::Array(items) if items.iter().all(Value::is_string) => Ok(v.clone()),
                _ => Err(format!(
                    "`{name}` must be a string or a list of strings, found {v}"
                )),
            },
            PatchField::Status => match v.as_str() {
                Some("active" | "inactive") => Ok(v.clone()),
                _ => Err(format!(
                    "`status` must be \"active\" or \"inactive\", found {v}"
                )),
            },
        }
    }
}

impl fmt::Display for PatchField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated set of fields to change, in a stable order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatchSet(BTreeMap<PatchField, Value>);

impl PatchSet {
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let Value::Object(map) = v else {
            return Err(format!("`set` must be a table of PATCH fields, found {v}"));
        };
        if map.is_empty() {
            return Err("`set` is empty: name at least one field to change".into());
        }
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let field = PatchField::parse(k)?;
            out.insert(field, field.check(v)?);
        }
        Ok(Self(out))
    }

    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.name().to_string(), v.clone()))
                .collect::<Map<_, _>>(),
        )
    }

    pub fn fields(&self) -> impl Iterator<Item = (PatchField, &Value)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    pub fn get(&self, f: PatchField) -> Option<&Value> {
        self.0.get(&f)
    }

    /// The local paths of the files to attach.
    pub fn files(&self) -> Vec<String> {
        match self.0.get(&PatchField::Files) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The same set without the files whose names the agent already lists.
    pub fn without_files_named(&self, present: &[String]) -> PatchSet {
        let mut out = self.clone();
        let keep: Vec<Value> = self
            .files()
            .into_iter()
            .filter(|p| !present.contains(&file_name(p)))
            .map(Value::String)
            .collect();
        if keep.is_empty() {
            out.0.remove(&PatchField::Files);
        } else {
            out.0.insert(PatchField::Files, Value::Array(keep));
        }
        out
    }

    /// The fields whose value in the agent's known `state` differs from this set's: what
    /// a level-triggered shift still has to send. For `config`, only this set's keys are
    /// compared; for `files`, names already listed in `knowledgebase_files` count as in
    /// place.
    pub fn not_yet_in(&self, state: &Value) -> PatchSet {
        let mut out = PatchSet::default();
        for (field, want) in &self.0 {
            let have = state.get(field.name());
            let in_place = match (field, want) {
                (PatchField::Config, Value::Object(keys)) => keys
                    .iter()
                    .all(|(k, v)| have.and_then(|h| h.get(k)).is_some_and(|h| same(h, v))),
                (PatchField::Files, _) => {
                    let listed = listed_files(state);
                    self.files().iter().all(|p| listed.contains(&file_name(p)))
                }
                _ => have.is_some_and(|h| same(h, want)),
            };
            if !in_place {
                out.0.insert(*field, want.clone());
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn overlaps(&self, other: &PatchSet) -> bool {
        self.0.keys().any(|k| other.0.contains_key(k))
    }

    /// Later fields win: used when pending patches for one agent are merged.
    pub fn merge(&mut self, later: &PatchSet) {
        for (k, v) in &later.0 {
            self.0.insert(*k, v.clone());
        }
    }

    /// The multipart form fields, in order. `config` goes as one JSON-string field; when
    /// the agent's current config is known, the rule's keys are laid over it, because the
    /// platform's docs do not say whether a partial `config` is merged or replaces the
    /// whole object: sending the merged object is right under either reading.
    pub fn form_fields(&self, current_config: Option<&Value>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (field, v) in &self.0 {
            let name = field.name().to_string();
            match (field, v) {
                (PatchField::Config, Value::Object(set)) => {
                    let mut merged = match current_config {
                        Some(Value::Object(cur)) => cur.clone(),
                        _ => Map::new(),
                    };
                    merged.extend(set.clone());
                    out.push((name, Value::Object(merged).to_string()));
                }
                // File parts are built by the sender, which reads the files.
                (PatchField::Files, _) => {}
                (_, Value::Array(items)) => {
                    for item in items {
                        out.push((name.clone(), item.as_str().unwrap_or_default().to_string()));
                    }
                }
                (_, Value::String(s)) => out.push((name, s.clone())),
                (_, other) => out.push((name, other.to_string())),
            }
        }
        out
    }
}

/// Equal as the platform would store them: numbers by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// The file names an agent lists in its knowledge base (`knowledgebase_files`).
pub fn listed_files(agent: &Value) -> Vec<String> {
    agent["knowledgebase_files"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The name a file is uploaded (and listed by the platform) under.
pub fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_suggests_greetings() {
        let e = PatchSet::from_json(&json!({"greeting": "hi"})).unwrap_err();
        assert!(e.contains("did you mean `greetings`?"), "{e}");
        let e = PatchSet::from_json(&json!({"max_call_duraton": 1})).unwrap_err();
        assert!(e.contains("`max_call_duration`"), "{e}");
    }

    #[test]
    fn types_are_checked() {
        assert!(PatchSet::from_json(&json!({"status": "paused"})).is_err());
        assert!(PatchSet::from_json(&json!({"max_call_duration": -1})).is_err());
        assert!(PatchSet::from_json(&json!({"config": "x"})).is_err());
        assert!(PatchSet::from_json(&json!({})).is_err());
    }

    #[test]
    fn form_fields_merge_config_and_repeat_lists() {
        let set = PatchSet::from_json(&json!({
            "greetings": "hi", "max_call_duration": 180, "config": {"volume": 0.7},
            "urls": ["a", "b"]
        }))
        .unwrap();
        let form = set.form_fields(Some(&json!({"volume": 0.8, "background_noise": false})));
        let config = form.iter().find(|(k, _)| k == "config").unwrap();
        let parsed: Value = serde_json::from_str(&config.1).unwrap();
        assert_eq!(parsed, json!({"volume": 0.7, "background_noise": false}));
        assert!(form.contains(&("max_call_duration".into(), "180".into())));
        assert_eq!(form.iter().filter(|(k, _)| k == "urls").count(), 2);
    }
}
