//! Where the bearer token comes from: a static token, a token file (re-read after a 401),
//! or an OAuth login whose token pair is kept in SQLite and refreshed ahead of expiry.
//!
//! OAuth refresh tokens are single-use, so every refresh and login happens under one
//! async lock (single-flight across all workers), and the new pair is persisted before
//! it is used. `/oauth/token` allows 10 calls a minute per IP: autopilot logs in at most
//! once a minute.

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::store::{Store, StoredTokens};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

use super::{ErrorKind, PlatformError};

/// Refresh this long before the access token expires.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(10 * 60);
/// Never call the login endpoint more often than this.
pub const LOGIN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct TokenProvider {
    kind: Arc<Kind>,
}

enum Kind {
    Static(SecretString),
    File {
        path: PathBuf,
        current: RwLock<SecretString>,
        metrics: Arc<Metrics>,
    },
    OAuth(OAuth),
}

pub struct OAuthSettings {
    pub url: String,
    pub email: String,
    pub password: SecretString,
}

struct OAuth {
    settings: OAuthSettings,
    http: reqwest::Client,
    store: Store,
    clock: SharedClock,
    state: tokio::sync::Mutex<OAuthState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct OAuthState {
    loaded: bool,
    pair: Option<StoredTokens>,
    last_login: Option<DateTime<Utc>>,
}

impl TokenProvider {
    pub fn fixed(token: SecretString) -> Self {
        Self {
            kind: Arc::new(Kind::Static(token)),
        }
    }

    pub fn file(path: PathBuf, first: SecretString, metrics: Arc<Metrics>) -> Self {
        Self {
            kind: Arc::new(Kind::File {
                path,
                current: RwLock::new(first),
                metrics,
            }),
        }
    }

    pub fn oauth(
        settings: OAuthSettings,
        http: reqwest::Client,
        store: Store,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            kind: Arc::new(Kind::OAuth(OAuth {
                settings,
                http,
                store,
                clock,
                state: tokio::sync::Mutex::new(OAuthState::default()),
                metrics,
            })),
        }
    }

    /// The token to send now.
    pub async fn bearer(&self) -> Result<SecretString, PlatformError> {
        match &*self.kind {
            Kind::Static(t) => Ok(t.clone()),
            Kind::File { current, .. } => {
                Ok(current.read().unwrap_or_else(|e| e.into_inner()).clone())
            }
            Kind::OAuth(o) => o.bearer().await,
        }
    }

    /// After a 401 answered to a request sent with `used`: get a fresh token once.
    /// `Ok(true)`: retry with [`Self::bearer`]; `Ok(false)`: nothing to renew (the 401
    /// stands); `Err`: renewing failed, and that error is the request's outcome.
    pub async fn after_unauthorized(&self, used: &SecretString) -> Result<bool, PlatformError> {
        Ok(match &*self.kind {
            Kind::Static(_) => false,
            Kind::File {
                path,
                current,
                metrics,
            } => {
                let Ok(text) = std::fs::read_to_string(path) else {
                    return Ok(false);
                };
                let fresh = text.trim_end_matches(['\r', '\n']).to_string();
                let mut cur = current.write().unwrap_or_else(|e| e.into_inner());
                if fresh.is_empty() || fresh == used.expose_secret() {
                    cur.expose_secret() != used.expose_secret()
                } else {
                    info!(path = %path.display(), "token file changed; using the new token");
                    metrics.inc(
                        "autopilot_token_refreshes_total",
                        &[("kind", "file"), ("result", "ok")],
                    );
                    *cur = SecretString::from(fresh);
                    true
                }
            }
            Kind::OAuth(o) => o.after_unauthorized(used).await?,
        })
    }
}

impl OAuth {
    async fn bearer(&self) -> Result<SecretString, PlatformError> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await;
        let now = self.clock.now();
        if let Some(p) = &st.pair {
            let ahead = chrono::Duration::from_std(REFRESH_AHEAD).unwrap_or_default();
            if p.expires_at - ahead > now {
                return Ok(p.access_token.clone());
            }
        }
        self.renew(&mut st).await
    }

    async fn after_unauthorized(&self, used: &SecretString) -> Result<bool, PlatformError> {
        let mut st = self.state.lock().await;
        self.load(&mut st).await;
        if let Some(p) = &st.pair {
            if p.access_token.expose_secret() != used.expose_secret() {
                // Another worker already renewed it while we waited.
                return Ok(true);
            }
        }
        match self.renew(&mut st).await {
            Ok(_) => Ok(true),
            Err(e) => {
                warn!(error = %e, "could not renew the platform token after a 401");
                Err(e)
            }
        }
    }

    fn count(&self, kind: &str, result: &str) {
        self.metrics.inc(
            "autopilot_token_refreshes_total",
            &[("kind", kind), ("result", result)],
        );
    }

    async fn load(&self, st: &mut OAuthState) {
        if st.loaded {
            return;
        }
        match self.store.load_tokens().await {
            Ok(pair) => st.pair = pair,
            Err(e) => warn!(error = %e, "could not read stored platform tokens"),
        }
        st.loaded = true;
    }

    /// Refresh if the refresh token is still good, else log in. Caller holds the lock.
    async fn renew(&self, st: &mut OAuthState) -> Result<SecretString, PlatformError> {
        let now = self.clock.now();
        if let Some(p) = st.pair.as_ref().filter(|p| p.refresh_expires_at > now) {
            let body = json!({ "refresh_token": p.refresh_token.expose_secret() });
            match self.call("/oauth/refresh-token", &body).await {
                Ok(pair) => {
                    info!(expires_at = %pair.expires_at, "platform token refreshed");
                    self.count("refresh", "ok");
                    return self.adopt(st, pair).await;
                }
                Err(e) => {
                    warn!(error = %e, "token refresh failed; logging in again");
                    self.count("refresh", "failed");
                }
            }
        }
        if let Some(last) = st.last_login {
            let wait =
                (last + chrono::Duration::from_std(LOGIN_INTERVAL).unwrap_or_default()) - now;
            if wait > chrono::Duration::zero() {
                return Err(PlatformError {
                    kind: ErrorKind::Status(
                        "token expired and the last login was less than a minute ago; waiting to log in again".into(),
                    ),
                    status: Some(429),
                    request_id: None,
                    retry_after: wait.to_std().ok(),
                    body: None,
                });
            }
        }
        st.last_login = Some(now);
        let body = json!({
            "email": self.settings.email,
            "password": self.settings.password.expose_secret(),
        });
        let pair = self.call("/oauth/token", &body).await.map_err(|mut e| {
            self.count("login", "failed");
            e.kind = ErrorKind::Status(format!("login to the platform failed: {}", e.kind));
            e
        })?;
        info!(expires_at = %pair.expires_at, "logged in to the platform");
        self.count("login", "ok");
        self.adopt(st, pair).await
    }

    /// Persists the new pair before anyone uses it (the old refresh token is dead now).
    async fn adopt(
        &self,
        st: &mut OAuthState,
        pair: StoredTokens,
    ) -> Result<SecretString, PlatformError> {
        if let Err(e) = self.store.save_tokens(&pair, self.clock.now()).await {
            warn!(error = %e, "could not persist the new platform tokens; using them in memory");
        }
        let token = pair.access_token.clone();
        st.pair = Some(pair);
        Ok(token)
    }

    async fn call(&self, path: &str, body: &Value) -> Result<StoredTokens, PlatformError> {
        let url = format!("{}{path}", self.settings.url);
        let reply = super::read_reply(self.http.post(url).json(body).send().await, false).await?;
        parse_pair(&reply.data).map_err(|msg| PlatformError {
            kind: ErrorKind::Decode(msg),
            status: Some(reply.status),
            request_id: reply.request_id,
            retry_after: None,
            body: None,
        })
    }
}

/// The token response, flat or wrapped in `{code, message, data}`. Expiries are ISO-8601
/// timestamps per the docs; a number is read as seconds from now, defensively.
pub fn parse_pair(v: &Value) -> Result<StoredTokens, String> {
    let v = match v.get("data") {
        Some(d) if d.is_object() => d,
        _ => v,
    };
    let text = |k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("token response has no `{k}`"))
    };
    let when = |k: &str| -> Result<DateTime<Utc>, String> {
        match v.get(k) {
            Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("`{k}` is not an ISO-8601 timestamp: {e}")),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(|secs| Utc::now() + chrono::Duration::seconds(secs))
                .ok_or_else(|| format!("`{k}` is not a whole number")),
            _ => Err(format!("token response has no `{k}`")),
        }
    };
    Ok(StoredTokens {
        access_token: SecretString::from(text("access_token")?),
        refresh_token: SecretString::from(text("refresh_token")?),
        expires_at: when("expires_in")?,
        refresh_expires_at: when("refresh_expires_in")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_and_enveloped_pairs_parse() {
        let flat = json!({"access_token": "a", "refresh_token": "r", "token_type": "Bearer",
            "expires_in": "2026-12-10T12:00:00.000Z", "refresh_expires_in": "2027-06-01T12:00:00Z"});
        let p = parse_pair(&flat).unwrap();
        assert_eq!(p.access_token.expose_secret(), "a");
        assert_eq!(
            p.expires_at,
            "2026-12-10T12:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let wrapped = json!({"code": 200, "message": "Success", "data": flat});
        assert_eq!(
            parse_pair(&wrapped).unwrap().refresh_token.expose_secret(),
            "r"
        );
        assert!(parse_pair(&json!({"access_token": "a"}))
            .unwrap_err()
            .contains("refresh_token"));
        let bad = json!({"access_token": "a", "refresh_token": "r", "expires_in": "soon", "refresh_expires_in": "x"});
        assert!(parse_pair(&bad).unwrap_err().contains("ISO-8601"));
    }
}
