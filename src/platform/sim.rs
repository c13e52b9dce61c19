//! In-memory simulator ("fake") of the Convirza platform API v3, AI voice agents only.
//!
//! It serves the documented agent endpoints under `/v3` (list, details, partial update and
//! full update), checks the bearer token, answers with the documented envelope and records
//! every `/v3` request it receives (including rejected ones) so tests can assert on what
//! actually arrived. Test-control endpoints under `/_sim` (no auth) read the log and the
//! agents and queue faults: error statuses, `Retry-After`, delays after which the request
//! is still applied, as a real platform would after a client gave up waiting, and dropped
//! connections (applied, then the response body breaks off).
//!
//! It also serves the platform's OAuth host on the same port, without the `/v3` prefix:
//! `POST /oauth/token` (email and password; at most [`LOGIN_RATE_LIMIT`] calls a minute),
//! `POST /oauth/refresh-token` (single-use refresh tokens) and `POST /oauth/revoke-token`.
//! Issued access tokens are accepted on `/v3` beside the static token. `/oauth` requests
//! are faulted and recorded like `/v3` ones, but their log entries never hold a password
//! or a token. `/_sim/oauth` reads the OAuth counters, `/_sim/oauth/expire` expires issued
//! tokens and `/_sim/oauth/shape` switches token responses between flat and enveloped.
//!
//! Where the public documentation is silent the simulator takes the pessimistic reading and
//! says so in a comment (for example `config` is replaced whole, never merged).
//!
//! Locking: one `std::sync::Mutex` around the state, only ever held for short synchronous
//! sections, never across an `.await`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path as UrlPath, Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{RequestExt as _, Router};
use chrono::{DateTime, SecondsFormat, SubsecRound as _, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The bearer token the simulator accepts unless told otherwise.
pub const DEFAULT_TOKEN: &str = "sim-token";
/// The email `POST /oauth/token` accepts unless told otherwise.
pub const DEFAULT_LOGIN_EMAIL: &str = "ops@example.com";
/// The password `POST /oauth/token` accepts unless told otherwise.
pub const DEFAULT_LOGIN_PASSWORD: &str = "sim-password";
/// Lifetime of an issued access token unless told otherwise (the documented 7 days).
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Lifetime of an issued refresh token unless told otherwise (the documented 180 days).
pub const DEFAULT_REFRESH_TTL: Duration = Duration::from_secs(180 * 24 * 60 * 60);
/// How many `POST /oauth/token` calls the simulator admits within any [`LOGIN_RATE_WINDOW`]
/// (the documented "10 requests per minute per IP"); the next one is answered 429 with
/// `Retry-After`. Every admitted call counts, failed logins included; calls answered 429
/// do not. The platform counts per IP; the simulator counts for all its clients together
/// (in tests they share one address anyway).
pub const LOGIN_RATE_LIMIT: usize = 10;
/// The sliding window of [`LOGIN_RATE_LIMIT`].
pub const LOGIN_RATE_WINDOW: Duration = Duration::from_secs(60);

/// Largest request body the simulator reads (multipart uploads included).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Page size of `GET /v3/ai-voice-agents` when `limit` is absent (the docs give none).
const DEFAULT_PAGE_LIMIT: usize = 100;
/// Longest delay a fault may ask for, so a typo cannot hang a test run for hours.
const MAX_FAULT_DELAY_MS: u64 = 10 * 60 * 1000;
/// How many recorded requests a slow subscriber may fall behind before it sees `Lagged`.
const BROADCAST_CAPACITY: usize = 4096;
/// Longest user-supplied value quoted back in an error message.
const MAX_QUOTED_CHARS: usize = 80;
/// axum's request-body limit when none is configured (documented on `DefaultBodyLimit`);
/// see [`failing_body`].
const AXUM_DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Form fields the documented partial update accepts (plus `status`, per the page's use case).
const ALLOWED_FIELDS: [&str; 13] = [
    "voiceagent_name",
    "voice_id",
    "greetings",
    "prompt",
    "config",
    "max_call_duration",
    "notification_time",
    "notification_message",
    "urls",
    "knowledge_base",
    "more_information",
    "files",
    "status",
];
/// Fields that may be sent more than once in one request.
const REPEATABLE_FIELDS: [&str; 3] = ["urls", "knowledge_base", "files"];
/// Fields that take a non-negative integer, stored as a JSON number.
const INTEGER_FIELDS: [&str; 3] = ["voice_id", "max_call_duration", "notification_time"];

/// How a simulator starts.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The static bearer token accepted on `/v3` (it never expires). Access tokens issued
    /// by `/oauth/token` and `/oauth/refresh-token` are accepted too while they are valid.
    pub token: String,
    /// Agents to start with; `None` seeds agents 101, 102 and 103. Missing fields are filled
    /// from the seed template; entries without an integer `id` are skipped with a warning
    /// (use [`Simulator::load_agents_file`] to get a precise error instead).
    pub agents: Option<Vec<Value>>,
    /// The `(email, password)` that `POST /oauth/token` accepts (compared exactly);
    /// `None` disables logging in (every login is answered 401).
    pub login: Option<(String, String)>,
    /// Lifetime of issued access tokens.
    pub access_ttl: Duration,
    /// Lifetime of issued refresh tokens.
    pub refresh_ttl: Duration,
    /// Start with token responses wrapped in the `{code, message, data, ...}` envelope
    /// instead of flat (switchable at run time with `POST /_sim/oauth/shape`).
    pub enveloped_tokens: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            token: DEFAULT_TOKEN.to_owned(),
            agents: None,
            login: Some((
                DEFAULT_LOGIN_EMAIL.to_owned(),
                DEFAULT_LOGIN_PASSWORD.to_owned(),
            )),
            access_ttl: DEFAULT_ACCESS_TTL,
            refresh_ttl: DEFAULT_REFRESH_TTL,
            enveloped_tokens: false,
        }
    }
}

/// One `/v3` or `/oauth` request as the simulator received and answered it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// 1-based, in the order requests completed.
    pub seq: u64,
    /// When the request arrived.
    pub at: DateTime<Utc>,
    pub method: String,
    /// The URI path, without the query string.
    pub path: String,
    /// Multipart form fields received: a repeated name maps to a JSON array, a single one to
    /// its value; text parts are strings (lossy UTF-8), file parts `{"filename": "..."}`.
    /// Empty for non-multipart requests. For `/oauth` requests only non-secret values are
    /// kept: `{"email": ...}` for `/oauth/token`, nothing otherwise (never a password or a
    /// token).
    pub fields: Map<String, Value>,
    /// The HTTP status the simulator answered.
    pub status: u16,
    pub request_id: Option<String>,
    /// The fault applied to this request, e.g. `"status 500"`, `"delay 3000ms"` or
    /// `"drop"` (then `status` is what the simulator would have answered).
    pub fault: Option<String>,
}

/// The simulator: cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

struct Shared {
    token: String,
    login: Option<(String, String)>,
    access_ttl: Duration,
    refresh_ttl: Duration,
    state: Mutex<SimState>,
    events: broadcast::Sender<RecordedRequest>,
    /// Cancelled when a `serve` call is told to stop: cuts pending fault delays short.
    shutdown: CancellationToken,
}

#[derive(Default)]
struct SimState {
    agents: BTreeMap<i64, Value>,
    requests: Vec<RecordedRequest>,
    faults: VecDeque<Fault>,
    next_seq: u64,
    oauth: OAuthState,
}

/// Issued tokens and OAuth counters. A token is valid while it is in its map and the clock
/// is before its expiry; revoking or using (refresh) a token removes it.
#[derive(Default)]
struct OAuthState {
    /// Access token -> expiry.
    access: HashMap<String, DateTime<Utc>>,
    /// Unused, unrevoked refresh token -> expiry.
    refresh: HashMap<String, DateTime<Utc>>,
    /// When each admitted `/oauth/token` call arrived, oldest first, within the rate window.
    login_calls: VecDeque<Instant>,
    /// Successful calls.
    logins: u64,
    refreshes: u64,
    revokes: u64,
    /// Token responses are wrapped in the envelope (otherwise flat).
    enveloped: bool,
}

impl OAuthState {
    fn access_token_valid(&self, token: &str) -> bool {
        self.access
            .get(token)
            .is_some_and(|expires| Utc::now() < *expires)
    }

    /// Admits one login call, or says in how many whole seconds the next one would be.
    fn admit_login(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        while self
            .login_calls
            .front()
            .is_some_and(|at| now.duration_since(*at) >= LOGIN_RATE_WINDOW)
        {
            self.login_calls.pop_front();
        }
        if self.login_calls.len() >= LOGIN_RATE_LIMIT {
            let oldest = self.login_calls.front().copied().unwrap_or(now);
            let wait = LOGIN_RATE_WINDOW.saturating_sub(now.duration_since(oldest));
            // Round up: a client that waits exactly `Retry-After` seconds gets in.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(secs.max(1));
        }
        self.login_calls.push_back(now);
        Ok(())
    }

    /// Issues a new access and refresh token and returns the token response body.
    fn issue_pair(&mut self, access_ttl: Duration, refresh_ttl: Duration) -> Value {
        let now = Utc::now();
        let access_token = new_token();
        let refresh_token = new_token();
        let access_expires = expiry(now, access_ttl);
        let refresh_expires = expiry(now, refresh_ttl);
        self.access.insert(access_token.clone(), access_expires);
        self.refresh.insert(refresh_token.clone(), refresh_expires);
        json!({
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": rfc3339_millis(access_expires),
            "refresh_expires_in": rfc3339_millis(refresh_expires),
        })
    }
}

/// A queued fault, as posted to `/_sim/faults` (after validation).
#[derive(Clone, Debug, Serialize)]
struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    /// Apply the request, then break the response body off (the client sees an error).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    drop: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_contains: Option<String>,
    /// Applies to a matching request only with this probability (a miss does not use it up).
    #[serde(skip_serializing_if = "Option::is_none")]
    probability: Option<f64>,
    /// How many more matching requests this fault applies to.
    count: u64,
}

impl Fault {
    fn matches(&self, path: &str) -> bool {
        self.path_contains
            .as_deref()
            .is_none_or(|needle| path.contains(needle))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(ms) = self.delay_ms {
            parts.push(format!("delay {ms}ms"));
        }
        if let Some(status) = self.status {
            match self.retry_after {
                Some(secs) => parts.push(format!("status {status} retry-after {secs}")),
                None => parts.push(format!("status {status}")),
            }
        }
        if self.drop {
            parts.push("drop".to_owned());
        }
        parts.join(", ")
    }
}

/// The wire form of a fault; unknown keys are rejected.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    status: Option<u16>,
    retry_after: Option<u64>,
    delay_ms: Option<u64>,
    drop: Option<bool>,
    path_contains: Option<String>,
    probability: Option<f64>,
    count: Option<u64>,
}

impl FaultSpec {
    fn validate(self) -> Result<Fault, String> {
        let drop = self.drop.unwrap_or(false);
        if self.status.is_none() && self.delay_ms.is_none() && !drop {
            return Err("a fault needs `status`, `delay_ms` and/or `drop: true`".to_owned());
        }
        if drop && self.status.is_some() {
            return Err(
                "`drop` cannot be combined with `status`: a dropped request is applied and \
                 answered normally, then the connection breaks"
                    .to_owned(),
            );
        }
        if let Some(status) = self.status {
            if !(400..=599).contains(&status) {
                return Err(format!(
                    "`status` must be between 400 and 599, got {status}"
                ));
            }
        }
        if self.retry_after.is_some() && self.status.is_none() {
            return Err("`retry_after` needs a `status` (e.g. 429 or 503)".to_owned());
        }
        if let Some(ms) = self.delay_ms {
            if ms > MAX_FAULT_DELAY_MS {
                return Err(format!(
                    "`delay_ms` must be at most {MAX_FAULT_DELAY_MS}, got {ms}"
                ));
            }
        }
        if let Some(p) = self.probability {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("`probability` must be in (0, 1], got {p}"));
            }
        }
        let count = self.count.unwrap_or(1);
        if count == 0 {
            return Err("`count` must be at least 1".to_owned());
        }
        Ok(Fault {
            status: self.status,
            retry_after: self.retry_after,
            delay_ms: self.delay_ms,
            drop,
            path_contains: self.path_contains,
            probability: self.probability,
            count,
        })
    }
}

impl Simulator {
    /// A simulator with the given token and agents (seeded 101, 102, 103 by default).
    pub fn new(opts: SimOptions) -> Self {
        let mut agents = BTreeMap::new();
        match opts.agents {
            None => {
                for id in [101, 102, 103] {
                    agents.insert(id, seed_agent(id));
                }
            }
            Some(list) => {
                for (index, value) in list.into_iter().enumerate() {
                    match normalize_agent(value) {
                        Ok((id, agent)) => {
                            agents.insert(id, agent);
                        }
                        Err(problem) => {
                            tracing::warn!(index, %problem, "simulator: skipping agent");
                        }
                    }
                }
            }
        }
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            shared: Arc::new(Shared {
                token: opts.token,
                login: opts.login,
                access_ttl: opts.access_ttl,
                refresh_ttl: opts.refresh_ttl,
                state: Mutex::new(SimState {
                    agents,
                    oauth: OAuthState {
                        enveloped: opts.enveloped_tokens,
                        ..OAuthState::default()
                    },
                    ..SimState::default()
                }),
                events,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The full router (`/v3` API, `/oauth` host and `/_sim` controls), state applied.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_sim/requests", get(sim_requests))
            .route(
                "/_sim/faults",
                get(sim_list_faults)
                    .post(sim_add_faults)
                    .delete(sim_clear_faults),
            )
            .route("/_sim/agents/{id}", get(sim_agent))
            .route("/_sim/oauth", get(sim_oauth_stats))
            .route("/_sim/oauth/expire", post(sim_oauth_expire))
            .route("/_sim/oauth/shape", post(sim_oauth_shape))
            // Everything else, `/v3` and `/oauth` included, lands here: the simulator routes
            // them itself so that every request under them (unknown paths and methods too)
            // is recorded, faulted and answered with the envelope.
            .fallback(fallback)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    /// Serves the router on `listener` until `cancel` fires, then shuts down gracefully
    /// (pending fault delays are cut short and answered 503).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let shutdown = self.shared.shutdown.clone();
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                cancel.cancelled().await;
                shutdown.cancel();
            })
            .await
    }

    /// Every `/v3` and `/oauth` request recorded so far, in completion order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Receives every request recorded from now on, as it completes (before its response
    /// is sent).
    pub fn subscribe(&self) -> broadcast::Receiver<RecordedRequest> {
        self.shared.events.subscribe()
    }

    /// The agent's current JSON, if it exists.
    pub fn agent(&self, id: i64) -> Option<Value> {
        self.lock().agents.get(&id).cloned()
    }

    /// Reads a JSON array of agent objects. Each must have an integer `id`; fields it lacks
    /// are filled from the seed template. Errors name the file and the problem.
    pub fn load_agents_file(path: &Path) -> anyhow::Result<Vec<Value>> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agents file {shown}"))?;
        let parsed: Value = serde_json::from_str(&text)
            .with_context(|| format!("agents file {shown} is not valid JSON"))?;
        let Value::Array(items) = parsed else {
            return Err(anyhow!(
                "agents file {shown}: expected a JSON array of agent objects, found {}",
                kind_of(&parsed)
            ));
        };
        let mut seen = BTreeMap::new();
        let mut agents = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let (id, agent) = normalize_agent(item)
                .map_err(|problem| anyhow!("agents file {shown}: agent #{index}: {problem}"))?;
            if let Some(first) = seen.insert(id, index) {
                return Err(anyhow!(
                    "agents file {shown}: agent #{index}: duplicate id {id} (already used by agent #{first})"
                ));
            }
            agents.push(agent);
        }
        Ok(agents)
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain
        // data and stays usable, and the simulator must keep answering.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes one use of the first queued fault matching `path` (FIFO). A fault with a
    /// `probability` is passed over (and not used up) when its roll misses.
    fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut state = self.lock();
        let index = state.faults.iter().position(|f| {
            f.matches(path) && f.probability.is_none_or(|p| rand::random::<f64>() < p)
        })?;
        let fault = state.faults.get_mut(index)?;
        fault.count -= 1;
        let taken = fault.clone();
        if fault.count == 0 {
            state.faults.remove(index);
        }
        Some(taken)
    }

    fn record(&self, mut rec: RecordedRequest) {
        tracing::debug!(
            method = %rec.method,
            path = %rec.path,
            status = rec.status,
            fault = rec.fault.as_deref(),
            "simulator request"
        );
        let mut state = self.lock();
        state.next_seq += 1;
        rec.seq = state.next_seq;
        state.requests.push(rec.clone());
        // Sent under the lock so subscribers see the same order as `requests()`; a
        // broadcast send never blocks. No subscribers is not an error.
        let _ = self.shared.events.send(rec);
    }

    /// Handles one `/v3` or `/oauth` request to completion: fault, auth, routing,
    /// recording.
    async fn process(
        self,
        parts: Parts,
        body: Result<Bytes, String>,
        request_id: String,
        at: DateTime<Utc>,
    ) -> Response {
        let path = parts.uri.path().to_owned();
        let incoming = if is_oauth_path(&path) {
            Incoming::OAuth(parse_json_object(body))
        } else {
            Incoming::V3(read_body(&parts, body).await)
        };
        let fault = self.take_fault(&path);
        let reply = match self.apply_fault(fault.as_ref()).await {
            Some(reply) => reply,
            None => match &incoming {
                Incoming::V3(body) => self.answer_v3(&parts, body),
                Incoming::OAuth(body) => self.answer_oauth(&parts.method, &path, body),
            },
        };
        let fields = match &incoming {
            Incoming::V3(body) => body.recorded_fields(),
            Incoming::OAuth(body) => oauth_recorded_fields(&path, body),
        };
        let dropped = fault.as_ref().is_some_and(|f| f.drop);
        self.record(RecordedRequest {
            seq: 0,
            at,
            method: parts.method.to_string(),
            path,
            fields,
            status: reply.status.as_u16(),
            request_id: Some(request_id.clone()),
            fault: fault.as_ref().map(Fault::describe),
        });
        let response = reply.into_response_with(&request_id);
        if dropped {
            break_body(response)
        } else {
            response
        }
    }

    /// Waits out a fault's delay; returns the reply that replaces the real one, if any (a
    /// status fault, or shutdown during the delay).
    async fn apply_fault(&self, fault: Option<&Fault>) -> Option<Reply> {
        let fault = fault?;
        if let Some(ms) = fault.delay_ms {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                () = self.shared.shutdown.cancelled() => {
                    return Some(Reply::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the simulator is shutting down",
                    ));
                }
            }
        }
        let status = fault.status?;
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut reply = Reply::error(
            code,
            format!(
                "simulated fault: {status} {}",
                code.canonical_reason().unwrap_or("")
            )
            .trim_end(),
        );
        reply.retry_after = fault.retry_after;
        Some(reply)
    }

    fn answer_v3(&self, parts: &Parts, body: &BodyInfo) -> Reply {
        if let Err(reply) = self.check_auth(&parts.headers) {
            return reply;
        }
        self.route(&parts.method, parts.uri.path(), parts.uri.query(), body)
    }

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), Reply> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Reply::unauthorized(
                "missing Authorization header (expected `Bearer <token>`)",
            ));
        };
        let Ok(value) = value.to_str() else {
            return Err(Reply::unauthorized(
                "Authorization header is not valid ASCII",
            ));
        };
        let Some((scheme, token)) = value.split_once(' ') else {
            return Err(Reply::unauthorized(
                "Authorization header must be `Bearer <token>`",
            ));
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Reply::unauthorized("Authorization scheme must be Bearer"));
        }
        let token = token.trim();
        if token != self.shared.token && !self.lock().oauth.access_token_valid(token) {
            return Err(Reply::unauthorized("invalid or expired bearer token"));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // OAuth host

    fn answer_oauth(&self, method: &Method, path: &str, body: &JsonBody) -> Reply {
        if !matches!(
            path,
            "/oauth/token" | "/oauth/refresh-token" | "/oauth/revoke-token"
        ) {
            return Reply::error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {}", quote(path)),
            );
        }
        if *method != Method::POST {
            return Reply::method_not_allowed(method, path, "POST");
        }
        match path {
            "/oauth/token" => self.login(body),
            "/oauth/refresh-token" => self.refresh(body),
            _ => self.revoke(body),
        }
    }

    /// `POST /oauth/token`: rate limited first (every admitted call counts, whatever its
    /// outcome), then the body is checked, then the credentials.
    fn login(&self, body: &JsonBody) -> Reply {
        let admitted = self.lock().oauth.admit_login();
        if let Err(secs) = admitted {
            let mut reply = Reply::error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many login requests: at most {LOGIN_RATE_LIMIT} per {}s; retry in {secs}s",
                    LOGIN_RATE_WINDOW.as_secs()
                ),
            );
            reply.retry_after = Some(secs);
            return reply;
        }
        let credentials = body.as_ref().map_err(String::clone).and_then(|object| {
            Ok((
                required_string(object, "email")?,
                required_string(object, "password")?,
            ))
        });
        let (email, password) = match credentials {
            Ok(credentials) => credentials,
            Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
        };
        let Some((want_email, want_password)) = &self.shared.login else {
            return Reply::unauthorized("logging in with email and password is disabled");
        };
        if email != want_email || password != want_password {
            return Reply::unauthorized("invalid email or password");
        }
        let mut state = self.lock();
        state.oauth.logins += 1;
        let pair = state
            .oauth
            .issue_pair(self.shared.access_ttl, self.shared.refresh_ttl);
        Reply::shaped(pair, state.oauth.enveloped)
    }

    /// `POST /oauth/refresh-token`: the refresh token dies at once (single use); the access
    /// token issued with it lives on until it expires.
    fn refresh(&self, body: &JsonBody) -> Reply {
        let token = match body
            .as_ref()
            .map_err(String::clone)
            .and_then(|object| required_string(object, "refresh_token"))
        {
            Ok(token) => token,
            Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
        };
        let mut state = self.lock();
        match state.oauth.refresh.remove(token) {
            Some(expires) if Utc::now() < expires => {}
            _ => return Reply::unauthorized("invalid, already used or expired refresh token"),
        }
        state.oauth.refreshes += 1;
        let pair = state
            .oauth
            .issue_pair(self.shared.access_ttl, self.shared.refresh_ttl);
        Reply::shaped(pair, state.oauth.enveloped)
    }

    /// `POST /oauth/revoke-token`: idempotent; the answer does not say whether the token
    /// was known. Revoking one token of a pair leaves the other alone.
    fn revoke(&self, body: &JsonBody) -> Reply {
        let token = match body
            .as_ref()
            .map_err(String::clone)
            .and_then(|object| required_string(object, "token"))
        {
            Ok(token) => token,
            Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
        };
        let mut state = self.lock();
        state.oauth.access.remove(token);
        state.oauth.refresh.remove(token);
        state.oauth.revokes += 1;
        Reply::shaped(json!({ "revoked": true }), state.oauth.enveloped)
    }

    fn route(&self, method: &Method, path: &str, query: Option<&str>, body: &BodyInfo) -> Reply {
        let rest = path.strip_prefix("/v3").unwrap_or(path);
        let segments: Vec<&str> = rest.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ai-voice-agents"] => match *method {
                Method::GET => self.list_agents(query),
                Method::POST => Reply::error(
                    StatusCode::NOT_IMPLEMENTED,
                    "creating agents is not simulated",
                ),
                _ => Reply::method_not_allowed(method, path, "GET, POST"),
            },
            ["ai-voice-agents", raw_id] => {
                let mode = match *method {
                    Method::GET => None,
                    Method::PATCH => Some(UpdateMode::Patch),
                    Method::PUT => Some(UpdateMode::Put),
                    Method::DELETE => {
                        return Reply::error(
                            StatusCode::NOT_IMPLEMENTED,
                            "deleting agents is not simulated",
                        )
                    }
                    _ => return Reply::method_not_allowed(method, path, "GET, PUT, PATCH, DELETE"),
                };
                let id = match parse_agent_id(raw_id) {
                    Ok(id) => id,
                    Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
                };
                match mode {
                    None => match self.agent(id) {
                        Some(agent) => Reply::ok(agent),
                        None => Reply::agent_not_found(id),
                    },
                    Some(mode) => self.update_agent(id, mode, body),
                }
            }
            _ => Reply::error(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {}", quote(path)),
            ),
        }
    }

    fn list_agents(&self, query: Option<&str>) -> Reply {
        let uri_query = format!("/?{}", query.unwrap_or(""));
        let pairs: Vec<(String, String)> =
            match uri_query.parse::<axum::http::Uri>().ok().and_then(|uri| {
                axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()
            }) {
                Some(axum::extract::Query(pairs)) => pairs,
                None => {
                    return Reply::error(StatusCode::BAD_REQUEST, "malformed query string");
                }
            };
        let mut limit = DEFAULT_PAGE_LIMIT;
        let mut offset = 0usize;
        for (key, value) in &pairs {
            let target = match key.as_str() {
                "limit" => &mut limit,
                "offset" => &mut offset,
                _ => continue, // other filters are not simulated; ignore them
            };
            match parse_non_negative(key, value) {
                Ok(n) => *target = usize::try_from(n).unwrap_or(usize::MAX),
                Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
            }
        }
        let state = self.lock();
        let total = state.agents.len();
        let page: Vec<Value> = state
            .agents
            .values()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect();
        drop(state);
        Reply {
            status: StatusCode::OK,
            payload: Payload::Data {
                data: Value::Array(page),
                total: Some(total),
            },
            retry_after: None,
            allow: None,
        }
    }

    fn update_agent(&self, id: i64, mode: UpdateMode, body: &BodyInfo) -> Reply {
        if self.agent(id).is_none() {
            return Reply::agent_not_found(id);
        }
        let form = match body {
            BodyInfo::Form(form) => form,
            BodyInfo::NotMultipart(content_type) => {
                let got = content_type
                    .as_deref()
                    .map_or_else(|| "none".to_owned(), quote);
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("request body must be multipart/form-data (Content-Type: {got})"),
                );
            }
            BodyInfo::Unreadable(message) => {
                return Reply::error(StatusCode::BAD_REQUEST, message.clone());
            }
        };
        if let Some(error) = &form.error {
            return Reply::error(StatusCode::BAD_REQUEST, error.clone());
        }
        let update = match Update::from_form(&form.parts) {
            Ok(update) => update,
            Err(message) => return Reply::error(StatusCode::BAD_REQUEST, message),
        };
        let mut state = self.lock();
        let Some(Value::Object(agent)) = state.agents.get_mut(&id) else {
            return Reply::agent_not_found(id);
        };
        update.apply(agent, mode);
        let updated = Value::Object(agent.clone());
        drop(state);
        Reply::ok(updated)
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

async fn fallback(State(sim): State<Simulator>, req: Request) -> Response {
    let path = req.uri().path();
    if path == "/v3" || path.starts_with("/v3/") || is_oauth_path(path) {
        return api_entry(sim, req).await;
    }
    let message = format!("no such endpoint: {}", quote(path));
    Reply::error(StatusCode::NOT_FOUND, message).into_response_with(&new_request_id())
}

/// The OAuth host's paths (served on the same port as `/v3`).
fn is_oauth_path(path: &str) -> bool {
    path == "/oauth" || path.starts_with("/oauth/")
}

async fn api_entry(sim: Simulator, req: Request) -> Response {
    let at = Utc::now();
    let request_id = new_request_id();
    let (parts, body) = req.into_parts();
    // Read the whole body first (the client sends it at once), then finish the request in
    // its own task: if the client disconnects during a fault delay, the request is still
    // applied and recorded, as on a real platform.
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            format!("could not read the request body (limit {MAX_BODY_BYTES} bytes): {e}")
        });
    let task = tokio::spawn(sim.process(parts, body, request_id.clone(), at));
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "simulator request task failed");
            Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulator internal error",
            )
            .into_response_with(&request_id)
        }
    }
}

async fn sim_requests(State(sim): State<Simulator>) -> Response {
    axum::Json(sim.requests()).into_response()
}

async fn sim_list_faults(State(sim): State<Simulator>) -> Response {
    let faults: Vec<Fault> = sim.lock().faults.iter().cloned().collect();
    axum::Json(faults).into_response()
}

async fn sim_add_faults(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request_id = new_request_id();
    let bad = |message: String| {
        Reply::error(StatusCode::BAD_REQUEST, message).into_response_with(&request_id)
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return bad(format!("fault body is not valid JSON: {e}")),
    };
    let specs = match value {
        Value::Array(items) => items,
        object @ Value::Object(_) => vec![object],
        other => {
            return bad(format!(
                "fault body must be a fault object or an array of them, found {}",
                kind_of(&other)
            ))
        }
    };
    let mut faults = Vec::with_capacity(specs.len());
    for (index, spec) in specs.into_iter().enumerate() {
        let fault = serde_json::from_value::<FaultSpec>(spec)
            .map_err(|e| e.to_string())
            .and_then(FaultSpec::validate);
        match fault {
            Ok(fault) => faults.push(fault),
            Err(problem) => return bad(format!("fault #{index}: {problem}")),
        }
    }
    let queued = faults.len();
    let mut state = sim.lock();
    state.faults.extend(faults);
    let pending: Vec<Fault> = state.faults.iter().cloned().collect();
    drop(state);
    axum::Json(json!({ "queued": queued, "faults": pending })).into_response()
}

async fn sim_clear_faults(State(sim): State<Simulator>) -> Response {
    let cleared = std::mem::take(&mut sim.lock().faults).len();
    axum::Json(json!({ "cleared": cleared })).into_response()
}

async fn sim_agent(State(sim): State<Simulator>, UrlPath(raw_id): UrlPath<String>) -> Response {
    let request_id = new_request_id();
    let id = match parse_agent_id(&raw_id) {
        Ok(id) => id,
        Err(message) => {
            return Reply::error(StatusCode::BAD_REQUEST, message).into_response_with(&request_id)
        }
    };
    match sim.agent(id) {
        Some(agent) => axum::Json(agent).into_response(),
        None => Reply::agent_not_found(id).into_response_with(&request_id),
    }
}

/// The wire form of `POST /_sim/oauth/expire` (the body may also be empty).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExpireSpec {
    #[serde(default)]
    refresh: bool,
}

/// The wire form of `POST /_sim/oauth/shape`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeSpec {
    enveloped: bool,
}

async fn sim_oauth_stats(State(sim): State<Simulator>) -> Response {
    let state = sim.lock();
    let now = Utc::now();
    let oauth = &state.oauth;
    let active = oauth.access.values().filter(|exp| now < **exp).count();
    let body = json!({
        "logins": oauth.logins,
        "refreshes": oauth.refreshes,
        "revokes": oauth.revokes,
        "active_access_tokens": active,
    });
    drop(state);
    axum::Json(body).into_response()
}

/// Expires every access token issued so far (and every refresh token with
/// `{"refresh": true}`) now; the static token is not affected.
async fn sim_oauth_expire(State(sim): State<Simulator>, body: Bytes) -> Response {
    let spec = if body.iter().all(u8::is_ascii_whitespace) {
        ExpireSpec::default()
    } else {
        match serde_json::from_slice::<ExpireSpec>(&body) {
            Ok(spec) => spec,
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("expected an empty body or {{\"refresh\": true|false}}: {e}"),
                )
                .into_response_with(&new_request_id())
            }
        }
    };
    let now = Utc::now();
    let expire_all = |tokens: &mut HashMap<String, DateTime<Utc>>| {
        let mut expired = 0usize;
        for expires in tokens.values_mut() {
            if now < *expires {
                *expires = now;
                expired += 1;
            }
        }
        expired
    };
    let mut state = sim.lock();
    let access = expire_all(&mut state.oauth.access);
    let refresh = if spec.refresh {
        expire_all(&mut state.oauth.refresh)
    } else {
        0
    };
    drop(state);
    axum::Json(json!({
        "expired_access_tokens": access,
        "expired_refresh_tokens": refresh,
    }))
    .into_response()
}

async fn sim_oauth_shape(State(sim): State<Simulator>, body: Bytes) -> Response {
    let spec = match serde_json::from_slice::<ShapeSpec>(&body) {
        Ok(spec) => spec,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"enveloped\": true|false}}: {e}"),
            )
            .into_response_with(&new_request_id())
        }
    };
    sim.lock().oauth.enveloped = spec.enveloped;
    axum::Json(json!({ "enveloped": spec.enveloped })).into_response()
}

// ---------------------------------------------------------------------------------------
// Replies

enum Payload {
    Data {
        data: Value,
        total: Option<usize>,
    },
    /// A success body sent as is, without the envelope (flat token responses).
    Flat(Value),
    Error(String),
}

struct Reply {
    status: StatusCode,
    payload: Payload,
    retry_after: Option<u64>,
    allow: Option<&'static str>,
}

impl Reply {
    fn ok(data: Value) -> Self {
        Self {
            status: StatusCode::OK,
            payload: Payload::Data { data, total: None },
            retry_after: None,
            allow: None,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            payload: Payload::Error(message.into()),
            retry_after: None,
            allow: None,
        }
    }

    /// A success answer, flat or wrapped in the envelope (token responses).
    fn shaped(data: Value, enveloped: bool) -> Self {
        if enveloped {
            Self::ok(data)
        } else {
            Self {
                status: StatusCode::OK,
                payload: Payload::Flat(data),
                retry_after: None,
                allow: None,
            }
        }
    }

    fn unauthorized(message: &str) -> Self {
        Self::error(StatusCode::UNAUTHORIZED, message)
    }

    fn agent_not_found(id: i64) -> Self {
        Self::error(
            StatusCode::NOT_FOUND,
            format!("AI voice agent {id} not found"),
        )
    }

    fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Self {
        let mut reply = Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {method} is not allowed on {} (allowed: {allow})",
                quote(path)
            ),
        );
        reply.allow = Some(allow);
        reply
    }

    fn into_response_with(self, request_id: &str) -> Response {
        let timestamp = now_rfc3339();
        let body = match self.payload {
            Payload::Data { data, total } => {
                let mut envelope = json!({
                    "code": self.status.as_u16(),
                    "message": "Success",
                    "data": data,
                    "request_id": request_id,
                    "timestamp": timestamp,
                });
                if let (Some(total), Value::Object(map)) = (total, &mut envelope) {
                    map.insert("total".to_owned(), json!(total));
                }
                envelope
            }
            Payload::Flat(body) => body,
            Payload::Error(message) => json!({
                "code": self.status.as_u16(),
                "message": message,
                "request_id": request_id,
                "timestamp": timestamp,
            }),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(request_id) {
            headers.insert("x-request-id", value);
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Keeps the status and headers of `response` but replaces its body with one that fails at
/// once, so hyper aborts the connection instead of completing the response. hyper buffers
/// the response head and writes it together with the first body bytes, so in practice the
/// head never leaves either: the client sees the connection close before a complete
/// response (reqwest: an error from `send`, hyper's `IncompleteMessage`). A client must
/// treat both that and an error while reading the body as "outcome unknown".
fn break_body(response: Response) -> Response {
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, failing_body())
}

/// A body whose first poll yields an error.
///
/// The natural tool, `Body::from_stream` over a stream that errors, needs a `Stream`
/// implementation, and no crate in our dependency list offers one we could use (the
/// `futures` crates are not among them). axum itself has an erroring body, though: its
/// request-body limiter (`RequestExt::into_limited_body`, [`AXUM_DEFAULT_BODY_LIMIT`] when no
/// limit is configured) fails on a first chunk that exceeds the limit, without yielding any
/// of it. The oversized chunk is a zeroed static, so nothing is allocated or copied (the
/// limiter only looks at its length). If axum ever raised its default, the client would get
/// a complete body instead, and the drop-fault test would fail.
fn failing_body() -> Body {
    static OVERSIZED: [u8; AXUM_DEFAULT_BODY_LIMIT + 1] = [0; AXUM_DEFAULT_BODY_LIMIT + 1];
    Request::new(Body::from(Bytes::from_static(&OVERSIZED))).into_limited_body()
}

// ---------------------------------------------------------------------------------------
// Request bodies and form parsing

enum PartValue {
    Text(String),
    File(String),
}

struct FormPart {
    name: String,
    value: PartValue,
}

#[derive(Default)]
struct ParsedForm {
    parts: Vec<FormPart>,
    /// The first problem met while reading the form; parts read before it are kept for the
    /// request log.
    error: Option<String>,
}

enum BodyInfo {
    NotMultipart(Option<String>),
    Form(ParsedForm),
    Unreadable(String),
}

/// An `/oauth` request body: a JSON object, or why it is not one.
type JsonBody = Result<Map<String, Value>, String>;

/// What a request carried, read the way its endpoint family expects.
enum Incoming {
    /// `/v3`: multipart forms.
    V3(BodyInfo),
    /// `/oauth`: JSON objects.
    OAuth(JsonBody),
}

fn parse_json_object(body: Result<Bytes, String>) -> JsonBody {
    let bytes = body?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("request body must be a JSON object, got an empty body".to_owned());
    }
    // serde_json's messages give a position, never the input: no secret leaks into them.
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(format!(
            "request body must be a JSON object, found {}",
            kind_of(&other)
        )),
        Err(e) => Err(format!("request body is not valid JSON: {e}")),
    }
}

/// The non-secret part of an `/oauth` body, for the request log: the login email only.
fn oauth_recorded_fields(path: &str, body: &JsonBody) -> Map<String, Value> {
    let mut fields = Map::new();
    if path == "/oauth/token" {
        if let Some(email @ Value::String(_)) = body.as_ref().ok().and_then(|b| b.get("email")) {
            fields.insert("email".to_owned(), email.clone());
        }
    }
    fields
}

fn required_string<'a>(object: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(format!(
            "`{key}` must be a string, found {}",
            kind_of(other)
        )),
        None => Err(format!("missing `{key}` in the request body")),
    }
}

impl BodyInfo {
    fn recorded_fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        let BodyInfo::Form(form) = self else {
            return fields;
        };
        for part in &form.parts {
            let value = match &part.value {
                PartValue::Text(text) => Value::String(text.clone()),
                PartValue::File(filename) => json!({ "filename": filename }),
            };
            match fields.get_mut(&part.name) {
                Some(Value::Array(values)) => values.push(value),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, value]);
                }
                None => {
                    fields.insert(part.name.clone(), value);
                }
            }
        }
        fields
    }
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("multipart/form-data"))
}

async fn read_body(parts: &Parts, body: Result<Bytes, String>) -> BodyInfo {
    let content_type = match parts.headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(value) => match value.to_str() {
            Ok(text) => Some(text.to_owned()),
            Err(_) => {
                return BodyInfo::NotMultipart(Some(
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ))
            }
        },
    };
    if !content_type.as_deref().is_some_and(is_multipart) {
        return BodyInfo::NotMultipart(content_type);
    }
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(message) => return BodyInfo::Unreadable(message),
    };
    let request = Request::from_parts(parts.clone(), Body::from(bytes));
    let mut multipart = match Multipart::from_request(request, &()).await {
        Ok(multipart) => multipart,
        Err(rejection) => {
            return BodyInfo::Form(ParsedForm {
                parts: Vec::new(),
                error: Some(format!(
                    "malformed multipart body: {}",
                    rejection.body_text()
                )),
            })
        }
    };
    let mut form = ParsedForm::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                form.error = Some(format!("malformed multipart body: {}", e.body_text()));
                break;
            }
        };
        let name = field.name().map(str::to_owned);
        let filename = field.file_name().map(str::to_owned);
        let bytes = match field.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => {
                form.error = Some(format!("malformed multipart body: {}", e.body_text()));
                break;
            }
        };
        let Some(name) = name else {
            form.error
                .get_or_insert_with(|| "a multipart part has no field name".to_owned());
            continue;
        };
        let value = match filename {
            Some(filename) => PartValue::File(filename),
            None => match String::from_utf8(bytes.to_vec()) {
                Ok(text) => PartValue::Text(text),
                Err(_) => {
                    form.error.get_or_insert_with(|| {
                        format!("form field {} is not valid UTF-8", quote(&name))
                    });
                    PartValue::Text(String::from_utf8_lossy(&bytes).into_owned())
                }
            },
        };
        form.parts.push(FormPart { name, value });
    }
    BodyInfo::Form(form)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UpdateMode {
    /// PATCH: files and knowledge-base URLs are appended.
    Patch,
    /// PUT: files and knowledge-base URLs replace the current lists.
    Put,
}

/// A validated update; only fields that were sent are present.
#[derive(Default)]
struct Update {
    /// Scalar and object fields, set as given.
    set: Vec<(&'static str, Value)>,
    urls: Option<Vec<String>>,
    knowledge_base: Option<Vec<String>>,
    files: Option<Vec<String>>,
}

impl Update {
    fn from_form(parts: &[FormPart]) -> Result<Self, String> {
        let mut unknown: Vec<&str> = Vec::new();
        for part in parts {
            let name = part.name.as_str();
            if !ALLOWED_FIELDS.contains(&name) && !unknown.contains(&name) {
                unknown.push(name);
            }
        }
        if !unknown.is_empty() {
            let listed: Vec<String> = unknown
                .iter()
                .map(|name| match suggestion(name) {
                    Some(better) => format!("{} (did you mean `{better}`?)", quote(name)),
                    None => quote(name),
                })
                .collect();
            return Err(format!(
                "unknown form field{} {}; allowed fields: {}",
                if unknown.len() == 1 { "" } else { "s" },
                listed.join(", "),
                ALLOWED_FIELDS.join(", ")
            ));
        }

        let mut update = Update::default();
        for field in ALLOWED_FIELDS {
            let count = parts.iter().filter(|p| p.name == field).count();
            if count > 1 && !REPEATABLE_FIELDS.contains(&field) {
                // The docs do not say which value would win; reject rather than guess.
                return Err(format!(
                    "form field `{field}` was sent {count} times; it takes one value"
                ));
            }
        }
        for part in parts {
            // `ALLOWED_FIELDS` holds the canonical &'static str for this name.
            let Some(field) = ALLOWED_FIELDS.iter().copied().find(|f| *f == part.name) else {
                continue;
            };
            let text = match (&part.value, field) {
                (PartValue::File(filename), "files") => {
                    let files = update.files.get_or_insert_with(Vec::new);
                    if !filename.is_empty() {
                        files.push(filename.clone());
                    }
                    continue;
                }
                (PartValue::File(_), _) => {
                    return Err(format!(
                        "form field `{field}` must be a text field, not a file upload"
                    ));
                }
                (PartValue::Text(text), _) => text,
            };
            match field {
                // The documented example sends `files=""` as a plain text field: an empty
                // value is ignored, a non-empty one is not a file and is refused.
                "files" => {
                    update.files.get_or_insert_with(Vec::new);
                    if !text.is_empty() {
                        return Err(format!(
                            "form field `files` must be a file upload (a part with a filename), got text {}",
                            quote(text)
                        ));
                    }
                }
                "urls" => {
                    let urls = update.urls.get_or_insert_with(Vec::new);
                    if !text.is_empty() {
                        urls.push(text.clone());
                    }
                }
                "knowledge_base" => {
                    let urls = update.knowledge_base.get_or_insert_with(Vec::new);
                    if !text.is_empty() {
                        urls.push(text.clone());
                    }
                }
                "config" => {
                    let config: Value = serde_json::from_str(text)
                        .map_err(|e| format!("form field `config` is not valid JSON: {e}"))?;
                    if !config.is_object() {
                        return Err(format!(
                            "form field `config` must be a JSON object, got {}",
                            kind_of(&config)
                        ));
                    }
                    update.set.push((field, config));
                }
                "status" => {
                    if text != "active" && text != "inactive" {
                        return Err(format!(
                            "form field `status` must be \"active\" or \"inactive\", got {}",
                            quote(text)
                        ));
                    }
                    update.set.push((field, Value::String(text.clone())));
                }
                _ if INTEGER_FIELDS.contains(&field) => {
                    let n = parse_non_negative(field, text)?;
                    update.set.push((field, json!(n)));
                }
                _ => update.set.push((field, Value::String(text.clone()))),
            }
        }
        Ok(update)
    }

    fn apply(self, agent: &mut Map<String, Value>, mode: UpdateMode) {
        for (field, value) in self.set {
            // The docs are silent on whether `config` merges into the stored object; the
            // simulator replaces it whole, the pessimistic case a client must survive.
            agent.insert(field.to_owned(), value);
        }
        if let Some(urls) = self.urls {
            agent.insert("urls".to_owned(), strings(urls));
        }
        for (key, values) in [
            ("knowledgebase_urls", self.knowledge_base),
            ("knowledgebase_files", self.files),
        ] {
            let Some(values) = values else { continue };
            match (mode, agent.get_mut(key)) {
                (UpdateMode::Patch, Some(Value::Array(existing))) => {
                    existing.extend(values.into_iter().map(Value::String));
                }
                _ => {
                    agent.insert(key.to_owned(), strings(values));
                }
            }
        }
        agent.insert("updated_on".to_owned(), Value::String(now_rfc3339()));
    }
}

fn suggestion(name: &str) -> Option<&'static str> {
    Some(match name {
        "greeting" | "greeting_message" => "greetings",
        "name" | "agent_name" | "voice_agent_name" => "voiceagent_name",
        "url" => "urls",
        "file" | "knowledgebase_files" => "files",
        "knowledgebase_urls" | "knowledgebase" | "knowledge_base_urls" => "knowledge_base",
        "voice" => "voice_id",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Agents

/// The seed template: every field of the documented 200 example, distinct per seeded id.
fn seed_agent(id: i64) -> Value {
    let (name, phone, voice_id, voice, greetings, prompt, direction, org_unit_id) = match id {
        101 => (
            "Sales Assistant — Inbound Leads".to_owned(),
            "+14255551234".to_owned(),
            3,
            "alloy",
            "Thank you for calling Convirza! How can I assist you today?",
            "You are a professional sales assistant for Convirza. Your goal is to qualify inbound leads, answer product questions, and schedule demos. Always be concise, friendly, and focused on the caller's needs.",
            "inbound",
            1001,
        ),
        102 => (
            "Support Assistant — Day Shift".to_owned(),
            "+14255551235".to_owned(),
            5,
            "nova",
            "Thanks for calling Convirza support. How can I help?",
            "You are a support assistant for Convirza. Troubleshoot calmly, collect account details, and open a ticket when you cannot resolve the issue.",
            "inbound",
            1001,
        ),
        103 => (
            "Appointment Reminder — Outbound".to_owned(),
            "+14255551236".to_owned(),
            7,
            "echo",
            "Hello, this is Convirza calling to confirm your appointment.",
            "You are an outbound assistant that confirms, reschedules or cancels appointments. Be brief and polite.",
            "outbound",
            1002,
        ),
        _ => (
            format!("Voice Agent {id}"),
            format!("+1425555{:04}", id.rem_euclid(10_000)),
            3,
            "alloy",
            "Thank you for calling! How can I assist you today?",
            "You are a helpful voice assistant.",
            "inbound",
            1001,
        ),
    };
    json!({
        "id": id,
        "primary_phone_number": phone,
        "prompt": prompt,
        "greetings": greetings,
        "voiceagent_type_id": 1,
        "voice_id": voice_id,
        "voiceagent_name": name,
        "type": "conversational",
        "voice": voice,
        "created_on": "2026-01-15T10:30:00.000Z",
        "updated_on": "2026-03-20T14:20:00.000Z",
        "status": "active",
        "direction": direction,
        "more_information": "Prioritize callers who mention pricing or demo requests. Escalate to a human if the caller expresses frustration.",
        "urls": ["https://docs.example.com/faq", "https://www.example.com/pricing"],
        "inherited_prompt_id": 12,
        "config": {
            "background_noise": false,
            "volume": 0.8,
            "block_non_intelliquent_number": true
        },
        "max_call_duration": 300,
        "notification_time": 60,
        "notification_message": "This call will end in 1 minute.",
        "org_unit_id": org_unit_id,
        "knowledgebase_files": ["product-catalog.pdf", "sales-playbook.docx"],
        "knowledgebase_urls": ["https://docs.example.com/guide", "https://www.example.com/faq"]
    })
}

/// Checks one agent object and fills the fields it lacks from the seed template.
fn normalize_agent(value: Value) -> Result<(i64, Value), String> {
    let Value::Object(given) = value else {
        return Err(format!("expected a JSON object, found {}", kind_of(&value)));
    };
    let id = match given.get("id") {
        None => return Err("missing integer \"id\"".to_owned()),
        Some(id) => id
            .as_i64()
            .ok_or_else(|| format!("\"id\" must be an integer, found {id}"))?,
    };
    if let Some(config) = given.get("config") {
        if !config.is_object() {
            return Err(format!(
                "agent {id}: \"config\" must be a JSON object, found {}",
                kind_of(config)
            ));
        }
    }
    for key in ["urls", "knowledgebase_files", "knowledgebase_urls"] {
        if let Some(list) = given.get(key) {
            let ok = list
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_string));
            if !ok {
                return Err(format!("agent {id}: \"{key}\" must be an array of strings"));
            }
        }
    }
    if let Some(status) = given.get("status") {
        if status != "active" && status != "inactive" {
            return Err(format!(
                "agent {id}: \"status\" must be \"active\" or \"inactive\", found {status}"
            ));
        }
    }
    let Value::Object(mut agent) = seed_agent(id) else {
        return Err("internal: seed template is not an object".to_owned());
    };
    agent.extend(given);
    Ok((id, Value::Object(agent)))
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn new_request_id() -> String {
    Uuid::new_v4().to_string()
}

fn now_rfc3339() -> String {
    rfc3339_millis(Utc::now())
}

fn rfc3339_millis(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An opaque random token.
fn new_token() -> String {
    Uuid::new_v4().simple().to_string()
}

/// `now + ttl` to the millisecond (what the token response shows), capped at the end of
/// year 9999 so that it stays a plain ISO-8601 timestamp.
fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    let latest = DateTime::parse_from_rfc3339("9999-12-31T23:59:59.999Z")
        .map_or(DateTime::<Utc>::MAX_UTC, |at| at.with_timezone(&Utc));
    TimeDelta::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .map_or(latest, |at| at.min(latest))
        .trunc_subsecs(3)
}

fn parse_agent_id(raw: &str) -> Result<i64, String> {
    if raw.is_empty() {
        return Err("agent id is missing from the path".to_owned());
    }
    if raw.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(id) = raw.parse::<i64>() {
            return Ok(id);
        }
    }
    Err(format!(
        "agent id must be a positive integer, got {}",
        quote(raw)
    ))
}

/// A non-negative integer that fits an `i64` (so clients may store it in one).
fn parse_non_negative(name: &str, text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{name}` must be a non-negative integer, got {}",
            quote(text)
        ));
    }
    text.parse::<i64>()
        .ok()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| format!("`{name}` is out of range: {}", quote(text)))
}

fn strings(values: Vec<String>) -> Value {
    Value::Array(values.into_iter().map(Value::String).collect())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Quotes a user-supplied value for an error message, shortened if long.
fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let shown: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        format!("`{shown}…`")
    } else {
        format!("`{shown}`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::multipart::{Form, Part};

    const DOCUMENTED_FIELDS: [&str; 23] = [
        "id",
        "primary_phone_number",
        "prompt",
        "greetings",
        "voiceagent_type_id",
        "voice_id",
        "voiceagent_name",
        "type",
        "voice",
        "created_on",
        "updated_on",
        "status",
        "direction",
        "more_information",
        "urls",
        "inherited_prompt_id",
        "config",
        "max_call_duration",
        "notification_time",
        "notification_message",
        "org_unit_id",
        "knowledgebase_files",
        "knowledgebase_urls",
    ];

    struct Running {
        sim: Simulator,
        base: String,
        http: reqwest::Client,
        cancel: CancellationToken,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Running {
        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }

        async fn patch(&self, id: &str, form: Form) -> reqwest::Response {
            self.http
                .patch(self.url(&format!("/v3/ai-voice-agents/{id}")))
                .bearer_auth(DEFAULT_TOKEN)
                .multipart(form)
                .send()
                .await
                .expect("PATCH sent")
        }

        async fn put(&self, id: &str, form: Form) -> reqwest::Response {
            self.http
                .put(self.url(&format!("/v3/ai-voice-agents/{id}")))
                .bearer_auth(DEFAULT_TOKEN)
                .multipart(form)
                .send()
                .await
                .expect("PUT sent")
        }

        async fn get(&self, path: &str) -> reqwest::Response {
            self.http
                .get(self.url(path))
                .bearer_auth(DEFAULT_TOKEN)
                .send()
                .await
                .expect("GET sent")
        }

        async fn faults(&self, body: Value) -> reqwest::Response {
            self.post_json("/_sim/faults", body).await
        }

        async fn post_json(&self, path: &str, body: Value) -> reqwest::Response {
            self.http
                .post(self.url(path))
                .json(&body)
                .send()
                .await
                .expect("POST sent")
        }

        async fn login_with(&self, email: &str, password: &str) -> reqwest::Response {
            self.post_json(
                "/oauth/token",
                json!({"email": email, "password": password}),
            )
            .await
        }

        /// Logs in with the default credentials; returns the flat token response.
        async fn login(&self) -> Value {
            let resp = self
                .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
                .await;
            assert_eq!(resp.status(), 200);
            resp.json().await.expect("JSON token response")
        }

        async fn refresh(&self, refresh_token: &Value) -> reqwest::Response {
            self.post_json(
                "/oauth/refresh-token",
                json!({ "refresh_token": refresh_token }),
            )
            .await
        }

        async fn get_as(&self, token: &Value, path: &str) -> u16 {
            let resp = self
                .http
                .get(self.url(path))
                .bearer_auth(token.as_str().expect("token string"))
                .send()
                .await
                .expect("GET sent");
            resp.status().as_u16()
        }

        async fn oauth_stats(&self) -> Value {
            self.http
                .get(self.url("/_sim/oauth"))
                .send()
                .await
                .expect("GET sent")
                .json()
                .await
                .expect("JSON stats")
        }
    }

    async fn start_with(opts: SimOptions) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sim = Simulator::new(opts);
        let cancel = CancellationToken::new();
        let server = tokio::spawn(sim.clone().serve(listener, cancel.clone()));
        Running {
            sim,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            cancel,
            server,
        }
    }

    async fn start() -> Running {
        start_with(SimOptions::default()).await
    }

    /// Status, `x-request-id` header and JSON body; checks the envelope's common fields.
    async fn read(response: reqwest::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let header_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(body["code"], json!(status), "{body}");
        let id = body["request_id"].as_str().expect("request_id");
        assert!(Uuid::parse_str(id).is_ok(), "{id}");
        assert_eq!(header_id.as_deref(), Some(id));
        let ts = body["timestamp"].as_str().expect("timestamp");
        assert!(DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        (status, body)
    }

    fn message(body: &Value) -> &str {
        body["message"].as_str().unwrap_or_default()
    }

    #[tokio::test]
    async fn bearer_token_is_required() {
        let s = start().await;
        let url = s.url("/v3/ai-voice-agents/101");

        let (status, body) = read(s.http.get(&url).send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert!(message(&body).contains("Authorization"), "{body}");

        let wrong = s.http.get(&url).bearer_auth("nope").send().await.unwrap();
        let (status, _) = read(wrong).await;
        assert_eq!(status, 401);

        // A rejected PATCH changes nothing.
        let form = Form::new().text("voiceagent_name", "Hijacked");
        let resp = s
            .http
            .patch(&url)
            .bearer_auth("nope")
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            s.sim.agent(101).unwrap()["voiceagent_name"],
            "Sales Assistant — Inbound Leads"
        );

        // A custom token replaces the default one.
        let custom = start_with(SimOptions {
            token: "other".into(),
            agents: None,
            ..SimOptions::default()
        })
        .await;
        let url = custom.url("/v3/ai-voice-agents/101");
        let resp = custom
            .http
            .get(&url)
            .bearer_auth(DEFAULT_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let resp = custom
            .http
            .get(&url)
            .bearer_auth("other")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn list_and_details() {
        let s = start().await;
        let (status, body) = read(s.get("/v3/ai-voice-agents").await).await;
        assert_eq!(status, 200);
        assert_eq!(body["message"], "Success");
        assert_eq!(body["total"], 3);
        let ids: Vec<i64> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, [101, 102, 103]);
        let names: std::collections::BTreeSet<&str> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["voiceagent_name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "seeded names are distinct");

        let (status, body) = read(s.get("/v3/ai-voice-agents?limit=1&offset=1").await).await;
        assert_eq!(status, 200);
        assert_eq!(body["total"], 3);
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
        assert_eq!(body["data"][0]["id"], 102);

        let (status, body) = read(s.get("/v3/ai-voice-agents?limit=-1").await).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("limit"), "{body}");

        let (status, body) = read(s.get("/v3/ai-voice-agents/102").await).await;
        assert_eq!(status, 200);
        for field in DOCUMENTED_FIELDS {
            assert!(body["data"].get(field).is_some(), "missing {field}");
        }
        assert_eq!(body["data"]["id"], 102);
        assert_eq!(body["data"]["status"], "active");
        assert!(body["data"]["config"].is_object());

        let (status, _) = read(s.get("/v3/ai-voice-agents/abc").await).await;
        assert_eq!(status, 400);
        let (status, body) = read(s.get("/v3/ai-voice-agents/999").await).await;
        assert_eq!(status, 404);
        assert!(message(&body).contains("999"), "{body}");
        let (status, _) = read(s.get("/v3/no-such-thing").await).await;
        assert_eq!(status, 404);

        // The raw agent for tests, no auth.
        let raw: Value = s
            .http
            .get(s.url("/_sim/agents/103"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(raw, s.sim.agent(103).unwrap());
        let resp = s.http.get(s.url("/_sim/agents/7")).send().await.unwrap();
        assert_eq!(resp.status(), 404);
    }

    #[tokio::test]
    async fn patch_changes_only_sent_fields() {
        let s = start().await;
        let before = s.sim.agent(101).unwrap();
        let other_before = s.sim.agent(102).unwrap();
        let form = Form::new()
            .text("voiceagent_name", "Sales Assistant - Night Shift")
            .text("config", r#"{"background_noise": true, "volume": 0.7}"#)
            .text("max_call_duration", "180");
        let (status, body) = read(s.patch("101", form).await).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["message"], "Success");
        let data = &body["data"];
        for field in DOCUMENTED_FIELDS {
            assert!(data.get(field).is_some(), "missing {field}");
        }
        assert_eq!(data["voiceagent_name"], "Sales Assistant - Night Shift");
        assert_eq!(data["max_call_duration"], 180);
        // `config` is replaced whole, not merged.
        assert_eq!(
            data["config"],
            json!({"background_noise": true, "volume": 0.7})
        );
        for unchanged in DOCUMENTED_FIELDS.iter().filter(|f| {
            ![
                "voiceagent_name",
                "config",
                "max_call_duration",
                "updated_on",
            ]
            .contains(f)
        }) {
            assert_eq!(data[unchanged], before[unchanged], "{unchanged} changed");
        }
        let updated_on = data["updated_on"].as_str().unwrap();
        assert_ne!(updated_on, before["updated_on"].as_str().unwrap());
        assert!(
            updated_on.ends_with('Z') && updated_on.len() == 24,
            "{updated_on}"
        );
        assert_eq!(s.sim.agent(101).unwrap(), *data);
        assert_eq!(s.sim.agent(102).unwrap(), other_before);

        let recorded = s.sim.requests();
        let last = recorded.last().unwrap();
        assert_eq!(last.method, "PATCH");
        assert_eq!(last.path, "/v3/ai-voice-agents/101");
        assert_eq!(last.status, 200);
        assert_eq!(last.fields["max_call_duration"], "180");
        assert_eq!(last.request_id.as_deref(), body["request_id"].as_str());
    }

    #[tokio::test]
    async fn patch_numbers_status_and_lists_then_put_replaces() {
        let s = start().await;
        let form = Form::new()
            .text("voice_id", "7")
            .text("notification_time", "15")
            .text("status", "inactive")
            .text("urls", "https://a.example/1")
            .text("urls", "https://a.example/2")
            .text("knowledge_base", "")
            .text("knowledge_base", "https://kb.example/new")
            .text("files", "")
            .part(
                "files",
                Part::bytes(b"hello".to_vec()).file_name("night.pdf"),
            );
        let (status, body) = read(s.patch("101", form).await).await;
        assert_eq!(status, 200, "{body}");
        let data = &body["data"];
        assert_eq!(data["voice_id"], 7);
        assert_eq!(data["notification_time"], 15);
        assert_eq!(data["status"], "inactive");
        assert_eq!(
            data["urls"],
            json!(["https://a.example/1", "https://a.example/2"])
        );
        assert_eq!(
            data["knowledgebase_urls"],
            json!([
                "https://docs.example.com/guide",
                "https://www.example.com/faq",
                "https://kb.example/new"
            ])
        );
        assert_eq!(
            data["knowledgebase_files"],
            json!(["product-catalog.pdf", "sales-playbook.docx", "night.pdf"])
        );
        let last = s.sim.requests().pop().unwrap();
        assert_eq!(
            last.fields["urls"],
            json!(["https://a.example/1", "https://a.example/2"])
        );
        assert_eq!(last.fields["files"], json!(["", {"filename": "night.pdf"}]));

        // PATCH appends again: the same file twice.
        let form = Form::new().part("files", Part::bytes(b"x".to_vec()).file_name("night.pdf"));
        let (_, body) = read(s.patch("101", form).await).await;
        assert_eq!(
            body["data"]["knowledgebase_files"]
                .as_array()
                .unwrap()
                .len(),
            4
        );

        // PUT replaces files and knowledge-base URLs.
        let form = Form::new()
            .part("files", Part::bytes(b"x".to_vec()).file_name("only.pdf"))
            .text("knowledge_base", "https://kb.example/only");
        let (status, body) = read(s.put("101", form).await).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["knowledgebase_files"], json!(["only.pdf"]));
        assert_eq!(
            body["data"]["knowledgebase_urls"],
            json!(["https://kb.example/only"])
        );
        assert_eq!(body["data"]["voice_id"], 7, "fields not sent are kept");
    }

    #[tokio::test]
    async fn patch_rejects_bad_input_without_changing_anything() {
        let s = start().await;
        let before = s.sim.agent(101).unwrap();
        let cases: Vec<(Form, &str)> = vec![
            (Form::new().text("config", "[1, 2]"), "JSON object"),
            (Form::new().text("config", "{not json"), "not valid JSON"),
            (Form::new().text("greeting", "Hi"), "greetings"),
            (
                Form::new().text("prompt", "p").text("colour", "red"),
                "colour",
            ),
            (Form::new().text("voice_id", "-1"), "voice_id"),
            (Form::new().text("voice_id", "1.5"), "voice_id"),
            (
                Form::new().text("max_call_duration", "99999999999999999999999"),
                "out of range",
            ),
            (Form::new().text("status", "paused"), "status"),
            (
                Form::new().text("prompt", "a").text("prompt", "b"),
                "2 times",
            ),
            (Form::new().text("files", "notes.txt"), "file upload"),
            (
                Form::new().part("prompt", Part::bytes(b"x".to_vec()).file_name("p.txt")),
                "text field",
            ),
            (
                Form::new()
                    .text("voiceagent_name", "ok")
                    .part("prompt", Part::bytes(vec![0xff, 0xfe, 0x80])),
                "UTF-8",
            ),
        ];
        for (form, expected) in cases {
            let (status, body) = read(s.patch("101", form).await).await;
            assert_eq!(status, 400, "{body}");
            assert!(message(&body).contains(expected), "{expected}: {body}");
        }
        assert_eq!(s.sim.agent(101).unwrap(), before);

        // Not multipart.
        let resp = s
            .http
            .patch(s.url("/v3/ai-voice-agents/101"))
            .bearer_auth(DEFAULT_TOKEN)
            .json(&json!({"voiceagent_name": "x"}))
            .send()
            .await
            .unwrap();
        let (status, body) = read(resp).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("multipart/form-data"), "{body}");

        // Garbage claiming to be multipart.
        let resp = s
            .http
            .patch(s.url("/v3/ai-voice-agents/101"))
            .bearer_auth(DEFAULT_TOKEN)
            .header("content-type", "multipart/form-data; boundary=XYZ")
            .body(vec![0u8, 159, 146, 150, b'-', b'-'])
            .send()
            .await
            .unwrap();
        let (status, body) = read(resp).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("multipart"), "{body}");

        let (status, _) = read(s.patch("abc", Form::new().text("prompt", "p")).await).await;
        assert_eq!(status, 400);
        let (status, _) = read(s.patch("", Form::new().text("prompt", "p")).await).await;
        assert_eq!(status, 400);
        let (status, _) = read(
            s.patch("99999999999999999999", Form::new().text("prompt", "p"))
                .await,
        )
        .await;
        assert_eq!(status, 400);
        let (status, _) = read(s.patch("999", Form::new().text("prompt", "p")).await).await;
        assert_eq!(status, 404);
        assert_eq!(s.sim.agent(101).unwrap(), before);
    }

    #[tokio::test]
    async fn status_faults_answer_without_applying() {
        let s = start().await;
        let resp = s.faults(json!({"status": 500, "count": 2})).await;
        assert_eq!(resp.status(), 200);

        let name = |n: &str| Form::new().text("voiceagent_name", n.to_owned());
        let (status, _) = read(s.patch("101", name("one")).await).await;
        assert_eq!(status, 500);
        assert_ne!(s.sim.agent(101).unwrap()["voiceagent_name"], "one");
        let (status, _) = read(s.patch("101", name("two")).await).await;
        assert_eq!(status, 500);
        let (status, body) = read(s.patch("101", name("three")).await).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["voiceagent_name"], "three");

        // 429 with Retry-After, restricted to one agent's path.
        let resp = s
            .faults(json!([{"status": 429, "retry_after": 2, "path_contains": "/102"}]))
            .await;
        assert_eq!(resp.status(), 200);
        let (status, _) = read(s.get("/v3/ai-voice-agents/101").await).await;
        assert_eq!(status, 200, "fault for /102 must not hit /101");
        let resp = s.get("/v3/ai-voice-agents/102").await;
        assert_eq!(resp.headers()["retry-after"], "2");
        let (status, _) = read(resp).await;
        assert_eq!(status, 429);
        let (status, _) = read(s.get("/v3/ai-voice-agents/102").await).await;
        assert_eq!(status, 200);

        let faults: Vec<Option<String>> = s.sim.requests().into_iter().map(|r| r.fault).collect();
        assert_eq!(faults.iter().flatten().count(), 3);
        assert_eq!(faults[0].as_deref(), Some("status 500"));
        assert_eq!(faults[4].as_deref(), Some("status 429 retry-after 2"));

        // Bad fault bodies are refused; DELETE clears the queue.
        for bad in [
            json!({"status": 500, "colour": "red"}),
            json!({"count": 2}),
            json!({"status": 200}),
            json!({"status": 500, "count": 0}),
            json!("500"),
        ] {
            let resp = s.faults(bad.clone()).await;
            assert_eq!(resp.status(), 400, "{bad}");
        }
        let resp = s
            .http
            .post(s.url("/_sim/faults"))
            .header("content-type", "application/json")
            .body("{oops")
            .send()
            .await
            .unwrap();
        let (status, body) = read(resp).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("JSON"), "{body}");

        s.faults(json!({"status": 503, "count": 5})).await;
        let cleared: Value = s
            .http
            .delete(s.url("/_sim/faults"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(cleared["cleared"], 1);
        let (status, _) = read(s.get("/v3/ai-voice-agents/101").await).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn delayed_request_is_applied_after_the_client_gives_up() {
        let s = start().await;
        let mut events = s.sim.subscribe();
        s.faults(json!({"delay_ms": 200, "count": 1})).await;
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let result = impatient
            .patch(s.url("/v3/ai-voice-agents/103"))
            .bearer_auth(DEFAULT_TOKEN)
            .multipart(Form::new().text("greetings", "Late but applied"))
            .send()
            .await;
        assert!(result.unwrap_err().is_timeout());

        let rec = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("request recorded in time")
            .expect("event");
        assert_eq!(rec.status, 200);
        assert_eq!(rec.fault.as_deref(), Some("delay 200ms"));
        assert_eq!(rec.fields["greetings"], "Late but applied");
        assert_eq!(s.sim.agent(103).unwrap()["greetings"], "Late but applied");
    }

    #[tokio::test]
    async fn request_log_lists_everything_in_order() {
        let s = start().await;
        s.http
            .get(s.url("/v3/ai-voice-agents"))
            .send()
            .await
            .unwrap();
        s.get("/v3/ai-voice-agents/101").await;
        s.patch("101", Form::new().text("prompt", "p")).await;
        s.patch("101", Form::new().text("bogus", "p")).await;
        s.get("/v3/ai-voice-agents/555").await;
        // Control endpoints are not recorded.
        s.http.get(s.url("/_sim/agents/101")).send().await.unwrap();

        let log: Vec<RecordedRequest> = s
            .http
            .get(s.url("/_sim/requests"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let summary: Vec<(u64, &str, &str, u16)> = log
            .iter()
            .map(|r| (r.seq, r.method.as_str(), r.path.as_str(), r.status))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "GET", "/v3/ai-voice-agents", 401),
                (2, "GET", "/v3/ai-voice-agents/101", 200),
                (3, "PATCH", "/v3/ai-voice-agents/101", 200),
                (4, "PATCH", "/v3/ai-voice-agents/101", 400),
                (5, "GET", "/v3/ai-voice-agents/555", 404),
            ]
        );
        assert!(log[0].fields.is_empty());
        assert_eq!(log[3].fields["bogus"], "p");
        assert!(log
            .iter()
            .all(|r| r.request_id.is_some() && r.fault.is_none()));
        assert_eq!(s.sim.requests().len(), 5);
    }

    #[tokio::test]
    async fn serve_stops_on_cancel() {
        let s = start().await;
        s.cancel.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), s.server)
            .await
            .expect("server stopped in time")
            .expect("join");
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn custom_agents_are_filled_from_the_template() {
        let s = start_with(SimOptions {
            token: DEFAULT_TOKEN.into(),
            agents: Some(vec![json!({"id": 7, "voiceagent_name": "Seven"})]),
            ..SimOptions::default()
        })
        .await;
        let (status, body) = read(s.get("/v3/ai-voice-agents").await).await;
        assert_eq!(status, 200);
        assert_eq!(body["total"], 1);
        let agent = &body["data"][0];
        assert_eq!(agent["voiceagent_name"], "Seven");
        for field in DOCUMENTED_FIELDS {
            assert!(agent.get(field).is_some(), "missing {field}");
        }
    }

    #[test]
    fn load_agents_file_fills_and_reports_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };

        let good = write("good.json", r#"[{"id": 5, "prompt": "Hi"}, {"id": 101}]"#);
        let agents = Simulator::load_agents_file(&good).unwrap();
        assert_eq!(agents.len(), 2);
        assert_eq!(agents[0]["prompt"], "Hi");
        assert_eq!(agents[0]["id"], 5);
        for field in DOCUMENTED_FIELDS {
            assert!(agents[0].get(field).is_some(), "missing {field}");
        }
        assert_eq!(agents[1], seed_agent(101));

        let cases = [
            ("missing.json", None, "cannot read agents file"),
            ("bad.json", Some("[{\"id\": 1,"), "not valid JSON"),
            ("object.json", Some(r#"{"id": 1}"#), "expected a JSON array"),
            (
                "noid.json",
                Some(r#"[{"prompt": "x"}]"#),
                "agent #0: missing integer \"id\"",
            ),
            (
                "strid.json",
                Some(r#"[{"id": "101"}]"#),
                "\"id\" must be an integer",
            ),
            (
                "dup.json",
                Some(r#"[{"id": 1}, {"id": 1}]"#),
                "agent #1: duplicate id 1",
            ),
            (
                "cfg.json",
                Some(r#"[{"id": 1, "config": "{}"}]"#),
                "\"config\" must be a JSON object",
            ),
            ("num.json", Some("[3]"), "expected a JSON object"),
        ];
        for (name, text, expected) in cases {
            let path = match text {
                Some(text) => write(name, text),
                None => dir.path().join(name),
            };
            let err = format!("{:#}", Simulator::load_agents_file(&path).unwrap_err());
            assert!(err.contains(name), "{err}");
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    /// Checks a token pair's fields; `data` is the flat body or the envelope's `data`.
    fn assert_token_pair(data: &Value, access_ttl: TimeDelta, refresh_ttl: TimeDelta) {
        let access = data["access_token"].as_str().expect("access_token");
        let refresh = data["refresh_token"].as_str().expect("refresh_token");
        assert!(!access.is_empty() && !refresh.is_empty() && access != refresh);
        assert_eq!(data["token_type"], "Bearer");
        for (key, ttl) in [
            ("expires_in", access_ttl),
            ("refresh_expires_in", refresh_ttl),
        ] {
            let text = data[key].as_str().expect(key);
            assert!(text.ends_with('Z') && text.len() == 24, "{key}: {text}");
            let at = DateTime::parse_from_rfc3339(text).expect(key);
            let ahead = at.with_timezone(&Utc) - Utc::now();
            assert!(
                (ahead - ttl).num_seconds().abs() < 60,
                "{key} {text} is not {ttl} ahead"
            );
        }
    }

    #[tokio::test]
    async fn login_issues_flat_then_enveloped_token_pairs() {
        let s = start().await;
        let resp = s
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-request-id"));
        let flat: Value = resp.json().await.unwrap();
        assert_token_pair(&flat, TimeDelta::days(7), TimeDelta::days(180));
        assert!(
            flat.get("code").is_none() && flat.get("data").is_none(),
            "{flat}"
        );

        let resp = s
            .post_json("/_sim/oauth/shape", json!({"enveloped": true}))
            .await;
        assert_eq!(resp.status(), 200);
        let resp = s
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        let (status, body) = read(resp).await;
        assert_eq!(status, 200);
        assert_eq!(body["message"], "Success");
        assert_token_pair(&body["data"], TimeDelta::days(7), TimeDelta::days(180));
        assert_ne!(body["data"]["access_token"], flat["access_token"]);

        // Refresh and revoke answer in the same shape.
        let (status, body) = read(s.refresh(&body["data"]["refresh_token"]).await).await;
        assert_eq!(status, 200);
        assert_token_pair(&body["data"], TimeDelta::days(7), TimeDelta::days(180));
        let resp = s
            .post_json("/oauth/revoke-token", json!({"token": "x"}))
            .await;
        let (status, body) = read(resp).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["revoked"], true);

        s.post_json("/_sim/oauth/shape", json!({"enveloped": false}))
            .await;
        assert_token_pair(&s.login().await, TimeDelta::days(7), TimeDelta::days(180));
        let resp = s
            .post_json("/_sim/oauth/shape", json!({"envelope": 1}))
            .await;
        assert_eq!(resp.status(), 400);

        // Options: enveloped from the start, custom lifetimes.
        let custom = start_with(SimOptions {
            enveloped_tokens: true,
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(86_400),
            ..SimOptions::default()
        })
        .await;
        let resp = custom
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        let (status, body) = read(resp).await;
        assert_eq!(status, 200);
        assert_token_pair(&body["data"], TimeDelta::hours(1), TimeDelta::days(1));
    }

    #[tokio::test]
    async fn login_rejects_bad_credentials_and_bad_requests() {
        let s = start().await;
        for (email, password) in [
            (DEFAULT_LOGIN_EMAIL, "wrong-password"),
            ("someone@example.com", DEFAULT_LOGIN_PASSWORD),
        ] {
            let (status, body) = read(s.login_with(email, password).await).await;
            assert_eq!(status, 401);
            assert!(
                message(&body).contains("invalid email or password"),
                "{body}"
            );
        }
        for bad in [
            json!({"email": DEFAULT_LOGIN_EMAIL}),
            json!([1]),
            json!("x"),
        ] {
            let (status, _) = read(s.post_json("/oauth/token", bad).await).await;
            assert_eq!(status, 400);
        }
        let resp = s
            .http
            .post(s.url("/oauth/token"))
            .body("email=a&password=b")
            .send()
            .await
            .unwrap();
        let (status, body) = read(resp).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("JSON"), "{body}");
        let resp = s.http.get(s.url("/oauth/token")).send().await.unwrap();
        assert_eq!(resp.headers()["allow"], "POST");
        assert_eq!(read(resp).await.0, 405);
        let resp = s.http.post(s.url("/oauth/nothing")).send().await.unwrap();
        assert_eq!(read(resp).await.0, 404);
        assert_eq!(s.oauth_stats().await["logins"], 0);

        // Logging in can be switched off.
        let no_login = start_with(SimOptions {
            login: None,
            ..SimOptions::default()
        })
        .await;
        let resp = no_login
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        assert_eq!(read(resp).await.0, 401);
    }

    #[tokio::test]
    async fn login_is_rate_limited() {
        let s = start().await;
        for i in 0..LOGIN_RATE_LIMIT {
            // Failed logins count too.
            let password = if i % 2 == 0 {
                DEFAULT_LOGIN_PASSWORD
            } else {
                "wrong"
            };
            let resp = s.login_with(DEFAULT_LOGIN_EMAIL, password).await;
            assert_ne!(resp.status(), 429, "call {i}");
        }
        let resp = s
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        let retry_after: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let (status, body) = read(resp).await;
        assert_eq!(status, 429);
        assert!(message(&body).contains("too many"), "{body}");
        assert_eq!(s.oauth_stats().await["logins"], 5);
        // Other OAuth endpoints are not limited.
        let resp = s
            .post_json("/oauth/revoke-token", json!({"token": "t"}))
            .await;
        assert_eq!(resp.status(), 200);
    }

    #[test]
    fn login_rate_window_slides() {
        let mut oauth = OAuthState::default();
        let now = Instant::now();
        let Some(old) = now.checked_sub(LOGIN_RATE_WINDOW) else {
            return; // the monotonic clock started less than a minute ago
        };
        oauth.login_calls.push_back(old);
        for _ in 1..LOGIN_RATE_LIMIT {
            oauth.login_calls.push_back(now);
        }
        // The oldest call has left the window: one more is admitted, then none.
        assert_eq!(oauth.admit_login(), Ok(()));
        let wait = oauth.admit_login().unwrap_err();
        assert!((59..=60).contains(&wait), "{wait}");
    }

    #[tokio::test]
    async fn refresh_rotates_and_refresh_tokens_are_single_use() {
        let s = start().await;
        let first = s.login().await;
        let resp = s.refresh(&first["refresh_token"]).await;
        assert_eq!(resp.status(), 200);
        let second: Value = resp.json().await.unwrap();
        assert_token_pair(&second, TimeDelta::days(7), TimeDelta::days(180));
        assert_ne!(second["access_token"], first["access_token"]);
        assert_ne!(second["refresh_token"], first["refresh_token"]);

        let (status, body) = read(s.refresh(&first["refresh_token"]).await).await;
        assert_eq!(status, 401, "a used refresh token must fail");
        assert!(message(&body).contains("refresh token"), "{body}");
        // The old access token lives on; so does the new one.
        assert_eq!(
            s.get_as(&first["access_token"], "/v3/ai-voice-agents/101")
                .await,
            200
        );
        assert_eq!(
            s.get_as(&second["access_token"], "/v3/ai-voice-agents/101")
                .await,
            200
        );

        // Two refreshes racing with one token: exactly one wins.
        let (a, b) = tokio::join!(
            s.refresh(&second["refresh_token"]),
            s.refresh(&second["refresh_token"])
        );
        let mut statuses = [a.status().as_u16(), b.status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 401]);

        let (status, _) = read(s.refresh(&json!("never-issued")).await).await;
        assert_eq!(status, 401);
        let (status, _) = read(s.post_json("/oauth/refresh-token", json!({})).await).await;
        assert_eq!(status, 400);
        assert_eq!(s.oauth_stats().await["refreshes"], 2);
    }

    #[tokio::test]
    async fn issued_access_tokens_work_until_expired() {
        let s = start().await;
        let pair = s.login().await;
        let agent = "/v3/ai-voice-agents/101";
        assert_eq!(s.get_as(&pair["access_token"], agent).await, 200);
        // Refresh tokens are not access tokens.
        assert_eq!(s.get_as(&pair["refresh_token"], agent).await, 401);

        let resp = s
            .http
            .post(s.url("/_sim/oauth/expire"))
            .send()
            .await
            .unwrap();
        let expired: Value = resp.json().await.unwrap();
        assert_eq!(
            expired,
            json!({"expired_access_tokens": 1, "expired_refresh_tokens": 0})
        );
        let resp = s
            .http
            .get(s.url(agent))
            .bearer_auth(pair["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        let (status, body) = read(resp).await;
        assert_eq!(status, 401);
        assert!(message(&body).contains("expired"), "{body}");
        assert_eq!(s.get_as(&json!(DEFAULT_TOKEN), agent).await, 200);
        assert_eq!(s.oauth_stats().await["active_access_tokens"], 0);

        // The refresh token survived; `refresh: true` expires it too.
        let resp = s.refresh(&pair["refresh_token"]).await;
        assert_eq!(resp.status(), 200);
        let renewed: Value = resp.json().await.unwrap();
        assert_eq!(s.get_as(&renewed["access_token"], agent).await, 200);
        let resp = s
            .post_json("/_sim/oauth/expire", json!({"refresh": true}))
            .await;
        let expired: Value = resp.json().await.unwrap();
        assert_eq!(
            expired,
            json!({"expired_access_tokens": 1, "expired_refresh_tokens": 1})
        );
        assert_eq!(s.get_as(&renewed["access_token"], agent).await, 401);
        assert_eq!(
            read(s.refresh(&renewed["refresh_token"]).await).await.0,
            401
        );
        assert_eq!(s.get_as(&json!(DEFAULT_TOKEN), agent).await, 200);
        let resp = s
            .post_json("/_sim/oauth/expire", json!({"refresh": "yes"}))
            .await;
        assert_eq!(resp.status(), 400);

        // A zero lifetime issues tokens that are already expired.
        let short = start_with(SimOptions {
            access_ttl: Duration::ZERO,
            ..SimOptions::default()
        })
        .await;
        let pair = short.login().await;
        assert_eq!(short.get_as(&pair["access_token"], agent).await, 401);
    }

    #[tokio::test]
    async fn revoke_is_idempotent_and_counted() {
        let s = start().await;
        let pair = s.login().await;
        let other = s.login().await;
        for _ in 0..2 {
            let resp = s
                .post_json(
                    "/oauth/revoke-token",
                    json!({"token": pair["access_token"]}),
                )
                .await;
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body, json!({"revoked": true}));
        }
        let agent = "/v3/ai-voice-agents/101";
        assert_eq!(s.get_as(&pair["access_token"], agent).await, 401);
        assert_eq!(s.get_as(&other["access_token"], agent).await, 200);

        let resp = s
            .post_json(
                "/oauth/revoke-token",
                json!({"token": pair["refresh_token"]}),
            )
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(read(s.refresh(&pair["refresh_token"]).await).await.0, 401);
        let resp = s
            .post_json("/oauth/revoke-token", json!({"token": "unknown"}))
            .await;
        assert_eq!(resp.status(), 200);
        let resp = s
            .post_json("/oauth/revoke-token", json!({"tok": "x"}))
            .await;
        assert_eq!(read(resp).await.0, 400);

        let resp = s.refresh(&other["refresh_token"]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            s.oauth_stats().await,
            json!({"logins": 2, "refreshes": 1, "revokes": 4, "active_access_tokens": 2})
        );
    }

    #[tokio::test]
    async fn oauth_requests_are_logged_without_secrets() {
        let s = start().await;
        let pair = s.login().await;
        s.login_with(DEFAULT_LOGIN_EMAIL, "the-wrong-secret").await;
        let resp = s.refresh(&pair["refresh_token"]).await;
        let renewed: Value = resp.json().await.unwrap();
        s.post_json(
            "/oauth/revoke-token",
            json!({"token": renewed["access_token"]}),
        )
        .await;
        s.get_as(&pair["access_token"], "/v3/ai-voice-agents/101")
            .await;

        let log: Vec<RecordedRequest> = s
            .http
            .get(s.url("/_sim/requests"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let summary: Vec<(&str, &str, u16)> = log
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
            .collect();
        assert_eq!(
            summary,
            [
                ("POST", "/oauth/token", 200),
                ("POST", "/oauth/token", 401),
                ("POST", "/oauth/refresh-token", 200),
                ("POST", "/oauth/revoke-token", 200),
                ("GET", "/v3/ai-voice-agents/101", 200),
            ]
        );
        assert_eq!(
            log[0].fields,
            json!({"email": DEFAULT_LOGIN_EMAIL})
                .as_object()
                .cloned()
                .unwrap()
        );
        assert_eq!(log[1].fields["email"], DEFAULT_LOGIN_EMAIL);
        assert!(log[2..].iter().all(|r| r.fields.is_empty()));
        assert!(log.iter().all(|r| r.request_id.is_some()));

        let serialized = serde_json::to_string(&log).unwrap();
        let mut secrets = vec![DEFAULT_LOGIN_PASSWORD, "the-wrong-secret"];
        for pair in [&pair, &renewed] {
            secrets.push(pair["access_token"].as_str().unwrap());
            secrets.push(pair["refresh_token"].as_str().unwrap());
        }
        for secret in secrets {
            assert!(
                !serialized.contains(secret),
                "{secret} leaked into {serialized}"
            );
        }
    }

    #[tokio::test]
    async fn faults_apply_to_oauth_paths() {
        let s = start().await;
        s.faults(json!({"status": 503, "retry_after": 1, "path_contains": "/oauth/token"}))
            .await;
        let (status, _) = read(s.get("/v3/ai-voice-agents/101").await).await;
        assert_eq!(status, 200, "the fault is for /oauth/token only");
        let resp = s
            .login_with(DEFAULT_LOGIN_EMAIL, DEFAULT_LOGIN_PASSWORD)
            .await;
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(read(resp).await.0, 503);
        assert_eq!(
            s.oauth_stats().await["logins"],
            0,
            "a faulted login is not applied"
        );
        let rec = s.sim.requests().pop().unwrap();
        assert_eq!(rec.fault.as_deref(), Some("status 503 retry-after 1"));
        assert_eq!(rec.fields["email"], DEFAULT_LOGIN_EMAIL);
        s.login().await;
    }

    /// Sends a request and reads its body: the error, if any, from either step.
    async fn send_and_read(request: reqwest::RequestBuilder) -> Result<Bytes, reqwest::Error> {
        request.send().await?.bytes().await
    }

    #[tokio::test]
    async fn dropped_connection_fault_applies_then_breaks_the_response() {
        let s = start().await;
        let mut events = s.sim.subscribe();
        let resp = s.faults(json!({"drop": true, "count": 1})).await;
        assert_eq!(resp.status(), 200);
        let listed: Value = s
            .http
            .get(s.url("/_sim/faults"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed, json!([{"drop": true, "count": 1}]));

        let request = s
            .http
            .patch(s.url("/v3/ai-voice-agents/102"))
            .bearer_auth(DEFAULT_TOKEN)
            .multipart(Form::new().text("greetings", "Committed, then lost"));
        let outcome = send_and_read(request).await;
        assert!(
            outcome.is_err(),
            "the client must see a broken response: {outcome:?}"
        );

        let rec = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("recorded in time")
            .expect("event");
        assert_eq!(rec.fault.as_deref(), Some("drop"));
        assert_eq!(rec.status, 200);
        let (status, body) = read(s.get("/v3/ai-voice-agents/102").await).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["greetings"], "Committed, then lost");

        // A dropped refresh is applied too: the client never sees the new pair and its old
        // refresh token is already dead.
        let pair = s.login().await;
        s.faults(json!({"drop": true, "delay_ms": 10, "path_contains": "refresh"}))
            .await;
        let request = s
            .http
            .post(s.url("/oauth/refresh-token"))
            .json(&json!({"refresh_token": pair["refresh_token"]}));
        assert!(send_and_read(request).await.is_err());
        assert_eq!(read(s.refresh(&pair["refresh_token"]).await).await.0, 401);
        assert_eq!(s.oauth_stats().await["refreshes"], 1);
        let rec = s.sim.requests().into_iter().rev().nth(1).unwrap();
        assert_eq!(rec.fault.as_deref(), Some("delay 10ms, drop"));

        for bad in [
            json!({"drop": true, "status": 500}),
            json!({"drop": true, "retry_after": 1}),
            json!({"drop": false}),
        ] {
            let resp = s.faults(bad.clone()).await;
            assert_eq!(resp.status(), 400, "{bad}");
        }
    }
}
