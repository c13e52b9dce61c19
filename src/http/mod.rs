//! The HTTP face: webhook ingest and health.

mod auth;

use crate::clock::SharedClock;
use crate::config::{Config, IdSpec};
use crate::rules::{self, Decision};
use crate::store::{DeliveryOutcome, NewDelivery, NewRun, Store};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

pub use auth::Verdict;

#[derive(Clone)]
pub struct AppState {
    /// Token buckets of the sources that have a `rate_limit`.
    pub limits: Arc<HashMap<String, std::sync::Mutex<Bucket>>>,
    pub config: Arc<Config>,
    pub store: Store,
    pub clock: SharedClock,
    /// Wakes the queue workers after jobs are committed.
    pub queue_notify: Arc<Notify>,
}

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
pub struct Bucket {
    limit: crate::config::RateLimit,
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    pub fn new(limit: crate::config::RateLimit) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            at: std::time::Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), std::time::Duration> {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.limit.per_second;
        self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limit.per_second,
            ))
        }
    }
}

/// The buckets for a config's sources.
pub fn buckets(config: &Config) -> HashMap<String, std::sync::Mutex<Bucket>> {
    config
        .sources
        .iter()
        .filter_map(|s| {
            Some((
                s.name.clone(),
                std::sync::Mutex::new(Bucket::new(s.rate_limit?)),
            ))
        })
        .collect()
}

pub fn router(state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    let timeout = state.config.server.request_timeout;
    Router::new()
        .route("/webhooks/{source}", post(ingest))
        .route("/webhooks/{source}/{token}", post(ingest))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(DefaultBodyLimit::max(limit))
        // A sender that trickles its body is cut off (408) instead of holding a slot.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

/// An HTTP error answered as JSON. Internal causes are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        resp
    }
}

async fn readyz(State(st): State<AppState>) -> Response {
    match st.store.ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            error!(error = %e, "readiness: database not usable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "not ready", "problems": ["database is not usable"]})),
            )
                .into_response()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyKind::Json),
        m if m.starts_with("application/") && m.ends_with("+json") => Ok(BodyKind::Json),
        "application/x-www-form-urlencoded" => Ok(BodyKind::Form),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "unsupported content type {:?}: send application/json or application/x-www-form-urlencoded",
                if ct.is_empty() { "(none)" } else { ct }
            ),
        )),
    }
}

/// A form body as a JSON object of strings; a repeated field becomes a list. A raw line
/// break cannot be part of a url-encoded value (it would be `%0A`), so trailing CR/LF
/// after the last field is dropped rather than glued onto its value.
fn form_to_json(body: &[u8]) -> Value {
    let mut map = Map::new();
    let end = body.len()
        - body
            .iter()
            .rev()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
    for (k, v) in form_urlencoded::parse(&body[..end]) {
        let v = Value::String(v.into_owned());
        match map.get_mut(k.as_ref()) {
            Some(Value::Array(items)) => items.push(v),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, v]);
            }
            None => {
                map.insert(k.into_owned(), v);
            }
        }
    }
    Value::Object(map)
}

fn unauthorized(source: &str, why: &str) -> ApiError {
    // The reason goes to the debug log only; it never holds secret material.
    debug!(source, reason = why, "webhook rejected");
    warn!(source, "webhook rejected: authentication failed");
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized")
}

async fn ingest(
    State(st): State<AppState>,
    segments: Result<Path<Vec<String>>, axum::extract::rejection::PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    // `/webhooks/{source}` or `/webhooks/{source}/{token}` (a secret path segment).
    let (source_name, path_token) = match segments {
        Ok(Path(mut s)) if s.len() == 1 => (s.remove(0), None),
        Ok(Path(mut s)) if s.len() == 2 => {
            let token = s.pop();
            (s.remove(0), token)
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown webhook source",
            ))
        }
    };
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let Some(source) = st.config.source(&source_name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown webhook source",
        ));
    };
    let kind = body_kind(&headers)?;
    let offered = auth::Offered {
        headers: &headers,
        query: uri.query(),
        raw_body: &body,
        now: st.clock.now().timestamp(),
        path_token: path_token.as_deref(),
    };
    // Nothing touches the body before the signature over its raw bytes is checked.
    let verdict = auth::verify_raw(&source.auth, &offered);
    if let Verdict::Denied(why) = verdict {
        return Err(unauthorized(&source.name, why));
    }
    let mut payload = match kind {
        BodyKind::Json => serde_json::from_slice::<Value>(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body is not valid JSON: {e}"),
            )
        })?,
        BodyKind::Form => form_to_json(&body),
    };
    if !payload.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object",
        ));
    }
    let is_form = kind == BodyKind::Form;
    if verdict == Verdict::NeedsBody {
        if let Verdict::Denied(why) = auth::check_static_body(&source.auth, &payload, is_form) {
            return Err(unauthorized(&source.name, why));
        }
    }
    // Counted after authentication, so forged floods cannot spend a sender's budget.
    if let Some(bucket) = st.limits.get(&source.name) {
        let taken = bucket.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(wait) = taken {
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded; retry later",
            )
            .into_response();
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Ok(resp);
        }
    }

    // A static secret travels in the body: the body hash (the fallback dedupe key) is
    // taken over the redacted payload, so the stored key cannot confirm a guessed secret.
    let redacted = auth::redact(&source.auth, &mut payload, is_form);
    let hashed: Vec<u8> = if redacted {
        payload.to_string().into_bytes()
    } else {
        body.to_vec()
    };
    let dedupe_key = dedupe_key(
        source.id.as_ref(),
        &headers,
        &payload,
        &hashed,
        &source.name,
    );
    let now = st.clock.now();

    // Evaluate every rule of this source against what we know of its agents.
    let rules: Vec<_> = st
        .config
        .rules
        .iter()
        .filter(|r| r.is_webhook_for(&source.name))
        .collect();
    let agent_ids: Vec<i64> = rules
        .iter()
        .filter_map(|r| r.target_agents(Some(&payload)).ok())
        .flatten()
        .collect();
    let known = st
        .store
        .agent_states(&agent_ids)
        .await
        .map_err(storage_error)?;
    let runs: Vec<NewRun> = rules
        .iter()
        .filter_map(
            |r| match rules::evaluate_delivery(r, &source.name, &payload, &known) {
                Decision::NotMatched => None,
                Decision::Matched(outcomes) => Some(NewRun::from_outcomes(
                    r,
                    outcomes,
                    now,
                    None,
                    &st.config.rules,
                )),
            },
        )
        .collect();

    let event_at = source.event_time.as_ref().and_then(|p| {
        let at = payload.pointer(p).and_then(|v| match v {
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc))
                .or_else(|| s.trim().parse::<i64>().ok().and_then(|n| chrono::DateTime::from_timestamp(n, 0))),
            Value::Number(n) => n.as_i64().and_then(|n| chrono::DateTime::from_timestamp(n, 0)),
            _ => None,
        });
        if at.is_none() {
            warn!(source = %source.name, pointer = %p, "delivery has no readable event time; not checked for order");
        }
        at
    });
    let delivery = NewDelivery {
        event_at,
        source: source.name.clone(),
        dedupe_key,
        received_at: now,
        content_type: if is_form { "form" } else { "json" }.to_string(),
        payload,
    };
    match st
        .store
        .record_delivery(&delivery, &runs)
        .await
        .map_err(storage_error)?
    {
        DeliveryOutcome::Accepted { delivery_id, jobs } => {
            info!(source = %source.name, delivery_id, runs = runs.len(), jobs, "webhook accepted");
            if jobs > 0 {
                st.queue_notify.notify_waiters();
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"status": "accepted", "delivery_id": delivery_id, "rules_matched": runs.len(), "jobs": jobs})),
            )
                .into_response())
        }
        DeliveryOutcome::Duplicate => {
            info!(source = %source.name, "duplicate webhook delivery ignored");
            Ok((StatusCode::OK, Json(json!({"status": "duplicate"}))).into_response())
        }
    }
}

fn storage_error(e: crate::store::StoreError) -> ApiError {
    error!(error = %e, "could not commit a webhook delivery; answering 503 so the sender retries");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage unavailable; retry later",
    )
}

fn dedupe_key(
    id: Option<&IdSpec>,
    headers: &HeaderMap,
    payload: &Value,
    raw: &[u8],
    source: &str,
) -> String {
    let found = match id {
        Some(IdSpec::Pointer(p)) => payload.pointer(p).and_then(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }),
        Some(IdSpec::Header(h)) => headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        None => None,
    };
    match (found, id) {
        (Some(v), _) => format!("id:{v}"),
        (None, Some(_)) => {
            warn!(
                source,
                "delivery has no value at the configured id; deduplicating on the body hash"
            );
            format!("sha256:{}", hex::encode(Sha256::digest(raw)))
        }
        (None, None) => format!("sha256:{}", hex::encode(Sha256::digest(raw))),
    }
}
