//! The durable PATCH queue: workers claim jobs under a lease, send them, and record every
//! attempt. Retry policy is data (`RetryPolicy`); the worker is one step (`run_once`) and
//! a loop around it.

use crate::clock::SharedClock;
use crate::config::QueueConfig;
use crate::platform::{PlatformClient, PlatformError};
use crate::rules::{guard_holds, Condition, PatchField, PatchSet};
use crate::store::{ClaimedJob, Finish, JobStatus, Store};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// After a wake-up by a new job, how long a worker lets others gather before it claims.
pub const COALESCE_WAKEUPS: Duration = Duration::from_millis(5);

/// When and whether to try again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_retry_after: Duration,
    /// A job still failing this long after it was created is dead.
    pub max_age: Duration,
    /// After a timeout the request may still be running at the platform: the retry (and
    /// so the agent's next PATCH) waits at least this long, so a slow request lands
    /// before, not after, the next one. The platform timeout.
    pub after_timeout: Duration,
}

impl RetryPolicy {
    pub fn from_config(q: &QueueConfig, platform_timeout: Duration) -> Self {
        Self {
            after_timeout: platform_timeout,
            max_attempts: q.max_attempts,
            initial_backoff: q.initial_backoff,
            max_backoff: q.max_backoff,
            max_retry_after: q.max_retry_after,
            max_age: q.max_age,
        }
    }

    /// The delay before attempt `attempt + 1`, after `attempt` failed: exponential with
    /// full jitter, capped; at least what the platform's `Retry-After` asked for (itself
    /// clamped to a ceiling so a hostile header cannot park the queue).
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max_backoff);
        let jittered = Duration::from_millis(rng.random_range(0..=exp.as_millis() as u64));
        match retry_after {
            Some(ra) => jittered.max(ra.min(self.max_retry_after)),
            None => jittered,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Worked,
    Idle,
}

/// Everything a worker needs; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pub store: Store,
    pub client: PlatformClient,
    pub clock: SharedClock,
    pub policy: RetryPolicy,
    pub lease: Duration,
    /// On shutdown, how long an in-flight PATCH may still take.
    pub shutdown_grace: Duration,
    /// Woken when new jobs are committed.
    pub notify: Arc<Notify>,
}

impl Queue {
    /// Puts jobs whose lease ran out back in line: at start and then every quarter lease
    /// (at least every 30 s), so a job of a crashed process is retried within about
    /// 1.25 leases.
    pub async fn rescue_loop(self, cancel: CancellationToken) {
        let every = (self.lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            match self.store.rescue_expired(self.clock.now()).await {
                Ok(ids) if !ids.is_empty() => {
                    warn!(jobs = ?ids, "leases ran out (a worker died mid-attempt); jobs are back in line");
                    self.notify.notify_waiters();
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "lease rescue failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.clock.sleep_until(self.clock.now() + chrono::Duration::from_std(every).unwrap_or_default()) => {}
            }
        }
    }

    /// Claims and processes one job. After `cancel`, an in-flight job has
    /// `shutdown_grace` to finish; then it is cut off and put back in line (the platform
    /// may or may not have applied it: the attempt is counted and says so).
    pub async fn run_once(
        &self,
        worker: &str,
        cancel: &CancellationToken,
    ) -> Result<Outcome, crate::store::StoreError> {
        let Some(job) = self
            .store
            .claim(worker, self.clock.now(), self.lease)
            .await?
        else {
            return Ok(Outcome::Idle);
        };
        let span = tracing::info_span!("job", job_id = job.id, rule = %job.rule, agent_id = job.agent_id, attempt = job.attempt);
        let started_at = self.clock.now();
        let grace = async {
            cancel.cancelled().await;
            tokio::time::sleep(self.shutdown_grace).await;
        };
        let finish = tokio::select! {
            f = self.process(&job).instrument(span.clone()) => f,
            _ = grace => {
                span.in_scope(|| warn!("shutdown grace ran out mid-send; the job goes back in line"));
                Finish {
                    status: JobStatus::Pending,
                    next_attempt_at: Some(self.clock.now()),
                    http_status: None,
                    error: Some("interrupted by shutdown; the platform may have applied it".into()),
                    request_id: None,
                    started_at,
                    finished_at: self.clock.now(),
                    new_state: None,
                    attempted: true,
                }
            }
        };
        let kept = self.store.finish(&job, &finish).await?;
        span.in_scope(|| {
            if !kept {
                warn!(
                    "lease lost before the outcome was recorded; another worker owns the job now"
                );
            }
        });
        Ok(Outcome::Worked)
    }

    /// The worker loop: work while there is work; otherwise sleep until the next job is
    /// due, new jobs are committed, or the token is cancelled. A job in flight finishes
    /// (bounded by the HTTP timeout) before the worker stops.
    pub async fn run(self, worker: String, cancel: CancellationToken) {
        info!(worker = %worker, "queue worker started");
        while !cancel.is_cancelled() {
            if self.step(&worker, &cancel).await == Outcome::Worked {
                continue;
            }
            // Registered only now, while idle: `notify_one` wakes the first registered
            // worker, and one busy with a PATCH must not take the wake-up meant for an
            // idle one. A job committed between the step and the registration would be
            // missed, so look once more before sleeping.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.step(&worker, &cancel).await == Outcome::Worked {
                continue;
            }
            let now = self.clock.now();
            let next = match self.store.next_due().await {
                Ok(Some(t)) if t > now => t,
                // Due, yet our claim found nothing: every due job waits behind one in
                // flight for its agent, and the worker that finishes that one takes the
                // next itself. New jobs and rescued leases wake us; until then, no need
                // to poll.
                Ok(Some(_)) | Ok(None) | Err(_) => now + chrono::Duration::seconds(1),
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = notified => {
                    // A burst of deliveries notifies once each: gather them into one
                    // claim instead of one claim per delivery.
                    tokio::time::sleep(COALESCE_WAKEUPS).await;
                }
                _ = self.clock.sleep_until(next) => {}
            }
        }
        info!(worker = %worker, "queue worker stopped");
    }

    /// [`Queue::run_once`], with a failed step logged and counted as idle.
    async fn step(&self, worker: &str, cancel: &CancellationToken) -> Outcome {
        match self.run_once(worker, cancel).await {
            Ok(outcome) => outcome,
            Err(e) => {
                warn!(worker = %worker, error = %e, "queue step failed; retrying shortly");
                Outcome::Idle
            }
        }
    }

    async fn process(&self, job: &ClaimedJob) -> Finish {
        let started_at = self.clock.now();
        let finish = |status, error: Option<String>, attempted| Finish {
            status,
            next_attempt_at: None,
            http_status: None,
            error,
            request_id: None,
            started_at,
            finished_at: self.clock.now(),
            new_state: None,
            attempted,
        };
        if let Some(until) = job.valid_until {
            if started_at >= until {
                info!(valid_until = %until, "expired: a later scheduled change of the same fields was due");
                return finish(
                    JobStatus::Expired,
                    Some(format!(
                        "not sent by {until}, when the next change of these fields was due"
                    )),
                    false,
                );
            }
        }
        let set = match PatchSet::from_json(&job.fields) {
            Ok(s) => s,
            Err(e) => {
                return finish(
                    JobStatus::Dead,
                    Some(format!("stored fields are invalid: {e}")),
                    false,
                )
            }
        };
        let guard = match job
            .guard
            .as_ref()
            .map(Condition::list_from_json)
            .transpose()
        {
            Ok(g) => g.unwrap_or_default(),
            Err(e) => {
                return finish(
                    JobStatus::Dead,
                    Some(format!("stored guard is invalid: {e}")),
                    false,
                )
            }
        };

        // Files are appended by the platform, so a PATCH with files is not idempotent: a
        // retry first reads the agent and leaves out the files it already lists.
        let retry_with_files = job.attempt > 1 && !set.files().is_empty();
        let mut set = set;
        if retry_with_files {
            match self.client.get_agent(job.agent_id).await {
                Ok(reply) => {
                    let present = crate::rules::listed_files(&reply.data);
                    let before = set.files().len();
                    set = set.without_files_named(&present);
                    let skipped = before - set.files().len();
                    if skipped > 0 {
                        info!(
                            skipped,
                            "retry: the agent already lists these files; not sending them again"
                        );
                    }
                    if let Err(e) = self
                        .store
                        .save_agent_state(job.agent_id, &reply.data, "get", self.clock.now())
                        .await
                    {
                        warn!(error = %e, "could not store the agent's state");
                    }
                    if set.is_empty() {
                        return Finish {
                            status: JobStatus::Done,
                            next_attempt_at: None,
                            http_status: Some(reply.status),
                            error: Some("an earlier attempt had already attached every file; nothing left to send".into()),
                            request_id: reply.request_id,
                            started_at,
                            finished_at: self.clock.now(),
                            new_state: Some(reply.data),
                            attempted: true,
                        };
                    }
                }
                Err(e) => return self.failed(job, started_at, e),
            }
        }

        // The agent's state is needed to re-check `when` and to merge `config`.
        let needs_state = !guard.is_empty() || set.get(PatchField::Config).is_some();
        let state = if needs_state {
            match self.known_state(job.agent_id).await {
                Ok(s) => Some(s),
                Err(e) => return self.failed(job, started_at, e),
            }
        } else {
            None
        };
        if let Some(state) = &state {
            if let Err(reason) = guard_holds(&guard, state) {
                info!(%reason, "skipped: the agent no longer meets the rule's `when`");
                return finish(JobStatus::Skipped, Some(reason), false);
            }
        }
        let form = set.form_fields(state.as_ref().and_then(|s| s.get("config")));
        let mut files = Vec::new();
        for path in set.files() {
            match tokio::fs::read(&path).await {
                Ok(content) => files.push((crate::rules::file_name(&path), content)),
                Err(e) => {
                    return finish(
                        JobStatus::Dead,
                        Some(format!("cannot read file {path}: {e}")),
                        false,
                    )
                }
            }
        }
        match self.client.patch_agent(job.agent_id, &form, &files).await {
            Ok(reply) => {
                info!(
                    status = reply.status,
                    request_id = reply.request_id.as_deref().unwrap_or("-"),
                    "PATCH delivered"
                );
                Finish {
                    status: JobStatus::Done,
                    next_attempt_at: None,
                    http_status: Some(reply.status),
                    error: None,
                    request_id: reply.request_id,
                    started_at,
                    finished_at: self.clock.now(),
                    new_state: Some(reply.data).filter(Value::is_object),
                    attempted: true,
                }
            }
            Err(e) => self.failed(job, started_at, e),
        }
    }

    /// The last known state, or a GET of the agent when nothing is known yet.
    async fn known_state(&self, agent_id: i64) -> Result<Value, PlatformError> {
        if let Ok(Some(s)) = self.store.agent_state(agent_id).await {
            return Ok(s);
        }
        let reply = self.client.get_agent(agent_id).await?;
        if let Err(e) = self
            .store
            .save_agent_state(agent_id, &reply.data, "get", self.clock.now())
            .await
        {
            warn!(error = %e, "could not store the agent's state");
        }
        Ok(reply.data)
    }

    fn failed(&self, job: &ClaimedJob, started_at: DateTime<Utc>, e: PlatformError) -> Finish {
        let now = self.clock.now();
        let deadline =
            job.created_at + chrono::Duration::from_std(self.policy.max_age).unwrap_or_default();
        let mut error = e.to_string();
        let (status, next) = if e.retryable() && job.attempt < self.policy.max_attempts {
            let mut delay = self
                .policy
                .delay(job.attempt, e.retry_after, &mut rand::rng());
            if e.kind == crate::platform::ErrorKind::Timeout {
                delay = delay.max(self.policy.after_timeout);
            }
            let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
            if next > deadline {
                error = format!(
                    "gave up: still failing after max_age ({}); last error: {error}",
                    humantime::format_duration(self.policy.max_age)
                );
                (JobStatus::Dead, None)
            } else {
                (JobStatus::Pending, Some(next))
            }
        } else {
            (JobStatus::Dead, None)
        };
        if let Some(body) = e.body.as_deref().filter(|b| !b.is_empty()) {
            error.push_str(": ");
            error.push_str(body);
        }
        warn!(
            status = e.status,
            request_id = e.request_id.as_deref().unwrap_or("-"),
            next = ?next,
            outcome = status.as_str(),
            error = %e,
            "PATCH failed"
        );
        Finish {
            status,
            next_attempt_at: next,
            http_status: e.status,
            error: Some(error),
            request_id: e.request_id,
            started_at,
            finished_at: now,
            new_state: None,
            attempted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delay_is_capped_jittered_and_honours_retry_after() {
        let p = RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
            after_timeout: Duration::from_secs(10),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..20 {
            let d = p.delay(attempt, None, &mut rng);
            let cap = Duration::from_secs(1 << (attempt - 1).min(10)).min(Duration::from_secs(10));
            assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
        }
        assert!(p.delay(1, Some(Duration::from_secs(30)), &mut rng) >= Duration::from_secs(30));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), &mut rng),
            Duration::from_secs(60)
        );
    }
}
