//! All SQL lives here. SQLite in WAL mode with `synchronous=FULL`; one writer connection
//! (every write goes through it, so writes never contend inside the process) and a
//! read-only pool. Each function is one short transaction; none is held across a
//! network call.

mod lock;
#[cfg(test)]
mod tests;

pub use lock::DbLock;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the database directory {0}: {1}")]
    Dir(String, std::io::Error),
    #[error("stored JSON is corrupt: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Schema(String),
    #[error("could not commit: {0}")]
    Commit(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// How long a write waits for another process's lock unless configured otherwise.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Every connection: a busy timeout, foreign keys, and fsync on every commit.
fn connect_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(busy_timeout)
        .foreign_keys(true)
        .synchronous(SqliteSynchronous::Full)
}

#[derive(Clone)]
pub struct Store {
    write: SqlitePool,
    read: SqlitePool,
    /// To the group committer, which writes every delivery and every claim and outcome
    /// of a queue job.
    writes: mpsc::Sender<Write>,
    /// The group committer's transactions, the deliveries they held, its busy time.
    ingest_stats: Arc<IngestStats>,
    /// Each agent's last known state as stored (`None`: none stored), read on every
    /// webhook. This process is the only writer of `agent_states` (one daemon per
    /// database), and the cache is updated after each commit that changes a state.
    states: Arc<StateCache>,
}

type StateCache = std::sync::RwLock<HashMap<i64, Option<Value>>>;

/// Agents whose state is cached at most; beyond that the cache starts over.
const STATE_CACHE_MAX: usize = 100_000;

#[derive(Debug, Default)]
pub struct IngestStats {
    /// Transactions of the group committer that held deliveries and committed.
    pub commits: AtomicU64,
    pub deliveries: AtomicU64,
    /// Time spent writing batches (deliveries and the queue's claims and outcomes), from
    /// asking for the writer to the end of the commit.
    pub busy_micros: AtomicU64,
    /// Wall-clock milliseconds of the last batch in which some delivery was answered
    /// (stored or a duplicate), and of the last one in which some delivery could not be
    /// stored (0: never).
    pub last_ok: AtomicU64,
    pub last_failure: AtomicU64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A rule run to record, with the jobs it causes.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub rule: String,
    pub trigger: &'static str,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub happened_at: DateTime<Utc>,
    pub detail: Option<String>,
    pub jobs: Vec<NewJob>,
    /// How many target agents were skipped (decision is `partial` or `skipped`).
    pub skipped: usize,
}

impl NewRun {
    /// Turns a rule's decision into a run to record, with its jobs. Pure.
    pub fn from_outcomes(
        rule: &crate::rules::Rule,
        outcomes: Vec<crate::rules::AgentOutcome>,
        cause_at: chrono::DateTime<chrono::Utc>,
        scheduled_for: Option<chrono::DateTime<chrono::Utc>>,
        all_rules: &[crate::rules::Rule],
    ) -> NewRun {
        let mut jobs = Vec::new();
        let mut skipped = Vec::new();
        for o in outcomes {
            match o {
                crate::rules::AgentOutcome::Patch(p) => jobs.push(NewJob {
                    agent_id: p.agent_id,
                    fields: p.set.to_json(),
                    guard: (!p.guard.is_empty())
                        .then(|| crate::rules::Condition::list_to_json(&p.guard)),
                    cause_at,
                    valid_until: scheduled_for
                        .and_then(|at| crate::rules::valid_until(all_rules, rule, p.agent_id, at)),
                }),
                crate::rules::AgentOutcome::Skip { agent_id, reason } => {
                    skipped.push(match agent_id {
                        Some(id) => format!("agent {id}: {reason}"),
                        None => reason,
                    })
                }
            }
        }
        NewRun {
            rule: rule.name.clone(),
            trigger: if scheduled_for.is_some() {
                "schedule"
            } else {
                "webhook"
            },
            scheduled_for,
            happened_at: cause_at,
            detail: (!skipped.is_empty()).then(|| skipped.join("; ")),
            skipped: skipped.len(),
            jobs,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub agent_id: i64,
    pub fields: Value,
    pub guard: Option<Value>,
    pub cause_at: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
}

/// The platform's OAuth token pair.
#[derive(Debug, Clone)]
pub struct StoredTokens {
    pub access_token: secrecy::SecretString,
    pub refresh_token: secrecy::SecretString,
    pub expires_at: DateTime<Utc>,
    pub refresh_expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// When the event happened, from the source's `event_time` pointer.
    pub event_at: Option<DateTime<Utc>>,
    pub source: String,
    pub dedupe_key: String,
    pub received_at: DateTime<Utc>,
    pub content_type: String,
    pub payload: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Accepted { delivery_id: i64, jobs: usize },
    Duplicate,
}

/// Which runs [`Store::find_runs`] returns.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub rule: Option<String>,
    pub agent: Option<i64>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// What one [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub deliveries: u64,
    pub runs: u64,
    pub jobs: u64,
}

/// A job the worker holds a lease on.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: i64,
    pub run_id: i64,
    pub rule: String,
    pub agent_id: i64,
    pub fields: Value,
    pub guard: Option<Value>,
    pub valid_until: Option<DateTime<Utc>>,
    /// Counting this one.
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    pub lease_owner: String,
}

/// How an attempt ended, written in one statement with the job's next state.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: JobStatus,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub request_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The agent as the platform returned it, stored as its freshest known state.
    pub new_state: Option<Value>,
    /// False when nothing was sent (expired, guard failed): no attempt row then.
    pub attempted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Leased,
    Done,
    Dead,
    Expired,
    Skipped,
    Discarded,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pending,
        JobStatus::Leased,
        JobStatus::Done,
        JobStatus::Dead,
        JobStatus::Expired,
        JobStatus::Skipped,
        JobStatus::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Leased => "leased",
            JobStatus::Done => "done",
            JobStatus::Dead => "dead",
            JobStatus::Expired => "expired",
            JobStatus::Skipped => "skipped",
            JobStatus::Discarded => "discarded",
        }
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => JobStatus::Pending,
            "leased" => JobStatus::Leased,
            "done" => JobStatus::Done,
            "dead" => JobStatus::Dead,
            "expired" => JobStatus::Expired,
            "skipped" => JobStatus::Skipped,
            "discarded" => JobStatus::Discarded,
            other => {
                return Err(format!(
                    "unknown job status {other:?}; use pending, leased, done, dead, expired, skipped or discarded"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub run_id: i64,
    pub rule: String,
    pub agent_id: i64,
    pub fields: Value,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub rule: String,
    pub trigger: String,
    pub delivery_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub happened_at: DateTime<Utc>,
    pub decision: String,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub attempt: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub http_status: Option<i64>,
    pub request_id: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, DEFAULT_BUSY_TIMEOUT).await
    }

    /// [`Store::open`] with the time a write may wait for another process's lock.
    pub async fn open_with(path: &Path, busy_timeout: Duration) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Dir(dir.display().to_string(), e))?;
        }
        let base = connect_options(path, busy_timeout);
        // A local file cannot drop the connection: no liveness ping before each use
        // (it would cost a round trip to the connection's thread every transaction).
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(base.read_only(true))
            .await?;
        Ok(Store::with_pools(write, read))
    }

    /// Opens a database an autopilot daemon already created, for tools that work beside
    /// it: never creates, migrates or changes the journal mode of a file, and refuses one
    /// whose schema is not this version's.
    pub async fn open_existing(path: &Path) -> Result<Store> {
        let base = connect_options(path, DEFAULT_BUSY_TIMEOUT);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(base.clone())
            .await?;
        let applied: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&write)
                .await;
        let latest = MIGRATOR.iter().map(|m| m.version).max();
        match applied {
            Ok(v) if v == latest => {}
            Ok(v) => {
                write.close().await;
                return Err(StoreError::Schema(format!(
                    "{} has schema version {} but this autopilot expects {}: run `autopilot migrate`",
                    path.display(),
                    v.map_or("none".into(), |v| v.to_string()),
                    latest.unwrap_or_default()
                )));
            }
            Err(_) => {
                write.close().await;
                return Err(StoreError::Schema(format!(
                    "{} is not an autopilot database",
                    path.display()
                )));
            }
        }
        let read = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(base.read_only(true))
            .await?;
        Ok(Store::with_pools(write, read))
    }

    fn with_pools(write: SqlitePool, read: SqlitePool) -> Store {
        let (writes, rx) = mpsc::channel(4 * MAX_BATCH);
        let ingest_stats = Arc::new(IngestStats::default());
        let states = Arc::new(std::sync::RwLock::default());
        tokio::spawn(group_commit(
            write.clone(),
            rx,
            ingest_stats.clone(),
            states.clone(),
        ));
        Store {
            write,
            read,
            writes,
            ingest_stats,
            states,
        }
    }

    /// Is storing deliveries failing right now? A delivery's error answer, if it came
    /// after the last delivery answered without one and within the last minute.
    pub fn ingest_failing(&self) -> bool {
        let failure = self.ingest_stats.last_failure.load(Ordering::Relaxed);
        let ok = self.ingest_stats.last_ok.load(Ordering::Relaxed);
        failure > ok && unix_ms().saturating_sub(failure) < 60_000
    }

    /// (transactions, deliveries, seconds busy) of the group committer.
    pub fn ingest_stats(&self) -> (u64, u64, f64) {
        (
            self.ingest_stats.commits.load(Ordering::Relaxed),
            self.ingest_stats.deliveries.load(Ordering::Relaxed),
            self.ingest_stats.busy_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }

    /// Jobs per state.
    pub async fn job_counts(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("status"), r.get::<i64, _>("n")))
            .collect())
    }

    /// When the oldest pending job that is due by `now` became due.
    pub async fn oldest_due(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM jobs WHERE status = 'pending' AND next_attempt_at <= ?",
        )
        .bind(ms(now))
        .fetch_one(&self.read)
        .await?;
        Ok(oldest.map(from_ms))
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Can we take the write lock right now? (Opens and rolls back a write transaction.)
    pub async fn check_writable(&self) -> Result<()> {
        let tx = self.begin().await?;
        tx.rollback().await?;
        Ok(())
    }

    /// Does the database answer?
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.write).await?;
        Ok(())
    }

    // ---- agents ------------------------------------------------------------------

    pub async fn agent_states(&self, ids: &[i64]) -> Result<HashMap<i64, Value>> {
        let mut out = HashMap::new();
        for id in ids {
            if let Some(state) = self.agent_state(*id).await? {
                out.insert(*id, state);
            }
        }
        Ok(out)
    }

    pub async fn agent_state(&self, id: i64) -> Result<Option<Value>> {
        if let Some(known) = self.cached_state(id) {
            return Ok(known);
        }
        let row = sqlx::query("SELECT state FROM agent_states WHERE agent_id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        let state: Option<Value> = match row {
            Some(r) => Some(serde_json::from_str(r.get::<&str, _>(0))?),
            None => None,
        };
        // Only if no writer cached a newer state meanwhile.
        self.states
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(|| state.clone());
        Ok(state)
    }

    fn cached_state(&self, id: i64) -> Option<Option<Value>> {
        let cache = self.states.read().unwrap_or_else(|e| e.into_inner());
        cache.get(&id).cloned()
    }

    fn cache_state(&self, id: i64, state: Option<Value>) {
        cache_state(&self.states, id, state);
    }

    pub async fn save_agent_state(
        &self,
        id: i64,
        state: &Value,
        origin: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        upsert_state(&mut tx, id, state, origin, now).await?;
        tx.commit().await?;
        self.cache_state(id, Some(state.clone()));
        Ok(())
    }

    // ---- platform tokens -----------------------------------------------------------

    pub async fn load_tokens(&self) -> Result<Option<StoredTokens>> {
        let row = sqlx::query(
            "SELECT access_token, refresh_token, expires_at, refresh_expires_at FROM oauth_tokens WHERE id = 1",
        )
        .fetch_optional(&self.write)
        .await?;
        Ok(row.map(|r| StoredTokens {
            access_token: r.get::<String, _>("access_token").into(),
            refresh_token: r.get::<String, _>("refresh_token").into(),
            expires_at: from_ms(r.get("expires_at")),
            refresh_expires_at: from_ms(r.get("refresh_expires_at")),
        }))
    }

    /// Replaces the stored pair in one statement (the old refresh token is already dead).
    pub async fn save_tokens(&self, t: &StoredTokens, now: DateTime<Utc>) -> Result<()> {
        use secrecy::ExposeSecret;
        sqlx::query(
            "INSERT INTO oauth_tokens (id, access_token, refresh_token, expires_at, refresh_expires_at, obtained_at)
             VALUES (1, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET access_token = excluded.access_token,
                 refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
                 refresh_expires_at = excluded.refresh_expires_at, obtained_at = excluded.obtained_at",
        )
        .bind(t.access_token.expose_secret())
        .bind(t.refresh_token.expose_secret())
        .bind(ms(t.expires_at))
        .bind(ms(t.refresh_expires_at))
        .bind(ms(now))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    // ---- ingest ------------------------------------------------------------------

    /// Stores a delivery and the runs and jobs it caused, atomically, and returns once
    /// that is durable. A delivery already stored under the same (source, dedupe key)
    /// changes nothing. Concurrent calls are committed together (group commit, see
    /// [`group_commit`]): one transaction and one fsync for a whole batch.
    pub async fn record_delivery(
        &self,
        d: &NewDelivery,
        runs: &[NewRun],
    ) -> Result<DeliveryOutcome> {
        let (reply, answer) = oneshot::channel();
        let pending = PendingDelivery {
            delivery: d.clone(),
            runs: runs.to_vec(),
            reply,
        };
        self.submit(Write::Delivery(pending), answer).await
    }

    /// Hands a write to the group committer and waits for its outcome (after the commit).
    async fn submit<T>(&self, w: Write, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let stopped = || StoreError::Commit("the database writer has stopped".into());
        self.writes.send(w).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Deletes what is older than `before`: finished jobs and their attempts, runs left
    /// without jobs, and deliveries left without runs (so a redelivery after that is no
    /// longer recognised as a duplicate). Open jobs, and the runs and deliveries behind
    /// them, are kept however old. Works in short transactions of at most 500 rows.
    pub async fn prune(&self, before: DateTime<Utc>) -> Result<Pruned> {
        let cutoff = ms(before);
        let mut pruned = Pruned::default();
        loop {
            // The same 500 finished jobs in both statements: one transaction, same order.
            let mut tx = self.begin().await?;
            sqlx::query(
                "DELETE FROM job_attempts WHERE job_id IN (
                    SELECT id FROM jobs WHERE status NOT IN ('pending', 'leased') AND updated_at < ?1
                    ORDER BY id LIMIT 500)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            let n = sqlx::query(
                "DELETE FROM jobs WHERE id IN (
                    SELECT id FROM jobs WHERE status NOT IN ('pending', 'leased') AND updated_at < ?1
                    ORDER BY id LIMIT 500)",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            pruned.jobs += n;
            if n == 0 {
                break;
            }
        }
        pruned.runs = self
            .delete_in_batches(
                "DELETE FROM rule_runs WHERE id IN (
                    SELECT r.id FROM rule_runs r WHERE r.created_at < ?1
                      AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.id)
                    LIMIT 500)",
                cutoff,
            )
            .await?;
        pruned.deliveries = self
            .delete_in_batches(
                "DELETE FROM deliveries WHERE id IN (
                    SELECT d.id FROM deliveries d WHERE d.received_at < ?1
                      AND NOT EXISTS (SELECT 1 FROM rule_runs r WHERE r.delivery_id = d.id)
                    LIMIT 500)",
                cutoff,
            )
            .await?;
        Ok(pruned)
    }

    /// Runs a `DELETE … LIMIT 500` bound to `cutoff` until it deletes nothing; the rows
    /// deleted in all.
    async fn delete_in_batches(&self, sql: &'static str, cutoff: i64) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let n = sqlx::query(sql)
                .bind(cutoff)
                .execute(&self.write)
                .await?
                .rows_affected();
            deleted += n;
            if n == 0 {
                return Ok(deleted);
            }
        }
    }

    pub async fn delivery_count(&self, source: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE source = ?")
                .bind(source)
                .fetch_one(&self.read)
                .await?,
        )
    }

    // ---- schedule ----------------------------------------------------------------

    pub async fn last_fire(&self, rule: &str) -> Result<Option<DateTime<Utc>>> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT last_scheduled_for FROM rule_fires WHERE rule = ?")
                .bind(rule)
                .fetch_optional(&self.read)
                .await?;
        Ok(v.map(from_ms))
    }

    /// Records that the scheduler has accounted for `rule` up to `at` (without firing).
    pub async fn mark_fired_until(&self, rule: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO rule_fires (rule, last_scheduled_for) VALUES (?, ?)
             ON CONFLICT (rule) DO UPDATE SET last_scheduled_for = MAX(last_scheduled_for, excluded.last_scheduled_for)",
        )
        .bind(rule)
        .bind(ms(at))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Records a scheduled fire and its jobs. Returns the run id, or `None` when this
    /// (rule, instant) already fired: a restart or a second call cannot fire it twice.
    pub async fn record_fire(&self, run: &NewRun, now: DateTime<Utc>) -> Result<Option<i64>> {
        let scheduled_for = run.scheduled_for.expect("a fire has an instant");
        let mut tx = self.begin().await?;
        let inserted = insert_run(&mut tx, run, None, now).await?;
        sqlx::query(
            "INSERT INTO rule_fires (rule, last_scheduled_for) VALUES (?, ?)
             ON CONFLICT (rule) DO UPDATE SET last_scheduled_for = MAX(last_scheduled_for, excluded.last_scheduled_for)",
        )
        .bind(&run.rule)
        .bind(ms(scheduled_for))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted.map(|(id, _)| id))
    }

    // ---- queue -------------------------------------------------------------------

    /// Leases the next sendable job. A job is sendable when it is due and it heads its
    /// agent's line: no earlier-caused job of the same agent is unfinished. So each agent
    /// has at most one job in flight, and its jobs go out in cause order. Written by the
    /// group committer, in the transaction (and under the fsync) of whatever else is
    /// waiting; the job is handed out only after that commit.
    pub async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<Option<ClaimedJob>> {
        let (reply, answer) = oneshot::channel();
        let claim = PendingClaim {
            owner: owner.to_string(),
            now,
            lease,
            reply,
        };
        self.submit(Write::Claim(claim), answer).await
    }

    /// Ends an attempt: the job's next state, its attempt row and (on success) the agent's
    /// new state, together, through the group committer. Returns false if the lease was
    /// lost meanwhile (the job was rescued by another worker after its lease ran out):
    /// then nothing changes.
    pub async fn finish(&self, job: &ClaimedJob, f: &Finish) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        let finish = PendingFinish {
            job: job.clone(),
            finish: f.clone(),
            reply,
        };
        self.submit(Write::Finish(finish), answer).await
    }

    /// When the queue next has something to do: the earliest due pending job.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT MIN(next_attempt_at) FROM jobs WHERE status = 'pending'")
                .fetch_one(&self.read)
                .await?;
        Ok(v.map(from_ms))
    }

    /// Jobs whose lease ran out (their worker died mid-attempt) go back in line, and the
    /// lost attempt gets its row in `job_attempts`, in one transaction. Returns their ids.
    pub async fn rescue_expired(&self, now: DateTime<Utc>) -> Result<Vec<i64>> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, http_status, request_id, outcome, error)
             SELECT id, attempts, updated_at, ?1, NULL, NULL, 'lost',
                    'the worker holding the lease stopped (crash or kill) before recording an outcome; the platform may have applied it'
             FROM jobs WHERE status = 'leased' AND lease_until <= ?1",
        )
        .bind(ms(now))
        .execute(&mut *tx)
        .await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'pending', lease_owner = NULL, lease_until = NULL,
                    next_attempt_at = ?1, last_error = 'lease ran out: the attempt was lost', updated_at = ?1
             WHERE status = 'leased' AND lease_until <= ?1
             RETURNING id",
        )
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ids)
    }

    // ---- operator actions (work beside a running daemon) ----------------------------

    /// Puts a finished-but-failed job back in line: attempts start again from zero (the
    /// old attempts stay in `job_attempts`) and its `valid_until` is dropped, because an
    /// operator asked for it. Errors name the job's status when it cannot be retried.
    pub async fn retry_job(&self, id: i64, now: DateTime<Utc>) -> Result<Result<(), String>> {
        self.operator_transition(
            id,
            &["dead", "expired", "skipped", "discarded"],
            "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = ?1,
                    valid_until = NULL, last_error = 'retried by operator; last error: ' || COALESCE(last_error, 'none'),
                    updated_at = ?1
             WHERE id = ?2",
            now,
            "only dead, expired, skipped or discarded jobs can be retried",
        )
        .await
    }

    /// Retries every dead job; returns their ids.
    pub async fn retry_all_dead(&self, now: DateTime<Utc>) -> Result<Vec<i64>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'pending', attempts = 0, next_attempt_at = ?1, valid_until = NULL,
                    last_error = 'retried by operator; last error: ' || COALESCE(last_error, 'none'),
                    updated_at = ?1
             WHERE status = 'dead' RETURNING id",
        )
        .bind(ms(now))
        .fetch_all(&self.write)
        .await?;
        Ok(ids)
    }

    /// Gives up on a job that is not in flight: it is never sent.
    pub async fn discard_job(&self, id: i64, now: DateTime<Utc>) -> Result<Result<(), String>> {
        self.operator_transition(
            id,
            &["pending", "dead", "expired", "skipped"],
            "UPDATE jobs SET status = 'discarded', updated_at = ?1 WHERE id = ?2",
            now,
            "it cannot be discarded now",
        )
        .await
    }

    /// Applies `sql` (binding `now`, `id`) if the job's status is one of `allowed`, in
    /// one transaction; otherwise says why not.
    async fn operator_transition(
        &self,
        id: i64,
        allowed: &[&str],
        sql: &'static str,
        now: DateTime<Utc>,
        refusal: &str,
    ) -> Result<Result<(), String>> {
        let mut tx = self.begin().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let verdict = match status {
            None => Err(format!("no job {id}")),
            Some(s) if allowed.contains(&s.as_str()) => {
                sqlx::query(sql)
                    .bind(ms(now))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            }
            Some(other) => Err(format!("job {id} is {other}; {refusal}")),
        };
        tx.commit().await?;
        Ok(verdict)
    }

    // ---- inspection ----------------------------------------------------------------

    /// Jobs not finished yet (pending or leased).
    pub async fn open_jobs(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'leased')")
                .fetch_one(&self.read)
                .await?,
        )
    }

    pub async fn jobs(&self, status: Option<&str>, agent: Option<i64>) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.*, r.rule FROM jobs j JOIN rule_runs r ON r.id = j.run_id
             WHERE (?1 IS NULL OR j.status = ?1) AND (?2 IS NULL OR j.agent_id = ?2)
             ORDER BY j.id",
        )
        .bind(status)
        .bind(agent)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(job_row).collect()
    }

    /// Jobs newest first, filtered by state and agent, at most `limit`.
    pub async fn find_jobs(
        &self,
        status: Option<&str>,
        agent: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.*, r.rule FROM jobs j JOIN rule_runs r ON r.id = j.run_id
             WHERE (?1 IS NULL OR j.status = ?1) AND (?2 IS NULL OR j.agent_id = ?2)
             ORDER BY j.id DESC LIMIT ?3",
        )
        .bind(status)
        .bind(agent)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(job_row).collect()
    }

    pub async fn job(&self, id: i64) -> Result<Option<JobRow>> {
        let row = sqlx::query(
            "SELECT j.*, r.rule FROM jobs j JOIN rule_runs r ON r.id = j.run_id WHERE j.id = ?",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(job_row).transpose()
    }

    pub async fn jobs_of_run(&self, run_id: i64) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(
            "SELECT j.*, r.rule FROM jobs j JOIN rule_runs r ON r.id = j.run_id
             WHERE j.run_id = ? ORDER BY j.id",
        )
        .bind(run_id)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(job_row).collect()
    }

    /// The audit trail, newest first: runs filtered by rule, by an agent they sent a
    /// job for, and by the time of their cause (`since` inclusive, `until` exclusive).
    pub async fn find_runs(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(
            "SELECT * FROM rule_runs r
             WHERE (?1 IS NULL OR r.rule = ?1)
               AND (?2 IS NULL OR EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.id AND j.agent_id = ?2))
               AND (?3 IS NULL OR r.happened_at >= ?3)
               AND (?4 IS NULL OR r.happened_at < ?4)
             ORDER BY r.id DESC LIMIT ?5",
        )
        .bind(&f.rule)
        .bind(f.agent)
        .bind(f.since.map(ms))
        .bind(f.until.map(ms))
        .bind(f.limit)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    /// An agent's last known state: (state, when observed, from a PATCH answer or a GET).
    pub async fn agent_record(&self, id: i64) -> Result<Option<(Value, DateTime<Utc>, String)>> {
        let row =
            sqlx::query("SELECT state, observed_at, origin FROM agent_states WHERE agent_id = ?")
                .bind(id)
                .fetch_optional(&self.read)
                .await?;
        Ok(match row {
            Some(r) => Some((
                serde_json::from_str(r.get::<&str, _>("state"))?,
                from_ms(r.get("observed_at")),
                r.get("origin"),
            )),
            None => None,
        })
    }

    /// Records a run an operator asked for (fire now) and its jobs; no schedule mark
    /// moves, so the rule's own fires are unaffected. Returns (run id, jobs).
    pub async fn record_manual_run(
        &self,
        run: &NewRun,
        now: DateTime<Utc>,
    ) -> Result<(i64, usize)> {
        let mut tx = self.begin().await?;
        let inserted = insert_run(&mut tx, run, None, now).await?;
        tx.commit().await?;
        inserted.ok_or_else(|| StoreError::Commit("the run was not recorded".into()))
    }

    pub async fn runs(&self, rule: Option<&str>) -> Result<Vec<RunRow>> {
        let rows =
            sqlx::query("SELECT * FROM rule_runs WHERE (?1 IS NULL OR rule = ?1) ORDER BY id")
                .bind(rule)
                .fetch_all(&self.read)
                .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    pub async fn attempts(&self, job_id: i64) -> Result<Vec<AttemptRow>> {
        let rows = sqlx::query("SELECT * FROM job_attempts WHERE job_id = ? ORDER BY attempt, id")
            .bind(job_id)
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AttemptRow {
                attempt: r.get("attempt"),
                started_at: from_ms(r.get("started_at")),
                finished_at: from_ms(r.get("finished_at")),
                http_status: r.get("http_status"),
                request_id: r.get("request_id"),
                outcome: r.get("outcome"),
                error: r.get("error"),
            })
            .collect())
    }
}

fn job_row(r: &sqlx::sqlite::SqliteRow) -> Result<JobRow> {
    Ok(JobRow {
        id: r.get("id"),
        run_id: r.get("run_id"),
        rule: r.get("rule"),
        agent_id: r.get("agent_id"),
        fields: serde_json::from_str(r.get::<&str, _>("fields"))?,
        status: r.get("status"),
        attempts: r.get("attempts"),
        next_attempt_at: from_ms(r.get("next_attempt_at")),
        valid_until: r.get::<Option<i64>, _>("valid_until").map(from_ms),
        last_status: r.get("last_status"),
        last_error: r.get("last_error"),
        request_id: r.get("request_id"),
        created_at: from_ms(r.get("created_at")),
        updated_at: from_ms(r.get("updated_at")),
    })
}

fn run_row(r: &sqlx::sqlite::SqliteRow) -> RunRow {
    RunRow {
        id: r.get("id"),
        rule: r.get("rule"),
        trigger: r.get("trigger"),
        delivery_id: r.get("delivery_id"),
        scheduled_for: r.get::<Option<i64>, _>("scheduled_for").map(from_ms),
        happened_at: from_ms(r.get("happened_at")),
        decision: r.get("decision"),
        detail: r.get("detail"),
    }
}

async fn upsert_state(
    tx: &mut Transaction<'static, Sqlite>,
    id: i64,
    state: &Value,
    origin: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO agent_states (agent_id, state, observed_at, origin) VALUES (?, ?, ?, ?)
         ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state,
             observed_at = excluded.observed_at, origin = excluded.origin",
    )
    .bind(id)
    .bind(state.to_string())
    .bind(ms(now))
    .bind(origin)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets an agent's state in the cache, which starts over when it holds too many.
fn cache_state(states: &StateCache, id: i64, state: Option<Value>) {
    let mut cache = states.write().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= STATE_CACHE_MAX && !cache.contains_key(&id) {
        cache.clear();
    }
    cache.insert(id, state);
}

/// A write waiting for the group committer.
enum Write {
    Delivery(PendingDelivery),
    Claim(PendingClaim),
    Finish(PendingFinish),
}

/// One delivery waiting for the group committer, with where to send its outcome.
struct PendingDelivery {
    delivery: NewDelivery,
    runs: Vec<NewRun>,
    reply: oneshot::Sender<Result<DeliveryOutcome>>,
}

/// A queue worker waiting for a job.
struct PendingClaim {
    owner: String,
    now: DateTime<Utc>,
    lease: Duration,
    reply: oneshot::Sender<Result<Option<ClaimedJob>>>,
}

/// A queue worker's attempt outcome waiting to be recorded.
struct PendingFinish {
    job: ClaimedJob,
    finish: Finish,
    reply: oneshot::Sender<Result<bool>>,
}

/// The writes of one transaction, in the order they are written: deliveries (so their
/// new jobs can be claimed), then outcomes (so a finished job frees its agent's line),
/// then claims.
#[derive(Default)]
struct Batch {
    deliveries: Vec<PendingDelivery>,
    finishes: Vec<PendingFinish>,
    claims: Vec<PendingClaim>,
}

/// One outcome per write of a [`Batch`], in its order.
struct BatchOutcome {
    /// The transaction committed (some writes in it may still have failed alone).
    committed: bool,
    deliveries: Vec<Result<DeliveryOutcome>>,
    finishes: Vec<Result<bool>>,
    claims: Vec<Result<Option<ClaimedJob>>>,
}

impl BatchOutcome {
    /// Every write failed: the transaction did not commit, or cannot be trusted.
    fn failed(batch: &Batch, e: &dyn std::fmt::Display) -> BatchOutcome {
        let err = || StoreError::Commit(e.to_string());
        BatchOutcome {
            committed: false,
            deliveries: batch.deliveries.iter().map(|_| Err(err())).collect(),
            finishes: batch.finishes.iter().map(|_| Err(err())).collect(),
            claims: batch.claims.iter().map(|_| Err(err())).collect(),
        }
    }
}

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 256;

/// The group committer: takes every write waiting in the channel (up to [`MAX_BATCH`]):
/// deliveries, and the queue workers' claims and outcomes; writes them in one
/// `BEGIN IMMEDIATE` transaction, commits once, and only then answers each caller. While
/// a batch commits, the next one gathers: the busier the daemon, the more writes share
/// an fsync. Runs until every [`Store`] clone is dropped.
async fn group_commit(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<Write>,
    stats: Arc<IngestStats>,
    states: Arc<StateCache>,
) {
    let mut incoming = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut incoming, MAX_BATCH).await > 0 {
        let mut batch = Batch::default();
        for w in incoming.drain(..) {
            match w {
                Write::Delivery(d) => batch.deliveries.push(d),
                Write::Claim(c) => batch.claims.push(c),
                Write::Finish(f) => batch.finishes.push(f),
            }
        }
        let started = std::time::Instant::now();
        let out = commit_batch(&pool, &batch).await;
        stats
            .busy_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let accepted = out
            .deliveries
            .iter()
            .filter(|o| matches!(o, Ok(DeliveryOutcome::Accepted { .. })))
            .count();
        if out.committed && !batch.deliveries.is_empty() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats
                .deliveries
                .fetch_add(accepted as u64, Ordering::Relaxed);
        }
        // Deliveries in particular: a committed batch of claims says nothing about
        // whether a delivery can be stored (a full table, a refusing trigger).
        if out.deliveries.iter().any(Result::is_ok) {
            stats.last_ok.store(unix_ms(), Ordering::Relaxed);
        }
        if out.deliveries.iter().any(Result::is_err) {
            stats.last_failure.store(unix_ms(), Ordering::Relaxed);
        }
        // A caller that went away (an HTTP client hung up) learns nothing; its delivery
        // is committed and a retry by the sender is answered as a duplicate.
        for (pending, outcome) in batch.deliveries.into_iter().zip(out.deliveries) {
            let _ = pending.reply.send(outcome);
        }
        for (pending, outcome) in batch.finishes.into_iter().zip(out.finishes) {
            if let (Ok(true), Some(state)) = (&outcome, &pending.finish.new_state) {
                cache_state(&states, pending.job.agent_id, Some(state.clone()));
            }
            let _ = pending.reply.send(outcome);
        }
        for (pending, outcome) in batch.claims.into_iter().zip(out.claims) {
            let _ = pending.reply.send(outcome);
        }
    }
}

/// Writes a batch in one transaction; one outcome per write, in order. A write reported
/// done is committed; on any doubt the answer is an error (for a delivery, a 503), never
/// a success for something that did not commit.
///
/// Deliveries without an event time (no per-agent order to check) go in with three
/// statements for all of them ([`insert_bulk`]). If that fails, the transaction starts
/// over and every write takes its own savepoint, so one bad write cannot take the others
/// down; so do deliveries with an event time, claims and outcomes.
async fn commit_batch(pool: &SqlitePool, batch: &Batch) -> BatchOutcome {
    let begin = || pool.begin_with("BEGIN IMMEDIATE");
    let mut tx = match begin().await {
        Ok(tx) => tx,
        Err(e) => return BatchOutcome::failed(batch, &e),
    };
    let mut deliveries: Vec<Option<Result<DeliveryOutcome>>> =
        batch.deliveries.iter().map(|_| None).collect();
    let bulk: Vec<usize> = (0..batch.deliveries.len())
        .filter(|i| batch.deliveries[*i].delivery.event_at.is_none())
        .collect();
    if bulk.len() > 1 {
        match insert_bulk(&mut tx, &batch.deliveries, &bulk).await {
            Ok(done) => {
                for (i, outcome) in bulk.iter().zip(done) {
                    deliveries[*i] = Some(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "batch insert failed; storing its deliveries one by one");
                // A statement may have failed after another went in: start over.
                if let Err(undo) = tx.rollback().await {
                    return BatchOutcome::failed(batch, &format!("{e}; then {undo}"));
                }
                tx = match begin().await {
                    Ok(tx) => tx,
                    Err(e) => return BatchOutcome::failed(batch, &e),
                };
            }
        }
    }
    // Each write below in a savepoint of its own: `Err` from `saved` means the
    // transaction can no longer be trusted, and nothing of the batch is.
    for (p, slot) in batch.deliveries.iter().zip(deliveries.iter_mut()) {
        if slot.is_none() {
            let outcome = match savepoint(&mut tx).await {
                Ok(()) => insert_delivery(&mut tx, &p.delivery, &p.runs).await,
                Err(e) => return BatchOutcome::failed(batch, &e),
            };
            match saved(&mut tx, outcome).await {
                Ok(outcome) => *slot = Some(outcome),
                Err(e) => return BatchOutcome::failed(batch, &e),
            }
        }
    }
    let mut finishes = Vec::with_capacity(batch.finishes.len());
    for f in &batch.finishes {
        let outcome = match savepoint(&mut tx).await {
            Ok(()) => finish_job(&mut tx, &f.job, &f.finish).await,
            Err(e) => return BatchOutcome::failed(batch, &e),
        };
        match saved(&mut tx, outcome).await {
            Ok(outcome) => finishes.push(outcome),
            Err(e) => return BatchOutcome::failed(batch, &e),
        }
    }
    let mut claims = Vec::with_capacity(batch.claims.len());
    for c in &batch.claims {
        let outcome = match savepoint(&mut tx).await {
            Ok(()) => claim_job(&mut tx, c).await,
            Err(e) => return BatchOutcome::failed(batch, &e),
        };
        match saved(&mut tx, outcome).await {
            Ok(outcome) => claims.push(outcome),
            Err(e) => return BatchOutcome::failed(batch, &e),
        }
    }
    if let Err(e) = tx.commit().await {
        return BatchOutcome::failed(batch, &e);
    }
    BatchOutcome {
        committed: true,
        deliveries: deliveries
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::Commit("not written".into()))))
            .collect(),
        finishes,
        claims,
    }
}

/// Opens the savepoint one write of a batch goes in.
async fn savepoint(tx: &mut Transaction<'static, Sqlite>) -> Result<(), sqlx::Error> {
    sqlx::query("SAVEPOINT write").execute(&mut **tx).await?;
    Ok(())
}

/// Closes the savepoint of a write that ended with `outcome`: kept if it succeeded,
/// undone if it failed. `Err` if even that fails: then SQLite may have rolled back the
/// whole transaction.
async fn saved<T>(
    tx: &mut Transaction<'static, Sqlite>,
    outcome: Result<T>,
) -> Result<Result<T>, String> {
    if outcome.is_err() {
        if let Err(undo) = sqlx::query("ROLLBACK TO write").execute(&mut **tx).await {
            let e = outcome.err().map(|e| e.to_string()).unwrap_or_default();
            return Err(format!("{e}; then {undo}"));
        }
    }
    match sqlx::query("RELEASE write").execute(&mut **tx).await {
        Ok(_) => Ok(outcome),
        Err(e) => Err(e.to_string()),
    }
}

/// Rows a bulk statement carries at most (8 parameters each, well under SQLite's 32,766).
const BULK_ROWS: usize = 256;

/// `INSERT … SELECT` from a `VALUES` list of `rows` rows of `cols` parameters, the last of
/// each row its place in the batch (inserted in that order). The list is padded with NULL
/// rows, which the `WHERE` leaves out, up to a power of two: a few statement shapes cover
/// every batch size and stay prepared in the connection's statement cache. Built from
/// constants and counts only: every value travels as a parameter.
fn bulk_sql(insert: &str, select: &str, cols: usize, rows: usize, tail: &str) -> String {
    let row = format!("({})", vec!["?"; cols].join(", "));
    let list = vec![row.as_str(); rows.next_power_of_two()].join(", ");
    format!(
        "{insert} SELECT {select} FROM (VALUES {list}) WHERE column1 IS NOT NULL ORDER BY column{cols} {tail}"
    )
}

/// Binds the NULL rows that pad a [`bulk_sql`] list of `rows` rows up to its power of two.
fn pad(
    mut q: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
    rows: usize,
    cols: usize,
) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments> {
    for _ in 0..(rows.next_power_of_two() - rows) * cols {
        q = q.bind(None::<i64>);
    }
    q
}

/// Inserts the deliveries `which` of a batch, their runs and their jobs with one
/// statement each (per [`BULK_ROWS`] rows): the cost per delivery is a few microseconds,
/// not a round trip to SQLite's thread per row. Outcomes in the order of `which`. Two
/// copies of one delivery in the same batch: the first is accepted, the other is a
/// duplicate, as if they had come one by one.
async fn insert_bulk(
    tx: &mut Transaction<'static, Sqlite>,
    batch: &[PendingDelivery],
    which: &[usize],
) -> Result<Vec<DeliveryOutcome>> {
    let mut ids: HashMap<(String, String), i64> = HashMap::new();
    for chunk in which.chunks(BULK_ROWS) {
        let sql = bulk_sql(
            "INSERT INTO deliveries (source, dedupe_key, received_at, content_type, payload)",
            "column1, column2, column3, column4, column5",
            6,
            chunk.len(),
            "ON CONFLICT (source, dedupe_key) DO NOTHING RETURNING id, source, dedupe_key",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (n, i) in chunk.iter().enumerate() {
            let d = &batch[*i].delivery;
            q = q
                .bind(&d.source)
                .bind(&d.dedupe_key)
                .bind(ms(d.received_at))
                .bind(&d.content_type)
                .bind(d.payload.to_string())
                .bind(n as i64);
        }
        for r in pad(q, chunk.len(), 6).fetch_all(&mut **tx).await? {
            ids.insert(
                (r.try_get("source")?, r.try_get("dedupe_key")?),
                r.try_get("id")?,
            );
        }
    }
    // Which delivery got which id (the first of copies takes it), and its runs.
    let mut accepted: Vec<Option<i64>> = Vec::with_capacity(which.len());
    let mut runs: Vec<(i64, &NewRun, DateTime<Utc>)> = Vec::new();
    for i in which {
        let d = &batch[*i].delivery;
        let id = ids.remove(&(d.source.clone(), d.dedupe_key.clone()));
        if let Some(delivery_id) = id {
            for run in &batch[*i].runs {
                runs.push((delivery_id, run, d.received_at));
            }
        }
        accepted.push(id);
    }
    let mut run_ids: HashMap<(i64, String), i64> = HashMap::new();
    for chunk in runs.chunks(BULK_ROWS) {
        let sql = bulk_sql(
            "INSERT INTO rule_runs (rule, trigger, delivery_id, scheduled_for, happened_at, decision, detail, created_at)",
            "column1, column2, column3, NULL, column4, column5, column6, column7",
            8,
            chunk.len(),
            "RETURNING id, rule, delivery_id",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (n, (delivery_id, run, received_at)) in chunk.iter().enumerate() {
            q = q
                .bind(&run.rule)
                .bind(run.trigger)
                .bind(delivery_id)
                .bind(ms(run.happened_at))
                .bind(run_decision(run))
                .bind(&run.detail)
                .bind(ms(*received_at))
                .bind(n as i64);
        }
        for r in pad(q, chunk.len(), 8).fetch_all(&mut **tx).await? {
            run_ids.insert(
                (r.try_get("delivery_id")?, r.try_get("rule")?),
                r.try_get("id")?,
            );
        }
    }
    let mut jobs: Vec<(i64, &NewJob, DateTime<Utc>)> = Vec::new();
    let mut counts = Vec::with_capacity(which.len());
    for (i, id) in which.iter().zip(&accepted) {
        let Some(delivery_id) = id else {
            counts.push(0);
            continue;
        };
        let d = &batch[*i].delivery;
        let mut n = 0;
        for run in &batch[*i].runs {
            let run_id = run_ids
                .get(&(*delivery_id, run.rule.clone()))
                .ok_or_else(|| {
                    StoreError::Commit(format!("run of rule {:?} not recorded", run.rule))
                })?;
            for job in &run.jobs {
                jobs.push((*run_id, job, d.received_at));
                n += 1;
            }
        }
        counts.push(n);
    }
    for chunk in jobs.chunks(BULK_ROWS) {
        let sql = bulk_sql(
            "INSERT INTO jobs (run_id, agent_id, fields, guard, cause_at, valid_until, status,
                               next_attempt_at, created_at, updated_at)",
            "column1, column2, column3, column4, column5, column6, 'pending', column7, column7, column7",
            8,
            chunk.len(),
            "",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (n, (run_id, job, now)) in chunk.iter().enumerate() {
            q = q
                .bind(run_id)
                .bind(job.agent_id)
                .bind(job.fields.to_string())
                .bind(job.guard.as_ref().map(Value::to_string))
                .bind(ms(job.cause_at))
                .bind(job.valid_until.map(ms))
                .bind(ms(*now))
                .bind(n as i64);
        }
        pad(q, chunk.len(), 8).execute(&mut **tx).await?;
    }
    Ok(accepted
        .into_iter()
        .zip(counts)
        .map(|(id, jobs)| match id {
            Some(delivery_id) => DeliveryOutcome::Accepted { delivery_id, jobs },
            None => DeliveryOutcome::Duplicate,
        })
        .collect())
}

/// [`Store::claim`] inside the committer's transaction.
async fn claim_job(
    tx: &mut Transaction<'static, Sqlite>,
    c: &PendingClaim,
) -> Result<Option<ClaimedJob>> {
    let now_ms = ms(c.now);
    let lease_until = now_ms + c.lease.as_millis() as i64;
    let row = sqlx::query(
        "UPDATE jobs SET status = 'leased', lease_owner = ?1, lease_until = ?2,
                    attempts = attempts + 1, updated_at = ?3
             WHERE id = (
                -- Every agent with open jobs (one index seek each), then each agent's
                -- head of line; only a pending, due head can go. Work grows with the
                -- number of agents, not with the length of their lines.
                WITH RECURSIVE agents(agent_id) AS (
                    SELECT (SELECT agent_id FROM jobs INDEXED BY jobs_line
                            WHERE status IN ('pending', 'leased') ORDER BY agent_id LIMIT 1)
                    UNION ALL
                    SELECT (SELECT agent_id FROM jobs INDEXED BY jobs_line
                            WHERE status IN ('pending', 'leased') AND agent_id > agents.agent_id
                            ORDER BY agent_id LIMIT 1)
                    FROM agents WHERE agents.agent_id IS NOT NULL),
                heads(id) AS (
                    SELECT (SELECT k.id FROM jobs k INDEXED BY jobs_line
                            WHERE k.agent_id = agents.agent_id AND k.status IN ('pending', 'leased')
                            ORDER BY k.cause_at, k.id LIMIT 1)
                    FROM agents WHERE agents.agent_id IS NOT NULL)
                SELECT j.id FROM heads CROSS JOIN jobs j ON j.id = heads.id
                WHERE j.status = 'pending' AND j.next_attempt_at <= ?3
                  -- A job caused earlier may have arrived while a later one was in flight.
                  AND NOT EXISTS (
                      SELECT 1 FROM jobs l INDEXED BY jobs_leased
                      WHERE l.agent_id = j.agent_id AND l.status = 'leased'
                        AND l.id != j.id AND l.lease_until > ?3)
                ORDER BY j.next_attempt_at, j.id
                LIMIT 1)
             RETURNING id, run_id, agent_id, fields, guard, valid_until, attempts, created_at,
                       (SELECT rule FROM rule_runs r WHERE r.id = run_id) AS rule",
    )
    .bind(&c.owner)
    .bind(lease_until)
    .bind(now_ms)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else { return Ok(None) };
    // `try_get`, not `get`: a panic here would stop the committer, and with it every write.
    let guard: Option<String> = r.try_get("guard")?;
    Ok(Some(ClaimedJob {
        id: r.try_get("id")?,
        run_id: r.try_get("run_id")?,
        rule: r.try_get("rule")?,
        agent_id: r.try_get("agent_id")?,
        fields: serde_json::from_str(r.try_get::<&str, _>("fields")?)?,
        guard: guard.map(|g| serde_json::from_str(&g)).transpose()?,
        valid_until: r.try_get::<Option<i64>, _>("valid_until")?.map(from_ms),
        attempt: r.try_get::<i64, _>("attempts")? as u32,
        created_at: from_ms(r.try_get("created_at")?),
        lease_owner: c.owner.clone(),
    }))
}

/// [`Store::finish`] inside the committer's transaction.
async fn finish_job(
    tx: &mut Transaction<'static, Sqlite>,
    job: &ClaimedJob,
    f: &Finish,
) -> Result<bool> {
    let updated = sqlx::query(
        "UPDATE jobs SET status = ?, next_attempt_at = COALESCE(?, next_attempt_at),
                    last_status = COALESCE(?, last_status), last_error = ?,
                    request_id = COALESCE(?, request_id),
                    lease_owner = NULL, lease_until = NULL, updated_at = ?
             WHERE id = ? AND lease_owner = ? AND status = 'leased'",
    )
    .bind(f.status.as_str())
    .bind(f.next_attempt_at.map(ms))
    .bind(f.http_status.map(i64::from))
    .bind(&f.error)
    .bind(&f.request_id)
    .bind(ms(f.finished_at))
    .bind(job.id)
    .bind(&job.lease_owner)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    if f.attempted {
        sqlx::query(
            "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, http_status, request_id, outcome, error)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id)
        .bind(i64::from(job.attempt))
        .bind(ms(f.started_at))
        .bind(ms(f.finished_at))
        .bind(f.http_status.map(i64::from))
        .bind(&f.request_id)
        .bind(f.status.as_str())
        .bind(&f.error)
        .execute(&mut **tx)
        .await?;
    } else {
        // Nothing was sent: the claim's attempt count is given back.
        sqlx::query("UPDATE jobs SET attempts = attempts - 1 WHERE id = ?")
            .bind(job.id)
            .execute(&mut **tx)
            .await?;
    }
    if let Some(state) = &f.new_state {
        upsert_state(tx, job.agent_id, state, "patch", f.finished_at).await?;
    }
    Ok(true)
}

/// Inserts a delivery and its runs and jobs inside the caller's transaction.
async fn insert_delivery(
    tx: &mut Transaction<'static, Sqlite>,
    d: &NewDelivery,
    runs: &[NewRun],
) -> Result<DeliveryOutcome> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO deliveries (source, dedupe_key, received_at, content_type, payload)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (source, dedupe_key) DO NOTHING
             RETURNING id",
    )
    .bind(&d.source)
    .bind(&d.dedupe_key)
    .bind(ms(d.received_at))
    .bind(&d.content_type)
    .bind(d.payload.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(delivery_id) = id else {
        return Ok(DeliveryOutcome::Duplicate);
    };
    let mut jobs = 0;
    for run in runs {
        let mut run = run.clone();
        if let Some(event_at) = d.event_at {
            // Out of order: an event older than the newest one already applied for an
            // agent must not overwrite newer state. Checked in this transaction.
            let mut stale = Vec::new();
            let mut fresh = Vec::new();
            for job in run.jobs.drain(..) {
                let newest: Option<i64> = sqlx::query_scalar(
                    "SELECT event_at FROM agent_event_times WHERE source = ? AND agent_id = ?",
                )
                .bind(&d.source)
                .bind(job.agent_id)
                .fetch_optional(&mut **tx)
                .await?;
                if newest.is_some_and(|n| n > ms(event_at)) {
                    stale.push(format!(
                        "agent {}: stale, older than an event already applied",
                        job.agent_id
                    ));
                    continue;
                }
                sqlx::query(
                        "INSERT INTO agent_event_times (source, agent_id, event_at) VALUES (?, ?, ?)
                         ON CONFLICT (source, agent_id) DO UPDATE SET event_at = MAX(event_at, excluded.event_at)",
                    )
                    .bind(&d.source)
                    .bind(job.agent_id)
                    .bind(ms(event_at))
                    .execute(&mut **tx)
                    .await?;
                fresh.push(job);
            }
            run.jobs = fresh;
            if !stale.is_empty() {
                run.skipped += stale.len();
                let mut detail: Vec<String> = run.detail.take().into_iter().collect();
                detail.extend(stale);
                run.detail = Some(detail.join("; "));
            }
        }
        if let Some((_, n)) = insert_run(tx, &run, Some(delivery_id), d.received_at).await? {
            jobs += n;
        }
    }
    Ok(DeliveryOutcome::Accepted { delivery_id, jobs })
}

/// `skipped` (no job), `enqueued` (every target agent got one) or `partial`.
fn run_decision(run: &NewRun) -> &'static str {
    match (run.jobs.len(), run.skipped) {
        (0, _) => "skipped",
        (_, 0) => "enqueued",
        _ => "partial",
    }
}

/// Inserts a run and its jobs. `None` when the run's cause already fired this rule.
async fn insert_run(
    tx: &mut Transaction<'static, Sqlite>,
    run: &NewRun,
    delivery_id: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Option<(i64, usize)>> {
    let decision = run_decision(run);
    let run_id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO rule_runs (rule, trigger, delivery_id, scheduled_for, happened_at, decision, detail, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&run.rule)
    .bind(run.trigger)
    .bind(delivery_id)
    .bind(run.scheduled_for.map(ms))
    .bind(ms(run.happened_at))
    .bind(decision)
    .bind(&run.detail)
    .bind(ms(now))
    .fetch_optional(&mut **tx)
    .await?;
    let Some(run_id) = run_id else {
        return Ok(None);
    };
    for job in &run.jobs {
        sqlx::query(
            "INSERT INTO jobs (run_id, agent_id, fields, guard, cause_at, valid_until, status,
                               next_attempt_at, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        )
        .bind(run_id)
        .bind(job.agent_id)
        .bind(job.fields.to_string())
        .bind(job.guard.as_ref().map(Value::to_string))
        .bind(ms(job.cause_at))
        .bind(job.valid_until.map(ms))
        .bind(ms(now))
        .bind(ms(now))
        .bind(ms(now))
        .execute(&mut **tx)
        .await?;
    }
    Ok(Some((run_id, run.jobs.len())))
}
