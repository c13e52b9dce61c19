//! The HTTP face: webhook ingest and health.

pub mod admin;
pub mod auth;

use crate::clock::SharedClock;
use crate::config::IdSpec;
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
    /// Token buckets of the sources that have a `rate_limit`, made on first use and
    /// replaced when a reload changes the limit.
    pub limits: Arc<std::sync::Mutex<HashMap<String, Bucket>>>,
    pub live: Arc<crate::reload::LiveConfig>,
    pub store: Store,
    pub clock: SharedClock,
    /// Wakes the queue workers after jobs are committed.
    pub queue_notify: Arc<Notify>,
    pub metrics: Arc<crate::metrics::Metrics>,
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

/// Takes a token from the source's bucket (after a reload changed its limit, from a new
/// bucket). `Err` says how long until one is there.
fn take_token(
    limits: &std::sync::Mutex<HashMap<String, Bucket>>,
    source: &str,
    limit: crate::config::RateLimit,
) -> Result<(), std::time::Duration> {
    let mut all = limits.lock().unwrap_or_else(|e| e.into_inner());
    let bucket = all
        .entry(source.to_string())
        .or_insert_with(|| Bucket::new(limit));
    if bucket.limit != limit {
        *bucket = Bucket::new(limit);
    }
    bucket.take()
}

pub fn router(state: AppState) -> Router {
    let config = state.live.current();
    let limit = config.server.max_body_bytes;
    let timeout = config.server.request_timeout;
    Router::new()
        .route("/webhooks/{source}", post(ingest))
        .route("/webhooks/{source}/{token}", post(ingest))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
        // The timeout layer answers with an empty body: give it the JSON every error has.
        .layer(axum::middleware::map_response(|resp: Response| async move {
            if resp.status() == StatusCode::REQUEST_TIMEOUT {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request took longer than request_timeout; it may or may not have been stored: send it again (a stored copy is answered as a duplicate)",
                )
                .into_response()
            } else {
                resp
            }
        }))
        .with_state(state)
}

/// An HTTP error answered as JSON. Internal causes are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

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
    let (ready, body) = readiness(&st).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Is the daemon doing its job? Each check names what is wrong; a failed config reload
/// is a warning (the previous config keeps running), not a reason to take the daemon
/// out of service.
pub async fn readiness(st: &AppState) -> (bool, Value) {
    let now = st.clock.now();
    let config = st.live.current();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut checks = Map::new();

    let database = match st.store.check_writable().await {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            error!(error = %e, "readiness: the database is not writable");
            problems.push("database is not writable".to_string());
            "not writable".to_string()
        }
    };
    checks.insert("database".into(), json!(database));
    if st.store.ingest_failing() {
        problems.push("webhook deliveries cannot be stored (the last attempt failed: disk full or read-only?); they are answered 503".to_string());
    }

    let tick = st
        .metrics
        .value("autopilot_scheduler_last_tick_timestamp_seconds", &[]) as i64;
    let since_tick = now.timestamp() - tick;
    if since_tick > SCHEDULER_STALL.as_secs() as i64 {
        problems.push(format!(
            "scheduler has not ticked for {since_tick}s (limit {}s)",
            SCHEDULER_STALL.as_secs()
        ));
    }
    checks.insert("scheduler_last_tick_seconds_ago".into(), json!(since_tick));

    match st.store.oldest_due(now).await {
        Ok(oldest) => {
            let age = oldest.map_or(0, |t| (now - t).num_seconds().max(0));
            let limit = config.queue.ready_max_due_age.as_secs() as i64;
            if age > limit {
                problems.push(format!(
                    "a due job has waited {age}s to be sent (limit {limit}s, [queue] ready_max_due_age)"
                ));
            }
            checks.insert("oldest_due_job_seconds".into(), json!(age));
        }
        Err(e) => {
            error!(error = %e, "readiness: cannot read the queue");
            problems.push("cannot read the queue".to_string());
        }
    }

    let reload = st.live.status();
    if let Some(e) = &reload.last_error {
        warnings.push(format!(
            "the last config reload failed; the configuration loaded at {} keeps running: {e}",
            reload.loaded_at
        ));
    }
    checks.insert(
        "config".into(),
        json!({"loaded_at": reload.loaded_at, "reloads": reload.reloads, "last_reload_error": reload.last_error}),
    );

    let ready = problems.is_empty();
    (
        ready,
        json!({
            "status": if ready { "ready" } else { "not ready" },
            "problems": problems,
            "warnings": warnings,
            "checks": checks,
        }),
    )
}

/// `/readyz` fails when the scheduler has not woken for this long (it wakes at least
/// once a minute).
pub const SCHEDULER_STALL: std::time::Duration = std::time::Duration::from_secs(120);

async fn metrics(State(st): State<AppState>) -> Response {
    let now = st.clock.now();
    let mut gauges: Vec<crate::metrics::Gauge> = Vec::new();
    match (st.store.job_counts().await, st.store.oldest_due(now).await) {
        (Ok(counts), Ok(oldest)) => {
            for state in crate::store::JobStatus::ALL.map(crate::store::JobStatus::as_str) {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state)
                    .map_or(0, |(_, n)| *n);
                gauges.push((
                    "autopilot_jobs",
                    vec![("state", state.to_string())],
                    n as f64,
                ));
                if state == "dead" {
                    gauges.push(("autopilot_dead_letters", vec![], n as f64));
                }
            }
            let age = oldest.map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
            gauges.push(("autopilot_oldest_due_job_age_seconds", vec![], age));
        }
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "metrics: cannot read the queue");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cannot read the database")
                .into_response();
        }
    }
    let (commits, committed, busy) = st.store.ingest_stats();
    gauges.push(("autopilot_ingest_busy_seconds_total", vec![], busy));
    gauges.push(("autopilot_ingest_commits_total", vec![], commits as f64));
    gauges.push((
        "autopilot_ingest_committed_deliveries_total",
        vec![],
        committed as f64,
    ));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&gauges),
    )
        .into_response()
}

/// How a webhook body is read, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    body_kind_of(ct)
}

/// The body kind of a `Content-Type` value (`""` when there is none); 415 otherwise.
pub fn body_kind_of(ct: &str) -> Result<BodyKind, ApiError> {
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

/// A webhook body as the JSON object the rules see; 400 if it is not one.
pub fn parse_body(kind: BodyKind, body: &[u8]) -> Result<Value, ApiError> {
    let payload = match kind {
        BodyKind::Json => serde_json::from_slice::<Value>(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("body is not valid JSON: {e}"),
            )
        })?,
        BodyKind::Form => form_to_json(body),
    };
    if !payload.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body must be a JSON object",
        ));
    }
    Ok(payload)
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

/// The webhook endpoint: [`ingest_one`], counted in the metrics by its answer.
async fn ingest(
    State(st): State<AppState>,
    segments: Result<Path<Vec<String>>, axum::extract::rejection::PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // Only configured names become label values: a flood of made-up source names must
    // not grow the metrics without bound.
    // One configuration for the whole request, even if a reload swaps it meanwhile.
    let config = st.live.current();
    let source = match &segments {
        Ok(Path(s)) => s
            .first()
            .filter(|n| config.source(n).is_some())
            .cloned()
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let metrics = st.metrics.clone();
    let resp = ingest_one(st, &config, segments, uri, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let status = resp.status();
    let reason = match status.as_u16() {
        202 => {
            metrics.inc(
                "autopilot_deliveries_received_total",
                &[("source", &source)],
            );
            return resp;
        }
        200 => {
            metrics.inc(
                "autopilot_deliveries_duplicate_total",
                &[("source", &source)],
            );
            return resp;
        }
        401 => "unauthorized",
        404 => "unknown_source",
        413 => "too_large",
        415 => "unsupported_type",
        429 => "rate_limited",
        503 => "storage_unavailable",
        400 => "bad_body",
        _ => "other",
    };
    metrics.inc(
        "autopilot_deliveries_rejected_total",
        &[("source", &source), ("reason", reason)],
    );
    resp
}

async fn ingest_one(
    st: AppState,
    config: &crate::config::Config,
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
    let Some(source) = config.source(&source_name) else {
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
    let mut payload = parse_body(kind, &body)?;
    let is_form = kind == BodyKind::Form;
    if verdict == Verdict::NeedsBody {
        if let Verdict::Denied(why) = auth::check_static_body(&source.auth, &payload, is_form) {
            return Err(unauthorized(&source.name, why));
        }
    }
    // Counted after authentication, so forged floods cannot spend a sender's budget.
    if let Some(limit) = source.rate_limit {
        if let Err(wait) = take_token(&st.limits, &source.name, limit) {
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
    let rules: Vec<_> = config
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
                Decision::Matched(outcomes) => {
                    Some(NewRun::from_outcomes(r, outcomes, now, None, &config.rules))
                }
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
            for run in &runs {
                st.metrics.inc(
                    "autopilot_rule_fires_total",
                    &[("rule", &run.rule), ("trigger", "webhook")],
                );
                if run.skipped > 0 {
                    st.metrics.add(
                        "autopilot_rule_skips_total",
                        &[("rule", &run.rule), ("reason", "condition")],
                        run.skipped as f64,
                    );
                }
            }
            if jobs > 0 {
                // One worker per delivery, not all of them: under a burst, waking every
                // idle worker per delivery costs a claim each, mostly in vain.
                st.queue_notify.notify_one();
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
        // Every pointer must have a value; one pointer keeps the plain `id:<value>` key.
        Some(IdSpec::Pointers(pointers)) => pointers
            .iter()
            .map(|p| {
                payload.pointer(p).and_then(|v| match v {
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
            })
            .collect::<Option<Vec<_>>>()
            .map(|values| values.join("\u{1f}")),
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
