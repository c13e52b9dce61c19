//! Configuration: TOML file → `AUTOPILOT_*` environment overrides → validation.
//!
//! Parsing keeps the location of every value that validation may reject, so each error
//! names `file:line:col`. All errors found are reported together.

mod overrides;
mod raw;

use crate::rules::{Condition, PatchSet, Rule, Schedule, Target, Trigger};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use raw::{RawAuth, RawConfig, RawRule, RawSecret, RawSource};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub platform: PlatformConfig,
    pub queue: QueueConfig,
    pub admin: AdminConfig,
    pub sources: Vec<Source>,
    pub rules: Vec<Rule>,
    pub shifts: Vec<crate::rules::shift::Shift>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Longest time one webhook request may take, body included (then 408).
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub path: PathBuf,
    /// How long a write waits for a lock held by another process before it fails (a
    /// webhook then gets 503).
    pub busy_timeout: Duration,
    /// How long deliveries (the dedupe window), runs and finished jobs are kept.
    pub retention: Duration,
}

#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Without a trailing slash, e.g. `https://platform-api.convirza.com/v3`.
    pub base_url: String,
    /// Without a trailing slash, e.g. `https://platform-oauth.convirza.com`.
    pub oauth_url: String,
    pub token: TokenSource,
    pub timeout: Duration,
    /// At most this many requests a second toward the platform (all workers together).
    pub requests_per_second: Option<f64>,
    /// At most this many requests in flight toward the platform.
    pub max_in_flight: Option<usize>,
}

pub const DEFAULT_OAUTH_URL: &str = "https://platform-oauth.convirza.com";

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Read once at start (environment variable or inline value).
    Static(SecretString),
    /// Read at start and again after a 401, so a rotated file is picked up.
    File(PathBuf, SecretString),
    /// An OAuth login (`POST {oauth_url}/oauth/token`); the pair is kept in the database
    /// and refreshed ahead of expiry.
    Login {
        email: String,
        password: SecretString,
    },
}

/// The admin API: off unless a token is configured.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Loopback unless configured otherwise.
    pub listen: SocketAddr,
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub workers: usize,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a claimed job stays reserved; always longer than the HTTP timeout.
    pub lease: Duration,
    /// Ceiling for a platform's `Retry-After`.
    pub max_retry_after: Duration,
    /// A job still failing this long after it was created is dead.
    pub max_age: Duration,
    /// On shutdown, how long in-flight PATCHes may take before they are cut off.
    pub shutdown_grace: Duration,
    /// `/readyz` fails while a due job has waited longer than this to be sent.
    pub ready_max_due_age: Duration,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub auth: SourceAuth,
    pub id: Option<IdSpec>,
    /// Authenticated deliveries per second (and burst) before 429.
    pub rate_limit: Option<RateLimit>,
    /// JSON pointer to when the event happened (RFC 3339 or Unix seconds).
    pub event_time: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub enum SourceAuth {
    /// A shared secret sent as a static parameter: a JSON body field (pointer), a form
    /// field or a query parameter.
    Static {
        field: Option<String>,
        form_field: Option<String>,
        query: Option<String>,
        secret: SecretString,
    },
    /// An HMAC over the exact raw body, in a header that may carry several signatures.
    Hmac {
        algo: HmacAlgo,
        header: String,
        encoding: SigEncoding,
        prefix: String,
        /// The current secret, then (while rotating) the previous one.
        secrets: Vec<SecretString>,
    },
    Basic {
        username: String,
        password: SecretString,
    },
    /// A secret path segment: `POST /webhooks/{source}/{secret}`.
    PathToken { secret: SecretString },
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`
    /// (`v1,<base64>` entries) over `id.timestamp.body`, HMAC-SHA256 with the decoded
    /// `whsec_` secret.
    StandardWebhooks {
        /// Base64 keys (the `whsec_` prefix removed), current first.
        keys: Vec<SecretString>,
        tolerance: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlgo {
    Sha1,
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigEncoding {
    Hex,
    Base64,
}

#[derive(Debug, Clone)]
pub enum IdSpec {
    /// JSON pointers into the body (for form bodies: `/field_name`), whose values
    /// together identify a delivery, e.g. `/event` and `/call_id`.
    Pointers(Vec<String>),
    /// A request header.
    Header(String),
}

pub const DEFAULT_CATCH_UP: Duration = Duration::from_secs(15 * 60);

impl Config {
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Loads a config file, applies `AUTOPILOT_*` overrides from `env`, validates it.
    pub fn load(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let text = read_text(path)?;
        Self::from_toml(&text, path, env)
    }

    /// Like [`Config::load`], for tools that never contact anything (`plan`): secrets
    /// are checked for shape but not read, so they need not be set.
    pub fn load_offline(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
        let text = read_text(path)?;
        Self::parse(&text, path, env, true)
    }

    /// Parses config text; `origin` names it in errors.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        env: &[(String, String)],
    ) -> Result<Config, ConfigErrors> {
        Self::parse(text, origin, env, false)
    }

    fn parse(
        text: &str,
        origin: &Path,
        env: &[(String, String)],
        offline: bool,
    ) -> Result<Config, ConfigErrors> {
        let (changed, applied) = match overrides::apply(text, env) {
            Ok(r) => r,
            // A file that is not TOML: its own syntax error, at its place (below), rather
            // than the override editor's unlocated one.
            Err(_) if toml::from_str::<toml::Table>(text).is_err() => (text.to_string(), vec![]),
            Err(msg) => return Err(ConfigErrors::single(origin, msg)),
        };
        let base_dir = origin.parent().unwrap_or(Path::new("."));
        let mut errs = ConfigErrors {
            file: origin.to_path_buf(),
            text: text.to_string(),
            items: Vec::new(),
            offline: false,
        };
        let with_overrides = match attempt(&changed, env, base_dir, offline) {
            Ok(c) => return Ok(c),
            Err(items) => items,
        };
        if applied.is_empty() {
            errs.items = with_overrides;
            return Err(errs);
        }
        // Positions in the overridden text would point at lines the user never wrote:
        // an error the file has on its own is shown at its place in the file; one that
        // only the overrides cause names them instead.
        let in_file = attempt(text, env, base_dir, offline)
            .err()
            .unwrap_or_default();
        for (_, msg) in with_overrides {
            match in_file.iter().find(|(_, m)| *m == msg) {
                Some((span, _)) => errs.items.push((span.clone(), msg)),
                None => errs.items.push((
                    None,
                    format!(
                        "{msg} (after the environment overrides {})",
                        applied.join(", ")
                    ),
                )),
            }
        }
        Err(errs)
    }
}

type ErrorItems = Vec<(Option<Range<usize>>, String)>;

/// Parses and validates one text; the errors carry byte spans into that text.
fn attempt(
    text: &str,
    env: &[(String, String)],
    base_dir: &Path,
    offline: bool,
) -> Result<Config, ErrorItems> {
    let mut errs = ConfigErrors {
        file: PathBuf::new(),
        text: String::new(),
        items: Vec::new(),
        offline,
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(vec![(e.span(), e.message().to_string())]),
    };
    match validate(raw, env, base_dir, &mut errs) {
        Some(c) if errs.items.is_empty() => Ok(c),
        _ => Err(errs.items),
    }
}

/// Reads a config file as UTF-8; invalid bytes are reported at their line and column.
fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigErrors::single(path, format!("cannot read the config file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.into_bytes()[..valid]).into_owned();
        ConfigErrors {
            file: path.to_path_buf(),
            text,
            items: vec![(Some(valid..valid), "the file is not UTF-8 text".into())],
            offline: false,
        }
    })
}

/// Only `[database] path` (after overrides), for tools that must not need the secrets.
pub fn database_path(path: &Path, env: &[(String, String)]) -> Result<PathBuf, ConfigErrors> {
    let text = read_text(path)?;
    let (text, _) = overrides::apply(&text, env).map_err(|msg| ConfigErrors::single(path, msg))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let mut errs = ConfigErrors::single(path, String::new());
        errs.text = text.clone();
        errs.items = vec![(e.span(), e.message().to_string())];
        errs
    })?;
    match table.get("database").and_then(|d| d.get("path")) {
        None => Ok(PathBuf::from("data/autopilot.db")),
        Some(toml::Value::String(p)) => Ok(PathBuf::from(p)),
        Some(_) => Err(ConfigErrors::single(
            path,
            "[database] path must be a string".into(),
        )),
    }
}

/// `[server] listen` of a config that may not load: the `AUTOPILOT_SERVER__LISTEN`
/// override, else the first `listen = "…"` under `[server]`, else the default. For the
/// health check only.
pub fn listen_lenient(path: &Path, env: &[(String, String)]) -> SocketAddr {
    let default: SocketAddr = ([127, 0, 0, 1], 8080).into();
    if let Some((_, v)) = env.iter().find(|(k, _)| k == "AUTOPILOT_SERVER__LISTEN") {
        return v.trim().trim_matches('"').parse().unwrap_or(default);
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut in_server = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_server = line == "[server]";
        } else if in_server {
            if let Some(v) = line.strip_prefix("listen").map(str::trim_start) {
                if let Some(v) = v.strip_prefix('=') {
                    let v = v.split('#').next().unwrap_or("").trim().trim_matches('"');
                    return v.parse().unwrap_or(default);
                }
            }
        }
    }
    default
}

/// Every error found in one config, each with its location.
#[derive(Debug)]
pub struct ConfigErrors {
    file: PathBuf,
    text: String,
    items: Vec<(Option<Range<usize>>, String)>,
    /// Validating for an offline tool (`plan`): secrets are checked for shape but not
    /// resolved, so they need not be set.
    offline: bool,
}

impl ConfigErrors {
    fn single(file: &Path, msg: String) -> Self {
        Self {
            file: file.to_path_buf(),
            text: String::new(),
            items: vec![(None, msg)],
            offline: false,
        }
    }

    fn push(&mut self, span: Option<Range<usize>>, msg: impl Into<String>) {
        self.items.push((span, msg.into()));
    }

    fn at<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) {
        self.push(Some(s.span()), msg);
    }

    pub fn messages(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|(span, msg)| {
                let loc = match span {
                    Some(span) => {
                        let (line, col) = line_col(&self.text, span.start);
                        format!("{}:{line}:{col}", self.file.display())
                    }
                    None => self.file.display().to_string(),
                };
                format!("{loc}: {msg}")
            })
            .collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.messages().join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Longest duration any setting takes: keeps every sum and conversion far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn duration(errs: &mut ConfigErrors, s: &Spanned<String>) -> Option<Duration> {
    match humantime::parse_duration(s.get_ref()) {
        Ok(d) if d > MAX_DURATION => {
            errs.at(
                s,
                format!(
                    "duration {:?} is longer than the limit of 366 days",
                    s.get_ref()
                ),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errs.at(
                s,
                format!(
                    "invalid duration {:?}: {e} (write e.g. \"10s\", \"5m\", \"1h 30m\")",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

fn secret(
    errs: &mut ConfigErrors,
    s: &Spanned<RawSecret>,
    env: &[(String, String)],
    base_dir: &Path,
    what: &str,
) -> Option<(SecretString, Option<PathBuf>)> {
    let raw = s.get_ref();
    let given = [raw.env.is_some(), raw.file.is_some(), raw.value.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        errs.at(
            s,
            format!("{what}: give exactly one of {{ env = \"NAME\" }}, {{ file = \"/path\" }} or {{ value = \"...\" }}"),
        );
        return None;
    }
    if errs.offline {
        return Some((SecretString::from("(not read offline)"), None));
    }
    let (value, file) = if let Some(name) = &raw.env {
        match env.iter().find(|(k, _)| k == name) {
            Some((_, v)) => (v.clone(), None),
            None => {
                errs.at(s, format!("{what}: environment variable {name} is not set"));
                return None;
            }
        }
    } else if let Some(file) = &raw.file {
        let path = base_dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(v) => (v.trim_end_matches(['\r', '\n']).to_string(), Some(path)),
            Err(e) => {
                errs.at(s, format!("{what}: cannot read {}: {e}", path.display()));
                return None;
            }
        }
    } else {
        (raw.value.clone().unwrap_or_default(), None)
    };
    if value.is_empty() {
        errs.at(s, format!("{what} is empty"));
        return None;
    }
    Some((SecretString::from(value), file))
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// NaN and infinities have no JSON form: they would be sent as `null`.
fn non_finite(v: &toml::Value) -> bool {
    match v {
        toml::Value::Float(f) => !f.is_finite(),
        toml::Value::Array(items) => items.iter().any(non_finite),
        toml::Value::Table(t) => t.values().any(non_finite),
        _ => false,
    }
}

fn conditions(
    errs: &mut ConfigErrors,
    table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>,
) -> Vec<Condition> {
    let mut out = Vec::new();
    for (k, v) in table {
        if non_finite(v.get_ref()) {
            errs.at(
                v,
                format!("{}: NaN and infinity cannot be compared", k.get_ref()),
            );
            continue;
        }
        match Condition::new(k.get_ref(), &toml_to_json(v.get_ref())) {
            Ok(c) => out.push(c),
            Err(e) => errs.at(v, format!("{}: {e}", k.get_ref())),
        }
    }
    out
}

fn validate(
    raw: RawConfig,
    env: &[(String, String)],
    base_dir: &Path,
    errs: &mut ConfigErrors,
) -> Option<Config> {
    // [server]
    let listen = match raw.server.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.at(
                &raw.server.listen,
                format!(
                    "listen {:?} is not an address such as \"127.0.0.1:8080\"",
                    raw.server.listen.get_ref()
                ),
            );
            None
        }
    };
    let max_body_bytes = raw.server.max_body_bytes.unwrap_or(1 << 20);
    let request_timeout = match &raw.server.request_timeout {
        Some(s) => {
            match duration(errs, s) {
                Some(d) if d < Duration::from_millis(100) => {
                    errs.at(s, "request_timeout must be at least 100ms: a shorter one refuses every webhook");
                    None
                }
                d => d,
            }
        }
        None => Some(Duration::from_secs(15)),
    };

    // [admin]
    let admin_listen = match raw.admin.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.at(
                &raw.admin.listen,
                format!(
                    "listen {:?} is not an address such as \"127.0.0.1:8081\"",
                    raw.admin.listen.get_ref()
                ),
            );
            None
        }
    };
    let admin_token = match &raw.admin.token {
        None => Some(None),
        Some(t) => match secret(errs, t, env, base_dir, "admin token") {
            Some((token, _)) if token.expose_secret().len() < 16 => {
                errs.at(t, "admin token is too short: use at least 16 characters (e.g. `openssl rand -hex 32`; the value is not shown)");
                None
            }
            Some((token, _)) => Some(Some(token)),
            None => None,
        },
    };

    // [database]
    if raw.database.path.get_ref().as_os_str().is_empty() {
        errs.at(&raw.database.path, "database path is empty");
    }
    let busy_timeout = match &raw.database.busy_timeout {
        Some(s) => duration(errs, s),
        None => Some(Duration::from_secs(5)),
    };
    let retention = match &raw.database.retention {
        Some(s) => match duration(errs, s) {
            Some(d) if d < Duration::from_secs(3600) => {
                errs.at(s, "retention must be at least 1h: it is also the window in which a redelivered webhook is recognised as a duplicate");
                None
            }
            d => d,
        },
        None => Some(Duration::from_secs(30 * 24 * 3600)),
    };

    // [platform]
    let p = &raw.platform;
    let url = |errs: &mut ConfigErrors, v: &Spanned<String>, example: &str| {
        let u = v.get_ref().trim_end_matches('/').to_string();
        match reqwest::Url::parse(&u) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            _ => errs.at(
                v,
                format!(
                    "{:?} is not an http(s) URL such as {example:?}",
                    v.get_ref()
                ),
            ),
        }
        u
    };
    let base_url = url(errs, &p.base_url, "https://platform-api.convirza.com/v3");
    let oauth_url = match &p.oauth_url {
        Some(v) => url(errs, v, DEFAULT_OAUTH_URL),
        None => DEFAULT_OAUTH_URL.to_string(),
    };
    let token = token(errs, &p.token, env, base_dir);
    if let Some(r) = &p.requests_per_second {
        if !(0.01..=100_000.0).contains(r.get_ref()) {
            errs.at(r, "requests_per_second must be between 0.01 and 100000");
        }
    }
    if let Some(m) = &p.max_in_flight {
        if !(1..=100_000).contains(m.get_ref()) {
            errs.at(m, "max_in_flight must be between 1 and 100000");
        }
    }
    let timeout = match &p.timeout {
        Some(t) => duration(errs, t),
        None => Some(Duration::from_secs(10)),
    };
    if let (Some(t), Some(span)) = (timeout, &p.timeout) {
        if t > Duration::from_secs(600) {
            errs.at(span, "timeout must be at most 10m");
        }
    }
    if timeout == Some(Duration::ZERO) {
        errs.at(
            p.timeout.as_ref().expect("zero came from the file"),
            "timeout must be more than 0s",
        );
    }

    // [queue]
    let q = &raw.queue;
    let opt_dur = |errs: &mut ConfigErrors, v: &Option<Spanned<String>>, default: Duration| match v
    {
        Some(s) => duration(errs, s),
        None => Some(default),
    };
    let initial_backoff = opt_dur(errs, &q.initial_backoff, Duration::from_secs(1));
    let max_backoff = opt_dur(errs, &q.max_backoff, Duration::from_secs(300));
    let max_retry_after = opt_dur(errs, &q.max_retry_after, Duration::from_secs(600));
    let max_age = opt_dur(errs, &q.max_age, Duration::from_secs(24 * 3600));
    let shutdown_grace = opt_dur(errs, &q.shutdown_grace, Duration::from_secs(15));
    let ready_max_due_age = opt_dur(errs, &q.ready_max_due_age, Duration::from_secs(600));
    let lease = match (&q.lease, timeout) {
        (Some(s), Some(t)) => {
            let l = duration(errs, s);
            if let Some(l) = l {
                if l < t + Duration::from_secs(5) {
                    errs.at(
                        s,
                        format!(
                            "lease {} must be at least the platform timeout ({}) plus 5s, or a slow request could be sent twice",
                            humantime::format_duration(l),
                            humantime::format_duration(t)
                        ),
                    );
                }
            }
            l
        }
        (None, Some(t)) => Some(t + Duration::from_secs(30)),
        _ => None,
    };
    if let Some(w) = &q.workers {
        if !(1..=256).contains(w.get_ref()) {
            errs.at(w, "workers must be between 1 and 256");
        }
    }
    if let Some(m) = &q.max_attempts {
        if *m.get_ref() < 1 {
            errs.at(m, "max_attempts must be at least 1");
        }
    }
    if let (Some(i), Some(m)) = (initial_backoff, max_backoff) {
        if i.is_zero() || m < i {
            errs.at(
                q.max_backoff
                    .as_ref()
                    .or(q.initial_backoff.as_ref())
                    .expect("one was given"),
                "backoff must satisfy 0 < initial_backoff <= max_backoff",
            );
        }
    }

    // [[sources]]
    let mut sources = Vec::new();
    let mut names = HashSet::new();
    for s in &raw.sources {
        // Named even when its auth is invalid, so rules that use it are not reported too.
        let name = s.get_ref().name.get_ref();
        if !names.insert(name.clone()) {
            errs.at(
                &s.get_ref().name,
                format!("source {name:?} is defined twice"),
            );
        }
        if let Some(src) = source(errs, s, env, base_dir) {
            sources.push(src);
        }
    }

    // [[rules]]
    let mut rules = Vec::new();
    let mut rule_names = HashSet::new();
    for r in &raw.rules {
        let name = r.get_ref().name.get_ref().clone();
        if name.starts_with("shift:") {
            errs.at(&r.get_ref().name, "rule names starting with \"shift:\" are reserved for shifts' runs in the audit trail");
        }
        if !rule_names.insert(name.clone()) {
            errs.at(
                &r.get_ref().name,
                format!("rule {name:?} is defined twice; rule names are keys in the audit trail"),
            );
        }
        if let Some(rule) = rule(errs, r, &names, base_dir, raw.defaults.timezone.as_ref()) {
            rules.push(rule);
        }
    }

    // [[shifts]]
    let mut shifts = Vec::new();
    for sh in &raw.shifts {
        let name = sh.get_ref().name.get_ref();
        if !rule_names.insert(name.clone()) {
            errs.at(
                &sh.get_ref().name,
                format!("{name:?} is already the name of a rule or shift"),
            );
        }
        if let Some(s) = shift(errs, sh, base_dir, raw.defaults.timezone.as_ref()) {
            shifts.push(s);
        }
    }

    Some(Config {
        server: ServerConfig {
            listen: listen?,
            max_body_bytes,
            request_timeout: request_timeout?,
        },
        admin: AdminConfig {
            listen: admin_listen?,
            token: admin_token?,
        },
        database: DatabaseConfig {
            path: raw.database.path.into_inner(),
            busy_timeout: busy_timeout?,
            retention: retention?,
        },
        platform: PlatformConfig {
            base_url,
            oauth_url,
            token: token?,
            timeout: timeout?,
            requests_per_second: p.requests_per_second.as_ref().map(|r| *r.get_ref()),
            max_in_flight: p.max_in_flight.as_ref().map(|m| *m.get_ref()),
        },
        queue: QueueConfig {
            workers: q.workers.as_ref().map_or(4, |w| *w.get_ref()),
            max_attempts: q.max_attempts.as_ref().map_or(8, |m| *m.get_ref()),
            initial_backoff: initial_backoff?,
            max_backoff: max_backoff?,
            lease: lease?,
            max_retry_after: max_retry_after?,
            max_age: max_age?,
            shutdown_grace: shutdown_grace?,
            ready_max_due_age: ready_max_due_age?,
        },
        sources,
        rules,
        shifts,
    })
}

fn token(
    errs: &mut ConfigErrors,
    t: &Spanned<raw::RawToken>,
    env: &[(String, String)],
    base_dir: &Path,
) -> Option<TokenSource> {
    let raw = t.get_ref();
    if let Some(login) = &raw.login {
        if raw.env.is_some() || raw.file.is_some() || raw.value.is_some() {
            errs.at(
                t,
                "platform token: give either `login = {...}` or one of env/file/value, not both",
            );
            return None;
        }
        if !login.email.contains('@') {
            errs.at(
                t,
                format!("login email {:?} is not an email address", login.email),
            );
        }
        let password = Spanned::new(
            t.span(),
            RawSecret {
                env: login.password.env.clone(),
                file: login.password.file.clone(),
                value: login.password.value.clone(),
            },
        );
        let (password, _) = secret(errs, &password, env, base_dir, "login password")?;
        return Some(TokenSource::Login {
            email: login.email.clone(),
            password,
        });
    }
    let as_secret = Spanned::new(
        t.span(),
        RawSecret {
            env: raw.env.clone(),
            file: raw.file.clone(),
            value: raw.value.clone(),
        },
    );
    secret(errs, &as_secret, env, base_dir, "platform token").map(|(s, file)| match file {
        Some(path) => TokenSource::File(path, s),
        None => TokenSource::Static(s),
    })
}

fn source(
    errs: &mut ConfigErrors,
    s: &Spanned<RawSource>,
    env: &[(String, String)],
    base_dir: &Path,
) -> Option<Source> {
    let raw = s.get_ref();
    let name = raw.name.get_ref();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errs.at(&raw.name, format!("source name {name:?} must be letters, digits, '-' or '_' (it is a URL path segment)"));
    }
    let id = match (&raw.id, &raw.id_header) {
        (Some(_), Some(h)) => {
            errs.at(
                h,
                "give either `id` (a JSON pointer) or `id_header`, not both",
            );
            None
        }
        (Some(p), None) => {
            let list = match p.get_ref() {
                raw::RawId::One(one) => vec![one.clone()],
                raw::RawId::Many(many) => many.clone(),
            };
            let mut pointers = Vec::new();
            if list.is_empty() {
                errs.at(p, "`id` lists no JSON pointer");
            }
            for one in &list {
                match crate::rules::Condition::new(one, &Value::Bool(true)) {
                    Ok(c) => pointers.push(c.path),
                    Err(e) => errs.at(p, e),
                }
            }
            (pointers.len() == list.len() && !list.is_empty()).then_some(IdSpec::Pointers(pointers))
        }
        (None, Some(h)) => Some(IdSpec::Header(h.get_ref().to_ascii_lowercase())),
        (None, None) => None,
    };
    let auth = auth(errs, &raw.auth, env, base_dir)?;
    // A Standard Webhooks delivery names itself: dedupe on `webhook-id` by default.
    let id = match (&auth, id) {
        (SourceAuth::StandardWebhooks { .. }, None) => Some(IdSpec::Header("webhook-id".into())),
        (_, id) => id,
    };
    let rate_limit = match &raw.rate_limit {
        Some(r) => {
            let rl = r.get_ref();
            let burst = rl
                .burst
                .unwrap_or_else(|| (rl.per_second.ceil() as u32).max(1));
            if !(0.01..=100_000.0).contains(&rl.per_second) || burst == 0 {
                errs.at(
                    r,
                    "rate_limit needs 0.01 <= per_second <= 100000 and burst >= 1",
                );
                return None;
            }
            Some(RateLimit {
                per_second: rl.per_second,
                burst,
            })
        }
        None => None,
    };
    let event_time = match &raw.event_time {
        Some(p) => match crate::rules::Condition::new(p.get_ref(), &Value::Bool(true)) {
            Ok(c) => Some(c.path),
            Err(e) => {
                errs.at(p, e);
                return None;
            }
        },
        None => None,
    };
    Some(Source {
        name: name.clone(),
        auth,
        id,
        rate_limit,
        event_time,
    })
}

fn auth(
    errs: &mut ConfigErrors,
    a: &Spanned<RawAuth>,
    env: &[(String, String)],
    base_dir: &Path,
) -> Option<SourceAuth> {
    let raw = a.get_ref();
    let kind = raw.kind.get_ref().as_str();
    let allowed: &[&str] = match kind {
        "static" => &["field", "form_field", "query", "secret"],
        "hmac-sha256" | "hmac-sha1" | "hmac-sha512" => {
            &["header", "encoding", "prefix", "secret", "previous_secret"]
        }
        "basic" => &["username", "password"],
        "standard-webhooks" => &["secret", "previous_secret", "tolerance"],
        "path" => &["secret"],
        other => {
            errs.at(
                &raw.kind,
                format!(
                    "unknown auth kind {other:?}; use \"static\", \"hmac-sha256\", \"hmac-sha1\", \"hmac-sha512\", \"standard-webhooks\", \"path\" or \"basic\""
                ),
            );
            return None;
        }
    };
    for (key, present) in raw.present_keys() {
        if present && !allowed.contains(&key) {
            errs.at(
                a,
                format!(
                    "`{key}` does not apply to auth kind {kind:?} (it takes {})",
                    allowed.join(", ")
                ),
            );
        }
    }
    let need_secret = |errs: &mut ConfigErrors, s: &Option<Spanned<RawSecret>>, what: &str| match s
    {
        Some(s) => secret(errs, s, env, base_dir, what).map(|(v, _)| v),
        None => {
            errs.at(
                a,
                format!(
                    "auth kind {kind:?} needs `{}`",
                    what.rsplit(' ').next().unwrap_or(what)
                ),
            );
            None
        }
    };
    match kind {
        "static" => {
            let secret = need_secret(errs, &raw.secret, "static secret")?;
            let field = match &raw.field {
                Some(f) => match crate::rules::Condition::new(f.get_ref(), &Value::Bool(true)) {
                    Ok(c) => Some(c.path),
                    Err(e) => {
                        errs.at(f, e);
                        None
                    }
                },
                None => None,
            };
            if field.is_none() && raw.query.is_none() && raw.form_field.is_none() {
                errs.at(a, "auth kind \"static\" needs `field` (a JSON pointer such as \"/static/auth_token\"), `form_field` or `query`");
                return None;
            }
            // The platform sends static parameters of a form-encoded delivery as plain
            // fields: by default the form field is the pointer's last segment.
            let form_field = raw.form_field.clone().or_else(|| {
                field
                    .as_ref()
                    .and_then(|f| f.rsplit('/').next().map(str::to_string))
            });
            Some(SourceAuth::Static {
                field,
                form_field,
                query: raw.query.clone(),
                secret,
            })
        }
        "hmac-sha256" | "hmac-sha1" | "hmac-sha512" => {
            let mut secrets = vec![need_secret(errs, &raw.secret, "hmac secret")?];
            if let Some(previous) = &raw.previous_secret {
                secrets.push(secret(errs, previous, env, base_dir, "previous hmac secret")?.0);
            }
            let algo = match kind {
                "hmac-sha1" => HmacAlgo::Sha1,
                "hmac-sha512" => HmacAlgo::Sha512,
                _ => HmacAlgo::Sha256,
            };
            let Some(header) = raw.header.clone() else {
                errs.at(
                    a,
                    format!("auth kind {kind:?} needs `header` (e.g. \"X-Signature\")"),
                );
                return None;
            };
            let encoding = match raw.encoding.as_ref().map(|e| e.get_ref().as_str()) {
                None | Some("hex") => SigEncoding::Hex,
                Some("base64") => SigEncoding::Base64,
                Some(other) => {
                    errs.at(
                        raw.encoding.as_ref().expect("matched Some"),
                        format!("encoding {other:?} must be \"hex\" or \"base64\""),
                    );
                    return None;
                }
            };
            Some(SourceAuth::Hmac {
                algo,
                header: header.to_ascii_lowercase(),
                encoding,
                prefix: raw.prefix.clone().unwrap_or_default(),
                secrets,
            })
        }
        "path" => {
            let secret = need_secret(errs, &raw.secret, "path secret")?;
            // Offline (plan, healthcheck) the secret is a placeholder: not checked.
            let ok = errs.offline
                || secret
                    .expose_secret()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c));
            if !ok {
                errs.at(a, "a path secret may hold only letters, digits and - _ . ~ (it is a URL segment; the value is not shown)");
                return None;
            }
            Some(SourceAuth::PathToken { secret })
        }
        "standard-webhooks" => {
            let mut keys = Vec::new();
            for (s, what) in [
                (&raw.secret, "standard-webhooks secret"),
                (&raw.previous_secret, "previous standard-webhooks secret"),
            ] {
                let Some(spanned) = s else { continue };
                let key = secret(errs, spanned, env, base_dir, what)?.0;
                let text = key.expose_secret();
                let b64 = text.strip_prefix("whsec_").unwrap_or(text);
                use base64::Engine;
                if !errs.offline
                    && base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .is_err()
                {
                    errs.at(
                        spanned,
                        format!(
                            "{what} must be `whsec_` followed by base64 (the value is not shown)"
                        ),
                    );
                    return None;
                }
                keys.push(SecretString::from(b64.to_string()));
            }
            if keys.is_empty() {
                errs.at(a, "auth kind \"standard-webhooks\" needs `secret`");
                return None;
            }
            let tolerance = match &raw.tolerance {
                Some(t) => duration(errs, t)?,
                None => Duration::from_secs(300),
            };
            Some(SourceAuth::StandardWebhooks { keys, tolerance })
        }
        _ => {
            let password = need_secret(errs, &raw.password, "basic password")?;
            let Some(username) = raw.username.clone() else {
                errs.at(a, "auth kind \"basic\" needs `username`");
                return None;
            };
            Some(SourceAuth::Basic { username, password })
        }
    }
}

/// `files` paths, relative to the config file, made absolute; each must be a readable file.
fn resolve_files(v: &Value, base_dir: &Path) -> Result<Value, String> {
    let list = match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => return Err("`files` must be a path or a list of paths".into()),
    };
    let mut out = Vec::new();
    for p in list {
        let path = base_dir.join(&p);
        match std::fs::File::open(&path).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => {
                let abs = std::fs::canonicalize(&path).unwrap_or(path);
                out.push(Value::String(abs.display().to_string()));
            }
            Ok(_) => return Err(format!("`files`: {} is not a file", path.display())),
            Err(e) => return Err(format!("`files`: cannot read {}: {e}", path.display())),
        }
    }
    Ok(Value::Array(out))
}

/// A PATCH set written in the config: each key checked where it stands.
fn patch_set(
    errs: &mut ConfigErrors,
    s: &Spanned<raw::SpannedTable>,
    base_dir: &Path,
) -> Option<PatchSet> {
    let mut json = serde_json::Map::new();
    let mut ok = true;
    for (k, v) in s.get_ref() {
        if non_finite(v.get_ref()) {
            errs.at(
                v,
                format!("`{}`: NaN and infinity cannot be sent", k.get_ref()),
            );
            ok = false;
            continue;
        }
        let value = toml_to_json(v.get_ref());
        let one = Value::Object([(k.get_ref().clone(), value.clone())].into_iter().collect());
        match PatchSet::from_json(&one) {
            Ok(_) if k.get_ref() == "files" => match resolve_files(&value, base_dir) {
                Ok(files) => {
                    json.insert("files".into(), files);
                }
                Err(e) => {
                    errs.at(v, e);
                    ok = false;
                }
            },
            Ok(_) => {
                json.insert(k.get_ref().clone(), value);
            }
            Err(e) => {
                errs.at(k, e);
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    match PatchSet::from_json(&Value::Object(json)) {
        Ok(set) => Some(set),
        Err(e) => {
            errs.at(s, e);
            None
        }
    }
}

/// `mon-fri`, `sat,sun`, `fri-mon`, `daily`: the days a window starts on (Monday = 0).
fn parse_days(text: &str) -> Result<[bool; 7], String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |s: &str| {
        NAMES
            .iter()
            .position(|n| s.trim().eq_ignore_ascii_case(n))
            .ok_or_else(|| format!("unknown day {s:?} in {text:?}; use mon, tue, wed, thu, fri, sat, sun, ranges like mon-fri, or daily"))
    };
    let mut days = [false; 7];
    if text.trim() == "*" || text.trim().eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

fn parse_time(s: &str) -> Result<chrono::NaiveTime, String> {
    if s.trim() == "24:00" {
        return Ok(chrono::NaiveTime::MIN);
    }
    chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map_err(|_| format!("time {s:?} must be HH:MM, e.g. \"08:00\""))
}

/// A rule's or shift's zone: its own, else `[defaults] timezone`; never a silent UTC.
fn zone(
    errs: &mut ConfigErrors,
    own: Option<&Spanned<String>>,
    default: Option<&Spanned<String>>,
    at: Range<usize>,
    what: &str,
) -> Option<Tz> {
    let Some(z) = own.or(default) else {
        errs.push(
            Some(at),
            format!("{what} names no time zone: add `timezone = \"America/New_York\"` (an IANA name), or set `[defaults] timezone`"),
        );
        return None;
    };
    match z.get_ref().parse::<Tz>() {
        Ok(tz) => Some(tz),
        Err(_) => {
            errs.at(
                z,
                format!(
                    "unknown time zone {:?}; use an IANA name such as \"America/New_York\"",
                    z.get_ref()
                ),
            );
            None
        }
    }
}

fn shift(
    errs: &mut ConfigErrors,
    sh: &Spanned<raw::RawShift>,
    base_dir: &Path,
    default_zone: Option<&Spanned<String>>,
) -> Option<crate::rules::shift::Shift> {
    use crate::rules::shift::{Shift, Window};
    let raw = sh.get_ref();
    let before = errs.items.len();
    let zone = zone(
        errs,
        raw.timezone.as_ref(),
        default_zone,
        sh.span(),
        "shift",
    );
    if raw.agents.get_ref().is_empty() || raw.agents.get_ref().iter().any(|a| *a <= 0) {
        errs.at(
            &raw.agents,
            "agents must be a non-empty list of agent ids (positive integers)",
        );
    }
    let mut windows = Vec::new();
    // Minutes of the week each window covers, to refuse overlaps.
    let mut covered: Vec<(usize, u32, u32, Range<usize>)> = Vec::new();
    let mut reported = HashSet::new();
    for (i, w) in raw.windows.iter().enumerate() {
        let wr = w.get_ref();
        let days = parse_days(wr.days.get_ref())
            .map_err(|e| errs.at(&wr.days, e))
            .ok();
        let from = parse_time(wr.from.get_ref())
            .and_then(|t| {
                if wr.from.get_ref().trim() == "24:00" {
                    Err("`from` cannot be 24:00 (the end of the day); write \"00:00\"".to_string())
                } else {
                    Ok(t)
                }
            })
            .map_err(|e| errs.at(&wr.from, e))
            .ok();
        let to = parse_time(wr.to.get_ref())
            .map_err(|e| errs.at(&wr.to, e))
            .ok();
        let set = patch_set(errs, &wr.set, base_dir);
        if let (Some(from), Some(to)) = (from, to) {
            // `00:00`-`24:00` is a whole day; any other equal pair is empty.
            if from == to && wr.to.get_ref().trim() != "24:00" {
                errs.at(&wr.to, "a window needs `to` different from `from` (a whole day is \"00:00\" to \"24:00\")");
            }
        }
        if let (Some(days), Some(from), Some(to), Some(set)) = (days, from, to, set) {
            use chrono::Timelike;
            let start = from.hour() * 60 + from.minute();
            let mut len = (to.hour() * 60 + to.minute() + 1440 - start) % 1440;
            if len == 0 {
                len = 1440;
            }
            for (d, on) in days.iter().enumerate() {
                if *on {
                    let s = d as u32 * 1440 + start;
                    for (j, os, olen, _) in &covered {
                        // Compare on the weekly circle.
                        let week = 7 * 1440;
                        let overlap = |a: u32, al: u32, b: u32, bl: u32| {
                            let d = (b + week - a) % week;
                            d < al || (week - d) % week < bl
                        };
                        if *j != i && overlap(s, len, *os, *olen) && reported.insert((*j, i)) {
                            errs.at(
                                w,
                                format!(
                                    "window {} overlaps window {} of shift {:?}",
                                    i + 1,
                                    j + 1,
                                    raw.name.get_ref()
                                ),
                            );
                        }
                    }
                    covered.push((i, s, len, w.span()));
                }
            }
            windows.push(Window {
                label: format!(
                    "{} {}-{}",
                    wr.days.get_ref(),
                    wr.from.get_ref(),
                    wr.to.get_ref()
                ),
                days,
                from,
                to,
                set,
            });
        }
    }
    let otherwise = raw
        .otherwise
        .as_ref()
        .and_then(|o| patch_set(errs, o, base_dir));
    let mut overrides = std::collections::BTreeMap::new();
    for o in &raw.overrides {
        let or = o.get_ref();
        let text = match or.date.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Datetime(d) => d.to_string(),
            other => other.to_string(),
        };
        match chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d") {
            Ok(d) => {
                if let Some(set) = patch_set(errs, &or.set, base_dir) {
                    if overrides.insert(d, set).is_some() {
                        errs.at(&or.date, format!("date {d} has two overrides"));
                    }
                }
            }
            Err(_) => errs.at(&or.date, format!("date {text:?} must be YYYY-MM-DD")),
        }
    }
    if raw.windows.is_empty() && overrides.is_empty() {
        errs.at(sh, "a shift needs `windows` (or at least `overrides`)");
    }
    if errs.items.len() > before {
        return None;
    }
    Some(Shift {
        name: raw.name.get_ref().clone(),
        agents: raw.agents.get_ref().clone(),
        zone: zone?,
        windows,
        otherwise,
        overrides,
    })
}

/// A standard 5-field cron expression; an error names the field at fault.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    const FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
    let parser = CronParser::builder().seconds(Seconds::Disallowed).build();
    let err = match parser.parse(expr) {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let shape = "5 fields: minute hour day-of-month month day-of-week";
    if parts.len() == 6 {
        return Err(format!(
            "cron expression {expr:?} has 6 fields; a seconds field is not supported ({shape})"
        ));
    }
    if parts.len() != 5 {
        return Err(format!("bad cron expression {expr:?}: {err} ({shape})"));
    }
    for (i, field) in FIELDS.iter().enumerate() {
        let probe: Vec<&str> = (0..5)
            .map(|j| if j == i { parts[i] } else { "*" })
            .collect();
        if let Err(e) = parser.parse(&probe.join(" ")) {
            return Err(format!(
                "bad cron expression {expr:?}: the {field} field {:?} is invalid ({e}; {shape})",
                parts[i]
            ));
        }
    }
    Err(format!("bad cron expression {expr:?}: {err} ({shape})"))
}

fn rule(
    errs: &mut ConfigErrors,
    r: &Spanned<RawRule>,
    sources: &HashSet<String>,
    base_dir: &Path,
    default_zone: Option<&Spanned<String>>,
) -> Option<Rule> {
    let raw = r.get_ref();
    let name = raw.name.get_ref().clone();
    if name.trim().is_empty() {
        errs.at(&raw.name, "rule name is empty");
    }
    let before = errs.items.len();
    let trigger = match (&raw.schedule, &raw.webhook) {
        (Some(spanned), None) => {
            let s = spanned.get_ref();
            let cron = parse_cron(s.cron.get_ref());
            let zone = zone(
                errs,
                s.timezone.as_ref(),
                default_zone,
                spanned.span(),
                "schedule",
            )
            .ok_or(());
            if let Err(e) = &cron {
                errs.at(&s.cron, e.clone());
            }
            match (cron, zone) {
                (Ok(cron), Ok(zone)) => {
                    let schedule = Schedule {
                        expr: s.cron.get_ref().clone(),
                        cron,
                        zone,
                    };
                    if schedule.next_after(chrono::Utc::now()).is_none() {
                        errs.at(
                            &s.cron,
                            format!(
                                "cron expression {:?} never fires (no such date)",
                                s.cron.get_ref()
                            ),
                        );
                    }
                    Some(Trigger::Schedule(Box::new(schedule)))
                }
                _ => None,
            }
        }
        (None, Some(w)) => {
            let w = w.get_ref();
            if !sources.contains(w.source.get_ref()) {
                errs.at(
                    &w.source,
                    format!(
                        "webhook source {:?} is not defined in [[sources]]",
                        w.source.get_ref()
                    ),
                );
            }
            let conditions = w
                .match_
                .as_ref()
                .map(|m| conditions(errs, m))
                .unwrap_or_default();
            Some(Trigger::Webhook {
                source: w.source.get_ref().clone(),
                conditions,
            })
        }
        (Some(_), Some(w)) => {
            errs.at(
                w,
                format!("rule {name:?} has both `schedule` and `webhook`; make two rules"),
            );
            None
        }
        (None, None) => {
            errs.at(r, format!("rule {name:?} needs a trigger: `schedule = {{ cron = ..., timezone = ... }}` or `webhook = {{ source = ... }}`"));
            None
        }
    };
    let target = match (&raw.agents, &raw.agent, &trigger) {
        (Some(a), None, _) => {
            let ids = a.get_ref();
            if ids.is_empty() || ids.iter().any(|id| *id <= 0) {
                errs.at(
                    a,
                    "agents must be a non-empty list of agent ids (positive integers)",
                );
            }
            Some(Target::Agents(ids.clone()))
        }
        (None, Some(p), Some(Trigger::Webhook { .. })) => {
            match crate::rules::Condition::new(p.get_ref(), &Value::Bool(true)) {
                Ok(c) => Some(Target::FromEvent(c.path)),
                Err(e) => {
                    errs.at(p, e);
                    None
                }
            }
        }
        (None, Some(p), _) => {
            errs.at(p, "`agent` (read from the delivery) only works on webhook rules; list `agents = [...]`");
            None
        }
        (Some(_), Some(p), _) => {
            errs.at(
                p,
                "give either `agents = [...]` or `agent = \"/pointer\"`, not both",
            );
            None
        }
        (None, None, _) => {
            errs.at(r, format!("rule {name:?} names no agents: add `agents = [101]` or `agent = \"/ai_voice_agent_id\"`"));
            None
        }
    };
    let when = raw
        .when
        .as_ref()
        .map(|w| conditions(errs, w))
        .unwrap_or_default();
    let set = match &raw.set {
        Some(s) => patch_set(errs, s, base_dir),
        None => {
            errs.at(
                r,
                format!("rule {name:?} has no `set`: name the fields to change"),
            );
            None
        }
    };
    let catch_up = match &raw.catch_up {
        Some(c) => duration(errs, c),
        None => Some(DEFAULT_CATCH_UP),
    };
    if errs.items.len() > before {
        return None;
    }
    Some(Rule {
        name,
        trigger: trigger?,
        target: target?,
        when,
        set: set?,
        catch_up: catch_up?,
    })
}

#[cfg(test)]
mod tests;
