//! The config file as written: serde types that keep locations for validation.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use toml::Spanned;

pub type SpannedTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub database: RawDatabase,
    pub platform: RawPlatform,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub shifts: Vec<Spanned<RawShift>>,
    #[serde(default)]
    pub defaults: RawDefaults,
}

/// Settings that rules and shifts inherit when they do not name their own.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub timezone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen")]
    pub listen: Spanned<String>,
    pub max_body_bytes: Option<usize>,
    pub request_timeout: Option<Spanned<String>>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: None,
            request_timeout: None,
        }
    }
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8080".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<String>,
    pub token: Option<Spanned<RawSecret>>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

fn default_admin_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8081".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    #[serde(default = "default_db")]
    pub path: Spanned<PathBuf>,
    pub busy_timeout: Option<Spanned<String>>,
    pub retention: Option<Spanned<String>>,
}

impl Default for RawDatabase {
    fn default() -> Self {
        Self {
            path: default_db(),
            busy_timeout: None,
            retention: None,
        }
    }
}

fn default_db() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("data/autopilot.db"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlatform {
    pub base_url: Spanned<String>,
    pub oauth_url: Option<Spanned<String>>,
    pub token: Spanned<RawToken>,
    pub timeout: Option<Spanned<String>>,
    pub requests_per_second: Option<Spanned<f64>>,
    pub max_in_flight: Option<Spanned<usize>>,
}

/// A secret, or `{ login = { email = "...", password = { env = "..." } } }`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct RawToken {
    pub env: Option<String>,
    pub file: Option<String>,
    pub value: Option<String>,
    pub login: Option<RawLogin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFields {
    env: Option<String>,
    file: Option<String>,
    value: Option<String>,
    login: Option<RawLogin>,
}

impl TryFrom<toml::Value> for RawToken {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        let f: TokenFields = table_only(
            v,
            "the platform token must be a table: { env = \"NAME\" }, { file = \"/path\" }, { value = \"...\" } or { login = { email = \"...\", password = { env = \"NAME\" } } } (the value given is not shown)",
        )?;
        Ok(RawToken {
            env: f.env,
            file: f.file,
            value: f.value,
            login: f.login,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogin {
    pub email: String,
    pub password: RawSecret,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub workers: Option<Spanned<usize>>,
    pub max_attempts: Option<Spanned<u32>>,
    pub initial_backoff: Option<Spanned<String>>,
    pub max_backoff: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub max_retry_after: Option<Spanned<String>>,
    pub max_age: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub ready_max_due_age: Option<Spanned<String>>,
}

/// `{ env = "NAME" }`, `{ file = "/path" }` or `{ value = "..." }`. Anything else is
/// refused without echoing it: a secret pasted in the wrong shape must not reach the
/// error message (or the journal it goes to).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, try_from = "toml::Value")]
pub struct RawSecret {
    pub env: Option<String>,
    pub file: Option<String>,
    pub value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFields {
    env: Option<String>,
    file: Option<String>,
    value: Option<String>,
}

const SECRET_SHAPE: &str = "a secret must be a table: { env = \"NAME\" }, { file = \"/path\" } or { value = \"...\" } (the value given is not shown)";

fn table_only<T: serde::de::DeserializeOwned>(v: toml::Value, shape: &str) -> Result<T, String> {
    match v {
        toml::Value::Table(t) => toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string()),
        _ => Err(shape.to_string()),
    }
}

impl TryFrom<toml::Value> for RawSecret {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        // serde's own message would quote the offending value: it may be the secret.
        let f: SecretFields = table_only(v, SECRET_SHAPE).map_err(|e| {
            if e == SECRET_SHAPE {
                e
            } else {
                "a secret's env, file and value must be strings, and nothing else may be given (the value is not shown)".to_string()
            }
        })?;
        Ok(RawSecret {
            env: f.env,
            file: f.file,
            value: f.value,
        })
    }
}

/// `id = "/call_id"` or `id = ["/event", "/call_id"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawId {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: Spanned<String>,
    pub auth: Spanned<RawAuth>,
    pub id: Option<Spanned<RawId>>,
    pub id_header: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub event_time: Option<Spanned<String>>,
}

/// `{ per_second = 20, burst = 40 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: f64,
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub kind: Spanned<String>,
    pub field: Option<Spanned<String>>,
    pub form_field: Option<String>,
    pub query: Option<String>,
    pub header: Option<String>,
    pub encoding: Option<Spanned<String>>,
    pub prefix: Option<String>,
    pub secret: Option<Spanned<RawSecret>>,
    pub previous_secret: Option<Spanned<RawSecret>>,
    pub username: Option<String>,
    pub password: Option<Spanned<RawSecret>>,
    pub tolerance: Option<Spanned<String>>,
}

impl RawAuth {
    pub fn present_keys(&self) -> [(&'static str, bool); 11] {
        [
            ("field", self.field.is_some()),
            ("form_field", self.form_field.is_some()),
            ("query", self.query.is_some()),
            ("header", self.header.is_some()),
            ("encoding", self.encoding.is_some()),
            ("prefix", self.prefix.is_some()),
            ("secret", self.secret.is_some()),
            ("previous_secret", self.previous_secret.is_some()),
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
            ("tolerance", self.tolerance.is_some()),
        ]
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    pub schedule: Option<Spanned<RawSchedule>>,
    pub webhook: Option<Spanned<RawWebhook>>,
    pub agents: Option<Spanned<Vec<i64>>>,
    pub agent: Option<Spanned<String>>,
    pub when: Option<SpannedTable>,
    pub set: Option<Spanned<SpannedTable>>,
    pub catch_up: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub cron: Spanned<String>,
    pub timezone: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub source: Spanned<String>,
    #[serde(rename = "match")]
    pub match_: Option<SpannedTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShift {
    pub name: Spanned<String>,
    pub agents: Spanned<Vec<i64>>,
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub windows: Vec<Spanned<RawWindow>>,
    pub otherwise: Option<Spanned<SpannedTable>>,
    #[serde(default)]
    pub overrides: Vec<Spanned<RawOverride>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub days: Spanned<String>,
    pub from: Spanned<String>,
    pub to: Spanned<String>,
    pub set: Spanned<SpannedTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverride {
    pub date: Spanned<toml::Value>,
    pub set: Spanned<SpannedTable>,
}
