//! The admin API under `/api`, on its own listener (loopback by default), served only
//! when `[admin] token` is configured. Every request needs `Authorization: Bearer
//! <token>`, compared in constant time. Answers and errors are JSON.

use super::{ApiError, AppState};
use crate::rules::{self, AgentOutcome, Decision, Trigger};
use crate::store::{JobStatus, NewRun, RunFilter};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

/// Most rows one list answer holds.
const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/rules", get(list_rules))
        .route("/api/rules/{name}/fire", post(fire_rule))
        .route("/api/runs", get(list_runs))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/jobs/{id}/discard", post(discard_job))
        .route("/api/agents/{id}", get(show_agent))
        .route("/api/status", get(status))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Bearer token check. Both sides are hashed first, so the comparison takes the same
/// time whatever the length or content of the guess.
async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let config = st.live.current();
    let Some(expected) = config.admin.token.as_ref() else {
        return ApiError::new(StatusCode::NOT_FOUND, "the admin API is off").into_response();
    };
    let offered = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let ok = offered.is_some_and(|t| {
        let a = Sha256::digest(t.as_bytes());
        let b = Sha256::digest(expected.expose_secret().as_bytes());
        bool::from(a.ct_eq(&b))
    });
    if !ok {
        warn!(
            path = %req.uri().path(),
            missing = offered.is_none(),
            "admin API: request without the right token refused"
        );
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send Authorization: Bearer <[admin] token>",
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    next.run(req).await
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn storage(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "admin API: database error");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
}

/// Query parameters, decoded leniently (an undecodable byte becomes U+FFFD and then
/// fails the parameter's own check, with a JSON error naming it).
fn params(raw: Option<String>) -> HashMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Query parameters, each checked, every unknown one refused (a typo must not silently
/// widen a filter).
struct Filters<'a> {
    params: &'a HashMap<String, String>,
}

impl<'a> Filters<'a> {
    fn new(params: &'a HashMap<String, String>, known: &[&str]) -> Result<Self, ApiError> {
        if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad_request(if known.is_empty() {
                format!("unknown query parameter {k:?}; this endpoint takes none")
            } else {
                format!(
                    "unknown query parameter {k:?}; this endpoint takes {}",
                    known.join(", ")
                )
            }));
        }
        Ok(Self { params })
    }

    fn text(&self, name: &str) -> Option<String> {
        self.params.get(name).cloned()
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.params
            .get(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| bad_request(format!("{name}={v:?} is not an integer")))
            })
            .transpose()
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.params
            .get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        bad_request(format!(
                            "{name}={v:?} is not an RFC 3339 time such as 2026-12-03T18:00:00Z"
                        ))
                    })
            })
            .transpose()
    }

    fn limit(&self) -> Result<i64, ApiError> {
        match self.int("limit")? {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(bad_request(format!(
                "limit={n} is out of range 1..={MAX_LIMIT}"
            ))),
        }
    }
}

/// `GET /api/rules`: every rule with its trigger and next fires; every shift with the
/// stretch in force now.
async fn list_rules(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    Filters::new(&params(raw), &[])?;
    let config = st.live.current();
    let now = st.clock.now();
    let rules: Vec<Value> = config
        .rules
        .iter()
        .map(|rule| {
            let agents = rule.target_agents(None).ok();
            match &rule.trigger {
                Trigger::Schedule(s) => {
                    let mut next = Vec::new();
                    let mut t = now;
                    while next.len() < 3 {
                        match s.next_after(t) {
                            Some(n) => {
                                next.push(json!({"at": n, "local": n.with_timezone(&s.zone).fixed_offset()}));
                                t = n;
                            }
                            None => break,
                        }
                    }
                    json!({
                        "name": rule.name, "kind": "schedule", "cron": s.expr,
                        "timezone": s.zone.name(), "catch_up_seconds": rule.catch_up.as_secs(),
                        "agents": agents, "set": rule.set.to_json(), "next_fires": next,
                    })
                }
                Trigger::Webhook { source, .. } => json!({
                    "name": rule.name, "kind": "webhook", "source": source,
                    "agents": agents, "set": rule.set.to_json(),
                }),
            }
        })
        .collect();
    let shifts: Vec<Value> = config
        .shifts
        .iter()
        .map(|shift| {
            let seg = shift.segment_at(now);
            json!({
                "name": shift.name, "timezone": shift.zone.name(), "agents": shift.agents,
                "now": {"label": seg.label, "since": seg.start, "until": seg.end,
                        "set": seg.set.as_ref().map(|s| s.to_json())},
            })
        })
        .collect();
    Ok(Json(json!({"rules": rules, "shifts": shifts})).into_response())
}

/// `GET /api/runs?rule=&agent=&since=&until=&limit=`: the audit trail, newest first,
/// each run with its jobs and their outcomes.
async fn list_runs(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(raw);
    let f = Filters::new(&params, &["rule", "agent", "since", "until", "limit"])?;
    let filter = RunFilter {
        rule: f.text("rule"),
        agent: f.int("agent")?,
        since: f.time("since")?,
        until: f.time("until")?,
        limit: f.limit()?,
    };
    let runs = st.store.find_runs(&filter).await.map_err(storage)?;
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let jobs = st.store.jobs_of_run(run.id).await.map_err(storage)?;
        let mut v = serde_json::to_value(&run).unwrap_or_default();
        v["jobs"] = serde_json::to_value(jobs).unwrap_or_default();
        out.push(v);
    }
    Ok(Json(json!({"runs": out})).into_response())
}

/// `GET /api/jobs?state=&agent=&limit=`: jobs newest first.
async fn list_jobs(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(raw);
    let f = Filters::new(&params, &["state", "agent", "limit"])?;
    let state = f
        .text("state")
        .map(|s| s.parse::<JobStatus>().map_err(bad_request))
        .transpose()?;
    let jobs = st
        .store
        .find_jobs(state.map(JobStatus::as_str), f.int("agent")?, f.limit()?)
        .await
        .map_err(storage)?;
    Ok(Json(json!({"jobs": jobs})).into_response())
}

fn job_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| bad_request(format!("job id {raw:?} is not an integer")))
}

/// `GET /api/jobs/{id}`: a job and every attempt.
async fn show_job(
    State(st): State<AppState>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    Filters::new(&params(query), &[])?;
    let id = job_id(&raw)?;
    let Some(job) = st.store.job(id).await.map_err(storage)? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}")));
    };
    let attempts = st.store.attempts(id).await.map_err(storage)?;
    Ok(Json(json!({"job": job, "attempts": attempts})).into_response())
}

async fn retry_job(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&raw)?;
    transition(
        &st,
        id,
        st.store.retry_job(id, st.clock.now()).await,
        "retry",
    )
    .await
}

async fn discard_job(
    State(st): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = job_id(&raw)?;
    transition(
        &st,
        id,
        st.store.discard_job(id, st.clock.now()).await,
        "discard",
    )
    .await
}

async fn transition(
    st: &AppState,
    id: i64,
    done: crate::store::Result<Result<(), String>>,
    what: &str,
) -> Result<Response, ApiError> {
    match done.map_err(storage)? {
        Ok(()) => {
            info!(
                job_id = id,
                action = what,
                "admin API: job changed by an operator"
            );
            if what == "retry" {
                st.queue_notify.notify_waiters();
            }
            let job = st.store.job(id).await.map_err(storage)?;
            Ok(Json(json!({"job": job})).into_response())
        }
        Err(why) if st.store.job(id).await.map_err(storage)?.is_none() => {
            Err(ApiError::new(StatusCode::NOT_FOUND, why))
        }
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

/// `POST /api/rules/{name}/fire` with `{"dry_run": bool, "payload": {...}}`: evaluates
/// the rule now against the agents' known state. A dry run answers the PATCHes it would
/// send and records nothing; otherwise the run and its jobs are recorded (trigger as
/// the rule's own, detail "fired now through the admin API") and the jobs are sent like
/// any other. A webhook rule needs `payload`, the delivery to evaluate it against.
async fn fire_rule(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // An empty body is `{}`; anything else must be a JSON object (any content type).
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?
    };
    let Some(obj) = body.as_object() else {
        return Err(bad_request(
            "the body must be a JSON object such as {\"dry_run\": true}",
        ));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["dry_run", "payload"].contains(&k.as_str()))
    {
        return Err(bad_request(format!(
            "unknown field {k:?}; use dry_run and payload"
        )));
    }
    let config = st.live.current();
    let Some(rule) = config.rules.iter().find(|r| r.name == name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no rule named {name:?}"),
        ));
    };
    // Required: an operator must say whether to send, never get a live fire by default.
    let dry_run = match obj.get("dry_run") {
        Some(Value::Bool(b)) => *b,
        None => {
            return Err(bad_request(
                "say \"dry_run\": true (show the PATCHes) or \"dry_run\": false (send them)",
            ))
        }
        Some(_) => return Err(bad_request("dry_run must be true or false")),
    };
    let now = st.clock.now();
    let decision = match &rule.trigger {
        Trigger::Schedule(_) => {
            let agents = rule.target_agents(None).unwrap_or_default();
            let known = st.store.agent_states(&agents).await.map_err(storage)?;
            rules::evaluate_fire(rule, &known)
        }
        Trigger::Webhook { source, .. } => {
            let Some(payload) = obj.get("payload").filter(|p| p.is_object()) else {
                return Err(bad_request(format!(
                    "rule {name:?} is triggered by webhooks of {source:?}: send the delivery to evaluate as \"payload\": {{...}}"
                )));
            };
            let agents = rule.target_agents(Some(payload)).unwrap_or_default();
            let known = st.store.agent_states(&agents).await.map_err(storage)?;
            rules::evaluate_delivery(rule, source, payload, &known)
        }
    };
    let outcomes =
        match decision {
            Decision::Matched(o) => o,
            Decision::NotMatched => return Ok(Json(json!({
                "rule": name, "dry_run": dry_run, "matched": false, "patches": [], "skipped": [],
            }))
            .into_response()),
        };
    let patches: Vec<Value> = outcomes
        .iter()
        .filter_map(|o| match o {
            AgentOutcome::Patch(p) => Some(json!({
                "agent_id": p.agent_id,
                "method": "PATCH",
                "path": format!("/ai-voice-agents/{}", p.agent_id),
                "fields": p.set.to_json(),
                "when": (!p.guard.is_empty()).then(|| rules::Condition::list_to_json(&p.guard)),
            })),
            AgentOutcome::Skip { .. } => None,
        })
        .collect();
    let skipped: Vec<Value> = outcomes
        .iter()
        .filter_map(|o| match o {
            AgentOutcome::Skip { agent_id, reason } => {
                Some(json!({"agent_id": agent_id, "reason": reason}))
            }
            AgentOutcome::Patch(_) => None,
        })
        .collect();
    if dry_run {
        return Ok(Json(json!({
            "rule": name, "dry_run": true, "matched": true, "patches": patches, "skipped": skipped,
        }))
        .into_response());
    }
    let mut run = NewRun::from_outcomes(rule, outcomes, now, None, &config.rules);
    run.trigger = match rule.trigger {
        Trigger::Schedule(_) => "schedule",
        Trigger::Webhook { .. } => "webhook",
    };
    let note = "fired now through the admin API";
    run.detail = Some(match run.detail.take() {
        Some(d) => format!("{note}; {d}"),
        None => note.to_string(),
    });
    let (run_id, jobs) = st
        .store
        .record_manual_run(&run, now)
        .await
        .map_err(storage)?;
    st.metrics.inc(
        "autopilot_rule_fires_total",
        &[("rule", &rule.name), ("trigger", "manual")],
    );
    info!(rule = %rule.name, run_id, jobs, "admin API: rule fired now");
    if jobs > 0 {
        st.queue_notify.notify_waiters();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "rule": name, "dry_run": false, "matched": true, "run_id": run_id,
            "jobs": jobs, "patches": patches, "skipped": skipped,
        })),
    )
        .into_response())
}

/// `GET /api/agents/{id}?limit=`: the agent's last known state and the changes sent to
/// it, newest first.
async fn show_agent(
    State(st): State<AppState>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = params(query);
    let id: i64 = raw
        .parse()
        .map_err(|_| bad_request(format!("agent id {raw:?} is not an integer")))?;
    let f = Filters::new(&params, &["limit"])?;
    let record = st.store.agent_record(id).await.map_err(storage)?;
    let history = st
        .store
        .find_jobs(None, Some(id), f.limit()?)
        .await
        .map_err(storage)?;
    if record.is_none() && history.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("nothing is known of agent {id}: no state observed and no change sent"),
        ));
    }
    let state = record.map(|(state, observed_at, origin)| {
        json!({"settings": state, "observed_at": observed_at, "origin": origin})
    });
    Ok(Json(json!({"agent_id": id, "last_known": state, "history": history})).into_response())
}

/// `GET /api/status`: readiness, reload status and queue counts in one answer.
async fn status(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    Filters::new(&params(query), &[])?;
    let (ready, readiness) = super::readiness(&st).await;
    let counts = st.store.job_counts().await.map_err(storage)?;
    let jobs: serde_json::Map<String, Value> =
        counts.into_iter().map(|(s, n)| (s, json!(n))).collect();
    Ok(Json(json!({
        "ready": ready,
        "readiness": readiness,
        "reload": st.live.status(),
        "jobs": jobs,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}
