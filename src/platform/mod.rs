//! The Convirza platform client (and, in `sim`, a fake of it).

pub mod sim;
pub mod token;

pub use token::TokenProvider;

use crate::clock::SharedClock;
use crate::config::{PlatformConfig, TokenSource};
use crate::store::Store;
use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore};

/// Why a platform call failed: what the operator and the retry policy need.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}{}{}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default(), request_id.as_ref().map(|r| format!(" request_id={r}")).unwrap_or_default())]
pub struct PlatformError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
    /// The start of the error body, for the audit trail.
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("request timed out")]
    Timeout,
    #[error("connection failed")]
    Connect,
    #[error("platform answered an error: {0}")]
    Status(String),
    #[error("unreadable response: {0}")]
    Decode(String),
    #[error("request could not be built or sent: {0}")]
    Request(String),
}

impl PlatformError {
    /// Worth retrying later: the platform may well accept the same request then.
    pub fn retryable(&self) -> bool {
        match self.kind {
            ErrorKind::Timeout | ErrorKind::Connect => true,
            ErrorKind::Status(_) => matches!(self.status, Some(408 | 425 | 429 | 500..=599)),
            // A 200 whose body we could not read: the change probably landed. Retrying a
            // PATCH without files is harmless (same fields, same values).
            ErrorKind::Decode(_) => true,
            ErrorKind::Request(_) => false,
        }
    }

    pub fn unauthorized(&self) -> bool {
        self.status == Some(401)
    }
}

/// A successful call: the `data` of the envelope and the platform's request id.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub data: Value,
    pub request_id: Option<String>,
}

#[derive(Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    base_url: String,
    token: TokenProvider,
    limits: Arc<Limits>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Requests per second and requests in flight toward the platform, across all workers.
struct Limits {
    interval: Option<Duration>,
    next_slot: Mutex<tokio::time::Instant>,
    in_flight: Option<Semaphore>,
}

impl Limits {
    async fn acquire(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if let Some(interval) = self.interval {
            let slot = {
                let mut next = self.next_slot.lock().await;
                let slot = (*next).max(tokio::time::Instant::now());
                *next = slot + interval;
                slot
            };
            tokio::time::sleep_until(slot).await;
        }
        match &self.in_flight {
            Some(sem) => sem.acquire().await.ok(),
            None => None,
        }
    }
}

impl PlatformClient {
    pub fn new(
        cfg: &PlatformConfig,
        store: Store,
        clock: SharedClock,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("autopilot/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let token = match &cfg.token {
            TokenSource::Static(s) => TokenProvider::fixed(s.clone()),
            TokenSource::File(path, s) => {
                TokenProvider::file(path.clone(), s.clone(), metrics.clone())
            }
            TokenSource::Login { email, password } => TokenProvider::oauth(
                token::OAuthSettings {
                    url: cfg.oauth_url.clone(),
                    email: email.clone(),
                    password: password.clone(),
                },
                http.clone(),
                store,
                clock,
                metrics.clone(),
            ),
        };
        Ok(Self {
            http,
            base_url: cfg.base_url.clone(),
            token,
            limits: Arc::new(Limits {
                interval: cfg
                    .requests_per_second
                    .map(|r| Duration::from_secs_f64(1.0 / r)),
                next_slot: Mutex::new(tokio::time::Instant::now()),
                in_flight: cfg.max_in_flight.map(Semaphore::new),
            }),
            metrics,
        })
    }

    fn agent_url(&self, id: i64) -> String {
        format!("{}/ai-voice-agents/{id}", self.base_url)
    }

    /// Sends with the current token; after a 401, renews the token once and resends. A
    /// second 401 is final (it can mean "outside your scope", not only "expired").
    async fn send_authed(
        &self,
        build: impl Fn(SecretString) -> reqwest::RequestBuilder,
    ) -> Result<Reply, PlatformError> {
        let token = self.token.bearer().await?;
        let first = {
            let _permit = self.limits.acquire().await;
            read_reply(build(token.clone()).send().await, true).await
        };
        match first {
            Err(e) if e.unauthorized() => {
                if !self.token.after_unauthorized(&token).await? {
                    return Err(e);
                }
                tracing::info!("401: retrying once with a renewed token");
                let token = self.token.bearer().await?;
                let _permit = self.limits.acquire().await;
                read_reply(build(token).send().await, true).await
            }
            other => other,
        }
    }

    /// `GET /ai-voice-agents/{id}`: the agent's current settings.
    pub async fn get_agent(&self, id: i64) -> Result<Reply, PlatformError> {
        let url = self.agent_url(id);
        self.send_authed(|t| {
            self.http
                .get(&url)
                .header(AUTHORIZATION, format!("Bearer {}", t.expose_secret()))
        })
        .await
    }

    /// `PATCH /ai-voice-agents/{id}` as multipart/form-data with the given fields and
    /// file parts (name, content) under `files`.
    pub async fn patch_agent(
        &self,
        id: i64,
        fields: &[(String, String)],
        files: &[(String, Vec<u8>)],
    ) -> Result<Reply, PlatformError> {
        let url = self.agent_url(id);
        let started = std::time::Instant::now();
        let sent = self
            .send_authed(|t| {
                let mut form = reqwest::multipart::Form::new();
                for (k, v) in fields {
                    form = form.text(k.clone(), v.clone());
                }
                for (name, content) in files {
                    form = form.part(
                        "files",
                        reqwest::multipart::Part::bytes(content.clone()).file_name(name.clone()),
                    );
                }
                self.http
                    .patch(&url)
                    .header(AUTHORIZATION, format!("Bearer {}", t.expose_secret()))
                    .multipart(form)
            })
            .await;
        let class = match &sent {
            Ok(r) => crate::metrics::status_class(Some(r.status), false),
            Err(e) => crate::metrics::status_class(e.status, e.kind == ErrorKind::Timeout),
        };
        self.metrics
            .inc("autopilot_patch_attempts_total", &[("class", class)]);
        self.metrics.observe(
            "autopilot_patch_duration_seconds",
            &[],
            started.elapsed().as_secs_f64(),
        );
        sent
    }
}

/// Reads a platform answer. With `envelope`, a success's `data` is the envelope's `data`;
/// without, the whole body (the OAuth endpoints may answer flat).
async fn read_reply(
    sent: Result<reqwest::Response, reqwest::Error>,
    envelope: bool,
) -> Result<Reply, PlatformError> {
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return Err(transport_error(&e)),
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Err(transport_error(&e)),
    };
    // Error bodies are undocumented: tolerate anything, including empty or non-JSON.
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let request_id = json
        .as_ref()
        .and_then(|j| j.get("request_id"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| header_str(&headers, "x-request-id"));
    if status.is_success() {
        return match json {
            Some(Value::Object(mut env)) => Ok(Reply {
                status: status.as_u16(),
                data: if envelope {
                    env.remove("data").unwrap_or(Value::Null)
                } else {
                    Value::Object(env)
                },
                request_id,
            }),
            _ => Err(PlatformError {
                kind: ErrorKind::Decode("a 2xx without a JSON envelope".into()),
                status: Some(status.as_u16()),
                request_id,
                retry_after: None,
                body: Some(snippet(&body)),
            }),
        };
    }
    let message = json
        .as_ref()
        .and_then(|j| j.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    Err(PlatformError {
        kind: ErrorKind::Status(message),
        status: Some(status.as_u16()),
        request_id,
        retry_after: retry_after(&headers, status),
        body: Some(snippet(&body)),
    })
}

fn transport_error(e: &reqwest::Error) -> PlatformError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() || e.is_request() || e.is_body() {
        ErrorKind::Connect
    } else if e.is_builder() {
        ErrorKind::Request(e.to_string())
    } else {
        ErrorKind::Connect
    };
    PlatformError {
        kind,
        status: e.status().map(|s| s.as_u16()),
        request_id: None,
        retry_after: None,
        body: None,
    }
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)?.to_str().ok().map(str::to_string)
}

/// `Retry-After` as seconds or as an HTTP date, on the statuses where it means "later".
fn retry_after(h: &HeaderMap, status: StatusCode) -> Option<Duration> {
    if !matches!(status.as_u16(), 429 | 503) {
        return None;
    }
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let mut end = s.len().min(500);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
